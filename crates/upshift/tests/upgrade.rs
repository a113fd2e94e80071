//! `upshift upgrade`, `status`, `history`, `rollback`, `resume` and `abort` through the real
//! binary: the agent supervises the real notes service (a link to this binary named
//! `notes`), against real SQLite files and the real throwaway PostgreSQL.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Stdio;
use std::time::Duration;

use common::{Context, Run};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Status {
    version: Option<String>,
    revision: Option<i64>,
    run: Option<StatusRun>,
    components: Vec<Component>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusRun {
    id: String,
    target: String,
    state: String,
    step: Option<i64>,
    #[serde(default)]
    watching_until: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Component {
    name: String,
    healthy: bool,
    problem: Option<String>,
    version: Option<String>,
    instances: Vec<Instance>,
    versions: Vec<VersionFigures>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionFigures {
    version: String,
    share: f64,
    window: Window,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Window {
    seconds: f64,
    requests: u64,
    errors: u64,
    p99_ms: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Instance {
    version: String,
    slot: String,
    addr: Option<String>,
    pid: Option<u32>,
    running: bool,
    restarts: u32,
    serving: bool,
    weight: Option<u32>,
    requests: Option<u64>,
    errors: Option<u64>,
    p99_ms: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Release {
    revision: i64,
    version: String,
    status: String,
    started_at: String,
    finished_at: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunResult {
    outcome: String,
    revision: Option<i64>,
    undo: Option<String>,
    why: Option<String>,
    failure: Option<String>,
}

/// The notes application deployed from a temp folder; its agent is stopped on drop.
struct App {
    ctx: Context,
    postgres: Option<String>,
    /// The cluster of `postgres` (the plain one, or the TLS-only one).
    cluster: Option<&'static upshift_testing::PgCluster>,
    /// The database URL, given to every command as `NOTES_DB` (the manifest says
    /// `${NOTES_DB}`, so it counts as a secret).
    url: String,
}

impl Drop for App {
    fn drop(&mut self) {
        // The state dir is named, so a test that broke the manifest still stops its agent.
        let _ = self.command().args(["agent", "stop", "--state-dir", ".upshift"]).output();
    }
}

impl App {
    fn sqlite() -> App {
        App::new("sqlite:notes.db", None)
    }

    fn postgres() -> App {
        // A password the test cluster ignores (it trusts every login) but nothing may print.
        let url = upshift_testing::fresh_database().replace("postgres@", "postgres:n0t-in-the-journal@");
        let name = upshift_testing::database_name(&url).to_owned();
        App::new(&url, Some(name))
    }

    /// PostgreSQL over TLS with `sslmode=verify-full`: upshift, `pg_dump`/`pg_restore` and the
    /// notes service itself all connect that way.
    fn postgres_tls() -> App {
        let tls = upshift_testing::tls_postgres();
        let name = tls.create_database();
        let url = tls
            .url("localhost", &name, &format!("sslmode=verify-full&sslrootcert={}", tls.ca.display()))
            .replace("postgres@", "postgres:n0t-in-the-journal@");
        let mut app = App::new(&url, Some(name));
        app.cluster = Some(&tls.cluster);
        app
    }

    fn new(url: &str, postgres: Option<String>) -> App {
        let ctx = Context::new();
        for version in ["1.0.0", "2.0.0", "3.0.0"] {
            let folder = ctx.join(&format!("releases/{version}"));
            std::fs::create_dir_all(&folder).unwrap();
            std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_upshift"), folder.join("notes")).unwrap();
        }
        for (name, text) in notes::MIGRATIONS {
            ctx.write(&format!("migrations/{name}"), text);
        }
        ctx.write(
            "upshift.toml",
            r#"[app]
name = "notes"

[database]
url = "${NOTES_DB}"

[backup]
keep_last = 10

[[components]]
name = "api"
driver = "process"
run = ["releases/{version}/notes", "--release", "{version}", "--listen", "{addr}"]
env = { DATABASE_URL = "${NOTES_DB}" }
health = { http = "/health", interval = "100ms", healthy_after = 2, deadline = "10s" }
drain = "2s"

[verify]
smoke = [["sh", "-c", "test ! -e fail-smoke-{version} && sleep $(cat slow-smoke 2>/dev/null || echo 0)"]]

[[releases]]
version = "1.0.0"
migrate_to = "20260101000000"

[[releases]]
version = "2.0.0"
upgrade_from = ">=1.0.0"
migrate_to = "20260202000000"

[[releases]]
version = "3.0.0"
upgrade_from = ">=2.0.0"
migrate_to = "20260202000000"
"#,
        );
        let cluster = postgres.as_ref().map(|_| upshift_testing::postgres());
        App { ctx, postgres, cluster, url: url.to_owned() }
    }

    /// The notes application behind the agent's proxy on a free port, with `strategy` and
    /// `instances`; returns the app and the proxy's address.
    fn behind_proxy(strategy: &str, instances: usize) -> (App, String) {
        let app = App::sqlite();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let serve = format!("127.0.0.1:{port}");
        let settings =
            format!("drain = \"5s\"\nserve = \"{serve}\"\nstrategy = \"{strategy}\"\ninstances = {instances}");
        let manifest = app.ctx.read("upshift.toml").replace("drain = \"2s\"", &settings);
        app.ctx.write("upshift.toml", &manifest);
        (app, serve)
    }

    fn command(&self) -> std::process::Command {
        let mut command = self.ctx.command();
        command.env("NOTES_DB", &self.url);
        command
    }

    fn run(&self, args: &[&str]) -> Run {
        Run::from(&self.command().args(args).output().unwrap())
    }

    fn upgrade(&self, version: &str) -> Run {
        self.run(&["upgrade", "--to", version, "--output", "json"])
    }

    fn status(&self) -> Status {
        self.run(&["status", "--output", "json"]).success().json()
    }

    /// Waits (up to a minute) until the app's folder holds `name` (a mark a smoke command
    /// leaves once the verify passed).
    fn wait_for_file(&self, name: &str) {
        let deadline = std::time::Instant::now() + Duration::from_mins(1);
        while !self.ctx.join(name).exists() {
            assert!(std::time::Instant::now() < deadline, "{name} never appeared: the verify never passed");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (up to a minute) until the run in flight is at `step`.
    fn wait_for_step(&self, step: i64) {
        let deadline = std::time::Instant::now() + Duration::from_mins(1);
        loop {
            let status = self.status();
            if status.run.as_ref().and_then(|r| r.step) == Some(step) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "the run never reached step {step}: {status:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn history(&self) -> Vec<(i64, String, String)> {
        let releases: Vec<Release> = self.run(&["history", "--output", "json"]).success().json();
        releases.into_iter().map(|r| (r.revision, r.version, r.status)).collect()
    }

    /// The address the agent gave the api.
    fn address(&self) -> String {
        self.address_now().expect("the agent runs an api")
    }

    /// The address the agent gave the api, if one runs (a crash in a downtime leaves none).
    fn address_now(&self) -> Option<String> {
        let saved: serde_json::Value = serde_json::from_str(&self.ctx.read(".upshift/agent.json")).unwrap();
        Some(saved.as_array()?.iter().find(|s| s["component"] == "api")?["addr"].as_str()?.to_owned())
    }

    /// One HTTP request to the running api: (status, body).
    fn http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(self.address()).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
    }

    /// The agent's pid.
    fn agent_pid(&self) -> u32 {
        let mut agent = upshift_agent::Client::connect(&self.ctx.join(".upshift")).unwrap();
        let upshift_agent::Response::Status { pid, .. } = agent.request(&upshift_agent::Request::Status).unwrap()
        else {
            panic!("the agent did not answer its status")
        };
        pid
    }

    /// kill -9 of the agent, waiting until its socket no longer answers.
    fn kill_agent(&self) {
        let pid = self.agent_pid();
        assert!(std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
        let state = self.ctx.join(".upshift");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while upshift_agent::Client::connect(&state)
            .and_then(|mut c| c.request(&upshift_agent::Request::Status))
            .is_ok()
        {
            assert!(std::time::Instant::now() < deadline, "the agent survived kill -9");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether a log of the api's processes has `needle`.
    fn logged(&self, needle: &str) -> bool {
        std::fs::read_dir(self.ctx.join(".upshift/logs")).is_ok_and(|entries| {
            entries.flatten().any(|e| std::fs::read_to_string(e.path()).is_ok_and(|text| text.contains(needle)))
        })
    }

    /// Writes a note if the api answers now (it may be between two versions).
    fn try_note(&self, body: &str) -> bool {
        let Some(address) = self.address_now() else { return false };
        let Ok(mut stream) = TcpStream::connect(address) else { return false };
        let payload = format!(r#"{{"title": "t", "body": "{body}"}}"#);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let request = format!(
            "POST /api/notes HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
            payload.len()
        );
        let mut response = String::new();
        stream.write_all(request.as_bytes()).is_ok()
            && stream.read_to_string(&mut response).is_ok()
            && response.starts_with("HTTP/1.1 201")
    }

    fn count(&self, sql: &str) -> i64 {
        match &self.postgres {
            Some(name) => self.cluster.expect("a cluster").connect(name).query_one(sql, &[]).unwrap().get(0),
            None => {
                rusqlite::Connection::open(self.ctx.join("notes.db")).unwrap().query_row(sql, [], |r| r.get(0)).unwrap()
            }
        }
    }

    fn has_table(&self, table: &str) -> bool {
        let sql = if self.postgres.is_some() {
            format!("SELECT count(*) FROM information_schema.tables WHERE table_name = '{table}'")
        } else {
            format!("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '{table}'")
        };
        self.count(&sql) == 1
    }

    fn has_title(&self) -> bool {
        let sql = if self.postgres.is_some() {
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'notes' AND column_name = 'title'"
        } else {
            "SELECT count(*) FROM pragma_table_info('notes') WHERE name = 'title'"
        };
        self.count(sql) == 1
    }

    /// 1.0.0 deployed, with one note written through it.
    fn at_one(&self) {
        let outcome: RunResult = self.upgrade("1.0.0").success().json();
        assert_eq!(outcome.outcome, "succeeded");
        let (status, _) = self.http("POST", "/api/notes", r#"{"title": "first", "body": "kept across everything"}"#);
        assert_eq!(status, 201);
    }

    /// The state of 1.0.0: its schema, its note, its code serving and healthy.
    fn assert_at_one(&self) {
        assert!(self.has_title() && !self.has_table("tags"), "the schema is not 1.0.0's");
        assert_eq!(self.count("SELECT count(*) FROM notes"), 1);
        let status = self.status();
        assert_eq!(status.version.as_deref(), Some("1.0.0"));
        assert!(status.run.is_none(), "{status:?}");
        assert_eq!(status.components[0].version.as_deref(), Some("1.0.0"));
        assert!(status.components[0].healthy);
        let (code, body) = self.http("GET", "/api/notes", "");
        assert_eq!(code, 200);
        assert!(body.contains("kept across everything"), "{body}");
    }

    /// The state of 2.0.0: expand and contract ran, the note is there, 2.0.0 serves it.
    fn assert_at_two(&self) {
        assert!(!self.has_title() && self.has_table("tags"), "the schema is not 2.0.0's");
        assert_eq!(self.count("SELECT count(*) FROM notes"), 1);
        let status = self.status();
        assert_eq!(status.version.as_deref(), Some("2.0.0"));
        assert!(status.run.is_none(), "{status:?}");
        assert_eq!(status.components[0].version.as_deref(), Some("2.0.0"));
        assert!(status.components[0].healthy);
        let (code, body) = self.http("GET", "/api/notes", "");
        assert_eq!(code, 200);
        assert!(body.contains("\"tags\""), "{body}");
    }
}

fn upgrade_path(app: &App) {
    app.at_one();
    let status = app.status();
    assert_eq!((status.revision, status.components[0].name.as_str()), (Some(1), "api"));

    let outcome: RunResult = app.upgrade("2.0.0").success().json();
    assert_eq!((outcome.outcome.as_str(), outcome.revision), ("succeeded", Some(2)));
    app.assert_at_two();

    // 3.0.0's health check fails after start: code only, 2.0.0 serves again.
    let run = app.upgrade("3.0.0");
    let outcome: RunResult = run.code(3).json();
    assert_eq!(outcome.undo.as_deref(), Some("code"));
    assert!(outcome.failure.unwrap().contains("not healthy"));
    assert!(outcome.why.is_some());
    app.assert_at_two();
    assert_eq!(
        app.history(),
        [
            (1, "1.0.0".into(), "superseded".into()),
            (2, "2.0.0".into(), "deployed".into()),
            (3, "3.0.0".into(), "failed".into())
        ]
    );
    let releases: Vec<Release> = app.run(&["history", "--output", "json"]).success().json();
    assert!(releases.iter().all(|r| !r.started_at.is_empty() && r.finished_at.is_some()));
}

#[test]
fn sqlite_first_deploy_upgrade_and_a_failed_health_check_undone_in_code() {
    upgrade_path(&App::sqlite());
}

#[test]
fn postgres_first_deploy_upgrade_and_a_failed_health_check_undone_in_code() {
    let app = App::postgres();
    upgrade_path(&app);
    // The password came from ${NOTES_DB}: it is in no output and not in the journal; the
    // agent's saved state, which must hold it to restart the service, is owner-only.
    let journal = std::fs::read(app.ctx.join(".upshift/journal.db")).unwrap();
    assert!(!String::from_utf8_lossy(&journal).contains("n0t-in-the-journal"), "the journal holds the password");
    let plan = app.run(&["plan", "--to", "3.0.0"]);
    assert!(!plan.stdout.contains("n0t-in-the-journal") && !plan.stderr.contains("n0t-in-the-journal"));
    let mode = |path: &std::path::Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path).unwrap().permissions()) & 0o777
    };
    assert_eq!(mode(&app.ctx.join(".upshift/agent.json")), 0o600);
    // Every file upshift wrote: the password nowhere but in agent.json; the state dir and
    // everything in it owner-only.
    let mut stack = vec![app.ctx.path().to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.starts_with(app.ctx.join(".upshift")) {
                    assert_eq!(mode(&path), 0o700, "{}", path.display());
                }
                stack.push(path);
                continue;
            }
            if path.ends_with("agent.json") || path.is_symlink() {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&bytes).contains("n0t-in-the-journal"),
                "{} holds the password",
                path.display()
            );
            let private = path.starts_with(app.ctx.join(".upshift"))
                && !path.extension().is_some_and(|e| e == "sock" || e == "lock");
            if private {
                assert_eq!(mode(&path) & 0o077, 0, "{} is readable by others", path.display());
            }
        }
    }
    // And no process's command line shows it (the service gets it by environment).
    let ps = std::process::Command::new("ps").args(["-eo", "args"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&ps.stdout).contains("n0t-in-the-journal"), "ps shows the password");
}

/// `[verify] watch`: a release that breaks after its verify passed, during the watch, is
/// undone (the runbooks' "monitor for 30 minutes, roll back if it degrades").
#[test]
fn a_release_that_breaks_during_the_watch_is_undone() {
    let app = App::sqlite();
    let manifest = app.ctx.read("upshift.toml");
    // The smoke command leaves a mark, so the test knows the watch has begun.
    let smoke = manifest.lines().find(|l| l.starts_with("smoke = ")).unwrap().to_owned();
    let watched = manifest.replace(
        &smoke,
        "smoke = [[\"touch\", \"smoke-passed-{version}\"]]\nwatch = \"60s\"\nwatch_interval = \"100ms\"",
    );
    assert_ne!(watched, manifest);
    app.at_one();
    app.ctx.write("upshift.toml", &watched);
    let run =
        app.command().args(["upgrade", "--to", "2.0.0"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    app.wait_for_file("smoke-passed-2.0.0");
    // 2.0.0 serves and passed its checks; now it hangs (SIGSTOP): its health check times out.
    let instance = app.status().components[0].instances.iter().find(|i| i.version == "2.0.0").and_then(|i| i.pid);
    let pid = instance.expect("2.0.0 runs").to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let output = run.wait_with_output().unwrap();
    let _ = std::process::Command::new("kill").args(["-CONT", &pid]).status();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("watch: api became unhealthy"), "{stderr}");
    app.assert_at_one();
}

/// `[database] min_server` is checked against the server's real version before anything
/// runs (it was only printed in the guide).
#[test]
fn a_server_older_than_min_server_is_refused_in_preflight() {
    let app = App::postgres();
    let manifest = app.ctx.read("upshift.toml");
    let with = |minimum: &str| {
        manifest.replace("url = \"${NOTES_DB}\"\n", &format!("url = \"${{NOTES_DB}}\"\nmin_server = \"{minimum}\"\n"))
    };
    app.ctx.write("upshift.toml", &with("99"));
    app.upgrade("1.0.0").code(1).stderr_has("older than [database] min_server 99");
    assert!(
        !app.ctx.join(".upshift/backups").exists()
            || std::fs::read_dir(app.ctx.join(".upshift/backups")).unwrap().count() == 0
    );
    app.ctx.write("upshift.toml", &with("9.6"));
    app.upgrade("1.0.0").success();
}

#[test]
fn postgres_over_verify_full_tls_upgrades_and_undoes() {
    upgrade_path(&App::postgres_tls());
}

#[test]
fn failed_verify_after_reversible_expand_is_undone_with_down() {
    let app = App::sqlite();
    app.at_one();
    app.ctx.write("fail-smoke-2.0.0", "");
    let outcome: RunResult = app.upgrade("2.0.0").code(3).json();
    assert_eq!(outcome.undo.as_deref(), Some("code-and-down"));
    assert!(outcome.failure.unwrap().contains("smoke"));
    app.assert_at_one();
    assert_eq!(app.history(), [(1, "1.0.0".into(), "deployed".into()), (2, "2.0.0".into(), "failed".into())]);
}

fn irreversible_expand_is_undone_by_restore(app: &App) {
    app.at_one();
    // The expand revision of 2.0.0 without its down section: only the backup can undo it.
    let (_, add_tags) = notes::MIGRATIONS.iter().find(|(name, _)| name.contains("add_tags")).unwrap();
    let up_only = add_tags.split("-- upshift:down").next().unwrap();
    app.ctx.write("migrations/20260201000000_add_tags.sql", up_only);
    app.ctx.write("fail-smoke-2.0.0", "");
    let outcome: RunResult = app.upgrade("2.0.0").code(3).json();
    assert_eq!(outcome.undo.as_deref(), Some("restore"));
    app.assert_at_one();
    // The restored database no longer records the expand revision.
    assert_eq!(app.count("SELECT count(*) FROM upshift_migrations"), 1);
}

#[test]
fn sqlite_irreversible_expand_is_undone_by_restore() {
    irreversible_expand_is_undone_by_restore(&App::sqlite());
}

#[test]
fn postgres_irreversible_expand_is_undone_by_restore() {
    irreversible_expand_is_undone_by_restore(&App::postgres());
}

#[test]
fn rollback_to_the_previous_release_and_to_a_revision() {
    let app = App::sqlite();
    app.at_one();
    app.upgrade("2.0.0").success();
    // 2.0.0 ran a contract revision: its rollback restores the backup taken before it.
    let outcome: RunResult = app.run(&["rollback", "--output", "json"]).success().json();
    assert_eq!(outcome.revision, Some(3));
    app.assert_at_one();
    assert_eq!(
        app.history(),
        [
            (1, "1.0.0".into(), "superseded".into()),
            (2, "2.0.0".into(), "rolled-back".into()),
            (3, "1.0.0".into(), "deployed".into())
        ]
    );
    app.run(&["rollback", "--to-revision", "7"]).code(2).stderr_has("revision 7 does not exist");
    app.upgrade("2.0.0").success();
    app.run(&["rollback", "--to-revision", "3"]).success();
    app.assert_at_one();
}

/// Regression: a second `rollback` once "undid" the rollback row (which copied 1.0.0's
/// data), stopped the service and reverted `create_notes`: the note was gone.
#[test]
fn a_second_rollback_is_refused_and_the_data_stays() {
    let app = App::sqlite();
    app.at_one();
    app.upgrade("2.0.0").success();
    app.run(&["rollback"]).success();
    app.assert_at_one();
    app.run(&["rollback"]).code(2).stderr_has("no earlier release to roll back to");
    app.assert_at_one();
    assert_eq!(app.history().last().unwrap(), &(3, "1.0.0".into(), "deployed".into()));
}

/// On a terminal, `upgrade` and `rollback` show what they will do before asking: the plan
/// with each step's undo; the backup to restore, its age, and that later data is lost.
/// Answering no changes nothing.
#[test]
fn prompts_show_what_is_about_to_happen() {
    let app = App::sqlite();
    app.at_one();
    let on_a_terminal = |args: &str, answer: &str| {
        // `script` gives the command a terminal; the answer is typed into it.
        let line = format!("{} {args}", env!("CARGO_BIN_EXE_upshift"));
        let mut command = std::process::Command::new("script");
        command
            .args(["-qec", &line, "/dev/null"])
            .current_dir(app.ctx.path())
            .env("NOTES_DB", &app.url)
            .env("NO_COLOR", "1");
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut running = command.spawn().unwrap();
        running.stdin.take().unwrap().write_all(answer.as_bytes()).unwrap();
        let output = running.wait_with_output().unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let shown = on_a_terminal("upgrade --to 2.0.0", "n\n");
    assert!(
        shown.contains("Upgrade 1.0.0 to 2.0.0:")
            && shown.contains("4. deploy api (process, recreate)  (on failure: code-and-down)"),
        "{shown}"
    );
    assert!(shown.contains("Upgrade to 2.0.0? [y/N]") && shown.contains("cancelled; nothing was done"), "{shown}");
    app.assert_at_one();
    app.upgrade("2.0.0").success();
    let shown = on_a_terminal("rollback", "n\n");
    assert!(shown.contains("Roll back from 2.0.0 (revision 2) to 1.0.0 (revision 1)"), "{shown}");
    assert!(shown.contains("restore backup") && shown.contains("since then is lost"), "{shown}");
    assert!(shown.contains("Roll back? [y/N]"), "{shown}");
    app.assert_at_two();
}

/// What must hold for a deploy is checked before the backup and the migrations: a serve
/// address another process holds, a release whose program is missing, and too little disk
/// for the backup each stop the upgrade with nothing changed.
#[test]
fn preflight_checks_what_would_fail_later() {
    let (app, serve) = App::behind_proxy("blue-green", 1);
    let backups = || std::fs::read_dir(app.ctx.join(".upshift/backups")).map_or(0, Iterator::count);
    // The serve address is taken.
    let squatter = std::net::TcpListener::bind(&serve).unwrap();
    app.upgrade("1.0.0").code(1).stderr_has(&format!("its serve address {serve} is taken by another process"));
    assert_eq!(backups(), 0);
    assert!(!app.ctx.join("notes.db").exists() || !app.has_table("notes"), "a migration ran");
    drop(squatter);
    app.at_one();
    let before = backups();
    // The release's program is missing.
    std::fs::remove_file(app.ctx.join("releases/2.0.0/notes")).unwrap();
    app.upgrade("2.0.0").code(1).stderr_has("its program releases/2.0.0/notes is not there");
    assert_eq!(backups(), before, "a backup was taken");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_upshift"), app.ctx.join("releases/2.0.0/notes")).unwrap();
    // Too little disk for the backup: a saved path holding a (sparse) 8 TiB file.
    std::fs::create_dir_all(app.ctx.join("big")).unwrap();
    std::fs::File::create(app.ctx.join("big/sparse")).unwrap().set_len(1 << 43).unwrap();
    let manifest = app.ctx.read("upshift.toml");
    app.ctx.write("upshift.toml", &manifest.replace("[backup]\n", "[backup]\npaths = [\"big\"]\n"));
    app.upgrade("2.0.0").code(1).stderr_has("the backup may need").stderr_has("MiB free");
    assert_eq!(backups(), before);
    app.ctx.write("upshift.toml", &manifest);
    app.assert_at_one();
}

/// Regression: a rollback whose backup was missing or damaged stopped the service first,
/// then failed (exit 4), and `abort` then said "nothing was changed" over a dead proxy.
#[test]
fn a_rollback_with_a_missing_or_damaged_backup_touches_nothing() {
    let app = App::sqlite();
    app.at_one();
    app.upgrade("2.0.0").success();
    let backups = app.ctx.join(".upshift/backups");
    // The backup taken before 2.0.0, which the rollback restores, as the journal names it.
    let journal = rusqlite::Connection::open(app.ctx.join(".upshift/journal.db")).unwrap();
    let id: String =
        journal.query_row("SELECT backup_id FROM releases WHERE status = 'deployed'", [], |r| r.get(0)).unwrap();
    let backup = backups.join(id);
    let aside = app.ctx.join("aside");
    std::fs::rename(&backup, &aside).unwrap();
    app.run(&["rollback"]).code(1).stderr_has("cannot be restored").stderr_has("nothing was changed");
    app.assert_at_two();
    // Damaged: one byte of the dump changed.
    std::fs::rename(&aside, &backup).unwrap();
    let dump = std::fs::read_dir(backup.join("db")).unwrap().flatten().next().unwrap().path();
    let mut bytes = std::fs::read(&dump).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&dump, bytes).unwrap();
    app.run(&["rollback"]).code(1).stderr_has("cannot be restored");
    app.assert_at_two();
    app.run(&["abort"]).code(1).stderr_has("nothing is in flight");
}

/// An unhealthy component says why, in JSON and for people.
#[test]
fn status_says_why_a_component_is_not_healthy() {
    let app = App::sqlite();
    app.at_one();
    let status = app.status();
    assert!(status.components[0].healthy && status.components[0].problem.is_none(), "{status:?}");
    app.run(&["agent", "stop"]).success();
    let status = app.status();
    let api = &status.components[0];
    assert!(!api.healthy && api.problem.as_deref().is_some_and(|p| p.contains("agent does not run")), "{api:?}");
    app.run(&["status"]).success().stdout_has("api       - NOT healthy: the agent does not run");
}

/// Regression: a journal truncated to 0 bytes read as "nothing deployed", and an upgrade to
/// 1.0.0 over the running release was taken for a first deploy.
#[test]
fn a_damaged_or_missing_journal_is_never_nothing_deployed() {
    let app = App::sqlite();
    app.at_one();
    let journal = app.ctx.join(".upshift/journal.db");
    let saved = std::fs::read(&journal).unwrap();
    std::fs::write(&journal, b"").unwrap();
    app.run(&["status"]).code(1).stderr_has("journal.db is damaged").stderr_has("empty");
    app.upgrade("2.0.0").code(1).stderr_has("is damaged");
    app.run(&["history"]).code(1).stderr_has("is damaged");
    // Gone altogether: the running 1.0.0 is not taken for nothing.
    std::fs::remove_file(&journal).unwrap();
    app.upgrade("1.0.0").code(1).stderr_has("already runs 1.0.0, but the journal records no deployed release");
    std::fs::write(&journal, saved).unwrap();
    app.assert_at_one();
}

/// Regression: `upgrade` said only "backup: could not copy the SQLite database" where the
/// cause said what to fix.
#[test]
fn a_failed_step_keeps_its_cause() {
    let app = App::sqlite();
    app.at_one();
    let manifest = app.ctx.read("upshift.toml");
    app.ctx.write("not-a-folder", "");
    app.ctx.write("upshift.toml", &manifest.replace("[backup]\n", "[backup]\ndir = \"not-a-folder/backups\"\n"));
    let outcome: RunResult = app.upgrade("2.0.0").code(1).json();
    let failure = outcome.failure.unwrap();
    assert!(failure.contains("backup") && failure.contains("Not a directory"), "{failure}");
    app.ctx.write("upshift.toml", &manifest);
    app.assert_at_one();
}

#[test]
fn a_second_run_is_refused_while_one_holds_the_lock() {
    let app = App::sqlite();
    app.at_one();
    let lock = std::fs::OpenOptions::new().write(true).open(app.ctx.join(".upshift/run.lock")).unwrap();
    lock.lock().unwrap();
    app.upgrade("2.0.0").code(1).stderr_has("another upshift run is in progress");
    drop(lock);
    app.assert_at_one();
}

#[test]
fn bad_input_is_refused_before_anything_runs() {
    let app = App::sqlite();
    app.run(&["upgrade", "--to", "9.9.9"])
        .code(2)
        .stderr_has("9.9.9 is not a release")
        .stderr_has("known releases: 1.0.0, 2.0.0, 3.0.0");
    app.at_one();
    app.run(&["upgrade", "--to", "3.0.0"]).code(2).stderr_has("upgrades from >=2.0.0");
    app.run(&["upgrade", "--to", "1.0.0"]).code(2).stderr_has("use `upshift rollback`");
    let manifest = app.ctx.read("upshift.toml");
    app.ctx.write("upshift.toml", &manifest.replace("{addr}", "{adress}"));
    app.run(&["upgrade", "--to", "2.0.0"]).code(2).stderr_has("unknown placeholder {adress}");
    app.ctx.write("upshift.toml", &manifest);
    assert_eq!(app.history().len(), 1, "a refused upgrade was recorded");
    app.assert_at_one();
}

/// Runs `upgrade --to VERSION` killed (abort, like kill -9) right after the journal's
/// `write`-th write; false when the run finished before it.
fn crash_at_write(app: &App, version: &str, write: u64) -> bool {
    let output = app
        .command()
        .args(["upgrade", "--to", version, "--output", "json"])
        .env("UPSHIFT_TEST_CRASH_AT_WRITE", write.to_string())
        .output()
        .unwrap();
    output.status.code().is_none()
}

/// After a recovery: nothing in flight, what the journal says runs is what runs, healthy,
/// with its schema; the first note always there, `extra` too unless a backup was restored.
fn assert_converged(app: &App, extra: Option<&str>, restored: bool, context: &str) -> String {
    let status = app.status();
    assert!(status.run.is_none(), "{context}: {status:?}");
    let version = status.version.clone().unwrap_or_else(|| panic!("{context}: nothing deployed"));
    assert_eq!(status.components[0].version.as_deref(), Some(version.as_str()), "{context}: {status:?}");
    assert!(status.components[0].healthy, "{context}: {status:?}");
    match version.as_str() {
        "1.0.0" => assert!(app.has_title() && !app.has_table("tags"), "{context}: not 1.0.0's schema"),
        "2.0.0" => assert!(!app.has_title() && app.has_table("tags"), "{context}: not 2.0.0's schema"),
        other => panic!("{context}: {other} deployed"),
    }
    let (code, body) = app.http("GET", "/api/notes", "");
    assert_eq!(code, 200, "{context}");
    assert!(body.contains("kept across everything"), "{context}: {body}");
    if let Some(extra) = extra.filter(|_| !restored) {
        assert!(body.contains(extra), "{context}: the note written after the crash is gone: {body}");
    }
    version
}

/// The crash-at-every-write suite on the process driver, through the real binary: the
/// upgrade 1.0.0 -> 2.0.0 (`fail_smoke`: failing its verify, so undone with down) is
/// killed after each of its journal writes in turn, then `recovery` runs; the state must
/// converge. Returns the number of crash points.
fn crash_at_every_write(app: &App, recovery: &str, fail_smoke: bool) -> u64 {
    app.at_one();
    if fail_smoke {
        app.ctx.write("fail-smoke-2.0.0", "");
    }
    let mut write = 1;
    while crash_at_write(app, "2.0.0", write) {
        let context = format!("killed at write {write}, then {recovery}");
        // `status` tells the truth about the run the kill left (none: it had finished).
        if let Some(run) = app.status().run {
            assert_eq!(run.target, "2.0.0", "{context}");
            assert!(!run.id.is_empty() && ["running", "undoing"].contains(&run.state.as_str()), "{context}: {run:?}");
        }
        let extra = format!("written after crash {write}");
        let written = app.try_note(&extra);
        let run = app.run(&[recovery, "--output", "json"]);
        let restored = if run.code == 1 && run.stderr.contains("nothing is in flight") {
            false
        } else {
            assert!([0, 3].contains(&run.code), "{context}: {recovery} exited {}: {}", run.code, run.stderr);
            run.json::<RunResult>().undo.as_deref() == Some("restore")
        };
        let version = assert_converged(app, written.then_some(extra.as_str()), restored, &context);
        // Undoing twice is a no-op.
        app.run(&["abort"]).code(1).stderr_has("nothing is in flight");
        assert_eq!(assert_converged(app, None, restored, &context), version);
        if fail_smoke {
            assert_eq!(version, "1.0.0", "{context}: a failing upgrade was resumed forward");
        }
        if version == "2.0.0" {
            app.run(&["rollback"]).success();
            assert_converged(app, None, true, &format!("{context}, then rollback"));
        }
        write += 1;
    }
    assert!(write > 10, "only {} journal writes", write - 1);
    #[allow(clippy::print_stderr)]
    {
        eprintln!("process driver, {recovery} (failing verify: {fail_smoke}): {} crash points converged", write - 1);
    }
    write - 1
}

#[test]
fn killed_at_every_journal_write_then_resumed() {
    crash_at_every_write(&App::sqlite(), "resume", false);
}

#[test]
fn killed_at_every_journal_write_then_aborted() {
    crash_at_every_write(&App::sqlite(), "abort", false);
}

#[test]
fn postgres_killed_at_every_journal_write_then_aborted() {
    crash_at_every_write(&App::postgres(), "abort", false);
}

/// `rollback` (by restore, 2.0.0 -> 1.0.0) killed after each of its journal writes, then
/// `resume` or `abort` in turn: either finishes the rollback.
#[test]
fn a_rollback_killed_at_every_journal_write_is_finished() {
    let app = App::sqlite();
    app.at_one();
    app.upgrade("2.0.0").success();
    let mut write = 1;
    loop {
        let output = app.command().args(["rollback"]).env("UPSHIFT_TEST_CRASH_AT_WRITE", write.to_string()).output();
        if output.unwrap().status.code().is_some() {
            break;
        }
        let recovery = if write % 2 == 0 { "abort" } else { "resume" };
        let context = format!("rollback killed at write {write}, then {recovery}");
        let run = app.run(&[recovery]);
        assert!(run.code == 0 || run.stderr.contains("nothing is in flight"), "{context}: {}", run.stderr);
        assert_eq!(assert_converged(&app, None, true, &context), "1.0.0");
        app.upgrade("2.0.0").success();
        write += 1;
    }
    assert!(write > 5, "only {} journal writes", write - 1);
}

/// An upgrade killed during its verify step, then `abort` killed after its 1st, 2nd, ...
/// write in turn (each abort takes the undo further), until one finishes.
#[test]
fn an_abort_killed_at_each_of_its_writes_still_converges() {
    let app = App::sqlite();
    app.at_one();
    app.ctx.write("slow-smoke", "0.5");
    // Find a write at which the run is in its verify step (5): the deploy happened.
    let mut write = 1;
    loop {
        assert!(crash_at_write(&app, "2.0.0", write), "the run finished before its verify step");
        if app.status().run.and_then(|r| r.step) == Some(5) {
            break;
        }
        app.run(&["abort"]).success();
        write += 1;
    }
    let mut abort_write = 1;
    loop {
        let output = app.command().args(["abort"]).env("UPSHIFT_TEST_CRASH_AT_WRITE", abort_write.to_string()).output();
        if output.unwrap().status.code().is_some() {
            break;
        }
        abort_write += 1;
        // None: killed right after its last write, the run is finished.
        let Some(run) = app.status().run else { break };
        assert!(["running", "undoing"].contains(&run.state.as_str()), "{run:?}");
    }
    assert!(abort_write > 3, "the abort made only {} writes", abort_write - 1);
    assert_eq!(assert_converged(&app, None, false, "aborts killed in turn"), "1.0.0");
}

/// Regression: a crash during an undo left the run `running`, and `resume` ran it forward
/// (contract migration under the old code). Every write of the failing run's undo is a
/// crash point here, and `resume` must finish the undo.
#[test]
fn killed_at_every_write_of_a_failing_upgrade_then_resumed() {
    crash_at_every_write(&App::sqlite(), "resume", true);
}

/// A real kill -9 of the whole CLI (its process group) in the middle of a run.
#[test]
fn kill_9_mid_run_then_abort() {
    let app = App::sqlite();
    app.at_one();
    app.ctx.write("slow-smoke", "30");
    let mut child = app
        .command()
        .args(["upgrade", "--to", "2.0.0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    // Wait until the run reaches its verify step, then kill it dead.
    app.wait_for_step(5);
    // A second run meanwhile is refused, naming the holder.
    app.upgrade("2.0.0").code(1).stderr_has(&format!("another upshift run is in progress (pid {}", child.id()));
    let group = i32::try_from(child.id()).unwrap();
    assert!(std::process::Command::new("kill").args(["-KILL", "--", &format!("-{group}")]).status().unwrap().success());
    assert_eq!(child.wait().unwrap().signal(), Some(9));
    std::fs::remove_file(app.ctx.join("slow-smoke")).unwrap();
    let outcome: RunResult = app.run(&["abort", "--output", "json"]).success().json();
    assert_eq!(outcome.undo.as_deref(), Some("code-and-down"));
    app.assert_at_one();
}

/// SIGTERM stops the run at the next step boundary and undoes it.
#[test]
fn sigterm_mid_run_undoes() {
    let app = App::sqlite();
    app.at_one();
    app.ctx.write("slow-smoke", "1");
    let child =
        app.command().args(["upgrade", "--to", "2.0.0"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    app.wait_for_step(5);
    std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(3), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stderr).contains("interrupted"));
    app.assert_at_one();
}

#[test]
fn the_agent_restarts_a_crashed_process_and_writes_logs() {
    let app = App::sqlite();
    app.at_one();
    let saved: serde_json::Value = serde_json::from_str(&app.ctx.read(".upshift/agent.json")).unwrap();
    assert_eq!(saved[0]["version"], "1.0.0");
    let status = app.run(&["agent", "--output", "json", "--detach"]).success().stdout.clone();
    assert!(status.contains("\"running\": true"));
    // Kill the service itself: the agent starts it again.
    let mut agent = upshift_agent::Client::connect(&app.ctx.join(".upshift")).unwrap();
    let upshift_agent::Response::Status { instances, .. } = agent.request(&upshift_agent::Request::Status).unwrap()
    else {
        panic!()
    };
    let pid = instances[0].pid.expect("the service runs");
    assert!(std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if std::net::TcpStream::connect(app.address()).is_ok() && app.status().components[0].healthy {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the agent did not restart the service");
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = app.ctx.read(".upshift/logs/api-1.0.0.log");
    assert!(log.contains("listening on"), "{log}");
    assert!(log.contains("[upshift agent] api 1.0.0 exited"), "{log}");
    let upshift_agent::Response::Status { instances, .. } = agent.request(&upshift_agent::Request::Status).unwrap()
    else {
        panic!()
    };
    assert_eq!(instances[0].restarts, 1);
    assert_ne!(instances[0].pid, Some(pid));
    app.run(&["agent", "stop"]).success();
    assert!(!app.status().components[0].healthy);
    // The agent's own log: leveled lines with the component as a field.
    let agent_log = app.ctx.read(".upshift/logs/agent.log");
    for needle in
        [" INFO ", "started component=api version=1.0.0", " WARN ", "exited on its own; restarting", "shutting down"]
    {
        assert!(agent_log.contains(needle), "no {needle:?} in the agent's log:\n{agent_log}");
    }
    // A start made by a run carries the run's id.
    assert!(
        agent_log.lines().any(|l| l.contains("started component=api")
            && l.contains("request{run=")
            && !l.contains("request{run=-}")),
        "no run id on the start:\n{agent_log}"
    );
}

const GET_NOTES: &str = "GET /api/notes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// Sends one raw HTTP request to `addr` and reads the whole response (the request asks the
/// server to close), waiting up to `timeout_secs` for it.
fn exchange(addr: &str, request: &str, timeout_secs: u64) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(timeout_secs)))?;
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// Four clients through the proxy at `serve` while `work` runs, counting every response,
/// plus one 1.5 s request in flight from the start. Returns (sent, failed, first failures,
/// the slow request's response).
fn under_load(app: &App, serve: &str, work: impl FnOnce()) -> (u64, u64, Vec<String>, String) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let load: Vec<_> = (0..4)
        .map(|client| {
            let (serve, stop, sent, failed, failures) = (serve.to_owned(), stop.clone(), sent.clone(), failed.clone(), failures.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let request = if n.is_multiple_of(7) {
                        let body = format!(r#"{{"title": "t", "body": "load {client} {n}", "tags": ["x"]}}"#);
                        format!("POST /api/notes HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
                    } else {
                        GET_NOTES.to_owned()
                    };
                    let result = exchange(&serve, &request, 30);
                    sent.fetch_add(1, Ordering::SeqCst);
                    if !result.as_ref().is_ok_and(|r| r.starts_with("HTTP/1.1 2")) {
                        failed.fetch_add(1, Ordering::SeqCst);
                        failures.lock().unwrap().push(format!("{:?}", result.map(|r| r.lines().next().unwrap_or("").to_owned())));
                    }
                }
            })
        })
        .collect();
    let slow = {
        let serve = serve.to_owned();
        std::thread::spawn(move || {
            exchange(&serve, "GET /slow?ms=1500 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 30).unwrap()
        })
    };
    // The slow request is in flight at an upstream before the switch starts.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !app.logged("slow request sleeping 1500 ms") {
        assert!(std::time::Instant::now() < deadline, "the slow request never reached an upstream");
        std::thread::sleep(Duration::from_millis(5));
    }
    work();
    stop.store(true, Ordering::SeqCst);
    for thread in load {
        thread.join().unwrap();
    }
    let slow = slow.join().unwrap();
    let first: Vec<String> = failures.lock().unwrap().iter().take(5).cloned().collect();
    (sent.load(Ordering::SeqCst), failed.load(Ordering::SeqCst), first, slow)
}

/// Steady load through the proxy while releases switch: not one request fails, and a long
/// request in flight across the switch completes.
fn switches_lose_no_request(app: &App, serve: &str, instances: usize) {
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let manifest = app.ctx.read("upshift.toml") + &format!("\n[agent]\nmetrics = \"{metrics}\"\n");
    app.ctx.write("upshift.toml", &manifest);
    app.upgrade("1.0.0").success();
    let (sent, failed, failures, slow) = under_load(app, serve, || {
        app.upgrade("2.0.0").success();
        // 3.0.0 never becomes healthy: it gets no request, and 2.0.0 keeps serving.
        app.upgrade("3.0.0").code(3);
    });
    assert!(slow.starts_with("HTTP/1.1 200") && slow.contains("slept_ms"), "{slow}");
    assert!(sent > 100, "the load hardly ran: {sent}");
    assert_eq!(failed, 0, "{failed} of {sent} requests failed: {failures:?}");
    // 2.0.0 serves, alone, with the schema after its contract; the writes under load are kept,
    // and the proxy counted what it sent to each instance.
    let status = app.status();
    let serving: Vec<&Instance> = status.components[0].instances.iter().filter(|i| i.serving).collect();
    assert_eq!(serving.len(), instances, "{status:?}");
    assert!(serving.iter().all(|i| i.version == "2.0.0"
        && i.running
        && i.pid.is_some()
        && i.addr.is_some()
        && i.restarts == 0));
    assert!(
        serving.iter().all(|i| i.requests.unwrap_or(0) > 0 && i.errors == Some(0) && i.p99_ms.is_some()),
        "{serving:?}"
    );
    assert!(serving.iter().all(|i| i.slot.starts_with("2.0.0") || ["blue", "green"].contains(&i.slot.as_str())));
    assert_eq!((status.version.as_deref(), status.components[0].version.as_deref()), (Some("2.0.0"), Some("2.0.0")));
    assert!(status.components[0].healthy);
    assert!(!app.has_title() && app.has_table("tags"));
    assert!(app.count("SELECT count(*) FROM notes") > 1);
    let saved: serde_json::Value = serde_json::from_str(&app.ctx.read(".upshift/agent.json")).unwrap();
    let running: Vec<&serde_json::Value> = saved.as_array().unwrap().iter().collect();
    assert_eq!(running.len(), instances, "old instances still run: {saved}");
    assert!(running.iter().all(|s| s["version"] == "2.0.0"), "{saved}");
    // The same figures for Prometheus, on the loopback address the manifest named.
    let scraped = exchange(&metrics, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 30).unwrap();
    assert!(scraped.starts_with("HTTP/1.1 200") && scraped.contains("text/plain; version=0.0.4"), "{scraped}");
    let served =
        scraped.lines().filter(|l| l.starts_with("upshift_proxy_requests_total{component=\"api\",version=\"2.0.0\""));
    assert_eq!(served.count(), instances, "{scraped}");
    assert!(scraped.contains("upshift_instance_up{component=\"api\","), "{scraped}");
}

#[test]
fn blue_green_switches_lose_no_request() {
    let (app, serve) = App::behind_proxy("blue-green", 1);
    switches_lose_no_request(&app, &serve, 1);
}

#[test]
fn rolling_switches_lose_no_request() {
    let (app, serve) = App::behind_proxy("rolling", 2);
    switches_lose_no_request(&app, &serve, 2);
}

/// Regression: idle and slow clients on a serve port, past the agent's descriptor limit,
/// made `accept` fail with EMFILE and the agent exit. Now its connection cap (half its
/// descriptor limit) closes the oldest idle connection to let a new one in: with twice the
/// cap of hostile connections open, every well-behaved request is answered, the admin
/// socket answers, and the agent lives.
#[test]
fn idle_and_slow_clients_cannot_knock_the_agent_over() {
    let (app, serve) = App::behind_proxy("blue-green", 1);
    app.upgrade("1.0.0").success();
    let pid = app.agent_pid();
    let limit = 200;
    let limited = std::process::Command::new("prlimit")
        .args([&format!("--pid={pid}"), &format!("--nofile={limit}:{limit}")])
        .status()
        .unwrap();
    assert!(limited.success(), "prlimit (util-linux) failed");
    let cap = (limit - 64) / 2;
    let mut hostile = Vec::new();
    for i in 0..2 * cap {
        let mut stream = TcpStream::connect(&serve).unwrap();
        match i % 3 {
            // Idle: connected, nothing sent.
            0 => {}
            // A request head that never ends.
            1 => stream.write_all(b"GET /api/notes HTTP/1.1\r\nHost: x\r\n").unwrap(),
            // A body that never comes.
            _ => stream.write_all(b"POST /api/notes HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{").unwrap(),
        }
        hostile.push(stream);
    }
    for i in 0..40 {
        let answer = exchange(&serve, GET_NOTES, 10);
        assert!(answer.as_ref().is_ok_and(|r| r.starts_with("HTTP/1.1 200")), "request {i}: {answer:?}");
    }
    let status = app.status();
    assert!(status.components[0].healthy, "{status:?}");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "the agent died");
    drop(hostile);
}

/// Regression: a component started through a shebang script (its command line starts with
/// the interpreter, not the script) was not adopted after an agent restart: a second copy
/// crash-looped on the taken port, and `agent stop` left the first running (signals went to
/// the script's pid only). Now adoption goes by pid, start time and process group, and
/// signals go to the whole group.
#[test]
fn a_component_behind_a_shebang_script_is_adopted_and_stopped_whole() {
    let app = App::sqlite();
    app.ctx.write("run.sh", "#!/bin/sh\n# no exec: the script stays the parent of the service\nreleases/$1/notes --release $1 --listen $2\n");
    std::fs::set_permissions(app.ctx.join("run.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let manifest = app.ctx.read("upshift.toml").replace(
        r#"run = ["releases/{version}/notes", "--release", "{version}", "--listen", "{addr}"]"#,
        r#"run = ["./run.sh", "{version}", "{addr}"]"#,
    );
    assert!(manifest.contains("./run.sh"));
    app.ctx.write("upshift.toml", &manifest);
    app.at_one();
    let pid = app.status().components[0].instances[0].pid.expect("it runs");
    app.kill_agent();
    app.run(&["agent", "--detach"]).success();
    let instance = &app.status().components[0].instances[0];
    assert_eq!((instance.pid, instance.restarts, instance.running), (Some(pid), 0, true), "{instance:?}");
    assert!(app.ctx.read(".upshift/logs/api-1.0.0.log").contains(&format!("adopted pid {pid}")));
    app.assert_at_one();
    // Stopped whole: the service under the script is gone too, its port closed.
    let addr = app.address();
    app.run(&["agent", "stop"]).success();
    assert!(TcpStream::connect(&addr).is_err(), "the service under the script still listens on {addr}");
}

/// Regression: kill -9 of the agent mid-upgrade left the run "undone" with no agent and
/// the service refusing requests. The driver now starts a new agent (which adopts the
/// processes and serves the routes) and goes on: the run completes or undoes, and the
/// service serves either way.
#[test]
fn an_agent_killed_mid_upgrade_is_replaced_and_the_run_ends_serving() {
    let app = App::sqlite();
    app.at_one();
    app.ctx.write("slow-smoke", "1");
    let run =
        app.command().args(["upgrade", "--to", "2.0.0"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    app.wait_for_step(4);
    app.kill_agent();
    let output = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!([Some(0), Some(3)].contains(&output.status.code()), "{stderr}");
    std::fs::remove_file(app.ctx.join("slow-smoke")).unwrap();
    let status = app.status();
    assert!(status.run.is_none() && status.components[0].healthy, "{status:?}\n{stderr}");
    assert_eq!(status.components[0].version, status.version, "{stderr}");
    let (code, body) = app.http("GET", "/api/notes", "");
    assert!(code == 200 && body.contains("kept across everything"), "{code} {body}");
}

/// Regression: logs were rotated by copy-then-truncate of a file the component wrote to
/// itself, losing what came in between. A log writer that owns the file now rotates it by
/// rename: the last two files hold the end of the output, every line whole, none missing.
#[test]
fn log_rotation_loses_no_line() {
    struct StopsAgent<'a>(&'a Context);
    impl Drop for StopsAgent<'_> {
        fn drop(&mut self) {
            let _ = self.0.run(&["agent", "stop", "--state-dir", ".upshift"]);
        }
    }
    let ctx = Context::new();
    ctx.write(
        "upshift.toml",
        "[app]\nname = \"chatty\"\n\n[[components]]\nname = \"chatty\"\ndriver = \"process\"\nrun = [\"sh\", \"-c\", \"i=0; while [ $i -lt 3000 ]; do echo line $i; i=$((i+1)); done; echo done; exec sleep 600\"]\n\n[[releases]]\nversion = \"1.0.0\"\n",
    );
    let _agent = StopsAgent(&ctx);
    let run = Run::from(
        &ctx.command()
            .args(["upgrade", "--to", "1.0.0", "--no-backup"])
            .env("UPSHIFT_LOG_LIMIT", "4096")
            .output()
            .unwrap(),
    );
    run.success();
    let log = ctx.join(".upshift/logs/chatty-1.0.0.log");
    // The last two files (a rotation may come right after the last line).
    let kept = || {
        std::fs::read_to_string(log.with_extension("log.1")).unwrap_or_default()
            + &std::fs::read_to_string(&log).unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !kept().contains("done") {
        assert!(std::time::Instant::now() < deadline, "the output never reached the log: {}", kept());
        std::thread::sleep(Duration::from_millis(10));
    }
    let kept = kept();
    let numbers: Vec<usize> =
        kept.lines().filter_map(|l| l.strip_prefix("line ")).map(|n| n.parse().unwrap()).collect();
    assert_eq!(numbers.last(), Some(&2999), "{kept}");
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "a line was lost at a rotation");
    assert!(numbers.len() > 300, "the last two files hold {} lines", numbers.len());
}

/// Regression: after kill -9 of the agent, `agent stop` said "not running" and left the
/// processes it had supervised running, unseen.
#[test]
fn agent_stop_after_the_agent_died_stops_what_it_left_running() {
    let app = App::sqlite();
    app.at_one();
    let addr = app.address();
    app.kill_agent();
    assert!(TcpStream::connect(&addr).is_ok(), "the service should outlive its agent");
    app.run(&["agent", "stop"]).success();
    assert!(TcpStream::connect(&addr).is_err(), "the orphaned service still listens on {addr}");
}

/// Regression: a garbled agent.json or routes.json was silently read as empty.
#[test]
fn a_garbled_state_file_is_reported_and_kept() {
    let app = App::sqlite();
    app.at_one();
    app.run(&["agent", "stop"]).success();
    app.ctx.write(".upshift/agent.json", "[{\"component\": \"api\", \"slot\"");
    app.ctx.write(".upshift/routes.json", "not json");
    app.run(&["agent", "--detach"]).success();
    let log = app.ctx.read(".upshift/logs/agent.log");
    assert!(log.contains("a saved state file does not parse") && log.contains("agent.json"), "{log}");
    assert!(log.contains("routes.json"), "{log}");
    assert!(
        app.ctx.join(".upshift/agent.json.damaged").exists() && app.ctx.join(".upshift/routes.json.damaged").exists()
    );
}

/// kill -9 of the agent: the next agent adopts what the dead one left running and serves
/// the saved routes on the same address.
#[test]
fn a_killed_agent_is_replaced_and_serves_its_routes_again() {
    let (app, serve) = App::behind_proxy("blue-green", 1);
    app.upgrade("1.0.0").success();
    let saved: serde_json::Value = serde_json::from_str(&app.ctx.read(".upshift/agent.json")).unwrap();
    let orphan = saved[0]["pid"].as_u64().expect("agent.json records the pid");
    let orphan_pid = u32::try_from(orphan).unwrap();
    let routes: serde_json::Value = serde_json::from_str(&app.ctx.read(".upshift/routes.json")).unwrap();
    assert_eq!(routes[0]["listen"], serve.as_str());
    // Traffic all along: (answered 200?) for each request, in order.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let load = {
        let (serve, stop, answers) = (serve.clone(), stop.clone(), answers.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let answer = exchange(&serve, GET_NOTES, 5);
                answers.lock().unwrap().push(answer.is_ok_and(|r| r.starts_with("HTTP/1.1 200")));
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let answered = || answers.lock().unwrap().len();
    let wait_for_answers = |count: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while answered() < count {
            assert!(std::time::Instant::now() < deadline, "the load got only {} answers", answered());
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for_answers(10);
    app.kill_agent();

    app.run(&["agent", "--detach"]).success();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let answer = exchange(&serve, GET_NOTES, 5);
        if answer.as_ref().is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the new agent does not serve {serve}: {answer:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The process kept running through the restart: the new agent adopted it, and no
    // second copy was started beside it.
    let status = app.status();
    assert_eq!(status.version.as_deref(), Some("1.0.0"));
    let instances = &status.components[0].instances;
    assert_eq!(instances.len(), 1, "{instances:?}");
    assert_eq!((instances[0].pid, instances[0].restarts, instances[0].serving), (Some(orphan_pid), 0, true));
    assert!(app.ctx.read(".upshift/logs/api-1.0.0.log").contains(&format!("adopted pid {orphan}")));
    wait_for_answers(answered() + 20);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    load.join().unwrap();
    let answers = answers.lock().unwrap().clone();
    // Served before the kill, and again after the new agent took over (only the moment with
    // no agent at all lost requests).
    assert!(answers.iter().take(10).all(|ok| *ok), "{answers:?}");
    assert!(answers.iter().rev().take(20).all(|ok| *ok), "{answers:?}");
    // An adopted process that dies is restarted like a child.
    assert!(std::process::Command::new("kill").args(["-KILL", &orphan.to_string()]).status().unwrap().success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let instance = &app.status().components[0].instances[0];
        if instance.running && instance.restarts == 1 && instance.pid != Some(orphan_pid) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the adopted process was not restarted: {instance:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Canary: a share of requests goes to the new version, judged on what the proxy measured.
/// Without traffic the canary does not pass; a release that fails half its requests is
/// stopped and undone; a good one passes under load without one failed request.
#[test]
fn a_canary_is_judged_on_traffic_and_a_faulty_release_is_undone() {
    let (app, serve) = App::behind_proxy("canary", 1);
    let manifest = app.ctx.read("upshift.toml").replace(
        "strategy = \"canary\"",
        "strategy = \"canary\"\nsteps = [30, 100]\nstep_interval = \"1500ms\"\nmax_error_rate = 0.05",
    );
    app.ctx.write("upshift.toml", &manifest);
    app.upgrade("1.0.0").success();

    // No traffic: nothing to judge, so the canary stops and 1.0.0 stays.
    app.run(&["upgrade", "--to", "2.0.0"]).code(3).stderr_has("too little traffic to judge");
    assert_eq!(app.status().version.as_deref(), Some("1.0.0"));

    // 2.0.0 fails half of its /api/notes requests (its health check passes).
    let real = app.ctx.join("releases/2.0.0/notes");
    std::fs::remove_file(&real).unwrap();
    std::fs::create_dir_all(app.ctx.join("releases/2.0.0/bin")).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_upshift"), app.ctx.join("releases/2.0.0/bin/notes")).unwrap();
    app.ctx
        .write("releases/2.0.0/notes", "#!/bin/sh\nexec \"$(dirname \"$0\")/bin/notes\" --error-percent 50 \"$@\"\n");
    std::fs::set_permissions(&real, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (sent, failed, failures, slow) = under_load(&app, &serve, || {
        app.run(&["upgrade", "--to", "2.0.0"])
            .code(3)
            .stderr_has("canary at 30%: 2.0.0 got")
            .stderr_has("over max_error_rate 5.0%")
            .stderr_has("everything was undone");
    });
    assert!(slow.starts_with("HTTP/1.1 200"), "{slow}");
    assert!(failed > 0 && failed < sent / 2, "{failed} of {sent} failed");
    assert!(failures.iter().all(|f| f.contains("500")), "{failures:?}");
    let status = app.status();
    assert_eq!(status.version.as_deref(), Some("1.0.0"));
    let instances = &status.components[0].instances;
    assert!(instances.iter().all(|i| i.version == "1.0.0" && i.serving), "{instances:?}");
    assert!(app.has_title() && !app.has_table("tags"));

    // A good 2.0.0 passes each step under load, and no request fails.
    std::fs::remove_file(&real).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_upshift"), &real).unwrap();
    let (sent, failed, failures, _) = under_load(&app, &serve, || {
        app.run(&["upgrade", "--to", "2.0.0"]).success().stderr_has("canary at 30%: 2.0.0 got").stderr_has("passed");
    });
    assert_eq!(failed, 0, "{failed} of {sent} requests failed: {failures:?}");
    let status = app.status();
    assert_eq!(status.version.as_deref(), Some("2.0.0"));
    let versions = &status.components[0].versions;
    assert_eq!(versions.len(), 1, "{versions:?}");
    let only = &versions[0];
    assert!(only.version == "2.0.0" && (only.share - 100.0).abs() < f64::EPSILON, "{only:?}");
    // The window opened at the last switch measures what comes after it.
    for _ in 0..5 {
        assert!(exchange(&serve, GET_NOTES, 30).unwrap().starts_with("HTTP/1.1 200"));
    }
    let status = app.status();
    let only = &status.components[0].versions[0];
    assert!(only.window.seconds > 0.0 && only.window.requests >= 5 && only.window.errors == 0, "{only:?}");
    assert!(only.window.p99_ms.is_some(), "{only:?}");
    assert!(status.components[0].instances.iter().all(|i| i.weight == Some(1)));
}

/// Polls `GET /health` on the proxy's `serve` address until it answers 503 (the downtime),
/// returns that response's head, then touches `seen-503` in the app's folder (what the
/// test's pre-deploy hook waits for). Any answer other than 200 or 503 fails.
fn see_downtime(serve: String, marker: std::path::PathBuf) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_mins(1);
        loop {
            assert!(std::time::Instant::now() < deadline, "the proxy never answered 503");
            let Ok(mut stream) = TcpStream::connect(&serve) else { panic!("the proxy stopped listening on {serve}") };
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            write!(stream, "GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
            let mut response = String::new();
            let _ = stream.read_to_string(&mut response);
            if response.starts_with("HTTP/1.1 503") {
                std::fs::write(&marker, "").unwrap();
                return response.split("\r\n\r\n").next().unwrap_or_default().to_owned();
            }
            assert!(response.starts_with("HTTP/1.1 200"), "neither 200 nor 503: {response}");
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

/// `downtime = ["api"]`: the old version stops before the expand migration, the proxy
/// answers 503 with Retry-After meanwhile, and the new one starts at its deploy step; a
/// failure after the stop starts the old version again.
#[test]
fn a_release_with_downtime_stops_the_old_code_before_its_migration() {
    let (app, serve) = App::behind_proxy("blue-green", 1);
    let manifest = app
        .ctx
        .read("upshift.toml")
        .replace("upgrade_from = \">=1.0.0\"", "upgrade_from = \">=1.0.0\"\ndowntime = [\"api\"]")
        + r#"
[[hooks]]
name = "wait-for-a-503"
at = "pre-deploy"
run = ["sh", "-c", "for i in $(seq 1 600); do [ -e seen-503 ] && exit 0; sleep 0.1; done; exit 1"]
"#;
    app.ctx.write("upshift.toml", &manifest);
    let marker = app.ctx.join("seen-503");
    std::fs::write(&marker, "").unwrap();
    app.upgrade("1.0.0").success();
    let plan = app.run(&["plan", "--to", "2.0.0"]);
    plan.success()
        .stdout_has("stop api (downtime of 2.0.0)")
        .stdout_has("api is down from here until its deploy step is healthy");
    assert!(
        plan.stdout.find("stop api").unwrap() < plan.stdout.find("migrate expand").unwrap(),
        "the stop comes before the expand migration:\n{}",
        plan.stdout
    );

    // A failed 2.0.0: its undo starts 1.0.0 again.
    std::fs::remove_file(&marker).unwrap();
    app.ctx.write("fail-smoke-2.0.0", "");
    let seen = see_downtime(serve.clone(), marker.clone());
    let failed = app.upgrade("2.0.0");
    failed.code(3);
    let head = seen.join().unwrap();
    assert!(head.contains("Retry-After: 5") || head.contains("retry-after: 5"), "{head}");
    assert_eq!(app.status().components[0].version.as_deref(), Some("1.0.0"));
    assert!(app.has_title(), "the expand was undone, the contract never ran");

    // Then for real.
    std::fs::remove_file(&marker).unwrap();
    std::fs::remove_file(app.ctx.join("fail-smoke-2.0.0")).unwrap();
    let seen = see_downtime(serve.clone(), marker);
    app.upgrade("2.0.0").success();
    seen.join().unwrap();
    let status = app.status();
    assert_eq!((status.version.as_deref(), status.components[0].version.as_deref()), (Some("2.0.0"), Some("2.0.0")));
    assert!(status.components[0].healthy);
}

/// The notes app whose 2.0.0 stops the api before its migration (`downtime`).
fn with_downtime() -> App {
    let app = App::sqlite();
    let manifest = app
        .ctx
        .read("upshift.toml")
        .replace("upgrade_from = \">=1.0.0\"", "upgrade_from = \">=1.0.0\"\ndowntime = [\"api\"]");
    app.ctx.write("upshift.toml", &manifest);
    app
}

#[test]
fn with_downtime_killed_at_every_journal_write_then_resumed() {
    crash_at_every_write(&with_downtime(), "resume", false);
}

#[test]
fn with_downtime_killed_at_every_journal_write_then_aborted() {
    crash_at_every_write(&with_downtime(), "abort", false);
}

/// The notes app behind the proxy whose verify watches for a minute; the smoke command
/// leaves `smoke-passed-<version>` so a test knows when the watch begins. Returns the app,
/// the proxy's address and the upgrade to 2.0.0, started (1.0.0 is deployed).
fn watching(component_settings: &str) -> (App, String, std::process::Child) {
    let (app, serve) = App::behind_proxy("blue-green", 1);
    let manifest = app
        .ctx
        .read("upshift.toml")
        .replace("strategy = \"blue-green\"", &format!("strategy = \"blue-green\"\n{component_settings}"));
    app.ctx.write("upshift.toml", &manifest);
    // 1.0.0 is deployed before the watch is set (a first deploy watches too).
    app.upgrade("1.0.0").success();
    let smoke = manifest.lines().find(|l| l.starts_with("smoke = ")).unwrap().to_owned();
    let watched = manifest.replace(
        &smoke,
        "smoke = [[\"touch\", \"smoke-passed-{version}\"]]\nwatch = \"60s\"\nwatch_interval = \"100ms\"",
    );
    app.ctx.write("upshift.toml", &watched);
    let run =
        app.command().args(["upgrade", "--to", "2.0.0"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    app.wait_for_file("smoke-passed-2.0.0");
    (app, serve, run)
}

/// During the watch `status` says so; SIGINT ends the watch early and keeps the release.
#[test]
fn status_shows_the_watch_and_sigint_ends_it_keeping_the_release() {
    let (app, _serve, run) = watching("");
    let deadline = std::time::Instant::now() + Duration::from_mins(1);
    let watching_until = loop {
        if let Some(until) = app.status().run.and_then(|r| r.watching_until) {
            break until;
        }
        assert!(std::time::Instant::now() < deadline, "status never showed the watch");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(humantime::parse_rfc3339(&watching_until).is_ok(), "{watching_until}");
    app.run(&["status"]).success().stdout_has("watching until");
    assert!(std::process::Command::new("kill").args(["-INT", &run.id().to_string()]).status().unwrap().success());
    let output = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("the watch was ended early by SIGINT/SIGTERM"), "{stderr}");
    let status = app.status();
    assert_eq!((status.version.as_deref(), status.run.is_none()), (Some("2.0.0"), true));
}

/// The watch judges the proxy's figures of the new version against `max_p99_ms`: slow
/// answers after the verify undo the release though its health check passes.
#[test]
fn a_release_too_slow_during_the_watch_is_undone() {
    let (app, serve, run) = watching("max_p99_ms = 50");
    let senders: Vec<_> = (0..5)
        .map(|_| {
            let serve = serve.clone();
            std::thread::spawn(move || {
                for _ in 0..5 {
                    let Ok(mut stream) = TcpStream::connect(&serve) else { return };
                    let _ = write!(stream, "GET /slow?ms=150 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
                    let mut answer = String::new();
                    let _ = stream.read_to_string(&mut answer);
                }
            })
        })
        .collect();
    for sender in senders {
        sender.join().unwrap();
    }
    let output = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("watch: api 2.0.0 got") && stderr.contains("is over max_p99_ms 50 ms"), "{stderr}");
    assert_eq!(app.status().components[0].version.as_deref(), Some("1.0.0"));
}

/// The agent died and its state files were garbled: the next agent finds the running
/// instance by its environment, adopts it (same pid), rebuilds its route so the serve
/// address answers again, and the next upgrade replaces it cleanly (issue 12).
#[test]
fn a_garbled_state_is_recovered_from_the_running_instances() {
    let (app, serve) = App::behind_proxy("blue-green", 1);
    app.upgrade("1.0.0").success();
    let pid = app.status().components[0].instances.iter().find_map(|i| i.pid).expect("1.0.0 runs");
    app.kill_agent();
    app.ctx.write(".upshift/agent.json", "[{\"component\": \"api\", \"slot\"");
    app.ctx.write(".upshift/routes.json", "not json");
    app.run(&["agent", "--detach"]).success();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !exchange(&serve, GET_NOTES, 5).is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
        assert!(std::time::Instant::now() < deadline, "{serve} never answered again");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = app.status();
    let instance = &status.components[0].instances[0];
    assert_eq!((instance.pid, instance.version.as_str()), (Some(pid), "1.0.0"), "adopted, not started again");
    assert!(app.logged(&format!("adopted pid {pid} found by its environment")));
    app.upgrade("2.0.0").success();
    assert_eq!(app.status().components[0].version.as_deref(), Some("2.0.0"));
    // Gone, or a zombie waiting for a parent that does not reap (the dead agent's).
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let running = state.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z'));
    assert!(!running, "the adopted 1.0.0 still runs: {state}");
}
