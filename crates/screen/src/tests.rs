//! Whole-screen tests: the real `Screen` is driven with the core's events and key presses, drawn
//! on a `TestBackend` and compared with snapshots (insta); the commands it sends are checked.

use super::keymap::Keymap;
use super::panes::{self, PaneId};
use super::screen::{Header, Screen, View};
use super::state::{ServingSample, State};
use clawrl_core::commands::Command;
use clawrl_core::events::{CloseReason, Event, Finish, LiveReason, NextRole, TurnType};
use clawrl_core::store::{Judgment, NewTurn, Store, TurnRef, Vote};
use clawrl_core::telemetry::hardware::Hardware;
use clawrl_model::messages::Message;
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use serde_json::json;
use std::collections::BTreeMap;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

const NOW: i64 = 1_790_000_000_000;

fn app_with(keymap: Keymap) -> (Screen, UnboundedReceiver<Command>) {
    let (tx, rx) = unbounded_channel();
    let mut n = 0;
    let mut app = Screen::new(
        State::default(),
        keymap,
        Header {
            model_id: "smollm2-135m-instruct".into(),
            url: "http://127.0.0.1:30000/v1".into(),
        },
        tx,
        Box::new(move || {
            n += 1;
            format!("tui-test{n}")
        }),
    );
    app.now_ms = NOW;
    app.on_event(&Event::EngineReady {
        model: "SmolLM2".into(),
    });
    (app, rx)
}

fn app() -> (Screen, UnboundedReceiver<Command>) {
    app_with(Keymap::default())
}

fn screen(app: &mut Screen, width: u16, height: u16) -> TestBackend {
    let mut t = Terminal::new(TestBackend::new(width, height)).unwrap();
    t.draw(|f| panes::draw(f, app)).unwrap();
    t.backend().clone()
}

fn text(backend: &TestBackend) -> String {
    backend.to_string()
}

fn press(app: &mut Screen, code: KeyCode) {
    crate::input::on_key(app, KeyEvent::new(code, KeyModifiers::NONE));
}

fn char_key(app: &mut Screen, c: char) {
    press(app, KeyCode::Char(c));
}

fn type_text(app: &mut Screen, s: &str) {
    for c in s.chars() {
        char_key(app, c);
    }
}

fn commands(rx: &mut UnboundedReceiver<Command>) -> Vec<Command> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

fn hardware() -> Hardware {
    Hardware {
        gpus: Vec::new(),
        gpu_note: Some("no GPU (no NVML library)".into()),
        cpu_percent: 48.0,
        cpu_cores: 2,
        ram_used: 6 << 30,
        ram_total: 24 << 30,
        process_rss: 1400 << 20,
    }
}

/// A turn of `session` from request to judgment, as the core publishes it.
fn turn_events(session: &str, index: i64, turn_id: i64, asked: &str, reply: &[&str]) -> Vec<Event> {
    let request_id = format!("chatcmpl-{turn_id}");
    let mut events = vec![Event::RequestStarted {
        request_id: request_id.clone(),
        session_id: session.into(),
        turn_index: index,
        prompt_tokens: 40,
        cached_tokens: 0,
        last_message: asked.into(),
    }];
    for piece in reply {
        events.push(Event::RequestText {
            request_id: request_id.clone(),
            text: piece.to_string(),
        });
    }
    events.push(Event::RequestFinished {
        request_id,
        completion_tokens: reply.len(),
        finish_reason: Finish::Stop,
        adapter_version: 2,
    });
    events.push(Event::TurnCaptured {
        turn_id,
        session_id: session.into(),
        turn_index: index,
        turn_type: TurnType::Main,
    });
    events
}

fn judged(
    turn_id: i64,
    session: &str,
    votes: Vec<Option<i8>>,
    score: i8,
    hint: Option<&str>,
) -> Event {
    Event::TurnJudged {
        turn_id,
        session_id: session.into(),
        score,
        votes,
        hint: hint.map(String::from),
        error: None,
    }
}

fn feed(app: &mut Screen, events: impl IntoIterator<Item = Event>) {
    for e in events {
        app.on_event(&e);
    }
}

#[test]
fn a_fresh_screen_says_what_to_do_at_80x24() {
    let (mut app, _) = app();
    app.state.model = None;
    insta::assert_snapshot!("loading_80x24", screen(&mut app, 80, 24));
    app.on_event(&Event::EngineReady {
        model: "SmolLM2".into(),
    });
    insta::assert_snapshot!("fresh_80x24", screen(&mut app, 80, 24));
}

