//! The reverse proxy: holds each component's stable `serve` address and forwards every
//! request to the component's current upstream set, which a switch replaces atomically.
//!
//! Runs on its own tokio runtime inside the agent. Upstream connections are pooled and
//! kept alive. A switch publishes the new set in one step (readers take an `Arc` of the
//! set); requests already sent to an old upstream complete, and the switch waits (up to the
//! component's `drain`) until the old upstreams have no request in flight. A request that
//! cannot reach its upstream is retried once on another one when that is safe: an
//! idempotent method, and nothing was sent. This first version buffers request and response
//! bodies (no streaming or WebSocket pass-through yet).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Requests larger than this are refused (bodies are buffered).
const MAX_BODY: usize = 16 * 1024 * 1024;
/// How long one upstream exchange may take.
const UPSTREAM_TIMEOUT: Duration = Duration::from_mins(2);

struct Upstream {
    addr: String,
    in_flight: AtomicUsize,
    stats: Mutex<Stats>,
}

/// Latencies kept per upstream for its p99.
const LATENCY_WINDOW: usize = 4096;

/// What the proxy measured of one upstream.
#[derive(Default)]
struct Stats {
    requests: u64,
    errors: u64,
    /// The last [`LATENCY_WINDOW`] answered requests' latencies, in a ring.
    latencies: Vec<Duration>,
    next: usize,
}

impl Stats {
    fn record(&mut self, latency: Duration, error: bool) {
        self.requests += 1;
        if error {
            self.errors += 1;
        }
        if self.latencies.len() < LATENCY_WINDOW {
            self.latencies.push(latency);
        } else {
            self.latencies[self.next] = latency;
            self.next = (self.next + 1) % LATENCY_WINDOW;
        }
    }

    fn p99_ms(&self) -> Option<f64> {
        if self.latencies.is_empty() {
            return None;
        }
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let index = (sorted.len() * 99).div_ceil(100).saturating_sub(1);
        Some(sorted[index].as_secs_f64() * 1000.0)
    }
}

/// An upstream's figures, for the admin API.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UpstreamMetrics {
    /// The upstream's address.
    pub addr: String,
    /// Requests sent to it.
    pub requests: u64,
    /// Of which failed: no answer, or a 5xx answer.
    pub errors: u64,
    /// Requests in flight now.
    pub in_flight: u64,
    /// p99 latency of its last answered requests.
    pub p99_ms: Option<f64>,
}

struct Route {
    listen: String,
    upstreams: RwLock<Arc<Vec<Arc<Upstream>>>>,
    next: AtomicUsize,
}

/// A route as saved to the state dir, so a restarted agent serves it again.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct SavedRoute {
    pub(crate) component: String,
    pub(crate) listen: String,
    pub(crate) upstreams: Vec<String>,
}

impl Route {
    fn current(&self) -> Arc<Vec<Arc<Upstream>>> {
        Arc::clone(&self.upstreams.read().expect("route lock"))
    }

    /// Round robin over the current set, skipping `avoid`.
    fn pick(&self, avoid: Option<&str>) -> Option<Arc<Upstream>> {
        let set = self.current();
        let candidates: Vec<&Arc<Upstream>> = set.iter().filter(|u| Some(u.addr.as_str()) != avoid).collect();
        if candidates.is_empty() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Some(Arc::clone(candidates[n % candidates.len()]))
    }
}

/// The proxy of one agent.
pub(crate) struct Proxy {
    runtime: tokio::runtime::Runtime,
    routes: Mutex<HashMap<String, Arc<Route>>>,
    client: HttpClient,
}

fn respond(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = format!("{{\"error\": {}}}", serde_json::Value::String(message.to_owned()));
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Hop-by-hop headers, which are not forwarded.
const HOP_BY_HOP: &[&str] =
    &["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"];

async fn forward(
    client: &HttpClient,
    upstream: &Upstream,
    method: &Method,
    uri_path: &str,
    headers: &hyper::HeaderMap,
    body: &Bytes,
) -> Result<Response<Full<Bytes>>, (bool, String)> {
    let uri: hyper::Uri =
        format!("http://{}{uri_path}", upstream.addr).parse().map_err(|e| (false, format!("bad upstream uri: {e}")))?;
    let mut request = Request::builder().method(method.clone()).uri(uri);
    for (name, value) in headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            request = request.header(name, value);
        }
    }
    let request = request.body(Full::new(body.clone())).map_err(|e| (false, e.to_string()))?;
    upstream.in_flight.fetch_add(1, Ordering::SeqCst);
    let started = Instant::now();
    let result = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
        let response = client.request(request).await.map_err(|e| (e.is_connect(), e.to_string()))?;
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.map_err(|e| (false, e.to_string()))?.to_bytes();
        Ok(Response::from_parts(parts, Full::new(bytes)))
    })
    .await;
    upstream.in_flight.fetch_sub(1, Ordering::SeqCst);
    let result = result.unwrap_or_else(|_| Err((false, "the upstream timed out".to_owned())));
    let error = result.as_ref().map_or(true, |r| r.status().is_server_error());
    upstream.stats.lock().expect("stats lock").record(started.elapsed(), error);
    result
}

