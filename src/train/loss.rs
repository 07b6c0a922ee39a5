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

use burn::tensor::{Tensor, TensorData};

/// Which signals train the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Rewards only (Binary RL).
    Rl,
    /// Hints only (on-policy distillation).
    Opd,
    /// Both, summed (the default).
    Combined,
}

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
}

/// The rewards of an update's samples as its RL term uses them. Replies rated down alone give
/// Binary RL nothing to move toward: pushing their tokens down spreads probability over
/// everything else, and on a small model that ends in loops or nonsense within a few updates
/// (docs/LEARNING.md: a preference the model never satisfies, every update rated down). So when
/// a batch's mean reward is negative it is subtracted, as a baseline: the replies rated down
/// then push down only as much as those rated up push up, and a batch with none rated up
/// leaves the term at 0 (its hints still count). A batch whose mean is ≥ 0 keeps PIPELINE.md's
/// A = r.
pub fn balanced_rewards(rewards: &[Option<f32>]) -> Vec<Option<f32>> {
    let given: Vec<f32> = rewards.iter().flatten().copied().collect();
    let mean = given.iter().sum::<f32>() / given.len().max(1) as f32;
    let baseline = mean.min(0.0);
    rewards.iter().map(|r| r.map(|r| r - baseline)).collect()
}

/// PIPELINE.md's weights (the shipped configuration lowers `w_opd`: config/default.toml).
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
}

impl LossConfig {
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
    pub fn step_scale(&self, samples: &[(Option<f32>, bool)]) -> f64 {
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
    pub fn advantages(&self, s: &Signals) -> Vec<f32> {
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
    pub fn surrogate(&self, logp_new: Tensor<1>, logp_old: &[f32], adv: &[f32]) -> Tensor<1> {
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

/// The k3 estimator of KL(new ‖ base) per token: exp(−Δ) − 1 + Δ with Δ = logp_new −
/// logp_base clamped to ±10 (non-negative, unbiased for samples of the new policy).
pub fn k3(logp_new: Tensor<1>, logp_base: &[f32]) -> Tensor<1> {
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
pub fn policy_drift(logp_new: &[f32], logp_old: &[f32]) -> f64 {
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
}
