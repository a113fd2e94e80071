//! The Compose driver on a real Docker Engine with Compose v2: the notes service (this
//! binary, named `notes`, in an image made here from scratch) as a Compose service over a
//! SQLite file on a bind mount, upgraded, failed, undone, rolled back, switched under load
//! and killed mid-run; and `examples/compose` (seed 004's stack: PostgreSQL, Redis, the api
//! and a worker) from its own files, at the runbook's three rollback levels. Skipped, with
//! the reason, when no Docker with Compose v2 answers; under CI (`CI` set, where `.ci/run`
//! starts the engine) a missing engine fails instead.

#![allow(clippy::print_stderr)] // the skip reason, and the figures the closing note quotes

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::{Context, Run, Status};

const RELEASES: [&str; 4] = ["1.0.0", "2.0.0", "2.0.1", "3.0.0"];

/// Whether Docker and Compose v2 answer; says why not (and fails under CI).
fn docker_ready() -> bool {
    let answers = |args: &[&str]| {
        Command::new("docker")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if answers(&["info"]) && answers(&["compose", "version"]) {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI starts every engine, but no Docker Engine with Compose v2 answers (ci/engines/docker.sh sets one up)"
    );
    eprintln!("skipped: no Docker Engine with Compose v2 answers here (ci/engines/docker.sh sets one up)");
    false
}

fn docker(args: &[&str]) -> String {
    let output = Command::new("docker").args(args).stdin(Stdio::null()).output().unwrap();
    assert!(output.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The notes images `upshift-demo-notes:<release>`, made by `upshift demo --compose
/// --prepare-only` (from this binary, once per build), and 2.0.1: 2.0.0's code under
/// another version.
fn images() -> &'static str {
    static TAGGED: OnceLock<()> = OnceLock::new();
    TAGGED.get_or_init(|| {
        common::notes_images();
        docker(&["tag", "upshift-demo-notes:2.0.0", "upshift-demo-notes:2.0.1"]);
    });
    "upshift-demo-notes"
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

const COMPOSE_FILE: &str = r#"services:
  api:
    image: upshift-demo-notes:1.0.0
    init: true
    environment:
      DATABASE_URL: sqlite:/data/notes.db
    volumes: ["./data:/data"]
    ports: ["127.0.0.1:${NOTES_PORT}:8080"]
    healthcheck:
      test: ["CMD", "/busybox", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/health"]
      interval: 200ms
      timeout: 2s
      retries: 2
"#;

/// The Compose example, seed 004's stack: its own files are what the example test runs.
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/compose");

/// `text` with each `(from, to)` replaced; `from` must be there, else the example changed
/// under the test.
fn adapted(text: &str, changes: &[(&str, &str)]) -> String {
    changes.iter().fold(text.to_owned(), |text, (from, to)| {
        assert!(text.contains(from), "the example no longer holds {from:?}");
        text.replace(from, to)
    })
}

/// A Compose project of the notes service in a temp folder; its containers, volumes,
/// network and agent go on drop, whatever the test did.
struct Stack {
    ctx: Context,
    project: String,
    /// The port Compose publishes (recreate), or the proxy's stable address.
    address: String,
    image: String,
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.ctx.command().args(["agent", "stop", "--state-dir", ".upshift"]).output();
        let filter = format!("label=com.docker.compose.project={}", self.project);
        let ids = Command::new("docker").args(["ps", "-aq", "--filter", &filter]).output();
        let ids: Vec<String> = ids
            .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        if !ids.is_empty() {
            let _ = Command::new("docker").args(["rm", "-f"]).args(&ids).output();
        }
        let volumes = Command::new("docker").args(["volume", "ls", "-q", "--filter", &filter]).output();
        let volumes: Vec<String> = volumes
            .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        if !volumes.is_empty() {
            let _ = Command::new("docker").args(["volume", "rm", "-f"]).args(&volumes).output();
        }
        let _ = Command::new("docker").args(["network", "rm", &format!("{}_default", self.project)]).output();
        for release in RELEASES {
            let _ = Command::new("docker").args(["rmi", &format!("{}:{release}", self.image)]).output();
        }
    }
}

const POSTGRES_COMPOSE_FILE: &str = r#"services:
  db:
    image: upshift-test-postgres:15
    healthcheck:
      test: ["CMD", "pg_isready", "-U", "postgres", "-h", "127.0.0.1"]
      interval: 200ms
      retries: 100
  api:
    image: upshift-demo-notes:1.0.0
    init: true
    environment:
      DATABASE_URL: postgres://postgres@db:5432/postgres
    depends_on: [db]
    ports: ["127.0.0.1:${NOTES_PORT}:8080"]
    healthcheck:
      test: ["CMD", "/busybox", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/health"]
      interval: 200ms
      timeout: 2s
      retries: 2
"#;

impl Stack {
    /// The notes service over SQLite; `settings` are the component's extra keys
    /// (strategy, serve, ...).
    fn new(settings: &str) -> Option<Stack> {
        Stack::with(COMPOSE_FILE, "url = \"sqlite:data/notes.db\"", settings)
    }

    /// A stack of `compose_file`, with `database` as the manifest's `[database]` table.
    fn with(compose_file: &str, database: &str, settings: &str) -> Option<Stack> {
        let mut stack = Stack::bare()?;
        let (ctx, project, image) = (&stack.ctx, &stack.project, &stack.image);
        let port = free_port();
        ctx.write("compose.yaml", compose_file);
        ctx.write(".env", &format!("NOTES_PORT={port}\n"));
        std::fs::create_dir_all(ctx.join("data")).unwrap();
        for (name, text) in notes::MIGRATIONS {
            ctx.write(&format!("migrations/{name}"), text);
        }
        let serve = format!("127.0.0.1:{}", free_port());
        let address = if settings.contains("{serve}") { serve.clone() } else { format!("127.0.0.1:{port}") };
        let settings = settings.replace("{serve}", &serve);
        ctx.write(
            "upshift.toml",
            &format!(
                r#"[app]
name = "notes"

[database]
{database}

[[components]]
name = "api"
driver = "compose"
project = "{project}"
service = "api"
image = "{image}:{{version}}"
port = 8080
health = {{ http = "/health", interval = "100ms", healthy_after = 2, deadline = "20s" }}
drain = "2s"
{settings}

[[releases]]
version = "1.0.0"
migrate_to = "20260101000000"

[[releases]]
version = "2.0.0"
migrate_to = "20260202000000"

[[releases]]
version = "2.0.1"
migrate_to = "20260202000000"

[[releases]]
version = "3.0.0"
migrate_to = "20260202000000"
"#
            ),
        );
        stack.address = address;
        Some(stack)
    }

    /// A temp folder and a project name of this stack's own, with the notes images tagged
    /// for it (so a test can re-point a tag like a re-pushed one); nothing written yet.
    fn bare() -> Option<Stack> {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        if !docker_ready() {
            return None;
        }
        let base = images();
        let ctx = Context::new();
        let project = format!("upshift-test-{}-{}", std::process::id(), COUNT.fetch_add(1, Ordering::SeqCst));
        let image = format!("{project}-notes");
        for release in RELEASES {
            docker(&["tag", &format!("{base}:{release}"), &format!("{image}:{release}")]);
        }
        Some(Stack { ctx, project, address: String::new(), image })
    }

    /// `examples/compose` itself (seed 004's stack: PostgreSQL and Redis from images built
    /// here, the api blue-green behind the proxy, a worker reporting to Redis), its files
    /// changed only where this stack must differ: the project name, the notes images' tags,
    /// the serve address, and the migrations (the notes example's, beside the manifest).
    fn example() -> Option<Stack> {
        let mut stack = Stack::bare()?;
        for (script, tag) in
            [("postgres-image.sh", "upshift-postgres:example"), ("redis-image.sh", "upshift-redis:example")]
        {
            let script = format!("{}/../../ci/engines/{script}", env!("CARGO_MANIFEST_DIR"));
            let built = Command::new("bash").args([&script, tag]).stdin(Stdio::null()).status().unwrap();
            assert!(built.success(), "{script} {tag}");
        }
        stack.address = format!("127.0.0.1:{}", free_port());
        let image = format!("{}:", stack.image);
        let compose_file = std::fs::read_to_string(format!("{EXAMPLE}/compose.yaml")).unwrap();
        let compose_file = adapted(
            &compose_file,
            &[("name: notes-example", &format!("name: {}", stack.project)), ("upshift-demo-notes:", &image)],
        );
        stack.ctx.write("compose.yaml", &compose_file);
        let manifest = std::fs::read_to_string(format!("{EXAMPLE}/upshift.toml")).unwrap();
        let manifest = adapted(
            &manifest,
            &[
                ("serve = \"127.0.0.1:8000\"", &format!("serve = \"{}\"", stack.address)),
                ("upshift-demo-notes:", &image),
                ("migrations = \"../notes/migrations\"", "migrations = \"migrations\""),
            ],
        );
        stack.ctx.write("upshift.toml", &manifest);
        for entry in std::fs::read_dir(format!("{EXAMPLE}/../notes/migrations")).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            stack.ctx.write(&format!("migrations/{name}"), &std::fs::read_to_string(&path).unwrap());
        }
        Some(stack)
    }

    /// Drops the stack, then checks that nothing of it is left: no container, volume or
    /// network of the project, no proxy on its address.
    fn drop_and_check(self) {
        let filter = format!("label=com.docker.compose.project={}", self.project);
        let address = self.address.clone();
        drop(self);
        for what in [&["ps", "--all"][..], &["volume", "ls"], &["network", "ls"]] {
            let left = docker(&[what, &["--quiet", "--filter", &filter]].concat());
            assert!(left.is_empty(), "docker {what:?} still lists {left}");
        }
        assert!(TcpStream::connect(&address).is_err(), "the proxy still listens on {address}");
    }

    /// `docker compose ARGS` in the stack's folder; its stdout.
    fn compose(&self, args: &[&str]) -> String {
        let output = Command::new("docker")
            .arg("compose")
            .args(args)
            .current_dir(self.ctx.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(output.status.success(), "docker compose {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    fn run(&self, args: &[&str]) -> Run {
        let mut all = args.to_vec();
        all.push("--yes");
        self.ctx.run(&all)
    }

    /// Runs `upshift ARGS --yes`, noting when each line of its stderr came: the run, and
    /// the seconds from the first line holding `from` to the next holding `to`.
    fn timed(&self, args: &[&str], from: &str, to: &str) -> (Run, Option<f64>) {
        let started = Instant::now();
        let mut child =
            self.ctx.command().args(args).arg("--yes").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            stdout.read_to_string(&mut text).unwrap();
            text
        });
        let lines: Vec<(Duration, String)> = BufReader::new(child.stderr.take().unwrap())
            .lines()
            .map(|line| (started.elapsed(), line.unwrap()))
            .collect();
        let code = child.wait().unwrap().code().unwrap_or(-1);
        let begun = lines.iter().position(|(_, line)| line.contains(from));
        let ended = begun.and_then(|b| lines[b..].iter().find(|(_, line)| line.contains(to)));
        let seconds = begun.zip(ended).map(|(b, (end, _))| end.saturating_sub(lines[b].0).as_secs_f64());
        let stderr = lines.into_iter().map(|(_, line)| line + "\n").collect();
        (Run { code, stdout: reader.join().unwrap(), stderr }, seconds)
    }

    fn upgrade(&self, version: &str) -> Run {
        self.run(&["upgrade", "--to", version])
    }

    fn status(&self) -> Status {
        self.ctx.run(&["status", "--output", "json"]).success().json()
    }

    fn http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        http(&self.address, method, path, body).unwrap_or_else(|e| panic!("{method} {path} at {}: {e}", self.address))
    }

    /// The image id the live container of the service runs.
    fn running_image(&self) -> Vec<String> {
        let filter = format!("label=com.docker.compose.project={}", self.project);
        let ids = docker(&["ps", "-q", "--filter", &filter]);
        ids.split_whitespace().map(|id| docker(&["inspect", "--format", "{{.Image}}", id])).collect()
    }

    fn image_id(&self, release: &str) -> String {
        docker(&["image", "inspect", "--format", "{{.Id}}", &format!("{}:{release}", self.image)])
    }
}

/// One HTTP/1.1 request on a new connection; the status and body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| e.to_string())?;
    let code = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or("not HTTP")?;
    Ok((code, response.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned()))
}

/// Clients sending GET /api/notes to `addr` until stopped; every answer is counted.
struct Load {
    stop: Arc<AtomicBool>,
    /// Every answer so far, failures included.
    answered: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    fn start(addr: &str, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .map(|_| {
                let (stop, answered, addr) = (Arc::clone(&stop), Arc::clone(&answered), addr.to_owned());
                std::thread::spawn(move || {
                    let (mut ok, mut failed) = (0, Vec::new());
                    while !stop.load(Ordering::SeqCst) {
                        match http(&addr, "GET", "/api/notes", "") {
                            Ok((200, _)) => ok += 1,
                            Ok((code, body)) => failed.push(format!("{code} {body}")),
                            Err(e) => failed.push(e),
                        }
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    (ok, failed)
                })
            })
            .collect();
        Load { stop, answered, threads }
    }

    /// Waits until `more` requests beyond those so far are answered: traffic is flowing.
    fn wait_for(&self, more: u64) {
        let target = self.answered.load(Ordering::SeqCst) + more;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.answered.load(Ordering::SeqCst) < target {
            assert!(Instant::now() < deadline, "the load clients got no answers");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the clients: the answers that were 200, and every failure.
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.threads.into_iter().map(|t| t.join().unwrap()).fold((0, Vec::new()), |(ok, mut failed), (o, f)| {
            failed.extend(f);
            (ok + o, failed)
        })
    }
}

#[test]
fn recreate_upgrades_undoes_a_failed_release_and_puts_back_the_image_it_ran() {
    let Some(stack) = Stack::new("") else { return };
    stack.upgrade("1.0.0").success().stderr_has("deploy api (compose, recreate)");
    let (code, _) = stack.http("POST", "/api/notes", r#"{"title": "first", "body": "kept across everything"}"#);
    assert_eq!(code, 201);
    stack.upgrade("2.0.0").success();
    let (_, body) = stack.http("GET", "/api/notes", "");
    assert!(body.contains("kept across everything") && body.contains("tags"), "{body}");
    let ran = stack.image_id("2.0.0");
    assert_eq!(stack.running_image(), std::slice::from_ref(&ran));

    // The 2.0.0 tag is re-pointed (a re-pushed tag) at broken code; 3.0.0 fails its health
    // check and is undone: the container runs 2.0.0's image by id, not what the tag says.
    docker(&["tag", &format!("{}:3.0.0", stack.image), &format!("{}:2.0.0", stack.image)]);
    stack.upgrade("3.0.0").code(3).stderr_has("unhealthy by its own healthcheck").stderr_has("2.0.0 is back");
    assert_eq!(stack.running_image(), [ran]);
    let (code, body) = stack.http("GET", "/health", "");
    assert_eq!((code, body.contains("2.0.0")), (200, true), "{body}");
    let status = stack.status();
    assert_eq!(status.version.as_deref(), Some("2.0.0"));
    assert_eq!(status.components[0].version.as_deref(), Some("2.0.0"));
    assert!(status.components[0].healthy, "{status:?}");
    assert_eq!(status.components[0].instances.len(), 1, "{status:?}");

    // Back to 1.0.0: its image, and the backup taken before the contract migration.
    stack.run(&["rollback"]).success();
    let (code, body) = stack.http("GET", "/api/notes", "");
    assert_eq!(code, 200);
    assert!(body.contains("\"title\":\"first\""), "{body}");
    assert_eq!(stack.running_image(), [stack.image_id("1.0.0")]);
}

#[test]
fn blue_green_and_rolling_switch_containers_with_no_failed_request() {
    let Some(stack) = Stack::new("strategy = \"blue-green\"\nserve = \"{serve}\"") else { return };
    stack.upgrade("1.0.0").success();
    let (code, _) = stack.http("POST", "/api/notes", r#"{"title": "first", "body": "kept across everything"}"#);
    assert_eq!(code, 201);

    let mut report = Vec::new();
    let mut under_load = |what: &str, version: &str, code: i32| {
        let load = Load::start(&stack.address, 4);
        // Requests are flowing before the switch starts.
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        stack.upgrade(version).code(code);
        let took = started.elapsed();
        std::thread::sleep(Duration::from_millis(300));
        let (ok, failed) = load.finish();
        assert!(
            failed.is_empty(),
            "{what}: {} of {} requests failed: {:?}",
            failed.len(),
            ok + failed.len() as u64,
            &failed[..failed.len().min(5)]
        );
        assert!(ok > 20, "{what}: only {ok} requests answered");
        report.push(format!("{what}: {ok} requests, 0 failed, upgrade took {:.1}s", took.as_secs_f64()));
    };
    under_load("blue-green 1.0.0 -> 2.0.0", "2.0.0", 0);
    // 3.0.0 never becomes healthy: the old container serves throughout, and stays.
    under_load("blue-green 2.0.0 -> 3.0.0 (failed, undone)", "3.0.0", 3);
    assert_eq!(stack.status().components[0].version.as_deref(), Some("2.0.0"));

    // The same stack, now rolling over two containers.
    let manifest =
        stack.ctx.read("upshift.toml").replace("strategy = \"blue-green\"", "strategy = \"rolling\"\ninstances = 2");
    stack.ctx.write("upshift.toml", &manifest);
    under_load("rolling 2.0.0 -> 2.0.1 (2 containers)", "2.0.1", 0);
    let status = stack.status();
    assert_eq!(status.components[0].version.as_deref(), Some("2.0.1"));
    assert_eq!(status.components[0].instances.len(), 2, "{status:?}");
    under_load("rolling 2.0.1 -> 3.0.0 (failed, undone)", "3.0.0", 3);
    let status = stack.status();
    assert_eq!(status.components[0].version.as_deref(), Some("2.0.1"));
    assert_eq!(status.components[0].instances.len(), 2, "{status:?}");
    let (_, body) = stack.http("GET", "/api/notes", "");
    assert!(body.contains("kept across everything"), "{body}");
    for line in report {
        eprintln!("{line}");
    }
}

/// The crash-at-every-write contract on real containers: an upgrade 1.0.0 -> 2.0.0
/// (blue-green behind the proxy) is killed after each of its journal writes in turn, then
/// `resume` or `abort` runs (alternating); the stack must converge: nothing in flight, the
/// journal's version is what the containers run and what answers, with the note kept.
#[test]
fn killed_at_every_journal_write_then_resume_or_abort_converges() {
    let Some(stack) = Stack::new("strategy = \"blue-green\"\nserve = \"{serve}\"") else { return };
    stack.upgrade("1.0.0").success();
    let (code, _) = stack.http("POST", "/api/notes", r#"{"title": "first", "body": "kept across everything"}"#);
    assert_eq!(code, 201);
    let points = common::crash_at_every_write(
        || {
            let mut command = stack.ctx.command();
            command.args(["upgrade", "--to", "2.0.0", "--yes"]);
            command
        },
        |recovery| stack.ctx.run(&[recovery, "--yes", "--output", "json"]),
        |context| {
            let status = stack.status();
            assert!(status.run.is_none(), "{context}: {status:?}");
            let version = status.version.clone().unwrap_or_else(|| panic!("{context}: nothing deployed"));
            assert_eq!(status.components[0].version.as_deref(), Some(version.as_str()), "{context}: {status:?}");
            assert!(status.components[0].healthy, "{context}: {status:?}");
            let (code, body) = stack.http("GET", "/health", "");
            assert_eq!(code, 200, "{context}: {body}");
            assert!(body.contains(&version), "{context}: {body} answers, {version} is deployed");
            let (_, notes) = stack.http("GET", "/api/notes", "");
            assert!(notes.contains("kept across everything"), "{context}: {notes}");
            // Exactly the serving container runs: nothing left over from the killed run.
            assert_eq!(stack.running_image().len(), 1, "{context}: leftover containers");
            version
        },
    );
    eprintln!("{points} crash points, each converged");
}

/// The runbook's database: PostgreSQL as a service of the stack with no published port.
/// upshift reaches it through the container's address (`[database] via`): the backup,
/// the migrations, and the restore of a rollback. The runbook's three rollback levels, one
/// command each: code only, code + down, and restore of the backup.
#[test]
fn postgres_in_the_stack_is_backed_up_migrated_and_restored_through_its_container() {
    let Some(stack) = Stack::with(
        POSTGRES_COMPOSE_FILE,
        "url = \"postgres://postgres@db:5432/postgres\"\nvia = { compose = \"db\" }",
        "",
    ) else {
        return;
    };
    let manifest = stack.ctx.read("upshift.toml").replacen(
        "[[releases]]",
        "[verify]\nsmoke = [[\"sh\", \"-c\", \"test ! -e fail-smoke-{version}\"]]\n\n[[releases]]",
        1,
    );
    stack.ctx.write("upshift.toml", &manifest);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../ci/engines/postgres-image.sh");
    let built = Command::new("bash").args([script, "upshift-test-postgres:15"]).status().unwrap();
    assert!(built.success(), "{script}");
    // The stack runs before upshift, as in the runbook: its database has 1.0.0's schema
    // (migrated by the old tooling) and the api was started by hand.
    let compose_up = |services: &[&str]| {
        let up = Command::new("docker")
            .args(["compose", "-p", &stack.project, "up", "--detach", "--wait"])
            .args(services)
            .current_dir(stack.ctx.path())
            .output()
            .unwrap();
        assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    };
    compose_up(&["db"]);
    stack.ctx.run(&["migrate", "up", "20260101000000"]).success();
    compose_up(&["api"]);
    let hand_run = stack.running_image();

    // A first deploy takes the hand-run api over; when it fails, the undo puts that very
    // container's image back, still not upshift's, so the next first deploy takes it over.
    stack.upgrade("3.0.0").code(3).stderr_has("taking over upshift-demo-notes:1.0.0");
    assert_eq!(stack.running_image(), hand_run);
    stack.upgrade("1.0.0").success().stderr_has("taking over upshift-demo-notes:1.0.0").stderr_has("backup");
    let (code, _) = stack.http("POST", "/api/notes", r#"{"title": "first", "body": "kept across everything"}"#);
    assert_eq!(code, 201);
    // Level 2: 2.0.0 fails its smoke test after the switch; its expand revision has a down
    // section, so the old code goes back and the revision is reverted (no restore).
    stack.ctx.write("fail-smoke-2.0.0", "");
    stack.upgrade("2.0.0").code(3).stderr_has("undoing (code + down)").stderr_has("1.0.0 is back");
    let (_, body) = stack.http("GET", "/api/notes", "");
    assert!(body.contains("\"title\":\"first\""), "{body}");
    std::fs::remove_file(stack.ctx.join("fail-smoke-2.0.0")).unwrap();
    stack.upgrade("2.0.0").success().stderr_has("applied 20260202000000");
    let (_, body) = stack.http("GET", "/api/notes", "");
    assert!(body.contains("kept across everything") && !body.contains("title"), "{body}");
    // Level 1: 3.0.0 never becomes healthy; no migration ran, so only the code goes back.
    stack.upgrade("3.0.0").code(3).stderr_has("undoing (code only)").stderr_has("2.0.0 is back");
    // Level 3, back to 1.0.0: the contract migration dropped `title`, so the backup is restored with
    // the host's pg_restore into the container's database.
    stack.run(&["rollback"]).success().stderr_has("restored backup");
    let (code, body) = stack.http("GET", "/api/notes", "");
    assert_eq!(code, 200);
    assert!(body.contains("\"title\":\"first\""), "{body}");
    // Backups list and verify through the same address.
    let listed = stack.ctx.run(&["backup", "list"]).success().stdout.clone();
    assert!(listed.lines().count() >= 3, "{listed}");
}

/// `examples/compose`, seed 004's runbook with one command per step, on the real engine:
/// PostgreSQL and Redis run before upshift and are never touched; 1.0.0 is deployed; 2.0.0's
/// smoke test fails after the switch (level 2: code + down of the expand); 2.0.0 goes through
/// (expand, blue-green switch, the worker drained, contract); 3.0.0 never becomes healthy
/// (level 1: code only); the rollback to 1.0.0 restores the backup (level 3). No request
/// fails across the switches, what was written before the backup survives, and nothing of
/// the stack is left afterwards.
#[test]
fn the_compose_example_upgrades_and_rolls_back_at_three_levels() {
    let started = Instant::now();
    let Some(stack) = Stack::example() else { return };
    stack.compose(&["up", "--detach", "--wait", "db", "redis"]);
    // The database's and Redis's containers: which, when they started, how often they restarted.
    let kept = || {
        ["db", "redis"].map(|service| {
            let id = stack.compose(&["ps", "--quiet", service]);
            docker(&["inspect", "--format", "{{.Id}} {{.State.StartedAt}} {{.RestartCount}}", &id])
        })
    };
    let before = kept();

    stack.upgrade("1.0.0").success().stderr_has("api 1.0.0 is up").stderr_has("worker 1.0.0 is up");
    let (code, _) = stack.http("POST", "/api/notes", r#"{"title": "first", "body": "kept across everything"}"#);
    assert_eq!(code, 201);

    // Each run under four load clients, traffic flowing before it starts and after it ends;
    // `until`: the line that ends the api's deploy step (or its undo).
    let mut report = Vec::new();
    let mut under_load = |what: &str, version: &str, code: i32, until: &str| {
        let load = Load::start(&stack.address, 4);
        load.wait_for(20);
        let started = Instant::now();
        let (run, step) = stack.timed(&["upgrade", "--to", version], "deploy api", until);
        let took = started.elapsed();
        load.wait_for(20);
        let (ok, failed) = load.finish();
        run.code(code);
        assert!(
            failed.is_empty(),
            "{what}: {} of {} requests failed: {:?}",
            failed.len(),
            ok + failed.len() as u64,
            &failed[..failed.len().min(5)]
        );
        let step = step.unwrap_or_else(|| panic!("{what}: no {until:?} after the api's deploy step:\n{}", run.stderr));
        report.push(format!(
            "{what}: {ok} requests, 0 failed, upgrade took {:.1}s, the api's blue-green step {step:.1}s",
            took.as_secs_f64()
        ));
        run
    };

    // Level 2 (the runbook's "code + database"): 2.0.0's smoke test fails after the switch;
    // its expand revision has a down section, so 1.0.0 comes back and the revision is reverted.
    stack.ctx.write("fail-smoke-2.0.0", "");
    under_load("2.0.0, smoke test failed, undone (code + down)", "2.0.0", 3, "api 2.0.0 is up")
        .stderr_has("undoing (code + down)")
        .stderr_has("reverted 20260201000000")
        .stderr_has("api: 1.0.0 is back");
    let (_, body) = stack.http("GET", "/api/notes", "");
    assert!(body.contains(r#""title":"first""#), "{body}");
    std::fs::remove_file(stack.ctx.join("fail-smoke-2.0.0")).unwrap();

    // 2.0.0: expand, the switch, the worker drained, verify, contract.
    under_load("1.0.0 -> 2.0.0", "2.0.0", 0, "api 2.0.0 is up")
        .stderr_has("applied 20260201000000")
        .stderr_has("applied 20260202000000");
    let (_, body) = stack.http("GET", "/api/notes", "");
    assert!(body.contains("kept across everything") && !body.contains("title"), "{body}");
    let (code, _) = stack.http("POST", "/api/notes", r#"{"body": "written after the backup", "tags": ["late"]}"#);
    assert_eq!(code, 201);

    // Level 1 (code only): 3.0.0 never becomes healthy and no migration ran; the 2.0.0
    // container serves throughout.
    under_load("2.0.0 -> 3.0.0, unhealthy, undone (code only)", "3.0.0", 3, "api: 2.0.0 is back")
        .stderr_has("undoing (code only)");
    let (code, body) = stack.http("GET", "/health", "");
    assert_eq!((code, body.contains("2.0.0")), (200, true), "{body}");

    // Level 3, back to 1.0.0: the contract dropped `title`, so the backup taken before 2.0.0
    // is restored; the note written since is gone, as the rollback's prompt warns.
    stack.run(&["rollback"]).success().stderr_has("restored backup");
    let (code, body) = stack.http("GET", "/api/notes", "");
    assert_eq!(code, 200);
    assert!(body.contains(r#""title":"first""#) && !body.contains("written after the backup"), "{body}");
    let status = stack.status();
    assert_eq!(status.version.as_deref(), Some("1.0.0"));
    for component in &status.components {
        assert_eq!(component.version.as_deref(), Some("1.0.0"), "{status:?}");
        assert!(component.healthy, "{status:?}");
    }

    // Every worker finished its task before the next one started, and Redis, which ran
    // throughout with the database, kept the whole log.
    let expected = [
        "worker 1.0.0 started",
        "worker 1.0.0 SIGTERM, finishing its task",
        "worker 1.0.0 task done, exiting",
        "worker 2.0.0 started",
        "worker 2.0.0 SIGTERM, finishing its task",
        "worker 2.0.0 task done, exiting",
        "worker 1.0.0 started",
        "worker 1.0.0 SIGTERM, finishing its task",
        "worker 1.0.0 task done, exiting",
        "worker 2.0.0 started",
        "worker 2.0.0 SIGTERM, finishing its task",
        "worker 2.0.0 task done, exiting",
        "worker 1.0.0 started",
    ]
    .join("\n");
    let worker_log = || stack.compose(&["exec", "-T", "redis", "redis-cli", "lrange", "worker:log", "0", "-1"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while worker_log() != expected {
        assert!(Instant::now() < deadline, "the worker log in Redis:\n{}", worker_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(kept(), before, "the database or Redis was restarted");
    // What the Drop guard does whatever happened: the agent stopped, and what `docker compose
    // down -v` removes (found by the project's label, so one-off containers go too).
    stack.drop_and_check();
    for line in report {
        eprintln!("{line}");
    }
    eprintln!("the example's story took {:.1}s", started.elapsed().as_secs_f64());
}

/// A worker (no port, no proxy) mid-task: the old container gets `stop_signal` and `drain`
/// to finish before SIGKILL, and only then does the new one start; a task longer than
/// `drain` is cut off at the drain.
#[test]
fn a_worker_mid_task_is_drained_not_killed() {
    // The task takes 2 s after SIGTERM; the version reaches the container by `version_env`.
    let worker = r#"services:
  worker:
    image: upshift-demo-notes:1.0.0
    init: true
    environment:
      V: "${WORKER_VERSION:-none}"
    volumes: ["./data:/data"]
    entrypoint:
      - /busybox
      - sh
      - -c
      - >-
        echo "$$V started" >> /data/worker.log;
        trap 'echo "$$V draining" >> /data/worker.log; /busybox sleep 2; echo "$$V finished its task" >> /data/worker.log; exit 0' TERM;
        while true; do /busybox sleep 0.1; done
"#;
    let Some(stack) = Stack::with(worker, "", "") else { return };
    let manifest = |drain: &str| {
        format!(
            "[app]\nname = \"worker\"\n\n[[components]]\nname = \"worker\"\ndriver = \"compose\"\nproject = \"{}\"\n\
             service = \"worker\"\nversion_env = \"WORKER_VERSION\"\nstop_signal = \"SIGTERM\"\ndrain = \"{drain}\"\n\n\
             [[releases]]\nversion = \"1.0.0\"\n\n[[releases]]\nversion = \"2.0.0\"\n\n[[releases]]\nversion = \"3.0.0\"\n",
            stack.project
        )
    };
    let log = || std::fs::read_to_string(stack.ctx.join("data/worker.log")).unwrap_or_default();
    let wait_for = |line: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !log().contains(line) {
            assert!(Instant::now() < deadline, "no {line:?} in the worker's log: {}", log());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    stack.ctx.write("upshift.toml", &manifest("5s"));
    stack.upgrade("1.0.0").success();
    wait_for("1.0.0 started");
    stack.upgrade("2.0.0").success();
    wait_for("2.0.0 started");
    let lines: Vec<String> = log().lines().map(str::to_owned).collect();
    assert_eq!(lines, ["1.0.0 started", "1.0.0 draining", "1.0.0 finished its task", "2.0.0 started"]);

    // A drain shorter than the task: SIGKILL at the drain, the task never finishes.
    stack.ctx.write("upshift.toml", &manifest("1s"));
    stack.upgrade("3.0.0").success();
    wait_for("3.0.0 started");
    assert!(log().contains("2.0.0 draining") && !log().contains("2.0.0 finished"), "{}", log());
}

/// The Compose demo runs its whole story on the real engine and leaves nothing running.
#[test]
fn the_compose_demo_runs_its_story_and_cleans_up() {
    if !docker_ready() {
        return;
    }
    images();
    let ctx = Context::new();
    let run =
        ctx.run(&["demo", "--compose", "--dir", "demo", "--output", "json"]).success().json::<Vec<serde_json::Value>>();
    let codes: Vec<i64> = run.iter().map(|p| p["exit_code"].as_i64().unwrap()).collect();
    assert_eq!(codes, [0, 0, 3, 0]);
    // The switches lose nothing; only the restore window of the rollback may.
    assert!(run[1]["requests"].as_u64().unwrap() > 0 && run[1]["failed"] == 0 && run[2]["failed"] == 0, "{run:?}");
    let worker = ctx.read("demo/data/worker.log");
    assert!(worker.contains("worker 1.0.0: task done, exiting\nworker 2.0.0 started"), "{worker}");
    let left = docker(&["ps", "--all", "--quiet", "--filter", "label=com.docker.compose.project=upshift-demo"]);
    assert!(left.is_empty(), "containers left: {left}");
}

/// `config check` asks Compose whether the files hold with the release: a broken compose
/// file is bad input (exit 2) with Compose's own words.
#[test]
fn config_check_validates_the_compose_files() {
    let Some(stack) = Stack::new("") else { return };
    stack.ctx.run(&["config", "check", "--to", "2.0.0"]).success();
    stack.ctx.write("compose.yaml", &COMPOSE_FILE.replace("    init: true", "    init: maybe"));
    stack
        .ctx
        .run(&["config", "check", "--to", "2.0.0"])
        .code(2)
        .stderr_has("the compose files of api")
        .stderr_has("init");
}

/// Without Docker the Compose demo says what is missing, and writes nothing.
#[test]
fn the_compose_demo_says_what_is_missing_without_docker() {
    let ctx = Context::new();
    let run = Run::from(
        &ctx.command().args(["demo", "--compose", "--dir", "demo"]).env("PATH", "/nonexistent").output().unwrap(),
    );
    run.code(1).stderr_has("needs a running Docker Engine").stderr_has("no docker command");
    assert!(!ctx.join("demo/upshift.toml").exists());
}

#[test]
fn compose_settings_are_checked_with_their_line() {
    let ctx = Context::new();
    let manifest = |extra: &str| {
        format!(
            "[app]\nname = \"x\"\n\n[[components]]\nname = \"api\"\ndriver = \"compose\"\nservice = \"api\"\n{extra}\n\n[[releases]]\nversion = \"1.0.0\"\n"
        )
    };
    ctx.write("upshift.toml", &manifest("image = \"a:{version}\"\nversion_env = \"V\""));
    ctx.run(&["plan", "--to", "1.0.0"]).code(2).stderr_has("upshift.toml:9").stderr_has("not both or neither");
    ctx.write("upshift.toml", &manifest(""));
    ctx.run(&["plan", "--to", "1.0.0"]).code(2).stderr_has("upshift.toml:5").stderr_has("set `image");
    ctx.write("upshift.toml", &manifest("image = \"a:{version}\"\nstrategy = \"blue-green\"\nserve = \"127.0.0.1:1\""));
    ctx.run(&["plan", "--to", "1.0.0"]).code(2).stderr_has("needs `serve`").stderr_has("and `port`");
    ctx.write("upshift.toml", &manifest("image = \"a:{version}\"\nhealth = { http = \"/health\" }"));
    ctx.run(&["plan", "--to", "1.0.0"]).code(2).stderr_has("needs an address (`port`");
    ctx.write("upshift.toml", &manifest("version_env = \"1X\""));
    ctx.run(&["plan", "--to", "1.0.0"]).code(2).stderr_has("upshift.toml:8").stderr_has("not a variable name");
    ctx.write("upshift.toml", &manifest("image = \"a:{version}\"\nrun = [\"x\"]"));
    ctx.run(&["plan", "--to", "1.0.0"]).code(2).stderr_has("`run` is a setting of the process driver");
    let via = "[database]\nurl = \"sqlite:x.db\"\nvia = { compose = \"db\" }\n\n";
    ctx.write("upshift.toml", &format!("{via}{}", manifest("image = \"a:{version}\"")));
    ctx.run(&["plan", "--to", "1.0.0"]).code(2).stderr_has("upshift.toml:3").stderr_has("needs a PostgreSQL URL");
    ctx.write("upshift.toml", &manifest("image = \"a:{version}\"\nport = 8080"));
    // No database and no saved paths: nothing to back up, and the plan says so.
    ctx.run(&["plan", "--to", "1.0.0"]).success().stdout_has("deploy api").stdout_has("backup skipped: no database");
}
