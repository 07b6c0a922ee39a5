//! clawrl as the control plane in front of two clawrl replicas over loopback
//! (`serving.backend = "upstream"`; each replica answers vLLM's subset): a conversation is
//! captured with the ids and log-probs the replica computed; a trained version is loaded into
//! both replicas before it serves; a rollback is served by the next request; a replica that
//! dies is skipped and shown down; a version a replica cannot load stays a candidate. One
//! scenario, in phases, run once (it trains twice). Then the same through SGLang's native API
//! (`upstream.kind = "sglang"`, which each replica answers too), in front of one replica.

mod common;
use common::server::Server;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// The two replicas and the control plane in front of them.
struct Fleet {
    replicas: Vec<Server>,
    plane: Server,
}

fn start_fleet(kind: &str, replicas: usize, plane_env: &[(&str, &str)]) -> Fleet {
    let replicas: Vec<Server> = (0..replicas).map(|_| Server::start(&[])).collect();
    let urls: Vec<String> = replicas
        .iter()
        .map(|r| format!("http://127.0.0.1:{}", r.port))
        .collect();
    let urls = serde_json::to_string(&urls).unwrap();
    let mut env = vec![
        ("CLAWRL__SERVING__BACKEND", "upstream"),
        ("CLAWRL__UPSTREAM__KIND", kind),
        ("CLAWRL__UPSTREAM__URLS", &urls),
        ("CLAWRL__UPSTREAM__API_KEY", "test-key-123"),
        ("CLAWRL__TRAIN__ENABLED", "true"),
        ("CLAWRL__TRAIN__MIN_SAMPLES", "1"),
        // The guard's KL check runs; its degeneration replies (14 greedy generations per
        // candidate) are left out to keep this scenario short.
        ("CLAWRL__GATE__REPETITION_TOKENS", "0"),
    ];
    env.extend_from_slice(plane_env);
    let plane = Server::start(&env);
    Fleet { replicas, plane }
}

fn greedy(question: &str, session: &str) -> (Vec<(&'static str, String)>, Value) {
    let headers = vec![("X-Session-Id", session.to_string())];
    let body = json!({"messages": [{"role": "user", "content": question}], "max_tokens": 10,
                      "temperature": 0});
    (headers, body)
}

/// Asks `s` a greedy question in `session`; returns its reply's id.
fn ask(s: &Server, question: &str, session: &str) -> String {
    let (headers, body) = greedy(question, session);
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (st, r) = s.chat(&headers, &body);
    assert_eq!(st, 200, "{r}");
    r["id"].as_str().unwrap().to_string()
}

/// The captured turn of `s` whose request asked `question`.
fn captured(s: &Server, question: &str) -> Value {
    s.export()
        .into_iter()
        .rfind(|t| t["request_messages"].to_string().contains(question))
        .unwrap_or_else(|| panic!("{question:?} not captured"))
}

fn close(a: &Value, b: &Value) {
    let (a, b) = (a.as_array().unwrap(), b.as_array().unwrap());
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
        assert!((x - y).abs() < common::PATHS_LOGPROB_TOL, "{a:?} vs {b:?}");
    }
}

fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "{what}: not within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn models(s: &Server) -> String {
    s.get("/v1/models", true).2
}

fn rate_up(s: &Server, id: &str) {
    let body = json!({"response_id": id, "rating": "up"}).to_string();
    let (code, _, body) = s.request("POST", "/v1/feedback", &[], &body, true);
    assert_eq!(code, 200, "{body}");
}

