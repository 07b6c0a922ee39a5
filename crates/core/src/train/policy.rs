//! One micro-step: a sample's response log-probs under base + trainable adapter (with
//! gradients), its loss, and the backward pass into the optimizer's gradient sum.

use super::loss::{LossConfig, Repeats, Signals, policy_drift};
use super::optimizer::AdapterOptimizer;
use burn::tensor::Tensor;
use burn::tensor::activation::log_softmax;
use clawrl_model::lora::values;
use clawrl_model::{LoraAdapter, Transformer, scoring};

/// Prompt tokens per pass when computing a prompt's head without gradients.
const CHUNK: usize = 256;

/// The log-distributions `[n, vocab]` over the next token at each of `response`'s positions
/// after `prompt`, under the base model plus `adapter`.
///
/// Only the last `grad_context` prompt tokens (and the response) are computed with the
/// trainable adapter; the prompt's head goes through with a frozen copy of the same values,
/// so every log-prob is exact and the gradient ignores only the head's keys and values (an
/// agent's 5 K-token system prompt would otherwise cost a 5 K-token backward pass).
/// `pause_point` runs before each chunk of the head (the trainer waits there while serving).
/// One autodiff graph over every layer: [`micro_step`] computes the same gradients a layer at a
/// time, and its tests compare the two.
pub fn response_log_distributions(
    model: &Transformer,
    adapter: &LoraAdapter,
    prompt: &[u32],
    response: &[u32],
    grad_context: usize,
    pause_point: &dyn Fn(),
) -> Tensor<2> {
    let split = prompt.len().saturating_sub(grad_context.max(1));
    let mut cache = model.new_cache();
    let frozen = adapter.frozen();
    for piece in prompt[..split].chunks(CHUNK) {
        pause_point();
        scoring::extend(model, piece, &mut cache, Some(&frozen), CHUNK);
    }
    let logits =
        scoring::continuation_logits(model, prompt, response, &mut cache, Some(adapter), CHUNK)
            .expect("a sample has a prompt and a response");
    log_softmax(logits, 1)
}

/// What one micro-step measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MicroStep {
    pub loss: f64,
    /// Tokens trained on.
    pub tokens: usize,
    /// KL(behaviour ‖ current) on the sample's tokens (k3), before this step's update.
    pub drift: f64,
    /// Share of tokens whose ratio was outside the clip range.
    pub clipped: f64,
}

/// Runs one sample forward and backward; its loss is scaled by `weight` (1 / samples in the
/// update, so that the summed gradients are those of the batch mean).
///
/// The backward pass goes one layer at a time (gradient checkpointing): the forward pass
/// without gradients keeps only each layer's input, the loss gives the gradient at the last
/// layer's output, and each layer is then computed again with gradients and back-propagated
/// alone. Every layer's activations at once (attention scores of all heads over the whole
/// context) were most of the trainer's memory (a 256-token sample on SmolLM2-135M: a 1312 MB
/// peak, 830 MB this way), and grew with the context. It costs one more forward pass without gradients and a graph
/// per layer: about half again a micro-step's time (docs/BENCHMARKS.md). The
/// gradients equal those of [`response_log_distributions`]'s single graph (tests/train_math.rs).
#[allow(clippy::too_many_arguments)]
pub fn micro_step(
    model: &Transformer,
    optimizer: &mut AdapterOptimizer,
    loss: &LossConfig,
    prompt: &[u32],
    response: &[u32],
    signals: &Signals,
    grad_context: usize,
    weight: f64,
    pause_point: &dyn Fn(),
) -> MicroStep {
    micro_step_in_parts(
        model,
        optimizer,
        loss,
        (prompt, response),
        signals,
        grad_context,
        weight,
        pause_point,
        HEAD_ROWS,
    )
}

/// Response positions whose logits are computed and back-propagated at a time: a position's
/// full-vocabulary logits and their gradients (SmolLM2: 49,152 floats each, several copies in
/// the graph) are the trainer's largest tensors after the layers'.
pub const HEAD_ROWS: usize = 64;

