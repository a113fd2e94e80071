//! The SQLite engine (rusqlite, SQLite bundled).
//!
//! The lock is SQLite's own write lock: `lock` opens a `BEGIN IMMEDIATE` transaction that
//! lasts the whole run, so a second run waits (busy timeout) until the first commits.
//! Each revision runs inside a `SAVEPOINT` together with its bookkeeping row: a failing
//! revision is rolled back to its savepoint, and `unlock` commits the ones before it. A
//! `no-transaction` revision commits what came before, runs in autocommit mode, and takes
//! the write lock again for its bookkeeping row; between those, another run could take the
//! lock (accepted: such revisions are rare in SQLite, where only `VACUUM` and a few pragmas
//! need it).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, OpenFlags, params};

use super::{AppliedRevision, Direction, Engine, Step, TABLE, millis, table_ddl};
use crate::error::Error;
use crate::lexer::Dialect;

/// The rows whose foreign keys point nowhere after a revision, said for people; `None`
/// when there are none.
fn foreign_key_violations(connection: &Connection) -> Result<Option<String>, Error> {
    let read = || -> rusqlite::Result<Vec<(String, Option<i64>, String)>> {
        let mut statement = connection.prepare("PRAGMA foreign_key_check")?;
        statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?.take(10).collect()
    };
    let rows = read().map_err(|e| Error::database("check foreign keys", e))?;
    if rows.is_empty() {
        return Ok(None);
    }
    let listed: Vec<String> = rows
        .iter()
        .map(|(table, rowid, parent)| {
            format!(
                "{table} rowid {} references a missing row of {parent}",
                rowid.map_or("?".into(), |r| r.to_string())
            )
        })
        .collect();
    Ok(Some(format!(
        "the revision leaves foreign keys pointing nowhere (PRAGMA foreign_key_check): {}",
        listed.join("; ")
    )))
}

/// A SQLite database file.
pub struct SqliteEngine {
    path: PathBuf,
    /// `None` when the file does not exist and was not to be created.
    connection: Option<Connection>,
}

impl SqliteEngine {
    /// Opens `path`, creating it only when `create` is set.
    pub fn open(path: &Path, create: bool) -> Result<SqliteEngine, Error> {
        if !create && !path.exists() {
            return Ok(SqliteEngine { path: path.to_path_buf(), connection: None });
        }
        let mut flags =
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
        if create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let connection = Connection::open_with_flags(path, flags)
            .map_err(|e| Error::Connect { url: format!("sqlite:{}", path.display()), source: Box::new(e) })?;
        Ok(SqliteEngine { path: path.to_path_buf(), connection: Some(connection) })
    }

    /// The open connection. Only read-only commands open without `create`, and they stop
    /// at [`Engine::applied`], which handles a missing file itself.
    fn connection(&mut self) -> Result<&mut Connection, Error> {
        let path = &self.path;
        self.connection.as_mut().ok_or_else(|| Error::Connect {
            url: format!("sqlite:{}", path.display()),
            source: "the database file does not exist".into(),
        })
    }

    fn begin_immediate(&mut self, timeout: Duration) -> Result<(), Error> {
        let path = self.path.clone();
        let connection = self.connection()?;
        connection.busy_timeout(timeout).map_err(|e| Error::database("set the SQLite busy timeout", e))?;
        match connection.execute_batch("BEGIN IMMEDIATE") {
            Ok(()) => Ok(()),
            Err(e) if e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy) => Err(Error::Locked {
                holder: format!("another process is writing to {}; SQLite does not say which", path.display()),
                waited: timeout,
            }),
            Err(e) => Err(Error::database("lock the SQLite database", e)),
        }
    }
}

/// Runs a statement to completion, whatever it returns.
fn run(connection: &Connection, sql: &str) -> rusqlite::Result<()> {
    let mut statement = connection.prepare(sql)?;
    let mut rows = statement.raw_query();
    while rows.next()?.is_some() {}
    Ok(())
}

fn bookkeeping(connection: &Connection, step: &Step<'_>, duration: Duration) -> rusqlite::Result<()> {
    let revision = step.revision;
    match step.direction {
        Direction::Up => connection
            .execute(
                &format!(
                    "INSERT INTO {TABLE} (revision, name, checksum, phase, applied_at, duration_ms) \
                     VALUES (?1, ?2, ?3, ?4, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), ?5)"
                ),
                params![revision.id, revision.name, revision.checksum, revision.phase.as_str(), millis(duration)],
            )
            .map(drop),
        Direction::Down => {
            connection.execute(&format!("DELETE FROM {TABLE} WHERE revision = ?1"), params![revision.id]).map(drop)
        }
    }
}

