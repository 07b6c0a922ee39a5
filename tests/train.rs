//! Learning end to end, through the real HTTP API on the default model: next states (judged by
//! a scripted judge: a reward, a reward and a hint) and thumbs train a version that goes live
//! and changes the served log-probs of a probe prompt; `ctl rollback 0` restores them exactly;
//! no request fails meanwhile; kill -9 during training resumes with the same live version and
//! the samples still untrained; the manual policy holds candidates for approve / veto (also
//! across a restart); a failed adapter write loses nothing; a corrupt adapter is never served.
//! One long scenario, so that the model loads and the trainer warms up once.

mod common;
use common::scripted_judge::ScriptedJudge;
use common::server::Server;
use serde_json::{Value, json};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MARKERS: [&str; 2] = ["Thanks, perfect", "No, shorter please"];

/// Thanks → +1, no hint; a correction → −1 with a hint (a combined RL + OPD sample).
fn script(marker: &str) -> (&'static [&'static str], &'static [&'static str]) {
    match marker {
        "Thanks, perfect" => (&["\\boxed{1}"], &["\\boxed{-1}"]),
        "No, shorter please" => (
            &["A correction. \\boxed{-1}"],
            &["\\boxed{1} [HINT_START]Answer in one short sentence.[HINT_END]"],
        ),
        _ => (&["\\boxed{0}"], &["\\boxed{-1}"]),
    }
}

