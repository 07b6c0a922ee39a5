//! clawrl's core: everything between the model and the faces (the HTTP server, the screen,
//! the CLI). Built from the configuration by [`build`], it serves through the engine,
//! captures every turn into the store, has the judge vote on it, trains LoRA updates in the
//! background and gates each new version. docs/ARCHITECTURE.md draws how the modules fit.
//!
//! # Public API
//! - [`build`] a [`Core`] from a [`config::Config`] ([`config::Config::load`] layers the files,
//!   the environment and the flags); [`Core::start_background`] runs the judge, the idle-session
//!   closer and the engine watchdog.
//! - What a face may do: [`chat::start`] a chat turn (served, captured, judged, trained on);
//!   [`Core::rate`], [`Core::approve`], [`Core::veto`], [`Core::rollback`],
//!   [`Core::set_training_paused`]; read [`Core::versions`], [`Core::live_version`],
//!   [`Core::training`], [`Core::judge_pending`]; or send [`commands::Command`]s.
//! - For a control plane in front: [`completion::complete`] a raw completion (nothing
//!   captured), [`Core::load_named_adapter`] / [`Core::unload_named_adapter`].
//! - What a face may watch: [`events::Event`]s on `core.bus`, the counters in [`telemetry`],
//!   and the history in [`store::Store`] (`open_read_only`, `snapshot`, `export`).

pub mod capture;
pub mod catalog;
pub mod chat;
pub mod commands;
pub mod completion;
pub mod config;
pub mod engine;
pub mod events;
pub mod gate;
pub mod http_client;
pub mod judge;
pub mod logging;
pub mod store;
pub mod telemetry;
pub mod tool_calls;
pub mod train;
pub mod upstream;

use crate::capture::Capture;
use crate::config::Config;
use crate::config::GenerationSection;
use crate::engine::{
    Engine, EngineConfig, EngineError, EngineEvent, Job, Priority, Prompt, SubmitError, Task,
};
use crate::events::EventBus;
use crate::events::{Event, emit};
use crate::gate::{Gate, GateError};
use crate::store::{FeedbackError, FeedbackRecorded, TurnRef, VersionRow};
use crate::telemetry::Counters;
use crate::train::TrainerStatus;
use anyhow::Result;
use clawrl_model::LoadedModel;
use std::sync::Arc;
use std::time::Duration;

/// The id clients use for the served model: configured, else its catalog id, else its file name.
pub fn model_id(cfg: &Config) -> String {
    if !cfg.server.model_id.is_empty() {
        return cfg.server.model_id.clone();
    }
    let spec = if cfg.model.path.is_empty() {
        &cfg.model.default
    } else {
        &cfg.model.path
    };
    if let Some(m) = catalog::find(spec) {
        return m.id.to_string();
    }
    let p = std::path::Path::new(spec);
    // A catalog model addressed by its path keeps its catalog id.
    if let Some(m) = catalog::CATALOG
        .iter()
        .find(|m| p.file_name().is_some_and(|f| f == m.file_name))
    {
        return m.id.to_string();
    }
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| spec.clone())
}

/// The policy's model, loaded outside an engine (`generate`, `chat`, the benchmarks).
pub fn load_model(cfg: &Config) -> Result<LoadedModel> {
    let (path, opts) = (cfg.model_path()?, cfg.load_options()?);
    tracing::info!(path = %path.display(), ?opts, "loading model");
    LoadedModel::load(&path, &opts)
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The id clients name in `model` (and `/v1/models` lists).
    pub model_id: String,
    /// Other names accepted in `model` (e.g. the checkpoint's own name).
    pub model_aliases: Vec<String>,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    pub generation: GenerationSection,
    pub session_idle: Duration,
    /// How long a client may take to send headers, then body.
    pub read_timeout: Duration,
    pub max_connections: usize,
    /// Browser origins allowed to call the API (`*`: any).
    pub allowed_origins: Vec<String>,
}

