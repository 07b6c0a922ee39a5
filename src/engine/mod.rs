//! The engine: owns the model on its own thread; everything else talks to it through channels.
//!
//! Scheduling is round-robin interleaving: each admitted request gets one decode step per
//! round, so none starves; a new request's prompt is computed between rounds (reusing the
//! prefix cache). A bounded queue in front answers "overloaded" instead of growing.

pub mod prefix_cache;

use crate::model::KvCache;
use crate::model::generate::{Decoding, token_budget};
use crate::model::{GenerateRequest, Generation, LoadOptions, LoadedModel, SamplingParams};
use crate::telemetry::Counters;
use prefix_cache::PrefixCache;
use serde_json::Value;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, RwLock};
use tokio::sync::mpsc::UnboundedSender;

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
    pub tokenizer: Arc<crate::model::tokenizer::Tokenizer>,
}

/// Who is waiting: user requests always go first; background work (the judge) runs only
/// while no user request is generating or waiting, so it never slows serving down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    User,
    Background,
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
}

/// A chat for the engine.
pub struct Job {
    pub messages: Vec<Value>,
    pub tools: Option<Value>,
    /// Text the reply starts with, appended after the chat template's generation prompt.
    pub reply_prefix: String,
    pub task: Task,
    pub priority: Priority,
    pub events: UnboundedSender<EngineEvent>,
    /// Set by the server when the client goes away.
    pub cancel: Arc<AtomicBool>,
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
    Failed(EngineError),
}

#[derive(Debug, Clone, PartialEq)]
pub enum EngineError {
    ContextTooLong {
        prompt_tokens: usize,
        context_length: usize,
    },
    /// The request cannot be rendered (e.g. the chat template rejects it).
    BadRequest(String),
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
    counters: Arc<Counters>,
    max_queue: usize,
}

/// A cheap, cloneable handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: Sender<Job>,
    shared: Arc<Shared>,
}

impl Engine {
    /// Starts the engine thread; the model loads in the background (`status()` says when).
    pub fn start(
        config: EngineConfig,
        counters: Arc<Counters>,
        on_ready: impl FnOnce(&ModelInfo) + Send + 'static,
    ) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            status: RwLock::new(Status::Loading),
            info: RwLock::new(None),
            counters,
            max_queue: config.max_queue,
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("clawrl-engine".into())
            .spawn(move || {
                let model = match LoadedModel::load(&config.model_path, &config.load) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::error!("model failed to load: {e:#}");
                        *s.status.write().unwrap() = Status::Failed(format!("{e:#}"));
                        return;
                    }
                };
                let info = ModelInfo {
                    name: model.name.clone(),
                    context_length: model.config.context_length,
                    summary: model.summary(),
                    tokenizer: model.tokenizer.clone(),
                };
                tracing::info!("engine ready: {}", info.summary);
                *s.info.write().unwrap() = Some(info.clone());
                *s.status.write().unwrap() = Status::Ready;
                on_ready(&info);
                Worker {
                    model,
                    prefix: PrefixCache::new(
                        config.prefix_cache_bytes,
                        config.prefix_cache_min_tokens,
                    ),
                    shared: s,
                    max_active: config.max_active.max(1),
                }
                .run(rx);
            })
            .expect("spawn engine thread");
        Self { tx, shared }
    }

    pub fn status(&self) -> Status {
        self.shared.status.read().unwrap().clone()
    }

    pub fn info(&self) -> Option<ModelInfo> {
        self.shared.info.read().unwrap().clone()
    }

    /// Queues a job, or refuses a user job when the queue is full (background jobs wait
    /// without a bound: their submitter limits how many it has outstanding).
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if self.status() != Status::Ready {
            return Err(SubmitError::Unavailable);
        }
        if job.priority == Priority::Background {
            return self.tx.send(job).map_err(|_| SubmitError::Unavailable);
        }
        let c = &self.shared.counters;
        // Reserve a queue slot first so concurrent submits cannot overshoot the bound.
        let before = c.queue_depth.fetch_add(1, Relaxed);
        if before as usize >= self.shared.max_queue {
            c.queue_depth.fetch_sub(1, Relaxed);
            return Err(SubmitError::Overloaded);
        }
        self.tx.send(job).map_err(|_| {
            c.queue_depth.fetch_sub(1, Relaxed);
            SubmitError::Unavailable
        })
    }
}

