//! `clawrl-tui export`: every turn as one JSON object, with its judgment, rating, reward and
//! the versions trained on it; and the times it reads and writes.

use super::{Store, TurnType, now_ms, parse_json};
use anyhow::{Context, Result};
use serde_json::{Value, json};

impl Store {
    /// Every turn created at or after `since_ms`, oldest first, as export records.
    pub fn export(
        &self,
        since_ms: i64,
        mut each: impl FnMut(Value) -> Result<()>,
    ) -> Result<usize> {
        let mut stmt = self.conn.prepare(
            "SELECT t.id, t.session_id, t.turn_index, t.turn_type, t.response_id, t.request_messages, t.tools, t.prompt_ids,
                    t.response_ids, t.logprobs, t.response_text, t.tool_calls, t.finish_reason, t.adapter_version, t.sampling,
                    t.cached_tokens, t.created_at, t.completed_at, t.next_state, t.next_state_role, t.next_state_at,
                    t.no_signal_at, j.turn_id, j.backend, j.mode, j.judge_model, j.score, j.hint, j.error, j.elapsed_ms, j.judged_at,
                    f.rating, f.comment, f.source, f.created_at
             FROM turns t
             LEFT JOIN judgments j ON j.turn_id = t.id
             LEFT JOIN feedback f ON f.id = (SELECT MAX(id) FROM feedback WHERE turn_id = t.id)
             WHERE t.created_at >= ?1 ORDER BY t.created_at, t.id",
        )?;
        let parse = parse_json;
        let mut rows = stmt.query([since_ms])?;
        let mut n = 0;
        while let Some(r) = rows.next()? {
            let ts = |i: usize| -> rusqlite::Result<Value> {
                Ok(r.get::<_, Option<i64>>(i)?
                    .map_or(Value::Null, |ms| json!(rfc3339(ms))))
            };
            let mut record = json!({
                "turn_id": r.get::<_, i64>(0)?,
                "session_id": r.get::<_, String>(1)?,
                "turn_index": r.get::<_, i64>(2)?,
                "turn_type": r.get::<_, String>(3)?,
                "response_id": r.get::<_, String>(4)?,
                "request_messages": parse(r.get(5)?),
                "tools": parse(r.get(6)?),
                "prompt_ids": parse(r.get(7)?),
                "response_ids": parse(r.get(8)?),
                "logprobs": parse(r.get(9)?),
                "response_text": r.get::<_, String>(10)?,
                "tool_calls": parse(r.get(11)?),
                "finish_reason": r.get::<_, String>(12)?,
                "adapter_version": r.get::<_, i64>(13)?,
                "sampling": parse(r.get(14)?),
                "cached_tokens": r.get::<_, i64>(15)?,
                "created_at": ts(16)?,
                "completed_at": ts(17)?,
                "next_state": parse(r.get(18)?),
                "next_state_role": r.get::<_, Option<String>>(19)?,
                "next_state_at": ts(20)?,
            });
            let turn_id = r.get::<_, i64>(0)?;
            let main = r.get::<_, TurnType>(3)? == TurnType::Main;
            let judged = r.get::<_, Option<i64>>(22)?.is_some();
            let judge_score = r.get::<_, Option<i64>>(26)?;
            let rating = r.get::<_, Option<i64>>(31)?;
            let status = if !main {
                "not_trained"
            } else if judged {
                "judged"
            } else if r.get::<_, Option<String>>(18)?.is_some() {
                "pending"
            } else if r.get::<_, Option<i64>>(21)?.is_some() {
                "no_signal"
            } else {
                "awaiting_next_state"
            };
            record["judge_status"] = json!(status);
            record["judgment"] = if judged {
                json!({
                    "backend": r.get::<_, String>(23)?,
                    "mode": r.get::<_, String>(24)?,
                    "judge_model": r.get::<_, String>(25)?,
                    "score": judge_score,
                    "hint": r.get::<_, Option<String>>(27)?,
                    "error": r.get::<_, Option<String>>(28)?,
                    "elapsed_ms": r.get::<_, i64>(29)?,
                    "judged_at": ts(30)?,
                    "votes": self.votes_of(turn_id)?,
                })
            } else {
                Value::Null
            };
            record["feedback"] = match rating {
                Some(rating) => json!({
                    "rating": if rating > 0 { "up" } else { "down" },
                    "comment": r.get::<_, Option<String>>(32)?,
                    "source": r.get::<_, String>(33)?,
                    "created_at": ts(34)?,
                }),
                None => Value::Null,
            };
            // The human rating overrides the judge; both stay visible.
            // A judgment that failed (`error` set) is no reward at all, not a neutral one.
            let judge_failed = r.get::<_, Option<String>>(28)?.is_some();
            record["reward"] = json!(rating.or(judge_score.filter(|_| !judge_failed)));
            // Which versions learned from this turn (and why none will, if it was set aside).
            record["trained_in"] = json!(self.trained_in(turn_id)?);
            // What its distillation read, per version that trained on it.
            record["hint_choices"] = json!(self.hint_choices(turn_id)?);
            record["training_dropped"] = json!(self.dropped_reason(turn_id)?);
            each(record)?;
            n += 1;
        }
        Ok(n)
    }
}

/// Milliseconds since the epoch as RFC 3339 UTC.
pub fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Parses `--since`: RFC 3339 (`2026-11-24T10:00:00Z`, or a bare date) or a duration ago (`2h`).
pub fn parse_since(s: &str) -> Result<i64> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(now_ms() - d.as_millis() as i64);
    }
    let full = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        s.to_string()
    };
    let t = humantime::parse_rfc3339_weak(&full).with_context(|| format!("--since {s:?}: expected a time like 2026-11-24T10:00:00Z, a date, or a duration like 2h"))?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0))
}
