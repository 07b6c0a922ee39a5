//! The control center against a server elsewhere (`clawrl-tui attach`): the same screen,
//! fed by the server's authenticated admin routes instead of an in-process core. Events come
//! as server-sent events from `/admin/events` (after a dropped connection the screen
//! reconnects and reloads its history, so nothing missed stays missing); the history from
//! `/admin/snapshot`; the readings from `/admin/telemetry`; commands go out as the same
//! requests `ctl` and the clients send.

use crate::state::ServingSample;
use crate::{Incoming, Input};
use anyhow::{Context, Result, bail};
use clawrl_core::commands::{Command, CommandSender};
use clawrl_core::events::{Event, Level};
use clawrl_core::http_client::{self, Target};
use clawrl_core::store::{Snapshot, TurnRef};
use clawrl_core::telemetry::hardware::Hardware;
use hyper::Method;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{self, UnboundedSender};

/// A server the screen is attached to.
pub struct Remote {
    target: Target,
    key: Option<String>,
}

impl Remote {
    pub fn new(url: &str, key: Option<String>) -> Result<Self> {
        Ok(Self {
            target: Target::parse(url, "--url")?,
            key,
        })
    }

    /// A request's JSON answer, or why it failed (the server's own message when it gave one).
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, String> {
        let (status, answer) =
            http_client::send(&self.target, method, path, self.key.as_deref(), body)
                .await
                .map_err(|e| e.to_string())?;
        if status.is_success() {
            return Ok(answer);
        }
        let message = answer["error"]["message"]
            .as_str()
            .map_or_else(|| answer.to_string(), str::to_owned);
        Err(format!("{status}: {message}"))
    }

    /// The served model's name, which also checks that the server answers and takes the key.
    pub async fn model(&self) -> Result<String> {
        let models = self
            .call(Method::GET, "/v1/models", None)
            .await
            .map_err(anyhow::Error::msg)?;
        self.call(Method::GET, "/admin/status", None)
            .await
            .map_err(anyhow::Error::msg)?;
        models["data"][0]["id"]
            .as_str()
            .map(str::to_owned)
            .context("the server lists no model")
    }

    pub async fn snapshot(&self, sessions: usize, turns: usize) -> Result<Snapshot> {
        let path = format!("/admin/snapshot?sessions={sessions}&turns={turns}");
        let answer = self
            .call(Method::GET, &path, None)
            .await
            .map_err(anyhow::Error::msg)?;
        serde_json::from_value(answer).context("the server's history")
    }

