//! A scripted OpenAI-compatible judge on loopback: canned vote texts per scenario.
#![allow(dead_code)]

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A scripted judge: answers each chat completion with the next canned text for the scenario
/// its prompt belongs to (found by a marker in the next state), counting requests.
pub struct ScriptedJudge {
    pub port: u16,
    /// Every request body received.
    pub seen: Arc<Mutex<Vec<Value>>>,
    /// While set, requests are accepted but never answered (a judge that hangs).
    pub hold: Arc<AtomicBool>,
    /// `https` when it speaks TLS.
    scheme: &'static str,
}

/// A self-signed certificate for `localhost` and 127.0.0.1: (PEM of the certificate, TLS
/// server settings).
pub fn self_signed_localhost() -> (String, Arc<rustls::ServerConfig>) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    (cert.cert.pem(), Arc::new(config))
}

impl ScriptedJudge {
    /// Starts the judge on a loopback port. A prompt belongs to the first of `markers` it
    /// contains (or to ""); `script(marker)` gives its (PRM vote texts, hint vote texts),
    /// answered in turn.
    pub fn start(
        markers: &'static [&'static str],
        script: fn(&str) -> (&'static [&'static str], &'static [&'static str]),
    ) -> Self {
        Self::start_with(markers, script, None)
    }

    /// The same judge behind TLS with `tls`'s certificate.
    pub fn start_tls(
        markers: &'static [&'static str],
        script: fn(&str) -> (&'static [&'static str], &'static [&'static str]),
        tls: Arc<rustls::ServerConfig>,
    ) -> Self {
        Self::start_with(markers, script, Some(tls))
    }

    fn start_with(
        markers: &'static [&'static str],
        script: fn(&str) -> (&'static [&'static str], &'static [&'static str]),
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Self {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::<Value>::new()));
        let hold = Arc::new(AtomicBool::new(false));
        let (seen2, hold2) = (seen.clone(), hold.clone());
        let counters = Arc::new(Mutex::new(std::collections::HashMap::<String, usize>::new()));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let (seen, hold, counters) = (seen2.clone(), hold2.clone(), counters.clone());
                let tls = tls.clone();
                std::thread::spawn(move || {
                    let tcp = stream.unwrap();
                    match tls {
                        Some(config) => {
                            let conn = rustls::ServerConnection::new(config).unwrap();
                            let mut stream = rustls::StreamOwned::new(conn, tcp);
                            answer(&mut stream, markers, script, &seen, &hold, &counters);
                            stream.conn.send_close_notify();
                            let _ = stream.flush();
                        }
                        None => answer(tcp, markers, script, &seen, &hold, &counters),
                    }
                });
            }
        });
        Self {
            port,
            seen,
            hold,
            scheme,
        }
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CLAWRL__JUDGE__BACKEND", "openai".into()),
            (
                "CLAWRL__JUDGE__OPENAI__BASE_URL",
                format!("{}://127.0.0.1:{}/v1", self.scheme, self.port),
            ),
            ("CLAWRL__JUDGE__OPENAI__MODEL", "scripted-judge".into()),
        ]
    }

    pub fn requests_for(&self, marker: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|b| b["messages"].to_string().contains(marker))
            .count()
    }
}

/// Reads one request from `stream` and answers it from the script.
fn answer(
    mut stream: impl Read + Write,
    markers: &[&str],
    script: fn(&str) -> (&'static [&'static str], &'static [&'static str]),
    seen: &Mutex<Vec<Value>>,
    hold: &AtomicBool,
    counters: &Mutex<std::collections::HashMap<String, usize>>,
) {
    let mut reader = BufReader::new(&mut stream);
    let mut len = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    seen.lock().unwrap().push(body.clone());
    while hold.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
        if seen.lock().unwrap().is_empty() {
            return; // the test reset: drop this connection unanswered
        }
    }
    let prompt = body["messages"].to_string();
    let marker = markers
        .iter()
        .find(|m| prompt.contains(**m))
        .copied()
        .unwrap_or("");
    let hint = body["messages"][0]["content"]
        .as_str()
        .unwrap()
        .contains("[HINT_START]");
    let key = format!("{marker}/{hint}");
    let n = {
        let mut c = counters.lock().unwrap();
        let n = c.entry(key).or_default();
        *n += 1;
        *n - 1
    };
    let (prm, hints) = script(marker);
    let texts = if hint { hints } else { prm };
    let reply = json!({"id": "j", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": texts[n % texts.len()]}, "finish_reason": "stop"}]});
    let reply = reply.to_string();
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
        reply.len()
    );
}
