//! The two real models against the reference fixtures (numpy f32 forward pass over the
//! GGUF's dequantized weights, cross-checked with llama.cpp; see tests/fixtures/README.md).
//!
//! Tolerance on logits: 1e-3 absolute. The fixtures round logits to 4 decimals (±5e-5) and
//! both sides compute in f32 from identical weights in a different summation order (measured:
//! ≤ 6e-5 over 24–30 layers). Any real defect (a wrong RoPE layout, a missing bias, a wrong
//! norm epsilon) moves logits by far more than 1e-3.

mod common;
use burn::tensor::DType;
use clawrl_model::generate::Decoding;
use clawrl_model::linear::LinearWeight;
use clawrl_model::messages::Message;
use clawrl_model::quant::GgmlType;
use clawrl_model::{FinishReason, GenerateRequest, LoadedModel, SamplingParams, WeightMode};

const LOGIT_TOL: f32 = 1e-3;
/// With keys and values stored in f16 (11 significant bits) the logits move by ~5e-3 over
/// 30 layers (measured); the greedy continuations must still equal the fixtures'.
const F16_CACHE_TOL: f32 = 2e-2;

fn last_logits(model: &LoadedModel, ids: &[u32]) -> Vec<f32> {
    logits_after(model, &[], ids)
}

/// Logits at the last of `ids` after `cached` went through the model first: with one id, the
/// last step is a decoding step (on the quantized blocks where the model keeps them).
fn logits_after(model: &LoadedModel, cached: &[u32], ids: &[u32]) -> Vec<f32> {
    let mut cache = model.transformer.new_cache();
    let tokens = |ids: &[u32]| {
        let data: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        burn::tensor::Tensor::<2, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(data, [1, ids.len()]),
            &model.transformer.device(),
        )
    };
    if !cached.is_empty() {
        model.transformer.forward(tokens(cached), &mut cache, None);
    }
    let h = model.transformer.forward(tokens(ids), &mut cache, None);
    let [_, s, d] = h.dims();
    model
        .transformer
        .logits(h.narrow(1, s - 1, 1).reshape([1, d]))
        .into_data()
        .try_into_vec::<f32>()
        .unwrap()
}

fn check_model(model: &LoadedModel, fixture: &str, tol: f32) {
    let fx = common::read_json(fixture);
    for case in fx["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        // Chat template + tokenizer: exact text and ids.
        let text = model
            .template
            .render(&[Message::user(prompt)], None, true)
            .unwrap();
        assert_eq!(
            text,
            case["chat_text"].as_str().unwrap(),
            "chat template of {prompt:?}"
        );
        let ids = model.chat_prompt(&[Message::user(prompt)], None).unwrap();
        let want_ids: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, want_ids, "token ids of {prompt:?}");

        // Forward pass: the 40 largest logits and the log-sum-exp, computed as a prompt
        // (dense) and as a decoding step after the rest of the prompt (quantized blocks).
        let (head, last) = ids.split_at(ids.len() - 1);
        check_logits(
            &last_logits(model, &ids),
            case,
            &format!("{fixture} prompt"),
            tol,
        );
        check_logits(
            &logits_after(model, head, last),
            case,
            &format!("{fixture} decode"),
            tol,
        );

        // Greedy continuation with the KV cache.
        let want_greedy: Vec<u32> = case["greedy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let req = GenerateRequest {
            prompt_ids: ids.clone(),
            max_tokens: want_greedy.len(),
            sampling: SamplingParams::greedy(),
            stop: vec![],
            top_logprobs: 0,
        };
        let g = model.generate(&req, |_| true).unwrap();
        let n = g.ids.len().min(want_greedy.len());
        assert_eq!(&g.ids[..n], &want_greedy[..n], "greedy ids of {prompt:?}");
        if g.finish == FinishReason::Stop {
            assert_eq!(g.text, case["greedy_text"].as_str().unwrap());
        } else {
            assert_eq!(
                n,
                want_greedy.len(),
                "generation ended early: {:?}",
                g.finish
            );
        }
    }
}

/// The fixture's 40 largest logits and log-sum-exp against `logits`, within `tol`.
fn check_logits(logits: &[f32], case: &serde_json::Value, what: &str, tol: f32) {
    let prompt = case["prompt"].as_str().unwrap();
    let mut max_err = 0f32;
    for pair in case["last_logits_top"].as_array().unwrap() {
        let (id, want) = (
            pair[0].as_u64().unwrap() as usize,
            pair[1].as_f64().unwrap() as f32,
        );
        max_err = max_err.max((logits[id] - want).abs());
    }
    let lse = clawrl_model::sampling::log_sum_exp(logits);
    let lse_err = (lse - case["last_logsumexp"].as_f64().unwrap() as f32).abs();
    eprintln!(
        "{what} {prompt:?}: max top-40 logit error {max_err:.5}, logsumexp error {lse_err:.5}"
    );
    assert!(
        max_err < tol,
        "{what} {prompt:?}: top-40 logits differ by up to {max_err}"
    );
    assert!(
        lse_err < tol,
        "{what} {prompt:?}: logsumexp differs by {lse_err}"
    );
}

