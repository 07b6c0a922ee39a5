//! The durable store: one SQLite file (WAL mode, `synchronous=FULL`, so an acknowledged turn
//! survives a crash), a versioned schema with forward migrations, and typed accessors.
//! Readers (`clawrl-tui export`) open the same file while the server writes to it.

use anyhow::{Context, Result, bail};
use clawrl_model::messages::{Message, ToolCall};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

mod records;
mod samples;
mod versions;
mod view;

/// The setting that keeps "training paused" across restarts.
pub const PAUSED_SETTING: &str = "training_paused";

pub use records::{HintCandidate, HintChoice, HintSource, TurnType, VersionState, reward};
pub use samples::SampleRow;
pub use versions::{LiveChange, TrainedSample, UpdateMetrics, VersionRow};
pub use view::{JudgmentSummary, SessionSummary, Snapshot, TurnSummary};

/// Each entry migrates the schema from version i to i+1; never edit a shipped entry, append.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE sessions (
    id             TEXT PRIMARY KEY,
    source         TEXT NOT NULL,      -- header | body | prefix (how the session was identified)
    created_at     INTEGER NOT NULL,   -- unix milliseconds
    last_active_at INTEGER NOT NULL,
    closed_at      INTEGER,
    close_reason   TEXT
);
CREATE TABLE turns (
    id               INTEGER PRIMARY KEY,
    session_id       TEXT NOT NULL REFERENCES sessions(id),
    turn_index       INTEGER NOT NULL,
    turn_type        TEXT NOT NULL,    -- main | side
    response_id      TEXT NOT NULL UNIQUE,
    request_messages TEXT NOT NULL,    -- JSON: the messages as the client sent them
    tools            TEXT,             -- JSON
    prompt_ids       TEXT NOT NULL,    -- JSON array: the exact ids the model saw
    response_ids     TEXT NOT NULL,    -- JSON array: the exact ids it sampled
    logprobs         TEXT NOT NULL,    -- JSON array: untempered log-prob of each sampled id
    response_text    TEXT NOT NULL,
    tool_calls       TEXT,             -- JSON (OpenAI shape) when the reply called tools
    finish_reason    TEXT NOT NULL,
    adapter_version  INTEGER NOT NULL, -- 0 = the base model
    sampling         TEXT NOT NULL,    -- JSON: temperature, top_p, top_k, seed, max_tokens
    cached_tokens    INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    completed_at     INTEGER NOT NULL,
    next_state       TEXT,             -- JSON array of the messages that answered this turn
    next_state_role  TEXT,             -- user | tool
    next_state_at    INTEGER,
    UNIQUE (session_id, turn_index)
);
CREATE INDEX turns_created_at ON turns (created_at);
"#,
    r#"
-- Set when the turn's session closed before a next state arrived: no evaluative signal.
ALTER TABLE turns ADD COLUMN no_signal_at INTEGER;
-- The assistant message exactly as the client received it (session matching after a restart).
ALTER TABLE turns ADD COLUMN reply_message TEXT;
-- One row per judged turn, written with its votes in one transaction (judged exactly once).
CREATE TABLE judgments (
    turn_id       INTEGER PRIMARY KEY REFERENCES turns(id),
    backend       TEXT NOT NULL,       -- local | openai
    mode          TEXT NOT NULL,       -- direct | reason
    judge_model   TEXT NOT NULL,
    score         INTEGER NOT NULL,    -- majority of the valid votes: -1 | 0 | 1
    hint          TEXT,                -- the longest usable hint, if any
    error         TEXT,                -- why the turn could not be judged (score 0, no votes)
    elapsed_ms    INTEGER NOT NULL,
    judged_at     INTEGER NOT NULL
);
CREATE TABLE votes (
    turn_id  INTEGER NOT NULL REFERENCES judgments(turn_id),
    kind     TEXT NOT NULL,            -- score | hint
    idx      INTEGER NOT NULL,
    raw      TEXT NOT NULL,            -- the judge's text
    score    INTEGER,                  -- NULL: invalid vote
    hint     TEXT,
    probs    TEXT,                     -- JSON {"1": p, "0": p, "-1": p} (direct mode)
    PRIMARY KEY (turn_id, kind, idx)
);
-- Human ratings; they override the judge's score and never replace it. The latest counts.
CREATE TABLE feedback (
    id         INTEGER PRIMARY KEY,
    turn_id    INTEGER NOT NULL REFERENCES turns(id),
    rating     INTEGER NOT NULL,       -- 1 (up) | -1 (down)
    comment    TEXT,
    source     TEXT NOT NULL,          -- api | tui
    created_at INTEGER NOT NULL
);
CREATE INDEX feedback_turn ON feedback (turn_id);
"#,
    r#"
