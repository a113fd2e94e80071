//! The process driver: components run as local processes under the agent.
//!
//! `recreate` stops the old instance (SIGTERM, `drain` to finish, then SIGKILL) and starts
//! the new one on the same address, then waits for its health check. `blue-green` starts the
//! new version beside the old one on a free port (the other of the `blue` and `green`
//! slots), waits for its health check, switches the agent's proxy on the component's `serve`
//! address to it in one step, waits for the old one's requests to finish (up to `drain`),
//! and stops it. `rolling` runs `instances` copies behind the proxy and replaces them one at
//! a time: start a new one, health-gate it, route to it and away from one old one (which
//! drains), stop that old one. `canary` starts `instances` new ones beside the old ones,
//! health-gates them, and gives them a growing share of requests (`steps`), judging each
//! step by what the proxy measured of the new version over `step_interval`: too few
//! requests to judge, an error rate over `max_error_rate` (default 1%) or a p99 over
//! `max_p99_ms` stops the rollout, and the runner puts the old version back. After the last
//! step the old ones drain and stop.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use upshift_agent::{Client, Request, Response, RouteStatus, Spec, Upstream};
use upshift_core::Manifest;
use upshift_core::driver::{
    ComponentStatus, Deployed, Driver, DriverError, InstanceStatus, VersionStatus, WindowStatus,
};
use upshift_core::manifest::{Component, DriverKind, ProcessSpec, Strategy};

use crate::health;
use upshift_core::manifest::Probe;

/// Whether the component is served through the agent's proxy.
fn behind_proxy(component: &Component) -> bool {
    matches!(component.strategy, Strategy::BlueGreen | Strategy::Rolling | Strategy::Canary)
}

/// A canary step is judged on at least this many requests to the new version.
pub(crate) const CANARY_MIN_REQUESTS: u64 = 20;
/// The error rate that stops a canary when the manifest sets no `max_error_rate`.
pub(crate) const CANARY_MAX_ERROR_RATE: f64 = 0.01;

/// Whether the proxy routes to `spec`'s instance.
fn serves(spec: &Spec, routed: &[String]) -> bool {
    spec.addr.as_ref().is_some_and(|a| routed.contains(a))
}

/// `spec`'s instance as an upstream of the proxy.
fn upstream(spec: &Spec, weight: u32) -> Upstream {
    Upstream { addr: spec.addr.clone().unwrap_or_default(), version: spec.version.clone(), weight }
}

/// Whether the new version passes a canary step, from what the proxy measured of it.
fn judge(component: &Component, version: &str, share: u32, route: Option<&RouteStatus>) -> Result<String, String> {
    let window = route
        .and_then(|r| r.versions.iter().find(|v| v.version == version))
        .map(|v| v.window.clone())
        .unwrap_or_default();
    let at = format!("canary at {share}%: {version}");
    let p99 = window.p99_ms.map_or_else(|| "-".to_owned(), |p| format!("{p:.1} ms"));
    let figures =
        format!("{} requests, {} errors, p99 {p99}, in {:.1}s", window.requests, window.errors, window.seconds);
    if window.requests < CANARY_MIN_REQUESTS {
        return Err(format!(
            "{at} got {figures}: too little traffic to judge (at least {CANARY_MIN_REQUESTS} requests are needed), \
             so the canary does not pass; send traffic or lengthen step_interval"
        ));
    }
    let max_error_rate = component.max_error_rate.unwrap_or(CANARY_MAX_ERROR_RATE);
    let error_rate = window.error_rate().unwrap_or(0.0);
    if error_rate > max_error_rate {
        return Err(format!(
            "{at} got {figures}: error rate {:.1}% is over max_error_rate {:.1}%",
            error_rate * 100.0,
            max_error_rate * 100.0
        ));
    }
    if let (Some(max), Some(p99)) = (component.max_p99_ms, window.p99_ms) {
        #[allow(clippy::cast_precision_loss)]
        if p99 > max as f64 {
            return Err(format!("{at} got {figures}: p99 {p99:.1} ms is over max_p99_ms {max} ms"));
        }
    }
    Ok(format!("{at} got {figures}: passed"))
}

