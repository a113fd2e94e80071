//! The runbook steps beyond the database, through the real binary on a real SQLite file:
//! `[[hooks]]` (journaled steps with their undo, crash-tested), `[[preflight]]` commands,
//! `[notify]` (a webhook on a local HTTP receiver, and a command), `[[backup.artifacts]]`
//! and `rollback = "never"`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;

use common::{Context, Run};

/// An application with a SQLite database, no components, and hooks that leave their trace
/// in files: `checkout` holds the version a `git checkout` would have, `maintenance`
/// exists while the maintenance flag is on, `events` lists the on-failure/on-rollback hooks.
const MANIFEST: &str = r#"
[app]
name = "hooks"

[database]
url = "sqlite:app.db"

[[hooks]]
name = "checkout"
at = "pre-backup"
run = ["sh", "-c", "echo {version} > checkout"]
undo = ["sh", "-c", "echo '{from}' > checkout"]

[[hooks]]
name = "maintenance"
at = "pre-deploy"
run = ["sh", "-c", "echo \"$FLAG\" > maintenance"]
undo = ["rm", "-f", "maintenance"]
env = { FLAG = "${MAINTENANCE_TEXT}" }

[[hooks]]
name = "maintenance-off"
at = "post-verify"
run = ["rm", "-f", "maintenance"]

[[hooks]]
at = "on-failure"
run = ["sh", "-c", "echo \"failed $UPSHIFT_HOOK\" >> events"]

[[hooks]]
at = "on-rollback"
run = ["sh", "-c", "echo 'rolled back' >> events"]

[verify]
smoke = [["sh", "-c", "test ! -e fail"]]

[[releases]]
version = "1.0.0"

[[releases]]
version = "2.0.0"
"#;

fn app(extra: &str) -> Context {
    let ctx = Context::new();
    ctx.write("upshift.toml", &format!("{MANIFEST}\n{extra}"));
    ctx.write(
        "migrations/0001_notes.sql",
        "-- upshift:up\nCREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT);\n-- upshift:down\nDROP TABLE notes;\n",
    );
    ctx
}

fn run(ctx: &Context, args: &[&str]) -> Run {
    Run::from(&ctx.command().args(args).env("MAINTENANCE_TEXT", "s3cret-banner").output().unwrap())
}

/// The second release's migration, added once 1.0.0 is deployed.
fn add_tags(ctx: &Context) {
    ctx.write(
        "migrations/0002_tags.sql",
        "-- upshift:up\nCREATE TABLE tags (id INTEGER PRIMARY KEY);\n-- upshift:down\nDROP TABLE tags;\n",
    );
}

fn tables(ctx: &Context) -> Vec<String> {
    let db = rusqlite::Connection::open(ctx.join("app.db")).unwrap();
    let mut statement = db
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('notes', 'tags') ORDER BY name")
        .unwrap();
    statement.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
}

fn events(ctx: &Context) -> String {
    std::fs::read_to_string(ctx.join("events")).unwrap_or_default()
}

#[test]
fn hooks_run_at_their_points_and_a_failure_runs_their_undo_newest_first() {
    let ctx = app("");
    let plan = run(&ctx, &["plan", "--to", "1.0.0"]);
    plan.success()
        .stdout_has("hook checkout (pre-backup)")
        .stdout_has("undo: sh -c echo '' > checkout")
        .stdout_has("hook maintenance (pre-deploy)")
        .stdout_has("the hooks that ran are undone by their `undo`, newest first");
    assert!(!plan.stdout.contains("s3cret"), "the plan shows the hook's environment: {}", plan.stdout);

    let first = run(&ctx, &["upgrade", "--to", "1.0.0"]);
    first.success();
    assert_eq!(ctx.read("checkout"), "1.0.0\n");
    assert!(!ctx.join("maintenance").exists(), "post-verify turned maintenance off");
    assert_eq!(events(&ctx), "", "no failure, no rollback");
    assert!(!format!("{}{}", first.stdout, first.stderr).contains("s3cret"));

    // 2.0.0 fails its smoke test after the maintenance hook: everything is undone.
    add_tags(&ctx);
    ctx.write("fail", "");
    let failed = run(&ctx, &["upgrade", "--to", "2.0.0"]);
    failed.code(3).stderr_has("hooks undone: checkout, maintenance");
    assert_eq!(ctx.read("checkout"), "1.0.0\n", "the checkout hook's undo ran with {{from}}");
    assert!(!ctx.join("maintenance").exists(), "the maintenance hook's undo ran");
    assert_eq!(tables(&ctx), ["notes"], "0002 was reverted");
    assert_eq!(events(&ctx), "failed on-failure-1\nrolled back\n");
    // In the order the undo promises: on-failure, then the hooks after... then the data, the
    // earlier hooks, on-rollback.
    let order: Vec<&str> = failed
        .stderr
        .lines()
        .filter(|l| l.contains(" done") || l.contains("reverted"))
        .skip_while(|l| !l.contains("on-failure"))
        .collect();
    assert_eq!(
        order,
        [
            "  hook on-failure-1 done",
            "  reverted 0002 tags",
            "  hook maintenance done",
            "  hook checkout done",
            "  hook on-rollback-1 done"
        ],
        "{}",
        failed.stderr
    );
    // An undo run twice is a no-op: nothing is in flight.
    run(&ctx, &["abort"]).code(1).stderr_has("nothing is in flight");
}

