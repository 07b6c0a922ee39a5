//! `clawrl-tui bench --judge`: the judge's voting modes on the local model, on labelled turns
//! whose right verdict is clear to a person: valid-vote rate, agreement with the label, and
//! time per turn, printed against the `reason` mode (upstream's way) as the baseline.

use crate::config::{Config, JudgeBackend, JudgeMode};
use crate::engine::{Engine, Status};
use crate::judge::Voter;
use crate::store::PendingTurn;
use crate::telemetry::Counters;
use anyhow::{Result, bail};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// (request, reply, tool call of the reply, next state, its role, the right score)
type Case = (
    &'static str,
    &'static str,
    Option<(&'static str, &'static str)>,
    &'static str,
    &'static str,
    i8,
);

const CASES: &[Case] = &[
    (
        "Convert 5 miles to kilometres.",
        "5 miles is about 8.05 km.",
        None,
        "Thanks, that's exactly what I needed!",
        "user",
        1,
    ),
    (
        "Write a haiku about rain.",
        "Soft rain on the roof / puddles gather in the street / the city breathes slow",
        None,
        "No, I meant a haiku about snow, not rain.",
        "user",
        -1,
    ),
    (
        "What's the weather in Paris?",
        "",
        Some(("get_weather", r#"{"city":"Paris"}"#)),
        "18°C, sunny, light wind.",
        "tool",
        1,
    ),
    (
        "List three fruits.",
        "Apple, banana, cherry.",
        None,
        "Great. Now list three vegetables.",
        "user",
        1,
    ),
    (
        "Summarize this paragraph in one sentence.",
        "The paragraph explains the history of the city. It then describes its economy. Finally it covers its culture.",
        None,
        "That's three sentences. I asked for one sentence, please redo it.",
        "user",
        -1,
    ),
    (
        "Show me the project's config file.",
        "",
        Some(("read_file", r#"{"path":"config.tml"}"#)),
        "Error: no such file or directory: config.tml",
        "tool",
        -1,
    ),
    (
        "Translate 'good morning' into French.",
        "Buenos días.",
        None,
        "That's Spanish, not French. Try again.",
        "user",
        -1,
    ),
    (
        "What is 12 times 12?",
        "12 times 12 is 144.",
        None,
        "Perfect, thank you.",
        "user",
        1,
    ),
];

fn turn(i: usize, c: &Case) -> PendingTurn {
    let (request, reply, call, next, role, _) = *c;
    let next_state = if role == "tool" {
        json!([{"role": "tool", "tool_call_id": "call_1", "content": next}])
    } else {
        json!([{"role": "user", "content": next}])
    };
    PendingTurn {
        turn_id: i as i64 + 1,
        session_id: format!("bench-{i}"),
        request_messages: json!([{"role": "user", "content": request}]),
        response_text: reply.into(),
        tool_calls: call.map(|(name, args)| {
            json!([{"id": "call_1", "type": "function", "function": {"name": name, "arguments": args}}])
        }),
        next_state,
        next_state_role: role.into(),
    }
}

struct Row {
    mode: String,
    valid: usize,
    votes: usize,
    agree: usize,
    secs: f64,
}

pub fn run(cfg: &Config, modes: &[String]) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let engine = Engine::start(
            crate::app::engine_config(cfg)?,
            Arc::new(Counters::default()),
            |_| (0, None),
            |_| {},
        );
        loop {
            match engine.status() {
                Status::Ready => break,
                Status::Failed(e) => bail!("the model failed to load: {e}"),
                Status::Loading => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let info = engine.info().expect("ready engine has info");
        println!("judge: {} (local), {} labelled turns, {} votes each, temperature {}, reason max_tokens {}",
            info.name, CASES.len(), cfg.judge.votes, cfg.judge.temperature, cfg.judge.max_tokens);
        let mut rows = Vec::new();
        for name in modes {
            let mode = match name.as_str() {
                "reason" => JudgeMode::Reason,
                "direct" => JudgeMode::Direct,
                other => bail!("unknown judge mode {other:?} (reason, direct)"),
            };
            let mut c = cfg.clone();
            c.judge.backend = JudgeBackend::Local;
            c.judge.mode = mode;
            c.judge.hints = false;
            let voter = Voter::from_config(&c, &engine)?.expect("local judge");
            let mut row = Row { mode: name.clone(), valid: 0, votes: 0, agree: 0, secs: 0.0 };
            for (i, case) in CASES.iter().enumerate() {
                let t = Instant::now();
                let j = voter.judge(&turn(i, case)).await?;
                row.secs += t.elapsed().as_secs_f64();
                if let Some(e) = &j.error {
                    bail!("the judge failed on case {i}: {e}");
                }
                row.votes += j.votes.len();
                row.valid += j.votes.iter().filter(|v| v.score.is_some()).count();
                row.agree += (j.score == case.5) as usize;
                let shown: Vec<String> = j.votes.iter().map(|v| v.score.map_or("invalid".into(), |s| s.to_string())).collect();
                let probs = j.votes.first().and_then(|v| v.probs.as_ref()).map_or(String::new(), |p| {
                    format!(" (p+1 {:.2}, p0 {:.2}, p-1 {:.2})", p["1"].as_f64().unwrap_or(0.0), p["0"].as_f64().unwrap_or(0.0), p["-1"].as_f64().unwrap_or(0.0))
                });
                println!("  {name:6} case {i}: want {:+}, votes [{}] -> {:+}{probs}", case.5, shown.join(", "), j.score);
            }
            rows.push(row);
        }
        let base = rows.first().map_or(1.0, |r| r.secs / CASES.len() as f64);
        println!("\nmode    valid votes     agreement  s/turn  time vs {}", modes.first().map_or("", String::as_str));
        for r in &rows {
            let per = r.secs / CASES.len() as f64;
            println!(
                "{:6}  {:>3}/{:<3} ({:>3.0}%)  {}/{}        {:>6.2}  {:.3}x",
                r.mode, r.valid, r.votes, 100.0 * r.valid as f64 / r.votes.max(1) as f64,
                r.agree, CASES.len(), per, per / base
            );
        }
        Ok::<_, anyhow::Error>(())
    })
}
