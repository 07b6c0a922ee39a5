//! `POST /v1/chat/completions`: validation, capture, the engine job, and the reply (JSON or
//! server-sent events).

use super::AppState;
use super::http::{ApiError, Body, blocking, json_response};
use super::tool_calls;
use crate::capture::{TurnSlot, TurnType, random_id};
use crate::engine::{EngineError, EngineEvent, Job, Priority, Prompt, SubmitError, Task, Version};
use crate::events::{Event, Finish, emit};
use crate::model::{FinishReason, Generation, SamplingParams};
use crate::store::{NewTurn, now_ms};
use crate::telemetry::Counters;
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{HeaderMap, Response, StatusCode, header};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use tokio::sync::mpsc;

/// The validated request.
struct ChatRequest {
    messages: Vec<Value>,
    tools: Option<Value>,
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
    top_logprobs: usize,
    session_id: Option<String>,
    session_source: &'static str,
    turn_type: TurnType,
    session_done: bool,
}

fn truthy(v: Option<&str>) -> bool {
    matches!(
        v.map(|s| s.trim().to_ascii_lowercase()).as_deref(),
        Some("1" | "true" | "yes" | "on")
    )
}

fn parse_request(
    body: &Value,
    headers: &HeaderMap,
    state: &AppState,
) -> Result<ChatRequest, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::invalid("The request body must be a JSON object."))?;
    if let Some(model) = obj.get("model") {
        let m = model
            .as_str()
            .ok_or_else(|| ApiError::invalid("`model` must be a string.").param("model"))?;
        if !state.serves_model(m) {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "The model `{m}` does not exist. This server serves `{}`.",
                    state.config.model_id
                ),
            )
            .param("model")
            .code("model_not_found"));
        }
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
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str);
        match role {
            Some("system" | "developer" | "user" | "assistant" | "tool") => {}
            Some(r) => return Err(ApiError::invalid(format!(
                "messages[{i}].role `{r}` is not one of system, developer, user, assistant, tool."
            ))
            .param(&format!("messages[{i}].role"))),
            None => {
                return Err(ApiError::invalid(format!("messages[{i}] has no `role`."))
                    .param(&format!("messages[{i}].role")));
            }
        }
        match m.get("content") {
            None | Some(Value::Null) if role == Some("assistant") => {}
            Some(Value::String(_)) => {}
            Some(Value::Array(parts))
                if parts.iter().all(|p| {
                    p.get("type")
                        .and_then(Value::as_str)
                        .is_none_or(|t| t == "text")
                }) => {}
            Some(Value::Array(_)) => {
                return Err(ApiError::invalid(format!(
                    "messages[{i}].content: only text parts are supported."
                ))
                .param(&format!("messages[{i}].content")));
            }
            _ => {
                return Err(ApiError::invalid(format!(
                    "messages[{i}].content must be a string or a list of text parts."
                ))
                .param(&format!("messages[{i}].content")));
            }
        }
    }
    let num = |k: &str| -> Result<Option<f64>, ApiError> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| ApiError::invalid(format!("`{k}` must be a number.")).param(k)),
        }
    };
    let int = |k: &str| -> Result<Option<u64>, ApiError> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                ApiError::invalid(format!("`{k}` must be a non-negative integer.")).param(k)
            }),
        }
    };
    let boolean = |k: &str| -> Result<bool, ApiError> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(ApiError::invalid(format!("`{k}` must be a boolean.")).param(k)),
        }
    };
    let g = &state.config.generation;
    let max_tokens = match int("max_completion_tokens")?.or(int("max_tokens")?) {
        Some(0) => {
            return Err(ApiError::invalid("`max_tokens` must be at least 1.").param("max_tokens"));
        }
        Some(n) => n as usize,
        None => g.max_tokens,
    };
    let temperature = num("temperature")?.unwrap_or(g.temperature as f64);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(format!(
            "`temperature` must be between 0 and 2, got {temperature}."
        ))
        .param("temperature"));
    }
    let top_p = num("top_p")?.unwrap_or(g.top_p as f64);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(
            ApiError::invalid(format!("`top_p` must be in (0, 1], got {top_p}.")).param("top_p"),
        );
    }
    let top_k = match obj.get("top_k") {
        Some(Value::Number(n)) if n.as_i64() == Some(-1) => 0,
        _ => int("top_k")?.map_or(g.top_k, |k| k as usize),
    };
    if let Some(n) = int("n")?
        && n != 1
    {
        return Err(ApiError::invalid("Only `n = 1` is supported.").param("n"));
    }
    let stop = match obj.get("stop") {
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
    };
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .ok_or_else(|| ApiError::invalid("`seed` must be an integer.").param("seed"))?
                as u64,
        ),
    };
    let logprobs = boolean("logprobs")?;
    let top_logprobs = int("top_logprobs")?.unwrap_or(0) as usize;
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
    let stream = boolean("stream")?;
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);

    // Session fields: headers first, then the body (these body fields never reach the model).
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

    Ok(ChatRequest {
        messages: messages.clone(),
        tools,
        max_tokens,
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k,
            seed,
        },
        stop,
        stream,
        include_usage,
        logprobs,
        top_logprobs: if logprobs { top_logprobs.max(1) } else { 0 },
        session_id,
        session_source,
        turn_type,
        session_done,
    })
}

