//! `manifest.json`: what a backup holds and how to check it. Never holds a password.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::artifact::FileEntry;

/// The manifest format this version writes and reads.
pub const FORMAT: u32 = 1;

/// Which database engine a backup came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// A SQLite file, copied with the online backup API.
    Sqlite,
    /// A PostgreSQL database, dumped with `pg_dump --format=directory`.
    Postgres,
}

/// An installed extension, recorded so a restore target can be checked by a person.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extension {
    /// `pg_extension.extname`.
    pub name: String,
    /// `pg_extension.extversion`.
    pub version: String,
}

/// The database side of a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseInfo {
    /// The engine.
    pub engine: EngineKind,
    /// The database name (PostgreSQL) or file name (SQLite).
    pub name: String,
    /// The server's version string (the SQLite library's for SQLite).
    pub server_version: String,
    /// PostgreSQL's major version, compared against a restore target.
    pub server_major: Option<u32>,
    /// `pg_dump --version` of the dump.
    pub pg_dump_version: Option<String>,
    /// Installed extensions and their versions.
    pub extensions: Vec<Extension>,
    /// Whether roles were saved (`pg_dumpall --globals-only`, which needs a superuser).
    pub roles_saved: bool,
    /// Rows per table at backup time, from the same snapshot as the dump.
    pub row_counts: BTreeMap<String, i64>,
}

/// Everything recorded about one backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupManifest {
    /// The manifest format.
    pub format: u32,
    /// The backup's id, also its folder name.
    pub id: String,
    /// When it was taken, UTC, RFC 3339.
    pub created_at: String,
    /// A note from `--label`.
    pub label: Option<String>,
    /// `[app] name`.
    pub app: Option<String>,
    /// The deployed version when the backup was taken.
    pub version: Option<String>,
    /// Applied migration revisions at backup time.
    pub applied_revisions: Vec<String>,
    /// The database, when one was backed up.
    pub database: Option<DatabaseInfo>,
    /// Saved paths, relative to the folder they were saved from.
    pub paths: Vec<String>,
    /// The names of its artifacts (`artifacts/<name>.zst`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<String>,
    /// Every file of the backup with its size and sha256.
    pub files: Vec<FileEntry>,
    /// The age recipients the files are encrypted to (public keys); empty when not encrypted.
    #[serde(default)]
    pub encrypted_to: Vec<String>,
    /// How long the backup took.
    pub duration_ms: u64,
}

impl BackupManifest {
    /// Bytes on disk of the backup's files.
    pub fn size_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// The files of the database dump.
    pub fn database_files(&self) -> impl Iterator<Item = &FileEntry> {
        self.files.iter().filter(|f| f.path.starts_with("db/"))
    }

    /// The tar of the saved paths (encrypted or not), if any.
    pub fn paths_file(&self) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path.strip_suffix(".age").unwrap_or(&f.path) == crate::paths::ARCHIVE)
    }
}
