//! The reverse proxy: holds each component's stable `serve` address and forwards every
//! request to the component's current upstream set, which a switch replaces atomically.
//!
//! Runs inside the agent on one thread per core (each a single-threaded tokio runtime, as
//! nginx runs a worker process per core): a client connection is accepted on a small
//! control runtime and handed to the worker with the fewest connections, which then does
//! all of its work, its upstream connections included, so a request never hops between
//! threads. Each worker keeps its own pool of kept-alive upstream connections per upstream.
//! A switch publishes the new set in one step (readers take an `Arc` of the set); requests
//! already sent to an old upstream complete, and the switch waits (up to the component's
//! `drain`) until the old upstreams have no request in flight. Upstreams carry weights (a
//! canary gets a share of new requests) and the version they run, and the proxy measures
//! requests, errors and latency per upstream and per version (lock-free counters, see
//! [`crate::histogram`]), read over a window that each change of the route opens anew.
//!
//! A request that cannot reach its upstream is retried once on another one when that is
//! safe: an idempotent method, or nothing was sent. Request bodies are buffered (up to
//! 16 MiB) so they can be sent again; response bodies stream through, and an upgrade
//! (WebSocket) is passed through as a byte stream once the upstream answers 101. Clients
//! speak HTTP/1.1 or HTTP/2 without TLS (h2c, prior knowledge); upstreams get HTTP/1.1.
//! HTTP/1.x clients are served by [`crate::http1`]; this module serves HTTP/2 clients
//! through hyper, and holds what both share: routes, upstreams, pools and measures.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::gate::{Busy, Gate};
use crate::histogram::{Counts, Histogram};
use crate::protocol::{Latencies, RouteStatus, Upstream, UpstreamStatus, VersionStatus, Window};

/// One kept-alive HTTP/1.1 connection to an upstream, as the proxy sends on it.
type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Requests larger than this are refused (request bodies are buffered).
pub(crate) const MAX_BODY: usize = 16 * 1024 * 1024;
/// How long an upstream may take to answer (its headers).
pub(crate) const UPSTREAM_TIMEOUT: Duration = Duration::from_mins(2);
/// How long a client may take to send its request headers, once it started.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may take to send its request body.
pub(crate) const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// What an HTTP/2 client opens its connection with (h2c with prior knowledge).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The p99 of a window is read over at least this many of its latest requests per upstream
/// when it holds more (in steps of [`TICK`], up to [`MARKS`] of them back).
const LATENCY_WINDOW: u64 = 4096;
/// How often the proxy marks each upstream's counts (for the latest-requests p99) and
/// closes idle upstream connections.
const TICK: Duration = Duration::from_secs(1);
/// Marks kept per upstream.
const MARKS: usize = 64;
/// An idle upstream connection is closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(10);
/// Idle upstream connections kept per upstream and worker; more are closed after use.
const POOL_MAX_IDLE: usize = 256;
/// The most worker threads, whatever the cores.
const MOST_WORKERS: usize = 8;
/// The Prometheus bucket bounds exported, in nanoseconds (each one of the histogram's).
const EXPORTED_BOUNDS_NS: [u64; 15] = [
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    100_000_000_000,
];

/// An upstream connection that can tell whether it closed while idle.
pub(crate) trait Reusable {
    fn is_closed(&self) -> bool;
}

impl Reusable for Sender {
    fn is_closed(&self) -> bool {
        Sender::is_closed(self)
    }
}

/// Idle kept-alive connections to one upstream, one pool per worker (each worker takes its
/// own, so they never wait on each other).
pub(crate) struct Pool<C> {
    idle: Box<[Idle<C>]>,
}

/// One worker's idle connections, each with when it was last used.
type Idle<C> = Mutex<Vec<(C, Instant)>>;

impl<C: Reusable> Pool<C> {
    fn new(workers: usize) -> Pool<C> {
        Pool { idle: (0..workers.max(1)).map(|_| Mutex::new(Vec::new())).collect() }
    }

    /// This worker's pool.
    fn mine(&self) -> &Idle<C> {
        &self.idle[crate::histogram::worker() % self.idle.len()]
    }