fn engine_error(e: EngineError) -> ApiError {
    match e {
        EngineError::ContextTooLong { .. } => ApiError::invalid(e.to_string())
            .param("messages")
            .code("context_length_exceeded"),
        EngineError::BadRequest(m) => ApiError::invalid(m),
        EngineError::UnknownVersion(_) | EngineError::Internal(_) => {
            let m = e.to_string();
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", m)
        }
    }
}

pub async fn handle(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: Value,
) -> Result<Response<Body>, ApiError> {
    let req = parse_request(&body, &headers, &state)?;
    let capture = state.capture.clone();
    let (sid, src, tt, done, msgs) = (
        req.session_id.clone(),
        req.session_source,
        req.turn_type,
        req.session_done,
        req.messages.clone(),
    );
    let slot = blocking("Could not record the conversation", move || {
        capture.begin(sid, src, tt, done, &msgs)
    })
    .await?;

    let (job, mut rx) = Job::new(
        Prompt::chat(req.messages.clone(), req.tools.clone()),
        Task::Generate {
            max_tokens: req.max_tokens,
            sampling: req.sampling,
            stop: req.stop.clone(),
            top_logprobs: req.top_logprobs,
        },
        Version::Live,
        Priority::User,
    );
    let cancel = job.cancel.clone();
    state.engine.submit(job).map_err(|e| match e {
        SubmitError::Overloaded => {
            let mut err = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "The server is busy: too many requests are waiting. Retry shortly.",
            )
            .code("overloaded");
            err.retry_after_secs = Some(2);
            err
        }
        SubmitError::Unavailable => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "The model is not loaded yet (or failed to load); see GET /health.",
        ),
    })?;
    // The prompt is computed before the reply starts, so prompt errors get a proper status.
    let (prompt_ids, cached_tokens) = match rx.recv().await {
        Some(EngineEvent::Admitted {
            prompt_ids,
            cached_tokens,
        }) => (prompt_ids, cached_tokens),
        Some(EngineEvent::Failed(e)) => return Err(engine_error(e)),
        _ => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "The engine stopped.",
            ));
        }
    };
    let id = format!("chatcmpl-{}", random_id(""));
    let call = Call {
        lifecycle: Lifecycle::new(state.bus.clone(), id.clone()),
        id,
        created: now_ms() / 1000,
        model: state.config.model_id.clone(),
        req,
        slot,
        prompt_ids,
        cached_tokens,
        cancel,
    };
    emit(
        &state.bus,
        Event::RequestStarted {
            request_id: call.id.clone(),
            session_id: call.slot.session_id.clone(),
            turn_index: call.slot.turn_index,
            prompt_tokens: call.prompt_ids.len(),
            cached_tokens,
        },
    );
    if call.req.stream {
        Ok(stream_reply(state, call, rx))
    } else {
        json_reply(state, call, rx).await
    }
}

/// Publishes a started request's progress on the bus and guarantees it exactly one final
/// event: finished, failed, or, when dropped without either (the client went away, the
/// connection was closed), cancelled.
struct Lifecycle {
    bus: crate::events::EventBus,
    request_id: String,
    ended: std::sync::atomic::AtomicBool,
}

