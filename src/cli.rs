//! Command-line interface: parsing (clap), applying flags over the config, and the commands.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use clawrl_core::catalog::{self, CATALOG};
use clawrl_core::config::Config;
use clawrl_model::device::{self, DeviceChoice};
use clawrl_model::messages::Message;
use clawrl_model::{GenerateRequest, SamplingParams, WeightMode};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(
    name = "clawrl-tui",
    version,
    about = "Serve a local LLM, watch every conversation, and improve it from them.",
    long_about = "Serve a local LLM, watch every conversation, and improve it from them.\n\nWithout a subcommand: serves the model (as `serve`) under the control center, a terminal screen with the conversations, votes, rewards, training, versions and hardware. Press ? in it for the keys."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(subcommand)]
    pub command: Option<CliCommand>,
}

#[derive(Args, Debug, Clone, Default)]
pub struct GlobalArgs {
    /// Config file to use instead of the one in the platform config directory.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Model: a .gguf file, a Hugging Face model directory, or a model id (see `models`).
    #[arg(long, global = true, value_name = "PATH")]
    pub model: Option<String>,
    /// Compute device: auto, cpu, cuda or wgpu.
    #[arg(long, global = true)]
    pub device: Option<DeviceChoice>,
    /// Weight dtype: f32 or f16.
    #[arg(long, global = true)]
    pub dtype: Option<String>,
    /// Projection weights: both (dense for training and prompts, the GGUF's quantized blocks
    /// for decoding), dense (dequantized only) or blocks (quantized only; no training).
    #[arg(long, global = true, value_parser = parse_weight_mode)]
    pub weights: Option<WeightMode>,
}

fn parse_weight_mode(s: &str) -> Result<WeightMode, String> {
    match s {
        "dense" => Ok(WeightMode::Dense),
        "blocks" => Ok(WeightMode::Blocks),
        "both" => Ok(WeightMode::Both),
        _ => Err(format!("expected both, dense or blocks, got {s:?}")),
    }
}