    /// The most recently used idle connection of this worker, if any.
    pub(crate) fn checkout(&self) -> Option<C> {
        let mut pool = self.mine().lock().expect("pool lock");
        while let Some((conn, _)) = pool.pop() {
            if !conn.is_closed() {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps a connection whose exchange is done for the next request.
    pub(crate) fn checkin(&self, conn: C) {
        if conn.is_closed() {
            return;
        }
        let mut pool = self.mine().lock().expect("pool lock");
        if pool.len() < POOL_MAX_IDLE {
            pool.push((conn, Instant::now()));
        }
    }

    /// Closes connections idle for longer than [`POOL_IDLE`], or closed by the upstream.
    fn expire(&self) {
        for pool in &*self.idle {
            pool.lock().expect("pool lock").retain(|(conn, since)| since.elapsed() < POOL_IDLE && !conn.is_closed());
        }
    }
}

/// An upstream and what the proxy measured of it.
pub(crate) struct Backend {
    pub(crate) addr: String,
    /// `addr` as a `Host` for requests that came without one (HTTP/1.0).
    host: Option<HeaderValue>,
    version: String,
    weight: AtomicU32,
    pub(crate) in_flight: AtomicUsize,
    /// Requests, errors and latencies since it joined the route; written without a lock.
    histogram: Histogram,
    /// Where the window opened; only readers and route changes take this lock.
    window: Mutex<Opened>,
    /// Idle connections for HTTP/1.1 clients' requests.
    pub(crate) conns: Pool<crate::http1::Conn>,
    /// Idle connections for HTTP/2 clients' requests (through hyper).
    senders: Pool<Sender>,
}

/// A window: when it opened, the counts then, and the counts at each [`TICK`] since (the
/// latest [`MARKS`]), to read the p99 of the latest requests.
struct Opened {
    since: Instant,
    baseline: Counts,
    marks: VecDeque<Counts>,
}

impl Opened {
    fn new(baseline: Counts) -> Opened {
        Opened { since: Instant::now(), baseline, marks: VecDeque::new() }
    }

    /// The counts since the newest mark with at least [`LATENCY_WINDOW`] requests after
    /// it, else since the window opened.
    fn latest(&self, now: &Counts) -> Counts {
        let requests = now.requests();
        self.marks
            .iter()
            .rev()
            .find(|mark| requests.saturating_sub(mark.requests()) >= LATENCY_WINDOW)
            .map_or_else(|| now.since(&self.baseline), |mark| now.since(mark))
    }

    fn mark(&mut self, now: Counts) {
        let requests = now.requests();
        // The oldest mark is no longer needed once the next one has enough after it.
        while self.marks.len() >= MARKS
            || (self.marks.len() >= 2 && requests.saturating_sub(self.marks[1].requests()) >= LATENCY_WINDOW)
        {
            self.marks.pop_front();
        }
        self.marks.push_back(now);
    }
}

/// The window figures of several upstreams together.
fn window_of<'a>(backends: impl Iterator<Item = &'a Backend>) -> Window {
    let mut window = Window::default();
    let mut latest = Counts::default();
    for backend in backends {
        let now = backend.histogram.counts();
        let opened = backend.window.lock().expect("window lock");
        window.seconds = window.seconds.max(opened.since.elapsed().as_secs_f64());
        let in_window = now.since(&opened.baseline);
        window.requests += in_window.requests();
        window.errors += in_window.errors;
        latest.add(&opened.latest(&now));
    }
    window.p99_ms = latest.quantile_ms(0.99);
    window
}

impl Backend {
    fn new(upstream: &Upstream, workers: usize) -> Backend {
        let histogram = Histogram::new();
        let baseline = histogram.counts();
        Backend {
            addr: upstream.addr.clone(),
            host: HeaderValue::from_str(&upstream.addr).ok(),
            version: upstream.version.clone(),
            weight: AtomicU32::new(upstream.weight),
            in_flight: AtomicUsize::new(0),
            histogram,
            window: Mutex::new(Opened::new(baseline)),
            conns: Pool::new(workers),
            senders: Pool::new(workers),
        }
    }

    pub(crate) fn record(&self, latency: Duration, error: bool) {
        self.histogram.record(latency, error);
    }

    /// Marks the counts for the window's latest-requests p99, and closes connections idle
    /// for longer than [`POOL_IDLE`].
    fn tick(&self) {
        let now = self.histogram.counts();
        self.window.lock().expect("window lock").mark(now);
        self.conns.expire();
        self.senders.expire();
    }

    fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    fn upstream(&self) -> Upstream {
        Upstream { addr: self.addr.clone(), version: self.version.clone(), weight: self.weight() }
    }

    fn status(&self) -> UpstreamStatus {
        let total = self.histogram.counts();
        #[allow(clippy::cast_precision_loss)]
        let latencies = Latencies {
            le_seconds: EXPORTED_BOUNDS_NS.iter().map(|&ns| ns as f64 / 1e9).collect(),
            counts: total.cumulative(&EXPORTED_BOUNDS_NS),
            sum_seconds: total.sum_ns as f64 / 1e9,
        };
        UpstreamStatus {
            upstream: self.upstream(),
            requests: total.requests(),
            errors: total.errors,
            in_flight: self.in_flight.load(Ordering::SeqCst) as u64,
            window: window_of(std::iter::once(self)),
            latencies: Some(latencies),
        }
    }
}

pub(crate) struct Route {
    listen: String,
    backends: RwLock<Arc<Vec<Arc<Backend>>>>,
    next: AtomicU64,
}

/// A route as saved to the state dir, so a restarted agent serves it again.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct SavedRoute {
    pub(crate) component: String,
    pub(crate) listen: String,
    pub(crate) upstreams: Vec<Upstream>,
}

impl Route {
    fn current(&self) -> Arc<Vec<Arc<Backend>>> {
        Arc::clone(&self.backends.read().expect("route lock"))
    }

    /// Weighted round robin over the current set, skipping `avoid`: of every `total`
    /// consecutive requests, each upstream gets its weight.
    pub(crate) fn pick(&self, avoid: Option<&str>) -> Option<Arc<Backend>> {
        let set = self.current();
        let candidates = || set.iter().filter(|b| b.weight() > 0 && Some(b.addr.as_str()) != avoid);
        let total: u64 = candidates().map(|b| u64::from(b.weight())).sum();
        if total == 0 {
            return None;
        }
        let mut point = self.next.fetch_add(1, Ordering::Relaxed) % total;
        for backend in candidates() {
            let weight = u64::from(backend.weight());
            if point < weight {
                return Some(Arc::clone(backend));
            }
            point -= weight;
        }
        None
    }

    fn status(&self) -> RouteStatus {
        let set = self.current();
        let total: u64 = set.iter().map(|b| u64::from(b.weight())).sum();
        let mut versions: Vec<&str> = Vec::new();
        for backend in set.iter() {
            if !versions.contains(&backend.version.as_str()) {
                versions.push(&backend.version);
            }
        }
        let versions = versions
            .into_iter()
            .map(|version| {
                let of_version = || set.iter().filter(move |b| b.version == version).map(AsRef::as_ref);
                let weight: u64 = of_version().map(|b| u64::from(b.weight())).sum();
                #[allow(clippy::cast_precision_loss)]
                let share = if total == 0 { 0.0 } else { weight as f64 * 100.0 / total as f64 };
                VersionStatus { version: version.to_owned(), share, window: window_of(of_version()) }
            })
            .collect();
        RouteStatus { listen: self.listen.clone(), upstreams: set.iter().map(|b| b.status()).collect(), versions }
    }
}

/// A thread of the proxy that serves client connections on its own single-threaded runtime.
struct Worker {
    handle: tokio::runtime::Handle,
    /// Client connections it serves now.
    connections: Arc<AtomicUsize>,
    /// Ends the thread (and its runtime) when the proxy is dropped.
    stop: Arc<tokio::sync::Notify>,
}

impl Worker {
    fn start(index: usize) -> std::io::Result<Worker> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let stop = Arc::new(tokio::sync::Notify::new());
        let stopped = Arc::clone(&stop);
        std::thread::Builder::new().name(format!("upshift-proxy-{index}")).spawn(move || {
            crate::histogram::set_worker(index);
            runtime.block_on(stopped.notified());
        })?;
        Ok(Worker { handle, connections: Arc::new(AtomicUsize::new(0)), stop })
    }
}

