//! The model layer: checkpoint formats, tokenizer and chat template, the transformer, its
//! kernels and KV cache, LoRA, sampling, generation and scoring, and the one place that
//! chooses the Burn device (`device`). Nothing here knows about HTTP, storage or the terminal.
//!
//! # Public API
//! - [`LoadedModel::load`] a GGUF file or Hugging Face folder ([`LoadOptions`]: device, dtype,
//!   weight mode, context cap, KV cache dtype); [`LoadedModel::chat_prompt`] renders typed
//!   [`messages::Message`]s into token ids; `generate` / `score` on it decode and teacher-force.
//! - [`messages`]: OpenAI chat messages, typed, and [`messages::parse_messages`] that checks a
//!   request's list; [`Transformer`], [`KvCache`], [`LoraAdapter`] and [`peft`] for the engine
//!   and the trainer; [`device`] chooses the Burn device; [`background`] the low-priority
//!   pools; [`kernels::Isa`] names the SIMD kernels in use (the bench prints it).
//! - Everything else (GGUF blocks, quantized products, attention internals) is `pub(crate)`.

pub mod background;
mod blocks;
pub mod chat_template;
pub mod config;
pub mod device;
pub mod failpoint;
pub mod generate;
pub mod gguf;
pub mod kernels;
pub mod kv_cache;
pub mod linear;
pub mod lora;
pub mod messages;
pub mod peft;
pub mod quant;
pub(crate) mod rope;
pub mod sampling;
pub mod scoring;
pub mod tokenizer;
pub mod transformer;
pub mod weights;

pub use config::{Family, ModelConfig};
pub use generate::{FinishReason, GenerateRequest, Generation};
pub use kv_cache::{KvCache, KvDtype};
pub use lora::{LoraAdapter, LoraConfig, Target};
pub use sampling::SamplingParams;
pub use transformer::{Transformer, WeightMode};

use anyhow::{Context, Result};
use burn::tensor::{DType, Device};
use chat_template::ChatTemplate;
use messages::Message;
use std::path::{Path, PathBuf};
use tokenizer::Tokenizer;
use weights::WeightFile;

/// ChatML, for checkpoints that ship no template of their own.
const FALLBACK_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    pub weights: WeightMode,
    /// Caps the context length below the model's own (0 = the model's); bounds KV memory.
    pub max_context: usize,
    /// What the KV cache stores keys and values in.
    pub kv_cache: KvDtype,
}

/// A ready-to-run model: weights, tokenizer and chat template.
pub struct LoadedModel {
    pub transformer: Transformer,
    pub tokenizer: std::sync::Arc<Tokenizer>,
    pub template: ChatTemplate,
    pub config: ModelConfig,
    pub path: PathBuf,
    pub name: String,
}

impl LoadedModel {
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let (file, mut config) = WeightFile::open(path)?;
        if opts.max_context > 0 {
            config.context_length = config.context_length.min(opts.max_context);
        }
        let ChatFormat {
            tokenizer,
            template,
            name,
        } = ChatFormat::read(&file, path, &config)?;
        let mut transformer = Transformer::load(
            &file,
            config.clone(),
            &opts.device,
            opts.dtype,
            opts.weights,
        )
        .with_context(|| format!("loading weights from {}", path.display()))?;
        transformer.kv_dtype = opts.kv_cache;
        Ok(Self {
            transformer,
            tokenizer: tokenizer.into(),
            template,
            config,
            path: path.to_path_buf(),
            name,
        })
    }

    /// Renders a chat and tokenizes it, generation prompt on.
    pub fn chat_prompt(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
    ) -> Result<Vec<u32>> {
        self.chat_prompt_continuing(messages, tools, "")
    }

    /// Like [`Self::chat_prompt`], with the reply already begun by `reply_prefix` (the judge's
    /// direct mode ends its prompt in `\boxed{`).
    pub fn chat_prompt_continuing(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        reply_prefix: &str,
    ) -> Result<Vec<u32>> {
        render_prompt(
            &self.tokenizer,
            &self.template,
            messages,
            tools,
            reply_prefix,
        )
    }

    /// One line describing the model, for humans.
    pub fn summary(&self) -> String {
        let c = &self.config;
        format!(
            "{} ({}): {} layers, hidden {}, {} heads / {} KV heads, context {}, vocab {}, {:.1} M parameters, {:?} on {:?}",
            self.name,
            c.family.name(),
            c.num_layers,
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.context_length,
            c.vocab_size,
            c.num_params() as f64 / 1e6,
            self.transformer.dtype(),
            self.transformer.device()
        )
    }
}

/// How a checkpoint turns chats into token ids: its tokenizer and chat template (and its name),
/// read without loading any weights.
pub struct ChatFormat {
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub name: String,
}

impl ChatFormat {
    pub fn read(file: &WeightFile, path: &Path, config: &ModelConfig) -> Result<Self> {
        let (tokenizer, template_src, name) = match file {
            WeightFile::Gguf(g) => {
                let tok = Tokenizer::from_gguf(g)
                    .with_context(|| format!("tokenizer of {}", path.display()))?;
                let tmpl = g.get_str("tokenizer.chat_template").map(str::to_owned);
                let name = g.get_str("general.name").map(str::to_owned);
                (tok, tmpl, name)
            }
            WeightFile::Hf(_) => {
                let tok = Tokenizer::from_hf_dir(path)?;
                (tok, hf_chat_template(path)?, None)
            }
        };
        let name = name.unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let template = ChatTemplate::new(
            template_src.as_deref().unwrap_or(FALLBACK_TEMPLATE),
            tokenizer.bos_token.as_deref(),
            tokenizer.eos_token.as_deref(),
        )?;
        anyhow::ensure!(
            tokenizer.vocab_size() <= config.vocab_size,
            "the tokenizer has {} tokens but the model only {} embeddings",
            tokenizer.vocab_size(),
            config.vocab_size
        );
        Ok(Self {
            tokenizer,
            template,
            name,
        })
    }
}

/// Renders a chat with `template` and tokenizes it, generation prompt on, the reply begun by
/// `reply_prefix` (what [`LoadedModel::chat_prompt_continuing`] does with the model's own).
pub fn render_prompt(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    messages: &[Message],
    tools: Option<&serde_json::Value>,
    reply_prefix: &str,
) -> Result<Vec<u32>> {
    // Client text is quoted so that control tokens typed in it stay text.
    let mut quoted = tokenizer::QuotedSpecials::new();
    let messages: Vec<serde_json::Value> = messages
        .iter()
        .map(|m| tokenizer.quote_specials(&m.template_value(), &mut quoted))
        .collect();
    let tools = tools.map(|t| tokenizer.quote_specials(t, &mut quoted));
    let mut text = template.render_values(&messages, tools.as_ref(), true)?;
    text.push_str(reply_prefix);
    tokenizer.encode_prompt(&text, &quoted)
}

/// The chat template of a Hugging Face directory (`tokenizer_config.json` or `chat_template.jinja`).
fn hf_chat_template(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return Ok(Some(std::fs::read_to_string(jinja)?));
    }
    let cfg = tokenizer::read_tokenizer_config(dir)?;
    Ok(match cfg.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or(named.first())
            .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
        _ => None,
    })
}
