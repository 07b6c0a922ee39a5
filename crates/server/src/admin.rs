//! The control routes behind `clawrl-tui ctl` (same API key as `/v1`):
//!
//! | route | does |
//! |---|---|
//! | `GET /admin/status` | live version, policy, trainer state, samples waiting, candidates |
//! | `GET /admin/versions` | every version with its metrics and guard verdict |
//! | `POST /admin/versions/{id}/approve` | makes a candidate live |
//! | `POST /admin/versions/{id}/veto` | refuses a candidate for good |
//! | `POST /admin/rollback` `{"version": id}` | serves an earlier version (default: the live one's parent; 0 = base) |
//! | `POST /admin/pause`, `POST /admin/resume` | stops / restarts training (persists across restarts) |
//! | `GET /admin/events` | the event bus as server-sent events (`event: resync` when some were missed) |
//! | `GET /admin/snapshot?sessions=N&turns=M` | the history a screen starts from |
//! | `POST /admin/sessions/{id}/close` | closes a chat session (its last reply gets no next state) |
//! | `GET /admin/telemetry` | serving counters and this machine's hardware, as the screen samples them |

use super::Core;
use super::http::{self, ApiError, Body, json_response};
use clawrl_core::TrainingError;
use clawrl_core::gate::GateError;
use clawrl_core::store::VersionRow;
use clawrl_core::store::VersionState;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;

/// Whether `path` is one of the control routes.
pub(crate) fn is_admin(path: &str) -> bool {
    path == "/admin" || path.starts_with("/admin/")
}

pub(crate) async fn route(
    state: Arc<Core>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    http::authorize(&req, state.config.api_key.as_deref())?;
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query_string = req.uri().query().unwrap_or_default().to_string();
    let body = if method == Method::POST {
        http::read_optional_json(
            req,
            http::BodyLimits {
                max_bytes: 64 << 10,
                ..http::BodyLimits::of(&state.config)
            },
        )
        .await?
    } else {
        Value::Null
    };
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(2).collect();
    match (&method, parts.as_slice()) {
        (&Method::GET, ["status"]) => Ok(ok(status(&state).await?)),
        (&Method::GET, ["events"]) => Ok(events(&state)),
        (&Method::GET, ["snapshot"]) => {
            let (sessions, turns) = (
                query(&query_string, "sessions", 50),
                query(&query_string, "turns", 500),
            );
            let core = state.clone();
            let snapshot = http::blocking("Could not read the history", move || {
                core.snapshot(sessions, turns)
            })
            .await?;
            Ok(ok(serde_json::to_value(snapshot).unwrap_or(Value::Null)))
        }
        (&Method::GET, ["telemetry"]) => Ok(ok(telemetry(&state).await)),
        (&Method::POST, ["sessions", id, "close"]) => {
            let (core, id) = (state.clone(), percent_decode(id));
            http::blocking("Could not close the session", move || {
                core.close_session(&id)
            })
            .await?;
            Ok(ok(json!({"closed": true})))
        }
        (&Method::GET, ["versions"]) => {
            let core = state.clone();
            let versions =
                http::blocking("Could not read the versions", move || core.versions()).await?;
            Ok(ok(json!({
                "live_version": state.live_version(),
                "versions": versions.iter().map(version_json).collect::<Vec<_>>(),
            })))
        }
        (&Method::POST, ["versions", id, action @ ("approve" | "veto")]) => {
            let id = parse_id(id)?;
            let core = state.clone();
            let action = action.to_string();
            let row = decide(move || {
                if action == "approve" {
                    core.approve(id, "api")
                } else {
                    core.veto(id, "api")
                }
            })
            .await?;
            Ok(ok(
                json!({"live_version": state.live_version(), "version": version_json(&row)}),
            ))
        }
        (&Method::POST, ["rollback"]) => {
            let target = match body.get("version") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_i64().filter(|v| *v >= 0).ok_or_else(|| {
                    ApiError::invalid("`version` must be a version id (0 = the base model).")
                        .param("version")
                })?),
            };
            let core = state.clone();
            let (from, to) = decide(move || core.rollback(target, "api")).await?;
            Ok(ok(json!({"from": from, "to": to, "live_version": to})))
        }
        (&Method::POST, [action @ ("pause" | "resume")]) => {
            let pause = *action == "pause";
            let core = state.clone();
            let changed = http::off_thread(move || core.set_training_paused(pause))
                .await?
                .map_err(|e| match e {
                    TrainingError::Disabled => {
                        ApiError::new(StatusCode::CONFLICT, "invalid_request_error", e.to_string())
                            .code("training_disabled")
                    }
                    TrainingError::Failed(_) => ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "server_error",
                        e.to_string(),
                    ),
                })?;
            Ok(ok(json!({"paused": pause, "changed": changed})))
        }
        (
            _,
            [
                "status" | "versions" | "rollback" | "pause" | "resume" | "events" | "snapshot"
                | "telemetry",
            ],
        )
        | (_, ["versions", _, "approve" | "veto"]) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "Method not allowed for this path.",
        )),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Unknown path {path}."),
        )
        .code("not_found")),
    }
}

fn ok(v: Value) -> Response<Body> {
    json_response(StatusCode::OK, &v)
}

fn parse_id(s: &str) -> Result<i64, ApiError> {
    s.trim_start_matches('v')
        .parse::<i64>()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| ApiError::invalid(format!("`{s}` is not a version id.")))
}

