//! The journal: a SQLite file in the state dir recording release revisions (and, with the
//! runner, every run and step).
//!
//! This module reads what the plan needs: the deployed release. The runner writes it.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

/// The journal's file name in the state dir.
pub const FILE: &str = "journal.db";

/// The release revisions, like `helm history`: one row per release attempt.
pub const RELEASES_TABLE: &str = "CREATE TABLE IF NOT EXISTS releases (
    revision INTEGER PRIMARY KEY,
    version TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('deployed', 'superseded', 'failed', 'rolled-back')),
    started_at TEXT NOT NULL,
    finished_at TEXT
)";

/// The deployed release's version, or `None` when nothing was deployed (no journal yet).
pub fn deployed_version(state_dir: &Path) -> Result<Option<semver::Version>, String> {
    let path = state_dir.join(FILE);
    if !path.exists() {
        return Ok(None);
    }
    let read = || -> rusqlite::Result<Option<String>> {
        let connection = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let has_releases: bool = connection.query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'releases'",
            [],
            |row| row.get(0),
        )?;
        if !has_releases {
            return Ok(None);
        }
        connection
            .query_row(
                "SELECT version FROM releases WHERE status = 'deployed' ORDER BY revision DESC LIMIT 1",
                [],
                |row| row.get(0),
            )
            .optional()
    };
    let version = read().map_err(|e| format!("the journal {} cannot be read: {e}", path.display()))?;
    version
        .map(|v| {
            v.parse()
                .map_err(|e| format!("the journal {} records version `{v}`, which is not semver: {e}", path.display()))
        })
        .transpose()
}
