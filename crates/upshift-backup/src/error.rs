//! The errors of the backup engine, each saying what to do next.

use std::path::PathBuf;

/// Anything that stops a backup command.
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
    /// No backup has this id.
    #[error("no backup `{id}` in {}; `upshift backup list` shows them", dir.display())]
    NotFound { id: String, dir: PathBuf },
    /// A backup's files do not match its manifest, or do not decompress, or fail the
    /// database's own check. Such a backup is never restored.
    #[error("backup {id} is damaged: {message}; it will not be restored, use another backup")]
    Corrupt { id: String, message: String },
    /// The restore target holds data and `--force` was not given.
    #[error("the target database {target} is not empty; restoring would replace it: pass --force to do so")]
    NotEmpty { target: String },
    /// The target server is older than the server the dump came from.
    #[error(
        "the backup comes from PostgreSQL {dump_major} but the target server is PostgreSQL {server_major}; restore onto {dump_major} or newer"
    )]
    OlderServer { dump_major: u32, server_major: u32 },
    /// An external program is missing or failed.
    #[error("{program} {message}")]
    Tool { program: String, message: String },
    /// A database operation failed.
    #[error("could not {action}")]
    Database {
        action: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A request that cannot be carried out as given.
    #[error("{0}")]
    Usage(String),
    /// The migration engine failed (reading the applied revisions, a URL).
    #[error(transparent)]
    Migrate(#[from] upshift_migrate::Error),
}

impl Error {
    /// True when the input is at fault and nothing was touched (exit 2).
    pub fn is_input(&self) -> bool {
        match self {
            Error::NotFound { .. } | Error::NotEmpty { .. } | Error::Usage(_) | Error::OlderServer { .. } => true,
            Error::Migrate(e) => e.is_input(),
            Error::Io { .. } | Error::Corrupt { .. } | Error::Tool { .. } | Error::Database { .. } => false,
        }
    }

    pub(crate) fn io(action: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.to_path_buf();
        move |source| Error::Io { action, path, source }
    }

    pub(crate) fn database(action: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::Database { action: action.into(), source: Box::new(source) }
    }
}
