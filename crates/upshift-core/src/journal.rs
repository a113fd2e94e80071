//! The journal: a SQLite file in the state dir recording every run, every step of it, every
//! undo action, and the release revisions (like `helm history`).
//!
//! Everything in it is typed: run, step, action and release states are Rust enums stored as
//! text under CHECK constraints, and the JSON columns are serde types that must parse. A
//! journal that cannot be read is an error naming the file and what to do, never "nothing
//! deployed". The schema has a version (`PRAGMA user_version`) and upgrades itself.
//!
//! A step's intent is committed before it starts and its outcome after it ends; with
//! `synchronous = FULL` every commit is on disk when the call returns, so after a crash
//! (kill -9, power loss) the journal says exactly which steps finished, which one was in
//! progress, and what each set out to do. One run at a time: `run.lock` in the state dir is
//! held (flock) for the whole run.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};

use crate::driver::Deployed;
use crate::plan::{Plan, StepKind, UndoDepth};

/// The journal's file name in the state dir.
pub const FILE: &str = "journal.db";

/// The schema this build writes. 0 was the untyped journal of upshift before the saga
/// redesign; it is upgraded in place.
pub const SCHEMA_VERSION: i64 = 2;

/// Stores an enum as text: `as_str`, parsing, SQL conversions, and its values for the
/// column's CHECK constraint.
macro_rules! text_codes {
    ($name:ident { $($variant:ident = $text:literal,)* }) => {
        impl $name {
            /// Its name in the journal and in output.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)* }
            }

            fn parse(text: &str) -> Option<$name> {
                match text { $($text => Some($name::$variant),)* _ => None }
            }

            /// Every value, for the column's CHECK constraint.
            const VALUES: &'static [&'static str] = &[$($text),*];
        }

        impl rusqlite::types::ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }

        impl rusqlite::types::FromSql for $name {
            fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
                let text = value.as_str()?;
                $name::parse(text).ok_or_else(|| {
                    rusqlite::types::FromSqlError::Other(format!("`{text}` is not a {}", stringify!($name)).into())
                })
            }
        }
    };
}

/// Defines a state enum stored as text (see [`text_codes`]).
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant,)*
        }

        text_codes!($name { $($variant = $text,)* });
    };
}

// The plan's own enums, stored under the names their serde forms use.
text_codes!(StepKind {
    Preflight = "preflight",
    Backup = "backup",
    Expand = "expand",
    Deploy = "deploy",
    Verify = "verify",
    Contract = "contract",
    Record = "record",
    Hook = "hook",
    Stop = "stop",
});

text_codes!(UndoDepth {
    Nothing = "nothing",
    Code = "code",
    CodeAndDown = "code-and-down",
    Restore = "restore",
    Impossible = "impossible",
});

/// `('a', 'b', ...)`: the values of a CHECK constraint.
fn check_list(values: &[&str]) -> String {
    let quoted: Vec<String> = values.iter().map(|v| format!("'{v}'")).collect();
    format!("({})", quoted.join(", "))
}

text_enum! {
    /// What a run does.
    RunKind {
        /// Moves to a newer release through the plan's steps.
        Upgrade = "upgrade",
        /// Returns to an earlier release by undoing the releases after it.
        Rollback = "rollback",
    }
}

text_enum! {
    /// Where a run stands. See ARCHITECTURE.md for the diagram.
    RunState {
        /// Running its steps forward.
        Running = "running",
        /// Running its undo actions; never goes forward again.
        Undoing = "undoing",
        /// Done: the target is deployed.
        Succeeded = "succeeded",
        /// A step failed and the undo finished.
        RolledBack = "rolled-back",
        /// `upshift abort` undid it.
        Aborted = "aborted",
        /// The undo failed: waits for `upshift resume` or `upshift abort`, which retry it.
        Stuck = "stuck",
    }
}

text_enum! {
    /// Where a step stands.
    StepState {
        /// Its intent is recorded; it may have run partly.
        Started = "started",
        /// It finished.
        Done = "done",
        /// It failed.
        Failed = "failed",
    }
}

text_enum! {
    /// Where an undo action stands.
    ActionState {
        /// Not started.
        Pending = "pending",
        /// Started; it may have run partly (every action is safe to run again).
        Started = "started",
        /// Finished.
        Done = "done",
    }
}

text_enum! {
    /// A release revision's status, as `helm history` shows it.
    ReleaseStatus {
        /// What runs now.
        Deployed = "deployed",
        /// Replaced by a newer release.
        Superseded = "superseded",
        /// Its upgrade failed and was undone.
        Failed = "failed",
        /// Replaced by a rollback.
        RolledBack = "rolled-back",
    }
}

/// What a deploy step replaced: recorded before the driver changes anything.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replaced {
    /// What ran before (none on a first deploy).
    pub previous: Option<Deployed>,
    /// The component being deployed, as the manifest had it: what the undo removes.
    pub component: crate::manifest::Component,
}

/// A smoke command's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmokeResult {
    /// The command, redacted.
    pub command: String,
    /// Whether it passed.
    pub ok: bool,
    /// Its output, redacted.
    pub output: String,
}

/// What a step set out to do and what it did, written as it happens.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StepDetail {
    /// Backup: the id of the backup taken.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// Expand, contract: the revisions it is about to apply (its intent, recorded first).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub intends: Vec<String>,
    /// Expand, contract: the revisions applied so far, as they committed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<String>,
    /// Expand, contract: a `no-transaction` revision that failed after some of its
    /// statements ran: applied in part, recorded nowhere in the database.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partial: Option<String>,
    /// Deploy: what it replaces, recorded before the driver is called.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaced: Option<Replaced>,
    /// Verify: the smoke commands' results.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub smoke: Vec<SmokeResult>,
    /// Expand, contract with an external migrator: the commands it ran and their output;
    /// hook: the end of its output (redacted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output: Vec<String>,
    /// Verify: when its watch ends (RFC 3339), once the watch began.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watch_until: Option<String>,
}

/// One undo action: data, so that a crash mid-undo is finished by running the actions not
/// yet done. Each is safe to run again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "action", deny_unknown_fields)]
// A run has a handful of these, read from the journal: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum UndoAction {
    /// Put `previous` back in place of what runs for `component` (stop it when `None`).
    PutBack {
        /// The component as the run deployed it.
        component: crate::manifest::Component,
        /// What runs afterwards.
        previous: Option<Deployed>,
    },
    /// Revert (`down`) these revisions, newest first, where they are still applied.
    Revert {
        /// Their ids.
        revisions: Vec<String>,
    },
    /// Restore the backup with this id (database and saved paths).
    Restore {
        /// Its id.
        backup: String,
    },
    /// Run a hook's command: the `undo` of a hook that ran, or an `on-failure` /
    /// `on-rollback` hook. Placeholders are filled; `${VAR}` are expanded when it runs.
    Hook {
        /// The hook's name.
        name: String,
        /// The command.
        run: Vec<String>,
        /// Its environment, `${VAR}` unexpanded.
        env: BTreeMap<String, String>,
        /// Time it may take.
        timeout: std::time::Duration,
        /// A failure stops the undo (an `undo` command); else it is only reported.
        required: bool,
    },
}

