//! Capture: every served turn, with the exact token ids and log-probs, committed to the store
//! before its response completes; sessions and next states tracked as PIPELINE.md §1 says.

pub mod sessions;

use crate::events::{Event, EventBus, emit};
use crate::store::{NewTurn, Store, now_ms};
use anyhow::Result;
use serde_json::Value;
use sessions::{SessionTracker, strip_internal};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnType {
    /// User-facing and trainable.
    Main,
    /// Housekeeping (memory flushes, heartbeats): served and logged, never trained.
    Side,
}

impl TurnType {
    /// Unknown or missing values are `main` (upstream defaulted to side and trained nothing).
    pub fn parse(s: Option<&str>) -> Self {
        match s.map(|s| s.trim().to_ascii_lowercase()) {
            Some(s) if s == "side" => Self::Side,
            _ => Self::Main,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Side => "side",
        }
    }
}

/// What capture decided about a request before it is served.
#[derive(Debug, Clone)]
pub struct TurnSlot {
    pub session_id: String,
    pub turn_index: i64,
    pub turn_type: TurnType,
    pub session_done: bool,
    pub created_at: i64,
    /// The request's messages without trailing internal context (the session's history).
    history: Vec<Value>,
}

pub struct Capture {
    store: Mutex<Store>,
    tracker: Mutex<SessionTracker>,
    bus: EventBus,
    markers: Vec<String>,
}

pub fn random_id(prefix: &str) -> String {
    use rand::Rng;
    let n: u128 = rand::rng().random();
    format!("{prefix}{:024x}", n & ((1u128 << 96) - 1))
}

impl Capture {
    /// Opens the store. Sessions a previous process left open are closed first: their
    /// history matching died with that process, so their unanswered turns get no signal.
    pub fn open(path: &Path, bus: EventBus, markers: Vec<String>) -> Result<Self> {
        let mut store = Store::open(path)?;
        let orphaned = store.close_orphaned_sessions(now_ms())?;
        if !orphaned.is_empty() {
            tracing::info!(
                "closed {} sessions left open by the previous run",
                orphaned.len()
            );
        }
        Ok(Self {
            store: Mutex::new(store),
            tracker: Mutex::new(SessionTracker::default()),
            bus,
            markers,
        })
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Assigns a request to a session and records the previous turn's next state.
    pub fn begin(
        &self,
        explicit_session: Option<String>,
        source: &str,
        turn_type: TurnType,
        session_done: bool,
        messages: &[Value],
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
            if let Some(ns) = next_state {
                if store.attach_next_state(ns.turn_id, &Value::Array(ns.messages), &ns.role, now)? {
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
        }
        Ok(TurnSlot {
            session_id,
            turn_index,
            turn_type,
            session_done,
            created_at: now,
            history,
        })
    }

    /// Commits a finished turn (before the client sees its end) and updates the session.
    pub fn commit(&self, slot: &TurnSlot, turn: NewTurn, reply: &Value) -> Result<i64> {
        let id = self.store().insert_turn(&turn)?;
        if slot.turn_type == TurnType::Main {
            self.tracker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record_reply(&slot.session_id, id, &slot.history, reply);
        }
        emit(
            &self.bus,
            Event::TurnCaptured {
                turn_id: id,
                session_id: slot.session_id.clone(),
                turn_index: slot.turn_index,
                turn_type: slot.turn_type.as_str().into(),
            },
        );
        if slot.session_done {
            self.close(&slot.session_id, "client")?;
        }
        Ok(id)
    }

    pub fn close(&self, session_id: &str, reason: &str) -> Result<()> {
        self.tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .close(session_id);
        self.closed(session_id, reason)
    }

    /// Records a closed session (its unanswered turns become "no signal") and says so.
    fn closed(&self, session_id: &str, reason: &str) -> Result<()> {
        let no_signal_turns = self.store().close_session(session_id, reason, now_ms())?;
        emit(
            &self.bus,
            Event::SessionClosed {
                session_id: session_id.into(),
                reason: reason.into(),
                no_signal_turns,
            },
        );
        Ok(())
    }

    /// Closes sessions idle for longer than `timeout`; their last turn keeps no next state.
    pub fn close_idle(&self, timeout: Duration) -> Result<usize> {
        let idle = self
            .tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .close_idle(timeout);
        for id in &idle {
            self.closed(id, "idle")?;
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
