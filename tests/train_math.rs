//! The mathematics of training, on the tiny random Qwen3 checkpoint (two layers, width 48):
//! the adapter's forward pass equals the merged weights W + s·A·B, its gradients match finite
//! differences, and one optimizer step moves log-probabilities the way each loss says.

mod common;
use burn::module::Param;
use burn::tensor::DType;
use clawrl_core::train::loss::{LossConfig, Method, Repeats, Signals, TopK};
use clawrl_core::train::optimizer::{AdapterOptimizer, OptimizerConfig};
use clawrl_core::train::policy::{
    HEAD_ROWS, MicroStep, micro_step, micro_step_in_parts, response_log_distributions,
};
use clawrl_model::linear::LinearWeight;
use clawrl_model::lora::{LoraPair, values};
use clawrl_model::weights::WeightFile;
use clawrl_model::{LoraAdapter, LoraConfig, Target, Transformer, WeightMode, scoring};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Log-probs of RESPONSE after PROMPT under the base model plus `adapter`, the last
/// `grad_context` prompt tokens with gradients.
fn response_logprobs(
    model: &Transformer,
    adapter: &LoraAdapter,
    grad_context: usize,
) -> burn::tensor::Tensor<1> {
    let dist = response_log_distributions(model, adapter, &PROMPT, &RESPONSE, grad_context, &|| {});
    scoring::gather(dist, &RESPONSE)
}

fn tiny() -> Transformer {
    let (file, cfg) = WeightFile::open(&common::fixture("tiny-qwen3")).unwrap();
    Transformer::load(
        &file,
        cfg,
        &common::test_device(),
        DType::F32,
        WeightMode::Dense,
    )
    .unwrap()
}

fn lora_config(rank: usize) -> LoraConfig {
    LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        targets: Target::ALL.to_vec(),
    }
}

/// An adapter with random A and B (a fresh one has B = 0, which hides A's gradient).
fn random_adapter(model: &Transformer, seed: u64, b_scale: f32) -> LoraAdapter {
    let mut rng = StdRng::seed_from_u64(seed);
    LoraAdapter::build(
        &model.config,
        lora_config(4),
        |_, _, din, dout, r| {
            let a = (0..din * r).map(|_| rng.random_range(-0.3..0.3)).collect();
            let b = (0..r * dout)
                .map(|_| rng.random_range(-b_scale..b_scale))
                .collect();
            Ok((a, b))
        },
        &common::test_device(),
    )
    .unwrap()
}

const PROMPT: [u32; 7] = [3, 17, 42, 8, 91, 5, 60];
const RESPONSE: [u32; 5] = [12, 33, 7, 70, 2];

fn logprobs(model: &Transformer, adapter: Option<&LoraAdapter>) -> Vec<f32> {
    let mut cache = model.new_cache();
    let logits =
        scoring::continuation_logits(model, &PROMPT, &RESPONSE, &mut cache, adapter, 256).unwrap();
    values(&scoring::gather_logprobs(logits, &RESPONSE).unsqueeze::<2>())
}

#[test]
fn the_adapter_computes_the_same_as_merged_weights() {
    let model = tiny();
    let adapter = random_adapter(&model, 1, 0.3);
    let mut merged = tiny();
    let merge = |w: &mut LinearWeight, pair: &LoraPair| {
        let LinearWeight::Dense(p) = w else {
            panic!("dense weights")
        };
        let delta = pair.a.val().matmul(pair.b.val()).mul_scalar(pair.scale);
        *p = Param::from_tensor(p.val() + delta);
    };
    for (i, t, pair) in adapter.pairs() {
        let layer = &mut merged.layers[i];
        let w = match t {
            Target::QProj => &mut layer.attn.q_proj.weight,
            Target::KProj => &mut layer.attn.k_proj.weight,
            Target::VProj => &mut layer.attn.v_proj.weight,
            Target::OProj => &mut layer.attn.o_proj.weight,
            Target::GateProj => &mut layer.mlp.gate_proj.weight,
            Target::UpProj => &mut layer.mlp.up_proj.weight,
            Target::DownProj => &mut layer.mlp.down_proj.weight,
        };
        merge(w, pair);
    }
    let with_adapter = logprobs(&model, Some(&adapter));
    let with_merged = logprobs(&merged, None);
    let base = logprobs(&model, None);
    for ((a, m), b) in with_adapter.iter().zip(&with_merged).zip(&base) {
        assert!((a - m).abs() < 1e-4, "adapter {a} vs merged {m}");
        assert!(
            (a - b).abs() > 1e-4,
            "the adapter changes the output ({a} vs base {b})"
        );
    }
    // A fresh adapter (B = 0) is the base model exactly.
    let fresh = LoraAdapter::init(&model.config, lora_config(4), &common::test_device(), 7);
    assert_eq!(logprobs(&model, Some(&fresh)), base);
}

