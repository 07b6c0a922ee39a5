//! vLLM's raw-completion and runtime-LoRA routes, the subset a control plane in front of
//! replicas calls (shapes from vLLM's `entrypoints/openai/protocol.py`, vLLM ≥ 0.10.2):
//! `POST /v1/completions` with a token-id `prompt`, `return_token_ids`, `logprobs` (top-N),
//! `prompt_logprobs`, and an adapter named in `model`; `POST /v1/load_lora_adapter` and
//! `/v1/unload_lora_adapter`. Nothing is captured here (`clawrl_core::completion`).

use crate::chat::{Fields, Sampling, sampling_fields};
use crate::http::{ApiError, Body, full, json_response};
use bytes::Bytes;
use clawrl_core::Core;
use clawrl_core::chat::ChatError;
use clawrl_core::completion::{self, AdapterError, Completion, CompletionRequest, PromptLogprob};
use clawrl_core::engine::EngineError;
use clawrl_core::engine::EngineEvent;
use clawrl_core::store::now_ms;
use clawrl_model::FinishReason;
use clawrl_model::Generation;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Response, StatusCode, header};
use serde_json::{Map, Value, json};
use std::sync::Arc;
use tokio::sync::mpsc;

/// The longest prompt whose positions get alternatives in `prompt_logprobs`.
pub(crate) const MAX_SCORED_PROMPT: usize = 2048;

/// How the reply is written, besides what is generated.
struct Format {
    model: String,
    /// Tokens as `token_id:{id}` instead of their text (vLLM's `return_tokens_as_token_ids`).
    tokens_as_ids: bool,
    /// What names a token by its text (read once per request, not per token).
    tokenizer: Option<Arc<clawrl_model::tokenizer::Tokenizer>>,
    logprobs: bool,
    token_ids: bool,
    id: String,
    created: i64,
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
    if fields.boolean("echo")? {
        return Err(
            ApiError::invalid("`echo` is not supported on /v1/completions here.").param("echo"),
        );
    }
    let prompt = prompt_ids(&state, obj.get("prompt"), "prompt")?;
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
    let prompt_logprobs = top("prompt_logprobs")?;
    // Alternatives need the whole distribution at every prompt position (vocab × 4 bytes each).
    if prompt_logprobs.is_some_and(|n| n > 0) && prompt.len() > MAX_SCORED_PROMPT {
        return Err(ApiError::invalid(format!(
            "`prompt_logprobs` above 0 is limited to prompts of {MAX_SCORED_PROMPT} tokens (this one has {}); 0 gives each prompt token's own log-prob at any length.",
            prompt.len()
        ))
        .param("prompt_logprobs"));
    }
    let request = CompletionRequest {
        prompt,
        version,
        max_tokens,
        sampling,
        stop,
        top_logprobs: logprobs.unwrap_or(0),
        prompt_logprobs,
    };
    let format = Format {
        model,
        tokens_as_ids: fields.boolean("return_tokens_as_token_ids")?,
        tokenizer: state.engine.info().map(|i| i.tokenizer),
        logprobs: logprobs.is_some(),
        token_ids: fields.boolean("return_token_ids")?,
        id: format!("cmpl-{}", clawrl_core::capture::random_id("")),
        created: now_ms() / 1000,
    };
    let streamed = fields.boolean("stream")?;
    answer(
        &state,
        request,
        streamed,
        stream,
        |f, done| reply(&f, done),
        format,
    )
    .await
}

/// Runs a raw generation and answers it: as server-sent events through `streamed`, or whole
/// as the JSON `whole` writes; `how` is what both need of the request.
pub(crate) async fn answer<H>(
    state: &Core,
    request: CompletionRequest,
    stream: bool,
    streamed: impl FnOnce(H, completion::Started) -> Response<Body>,
    whole: impl FnOnce(H, &Completion) -> Value,
    how: H,
) -> Result<Response<Body>, ApiError> {
    if stream {
        let started = completion::start(state, request).await.map_err(api_error)?;
        return Ok(streamed(how, started));
    }
    let done = completion::complete(state, request)
        .await
        .map_err(api_error)?;
    Ok(json_response(StatusCode::OK, &whole(how, &done)))
}

type Chunk = Result<Frame<Bytes>, std::convert::Infallible>;

fn sse(v: &impl std::fmt::Display) -> Chunk {
    Ok(Frame::data(Bytes::from(format!("data: {v}\n\n"))))
}

/// Streams a completion as vLLM does: server-sent events, each a `text_completion` whose
/// choice has the new text (with `return_token_ids`: `prompt_token_ids` in the first event,
/// the new `token_ids` in each); the last has the finish reason, then `[DONE]`. Here the ids
/// and log-probs all come with the last event (the engine reports them when it finishes).
fn stream(f: Format, mut started: completion::Started) -> Response<Body> {
    let prompt_logprobs = started.prompt_logprobs.take();
    sse_stream(started, move |event| {
        let choice = match event {
            EngineEvent::Admitted { prompt_ids, .. } if f.token_ids => {
                json!({"index": 0, "text": "", "prompt_token_ids": prompt_ids, "token_ids": []})
            }
            EngineEvent::Text(piece) => {
                let mut choice =
                    json!({"index": 0, "text": piece, "logprobs": null, "finish_reason": null});
                if f.token_ids {
                    choice["token_ids"] = json!([]);
                }
                choice
            }
            EngineEvent::Finished { generation, .. } => {
                let mut choice = json!({
                    "index": 0, "text": "", "logprobs": f.logprobs(&generation),
                    "finish_reason": finish_reason(&generation), "stop_reason": null,
                    "prompt_logprobs": f.prompt_logprobs(prompt_logprobs.as_deref()),
                });
                if f.token_ids {
                    choice["token_ids"] = json!(generation.ids);
                }
                return Sse::Last(f.envelope(choice));
            }
            EngineEvent::Failed(e) => return Sse::Last(api_error(ChatError::Engine(e)).body()),
            _ => return Sse::Skip,
        };
        Sse::Send(f.envelope(choice))
    })
}

