//! The `clawrl-tui` binary as a user runs it: help, generate, and clear errors for bad input.

mod common;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clawrl-tui"))
        .args(args)
        .output()
        .expect("binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn help_documents_every_subcommand_and_flag() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for word in [
        "generate",
        "fetch-model",
        "models",
        "info",
        "--model",
        "--device",
        "--dtype",
        "--config",
        "--weights",
    ] {
        assert!(help.contains(word), "--help lacks {word}:\n{help}");
    }
    // The lab bench is in the lab build only (`--features lab`).
    assert_eq!(help.contains("bench"), cfg!(feature = "lab"), "{help}");
    let out = run(&["generate", "--help"]);
    let help = text(&out.stdout);
    for word in [
        "--prompt",
        "--max-tokens",
        "--temperature",
        "--top-p",
        "--top-k",
        "--seed",
        "--system",
        "--stop",
        "--model",
    ] {
        assert!(help.contains(word), "generate --help lacks {word}:\n{help}");
    }
}

/// (prompt tokens, decode tokens) from the speed line on stderr.
fn speed(stderr: &str) -> (usize, usize) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("prefill: "))
        .unwrap_or_else(|| panic!("no speed line in {stderr:?}"));
    // prefill: 41 tokens, 85.3 tok/s; decode: 32 tokens, 24.1 tok/s
    let nums: Vec<f64> = line
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter(|s| !s.is_empty() && *s != ".")
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(nums.len(), 4, "{line}");
    assert!(
        line.contains(" tokens, ") && line.contains(" tok/s; decode: ") && line.ends_with(" tok/s"),
        "{line}"
    );
    assert!(nums[1] > 0.0, "{line}");
    (nums[0] as usize, nums[2] as usize)
}

