//! `upshift demo`: writes a complete deployment of the notes example and, unless
//! `--prepare-only`, runs its whole story under its own load: deploy 1.0.0, upgrade to 2.0.0,
//! fail to 3.0.0 and roll back by itself, roll back to 1.0.0; then prints what happened.

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write as _};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

use super::demo_compose;
use crate::exit::UsageError;
use crate::printer::Printer;

/// What the demo was asked to do.
pub(crate) struct DemoArgs<'a> {
    pub(crate) dir: &'a Path,
    /// `--port`; none: 18080, or a free port when 18080 is taken.
    pub(crate) port: Option<u16>,
    pub(crate) database_url: Option<&'a str>,
    pub(crate) prepare_only: bool,
    /// `--compose`: the stack on Docker Compose instead of processes under the agent.
    pub(crate) compose: bool,
}

fn manifest(url: &str, port: u16) -> String {
    format!(
        r#"# The notes example, written by `upshift demo`. Drive it by hand from this folder:
#   upshift plan --to 2.0.0
#   upshift upgrade --to 1.0.0 && upshift upgrade --to 2.0.0 && upshift upgrade --to 3.0.0
#   upshift status && upshift history && upshift rollback && upshift agent stop

[app]
name = "notes"

[database]
url = "{url}"

[backup]
keep_last = 5

[[backup.artifacts]]               # state beside the database, saved and restored with it
name = "settings"
create = ["cp", "settings.json", "{{out}}"]
restore = ["cp", "{{in}}", "settings.json"]

[[hooks]]                          # a runbook step with its own undo, journaled like the others
name = "deployed-file"
at = "post-deploy"
run = ["sh", "-c", "echo {{version}} > DEPLOYED"]
undo = ["sh", "-c", "echo '{{from}}' > DEPLOYED"]

[verify]
watch = "1s"                       # after verify, health and the proxy's figures must hold
watch_interval = "100ms"

[notify]                           # start, success, failure, rollback: here, into a file
command = ["sh", "-c", "cat >> notifications.jsonl && echo >> notifications.jsonl"]

[[components]]
name = "api"
driver = "process"
run = ["releases/{{version}}/notes", "--release", "{{version}}", "--listen", "{{addr}}"]
env = {{ DATABASE_URL = "{url}" }}  # by environment: a password in argv is visible to `ps`
serve = "127.0.0.1:{port}"
strategy = "blue-green"            # new beside old, health-gated, proxy switched, old drained
health = {{ http = "/health", interval = "100ms", healthy_after = 2, deadline = "3s" }}
drain = "5s"

[[releases]]
version = "1.0.0"
summary = "Notes with a title and a body"
migrate_to = "20260101000000"

[[releases]]
version = "2.0.0"
upgrade_from = ">=1.0.0"
summary = "Tags on notes; the title goes away"
breaking = ["notes have no title; they carry tags"]
migrate_to = "20260202000000"

[[releases]]
version = "3.0.0"
upgrade_from = ">=2.0.0"
summary = "A release whose health check fails after start, to show the automatic rollback"
migrate_to = "20260202000000"
"#
    )
}

/// Puts `program` at `path`: a hard link when it can (no copy), else a copy.
fn install_binary(program: &Path, path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        fs::remove_file(path).with_context(|| format!("replacing {}", path.display()))?;
    }
    if fs::hard_link(program, path).is_err() {
        fs::copy(program, path).with_context(|| format!("copying {} to {}", program.display(), path.display()))?;
    }
    Ok(())
}

/// The port used when `--port` is not given.
const DEFAULT_PORT: u16 = 18080;

/// Whether something already listens on 127.0.0.1:`port`.
fn taken(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_err()
}

/// The port to serve on: `--port` when it is free (else refused before anything is
/// written), else 18080, else a free one, said aloud.
fn choose_port(asked: Option<u16>, printer: &Printer) -> anyhow::Result<u16> {
    match asked {
        Some(port) if taken(port) => Err(UsageError(format!(
            "port {port} is taken on 127.0.0.1; pick another with --port, or leave --port out to get a free one"
        ))
        .into()),
        Some(port) => Ok(port),
        None if !taken(DEFAULT_PORT) => Ok(DEFAULT_PORT),
        None => {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
            let port = listener.local_addr().context("finding a free port")?.port();
            printer
                .warn(&format!("port {DEFAULT_PORT} is taken: the demo serves on {port} instead (--port picks one)"));
            Ok(port)
        }
    }
}

