//! The agent of the process driver: a supervisor that keeps each component's processes
//! running between upshift commands, restarts them when they exit on their own, and writes
//! their output to `<state_dir>/logs/<component>-<version>.log`. It is run by `upshift
//! agent` and answers on a unix socket in the state dir. (The zero-downtime proxy joins it
//! in a later issue.)

pub mod client;
pub mod protocol;
pub mod proxy;
pub mod server;
mod supervisor;

pub use client::{Client, ClientError};
pub use protocol::{InstanceStatus, Request, Response, Spec};
pub use proxy::UpstreamMetrics;
pub use server::{AgentError, run};