#[test]
fn a_rollback_runs_the_undo_of_the_hooks_its_releases_ran() {
    let ctx = app("");
    run(&ctx, &["upgrade", "--to", "1.0.0"]).success();
    add_tags(&ctx);
    run(&ctx, &["upgrade", "--to", "2.0.0"]).success();
    assert_eq!(ctx.read("checkout"), "2.0.0\n");
    run(&ctx, &["rollback", "--yes"]).success().stderr_has("hooks undone: checkout, maintenance");
    assert_eq!(ctx.read("checkout"), "1.0.0\n", "the checkout of 2.0.0 was undone");
    assert_eq!(tables(&ctx), ["notes"]);
    assert_eq!(events(&ctx), "rolled back\n", "on-rollback ran, on-failure did not");
}

#[test]
fn an_upgrade_killed_at_every_journal_write_with_hooks_converges() {
    let ctx = app(ARTIFACTS);
    ctx.write("state.txt", "one");
    ctx.write("kv.json", "{}");
    add_tags(&ctx);
    // 1.0.0 is deployed with both revisions; 2.0.0 runs every hook and no migration.
    run(&ctx, &["upgrade", "--to", "1.0.0"]).success();
    let points = common::crash_at_every_write(
        || {
            let mut command = ctx.command();
            command.args(["upgrade", "--to", "2.0.0", "--yes"]).env("MAINTENANCE_TEXT", "on");
            command
        },
        |recovery| {
            let mut args = vec![recovery];
            if recovery == "rollback" {
                args.push("--yes");
            } else {
                args.extend(["--output", "json"]);
            }
            run(&ctx, &args)
        },
        |context| {
            let status: common::Status = run(&ctx, &["status", "--output", "json"]).json();
            assert!(status.run.is_none(), "{context}: a run is still in flight");
            let version = status.version.expect("a release is deployed");
            // The hooks' effects match what is deployed: the checkout is its version and the
            // maintenance flag is off (undone, or turned off after verify).
            assert_eq!(ctx.read("checkout"), format!("{version}\n"), "{context}");
            assert!(!ctx.join("maintenance").exists(), "{context}: maintenance was left on");
            assert_eq!(tables(&ctx), ["notes", "tags"], "{context}");
            version
        },
    );
    assert!(points >= 15, "only {points} crash points");
    #[allow(clippy::print_stderr)]
    {
        eprintln!("hooks and artifacts: {points} crash points converged");
    }
}

