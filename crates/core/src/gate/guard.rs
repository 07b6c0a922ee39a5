//! The regression guard (PIPELINE.md §6): before a candidate may go live on its own, it is
//! scored on a fixed set of probe prompts and on recently approved answers.
//!
//! - KL from the base and from the live version: for each probe, the base model's greedy reply
//!   (computed once) is scored under the candidate, the base and the live version; the full
//!   next-token distributions are compared at every position (mean nats per token).
//! - Approved answers: the mean log-prob per token of the latest turns rewarded +1 must not fall
//!   by more than a limit from the live version to the candidate (learning must not unlearn
//!   what the user liked).
//! - Degeneration: the candidate's own greedy replies to the probes must not repeat themselves
//!   much more than the base model's (loops appear while the KL on the base's replies is
//!   still small).
//!
//! Every score is computed by the engine as background work, so the guard never slows serving.

use crate::config::GateSection;
use crate::engine::{Engine, EngineEvent, Prompt, Task, VersionChoice};
use crate::store::Store;
use anyhow::{Context, Result, bail};
use burn::tensor::Tensor;
use clawrl_model::messages::{Message, parse_messages};
use clawrl_model::{SamplingParams, scoring};
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Mutex;

/// The probe prompts shipped with clawrl.
pub(crate) const BUILTIN_PROBES: &str = include_str!("../../../../assets/probes.json");

/// Longest approved answer (prompt + reply tokens) the guard scores.
const MAX_APPROVED_TOKENS: usize = 768;

/// A probe prompt with the base model's greedy reply to it: the first `gate.probe_tokens`
/// are scored for KL, all `gate.repetition_tokens` count for the base's repetition.
#[derive(Debug, Clone)]
struct Reference {
    prompt_ids: Vec<u32>,
    reply_ids: Vec<u32>,
    long_reply_ids: Vec<u32>,
}

/// Length of the n-grams the degeneration check counts.
const REPETITION_NGRAM: usize = 4;

/// The share of n-grams, over all `sequences`, that repeat an earlier n-gram of the same
/// sequence: near 0 for varied text, towards 1 for text stuck in a loop.
pub fn repeated_ngram_share<T: Eq + std::hash::Hash>(sequences: &[Vec<T>], n: usize) -> f64 {
    let (mut repeated, mut total) = (0usize, 0usize);
    for s in sequences {
        let grams: Vec<&[T]> = s.windows(n).collect();
        let distinct: std::collections::HashSet<&[T]> = grams.iter().copied().collect();
        repeated += grams.len() - distinct.len();
        total += grams.len();
    }
    if total == 0 {
        0.0
    } else {
        repeated as f64 / total as f64
    }
}

pub(crate) struct Guard {
    probes: Vec<Vec<Message>>,
    limits: GateSection,
    references: Mutex<Option<Vec<Reference>>>,
}

/// What the guard measured and decided.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GuardReport {
    pub kl_base: f64,
    pub kl_live: f64,
    /// Mean log-prob per token of approved answers, candidate minus live (None: no answers).
    pub approved_delta: Option<f64>,
    pub approved_answers: usize,
    /// Repeated token 4-grams in the candidate's and the base's probe replies (None: off).
    pub repetition: Option<(f64, f64)>,
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
            "repetition": self.repetition.map(|(c, _)| c),
            "base_repetition": self.repetition.map(|(_, b)| b),
            "probes": probes,
            "secs": self.secs,
            "limits": {
                "max_kl_base": limits.max_kl_base,
                "max_kl_live": limits.max_kl_live,
                "max_approved_drop": limits.max_approved_drop,
                "max_repetition_rise": limits.max_repetition_rise,
            },
        })
    }

    /// Sets `reasons` (every limit exceeded) and `passed` from the measures.
    fn decide(&mut self, l: &GateSection, live: i64) {
        let (kl_base, kl_live) = (self.kl_base, self.kl_live);
        self.reasons.clear();
        if self.kl_base > l.max_kl_base {
            self.reasons.push(format!(
                "KL from the base {kl_base:.4} > gate.max_kl_base {}",
                l.max_kl_base
            ));
        }
        if self.kl_live > l.max_kl_live {
            self.reasons.push(format!(
                "KL from the live version v{live} {kl_live:.4} > gate.max_kl_live {}",
                l.max_kl_live
            ));
        }
        if let Some(d) = self.approved_delta
            && d < -l.max_approved_drop
        {
            self.reasons.push(format!(
                "approved answers' log-prob fell by {:.4} per token > gate.max_approved_drop {}",
                -d, l.max_approved_drop
            ));
        }
        if let Some((own, base)) = self.repetition
            && own - base > l.max_repetition_rise
        {
            self.reasons.push(format!(
                "its probe replies repeat themselves: {:.1} % of token 4-grams vs the base's {:.1} % (+{:.1} points > gate.max_repetition_rise {})",
                own * 100.0,
                base * 100.0,
                (own - base) * 100.0,
                l.max_repetition_rise
            ));
        }
        self.passed = self.reasons.is_empty();
    }
}