#[test]
fn generate_prints_the_reply_and_its_speed() {
    common::model_path(common::SMOLLM2);
    let out = run(&[
        "generate",
        "--prompt",
        "What is 2+2?",
        "--max-tokens",
        "32",
        "--temperature",
        "0",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reply = text(&out.stdout);
    assert!(reply.contains('4'), "reply: {reply:?}");
    let (prompt, decoded) = speed(&text(&out.stderr));
    assert_eq!(
        prompt, 37,
        "the fixture's prompt for this question is 37 tokens"
    );
    assert!(decoded <= 32);

    let out = run(&[
        "generate",
        "--prompt",
        "What is 2+2?",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "--system",
        "Be terse.",
    ]);
    let (prompt_with_system, decoded) = speed(&text(&out.stderr));
    assert!(
        prompt_with_system < prompt,
        "a short --system replaces the long default system prompt"
    );
    assert!(decoded <= 4);
}

#[test]
fn every_weight_mode_and_kernel_path_gives_the_same_greedy_reply() {
    let generate = |weights: &str, kernels: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_clawrl-tui"));
        cmd.args([
            "generate",
            "--prompt",
            "Name three colours.",
            "--max-tokens",
            "24",
        ])
        .args(["--temperature", "0", "--weights", weights])
        .env("CLAWRL__TRAIN__ENABLED", "false");
        if let Some(k) = kernels {
            cmd.env("CLAWRL_KERNELS", k);
        }
        let out = cmd.output().expect("binary runs");
        assert!(out.status.success(), "{weights}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let dense = generate("dense", None);
    assert!(dense.trim().len() > 10, "reply: {dense:?}");
    // The quantized kernels compute the dequantized matrix's own product, so greedy decoding
    // picks the same tokens: on the SIMD kernels and on the portable ones.
    // Each instruction set the CPU lacks falls back to the best one it has.
    for (weights, kernels) in [
        ("both", None),
        ("blocks", None),
        ("both", Some("portable")),
        ("blocks", Some("portable")),
        ("both", Some("avx2")),
        ("both", Some("avx512")),
    ] {
        assert_eq!(generate(weights, kernels), dense, "{weights} {kernels:?}");
    }
}

#[test]
fn seeded_sampling_from_the_command_line_is_reproducible() {
    let args = [
        "generate",
        "--prompt",
        "Tell me a story.",
        "--max-tokens",
        "12",
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--top-k",
        "50",
        "--seed",
        "11",
    ];
    let a = run(&args);
    let b = run(&args);
    assert!(a.status.success(), "{}", text(&a.stderr));
    assert_eq!(text(&a.stdout), text(&b.stdout));
}

#[test]
fn corrupt_and_missing_model_files_give_specific_errors() {
    let dir = tempfile::tempdir().unwrap();
    // A truncated copy of the real model.
    let real = std::fs::read(common::model_path(common::SMOLLM2)).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &real[..real.len() / 3]).unwrap();
    let out = run(&[
        "--model",
        truncated.to_str().unwrap(),
        "generate",
        "--prompt",
        "hi",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("truncated") && err.contains("truncated.gguf"),
        "{err}"
    );

    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a model at all").unwrap();
    let err = text(
        &run(&[
            "--model",
            garbage.to_str().unwrap(),
            "generate",
            "--prompt",
            "hi",
        ])
        .stderr,
    );
    assert!(
        err.contains("not a valid GGUF file") && err.contains("bad magic"),
        "{err}"
    );

    let err = text(
        &run(&[
            "--model",
            "/nonexistent/model.gguf",
            "generate",
            "--prompt",
            "hi",
        ])
        .stderr,
    );
    assert!(
        err.contains("neither an existing path nor a known model id")
            && err.contains("smollm2-135m-instruct"),
        "{err}"
    );

    // A Hugging Face directory without a tokenizer.
    let err = text(
        &run(&[
            "--model",
            common::fixture("tiny-qwen3").to_str().unwrap(),
            "generate",
            "--prompt",
            "hi",
        ])
        .stderr,
    );
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn bad_configuration_is_reported_with_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, "[generation]\ntemperatur = 0.5\n").unwrap();
    let out = run(&["--config", cfg.to_str().unwrap(), "models"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("temperatur"),
        "{}",
        text(&out.stderr)
    );

    std::fs::write(&cfg, "[generation]\ntemperature = 0.5\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_clawrl-tui"))
        .args(["--config", cfg.to_str().unwrap(), "models"])
        .env("CLAWRL__MODEL__DTYPE", "f8")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("f8"), "{}", text(&out.stderr));

    let out = run(&["--config", cfg.to_str().unwrap(), "models"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("smollm2-135m-instruct"));
}

#[test]
fn a_sim_refuses_the_folder_of_an_earlier_run_and_leaves_its_store_alone() {
    // An interrupted run leaves its store in <out>/data; a new run there would start from
    // that run's turns and versions instead of the base model.
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("data").join("clawrl.sqlite");
    std::fs::create_dir_all(store.parent().unwrap()).unwrap();
    std::fs::write(&store, b"an earlier run's turns").unwrap();
    let out = run(&[
        "sim",
        "--preference",
        "concise",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("holds the store of an earlier run") && err.contains("data"),
        "{err}"
    );
    assert_eq!(std::fs::read(&store).unwrap(), b"an earlier run's turns");
}

#[test]
fn devices_this_build_cannot_use_are_refused_with_the_way_to_get_them() {
    let out = run(&["--device", "tpu", "info"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("expected auto, cpu, cuda or wgpu"),
        "{}",
        text(&out.stderr)
    );
    if cfg!(feature = "lab") {
        let out = run(&["bench", "--variants", "f32@tpu", "--runs", "1"]);
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("unknown device \"tpu\""),
            "{}",
            text(&out.stderr)
        );
    }
    if !cfg!(feature = "wgpu") {
        let out = run(&[
            "--device",
            "wgpu",
            "generate",
            "--prompt",
            "Hi",
            "--max-tokens",
            "1",
        ]);
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("--features wgpu"),
            "{}",
            text(&out.stderr)
        );
    }
}

#[test]
fn the_chat_subcommand_chats_on_stdin() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_clawrl-tui"))
        .arg("chat")
        .env("CLAWRL__GENERATION__TEMPERATURE", "0")
        .env("CLAWRL__GENERATION__MAX_TOKENS", "24")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is 2+2?\n/reset\nWhat is the capital of France?\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.to_lowercase().contains("smollm2") && stdout.contains("30 layers"),
        "model summary first: {stdout}"
    );
    assert!(
        stdout.contains('4') && stdout.contains("Paris"),
        "both questions answered: {stdout}"
    );
    assert_eq!(
        text(&out.stderr).matches("prefill: ").count(),
        2,
        "one speed line per reply"
    );
}

