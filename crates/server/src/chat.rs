//! `POST /v1/chat/completions`: validation, then the core's chat flow (`clawrl_core::chat`), answered
//! as JSON or server-sent events in OpenAI's shapes.

use super::Core;
use super::http::{ApiError, Body, json_response};
use bytes::Bytes;
use clawrl_core::capture::TurnType;
use clawrl_core::chat::{self, ChatError, ChatRequest, InflightTurn, Reply, Step};
use clawrl_core::config::GenerationSection;
use clawrl_core::engine::EngineError;
use clawrl_core::store::now_ms;
use clawrl_core::telemetry::Counters;
use clawrl_model::messages::{Content, ToolCall, parse_messages};
use clawrl_model::{FinishReason, Generation, SamplingParams};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{HeaderMap, Response, StatusCode, header};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tokio::sync::mpsc;

/// How the client wants the reply (the HTTP face's part of a request).
pub struct Format {
    stream: bool,
    include_usage: bool,
    logprobs: bool,
}

fn truthy(v: Option<&str>) -> bool {
    matches!(
        v.map(|s| s.trim().to_ascii_lowercase()).as_deref(),
        Some("1" | "true" | "yes" | "on")
    )
}

/// Checks a chat completion body against OpenAI's API and this server's limits; `known_model`
/// refuses a `model` the server does not serve. Pure (no engine, no store): the fuzz target
/// `chat_request` drives it.
pub fn parse_request(
    body: &Value,
    headers: &HeaderMap,
    generation: &GenerationSection,
    known_model: impl Fn(&str) -> Result<(), ApiError>,
) -> Result<(ChatRequest, Format), ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::invalid("The request body must be a JSON object."))?;
    if let Some(model) = obj.get("model") {
        let m = model
            .as_str()
            .ok_or_else(|| ApiError::invalid("`model` must be a string.").param("model"))?;
        known_model(m).map_err(|e| e.param("model"))?;
    }
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            ApiError::invalid("`messages` is required and must be an array.").param("messages")
        })?;
    if messages.is_empty() {
        return Err(
            ApiError::invalid("`messages` must contain at least one message.").param("messages"),
        );
    }
    let messages =
        parse_messages(messages).map_err(|e| ApiError::invalid(e.message).param(&e.param))?;
    let fields = Fields(obj);
    let Sampling {
        max_tokens,
        sampling,
        stop,
    } = sampling_fields(obj, generation)?;
    let logprobs = fields.boolean("logprobs")?;
    let top_logprobs = fields.int("top_logprobs")?.unwrap_or(0) as usize;
    if top_logprobs > 20 {
        return Err(
            ApiError::invalid("`top_logprobs` must be between 0 and 20.").param("top_logprobs"),
        );
    }
    let tool_choice_none = obj.get("tool_choice").and_then(Value::as_str) == Some("none");
    let tools = match obj.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) if a.is_empty() || tool_choice_none => None,
        Some(t @ Value::Array(_)) => Some(t.clone()),
        Some(_) => return Err(ApiError::invalid("`tools` must be an array.").param("tools")),
    };
    let stream = fields.boolean("stream")?;
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);

    let session = session_fields(headers, obj);

    let request = ChatRequest {
        messages,
        tools,
        max_tokens,
        sampling,
        stop,
        top_logprobs: if logprobs { top_logprobs.max(1) } else { 0 },
        session_id: session.id,
        session_source: session.source,
        turn_type: session.turn_type,
        session_done: session.done,
    };
    let format = Format {
        stream,
        include_usage,
        logprobs,
    };
    Ok((request, format))
}

/// What every generating route reads the same way: `max_tokens` (or `max_completion_tokens`),
/// `temperature`, `top_p`, `top_k`, `n`, `stop` and `seed`.
pub(crate) struct Sampling {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
}

