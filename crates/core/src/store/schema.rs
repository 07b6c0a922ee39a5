//! The schema: forward migrations, applied in order when the store opens; the version is
//! SQLite's `user_version`.

use anyhow::{Result, bail};
use rusqlite::Connection;
use std::path::Path;

use super::{explain, write_transaction};

/// Each entry migrates the schema from version i to i+1; never edit a shipped entry, append.
pub(super) const MIGRATIONS: &[&str] = &[
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

/// The store's schema version, refusing one newer than this build understands.
pub(super) fn schema_version(conn: &Connection, path: &Path) -> Result<i64> {
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

pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
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
