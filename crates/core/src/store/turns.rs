//! Turns and sessions: a served turn committed, its next state attached, sessions closed and
//! resumed, and the turns that wait for the judge.

use super::{Store, TurnType, explain, json_text, parse_or_default, write_transaction};
use anyhow::Result;
use clawrl_model::messages::{Message, ToolCall};
use rusqlite::{OptionalExtension, params};
use serde_json::Value;

/// A finished turn, ready to be committed.
#[derive(Debug, Clone)]
pub struct NewTurn {
    pub session_id: String,
    pub turn_index: i64,
    pub turn_type: TurnType,
    pub response_id: String,
    pub request_messages: Vec<Message>,
    pub tools: Option<Value>,
    pub prompt_ids: Vec<u32>,
    pub response_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub response_text: String,
    pub tool_calls: Vec<ToolCall>,
    /// The assistant message as the client received it.
    pub reply_message: Message,
    pub finish_reason: String,
    pub adapter_version: i64,
    pub sampling: Value,
    pub cached_tokens: usize,
    pub created_at: i64,
    pub completed_at: i64,
}

/// A main turn with a next state and no judgment yet: the judge's input.
#[derive(Debug, Clone)]
pub struct PendingTurn {
    pub turn_id: i64,
    pub session_id: String,
    pub request_messages: Vec<Message>,
    pub response_text: String,
    pub tool_calls: Vec<ToolCall>,
    pub next_state: Vec<Message>,
    pub next_state_role: String,
}

/// A session still open in the store (left by a previous process).
#[derive(Debug, Clone)]
pub struct OpenSession {
    pub id: String,
    pub last_active_at: i64,
    pub next_turn_index: i64,
    pub last_main: Option<LastMainTurn>,
}

#[derive(Debug, Clone)]
pub struct LastMainTurn {
    pub turn_id: i64,
    pub request_messages: Vec<Message>,
    pub reply_message: Message,
    pub awaiting_next_state: bool,
}

