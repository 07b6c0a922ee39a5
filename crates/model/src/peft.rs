//! Adapters on disk in Hugging Face PEFT's layout (`adapter_config.json` +
//! `adapter_model.safetensors` with PEFT's tensor names), so that a version trained here loads
//! in PEFT, vLLM or llama.cpp's `convert_lora_to_gguf.py` as it is.
//!
//! Two conventions differ from ours: PEFT stores `lora_A.weight` as `[rank, in]` and
//! `lora_B.weight` as `[out, rank]` (we compute `x·A·B` with A `[in, rank]`), and GGUF `llama`
//! checkpoints keep q/k rows permuted for interleaved RoPE, so B's rows for q/k are put back in
//! Hugging Face order on save and permuted again on load.
//!
//! Writing is atomic: the files go to a temporary folder, are fsynced, and the folder is renamed
//! into place. The sha256 of the weights file is returned for the store; loading verifies it.

use super::config::{ModelConfig, RopeLayout};
use super::lora::{LoraAdapter, LoraConfig, Target, values};
use anyhow::{Context, Result, bail, ensure};
use burn::tensor::Device;
use safetensors::{Dtype, SafeTensors};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// PEFT's name for one of the two matrices of a pair (`A` or `B`).
pub fn tensor_name(layer: usize, target: Target, which: char) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{}.lora_{which}.weight",
        target.parent(),
        target.name()
    )
}

/// For q/k of a checkpoint with interleaved RoPE rows: our row index of each Hugging Face
/// row (llama.cpp's permutation: within a head, row `c·hd/2 + i` is stored at `2i + c`).
fn hf_to_ours(target: Target, model: &ModelConfig) -> Option<Vec<usize>> {
    let heads = match target {
        Target::QProj => model.num_heads,
        Target::KProj => model.num_kv_heads,
        _ => return None,
    };
    if model.rope_layout != RopeLayout::Interleaved {
        return None;
    }
    let hd = model.head_dim;
    let half = hd / 2;
    Some(
        (0..heads * hd)
            .map(|row| {
                let (h, j) = (row / hd, row % hd);
                let (c, i) = (j / half, j % half);
                h * hd + 2 * i + c
            })
            .collect(),
    )
}

