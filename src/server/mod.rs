//! The OpenAI-compatible HTTP server (hyper on tokio): routes, auth, SSE, errors, metrics.

pub mod admin;
pub mod chat;
pub mod feedback;
pub mod http;
pub mod tool_calls;

use crate::capture::Capture;
use crate::config::GenerationSection;
use crate::engine::{Engine, Status};
use crate::events::EventBus;
use crate::model::Generation;
use crate::telemetry::Counters;
use anyhow::Result;
use http::{ApiError, Body, full, json_response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

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
}

pub struct AppState {
    pub config: ServerConfig,
    pub engine: Engine,
    pub capture: Arc<Capture>,
    /// The background judge (`None` when `judge.backend = "off"`); `serve` runs it.
    pub judge: Option<Arc<crate::judge::Judge>>,
    /// Versions: candidates, approve / veto / rollback.
    pub gate: Arc<crate::gate::Gate>,
    /// The training thread (`None` when `train.enabled = false`).
    pub trainer: Option<Arc<crate::train::TrainerHandle>>,
    pub bus: EventBus,
    pub counters: Arc<Counters>,
}

impl AppState {
    pub fn serves_model(&self, m: &str) -> bool {
        m == self.config.model_id
            || self.config.model_aliases.iter().any(|a| a == m)
            || self.engine.info().is_some_and(|i| i.name == m)
    }

    fn logprobs_json(&self, g: &Generation) -> Value {
        let tokenizer = self.engine.info().map(|i| i.tokenizer);
        let tok = |id: u32| {
            tokenizer
                .as_ref()
                .and_then(|t| t.decode(&[id]).ok())
                .unwrap_or_default()
        };
        let content: Vec<Value> = g
            .ids
            .iter()
            .zip(&g.logprobs)
            .enumerate()
            .map(|(i, (&id, &lp))| {
                let t = tok(id);
                let top: Vec<Value> = g.top_logprobs.get(i).map_or(Vec::new(), |alts| {
                    alts.iter()
                        .map(|&(a, alp)| {
                            let s = tok(a);
                            json!({"token": s, "logprob": alp, "bytes": s.as_bytes()})
                        })
                        .collect()
                });
                json!({"token": t, "logprob": lp, "bytes": t.as_bytes(), "top_logprobs": top})
            })
            .collect();
        json!({"content": content})
    }
}

async fn route(state: Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    let result = match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") => Ok(health(&state)),
        (&Method::GET, "/metrics") => Ok(metrics(&state)),
        (&Method::GET, "/v1/models") => {
            http::authorize(&req, state.config.api_key.as_deref()).map(|_| models(&state))
        }
        (&Method::POST, "/v1/chat/completions") => chat_route(state.clone(), req).await,
        (&Method::POST, "/v1/feedback") => feedback::route(state.clone(), req).await,
        (_, path) if admin::is_admin(path) => admin::route(state.clone(), req).await,
        (_, "/v1/chat/completions" | "/v1/feedback" | "/v1/models" | "/health" | "/metrics") => {
            Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "Method not allowed for this path.",
            ))
        }
        (_, path) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Unknown path {path}."),
        )
        .code("not_found")),
    };
    result.unwrap_or_else(|e| {
        Counters::add(&state.counters.request_errors, 1);
        tracing::info!(status = %e.status, message = %e.message, "request refused");
        e.response()
    })
}

async fn chat_route(
    state: Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    Counters::add(&state.counters.requests, 1);
    http::authorize(&req, state.config.api_key.as_deref())?;
    let headers = req.headers().clone();
    let body = http::read_json(req, state.config.max_body_bytes).await?;
    chat::handle(state, headers, body).await
}

fn health(state: &AppState) -> Response<Body> {
    match state.engine.status() {
        Status::Ready => json_response(StatusCode::OK, &json!({"status": "ok"})),
        Status::Loading => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "loading"}),
        ),
        Status::Failed(e) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "failed", "error": e}),
        ),
    }
}

fn metrics(state: &AppState) -> Response<Body> {
    state.counters.active_sessions.store(
        state.capture.open_sessions() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    let mut text = state.counters.prometheus();
    let mut gauge = |name: &str, kind: &str, help: &str, value: String| {
        crate::telemetry::push_metric(&mut text, name, kind, help, &value)
    };
    gauge(
        "clawrl_live_version",
        "gauge",
        "The adapter version serving new requests (0 = the base model).",
        state.gate.live_version().to_string(),
    );
    if let Some(t) = &state.trainer {
        let s = t.status();
        gauge(
            "clawrl_train_samples_waiting",
            "gauge",
            "Samples ready for the next update.",
            s.samples_waiting.to_string(),
        );
        gauge(
            "clawrl_train_updates_total",
            "counter",
            "Updates finished (candidate versions) since start.",
            s.updates.to_string(),
        );
        gauge(
            "clawrl_train_paused",
            "gauge",
            "1 while training is paused.",
            u8::from(t.is_paused()).to_string(),
        );
    }
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
        .body(full(text))
        .expect("static response parts")
}

fn models(state: &AppState) -> Response<Body> {
    let created = crate::store::now_ms() / 1000;
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": [{"id": state.config.model_id, "object": "model", "created": created, "owned_by": "clawrl"}]}),
    )
}

/// Serves until `shutdown` resolves, then stops accepting and lets requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let judge = state.judge.clone().map(|j| tokio::spawn(j.run()));
    let idle_state = state.clone();
    let closer = tokio::spawn(async move {
        let mut tick =
            tokio::time::interval(Duration::from_secs(5).min(idle_state.config.session_idle));
        loop {
            tick.tick().await;
            let (capture, timeout) = (idle_state.capture.clone(), idle_state.config.session_idle);
            match tokio::task::spawn_blocking(move || capture.close_idle(timeout)).await {
                Ok(Err(e)) => tracing::warn!("closing idle sessions: {e:#}"),
                Err(e) => tracing::warn!("closing idle sessions: {e}"),
                Ok(Ok(_)) => {}
            }
        }
    });
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => { tracing::warn!("accept: {e}"); continue; }
                };
                let state = state.clone();
                let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, std::convert::Infallible>(route(state, req).await) }
                }));
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("connection: {e}");
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    closer.abort();
    // An update in progress is set aside at its next micro-step; its samples stay untrained.
    if let Some(t) = &state.trainer {
        t.stop();
    }
    // A turn being judged now is judged again after a restart (nothing of it was stored).
    if let Some(j) = judge {
        j.abort();
    }
    tracing::info!("shutting down: waiting for requests in flight");
    graceful.shutdown().await;
    Ok(())
}
