//! `clawrl-tui bench --against-llama-cpp`: clawrl's serving engine and llama.cpp on the same
//! GGUF, the same token ids and the same threads, side by side in one invocation, with the
//! physical bound of decoding (bytes read per token / measured memory bandwidth).
//!
//! llama.cpp runs through llama-cpp-python's low-level bindings (`scripts/bench_llama_cpp.py`,
//! embedded here; install with `scripts/install-llama-cpp.sh`).

use anyhow::{Context, Result, bail};
use clawrl_core::config::Config;
use clawrl_core::engine::{
    Engine, EngineEvent, Job, Priority, Prompt, Status, Task, VersionChoice,
};
use clawrl_core::telemetry::Counters;
use clawrl_model::messages::Message;
use clawrl_model::tokenizer::Tokenizer;
use clawrl_model::{Generation, KvDtype, LoadedModel, SamplingParams, kernels::Isa};
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SCRIPT: &str = include_str!("../../scripts/bench_llama_cpp.py");
const DECODE_TOKENS: usize = 128;
const PREFILL_TOKENS: usize = 512;
const LONG_CONTEXT: usize = 4096;
const LONG_DECODE_TOKENS: usize = 64;
const SYSTEM_PROMPT_TOKENS: usize = 5000;
const STREAMS: usize = 4;
/// Decoding speeds are the median of this many runs, on both sides: the machines are shared,
/// and single runs of the same code moved by up to 20 %.
const RUNS: usize = 3;

pub fn run(cfg: &Config, python: &Path) -> Result<()> {
    if !python.exists() {
        bail!(
            "{} not found: install llama-cpp-python with scripts/install-llama-cpp.sh (or pass --llama-cpp-python)",
            python.display()
        );
    }
    let model = cfg.model_path()?;
    let mut cfg = cfg.clone();
    cfg.server.max_active = cfg.server.max_active.max(STREAMS);
    let engine = start_engine(&cfg)?;
    let info = engine.info().context("engine info")?;
    let loaded = engine.model().context("engine model")?;
    println!("model: {}", model.display());
    println!(
        "clawrl: {} (kernels: {})",
        info.summary,
        Isa::selected().name()
    );
    let w = workloads(&loaded, &info.tokenizer)?;
    let ours = Ours::measure(&engine, &w, loaded.config.vocab_size)?;
    let bytes_per_token = loaded.transformer.decode_bytes_per_token();
    drop(engine);
    let theirs = llama_cpp(python, &model, &w)?;
    let t = |k: &str| theirs[k].as_f64().unwrap_or(f64::NAN);
    ours.print_table(&t);

    let bandwidth = measure_bandwidth();
    let bound = bandwidth / bytes_per_token.file as f64;
    println!(
        "\nphysical bound of decode: {:.1} MB read per token / {:.1} GB/s measured bandwidth = {:.0} tok/s",
        bytes_per_token.file as f64 / 1e6,
        bandwidth / 1e9,
        bound
    );
    if bytes_per_token.held != bytes_per_token.file {
        println!(
            "  (clawrl reads {:.1} MB per token: it holds Q5_0 blocks as Q8_0, faster to unpack)",
            bytes_per_token.held as f64 / 1e6
        );
    }
    println!(
        "  clawrl decode at {:.0}% of it, llama.cpp at {:.0}%",
        100.0 * ours.decode / bound,
        100.0 * t("decode_tps") / bound
    );
    // At a long context each step also reads the whole cache, so the bound falls with it:
    // llama.cpp's cache is f16 by default.
    let long_ctx = ours.long_ctx;
    let cache_bytes = |cache: KvDtype| cache.bytes_per_position(&loaded.config) * long_ctx;
    let long_bound =
        |cache: KvDtype| bandwidth / (bytes_per_token.file + cache_bytes(cache)) as f64;
    let (ours_cache, theirs_cache) = (cfg.model.kv_cache, KvDtype::F16);
    let (ours_bound, theirs_bound) = (long_bound(ours_cache), long_bound(theirs_cache));
    println!(
        "physical bound at {long_ctx} tokens of context: + {:.1} MB of {ours_cache:?} KV cache = {ours_bound:.0} tok/s ({:.2}x the short bound)",
        cache_bytes(ours_cache) as f64 / 1e6,
        ours_bound / bound
    );
    println!(
        "  clawrl decode at {:.0}% of it, llama.cpp at {:.0}% of its own ({theirs_cache:?} cache: {theirs_bound:.0} tok/s)",
        100.0 * ours.long / ours_bound,
        100.0 * t("long_decode_tps") / theirs_bound,
    );
    Ok(())
}

