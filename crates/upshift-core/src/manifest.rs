//! `upshift.toml`: read, checked, and expanded.
//!
//! Every mistake names the file, line and column and says what was expected. Unknown keys
//! are refused. `${VAR}` is read from the environment when the manifest is loaded; an
//! undefined variable is an error, never an empty string.
//!
//! Everything is typed: `[app]`, `[database]`, `[backup]`, `[[components]]`, `[verify]`,
//! `[[releases]]` and `[agent]`. Placeholders (`{version}`, `{addr}`, `{port}`) are checked
//! at load, and every value that came from the environment is remembered so output can
//! redact it ([`Manifest::redact`]).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;
use upshift_migrate::external::{External, Tool};

/// A manifest that could not be used.
#[derive(Debug, thiserror::Error)]
pub struct ManifestError {
    /// The manifest file.
    pub path: PathBuf,
    /// 1-based line and column of the mistake, when it has a place.
    pub position: Option<(usize, usize)>,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        write!(f, ": {}", self.message)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    app: Option<RawApp>,
    database: Option<RawDatabase>,
    backup: Option<RawBackup>,
    #[serde(default)]
    components: Vec<RawComponent>,
    verify: Option<RawVerify>,
    #[serde(default)]
    releases: Vec<RawRelease>,
    agent: Option<RawAgent>,
    #[serde(default)]
    hooks: Vec<RawHook>,
    #[serde(default)]
    preflight: Vec<RawPreflight>,
    notify: Option<RawNotify>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    name: Option<Spanned<String>>,
    at: Spanned<HookPoint>,
    run: Spanned<Vec<Spanned<String>>>,
    undo: Option<Spanned<Vec<Spanned<String>>>>,
    timeout: Option<HumanDuration>,
    #[serde(default)]
    env: BTreeMap<String, Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPreflight {
    name: Option<String>,
    run: Spanned<Vec<Spanned<String>>>,
    expect_exit: Option<i32>,
    expect_output: Option<String>,
    timeout: Option<HumanDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    webhook: Option<Spanned<String>>,
    command: Option<Spanned<Vec<Spanned<String>>>>,
    on: Option<Vec<NotifyEvent>>,
    timeout: Option<HumanDuration>,
}

/// `[[hooks]] at`: the point of a run where a hook runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookPoint {
    /// Before the backup (after preflight): the first change of the run.
    PreBackup,
    /// After the backup.
    PostBackup,
    /// Before the first component is deployed (after the expand migrations).
    PreDeploy,
    /// After the last component is deployed.
    PostDeploy,
    /// After verify (and its watch), before the contract migrations.
    PostVerify,
    /// When an upgrade fails, before its undo.
    OnFailure,
    /// After an undo or a rollback is done.
    OnRollback,
}

impl HookPoint {
    /// The name used in the manifest and output.
    pub fn as_str(self) -> &'static str {
        match self {
            HookPoint::PreBackup => "pre-backup",
            HookPoint::PostBackup => "post-backup",
            HookPoint::PreDeploy => "pre-deploy",
            HookPoint::PostDeploy => "post-deploy",
            HookPoint::PostVerify => "post-verify",
            HookPoint::OnFailure => "on-failure",
            HookPoint::OnRollback => "on-rollback",
        }
    }

    /// Whether the hook is a step of the upgrade's plan (else it runs in the undo).
    pub fn is_step(self) -> bool {
        !matches!(self, HookPoint::OnFailure | HookPoint::OnRollback)
    }
}

/// `[[hooks]]`: a command at a fixed point of an upgrade, with its own undo. Its strings
/// keep their `${VAR}` references (checked set at load), like a component's, so a hook is
/// journaled in the plan without secrets; `{version}` and `{from}` are filled when it runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    /// Its name (default `<at>-<n>`).
    pub name: String,
    /// When it runs.
    pub at: HookPoint,
    /// The command.
    pub run: Vec<String>,
    /// The command that undoes it, run when the run that ran it is undone.
    pub undo: Option<Vec<String>>,
    /// Time each command may take (default 5m).
    pub timeout: Duration,
    /// Environment added to upshift's.
    pub env: BTreeMap<String, String>,
}

/// `[[preflight]]`: a command that must succeed before an upgrade changes anything (a
/// tool's version, a cluster's state).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreflightCheck {
    /// Its name (default: the command).
    pub name: String,
    /// The command, `${VAR}` expanded.
    pub run: Vec<String>,
    /// The exit code expected (default 0).
    pub expect_exit: i32,
    /// Text its output must contain.
    pub expect_output: Option<String>,
    /// Time it may take (default 30s).
    pub timeout: Duration,
}

/// When `[notify]` speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NotifyEvent {
    /// A run (upgrade or rollback) began.
    Start,
    /// An upgrade deployed its release.
    Success,
    /// An upgrade failed (then was undone, or is stuck).
    Failure,
    /// A rollback (or an abort) finished.
    Rollback,
}

impl NotifyEvent {
    /// The name used in the manifest and the message.
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyEvent::Start => "start",
            NotifyEvent::Success => "success",
            NotifyEvent::Failure => "failure",
            NotifyEvent::Rollback => "rollback",
        }
    }
}

/// `[notify]`: who hears of runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notify {
    /// An `http://` or `https://` URL that gets a JSON POST; holds secrets (print redacted).
    pub webhook: Option<String>,
    /// A command that gets the same JSON on stdin, `${VAR}` expanded.
    pub command: Option<Vec<String>>,
    /// The events (default: all).
    pub on: Vec<NotifyEvent>,
    /// Time each may take (default 10s).
    pub timeout: Duration,
}

/// `rollback` of a component: whether an undo puts it back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RollbackPolicy {
    /// Undo puts the previous version back (the default).
    #[default]
    Always,
    /// Never put back or stopped by an undo (a data layer whose upgrades are one-way).
    Never,
}

/// A duration written for people: `250ms`, `2s`, `1m30s`, `7d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map(HumanDuration).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{text}` is not a duration ({e}); expected one like \"250ms\", \"2s\" or \"1m\""
            ))
        })
    }
}

/// How a component is run: which driver of the registry rolls it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DriverKind {
    /// Local processes supervised by the agent.
    Process,
    /// Docker Compose services.
    Compose,
    /// Kubernetes workloads.
    Kubernetes,
    /// Helm releases.
    Helm,
}

/// How a new version replaces the old one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Stop the old, then start the new.
    Recreate,
    /// Replace instances one at a time.
    Rolling,
    /// Start the new beside the old, switch the proxy, drain the old.
    BlueGreen,
    /// Send a growing share of requests to the new version.
    Canary,
}

impl DriverKind {
    /// The name used in the manifest and output.
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Process => "process",
            DriverKind::Compose => "compose",
            DriverKind::Kubernetes => "kubernetes",
            DriverKind::Helm => "helm",
        }
    }
}

impl Strategy {
    /// The name used in the manifest and output.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Recreate => "recreate",
            Strategy::Rolling => "rolling",
            Strategy::BlueGreen => "blue-green",
            Strategy::Canary => "canary",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawComponent {
    name: Spanned<String>,
    driver: DriverKind,
    run: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    env: BTreeMap<String, Spanned<String>>,
    serve: Option<Spanned<String>>,
    strategy: Option<Strategy>,
    health: Option<RawHealth>,
    drain: Option<HumanDuration>,
    instances: Option<u32>,
    steps: Option<Vec<u32>>,
    step_interval: Option<HumanDuration>,
    max_error_rate: Option<f64>,
    max_p99_ms: Option<u64>,
    // compose
    files: Option<Vec<Spanned<String>>>,
    project: Option<Spanned<String>>,
    service: Option<Spanned<String>>,
    version_env: Option<Spanned<String>>,
    build: Option<bool>,
    port: Option<u16>,
    stop_signal: Option<Spanned<String>>,
    // compose, kubernetes
    image: Option<Spanned<String>>,
    // kubernetes, helm
    namespace: Option<Spanned<String>>,
    // kubernetes
    deployment: Option<Spanned<String>>,
    container: Option<Spanned<String>>,
    context: Option<Spanned<String>>,
    manifests: Option<Vec<Spanned<String>>>,
    // helm
    release: Option<Spanned<String>>,
    chart: Option<Spanned<String>>,
    chart_version: Option<Spanned<String>>,
    values: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    set: BTreeMap<String, Spanned<String>>,
    timeout: Option<HumanDuration>,
    tests: Option<bool>,
    rollback: Option<RollbackPolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    http: Option<String>,
    tcp: Option<bool>,
    command: Option<Vec<Spanned<String>>>,
    status: Option<u16>,
    body: Option<String>,
    interval: Option<HumanDuration>,
    timeout: Option<HumanDuration>,
    healthy_after: Option<u32>,
    deadline: Option<HumanDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVerify {
    #[serde(default)]
    smoke: Vec<Vec<Spanned<String>>>,
    timeout: Option<HumanDuration>,
    watch: Option<HumanDuration>,
    watch_interval: Option<HumanDuration>,
    prometheus: Option<Spanned<RawPrometheus>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrometheus {
    url: Spanned<String>,
    error_rate: Option<Spanned<String>>,
    p99_ms: Option<Spanned<String>>,
}

/// `[verify] prometheus`: the queries a Kubernetes canary step is also judged on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prometheus {
    /// The server (`http://prometheus:9090`); queries go to `<url>/api/v1/query`.
    pub url: String,
    /// PromQL with `{version}`: the new version's error rate, a fraction from 0 to 1.
    pub error_rate: Option<String>,
    /// PromQL with `{version}`: the new version's p99 latency in milliseconds.
    pub p99_ms: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    metrics: Option<Spanned<String>>,
}

/// `[agent]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Agent {
    /// Where the opt-in Prometheus metrics listen, e.g. `127.0.0.1:9464`.
    pub metrics: Option<String>,
}

/// A deprecation announced by a release.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Deprecation {
    /// What is deprecated.
    pub what: String,
    /// The version that removes it.
    pub removed_in: Option<String>,
    /// What to use instead.
    pub instead: Option<String>,
}

