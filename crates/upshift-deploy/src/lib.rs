//! Drivers that roll components out, and health checks: processes under the agent
//! (`upshift-agent`), Docker Compose services, and (with the `kubernetes` feature, on by
//! default) Kubernetes Deployments, each an `upshift_core::driver::Driver`.

mod agent;
mod compose;
pub mod health;
#[cfg(feature = "kubernetes")]
mod helm;
#[cfg(feature = "kubernetes")]
mod kubernetes;
mod process;
pub mod rollout;
#[cfg(feature = "kubernetes")]
mod tunnel;

pub use compose::{ComposeDriver, check_compose_files, service_address};
#[cfg(feature = "kubernetes")]
pub use helm::{HelmDriver, helm_revisions};
#[cfg(feature = "kubernetes")]
pub use kubernetes::KubernetesDriver;
pub use process::ProcessDriver;
#[cfg(feature = "kubernetes")]
pub use tunnel::{TunnelTarget, tunnel};

/// An argument list from string slices (for the CLIs the drivers run).
pub(crate) fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

/// Says on stderr what a driver does on its own (drivers have no printer; the CLI's
/// runner output goes to stderr too).
pub(crate) fn say_aloud(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}