impl UndoAction {
    /// One line for people.
    pub fn describe(&self) -> String {
        match self {
            UndoAction::PutBack { component, previous: Some(previous) } => {
                format!("put {} {} back", component.name, previous.version)
            }
            UndoAction::PutBack { component, previous: None } => format!("stop {}", component.name),
            UndoAction::Revert { revisions } => format!("revert {}", revisions.join(", ")),
            UndoAction::Restore { backup } => format!("restore backup {backup}"),
            UndoAction::Hook { name, run, required: true, .. } => format!("undo hook {name}: {}", run.join(" ")),
            UndoAction::Hook { name, run, required: false, .. } => format!("run hook {name}: {}", run.join(" ")),
        }
    }
}

/// A notification, as the journal keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Notice {
    /// `start`, `success`, `failure` or `rollback`.
    pub event: String,
    /// `webhook` or `command`.
    pub target: String,
    /// Whether it was delivered.
    pub ok: bool,
    /// Why not, when it was not.
    pub message: String,
    /// When.
    pub at: String,
}

/// What a rollback run returns to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackPlan {
    /// The deployed release when it started.
    pub from_revision: i64,
    /// The release revision asked for (its version is deployed afterwards).
    pub target_revision: i64,
    /// The upgrade revision whose state the target has (itself, unless it was a rollback).
    pub returns_to: i64,
    /// The upgrade revisions undone, newest first.
    pub undoes: Vec<i64>,
    /// The version of each component afterwards (see [`ReleaseRow::versions`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub versions: BTreeMap<String, String>,
    /// `rollback --only`: the one component put back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only: Option<String>,
}

/// What a run follows: the upgrade's plan, or what a rollback returns to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", deny_unknown_fields)]
pub enum RunPlan {
    /// An upgrade.
    Upgrade {
        /// Its steps.
        plan: Plan,
    },
    /// A rollback.
    Rollback {
        /// What it returns to.
        plan: RollbackPlan,
    },
}

/// The undo a run chose, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UndoChoice {
    /// Its depth.
    pub depth: UndoDepth,
    /// Why that depth.
    pub why: String,
}

/// A journal failure.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Another run holds the lock.
    #[error(
        "another upshift run is in progress (pid {pid}, started {started_at}); wait for it, or if it died, use `upshift resume` or `upshift abort`"
    )]
    Busy {
        /// The holder's pid, when the journal knows it.
        pid: i64,
        /// When it started.
        started_at: String,
    },
    /// A run that did not finish is in the journal.
    #[error(
        "run {id} ({kind} to {target}) did not finish: it is {state} at step {step}; finish it with `upshift resume` or undo it with `upshift abort`"
    )]
    InFlight {
        /// Its id.
        id: String,
        /// Upgrade or rollback.
        kind: &'static str,
        /// Its target version.
        target: String,
        /// Its current step.
        step: i64,
        /// Its state.
        state: &'static str,
    },
    /// The file could not be read or written.
    #[error("the journal {path} cannot be used: {message}")]
    Storage {
        /// The journal file.
        path: String,
        /// What failed.
        message: String,
    },
    /// The file is not a journal (truncated, overwritten) or holds data that does not parse.
    #[error(
        "the journal {path} is damaged: {message}; upshift will not guess what is deployed. Restore the file from a copy, or move it aside to start a new history (the components and the database are not touched)"
    )]
    Damaged {
        /// The journal file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Written by a newer upshift.
    #[error(
        "the journal {path} has schema {found}, newer than this upshift knows ({SCHEMA_VERSION}); use the upshift that wrote it"
    )]
    Newer {
        /// The journal file.
        path: String,
        /// Its schema version.
        found: i64,
    },
}

/// A run as the journal records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRow {
    /// Its id.
    pub id: String,
    /// Upgrade or rollback.
    pub kind: RunKind,
    /// The target version.
    pub target: String,
    /// The version deployed when it started.
    pub from_version: Option<String>,
    /// Where it stands.
    pub state: RunState,
    /// Its process.
    pub pid: i64,
    /// When it started.
    pub started_at: String,
    /// `--no-backup`.
    pub no_backup: bool,
    /// The failure that started its undo.
    pub failure: Option<String>,
    /// Why it ended as it did.
    pub message: Option<String>,
    /// The undo it chose, once it is undoing.
    pub undo: Option<UndoChoice>,
}

/// A step as the journal records it.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRow {
    /// 1-based position in the plan.
    pub seq: usize,
    /// Its kind.
    pub kind: StepKind,
    /// Its title.
    pub title: String,
    /// Where it stands.
    pub state: StepState,
    /// What it set out to do and did.
    pub detail: StepDetail,
}

/// An undo action as the journal records it.
#[derive(Clone, Debug, PartialEq)]
pub struct ActionRow {
    /// 1-based position.
    pub seq: usize,
    /// The action.
    pub action: UndoAction,
    /// Where it stands.
    pub state: ActionState,
}

/// A release revision.
#[derive(Clone, Debug, PartialEq)]
pub struct ReleaseRow {
    /// The revision number.
    pub revision: i64,
    /// The version.
    pub version: String,
    /// An upgrade or a rollback.
    pub kind: RunKind,
    /// Its status.
    pub status: ReleaseStatus,
    /// When its run started.
    pub started_at: String,
    /// When its run ended.
    pub finished_at: Option<String>,
    /// The revision deployed before it in its line: for an upgrade the one it replaced; for
    /// a rollback the one before the release it returns to. What `rollback` goes back to.
    pub previous: Option<i64>,
    /// A rollback: the upgrade revision whose state it brings back.
    pub returns_to: Option<i64>,
    /// The backup taken before it.
    pub backup_id: Option<String>,
    /// Expand revisions it applied.
    pub expand: Vec<String>,
    /// Contract revisions it applied.
    pub contract: Vec<String>,
    /// What ran before it, per component it deployed (what a rollback puts back).
    pub deployments: BTreeMap<String, Option<Deployed>>,
    /// The hooks it ran that have an `undo` (what a rollback undoes).
    pub hooks: Vec<RanHook>,
    /// The version each component runs once it is deployed, where it differs from
    /// `version` (`upgrade --only`, `rollback --only`); see [`ReleaseRow::version_of`].
    pub versions: BTreeMap<String, String>,
}