/// The plane captures what a replica computes for the same conversation asked directly.
fn captured_like_a_local_run(f: &Fleet) -> String {
    let q = "Name a fruit.";
    let id = ask(&f.plane, q, "conv-1");
    ask(&f.replicas[0], q, "direct");
    let (via, direct) = (captured(&f.plane, q), captured(&f.replicas[0], q));
    assert_eq!(via["prompt_ids"], direct["prompt_ids"]);
    assert_eq!(via["response_ids"], direct["response_ids"]);
    close(&via["logprobs"], &direct["logprobs"]);
    assert_eq!(via["adapter_version"], 0);
    // A streaming client gets the reply in pieces through the plane.
    let (headers, mut body) = greedy(q, "conv-streamed");
    body["stream"] = json!(true);
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (st, chunks) = f.plane.chat(&headers, &body);
    assert_eq!(st, 200, "{chunks}");
    let pieces: Vec<&str> = chunks
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|t| !t.is_empty())
        .collect();
    assert!(pieces.len() > 1, "{chunks}");
    let streamed = f
        .plane
        .export()
        .into_iter()
        .rfind(|t| t["session_id"] == "conv-streamed")
        .unwrap();
    assert_eq!(streamed["response_ids"], direct["response_ids"]);
    let health: Value = serde_json::from_str(&f.plane.get("/health", false).2).unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(
        health["replicas"].as_array().unwrap().len(),
        f.replicas.len()
    );
    // The replies the replicas streamed count in the plane's speed, as local decoding does.
    assert!(f.plane.metric("clawrl_completion_tokens_total") >= 2.0 * 9.0);
    id
}

/// A thumbs up trains v1; it goes live only once both replicas hold it, and serves.
fn a_trained_version_is_live_on_both_replicas(f: &Fleet, reply_id: &str) {
    rate_up(&f.plane, reply_id);
    wait_for("v1 live", 600, || {
        f.plane.admin_status()["live_version"] == 1
    });
    for r in &f.replicas {
        assert!(models(r).contains("clawrl-v1"), "{}", models(r));
    }
    let q = "Name a colour.";
    ask(&f.plane, q, "conv-2");
    let turn = captured(&f.plane, q);
    assert_eq!(turn["adapter_version"], 1);
    // The same prompt asked of a replica under clawrl-v1: the same reply and log-probs.
    let body = json!({"model": "clawrl-v1", "prompt": turn["prompt_ids"], "max_tokens": 10,
                      "temperature": 0, "logprobs": 0, "return_token_ids": true});
    let (st, _, text) =
        f.replicas[1].request("POST", "/v1/completions", &[], &body.to_string(), true);
    assert_eq!(st, 200, "{text}");
    let r: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["choices"][0]["token_ids"], turn["response_ids"]);
    close(
        &r["choices"][0]["logprobs"]["token_logprobs"],
        &turn["logprobs"],
    );

    // Replicas that lost the adapter (as after a restart) get it again from the plane.
    for r in &f.replicas {
        let unload = json!({"lora_name": "clawrl-v1"}).to_string();
        let (st, _, body) = r.request("POST", "/v1/unload_lora_adapter", &[], &unload, true);
        assert_eq!(st, 200, "{body}");
    }
    let q = "Name a vegetable.";
    ask(&f.plane, q, "conv-2");
    assert_eq!(captured(&f.plane, q)["adapter_version"], 1);
    assert!(f.replicas.iter().any(|r| models(r).contains("clawrl-v1")));
}

/// Rolling back is a routing change: the next request is served by v0, v1 stays loaded.
fn rollback_is_served_by_the_next_request(f: &Fleet) {
    let (st, _, body) = f.plane.request(
        "POST",
        "/admin/rollback",
        &[],
        &json!({"version": 0}).to_string(),
        true,
    );
    assert_eq!(st, 200, "{body}");
    let q = "Name an animal.";
    ask(&f.plane, q, "conv-3");
    assert_eq!(captured(&f.plane, q)["adapter_version"], 0);
    assert!(models(&f.replicas[0]).contains("clawrl-v1"));
}

/// One replica dies: every conversation is served by the other, and it is shown down.
fn a_dead_replica_is_skipped_and_shown_down(f: &mut Fleet) {
    let dead = f.replicas.pop().unwrap();
    let dead_url = format!("http://127.0.0.1:{}", dead.port);
    drop(dead); // kills the process
    for session in ["s-a", "s-b", "s-c", "s-d"] {
        ask(&f.plane, &format!("Say hi to {session}."), session);
    }
    let health: Value = serde_json::from_str(&f.plane.get("/health", false).2).unwrap();
    let replicas = health["replicas"].as_array().unwrap();
    let down: Vec<&Value> = replicas.iter().filter(|r| r["up"] == false).collect();
    assert_eq!(down.len(), 1, "{health}");
    assert_eq!(down[0]["url"], dead_url.as_str());
    assert!(
        f.plane.admin_status()["replicas"]
            .to_string()
            .contains(&dead_url)
    );
}

