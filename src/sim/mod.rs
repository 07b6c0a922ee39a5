//! `clawrl-tui sim`: a simulated user with a checkable preference talks to clawrl over its real
//! HTTP API (chat, next messages, thumbs) while the real judge, trainer and gate run; a held-out
//! prompt set is evaluated (greedy) before and after, and the run's numbers are written to its
//! output folder. `--method prompt` keeps the base weights and carries the user's corrections in
//! the system prompt instead, so the two kinds of personalization can be compared.

#[cfg(feature = "lab")]
pub mod plot;
/// Without the lab build there is no plotting library: every other output is written.
#[cfg(not(feature = "lab"))]
pub mod plot {
    pub fn reward_curve(
        _: &std::path::Path,
        _: &[super::report::Interaction],
        _: usize,
        _: &str,
    ) -> anyhow::Result<bool> {
        anyhow::bail!(
            "rewards.png is drawn by the lab build (cargo build --release --features lab)"
        )
    }
}
mod outcome;
pub mod preference;
pub mod report;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use clawrl_core::config::{Config, HintPlacement};
use clawrl_core::http_client::{self, Target};
use clawrl_core::judge::teacher::hinted_text;
use hyper::Method;
use preference::Preference;
use rand::{Rng, SeedableRng};
use report::{Interaction, Proportion};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct SimArgs {
    /// What the simulated user wants: concise, no-lists, ask-back, no-preamble.
    #[arg(long, required_unless_present = "replot")]
    pub preference: Option<String>,
    #[arg(long, default_value_t = 36)]
    pub interactions: usize,
    /// rl | opd | combined: how the in-process clawrl trains (train.method); prompt: no
    /// training, the user's corrections so far go into the system prompt.
    #[arg(long, value_enum, default_value_t = SimMethod::Combined)]
    pub method: SimMethod,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// A running clawrl to talk to (e.g. http://127.0.0.1:30000). Default: one started in this
    /// process, on a fresh store in the output folder.
    #[arg(long)]
    pub url: Option<String>,
    /// The running clawrl's API key (default: $CLAWRL_API_KEY).
    #[arg(long, env = "CLAWRL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Output folder (default: <data dir>/sim/<preference>-<method>-s<seed>-<unix time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Send no thumbs up/down: the judge's votes on the user's next message are the only reward.
    #[arg(long)]
    pub no_thumbs: bool,
    /// Held-out prompts evaluated before and after the run (at most 20).
    #[arg(long, default_value_t = 20)]
    pub eval_prompts: usize,
    /// Tokens per reply.
    #[arg(long, default_value_t = 96)]
    pub max_tokens: usize,
    /// Seconds the user takes to read a reply and write the next message. The judge and the
    /// trainer work while nobody is being served, so a user who never pauses gets no training
    /// until the end (0 measures exactly that).
    #[arg(long, default_value_t = 5.0)]
    pub think_secs: f64,
    /// Only redraw rewards.png from the interactions.csv of an earlier run in --out.
    #[arg(long, requires = "out")]
    pub replot: bool,
    /// Longest wait after the last interaction for the judge and the trainer to finish.
    #[arg(long, default_value_t = 600)]
    pub settle_secs: u64,
    /// One seed, one result: after each interaction the user waits until the judge and the
    /// trainer are done with it (instead of --think-secs), and an update starts exactly when
    /// train.min_samples samples are ready (never on train.max_wait_secs), so that no timing
    /// decides which replies go into which update.
    #[arg(long)]
    pub deterministic: bool,
    /// Evaluate the held-out prompts after every N interactions too (0: only before and after),
    /// to report the interactions to the first visible effect.
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// A user who corrects every reply: each is rated down (unless --no-thumbs) and answered
    /// with the preference's correction, whether it satisfied the rule or not.
    #[arg(long)]
    pub correct_every_reply: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimMethod {
    Rl,
    Opd,
    Combined,
    Prompt,
}

impl SimMethod {
    fn name(self) -> &'static str {
        match self {
            Self::Rl => "rl",
            Self::Opd => "opd",
            Self::Combined => "combined",
            Self::Prompt => "prompt",
        }
    }
}

