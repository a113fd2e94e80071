//! The `Driver` trait: how a component's code is rolled out and put back. One
//! implementation per way of running code (process via the agent today; Compose, Kubernetes
//! and Helm later), and the runner over it, like sqlx's `Migrate` and `Migrator`.

use serde::{Deserialize, Serialize};

use crate::manifest::Component;

/// What runs for a component: enough to start it again. Opaque to the runner, which keeps
/// it in the journal so that an undo after a crash can still put it back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployed {
    /// The version it runs.
    pub version: String,
    /// The driver's own description of it (for the process driver, the agent's spec).
    pub detail: serde_json::Value,
}

/// A failure of the driver, for people.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DriverError(pub String);

/// A way of running components.
pub trait Driver {
    /// What runs now for `component`, if anything.
    fn current(&mut self, component: &Component) -> Result<Option<Deployed>, DriverError>;

    /// Rolls `version` out with the component's strategy, health-gated, telling `say` how
    /// it goes (a canary's figures at each step). On failure the new code may still run:
    /// the caller undoes with [`Driver::put_back`].
    fn deploy(&mut self, component: &Component, version: &str, say: &dyn Fn(&str)) -> Result<(), DriverError>;

    /// Puts `previous` back (or removes the component when nothing ran before).
    fn put_back(&mut self, component: &Component, previous: Option<&Deployed>) -> Result<(), DriverError>;

    /// Whether the component passes its health check now (one round of checks up to its
    /// `healthy_after` and `deadline`).
    fn check_health(&mut self, component: &Component) -> Result<(), DriverError>;
}