/// What a raw generation's engine event becomes on its event stream.
pub(crate) enum Sse {
    Send(Value),
    /// The last event before `[DONE]`.
    Last(Value),
    Skip,
}

/// Streams a raw generation as server-sent events, each engine event turned into one by
/// `event`, ending with `[DONE]` (vLLM's and SGLang's framing). A client that goes away
/// stops the generation.
pub(crate) fn sse_stream(
    mut started: completion::Started,
    mut event: impl FnMut(EngineEvent) -> Sse + Send + 'static,
) -> Response<Body> {
    let (out, body) = mpsc::channel::<Chunk>(64);
    tokio::spawn(async move {
        let delivered = loop {
            let Some(e) = started.events.recv().await else {
                break true;
            };
            match event(e) {
                Sse::Send(v) if out.send(sse(&v)).await.is_err() => break false,
                Sse::Send(_) | Sse::Skip => {}
                Sse::Last(v) => {
                    break out.send(sse(&v)).await.is_ok()
                        && out.send(sse(&"[DONE]")).await.is_ok();
                }
            }
        };
        if !delivered {
            started
                .cancel
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(body)).boxed())
        .expect("static response parts")
}

/// `prompt` (or SGLang's `input_ids` / `text`, named by `field`): token ids, or a text
/// tokenized as it is (no chat template, no special tokens added); a list of one of either.
/// Several prompts in one request are refused.
pub(crate) fn prompt_ids(
    state: &Core,
    prompt: Option<&Value>,
    field: &str,
) -> Result<Vec<u32>, ApiError> {
    let bad =
        |m: &str| ApiError::invalid(m.replace("`prompt`", &format!("`{field}`"))).param(field);
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
        Value::Array(items) if items.len() == 1 => {
            return prompt_ids(state, items.first(), field);
        }
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

impl Format {
    /// A token as the reply names it: its text, or `token_id:{id}`.
    fn token(&self, id: u32) -> String {
        if self.tokens_as_ids {
            return format!("token_id:{id}");
        }
        let text = self.tokenizer.as_ref().and_then(|t| t.decode(&[id]).ok());
        text.unwrap_or_default()
    }

    /// The choice's `logprobs` (null unless asked for).
    fn logprobs(&self, g: &Generation) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let tokens: Vec<String> = g.ids.iter().map(|&id| self.token(id)).collect();
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
            .map(|alts| {
                alts.iter()
                    .map(|&(id, lp)| (self.token(id), json!(lp)))
                    .collect()
            })
            .collect();
        json!({"text_offset": offsets, "token_logprobs": g.logprobs, "tokens": tokens, "top_logprobs": top})
    }

    /// `prompt_logprobs`: null for the first token, then per token a map id → log-prob entry.
    fn prompt_logprobs(&self, rows: Option<&[PromptLogprob]>) -> Value {
        let Some(rows) = rows else {
            return Value::Null;
        };
        let entry = |id: u32, logprob: f32, rank: Option<usize>| json!({"logprob": logprob, "rank": rank, "decoded_token": self.token(id)});
        let positions = rows.iter().map(|p| {
            let mut m = Map::new();
            m.insert(p.id.to_string(), entry(p.id, p.logprob, p.rank));
            for (i, &(id, lp)) in p.top.iter().enumerate() {
                m.entry(id.to_string())
                    .or_insert_with(|| entry(id, lp, Some(i + 1)));
            }
            Value::Object(m)
        });
        Value::Array(std::iter::once(Value::Null).chain(positions).collect())
    }

    /// A `text_completion` object around one choice.
    fn envelope(&self, choice: Value) -> Value {
        json!({"id": self.id, "object": "text_completion", "created": self.created,
               "model": self.model, "choices": [choice]})
    }
}

fn finish_reason(g: &Generation) -> &'static str {
    match g.finish {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

fn reply(f: &Format, done: &Completion) -> Value {
    let g = &done.generation;
    let mut choice = json!({
        "index": 0, "text": g.text, "logprobs": f.logprobs(g),
        "finish_reason": finish_reason(g), "stop_reason": null,
        "prompt_logprobs": f.prompt_logprobs(done.prompt_logprobs.as_deref()),
    });
    if f.token_ids {
        choice["prompt_token_ids"] = json!(done.prompt_ids);
        choice["token_ids"] = json!(g.ids);
    }
    let (prompt_tokens, completion_tokens) = (done.prompt_ids.len(), g.ids.len());
    let mut body = f.envelope(choice);
    body["usage"] = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens});
    body
}

pub(crate) fn api_error(e: ChatError) -> ApiError {
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
    let (name, verb) = change_adapter(state, &body, load).await?;
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(format!(
            "Success: LoRA adapter '{name}' {verb} successfully."
        )))
        .expect("static response parts"))
}

/// Loads (`load`) or unloads the adapter named by `lora_name` (from the PEFT folder
/// `lora_path`); returns the name and what was done ("added" or "removed").
pub(crate) async fn change_adapter(
    state: Arc<Core>,
    body: &Value,
    load: bool,
) -> Result<(String, &'static str), ApiError> {
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
        crate::http::off_thread(move || s.load_named_adapter(&n, &path))
            .await?
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
    Ok((name, verb))
}
