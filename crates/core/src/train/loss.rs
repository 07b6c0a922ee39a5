//! The losses of PIPELINE.md §4, per response token, averaged over a sample's tokens.
//!
//! - Binary RL: A_t = r (the turn's ±1 reward) on every token.
//! - OPD: A_t = teacher_logp_t − logp_old_t (how much more the hinted teacher likes the token).
//! - Combined: A_t = w_opd·(teacher_logp_t − logp_old_t) + w_rl·r; a sample with only one
//!   signal gets exactly that term (the other is 0, not a noisy difference).
//! - PPO clipped surrogate: max(−ρ_t·A_t, −clip(ρ_t, 1−ε_low, 1+ε_high)·A_t), ρ_t =
//!   exp(logp_new_t − logp_old_t), logp_old the log-probs recorded when the turn was sampled.
//! - Rewards of a batch whose mean is negative get that mean subtracted ([`balanced_rewards`]).
//! - An update's step is sized by the weight of the signals it carries ([`LossConfig::step_scale`]).
//! - Optional k3 KL penalty to the base model: exp(−Δ) − 1 + Δ, Δ = logp_new − logp_base,
//!   clamped to ±10.
//! - Top-K distillation (PIPELINE.md §4b, [`TopK`]): the OPD term over the K tokens the
//!   sampling policy found likeliest at each position, not the sampled token alone, so a hint
//!   can raise a token the reply did not contain (the end of the turn after a short answer).
//! - Optional unlikelihood of repeats (Welleck et al. 2019, token level, [`Repeats`]):
//!   −log(1 − p(c)) for each token c that would repeat an earlier token trigram of the reply.

use burn::tensor::{Int, Tensor, TensorData};
use clawrl_model::sampling::log_sum_exp;
use clawrl_model::scoring::gather;

pub use crate::config::{Method, OpdForm, TopkWeights};

#[derive(Debug, Clone, PartialEq)]
pub struct LossConfig {
    pub method: Method,
    pub clip_low: f64,
    pub clip_high: f64,
    pub w_rl: f64,
    pub w_opd: f64,
    /// Rewards through [`balanced_rewards`] (PIPELINE.md: A = r as given).
    pub balance_rewards: bool,
    /// Steps sized by [`LossConfig::step_scale`] (PIPELINE.md: every step at the learning rate).
    pub signal_sized_steps: bool,
    pub kl_coef: f64,
    /// The top-K term's clip on ℓ_teacher − ℓ_old per token (`None`: unclipped).
    pub opd_clip: Option<f64>,
    pub topk_weights: TopkWeights,
    /// Weight of the unlikelihood of repeats ([`LossConfig::repeat_unlikelihood`]; 0: off).
    pub unlikelihood: f64,
}

/// The rewards of an update's samples as its RL term uses them. Replies rated down alone give
/// Binary RL nothing to move toward: pushing their tokens down spreads probability over
/// everything else, and on a small model that ends in loops or nonsense within a few updates
/// (docs/LEARNING.md: a preference the model never satisfies, every update rated down). So when
/// a batch's mean reward is negative it is subtracted, as a baseline: the replies rated down
/// then push down only as much as those rated up push up, and a batch with none rated up
/// leaves the term at 0 (its hints still count). A batch whose mean is ≥ 0 keeps PIPELINE.md's
/// A = r.
pub(crate) fn balanced_rewards(rewards: &[Option<f32>]) -> Vec<Option<f32>> {
    let given: Vec<f32> = rewards.iter().flatten().copied().collect();
    let mean = given.iter().sum::<f32>() / given.len().max(1) as f32;
    let baseline = mean.min(0.0);
    rewards.iter().map(|r| r.map(|r| r - baseline)).collect()
}

/// PIPELINE.md's loss as written (the shipped configuration differs in several of these:
/// config/default.toml, `LossConfig::from_config`).
impl Default for LossConfig {
    fn default() -> Self {
        Self {
            method: Method::Combined,
            clip_low: 0.2,
            clip_high: 0.28,
            w_rl: 1.0,
            w_opd: 1.0,
            balance_rewards: false,
            signal_sized_steps: false,
            kl_coef: 0.0,
            opd_clip: Some(2.0),
            topk_weights: TopkWeights::Student,
            unlikelihood: 0.0,
        }
    }
}

/// The learning signals of one sample (a turn).
#[derive(Debug, Clone, PartialEq)]
pub struct Signals {
    /// The sampled tokens' log-probs when they were sampled (the behaviour policy).
    pub logp_old: Vec<f32>,
    /// ±1 from a rating or the judge.
    pub reward: Option<f32>,
    /// The teacher's log-probs of the same tokens (a hint was extracted).
    pub teacher_logp: Option<Vec<f32>>,
    /// The distillation target over the top-K tokens; when set, the OPD term uses it instead
    /// of `teacher_logp`.
    pub topk: Option<TopK>,
}

impl Signals {
    /// The signals of the response positions `rows` (the loss computed a part at a time).
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Signals {
        Signals {
            logp_old: self.logp_old[rows.clone()].to_vec(),
            reward: self.reward,
            teacher_logp: self.teacher_logp.as_ref().map(|t| t[rows.clone()].to_vec()),
            topk: self.topk.as_ref().map(|t| {
                let cells = rows.start * t.k..rows.end * t.k;
                TopK {
                    k: t.k,
                    ids: t.ids[cells.clone()].to_vec(),
                    old: t.old[cells.clone()].to_vec(),
                    teacher: t.teacher[cells].to_vec(),
                }
            }),
        }
    }
}

/// A sample's top-K distillation target (PIPELINE.md §4b), row-major `[n, k]`, all detached:
/// S_t, the K likeliest tokens at each response position of the policy the update starts from
/// (the one that sampled the reply, or a version at most `train.max_staleness` newer), with
/// their log-probs under it and under the hinted teacher.
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    pub k: usize,
    pub ids: Vec<u32>,
    /// ℓ_old(v): that policy's log-prob of each id.
    pub old: Vec<f32>,
    /// ℓ_teacher(v): the hinted teacher's log-prob of each id.
    pub teacher: Vec<f32>,
}

