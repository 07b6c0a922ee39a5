//! The judge end to end: a scripted OpenAI-compatible judge on loopback (canned texts,
//! malformed ones included) proves votes → score → hint → store → export; explicit feedback
//! overrides the score; a crash while turns are being judged loses and duplicates nothing; an
//! https judge is trusted through the system's roots only; and the real local judge on its own
//! model runs without blocking serving.

mod common;
use common::scripted_judge::ScriptedJudge;
use common::server::Server;
use serde_json::{Value, json};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Canned judge texts per scenario marker: (PRM votes, hint votes).
fn script(marker: &str) -> (&'static [&'static str], &'static [&'static str]) {
    match marker {
        // Thanks → +1 with one malformed vote; no hint.
        "Thanks, that works" => (
            &[
                "The user thanks the assistant. \\boxed{1}",
                "Positive. \\boxed{1}",
                "I think it is fine: \\boxed{maybe}",
            ],
            &["\\boxed{-1}", "Nothing new. \\boxed{-1}", "\\boxed{-1}"],
        ),
        // A correction → −1 (the last box counts); the longest usable hint wins.
        "No, I meant kilometres" => (
            &[
                "A correction. \\boxed{-1}",
                "At first \\boxed{1}, but it is a correction: \\boxed{-1}",
                "\\boxed{0}",
            ],
            &[
                "\\boxed{1} [HINT_START]Give the distance in kilometres.[HINT_END]",
                "\\boxed{1} [HINT_START]Use km.[HINT_END]",
                "\\boxed{1}\n[HINT_START]The user wants kilometres, not miles: answer in km.[HINT_END]",
            ],
        ),
        // A tie → 0.
        _ => (
            &["\\boxed{1}", "\\boxed{-1}", "no score at all"],
            &["\\boxed{-1}"; 3],
        ),
    }
}

const MARKERS: [&str; 3] = ["Thanks, that works", "No, I meant kilometres", "Hmm, maybe"];

fn start(env: &[(&'static str, String)]) -> Server {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start(&env)
}

/// Two turns of one session: a question, then `reply` (the first turn's next state). Returns
/// the first turn's chat completion id.
fn converse(s: &Server, session: &str, reply: &str) -> String {
    let h = [("X-Session-Id", session)];
    let m1 = json!([{"role": "user", "content": "How far is 5 miles?"}]);
    let (status, r1) = s.chat(
        &h,
        &json!({"messages": m1, "max_tokens": 6, "temperature": 0}),
    );
    assert_eq!(status, 200, "{r1}");
    let m2 = json!([m1[0], r1["choices"][0]["message"], {"role": "user", "content": reply}]);
    let (status, r2) = s.chat(
        &h,
        &json!({"messages": m2, "max_tokens": 6, "temperature": 0}),
    );
    assert_eq!(status, 200, "{r2}");
    r1["id"].as_str().unwrap().to_string()
}

fn turn<'a>(turns: &'a [Value], session: &str, index: i64) -> &'a Value {
    turns
        .iter()
        .find(|t| t["session_id"] == session && t["turn_index"] == index)
        .unwrap_or_else(|| panic!("no turn {session}/{index} in {turns:#?}"))
}

/// POST /v1/feedback with the API key; returns (status, body).
fn feedback(s: &Server, body: &str) -> (u16, String) {
    let (status, _, body) = s.request("POST", "/v1/feedback", &[], body, true);
    (status, body)
}

