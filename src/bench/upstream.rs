//! `bench --upstream`: what the control plane costs a request. A clawrl replica and two
//! control planes in front of it (`serving.backend = "upstream"`, one speaking vLLM's API, one
//! SGLang's), all in this process on loopback; the same streamed chat requests straight to the
//! replica and through each plane, in rotating order; time to first token and decode speed
//! (medians, plane ÷ direct); and how long a replica takes to load a version's adapter
//! (`/v1/load_lora_adapter`).

use anyhow::{Context, Result, bail};
use clawrl_core::config::{Config, JudgeBackend, ServingBackend, UpstreamKind};
use clawrl_core::engine::Status;
use clawrl_core::http_client::{self, Target};
use hyper::Method;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const TOPICS: [&str; 6] = ["the sea", "mountains", "bread", "winter", "trains", "owls"];

/// One streamed reply as a client sees it.
struct Timing {
    first_token: Duration,
    decode_tok_s: f64,
}

/// Serves `c` on a loopback port until the returned sender is dropped; returns its URL.
async fn start(
    c: &Config,
) -> Result<(
    String,
    std::sync::Arc<clawrl_core::Core>,
    tokio::sync::oneshot::Sender<()>,
)> {
    let core = clawrl_core::build(c)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://127.0.0.1:{}", listener.local_addr()?.port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(clawrl_server::serve(listener, core.clone(), async {
        let _ = stopped.await;
    }));
    while core.engine.status() == Status::Loading {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Status::Failed(e) = core.engine.status() {
        bail!("the model failed to load: {e}");
    }
    Ok((url, core, stop))
}

