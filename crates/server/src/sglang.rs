//! SGLang's native routes, the subset a control plane speaking SGLang calls (shapes from
//! SGLang's `managers/io_struct.py` and `entrypoints/http_server.py`): `POST /generate` with
//! `input_ids` (or `text`), `sampling_params`, `return_logprob`, `top_logprobs_num`,
//! `logprob_start_len`, `stream` and an adapter named in `lora_path`; `POST
//! /load_lora_adapter` and `/unload_lora_adapter`; `GET /get_model_info` and
//! `/get_server_info`. Nothing is captured here (`clawrl_core::completion`), as for vLLM's.

use crate::chat::{Fields, Sampling, sampling_fields};
use crate::completions::{
    MAX_SCORED_PROMPT, Sse, answer, api_error, change_adapter, prompt_ids, sse_stream,
};
use crate::http::{ApiError, Body, json_response};
use clawrl_core::Core;
use clawrl_core::chat::ChatError;
use clawrl_core::completion::{self, CompletionRequest, PromptLogprob};
use clawrl_core::engine::{EngineEvent, VersionChoice};
use clawrl_model::{FinishReason, Generation};
use hyper::{Response, StatusCode};
use serde_json::{Map, Value, json};
use std::sync::Arc;

/// What the reply carries besides the generation.
struct Asked {
    rid: String,
    logprobs: bool,
    top: usize,
    /// Prompt log-probs from this position on (`None`: SGLang's -1, none).
    prompt_from: Option<usize>,
}

/// `POST /generate`.
pub async fn generate(state: Arc<Core>, body: Value) -> Result<Response<Body>, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::invalid("The request body must be a JSON object."))?;
    let fields = Fields(obj);
    let given = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let prompt = match (given("input_ids"), given("text")) {
        (Some(ids), _) => prompt_ids(&state, Some(ids), "input_ids")?,
        (None, Some(text)) => prompt_ids(&state, Some(text), "text")?,
        (None, None) => {
            return Err(ApiError::invalid("`input_ids` or `text` is required.").param("input_ids"));
        }
    };
    let version = match obj.get("lora_path") {
        None | Some(Value::Null) => VersionChoice::Live,
        Some(Value::String(name)) => state
            .named_adapters
            .version(name)
            .map(VersionChoice::Exactly)
            .ok_or_else(|| not_loaded(name))?,
        Some(_) => {
            return Err(
                ApiError::invalid("`lora_path` must be an adapter's name.").param("lora_path")
            );
        }
    };
    let sampling = match obj.get("sampling_params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p.clone(),
        Some(_) => {
            return Err(
                ApiError::invalid("`sampling_params` must be an object.").param("sampling_params")
            );
        }
    };
    let Sampling {
        max_tokens,
        sampling,
        stop,
    } = sampling_fields(&openai_names(sampling), &state.config.generation)?;
    let top = match fields.int("top_logprobs_num")? {
        Some(n) if n > 20 => {
            return Err(
                ApiError::invalid("`top_logprobs_num` must be between 0 and 20.")
                    .param("top_logprobs_num"),
            );
        }
        n => n.unwrap_or(0) as usize,
    };
    let logprobs = fields.boolean("return_logprob")?;
    let prompt_from = match obj.get("logprob_start_len").and_then(Value::as_i64) {
        Some(n) if logprobs && n >= 0 => Some(n as usize),
        _ => None,
    };
    if let Some(from) = prompt_from {
        if from >= prompt.len() {
            return Err(ApiError::invalid(format!(
                "logprob_start_len ({from}) is higher than the number of input tokens ({}).",
                prompt.len()
            ))
            .param("logprob_start_len"));
        }
        if top > 0 && prompt.len() > MAX_SCORED_PROMPT {
            return Err(ApiError::invalid(format!(
                "Prompt log-probs with `top_logprobs_num` above 0 are limited to prompts of {MAX_SCORED_PROMPT} tokens (this one has {}).",
                prompt.len()
            ))
            .param("top_logprobs_num"));
        }
    }
    let asked = Asked {
        rid: match obj.get("rid").and_then(Value::as_str) {
            Some(rid) => rid.to_string(),
            None => clawrl_core::capture::random_id(""),
        },
        logprobs,
        top: if logprobs { top } else { 0 },
        prompt_from,
    };
    let request = CompletionRequest {
        prompt,
        version,
        max_tokens,
        sampling,
        stop,
        top_logprobs: asked.top,
        prompt_logprobs: prompt_from.map(|_| asked.top),
    };
    let whole = |asked: Asked, done: &completion::Completion| {
        asked.reply(
            &done.generation,
            &done.prompt_ids,
            done.cached_tokens,
            done.prompt_logprobs.as_deref(),
        )
    };
    let streamed = fields.boolean("stream")?;
    answer(&state, request, streamed, stream, whole, asked).await
}

