//! The gate (PIPELINE.md §6): every update becomes a numbered candidate version on disk, the
//! regression guard scores it, the policy decides whether it goes live, and any version that
//! was live can be made live again. The store keeps the whole history; nothing is rewritten.
//!
//! Decisions (propose, approve, veto, rollback) are serialized by one lock and change the
//! engine first, the store second, so that what is recorded as live is what is served.

pub mod guard;

use crate::config::{Config, GatePolicy, GateSection};
use crate::engine::{AdapterCommand, Engine, StartVersion};
use crate::events::{Event, EventBus, LiveReason, emit};
use crate::store::{Store, UpdateMetrics, VersionRow, VersionState, now_ms};
use anyhow::{Context, Result};
use clawrl_model::{LoadedModel, LoraAdapter, peft};
use guard::Guard;
use serde_json::json;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Why a decision was refused.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// No such version.
    #[error("{0}")]
    NotFound(String),
    /// The version is in a state that does not allow it.
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// A finished update, ready to become a version.
pub struct Candidate {
    pub adapter: LoraAdapter,
    pub parent: i64,
    /// The turns it was trained on.
    pub samples: Vec<crate::store::TrainedSample>,
    pub metrics: UpdateMetrics,
}

pub struct Gate {
    store: Mutex<Store>,
    engine: Engine,
    bus: EventBus,
    config: GateSection,
    adapters_dir: PathBuf,
    guard: Guard,
    /// One decision at a time.
    decisions: Mutex<()>,
    /// Versions whose adapter the engine holds.
    installed: Mutex<HashSet<i64>>,
    /// The candidate being scored by the guard (not yet in the store).
    guarding: Mutex<Option<i64>>,
    /// Replicas that must hold a version before it goes live (`serving.backend = "upstream"`).
    upstream: Option<Arc<crate::upstream::Upstream>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads a version's adapter from its PEFT folder, verifying the recorded checksum.
fn load_adapter(row: &VersionRow, model: &LoadedModel) -> Result<LoraAdapter> {
    peft::load(
        Path::new(&row.path),
        &model.config,
        &model.transformer.device(),
        Some(&row.sha256),
    )
    .with_context(|| format!("the adapter of v{}", row.id))
}

/// What the engine serves after a (re)start: the live version as recorded. If its adapter is
/// missing or corrupt, the error is recorded on the version, and the newest earlier version in
/// the live history that loads (the base model at worst) goes live instead, never the broken one.
pub(crate) fn start_version(store_path: &Path, model: &LoadedModel) -> StartVersion {
    let resolve = || -> Result<StartVersion> {
        let mut store = Store::open(store_path)?;
        let history = store.live_history()?;
        let Some(last) = history.last() else {
            return Ok((0, None));
        };
        let mut broken = Vec::new();
        for change in history.iter().rev() {
            let v = change.version;
            if v == 0 {
                break;
            }
            if broken.contains(&v) {
                continue;
            }
            let row = store
                .version(v)?
                .with_context(|| format!("no version {v}"))?;
            match load_adapter(&row, model) {
                Ok(adapter) => {
                    if v != last.version {
                        store.set_live(v, LiveReason::Fallback.as_str(), "restart", now_ms())?;
                    }
                    return Ok((v, Some(Arc::new(adapter))));
                }
                Err(e) => {
                    tracing::error!("v{v} cannot be served: {e:#}");
                    store.set_version_error(v, &format!("{e:#}"))?;
                    broken.push(v);
                }
            }
        }
        if last.version != 0 {
            store.set_live(0, LiveReason::Fallback.as_str(), "restart", now_ms())?;
        }
        Ok((0, None))
    };
    resolve().unwrap_or_else(|e| {
        tracing::error!("reading the live version: {e:#}; serving the base model");
        (0, None)
    })
}

impl Gate {
    pub fn open(
        cfg: &Config,
        engine: Engine,
        bus: EventBus,
        upstream: Option<Arc<crate::upstream::Upstream>>,
    ) -> Result<Arc<Self>> {
        let installed = HashSet::from([engine.live_version()]);
        Ok(Arc::new(Self {
            store: Mutex::new(Store::open(&cfg.store_path())?),
            engine,
            bus,
            config: cfg.gate.clone(),
            adapters_dir: cfg.adapters_dir(),
            guard: Guard::new(&cfg.gate)?,
            decisions: Mutex::new(()),
            installed: Mutex::new(installed),
            guarding: Mutex::new(None),
            upstream,
        }))
    }

    /// The PEFT folder of version `id`.
    pub fn adapter_dir(&self, id: i64) -> PathBuf {
        self.adapters_dir.join(format!("v{id}"))
    }

    pub fn policy(&self) -> GatePolicy {
        self.config.policy
    }

