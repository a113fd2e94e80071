//! The manifest (`upshift.toml`), the journal, and the plan of an upgrade.

pub mod artifacts;
pub mod command;
pub mod config;
pub mod contract;
pub mod driver;
pub mod guide;
pub mod http;
pub mod journal;
pub mod manifest;
pub mod notify;
pub mod plan;
pub mod prometheus;
pub mod runner;

pub use manifest::{Manifest, ManifestError};
pub use plan::{Plan, PlanError, PlanInput, plan};
