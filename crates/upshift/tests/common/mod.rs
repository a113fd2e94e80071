//! Runs the real `upshift` binary in an isolated temp dir.
#![allow(dead_code, unreachable_pub)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::de::DeserializeOwned;

pub struct Context {
    dir: tempfile::TempDir,
}

/// What a finished run printed and how it exited.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from(output: &Output) -> Run {
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Fails the test, showing both streams, unless the run exited with `code`.
    #[track_caller]
    pub fn code(&self, code: i32) -> &Run {
        assert_eq!(self.code, code, "exit code\n--- stdout\n{}\n--- stderr\n{}", self.stdout, self.stderr);
        self
    }

    #[track_caller]
    pub fn success(&self) -> &Run {
        self.code(0)
    }

    #[track_caller]
    pub fn stderr_has(&self, text: &str) -> &Run {
        assert!(self.stderr.contains(text), "stderr lacks {text:?}:\n{}", self.stderr);
        self
    }

    #[track_caller]
    pub fn stdout_has(&self, text: &str) -> &Run {
        assert!(self.stdout.contains(text), "stdout lacks {text:?}:\n{}", self.stdout);
        self
    }

    /// Parses stdout as one JSON document.
    #[track_caller]
    pub fn json<T: DeserializeOwned>(&self) -> T {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not the expected JSON: {e}\n{}", self.stdout))
    }
}

impl Context {
    pub fn new() -> Context {
        Context { dir: tempfile::tempdir().unwrap() }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// Writes a file under the context, making its folders.
    pub fn write(&self, relative: &str, text: &str) {
        let path = self.join(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    pub fn read(&self, relative: &str) -> String {
        fs::read_to_string(self.join(relative)).unwrap()
    }

    /// The binary, in the context's folder, with no database settings inherited.
    pub fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_upshift"));
        command
            .current_dir(self.path())
            .env_remove("DATABASE_URL")
            .env_remove("UPSHIFT_DATABASE_URL")
            .env_remove("UPSHIFT_CONFIG")
            .env("NO_COLOR", "1");
        command
    }

    /// Runs `upshift ARGS` to completion.
    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(&self.command().args(args).output().unwrap())
    }

    /// Runs `upshift migrate ARGS --database-url URL`.
    pub fn migrate(&self, url: &str, args: &[&str]) -> Run {
        let mut all = vec!["migrate"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--database-url", url]);
        self.run(&all)
    }
}

/// The crash-at-every-write contract through the real binary, for any driver: `upgrade()`
/// is an `upshift upgrade --to V --yes` command, killed (abort, like kill -9) right after
/// the journal's Nth write for N = 1, 2, ... until a run finishes before its Nth write.
/// After each kill `recover(recovery)` runs `resume` (odd N) or `abort` (even N) with
/// `--output json` and returns it; it must exit 0 or 3, deployed or rolled back (or 1:
/// nothing was in flight); then `check(context)`
/// checks that the state converged and returns the deployed version, and a second
/// `abort` (from `recover`) must be a no-op. A converged 2.0.0 is rolled back (`recover`
/// given "rollback") for the next round. Returns the number of crash points.
pub fn crash_at_every_write(
    upgrade: impl Fn() -> Command,
    recover: impl Fn(&str) -> Run,
    check: impl Fn(&str) -> String,
) -> u64 {
    let mut write = 1;
    loop {
        let output = upgrade().env("UPSHIFT_TEST_CRASH_AT_WRITE", write.to_string()).output().unwrap();
        if let Some(code) = output.status.code() {
            // It finished before its Nth write: every crash point was tried, provided the
            // upgrade itself went through (a refusal would end the loop early).
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(code, 0, "the upgrade uncrashed at write {write} exited {code}: {stderr}");
            break;
        }
        let recovery = if write % 2 == 1 { "resume" } else { "abort" };
        let context = format!("killed at write {write}, then {recovery}");
        let run = recover(recovery);
        if !(run.code == 1 && run.stderr.contains("nothing is in flight")) {
            assert!([0, 3].contains(&run.code), "{context}: exited {}: {}", run.code, run.stderr);
            let result: serde_json::Value = run.json();
            let outcome = result["outcome"].as_str().unwrap_or_default();
            assert!(["succeeded", "rolled-back"].contains(&outcome), "{context}: {result}");
        }
        let version = check(&context);
        recover("abort").code(1).stderr_has("nothing is in flight");
        if version == "2.0.0" {
            recover("rollback").success();
        }
        write += 1;
    }
    assert!(write > 5, "the upgrade made only {} journal writes", write - 1);
    write - 1
}

/// One finding of `upshift migrate lint --output json` (and of a plan's `lint`).
#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct LintFinding {
    pub file: String,
    pub line: usize,
    pub revision: String,
    pub rule: String,
    pub message: String,
    pub fix: String,
    pub allowed: bool,
    pub reason: Option<String>,
}

/// `upshift status --output json`, as far as the driver tests read it.
#[derive(serde::Deserialize, Debug)]
pub struct Status {
    pub version: Option<String>,
    pub run: Option<serde_json::Value>,
    pub components: Vec<ComponentStatus>,
}

/// One component in [`Status`].
#[derive(serde::Deserialize, Debug)]
pub struct ComponentStatus {
    pub version: Option<String>,
    pub healthy: bool,
    pub problem: Option<String>,
    #[serde(default)]
    pub instances: Vec<serde_json::Value>,
}

/// The notes images `upshift-demo-notes:<release>` in the machine's Docker, made once per
/// test binary by `upshift demo --compose --prepare-only` (from this very binary).
pub fn notes_images() {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        Context::new().run(&["demo", "--compose", "--prepare-only", "--dir", "demo"]).success();
    });
}
