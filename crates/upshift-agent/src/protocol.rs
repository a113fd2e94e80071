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
    Route { component: String, listen: String, upstreams: Vec<String>, drain_ms: u64 },
    /// Every instance.
    Status,
    /// Stop every instance and exit.
    Shutdown,
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
    /// Every instance, and the proxy's upstreams per component.
    Status {
        pid: u32,
        instances: Vec<InstanceStatus>,
        #[serde(default)]
        routes: BTreeMap<String, Vec<String>>,
        /// What the proxy measured per component and upstream.
        #[serde(default)]
        metrics: BTreeMap<String, Vec<crate::proxy::UpstreamMetrics>>,
    },
    /// Routed; `drained` says whether the old upstreams finished within the drain.
    Routed { drained: bool },
    /// The request failed.
    Error { message: String },
}