/// With a replica that cannot load it, a new version stays a candidate; v0 serves on.
fn a_version_not_loaded_everywhere_stays_a_candidate(f: &Fleet) {
    let id = ask(&f.plane, "Name a tree.", "conv-4");
    rate_up(&f.plane, &id);
    wait_for("v2 proposed", 600, || {
        f.plane.admin_status()["candidates"]
            .to_string()
            .contains("\"id\":2")
    });
    std::thread::sleep(Duration::from_secs(1));
    let status = f.plane.admin_status();
    assert_eq!(status["live_version"], 0, "{status}");
    assert!(
        !models(&f.replicas[0]).contains("clawrl-v2"),
        "unloaded again: all or none"
    );
    ask(&f.plane, "Name a river.", "conv-5");
    assert_eq!(captured(&f.plane, "Name a river.")["adapter_version"], 0);
}

/// With every replica down a request gets 503 saying so, and nothing is captured.
fn with_every_replica_down_requests_get_503_and_nothing_is_captured(f: &mut Fleet) {
    let before = f.plane.export().len();
    f.replicas.clear(); // kills the last one
    let (headers, body) = greedy("Name a mountain.", "conv-6");
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (st, r) = f.plane.chat(&headers, &body);
    assert_eq!(st, 503, "{r}");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("every upstream replica is down"),
        "{message}"
    );
    assert_eq!(f.plane.export().len(), before, "nothing captured");
    let health: Value = serde_json::from_str(&f.plane.get("/health", false).2).unwrap();
    assert_eq!(health["status"], "replicas down", "{health}");
}

#[test]
fn a_control_plane_captures_trains_and_pushes_versions_to_every_replica() {
    let mut f = start_fleet("vllm", 2, &[]);
    let reply = captured_like_a_local_run(&f);
    a_trained_version_is_live_on_both_replicas(&f, &reply);
    rollback_is_served_by_the_next_request(&f);
    a_dead_replica_is_skipped_and_shown_down(&mut f);
    a_version_not_loaded_everywhere_stays_a_candidate(&f);
    with_every_replica_down_requests_get_503_and_nothing_is_captured(&mut f);
}

/// A server that answers every request with `answer(request line, body)` (200, JSON).
fn fake_replica(answer: fn(&str, &Value) -> Value) -> u16 {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let (mut request_line, mut length) = (String::new(), 0usize);
            reader.read_line(&mut request_line).unwrap();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                if line.trim().is_empty() {
                    break;
                }
            }
            let mut body = vec![0u8; length];
            reader.read_exact(&mut body).unwrap();
            let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let answer = answer(&request_line, &body).to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
    });
    port
}

#[test]
fn a_replica_without_token_ids_is_refused_at_start_naming_the_version_needed() {
    // Like a vLLM older than 0.10.2: models and completions, but no token ids in the answer.
    let old_vllm = fake_replica(|request, _| {
        if request.contains("/v1/models") {
            json!({"object": "list", "data": [{"id": "old-model", "object": "model"}]})
        } else {
            json!({"choices": [{"index": 0, "text": "hi", "finish_reason": "length"}]})
        }
    });
    let log = refused_at_start("vllm", old_vllm);
    assert!(log.contains("vLLM ≥ 0.10.2 is needed"), "{log}");
}

/// Starts a control plane in front of the replica at `port`; returns its log once it stopped.
fn refused_at_start(kind: &str, port: u16) -> String {
    let urls = format!("[\"http://127.0.0.1:{port}\"]");
    let mut plane = Server::spawn(
        &common::model_path(common::SMOLLM2),
        "smollm2-135m-instruct",
        &[
            ("CLAWRL__SERVING__BACKEND", "upstream"),
            ("CLAWRL__UPSTREAM__KIND", kind),
            ("CLAWRL__UPSTREAM__URLS", &urls),
        ],
    );
    let status = plane.wait_exit("the refused replica", 120);
    assert!(!status.success());
    plane.log()
}

