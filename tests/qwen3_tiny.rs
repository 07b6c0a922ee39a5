//! The Qwen3 path (per-head QK RMSNorm, head_dim ≠ hidden/heads, untied head) and the Hugging
//! Face directory loader (two safetensors shards, F32 and F16 tensors), against an independent
//! float64 numpy forward pass (tests/reference/gen_tiny_qwen3.py).

mod common;
use burn::tensor::{DType, Int, Tensor, TensorData};
use clawrl_model::weights::WeightFile;
use clawrl_model::{Family, Transformer, WeightMode};

/// The tiny checkpoint, loaded in `dtype`.
fn load(dtype: DType) -> Transformer {
    let (file, cfg) = WeightFile::open(&common::fixture("tiny-qwen3")).unwrap();
    assert_eq!(cfg.family, Family::Qwen3);
    assert_eq!((cfg.head_dim, cfg.num_heads, cfg.hidden_size), (16, 4, 48));
    Transformer::load(&file, cfg, &common::test_device(), dtype, WeightMode::Dense).unwrap()
}

/// The reference input ids, and its logits from position `from` on (rows flattened).
fn reference(from: usize) -> (Vec<i64>, Vec<f32>) {
    let fx = common::read_json("tiny-qwen3-reference.json");
    let ids = fx["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let logits = fx["logits"].as_array().unwrap()[from..]
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
        })
        .collect();
    (ids, logits)
}

fn tokens(ids: &[i64]) -> Tensor<2, Int> {
    Tensor::from_data(
        TensorData::new(ids.to_vec(), [1, ids.len()]),
        &common::test_device(),
    )
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Max |logit difference| of a full forward pass in `dtype` against the reference.
fn full_pass_error(dtype: DType) -> f32 {
    let model = load(dtype);
    let (ids, want) = reference(0);
    let hidden = model.forward(tokens(&ids), &mut model.new_cache(), None);
    let got = model
        .logits(hidden.reshape([ids.len(), 48]))
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    max_abs_diff(&got, &want)
}

#[test]
fn qwen3_logits_match_numpy_reference_in_f32() {
    let max_err = full_pass_error(DType::F32);
    // f32 against float64 over two layers of width 48: errors are ~1e-6; 1e-4 leaves headroom.
    assert!(max_err < 1e-4, "max |logit difference| {max_err}");
}

#[test]
fn qwen3_logits_match_numpy_reference_in_f16() {
    if !common::test_device().supports_dtype(DType::F16) {
        // Some GPUs (and software renderers) have no f16 arithmetic; loading then says so.
        let (file, cfg) = WeightFile::open(&common::fixture("tiny-qwen3")).unwrap();
        let err = Transformer::load(
            &file,
            cfg,
            &common::test_device(),
            DType::F16,
            WeightMode::Dense,
        )
        .expect_err("f16 refused where unsupported");
        assert!(err.to_string().contains("cannot compute in F16"), "{err}");
        return;
    }
    let max_err = full_pass_error(DType::F16);
    // f16 activations carry ~3 significant digits; logits here reach |4.3|.
    assert!(max_err < 0.05, "max |logit difference| {max_err}");
}

#[test]
fn kv_cache_decoding_equals_the_full_forward_pass() {
    let model = load(DType::F32);
    let (ids, want) = reference(3);
    let mut cache = model.new_cache();
    // Prefill 4 tokens, then feed the rest one at a time.
    let mut rows = vec![
        model
            .forward(tokens(&ids[..4]), &mut cache, None)
            .narrow(1, 3, 1)
            .reshape([1, 48]),
    ];
    for id in &ids[4..] {
        rows.push(
            model
                .forward(tokens(std::slice::from_ref(id)), &mut cache, None)
                .reshape([1, 48]),
        );
    }
    assert_eq!(cache.len(), ids.len());
    let got = model
        .logits(Tensor::cat(rows, 0))
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    let max_err = max_abs_diff(&got, &want);
    assert!(
        max_err < 1e-4,
        "cached decoding differs from the reference by {max_err}"
    );
}
