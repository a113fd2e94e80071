//! The agent of the process driver: a supervisor that keeps each component's processes
//! running between upshift commands, restarts them when they exit on their own, and writes
//! their output to `<state_dir>/logs/<component>-<version>.log`, and runs the reverse proxy
//! that holds each component's stable address. It is run by `upshift agent` and answers on a
//! unix socket in the state dir.

pub mod client;
mod gate;
mod metrics;
pub mod protocol;
pub mod proxy;
pub mod server;
mod supervisor;

pub use client::{Client, ClientError};
pub use protocol::{
    InstanceStatus, Request, Response, RouteStatus, Spec, Upstream, UpstreamStatus, VersionStatus, Window,
};
pub use server::{AgentError, run};