/// Like SGLang 0.5.2 started without `--enable-lora`: it generates with token ids, and
/// its log-probs are after temperature unless `tempered` is false.
fn sglang_without_lora(request: &str, body: &Value, tempered: bool) -> Value {
    if request.contains("/get_model_info") {
        json!({"model_path": "some/model", "is_generation": true})
    } else if request.contains("/get_server_info") {
        json!({"version": "0.5.2"})
    } else if request.contains("/generate") {
        let t = body["sampling_params"]["temperature"].as_f64().unwrap();
        let scale = if tempered { 1.0 / t } else { 1.0 };
        let (a, b) = (-0.5 * scale, -1.2 * scale);
        json!({"text": "hi", "output_ids": [7], "meta_info": {"output_token_logprobs": [[a, 7, null]],
               "output_top_logprobs": [[[a, 7, null], [b, 8, null]]]}})
    } else {
        json!({"success": false, "error_message": "LoRA is not enabled. Please set --enable-lora."})
    }
}

#[test]
fn an_sglang_replica_without_runtime_lora_or_raw_logprobs_is_refused_at_start_naming_the_fix() {
    let tempered = fake_replica(|request, body| sglang_without_lora(request, body, true));
    let log = refused_at_start("sglang", tempered);
    assert!(log.contains("SGLang 0.5.2"), "{log}");
    assert!(log.contains("SGLANG_RETURN_ORIGINAL_LOGPROB=True"), "{log}");
    let no_lora = fake_replica(|request, body| sglang_without_lora(request, body, false));
    let log = refused_at_start("sglang", no_lora);
    assert!(log.contains("--enable-lora"), "{log}");
    assert!(!log.contains("SGLANG_RETURN_ORIGINAL_LOGPROB"), "{log}");
}