/// The core: everything that serves, captures, judges, trains and decides, shared by the HTTP
/// server and the screen (neither reaches past it into the engine or the model).
pub struct Core {
    pub config: ServerConfig,
    pub engine: Engine,
    pub capture: Arc<Capture>,
    /// The background judge (`None` when `judge.backend = "off"`); `serve` runs it.
    pub(crate) judge: Option<Arc<crate::judge::Judge>>,
    /// Versions: candidates, approve / veto / rollback.
    pub(crate) gate: Arc<crate::gate::Gate>,
    /// The training thread (`None` when `train.enabled = false`).
    pub(crate) trainer: Option<Arc<crate::train::TrainerHandle>>,
    pub bus: EventBus,
    pub counters: Arc<Counters>,
    /// Why serving stopped for good (the engine failed), once the watchdog has reported it.
    pub failure: tokio::sync::watch::Sender<Option<String>>,
    /// Adapters loaded by name at run time (`completion`: the vLLM-compatible subset).
    pub named_adapters: completion::NamedAdapters,
    /// The replicas that generate user requests (`serving.backend = "upstream"`).
    pub upstream: Option<Arc<upstream::Upstream>>,
    store_path: std::path::PathBuf,
}

impl Core {
    /// Queues a job: a user's generation goes to an upstream replica when there are any
    /// (`upstream`), everything else to the local engine. `conversation` keeps a
    /// conversation on one replica.
    pub fn submit(&self, mut job: Job, conversation: &str) -> Result<(), SubmitError> {
        let to_upstream =
            job.priority == Priority::User && matches!(job.task, Task::Generate { .. });
        let Some(up) = self.upstream.as_ref().filter(|_| to_upstream) else {
            return self.engine.submit(job);
        };
        let model = self
            .engine
            .model()
            .filter(|_| up.is_ready())
            .ok_or(SubmitError::Unavailable)?;
        let fail = |e: EngineError| {
            let _ = job.events.send(EngineEvent::Failed(e));
            Ok(())
        };
        let ids = match &job.prompt {
            Prompt::Chat {
                messages,
                tools,
                reply_prefix,
            } => match model.chat_prompt_continuing(messages, tools.as_ref(), reply_prefix) {
                Ok(ids) => ids,
                Err(e) => return fail(EngineError::BadRequest(format!("{e:#}"))),
            },
            Prompt::Ids(ids) => ids.clone(),
        };
        let context_length = model.config.context_length;
        if ids.len() >= context_length {
            return fail(EngineError::ContextTooLong {
                prompt_tokens: ids.len(),
                context_length,
            });
        }
        // As the local engine does: the reply gets what the context has left.
        if let Task::Generate { max_tokens, .. } = &mut job.task {
            *max_tokens = (*max_tokens).min(context_length - ids.len());
        }
        let (up, key) = (up.clone(), conversation.to_string());
        tokio::spawn(async move { up.generate(job, ids, key).await });
        Ok(())
    }

    pub fn serves_model(&self, m: &str) -> bool {
        m == self.config.model_id
            || self.config.model_aliases.iter().any(|a| a == m)
            || self.engine.info().is_some_and(|i| i.name == m)
    }

    /// Records a human rating for a turn (it overrides the judge's score for training) and
    /// publishes it. Blocking (the store).
    pub fn rate(
        &self,
        turn: &TurnRef,
        rating: i8,
        comment: Option<&str>,
        source: &str,
    ) -> Result<FeedbackRecorded, FeedbackError> {
        let recorded = self
            .capture
            .record_feedback(turn, rating, comment, source)?;
        Counters::add(&self.counters.feedback, 1);
        emit(
            &self.bus,
            Event::FeedbackRecorded {
                turn_id: recorded.turn_id,
                session_id: recorded.session_id.clone(),
                rating: recorded.rating,
            },
        );
        Ok(recorded)
    }

    /// The version serving now (0: the base model).
    pub fn live_version(&self) -> i64 {
        self.gate.live_version()
    }

    /// Whether candidates that pass the guard go live by themselves (`gate.policy`).
    pub fn policy(&self) -> crate::config::GatePolicy {
        self.gate.policy()
    }

    /// The history a face starts from (or resyncs from): the latest sessions and turns, the
    /// versions. Blocking (the store).
    pub fn snapshot(&self, max_sessions: usize, max_turns: usize) -> Result<store::Snapshot> {
        store::Store::open_read_only(&self.store_path)?.snapshot(max_sessions, max_turns)
    }

    /// Closes a chat session (its last reply gets no next state). Blocking (the store).
    pub fn close_session(&self, session_id: &str) -> Result<()> {
        self.capture
            .close(session_id, events::CloseReason::Client)
            .map(|_| ())
    }

