//! Errors to exit codes, in one place (PRODUCT.md: 0 success, 1 failed and nothing
//! changed, 2 bad usage or input, 3 rolled back, 4 failed and not undone).

use upshift_core::ManifestError;

/// A mistake in how upshift was called (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub(crate) String);

/// A run failed and was undone cleanly (exit 3).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct RolledBack(pub(crate) String);

/// A run failed and could not be undone: it stays in the journal (exit 4).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Stuck(pub(crate) String);

pub(crate) fn code(error: &anyhow::Error) -> u8 {
    for cause in error.chain() {
        if cause.is::<RolledBack>() {
            return 3;
        }
        if cause.is::<Stuck>() {
            return 4;
        }
        if let Some(upshift_core::runner::RunError::Plan(_) | upshift_core::runner::RunError::Refused(_)) =
            cause.downcast_ref()
        {
            return 2;
        }
        if let Some(e) = cause.downcast_ref::<upshift_migrate::Error>() {
            return if e.is_input() { 2 } else { 1 };
        }
        if let Some(e) = cause.downcast_ref::<upshift_backup::Error>() {
            return if e.is_input() { 2 } else { 1 };
        }
        if cause.is::<ManifestError>()
            || cause.is::<UsageError>()
            || cause.is::<upshift_core::PlanError>()
            || cause.is::<upshift_core::guide::GuideError>()
            || cause.is::<upshift_core::config::EnvFileError>()
        {
            return 2;
        }
    }
    1
}

pub(crate) fn hint(error: &anyhow::Error) -> Option<&'static str> {
    error.chain().find_map(|cause| match cause.downcast_ref::<upshift_migrate::Error>()? {
        upshift_migrate::Error::Connect { .. } => {
            Some("check that the server is running and that the URL's host, port, user and database are right")
        }
        _ => None,
    })
}
