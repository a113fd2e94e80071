//! The process driver: components run as local processes under the agent, and the
//! strategies of [`crate::rollout`] run over them through the agent's admin API: an
//! instance is one supervised process, the proxy is the agent's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use upshift_agent::{Request, RouteStatus, Spec, Upstream};
use upshift_core::Manifest;
use upshift_core::driver::{
    ComponentStatus, Deployed, Driver, DriverError, InstanceStatus, VersionStatus, WindowStatus,
};
use upshift_core::manifest::{Component, DriverKind, Probe, ProcessSpec};

use crate::agent::{Agent, AgentStatus, unavailable};
use crate::health;
use crate::rollout::{self, Instance, Instances, LIVE};

/// Runs components through the agent of one state dir.
pub struct ProcessDriver {
    agent: Agent,
    /// Where processes run (the manifest's folder).
    cwd: PathBuf,
    /// Expands the `${VAR}` that components keep.
    manifest: Manifest,
}

/// A refusal (a spec it cannot run).
fn error(message: impl Into<String>) -> DriverError {
    DriverError::Refused(message.into())
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

fn instance(spec: &Spec, running: bool) -> Instance {
    Instance { slot: spec.slot.clone(), version: spec.version.clone(), addr: spec.addr.clone(), running }
}

impl ProcessDriver {
    /// Connects to the agent of the manifest's state dir, starting it with `program agent`
    /// when needed.
    pub fn new(manifest: &Manifest, program: &Path) -> Result<ProcessDriver, DriverError> {
        ProcessDriver::with_agent(Agent::start(manifest, program)?, manifest)
    }

    /// Connects to the agent only when it already runs (for `status`, which starts nothing).
    pub fn connect(manifest: &Manifest) -> Option<ProcessDriver> {
        ProcessDriver::with_agent(Agent::connect(manifest)?, manifest).ok()
    }

    fn with_agent(agent: Agent, manifest: &Manifest) -> Result<ProcessDriver, DriverError> {
        // The agent runs elsewhere: it needs an absolute folder ("" is the manifest's own
        // folder when upshift.toml is in the current one).
        let cwd = std::env::current_dir().map_err(|e| error(e.to_string()))?.join(&manifest.base_dir);
        Ok(ProcessDriver { agent, cwd, manifest: manifest.clone() })
    }

    fn agent_status(&mut self) -> Result<AgentStatus, DriverError> {
        self.agent.status()
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
            serve: process.serve.clone().filter(|_| crate::rollout::behind_proxy(component)),
        })
    }

    /// Whether the program `component` runs for `version` is there and executable.
    fn program_ready(&self, component: &Component, version: &str, addr: Option<&str>) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt as _;
        let spec = self.spec(component, version, addr.or(Some("127.0.0.1:0")), LIVE).map_err(|e| e.to_string())?;
        let program = spec.command.first().ok_or_else(|| format!("component {} has an empty `run`", component.name))?;
        let path = Path::new(program);
        let found = if path.components().count() > 1 {
            Some(self.cwd.join(path))
        } else {
            std::env::var_os("PATH")
                .and_then(|p| std::env::split_paths(&p).map(|d| d.join(path)).find(|candidate| candidate.is_file()))
        };
        match found.and_then(|p| std::fs::metadata(&p).ok()) {
            Some(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => Ok(()),
            Some(_) => Err(format!("component {} {version}: its program {program} is not executable", component.name)),
            None => Err(format!(
                "component {} {version}: its program {program} is not there (in {})",
                component.name,
                self.cwd.display()
            )),
        }
    }

    /// One health check of an instance, and why it failed.
    fn health_now(&self, component: &Component, instance: &Instance) -> Result<(), String> {
        match (&component.health, self.probe(component, instance)) {
            (Some(health), Ok(Some(probe))) => health::once(&probe, instance.addr.as_deref(), health.timeout),
            (Some(_), Err(e)) => Err(e.to_string()),
            (Some(_), Ok(None)) | (None, _) => Ok(()),
        }
    }

    /// The probe of an instance: a command's `${VAR}` expanded and placeholders filled.
    fn probe(&self, component: &Component, instance: &Instance) -> Result<Option<Probe>, DriverError> {
        let Some(health) = &component.health else { return Ok(None) };
        let addr = instance.addr.as_deref();
        Ok(Some(match &health.probe {
            Probe::Command(argv) => {
                Probe::Command(argv.iter().map(|a| self.expand(a, &instance.version, addr)).collect::<Result<_, _>>()?)
            }
            other => other.clone(),
        }))
    }
}

