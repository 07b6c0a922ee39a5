//! `clawrl-tui ctl`: control a running server from the shell (status, versions, approve, veto,
//! rollback, pause, resume) through its authenticated `/admin` routes. Human-readable by
//! default, `--json` for scripts.

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use clawrl_core::config::Config;
use clawrl_core::http_client::{self, Target};
use hyper::Method;
use serde_json::{Value, json};
use std::fmt::Write as _;

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The server (default: http://<server.host>:<server.port> from the config, i.e.
    /// http://127.0.0.1:30000; https:// trusts the system's root certificates, or those in
    /// SSL_CERT_FILE / SSL_CERT_DIR). Like every flag here, it goes anywhere on the line.
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// The server's API key (default: $CLAWRL_API_KEY, else server.api_key from the config).
    #[arg(long, env = "CLAWRL_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
    /// Print the server's JSON answer instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// The live version, the trainer's state, samples waiting and candidates.
    Status,
    /// Every version: parent, time, samples, loss, KL, mean reward, learning rate, guard verdict,
    /// state.
    Versions,
    /// Make a candidate live.
    Approve { id: String },
    /// Refuse a candidate for good.
    Veto { id: String },
    /// Serve an earlier version again (default: the version the live one was trained from;
    /// 0 = the base model).
    Rollback { id: Option<String> },
    /// Pause training (serving goes on; the pause survives restarts).
    Pause,
    /// Resume training.
    Resume,
}

/// `v3` or `3` → 3.
fn version_id(s: &str) -> Result<i64> {
    s.trim_start_matches('v')
        .parse::<i64>()
        .ok()
        .filter(|v| *v >= 0)
        .ok_or_else(|| {
            anyhow::anyhow!("{s:?} is not a version id (like 3 or v3; 0 = the base model)")
        })
}

pub fn run(cfg: &Config, args: &CtlArgs) -> Result<()> {
    let url = args
        .url
        .clone()
        .unwrap_or_else(|| format!("http://{}:{}", cfg.server.host, cfg.server.port));
    let target = Target::parse(&url, "--url")?;
    let key = args
        .api_key
        .clone()
        .or_else(|| (!cfg.server.api_key.is_empty()).then(|| cfg.server.api_key.clone()));
    let (method, path, body) = match &args.command {
        CtlCommand::Status => (Method::GET, "/admin/status".to_string(), None),
        CtlCommand::Versions => (Method::GET, "/admin/versions".to_string(), None),
        CtlCommand::Approve { id } => (
            Method::POST,
            format!("/admin/versions/{}/approve", version_id(id)?),
            None,
        ),
        CtlCommand::Veto { id } => (
            Method::POST,
            format!("/admin/versions/{}/veto", version_id(id)?),
            None,
        ),
        CtlCommand::Rollback { id } => {
            let body = match id {
                Some(id) => json!({"version": version_id(id)?}),
                None => json!({}),
            };
            (Method::POST, "/admin/rollback".to_string(), Some(body))
        }
        CtlCommand::Pause => (Method::POST, "/admin/pause".to_string(), None),
        CtlCommand::Resume => (Method::POST, "/admin/resume".to_string(), None),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, answer) = runtime
        .block_on(http_client::send(
            &target,
            method,
            &path,
            key.as_deref(),
            body.as_ref(),
        ))
        .map_err(|e| {
            anyhow::anyhow!("{e} (is `clawrl-tui serve` running there? --url sets the address)")
        })?;
    if !status.is_success() {
        let message = answer["error"]["message"].as_str().unwrap_or("no details");
        bail!("the server answered {status}: {message}");
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    print!("{}", human(&args.command, &answer));
    Ok(())
}

fn num(v: &Value, digits: usize) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.digits$}"))
}

/// The answer as text for a person.
pub fn human(command: &CtlCommand, a: &Value) -> String {
    let mut out = String::new();
    match command {
        CtlCommand::Status => status(&mut out, a),
        CtlCommand::Versions => versions(&mut out, a),
        CtlCommand::Approve { .. } | CtlCommand::Veto { .. } => {
            let v = &a["version"];
            let _ = writeln!(
                out,
                "v{} is {}; live version v{}",
                v["id"],
                v["state"].as_str().unwrap_or("?"),
                a["live_version"]
            );
        }
        CtlCommand::Rollback { .. } => {
            let _ = writeln!(
                out,
                "rolled back from v{} to v{}: the next request is served by v{}",
                a["from"], a["to"], a["to"]
            );
        }
        CtlCommand::Pause | CtlCommand::Resume => {
            let state = if a["paused"] == true {
                "paused"
            } else {
                "running"
            };
            let note = if a["changed"] == true {
                ""
            } else {
                " (it already was)"
            };
            let _ = writeln!(out, "training is {state}{note}");
        }
    }
    out
}