pub(crate) fn sampling_fields(
    obj: &serde_json::Map<String, Value>,
    g: &GenerationSection,
) -> Result<Sampling, ApiError> {
    let fields = Fields(obj);
    let max_tokens = match fields
        .int("max_completion_tokens")?
        .or(fields.int("max_tokens")?)
    {
        Some(0) => {
            return Err(ApiError::invalid("`max_tokens` must be at least 1.").param("max_tokens"));
        }
        Some(n) => n as usize,
        None => g.max_tokens,
    };
    let temperature = fields.num("temperature")?.unwrap_or(g.temperature as f64);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(format!(
            "`temperature` must be between 0 and 2, got {temperature}."
        ))
        .param("temperature"));
    }
    let top_p = fields.num("top_p")?.unwrap_or(g.top_p as f64);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(
            ApiError::invalid(format!("`top_p` must be in (0, 1], got {top_p}.")).param("top_p"),
        );
    }
    let top_k = match obj.get("top_k") {
        Some(Value::Number(n)) if n.as_i64() == Some(-1) => 0,
        _ => fields.int("top_k")?.map_or(g.top_k, |k| k as usize),
    };
    if let Some(n) = fields.int("n")?
        && n != 1
    {
        return Err(ApiError::invalid("Only `n = 1` is supported.").param("n"));
    }
    let stop = stop_sequences(obj)?;
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => None,
        // Any 64-bit integer, signed or not (OpenAI's clients send either).
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_i64().map(|i| i as u64))
                .ok_or_else(|| ApiError::invalid("`seed` must be an integer.").param("seed"))?,
        ),
    };
    Ok(Sampling {
        max_tokens,
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k,
            seed,
        },
        stop,
    })
}

/// A request body's optional fields, each checked for its type (absent or null: `None`).
pub(crate) struct Fields<'a>(pub &'a serde_json::Map<String, Value>);

impl Fields<'_> {
    pub fn num(&self, k: &str) -> Result<Option<f64>, ApiError> {
        match self.0.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| ApiError::invalid(format!("`{k}` must be a number.")).param(k)),
        }
    }

    pub fn int(&self, k: &str) -> Result<Option<u64>, ApiError> {
        match self.0.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                ApiError::invalid(format!("`{k}` must be a non-negative integer.")).param(k)
            }),
        }
    }

    pub fn boolean(&self, k: &str) -> Result<bool, ApiError> {
        match self.0.get(k) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(ApiError::invalid(format!("`{k}` must be a boolean.")).param(k)),
        }
    }
}

/// `stop`: a string or up to 16 of them.
fn stop_sequences(obj: &serde_json::Map<String, Value>) -> Result<Vec<String>, ApiError> {
    Ok(match obj.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) && a.len() <= 16 => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        Some(_) => {
            return Err(ApiError::invalid(
                "`stop` must be a string or a list of up to 16 strings.",
            )
            .param("stop"));
        }
    })
}

/// Which session a request belongs to and how to treat its turn.
struct SessionFields {
    id: Option<String>,
    source: &'static str,
    turn_type: TurnType,
    done: bool,
}

/// Session fields: headers first, then the body (these body fields never reach the model).
fn session_fields(headers: &HeaderMap, obj: &serde_json::Map<String, Value>) -> SessionFields {
    let header = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let body_str = |k: &str| {
        obj.get(k).and_then(|v| {
            v.as_str()
                .map(str::to_owned)
                .or_else(|| (!v.is_null()).then(|| v.to_string()))
        })
    };
    let (session_id, session_source) = match (header("x-session-id"), body_str("session_id")) {
        (Some(h), _) if !h.trim().is_empty() => (Some(h.trim().to_string()), "header"),
        (_, Some(b)) if !b.trim().is_empty() => (Some(b.trim().to_string()), "body"),
        _ => (None, "prefix"),
    };
    let turn_type = TurnType::parse(
        header("x-turn-type")
            .or_else(|| body_str("turn_type"))
            .as_deref(),
    );
    let session_done = truthy(header("x-session-done").as_deref())
        || obj
            .get("session_done")
            .is_some_and(|v| v.as_bool() == Some(true) || truthy(v.as_str()));
    SessionFields {
        id: session_id,
        source: session_source,
        turn_type,
        done: session_done,
    }
}