/// Parses a probe file: a JSON list of chats, each a non-empty list of `{role, content}`.
pub(crate) fn parse_probes(text: &str, origin: &str) -> Result<Vec<Vec<Message>>> {
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
            parse_messages(messages).map_err(|e| anyhow::anyhow!("{origin}: probe {i}: {e}"))
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
        let tokens = self.limits.probe_tokens.max(self.limits.repetition_tokens);
        for probe in &self.probes {
            if let Some((prompt_ids, ids)) = self.probe_reply(engine, probe, 0, tokens)?
                && !ids.is_empty()
            {
                refs.push(Reference {
                    prompt_ids,
                    reply_ids: ids[..ids.len().min(self.limits.probe_tokens)].to_vec(),
                    long_reply_ids: ids[..ids.len().min(self.limits.repetition_tokens)].to_vec(),
                });
            }
        }
        *self.references.lock().unwrap() = Some(refs.clone());
        Ok(refs)
    }

    /// `version`'s greedy reply to `probe` (prompt ids, reply ids; None if it did not finish).
    fn probe_reply(
        &self,
        engine: &Engine,
        probe: &[Message],
        version: i64,
        max_tokens: usize,
    ) -> Result<Option<(Vec<u32>, Vec<u32>)>> {
        let task = Task::Generate {
            max_tokens,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
            top_logprobs: 0,
        };
        let prompt = Prompt::chat(probe.to_vec(), None);
        match engine.run_blocking(prompt, task, VersionChoice::Exactly(version)) {
            Ok(EngineEvent::Finished {
                generation,
                prompt_ids,
                ..
            }) => Ok(Some((prompt_ids, generation.ids))),
            Ok(_) => Ok(None),
            Err(e) => bail!("the guard's probe reply (v{version}): {e}"),
        }
    }

    /// Repeated token 4-grams in `candidate`'s greedy probe replies and in the base's.
    fn repetition(
        &self,
        engine: &Engine,
        refs: &[Reference],
        candidate: i64,
    ) -> Result<(f64, f64)> {
        let mut own = Vec::with_capacity(self.probes.len());
        for probe in &self.probes {
            if let Some((_, ids)) =
                self.probe_reply(engine, probe, candidate, self.limits.repetition_tokens)?
            {
                own.push(ids);
            }
        }
        let base: Vec<Vec<u32>> = refs.iter().map(|r| r.long_reply_ids.clone()).collect();
        Ok((
            repeated_ngram_share(&own, REPETITION_NGRAM),
            repeated_ngram_share(&base, REPETITION_NGRAM),
        ))
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
        let refs = self.references(engine)?;
        for r in &refs {
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
        let repetition = if self.limits.repetition_tokens > 0 {
            Some(self.repetition(engine, &refs, candidate)?)
        } else {
            None
        };

        let mut report = GuardReport {
            kl_base,
            kl_live,
            approved_delta,
            approved_answers: answers.len(),
            repetition,
            passed: false,
            reasons: Vec::new(),
            secs: started.elapsed().as_secs_f64(),
        };
        report.decide(&self.limits, live);
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_candidate_that_loops_is_refused_though_its_kl_is_small() {
        let limits = GateSection::default();
        let mut report = GuardReport {
            kl_base: 0.02,
            kl_live: 0.01,
            approved_delta: Some(-0.1),
            approved_answers: 4,
            // A candidate refused in docs/LEARNING.md: loops, tiny KL.
            repetition: Some((0.394, 0.114)),
            passed: true,
            reasons: Vec::new(),
            secs: 0.0,
        };
        report.decide(&limits, 3);
        assert!(!report.passed);
        assert_eq!(report.reasons.len(), 1, "{:?}", report.reasons);
        assert!(
            report.reasons[0].contains("39.4 %")
                && report.reasons[0].contains("11.4 %")
                && report.reasons[0].contains("gate.max_repetition_rise"),
            "{:?}",
            report.reasons
        );
        // Within the limit (and less repetitive than the base) it passes.
        for own in [0.3, 0.05] {
            report.repetition = Some((own, 0.12));
            report.decide(&limits, 3);
            assert!(report.passed, "{:?}", report.reasons);
        }
        // Off: nothing measured, nothing refused; other limits still apply.
        report.repetition = None;
        report.kl_base = 0.6;
        report.decide(&limits, 3);
        assert!(!report.passed && report.reasons[0].contains("gate.max_kl_base"));
    }

    #[test]
    fn repeated_ngrams_are_counted_within_each_sequence_only() {
        assert_eq!(repeated_ngram_share::<u32>(&[], 4), 0.0);
        assert_eq!(repeated_ngram_share(&[vec![1, 2, 3, 4, 5, 6]], 4), 0.0);
        // 1 2 3 4 1 2 3 4: five 4-grams, the last one repeats the first.
        assert_eq!(
            repeated_ngram_share(&[vec![1, 2, 3, 4, 1, 2, 3, 4]], 4),
            0.2
        );
        // A loop of one token: every 4-gram after the first repeats it.
        assert_eq!(repeated_ngram_share(&[vec![7; 11]], 4), 7.0 / 8.0);
        // The same text in two replies is not a repetition.
        let twice = [vec![1, 2, 3, 4], vec![1, 2, 3, 4]];
        assert_eq!(repeated_ngram_share(&twice, 4), 0.0);
    }

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
