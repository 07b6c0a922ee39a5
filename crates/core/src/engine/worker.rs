//! The engine's thread: admits requests (prompt rendering, context check, prefix cache),
//! computes long prompts a chunk per round, runs one decode step per active request per
//! round, pauses for background work by its share, and applies adapter commands between
//! rounds.

use super::prefix_cache::PrefixCache;
use super::share::{POLL_IN_PAUSE, Share};
use super::*;

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
pub(super) fn run_engine(
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
        weight_bytes: model.transformer.weight_bytes(),
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