impl TopK {
    /// The K likeliest ids of each row of log-distributions `[n, vocab]` (flattened) with
    /// their log-probs, likeliest first.
    pub fn select(dist: &[f32], vocab: usize, k: usize) -> (Vec<u32>, Vec<f32>) {
        let k = k.min(vocab);
        let mut ids = Vec::with_capacity(dist.len() / vocab.max(1) * k);
        let mut lps = Vec::with_capacity(ids.capacity());
        let mut order: Vec<u32> = Vec::with_capacity(vocab);
        for row in dist.chunks_exact(vocab) {
            order.clear();
            order.extend(0..vocab as u32);
            let by_prob = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]);
            if k < vocab {
                order.select_nth_unstable_by(k, by_prob);
            }
            order.truncate(k);
            order.sort_unstable_by(by_prob);
            ids.extend_from_slice(&order);
            lps.extend(order.iter().map(|&v| row[v as usize]));
        }
        (ids, lps)
    }

    /// [`TopK::select`] with `always` in every row too: each row holds the K likeliest ids and
    /// then `always`' ids that are not among them, filled up with the next likeliest, so every
    /// row has K + (distinct ids of `always` in the vocabulary) distinct ids and its first K
    /// are [`TopK::select`]'s. The end-of-turn token is rarely in a student's top-K in the
    /// middle of a reply, so without it a hint that says "shorter" has nothing to raise where
    /// the reply could end.
    pub fn select_with(
        dist: &[f32],
        vocab: usize,
        k: usize,
        always: &[u32],
    ) -> (Vec<u32>, Vec<f32>) {
        let k = k.min(vocab);
        let mut extra: Vec<u32> = Vec::with_capacity(always.len());
        for &v in always {
            if (v as usize) < vocab && !extra.contains(&v) {
                extra.push(v);
            }
        }
        let width = (k + extra.len()).min(vocab);
        let (wide, _) = Self::select(dist, vocab, width);
        let mut ids = Vec::with_capacity(wide.len());
        for row_ids in wide.chunks_exact(width) {
            let start = ids.len();
            ids.extend_from_slice(&row_ids[..k]);
            // Each of `extra` already among the K leaves room for the next likeliest id.
            let missing = extra.iter().filter(|v| !row_ids[..k].contains(v));
            ids.extend(missing);
            let fill = row_ids[k..].iter().filter(|v| !extra.contains(v));
            ids.extend(fill.take(width - (ids.len() - start)));
            debug_assert_eq!(ids.len() - start, width);
        }
        let lps = Self::gather(dist, vocab, &ids, width);
        (ids, lps)
    }

    /// The log-probs of each row's `ids` (`[n, k]`) in log-distributions `[n, vocab]`.
    pub fn gather(dist: &[f32], vocab: usize, ids: &[u32], k: usize) -> Vec<f32> {
        ids.chunks_exact(k)
            .zip(dist.chunks_exact(vocab))
            .flat_map(|(row_ids, row)| row_ids.iter().map(|&v| row[v as usize]))
            .collect()
    }

    /// |S^q_t ∩ S^p_t| summed over the positions: how much of the student's top-K a teacher's
    /// top-K keeps (the published `sequence_optimal` selection signal).
    pub fn overlap(student: &[u32], teacher: &[u32], k: usize) -> usize {
        student
            .chunks_exact(k)
            .zip(teacher.chunks_exact(k))
            .map(|(s, t)| s.iter().filter(|v| t.contains(v)).count())
            .sum()
    }
}

/// For each position of a reply, the tokens that would repeat a token trigram already in the
/// reply before it: every token that followed an earlier occurrence of the two tokens just
/// before the position. A small model's loops ("1. Read more books.\n2. Read more books.") copy
/// a span it already wrote, token after token; these are the tokens that copy.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Repeats {
    /// Per position, the repeating tokens (distinct; may include the sampled one).
    pub rows: Vec<Vec<u32>>,
}

impl Repeats {
    /// Tokens of context a repeat must share (a token trigram: two before, one copied).
    const CONTEXT: usize = 2;

    pub fn in_reply(response: &[u32]) -> Self {
        let c = Self::CONTEXT;
        let rows = (0..response.len())
            .map(|t| {
                let mut row: Vec<u32> = Vec::new();
                if t >= c {
                    let context = &response[t - c..t];
                    // Earlier trigrams, start j: response[j..j + c] then response[j + c], j + c < t.
                    for j in 0..t - c {
                        let next = response[j + c];
                        if &response[j..j + c] == context && !row.contains(&next) {
                            row.push(next);
                        }
                    }
                }
                row
            })
            .collect();
        Self { rows }
    }

    /// The rows of the response positions `rows`.
    pub fn rows(&self, rows: std::ops::Range<usize>) -> &[Vec<u32>] {
        &self.rows[rows]
    }
}

impl LossConfig {
    /// The loss as `[train]` configures it (the trainer's, and what `bench --train` times).
    pub fn from_config(t: &crate::config::TrainSection) -> Self {
        Self {
            method: t.method,
            clip_low: t.clip_low,
            clip_high: t.clip_high,
            w_rl: t.w_rl,
            w_opd: t.w_opd,
            balance_rewards: t.balance_rewards,
            signal_sized_steps: t.signal_sized_steps,
            kl_coef: t.kl_coef,
            opd_clip: (t.opd_clip > 0.0).then_some(t.opd_clip),
            topk_weights: t.topk_weights,
            unlikelihood: t.unlikelihood,
        }
    }