#[test]
fn a_conversation_streams_then_shows_votes_hint_rating_and_version() {
    let (mut app, _) = app();
    let mut first = turn_events(
        "openclaw-1",
        1,
        11,
        "What is the capital of France?",
        &["Paris", " is the capital."],
    );
    feed(&mut app, first.drain(..));
    app.on_event(&Event::NextStateAttached {
        turn_id: 11,
        session_id: "openclaw-1".into(),
        role: NextRole::User,
    });
    app.on_event(&judged(
        11,
        "openclaw-1",
        vec![Some(1), Some(1), Some(-1)],
        1,
        None,
    ));
    // The second turn is still streaming.
    let mut second = turn_events(
        "openclaw-1",
        2,
        12,
        "And of Germany? Answer in one word.",
        &["Ber"],
    );
    second.truncate(2);
    feed(&mut app, second);
    insta::assert_snapshot!("streaming_80x24", screen(&mut app, 80, 24));

    feed(
        &mut app,
        [
            Event::RequestText {
                request_id: "chatcmpl-12".into(),
                text: "lin, and it is bigger.".into(),
            },
            Event::RequestFinished {
                request_id: "chatcmpl-12".into(),
                completion_tokens: 5,
                finish_reason: Finish::Stop,
                adapter_version: 2,
            },
            Event::TurnCaptured {
                turn_id: 12,
                session_id: "openclaw-1".into(),
                turn_index: 2,
                turn_type: TurnType::Main,
            },
            Event::NextStateAttached {
                turn_id: 12,
                session_id: "openclaw-1".into(),
                role: NextRole::User,
            },
            judged(
                12,
                "openclaw-1",
                vec![Some(-1), None, Some(-1)],
                -1,
                Some("Answer in one word as asked."),
            ),
            Event::FeedbackRecorded {
                turn_id: 11,
                session_id: "openclaw-1".into(),
                rating: -1,
            },
        ],
    );
    let s = screen(&mut app, 80, 24);
    let t = text(&s);
    assert!(t.contains("votes +1 +1 −1 → +1"), "{t}");
    assert!(t.contains("votes −1 ? −1 → −1"), "{t}");
    assert!(t.contains("rated ▼ down"), "{t}");
    assert!(t.contains("hint “Answer in one word as asked.”"), "{t}");
    insta::assert_snapshot!("judged_and_rated_80x24", s);
    // The rating overrides the judge's +1 in the rewards.
    assert_eq!(app.state.rewards, vec![(11, -1.0), (12, -1.0)]);
    // Once trained on, the turn shows what its distillation read: here the user's own words.
    feed(
        &mut app,
        vec![Event::HintChosen {
            turn_id: 11,
            source: clawrl_core::store::HintSource::User,
            hint: "And of Germany? Answer in one word.".into(),
            overlap: Some(12.5),
            candidates: 2,
        }],
    );
    let t = text(&screen(&mut app, 80, 24));
    assert!(t.contains("learned from the user “And of Germany?"), "{t}");
    assert!(
        t.contains("hint “Answer in one word as asked.”"),
        "the other turn still shows its judge's hint: {t}"
    );
}

