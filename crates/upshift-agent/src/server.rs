//! The agent's main loop: a unix socket (mode 0600) taking one JSON request per line.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::protocol::{Request, Response};
use crate::proxy::Proxy;
use crate::supervisor::Supervisor;

/// The socket's name in the state dir.
pub const SOCKET: &str = "agent.sock";
/// The proxy's routes, saved so a restarted agent serves them again.
const ROUTES: &str = "routes.json";
/// Where the metrics are served, saved likewise.
const METRICS: &str = "metrics.json";

/// Serves the metrics on `listen`, from what the supervisor and the proxy report.
fn serve_metrics(listen: &str, supervisor: &Arc<Supervisor>, shared: &SharedProxy) -> Result<(), String> {
    let proxy = proxy(shared)?;
    // Weak: the render runs on the proxy's own runtime, which must not keep the proxy alive.
    let (weak_proxy, weak_supervisor) = (Arc::downgrade(&proxy), Arc::downgrade(supervisor));
    let render: crate::proxy::Render = Arc::new(move || {
        let routes = weak_proxy.upgrade().map(|p| p.status()).unwrap_or_default();
        let instances = weak_supervisor.upgrade().map(|s| s.status()).unwrap_or_default();
        crate::metrics::render(&routes, &instances)
    });
    proxy.serve_metrics(listen, render)
}

/// Writes the routes atomically (temp file + rename).
fn save_routes(state_dir: &Path, proxy: &Proxy) {
    let temp = state_dir.join("routes.json.tmp");
    let text = serde_json::to_vec_pretty(&proxy.saved()).expect("routes serialize");
    let written = crate::private_write(&temp, &text)
        .and_then(|()| File::open(&temp)?.sync_all())
        .and_then(|()| fs::rename(&temp, state_dir.join(ROUTES)));
    if let Err(e) = written {
        tracing::error!(file = ROUTES, error = %e, "could not save the routes");
    }
}

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Another agent holds this state dir.
    #[error("another agent already runs for {0}")]
    AlreadyRunning(String),
    /// The socket or state dir could not be set up.
    #[error("could not {0}")]
    Io(String, #[source] std::io::Error),
}

/// The proxy, started by the first `route` request.
type SharedProxy = Mutex<Option<Arc<Proxy>>>;

fn proxy(shared: &SharedProxy) -> Result<Arc<Proxy>, String> {
    let mut slot = shared.lock().expect("proxy lock");
    if slot.is_none() {
        *slot = Some(Arc::new(Proxy::new().map_err(|e| format!("could not start the proxy: {e}"))?));
    }
    Ok(Arc::clone(slot.as_ref().expect("just set")))
}

fn handle(stream: UnixStream, state_dir: &Path, supervisor: &Arc<Supervisor>, shared: &SharedProxy, stop: &AtomicBool) {
    let Ok(reader_stream) = stream.try_clone() else { return };
    let mut writer = stream;
    // The run this connection serves, once the client says (`Request::Run`).
    let mut run: Option<String> = None;
    for line in BufReader::new(reader_stream).lines() {
        let Ok(line) = line else { return };
        let span = tracing::info_span!("request", run = run.as_deref().unwrap_or("-"));
        let _entered = span.enter();
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Run { id }) => {
                run = Some(id);
                Response::Ok
            }
            Err(e) => Response::Error { message: format!("bad request: {e}") },
            Ok(Request::Start { spec }) => {
                let (component, version, slot) = (spec.component.clone(), spec.version.clone(), spec.slot.clone());
                match supervisor.start(spec) {
                    Ok(pid) => {
                        tracing::info!(%component, %version, %slot, pid, "started");
                        Response::Started { pid }
                    }
                    Err(message) => {
                        tracing::error!(%component, %version, %slot, %message, "could not start");
                        Response::Error { message }
                    }
                }
            }
            Ok(Request::Stop { component, slot, grace_ms }) => {
                match supervisor.stop(&component, &slot, Duration::from_millis(grace_ms)) {
                    Ok(()) => {
                        tracing::info!(%component, %slot, "stopped");
                        Response::Ok
                    }
                    Err(message) => Response::Error { message },
                }
            }
            Ok(Request::Route { component, listen, upstreams, drain_ms }) => {
                let routed = proxy(shared).and_then(|p| {
                    let drained = p.route(&component, &listen, &upstreams, Duration::from_millis(drain_ms))?;
                    save_routes(state_dir, &p);
                    Ok(drained)
                });
                match routed {
                    Ok(drained) => {
                        let to: Vec<String> =
                            upstreams.iter().map(|u| format!("{} {}x{}", u.addr, u.version, u.weight)).collect();
                        tracing::info!(%component, %listen, upstreams = %to.join(", "), drained, "routed");
                        Response::Routed { drained }
                    }
                    Err(message) => {
                        tracing::error!(%component, %listen, %message, "could not route");
                        Response::Error { message }
                    }
                }
            }
            Ok(Request::Metrics { listen }) => match serve_metrics(&listen, supervisor, shared) {
                Ok(()) => {
                    let saved = serde_json::json!({ "listen": listen }).to_string();
                    if let Err(e) = crate::private_write(&state_dir.join(METRICS), saved.as_bytes()) {
                        tracing::error!(file = METRICS, error = %e, "could not save the metrics address");
                    }
                    Response::Ok
                }
                Err(message) => Response::Error { message },
            },
            Ok(Request::Status) => {
                // One lock for both: a second lock() in the same expression would deadlock.
                let proxy = shared.lock().expect("proxy lock").clone();
                Response::Status {
                    pid: std::process::id(),
                    instances: supervisor.status(),
                    routes: proxy.as_ref().map(|p| p.status()).unwrap_or_default(),
                }
            }
            Ok(Request::Shutdown) => {
                tracing::info!("shutting down: stopping every process");
                stop.store(true, Ordering::SeqCst);
                Response::Ok
            }
        };
        let mut text = serde_json::to_string(&response).expect("a response serializes");
        text.push('\n');
        if writer.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

