//! The chat flow, whoever asks (an HTTP client, the screen's chat box): capture opens the turn,
//! the engine generates it, the turn is committed before the end of the reply is delivered, and
//! the request's life is published on the bus (started, text, then exactly one of finished,
//! failed, cancelled).

use crate::Core;
use crate::capture::{TurnSlot, TurnType, random_id};
use crate::engine::{
    EngineError, EngineEvent, Job, Priority, Prompt, SubmitError, Task, VersionChoice,
};
use crate::events::{Event, EventBus, Finish, emit};
use crate::store::{NewTurn, now_ms};
use crate::telemetry::Counters;
use crate::tool_calls;
use clawrl_model::messages::{Content, Message, ToolCall};
use clawrl_model::{FinishReason, Generation, SamplingParams};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use tokio::sync::mpsc::UnboundedReceiver;

/// A validated chat request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub tools: Option<Value>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Alternatives (with log-probs) recorded per sampled token; 0 = none.
    pub top_logprobs: usize,
    pub session_id: Option<String>,
    /// header | body | prefix (how the session is identified) | tui
    pub session_source: &'static str,
    pub turn_type: TurnType,
    pub session_done: bool,
}

/// Why a chat could not be served.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatError {
    /// The queue is full; retry shortly.
    Overloaded,
    /// The model is not loaded (yet).
    Unavailable,
    /// The engine refused or failed the request.
    Engine(EngineError),
    /// The engine stopped while the request was in flight.
    EngineStopped,
}

impl std::fmt::Display for ChatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Overloaded => {
                f.write_str("The server is busy: too many requests are waiting. Retry shortly.")
            }
            Self::Unavailable => {
                f.write_str("The model is not loaded yet (or failed to load); see GET /health.")
            }
            Self::Engine(e) => write!(f, "{e}"),
            Self::EngineStopped => f.write_str("The engine stopped."),
        }
    }
}

/// Publishes a started request's progress on the bus and guarantees it exactly one final
/// event: finished, failed, or, when dropped without either (the client went away, the
/// connection was closed), cancelled.
struct Lifecycle {
    bus: EventBus,
    request_id: String,
    ended: AtomicBool,
}

impl Lifecycle {
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
}

impl Drop for Lifecycle {
    fn drop(&mut self) {
        self.end(Event::RequestCancelled {
            request_id: self.request_id.clone(),
        });
    }
}

/// A chat turn in flight: admitted by the engine, its prompt computed.
pub struct InflightTurn {
    pub id: String,
    pub slot: TurnSlot,
    pub prompt_ids: Vec<u32>,
    pub cached_tokens: usize,
    pub req: ChatRequest,
    /// Set to stop generating (the client went away).
    pub cancel: Arc<AtomicBool>,
    lifecycle: Lifecycle,
    rx: UnboundedReceiver<EngineEvent>,
    core: Arc<Core>,
}

/// What the generation did next.
#[derive(Debug)]
pub enum Step {
    /// More reply text.
    Text(String),
    /// The reply is complete (not yet committed: see [`InflightTurn::commit`]).
    Done {
        generation: Generation,
        adapter_version: i64,
    },
    Failed(ChatError),
}

/// The finished reply: content, tool calls parsed out of the text, and why it ended.
#[derive(Debug, Clone)]
pub struct Reply {
    pub content: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    pub finish: Finish,
}

impl Reply {
    /// The assistant message as the client receives it.
    pub fn message(&self) -> Message {
        Message {
            content: self.content.clone().map(Content::Text),
            tool_calls: self.tool_calls.clone(),
            ..Message::assistant("")
        }
    }
}

/// Queues a chat turn in the engine and waits until its prompt is computed
/// (so that prompt errors come before any reply starts), then opens the turn in capture: nothing
/// is captured for a request the engine refuses.
pub async fn start(core: Arc<Core>, req: ChatRequest) -> Result<InflightTurn, ChatError> {
    let session_id = req.session_id.clone();
    let started = admit(core.clone(), req).await;
    if let Err(e) = &started {
        emit(
            &core.bus,
            Event::RequestRefused {
                session_id,
                status: status_of(e),
                message: e.to_string(),
            },
        );
    }
    started
}

