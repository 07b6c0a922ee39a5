//! A minimal HTTP/1.1 JSON client over hyper, for loopback and local-network peers (the judge
//! endpoint, `clawrl-tui ctl` talking to a running server). Plain http only.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// Where requests go: `host:port` and a path prefix.
#[derive(Debug, Clone)]
pub struct Target {
    pub authority: String,
    pub base_path: String,
}

impl Target {
    /// Parses `http://host[:port][/path]`; `what` names the setting in errors.
    pub fn parse(url: &str, what: &str) -> Result<Self> {
        let uri: Uri = url
            .parse()
            .map_err(|e| anyhow::anyhow!("{what} {url:?}: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => bail!(
                "{what} {url:?}: https is not supported; reach the endpoint over http (e.g. through a local TLS proxy such as `stunnel`)"
            ),
            _ => bail!("{what} {url:?} must start with http://"),
        }
        let host = uri
            .host()
            .with_context(|| format!("{what} {url:?} has no host"))?;
        Ok(Self {
            authority: format!("{host}:{}", uri.port_u16().unwrap_or(80)),
            base_path: uri.path().trim_end_matches('/').to_string(),
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
    let unreachable = |e: &dyn std::fmt::Display| Unreachable {
        authority: target.authority.clone(),
        reason: e.to_string(),
    };
    let stream = tokio::net::TcpStream::connect(&target.authority)
        .await
        .map_err(|e| unreachable(&e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
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
    let res = sender
        .send_request(req)
        .await
        .map_err(|e| unreachable(&e))?;
    let status = res.status();
    let bytes = res
        .into_body()
        .collect()
        .await
        .map_err(|e| unreachable(&e))?
        .to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        json!({"error": {"message": String::from_utf8_lossy(&bytes).chars().take(500).collect::<String>()}})
    });
    Ok((status, value))
}
