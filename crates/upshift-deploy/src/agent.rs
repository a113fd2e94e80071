//! The link to the agent of a state dir, shared by the drivers that use it: the process
//! driver (its supervisor and proxy) and the Compose driver (its proxy only).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use upshift_agent::{Client, ClientError, Request, Response, RouteStatus, Upstream};
use upshift_core::Manifest;
use upshift_core::driver::DriverError;
use upshift_core::manifest::Component;

/// What the agent says runs: its processes and its routes by component.
pub(crate) type AgentStatus = (Vec<upshift_agent::InstanceStatus>, BTreeMap<String, RouteStatus>);

/// The agent failed to answer.
pub(crate) fn unavailable(e: &ClientError) -> DriverError {
    DriverError::Unavailable(e.to_string())
}

/// A connection to the agent, and how to start a new one when it dies mid-run.
pub(crate) struct Agent {
    client: Client,
    /// The state dir and the upshift binary (none for `status`, which starts nothing).
    restart: Option<(PathBuf, PathBuf)>,
}

impl Agent {
    /// Connects to the agent of the manifest's state dir, starting it with `program agent`
    /// when needed, and has it serve its Prometheus metrics when `[agent] metrics` is set.
    pub(crate) fn start(manifest: &Manifest, program: &Path) -> Result<Agent, DriverError> {
        let mut client = Client::connect_or_start(&manifest.state_dir, program).map_err(|e| unavailable(&e))?;
        if let Some(listen) = &manifest.agent.metrics {
            client.request(&Request::Metrics { listen: listen.clone() }).map_err(|e| unavailable(&e))?;
        }
        Ok(Agent { client, restart: Some((manifest.state_dir.clone(), program.to_path_buf())) })
    }

    /// Connects only when the agent already runs.
    pub(crate) fn connect(manifest: &Manifest) -> Option<Agent> {
        Client::connect(&manifest.state_dir).ok().map(|client| Agent { client, restart: None })
    }

    /// One request. When the agent died (kill -9, OOM), a new one is started (it adopts
    /// the running processes and serves the saved routes) and the request is sent once
    /// more: a run whose agent dies mid-step goes on, or undoes, with the service served.
    pub(crate) fn ask(&mut self, request: &Request) -> Result<Response, ClientError> {
        match self.client.request(request) {
            Err(ClientError::Io(e)) if self.restart.is_some() => {
                let (state_dir, program) = self.restart.clone().expect("checked");
                crate::say_aloud(&format!("  the agent went away ({e}); starting a new one"));
                self.client = Client::connect_or_start(&state_dir, &program)?;
                self.client.request(request)
            }
            result => result,
        }
    }

    /// The agent's processes and routes.
    pub(crate) fn status(&mut self) -> Result<AgentStatus, DriverError> {
        match self.ask(&Request::Status).map_err(|e| unavailable(&e))? {
            Response::Status { instances, routes, .. } => Ok((instances, routes)),
            other => Err(DriverError::Refused(format!("unexpected answer from the agent: {other:?}"))),
        }
    }

    /// The proxy's route for `component`, if it has one.
    pub(crate) fn route_of(&mut self, component: &Component) -> Result<Option<RouteStatus>, DriverError> {
        Ok(self.status()?.1.remove(&component.name))
    }

    /// Points the proxy on the component's stable address at `upstreams`; the ones it
    /// leaves drain (up to the component's `drain`) before the answer.
    pub(crate) fn route(&mut self, component: &Component, upstreams: Vec<Upstream>) -> Result<(), DriverError> {
        let listen = component
            .serve()
            .map(str::to_owned)
            .ok_or_else(|| DriverError::Refused(format!("component {} has no `serve` address", component.name)))?;
        let drain_ms = u64::try_from(component.drain.as_millis()).unwrap_or(u64::MAX);
        self.ask(&Request::Route { component: component.name.clone(), listen, upstreams, drain_ms })
            .map(drop)
            .map_err(|e| unavailable(&e))
    }

    /// Tells the agent which run the next requests serve, for its logs. An older agent
    /// answers an unknown request with an error: only its logs lose out.
    pub(crate) fn note_run(&mut self, run: &str) {
        let _ = self.ask(&Request::Run { id: run.to_owned() });
    }
}

/// Whether `serve` is free, or already held by the proxy for this component: checked in
/// preflight, before anything changes.
pub(crate) fn serve_is_free_or_ours(component: &Component, route: Option<&RouteStatus>) -> Result<(), DriverError> {
    let Some(serve) = component.serve() else { return Ok(()) };
    let ours = route.is_some_and(|r| r.listen == serve);
    if !ours && std::net::TcpListener::bind(serve).is_err() {
        return Err(DriverError::Refused(format!(
            "component {}: its serve address {serve} is taken by another process; stop it or choose another address",
            component.name
        )));
    }
    Ok(())
}