/// A hook an upgrade ran.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RanHook {
    /// The hook, as the run's plan had it.
    pub hook: crate::manifest::Hook,
    /// Whether it ran once deploying had begun (its undo comes before the code goes back).
    pub after_deploy: bool,
}

impl ReleaseRow {
    /// The upgrade revision whose state this release has.
    pub fn state_revision(&self) -> i64 {
        self.returns_to.unwrap_or(self.revision)
    }

    /// The version `component` runs with this release deployed.
    pub fn version_of(&self, component: &str) -> &str {
        self.versions.get(component).map_or(&self.version, String::as_str)
    }
}

/// A release to record when a run ends.
pub struct NewRelease<'a> {
    /// Its version.
    pub version: &'a str,
    /// `Deployed` or `Failed`.
    pub status: ReleaseStatus,
    /// What the deployed release becomes when this one is deployed (`Superseded` after an
    /// upgrade, `RolledBack` after a rollback).
    pub replaced_status: ReleaseStatus,
    /// See [`ReleaseRow::previous`].
    pub previous: Option<i64>,
    /// See [`ReleaseRow::returns_to`].
    pub returns_to: Option<i64>,
    /// The backup taken before it.
    pub backup_id: Option<&'a str>,
    /// Expand revisions applied.
    pub expand: &'a [String],
    /// Contract revisions applied.
    pub contract: &'a [String],
    /// What ran before, per component.
    pub deployments: &'a BTreeMap<String, Option<Deployed>>,
    /// The hooks it ran that have an `undo`.
    pub hooks: &'a [RanHook],
    /// Components that run another version than `version` (see [`ReleaseRow::versions`]).
    pub versions: &'a BTreeMap<String, String>,
}

/// A release row of schema 0: revision, version, status, started, finished, run, backup,
/// expand, contract, deployments.
type LegacyRelease =
    (i64, String, String, String, Option<String>, Option<String>, Option<String>, String, String, String);

/// A step row before its detail is parsed.
type RawStep = (i64, StepKind, String, StepState, String);

/// Called after each committed write with its number (the test crash switch).
pub type WriteHook = Box<dyn FnMut(u64)>;

/// The journal of one state dir.
pub struct Journal {
    path: PathBuf,
    connection: Connection,
    /// Held while a run is in progress.
    lock: Option<File>,
    /// Writes committed through this handle.
    writes: u64,
    after_write: Option<WriteHook>,
}

/// UTC now, RFC 3339 with milliseconds.
pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Notifications sent (or not) for a run: they never fail it, so they are kept here.
const NOTICES_TABLE: &str = "CREATE TABLE notices (
            run_id TEXT NOT NULL REFERENCES runs (id),
            event TEXT NOT NULL,
            target TEXT NOT NULL,
            ok INTEGER NOT NULL CHECK (ok IN (0, 1)),
            message TEXT NOT NULL,
            at TEXT NOT NULL
        );";

/// The steps table of schema 1 with today's step kinds: SQLite cannot change a CHECK in
/// place.
fn steps_table() -> String {
    format!(
        "CREATE TABLE steps (
            run_id TEXT NOT NULL REFERENCES runs (id),
            seq INTEGER NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN {step_kinds}),
            title TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN {step_states}),
            started_at TEXT NOT NULL,
            finished_at TEXT,
            detail TEXT NOT NULL,
            PRIMARY KEY (run_id, seq)
        );",
        step_kinds = check_list(StepKind::VALUES),
        step_states = check_list(StepState::VALUES),
    )
}

fn schema() -> String {
    format!(
        "CREATE TABLE releases (
            revision INTEGER PRIMARY KEY,
            version TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN {kinds}),
            status TEXT NOT NULL CHECK (status IN {statuses}),
            started_at TEXT NOT NULL,
            finished_at TEXT,
            run_id TEXT,
            previous INTEGER REFERENCES releases (revision),
            returns_to INTEGER REFERENCES releases (revision),
            backup_id TEXT,
            expand TEXT NOT NULL,
            contract TEXT NOT NULL,
            deployments TEXT NOT NULL,
            hooks TEXT NOT NULL DEFAULT '[]',
            versions TEXT NOT NULL DEFAULT '{{}}'
        );
        CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN {kinds}),
            target TEXT NOT NULL,
            from_version TEXT,
            state TEXT NOT NULL CHECK (state IN {states}),
            pid INTEGER NOT NULL,
            started_at TEXT NOT NULL,
            finished_at TEXT,
            no_backup INTEGER NOT NULL CHECK (no_backup IN (0, 1)),
            failure TEXT,
            message TEXT,
            undo_depth TEXT CHECK (undo_depth IN {depths}),
            undo_why TEXT,
            plan TEXT NOT NULL
        );
        {steps}
        CREATE TABLE undo_actions (
            run_id TEXT NOT NULL REFERENCES runs (id),
            seq INTEGER NOT NULL,
            action TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN {action_states}),
            finished_at TEXT,
            PRIMARY KEY (run_id, seq)
        );
        {notices}
        PRAGMA user_version = {SCHEMA_VERSION};",
        notices = NOTICES_TABLE,
        kinds = check_list(RunKind::VALUES),
        statuses = check_list(ReleaseStatus::VALUES),
        states = check_list(RunState::VALUES),
        depths = check_list(UndoDepth::VALUES),
        steps = steps_table(),
        action_states = check_list(ActionState::VALUES),
    )
}

fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("journal types serialize")
}

fn index(seq: usize) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

impl Journal {
    fn storage(&self, e: impl std::fmt::Display) -> JournalError {
        JournalError::Storage { path: self.path.display().to_string(), message: e.to_string() }
    }

    /// An error reading rows: a value that does not parse means a damaged journal.
    fn read_error(&self, e: rusqlite::Error) -> JournalError {
        match e {
            rusqlite::Error::FromSqlConversionFailure(_, _, cause) => {
                JournalError::Damaged { path: self.path.display().to_string(), message: cause.to_string() }
            }
            other => self.storage(other),
        }
    }

