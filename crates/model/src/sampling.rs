//! Token sampling: greedy, temperature, top-k, top-p, seeded for reproducibility.
//!
//! Every sampled token comes with its log-probability under the *untempered* distribution
//! (temperature 1, no truncation): the quantity the trainer and the teacher recompute.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 1.0 = off.
    pub top_p: f32,
    /// 0 = off.
    pub top_k: usize,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_p: 0.95,
            top_k: 0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }
    }
}

pub(crate) struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// log Σ exp(x), stable.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = super::kernels::sum_exp_minus(super::kernels::Isa::selected(), logits, max);
    max + sum.ln() as f32
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    /// Picks the next token; returns it with its untempered log-probability.
    pub fn sample(&mut self, logits: &[f32]) -> (u32, f32) {
        let lse = log_sum_exp(logits);
        let id = if self.params.temperature <= 0.0 {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        (id as u32, logits[id] - lse)
    }

    fn draw(&mut self, logits: &[f32]) -> usize {
        let t = self.params.temperature;
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        let k = self.params.top_k;
        if k > 0 && k < idx.len() {
            idx.select_nth_unstable_by(k - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
            idx.truncate(k);
        }
        idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let max = logits[idx[0]];
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (((logits[i] - max) / t) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        if self.params.top_p < 1.0 {
            // Smallest prefix (by probability) whose mass reaches top_p; always at least one token.
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (n, p) in probs.iter().enumerate() {
                acc += p / total;
                if acc >= self.params.top_p as f64 {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.random::<f64>() * total;
        for (n, p) in probs.iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return idx[n];
            }
        }
        idx[probs.len() - 1]
    }
}

/// The `k` most likely tokens with their (untempered) log-probabilities, best first.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let lse = log_sum_exp(logits);
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(k - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
    idx.truncate(k);
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    idx.into_iter()
        .map(|i| (i as u32, logits[i] - lse))
        .collect()
}

pub(crate) fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 { (i, x) } else { best }
        })
        .0
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOGITS: [f32; 5] = [2.0, 1.0, 0.5, -1.0, 3.0];

    #[test]
    fn greedy_takes_the_argmax_with_its_untempered_logprob() {
        let mut s = Sampler::new(SamplingParams::greedy());
        let (id, lp) = s.sample(&LOGITS);
        assert_eq!(id, 4);
        assert!((lp - (3.0 - log_sum_exp(&LOGITS))).abs() < 1e-6);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_reduce_to_greedy() {
        for params in [
            SamplingParams {
                temperature: 1.0,
                top_p: 1.0,
                top_k: 1,
                seed: Some(1),
            },
            SamplingParams {
                temperature: 1.0,
                top_p: 0.01,
                top_k: 0,
                seed: Some(1),
            },
        ] {
            let mut s = Sampler::new(params);
            for _ in 0..50 {
                assert_eq!(s.sample(&LOGITS).0, 4, "{params:?}");
            }
        }
    }

    #[test]
    fn top_k_never_leaves_the_k_best() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 2.0,
            top_p: 1.0,
            top_k: 2,
            seed: Some(3),
        });
        let seen: std::collections::BTreeSet<u32> = (0..400).map(|_| s.sample(&LOGITS).0).collect();
        assert_eq!(seen, [0u32, 4].into_iter().collect());
    }

    #[test]
    fn sampling_frequencies_follow_the_tempered_softmax() {
        let t = 0.8f32;
        let mut s = Sampler::new(SamplingParams {
            temperature: t,
            top_p: 1.0,
            top_k: 0,
            seed: Some(42),
        });
        let n = 20_000;
        let mut counts = [0usize; 5];
        for _ in 0..n {
            counts[s.sample(&LOGITS).0 as usize] += 1;
        }
        let z: f64 = LOGITS.iter().map(|&l| ((l / t) as f64).exp()).sum();
        for (i, &c) in counts.iter().enumerate() {
            let p = ((LOGITS[i] / t) as f64).exp() / z;
            let freq = c as f64 / n as f64;
            // 5 standard deviations of a binomial proportion.
            let tol = 5.0 * (p * (1.0 - p) / n as f64).sqrt() + 1e-3;
            assert!(
                (freq - p).abs() < tol,
                "token {i}: frequency {freq:.4}, expected {p:.4}"
            );
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_draws() {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            top_k: 0,
            seed: Some(9),
        };
        let draw = || {
            let mut s = Sampler::new(params);
            (0..64).map(|_| s.sample(&LOGITS).0).collect::<Vec<_>>()
        };
        assert_eq!(draw(), draw());
    }
}
