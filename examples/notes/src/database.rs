//! The database behind the service: SQLite or PostgreSQL behind one small API, with a pool
//! of idle connections shared by the connection threads.
//!
//! Every query is gated on the release's [`Schema`]: a 2.0.0 process never names
//! `notes.title`, so it keeps working after the contract migration drops it, and a 1.0.0
//! process never names `tags`, so it keeps working after 2.0.0's expand migration.
//!
//! Ids are assigned here, not by the database: `max(id) + 1` inside a transaction that holds
//! the table's write lock (SQLite `BEGIN IMMEDIATE`, PostgreSQL `LOCK TABLE ... SHARE ROW
//! EXCLUSIVE`), because no auto-increment syntax is valid on both engines. Concurrent
//! inserts, from one process or from an old and a new release during a switch, queue on that
//! lock instead of colliding.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{OpenFlags, TransactionBehavior};

use crate::release::Schema;

/// How long a statement waits for another connection's lock (SQLite) or for a server to
/// answer a connection attempt (PostgreSQL).
const WAIT: Duration = Duration::from_secs(5);
/// Idle connections kept for reuse; more are opened under load and closed after.
const MAX_IDLE: usize = 16;

/// A parsed database URL. Its `Display` never shows a password.
#[derive(Clone)]
pub enum DatabaseUrl {
    /// `sqlite:PATH` or `sqlite://PATH`.
    Sqlite {
        /// The database file; it must exist (the migrations create it).
        path: PathBuf,
    },
    /// `postgres://...` or `postgresql://...`, with `sslmode` and its settings like libpq.
    Postgres {
        /// Connection settings, TLS included.
        config: Box<upshift_postgres::Config>,
        /// The URL with its password replaced by `***`.
        redacted: String,
    },
}

impl DatabaseUrl {
    /// Reads a URL; the error says what was expected.
    pub fn parse(url: &str) -> Result<DatabaseUrl, String> {
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            let path = path.split_once('?').map_or(path, |(path, _)| path);
            if path.is_empty() {
                return Err(format!("database URL `{url}` has no file path: expected sqlite:PATH"));
            }
            return Ok(DatabaseUrl::Sqlite { path: PathBuf::from(path) });
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let redacted = redact(url);
            let mut config = upshift_postgres::Config::parse(url, |name| std::env::var(name).ok()).map_err(|e| {
                format!("database URL `{redacted}` is not valid: {e}; expected postgres://user:pass@host:port/db")
            })?;
            if config.get_connect_timeout().is_none() {
                config.connect_timeout(WAIT);
            }
            if config.get_application_name().is_none() {
                config.application_name("notes");
            }
            return Ok(DatabaseUrl::Postgres { config: Box::new(config), redacted });
        }
        Err(format!(
            "database URL `{}` has an unknown scheme: expected sqlite:PATH, sqlite://PATH, postgres://user:pass@host:port/db or postgresql://...",
            redact(url)
        ))
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseUrl::Sqlite { path } => write!(f, "sqlite:{}", path.display()),
            DatabaseUrl::Postgres { redacted, .. } => f.write_str(redacted),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Replaces the password of `scheme://user:pass@host` with `***`.
fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else { return url.to_owned() };
    let start = scheme_end + 3;
    let end = url[start..].find(['/', '?']).map_or(url.len(), |i| start + i);
    let Some(at) = url[start..end].rfind('@') else { return url.to_owned() };
    let user_info = &url[start..start + at];
    match user_info.split_once(':') {
        Some((user, _)) => format!("{}{user}:***{}", &url[..start], &url[start + at..]),
        None => url.to_owned(),
    }
}

