//! The engine on the real default model: background work (the judge) never holds up a user
//! request, not even while its long prompt is being computed, and neither does another user's
//! long prompt; adapter versions swap between
//! requests, never inside one; scoring compares versions.

mod common;
use clawrl_core::config::Config;
use clawrl_core::engine::{
    AdapterCommand, Engine, EngineEvent, Job, Priority, Prompt, Status, Task, VersionChoice,
};
use clawrl_core::telemetry::Counters;
use clawrl_model::SamplingParams;
use clawrl_model::messages::Message;
use clawrl_model::{LoraAdapter, LoraConfig, Target};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

fn engine() -> Engine {
    let mut cfg = Config::default();
    cfg.model.path = common::model_path(common::SMOLLM2).display().to_string();
    // The exact cache: these tests compare the engine's paths with each other to 1e-4; the f16
    // cache's own tolerance is tests/model_reference.rs's.
    cfg.model.kv_cache = clawrl_model::KvDtype::F32;
    let engine = Engine::start(
        clawrl_core::engine::EngineConfig::policy(&cfg).unwrap(),
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
        messages: vec![Message::user(text)],
        tools: None,
        reply_prefix: if matches!(task, Task::Choose { .. }) {
            "\\boxed{".into()
        } else {
            String::new()
        },
    };
    let (job, rx) = Job::new(prompt, task, VersionChoice::Live, priority);
    engine.submit(job).unwrap();
    rx
}