-- Adapter versions trained here (v0, the base model, has no row). Never deleted.
CREATE TABLE versions (
    id             INTEGER PRIMARY KEY,
    parent         INTEGER NOT NULL,      -- the version it was trained from (0 = base)
    created_at     INTEGER NOT NULL,
    state          TEXT NOT NULL,         -- candidate | live | vetoed | retired
    samples        INTEGER NOT NULL,
    tokens         INTEGER NOT NULL,
    loss           REAL NOT NULL,
    drift          REAL NOT NULL,         -- KL(behaviour ‖ updated policy) on the trained tokens
    grad_norm      REAL NOT NULL,
    mean_reward    REAL,                  -- over the samples that had a reward
    hints          INTEGER NOT NULL,      -- samples with a distillation (OPD) signal
    train_secs     REAL NOT NULL,
    kl_base        REAL,                  -- guard: mean per-token KL from the base on the probes
    kl_live        REAL,                  -- guard: the same from the parent version
    approved_delta REAL,                  -- guard: change of approved answers' mean log-prob
    guard_passed   INTEGER NOT NULL,
    guard_report   TEXT NOT NULL,         -- JSON: values, limits, reasons
    path           TEXT NOT NULL,         -- the PEFT folder
    sha256         TEXT NOT NULL,         -- of adapter_model.safetensors
    lora           TEXT NOT NULL,         -- JSON: rank, alpha, targets
    decided_at     INTEGER,
    decided_by     TEXT,                  -- auto | api | tui | restart
    error          TEXT                   -- why its adapter could not be served
);
-- The turns each version was trained on.
CREATE TABLE version_samples (
    version_id INTEGER NOT NULL REFERENCES versions(id),
    turn_id    INTEGER NOT NULL REFERENCES turns(id),
    reward     REAL,
    hint       INTEGER NOT NULL,
    PRIMARY KEY (version_id, turn_id)
);
CREATE INDEX version_samples_turn ON version_samples (turn_id);
-- Turns the trainer set aside without training on them (e.g. too stale).
CREATE TABLE dropped_samples (
    turn_id INTEGER PRIMARY KEY REFERENCES turns(id),
    reason  TEXT NOT NULL,
    at      INTEGER NOT NULL
);
-- Every change of the live version, in order; the last row is live (no row: v0).
CREATE TABLE live_history (
    id         INTEGER PRIMARY KEY,
    version_id INTEGER NOT NULL,
    at         INTEGER NOT NULL,
    reason     TEXT NOT NULL              -- auto | approve | rollback | fallback
);
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"#,
    r#"
-- The learning rate the version's optimizer step used (warmup and signal sizing applied);
-- NULL for versions trained before it was recorded.
ALTER TABLE versions ADD COLUMN learning_rate REAL;
"#,
    r#"
-- What a sample distilled from: every hint candidate (the judge's, the user's next message)
-- with its top-K overlap, the chosen one and the rule (JSON, store::HintChoice).
ALTER TABLE version_samples ADD COLUMN hint_choice TEXT;
"#,
];

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

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

pub struct Store {
    conn: Connection,
    pub path: PathBuf,
}

fn explain(e: rusqlite::Error, what: &str, path: &Path) -> anyhow::Error {
    let full = matches!(&e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull);
    if full {
        anyhow::anyhow!("{what}: the disk holding {} is full", path.display())
    } else {
        anyhow::anyhow!("{what} in {}: {e}", path.display())
    }
}