async fn handle(
    request: Request<Incoming>,
    peer: SocketAddr,
    route: Arc<Route>,
    client: HttpClient,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (parts, body) = request.into_parts();
    let body = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Ok(respond(StatusCode::PAYLOAD_TOO_LARGE, "the request body is too large or broken")),
    };
    let mut headers = parts.headers.clone();
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(HeaderName::from_static("x-forwarded-for"), value);
    }
    headers.insert(HeaderName::from_static("x-forwarded-proto"), HeaderValue::from_static("http"));
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let idempotent =
        matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE);
    let Some(first) = route.pick(None) else {
        return Ok(respond(StatusCode::SERVICE_UNAVAILABLE, "no upstream is live"));
    };
    match forward(&client, &first, &parts.method, &path, &headers, &body).await {
        Ok(response) => Ok(response),
        // Safe to send once more, elsewhere when possible: an idempotent request, or any
        // request that never reached its upstream (a connect error).
        Err((not_sent, message)) if idempotent || not_sent => {
            let second = route.pick(Some(&first.addr)).unwrap_or(first);
            Ok(forward(&client, &second, &parts.method, &path, &headers, &body)
                .await
                .unwrap_or_else(|(_, again)| respond(StatusCode::BAD_GATEWAY, &format!("{message}; then {again}"))))
        }
        // Sent, and not safe to send again.
        Err((_, message)) => Ok(respond(StatusCode::BAD_GATEWAY, &message)),
    }
}

impl Proxy {
    pub(crate) fn new() -> std::io::Result<Proxy> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("upshift-proxy")
            .build()?;
        let client = {
            let _guard = runtime.enter();
            Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(10)).build_http()
        };
        Ok(Proxy { runtime, routes: Mutex::new(HashMap::new()), client })
    }

    /// Points `component`'s address `listen` at `upstreams`, atomically, then waits up to
    /// `drain` for the upstreams it no longer uses to finish their requests. Returns whether
    /// they did.
    pub(crate) fn route(
        &self,
        component: &str,
        listen: &str,
        upstreams: &[String],
        drain: Duration,
    ) -> Result<bool, String> {
        let route = {
            let mut routes = self.routes.lock().expect("routes lock");
            if let Some(route) = routes.get(component) {
                Arc::clone(route)
            } else {
                let listener = self
                    .runtime
                    .block_on(tokio::net::TcpListener::bind(listen))
                    .map_err(|e| format!("the proxy cannot listen on {listen}: {e}"))?;
                let route = Arc::new(Route {
                    listen: listen.to_owned(),
                    upstreams: RwLock::new(Arc::new(Vec::new())),
                    next: AtomicUsize::new(0),
                });
                let accepting = Arc::clone(&route);
                let client = self.client.clone();
                self.runtime.spawn(async move {
                    loop {
                        let Ok((stream, peer)) = listener.accept().await else { continue };
                        let route = Arc::clone(&accepting);
                        let client = client.clone();
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(move |request| {
                                handle(request, peer, Arc::clone(&route), client.clone())
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .keep_alive(true)
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                });
                routes.insert(component.to_owned(), Arc::clone(&route));
                route
            }
        };
        let old = route.current();
        let new: Vec<Arc<Upstream>> = upstreams
            .iter()
            .map(|addr| {
                old.iter().find(|u| &u.addr == addr).map_or_else(
                    || {
                        Arc::new(Upstream {
                            addr: addr.clone(),
                            in_flight: AtomicUsize::new(0),
                            stats: Mutex::new(Stats::default()),
                        })
                    },
                    Arc::clone,
                )
            })
            .collect();
        *route.upstreams.write().expect("route lock") = Arc::new(new);
        let removed: Vec<&Arc<Upstream>> = old.iter().filter(|u| !upstreams.contains(&u.addr)).collect();
        let deadline = Instant::now() + drain;
        while removed.iter().any(|u| u.in_flight.load(Ordering::SeqCst) > 0) {
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(true)
    }

    /// Every route, to save.
    pub(crate) fn saved(&self) -> Vec<SavedRoute> {
        let mut saved: Vec<SavedRoute> = self
            .routes
            .lock()
            .expect("routes lock")
            .iter()
            .map(|(component, route)| SavedRoute {
                component: component.clone(),
                listen: route.listen.clone(),
                upstreams: route.current().iter().map(|u| u.addr.clone()).collect(),
            })
            .collect();
        saved.sort_by(|a, b| a.component.cmp(&b.component));
        saved
    }

    /// What the proxy measured, per component and upstream it routes to.
    pub(crate) fn metrics(&self) -> BTreeMap<String, Vec<UpstreamMetrics>> {
        self.routes
            .lock()
            .expect("routes lock")
            .iter()
            .map(|(component, route)| {
                let upstreams = route
                    .current()
                    .iter()
                    .map(|u| {
                        let stats = u.stats.lock().expect("stats lock");
                        UpstreamMetrics {
                            addr: u.addr.clone(),
                            requests: stats.requests,
                            errors: stats.errors,
                            in_flight: u.in_flight.load(Ordering::SeqCst) as u64,
                            p99_ms: stats.p99_ms(),
                        }
                    })
                    .collect();
                (component.clone(), upstreams)
            })
            .collect()
    }

    /// Every component's upstreams.
    pub(crate) fn routes(&self) -> BTreeMap<String, Vec<String>> {
        self.routes
            .lock()
            .expect("routes lock")
            .iter()
            .map(|(component, route)| (component.clone(), route.current().iter().map(|u| u.addr.clone()).collect()))
            .collect()
    }
}