/// The workloads, as token ids both sides use (and the settings the script reads).
fn workloads(loaded: &LoadedModel, tokenizer: &Tokenizer) -> Result<Value> {
    let chat = |system: &str, user: &str| -> Result<Vec<u32>> {
        let mut m = Vec::new();
        if !system.is_empty() {
            m.push(Message::system(system));
        }
        m.push(Message::user(user));
        loaded.chat_prompt(&m, None)
    };
    let story = "Write a long story about a lighthouse keeper who finds a message in a bottle.";
    // Two different texts: the first-turn TTFT must find nothing of its prompt cached.
    let long_text = |sentence: &str, tokens: usize| -> Result<String> {
        let per = tokenizer.encode(sentence)?.len().max(1);
        Ok(sentence.repeat(tokens / per))
    };
    let log = "The keeper logged the weather, the ships and the tides in a worn notebook. ";
    let rules = "Answer briefly, cite the manual's section, and never invent a tool. ";
    let system = long_text(rules, SYSTEM_PROMPT_TOKENS)?;
    Ok(json!({
        "n_ctx": (SYSTEM_PROMPT_TOKENS + LONG_CONTEXT).min(loaded.config.context_length),
        "prefill": super::synthetic_prompt(loaded.config.vocab_size, PREFILL_TOKENS, 1),
        "decode": chat("", story)?,
        "decode_tokens": DECODE_TOKENS,
        "long": chat(&long_text(log, LONG_CONTEXT)?, "Continue the log for one more day.")?,
        "long_decode_tokens": LONG_DECODE_TOKENS,
        "runs": RUNS,
        "system_first": chat(&system, "What did the keeper log?")?,
        "system_second": chat(&system, "Which word appears most often?")?,
    }))
}

/// clawrl's numbers, through the serving engine (prefix cache, batching, kernels as shipped).
struct Ours {
    prefill: f64,
    decode: f64,
    streams: f64,
    long: f64,
    ttft_first: f64,
    ttft_second: f64,
    short_ctx: usize,
    long_ctx: usize,
}

