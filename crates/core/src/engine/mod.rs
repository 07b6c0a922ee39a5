//! The engine: owns the model on its own thread; everything else talks to it through channels.
//!
//! Scheduling is round-robin interleaving: each admitted request gets one decode step per
//! round, so none starves; a new request's prompt is computed between rounds (reusing the
//! prefix cache), a long one a chunk per round. A bounded queue in front answers "overloaded"
//! instead of growing.
//!
//! Adapter versions: the engine holds the LoRA adapter of every version it may serve or score
//! (`AdapterCommand::Install`) and which one is live (`AdapterCommand::SetLive`). Commands are
//! applied between decode rounds; a request takes the live version when it is admitted and
//! keeps it to its last token, and the prefix cache is keyed by (version, token ids). The
//! scheduling itself is `worker.rs`; the background's share of it `share.rs`.

mod configure;
pub(crate) mod prefix_cache;
mod share;
mod worker;

use worker::run_engine;

use crate::telemetry::Counters;
use burn::tensor::Tensor;
use clawrl_model::KvCache;
use clawrl_model::generate::{Decoding, token_budget};
use clawrl_model::messages::Message;
use clawrl_model::{
    GenerateRequest, Generation, LoadOptions, LoadedModel, LoraAdapter, SamplingParams,
};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, RwLock};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model_path: PathBuf,
    pub load: LoadOptions,
    /// Requests waiting beyond the active ones before new ones are refused.
    pub max_queue: usize,
    /// Requests generated concurrently (interleaved).
    pub max_active: usize,
    pub prefix_cache_bytes: usize,
    pub prefix_cache_min_tokens: usize,
    /// Run at the lowest CPU priority on a pool of its own (a judge on its own model): it
    /// then only uses CPU time that serving and the policy's engine leave idle.
    pub background: bool,
    /// The share of time background work gets while user requests would keep this engine
    /// busy (`engine.background_share`; see [`Share`]).
    pub background_share: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Loading,
    Ready,
    Failed(String),
}

/// What the server learns about the loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub context_length: usize,
    pub summary: String,
    pub tokenizer: Arc<clawrl_model::tokenizer::Tokenizer>,
    /// Bytes its weights hold.
    pub weight_bytes: usize,
}

/// Who is waiting: user requests always go first; background work (the judge) runs only
/// while no user request is generating or waiting, so it never slows serving down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    User,
    Background,
}

/// Which adapter version a job runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionChoice {
    /// The version live when the job is admitted.
    Live,
    /// A given version; 0 is the base model without adapter.
    Exactly(i64),
}

/// What the model reads.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// A chat rendered with the model's template, generation prompt on, then `reply_prefix`.
    Chat {
        messages: Vec<Message>,
        tools: Option<Value>,
        reply_prefix: String,
    },
    /// Token ids exactly as given (e.g. a captured turn's prompt).
    Ids(Vec<u32>),
}

impl Prompt {
    pub fn chat(messages: Vec<Message>, tools: Option<Value>) -> Self {
        Self::Chat {
            messages,
            tools,
            reply_prefix: String::new(),
        }
    }
}

/// What to do with the rendered prompt.
#[derive(Debug, Clone)]
pub enum Task {
    /// Sample a reply.
    Generate {
        max_tokens: usize,
        sampling: SamplingParams,
        stop: Vec<String>,
        top_logprobs: usize,
    },
    /// The log-probability of each option text as the reply's continuation after
    /// `reply_prefix`, from one prefill (answered with [`EngineEvent::Chosen`]).
    Choose { options: Vec<String> },
    /// Teacher-forced log-probabilities of `continuation` after the prompt under the job's
    /// version, and with `distributions` the full next-token log-distributions too (answered
    /// with [`EngineEvent::Scored`]). As background work it advances one chunk per round.
    Score {
        continuation: Vec<u32>,
        distributions: bool,
    },
}

/// Work for the engine.
pub struct Job {
    pub prompt: Prompt,
    pub task: Task,
    pub version: VersionChoice,
    pub priority: Priority,
    pub events: UnboundedSender<EngineEvent>,
    /// Set by the server when the client goes away.
    pub cancel: Arc<AtomicBool>,
}

impl Job {
    /// A job with its own event channel and cancel flag.
    pub fn new(
        prompt: Prompt,
        task: Task,
        version: VersionChoice,
        priority: Priority,
    ) -> (Self, tokio::sync::mpsc::UnboundedReceiver<EngineEvent>) {
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        let job = Self {
            prompt,
            task,
            version,
            priority,
            events,
            cancel: Arc::new(AtomicBool::new(false)),
        };
        (job, rx)
    }
}

