//! Crashes, repeatedly, at the worst moments (docs/RELIABILITY.md): `kill -9` while replies
//! stream, and an abrupt end (`CLAWRL_FAILPOINT`: the process aborts, as a power cut would) in
//! the middle of a training step and of an adapter write. After each restart the store opens,
//! every acknowledged turn is there, and the live version is the last one fully written.

mod common;
use common::server::Server;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::time::Duration;

/// Streams a reply of at most `max_tokens`; returns its response id if the stream ended with a
/// finish reason (the client saw the turn complete).
fn stream_to_the_end(port: u16, key: &str, text: &str, max_tokens: u32) -> Option<String> {
    use std::io::{Read, Write};
    let body = json!({"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "stream": true})
        .to_string();
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    write!(c, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\n\r\n{body}", body.len()).ok()?;
    let mut text = String::new();
    let _ = c.read_to_string(&mut text);
    let finished = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .find_map(|d| {
            let v: Value = serde_json::from_str(d).ok()?;
            v["choices"][0]["finish_reason"]
                .is_string()
                .then(|| v["id"].as_str().unwrap().to_string())
        });
    finished.filter(|_| text.contains("data: [DONE]"))
}

fn stored_ids(s: &Server) -> HashSet<String> {
    s.export()
        .iter()
        .map(|t| t["response_id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn kill_9_while_replies_stream_loses_no_acknowledged_turn() {
    let mut s = Server::start(&[]);
    let (mut acknowledged, mut cut) = (Vec::new(), 0);
    for (round, after_ms) in [0u64, 100, 300, 600].into_iter().enumerate() {
        let (port, key) = (s.port, s.key.clone());
        let client = |i: usize, max_tokens: u32| {
            let key = key.clone();
            std::thread::spawn(move || {
                let text = format!("Round {round}, client {i}: tell me about rivers.");
                stream_to_the_end(port, &key, &text, max_tokens)
            })
        };
        // A short reply completes while two long ones still stream; then the kill.
        let (short, long) = (client(0, 8), [client(1, 512), client(2, 512)]);
        let done = short.join().unwrap();
        assert!(done.is_some(), "round {round}: the short reply completed");
        acknowledged.extend(done);
        std::thread::sleep(Duration::from_millis(after_ms));
        s = s.crash_and_restart(&[]);
        for c in long {
            match c.join().unwrap() {
                Some(id) => acknowledged.push(id),
                None => cut += 1,
            }
        }
        let stored = stored_ids(&s);
        let lost: Vec<&String> = acknowledged
            .iter()
            .filter(|a| !stored.contains(*a))
            .collect();
        assert!(
            lost.is_empty(),
            "round {round}: acknowledged but lost: {lost:?}"
        );
        assert_eq!(serves(&s), 200, "round {round}");
    }
    // Every round acknowledged a turn before its crash, and the crashes cut streams.
    assert!(acknowledged.len() >= 4, "{acknowledged:?}");
    assert!(
        cut > 0,
        "no stream was cut: the kills came after every reply"
    );
    eprintln!(
        "{} acknowledged turns kept, {cut} streams cut, across 4 crashes",
        acknowledged.len()
    );
}

/// The status of a small chat request.
fn serves(s: &Server) -> u16 {
    let hi = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    s.chat(&[], &hi).0
}

#[test]
fn a_crash_in_a_training_step_or_an_adapter_write_leaves_the_last_complete_version_live() {
    let train = [
        ("CLAWRL__TRAIN__ENABLED", "true"),
        ("CLAWRL__TRAIN__MIN_SAMPLES", "3"),
    ];
    for point in ["train.step", "adapter.write"] {
        let mut env = train.to_vec();
        env.push(("CLAWRL_FAILPOINT", point));
        let mut s = Server::start(&env);
        let rated: Vec<String> = ["Name a planet.", "Name a river.", "Name a colour."]
            .iter()
            .map(|q| s.rated(q))
            .collect();
        // Training starts on the three rated turns and the process dies where `point` says.
        let exit = s.wait_exit(point, 300);
        assert!(!exit.success(), "{point}: {exit:?}");
        let s = s.crash_and_restart(&train);
        // The restarted engine serves the base model: nothing half-written went live.
        let log = s.log();
        let ready = log.lines().rfind(|l| l.contains("engine ready"));
        assert!(
            ready.is_some_and(|l| l.ends_with("live_version=0")),
            "{point}: {ready:?}"
        );
        let stored = stored_ids(&s);
        assert!(rated.iter().all(|r| stored.contains(r)), "{point}");
        assert_eq!(serves(&s), 200, "{point}");
        // The rated turns were not lost to the crash: they train the version it interrupted.
        let st = s.wait_for_status("the retrained version", 300, |st| {
            st["versions"] == 1 && st["trainer"]["state"] != "guarding"
        });
        assert_eq!(st["trainer"]["last_error"], Value::Null, "{point}: {st:#}");
        let trained = s
            .export()
            .into_iter()
            .filter(|t| t["trained_in"] == json!([1]))
            .count();
        assert_eq!(trained, 3, "{point}");
        let leftovers: Vec<String> = std::fs::read_dir(s.data.path().join("adapters"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{point}: {leftovers:?}");
    }
}

/// Sets the server's file-size limit (`prlimit`): with `Some(1)` every write past the first
/// byte of a file fails (EFBIG), as on a full disk.
fn limit_file_size(s: &Server, bytes: Option<u64>) {
    let soft = bytes.map_or("unlimited".to_string(), |b| b.to_string());
    let ok = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", s.child.id()))
        .arg(format!("--fsize={soft}:unlimited"))
        .status()
        .unwrap()
        .success();
    assert!(ok, "prlimit (util-linux) is needed");
}

#[test]
fn a_store_that_cannot_be_written_costs_turns_their_capture_not_their_replies() {
    let s = Server::start(&[]);
    let ask = |text: &str, stream: bool| {
        s.chat(&[], &json!({"messages": [{"role": "user", "content": text}], "max_tokens": 4, "stream": stream}))
    };
    let (st, first) = ask("Marker c1: name a planet.", false);
    assert_eq!(st, 200);
    limit_file_size(&s, Some(1));
    let (st, r) = ask("Marker c2: name a river.", false);
    assert_eq!(st, 200, "served though not captured: {r}");
    assert!(r["choices"][0]["message"]["content"].is_string(), "{r}");
    let (st, chunks) = ask("Marker c3: name a colour.", true);
    assert_eq!(st, 200);
    assert_eq!(chunks.as_array().unwrap().last().unwrap(), "[DONE]");
    assert!(s.metric("clawrl_capture_errors_total") >= 2.0);
    assert_eq!(s.get("/health", false).0, 200);
    // Space again: capture resumes, and nothing stored before was lost.
    limit_file_size(&s, None);
    let (st, _) = ask("Marker c4: name a city.", false);
    assert_eq!(st, 200);
    let markers: Vec<String> = s
        .export()
        .iter()
        .filter_map(|t| {
            let m = t["request_messages"].to_string();
            ["c1", "c2", "c3", "c4"]
                .into_iter()
                .find(|c| m.contains(&format!("Marker {c}")))
                .map(str::to_string)
        })
        .collect();
    assert_eq!(markers, ["c1", "c4"], "stored turns");
    assert!(first["id"].is_string());
}