impl Ours {
    fn measure(engine: &Engine, w: &Value, vocab_size: usize) -> Result<Self> {
        let ids = |k: &str| -> Vec<u32> {
            w[k].as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_u64())
                        .map(|v| v as u32)
                        .collect()
                })
                .unwrap_or_default()
        };
        let generate = |prompt: Vec<u32>, max_tokens: usize| run_job(engine, prompt, max_tokens);
        generate(super::synthetic_prompt(vocab_size, PREFILL_TOKENS, 2), 8)?; // warm-up
        // The engine computes a long user prompt in chunks between other work: the whole time
        // to the first token counts.
        let prefill = {
            let (g, ttft) = generate(ids("prefill"), 1)?;
            g.prompt_tokens as f64 / ttft
        };
        // The three decoding measurements interleaved, RUNS times: clawrl's own ratios compare
        // runs made under the same conditions.
        let mut runs = [vec![], vec![], vec![]];
        for _ in 0..RUNS {
            runs[0].push(decode_rate(&generate(ids("decode"), DECODE_TOKENS)?.0));
            runs[1].push(streams(engine, &ids("decode"), STREAMS)?);
            runs[2].push(decode_rate(&generate(ids("long"), LONG_DECODE_TOKENS)?.0));
        }
        let [decode, streams, long] = runs.map(median);
        Ok(Self {
            prefill,
            decode,
            streams,
            long,
            ttft_first: generate(ids("system_first"), 1)?.1,
            ttft_second: generate(ids("system_second"), 1)?.1,
            short_ctx: ids("decode").len(),
            long_ctx: ids("long").len(),
        })
    }

    /// The side-by-side table (`t`: llama.cpp's number by key), then clawrl's own ratios.
    fn print_table(&self, t: &dyn Fn(&str) -> f64) {
        println!(
            "\n{:<42} {:>10} {:>10} {:>8}",
            "", "clawrl", "llama.cpp", "ratio"
        );
        let faster = "tok/s";
        let sooner = "ms (ratio: llama.cpp / clawrl)";
        let rows = [
            (
                format!("prefill ({PREFILL_TOKENS} tokens)"),
                self.prefill,
                t("prefill_tps"),
                faster,
            ),
            (
                format!("decode (batch 1, {DECODE_TOKENS} tokens)"),
                self.decode,
                t("decode_tps"),
                faster,
            ),
            (
                format!("{STREAMS} streams, aggregate decode"),
                self.streams,
                t("streams4_tps"),
                faster,
            ),
            (
                format!("decode at {} tokens of context", self.long_ctx),
                self.long,
                t("long_decode_tps"),
                faster,
            ),
            (
                "TTFT, 5K-token system prompt, 1st turn".into(),
                self.ttft_first * 1e3,
                t("ttft_first_s") * 1e3,
                sooner,
            ),
            (
                "TTFT, same system prompt, 2nd turn".into(),
                self.ttft_second * 1e3,
                t("ttft_second_s") * 1e3,
                sooner,
            ),
        ];
        for (name, ours, theirs, unit) in rows {
            let ratio = if unit == faster {
                ours / theirs
            } else {
                theirs / ours
            };
            println!("{name:<42} {ours:>10.1} {theirs:>10.1} {ratio:>7.2}x  {unit}");
        }
        println!("(decoding speeds: the median of {RUNS} runs on each side)");
        println!("\nclawrl's own ratios:");
        println!(
            "  {STREAMS} streams / 1 stream: {:.2}x",
            self.streams / self.decode
        );
        println!(
            "  decode at {} / at {} tokens of context: {:.2}x",
            self.long_ctx,
            self.short_ctx,
            self.long / self.decode
        );
        println!(
            "  2nd / 1st turn TTFT: {:.3}x",
            self.ttft_second / self.ttft_first
        );
    }
}

