//! The agent of the process driver: a supervisor that keeps each component's processes
//! running between upshift commands, restarts them when they exit on their own, and writes
//! their output to `<state_dir>/logs/<component>-<version>.log`, and runs the reverse proxy
//! that holds each component's stable address. It is run by `upshift agent` and answers on a
//! unix socket in the state dir.

pub mod client;
mod gate;
mod histogram;
mod http1;
pub mod log_writer;
mod metrics;
pub mod protocol;
pub mod proxy;
pub mod server;
mod supervisor;

pub use client::{Client, ClientError};
pub use protocol::{
    InstanceStatus, Latencies, Request, Response, RouteStatus, Spec, Upstream, UpstreamStatus, VersionStatus, Window,
};
pub use server::{AgentError, run};

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Makes `dir` (and its parents) and leaves it owner-only (0700): the state dir holds the
/// journal, the agent's saved specs (with the components' environment) and their logs.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Reads a state file the agent saved (`agent.json`, `routes.json`); none there is empty.
/// One that does not parse is never silently taken for empty: the error is logged with the
/// file, the file is kept aside as `<name>.damaged` for a person to read, and `None` tells
/// the caller to recover what it held another way.
fn read_state<T: serde::de::DeserializeOwned + Default>(path: &Path) -> Option<T> {
    let Ok(text) = std::fs::read_to_string(path) else { return Some(T::default()) };
    match serde_json::from_str(&text) {
        Ok(value) => Some(value),
        Err(e) => {
            let aside = path.with_extension("json.damaged");
            let _ = std::fs::rename(path, &aside);
            tracing::error!(
                file = %path.display(),
                kept_as = %aside.display(),
                error = %e,
                "a saved state file does not parse; recovering what it held from the running processes"
            );
            None
        }
    }
}

/// Writes `bytes` to a new owner-only (0600) file at `path`, replacing it.
fn private_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(bytes)
}
