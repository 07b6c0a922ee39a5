//! The trainable adapter and its optimizer: gradients of each micro-step (one sample) are
//! summed, clipped by their global norm (as PyTorch's `clip_grad_norm_`: Burn's clipping is
//! per tensor), and applied with Burn's AdamW.

use burn::module::ParamId;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Gradients, Tensor};
use clawrl_model::LoraAdapter;
use clawrl_model::lora::LoraPair;

#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerConfig {
    pub learning_rate: f64,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub epsilon: f32,
    /// Global gradient-norm limit (0 = no clipping).
    pub max_grad_norm: f64,
    /// The learning rate grows linearly over this many steps of a fresh optimizer state
    /// (0 = none). Adam's first step from fresh moments is `lr · sign(g)` on every parameter
    /// whatever the gradient's size: at full rate it can throw a small model into loops.
    pub warmup_steps: usize,
}

impl OptimizerConfig {
    /// The learning rate of step `step` (0-based) of a fresh optimizer state.
    pub(crate) fn learning_rate_at(&self, step: usize) -> f64 {
        if step >= self.warmup_steps {
            self.learning_rate
        } else {
            self.learning_rate * (step + 1) as f64 / self.warmup_steps as f64
        }
    }
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            learning_rate: 1e-4,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.98,
            epsilon: 1e-8,
            max_grad_norm: 1.0,
            warmup_steps: 0,
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate the step used.
    pub learning_rate: f64,
}

/// A trainable copy of an adapter with its optimizer state and the gradients summed so far.
pub struct AdapterOptimizer {
    adapter: LoraAdapter,
    optim: ModuleOptimizer,
    config: OptimizerConfig,
    /// Summed gradients, in the order of [`params`].
    grads: Vec<Option<Tensor<2>>>,
    micro_steps: usize,
    /// Optimizer steps taken from this state (for the warmup).
    steps: usize,
}

/// The parameters of an adapter, in a fixed order.
fn params(adapter: &LoraAdapter) -> Vec<(ParamId, Tensor<2>)> {
    adapter
        .pairs()
        .flat_map(|(_, _, p): (usize, _, &LoraPair)| [(p.a.id, p.a.val()), (p.b.id, p.b.val())])
        .collect()
}

impl AdapterOptimizer {
    /// Starts from `start`'s values (copied into trainable parameters) with fresh optimizer
    /// state.
    pub fn new(start: &LoraAdapter, config: OptimizerConfig) -> Self {
        let adapter = start.trainable();
        let optim = AdamWConfig::new()
            .with_beta_1(config.beta1)
            .with_beta_2(config.beta2)
            .with_epsilon(config.epsilon)
            .with_weight_decay(config.weight_decay)
            .init();
        let n = params(&adapter).len();
        Self {
            adapter,
            optim,
            config,
            grads: vec![None; n],
            micro_steps: 0,
            steps: 0,
        }
    }

    /// The adapter whose parameters track gradients (use it in the forward pass).
    pub fn trainable(&self) -> &LoraAdapter {
        &self.adapter
    }

    /// Back-propagates one micro-step's loss and adds its gradients to the sum.
    pub fn backward(&mut self, loss: Tensor<1>) {
        self.accumulate(&loss.backward());
        self.finish_micro_step();
    }

    /// Adds the gradients of the parameters that `grads` has (a part of a micro-step's
    /// backward pass: one layer of it) to the sum.
    pub fn accumulate(&mut self, grads: &Gradients) {
        for (slot, (_, p)) in self.grads.iter_mut().zip(params(&self.adapter)) {
            if let Some(g) = p.grad(grads) {
                *slot = Some(match slot.take() {
                    Some(sum) => sum + g,
                    None => g,
                });
            }
        }
    }

    /// Counts a micro-step whose gradients [`Self::accumulate`] has summed.
    pub fn finish_micro_step(&mut self) {
        self.micro_steps += 1;
    }

    /// The summed gradients so far, flattened in the adapter's parameter order (zeros where a
    /// parameter got none).
    pub fn gradient_values(&self) -> Vec<f32> {
        self.grads
            .iter()
            .zip(params(&self.adapter))
            .flat_map(|(g, (_, p))| match g {
                Some(g) => clawrl_model::lora::values(g),
                None => vec![0.0; p.shape().num_elements()],
            })
            .collect()
    }

    /// Forgets the gradients summed since the last step (an update set aside).
    pub(crate) fn discard(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = None);
        self.micro_steps = 0;
    }

    /// Micro-steps accumulated since the last [`Self::step`].
    pub fn pending(&self) -> usize {
        self.micro_steps
    }

    /// Clips the summed gradients by their global norm and takes one AdamW step at
    /// `lr_scale` times the (warmed-up) learning rate.
    pub fn step(&mut self, lr_scale: f64) -> Step {
        let ids: Vec<ParamId> = params(&self.adapter)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let grads: Vec<(ParamId, Tensor<2>)> = ids
            .into_iter()
            .zip(self.grads.iter_mut())
            .filter_map(|(id, g)| g.take().map(|g| (id, g)))
            .collect();
        self.micro_steps = 0;
        let norm = grads
            .iter()
            .map(|(_, g)| g.clone().square().sum().into_scalar::<f32>() as f64)
            .sum::<f64>()
            .sqrt();
        let scale = if self.config.max_grad_norm > 0.0 && norm > self.config.max_grad_norm {
            self.config.max_grad_norm / norm
        } else {
            1.0
        };
        let mut params = GradientsParams::new();
        for (id, g) in grads {
            params.register(id, if scale < 1.0 { g.mul_scalar(scale) } else { g });
        }
        let stand_in = placeholder(&self.adapter);
        let adapter = std::mem::replace(&mut self.adapter, stand_in);
        let learning_rate = self.config.learning_rate_at(self.steps) * lr_scale;
        self.adapter = self.optim.step(learning_rate, adapter, params);
        self.steps += 1;
        Step {
            grad_norm: norm,
            learning_rate,
        }
    }

    /// The current values as a plain (serving) adapter.
    pub fn snapshot(&self) -> LoraAdapter {
        self.adapter.frozen()
    }
}

/// A cheap stand-in while the real adapter is moved through the optimizer.
fn placeholder(a: &LoraAdapter) -> LoraAdapter {
    LoraAdapter {
        layers: Vec::new(),
        config: a.config.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_learning_rate_warms_up_linearly_then_stays() {
        let c = OptimizerConfig {
            learning_rate: 4e-4,
            warmup_steps: 4,
            ..OptimizerConfig::default()
        };
        let rates: Vec<f64> = (0..6).map(|s| c.learning_rate_at(s)).collect();
        let want = [1e-4, 2e-4, 3e-4, 4e-4, 4e-4, 4e-4];
        for (got, want) in rates.iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{rates:?}");
        }
        let none = OptimizerConfig {
            warmup_steps: 0,
            ..c
        };
        assert_eq!(none.learning_rate_at(0), 4e-4);
    }
}
