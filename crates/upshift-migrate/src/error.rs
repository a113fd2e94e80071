//! The errors of the migration engine, each saying what to do next.

use std::path::PathBuf;
use std::time::Duration;

/// Anything that stops a migration command.
///
/// [`Error::is_input`] tells bad input (exit 2: nothing was touched) from a failure while
/// working (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be read or written.
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A migration file is malformed.
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    File { path: PathBuf, line: Option<usize>, message: String },
    /// Two files claim one revision id.
    #[error("two files have revision id {id}: {} and {}; rename one of them", first.display(), second.display())]
    DuplicateId { id: String, first: PathBuf, second: PathBuf },
    /// A `parents` directive names a revision that has no file.
    #[error("{}: parent revision {parent} does not exist; fix the `-- upshift:parents` line", path.display())]
    MissingParent { path: PathBuf, parent: String },
    /// The parents form a loop.
    #[error("the revision graph has a cycle through {}; a revision cannot follow its own descendant", ids.join(" -> "))]
    Cycle { ids: Vec<String> },
    /// More than one head and no explicit target.
    #[error("the migrations have {} heads ({}); run `upshift migrate merge` to join them, or name a target", heads.len(), heads.join(", "))]
    MultipleHeads { heads: Vec<String> },
    /// A target that names no revision or cannot be reached.
    #[error("{0}")]
    Target(String),
    /// An applied revision's up section is not what was applied.
    #[error("revision {id} was applied with checksum {applied} but {} now has {current}; restore the file as it was applied, or add a new revision instead of editing this one", path.display())]
    Drift { id: String, path: PathBuf, applied: String, current: String },
    /// An applied revision has no file any more.
    #[error("revision {id} is applied in the database but has no file in {}; restore the file", dir.display())]
    Vanished { id: String, dir: PathBuf },
    /// `down` would pass through a revision that cannot be reverted.
    #[error("revision {id} ({}) has no down SQL (its down section is missing or empty), so `down` cannot pass through it; write its reverse {}, or choose a later target", path.display(), where_down_goes(path))]
    NoDown { id: String, path: PathBuf },
    /// A database URL that cannot be used.
    #[error("bad database URL `{url}`: {message}")]
    Url { url: String, message: String },
    /// The database could not be reached.
    #[error("could not connect to {url}")]
    Connect {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Another run holds the migration lock.
    #[error("another migration run holds the lock on this database ({holder}); waited {}; try again when it ends, or raise --lock-timeout", humantime::format_duration(*waited))]
    Locked { holder: String, waited: Duration },
    /// A statement of a migration failed.
    #[error("revision {id} failed at {}:{line}: {message}{}", path.display(), if *partial { "\nthis revision runs without a transaction: the statements before this one were applied and are not undone" } else { "\nits transaction was rolled back: nothing of it was applied" })]
    Statement {
        id: String,
        path: PathBuf,
        line: usize,
        message: String,
        /// True for `no-transaction` revisions, whose earlier statements stay applied.
        partial: bool,
    },
    /// An external migration tool could not say what its revisions are, or which is applied.
    #[error("could not ask {command}: {message}")]
    Listing { command: String, message: String },
    /// An external migration tool failed on a revision.
    #[error("revision {id} failed: `{command}` ended with {message}")]
    Command { id: String, command: String, message: String },
    /// A database operation outside any migration failed.
    #[error("could not {action}")]
    Database {
        action: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// True when the error is about the input (files, graph, target, URL): nothing ran.
    pub fn is_input(&self) -> bool {
        match self {
            Error::Io { .. }
            | Error::File { .. }
            | Error::DuplicateId { .. }
            | Error::MissingParent { .. }
            | Error::Cycle { .. }
            | Error::MultipleHeads { .. }
            | Error::Target(_)
            | Error::Drift { .. }
            | Error::Vanished { .. }
            | Error::NoDown { .. }
            | Error::Listing { .. }
            | Error::Url { .. } => true,
            Error::Connect { .. }
            | Error::Locked { .. }
            | Error::Statement { .. }
            | Error::Command { .. }
            | Error::Database { .. } => false,
        }
    }

    pub(crate) fn database(action: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Database { action: action.into(), source: Box::new(source) }
    }
}

/// Where a revision's down SQL goes, in the layout its file is in.
pub(crate) fn where_down_goes(path: &std::path::Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if let Some(stem) = name.strip_suffix(".up.sql") {
        format!("in {stem}.down.sql beside it")
    } else if std::fs::read_to_string(path).is_ok_and(|text| text.contains("-- migrate:up")) {
        "under `-- migrate:down` in the file".to_owned()
    } else {
        "under `-- upshift:down` in the file".to_owned()
    }
}