/// A configuration option a release adds.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigAdded {
    /// The option.
    pub name: String,
    /// Its default.
    pub default: Option<String>,
    /// Whether it must be set.
    #[serde(default)]
    pub required: bool,
    /// What it does.
    pub doc: Option<String>,
}

/// A configuration option whose default a release changes.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigChanged {
    /// The option.
    pub name: String,
    /// The old default.
    pub from: String,
    /// The new default.
    pub to: String,
    /// Why.
    pub why: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelease {
    version: Spanned<semver::Version>,
    upgrade_from: Option<semver::VersionReq>,
    summary: Option<String>,
    #[serde(default)]
    breaking: Vec<String>,
    #[serde(default)]
    deprecated: Vec<Deprecation>,
    #[serde(default)]
    config_added: Vec<ConfigAdded>,
    #[serde(default)]
    config_removed: Vec<String>,
    #[serde(default)]
    config_changed: Vec<ConfigChanged>,
    migrate_to: Option<String>,
    #[serde(default)]
    downtime: Vec<Spanned<String>>,
}

/// How a component's health is checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Probe {
    /// GET this path on the component's address; healthy on `status` (default any 2xx)
    /// and, when given, a body containing `body`.
    Http { path: String, status: Option<u16>, body: Option<String> },
    /// A TCP connection to the component's address.
    Tcp,
    /// A command that exits 0 (placeholders filled at run time).
    Command(Vec<String>),
}

/// A health check and its timing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// What is checked.
    pub probe: Probe,
    /// Time between checks (default 1s).
    pub interval: Duration,
    /// Time one check may take (default 2s).
    pub timeout: Duration,
    /// Consecutive passes needed (default 1).
    pub healthy_after: u32,
    /// Time to become healthy before giving up (default 60s).
    pub deadline: Duration,
}

/// A component of the application: what every driver shares (name, strategy, health and
/// the strategy's settings) and, in [`DriverSpec`], what only its driver reads.
///
/// Strings keep their `${VAR}` references unexpanded (the loader checked that each is set),
/// so a component serializes into the journal without secrets and is expanded again with
/// [`Manifest::expand`] when it runs: a journaled component alone is enough to start it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Component {
    /// Its name.
    pub name: String,
    /// How it is run, with the driver's own settings.
    pub driver: DriverSpec,
    /// How versions replace each other (default `recreate`).
    pub strategy: Strategy,
    /// The health check, if any.
    pub health: Option<Health>,
    /// How long old instances get to finish requests (default 10s).
    pub drain: Duration,
    /// Instances to run (default 1).
    pub instances: u32,
    /// Canary steps in percent (default 5, 25, 50, 100).
    pub steps: Vec<u32>,
    /// Time at each canary step (default 30s).
    pub step_interval: Duration,
    /// Canary threshold: the error rate (0..1) that aborts.
    pub max_error_rate: Option<f64>,
    /// Canary threshold: the p99 latency that aborts.
    pub max_p99_ms: Option<u64>,
    /// Whether an undo puts it back.
    #[serde(default, skip_serializing_if = "is_default")]
    pub rollback: RollbackPolicy,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// What one driver needs to run a component. Each variant holds only its driver's keys;
/// the loader refuses another driver's key with its line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", deny_unknown_fields)]
pub enum DriverSpec {
    /// Local processes under the agent.
    Process(ProcessSpec),
    /// A Docker Compose service.
    Compose(ComposeSpec),
    /// A Kubernetes Deployment.
    Kubernetes {
        /// Its namespace.
        namespace: Option<String>,
        /// The Deployment.
        deployment: String,
        /// The container whose image changes.
        container: Option<String>,
        /// The image, with `{version}` (none with `manifests`, whose files hold it).
        image: Option<String>,
        /// The kubeconfig context (default: the current one).
        context: Option<String>,
        /// The Service whose selector blue-green switches.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service: Option<String>,
        /// Files of Kubernetes objects (relative to the manifest's folder, `*` in a file
        /// name), templated with `{version}` and applied server-side.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        manifests: Vec<String>,
    },
    /// A Helm release.
    Helm {
        /// The release.
        release: String,
        /// A local path or `repo/name`.
        chart: String,
        /// The chart version.
        chart_version: Option<String>,
        /// Its namespace.
        namespace: Option<String>,
        /// Values files.
        values: Vec<String>,
        /// `--set` values, with `{version}`.
        set: BTreeMap<String, String>,
        /// How long Helm waits.
        timeout: Option<Duration>,
        /// Run `helm test` in verify.
        tests: bool,
    },
}

impl DriverSpec {
    /// Which driver runs it.
    pub fn kind(&self) -> DriverKind {
        match self {
            DriverSpec::Process(_) => DriverKind::Process,
            DriverSpec::Compose(_) => DriverKind::Compose,
            DriverSpec::Kubernetes { .. } => DriverKind::Kubernetes,
            DriverSpec::Helm { .. } => DriverKind::Helm,
        }
    }
}

/// The process driver's settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    /// The command, with placeholders and unexpanded `${VAR}`.
    pub run: Vec<String>,
    /// Environment for the command, as `run`.
    pub env: BTreeMap<String, String>,
    /// The stable address the agent's proxy holds.
    pub serve: Option<String>,
}

/// The Compose driver's settings: one service of a Compose project.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComposeSpec {
    /// The compose files, base then overlays (relative to the manifest's folder); empty:
    /// Compose's own default file there.
    pub files: Vec<String>,
    /// The project name; none: the name Compose gives it.
    pub project: Option<String>,
    /// The service.
    pub service: String,
    /// The image, with `{version}`, written into an override file.
    pub image: Option<String>,
    /// Or the variable the compose files already use for the version.
    pub version_env: Option<String>,
    /// Build the image (`up --build`) before it runs.
    pub build: bool,
    /// The port the service listens on inside its container.
    pub port: Option<u16>,
    /// The stable address the agent's proxy holds (blue-green, rolling, canary).
    pub serve: Option<String>,
    /// The signal that stops a container (default: the service's own, else SIGTERM).
    pub stop_signal: Option<String>,
}

impl Component {
    /// The process driver's settings, when it is a process component.
    pub fn process(&self) -> Option<&ProcessSpec> {
        match &self.driver {
            DriverSpec::Process(spec) => Some(spec),
            _ => None,
        }
    }

    /// The Compose driver's settings, when it is a Compose service.
    pub fn compose(&self) -> Option<&ComposeSpec> {
        match &self.driver {
            DriverSpec::Compose(spec) => Some(spec),
            _ => None,
        }
    }

    /// Whether the component's health is checked: it has a `health` check, or its driver
    /// judges health itself (a Deployment's readiness, a Helm release's state and tests).
    pub fn checks_health(&self) -> bool {
        self.health.is_some() || matches!(self.driver.kind(), DriverKind::Kubernetes | DriverKind::Helm)
    }

    /// The stable address the agent's proxy holds, if any.
    pub fn serve(&self) -> Option<&str> {
        match &self.driver {
            DriverSpec::Process(spec) => spec.serve.as_deref(),
            DriverSpec::Compose(spec) => spec.serve.as_deref(),
            _ => None,
        }
    }
}

/// `[verify]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verify {
    /// Commands that must exit 0 after the rollout.
    pub smoke: Vec<Vec<String>>,
    /// Time each may take (default 60s).
    pub timeout: Duration,
    /// After the smoke commands, how long every component must stay healthy (the
    /// runbooks' "monitor for 30 min"); a failure in it undoes the release. Zero: none.
    pub watch: Duration,
    /// How often the watch checks (default 1s).
    pub watch_interval: Duration,
    /// Where a Kubernetes canary's PromQL queries go, and the queries.
    pub prometheus: Option<Prometheus>,
}

/// A release of the application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    /// Its version.
    pub version: semver::Version,
    /// Which deployed versions may upgrade to it.
    pub upgrade_from: Option<semver::VersionReq>,
    /// One line for people.
    pub summary: Option<String>,
    /// Breaking changes.
    pub breaking: Vec<String>,
    /// Deprecations.
    pub deprecated: Vec<Deprecation>,
    /// Options added.
    pub config_added: Vec<ConfigAdded>,
    /// Options removed.
    pub config_removed: Vec<String>,
    /// Defaults changed.
    pub config_changed: Vec<ConfigChanged>,
    /// The revision the schema goes to for this release (default: the heads).
    pub migrate_to: Option<String>,
    /// Components stopped before the expand migrations and started by their deploy step
    /// (their old code cannot run on the changed schema); meanwhile the proxy answers 503.
    pub downtime: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    name: String,
    state_dir: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackup {
    dir: Option<String>,
    keep_last: Option<usize>,
    keep_within: Option<Spanned<String>>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    encrypt_to: Vec<String>,
    #[serde(default)]
    artifacts: Vec<RawArtifact>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawArtifact {
    name: Spanned<String>,
    create: Spanned<Vec<Spanned<String>>>,
    restore: Spanned<Vec<Spanned<String>>>,
    timeout: Option<HumanDuration>,
}

/// `[[backup.artifacts]]`: state that is not the database, saved in the same backup by a
/// command and put back by another (`${VAR}` expanded at load).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupArtifact {
    /// Its name: letters, digits, `-` and `_`.
    pub name: String,
    /// Writes the artifact into `{out}`, or to stdout when it has no `{out}`.
    pub create: Vec<String>,
    /// Reads it back from `{in}`, or from stdin when it has no `{in}`.
    pub restore: Vec<String>,
    /// Time each command may take (default 10m).
    pub timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: Option<Spanned<String>>,
    migrations: Option<String>,
    min_server: Option<String>,
    #[serde(default)]
    no_transaction: Vec<String>,
    via: Option<Spanned<RawVia>>,
    migrator: Option<Spanned<RawMigrator>>,
    alembic: Option<Spanned<String>>,
    alembic_command: Option<Spanned<Vec<String>>>,
    commands: Option<Spanned<RawCommands>>,
    contract: Option<Spanned<Vec<String>>>,
}

