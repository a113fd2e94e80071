//! The Compose driver: a component is one service of a Docker Compose project, run by the
//! `docker compose` CLI (Compose v2) on the machine's Docker Engine.
//!
//! The version reaches Compose through an override file upshift writes into the state dir
//! (`compose/<component>-<slot>.json`, JSON being YAML): the service's `image` (the
//! manifest's `image` with `{version}`, or the image id recorded in the journal when a
//! previous release is put back, so a re-pushed tag cannot change what "previous" means),
//! labels that say which slot and version a container is, and `stop_signal` /
//! `stop_grace_period` from the manifest. With `version_env` the compose files' own
//! variable carries the version instead of `image`.
//!
//! `recreate` is `docker compose up -d --no-deps <service>`: Compose's own container, on the
//! ports the compose files publish. The proxied strategies run containers beside each other
//! with `docker compose run -d --no-deps` (same networks, volumes and environment as the
//! service), each publishing the service's `port` on a free loopback port, behind the
//! agent's proxy on the stable `serve` address: the strategies of [`crate::rollout`],
//! shared with the process driver. A container is healthy when Docker says so (its own
//! healthcheck, when it has one) and upshift's health check passes through its published
//! port.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;
use upshift_agent::{RouteStatus, Upstream};
use upshift_core::Manifest;
use upshift_core::driver::{ComponentStatus, Deployed, Driver, DriverError, InstanceStatus};
use upshift_core::manifest::{Component, ComposeSpec, DriverKind, DriverSpec, Probe};

use crate::agent::Agent;
use crate::health;
use crate::rollout::{self, Instance, Instances, LIVE};
use crate::strings;

/// Labels upshift puts on the containers it makes.
const LABEL_COMPONENT: &str = "dev.upshift.component";
const LABEL_SLOT: &str = "dev.upshift.slot";
const LABEL_VERSION: &str = "dev.upshift.version";
const LABEL_ADDR: &str = "dev.upshift.addr";
/// On a container put back in place of one upshift took over: it still counts as not
/// deployed by upshift.
const LABEL_ADOPTED: &str = "dev.upshift.adopted";
/// Compose's own labels.
const LABEL_PROJECT: &str = "com.docker.compose.project";
const LABEL_SERVICE: &str = "com.docker.compose.service";
const LABEL_ONEOFF: &str = "com.docker.compose.oneoff";

/// The files Compose reads when none is named, in its order.
const DEFAULT_FILES: &[&str] = &["compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml"];

/// Variables set for one `docker compose` call.
type Env = Vec<(String, String)>;

fn refused(message: impl Into<String>) -> DriverError {
    DriverError::Refused(message.into())
}

/// The Compose driver's settings of a component.
fn spec(component: &Component) -> Result<&ComposeSpec, DriverError> {
    component.compose().ok_or_else(|| {
        refused(format!(
            "component {} uses the {} driver, not the compose driver",
            component.name,
            component.driver.kind().as_str()
        ))
    })
}

/// Runs `docker` with `args` (and `env`), and returns its stdout; a failure names the
/// command and says what Docker said: `Unavailable` when there is no Docker to ask,
/// `Refused` when it answered no.
fn docker(args: &[String], env: &[(String, String)], cwd: &Path) -> Result<String, DriverError> {
    let output = Command::new("docker")
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            DriverError::Unavailable(format!(
                "could not run docker ({e}); install the Docker CLI with Compose v2 (see ci/engines/docker.sh)"
            ))
        })?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let said: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let said = said[said.len().saturating_sub(6)..].join("\n  ");
    let shown = args.iter().take(12).cloned().collect::<Vec<_>>().join(" ");
    let message = format!("`docker {shown}` failed ({}): {said}", output.status);
    if stderr.contains("Cannot connect to the Docker daemon") || stderr.contains("Is the docker daemon running") {
        return Err(DriverError::Unavailable(format!(
            "{message}\n  Docker does not answer: start dockerd, or set DOCKER_HOST to where it listens"
        )));
    }
    // It ran and said no: a bad file, a port taken, an image missing.
    Err(DriverError::Refused(message))
}

