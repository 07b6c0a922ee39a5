//! `clawrl-tui sim` end to end, short: an in-process clawrl on the default model, a simulated
//! user with a checkable preference, the real judge, trainer and gate; the report, the CSV and
//! the evaluation files; evaluation turns never trained on; rollback to v0 gives back the
//! "before" replies.

mod common;
use std::path::Path;
use std::process::Command;

#[test]
fn a_short_simulated_run_trains_reports_and_rolls_back_to_the_same_replies() {
    common::model_path(common::SMOLLM2);
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_clawrl-tui"))
        .args([
            "sim",
            "--preference",
            "no-lists",
            "--interactions",
            "4",
            "--eval-prompts",
            "3",
            "--max-tokens",
            "48",
            "--settle-secs",
            "180",
            // The user waits for the judge and trainer after each interaction, and the held-out
            // set is checked halfway.
            "--deterministic",
            "--eval-every",
            "2",
            "--out",
        ])
        .arg(out.path())
        // The guard's KL check runs; its degeneration replies (14 greedy generations per
        // candidate) are left out to keep the run short (tests/train.rs runs the whole guard).
        .env("CLAWRL__GATE__REPETITION_TOKENS", "0")
        // The policy's own model judges: no second model to load (tests/judge.rs covers a
        // judge on its own model, the default).
        .env("CLAWRL__JUDGE__MODEL", "''")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");

    let report = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    the_report_is_what_was_printed_and_names_the_judge(&report, &stdout);
    the_files_hold_every_interaction_and_held_out_reply(out.path(), &report);
    evaluation_turns_are_stored_and_never_trained_on(out.path(), &report);
    versions_report_their_rates_and_rollback_restores_the_replies(&report);
}

fn the_report_is_what_was_printed_and_names_the_judge(report: &str, stdout: &str) {
    assert_eq!(
        report.trim_end(),
        stdout
            .lines()
            .take_while(|l| !l.starts_with("- files:"))
            .collect::<Vec<_>>()
            .join("\n")
            .trim_end()
    );
    assert!(
        report.contains("held-out before: ") && report.contains("/3 ("),
        "{report}"
    );
    assert!(report.contains("during the run: "), "{report}");
    // The judge (here the policy's own model) is compared with the user's verdicts on its 4
    // replies (with or without thumbs).
    let agreement = report
        .split("agreed with the user on ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no judge agreement in {report}"));
    let (agreed, of) = agreement.split_once('/').unwrap();
    let (agreed, of): (usize, usize) = (agreed.parse().unwrap(), of.parse().unwrap());
    assert!(
        report.contains("- judge: ") && (1..=4).contains(&of) && agreed <= of,
        "{report}"
    );
}

fn the_files_hold_every_interaction_and_held_out_reply(out: &Path, report: &str) {
    let csv = std::fs::read_to_string(out.join("interactions.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 4, "{csv}");
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r[0], (i + 1).to_string());
        assert!(r[1] == "1" || r[1] == "-1", "{csv}");
    }
    let satisfied = rows.iter().filter(|r| r[1] == "1").count();
    assert!(
        report.contains(&format!("during the run: {satisfied}/4")),
        "{report}"
    );

    assert!(
        report.contains("deterministic (waits for the judge and trainer)"),
        "{report}"
    );
    let checks = report
        .lines()
        .find_map(|l| l.split("not preferred after each check ").nth(1))
        .unwrap_or_else(|| panic!("no held-out checks in {report}"));
    assert_eq!(
        checks.split(", ").count(),
        2,
        "after 2 and after 4: {report}"
    );
    let eval: Vec<serde_json::Value> = std::fs::read_to_string(out.join("eval.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(eval.len(), 12, "before, the hinted teacher, after 2, after");
    assert_eq!(eval[3]["phase"], "teacher");
    assert_eq!(eval[6]["phase"], "after-2");
    let before_ok = eval[..3].iter().filter(|e| e["satisfied"] == true).count();
    assert!(
        report.contains(&format!("held-out before: {before_ok}/3")),
        "{report}"
    );
    // The teacher check asks the same questions, each with the correction the way the
    // trainer's teacher reads a hint; its rate is the teacher phase's.
    let teacher_ok = eval[3..6].iter().filter(|e| e["satisfied"] == true).count();
    assert!(
        report.contains(&format!("the hinted teacher (held-out questions with the correction as the trainer's hint, base model): {teacher_ok}/3")),
        "{report}"
    );
    for (plain, hinted) in eval[..3].iter().zip(&eval[3..6]) {
        assert_eq!(
            hinted["prompt"].as_str().unwrap(),
            clawrl_core::judge::teacher::hinted_text(
                plain["prompt"].as_str().unwrap(),
                clawrl_tui::sim::preference::find("no-lists")
                    .unwrap()
                    .correction,
                clawrl_core::config::TrainSection::default().hint_placement,
            )
        );
        assert!(
            hinted["prompt_tokens"].as_u64() > plain["prompt_tokens"].as_u64(),
            "the hint reaches the model: {hinted} vs {plain}"
        );
    }
}

fn evaluation_turns_are_stored_and_never_trained_on(out: &Path, report: &str) {
    // What was stored: 4 rated main turns (+ their follow-ups) and the evaluation's side turns,
    // which are never trained on.
    let export = Command::new(env!("CARGO_BIN_EXE_clawrl-tui"))
        .args(["export", "--store"])
        .arg(out.join("data").join("clawrl.sqlite"))
        .output()
        .unwrap();
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let turns: Vec<serde_json::Value> = String::from_utf8_lossy(&export.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let side: Vec<_> = turns.iter().filter(|t| t["turn_type"] == "side").collect();
    assert_eq!(
        side.len(),
        12 + if report.contains("rollback to v0") {
            3
        } else {
            0
        }
    );
    assert!(
        side.iter()
            .all(|t| t["trained_in"].as_array().is_none_or(|v| v.is_empty()))
    );
    let rated: Vec<_> = turns.iter().filter(|t| !t["feedback"].is_null()).collect();
    assert_eq!(rated.len(), 4);
}

fn versions_report_their_rates_and_rollback_restores_the_replies(report: &str) {
    // Each version created lists the learning rate its step used, at most the configured one.
    let created: usize = report
        .split(" versions created")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no version count in {report}"));
    let rates: Vec<f64> = report
        .lines()
        .find_map(|l| l.split("learning rate of each version's step: ").nth(1))
        .map(|r| r.split(' ').map(|x| x.parse().unwrap()).collect())
        .unwrap_or_default();
    assert_eq!(rates.len(), created, "{report}");
    assert!(rates.iter().all(|&lr| lr > 0.0 && lr <= 3e-4), "{report}");
    // With a version trained, rolling back to v0 reproduces the greedy "before" replies.
    if let Some(line) = report.lines().find(|l| l.contains("rollback to v0")) {
        assert!(line.ends_with("3/3 identical"), "{report}");
    }
}