/// `[database] migrator`: who runs the revisions.
#[derive(Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawMigrator {
    Upshift,
    Alembic,
    Commands,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommands {
    list: Spanned<Vec<String>>,
    current: Spanned<Vec<String>>,
    up: Spanned<Vec<String>>,
    down: Spanned<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVia {
    compose: Option<String>,
    kubernetes: Option<RawKubernetesVia>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKubernetesVia {
    pod: String,
    port: u16,
    namespace: Option<String>,
    context: Option<String>,
}

/// `[database] via`: how upshift reaches a database that is not published on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatabaseVia {
    /// The database is this service of the Compose project of the manifest's compose
    /// components: upshift connects to its container's address on the project's network.
    Compose {
        /// The service.
        service: String,
    },
    /// The database is a pod's port in a Kubernetes cluster: upshift opens a port-forward
    /// tunnel through the API server (what `kubectl port-forward` does) and connects to
    /// its local end.
    Kubernetes {
        /// The pod (`postgresql-0`).
        pod: String,
        /// The port the database listens on in the pod.
        port: u16,
        /// The pod's namespace (default: the context's).
        namespace: Option<String>,
        /// The kubeconfig context (default: the current one).
        context: Option<String>,
    },
}

/// A loaded manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The manifest file.
    pub path: PathBuf,
    /// `[app] name`.
    pub app_name: Option<String>,
    /// `[app] state_dir`, relative to the manifest's folder (default `.upshift`).
    pub state_dir: PathBuf,
    /// `[database] url`, with `${VAR}` expanded. Holds secrets: print it only redacted.
    pub database_url: Option<String>,
    /// `[database] migrations`, relative to the manifest's folder (default `migrations`).
    pub migrations_dir: PathBuf,
    /// `[database] min_server`: the oldest database server version the application supports.
    pub min_server: Option<String>,
    /// `[database] via`: where the URL's host really is.
    pub database_via: Option<DatabaseVia>,
    /// `[database] no_transaction`: revisions to run outside a transaction without editing
    /// their files.
    pub no_transaction: Vec<String>,
    /// `[database] migrator = "alembic"` or `"commands"`: the tool that owns the revisions;
    /// `None` for upshift's own files.
    pub migrator: Option<External>,
    /// The manifest's folder: where relative paths start.
    pub base_dir: PathBuf,
    /// `[backup]`.
    pub backup: BackupSettings,
    /// `[[components]]`, in manifest order.
    pub components: Vec<Component>,
    /// `[verify]`.
    pub verify: Verify,
    /// `[[releases]]`, in manifest order.
    pub releases: Vec<Release>,
    /// `[agent]`.
    pub agent: Agent,
    /// `[[hooks]]`, in manifest order.
    pub hooks: Vec<Hook>,
    /// `[[preflight]]`, in manifest order.
    pub preflight: Vec<PreflightCheck>,
    /// `[notify]`.
    pub notify: Option<Notify>,
    /// Every value that came from a `${VAR}`: never printed.
    secrets: Vec<String>,
    /// The variables read at load, by name: what [`Manifest::expand`] fills in.
    vars: BTreeMap<String, String>,
}

/// A component key: its name, the drivers that read it, where it is, whether it is set.
type KeyUse<'a> = (&'a str, &'a [DriverKind], Option<Range<usize>>, bool);

/// Every value read from a `${VAR}` by any manifest loaded in this process: the one
/// redaction layer output goes through ([`redact_secrets`]), whatever message quotes it.
static SECRETS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn register_secrets(found: &[String]) {
    let mut secrets = SECRETS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for secret in found {
        if !secrets.contains(secret) {
            secrets.push(secret.clone());
        }
    }
    // Longest first, so a secret that contains another is hidden whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// `text` with every value any loaded manifest read from the environment replaced by
/// `***`. The CLI's printer passes every line it prints through this.
pub fn redact_secrets(text: &str) -> String {
    let secrets = SECRETS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    secrets.iter().fold(text.to_owned(), |out, secret| out.replace(secret.as_str(), "***"))
}

/// The placeholders a component's strings may hold.
const COMPONENT_PLACEHOLDERS: &[&str] = &["version", "addr", "port"];
/// The placeholders a smoke command may hold.
const SMOKE_PLACEHOLDERS: &[&str] = &["version"];
/// The placeholders a hook may hold.
const HOOK_PLACEHOLDERS: &[&str] = &["version", "from"];

/// The `{name}` placeholders in `text`: a name of letters, digits and `_` in braces (a `{`
/// right after `$` opens a `${VAR}` instead, and a shell's `{ list; }` is no placeholder).
fn placeholders(text: &str) -> impl Iterator<Item = &str> {
    text.match_indices('{').filter(move |(at, _)| !text[..*at].ends_with('$')).filter_map(move |(at, _)| {
        let rest = &text[at + 1..];
        rest.find('}')
            .map(|end| &rest[..end])
            .filter(|name| !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    })
}

/// `[backup]`, paths resolved against the manifest's folder.
#[derive(Debug, Clone, Default)]
pub struct BackupSettings {
    /// `dir` (default `.upshift/backups`).
    pub dir: PathBuf,
    /// `keep_last`.
    pub keep_last: Option<usize>,
    /// `keep_within`, e.g. `7d`.
    pub keep_within: Option<Duration>,
    /// `paths`: files and folders saved beside the database, relative to the manifest.
    pub paths: Vec<PathBuf>,
    /// `encrypt_to`: age recipients.
    pub encrypt_to: Vec<String>,
    /// `[[backup.artifacts]]`.
    pub artifacts: Vec<BackupArtifact>,
}

impl Manifest {
    /// The revisions of `[database]`: upshift's own files in `migrations`, or those of the
    /// external migrator, who runs them.
    pub fn migrations(&self) -> Result<upshift_migrate::Migrator, upshift_migrate::Error> {
        match &self.migrator {
            Some(external) => upshift_migrate::Migrator::load_external(external),
            None => upshift_migrate::Migrator::load_with(&self.migrations_dir, &self.no_transaction),
        }
    }

    /// Reads and checks the manifest at `path`, expanding `${VAR}` from `env`.
    pub fn load(path: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Manifest, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|e| ManifestError {
            path: path.to_path_buf(),
            position: None,
            message: format!("could not read it: {e}"),
        })?;
        Manifest::parse(path, &text, env)
    }

    /// Checks manifest text read from `path`.
    pub fn parse(path: &Path, text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Manifest, ManifestError> {
        let mut loader =
            Loader { path, text, env: &env, secrets: Vec::new(), vars: BTreeMap::new(), prometheus: false };
        let raw: RawManifest = toml::from_str(text).map_err(|e| loader.error(e.span(), e.message().to_owned()))?;
        let base = path.parent().unwrap_or(Path::new(""));
        let migrator = match &raw.database {
            Some(database) => loader.migrator(database, base)?,
            None => None,
        };
        let (database_url_raw, migrations, min_server, no_transaction, via) = match raw.database {
            Some(database) => {
                (database.url, database.migrations, database.min_server, database.no_transaction, database.via)
            }
            None => (None, None, None, Vec::new(), None),
        };
        let database_url = database_url_raw.as_ref().map(|url| loader.expand(url)).transpose()?;
        let backup = loader.backup(raw.backup, base)?;
        let verify = loader.verify(raw.verify)?;
        loader.prometheus = verify.prometheus.is_some();
        let mut components: Vec<Component> = Vec::new();
        for raw in raw.components {
            let component = loader.component(raw, &components)?;
            components.push(component);
        }
        let database_via = match via {
            Some(via) => Some(loader.via(via, database_url.as_deref(), &components)?),
            None => None,
        };
        let releases = loader.releases(raw.releases, &components)?;
        let agent = match raw.agent.and_then(|a| a.metrics) {
            Some(metrics) => {
                if !metrics.get_ref().parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_loopback()) {
                    return Err(loader.error(
                        Some(metrics.span()),
                        format!(
                            "`{}` is not a loopback address; expected host:port like 127.0.0.1:9464 (the metrics are not for the network)",
                            metrics.get_ref()
                        ),
                    ));
                }
                Agent { metrics: Some(metrics.into_inner()) }
            }
            None => Agent::default(),
        };
        let hooks = loader.hooks(raw.hooks)?;
        let preflight = loader.preflight(raw.preflight)?;
        let notify = raw.notify.map(|n| loader.notify(n)).transpose()?;
        let app = raw.app;
        Ok(Manifest {
            path: path.to_path_buf(),
            app_name: app.as_ref().map(|a| a.name.clone()),
            state_dir: base.join(app.and_then(|a| a.state_dir).unwrap_or_else(|| ".upshift".into())),
            database_url,
            min_server,
            database_via,
            no_transaction,
            migrator,
            migrations_dir: base.join(migrations.unwrap_or_else(|| "migrations".into())),
            base_dir: base.to_path_buf(),
            backup,
            components,
            verify,
            releases,
            agent,
            hooks,
            preflight,
            notify,
            secrets: {
                register_secrets(&loader.secrets);
                loader.secrets
            },
            vars: loader.vars,
        })
    }

    /// The release with this version.
    pub fn release(&self, version: &semver::Version) -> Option<&Release> {
        self.releases.iter().find(|r| &r.version == version)
    }

    /// `text` with each `${VAR}` filled: from the variables read when the manifest was
    /// loaded, else (a component journaled by an earlier manifest) from the environment.
    pub fn expand(&self, text: &str) -> Result<String, String> {
        expand(text, |name| self.vars.get(name).cloned().or_else(|| std::env::var(name).ok()))
    }

    /// `text` with every value that came from the environment replaced by `***`.
    pub fn redact(&self, text: &str) -> String {
        let mut secrets: Vec<&String> = self.secrets.iter().collect();
        // Longest first, so a secret that contains another is hidden whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.into_iter().fold(text.to_owned(), |out, secret| out.replace(secret.as_str(), "***"))
    }
}

/// Turns the raw tables into the manifest, with errors at their place.
struct Loader<'a> {
    path: &'a Path,
    text: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
    /// Every value that came from the environment.
    secrets: Vec<String>,
    /// The variables read, by name.
    vars: BTreeMap<String, String>,
    /// `[verify] prometheus` is set (a Kubernetes canary may then have limits).
    prometheus: bool,
}

