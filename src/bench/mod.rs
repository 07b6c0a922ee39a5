//! `clawrl-tui bench`: prefill and decode speed of several weight formats (and devices) of the
//! same model, measured in one invocation and printed as ratios to the first (the baseline).

use anyhow::{Result, bail};
use clap::Args;
use clawrl_core::config::Config;
use clawrl_core::load_model;
use clawrl_model::{GenerateRequest, SamplingParams, WeightMode};

pub mod judge;
pub mod kernels;
pub mod llama_cpp;
pub mod train;
pub mod tui;
pub mod upstream;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Variants as DTYPE[:WEIGHTS][@DEVICE] (e.g. f32, f16, f32:dense, f32:blocks,
    /// f32:dense@wgpu; without WEIGHTS the config's model.weights, without DEVICE its
    /// model.device); the first is the baseline.
    #[arg(long, value_delimiter = ',', default_value = "f32,f16")]
    pub variants: Vec<String>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens to decode.
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,
    /// Timed repetitions per variant (after one warm-up run); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Measure the judge instead: its `reason` and `direct` voting modes on labelled turns
    /// (valid-vote rate, agreement with the label, seconds per turn).
    #[arg(long)]
    pub judge: bool,
    /// With --judge: the voting modes to compare; the first is the baseline.
    #[arg(long, value_delimiter = ',', default_value = "reason,direct")]
    pub modes: Vec<String>,
    /// With --judge: also ask for hints, and count on the corrections how many are usable and
    /// how many merely restate the reply (dropped before they reach the teacher).
    #[arg(long)]
    pub hints: bool,
    /// Measure online training instead: serving latency with training on vs off, the time
    /// from a next state to a version trained on it serving, peak RSS, step time, and decode
    /// with an adapter vs without.
    #[arg(long)]
    pub train: bool,
    #[command(flatten)]
    pub train_args: train::TrainBenchArgs,
    /// Measure the serving engine against llama.cpp on the same GGUF and token ids: prefill,
    /// decode, 4 streams, decode at 4 K context, TTFT of a repeated 5 K-token system prompt,
    /// and the physical bound of decoding (install llama.cpp with scripts/install-llama-cpp.sh).
    #[arg(long)]
    pub against_llama_cpp: bool,
    /// With --against-llama-cpp: the Python that has llama-cpp-python.
    #[arg(long, default_value = "target/llama-cpp/bin/python")]
    pub llama_cpp_python: std::path::PathBuf,
    /// Measure the decode kernels alone: each quantized type × 1 and 4 activation rows × every
    /// instruction set this CPU runs (ns per 32 weights, GB/s, speed-up over the portable kernel).
    #[arg(long)]
    pub kernels: bool,
    /// Measure the control center instead: event folding and frame drawing time on an empty
    /// and on a full history (no model needed).
    #[arg(long)]
    pub tui: bool,
    /// With --tui: frames drawn per case (the median is reported).
    #[arg(long, default_value_t = 50)]
    pub frames: usize,
    /// Measure the control plane instead: streamed replies straight from a replica and through
    /// a control plane in front of it (time to first token, decode speed), and a replica
    /// loading a version's adapter (no GPU or vLLM needed: clawrl is the replica).
    #[arg(long)]
    pub upstream: bool,
}

struct Row {
    name: String,
    prefill: f64,
    decode: f64,
    load_secs: f64,
    weight_mb: f64,
}

/// The machine a run measured: the CPU's model, its vector extensions that matter to the
/// kernels, and the cores (every figure names its CPU: machines differ).
fn machine() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let flags = field("flags").unwrap_or_default();
    let wanted = [
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx_vnni",
        "amx_tile",
    ];
    let have: Vec<&str> = wanted
        .into_iter()
        .filter(|w| flags.split_whitespace().any(|f| f == *w))
        .collect();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "cpu: {} ({}), {cores} cores",
        field("model name").unwrap_or_else(|| "unknown CPU".into()),
        if have.is_empty() {
            "no AVX2".to_string()
        } else {
            have.join(" ")
        }
    )
}

