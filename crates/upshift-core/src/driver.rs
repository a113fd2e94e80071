//! The driver seam: how a component's code is rolled out and put back. One implementation
//! per way of running code (process via the agent and Compose today; Kubernetes and Helm
//! next), a registry that picks one per component, and the runner over it, like sqlx's
//! `Migrate` and `Migrator`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::manifest::{Component, DriverKind};

/// The format of [`Deployed`] records this build writes.
pub const DEPLOYED_FORMAT: u32 = 1;

/// What runs for a component: a typed, versioned record that alone is enough to start it
/// again. The runner keeps it in the journal, so an undo after a crash, or a rollback long
/// after the manifest changed, puts back exactly what ran.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployed {
    /// The record's format ([`DEPLOYED_FORMAT`]; 0 for records from journal schema 0).
    pub format: u32,
    /// The version it runs.
    pub version: String,
    /// The component as it was deployed (its `${VAR}` unexpanded, so no secret is
    /// journaled). `None` only in records from journal schema 0, which did not keep it: the
    /// manifest's component of the same name stands in.
    pub component: Option<Component>,
    /// What the driver observed of it (for the process driver, its address).
    pub detail: serde_json::Value,
    /// It was not deployed by upshift (a Compose service started by hand, a Deployment
    /// applied by someone else): a first deploy may take it over, and its undo puts this
    /// back as it was.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopted: bool,
}

impl Deployed {
    /// A record of this build's format.
    pub fn new(version: &str, component: &Component, detail: serde_json::Value) -> Deployed {
        Deployed {
            format: DEPLOYED_FORMAT,
            version: version.to_owned(),
            component: Some(component.clone()),
            detail,
            adopted: false,
        }
    }

    /// A record of something upshift did not deploy, which a first deploy takes over.
    #[must_use]
    pub fn adopted(mut self) -> Deployed {
        self.adopted = true;
        self
    }

    /// A record read from journal schema 0.
    pub fn legacy(version: String, detail: serde_json::Value) -> Deployed {
        Deployed { format: 0, version, component: None, detail, adopted: false }
    }

    /// The component to start again: the recorded one, else (schema 0) `fallback`.
    pub fn spec<'a>(&'a self, fallback: &'a Component) -> &'a Component {
        self.component.as_ref().unwrap_or(fallback)
    }
}

/// A driver failure. The message says what happened and what to do.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The new version did not pass its health check.
    #[error("{0}")]
    Unhealthy(String),
    /// A canary step breached a limit (or had too little traffic to judge).
    #[error("{0}")]
    Breached(String),
    /// The driver's engine (the agent, Docker, the API server) cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// The driver refused: a spec it cannot run, something missing to put back.
    #[error("{0}")]
    Refused(String),
}

/// One process, container or pod of a component, for `status`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InstanceStatus {
    /// The version it runs.
    pub version: String,
    /// Its slot (`live`, `blue`, `green`, `<version>#<i>`).
    pub slot: String,
    /// Where it listens.
    pub addr: Option<String>,
    /// Its process id.
    pub pid: Option<u32>,
    /// Whether it runs.
    pub running: bool,
    /// How often it was restarted.
    pub restarts: u32,
    /// Whether it gets requests.
    pub serving: bool,
    /// Its weight in the proxy.
    pub weight: Option<u32>,
    /// Requests the proxy sent it.
    pub requests: Option<u64>,
    /// Of those, errors.
    pub errors: Option<u64>,
    /// Its p99 latency since the last switch.
    pub p99_ms: Option<f64>,
}

/// What the proxy measured of one version since the last switch.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct WindowStatus {
    /// How long the window is.
    pub seconds: f64,
    /// Requests.
    pub requests: u64,
    /// Errors.
    pub errors: u64,
    /// p99 latency.
    pub p99_ms: Option<f64>,
}

/// The proxy's figures are judged on at least this many requests to a version (a canary
/// step, the watch after verify).
pub const JUDGE_MIN_REQUESTS: u64 = 20;
/// The error rate a version may not pass when the manifest sets no `max_error_rate`.
pub const DEFAULT_MAX_ERROR_RATE: f64 = 0.01;