/// Waits for the job's final event; returns when it came.
fn finish(mut rx: UnboundedReceiver<EngineEvent>) -> (Instant, EngineEvent) {
    loop {
        if let e @ (EngineEvent::Finished { .. }
        | EngineEvent::Chosen { .. }
        | EngineEvent::Failed(_)) = rx.blocking_recv().expect("the engine answers")
        {
            return (Instant::now(), e);
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

#[test]
fn a_short_request_overtakes_a_long_user_prompt() {
    let engine = engine();
    let generate = |max_tokens| Task::Generate {
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        top_logprobs: 0,
    };
    // ~3 K tokens: computed a chunk per round, between the other requests' tokens.
    let long: String = (0..600).map(|i| format!("item {i}, ")).collect();
    let mut long_rx = submit(&engine, &long, generate(1), Priority::User);
    std::thread::sleep(Duration::from_millis(50));
    let short = submit(&engine, "Hi", generate(2), Priority::User);
    let (_, short_event) = finish(short);
    assert!(
        matches!(short_event, EngineEvent::Finished { .. }),
        "{short_event:?}"
    );
    assert!(
        long_rx.try_recv().is_err(),
        "the short request finished while the long prompt was still being computed"
    );
    let (_, long_event) = finish(long_rx);
    let EngineEvent::Finished { prompt_ids, .. } = long_event else {
        panic!("{long_event:?}")
    };
    assert!(prompt_ids.len() > 2500, "{}", prompt_ids.len());
}

/// Two clients sending requests back to back until `stop`; returns when each request finished.
fn back_to_back_load(
    engine: &Engine,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<Vec<Instant>>> {
    (0..2)
        .map(|client| {
            let (engine, stop) = (engine.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut done = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let task = Task::Generate {
                        max_tokens: 48,
                        sampling: SamplingParams::greedy(),
                        stop: vec![],
                        top_logprobs: 0,
                    };
                    let text = format!("Client {client}: tell me a story, part {}.", done.len());
                    let (at, e) = finish(submit(&engine, &text, task, Priority::User));
                    assert!(matches!(e, EngineEvent::Finished { .. }), "{e:?}");
                    done.push(at);
                }
                done
            })
        })
        .collect()
}

#[test]
fn background_work_gets_its_share_while_clients_never_pause() {
    // engine.background_share (0.2 by default): background work runs while user requests
    // keep the engine busy, instead of waiting for a pause that an agent never makes
    // (issue 25: a candidate waited in the guard for 6 minutes under such load).
    let engine = engine();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = back_to_back_load(&engine, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    // The engine's own background work: a judge prompt of ~1 K tokens.
    let long: String = (0..200).map(|i| format!("item {i}, ")).collect();
    let choose = Task::Choose {
        options: vec!["1}".into(), "0}".into(), "-1}".into()],
    };
    let mut judge = submit(&engine, &long, choose, Priority::Background);
    let asked = Instant::now();
    let judged_at = loop {
        match judge.try_recv() {
            Ok(EngineEvent::Chosen { .. }) => break Instant::now(),
            Ok(e) => panic!("{e:?}"),
            Err(_) => {
                // Stop the clients either way, so that a failure does not hang the test.
                if asked.elapsed() > Duration::from_secs(120) {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    panic!("the judge prompt waited 120 s while the clients kept the engine busy");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    // Another thread's (the trainer's): the engine pauses serving for it, which the trainer
    // sees as serving not busy although requests wait.
    let demand = clawrl_model::background::Demand::hold();
    let (mut polls, mut paused) = (0u32, 0u32);
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(4) {
        polls += 1;
        paused += !engine.serving_busy() as u32;
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(demand);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let finished: Vec<Instant> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    let after_judge = finished.iter().filter(|&&t| t > judged_at).count();
    assert!(
        after_judge >= 2,
        "the judge prompt finished while the clients were still being served ({after_judge} requests after it)"
    );
    let share = paused as f64 / polls as f64;
    assert!(
        (0.08..0.5).contains(&share),
        "serving paused for the trainer {:.0} % of the time (engine.background_share 20 %)",
        share * 100.0
    );
}

/// A greedy generation of `max_tokens` for `text` under the live version; returns its final
/// event once finished, after running `meanwhile` when the first token arrived.
fn generate_with(
    engine: &Engine,
    text: &str,
    max_tokens: usize,
    meanwhile: impl FnOnce(),
) -> EngineEvent {
    let task = Task::Generate {
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        top_logprobs: 0,
    };
    let mut rx = submit(engine, text, task, Priority::User);
    let mut meanwhile = Some(meanwhile);
    loop {
        match rx.blocking_recv().expect("the engine answers") {
            EngineEvent::Text(_) => {
                if let Some(f) = meanwhile.take() {
                    f();
                }
            }
            e @ (EngineEvent::Finished { .. } | EngineEvent::Failed(_)) => return e,
            _ => {}
        }
    }
}

fn finished(e: EngineEvent) -> (Vec<f32>, String, i64, usize) {
    match e {
        EngineEvent::Finished {
            generation,
            adapter_version,
            cached_tokens,
            ..
        } => (
            generation.logprobs,
            generation.text,
            adapter_version,
            cached_tokens,
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_swap_of_the_live_version_applies_to_the_next_request_never_to_one_in_flight() {
    let engine = engine();
    let model = engine.model().expect("loaded");
    // An adapter that changes the model: random A and B.
    let adapter = common::random_adapter(&model, 4, 5);
    engine
        .command(AdapterCommand::Install {
            version: 1,
            adapter: Arc::new(adapter),
        })
        .unwrap();
    let prompt = "List three fruits.";
    let (base_lp, base_text, v, _) = finished(generate_with(&engine, prompt, 12, || {}));
    assert_eq!(v, 0, "the base model serves until a version goes live");

    // The live version changes while a request is generating: it finishes on v0.
    let (lp, text, v, _) = finished(generate_with(&engine, prompt, 12, || {
        engine.set_live_blocking(1).unwrap()
    }));
    assert_eq!(engine.live_version(), 1);
    assert_eq!(
        v, 0,
        "the request in flight keeps the version it started with"
    );
    assert_eq!(text, base_text);
    for (a, b) in lp.iter().zip(&base_lp) {
        assert!((a - b).abs() < 1e-3, "{a} vs {b}");
    }

    // The next request is served by v1, and never from v0's cached prompt.
    let (lp1, _, v, cached) = finished(generate_with(&engine, prompt, 12, || {}));
    assert_eq!(v, 1);
    assert_eq!(cached, 0, "v0's KV cache is not reused under v1");
    assert!(
        lp1.iter().zip(&base_lp).any(|(a, b)| (a - b).abs() > 1e-3),
        "the adapter changes the log-probs"
    );

    // Back to the base model: the same log-probs as before the swap (its prompt cache is v0's).
    engine.set_live_blocking(0).unwrap();
    let (lp0, text0, v, _) = finished(generate_with(&engine, prompt, 12, || {}));
    assert_eq!((v, text0), (0, base_text));
    for (a, b) in lp0.iter().zip(&base_lp) {
        assert!((a - b).abs() < 1e-3, "{a} vs {b}");
    }
    // A version the engine does not hold cannot go live; the live version stays.
    assert!(engine.set_live_blocking(7).is_err());
    assert_eq!(engine.live_version(), 0);
}

#[test]
fn scoring_compares_versions_token_by_token() {
    let engine = engine();
    let model = engine.model().expect("loaded");
    let prompt = model
        .chat_prompt(&[Message::user("What is 2+2?")], None)
        .unwrap();
    let continuation = model
        .tokenizer
        .encode_prompt(
            "The answer is 4.",
            &clawrl_model::tokenizer::QuotedSpecials::new(),
        )
        .unwrap();
    let fresh = LoraAdapter::init(
        &model.config,
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: Target::ALL.to_vec(),
        },
        &model.transformer.device(),
        1,
    );
    engine
        .command(AdapterCommand::Install {
            version: 2,
            adapter: Arc::new(fresh),
        })
        .unwrap();
    let (own, dist) = engine
        .score_blocking(Prompt::Ids(prompt.clone()), continuation.clone(), 2, true)
        .unwrap();
    assert_eq!(own.len(), continuation.len());
    let expected = model.score(&prompt, &continuation, None).unwrap();
    for (a, b) in own.iter().zip(&expected) {
        assert!(
            (a - b).abs() < 1e-4,
            "a fresh adapter scores like the base: {a} vs {b}"
        );
    }
    let dist = dist.expect("distributions were asked for");
    assert_eq!(dist.dims(), [continuation.len(), model.config.vocab_size]);
    let (base, base_dist) = engine
        .score_blocking(Prompt::Ids(prompt.clone()), continuation.clone(), 0, true)
        .unwrap();
    for (a, b) in own.iter().zip(&base) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    let kl = clawrl_model::scoring::kl_per_position(dist, base_dist.unwrap());
    assert!(kl.iter().all(|k| k.abs() < 1e-4), "{kl:?}");
    // A long continuation goes through in several background chunks: same as one pass.
    let long: Vec<u32> = continuation.iter().cycle().take(150).copied().collect();
    let (chunked, _) = engine
        .score_blocking(Prompt::Ids(prompt.clone()), long.clone(), 0, false)
        .unwrap();
    let whole = model.score(&prompt, &long, None).unwrap();
    assert_eq!(chunked.len(), 150);
    for (a, b) in chunked.iter().zip(&whole) {
        assert!((a - b).abs() < 1e-3, "{a} vs {b}");
    }
    let err = engine
        .score_blocking(Prompt::Ids(prompt), continuation, 9, false)
        .unwrap_err();
    assert!(err.to_string().contains("version 9"), "{err}");
}