/// The combined loss of the sample at `adapter`, without gradients.
fn loss_at(model: &Transformer, adapter: &LoraAdapter, signals: &Signals) -> f64 {
    let lp = response_logprobs(model, adapter, 64);
    LossConfig::default()
        .sample_loss(lp, signals, None)
        .into_scalar::<f32>() as f64
}

/// A copy of `adapter` with one value of one matrix moved by `h`.
fn nudged(
    model: &Transformer,
    adapter: &LoraAdapter,
    at: (usize, Target, char, usize),
    h: f32,
) -> LoraAdapter {
    LoraAdapter::build(
        &model.config,
        (*adapter.config).clone(),
        |layer, t, _, _, _| {
            let pair = adapter.layers[layer].get(t).unwrap();
            let (mut a, mut b) = (values(&pair.a.val()), values(&pair.b.val()));
            if (layer, t) == (at.0, at.1) {
                let m = if at.2 == 'A' { &mut a } else { &mut b };
                m[at.3] += h;
            }
            Ok((a, b))
        },
        &common::test_device(),
    )
    .unwrap()
}

/// A reward and a teacher, with the old log-probs just below `current` (ratios inside the
/// clip range, where the loss is smooth).
fn both_signals_near(current: &[f32]) -> Signals {
    Signals {
        logp_old: current.iter().map(|l| l - 0.05).collect(),
        reward: Some(1.0),
        teacher_logp: Some(current.iter().map(|l| l + 0.3).collect()),
        topk: None,
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    let model = tiny();
    let adapter = random_adapter(&model, 2, 0.2);
    let current = logprobs(&model, Some(&adapter));
    let signals = both_signals_near(&current);
    let trainable = adapter.trainable();
    // The whole prompt with gradients (a shorter window leaves out the head's keys and values).
    let lp = response_logprobs(&model, &trainable, 64);
    let grads = LossConfig::default()
        .sample_loss(lp, &signals, None)
        .backward();
    let probes = [
        (0, Target::QProj, 'A', 5),
        (0, Target::KProj, 'B', 3),
        (1, Target::VProj, 'A', 17),
        (1, Target::OProj, 'B', 40),
        (0, Target::GateProj, 'A', 100),
        (1, Target::UpProj, 'B', 9),
        (1, Target::DownProj, 'A', 33),
    ];
    let h = 2e-3;
    for at in probes {
        let pair = trainable.layers[at.0].get(at.1).unwrap();
        let param = if at.2 == 'A' {
            pair.a.val()
        } else {
            pair.b.val()
        };
        let analytic = values(&param.grad(&grads).expect("a gradient"))[at.3] as f64;
        let up = loss_at(&model, &nudged(&model, &adapter, at, h), &signals);
        let down = loss_at(&model, &nudged(&model, &adapter, at, -h), &signals);
        let numeric = (up - down) / (2.0 * h as f64);
        assert!(
            (analytic - numeric).abs() <= 2e-3 + 0.03 * numeric.abs(),
            "{at:?}: autodiff {analytic:.6} vs finite differences {numeric:.6}"
        );
        assert!(
            analytic.abs() > 1e-5,
            "{at:?} has a real gradient ({analytic})"
        );
    }
}

/// One update on one sample, from a fresh adapter; returns the response log-probs after it.
fn one_update(
    model: &Transformer,
    method: Method,
    reward: Option<f32>,
    teacher: Option<Vec<f32>>,
) -> (Vec<f32>, Vec<f32>) {
    let (before, after, _) = scaled_update(model, method, reward, teacher, 1.0);
    (before, after)
}

/// One micro-step of `method` on PROMPT → RESPONSE (gradients summed into `opt`).
fn train_on(
    model: &Transformer,
    opt: &mut AdapterOptimizer,
    method: Method,
    signals: &Signals,
) -> MicroStep {
    let loss = LossConfig {
        method,
        ..LossConfig::default()
    };
    micro_step(
        model,
        opt,
        &loss,
        &PROMPT,
        &RESPONSE,
        signals,
        64,
        1.0,
        &|| {},
    )
}

/// Adam at the learning rate these tests step with.
fn optimizer(start: &LoraAdapter) -> AdapterOptimizer {
    AdapterOptimizer::new(
        start,
        OptimizerConfig {
            learning_rate: 1e-3,
            ..OptimizerConfig::default()
        },
    )
}

/// [`one_update`] with its step at `lr_scale` of the learning rate; also returns the adapter.
fn scaled_update(
    model: &Transformer,
    method: Method,
    reward: Option<f32>,
    teacher: Option<Vec<f32>>,
    lr_scale: f64,
) -> (Vec<f32>, Vec<f32>, LoraAdapter) {
    let start = LoraAdapter::init(&model.config, lora_config(4), &common::test_device(), 3);
    let before = logprobs(model, Some(&start));
    let mut opt = optimizer(&start);
    let signals = Signals {
        logp_old: before.clone(),
        reward,
        teacher_logp: teacher,
        topk: None,
    };
    let m = train_on(model, &mut opt, method, &signals);
    assert_eq!(m.tokens, RESPONSE.len());
    assert!(m.drift.abs() < 1e-9, "on-policy: no drift before the step");
    let step = opt.step(lr_scale);
    assert!(
        (step.learning_rate - 1e-3 * lr_scale).abs() < 1e-12,
        "{step:?}"
    );
    let after = opt.snapshot();
    (before, logprobs(model, Some(&after)), after)
}

/// Every value of an adapter, in a fixed order.
fn adapter_values(a: &LoraAdapter) -> Vec<f32> {
    a.pairs()
        .flat_map(|(_, _, p)| [values(&p.a.val()), values(&p.b.val())].concat())
        .collect()
}

#[test]
fn a_step_at_a_quarter_of_the_rate_moves_the_adapter_a_quarter_as_far() {
    // train.signal_sized_steps: an update of hints alone steps at w_opd of the rate. Adam
    // would otherwise step about the same distance whatever the loss's scale.
    let model = tiny();
    let start = adapter_values(&LoraAdapter::init(
        &model.config,
        lora_config(4),
        &common::test_device(),
        3,
    ));
    let moved = |scale: f64| {
        let (_, _, after) = scaled_update(&model, Method::Rl, Some(1.0), None, scale);
        adapter_values(&after)
            .iter()
            .zip(&start)
            .map(|(a, b)| (a - b).abs() as f64)
            .sum::<f64>()
    };
    let (full, quarter) = (moved(1.0), moved(0.25));
    assert!(full > 1e-3, "the full step moved the adapter by {full}");
    let ratio = quarter / full;
    assert!(
        (ratio - 0.25).abs() < 0.01,
        "moved {quarter} vs {full}: ratio {ratio}"
    );
}

#[test]
fn a_binary_rl_step_raises_a_rewarded_response_and_lowers_a_punished_one() {
    let model = tiny();
    let sum = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>();
    let (before, up) = one_update(&model, Method::Rl, Some(1.0), None);
    let (_, down) = one_update(&model, Method::Rl, Some(-1.0), None);
    assert!(
        sum(&up) > sum(&before) + 1e-4,
        "r = +1: {} -> {}",
        sum(&before),
        sum(&up)
    );
    assert!(
        sum(&down) < sum(&before) - 1e-4,
        "r = -1: {} -> {}",
        sum(&before),
        sum(&down)
    );
}

#[test]
fn an_opd_step_moves_the_student_toward_the_teacher() {
    let model = tiny();
    // The teacher: the same base with another adapter, scoring the same tokens.
    let teacher = logprobs(&model, Some(&random_adapter(&model, 9, 0.3)));
    let (before, after) = one_update(&model, Method::Opd, None, Some(teacher.clone()));
    let distance = |v: &[f32]| {
        v.iter()
            .zip(&teacher)
            .map(|(a, b)| (a - b).abs() as f64)
            .sum::<f64>()
    };
    assert!(
        distance(&after) < distance(&before) - 1e-4,
        "distance to the teacher {} -> {}",
        distance(&before),
        distance(&after)
    );
    // Without a reward, RL alone has nothing to learn: the adapter does not move.
    let (before, after) = one_update(&model, Method::Rl, None, Some(teacher));
    assert_eq!(before, after);
}

#[test]
fn computing_the_prompt_head_without_gradients_gives_the_same_log_probs() {
    let model = tiny();
    let adapter = random_adapter(&model, 4, 0.2);
    let full = response_logprobs(&model, &adapter.trainable(), 64);
    let tail = response_logprobs(&model, &adapter.trainable(), 2);
    let (full, tail) = (
        values(&full.unsqueeze::<2>()),
        values(&tail.unsqueeze::<2>()),
    );
    for (a, b) in full.iter().zip(&tail) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

/// The log-distributions `[n, vocab]` over the response positions, on the host.
fn distributions(model: &Transformer, adapter: &LoraAdapter) -> (Vec<f32>, usize) {
    let d = response_log_distributions(model, adapter, &PROMPT, &RESPONSE, 64, &|| {});
    let [_, vocab] = d.dims();
    (d.into_data().try_into_vec::<f32>().unwrap(), vocab)
}

#[test]
fn top_k_distillation_raises_a_token_the_reply_did_not_contain() {
    // The hint makes the teacher favour, at the first position, the student's second choice:
    // a token the sampled reply does not contain (as the end of the turn after a short
    // answer would be). The top-K form raises it; the sampled-token form cannot see it.
    let model = tiny();
    let start = LoraAdapter::init(&model.config, lora_config(4), &common::test_device(), 3);
    let (old, vocab) = distributions(&model, &start);
    let k = 8;
    let (ids, old_top) = TopK::select(&old, vocab, k);
    let favoured = ids[..k]
        .iter()
        .copied()
        .find(|&v| v != RESPONSE[0] && !RESPONSE.contains(&v))
        .expect("a top-K token outside the reply");
    let teacher: Vec<f32> = ids
        .iter()
        .zip(&old_top)
        .enumerate()
        .map(|(i, (&v, &o))| if i < k && v == favoured { o + 1.5 } else { o })
        .collect();
    let sampled: Vec<f32> = RESPONSE
        .iter()
        .enumerate()
        .map(|(t, &y)| old[t * vocab + y as usize])
        .collect();
    let step = |topk: Option<TopK>| {
        let mut opt = optimizer(&start);
        let signals = Signals {
            logp_old: sampled.clone(),
            reward: None,
            // The teacher agrees with the student on every sampled token.
            teacher_logp: Some(sampled.clone()),
            topk,
        };
        train_on(&model, &mut opt, Method::Opd, &signals);
        opt.step(1.0);
        let (after, _) = distributions(&model, &opt.snapshot());
        after[favoured as usize]
    };
    let before = old[favoured as usize];
    let topk = step(Some(TopK {
        k,
        ids: ids.clone(),
        old: old_top.clone(),
        teacher,
    }));
    assert!(
        topk > before + 1e-3,
        "top-K: log p(favoured) {before} -> {topk}"
    );
    let sampled_form = step(None);
    assert!(
        (sampled_form - before).abs() < 1e-6,
        "the sampled-token form has nothing to move: {before} -> {sampled_form}"
    );
}

/// The largest difference between two gradients, and the largest magnitude of `reference`.
fn worst_difference(reference: &[f32], other: &[f32]) -> (f32, f32) {
    let scale = reference.iter().fold(0f32, |m, g| m.max(g.abs()));
    let worst = reference
        .iter()
        .zip(other)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    (worst, scale)
}

#[test]
fn the_layer_by_layer_backward_gives_the_single_graph_gradients() {
    // micro_step back-propagates one recomputed layer at a time; the reference keeps the
    // whole graph. Same sample, same loss (top-K and sampled-token forms, with and without a
    // prompt head computed without gradients): the same summed gradients.
    let model = tiny();
    let adapter = random_adapter(&model, 5, 0.2);
    let (dist, vocab) = distributions(&model, &adapter);
    let (ids, old) = TopK::select(&dist, vocab, 4);
    let current = logprobs(&model, Some(&adapter));
    let signals = both_signals_near(&current);
    let topk = Signals {
        topk: Some(TopK {
            k: 4,
            ids,
            teacher: old
                .iter()
                .enumerate()
                .map(|(i, l)| l + [0.4, -0.3, 1.1, 0.0][i % 4])
                .collect(),
            old,
        }),
        ..signals.clone()
    };
    let loss = LossConfig::default();
    for (signals, grad_context) in [(&signals, 64), (&signals, 3), (&topk, 64), (&topk, 3)] {
        let mut reference = optimizer(&adapter);
        let dist = response_log_distributions(
            &model,
            reference.trainable(),
            &PROMPT,
            &RESPONSE,
            grad_context,
            &|| {},
        );
        let whole = loss.distribution_loss(dist, &RESPONSE, signals, None);
        let whole_value = whole.clone().into_scalar::<f32>() as f64;
        reference.backward(whole.mul_scalar(0.5));
        for head_rows in [HEAD_ROWS, 2] {
            let mut layered = optimizer(&adapter);
            let step = micro_step_in_parts(
                &model,
                &mut layered,
                &loss,
                (&PROMPT, &RESPONSE),
                signals,
                grad_context,
                0.5,
                &|| {},
                head_rows,
            );
            assert_eq!(layered.pending(), 1, "one micro-step counted");
            assert!(
                (step.loss - whole_value).abs() < 1e-5,
                "the loss in parts {} vs whole {whole_value}",
                step.loss
            );
            let a = reference.gradient_values();
            let (worst, scale) = worst_difference(&a, &layered.gradient_values());
            let nonzero = a.iter().filter(|g| g.abs() > 1e-7).count();
            assert!(
                nonzero > a.len() / 2,
                "most parameters get a gradient ({nonzero} of {})",
                a.len()
            );
            assert!(
                worst <= 1e-4 * scale,
                "grad_context {grad_context}, head rows {head_rows}, top-K {}: worst difference {worst:e} of {scale:e}",
                signals.topk.is_some()
            );
        }
    }
}

#[test]
fn the_unlikelihood_of_repeats_lowers_a_loop_in_parts_as_in_one_graph() {
    // A reply that loops, "12 33 7" three times: from position 5 on, each token copies the
    // trigram three tokens back. Nothing else to learn from it (a reward of 0, no hint), so
    // every gradient comes from train.unlikelihood.
    const LOOPING: [u32; 9] = [12, 33, 7, 12, 33, 7, 12, 33, 7];
    let model = tiny();
    let adapter = random_adapter(&model, 5, 0.2);
    let dist =
        |a: &LoraAdapter| response_log_distributions(&model, a, &PROMPT, &LOOPING, 64, &|| {});
    let logp = |a: &LoraAdapter| values(&scoring::gather(dist(a), &LOOPING).unsqueeze::<2>());
    let before = logp(&adapter);
    let signals = Signals {
        logp_old: before.clone(),
        reward: Some(0.0),
        teacher_logp: None,
        topk: None,
    };
    let repeats = Repeats::in_reply(&LOOPING);
    assert_eq!(repeats.rows[4], Vec::<u32>::new());
    assert_eq!(repeats.rows[5..], [[7], [12], [33], [7]]);
    let loss = LossConfig {
        unlikelihood: 1.0,
        ..LossConfig::default()
    };
    let mut reference = optimizer(&adapter);
    let d = dist(reference.trainable());
    let whole = loss.distribution_loss(d.clone(), &LOOPING, &signals, None)
        + loss.repeat_unlikelihood(d, &repeats.rows).unwrap();
    let whole_value = whole.clone().into_scalar::<f32>() as f64;
    assert!(whole_value > 0.0);
    reference.backward(whole);
    for head_rows in [HEAD_ROWS, 2] {
        // Parts of two positions: the repeats at 5..9 copy tokens of earlier parts.
        let mut layered = optimizer(&adapter);
        let step = micro_step_in_parts(
            &model,
            &mut layered,
            &loss,
            (&PROMPT, &LOOPING),
            &signals,
            64,
            1.0,
            &|| {},
            head_rows,
        );
        assert!(
            (step.loss - whole_value).abs() < 1e-5,
            "head rows {head_rows}: the loss in parts {} vs whole {whole_value}",
            step.loss
        );
        let (worst, scale) =
            worst_difference(&reference.gradient_values(), &layered.gradient_values());
        assert!(
            scale > 0.0 && worst <= 1e-4 * scale,
            "{worst:e} of {scale:e}"
        );
        layered.step(1.0);
        let after = logp(&layered.snapshot());
        for t in 5..LOOPING.len() {
            assert!(
                after[t] < before[t],
                "head rows {head_rows}: the copy at {t} fell ({} -> {})",
                before[t],
                after[t]
            );
        }
    }
    // Off (LossConfig's default, PIPELINE.md's loss), the same sample gives no gradient at all.
    let mut off = optimizer(&adapter);
    micro_step(
        &model,
        &mut off,
        &LossConfig::default(),
        &PROMPT,
        &LOOPING,
        &signals,
        64,
        1.0,
        &|| {},
    );
    assert!(off.gradient_values().iter().all(|g| *g == 0.0));
}
