//! Our dequantization of every supported GGML type against the PyPI `gguf` package's
//! (fixtures from tests/reference/gen_dequant.py: random blocks and real rows of both models).

mod common;
use clawrl_model::quant::{GgmlType, dequantize};

fn ggml_type(name: &str) -> GgmlType {
    let id = match name {
        "F32" => 0,
        "F16" => 1,
        "Q4_0" => 2,
        "Q4_1" => 3,
        "Q5_0" => 6,
        "Q8_0" => 8,
        "Q4_K" => 12,
        "Q6_K" => 14,
        "BF16" => 30,
        other => panic!("fixture type {other}"),
    };
    GgmlType::from_id(id).unwrap()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn every_type_matches_the_gguf_package() {
    let fx = common::read_json("dequant.json");
    let mut types = std::collections::BTreeSet::new();
    for case in fx["cases"].as_array().unwrap() {
        let ty = ggml_type(case["type"].as_str().unwrap());
        let n = case["n"].as_u64().unwrap() as usize;
        let got = dequantize(ty, &hex(case["hex"].as_str().unwrap()), n).unwrap();
        let want: Vec<f32> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // Both sides compute in f32 from the same f16 scales: equal up to rounding order.
            assert!(
                (g - w).abs() <= 1e-6 + 1e-6 * w.abs(),
                "{} {:?} value {i}: got {g}, gguf says {w}",
                case["source"],
                ty
            );
        }
        types.insert(format!("{ty:?}"));
    }
    assert_eq!(types.len(), 9, "all nine types covered: {types:?}");
}

#[test]
fn truncated_and_misaligned_data_are_errors() {
    let err = dequantize(GgmlType::Q4_K, &[0u8; 100], 256)
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated"), "{err}");
    let err = dequantize(GgmlType::Q8_0, &[0u8; 34], 33)
        .unwrap_err()
        .to_string();
    assert!(err.contains("multiple"), "{err}");
    assert!(
        GgmlType::from_id(13)
            .unwrap_err()
            .to_string()
            .contains("unsupported")
    );
}