/// `ctl status`: the live version, the trainer, the candidates.
fn status(out: &mut String, a: &Value) {
    let t = &a["trainer"];
    let _ = writeln!(out, "live version  v{}", a["live_version"]);
    let _ = writeln!(out, "gate policy   {}", a["policy"].as_str().unwrap_or("?"));
    let _ = writeln!(
        out,
        "trainer       {}{}: {}",
        t["state"].as_str().unwrap_or("?"),
        if t["paused"] == true { " (paused)" } else { "" },
        t["detail"].as_str().unwrap_or("")
    );
    if let Some(u) = t["update"].as_object() {
        let _ = writeln!(
            out,
            "update        {}/{} samples from v{}, mean loss {}",
            u["done"],
            u["samples"],
            u["parent"],
            num(&u["mean_loss"], 4)
        );
    }
    let _ = writeln!(
        out,
        "samples       {} waiting",
        t["samples_waiting"].as_u64().unwrap_or(0)
    );
    let _ = writeln!(
        out,
        "updates       {} since start",
        t["updates"].as_u64().unwrap_or(0)
    );
    if let Some(e) = t["last_error"].as_str() {
        let _ = writeln!(out, "last error    {e}");
    }
    for r in a["replicas"].as_array().into_iter().flatten() {
        let state = match (r["up"].as_bool(), r["error"].as_str()) {
            (Some(true), _) => "up".to_string(),
            (_, Some(why)) => format!("DOWN: {why}"),
            _ => "down".to_string(),
        };
        let _ = writeln!(
            out,
            "replica       {} {state}",
            r["url"].as_str().unwrap_or("?")
        );
    }
    let candidates = a["candidates"].as_array().cloned().unwrap_or_default();
    if candidates.is_empty() {
        let _ = writeln!(out, "candidates    none");
    }
    for c in candidates {
        let _ = writeln!(out, "candidate     v{}: {}", c["id"], verdict(&c));
    }
}

/// `ctl versions`: one row per version, v0 first, the live one starred.
fn versions(out: &mut String, a: &Value) {
    let live = a["live_version"].as_i64().unwrap_or(0);
    // The columns of the rows below (widths as their format).
    let _ = writeln!(
        out,
        "  id    parent created              samples      loss  KL base  reward      lr guard                        state"
    );
    let base_state = if live == 0 { "live" } else { "base" };
    let _ = writeln!(
        out,
        "{} {:<5} {:<6} {:<20} {:>7} {:>9} {:>8} {:>7} {:>7} {:<28} {}",
        if live == 0 { "*" } else { " " },
        "v0",
        "-",
        "-",
        "-",
        "-",
        "-",
        "-",
        "-",
        "-",
        base_state
    );
    for v in a["versions"].as_array().into_iter().flatten() {
        let created = v["created_at"].as_str().unwrap_or("").replace('T', " ");
        let mut state = v["state"].as_str().unwrap_or("?").to_string();
        if v["error"].is_string() {
            state.push_str(" (adapter unreadable)");
        }
        let _ = writeln!(
            out,
            "{} {:<5} {:<6} {:<20} {:>7} {:>9} {:>8} {:>7} {:>7} {:<28} {}",
            if v["id"].as_i64() == Some(live) {
                "*"
            } else {
                " "
            },
            format!("v{}", v["id"]),
            format!("v{}", v["parent"]),
            created.get(..19).unwrap_or(&created),
            v["samples"].as_i64().unwrap_or(0),
            num(&v["loss"], 4),
            num(&v["kl_base"], 4),
            v["mean_reward"]
                .as_f64()
                .map_or("-".into(), |r| format!("{r:+.2}")),
            v["learning_rate"]
                .as_f64()
                .map_or("-".into(), |lr| format!("{lr:.1e}")),
            truncate(&verdict(v), 28),
            state
        );
    }
}

/// "pass" or "held: <reasons>".
fn verdict(v: &Value) -> String {
    let reasons: Vec<&str> = v["guard"]["reasons"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if reasons.is_empty() && v["guard_passed"] == true {
        "pass".into()
    } else if reasons.is_empty() {
        "fail".into()
    } else {
        format!("fail: {}", reasons.join("; "))
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}
