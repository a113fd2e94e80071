//! SQLite: copied with the online backup API, consistent while other processes write, and
//! restored the same way into the target, which makes the restore one transaction there.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use crate::artifact::{self, Codec, FileEntry, Identities};
use crate::error::Error;
use crate::manifest::{DatabaseInfo, EngineKind};

/// The artifact's name inside a backup.
pub(crate) const ARTIFACT: &str = "db/database.sqlite.zst";

fn db_error(action: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> Error {
    let action = action.into();
    move |e| Error::database(action, e)
}

/// Copies every page of `source` into `dest` in one step: one read transaction on the
/// source (a consistent snapshot) and one write transaction on the destination.
fn copy_all(source: &Connection, dest: &mut Connection, timeout: Duration) -> Result<(), Error> {
    let backup = Backup::new(source, dest).map_err(db_error("start the SQLite backup"))?;
    let started = Instant::now();
    loop {
        match backup.step(-1).map_err(db_error("copy the SQLite database"))? {
            StepResult::Done => return Ok(()),
            StepResult::More | StepResult::Busy | StepResult::Locked if started.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {
                return Err(Error::Usage(format!(
                    "the SQLite database stayed locked for {}; try again when the writer is done",
                    humantime::format_duration(timeout)
                )));
            }
        }
    }
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// Rows per user table.
pub(crate) fn row_counts(connection: &Connection) -> Result<BTreeMap<String, i64>, Error> {
    let read = || -> rusqlite::Result<BTreeMap<String, i64>> {
        let mut statement =
            connection.prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")?;
        let tables: Vec<String> = statement.query_map([], |row| row.get(0))?.collect::<Result<_, _>>()?;
        tables
            .into_iter()
            .map(|table| {
                let count =
                    connection.query_row(&format!("SELECT count(*) FROM {}", quote(&table)), [], |r| r.get(0))?;
                Ok((table, count))
            })
            .collect()
    };
    read().map_err(db_error("count rows"))
}

fn integrity_check(connection: &Connection) -> Result<(), String> {
    let result: String = connection
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .map_err(|e| format!("PRAGMA integrity_check failed: {e}"))?;
    if result == "ok" { Ok(()) } else { Err(format!("PRAGMA integrity_check says: {result}")) }
}

/// Backs up the SQLite file at `path` into the backup folder `dir`.
pub(crate) fn dump(path: &Path, dir: &Path, codec: &Codec) -> Result<(FileEntry, DatabaseInfo), Error> {
    let source = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(db_error(format!("open {}", path.display())))?;
    codec.phase("copying the SQLite database", None);
    let copy_path = dir.join("database.sqlite.copy");
    let mut copy = Connection::open(&copy_path).map_err(db_error("create the copy"))?;
    copy_all(&source, &mut copy, Duration::from_mins(1))?;
    let row_counts = row_counts(&copy)?;
    drop(copy);
    let mut file = File::open(&copy_path).map_err(Error::io("read", &copy_path))?;
    codec.phase("compressing", file.metadata().ok().map(|m| m.len()));
    let entry = artifact::write_compressed(&mut file, dir, ARTIFACT, codec)?;
    std::fs::remove_file(&copy_path).map_err(Error::io("remove", &copy_path))?;
    let info = DatabaseInfo {
        engine: EngineKind::Sqlite,
        name: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        server_version: rusqlite::version().to_owned(),
        server_major: None,
        pg_dump_version: None,
        extensions: Vec::new(),
        roles_saved: false,
        row_counts,
    };
    Ok((entry, info))
}

/// A decompressed copy in a temp file that passed `PRAGMA integrity_check`.
pub(crate) struct Unpacked {
    pub(crate) connection: Connection,
    _file: tempfile::TempPath,
}

/// Decompresses the backup's database next to `near` (same filesystem) and checks it.
pub(crate) fn unpack(
    backup_dir: &Path,
    entry: &FileEntry,
    near: &Path,
    identities: Option<&Identities>,
) -> Result<Unpacked, String> {
    let folder =
        near.parent().filter(|p| !p.as_os_str().is_empty()).map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let temp = tempfile::Builder::new()
        .prefix(".upshift-restore-")
        .tempfile_in(&folder)
        .map_err(|e| format!("could not make a temp file in {}: {e}", folder.display()))?
        .into_temp_path();
    std::fs::remove_file(&temp).map_err(|e| e.to_string())?;
    artifact::decompress_to_file(backup_dir, entry, identities, &temp, artifact::Fsync::Durable)?;
    let connection = Connection::open(&temp).map_err(|e| format!("the copy does not open: {e}"))?;
    integrity_check(&connection)?;
    Ok(Unpacked { connection, _file: temp })
}

/// Whether the database has any user table.
fn has_tables(connection: &Connection) -> Result<bool, Error> {
    connection
        .query_row("SELECT count(*) > 0 FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'", [], |r| r.get(0))
        .map_err(db_error("look into the target"))
}

/// Refuses a target that holds tables, unless `force`. A missing target is fine.
pub(crate) fn check_target(target: &Path, force: bool) -> Result<(), Error> {
    if force || !target.exists() {
        return Ok(());
    }
    let connection = Connection::open_with_flags(target, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(db_error(format!("open {}", target.display())))?;
    if has_tables(&connection)? {
        return Err(Error::NotEmpty { target: format!("sqlite:{}", target.display()) });
    }
    Ok(())
}

/// Replaces `target` with the unpacked copy, in one transaction on the target: a restore
/// that stops halfway leaves it as it was.
pub(crate) fn restore(unpacked: &Unpacked, target: &Path) -> Result<(), Error> {
    let mut connection = Connection::open(target).map_err(db_error(format!("open {}", target.display())))?;
    copy_all(&unpacked.connection, &mut connection, Duration::from_mins(1))
}