fn prepare(args: &DemoArgs<'_>, port: u16) -> anyhow::Result<String> {
    let dir = args.dir;
    if dir.join("upshift.toml").exists() && dir.join(".upshift/journal.db").exists() {
        return Err(UsageError(format!(
            "{} already holds a demo that ran; remove it (after `upshift agent stop` there) or pick another --dir",
            dir.display()
        ))
        .into());
    }
    if args.compose {
        return prepare_compose(dir, port);
    }
    let url = args.database_url.map_or_else(|| "sqlite:notes.db".to_owned(), str::to_owned);
    let program = std::env::current_exe().context("finding the upshift binary")?;
    for version in notes::RELEASES {
        let folder = dir.join("releases").join(version);
        fs::create_dir_all(&folder).with_context(|| format!("creating {}", folder.display()))?;
        install_binary(&program, &folder.join("notes"))?;
    }
    write_migrations(dir)?;
    let settings = dir.join("settings.json");
    fs::write(&settings, "{\"theme\": \"light\"}\n").with_context(|| format!("writing {}", settings.display()))?;
    write_manifest(dir, &manifest(&url, port))?;
    Ok(url)
}

fn write_migrations(dir: &Path) -> anyhow::Result<()> {
    let migrations = dir.join("migrations");
    fs::create_dir_all(&migrations).with_context(|| format!("creating {}", migrations.display()))?;
    for (name, text) in notes::MIGRATIONS {
        fs::write(migrations.join(name), text).with_context(|| format!("writing {name}"))?;
    }
    Ok(())
}

/// Writes `upshift.toml`, owner-only: it may hold a database password.
fn write_manifest(dir: &Path, text: &str) -> anyhow::Result<()> {
    let path = dir.join("upshift.toml");
    let _ = fs::remove_file(&path);
    let mut file = std::os::unix::fs::OpenOptionsExt::mode(fs::OpenOptions::new().write(true).create_new(true), 0o600)
        .open(&path)
        .context("writing upshift.toml")?;
    file.write_all(text.as_bytes()).context("writing upshift.toml")
}

/// The Compose stack: its images (made from this binary), compose file, migrations and
/// manifest. Says what is missing when Docker or Compose v2 is not there.
fn prepare_compose(dir: &Path, port: u16) -> anyhow::Result<String> {
    demo_compose::check_docker()?;
    demo_compose::build_images(notes::RELEASES)?;
    fs::write(dir.join("compose.yaml"), demo_compose::COMPOSE_FILE).context("writing compose.yaml")?;
    fs::create_dir_all(dir.join("data")).context("creating data/")?;
    write_migrations(dir)?;
    write_manifest(dir, &demo_compose::manifest(port))?;
    Ok("sqlite:data/notes.db".to_owned())
}

/// How to get `upshift` on PATH, when it is not.
fn install_hint(on_path: bool) -> String {
    if on_path {
        String::new()
    } else {
        "`upshift` is not on your PATH: `cargo install --path crates/upshift` puts it in ~/.cargo/bin.\n".to_owned()
    }
}

/// Requests of one phase of the story.
#[derive(Default)]
struct Tally {
    sent: u64,
    failed: u64,
    latencies: Vec<Duration>,
}

#[derive(Serialize)]
struct PhaseJson {
    phase: String,
    exit_code: i32,
    requests: u64,
    failed: u64,
    p99_ms: f64,
    seconds: f64,
}

fn p99(latencies: &mut [Duration]) -> f64 {
    if latencies.is_empty() {
        return 0.0;
    }
    latencies.sort();
    let index = (latencies.len() * 99).div_ceil(100).saturating_sub(1);
    latencies[index].as_secs_f64() * 1000.0
}

/// One request; success is a 2xx answer.
fn request(addr: &str, method: &str, path: &str, body: &str) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response.split_whitespace().nth(1).is_some_and(|code| code.starts_with('2')))
    };
    attempt().unwrap_or(false)
}

