//! Capture: every served turn, with the exact token ids and log-probs, committed to the store
//! before its response completes; sessions and next states tracked as PIPELINE.md §1 says.

pub mod sessions;

use crate::events::{CloseReason, Event, EventBus, emit};
use crate::store::{NewTurn, Store, now_ms};
use anyhow::Result;
use clawrl_model::messages::Message;
use sessions::{SessionTracker, strip_internal};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

pub use crate::store::TurnType;

/// What capture decided about a request before it is served.
#[derive(Debug, Clone)]
pub struct TurnSlot {
    pub session_id: String,
    pub turn_index: i64,
    pub turn_type: TurnType,
    pub session_done: bool,
    pub created_at: i64,
    /// False when the store could not be written: the turn is served, not captured.
    pub recorded: bool,
    /// The request's messages without trailing internal context (the session's history).
    history: Vec<Message>,
}

impl TurnSlot {
    /// A turn served without capture (the store refused the write): never trained on.
    pub(crate) fn unrecorded(session_id: Option<String>, turn_type: TurnType) -> Self {
        Self {
            session_id: session_id.unwrap_or_else(|| random_id("sess-")),
            turn_index: 0,
            turn_type,
            session_done: false,
            created_at: now_ms(),
            recorded: false,
            history: Vec::new(),
        }
    }
}

pub struct Capture {
    store: Mutex<Store>,
    tracker: Mutex<SessionTracker>,
    bus: EventBus,
    markers: Vec<String>,
}

/// Ids `{prefix}1`, `{prefix}2`, …: the tests' stand-in for [`random_id`].
#[cfg(test)]
pub(crate) fn numbered_ids(prefix: &'static str) -> impl FnMut() -> String {
    let mut n = 0;
    move || {
        n += 1;
        format!("{prefix}{n}")
    }
}

pub fn random_id(prefix: &str) -> String {
    use rand::Rng;
    let n: u128 = rand::rng().random();
    format!("{prefix}{:024x}", n & ((1u128 << 96) - 1))
}

