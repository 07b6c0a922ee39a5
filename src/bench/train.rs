//! `clawrl-tui bench --train`: what online training costs and how fast it reacts, on the
//! configured model, with the configured trigger, judge and gate.
//!
//! 1. The loop, in-process over loopback HTTP: a simulated user chats (questions, then
//!    "thanks" or a correction after a think time) while a probe client times a fixed
//!    request. First with training paused (the baseline), then running until `--updates`
//!    versions went live. Reports serving latency with training on vs off, the time from a
//!    turn's next state (or rating) to the first version trained on it serving, and the
//!    process's peak RSS.
//! 2. The parts, on a fresh copy of the model: one training micro-step (forward + backward) and
//!    one optimizer step at a given sample size, and decode speed with an adapter vs without.

use anyhow::{Context, Result, bail};
use clap::Args;
use clawrl_core::Core;
use clawrl_core::config::Config;
use clawrl_core::engine::Status;
use clawrl_core::events::Event;
use clawrl_core::http_client::{self, Target};
use clawrl_core::store::Store;
use clawrl_core::train::loss::{LossConfig, Signals};
use clawrl_core::train::optimizer::{AdapterOptimizer, OptimizerConfig};
use clawrl_core::train::policy::micro_step;
use clawrl_model::messages::Message;
use clawrl_model::{GenerateRequest, LoadedModel, LoraAdapter, SamplingParams};
use hyper::Method;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct TrainBenchArgs {
    /// Versions that must go live before the loop measurement ends.
    #[arg(long, default_value_t = 10)]
    pub updates: usize,
    /// Seconds the simulated user waits before answering (reading and typing).
    #[arg(long, default_value_t = 5.0)]
    pub think_secs: f64,
    /// Simulated users at once (with --think-secs 0: agents sending requests back to back).
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// Seconds of the baseline (training paused).
    #[arg(long, default_value_t = 60)]
    pub baseline_secs: u64,
    /// Prompt and response tokens of the micro-step measurement.
    #[arg(long, default_value_t = 128)]
    pub sample_tokens: usize,
    /// Skip the loop (only the micro measurements).
    #[arg(long)]
    pub parts_only: bool,
}

const QUESTIONS: [&str; 8] = [
    "What is the capital of Italy?",
    "Give me one tip for learning to code.",
    "How many legs does a spider have?",
    "Suggest a name for a black cat.",
    "What is the boiling point of water?",
    "Write a haiku about autumn.",
    "What does a CPU do?",
    "Recommend a book for a long flight.",
];
const REPLIES: [&str; 2] = [
    "Thanks, that helps!",
    "No, that's not what I asked. Answer in one short sentence.",
];
/// A request whose reply always runs to `max_tokens` (a shorter reply would make a version that
/// answers more briefly look faster).
const PROBE: &str = "Tell me a long story about a dragon.";
const PROBE_TOKENS: u64 = 16;

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Peak resident memory of this process (Linux), in MB.
pub fn peak_rss_mb() -> Option<f64> {
    status_mb("VmHWM:")
}

/// Resident memory of this process now (Linux), in MB.
pub fn rss_mb() -> Option<f64> {
    status_mb("VmRSS:")
}

fn status_mb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

pub fn run(cfg: &Config, args: &TrainBenchArgs) -> Result<()> {
    if !args.parts_only {
        run_loop(cfg, args)?;
    }
    run_parts(cfg, args)
}

async fn chat(target: &Target, key: Option<&str>, body: Value) -> Result<(f64, Value)> {
    let t = Instant::now();
    let (status, reply) =
        http_client::send(target, Method::POST, "/chat/completions", key, Some(&body)).await?;
    if !status.is_success() {
        bail!("the server answered {status}: {reply}");
    }
    Ok((t.elapsed().as_secs_f64(), reply))
}

/// The configuration of the loop: `cfg` with a fresh data directory (store, checkpoints), its
/// models named by path, since catalog ids resolve in the data directory's models folder.
fn loop_config(cfg: &Config, data: &std::path::Path) -> Result<Config> {
    let mut c = cfg.clone();
    c.paths.data_dir = data.display().to_string();
    c.store.path = String::new();
    c.model.path = cfg.model_path()?.display().to_string();
    if !cfg.judge.model.is_empty() && cfg.judge.backend == clawrl_core::config::JudgeBackend::Local
    {
        c.judge.model = clawrl_core::catalog::resolve(&cfg.judge.model, &cfg.data_dir())
            .context("judge.model")?
            .display()
            .to_string();
    }
    c.train.enabled = true;
    Ok(c)
}