/// A component's instances (spec, running) and the proxy's upstream addresses for it.
type ComponentState = (Vec<(Spec, bool)>, Vec<String>);

/// A component's instances (spec, running) and its route in the proxy.
type Observed = (Vec<(Spec, bool)>, Option<RouteStatus>);

/// The slot of the instance that serves.
const LIVE: &str = "live";

/// Runs components through the agent of one state dir.
pub struct ProcessDriver {
    client: Client,
    /// Where processes run (the manifest's folder).
    cwd: PathBuf,
    /// Expands the `${VAR}` that components keep.
    manifest: Manifest,
}

/// A refusal (a spec it cannot run).
fn error(message: impl Into<String>) -> DriverError {
    DriverError::Refused(message.into())
}

/// The agent failed to answer.
fn agent(e: &upshift_agent::ClientError) -> DriverError {
    DriverError::Unavailable(e.to_string())
}

/// The process driver's settings of a component.
fn process(component: &Component) -> Result<&ProcessSpec, DriverError> {
    component.process().ok_or_else(|| {
        error(format!(
            "component {} uses the {} driver, not the process driver",
            component.name,
            component.driver.kind().as_str()
        ))
    })
}

/// Fills `{version}`, `{addr}` and `{port}`.
pub(crate) fn fill(text: &str, version: &str, addr: Option<&str>) -> String {
    let port = addr.and_then(|a| a.rsplit_once(':').map(|(_, p)| p)).unwrap_or("");
    text.replace("{version}", version).replace("{addr}", addr.unwrap_or("")).replace("{port}", port)
}

fn uses_address(spec: &ProcessSpec) -> bool {
    spec.run.iter().chain(spec.env.values()).any(|v| v.contains("{addr}") || v.contains("{port}"))
}

fn free_address() -> Result<String, DriverError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| error(format!("no free port: {e}")))?;
    Ok(listener.local_addr().map_err(|e| error(e.to_string()))?.to_string())
}

impl ProcessDriver {
    /// Connects to the agent of the manifest's state dir, starting it with `program agent`
    /// when needed, and has it serve its Prometheus metrics when `[agent] metrics` is set.
    pub fn new(manifest: &Manifest, program: &Path) -> Result<ProcessDriver, DriverError> {
        let mut client = Client::connect_or_start(&manifest.state_dir, program).map_err(|e| agent(&e))?;
        if let Some(listen) = &manifest.agent.metrics {
            client.request(&Request::Metrics { listen: listen.clone() }).map_err(|e| agent(&e))?;
        }
        ProcessDriver::with_client(client, manifest)
    }

    /// Connects to the agent only when it already runs (for `status`, which starts nothing).
    pub fn connect(manifest: &Manifest) -> Option<ProcessDriver> {
        let client = Client::connect(&manifest.state_dir).ok()?;
        ProcessDriver::with_client(client, manifest).ok()
    }

    fn with_client(client: Client, manifest: &Manifest) -> Result<ProcessDriver, DriverError> {
        // The agent runs elsewhere: it needs an absolute folder ("" is the manifest's own
        // folder when upshift.toml is in the current one).
        let cwd = std::env::current_dir().map_err(|e| error(e.to_string()))?.join(&manifest.base_dir);
        Ok(ProcessDriver { client, cwd, manifest: manifest.clone() })
    }

    /// The component's instances (spec, running) and the proxy's upstreams for it.
    fn state(&mut self, component: &Component) -> Result<ComponentState, DriverError> {
        let (instances, route) = self.observe(component)?;
        let routed = route.map(|r| r.upstreams.into_iter().map(|u| u.upstream.addr).collect()).unwrap_or_default();
        Ok((instances, routed))
    }

    /// The component's instances (spec, running) and its route in the proxy.
    fn observe(&mut self, component: &Component) -> Result<Observed, DriverError> {
        match self.client.request(&Request::Status).map_err(|e| agent(&e))? {
            Response::Status { instances, mut routes, .. } => Ok((
                instances
                    .into_iter()
                    .filter(|i| i.spec.component == component.name)
                    .map(|i| (i.spec, i.running))
                    .collect(),
                routes.remove(&component.name),
            )),
            other => Err(error(format!("unexpected answer from the agent: {other:?}"))),
        }
    }

