//! The regression guard (PIPELINE.md §6): before a candidate may go live on its own, it is
//! scored on a fixed set of probe prompts and on recently approved answers.
//!
//! - KL from the base and from the live version: for each probe, the base model's greedy reply
//!   (computed once) is scored under the candidate, the base and the live version; the full
//!   next-token distributions are compared at every position (mean nats per token).
//! - Approved answers: the mean log-prob per token of the latest turns rewarded +1 must not fall
//!   by more than a limit from the live version to the candidate (learning must not unlearn
//!   what the user liked).
//!
//! Every score is computed by the engine as background work, so the guard never slows serving.

use crate::config::GateSection;
use crate::engine::{Engine, EngineEvent, Prompt, Task, Version};
use crate::model::{SamplingParams, scoring};
use crate::store::Store;
use anyhow::{Context, Result, bail};
use burn::tensor::Tensor;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Mutex;

/// The probe prompts shipped with clawrl.
pub const BUILTIN_PROBES: &str = include_str!("../../assets/probes.json");

/// Longest approved answer (prompt + reply tokens) the guard scores.
const MAX_APPROVED_TOKENS: usize = 768;

/// A probe prompt with the base model's reply to it.
#[derive(Debug, Clone)]
struct Reference {
    prompt_ids: Vec<u32>,
    reply_ids: Vec<u32>,
}

pub struct Guard {
    probes: Vec<Vec<Value>>,
    limits: GateSection,
    references: Mutex<Option<Vec<Reference>>>,
}

/// What the guard measured and decided.
#[derive(Debug, Clone, PartialEq)]
pub struct GuardReport {
    pub kl_base: f64,
    pub kl_live: f64,
    /// Mean log-prob per token of approved answers, candidate minus live (None: no answers).
    pub approved_delta: Option<f64>,
    pub approved_answers: usize,
    pub passed: bool,
    pub reasons: Vec<String>,
    /// How long the guard took.
    pub secs: f64,
}

impl GuardReport {
    pub fn json(&self, limits: &GateSection, probes: usize) -> Value {
        json!({
            "passed": self.passed,
            "reasons": self.reasons,
            "kl_base": self.kl_base,
            "kl_live": self.kl_live,
            "approved_delta": self.approved_delta,
            "approved_answers": self.approved_answers,
            "probes": probes,
            "secs": self.secs,
            "limits": {
                "max_kl_base": limits.max_kl_base,
                "max_kl_live": limits.max_kl_live,
                "max_approved_drop": limits.max_approved_drop,
            },
        })
    }
}

/// Parses a probe file: a JSON list of chats, each a non-empty list of `{role, content}`.
pub fn parse_probes(text: &str, origin: &str) -> Result<Vec<Vec<Value>>> {
    let value: Value =
        serde_json::from_str(text).with_context(|| format!("{origin} is not valid JSON"))?;
    let Some(list) = value.as_array() else {
        bail!("{origin} must hold a JSON list of chats");
    };
    list.iter()
        .enumerate()
        .map(|(i, chat)| {
            let messages = chat.as_array().filter(|m| !m.is_empty()).with_context(|| {
                format!("{origin}: probe {i} must be a non-empty list of messages")
            })?;
            for m in messages {
                let ok = m.get("role").and_then(Value::as_str).is_some()
                    && m.get("content").and_then(Value::as_str).is_some();
                if !ok {
                    bail!("{origin}: probe {i} has a message without a string role and content");
                }
            }
            Ok(messages.clone())
        })
        .collect()
}