/// Why a query failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DatabaseError {
    /// The SQLite file could not be opened.
    #[error("cannot open the SQLite database {path}: {source} (the file must exist: run the migrations first)")]
    Open {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// A SQLite statement failed.
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A PostgreSQL connection or statement failed.
    #[error("PostgreSQL: {}", describe_postgres(.0))]
    Postgres(#[from] postgres::Error),
    /// A PostgreSQL connection could not be made (the sslmode asked for, why, the fix).
    #[error("PostgreSQL: {0}")]
    Connect(#[from] upshift_postgres::ConnectError),
}

/// The server's message (`postgres::Error` alone displays only "db error"), or the client's
/// error with its cause (`error connecting to server: Connection refused`).
fn describe_postgres(error: &postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    match std::error::Error::source(error) {
        Some(source) if !error.to_string().contains(&source.to_string()) => format!("{error}: {source}"),
        _ => error.to_string(),
    }
}

/// A note as the API shows it; which fields are present depends on the release.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Note {
    pub(crate) id: i64,
    /// Only for releases that use titles.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) title: Option<String>,
    pub(crate) body: String,
    /// Only for releases that use tags; sorted, without duplicates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) tags: Option<Vec<String>>,
}

/// What a client asks to create, already checked against the release's schema.
#[derive(Debug)]
pub(crate) enum NewNote {
    /// A 1.0.0 note.
    Titled { title: String, body: String },
    /// A 2.0.0 note; `tags` sorted, without duplicates.
    Tagged { body: String, tags: Vec<String> },
}

/// The database and its idle connections.
pub(crate) struct Database {
    url: DatabaseUrl,
    idle: Mutex<Vec<Connection>>,
}

enum Connection {
    Sqlite(rusqlite::Connection),
    Postgres(postgres::Client),
}

impl Database {
    /// Connects lazily: nothing is opened until the first request.
    pub(crate) fn new(url: DatabaseUrl) -> Database {
        Database { url, idle: Mutex::new(Vec::new()) }
    }

    /// Runs one query that needs every table and column `schema` uses: the health check.
    pub(crate) fn check(&self, schema: Schema) -> Result<(), DatabaseError> {
        self.with_connection(|connection| match connection {
            Connection::Sqlite(db) => {
                for sql in check_queries(schema) {
                    db.prepare(sql)?.query([])?.next()?;
                }
                Ok(())
            }
            Connection::Postgres(client) => {
                for sql in check_queries(schema) {
                    client.query(*sql, &[])?;
                }
                Ok(())
            }
        })
    }

    /// Every note, ordered by id.
    pub(crate) fn list(&self, schema: Schema) -> Result<Vec<Note>, DatabaseError> {
        self.with_connection(|connection| match (connection, schema) {
            (Connection::Sqlite(db), Schema::Titles) => {
                let mut statement = db.prepare_cached("SELECT id, title, body FROM notes ORDER BY id")?;
                let rows = statement.query_map([], |row| {
                    Ok(Note { id: row.get(0)?, title: Some(row.get(1)?), body: row.get(2)?, tags: None })
                })?;
                Ok(rows.collect::<Result<_, _>>()?)
            }
            (Connection::Sqlite(db), Schema::Tags) => {
                let mut statement = db.prepare_cached("SELECT id, body FROM notes ORDER BY id")?;
                let notes = statement
                    .query_map([], |row| Ok(Note { id: row.get(0)?, title: None, body: row.get(1)?, tags: None }))?
                    .collect::<Result<Vec<_>, _>>()?;
                let mut statement = db.prepare_cached("SELECT note_id, name FROM tags ORDER BY note_id, name")?;
                let tags =
                    statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?.collect::<Result<Vec<_>, _>>()?;
                Ok(attach_tags(notes, tags))
            }
            (Connection::Postgres(client), Schema::Titles) => Ok(client
                .query("SELECT id, title, body FROM notes ORDER BY id", &[])?
                .iter()
                .map(|row| Note { id: row.get(0), title: Some(row.get(1)), body: row.get(2), tags: None })
                .collect()),
            (Connection::Postgres(client), Schema::Tags) => {
                let notes = client
                    .query("SELECT id, body FROM notes ORDER BY id", &[])?
                    .iter()
                    .map(|row| Note { id: row.get(0), title: None, body: row.get(1), tags: None })
                    .collect();
                let tags = client
                    .query("SELECT note_id, name FROM tags ORDER BY note_id, name", &[])?
                    .iter()
                    .map(|row| (row.get(0), row.get(1)))
                    .collect();
                Ok(attach_tags(notes, tags))
            }
        })
    }

    /// Inserts a note (and its tags) in one transaction and returns it as stored.
    pub(crate) fn create(&self, note: &NewNote) -> Result<Note, DatabaseError> {
        self.with_connection(|connection| match connection {
            Connection::Sqlite(db) => {
                // IMMEDIATE takes the write lock now, so max(id) cannot change before the insert.
                let transaction = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let id: i64 = transaction.query_row(NEXT_ID, [], |row| row.get(0))?;
                match note {
                    NewNote::Titled { title, body } => {
                        transaction.execute(
                            "INSERT INTO notes (id, title, body) VALUES (?1, ?2, ?3)",
                            rusqlite::params![id, title, body],
                        )?;
                    }
                    NewNote::Tagged { body, tags } => {
                        transaction
                            .execute("INSERT INTO notes (id, body) VALUES (?1, ?2)", rusqlite::params![id, body])?;
                        let mut insert = transaction.prepare("INSERT INTO tags (note_id, name) VALUES (?1, ?2)")?;
                        for tag in tags {
                            insert.execute(rusqlite::params![id, tag])?;
                        }
                    }
                }
                transaction.commit()?;
                Ok(note.stored(id))
            }
            Connection::Postgres(client) => {
                let mut transaction = client.transaction()?;
                // SHARE ROW EXCLUSIVE conflicts with itself (and with writes) but not with reads.
                transaction.batch_execute("LOCK TABLE notes IN SHARE ROW EXCLUSIVE MODE")?;
                let id: i64 = transaction.query_one(NEXT_ID, &[])?.get(0);
                match note {
                    NewNote::Titled { title, body } => {
                        transaction
                            .execute("INSERT INTO notes (id, title, body) VALUES ($1, $2, $3)", &[&id, title, body])?;
                    }
                    NewNote::Tagged { body, tags } => {
                        transaction.execute("INSERT INTO notes (id, body) VALUES ($1, $2)", &[&id, body])?;
                        for tag in tags {
                            transaction.execute("INSERT INTO tags (note_id, name) VALUES ($1, $2)", &[&id, tag])?;
                        }
                    }
                }
                transaction.commit()?;
                Ok(note.stored(id))
            }
        })
    }

    /// Runs `work` on an idle connection, or a new one. A connection goes back to the pool
    /// only when `work` succeeded: after an error it may be broken (server restarted,
    /// transaction aborted), and opening a new one is cheap enough for this service.
    fn with_connection<T>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, DatabaseError>,
    ) -> Result<T, DatabaseError> {
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let mut connection = match idle {
            Some(connection) => connection,
            None => self.connect()?,
        };
        let result = work(&mut connection)?;
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(connection);
        }
        Ok(result)
    }

    fn connect(&self) -> Result<Connection, DatabaseError> {
        match &self.url {
            DatabaseUrl::Sqlite { path } => {
                // No CREATE flag: an absent file means the migrations have not run, and
                // creating an empty one would hide that.
                let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
                let db = rusqlite::Connection::open_with_flags(path, flags)
                    .map_err(|source| DatabaseError::Open { path: path.clone(), source })?;
                db.busy_timeout(WAIT)?;
                db.pragma_update(None, "foreign_keys", true)?;
                Ok(Connection::Sqlite(db))
            }
            DatabaseUrl::Postgres { config, .. } => Ok(Connection::Postgres(config.connect()?)),
        }
    }
}