impl Capture {
    /// Opens the store and picks up the sessions a previous process left open: those idle
    /// longer than `session_idle` are closed (their unanswered turns get no signal), the others
    /// continue where they were, so a restart loses no next state.
    pub fn open(
        path: &Path,
        bus: EventBus,
        markers: Vec<String>,
        session_idle: Duration,
    ) -> Result<Self> {
        let mut store = Store::open(path)?;
        let mut tracker = SessionTracker::default();
        let now = now_ms();
        let (mut resumed, mut closed) = (0, 0);
        for s in store.open_sessions()? {
            let idle = Duration::from_millis((now - s.last_active_at).max(0) as u64);
            if idle > session_idle {
                store.close_session(&s.id, "idle", now)?;
                closed += 1;
                continue;
            }
            let (history, reply, waiting) = match &s.last_main {
                Some(t) => {
                    let turn = t.awaiting_next_state.then_some(t.turn_id);
                    (
                        strip_internal(&t.request_messages, &markers).to_vec(),
                        Some(&t.reply_message),
                        turn,
                    )
                }
                None => (Vec::new(), None, None),
            };
            tracker.resume(&s.id, &history, reply, waiting, s.next_turn_index, idle);
            resumed += 1;
        }
        if resumed + closed > 0 {
            tracing::info!(
                "sessions left open by the previous run: {resumed} resumed, {closed} closed as idle"
            );
        }
        Ok(Self {
            store: Mutex::new(store),
            tracker: Mutex::new(tracker),
            bus,
            markers,
        })
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Assigns a request to a session and records the previous turn's next state.
    pub(crate) fn begin(
        &self,
        explicit_session: Option<String>,
        source: &str,
        turn_type: TurnType,
        session_done: bool,
        messages: &[Message],
    ) -> Result<TurnSlot> {
        let now = now_ms();
        let history = strip_internal(messages, &self.markers).to_vec();
        let next_index = |id: &str| {
            self.store()
                .last_turn_index(id)
                .ok()
                .flatten()
                .map_or(0, |i| i + 1)
        };
        let (session_id, turn_index, new_session, next_state) = match turn_type {
            TurnType::Main => {
                let mut tracker = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
                let p = tracker.place(
                    explicit_session.as_deref(),
                    &history,
                    || random_id("sess-"),
                    next_index,
                );
                (p.session_id, p.turn_index, p.new_session, p.next_state_of)
            }
            TurnType::Side => {
                let id = explicit_session.unwrap_or_else(|| random_id("side-"));
                let index = self
                    .tracker
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .reserve_index(&id, next_index);
                (id, index, false, None)
            }
        };
        let source = if new_session || turn_type == TurnType::Side {
            source
        } else {
            "continued"
        };
        {
            let store = self.store();
            store.ensure_session(&session_id, source, now)?;
            if let Some(ns) = next_state
                && store.attach_next_state(ns.turn_id, &ns.messages, ns.role.as_str(), now)?
            {
                emit(
                    &self.bus,
                    Event::NextStateAttached {
                        turn_id: ns.turn_id,
                        session_id: session_id.clone(),
                        role: ns.role,
                    },
                );
            }
        }
        Ok(TurnSlot {
            session_id,
            turn_index,
            turn_type,
            session_done,
            created_at: now,
            recorded: true,
            history,
        })
    }

    /// Commits a finished turn (before the client sees its end) and updates the session.
    pub fn commit(&self, slot: &TurnSlot, turn: NewTurn) -> Result<i64> {
        let id = self.store().insert_turn(&turn)?;
        if slot.turn_type == TurnType::Main {
            self.tracker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record_reply(&slot.session_id, id, &slot.history, &turn.reply_message);
        }
        emit(
            &self.bus,
            Event::TurnCaptured {
                turn_id: id,
                session_id: slot.session_id.clone(),
                turn_index: slot.turn_index,
                turn_type: slot.turn_type,
            },
        );
        if slot.session_done {
            self.close(&slot.session_id, CloseReason::Client)?;
        }
        Ok(id)
    }

    pub fn close(&self, session_id: &str, reason: CloseReason) -> Result<()> {
        self.tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .close(session_id);
        self.closed(session_id, reason)
    }

    /// Records a closed session (its unanswered turns become "no signal") and says so.
    fn closed(&self, session_id: &str, reason: CloseReason) -> Result<()> {
        let no_signal_turns = self
            .store()
            .close_session(session_id, reason.as_str(), now_ms())?;
        emit(
            &self.bus,
            Event::SessionClosed {
                session_id: session_id.into(),
                reason,
                no_signal_turns,
            },
        );
        Ok(())
    }

    /// Closes sessions idle for longer than `timeout`; their last turn keeps no next state.
    pub(crate) fn close_idle(&self, timeout: Duration) -> Result<usize> {
        let idle = self
            .tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .close_idle(timeout);
        for id in &idle {
            self.closed(id, CloseReason::Idle)?;
        }
        Ok(idle.len())
    }

    /// Records a human rating for a turn (see [`Store::record_feedback`]).
    pub fn record_feedback(
        &self,
        turn: &crate::store::TurnRef,
        rating: i8,
        comment: Option<&str>,
        source: &str,
    ) -> Result<crate::store::FeedbackRecorded, crate::store::FeedbackError> {
        self.store()
            .record_feedback(turn, rating, comment, source, now_ms())
    }

    pub fn open_sessions(&self) -> usize {
        self.tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .open_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn turn(session: &str, at: i64) -> NewTurn {
        NewTurn {
            session_id: session.into(),
            turn_index: 0,
            turn_type: TurnType::Main,
            response_id: format!("r-{session}"),
            request_messages: vec![Message::user("hi")],
            tools: None,
            prompt_ids: vec![1],
            response_ids: vec![2],
            logprobs: vec![-0.1],
            response_text: "hello".into(),
            tool_calls: Vec::new(),
            reply_message: Message::assistant("hello"),
            finish_reason: "stop".into(),
            adapter_version: 0,
            sampling: json!({}),
            cached_tokens: 0,
            created_at: at,
            completed_at: at,
        }
    }

    #[test]
    fn a_restart_resumes_recent_sessions_and_closes_stale_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        {
            let store = Store::open(&path).unwrap();
            store.ensure_session("stale", "header", 1_000).unwrap();
            store.insert_turn(&turn("stale", 1_000)).unwrap();
            store.ensure_session("recent", "prefix", now_ms()).unwrap();
            store.insert_turn(&turn("recent", now_ms())).unwrap();
        }
        let capture = Capture::open(
            &path,
            crate::events::bus(),
            Vec::new(),
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(capture.open_sessions(), 1, "the stale session was closed");
        // The recent one continues by history: its turn 0 gets the next state.
        let history = [
            Message::user("hi"),
            Message::assistant("hello"),
            Message::user("more"),
        ];
        let slot = capture
            .begin(None, "prefix", TurnType::Main, false, &history)
            .unwrap();
        assert_eq!((slot.session_id.as_str(), slot.turn_index), ("recent", 1));
        let mut rows = Vec::new();
        capture
            .store()
            .export(0, |r| {
                let _: () = rows.push(r);
                Ok(())
            })
            .unwrap();
        let status = |sid: &str| {
            rows.iter().find(|r| r["session_id"] == sid).unwrap()["judge_status"].clone()
        };
        assert_eq!(status("stale"), "no_signal");
        assert_eq!(status("recent"), "pending");
    }
}
