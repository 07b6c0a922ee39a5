//! The trainer thread: waits until enough samples are ready (or the oldest has waited long
//! enough), computes the teacher's log-probs for hinted samples through the engine, runs one
//! micro-step per sample while no user request is being served, takes one optimizer step and
//! hands the result to the gate as a candidate version.
//!
//! Nothing here can refuse, delay or abort a request: the engine never waits for the trainer,
//! and the trainer waits for the engine between micro-steps (and between chunks of a long
//! prompt). An update interrupted by a pause, a change of the live version or a crash leaves
//! its samples untouched; they go into the next update.

use super::hints::{self, HintCandidate, HintChoice};
use super::loss::{LossConfig, Method, OpdForm, Signals, TopK};
use super::optimizer::{AdapterOptimizer, OptimizerConfig};
use super::policy::micro_step;
use crate::config::{Config, JudgeBackend, Teacher, TrainSection};
use crate::engine::{Engine, Prompt, Status};
use crate::events::{Event, EventBus, emit};
use crate::gate::{Candidate, Gate};
use crate::judge::teacher::hinted_messages;
use crate::store::PAUSED_SETTING;
use crate::store::{SampleRow, Store, TrainedSample, UpdateMetrics, now_ms};
use anyhow::{Result, bail};
use clawrl_model::{LoraAdapter, LoraConfig};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A hinted teacher's log-probs: of the sampled tokens, and of the student's top-K ids.
type TeacherLogps = (Vec<f32>, Option<Vec<f32>>);

/// Progress of the update being computed.
#[derive(Debug, Clone, Serialize, PartialEq)]

pub struct UpdateProgress {
    pub parent: i64,
    pub samples: usize,
    pub done: usize,
    pub mean_loss: f64,
}

/// What the trainer is doing, for `ctl status` and the screen.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TrainerStatus {
    /// starting | waiting | training | guarding | held | paused | stopped
    pub state: String,
    /// A sentence for humans.
    pub detail: String,
    pub samples_waiting: usize,
    pub update: Option<UpdateProgress>,
    /// Updates finished by this process.
    pub updates: usize,
    pub last_error: Option<String>,
}

/// The handle the server keeps: status, pause and resume (persisted across restarts), stop.
pub struct TrainerHandle {
    status: Mutex<TrainerStatus>,
    paused: AtomicBool,
    stop: AtomicBool,
    store: Mutex<Store>,
    bus: EventBus,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TrainerHandle {
    pub fn status(&self) -> TrainerStatus {
        lock(&self.status).clone()
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.paused.load(Relaxed)
    }

    /// Pauses training (at the next micro-step; the update in progress is set aside).
    /// Returns whether it was running.
    pub fn pause(&self) -> Result<bool> {
        self.set_paused(true)
    }

    /// Resumes training. Returns whether it was paused.
    pub fn resume(&self) -> Result<bool> {
        self.set_paused(false)
    }

    fn set_paused(&self, paused: bool) -> Result<bool> {
        lock(&self.store).set_setting(PAUSED_SETTING, if paused { "1" } else { "0" })?;
        let changed = self.paused.swap(paused, Relaxed) != paused;
        if changed {
            emit(
                &self.bus,
                if paused {
                    Event::TrainingPaused
                } else {
                    Event::TrainingResumed
                },
            );
        }
        Ok(changed)
    }

    /// Asks the thread to stop (at the next micro-step).
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
    }

    fn set(&self, f: impl FnOnce(&mut TrainerStatus)) {
        f(&mut lock(&self.status));
    }

    fn set_state(&self, state: &str, detail: impl Into<String>) {
        let detail = detail.into();
        self.set(|s| {
            s.state = state.into();
            s.detail = detail;
        });
    }
}

/// Why an update stopped before its end.
#[derive(Debug)]
enum Interrupted {
    Paused,
    Stopped,
    LiveChanged(i64),
}