/// [`micro_step`] with the head computed `head_rows` response positions at a time.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn micro_step_in_parts(
    model: &Transformer,
    optimizer: &mut AdapterOptimizer,
    loss: &LossConfig,
    (prompt, response): (&[u32], &[u32]),
    signals: &Signals,
    grad_context: usize,
    weight: f64,
    pause_point: &dyn Fn(),
    head_rows: usize,
) -> MicroStep {
    let n = response.len();
    assert!(
        !prompt.is_empty() && n > 0,
        "a sample has a prompt and a response"
    );
    let split = prompt.len().saturating_sub(grad_context.max(1));
    let mut cache = model.new_cache();
    let frozen = optimizer.trainable().frozen();
    for piece in prompt[..split].chunks(CHUNK) {
        pause_point();
        scoring::extend(model, piece, &mut cache, Some(&frozen), CHUNK);
    }
    // The positions with gradients: the rest of the prompt, then the response but its last
    // token (position p predicts token p+1; the last n predict the response).
    let mut ids = prompt[split..].to_vec();
    ids.extend_from_slice(&response[..n - 1]);
    let m = ids.len();
    pause_point();
    let (inputs, last) =
        model.forward_recording(scoring::ids_tensor(model, &ids), &mut cache, Some(&frozen));
    let [_, _, h] = last.dims();
    let base = (loss.kl_coef > 0.0).then(|| {
        let mut cache = model.new_cache();
        let logits = scoring::continuation_logits(model, prompt, response, &mut cache, None, CHUNK)
            .expect("a sample has a prompt and a response");
        let lp = scoring::gather_logprobs(logits, response);
        values(&lp.unsqueeze::<2>())
    });
    // Found over the whole reply: a part's repeats copy tokens of the parts before it.
    let repeats = Repeats::in_reply(response);
    // The head, a part of the response at a time: each part's share of the mean loss and its
    // gradient at the last layer's output.
    let (mut value, mut now) = (0.0, Vec::with_capacity(n));
    let mut upstream = Vec::new();
    if m > n {
        // The prompt positions feed the head nothing.
        upstream.push(Tensor::zeros([1, m - n, h], (&last.device(), last.dtype())));
    }
    for start in (0..n).step_by(head_rows.max(1)) {
        let rows = start..(start + head_rows.max(1)).min(n);
        let share = rows.len() as f64 / n as f64;
        let x = last
            .clone()
            .narrow(1, m - n + rows.start, rows.len())
            .autodiff()
            .require_grad();
        let hidden = model.final_norm(x.clone()).reshape([rows.len(), h]);
        let log_dist = log_softmax(model.logits(hidden), 1);
        let part = &response[rows.clone()];
        now.extend(values(
            &scoring::gather(log_dist.clone(), part).unsqueeze::<2>(),
        ));
        let mut part_loss = loss.distribution_loss(
            log_dist.clone(),
            part,
            &signals.rows(rows.clone()),
            base.as_ref().map(|b| &b[rows.clone()]),
        );
        if let Some(ul) = loss.repeat_unlikelihood(log_dist, repeats.rows(rows.clone())) {
            part_loss = part_loss + ul;
        }
        value += values(&part_loss.clone().unsqueeze::<2>())[0] as f64 * share;
        let grads = part_loss.mul_scalar(weight * share).backward();
        upstream.push(x.grad(&grads).expect("the loss depends on the last layer"));
    }
    let mut upstream = Tensor::cat(upstream, 1);
    for i in (0..inputs.len()).rev() {
        pause_point();
        let x = inputs[i].clone().autodiff().require_grad();
        let y = model.layer_again(i, x.clone(), &cache, split, Some(optimizer.trainable()));
        let grads = (y * upstream).sum().backward();
        optimizer.accumulate(&grads);
        upstream = x
            .grad(&grads)
            .expect("a layer's output depends on its input");
    }
    optimizer.finish_micro_step();
    let clipped = now
        .iter()
        .zip(&signals.logp_old)
        .filter(|(n, o)| {
            let r = ((**n - **o) as f64).exp();
            r < 1.0 - loss.clip_low || r > 1.0 + loss.clip_high
        })
        .count() as f64
        / now.len().max(1) as f64;
    MicroStep {
        loss: value,
        tokens: response.len(),
        drift: policy_drift(&now, &signals.logp_old),
        clipped,
    }
}