    /// Every version, newest first. Blocking (the store).
    pub fn versions(&self) -> Result<Vec<VersionRow>> {
        self.gate.versions()
    }

    /// Puts a candidate live (`by`: who decided, "api" or "tui"). Blocking.
    pub fn approve(&self, id: i64, by: &str) -> Result<VersionRow, GateError> {
        self.gate.approve(id, by)
    }

    /// Refuses a candidate for good. Blocking.
    pub fn veto(&self, id: i64, by: &str) -> Result<VersionRow, GateError> {
        self.gate.veto(id, by)
    }

    /// Serves an earlier version (`None`: the live one's parent); (from, to). Blocking.
    pub fn rollback(&self, target: Option<i64>, by: &str) -> Result<(i64, i64), GateError> {
        self.gate.rollback(target, by)
    }

    /// Pauses or resumes training, kept across restarts; whether that changed anything.
    /// Blocking (the store).
    pub fn set_training_paused(&self, paused: bool) -> Result<bool, TrainingError> {
        let trainer = self.trainer.as_ref().ok_or(TrainingError::Disabled)?;
        let changed = if paused {
            trainer.pause()
        } else {
            trainer.resume()
        };
        changed.map_err(TrainingError::Failed)
    }

    /// The trainer's state and whether it is paused (`None`: training is disabled).
    pub fn training(&self) -> Option<(TrainerStatus, bool)> {
        self.trainer.as_ref().map(|t| (t.status(), t.is_paused()))
    }

    /// Turns waiting for the judge (0 without one). Blocking (the store).
    pub fn judge_pending(&self) -> Result<usize> {
        self.judge.as_ref().map_or(Ok(0), |j| j.pending())
    }
}

/// Why training could not be paused or resumed.
#[derive(Debug, thiserror::Error)]
pub enum TrainingError {
    #[error("Training is disabled in the configuration (train.enabled = false).")]
    Disabled,
    #[error("Could not save the training state: {0:#}")]
    Failed(anyhow::Error),
}