    fn model(&self) -> Result<Arc<LoadedModel>> {
        self.engine.model().context("the model is not loaded yet")
    }

    pub fn versions(&self) -> Result<Vec<VersionRow>> {
        lock(&self.store).versions()
    }

    pub fn live_version(&self) -> i64 {
        self.engine.live_version()
    }

    /// The newest candidate still waiting for a decision.
    pub(crate) fn undecided(&self) -> Result<Option<i64>> {
        Ok(self
            .versions()?
            .into_iter()
            .rev()
            .find(|v| v.state == VersionState::Candidate)
            .map(|v| v.id))
    }

    /// The adapter of version `id` as the trainer's starting point (`None` for the base).
    pub fn adapter(&self, id: i64) -> Result<Option<LoraAdapter>> {
        if id == 0 {
            return Ok(None);
        }
        let row = lock(&self.store)
            .version(id)?
            .with_context(|| format!("no version {id}"))?;
        Ok(Some(load_adapter(&row, &*self.model()?)?))
    }

    /// Records a finished update as a candidate: writes its PEFT folder, scores it with the
    /// guard and, under the `auto` policy, makes it live if the guard passed and the live
    /// version did not change meanwhile.
    pub(crate) fn propose(&self, c: Candidate) -> Result<VersionRow> {
        let model = self.model()?;
        let id = lock(&self.store).next_version_id()?;
        let dir = self.adapter_dir(id);
        let sha256 = peft::save(&c.adapter, &model.config, &model.name, &dir)?;
        let lora = serde_json::to_value(&*c.adapter.config)?;
        self.engine
            .command(AdapterCommand::Install {
                version: id,
                adapter: Arc::new(c.adapter),
            })
            .map_err(|_| anyhow::anyhow!("the engine is not running"))?;
        lock(&self.installed).insert(id);
        *lock(&self.guarding) = Some(id);
        let evaluated = self.guard.evaluate(&self.engine, &self.store, id, c.parent);
        *lock(&self.guarding) = None;
        let report = match evaluated {
            Ok(r) => r,
            Err(e) => {
                self.uninstall(id);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let _decision = lock(&self.decisions);
        let live_now = self.engine.live_version();
        let mut reasons = report.reasons.clone();
        if live_now != c.parent {
            reasons.push(format!(
                "the live version changed from v{} to v{live_now} while it trained",
                c.parent
            ));
        }
        let mut guard_report = report.json(&self.config, self.guard.probes());
        guard_report["reasons"] = json!(reasons);
        let version = VersionRow {
            id,
            parent: c.parent,
            created_at: now_ms(),
            state: VersionState::Candidate,
            metrics: c.metrics.clone(),
            kl_base: Some(report.kl_base),
            kl_live: Some(report.kl_live),
            approved_delta: report.approved_delta,
            guard_passed: report.passed,
            guard_report,
            path: dir.display().to_string(),
            sha256,
            lora,
            decided_at: None,
            decided_by: None,
            error: None,
        };
        if let Err(e) = lock(&self.store).insert_version(&version, &c.samples) {
            self.uninstall(id);
            return Err(e);
        }
        emit(
            &self.bus,
            Event::CandidateReady {
                version: id,
                parent: c.parent,
                samples: c.samples.len(),
                loss: c.metrics.loss,
                kl_base: version.kl_base,
                kl_live: version.kl_live,
                mean_reward: c.metrics.mean_reward,
                learning_rate: c.metrics.learning_rate,
                guard_passed: report.passed,
                reasons: reasons.clone(),
            },
        );
        tracing::info!(version = id, passed = report.passed, ?reasons, "candidate");
        if self.config.policy == GatePolicy::Auto && reasons.is_empty() {
            self.switch(id, LiveReason::Auto, "auto")?;
        }
        lock(&self.store)
            .version(id)?
            .context("the version just recorded")
    }

    fn row(&self, id: i64) -> Result<VersionRow, GateError> {
        lock(&self.store)
            .version(id)?
            .ok_or_else(|| GateError::NotFound(format!("There is no version v{id}.")))
    }

    /// Makes a candidate live.
    pub fn approve(&self, id: i64, by: &str) -> Result<VersionRow, GateError> {
        let _decision = lock(&self.decisions);
        let row = self.row(id)?;
        match row.state {
            VersionState::Candidate => {}
            VersionState::Live => {
                return Err(GateError::Conflict(format!("v{id} is already live.")));
            }
            VersionState::Vetoed => return Err(vetoed(id)),
            VersionState::Retired => {
                return Err(GateError::Conflict(format!(
                    "v{id} was live before; use rollback to serve it again."
                )));
            }
        }
        self.switch(id, LiveReason::Approved, by)?;
        self.row(id)
    }

    /// Refuses a candidate for good.
    pub fn veto(&self, id: i64, by: &str) -> Result<VersionRow, GateError> {
        let _decision = lock(&self.decisions);
        let row = self.row(id)?;
        if row.state != VersionState::Candidate {
            let hint = if row.state == VersionState::Live {
                "; roll back to stop serving it"
            } else {
                ""
            };
            return Err(GateError::Conflict(format!(
                "v{id} is {}, not a candidate{hint}.",
                row.state
            )));
        }
        lock(&self.store).veto(id, by, now_ms())?;
        self.uninstall(id);
        emit(&self.bus, Event::VersionVetoed { version: id });
        self.row(id)
    }

    /// Makes an earlier version live again: `target`, or by default the version the live one
    /// was trained from (0 = the base model). Returns (from, to).
    pub fn rollback(&self, target: Option<i64>, by: &str) -> Result<(i64, i64), GateError> {
        let _decision = lock(&self.decisions);
        let from = self.engine.live_version();
        let to = match target {
            Some(t) => t,
            None if from == 0 => {
                return Err(GateError::Conflict(
                    "The base model (v0) is live; there is nothing earlier to roll back to.".into(),
                ));
            }
            None => self.row(from)?.parent,
        };
        if to == from {
            return Err(GateError::Conflict(format!("v{to} is already live.")));
        }
        if to != 0 {
            let row = self.row(to)?;
            match row.state {
                VersionState::Vetoed => return Err(vetoed(to)),
                VersionState::Candidate => {
                    return Err(GateError::Conflict(format!(
                        "v{to} never went live; approve it instead."
                    )));
                }
                VersionState::Live | VersionState::Retired => {}
            }
        }
        self.switch(to, LiveReason::Rollback, by)?;
        emit(&self.bus, Event::RolledBack { from, to });
        Ok((from, to))
    }

    /// Serves `id` from the next request on and records it (engine first, then the store;
    /// the engine is switched back if the store cannot record it).
    fn switch(&self, id: i64, reason: LiveReason, by: &str) -> Result<()> {
        if id != 0 && !lock(&self.installed).contains(&id) {
            let row = lock(&self.store)
                .version(id)?
                .with_context(|| format!("no version {id}"))?;
            let adapter = match load_adapter(&row, &*self.model()?) {
                Ok(a) => a,
                Err(e) => {
                    let _ = lock(&self.store).set_version_error(id, &format!("{e:#}"));
                    return Err(e);
                }
            };
            self.engine
                .command(AdapterCommand::Install {
                    version: id,
                    adapter: Arc::new(adapter),
                })
                .map_err(|_| anyhow::anyhow!("the engine is not running"))?;
            lock(&self.installed).insert(id);
        }
        let previous = self.engine.live_version();
        // Every replica holds it before any request asks for it (all or none).
        if let Some(up) = &self.upstream {
            up.make_live(id, &self.adapter_dir(id))?;
        }
        self.engine.set_live_blocking(id)?;
        if let Err(e) = lock(&self.store).set_live(id, reason.as_str(), by, now_ms()) {
            let _ = self.engine.set_live_blocking(previous);
            if let Some(up) = &self.upstream {
                let _ = up.make_live(previous, &self.adapter_dir(previous));
            }
            return Err(e);
        }
        tracing::info!(
            version = id,
            previous,
            reason = reason.as_str(),
            "version live"
        );
        if reason != LiveReason::Rollback {
            emit(
                &self.bus,
                Event::VersionLive {
                    version: id,
                    previous,
                    reason,
                },
            );
        }
        // Keep the engine's memory bounded: only the live version and open candidates stay.
        let keep: HashSet<i64> = lock(&self.store)
            .versions()?
            .into_iter()
            .filter(|v| v.state == VersionState::Candidate)
            .map(|v| v.id)
            .chain([id])
            .chain(*lock(&self.guarding))
            .collect();
        let mut drop: Vec<i64> = lock(&self.installed)
            .iter()
            .copied()
            .filter(|v| !keep.contains(v))
            .collect();
        if !keep.contains(&previous) && !drop.contains(&previous) {
            // Installed at start (before the gate existed) or by an earlier switch.
            lock(&self.installed).insert(previous);
            drop.push(previous);
        }
        for v in drop {
            self.uninstall(v);
        }
        Ok(())
    }

    fn uninstall(&self, id: i64) {
        if id != 0 && lock(&self.installed).remove(&id) {
            let _ = self.engine.command(AdapterCommand::Remove { version: id });
        }
    }
}

/// Why a vetoed version cannot be served, whoever asks.
fn vetoed(id: i64) -> GateError {
    GateError::Conflict(format!(
        "v{id} was vetoed; a vetoed version is never served."
    ))
}