/// llama.cpp on the same ids, through llama-cpp-python: its numbers, by key.
fn llama_cpp(python: &Path, model: &Path, w: &Value) -> Result<Value> {
    let dir = std::env::temp_dir().join(format!("clawrl-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (script, tokens) = (dir.join("bench.py"), dir.join("tokens.json"));
    std::fs::write(&script, SCRIPT)?;
    std::fs::write(&tokens, w.to_string())?;
    println!("running llama.cpp ({}) ...", python.display());
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg("--model")
        .arg(model)
        .arg("--tokens")
        .arg(&tokens)
        .arg("--threads")
        .arg(rayon::current_num_threads().to_string())
        .output()
        .context("running the llama.cpp script");
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(15).collect();
        bail!(
            "the llama.cpp script failed:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    serde_json::from_slice(
        out.stdout
            .split(|&b| b == b'\n')
            .rfind(|l| l.starts_with(b"{"))
            .unwrap_or_default(),
    )
    .context("reading the llama.cpp script's JSON")
}

fn start_engine(cfg: &Config) -> Result<Engine> {
    let engine = Engine::start(
        clawrl_core::engine::EngineConfig::policy(cfg)?,
        Arc::new(Counters::default()),
        |_| (0, None),
        |_| {},
    );
    let t = Instant::now();
    loop {
        match engine.status() {
            Status::Ready => return Ok(engine),
            Status::Failed(e) => bail!("the model failed to load: {e}"),
            _ if t.elapsed() > Duration::from_secs(600) => {
                bail!("the model took over 10 minutes to load")
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn job(
    prompt: Vec<u32>,
    max_tokens: usize,
) -> (Job, tokio::sync::mpsc::UnboundedReceiver<EngineEvent>) {
    let task = Task::Generate {
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        top_logprobs: 0,
    };
    Job::new(
        Prompt::Ids(prompt),
        task,
        VersionChoice::Live,
        Priority::User,
    )
}

/// Runs one generation; returns it and its time to first token (submission to first token).
fn run_job(engine: &Engine, prompt: Vec<u32>, max_tokens: usize) -> Result<(Generation, f64)> {
    let (job, mut rx) = job(prompt, max_tokens);
    let t = Instant::now();
    engine.submit(job).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut first = None;
    loop {
        match rx.blocking_recv() {
            Some(EngineEvent::Text(_)) => {
                first.get_or_insert(t.elapsed().as_secs_f64());
            }
            Some(EngineEvent::Finished { generation, .. }) => {
                let ttft = first.unwrap_or(t.elapsed().as_secs_f64());
                return Ok((generation, ttft));
            }
            Some(EngineEvent::Failed(e)) => bail!("generation failed: {e:?}"),
            Some(_) => {}
            None => bail!("the engine stopped"),
        }
    }
}

fn median(mut runs: Vec<f64>) -> f64 {
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

/// Tokens per second after the first (which comes out of the prompt's computation).
fn decode_rate(g: &Generation) -> f64 {
    g.ids.len().saturating_sub(1) as f64 / g.decode_secs.max(1e-9)
}

/// `n` concurrent generations of `prompt`: decoded tokens per second of wall time, from the
/// moment all were admitted to the last one's end.
fn streams(engine: &Engine, prompt: &[u32], n: usize) -> Result<f64> {
    let mut rxs = Vec::new();
    for _ in 0..n {
        let (job, rx) = job(prompt.to_vec(), DECODE_TOKENS);
        engine.submit(job).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        rxs.push(rx);
    }
    let handles: Vec<_> = rxs
        .into_iter()
        .map(|mut rx| {
            std::thread::spawn(move || {
                let mut admitted = None;
                loop {
                    match rx.blocking_recv() {
                        Some(EngineEvent::Admitted { .. }) => admitted = Some(Instant::now()),
                        Some(EngineEvent::Finished { generation, .. }) => {
                            return Some((admitted?, Instant::now(), generation.ids.len()));
                        }
                        Some(EngineEvent::Failed(_)) | None => return None,
                        Some(_) => {}
                    }
                }
            })
        })
        .collect();
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().ok().flatten().context("a stream failed"))
        .collect::<Result<_>>()?;
    let start = results.iter().map(|r| r.0).max().expect("n > 0");
    let end = results.iter().map(|r| r.1).max().expect("n > 0");
    // Tokens decoded after the last admission: the first token of each comes from its prompt.
    let tokens: usize = results.iter().map(|r| r.2.saturating_sub(1)).sum();
    Ok(tokens as f64 / (end - start).as_secs_f64().max(1e-9))
}

/// Read bandwidth of this machine's memory with every core streaming a 256 MB buffer (bytes/s).
fn measure_bandwidth() -> f64 {
    use rayon::prelude::*;
    let buf = vec![1u64; 32 << 20];
    let chunk = buf.len() / rayon::current_num_threads().max(1);
    let pass = || {
        buf.par_chunks(chunk)
            .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
            .sum::<u64>()
    };
    std::hint::black_box(pass());
    let t = Instant::now();
    let passes = 5;
    for _ in 0..passes {
        std::hint::black_box(pass());
    }
    (passes * buf.len() * 8) as f64 / t.elapsed().as_secs_f64()
}