/// A chat error in OpenAI's shape, with the status `chat::status_of` gives it.
pub(crate) fn api_error(e: ChatError) -> ApiError {
    let status = StatusCode::from_u16(chat::status_of(&e)).expect("a valid status");
    let message = e.to_string();
    match e {
        ChatError::Overloaded => {
            let mut err = ApiError::new(status, "rate_limit_error", message).code("overloaded");
            err.retry_after_secs = Some(2);
            err
        }
        ChatError::Engine(EngineError::ContextTooLong { .. }) => ApiError::invalid(message)
            .param("messages")
            .code("context_length_exceeded"),
        ChatError::Engine(EngineError::BadRequest(_)) => ApiError::invalid(message),
        _ => ApiError::new(status, "server_error", message),
    }
}

pub async fn handle(
    state: Arc<Core>,
    headers: HeaderMap,
    body: Value,
) -> Result<Response<Body>, ApiError> {
    let (req, format) = parse_request(&body, &headers, &state.config.generation, |m| match state
        .serves_model(m)
    {
        true => Ok(()),
        false => Err(super::unknown_model(&state, m)),
    })?;
    let turn = chat::start(state.clone(), req).await.map_err(api_error)?;
    let call = Call {
        created: now_ms() / 1000,
        model: state.config.model_id.clone(),
        format,
        turn,
    };
    if call.format.stream {
        Ok(stream_reply(state, call))
    } else {
        json_reply(state, call).await
    }
}

/// One chat completion in flight, with what answering it in OpenAI's shapes needs.
struct Call {
    turn: InflightTurn,
    format: Format,
    created: i64,
    model: String,
}

impl Call {
    fn usage(&self, g: &Generation) -> Value {
        let (prompt, completion) = (self.turn.prompt_ids.len(), g.ids.len());
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": self.turn.cached_tokens},
        })
    }

    fn logprobs(&self, state: &Core, g: &Generation) -> Value {
        if self.format.logprobs {
            super::logprobs_json(state, g)
        } else {
            Value::Null
        }
    }

    /// `X-Session-Id` and `X-Turn-Index`: what `POST /v1/feedback` can name besides the id
    /// (a turn the store could not capture has neither).
    fn turn_headers(&self, headers: &mut HeaderMap) {
        if !self.turn.slot.recorded {
            return;
        }
        if let Ok(v) = header::HeaderValue::from_str(&self.turn.slot.session_id) {
            headers.insert("x-session-id", v);
        }
        headers.insert("x-turn-index", self.turn.slot.turn_index.into());
    }

    fn chunk(&self, delta: Value, finish: Option<&str>, logprobs: Value) -> Value {
        json!({"id": self.turn.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})
    }
}

async fn json_reply(state: Arc<Core>, mut call: Call) -> Result<Response<Body>, ApiError> {
    let (g, adapter_version) = loop {
        match call.turn.next().await {
            Step::Text(_) => {}
            Step::Done {
                generation,
                adapter_version,
            } => break (generation, adapter_version),
            Step::Failed(e) => return Err(api_error(e)),
        }
    };
    let reply = call.turn.reply(&g);
    call.turn.commit(&g, adapter_version, &reply).await;
    let mut message = reply.message();
    if message.content.is_none() && reply.tool_calls.is_empty() {
        message.content = Some(Content::Text(String::new()));
    }
    let body = json!({
        "id": call.turn.id, "object": "chat.completion", "created": call.created, "model": call.model,
        "choices": [{"index": 0, "message": message, "logprobs": call.logprobs(&state, &g), "finish_reason": reply.finish.as_str()}],
        "usage": call.usage(&g),
    });
    let mut response = json_response(StatusCode::OK, &body);
    call.turn_headers(response.headers_mut());
    Ok(response)
}

type Chunk = Result<Frame<Bytes>, std::convert::Infallible>;

fn sse(v: &Value) -> Chunk {
    Ok(Frame::data(Bytes::from(format!("data: {v}\n\n"))))
}

