//! The fuzz targets' kept inputs, on stable and in every test run: each seed and each input a
//! fuzzer found (`fuzz/corpus/TARGET`, `fuzz/regressions/TARGET`) goes through the target's
//! own body (`fuzz/src/lib.rs`) and must come back with a value, not a panic. Seeds must reach
//! the end of their path (a prompt tokenized, a model built), so that they keep the fuzzers
//! starting deep; a seed named `seed-parsed-*` is meant to stop after parsing.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod fuzz;

use fuzz::Reached;
use std::path::{Path, PathBuf};

type Target = fn(&[u8]) -> Reached;

const TARGETS: [(&str, Target); 4] = [
    ("chat_request", fuzz::chat_request),
    ("chat_template", fuzz::chat_template),
    ("gguf", fuzz::gguf),
    ("safetensors", fuzz::safetensors),
];

fn kept_inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files: Vec<PathBuf> = ["corpus", "regressions"]
        .iter()
        .filter_map(|kind| std::fs::read_dir(root.join(kind).join(target)).ok())
        .flatten()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

#[test]
fn every_kept_fuzz_input_ends_in_a_value_and_seeds_reach_the_end() {
    for (target, run) in TARGETS {
        let files = kept_inputs(target);
        let seeds = files
            .iter()
            .filter(|f| {
                f.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("seed-")
            })
            .count();
        assert!(seeds > 0, "{target}: no seeds in fuzz/corpus/{target}");
        for file in &files {
            let data = std::fs::read(file).unwrap();
            let reached = std::panic::catch_unwind(|| run(&data))
                .unwrap_or_else(|_| panic!("{target} panicked on {}", file.display()));
            let name = file.file_name().unwrap().to_string_lossy();
            if name.starts_with("seed-parsed-") {
                assert_eq!(reached, Reached::Parsed, "{}", file.display());
            } else if name.starts_with("seed-") {
                assert_eq!(reached, Reached::End, "{}", file.display());
            }
        }
        eprintln!("{target}: {} kept inputs, {seeds} seeds", files.len());
    }
}