    /// The unlikelihood of repeats over log-distributions `[n, vocab]` (with gradients) of the
    /// positions whose [`Repeats`] rows are `repeats`: `unlikelihood` · the mean over the
    /// positions of Σ_c −log(1 − p(c)). Its gradient on a repeating token's logit is at most
    /// its probability, so a loop the model is sure of gets the strongest push and none is
    /// unbounded. `None` when off or no position has a repeat.
    pub fn repeat_unlikelihood(
        &self,
        log_dist: Tensor<2>,
        repeats: &[Vec<u32>],
    ) -> Option<Tensor<1>> {
        let width = repeats.iter().map(Vec::len).max().unwrap_or(0);
        if self.unlikelihood <= 0.0 || width == 0 {
            return None;
        }
        let n = repeats.len();
        let (mut ids, mut mask) = (Vec::with_capacity(n * width), Vec::with_capacity(n * width));
        for row in repeats {
            for j in 0..width {
                ids.push(row.get(j).map_or(0, |&v| v as i64));
                mask.push(if j < row.len() { 1.0f32 } else { 0.0 });
            }
        }
        let device = log_dist.device();
        let idx = Tensor::<2, Int>::from_data(TensorData::new(ids, [n, width]), &device);
        let mask = Tensor::<2>::from_data(TensorData::new(mask, [n, width]), &device);
        // 1 − p floored so that a token at p ≈ 1 in f32 gives no infinite log.
        let rest = log_dist
            .gather(1, idx)
            .exp()
            .neg()
            .add_scalar(1.0)
            .clamp_min(1e-4);
        let per_position = (rest.log().neg() * mask).sum_dim(1).reshape([n]);
        Some(per_position.mean().mul_scalar(self.unlikelihood))
    }

    /// Whether a sample gives the method anything to move toward: a non-zero reward (as the
    /// RL term uses it) or a hint.
    pub fn moves(&self, reward: Option<f32>, hint: bool) -> bool {
        let (rl, opd) = self.terms(reward, hint);
        rl || opd
    }

    /// Which of the method's terms a sample has: (a non-zero reward for the RL term, a hint
    /// for the OPD term).
    fn terms(&self, reward: Option<f32>, hint: bool) -> (bool, bool) {
        let rl = reward.is_some_and(|r| r != 0.0) && self.method != Method::Opd;
        let opd = hint && self.method != Method::Rl;
        (rl, opd)
    }

    /// How far an update's optimizer step goes, as a share of the learning rate: the mean over
    /// its samples of the weight of the largest term each one has (`reward`: as the RL term
    /// uses it; `hint`: a teacher's log-probs were computed), against the method's largest
    /// weight. Adam divides each gradient by its own running size, so a loss scaled down by
    /// `w_opd` still steps about `lr`: without this an update of hints alone (every reply
    /// rated down, rewards balanced to 0) moves the weights as far as one of rewards, and a
    /// weak hint signal drifted the model (docs/LEARNING.md). 1 when the sizing is off, and for
    /// every update with a reward on each sample.
    pub(crate) fn step_scale(&self, samples: &[(Option<f32>, bool)]) -> f64 {
        if !self.signal_sized_steps || samples.is_empty() {
            return 1.0;
        }
        let w = |on: bool, w: f64| if on { w.abs() } else { 0.0 };
        let w_rl = w(self.method != Method::Opd, self.w_rl);
        let w_opd = w(self.method != Method::Rl, self.w_opd);
        let top = w_rl.max(w_opd);
        if top == 0.0 {
            return 1.0;
        }
        let weight = |&(reward, hint): &(Option<f32>, bool)| {
            let (rl, opd) = self.terms(reward, hint);
            w(rl, w_rl).max(w(opd, w_opd)) / top
        };
        samples.iter().map(weight).sum::<f64>() / samples.len() as f64
    }

    /// The rewards of an update's samples as the RL term uses them.
    pub fn rewards(&self, rewards: &[Option<f32>]) -> Vec<Option<f32>> {
        if self.balance_rewards {
            balanced_rewards(rewards)
        } else {
            rewards.to_vec()
        }
    }

    /// Per-token advantages of a sample under this method.
    pub(crate) fn advantages(&self, s: &Signals) -> Vec<f32> {
        let n = s.logp_old.len();
        let rl = match (s.reward, self.method) {
            (Some(r), Method::Rl | Method::Combined) => (self.w_rl * r as f64) as f32,
            _ => 0.0,
        };
        let mut adv = vec![rl; n];
        if let (Some(teacher), Method::Opd | Method::Combined) = (&s.teacher_logp, self.method) {
            for (a, (t, old)) in adv.iter_mut().zip(teacher.iter().zip(&s.logp_old)) {
                *a += (self.w_opd * (t - old) as f64) as f32;
            }
        }
        adv
    }