#[test]
fn the_chat_box_sends_the_whole_conversation_and_keeps_the_reply() {
    let (mut app, mut rx) = app();
    assert_eq!(
        app.focus,
        PaneId::Chat,
        "the chat box has the focus at start"
    );
    type_text(&mut app, "hello q?");
    press(&mut app, KeyCode::Enter);
    assert_eq!(
        commands(&mut rx),
        [Command::Chat {
            session_id: "tui-test1".into(),
            messages: vec![Message::user("hello q?")],
        }],
        "typed letters (q, ?) are text in the chat box, not commands"
    );
    assert!(!app.quit && !app.help);
    // Enter again while the reply is pending sends nothing.
    type_text(&mut app, "again");
    press(&mut app, KeyCode::Enter);
    assert!(commands(&mut rx).is_empty());
    feed(
        &mut app,
        turn_events("tui-test1", 1, 5, "hello q?", &["Hi", " there!"]),
    );
    // Now it goes, with the reply in the history.
    press(&mut app, KeyCode::Enter);
    let Command::Chat { messages, .. } = &commands(&mut rx)[0] else {
        panic!("a chat command");
    };
    assert_eq!(
        messages,
        &vec![
            Message::user("hello q?"),
            Message::assistant("Hi there!"),
            Message::user("again"),
        ]
    );
    // A refused message goes back into the box and leaves the conversation.
    app.on_event(&Event::RequestRefused {
        session_id: Some("tui-test1".into()),
        status: 429,
        message: "The server is busy.".into(),
    });
    assert_eq!(app.chat.input.lines(), ["again"]);
    assert_eq!(app.chat.messages.len(), 2);
    insta::assert_snapshot!("chat_refused_80x24", screen(&mut app, 80, 24));
    // ↑ recalls the history; ctrl-n starts a new session and closes the old one.
    app.chat.input = tui_textarea::TextArea::default();
    press(&mut app, KeyCode::Up);
    assert_eq!(app.chat.input.lines(), ["again"]);
    crate::input::on_key(
        &mut app,
        KeyEvent::new(KeyCode::Char('n'), KeyModifiers::CONTROL),
    );
    assert_eq!(
        commands(&mut rx),
        [Command::EndChat {
            session_id: "tui-test1".into()
        }]
    );
    assert_eq!(app.chat.session_id, "tui-test2");
}

#[test]
fn thumbs_rate_the_selected_turn_once_it_is_stored() {
    let (mut app, mut rx) = app();
    feed(&mut app, turn_events("s1", 1, 21, "one", &["first"]));
    feed(&mut app, turn_events("s1", 2, 22, "two", &["second"]));
    press(&mut app, KeyCode::Esc);
    assert_eq!(app.focus, PaneId::Conversation);
    char_key(&mut app, '+');
    char_key(&mut app, 'k');
    char_key(&mut app, '-');
    assert_eq!(
        commands(&mut rx),
        [
            Command::Rate {
                turn: TurnRef::Index {
                    session_id: "s1".into(),
                    turn_index: 2
                },
                rating: 1
            },
            Command::Rate {
                turn: TurnRef::Index {
                    session_id: "s1".into(),
                    turn_index: 1
                },
                rating: -1
            },
        ]
    );
    // A reply still streaming cannot be rated yet.
    let mut streaming = turn_events("s1", 3, 23, "three", &["thi"]);
    streaming.truncate(2);
    feed(&mut app, streaming);
    char_key(&mut app, 'G');
    char_key(&mut app, 'u');
    assert!(commands(&mut rx).is_empty());
    assert!(
        app.state
            .notices
            .last()
            .unwrap()
            .text
            .contains("not stored yet")
    );
}

fn candidate(version: i64, passed: bool) -> Event {
    Event::CandidateReady {
        version,
        parent: version - 1,
        samples: 4,
        loss: 0.31 / version as f64,
        kl_base: Some(0.002 * version as f64),
        kl_live: Some(0.001),
        mean_reward: Some(0.5),
        learning_rate: Some(3e-4 / version as f64),
        guard_passed: passed,
        reasons: if passed {
            vec![]
        } else {
            vec!["KL from base 0.0400 > limit 0.0200".into()]
        },
    }
}

fn training_history(app: &mut Screen) {
    for v in 1..=3 {
        app.on_event(&candidate(v, true));
        app.on_event(&Event::VersionLive {
            version: v,
            previous: v - 1,
            reason: LiveReason::Auto,
        });
    }
    app.on_event(&candidate(4, false));
    for (i, r) in [1, 1, -1, 1, 1, 1, -1, 1, 1, 1, 1, 1].iter().enumerate() {
        let id = i as i64 + 100;
        let mut ev = turn_events("s", i as i64, id, "q", &["a"]);
        ev.push(judged(id, "s", vec![Some(*r)], *r, None));
        feed(app, ev);
    }
    app.on_event(&Event::TrainingStarted {
        parent: 3,
        samples: 4,
        hints: 1,
    });
    app.on_event(&Event::TrainingStep {
        done: 2,
        samples: 4,
        loss: 0.25,
        kl: 0.001,
    });
    app.state.hardware = Some(hardware());
    app.state.sampled(ServingSample {
        tokens_out: 1000,
        decode_micros: 20_000_000,
        queue_depth: 1,
        active: 1,
        prefix_cache_bytes: 120 << 20,
        policy_weight_bytes: 634 << 20,
        judge_weight_bytes: 490 << 20,
    });
}

