//! The core in-process (as the TUI will run it): every capture step is a typed event on the
//! bus, and idle sessions close after the configured timeout.

mod common;
use clawrl_tui::config::Config;
use clawrl_tui::events::Event;
use serde_json::json;
use std::time::Duration;

async fn post(port: u16, body: serde_json::Value) -> serde_json::Value {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let body = body.to_string();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        serde_json::from_str(out.split_once("\r\n\r\n").unwrap().1).unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_steps_are_published_on_the_event_bus() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.paths.data_dir = data.path().display().to_string();
    cfg.model.path = common::model_path(common::SMOLLM2).display().to_string();
    cfg.server.session_idle_secs = 2;
    cfg.judge.backend = clawrl_tui::config::JudgeBackend::Off; // tests/judge.rs covers it
    let state = clawrl_tui::app::build(&cfg).unwrap();
    let mut events = state.bus.subscribe();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(clawrl_tui::server::serve(listener, state.clone(), async {
        let _ = stop_rx.await;
    }));

    let ready = tokio::time::timeout(Duration::from_secs(60), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(ready, Event::EngineReady { .. }), "{ready:?}");

    let m1 = json!([{"role": "user", "content": "Hi"}]);
    let r1 = post(
        port,
        json!({"messages": m1, "max_tokens": 4, "temperature": 0}),
    )
    .await;
    let a1 = r1["choices"][0]["message"]["content"].clone();
    post(port, json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": a1}, {"role": "user", "content": "Bye"}], "max_tokens": 4})).await;

    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !seen
        .iter()
        .any(|e| matches!(e, Event::SessionClosed { .. }))
    {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(e)) => seen.push(e),
            other => panic!("no idle close within the deadline: {other:?}; saw {seen:#?}"),
        }
    }
    let kinds: Vec<&str> = seen
        .iter()
        .map(|e| match e {
            Event::RequestStarted { .. } => "started",
            Event::RequestFinished { .. } => "finished",
            Event::TurnCaptured { .. } => "captured",
            Event::NextStateAttached { .. } => "next_state",
            Event::SessionClosed { .. } => "closed",
            Event::EngineReady { .. } => "ready",
            Event::TurnJudged { .. } => "judged",
            Event::JudgeQueue { .. } => "judge_queue",
            Event::FeedbackRecorded { .. } => "feedback",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "started",
            "captured",
            "finished",
            "next_state",
            "started",
            "captured",
            "finished",
            "closed"
        ],
        "{seen:#?}"
    );
    let Event::TurnCaptured {
        turn_id,
        session_id,
        ..
    } = &seen[1]
    else {
        unreachable!()
    };
    assert!(
        matches!(&seen[3], Event::NextStateAttached { turn_id: t, session_id: s, role } if t == turn_id && s == session_id && role == "user")
    );
    assert!(
        matches!(&seen[7], Event::SessionClosed { session_id: s, reason, .. } if s == session_id && reason == "idle")
    );

    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}