    /// The clipped surrogate per token `[n]` (not yet averaged).
    pub(crate) fn surrogate(
        &self,
        logp_new: Tensor<1>,
        logp_old: &[f32],
        adv: &[f32],
    ) -> Tensor<1> {
        let device = logp_new.device();
        let vec =
            |v: &[f32]| Tensor::<1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &device);
        let ratio = (logp_new - vec(logp_old)).exp();
        let adv = vec(adv);
        let clipped = ratio
            .clone()
            .clamp(1.0 - self.clip_low, 1.0 + self.clip_high);
        let unclipped_loss = ratio.neg() * adv.clone();
        let clipped_loss = clipped.neg() * adv;
        unclipped_loss.max_pair(clipped_loss)
    }

    /// The sample's loss from the response positions' log-distributions `[n, vocab]` (with
    /// gradients): the top-K form when the sample has a [`TopK`] target and the method
    /// distils, else [`LossConfig::sample_loss`] on the sampled tokens.
    pub fn distribution_loss(
        &self,
        log_dist: Tensor<2>,
        response: &[u32],
        signals: &Signals,
        logp_base: Option<&[f32]>,
    ) -> Tensor<1> {
        match &signals.topk {
            Some(topk) if self.method != Method::Rl => {
                self.topk_loss(log_dist, response, signals, topk, logp_base)
            }
            _ => self.sample_loss(gather(log_dist, response), signals, logp_base),
        }
    }

    /// The top-K form (PIPELINE.md §4b). Per position t the columns are S_t and then the
    /// sampled token y_t; column v's advantage is
    /// A_v = w_opd·clip(ℓ_teacher(v) − ℓ_old(v), ±opd_clip)·w_v, w_v = softmax over S_t of
    /// ℓ_old (or its mean with the softmax of ℓ_teacher: [`TopkWeights::Mixture`]), plus the
    /// RL term w_rl·r on the column holding y_t (S_t's own when y_t is in it, else the last,
    /// whose ℓ_old is the recorded one). The clipped surrogate of each column is
    /// summed over the columns and averaged over the positions: with K = 1 and S_t = {y_t} this
    /// is [`LossConfig::sample_loss`] exactly (inside the clip).
    fn topk_loss(
        &self,
        log_dist: Tensor<2>,
        response: &[u32],
        s: &Signals,
        topk: &TopK,
        logp_base: Option<&[f32]>,
    ) -> Tensor<1> {
        let (n, k) = (response.len(), topk.k);
        let cols = k + 1;
        let rl = match (s.reward, self.method) {
            (Some(r), Method::Combined) => (self.w_rl * r as f64) as f32,
            _ => 0.0,
        };
        let clip = |d: f32| match self.opd_clip {
            Some(c) => d.clamp(-c as f32, c as f32),
            None => d,
        };
        let (mut ids, mut old, mut adv) = (
            Vec::with_capacity(n * cols),
            Vec::with_capacity(n * cols),
            Vec::with_capacity(n * cols),
        );
        for t in 0..n {
            let row = t * k..(t + 1) * k;
            let (row_ids, row_old, row_teacher) = (
                &topk.ids[row.clone()],
                &topk.old[row.clone()],
                &topk.teacher[row],
            );
            let student = softmax(row_old);
            let weights: Vec<f32> = match self.topk_weights {
                TopkWeights::Student => student,
                TopkWeights::Mixture => student
                    .iter()
                    .zip(softmax(row_teacher))
                    .map(|(s, t)| 0.5 * (s + t))
                    .collect(),
            };
            let mut sampled_in_set = false;
            for j in 0..k {
                let w = weights[j];
                let mut a = (self.w_opd * (clip(row_teacher[j] - row_old[j]) * w) as f64) as f32;
                if row_ids[j] == response[t] {
                    a += rl;
                    sampled_in_set = true;
                }
                ids.push(row_ids[j] as i64);
                old.push(row_old[j]);
                adv.push(a);
            }
            ids.push(response[t] as i64);
            old.push(s.logp_old[t]);
            adv.push(if sampled_in_set { 0.0 } else { rl });
        }
        let device = log_dist.device();
        let idx = Tensor::<2, Int>::from_data(TensorData::new(ids, [n, cols]), &device);
        let lp = log_dist.gather(1, idx);
        let ratio =
            (lp.clone() - Tensor::<2>::from_data(TensorData::new(old, [n, cols]), &device)).exp();
        let adv = Tensor::<2>::from_data(TensorData::new(adv, [n, cols]), &device);
        let clipped = ratio
            .clone()
            .clamp(1.0 - self.clip_low, 1.0 + self.clip_high);
        let surrogate = (ratio.neg() * adv.clone()).max_pair(clipped.neg() * adv);
        let mut per_token = surrogate.sum_dim(1).reshape([n]);
        if let (Some(base), true) = (logp_base, self.kl_coef > 0.0) {
            let sampled = lp.slice([0..n, k..cols]).reshape([n]);
            per_token = per_token + k3(sampled, base).mul_scalar(self.kl_coef);
        }
        per_token.mean()
    }

    /// The sample's loss (a scalar `[1]`): mean over its tokens of the surrogate, plus the k3
    /// penalty when `logp_base` is given and `kl_coef` > 0.
    pub fn sample_loss(
        &self,
        logp_new: Tensor<1>,
        signals: &Signals,
        logp_base: Option<&[f32]>,
    ) -> Tensor<1> {
        let adv = self.advantages(signals);
        let mut per_token = self.surrogate(logp_new.clone(), &signals.logp_old, &adv);
        if let (Some(base), true) = (logp_base, self.kl_coef > 0.0) {
            per_token = per_token + k3(logp_new, base).mul_scalar(self.kl_coef);
        }
        per_token.mean()
    }
}

/// exp(l) / Σ exp(l) over a row of log-probs.
fn softmax(row: &[f32]) -> Vec<f32> {
    let lse = log_sum_exp(row);
    row.iter().map(|l| (l - lse).exp()).collect()
}

/// The k3 estimator of KL(new ‖ base) per token: exp(−Δ) − 1 + Δ with Δ = logp_new −
/// logp_base clamped to ±10 (non-negative, unbiased for samples of the new policy).
pub(crate) fn k3(logp_new: Tensor<1>, logp_base: &[f32]) -> Tensor<1> {
    let device = logp_new.device();
    let base = Tensor::<1>::from_data(
        TensorData::new(logp_base.to_vec(), [logp_base.len()]),
        &device,
    );
    let delta = (logp_new - base).clamp(-10.0, 10.0);
    delta.clone().neg().exp().sub_scalar(1.0) + delta
}

