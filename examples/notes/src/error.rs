//! The errors of the service that reach `main`.

use std::io;

/// Why the service did not start or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line is wrong (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {address}: {source}; pick a free port or `127.0.0.1:0`")]
    Bind {
        /// The address as given.
        address: String,
        /// What the system said.
        source: io::Error,
    },
    /// The signal handlers could not be installed.
    #[error("cannot install the SIGTERM/SIGINT handlers: {0}")]
    Signals(io::Error),
    /// The bound socket has no local address (should not happen).
    #[error("cannot read the listening address: {0}")]
    LocalAddress(io::Error),
}

impl Error {
    /// The process exit code for this error: 2 for bad usage, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => 2,
            _ => 1,
        }
    }
}