    /// The instance that serves: one the proxy routes to (blue-green, rolling), else the
    /// `live` one.
    fn live(&mut self, component: &Component) -> Result<Option<(Spec, bool)>, DriverError> {
        let (instances, routed) = self.state(component)?;
        Ok(instances.into_iter().find(
            |(spec, _)| {
                if behind_proxy(component) { serves(spec, &routed) } else { spec.slot == LIVE }
            },
        ))
    }

    /// The instances the proxy routes to and that run, after stopping the ones it does not
    /// route to (leftovers of an attempt that failed before its undo).
    fn serving_after_leftovers(&mut self, component: &Component) -> Result<Vec<Spec>, DriverError> {
        let (instances, routed) = self.state(component)?;
        for (spec, _) in instances.iter().filter(|(s, _)| !serves(s, &routed)) {
            self.stop_slot(component, &spec.slot)?;
        }
        Ok(instances.into_iter().filter(|(s, running)| *running && serves(s, &routed)).map(|(s, _)| s).collect())
    }

    /// Replaces the serving instances with `instances` new ones of `version`, one at a time.
    fn roll_to(&mut self, component: &Component, version: &str) -> Result<(), DriverError> {
        let olds = self.serving_after_leftovers(component)?;
        let count = usize::try_from(component.instances).unwrap_or(1);
        let mut news: Vec<Spec> = Vec::new();
        for i in 0..count {
            news.push(self.start_healthy(component, version, &format!("{version}#{i}"))?);
            // Route to the new ones and the olds not yet retired; the retired one drains.
            let keep: Vec<Upstream> = olds.iter().skip(i + 1).chain(&news).map(|s| upstream(s, 1)).collect();
            self.route(component, keep)?;
            if let Some(old) = olds.get(i) {
                self.stop_slot(component, &old.slot)?;
            }
        }
        // Fewer instances than before: the olds left over.
        self.route(component, news.iter().map(|s| upstream(s, 1)).collect())?;
        for old in olds.iter().skip(count) {
            self.stop_slot(component, &old.slot)?;
        }
        Ok(())
    }

    fn stop_slot(&mut self, component: &Component, slot: &str) -> Result<(), DriverError> {
        let grace_ms = u64::try_from(component.drain.as_millis()).unwrap_or(u64::MAX);
        match self.client.request(&Request::Stop { component: component.name.clone(), slot: slot.into(), grace_ms }) {
            Ok(_) | Err(upshift_agent::ClientError::Refused(_)) => Ok(()),
            Err(e) => Err(agent(&e)),
        }
    }

    /// Starts `version` in `slot` (stopping a leftover there first) on a free port, and
    /// waits for its health check.
    fn start_healthy(&mut self, component: &Component, version: &str, slot: &str) -> Result<Spec, DriverError> {
        self.stop_slot(component, slot)?;
        let addr = free_address()?;
        let spec = self.spec(component, version, Some(&addr), slot)?;
        self.start(spec.clone())?;
        self.wait_healthy(component, &spec)?;
        Ok(spec)
    }

    /// Starts `instances` of `version` beside the serving ones, gives them each canary
    /// share in turn (when anything served before), then all requests; the old ones drain
    /// and stop. With `steps` empty it switches at once (an undo).
    fn canary_to(
        &mut self,
        component: &Component,
        version: &str,
        steps: &[u32],
        say: &dyn Fn(&str),
    ) -> Result<(), DriverError> {
        let olds = self.serving_after_leftovers(component)?;
        let mut news: Vec<Spec> = Vec::new();
        for i in 0..component.instances {
            news.push(self.start_healthy(component, version, &format!("{version}#{i}"))?);
        }
        let (old_count, new_count) = (u32::try_from(olds.len()).unwrap_or(1), u32::try_from(news.len()).unwrap_or(1));
        for &share in steps.iter().filter(|s| **s < 100) {
            if olds.is_empty() {
                break;
            }
            // Weights in proportion: the new ones together get `share` percent.
            let upstreams = olds
                .iter()
                .map(|s| upstream(s, (100 - share) * new_count))
                .chain(news.iter().map(|s| upstream(s, share * old_count)))
                .collect();
            self.route(component, upstreams)?;
            std::thread::sleep(component.step_interval);
            let (_, route) = self.observe(component)?;
            let verdict = judge(component, version, share, route.as_ref()).map_err(DriverError::Breached)?;
            say(&format!("  {} {verdict}", component.name));
        }
        self.route(component, news.iter().map(|s| upstream(s, 1)).collect())?;
        for old in &olds {
            self.stop_slot(component, &old.slot)?;
        }
        Ok(())
    }