struct Trainer {
    cfg: TrainSection,
    loss: LossConfig,
    optim: OptimizerConfig,
    lora: LoraConfig,
    engine: Engine,
    gate: Arc<Gate>,
    store: Store,
    handle: Arc<TrainerHandle>,
    bus: EventBus,
    /// With a judge, a turn whose next state arrived waits for its judgment (a rated one at most
    /// `train.max_wait_secs`).
    wait_for_judge: Option<i64>,
    /// The trainable adapter and the version its values are (reused while that one is live).
    optimizer: Option<(i64, AdapterOptimizer)>,
    last_waiting: Option<usize>,
    /// Client-internal context markers (never a hint).
    markers: Vec<String>,
    /// Rate-limits repeated log lines.
    log: crate::logging::Repeats,
    /// The replicas that compute the teacher's log-probs (`train.teacher_from = "upstream"`).
    teacher_upstream: Option<Arc<crate::upstream::Upstream>>,
}

/// A ready sample and its hint candidates.
struct Sample {
    row: SampleRow,
    hints: Vec<HintCandidate>,
}

/// What a sample distils from: the chosen teacher's log-probs of the sampled tokens, the
/// top-K target (the top-K form), and the record of the choice.
struct Distillation {
    teacher_logp: Vec<f32>,
    topk: Option<TopK>,
    choice: HintChoice,
}

/// Starts the trainer thread. Training starts paused if it was paused when the last process
/// stopped.
pub fn spawn(
    cfg: &Config,
    engine: Engine,
    gate: Arc<Gate>,
    bus: EventBus,
    upstream: Option<Arc<crate::upstream::Upstream>>,
) -> Result<Arc<TrainerHandle>> {
    let store = Store::open(&cfg.store_path())?;
    let paused = store.setting(PAUSED_SETTING)?.as_deref() == Some("1");
    let handle = Arc::new(TrainerHandle {
        status: Mutex::new(TrainerStatus {
            state: "starting".into(),
            detail: "waiting for the model to load".into(),
            samples_waiting: 0,
            update: None,
            updates: 0,
            last_error: None,
        }),
        paused: AtomicBool::new(paused),
        stop: AtomicBool::new(false),
        store: Mutex::new(Store::open(&cfg.store_path())?),
        bus: bus.clone(),
    });
    let t = &cfg.train;
    let trainer = Trainer {
        cfg: t.clone(),
        loss: LossConfig::from_config(t),
        optim: OptimizerConfig {
            learning_rate: t.learning_rate,
            weight_decay: t.weight_decay,
            beta1: t.betas[0],
            beta2: t.betas[1],
            epsilon: 1e-8,
            max_grad_norm: t.max_grad_norm,
            warmup_steps: t.warmup_updates,
        },
        lora: cfg.lora(),
        engine,
        gate,
        store,
        handle: handle.clone(),
        bus,
        wait_for_judge: (cfg.judge.backend != JudgeBackend::Off)
            .then_some(t.max_wait_secs as i64 * 1000),
        optimizer: None,
        last_waiting: None,
        markers: cfg.server.internal_context_markers.clone(),
        log: crate::logging::Repeats::new(Duration::from_secs(60)),
        teacher_upstream: upstream
            .filter(|_| t.teacher_from == crate::config::TeacherFrom::Upstream),
    };
    let pool = clawrl_model::background::low_priority_pool("clawrl-train")?;
    std::thread::Builder::new()
        .name("clawrl-trainer".into())
        .spawn(move || {
            clawrl_model::background::lower_priority();
            pool.install(|| trainer.run())
        })?;
    Ok(handle)
}