/// Counts a client connection of a worker while it is open.
struct Served(Arc<AtomicUsize>);

impl Drop for Served {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The proxy of one agent.
pub(crate) struct Proxy {
    /// Accepts connections, serves the metrics, marks the counts.
    runtime: tokio::runtime::Runtime,
    /// Serve the client connections.
    workers: Arc<[Worker]>,
    /// The cap on client connections, shared by every listener.
    gate: Arc<Gate>,
    routes: Arc<Mutex<HashMap<String, Arc<Route>>>>,
    /// Where the Prometheus metrics are served, once asked for.
    metrics: Mutex<Option<String>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for worker in &*self.workers {
            worker.stop.notify_one();
        }
    }
}

/// Produces the metrics text on each scrape.
pub(crate) type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// What the proxy answers with: its own message, or the upstream's body streaming through
/// (an enum rather than a box: no allocation per response).
enum ProxyBody {
    Full(Full<Bytes>),
    Tracked(Tracked),
}

impl ProxyBody {
    fn full(bytes: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::Full(Full::new(bytes.into()))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(full) => Pin::new(full).poll_frame(cx).map_err(|never| match never {}),
            ProxyBody::Tracked(tracked) => Pin::new(tracked).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(full) => full.is_end_stream(),
            ProxyBody::Tracked(tracked) => tracked.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            ProxyBody::Full(full) => full.size_hint(),
            ProxyBody::Tracked(tracked) => tracked.size_hint(),
        }
    }
}

/// The body of the proxy's own answers: `{"error": message}`.
pub(crate) fn error_json(message: &str) -> String {
    format!("{{\"error\": {}}}", serde_json::Value::String(message.to_owned()))
}

fn respond(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(error_json(message)));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Hop-by-hop headers, which are not forwarded (an upgrade keeps `connection` and `upgrade`).
pub(crate) static HOP_BY_HOP: [HeaderName; 7] = [
    hyper::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    hyper::header::TE,
    hyper::header::TRAILER,
    hyper::header::TRANSFER_ENCODING,
    hyper::header::UPGRADE,
];
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// A response body that holds its upstream's in-flight count until it is done or dropped,
/// so a drain waits for bodies still streaming; once it has ended, its upstream connection
/// goes back to the pool.
struct Tracked {
    inner: Incoming,
    backend: Arc<Backend>,
    sender: Option<Sender>,
    /// The body reached its end.
    ended: bool,
    /// The client connection stays busy (not evicted by the gate) until the body is sent.
    _busy: Busy,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // A body not read to its end leaves its connection unusable: it closes.
        if let Some(sender) = self.sender.take()
            && (self.ended || self.inner.is_end_stream())
        {
            self.backend.senders.checkin(sender);
        }
        self.backend.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a failed exchange tells the retry: whether nothing reached the upstream.
pub(crate) struct Failed {
    pub(crate) not_sent: bool,
    pub(crate) message: String,
}

/// One request as the proxy forwards it (hop-by-hop headers already taken out).
struct Outgoing<'a> {
    method: &'a Method,
    path: &'a hyper::http::uri::PathAndQuery,
    headers: &'a hyper::HeaderMap,
    body: &'a Bytes,
}

/// Opens a new connection to `backend`, driven on this worker.
async fn connect(backend: &Backend) -> Result<Sender, Failed> {
    let not_sent = |message: String| Failed { not_sent: true, message };
    let stream = tokio::net::TcpStream::connect(&backend.addr)
        .await
        .map_err(|e| not_sent(format!("could not connect to {}: {e}", backend.addr)))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| not_sent(format!("could not open a connection to {}: {e}", backend.addr)))?;
    tokio::spawn(async move {
        // Its errors reach the request that was using it.
        let _ = connection.with_upgrades().await;
    });
    Ok(sender)
}

/// Sends `request` on a pooled connection of `backend`, or a new one; a pooled connection
/// that closed before the request went out is given up for the next.
async fn exchange(
    backend: &Backend,
    mut request: Request<Full<Bytes>>,
) -> Result<(Response<Incoming>, Sender), Failed> {
    loop {
        let (mut sender, pooled) = match backend.senders.checkout() {
            Some(sender) => (sender, true),
            None => (connect(backend).await?, false),
        };
        if sender.ready().await.is_err() {
            if pooled {
                continue;
            }
            return Err(Failed { not_sent: true, message: format!("the connection to {} closed", backend.addr) });
        }
        match sender.try_send_request(request).await {
            Ok(response) => return Ok((response, sender)),
            Err(mut failed) => match failed.take_message() {
                Some(unsent) if pooled => request = unsent,
                unsent => {
                    return Err(Failed { not_sent: unsent.is_some(), message: failed.into_error().to_string() });
                }
            },
        }
    }
}

async fn forward(backend: &Arc<Backend>, out: &Outgoing<'_>) -> Result<(Response<Incoming>, Sender), Failed> {
    let mut request = Request::new(Full::new(out.body.clone()));
    *request.method_mut() = out.method.clone();
    *request.uri_mut() = hyper::Uri::from(out.path.clone());
    *request.headers_mut() = out.headers.clone();
    if !request.headers().contains_key(hyper::header::HOST)
        && let Some(host) = &backend.host
    {
        request.headers_mut().insert(hyper::header::HOST, host.clone());
    }
    backend.in_flight.fetch_add(1, Ordering::SeqCst);
    let started = Instant::now();
    let result = match tokio::time::timeout(UPSTREAM_TIMEOUT, exchange(backend, request)).await {
        Ok(result) => result,
        Err(_) => Err(Failed { not_sent: false, message: "the upstream timed out".to_owned() }),
    };
    let error = result.as_ref().map_or(true, |(r, _)| r.status().is_server_error());
    backend.record(started.elapsed(), error);
    if result.is_err() {
        backend.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
    result
}

/// The client of a connection: its address, and its IP as an `X-Forwarded-For`.
struct Peer {
    addr: SocketAddr,
    ip: Option<HeaderValue>,
}

/// Passes an upgraded connection (WebSocket) through, byte for byte, once both sides agreed.
fn splice(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    sender: Sender,
    backend: Arc<Backend>,
) {
    tokio::spawn(async move {
        let upgraded = tokio::join!(client, upstream);
        // The upstream connection is handed over once upgraded; kept until then.
        drop(sender);
        if let (Ok(client), Ok(upstream)) = upgraded {
            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(upstream)).await;
        }
        backend.in_flight.fetch_sub(1, Ordering::SeqCst);
    });
}