/// Row-major `[rows, cols]` → `[cols, rows]`.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `adapter` into the folder `dir` (created; an existing one is replaced) atomically.
/// Returns the sha256 (hex) of the weights file.
pub fn save(
    adapter: &LoraAdapter,
    model: &ModelConfig,
    base_model: &str,
    dir: &Path,
) -> Result<String> {
    let cfg = &adapter.config;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (layer, target, pair) in adapter.pairs() {
        let (din, dout) = target.dims(model);
        let r = cfg.rank;
        // A [in, r] → lora_A [r, in].
        let a = transpose(&values(&pair.a.val()), din, r);
        // B [r, out] → lora_B [out, r], rows in Hugging Face order.
        let bt = transpose(&values(&pair.b.val()), r, dout);
        let b = match hf_to_ours(target, model) {
            Some(map) => map
                .iter()
                .flat_map(|&ours| bt[ours * r..(ours + 1) * r].iter().copied())
                .collect(),
            None => bt,
        };
        tensors.push((tensor_name(layer, target, 'A'), vec![r, din], f32_bytes(&a)));
        tensors.push((
            tensor_name(layer, target, 'B'),
            vec![dout, r],
            f32_bytes(&b),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            Ok((
                name.clone(),
                safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<_>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let weights = safetensors::serialize(views, Some(metadata))?;
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": 0.0,
        "target_modules": cfg.targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
    });
    write_atomically(
        dir,
        &[
            (CONFIG_FILE, serde_json::to_vec_pretty(&config)?.as_slice()),
            (WEIGHTS_FILE, weights.as_slice()),
        ],
    )?;
    Ok(hex(&Sha256::digest(&weights)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes files into a temporary sibling of `dir`, fsyncs them, and renames it to `dir`.
fn write_atomically(dir: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    let parent = dir.parent().context("an adapter folder needs a parent")?;
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let name = dir.file_name().context("an adapter folder needs a name")?;
    let tmp = parent.join(format!(".{}.tmp", name.to_string_lossy()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| -> Result<()> {
        std::fs::create_dir(&tmp)?;
        for (file, bytes) in files {
            let mut f = std::fs::File::create(tmp.join(file))?;
            crate::failpoint::crash("adapter.write");
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::rename(&tmp, dir)?;
        std::fs::File::open(parent)?.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        let full = e
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(28));
        if full {
            bail!(
                "cannot write the adapter to {}: the disk is full",
                dir.display()
            );
        }
        return Err(e).with_context(|| format!("cannot write the adapter to {}", dir.display()));
    }
    Ok(())
}

/// Reads the adapter in `dir` for a model of shape `model`. With `sha256`, the weights file must
/// have that checksum (a corrupt or replaced file is refused, never served).
pub fn load(
    dir: &Path,
    model: &ModelConfig,
    device: &Device,
    sha256: Option<&str>,
) -> Result<LoraAdapter> {
    let read = |f: &str| {
        std::fs::read(dir.join(f)).with_context(|| format!("cannot read {}", dir.join(f).display()))
    };
    let weights = read(WEIGHTS_FILE)?;
    if let Some(want) = sha256 {
        let got = hex(&Sha256::digest(&weights));
        ensure!(
            got == want,
            "{} is corrupt: its sha256 is {got}, the store recorded {want}",
            dir.join(WEIGHTS_FILE).display()
        );
    }
    let config: Value = serde_json::from_slice(&read(CONFIG_FILE)?)
        .with_context(|| format!("{} is not valid JSON", dir.join(CONFIG_FILE).display()))?;
    let lora =
        parse_config(&config).with_context(|| dir.join(CONFIG_FILE).display().to_string())?;
    let st = SafeTensors::deserialize(&weights).with_context(|| {
        format!(
            "{} is not a valid safetensors file",
            dir.join(WEIGHTS_FILE).display()
        )
    })?;
    let tensor =
        |layer: usize, target: Target, which: char, shape: [usize; 2]| -> Result<Vec<f32>> {
            let name = tensor_name(layer, target, which);
            let view = st.tensor(&name).with_context(|| {
                format!("{} has no tensor {name}", dir.join(WEIGHTS_FILE).display())
            })?;
            ensure!(
                view.shape() == shape,
                "{name} has shape {:?}, this model needs {shape:?}",
                view.shape()
            );
            let v = super::weights::view_f32(&view).with_context(|| name.clone())?;
            ensure!(
                v.iter().all(|x| x.is_finite()),
                "{name} holds NaN or infinite values"
            );
            Ok(v)
        };
    let ours_from_hf = |target| hf_to_ours(target, model);
    LoraAdapter::build(
        model,
        lora,
        |layer, target, din, dout, r| {
            let a = transpose(&tensor(layer, target, 'A', [r, din])?, r, din);
            let b_hf = tensor(layer, target, 'B', [dout, r])?;
            let b_rows = match ours_from_hf(target) {
                Some(map) => {
                    let mut rows = vec![0f32; b_hf.len()];
                    for (hf, &ours) in map.iter().enumerate() {
                        rows[ours * r..(ours + 1) * r].copy_from_slice(&b_hf[hf * r..(hf + 1) * r]);
                    }
                    rows
                }
                None => b_hf,
            };
            Ok((a, transpose(&b_rows, dout, r)))
        },
        device,
    )
}

/// The LoRA settings of a PEFT `adapter_config.json` (the variants we cannot compute are refused).
fn parse_config(c: &Value) -> Result<LoraConfig> {
    if let Some(t) = c.get("peft_type").and_then(Value::as_str) {
        ensure!(
            t == "LORA",
            "peft_type is {t:?}; only LORA adapters are supported"
        );
    }
    for flag in ["use_rslora", "use_dora"] {
        ensure!(
            c.get(flag).and_then(Value::as_bool) != Some(true),
            "{flag} adapters are not supported"
        );
    }
    let rank = c.get("r").and_then(Value::as_u64).context("no rank `r`")? as usize;
    let alpha = c
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .context("no `lora_alpha`")?;
    let names: Vec<&str> = match c.get("target_modules") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        Some(Value::String(s)) => bail!("target_modules as a regex ({s:?}) is not supported"),
        _ => bail!("no `target_modules`"),
    };
    let targets = names
        .iter()
        .map(|n| Target::from_name(n).with_context(|| format!("unknown target module {n:?}")))
        .collect::<Result<Vec<_>>>()?;
    let cfg = LoraConfig {
        rank,
        alpha,
        targets,
    };
    cfg.validate()?;
    Ok(cfg)
}