#[test]
fn smollm2_matches_reference() {
    check_model(common::smollm2(), "reference-smollm2.json", LOGIT_TOL);
}

#[test]
fn qwen25_matches_reference() {
    check_model(
        common::qwen25(),
        "reference-qwen2.5-coder-0.5b.json",
        LOGIT_TOL,
    );
}

#[test]
fn sampled_logprobs_equal_teacher_forced_scores() {
    let model = common::smollm2();
    let ids = model
        .chat_prompt(&[Message::user("Tell me a fact about owls.")], None)
        .unwrap();
    let req = GenerateRequest {
        prompt_ids: ids.clone(),
        max_tokens: 12,
        sampling: SamplingParams {
            temperature: 0.9,
            top_p: 0.9,
            top_k: 40,
            seed: Some(5),
        },
        stop: vec![],
        top_logprobs: 0,
    };
    let g = model.generate(&req, |_| true).unwrap();
    assert_eq!(g.ids.len(), g.logprobs.len());
    let scored = model.score(&ids, &g.ids, None).unwrap();
    assert_eq!(scored.len(), g.ids.len());
    for (i, (a, b)) in g.logprobs.iter().zip(&scored).enumerate() {
        assert!(*a <= 0.0, "log-probabilities are never positive");
        assert!(
            (a - b).abs() < 1e-3,
            "token {i}: sampled log-prob {a} vs scored {b}"
        );
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_seeds_differ() {
    let model = common::smollm2();
    let ids = model
        .chat_prompt(&[Message::user("Write a word.")], None)
        .unwrap();
    let run = |seed| {
        let req = GenerateRequest {
            prompt_ids: ids.clone(),
            max_tokens: 10,
            sampling: SamplingParams {
                temperature: 1.5,
                top_p: 1.0,
                top_k: 0,
                seed: Some(seed),
            },
            stop: vec![],
            top_logprobs: 0,
        };
        model.generate(&req, |_| true).unwrap().ids
    };
    assert_eq!(run(1), run(1));
    assert!(
        (2..6).any(|s| run(s) != run(1)),
        "different seeds should give different samples at temperature 1.5"
    );
}

#[test]
fn stop_strings_cut_the_text_and_streaming_never_shows_them() {
    let model = common::smollm2();
    let ids = model
        .chat_prompt(&[Message::user("What is 2+2?")], None)
        .unwrap();
    let full = model
        .generate(
            &GenerateRequest {
                prompt_ids: ids.clone(),
                max_tokens: 20,
                sampling: SamplingParams::greedy(),
                stop: vec![],
                top_logprobs: 0,
            },
            |_| true,
        )
        .unwrap();
    // Stop at the second word of the greedy reply.
    let stop = full.text.split_whitespace().nth(1).unwrap().to_string();
    let mut streamed = String::new();
    let g = model
        .generate(
            &GenerateRequest {
                prompt_ids: ids,
                max_tokens: 20,
                sampling: SamplingParams::greedy(),
                stop: vec![stop.clone()],
                top_logprobs: 0,
            },
            |p| {
                streamed.push_str(p);
                true
            },
        )
        .unwrap();
    assert_eq!(g.finish, FinishReason::Stop);
    assert!(
        !g.text.contains(&stop),
        "{:?} still contains {stop:?}",
        g.text
    );
    assert!(full.text.starts_with(&g.text));
    assert_eq!(
        streamed, g.text,
        "the stream delivers exactly the final text"
    );
}

#[test]
fn a_prompt_longer_than_the_context_is_a_clear_error() {
    let model = common::smollm2();
    let ids = vec![100u32; model.config.context_length + 5];
    let err = model
        .generate(
            &GenerateRequest {
                prompt_ids: ids,
                max_tokens: 4,
                sampling: SamplingParams::greedy(),
                stop: vec![],
                top_logprobs: 0,
            },
            |_| true,
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("{} tokens", model.config.context_length + 5))
            && err.contains("8192"),
        "{err}"
    );
}

#[test]
fn the_quantized_blocks_alone_match_the_reference() {
    // Prompts too go through the quantized kernels here (no dense copy is kept).
    // The embedding too: its rows are dequantized as tokens are looked up.
    let blocks = common::load(common::SMOLLM2, DType::F32, WeightMode::Blocks);
    assert!(blocks.transformer.embed.is_none());
    check_model(&blocks, "reference-smollm2.json", LOGIT_TOL);
    // The default judge's model as the judge loads it (judge.weights = "blocks").
    let blocks = common::load(common::QWEN25, DType::F32, WeightMode::Blocks);
    assert!(blocks.transformer.embed.is_none());
    check_model(&blocks, "reference-qwen2.5-coder-0.5b.json", LOGIT_TOL);
    // Its Q5_0 projections stay as the file stores them (widened to Q8_0 they hold 55 % more);
    // the prompts and the greedy decoding above ran on them.
    let q5_0 = blocks
        .transformer
        .layers
        .iter()
        .flat_map(|l| {
            [
                &l.attn.q_proj,
                &l.attn.k_proj,
                &l.mlp.gate_proj,
                &l.mlp.down_proj,
            ]
        })
        .filter(|p| matches!(&p.weight, LinearWeight::Blocks(b) if b.matrix.ty == GgmlType::Q5_0))
        .count();
    assert!(q5_0 > 0, "Qwen2.5's Q5_0 projections are kept as Q5_0");
    let widened = common::qwen25();
    let kept_bytes = |m: &LoadedModel| {
        m.transformer
            .layers
            .iter()
            .flat_map(|l| [&l.attn.q_proj, &l.mlp.gate_proj])
            .map(|p| match (&p.weight, &p.decode_blocks) {
                (LinearWeight::Blocks(b), _) | (_, Some(b)) => b.matrix.byte_len(),
                _ => 0,
            })
            .sum::<usize>()
    };
    assert!(
        kept_bytes(&blocks) < kept_bytes(widened),
        "blocks alone keep fewer bytes than the widened decoding blocks: {} vs {}",
        kept_bytes(&blocks),
        kept_bytes(widened)
    );
}

#[test]
fn f16_weights_keep_the_greedy_answer() {
    let model = common::load(common::SMOLLM2, DType::F16, WeightMode::Dense);
    let ids = model
        .chat_prompt(&[Message::user("What is 2+2?")], None)
        .unwrap();
    let g = model
        .generate(
            &GenerateRequest {
                prompt_ids: ids,
                max_tokens: 16,
                sampling: SamplingParams::greedy(),
                stop: vec![],
                top_logprobs: 0,
            },
            |_| true,
        )
        .unwrap();
    assert!(g.text.contains('4'), "f16 reply: {:?}", g.text);
}

#[test]
fn option_scores_after_one_shared_prefill_equal_teacher_forced_scores() {
    // What the judge's direct mode reads: prompt + option tokenized as a whole.
    let m = common::smollm2();
    let chat = [Message::user("Was the reply good? Answer in a box.")];
    let seqs: Vec<Vec<u32>> = ["1}", "0}", "-1}"]
        .iter()
        .map(|o| {
            m.chat_prompt_continuing(&chat, None, &format!("\\boxed{{{o}"))
                .unwrap()
        })
        .collect();
    let (lps, context, cache) = m.sequence_logprobs(&seqs, None).unwrap();
    assert_eq!(cache.len(), context.len());
    assert!(seqs.iter().all(|s| s.starts_with(&context)));
    for (seq, lp) in seqs.iter().zip(&lps) {
        let reference: f32 = m
            .score(&context, &seq[context.len()..], None)
            .unwrap()
            .iter()
            .sum();
        assert!((lp - reference).abs() < 1e-3, "{lp} vs {reference}");
        assert!(*lp < 0.0);
    }
    // A warm prefix cache (even one longer than the shared prefix) gives the same scores.
    let (again, _, _) = m.sequence_logprobs(&seqs, Some(cache)).unwrap();
    for (a, b) in lps.iter().zip(&again) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    assert!(m.sequence_logprobs(&[], None).is_err());
}

#[test]
fn the_teacher_scores_the_students_exact_tokens_after_the_hinted_prompt() {
    use clawrl_core::config::HintPlacement;
    use clawrl_core::judge::teacher::{hinted_text, teacher_context};
    let m = common::smollm2();
    let messages = [
        Message::system("Be brief."),
        Message::user("How far is 5 miles?"),
    ];
    // Token ids a re-tokenization of their text would not give back (" About" split in two).
    let mut response = m.tokenizer.encode(" Ab").unwrap();
    response.extend(m.tokenizer.encode("out 8 km.").unwrap());
    assert_ne!(
        m.tokenizer
            .encode(&m.tokenizer.decode(&response).unwrap())
            .unwrap(),
        response
    );

    let hint = "Answer in kilometres.";
    let placement = HintPlacement::Before;
    let ctx = teacher_context(m, &messages, None, hint, placement, &response).unwrap();
    assert_eq!(
        ctx.response(),
        &response[..],
        "the student's ids, unchanged"
    );
    let prompt_text = m.tokenizer.decode(ctx.prompt()).unwrap();
    assert!(
        prompt_text.contains(&hinted_text("How far is 5 miles?", hint, placement)),
        "{prompt_text}"
    );
    assert!(
        prompt_text.trim_end().ends_with("assistant"),
        "generation prompt on: {prompt_text}"
    );
    // The student's own context differs only by the hint.
    let student = m.chat_prompt(&messages, None).unwrap();
    assert!(ctx.prompt().len() > student.len());
    let teacher_logps = m.score(ctx.prompt(), ctx.response(), None).unwrap();
    assert_eq!(teacher_logps.len(), response.len());
}

#[test]
fn streams_decoded_together_equal_streams_decoded_alone() {
    let model = common::smollm2();
    // Different lengths; the long one's cache grows past its first capacity (256) mid-reply.
    let long = "Tell me about the sea. ".repeat(37);
    // Four on one version: a whole group for the 4-row kernels.
    let prompts = [
        "Name a planet.",
        long.as_str(),
        "What is 2+2?",
        "Write a haiku.",
    ];
    let request = |p: &str| GenerateRequest {
        prompt_ids: model.chat_prompt(&[Message::user(p)], None).unwrap(),
        max_tokens: 12,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        top_logprobs: 0,
    };
    let lens: Vec<usize> = prompts
        .iter()
        .map(|p| request(p).prompt_ids.len())
        .collect();
    assert!(
        lens[1] < 256 && lens[1] + 12 > 256,
        "prompt lengths {lens:?}"
    );
    let alone: Vec<_> = prompts
        .iter()
        .map(|p| model.generate(&request(p), |_| true).unwrap())
        .collect();
    let mut streams: Vec<_> = prompts
        .iter()
        .map(|p| model.start_decoding(&request(p), None, None).unwrap())
        .collect();
    for _ in 0..12 {
        for d in streams.iter_mut() {
            model.decode_step(d).unwrap();
        }
        let before: Vec<usize> = streams.iter().map(|d| d.cache.len()).collect();
        let mut refs: Vec<&mut Decoding> = streams.iter_mut().collect();
        model.feed_batch(&mut refs);
        for (d, n) in streams.iter().zip(before) {
            if !d.done {
                assert_eq!(d.cache.len(), n + 1, "fed in the batch");
            }
        }
    }
    for (together, alone) in streams.iter().zip(&alone) {
        assert_eq!(together.out.ids, alone.ids);
        for (a, b) in together.out.logprobs.iter().zip(&alone.logprobs) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
}

#[test]
fn serving_copies_of_an_adapter_decode_like_the_adapter_itself() {
    let model = common::smollm2();
    let adapter = common::random_adapter(model, 8, 5);
    let request = GenerateRequest {
        prompt_ids: model
            .chat_prompt(&[Message::user("Name a planet.")], None)
            .unwrap(),
        max_tokens: 12,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        top_logprobs: 0,
    };
    let decode = |adapter: Option<clawrl_model::LoraAdapter>| {
        let mut d = model
            .start_decoding(&request, None, adapter.map(std::sync::Arc::new))
            .unwrap();
        while !d.done {
            model.decode_step(&mut d).unwrap();
        }
        d.out
    };
    // The update on plain vectors (what the engine serves) against the update as tensor ops
    // on the same (f16-rounded) matrices: equal but for summation order.
    let serving = adapter.for_serving();
    let served = decode(Some(serving.clone()));
    let tensors = decode(Some(serving.frozen()));
    let base = decode(None);
    assert_eq!(served.ids, tensors.ids);
    for (a, b) in served.logprobs.iter().zip(&tensors.logprobs) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    // Against the unrounded adapter: within the tolerance the model's fixtures use.
    let exact = decode(Some(adapter.frozen()));
    assert_eq!(served.ids, exact.ids);
    for (a, b) in served.logprobs.iter().zip(&exact.logprobs) {
        assert!((a - b).abs() < 1e-3, "{a} vs {b}");
    }
    assert!(
        served
            .logprobs
            .iter()
            .zip(&base.logprobs)
            .any(|(a, b)| (a - b).abs() > 1e-3),
        "the adapter changes the log-probs"
    );
}

#[test]
fn an_f16_kv_cache_matches_the_reference() {
    // Keys and values rounded to f16 (`model.kv_cache = "f16"`): the prompt, the decoding
    // step after it, and the greedy continuation against the same fixtures and tolerance.
    for (id, fixture) in [
        (common::SMOLLM2, "reference-smollm2.json"),
        (common::QWEN25, "reference-qwen2.5-coder-0.5b.json"),
    ] {
        let mut model = common::load(id, DType::F32, WeightMode::Both);
        model.transformer.kv_dtype = clawrl_model::KvDtype::F16;
        assert_eq!(
            model.transformer.new_cache().dtype(),
            clawrl_model::KvDtype::F16
        );
        check_model(&model, fixture, F16_CACHE_TOL);
    }
}