impl Guard {
    /// The built-in probes plus those of `gate.probes_file` (checked at start).
    pub fn new(limits: &GateSection) -> Result<Self> {
        let mut probes = parse_probes(BUILTIN_PROBES, "assets/probes.json")?;
        if !limits.probes_file.is_empty() {
            let path = Path::new(&limits.probes_file);
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("gate.probes_file: cannot read {}", path.display()))?;
            probes.extend(parse_probes(
                &text,
                &format!("gate.probes_file {}", path.display()),
            )?);
        }
        Ok(Self {
            probes,
            limits: limits.clone(),
            references: Mutex::new(None),
        })
    }

    pub fn probes(&self) -> usize {
        self.probes.len()
    }

    /// The base model's greedy reply to each probe (computed once per process).
    fn references(&self, engine: &Engine) -> Result<Vec<Reference>> {
        if let Some(r) = self.references.lock().unwrap().as_ref() {
            return Ok(r.clone());
        }
        let mut refs = Vec::with_capacity(self.probes.len());
        for probe in &self.probes {
            let task = Task::Generate {
                max_tokens: self.limits.probe_tokens,
                sampling: SamplingParams::greedy(),
                stop: Vec::new(),
                top_logprobs: 0,
            };
            let prompt = Prompt::chat(probe.clone(), None);
            match engine.run_blocking(prompt, task, Version::Exactly(0)) {
                Ok(EngineEvent::Finished {
                    generation,
                    prompt_ids,
                    ..
                }) if !generation.ids.is_empty() => refs.push(Reference {
                    prompt_ids,
                    reply_ids: generation.ids,
                }),
                Ok(_) => {}
                Err(e) => bail!("the guard's probe reply: {e}"),
            }
        }
        *self.references.lock().unwrap() = Some(refs.clone());
        Ok(refs)
    }

    /// Scores `candidate` against the base model and the `live` version.
    pub fn evaluate(
        &self,
        engine: &Engine,
        store: &Mutex<Store>,
        candidate: i64,
        live: i64,
    ) -> Result<GuardReport> {
        let started = std::time::Instant::now();
        // Each version scores each reference as its own background job (the engine computes
        // it a chunk per round); the KL divergences are computed here, on the trainer's thread.
        let (mut kl_base, mut kl_live, mut tokens) = (0f64, 0f64, 0usize);
        for r in self.references(engine)? {
            let dist = |version: i64| {
                engine
                    .score_blocking(
                        Prompt::Ids(r.prompt_ids.clone()),
                        r.reply_ids.clone(),
                        version,
                        true,
                    )
                    .map(|(_, d)| d.expect("distributions were asked for"))
                    .context("the guard's probe score")
            };
            let own = dist(candidate)?;
            let base = dist(0)?;
            let kl = |other: Tensor<2>| -> f64 {
                scoring::kl_per_position(own.clone(), other)
                    .iter()
                    .map(|&k| k.max(0.0) as f64)
                    .sum()
            };
            tokens += r.reply_ids.len();
            kl_base += kl(base.clone());
            kl_live += if live == 0 { kl(base) } else { kl(dist(live)?) };
        }
        let per_token = |s: f64| if tokens > 0 { s / tokens as f64 } else { 0.0 };
        let (kl_base, kl_live) = (per_token(kl_base), per_token(kl_live));

        let answers = store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .approved_answers(self.limits.approved_answers, MAX_APPROVED_TOKENS)?;
        let mut delta_sum = 0f64;
        for (prompt, reply) in &answers {
            let mean_logprob = |version: i64| -> Result<f64> {
                let (lp, _) = engine
                    .score_blocking(Prompt::Ids(prompt.clone()), reply.clone(), version, false)
                    .context("the guard's approved-answer score")?;
                Ok(lp.iter().map(|&x| x as f64).sum::<f64>() / lp.len().max(1) as f64)
            };
            delta_sum += mean_logprob(candidate)? - mean_logprob(live)?;
        }
        let approved_delta = (!answers.is_empty()).then(|| delta_sum / answers.len() as f64);

        let l = &self.limits;
        let mut reasons = Vec::new();
        if kl_base > l.max_kl_base {
            reasons.push(format!(
                "KL from the base {kl_base:.4} > gate.max_kl_base {}",
                l.max_kl_base
            ));
        }
        if kl_live > l.max_kl_live {
            reasons.push(format!(
                "KL from the live version v{live} {kl_live:.4} > gate.max_kl_live {}",
                l.max_kl_live
            ));
        }
        if let Some(d) = approved_delta
            && d < -l.max_approved_drop
        {
            reasons.push(format!(
                "approved answers' log-prob fell by {:.4} per token > gate.max_approved_drop {}",
                -d, l.max_approved_drop
            ));
        }
        Ok(GuardReport {
            kl_base,
            kl_live,
            approved_delta,
            approved_answers: answers.len(),
            passed: reasons.is_empty(),
            reasons,
            secs: started.elapsed().as_secs_f64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_probes_parse_and_bad_probe_files_are_refused_with_the_reason() {
        assert!(parse_probes(BUILTIN_PROBES, "builtin").unwrap().len() >= 8);
        let err = parse_probes("{\"a\": 1}", "f.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("list of chats"), "{err}");
        let err = parse_probes("[[]]", "f.json").unwrap_err().to_string();
        assert!(err.contains("probe 0"), "{err}");
        let err = parse_probes("[[{\"role\": \"user\"}]]", "f.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("content"), "{err}");
        assert!(parse_probes("not json", "f.json").is_err());
    }
}
