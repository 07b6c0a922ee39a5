//! A minimal HTTP/1.1 JSON client over hyper (the judge endpoint, `clawrl-tui ctl` and `sim`
//! talking to a running server): plain http, or https through rustls with the system's root
//! certificates (`SSL_CERT_FILE` / `SSL_CERT_DIR` replace them, as for OpenSSL).

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::sync::{Arc, OnceLock};
use tokio::io::{AsyncRead, AsyncWrite};

/// Where requests go: `host:port`, a path prefix, and whether over TLS.
#[derive(Debug, Clone)]
pub struct Target {
    pub authority: String,
    pub base_path: String,
    /// The host name the server's certificate must be valid for (`Some` = https).
    pub tls_host: Option<String>,
}

impl Target {
    /// The error for a request to this target that got no HTTP answer.
    fn unreachable(&self, reason: &dyn std::fmt::Display) -> Unreachable {
        Unreachable {
            authority: self.authority.clone(),
            reason: reason.to_string(),
        }
    }

    /// Parses `http://host[:port][/path]`; `what` names the setting in errors.
    pub fn parse(url: &str, what: &str) -> Result<Self> {
        let uri: Uri = url
            .parse()
            .map_err(|e| anyhow::anyhow!("{what} {url:?}: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => bail!("{what} {url:?} must start with http:// or https://"),
        };
        let host = uri
            .host()
            .with_context(|| format!("{what} {url:?} has no host"))?;
        let default_port = if tls { 443 } else { 80 };
        Ok(Self {
            authority: format!("{host}:{}", uri.port_u16().unwrap_or(default_port)),
            base_path: uri.path().trim_end_matches('/').to_string(),
            // An IPv6 literal is written in brackets in URLs, bare in certificates.
            tls_host: tls.then(|| host.trim_matches(['[', ']']).to_string()),
        })
    }
}

/// Why a request got no HTTP answer.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach {authority}: {reason}")]
pub struct Unreachable {
    pub authority: String,
    pub reason: String,
}

/// Sends `body` (if any) as JSON to `path` under the target; returns the status and the JSON
/// answer (a non-JSON answer becomes `{"error": {"message": <text>}}`).
pub async fn send(
    target: &Target,
    method: Method,
    path: &str,
    api_key: Option<&str>,
    body: Option<&Value>,
) -> Result<(StatusCode, Value), Unreachable> {
    let response = open(target, method, path, api_key, body).await?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| target.unreachable(&e))?
        .to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        json!({"error": {"message": String::from_utf8_lossy(&bytes).chars().take(500).collect::<String>()}})
    });
    Ok((status, value))
}

/// Sends `body` as [`send`] does and returns the answer as it arrives (its body unread: a
/// stream of server-sent events, say).
pub async fn open(
    target: &Target,
    method: Method,
    path: &str,
    api_key: Option<&str>,
    body: Option<&Value>,
) -> Result<hyper::Response<Incoming>, Unreachable> {
    let unreachable = |e: &dyn std::fmt::Display| target.unreachable(e);
    let stream = tokio::net::TcpStream::connect(&target.authority)
        .await
        .map_err(|e| unreachable(&e))?;
    let Some(host) = &target.tls_host else {
        return exchange(stream, target, method, path, api_key, body).await;
    };
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| unreachable(&format!("{host:?} is not a valid TLS server name: {e}")))?;
    let config = tls_config().map_err(|e| unreachable(&e))?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|e| unreachable(&format!("TLS: {e}")))?;
    exchange(stream, target, method, path, api_key, body).await
}

/// The TLS client settings, built once: the system's root certificates (or those in
/// `SSL_CERT_FILE` / `SSL_CERT_DIR`).
fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found.errors.first().map_or(String::new(), |e| format!(": {e}"));
                return Err(format!(
                    "no root certificates found for https{why} (install the system's CA certificates, e.g. the ca-certificates package, or point SSL_CERT_FILE at a PEM file)"
                ));
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .clone()
}

/// One request and its answer over an open connection (plain or TLS).
async fn exchange(
    io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    target: &Target,
    method: Method,
    path: &str,
    api_key: Option<&str>,
    body: Option<&Value>,
) -> Result<hyper::Response<Incoming>, Unreachable> {
    let unreachable = |e: &dyn std::fmt::Display| target.unreachable(e);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| unreachable(&e))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{}{path}", target.base_path))
        .header(hyper::header::HOST, &target.authority)
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(key) = api_key {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let payload = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let req = req.body(Full::new(payload)).map_err(|e| unreachable(&e))?;
    sender.send_request(req).await.map_err(|e| unreachable(&e))
}

/// A response body read as server-sent events: each [`Events::next`] is one event's text
/// (its `data:`/`event:` lines), however the bytes were split into frames.
pub struct Events {
    body: Incoming,
    pending: Vec<u8>,
}

impl Events {
    pub fn new(body: Incoming) -> Self {
        Self {
            body,
            pending: Vec::new(),
        }
    }

    /// The next event, `None` at the end of the body.
    pub async fn next(&mut self) -> Option<Result<String, hyper::Error>> {
        loop {
            if let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.pending.drain(..end + 2).collect();
                return Some(Ok(String::from_utf8_lossy(&event).into_owned()));
            }
            match self.body.frame().await? {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending.extend_from_slice(&data);
                    }
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// The payload of an event's `data: ` line, if it has one.
pub fn event_data(event: &str) -> Option<&str> {
    event.lines().find_map(|l| l.strip_prefix("data: "))
}
