//! The journal: a SQLite file in the state dir recording every run, every step of it, and
//! the release revisions (like `helm history`).
//!
//! A step's intent is committed before it starts and its outcome after it ends; with
//! `synchronous = FULL` every commit is on disk when the call returns, so after a crash
//! (kill -9, power loss) the journal says exactly which steps finished, which one was in
//! progress, and what each did (applied revisions, previous deployments, the backup id).
//! One run at a time: `run.lock` in the state dir is held (flock) for the whole run.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;

/// The journal's file name in the state dir.
pub const FILE: &str = "journal.db";

/// The release revisions, like `helm history`: one row per release attempt.
pub const RELEASES_TABLE: &str = "CREATE TABLE IF NOT EXISTS releases (
    revision INTEGER PRIMARY KEY,
    version TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('deployed', 'superseded', 'failed', 'rolled-back')),
    started_at TEXT NOT NULL,
    finished_at TEXT,
    run_id TEXT,
    backup_id TEXT,
    expand TEXT NOT NULL DEFAULT '[]',
    contract TEXT NOT NULL DEFAULT '[]',
    deployments TEXT NOT NULL DEFAULT '{}'
)";

const RUNS_TABLE: &str = "CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    from_version TEXT,
    state TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    no_backup INTEGER NOT NULL,
    backup_id TEXT,
    message TEXT,
    plan TEXT NOT NULL DEFAULT '{}'
)";

const STEPS_TABLE: &str = "CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    title TEXT NOT NULL,
    state TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    detail TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (run_id, seq)
)";

/// A journal failure.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Another run holds the lock.
    #[error(
        "another upshift run is in progress (pid {pid}, started {started_at}); wait for it, or if it died, use `upshift resume` or `upshift abort`"
    )]
    Busy { pid: i64, started_at: String },
    /// A run that did not finish is in the journal.
    #[error(
        "run {id} ({kind} to {target}) did not finish: it stopped at step {step} ({state}); finish it with `upshift resume` or undo it with `upshift abort`"
    )]
    InFlight { id: String, kind: String, target: String, step: i64, state: String },
    /// The file could not be used.
    #[error("the journal {path} cannot be used: {message}")]
    Storage { path: String, message: String },
}

/// A run as the journal records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunRow {
    /// Its id.
    pub id: String,
    /// `upgrade` or `rollback`.
    pub kind: String,
    /// The target version.
    pub target: String,
    /// The version deployed when it started.
    pub from_version: Option<String>,
    /// `running`, `succeeded`, `rolled-back`, `failed`, `stuck`, `aborted`.
    pub state: String,
    /// Its process.
    pub pid: i64,
    /// When it started.
    pub started_at: String,
    /// `--no-backup`.
    pub no_backup: bool,
    /// The backup it took.
    pub backup_id: Option<String>,
    /// Why it ended as it did.
    pub message: Option<String>,
}

/// A step as the journal records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StepRow {
    /// 1-based position in the plan.
    pub seq: i64,
    /// The plan's step kind.
    pub kind: String,
    /// Its title.
    pub title: String,
    /// `started`, `done`, `failed`, `undone`.
    pub state: String,
    /// What it did, as JSON (applied revisions, previous deployments, backup id, output).
    pub detail: serde_json::Value,
}

/// A release revision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReleaseRow {
    /// The revision number.
    pub revision: i64,
    /// The version.
    pub version: String,
    /// `deployed`, `superseded`, `failed`, `rolled-back`.
    pub status: String,
    /// When its run started.
    pub started_at: String,
    /// When its run ended.
    pub finished_at: Option<String>,
    /// The backup taken before it.
    pub backup_id: Option<String>,
    /// Expand revisions it applied.
    pub expand: Vec<String>,
    /// Contract revisions it applied.
    pub contract: Vec<String>,
    /// What ran before it, per component (for a rollback).
    pub deployments: serde_json::Value,
}

/// The journal of one state dir.
pub struct Journal {
    path: PathBuf,
    connection: Connection,
    /// Held while a run is in progress.
    lock: Option<File>,
}

/// UTC now, RFC 3339 with milliseconds.
pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

