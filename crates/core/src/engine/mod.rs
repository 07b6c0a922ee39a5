//! The engine: owns the model on its own thread; everything else talks to it through channels.
//!
//! Scheduling is round-robin interleaving: each admitted request gets one decode step per
//! round, so none starves; a new request's prompt is computed between rounds (reusing the
//! prefix cache), a long one a chunk per round. A bounded queue in front answers "overloaded"
//! instead of growing.
//!
//! Adapter versions: the engine holds the LoRA adapter of every version it may serve or score
//! (`AdapterCommand::Install`) and which one is live (`AdapterCommand::SetLive`). Commands are applied
//! between decode rounds; a request takes the live version when it is admitted and keeps it to
//! its last token, and the prefix cache is keyed by (version, token ids).

mod configure;
pub mod prefix_cache;

use crate::telemetry::Counters;
use burn::tensor::Tensor;
use clawrl_model::KvCache;
use clawrl_model::generate::{Decoding, token_budget};
use clawrl_model::{
    GenerateRequest, Generation, LoadOptions, LoadedModel, LoraAdapter, SamplingParams,
};
use prefix_cache::PrefixCache;
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
        messages: Vec<Value>,
        tools: Option<Value>,
        reply_prefix: String,
    },
    /// Token ids exactly as given (e.g. a captured turn's prompt).
    Ids(Vec<u32>),
}