/// SGLang's default stream: each event has everything so far (the text; here the ids and
/// log-probs come with the last one, when the engine reports them), then `[DONE]`.
fn stream(asked: Asked, mut started: completion::Started) -> Response<Body> {
    let prompt_logprobs = started.prompt_logprobs.take();
    let (mut text, mut prompt_tokens) = (String::new(), 0);
    sse_stream(started, move |event| match event {
        EngineEvent::Admitted { prompt_ids, .. } => {
            prompt_tokens = prompt_ids.len();
            Sse::Skip
        }
        EngineEvent::Text(piece) => {
            text.push_str(&piece);
            Sse::Send(json!({"text": text, "output_ids": [], "meta_info": {
                "id": asked.rid, "finish_reason": null, "prompt_tokens": prompt_tokens}}))
        }
        EngineEvent::Finished {
            generation,
            prompt_ids,
            cached_tokens,
            ..
        } => Sse::Last(asked.reply(
            &generation,
            &prompt_ids,
            cached_tokens,
            prompt_logprobs.as_deref(),
        )),
        EngineEvent::Failed(e) => Sse::Last(api_error(ChatError::Engine(e)).body()),
        _ => Sse::Skip,
    })
}

impl Asked {
    /// `{"text", "output_ids", "meta_info"}` with the log-probs asked for, each entry
    /// `[log-prob, token id, null]` (SGLang leaves the text out unless asked).
    fn reply(
        &self,
        g: &Generation,
        prompt_ids: &[u32],
        cached_tokens: usize,
        prompt_logprobs: Option<&[PromptLogprob]>,
    ) -> Value {
        let entry = |lp: Option<f32>, id: u32| json!([lp, id, null]);
        let finish = match g.finish {
            FinishReason::Length => json!({"type": "length", "length": g.ids.len()}),
            FinishReason::Stop | FinishReason::Cancelled => {
                json!({"type": "stop", "matched": null})
            }
        };
        let mut meta = json!({
            "id": self.rid, "finish_reason": finish, "prompt_tokens": prompt_ids.len(),
            "completion_tokens": g.ids.len(), "cached_tokens": cached_tokens,
        });
        if self.logprobs {
            let own: Vec<Value> = g
                .ids
                .iter()
                .zip(&g.logprobs)
                .map(|(&id, &lp)| entry(Some(lp), id))
                .collect();
            meta["output_token_logprobs"] = json!(own);
            if self.top > 0 {
                let top = g.top_logprobs.iter().map(|alts| {
                    alts.iter()
                        .map(|&(id, lp)| entry(Some(lp), id))
                        .collect::<Vec<_>>()
                });
                meta["output_top_logprobs"] = json!(top.collect::<Vec<_>>());
            }
        }
        if let (Some(from), Some(rows)) = (self.prompt_from, prompt_logprobs) {
            // Position 0 has no context: its log-prob is null; `rows` start at position 1.
            let positions = (from..prompt_ids.len()).map(|i| i.checked_sub(1).map(|r| &rows[r]));
            let own = positions
                .clone()
                .zip(&prompt_ids[from..])
                .map(|(row, &id)| entry(row.map(|r| r.logprob), id));
            meta["input_token_logprobs"] = json!(own.collect::<Vec<_>>());
            if self.top > 0 {
                let top = positions.map(|row| match row {
                    Some(r) => json!(
                        r.top
                            .iter()
                            .map(|&(id, lp)| entry(Some(lp), id))
                            .collect::<Vec<_>>()
                    ),
                    None => Value::Null,
                });
                meta["input_top_logprobs"] = json!(top.collect::<Vec<_>>());
            }
        }
        json!({"text": g.text, "output_ids": g.ids, "meta_info": meta})
    }
}

/// `sampling_params` under the names `sampling_fields` reads (SGLang's `max_new_tokens`).
fn openai_names(mut p: Map<String, Value>) -> Map<String, Value> {
    if let Some(n) = p.remove("max_new_tokens") {
        p.insert("max_tokens".into(), n);
    }
    p
}

fn not_loaded(name: &str) -> ApiError {
    ApiError::invalid(format!(
        "The following requested LoRA adapters are not loaded: {name}"
    ))
    .param("lora_path")
}

/// `POST /load_lora_adapter` / `/unload_lora_adapter`: SGLang's `{"success",
/// "error_message"}`, 400 when refused.
pub async fn adapter_route(state: Arc<Core>, body: Value, load: bool) -> Response<Body> {
    let (status, answer) = match change_adapter(state, &body, load).await {
        Ok(_) => (
            StatusCode::OK,
            json!({"success": true, "error_message": ""}),
        ),
        Err(e) => {
            let status = if e.status == StatusCode::SERVICE_UNAVAILABLE {
                e.status
            } else {
                StatusCode::BAD_REQUEST
            };
            (
                status,
                json!({"success": false, "error_message": e.message}),
            )
        }
    };
    json_response(status, &answer)
}

/// `GET /get_model_info`.
pub fn model_info(state: &Core) -> Response<Body> {
    let name = &state.config.model_id;
    json_response(
        StatusCode::OK,
        &json!({"model_path": name, "tokenizer_path": name, "is_generation": true,
                "preferred_sampling_params": null}),
    )
}

/// `GET /get_server_info`: what a client of SGLang reads from it (its version, runtime LoRA
/// on, streams with everything so far).
pub fn server_info() -> Response<Body> {
    json_response(
        StatusCode::OK,
        &json!({"version": format!("clawrl {}", env!("CARGO_PKG_VERSION")), "enable_lora": true,
                "incremental_streaming_output": false}),
    )
}