/// Runs a gate decision off the async threads; its refusal becomes 404 / 409 with the reason.
async fn decide<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, GateError> + Send + 'static,
) -> Result<T, ApiError> {
    let joined = tokio::task::spawn_blocking(f).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            e.to_string(),
        )
    })?;
    joined.map_err(|e| match e {
        GateError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", m)
            .code("version_not_found"),
        GateError::Conflict(m) => {
            ApiError::new(StatusCode::CONFLICT, "invalid_request_error", m).code("version_conflict")
        }
        GateError::Failed(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("The live version is unchanged: {e:#}"),
        ),
    })
}

/// A version as the API shows it.
pub(crate) fn version_json(v: &VersionRow) -> Value {
    json!({
        "id": v.id,
        "parent": v.parent,
        "state": v.state,
        "created_at": clawrl_core::store::rfc3339(v.created_at),
        "samples": v.metrics.samples,
        "tokens": v.metrics.tokens,
        "hints": v.metrics.hints,
        "loss": v.metrics.loss,
        "kl_base": v.kl_base,
        "kl_live": v.kl_live,
        "drift": v.metrics.drift,
        "grad_norm": v.metrics.grad_norm,
        "learning_rate": v.metrics.learning_rate,
        "mean_reward": v.metrics.mean_reward,
        "approved_delta": v.approved_delta,
        "train_secs": v.metrics.train_secs,
        "guard": v.guard_report,
        "guard_passed": v.guard_passed,
        "decided_at": v.decided_at.map(clawrl_core::store::rfc3339),
        "decided_by": v.decided_by,
        "path": v.path,
        "sha256": v.sha256,
        "lora": v.lora,
        "error": v.error,
    })
}

/// What `ctl status` shows (the screen folds the same facts from events).
pub async fn status(state: &Arc<Core>) -> Result<Value, ApiError> {
    let core = state.clone();
    let versions = http::blocking("Could not read the versions", move || core.versions()).await?;
    let trainer = match state.training() {
        Some((status, paused)) => {
            let mut s = serde_json::to_value(status).unwrap_or(Value::Null);
            s["paused"] = json!(paused);
            s
        }
        None => json!({"state": "disabled", "detail": "train.enabled = false", "paused": false}),
    };
    let core = state.clone();
    let judge_pending = http::blocking("Could not read the judge's queue", move || {
        core.judge_pending()
    })
    .await?;
    Ok(json!({
        "live_version": state.live_version(),
        "policy": state.policy(),
        "trainer": trainer,
        "judge_pending": judge_pending,
        "candidates": versions.iter().filter(|v| v.state == VersionState::Candidate).map(version_json).collect::<Vec<_>>(),
        "versions": versions.len(),
        "replicas": state.upstream.as_ref().map(|u| u.replicas()),
    }))
}

/// `key=N` from a query string, else `default`.
fn query(q: &str, key: &str, default: usize) -> usize {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(default)
}

/// The event bus as server-sent events, one JSON event each; `event: resync` when this
/// client fell behind and missed some (reload `/admin/snapshot`); a comment every 15 s keeps
/// idle connections (and tunnels) open.
fn events(state: &Core) -> Response<Body> {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::{Bytes, Frame};
    use tokio::sync::broadcast::error::RecvError;
    let mut bus = state.bus.subscribe();
    let (out, body) =
        tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(256);
    tokio::spawn(async move {
        let mut keepalive = tokio::time::interval(std::time::Duration::from_secs(15));
        loop {
            let text = tokio::select! {
                event = bus.recv() => match event {
                    Ok(e) => format!("data: {}\n\n", serde_json::to_string(&e).unwrap_or_default()),
                    Err(RecvError::Lagged(_)) => "event: resync\ndata: {}\n\n".to_string(),
                    Err(RecvError::Closed) => return,
                },
                _ = keepalive.tick() => ": keepalive\n\n".to_string(),
            };
            if out.send(Ok(Frame::data(Bytes::from(text)))).await.is_err() {
                return; // the client went away
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "text/event-stream")
        .header(hyper::header::CACHE_CONTROL, "no-cache")
        .body(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(body)).boxed())
        .expect("static response parts")
}

/// What the screen samples every second: the serving counters and the hardware here.
async fn telemetry(state: &Core) -> Value {
    use clawrl_core::telemetry::hardware::HardwareMonitor;
    use std::sync::atomic::Ordering::Relaxed;
    static MONITOR: std::sync::OnceLock<std::sync::Mutex<HardwareMonitor>> =
        std::sync::OnceLock::new();
    let hardware = tokio::task::spawn_blocking(|| {
        let monitor = MONITOR.get_or_init(|| std::sync::Mutex::new(HardwareMonitor::new()));
        monitor.lock().unwrap_or_else(|p| p.into_inner()).sample()
    })
    .await
    .unwrap_or_default();
    let c = &state.counters;
    json!({
        "serving": {
            "tokens_out": c.tokens_out.load(Relaxed),
            "decode_micros": c.decode_micros.load(Relaxed),
            "queue_depth": c.queue_depth.load(Relaxed),
            "active_sequences": c.active_sequences.load(Relaxed),
            "prefix_cache_bytes": c.prefix_cache_bytes.load(Relaxed),
            "policy_weight_bytes": c.policy_weight_bytes.load(Relaxed),
            "judge_weight_bytes": c.judge_weight_bytes.load(Relaxed),
        },
        "hardware": hardware,
    })
}

/// A path segment with its `%XX` escapes undone.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