#[test]
fn bad_judge_settings_stop_the_server_at_start_with_the_key_named() {
    let data = tempfile::tempdir().unwrap();
    let model = common::model_path(common::SMOLLM2);
    let serve = |env: &[(&str, &str)]| {
        let out = common::server::serve_command(&model, data.path(), env)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{env:?} must be refused");
        text(&out.stderr)
    };
    let err = serve(&[("CLAWRL__JUDGE__BACKEND", "openai")]);
    assert!(err.contains("judge.openai.model"), "{err}");
    let openai = [
        ("CLAWRL__JUDGE__BACKEND", "openai"),
        ("CLAWRL__JUDGE__OPENAI__MODEL", "big"),
    ];
    let err = serve(&[openai[0], openai[1], ("CLAWRL__JUDGE__MODE", "direct")]);
    assert!(
        err.contains("judge.mode") && err.contains("reason"),
        "{err}"
    );
    let err = serve(&[
        openai[0],
        openai[1],
        ("CLAWRL__JUDGE__OPENAI__BASE_URL", "ftp://example.com/v1"),
    ]);
    assert!(
        err.contains("judge.openai.base_url") && err.contains("http:// or https://"),
        "{err}"
    );
    let err = serve(&[("CLAWRL__JUDGE__PROMPTS_DIR", "/nonexistent")]);
    assert!(
        err.contains("prm_system.md") && err.contains("judge.prompts_dir"),
        "{err}"
    );
    let err = serve(&[("CLAWRL__JUDGE__VOTES", "0")]);
    assert!(err.contains("judge.votes"), "{err}");
    let err = serve(&[("CLAWRL__JUDGE__MODEL", "no-such-judge")]);
    assert!(
        err.contains("judge.model") && err.contains("no-such-judge"),
        "{err}"
    );
}

#[test]
fn ctl_takes_its_flags_after_the_subcommand_and_speaks_https() {
    // A port that accepts and says nothing back: where ctl's request goes is in its error.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in listener.incoming() {
            drop(c);
        }
    });
    for (scheme, tls) in [("http", false), ("https", true)] {
        let url = format!("{scheme}://127.0.0.1:{port}");
        let out = run(&[
            "ctl",
            "rollback",
            "0",
            "--url",
            &url,
            "--api-key",
            "k",
            "--json",
        ]);
        let err = text(&out.stderr);
        assert!(!out.status.success());
        assert!(!err.contains("unexpected argument"), "{err}");
        assert!(
            err.contains(&format!("cannot reach 127.0.0.1:{port}")),
            "{err}"
        );
        assert_eq!(err.contains("TLS: tls handshake"), tls, "{scheme}: {err}");
    }
}

#[test]
fn serving_beyond_loopback_without_a_key_warns() {
    use std::io::{BufRead, BufReader};
    let data = tempfile::tempdir().unwrap();
    let model = common::model_path(common::SMOLLM2);
    let mut child = Command::new(env!("CARGO_BIN_EXE_clawrl-tui"))
        .args(["--model", model.to_str().unwrap(), "serve", "--headless"])
        .args(["--host", "0.0.0.0", "--port", "0"])
        .env("CLAWRL_DATA_DIR", data.path())
        .env("CLAWRL__JUDGE__BACKEND", "off")
        .env("CLAWRL__TRAIN__ENABLED", "false")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let serving = lines.next().unwrap().unwrap();
    let warning = lines.next().unwrap().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300)); // the log writer's thread
    let _ = child.kill();
    let _ = child.wait();
    assert!(serving.contains("serving"), "{serving}");
    assert!(
        warning.contains("warning: listening on 0.0.0.0:") && warning.contains("server.api_key"),
        "{warning}"
    );
    let log = std::fs::read_dir(data.path().join("logs"))
        .unwrap()
        .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
        .collect::<String>();
    assert!(log.contains("without an API key"), "and in the log: {log}");
}

#[test]
#[cfg(feature = "lab")]
fn bench_kernels_measures_every_type_row_count_and_instruction_set() {
    use clawrl_model::kernels::{Isa, SIMD_TYPES};
    let out = run(&["bench", "--kernels", "--runs", "1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    // Every run names the machine it measured.
    let cpu = stdout.lines().next().unwrap_or_default();
    assert!(
        cpu.starts_with("cpu: ") && cpu.ends_with(" cores"),
        "{stdout}"
    );
    assert_eq!(
        cpu.contains("avx2"),
        Isa::supported()
            .into_iter()
            .any(|i| i.name().starts_with("avx")),
        "{stdout}"
    );
    for ty in SIMD_TYPES {
        for rows in ["1", "4"] {
            for isa in Isa::supported() {
                let line = stdout
                    .lines()
                    .find(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        f.len() == 7
                            && f[0] == format!("{ty:?}")
                            && f[1] == rows
                            && f[2] == isa.name()
                    })
                    .unwrap_or_else(|| panic!("no {ty:?} {rows} {} row in:\n{stdout}", isa.name()));
                let f: Vec<&str> = line.split_whitespace().collect();
                let ns: f64 = f[3].parse().unwrap();
                assert!(ns > 0.0 && ns.is_finite(), "{line}");
                // The portable kernel is the baseline of its own row count.
                if isa == Isa::Portable {
                    assert_eq!(f[5], "1.00x", "{line}");
                }
                assert_eq!(f[6] == "—", rows == "1", "{line}");
            }
        }
    }
}
