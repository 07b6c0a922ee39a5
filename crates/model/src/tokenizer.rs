//! Tokenizer: the `tokenizers` crate, loaded from `tokenizer.json` or built from GGUF metadata
//! (byte-level BPE: vocab, merges, control tokens as special tokens, the pre-tokenizer preset).

use super::gguf::{GgufFile, GgufValue};
use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use std::path::Path;

/// Split regex of Qwen2/Qwen2.5/Qwen3 (`pre = qwen2`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Split regex of Llama 3 (`pre = llama-bpe`): numbers in groups of up to three.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The same vocabulary with special tokens read as plain text (for untrusted text).
    plain: tokenizers::Tokenizer,
    /// The control tokens' texts (`<|im_start|>`, `<|endoftext|>`, …), longest first.
    specials: Vec<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub bos_id: Option<u32>,
    /// Ids that end a generation (the EOS token, plus end-of-turn tokens of the chat format).
    pub stop_ids: Vec<u32>,
    /// Whether the model expects a BOS token the chat template does not write itself.
    pub add_bos: bool,
}

impl Tokenizer {
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let model = g.get_str("tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" {
            bail!(
                "GGUF tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\"); pass a directory with tokenizer.json instead"
            );
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            g.get(key)
                .and_then(GgufValue::as_array)
                .with_context(|| format!("GGUF metadata {key} is missing"))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| anyhow!("{key} holds a non-string"))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<u64> = match g
            .get("tokenizer.ggml.token_type")
            .and_then(GgufValue::as_array)
        {
            Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            bail!(
                "GGUF metadata has {} tokens but {} token types",
                tokens.len(),
                types.len()
            );
        }
        let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let json = gguf_tokenizer_json(&tokens, &merges, &types, pre);
        let inner = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&json)?)
            .map_err(|e| anyhow!("building the tokenizer from GGUF metadata: {e}"))?;
        let token = |key: &str| {
            g.get_u64(key)
                .and_then(|id| tokens.get(id as usize).cloned())
        };
        let bos_token = token("tokenizer.ggml.bos_token_id");
        let eos_token = token("tokenizer.ggml.eos_token_id");
        let add_bos = g
            .get("tokenizer.ggml.add_bos_token")
            .is_some_and(|v| matches!(v, GgufValue::Bool(true)));
        Ok(Self::finish(inner, bos_token, eos_token, add_bos))
    }

    /// From a Hugging Face directory: `tokenizer.json` + `tokenizer_config.json` (special tokens).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("cannot load {}: {e}", path.display()))?;
        let config = read_tokenizer_config(dir)?;
        let token = |key: &str| match config.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_owned),
            _ => None,
        };
        let add_bos = config
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Self::finish(
            inner,
            token("bos_token"),
            token("eos_token"),
            add_bos,
        ))
    }

    fn finish(
        inner: tokenizers::Tokenizer,
        bos_token: Option<String>,
        eos_token: Option<String>,
        add_bos: bool,
    ) -> Self {
        let bos_id = bos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let mut stop_ids: Vec<u32> = eos_token
            .iter()
            .filter_map(|t| inner.token_to_id(t))
            .collect();
        // End-of-turn markers of the common chat formats also end a reply.
        for t in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>"] {
            if let Some(id) = inner.token_to_id(t)
                && !stop_ids.contains(&id)
            {
                stop_ids.push(id);
            }
        }
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        let mut specials: Vec<String> = inner
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special && !t.content.is_empty())
            .map(|t| t.content)
            .collect();
        specials.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        Self {
            inner,
            plain,
            specials,
            bos_token,
            eos_token,
            bos_id,
            stop_ids,
            add_bos: add_bos && bos_id.is_some(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`; special tokens written in the text are recognised as such.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids of a rendered chat prompt: adds BOS when the model wants one and the template did not.
    /// The placeholders of `quoted` (see [`Self::quote_specials`]) become their text, tokenized
    /// as plain text: only the template's own markup yields control tokens.
    pub fn encode_prompt(&self, text: &str, quoted: &QuotedSpecials) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for piece in quoted.split(text) {
            let (tokenizer, text) = match piece {
                Piece::Markup(t) => (&self.inner, t),
                Piece::Literal(t) => (&self.plain, t),
            };
            let enc = tokenizer
                .encode(text, false)
                .map_err(|e| anyhow!("tokenizing: {e}"))?;
            ids.extend_from_slice(enc.get_ids());
        }
        if let (true, Some(bos)) = (self.add_bos, self.bos_id)
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("decoding: {e}"))
    }

    /// Replaces every control token's text inside the strings of `v` (messages, tools: text a
    /// client sent) with a placeholder no client can guess, so that a typed `<|im_start|>`
    /// cannot forge a role boundary; [`Self::encode_prompt`] turns the placeholders back into
    /// that text, tokenized as text.
    pub(crate) fn quote_specials(&self, v: &Value, quoted: &mut QuotedSpecials) -> Value {
        match v {
            Value::String(s) => Value::String(self.quote_str(s, quoted)),
            Value::Array(a) => {
                Value::Array(a.iter().map(|x| self.quote_specials(x, quoted)).collect())
            }
            Value::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, x)| (k.clone(), self.quote_specials(x, quoted)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    fn quote_str(&self, s: &str, quoted: &mut QuotedSpecials) -> String {
        if !self.specials.iter().any(|t| s.contains(t.as_str())) {
            return s.to_string();
        }
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        'scan: while !rest.is_empty() {
            for t in &self.specials {
                if let Some(after) = rest.strip_prefix(t.as_str()) {
                    out.push_str(&quoted.placeholder(t));
                    rest = after;
                    continue 'scan;
                }
            }
            let c = rest.chars().next().expect("rest is not empty");
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
        out
    }
}

/// Control-token texts found in untrusted text, each replaced by `\u{E000}<nonce><n>\u{E001}`.
#[derive(Debug)]
pub struct QuotedSpecials {
    nonce: String,
    texts: Vec<String>,
}

/// A part of a rendered prompt: template markup (control tokens allowed) or quoted text.
enum Piece<'a> {
    Markup(&'a str),
    Literal(&'a str),
}

impl Default for QuotedSpecials {
    fn default() -> Self {
        Self::new()
    }
}

impl QuotedSpecials {
    pub fn new() -> Self {
        use rand::Rng;
        Self {
            nonce: format!("{:016x}", rand::rng().random::<u64>()),
            texts: Vec::new(),
        }
    }

    fn placeholder(&mut self, text: &str) -> String {
        self.texts.push(text.to_string());
        format!("\u{E000}{}{}\u{E001}", self.nonce, self.texts.len() - 1)
    }

    /// `text` cut at the placeholders: markup and literal pieces, in order.
    fn split<'a>(&'a self, text: &'a str) -> Vec<Piece<'a>> {
        if self.texts.is_empty() {
            return vec![Piece::Markup(text)];
        }
        let open = format!("\u{E000}{}", self.nonce);
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find(&open) {
            let after = &rest[at + open.len()..];
            let Some(end) = after.find('\u{E001}') else {
                break;
            };
            let Some(literal) = after[..end]
                .parse::<usize>()
                .ok()
                .and_then(|n| self.texts.get(n))
            else {
                break;
            };
            if at > 0 {
                pieces.push(Piece::Markup(&rest[..at]));
            }
            pieces.push(Piece::Literal(literal));
            rest = &after[end + '\u{E001}'.len_utf8()..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Markup(rest));
        }
        pieces
    }
}

pub(crate) fn read_tokenizer_config(dir: &Path) -> Result<Value> {
    let path = dir.join("tokenizer_config.json");
    if !path.exists() {
        return Ok(json!({}));
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// The `tokenizer.json` equivalent of a GGUF byte-level BPE vocabulary.
fn gguf_tokenizer_json(tokens: &[String], merges: &[String], types: &[u64], pre: &str) -> Value {
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    // Control (3) and user-defined (4) tokens are matched whole, before BPE.
    let added: Vec<Value> = types
        .iter()
        .enumerate()
        .filter(|(_, ty)| matches!(**ty, 3 | 4))
        .map(|(i, ty)| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": *ty == 3})
        })
        .collect();
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    let pre_tokenizer = match pre {
        "smollm" => {
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]})
        }
        "qwen2" => {
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]})
        }
        "llama-bpe" | "llama3" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]})
        }
        _ => {
            if pre != "default" && pre != "gpt2" {
                tracing::warn!(
                    pre,
                    "unknown GGUF pre-tokenizer preset; using GPT-2 byte-level splitting"
                );
            }
            byte_level(true)
        }
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    })
}