impl Prompt {
    pub fn chat(messages: Vec<Value>, tools: Option<Value>) -> Self {
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
            Self::BadRequest(m) | Self::Internal(m) => f.write_str(m),
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
pub type StartVersion = (i64, Option<Arc<LoraAdapter>>);

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
    pub fn run_blocking(
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

/// A job as the worker holds it: the in-flight token goes wherever the job goes.
struct Queued {
    job: Job,
    _inflight: Option<InflightToken>,
}

struct Active {
    job: Queued,
    decoding: Decoding,
    prompt_ids: Vec<u32>,
    version: i64,
}

/// The engine thread: loads the model, then serves jobs until every handle is gone.
fn run_engine(
    config: EngineConfig,
    s: Arc<Shared>,
    rx: Receiver<Msg>,
    start_version: impl FnOnce(&LoadedModel) -> StartVersion,
    on_ready: impl FnOnce(&ModelInfo),
) {
    let model = match LoadedModel::load(&config.model_path, &config.load) {
        Ok(m) => Arc::new(m),
        Err(e) => {
            tracing::error!("model failed to load: {e:#}");
            *s.status.write().unwrap() = Status::Failed(format!("{e:#}"));
            return;
        }
    };
    let (live, adapter) = start_version(&model);
    let mut adapters = HashMap::new();
    if let Some(a) = adapter {
        adapters.insert(live, Arc::new(a.for_serving()));
    }
    s.live_version.store(live, Relaxed);
    let info = ModelInfo {
        name: model.name.clone(),
        context_length: model.config.context_length,
        summary: model.summary(),
        tokenizer: model.tokenizer.clone(),
    };
    tracing::info!(live_version = live, "engine ready: {}", info.summary);
    *s.info.write().unwrap() = Some(info.clone());
    *s.model.write().unwrap() = Some(model.clone());
    *s.status.write().unwrap() = Status::Ready;
    on_ready(&info);
    clawrl_model::failpoint::hit("engine.ready");
    Worker {
        model,
        prefix: PrefixCache::new(config.prefix_cache_bytes, config.prefix_cache_min_tokens),
        shared: s,
        max_active: config.max_active.max(1),
        adapters,
        share: Share::new(config.background_share),
        background: config.background,
    }
    .run(rx);
}

struct Worker {
    model: Arc<LoadedModel>,
    prefix: PrefixCache,
    shared: Arc<Shared>,
    max_active: usize,
    /// The adapter of every installed version (the base model, 0, has none).
    adapters: HashMap<i64, Arc<LoraAdapter>>,
    share: Share,
    /// A background engine (a judge on its own model) registers demand while it has work.
    background: bool,
}

/// Background work's guaranteed share of a busy engine's time. While user requests keep the
/// engine busy and background work waits (the engine's own: judge prompts, teacher and guard
/// scores; or another thread's: [`clawrl_model::background::demand`]), the time owed to background
/// work grows by `share / (1 − share)` of the time spent serving; once it reaches
/// [`MIN_SLICE`] the engine pauses serving for it, running its own background jobs or, with
/// none, sleeping so that the low-priority trainer and judge threads get the cores. User
/// requests then take up to 1 / (1 − share) as long; without it an agent sending requests
/// back to back stopped learning altogether (issue 25: a candidate waited 6 minutes).
struct Share {
    share: f64,
    owed: std::time::Duration,
    last: std::time::Instant,
}

/// The shortest pause for background work (a decoding step of the default model takes ~5 ms).
const MIN_SLICE: std::time::Duration = std::time::Duration::from_millis(200);
/// The longest one.
const MAX_SLICE: std::time::Duration = std::time::Duration::from_millis(1000);
/// How often a pause checks that background work still waits (else serving resumes).
const POLL_IN_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

impl Share {
    fn new(share: f64) -> Self {
        Self {
            share: share.clamp(0.0, 0.9),
            owed: std::time::Duration::ZERO,
            last: std::time::Instant::now(),
        }
    }

    /// Accounts the time since the last call; returns how long to pause serving now, if at all.
    fn pause(
        &mut self,
        now: std::time::Instant,
        users_busy: bool,
        background_waits: bool,
    ) -> Option<std::time::Duration> {
        let dt = now.duration_since(self.last);
        self.last = now;
        if self.share <= 0.0 || !background_waits {
            self.owed = std::time::Duration::ZERO;
            return None;
        }
        if !users_busy {
            return None;
        }
        self.owed += dt.mul_f64(self.share / (1.0 - self.share));
        (self.owed >= MIN_SLICE).then(|| self.owed.min(MAX_SLICE))
    }

    /// A pause of `took` ended at `now` (it is not serving time).
    fn paused(&mut self, took: std::time::Duration, now: std::time::Instant) {
        self.owed = self.owed.saturating_sub(took);
        self.last = now;
    }
}

/// A job whose prompt is rendered, tokenized and checked against the context.
struct Prepared {
    job: Queued,
    prompt_ids: Vec<u32>,
    /// For a [`Task::Choose`]: prompt + each option, tokenized as a whole.
    sequences: Vec<Vec<u32>>,
    /// The version it runs with, resolved when it was prepared.
    version: i64,
    adapter: Option<Arc<LoraAdapter>>,
}

impl Prepared {
    /// The tokens whose KV cache the job starts from (a prefix-cache key).
    fn cache_key(&self) -> &[u32] {
        self.sequences.first().unwrap_or(&self.prompt_ids)
    }
}

/// A background job whose prompt is computed a chunk per round, only while no user request
/// waits: a user request arriving meanwhile waits for one chunk, not a whole judge prompt.
/// A score is computed the same way, its continuation included.
struct Warming {
    prepared: Prepared,
    cache: KvCache,
    scored: Scoring,
}

/// A score's outputs for the continuation tokens computed so far.
#[derive(Default)]
struct Scoring {
    logprobs: Vec<f32>,
    distributions: Vec<Tensor<2>>,
}

/// Tokens of a background prompt computed per round.
const BACKGROUND_CHUNK: usize = 32;
/// Tokens of a long user prompt computed per round: the other requests get a token between
/// chunks, so a 6 K-token prompt delays them by one chunk at a time, not by its whole prefill.
const USER_CHUNK: usize = 128;
/// The same when no other request is generating or prefilling: larger products run faster
/// (Qwen2.5, a 512-token prompt: 324 tok/s in chunks of 128, ~375 in chunks of 256), and a
/// request arriving meanwhile waits for at most this many tokens.
const SOLO_CHUNK: usize = 256;

impl Worker {
    fn run(mut self, rx: Receiver<Msg>) {
        let (mut waiting_user, mut waiting_bg) = (VecDeque::new(), VecDeque::new());
        let (mut user, mut bg): (Vec<Active>, Vec<Active>) = (Vec::new(), Vec::new());
        let mut warming: Option<Warming> = None;
        // Long user prompts being computed a chunk per round (they count as active).
        let mut prefilling: VecDeque<Warming> = VecDeque::new();
        let mut open = true;
        let mut demand: Option<clawrl_model::background::Demand> = None;
        let receive = |msg: Msg,
                       me: &mut Self,
                       wu: &mut VecDeque<Queued>,
                       wb: &mut VecDeque<Queued>| match msg {
            Msg::Adapter(c) => me.apply(c),
            Msg::Job(job, token) => {
                let q = Queued {
                    job,
                    _inflight: token,
                };
                match q.job.priority {
                    Priority::User => wu.push_back(q),
                    Priority::Background => wb.push_back(q),
                }
            }
        };
        loop {
            let idle =
                user.is_empty() && bg.is_empty() && warming.is_none() && prefilling.is_empty();
            // Block only when there is nothing at all to do.
            if idle && waiting_user.is_empty() && waiting_bg.is_empty() {
                if !open {
                    break;
                }
                match rx.recv() {
                    Ok(msg) => receive(msg, &mut self, &mut waiting_user, &mut waiting_bg),
                    Err(_) => break,
                }
            }
            while open {
                match rx.try_recv() {
                    Ok(msg) => receive(msg, &mut self, &mut waiting_user, &mut waiting_bg),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            self.admit_users(&mut waiting_user, &mut user, &mut prefilling);
            let own_background = warming.is_some() || !waiting_bg.is_empty() || !bg.is_empty();
            if self.background {
                // A judge on its own model: its work waits on the serving engine's pauses.
                match (own_background, &demand) {
                    (true, None) => demand = Some(clawrl_model::background::Demand::hold()),
                    (false, Some(_)) => demand = None,
                    _ => {}
                }
            }
            let users_busy = !user.is_empty() || !waiting_user.is_empty() || !prefilling.is_empty();
            let waits = own_background || (!self.background && clawrl_model::background::demand());
            if let Some(slice) = self
                .share
                .pause(std::time::Instant::now(), users_busy, waits)
            {
                let started = std::time::Instant::now();
                self.shared.yielding.store(true, Relaxed);
                while started.elapsed() < slice {
                    if warming.is_some() || !waiting_bg.is_empty() || !bg.is_empty() {
                        self.warm(&mut warming, &mut waiting_bg, &mut bg);
                        self.decode_round(&mut bg);
                        continue;
                    }
                    if !clawrl_model::background::demand() {
                        break;
                    }
                    // Nothing of the engine's own: leave the cores to the trainer and the
                    // judge, taking messages meanwhile (new requests wait for the pause's end).
                    let wait = slice.saturating_sub(started.elapsed()).min(POLL_IN_PAUSE);
                    match rx.recv_timeout(wait) {
                        Ok(msg) => receive(msg, &mut self, &mut waiting_user, &mut waiting_bg),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                }
                self.shared.yielding.store(false, Relaxed);
                self.share
                    .paused(started.elapsed(), std::time::Instant::now());
            }
            self.prefill_chunk(&mut prefilling, &mut user);
            // Background work: only while no user request waits or generates.
            if user.is_empty() && waiting_user.is_empty() && prefilling.is_empty() {
                self.warm(&mut warming, &mut waiting_bg, &mut bg);
            }
            // One round: a token for every active user request, or else for background ones.
            let round = if user.is_empty() { &mut bg } else { &mut user };
            if !round.is_empty() {
                clawrl_model::failpoint::hit("engine.decode");
            }
            self.decode_round(round);
            self.shared
                .counters
                .active_sequences
                .store(user.len() as u64, Relaxed);
        }
        tracing::info!("engine stopped");
    }

    /// Admits waiting user requests up to `max_active`: a prompt with more than a chunk left
    /// to compute (after the prefix cache) is computed a chunk per round, the others start.
    fn admit_users(
        &mut self,
        waiting: &mut VecDeque<Queued>,
        user: &mut Vec<Active>,
        prefilling: &mut VecDeque<Warming>,
    ) {
        while user.len() + prefilling.len() < self.max_active
            && let Some(q) = waiting.pop_front()
        {
            self.shared.counters.queue_depth.fetch_sub(1, Relaxed);
            let Some(p) = self.prepare(q) else {
                continue;
            };
            let cached = self.prefix.lookup(p.version, p.cache_key());
            let computed = cached.as_ref().map_or(0, KvCache::len);
            if p.cache_key().len() > computed + USER_CHUNK + 1 {
                let mut cache = cached.unwrap_or_else(|| self.model.transformer.new_cache());
                cache.reserve(p.cache_key().len());
                prefilling.push_back(Warming {
                    prepared: p,
                    cache,
                    scored: Scoring::default(),
                });
            } else {
                self.start(p, cached, user);
            }
        }
    }

    /// Applies a command about adapter versions.
    fn apply(&mut self, command: AdapterCommand) {
        match command {
            AdapterCommand::Install { version, adapter } => {
                // With plain copies of its matrices for decoding (see LoraAdapter::for_serving).
                self.adapters
                    .insert(version, Arc::new(adapter.for_serving()));
            }
            AdapterCommand::SetLive { version, done } => {
                let result = if version == 0 || self.adapters.contains_key(&version) {
                    self.shared.live_version.store(version, Relaxed);
                    tracing::info!(version, "live version");
                    Ok(())
                } else {
                    Err(format!("adapter version {version} is not loaded"))
                };
                let _ = done.send(result);
            }
            AdapterCommand::Remove { version } => {
                if version != self.shared.live_version.load(Relaxed) {
                    self.adapters.remove(&version);
                    self.prefix.forget_version(version);
                    self.report_cache_size();
                }
            }
        }
    }

    /// Keeps a prompt's KV cache for later requests (and reports the cache's size).
    fn cache_prompt(&mut self, version: i64, ids: &[u32], cache: &KvCache, background: bool) {
        self.prefix.insert(version, ids, cache, background);
        self.report_cache_size();
    }

    fn report_cache_size(&self) {
        self.shared
            .counters
            .prefix_cache_bytes
            .store(self.prefix.used_bytes() as u64, Relaxed);
    }

    /// The adapter of `version` (`Some(None)` for the base model; `None` if not installed).
    fn adapter(&self, version: i64) -> Option<Option<Arc<LoraAdapter>>> {
        if version == 0 {
            return Some(None);
        }
        self.adapters.get(&version).map(|a| Some(a.clone()))
    }

    /// Advances the background prompt being computed by one chunk, starting the next
    /// background job when there is none; a finished prompt starts its job.
    fn warm(
        &mut self,
        warming: &mut Option<Warming>,
        waiting: &mut VecDeque<Queued>,
        active: &mut Vec<Active>,
    ) {
        if warming.is_none() && active.len() < self.max_active {
            while let Some(q) = waiting.pop_front() {
                if let Some(prepared) = self.prepare(q) {
                    let cache = self
                        .prefix
                        .lookup(prepared.version, prepared.cache_key())
                        .unwrap_or_else(|| self.model.transformer.new_cache());
                    *warming = Some(Warming {
                        prepared,
                        cache,
                        scored: Scoring::default(),
                    });
                    break;
                }
            }
        }
        let Some(w) = warming.as_mut() else { return };
        // The last prompt token is computed when the job starts: its logits are needed.
        let target = w.prepared.cache_key().len() - 1;
        let job = &w.prepared.job.job;
        if job.cancel.load(Relaxed) || job.events.is_closed() {
            *warming = None;
            return;
        }
        let adapter = w.prepared.adapter.clone();
        if w.cache.len() < target {
            let upto = (w.cache.len() + BACKGROUND_CHUNK).min(target);
            let ids = &w.prepared.cache_key()[w.cache.len()..upto];
            self.model
                .extend_cache(ids, &mut w.cache, adapter.as_deref());
            return;
        }
        if let Task::Score {
            continuation,
            distributions,
        } = &job.task
        {
            // The last prompt token, then the continuation but its last token, a chunk per round.
            let done = w.scored.logprobs.len();
            let upto = (done + BACKGROUND_CHUNK).min(continuation.len());
            let feed: Vec<u32> = (done..upto)
                .map(|i| {
                    if i == 0 {
                        w.prepared.prompt_ids[target]
                    } else {
                        continuation[i - 1]
                    }
                })
                .collect();
            let (lp, dist) = clawrl_model::scoring::score_chunk(
                &self.model.transformer,
                &feed,
                &continuation[done..upto],
                &mut w.cache,
                adapter.as_deref(),
                *distributions,
            );
            w.scored.logprobs.extend(lp);
            w.scored.distributions.extend(dist);
            if upto == continuation.len() {
                let w = warming.take().expect("checked above");
                let distributions = (!w.scored.distributions.is_empty())
                    .then(|| Tensor::cat(w.scored.distributions, 0));
                let _ = w.prepared.job.job.events.send(EngineEvent::Scored {
                    logprobs: w.scored.logprobs,
                    distributions,
                });
            }
            return;
        }
        if w.cache.len() >= target {
            let w = warming.take().expect("checked above");
            self.start(w.prepared, Some(w.cache), active);
        }
    }

    /// Computes the next chunk of the oldest long user prompt; a complete one starts.
    fn prefill_chunk(&mut self, prefilling: &mut VecDeque<Warming>, active: &mut Vec<Active>) {
        let chunk = if active.is_empty() && prefilling.len() == 1 {
            SOLO_CHUNK
        } else {
            USER_CHUNK
        };
        let Some(w) = prefilling.front_mut() else {
            return;
        };
        let job = &w.prepared.job.job;
        if job.cancel.load(Relaxed) || job.events.is_closed() {
            prefilling.pop_front();
            return;
        }
        // The last prompt token is computed when the job starts: its logits are needed.
        let target = w.prepared.cache_key().len() - 1;
        let upto = (w.cache.len() + chunk).min(target);
        let ids = &w.prepared.cache_key()[w.cache.len()..upto];
        self.model
            .extend_cache(ids, &mut w.cache, w.prepared.adapter.as_deref());
        if upto == target {
            let w = prefilling.pop_front().expect("checked above");
            self.start(w.prepared, Some(w.cache), active);
        }
    }

    fn decode_round(&mut self, active: &mut Vec<Active>) {
        let c = &self.shared.counters;
        for a in active.iter_mut() {
            let job = &a.job.job;
            if job.cancel.load(Relaxed) || job.events.is_closed() {
                a.decoding.cancel();
            }
        }
        // Streams on the same version advance in one forward pass; each then only samples.
        let t = std::time::Instant::now();
        let mut streams: Vec<&mut Decoding> = active.iter_mut().map(|a| &mut a.decoding).collect();
        self.model.feed_batch(&mut streams);
        Counters::add(&c.decode_micros, t.elapsed().as_micros() as u64);
        for a in active.iter_mut() {
            let job = &a.job.job;
            if a.decoding.done {
                continue;
            }
            let t = std::time::Instant::now();
            match self.model.decode_step(&mut a.decoding) {
                Ok(piece) if !piece.is_empty() => {
                    let _ = job.events.send(EngineEvent::Text(piece));
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = job
                        .events
                        .send(EngineEvent::Failed(EngineError::Internal(format!("{e:#}"))));
                    a.decoding.cancel();
                }
            }
            Counters::add(&c.decode_micros, t.elapsed().as_micros() as u64);
        }
        let (done, still): (Vec<Active>, Vec<Active>) = std::mem::take(active)
            .into_iter()
            .partition(|a| a.decoding.done);
        *active = still;
        for a in done {
            Counters::add(&c.tokens_out, a.decoding.out.ids.len() as u64);
            let _ = a.job.job.events.send(EngineEvent::Finished {
                cached_tokens: a.decoding.cached_tokens,
                generation: a.decoding.out,
                prompt_ids: a.prompt_ids,
                adapter_version: a.version,
            });
        }
    }

    /// Renders and tokenizes the job's prompt, resolves its version and checks it fits; a
    /// failure is answered here.
    fn prepare(&self, q: Queued) -> Option<Prepared> {
        let job = &q.job;
        if job.cancel.load(Relaxed) || job.events.is_closed() {
            return None;
        }
        let fail = |e: EngineError| {
            let _ = job.events.send(EngineEvent::Failed(e));
        };
        let version = match job.version {
            VersionChoice::Live => self.shared.live_version.load(Relaxed),
            VersionChoice::Exactly(v) => v,
        };
        let Some(adapter) = self.adapter(version) else {
            fail(EngineError::UnknownVersion(version));
            return None;
        };
        let render = |suffix: &str| match &job.prompt {
            Prompt::Chat {
                messages,
                tools,
                reply_prefix,
            } => self.model.chat_prompt_continuing(
                messages,
                tools.as_ref(),
                &format!("{reply_prefix}{suffix}"),
            ),
            Prompt::Ids(ids) if suffix.is_empty() => Ok(ids.clone()),
            Prompt::Ids(_) => anyhow::bail!("options need a chat prompt"),
        };
        let prompt_ids = match render("") {
            Ok(ids) => ids,
            Err(e) => {
                fail(EngineError::BadRequest(format!("{e:#}")));
                return None;
            }
        };
        // Each option tokenized together with the prompt: its natural tokenization.
        let (needed, sequences) = match &job.task {
            Task::Generate { max_tokens, .. } => (*max_tokens, Vec::new()),
            Task::Choose { options } => match options.iter().map(|o| render(o)).collect() {
                Ok(seqs) => (0, seqs),
                Err(e) => {
                    fail(EngineError::BadRequest(format!("{e:#}")));
                    return None;
                }
            },
            Task::Score { continuation, .. } => (continuation.len(), Vec::new()),
        };
        let context_length = self.model.config.context_length;
        let longest = sequences.iter().map(Vec::len).max().unwrap_or(0);
        let total = prompt_ids.len().max(longest) + needed;
        if token_budget(context_length, prompt_ids.len().max(longest), needed).is_err()
            || (matches!(job.task, Task::Score { .. }) && total > context_length)
        {
            fail(EngineError::ContextTooLong {
                prompt_tokens: prompt_ids.len().max(longest),
                context_length,
            });
            return None;
        }
        let empty = match &job.task {
            Task::Choose { .. } => sequences.is_empty(),
            Task::Score { continuation, .. } => continuation.is_empty(),
            Task::Generate { .. } => false,
        };
        if empty {
            fail(EngineError::BadRequest(
                "nothing to choose from or score".into(),
            ));
            return None;
        }
        Some(Prepared {
            job: q,
            prompt_ids,
            sequences,
            version,
            adapter,
        })
    }

    /// Runs the rest of the prompt from `cached` (a KV cache of its first tokens, computed with
    /// the job's version): a generation joins `active`, a choice or a score is answered at once.
    fn start(&mut self, p: Prepared, cached: Option<KvCache>, active: &mut Vec<Active>) {
        let c = self.shared.counters.clone();
        let Prepared {
            job: queued,
            prompt_ids,
            sequences,
            version,
            adapter,
        } = p;
        let job = &queued.job;
        let fail = |e: EngineError| {
            let _ = job.events.send(EngineEvent::Failed(e));
        };
        Counters::add(&c.tokens_in, prompt_ids.len() as u64);
        let (max_tokens, sampling, stop, top_logprobs) = match &job.task {
            Task::Generate {
                max_tokens,
                sampling,
                stop,
                top_logprobs,
            } => (*max_tokens, *sampling, stop.clone(), *top_logprobs),
            Task::Choose { .. } => {
                match self.model.sequence_logprobs(&sequences, cached) {
                    Ok((logprobs, context, cache)) => {
                        let background = job.priority == Priority::Background;
                        self.cache_prompt(version, &context, &cache, background);
                        let _ = job.events.send(EngineEvent::Chosen { logprobs });
                    }
                    Err(e) => fail(EngineError::Internal(format!("{e:#}"))),
                }
                return;
            }
            Task::Score {
                continuation,
                distributions,
            } => {
                let scored = self.model.teacher_forced(
                    &prompt_ids,
                    continuation,
                    adapter.as_deref(),
                    cached,
                );
                match scored {
                    Ok(logits) => {
                        let dist = burn::tensor::activation::log_softmax(logits, 1);
                        let logprobs = clawrl_model::scoring::pick(dist.clone(), continuation);
                        let distributions = distributions.then_some(dist);
                        let _ = job.events.send(EngineEvent::Scored {
                            logprobs,
                            distributions,
                        });
                    }
                    Err(e) => fail(EngineError::Internal(format!("{e:#}"))),
                }
                return;
            }
        };
        let req = GenerateRequest {
            prompt_ids: prompt_ids.clone(),
            max_tokens,
            sampling,
            stop,
            top_logprobs,
        };
        let decoding = match self.model.start_decoding(&req, cached, adapter) {
            Ok(d) => d,
            Err(e) => return fail(EngineError::Internal(format!("{e:#}"))),
        };
        // After the prefill the cache holds exactly the prompt: keep it for later requests.
        let background = job.priority == Priority::Background;
        self.cache_prompt(version, &prompt_ids, &decoding.cache, background);
        Counters::add(&c.cached_tokens, decoding.cached_tokens as u64);
        let _ = job.events.send(EngineEvent::Admitted {
            prompt_ids: prompt_ids.clone(),
            cached_tokens: decoding.cached_tokens,
        });
        tracing::debug!(
            prompt = prompt_ids.len(),
            cached = decoding.cached_tokens,
            prefill_secs = decoding.out.prefill_secs,
            priority = ?job.priority,
            version,
            "admitted"
        );
        active.push(Active {
            job: queued,
            decoding,
            prompt_ids,
            version,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn background_is_owed_its_share_of_serving_time_and_nothing_without_demand() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut s = Share::new(0.2);
        s.last = t0;
        // 0.2 / 0.8 of serving time: 200 ms owed after 800 ms of serving.
        assert_eq!(s.pause(at(400), true, true), None);
        assert_eq!(
            s.pause(at(800), true, true),
            Some(Duration::from_millis(200))
        );
        s.paused(Duration::from_millis(200), at(1000));
        assert_eq!(s.pause(at(1400), true, true), None, "the pause paid it");
        // Idle serving owes nothing; no demand forgets what was owed.
        assert_eq!(s.pause(at(5000), false, true), None);
        assert_eq!(s.pause(at(5400), true, false), None);
        assert_eq!(s.pause(at(5800), true, true), None);
        // Long stretches are paid in pauses of at most MAX_SLICE.
        assert_eq!(s.pause(at(30_000), true, true), Some(MAX_SLICE));
        // Share 0: never.
        let mut off = Share::new(0.0);
        off.last = t0;
        assert_eq!(off.pause(at(60_000), true, true), None);
    }
}
