//! The version history: every adapter trained here (a row per version, never deleted), the
//! turns each was trained on, every change of the live version, and persistent settings.

use super::VersionState;
use super::{Store, explain, parse_json};
use anyhow::{Result, bail};
use rusqlite::{OptionalExtension, params};
use serde_json::Value;

/// What an update measured while training (a version's own numbers).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UpdateMetrics {
    /// Turns trained on.
    pub samples: usize,
    /// Response tokens trained on.
    pub tokens: usize,
    /// Mean loss over the samples.
    pub loss: f64,
    /// KL(sampling-time policy ‖ policy before the step) on the trained tokens.
    pub drift: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Mean reward over the samples that had one.
    pub mean_reward: Option<f64>,
    /// Samples with a distillation (OPD) signal.
    pub hints: usize,
    pub train_secs: f64,
    /// The learning rate of the update's step (train.learning_rate after warmup and
    /// `train.signal_sized_steps`); `None` for versions from before it was recorded.
    pub learning_rate: Option<f64>,
}

/// A turn a version was trained on, as recorded with it.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainedSample {
    pub turn_id: i64,
    /// The reward as given (a rating, else the judge's score).
    pub reward: Option<f64>,
    /// What its distillation read (`store::HintChoice` as JSON), when it had a teacher.
    pub hint_choice: Option<Value>,
}

/// A version: recorded as a candidate, then decided.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VersionRow {
    pub id: i64,
    pub parent: i64,
    pub created_at: i64,
    /// candidate | live | vetoed | retired
    pub state: VersionState,
    pub metrics: UpdateMetrics,
    pub kl_base: Option<f64>,
    pub kl_live: Option<f64>,
    pub approved_delta: Option<f64>,
    pub guard_passed: bool,
    pub guard_report: Value,
    pub path: String,
    pub sha256: String,
    pub lora: Value,
    pub decided_at: Option<i64>,
    pub decided_by: Option<String>,
    pub error: Option<String>,
}

/// One change of the live version.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LiveChange {
    pub version: i64,
    pub at: i64,
    pub reason: String,
}

const COLUMNS: &str = "id, parent, created_at, state, samples, tokens, loss, drift, grad_norm, mean_reward, hints,
    train_secs, kl_base, kl_live, approved_delta, guard_passed, guard_report, path, sha256, lora, decided_at,
    decided_by, error, learning_rate";

fn version_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VersionRow> {
    Ok(VersionRow {
        id: r.get(0)?,
        parent: r.get(1)?,
        created_at: r.get(2)?,
        state: r.get(3)?,
        metrics: UpdateMetrics {
            samples: r.get::<_, i64>(4)? as usize,
            tokens: r.get::<_, i64>(5)? as usize,
            loss: r.get(6)?,
            drift: r.get(7)?,
            grad_norm: r.get(8)?,
            mean_reward: r.get(9)?,
            hints: r.get::<_, i64>(10)? as usize,
            train_secs: r.get(11)?,
            learning_rate: r.get(23)?,
        },
        kl_base: r.get(12)?,
        kl_live: r.get(13)?,
        approved_delta: r.get(14)?,
        guard_passed: r.get(15)?,
        guard_report: parse_json(r.get(16)?),
        path: r.get(17)?,
        sha256: r.get(18)?,
        lora: parse_json(r.get(19)?),
        decided_at: r.get(20)?,
        decided_by: r.get(21)?,
        error: r.get(22)?,
    })
}

