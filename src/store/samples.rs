//! What the trainer reads: main turns with a learning signal that no version trained on yet.

use super::{Store, explain, parse_json};
use anyhow::Result;
use rusqlite::params;
use serde_json::Value;

/// A captured turn with its signals: a reward (the latest human rating, else the judge's
/// non-zero score) and/or a hint (for distillation).
#[derive(Debug, Clone)]
pub struct SampleRow {
    pub turn_id: i64,
    /// The version that produced the turn (its log-probs are that policy's).
    pub adapter_version: i64,
    pub prompt_ids: Vec<u32>,
    pub response_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub request_messages: Value,
    pub tools: Option<Value>,
    pub reward: Option<i8>,
    pub hint: Option<String>,
    /// When its last signal arrived (unix ms).
    pub signal_at: i64,
}

impl Store {
    /// Turns ready to train on, oldest first. A judgment that failed (`error` set) is no signal
    /// at all. With `wait_for_judge`, a turn whose next state arrived but whose judgment has
    /// not is not ready yet (its score or hint is coming), even if it was rated.
    pub fn ready_samples(&self, wait_for_judge: bool, limit: usize) -> Result<Vec<SampleRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT t.id, t.adapter_version, t.prompt_ids, t.response_ids, t.logprobs, t.request_messages, t.tools,
                    f.rating, f.created_at, j.score, j.hint, j.judged_at,
                    EXISTS (SELECT 1 FROM judgments a WHERE a.turn_id = t.id), t.next_state IS NOT NULL
             FROM turns t
             LEFT JOIN judgments j ON j.turn_id = t.id AND j.error IS NULL
             LEFT JOIN feedback f ON f.id = (SELECT MAX(id) FROM feedback WHERE turn_id = t.id)
             WHERE t.turn_type = 'main'
               AND NOT EXISTS (SELECT 1 FROM version_samples v WHERE v.turn_id = t.id)
               AND NOT EXISTS (SELECT 1 FROM dropped_samples d WHERE d.turn_id = t.id)
               AND (f.rating IS NOT NULL OR (j.turn_id IS NOT NULL AND (j.score != 0 OR j.hint IS NOT NULL)))
             ORDER BY t.id",
        )?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            // Judged (even if the judgment failed), or nothing to wait for.
            let judged: bool = r.get(12)?;
            let has_next_state: bool = r.get(13)?;
            if wait_for_judge && has_next_state && !judged {
                continue;
            }
            let ids = |i: usize| -> rusqlite::Result<Vec<u32>> {
                Ok(serde_json::from_value(parse_json(r.get(i)?)).unwrap_or_default())
            };
            let rating: Option<i8> = r.get(7)?;
            let judge_score: Option<i8> = r.get::<_, Option<i8>>(9)?.filter(|&s| s != 0);
            let signal_at = [r.get::<_, Option<i64>>(8)?, r.get::<_, Option<i64>>(11)?]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(0);
            out.push(SampleRow {
                turn_id: r.get(0)?,
                adapter_version: r.get(1)?,
                prompt_ids: ids(2)?,
                response_ids: ids(3)?,
                logprobs: serde_json::from_value(parse_json(r.get(4)?)).unwrap_or_default(),
                request_messages: parse_json(r.get(5)?),
                tools: r.get::<_, Option<String>>(6)?.map(|s| parse_json(Some(s))),
                reward: rating.or(judge_score),
                hint: r.get(10)?,
                signal_at,
            });
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Judged turns, mean seconds per judgment, and judgments with a hint.
    pub fn judgment_stats(&self) -> Result<(usize, f64, usize)> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*), COALESCE(AVG(elapsed_ms), 0) / 1000.0, COUNT(hint) FROM judgments",
            [],
            |r| {
                Ok((
                    r.get::<_, i64>(0)? as usize,
                    r.get(1)?,
                    r.get::<_, i64>(2)? as usize,
                ))
            },
        )?)
    }

    /// Sets turns aside for good (they will not be offered again), with the reason.
    pub fn drop_samples(&mut self, turns: &[(i64, String)], at: i64) -> Result<()> {
        let err = |e| explain(e, "setting samples aside", &self.path);
        let tx = self.conn.transaction().map_err(err)?;
        for (turn_id, reason) in turns {
            tx.execute(
                "INSERT OR IGNORE INTO dropped_samples (turn_id, reason, at) VALUES (?1, ?2, ?3)",
                params![turn_id, reason, at],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(())
    }

    /// Prompt and response ids of the most recent main turns rewarded +1 (a rating, else the
    /// judge), at most `max_tokens` long together: answers the guard keeps likely.
    pub fn approved_answers(
        &self,
        limit: usize,
        max_tokens: usize,
    ) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT t.prompt_ids, t.response_ids FROM turns t
             LEFT JOIN judgments j ON j.turn_id = t.id AND j.error IS NULL
             LEFT JOIN feedback f ON f.id = (SELECT MAX(id) FROM feedback WHERE turn_id = t.id)
             WHERE t.turn_type = 'main' AND COALESCE(f.rating, j.score) = 1
             ORDER BY t.id DESC LIMIT 200",
        )?;
        let rows = stmt.query_map([], |r| {
            let ids = |i: usize| -> rusqlite::Result<Vec<u32>> {
                Ok(serde_json::from_value(parse_json(r.get(i)?)).unwrap_or_default())
            };
            Ok((ids(0)?, ids(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (p, r) = row?;
            if !p.is_empty() && !r.is_empty() && p.len() + r.len() <= max_tokens {
                out.push((p, r));
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }
}
