//! The manifest (`upshift.toml`), the journal, and the plan of an upgrade.

pub mod journal;
pub mod manifest;
pub mod plan;

pub use manifest::{Manifest, ManifestError};
pub use plan::{Plan, PlanError, PlanInput, plan};