#[test]
fn the_training_view_shows_rewards_updates_guard_verdicts_and_hardware() {
    let (mut app, _) = app();
    training_history(&mut app);
    press(&mut app, KeyCode::Esc);
    char_key(&mut app, '2');
    assert_eq!(app.view, View::Training);
    let s = screen(&mut app, 100, 30);
    let t = text(&s);
    assert!(t.contains("v4  candidate ✗"), "{t}");
    assert!(
        t.contains("guard: KL from base 0.0400 > limit 0.0200"),
        "{t}"
    );
    assert!(t.contains("no GPU (no NVML library)"), "{t}");
    // What holds the memory: 1400 MiB of RSS less the weights and the prefix cache.
    assert!(t.contains("policy 634 MiB · judge 490 MiB"), "{t}");
    assert!(t.contains("KV 120 MiB · other 156 MiB"), "{t}");
    assert!(t.contains("training from v3: 2/4 samples"), "{t}");
    insta::assert_snapshot!("training_100x30", s);
    insta::assert_snapshot!("training_80x24", screen(&mut app, 80, 24)); // The candidate's detail names the learning rate its step used.
    assert!(
        t.contains("from v3 · 4 samples · lr 7.5e-5 · mean reward"),
        "{t}"
    );
}

#[test]
fn approve_veto_and_rollback_send_commands_rollback_after_confirmation() {
    let (mut app, mut rx) = app();
    training_history(&mut app);
    press(&mut app, KeyCode::Esc);
    char_key(&mut app, 'a');
    char_key(&mut app, 'v');
    assert_eq!(commands(&mut rx), [Command::Approve(4), Command::Veto(4)]);
    // R asks first; anything but y cancels.
    char_key(&mut app, 'R');
    assert!(app.confirm.is_some());
    insta::assert_snapshot!("rollback_confirm_80x24", screen(&mut app, 80, 24));
    char_key(&mut app, 'n');
    assert!(commands(&mut rx).is_empty() && app.confirm.is_none());
    char_key(&mut app, 'R');
    char_key(&mut app, 'y');
    assert_eq!(commands(&mut rx), [Command::Rollback(None)]);
    // In the updates pane, the selected version is the rollback target.
    char_key(&mut app, '2');
    char_key(&mut app, 'j'); // the first: v4
    char_key(&mut app, 'j'); // v3
    char_key(&mut app, 'j'); // v2
    assert_eq!(app.selected_version, Some(2));
    char_key(&mut app, 'R');
    assert!(
        app.confirm
            .as_ref()
            .unwrap()
            .question
            .contains("from v3 to v2")
    );
    char_key(&mut app, 'y');
    assert_eq!(commands(&mut rx), [Command::Rollback(Some(2))]);
    // Events move the live version; p pauses, then resumes.
    app.on_event(&Event::RolledBack { from: 3, to: 2 });
    assert_eq!(app.state.live_version, 2);
    char_key(&mut app, 'p');
    app.on_event(&Event::TrainingPaused);
    char_key(&mut app, 'p');
    assert_eq!(
        commands(&mut rx),
        [Command::PauseTraining, Command::ResumeTraining]
    );
}

#[test]
fn help_lists_every_binding_from_the_keymap_and_follows_the_config() {
    let mut keys = BTreeMap::new();
    keys.insert("approve".to_string(), vec!["y".to_string()]);
    let (mut app, mut rx) = app_with(Keymap::new(&keys).unwrap());
    press(&mut app, KeyCode::Esc);
    char_key(&mut app, '?');
    assert!(app.help);
    let t = text(&screen(&mut app, 100, 50));
    for pane in [
        PaneId::Sessions,
        PaneId::Conversation,
        PaneId::Chat,
        PaneId::Updates,
    ] {
        for a in panes::commands(pane) {
            assert!(t.contains(a.description()), "help lacks {a:?}:\n{t}");
        }
    }
    for a in super::screen::GLOBAL {
        assert!(t.contains(a.description()), "help lacks {a:?}:\n{t}");
    }
    assert!(t.contains("y           approve the candidate"), "{t}");
    insta::assert_snapshot!("help_80x24", screen(&mut app, 80, 24));
    // Any key closes it; the rebound key approves, the default one no longer does.
    char_key(&mut app, 'x');
    assert!(!app.help);
    app.on_event(&candidate(1, true));
    char_key(&mut app, 'a');
    char_key(&mut app, 'y');
    assert_eq!(commands(&mut rx), [Command::Approve(1)]);
}