impl Journal {
    fn storage(&self, e: impl std::fmt::Display) -> JournalError {
        JournalError::Storage { path: self.path.display().to_string(), message: e.to_string() }
    }

    /// Opens (creating) the journal of `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        let path = state_dir.join(FILE);
        let storage = |e: &dyn std::fmt::Display| JournalError::Storage {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(state_dir).map_err(|e| storage(&e))?;
        let connection = Connection::open(&path).map_err(|e| storage(&e))?;
        connection
            .execute_batch(&format!(
                "PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000; {RELEASES_TABLE}; {RUNS_TABLE}; {STEPS_TABLE};"
            ))
            .map_err(|e| storage(&e))?;
        Ok(Journal { path, connection, lock: None })
    }

    /// Opens an existing journal read-only; `None` when there is none yet.
    pub fn open_existing(state_dir: &Path) -> Result<Option<Journal>, JournalError> {
        let path = state_dir.join(FILE);
        if !path.exists() {
            return Ok(None);
        }
        let connection = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_WRITE)
            .map_err(|e| JournalError::Storage { path: path.display().to_string(), message: e.to_string() })?;
        let journal = Journal { path, connection, lock: None };
        journal
            .connection
            .execute_batch(&format!("PRAGMA busy_timeout = 10000; {RELEASES_TABLE}; {RUNS_TABLE}; {STEPS_TABLE};"))
            .map_err(|e| journal.storage(e))?;
        Ok(Some(journal))
    }

    /// Takes the run lock; fails naming the holder when another run has it.
    pub fn lock(&mut self) -> Result<(), JournalError> {
        let lock_path = self.path.with_file_name("run.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| self.storage(e))?;
        if file.try_lock().is_err() {
            let holder = self.running()?.map_or((0, "at an unknown time".to_owned()), |r| (r.pid, r.started_at));
            return Err(JournalError::Busy { pid: holder.0, started_at: holder.1 });
        }
        self.lock = Some(file);
        Ok(())
    }

    /// The run still marked `running` or `stuck`, if any.
    pub fn running(&self) -> Result<Option<RunRow>, JournalError> {
        self.connection
            .query_row(
                "SELECT id, kind, target, from_version, state, pid, started_at, no_backup, backup_id, message \
                 FROM runs WHERE state IN ('running', 'stuck') ORDER BY started_at DESC LIMIT 1",
                [],
                run_row,
            )
            .optional()
            .map_err(|e| self.storage(e))
    }

    /// Refuses to start while a run did not finish.
    pub fn refuse_in_flight(&self) -> Result<(), JournalError> {
        if let Some(run) = self.running()? {
            let (step, state) = self.current_step(&run.id)?.map_or((0, run.state.clone()), |s| (s.seq, s.state));
            return Err(JournalError::InFlight { id: run.id, kind: run.kind, target: run.target, step, state });
        }
        Ok(())
    }

    /// Records a new run (state `running`) with the plan it follows.
    pub fn begin_run(&self, kind: &str, plan: &crate::plan::Plan, no_backup: bool) -> Result<String, JournalError> {
        let id = format!(
            "{}-{}",
            now().chars().filter(char::is_ascii_digit).take(17).collect::<String>(),
            std::process::id()
        );
        self.connection
            .execute(
                "INSERT INTO runs (id, kind, target, from_version, state, pid, started_at, no_backup, plan) \
                 VALUES (?1, ?2, ?3, ?4, 'running', ?5, ?6, ?7, ?8)",
                params![
                    id,
                    kind,
                    plan.to.to_string(),
                    plan.from.as_ref().map(ToString::to_string),
                    i64::from(std::process::id()),
                    now(),
                    no_backup,
                    serde_json::to_string(plan).expect("a plan serializes"),
                ],
            )
            .map_err(|e| self.storage(e))?;
        Ok(id)
    }

    /// The plan a run follows.
    pub fn plan(&self, run: &str) -> Result<crate::plan::Plan, JournalError> {
        let text: String = self
            .connection
            .query_row("SELECT plan FROM runs WHERE id = ?1", [run], |row| row.get(0))
            .map_err(|e| self.storage(e))?;
        serde_json::from_str(&text).map_err(|e| self.storage(e))
    }

    /// Takes over a run after a crash (`resume`/`abort`): this process is now its owner.
    pub fn adopt_run(&self, id: &str) -> Result<(), JournalError> {
        self.connection
            .execute(
                "UPDATE runs SET pid = ?2, state = 'running' WHERE id = ?1",
                params![id, i64::from(std::process::id())],
            )
            .map(drop)
            .map_err(|e| self.storage(e))
    }

    /// Records a step's intent, before it starts.
    pub fn step_started(&self, run: &str, seq: usize, kind: &str, title: &str) -> Result<(), JournalError> {
        self.connection
            .execute(
                "INSERT INTO steps (run_id, seq, kind, title, state, started_at) VALUES (?1, ?2, ?3, ?4, 'started', ?5) \
                 ON CONFLICT (run_id, seq) DO UPDATE SET state = 'started', started_at = excluded.started_at",
                params![run, i64::try_from(seq).unwrap_or(i64::MAX), kind, title, now()],
            )
            .map(drop)
            .map_err(|e| self.storage(e))
    }

    /// Records what a step did so far (its detail), keeping its state.
    pub fn step_detail(&self, run: &str, seq: usize, detail: &serde_json::Value) -> Result<(), JournalError> {
        self.connection
            .execute(
                "UPDATE steps SET detail = ?3 WHERE run_id = ?1 AND seq = ?2",
                params![run, i64::try_from(seq).unwrap_or(i64::MAX), detail.to_string()],
            )
            .map(drop)
            .map_err(|e| self.storage(e))
    }

    /// Records a step's outcome: `done`, `failed` or `undone`.
    pub fn step_finished(&self, run: &str, seq: usize, state: &str) -> Result<(), JournalError> {
        self.connection
            .execute(
                "UPDATE steps SET state = ?3, finished_at = ?4 WHERE run_id = ?1 AND seq = ?2",
                params![run, i64::try_from(seq).unwrap_or(i64::MAX), state, now()],
            )
            .map(drop)
            .map_err(|e| self.storage(e))
    }

    /// The steps of a run, in order.
    pub fn steps(&self, run: &str) -> Result<Vec<StepRow>, JournalError> {
        let read = || -> rusqlite::Result<Vec<StepRow>> {
            let mut statement = self
                .connection
                .prepare("SELECT seq, kind, title, state, detail FROM steps WHERE run_id = ?1 ORDER BY seq")?;
            statement
                .query_map([run], |row| {
                    let detail: String = row.get(4)?;
                    Ok(StepRow {
                        seq: row.get(0)?,
                        kind: row.get(1)?,
                        title: row.get(2)?,
                        state: row.get(3)?,
                        detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
                    })
                })?
                .collect()
        };
        read().map_err(|e| self.storage(e))
    }

    /// Where a run stands: its last step that is not done, else its last step.
    pub fn current_step(&self, run: &str) -> Result<Option<StepRow>, JournalError> {
        let mut steps = self.steps(run)?;
        Ok(match steps.iter().rposition(|s| s.state != "done") {
            Some(index) => Some(steps.swap_remove(index)),
            None => steps.pop(),
        })
    }

    /// Sets the run's backup.
    pub fn set_backup(&self, run: &str, backup_id: &str) -> Result<(), JournalError> {
        self.connection
            .execute("UPDATE runs SET backup_id = ?2 WHERE id = ?1", params![run, backup_id])
            .map(drop)
            .map_err(|e| self.storage(e))
    }

    /// Ends a run.
    pub fn finish_run(&self, run: &str, state: &str, message: Option<&str>) -> Result<(), JournalError> {
        self.connection
            .execute(
                "UPDATE runs SET state = ?2, finished_at = ?3, message = ?4 WHERE id = ?1",
                params![run, state, now(), message],
            )
            .map(drop)
            .map_err(|e| self.storage(e))
    }

    /// The run with this id.
    pub fn run(&self, id: &str) -> Result<Option<RunRow>, JournalError> {
        self.connection
            .query_row(
                "SELECT id, kind, target, from_version, state, pid, started_at, no_backup, backup_id, message FROM runs WHERE id = ?1",
                [id],
                run_row,
            )
            .optional()
            .map_err(|e| self.storage(e))
    }

    /// Records a release attempt's result. A `deployed` one supersedes the previous
    /// deployed release, in the same transaction. Returns its revision.
    pub fn record_release(&mut self, release: &NewRelease<'_>) -> Result<i64, JournalError> {
        let path = self.path.display().to_string();
        let storage = |e: rusqlite::Error| JournalError::Storage { path: path.clone(), message: e.to_string() };
        let tx = self.connection.transaction().map_err(storage)?;
        if release.status == "deployed" {
            tx.execute("UPDATE releases SET status = ?1 WHERE status = 'deployed'", [release.replaced_status])
                .map_err(storage)?;
        }
        tx.execute(
            "INSERT INTO releases (version, status, started_at, finished_at, run_id, backup_id, expand, contract, deployments) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                release.version,
                release.status,
                release.started_at,
                now(),
                release.run_id,
                release.backup_id,
                serde_json::to_string(release.expand).expect("ids serialize"),
                serde_json::to_string(release.contract).expect("ids serialize"),
                release.deployments.to_string(),
            ],
        )
        .map_err(storage)?;
        let revision = tx.last_insert_rowid();
        tx.commit().map_err(storage)?;
        Ok(revision)
    }

    /// Every release revision, oldest first.
    pub fn releases(&self) -> Result<Vec<ReleaseRow>, JournalError> {
        let read = || -> rusqlite::Result<Vec<ReleaseRow>> {
            let mut statement = self.connection.prepare(
                "SELECT revision, version, status, started_at, finished_at, backup_id, expand, contract, deployments FROM releases ORDER BY revision",
            )?;
            statement
                .query_map([], |row| {
                    let ids = |i: usize| -> rusqlite::Result<Vec<String>> {
                        Ok(serde_json::from_str(&row.get::<_, String>(i)?).unwrap_or_default())
                    };
                    Ok(ReleaseRow {
                        revision: row.get(0)?,
                        version: row.get(1)?,
                        status: row.get(2)?,
                        started_at: row.get(3)?,
                        finished_at: row.get(4)?,
                        backup_id: row.get(5)?,
                        expand: ids(6)?,
                        contract: ids(7)?,
                        deployments: serde_json::from_str(&row.get::<_, String>(8)?).unwrap_or(serde_json::Value::Null),
                    })
                })?
                .collect()
        };
        read().map_err(|e| self.storage(e))
    }

    /// The deployed release, if any.
    pub fn deployed(&self) -> Result<Option<ReleaseRow>, JournalError> {
        Ok(self.releases()?.into_iter().rev().find(|r| r.status == "deployed"))
    }
}

