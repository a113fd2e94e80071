//! Test support: one throwaway PostgreSQL cluster per test binary, a fresh database per
//! test.
//!
//! The cluster is made from the machine's own server binaries (`initdb` + `pg_ctl` on a
//! free port in a temp dir; as the `postgres` user when the tests run as root, since
//! `initdb` refuses root). A watchdog process stops it and removes its folder when the test
//! binary exits, however it exits. Missing binaries fail the test with what to install:
//! nothing is skipped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A running throwaway cluster.
pub struct PgCluster {
    port: u16,
    bindir: PathBuf,
    data: PathBuf,
    /// Where its unix socket is (the superuser's way in, TLS or not).
    socket_dir: PathBuf,
}

/// A throwaway cluster that takes TCP connections over TLS only (`hostssl`; plain TCP is
/// rejected), with a certificate for `localhost` signed by a CA made for it.
pub struct TlsPostgres {
    /// The cluster.
    pub cluster: PgCluster,
    /// The CA that signed the server's certificate (PEM).
    pub ca: PathBuf,
    /// Another CA, which did not (PEM).
    pub other_ca: PathBuf,
}

static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
static TLS_CLUSTER: OnceLock<TlsPostgres> = OnceLock::new();

/// The TLS-only cluster of this test binary, started on first use.
pub fn tls_postgres() -> &'static TlsPostgres {
    TLS_CLUSTER.get_or_init(|| TlsPostgres::start().unwrap_or_else(|message| panic!("{message}")))
}

impl TlsPostgres {
    fn start() -> Result<TlsPostgres, String> {
        let issue = |e: rcgen::Error| format!("could not make the test certificates: {e}");
        let ca_key = rcgen::KeyPair::generate().map_err(issue)?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(issue)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "upshift test CA");
        let ca = ca_params.self_signed(&ca_key).map_err(issue)?;
        let other_key = rcgen::KeyPair::generate().map_err(issue)?;
        let mut other_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(issue)?;
        other_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        other_params.distinguished_name.push(rcgen::DnType::CommonName, "another CA");
        let other = other_params.self_signed(&other_key).map_err(issue)?;
        // The server's certificate names `localhost` only: connecting to 127.0.0.1 is the
        // wrong host for verify-full.
        let server_key = rcgen::KeyPair::generate().map_err(issue)?;
        let server_params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).map_err(issue)?;
        let server = server_params.signed_by(&server_key, &ca, &ca_key).map_err(issue)?;
        let files = TlsFiles { cert: server.pem(), key: server_key.serialize_pem() };
        let cluster = PgCluster::start(Some(&files))?;
        let dir = cluster.socket_dir.clone();
        let write = |name: &str, pem: &str| -> Result<PathBuf, String> {
            let path = dir.join(name);
            std::fs::write(&path, pem).map_err(|e| format!("could not write {}: {e}", path.display()))?;
            Ok(path)
        };
        Ok(TlsPostgres { ca: write("ca.pem", &ca.pem())?, other_ca: write("other-ca.pem", &other.pem())?, cluster })
    }

    /// A new, empty database; returns its name.
    pub fn create_database(&self) -> String {
        database_name(&self.cluster.create_database()).to_owned()
    }

    /// A URL for `database` on `host` (`localhost` is the name on the certificate) with the
    /// query `tls` (e.g. `sslmode=verify-full&sslrootcert=...`).
    pub fn url(&self, host: &str, database: &str, tls: &str) -> String {
        format!("postgres://postgres@{host}:{}/{database}?{tls}", self.cluster.port)
    }
}

/// A server certificate and key (PEM) for a TLS cluster.
struct TlsFiles {
    cert: String,
    key: String,
}
static DATABASES: AtomicUsize = AtomicUsize::new(0);

/// The cluster of this test binary, started on first use.
pub fn postgres() -> &'static PgCluster {
    CLUSTER.get_or_init(|| PgCluster::start(None).unwrap_or_else(|message| panic!("{message}")))
}