#[derive(Subcommand, Debug)]
pub enum CliCommand {
    /// Generate one reply to a prompt (chat template applied) and print it; speed goes to stderr.
    Generate(GenerateArgs),
    /// Install a model from the catalog into the data directory (checks its sha256).
    FetchModel {
        /// Model id (default: the models the configuration needs: the default model and the
        /// judge's own model).
        id: Option<String>,
        /// Install every catalog model.
        #[arg(long)]
        all: bool,
    },
    /// List the catalog models and whether they are installed.
    Models,
    /// Print the resolved configuration, paths and the model summary.
    Info,
    /// Measure prefill and decode speed of several weight formats; prints ratios to the first.
    #[cfg(feature = "lab")]
    Bench(crate::bench::BenchArgs),
    /// Run the OpenAI-compatible server and capture every conversation turn (under the control
    /// center when the terminal allows; see --headless).
    Serve(ServeArgs),
    /// Chat with the model on standard input and output (no server, nothing captured).
    Chat,
    /// Write every captured turn (reads the store directly; works while the server runs).
    Export(ExportArgs),
    /// Control a running server: status, versions, approve, veto, rollback, pause, resume.
    Ctl(crate::ctl::CtlArgs),
    /// The control center against a running server elsewhere (`serve --headless` on a GPU
    /// box, this screen on a laptop, e.g. through an SSH tunnel): the same panes and keys.
    Attach(AttachArgs),
    /// Prove that it learns: a simulated user with a checkable preference talks to clawrl, and
    /// a held-out set is evaluated before and after (report, CSV in the output folder).
    Sim(crate::sim::SimArgs),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Run without the control center (logs go to the log file; Ctrl-C or SIGTERM stops
    /// cleanly after the requests in flight). Also the case when standard input or output is
    /// not a terminal.
    #[arg(long)]
    pub headless: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// Where and how the server listens.
#[derive(Args, Debug, Clone, Default)]
pub struct ServerArgs {
    /// Address to listen on (default: server.host, 127.0.0.1).
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on (0: any free port; the screen shows it).
    #[arg(long)]
    pub port: Option<u16>,
    /// Require `Authorization: Bearer KEY` (also CLAWRL__SERVER__API_KEY).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Generate on replicas of this kind instead of in this process (serving.backend =
    /// "upstream", upstream.kind); clawrl still renders, captures, judges, trains and gates.
    #[arg(long, value_name = "KIND", value_parser = ["vllm", "sglang"])]
    pub upstream: Option<String>,
    /// A replica's base URL, e.g. http://gpu1:8000 (repeat for several; upstream.urls).
    #[arg(long = "upstream-url", value_name = "URL")]
    pub upstream_urls: Vec<String>,
}

#[derive(Args, Debug)]
pub struct AttachArgs {
    /// The server's address.
    #[arg(long, default_value = "http://127.0.0.1:30000")]
    pub url: String,
    /// The server's API key (default: $CLAWRL_API_KEY).
    #[arg(long, env = "CLAWRL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Output format (one JSON object per line).
    #[arg(long, default_value = "jsonl", value_parser = ["jsonl"])]
    pub format: String,
    /// Only turns created at or after this time: 2026-11-24T10:00:00Z, 2026-11-24, or a duration ago (2h, 3days).
    #[arg(long)]
    pub since: Option<String>,
    /// Write to FILE instead of standard output.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// The store to read (default: store.path from the config).
    #[arg(long)]
    pub store: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// The user message.
    #[arg(long)]
    pub prompt: String,
    /// System prompt (default: the model's own).
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// 0 = greedy.
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    /// 0 = off.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

/// The configuration with the command-line flags applied on top.
pub fn resolve_config(global: &GlobalArgs) -> Result<Config> {
    let mut cfg = Config::load(global.config.as_deref())?;
    if let Some(m) = &global.model {
        cfg.model.path = m.clone();
    }
    if let Some(d) = global.device {
        cfg.model.device = d;
    }
    if let Some(d) = &global.dtype {
        cfg.model.dtype = d.clone();
    }
    if let Some(w) = global.weights {
        cfg.model.weights = w;
    }
    cfg.validate()?;
    // The screen's keys are checked at start for every command, headless too.
    clawrl_screen::keymap::Keymap::new(&cfg.tui.keys)?;
    Ok(cfg)
}

pub fn run() -> Result<()> {
    let cli = Cli::parse();
    let cfg = resolve_config(&cli.global)?;
    let _log_guard = clawrl_core::logging::init(&cfg.log_dir(), &cfg.log.level)?;
    let decodes = match &cli.command {
        None
        | Some(
            CliCommand::Chat | CliCommand::Generate(_) | CliCommand::Serve(_) | CliCommand::Sim(_),
        ) => true,
        #[cfg(feature = "lab")]
        Some(CliCommand::Bench(_)) => true,
        _ => false,
    };
    if decodes {
        // Before any model loads (the calibration's buffer is freed before the loading peak).
        let (distance, source) =
            clawrl_model::kernels::prefetch::init(&cfg.prefetch_calibration_path());
        tracing::info!("decode kernels prefetch {distance} bytes ahead ({source})");
    }
    match cli.command {
        None => serve(cfg, &cli.server, false),
        Some(CliCommand::Chat) => interactive(&cfg),
        Some(CliCommand::Generate(args)) => generate(&cfg, &args),
        Some(CliCommand::FetchModel { id, all }) => {
            let ids: Vec<String> = if all {
                CATALOG.iter().map(|m| m.id.to_string()).collect()
            } else if let Some(id) = id {
                vec![id]
            } else {
                let mut ids = vec![cfg.model.default.clone()];
                let judge = &cfg.judge;
                if judge.backend == clawrl_core::config::JudgeBackend::Local
                    && catalog::find(&judge.model).is_some()
                    && !ids.contains(&judge.model)
                {
                    ids.push(judge.model.clone());
                }
                ids
            };
            for id in ids {
                let m = catalog::find(&id).with_context(|| {
                    format!("unknown model id {id:?}; `clawrl-tui models` lists them")
                })?;
                let path = m.fetch(&cfg.data_dir(), &mut std::io::stderr())?;
                println!("{}", path.display());
            }
            Ok(())
        }
        Some(CliCommand::Models) => {
            for m in CATALOG {
                let state = if m.is_installed(&cfg.data_dir()) {
                    "installed"
                } else {
                    "not installed"
                };
                println!(
                    "{:<30} {:<14} {}\n{:<30} {}",
                    m.id,
                    state,
                    m.description,
                    "",
                    m.path(&cfg.data_dir()).display()
                );
            }
            Ok(())
        }
        Some(CliCommand::Info) => {
            println!(
                "config file:  {}",
                clawrl_core::config::user_config_path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            );
            println!("data dir:     {}", cfg.data_dir().display());
            println!("log dir:      {}", cfg.log_dir().display());
            println!(
                "model path:   {}",
                cfg.model_path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|e| format!("({e})"))
            );
            println!(
                "cuda driver:  {}",
                if device::cuda_driver_present() {
                    "present"
                } else {
                    "absent"
                }
            );
            println!("\n{}", toml::to_string_pretty(&cfg)?);
            let model = clawrl_core::load_model(&cfg)?;
            println!("{}", model.summary());
            Ok(())
        }
        #[cfg(feature = "lab")]
        Some(CliCommand::Bench(args)) => crate::bench::run(&cfg, &args),
        Some(CliCommand::Serve(args)) => serve(cfg, &args.server, args.headless),
        Some(CliCommand::Attach(args)) => attach(&cfg, &args),
        Some(CliCommand::Export(args)) => export(&cfg, &args),
        Some(CliCommand::Ctl(args)) => crate::ctl::run(&cfg, &args),
        Some(CliCommand::Sim(args)) => crate::sim::run(&cfg, &args),
    }
}

/// `attach`: the control center over a running server's admin routes.
fn attach(cfg: &Config, args: &AttachArgs) -> Result<()> {
    let keymap = clawrl_screen::keymap::Keymap::new(&cfg.tui.keys)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let remote = Arc::new(clawrl_screen::remote::Remote::new(
            &args.url,
            args.api_key.clone(),
        )?);
        let model = remote
            .model()
            .await
            .with_context(|| format!("cannot attach to {}", args.url))?;
        let (incoming, commands) = remote.clone().connect();
        let link = clawrl_screen::Link {
            incoming,
            commands,
            source: clawrl_screen::Source::Remote(remote),
            header: clawrl_screen::screen::Header {
                model_id: model.clone(),
                url: format!("{}/v1", args.url.trim_end_matches('/')),
            },
            model_ready: Some(model),
        };
        clawrl_screen::run(link, keymap, shutdown_signal()).await
    })
}