    /// Opens the journal of `state_dir`, creating it when there is none.
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        let path = state_dir.join(FILE);
        if !path.exists() {
            create(state_dir, &path)?;
        }
        Journal::open_file(path)
    }

    /// Opens an existing journal; `None` when there is none yet.
    pub fn open_existing(state_dir: &Path) -> Result<Option<Journal>, JournalError> {
        let path = state_dir.join(FILE);
        if !path.exists() {
            return Ok(None);
        }
        Journal::open_file(path).map(Some)
    }

    fn open_file(path: PathBuf) -> Result<Journal, JournalError> {
        let shown = path.display().to_string();
        let damaged = |message: String| JournalError::Damaged { path: shown.clone(), message };
        // A journal is created whole (temp file + rename), so an empty file was truncated.
        if std::fs::metadata(&path).map_or(0, |m| m.len()) == 0 {
            return Err(damaged("the file is empty (0 bytes)".into()));
        }
        let connection = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
            .map_err(|e| JournalError::Storage { path: path.display().to_string(), message: e.to_string() })?;
        let mut journal = Journal { path, connection, lock: None, writes: 0, after_write: None };
        journal
            .connection
            .execute_batch("PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;")
            .map_err(|e| match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
                    damaged(format!("it is not a SQLite database ({e})"))
                }
                _ => journal.storage(e),
            })?;
        let version: i64 = journal
            .connection
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(|e| damaged(format!("it is not a SQLite database ({e})")))?;
        match version {
            SCHEMA_VERSION => {}
            0 => journal.upgrade_from_0()?,
            1 => journal.upgrade_from_1()?,
            found if found > SCHEMA_VERSION => {
                return Err(JournalError::Newer { path: journal.path.display().to_string(), found });
            }
            found => return Err(damaged(format!("unknown schema version {found}"))),
        }
        let check: String = journal
            .connection
            .query_row("PRAGMA quick_check", [], |row| row.get(0))
            .map_err(|e| damaged(e.to_string()))?;
        if check != "ok" {
            return Err(damaged(format!("SQLite's quick_check says: {check}")));
        }
        Ok(journal)
    }

    /// Schema 0 (untyped states, untyped JSON) to 1, in one transaction: states are checked
    /// while copied, deployments are kept as records without a component spec (the driver
    /// falls back to the manifest's for those), and each release's `previous` is the
    /// release deployed before it.
    fn upgrade_from_0(&mut self) -> Result<(), JournalError> {
        let path = self.path.display().to_string();
        let damaged = |message: String| JournalError::Damaged { path: path.clone(), message };
        let tables: i64 = self
            .connection
            .query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'releases'", [], |r| {
                r.get(0)
            })
            .map_err(|e| damaged(format!("it is not a SQLite database ({e})")))?;
        if tables == 0 {
            return Err(damaged("it holds no journal tables (schema 0 and no releases table)".into()));
        }
        let in_flight: i64 = self
            .connection
            .query_row("SELECT count(*) FROM runs WHERE state IN ('running', 'stuck')", [], |r| r.get(0))
            .map_err(|e| damaged(e.to_string()))?;
        if in_flight > 0 {
            return Err(damaged(
                "it was written by an older upshift and holds a run that did not finish; finish it with that upshift (`upshift resume` or `upshift abort`) first".into(),
            ));
        }
        let tx = self.connection.transaction().map_err(|e| damaged(e.to_string()))?;
        let result = (|| -> Result<(), String> {
            tx.execute_batch(
                "ALTER TABLE releases RENAME TO releases_0; ALTER TABLE runs RENAME TO runs_0; ALTER TABLE steps RENAME TO steps_0;",
            )
            .map_err(|e| e.to_string())?;
            tx.execute_batch(&schema()).map_err(|e| e.to_string())?;
            let mut previous: Option<i64> = None;
            let rows: Vec<LegacyRelease> = {
                let mut statement = tx
                    .prepare("SELECT revision, version, status, started_at, finished_at, run_id, backup_id, expand, contract, deployments FROM releases_0 ORDER BY revision")
                    .map_err(|e| e.to_string())?;
                statement
                    .query_map([], |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                            r.get(6)?,
                            r.get(7)?,
                            r.get(8)?,
                            r.get(9)?,
                        ))
                    })
                    .map_err(|e| e.to_string())?
                    .collect::<Result<_, _>>()
                    .map_err(|e| e.to_string())?
            };
            for (revision, version, status, started, finished, run, backup, expand, contract, deployments) in rows {
                let status = ReleaseStatus::parse(&status).ok_or(format!("release {revision}: status `{status}`"))?;
                let ids: Vec<String> = serde_json::from_str(&expand).map_err(|e| format!("release {revision}: {e}"))?;
                let contract_ids: Vec<String> =
                    serde_json::from_str(&contract).map_err(|e| format!("release {revision}: {e}"))?;
                let legacy: BTreeMap<String, Option<serde_json::Value>> =
                    serde_json::from_str(&deployments).map_err(|e| format!("release {revision}: {e}"))?;
                let converted: BTreeMap<String, Option<Deployed>> = legacy
                    .into_iter()
                    .map(|(name, value)| {
                        let deployed = value.and_then(|v| {
                            Some(Deployed::legacy(v.get("version")?.as_str()?.to_owned(), v.get("detail").cloned()?))
                        });
                        (name, deployed)
                    })
                    .collect();
                tx.execute(
                    "INSERT INTO releases (revision, version, kind, status, started_at, finished_at, run_id, previous, backup_id, expand, contract, deployments) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                    params![revision, version, RunKind::Upgrade, status, started, finished, run, previous, backup, to_json(&ids), to_json(&contract_ids), to_json(&converted)],
                )
                .map_err(|e| e.to_string())?;
                if status != ReleaseStatus::Failed {
                    previous = Some(revision);
                }
            }
            tx.execute_batch(
                "INSERT INTO runs (id, kind, target, from_version, state, pid, started_at, finished_at, no_backup, message, plan) \
                 SELECT id, kind, target, from_version, CASE state WHEN 'failed' THEN 'rolled-back' ELSE state END, pid, started_at, finished_at, no_backup, message, '{\"kind\":\"legacy\"}' FROM runs_0; \
                 DROP TABLE steps_0; DROP TABLE runs_0; DROP TABLE releases_0;",
            )
            .map_err(|e| e.to_string())?;
            Ok(())
        })();
        result.map_err(|message| damaged(format!("upgrading it from schema 0 failed: {message}")))?;
        tx.commit().map_err(|e| damaged(e.to_string()))?;
        Ok(())
    }

    /// Schema 1 to 2, in one transaction: hook steps (the steps table's CHECK), the hooks
    /// a release ran, and the notices table.
    fn upgrade_from_1(&mut self) -> Result<(), JournalError> {
        let path = self.path.display().to_string();
        let damaged = |message: String| JournalError::Damaged { path: path.clone(), message };
        let tx = self.connection.transaction().map_err(|e| damaged(e.to_string()))?;
        tx.execute_batch(&format!(
            "ALTER TABLE steps RENAME TO steps_1; {steps} INSERT INTO steps SELECT * FROM steps_1; DROP TABLE steps_1; \
             ALTER TABLE releases ADD COLUMN hooks TEXT NOT NULL DEFAULT '[]'; \
             ALTER TABLE releases ADD COLUMN versions TEXT NOT NULL DEFAULT '{{}}'; \
             {NOTICES_TABLE} PRAGMA user_version = {SCHEMA_VERSION};",
            steps = steps_table()
        ))
        .map_err(|e| damaged(format!("upgrading it from schema 1 failed: {e}")))?;
        tx.commit().map_err(|e| damaged(e.to_string()))
    }

    /// Calls `hook` after each committed write with its number, from 1.
    pub fn set_write_hook(&mut self, hook: WriteHook) {
        self.after_write = Some(hook);
    }

    fn wrote(&mut self) {
        self.writes += 1;
        let writes = self.writes;
        if let Some(hook) = &mut self.after_write {
            hook(writes);
        }
    }

    /// Runs one write in a transaction, then the write hook.
    fn write<T>(&mut self, work: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>) -> Result<T, JournalError> {
        let path = self.path.display().to_string();
        let storage = |e: rusqlite::Error| JournalError::Storage { path: path.clone(), message: e.to_string() };
        let tx = self.connection.transaction().map_err(storage)?;
        let value = work(&tx).map_err(storage)?;
        tx.commit().map_err(storage)?;
        self.wrote();
        Ok(value)
    }

    /// Takes the run lock (once; again is a no-op); fails naming the holder when another run
    /// has it.
    pub fn lock(&mut self) -> Result<(), JournalError> {
        if self.lock.is_some() {
            return Ok(());
        }
        let lock_path = self.path.with_file_name("run.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| self.storage(e))?;
        if file.try_lock().is_err() {
            let holder = self.in_flight()?.map_or((0, "at an unknown time".to_owned()), |r| (r.pid, r.started_at));
            return Err(JournalError::Busy { pid: holder.0, started_at: holder.1 });
        }
        self.lock = Some(file);
        Ok(())
    }

    const RUN_COLUMNS: &'static str =
        "id, kind, target, from_version, state, pid, started_at, no_backup, failure, message, undo_depth, undo_why";

    /// The run that did not finish (running, undoing or stuck), if any.
    pub fn in_flight(&self) -> Result<Option<RunRow>, JournalError> {
        self.connection
            .query_row(
                &format!(
                    "SELECT {} FROM runs WHERE state IN ('running', 'undoing', 'stuck') ORDER BY started_at DESC LIMIT 1",
                    Journal::RUN_COLUMNS
                ),
                [],
                run_row,
            )
            .optional()
            .map_err(|e| self.read_error(e))
    }

    /// Refuses to start while a run did not finish.
    pub fn refuse_in_flight(&self) -> Result<(), JournalError> {
        if let Some(run) = self.in_flight()? {
            let step = self.current_step(&run.id)?.map_or(0, |s| index(s.seq));
            return Err(JournalError::InFlight {
                id: run.id,
                kind: run.kind.as_str(),
                target: run.target,
                step,
                state: run.state.as_str(),
            });
        }
        Ok(())
    }

    /// Records a new run with what it follows: an upgrade starts `Running`; a rollback,
    /// whose work is all undo, starts `Undoing` with its actions, in the same write.
    pub fn begin_run(
        &mut self,
        run_plan: &RunPlan,
        target: &str,
        from_version: Option<&str>,
        no_backup: bool,
        undo: Option<(&UndoChoice, &[UndoAction])>,
    ) -> Result<String, JournalError> {
        let id = format!(
            "{}-{}",
            now().chars().filter(char::is_ascii_digit).take(17).collect::<String>(),
            std::process::id()
        );
        let kind = match run_plan {
            RunPlan::Upgrade { .. } => RunKind::Upgrade,
            RunPlan::Rollback { .. } => RunKind::Rollback,
        };
        let state = if undo.is_some() { RunState::Undoing } else { RunState::Running };
        self.write(|tx| {
            tx.execute(
                "INSERT INTO runs (id, kind, target, from_version, state, pid, started_at, no_backup, plan) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    id,
                    kind,
                    target,
                    from_version,
                    state,
                    i64::from(std::process::id()),
                    now(),
                    no_backup,
                    to_json(run_plan)
                ],
            )?;
            if let Some((choice, actions)) = undo {
                insert_undo(tx, &id, None, choice, actions)?;
            }
            Ok(())
        })?;
        Ok(id)
    }

    /// What a run follows.
    pub fn plan(&self, run: &str) -> Result<RunPlan, JournalError> {
        let text: String = self
            .connection
            .query_row("SELECT plan FROM runs WHERE id = ?1", [run], |row| row.get(0))
            .map_err(|e| self.read_error(e))?;
        serde_json::from_str(&text).map_err(|e| JournalError::Damaged {
            path: self.path.display().to_string(),
            message: format!("run {run}'s plan does not parse: {e}"),
        })
    }

    /// Takes over a run after a crash (`resume`/`abort`): this process is now its owner. A
    /// stuck run goes back to undoing: it is retried.
    pub fn adopt_run(&mut self, id: &str) -> Result<(), JournalError> {
        let pid = i64::from(std::process::id());
        self.write(|tx| {
            tx.execute(
                "UPDATE runs SET pid = ?2, state = CASE state WHEN 'stuck' THEN 'undoing' ELSE state END WHERE id = ?1",
                params![id, pid],
            )
            .map(drop)
        })
    }

    /// Records a notification and whether it reached its target.
    pub fn notice(
        &mut self,
        run: &str,
        event: &str,
        target: &str,
        result: &Result<(), String>,
    ) -> Result<(), JournalError> {
        let (ok, message) = match result {
            Ok(()) => (true, String::new()),
            Err(e) => (false, e.clone()),
        };
        self.write(|tx| {
            tx.execute(
                "INSERT INTO notices (run_id, event, target, ok, message, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![run, event, target, ok, message, now()],
            )
            .map(drop)
        })
    }

    /// The notifications of a run, in the order they were sent.
    pub fn notices(&self, run: &str) -> Result<Vec<Notice>, JournalError> {
        let mut statement = self
            .connection
            .prepare("SELECT event, target, ok, message, at FROM notices WHERE run_id = ?1 ORDER BY rowid")
            .map_err(|e| self.storage(e))?;
        statement
            .query_map(params![run], |r| {
                Ok(Notice { event: r.get(0)?, target: r.get(1)?, ok: r.get(2)?, message: r.get(3)?, at: r.get(4)? })
            })
            .and_then(Iterator::collect)
            .map_err(|e| self.storage(e))
    }

    /// Records a step's intent before it starts, with what it sets out to do.
    pub fn step_started(
        &mut self,
        run: &str,
        seq: usize,
        kind: StepKind,
        title: &str,
        detail: &StepDetail,
    ) -> Result<(), JournalError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO steps (run_id, seq, kind, title, state, started_at, detail) VALUES (?1, ?2, ?3, ?4, 'started', ?5, ?6) \
                 ON CONFLICT (run_id, seq) DO UPDATE SET state = 'started', started_at = excluded.started_at, detail = excluded.detail",
                params![run, index(seq), kind, title, now(), to_json(detail)],
            )
            .map(drop)
        })
    }

    /// Records what a step did so far, keeping its state.
    pub fn step_detail(&mut self, run: &str, seq: usize, detail: &StepDetail) -> Result<(), JournalError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE steps SET detail = ?3 WHERE run_id = ?1 AND seq = ?2",
                params![run, index(seq), to_json(detail)],
            )
            .map(drop)
        })
    }

    /// Records a step's outcome.
    pub fn step_finished(&mut self, run: &str, seq: usize, state: StepState) -> Result<(), JournalError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE steps SET state = ?3, finished_at = ?4 WHERE run_id = ?1 AND seq = ?2",
                params![run, index(seq), state, now()],
            )
            .map(drop)
        })
    }

    /// The steps of a run, in order.
    pub fn steps(&self, run: &str) -> Result<Vec<StepRow>, JournalError> {
        let read = || -> rusqlite::Result<Vec<RawStep>> {
            let mut statement = self
                .connection
                .prepare("SELECT seq, kind, title, state, detail FROM steps WHERE run_id = ?1 ORDER BY seq")?;
            statement
                .query_map([run], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)))?
                .collect()
        };
        read()
            .map_err(|e| self.read_error(e))?
            .into_iter()
            .map(|(seq, kind, title, state, detail)| {
                let detail = serde_json::from_str(&detail).map_err(|e| JournalError::Damaged {
                    path: self.path.display().to_string(),
                    message: format!("run {run} step {seq}: its detail does not parse: {e}"),
                })?;
                Ok(StepRow { seq: usize::try_from(seq).unwrap_or(0), kind, title, state, detail })
            })
            .collect()
    }

    /// Where a run stands: its last step that is not done, else its last step.
    pub fn current_step(&self, run: &str) -> Result<Option<StepRow>, JournalError> {
        let mut steps = self.steps(run)?;
        Ok(match steps.iter().rposition(|s| s.state != StepState::Done) {
            Some(index) => Some(steps.swap_remove(index)),
            None => steps.pop(),
        })
    }

    /// Turns a run to undoing, with the undo chosen and every action it will take, in one
    /// write. Called once: a run already undoing keeps its actions.
    pub fn begin_undo(
        &mut self,
        run: &str,
        failure: &str,
        choice: &UndoChoice,
        actions: &[UndoAction],
    ) -> Result<(), JournalError> {
        self.write(|tx| insert_undo(tx, run, Some(failure), choice, actions))
    }

    /// A run's undo actions, in order.
    pub fn undo_actions(&self, run: &str) -> Result<Vec<ActionRow>, JournalError> {
        let read = || -> rusqlite::Result<Vec<(i64, String, ActionState)>> {
            let mut statement = self
                .connection
                .prepare("SELECT seq, action, state FROM undo_actions WHERE run_id = ?1 ORDER BY seq")?;
            statement.query_map([run], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?.collect()
        };
        read()
            .map_err(|e| self.read_error(e))?
            .into_iter()
            .map(|(seq, action, state)| {
                let action = serde_json::from_str(&action).map_err(|e| JournalError::Damaged {
                    path: self.path.display().to_string(),
                    message: format!("run {run} undo action {seq} does not parse: {e}"),
                })?;
                Ok(ActionRow { seq: usize::try_from(seq).unwrap_or(0), action, state })
            })
            .collect()
    }

    /// Records an undo action's state.
    pub fn action_state(&mut self, run: &str, seq: usize, state: ActionState) -> Result<(), JournalError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE undo_actions SET state = ?3, finished_at = ?4 WHERE run_id = ?1 AND seq = ?2",
                params![run, index(seq), state, now()],
            )
            .map(drop)
        })
    }

    /// Marks a run stuck: its undo could not start or failed. `failure`, when given, is
    /// what failed first.
    pub fn set_stuck(&mut self, run: &str, failure: Option<&str>, message: &str) -> Result<(), JournalError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE runs SET state = 'stuck', failure = coalesce(?2, failure), message = ?3 WHERE id = ?1",
                params![run, failure, message],
            )
            .map(drop)
        })
    }

    /// Ends a run and records its release in one write, so the journal never says a
    /// release is deployed while its run is still in flight (or the reverse). Returns the
    /// release's revision.
    pub fn finish_run(
        &mut self,
        run: &str,
        state: RunState,
        message: Option<&str>,
        release: Option<&NewRelease<'_>>,
        step_done: Option<usize>,
    ) -> Result<Option<i64>, JournalError> {
        self.write(|tx| {
            let started_at: String = tx.query_row("SELECT started_at FROM runs WHERE id = ?1", [run], |r| r.get(0))?;
            let revision = match release {
                Some(release) => Some(insert_release(tx, run, &started_at, release)?),
                None => None,
            };
            if let Some(seq) = step_done {
                tx.execute(
                    "UPDATE steps SET state = 'done', finished_at = ?3 WHERE run_id = ?1 AND seq = ?2",
                    params![run, index(seq), now()],
                )?;
            }
            tx.execute(
                "UPDATE runs SET state = ?2, finished_at = ?3, message = ?4 WHERE id = ?1",
                params![run, state, now(), message],
            )?;
            Ok(revision)
        })
    }

    /// The run started last, if any.
    pub fn last_run(&self) -> Result<Option<RunRow>, JournalError> {
        self.connection
            .query_row(&format!("SELECT {} FROM runs ORDER BY rowid DESC LIMIT 1", Journal::RUN_COLUMNS), [], run_row)
            .optional()
            .map_err(|e| self.read_error(e))
    }

    /// The run with this id.
    pub fn run(&self, id: &str) -> Result<Option<RunRow>, JournalError> {
        self.connection
            .query_row(&format!("SELECT {} FROM runs WHERE id = ?1", Journal::RUN_COLUMNS), [id], run_row)
            .optional()
            .map_err(|e| self.read_error(e))
    }

    /// Every release revision, oldest first.
    pub fn releases(&self) -> Result<Vec<ReleaseRow>, JournalError> {
        type Raw = (ReleaseRow, String, String, String, String, String);
        let read = || -> rusqlite::Result<Vec<Raw>> {
            let mut statement = self.connection.prepare(
                "SELECT revision, version, kind, status, started_at, finished_at, previous, returns_to, backup_id, expand, contract, deployments, hooks, versions \
                 FROM releases ORDER BY revision",
            )?;
            statement
                .query_map([], |row| {
                    Ok((
                        ReleaseRow {
                            revision: row.get(0)?,
                            version: row.get(1)?,
                            kind: row.get(2)?,
                            status: row.get(3)?,
                            started_at: row.get(4)?,
                            finished_at: row.get(5)?,
                            previous: row.get(6)?,
                            returns_to: row.get(7)?,
                            backup_id: row.get(8)?,
                            expand: Vec::new(),
                            contract: Vec::new(),
                            deployments: BTreeMap::new(),
                            hooks: Vec::new(),
                            versions: BTreeMap::new(),
                        },
                        row.get(9)?,
                        row.get(10)?,
                        row.get(11)?,
                        row.get(12)?,
                        row.get(13)?,
                    ))
                })?
                .collect()
        };
        read()
            .map_err(|e| self.read_error(e))?
            .into_iter()
            .map(|(mut release, expand, contract, deployments, hooks, versions)| {
                let damaged = |e: serde_json::Error| JournalError::Damaged {
                    path: self.path.display().to_string(),
                    message: format!("release {} does not parse: {e}", release.revision),
                };
                release.expand = serde_json::from_str(&expand).map_err(damaged)?;
                release.contract = serde_json::from_str(&contract).map_err(damaged)?;
                release.deployments = serde_json::from_str(&deployments).map_err(damaged)?;
                release.hooks = serde_json::from_str(&hooks).map_err(damaged)?;
                release.versions = serde_json::from_str(&versions).map_err(damaged)?;
                Ok(release)
            })
            .collect()
    }

    /// The deployed release, if any.
    pub fn deployed(&self) -> Result<Option<ReleaseRow>, JournalError> {
        Ok(self.releases()?.into_iter().rev().find(|r| r.status == ReleaseStatus::Deployed))
    }
}