/// Exports until `session`'s first turn is judged.
fn wait_judged(s: &Server, sessions: &[&str]) -> Vec<Value> {
    let t = Instant::now();
    loop {
        let turns = s.export();
        if sessions.iter().all(|sid| {
            turns.iter().any(|t| {
                t["session_id"] == *sid && t["turn_index"] == 0 && t["judge_status"] == "judged"
            })
        }) {
            return turns;
        }
        // A deadline against a judge that never answers, not a speed check: loading the
        // judge's model and voting took over 120 s on 2 cores shared with four `sim` runs.
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "not judged in time: {turns:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn votes(t: &Value, kind: &str) -> Vec<Value> {
    t["judgment"]["votes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["kind"] == kind)
        .map(|v| v["score"].clone())
        .collect()
}

#[test]
fn scripted_judge_votes_become_scores_hints_and_exports() {
    let judge = ScriptedJudge::start(&MARKERS, script);
    let s = start(&judge.env());
    let thanks = converse(&s, "thanks", "Thanks, that works!");
    converse(&s, "correction", "No, I meant kilometres.");
    converse(&s, "tie", "Hmm, maybe.");
    let turns = wait_judged(&s, &["thanks", "correction", "tie"]);

    scores_votes_and_hints_are_recorded(&turns);
    the_judge_saw_request_reply_and_next_state(&s, &judge, turn(&turns, "correction", 0));
    a_rating_overrides_the_judge_for_training(&s, &thanks);
    every_response_names_its_session_and_turn(&s);
    bad_feedback_is_refused_and_stores_nothing(&s);
    a_closed_session_leaves_its_last_turn_without_signal(&s);
}

fn scores_votes_and_hints_are_recorded(turns: &[Value]) {
    let t = turn(turns, "thanks", 0);
    assert_eq!(t["judgment"]["score"], 1, "{t:#}");
    assert_eq!(t["reward"], 1);
    assert_eq!(t["judgment"]["backend"], "openai");
    assert_eq!(
        t["judgment"]["mode"], "reason",
        "auto mode reasons with an endpoint"
    );
    assert_eq!(t["judgment"]["judge_model"], "scripted-judge");
    let mut v = votes(t, "score");
    v.sort_by_key(|x| x.to_string());
    assert_eq!(v, vec![json!("invalid"), json!(1), json!(1)]);
    assert!(t["judgment"]["hint"].is_null());
    assert!(
        t["judgment"]["votes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["raw"] == "I think it is fine: \\boxed{maybe}"),
        "raw texts are kept"
    );

    let c = turn(turns, "correction", 0);
    assert_eq!(c["judgment"]["score"], -1, "{c:#}");
    assert_eq!(
        c["judgment"]["hint"],
        "The user wants kilometres, not miles: answer in km."
    );
    assert_eq!(votes(c, "hint").len(), 3);
    assert_eq!(
        turn(turns, "tie", 0)["judgment"]["score"],
        0,
        "a tie scores 0"
    );

    // The last turns have no next state yet; nothing judged them.
    assert_eq!(
        turn(turns, "thanks", 1)["judge_status"],
        "awaiting_next_state"
    );
    assert!(turn(turns, "thanks", 1)["judgment"].is_null());
}

fn the_judge_saw_request_reply_and_next_state(s: &Server, judge: &ScriptedJudge, c: &Value) {
    // What the judge saw: the request, the reply and the next state with its role.
    let prompts = judge.seen.lock().unwrap().clone();
    let prm = prompts
        .iter()
        .find(|b| {
            b["messages"].to_string().contains("No, I meant kilometres")
                && !b["messages"][0]["content"]
                    .as_str()
                    .unwrap()
                    .contains("[HINT_START]")
        })
        .unwrap();
    let user = prm["messages"][1]["content"].as_str().unwrap();
    assert!(
        user.contains("How far is 5 miles?") && user.contains("(user)"),
        "{user}"
    );
    assert!(
        user.contains(c["response_text"].as_str().unwrap().trim()),
        "{user}"
    );
    assert_eq!(prm["temperature"].as_f64().unwrap() as f32, 0.6);
    assert_eq!(prompts.len(), 18, "3 turns × (3 score + 3 hint votes)");

    assert_eq!(s.metric("clawrl_judge_votes_total"), 9.0);
    assert_eq!(s.metric("clawrl_judge_invalid_votes_total"), 2.0);
    assert_eq!(s.metric("clawrl_judge_turns_total"), 3.0);
    assert_eq!(s.metric("clawrl_judge_queue_depth"), 0.0);
    assert!(s.metric("clawrl_judge_votes_per_second") > 0.0);
}

fn a_rating_overrides_the_judge_for_training(s: &Server, thanks: &str) {
    // A thumbs down overrides the judge's +1 for training; the judge's score stays.
    let fb = json!({"response_id": thanks, "rating": "down", "comment": "too terse"}).to_string();
    let (status, body) = feedback(s, &fb);
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (
            body["rating"].as_str(),
            body["judge_score"].as_i64(),
            body["turn"].as_i64()
        ),
        (Some("down"), Some(1), Some(0))
    );
    let fb = json!({"session_id": "correction", "turn": 0, "rating": "up"}).to_string();
    assert_eq!(feedback(s, &fb).0, 200);
    let turns = s.export();
    let t = turn(&turns, "thanks", 0);
    assert_eq!(
        (t["reward"].as_i64(), t["judgment"]["score"].as_i64()),
        (Some(-1), Some(1))
    );
    assert_eq!(t["feedback"]["comment"], "too terse");
    assert_eq!(turn(&turns, "correction", 0)["reward"], 1);
    assert_eq!(s.metric("clawrl_feedback_total"), 2.0);
}

fn every_response_names_its_session_and_turn(s: &Server) {
    // Every chat response names its session and turn for feedback, streamed or not.
    for stream in [false, true] {
        let body = json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, "stream": stream});
        let (status, head, _) = s.request(
            "POST",
            "/v1/chat/completions",
            &[("X-Session-Id", "hdr")],
            &body.to_string(),
            true,
        );
        assert_eq!(status, 200);
        let head = head.to_ascii_lowercase();
        assert!(head.contains("x-session-id: hdr"), "{head}");
        assert!(
            head.contains(&format!("x-turn-index: {}", stream as u8)),
            "{head}"
        );
    }
}