impl Store {
    /// Opens (creating and migrating) the store for writing.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut conn = Connection::open(path)
            .with_context(|| format!("cannot open the store {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| explain(e, "enabling WAL", path))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn, path)?;
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// Opens an existing store read-only (safe while a server writes to it). A store written
    /// by an older clawrl-tui is migrated first (the migrations only add tables and columns).
    pub fn open_read_only(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!(
                "no store at {} (nothing has been captured yet, or set --store)",
                path.display()
            );
        }
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("cannot open the store {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        if (schema_version(&conn, path)? as usize) < MIGRATIONS.len() {
            drop(conn);
            return Self::open(path);
        }
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

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
    pub fn pending_judgments(&self, limit: usize) -> Result<Vec<PendingTurn>> {
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
    pub fn count_pending_judgments(&self) -> Result<usize> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM turns t LEFT JOIN judgments j ON j.turn_id = t.id
             WHERE j.turn_id IS NULL AND t.turn_type = 'main' AND t.next_state IS NOT NULL",
            [],
            |r| r.get::<_, i64>(0),
        )? as usize)
    }

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

    fn votes_of(&self, turn_id: i64) -> Result<Vec<Value>> {
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

    /// The highest turn index used in a session (to continue numbering after a restart).
    pub fn last_turn_index(&self, session_id: &str) -> Result<Option<i64>> {
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

/// The store's schema version, refusing one newer than this build understands.
fn schema_version(conn: &Connection, path: &Path) -> Result<i64> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version as usize > MIGRATIONS.len() {
        bail!(
            "the store {} has schema version {version}, newer than this clawrl-tui understands ({})",
            path.display(),
            MIGRATIONS.len()
        );
    }
    Ok(version)
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let version = schema_version(conn, path)?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = write_transaction(conn)?;
        tx.execute_batch(sql).map_err(|e| {
            explain(
                e,
                &format!("migrating the schema to version {}", i + 1),
                path,
            )
        })?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
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

/// A transaction that takes the write lock at its start. A deferred one that reads first and
/// then writes fails at once with "database is locked" if another connection (capture, judge,
/// trainer and gate each have one) wrote in between: in WAL mode the busy timeout does not
/// apply to that upgrade. Seen as a 500 on a rollback while the judge was writing.
fn write_transaction(conn: &mut Connection) -> rusqlite::Result<rusqlite::Transaction<'_>> {
    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
}

fn parse_json(s: Option<String>) -> Value {
    s.and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .unwrap_or(Value::Null)
}

/// A stored JSON column read as `T`; absent or unreadable (a row written by hand) reads as
/// `T::default()`, so one bad row cannot stop the judge or a resume.
fn parse_or_default<T: serde::de::DeserializeOwned + Default>(s: Option<String>) -> T {
    s.and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

fn json_text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn turn(session: &str, index: i64) -> NewTurn {
        NewTurn {
            session_id: session.into(),
            turn_index: index,
            turn_type: TurnType::Main,
            response_id: format!("r-{session}-{index}"),
            request_messages: vec![Message::user("hi")],
            tools: None,
            prompt_ids: vec![1, 2, 3],
            response_ids: vec![4, 5],
            logprobs: vec![-0.5, -0.25],
            response_text: "ok".into(),
            tool_calls: Vec::new(),
            reply_message: Message::assistant("ok"),
            finish_reason: "stop".into(),
            adapter_version: 0,
            sampling: json!({"temperature": 0.0}),
            cached_tokens: 0,
            created_at: 1_000,
            completed_at: 2_000,
        }
    }

    #[test]
    fn migrates_records_and_refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        store.ensure_session("a", "header", 1_000).unwrap();
        let id = store.insert_turn(&turn("a", 0)).unwrap();
        assert!(
            store.insert_turn(&turn("a", 0)).is_err(),
            "a turn index is used once per session"
        );
        assert!(
            store
                .attach_next_state(id, &[Message::user("next")], "user", 3_000)
                .unwrap()
        );
        assert!(
            !store.attach_next_state(id, &[], "user", 4_000).unwrap(),
            "a next state is never overwritten"
        );
        assert_eq!(store.last_turn_index("a").unwrap(), Some(0));
        drop(store);

        // Reopening is idempotent; a read-only reader sees the data.
        let reader = Store::open_read_only(&path).unwrap();
        let mut rows = Vec::new();
        assert_eq!(
            reader
                .export(0, |r| {
                    let _: () = rows.push(r);
                    Ok(())
                })
                .unwrap(),
            1
        );
        assert_eq!(rows[0]["next_state"][0]["content"], "next");
        assert_eq!(rows[0]["logprobs"], json!([-0.5, -0.25]));
        assert_eq!(
            reader.export(5_000, |_| Ok(())).unwrap(),
            0,
            "--since filters"
        );
        drop(reader);

        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = Store::open(&path).err().unwrap().to_string();
        assert!(err.contains("schema version 99"), "{err}");
    }

    #[test]
    fn open_sessions_carry_what_resuming_them_needs() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("s.sqlite")).unwrap();
        store.ensure_session("a", "header", 1_000).unwrap();
        store.insert_turn(&turn("a", 0)).unwrap();
        let mut side = turn("a", 1);
        side.turn_type = TurnType::Side;
        side.response_id = "side".into();
        store.insert_turn(&side).unwrap();
        store.ensure_session("b", "prefix", 1_000).unwrap();
        let open = store.open_sessions().unwrap();
        let a = open.iter().find(|s| s.id == "a").unwrap();
        assert_eq!(a.next_turn_index, 2, "side turns count in the numbering");
        let last = a.last_main.as_ref().unwrap();
        assert_eq!(
            last.reply_message.text(),
            "ok",
            "the main turn, not the side one"
        );
        assert!(last.awaiting_next_state);
        assert_eq!(last.request_messages[0].text(), "hi");
        let b = open.iter().find(|s| s.id == "b").unwrap();
        assert!(b.last_main.is_none() && b.next_turn_index == 0);