struct Active {
    job: Job,
    decoding: Decoding,
    prompt_ids: Vec<u32>,
}

struct Worker {
    model: LoadedModel,
    prefix: PrefixCache,
    shared: Arc<Shared>,
    max_active: usize,
}

/// A job whose prompt is rendered, tokenized and checked against the context.
struct Prepared {
    job: Job,
    prompt_ids: Vec<u32>,
    /// For a [`Task::Choose`]: prompt + each option, tokenized as a whole.
    sequences: Vec<Vec<u32>>,
}

impl Prepared {
    /// The tokens whose KV cache the job starts from (a prefix-cache key).
    fn cache_key(&self) -> &[u32] {
        self.sequences.first().unwrap_or(&self.prompt_ids)
    }
}

/// A background job whose prompt is computed a chunk per round, only while no user request
/// waits: a user request arriving meanwhile waits for one chunk, not a whole judge prompt.
struct Warming {
    prepared: Prepared,
    cache: KvCache,
}

/// Tokens of a background prompt computed per round.
const BACKGROUND_CHUNK: usize = 64;

impl Worker {
    fn run(mut self, rx: Receiver<Job>) {
        let (mut waiting_user, mut waiting_bg) = (VecDeque::new(), VecDeque::new());
        let (mut user, mut bg): (Vec<Active>, Vec<Active>) = (Vec::new(), Vec::new());
        let mut warming: Option<Warming> = None;
        let mut open = true;
        let enqueue = |job: Job, wu: &mut VecDeque<Job>, wb: &mut VecDeque<Job>| match job.priority
        {
            Priority::User => wu.push_back(job),
            Priority::Background => wb.push_back(job),
        };
        loop {
            let idle = user.is_empty() && bg.is_empty() && warming.is_none();
            // Block only when there is nothing at all to do.
            if idle && waiting_user.is_empty() && waiting_bg.is_empty() {
                if !open {
                    break;
                }
                match rx.recv() {
                    Ok(job) => enqueue(job, &mut waiting_user, &mut waiting_bg),
                    Err(_) => break,
                }
            }
            while open {
                match rx.try_recv() {
                    Ok(job) => enqueue(job, &mut waiting_user, &mut waiting_bg),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            while user.len() < self.max_active
                && let Some(job) = waiting_user.pop_front()
            {
                self.shared.counters.queue_depth.fetch_sub(1, Relaxed);
                if let Some(p) = self.prepare(job) {
                    let cached = self.prefix.lookup(p.cache_key());
                    self.start(p, cached, &mut user);
                }
            }
            // Background work: only while no user request waits or generates.
            if user.is_empty() && waiting_user.is_empty() {
                self.warm(&mut warming, &mut waiting_bg, &mut bg);
            }
            // One round: a token for every active user request, or else for background ones.
            let round = if user.is_empty() { &mut bg } else { &mut user };
            self.decode_round(round);
            self.shared
                .counters
                .active_sequences
                .store(user.len() as u64, Relaxed);
        }
        tracing::info!("engine stopped");
    }

    /// Advances the background prompt being computed by one chunk, starting the next
    /// background job when there is none; a finished prompt starts its job.
    fn warm(
        &mut self,
        warming: &mut Option<Warming>,
        waiting: &mut VecDeque<Job>,
        active: &mut Vec<Active>,
    ) {
        if warming.is_none() && active.len() < self.max_active {
            while let Some(job) = waiting.pop_front() {
                if let Some(prepared) = self.prepare(job) {
                    let cache = self
                        .prefix
                        .lookup(prepared.cache_key())
                        .unwrap_or_else(|| self.model.transformer.new_cache());
                    *warming = Some(Warming { prepared, cache });
                    break;
                }
            }
        }
        let Some(w) = warming.as_mut() else { return };
        // The last prompt token is computed when the job starts: its logits are needed.
        let target = w.prepared.cache_key().len() - 1;
        if w.prepared.job.cancel.load(Relaxed) || w.prepared.job.events.is_closed() {
            *warming = None;
            return;
        }
        if w.cache.len() < target {
            let upto = (w.cache.len() + BACKGROUND_CHUNK).min(target);
            let ids = &w.prepared.cache_key()[w.cache.len()..upto];
            self.model.extend_cache(ids, &mut w.cache);
        }
        if w.cache.len() >= target {
            let w = warming.take().expect("checked above");
            self.start(w.prepared, Some(w.cache), active);
        }
    }

    fn decode_round(&mut self, active: &mut Vec<Active>) {
        let c = &self.shared.counters;
        for a in active.iter_mut() {
            if a.job.cancel.load(Relaxed) || a.job.events.is_closed() {
                a.decoding.cancel();
                continue;
            }
            let t = std::time::Instant::now();
            match self.model.decode_step(&mut a.decoding) {
                Ok(piece) if !piece.is_empty() => {
                    let _ = a.job.events.send(EngineEvent::Text(piece));
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = a
                        .job
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
            let _ = a.job.events.send(EngineEvent::Finished {
                cached_tokens: a.decoding.cached_tokens,
                generation: a.decoding.out,
                prompt_ids: a.prompt_ids,
                adapter_version: 0,
            });
        }
    }

    /// Renders and tokenizes the job's prompt and checks it fits; a failure is answered here.
    fn prepare(&self, job: Job) -> Option<Prepared> {
        if job.cancel.load(Relaxed) || job.events.is_closed() {
            return None;
        }
        let fail = |e: EngineError| {
            let _ = job.events.send(EngineEvent::Failed(e));
        };
        let render = |suffix: &str| {
            self.model.chat_prompt_continuing(
                &job.messages,
                job.tools.as_ref(),
                &format!("{}{suffix}", job.reply_prefix),
            )
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
        };
        let context_length = self.model.config.context_length;
        let longest = sequences.iter().map(Vec::len).max().unwrap_or(0);
        if token_budget(context_length, prompt_ids.len().max(longest), needed).is_err() {
            fail(EngineError::ContextTooLong {
                prompt_tokens: prompt_ids.len().max(longest),
                context_length,
            });
            return None;
        }
        if matches!(job.task, Task::Choose { .. }) && sequences.is_empty() {
            fail(EngineError::BadRequest("no options to choose from".into()));
            return None;
        }
        Some(Prepared {
            job,
            prompt_ids,
            sequences,
        })
    }

    /// Runs the rest of the prompt from `cached` (a KV cache of its first tokens): a
    /// generation joins `active`, a choice is answered at once.
    fn start(&mut self, p: Prepared, cached: Option<KvCache>, active: &mut Vec<Active>) {
        let c = self.shared.counters.clone();
        let Prepared {
            job,
            prompt_ids,
            sequences,
        } = p;
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
                        self.prefix.insert(&context, &cache);
                        let _ = job.events.send(EngineEvent::Chosen { logprobs });
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
        let decoding = match self.model.start_decoding(&req, cached) {
            Ok(d) => d,
            Err(e) => return fail(EngineError::Internal(format!("{e:#}"))),
        };
        // After the prefill the cache holds exactly the prompt: keep it for later requests.
        self.prefix.insert(&prompt_ids, &decoding.cache);
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
            "admitted"
        );
        active.push(Active {
            job,
            decoding,
            prompt_ids,
        });
    }
}