/// Creates a journal whole: schema written to a temp file, fsynced, renamed into place, so
/// that an existing `journal.db` always has its tables and an empty one was damaged.
fn create(state_dir: &Path, path: &Path) -> Result<(), JournalError> {
    let storage =
        |e: &dyn std::fmt::Display| JournalError::Storage { path: path.display().to_string(), message: e.to_string() };
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(state_dir)
        .map_err(|e| storage(&e))?;
    let temp = state_dir.join(format!("{FILE}.new-{}", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    {
        let connection = Connection::open(&temp).map_err(|e| storage(&e))?;
        connection.execute_batch("PRAGMA journal_mode = DELETE;").map_err(|e| storage(&e))?;
        connection.execute_batch(&schema()).map_err(|e| storage(&e))?;
    }
    // Owner-only: the journal records the deployments' full specs.
    std::fs::set_permissions(&temp, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(|e| storage(&e))?;
    File::open(&temp).and_then(|f| f.sync_all()).map_err(|e| storage(&e))?;
    std::fs::rename(&temp, path).map_err(|e| storage(&e))?;
    File::open(state_dir).and_then(|d| d.sync_all()).map_err(|e| storage(&e))?;
    Ok(())
}

fn insert_undo(
    tx: &Transaction<'_>,
    run: &str,
    failure: Option<&str>,
    choice: &UndoChoice,
    actions: &[UndoAction],
) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE runs SET state = 'undoing', failure = coalesce(?2, failure), undo_depth = ?3, undo_why = ?4 WHERE id = ?1",
        params![run, failure, choice.depth, choice.why],
    )?;
    tx.execute("DELETE FROM undo_actions WHERE run_id = ?1", [run])?;
    for (seq, action) in actions.iter().enumerate() {
        tx.execute(
            "INSERT INTO undo_actions (run_id, seq, action, state) VALUES (?1, ?2, ?3, 'pending')",
            params![run, index(seq + 1), to_json(action)],
        )?;
    }
    Ok(())
}

fn insert_release(
    tx: &Transaction<'_>,
    run: &str,
    started_at: &str,
    release: &NewRelease<'_>,
) -> rusqlite::Result<i64> {
    if release.status == ReleaseStatus::Deployed {
        tx.execute("UPDATE releases SET status = ?1 WHERE status = 'deployed'", [release.replaced_status])?;
    }
    let kind = if release.returns_to.is_some() { RunKind::Rollback } else { RunKind::Upgrade };
    tx.execute(
        "INSERT INTO releases (version, kind, status, started_at, finished_at, run_id, previous, returns_to, backup_id, expand, contract, deployments, hooks, versions) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        params![
            release.version,
            kind,
            release.status,
            started_at,
            now(),
            run,
            release.previous,
            release.returns_to,
            release.backup_id,
            to_json(&release.expand),
            to_json(&release.contract),
            to_json(release.deployments),
            to_json(&release.hooks),
            to_json(release.versions),
        ],
    )?;
    Ok(tx.last_insert_rowid())
}

