//! The process driver: components run as local processes under the agent.
//!
//! `recreate` stops the old instance (SIGTERM, `drain` to finish, then SIGKILL) and starts
//! the new one on the same address, then waits for its health check. The other strategies
//! need the agent's proxy, which comes with a later issue; until then they are refused
//! before anything runs.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use upshift_agent::{Client, Request, Response, Spec};
use upshift_core::driver::{Deployed, Driver, DriverError};
use upshift_core::manifest::{Component, Strategy};

use crate::health;

/// The slot of the instance that serves.
const LIVE: &str = "live";

/// Runs components through the agent of one state dir.
pub struct ProcessDriver {
    client: Client,
    /// Where processes run (the manifest's folder).
    cwd: PathBuf,
}

fn error(message: impl Into<String>) -> DriverError {
    DriverError(message.into())
}

/// Fills `{version}`, `{addr}` and `{port}`.
fn fill(text: &str, version: &str, addr: Option<&str>) -> String {
    let port = addr.and_then(|a| a.rsplit_once(':').map(|(_, p)| p)).unwrap_or("");
    text.replace("{version}", version).replace("{addr}", addr.unwrap_or("")).replace("{port}", port)
}

fn uses_address(component: &Component) -> bool {
    component.run.iter().chain(component.env.values()).any(|v| v.contains("{addr}") || v.contains("{port}"))
}

fn free_address() -> Result<String, DriverError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| error(format!("no free port: {e}")))?;
    Ok(listener.local_addr().map_err(|e| error(e.to_string()))?.to_string())
}

impl ProcessDriver {
    /// Connects to the agent of `state_dir`, starting it with `program agent` when needed.
    pub fn new(state_dir: &Path, program: &Path, cwd: &Path) -> Result<ProcessDriver, DriverError> {
        let client = Client::connect_or_start(state_dir, program).map_err(|e| error(e.to_string()))?;
        // The agent runs elsewhere: it needs an absolute folder ("" is the manifest's own
        // folder when upshift.toml is in the current one).
        let cwd = std::env::current_dir().map_err(|e| error(e.to_string()))?.join(cwd);
        Ok(ProcessDriver { client, cwd })
    }

    fn live(&mut self, component: &Component) -> Result<Option<(Spec, bool)>, DriverError> {
        match self.client.request(&Request::Status).map_err(|e| error(e.to_string()))? {
            Response::Status { instances, .. } => Ok(instances
                .into_iter()
                .find(|i| i.spec.component == component.name && i.spec.slot == LIVE)
                .map(|i| (i.spec, i.running))),
            other => Err(error(format!("unexpected answer from the agent: {other:?}"))),
        }
    }

    fn stop(&mut self, component: &Component) -> Result<(), DriverError> {
        let grace_ms = u64::try_from(component.drain.as_millis()).unwrap_or(u64::MAX);
        match self.client.request(&Request::Stop { component: component.name.clone(), slot: LIVE.into(), grace_ms }) {
            Ok(_) | Err(upshift_agent::ClientError::Refused(_)) => Ok(()),
            Err(e) => Err(error(e.to_string())),
        }
    }

    fn start(&mut self, spec: Spec) -> Result<(), DriverError> {
        self.client.request(&Request::Start { spec }).map(drop).map_err(|e| error(e.to_string()))
    }

    fn spec(&self, component: &Component, version: &str, addr: Option<&str>) -> Spec {
        Spec {
            component: component.name.clone(),
            slot: LIVE.into(),
            version: version.to_owned(),
            command: component.run.iter().map(|a| fill(a, version, addr)).collect(),
            env: component.env.iter().map(|(k, v)| (k.clone(), fill(v, version, addr))).collect::<BTreeMap<_, _>>(),
            cwd: self.cwd.clone(),
            addr: addr.map(str::to_owned),
        }
    }

    fn wait_healthy(component: &Component, spec: &Spec) -> Result<(), DriverError> {
        match &component.health {
            Some(health) => {
                let probe = match &health.probe {
                    upshift_core::manifest::Probe::Command(argv) => upshift_core::manifest::Probe::Command(
                        argv.iter().map(|a| fill(a, &spec.version, spec.addr.as_deref())).collect(),
                    ),
                    other => other.clone(),
                };
                health::wait(health, &probe, spec.addr.as_deref())
                    .map_err(|m| error(format!("{} {}: {m}", component.name, spec.version)))
            }
            None => Ok(()),
        }
    }
}

impl Driver for ProcessDriver {
    fn current(&mut self, component: &Component) -> Result<Option<Deployed>, DriverError> {
        // Only the version and the address: the command and its environment (which may hold
        // secrets from ${VAR}) are rebuilt from the manifest, and never reach the journal.
        Ok(self.live(component)?.map(|(spec, _)| Deployed {
            version: spec.version.clone(),
            detail: serde_json::json!({ "addr": spec.addr }),
        }))
    }

    fn deploy(&mut self, component: &Component, version: &str) -> Result<(), DriverError> {
        if component.strategy != Strategy::Recreate {
            return Err(error(format!(
                "component {}: strategy {} needs the agent's proxy, which this build does not have yet; use recreate",
                component.name,
                component.strategy.as_str()
            )));
        }
        let previous = self.live(component)?.map(|(spec, _)| spec);
        // Recreate reuses the address: the stable one, or the one the old instance had.
        let addr = match (&component.serve, previous.as_ref().and_then(|s| s.addr.clone())) {
            (Some(serve), _) => Some(serve.clone()),
            (None, Some(old)) => Some(old),
            (None, None) if uses_address(component) => Some(free_address()?),
            (None, None) => None,
        };
        self.stop(component)?;
        let spec = self.spec(component, version, addr.as_deref());
        self.start(spec.clone())?;
        Self::wait_healthy(component, &spec)
    }

    fn put_back(&mut self, component: &Component, previous: Option<&Deployed>) -> Result<(), DriverError> {
        self.stop(component)?;
        if let Some(previous) = previous {
            let addr = previous.detail["addr"].as_str();
            let spec = self.spec(component, &previous.version, addr);
            self.start(spec.clone())?;
            Self::wait_healthy(component, &spec)?;
        }
        Ok(())
    }

    fn check_health(&mut self, component: &Component) -> Result<(), DriverError> {
        match self.live(component)? {
            Some((spec, true)) => Self::wait_healthy(component, &spec),
            Some((spec, false)) => Err(error(format!("{} {} is not running", component.name, spec.version))),
            None => Err(error(format!("{} is not deployed", component.name))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled() {
        assert_eq!(
            fill("releases/{version}/notes --listen {addr} -p {port}", "2.0.0", Some("127.0.0.1:8080")),
            "releases/2.0.0/notes --listen 127.0.0.1:8080 -p 8080"
        );
        assert_eq!(fill("x {version}", "1.0.0", None), "x 1.0.0");
    }
}
