//! The admin protocol: one JSON request per line on the agent's unix socket, one JSON
//! response line back.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What a process instance is: everything needed to start it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    /// The component.
    pub component: String,
    /// Which instance of the component (`live`, `blue`, `green`, `1`...).
    pub slot: String,
    /// The version it runs.
    pub version: String,
    /// The command, placeholders already filled.
    pub command: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// The working folder.
    pub cwd: PathBuf,
    /// The address it listens on, when it serves.
    pub addr: Option<String>,
    /// The stable address the proxy holds for its component, when it is behind the proxy:
    /// what an agent rebuilds a lost route from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serve: Option<String>,
}

/// A request to the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Start an instance (replacing a stopped one in the same slot).
    Start { spec: Spec },
    /// Stop an instance: SIGTERM, then SIGKILL after `grace_ms`.
    Stop { component: String, slot: String, grace_ms: u64 },
    /// Points the proxy's `listen` address for `component` at `upstreams` (atomically),
    /// then waits up to `drain_ms` for the upstreams it left to finish their requests.
    /// Starts a new measuring window for every upstream of the component.
    Route { component: String, listen: String, upstreams: Vec<Upstream>, drain_ms: u64 },
    /// Serve the Prometheus metrics on `listen` (a loopback address), from now on and
    /// after a restart.
    Metrics { listen: String },
    /// Every instance.
    Status,
    /// Stop every instance and exit.
    Shutdown,
    /// The run (upgrade, rollback, ...) that the next requests on this connection serve:
    /// the agent's log lines for them carry it as a field.
    Run { id: String },
}

/// Where the proxy sends a share of a component's requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    /// The instance's address.
    pub addr: String,
    /// The version it runs, so the proxy can measure per version.
    pub version: String,
    /// Its share relative to the others' (0: no new requests).
    pub weight: u32,
}

/// Requests, errors and latency measured over a window of time.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// How long the window has been open.
    pub seconds: f64,
    /// Requests answered or failed in it.
    pub requests: u64,
    /// Of which failed: no answer, or a 5xx answer.
    pub errors: u64,
    /// p99 latency of its requests, or of its latest ones when it holds more than 4096 per
    /// upstream (at least 4096, counted from a mark taken every second, up to a minute
    /// back); read from a histogram, so within 15 % of the exact figure.
    pub p99_ms: Option<f64>,
}

/// Latencies of the requests sent to an upstream since it joined the route, as a
/// Prometheus histogram: cumulative counts at fixed bounds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latencies {
    /// The bounds, in seconds (`le`), without `+Inf` (whose count is `requests`).
    pub le_seconds: Vec<f64>,
    /// Requests that took at most each bound.
    pub counts: Vec<u64>,
    /// All the latencies added up, in seconds.
    pub sum_seconds: f64,
}

/// One upstream as the proxy sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpstreamStatus {
    /// Where it is, what it runs, and its weight.
    #[serde(flatten)]
    pub upstream: Upstream,
    /// Requests sent to it since it joined the route.
    pub requests: u64,
    /// Of which failed.
    pub errors: u64,
    /// Requests in flight now.
    pub in_flight: u64,
    /// Since the last change of the route.
    pub window: Window,
    /// Latencies since it joined the route (absent from an older agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latencies: Option<Latencies>,
}

/// What one version of a component got, over all its upstreams.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VersionStatus {
    /// The version.
    pub version: String,
    /// Its share of new requests, in percent.
    pub share: f64,
    /// Since the last change of the route.
    pub window: Window,
}

/// A component's route in the proxy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteStatus {
    /// The stable address the proxy listens on.
    pub listen: String,
    /// Where requests go.
    pub upstreams: Vec<UpstreamStatus>,
    /// The same, per version.
    pub versions: Vec<VersionStatus>,
}

impl RouteStatus {
    /// Whether requests may go to `addr`.
    #[must_use]
    pub fn serves(&self, addr: &str) -> bool {
        self.upstreams.iter().any(|u| u.upstream.addr == addr)
    }
}

/// One instance as the agent sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// What it is.
    pub spec: Spec,
    /// Its pid while it runs.
    pub pid: Option<u32>,
    /// Whether the process is alive now.
    pub running: bool,
    /// Times it was restarted after exiting on its own.
    pub restarts: u32,
    /// Its log file.
    pub log: PathBuf,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    /// Done.
    Ok,
    /// Started, with the pid.
    Started { pid: u32 },
    /// Every instance, and the proxy's routes (with what it measured) per component.
    Status {
        pid: u32,
        instances: Vec<InstanceStatus>,
        #[serde(default)]
        routes: BTreeMap<String, RouteStatus>,
    },
    /// Routed; `drained` says whether the old upstreams finished within the drain.
    Routed { drained: bool },
    /// The request failed.
    Error { message: String },
}
