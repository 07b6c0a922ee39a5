//! Reading checkpoint tensors by their Hugging Face name, whatever the file format.
//!
//! Hugging Face names are the canonical names of the model; [`gguf_name`] is the single
//! mapping to GGUF names, shared by the llama, qwen2 and qwen3 families (they differ only in
//! which tensors exist: q/k/v biases for qwen2, q/k norms for qwen3).

use super::config::ModelConfig;
use super::gguf::GgufFile;
use super::linear::QuantMatrix;
use anyhow::{Context, Result, bail, ensure};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The GGUF tensor name for a Hugging Face tensor name.
pub(crate) fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, param) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{param}"))
}

/// A Hugging Face model directory: `config.json` and one or many `*.safetensors` files.
pub struct HfDir {
    pub dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    /// tensor name -> index into `files`
    index: HashMap<String, usize>,
}

impl HfDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read model directory {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        paths.sort();
        ensure!(
            !paths.is_empty(),
            "no *.safetensors files in {}",
            dir.display()
        );
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, path) in paths.into_iter().enumerate() {
            let file = std::fs::File::open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: read-only map of a weight file; see GgufFile::open.
            let mmap = unsafe { Mmap::map(&file) }?;
            let st = SafeTensors::deserialize(&mmap)
                .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
            for name in st.names() {
                index.insert(name.to_string(), i);
            }
            files.push((path, mmap));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            index,
        })
    }

    fn tensor_f32(&self, name: &str) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
        let Some(&i) = self.index.get(name) else {
            return Ok(None);
        };
        let (path, mmap) = &self.files[i];
        let st = SafeTensors::deserialize(mmap)?;
        let view = st
            .tensor(name)
            .with_context(|| format!("{name} in {}", path.display()))?;
        let values = view_f32(&view).with_context(|| format!("{name} in {}", path.display()))?;
        Ok(Some((values, view.shape().to_vec())))
    }
}

/// A safetensors tensor's values as f32 (F32, F16 and BF16 are read).
pub(crate) fn view_f32(view: &safetensors::tensor::TensorView<'_>) -> Result<Vec<f32>> {
    let bytes = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => bail!("dtype {other:?} is not supported (only F32, F16 and BF16)"),
    })
}

/// An opened checkpoint of either format.
pub enum WeightFile {
    Gguf(GgufFile),
    Hf(HfDir),
}

impl WeightFile {
    /// Opens a GGUF file or a Hugging Face directory and reads its hyper-parameters.
    pub fn open(path: &Path) -> Result<(Self, ModelConfig)> {
        if path.is_dir() {
            let cfg_path = path.join("config.json");
            let text = std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("{} has no readable config.json", path.display()))?;
            let cfg =
                ModelConfig::from_hf_json(&text).with_context(|| cfg_path.display().to_string())?;
            let mut cfg = cfg;
            let dir = HfDir::open(path)?;
            if !dir.index.contains_key("lm_head.weight") {
                cfg.tie_embeddings = true;
            }
            cfg.validate()
                .with_context(|| cfg_path.display().to_string())?;
            Ok((Self::Hf(dir), cfg))
        } else if path.is_file() {
            Self::from_gguf(GgufFile::open(path)?)
        } else {
            bail!(
                "model path {} does not exist (expected a .gguf file or a Hugging Face model directory)",
                path.display()
            )
        }
    }

    /// A parsed GGUF file and its validated hyper-parameters.
    pub fn from_gguf(g: GgufFile) -> Result<(Self, ModelConfig)> {
        let cfg = ModelConfig::from_gguf(&g)
            .and_then(|c| c.validate().map(|()| c))
            .with_context(|| g.path.display().to_string())?;
        Ok((Self::Gguf(g), cfg))
    }

    pub fn gguf(&self) -> Option<&GgufFile> {
        match self {
            Self::Gguf(g) => Some(g),
            Self::Hf(_) => None,
        }
    }

    pub fn contains(&self, hf_name: &str) -> bool {
        match self {
            Self::Gguf(g) => gguf_name(hf_name).is_some_and(|n| g.tensors.contains_key(&n)),
            Self::Hf(d) => d.index.contains_key(hf_name),
        }
    }

    /// A tensor as f32 values in Hugging Face layout (row-major, `[out, in]` for projections).
    pub fn f32(&self, hf_name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let found = match self {
            Self::Gguf(g) => match gguf_name(hf_name) {
                Some(n) if g.tensors.contains_key(&n) => Some(g.tensor_f32(&n)?),
                _ => None,
            },
            Self::Hf(d) => d.tensor_f32(hf_name)?,
        };
        found.with_context(|| format!("checkpoint has no tensor {hf_name}"))
    }

    /// The file's quantized blocks of a projection, when the file stores it quantized (Q5_0
    /// widened to Q8_0 when `widen`: [`QuantMatrix::new`]).
    pub(crate) fn quant_blocks(&self, hf_name: &str, widen: bool) -> Option<QuantMatrix> {
        let g = self.gguf()?;
        QuantMatrix::from_gguf(g, g.tensors.get(&gguf_name(hf_name)?)?, widen)
    }
}