fn serve(mut cfg: Config, args: &ServerArgs, headless: bool) -> Result<()> {
    use std::io::IsTerminal;
    if let Some(h) = &args.host {
        cfg.server.host = h.clone();
    }
    if let Some(p) = args.port {
        cfg.server.port = p;
    }
    if let Some(k) = &args.api_key {
        cfg.server.api_key = k.clone();
    }
    if let Some(kind) = &args.upstream {
        cfg.serving.backend = clawrl_core::config::ServingBackend::Upstream;
        cfg.upstream.kind = serde_json::from_value(serde_json::json!(kind))?;
    }
    if !args.upstream_urls.is_empty() {
        cfg.upstream.urls = args.upstream_urls.clone();
    }
    cfg.validate()?;
    let screen = !headless && std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let keymap = clawrl_screen::keymap::Keymap::new(&cfg.tui.keys)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let core = clawrl_core::build(&cfg)?;
        // Subscribed before asking whether the model is loaded: no readiness is missed.
        let events = core.bus.subscribe();
        let addr = format!("{}:{}", cfg.server.host, cfg.server.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        let url = format!("http://{local}/v1");
        tracing::info!(%local, model = %core.config.model_id, "serving");
        // Reachable from elsewhere and open to anyone: said on screen, on stderr and in the log.
        let exposed = (!local.ip().is_loopback() && core.config.api_key.is_none()).then(|| {
            format!(
                "listening on {local} without an API key: anyone who can reach it can use the model and write into its training data; set server.api_key (or --api-key)"
            )
        });
        if let Some(text) = &exposed {
            tracing::warn!("{text}");
            clawrl_core::events::emit(
                &core.bus,
                clawrl_core::events::Event::Notice {
                    level: clawrl_core::events::Level::Error,
                    text: text.clone(),
                },
            );
        }
        if !screen {
            eprintln!(
                "clawrl-tui: serving `{}` at {url} (store: {}; logs: {})",
                core.config.model_id,
                cfg.store_path().display(),
                cfg.log_dir().display()
            );
            if let Some(text) = &exposed {
                eprintln!("clawrl-tui: warning: {text}");
            }
            // Stops on a signal, or when the engine failed (so that a supervisor restarts us).
            let mut failure = core.failure.subscribe();
            let stop = async move {
                tokio::select! {
                    _ = shutdown_signal() => {}
                    _ = failure.wait_for(Option::is_some) => {}
                }
            };
            clawrl_server::serve(listener, core.clone(), stop).await?;
            if let Some(why) = core.failure.borrow().clone() {
                anyhow::bail!("stopped: {why}");
            }
            eprintln!("clawrl-tui: stopped");
            return Ok(());
        }
        let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(clawrl_server::serve(listener, core.clone(), async {
            let _ = server_stopped.await;
        }));
        let (commands, received) = tokio::sync::mpsc::unbounded_channel();
        let executor = tokio::spawn(clawrl_core::commands::run(core.clone(), received));
        let link = clawrl_screen::Link {
            incoming: clawrl_screen::local_incoming(events),
            commands,
            source: clawrl_screen::Source::Local {
                store_path: cfg.store_path(),
                counters: core.counters.clone(),
            },
            header: clawrl_screen::screen::Header {
                model_id: core.config.model_id.clone(),
                url,
            },
            model_ready: core.engine.info().map(|i| i.name.clone()),
        };
        let shown = clawrl_screen::run(link, keymap, shutdown_signal()).await;
        // The screen is gone: stop accepting, let requests and chats in flight finish.
        eprintln!("clawrl-tui: stopping (requests in flight finish first)");
        let _ = stop_server.send(());
        server.await??;
        executor.await?;
        shown?;
        eprintln!("clawrl-tui: stopped");
        Ok(())
    })
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

