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
    // The kinds of next message a personal assistant sees most: style corrections and praise.
    (
        "How do I boil an egg?",
        "Here are the steps:\n- Put the egg in a pot of cold water.\n- Bring it to a boil.\n- Simmer for 9 minutes.\n- Cool it in cold water.",
        None,
        "Please don't use bullet lists, just tell me in a sentence or two.",
        "user",
        -1,
    ),
    (
        "What is the capital of Australia?",
        "Canberra.",
        None,
        "Nice, short and to the point. What about Canada?",
        "user",
        1,
    ),
    (
        "Why is the sky blue?",
        "Great question! The sky is blue because of a phenomenon called Rayleigh scattering, which is a fascinating topic in physics that has been studied for centuries by many scientists, and which involves the way light interacts with the molecules of the atmosphere, scattering shorter wavelengths more than longer ones, which is why we see blue during the day and red at sunset, and this also explains many other things.",
        None,
        "Way too long. Shorter please.",
        "user",
        -1,
    ),
    (
        "Give me a word that rhymes with 'cat'.",
        "Hat.",
        None,
        "Thanks!",
        "user",
        1,
    ),
    (
        "Help me name my new puppy.",
        "How about Biscuit? Do you want something playful or something classic?",
        None,
        "Playful, I like that you asked. Biscuit is cute, more like that?",
        "user",
        1,
    ),
    (
        "How many days are in a leap year?",
        "Sure! I'd be happy to help with that. A leap year has 366 days.",
        None,
        "Skip the preamble next time, just give me the answer.",
        "user",
        -1,
    ),
    (
        "Run the unit tests.",
        "",
        Some(("run_command", r#"{"cmd":"cargo test"}"#)),
        "test result: ok. 42 passed; 0 failed",
        "tool",
        1,
    ),
    (
        "Delete the temporary files.",
        "",
        Some(("run_command", r#"{"cmd":"rm -rf /tmp/build-cache"}"#)),
        "rm: cannot remove '/tmp/build-cache': Permission denied",
        "tool",
        -1,
    ),
    (
        "What's 15% of 80?",
        "15% of 80 is 16.",
        None,
        "Wrong, it's 12. Please double-check your math.",
        "user",
        -1,
    ),
    (
        "Recommend a book about the history of science.",
        "A Short History of Nearly Everything by Bill Bryson.",
        None,
        "Oh I love that one, great pick. Thanks!",
        "user",
        1,
    ),
    (
        "Write a one-line Python function that doubles a number.",
        "def double(x): return x * 2",
        None,
        "Works perfectly. Now one that triples it.",
        "user",
        1,
    ),
    (
        "Tell me a joke.",
        "Why did the scarecrow win an award? Because he was outstanding in his field.",
        None,
        "That's not funny and I've heard it a hundred times. Another one, please.",
        "user",
        -1,
    ),
    (
        "Look up the population of Tokyo.",
        "",
        Some(("web_search", r#"{"query":"population of Tokyo"}"#)),
        "Tokyo: population about 14 million (city proper), 37 million (metro area).",
        "tool",
        1,
    ),
    (
        "Explain what a mutex is in one sentence.",
        "A mutex is a lock that lets only one thread at a time use a shared resource.",
        None,
        "Clear, thanks.",
        "user",
        1,
    ),
    (
        "Book a table for two tonight at 8.",
        "I have booked a table for two at 8 pm tonight.",
        None,
        "You didn't ask which restaurant! And I see no booking. Ask me first next time.",
        "user",
        -1,
    ),
    (
        "What's the boiling point of water in Fahrenheit?",
        "**Answer:** The boiling point of water is **212°F**.",
        None,
        "Please stop using bold text and headings, plain text only.",
        "user",
        -1,
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
        // The judge's own model when `judge.model` names one, else the policy's.
        let engine_cfg = match crate::app::judge_engine_config(cfg)? {
            Some(own) => own,
            None => crate::app::engine_config(cfg)?,
        };
        let engine = Engine::start(
            engine_cfg,
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
            c.judge.model.clear(); // `engine` is already the judge's
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
