//! HTTP plumbing shared by the routes: bodies, JSON replies, OpenAI-shaped errors, auth.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, header};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

pub type Body = BoxBody<Bytes, std::convert::Infallible>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

pub(crate) fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(v.to_string()))
        .expect("static response parts")
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after_secs: None,
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    pub fn param(mut self, p: &str) -> Self {
        self.param = Some(p.into());
        self
    }
    pub fn code(mut self, c: &'static str) -> Self {
        self.code = Some(c);
        self
    }
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
    pub fn response(&self) -> Response<Body> {
        let mut r = json_response(self.status, &self.body());
        if let Some(s) = self.retry_after_secs {
            r.headers_mut().insert(header::RETRY_AFTER, s.into());
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

/// Checks `Authorization: Bearer <key>` in constant time when a key is configured.
pub(crate) fn authorize(req: &Request<Incoming>, key: Option<&str>) -> Result<(), ApiError> {
    let Some(key) = key else { return Ok(()) };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_start().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer")) // RFC 7235: any case
        .map(|(_, token)| token.trim());
    match given {
        Some(g) if bool::from(g.as_bytes().ct_eq(key.as_bytes())) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Incorrect API key provided.",
        )
        .code("invalid_api_key")),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Missing API key: send it as `Authorization: Bearer <key>`.",
        )
        .code("invalid_api_key")),
    }
}

/// How much of a body is read, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub timeout: std::time::Duration,
}

impl BodyLimits {
    /// A request body's limits as the server is configured.
    pub fn of(config: &clawrl_core::ServerConfig) -> Self {
        Self {
            max_bytes: config.max_body_bytes,
            timeout: config.read_timeout,
        }
    }
}

/// Reads a JSON body (`Content-Type: application/json`) within `limits`.
pub async fn read_json(req: Request<Incoming>, limits: BodyLimits) -> Result<Value, ApiError> {
    parse_json(&read_body(req, limits).await?)
}

/// Like [`read_json`], with an empty body read as `null` (routes whose body is optional).
pub(crate) async fn read_optional_json(
    req: Request<Incoming>,
    limits: BodyLimits,
) -> Result<Value, ApiError> {
    let bytes = read_body(req, limits).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    parse_json(&bytes)
}

async fn read_body(req: Request<Incoming>, limits: BodyLimits) -> Result<Bytes, ApiError> {
    require_json(&req)?;
    let limit = limits.max_bytes;
    let collected = tokio::time::timeout(
        limits.timeout,
        Limited::new(req.into_body(), limit).collect(),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "The request body did not arrive within {} s (server.read_timeout_secs).",
                limits.timeout.as_secs()
            ),
        )
    })?;
    Ok(match collected {
        Ok(c) => c.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!(
                    "Request body is larger than the limit of {limit} bytes (server.max_body_bytes)."
                ),
            ));
        }
        Err(e) => {
            return Err(ApiError::invalid(format!(
                "Could not read the request body: {e}"
            )));
        }
    })
}

/// A body must be declared JSON: a browser's form or `text/plain` post (which needs no CORS
/// preflight) is refused before it is read.
fn require_json(req: &Request<Incoming>) -> Result<(), ApiError> {
    let headers = req.headers();
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0);
    let declared = headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let mime = declared.as_deref().unwrap_or("");
    let mime = mime.split(';').next().unwrap_or("").trim();
    if !has_body || mime.eq_ignore_ascii_case("application/json") {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "invalid_request_error",
        match declared {
            Some(ct) => format!(
                "The body must be JSON sent with `Content-Type: application/json`, not {ct:?}."
            ),
            None => "The body must be JSON sent with `Content-Type: application/json`.".into(),
        },
    )
    .code("unsupported_media_type"))
}

/// Requests made by web pages carry `Origin`; only the origins in `server.allowed_origins`
/// (`*`: any) may call the API, so that a page the user visits cannot write into the training
/// data or roll back a version. Returns the origin to allow in CORS headers, if any.
pub(crate) fn check_origin(
    req: &Request<Incoming>,
    allowed: &[String],
) -> Result<Option<header::HeaderValue>, ApiError> {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return Ok(None);
    };
    let text = origin.to_str().unwrap_or("");
    if allowed
        .iter()
        .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(text))
    {
        return Ok(Some(origin.clone()));
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "invalid_request_error",
        format!(
            "Requests from web pages are refused (Origin {:?}); allow the origin in server.allowed_origins.",
            String::from_utf8_lossy(origin.as_bytes())
        ),
    )
    .code("origin_not_allowed"))
}

/// Adds the CORS headers that let an allowed web page read the response.
pub(crate) fn allow_origin(response: &mut Response<Body>, origin: header::HeaderValue) {
    let h = response.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(header::VARY, header::HeaderValue::from_static("Origin"));
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        header::HeaderValue::from_static("x-session-id, x-turn-index, retry-after"),
    );
}

/// The answer to a CORS preflight (`OPTIONS`) from an allowed origin.
pub fn preflight() -> Response<Body> {
    Response::builder()
        .status(StatusCode::NO_CONTENT)
        .header(header::ACCESS_CONTROL_ALLOW_METHODS, "GET, POST, OPTIONS")
        .header(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            "authorization, content-type, x-session-id, x-turn-type, x-session-done",
        )
        .header(header::ACCESS_CONTROL_MAX_AGE, "600")
        .body(full(Bytes::new()))
        .expect("static response parts")
}

/// A body's JSON, or OpenAI's 400 saying why it is not.
pub fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::invalid(format!(
            "We could not parse the JSON body of your request: {e}"
        ))
    })
}

/// Runs store work off the async threads; its failure is a 500 that says what failed.
pub async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    off_thread(f)
        .await?
        .map_err(|e| internal(format!("{what}: {e:#}")))
}

/// Runs blocking work (the store, files) off the async threads; its own result is the
/// caller's to judge.
pub async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| internal(e.to_string()))
}

fn internal(message: String) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
}