pub fn run(cfg: &Config, args: &BenchArgs) -> Result<()> {
    println!("{}", machine());
    println!(
        "prefetch: {} bytes ahead of each weight row",
        clawrl_model::kernels::prefetch::distance()
    );
    if args.judge {
        return judge::run(cfg, &args.modes, args.hints);
    }
    if args.train {
        return train::run(cfg, &args.train_args);
    }
    if args.tui {
        return tui::run(args.frames);
    }
    if args.kernels {
        return kernels::run(args.runs.max(1));
    }
    if args.upstream {
        return upstream::run(cfg, args.runs);
    }
    if args.against_llama_cpp {
        return llama_cpp::run(cfg, &args.llama_cpp_python);
    }
    if args.variants.is_empty() || args.runs == 0 {
        bail!("bench needs at least one variant and one run");
    }
    println!("model: {}", cfg.model_path()?.display());
    println!(
        "prompt {} tokens, decode {} tokens, median of {} runs",
        args.prompt_tokens, args.decode_tokens, args.runs
    );
    let mut rows: Vec<Row> = Vec::new();
    for v in &args.variants {
        let (v_format, device) = match v.split_once('@') {
            Some((f, d)) => (f, Some(d.parse()?)),
            None => (v.as_str(), None),
        };
        let (dtype, weights) = match v_format.split_once(':') {
            Some((d, w)) => (d, Some(w)),
            None => (v_format, None),
        };
        let mut c = cfg.clone();
        c.model.device = device.unwrap_or(cfg.model.device);
        c.model.dtype = dtype.to_string();
        c.model.weights = match weights {
            None => cfg.model.weights,
            Some("both") => WeightMode::Both,
            Some("dense") => WeightMode::Dense,
            Some("blocks") => WeightMode::Blocks,
            Some(other) => {
                bail!("unknown weight mode {other:?} in variant {v:?} (both, dense, blocks)")
            }
        };
        let t = std::time::Instant::now();
        let model = match load_model(&c) {
            Ok(m) => m,
            // A variant this machine cannot run (f16 on a GPU without it) is reported, not fatal;
            // the baseline must load.
            Err(e) if !rows.is_empty() => {
                println!("{v:<16} skipped: {e:#}");
                continue;
            }
            Err(e) => return Err(e),
        };
        let load_secs = t.elapsed().as_secs_f64();
        // A fixed, model-independent prompt: the same ids for every variant.
        let prompt_ids = synthetic_prompt(model.config.vocab_size, args.prompt_tokens, 0);
        let req = GenerateRequest {
            prompt_ids,
            max_tokens: args.decode_tokens,
            sampling: SamplingParams::greedy(),
            stop: vec![],
            top_logprobs: 0,
        };
        let mut prefill = Vec::new();
        let mut decode = Vec::new();
        // On a pool of its own, as the engine runs (see background::serving_pool).
        let pool = clawrl_model::background::serving_pool("clawrl-bench")?;
        for i in 0..=args.runs {
            // Rates use the tokens actually decoded (a stop token may end a run early).
            let g = pool.install(|| model.generate(&req, |_| true))?;
            if i == 0 {
                continue;
            }
            prefill.push(g.prompt_tokens as f64 / g.prefill_secs);
            decode.push(g.ids.len().saturating_sub(1) as f64 / g.decode_secs.max(1e-9));
        }
        rows.push(Row {
            name: v.clone(),
            prefill: median(&mut prefill),
            decode: median(&mut decode),
            load_secs,
            weight_mb: model.transformer.weight_bytes() as f64 / 1e6,
        });
        let r = rows.last().expect("just pushed");
        println!(
            "{:<16} load {:>6.2} s  weights {:>7.1} MB  prefill {:>8.1} tok/s  decode {:>7.1} tok/s",
            r.name, r.load_secs, r.weight_mb, r.prefill, r.decode
        );
    }
    let base = &rows[0];
    println!(
        "\nratios to {} (weights: lower is leaner; prefill/decode: higher is faster):",
        base.name
    );
    for r in &rows {
        println!(
            "{:<16} weights x{:.2}  prefill x{:.2}  decode x{:.2}",
            r.name,
            r.weight_mb / base.weight_mb,
            r.prefill / base.prefill,
            r.decode / base.decode
        );
    }
    Ok(())
}

/// `n` token ids spread over the vocabulary (away from its special ends); `salt` varies them.
pub(crate) fn synthetic_prompt(vocab: usize, n: usize, salt: u32) -> Vec<u32> {
    let vocab = vocab as u32;
    (0..n as u32)
        .map(|i| 100 + (i * 7919 + salt * 104_729) % (vocab - 200))
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
