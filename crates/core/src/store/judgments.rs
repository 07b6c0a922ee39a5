//! Judgments and ratings: the judge's votes for a turn, and a person's thumbs.

use super::{Store, explain, parse_json, write_transaction};
use anyhow::Result;
use rusqlite::{OptionalExtension, params};
use serde_json::{Value, json};

/// One judge vote as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Vote {
    /// `score` (PRM) or `hint` (hint extraction).
    pub kind: &'static str,
    pub index: usize,
    pub raw: String,
    pub score: Option<i8>,
    pub hint: Option<String>,
    pub probs: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Judgment {
    pub turn_id: i64,
    pub backend: String,
    pub mode: String,
    pub judge_model: String,
    pub score: i8,
    pub hint: Option<String>,
    pub error: Option<String>,
    pub votes: Vec<Vote>,
    pub elapsed_ms: i64,
    pub judged_at: i64,
}

/// Which turn a piece of feedback names.
#[derive(Debug, Clone, PartialEq)]
pub enum TurnRef {
    ResponseId(String),
    Index { session_id: String, turn_index: i64 },
}

/// The turn a rating was recorded for.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedbackRecorded {
    pub turn_id: i64,
    pub session_id: String,
    pub turn_index: i64,
    pub response_id: String,
    pub rating: i8,
    /// The judge's score, kept beside the rating.
    pub judge_score: Option<i8>,
}

#[derive(Debug, thiserror::Error)]
pub enum FeedbackError {
    #[error("{0}")]
    UnknownTurn(String),
    #[error("{0}")]
    SideTurn(String),
    #[error(transparent)]
    Store(#[from] anyhow::Error),
}

impl Store {
    /// Stores a judgment and its votes atomically; a turn already judged keeps its first
    /// judgment (returns `false`), so no vote is ever stored twice.
    pub fn save_judgment(&mut self, j: &Judgment) -> Result<bool> {
        let err = |e| explain(e, "recording the judgment", &self.path);
        let tx = write_transaction(&mut self.conn).map_err(err)?;
        let inserted = tx
            .execute(
                "INSERT OR IGNORE INTO judgments (turn_id, backend, mode, judge_model, score, hint, error, elapsed_ms, judged_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![j.turn_id, j.backend, j.mode, j.judge_model, j.score, j.hint, j.error, j.elapsed_ms, j.judged_at],
            )
            .map_err(err)?;
        if inserted == 0 {
            return Ok(false);
        }
        for v in &j.votes {
            tx.execute(
                "INSERT INTO votes (turn_id, kind, idx, raw, score, hint, probs) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![j.turn_id, v.kind, v.index as i64, v.raw, v.score, v.hint, v.probs.as_ref().map(Value::to_string)],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(true)
    }

    /// Records a human rating (+1 / −1) for a main turn, beside the judge's score.
    pub fn record_feedback(
        &self,
        turn: &TurnRef,
        rating: i8,
        comment: Option<&str>,
        source: &str,
        at: i64,
    ) -> Result<FeedbackRecorded, FeedbackError> {
        let row = |sql: &str, p: &[&dyn rusqlite::ToSql]| {
            self.conn
                .query_row(sql, p, |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, Option<i8>>(5)?,
                    ))
                })
                .optional()
                .map_err(|e| FeedbackError::Store(e.into()))
        };
        const SELECT: &str =
            "SELECT t.id, t.session_id, t.turn_index, t.response_id, t.turn_type, j.score
             FROM turns t LEFT JOIN judgments j ON j.turn_id = t.id";
        let found = match turn {
            TurnRef::ResponseId(id) => row(&format!("{SELECT} WHERE t.response_id = ?1"), &[id])?
                .ok_or_else(|| {
                FeedbackError::UnknownTurn(format!("No turn has the response id `{id}`."))
            })?,
            TurnRef::Index {
                session_id,
                turn_index,
            } => row(
                &format!("{SELECT} WHERE t.session_id = ?1 AND t.turn_index = ?2"),
                &[session_id, turn_index],
            )?
            .ok_or_else(|| {
                FeedbackError::UnknownTurn(format!(
                    "Session `{session_id}` has no turn {turn_index}."
                ))
            })?,
        };
        let (turn_id, session_id, turn_index, response_id, turn_type, judge_score) = found;
        if turn_type != "main" {
            return Err(FeedbackError::SideTurn(format!(
                "Turn {turn_index} of session `{session_id}` is a side turn; side turns are never trained, so they take no feedback."
            )));
        }
        self.conn
            .execute(
                "INSERT INTO feedback (turn_id, rating, comment, source, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![turn_id, rating, comment, source, at],
            )
            .map_err(|e| explain(e, "recording the feedback", &self.path))?;
        Ok(FeedbackRecorded {
            turn_id,
            session_id,
            turn_index,
            response_id,
            rating,
            judge_score,
        })
    }

    pub(super) fn votes_of(&self, turn_id: i64) -> Result<Vec<Value>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT kind, idx, raw, score, hint, probs FROM votes WHERE turn_id = ?1 ORDER BY kind DESC, idx",
        )?;
        let rows = stmt.query_map([turn_id], |r| {
            Ok(json!({
                "kind": r.get::<_, String>(0)?,
                "index": r.get::<_, i64>(1)?,
                "raw": r.get::<_, String>(2)?,
                "score": r.get::<_, Option<i64>>(3)?.map_or(json!("invalid"), |s| json!(s)),
                "hint": r.get::<_, Option<String>>(4)?,
                "probs": parse_json(r.get(5)?),
            }))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}