/// SGLang's `/generate` on a replica: `body` answered 200.
fn generate(s: &Server, body: &Value) -> Value {
    let (st, _, text) = s.request("POST", "/generate", &[], &body.to_string(), true);
    assert_eq!(st, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn entries(v: &Value) -> (Vec<Value>, Vec<Value>) {
    let v = v.as_array().unwrap();
    (
        v.iter().map(|e| e[1].clone()).collect(),
        v.iter().map(|e| e[0].clone()).collect(),
    )
}

#[test]
fn a_control_plane_speaking_sglang_captures_and_pushes_versions() {
    // The teacher's log-probs from the replica too (the sampled-token form).
    let teacher_upstream = [
        ("CLAWRL__TRAIN__OPD", "sampled"),
        ("CLAWRL__TRAIN__TEACHER_FROM", "upstream"),
    ];
    let f = start_fleet("sglang", 1, &teacher_upstream);
    let replica = &f.replicas[0];
    // Captured as a local run records it, asked plainly and streamed.
    captured_like_a_local_run(&f);

    // The replica's own SGLang routes: the reply's log-probs again as prompt log-probs
    // (what a teacher reads), and bad requests refused naming the field.
    let turn = captured(&f.plane, "Name a fruit.");
    let prompt: Vec<Value> = turn["prompt_ids"].as_array().unwrap().clone();
    let mut both = prompt.clone();
    both.extend(turn["response_ids"].as_array().unwrap().iter().cloned());
    let scored = generate(
        replica,
        &json!({"input_ids": both, "sampling_params": {"max_new_tokens": 1, "temperature": 0},
                "return_logprob": true, "logprob_start_len": prompt.len(), "top_logprobs_num": 2}),
    );
    let (ids, lps) = entries(&scored["meta_info"]["input_token_logprobs"]);
    assert_eq!(json!(ids), turn["response_ids"]);
    let tops = scored["meta_info"]["input_top_logprobs"]
        .as_array()
        .unwrap();
    assert_eq!(tops.len(), ids.len());
    assert_eq!(tops[0].as_array().unwrap().len(), 2);
    let lps: Vec<f64> = lps.iter().map(|v| v.as_f64().unwrap()).collect();
    let captured_lps: Vec<f64> = turn["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (a, b) in lps.iter().zip(&captured_lps) {
        assert!((a - b).abs() < 1e-3, "{lps:?} vs {captured_lps:?}");
    }
    for (body, field) in [
        (
            json!({"input_ids": [1, 2], "lora_path": "nope"}),
            "not loaded",
        ),
        (
            json!({"input_ids": [1, 2], "return_logprob": true, "top_logprobs_num": 21}),
            "top_logprobs_num",
        ),
        (
            json!({"input_ids": [1, 2], "return_logprob": true, "logprob_start_len": 2}),
            "logprob_start_len",
        ),
        (json!({"text": null}), "`input_ids` or `text` is required"),
        (
            json!({"input_ids": [1, 2], "sampling_params": {"temperature": 3}}),
            "temperature",
        ),
    ] {
        let (st, _, text) = replica.request("POST", "/generate", &[], &body.to_string(), true);
        assert_eq!(st, 400, "{body}: {text}");
        assert!(text.contains(field), "{body}: {text}");
    }

    // A reply rated down and corrected: v1 distils from the user's words, the teacher's
    // log-probs computed by the replica; v1 is loaded into it through /load_lora_adapter.
    let first_in = |session: &str| {
        let turns = f.plane.export();
        turns
            .into_iter()
            .find(|t| t["session_id"] == session)
            .unwrap()
    };
    let fruit = first_in("conv-1");
    let correction = json!({"messages": [
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": fruit["response_text"]},
        {"role": "user", "content": "Shorter please: one word."}], "max_tokens": 4, "temperature": 0});
    let (st, r) = f.plane.chat(&[("X-Session-Id", "conv-1")], &correction);
    assert_eq!(st, 200, "{r}");
    let down = json!({"response_id": fruit["response_id"], "rating": "down"}).to_string();
    let (st, _, text) = f.plane.request("POST", "/v1/feedback", &[], &down, true);
    assert_eq!(st, 200, "{text}");
    wait_for("v1 live", 600, || {
        f.plane.admin_status()["live_version"] == 1
    });
    let fruit = first_in("conv-1");
    let choice = &fruit["hint_choices"][0];
    let chosen = &choice["candidates"][choice["chosen"].as_u64().unwrap() as usize];
    assert_eq!(chosen["text"], "Shorter please: one word.", "{fruit:#}");
    let replica_url = format!("http://127.0.0.1:{}", replica.port);
    assert_eq!(chosen["scored_by"], replica_url.as_str(), "{fruit:#}");
    let q = "Name a colour.";
    ask(&f.plane, q, "conv-2");
    let turn = captured(&f.plane, q);
    assert_eq!(turn["adapter_version"], 1);
    let body = json!({"input_ids": turn["prompt_ids"], "lora_path": "clawrl-v1", "return_logprob": true,
                      "sampling_params": {"max_new_tokens": 10, "temperature": 0}});
    let direct = generate(replica, &body);
    assert_eq!(direct["output_ids"], turn["response_ids"]);
    let (_, lps) = entries(&direct["meta_info"]["output_token_logprobs"]);
    close(&json!(lps), &turn["logprobs"]);

    // The replica lost it (a restart): the plane loads it again and serves v1.
    let unload = json!({"lora_name": "clawrl-v1"}).to_string();
    let (st, _, text) = replica.request("POST", "/unload_lora_adapter", &[], &unload, true);
    assert_eq!(st, 200, "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["success"],
        true
    );
    let (st, _, text) = replica.request("POST", "/unload_lora_adapter", &[], &unload, true);
    assert_eq!(st, 400, "{text}");
    assert!(text.contains("\"success\":false"), "{text}");
    let q = "Name a vegetable.";
    ask(&f.plane, q, "conv-2");
    assert_eq!(captured(&f.plane, q)["adapter_version"], 1);

    rollback_is_served_by_the_next_request(&f);
}