#[test]
fn tab_cycles_the_panes_of_the_view_and_a_wide_screen_shows_both_views() {
    let (mut app, _) = app();
    training_history(&mut app);
    screen(&mut app, 80, 24);
    let mut seen = Vec::new();
    for _ in 0..3 {
        press(&mut app, KeyCode::Tab);
        seen.push(app.focus);
    }
    assert_eq!(seen, [PaneId::Sessions, PaneId::Conversation, PaneId::Chat]);
    let s = screen(&mut app, 160, 40);
    assert!(app.wide);
    press(&mut app, KeyCode::Tab);
    assert_eq!(
        app.focus,
        PaneId::Updates,
        "both views' panes take the focus"
    );
    press(&mut app, KeyCode::BackTab);
    assert_eq!(app.focus, PaneId::Chat);
    insta::assert_snapshot!("wide_160x40", s);
    // Quit.
    press(&mut app, KeyCode::Esc);
    char_key(&mut app, 'q');
    assert!(app.quit);
}

#[test]
fn a_restarted_screen_shows_the_stored_history() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite");
    let mut store = Store::open(&path).unwrap();
    store
        .ensure_session("openclaw-7", "header", NOW - 120_000)
        .unwrap();
    let turn = |index: i64, asked: &str, reply: &str| NewTurn {
        session_id: "openclaw-7".into(),
        turn_index: index,
        turn_type: TurnType::Main,
        response_id: format!("chatcmpl-{index}"),
        request_messages: vec![Message::user(asked)],
        tools: None,
        prompt_ids: vec![1, 2],
        response_ids: vec![3],
        logprobs: vec![-0.5],
        response_text: reply.into(),
        tool_calls: Vec::new(),
        reply_message: Message::assistant(reply),
        finish_reason: "stop".into(),
        adapter_version: 0,
        sampling: json!({}),
        cached_tokens: 0,
        created_at: NOW - 100_000,
        completed_at: NOW - 99_000,
    };
    let first = store
        .insert_turn(&turn(1, "Summarize the logs.", "All good."))
        .unwrap();
    store
        .insert_turn(&turn(2, "Thanks, now in French.", "Tout va bien."))
        .unwrap();
    store
        .attach_next_state(first, &[Message::user("Thanks")], "user", NOW - 90_000)
        .unwrap();
    let vote = |i: usize, score: i8| Vote {
        kind: "score",
        index: i,
        raw: format!("\\boxed{{{score}}}"),
        score: Some(score),
        hint: None,
        probs: None,
    };
    store
        .save_judgment(&Judgment {
            turn_id: first,
            backend: "local".into(),
            mode: "direct".into(),
            judge_model: "m".into(),
            score: 1,
            hint: Some("Mention the two warnings.".into()),
            error: None,
            votes: vec![vote(0, 1), vote(1, 1), vote(2, -1)],
            elapsed_ms: 10,
            judged_at: NOW - 80_000,
        })
        .unwrap();
    store
        .record_feedback(
            &TurnRef::ResponseId("chatcmpl-1".into()),
            1,
            None,
            "api",
            NOW - 70_000,
        )
        .unwrap();
    store
        .close_session("openclaw-7", CloseReason::Idle.as_str(), NOW - 60_000)
        .unwrap();
    drop(store);

    let snapshot = super::load(&path).unwrap();
    let (mut app, _) = app();
    app.state = State::from_snapshot(snapshot);
    let s = screen(&mut app, 80, 24);
    let t = text(&s);
    assert!(t.contains("votes +1 +1 −1 → +1 · rated ▲ up"), "{t}");
    assert!(t.contains("Mention the two warnings."), "{t}");
    assert!(t.contains("no signal: the session closed"), "{t}");
    insta::assert_snapshot!("restarted_80x24", s);
}

#[test]
fn samples_set_aside_without_an_update_are_told_on_screen() {
    let (mut app, _) = app();
    feed(
        &mut app,
        [Event::SamplesSetAside {
            samples: 1,
            reason: "rated down with none rated up beside it and no hint".into(),
        }],
    );
    let t = text(&screen(&mut app, 100, 30));
    assert!(t.contains("Set aside 1 sample(s), not trained on"), "{t}");
}