impl Store {
    /// The id the next version gets (ids are never reused).
    pub(crate) fn next_version_id(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM versions", [], |r| {
                r.get(0)
            })?)
    }

    /// Records a candidate (its state and decision fields are ignored) and the turns it was
    /// trained on, in one transaction: the samples count as used exactly when the version exists.
    pub(crate) fn insert_version(
        &mut self,
        v: &VersionRow,
        samples: &[TrainedSample],
    ) -> Result<()> {
        let err = |e| explain(e, "recording the version", &self.path);
        let tx = super::write_transaction(&mut self.conn).map_err(err)?;
        tx.execute(
            "INSERT INTO versions (id, parent, created_at, state, samples, tokens, loss, drift, grad_norm, mean_reward,
                hints, train_secs, kl_base, kl_live, approved_delta, guard_passed, guard_report, path, sha256, lora,
                learning_rate)
             VALUES (?1, ?2, ?3, 'candidate', ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)",
            params![
                v.id,
                v.parent,
                v.created_at,
                v.metrics.samples as i64,
                v.metrics.tokens as i64,
                v.metrics.loss,
                v.metrics.drift,
                v.metrics.grad_norm,
                v.metrics.mean_reward,
                v.metrics.hints as i64,
                v.metrics.train_secs,
                v.kl_base,
                v.kl_live,
                v.approved_delta,
                v.guard_passed,
                v.guard_report.to_string(),
                v.path,
                v.sha256,
                v.lora.to_string(),
                v.metrics.learning_rate,
            ],
        )
        .map_err(err)?;
        for s in samples {
            tx.execute(
                "INSERT INTO version_samples (version_id, turn_id, reward, hint, hint_choice) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    v.id,
                    s.turn_id,
                    s.reward,
                    s.hint_choice.is_some(),
                    s.hint_choice.as_ref().map(Value::to_string)
                ],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(())
    }

    pub fn versions(&self) -> Result<Vec<VersionRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM versions ORDER BY id"))?;
        let rows = stmt.query_map([], version_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn version(&self, id: i64) -> Result<Option<VersionRow>> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM versions WHERE id = ?1"),
                [id],
                version_row,
            )
            .optional()?)
    }

    /// Every change of the live version, oldest first.
    pub fn live_history(&self) -> Result<Vec<LiveChange>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT version_id, at, reason FROM live_history ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok(LiveChange {
                version: r.get(0)?,
                at: r.get(1)?,
                reason: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The live version as recorded (0 when none ever went live).
    pub fn live_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row(
                "SELECT version_id FROM live_history ORDER BY id DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0))
    }

    /// Makes `id` the live version (0 = base): the previous live one is retired, the change is
    /// appended to the history, all in one transaction.
    pub fn set_live(&mut self, id: i64, reason: &str, by: &str, at: i64) -> Result<()> {
        let err = |e| explain(e, "recording the live version", &self.path);
        let tx = super::write_transaction(&mut self.conn).map_err(err)?;
        if id != 0 {
            let state: Option<String> = tx
                .query_row("SELECT state FROM versions WHERE id = ?1", [id], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(err)?;
            match state.as_deref() {
                None => bail!("there is no version {id}"),
                Some("vetoed") => bail!("version {id} was vetoed"),
                _ => {}
            }
        }
        tx.execute(
            "UPDATE versions SET state = 'retired' WHERE state = 'live' AND id != ?1",
            [id],
        )
        .map_err(err)?;
        tx.execute(
            "UPDATE versions SET state = 'live', decided_at = COALESCE(decided_at, ?2), decided_by = COALESCE(decided_by, ?3)
             WHERE id = ?1",
            params![id, at, by],
        )
        .map_err(err)?;
        tx.execute(
            "INSERT INTO live_history (version_id, at, reason) VALUES (?1, ?2, ?3)",
            params![id, at, reason],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(())
    }

    /// Vetoes a candidate.
    pub fn veto(&self, id: i64, by: &str, at: i64) -> Result<()> {
        let n = self
            .conn
            .execute(
                "UPDATE versions SET state = 'vetoed', decided_at = ?2, decided_by = ?3 WHERE id = ?1 AND state = 'candidate'",
                params![id, at, by],
            )
            .map_err(|e| explain(e, "recording the veto", &self.path))?;
        if n == 0 {
            bail!("version {id} is not a candidate");
        }
        Ok(())
    }

    /// Records why a version's adapter could not be served.
    pub(crate) fn set_version_error(&self, id: i64, error: &str) -> Result<()> {
        self.conn
            .execute(
                "UPDATE versions SET error = ?2 WHERE id = ?1",
                params![id, error],
            )
            .map_err(|e| explain(e, "recording the version's error", &self.path))?;
        Ok(())
    }

    /// The versions trained on a turn.
    /// The hint choices recorded for `turn_id` by the versions that distilled from it:
    /// `{"version": id, ...HintChoice}`.
    pub fn hint_choices(&self, turn_id: i64) -> Result<Vec<Value>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT version_id, hint_choice FROM version_samples
             WHERE turn_id = ?1 AND hint_choice IS NOT NULL ORDER BY version_id",
        )?;
        let rows = stmt.query_map([turn_id], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (version, choice) = row?;
            let mut v = parse_json(Some(choice));
            if let Some(o) = v.as_object_mut() {
                o.insert("version".into(), version.into());
            }
            out.push(v);
        }
        Ok(out)
    }

    pub fn trained_in(&self, turn_id: i64) -> Result<Vec<i64>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT version_id FROM version_samples WHERE turn_id = ?1 ORDER BY version_id",
        )?;
        let rows = stmt.query_map([turn_id], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// For each turn a version was trained on: when it got its signal (its next state, else
    /// its latest rating) and when it was judged, if it was (unix ms).
    pub fn sample_times(&self, version_id: i64) -> Result<Vec<(i64, Option<i64>)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT COALESCE(t.next_state_at, (SELECT MAX(created_at) FROM feedback f WHERE f.turn_id = t.id)),
                    (SELECT judged_at FROM judgments j WHERE j.turn_id = t.id)
             FROM version_samples v JOIN turns t ON t.id = v.turn_id WHERE v.version_id = ?1",
        )?;
        let rows = stmt.query_map([version_id], |r| {
            Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, Option<i64>>(1)?))
        })?;
        Ok(rows
            .collect::<rusqlite::Result<Vec<_>>>()?
            .into_iter()
            .filter_map(|(signal, judged)| signal.map(|s| (s, judged)))
            .collect())
    }

    /// Why the trainer set a turn aside, if it did.
    pub(crate) fn dropped_reason(&self, turn_id: i64) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT reason FROM dropped_samples WHERE turn_id = ?1",
                [turn_id],
                |r| r.get(0),
            )
            .optional()?)
    }

    pub fn setting(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    pub(crate) fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map_err(|e| explain(e, "saving a setting", &self.path))?;
        Ok(())
    }
}