/// What keeps a conversation on one upstream replica: its session id, else its opening
/// messages (the same for every turn of it).
fn conversation_key(req: &ChatRequest) -> String {
    match &req.session_id {
        Some(id) => id.clone(),
        None => req
            .messages
            .iter()
            .take(2)
            .map(|m| serde_json::to_string(m).unwrap_or_default())
            .collect(),
    }
}

async fn admit(core: Arc<Core>, req: ChatRequest) -> Result<InflightTurn, ChatError> {
    let (job, mut rx) = Job::new(
        Prompt::chat(req.messages.clone(), req.tools.clone()),
        Task::Generate {
            max_tokens: req.max_tokens,
            sampling: req.sampling,
            stop: req.stop.clone(),
            top_logprobs: req.top_logprobs,
        },
        VersionChoice::Live,
        Priority::User,
    );
    let cancel = job.cancel.clone();
    core.submit(job, &conversation_key(&req))
        .map_err(|e| match e {
            SubmitError::Overloaded => ChatError::Overloaded,
            SubmitError::Unavailable => ChatError::Unavailable,
        })?;
    let (prompt_ids, cached_tokens) = match rx.recv().await {
        Some(EngineEvent::Admitted {
            prompt_ids,
            cached_tokens,
        }) => (prompt_ids, cached_tokens),
        Some(EngineEvent::Failed(e)) => return Err(ChatError::Engine(e)),
        _ => return Err(ChatError::EngineStopped),
    };
    // Only a request the engine admitted reaches capture: a refused one (queue full, context
    // too long, bad prompt) takes no turn index, opens no session and is no one's next state.
    let capture = core.capture.clone();
    let (sid, src, tt, done, msgs) = (
        req.session_id.clone(),
        req.session_source,
        req.turn_type,
        req.session_done,
        req.messages.clone(),
    );
    let begun = tokio::task::spawn_blocking(move || capture.begin(sid, src, tt, done, &msgs))
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r);
    // A store that cannot be written (a full disk) costs the turn its capture, not its reply.
    let slot = begun.unwrap_or_else(|e| {
        capture_failed(&core, &e);
        TurnSlot::unrecorded(req.session_id.clone(), req.turn_type)
    });
    let id = format!("chatcmpl-{}", random_id(""));
    emit(
        &core.bus,
        Event::RequestStarted {
            request_id: id.clone(),
            session_id: slot.session_id.clone(),
            turn_index: slot.turn_index,
            prompt_tokens: prompt_ids.len(),
            cached_tokens,
            last_message: last_message_text(&req.messages),
        },
    );
    Ok(InflightTurn {
        lifecycle: Lifecycle {
            bus: core.bus.clone(),
            request_id: id.clone(),
            ended: AtomicBool::new(false),
        },
        id,
        slot,
        prompt_ids,
        cached_tokens,
        req,
        cancel,
        rx,
        core,
    })
}

impl InflightTurn {
    /// Waits for the next piece of the generation.
    pub async fn next(&mut self) -> Step {
        loop {
            match self.rx.recv().await {
                Some(EngineEvent::Text(piece)) => {
                    self.lifecycle.text(&piece);
                    return Step::Text(piece);
                }
                Some(EngineEvent::Finished {
                    generation,
                    adapter_version,
                    ..
                }) => {
                    return Step::Done {
                        generation,
                        adapter_version,
                    };
                }
                Some(EngineEvent::Failed(e)) => {
                    let e = ChatError::Engine(e);
                    self.fail(&e);
                    return Step::Failed(e);
                }
                Some(_) => {}
                None => {
                    self.fail(&ChatError::EngineStopped);
                    return Step::Failed(ChatError::EngineStopped);
                }
            }
        }
    }