    /// Points the proxy at `upstreams`, waiting for the ones it leaves to drain.
    fn route(&mut self, component: &Component, upstreams: Vec<Upstream>) -> Result<(), DriverError> {
        let listen = component
            .serve()
            .map(str::to_owned)
            .ok_or_else(|| error(format!("component {} has no `serve` address", component.name)))?;
        let drain_ms = u64::try_from(component.drain.as_millis()).unwrap_or(u64::MAX);
        self.client
            .request(&Request::Route { component: component.name.clone(), listen, upstreams, drain_ms })
            .map(drop)
            .map_err(|e| agent(&e))
    }

    /// Starts `version` in a free slot on a free port, health-gated, switches the proxy to
    /// it, and stops every other instance of the component.
    fn switch_to(&mut self, component: &Component, version: &str) -> Result<(), DriverError> {
        let (instances, _) = self.state(component)?;
        let slot = if instances.iter().any(|(s, running)| s.slot == "blue" && *running) { "green" } else { "blue" };
        // A leftover in that slot (an attempt that failed before its undo) goes first.
        let spec = self.start_healthy(component, version, slot)?;
        self.route(component, vec![upstream(&spec, 1)])?;
        for (old, _) in instances.iter().filter(|(s, _)| s.slot != slot) {
            self.stop_slot(component, &old.slot)?;
        }
        Ok(())
    }

    fn stop(&mut self, component: &Component) -> Result<(), DriverError> {
        self.stop_slot(component, LIVE)
    }

    fn start(&mut self, spec: Spec) -> Result<(), DriverError> {
        self.client.request(&Request::Start { spec }).map(drop).map_err(|e| agent(&e))
    }

    /// A component's string as it runs: `${VAR}` expanded, then placeholders filled.
    fn expand(&self, text: &str, version: &str, addr: Option<&str>) -> Result<String, DriverError> {
        let expanded = self.manifest.expand(text).map_err(error)?;
        Ok(fill(&expanded, version, addr))
    }

    fn spec(&self, component: &Component, version: &str, addr: Option<&str>, slot: &str) -> Result<Spec, DriverError> {
        let process = process(component)?;
        Ok(Spec {
            component: component.name.clone(),
            slot: slot.into(),
            version: version.to_owned(),
            command: process.run.iter().map(|a| self.expand(a, version, addr)).collect::<Result<_, _>>()?,
            env: process
                .env
                .iter()
                .map(|(k, v)| Ok((k.clone(), self.expand(v, version, addr)?)))
                .collect::<Result<BTreeMap<_, _>, DriverError>>()?,
            cwd: self.cwd.clone(),
            addr: addr.map(str::to_owned),
        })
    }

