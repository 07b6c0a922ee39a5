//! The Qwen3 path (per-head QK RMSNorm, head_dim ≠ hidden/heads, untied head) and the Hugging
//! Face directory loader (two safetensors shards, F32 and F16 tensors), against an independent
//! float64 numpy forward pass (tests/reference/gen_tiny_qwen3.py).

mod common;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use clawrl_tui::model::weights::WeightFile;
use clawrl_tui::model::{Family, Transformer, WeightMode};

fn run(dtype: DType) -> (Vec<f32>, Vec<f32>) {
    let (file, cfg) = WeightFile::open(&common::fixture("tiny-qwen3")).unwrap();
    assert_eq!(cfg.family, Family::Qwen3);
    assert_eq!((cfg.head_dim, cfg.num_heads, cfg.hidden_size), (16, 4, 48));
    let device = Device::flex();
    let model = Transformer::load(&file, cfg, &device, dtype, WeightMode::Dense).unwrap();
    let fx = common::read_json("tiny-qwen3-reference.json");
    let ids: Vec<i64> = fx["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let want: Vec<f32> = fx["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
        })
        .collect();
    let n = ids.len();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
    let hidden = model.forward(tokens, &mut model.new_cache());
    let h = hidden.dims()[2];
    let got = model
        .logits(hidden.reshape([n, h]))
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    (got, want)
}

#[test]
fn qwen3_logits_match_numpy_reference_in_f32() {
    let (got, want) = run(DType::F32);
    let max_err = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0f32, f32::max);
    // f32 against float64 over two layers of width 48: errors are ~1e-6; 1e-4 leaves headroom.
    assert!(max_err < 1e-4, "max |logit difference| {max_err}");
}

#[test]
fn qwen3_logits_match_numpy_reference_in_f16() {
    let (got, want) = run(DType::F16);
    let max_err = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0f32, f32::max);
    // f16 activations carry ~3 significant digits; logits here reach |4.3|.
    assert!(max_err < 0.05, "max |logit difference| {max_err}");
}

#[test]
fn kv_cache_decoding_equals_the_full_forward_pass() {
    let (file, cfg) = WeightFile::open(&common::fixture("tiny-qwen3")).unwrap();
    let device = Device::flex();
    let model = Transformer::load(&file, cfg, &device, DType::F32, WeightMode::Dense).unwrap();
    let fx = common::read_json("tiny-qwen3-reference.json");
    let ids: Vec<i64> = fx["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let mut cache = model.new_cache();
    // Prefill 4 tokens, then feed the rest one at a time.
    let mut rows = Vec::new();
    let prefill = Tensor::<2, Int>::from_data(TensorData::new(ids[..4].to_vec(), [1, 4]), &device);
    let h = model.forward(prefill, &mut cache);
    rows.push(h.narrow(1, 3, 1).reshape([1, 48]));
    for &id in &ids[4..] {
        let t = Tensor::<2, Int>::from_data(TensorData::new(vec![id], [1, 1]), &device);
        rows.push(model.forward(t, &mut cache).reshape([1, 48]));
    }
    assert_eq!(cache.len(), ids.len());
    let got = model
        .logits(Tensor::cat(rows, 0))
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    let want: Vec<f32> = fx["logits"].as_array().unwrap()[3..]
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
        })
        .collect();
    let max_err = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0f32, f32::max);
    assert!(
        max_err < 1e-4,
        "cached decoding differs from the reference by {max_err}"
    );
}