impl Store {
    pub fn ensure_session(&self, id: &str, source: &str, at: i64) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO sessions (id, source, created_at, last_active_at) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT(id) DO UPDATE SET last_active_at = excluded.last_active_at, closed_at = NULL, close_reason = NULL",
                params![id, source, at],
            )
            .map_err(|e| explain(e, "recording the session", &self.path))?;
        Ok(())
    }

    pub fn insert_turn(&self, t: &NewTurn) -> Result<i64> {
        self.conn
            .execute(
                "INSERT INTO turns (session_id, turn_index, turn_type, response_id, request_messages, tools, prompt_ids,
                    response_ids, logprobs, response_text, tool_calls, finish_reason, adapter_version, sampling,
                    cached_tokens, created_at, completed_at, reply_message)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
                params![
                    t.session_id,
                    t.turn_index,
                    t.turn_type,
                    t.response_id,
                    json_text(&t.request_messages),
                    t.tools.as_ref().map(Value::to_string),
                    json_text(&t.prompt_ids),
                    json_text(&t.response_ids),
                    json_text(&t.logprobs),
                    t.response_text,
                    (!t.tool_calls.is_empty()).then(|| json_text(&t.tool_calls)),
                    t.finish_reason,
                    t.adapter_version,
                    t.sampling.to_string(),
                    t.cached_tokens as i64,
                    t.created_at,
                    t.completed_at,
                    json_text(&t.reply_message),
                ],
            )
            .map_err(|e| explain(e, "recording the turn", &self.path))?;
        let id = self.conn.last_insert_rowid();
        self.conn
            .execute(
                "UPDATE sessions SET last_active_at = ?2 WHERE id = ?1",
                params![t.session_id, t.completed_at],
            )
            .map_err(|e| explain(e, "recording the session", &self.path))?;
        Ok(id)
    }

    /// Attaches the next state to a turn that has none yet; returns whether it did.
    pub fn attach_next_state(
        &self,
        turn_id: i64,
        messages: &[Message],
        role: &str,
        at: i64,
    ) -> Result<bool> {
        let n = self
            .conn
            .execute(
                "UPDATE turns SET next_state = ?2, next_state_role = ?3, next_state_at = ?4 WHERE id = ?1 AND next_state IS NULL",
                params![turn_id, json_text(&messages), role, at],
            )
            .map_err(|e| explain(e, "recording the next state", &self.path))?;
        Ok(n == 1)
    }

    /// Closes a session; its main turns still without a next state are marked "no signal".
    /// Returns how many turns were so marked.
    pub fn close_session(&mut self, id: &str, reason: &str, at: i64) -> Result<usize> {
        let err = |e| explain(e, "closing the session", &self.path);
        let tx = write_transaction(&mut self.conn).map_err(err)?;
        tx.execute("UPDATE sessions SET closed_at = ?2, close_reason = ?3 WHERE id = ?1 AND closed_at IS NULL", params![id, at, reason])
            .map_err(err)?;
        let marked = tx
            .execute(
                "UPDATE turns SET no_signal_at = ?2 WHERE session_id = ?1 AND turn_type = 'main' AND next_state IS NULL AND no_signal_at IS NULL",
                params![id, at],
            )
            .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(marked)
    }

    /// The sessions a previous process left open, with what continuing them needs.
    pub fn open_sessions(&self) -> Result<Vec<OpenSession>> {
        let mut stmt = self.conn.prepare(
            "SELECT s.id, s.last_active_at,
                    (SELECT MAX(turn_index) FROM turns WHERE session_id = s.id),
                    t.id, t.request_messages, t.reply_message, t.response_text, t.tool_calls, t.next_state IS NULL
             FROM sessions s
             LEFT JOIN turns t ON t.id = (SELECT MAX(id) FROM turns WHERE session_id = s.id AND turn_type = 'main')
             WHERE s.closed_at IS NULL",
        )?;
        let rows = stmt.query_map([], |r| {
            let last_main = match r.get::<_, Option<i64>>(3)? {
                None => None,
                Some(turn_id) => {
                    let stored = r.get::<_, Option<String>>(5)?;
                    let reply = match stored.and_then(|m| serde_json::from_str(&m).ok()) {
                        Some(m) => m,
                        // Turns from before `reply_message` was stored: rebuild the message.
                        None => Message {
                            tool_calls: parse_or_default(r.get(7)?),
                            ..Message::assistant(r.get::<_, String>(6)?)
                        },
                    };
                    Some(LastMainTurn {
                        turn_id,
                        request_messages: parse_or_default(r.get(4)?),
                        reply_message: reply,
                        awaiting_next_state: r.get(8)?,
                    })
                }
            };
            Ok(OpenSession {
                id: r.get(0)?,
                last_active_at: r.get(1)?,
                next_turn_index: r.get::<_, Option<i64>>(2)?.map_or(0, |i| i + 1),
                last_main,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Main turns with a next state and no judgment, oldest first.
    pub(crate) fn pending_judgments(&self, limit: usize) -> Result<Vec<PendingTurn>> {
        let mut stmt = self.conn.prepare(
            "SELECT t.id, t.session_id, t.request_messages, t.response_text, t.tool_calls, t.next_state, t.next_state_role
             FROM turns t LEFT JOIN judgments j ON j.turn_id = t.id
             WHERE j.turn_id IS NULL AND t.turn_type = 'main' AND t.next_state IS NOT NULL
             ORDER BY t.id LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok(PendingTurn {
                turn_id: r.get(0)?,
                session_id: r.get(1)?,
                request_messages: parse_or_default(r.get(2)?),
                response_text: r.get(3)?,
                tool_calls: parse_or_default(r.get(4)?),
                next_state: parse_or_default(r.get(5)?),
                next_state_role: r
                    .get::<_, Option<String>>(6)?
                    .unwrap_or_else(|| "user".into()),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// How many turns wait for the judge.
    pub(crate) fn count_pending_judgments(&self) -> Result<usize> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM turns t LEFT JOIN judgments j ON j.turn_id = t.id
             WHERE j.turn_id IS NULL AND t.turn_type = 'main' AND t.next_state IS NOT NULL",
            [],
            |r| r.get::<_, i64>(0),
        )? as usize)
    }

    /// The highest turn index used in a session (to continue numbering after a restart).
    pub(crate) fn last_turn_index(&self, session_id: &str) -> Result<Option<i64>> {
        Ok(self
            .conn
            .query_row(
                "SELECT MAX(turn_index) FROM turns WHERE session_id = ?1",
                [session_id],
                |r| r.get(0),
            )
            .optional()?
            .flatten())
    }
}