fn run_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
    let depth: Option<UndoDepth> = row.get(10)?;
    let why: Option<String> = row.get(11)?;
    Ok(RunRow {
        id: row.get(0)?,
        kind: row.get(1)?,
        target: row.get(2)?,
        from_version: row.get(3)?,
        state: row.get(4)?,
        pid: row.get(5)?,
        started_at: row.get(6)?,
        no_backup: row.get(7)?,
        failure: row.get(8)?,
        message: row.get(9)?,
        undo: depth.map(|depth| UndoChoice { depth, why: why.unwrap_or_default() }),
    })
}

/// The deployed release and its version, or `None` when nothing was deployed (no journal
/// yet). A damaged journal is an error, never "nothing deployed".
pub fn deployed_release(state_dir: &Path) -> Result<Option<(ReleaseRow, semver::Version)>, JournalError> {
    let Some(journal) = Journal::open_existing(state_dir)? else {
        return Ok(None);
    };
    journal
        .deployed()?
        .map(|r| {
            let version = r.version.parse().map_err(|e| JournalError::Damaged {
                path: journal.path.display().to_string(),
                message: format!("release {} records version `{}`, which is not semver: {e}", r.revision, r.version),
            })?;
            Ok((r, version))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_journal_is_at_the_current_schema_and_refuses_bad_states() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let version: i64 = journal.connection.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let refused = journal.connection.execute(
            "INSERT INTO runs (id, kind, target, state, pid, started_at, no_backup, plan) VALUES ('x', 'upgrade', '1.0.0', 'half-done', 1, 'now', 0, '{}')",
            [],
        );
        assert!(refused.unwrap_err().to_string().contains("CHECK"));
        // Nor an empty state (the CHECK list once ended with '').
        let empty = journal.connection.execute(
            "INSERT INTO runs (id, kind, target, state, pid, started_at, no_backup, plan) VALUES ('y', 'upgrade', '1.0.0', '', 1, 'now', 0, '{}')",
            [],
        );
        assert!(empty.unwrap_err().to_string().contains("CHECK"));
    }

    #[test]
    fn an_empty_or_foreign_file_is_damaged_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"").unwrap();
        let err = Journal::open(dir.path()).err().unwrap();
        assert!(matches!(err, JournalError::Damaged { .. }), "{err}");
        assert!(err.to_string().contains("empty"), "{err}");
        assert!(deployed_release(dir.path()).is_err());
        std::fs::write(dir.path().join(FILE), b"not a database at all, just text ....").unwrap();
        assert!(matches!(Journal::open(dir.path()).err().unwrap(), JournalError::Damaged { .. }));
    }

    #[test]
    fn json_that_does_not_parse_is_an_error_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        journal.finish_run_for_test().unwrap();
        journal.connection.execute("UPDATE releases SET deployments = '{broken'", []).unwrap();
        let err = journal.releases().unwrap_err();
        assert!(matches!(err, JournalError::Damaged { .. }));
        assert!(err.to_string().contains(FILE), "{err}");
    }

    #[test]
    fn schema_0_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(dir.path().join(FILE)).unwrap();
            c.execute_batch(
                "CREATE TABLE releases (revision INTEGER PRIMARY KEY, version TEXT NOT NULL, status TEXT NOT NULL, started_at TEXT NOT NULL, finished_at TEXT, run_id TEXT, backup_id TEXT, expand TEXT NOT NULL DEFAULT '[]', contract TEXT NOT NULL DEFAULT '[]', deployments TEXT NOT NULL DEFAULT '{}');
                 CREATE TABLE runs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, target TEXT NOT NULL, from_version TEXT, state TEXT NOT NULL, pid INTEGER NOT NULL, started_at TEXT NOT NULL, finished_at TEXT, no_backup INTEGER NOT NULL, backup_id TEXT, message TEXT, plan TEXT NOT NULL DEFAULT '{}');
                 CREATE TABLE steps (run_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, title TEXT NOT NULL, state TEXT NOT NULL, started_at TEXT NOT NULL, finished_at TEXT, detail TEXT NOT NULL DEFAULT '{}', PRIMARY KEY (run_id, seq));
                 INSERT INTO runs VALUES ('r1', 'upgrade', '1.0.0', NULL, 'succeeded', 1, 't', 't', 0, NULL, NULL, '{}');
                 INSERT INTO releases VALUES (1, '1.0.0', 'superseded', 't', 't', 'r1', NULL, '[\"1\"]', '[]', '{\"api\":null}');
                 INSERT INTO releases VALUES (2, '2.0.0', 'deployed', 't', 't', 'r2', 'b1', '[\"2\"]', '[\"3\"]', '{\"api\":{\"version\":\"1.0.0\",\"detail\":{\"addr\":\"127.0.0.1:1\"}}}');",
            )
            .unwrap();
        }
        let journal = Journal::open(dir.path()).unwrap();
        let releases = journal.releases().unwrap();
        assert_eq!(releases[1].previous, Some(1));
        assert_eq!(releases[1].status, ReleaseStatus::Deployed);
        let api = releases[1].deployments["api"].as_ref().unwrap();
        assert_eq!((api.version.as_str(), api.component.is_none()), ("1.0.0", true));
        assert!(journal.in_flight().unwrap().is_none());
    }

    /// A journal of schema 1 (as upshift 0.1 wrote it, with a run in flight) takes hook
    /// steps and notices after it is opened, keeping its rows.
    #[test]
    fn schema_1_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(dir.path().join(FILE)).unwrap();
            c.execute_batch(
                "CREATE TABLE releases (revision INTEGER PRIMARY KEY, version TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL, started_at TEXT NOT NULL, finished_at TEXT, run_id TEXT, previous INTEGER REFERENCES releases (revision), returns_to INTEGER REFERENCES releases (revision), backup_id TEXT, expand TEXT NOT NULL, contract TEXT NOT NULL, deployments TEXT NOT NULL);
                 CREATE TABLE runs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, target TEXT NOT NULL, from_version TEXT, state TEXT NOT NULL, pid INTEGER NOT NULL, started_at TEXT NOT NULL, finished_at TEXT, no_backup INTEGER NOT NULL, failure TEXT, message TEXT, undo_depth TEXT, undo_why TEXT, plan TEXT NOT NULL);
                 CREATE TABLE steps (run_id TEXT NOT NULL REFERENCES runs (id), seq INTEGER NOT NULL, kind TEXT NOT NULL CHECK (kind IN ('preflight', 'backup', 'expand', 'deploy', 'verify', 'contract', 'record')), title TEXT NOT NULL, state TEXT NOT NULL, started_at TEXT NOT NULL, finished_at TEXT, detail TEXT NOT NULL, PRIMARY KEY (run_id, seq));
                 CREATE TABLE undo_actions (run_id TEXT NOT NULL REFERENCES runs (id), seq INTEGER NOT NULL, action TEXT NOT NULL, state TEXT NOT NULL, finished_at TEXT, PRIMARY KEY (run_id, seq));
                 INSERT INTO releases VALUES (1, '1.0.0', 'upgrade', 'deployed', 't', 't', 'r1', NULL, NULL, NULL, '[]', '[]', '{}');
                 INSERT INTO runs VALUES ('r2', 'upgrade', '2.0.0', '1.0.0', 'running', 1, 't', NULL, 0, NULL, NULL, NULL, NULL, '{\"kind\":\"legacy\"}');
                 INSERT INTO steps VALUES ('r2', 1, 'preflight', 'preflight', 'done', 't', 't', '{}');
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let mut journal = Journal::open(dir.path()).unwrap();
        assert_eq!(journal.releases().unwrap()[0].hooks, Vec::new());
        assert_eq!(journal.steps("r2").unwrap().len(), 1, "the steps were kept");
        journal.step_started("r2", 2, StepKind::Hook, "hook checkout (pre-backup)", &StepDetail::default()).unwrap();
        journal.notice("r2", "start", "webhook", &Err("refused".into())).unwrap();
        assert_eq!(journal.notices("r2").unwrap()[0].message, "refused");
        let version: i64 = journal.connection.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    impl Journal {
        fn finish_run_for_test(&mut self) -> Result<(), JournalError> {
            let plan = RunPlan::Rollback {
                plan: RollbackPlan {
                    from_revision: 0,
                    target_revision: 0,
                    returns_to: 0,
                    undoes: Vec::new(),
                    versions: BTreeMap::new(),
                    only: None,
                },
            };
            let run = self.begin_run(&plan, "1.0.0", None, false, None)?;
            let none = BTreeMap::new();
            self.finish_run(
                &run,
                RunState::Succeeded,
                None,
                Some(&NewRelease {
                    version: "1.0.0",
                    status: ReleaseStatus::Deployed,
                    replaced_status: ReleaseStatus::Superseded,
                    previous: None,
                    returns_to: None,
                    backup_id: None,
                    expand: &[],
                    contract: &[],
                    deployments: &none,
                    hooks: &[],
                    versions: &BTreeMap::new(),
                }),
                None,
            )?;
            Ok(())
        }
    }
}
