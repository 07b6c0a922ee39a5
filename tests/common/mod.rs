//! Shared test helpers: where the real models and test assets live, and loading them once.
#![allow(dead_code)]

use burn::tensor::{DType, Device};
use clawrl_core::catalog;
use clawrl_core::config::Config;
use clawrl_model::{
    KvDtype, LoadOptions, LoadedModel, LoraAdapter, LoraConfig, Target, WeightMode,
};
use std::path::PathBuf;
use std::sync::OnceLock;

/// How far one prompt's log-probs may move between two ways of computing it (prefix cache
/// hit or miss, prompt pass or decode step, one chunk or several) under the shipped f16 KV
/// cache, in nats. The f32 paths agree to ~1e-6; rounding keys and values to f16 (a relative
/// step of 2^-11) turns such a last-bit difference into a whole f16 step for the odd element.
/// Measured: up to 4e-4 with the AVX2 kernels (tests/engine.rs with f16; the rollback in
/// tests/train.rs 1.4e-4), 1.1e-3 with the AVX-512 ones (tests/upstream.rs, the SGLang
/// replica's log-probs against the control plane's, on the Intel Xeon of 2026-12-07: their
/// sums run in another order). 3e-3 leaves room for other CPUs; a version's change to the
/// weights, or a wrong token or position, moves log-probs by far more.
pub const PATHS_LOGPROB_TOL: f64 = 3e-3;

pub const SMOLLM2: &str = "smollm2-135m-instruct";
pub const QWEN25: &str = "qwen2.5-coder-0.5b-instruct";

pub fn data_dir() -> PathBuf {
    Config::load(None).expect("config").data_dir()
}

/// Path of an installed catalog model; fails with the command that installs it.
pub fn model_path(id: &str) -> PathBuf {
    let m = catalog::find(id).expect("catalog id");
    let p = m.path(&data_dir());
    assert!(
        p.exists(),
        "{} is not installed at {}: run ./test (it installs what the tests need) or `clawrl-tui fetch-model {id}`",
        id,
        p.display()
    );
    p
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn read_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).expect("fixture"))
        .expect("fixture JSON")
}

/// The device the device-independent model tests run on: `CLAWRL_TEST_DEVICE` (cpu, cuda,
/// wgpu; a GPU needs a binary built with its feature), the CPU when unset.
pub fn test_device() -> Device {
    let choice = std::env::var("CLAWRL_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let device = clawrl_model::device::select(choice.parse().expect("CLAWRL_TEST_DEVICE"))
        .expect("CLAWRL_TEST_DEVICE names a device this build can use");
    eprintln!("test device: {device:?}");
    device
}

pub fn load(id: &str, dtype: DType, weights: WeightMode) -> LoadedModel {
    LoadedModel::load(
        &model_path(id),
        &LoadOptions {
            device: Device::flex(),
            dtype,
            weights,
            max_context: 0,
            kv_cache: KvDtype::F32,
        },
    )
    .expect("model loads")
}

/// The default model as shipped (f32, dense + blocks for decoding), loaded once per test binary.
pub fn smollm2() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| load(SMOLLM2, DType::F32, WeightMode::Both))
}

pub fn qwen25() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| load(QWEN25, DType::F32, WeightMode::Both))
}

/// An adapter on every projection of `model` with A and B uniform in ±0.05: it changes the
/// model's outputs (a fresh adapter has B = 0 and changes nothing).
pub fn random_adapter(model: &LoadedModel, rank: usize, seed: u64) -> LoraAdapter {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let config = LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        targets: Target::ALL.to_vec(),
    };
    LoraAdapter::build(
        &model.config,
        config,
        |_, _, din, dout, r| {
            let a = (0..din * r)
                .map(|_| rng.random_range(-0.05..0.05))
                .collect();
            let b = (0..r * dout)
                .map(|_| rng.random_range(-0.05..0.05))
                .collect();
            Ok((a, b))
        },
        &model.transformer.device(),
    )
    .expect("adapter builds")
}

/// Directory holding test assets fetched by `./test` (the official Qwen3 tokenizer.json).
pub fn test_assets() -> PathBuf {
    std::env::var_os("CLAWRL_TEST_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-assets"))
}
pub mod scripted_judge;
pub mod server;