/// How far the updated policy drifted from the behaviour policy on a sample's tokens:
/// mean of ρ − 1 − log ρ (the k3 estimator of KL(old ‖ new) on tokens drawn from old).
pub(crate) fn policy_drift(logp_new: &[f32], logp_old: &[f32]) -> f64 {
    if logp_new.is_empty() {
        return 0.0;
    }
    let sum: f64 = logp_new
        .iter()
        .zip(logp_old)
        .map(|(&n, &o)| {
            let d = (n - o).clamp(-10.0, 10.0) as f64;
            d.exp() - 1.0 - d
        })
        .sum();
    sum / logp_new.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    /// d(loss)/d(logp_new) of the clipped surrogate for one token at `ratio` with advantage `a`.
    fn gradient(ratio: f32, a: f32) -> f32 {
        let device = Device::flex().autodiff();
        let new =
            Tensor::<1>::from_data(TensorData::new(vec![0.0f32], [1]), &device).require_grad();
        let old = -ratio.ln();
        let loss = LossConfig::default()
            .surrogate(new.clone(), &[old], &[a])
            .sum();
        let grads = loss.backward();
        new.grad(&grads).unwrap().into_scalar::<f32>()
    }

    #[test]
    fn clipping_engages_only_outside_0_8_to_1_28_in_the_advantages_direction() {
        // Inside the trust region the gradient is -ratio·A.
        for (r, a) in [
            (1.1, 1.0),
            (0.9, -1.0),
            (1.27, 1.0),
            (0.81, -1.0),
            (1.0, 0.5),
        ] {
            let g = gradient(r, a);
            assert!((g + r * a).abs() < 1e-5, "ratio {r}, A {a}: gradient {g}");
        }
        // Past the bound in the direction the advantage pushes: no gradient.
        for (r, a) in [(1.29, 1.0), (1.5, 1.0), (0.79, -1.0), (0.5, -1.0)] {
            assert_eq!(gradient(r, a), 0.0, "ratio {r}, A {a} is clipped");
        }
        // Past the bound against the advantage: the unclipped term still pulls back.
        for (r, a) in [(1.5, -1.0), (0.5, 1.0)] {
            let g = gradient(r, a);
            assert!((g + r * a).abs() < 1e-5, "ratio {r}, A {a}: gradient {g}");
        }
    }

    fn signals(n: usize, reward: Option<f32>, teacher: Option<Vec<f32>>) -> Signals {
        Signals {
            logp_old: (0..n).map(|i| -0.5 - 0.1 * i as f32).collect(),
            reward,
            teacher_logp: teacher,
            topk: None,
        }
    }

    #[test]
    fn rewards_push_down_no_more_than_up() {
        // Mostly rated up (the usual case): as specified, A = r.
        let up = [Some(1.0), Some(1.0), Some(-1.0), None];
        assert_eq!(balanced_rewards(&up), up.to_vec());
        // Mostly rated down: the mean (-0.5) is subtracted, so the terms sum to 0.
        let down = balanced_rewards(&[Some(-1.0), Some(1.0), None, Some(-1.0), Some(-1.0)]);
        assert_eq!(down, [Some(-0.5), Some(1.5), None, Some(-0.5), Some(-0.5)]);
        assert_eq!(down.iter().flatten().sum::<f32>(), 0.0);
        // All rated down: nothing to move toward, the RL term is 0 (a hint may still teach).
        assert_eq!(
            balanced_rewards(&[Some(-1.0), Some(-1.0)]),
            [Some(0.0), Some(0.0)]
        );
        assert_eq!(balanced_rewards(&[None, None]), [None, None]);
    }

    #[test]
    fn an_update_of_hints_alone_steps_by_the_hints_weight() {
        let cfg = LossConfig {
            w_opd: 0.25,
            signal_sized_steps: true,
            ..LossConfig::default()
        };
        // A reward on every sample (a hint beside it or not): the full step.
        assert_eq!(
            cfg.step_scale(&[(Some(1.0), true), (Some(-0.5), false)]),
            1.0
        );
        // Every reply rated down, balanced to 0: only the hints teach, at their weight.
        assert_eq!(
            cfg.step_scale(&[(Some(0.0), true), (Some(0.0), true)]),
            0.25
        );
        // Half and half: the mean.
        assert_eq!(cfg.step_scale(&[(Some(1.0), false), (None, true)]), 0.625);
        // A method with one signal: its weight is the whole step, whatever w_opd says.
        let opd = LossConfig {
            method: Method::Opd,
            ..cfg.clone()
        };
        assert_eq!(opd.step_scale(&[(Some(1.0), true), (None, true)]), 1.0);
        let rl = LossConfig {
            method: Method::Rl,
            ..cfg.clone()
        };
        assert_eq!(
            rl.step_scale(&[(Some(1.0), true), (Some(-1.0), false)]),
            1.0
        );
        // Off (PIPELINE.md): every step at the learning rate.
        let off = LossConfig {
            signal_sized_steps: false,
            ..cfg
        };
        assert_eq!(off.step_scale(&[(Some(0.0), true)]), 1.0);
    }

    #[test]
    fn a_sample_with_only_a_reward_has_no_opd_term_and_only_a_hint_no_rl_term() {
        let cfg = LossConfig::default();
        assert_eq!(cfg.advantages(&signals(3, Some(-1.0), None)), vec![-1.0; 3]);
        let teacher = vec![-0.2, -0.9, -0.4];
        let s = signals(3, None, Some(teacher.clone()));
        let want: Vec<f32> = teacher
            .iter()
            .zip(&s.logp_old)
            .map(|(t, o)| t - o)
            .collect();
        assert_eq!(cfg.advantages(&s), want);
        // A method ignores the signal it does not use, exactly.
        let rl = LossConfig {
            method: Method::Rl,
            ..cfg.clone()
        };
        let both = signals(3, Some(1.0), Some(teacher));
        assert_eq!(rl.advantages(&both), vec![1.0; 3]);
        assert!(
            !rl.moves(None, true),
            "RL has nothing to learn from a hint alone"
        );
        assert!(
            !rl.moves(Some(0.0), true),
            "nor from a reward balanced to 0"
        );
        assert!(rl.moves(Some(-0.5), false) && cfg.moves(Some(0.0), true));
        let opd = LossConfig {
            method: Method::Opd,
            ..cfg
        };
        assert_eq!(opd.advantages(&both), want);
        assert!(!opd.moves(Some(1.0), false));
    }

    #[test]
    fn inside_the_trust_region_the_combined_loss_is_the_sum_of_its_parts() {
        let device = Device::flex();
        let teacher = vec![-0.1, -1.5, -0.3, -0.6];
        let both = signals(4, Some(1.0), Some(teacher.clone()));
        // New log-probs within ratio 0.8..1.28 of the old ones.
        let new: Vec<f32> = both
            .logp_old
            .iter()
            .enumerate()
            .map(|(i, o)| o + 0.05 * (i as f32 - 1.5))
            .collect();
        let loss = |cfg: &LossConfig, s: &Signals| {
            let t = Tensor::<1>::from_data(TensorData::new(new.clone(), [4]), &device);
            cfg.sample_loss(t, s, None).into_scalar::<f32>()
        };
        let cfg = LossConfig::default();
        let combined = loss(&cfg, &both);
        let rl = loss(&cfg, &signals(4, Some(1.0), None));
        let opd = loss(&cfg, &signals(4, None, Some(teacher)));
        assert!(
            (combined - (rl + opd)).abs() < 1e-6,
            "{combined} vs {rl} + {opd}"
        );
        assert!(rl != 0.0 && opd != 0.0);
    }

    /// Log-distributions `[n, v]` from fixed pseudo-random logits, and the logits tensor
    /// (with gradients when `device` is autodiff).
    fn log_dist(n: usize, v: usize, device: &Device) -> (Tensor<2>, Vec<f32>) {
        let logits: Vec<f32> = (0..n * v)
            .map(|i| ((i * 7919 % 97) as f32 / 97.0 - 0.5) * 4.0)
            .collect();
        let t = Tensor::<2>::from_data(TensorData::new(logits.clone(), [n, v]), device);
        (t, logits)
    }

    fn host_log_softmax(logits: &[f32], v: usize) -> Vec<f32> {
        logits
            .chunks_exact(v)
            .flat_map(|row| {
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let z = row.iter().map(|x| (x - m).exp()).sum::<f32>().ln() + m;
                row.iter().map(move |x| x - z).collect::<Vec<_>>()
            })
            .collect()
    }

    /// d`loss`/d`logits`, on the host.
    fn grad_at(logits: &Tensor<2>, loss: Tensor<1>) -> Vec<f32> {
        let grads = loss.backward();
        logits
            .grad(&grads)
            .unwrap()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap()
    }

    const RESPONSE: [u32; 4] = [3, 0, 7, 5];
    const VOCAB: usize = 9;

    /// A top-K target from the old distribution `old_dist` (`[n, VOCAB]`) with the teacher
    /// at `teacher_shift(t, v)` above the old log-prob.
    fn topk_target(old_dist: &[f32], k: usize, teacher_shift: impl Fn(usize, u32) -> f32) -> TopK {
        let (ids, old) = TopK::select(old_dist, VOCAB, k);
        let teacher = ids
            .iter()
            .zip(&old)
            .enumerate()
            .map(|(i, (&v, &o))| o + teacher_shift(i / k, v))
            .collect();
        TopK {
            k,
            ids,
            old,
            teacher,
        }
    }

    #[test]
    fn top_k_selection_gathering_and_overlap() {
        let dist = [
            -3.0, -0.5, -2.0, -1.0, /* row 2 */ -0.1, -4.0, -3.0, -2.5,
        ];
        let (ids, lps) = TopK::select(&dist, 4, 2);
        assert_eq!(ids, [1, 3, 0, 3]);
        assert_eq!(lps, [-0.5, -1.0, -0.1, -2.5]);
        assert_eq!(
            TopK::gather(&dist, 4, &[2, 0, 1, 2], 2),
            [-2.0, -3.0, -4.0, -3.0]
        );
        // Row 1 shares one of two, row 2 both.
        assert_eq!(TopK::overlap(&[1, 3, 0, 3], &[3, 2, 3, 0], 2), 3);
    }

    #[test]
    fn the_end_of_turn_joins_every_row_and_the_first_k_stay_the_top_k() {
        let dist = [
            -3.0, -0.5, -2.0, -1.0, -5.0, /* row 2 */ -0.1, -4.0, -3.0, -2.5, -6.0,
        ];
        // Token 4 outside the top-2 of both rows: appended.
        let (ids, lps) = TopK::select_with(&dist, 5, 2, &[4]);
        assert_eq!(ids, [1, 3, 4, 0, 3, 4]);
        assert_eq!(lps, [-0.5, -1.0, -5.0, -0.1, -2.5, -6.0]);
        // Token 3 is in both rows' top-2: the next likeliest fills its place. Repeated and
        // out-of-vocabulary ids are ignored.
        let (ids, _) = TopK::select_with(&dist, 5, 2, &[3, 3, 99]);
        assert_eq!(ids, [1, 3, 2, 0, 3, 2]);
        // Two ids, one inside row 1's top-2, neither inside row 2's.
        let (ids, _) = TopK::select_with(&dist, 5, 2, &[1, 4]);
        assert_eq!(ids, [1, 3, 4, 2, 0, 3, 1, 4]);
        assert_eq!(
            TopK::select_with(&dist, 5, 2, &[]),
            TopK::select(&dist, 5, 2)
        );
    }

    /// The end-of-turn token outside the student's top-K: with it in S_t, a teacher that
    /// wants the reply to end raises it; without it nothing does.
    #[test]
    fn a_teacher_that_ends_the_turn_raises_the_end_of_turn_only_when_it_is_in_s_t() {
        let device = Device::flex().autodiff();
        const END: u32 = 8;
        // The student gives END ~0.3 %, last of the nine; the teacher 60 %.
        let host: Vec<f32> = vec![2.0, 1.5, 1.0, 0.8, 0.5, 0.2, 0.0, -0.5, -3.0];
        let old = host_log_softmax(&host, VOCAB);
        let push_on = |always: &[u32]| {
            let (ids, lp_old) = TopK::select_with(&old, VOCAB, 4, always);
            let k = ids.len();
            let teacher = ids
                .iter()
                .zip(&lp_old)
                .map(|(&v, &o)| if v == END { 0.6f32.ln() } else { o - 1.0 })
                .collect();
            let signals = Signals {
                logp_old: vec![old[0]],
                reward: None,
                teacher_logp: None,
                topk: Some(TopK {
                    k,
                    ids,
                    old: lp_old,
                    teacher,
                }),
            };
            let cfg = LossConfig {
                method: Method::Opd,
                topk_weights: TopkWeights::Mixture,
                ..LossConfig::default()
            };
            let logits = Tensor::<2>::from_data(TensorData::new(host.clone(), [1, VOCAB]), &device)
                .require_grad();
            let dist = burn::tensor::activation::log_softmax(logits.clone(), 1);
            -grad_at(&logits, cfg.distribution_loss(dist, &[0], &signals, None))[END as usize]
        };
        let (without, with) = (push_on(&[]), push_on(&[END]));
        assert!(with > 0.0, "raised with the end of the turn in S_t: {with}");
        assert!(
            with > 20.0 * without.max(1e-6),
            "and barely without it: {with} vs {without}"
        );
    }

    #[test]
    fn k_1_on_the_sampled_token_is_the_sampled_token_loss_exactly() {
        let device = Device::flex();
        let (logits, _) = log_dist(RESPONSE.len(), VOCAB, &device);
        let dist = burn::tensor::activation::log_softmax(logits, 1);
        let now = clawrl_model::lora::values(&gather(dist.clone(), &RESPONSE).unsqueeze::<2>());
        // Ratios inside and outside the trust region, both signs of the advantage.
        let logp_old: Vec<f32> = now
            .iter()
            .zip([0.0, 0.5, -0.4, 0.1])
            .map(|(n, d)| n - d)
            .collect();
        let teacher: Vec<f32> = logp_old
            .iter()
            .zip([0.7, -1.2, 1.9, -0.3])
            .map(|(o, d)| o + d)
            .collect();
        for (method, reward) in [
            (Method::Combined, Some(1.0)),
            (Method::Combined, Some(-1.0)),
            (Method::Combined, None),
            (Method::Opd, Some(1.0)),
        ] {
            let cfg = LossConfig {
                method,
                w_opd: 0.25,
                ..LossConfig::default()
            };
            let sampled = Signals {
                logp_old: logp_old.clone(),
                reward,
                teacher_logp: Some(teacher.clone()),
                topk: None,
            };
            let topk = Signals {
                topk: Some(TopK {
                    k: 1,
                    ids: RESPONSE.to_vec(),
                    old: logp_old.clone(),
                    teacher: teacher.clone(),
                }),
                ..sampled.clone()
            };
            let a = cfg
                .distribution_loss(dist.clone(), &RESPONSE, &sampled, None)
                .into_scalar::<f32>();
            let b = cfg
                .distribution_loss(dist.clone(), &RESPONSE, &topk, None)
                .into_scalar::<f32>();
            assert!(
                a != 0.0 && (a - b).abs() < 1e-6,
                "{method:?} {reward:?}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn top_k_gradients_match_finite_differences() {
        let device = Device::flex().autodiff();
        let (n, k) = (RESPONSE.len(), 4);
        let (logits, host) = log_dist(n, VOCAB, &device);
        let logits = logits.require_grad();
        let now = host_log_softmax(&host, VOCAB);
        // Old slightly off the current policy (ratios inside the clip), a teacher that likes
        // some of the top tokens more and others less, one |difference| past the clip.
        let old_dist: Vec<f32> = now
            .iter()
            .enumerate()
            .map(|(i, l)| l - 0.03 * (i % 3) as f32)
            .collect();
        let target = topk_target(&old_dist, k, |t, v| match (t + v as usize) % 4 {
            0 => 0.8,
            1 => -0.6,
            2 => 3.5,
            _ => 0.1,
        });
        let signals = Signals {
            logp_old: RESPONSE
                .iter()
                .enumerate()
                .map(|(t, &y)| old_dist[t * VOCAB + y as usize])
                .collect(),
            reward: Some(1.0),
            teacher_logp: None,
            topk: Some(target),
        };
        for topk_weights in [TopkWeights::Student, TopkWeights::Mixture] {
            let cfg = LossConfig {
                topk_weights,
                ..LossConfig::default()
            };
            let loss_of = |logits: Vec<f32>| {
                let t =
                    Tensor::<2>::from_data(TensorData::new(logits, [n, VOCAB]), &Device::flex());
                let dist = burn::tensor::activation::log_softmax(t, 1);
                cfg.distribution_loss(dist, &RESPONSE, &signals, None)
                    .into_scalar::<f32>() as f64
            };
            let dist = burn::tensor::activation::log_softmax(logits.clone(), 1);
            let analytic = grad_at(
                &logits,
                cfg.distribution_loss(dist, &RESPONSE, &signals, None),
            );
            let h = 1e-2;
            let mut checked = 0;
            for i in 0..n * VOCAB {
                let mut up = host.clone();
                up[i] += h;
                let mut down = host.clone();
                down[i] -= h;
                let numeric = (loss_of(up) - loss_of(down)) / (2.0 * h as f64);
                let a = analytic[i] as f64;
                assert!(
                    (a - numeric).abs() <= 1e-3 + 0.02 * numeric.abs(),
                    "logit {i}: autodiff {a:.6} vs finite differences {numeric:.6}"
                );
                checked += (a.abs() > 1e-4) as usize;
            }
            assert!(checked > n * k, "most logits get a gradient ({checked})");
        }
    }

    /// The published weights barely move a token the student gives little probability, however
    /// much the hinted teacher wants it; the mixture moves it by about the teacher's share.
    #[test]
    fn mixture_weights_raise_a_token_the_teacher_wants_and_the_student_barely_considers() {
        let device = Device::flex().autodiff();
        // One position, the sampled token 0 at 0.6; token 4 (the end of the turn, say) at
        // about 0.015 for the student and 0.5 for the teacher.
        let host: Vec<f32> = vec![2.0, 1.0, 0.5, 0.0, -1.6, -0.5, -0.8, -1.0, -2.0];
        let old = host_log_softmax(&host, VOCAB);
        let k = 8;
        let target = topk_target(&old, k, |_, v| if v == 4 { 3.5 } else { -0.7 });
        assert!(
            target.ids.contains(&4),
            "token 4 is in S_t: {:?}",
            target.ids
        );
        let signals = Signals {
            logp_old: vec![old[0]],
            reward: None,
            teacher_logp: None,
            topk: Some(target),
        };
        let push_on = |topk_weights| {
            let cfg = LossConfig {
                method: Method::Opd,
                topk_weights,
                ..LossConfig::default()
            };
            let logits = Tensor::<2>::from_data(TensorData::new(host.clone(), [1, VOCAB]), &device)
                .require_grad();
            let dist = burn::tensor::activation::log_softmax(logits.clone(), 1);
            let g = grad_at(&logits, cfg.distribution_loss(dist, &[0], &signals, None));
            // Gradient descent raises a logit whose gradient is negative.
            -g[4]
        };
        let (student, mixture) = (push_on(TopkWeights::Student), push_on(TopkWeights::Mixture));
        assert!(student > 0.0, "both raise it: {student}");
        assert!(
            mixture > 5.0 * student,
            "the mixture raises it far more: {mixture} vs {student}"
        );
    }

    #[test]
    fn the_teacher_difference_is_clipped_and_weighted_by_the_old_policy() {
        let device = Device::flex();
        let (logits, host) = log_dist(RESPONSE.len(), VOCAB, &device);
        let dist = burn::tensor::activation::log_softmax(logits, 1);
        let old_dist = host_log_softmax(&host, VOCAB);
        let loss = |cfg: &LossConfig, shift: f32| {
            let s = Signals {
                logp_old: vec![-1.0; RESPONSE.len()],
                reward: None,
                teacher_logp: None,
                topk: Some(topk_target(&old_dist, 3, |_, _| shift)),
            };
            cfg.distribution_loss(dist.clone(), &RESPONSE, &s, None)
                .into_scalar::<f32>()
        };
        let clipped = LossConfig::default();
        // On-policy (ratio 1) the loss is −Σ_t Σ_v w_v·A_v / n: the clip holds it at ±2.
        assert!((loss(&clipped, 10.0) - loss(&clipped, 2.0)).abs() < 1e-6);
        assert!((loss(&clipped, -10.0) - loss(&clipped, -2.0)).abs() < 1e-6);
        assert!((loss(&clipped, 1.0) - 0.5 * loss(&clipped, 2.0)).abs() < 1e-6);
        let unclipped = LossConfig {
            opd_clip: None,
            ..LossConfig::default()
        };
        assert!((loss(&unclipped, 10.0) - 5.0 * loss(&unclipped, 2.0)).abs() < 1e-4);
        // A uniform shift s gives A_v = s·w_v, whose weights sum to 1 per position: −s.
        assert!(
            (loss(&clipped, 1.5) + 1.5).abs() < 1e-5,
            "{}",
            loss(&clipped, 1.5)
        );
    }

    #[test]
    fn k3_is_zero_at_the_base_and_positive_elsewhere() {
        let device = Device::flex();
        let t = Tensor::<1>::from_data(TensorData::new(vec![-1.0f32, -0.5, -3.0], [3]), &device);
        let k = k3(t, &[-1.0, -1.0, -1.0])
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        assert_eq!(k[0], 0.0);
        assert!(k[1] > 0.0 && k[2] > 0.0);
        assert!((policy_drift(&[-1.0], &[-1.0])).abs() < 1e-12);
        assert!(policy_drift(&[-0.5], &[-1.0]) > 0.0);
    }

    #[test]
    fn repeats_are_the_tokens_that_would_copy_an_earlier_trigram() {
        // "a b c a b c a b d": at 5 the two tokens before ("a b") were followed by c earlier,
        // at 6 "b c" by a, at 7 "c a" by b, and at 8 "a b" by c twice (listed once); the reply
        // wrote d there, but c is still the token that would have copied.
        let reply = [1, 2, 3, 1, 2, 3, 1, 2, 4];
        let r = Repeats::in_reply(&reply);
        let want: [&[u32]; 9] = [&[], &[], &[], &[], &[], &[3], &[1], &[2], &[3]];
        assert_eq!(r.rows, want.map(|w| w.to_vec()));
        assert_eq!(r.rows(7..9), &[vec![2], vec![3]]);
        // Every token that followed the context, each once.
        let r = Repeats::in_reply(&[5, 5, 5, 5, 6, 5, 5, 7]);
        assert_eq!(r.rows[3], vec![5]);
        assert_eq!(r.rows[6], Vec::<u32>::new());
        assert_eq!(r.rows[7], vec![5, 6]);
        assert!(
            Repeats::in_reply(&[1, 2, 3, 4, 2, 5])
                .rows
                .iter()
                .all(Vec::is_empty)
        );
    }

    #[test]
    fn the_unlikelihood_of_repeats_matches_finite_differences_and_pushes_them_down() {
        let repeats = vec![vec![], vec![3, 0], vec![7]];
        let ul = |cfg: &LossConfig, logits: &[f32]| -> f32 {
            let lp = host_log_softmax(logits, VOCAB);
            let mut sum = 0.0;
            for (t, row) in repeats.iter().enumerate() {
                for &c in row {
                    sum -= (1.0 - lp[t * VOCAB + c as usize].exp()).max(1e-4).ln();
                }
            }
            cfg.unlikelihood as f32 * sum / repeats.len() as f32
        };
        let cfg = LossConfig {
            unlikelihood: 0.5,
            ..LossConfig::default()
        };
        let device = Device::flex().autodiff();
        let (logits, host) = log_dist(3, VOCAB, &device);
        let logits = logits.require_grad();
        let dist = burn::tensor::activation::log_softmax(logits.clone(), 1);
        let value = cfg.repeat_unlikelihood(dist, &repeats).unwrap();
        let value_host = value.clone().into_scalar::<f32>();
        assert!((value_host - ul(&cfg, &host)).abs() < 1e-5);
        let dist = burn::tensor::activation::log_softmax(logits.clone(), 1);
        let grad = grad_at(&logits, cfg.repeat_unlikelihood(dist, &repeats).unwrap());
        let h = 1e-2;
        for i in 0..host.len() {
            let (mut up, mut down) = (host.clone(), host.clone());
            up[i] += h;
            down[i] -= h;
            let numeric = (ul(&cfg, &up) - ul(&cfg, &down)) / (2.0 * h);
            assert!(
                (numeric - grad[i]).abs() < 2e-3,
                "logit {i}: numeric {numeric}, analytic {}",
                grad[i]
            );
        }
        // Descending the gradient lowers each repeating token's logit, and no row without a
        // repeat gets any gradient.
        for (t, c) in [(1, 3), (1, 0), (2, 7)] {
            assert!(grad[t * VOCAB + c] > 0.0, "row {t} token {c}");
        }
        assert!(grad[..VOCAB].iter().all(|g| *g == 0.0));
        // Off, or a reply without repeats: no term at all.
        let off = LossConfig::default();
        let (dist, _) = log_dist(3, VOCAB, &Device::flex());
        assert!(off.repeat_unlikelihood(dist.clone(), &repeats).is_none());
        assert!(cfg.repeat_unlikelihood(dist, &[vec![], vec![]]).is_none());
    }
}
