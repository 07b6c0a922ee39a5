//! The OpenAI-compatible HTTP server (hyper on tokio): routes, auth, SSE, errors, metrics.
//!
//! # Public API
//! [`serve`] a [`Core`] on a listener until a shutdown future resolves; [`chat::parse_request`]
//! (pure: the fuzz target drives it) and [`http::ApiError`] are the request checks and the
//! error shape. Routes: `/v1/chat/completions`, `/v1/models`, `/v1/feedback`, `/health`,
//! `/metrics`, `/admin/*` (README, "Using it"), vLLM's raw-completion subset
//! ([`completions`]: `/v1/completions`, `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`)
//! and SGLang's ([`sglang`]: `/generate`, `/load_lora_adapter`, `/unload_lora_adapter`,
//! `/get_model_info`, `/get_server_info`), so one clawrl can be the upstream of another.

pub mod admin;
pub mod chat;
pub mod completions;
pub mod feedback;
pub mod http;
pub mod listen;
pub mod sglang;

use anyhow::Result;
use clawrl_core::engine::Status;
use clawrl_core::telemetry::Counters;
pub use clawrl_core::{Core, ServerConfig};
use clawrl_model::Generation;
use http::{ApiError, Body, full, json_response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::sync::Arc;
use tokio::net::TcpListener;

/// OpenAI's `logprobs` object for a generation (the tokens as text, with alternatives).
pub(crate) fn logprobs_json(core: &Core, g: &Generation) -> Value {
    let tokenizer = core.engine.info().map(|i| i.tokenizer);
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

async fn route(state: Arc<Core>, mut req: Request<Incoming>) -> Response<Body> {
    // Web pages first: an origin not allowed is refused before anything else is looked at.
    let origin = match http::check_origin(&req, &state.config.allowed_origins) {
        Ok(origin) => origin,
        Err(e) => return refused(&state, e),
    };
    if let (&Method::OPTIONS, Some(origin)) = (req.method(), &origin) {
        let mut preflight = http::preflight();
        http::allow_origin(&mut preflight, origin.clone());
        return preflight;
    }
    // HEAD is GET whose body hyper leaves out.
    if req.method() == Method::HEAD {
        *req.method_mut() = Method::GET;
    }
    let path = req.uri().path().to_string();
    let result = match (req.method(), path.as_str()) {
        (&Method::GET, "/health") => Ok(health(&state)),
        (&Method::GET, "/metrics") => Ok(metrics(&state)),
        (&Method::GET, "/v1/models") => {
            http::authorize(&req, state.config.api_key.as_deref()).map(|_| models(&state))
        }
        (&Method::GET, p) if p.starts_with("/v1/models/") => {
            http::authorize(&req, state.config.api_key.as_deref())
                .and_then(|_| model(&state, &p["/v1/models/".len()..]))
        }
        (&Method::POST, "/v1/chat/completions") => chat_route(state.clone(), req).await,
        (&Method::POST, "/v1/completions") => raw_route(state.clone(), req, Raw::Completions).await,
        (&Method::POST, "/v1/load_lora_adapter") => {
            raw_route(state.clone(), req, Raw::VllmAdapter { load: true }).await
        }
        (&Method::POST, "/v1/unload_lora_adapter") => {
            raw_route(state.clone(), req, Raw::VllmAdapter { load: false }).await
        }
        (&Method::POST, "/generate") => raw_route(state.clone(), req, Raw::Generate).await,
        (&Method::POST, "/load_lora_adapter") => {
            raw_route(state.clone(), req, Raw::SglangAdapter { load: true }).await
        }
        (&Method::POST, "/unload_lora_adapter") => {
            raw_route(state.clone(), req, Raw::SglangAdapter { load: false }).await
        }
        (&Method::GET, "/get_model_info") => http::authorize(&req, state.config.api_key.as_deref())
            .map(|_| sglang::model_info(&state)),
        (&Method::GET, "/get_server_info") => {
            http::authorize(&req, state.config.api_key.as_deref()).map(|_| sglang::server_info())
        }
        (&Method::POST, "/v1/feedback") => feedback::route(state.clone(), req).await,
        (_, path) if admin::is_admin(path) => admin::route(state.clone(), req).await,
        (
            _,
            "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/load_lora_adapter"
            | "/v1/unload_lora_adapter"
            | "/generate"
            | "/load_lora_adapter"
            | "/unload_lora_adapter"
            | "/get_model_info"
            | "/get_server_info"
            | "/v1/feedback"
            | "/v1/models"
            | "/health"
            | "/metrics",
        ) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "Method not allowed for this path.",
        )),
        (_, path) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Unknown path {path}."),
        )
        .code("not_found")),
    };
    let mut response = result.unwrap_or_else(|e| refused(&state, e));
    if let Some(origin) = origin {
        http::allow_origin(&mut response, origin);
    }
    response
}

/// Counts and logs a refused request (the log writer escapes what the client put in it).
fn refused(state: &Core, e: ApiError) -> Response<Body> {
    Counters::add(&state.counters.request_errors, 1);
    tracing::info!(status = %e.status, message = %e.message, "request refused");
    e.response()
}

