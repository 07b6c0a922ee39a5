//! Adapter files in PEFT's layout: names, shapes and config as PEFT writes them, exact round
//! trips, llama.cpp's q/k row order undone for GGUF `llama` checkpoints, and corrupt or
//! replaced files refused.

mod common;
use burn::tensor::Device;
use clawrl_model::lora::values;
use clawrl_model::weights::WeightFile;
use clawrl_model::{LoraAdapter, LoraConfig, ModelConfig, Target, peft};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::SafeTensors;

fn random(config: &ModelConfig, seed: u64) -> LoraAdapter {
    let mut rng = StdRng::seed_from_u64(seed);
    LoraAdapter::build(
        config,
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: vec![
                Target::QProj,
                Target::KProj,
                Target::VProj,
                Target::DownProj,
            ],
        },
        |_, _, din, dout, r| {
            let a = (0..din * r).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b = (0..r * dout).map(|_| rng.random_range(-1.0..1.0)).collect();
            Ok((a, b))
        },
        &Device::flex(),
    )
    .unwrap()
}

fn same_values(a: &LoraAdapter, b: &LoraAdapter) {
    let pa: Vec<_> = a.pairs().collect();
    let pb: Vec<_> = b.pairs().collect();
    assert_eq!(pa.len(), pb.len());
    for ((la, ta, x), (lb, tb, y)) in pa.into_iter().zip(pb) {
        assert_eq!((la, ta), (lb, tb));
        assert_eq!(values(&x.a.val()), values(&y.a.val()), "A of {la} {ta:?}");
        assert_eq!(values(&x.b.val()), values(&y.b.val()), "B of {la} {ta:?}");
        assert_eq!(x.scale, y.scale);
    }
}

/// SmolLM2's shape, read from its GGUF header (a `llama` file: q/k rows permuted).
fn smollm2_config() -> ModelConfig {
    WeightFile::open(&common::model_path(common::SMOLLM2))
        .unwrap()
        .1
}

#[test]
fn an_adapter_is_written_in_peft_layout_and_read_back_exactly() {
    let config = smollm2_config();
    let adapter = random(&config, 1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1");
    let sha = peft::save(&adapter, &config, "SmolLM2-135M-Instruct", &path).unwrap();
    assert_eq!(sha.len(), 64);

    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path.join(peft::CONFIG_FILE)).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8.0);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "k_proj", "v_proj", "down_proj"])
    );

    let bytes = std::fs::read(path.join(peft::WEIGHTS_FILE)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.names().len(), 30 * 4 * 2);
    let a = st
        .tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        .unwrap();
    assert_eq!(a.shape(), [4, 576], "lora_A is [rank, in]");
    let b = st
        .tensor("base_model.model.model.layers.29.mlp.down_proj.lora_B.weight")
        .unwrap();
    assert_eq!(b.shape(), [576, 4], "lora_B is [out, rank]");

    let back = peft::load(&path, &config, &Device::flex(), Some(&sha)).unwrap();
    same_values(&adapter, &back);
}

#[test]
fn q_and_k_rows_are_exported_in_hugging_face_order() {
    let config = smollm2_config();
    let adapter = random(&config, 2);
    let dir = tempfile::tempdir().unwrap();
    peft::save(&adapter, &config, "m", dir.path()).unwrap();
    let bytes = std::fs::read(dir.path().join(peft::WEIGHTS_FILE)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let exported = |name: &str| -> Vec<f32> {
        let t = st.tensor(name).unwrap();
        t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let hd = config.head_dim;
    for (target, heads) in [
        (Target::QProj, config.num_heads),
        (Target::KProj, config.num_kv_heads),
    ] {
        let ours = values(&adapter.layers[3].get(target).unwrap().b.val()); // [r, out]
        let out = heads * hd;
        let hf = exported(&peft::tensor_name(3, target, 'B')); // [out, r]
        // llama.cpp's convert permutes HF rows with w.reshape(heads, 2, hd/2, ..).swapaxes(1, 2):
        // GGUF row h·hd + 2i + c holds HF row h·hd + c·hd/2 + i.
        for h in 0..heads {
            for i in 0..hd / 2 {
                for c in 0..2 {
                    let gguf_row = h * hd + 2 * i + c;
                    let hf_row = h * hd + c * hd / 2 + i;
                    for k in 0..4 {
                        assert_eq!(hf[hf_row * 4 + k], ours[k * out + gguf_row], "{target:?}");
                    }
                }
            }
        }
    }
    // v is not rotated: its rows are exported as they are.
    let ours = values(&adapter.layers[3].get(Target::VProj).unwrap().b.val());
    let hf = exported(&peft::tensor_name(3, Target::VProj, 'B'));
    let out = config.num_kv_heads * hd;
    assert_eq!(hf[5 * 4 + 2], ours[2 * out + 5]);
}

#[test]
fn a_corrupt_or_replaced_adapter_is_refused_with_the_reason() {
    let (_, config) = WeightFile::open(&common::fixture("tiny-qwen3")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v3");
    let sha = peft::save(&random(&config, 3), &config, "tiny", &path).unwrap();
    let weights = path.join(peft::WEIGHTS_FILE);

    // One flipped byte: the checksum says so.
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&weights, &bytes).unwrap();
    let err = format!(
        "{:#}",
        peft::load(&path, &config, &Device::flex(), Some(&sha)).unwrap_err()
    );
    assert!(err.contains("corrupt") && err.contains(&sha), "{err}");

    // Truncated: not a safetensors file any more.
    std::fs::write(&weights, &bytes[..100]).unwrap();
    let err = format!(
        "{:#}",
        peft::load(&path, &config, &Device::flex(), None).unwrap_err()
    );
    assert!(err.contains("not a valid safetensors file"), "{err}");

    // Missing.
    std::fs::remove_file(&weights).unwrap();
    let err = format!(
        "{:#}",
        peft::load(&path, &config, &Device::flex(), None).unwrap_err()
    );
    assert!(err.contains("cannot read"), "{err}");

    // An adapter for another model shape.
    let other = dir.path().join("other");
    peft::save(
        &random(&smollm2_config(), 4),
        &smollm2_config(),
        "m",
        &other,
    )
    .unwrap();
    let err = format!(
        "{:#}",
        peft::load(&other, &config, &Device::flex(), None).unwrap_err()
    );
    assert!(err.contains("shape"), "{err}");
}

#[test]
fn writing_replaces_a_leftover_folder_and_leaves_no_temporary_files() {
    let (_, config) = WeightFile::open(&common::fixture("tiny-qwen3")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1");
    std::fs::create_dir_all(&path).unwrap();
    std::fs::write(path.join("stale.txt"), "from a crashed attempt").unwrap();
    let first = random(&config, 5);
    let sha = peft::save(&first, &config, "tiny", &path).unwrap();
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["v1"]);
    assert!(!path.join("stale.txt").exists());
    same_values(
        &first,
        &peft::load(&path, &config, &Device::flex(), Some(&sha)).unwrap(),
    );
}