        assert_eq!(
            store.close_session("a", "idle", 5_000).unwrap(),
            1,
            "one turn left without signal"
        );
        assert!(store.open_sessions().unwrap().iter().all(|s| s.id != "a"));
    }

    #[test]
    fn a_store_from_an_older_version_is_migrated_and_exported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO sessions (id, source, created_at, last_active_at) VALUES ('s', 'header', 1, 1)",
                [],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO turns (session_id, turn_index, turn_type, response_id, request_messages, prompt_ids,
                    response_ids, logprobs, response_text, finish_reason, adapter_version, sampling, cached_tokens,
                    created_at, completed_at) VALUES ('s', 0, 'main', 'r', '[]', '[1]', '[2]', '[-1.0]', 'x', 'stop', 0, '{}', 0, 1, 2)",
                [],
            )
            .unwrap();
        }
        let reader = Store::open_read_only(&path).unwrap();
        assert_eq!(reader.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let mut rows = Vec::new();
        reader
            .export(0, |r| {
                let _: () = rows.push(r);
                Ok(())
            })
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["judge_status"], "awaiting_next_state");
        assert!(rows[0]["judgment"].is_null() && rows[0]["reward"].is_null());
        let open = reader.open_sessions().unwrap();
        assert_eq!(
            open[0].last_main.as_ref().unwrap().reply_message.text(),
            "x"
        );
    }

    #[test]
    fn since_accepts_dates_times_and_durations() {
        assert_eq!(parse_since("1970-01-02").unwrap(), 86_400_000);
        assert_eq!(parse_since("1970-01-01T00:00:01Z").unwrap(), 1_000);
        let two_hours_ago = parse_since("2h").unwrap();
        assert!((now_ms() - two_hours_ago - 7_200_000).abs() < 5_000);
        assert!(
            parse_since("yesterday-ish")
                .unwrap_err()
                .to_string()
                .contains("--since")
        );
    }
}