/// Which of `component`'s limits (`max_error_rate`, default 1%; `max_p99_ms`) the figures
/// the proxy measured of one version break, if any. The caller checks there were at least
/// [`JUDGE_MIN_REQUESTS`].
pub fn limits_broken(component: &Component, requests: u64, errors: u64, p99_ms: Option<f64>) -> Option<String> {
    #[allow(clippy::cast_precision_loss)]
    let error_rate = if requests == 0 { 0.0 } else { errors as f64 / requests as f64 };
    rate_limits_broken(component, Some(error_rate), p99_ms)
}

/// Which of `component`'s limits an error rate (a fraction) and a p99 break, if any: the
/// rule of [`limits_broken`], for figures measured elsewhere (Prometheus).
pub fn rate_limits_broken(component: &Component, error_rate: Option<f64>, p99_ms: Option<f64>) -> Option<String> {
    let max_error_rate = component.max_error_rate.unwrap_or(DEFAULT_MAX_ERROR_RATE);
    if let Some(error_rate) = error_rate
        && error_rate > max_error_rate
    {
        return Some(format!(
            "error rate {:.1}% is over max_error_rate {:.1}%",
            error_rate * 100.0,
            max_error_rate * 100.0
        ));
    }
    if let (Some(max), Some(p99)) = (component.max_p99_ms, p99_ms) {
        #[allow(clippy::cast_precision_loss)]
        if p99 > max as f64 {
            return Some(format!("p99 {p99:.1} ms is over max_p99_ms {max} ms"));
        }
    }
    None
}

/// One version's share of requests and figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VersionStatus {
    /// The version.
    pub version: String,
    /// Its share of requests, in percent.
    pub share: f64,
    /// Its figures.
    pub window: WindowStatus,
}

/// What runs for a component now, for `status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ComponentStatus {
    /// Whether what serves passes its health check now (one check).
    pub healthy: bool,
    /// Why it is not healthy, when it is not.
    pub problem: Option<String>,
    /// The version that serves.
    pub version: Option<String>,
    /// Every instance.
    pub instances: Vec<InstanceStatus>,
    /// Each version's share and figures (behind a proxy only).
    pub versions: Vec<VersionStatus>,
}

/// A way of running components.
pub trait Driver {
    /// Which components it runs.
    fn kind(&self) -> DriverKind;

    /// What runs now for `component`, if anything, as a record that can start it again.
    fn current(&mut self, component: &Component) -> Result<Option<Deployed>, DriverError>;

    /// Rolls `version` out with the component's strategy, health-gated, telling `say` how
    /// it goes (a canary's figures at each step). On failure the new code may still run:
    /// the caller undoes with [`Driver::put_back`].
    fn deploy(&mut self, component: &Component, version: &str, say: &dyn Fn(&str)) -> Result<(), DriverError>;

    /// Puts `previous` back in place of whatever runs for `component` (or removes the
    /// component when nothing ran before). Must be safe to call again after a crash, and a
    /// no-op when `previous` already is all that runs.
    fn put_back(&mut self, component: &Component, previous: Option<&Deployed>) -> Result<(), DriverError>;

    /// Checks, changing nothing, that `previous` could be started again now (its program,
    /// image or chart is there): an undo checks every action before the first one.
    fn check_put_back(&mut self, previous: &Deployed, fallback: &Component) -> Result<(), DriverError>;

    /// Checks, changing nothing, that `version` of `component` can be deployed now (its
    /// program or image is there, its address is free or already its own): run in an
    /// upgrade's preflight, before the backup.
    fn preflight(&mut self, component: &Component, version: &str) -> Result<(), DriverError>;

    /// Whether the component passes its health check now (one round of checks up to its
    /// `healthy_after` and `deadline`).
    fn check_health(&mut self, component: &Component) -> Result<(), DriverError>;

    /// What runs for `component`, for `status` (one quick health check, no waiting).
    fn status(&mut self, component: &Component) -> Result<ComponentStatus, DriverError>;

    /// The run the next calls serve, for the driver's own logs. Nothing by default.
    fn note_run(&mut self, _run: &str) {}

