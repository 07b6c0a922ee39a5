//! What a face shows of the history: recent sessions and turns with their votes, hints and
//! ratings, and the versions. The control center starts from it and resyncs from it when it
//! missed events.

use super::{Store, VersionRow, parse_or_default};
use anyhow::Result;
use clawrl_model::messages::Message;
use rusqlite::params;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A session as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionSummary {
    pub id: String,
    /// header | body | prefix | continued | tui
    pub source: String,
    pub created_at: i64,
    pub last_active_at: i64,
    pub close_reason: Option<String>,
}

/// A turn with what was decided about it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TurnSummary {
    pub turn_id: i64,
    pub session_id: String,
    pub turn_index: i64,
    /// main | side
    pub turn_type: super::TurnType,
    /// The text of the request's last message (what the reply answers).
    pub last_message: String,
    pub reply: String,
    pub adapter_version: i64,
    pub created_at: i64,
    /// user | tool, once the next state arrived.
    pub next_state_role: Option<String>,
    /// The session closed before a next state arrived.
    pub no_signal: bool,
    pub judgment: Option<JudgmentSummary>,
    /// The latest human rating.
    pub rating: Option<i8>,
    /// The hint its latest distillation read (train.hint_selection's choice).
    pub distilled: Option<crate::store::HintCandidate>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct JudgmentSummary {
    pub score: i8,
    /// The PRM votes in order (`None`: an invalid vote).
    pub votes: Vec<Option<i8>>,
    pub hint: Option<String>,
    pub error: Option<String>,
}

/// The history a face starts from.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// Most recently active first.
    pub sessions: Vec<SessionSummary>,
    /// The most recent turns, oldest first.
    pub turns: Vec<TurnSummary>,
    pub versions: Vec<VersionRow>,
    pub live_version: i64,
    pub training_paused: bool,
}

impl Store {
    /// The latest `max_sessions` sessions and `max_turns` turns, the versions and the live one.
    pub fn snapshot(&self, max_sessions: usize, max_turns: usize) -> Result<Snapshot> {
        Ok(Snapshot {
            sessions: self.recent_sessions(max_sessions)?,
            turns: self.recent_turns(max_turns)?,
            versions: self.versions()?,
            live_version: self.live_version()?,
            training_paused: self.setting(super::PAUSED_SETTING)?.as_deref() == Some("1"),
        })
    }

    pub(crate) fn recent_sessions(&self, limit: usize) -> Result<Vec<SessionSummary>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, source, created_at, last_active_at, close_reason FROM sessions
             ORDER BY last_active_at DESC, created_at DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok(SessionSummary {
                id: r.get(0)?,
                source: r.get(1)?,
                created_at: r.get(2)?,
                last_active_at: r.get(3)?,
                close_reason: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The latest `limit` turns, oldest first, with their judgments and ratings.
    pub(crate) fn recent_turns(&self, limit: usize) -> Result<Vec<TurnSummary>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT t.id, t.session_id, t.turn_index, t.turn_type, t.request_messages,
                    t.response_text, t.adapter_version, t.created_at, t.next_state_role,
                    t.no_signal_at IS NOT NULL, j.score, j.hint, j.error
             FROM turns t LEFT JOIN judgments j ON j.turn_id = t.id
             ORDER BY t.id DESC LIMIT ?1",
        )?;
        let mut turns: Vec<TurnSummary> = stmt
            .query_map([limit as i64], |r| {
                let messages: Vec<Message> = parse_or_default(r.get(4)?);
                let score: Option<i8> = r.get(10)?;
                Ok(TurnSummary {
                    turn_id: r.get(0)?,
                    session_id: r.get(1)?,
                    turn_index: r.get(2)?,
                    turn_type: r.get(3)?,
                    last_message: messages.last().map(Message::text).unwrap_or_default(),
                    reply: r.get(5)?,
                    adapter_version: r.get(6)?,
                    created_at: r.get(7)?,
                    next_state_role: r.get(8)?,
                    no_signal: r.get(9)?,
                    judgment: match score {
                        Some(score) => Some(JudgmentSummary {
                            score,
                            votes: Vec::new(),
                            hint: r.get(11)?,
                            error: r.get(12)?,
                        }),
                        None => None,
                    },
                    rating: None,
                    distilled: None,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        turns.reverse();
        let Some(first) = turns.first().map(|t| t.turn_id) else {
            return Ok(turns);
        };
        let at: HashMap<i64, usize> = turns
            .iter()
            .enumerate()
            .map(|(i, t)| (t.turn_id, i))
            .collect();
        let mut votes = self.conn.prepare_cached(
            "SELECT turn_id, score FROM votes WHERE kind = 'score' AND turn_id >= ?1
             ORDER BY turn_id, idx",
        )?;
        for row in votes.query_map(params![first], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i8>>(1)?))
        })? {
            let (turn_id, score) = row?;
            if let Some(j) = at.get(&turn_id).and_then(|&i| turns[i].judgment.as_mut()) {
                j.votes.push(score);
            }
        }
        let mut ratings = self.conn.prepare_cached(
            "SELECT turn_id, rating FROM feedback WHERE turn_id >= ?1 ORDER BY id",
        )?;
        for row in ratings.query_map(params![first], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i8>(1)?))
        })? {
            let (turn_id, rating) = row?;
            if let Some(&i) = at.get(&turn_id) {
                turns[i].rating = Some(rating);
            }
        }
        let mut choices = self.conn.prepare_cached(
            "SELECT turn_id, hint_choice FROM version_samples
             WHERE turn_id >= ?1 AND hint_choice IS NOT NULL ORDER BY version_id",
        )?;
        for row in choices.query_map(params![first], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })? {
            let (turn_id, choice) = row?;
            let choice: Option<crate::store::HintChoice> = serde_json::from_str(&choice).ok();
            if let (Some(&i), Some(c)) = (at.get(&turn_id), choice) {
                turns[i].distilled = c.candidates.get(c.chosen).cloned();
            }
        }
        Ok(turns)
    }
}
