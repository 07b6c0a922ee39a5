//! `clawrl-tui bench --judge`: the judge's voting modes on the local model, on labelled turns
//! whose right verdict is clear to a person: valid-vote rate, agreement with the label, and
//! time per turn, printed against the `reason` mode (upstream's way) as the baseline.

use anyhow::{Result, bail};
use clawrl_core::config::{Config, JudgeBackend, JudgeMode};
use clawrl_core::engine::{Engine, Status};
use clawrl_core::judge::Voter;
use clawrl_core::store::{PendingTurn, Vote};
use clawrl_core::telemetry::Counters;
use clawrl_model::messages::{Message, Role, ToolCall};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A labelled turn (assets/judge/labelled.json): what the user asked, the reply (and the tool it
/// called), what came next, and the score a person gives it; `kind` groups them (satisfied,
/// length, format, language, meant, redo, tone, factual, ambiguous, tool-ok, tool-error).
#[derive(serde::Deserialize)]
struct Case {
    kind: String,
    request: String,
    reply: String,
    tool_call: Option<(String, String)>,
    next: String,
    role: String,
    want: i8,
}

fn cases() -> Vec<Case> {
    serde_json::from_str(include_str!("../../assets/judge/labelled.json"))
        .expect("assets/judge/labelled.json parses")
}

fn turn(i: usize, c: &Case) -> PendingTurn {
    let next_state = vec![if c.role == "tool" {
        Message {
            tool_call_id: Some("call_1".into()),
            ..Message::new(Role::Tool, c.next.clone())
        }
    } else {
        Message::user(c.next.clone())
    }];
    PendingTurn {
        turn_id: i as i64 + 1,
        session_id: format!("bench-{i}"),
        request_messages: vec![Message::user(c.request.clone())],
        response_text: c.reply.clone(),
        tool_calls: c
            .tool_call
            .iter()
            .map(|(name, args)| ToolCall::function("call_1".into(), name.clone(), args.clone()))
            .collect(),
        next_state,
        next_state_role: c.role.clone(),
    }
}

struct Row {
    mode: String,
    valid: usize,
    votes: usize,
    agree: usize,
    secs: f64,
    /// Per kind: (agreed, turns).
    kinds: std::collections::BTreeMap<String, (usize, usize)>,
    /// Direct mode: each turn's p(+1), p(0), p(−1) and its label.
    probs: Vec<([f64; 3], i8)>,
    /// With hints: corrections given a usable hint, and of those how many restate the reply.
    hints: (usize, usize, usize),
}

/// The score a calibrated direct judge gives: −1 when p(−1) ≥ `t`, else the likelier of +1 and 0.
fn thresholded(p: &[f64; 3], t: f64) -> i8 {
    if p[2] >= t {
        -1
    } else if p[0] >= p[1] {
        1
    } else {
        0
    }
}

pub fn run(cfg: &Config, modes: &[String], with_hints: bool) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let cases = cases();
    runtime.block_on(async {
        let engine = start_judge_engine(cfg).await?;
        let info = engine.info().expect("ready engine has info");
        let rss = super::train::rss_mb();
        println!(
            "judge: {} (local), {} labelled turns, {} votes each, temperature {}, reason max_tokens {}, prompts {}; RSS after loading {} MB",
            info.name,
            cases.len(),
            cfg.judge.votes,
            cfg.judge.temperature,
            cfg.judge.max_tokens,
            if cfg.judge.prompts_dir.is_empty() {
                "built in"
            } else {
                &cfg.judge.prompts_dir
            },
            rss.map_or("?".into(), |m| format!("{m:.0}"))
        );
        let mut rows = Vec::new();
        for name in modes {
            rows.push(judge_cases(cfg, &engine, name, with_hints, &cases).await?);
        }
        print_summary(&rows, cases.len(), with_hints);
        if let Some(mb) = super::train::peak_rss_mb() {
            println!("peak RSS {mb:.0} MB");
        }
        Ok::<_, anyhow::Error>(())
    })
}

