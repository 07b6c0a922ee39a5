//! Teacher-forced scoring on a bare transformer: the logits (or log-probabilities) the model
//! assigns to each token of a given continuation. One function for every caller: the engine's
//! scoring tasks (OPD teacher, regression guard) and the trainer, which runs the same code
//! with a trainable adapter so that the result carries gradients.

use super::KvCache;
use super::lora::LoraAdapter;
use super::transformer::Transformer;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};

pub fn ids_tensor(model: &Transformer, ids: &[u32]) -> Tensor<2, Int> {
    let data: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(data, [1, ids.len()]), &model.device())
}

/// Runs `ids` into `cache`, `chunk` tokens per pass (attention scores stay `chunk × context`).
pub fn extend(
    model: &Transformer,
    ids: &[u32],
    cache: &mut KvCache,
    adapter: Option<&LoraAdapter>,
    chunk: usize,
) {
    for piece in ids.chunks(chunk.max(1)) {
        model.forward(ids_tensor(model, piece), cache, adapter);
    }
}

/// Logits `[n, vocab]` predicting each of the `n` tokens of `continuation` after `context`.
/// `cache` may already hold the first tokens of `context` (computed with the same adapter);
/// the rest of the context is computed in chunks, then the last context token and the
/// continuation (but its last token) in one pass. `None` when there is nothing to score.
pub fn continuation_logits(
    model: &Transformer,
    context: &[u32],
    continuation: &[u32],
    cache: &mut KvCache,
    adapter: Option<&LoraAdapter>,
    chunk: usize,
) -> Option<Tensor<2>> {
    let n = continuation.len();
    if context.is_empty() || n == 0 || cache.len() >= context.len() {
        return None;
    }
    let last = context.len() - 1;
    extend(model, &context[cache.len()..last], cache, adapter, chunk);
    let mut ids = vec![context[last]];
    ids.extend_from_slice(&continuation[..n - 1]);
    // Position p predicts token p+1: every position of this pass predicts a continuation token.
    let hidden = model.forward(ids_tensor(model, &ids), cache, adapter);
    let [_, _, h] = hidden.dims();
    Some(model.logits(hidden.reshape([n, h])))
}

/// The log-probability `[n]` of each token of `continuation` under `logits` `[n, vocab]`.
pub fn gather_logprobs(logits: Tensor<2>, continuation: &[u32]) -> Tensor<1> {
    gather(log_softmax(logits, 1), continuation)
}

/// The log-probability `[n]` of each token of `continuation` in log-distributions `[n, vocab]`
/// (with their gradients).
pub fn gather(log_dist: Tensor<2>, continuation: &[u32]) -> Tensor<1> {
    let n = continuation.len();
    let targets: Vec<i64> = continuation.iter().map(|&i| i as i64).collect();
    let idx = Tensor::<2, Int>::from_data(TensorData::new(targets, [n, 1]), &log_dist.device());
    log_dist.gather(1, idx).reshape([n])
}

/// The log-probability of each token of `continuation` from log-distributions `[n, vocab]`.
pub fn pick(logp: Tensor<2>, continuation: &[u32]) -> Vec<f32> {
    let n = continuation.len();
    let targets: Vec<i64> = continuation.iter().map(|&i| i as i64).collect();
    let idx = Tensor::<2, Int>::from_data(TensorData::new(targets, [n, 1]), &logp.device());
    logp.gather(1, idx)
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("f32 data")
}

/// KL(p ‖ q) at each position, from log-distributions `[n, vocab]`: Σ_v p_v (log p_v − log q_v).
pub fn kl_per_position(logp: Tensor<2>, logq: Tensor<2>) -> Vec<f32> {
    let [n, _] = logp.dims();
    (logp.clone().exp() * (logp - logq))
        .sum_dim(1)
        .reshape([n])
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("f32 data")
}

/// One chunk of a teacher-forced score: feeds `feed` after `cache` and returns the
/// log-probability of each of `targets` (same length: position i predicts targets[i]), and
/// with `distributions` the log-distributions `[n, vocab]`.
pub fn score_chunk(
    model: &Transformer,
    feed: &[u32],
    targets: &[u32],
    cache: &mut KvCache,
    adapter: Option<&LoraAdapter>,
    distributions: bool,
) -> (Vec<f32>, Option<Tensor<2>>) {
    let hidden = model.forward(ids_tensor(model, feed), cache, adapter);
    let [_, n, h] = hidden.dims();
    let logp = log_softmax(model.logits(hidden.reshape([n, h])), 1);
    let picked = pick(logp.clone(), targets);
    (picked, distributions.then_some(logp))
}
