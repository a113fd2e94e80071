//! The PostgreSQL engine (the `postgres` client, the blocking face of tokio-postgres).
//!
//! The lock is a session-level advisory lock on a fixed key, taken with `lock_timeout` so
//! the wait is bounded; when it times out, `pg_locks` joined with `pg_stat_activity` names
//! the holder (pid, `application_name`, since when). Each revision runs in its own
//! transaction with its bookkeeping row, sent as one simple query (`BEGIN`, the statements,
//! the row, `COMMIT`): one round trip per revision. `no-transaction` revisions run
//! statement by statement in autocommit mode, as `CREATE INDEX CONCURRENTLY` requires.

use std::cmp::Ordering;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use postgres::error::{ErrorPosition, SqlState};
use upshift_postgres::{BatchError, Config, Session};

use super::{AppliedRevision, Direction, Engine, Step, TABLE, millis, table_ddl};
use crate::error::Error;
use crate::lexer::Dialect;

/// The advisory lock key: "upshmigr" read as a big-endian integer.
const LOCK_KEY: i64 = 0x7570_7368_6d69_6772;

/// A PostgreSQL database.
pub struct PostgresEngine {
    client: Session,
}

impl PostgresEngine {
    /// Connects; the session's `application_name` says it is upshift, so the holder of the
    /// lock can be named to a waiting run.
    pub fn connect(config: &Config, redacted_url: &str) -> Result<PostgresEngine, Error> {
        let mut config = config.clone();
        if config.get_application_name().is_none() {
            config.application_name(format!("upshift migrate (pid {})", std::process::id()));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        let client = Session::connect(&config)
            .map_err(|e| Error::Connect { url: redacted_url.to_owned(), source: Box::new(e) })?;
        Ok(PostgresEngine { client })
    }

    /// Takes the migration lock (a session advisory lock), waiting at most `timeout`.
    pub(crate) fn advisory_lock(&mut self, timeout: Duration) -> Result<(), Error> {
        let acquired = if timeout.is_zero() {
            self.client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK_KEY])
                .map_err(|e| Error::database("take the advisory lock", e))?
                .get::<_, bool>(0)
        } else {
            self.client
                .batch_execute(&format!("SET lock_timeout = {}", timeout.as_millis().max(1)))
                .map_err(|e| Error::database("set lock_timeout", e))?;
            let result = self.client.execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY]);
            self.client.batch_execute("RESET lock_timeout").map_err(|e| Error::database("reset lock_timeout", e))?;
            match result {
                Ok(_) => true,
                Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => false,
                Err(e) => return Err(Error::database("take the advisory lock", e)),
            }
        };
        if !acquired {
            return Err(Error::Locked { holder: self.lock_holder(), waited: timeout });
        }
        Ok(())
    }

    /// The connection, for an external tool's bookkeeping (`alembic_version`).
    pub(crate) fn client(&mut self) -> &mut Session {
        &mut self.client
    }

    /// Who holds the migration lock, for the message of a run that waited.
    fn lock_holder(&mut self) -> String {
        let row = self.client.query_opt(
            "SELECT a.pid, coalesce(a.application_name, ''), coalesce(a.client_addr::text, 'local'), \
                    to_char(a.backend_start, 'YYYY-MM-DD HH24:MI:SS TZ') \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND l.classid::bigint = $1 AND l.objid::bigint = $2 AND l.objsubid = 1 \
             LIMIT 1",
            &[&(LOCK_KEY >> 32), &(LOCK_KEY & 0xffff_ffff)],
        );
        match row {
            Ok(Some(row)) => format!(
                "held by pid {} application_name {:?} from {} connected since {}",
                row.get::<_, i32>(0),
                row.get::<_, String>(1),
                row.get::<_, String>(2),
                row.get::<_, String>(3)
            ),
            Ok(None) => "the holder has just let go".to_owned(),
            Err(e) => format!("the holder could not be read: {}", message(&e)),
        }
    }
}

/// The server's message with its detail and hint, as a person needs it (`postgres::Error`
/// alone prints only "db error").
pub fn message(error: &postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => {
            let mut text = format!("{}: {}", db.severity(), db.message());
            if let Some(detail) = db.detail() {
                let _ = write!(text, "\nDETAIL: {detail}");
            }
            if let Some(hint) = db.hint() {
                let _ = write!(text, "\nHINT: {hint}");
            }
            text
        }
        None => error.to_string(),
    }
}

fn bookkeeping(client: &mut Session, step: &Step<'_>, duration: Duration) -> Result<(), postgres::Error> {
    let revision = step.revision;
    match step.direction {
        Direction::Up => client.execute(
            &format!(
                "INSERT INTO {TABLE} (revision, name, checksum, phase, applied_at, duration_ms) \
                 VALUES ($1, $2, $3, $4, clock_timestamp(), $5)"
            ),
            &[&revision.id, &revision.name, &revision.checksum, &revision.phase.as_str(), &millis(duration)],
        ),
        Direction::Down => client.execute(&format!("DELETE FROM {TABLE} WHERE revision = $1"), &[&revision.id]),
    }
    .map(drop)
}

/// Runs the step's statements one by one, each committing on its own.
fn run_statements(client: &mut Session, step: &Step<'_>) -> Result<(), Error> {
    for (index, statement) in step.statements.iter().enumerate() {
        client.batch_execute(&statement.sql).map_err(|e| step.failed(index, message(&e)))?;
    }
    Ok(())
}

/// `text` as a string literal that means the same whatever `standard_conforming_strings`
/// says (an `E''` string: a revision may have changed the setting).
fn literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

