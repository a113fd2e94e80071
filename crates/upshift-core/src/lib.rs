//! The manifest (`upshift.toml`) and what is read from the environment for it.

pub mod manifest;

pub use manifest::{Manifest, ManifestError};