fn run_loop(cfg: &Config, args: &TrainBenchArgs) -> Result<()> {
    let data = tempdir()?;
    let c = loop_config(cfg, &data)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(serve_train_and_measure(&c, args));
    let _ = std::fs::remove_dir_all(&data);
    result
}

/// A serving clawrl on loopback for the loop, once its model is loaded.
struct LoopServer {
    core: Arc<Core>,
    target: Target,
    key: Option<String>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<()>>,
}

impl LoopServer {
    async fn start(c: &Config) -> Result<Self> {
        let core = clawrl_core::build(c)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(clawrl_server::serve(listener, core.clone(), async {
            let _ = stop_rx.await;
        }));
        while core.engine.status() == Status::Loading {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Status::Failed(e) = core.engine.status() {
            bail!("the model failed to load: {e}");
        }
        core.training().context("training is enabled")?;
        Ok(Self {
            core,
            target: Target::parse(&format!("http://127.0.0.1:{port}/v1"), "bench")?,
            key: (!c.server.api_key.is_empty()).then(|| c.server.api_key.clone()),
            stop,
            server,
        })
    }
}

/// The loop's three phases: training paused (the baseline), training until `args.updates`
/// versions went live, paused again on the last version (the adapter's own cost); then the
/// report.
async fn serve_train_and_measure(c: &Config, args: &TrainBenchArgs) -> Result<()> {
    let s = LoopServer::start(c).await?;
    let mut events = s.core.bus.subscribe();
    println!(
        "loop: {} (train: min_samples {}, max_wait {} s, max_samples {}; judge: {:?}, hints {}; gate: {:?}); {} client(s), think {} s, engine.background_share {}",
        s.core.config.model_id,
        c.train.min_samples,
        c.train.max_wait_secs,
        c.train.max_samples,
        c.judge.backend,
        c.judge.hints,
        c.gate.policy,
        args.clients.max(1),
        args.think_secs,
        c.engine.background_share
    );
    // The simulated users and the probe run through all phases.
    let running = Arc::new(AtomicBool::new(true));
    let users: Vec<_> = (0..args.clients.max(1))
        .map(|client| spawn_user(&s, client, running.clone(), args.think_secs))
        .collect();
    let probes = Arc::new(std::sync::Mutex::new(Vec::<(f64, String)>::new()));
    let probe = spawn_probe(&s, running.clone(), probes.clone());

    // Phase A: training paused.
    let core = &s.core;
    core.set_training_paused(true)?;
    tokio::time::sleep(Duration::from_secs(args.baseline_secs)).await;
    // At rest: both models loaded and serving, no update yet.
    let rest_rss = rss_mb();
    let cache_mb = || core.counters.prefix_cache_bytes.load(Ordering::Relaxed) as f64 / 1e6;
    let rest_cache = cache_mb();
    core.set_training_paused(false)?;
    {
        let mut off: Vec<f64> = probes.lock().unwrap().iter().map(|p| p.0).collect();
        println!(
            "  training paused: serving p50 {:.2} s (n={})",
            median(&mut off),
            off.len()
        );
    }
    // Phase B: until enough versions went live.
    let started = Instant::now();
    let live = wait_for_versions(core, &mut events, args.updates).await?;
    let loop_secs = started.elapsed().as_secs_f64();
    // Phase C: training paused again, serving the last version (the adapter's own cost).
    core.set_training_paused(true)?;
    tokio::time::sleep(Duration::from_secs(args.baseline_secs)).await;
    running.store(false, Ordering::SeqCst);
    for user in users {
        let _ = user.await;
    }
    let _ = probe.await;
    let rss = peak_rss_mb();
    let end_cache = cache_mb();
    let core = s.core.clone();
    let _ = s.stop.send(());
    let _ = s.server.await;
    let probes = probes.lock().unwrap().clone();
    print_latencies(&probes);
    print_reactions(c, live, loop_secs)?;
    if let (Some(rest), Some(peak)) = (rest_rss, rss) {
        let bytes = |g: &std::sync::atomic::AtomicU64| g.load(Ordering::Relaxed) as f64;
        let (policy, judge) = (
            bytes(&core.counters.policy_weight_bytes),
            bytes(&core.counters.judge_weight_bytes),
        );
        println!(
            "RSS: {rest:.0} MB at rest (serving, judge loaded, training paused; prefix KV cache {rest_cache:.0} MB), peak {peak:.0} MB training; weights held: policy {:.0} MB, judge {:.0} MB; peak − rest +{:.0} MB, of which the prefix KV cache grew by {:.0} MB",
            policy / 1e6,
            judge / 1e6,
            peak - rest,
            end_cache - rest_cache
        );
    }
    if let Some(mb) = rss {
        let cache = core.counters.prefix_cache_bytes.load(Ordering::Relaxed) as f64 / 1e6;
        let weights = core
            .engine
            .model()
            .map_or(0.0, |m| m.transformer.weight_bytes() as f64 / 1e6);
        println!(
            "peak RSS (serving + judging + training): {mb:.0} MB (weights {weights:.0} MB, prefix KV cache now {cache:.0} MB of server.prefix_cache_mb {})",
            c.server.prefix_cache_mb
        );
    }
    Ok(())
}

/// A simulated user: three-turn conversations, one after another, until `running` clears.
fn spawn_user(
    s: &LoopServer,
    client: usize,
    running: Arc<AtomicBool>,
    think: f64,
) -> tokio::task::JoinHandle<()> {
    let (target, key) = (s.target.clone(), s.key.clone());
    tokio::spawn(async move {
        let mut k = client * 1001;
        while running.load(Ordering::SeqCst) {
            let session = format!("bench-{k}");
            let mut messages =
                vec![json!({"role": "user", "content": QUESTIONS[k % QUESTIONS.len()]})];
            for turn in 0..3 {
                if !running.load(Ordering::SeqCst) {
                    break;
                }
                let body = json!({"messages": messages, "max_tokens": 48, "session_id": session});
                let reply = match chat(&target, key.as_deref(), body).await {
                    Ok((_, reply)) => reply,
                    Err(e) => {
                        eprintln!("  the simulated user's request failed: {e:#}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        break;
                    }
                };
                messages.push(reply["choices"][0]["message"].clone());
                tokio::time::sleep(Duration::from_secs_f64(think)).await;
                messages.push(json!({"role": "user", "content": REPLIES[(k + turn) % 2]}));
            }
            k += 1;
        }
    })
}

/// The latency probe: every 2 s a greedy side request, recorded with the phase it ran in.
fn spawn_probe(
    s: &LoopServer,
    running: Arc<AtomicBool>,
    probes: Arc<std::sync::Mutex<Vec<(f64, String)>>>,
) -> tokio::task::JoinHandle<()> {
    let (target, key, core) = (s.target.clone(), s.key.clone(), s.core.clone());
    tokio::spawn(async move {
        while running.load(Ordering::SeqCst) {
            let body = json!({"messages": [{"role": "user", "content": PROBE}], "max_tokens": PROBE_TOKENS,
                              "temperature": 0, "turn_type": "side"});
            let state_before = core.training().map(|(s, _)| s.state).unwrap_or_default();
            if let Ok((secs, reply)) = chat(&target, key.as_deref(), body).await
                && reply["usage"]["completion_tokens"].as_u64() == Some(PROBE_TOKENS)
            {
                // Paused on the base model (the baseline), paused on a trained version
                // (the adapter's own cost), or the trainer's state while training.
                let paused = core.training().is_some_and(|(_, paused)| paused);
                let phase = match (paused, core.engine.live_version()) {
                    (true, 0) => "off".to_string(),
                    (true, _) => "adapter".to_string(),
                    (false, _) => state_before,
                };
                probes.lock().unwrap().push((secs, phase));
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    })
}

/// Waits until `updates` versions went live; fails after 15 minutes without one.
async fn wait_for_versions(
    core: &Core,
    events: &mut tokio::sync::broadcast::Receiver<Event>,
    updates: usize,
) -> Result<usize> {
    let started = Instant::now();
    let mut live = 0usize;
    // 15 minutes without a version going live (any other event does not count).
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(900);
    while live < updates {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(Event::VersionLive { version, .. })) => {
                live += 1;
                deadline = tokio::time::Instant::now() + Duration::from_secs(900);
                println!(
                    "  v{version} live after {:.0} s",
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(Ok(Event::CandidateReady {
                version,
                guard_passed: false,
                reasons,
                ..
            })) => {
                println!("  v{version} held by the guard: {}", reasons.join("; "));
            }
            Ok(Ok(Event::TrainingFailed { error })) => println!("  an update failed: {error}"),
            Ok(_) => {}
            Err(_) => bail!(
                "no version went live for 15 minutes (trainer: {})",
                core.training().map(|(s, _)| s.detail).unwrap_or_default()
            ),
        }
    }
    Ok(live)
}

/// Serving latency by phase: training off, on, during updates, and on the last version.
fn print_latencies(probes: &[(f64, String)]) {
    let of = |keep: &dyn Fn(&str) -> bool| -> Vec<f64> {
        probes.iter().filter(|p| keep(&p.1)).map(|p| p.0).collect()
    };
    let mut off = of(&|p| p == "off");
    let mut on = of(&|p| !matches!(p, "off" | "adapter"));
    let mut adapter = of(&|p| p == "adapter");
    let mut during = of(&|p| matches!(p, "training" | "guarding"));
    let (p_off, p_on, p_during) = (median(&mut off), median(&mut on), median(&mut during));
    let p_adapter = median(&mut adapter);
    println!(
        "serving p50 latency ({PROBE:?}, {PROBE_TOKENS} tokens): training off {p_off:.2} s (n={}), on {p_on:.2} s (n={}) x{:.2}, during updates {p_during:.2} s (n={}) x{:.2}",
        off.len(),
        on.len(),
        p_on / p_off,
        during.len(),
        p_during / p_off
    );
    println!(
        "  training paused again, serving the last version: {p_adapter:.2} s (n={}) x{:.2} (the adapter's own cost)",
        adapter.len(),
        p_adapter / p_off
    );
}

/// From the loop's store: how long a next state took to become a serving version, by part.
fn print_reactions(c: &Config, live: usize, loop_secs: f64) -> Result<()> {
    let store = Store::open_read_only(&c.store_path())?;
    let mut r = reactions(&store)?;
    let judgments = store.judgment_stats()?;
    println!(
        "next state -> new version serving: p50 {:.1} s, p90 {:.1} s over {} samples of {} updates ({:.0} s)",
        percentile(&mut r.total, 0.5),
        percentile(&mut r.total, 0.9),
        r.total.len(),
        live,
        loop_secs
    );
    println!(
        "  p50 parts: judged after {:.1} s, update started {:.1} s later, update (training + guard) {:.1} s",
        median(&mut r.judge),
        median(&mut r.queue),
        median(&mut r.update)
    );
    println!(
        "  guard p50 {:.1} s per candidate; KL from the base, last version: {:.5} nats/token",
        median(&mut r.guard.clone()),
        r.kl_base.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "  judge: {} turns judged, {:.1} s per turn, {} with a usable hint",
        judgments.0, judgments.1, judgments.2
    );
    Ok(())
}

/// Where a sample's time went, in seconds: from its signal to its judgment, from there to the
/// start of the update that used it, that update (training + guard), and the whole.
#[derive(Debug, Default)]
struct Reaction {
    judge: Vec<f64>,
    queue: Vec<f64>,
    update: Vec<f64>,
    total: Vec<f64>,
    /// Per version: the guard's seconds, and its KL from the base.
    guard: Vec<f64>,
    kl_base: Vec<f64>,
}

fn reactions(store: &Store) -> Result<Reaction> {
    let history = store.live_history()?;
    let mut r = Reaction::default();
    for v in store.versions()? {
        let Some(live_at) = history.iter().find(|h| h.version == v.id).map(|h| h.at) else {
            continue;
        };
        let guard_secs = v.guard_report["secs"].as_f64().unwrap_or(0.0);
        r.guard.push(guard_secs);
        r.kl_base.extend(v.kl_base);
        let update_start = v.created_at as f64 / 1000.0 - v.metrics.train_secs - guard_secs;
        for (signal_at, judged_at) in store.sample_times(v.id)? {
            let signal = signal_at as f64 / 1000.0;
            let judged = judged_at.map_or(signal, |j| j as f64 / 1000.0);
            r.judge.push(judged - signal);
            r.queue.push(update_start - judged);
            r.update.push(live_at as f64 / 1000.0 - update_start);
            r.total.push((live_at - signal_at) as f64 / 1000.0);
        }
    }
    Ok(r)
}

fn tempdir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("clawrl-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn run_parts(cfg: &Config, args: &TrainBenchArgs) -> Result<()> {
    let model = clawrl_core::load_model(cfg)?;
    let n = args.sample_tokens;
    let loaded = rss_mb();
    println!(
        "parts: {} (prompt {n} tokens, response {n} tokens)",
        model.summary()
    );
    let prompt: Vec<u32> = (0..n).map(|i| 100 + (i as u32 * 37) % 5000).collect();
    let response: Vec<u32> = (0..n).map(|i| 200 + (i as u32 * 53) % 5000).collect();
    let lora = cfg.lora();
    let start = LoraAdapter::init(&model.config, lora.clone(), &model.transformer.device(), 1);
    let mut opt = AdapterOptimizer::new(&start, OptimizerConfig::default());
    let logp_old = model.score(&prompt, &response, None)?;
    let signals = Signals {
        logp_old: logp_old.clone(),
        reward: Some(1.0),
        teacher_logp: Some(logp_old.iter().map(|l| l + 0.1).collect()),
        topk: None,
    };
    let loss = LossConfig::from_config(&cfg.train);
    let grad_context = cfg.train.grad_context_tokens;
    // Three micro-steps of `loss` on `response` with `signals`, each followed by an optimizer
    // step: their seconds.
    let time_steps =
        |opt: &mut AdapterOptimizer, loss: &LossConfig, response: &[u32], signals: &Signals| {
            let (mut steps, mut optim) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                let t = Instant::now();
                micro_step(
                    &model.transformer,
                    opt,
                    loss,
                    &prompt,
                    response,
                    signals,
                    grad_context,
                    1.0,
                    &|| {},
                );
                steps.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                opt.step(1.0);
                optim.push(t.elapsed().as_secs_f64());
            }
            (steps, optim)
        };
    let (mut steps, mut optim) = time_steps(&mut opt, &loss, &response, &signals);
    let step = median(&mut steps);
    let sampled_rss = peak_rss_mb();
    if let (Some(loaded), Some(peak)) = (loaded, sampled_rss) {
        println!(
            "RSS with the model loaded {loaded:.0} MB, peak over the micro-steps {peak:.0} MB: the trainer's own +{:.0} MB",
            peak - loaded
        );
    }
    println!(
        "training micro-step (forward + backward, rank {}, {} targets): {step:.2} s = {:.0} trained tokens/s, {:.0} tokens/s through the model; optimizer step {:.3} s",
        lora.rank,
        lora.targets.len(),
        n as f64 / step,
        (2 * n) as f64 / step,
        median(&mut optim)
    );
    // The top-K form (train.opd = "topk"): a target of K tokens per position, built from one
    // forward pass without gradients per side (the policy's top-K, each candidate's teacher).
    let k = cfg.train.topk;
    let mut prepare = Vec::new();
    let mut topk = None;
    for _ in 0..3 {
        let t = Instant::now();
        let logits = model.teacher_forced(&prompt, &response, None, None)?;
        let [_, vocab] = logits.dims();
        let dist = burn::tensor::activation::log_softmax(logits, 1)
            .into_data()
            .try_into_vec_as::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let (ids, old) = clawrl_core::train::loss::TopK::select(&dist, vocab, k);
        let teacher = clawrl_core::train::loss::TopK::gather(&dist, vocab, &ids, k);
        prepare.push(t.elapsed().as_secs_f64());
        topk = Some(clawrl_core::train::loss::TopK {
            k,
            ids,
            old,
            teacher: teacher.iter().map(|l| l + 0.1).collect(),
        });
    }
    let topk_signals = Signals {
        topk,
        ..signals.clone()
    };
    let (mut topk_steps, _) = time_steps(&mut opt, &loss, &response, &topk_signals);
    let topk_step = median(&mut topk_steps);
    println!(
        "top-K micro-step (K {k}): {topk_step:.2} s x{:.2} the sampled-token form; its target: {:.2} s per side (the policy's top-K, each hint candidate's teacher), peak RSS {} MB -> {} MB",
        topk_step / step,
        median(&mut prepare),
        sampled_rss.map_or("?".into(), |m| format!("{m:.0}")),
        peak_rss_mb().map_or("?".into(), |m| format!("{m:.0}"))
    );
    // The unlikelihood of repeats (train.unlikelihood) where it has the most to do: a reply
    // that loops (its first 16 tokens over and over), with and without it.
    let looping: Vec<u32> = response.iter().take(16).cycle().take(n).copied().collect();
    let looping_signals = Signals {
        logp_old: model.score(&prompt, &looping, None)?,
        ..signals
    };
    let (without_ul, with_ul) = (
        LossConfig {
            unlikelihood: 0.0,
            ..loss.clone()
        },
        LossConfig {
            unlikelihood: if loss.unlikelihood > 0.0 {
                loss.unlikelihood
            } else {
                1.0
            },
            ..loss.clone()
        },
    );
    let (mut plain, _) = time_steps(&mut opt, &without_ul, &looping, &looping_signals);
    let (mut ul, _) = time_steps(&mut opt, &with_ul, &looping, &looping_signals);
    let (plain, ul) = (median(&mut plain), median(&mut ul));
    println!(
        "unlikelihood of repeats (weight {}) on a looping reply: {ul:.2} s x{:.2} the micro-step without it ({plain:.2} s)",
        with_ul.unlikelihood,
        ul / plain
    );
    // As the engine serves a version: on its own pool, with the plain copies.
    let adapter = Arc::new(opt.snapshot().for_serving());
    let pool = clawrl_model::background::serving_pool("clawrl-bench")?;
    let (without, with) = pool.install(|| -> Result<_> {
        Ok((
            decode_speed(&model, None)?,
            decode_speed(&model, Some(adapter))?,
        ))
    })?;
    println!(
        "decode (64 tokens, median of 3): without adapter {without:.1} tok/s, with the adapter {with:.1} tok/s x{:.2}",
        with / without
    );
    if let Some(mb) = peak_rss_mb() {
        println!("peak RSS of the process so far: {mb:.0} MB");
    }
    Ok(())
}

fn decode_speed(model: &LoadedModel, adapter: Option<Arc<LoraAdapter>>) -> Result<f64> {
    let prompt = model.chat_prompt(
        &[Message::user("Tell me a long story about a dragon.")],
        None,
    )?;
    let req = GenerateRequest {
        prompt_ids: prompt,
        max_tokens: 64,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        top_logprobs: 0,
    };
    let mut speeds = Vec::new();
    for run in 0..4 {
        let mut d = model.start_decoding(&req, None, adapter.clone())?;
        while !d.done {
            model.decode_step(&mut d)?;
        }
        let decoded = d.out.ids.len().saturating_sub(1);
        if run > 0 && d.out.decode_secs > 0.0 {
            speeds.push(decoded as f64 / d.out.decode_secs);
        }
    }
    Ok(median(&mut speeds))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loop moves the data directory; a judge named by catalog id (the default) must
    /// still be found where it is installed (it was not: "judge.model: model … is not
    /// installed").
    #[test]
    fn the_loop_finds_the_judge_installed_in_the_users_data_directory() {
        let home = std::env::temp_dir().join(format!("clawrl-loop-config-{}", std::process::id()));
        let mut cfg = Config::default();
        cfg.paths.data_dir = home.display().to_string();
        let judge = clawrl_core::catalog::find(&cfg.judge.model)
            .expect("the default judge is a catalog id");
        let policy = clawrl_core::catalog::find(&cfg.model.default)
            .expect("the default model is a catalog id");
        for m in [judge, policy] {
            let p = m.path(&home);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"not read here").unwrap();
        }
        let loop_dir = home.join("loop");
        let c = loop_config(&cfg, &loop_dir).unwrap();
        assert_eq!(c.paths.data_dir, loop_dir.display().to_string());
        assert_eq!(std::path::PathBuf::from(&c.judge.model), judge.path(&home));
        assert!(
            clawrl_core::engine::EngineConfig::judge(&c)
                .unwrap()
                .is_some()
        );
        std::fs::remove_dir_all(&home).unwrap();
    }
}
