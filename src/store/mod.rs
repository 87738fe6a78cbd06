//! The journal: one SQLite file (`.helix/helix.db`, WAL) that is the source of truth of runs.
//!
//! Each event is applied to the run and task tables and appended to the event log in one
//! transaction, before anyone else sees it; resume is reading these tables back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value as Json;

use crate::events::{now_ms, Event};

const SCHEMA_VERSION: i64 = 2;

/// Migrations from version N to N+1, in order; `MIGRATIONS[0]` turns version 1 into 2.
const MIGRATIONS: &[&str] = &[
    // 2: agent conversations, one row per message, so resume continues an agent mid-task.
    "CREATE TABLE IF NOT EXISTS turns (
        run TEXT NOT NULL,
        task TEXT NOT NULL,
        seq INTEGER NOT NULL,
        message TEXT NOT NULL,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        ts INTEGER NOT NULL,
        PRIMARY KEY (run, task, seq)
    ) WITHOUT ROWID;",
];

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    parent TEXT,
    workflow_path TEXT NOT NULL,
    workflow_name TEXT NOT NULL,
    workflow_hash TEXT NOT NULL,
    inputs TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    pid INTEGER,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    finished_ms INTEGER
);
CREATE TABLE IF NOT EXISTS tasks (
    run TEXT NOT NULL,
    key TEXT NOT NULL,
    status TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    output TEXT,
    error TEXT,
    reason TEXT,
    started_ms INTEGER,
    finished_ms INTEGER,
    duration_ms INTEGER,
    PRIMARY KEY (run, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run TEXT NOT NULL,
    ts INTEGER NOT NULL,
    kind TEXT NOT NULL,
    task TEXT,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_run ON events (run, seq);
CREATE TABLE IF NOT EXISTS logs (
    run TEXT NOT NULL,
    task TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    stream TEXT NOT NULL,
    text TEXT NOT NULL,
    ts INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_by_run ON logs (run, task);
CREATE TABLE IF NOT EXISTS scratch (
    run TEXT NOT NULL,
    task TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (run, task, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS approvals (
    run TEXT NOT NULL,
    task TEXT NOT NULL,
    approved INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    PRIMARY KEY (run, task)
) WITHOUT ROWID;
";

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal `{path}`: {message}")]
    Open { path: PathBuf, message: String },
    #[error("journal `{path}` is not a helix database (it has other tables); set HELIX_HOME to use another directory")]
    Foreign { path: PathBuf },
    #[error("journal `{path}` was written by a newer helix (schema {found}, this build reads {SCHEMA_VERSION})")]
    Newer { path: PathBuf, found: i64 },
    #[error("journal write failed: {0}")]
    Sql(#[from] rusqlite::Error),
}

#[derive(Debug, Clone)]
pub struct RunRecord {
    pub id: String,
    pub parent: Option<String>,
    pub workflow_path: String,
    pub workflow_name: String,
    pub workflow_hash: String,
    pub inputs: Json,
    pub status: String,
    pub error: Option<String>,
    pub pid: Option<i64>,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct TaskRecord {
    pub key: String,
    pub status: String,
    pub attempt: u32,
    pub output: Option<Json>,
    pub error: Option<String>,
    pub reason: Option<String>,
    pub duration_ms: Option<u64>,
}

pub struct NewRun<'a> {
    pub id: &'a str,
    pub parent: Option<&'a str>,
    pub workflow_path: &'a str,
    pub workflow_name: &'a str,
    pub workflow_hash: &'a str,
    pub inputs: &'a Json,
}

pub struct Journal {
    conn: Connection,
    path: PathBuf,
}

/// The helix home: `$HELIX_HOME`, or `.helix` in the current directory.
pub fn home() -> PathBuf {
    match std::env::var_os("HELIX_HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h),
        _ => PathBuf::from(".helix"),
    }
}

impl Journal {
    pub fn open(home: &Path) -> Result<Journal, JournalError> {
        let path = home.join("helix.db");
        let open_err = |message: String| JournalError::Open {
            path: path.clone(),
            message,
        };
        std::fs::create_dir_all(home)
            .map_err(|e| open_err(format!("cannot create {}: {e}", home.display())))?;
        let conn = Connection::open(&path).map_err(|e| open_err(e.to_string()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| open_err(e.to_string()))?;
        // WAL with synchronous=NORMAL: a commit survives a killed process (the OS has it);
        // only a power loss can drop the last transactions.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| open_err(format!("not a usable SQLite database: {e}")))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| open_err(e.to_string()))?;
        // Checkpoints write and sync the database; doing them every ~16 MiB of journal instead
        // of every 4 MiB keeps them off the per-task path of large runs.
        conn.pragma_update(None, "wal_autocheckpoint", 4096)
            .map_err(|e| open_err(e.to_string()))?;
        let journal = Journal { conn, path };
        journal.migrate()?;
        Ok(journal)
    }

    fn migrate(&self) -> Result<(), JournalError> {
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(JournalError::Newer {
                path: self.path.clone(),
                found: version,
            });
        }
        if version == 0 {
            let foreign: i64 = self.conn.query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name NOT IN ('meta','runs','tasks','events','logs','scratch','approvals','turns','sqlite_sequence')",
                [],
                |r| r.get(0),
            )?;
            if foreign > 0 {
                return Err(JournalError::Foreign {
                    path: self.path.clone(),
                });
            }
            self.conn.execute_batch(SCHEMA)?;
            self.conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('app', 'helix')",
                [],
            )?;
            self.conn.pragma_update(None, "user_version", 1)?;
        }
        let version = version.max(1);
        for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize - 1) {
            let tx = self.conn.unchecked_transaction()?;
            tx.execute_batch(step)?;
            tx.pragma_update(None, "user_version", i as i64 + 2)?;
            tx.commit()?;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn create_run(&self, run: &NewRun) -> Result<(), JournalError> {
        let now = now_ms() as i64;
        self.conn.execute(
            "INSERT INTO runs (id, parent, workflow_path, workflow_name, workflow_hash, inputs, status, pid, created_ms, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?8, ?8)",
            params![run.id, run.parent, run.workflow_path, run.workflow_name, run.workflow_hash, run.inputs.to_string(), std::process::id(), now],
        )?;
        Ok(())
    }

    /// Marks a run as executed by this process (resume), and records a changed workflow.
    pub fn claim_run(&self, id: &str, workflow_hash: &str) -> Result<(), JournalError> {
        self.conn.execute(
            "UPDATE runs SET pid = ?2, status = 'running', error = NULL, workflow_hash = ?3, updated_ms = ?4, finished_ms = NULL WHERE id = ?1",
            params![id, std::process::id(), workflow_hash, now_ms() as i64],
        )?;
        Ok(())
    }

    /// Applies an event to the run and task tables and appends it to the log, atomically.
    pub fn record(&mut self, event: &Event) -> Result<(), JournalError> {
        self.record_all(std::slice::from_ref(event))
    }

    /// Applies several events in one transaction (group commit): all or none are durable.
    pub fn record_all(&mut self, events: &[Event]) -> Result<(), JournalError> {
        let tx = self.conn.transaction()?;
        for event in events {
            apply_event(&tx, event)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Marks tasks that were running when the run was interrupted, so resume starts them anew.
    pub fn interrupt_running(&self, run: &str) -> Result<usize, JournalError> {
        Ok(self.conn.execute(
            "UPDATE tasks SET status = 'interrupted' WHERE run = ?1 AND status IN ('running', 'retrying')",
            params![run],
        )?)
    }

    pub fn append_log(
        &self,
        run: &str,
        task: &str,
        attempt: u32,
        stream: &str,
        text: &str,
    ) -> Result<(), JournalError> {
        if text.is_empty() {
            return Ok(());
        }
        self.conn
            .prepare_cached("INSERT INTO logs (run, task, attempt, stream, text, ts) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?
            .execute(params![run, task, attempt, stream, text, now_ms() as i64])?;
        Ok(())
    }

    pub fn logs(
        &self,
        run: &str,
        task: Option<&str>,
    ) -> Result<Vec<(String, u32, String, String)>, JournalError> {
        let mut stmt = self.conn.prepare(
            "SELECT task, attempt, stream, text FROM logs WHERE run = ?1 AND (?2 IS NULL OR task = ?2 OR task LIKE ?2 || '[%') ORDER BY rowid",
        )?;
        let rows = stmt
            .query_map(params![run, task], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Appends one message of an agent's conversation (with the usage of the call that
    /// produced it, for assistant messages).
    pub fn append_turn(
        &self,
        run: &str,
        task: &str,
        seq: u32,
        message: &Json,
        usage: (u64, u64),
    ) -> Result<(), JournalError> {
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO turns (run, task, seq, message, input_tokens, output_tokens, ts)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                run,
                task,
                seq,
                message.to_string(),
                usage.0 as i64,
                usage.1 as i64,
                now_ms() as i64
            ])?;
        Ok(())
    }

    /// An agent's journaled conversation, in order, with each message's usage.
    pub fn turns(&self, run: &str, task: &str) -> Result<Vec<(Json, u64, u64)>, JournalError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT message, input_tokens, output_tokens FROM turns WHERE run = ?1 AND task = ?2 ORDER BY seq",
        )?;
        let rows = stmt
            .query_map(params![run, task], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows
            .into_iter()
            .filter_map(|(m, i, o)| Some((serde_json::from_str(&m).ok()?, i as u64, o as u64)))
            .collect())
    }

    /// Forgets an agent's conversation (a new attempt after a failure starts afresh).
    pub fn clear_turns(&self, run: &str, task: &str) -> Result<(), JournalError> {
        // Set aside rather than deleted: the tokens were spent and still count against the
        // run's budget (`run_usage`), but the next attempt starts a new conversation.
        self.conn.execute(
            "UPDATE turns SET task = task || '~' || ?3 WHERE run = ?1 AND task = ?2",
            params![run, task, now_ms() as i64],
        )?;
        Ok(())
    }

    /// Tokens each agent task of a run used, by task key.
    pub fn task_usage(&self, run: &str) -> Result<HashMap<String, (u64, u64)>, JournalError> {
        let mut stmt = self.conn.prepare(
            "SELECT CASE WHEN instr(task, '~') > 0 THEN substr(task, 1, instr(task, '~') - 1) ELSE task END AS t,
                    sum(input_tokens), sum(output_tokens) FROM turns WHERE run = ?1 GROUP BY t",
        )?;
        let rows = stmt
            .query_map(params![run], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    (r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64),
                ))
            })?
            .collect::<Result<HashMap<_, _>, _>>()?;
        Ok(rows)
    }

    /// Tokens used by a run's agents so far (for budgets and `runs show`).
    pub fn run_usage(&self, run: &str) -> Result<(u64, u64), JournalError> {
        Ok(self.conn.query_row(
            "SELECT coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0) FROM turns WHERE run = ?1",
            params![run],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?)
    }

    pub fn set_approval(&self, run: &str, task: &str, approved: bool) -> Result<(), JournalError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO approvals (run, task, approved, ts) VALUES (?1, ?2, ?3, ?4)",
            params![run, task, approved, now_ms() as i64],
        )?;
        Ok(())
    }

    pub fn approval(&self, run: &str, task: &str) -> Result<Option<bool>, JournalError> {
        Ok(self
            .conn
            .query_row(
                "SELECT approved FROM approvals WHERE run = ?1 AND task = ?2",
                params![run, task],
                |r| r.get(0),
            )
            .optional()?)
    }

    pub fn scratch_set(
        &self,
        run: &str,
        task: &str,
        key: &str,
        value: &Json,
    ) -> Result<(), JournalError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO scratch (run, task, key, value) VALUES (?1, ?2, ?3, ?4)",
            params![run, task, key, value.to_string()],
        )?;
        Ok(())
    }

    pub fn scratch_get(
        &self,
        run: &str,
        task: &str,
        key: &str,
    ) -> Result<Option<Json>, JournalError> {
        let text: Option<String> = self
            .conn
            .query_row(
                "SELECT value FROM scratch WHERE run = ?1 AND task = ?2 AND key = ?3",
                params![run, task, key],
                |r| r.get(0),
            )
            .optional()?;
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }

    pub fn run(&self, id: &str) -> Result<Option<RunRecord>, JournalError> {
        Ok(self
            .conn
            .query_row(
                &format!("{RUN_COLUMNS} WHERE id = ?1"),
                params![id],
                run_from_row,
            )
            .optional()?)
    }

    /// Finds a run by id or unique id prefix; `latest` / `last` name the newest top-level run.
    pub fn find_run(&self, id: &str) -> Result<Option<RunRecord>, JournalError> {
        if id == "latest" || id == "last" {
            return Ok(self
                .conn
                .query_row(&format!("{RUN_COLUMNS} WHERE parent IS NULL ORDER BY created_ms DESC, id DESC LIMIT 1"), [], run_from_row)
                .optional()?);
        }
        if let Some(r) = self.run(id)? {
            return Ok(Some(r));
        }
        let mut stmt = self
            .conn
            .prepare(&format!("{RUN_COLUMNS} WHERE id LIKE ?1 || '%' LIMIT 2"))?;
        let rows = stmt
            .query_map(params![id], run_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(if rows.len() == 1 {
            rows.into_iter().next()
        } else {
            None
        })
    }

    pub fn runs(&self, limit: usize) -> Result<Vec<RunRecord>, JournalError> {
        let mut stmt = self.conn.prepare(&format!(
            "{RUN_COLUMNS} WHERE parent IS NULL ORDER BY created_ms DESC, id DESC LIMIT ?1"
        ))?;
        let rows = stmt
            .query_map(params![limit as i64], run_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    pub fn tasks(&self, run: &str) -> Result<Vec<TaskRecord>, JournalError> {
        let mut stmt = self.conn.prepare(
            "SELECT key, status, attempt, output, error, reason, duration_ms FROM tasks WHERE run = ?1 ORDER BY coalesce(started_ms, finished_ms), key",
        )?;
        let rows = stmt
            .query_map(params![run], |r| {
                let output: Option<String> = r.get(3)?;
                Ok(TaskRecord {
                    key: r.get(0)?,
                    status: r.get(1)?,
                    attempt: r.get(2)?,
                    output: output.and_then(|o| serde_json::from_str(&o).ok()),
                    error: r.get(4)?,
                    reason: r.get(5)?,
                    duration_ms: r.get::<_, Option<i64>>(6)?.map(|d| d as u64),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    pub fn events(&self, run: &str) -> Result<Vec<Json>, JournalError> {
        let mut stmt = self
            .conn
            .prepare("SELECT data FROM events WHERE run = ?1 ORDER BY seq")?;
        let rows = stmt
            .query_map(params![run], |r| r.get::<_, String>(0))?
            .filter_map(|r| r.ok())
            .filter_map(|t| serde_json::from_str(&t).ok())
            .collect();
        Ok(rows)
    }

    /// Deletes finished runs beyond the newest `keep`, or older than `keep_days`, with
    /// their sub-workflow runs. Active runs are never pruned.
    pub fn prune(
        &mut self,
        keep: Option<usize>,
        keep_days: Option<u32>,
        workflow_name: Option<&str>,
    ) -> Result<usize, JournalError> {
        let mut doomed: Vec<String> = Vec::new();
        {
            let mut stmt = self.conn.prepare(
                "SELECT id, created_ms FROM runs WHERE parent IS NULL AND (?1 IS NULL OR workflow_name = ?1)
                 AND status IN ('succeeded', 'failed', 'interrupted', 'cancelled')
                 ORDER BY created_ms DESC, id DESC",
            )?;
            let rows: Vec<(String, i64)> = stmt
                .query_map(params![workflow_name], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            let cutoff = keep_days.map(|d| now_ms() as i64 - i64::from(d) * 86_400_000);
            for (i, (id, created)) in rows.into_iter().enumerate() {
                let over_count = keep.is_some_and(|k| i >= k);
                let too_old = cutoff.is_some_and(|c| created < c);
                if over_count || too_old {
                    doomed.push(id);
                }
            }
        }
        let tx = self.conn.transaction()?;
        for id in &doomed {
            for table in ["events", "logs", "tasks", "scratch", "approvals", "turns"] {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE run = ?1 OR run LIKE ?1 || '.%'"),
                    params![id],
                )?;
            }
            tx.execute(
                "DELETE FROM runs WHERE id = ?1 OR id LIKE ?1 || '.%'",
                params![id],
            )?;
        }
        tx.commit()?;
        Ok(doomed.len())
    }
}

/// Applies one event to the run and task tables and appends it to the event log.
fn apply_event(tx: &rusqlite::Transaction, event: &Event) -> Result<(), JournalError> {
    let data = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
    match event {
        Event::RunStarted { run, ts, .. } => {
            tx.prepare_cached(
                "UPDATE runs SET status = 'running', pid = ?2, updated_ms = ?3 WHERE id = ?1",
            )?
            .execute(params![run, std::process::id(), *ts as i64])?;
        }
        Event::TaskStarted {
            run,
            ts,
            task,
            attempt,
            ..
        } => {
            tx.prepare_cached(
                "INSERT INTO tasks (run, key, status, attempt, started_ms) VALUES (?1, ?2, 'running', ?3, ?4)
                 ON CONFLICT (run, key) DO UPDATE SET status = 'running', attempt = ?3, started_ms = ?4, error = NULL, reason = NULL",
            )?
            .execute(params![run, task, attempt, *ts as i64])?;
        }
        Event::TaskRetrying {
            run,
            task,
            attempt,
            error,
            ..
        } => {
            tx.prepare_cached("UPDATE tasks SET status = 'retrying', attempt = ?3, error = ?4 WHERE run = ?1 AND key = ?2")?
                .execute(params![run, task, attempt, error])?;
        }
        Event::ApprovalRequested { run, task, ts, .. } => {
            tx.prepare_cached(
                "INSERT INTO tasks (run, key, status, attempt, started_ms) VALUES (?1, ?2, 'awaiting_approval', 1, ?3)
                 ON CONFLICT (run, key) DO UPDATE SET status = 'awaiting_approval'",
            )?
            .execute(params![run, task, *ts as i64])?;
        }
        Event::TaskFinished {
            run,
            ts,
            task,
            status,
            attempt,
            duration_ms,
            output,
            error,
            reason,
            ..
        } => {
            let output = output.as_ref().map(|o| o.to_string());
            tx.prepare_cached(
                "INSERT INTO tasks (run, key, status, attempt, output, error, reason, finished_ms, duration_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (run, key) DO UPDATE SET status = ?3, attempt = ?4, output = ?5, error = ?6, reason = ?7, finished_ms = ?8, duration_ms = ?9",
            )?
            .execute(params![run, task, status, attempt, output, error, reason, *ts as i64, *duration_ms as i64])?;
        }
        Event::RunFinished {
            run,
            ts,
            status,
            error,
            ..
        } => {
            tx.prepare_cached("UPDATE runs SET status = ?2, error = ?3, updated_ms = ?4, finished_ms = ?4 WHERE id = ?1")?
                .execute(params![run, status, error, *ts as i64])?;
        }
        Event::TaskExpanded { .. } => {}
    }
    let (run, ts) = event_run_ts(event);
    tx.prepare_cached(
        "INSERT INTO events (run, ts, kind, task, data) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![run, ts as i64, event.kind(), event.task(), data])?;
    Ok(())
}

const RUN_COLUMNS: &str = "SELECT id, parent, workflow_path, workflow_name, workflow_hash, inputs, status, error, pid, created_ms, finished_ms FROM runs";

fn run_from_row(r: &rusqlite::Row) -> rusqlite::Result<RunRecord> {
    let inputs: String = r.get(5)?;
    Ok(RunRecord {
        id: r.get(0)?,
        parent: r.get(1)?,
        workflow_path: r.get(2)?,
        workflow_name: r.get(3)?,
        workflow_hash: r.get(4)?,
        inputs: serde_json::from_str(&inputs).unwrap_or(Json::Null),
        status: r.get(6)?,
        error: r.get(7)?,
        pid: r.get(8)?,
        created_ms: r.get::<_, i64>(9)? as u64,
        finished_ms: r.get::<_, Option<i64>>(10)?.map(|v| v as u64),
    })
}

fn event_run_ts(event: &Event) -> (&str, u64) {
    match event {
        Event::RunStarted { run, ts, .. }
        | Event::TaskStarted { run, ts, .. }
        | Event::TaskRetrying { run, ts, .. }
        | Event::TaskExpanded { run, ts, .. }
        | Event::ApprovalRequested { run, ts, .. }
        | Event::TaskFinished { run, ts, .. }
        | Event::RunFinished { run, ts, .. } => (run, *ts),
    }
}

/// Whether a process with this pid is alive (used to refuse resuming an active run).
pub fn pid_alive(pid: i64) -> bool {
    if pid <= 0 || pid > i64::from(i32::MAX) {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence and permission; it sends nothing.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_foreign_database_is_refused_not_changed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conn = Connection::open(dir.path().join("helix.db")).expect("open");
        conn.execute_batch("CREATE TABLE accounts (id INTEGER); INSERT INTO accounts VALUES (7);")
            .expect("seed");
        drop(conn);
        let err = Journal::open(dir.path()).err().expect("refused");
        assert!(err.to_string().contains("not a helix database"), "{err}");
        let conn = Connection::open(dir.path().join("helix.db")).expect("reopen");
        let n: i64 = conn
            .query_row("SELECT count(*) FROM accounts", [], |r| r.get(0))
            .expect("still there");
        assert_eq!(n, 1);
    }

    #[test]
    fn events_update_tasks_and_are_logged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = Journal::open(dir.path()).expect("open");
        let inputs = serde_json::json!({});
        j.create_run(&NewRun {
            id: "r1",
            parent: None,
            workflow_path: "w.yaml",
            workflow_name: "w",
            workflow_hash: "h",
            inputs: &inputs,
        })
        .expect("run");
        j.record(&Event::TaskStarted {
            run: "r1".into(),
            ts: 1,
            task: "a".into(),
            kind: "script".into(),
            attempt: 1,
        })
        .expect("start");
        j.record(&Event::TaskFinished {
            run: "r1".into(),
            ts: 2,
            task: "a".into(),
            status: "succeeded".into(),
            attempt: 1,
            duration_ms: 1,
            output: Some(serde_json::json!({"n": 1})),
            error: None,
            reason: None,
            usage: None,
        })
        .expect("finish");
        let tasks = j.tasks("r1").expect("tasks");
        assert_eq!(tasks[0].status, "succeeded");
        assert_eq!(tasks[0].output, Some(serde_json::json!({"n": 1})));
        assert_eq!(j.events("r1").expect("events").len(), 2);
    }
}