/// A streamed greedy chat request; times the first content and the rest.
async fn streamed(url: &str, topic: &str, max_tokens: usize) -> Result<Timing> {
    let target = Target::parse(url, "bench")?;
    let body = json!({"messages": [{"role": "user", "content": format!("Write a short paragraph about {topic}.")}],
                      "max_tokens": max_tokens, "temperature": 0, "stream": true,
                      "stream_options": {"include_usage": true}});
    let sent = Instant::now();
    let response = http_client::open(
        &target,
        Method::POST,
        "/v1/chat/completions",
        None,
        Some(&body),
    )
    .await?;
    if !response.status().is_success() {
        bail!("{url}: {}", response.status());
    }
    let mut events = http_client::Events::new(response.into_body());
    let (mut first, mut tokens) = (None, 0u64);
    while let Some(event) = events.next().await {
        let event = event?;
        let now = sent.elapsed();
        let Some(Ok(v)) = http_client::event_data(&event).map(serde_json::from_str::<Value>) else {
            continue;
        };
        let content = v["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap_or_default();
        if first.is_none() && !content.is_empty() {
            first = Some(now);
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n;
        }
    }
    let total = sent.elapsed();
    let first = first.context("no content in the reply")?;
    let decode = (total - first).as_secs_f64();
    Ok(Timing {
        first_token: first,
        decode_tok_s: if decode > 0.0 {
            tokens.saturating_sub(1) as f64 / decode
        } else {
            0.0
        },
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(cfg: &Config, rounds: usize) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(measure(cfg, rounds.max(1)))
}

async fn measure(cfg: &Config, rounds: usize) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("clawrl-bench-upstream-{}", std::process::id()));
    let measured = measure_in(cfg, rounds, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    measured
}

async fn measure_in(cfg: &Config, rounds: usize, dir: &std::path::Path) -> Result<()> {
    let mut replica = cfg.clone();
    // The model from where the configuration finds it, the stores in a folder of their own.
    replica.model.path = cfg.model_path()?.display().to_string();
    replica.paths.data_dir = dir.join("replica").display().to_string();
    replica.train.enabled = false;
    replica.judge.backend = JudgeBackend::Off;
    replica.server.api_key.clear();
    // Every request computes its whole prompt: direct and through the plane alike.
    replica.server.prefix_cache_mb = 0;
    let (replica_url, replica_core, _stop_replica) = start(&replica).await?;
    let mut plane = replica.clone();
    plane.serving.backend = ServingBackend::Upstream;
    plane.upstream.urls = vec![replica_url.clone()];
    let mut urls = vec![replica_url.clone()];
    let mut stops = Vec::new();
    for kind in [UpstreamKind::Vllm, UpstreamKind::Sglang] {
        let mut c = plane.clone();
        c.upstream.kind = kind;
        c.paths.data_dir = dir.join(format!("plane-{kind:?}")).display().to_string();
        let (url, core, stop) = start(&c).await?;
        let up = core.upstream.clone().context("the plane has replicas")?;
        while !up.is_ready() {
            if let Some(why) = core.failure.borrow().clone() {
                bail!("{why}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        urls.push(url);
        stops.push(stop);
    }
    println!(
        "model: {}; {rounds} rounds of 6 streamed greedy replies (64 tokens) each way, rotating who goes first",
        replica_core.config.model_id
    );
    // Direct, through the vLLM-speaking plane, through the SGLang-speaking one.
    let mut timings: [Vec<Timing>; 3] = Default::default();
    streamed(&replica_url, "warming up", 8).await?;
    for round in 0..rounds {
        for (i, topic) in TOPICS.iter().enumerate() {
            for k in 0..3 {
                let which = (round + i + k) % 3;
                timings[which].push(streamed(&urls[which], topic, 64).await?);
            }
        }
    }
    let ttft = |v: &[Timing]| {
        median(
            v.iter()
                .map(|t| t.first_token.as_secs_f64() * 1000.0)
                .collect(),
        )
    };
    let speed = |v: &[Timing]| median(v.iter().map(|t| t.decode_tok_s).collect());
    let [direct, vllm, sglang] = &timings;
    println!(
        "| | direct to the replica | through the plane, vLLM's API | plane ÷ direct | through the plane, SGLang's API | plane ÷ direct |"
    );
    println!("|---|---|---|---|---|---|");
    let row = |what: &str, m: &dyn Fn(&[Timing]) -> f64| {
        let d = m(direct);
        println!(
            "| {what} | {d:.1} | {:.1} | {:.3} | {:.1} | {:.3} |",
            m(vllm),
            m(vllm) / d,
            m(sglang),
            m(sglang) / d
        );
    };
    row("time to first token (ms, median)", &ttft);
    row("decode (tok/s, median)", &speed);
    adapter_load(&replica_core, &replica_url, &plane, dir).await
}

/// Writes a version-sized adapter (train.lora_rank on train.lora_targets) and times a
/// replica loading it, as the plane does before a version goes live.
async fn adapter_load(
    replica: &clawrl_core::Core,
    url: &str,
    cfg: &Config,
    dir: &std::path::Path,
) -> Result<()> {
    let model = replica.engine.model().context("the replica's model")?;
    let adapter =
        clawrl_model::LoraAdapter::init(&model.config, cfg.lora(), &model.transformer.device(), 1);
    let path = dir.join("v1");
    let written = Instant::now();
    clawrl_model::peft::save(&adapter, &model.config, &model.name, &path)?;
    let write = written.elapsed();
    let target = Target::parse(url, "bench")?;
    let mut loads = Vec::new();
    for i in 0..3 {
        let name = format!("clawrl-bench-{i}");
        let body = json!({"lora_name": name, "lora_path": path.display().to_string()});
        let t = Instant::now();
        let (st, answer) = http_client::send(
            &target,
            Method::POST,
            "/v1/load_lora_adapter",
            None,
            Some(&body),
        )
        .await?;
        if !st.is_success() {
            bail!("loading the adapter: {st} {answer}");
        }
        loads.push(t.elapsed().as_secs_f64() * 1000.0);
        http_client::send(
            &target,
            Method::POST,
            "/v1/unload_lora_adapter",
            None,
            Some(&json!({"lora_name": name})),
        )
        .await?;
    }
    println!(
        "adapter (rank {}, {} targets): written in {:.0} ms; loaded by a replica in {:.0} ms (median of 3)",
        cfg.train.lora_rank,
        cfg.train.lora_targets.len(),
        write.as_secs_f64() * 1000.0,
        median(loads)
    );
    Ok(())
}
