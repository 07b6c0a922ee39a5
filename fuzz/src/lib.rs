//! The fuzz targets' bodies. Each takes the fuzzer's bytes, runs them through the real code
//! path, and says how far they got; any input must end in a value or an error, never a panic,
//! a hang or unbounded memory. `tests/fuzz_corpus.rs` (stable, part of `./test`) runs the kept
//! corpora and the inputs the fuzzers found through these same functions.

use burn::tensor::DType;
use clawrl_core::catalog::CATALOG;
use clawrl_core::config::{Config, GenerationSection};
use clawrl_model::device::{DeviceChoice, select};
use clawrl_model::gguf::GgufFile;
use clawrl_model::linear::QuantMatrix;
use clawrl_model::weights::WeightFile;
use clawrl_model::{ChatFormat, Transformer, WeightMode, render_prompt};
use clawrl_server::chat::parse_request;
use clawrl_server::http::parse_json;
use serde_json::Value;
use std::path::Path;
use std::sync::OnceLock;

/// How far an input got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reached {
    /// Refused by the first check (not JSON, not a GGUF, …).
    Refused,
    /// Parsed, then refused by a later check.
    Parsed,
    /// All the way: a prompt tokenized, a model built.
    End,
}

/// Every installed catalog model's chat format, read once from its real file
/// (`clawrl-tui fetch-model --all` installs them); at least one must be there.
pub fn chat_formats() -> &'static [ChatFormat] {
    static FORMATS: OnceLock<Vec<ChatFormat>> = OnceLock::new();
    FORMATS.get_or_init(|| {
        let data_dir = Config::load(None).expect("configuration").data_dir();
        let formats: Vec<ChatFormat> = CATALOG
            .iter()
            .map(|m| m.path(&data_dir))
            .filter(|p| p.is_file())
            .map(|path| {
                let (file, config) = WeightFile::open(&path).expect("an installed model opens");
                ChatFormat::read(&file, &path, &config).expect("its chat format reads")
            })
            .collect();
        assert!(
            !formats.is_empty(),
            "no catalog model in {}: run `clawrl-tui fetch-model --all` first",
            data_dir.display()
        );
        formats
    })
}

/// A chat completion body as a client sends it: JSON parsing, the checks of
/// `POST /v1/chat/completions`, then for a request that passes them the prompt the engine would
/// compute (special-token quoting, the default model's chat template, tokenization).
pub fn chat_request(data: &[u8]) -> Reached {
    let Ok(body) = parse_json(data) else {
        return Reached::Refused;
    };
    let generation = GenerationSection::default();
    let headers = hyper::HeaderMap::new();
    let Ok((request, _)) = parse_request(&body, &headers, &generation, |_| Ok(())) else {
        return Reached::Parsed;
    };
    let format = &chat_formats()[0];
    let tools = request.tools.as_ref();
    match render_prompt(
        &format.tokenizer,
        &format.template,
        &request.messages,
        tools,
        "",
    ) {
        Ok(ids) if !ids.is_empty() => Reached::End,
        _ => Reached::Parsed,
    }
}

/// The chat-template path with no request checks in front: any JSON object's `messages` and
/// `tools` (the shapes internal callers might pass), rendered and tokenized by every installed
/// model's real template.
pub fn chat_template(data: &[u8]) -> Reached {
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(data) else {
        return Reached::Refused;
    };
    let messages = match body.get("messages") {
        Some(Value::Array(m)) => m.clone(),
        Some(other) => vec![other.clone()],
        None => return Reached::Parsed,
    };
    // Messages the server would refuse never reach a template.
    let Ok(messages) = clawrl_model::messages::parse_messages(&messages) else {
        return Reached::Parsed;
    };
    let mut reached = Reached::Parsed;
    for format in chat_formats() {
        let tools = body.get("tools");
        if render_prompt(&format.tokenizer, &format.template, &messages, tools, "").is_ok() {
            reached = Reached::End;
        }
    }
    reached
}

/// A GGUF file as the loader reads it: header, metadata, tensor table, every tensor dequantized
/// and taken as quantized blocks, hyper-parameters, the tokenizer built from metadata and the
/// chat template compiled, then the transformer built from it on the CPU (dense and blocks).
pub fn gguf(data: &[u8]) -> Reached {
    let path = Path::new("fuzz.gguf");
    let Ok(g) = GgufFile::from_bytes(path, data.to_vec()) else {
        return Reached::Refused;
    };
    for info in g.tensors.values() {
        let _ = g.tensor_f32(&info.name);
        // As stored (blocks alone) and with Q5_0 widened to Q8_0 (dense + blocks).
        let _ = QuantMatrix::from_gguf(&g, info, false);
        let _ = QuantMatrix::from_gguf(&g, info, true);
    }
    let Ok((file, config)) = WeightFile::from_gguf(g) else {
        return Reached::Parsed;
    };
    if ChatFormat::read(&file, path, &config).is_err() {
        return Reached::Parsed;
    }
    let device = select(DeviceChoice::Cpu).expect("the CPU device");
    let mut reached = Reached::End;
    for mode in [WeightMode::Dense, WeightMode::Blocks] {
        if Transformer::load(&file, config.clone(), &device, DType::F32, mode).is_err() {
            reached = Reached::Parsed;
        }
    }
    reached
}

/// A Hugging Face checkpoint directory (a valid `config.json` beside the input as
/// `model.safetensors`) opened the way the loader opens one, every tensor read as f32.
pub fn safetensors(data: &[u8]) -> Reached {
    const CONFIG: &str = r#"{"model_type": "llama", "hidden_size": 8, "intermediate_size": 16,
      "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
      "vocab_size": 16, "max_position_embeddings": 64, "tie_word_embeddings": true}"#;
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join("config.json"), CONFIG).expect("write config.json");
    std::fs::write(dir.path().join("model.safetensors"), data).expect("write the checkpoint");
    let Ok((file, _)) = WeightFile::open(dir.path()) else {
        return Reached::Refused;
    };
    let st = safetensors::SafeTensors::deserialize(data).expect("WeightFile::open parsed it");
    let mut reached = Reached::End;
    for name in st.names() {
        if file.f32(name).is_err() {
            reached = Reached::Parsed;
        }
    }
    reached
}
