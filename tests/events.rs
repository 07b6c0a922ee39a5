//! The core in-process (as the TUI will run it): every capture step, judge verdict, training
//! step and gate decision is a typed event on the bus, and idle sessions close after the
//! configured timeout.

mod common;
use clawrl_core::config::Config;
use clawrl_core::events::{CloseReason, Event, NextRole};
use serde_json::json;
use std::time::Duration;

async fn post(port: u16, body: serde_json::Value) -> serde_json::Value {
    post_to(port, "/v1/chat/completions", body).await
}

async fn post_to(port: u16, path: &'static str, body: serde_json::Value) -> serde_json::Value {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let body = body.to_string();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        serde_json::from_str(out.split_once("\r\n\r\n").unwrap().1).unwrap()
    })
    .await
    .unwrap()
}

/// The core served in-process on a loopback port (as the TUI will run it), with its own data
/// directory, subscribed to the bus before anything happens.
struct Core {
    state: std::sync::Arc<clawrl_server::Core>,
    events: tokio::sync::broadcast::Receiver<Event>,
    port: u16,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    _data: tempfile::TempDir,
}

impl Core {
    async fn start(tune: impl FnOnce(&mut Config)) -> Self {
        let data = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.paths.data_dir = data.path().display().to_string();
        cfg.model.path = common::model_path(common::SMOLLM2).display().to_string();
        // The trainer would compete for the CPU; tests that train turn it on.
        cfg.train.enabled = false;
        tune(&mut cfg);
        let state = clawrl_core::build(&cfg).unwrap();
        let events = state.bus.subscribe();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(clawrl_server::serve(listener, state.clone(), async {
            let _ = stop_rx.await;
        }));
        Self {
            state,
            events,
            port,
            stop,
            server,
            _data: data,
        }
    }

    /// A core that trains on every sample at once (judge off), once its engine is ready.
    async fn training(tune: impl FnOnce(&mut Config)) -> Self {
        let mut core = Self::start(|cfg| {
            cfg.judge.backend = clawrl_core::config::JudgeBackend::Off;
            cfg.train.enabled = true;
            cfg.train.min_samples = 1;
            tune(cfg);
        })
        .await;
        wait_event(&mut core.events, "the engine", |e| {
            matches!(e, Event::EngineReady { .. })
        })
        .await;
        core
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.server.await.unwrap().unwrap();
    }
}

