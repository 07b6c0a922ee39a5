//! The typed events every stage publishes on the in-process bus (a tokio broadcast channel).
//! The TUI, the judge, the headless log and the tests subscribe; nobody calls into a stage.

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The engine finished loading the model and serves requests.
    EngineReady {
        model: String,
    },
    /// A chat completion was admitted: its prompt is computed and tokens follow. Exactly one
    /// of `RequestFinished`, `RequestFailed`, `RequestCancelled` ends it.
    RequestStarted {
        request_id: String,
        session_id: String,
        turn_index: i64,
        prompt_tokens: usize,
        cached_tokens: usize,
        /// The text of the request's last message (what the reply answers), shortened.
        last_message: String,
    },
    /// Reply text as it is generated (what a client streaming the reply receives).
    RequestText {
        request_id: String,
        text: String,
    },
    /// The reply is complete and its turn committed.
    RequestFinished {
        request_id: String,
        completion_tokens: usize,
        finish_reason: Finish,
        adapter_version: i64,
    },
    /// The request failed after it started (the client got this error).
    RequestFailed {
        request_id: String,
        status: u16,
        message: String,
    },
    /// The client went away before the end; nothing was committed.
    RequestCancelled {
        request_id: String,
    },
    /// A request was refused before it started (nothing was captured): overloaded, model not
    /// loaded, context too long, ...
    RequestRefused {
        session_id: Option<String>,
        status: u16,
        message: String,
    },
    /// A turn was committed to the store.
    TurnCaptured {
        turn_id: i64,
        session_id: String,
        turn_index: i64,
        turn_type: TurnType,
    },
    /// A turn received its next state (the user's reply or its tool results).
    NextStateAttached {
        turn_id: i64,
        session_id: String,
        role: NextRole,
    },
    /// A session was closed (explicitly, or after the idle timeout); its main turns still
    /// without a next state carry no signal.
    SessionClosed {
        session_id: String,
        reason: CloseReason,
        no_signal_turns: usize,
    },
    /// The judge finished a turn: the majority score of its votes and whether a hint came out.
    TurnJudged {
        turn_id: i64,
        session_id: String,
        score: i8,
        votes: Vec<Option<i8>>,
        /// The hint extracted for hindsight distillation, if any.
        hint: Option<String>,
        error: Option<String>,
    },
    /// Turns waiting for the judge.
    JudgeQueue {
        pending: usize,
    },
    /// A human rated a turn (it overrides the judge's score for training).
    FeedbackRecorded {
        turn_id: i64,
        session_id: String,
        rating: i8,
    },
    /// Samples waiting for the trainer changed.
    SamplesWaiting {
        samples: usize,
    },
    /// The trainer chose what a sample distils from (of `candidates` hint candidates).
    HintChosen {
        turn_id: i64,
        source: crate::store::HintSource,
        hint: String,
        /// The chosen teacher's mean top-K overlap with the student, when scored.
        overlap: Option<f64>,
        candidates: usize,
    },
    /// The trainer set samples aside for good, without an update, and why.
    SamplesSetAside {
        samples: usize,
        reason: String,
    },
    /// The trainer started an update from `parent` on these samples.
    TrainingStarted {
        parent: i64,
        samples: usize,
        hints: usize,
    },
    /// One micro-step (one sample's forward and backward pass) of the update in progress.
    TrainingStep {
        done: usize,
        samples: usize,
        loss: f64,
        /// KL(sampling-time policy ‖ current) on the sample's tokens.
        kl: f64,
    },
    /// An update could not finish; its samples wait for the next one.
    TrainingFailed {
        error: String,
    },
    /// A candidate version was recorded with its metrics and the guard's verdict.
    CandidateReady {
        version: i64,
        parent: i64,
        samples: usize,
        loss: f64,
        kl_base: Option<f64>,
        kl_live: Option<f64>,
        mean_reward: Option<f64>,
        /// The learning rate of the update's step (`None`: not recorded).
        learning_rate: Option<f64>,
        guard_passed: bool,
        reasons: Vec<String>,
    },
    /// A version went live (`reason`: auto | approved | fallback); requests admitted from now
    /// on are served by it.
    VersionLive {
        version: i64,
        previous: i64,
        reason: LiveReason,
    },
    /// A candidate was vetoed (it will never be served).
    VersionVetoed {
        version: i64,
    },
    /// The live version was rolled back to an earlier one (0 = the base model).
    RolledBack {
        from: i64,
        to: i64,
    },
    TrainingPaused,
    TrainingResumed,
    /// The outcome of a command someone gave (the screen shows it; the log keeps it).
    Notice {
        level: Level,
        text: String,
    },
}

pub use crate::store::TurnType;

/// Who answered a turn: the user's next message or the results of the tools it called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NextRole {
    User,
    Tool,
}

impl NextRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Tool => "tool",
        }
    }
}

/// Why a session was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// The client said so (`X-Session-Done`, a new chat in the chat box).
    Client,
    /// Nothing arrived for `server.session_idle_secs`.
    Idle,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Idle => "idle",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Info,
    Error,
}

/// Why a reply ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    Stop,
    Length,
    ToolCalls,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ToolCalls => "tool_calls",
        }
    }
}

/// Why a version went live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LiveReason {
    /// The guard passed under the `auto` policy.
    Auto,
    /// A human approved the candidate.
    Approved,
    /// A rollback.
    Rollback,
    /// At a restart, the recorded live version's adapter could not be served.
    Fallback,
}

impl LiveReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Approved => "approved",
            Self::Rollback => "rollback",
            Self::Fallback => "fallback",
        }
    }
}

pub(crate) type EventBus = broadcast::Sender<Event>;

pub fn bus() -> EventBus {
    broadcast::channel(1024).0
}

/// Publishes an event; having no subscriber is normal (headless, tests).
pub fn emit(bus: &EventBus, event: Event) {
    tracing::debug!(?event, "event");
    let _ = bus.send(event);
}

/// A failure the owner must see: logged as an error and shown on screen.
pub(crate) fn alert(bus: &EventBus, text: String) {
    tracing::error!("{text}");
    emit(
        bus,
        Event::Notice {
            level: Level::Error,
            text,
        },
    );
}