    fn put_back_behind_proxy(&mut self, component: &Component, previous: Option<&Deployed>) -> Result<(), DriverError> {
        let (instances, routed) = self.state(component)?;
        let serving = |s: &Spec| serves(s, &routed);
        let previous_serving: Vec<&Spec> = instances
            .iter()
            .filter(|(s, running)| *running && serving(s) && previous.is_some_and(|p| p.version == s.version))
            .map(|(s, _)| s)
            .collect();
        match previous {
            // A canary stopped midway: the old ones still serve, so they take every request
            // again and the new ones drain and stop.
            Some(_) if component.strategy == Strategy::Canary && !previous_serving.is_empty() => {
                self.route(component, previous_serving.iter().map(|s| upstream(s, 1)).collect())?;
                for (spec, _) in instances.iter().filter(|(s, _)| !previous_serving.contains(&s)) {
                    self.stop_slot(component, &spec.slot)?;
                }
                Ok(())
            }
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
            // The previous version starts again from its own recorded spec.
            Some(previous) => {
                let old = previous.spec(component).clone();
                match old.strategy {
                    Strategy::Rolling => self.roll_to(&old, &previous.version),
                    Strategy::Canary => self.canary_to(&old, &previous.version, &[], &|_| {}),
                    Strategy::BlueGreen | Strategy::Recreate => self.switch_to(&old, &previous.version),
                }
            }
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

    /// The probe of an instance: a command's `${VAR}` expanded and placeholders filled.
    fn probe(&self, component: &Component, spec: &Spec) -> Result<Option<Probe>, DriverError> {
        let Some(health) = &component.health else { return Ok(None) };
        Ok(Some(match &health.probe {
            Probe::Command(argv) => Probe::Command(
                argv.iter().map(|a| self.expand(a, &spec.version, spec.addr.as_deref())).collect::<Result<_, _>>()?,
            ),
            other => other.clone(),
        }))
    }

    fn wait_healthy(&self, component: &Component, spec: &Spec) -> Result<(), DriverError> {
        match (&component.health, self.probe(component, spec)?) {
            (Some(health), Some(probe)) => health::wait(health, &probe, spec.addr.as_deref())
                .map_err(|m| DriverError::Unhealthy(format!("{} {}: {m}", component.name, spec.version))),
            _ => Ok(()),
        }
    }

    /// One health check of an instance, no waiting.
    fn healthy_now(&self, component: &Component, spec: &Spec) -> bool {
        match (&component.health, self.probe(component, spec)) {
            (Some(health), Ok(Some(probe))) => health::once(&probe, spec.addr.as_deref(), health.timeout).is_ok(),
            (Some(_), _) => false,
            (None, _) => true,
        }
    }
}

impl Driver for ProcessDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Process
    }

    fn current(&mut self, component: &Component) -> Result<Option<Deployed>, DriverError> {
        // The component as the manifest has it (its ${VAR} unexpanded: no secret reaches the
        // journal) and the address the instance has. The agent's spec holds the expanded
        // command; it stays in the owner-only agent.json.
        Ok(self
            .live(component)?
            .map(|(spec, _)| Deployed::new(&spec.version, component, serde_json::json!({ "addr": spec.addr }))))
    }

    fn deploy(&mut self, component: &Component, version: &str, say: &dyn Fn(&str)) -> Result<(), DriverError> {
        match component.strategy {
            Strategy::Recreate => {}
            Strategy::BlueGreen => return self.switch_to(component, version),
            Strategy::Rolling => return self.roll_to(component, version),
            Strategy::Canary => return self.canary_to(component, version, &component.steps, say),
        }
        let previous = self.live(component)?.map(|(spec, _)| spec);
        // Recreate reuses the address: the stable one, or the one the old instance had.
        let addr = match (component.serve(), previous.as_ref().and_then(|s| s.addr.clone())) {
            (Some(serve), _) => Some(serve.to_owned()),
            (None, Some(old)) => Some(old),
            (None, None) if uses_address(process(component)?) => Some(free_address()?),
            (None, None) => None,
        };
        let spec = self.spec(component, version, addr.as_deref(), LIVE)?;
        self.stop(component)?;
        self.start(spec.clone())?;
        self.wait_healthy(component, &spec)
    }

    fn put_back(&mut self, component: &Component, previous: Option<&Deployed>) -> Result<(), DriverError> {
        if behind_proxy(component) {
            return self.put_back_behind_proxy(component, previous);
        }
        let Some(previous) = previous else { return self.stop(component) };
        let old = previous.spec(component).clone();
        // Already back (an undo run again): nothing to do.
        if let Some((live, true)) = self.live(component)?
            && live.version == previous.version
            && self.healthy_now(&old, &live)
        {
            return Ok(());
        }
        let addr = previous.detail["addr"].as_str();
        let spec = self.spec(&old, &previous.version, addr, LIVE)?;
        self.stop(component)?;
        self.start(spec.clone())?;
        self.wait_healthy(&old, &spec)
    }