fn export(cfg: &Config, args: &ExportArgs) -> Result<()> {
    let since = args
        .since
        .as_deref()
        .map(clawrl_core::store::parse_since)
        .transpose()?
        .unwrap_or(0);
    let path = args.store.clone().unwrap_or_else(|| cfg.store_path());
    let store = clawrl_core::store::Store::open_read_only(&path)?;
    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let n = store.export(since, |record| {
        writeln!(out, "{record}")?;
        Ok(())
    })?;
    out.flush()?;
    eprintln!("exported {n} turns from {}", path.display());
    Ok(())
}

fn sampling(cfg: &Config, args: Option<&GenerateArgs>) -> SamplingParams {
    let g = &cfg.generation;
    SamplingParams {
        temperature: args.and_then(|a| a.temperature).unwrap_or(g.temperature),
        top_p: args.and_then(|a| a.top_p).unwrap_or(g.top_p),
        top_k: args.and_then(|a| a.top_k).unwrap_or(g.top_k),
        seed: args.and_then(|a| a.seed),
    }
}

fn generate(cfg: &Config, args: &GenerateArgs) -> Result<()> {
    let model = clawrl_core::load_model(cfg)?;
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(Message::system(s.clone()));
    }
    messages.push(Message::user(args.prompt.clone()));
    let req = GenerateRequest {
        prompt_ids: model.chat_prompt(&messages, None)?,
        max_tokens: args.max_tokens.unwrap_or(cfg.generation.max_tokens),
        sampling: sampling(cfg, Some(args)),
        stop: args.stop.clone(),
        top_logprobs: 0,
    };
    let pool = clawrl_model::background::serving_pool("clawrl-generate")?;
    let gen_ = pool.install(|| {
        let mut out = std::io::stdout().lock();
        model.generate(&req, |piece| {
            out.write_all(piece.as_bytes())
                .and_then(|_| out.flush())
                .is_ok()
        })
    })?;
    writeln!(std::io::stdout())?;
    eprintln!("{}", gen_.speed_line());
    tracing::info!(speed = %gen_.speed_line(), finish = ?gen_.finish, "generate");
    Ok(())
}

/// The interim front end: model summary, then a chat on stdin/stdout.
fn interactive(cfg: &Config) -> Result<()> {
    eprintln!("loading {} ...", cfg.model_path()?.display());
    let model = clawrl_core::load_model(cfg)?;
    println!("{}", model.summary());
    println!("Type a message and press Enter (Ctrl-D to quit, /reset to start over).");
    let mut messages: Vec<Message> = Vec::new();
    let stdin = std::io::stdin();
    loop {
        print!("> ");
        std::io::stdout().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            println!();
            return Ok(());
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/reset" {
            messages.clear();
            continue;
        }
        messages.push(Message::user(line));
        let req = GenerateRequest {
            prompt_ids: model.chat_prompt(&messages, None)?,
            max_tokens: cfg.generation.max_tokens,
            sampling: sampling(cfg, None),
            stop: Vec::new(),
            top_logprobs: 0,
        };
        let mut out = std::io::stdout().lock();
        match model.generate(&req, |p| {
            out.write_all(p.as_bytes())
                .and_then(|_| out.flush())
                .is_ok()
        }) {
            Ok(g) => {
                writeln!(out)?;
                eprintln!("[{}]", g.speed_line());
                messages.push(Message::assistant(g.text));
            }
            Err(e) => {
                messages.pop();
                eprintln!("error: {e:#}");
            }
        }
    }
}