/// Waits for the next event of a kind and binds its fields:
/// `next_event!(events, "a candidate", Event::CandidateReady { version, .. });`
macro_rules! next_event {
    ($events:expr, $what:expr, Event::$kind:ident { $($fields:tt)* }) => {
        let Event::$kind { $($fields)* } =
            wait_event($events, $what, |e| matches!(e, Event::$kind { .. })).await
        else {
            unreachable!()
        };
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_steps_are_published_on_the_event_bus() {
    let mut core = Core::start(|cfg| {
        cfg.server.session_idle_secs = 2;
        cfg.judge.backend = clawrl_core::config::JudgeBackend::Off; // covered below
    })
    .await;
    let (port, events) = (core.port, &mut core.events);

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
    // The reply's text streams on the bus as it is generated, then the request finishes.
    let streamed: String = seen
        .iter()
        .filter_map(|e| match e {
            Event::RequestText { request_id, text } if request_id == r1["id"].as_str().unwrap() => {
                Some(text.as_str())
            }
            _ => None,
        })
        .collect();
    assert_eq!(streamed, a1.as_str().unwrap());
    seen.retain(|e| !matches!(e, Event::RequestText { .. }));
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
            _ => "training",
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
        matches!(&seen[3], Event::NextStateAttached { turn_id: t, session_id: s, role } if t == turn_id && s == session_id && *role == NextRole::User)
    );
    assert!(
        matches!(&seen[7], Event::SessionClosed { session_id: s, reason, .. } if s == session_id && *reason == CloseReason::Idle)
    );
    assert!(
        matches!(&seen[2], Event::RequestFinished { request_id, adapter_version: 0, finish_reason, .. }
            if request_id == r1["id"].as_str().unwrap() && *finish_reason != clawrl_core::events::Finish::ToolCalls),
        "{:?}",
        seen[2]
    );

    a_client_gone_mid_stream_ends_its_request_once(port, &mut core.events).await;
    core.stop().await;
}

/// A client that goes away mid-stream: the request ends with exactly one `RequestCancelled`.
async fn a_client_gone_mid_stream_ends_its_request_once(
    port: u16,
    events: &mut tokio::sync::broadcast::Receiver<Event>,
) {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let body = json!({"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400, "stream": true}).to_string();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut first = [0u8; 512];
        let _ = s.read(&mut first).unwrap();
        // Dropping the stream closes the connection.
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (mut started, mut ends) = (None, Vec::new());
    while ends.is_empty() {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(Event::RequestStarted { request_id, .. })) => started = Some(request_id),
            Ok(Ok(
                e @ (Event::RequestFinished { .. }
                | Event::RequestFailed { .. }
                | Event::RequestCancelled { .. }),
            )) => ends.push(e),
            Ok(Ok(_)) => {}
            other => panic!("no final event: {other:?}"),
        }
    }
    let request_id = started.expect("the request started");
    assert_eq!(ends, [Event::RequestCancelled { request_id }]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn judge_verdicts_queue_depth_feedback_and_no_signal_are_published() {
    let mut core = Core::start(|cfg| {
        cfg.server.session_idle_secs = 3;
        cfg.judge.hints = false; // the local judge in direct mode: one prefill per turn
        cfg.judge.model.clear(); // on the policy's base model: the quickest to load
    })
    .await;
    let (port, state, events) = (core.port, core.state.clone(), &mut core.events);

    while state.engine.status() != clawrl_core::engine::Status::Ready {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m1 = json!([{"role": "user", "content": "Hi"}]);
    let r1 = post(
        port,
        json!({"messages": m1, "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert!(r1["choices"].is_array(), "{r1}");
    let a1 = r1["choices"][0]["message"]["content"].clone();
    post(port, json!({"messages": [m1[0], {"role": "assistant", "content": a1}, {"role": "user", "content": "Thanks!"}], "max_tokens": 4})).await;

    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    // The verdict, the idle close, and the judge's queue back to empty: the last depth is
    // published after the verdict, and under load after the close too.
    let done = |seen: &[Event]| {
        let last_depth = seen.iter().rev().find_map(|e| match e {
            Event::JudgeQueue { pending } => Some(*pending),
            _ => None,
        });
        seen.iter().any(|e| matches!(e, Event::TurnJudged { .. }))
            && seen
                .iter()
                .any(|e| matches!(e, Event::SessionClosed { .. }))
            && last_depth == Some(0)
    };
    while !done(&seen) {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(e)) => seen.push(e),
            other => panic!("no verdict and idle close in time: {other:?}; saw {seen:#?}"),
        }
    }
    let first_turn = seen
        .iter()
        .find_map(|e| match e {
            Event::TurnCaptured { turn_id, .. } => Some(*turn_id),
            _ => None,
        })
        .unwrap();
    let judged = seen
        .iter()
        .position(|e| matches!(e, Event::TurnJudged { .. }))
        .unwrap();
    let Event::TurnJudged {
        turn_id,
        votes,
        error,
        ..
    } = &seen[judged]
    else {
        unreachable!()
    };
    assert_eq!(*turn_id, first_turn);
    assert_eq!(votes.len(), 3);
    assert!(
        votes.iter().all(Option::is_some),
        "direct votes are valid: {votes:?}"
    );
    assert!(error.is_none(), "{error:?}");
    let depths: Vec<usize> = seen
        .iter()
        .filter_map(|e| match e {
            Event::JudgeQueue { pending } => Some(*pending),
            _ => None,
        })
        .collect();
    assert!(
        depths.contains(&1) && depths.last() == Some(&0),
        "{depths:?}"
    );
    assert!(
        seen.iter().any(|e| matches!(
            e,
            Event::SessionClosed {
                no_signal_turns: 1,
                ..
            }
        )),
        "the unanswered second turn carries no signal: {seen:#?}"
    );

    let r = post_to(
        port,
        "/v1/feedback",
        json!({"response_id": r1["id"], "rating": "up"}),
    )
    .await;
    assert_eq!(r["reward"], 1, "{r}");
    let fb = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(Event::FeedbackRecorded {
                turn_id, rating, ..
            }) = events.recv().await
            {
                return (turn_id, rating);
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(fb, (first_turn, 1));

    core.stop().await;
}

/// Waits for the first event that `want` accepts; fails with what was seen.
async fn wait_event(
    events: &mut tokio::sync::broadcast::Receiver<Event>,
    what: &str,
    want: impl Fn(&Event) -> bool,
) -> Event {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(e)) if want(&e) => return e,
            Ok(Ok(e)) => seen.push(e),
            other => panic!("no {what}: {other:?}; saw {seen:#?}"),
        }
    }
}

/// One short question, its reply rated `rating` ("up" or "down"): a training sample. Returns
/// the reply's id.
async fn ask_and_rate(port: u16, question: &str, rating: &str) -> serde_json::Value {
    let r = post(
        port,
        json!({"messages": [{"role": "user", "content": question}], "max_tokens": 8}),
    )
    .await;
    post_to(
        port,
        "/v1/feedback",
        json!({"response_id": r["id"], "rating": rating}),
    )
    .await;
    r["id"].clone()
}

/// Waits for the next update to start and checks it trains one sample, without hints, on v0.
async fn expect_one_sample_update_from_base(events: &mut tokio::sync::broadcast::Receiver<Event>) {
    let e = wait_event(events, "training started", |e| {
        matches!(e, Event::TrainingStarted { .. })
    })
    .await;
    let expected = Event::TrainingStarted {
        parent: 0,
        samples: 1,
        hints: 0,
    };
    assert_eq!(e, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_and_gate_decisions_are_published_on_the_event_bus() {
    let mut core = Core::training(|_| {}).await;
    let port = core.port;
    ask_and_rate(port, "Name a fruit.", "up").await;
    let events = &mut core.events;
    let e = wait_event(events, "samples waiting", |e| {
        matches!(e, Event::SamplesWaiting { samples: 1 })
    })
    .await;
    assert_eq!(e, Event::SamplesWaiting { samples: 1 });
    expect_one_sample_update_from_base(events).await;
    next_event!(
        events,
        "a training step",
        Event::TrainingStep {
            done,
            samples,
            loss,
            kl,
        }
    );
    assert_eq!((done, samples), (1, 1));
    assert!(
        loss.is_finite() && kl.abs() < 1e-6,
        "on-policy: {loss} {kl}"
    );
    next_event!(
        events,
        "a candidate",
        Event::CandidateReady {
            version,
            guard_passed,
            kl_base,
            mean_reward,
            ..
        }
    );
    assert_eq!((version, guard_passed, mean_reward), (1, true, Some(1.0)));
    assert!(kl_base.unwrap() >= 0.0);
    let e = wait_event(events, "v1 live", |e| {
        matches!(e, Event::VersionLive { .. })
    })
    .await;
    assert_eq!(
        e,
        Event::VersionLive {
            version: 1,
            previous: 0,
            reason: clawrl_core::events::LiveReason::Auto
        }
    );

    // Commands through the same core: pause, rollback.
    assert!(core.state.set_training_paused(true).unwrap());
    wait_event(events, "paused", |e| *e == Event::TrainingPaused).await;
    let c = core.state.clone();
    let rolled =
        tokio::task::spawn_blocking(move || c.rollback(None, "test").map_err(|e| e.to_string()))
            .await
            .unwrap();
    assert_eq!(rolled, Ok((1, 0)));
    let e = wait_event(events, "the rollback", |e| {
        matches!(e, Event::RolledBack { .. })
    })
    .await;
    assert_eq!(e, Event::RolledBack { from: 1, to: 0 });
    assert!(core.state.set_training_paused(false).unwrap());
    wait_event(events, "resumed", |e| *e == Event::TrainingResumed).await;
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_rated_down_with_nothing_to_move_toward_is_set_aside_not_trained_on() {
    let mut core = Core::training(|_| {}).await;
    let (port, store) = (core.port, core._data.path().join("clawrl.sqlite"));
    let id = ask_and_rate(port, "Name a colour.", "down").await;
    let events = &mut core.events;
    wait_event(events, "the sample waiting", |e| {
        matches!(e, Event::SamplesWaiting { samples: 1 })
    })
    .await;
    // Balanced rewards: one reply rated down, none rated up, no hint (judge off) → its reward
    // term is 0 and there is nothing else: set aside, no update.
    let e = wait_event(events, "the sample set aside", |e| {
        assert!(
            !matches!(e, Event::TrainingStarted { .. }),
            "trained on a reply rated down alone: {e:?}"
        );
        matches!(e, Event::SamplesSetAside { .. })
    })
    .await;
    let Event::SamplesSetAside { samples, reason } = e else {
        unreachable!()
    };
    assert_eq!(samples, 1);
    assert!(reason.contains("nothing to move toward"), "{reason}");
    wait_event(events, "no sample waiting", |e| {
        assert!(!matches!(e, Event::TrainingStarted { .. }), "{e:?}");
        matches!(e, Event::SamplesWaiting { samples: 0 })
    })
    .await;
    let store = clawrl_core::store::Store::open_read_only(&store).unwrap();
    let mut records = Vec::new();
    store
        .export(0, |r| {
            records.push(r);
            Ok(())
        })
        .unwrap();
    let turn = records.iter().find(|t| t["response_id"] == id).unwrap();
    assert!(
        turn["training_dropped"]
            .as_str()
            .is_some_and(|why| why.contains("nothing to move toward")),
        "{turn:#}"
    );
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_auto_a_refused_candidate_waits_while_training_goes_on_from_the_live_version() {
    let mut core = Core::training(|cfg| {
        cfg.gate.max_kl_base = 0.0; // any update at all is refused
        cfg.gate.repetition_tokens = 0;
    })
    .await;
    let port = core.port;
    for (i, question) in ["Name a fruit.", "Name a colour."].into_iter().enumerate() {
        ask_and_rate(port, question, "up").await;
        // Both updates start from the live base model, not from the refused v1.
        expect_one_sample_update_from_base(&mut core.events).await;
        next_event!(
            &mut core.events,
            "a candidate",
            Event::CandidateReady {
                version,
                guard_passed,
                ..
            }
        );
        assert_eq!((version, guard_passed), (i as i64 + 1, false));
    }
    let c = core.state.clone();
    let versions = tokio::task::spawn_blocking(move || c.versions().unwrap())
        .await
        .unwrap();
    let states: Vec<(i64, i64, &str)> = versions
        .iter()
        .map(|v| (v.id, v.parent, v.state.as_str()))
        .collect();
    assert_eq!(states, [(1, 0, "candidate"), (2, 0, "candidate")]);
    // Each started a fresh optimizer from the live v0: its first warmup step, full signal.
    let t = Config::default().train;
    let first_step = t.learning_rate / t.warmup_updates as f64;
    for v in &versions {
        let lr = v.metrics.learning_rate.unwrap();
        assert!(
            (lr - first_step).abs() < 1e-12,
            "v{}: {lr} vs {first_step}",
            v.id
        );
    }
    assert_eq!(core.state.engine.live_version(), 0);
    core.stop().await;
}