/// The core's background tasks (the judge, the idle-session closer), started by whichever face
/// runs the core.
pub struct Background {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Core {
    /// Resolves with the reason once the engine, having loaded its model, has failed (a panic
    /// on its thread). A model that never loaded is reported where it fails to load. Whether it
    /// had loaded is read from the engine, not from a status seen between two polls: an engine
    /// that panics on the first request within one poll of becoming ready was otherwise never
    /// reported, and a headless server kept running (seen once in a full test run).
    async fn engine_failure(&self) -> String {
        loop {
            if let crate::engine::Status::Failed(why) = self.engine.status()
                && self.engine.model().is_some()
            {
                return why;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Starts the judge, the idle-session closer and the engine watchdog on the current tokio
    /// runtime.
    pub fn start_background(self: &Arc<Self>) -> Background {
        let mut tasks = Vec::new();
        let judge = self.judge.clone().map(|j| tokio::spawn(j.run()));
        let judge_abort = judge.as_ref().map(|t| t.abort_handle());
        tasks.extend(judge);
        // A failed engine is said on screen and in the log, and the work that needs it stops
        // instead of retrying forever.
        let core = self.clone();
        tasks.push(tokio::spawn(async move {
            let why = core.engine_failure().await;
            events::alert(
                &core.bus,
                format!("serving stopped: {why}; requests are refused (503) until a restart"),
            );
            if let Some(j) = judge_abort {
                j.abort();
            }
            if let Some(t) = &core.trainer {
                t.stop();
            }
            core.failure.send_replace(Some(why));
        }));
        if let Some(up) = self.upstream.clone() {
            tasks.push(tokio::spawn(self.clone().connect_upstream(up)));
        }
        let core = self.clone();
        tasks.push(tokio::spawn(async move {
            let idle = core.config.session_idle;
            let mut tick = tokio::time::interval(Duration::from_secs(5).min(idle));
            loop {
                tick.tick().await;
                let capture = core.capture.clone();
                match tokio::task::spawn_blocking(move || capture.close_idle(idle)).await {
                    Ok(Err(e)) => tracing::warn!("closing idle sessions: {e:#}"),
                    Err(e) => tracing::warn!("closing idle sessions: {e}"),
                    Ok(Ok(_)) => {}
                }
            }
        }));
        Background { tasks }
    }
}

impl Core {
    /// Once the local model is loaded: checks every replica and loads the live version into
    /// all of them; a replica that cannot serve stops the server with what it needs.
    async fn connect_upstream(self: Arc<Self>, up: Arc<upstream::Upstream>) {
        loop {
            match self.engine.status() {
                engine::Status::Ready => break,
                engine::Status::Failed(_) => return,
                engine::Status::Loading => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let probe = self
            .engine
            .info()
            .and_then(|i| i.tokenizer.encode("Hello").ok())
            .filter(|ids| !ids.is_empty())
            .unwrap_or_else(|| vec![0]);
        let live = self.engine.live_version();
        let dir = self.gate.adapter_dir(live);
        let connected = match up.check(&probe).await {
            Ok(()) => {
                let up = up.clone();
                tokio::task::spawn_blocking(move || up.make_live(live, &dir))
                    .await
                    .unwrap_or_else(|e| Err(anyhow::anyhow!("{e}")))
            }
            Err(e) => Err(e),
        };
        match connected {
            Ok(()) => {
                up.set_ready();
                tracing::info!(
                    replicas = up.replicas().len(),
                    live,
                    "upstream replicas ready"
                );
            }
            Err(e) => {
                let why = format!("upstream: {e:#}");
                events::alert(&self.bus, format!("serving stopped: {why}"));
                self.failure.send_replace(Some(why));
            }
        }
    }
}

impl Background {
    /// Stops the background work: a turn being judged is judged again after a restart
    /// (nothing of it was stored); an update in progress is set aside at its next micro-step
    /// (its samples stay untrained).
    pub fn stop(self, core: &Core) {
        for t in self.tasks {
            t.abort();
        }
        if let Some(t) = &core.trainer {
            t.stop();
        }
    }
}

/// Builds the core; the model loads in the background (GET /health answers 503 until then).
pub fn build(cfg: &Config) -> Result<Arc<Core>> {
    let bus = events::bus();
    let counters = Arc::new(Counters::default());
    let capture = Arc::new(Capture::open(
        &cfg.store_path(),
        bus.clone(),
        cfg.server.internal_context_markers.clone(),
        Duration::from_secs(cfg.server.session_idle_secs.max(1)),
    )?);
    let engine_cfg = EngineConfig::policy(cfg)?;
    let ready_bus = bus.clone();
    // A restart serves the live version as recorded (or the newest earlier one that loads).
    let store_path = cfg.store_path();
    let start_version = move |model: &_| crate::gate::start_version(&store_path, model);
    let gauges = counters.clone();
    let engine = Engine::start(engine_cfg, counters.clone(), start_version, move |info| {
        let bytes = info.weight_bytes as u64;
        gauges
            .policy_weight_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
        emit(
            &ready_bus,
            Event::EngineReady {
                model: info.name.clone(),
            },
        )
    });
    let judge = crate::judge::Judge::from_config(cfg, &engine, bus.clone(), counters.clone())?;
    let upstream = match cfg.serving.backend {
        config::ServingBackend::Upstream => Some(Arc::new(upstream::Upstream::new(
            &cfg.upstream,
            bus.clone(),
            counters.clone(),
        )?)),
        config::ServingBackend::Local => None,
    };
    let gate = Gate::open(cfg, engine.clone(), bus.clone(), upstream.clone())?;
    let trainer = if cfg.train.enabled {
        Some(crate::train::spawn(
            cfg,
            engine.clone(),
            gate.clone(),
            bus.clone(),
            upstream.clone(),
        )?)
    } else {
        None
    };
    let s = &cfg.server;
    let config = ServerConfig {
        model_id: model_id(cfg),
        model_aliases: Vec::new(),
        api_key: (!s.api_key.is_empty()).then(|| s.api_key.clone()),
        max_body_bytes: s.max_body_bytes,
        generation: cfg.generation.clone(),
        session_idle: Duration::from_secs(s.session_idle_secs.max(1)),
        read_timeout: Duration::from_secs(s.read_timeout_secs.max(1)),
        max_connections: s.max_connections.max(1),
        allowed_origins: s.allowed_origins.clone(),
    };
    Ok(Arc::new(Core {
        config,
        engine,
        capture,
        judge,
        gate,
        trainer,
        bus,
        counters,
        failure: tokio::sync::watch::Sender::new(None),
        named_adapters: completion::NamedAdapters::default(),
        upstream,
        store_path: cfg.store_path(),
    }))
}
