//! The engine's priorities on the real default model: background work (the judge) never holds
//! up a user request, not even while its long prompt is being computed.

mod common;
use clawrl_tui::config::Config;
use clawrl_tui::engine::{Engine, EngineEvent, Job, Priority, Prompt, Status, Task, Version};
use clawrl_tui::model::SamplingParams;
use clawrl_tui::telemetry::Counters;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

fn engine() -> Engine {
    let mut cfg = Config::default();
    cfg.model.path = common::model_path(common::SMOLLM2).display().to_string();
    let engine = Engine::start(
        clawrl_tui::app::engine_config(&cfg).unwrap(),
        Arc::new(Counters::default()),
        |_| (0, None),
        |_| {},
    );
    let t = Instant::now();
    while engine.status() != Status::Ready {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{:?}",
            engine.status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    engine
}

fn submit(
    engine: &Engine,
    text: &str,
    task: Task,
    priority: Priority,
) -> UnboundedReceiver<EngineEvent> {
    let prompt = Prompt::Chat {
        messages: vec![json!({"role": "user", "content": text})],
        tools: None,
        reply_prefix: if matches!(task, Task::Choose { .. }) {
            "\\boxed{".into()
        } else {
            String::new()
        },
    };
    let (job, rx) = Job::new(prompt, task, Version::Live, priority);
    engine.submit(job).unwrap();
    rx
}

/// Waits for the job's final event; returns when it came.
fn finish(mut rx: UnboundedReceiver<EngineEvent>) -> (Instant, EngineEvent) {
    loop {
        match rx.blocking_recv().expect("the engine answers") {
            e @ (EngineEvent::Finished { .. }
            | EngineEvent::Chosen { .. }
            | EngineEvent::Failed(_)) => {
                return (Instant::now(), e);
            }
            _ => {}
        }
    }
}

#[test]
fn a_user_request_overtakes_a_long_background_prompt() {
    let engine = engine();
    // ~1 K tokens: many background chunks.
    let long: String = (0..200).map(|i| format!("item {i}, ")).collect();
    let choose = Task::Choose {
        options: vec!["1}".into(), "0}".into(), "-1}".into()],
    };
    let bg = submit(&engine, &long, choose, Priority::Background);
    std::thread::sleep(Duration::from_millis(50)); // the engine is computing the long prompt
    let generate = Task::Generate {
        max_tokens: 2,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        top_logprobs: 0,
    };
    let user = submit(&engine, "Hi", generate, Priority::User);
    let (user_done, user_event) = finish(user);
    let (bg_done, bg_event) = finish(bg);
    assert!(
        matches!(user_event, EngineEvent::Finished { .. }),
        "{user_event:?}"
    );
    let EngineEvent::Chosen { logprobs } = bg_event else {
        panic!("{bg_event:?}")
    };
    assert_eq!(logprobs.len(), 3);
    assert!(
        logprobs.iter().all(|l| l.is_finite() && *l < 0.0),
        "{logprobs:?}"
    );
    assert!(user_done < bg_done, "the user request finished first");

    // The same background prompt again: computed from the prefix cache, same answer.
    let choose = Task::Choose {
        options: vec!["1}".into(), "0}".into(), "-1}".into()],
    };
    let (_, again) = finish(submit(&engine, &long, choose, Priority::Background));
    let EngineEvent::Chosen { logprobs: again } = again else {
        panic!("{again:?}")
    };
    for (a, b) in logprobs.iter().zip(&again) {
        assert!((a - b).abs() < 1e-3, "{a} vs {b}");
    }
}