/// The routes the running instances behind the proxy imply: each component with a
/// `serve` address to every running instance of it (weight 1). Used when routes.json is
/// lost; the run in flight (or the next one) then settles which version serves.
fn routes_of(instances: &[crate::protocol::InstanceStatus]) -> Vec<crate::proxy::SavedRoute> {
    let mut routes: std::collections::BTreeMap<String, crate::proxy::SavedRoute> = std::collections::BTreeMap::new();
    for instance in instances.iter().filter(|i| i.running) {
        let spec = &instance.spec;
        let (Some(serve), Some(addr)) = (&spec.serve, &spec.addr) else { continue };
        tracing::warn!(component = %spec.component, listen = %serve, upstream = %addr, "rebuilding a lost route from a running instance");
        routes
            .entry(spec.component.clone())
            .or_insert_with(|| crate::proxy::SavedRoute {
                component: spec.component.clone(),
                listen: serve.clone(),
                upstreams: Vec::new(),
            })
            .upstreams
            .push(crate::protocol::Upstream { addr: addr.clone(), version: spec.version.clone(), weight: 1 });
    }
    routes.into_values().collect()
}

/// Runs the agent for `state_dir` until a `shutdown` request: one agent per state dir,
/// guarded by a lock on `agent.lock`.
pub fn run(state_dir: &Path) -> Result<(), AgentError> {
    let io = |what: &str| {
        let what = what.to_owned();
        move |e| AgentError::Io(what, e)
    };
    crate::private_dir(state_dir).map_err(io("create the state dir"))?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(state_dir.join("agent.lock"))
        .map_err(io("open agent.lock"))?;
    if lock.try_lock().is_err() {
        return Err(AgentError::AlreadyRunning(state_dir.display().to_string()));
    }
    let socket = state_dir.join(SOCKET);
    // The lock is ours, so a socket file left here belongs to a dead agent.
    let _ = fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(io("bind agent.sock"))?;
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o600)).map_err(io("restrict agent.sock"))?;
    listener.set_nonblocking(true).map_err(io("configure agent.sock"))?;

    let supervisor = Supervisor::new(state_dir);
    let shared: Arc<SharedProxy> = Arc::new(Mutex::new(None));
    // Serve the routes of the agent before this one (it died, or the machine restarted); a
    // damaged routes.json is rebuilt from the running instances, so that no serve address
    // is left without a listener.
    let saved: Vec<crate::proxy::SavedRoute> =
        crate::read_state(&state_dir.join(ROUTES)).unwrap_or_else(|| routes_of(&supervisor.status()));
    for route in saved {
        let restored =
            proxy(&shared).and_then(|p| p.route(&route.component, &route.listen, &route.upstreams, Duration::ZERO));
        if let Err(e) = restored {
            tracing::error!(component = %route.component, error = %e, "could not restore the route");
        }
    }
    let metrics: Option<serde_json::Value> =
        fs::read_to_string(state_dir.join(METRICS)).ok().and_then(|text| serde_json::from_str(&text).ok());
    if let Some(listen) = metrics.as_ref().and_then(|m| m["listen"].as_str())
        && let Err(e) = serve_metrics(listen, &supervisor, &shared)
    {
        tracing::error!(error = %e, "could not serve the metrics again");
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let supervisor = Arc::clone(&supervisor);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                supervisor.tick();
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    }
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let supervisor = Arc::clone(&supervisor);
                let shared = Arc::clone(&shared);
                let stop = Arc::clone(&stop);
                let state_dir = state_dir.to_path_buf();
                std::thread::spawn(move || handle(stream, &state_dir, &supervisor, &shared, &stop));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
            // Out of descriptors (EMFILE/ENFILE), or a connection that died while queued:
            // the agent waits and goes on; it never exits and leaves its processes orphaned.
            Err(e)
                if matches!(e.raw_os_error(), Some(23 | 24 | 103 | 71))
                    || e.kind() == std::io::ErrorKind::ConnectionAborted =>
            {
                tracing::warn!(error = %e, "accept on agent.sock failed; waiting");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(AgentError::Io("accept on agent.sock".into(), e)),
        }
    }
    supervisor.shutdown(Duration::from_secs(10));
    let _ = fs::remove_file(state_dir.join(ROUTES));
    let _ = fs::remove_file(state_dir.join(METRICS));
    let _ = fs::remove_file(&socket);
    drop::<File>(lock);
    Ok(())
}
