//! `upshift demo`: the whole story of the notes example, and `--prepare-only`.

mod common;

use common::Context;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PhaseReport {
    phase: String,
    exit_code: i32,
    requests: u64,
    failed: u64,
    p99_ms: f64,
    seconds: f64,
}

fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string()
}

#[test]
fn the_demo_tells_its_story_under_load() {
    let ctx = Context::new();
    let run = ctx.run(&["demo", "--dir", "d", "--port", &free_port(), "--output", "json"]);
    let phases: Vec<PhaseReport> = run.success().json();
    let exits: Vec<i32> = phases.iter().map(|p| p.exit_code).collect();
    assert_eq!(exits, [0, 0, 3, 0], "{phases:?}");
    assert!(phases[1].phase.contains("2.0.0") && phases[3].phase.contains("roll back"));
    // Load ran through the upgrades and was measured.
    assert!(phases[1..].iter().all(|p| p.requests > 0 && p.p99_ms > 0.0 && p.seconds > 0.0), "{phases:?}");
    // Blue-green switches lose no request: the upgrade to 2.0.0, and 3.0.0 which never got
    // traffic. (The rollback restores the database with the service down: those may fail.)
    assert_eq!((phases[1].failed, phases[2].failed), (0, 0), "{phases:?}");
    // The story ends on 1.0.0 with the agent stopped.
    let history = ctx.command().args(["history", "--output", "json"]).current_dir(ctx.join("d")).output().unwrap();
    let history: serde_json::Value = serde_json::from_slice(&history.stdout).unwrap();
    let statuses: Vec<(&str, &str)> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["version"].as_str().unwrap(), r["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        statuses,
        [("1.0.0", "superseded"), ("2.0.0", "rolled-back"), ("3.0.0", "failed"), ("1.0.0", "deployed")]
    );
    assert!(!ctx.join("d/.upshift/agent.sock").exists(), "the demo left its agent running");
    // A second run refuses to overwrite a demo that ran.
    ctx.run(&["demo", "--dir", "d"]).code(2).stderr_has("already holds a demo");
}

/// Stops the agent of a demo folder when the test ends, passed or failed.
struct StopsAgent<'a>(&'a Context, &'a str);

impl Drop for StopsAgent<'_> {
    fn drop(&mut self) {
        let _ = self.0.command().args(["agent", "stop", "--state-dir", &format!("{}/.upshift", self.1)]).output();
    }
}

#[test]
fn prepare_only_writes_a_deployment_to_drive_by_hand() {
    let ctx = Context::new();
    let _agent = StopsAgent(&ctx, "d");
    let port = free_port();
    ctx.run(&["demo", "--dir", "d", "--port", &port, "--prepare-only"])
        .success()
        .stdout_has("upshift upgrade --to 1.0.0");
    for file in [
        "d/upshift.toml",
        "d/releases/1.0.0/notes",
        "d/releases/3.0.0/notes",
        "d/migrations/20260202000000_drop_note_title.sql",
    ] {
        assert!(ctx.join(file).exists(), "{file}");
    }
    assert!(!ctx.join("d/notes.db").exists() && !ctx.join("d/.upshift").exists(), "prepare-only ran something");
    let by_hand = |args: &[&str]| ctx.command().args(args).current_dir(ctx.join("d")).output().unwrap();
    let up = by_hand(&["upgrade", "--to", "1.0.0"]);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let mut stream = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    std::io::Write::write_all(&mut stream, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    std::io::Read::read_to_string(&mut stream, &mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(by_hand(&["agent", "stop"]).status.success());
}

/// A machine where 18080 is taken (by this test, or by whatever already holds it): the
/// demo serves on a free port and says so; an explicit `--port` that is taken is refused
/// before anything is written.
#[test]
fn the_demo_takes_a_free_port_when_18080_is_taken() {
    let ctx = Context::new();
    let _held = std::net::TcpListener::bind("127.0.0.1:18080");
    let run = ctx.run(&["demo", "--dir", "d", "--prepare-only", "--output", "json"]);
    run.success().stderr_has("port 18080 is taken: the demo serves on");
    let prepared: serde_json::Value = run.json();
    let port = prepared["port"].as_u64().unwrap();
    assert_ne!(port, 18080);
    assert!(ctx.read("d/upshift.toml").contains(&format!("serve = \"127.0.0.1:{port}\"")));

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port().to_string();
    ctx.run(&["demo", "--dir", "e", "--port", &taken_port, "--prepare-only"])
        .code(2)
        .stderr_has(&format!("port {taken_port} is taken"));
    assert!(!ctx.join("e").exists(), "a refused demo wrote files");
}