impl Lifecycle {
    fn new(bus: crate::events::EventBus, request_id: String) -> Self {
        Self {
            bus,
            request_id,
            ended: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn text(&self, text: &str) {
        emit(
            &self.bus,
            Event::RequestText {
                request_id: self.request_id.clone(),
                text: text.to_string(),
            },
        );
    }

    /// Emits `event` as the final one, unless one was emitted already.
    fn end(&self, event: Event) {
        if !self.ended.swap(true, Relaxed) {
            emit(&self.bus, event);
        }
    }

    fn failed(&self, e: &ApiError) {
        self.end(Event::RequestFailed {
            request_id: self.request_id.clone(),
            status: e.status.as_u16(),
            message: e.message.clone(),
        });
    }
}

impl Drop for Lifecycle {
    fn drop(&mut self) {
        self.end(Event::RequestCancelled {
            request_id: self.request_id.clone(),
        });
    }
}

/// One chat completion in flight.
struct Call {
    lifecycle: Lifecycle,
    id: String,
    created: i64,
    model: String,
    req: ChatRequest,
    slot: TurnSlot,
    prompt_ids: Vec<u32>,
    cached_tokens: usize,
    cancel: Arc<AtomicBool>,
}

/// The finished reply in OpenAI terms.
struct Reply {
    content: Option<String>,
    tool_calls: Vec<Value>,
    finish_reason: Finish,
    usage: Value,
    logprobs: Value,
}

impl Call {
    fn reply(&self, state: &AppState, g: &Generation) -> Reply {
        let parsed = if self.req.tools.is_some() {
            {
                let names: Vec<&str> = self
                    .req
                    .tools
                    .iter()
                    .flat_map(|t| t.as_array().into_iter().flatten())
                    .filter_map(|t| t["function"]["name"].as_str())
                    .collect();
                tool_calls::parse(&g.text, &names, &mut || random_id("call_"))
            }
        } else {
            tool_calls::Parsed {
                content: Some(g.text.clone()),
                tool_calls: Vec::new(),
            }
        };
        let finish_reason = if !parsed.tool_calls.is_empty() {
            Finish::ToolCalls
        } else if g.finish == FinishReason::Length {
            Finish::Length
        } else {
            Finish::Stop
        };
        let completion = g.ids.len();
        let usage = json!({
            "prompt_tokens": self.prompt_ids.len(),
            "completion_tokens": completion,
            "total_tokens": self.prompt_ids.len() + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        });
        let logprobs = if self.req.logprobs {
            state.logprobs_json(g)
        } else {
            Value::Null
        };
        Reply {
            content: parsed.content,
            tool_calls: parsed.tool_calls,
            finish_reason,
            usage,
            logprobs,
        }
    }

    fn assistant_message(r: &Reply) -> Value {
        let mut m = json!({"role": "assistant", "content": r.content});
        if !r.tool_calls.is_empty() {
            m["tool_calls"] = Value::Array(r.tool_calls.clone());
        }
        m
    }

    /// Commits the turn to the store (before the client sees the end of the reply).
    async fn commit(
        &self,
        state: &Arc<AppState>,
        g: &Generation,
        adapter_version: i64,
        reply: &Reply,
    ) -> Result<(), ApiError> {
        let s = &self.req.sampling;
        let turn = NewTurn {
            session_id: self.slot.session_id.clone(),
            turn_index: self.slot.turn_index,
            turn_type: self.slot.turn_type.as_str().into(),
            response_id: self.id.clone(),
            request_messages: Value::Array(self.req.messages.clone()),
            tools: self.req.tools.clone(),
            prompt_ids: self.prompt_ids.clone(),
            response_ids: g.ids.clone(),
            logprobs: g.logprobs.clone(),
            response_text: g.text.clone(),
            tool_calls: (!reply.tool_calls.is_empty())
                .then(|| Value::Array(reply.tool_calls.clone())),
            reply_message: Self::assistant_message(reply),
            finish_reason: reply.finish_reason.as_str().into(),
            adapter_version,
            sampling: json!({"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "seed": s.seed, "max_tokens": self.req.max_tokens}),
            cached_tokens: self.cached_tokens,
            created_at: self.slot.created_at,
            completed_at: now_ms(),
        };
        let (capture, slot) = (state.capture.clone(), self.slot.clone());
        blocking("Could not record the turn", move || {
            capture.commit(&slot, turn)
        })
        .await
        .inspect_err(|e| self.lifecycle.failed(e))?;
        self.lifecycle.end(Event::RequestFinished {
            request_id: self.id.clone(),
            completion_tokens: g.ids.len(),
            finish_reason: reply.finish_reason,
            adapter_version,
        });
        Ok(())
    }

    /// `X-Session-Id` and `X-Turn-Index`: what `POST /v1/feedback` can name besides the id.
    fn turn_headers(&self, headers: &mut HeaderMap) {
        if let Ok(v) = header::HeaderValue::from_str(&self.slot.session_id) {
            headers.insert("x-session-id", v);
        }
        headers.insert("x-turn-index", self.slot.turn_index.into());
    }

    fn chunk(&self, delta: Value, finish: Option<&str>, logprobs: Value) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})
    }
}

async fn json_reply(
    state: Arc<AppState>,
    call: Call,
    mut rx: mpsc::UnboundedReceiver<EngineEvent>,
) -> Result<Response<Body>, ApiError> {
    let (g, adapter_version) = loop {
        match rx.recv().await {
            Some(EngineEvent::Text(piece)) => call.lifecycle.text(&piece),
            Some(EngineEvent::Finished {
                generation,
                adapter_version,
                ..
            }) => break (generation, adapter_version),
            Some(EngineEvent::Failed(e)) => {
                let e = engine_error(e);
                call.lifecycle.failed(&e);
                return Err(e);
            }
            Some(_) => {}
            None => {
                let e = ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "The engine stopped.",
                );
                call.lifecycle.failed(&e);
                return Err(e);
            }
        }
    };
    let reply = call.reply(&state, &g);
    call.commit(&state, &g, adapter_version, &reply).await?;
    let mut message = Call::assistant_message(&reply);
    if message["content"].is_null() && reply.tool_calls.is_empty() {
        message["content"] = json!("");
    }
    let body = json!({
        "id": call.id, "object": "chat.completion", "created": call.created, "model": call.model,
        "choices": [{"index": 0, "message": message, "logprobs": reply.logprobs, "finish_reason": reply.finish_reason.as_str()}],
        "usage": reply.usage,
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
fn stream_reply(
    state: Arc<AppState>,
    call: Call,
    mut rx: mpsc::UnboundedReceiver<EngineEvent>,
) -> Response<Body> {
    let (out, body_rx) = mpsc::channel::<Chunk>(64);
    let mut headers = HeaderMap::new();
    call.turn_headers(&mut headers);
    tokio::spawn(async move {
        // Sends a frame; a closed channel means the client went away: stop generating.
        let send = |frame: Chunk| {
            let out = out.clone();
            let cancel = call.cancel.clone();
            async move {
                if out.send(frame).await.is_err() {
                    cancel.store(true, Relaxed);
                    return false;
                }
                true
            }
        };
        if !send(sse(&call.chunk(
            json!({"role": "assistant", "content": ""}),
            None,
            Value::Null,
        )))
        .await
        {
            return;
        }
        let tools = call.req.tools.is_some();
        let (mut text, mut sent) = (String::new(), 0usize);
        let (g, adapter_version) = loop {
            match rx.recv().await {
                Some(EngineEvent::Text(piece)) => {
                    call.lifecycle.text(&piece);
                    text.push_str(&piece);
                    // With tools on, tool-call markup is held back and sent as `tool_calls`.
                    let upto = if tools {
                        tool_calls::streamable_len(&text)
                    } else {
                        text.len()
                    };
                    if upto > sent {
                        let delta = text[sent..upto].to_string();
                        sent = upto;
                        if !send(sse(&call.chunk(
                            json!({"content": delta}),
                            None,
                            Value::Null,
                        )))
                        .await
                        {
                            return;
                        }
                    }
                }
                Some(EngineEvent::Finished {
                    generation,
                    adapter_version,
                    ..
                }) => break (generation, adapter_version),
                Some(EngineEvent::Failed(e)) => {
                    Counters::add(&state.counters.request_errors, 1);
                    let e = engine_error(e);
                    call.lifecycle.failed(&e);
                    let _ = send(sse(&e.body())).await;
                    return;
                }
                Some(
                    EngineEvent::Admitted { .. }
                    | EngineEvent::Chosen { .. }
                    | EngineEvent::Scored { .. },
                ) => {}
                None => return,
            }
        };
        if g.finish == FinishReason::Cancelled {
            return;
        }
        let reply = call.reply(&state, &g);
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
        if !rest.is_empty()
            && !send(sse(&call.chunk(
                json!({"content": rest}),
                None,
                Value::Null,
            )))
            .await
        {
            return;
        }
        if !reply.tool_calls.is_empty() {
            let calls: Vec<Value> = reply
                .tool_calls
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let mut c = c.clone();
                    c["index"] = json!(i);
                    c
                })
                .collect();
            if !send(sse(&call.chunk(
                json!({"tool_calls": calls}),
                None,
                Value::Null,
            )))
            .await
            {
                return;
            }
        }
        // Commit before the client sees the end of the reply.
        if let Err(e) = call.commit(&state, &g, adapter_version, &reply).await {
            Counters::add(&state.counters.request_errors, 1);
            let _ = send(sse(&e.body())).await;
            return;
        }
        if !send(sse(&call.chunk(
            json!({}),
            Some(reply.finish_reason.as_str()),
            reply.logprobs.clone(),
        )))
        .await
        {
            return;
        }
        if call.req.include_usage {
            let usage = json!({"id": call.id, "object": "chat.completion.chunk", "created": call.created, "model": call.model, "choices": [], "usage": reply.usage});
            if !send(sse(&usage)).await {
                return;
            }
        }
        let _ = send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n")))).await;
    });
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