/// The prompt sets (assets/sim/prompts.json, compiled in).
#[derive(serde::Deserialize)]
struct Prompts {
    train: Vec<String>,
    held_out: Vec<String>,
}

fn prompts() -> Prompts {
    serde_json::from_str(include_str!("../../assets/sim/prompts.json"))
        .expect("assets/sim/prompts.json parses")
}

/// Talks to clawrl's HTTP API.
struct Client {
    target: Target,
    key: Option<String>,
}

impl Client {
    async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let (status, v) =
            http_client::send(&self.target, method, path, self.key.as_deref(), body).await?;
        if !status.is_success() {
            bail!(
                "{path}: {status}: {}",
                v["error"]["message"].as_str().unwrap_or("no message")
            );
        }
        Ok(v)
    }

    /// (response id, reply text, prompt tokens)
    async fn chat(&self, body: Value) -> Result<(String, String, u64)> {
        let v = self
            .call(Method::POST, "/v1/chat/completions", Some(&body))
            .await?;
        Ok((
            v["id"].as_str().unwrap_or_default().to_string(),
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            v["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
        ))
    }

    async fn status(&self) -> Result<Value> {
        self.call(Method::GET, "/admin/status", None).await
    }
}

/// A clawrl started by the simulation itself.
struct InProcess {
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<()>>,
    store_path: std::path::PathBuf,
}

/// The judge's record on the run's turns, read from the run's store.
fn judge_summary(
    store_path: &Path,
    verdicts: &HashMap<String, bool>,
) -> Result<Option<report::JudgeSummary>> {
    let store = clawrl_core::store::Store::open_read_only(store_path)?;
    let mut records = Vec::new();
    store.export(0, |r| {
        records.push(r);
        Ok(())
    })?;
    Ok(report::JudgeSummary::from_export(&records, verdicts))
}

async fn start_in_process(
    cfg: &Config,
    method: SimMethod,
    deterministic: bool,
    out: &Path,
) -> Result<(InProcess, String)> {
    let mut cfg = cfg.clone();
    if deterministic {
        // Updates start on train.min_samples alone; the user waits for each interaction's work.
        cfg.train.max_wait_secs = u32::MAX as u64;
    }
    // The model stays where it is installed; the store, adapters and logs of the run go to
    // its folder, so every run starts from the base model and an empty history.
    cfg.model.path = cfg.model_path()?.display().to_string();
    if let Some(judge) = clawrl_core::engine::EngineConfig::judge(&cfg)? {
        cfg.judge.model = judge.model_path.display().to_string();
    }
    cfg.paths.data_dir = out.join("data").display().to_string();
    cfg.server.api_key = String::new();
    match method {
        SimMethod::Prompt => cfg.train.enabled = false,
        SimMethod::Rl => cfg.train.method = clawrl_core::train::loss::Method::Rl,
        SimMethod::Opd => cfg.train.method = clawrl_core::train::loss::Method::Opd,
        SimMethod::Combined => cfg.train.method = clawrl_core::train::loss::Method::Combined,
    }
    let store_path = cfg.store_path();
    let core = clawrl_core::build(&cfg)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(clawrl_server::serve(listener, core, async {
        let _ = stopped.await;
    }));
    Ok((
        InProcess {
            stop,
            server,
            store_path,
        },
        url,
    ))
}