/// A crash inside a hook (the hook kills upshift): `resume` runs the hook again and goes
/// on; `abort` runs its undo.
#[test]
fn a_crash_inside_a_hook_is_resumed_or_aborted() {
    for recovery in ["resume", "abort"] {
        let ctx = app(r#"
[[hooks]]
name = "crashes-once"
at = "post-deploy"
run = ["sh", "-c", "echo ran >> crash-hook; test -e crashed || { touch crashed; kill -9 $PPID; }"]
undo = ["sh", "-c", "echo undone >> crash-hook"]
"#);
        run(&ctx, &["upgrade", "--to", "1.0.0"]).code(-1);
        let status: common::Status = run(&ctx, &["status", "--output", "json"]).json();
        assert!(status.run.is_some(), "the killed run is in flight");
        assert!(ctx.join("maintenance").exists());
        let recovered = run(&ctx, &[recovery]);
        if recovery == "resume" {
            recovered.success();
            assert_eq!(ctx.read("crash-hook"), "ran\nran\n", "resume ran the hook again");
            assert_eq!(ctx.read("checkout"), "1.0.0\n");
        } else {
            recovered.success();
            assert_eq!(ctx.read("crash-hook"), "ran\nundone\n", "abort ran its undo");
            assert_eq!(ctx.read("checkout"), "\n", "a first deploy's checkout goes back to nothing");
            assert_eq!(tables(&ctx), Vec::<String>::new());
        }
        assert!(!ctx.join("maintenance").exists(), "{recovery}: maintenance was left on");
        run(&ctx, &["abort"]).code(1).stderr_has("nothing is in flight");
    }
}

#[test]
fn a_failing_preflight_command_stops_the_upgrade_before_anything_runs() {
    let ctx = app(r#"
[[preflight]]
name = "tool version"
run = ["sh", "-c", "echo 'tool v1.4.2'"]
expect_output = "v2."
"#);
    run(&ctx, &["plan", "--to", "1.0.0"])
        .success()
        .stdout_has("tool version: `sh -c echo 'tool v1.4.2'` exits 0 and prints `v2.`");
    run(&ctx, &["upgrade", "--to", "1.0.0"])
        .code(1)
        .stderr_has("[[preflight]] tool version")
        .stderr_has("did not print `v2.`; it printed: tool v1.4.2");
    assert!(!ctx.join("checkout").exists(), "no hook ran");
    assert!(
        !ctx.join(".upshift/backups").exists()
            || std::fs::read_dir(ctx.join(".upshift/backups")).unwrap().next().is_none()
    );

    let ctx = app("[[preflight]]\nrun = [\"sh\", \"-c\", \"exit 3\"]\nexpect_exit = 3\n");
    run(&ctx, &["upgrade", "--to", "1.0.0"]).success();
    let ctx = app("[[preflight]]\nrun = [\"false\"]\n");
    run(&ctx, &["upgrade", "--to", "1.0.0"]).code(1).stderr_has("exited with exit status: 1 (expected 0)");
}

#[test]
fn mistakes_in_hooks_name_their_line() {
    let cases = [
        ("[[hooks]]\nat = \"on-failure\"\nrun = [\"true\"]\nundo = [\"true\"]\n", "cannot have an `undo`"),
        ("[[hooks]]\nat = \"before-lunch\"\nrun = [\"true\"]\n", "unknown variant `before-lunch`"),
        ("[[hooks]]\nat = \"pre-deploy\"\nrun = []\n", "is an empty command"),
        ("[[hooks]]\nat = \"pre-deploy\"\nrun = [\"echo\", \"{addr}\"]\n", "unknown placeholder {addr}"),
        ("[[hooks]]\nname = \"checkout\"\nat = \"pre-deploy\"\nrun = [\"true\"]\n", "a second hook named `checkout`"),
        ("[notify]\non = [\"start\"]\n", "needs a `webhook` URL or a `command`"),
        ("[notify]\nwebhook = \"ftp://x\"\n", "not an http:// or https:// URL"),
    ];
    for (extra, expected) in cases {
        let ctx = app(extra);
        let out = run(&ctx, &["plan", "--to", "1.0.0"]);
        out.code(2).stderr_has(expected).stderr_has("upshift.toml:");
        assert!(!ctx.join("app.db").exists(), "{extra}: the database was touched");
    }
}

/// A local HTTP receiver: each request's first line and body, sent on the channel.
fn receiver(answer: &'static str) -> (u16, mpsc::Receiver<(String, serde_json::Value)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut first = String::new();
            reader.read_line(&mut first).unwrap();
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let _ = stream.write_all(format!("HTTP/1.1 {answer}\r\nContent-Length: 0\r\n\r\n").as_bytes());
            if tx.send((first.trim().to_owned(), serde_json::from_slice(&body).unwrap())).is_err() {
                return;
            }
        }
    });
    (port, rx)
}