/// Hands the upstream's response to the client: an upgrade is spliced, a body streams.
fn relay(
    (mut response, sender): (Response<Incoming>, Sender),
    backend: Arc<Backend>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    busy: Busy,
) -> Response<ProxyBody> {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        splice(client_upgrade, upstream_upgrade, sender, backend);
        let (parts, _) = response.into_parts();
        return Response::from_parts(parts, ProxyBody::full(Bytes::new()));
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    Response::from_parts(
        parts,
        ProxyBody::Tracked(Tracked { inner: body, backend, sender: Some(sender), ended: false, _busy: busy }),
    )
}

/// Removes hop-by-hop headers, and those the `Connection` header names. `upgrade` keeps the
/// two headers that ask for an upgrade.
fn strip_hop_by_hop(headers: &mut hyper::HeaderMap, upgrade: bool) {
    // Most messages have none: one pass over their few names, no lookups.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !(upgrade && name == hyper::header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        if !(upgrade && (name == hyper::header::CONNECTION || name == hyper::header::UPGRADE)) {
            headers.remove(name);
        }
    }
}

async fn handle(
    request: Request<Incoming>,
    peer: Arc<Peer>,
    route: Arc<Route>,
    connection: Arc<std::sync::atomic::AtomicUsize>,
) -> Result<Response<ProxyBody>, std::convert::Infallible> {
    let (mut parts, body) = request.into_parts();
    // `Upgrade: h2c` asks a server to switch to HTTP/2 cleartext: hop-by-hop, never passed on.
    let upgrade = parts
        .headers
        .get(hyper::header::UPGRADE)
        .is_some_and(|v| !v.to_str().is_ok_and(|v| v.trim().eq_ignore_ascii_case("h2c")));
    let client_upgrade = upgrade.then(|| parts.extensions.remove::<hyper::upgrade::OnUpgrade>()).flatten();
    let body = if body.is_end_stream() {
        Bytes::new()
    } else {
        match tokio::time::timeout(BODY_TIMEOUT, http_body_util::Limited::new(body, MAX_BODY).collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(_)) => {
                return Ok(respond(StatusCode::PAYLOAD_TOO_LARGE, "the request body is too large or broken"));
            }
            Err(_) => return Ok(respond(StatusCode::REQUEST_TIMEOUT, "the request body took too long")),
        }
    };
    // From here the request is forwarded: the connection is busy until the answer is sent.
    let busy = Busy::new(&connection);
    let mut headers = parts.headers;
    // HTTP/2 carries the host in the URI (`:authority`); the upstream speaks HTTP/1.1.
    if !headers.contains_key(hyper::header::HOST)
        && let Some(host) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        headers.insert(hyper::header::HOST, host);
    }
    strip_hop_by_hop(&mut headers, upgrade);
    let forwarded_for = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(earlier) => HeaderValue::from_str(&format!("{earlier}, {}", peer.addr.ip())).ok(),
        None => peer.ip.clone(),
    };
    if let Some(value) = forwarded_for {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
    let out = Outgoing { method: &parts.method, path: &path, headers: &headers, body: &body };
    let idempotent =
        matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE);
    let Some(first) = route.pick(None) else {
        // Stopped for an upgrade's downtime (or not started yet): clients are told to retry.
        let mut response = respond(StatusCode::SERVICE_UNAVAILABLE, "no upstream is live");
        response.headers_mut().insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("5"));
        return Ok(response);
    };
    let (backend, result) = match forward(&first, &out).await {
        // Safe to send once more, elsewhere when possible: an idempotent request, or any
        // request that never reached its upstream (a connect error).
        Err(Failed { not_sent, message }) if idempotent || not_sent => {
            let second = route.pick(Some(&first.addr)).unwrap_or(first);
            let result = forward(&second, &out).await.map_err(|again| Failed {
                not_sent: again.not_sent,
                message: format!("{message}; then {}", again.message),
            });
            (second, result)
        }
        result => (first, result),
    };
    Ok(match result {
        Ok(response) => relay(response, backend, client_upgrade, busy),
        Err(failed) => respond(StatusCode::BAD_GATEWAY, &failed.message),
    })
}

