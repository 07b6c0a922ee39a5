//! Wiring: the core (engine, capture, judge, gate, trainer, event bus, counters) built from
//! the configuration. The headless server uses it today; the TUI will run the same core
//! in-process.

use crate::capture::Capture;
use crate::catalog;
use crate::cli::model_path;
use crate::config::Config;
use crate::engine::{Engine, EngineConfig};
use crate::events::{self, Event, emit};
use crate::gate::Gate;
use crate::model::LoadOptions;
use crate::server::{AppState, ServerConfig};
use crate::telemetry::Counters;
use anyhow::Result;
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

/// The engine settings from the configuration.
pub fn engine_config(cfg: &Config) -> Result<EngineConfig> {
    let s = &cfg.server;
    Ok(EngineConfig {
        model_path: model_path(cfg)?,
        load: LoadOptions {
            device: crate::device::select(cfg.model.device)?,
            dtype: crate::device::parse_dtype(&cfg.model.dtype)?,
            weights: cfg.model.weights,
            max_context: cfg.model.max_context,
        },
        max_queue: s.max_queue,
        max_active: s.max_active,
        prefix_cache_bytes: s.prefix_cache_mb << 20,
        prefix_cache_min_tokens: s.prefix_cache_min_tokens,
    })
}

/// Builds the core; the model loads in the background (GET /health answers 503 until then).
pub fn build(cfg: &Config) -> Result<Arc<AppState>> {
    let bus = events::bus();
    let counters = Arc::new(Counters::default());
    let capture = Arc::new(Capture::open(
        &cfg.store_path(),
        bus.clone(),
        cfg.server.internal_context_markers.clone(),
        Duration::from_secs(cfg.server.session_idle_secs.max(1)),
    )?);
    let engine_cfg = engine_config(cfg)?;
    let ready_bus = bus.clone();
    // A restart serves the live version as recorded (or the newest earlier one that loads).
    let store_path = cfg.store_path();
    let start_version = move |model: &_| crate::gate::start_version(&store_path, model);
    let engine = Engine::start(engine_cfg, counters.clone(), start_version, move |info| {
        emit(
            &ready_bus,
            Event::EngineReady {
                model: info.name.clone(),
            },
        )
    });
    let judge = crate::judge::Judge::from_config(cfg, &engine, bus.clone(), counters.clone())?;
    let gate = Gate::open(cfg, engine.clone(), bus.clone())?;
    let trainer = if cfg.train.enabled {
        Some(crate::train::spawn(
            cfg,
            engine.clone(),
            gate.clone(),
            bus.clone(),
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
    };
    Ok(Arc::new(AppState {
        config,
        engine,
        capture,
        judge,
        gate,
        trainer,
        bus,
        counters,
    }))
}