fn notices(ctx: &Context) -> Vec<(String, String, bool, String)> {
    let db = rusqlite::Connection::open(ctx.join(".upshift/journal.db")).unwrap();
    let mut statement = db.prepare("SELECT event, target, ok, message FROM notices ORDER BY rowid").unwrap();
    statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).unwrap().map(Result::unwrap).collect()
}

#[test]
fn notifications_reach_a_webhook_and_a_command_at_start_success_failure_and_rollback() {
    let (port, heard) = receiver("204 No Content");
    let ctx = app(&format!(
        "[notify]\nwebhook = \"http://127.0.0.1:{port}/hooks/${{MAINTENANCE_TEXT}}\"\ncommand = [\"sh\", \"-c\", \"cat >> notices.jsonl; echo >> notices.jsonl\"]\n"
    ));
    let expect = |event: &str, kind: &str, to: &str, outcome: &str| {
        let (line, body) = heard.recv_timeout(std::time::Duration::from_secs(30)).expect("the webhook heard nothing");
        assert_eq!(line, "POST /hooks/s3cret-banner HTTP/1.1");
        assert_eq!((body["event"].as_str(), body["kind"].as_str()), (Some(event), Some(kind)), "{body}");
        assert_eq!((body["to"].as_str(), body["outcome"].as_str()), (Some(to), Some(outcome)), "{body}");
        assert_eq!(body["app"], "hooks");
        assert!(body["run"].is_string() && body["duration_ms"].is_u64(), "{body}");
        body
    };
    let deployed = run(&ctx, &["upgrade", "--to", "1.0.0"]);
    deployed.success();
    assert!(!deployed.stderr.contains("s3cret"), "{}", deployed.stderr);
    expect("start", "upgrade", "1.0.0", "running");
    expect("success", "upgrade", "1.0.0", "succeeded");

    add_tags(&ctx);
    ctx.write("fail", "");
    run(&ctx, &["upgrade", "--to", "2.0.0"]).code(3);
    expect("start", "upgrade", "2.0.0", "running");
    let failure = expect("failure", "upgrade", "2.0.0", "rolled-back");
    assert_eq!(failure["from"], "1.0.0");
    assert_eq!(failure["undo"], "code + down");
    assert!(failure["failure"].as_str().unwrap().contains("smoke"), "{failure}");

    std::fs::remove_file(ctx.join("fail")).unwrap();
    run(&ctx, &["upgrade", "--to", "2.0.0"]).success();
    expect("start", "upgrade", "2.0.0", "running");
    expect("success", "upgrade", "2.0.0", "succeeded");
    run(&ctx, &["rollback", "--yes"]).success();
    expect("start", "rollback", "1.0.0", "running");
    expect("rollback", "rollback", "1.0.0", "succeeded");

    // The command heard the same messages on its stdin.
    let lines: Vec<serde_json::Value> =
        ctx.read("notices.jsonl").lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let events: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["start", "success", "start", "failure", "start", "success", "start", "rollback"]);
    let journaled = notices(&ctx);
    assert_eq!(journaled.len(), 16);
    assert!(journaled.iter().all(|(_, _, ok, _)| *ok), "{journaled:?}");
}

#[test]
fn a_notification_that_does_not_arrive_never_fails_the_upgrade_and_is_journaled() {
    // A port nobody listens on, and a receiver that answers 500.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let ctx = app(&format!("[notify]\nwebhook = \"http://127.0.0.1:{closed}/x\"\non = [\"success\"]\n"));
    run(&ctx, &["upgrade", "--to", "1.0.0"]).success().stderr_has("warning: the success notification did not arrive");
    let journaled = notices(&ctx);
    assert_eq!(journaled.len(), 1);
    let (event, target, ok, message) = &journaled[0];
    assert_eq!((event.as_str(), target.as_str(), *ok), ("success", "webhook", false));
    assert!(message.contains("cannot connect"), "{message}");

    let (port, heard) = receiver("500 Internal Server Error");
    let ctx = app(&format!("[notify]\nwebhook = \"http://127.0.0.1:{port}/x\"\non = [\"failure\"]\n"));
    ctx.write("fail", "");
    run(&ctx, &["upgrade", "--to", "1.0.0"]).code(3).stderr_has("answered `HTTP/1.1 500 Internal Server Error`");
    assert_eq!(heard.recv().unwrap().1["event"], "failure", "only the events asked for are sent");
    assert!(!notices(&ctx)[0].2, "a 500 is no delivery");
}