/// `clawrl-tui ctl ARGS` against the server: (success, stdout, stderr).
fn ctl(s: &Server, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_clawrl-tui"))
        .arg("ctl")
        .args(args)
        // After the subcommand, as kubectl and git take their flags.
        .args(["--url", &format!("http://127.0.0.1:{}", s.port)])
        .env("CLAWRL_API_KEY", &s.key)
        .env("CLAWRL_DATA_DIR", s.data.path())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The greedy reply to a fixed prompt with its log-probs (a side turn: never trained).
fn probe(s: &Server) -> (String, Vec<f64>) {
    let (code, r) = s.chat(
        &[("X-Turn-Type", "side")],
        &json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 8, "temperature": 0, "logprobs": true}),
    );
    assert_eq!(code, 200, "{r}");
    let lps = r["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["logprob"].as_f64().unwrap())
        .collect();
    (
        r["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
        lps,
    )
}

/// The same greedy reply, token for token, with every log-prob within
/// [`common::PATHS_LOGPROB_TOL`]: the prefix cache is on, as for users, and a prompt found in
/// it computes its last position as a decode step (docs/RELIABILITY.md, "Rollback"), which
/// rounds differently from the prompt pass. A version's change to the weights moves log-probs
/// far more (checked above).
fn same_reply(now: &(String, Vec<f64>), then: &(String, Vec<f64>), what: &str) {
    assert_eq!(now.0, then.0, "{what}: the same text");
    assert_eq!(now.1.len(), then.1.len(), "{what}");
    let worst = now
        .1
        .iter()
        .zip(&then.1)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    eprintln!("{what}: largest log-prob difference {worst:.2e}");
    assert!(
        worst <= common::PATHS_LOGPROB_TOL,
        "{what}: {now:?} vs {then:?}"
    );
}

/// A two-turn session whose second message is the first turn's next state.
fn converse(s: &Server, session: &str, question: &str, reply: &str) {
    let h = [("X-Session-Id", session)];
    let m1 = json!([{"role": "user", "content": question}]);
    let (code, r1) = s.chat(&h, &json!({"messages": m1, "max_tokens": 24}));
    assert_eq!(code, 200, "{r1}");
    let m2 = json!([m1[0], r1["choices"][0]["message"], {"role": "user", "content": reply}]);
    let (code, r2) = s.chat(&h, &json!({"messages": m2, "max_tokens": 8}));
    assert_eq!(code, 200, "{r2}");
}

/// A client that keeps chatting (side turns) and records every status it got.
struct Background {
    stop: Arc<AtomicBool>,
    statuses: Arc<Mutex<Vec<u16>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    fn start(port: u16, key: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let (stop2, statuses2) = (stop.clone(), statuses.clone());
        let thread = std::thread::spawn(move || {
            let body =
                json!({"messages": [{"role": "user", "content": "Say ok."}], "max_tokens": 4})
                    .to_string();
            while !stop2.load(Ordering::SeqCst) {
                let req = format!(
                    "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nAuthorization: Bearer {key}\r\nX-Turn-Type: side\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let status = std::net::TcpStream::connect(("127.0.0.1", port))
                    .and_then(|mut c| {
                        use std::io::{Read, Write};
                        c.write_all(req.as_bytes())?;
                        let mut out = String::new();
                        c.read_to_string(&mut out)?;
                        Ok(out
                            .split_whitespace()
                            .nth(1)
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0))
                    })
                    .unwrap_or(0);
                statuses2.lock().unwrap().push(status);
                std::thread::sleep(Duration::from_millis(400));
            }
        });
        Self {
            stop,
            statuses,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<u16> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        self.statuses.lock().unwrap().clone()
    }
}

fn versions(s: &Server) -> Vec<Value> {
    let (ok, out, err) = ctl(s, &["--json", "versions"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["versions"].as_array().unwrap().clone()
}

#[test]
fn conversations_train_versions_that_go_live_roll_back_exactly_and_survive_a_crash() {
    let judge = ScriptedJudge::start(&MARKERS, script);
    let mut env: Vec<(&str, String)> = judge.env();
    env.extend([
        ("CLAWRL__TRAIN__ENABLED", "true".to_string()),
        ("CLAWRL__TRAIN__MIN_SAMPLES", "3".into()),
        ("CLAWRL__TRAIN__MAX_WAIT_SECS", "120".into()),
        // Every hint candidate scored (the default, `user`, scores only the user's words).
        ("CLAWRL__TRAIN__HINT_SELECTION", "overlap".into()),
    ]);
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let s = Server::start(&env_refs);
    assert_eq!(s.admin_status()["live_version"], 0);
    let before = probe(&s);
    let background = Background::start(s.port, s.key.clone());

    // Three samples: thanks (+1), a correction (−1 and a hint), a thumbs up (+1).
    converse(&s, "cats", "Tell me about cats.", "Thanks, perfect");
    converse(&s, "rain", "Explain why it rains.", "No, shorter please");
    let thumbs = s.rated("Name a planet.");
    let st = s.wait_for_status("v1 going live", 300, |st| st["live_version"] == 1);
    assert_eq!(st["trainer"]["last_error"], Value::Null, "{st:#}");

    the_first_version_is_trained_on_all_three_with_the_chosen_hint(&s, &thumbs);
    let after = probe(&s);
    rollbacks_restore_every_log_prob_and_bad_commands_change_nothing(&s, &before, &after);
    let statuses = background.finish();
    assert!(statuses.len() >= 5, "{statuses:?}");
    assert!(
        statuses.iter().all(|&c| c == 200),
        "a request failed while training: {statuses:?}"
    );

    // From here on the gate holds each candidate for a decision.
    let manual = [("CLAWRL__GATE__POLICY", "manual".to_string())];
    let env2: Vec<(&str, &str)> = env
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .chain(manual.iter().map(|(k, v)| (*k, v.as_str())))
        .collect();
    let s = a_crash_during_an_update_loses_nothing(s, &env2, &after);
    let s = a_failed_write_and_a_held_candidate_survive_a_crash(s, &env2);
    pause_rollback_and_corrupt_adapters(s, &env2, &before, &after);
}

/// v1: live, trained on the three samples, the correction's hint chosen by overlap.
fn the_first_version_is_trained_on_all_three_with_the_chosen_hint(s: &Server, thumbs: &str) {
    let v = versions(s);
    assert_eq!(v.len(), 1, "{v:#?}");
    let v1 = &v[0];
    assert_eq!(
        (v1["state"].as_str(), v1["parent"].as_i64()),
        (Some("live"), Some(0))
    );
    assert_eq!(v1["samples"], 3, "{v1:#}");
    assert_eq!(
        v1["hints"], 1,
        "the correction's hint was distilled: {v1:#}"
    );
    assert_eq!(v1["guard_passed"], true, "{v1:#}");
    assert!(v1["kl_base"].as_f64().unwrap() >= 0.0);
    // The degeneration check ran on the candidate's own probe replies and the base's.
    let report = &v1["guard"];
    for k in ["repetition", "base_repetition"] {
        let share = report[k].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&share), "{k}: {report:#}");
    }
    assert!(
        (v1["mean_reward"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9,
        "{v1:#}"
    );
    // Every sample carried a reward: the full rate of the first warmup step (3e-4 / 4).
    assert!(
        (v1["learning_rate"].as_f64().unwrap() - 7.5e-5).abs() < 1e-12,
        "{v1:#}"
    );
    let dir = std::path::Path::new(v1["path"].as_str().unwrap());
    assert!(
        dir.join("adapter_config.json").exists() && dir.join("adapter_model.safetensors").exists()
    );

    // Export: the version that wrote each turn, the versions trained on it.
    let turns = s.export();
    let trained: Vec<&Value> = turns
        .iter()
        .filter(|t| t["trained_in"] == json!([1]))
        .collect();
    assert_eq!(trained.len(), 3, "{turns:#?}");
    assert!(trained.iter().any(|t| t["response_id"] == thumbs));
    assert!(trained.iter().all(|t| t["adapter_version"] == 0));
    // The correction distilled from one of two candidates, the judge's hint and the user's own
    // words, chosen by their teachers' top-K overlap with the student; the others had none.
    let choices: Vec<&Value> = trained
        .iter()
        .flat_map(|t| t["hint_choices"].as_array().unwrap())
        .collect();
    assert_eq!(choices.len(), 1, "{turns:#?}");
    let c = choices[0];
    assert_eq!(
        (c["version"].as_i64(), c["rule"].as_str(), c["k"].as_u64()),
        (Some(1), Some("overlap"), Some(16)),
        "{c:#}"
    );
    let candidates = c["candidates"].as_array().unwrap();
    let said: Vec<(&str, &str)> = candidates
        .iter()
        .map(|x| (x["source"].as_str().unwrap(), x["text"].as_str().unwrap()))
        .collect();
    assert_eq!(
        said,
        [
            ("judge", "Answer in one short sentence."),
            ("user", "No, shorter please")
        ],
        "{c:#}"
    );
    for x in candidates {
        let overlap = x["overlap"].as_f64().unwrap_or(-1.0);
        assert!((0.0..=16.0).contains(&overlap), "{c:#}");
    }
    let chosen = c["chosen"].as_u64().unwrap() as usize;
    assert!(
        candidates[chosen]["overlap"].as_f64() >= candidates[1 - chosen]["overlap"].as_f64(),
        "{c:#}"
    );
}

/// The live version serves differently; rolling back to the base restores every log-prob.
fn rollbacks_restore_every_log_prob_and_bad_commands_change_nothing(
    s: &Server,
    before: &(String, Vec<f64>),
    after: &(String, Vec<f64>),
) {
    assert!(
        after
            .1
            .iter()
            .zip(&before.1)
            .any(|(a, b)| (a - b).abs() > common::PATHS_LOGPROB_TOL),
        "v1 changes the probe's log-probs: {before:?} vs {after:?}"
    );
    let (ok, out, err) = ctl(s, &["rollback", "0"]);
    assert!(ok && out.contains("from v1 to v0"), "{out}{err}");
    same_reply(&probe(s), before, "the base model again");
    let (ok, out, err) = ctl(s, &["rollback", "v1"]);
    assert!(ok, "{out}{err}");
    same_reply(&probe(s), after, "v1 again");

    // Bad commands: clear errors, the live version unchanged.
    let (ok, _, err) = ctl(s, &["approve", "99"]);
    assert!(!ok && err.contains("404") && err.contains("v99"), "{err}");
    let (ok, _, err) = ctl(s, &["veto", "1"]);
    assert!(
        !ok && err.contains("409") && err.contains("roll back"),
        "{err}"
    );
    let (ok, _, err) = ctl(s, &["rollback", "1"]);
    assert!(!ok && err.contains("already live"), "{err}");
    let (code, _, _) = s.request("GET", "/admin/status", &[], "", false);
    assert_eq!(code, 401, "the control routes need the key");
    assert_eq!(s.admin_status()["live_version"], 1);
}

/// Three more samples; kill -9 while they are being trained on.
fn a_crash_during_an_update_loses_nothing(
    s: Server,
    env2: &[(&str, &str)],
    after: &(String, Vec<f64>),
) -> Server {
    for q in ["Name a river.", "Name a mountain.", "Name a city."] {
        s.rated(q);
    }
    s.wait_for_status("the second update", 120, |st| {
        matches!(
            st["trainer"]["state"].as_str(),
            Some("training" | "guarding")
        )
    });
    let s = s.crash_and_restart(env2);
    let st = s.wait_for_status("the trainer counting its samples", 60, |st| {
        st["trainer"]["samples_waiting"].as_u64().unwrap_or(0) > 0
            || st["trainer"]["state"] != "starting"
    });
    assert_eq!(
        st["live_version"], 1,
        "the same live version after the crash: {st:#}"
    );
    assert_eq!(
        versions(&s).len(),
        1,
        "the interrupted update left no version"
    );
    same_reply(&probe(&s), after, "v1 serves as before the crash");

    // The samples left untrained make v2; the manual policy holds it for a decision.
    let st = s.wait_for_status("candidate v2", 300, |st| {
        st["candidates"].as_array().is_some_and(|c| !c.is_empty())
    });
    assert_eq!(st["candidates"][0]["id"], 2);
    assert_eq!(st["live_version"], 1);
    s.wait_for_status("the trainer holding", 30, |st| {
        st["trainer"]["state"] == "held"
    });
    let (ok, out, _) = ctl(&s, &["status"]);
    assert!(
        ok && out.contains("candidate     v2: pass") && out.contains("held"),
        "{out}"
    );
    let (ok, out, err) = ctl(&s, &["approve", "2"]);
    assert!(ok && out.contains("v2 is live"), "{out}{err}");
    let turns = s.export();
    assert_eq!(
        turns
            .iter()
            .filter(|t| t["trained_in"] == json!([2]))
            .count(),
        3
    );

    s
}

fn a_failed_write_and_a_held_candidate_survive_a_crash(s: Server, env2: &[(&str, &str)]) -> Server {
    // Writing v3 fails (something sits where its folder is written): the update fails with
    // the reason, the live version and the samples stay; once the obstacle is gone, v3 comes.
    let blocker = s.data.path().join("adapters/.v3.tmp");
    std::fs::write(&blocker, "in the way").unwrap();
    for q in ["Name a sea.", "Name a tree.", "Name a bird."] {
        s.rated(q);
    }
    let st = s.wait_for_status("the failed write", 300, |st| {
        st["trainer"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot write the adapter"))
    });
    assert_eq!(
        (st["live_version"].as_i64(), versions(&s).len()),
        (Some(2), 2),
        "{st:#}"
    );
    std::fs::remove_file(&blocker).unwrap();
    s.wait_for_status("candidate v3", 300, |st| st["candidates"][0]["id"] == 3);

    // A candidate waiting for a decision is still waiting after a crash.
    let s = s.crash_and_restart(env2);
    let st = s.wait_for_status("the trainer holding v3 again", 60, |st| {
        st["trainer"]["state"] == "held"
    });
    assert_eq!(
        (
            st["live_version"].as_i64(),
            st["candidates"][0]["id"].as_i64()
        ),
        (Some(2), Some(3))
    );

    // v3 is vetoed: never served; approving it afterwards is refused.
    let (ok, out, err) = ctl(&s, &["veto", "v3"]);
    assert!(ok && out.contains("v3 is vetoed"), "{out}{err}");
    let (ok, _, err) = ctl(&s, &["approve", "3"]);
    assert!(!ok && err.contains("vetoed"), "{err}");
    let (ok, _, err) = ctl(&s, &["rollback", "3"]);
    assert!(!ok && err.contains("vetoed"), "{err}");
    assert_eq!(s.admin_status()["live_version"], 2);

    s
}

fn pause_rollback_and_corrupt_adapters(
    s: Server,
    env2: &[(&str, &str)],
    before: &(String, Vec<f64>),
    after: &(String, Vec<f64>),
) {
    // Pause; the default rollback goes to the parent.
    let (ok, out, _) = ctl(&s, &["pause"]);
    assert!(ok && out.contains("paused"), "{out}");
    s.wait_for_status("the pause", 30, |st| st["trainer"]["state"] == "paused");
    let (ok, out, err) = ctl(&s, &["rollback"]);
    assert!(ok && out.contains("from v2 to v1"), "{out}{err}");
    let (ok, out, _) = ctl(&s, &["versions"]);
    assert!(ok, "{out}");
    for (id, state) in [("v1", "live"), ("v2", "retired"), ("v3", "vetoed")] {
        let line = out
            .lines()
            .find(|l| l.contains(&format!(" {id} ")))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(line.trim_end().ends_with(state), "{line}");
    }
    // Each trained version shows the learning rate its step used (warmup: 1/4, 2/4, … of it).
    let v1 = out.lines().find(|l| l.contains(" v1 ")).unwrap();
    assert!(v1.contains(" 7.5e-5 "), "{out}");

    // A corrupt adapter is never served: rolling forward to it is refused, the live version stays.
    let corrupt = |v: &str| {
        let f = s
            .data
            .path()
            .join(format!("adapters/{v}/adapter_model.safetensors"));
        let mut bytes = std::fs::read(&f).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0x10;
        std::fs::write(&f, bytes).unwrap();
    };
    corrupt("v2");
    let (ok, _, err) = ctl(&s, &["rollback", "2"]);
    assert!(
        !ok && err.contains("corrupt") && err.contains("unchanged"),
        "{err}"
    );
    assert_eq!(s.admin_status()["live_version"], 1);
    same_reply(&probe(&s), after, "v1 still serves");

    // The live version's adapter corrupt at a restart: the base model serves, the error is shown.
    corrupt("v1");
    let s = s.crash_and_restart(env2);
    assert_eq!(s.admin_status()["live_version"], 0);
    same_reply(&probe(&s), before, "the base model serves");
    let (ok, out, _) = ctl(&s, &["versions"]);
    let line = out
        .lines()
        .find(|l| l.contains(" v1 "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(ok && line.contains("adapter unreadable"), "{out}");
    assert!(
        versions(&s)[0]["error"]
            .as_str()
            .unwrap()
            .contains("corrupt")
    );
    assert_eq!(
        s.admin_status()["trainer"]["paused"],
        true,
        "the pause survived the restarts"
    );
}