/// The judge's own model when `judge.model` names one, else the policy's; once loaded.
async fn start_judge_engine(cfg: &Config) -> Result<Engine> {
    let engine_cfg = match clawrl_core::engine::EngineConfig::judge(cfg)? {
        Some(own) => own,
        None => clawrl_core::engine::EngineConfig::policy(cfg)?,
    };
    let engine = Engine::start(
        engine_cfg,
        Arc::new(Counters::default()),
        |_| (0, None),
        |_| {},
    );
    loop {
        match engine.status() {
            Status::Ready => return Ok(engine),
            Status::Failed(e) => bail!("the model failed to load: {e}"),
            Status::Loading => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Every labelled case judged in mode `name`, one line each; the mode's totals.
async fn judge_cases(
    cfg: &Config,
    engine: &Engine,
    name: &str,
    with_hints: bool,
    cases: &[Case],
) -> Result<Row> {
    let mode = match name {
        "reason" => JudgeMode::Reason,
        "direct" => JudgeMode::Direct,
        other => bail!("unknown judge mode {other:?} (reason, direct)"),
    };
    let mut c = cfg.clone();
    c.judge.backend = JudgeBackend::Local;
    c.judge.model.clear(); // `engine` is already the judge's
    c.judge.mode = mode;
    c.judge.hints = with_hints;
    let voter = Voter::from_config(&c, engine, None)?.expect("local judge");
    let mut row = Row {
        mode: name.to_string(),
        valid: 0,
        votes: 0,
        agree: 0,
        secs: 0.0,
        kinds: Default::default(),
        probs: Vec::new(),
        hints: (0, 0, 0),
    };
    for (i, case) in cases.iter().enumerate() {
        let t = Instant::now();
        let j = voter.judge(&turn(i, case)).await?;
        row.secs += t.elapsed().as_secs_f64();
        if let Some(e) = &j.error {
            bail!("the judge failed on case {i}: {e}");
        }
        let scores: Vec<_> = j.votes.iter().filter(|v| v.kind == "score").collect();
        row.votes += scores.len();
        row.valid += scores.iter().filter(|v| v.score.is_some()).count();
        let agreed = j.score == case.want;
        row.agree += agreed as usize;
        let k = row.kinds.entry(case.kind.clone()).or_default();
        k.0 += agreed as usize;
        k.1 += 1;
        let shown: Vec<String> = scores
            .iter()
            .map(|v| v.score.map_or("invalid".into(), |s| s.to_string()))
            .collect();
        let p = scores.first().and_then(|v| v.probs.as_ref()).map(|p| {
            let f = |k: &str| p[k].as_f64().unwrap_or(0.0);
            [f("1"), f("0"), f("-1")]
        });
        let shown_p = p.map_or(String::new(), |p| {
            format!(" (p+1 {:.2}, p0 {:.2}, p-1 {:.2})", p[0], p[1], p[2])
        });
        if let Some(p) = p {
            row.probs.push((p, case.want));
        }
        let hint = if with_hints && case.want == -1 && case.role == "user" {
            row.hint_of_correction(&j.votes, case)
        } else {
            String::new()
        };
        println!(
            "  {name:6} case {i:>2} {:<10}: want {:+}, votes [{}] -> {:+}{shown_p}{hint}",
            case.kind,
            case.want,
            shown.join(", "),
            j.score
        );
    }
    Ok(row)
}

impl Row {
    /// Counts a correction's longest usable hint (and whether it restates the reply); what
    /// the case's line shows of it.
    fn hint_of_correction(&mut self, votes: &[Vote], case: &Case) -> String {
        self.hints.0 += 1;
        let usable: Vec<String> = votes
            .iter()
            .filter(|v| v.kind == "hint")
            .filter_map(|v| clawrl_core::judge::verdict::usable_hint(&v.raw))
            .collect();
        let Some(h) = usable.iter().max_by_key(|h| h.chars().count()) else {
            return String::new();
        };
        let restates = clawrl_core::judge::verdict::restates(h, &case.reply);
        self.hints.1 += 1;
        self.hints.2 += restates as usize;
        format!(
            " hint{}: {:?}",
            if restates {
                " (restates the reply: dropped)"
            } else {
                ""
            },
            h.chars().take(80).collect::<String>()
        )
    }
}

/// The modes side by side: valid votes, agreement, time; by kind, hints, thresholds.
fn print_summary(rows: &[Row], n: usize, with_hints: bool) {
    let base = rows.first().map_or(1.0, |r| r.secs / n as f64);
    println!(
        "\nmode    valid votes     agreement  s/turn  time vs {}",
        rows.first().map_or("", |r| r.mode.as_str())
    );
    for r in rows {
        let per = r.secs / n as f64;
        println!(
            "{:6}  {:>3}/{:<3} ({:>3.0}%)  {}/{}        {:>6.2}  {:.3}x",
            r.mode,
            r.valid,
            r.votes,
            100.0 * r.valid as f64 / r.votes.max(1) as f64,
            r.agree,
            n,
            per,
            per / base
        );
    }
    for r in rows {
        let kinds: Vec<String> = r
            .kinds
            .iter()
            .map(|(k, (a, t))| format!("{k} {a}/{t}"))
            .collect();
        println!("{:6}  agreement by kind: {}", r.mode, kinds.join(", "));
        if with_hints {
            println!(
                "{:6}  corrections with a usable hint: {} of {}; of those restating the reply (dropped): {}",
                r.mode, r.hints.1, r.hints.0, r.hints.2
            );
        }
        if !r.probs.is_empty() {
            // A calibrated threshold on p(−1) instead of votes drawn from the probabilities.
            let sweep: Vec<String> = [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5]
                .iter()
                .map(|&t| {
                    let agree = r
                        .probs
                        .iter()
                        .filter(|(p, want)| thresholded(p, t) == *want)
                        .count();
                    format!("{t:.2}: {agree}/{n}")
                })
                .collect();
            println!(
                "{:6}  −1 when p(−1) ≥ t (else the likelier of +1 and 0): {}",
                r.mode,
                sweep.join(", ")
            );
        }
    }
}