    /// Samples the server's counters and hardware every second, as the local sampler does.
    pub(crate) fn spawn_sampler(self: Arc<Self>, tx: UnboundedSender<Input>) {
        tokio::spawn(async move {
            loop {
                if let Ok(t) = self.call(Method::GET, "/admin/telemetry", None).await {
                    let s = &t["serving"];
                    let n = |k: &str| s[k].as_u64().unwrap_or(0);
                    let serving = ServingSample {
                        tokens_out: n("tokens_out"),
                        decode_micros: n("decode_micros"),
                        queue_depth: n("queue_depth"),
                        active: n("active_sequences"),
                        prefix_cache_bytes: n("prefix_cache_bytes"),
                        policy_weight_bytes: n("policy_weight_bytes"),
                        judge_weight_bytes: n("judge_weight_bytes"),
                    };
                    let hardware: Hardware =
                        serde_json::from_value(t["hardware"].clone()).unwrap_or_default();
                    if tx.send(Input::Sampled(hardware, serving)).is_err() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    /// Connects: the server's events as the screen's incoming, and a command sender whose
    /// commands become requests (their outcomes come back as notices).
    pub fn connect(self: Arc<Self>) -> (mpsc::UnboundedReceiver<Incoming>, CommandSender) {
        let (incoming, rx) = mpsc::unbounded_channel();
        let (commands, mut received) = mpsc::unbounded_channel::<Command>();
        tokio::spawn(self.clone().follow_events(incoming.clone()));
        tokio::spawn(async move {
            while let Some(command) = received.recv().await {
                let (remote, incoming) = (self.clone(), incoming.clone());
                // Each on its own: a chat waits for its reply, a rating must not wait for it.
                tokio::spawn(async move {
                    let (level, text) = match remote.execute(command).await {
                        Ok(text) => (Level::Info, text),
                        Err(text) => (Level::Error, text),
                    };
                    if !text.is_empty() {
                        let _ = incoming.send(Incoming::Event(Event::Notice { level, text }));
                    }
                });
            }
        });
        (rx, commands)
    }

    /// Reads `/admin/events` for as long as the screen runs, reconnecting after a drop.
    async fn follow_events(self: Arc<Self>, incoming: UnboundedSender<Incoming>) {
        let mut first = true;
        loop {
            let why = match self.read_events(&incoming, first).await {
                Ok(()) => "the server closed the event stream".to_string(),
                Err(e) => format!("{e:#}"),
            };
            if incoming.is_closed() {
                return;
            }
            first = false;
            let text = format!("Lost the server's events ({why}); reconnecting.");
            let _ = incoming.send(Incoming::Event(Event::Notice {
                level: Level::Error,
                text,
            }));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn read_events(&self, incoming: &UnboundedSender<Incoming>, first: bool) -> Result<()> {
        let response = http_client::open(
            &self.target,
            Method::GET,
            "/admin/events",
            self.key.as_deref(),
            None,
        )
        .await?;
        if !response.status().is_success() {
            bail!("GET /admin/events answered {}", response.status());
        }
        if !first {
            // What happened while disconnected is in the history.
            let _ = incoming.send(Incoming::Missed);
        }
        let mut events = http_client::Events::new(response.into_body());
        while let Some(event) = events.next().await {
            let Some(received) = parse_event(&event?) else {
                continue;
            };
            if incoming.send(received).is_err() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Runs one command against the server; `Ok` says what happened, `Err` why it did not.
    async fn execute(&self, command: Command) -> Result<String, String> {
        let post = |path: String, body: Value| async move {
            self.call(Method::POST, &path, Some(&body)).await
        };
        match command {
            Command::Chat {
                session_id,
                messages,
            } => {
                let body = json!({"messages": messages, "session_id": session_id});
                post("/v1/chat/completions".into(), body)
                    .await
                    .map(|_| String::new())
            }
            Command::EndChat { session_id } => {
                let path = format!("/admin/sessions/{}/close", urlencode(&session_id));
                post(path, json!({})).await.map(|_| String::new())
            }
            Command::Rate { turn, rating } => {
                let mut body = match turn {
                    TurnRef::ResponseId(id) => json!({"response_id": id}),
                    TurnRef::Index {
                        session_id,
                        turn_index,
                    } => json!({"session_id": session_id, "turn": turn_index}),
                };
                body["rating"] = json!(if rating > 0 { "up" } else { "down" });
                let r = post("/v1/feedback".into(), body).await?;
                let word = if rating > 0 { "up" } else { "down" };
                Ok(format!(
                    "Rated turn {} of {} {word}.",
                    r["turn"],
                    r["session_id"].as_str().unwrap_or("?")
                ))
            }
            Command::Approve(id) => post(format!("/admin/versions/{id}/approve"), json!({}))
                .await
                .map(|_| format!("v{id} approved.")),
            Command::Veto(id) => post(format!("/admin/versions/{id}/veto"), json!({}))
                .await
                .map(|_| format!("v{id} vetoed.")),
            Command::Rollback(target) => {
                let r = post("/admin/rollback".into(), json!({"version": target})).await?;
                Ok(format!("Rolled back from v{} to v{}.", r["from"], r["to"]))
            }
            Command::PauseTraining => post("/admin/pause".into(), json!({}))
                .await
                .map(|_| String::new()),
            Command::ResumeTraining => post("/admin/resume".into(), json!({}))
                .await
                .map(|_| String::new()),
        }
    }
}

/// One server-sent event: an [`Event`], `resync` (some were missed), or nothing (a comment).
fn parse_event(text: &str) -> Option<Incoming> {
    let mut kind = None;
    let mut data = String::new();
    for line in text.lines() {
        if let Some(k) = line.strip_prefix("event: ") {
            kind = Some(k.trim());
        } else if let Some(d) = line.strip_prefix("data: ") {
            data.push_str(d);
        }
    }
    match kind {
        Some("resync") => Some(Incoming::Missed),
        _ if data.is_empty() => None,
        _ => match serde_json::from_str::<Event>(&data) {
            Ok(e) => Some(Incoming::Event(e)),
            // A newer server's event this screen does not know: reload what it changed.
            Err(_) => Some(Incoming::Missed),
        },
    }
}

/// A session id as one path segment.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_sent_events_become_events_resyncs_or_nothing() {
        let notice = Event::Notice {
            level: Level::Info,
            text: "hi".into(),
        };
        let line = format!("data: {}\n\n", serde_json::to_string(&notice).unwrap());
        assert!(matches!(parse_event(&line), Some(Incoming::Event(e)) if e == notice));
        assert!(matches!(
            parse_event("event: resync\ndata: {}\n\n"),
            Some(Incoming::Missed)
        ));
        assert!(parse_event(": keepalive\n\n").is_none());
        assert!(matches!(
            parse_event("data: {\"event\": \"from_the_future\"}\n\n"),
            Some(Incoming::Missed)
        ));
        assert_eq!(urlencode("tui-1a/b c"), "tui-1a%2Fb%20c");
    }
}