/// Whole seconds, rounded up (Docker's stop timeouts are seconds).
fn seconds(duration: Duration) -> String {
    duration.as_secs().saturating_add(u64::from(duration.subsec_nanos() > 0)).to_string()
}

/// What `docker inspect` says of a container (the fields upshift reads).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Inspected {
    id: String,
    name: String,
    /// The image id it runs (`sha256:...`).
    image: String,
    config: InspectedConfig,
    state: InspectedState,
    network_settings: InspectedNetwork,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectedConfig {
    image: String,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectedState {
    running: bool,
    status: String,
    exit_code: i64,
    health: Option<InspectedHealth>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectedHealth {
    status: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectedNetwork {
    #[serde(default)]
    ports: Option<BTreeMap<String, Option<Vec<PortBinding>>>>,
    #[serde(default)]
    networks: Option<BTreeMap<String, Attachment>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Attachment {
    #[serde(rename = "IPAddress")]
    ip_address: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PortBinding {
    host_ip: String,
    host_port: String,
}

/// One container of the service, as upshift sees it.
#[derive(Clone, Debug)]
struct Container {
    id: String,
    name: String,
    slot: String,
    version: String,
    image: String,
    addr: Option<String>,
    running: bool,
    /// Docker's verdict from the container's own healthcheck, when it has one.
    health: Option<String>,
    status: String,
    exit_code: i64,
    /// Not deployed by upshift: Compose made it before upshift took the service over.
    adopted: bool,
}

impl Container {
    fn instance(&self) -> Instance {
        Instance {
            slot: self.slot.clone(),
            version: self.version.clone(),
            addr: self.addr.clone(),
            running: self.running,
        }
    }

    /// Whether Docker counts it as up: running, and healthy when it has a healthcheck.
    fn docker_says_up(&self) -> Result<(), String> {
        if !self.running {
            return Err(format!("its container {} is {} (exit code {})", self.name, self.status, self.exit_code));
        }
        match self.health.as_deref() {
            None | Some("healthy") => Ok(()),
            Some(other) => Err(format!("its container {} is {other} by its own healthcheck", self.name)),
        }
    }
}

/// The address a container port is published on, as a client reaches it.
fn published(inspected: &Inspected, port: Option<u16>) -> Option<String> {
    let port = port?;
    let ports = inspected.network_settings.ports.as_ref()?;
    let binding = ports.get(&format!("{port}/tcp"))?.as_ref()?.first()?;
    let host = match binding.host_ip.as_str() {
        "" | "0.0.0.0" => "127.0.0.1",
        "::" => "[::1]",
        ip => ip,
    };
    Some(format!("{host}:{}", binding.host_port))
}

/// What one look finds: every container, the proxy's route, and which container serves.
type Look = (Vec<Container>, Option<RouteStatus>, Option<usize>);

/// Runs components as Compose services.
pub struct ComposeDriver {
    manifest: Manifest,
    /// The manifest's folder, absolute: relative compose files are found from it.
    cwd: PathBuf,
    /// Where override files go.
    overrides: PathBuf,
    /// The upshift binary, to start the agent the proxied strategies need (none: connect
    /// only to a running agent, for `status`).
    program: Option<PathBuf>,
    agent: Option<Agent>,
    /// Project names Compose gave, by component (asked once).
    projects: RefCell<BTreeMap<String, String>>,
    /// A put back of a service upshift took over is under way: its containers keep
    /// counting as not deployed by upshift.
    putting_back_adopted: bool,
}

impl ComposeDriver {
    /// A driver for the manifest's Compose components; the agent is started (with
    /// `program agent`) only when a proxied strategy needs its proxy.
    pub fn new(manifest: &Manifest, program: Option<&Path>) -> Result<ComposeDriver, DriverError> {
        let cwd = std::env::current_dir().map_err(|e| refused(e.to_string()))?.join(&manifest.base_dir);
        Ok(ComposeDriver {
            manifest: manifest.clone(),
            cwd,
            overrides: std::env::current_dir()
                .map_err(|e| refused(e.to_string()))?
                .join(&manifest.state_dir)
                .join("compose"),
            program: program.map(Path::to_path_buf),
            agent: None,
            projects: RefCell::default(),
            putting_back_adopted: false,
        })
    }

    fn expand(&self, text: &str) -> Result<String, DriverError> {
        self.manifest.expand(text).map_err(refused)
    }

    /// The agent, started when needed (or, for `status`, only when it already runs).
    fn agent(&mut self) -> Result<Option<&mut Agent>, DriverError> {
        if self.agent.is_none() {
            self.agent = match &self.program {
                Some(program) => Some(Agent::start(&self.manifest, program)?),
                None => Agent::connect(&self.manifest),
            };
        }
        Ok(self.agent.as_mut())
    }

    /// The compose files, absolute, as `-f` arguments.
    fn file_args(&self, spec: &ComposeSpec) -> Result<Vec<String>, DriverError> {
        let files: Vec<PathBuf> = if spec.files.is_empty() {
            let found = DEFAULT_FILES.iter().map(|f| self.cwd.join(f)).find(|p| p.is_file());
            vec![found.ok_or_else(|| {
                refused(format!(
                    "no compose file in {} (looked for {}); name them with `files`",
                    self.cwd.display(),
                    DEFAULT_FILES.join(", ")
                ))
            })?]
        } else {
            spec.files.iter().map(|f| Ok(self.cwd.join(self.expand(f)?))).collect::<Result<_, DriverError>>()?
        };
        Ok(files.iter().flat_map(|f| ["-f".to_owned(), f.display().to_string()]).collect())
    }

    /// `docker compose -p <project> -f ... [-f override]` and the environment that carries
    /// the version.
    fn compose(
        &self,
        component: &Component,
        version: Option<&str>,
        override_file: Option<&Path>,
    ) -> Result<(Vec<String>, Env), DriverError> {
        let spec = spec(component)?;
        let mut args = vec!["compose".to_owned()];
        args.extend(self.file_args(spec)?);
        if let Some(file) = override_file {
            args.extend(["-f".to_owned(), file.display().to_string()]);
        }
        let project = self.project(component)?;
        args.extend(["-p".to_owned(), project]);
        let env = match (&spec.version_env, version) {
            (Some(var), Some(version)) => vec![(var.clone(), version.to_owned())],
            _ => Vec::new(),
        };
        Ok((args, env))
    }

    /// The project's name: the manifest's, else the one Compose derives (from the first
    /// file's folder), asked once.
    fn project(&self, component: &Component) -> Result<String, DriverError> {
        let spec = spec(component)?;
        if let Some(project) = &spec.project {
            return self.expand(project);
        }
        if let Some(known) = self.projects.borrow().get(&component.name) {
            return Ok(known.clone());
        }
        let mut args = vec!["compose".to_owned()];
        args.extend(self.file_args(spec)?);
        args.extend(strings(&["config", "--format", "json", "--no-interpolate", "--no-path-resolution"]));
        let config: serde_json::Value = serde_json::from_str(&docker(&args, &[], &self.cwd)?)
            .map_err(|e| refused(format!("`docker compose config` printed something that is not JSON: {e}")))?;
        let name = config["name"]
            .as_str()
            .ok_or_else(|| refused("`docker compose config` names no project; set `project`"))?
            .to_owned();
        self.projects.borrow_mut().insert(component.name.clone(), name.clone());
        Ok(name)
    }

    /// The image `version` runs: the manifest's `image` with `{version}` (or a pinned id).
    fn image(&self, spec: &ComposeSpec, version: &str) -> Result<Option<String>, DriverError> {
        spec.image.as_ref().map(|i| Ok(crate::process::fill(&self.expand(i)?, version, None))).transpose()
    }

    /// Writes the override file of a slot: image, labels, stop settings.
    fn write_override(
        &self,
        component: &Component,
        version: &str,
        slot: &str,
        addr: Option<&str>,
    ) -> Result<PathBuf, DriverError> {
        let spec = spec(component)?;
        let mut service = serde_json::Map::new();
        if let Some(image) = self.image(spec, version)? {
            service.insert("image".into(), json!(image));
        }
        let mut labels = json!({ LABEL_COMPONENT: component.name, LABEL_SLOT: slot, LABEL_VERSION: version });
        if let Some(addr) = addr {
            labels[LABEL_ADDR] = json!(addr);
        }
        if self.putting_back_adopted {
            labels[LABEL_ADOPTED] = json!("true");
        }
        service.insert("labels".into(), labels);
        if let Some(signal) = &spec.stop_signal {
            service.insert("stop_signal".into(), json!(signal));
        }
        service.insert("stop_grace_period".into(), json!(format!("{}s", seconds(component.drain))));
        let document = json!({ "services": { spec.service.clone(): service } });
        std::fs::create_dir_all(&self.overrides)
            .map_err(|e| refused(format!("creating {}: {e}", self.overrides.display())))?;
        let path = self.overrides.join(format!("{}-{}.json", component.name, container_safe(slot)));
        let text = serde_json::to_string_pretty(&document).map_err(|e| refused(e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| refused(format!("writing {}: {e}", path.display())))?;
        Ok(path)
    }

    /// Checks that the compose files are valid with `version`'s override, as Compose reads
    /// them (`docker compose config --quiet`); returns the override file.
    fn check_files(&self, component: &Component, version: &str) -> Result<PathBuf, DriverError> {
        let override_file = self.write_override(component, version, "preflight", None)?;
        let (mut args, env) = self.compose(component, Some(version), Some(&override_file))?;
        args.extend(strings(&["config", "--quiet"]));
        docker(&args, &env, &self.cwd).map_err(|e| match e {
            DriverError::Refused(m) => refused(format!("{} {version}: {m}", component.name)),
            other => other,
        })?;
        Ok(override_file)
    }

    /// Every container of the component's service (Compose's own and upshift's), oldest
    /// first.
    fn containers(&self, component: &Component) -> Result<Vec<Container>, DriverError> {
        let spec = spec(component)?.clone();
        let project = self.project(component)?;
        let mut attempt = 0;
        let inspected: Vec<Inspected> = loop {
            let ids = docker(
                &strings(&[
                    "ps",
                    "--all",
                    "--quiet",
                    "--no-trunc",
                    "--filter",
                    &format!("label={LABEL_PROJECT}={project}"),
                    "--filter",
                    &format!("label={LABEL_SERVICE}={}", spec.service),
                ]),
                &[],
                &self.cwd,
            )?;
            let ids: Vec<String> = ids.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect();
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let mut args = vec!["inspect".to_owned()];
            args.extend(ids);
            match docker(&args, &[], &self.cwd) {
                Ok(text) => {
                    break serde_json::from_str(&text)
                        .map_err(|e| refused(format!("`docker inspect` printed something unexpected: {e}")))?;
                }
                // A container removed between the two calls: look again (a few times).
                Err(_) if attempt < 3 => attempt += 1,
                Err(e) => return Err(e),
            }
        };
        let mut containers = Vec::new();
        for c in inspected {
            let labels = c.config.labels.clone().unwrap_or_default();
            let ours = labels.get(LABEL_COMPONENT).is_some_and(|n| n == &component.name);
            // A one-off container someone else ran (`docker compose run`) is not the service.
            if !ours && labels.get(LABEL_ONEOFF).is_some_and(|o| o == "True") {
                continue;
            }
            let slot = labels.get(LABEL_SLOT).filter(|_| ours).cloned().unwrap_or_else(|| LIVE.to_owned());
            let addr = labels.get(LABEL_ADDR).cloned().or_else(|| published(&c, spec.port));
            containers.push(Container {
                id: c.id.clone(),
                name: c.name.trim_start_matches('/').to_owned(),
                slot,
                // A container Compose made before upshift: its image reference stands in.
                version: labels.get(LABEL_VERSION).cloned().unwrap_or_else(|| c.config.image.clone()),
                image: c.image.clone(),
                addr,
                running: c.state.running,
                health: c.state.health.as_ref().map(|h| h.status.clone()),
                status: c.state.status.clone(),
                exit_code: c.state.exit_code,
                adopted: !ours || labels.get(LABEL_ADOPTED).is_some_and(|a| a == "true"),
            });
        }
        Ok(containers)
    }

    fn container(&self, component: &Component, slot: &str) -> Result<Option<Container>, DriverError> {
        Ok(self.containers(component)?.into_iter().find(|c| c.slot == slot))
    }

    /// The probe of a container: a command's `${VAR}` expanded, placeholders filled.
    fn probe(&self, component: &Component, instance: &Instance) -> Result<Option<Probe>, DriverError> {
        let Some(health) = &component.health else { return Ok(None) };
        Ok(Some(match &health.probe {
            Probe::Command(argv) => Probe::Command(
                argv.iter()
                    .map(|a| Ok(crate::process::fill(&self.expand(a)?, &instance.version, instance.addr.as_deref())))
                    .collect::<Result<_, DriverError>>()?,
            ),
            other => other.clone(),
        }))
    }

    /// Docker's verdict and upshift's check, once.
    fn health_now(&self, component: &Component, container: &Container) -> Result<(), String> {
        container.docker_says_up()?;
        match (&component.health, self.probe(component, &container.instance())) {
            (Some(health), Ok(Some(probe))) => health::once(&probe, container.addr.as_deref(), health.timeout),
            (Some(_), Err(e)) => Err(e.to_string()),
            _ => Ok(()),
        }
    }

    /// The proxy's route for the component, when a proxied strategy has one.
    fn route_of(&mut self, component: &Component) -> Result<Option<RouteStatus>, DriverError> {
        if !rollout::behind_proxy(component) {
            return Ok(None);
        }
        match self.agent()? {
            Some(agent) => agent.route_of(component),
            None => Ok(None),
        }
    }

    /// Every container, the route, and the container that serves (one look at Docker).
    fn look(&mut self, component: &Component) -> Result<Look, DriverError> {
        let containers = self.containers(component)?;
        let route = self.route_of(component)?;
        let instances: Vec<Instance> = containers.iter().map(Container::instance).collect();
        let live = rollout::live_of(component, &instances, route.as_ref())
            .and_then(|live| instances.iter().position(|i| std::ptr::eq(i, live)));
        Ok((containers, route, live))
    }

    /// The image a record puts back: its id when the record has one.
    fn pinned(previous: &Deployed, component: &Component) -> Deployed {
        let mut pinned = previous.clone();
        let mut old = previous.spec(component).clone();
        if let (DriverSpec::Compose(spec), Some(image)) = (&mut old.driver, previous.detail["image"].as_str()) {
            spec.image = Some(image.to_owned());
            spec.build = false;
        }
        pinned.component = Some(old);
        pinned
    }
}

/// Checks, changing nothing in the project, that `component`'s compose files are valid
/// with `version` (`docker compose config --quiet`): for `upshift config check`.
pub fn check_compose_files(manifest: &Manifest, component: &Component, version: &str) -> Result<(), DriverError> {
    let driver = ComposeDriver::new(manifest, None)?;
    let override_file = driver.check_files(component, version)?;
    let _ = std::fs::remove_file(override_file);
    Ok(())
}

/// The address of the running container of `service` in the Compose project of the
/// manifest's first compose component, on its network: `[database] via = { compose = .. }`
/// (on Linux the host reaches container networks directly, so the database needs no
/// published port).
pub fn service_address(manifest: &Manifest, service: &str) -> Result<String, DriverError> {
    let component =
        manifest.components.iter().find(|c| c.compose().is_some()).ok_or_else(|| {
            refused("[database] via names a Compose service, and no component uses driver = \"compose\"")
        })?;
    let driver = ComposeDriver::new(manifest, None)?;
    let project = driver.project(component)?;
    let ids = docker(
        &strings(&[
            "ps",
            "--quiet",
            "--filter",
            &format!("label={LABEL_PROJECT}={project}"),
            "--filter",
            &format!("label={LABEL_SERVICE}={service}"),
        ]),
        &[],
        &driver.cwd,
    )?;
    let Some(id) = ids.split_whitespace().next() else {
        return Err(DriverError::Unavailable(format!(
            "[database] via: service {service} of Compose project {project} runs no container; start it \
             (docker compose -p {project} up --detach {service})"
        )));
    };
    let inspected: Vec<Inspected> = serde_json::from_str(&docker(&strings(&["inspect", id]), &[], &driver.cwd)?)
        .map_err(|e| refused(format!("`docker inspect` printed something unexpected: {e}")))?;
    inspected
        .first()
        .and_then(|c| c.network_settings.networks.as_ref())
        .and_then(|networks| networks.values().map(|n| n.ip_address.clone()).find(|ip| !ip.is_empty()))
        .ok_or_else(|| {
            DriverError::Unavailable(format!("[database] via: the container of {service} has no network address"))
        })
}

/// The last lines a container wrote (stdout and stderr), for a failure message.
fn logs(id: &str) -> String {
    let Ok(output) = Command::new("docker").args(["logs", "--tail", "5", id]).stdin(Stdio::null()).output() else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    text.lines().filter(|l| !l.trim().is_empty()).fold(String::new(), |out, line| out + "\n    " + line)
}

/// A slot as part of a container name (`2.0.0#1` -> `2.0.0-1`).
fn container_safe(slot: &str) -> String {
    slot.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' { c } else { '-' }).collect()
}

impl Instances for ComposeDriver {
    fn observe(&mut self, component: &Component) -> Result<(Vec<Instance>, Option<RouteStatus>), DriverError> {
        let instances = self.containers(component)?.iter().map(Container::instance).collect();
        Ok((instances, self.route_of(component)?))
    }

    fn start(
        &mut self,
        component: &Component,
        version: &str,
        slot: &str,
        addr: Option<&str>,
    ) -> Result<Instance, DriverError> {
        let spec = spec(component)?.clone();
        let override_file = self.write_override(component, version, slot, addr.filter(|_| slot != LIVE))?;
        let (mut args, env) = self.compose(component, Some(version), Some(&override_file))?;
        if slot == LIVE {
            args.extend(strings(&["up", "--detach", "--no-deps", "--quiet-pull"]));
            if spec.build {
                args.push("--build".into());
            }
            args.push(spec.service.clone());
        } else {
            let addr = addr.ok_or_else(|| refused(format!("slot {slot} of {} needs an address", component.name)))?;
            let port = spec.port.ok_or_else(|| refused(format!("component {} has no `port`", component.name)))?;
            let project = self.project(component)?;
            args.extend(strings(&["run", "--detach", "--no-deps", "--quiet-pull"]));
            if spec.build {
                args.push("--build".into());
            }
            args.extend([
                "--name".to_owned(),
                format!("{project}-{}-{}", spec.service, container_safe(slot)),
                "--publish".to_owned(),
                format!("{addr}:{port}"),
                "--label".to_owned(),
                format!("{LABEL_COMPONENT}={}", component.name),
                "--label".to_owned(),
                format!("{LABEL_SLOT}={slot}"),
                "--label".to_owned(),
                format!("{LABEL_VERSION}={version}"),
                "--label".to_owned(),
                format!("{LABEL_ADDR}={addr}"),
                spec.service.clone(),
            ]);
        }
        docker(&args, &env, &self.cwd)?;
        let container = self.container(component, slot)?.ok_or_else(|| {
            DriverError::Unavailable(format!(
                "{} {version}: Compose started no container in slot {slot}",
                component.name
            ))
        })?;
        Ok(container.instance())
    }

    fn stop(&mut self, component: &Component, slot: &str) -> Result<(), DriverError> {
        let ids: Vec<String> =
            self.containers(component)?.into_iter().filter(|c| c.slot == slot).map(|c| c.id).collect();
        if ids.is_empty() {
            return Ok(());
        }
        // The stop signal (SIGTERM unless the service says otherwise), `drain` to finish,
        // then SIGKILL; then the container goes, so the slot is free.
        let mut stop = strings(&["stop", "--time", &seconds(component.drain)]);
        stop.extend(ids.iter().cloned());
        docker(&stop, &[], &self.cwd)?;
        let mut remove = strings(&["rm", "--force", "--volumes"]);
        remove.extend(ids);
        docker(&remove, &[], &self.cwd).map(drop)
    }

    fn wait_healthy(&self, component: &Component, instance: &Instance) -> Result<(), DriverError> {
        let unhealthy = |m: String| DriverError::Unhealthy(format!("{} {}: {m}", component.name, instance.version));
        let deadline_in = component.health.as_ref().map_or(Duration::from_mins(1), |h| h.deadline);
        let interval = component.health.as_ref().map_or(Duration::from_millis(250), |h| h.interval);
        let deadline = Instant::now() + deadline_in;
        // Docker's side first: running, and healthy by its own healthcheck.
        loop {
            let container = self.container(component, &instance.slot)?;
            let why = match &container {
                Some(c) => c.docker_says_up().err(),
                None => Some(format!("no container in slot {}", instance.slot)),
            };
            match (why, container) {
                (None, Some(container)) => {
                    let Some(health) = &component.health else { return Ok(()) };
                    let Some(probe) = self.probe(component, &container.instance())? else { return Ok(()) };
                    let left = deadline.saturating_duration_since(Instant::now());
                    let health = upshift_core::manifest::Health { deadline: left, ..health.clone() };
                    return health::wait(&health, &probe, container.addr.as_deref()).map_err(unhealthy);
                }
                (why, container) => {
                    // Exited, or unhealthy by its own healthcheck (Docker's verdict after its
                    // retries, which `docker compose up --wait` takes as final too).
                    let failed =
                        container.as_ref().is_some_and(|c| !c.running || c.health.as_deref() == Some("unhealthy"));
                    if failed || Instant::now() + interval > deadline {
                        let logs = container.map(|c| logs(&c.id)).unwrap_or_default();
                        let why = why.unwrap_or_default();
                        return Err(unhealthy(if failed {
                            format!("{why}{logs}")
                        } else {
                            format!("not healthy within {}ms: {why}{logs}", deadline_in.as_millis())
                        }));
                    }
                }
            }
            std::thread::sleep(interval);
        }
    }

    fn healthy_now(&self, component: &Component, instance: &Instance) -> bool {
        self.container(component, &instance.slot)
            .ok()
            .flatten()
            .is_some_and(|container| self.health_now(component, &container).is_ok())
    }

    fn route(&mut self, component: &Component, upstreams: Vec<Upstream>) -> Result<(), DriverError> {
        let name = component.name.clone();
        self.agent()?
            .ok_or_else(|| DriverError::Unavailable(format!("{name}: the agent does not run")))?
            .route(component, upstreams)
    }

    fn recreate_address(&self, _component: &Component, _previous: Option<&str>) -> Result<Option<String>, DriverError> {
        // Compose's own container listens where the compose files publish it.
        Ok(None)
    }
}

impl Driver for ComposeDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Compose
    }

    fn current(&mut self, component: &Component) -> Result<Option<Deployed>, DriverError> {
        let (containers, _, live) = self.look(component)?;
        let Some(live) = live.map(|i| &containers[i]) else { return Ok(None) };
        let deployed =
            Deployed::new(&live.version, component, json!({ "addr": live.addr, "image": Some(&live.image) }));
        Ok(Some(if live.adopted { deployed.adopted() } else { deployed }))
    }

    fn deploy(&mut self, component: &Component, version: &str, say: &dyn Fn(&str)) -> Result<(), DriverError> {
        rollout::deploy(self, component, version, say)
    }

    fn put_back(&mut self, component: &Component, previous: Option<&Deployed>) -> Result<(), DriverError> {
        let pinned = previous.map(|p| ComposeDriver::pinned(p, component));
        self.putting_back_adopted = previous.is_some_and(|p| p.adopted);
        let result = rollout::put_back(self, component, pinned.as_ref());
        self.putting_back_adopted = false;
        result
    }

    fn check_put_back(&mut self, previous: &Deployed, fallback: &Component) -> Result<(), DriverError> {
        let pinned = ComposeDriver::pinned(previous, fallback);
        let old = pinned.spec(fallback);
        let image = self.image(spec(old)?, &previous.version)?;
        if let Some(image) = image {
            docker(&strings(&["image", "inspect", "--format", "{{.Id}}", &image]), &[], &self.cwd).map_err(|_| {
                refused(format!(
                    "{} {}: its image {image} is no longer on this Docker Engine; pull or load it first",
                    old.name, previous.version
                ))
            })?;
        }
        Ok(())
    }

    fn preflight(&mut self, component: &Component, version: &str) -> Result<(), DriverError> {
        let spec = spec(component)?.clone();
        let override_file = self.check_files(component, version)?;
        // The image is here, or Compose can pull it (or build it).
        if !spec.build {
            let (mut args, env) = self.compose(component, Some(version), Some(&override_file))?;
            args.extend(strings(&["config", "--format", "json", &spec.service]));
            let config: serde_json::Value = serde_json::from_str(&docker(&args, &env, &self.cwd)?)
                .map_err(|e| refused(format!("`docker compose config` printed something that is not JSON: {e}")))?;
            let image = config["services"][&spec.service]["image"].as_str().unwrap_or_default().to_owned();
            let here = docker(&strings(&["image", "inspect", "--format", "{{.Id}}", &image]), &[], &self.cwd).is_ok();
            if !here {
                let (mut args, env) = self.compose(component, Some(version), Some(&override_file))?;
                args.extend(strings(&["pull", "--quiet", &spec.service]));
                docker(&args, &env, &self.cwd).map_err(|e| {
                    refused(format!(
                        "{} {version}: its image {image} is not on this Docker Engine and could not be pulled: {e}",
                        component.name
                    ))
                })?;
            }
        }
        let _ = std::fs::remove_file(override_file);
        if rollout::behind_proxy(component) {
            let (_, route) = self.observe(component)?;
            crate::agent::serve_is_free_or_ours(component, route.as_ref())?;
        }
        Ok(())
    }

    fn check_health(&mut self, component: &Component) -> Result<(), DriverError> {
        rollout::check_health(self, component)
    }

    fn status(&mut self, component: &Component) -> Result<ComponentStatus, DriverError> {
        let (containers, route, live) = self.look(component)?;
        let live = live.map(|i| &containers[i]).filter(|c| c.running);
        let health = match live {
            Some(c) => self
                .health_now(component, c)
                .map_err(|e| format!("{} {} at {}: {e}", component.name, c.version, c.addr.as_deref().unwrap_or("-"))),
            None => Err(format!("no container of {} runs and serves", component.name)),
        };
        let instances = containers
            .iter()
            .map(|c| {
                let figures = route.as_ref().and_then(|r| {
                    r.upstreams
                        .iter()
                        .find(|u| Some(&u.upstream.addr) == c.addr.as_ref() && u.upstream.version == c.version)
                });
                InstanceStatus {
                    version: c.version.clone(),
                    slot: c.slot.clone(),
                    addr: c.addr.clone(),
                    pid: None,
                    running: c.running,
                    restarts: 0,
                    serving: route.as_ref().map_or(c.running, |_| figures.is_some_and(|f| f.upstream.weight > 0)),
                    weight: figures.map(|f| f.upstream.weight),
                    requests: figures.map(|f| f.requests),
                    errors: figures.map(|f| f.errors),
                    p99_ms: figures.and_then(|f| f.window.p99_ms),
                }
            })
            .collect();
        Ok(ComponentStatus {
            healthy: health.is_ok(),
            problem: health.err(),
            version: live.map(|c| c.version.clone()),
            instances,
            versions: Vec::new(),
        })
    }

    fn note_run(&mut self, run: &str) {
        if let Some(agent) = self.agent.as_mut() {
            agent.note_run(run);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_become_container_names_and_stop_timeouts_round_up() {
        assert_eq!(container_safe("2.0.0#1"), "2.0.0-1");
        assert_eq!(container_safe("blue"), "blue");
        assert_eq!(seconds(Duration::from_millis(1500)), "2");
        assert_eq!(seconds(Duration::from_secs(10)), "10");
        assert_eq!(seconds(Duration::ZERO), "0");
    }
}