    /// What deploying `version` would change beyond the version, for the plan (a Helm
    /// release's values and chart), changing nothing. Nothing by default.
    fn describe_change(&mut self, _component: &Component, _version: &str) -> Result<Vec<String>, DriverError> {
        Ok(Vec::new())
    }
}

/// Creates a driver when a component first needs it (the process driver starts the agent).
pub type DriverFactory = Box<dyn FnOnce() -> Result<Box<dyn Driver>, DriverError>>;

enum Slot {
    Ready(Box<dyn Driver>),
    Pending(DriverFactory),
    Failed(String),
}

/// The drivers of one run, by kind; each created on first use.
#[derive(Default)]
pub struct Drivers {
    slots: BTreeMap<DriverKind, Slot>,
    /// The run the calls serve, told to each driver as it is made.
    run: Option<String>,
}

impl Drivers {
    /// No drivers.
    pub fn new() -> Drivers {
        Drivers::default()
    }

    /// Adds a driver.
    pub fn register(&mut self, driver: Box<dyn Driver>) {
        self.slots.insert(driver.kind(), Slot::Ready(driver));
    }

    /// Adds a driver made on first use.
    pub fn register_lazy(&mut self, kind: DriverKind, factory: DriverFactory) {
        self.slots.insert(kind, Slot::Pending(factory));
    }

    /// Tells every driver made so far which run the next calls serve.
    pub fn note_run(&mut self, run: &str) {
        self.run = Some(run.to_owned());
        for slot in self.slots.values_mut() {
            if let Slot::Ready(driver) = slot {
                driver.note_run(run);
            }
        }
    }

    /// The driver of `component`.
    pub fn get(&mut self, component: &Component) -> Result<&mut dyn Driver, DriverError> {
        let kind = component.driver.kind();
        let slot = self.slots.remove(&kind).ok_or_else(|| {
            DriverError::Refused(format!(
                "component `{}` uses the {} driver, which this build of upshift does not have (it was built without the `kubernetes` feature); use driver = \"process\" or \"compose\", or a build with it",
                component.name,
                kind.as_str()
            ))
        })?;
        let slot = match slot {
            Slot::Pending(factory) => match factory() {
                Ok(mut driver) => {
                    if let Some(run) = &self.run {
                        driver.note_run(run);
                    }
                    Slot::Ready(driver)
                }
                Err(e) => Slot::Failed(e.to_string()),
            },
            other => other,
        };
        self.slots.insert(kind, slot);
        match self.slots.get_mut(&kind) {
            Some(Slot::Ready(driver)) => Ok(driver.as_mut()),
            Some(Slot::Failed(message)) => Err(DriverError::Unavailable(message.clone())),
            _ => unreachable!("the slot was just filled"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(max_error_rate: Option<f64>, max_p99_ms: Option<u64>) -> Component {
        let text = "[[components]]\nname = \"api\"\ndriver = \"process\"\nrun = [\"x\"]\n";
        let mut component =
            crate::Manifest::parse(std::path::Path::new("u.toml"), text, |_| None).unwrap().components.remove(0);
        component.max_error_rate = max_error_rate;
        component.max_p99_ms = max_p99_ms;
        component
    }

    #[test]
    fn limits_are_the_error_rate_then_the_p99() {
        let defaults = component(None, None);
        assert_eq!(limits_broken(&defaults, 100, 1, Some(900.0)), None, "1% is allowed; no p99 limit");
        assert_eq!(
            limits_broken(&defaults, 100, 2, None).as_deref(),
            Some("error rate 2.0% is over max_error_rate 1.0%")
        );
        let strict = component(Some(0.0), Some(50));
        assert!(limits_broken(&strict, 100, 1, Some(10.0)).unwrap().starts_with("error rate 1.0%"));
        assert_eq!(limits_broken(&strict, 100, 0, Some(50.5)).as_deref(), Some("p99 50.5 ms is over max_p99_ms 50 ms"));
        assert_eq!(limits_broken(&strict, 100, 0, Some(50.0)), None, "at the limit is within it");
        assert_eq!(limits_broken(&strict, 0, 0, None), None, "no requests, nothing broken");
    }
}
