//! Accepting connections, a thread per connection, and the graceful stop: on SIGTERM or
//! SIGINT the listener closes, idle keep-alive connections close, requests in flight get up
//! to [`GRACE`] to finish, and the process exits 0. A second signal stops without waiting.

use std::fmt;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::api::App;
use crate::database::Database;
use crate::error::Error;
use crate::http::{self, Next, Response};
use crate::settings::Settings;

/// How long requests in flight may take to finish once a stop is asked for.
pub const GRACE: Duration = Duration::from_secs(10);
/// Connections served at once; more are answered 503 and closed.
const MAX_CONNECTIONS: usize = 1024;

/// Writes one line to stderr (the service's log); a failed write is ignored.
pub(crate) fn log(line: fmt::Arguments<'_>) {
    let mut stderr = io::stderr().lock();
    let _ = writeln!(stderr, "{line}");
}

/// Runs the service until SIGTERM or SIGINT: binds, installs the signal handlers, prints
/// `notes <release> listening on <address>` to stderr, serves, then stops gracefully.
pub fn serve(settings: &Settings) -> Result<(), Error> {
    let server = Server::bind(settings)?;
    let shutdown = server.shutdown();
    let release = settings.release;
    let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(Error::Signals)?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let name = if signal == SIGTERM { "SIGTERM" } else { "SIGINT" };
                if shutdown.is_stopping() {
                    log(format_args!("notes {release}: second {name}: stopping without waiting for requests"));
                    shutdown.force();
                    continue;
                }
                log(format_args!("notes {release}: {name} received: stopping"));
                if let Err(error) = shutdown.stop() {
                    // Cannot happen short of a broken network stack; the accept loop would
                    // stay blocked, so give requests their grace and leave from here.
                    log(format_args!(
                        "notes {release}: cannot wake the listener: {error}; exiting after the grace period"
                    ));
                    thread::sleep(GRACE);
                    #[expect(clippy::disallowed_methods, reason = "the main thread is blocked in accept")]
                    std::process::exit(0);
                }
            }
        })
        .map_err(Error::Signals)?;
    log(format_args!("notes {release} listening on {}", server.local_addr()));
    server.run();
    Ok(())
}

/// A bound service, not yet accepting.
pub struct Server {
    listener: TcpListener,
    address: SocketAddr,
    app: Arc<App>,
    shutdown: Shutdown,
    active: Arc<AtomicUsize>,
}

impl Server {
    /// Binds the listen address. The database is not touched until the first request.
    pub fn bind(settings: &Settings) -> Result<Server, Error> {
        let listener = TcpListener::bind(&settings.listen)
            .map_err(|source| Error::Bind { address: settings.listen.clone(), source })?;
        let address = listener.local_addr().map_err(Error::LocalAddress)?;
        let app = App {
            release: settings.release,
            database: Database::new(settings.database_url.clone()),
            error_percent: settings.error_percent,
            served: AtomicU64::new(0),
        };
        Ok(Server {
            listener,
            address,
            app: Arc::new(app),
            shutdown: Shutdown::new(address),
            active: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The address actually bound (the real port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// A handle that stops [`Server::run`].
    pub fn shutdown(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Accepts connections until a stop is asked for, then waits up to [`GRACE`] for the
    /// open connections to finish their requests.
    pub fn run(self) {
        let release = self.app.release;
        for stream in self.listener.incoming() {
            if self.shutdown.is_stopping() {
                break;
            }
            match stream {
                Ok(stream) => self.spawn(stream),
                Err(error) => {
                    // Out of file descriptors and the like: wait a little instead of spinning.
                    log(format_args!("notes {release}: accept failed: {error}"));
                    thread::sleep(Duration::from_millis(50));
                }
            }
        }
        drop(self.listener);

        let deadline = Instant::now() + GRACE;
        let open = self.active.load(Ordering::SeqCst);
        if open > 0 {
            log(format_args!("notes {release}: waiting for {open} open connection(s) to finish"));
        }
        loop {
            let open = self.active.load(Ordering::SeqCst);
            if open == 0 {
                break;
            }
            if self.shutdown.is_forced() || Instant::now() >= deadline {
                log(format_args!("notes {release}: stopping with {open} connection(s) still open"));
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        log(format_args!("notes {release} stopped"));
    }

    fn spawn(&self, mut stream: TcpStream) {
        let release = self.app.release;
        if self.active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            let response = Response::error(503, "too many connections; retry later");
            let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
            let _ = stream.write_all(&response.to_bytes(false));
            return;
        }
        let guard = ActiveGuard::new(&self.active);
        let app = Arc::clone(&self.app);
        let shutdown = self.shutdown.clone();
        let spawned = thread::Builder::new().name("connection".into()).spawn(move || {
            let _guard = guard;
            serve_connection(stream, &app, &shutdown);
        });
        if let Err(error) = spawned {
            log(format_args!("notes {release}: cannot start a connection thread: {error}"));
        }
    }
}

/// Serves requests on one connection until the client closes, asks to close, or the
/// service stops.
fn serve_connection(stream: TcpStream, app: &App, shutdown: &Shutdown) {
    let Ok(mut connection) = http::Connection::new(stream) else { return };
    loop {
        match connection.next_request(|| shutdown.is_stopping()) {
            Next::Close => return,
            Next::Reject(response) => return connection.reject(&response),
            Next::Request(request) => {
                let response = app.handle(&request);
                // Read the flag after the work: a request that was in flight when the stop
                // came is answered, and tells the client this connection is closing.
                let keep_alive = request.keep_alive() && !shutdown.is_stopping();
                if connection.send(&response, keep_alive).is_err() || !keep_alive {
                    return;
                }
            }
        }
    }
}

/// Counts a connection as open for as long as it lives.
struct ActiveGuard(Arc<AtomicUsize>);

impl ActiveGuard {
    fn new(active: &Arc<AtomicUsize>) -> ActiveGuard {
        active.fetch_add(1, Ordering::SeqCst);
        ActiveGuard(Arc::clone(active))
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Asks a [`Server`] to stop; cheap to clone.
#[derive(Clone)]
pub struct Shutdown(Arc<ShutdownState>);

struct ShutdownState {
    stopping: AtomicBool,
    forced: AtomicBool,
    /// Where to connect to wake the blocked `accept`.
    wake: SocketAddr,
}

impl Shutdown {
    fn new(listening: SocketAddr) -> Shutdown {
        let ip = match listening.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        Shutdown(Arc::new(ShutdownState {
            stopping: AtomicBool::new(false),
            forced: AtomicBool::new(false),
            wake: SocketAddr::new(ip, listening.port()),
        }))
    }

    /// Stops accepting and closes idle connections; requests in flight finish. The listener
    /// is woken by a connection to itself, since std has no way to interrupt `accept`.
    pub fn stop(&self) -> io::Result<()> {
        self.0.stopping.store(true, Ordering::SeqCst);
        TcpStream::connect_timeout(&self.0.wake, Duration::from_secs(2)).map(drop)
    }

    /// Stops waiting for requests in flight.
    pub fn force(&self) {
        self.0.forced.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was asked for.
    pub fn is_stopping(&self) -> bool {
        self.0.stopping.load(Ordering::SeqCst)
    }

    fn is_forced(&self) -> bool {
        self.0.forced.load(Ordering::SeqCst)
    }
}
