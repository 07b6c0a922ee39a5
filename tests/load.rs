//! Load through the real HTTP API with training on and the judge loading and judging on its own
//! model: 32 streaming clients (the official openai SDK, `tests/clients/load.py`) for 30 s get
//! no error but deliberate 429s, and every turn they saw end is in the store. This is the
//! concurrency under which nested compute helpers once overflowed an engine thread's stack
//! (issue 25; `kernels::team` has the unit test). The 5-minute run reported in
//! docs/RELIABILITY.md is `scripts/load.sh`.

mod common;
use common::server::Server;
use serde_json::Value;
use std::collections::HashSet;

#[test]
fn thirty_two_streaming_clients_get_no_error_but_429_and_lose_no_turn() {
    let judge_model = common::model_path(common::QWEN25);
    let s = Server::start(&[
        ("CLAWRL__TRAIN__ENABLED", "true"),
        ("CLAWRL__JUDGE__BACKEND", "local"),
        ("CLAWRL__JUDGE__MODEL", judge_model.to_str().unwrap()),
    ]);
    let out = s.data.path().join("load.json");
    let run = std::process::Command::new("python3")
        .args([
            "tests/clients/load.py",
            &s.base_url(),
            &s.key,
            "smollm2-135m-instruct",
        ])
        .args(["--clients", "32", "--seconds", "30"])
        .args([
            "--pid",
            &s.child.id().to_string(),
            "--out",
            out.to_str().unwrap(),
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "the load client failed");
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(summary["errors"], 0, "{summary}");
    assert_eq!(summary["feedback_errors"], 0, "{summary}");
    assert!(summary["ok"].as_u64().unwrap() >= 10, "{summary}");
    let stored: HashSet<String> = s
        .export()
        .iter()
        .map(|t| t["response_id"].as_str().unwrap().to_string())
        .collect();
    let acknowledged = summary["acknowledged"].as_array().unwrap();
    let lost: Vec<&Value> = acknowledged
        .iter()
        .filter(|id| !stored.contains(id.as_str().unwrap()))
        .collect();
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
    assert_eq!(s.metric("clawrl_active_sequences"), 0.0);
    // The judge's engine loaded beside the busy server and judges turns (given the CPU once
    // the clients stop, if not before).
    let t = std::time::Instant::now();
    while !s.export().iter().any(|t| t["judge_status"] == "judged") {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(180),
            "no turn judged 180 s after the load: {}",
            s.admin_status()
        );
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