/// A release attempt to record.
pub struct NewRelease<'a> {
    /// Its version.
    pub version: &'a str,
    /// `deployed`, `failed` or `rolled-back`.
    pub status: &'a str,
    /// What the previously deployed release becomes when this one is deployed
    /// (`superseded` after an upgrade, `rolled-back` after a rollback).
    pub replaced_status: &'a str,
    /// When its run started.
    pub started_at: &'a str,
    /// The run.
    pub run_id: &'a str,
    /// The backup taken before it.
    pub backup_id: Option<&'a str>,
    /// Expand revisions applied.
    pub expand: &'a [String],
    /// Contract revisions applied.
    pub contract: &'a [String],
    /// What ran before, per component.
    pub deployments: &'a serde_json::Value,
}

fn run_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
    Ok(RunRow {
        id: row.get(0)?,
        kind: row.get(1)?,
        target: row.get(2)?,
        from_version: row.get(3)?,
        state: row.get(4)?,
        pid: row.get(5)?,
        started_at: row.get(6)?,
        no_backup: row.get(7)?,
        backup_id: row.get(8)?,
        message: row.get(9)?,
    })
}

/// The deployed release's version, or `None` when nothing was deployed (no journal yet).
pub fn deployed_version(state_dir: &Path) -> Result<Option<semver::Version>, String> {
    let Some(journal) = Journal::open_existing(state_dir).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    journal
        .deployed()
        .map_err(|e| e.to_string())?
        .map(|r| {
            r.version
                .parse()
                .map_err(|e| format!("the journal records version `{}`, which is not semver: {e}", r.version))
        })
        .transpose()
}
