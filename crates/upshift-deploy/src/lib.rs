//! Drivers that roll components out, and health checks. The process driver runs them as
//! local processes under the agent (`upshift-agent`); Compose, Kubernetes and Helm drivers
//! will implement the same `upshift_core::driver::Driver` trait.

mod agent;
mod compose;
pub mod health;
mod process;
pub mod rollout;

pub use compose::{ComposeDriver, check_compose_files, service_address};
pub use process::ProcessDriver;