/// One simple query that runs a step in one transaction with its bookkeeping row:
/// `BEGIN`, the statements, the row, `COMMIT`. Returns it with the byte range of each
/// part (`BEGIN` is part 0, the statements 1..=n, the row n + 1, `COMMIT` n + 2), to map an
/// error position back to the statement.
///
/// The explicit `BEGIN` keeps the transaction what it is when the statements are sent one
/// by one: a multi-statement query without it runs as an implicit transaction block, in
/// which `SAVEPOINT` is refused. The row's `duration_ms` is measured by the server: from
/// the arrival of the query (`statement_timestamp()`) to the end of the last statement.
fn transaction_batch(step: &Step<'_>) -> (String, Vec<std::ops::Range<usize>>) {
    let mut batch = String::new();
    let mut parts = Vec::with_capacity(step.statements.len() + 3);
    let mut push = |batch: &mut String, part: &str| {
        let start = batch.len();
        batch.push_str(part);
        parts.push(start..batch.len());
        // A statement may end without `;`, after a line comment: close it on a new line.
        batch.push_str(if part.ends_with(';') { "\n" } else { "\n;\n" });
    };
    push(&mut batch, "BEGIN;");
    for statement in &step.statements {
        push(&mut batch, &statement.sql);
    }
    let revision = step.revision;
    let row = match step.direction {
        Direction::Up => format!(
            "INSERT INTO {TABLE} (revision, name, checksum, phase, applied_at, duration_ms) \
             VALUES ({}, {}, {}, {}, clock_timestamp(), \
             (extract(epoch FROM clock_timestamp() - statement_timestamp()) * 1000)::bigint);",
            literal(&revision.id),
            literal(&revision.name),
            literal(&revision.checksum),
            literal(revision.phase.as_str()),
        ),
        Direction::Down => format!("DELETE FROM {TABLE} WHERE revision = {};", literal(&revision.id)),
    };
    push(&mut batch, &row);
    push(&mut batch, "COMMIT;");
    (batch, parts)
}

/// Which part of a transaction batch failed: the one the error's position points into
/// (a syntax error stops the batch before anything runs), else the one after those the
/// server completed.
fn failed_part(batch: &str, parts: &[std::ops::Range<usize>], failure: &BatchError) -> usize {
    let position = failure.error.as_db_error().and_then(|db| match db.position() {
        // 1-based, in characters.
        Some(ErrorPosition::Original(position)) => usize::try_from(*position).ok(),
        _ => None,
    });
    let offset = position.and_then(|p| batch.char_indices().nth(p.checked_sub(1)?)).map(|(offset, _)| offset);
    // The last part starting at or before the offset: an error at the `;` closing a part
    // belongs to that part.
    match offset.and_then(|offset| parts.iter().rposition(|part| part.start <= offset)) {
        Some(part) => part,
        None => failure.completed,
    }
}

impl Engine for PostgresEngine {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn server_version(&mut self) -> Result<String, Error> {
        let row = self
            .client
            .query_one("SHOW server_version", &[])
            .map_err(|e| Error::database("read the server version", e))?;
        Ok(row.get(0))
    }

    fn applied(&mut self) -> Result<Vec<AppliedRevision>, Error> {
        let exists: bool = self
            .client
            .query_one(&format!("SELECT to_regclass('{TABLE}') IS NOT NULL"), &[])
            .map_err(|e| Error::database(format!("look for {TABLE}"), e))?
            .get(0);
        if !exists {
            return Ok(Vec::new());
        }
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT revision, checksum, phase, \
                            to_char(applied_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), duration_ms \
                     FROM {TABLE}"
                ),
                &[],
            )
            .map_err(|e| Error::database(format!("read {TABLE}"), e))?;
        Ok(rows
            .iter()
            .map(|row| AppliedRevision {
                id: row.get(0),
                checksum: row.get(1),
                phase: row.get(2),
                applied_at: row.get(3),
                duration_ms: row.get(4),
            })
            .collect())
    }

    fn lock(&mut self, timeout: Duration) -> Result<(), Error> {
        self.advisory_lock(timeout)?;
        self.client
            .batch_execute(&table_ddl(Dialect::Postgres))
            .map_err(|e| Error::database(format!("create {TABLE}"), e))
    }

    fn unlock(&mut self) -> Result<(), Error> {
        self.client
            .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
            .map(drop)
            .map_err(|e| Error::database("release the advisory lock", e))
    }

    fn execute(&mut self, step: &Step<'_>) -> Result<Duration, Error> {
        let record_error = |e| Error::database(format!("record {}", step.revision.id), e);
        let started = Instant::now();
        if step.no_transaction() {
            run_statements(&mut self.client, step)?;
            let duration = started.elapsed();
            bookkeeping(&mut self.client, step, duration).map_err(record_error)?;
            return Ok(duration);
        }
        let (batch, parts) = transaction_batch(step);
        let Err(failure) = self.client.simple_batch(&batch) else {
            return Ok(started.elapsed());
        };
        let statements = step.statements.len();
        let part = failed_part(&batch, &parts, &failure);
        // The server skipped the rest of the batch. Unless COMMIT itself failed (which
        // ends the transaction), the transaction is open and failed: roll it back. Should
        // that fail too, the connection is gone, and the server rolls back without it.
        if part <= statements + 1 {
            let _ = self.client.batch_execute("ROLLBACK");
        }
        // Part 0, BEGIN, fails only with the connection or with a parse error the server
        // gave no position for: blame the first statement, as the parse stopped everything.
        let index = part.saturating_sub(1);
        Err(match index.cmp(&statements) {
            Ordering::Less => step.failed(index, message(&failure.error)),
            Ordering::Equal => record_error(failure.error),
            Ordering::Greater => step.failed(statements.saturating_sub(1), message(&failure.error)),
        })
    }
}
