//! The durable store: one SQLite file (WAL mode, `synchronous=FULL`, so an acknowledged turn
//! survives a crash), a versioned schema with forward migrations, and typed accessors.
//! Readers (`clawrl-tui export`) open the same file while the server writes to it.

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;
use std::path::{Path, PathBuf};

mod export;
mod judgments;
mod records;
mod samples;
mod schema;
mod turns;
mod versions;
mod view;

use schema::{MIGRATIONS, migrate, schema_version};

/// The setting that keeps "training paused" across restarts.
pub const PAUSED_SETTING: &str = "training_paused";

pub use export::{parse_since, rfc3339};
pub use judgments::{FeedbackError, FeedbackRecorded, Judgment, TurnRef, Vote};
pub use records::{HintCandidate, HintChoice, HintSource, TurnType, VersionState, reward};
pub use samples::SampleRow;
pub use turns::{LastMainTurn, NewTurn, OpenSession, PendingTurn};
pub use versions::{LiveChange, TrainedSample, UpdateMetrics, VersionRow};
pub use view::{JudgmentSummary, SessionSummary, Snapshot, TurnSummary};

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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

    #[cfg(test)]
    fn schema_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }
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
    use clawrl_model::messages::Message;
    use serde_json::json;

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
