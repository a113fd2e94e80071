//! The process driver: components run as local processes under the agent.
//!
//! `recreate` stops the old instance (SIGTERM, `drain` to finish, then SIGKILL) and starts
//! the new one on the same address, then waits for its health check. `blue-green` starts the
//! new version beside the old one on a free port (the other of the `blue` and `green`
//! slots), waits for its health check, switches the agent's proxy on the component's `serve`
//! address to it in one step, waits for the old one's requests to finish (up to `drain`),
//! and stops it. `rolling` runs `instances` copies behind the proxy and replaces them one at
//! a time: start a new one, health-gate it, route to it and away from one old one (which
//! drains), stop that old one. `canary` is refused before anything runs (not built yet).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use upshift_agent::{Client, Request, Response, Spec};
use upshift_core::driver::{Deployed, Driver, DriverError};
use upshift_core::manifest::{Component, Strategy};

use crate::health;

/// Whether the component is served through the agent's proxy.
fn behind_proxy(component: &Component) -> bool {
    matches!(component.strategy, Strategy::BlueGreen | Strategy::Rolling)
}

/// A component's instances (spec, running) and the proxy's upstreams for it.
type ComponentState = (Vec<(Spec, bool)>, Vec<String>);

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
pub(crate) fn fill(text: &str, version: &str, addr: Option<&str>) -> String {
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

    /// The component's instances (spec, running) and the proxy's upstreams for it.
    fn state(&mut self, component: &Component) -> Result<ComponentState, DriverError> {
        match self.client.request(&Request::Status).map_err(|e| error(e.to_string()))? {
            Response::Status { instances, mut routes, .. } => Ok((
                instances
                    .into_iter()
                    .filter(|i| i.spec.component == component.name)
                    .map(|i| (i.spec, i.running))
                    .collect(),
                routes.remove(&component.name).unwrap_or_default(),
            )),
            other => Err(error(format!("unexpected answer from the agent: {other:?}"))),
        }
    }

    /// The instance that serves: one the proxy routes to (blue-green, rolling), else the
    /// `live` one.
    fn live(&mut self, component: &Component) -> Result<Option<(Spec, bool)>, DriverError> {
        let (instances, routed) = self.state(component)?;
        Ok(instances.into_iter().find(|(spec, _)| {
            if behind_proxy(component) {
                spec.addr.as_ref().is_some_and(|a| routed.contains(a))
            } else {
                spec.slot == LIVE
            }
        }))
    }

    /// Replaces the serving instances with `instances` new ones of `version`, one at a time.
    fn roll_to(&mut self, component: &Component, version: &str) -> Result<(), DriverError> {
        let (instances, routed) = self.state(component)?;
        let serving = |s: &Spec| s.addr.as_ref().is_some_and(|a| routed.contains(a));
        let olds: Vec<Spec> =
            instances.iter().filter(|(s, running)| *running && serving(s)).map(|(s, _)| s.clone()).collect();
        // Leftovers of an attempt that failed before its undo go first.
        for (spec, _) in instances.iter().filter(|(s, _)| !serving(s)) {
            self.stop_slot(component, &spec.slot)?;
        }
        let count = usize::try_from(component.instances).unwrap_or(1);
        let mut news: Vec<String> = Vec::new();
        for i in 0..count {
            let slot = format!("{version}#{i}");
            self.stop_slot(component, &slot)?;
            let addr = free_address()?;
            let spec = self.spec(component, version, Some(&addr), &slot);
            self.start(spec.clone())?;
            Self::wait_healthy(component, &spec)?;
            news.push(addr);
            // Route to the new ones and the olds not yet retired; the retired one drains.
            let keep: Vec<String> =
                olds.iter().skip(i + 1).filter_map(|s| s.addr.clone()).chain(news.iter().cloned()).collect();
            self.route(component, keep)?;
            if let Some(old) = olds.get(i) {
                self.stop_slot(component, &old.slot)?;
            }
        }
        // Fewer instances than before: the olds left over.
        self.route(component, news)?;
        for old in olds.iter().skip(count) {
            self.stop_slot(component, &old.slot)?;
        }
        Ok(())
    }

    fn stop_slot(&mut self, component: &Component, slot: &str) -> Result<(), DriverError> {
        let grace_ms = u64::try_from(component.drain.as_millis()).unwrap_or(u64::MAX);
        match self.client.request(&Request::Stop { component: component.name.clone(), slot: slot.into(), grace_ms }) {
            Ok(_) | Err(upshift_agent::ClientError::Refused(_)) => Ok(()),
            Err(e) => Err(error(e.to_string())),
        }
    }

    /// Points the proxy at `upstreams`, waiting for the ones it leaves to drain.
    fn route(&mut self, component: &Component, upstreams: Vec<String>) -> Result<(), DriverError> {
        let listen = component
            .serve
            .clone()
            .ok_or_else(|| error(format!("component {} has no `serve` address", component.name)))?;
        let drain_ms = u64::try_from(component.drain.as_millis()).unwrap_or(u64::MAX);
        self.client
            .request(&Request::Route { component: component.name.clone(), listen, upstreams, drain_ms })
            .map(drop)
            .map_err(|e| error(e.to_string()))
    }

    /// Starts `version` in a free slot on a free port, health-gated, switches the proxy to
    /// it, and stops every other instance of the component.
    fn switch_to(&mut self, component: &Component, version: &str) -> Result<(), DriverError> {
        let (instances, _) = self.state(component)?;
        let slot = if instances.iter().any(|(s, running)| s.slot == "blue" && *running) { "green" } else { "blue" };
        // A leftover in that slot (an attempt that failed before its undo) goes first.
        self.stop_slot(component, slot)?;
        let addr = free_address()?;
        let spec = self.spec(component, version, Some(&addr), slot);
        self.start(spec.clone())?;
        Self::wait_healthy(component, &spec)?;
        self.route(component, vec![addr])?;
        for (old, _) in instances.iter().filter(|(s, _)| s.slot != slot) {
            self.stop_slot(component, &old.slot)?;
        }
        Ok(())
    }

    fn stop(&mut self, component: &Component) -> Result<(), DriverError> {
        self.stop_slot(component, LIVE)
    }

    fn start(&mut self, spec: Spec) -> Result<(), DriverError> {
        self.client.request(&Request::Start { spec }).map(drop).map_err(|e| error(e.to_string()))
    }

    fn spec(&self, component: &Component, version: &str, addr: Option<&str>, slot: &str) -> Spec {
        Spec {
            component: component.name.clone(),
            slot: slot.into(),
            version: version.to_owned(),
            command: component.run.iter().map(|a| fill(a, version, addr)).collect(),
            env: component.env.iter().map(|(k, v)| (k.clone(), fill(v, version, addr))).collect::<BTreeMap<_, _>>(),
            cwd: self.cwd.clone(),
            addr: addr.map(str::to_owned),
        }
    }

    fn put_back_behind_proxy(&mut self, component: &Component, previous: Option<&Deployed>) -> Result<(), DriverError> {
        let (instances, routed) = self.state(component)?;
        let serving = |s: &Spec| s.addr.as_ref().is_some_and(|a| routed.contains(a));
        match previous {
            // Only the previous version serves (the new one never got traffic): stop the rest.
            Some(previous)
                if instances.iter().any(|(s, running)| *running && serving(s))
                    && instances.iter().filter(|(s, _)| serving(s)).all(|(s, _)| s.version == previous.version) =>
            {
                for (spec, _) in instances.iter().filter(|(s, _)| !serving(s)) {
                    self.stop_slot(component, &spec.slot)?;
                }
                Ok(())
            }
            Some(previous) if component.strategy == Strategy::Rolling => self.roll_to(component, &previous.version),
            Some(previous) => self.switch_to(component, &previous.version),
            None => {
                if !routed.is_empty() {
                    self.route(component, Vec::new())?;
                }
                for (spec, _) in &instances {
                    self.stop_slot(component, &spec.slot)?;
                }
                Ok(())
            }
        }
    }

    fn wait_healthy(component: &Component, spec: &Spec) -> Result<(), DriverError> {
        match &component.health {
            Some(health) => {
                let probe = health::filled(&health.probe, &spec.version, spec.addr.as_deref());
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
        match component.strategy {
            Strategy::Recreate => {}
            Strategy::BlueGreen => return self.switch_to(component, version),
            Strategy::Rolling => return self.roll_to(component, version),
            Strategy::Canary => {
                return Err(error(format!(
                    "component {}: strategy {} is not built yet; use recreate, blue-green or rolling",
                    component.name,
                    Strategy::Canary.as_str()
                )));
            }
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
        let spec = self.spec(component, version, addr.as_deref(), LIVE);
        self.start(spec.clone())?;
        Self::wait_healthy(component, &spec)
    }

    fn put_back(&mut self, component: &Component, previous: Option<&Deployed>) -> Result<(), DriverError> {
        if behind_proxy(component) {
            return self.put_back_behind_proxy(component, previous);
        }
        self.stop(component)?;
        if let Some(previous) = previous {
            let addr = previous.detail["addr"].as_str();
            let spec = self.spec(component, &previous.version, addr, LIVE);
            self.start(spec.clone())?;
            Self::wait_healthy(component, &spec)?;
        }
        Ok(())
    }

    fn check_health(&mut self, component: &Component) -> Result<(), DriverError> {
        if behind_proxy(component) {
            // Every instance that serves, not only one.
            let (instances, routed) = self.state(component)?;
            let serving: Vec<Spec> = instances
                .into_iter()
                .filter(|(s, _)| s.addr.as_ref().is_some_and(|a| routed.contains(a)))
                .map(|(s, _)| s)
                .collect();
            if serving.is_empty() {
                return Err(error(format!("{} is not deployed", component.name)));
            }
            return serving.iter().try_for_each(|spec| Self::wait_healthy(component, spec));
        }
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