/// Streams the reply as server-sent events; generation stops when the client disconnects.
fn stream_reply(state: Arc<Core>, call: Call) -> Response<Body> {
    let (out, body_rx) = mpsc::channel::<Chunk>(64);
    let mut headers = HeaderMap::new();
    call.turn_headers(&mut headers);
    let client = Client {
        out,
        cancel: call.turn.cancel.clone(),
    };
    tokio::spawn(async move { stream_events(state, call, client).await });
    let stream = tokio_stream::wrappers::ReceiverStream::new(body_rx);
    let mut response = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(StreamBody::new(stream).boxed())
        .expect("static response parts");
    response.headers_mut().extend(headers);
    response
}

/// Where a stream's frames go.
struct Client {
    out: mpsc::Sender<Chunk>,
    cancel: Arc<std::sync::atomic::AtomicBool>,
}

impl Client {
    /// Sends a frame; `None` when the client went away (generation is then stopped).
    async fn send(&self, frame: Chunk) -> Option<()> {
        if self.out.send(frame).await.is_err() {
            self.cancel.store(true, Relaxed);
            return None;
        }
        Some(())
    }

    async fn delta(&self, call: &Call, delta: Value) -> Option<()> {
        self.send(sse(&call.chunk(delta, None, Value::Null))).await
    }
}

/// A streamed reply's frames: the role, the text as it comes (tool-call markup held back),
/// the rest, the tool calls, the finish (after the turn is committed), usage, `[DONE]`.
async fn stream_events(state: Arc<Core>, mut call: Call, client: Client) -> Option<()> {
    client
        .delta(&call, json!({"role": "assistant", "content": ""}))
        .await?;
    let tools = call.turn.req.tools.is_some();
    let (mut text, mut sent) = (String::new(), 0usize);
    let (g, adapter_version) = loop {
        match call.turn.next().await {
            Step::Text(piece) => {
                text.push_str(&piece);
                // With tools on, tool-call markup is held back and sent as `tool_calls`.
                let upto = if tools {
                    clawrl_core::tool_calls::streamable_len(&text)
                } else {
                    text.len()
                };
                if upto > sent {
                    let delta = text[sent..upto].to_string();
                    sent = upto;
                    client.delta(&call, json!({"content": delta})).await?;
                }
            }
            Step::Done {
                generation,
                adapter_version,
            } => break (generation, adapter_version),
            Step::Failed(e) => {
                Counters::add(&state.counters.request_errors, 1);
                let _ = client.send(sse(&api_error(e).body())).await;
                return None;
            }
        }
    };
    if g.finish == FinishReason::Cancelled {
        return None;
    }
    let reply: Reply = call.turn.reply(&g);
    // Content not streamed yet: with tools on, text outside the held-back tool-call blocks.
    let rest = if tools {
        let content = reply.content.clone().unwrap_or_default();
        content
            .strip_prefix(text[..sent].trim())
            .unwrap_or("")
            .to_string()
    } else {
        text[sent..].to_string()
    };
    if !rest.is_empty() {
        client.delta(&call, json!({"content": rest})).await?;
    }
    if !reply.tool_calls.is_empty() {
        let calls: Vec<ToolCall> = reply
            .tool_calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut c = c.clone();
                c.extra.insert("index".into(), json!(i));
                c
            })
            .collect();
        client.delta(&call, json!({"tool_calls": calls})).await?;
    }
    // Commit before the client sees the end of the reply.
    call.turn.commit(&g, adapter_version, &reply).await;
    let logprobs = call.logprobs(&state, &g);
    client
        .send(sse(&call.chunk(
            json!({}),
            Some(reply.finish.as_str()),
            logprobs,
        )))
        .await?;
    if call.format.include_usage {
        let usage = json!({"id": call.turn.id, "object": "chat.completion.chunk", "created": call.created, "model": call.model, "choices": [], "usage": call.usage(&g)});
        client.send(sse(&usage)).await?;
    }
    client
        .send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))))
        .await
}