    /// Ends the request as failed (`status` is what the client is told).
    pub fn fail(&self, e: &ChatError) {
        self.lifecycle.end(Event::RequestFailed {
            request_id: self.id.clone(),
            status: status_of(e),
            message: e.to_string(),
        });
    }

    /// The reply of a finished generation: tool calls parsed out when tools were offered.
    pub fn reply(&self, g: &Generation) -> Reply {
        let parsed = match &self.req.tools {
            Some(tools) => {
                let names: Vec<&str> = tools
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t["function"]["name"].as_str())
                    .collect();
                tool_calls::parse(&g.text, &names, &mut || random_id("call_"))
            }
            None => tool_calls::Parsed {
                content: Some(g.text.clone()),
                tool_calls: Vec::new(),
            },
        };
        let finish = if !parsed.tool_calls.is_empty() {
            Finish::ToolCalls
        } else if g.finish == FinishReason::Length {
            Finish::Length
        } else {
            Finish::Stop
        };
        Reply {
            content: parsed.content,
            tool_calls: parsed.tool_calls,
            finish,
        }
    }

    /// Commits the turn to the store (before the client sees the end of the reply) and ends
    /// the request as finished. A store that cannot be written is reported, and the reply is
    /// still delivered: serving goes on, only this turn is not captured.
    pub async fn commit(&self, g: &Generation, adapter_version: i64, reply: &Reply) {
        if self.slot.recorded {
            self.record(g, adapter_version, reply).await;
        }
        self.lifecycle.end(Event::RequestFinished {
            request_id: self.id.clone(),
            completion_tokens: g.ids.len(),
            finish_reason: reply.finish,
            adapter_version,
        });
    }

    async fn record(&self, g: &Generation, adapter_version: i64, reply: &Reply) {
        let s = &self.req.sampling;
        let turn = NewTurn {
            session_id: self.slot.session_id.clone(),
            turn_index: self.slot.turn_index,
            turn_type: self.slot.turn_type,
            response_id: self.id.clone(),
            request_messages: self.req.messages.clone(),
            tools: self.req.tools.clone(),
            prompt_ids: self.prompt_ids.clone(),
            response_ids: g.ids.clone(),
            logprobs: g.logprobs.clone(),
            response_text: g.text.clone(),
            tool_calls: reply.tool_calls.clone(),
            reply_message: reply.message(),
            finish_reason: reply.finish.as_str().into(),
            adapter_version,
            sampling: json!({"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "seed": s.seed, "max_tokens": self.req.max_tokens}),
            cached_tokens: self.cached_tokens,
            created_at: self.slot.created_at,
            completed_at: now_ms(),
        };
        let (capture, slot) = (self.core.capture.clone(), self.slot.clone());
        let stored = tokio::task::spawn_blocking(move || capture.commit(&slot, turn))
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r);
        if let Err(e) = stored {
            capture_failed(&self.core, &e);
        }
    }
}

/// Says that a turn could not be captured (log, screen, `clawrl_capture_errors_total`).
fn capture_failed(core: &Core, e: &anyhow::Error) {
    Counters::add(&core.counters.capture_errors, 1);
    crate::events::alert(
        &core.bus,
        format!("a turn was served but not captured (the store cannot be written): {e:#}"),
    );
}

/// The text of the last message (what a reply answers), at most 2000 characters.
fn last_message_text(messages: &[Message]) -> String {
    let text = messages.last().map(Message::text).unwrap_or_default();
    match text.char_indices().nth(2000) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// The HTTP status a chat error is answered with.
pub fn status_of(e: &ChatError) -> u16 {
    match e {
        ChatError::Overloaded => 429,
        ChatError::Unavailable | ChatError::Engine(EngineError::Unavailable(_)) => 503,
        ChatError::Engine(EngineError::ContextTooLong { .. } | EngineError::BadRequest(_)) => 400,
        ChatError::Engine(_) | ChatError::EngineStopped => 500,
    }
}
