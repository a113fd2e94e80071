//! The README's shell blocks, run: every `sh` block in README.md is one this test knows and
//! runs (or checks, for the ones CI itself is), so the docs cannot rot. A new block fails
//! here until it is added.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Context, Run};

/// The README's `sh` blocks, in order, each as its lines.
fn shell_blocks() -> Vec<Vec<String>> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in readme.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(Vec::new()),
            (Some(_), "```") => blocks.push(current.take().unwrap()),
            (Some(block), text) => block.push(text.to_owned()),
            (None, _) => {}
        }
    }
    blocks
}

/// A line without its trailing `# comment`.
fn command(line: &str) -> &str {
    line.split("  #").next().unwrap().trim()
}

/// Runs `script` with bash, with the built `upshift` first on PATH.
fn bash(ctx: &Context, dir: &Path, script: &str, env: &[(&str, &str)]) -> Run {
    let bin = Path::new(env!("CARGO_BIN_EXE_upshift")).parent().unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let mut bash = Command::new("bash");
    bash.args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .env("PATH", path)
        .env("TMPDIR", ctx.path())
        .env("NO_COLOR", "1")
        .env_remove("DATABASE_URL")
        .env_remove("UPSHIFT_DATABASE_URL");
    for (key, value) in env {
        bash.env(key, value);
    }
    Run::from(&bash.output().unwrap())
}

fn install(block: &[String]) {
    assert_eq!(command(&block[0]), "cargo install --path crates/upshift");
    let manifest = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains("name = \"upshift\"") && manifest.contains("[[bin]]"),
        "crates/upshift builds no upshift"
    );
}

/// `cargo run --release -- demo` runs this very binary's `demo`: run it. `cargo test
/// --workspace` is what runs this test.
fn quick_start(ctx: &Context, block: &[String]) {
    let commands: Vec<&str> = block.iter().map(|l| command(l)).collect();
    assert_eq!(commands, ["cargo run --release -- demo", "cargo test --workspace"]);
    let run = bash(ctx, ctx.path(), "upshift demo", &[]);
    run.success().stdout_has("What happened").stdout_has("roll back to 1.0.0");
    assert!(!ctx.join("upshift-demo/.upshift/agent.sock").exists(), "the demo left its agent running");
}

/// The schema engine alone: the block as a script, `cargo build` replaced by the built
/// binary, `$EDITOR` by a script that writes the revision's SQL.
fn schema_engine(ctx: &Context, block: &[String]) {
    assert_eq!(command(&block[0]), "cargo build --release && export PATH=$PWD/target/release:$PATH");
    ctx.write(
        "editor",
        "#!/bin/sh\nprintf -- '-- upshift:up\\nCREATE TABLE notes (id integer PRIMARY KEY, body text);\\n-- upshift:down\\nDROP TABLE notes;\\n' > \"$1\"\n",
    );
    std::fs::set_permissions(ctx.join("editor"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = block[1..].join("\n") + "\nupshift migrate status --output json > \"$OLDPWD/status.json\"\n";
    let editor = ctx.join("editor").display().to_string();
    let run = bash(ctx, ctx.path(), &script, &[("EDITOR", &editor)]);
    run.success().stdout_has("reverted").stdout_has("create_notes");
    let status: serde_json::Value = serde_json::from_str(&ctx.read("status.json")).unwrap();
    assert_eq!(status["applied"], serde_json::json!([]), "down -1 reverted the one revision");
    assert_eq!(status["pending"].as_array().unwrap().len(), 1);
}

/// Stops the agent of the demo folder when the test ends, passed or failed.
struct StopsAgent<'a>(&'a Context);

impl Drop for StopsAgent<'_> {
    fn drop(&mut self) {
        let state = self.0.join("upshift-demo/.upshift");
        let _ = self.0.command().args(["agent", "stop", "--state-dir"]).arg(state).output();
    }
}

/// Upgrading: the block run in the folder `upshift demo --prepare-only` writes.
fn upgrading(ctx: &Context, block: &[String]) {
    assert!(block.iter().all(|l| command(l).starts_with("upshift ")), "{block:?}");
    let _agent = StopsAgent(ctx);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    ctx.run(&["demo", "--prepare-only", "--port", &port]).success();
    let script = block.join("\n");
    let run = bash(ctx, &ctx.join("upshift-demo"), &script, &[]);
    run.success().stdout_has("deployed  2.0.0 (revision 2)").stdout_has("done: revision 3").stdout_has("agent stopped");
    let history = ctx.command().args(["history", "--output", "json"]).current_dir(ctx.join("upshift-demo")).output();
    let history: serde_json::Value = serde_json::from_slice(&history.unwrap().stdout).unwrap();
    assert_eq!(history.as_array().unwrap().last().unwrap()["version"], "1.0.0");
}

/// Development: `.ci/run` is CI itself; the benches are checked to exist and run.
fn development(block: &[String]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for line in block {
        let line = command(line);
        let file = line.strip_prefix("bash ").unwrap_or(line);
        let path = root.join(file);
        assert!(path.is_file(), "{line}: {} is not there", path.display());
        if !line.starts_with("bash ") {
            let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
            assert!(mode & 0o111 != 0, "{line}: not executable");
        }
    }
}

#[test]
fn every_shell_block_of_the_readme_runs() {
    let blocks = shell_blocks();
    assert_eq!(blocks.len(), 5, "a README block was added or removed: teach tests/readme.rs to run it");
    for block in &blocks {
        let ctx = Context::new();
        let first = command(&block[0]);
        match first {
            _ if first.starts_with("cargo install") => install(block),
            _ if first.starts_with("cargo run --release -- demo") => quick_start(&ctx, block),
            _ if first.starts_with("cargo build --release") => schema_engine(&ctx, block),
            _ if first.starts_with("upshift upgrade") => upgrading(&ctx, block),
            _ if first.starts_with("bash .ci/run") => development(block),
            _ => panic!("a README block this test does not know: {block:?}"),
        }
    }
}