/// Instructions about adapter versions, applied between decode rounds.
pub enum AdapterCommand {
    /// Keep `adapter` as version `version` (to score with it, or to make it live later).
    Install {
        version: i64,
        adapter: Arc<LoraAdapter>,
    },
    /// Serve `version` to every request admitted from now on (0 = the base model).
    SetLive {
        version: i64,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// Forget a version's adapter (requests still decoding with it keep their copy).
    Remove { version: i64 },
}

// Moved once through a channel: a box would cost more than the bytes.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Job(Job, Option<InflightToken>),
    Adapter(AdapterCommand),
}

/// Counts a user request from its submission until the engine is done with it (dropped with
/// the job), so that the trainer can tell when serving is idle.
struct InflightToken(Arc<Shared>);

impl Drop for InflightToken {
    fn drop(&mut self) {
        self.0.user_inflight.fetch_sub(1, Relaxed);
    }
}

#[derive(Debug)]
pub enum EngineEvent {
    /// The prompt was computed; generation starts.
    Admitted {
        prompt_ids: Vec<u32>,
        cached_tokens: usize,
    },
    Text(String),
    Finished {
        generation: Generation,
        prompt_ids: Vec<u32>,
        cached_tokens: usize,
        adapter_version: i64,
    },
    /// The answer to a [`Task::Choose`]: one log-probability per option, in order.
    Chosen {
        logprobs: Vec<f32>,
    },
    /// The answer to a [`Task::Score`]: the continuation's log-probs, and its log-distributions
    /// `[n, vocab]` when asked for.
    Scored {
        logprobs: Vec<f32>,
        distributions: Option<Tensor<2>>,
    },
    Failed(EngineError),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    ContextTooLong {
        prompt_tokens: usize,
        context_length: usize,
    },
    /// The request cannot be rendered (e.g. the chat template rejects it).
    BadRequest(String),
    /// The job names an adapter version the engine does not hold.
    UnknownVersion(i64),
    /// Nothing can serve it now (every upstream replica is down).
    Unavailable(String),
    Internal(String),
}

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ContextTooLong {
                prompt_tokens,
                context_length,
            } => write!(
                f,
                "This model's maximum context length is {context_length} tokens, but the messages are {prompt_tokens} tokens. Shorten the conversation or the system prompt."
            ),
            Self::BadRequest(m) | Self::Internal(m) | Self::Unavailable(m) => f.write_str(m),
            Self::UnknownVersion(v) => write!(f, "adapter version {v} is not loaded"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full; retry later.
    Overloaded,
    /// The engine is not (or no longer) able to serve.
    Unavailable,
}

struct Shared {
    status: RwLock<Status>,
    info: RwLock<Option<ModelInfo>>,
    /// The loaded model, shared read-only with the trainer (its frozen base weights).
    model: RwLock<Option<Arc<LoadedModel>>>,
    counters: Arc<Counters>,
    max_queue: usize,
    /// User requests submitted and not yet finished.
    user_inflight: AtomicUsize,
    live_version: AtomicI64,
    /// The engine pauses serving for background work (its share of the time).
    yielding: AtomicBool,
}

/// The version to serve once the model is loaded, chosen by the caller (the gate), and its
/// adapter (`None` for the base model).
pub(crate) type StartVersion = (i64, Option<Arc<LoraAdapter>>);

/// A cheap, cloneable handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: Sender<Msg>,
    shared: Arc<Shared>,
}

