//! An engine's settings from the configuration: the policy's, and a judge's on its own model.

use super::EngineConfig;
use crate::config::Config;
use anyhow::Result;

impl EngineConfig {
    /// The policy's engine as the configuration sets it.
    pub fn policy(cfg: &Config) -> Result<Self> {
        let s = &cfg.server;
        Ok(Self {
            model_path: cfg.model_path()?,
            load: cfg.load_options()?,
            max_queue: s.max_queue,
            max_active: s.max_active,
            prefix_cache_bytes: s.prefix_cache_mb << 20,
            prefix_cache_min_tokens: s.prefix_cache_min_tokens,
            background: false,
            background_share: cfg.engine.background_share,
        })
    }

    /// The engine of a judge with its own model (`judge.model`), if one is configured: on the
    /// policy's device, with its own weight mode and dtype (`judge.weights`, `judge.dtype`:
    /// by default the quantized blocks alone, as it never trains), one job at a time, at the
    /// lowest CPU priority.
    pub fn judge(cfg: &Config) -> Result<Option<Self>> {
        let spec = &cfg.judge.model;
        if spec.is_empty() || cfg.judge.backend != crate::config::JudgeBackend::Local {
            return Ok(None);
        }
        let policy = Self::policy(cfg)?;
        let model_path = crate::catalog::resolve(spec, &cfg.data_dir())
            .map_err(|e| anyhow::anyhow!("judge.model: {e:#}"))?;
        // The policy's own model: its engine already holds the frozen base weights.
        let same = |a: &std::path::Path, b: &std::path::Path| {
            a.canonicalize()
                .ok()
                .is_some_and(|a| b.canonicalize().ok() == Some(a))
        };
        if same(&model_path, &policy.model_path) {
            return Ok(None);
        }
        // The quantized kernels run on the CPU: on a GPU the judge's weights are dense.
        let on_cpu = clawrl_model::device::is_host(&policy.load.device);
        let load = clawrl_model::LoadOptions {
            weights: if on_cpu {
                cfg.judge.weights
            } else {
                clawrl_model::WeightMode::Dense
            },
            dtype: clawrl_model::device::parse_dtype(&cfg.judge.dtype)?,
            ..policy.load.clone()
        };
        Ok(Some(Self {
            model_path,
            load,
            max_active: 1,
            // The judge prompts of one pass share their system prompt.
            prefix_cache_bytes: 64 << 20,
            background: true,
            ..policy
        }))
    }
}