    fn check_put_back(&mut self, previous: &Deployed, fallback: &Component) -> Result<(), DriverError> {
        let old = previous.spec(fallback);
        let spec = self.spec(old, &previous.version, previous.detail["addr"].as_str(), LIVE)?;
        let program = spec.command.first().ok_or_else(|| error(format!("{} has an empty `run`", old.name)))?;
        let path = Path::new(program);
        let found = if path.components().count() > 1 {
            self.cwd.join(path).is_file()
        } else {
            std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(path).is_file()))
        };
        if found {
            Ok(())
        } else {
            Err(error(format!(
                "its program {program} is not there (in {}); put the release's files back first",
                self.cwd.display()
            )))
        }
    }

    fn check_health(&mut self, component: &Component) -> Result<(), DriverError> {
        if behind_proxy(component) {
            // Every instance that serves, not only one.
            let (instances, routed) = self.state(component)?;
            let serving: Vec<Spec> =
                instances.into_iter().filter(|(s, _)| serves(s, &routed)).map(|(s, _)| s).collect();
            if serving.is_empty() {
                return Err(error(format!("{} is not deployed", component.name)));
            }
            return serving.iter().try_for_each(|spec| self.wait_healthy(component, spec));
        }
        match self.live(component)? {
            Some((spec, true)) => self.wait_healthy(component, &spec),
            Some((spec, false)) => {
                Err(DriverError::Unhealthy(format!("{} {} is not running", component.name, spec.version)))
            }
            None => Err(DriverError::Unhealthy(format!("{} is not deployed", component.name))),
        }
    }

    fn status(&mut self, component: &Component) -> Result<ComponentStatus, DriverError> {
        let (instances, route) = self.observe(component)?;
        let live = if behind_proxy(component) {
            let routed: Vec<String> =
                route.iter().flat_map(|r| r.upstreams.iter().map(|u| u.upstream.addr.clone())).collect();
            instances.iter().find(|(s, running)| *running && serves(s, &routed))
        } else {
            instances.iter().find(|(s, running)| *running && s.slot == LIVE)
        };
        let healthy = live.is_some_and(|(spec, _)| self.healthy_now(component, spec));
        let all = match self.client.request(&Request::Status).map_err(|e| agent(&e))? {
            Response::Status { instances, .. } => instances,
            other => return Err(error(format!("unexpected answer from the agent: {other:?}"))),
        };
        let listed = all
            .into_iter()
            .filter(|i| i.spec.component == component.name)
            .map(|i| {
                let figures = route.as_ref().and_then(|r| {
                    r.upstreams.iter().find(|u| {
                        Some(&u.upstream.addr) == i.spec.addr.as_ref() && u.upstream.version == i.spec.version
                    })
                });
                InstanceStatus {
                    version: i.spec.version.clone(),
                    slot: i.spec.slot.clone(),
                    addr: i.spec.addr.clone(),
                    pid: i.pid,
                    running: i.running,
                    restarts: i.restarts,
                    serving: route.as_ref().map_or(i.running, |_| figures.is_some_and(|f| f.upstream.weight > 0)),
                    weight: figures.map(|f| f.upstream.weight),
                    requests: figures.map(|f| f.requests),
                    errors: figures.map(|f| f.errors),
                    p99_ms: figures.and_then(|f| f.window.p99_ms),
                }
            })
            .collect();
        let versions = route
            .iter()
            .flat_map(|r| r.versions.iter())
            .map(|v| VersionStatus {
                version: v.version.clone(),
                share: v.share,
                window: WindowStatus {
                    seconds: v.window.seconds,
                    requests: v.window.requests,
                    errors: v.window.errors,
                    p99_ms: v.window.p99_ms,
                },
            })
            .collect();
        Ok(ComponentStatus {
            healthy,
            version: live.map(|(spec, _)| spec.version.clone()),
            instances: listed,
            versions,
        })
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