const NEXT_ID: &str = "SELECT coalesce(max(id), 0) + 1 FROM notes";

fn check_queries(schema: Schema) -> &'static [&'static str] {
    match schema {
        Schema::Titles => &["SELECT id, title, body FROM notes LIMIT 1"],
        Schema::Tags => &["SELECT id, body FROM notes LIMIT 1", "SELECT note_id, name FROM tags LIMIT 1"],
    }
}

impl NewNote {
    fn stored(&self, id: i64) -> Note {
        match self {
            NewNote::Titled { title, body } => Note { id, title: Some(title.clone()), body: body.clone(), tags: None },
            NewNote::Tagged { body, tags } => Note { id, title: None, body: body.clone(), tags: Some(tags.clone()) },
        }
    }
}

/// Gives each note its tags (every note of a tagged release has a list, maybe empty).
fn attach_tags(mut notes: Vec<Note>, tags: Vec<(i64, String)>) -> Vec<Note> {
    let index: HashMap<i64, usize> = notes.iter().enumerate().map(|(i, note)| (note.id, i)).collect();
    for note in &mut notes {
        note.tags = Some(Vec::new());
    }
    for (note_id, name) in tags {
        // A note inserted between the two queries is not listed: its tags are skipped too.
        if let Some(&i) = index.get(&note_id) {
            notes[i].tags.get_or_insert_with(Vec::new).push(name);
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_hides_passwords() {
        assert_eq!(DatabaseUrl::parse("sqlite:/tmp/a.db").unwrap().to_string(), "sqlite:/tmp/a.db");
        assert_eq!(DatabaseUrl::parse("sqlite:///tmp/a.db?mode=rw").unwrap().to_string(), "sqlite:/tmp/a.db");
        assert_eq!(DatabaseUrl::parse("sqlite://a.db").unwrap().to_string(), "sqlite:a.db");
        assert!(DatabaseUrl::parse("sqlite:").is_err());
        let url = DatabaseUrl::parse("postgres://app:secret@localhost:5432/notes").unwrap();
        assert_eq!(url.to_string(), "postgres://app:***@localhost:5432/notes");
        assert!(DatabaseUrl::parse("postgresql://localhost/notes").is_ok());
        let error = DatabaseUrl::parse("mysql://root:secret@x/db").unwrap_err();
        assert!(error.contains("unknown scheme") && !error.contains("secret"), "{error}");
    }

    #[test]
    fn attaches_tags_to_their_notes() {
        let note = |id| Note { id, title: None, body: String::new(), tags: None };
        let notes = attach_tags(vec![note(1), note(2)], vec![(1, "a".into()), (1, "b".into()), (3, "c".into())]);
        assert_eq!(notes[0].tags.as_deref(), Some(&["a".to_owned(), "b".to_owned()][..]));
        assert_eq!(notes[1].tags.as_deref(), Some(&[][..]));
    }
}