impl Engine {
    /// Starts the engine thread; the model loads in the background (`status()` says when).
    /// `start_version` picks the version served from the first request on (a restart resumes
    /// the live version); `on_ready` runs once serving can begin.
    pub fn start(
        config: EngineConfig,
        counters: Arc<Counters>,
        start_version: impl FnOnce(&LoadedModel) -> StartVersion + Send + 'static,
        on_ready: impl FnOnce(&ModelInfo) + Send + 'static,
    ) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            status: RwLock::new(Status::Loading),
            info: RwLock::new(None),
            model: RwLock::new(None),
            counters,
            max_queue: config.max_queue,
            user_inflight: AtomicUsize::new(0),
            live_version: AtomicI64::new(0),
            yielding: AtomicBool::new(false),
        });
        let s = shared.clone();
        let name = if config.background {
            "clawrl-engine-bg"
        } else {
            "clawrl-engine"
        };
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let status = s.clone();
                let run = move || {
                    // The engine runs on a worker of its own pool, so the matmuls of a decode
                    // step split their rows with that pool's other threads without a wake-up
                    // per call (see background::serving_pool).
                    let pool = if config.background {
                        clawrl_model::background::lower_priority();
                        clawrl_model::background::low_priority_pool("clawrl-engine-bg")
                    } else {
                        clawrl_model::background::serving_pool("clawrl-engine")
                    };
                    match pool {
                        Ok(pool) => {
                            pool.install(|| run_engine(config, s, rx, start_version, on_ready))
                        }
                        Err(e) => {
                            tracing::warn!("no engine thread pool ({e:#}); using the global one");
                            run_engine(config, s, rx, start_version, on_ready)
                        }
                    }
                };
                // A bug must not leave a dead engine behind a healthy-looking server: the
                // status says failed (GET /health: 503), new requests are refused, and the
                // core's watchdog reports it.
                if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
                    let why = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown cause".into());
                    tracing::error!("the engine thread panicked: {why}");
                    *status.status.write().unwrap_or_else(|p| p.into_inner()) =
                        Status::Failed(format!(
                            "the engine stopped after an internal error ({why}); restart clawrl-tui"
                        ));
                }
            })
            .expect("spawn engine thread");
        Self { tx, shared }
    }

    /// The loaded model (for the trainer, which computes with the same frozen base weights).
    pub fn model(&self) -> Option<Arc<LoadedModel>> {
        self.shared
            .model
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The version served to newly admitted requests.
    pub fn live_version(&self) -> i64 {
        self.shared.live_version.load(Relaxed)
    }

    /// Whether a user request is waiting or being generated and the engine is serving it
    /// (background work yields to it, but for the engine's pauses for background work).
    pub fn serving_busy(&self) -> bool {
        self.shared.user_inflight.load(Relaxed) > 0 && !self.shared.yielding.load(Relaxed)
    }

    /// Runs a background job to its end and returns its final event (`Finished`, `Chosen` or
    /// `Scored`). Blocks: call it from a thread that may wait (the trainer, the gate).
    pub(crate) fn run_blocking(
        &self,
        prompt: Prompt,
        task: Task,
        version: VersionChoice,
    ) -> Result<EngineEvent, EngineError> {
        let (job, mut rx) = Job::new(prompt, task, version, Priority::Background);
        self.submit(job)
            .map_err(|_| EngineError::Internal("the engine is not ready".into()))?;
        loop {
            match rx.blocking_recv() {
                Some(
                    e @ (EngineEvent::Finished { .. }
                    | EngineEvent::Chosen { .. }
                    | EngineEvent::Scored { .. }),
                ) => {
                    return Ok(e);
                }
                Some(EngineEvent::Failed(e)) => return Err(e),
                Some(_) => {}
                None => return Err(EngineError::Internal("the engine stopped".into())),
            }
        }
    }

    /// Teacher-forced scoring as background work (see [`Task::Score`]), blocking.
    pub fn score_blocking(
        &self,
        prompt: Prompt,
        continuation: Vec<u32>,
        version: i64,
        distributions: bool,
    ) -> Result<(Vec<f32>, Option<Tensor<2>>), EngineError> {
        let task = Task::Score {
            continuation,
            distributions,
        };
        match self.run_blocking(prompt, task, VersionChoice::Exactly(version))? {
            EngineEvent::Scored {
                logprobs,
                distributions,
            } => Ok((logprobs, distributions)),
            other => Err(EngineError::Internal(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// Sends a command; applied between decode rounds.
    pub fn command(&self, c: AdapterCommand) -> Result<(), SubmitError> {
        self.tx
            .send(Msg::Adapter(c))
            .map_err(|_| SubmitError::Unavailable)
    }

    /// Makes `version` live and waits until the engine has switched (blocking; call from a
    /// thread that may block).
    pub fn set_live_blocking(&self, version: i64) -> anyhow::Result<()> {
        let (done, rx) = oneshot::channel();
        self.command(AdapterCommand::SetLive { version, done })
            .map_err(|_| anyhow::anyhow!("the engine is not running"))?;
        rx.blocking_recv()
            .map_err(|_| anyhow::anyhow!("the engine stopped"))?
            .map_err(anyhow::Error::msg)
    }

    pub fn status(&self) -> Status {
        self.shared
            .status
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn info(&self) -> Option<ModelInfo> {
        self.shared
            .info
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Queues a job, or refuses a user job when the queue is full (background jobs wait
    /// without a bound: their submitter limits how many it has outstanding).
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if self.status() != Status::Ready {
            return Err(SubmitError::Unavailable);
        }
        if job.priority == Priority::Background {
            return self
                .tx
                .send(Msg::Job(job, None))
                .map_err(|_| SubmitError::Unavailable);
        }
        let c = &self.shared.counters;
        // Reserve a queue slot first so concurrent submits cannot overshoot the bound.
        let before = c.queue_depth.fetch_add(1, Relaxed);
        if before as usize >= self.shared.max_queue {
            c.queue_depth.fetch_sub(1, Relaxed);
            return Err(SubmitError::Overloaded);
        }
        self.shared.user_inflight.fetch_add(1, Relaxed);
        let token = InflightToken(self.shared.clone());
        self.tx.send(Msg::Job(job, Some(token))).map_err(|_| {
            c.queue_depth.fetch_sub(1, Relaxed);
            SubmitError::Unavailable
        })
    }
}