/// The raw routes a control plane in front calls: vLLM's ([`completions`]) and SGLang's
/// ([`sglang`]).
enum Raw {
    Completions,
    VllmAdapter { load: bool },
    Generate,
    SglangAdapter { load: bool },
}

async fn raw_route(
    state: Arc<Core>,
    req: Request<Incoming>,
    route: Raw,
) -> Result<Response<Body>, ApiError> {
    Counters::add(&state.counters.requests, 1);
    http::authorize(&req, state.config.api_key.as_deref())?;
    let body = http::read_json(req, http::BodyLimits::of(&state.config)).await?;
    match route {
        Raw::Completions => completions::handle(state, body).await,
        Raw::VllmAdapter { load } => completions::adapter_route(state, body, load).await,
        Raw::Generate => sglang::generate(state, body).await,
        Raw::SglangAdapter { load } => Ok(sglang::adapter_route(state, body, load).await),
    }
}

async fn chat_route(state: Arc<Core>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    Counters::add(&state.counters.requests, 1);
    http::authorize(&req, state.config.api_key.as_deref())?;
    let headers = req.headers().clone();
    let body = http::read_json(req, http::BodyLimits::of(&state.config)).await?;
    chat::handle(state, headers, body).await
}

fn health(state: &Core) -> Response<Body> {
    if let Some(why) = state.failure.borrow().clone() {
        let body = json!({"status": "failed", "error": why});
        return json_response(StatusCode::SERVICE_UNAVAILABLE, &body);
    }
    match (state.engine.status(), &state.upstream) {
        (Status::Ready, Some(up)) => {
            let replicas = up.replicas();
            let serving = up.is_ready() && replicas.iter().any(|r| r.up);
            let (status, word) = match (up.is_ready(), serving) {
                (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "loading"),
                (true, false) => (StatusCode::SERVICE_UNAVAILABLE, "replicas down"),
                (true, true) => (StatusCode::OK, "ok"),
            };
            json_response(status, &json!({"status": word, "replicas": replicas}))
        }
        (Status::Ready, None) => json_response(StatusCode::OK, &json!({"status": "ok"})),
        (Status::Loading, _) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "loading"}),
        ),
        (Status::Failed(e), _) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "failed", "error": e}),
        ),
    }
}

fn metrics(state: &Core) -> Response<Body> {
    state.counters.active_sessions.store(
        state.capture.open_sessions() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    let mut text = state.counters.prometheus();
    let mut gauge = |name: &str, kind: &str, help: &str, value: String| {
        clawrl_core::telemetry::push_metric(&mut text, name, kind, help, &value)
    };
    gauge(
        "clawrl_live_version",
        "gauge",
        "The adapter version serving new requests (0 = the base model).",
        state.live_version().to_string(),
    );
    if let Some((s, paused)) = state.training() {
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
            u8::from(paused).to_string(),
        );
    }
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
        .body(full(text))
        .expect("static response parts")
}

fn model_object(id: &str) -> Value {
    let created = clawrl_core::store::now_ms() / 1000;
    json!({"id": id, "object": "model", "created": created, "owned_by": "clawrl"})
}

fn models(state: &Core) -> Response<Body> {
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": std::iter::once(model_object(&state.config.model_id))
            .chain(state.named_adapters.names().iter().map(|n| {
                let mut m = model_object(n);
                m["parent"] = json!(state.config.model_id);
                m
            }))
            .collect::<Vec<_>>()}),
    )
}

/// `GET /v1/models/{id}`: the served model under any name it answers to.
fn model(state: &Core, id: &str) -> Result<Response<Body>, ApiError> {
    if !state.serves_model(id) && state.named_adapters.version(id).is_none() {
        return Err(unknown_model(state, id));
    }
    Ok(json_response(StatusCode::OK, &model_object(id)))
}

/// OpenAI's 404 for a model this server does not serve.
fn unknown_model(state: &Core, id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!(
            "The model `{id}` does not exist. This server serves `{}`.",
            state.config.model_id
        ),
    )
    .code("model_not_found")
}

/// Serves until `shutdown` resolves, then stops accepting and lets requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    state: Arc<Core>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let background = state.start_background();
    let mut acceptor = listen::Acceptor::new(listener, state.config.max_connections);
    let read_timeout = state.config.read_timeout;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = acceptor.next() => {
                let listen::Accepted { stream, slot } = accepted;
                let state = state.clone();
                let requests = slot.requests();
                // A client that sends its headers too slowly is disconnected (the body has
                // its own deadline: `http::read_body`).
                let conn = http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(read_timeout)
                    .serve_connection(TokioIo::new(stream), service_fn(move |req| {
                        let (state, serving) = (state.clone(), requests.serving());
                        async move {
                            let response = route(state, req).await;
                            // The request counts as served until its body's last byte.
                            let response = response.map(|body| serving.attach(body));
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    }));
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    tokio::select! {
                        done = conn => if let Err(e) = done {
                            tracing::debug!("connection: {e}");
                        },
                        // Dropping the connection closes it.
                        () = slot.shed() => tracing::debug!("connection shed to make room"),
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    background.stop(&state);
    tracing::info!("shutting down: waiting for requests in flight");
    graceful.shutdown().await;
    Ok(())
}