/// Waits until the server answers /health with 200 (the model is loaded).
async fn wait_ready(client: &Client) -> Result<()> {
    let start = Instant::now();
    loop {
        if let Ok((status, _)) =
            http_client::send(&client.target, Method::GET, "/health", None, None).await
            && status.is_success()
        {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(300) {
            bail!(
                "the server at {} did not get ready in 300 s",
                client.target.authority
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One held-out reply.
struct Evaluated {
    prompt: String,
    reply: String,
    satisfied: bool,
    prompt_tokens: u64,
}

fn messages(system: &Option<String>, user: &str) -> Vec<Value> {
    let mut m = Vec::new();
    if let Some(s) = system {
        m.push(json!({"role": "system", "content": s}));
    }
    m.push(json!({"role": "user", "content": user}));
    m
}

/// The held-out prompts, greedy, as side turns (served and stored, never judged or trained on).
/// With `hint`, each question carries it the way the trainer's teacher reads a hint
/// (`judge::teacher::hinted_text`, placed as `train.hint_placement`): what the hinted teacher
/// itself would write.
async fn evaluate(
    client: &Client,
    prompts: &[String],
    pref: &Preference,
    system: &Option<String>,
    hint: Option<(&str, HintPlacement)>,
    max_tokens: usize,
    phase: &str,
) -> Result<Vec<Evaluated>> {
    let mut out = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let question = match hint {
            Some((h, placement)) => hinted_text(p, h, placement),
            None => p.clone(),
        };
        let (_, reply, prompt_tokens) = client
            .chat(json!({
                "messages": messages(system, &question),
                "temperature": 0,
                "max_tokens": max_tokens,
                "turn_type": "side",
                "session_id": format!("sim-eval-{phase}-{}-{i}", std::process::id()),
                "session_done": true,
            }))
            .await
            .with_context(|| format!("evaluating ({phase})"))?;
        out.push(Evaluated {
            prompt: question,
            satisfied: pref.satisfied_by(&reply),
            reply,
            prompt_tokens,
        });
    }
    Ok(out)
}

fn proportion(e: &[Evaluated]) -> Proportion {
    Proportion {
        k: e.iter().filter(|e| e.satisfied).count(),
        n: e.len(),
    }
}

/// The system prompt of `--method prompt`: the user's corrections so far, as memory systems
/// keep them.
fn memory_prompt(corrections: &[&str]) -> Option<String> {
    (!corrections.is_empty()).then(|| {
        let mut s = String::from("What this user has asked of you before; follow it:\n");
        for c in corrections {
            let _ = writeln!(s, "- {c}");
        }
        s
    })
}

/// Waits until the judge has judged every turn and the trainer has turned every sample into a
/// decided version (or holds a candidate for a human).
async fn settle(client: &Client, limit: Duration) -> Result<String> {
    let start = Instant::now();
    let mut quiet = 0;
    loop {
        let s = client.status().await?;
        let t = &s["trainer"];
        let state = t["state"].as_str().unwrap_or("");
        if state == "held" {
            return Ok("a candidate waits for a decision (gate held it)".into());
        }
        let idle = s["judge_pending"].as_u64() == Some(0)
            && t["samples_waiting"].as_u64() == Some(0)
            && t["update"].is_null()
            && !matches!(state, "training" | "guarding");
        quiet = if idle { quiet + 1 } else { 0 };
        if quiet >= 3 || state == "disabled" || state == "paused" {
            return Ok(format!("settled in {:.0} s", start.elapsed().as_secs_f64()));
        }
        if start.elapsed() > limit {
            return Ok(format!(
                "stopped waiting after {} s (trainer: {})",
                limit.as_secs(),
                t["detail"].as_str().unwrap_or(state)
            ));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Waits until the judge has judged every turn and the trainer has no update to make: no
/// update in progress or in the guard, fewer samples ready than start one (`min_samples`).
/// Three quiet looks in a row, a second apart: a sample becomes ready only after its judgment
/// lands, and the trainer looks for ready samples about once a second.
async fn quiesce(client: &Client, min_samples: u64, limit: Duration) -> Result<()> {
    let start = Instant::now();
    let mut quiet = 0;
    while quiet < 3 {
        let s = client.status().await?;
        let t = &s["trainer"];
        let state = t["state"].as_str().unwrap_or("");
        let idle = s["judge_pending"].as_u64() == Some(0)
            && t["update"].is_null()
            && !matches!(state, "training" | "guarding" | "starting")
            && (t["samples_waiting"].as_u64().unwrap_or(0) < min_samples
                || matches!(state, "held" | "paused" | "disabled"));
        quiet = if idle { quiet + 1 } else { 0 };
        if start.elapsed() > limit {
            bail!(
                "--deterministic: the judge and trainer were not done after {} s (trainer: {})",
                limit.as_secs(),
                t["detail"].as_str().unwrap_or(state)
            );
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    Ok(())
}

pub fn run(cfg: &Config, args: &SimArgs) -> Result<()> {
    if args.replot {
        let out = args.out.as_deref().context("--replot needs --out")?;
        let csv = std::fs::read_to_string(out.join("interactions.csv"))
            .with_context(|| format!("cannot read {}", out.join("interactions.csv").display()))?;
        let rows = report::parse_csv(&csv)?;
        let title = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        plot::reward_curve(&out.join("rewards.png"), &rows, 10, &title)?;
        println!("{}", out.join("rewards.png").display());
        return Ok(());
    }
    let name = args.preference.as_deref().unwrap_or_default();
    let pref = preference::find(name).with_context(|| {
        format!(
            "unknown preference {name:?}; the built-in ones are {}",
            preference::names()
        )
    })?;
    if args.interactions == 0 {
        bail!("--interactions must be at least 1");
    }
    let out = match &args.out {
        Some(o) => o.clone(),
        None => cfg.data_dir().join("sim").join(format!(
            "{}-{}-s{}-{}",
            pref.name,
            args.method.name(),
            args.seed,
            clawrl_core::store::now_ms() / 1000
        )),
    };
    // The in-process clawrl keeps its store in the run's folder: the folder of an earlier or
    // interrupted run would hand it that run's turns and versions instead of the base model.
    let data = out.join("data");
    if args.url.is_none() && data.read_dir().is_ok_and(|mut d| d.next().is_some()) {
        bail!(
            "{} holds the store of an earlier run, and a run starts from the base model on an \
             empty store: remove that folder or choose another --out",
            data.display()
        );
    }
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(simulate(cfg, args, pref, &out))
}

async fn simulate(cfg: &Config, args: &SimArgs, pref: Preference, out: &Path) -> Result<()> {
    let started = Instant::now();
    let (in_process, client) = connect(cfg, args, out).await?;
    wait_ready(&client).await?;
    let sets = prompts();
    let held_out: Vec<String> = sets.held_out.into_iter().take(args.eval_prompts).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    eprintln!(
        "sim: {} ({}), method {}, seed {}, {} interactions; output in {}",
        pref.name,
        pref.description,
        args.method.name(),
        args.seed,
        args.interactions,
        out.display()
    );
    let eval = |memory: Option<String>, phase: String| {
        let (client, held_out, pref) = (&client, &held_out, &pref);
        async move {
            evaluate(
                client,
                held_out,
                pref,
                &memory,
                None,
                args.max_tokens,
                &phase,
            )
            .await
        }
    };

    let before = eval(None, "before".into()).await?;
    eprintln!("before: {}", proportion(&before).describe());
    // Distillation moves the model toward what its hinted teacher writes: a rule the teacher
    // does not follow with the correction in front of it is out of distillation's reach.
    let teacher = evaluate(
        &client,
        &held_out,
        &pref,
        &None,
        Some((pref.correction, cfg.train.hint_placement)),
        args.max_tokens,
        "teacher",
    )
    .await?;
    eprintln!(
        "the hinted teacher (the correction as its hint): {}",
        proportion(&teacher).describe()
    );
    let mut user = User {
        client: &client,
        args,
        pref: &pref,
        corrections: Vec::new(),
        verdicts: HashMap::new(),
    };
    let mut rows = Vec::new();
    // Held-out checks during the run (--eval-every): (after interaction, not preferred), and
    // their replies.
    let mut checkpoints: Vec<(usize, usize)> = Vec::new();
    let mut checked: Vec<(String, Vec<Evaluated>)> = Vec::new();
    for i in 1..=args.interactions {
        if i > 1 && args.think_secs > 0.0 && !args.deterministic {
            tokio::time::sleep(Duration::from_secs_f64(args.think_secs)).await;
        }
        let prompt = &sets.train[rng.random_range(0..sets.train.len())];
        let t = Instant::now();
        let (satisfied, words) = user.interact(i, prompt).await?;
        if args.deterministic {
            quiesce(&client, cfg.train.min_samples as u64, settle_limit(args)).await?;
        }
        if args.eval_every > 0 && i % args.eval_every == 0 && i < args.interactions {
            let phase = format!("after-{i}");
            let e = eval(user.memory(), phase.clone()).await?;
            let p = proportion(&e);
            eprintln!("held-out after {i}: {}", p.describe());
            checkpoints.push((i, p.n - p.k));
            checked.push((phase, e));
        }
        let live_version = client.status().await?["live_version"].as_i64().unwrap_or(0);
        let row = Interaction {
            index: i,
            prompt: prompt.clone(),
            satisfied,
            words,
            live_version,
            seconds: t.elapsed().as_secs_f64(),
        };
        eprintln!(
            "{i:>3} {} {:>3} words, live v{live_version}, {:.1} s",
            if satisfied { "+1" } else { "-1" },
            row.words,
            row.seconds
        );
        rows.push(row);
    }
    let settled = finish_training(&client, cfg, args).await?;
    eprintln!("training: {settled}");
    // The judge against the user's verdicts (in-process runs: the store is the run's own).
    let judge = match &in_process {
        Some(p) => judge_summary(&p.store_path, &user.verdicts)?,
        None => None,
    };
    let after = eval(user.memory(), "after".into()).await?;
    let versions = Versions::fetch(&client).await?;
    // Rolling back to v0 must give back the "before" replies exactly (in-process runs only:
    // a rollback changes what a shared server serves).
    let rollback = if in_process.is_some() && versions.live != 0 {
        let body = json!({"version": 0});
        client
            .call(Method::POST, "/admin/rollback", Some(&body))
            .await?;
        let again = eval(None, "rollback".into()).await?;
        let same = before
            .iter()
            .zip(&again)
            .filter(|(a, b)| a.reply == b.reply)
            .count();
        Some((same, again.len()))
    } else {
        None
    };
    let outcome = outcome::Outcome {
        args,
        pref: &pref,
        before,
        teacher,
        checked,
        after,
        checkpoints,
        rows,
        versions,
        settled,
        judge,
        corrections: user.corrections.len(),
        rollback,
        wall_secs: started.elapsed().as_secs_f64(),
    };
    outcome.write(out)?;
    if let Some(p) = in_process {
        let _ = p.stop.send(());
        p.server.await??;
    }
    Ok(())
}

/// The clawrl to talk to: `--url`'s, or one started in this process on the run's own store.
async fn connect(cfg: &Config, args: &SimArgs, out: &Path) -> Result<(Option<InProcess>, Client)> {
    let (in_process, url) = match &args.url {
        Some(u) => (
            None,
            u.trim_end_matches('/').trim_end_matches("/v1").to_string(),
        ),
        None => {
            let (p, url) = start_in_process(cfg, args.method, args.deterministic, out).await?;
            (Some(p), url)
        }
    };
    let client = Client {
        target: Target::parse(&url, "--url")?,
        key: if in_process.is_some() {
            None
        } else {
            args.api_key.clone()
        },
    };
    Ok((in_process, client))
}

fn settle_limit(args: &SimArgs) -> Duration {
    Duration::from_secs(args.settle_secs)
}

/// After the last interaction: waits for the judge and the trainer, and says how it ended.
async fn finish_training(client: &Client, cfg: &Config, args: &SimArgs) -> Result<String> {
    if !args.deterministic {
        return settle(client, settle_limit(args)).await;
    }
    quiesce(client, cfg.train.min_samples as u64, settle_limit(args)).await?;
    Ok(
        "settled (deterministic: the last samples short of train.min_samples stay untrained)"
            .to_string(),
    )
}

/// The simulated user: asks, rates, answers with praise or a correction, and remembers what
/// it asked for (the system prompt of `--method prompt`) and what it thought of each reply.
struct User<'a> {
    client: &'a Client,
    args: &'a SimArgs,
    pref: &'a Preference,
    corrections: Vec<&'static str>,
    /// The user's verdict on each reply, by response id: what the judge is measured against.
    verdicts: HashMap<String, bool>,
}

impl User<'_> {
    /// The system prompt of `--method prompt` (none for the training methods).
    fn memory(&self) -> Option<String> {
        (self.args.method == SimMethod::Prompt)
            .then(|| memory_prompt(&self.corrections))
            .flatten()
    }

    /// Interaction `i` on `prompt`: the reply, the thumb, and the user's next message that
    /// closes the session. Returns whether the reply met the rule, and its words.
    async fn interact(&mut self, i: usize, prompt: &str) -> Result<(bool, usize)> {
        let (args, pref) = (self.args, self.pref);
        // Unique per run: a running server may see several runs.
        let session = format!("sim-{}-s{}-{i}", std::process::id(), args.seed);
        let mut msgs = messages(&self.memory(), prompt);
        let (id, reply, _) = self
            .client
            .chat(json!({
                "messages": msgs,
                "max_tokens": args.max_tokens,
                "seed": args.seed * 100_000 + i as u64,
                "session_id": session,
            }))
            .await?;
        let satisfied = pref.satisfied_by(&reply);
        // What the user says of it: the rule's verdict (a reply that loops pleases nobody), or
        // always a correction.
        let loops = preference::loops(&reply);
        let approves = satisfied && !loops && !args.correct_every_reply;
        let correction = if satisfied && loops {
            preference::LOOP_CORRECTION
        } else {
            pref.correction
        };
        self.verdicts.insert(id.clone(), approves);
        if !args.no_thumbs {
            let rating = if approves { "up" } else { "down" };
            let body = json!({"response_id": id, "rating": rating});
            self.client
                .call(Method::POST, "/v1/feedback", Some(&body))
                .await?;
        }
        // The user's next message: what the judge reads to score the reply and write a hint.
        msgs.push(json!({"role": "assistant", "content": reply}));
        let said = if approves { pref.praise } else { correction };
        msgs.push(json!({"role": "user", "content": said}));
        self.client
            .chat(json!({
                "messages": msgs,
                "max_tokens": 8,
                "session_id": session,
                "session_done": true,
            }))
            .await?;
        if !approves && !self.corrections.contains(&correction) {
            self.corrections.push(correction);
        }
        Ok((satisfied, preference::words(&reply)))
    }
}

/// The versions the run made, from `/admin/versions`.
struct Versions {
    live: i64,
    /// The live version's row (none while v0 is live).
    live_row: Option<Value>,
    created: usize,
    refused: usize,
    /// Each version's step (an update of hints alone steps at a fraction of the rate).
    rates: Vec<String>,
    /// What training cost: tokens trained on and the trainer's own time (guard excluded).
    trained_tokens: f64,
    train_secs: f64,
}

impl Versions {
    async fn fetch(client: &Client) -> Result<Self> {
        let versions = client.call(Method::GET, "/admin/versions", None).await?;
        let live = versions["live_version"].as_i64().unwrap_or(0);
        let rows = versions["versions"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        let sum = |k: &str| rows.iter().filter_map(|v| v[k].as_f64()).sum::<f64>();
        Ok(Self {
            live,
            live_row: rows
                .iter()
                .find(|v| v["id"].as_i64() == Some(live))
                .cloned(),
            created: rows.len(),
            refused: rows
                .iter()
                .filter(|v| v["guard_passed"] == json!(false))
                .count(),
            rates: rows
                .iter()
                .filter_map(|v| v["learning_rate"].as_f64())
                .map(|lr| format!("{lr:.2e}"))
                .collect(),
            trained_tokens: sum("tokens"),
            train_secs: sum("train_secs"),
        })
    }
}