impl Trainer {
    fn run(mut self) {
        loop {
            match self.engine.status() {
                Status::Ready => break,
                Status::Failed(_) => {
                    return self.handle.set_state("stopped", "the model failed to load");
                }
                Status::Loading => std::thread::sleep(Duration::from_millis(200)),
            }
            if self.stopping() {
                return;
            }
        }
        let mut backoff = Duration::from_secs(2);
        while !self.stopping() {
            match self.tick() {
                Ok(true) => backoff = Duration::from_secs(2),
                Ok(false) => self.sleep(Duration::from_secs(1)),
                Err(e) => {
                    let error = format!("{e:#}");
                    tracing::warn!("training: {error}; retrying in {backoff:?}");
                    self.handle.set(|s| {
                        s.last_error = Some(error.clone());
                        s.update = None;
                    });
                    self.handle
                        .set_state("waiting", format!("the last update failed: {error}"));
                    emit(&self.bus, Event::TrainingFailed { error });
                    self.sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
        self.handle.set_state("stopped", "the server is stopping");
    }

    fn stopping(&self) -> bool {
        self.handle.stop.load(Relaxed)
    }

    /// Sleeps in small steps so that stop requests are seen quickly.
    fn sleep(&self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until && !self.stopping() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One look at the world; returns whether an update ran.
    fn tick(&mut self) -> Result<bool> {
        if self.handle.is_paused() {
            self.handle
                .set_state("paused", "training is paused (`ctl resume` resumes it)");
            return Ok(false);
        }
        // Under the manual policy every candidate waits for a decision, and training with it.
        // Under auto an undecided candidate is one the guard refused: it waits for you, but
        // training goes on from the live version (its samples stay with the refused one), so
        // one bad update does not stop learning from new conversations.
        if let Some(v) = self.gate.undecided()?
            && self.gate.policy() == crate::config::GatePolicy::Manual
        {
            self.handle.set_state(
                "held",
                format!(
                    "candidate v{v} waits for a decision (`ctl approve {v}` or `ctl veto {v}`)"
                ),
            );
            return Ok(false);
        }
        let live = self.engine.live_version();
        let samples = self.ready_samples(live)?;
        let waiting = samples.len();
        self.handle.set(|s| s.samples_waiting = waiting);
        if self.last_waiting != Some(waiting) {
            self.last_waiting = Some(waiting);
            emit(&self.bus, Event::SamplesWaiting { samples: waiting });
        }
        let oldest_wait_ms = samples
            .iter()
            .map(|s| now_ms() - s.row.signal_at)
            .max()
            .unwrap_or(0);
        let due = waiting >= self.cfg.min_samples
            || (waiting > 0 && oldest_wait_ms >= self.cfg.max_wait_secs as i64 * 1000);
        if !due {
            let detail = if waiting == 0 {
                "waiting for rated or judged turns".to_string()
            } else {
                let left = (self.cfg.max_wait_secs as i64 * 1000 - oldest_wait_ms).max(0) / 1000;
                format!(
                    "{waiting} sample(s) ready; an update starts at {} or in {left} s",
                    self.cfg.min_samples
                )
            };
            self.handle.set_state("waiting", detail);
            return Ok(false);
        }
        let batch: Vec<Sample> = samples.into_iter().take(self.cfg.max_samples).collect();
        let rewards = self.loss.rewards(
            &batch
                .iter()
                .map(|s| s.row.reward.map(f32::from))
                .collect::<Vec<_>>(),
        );
        // Every reply rated down and no hint the method uses: nothing to move toward
        // (balanced_rewards). Set them aside rather than make a version of nothing.
        let moves = batch
            .iter()
            .zip(&rewards)
            .any(|(s, r)| self.loss.moves(*r, !s.hints.is_empty()));
        if !moves {
            let why = "rated down with none rated up beside it and no hint: nothing to move toward";
            let dropped: Vec<(i64, String)> = batch
                .iter()
                .map(|s| (s.row.turn_id, why.to_string()))
                .collect();
            if let Some(held_back) = self.log.fresh(why) {
                tracing::info!(
                    count = dropped.len(),
                    "samples set aside: {why} ({held_back} more such lines held back)"
                );
            }
            self.store.drop_samples(&dropped, now_ms())?;
            emit(
                &self.bus,
                Event::SamplesSetAside {
                    samples: dropped.len(),
                    reason: why.to_string(),
                },
            );
            return Ok(false);
        }
        self.handle
            .set(|s| s.samples_waiting = waiting - batch.len());
        match self.update(live, batch, rewards) {
            Ok(()) => Ok(true),
            Err(e) => match e.downcast_ref::<InterruptedError>() {
                Some(InterruptedError(why)) => {
                    tracing::info!("update set aside: {why:?}");
                    self.handle.set(|s| s.update = None);
                    if let Interrupted::LiveChanged(v) = why {
                        tracing::info!(
                            live = v,
                            "the live version changed; training restarts from it"
                        );
                        self.optimizer = None;
                    }
                    Ok(false)
                }
                None => Err(e),
            },
        }
    }

    /// Ready samples the method can use, with their hint candidates; stale or malformed ones
    /// are set aside for good.
    fn ready_samples(&mut self, live: i64) -> Result<Vec<Sample>> {
        let rows = self
            .store
            .ready_samples(self.wait_for_judge, 50 * self.cfg.max_samples)?;
        let mut keep = Vec::new();
        let mut dropped = Vec::new();
        for r in rows {
            let hints = hints::candidates(
                r.hint.as_deref(),
                &r.next_state,
                r.next_state_role.as_deref(),
                r.reward,
                &self.markers,
            );
            if r.response_ids.is_empty()
                || r.logprobs.len() != r.response_ids.len()
                || r.prompt_ids.is_empty()
            {
                dropped.push((
                    r.turn_id,
                    "malformed: no response or mismatched log-probs".to_string(),
                ));
            } else if (live - r.adapter_version).abs() > self.cfg.max_staleness {
                dropped.push((
                    r.turn_id,
                    format!(
                        "stale: written by v{}, live v{live} (train.max_staleness {})",
                        r.adapter_version, self.cfg.max_staleness
                    ),
                ));
            } else if !self.loss.moves(r.reward.map(f32::from), !hints.is_empty()) {
                dropped.push((
                    r.turn_id,
                    format!("no signal for train.method {:?}", self.cfg.method),
                ));
            } else {
                keep.push(Sample { row: r, hints });
            }
        }
        if !dropped.is_empty() {
            if let Some(held_back) = self.log.fresh("samples set aside") {
                tracing::info!(
                    count = dropped.len(),
                    "samples set aside ({held_back} more such lines held back)"
                );
            }
            self.store.drop_samples(&dropped, now_ms())?;
        }
        Ok(keep)
    }

    /// Waits while a user request is being served, then checks that the update may go on.
    fn yield_to_serving(&self, parent: i64) -> Result<()> {
        while self.engine.serving_busy() && !self.stopping() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let why = if self.stopping() {
            Some(Interrupted::Stopped)
        } else if self.handle.is_paused() {
            Some(Interrupted::Paused)
        } else if self.engine.live_version() != parent {
            Some(Interrupted::LiveChanged(self.engine.live_version()))
        } else {
            None
        };
        match why {
            Some(w) => Err(InterruptedError(w).into()),
            None => Ok(()),
        }
    }

    /// One update from `parent` on `batch`, whose rewards the RL term uses as `rewards`.
    fn update(&mut self, parent: i64, batch: Vec<Sample>, rewards: Vec<Option<f32>>) -> Result<()> {
        let started = Instant::now();
        let model = match self.engine.model() {
            Some(m) => m,
            None => bail!("the model is not loaded"),
        };
        let hints = batch.iter().filter(|s| !s.hints.is_empty()).count();
        let n = batch.len();
        emit(
            &self.bus,
            Event::TrainingStarted {
                parent,
                samples: n,
                hints,
            },
        );
        self.handle.set(|s| {
            s.update = Some(UpdateProgress {
                parent,
                samples: n,
                done: 0,
                mean_loss: 0.0,
            })
        });
        self.handle.set_state(
            "training",
            format!("training on {n} sample(s) from v{parent}"),
        );
        let mut optimizer = match self.optimizer.take() {
            Some((v, o)) if v == parent => o,
            _ => {
                let start = match self.gate.adapter(parent)? {
                    Some(a) => a,
                    None => LoraAdapter::init(
                        &model.config,
                        self.lora.clone(),
                        &model.transformer.device(),
                        self.cfg.seed,
                    ),
                };
                AdapterOptimizer::new(&start, self.optim.clone())
            }
        };
        // While it trains, the serving engine pauses for it in slices (engine.background_share).
        let demand = clawrl_model::background::Demand::hold();
        let result = self.train(&model, &mut optimizer, parent, &batch, rewards, started);
        drop(demand);
        match result {
            Ok(candidate) => {
                self.handle
                    .set_state("guarding", "the regression guard scores the candidate");
                let row = self.gate.propose(candidate)?;
                self.optimizer = Some((row.id, optimizer));
                self.handle.set(|s| {
                    s.updates += 1;
                    s.update = None;
                    s.last_error = None;
                });
                Ok(())
            }
            Err(e) => {
                optimizer.discard();
                // The optimizer's values are still `parent`'s: keep it for the next try.
                self.optimizer = Some((parent, optimizer));
                Err(e)
            }
        }
    }

    fn train(
        &self,
        model: &clawrl_model::LoadedModel,
        optimizer: &mut AdapterOptimizer,
        parent: i64,
        batch: &[Sample],
        rewards: Vec<Option<f32>>,
        started: Instant,
    ) -> Result<Candidate> {
        let n = batch.len();
        let max = self.cfg.max_response_tokens;
        let (mut loss_sum, mut drift_sum, mut tokens) = (0f64, 0f64, 0usize);
        let mut used = Vec::with_capacity(n);
        // Each sample's reward as the RL term used it and whether it had a teacher.
        let mut carried = Vec::with_capacity(n);
        for ((i, sample), reward) in batch.iter().enumerate().zip(rewards) {
            let s = &sample.row;
            self.yield_to_serving(parent)?;
            let response = &s.response_ids[..s.response_ids.len().min(max)];
            let logp_old = s.logprobs[..response.len()].to_vec();
            let distilled = match self.loss.method {
                Method::Rl => None,
                _ => self.distillation(sample, response, parent, &model.tokenizer.stop_ids),
            };
            carried.push((reward, distilled.is_some()));
            let (teacher_logp, topk, hint_choice) = match distilled {
                Some(d) => (Some(d.teacher_logp), d.topk, Some(d.choice)),
                None => (None, None, None),
            };
            if let Some(c) = &hint_choice {
                let chosen = c.chosen();
                emit(
                    &self.bus,
                    Event::HintChosen {
                        turn_id: s.turn_id,
                        source: chosen.source,
                        hint: chosen.text.clone(),
                        overlap: chosen.overlap,
                        candidates: c.candidates.len(),
                    },
                );
            }
            let signals = Signals {
                logp_old,
                reward,
                teacher_logp,
                topk,
            };
            self.yield_to_serving(parent)?;
            let m = micro_step(
                &model.transformer,
                optimizer,
                &self.loss,
                &s.prompt_ids,
                response,
                &signals,
                self.cfg.grad_context_tokens,
                1.0 / n as f64,
                &|| {
                    while self.engine.serving_busy() && !self.stopping() {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                },
            );
            loss_sum += m.loss;
            drift_sum += m.drift;
            tokens += m.tokens;
            used.push(TrainedSample {
                turn_id: s.turn_id,
                reward: s.reward.map(f64::from),
                hint_choice: hint_choice.map(|c| serde_json::to_value(c).unwrap_or_default()),
            });
            let done = i + 1;
            self.handle.set(|st| {
                if let Some(u) = st.update.as_mut() {
                    u.done = done;
                    u.mean_loss = loss_sum / done as f64;
                }
            });
            emit(
                &self.bus,
                Event::TrainingStep {
                    done,
                    samples: n,
                    loss: m.loss,
                    kl: m.drift,
                },
            );
        }
        self.yield_to_serving(parent)?;
        let step = optimizer.step(self.loss.step_scale(&carried));
        clawrl_model::failpoint::crash("train.step");
        // The mean of the rewards as given (not as balanced), for the version's record.
        let given: Vec<f64> = batch
            .iter()
            .filter_map(|s| s.row.reward.map(f64::from))
            .collect();
        Ok(Candidate {
            adapter: optimizer.snapshot(),
            parent,
            metrics: UpdateMetrics {
                samples: used.len(),
                tokens,
                loss: loss_sum / n as f64,
                drift: drift_sum / n as f64,
                grad_norm: step.grad_norm,
                mean_reward: (!given.is_empty())
                    .then(|| given.iter().sum::<f64>() / given.len() as f64),
                hints: carried.iter().filter(|(_, hint)| *hint).count(),
                train_secs: started.elapsed().as_secs_f64(),
                learning_rate: Some(step.learning_rate),
            },
            samples: used,
        })
    }

    /// The sample's distillation target (PIPELINE.md §3, §4b): its hint candidates' teachers
    /// scored by the engine, one chosen by `train.hint_selection`, and with the top-K form the
    /// sampling policy's top-K tokens at each position with both sides' log-probs. `None` (no
    /// distillation signal) when no candidate's teacher can be computed.
    /// `stop_ids` (the end-of-turn tokens) join S_t under `train.topk_end_of_turn`.
    fn distillation(
        &self,
        sample: &Sample,
        response: &[u32],
        live: i64,
        stop_ids: &[u32],
    ) -> Option<Distillation> {
        let s = &sample.row;
        let mut candidates = sample.hints.clone();
        let rule = self.cfg.hint_selection;
        let unscored = hints::pick_unscored(rule, &candidates);
        if candidates.is_empty() {
            return None;
        }
        let k = self.cfg.topk;
        // S^q: the top-K of the version the update starts from, for the top-K form and for
        // choosing: the one that sampled the reply, or one at most train.max_staleness newer
        // (the engine keeps only the live version's adapter; the sampled token's own ℓ_old
        // stays the one recorded when it was sampled).
        let student = if self.cfg.opd == OpdForm::Topk || unscored.is_none() {
            let scored = self.engine.score_blocking(
                Prompt::Ids(s.prompt_ids.clone()),
                response.to_vec(),
                live,
                true,
            );
            match scored {
                Ok((_, Some(dist))) => {
                    let [_, vocab] = dist.dims();
                    let dist = values(dist);
                    let always = if self.cfg.topk_end_of_turn {
                        stop_ids
                    } else {
                        &[]
                    };
                    let (ids, old) = TopK::select_with(&dist, vocab, k, always);
                    let width = ids.len() / response.len();
                    Some((ids, old, vocab, width))
                }
                Ok((_, None)) => None,
                Err(e) => {
                    tracing::info!(
                        turn = s.turn_id,
                        version = live,
                        "no top-K of the policy (the sampled-token form instead): {e}"
                    );
                    None
                }
            }
        } else {
            None
        };
        let version = match self.cfg.teacher {
            Teacher::Base => 0,
            Teacher::Policy => live,
        };
        // The student's own top-K, each row's first K of S^q, for the overlap.
        let student_topk: Option<Vec<u32>> = student.as_ref().map(|(ids, _, _, width)| {
            ids.chunks_exact(*width)
                .flat_map(|row| row[..k.min(*width)].iter().copied())
                .collect()
        });
        // Each candidate's teacher: (its log-probs of the sampled tokens, of S^q).
        let mut teachers: Vec<Option<TeacherLogps>> = vec![None; candidates.len()];
        let to_score: Vec<usize> = match (unscored, &student) {
            (Some(i), _) => vec![i],
            (None, Some(_)) => (0..candidates.len()).collect(),
            // No student top-K to choose by: the first.
            (None, None) => vec![0],
        };
        for i in to_score {
            let hinted = match hinted_messages(
                &s.request_messages,
                &candidates[i].text,
                self.cfg.hint_placement,
            ) {
                Ok(m) => m,
                Err(e) => {
                    candidates[i].error = Some(format!("{e:#}"));
                    continue;
                }
            };
            if let Some(up) = &self.teacher_upstream {
                match self.score_upstream(up, &hinted, s, response, version) {
                    Ok((lp, replica)) => {
                        candidates[i].scored_by = Some(replica);
                        teachers[i] = Some((lp, None));
                    }
                    Err(e) => candidates[i].error = Some(format!("{e:#}")),
                }
                continue;
            }
            let prompt = Prompt::chat(hinted, s.tools.clone());
            let scored =
                self.engine
                    .score_blocking(prompt, response.to_vec(), version, student.is_some());
            match scored {
                Ok((lp, dist)) if lp.len() == response.len() => {
                    let at_student = match (&student, &student_topk, dist) {
                        (Some((ids, _, vocab, width)), Some(student_topk), Some(dist)) => {
                            let dist = values(dist);
                            let (teacher_ids, _) = TopK::select(&dist, *vocab, k);
                            let overlap = TopK::overlap(student_topk, &teacher_ids, k);
                            candidates[i].overlap = Some(overlap as f64 / response.len() as f64);
                            Some(TopK::gather(&dist, *vocab, ids, *width))
                        }
                        _ => None,
                    };
                    teachers[i] = Some((lp, at_student));
                }
                Ok(_) => candidates[i].error = Some("the teacher scored another length".into()),
                Err(e) => candidates[i].error = Some(e.to_string()),
            }
        }
        let chosen = match unscored {
            Some(i) => i,
            None => hints::pick_by_overlap(&candidates)
                .or_else(|| teachers.iter().position(Option::is_some))?,
        };
        let Some((teacher_logp, at_student)) = teachers[chosen].take() else {
            tracing::info!(
                turn = s.turn_id,
                "no teacher log-probs: {}",
                candidates[chosen].error.as_deref().unwrap_or("unknown")
            );
            return None;
        };
        let topk = match (self.cfg.opd, student, at_student) {
            (OpdForm::Topk, Some((ids, old, _, width)), Some(teacher)) => Some(TopK {
                k: width,
                ids,
                old,
                teacher,
            }),
            _ => None,
        };
        Some(Distillation {
            teacher_logp,
            topk,
            choice: HintChoice {
                rule,
                placement: self.cfg.hint_placement,
                chosen,
                k,
                candidates,
            },
        })
    }
}

impl Trainer {
    /// The teacher's log-probs of `response` after the hinted messages, computed by a replica
    /// (the chat template rendered here, as for serving); with the replica's URL.
    fn score_upstream(
        &self,
        up: &crate::upstream::Upstream,
        hinted: &[clawrl_model::messages::Message],
        s: &SampleRow,
        response: &[u32],
        version: i64,
    ) -> Result<(Vec<f32>, String)> {
        let model = self
            .engine
            .model()
            .ok_or_else(|| anyhow::anyhow!("the model is not loaded"))?;
        let prompt = model.chat_prompt(hinted, s.tools.as_ref())?;
        let (lp, replica) = up.score(&prompt, response, version)?;
        anyhow::ensure!(
            lp.len() == response.len(),
            "the teacher scored another length"
        );
        Ok((lp, replica))
    }
}

/// A tensor's values (on the host).
fn values(t: burn::tensor::Tensor<2>) -> Vec<f32> {
    t.into_data().try_into_vec_as::<f32>().expect("f32 data")
}

/// An update set aside (not a failure).
#[derive(Debug)]
struct InterruptedError(Interrupted);

impl std::fmt::Display for InterruptedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "update interrupted: {:?}", self.0)
    }
}

impl std::error::Error for InterruptedError {}
