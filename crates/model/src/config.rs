//! Model hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`.
//!
//! The three supported families share one transformer; they differ only in the flags below
//! (biases on q/k/v, per-head QK RMSNorm), so a family is data, not a separate code path.

use super::gguf::GgufFile;
use anyhow::{Context, Result, bail};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama / SmolLM / Mistral-style: no biases.
    Llama,
    /// Qwen2 / Qwen2.5: biases on the q, k and v projections.
    Qwen2,
    /// Qwen3: no biases, RMSNorm on each head's q and k before RoPE.
    Qwen3,
}

impl Family {
    pub(crate) fn from_name(name: &str) -> Result<Self> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "llama" | "llamaforcausallm" | "mistral" | "mistralforcausallm" => Self::Llama,
            "qwen2" | "qwen2forcausallm" => Self::Qwen2,
            "qwen3" | "qwen3forcausallm" => Self::Qwen3,
            other => {
                bail!("unsupported model architecture {other:?} (supported: llama, qwen2, qwen3)")
            }
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }
    pub(crate) fn qk_norm(self) -> bool {
        self == Self::Qwen3
    }
}

/// How RoPE pairs up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Dimension i is rotated with i + head_dim/2 (Hugging Face "rotate_half"; GGUF qwen2/qwen3).
    Neox,
    /// Dimensions 2i and 2i+1 are rotated together (GGUF `llama`: its q/k rows are permuted for it).
    Interleaved,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rope_layout: RopeLayout,
    pub rms_norm_eps: f64,
    pub context_length: usize,
    pub tie_embeddings: bool,
}

impl ModelConfig {
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch = g.architecture()?.to_string();
        let family = Family::from_name(&arch)?;
        let key = |k: &str| format!("{arch}.{k}");
        let num_heads = g.require_u64(&key("attention.head_count"))? as usize;
        let hidden_size = g.require_u64(&key("embedding_length"))? as usize;
        let vocab_size = match g.get_u64(&key("vocab_size")) {
            Some(v) => v as usize,
            None => *g
                .tensors
                .get("token_embd.weight")
                .context("token_embd.weight is missing")?
                .shape()
                .first()
                .context("token_embd.weight has no dimensions")?,
        };
        Ok(Self {
            family,
            vocab_size,
            hidden_size,
            intermediate_size: g.require_u64(&key("feed_forward_length"))? as usize,
            num_layers: g.require_u64(&key("block_count"))? as usize,
            num_heads,
            num_kv_heads: g
                .get_u64(&key("attention.head_count_kv"))
                .unwrap_or(num_heads as u64) as usize,
            head_dim: g
                .get_u64(&key("attention.key_length"))
                .map(|v| v as usize)
                .unwrap_or(hidden_size / num_heads.max(1)),
            rope_theta: g.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0),
            // llama.cpp permutes q/k rows of `llama` checkpoints for the interleaved rotation.
            rope_layout: if family == Family::Llama {
                RopeLayout::Interleaved
            } else {
                RopeLayout::Neox
            },
            rms_norm_eps: g
                .get_f64(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-6),
            context_length: g.get_u64(&key("context_length")).unwrap_or(4096) as usize,
            tie_embeddings: !g.tensors.contains_key("output.weight"),
        })
    }

    pub(crate) fn from_hf_json(text: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Hf {
            #[serde(default)]
            architectures: Vec<String>,
            model_type: Option<String>,
            vocab_size: usize,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            head_dim: Option<usize>,
            rope_theta: Option<f64>,
            rms_norm_eps: Option<f64>,
            max_position_embeddings: Option<usize>,
            tie_word_embeddings: Option<bool>,
        }
        let hf: Hf =
            serde_json::from_str(text).context("config.json is not a valid model config")?;
        let arch = hf
            .model_type
            .clone()
            .or_else(|| hf.architectures.first().cloned())
            .context("config.json names no model_type")?;
        let family = Family::from_name(&arch)?;
        Ok(Self {
            family,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf
                .head_dim
                .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rope_layout: RopeLayout::Neox,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            context_length: hf.max_position_embeddings.unwrap_or(4096),
            tie_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        })
    }

    /// Rejects shapes the transformer cannot run, with the reason.
    pub fn validate(&self) -> Result<()> {
        // A corrupt file's sizes are refused here, before anything is allocated from them.
        for (what, n, max) in [
            ("vocabulary size", self.vocab_size, 1 << 22),
            ("hidden size", self.hidden_size, 1 << 16),
            ("intermediate size", self.intermediate_size, 1 << 18),
            ("layer count", self.num_layers, 1 << 10),
            ("attention head count", self.num_heads, 1 << 10),
            ("key/value head count", self.num_kv_heads, 1 << 10),
            ("head dimension", self.head_dim, 1 << 12),
            ("context length", self.context_length, 1 << 24),
        ] {
            if n == 0 || n > max {
                bail!("the checkpoint's {what} is {n}; expected 1 to {max}");
            }
        }
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            bail!(
                "{} attention heads are not a multiple of {} key/value heads",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("head dimension {} is odd; RoPE needs pairs", self.head_dim);
        }
        Ok(())
    }

    pub(crate) fn num_params(&self) -> usize {
        let attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads);
        let mlp = 3 * self.hidden_size * self.intermediate_size;
        let embed = self.vocab_size * self.hidden_size * if self.tie_embeddings { 1 } else { 2 };
        self.num_layers * (attn + mlp + 2 * self.hidden_size) + embed + self.hidden_size
    }
}