impl Loader<'_> {
    /// `[database] via`: a Compose service, or a pod reached through a port-forward.
    fn via(
        &self,
        via: Spanned<RawVia>,
        url: Option<&str>,
        components: &[Component],
    ) -> Result<DatabaseVia, ManifestError> {
        let at = Some(via.span());
        let via = match via.into_inner() {
            RawVia { compose: Some(service), kubernetes: None } => {
                if !components.iter().any(|c| c.compose().is_some()) {
                    return Err(self.error(
                        at,
                        "[database] via = { compose = ... } names a service of the Compose project of a component with \
                         driver = \"compose\", and there is none"
                            .into(),
                    ));
                }
                DatabaseVia::Compose { service }
            }
            RawVia { compose: None, kubernetes: Some(k) } => {
                if k.port == 0 {
                    return Err(
                        self.error(at, "[database] via: kubernetes.port must be the pod's port (1-65535)".into())
                    );
                }
                DatabaseVia::Kubernetes { pod: k.pod, port: k.port, namespace: k.namespace, context: k.context }
            }
            _ => {
                return Err(self.error(
                    at,
                    "[database] via takes one of `compose = \"<service>\"` or \
                     `kubernetes = { pod = \"<pod>\", port = <port> }`"
                        .into(),
                ));
            }
        };
        if !url.is_some_and(|u| u.starts_with("postgres://") || u.starts_with("postgresql://")) {
            return Err(self.error(
                at,
                "[database] via needs a PostgreSQL URL (postgres://user@host:port/db) in [database] url; its host \
                 (and, through a tunnel, its port) is replaced by where the database really is"
                    .into(),
            ));
        }
        Ok(via)
    }

    /// `[database] migrator` and the keys of the tool it names.
    fn migrator(&self, database: &RawDatabase, base: &Path) -> Result<Option<External>, ManifestError> {
        let kind = database.migrator.as_ref().map_or(RawMigrator::Upshift, |m| *m.get_ref());
        let at = database.migrator.as_ref().map(Spanned::span);
        let not_for = |span: Range<usize>, key: &str, owner: &str| {
            self.error(
                Some(span),
                format!(
                    "`{key}` is a setting of migrator = \"{owner}\", but the migrator is {}",
                    match kind {
                        RawMigrator::Upshift => "upshift's own files",
                        RawMigrator::Alembic => "alembic",
                        RawMigrator::Commands => "commands",
                    }
                ),
            )
        };
        if kind != RawMigrator::Alembic {
            if let Some(key) = &database.alembic {
                return Err(not_for(key.span(), "alembic", "alembic"));
            }
            if let Some(key) = &database.alembic_command {
                return Err(not_for(key.span(), "alembic_command", "alembic"));
            }
        }
        if kind != RawMigrator::Commands
            && let Some(key) = &database.commands
        {
            return Err(not_for(key.span(), "commands", "commands"));
        }
        let contract = database.contract.as_ref().map(|c| c.get_ref().clone()).unwrap_or_default();
        let tool = match kind {
            RawMigrator::Upshift => {
                if let Some(key) = &database.contract {
                    return Err(self.error(
                        Some(key.span()),
                        "`contract` names the contract revisions of an external migrator; upshift's own files say it with `-- upshift:phase contract`".into(),
                    ));
                }
                return Ok(None);
            }
            _ if database.migrations.is_some() || !database.no_transaction.is_empty() => {
                return Err(self.error(
                    at,
                    "`migrations` and `no_transaction` are for upshift's own files; with an external migrator its tool owns the revisions".into(),
                ));
            }
            RawMigrator::Alembic => {
                let command = match &database.alembic_command {
                    Some(command) if command.get_ref().is_empty() => {
                        return Err(self.error(Some(command.span()), "`alembic_command` is empty; expected a program and its arguments, e.g. [\"venv/bin/alembic\"]".into()));
                    }
                    Some(command) => command.get_ref().clone(),
                    None => vec!["alembic".to_owned()],
                };
                let config = base.join(database.alembic.as_ref().map_or("alembic.ini", |c| c.get_ref().as_str()));
                Tool::Alembic { config, command }
            }
            RawMigrator::Commands => {
                let Some(commands) = &database.commands else {
                    return Err(self.error(
                        at,
                        "migrator = \"commands\" needs `commands = { list = [...], current = [...], up = [...], down = [...] }`".into(),
                    ));
                };
                let commands = commands.get_ref();
                let checked = |name: &str, argv: &Spanned<Vec<String>>, needs: &[&str]| {
                    if argv.get_ref().is_empty() {
                        return Err(self.error(
                            Some(argv.span()),
                            format!("`commands.{name}` is empty; expected a program and its arguments"),
                        ));
                    }
                    if !needs.is_empty() && !argv.get_ref().iter().any(|a| needs.iter().any(|n| a.contains(n))) {
                        return Err(self.error(
                            Some(argv.span()),
                            format!(
                                "`commands.{name}` does not say which revision: put {} in its arguments",
                                needs.join(" or ")
                            ),
                        ));
                    }
                    Ok(argv.get_ref().clone())
                };
                Tool::Commands {
                    dir: if base.as_os_str().is_empty() { PathBuf::from(".") } else { base.to_path_buf() },
                    list: checked("list", &commands.list, &[])?,
                    current: checked("current", &commands.current, &[])?,
                    up: checked("up", &commands.up, &["{revision}"])?,
                    down: checked("down", &commands.down, &["{revision}", "{parent}"])?,
                }
            }
        };
        Ok(Some(External { tool, contract }))
    }

    fn error(&self, span: Option<Range<usize>>, message: String) -> ManifestError {
        ManifestError {
            path: self.path.to_path_buf(),
            position: span.map(|s| line_column(self.text, s.start)),
            message,
        }
    }

    /// Expands `${VAR}`, remembering what came from the environment.
    fn expand(&mut self, value: &Spanned<String>) -> Result<String, ManifestError> {
        let mut used = Vec::new();
        let expanded = expand(value.get_ref(), |name| {
            let found = (self.env)(name);
            if let Some(found) = &found {
                used.push((name.to_owned(), found.clone()));
            }
            found
        })
        .map_err(|message| self.error(Some(value.span()), message))?;
        for (name, found) in used {
            if !found.is_empty() {
                self.secrets.push(found.clone());
            }
            self.vars.insert(name, found);
        }
        Ok(expanded)
    }

    /// Checks the placeholders of a value, then expands it.
    fn template(&mut self, value: &Spanned<String>, allowed: &[&str]) -> Result<String, ManifestError> {
        if let Some(name) = placeholders(value.get_ref()).find(|name| !allowed.contains(name)) {
            let expected = allowed.iter().map(|a| format!("{{{a}}}")).collect::<Vec<_>>().join(", ");
            return Err(
                self.error(Some(value.span()), format!("unknown placeholder {{{name}}}; expected one of {expected}"))
            );
        }
        self.expand(value)
    }

    /// Checks a component's value like [`Loader::template`] but keeps its `${VAR}`
    /// references: components are expanded when they run ([`Manifest::expand`]).
    fn component_template(&mut self, value: &Spanned<String>) -> Result<String, ManifestError> {
        self.template(value, COMPONENT_PLACEHOLDERS)?;
        Ok(value.get_ref().clone())
    }

    fn backup(&mut self, raw: Option<RawBackup>, base: &Path) -> Result<BackupSettings, ManifestError> {
        let Some(backup) = raw else {
            return Ok(BackupSettings { dir: base.join(".upshift/backups"), ..BackupSettings::default() });
        };
        let keep_within = match backup.keep_within {
            Some(text) => Some(humantime::parse_duration(text.get_ref()).map_err(|e| {
                self.error(Some(text.span()), format!("`keep_within`: {e}; expected a duration like \"7d\" or \"12h\""))
            })?),
            None => None,
        };
        let mut artifacts: Vec<BackupArtifact> = Vec::new();
        for raw in &backup.artifacts {
            let name = raw.name.get_ref();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(self.error(Some(raw.name.span()), "an artifact name is letters, digits, - and _".into()));
            }
            if artifacts.iter().any(|a| &a.name == name) {
                return Err(
                    self.error(Some(raw.name.span()), format!("a second artifact named `{name}`; names must differ"))
                );
            }
            artifacts.push(BackupArtifact {
                name: name.clone(),
                create: self.argv(&format!("artifact `{name}`: `create`"), &raw.create, &["out"], false)?,
                restore: self.argv(&format!("artifact `{name}`: `restore`"), &raw.restore, &["in"], false)?,
                timeout: raw.timeout.map_or(Duration::from_mins(10), |d| d.0),
            });
        }
        Ok(BackupSettings {
            dir: base.join(backup.dir.unwrap_or_else(|| ".upshift/backups".into())),
            keep_last: backup.keep_last,
            keep_within,
            paths: backup.paths.iter().map(PathBuf::from).collect(),
            encrypt_to: backup.encrypt_to,
            artifacts,
        })
    }

    fn component(&mut self, raw: RawComponent, earlier: &[Component]) -> Result<Component, ManifestError> {
        let name = raw.name.get_ref().clone();
        let at_name = Some(raw.name.span());
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(self.error(at_name, "a component name is letters, digits, - and _".into()));
        }
        if earlier.iter().any(|c| c.name == name) {
            return Err(self.error(at_name, format!("a second component named `{name}`; names must differ")));
        }
        self.other_drivers_keys(&raw, &name)?;
        let run = raw.run.iter().flatten().map(|arg| self.component_template(arg)).collect::<Result<Vec<_>, _>>()?;
        let mut env = BTreeMap::new();
        for (key, value) in &raw.env {
            env.insert(key.clone(), self.component_template(value)?);
        }
        // A Deployment rolls by default, as Kubernetes does.
        let strategy = raw.strategy.unwrap_or(if raw.driver == DriverKind::Kubernetes {
            Strategy::Rolling
        } else {
            Strategy::Recreate
        });
        match raw.driver {
            DriverKind::Compose => self.compose_keys(&raw, &name, strategy)?,
            DriverKind::Kubernetes => self.kubernetes_keys(&raw, &name, strategy)?,
            DriverKind::Helm => self.helm_keys(&raw, &name)?,
            DriverKind::Process => {}
        }
        let takes_address = run.iter().chain(env.values()).any(|v| placeholders(v).any(|p| p == "addr" || p == "port"));
        if raw.driver == DriverKind::Process {
            if run.is_empty() {
                return Err(
                    self.error(at_name, format!("component `{name}` uses the process driver but has no `run` command"))
                );
            }
            if strategy != Strategy::Recreate && raw.serve.is_none() {
                return Err(self.error(
                    at_name,
                    format!(
                        "component `{name}`: strategy {} needs `serve`, the stable address the agent's proxy holds",
                        strategy.as_str()
                    ),
                ));
            }
            if let Some(serve) = &raw.serve
                && !takes_address
            {
                return Err(self.error(
                    Some(serve.span()),
                    format!("component `{name}` has `serve` but its `run` and `env` never use {{addr}} or {{port}}, so it cannot be told where to listen"),
                ));
            }
        }
        if let Some(serve) = &raw.serve
            && serve.get_ref().parse::<std::net::SocketAddr>().is_err()
        {
            return Err(self.error(
                Some(serve.span()),
                format!("`{}` is not an address; expected host:port like 127.0.0.1:8080", serve.get_ref()),
            ));
        }
        if let Some(steps) = &raw.steps
            && (steps.is_empty() || steps.iter().any(|s| !(1..=100).contains(s)) || !steps.is_sorted_by(|a, b| a < b))
        {
            return Err(self.error(
                at_name,
                format!("component `{name}`: `steps` must be rising percentages from 1 to 100, like [5, 25, 50, 100]"),
            ));
        }
        if let Some(rate) = raw.max_error_rate
            && !(0.0..=1.0).contains(&rate)
        {
            return Err(self.error(
                at_name,
                format!("component `{name}`: `max_error_rate` is a fraction from 0 to 1 (0.01 is 1%), not {rate}"),
            ));
        }
        let serve = raw.serve.as_ref().map(|s| s.get_ref().clone());
        let driver = self.driver_spec(&raw, &name, ProcessSpec { run, env, serve })?;
        let health = match raw.health {
            Some(h) => {
                let address = match raw.driver {
                    DriverKind::Process => (takes_address, "{addr} in `run`"),
                    DriverKind::Compose => (raw.port.is_some(), "`port`, where the service listens in its container"),
                    DriverKind::Kubernetes | DriverKind::Helm => (true, ""),
                };
                Some(self.health(h, &name, at_name, address)?)
            }
            None => None,
        };
        Ok(Component {
            name,
            driver,
            strategy,
            health,
            drain: raw.drain.map_or(Duration::from_secs(10), |d| d.0),
            instances: raw.instances.unwrap_or(1).max(1),
            steps: raw.steps.unwrap_or_else(|| vec![5, 25, 50, 100]),
            step_interval: raw.step_interval.map_or(Duration::from_secs(30), |d| d.0),
            max_error_rate: raw.max_error_rate,
            max_p99_ms: raw.max_p99_ms,
            rollback: raw.rollback.unwrap_or_default(),
        })
    }

    /// The driver's own settings, each required key checked.
    fn driver_spec(
        &mut self,
        raw: &RawComponent,
        name: &str,
        process: ProcessSpec,
    ) -> Result<DriverSpec, ManifestError> {
        let name = name.to_owned();
        let at_name = Some(raw.name.span());
        Ok(match raw.driver {
            DriverKind::Process => DriverSpec::Process(process),
            DriverKind::Compose => DriverSpec::Compose(ComposeSpec {
                files: self.strings(raw.files.as_deref())?,
                project: raw.project.as_ref().map(|p| self.component_template(p)).transpose()?,
                service: self.required(raw.service.as_ref(), at_name.clone(), (&name, "compose", "service"))?,
                image: raw.image.as_ref().map(|i| self.component_template(i)).transpose()?,
                version_env: raw.version_env.as_ref().map(|v| v.get_ref().clone()),
                build: raw.build.unwrap_or(false),
                port: raw.port,
                serve: process.serve,
                stop_signal: raw.stop_signal.as_ref().map(|v| v.get_ref().clone()),
            }),
            DriverKind::Kubernetes => DriverSpec::Kubernetes {
                namespace: raw.namespace.as_ref().map(|n| self.component_template(n)).transpose()?,
                deployment: self.required(
                    raw.deployment.as_ref(),
                    at_name.clone(),
                    (&name, "kubernetes", "deployment"),
                )?,
                container: raw.container.as_ref().map(|c| self.component_template(c)).transpose()?,
                image: if raw.manifests.is_some() {
                    None
                } else {
                    Some(self.required(raw.image.as_ref(), at_name.clone(), (&name, "kubernetes", "image"))?)
                },
                context: raw.context.as_ref().map(|c| self.component_template(c)).transpose()?,
                service: raw.service.as_ref().map(|c| self.component_template(c)).transpose()?,
                manifests: self.strings(raw.manifests.as_deref())?,
            },
            DriverKind::Helm => DriverSpec::Helm {
                release: self.required(raw.release.as_ref(), at_name.clone(), (&name, "helm", "release"))?,
                chart: self.required(raw.chart.as_ref(), at_name.clone(), (&name, "helm", "chart"))?,
                chart_version: raw.chart_version.as_ref().map(|v| self.component_template(v)).transpose()?,
                namespace: raw.namespace.as_ref().map(|n| self.component_template(n)).transpose()?,
                values: self.strings(raw.values.as_deref())?,
                set: raw
                    .set
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), self.component_template(v)?)))
                    .collect::<Result<_, ManifestError>>()?,
                timeout: raw.timeout.map(|t| t.0),
                tests: raw.tests.unwrap_or(false),
            },
        })
    }

    /// A key only another driver reads is a mistake, named with its line.
    fn other_drivers_keys(&self, raw: &RawComponent, name: &str) -> Result<(), ManifestError> {
        let span = |value: Option<&Spanned<String>>| value.map(Spanned::span);
        let first_span = |values: Option<&Vec<Spanned<String>>>| values.and_then(|v| v.first()).map(Spanned::span);
        // (key, the drivers that read it, where it is, whether it is set)
        let keys: [KeyUse<'_>; 22] = [
            ("run", &[DriverKind::Process], first_span(raw.run.as_ref()), raw.run.is_some()),
            ("env", &[DriverKind::Process], raw.env.values().next().map(Spanned::span), !raw.env.is_empty()),
            ("serve", &[DriverKind::Process, DriverKind::Compose], span(raw.serve.as_ref()), raw.serve.is_some()),
            ("files", &[DriverKind::Compose], first_span(raw.files.as_ref()), raw.files.is_some()),
            ("project", &[DriverKind::Compose], span(raw.project.as_ref()), raw.project.is_some()),
            (
                "service",
                &[DriverKind::Compose, DriverKind::Kubernetes],
                span(raw.service.as_ref()),
                raw.service.is_some(),
            ),
            ("version_env", &[DriverKind::Compose], span(raw.version_env.as_ref()), raw.version_env.is_some()),
            ("stop_signal", &[DriverKind::Compose], span(raw.stop_signal.as_ref()), raw.stop_signal.is_some()),
            ("build", &[DriverKind::Compose], None, raw.build.is_some()),
            ("port", &[DriverKind::Compose], None, raw.port.is_some()),
            ("image", &[DriverKind::Compose, DriverKind::Kubernetes], span(raw.image.as_ref()), raw.image.is_some()),
            (
                "namespace",
                &[DriverKind::Kubernetes, DriverKind::Helm],
                span(raw.namespace.as_ref()),
                raw.namespace.is_some(),
            ),
            ("deployment", &[DriverKind::Kubernetes], span(raw.deployment.as_ref()), raw.deployment.is_some()),
            ("container", &[DriverKind::Kubernetes], span(raw.container.as_ref()), raw.container.is_some()),
            ("context", &[DriverKind::Kubernetes], span(raw.context.as_ref()), raw.context.is_some()),
            ("manifests", &[DriverKind::Kubernetes], first_span(raw.manifests.as_ref()), raw.manifests.is_some()),
            ("release", &[DriverKind::Helm], span(raw.release.as_ref()), raw.release.is_some()),
            ("chart", &[DriverKind::Helm], span(raw.chart.as_ref()), raw.chart.is_some()),
            ("chart_version", &[DriverKind::Helm], span(raw.chart_version.as_ref()), raw.chart_version.is_some()),
            ("values", &[DriverKind::Helm], first_span(raw.values.as_ref()), raw.values.is_some()),
            ("set", &[DriverKind::Helm], raw.set.values().next().map(Spanned::span), !raw.set.is_empty()),
            ("tests", &[DriverKind::Helm], None, raw.tests.is_some() || raw.timeout.is_some()),
        ];
        for (key, drivers, at, present) in keys {
            if present && !drivers.contains(&raw.driver) {
                let owners = drivers.iter().map(|d| d.as_str()).collect::<Vec<_>>().join(" and ");
                let key = if key == "tests" && raw.tests.is_none() { "timeout" } else { key };
                return Err(self.error(
                    at.or_else(|| Some(raw.name.span())),
                    format!(
                        "component `{name}`: `{key}` is a setting of the {owners} driver, but this component uses the {} driver",
                        raw.driver.as_str()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The Kubernetes driver's rules: the strategies it has, and health from the pods.
    fn kubernetes_keys(&self, raw: &RawComponent, name: &str, strategy: Strategy) -> Result<(), ManifestError> {
        let at_name = Some(raw.name.span());
        if let Some(manifests) = &raw.manifests {
            let at = manifests.first().map(Spanned::span).or(at_name.clone());
            let problem = if manifests.is_empty() {
                Some("`manifests` lists no file")
            } else if raw.image.is_some() || raw.container.is_some() {
                Some(
                    "with `manifests`, the files hold the image (write `{version}` in them), so `image` and `container` are not read",
                )
            } else if raw.strategy.is_some() || raw.service.is_some() {
                Some(
                    "with `manifests`, the Deployments roll out as their files' `spec.strategy` says, so `strategy` and \
                     `service` are not read (blue-green and canary need `image`)",
                )
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(self.error(at, format!("component `{name}`: {problem}")));
            }
        }
        if (strategy == Strategy::BlueGreen) != raw.service.is_some() {
            return Err(self.error(
                raw.service.as_ref().map(Spanned::span).or(at_name),
                format!(
                    "component `{name}`: the kubernetes driver's blue-green switches a Service's selector, so it needs \
                     `service` (the Service in front of the Deployment), and `service` means nothing to another strategy"
                ),
            ));
        }
        if raw.health.is_some() {
            return Err(self.error(
                at_name,
                format!(
                    "component `{name}`: the kubernetes driver judges health by the pods' readiness; put the check in the \
                     Deployment's readinessProbe instead of `health`"
                ),
            ));
        }
        if (raw.max_error_rate.is_some() || raw.max_p99_ms.is_some()) && !self.prometheus {
            return Err(self.error(
                at_name,
                format!(
                    "component `{name}`: `max_error_rate` and `max_p99_ms` judge the requests the agent's proxy sees, and \
                     a Kubernetes Service sends none through it; the kubernetes canary judges each step on its pods' \
                     readiness and restarts, and on PromQL queries when [verify] prometheus is set"
                ),
            ));
        }
        Ok(())
    }

    /// The Helm driver's rules: the chart decides how its workloads roll and when they are
    /// healthy.
    fn helm_keys(&self, raw: &RawComponent, name: &str) -> Result<(), ManifestError> {
        if raw.strategy.is_some() || raw.health.is_some() {
            return Err(self.error(
                Some(raw.name.span()),
                format!(
                    "component `{name}`: a Helm release rolls out as its chart says and is healthy when Helm's --wait \
                     and `tests = true` (helm test) say so; drop `strategy` and `health`"
                ),
            ));
        }
        Ok(())
    }

    /// The Compose driver's rules: the version reaches Compose one way, a proxied strategy
    /// has a stable address and a container port, names are names.
    fn compose_keys(&self, raw: &RawComponent, name: &str, strategy: Strategy) -> Result<(), ManifestError> {
        let at_name = Some(raw.name.span());
        if raw.image.is_some() == raw.version_env.is_some() {
            return Err(self.error(
                raw.version_env.as_ref().map(Spanned::span).or(at_name),
                format!(
                    "component `{name}`: the version reaches Compose one way: set `image = \"name:{{version}}\"` \
                     or `version_env`, the variable your compose files use in `image:`, not both or neither"
                ),
            ));
        }
        if let Some(var) = &raw.version_env
            && (var.get_ref().is_empty()
                || var.get_ref().starts_with(|c: char| c.is_ascii_digit())
                || !var.get_ref().chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            return Err(self.error(
                Some(var.span()),
                format!("`{}` is not a variable name; expected letters, digits and _", var.get_ref()),
            ));
        }
        if let Some(signal) = &raw.stop_signal
            && (signal.get_ref().is_empty() || !signal.get_ref().chars().all(|c| c.is_ascii_alphanumeric()))
        {
            return Err(self.error(
                Some(signal.span()),
                format!("`{}` is not a signal; expected a name like SIGTERM or SIGQUIT", signal.get_ref()),
            ));
        }
        if strategy != Strategy::Recreate && (raw.serve.is_none() || raw.port.is_none()) {
            return Err(self.error(
                at_name,
                format!(
                    "component `{name}`: strategy {} runs containers beside each other behind the agent's proxy, so it \
                     needs `serve` (the stable address the proxy holds) and `port` (where the service listens in its container)",
                    strategy.as_str()
                ),
            ));
        }
        if raw.port == Some(0) {
            return Err(self.error(at_name, format!("component `{name}`: `port` is a port from 1 to 65535")));
        }
        Ok(())
    }

    /// A required key of a driver, its `${VAR}` kept.
    fn required(
        &mut self,
        value: Option<&Spanned<String>>,
        at_name: Option<Range<usize>>,
        (name, driver, key): (&str, &str, &str),
    ) -> Result<String, ManifestError> {
        match value {
            Some(value) => self.component_template(value),
            None => Err(self.error(at_name, format!("component `{name}` uses the {driver} driver but has no `{key}`"))),
        }
    }

    fn strings(&mut self, values: Option<&[Spanned<String>]>) -> Result<Vec<String>, ManifestError> {
        values.unwrap_or_default().iter().map(|v| self.component_template(v)).collect()
    }

    fn health(
        &mut self,
        raw: RawHealth,
        name: &str,
        at_name: Option<Range<usize>>,
        (has_address, address_hint): (bool, &str),
    ) -> Result<Health, ManifestError> {
        let kinds =
            usize::from(raw.http.is_some()) + usize::from(raw.tcp == Some(true)) + usize::from(raw.command.is_some());
        if kinds != 1 {
            return Err(self.error(
                at_name,
                format!("component `{name}`: `health` needs exactly one of http, tcp = true, command"),
            ));
        }
        let probe = if let Some(path) = raw.http {
            Probe::Http { path, status: raw.status, body: raw.body }
        } else if let Some(command) = raw.command {
            Probe::Command(command.iter().map(|arg| self.component_template(arg)).collect::<Result<_, _>>()?)
        } else {
            Probe::Tcp
        };
        if matches!(probe, Probe::Http { .. } | Probe::Tcp) && !has_address {
            return Err(self.error(
                at_name,
                format!("component `{name}`: an http or tcp health check needs an address ({address_hint})"),
            ));
        }
        Ok(Health {
            probe,
            interval: raw.interval.map_or(Duration::from_secs(1), |d| d.0),
            timeout: raw.timeout.map_or(Duration::from_secs(2), |d| d.0),
            healthy_after: raw.healthy_after.unwrap_or(1).max(1),
            deadline: raw.deadline.map_or(Duration::from_mins(1), |d| d.0),
        })
    }

    fn verify(&mut self, raw: Option<RawVerify>) -> Result<Verify, ManifestError> {
        let Some(raw) = raw else {
            return Ok(Verify {
                smoke: Vec::new(),
                timeout: Duration::from_mins(1),
                watch: Duration::ZERO,
                watch_interval: Duration::from_secs(1),
                prometheus: None,
            });
        };
        let mut smoke = Vec::new();
        for command in &raw.smoke {
            if command.is_empty() {
                return Err(self.error(None, "[verify] smoke has an empty command".into()));
            }
            smoke
                .push(command.iter().map(|arg| self.template(arg, SMOKE_PLACEHOLDERS)).collect::<Result<Vec<_>, _>>()?);
        }
        Ok(Verify {
            smoke,
            timeout: raw.timeout.map_or(Duration::from_mins(1), |d| d.0),
            watch: raw.watch.map_or(Duration::ZERO, |d| d.0),
            watch_interval: raw.watch_interval.map_or(Duration::from_secs(1), |d| d.0).max(Duration::from_millis(10)),
            prometheus: raw.prometheus.map(|p| self.prometheus(p)).transpose()?,
        })
    }

    fn prometheus(&mut self, raw: Spanned<RawPrometheus>) -> Result<Prometheus, ManifestError> {
        let at = raw.span();
        let raw = raw.into_inner();
        let url = self.expand(&raw.url)?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(
                self.error(Some(raw.url.span()), "[verify] prometheus.url must be an http:// or https:// URL".into())
            );
        }
        if raw.error_rate.is_none() && raw.p99_ms.is_none() {
            return Err(self.error(
                Some(at),
                "[verify] prometheus needs a query: `error_rate` (a fraction) and/or `p99_ms` (milliseconds)".into(),
            ));
        }
        let query = |loader: &mut Self, q: Option<Spanned<String>>| {
            q.map(|q| loader.template(&q, SMOKE_PLACEHOLDERS)).transpose()
        };
        Ok(Prometheus {
            url: url.trim_end_matches('/').to_owned(),
            error_rate: query(self, raw.error_rate)?,
            p99_ms: query(self, raw.p99_ms)?,
        })
    }

    /// An argv: not empty, each argument's placeholders checked. `keep` keeps the `${VAR}`
    /// references (for what is journaled), else they are expanded.
    fn argv(
        &mut self,
        what: &str,
        raw: &Spanned<Vec<Spanned<String>>>,
        allowed: &[&str],
        keep: bool,
    ) -> Result<Vec<String>, ManifestError> {
        if raw.get_ref().is_empty() {
            return Err(self
                .error(Some(raw.span()), format!("{what} is an empty command; expected [\"program\", \"arg\", ...]")));
        }
        raw.get_ref()
            .iter()
            .map(|arg| {
                let expanded = self.template(arg, allowed)?;
                Ok(if keep { arg.get_ref().clone() } else { expanded })
            })
            .collect()
    }

    fn hooks(&mut self, raw: Vec<RawHook>) -> Result<Vec<Hook>, ManifestError> {
        let mut hooks: Vec<Hook> = Vec::new();
        for raw in raw {
            let at = *raw.at.get_ref();
            let name = match &raw.name {
                Some(name) => {
                    let text = name.get_ref();
                    if text.is_empty() || !text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                        return Err(self.error(Some(name.span()), "a hook name is letters, digits, - and _".into()));
                    }
                    if hooks.iter().any(|h| &h.name == text) {
                        return Err(
                            self.error(Some(name.span()), format!("a second hook named `{text}`; names must differ"))
                        );
                    }
                    text.clone()
                }
                None => format!("{}-{}", at.as_str(), hooks.iter().filter(|h| h.at == at).count() + 1),
            };
            let run = self.argv(&format!("hook `{name}`: `run`"), &raw.run, HOOK_PLACEHOLDERS, true)?;
            let undo = match &raw.undo {
                Some(undo) if !at.is_step() => {
                    return Err(self.error(
                        Some(undo.span()),
                        format!(
                            "hook `{name}` runs {} (inside an undo): it cannot have an `undo` of its own",
                            at.as_str()
                        ),
                    ));
                }
                Some(undo) => Some(self.argv(&format!("hook `{name}`: `undo`"), undo, HOOK_PLACEHOLDERS, true)?),
                None => None,
            };
            let mut env = BTreeMap::new();
            for (key, value) in &raw.env {
                self.template(value, HOOK_PLACEHOLDERS)?;
                env.insert(key.clone(), value.get_ref().clone());
            }
            hooks.push(Hook { name, at, run, undo, timeout: raw.timeout.map_or(Duration::from_mins(5), |d| d.0), env });
        }
        Ok(hooks)
    }

    fn preflight(&mut self, raw: Vec<RawPreflight>) -> Result<Vec<PreflightCheck>, ManifestError> {
        let mut checks = Vec::new();
        for raw in raw {
            let run = self.argv("[[preflight]] `run`", &raw.run, &[], false)?;
            checks.push(PreflightCheck {
                name: raw.name.unwrap_or_else(|| {
                    raw.run.get_ref().iter().map(|a| a.get_ref().as_str()).collect::<Vec<_>>().join(" ")
                }),
                run,
                expect_exit: raw.expect_exit.unwrap_or(0),
                expect_output: raw.expect_output,
                timeout: raw.timeout.map_or(Duration::from_secs(30), |d| d.0),
            });
        }
        Ok(checks)
    }

    fn notify(&mut self, raw: RawNotify) -> Result<Notify, ManifestError> {
        let webhook = match &raw.webhook {
            Some(url) => {
                let expanded = self.expand(url)?;
                if !(expanded.starts_with("http://") || expanded.starts_with("https://")) {
                    return Err(
                        self.error(Some(url.span()), "[notify] webhook is not an http:// or https:// URL".into())
                    );
                }
                Some(expanded)
            }
            None => None,
        };
        let command = raw.command.as_ref().map(|c| self.argv("[notify] command", c, &[], false)).transpose()?;
        if webhook.is_none() && command.is_none() {
            return Err(self.error(None, "[notify] needs a `webhook` URL or a `command` (or both)".into()));
        }
        let mut on = raw.on.unwrap_or_else(|| {
            vec![NotifyEvent::Start, NotifyEvent::Success, NotifyEvent::Failure, NotifyEvent::Rollback]
        });
        on.sort();
        on.dedup();
        Ok(Notify { webhook, command, on, timeout: raw.timeout.map_or(Duration::from_secs(10), |d| d.0) })
    }

    fn releases(&self, raw: Vec<RawRelease>, components: &[Component]) -> Result<Vec<Release>, ManifestError> {
        let mut releases: Vec<Release> = Vec::new();
        for raw in raw {
            let version = raw.version.get_ref().clone();
            if releases.iter().any(|r| r.version == version) {
                return Err(self.error(Some(raw.version.span()), format!("release {version} is listed twice")));
            }
            let mut downtime: Vec<String> = Vec::new();
            for name in &raw.downtime {
                if !components.iter().any(|c| &c.name == name.get_ref()) {
                    let known: Vec<&str> = components.iter().map(|c| c.name.as_str()).collect();
                    return Err(self.error(
                        Some(name.span()),
                        format!(
                            "release {version}: downtime names `{}`, which is not a component; expected one of: {}",
                            name.get_ref(),
                            if known.is_empty() { "(no components)".to_owned() } else { known.join(", ") }
                        ),
                    ));
                }
                if !downtime.contains(name.get_ref()) {
                    downtime.push(name.get_ref().clone());
                }
            }
            releases.push(Release {
                version,
                upgrade_from: raw.upgrade_from,
                summary: raw.summary,
                breaking: raw.breaking,
                deprecated: raw.deprecated,
                config_added: raw.config_added,
                config_removed: raw.config_removed,
                config_changed: raw.config_changed,
                migrate_to: raw.migrate_to,
                downtime,
            });
        }
        Ok(releases)
    }
}

/// Replaces each `${NAME}` in `value` with the variable's value; `$$` is a literal `$`.
pub fn expand(value: &str, mut env: impl FnMut(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('{') {
            let end =
                inner.find('}').ok_or_else(|| format!("`${{` without a closing `}}` in {value:?}; write ${{NAME}}"))?;
            let name = &inner[..end];
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!("`${{{name}}}` is not a variable name; expected letters, digits and _"));
            }
            let found = env(name)
                .ok_or_else(|| format!("environment variable {name} is not set; set it or write the value here"))?;
            out.push_str(&found);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "DATABASE_URL").then(|| "sqlite:app.db".to_owned())
    }

    #[test]
    fn reads_database_settings() {
        let m = Manifest::parse(
            Path::new("deploy/upshift.toml"),
            "[app]\nname = \"notes\"\n[database]\nurl = \"${DATABASE_URL}\"\nmigrations = \"db\"\n",
            env,
        )
        .unwrap();
        assert_eq!(m.database_url.as_deref(), Some("sqlite:app.db"));
        assert_eq!(m.migrations_dir, PathBuf::from("deploy/db"));
        assert_eq!(m.state_dir, PathBuf::from("deploy/.upshift"));
    }

    #[test]
    fn external_migrators_and_their_keys() {
        let parse = |text: &str| Manifest::parse(Path::new("deploy/upshift.toml"), text, env);
        let alembic =
            parse("[database]\nmigrator = \"alembic\"\nalembic = \"db/alembic.ini\"\ncontract = [\"contract\"]\n")
                .unwrap()
                .migrator
                .unwrap();
        assert_eq!(
            alembic.tool,
            Tool::Alembic { config: PathBuf::from("deploy/db/alembic.ini"), command: vec!["alembic".to_owned()] }
        );
        assert_eq!(alembic.contract, ["contract"]);
        let commands = parse(
            "[database]\nmigrator = \"commands\"\ncommands = { list = [\"t\", \"list\"], current = [\"t\", \"current\"], up = [\"t\", \"up\", \"{revision}\"], down = [\"t\", \"down\", \"{parent}\"] }\n",
        )
        .unwrap();
        assert!(
            matches!(commands.migrator.unwrap().tool, Tool::Commands { ref dir, .. } if dir == Path::new("deploy"))
        );
        assert!(parse("[database]\nurl = \"sqlite:x.db\"\n").unwrap().migrator.is_none());

        let refused = |text: &str, place: (usize, usize), what: &str| {
            let err = parse(text).unwrap_err();
            assert_eq!(err.position, Some(place), "{err}");
            assert!(err.to_string().contains(what), "{err}");
        };
        refused("[database]\nmigrator = \"flyway\"\n", (2, 12), "unknown variant `flyway`");
        refused("[database]\nalembic = \"alembic.ini\"\n", (2, 11), "`alembic` is a setting of migrator = \"alembic\"");
        refused("[database]\ncontract = [\"x\"]\n", (2, 12), "-- upshift:phase contract");
        refused("[database]\nmigrator = \"commands\"\n", (2, 12), "needs `commands = {");
        refused(
            "[database]\nmigrator = \"commands\"\ncommands = { list = [\"t\"], current = [\"t\"], up = [\"t\", \"up\"], down = [\"t\", \"{parent}\"] }\n",
            (3, 50),
            "put {revision} in its arguments",
        );
        refused("[database]\nmigrator = \"alembic\"\nalembic_command = []\n", (3, 19), "`alembic_command` is empty");
        refused("[database]\nmigrator = \"alembic\"\nno_transaction = [\"1\"]\n", (2, 12), "with an external migrator");
    }

    #[test]
    fn undefined_variable_names_line_and_column() {
        let err = Manifest::parse(Path::new("upshift.toml"), "[database]\nurl = \"${NOPE}\"\n", env).unwrap_err();
        assert_eq!(err.position, Some((2, 7)));
        assert!(err.to_string().starts_with("upshift.toml:2:7: environment variable NOPE is not set"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused_with_their_place() {
        let err = Manifest::parse(Path::new("upshift.toml"), "[database]\nurll = \"x\"\n", env).unwrap_err();
        assert_eq!(err.position.map(|p| p.0), Some(2));
        assert!(err.message.contains("unknown field `urll`"), "{err}");
        assert!(err.message.contains("expected one of"), "{err}");
    }

    #[test]
    fn backup_settings() {
        let m = Manifest::parse(
            Path::new("app/upshift.toml"),
            "[backup]\nkeep_last = 3\nkeep_within = \"7d\"\npaths = [\"config/\"]\n",
            env,
        )
        .unwrap();
        assert_eq!(m.backup.dir, PathBuf::from("app/.upshift/backups"));
        assert_eq!(m.backup.keep_last, Some(3));
        assert_eq!(m.backup.keep_within, Some(Duration::from_hours(7 * 24)));
        assert_eq!(m.backup.paths, [PathBuf::from("config/")]);
        let err = Manifest::parse(Path::new("u.toml"), "[backup]\nkeep_within = \"soon\"\n", env).unwrap_err();
        assert_eq!(err.position, Some((2, 15)));
    }

    const FULL: &str = r#"
[app]
name = "notes"

[database]
url = "${DATABASE_URL}"

[[components]]
name = "api"
driver = "process"
run = ["releases/{version}/notes", "--listen", "{addr}"]
env = { DATABASE_URL = "${DATABASE_URL}" }
serve = "127.0.0.1:8080"
strategy = "blue-green"
health = { http = "/health", interval = "250ms", timeout = "2s", healthy_after = 3, deadline = "30s" }
drain = "10s"

[[components]]
name = "worker"
driver = "process"
run = ["releases/{version}/notes-worker"]
strategy = "recreate"
health = { command = ["releases/{version}/notes-worker", "--check"] }

[verify]
smoke = [["curl", "-fsS", "http://127.0.0.1:8080/api/notes"]]

[[releases]]
version = "2.0.0"
upgrade_from = ">=1.4.0"
summary = "Tags on notes"
breaking = ["GET /api/notes returns tags as an array"]
deprecated = [{ what = "GET /api/old", removed_in = "3.0.0", instead = "GET /api/v2/notes" }]
config_added = [{ name = "NOTES_MAX_SIZE", default = "1MiB", required = false, doc = "largest note accepted" }]
config_removed = ["NOTES_LEGACY_MODE"]
config_changed = [{ name = "workers", from = "1", to = "2", why = "throughput" }]
"#;

    #[test]
    fn the_product_example_loads() {
        let m = Manifest::parse(Path::new("upshift.toml"), FULL, env).unwrap();
        assert_eq!(m.components.len(), 2);
        let api = &m.components[0];
        assert_eq!(api.strategy, Strategy::BlueGreen);
        // Kept unexpanded for the journal; expanded when it runs.
        let process = api.process().unwrap();
        assert_eq!(process.env["DATABASE_URL"], "${DATABASE_URL}");
        assert_eq!(m.expand(&process.env["DATABASE_URL"]).unwrap(), "sqlite:app.db");
        let health = api.health.as_ref().unwrap();
        assert_eq!((health.interval, health.healthy_after), (Duration::from_millis(250), 3));
        assert!(matches!(m.components[1].health.as_ref().unwrap().probe, Probe::Command(_)));
        assert_eq!(m.verify.smoke.len(), 1);
        let release = m.release(&semver::Version::new(2, 0, 0)).unwrap();
        assert!(release.upgrade_from.as_ref().unwrap().matches(&semver::Version::new(1, 4, 2)));
        assert_eq!(release.config_added[0].name, "NOTES_MAX_SIZE");
        assert_eq!(m.redact("connect to sqlite:app.db now"), "connect to *** now");
    }

    /// Each kind of mistake, with the line and what the message must say.
    #[test]
    fn every_kind_of_mistake_names_its_place() {
        let cases: &[(&str, &str, usize, &str)] = &[
            ("unknown key", "[app]\nname = \"x\"\ncolour = 1\n", 3, "unknown field `colour`"),
            ("wrong type", "[backup]\nkeep_last = \"five\"\n", 2, "invalid type"),
            (
                "bad strategy",
                "[[components]]\nname = \"a\"\ndriver = \"process\"\nrun = [\"x\"]\nstrategy = \"sideways\"\n",
                5,
                "unknown variant `sideways`",
            ),
            ("bad driver", "[[components]]\nname = \"a\"\ndriver = \"docker\"\n", 3, "unknown variant `docker`"),
            ("metrics on the network", "[agent]\nmetrics = \"0.0.0.0:9464\"\n", 2, "is not a loopback address"),
            (
                "falling canary steps",
                "[[components]]\nname = \"a\"\ndriver = \"process\"\nrun = [\"x\"]\nsteps = [50, 25, 100]\n",
                2,
                "`steps` must be rising percentages from 1 to 100",
            ),
            (
                "error rate as a percentage",
                "[[components]]\nname = \"a\"\ndriver = \"process\"\nrun = [\"x\"]\nmax_error_rate = 5\n",
                2,
                "`max_error_rate` is a fraction from 0 to 1",
            ),
            (
                "bad duration",
                "[[components]]\nname = \"a\"\ndriver = \"process\"\nrun = [\"x\"]\ndrain = \"soon\"\n",
                5,
                "is not a duration",
            ),
            (
                "bad placeholder",
                "[[components]]\nname = \"a\"\ndriver = \"process\"\nrun = [\"x\", \"{verison}\"]\n",
                4,
                "unknown placeholder {verison}",
            ),
            (
                "undefined variable",
                "[[components]]\nname = \"a\"\ndriver = \"process\"\nrun = [\"${NOPE}\"]\n",
                4,
                "NOPE is not set",
            ),
            ("bad version", "[[releases]]\nversion = \"two\"\n", 2, "unexpected character"),
            ("bad requirement", "[[releases]]\nversion = \"2.0.0\"\nupgrade_from = \"~>1\"\n", 3, ""),
            (
                "duplicate release",
                "[[releases]]\nversion = \"2.0.0\"\n[[releases]]\nversion = \"2.0.0\"\n",
                4,
                "listed twice",
            ),
            (
                "duplicate component",
                "[[components]]\nname = \"a\"\ndriver = \"process\"\nrun = [\"x\"]\n[[components]]\nname = \"a\"\ndriver = \"process\"\nrun = [\"y\"]\n",
                6,
                "second component",
            ),
            ("process without run", "[[components]]\nname = \"a\"\ndriver = \"process\"\n", 2, "no `run` command"),
            (
                "blue-green without serve",
                "[[components]]\nname = \"a\"\ndriver = \"process\"\nrun = [\"x\", \"{addr}\"]\nstrategy = \"blue-green\"\n",
                2,
                "needs `serve`",
            ),
            (
                "serve never used",
                "[[components]]\nname = \"a\"\ndriver = \"process\"\nrun = [\"x\"]\nserve = \"127.0.0.1:8080\"\n",
                5,
                "never use {addr}",
            ),
            (
                "bad address",
                "[[components]]\nname = \"a\"\ndriver = \"process\"\nrun = [\"x\", \"{addr}\"]\nserve = \"localhost\"\n",
                5,
                "not an address",
            ),
            (
                "two probes",
                "[[components]]\nname = \"a\"\ndriver = \"process\"\nrun = [\"x\", \"{addr}\"]\nhealth = { http = \"/\", tcp = true }\n",
                2,
                "exactly one of",
            ),
            ("smoke placeholder", "[verify]\nsmoke = [[\"curl\", \"{addr}\"]]\n", 2, "unknown placeholder {addr}"),
        ];
        for (what, text, line, message) in cases {
            let err = Manifest::parse(Path::new("upshift.toml"), text, env).unwrap_err();
            assert_eq!(err.position.map(|p| p.0), Some(*line), "{what}: {err}");
            assert!(err.to_string().contains(message), "{what}: {err}");
        }
    }

    #[test]
    fn expansion_rules() {
        assert_eq!(expand("a$$b ${DATABASE_URL} $x", env).unwrap(), "a$b sqlite:app.db $x");
        assert!(expand("${", env).is_err());
        assert!(expand("${A-B}", env).is_err());
    }
}