impl Instances for ProcessDriver {
    fn observe(&mut self, component: &Component) -> Result<(Vec<Instance>, Option<RouteStatus>), DriverError> {
        let (all, mut routes) = self.agent_status()?;
        let mine =
            all.iter().filter(|i| i.spec.component == component.name).map(|i| instance(&i.spec, i.running)).collect();
        Ok((mine, routes.remove(&component.name)))
    }

    fn start(
        &mut self,
        component: &Component,
        version: &str,
        slot: &str,
        addr: Option<&str>,
    ) -> Result<Instance, DriverError> {
        let spec = self.spec(component, version, addr, slot)?;
        let started = instance(&spec, true);
        self.agent.ask(&Request::Start { spec }).map_err(|e| unavailable(&e))?;
        Ok(started)
    }

    fn stop(&mut self, component: &Component, slot: &str) -> Result<(), DriverError> {
        let grace_ms = u64::try_from(component.drain.as_millis()).unwrap_or(u64::MAX);
        match self.agent.ask(&Request::Stop { component: component.name.clone(), slot: slot.into(), grace_ms }) {
            Ok(_) | Err(upshift_agent::ClientError::Refused(_)) => Ok(()),
            Err(e) => Err(unavailable(&e)),
        }
    }

    fn wait_healthy(&self, component: &Component, instance: &Instance) -> Result<(), DriverError> {
        match (&component.health, self.probe(component, instance)?) {
            (Some(health), Some(probe)) => health::wait(health, &probe, instance.addr.as_deref())
                .map_err(|m| DriverError::Unhealthy(format!("{} {}: {m}", component.name, instance.version))),
            _ => Ok(()),
        }
    }

    fn healthy_now(&self, component: &Component, instance: &Instance) -> bool {
        self.health_now(component, instance).is_ok()
    }

    fn route(&mut self, component: &Component, upstreams: Vec<Upstream>) -> Result<(), DriverError> {
        self.agent.route(component, upstreams)
    }

    fn recreate_address(&self, component: &Component, previous: Option<&str>) -> Result<Option<String>, DriverError> {
        let spec = process(component)?;
        let takes_address =
            spec.run.iter().chain(spec.env.values()).any(|v| v.contains("{addr}") || v.contains("{port}"));
        Ok(match (&spec.serve, previous) {
            (Some(serve), _) => Some(serve.clone()),
            (None, Some(old)) => Some(old.to_owned()),
            (None, None) if takes_address => Some(rollout::free_address()?),
            (None, None) => None,
        })
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
        Ok(rollout::live(self, component)?
            .map(|i| Deployed::new(&i.version, component, serde_json::json!({ "addr": i.addr }))))
    }

    fn deploy(&mut self, component: &Component, version: &str, say: &dyn Fn(&str)) -> Result<(), DriverError> {
        rollout::deploy(self, component, version, say)
    }

    fn note_run(&mut self, run: &str) {
        self.agent.note_run(run);
    }

    fn put_back(&mut self, component: &Component, previous: Option<&Deployed>) -> Result<(), DriverError> {
        rollout::put_back(self, component, previous)
    }

    fn check_put_back(&mut self, previous: &Deployed, fallback: &Component) -> Result<(), DriverError> {
        let old = previous.spec(fallback);
        self.program_ready(old, &previous.version, previous.detail["addr"].as_str())
            .map_err(|e| error(format!("{e}; put the release's files back first")))
    }

    fn preflight(&mut self, component: &Component, version: &str) -> Result<(), DriverError> {
        self.program_ready(component, version, None).map_err(error)?;
        // The stable address: free, or held by this agent's proxy for this component.
        let (_, route) = self.observe(component)?;
        crate::agent::serve_is_free_or_ours(component, route.as_ref())
    }

    fn check_health(&mut self, component: &Component) -> Result<(), DriverError> {
        rollout::check_health(self, component)
    }

    fn status(&mut self, component: &Component) -> Result<ComponentStatus, DriverError> {
        // One look at the agent serves the live instance, its health and the listing.
        let (all, mut routes) = self.agent_status()?;
        let route = routes.remove(&component.name);
        let mine: Vec<Instance> =
            all.iter().filter(|i| i.spec.component == component.name).map(|i| instance(&i.spec, i.running)).collect();
        let live = rollout::live_of(component, &mine, route.as_ref()).filter(|i| i.running).cloned();
        let health = match &live {
            Some(instance) => self.health_now(component, instance).map_err(|e| {
                format!("{} {} at {}: {e}", component.name, instance.version, instance.addr.as_deref().unwrap_or("-"))
            }),
            None => Err(format!("no instance of {} runs and serves", component.name)),
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
            healthy: health.is_ok(),
            problem: health.err(),
            version: live.map(|i| i.version),
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
