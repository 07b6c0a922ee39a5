//! What the trainer reads: main turns with a learning signal that no version trained on yet.

use super::{Store, explain, parse_json, parse_or_default};
use anyhow::Result;
use clawrl_model::messages::Message;
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
    pub request_messages: Vec<Message>,
    pub tools: Option<Value>,
    pub reward: Option<i8>,
    /// The judge's hint.
    pub hint: Option<String>,
    /// The messages that answered the turn (none yet: empty) and whose they were (user | tool).
    pub next_state: Vec<Message>,
    pub next_state_role: Option<String>,
    /// When its last signal arrived (unix ms).
    pub signal_at: i64,
}

impl Store {
    /// Turns ready to train on, oldest first. A judgment that failed (`error` set) is no signal
    /// at all. With `wait_for_judge` (ms), a turn whose next state arrived but whose judgment
    /// has not is not ready yet (its score or hint is coming), even if it was rated, nor is a
    /// turn rated down before its next state (the user's correction is coming), unless its
    /// rating is older than that (a judge or user that is silent does not hold thumbs back
    /// forever).
    pub(crate) fn ready_samples(
        &self,
        wait_for_judge: Option<i64>,
        limit: usize,
    ) -> Result<Vec<SampleRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT t.id, t.adapter_version, t.prompt_ids, t.response_ids, t.logprobs, t.request_messages, t.tools,
                    f.rating, f.created_at, j.score, j.hint, j.judged_at,
                    EXISTS (SELECT 1 FROM judgments a WHERE a.turn_id = t.id), t.next_state IS NOT NULL,
                    t.next_state, t.next_state_role
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
            let rated_at: Option<i64> = r.get(8)?;
            let rating: Option<i8> = r.get(7)?;
            // A thumbs down is usually followed by the user's correction, the best hint there
            // is: wait for it as for a judgment (taken at once, the update trained without it).
            let awaiting_correction = !has_next_state && rating.is_some_and(|r| r < 0);
            if let Some(limit) = wait_for_judge
                && (has_next_state && !judged || awaiting_correction)
                && rated_at.is_none_or(|at| super::now_ms() - at < limit)
            {
                continue;
            }
            let ids = |i: usize| -> rusqlite::Result<Vec<u32>> { Ok(parse_or_default(r.get(i)?)) };
            let judge_score: Option<i8> = r.get(9)?;
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
                logprobs: parse_or_default(r.get(4)?),
                request_messages: parse_or_default(r.get(5)?),
                tools: r.get::<_, Option<String>>(6)?.map(|s| parse_json(Some(s))),
                reward: super::reward(rating, judge_score),
                hint: r.get(10)?,
                next_state: parse_or_default(r.get(14)?),
                next_state_role: r.get(15)?,
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
    pub(crate) fn drop_samples(&mut self, turns: &[(i64, String)], at: i64) -> Result<()> {
        let err = |e| explain(e, "setting samples aside", &self.path);
        let tx = super::write_transaction(&mut self.conn).map_err(err)?;
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
    pub(crate) fn approved_answers(
        &self,
        limit: usize,
        max_tokens: usize,
    ) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT t.prompt_ids, t.response_ids FROM turns t
             LEFT JOIN judgments j ON j.turn_id = t.id AND j.error IS NULL
             LEFT JOIN feedback f ON f.id = (SELECT MAX(id) FROM feedback WHERE turn_id = t.id)
             -- records::reward, for +1: the latest rating, else the judge's score.
             WHERE t.turn_type = 'main' AND COALESCE(f.rating, j.score) = 1
             ORDER BY t.id DESC LIMIT 200",
        )?;
        let rows = stmt.query_map([], |r| {
            let ids = |i: usize| -> rusqlite::Result<Vec<u32>> { Ok(parse_or_default(r.get(i)?)) };
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

#[cfg(test)]
mod tests {
    use super::super::tests::turn;
    use super::super::{Judgment, Store, TurnRef, UpdateMetrics, VersionRow};
    use clawrl_model::messages::Message;
    use serde_json::json;

    fn judged(store: &mut Store, turn_id: i64, score: i8, hint: Option<&str>, error: Option<&str>) {
        store
            .save_judgment(&Judgment {
                turn_id,
                backend: "local".into(),
                mode: "direct".into(),
                judge_model: "m".into(),
                score,
                hint: hint.map(str::to_owned),
                error: error.map(str::to_owned),
                votes: Vec::new(),
                elapsed_ms: 1,
                judged_at: 5_000,
            })
            .unwrap();
    }

    fn rate(store: &Store, turn_id: i64, rating: i8) {
        let id = store
            .export(0, |_| Ok(()))
            .map(|_| ())
            .and_then(|_| {
                Ok(store.conn.query_row(
                    "SELECT response_id FROM turns WHERE id = ?1",
                    [turn_id],
                    |r| r.get::<_, String>(0),
                )?)
            })
            .unwrap();
        store
            .record_feedback(
                &TurnRef::ResponseId(id),
                rating,
                None,
                "api",
                super::super::now_ms(),
            )
            .unwrap();
    }

    fn ready(store: &Store, wait: Option<i64>) -> Vec<(i64, Option<i8>, bool)> {
        store
            .ready_samples(wait, 100)
            .unwrap()
            .into_iter()
            .map(|s| (s.turn_id, s.reward, s.hint.is_some()))
            .collect()
    }

    #[test]
    fn samples_are_turns_with_a_signal_used_once_and_a_failed_judgment_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("s.sqlite")).unwrap();
        store.ensure_session("a", "header", 1_000).unwrap();
        let ids: Vec<i64> = (0..6)
            .map(|i| store.insert_turn(&turn("a", i)).unwrap())
            .collect();
        let next = [Message::user("next")];
        for &t in &ids[1..] {
            store.attach_next_state(t, &next, "user", 3_000).unwrap();
        }
        rate(&store, ids[0], 1); // a thumbs up, no next state
        rate(&store, ids[1], -1); // rated, its judgment still coming
        judged(&mut store, ids[2], 0, None, Some("judge prompt too long")); // failed
        judged(&mut store, ids[3], 0, Some("Answer in km."), None); // a hint only
        judged(&mut store, ids[4], -1, None, None);
        rate(&store, ids[4], 1); // the rating wins
        // ids[5]: a next state, no judgment, no rating: nothing yet.

        let want_later = vec![
            (ids[0], Some(1), false),
            (ids[3], None, true),
            (ids[4], Some(1), false),
        ];
        assert_eq!(
            ready(&store, Some(60_000)),
            want_later,
            "the rated turn waits for its judge"
        );
        let mut all = want_later.clone();
        all.insert(1, (ids[1], Some(-1), false));
        assert_eq!(
            ready(&store, Some(0)),
            all,
            "a rating older than the wait goes ahead"
        );
        assert_eq!(
            ready(&store, None),
            all,
            "without a judge nothing is awaited"
        );

        let rows = exported(&store);
        assert!(
            rows[2]["reward"].is_null(),
            "a failed judgment is no reward: {}",
            rows[2]
        );

        // Used by a version: never offered again, and the export says which version.
        let version = VersionRow {
            id: 1,
            parent: 0,
            created_at: 6_000,
            state: super::super::VersionState::Candidate,
            metrics: UpdateMetrics::default(),
            kl_base: None,
            kl_live: None,
            approved_delta: None,
            guard_passed: true,
            guard_report: json!({}),
            path: "p".into(),
            sha256: "s".into(),
            lora: json!({}),
            decided_at: None,
            decided_by: None,
            error: None,
        };
        store
            .insert_version(
                &version,
                &[super::super::TrainedSample {
                    turn_id: ids[0],
                    reward: Some(1.0),
                    hint_choice: None,
                }],
            )
            .unwrap();
        store
            .drop_samples(&[(ids[3], "stale".into())], 7_000)
            .unwrap();
        assert_eq!(
            ready(&store, None),
            vec![(ids[1], Some(-1), false), (ids[4], Some(1), false)]
        );
        assert_eq!(store.trained_in(ids[0]).unwrap(), vec![1]);
        assert_eq!(
            store.dropped_reason(ids[3]).unwrap().as_deref(),
            Some("stale")
        );
        let rows = exported(&store);
        assert_eq!(rows[0]["trained_in"], json!([1]));
        assert_eq!(rows[3]["training_dropped"], "stale");
    }

    #[test]
    fn a_reply_rated_down_waits_for_the_users_correction_then_its_judgment() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("s.sqlite")).unwrap();
        store.ensure_session("a", "header", 1_000).unwrap();
        let next = [Message::user("Shorter please.")];
        let down = store.insert_turn(&turn("a", 0)).unwrap();
        rate(&store, down, -1);
        let ids_of = |store: &Store, w| ready(store, w).iter().map(|r| r.0).collect::<Vec<_>>();
        assert!(
            ids_of(&store, Some(60_000)).is_empty(),
            "waits for the correction"
        );
        assert_eq!(ids_of(&store, Some(0)), [down], "not forever");
        assert_eq!(
            ids_of(&store, None),
            [down],
            "without a judge nothing is awaited"
        );
        store.attach_next_state(down, &next, "user", 4_000).unwrap();
        assert!(
            ids_of(&store, Some(60_000)).is_empty(),
            "then for the judge"
        );
        judged(&mut store, down, -1, None, None);
        let r = store.ready_samples(Some(60_000), 100).unwrap();
        assert_eq!(r.len(), 1, "ready once judged");
        assert_eq!(r[0].next_state, next);
        assert_eq!(r[0].reward, Some(-1));
    }

    /// Every turn as `export` writes it.
    fn exported(store: &Store) -> Vec<serde_json::Value> {
        let mut rows = Vec::new();
        store
            .export(0, |r| {
                rows.push(r);
                Ok(())
            })
            .unwrap();
        rows
    }
}
