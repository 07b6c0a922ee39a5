//! vLLM's raw-completion and runtime-LoRA routes, the subset a control plane in front of
//! replicas calls (shapes from vLLM's `entrypoints/openai/protocol.py`, vLLM ≥ 0.10.2):
//! `POST /v1/completions` with a token-id `prompt`, `return_token_ids`, `logprobs` (top-N),
//! `prompt_logprobs`, and an adapter named in `model`; `POST /v1/load_lora_adapter` and
//! `/v1/unload_lora_adapter`. Nothing is captured here (`clawrl_core::completion`).

use crate::chat::{Fields, Sampling, sampling_fields};
use crate::http::{ApiError, Body, full, json_response};
use clawrl_core::Core;
use clawrl_core::chat::ChatError;
use clawrl_core::completion::{self, AdapterError, Completion, CompletionRequest, PromptLogprob};
use clawrl_core::engine::EngineError;
use clawrl_core::store::now_ms;
use clawrl_model::FinishReason;
use hyper::{Response, StatusCode, header};
use serde_json::{Map, Value, json};
use std::sync::Arc;

/// How the reply is written, besides what is generated.
struct Format {
    model: String,
    /// Tokens as `token_id:{id}` instead of their text (vLLM's `return_tokens_as_token_ids`).
    tokens_as_ids: bool,
    logprobs: bool,
    token_ids: bool,
}

/// `POST /v1/completions`.
pub async fn handle(state: Arc<Core>, body: Value) -> Result<Response<Body>, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::invalid("The request body must be a JSON object."))?;
    let fields = Fields(obj);
    let model = match obj.get("model") {
        None | Some(Value::Null) => state.config.model_id.clone(),
        Some(Value::String(m)) => m.clone(),
        Some(_) => return Err(ApiError::invalid("`model` must be a string.").param("model")),
    };
    let version = state
        .version_for_model(&model)
        .ok_or_else(|| unknown_model(&state, &model))?;
    for unsupported in ["stream", "echo"] {
        if fields.boolean(unsupported)? {
            return Err(ApiError::invalid(format!(
                "`{unsupported}` is not supported on /v1/completions here (use /v1/chat/completions to stream)."
            ))
            .param(unsupported));
        }
    }
    let prompt = prompt_ids(&state, obj.get("prompt"))?;
    let Sampling {
        max_tokens,
        sampling,
        stop,
    } = sampling_fields(obj, &state.config.generation)?;
    let top = |k: &str| -> Result<Option<usize>, ApiError> {
        match fields.int(k)? {
            Some(n) if n > 20 => {
                Err(ApiError::invalid(format!("`{k}` must be between 0 and 20.")).param(k))
            }
            n => Ok(n.map(|n| n as usize)),
        }
    };
    let logprobs = top("logprobs")?;
    let request = CompletionRequest {
        prompt,
        version,
        max_tokens,
        sampling,
        stop,
        top_logprobs: logprobs.unwrap_or(0),
        prompt_logprobs: top("prompt_logprobs")?,
    };
    let format = Format {
        model,
        tokens_as_ids: fields.boolean("return_tokens_as_token_ids")?,
        logprobs: logprobs.is_some(),
        token_ids: fields.boolean("return_token_ids")?,
    };
    let done = completion::complete(&state, request)
        .await
        .map_err(api_error)?;
    Ok(json_response(
        StatusCode::OK,
        &reply(&state, &format, &done),
    ))
}

/// `prompt`: token ids, or a text tokenized as it is (no chat template, no special tokens
/// added); a list of one of either. Several prompts in one request are refused.
fn prompt_ids(state: &Core, prompt: Option<&Value>) -> Result<Vec<u32>, ApiError> {
    let bad = |m: &str| ApiError::invalid(m.to_string()).param("prompt");
    let prompt = prompt.ok_or_else(|| bad("`prompt` is required."))?;
    let ids = match prompt {
        Value::String(text) => {
            let info = state
                .engine
                .info()
                .ok_or_else(|| api_error(ChatError::Unavailable))?;
            info.tokenizer
                .encode(text)
                .map_err(|e| bad(&format!("`prompt` cannot be tokenized: {e}")))?
        }
        Value::Array(items) if items.iter().all(Value::is_number) => items
            .iter()
            .map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| bad("`prompt` token ids must be non-negative integers."))?,
        Value::Array(items) if items.len() == 1 => return prompt_ids(state, items.first()),
        Value::Array(_) => return Err(bad("One prompt per request: `prompt` holds several.")),
        _ => return Err(bad("`prompt` must be a string or an array of token ids.")),
    };
    if ids.is_empty() {
        return Err(bad("`prompt` must not be empty."));
    }
    let vocab = state
        .engine
        .model()
        .map_or(u32::MAX as usize, |m| m.config.vocab_size);
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(bad(&format!(
            "token id {id} is out of the vocabulary (size {vocab})."
        )));
    }
    Ok(ids)
}