/// Steady load on the service until `stop`: reads, and now and then a write that both
/// releases accept, counted into the current phase.
fn load(addr: String, tally: Arc<Mutex<Tally>>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            let started = Instant::now();
            let ok = if n.is_multiple_of(10) {
                request(
                    &addr,
                    "POST",
                    "/api/notes",
                    &format!(r#"{{"title": "load {n}", "body": "written under load", "tags": ["demo"]}}"#),
                )
            } else {
                request(&addr, "GET", "/api/notes", "")
            };
            let latency = started.elapsed();
            {
                let mut tally = tally.lock().expect("tally lock");
                tally.sent += 1;
                if ok {
                    tally.latencies.push(latency);
                } else {
                    tally.failed += 1;
                }
            }
            if !ok {
                // A refused connection returns at once; do not spin.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    })
}

fn upshift(dir: &Path, args: &[&str]) -> anyhow::Result<i32> {
    let program = std::env::current_exe().context("finding the upshift binary")?;
    // What the story's commands print is progress for people: their stdout goes to our
    // stderr, so the demo's own stdout stays one result (one JSON document in json mode).
    let to_stderr = std::io::stderr().as_fd().try_clone_to_owned().context("duplicating stderr")?;
    let status = Command::new(program)
        .args(args)
        .arg("--yes")
        .current_dir(dir)
        .stdout(std::process::Stdio::from(to_stderr))
        .env_remove("UPSHIFT_CONFIG")
        .env_remove("DATABASE_URL")
        .env_remove("UPSHIFT_DATABASE_URL")
        .status()
        .with_context(|| format!("running upshift {}", args.join(" ")))?;
    Ok(status.code().unwrap_or(-1))
}

pub(crate) fn run(args: &DemoArgs<'_>, printer: &Printer) -> anyhow::Result<()> {
    if args.compose && args.database_url.is_some() {
        return Err(UsageError(
            "--compose runs its own SQLite file inside the stack; --database-url is for the process demo".into(),
        )
        .into());
    }
    let port = choose_port(args.port, printer)?;
    fs::create_dir_all(args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let url = prepare(args, port)?;
    // The commands to run there by hand: `upshift` when it is on PATH, else this binary.
    let program = std::env::current_exe().context("finding the upshift binary")?;
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|d| d.join("upshift").canonicalize().ok() == program.canonicalize().ok())
    });
    let upshift_command = if on_path { "upshift".to_owned() } else { program.display().to_string() };
    let dir = std::path::absolute(args.dir).unwrap_or_else(|_| args.dir.to_path_buf());
    printer.progress(&format!(
        "wrote the notes deployment into {} (database {})",
        dir.display(),
        upshift_migrate::redact(&url)
    ));
    if args.prepare_only {
        return printer.result(&serde_json::json!({ "dir": dir, "prepared": true, "port": port }), || {
            format!(
                "prepared {}\nnext: cd {} && {upshift_command} upgrade --to 1.0.0\n{}",
                dir.display(),
                dir.display(),
                install_hint(on_path)
            )
        });
    }
    let addr = format!("127.0.0.1:{port}");
    let story: [(&str, &[&str], i32); 4] = [
        ("deploy 1.0.0", &["upgrade", "--to", "1.0.0"], 0),
        ("upgrade to 2.0.0", &["upgrade", "--to", "2.0.0"], 0),
        ("upgrade to 3.0.0 (its health check fails: undone by itself)", &["upgrade", "--to", "3.0.0"], 3),
        ("roll back to 1.0.0", &["rollback"], 0),
    ];
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut loaders = Vec::new();
    let mut phases = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for (index, (phase, command, expected)) in story.iter().enumerate() {
            printer.progress(&format!("\n== {phase}: upshift {}", command.join(" ")));
            *tally.lock().expect("tally lock") = Tally::default();
            let started = Instant::now();
            let code = upshift(&dir, command)?;
            let seconds = started.elapsed().as_secs_f64();
            let mut finished = std::mem::take(&mut *tally.lock().expect("tally lock"));
            phases.push(PhaseJson {
                phase: (*phase).to_owned(),
                exit_code: code,
                requests: finished.sent,
                failed: finished.failed,
                p99_ms: p99(&mut finished.latencies),
                seconds,
            });
            if code != *expected {
                anyhow::bail!("`upshift {}` exited {code}, the story expected {expected}", command.join(" "));
            }
            if index == 0 {
                // The service is up: start the load (two clients) for the rest of the story.
                for _ in 0..2 {
                    loaders.push(load(addr.clone(), Arc::clone(&tally), Arc::clone(&stop)));
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        Ok(())
    })();
    stop.store(true, Ordering::SeqCst);
    for loader in loaders {
        let _ = loader.join();
    }
    let stopped = upshift(&dir, &["agent", "stop"]);
    let down = if args.compose { demo_compose::down(&dir) } else { Ok(()) };
    result?;
    stopped?;
    down?;
    printer.result(&phases, || summary(&phases, args.compose, &dir, &upshift_command, on_path))
}

/// What happened, for people: the phases' figures and what they mean.
fn summary(phases: &[PhaseJson], compose: bool, dir: &Path, upshift_command: &str, on_path: bool) -> String {
    let mut out = String::from(
        "\nWhat happened (load: 2 clients reading the notes, a write in ten; p99 over answered requests):\n\n",
    );
    let _ =
        writeln!(out, "{:<62} {:>5} {:>9} {:>7} {:>9} {:>7}", "phase", "exit", "requests", "failed", "p99 ms", "secs");
    for p in phases {
        let _ = writeln!(
            out,
            "{:<62} {:>5} {:>9} {:>7} {:>9.1} {:>7.1}",
            p.phase, p.exit_code, p.requests, p.failed, p.p99_ms, p.seconds
        );
    }
    if compose {
        let _ = writeln!(
            out,
            "\nThe stack ran on Docker Compose (project {}): the api's containers side by side behind\n\
             the agent's proxy, the worker drained on SIGTERM (data/worker.log shows it finish its\n\
             task before the next one starts). The stack is down again.",
            demo_compose::PROJECT
        );
    }
    let _ = writeln!(
        out,
        "\nUpgrades switch blue-green behind the agent's proxy: the new version starts beside the\n\
         old one and gets traffic only once healthy, so 3.0.0 never serves a request. The\n\
         rollback restores the backup taken before 2.0.0 (its contract migration dropped a\n\
         column): the service is down while the database is restored, and the requests of\n\
         that window fail. The deployment is in {}; `cd {} && {upshift_command} history` shows it all.",
        dir.display(),
        dir.display()
    );
    out.push_str(&install_hint(on_path));
    out
}
