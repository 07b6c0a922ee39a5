//! `clawrl-tui bench --tui`: how long the control center takes to fold an event and draw a
//! frame, on an empty history (the baseline) and on a full one (the most the screen keeps:
//! 200 sessions, 2000 turns of which 1000 in the session shown, 100 versions), at 80×24 and
//! 200×60. The screen draws at most
//! 25 frames/s; a frame costing more than 40 ms would be the bottleneck.

use anyhow::Result;
use clawrl_core::events::Event;
use clawrl_core::store::JudgmentSummary;
use clawrl_screen::keymap::Keymap;
use clawrl_screen::panes;
use clawrl_screen::screen::{Header, Screen, View};
use clawrl_screen::state::{MAX_SESSIONS, MAX_TURNS, Session, State, TurnView, VersionView};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use std::time::Instant;

const REPLY: &str = "Packing for a weekend hike comes down to water, layers and a map. Bring two \
    litres of water, a rain jacket, a warm layer, snacks, a headlamp, a first-aid kit and a \
    charged phone with an offline map; leave the rest at home. ";

fn full_state() -> State {
    let mut state = State::default();
    state.model = Some("bench".into());
    // The shown session is a long agent run holding half the turns; the rest share the others.
    let long = MAX_TURNS / 2;
    let per_session = (MAX_TURNS - long) / (MAX_SESSIONS - 1);
    for s in 0..MAX_SESSIONS {
        let n = if s == 0 { long } else { per_session };
        let turns = (0..n)
            .map(|i| TurnView {
                turn_id: Some((s * per_session + i) as i64),
                turn_index: i as i64,
                last_message: "What should I pack for a weekend hike? Keep it short.".into(),
                reply: REPLY.repeat(3),
                version: Some(3),
                next_state: Some("user".into()),
                judgment: Some(JudgmentSummary {
                    score: 1,
                    votes: vec![Some(1), Some(1), Some(-1)],
                    hint: Some("Answer in three items.".into()),
                    error: None,
                }),
                rating: (i % 3 == 0).then_some(-1),
                ..TurnView::default()
            })
            .collect();
        state.sessions.push(Session {
            id: format!("session-{s}"),
            source: "header".into(),
            last_active_at: 0,
            close_reason: None,
            turns,
        });
    }
    for t in 0..MAX_TURNS {
        state
            .rewards
            .push((t as i64, if t % 3 == 0 { -1.0 } else { 1.0 }));
    }
    for v in 1..=100 {
        state.versions.push(VersionView {
            id: v,
            parent: v - 1,
            state: clawrl_core::store::VersionState::Retired,
            samples: 4,
            loss: 1.0 / v as f64,
            kl_base: Some(0.0001 * v as f64),
            kl_live: Some(0.0001),
            mean_reward: Some(0.5),
            learning_rate: Some(3e-4),
            guard_passed: true,
            reasons: Vec::new(),
        });
    }
    state.live_version = 100;
    state
}

/// Milliseconds per frame (median of `frames` draws).
fn frame_ms(app: &mut Screen, width: u16, height: u16, frames: usize) -> Result<f64> {
    let mut terminal = Terminal::new(TestBackend::new(width, height))?;
    let mut times = Vec::with_capacity(frames);
    for _ in 0..frames {
        let t = Instant::now();
        terminal.draw(|f| panes::draw(f, app))?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn app(state: State) -> Screen {
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let mut app = Screen::new(
        state,
        Keymap::default(),
        Header {
            model_id: "bench".into(),
            url: "http://127.0.0.1:30000/v1".into(),
        },
        tx,
        Box::new(|| "tui-bench".into()),
    );
    app.now_ms = 1;
    app
}

pub fn run(frames: usize) -> Result<()> {
    let frames = frames.max(1);
    let mut empty = app(State::default());
    let mut full = app(full_state());
    println!("control center, median of {frames} frames (target: under 40 ms, 25 frames/s)");
    println!(
        "{:<14} {:>9} {:>12} {:>12} {:>10}",
        "view", "size", "empty ms", "full ms", "full/empty"
    );
    for (view, name) in [
        (View::Conversations, "conversations"),
        (View::Training, "training"),
    ] {
        for (w, h) in [(80u16, 24u16), (200, 60)] {
            empty.view = view;
            full.view = view;
            let e = frame_ms(&mut empty, w, h, frames)?;
            let f = frame_ms(&mut full, w, h, frames)?;
            println!(
                "{name:<14} {:>9} {e:>12.3} {f:>12.3} {:>9.1}x",
                format!("{w}x{h}"),
                f / e
            );
        }
    }
    // Folding the event that arrives most often (a streamed piece of reply) into a full state.
    let started = Event::RequestStarted {
        request_id: "r".into(),
        session_id: "session-0".into(),
        turn_index: 99,
        prompt_tokens: 10,
        cached_tokens: 0,
        last_message: "hi".into(),
    };
    full.on_event(&started);
    let n = 10_000;
    let t = Instant::now();
    for _ in 0..n {
        full.on_event(&Event::RequestText {
            request_id: "r".into(),
            text: "tok".into(),
        });
    }
    let fold_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!("fold one RequestText into the full state: {fold_us:.2} µs");
    Ok(())
}