fn reply(state: &Core, f: &Format, done: &Completion) -> Value {
    let g = &done.generation;
    let token = |id: u32| -> String {
        if f.tokens_as_ids {
            return format!("token_id:{id}");
        }
        let info = state.engine.info();
        info.and_then(|i| i.tokenizer.decode(&[id]).ok())
            .unwrap_or_default()
    };
    let logprobs = f.logprobs.then(|| {
        let tokens: Vec<String> = g.ids.iter().map(|&id| token(id)).collect();
        let offsets: Vec<usize> = tokens
            .iter()
            .scan(0, |at, t| {
                let start = *at;
                *at += t.len();
                Some(start)
            })
            .collect();
        let top: Vec<Map<String, Value>> = g
            .top_logprobs
            .iter()
            .map(|alts| alts.iter().map(|&(id, lp)| (token(id), json!(lp))).collect())
            .collect();
        json!({"text_offset": offsets, "token_logprobs": g.logprobs, "tokens": tokens, "top_logprobs": top})
    });
    let prompt_logprobs = done.prompt_logprobs.as_ref().map(|rows| {
        let entry = |id: u32, logprob: f32, rank: Option<usize>| {
            json!({"logprob": logprob, "rank": rank, "decoded_token": token(id)})
        };
        let positions = rows.iter().map(|p: &PromptLogprob| {
            let mut m = Map::new();
            m.insert(p.id.to_string(), entry(p.id, p.logprob, p.rank));
            for (i, &(id, lp)) in p.top.iter().enumerate() {
                m.entry(id.to_string()).or_insert_with(|| entry(id, lp, Some(i + 1)));
            }
            Value::Object(m)
        });
        std::iter::once(Value::Null).chain(positions).collect::<Vec<_>>()
    });
    let finish = match g.finish {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    };
    let mut choice = json!({
        "index": 0, "text": g.text, "logprobs": logprobs, "finish_reason": finish,
        "stop_reason": null, "prompt_logprobs": prompt_logprobs,
    });
    if f.token_ids {
        choice["prompt_token_ids"] = json!(done.prompt_ids);
        choice["token_ids"] = json!(g.ids);
    }
    let (prompt_tokens, completion_tokens) = (done.prompt_ids.len(), g.ids.len());
    json!({
        "id": format!("cmpl-{}", clawrl_core::capture::random_id("")),
        "object": "text_completion",
        "created": now_ms() / 1000,
        "model": f.model,
        "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    })
}

fn api_error(e: ChatError) -> ApiError {
    let message = e.to_string();
    match e {
        ChatError::Engine(EngineError::ContextTooLong { .. }) => ApiError::invalid(message)
            .param("prompt")
            .code("context_length_exceeded"),
        ChatError::Engine(EngineError::UnknownVersion(_)) => ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "The adapter named in `model` was unloaded meanwhile.",
        )
        .param("model"),
        e => crate::chat::api_error(e),
    }
}

fn unknown_model(state: &Core, model: &str) -> ApiError {
    let mut err = crate::unknown_model(state, model).param("model");
    let loaded = state.named_adapters.names();
    if !loaded.is_empty() {
        err.message += &format!(" Adapters loaded by name: {}.", loaded.join(", "));
    }
    err
}

/// `POST /v1/load_lora_adapter` `{"lora_name", "lora_path"}` and `POST
/// /v1/unload_lora_adapter` `{"lora_name"}`: vLLM's answers (a line of text on success).
pub async fn adapter_route(
    state: Arc<Core>,
    body: Value,
    load: bool,
) -> Result<Response<Body>, ApiError> {
    let field = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| ApiError::invalid(format!("`{k}` is required (a string).")).param(k))
    };
    let name = field("lora_name")?;
    if state.serves_model(&name) {
        return Err(ApiError::invalid(format!(
            "`lora_name` {name:?} is the served model's own name."
        ))
        .param("lora_name"));
    }
    let done = if load {
        let path = std::path::PathBuf::from(field("lora_path")?);
        let (s, n) = (state.clone(), name.clone());
        tokio::task::spawn_blocking(move || s.load_named_adapter(&n, &path))
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    e.to_string(),
                )
            })?
            .map(|()| "added")
    } else {
        state.unload_named_adapter(&name).map(|()| "removed")
    };
    let verb = done.map_err(|e| {
        let status = match e {
            AdapterError::NotFound(_) => StatusCode::NOT_FOUND,
            AdapterError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            AdapterError::AlreadyLoaded(_) | AdapterError::Unreadable { .. } => {
                StatusCode::BAD_REQUEST
            }
        };
        ApiError::new(status, "invalid_request_error", e.to_string()).param("lora_name")
    })?;
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(format!(
            "Success: LoRA adapter '{name}' {verb} successfully."
        )))
        .expect("static response parts"))
}