impl Engine for SqliteEngine {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn server_version(&mut self) -> Result<String, Error> {
        Ok(rusqlite::version().to_owned())
    }

    fn applied(&mut self) -> Result<Vec<AppliedRevision>, Error> {
        let Some(connection) = &self.connection else {
            return Ok(Vec::new());
        };
        let read = || -> rusqlite::Result<Vec<AppliedRevision>> {
            let exists: bool = connection.query_row(
                "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [TABLE],
                |row| row.get(0),
            )?;
            if !exists {
                return Ok(Vec::new());
            }
            let mut statement = connection
                .prepare(&format!("SELECT revision, checksum, phase, applied_at, duration_ms FROM {TABLE}"))?;
            statement
                .query_map([], |row| {
                    Ok(AppliedRevision {
                        id: row.get(0)?,
                        checksum: row.get(1)?,
                        phase: row.get(2)?,
                        applied_at: row.get(3)?,
                        duration_ms: row.get(4)?,
                    })
                })?
                .collect()
        };
        read().map_err(|e| Error::database(format!("read {TABLE}"), e))
    }

    fn lock(&mut self, timeout: Duration) -> Result<(), Error> {
        // SQLite's documented procedure for schema changes: foreign keys off for the run
        // (the pragma does nothing inside a transaction, and rusqlite's SQLite turns them
        // on by default), then `foreign_key_check` before each revision is kept.
        self.connection()?
            .execute_batch("PRAGMA foreign_keys = OFF")
            .map_err(|e| Error::database("turn foreign keys off for the migration", e))?;
        self.begin_immediate(timeout)?;
        self.connection()?
            .execute_batch(&table_ddl(Dialect::Sqlite))
            .map_err(|e| Error::database(format!("create {TABLE}"), e))
    }

    fn unlock(&mut self) -> Result<(), Error> {
        let connection = self.connection()?;
        if connection.is_autocommit() {
            return Ok(());
        }
        connection.execute_batch("COMMIT").map_err(|e| Error::database("commit", e))
    }

    fn execute(&mut self, step: &Step<'_>) -> Result<Duration, Error> {
        if step.no_transaction() {
            self.connection()?.execute_batch("COMMIT").map_err(|e| Error::database("commit", e))?;
            let started = Instant::now();
            for (index, statement) in step.statements.iter().enumerate() {
                run(self.connection()?, &statement.sql).map_err(|e| step.failed(index, e.to_string()))?;
            }
            if let Some(broken) = foreign_key_violations(self.connection()?)? {
                return Err(step.failed(step.statements.len().saturating_sub(1), broken));
            }
            let duration = started.elapsed();
            self.begin_immediate(Duration::from_mins(1))?;
            bookkeeping(self.connection()?, step, duration)
                .map_err(|e| Error::database(format!("record {}", step.revision.id), e))?;
            return Ok(duration);
        }
        let connection = self.connection()?;
        connection.execute_batch("SAVEPOINT upshift_revision").map_err(|e| Error::database("open a savepoint", e))?;
        let started = Instant::now();
        let result = step
            .statements
            .iter()
            .enumerate()
            .try_for_each(|(index, statement)| {
                run(connection, &statement.sql).map_err(|e| step.failed(index, e.to_string()))
            })
            .and_then(|()| match foreign_key_violations(connection)? {
                Some(broken) => Err(step.failed(step.statements.len().saturating_sub(1), broken)),
                None => Ok(()),
            })
            .and_then(|()| {
                bookkeeping(connection, step, started.elapsed())
                    .map_err(|e| Error::database(format!("record {}", step.revision.id), e))
            });
        match result {
            Ok(()) => {
                connection
                    .execute_batch("RELEASE upshift_revision")
                    .map_err(|e| Error::database("release the savepoint", e))?;
                Ok(started.elapsed())
            }
            Err(error) => {
                connection
                    .execute_batch("ROLLBACK TO upshift_revision; RELEASE upshift_revision")
                    .map_err(|e| Error::database("roll back the failed revision", e))?;
                Err(error)
            }
        }
    }
}
