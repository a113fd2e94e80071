//! The PostgreSQL engine (the `postgres` client, the blocking face of tokio-postgres).
//!
//! The lock is a session-level advisory lock on a fixed key, taken with `lock_timeout` so
//! the wait is bounded; when it times out, `pg_locks` joined with `pg_stat_activity` names
//! the holder (pid, `application_name`, since when). Each revision runs in its own
//! transaction with its bookkeeping row; `no-transaction` revisions run statement by
//! statement in autocommit mode, as `CREATE INDEX CONCURRENTLY` requires.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::{Client, GenericClient};
use upshift_postgres::Config;

use super::{AppliedRevision, Direction, Engine, Step, TABLE, millis, table_ddl};
use crate::error::Error;
use crate::lexer::Dialect;

/// The advisory lock key: "upshmigr" read as a big-endian integer.
const LOCK_KEY: i64 = 0x7570_7368_6d69_6772;

/// A PostgreSQL database.
pub struct PostgresEngine {
    client: Client,
}

impl PostgresEngine {
    /// Connects; the session's `application_name` says it is upshift, so the holder of the
    /// lock can be named to a waiting run.
    pub fn connect(config: &Config, redacted_url: &str) -> Result<PostgresEngine, Error> {
        let mut config = config.clone();
        if config.get_application_name().is_none() {
            config.application_name(&format!("upshift migrate (pid {})", std::process::id()));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        let client =
            config.connect().map_err(|e| Error::Connect { url: redacted_url.to_owned(), source: Box::new(e) })?;
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
    pub(crate) fn client(&mut self) -> &mut Client {
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

fn bookkeeping(client: &mut impl GenericClient, step: &Step<'_>, duration: Duration) -> Result<(), postgres::Error> {
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

/// Runs the step's statements on `client`; returns the index of the failing one.
fn run_statements(client: &mut impl GenericClient, step: &Step<'_>) -> Result<(), Error> {
    for (index, statement) in step.statements.iter().enumerate() {
        client.batch_execute(&statement.sql).map_err(|e| step.failed(index, message(&e)))?;
    }
    Ok(())
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
        let mut transaction = self.client.transaction().map_err(|e| Error::database("begin a transaction", e))?;
        // On any error the transaction is dropped, which rolls it back.
        run_statements(&mut transaction, step)?;
        let duration = started.elapsed();
        bookkeeping(&mut transaction, step, duration).map_err(record_error)?;
        transaction.commit().map_err(|e| step.failed(step.statements.len().saturating_sub(1), message(&e)))?;
        Ok(duration)
    }
}