impl Proxy {
    pub(crate) fn new() -> std::io::Result<Proxy> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("upshift-proxy")
            .build()?;
        let count = std::thread::available_parallelism().map_or(1, std::num::NonZero::get).min(MOST_WORKERS);
        let workers: Arc<[Worker]> = (0..count).map(Worker::start).collect::<std::io::Result<_>>()?;
        let routes: Arc<Mutex<HashMap<String, Arc<Route>>>> = Arc::default();
        let ticking = Arc::downgrade(&routes);
        runtime.spawn(async move {
            let mut ticks = tokio::time::interval(TICK);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(routes) = ticking.upgrade() else { return };
                let routes: Vec<Arc<Route>> = routes.lock().expect("routes lock").values().map(Arc::clone).collect();
                for route in routes {
                    for backend in route.current().iter() {
                        backend.tick();
                    }
                }
            }
        });
        Ok(Proxy { runtime, workers, gate: Gate::new(), routes, metrics: Mutex::new(None) })
    }

    /// Serves `GET /metrics` on `listen` with what `render` says; a second call with the same
    /// address does nothing, one with another address is refused.
    pub(crate) fn serve_metrics(&self, listen: &str, render: Render) -> Result<(), String> {
        let mut serving = self.metrics.lock().expect("metrics lock");
        match serving.as_deref() {
            Some(same) if same == listen => return Ok(()),
            Some(other) => {
                return Err(format!(
                    "the agent serves metrics on {other}; stop it (`upshift agent stop`) to move them"
                ));
            }
            None => {}
        }
        let listener = self
            .runtime
            .block_on(tokio::net::TcpListener::bind(listen))
            .map_err(|e| format!("the metrics cannot listen on {listen}: {e}"))?;
        self.runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of descriptors or a transient error: wait, never spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let render = Arc::clone(&render);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let render = Arc::clone(&render);
                        async move {
                            if request.uri().path() != "/metrics" {
                                return Ok::<_, std::convert::Infallible>(respond(
                                    StatusCode::NOT_FOUND,
                                    "the metrics are at /metrics",
                                ));
                            }
                            let text = tokio::task::spawn_blocking(move || render()).await.unwrap_or_default();
                            let mut response = Response::new(ProxyBody::full(text));
                            response.headers_mut().insert(
                                hyper::header::CONTENT_TYPE,
                                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                            );
                            Ok(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        *serving = Some(listen.to_owned());
        Ok(())
    }

    /// Starts serving `listen` for a new route.
    fn listen(&self, listen: &str) -> Result<Arc<Route>, String> {
        let listener = self
            .runtime
            .block_on(tokio::net::TcpListener::bind(listen))
            .map_err(|e| format!("the proxy cannot listen on {listen}: {e}"))?;
        let route = Arc::new(Route {
            listen: listen.to_owned(),
            backends: RwLock::new(Arc::new(Vec::new())),
            next: AtomicU64::new(0),
        });
        let accepting = Arc::clone(&route);
        let workers = Arc::clone(&self.workers);
        let gate = Arc::clone(&self.gate);
        let listen = listen.to_owned();
        self.runtime.spawn(async move {
            let mut backoff = Duration::from_millis(10);
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => {
                        backoff = Duration::from_millis(10);
                        accepted
                    }
                    // Out of descriptors (EMFILE) or a transient error: wait, never spin.
                    Err(e) => {
                        tracing::warn!(%listen, error = %e, backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(0), "accept failed; waiting");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                };
                // At the cap the oldest idle connection gives way; none idle: refused.
                let Some(ticket) = gate.admit(&listen) else {
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                // The worker with the fewest connections serves this one, to its end.
                let Ok(stream) = stream.into_std() else { continue };
                let worker = workers.iter().min_by_key(|w| w.connections.load(Ordering::Relaxed)).expect("a worker");
                worker.connections.fetch_add(1, Ordering::Relaxed);
                let counted = Served(Arc::clone(&worker.connections));
                let route = Arc::clone(&accepting);
                worker.handle.spawn(async move {
                    let _counted = counted;
                    let Ok(stream) = tokio::net::TcpStream::from_std(stream) else { return };
                    // HTTP/1.x goes the proxy's own way; a client that opens with HTTP/2's
                    // preface (h2c), or a part of it, goes to hyper.
                    let mut first = [0u8; H2_PREFACE.len()];
                    let peeked = tokio::select! {
                        biased;
                        peeked = tokio::time::timeout(HEADER_TIMEOUT, stream.peek(&mut first)) => peeked,
                        () = ticket.close.notified() => return,
                    };
                    let Ok(Ok(peeked @ 1..)) = peeked else { return };
                    let ip = peer.ip().to_string();
                    if !H2_PREFACE.starts_with(&first[..peeked]) {
                        crate::http1::serve(stream, ip.as_bytes(), &route, &ticket).await;
                        return;
                    }
                    let busy = Arc::clone(&ticket.busy);
                    let peer = Arc::new(Peer { addr: peer, ip: HeaderValue::from_str(&ip).ok() });
                    let service = hyper::service::service_fn(move |request| {
                        handle(request, Arc::clone(&peer), Arc::clone(&route), Arc::clone(&busy))
                    });
                    let mut server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    server
                        .http1()
                        .keep_alive(true)
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT);
                    let connection = server.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    tokio::pin!(connection);
                    tokio::select! {
                        _ = connection.as_mut() => {}
                        () = ticket.close.notified() => {
                            connection.as_mut().graceful_shutdown();
                            let _ = tokio::time::timeout(Duration::from_secs(5), connection.as_mut()).await;
                        }
                    }
                    drop(ticket);
                });
            }
        });
        Ok(route)
    }

    /// Points `component`'s address `listen` at `upstreams`, atomically, and opens a new
    /// measuring window for each; then waits up to `drain` for the upstreams it no longer
    /// uses to finish their requests. Returns whether they did.
    pub(crate) fn route(
        &self,
        component: &str,
        listen: &str,
        upstreams: &[Upstream],
        drain: Duration,
    ) -> Result<bool, String> {
        let route = {
            let mut routes = self.routes.lock().expect("routes lock");
            if let Some(route) = routes.get(component) {
                Arc::clone(route)
            } else {
                let route = self.listen(listen)?;
                routes.insert(component.to_owned(), Arc::clone(&route));
                route
            }
        };
        let old = route.current();
        let new: Vec<Arc<Backend>> = upstreams
            .iter()
            .map(|upstream| match old.iter().find(|b| b.addr == upstream.addr && b.version == upstream.version) {
                // Kept: its totals carry on, its weight may change, its window opens anew.
                Some(kept) => {
                    kept.weight.store(upstream.weight, Ordering::Relaxed);
                    *kept.window.lock().expect("window lock") = Opened::new(kept.histogram.counts());
                    Arc::clone(kept)
                }
                None => Arc::new(Backend::new(upstream, self.workers.len())),
            })
            .collect();
        let leaving: Vec<Arc<Backend>> =
            old.iter().filter(|b| !new.iter().any(|n| Arc::ptr_eq(b, n))).map(Arc::clone).collect();
        *route.backends.write().expect("route lock") = Arc::new(new);
        let deadline = Instant::now() + drain;
        while leaving.iter().any(|b| b.in_flight.load(Ordering::SeqCst) > 0) {
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
                upstreams: route.current().iter().map(|b| b.upstream()).collect(),
            })
            .collect();
        saved.sort_by(|a, b| a.component.cmp(&b.component));
        saved
    }

    /// Every component's route, with what the proxy measured.
    pub(crate) fn status(&self) -> BTreeMap<String, RouteStatus> {
        let routes: Vec<(String, Arc<Route>)> =
            self.routes.lock().expect("routes lock").iter().map(|(c, r)| (c.clone(), Arc::clone(r))).collect();
        routes.into_iter().map(|(component, route)| (component, route.status())).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};

    use super::*;

    fn free_port() -> String {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()
    }

    /// A one-connection upstream: reads the request head, hands it to `answer`, which
    /// writes the response on the stream.
    fn upstream(answer: impl FnOnce(Vec<String>, TcpStream) + Send + 'static) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = Vec::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                head.push(line.trim().to_ascii_lowercase());
            }
            answer(head, stream);
        });
        addr
    }

    fn to(addr: &str, version: &str, weight: u32) -> Upstream {
        Upstream { addr: addr.to_owned(), version: version.to_owned(), weight }
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_not_forwarded() {
        let mut headers = hyper::HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "internal"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("x-kept", "yes"),
        ] {
            headers.insert(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["x-kept"]);
        // An upgrade keeps what asks for it.
        let mut upgrade = hyper::HeaderMap::new();
        upgrade.insert(hyper::header::CONNECTION, HeaderValue::from_static("Upgrade"));
        upgrade.insert(hyper::header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut upgrade, true);
        assert_eq!(upgrade.len(), 2);
    }

    #[test]
    fn a_websocket_upgrade_is_passed_through_both_ways() {
        let backend = upstream(|head, mut stream| {
            assert!(head.contains(&"upgrade: websocket".to_owned()), "{head:?}");
            assert!(head.iter().any(|h| h.starts_with("x-forwarded-for: 127.0.0.1")), "{head:?}");
            stream
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
                .unwrap();
            let mut buffer = [0u8; 4];
            stream.read_exact(&mut buffer).unwrap();
            stream.write_all(&buffer).unwrap();
            stream.write_all(b" pong").unwrap();
        });
        let proxy = Proxy::new().unwrap();
        let listen = free_port();
        proxy.route("api", &listen, &[to(&backend, "1.0.0", 1)], Duration::ZERO).unwrap();
        let mut client = TcpStream::connect(&listen).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        client.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").unwrap();
        let mut reader = BufReader::new(client.try_clone().unwrap());
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        assert!(status.starts_with("HTTP/1.1 101"), "{status}");
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line.trim().is_empty() {
                break;
            }
        }
        client.write_all(b"ping").unwrap();
        let mut echoed = [0u8; 9];
        reader.read_exact(&mut echoed).unwrap();
        assert_eq!(&echoed, b"ping pong");
    }

    #[test]
    fn an_http2_client_is_answered_from_an_http1_upstream() {
        let backend = upstream(|head, mut stream| {
            assert!(head.iter().any(|h| h.starts_with("host: ")), "{head:?}");
            stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello").unwrap();
        });
        let proxy = Proxy::new().unwrap();
        let listen = free_port();
        proxy.route("api", &listen, &[to(&backend, "1.0.0", 1)], Duration::ZERO).unwrap();
        let (status, body) = proxy.runtime.block_on(async {
            let stream = tokio::net::TcpStream::connect(&listen).await.unwrap();
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
            tokio::spawn(connection);
            let request = Request::get(format!("http://{listen}/x")).body(Full::new(Bytes::new())).unwrap();
            let response = sender.send_request(request).await.unwrap();
            let status = response.status();
            (status, response.into_body().collect().await.unwrap().to_bytes())
        });
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello"[..]));
    }

    #[test]
    fn weights_share_requests_and_each_version_is_measured() {
        let proxy = Proxy::new().unwrap();
        let listen = free_port();
        let (old, new) = (free_port(), free_port());
        let route_to = [to(&old, "1.0.0", 3), to(&new, "2.0.0", 1)];
        proxy.route("api", &listen, &route_to, Duration::ZERO).unwrap();
        let route = Arc::clone(&proxy.routes.lock().unwrap()["api"]);
        let picked: Vec<String> = (0..400).map(|_| route.pick(None).unwrap().addr.clone()).collect();
        assert_eq!(picked.iter().filter(|a| **a == new).count(), 100);
        // A retry avoids the upstream that failed, whatever the weights.
        assert_eq!(route.pick(Some(&old)).unwrap().addr, new);
        for (i, backend) in route.current().iter().enumerate() {
            for n in 0..10 {
                backend.record(Duration::from_millis(n + 1), i == 1 && n < 5);
            }
        }
        let status = &proxy.status()["api"];
        let shares: Vec<(String, f64, u64, u64)> =
            status.versions.iter().map(|v| (v.version.clone(), v.share, v.window.requests, v.window.errors)).collect();
        assert_eq!(shares, [("1.0.0".to_owned(), 75.0, 10, 0), ("2.0.0".to_owned(), 25.0, 10, 5)]);
        assert_eq!(status.versions[0].window.p99_ms, Some(10.0));
        // A new route opens a new window; the totals carry on.
        proxy.route("api", &listen, &[to(&new, "2.0.0", 1)], Duration::ZERO).unwrap();
        let status = &proxy.status()["api"];
        assert_eq!(
            (status.upstreams.len(), status.upstreams[0].requests, status.upstreams[0].window.requests),
            (1, 10, 0)
        );
    }

    /// Reads one request head from `reader`; None at the end of the stream.
    fn read_head(reader: &mut BufReader<TcpStream>) -> Option<Vec<String>> {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if line.trim().is_empty() {
                return Some(head);
            }
            head.push(line.trim().to_ascii_lowercase());
        }
    }

    /// Sends `request` on `client` and reads the answer's status line and body (which has
    /// a `Content-Length`).
    fn ask(client: &mut BufReader<TcpStream>, request: &str) -> (String, String) {
        client.get_mut().write_all(request.as_bytes()).unwrap();
        let mut status = String::new();
        client.read_line(&mut status).unwrap();
        let head = read_head(client).unwrap();
        let length: usize = head.iter().find_map(|h| h.strip_prefix("content-length: ")).unwrap().parse().unwrap();
        let mut body = vec![0; length];
        client.read_exact(&mut body).unwrap();
        (status.trim().to_owned(), String::from_utf8(body).unwrap())
    }

    #[test]
    fn upstream_connections_are_kept_alive_and_a_closed_one_is_replaced() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let backend = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            // The first connection answers two requests, then the upstream closes it.
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            for answer in ["one", "two"] {
                read_head(&mut reader).unwrap();
                write!(reader.get_mut(), "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{answer}").unwrap();
            }
            drop(reader);
            drop(stream);
            // A POST after that goes on a new connection, not a failure.
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream);
            let head = read_head(&mut reader).unwrap();
            assert!(head[0].starts_with("post /three"), "{head:?}");
            let mut body = [0; 2];
            reader.read_exact(&mut body).unwrap();
            reader.get_mut().write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nthree").unwrap();
            read_head(&mut reader);
        });
        let proxy = Proxy::new().unwrap();
        let listen = free_port();
        proxy.route("api", &listen, &[to(&backend, "1.0.0", 1)], Duration::ZERO).unwrap();
        let mut client = BufReader::new(TcpStream::connect(&listen).unwrap());
        client.get_ref().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(ask(&mut client, "GET /one HTTP/1.1\r\nHost: x\r\n\r\n").1, "one");
        assert_eq!(ask(&mut client, "GET /two HTTP/1.1\r\nHost: x\r\n\r\n").1, "two");
        std::thread::sleep(Duration::from_millis(100));
        let three = ask(&mut client, "POST /three HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi");
        assert_eq!(three, ("HTTP/1.1 200 OK".to_owned(), "three".to_owned()));
        let status = &proxy.status()["api"];
        assert_eq!((status.upstreams[0].requests, status.upstreams[0].errors), (3, 0));
    }

    /// A proxy routing to `backend`, and a client connection to it.
    fn through(backend: &str) -> (Proxy, BufReader<TcpStream>) {
        let proxy = Proxy::new().unwrap();
        let listen = free_port();
        proxy.route("api", &listen, &[to(backend, "1.0.0", 1)], Duration::ZERO).unwrap();
        let client = BufReader::new(TcpStream::connect(&listen).unwrap());
        client.get_ref().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (proxy, client)
    }

    /// An upstream that serves each connection it accepts with `serve`, on its own thread.
    fn upstream_serving(serve: impl Fn(BufReader<TcpStream>) + Send + Sync + 'static) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let serve = Arc::new(serve);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let serve = Arc::clone(&serve);
                std::thread::spawn(move || serve(BufReader::new(stream.unwrap())));
            }
        });
        addr
    }

    /// Everything the client reads until the proxy closes the connection.
    fn to_the_end(client: &mut BufReader<TcpStream>) -> String {
        let mut all = String::new();
        client.read_to_string(&mut all).unwrap();
        all
    }

    #[test]
    fn a_chunked_request_goes_on_with_its_length_and_a_chunked_answer_comes_back_as_it_is() {
        let backend = upstream_serving(|mut reader| {
            while let Some(head) = read_head(&mut reader) {
                assert!(head.contains(&"content-length: 11".to_owned()), "{head:?}");
                assert!(
                    !head.iter().any(|h| h.starts_with("transfer-encoding") || h.starts_with("expect")),
                    "{head:?}"
                );
                let mut body = [0; 11];
                reader.read_exact(&mut body).unwrap();
                assert_eq!(&body, b"hello world");
                let answer = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n";
                reader.get_mut().write_all(answer.as_bytes()).unwrap();
            }
        });
        let (_proxy, mut client) = through(&backend);
        let head = "POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n";
        client.get_mut().write_all(head.as_bytes()).unwrap();
        // The proxy asks for the body itself, since it reads it whole.
        let mut line = String::new();
        client.read_line(&mut line).unwrap();
        assert_eq!(line, "HTTP/1.1 100 Continue\r\n");
        read_head(&mut client).unwrap();
        client.get_mut().write_all(b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n").unwrap();
        let mut status = String::new();
        client.read_line(&mut status).unwrap();
        assert_eq!(status, "HTTP/1.1 200 OK\r\n");
        assert_eq!(read_head(&mut client).unwrap(), ["transfer-encoding: chunked"]);
        let mut body = vec![0; "3\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n".len()];
        client.read_exact(&mut body).unwrap();
        assert_eq!(String::from_utf8(body).unwrap(), "3\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n");
        // The connection carries on.
        client.get_mut().write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world").unwrap();
        let mut status = String::new();
        client.read_line(&mut status).unwrap();
        assert_eq!(status, "HTTP/1.1 200 OK\r\n");
    }

    #[test]
    fn an_http10_client_gets_a_chunked_answer_decoded_then_the_connection_closes() {
        let backend = upstream_serving(|mut reader| {
            let head = read_head(&mut reader).unwrap();
            assert!(
                head[0].ends_with("http/1.1") && head.iter().any(|h| h.starts_with("host: 127.0.0.1:")),
                "{head:?}"
            );
            let answer = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n";
            reader.get_mut().write_all(answer.as_bytes()).unwrap();
            read_head(&mut reader);
        });
        let (_proxy, mut client) = through(&backend);
        client.get_mut().write_all(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap();
        assert_eq!(to_the_end(&mut client), "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello!");
    }

    #[test]
    fn pipelined_requests_are_answered_in_order_and_a_head_answer_has_no_body() {
        let backend = upstream_serving(|mut reader| {
            while let Some(head) = read_head(&mut reader) {
                let path = head[0].split(' ').nth(1).unwrap().to_owned();
                let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", path.len());
                reader.get_mut().write_all(answer.as_bytes()).unwrap();
                if !head[0].starts_with("head") {
                    reader.get_mut().write_all(path.as_bytes()).unwrap();
                }
            }
        });
        let (proxy, mut client) = through(&backend);
        client
            .get_mut()
            .write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\nHEAD /no-body HTTP/1.1\r\nHost: x\r\n\r\nGET /third HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        assert_eq!(
            to_the_end(&mut client),
            "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n/first\
             HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n\
             HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\n/third"
        );
        assert_eq!(proxy.status()["api"].upstreams[0].requests, 3);
    }

    #[test]
    fn an_answer_up_to_the_upstreams_close_ends_the_client_connection() {
        let backend = upstream_serving(|mut reader| {
            read_head(&mut reader).unwrap();
            reader.get_mut().write_all(b"HTTP/1.0 200 OK\r\nX-Old: yes\r\n\r\nuntil the end").unwrap();
        });
        let (_proxy, mut client) = through(&backend);
        client.get_mut().write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(to_the_end(&mut client), "HTTP/1.1 200 OK\r\nX-Old: yes\r\nConnection: close\r\n\r\nuntil the end");
    }

    #[test]
    fn an_upstream_that_dies_mid_answer_closes_the_client_connection() {
        let backend = upstream_serving(|mut reader| {
            read_head(&mut reader).unwrap();
            reader.get_mut().write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial").unwrap();
        });
        let (_proxy, mut client) = through(&backend);
        client.get_mut().write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        // The client sees a short body and the end of the connection, never a hang.
        assert_eq!(to_the_end(&mut client), "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial");
    }

    #[test]
    fn an_upstream_that_answers_before_reading_the_body_is_heard_and_not_asked_twice() {
        let asked = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&asked);
        let backend = upstream_serving(move |mut reader| {
            read_head(&mut reader).unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
            // Refused on its head alone; the body is never read and the connection closes.
            reader.get_mut().write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig").unwrap();
        });
        let (_proxy, mut client) = through(&backend);
        let body = vec![b'x'; 8 * 1024 * 1024];
        let head = format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len());
        client.get_mut().write_all(head.as_bytes()).unwrap();
        client.get_mut().write_all(&body).unwrap();
        let mut status = String::new();
        client.read_line(&mut status).unwrap();
        assert_eq!(status, "HTTP/1.1 413 Payload Too Large\r\n");
        assert_eq!(asked.load(Ordering::SeqCst), 1, "a POST partly sent is never sent again");
    }

    #[test]
    fn an_upstream_that_answers_early_and_stops_reading_is_heard_at_once() {
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let finished = Mutex::new(finished);
        let backend = upstream_serving(move |mut reader| {
            read_head(&mut reader).unwrap();
            reader.get_mut().write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\nwho?").unwrap();
            // Keeps the connection open and reads nothing more, until the test ends.
            let _ = finished.lock().unwrap().recv();
        });
        let (_proxy, mut client) = through(&backend);
        let body = vec![b'x'; MAX_BODY];
        let head = format!("PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len());
        client.get_mut().write_all(head.as_bytes()).unwrap();
        client.get_mut().write_all(&body).unwrap();
        let (status, text) = ask(&mut client, "");
        assert_eq!((status.as_str(), text.as_str()), ("HTTP/1.1 401 Unauthorized", "who?"));
        drop(done);
    }

    #[test]
    fn an_upstream_that_answers_while_it_reads_a_large_body_gets_all_of_it() {
        // An interim answer, then a final head, both before the body is read; then the
        // body is read whole and the answer ends with its size.
        let backend = upstream_serving(|mut reader| {
            let head = read_head(&mut reader).unwrap();
            let length: usize = head.iter().find_map(|h| h.strip_prefix("content-length: ")).unwrap().parse().unwrap();
            reader.get_mut().write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n").unwrap();
            let size = format!("{length:08}");
            write!(reader.get_mut(), "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", size.len()).unwrap();
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            reader.get_mut().write_all(size.as_bytes()).unwrap();
            read_head(&mut reader);
        });
        let (_proxy, mut client) = through(&backend);
        let body = vec![b'x'; MAX_BODY];
        let head = format!("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len());
        client.get_mut().write_all(head.as_bytes()).unwrap();
        client.get_mut().write_all(&body).unwrap();
        assert_eq!(ask(&mut client, ""), ("HTTP/1.1 200 OK".to_owned(), format!("{MAX_BODY:08}")));
    }

    #[test]
    fn a_client_that_stops_reading_does_not_hold_its_upstream() {
        let backend = upstream_serving(|mut reader| {
            read_head(&mut reader).unwrap();
            let size = 256 * 1024 * 1024;
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n");
            reader.get_mut().write_all(head.as_bytes()).unwrap();
            let block = vec![b'x'; 1024 * 1024];
            // Until the proxy gives the connection up.
            while reader.get_mut().write_all(&block).is_ok() {}
        });
        let (proxy, mut client) = through(&backend);
        client.get_mut().write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut status = String::new();
        client.read_line(&mut status).unwrap();
        assert_eq!(status, "HTTP/1.1 200 OK\r\n");
        // The client reads no more: within the send timeout (1 s under test) the proxy
        // gives up, and the upstream is no longer counted in flight.
        let deadline = Instant::now() + Duration::from_secs(20);
        while proxy.status()["api"].upstreams[0].in_flight > 0 {
            assert!(Instant::now() < deadline, "the stalled client still holds its upstream");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn a_request_framed_two_ways_is_refused_and_no_upstream_sees_it() {
        let backend = upstream_serving(|_| panic!("the upstream was asked"));
        let (proxy, mut client) = through(&backend);
        client
            .get_mut()
            .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n")
            .unwrap();
        let answer = to_the_end(&mut client);
        assert!(answer.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{answer}");
        assert!(answer.contains("Connection: close\r\n") && answer.contains("given two ways"), "{answer}");
        assert_eq!(proxy.status()["api"].upstreams[0].requests, 0);
    }

    #[test]
    fn the_p99_is_read_over_the_latest_requests_of_the_window() {
        let proxy = Proxy::new().unwrap();
        let listen = free_port();
        proxy.route("api", &listen, &[to(&free_port(), "1.0.0", 1)], Duration::ZERO).unwrap();
        let route = Arc::clone(&proxy.routes.lock().unwrap()["api"]);
        let backend = Arc::clone(&route.current()[0]);
        for _ in 0..5000 {
            backend.record(Duration::from_millis(10), false);
        }
        assert!((proxy.status()["api"].versions[0].window.p99_ms.unwrap() - 10.0).abs() < 0.5);
        backend.tick();
        for _ in 0..5000 {
            backend.record(Duration::from_millis(1), false);
        }
        // 5000 requests since the mark: the slow ones before it are out of the p99.
        let window = &proxy.status()["api"].versions[0].window;
        assert_eq!(window.requests, 10_000);
        assert!((window.p99_ms.unwrap() - 1.0).abs() < 0.1, "{window:?}");
        // A new route opens a new window: its baseline is the counts then.
        proxy.route("api", &listen, &[to(&backend.addr, "1.0.0", 1)], Duration::ZERO).unwrap();
        let upstream = &proxy.status()["api"].upstreams[0];
        assert_eq!((upstream.requests, upstream.window.requests, upstream.window.p99_ms), (10_000, 0, None));
        let latencies = upstream.latencies.as_ref().unwrap();
        assert_eq!(latencies.counts[1], 5000, "{latencies:?}");
    }
}