fn bad_feedback_is_refused_and_stores_nothing(s: &Server) {
    // Bad feedback: a clear error, nothing stored.
    let (status, body) = feedback(s, r#"{"response_id": "chatcmpl-nope", "rating": "up"}"#);
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("chatcmpl-nope") && body.contains("turn_not_found"),
        "{body}"
    );
    let (status, body) = feedback(
        s,
        r#"{"session_id": "tie", "turn": 0, "rating": "sideways"}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(feedback(s, "{not json").0, 400);
    assert_eq!(
        s.request(
            "POST",
            "/v1/feedback",
            &[],
            r#"{"session_id": "tie", "turn": 0, "rating": "up"}"#,
            false
        )
        .0,
        401,
        "the API key is required"
    );
    let (status, body) = feedback(s, r#"{"session_id": "side", "turn": 0, "rating": "up"}"#);
    assert_eq!(status, 404, "{body}");
    assert!(turn(&s.export(), "tie", 0)["feedback"].is_null());
}

fn a_closed_session_leaves_its_last_turn_without_signal(s: &Server) {
    // Closing a session: its unanswered last turn carries no signal.
    let (status, r) = s.chat(
        &[("X-Session-Id", "side"), ("X-Turn-Type", "side")],
        &json!({"messages": [{"role": "user", "content": "heartbeat"}], "max_tokens": 2}),
    );
    assert_eq!(status, 200, "{r}");
    let (status, body) = feedback(
        s,
        &json!({"response_id": r["id"], "rating": "up"}).to_string(),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("side turn"), "{body}");
    let m = json!([{"role": "user", "content": "bye"}]);
    let (status, _) = s.chat(
        &[("X-Session-Id", "thanks"), ("X-Session-Done", "1")],
        &json!({"messages": m, "max_tokens": 2}),
    );
    assert_eq!(status, 200);
    let turns = s.export();
    let answered = turn(&turns, "thanks", 1);
    assert!(
        answered["next_state"].to_string().contains("bye"),
        "{answered:#}"
    );
    assert_ne!(answered["judge_status"], "no_signal");
    assert_eq!(turn(&turns, "thanks", 2)["judge_status"], "no_signal");
    assert_eq!(turn(&turns, "side", 0)["judge_status"], "not_trained");
}

#[test]
fn a_crash_while_judging_loses_and_duplicates_no_votes_and_sessions_resume() {
    let judge = ScriptedJudge::start(&MARKERS, script);
    let env = judge.env();
    let s = start(&env);
    converse(&s, "before", "Thanks, that works!");
    let before = wait_judged(&s, &["before"]);
    let judged_at = turn(&before, "before", 0)["judgment"]["judged_at"].clone();
    // A conversation without any session header, one turn so far.
    let opening = json!([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]);
    let (status, r) = s.chat(
        &[],
        &json!({"messages": opening, "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(status, 200, "{r}");

    // The judge hangs: the next turn's votes are in flight when the server is killed.
    judge.hold.store(true, Ordering::SeqCst);
    converse(&s, "during", "No, I meant kilometres.");
    let t = Instant::now();
    while judge.requests_for("No, I meant kilometres") == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the judge was never asked"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(turn(&s.export(), "during", 0)["judge_status"], "pending");
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    judge.seen.lock().unwrap().clear(); // also drops the held connections
    judge.hold.store(false, Ordering::SeqCst);
    let s = s.crash_and_restart(&env_ref);

    let turns = wait_judged(&s, &["before", "during"]);
    let during = turn(&turns, "during", 0);
    assert_eq!(during["judgment"]["score"], -1, "{during:#}");
    assert_eq!(votes(during, "score").len(), 3, "{during:#}");
    assert_eq!(votes(during, "hint").len(), 3, "{during:#}");
    let before = turn(&turns, "before", 0);
    assert_eq!(
        before["judgment"]["judged_at"], judged_at,
        "judged once, never again"
    );
    assert_eq!(votes(before, "score").len(), 3);
    assert_eq!(
        judge.requests_for("Thanks, that works"),
        0,
        "a judged turn is not re-judged"
    );
    assert_eq!(judge.requests_for("No, I meant kilometres"), 6);

    // Sessions the crashed process left open continue: their last turns still await a next
    // state, and get it from the next request, with or without a session header.
    assert_eq!(
        turn(&turns, "during", 1)["judge_status"],
        "awaiting_next_state"
    );
    let m = json!([{"role": "user", "content": "Next question."}]);
    let (status, _) = s.chat(
        &[("X-Session-Id", "during")],
        &json!({"messages": m, "max_tokens": 2}),
    );
    assert_eq!(status, 200);
    let headerless = turns
        .iter()
        .find(|t| t["request_messages"] == opening)
        .unwrap();
    let mut history = opening.as_array().unwrap().clone();
    history.push(json!({"role": "assistant", "content": r["choices"][0]["message"]["content"]}));
    history.push(json!({"role": "user", "content": "Hmm, maybe."}));
    let (status, _) = s.chat(&[], &json!({"messages": history, "max_tokens": 2}));
    assert_eq!(status, 200);
    let turns = s.export();
    let during1 = turn(&turns, "during", 1);
    assert!(
        during1["next_state"].to_string().contains("Next question."),
        "{during1:#}"
    );
    assert_eq!(
        turn(&turns, "during", 2)["turn_index"],
        2,
        "numbering continues"
    );
    let sid = headerless["session_id"].as_str().unwrap();
    let continued = turn(&turns, sid, 1);
    assert!(
        continued["request_messages"]
            .to_string()
            .contains("Hmm, maybe."),
        "{continued:#}"
    );
    assert!(
        turn(&turns, sid, 0)["next_state"]
            .to_string()
            .contains("Hmm, maybe.")
    );
}

#[test]
fn the_local_judge_runs_on_its_own_model_without_blocking_serving() {
    let judge_model = common::model_path(common::QWEN25);
    let s = Server::start(&[
        ("CLAWRL__JUDGE__BACKEND", "local"),
        ("CLAWRL__JUDGE__MODEL", judge_model.to_str().unwrap()),
        ("CLAWRL__JUDGE__MAX_TOKENS", "24"),
    ]);
    converse(&s, "local", "No, I meant kilometres.");
    let turns = wait_judged(&s, &["local"]);
    let t = turn(&turns, "local", 0);
    let j = &t["judgment"];
    assert_eq!(
        (j["backend"].as_str(), j["mode"].as_str()),
        (Some("local"), Some("direct")),
        "{j:#}"
    );
    // By default the judge is a model of its own (`judge.model`), not the policy it trains.
    let judge_model = j["judge_model"].as_str().unwrap().to_ascii_lowercase();
    assert!(judge_model.contains("qwen2.5"), "{j:#}");
    assert!(j["error"].is_null(), "{j:#}");
    let score_votes: Vec<&Value> = j["votes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["kind"] == "score")
        .collect();
    assert_eq!(score_votes.len(), 3);
    for v in &score_votes {
        assert!(
            [-1, 0, 1].contains(&v["score"].as_i64().unwrap()),
            "direct votes are always valid: {v}"
        );
        let p = &v["probs"];
        let sum = p["1"].as_f64().unwrap() + p["0"].as_f64().unwrap() + p["-1"].as_f64().unwrap();
        assert!((sum - 1.0).abs() < 1e-6, "{p}");
    }
    assert!([-1, 0, 1].contains(&j["score"].as_i64().unwrap()));
    assert_eq!(
        j["votes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["kind"] == "hint")
            .count(),
        3
    );
    // Direct hint votes: a drawn score; the first vote that draws 1 writes its hint between
    // the markers (`judge.hint_texts` = 1), later ones stay a bare vote.
    let mut written = 0;
    for v in j["votes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["kind"] == "hint")
    {
        let raw = v["raw"].as_str().unwrap();
        let wrote = raw.starts_with("\\boxed{1}\n[HINT_START]") && raw.ends_with("[HINT_END]");
        written += wrote as usize;
        assert!(
            wrote || raw == "\\boxed{1}" || raw == "\\boxed{-1}",
            "{raw:?}"
        );
    }
    assert!(written <= 1, "{j:#}");

    // Serving goes on while the judge works: a request made now is answered.
    converse(&s, "second", "Thanks, that works!");
    let (status, r) = s.chat(
        &[],
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
    );
    assert_eq!(status, 200, "{r}");
    wait_judged(&s, &["second"]);
    assert_eq!(s.metric("clawrl_judge_invalid_votes_total"), 0.0);
}

#[test]
fn an_https_judge_is_reached_when_its_certificate_is_trusted_and_only_then() {
    let (cert_pem, tls) = common::scripted_judge::self_signed_localhost();
    let judge = ScriptedJudge::start_tls(&MARKERS, script, tls);

    // A self-signed certificate is not among the system's roots: no request gets through.
    let untrusted = start(&judge.env());
    converse(&untrusted, "untrusted", "Thanks, that works!");
    let t = Instant::now();
    while untrusted.metric("clawrl_judge_errors_total") < 1.0 {
        assert!(t.elapsed() < Duration::from_secs(60), "no judge error");
        std::thread::sleep(Duration::from_millis(100));
    }
    let turns = untrusted.export();
    assert_ne!(turn(&turns, "untrusted", 0)["judge_status"], "judged");
    assert_eq!(judge.requests_for("Thanks, that works"), 0);
    drop(untrusted);

    // Trusted through SSL_CERT_FILE (which replaces the system's roots, as for OpenSSL).
    let dir = tempfile::tempdir().unwrap();
    let cert_file = dir.path().join("judge-ca.pem");
    std::fs::write(&cert_file, cert_pem).unwrap();
    let mut env = judge.env();
    env.push(("SSL_CERT_FILE", cert_file.display().to_string()));
    let s = start(&env);
    converse(&s, "thanks", "Thanks, that works!");
    let turns = wait_judged(&s, &["thanks"]);
    let j = &turn(&turns, "thanks", 0)["judgment"];
    assert_eq!(
        (j["backend"].as_str(), j["score"].as_i64()),
        (Some("openai"), Some(1)),
        "{j:#}"
    );
    assert!(judge.requests_for("Thanks, that works") >= 3);
}
