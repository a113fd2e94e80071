//! The database side of migrations, one implementation per database.
//!
//! Like sqlx's `Migrate` trait, an [`Engine`] only knows how to lock, read the applied
//! set, and run one revision together with its bookkeeping row; the ordering and every
//! check live once, in [`crate::Migrator`].

mod postgres;
mod sqlite;

use std::time::Duration;

pub use self::postgres::{PostgresEngine, message as postgres_message};
pub use self::sqlite::SqliteEngine;
use crate::error::Error;
use crate::lexer::Dialect;
use crate::source::Revision;
use crate::url::DatabaseUrl;

/// The bookkeeping table, in the target database.
pub const TABLE: &str = "upshift_migrations";

/// The statement that creates the bookkeeping table when it is missing.
pub fn table_ddl(dialect: Dialect) -> String {
    match dialect {
        Dialect::Postgres => format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (
    revision text PRIMARY KEY,
    name text NOT NULL DEFAULT '',
    checksum text NOT NULL,
    phase text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    duration_ms bigint NOT NULL
)"
        ),
        Dialect::Sqlite => format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (
    revision TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    checksum TEXT NOT NULL,
    phase TEXT NOT NULL,
    applied_at TEXT NOT NULL,
    duration_ms INTEGER NOT NULL
)"
        ),
    }
}

/// A row of `upshift_migrations`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedRevision {
    /// The revision id.
    pub id: String,
    /// Hex sha256 of the up section that was applied.
    pub checksum: String,
    /// `expand` or `contract`.
    pub phase: String,
    /// When it was applied, UTC, RFC 3339 with milliseconds.
    pub applied_at: String,
    /// How long its statements took.
    pub duration_ms: i64,
}

/// Which way a step goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Run the up section and insert the bookkeeping row.
    Up,
    /// Run the down section and delete the bookkeeping row.
    Down,
}

/// One statement ready to run, with its line in the migration file.
#[derive(Clone, Debug)]
pub struct PreparedStatement {
    /// The statement text.
    pub sql: String,
    /// 1-based line in the file.
    pub line: usize,
}

/// One revision to run in one direction.
#[derive(Debug)]
pub struct Step<'a> {
    /// The revision.
    pub revision: &'a Revision,
    /// Up or down.
    pub direction: Direction,
    /// The statements of the section (none for `baseline`).
    pub statements: Vec<PreparedStatement>,
}

impl Step<'_> {
    /// Whether the statements run one by one in autocommit mode: the revision says so, or
    /// its down section does for itself.
    pub fn no_transaction(&self) -> bool {
        self.revision.no_transaction || (self.direction == Direction::Down && self.revision.down_no_transaction)
    }

    /// The file the statements come from.
    pub fn path(&self) -> &std::path::Path {
        match (self.direction, &self.revision.down) {
            (Direction::Down, Some(down)) => &down.path,
            _ => &self.revision.up.path,
        }
    }

    /// The error for statement `index` failing with `message`.
    pub(crate) fn failed(&self, index: usize, message: String) -> Error {
        let partial = self.no_transaction() && index > 0;
        // Without a transaction, say exactly which statements stayed applied.
        let message = if partial {
            let lines: Vec<String> = self.statements.iter().take(index).map(|s| s.line.to_string()).collect();
            format!("{message}\nthe statements at line {} ran and stay applied", lines.join(", "))
        } else {
            message
        };
        Error::Statement {
            id: self.revision.id.clone(),
            path: self.path().to_path_buf(),
            line: self.statements.get(index).map_or(0, |s| s.line),
            message,
            partial,
        }
    }
}

/// A database that migrations run against.
pub trait Engine {
    /// The SQL dialect of this database.
    fn dialect(&self) -> Dialect;

    /// The server's version, for people and backups.
    fn server_version(&mut self) -> Result<String, Error>;

    /// The applied revisions; empty when the bookkeeping table does not exist yet.
    fn applied(&mut self) -> Result<Vec<AppliedRevision>, Error>;

    /// Takes the migration lock, waiting at most `timeout`, and creates the bookkeeping
    /// table when it is missing. Fails with [`Error::Locked`] naming the holder.
    fn lock(&mut self, timeout: Duration) -> Result<(), Error>;

    /// Releases the lock. Revisions run under it stay applied.
    fn unlock(&mut self) -> Result<(), Error>;

    /// Runs one step and its bookkeeping in one transaction (unless the revision is
    /// `no-transaction`); returns how long the statements took.
    fn execute(&mut self, step: &Step<'_>) -> Result<Duration, Error>;

    /// What the steps run since the last call printed, line by line: an external tool's
    /// output (upshift's own engines print nothing).
    fn take_output(&mut self) -> Vec<String> {
        Vec::new()
    }
}

/// Opens the engine for `url`. With `create` false a missing SQLite file is not created
/// (read-only commands must not leave files behind).
pub fn connect(url: &DatabaseUrl, create: bool) -> Result<Box<dyn Engine>, Error> {
    Ok(match url {
        DatabaseUrl::Sqlite { path } => Box::new(SqliteEngine::open(path, create)?),
        DatabaseUrl::Postgres { config, redacted, .. } => Box::new(PostgresEngine::connect(config, redacted)?),
    })
}

/// Milliseconds of `duration`, saturating.
pub(crate) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