/// A new, empty database on the cluster; returns its URL.
pub fn fresh_database() -> String {
    postgres().create_database()
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Finds a folder holding `initdb`, `pg_ctl` and `postgres`: `pg_config --bindir`, then
/// the newest `/usr/lib/postgresql/<major>/bin`, then PATH.
fn find_bindir() -> Result<PathBuf, String> {
    let complete = |dir: &Path| ["initdb", "pg_ctl", "postgres"].iter().all(|b| dir.join(b).is_file());
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && complete(&dir) {
            return Ok(dir);
        }
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut majors: Vec<(u32, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
            .filter(|(_, dir)| complete(dir))
            .collect();
        majors.sort();
        if let Some((_, dir)) = majors.pop() {
            return Ok(dir);
        }
    }
    std::env::var_os("PATH").iter().flat_map(std::env::split_paths).find(|dir| complete(dir)).ok_or_else(|| {
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found. The tests need a real \
             PostgreSQL server: install the Debian package `postgresql` (apt-get install -y postgresql), \
             or put a folder holding them on PATH. `.ci/run` installs it."
            .to_owned()
    })
}

/// A command that runs `program` as the `postgres` user when we are root.
fn as_server_user(program: &Path, root: bool) -> Command {
    if root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn run(mut command: Command, what: &str) -> Result<(), String> {
    let output = command.stdin(Stdio::null()).output().map_err(|e| format!("could not run {what}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

impl PgCluster {
    fn start(tls: Option<&TlsFiles>) -> Result<PgCluster, String> {
        let bindir = find_bindir()?;
        let root = is_root();
        let dir = tempfile::Builder::new()
            .prefix("upshift-pg-")
            .tempdir()
            .map_err(|e| format!("could not make a temp dir: {e}"))?
            .keep();
        let data = dir.join("data");
        if root {
            let mut chown = Command::new("chown");
            chown.args(["-R", "postgres:"]).arg(&dir);
            run(chown, "chown")?;
        }
        let mut initdb = as_server_user(&bindir.join("initdb"), root);
        initdb.arg("-D").arg(&data).args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"]);
        run(initdb, "initdb")?;
        if let Some(tls) = tls {
            configure_tls(&data, tls, root)?;
        }

        // Another process may take the port between here and the server's bind; retry.
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("no free port: {e}"))?
                .port();
            let mut pg_ctl = as_server_user(&bindir.join("pg_ctl"), root);
            pg_ctl
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.join("server.log"))
                .args(["-w", "-t", "60", "-o"])
                .arg(format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
                     -c full_page_writes=off -c max_connections=200",
                    dir.display()
                ))
                .arg("start")
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            match run(pg_ctl, "pg_ctl start") {
                Ok(()) => {
                    let cluster = PgCluster { port, bindir, data, socket_dir: dir.clone() };
                    cluster.watch(&dir, root)?;
                    return Ok(cluster);
                }
                Err(e) => {
                    let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
                    last_error = format!("{e}\nserver log:\n{log}");
                }
            }
        }
        Err(last_error)
    }

    /// Starts a process that waits for this one to end, then stops the cluster and
    /// removes its folder.
    fn watch(&self, dir: &Path, root: bool) -> Result<(), String> {
        let prefix = if root { "runuser -u postgres -- " } else { "" };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
             {prefix}'{pg_ctl}' -D '{data}' -m immediate stop; rm -rf '{dir}'",
            pid = std::process::id(),
            pg_ctl = self.bindir.join("pg_ctl").display(),
            data = self.data.display(),
            dir = dir.display(),
        );
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(drop)
            .map_err(|e| format!("could not start the cluster's watchdog: {e}"))
    }

    /// The port the cluster listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The folder of the server binaries (`pg_dump`, `psql` and friends are there too).
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// A URL for `database` as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A connection to `database` as the superuser (through the unix socket, so a TLS-only
    /// cluster takes it too).
    pub fn connect(&self, database: &str) -> postgres::Client {
        postgres::Client::connect(
            &format!("host={} port={} user=postgres dbname={database}", self.socket_dir.display(), self.port),
            postgres::NoTls,
        )
        .unwrap_or_else(|e| panic!("could not connect to the test cluster: {e}"))
    }

    /// Creates an empty database and returns its URL.
    pub fn create_database(&self) -> String {
        let name = format!("t{}_{}", std::process::id(), DATABASES.fetch_add(1, Ordering::SeqCst));
        self.connect("postgres")
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("could not create database {name}: {e}"));
        self.url(&name)
    }
}

/// Turns TLS on with `tls`'s certificate, and lets TCP clients in over TLS only.
fn configure_tls(data: &Path, tls: &TlsFiles, root: bool) -> Result<(), String> {
    let write = |name: &str, text: &str, mode: u32| -> Result<(), String> {
        let path = data.join(name);
        std::fs::write(&path, text).map_err(|e| format!("could not write {}: {e}", path.display()))?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(|e| format!("could not set the mode of {}: {e}", path.display()))
    };
    write("server.crt", &tls.cert, 0o644)?;
    write("server.key", &tls.key, 0o600)?;
    write(
        "pg_hba.conf",
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
        0o600,
    )?;
    let conf = data.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).map_err(|e| format!("could not read {}: {e}", conf.display()))?;
    text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
    std::fs::write(&conf, text).map_err(|e| format!("could not write {}: {e}", conf.display()))?;
    if root {
        let mut chown = Command::new("chown");
        chown.args(["-R", "postgres:"]).arg(data);
        run(chown, "chown")?;
    }
    Ok(())
}

/// The database name at the end of a URL made by [`PgCluster::url`].
pub fn database_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}