/// Stops the agent of a test's state dir however the test ends.
struct Agent<'a>(&'a Context);

impl Drop for Agent<'_> {
    fn drop(&mut self) {
        let _ = self.0.command().args(["agent", "stop", "--state-dir", ".upshift"]).output();
    }
}

#[test]
fn a_component_with_rollback_never_stays_as_deployed_when_the_upgrade_is_undone() {
    let ctx = app(r#"
[[components]]
name = "data"
driver = "process"
run = ["sleep", "3600"]
rollback = "never"

[[components]]
name = "web"
driver = "process"
run = ["sleep", "3600"]
"#);
    let _agent = Agent(&ctx);
    run(&ctx, &["plan", "--to", "1.0.0"]).success().stdout_has("rollback = \"never\": an undo leaves it as deployed");
    run(&ctx, &["upgrade", "--to", "1.0.0"]).success();
    ctx.write("fail", "");
    run(&ctx, &["upgrade", "--to", "2.0.0"]).code(3).stderr_has("(data kept as deployed: rollback = \"never\")");
    let status: common::Status = run(&ctx, &["status", "--output", "json"]).json();
    let versions: Vec<Option<&str>> = status.components.iter().map(|c| c.version.as_deref()).collect();
    assert_eq!(versions, [Some("2.0.0"), Some("1.0.0")], "data stays at 2.0.0, web is put back");
    // The next upgrade accepts data ahead of the release.
    std::fs::remove_file(ctx.join("fail")).unwrap();
    run(&ctx, &["upgrade", "--to", "2.0.0"]).success();
}

/// Two artifacts beside the database: one written to `{out}`, one streamed on stdout, put
/// back from `{in}` and from stdin.
const ARTIFACTS: &str = r#"
[[backup.artifacts]]
name = "vault"
create = ["sh", "-c", "cp state.txt {out}"]
restore = ["sh", "-c", "cp {in} state.txt"]

[[backup.artifacts]]
name = "kv"
create = ["cat", "kv.json"]
restore = ["sh", "-c", "cat > kv.json"]
"#;

#[test]
fn artifacts_are_backed_up_verified_and_restored_with_the_database() {
    let ctx = app(ARTIFACTS);
    ctx.write("state.txt", "one");
    ctx.write("kv.json", "{\"k\": 1}");
    run(&ctx, &["plan", "--to", "1.0.0"]).success().stdout_has("artifact vault: sh -c cp state.txt {out}");
    run(&ctx, &["upgrade", "--to", "1.0.0"]).success();

    // 2.0.0 has a revision without a down section, so its undo restores the backup; its
    // pre-deploy hook changes the state the artifacts hold, then its smoke test fails.
    ctx.write("migrations/0002_tags.sql", "-- upshift:up\nCREATE TABLE tags (id INTEGER PRIMARY KEY);\n");
    ctx.write("state.txt", "two");
    ctx.write("fail", "");
    let manifest = ctx.read("upshift.toml").replace(
        "run = [\"sh\", \"-c\", \"echo \\\"$FLAG\\\" > maintenance\"]",
        "run = [\"sh\", \"-c\", \"echo three > state.txt; echo '{}' > kv.json; echo on > maintenance\"]",
    );
    ctx.write("upshift.toml", &manifest);
    run(&ctx, &["upgrade", "--to", "2.0.0"])
        .code(3)
        .stderr_has("restored artifact vault")
        .stderr_has("restored artifact kv");
    assert_eq!(ctx.read("state.txt"), "two", "the state as the backup before 2.0.0 saw it");
    assert_eq!(ctx.read("kv.json"), "{\"k\": 1}");
    assert_eq!(tables(&ctx), ["notes"]);

    let list: Vec<serde_json::Value> = run(&ctx, &["backup", "list", "--output", "json"]).json();
    assert_eq!(list.len(), 2);
    assert!(list.iter().all(|b| b["artifacts"] == serde_json::json!(["vault", "kv"])), "{list:?}");
    let first = list.iter().find(|b| b["label"] == "before 1.0.0").expect("the backup before 1.0.0");
    let id = first["id"].as_str().unwrap().to_owned();
    run(&ctx, &["backup", "verify", &id]).success();

    // `backup restore` puts them back too; a damaged artifact is caught by verify and refused.
    ctx.write("state.txt", "four");
    run(&ctx, &["backup", "restore", &id, "--force"]).success().stdout_has("artifacts restored: vault, kv");
    assert_eq!(ctx.read("state.txt"), "one", "the state as the backup before 1.0.0 saw it");
    let stored = ctx.join(&format!(".upshift/backups/{id}/artifacts/vault.zst"));
    let mut bytes = std::fs::read(&stored).unwrap();
    let end = bytes.len() - 1;
    bytes[end] ^= 0xff;
    std::fs::write(&stored, bytes).unwrap();
    run(&ctx, &["backup", "verify", &id]).code(1).stderr_has("artifacts/vault.zst has sha256");
    ctx.write("state.txt", "five");
    run(&ctx, &["backup", "restore", &id, "--force"]).code(1).stderr_has("is damaged");
    assert_eq!(ctx.read("state.txt"), "five", "nothing was restored from a damaged backup");
}

/// The artifact's command kills upshift mid-backup: `resume` takes the backup again,
/// `abort` ends the run with nothing changed; no half backup is ever listed.
#[test]
fn a_crash_inside_an_artifact_backup_is_resumed_or_aborted() {
    for recovery in ["resume", "abort"] {
        let ctx = app(r#"
[[backup.artifacts]]
name = "vault"
create = ["sh", "-c", "test -e crashed || { touch crashed; kill -9 $PPID; }; cp state.txt {out}"]
restore = ["sh", "-c", "cp {in} state.txt"]
"#);
        ctx.write("state.txt", "one");
        run(&ctx, &["upgrade", "--to", "1.0.0"]).code(-1);
        let listed: Vec<serde_json::Value> = run(&ctx, &["backup", "list", "--output", "json"]).json();
        assert!(listed.is_empty(), "a half backup is listed: {listed:?}");
        let recovered = run(&ctx, &[recovery]);
        recovered.success();
        let listed: Vec<serde_json::Value> = run(&ctx, &["backup", "list", "--output", "json"]).json();
        let status: common::Status = run(&ctx, &["status", "--output", "json"]).json();
        if recovery == "resume" {
            assert_eq!(status.version.as_deref(), Some("1.0.0"));
            assert_eq!(listed.len(), 1);
            assert_eq!(listed[0]["artifacts"], serde_json::json!(["vault"]));
            assert_eq!(tables(&ctx), ["notes"]);
        } else {
            assert_eq!(status.version, None, "nothing is deployed");
            assert!(listed.is_empty());
            assert_eq!(ctx.read("checkout"), "\n", "the checkout hook that ran before was undone");
        }
        run(&ctx, &["abort"]).code(1).stderr_has("nothing is in flight");
    }
}

fn versions(ctx: &Context) -> Vec<Option<String>> {
    let status: common::Status = run(ctx, &["status", "--output", "json"]).json();
    status.components.into_iter().map(|c| c.version).collect()
}

/// `upgrade --only` and `rollback --only`: one component moves (code only); the others
/// keep their versions, the journal records which runs what, and an upgrade to the
/// deployed release finishes the components still behind.
#[test]
fn one_component_is_upgraded_and_rolled_back_alone() {
    let ctx = app(r#"
[[components]]
name = "data"
driver = "process"
run = ["sleep", "3600"]

[[components]]
name = "web"
driver = "process"
run = ["sleep", "3600"]

[[releases]]
version = "3.0.0"
"#);
    let _agent = Agent(&ctx);
    let v = |a: &str, b: &str| vec![Some(a.to_owned()), Some(b.to_owned())];
    run(&ctx, &["upgrade", "--to", "1.0.0"]).success();
    run(&ctx, &["upgrade", "--to", "2.0.0", "--only", "nope"])
        .code(2)
        .stderr_has("--only nope: there is no such component");

    let plan = run(&ctx, &["plan", "--to", "2.0.0", "--only", "web"]);
    plan.success().stdout_has("deploy web");
    assert!(!plan.stdout.contains("deploy data"), "{}", plan.stdout);
    run(&ctx, &["upgrade", "--to", "2.0.0", "--only", "web"]).success();
    assert_eq!(versions(&ctx), v("1.0.0", "2.0.0"));

    // An upgrade to the deployed release finishes it: data alone.
    let plan = run(&ctx, &["plan", "--to", "2.0.0"]);
    plan.success().stdout_has("deploy data");
    assert!(!plan.stdout.contains("deploy web"), "{}", plan.stdout);
    run(&ctx, &["rollback", "--only", "web", "--yes"]).success().stderr_has("rolling web back");
    assert_eq!(versions(&ctx), v("1.0.0", "1.0.0"));
    run(&ctx, &["rollback", "--only", "web", "--yes"]).code(2).stderr_has("web already runs 1.0.0");
    run(&ctx, &["upgrade", "--to", "2.0.0"]).success();
    assert_eq!(versions(&ctx), v("2.0.0", "2.0.0"));
    run(&ctx, &["upgrade", "--to", "2.0.0"]).code(2).stderr_has("not newer than the deployed 2.0.0");

    // A whole rollback goes back along the line: to 2.0.0 with data behind, then further.
    run(&ctx, &["rollback", "--yes"]).success();
    assert_eq!(versions(&ctx), v("1.0.0", "1.0.0"), "the revision before: web rolled back alone");

    // A release that migrates the schema moves every component together.
    add_tags(&ctx);
    run(&ctx, &["upgrade", "--to", "3.0.0", "--only", "web"])
        .code(2)
        .stderr_has("release 3.0.0 migrates the schema (0002)");
    run(&ctx, &["upgrade", "--to", "3.0.0"]).success();
    assert_eq!(versions(&ctx), v("3.0.0", "3.0.0"));
}

/// A webhook over HTTPS: the server's certificate is checked against the roots upshift
/// trusts (`SSL_CERT_FILE` here): a certificate it does not trust is no delivery.
#[test]
fn a_webhook_over_https_checks_the_servers_certificate() {
    use std::sync::Arc;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().self_signed(&key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, heard) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let Ok(connection) = rustls::ServerConnection::new(Arc::new(config.clone())) else { return };
            let mut tls = rustls::StreamOwned::new(connection, stream);
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            // The request's head.
            while !request.ends_with(b"\r\n\r\n") {
                match tls.read(&mut byte) {
                    Ok(1) => request.push(byte[0]),
                    _ => break,
                }
            }
            if request.is_empty() {
                continue; // the client refused the certificate
            }
            let _ = tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = tls.flush();
            if tx.send(String::from_utf8_lossy(&request).lines().next().unwrap_or_default().to_owned()).is_err() {
                return;
            }
        }
    });
    let ctx = app(&format!("[notify]\nwebhook = \"https://localhost:{port}/tls\"\non = [\"success\"]\n"));
    ctx.write("ca.pem", &cert.pem());
    let trusted = Run::from(
        &ctx.command()
            .args(["upgrade", "--to", "1.0.0"])
            .env("MAINTENANCE_TEXT", "x")
            .env("SSL_CERT_FILE", ctx.join("ca.pem"))
            .output()
            .unwrap(),
    );
    trusted.success();
    assert_eq!(heard.recv().unwrap(), "POST /tls HTTP/1.1");
    assert!(notices(&ctx).iter().all(|(_, _, ok, _)| *ok));

    // Without that root the same server is not trusted: the notice records why.
    add_tags(&ctx);
    let other_key = rcgen::KeyPair::generate().unwrap();
    let other = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().self_signed(&other_key).unwrap();
    ctx.write("other.pem", &other.pem());
    let untrusted = Run::from(
        &ctx.command()
            .args(["upgrade", "--to", "2.0.0"])
            .env("MAINTENANCE_TEXT", "x")
            .env("SSL_CERT_FILE", ctx.join("other.pem"))
            .env("SSL_CERT_DIR", ctx.join("no-such-dir"))
            .output()
            .unwrap(),
    );
    untrusted.success().stderr_has("warning: the success notification did not arrive");
    let last = notices(&ctx).pop().unwrap();
    assert!(!last.2 && last.3.contains("certificate"), "{last:?}");
}
