//! The Helm driver with the real Helm 3 CLI against the real v1.20 cluster (see
//! `kubernetes.rs`): three charts upgraded strictly in order, the second failing (the first
//! put back, the third never started, the schema undone); `helm test` failing as a verify
//! failure; kill -9 of upshift in the middle of `helm upgrade`, then `resume` or `abort`,
//! with no release left pending. Skipped, with the reason, without a cluster or `helm`;
//! under CI (`CI` set) that fails instead.

#![allow(clippy::print_stderr)] // the skip reason

mod common;

use std::fmt::Write as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Context, Run, Status};
use serde::Deserialize;

/// The test cluster's kubeconfig, when it answers and `helm` runs.
fn cluster() -> Option<String> {
    let path = std::env::var("UPSHIFT_TEST_KUBECONFIG").unwrap_or_else(|_| "/tmp/upshift-k8s/kubeconfig".into());
    let quiet = |program: &str, args: &[&str]| {
        Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    };
    let ready = std::path::Path::new(&path).exists()
        && quiet("kubectl", &["--kubeconfig", &path, "get", "--raw", "/readyz"])
        && quiet("helm", &["version", "--short"]);
    if ready {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI starts every engine, but no cluster answers at {path} or helm is missing (ci/engines/kubernetes.sh, ci/engines/helm.sh)"
    );
    eprintln!(
        "skipped: no Kubernetes cluster at {path}, or no helm (ci/engines/kubernetes.sh and helm.sh set them up)"
    );
    None
}

fn docker_tag(from: &str, to: &str) {
    let ok = Command::new("docker").args(["tag", from, to]).status().unwrap().success();
    assert!(ok, "docker tag {from} {to}");
}

/// The example's chart (`examples/helm/charts/notes`): the notes Deployment with a
/// readiness probe, and a `helm test` hook that passes unless the file
/// `fail-helm-test-<tag>` is in the data folder.
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/helm");

/// How long Helm waits for a release's pods. A rollback under the load of the other Helm
/// tests on two cores once took longer than 12 s in CI; `--wait` returns as soon as the
/// pods are ready, so only the cases that fail on purpose wait it whole.
const HELM_TIMEOUT: &str = "30s";

/// A namespace, the chart, the migrations and a manifest of three releases of it
/// (`platform`, `data`, `services`, in that order); the namespace goes on drop.
struct Charts {
    ctx: Context,
    kubeconfig: String,
    namespace: String,
}

impl Drop for Charts {
    fn drop(&mut self) {
        let _ = Command::new("kubectl")
            .args(["--kubeconfig", &self.kubeconfig, "delete", "namespace", &self.namespace, "--wait=false"])
            .output();
    }
}

#[derive(Deserialize, Debug)]
struct Entry {
    revision: u64,
    status: String,
    description: String,
}

impl Charts {
    /// `components`: each release's name and its image tag (with `{version}`); a tag with no
    /// image makes that release's `helm upgrade --wait` time out.
    fn new(components: &[(&str, &str)]) -> Option<Charts> {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let kubeconfig = cluster()?;
        common::notes_images();
        let ctx = Context::new();
        let namespace = format!("upshift-helm-{}-{}", std::process::id(), COUNT.fetch_add(1, Ordering::SeqCst));
        for file in ["Chart.yaml", "values.yaml", "templates/deployment.yaml", "templates/tests/test.yaml"] {
            let text = std::fs::read_to_string(format!("{EXAMPLE}/charts/notes/{file}")).unwrap();
            ctx.write(&format!("chart/{file}"), &text);
        }
        std::fs::create_dir_all(ctx.join("data")).unwrap();
        for (name, text) in notes::MIGRATIONS {
            ctx.write(&format!("migrations/{name}"), text);
        }
        let data = ctx.join("data").display().to_string();
        let mut manifest = "[app]\nname = \"notes\"\n\n[database]\nurl = \"sqlite:data/notes.db\"\n".to_owned();
        for (name, tag) in components {
            let _ = write!(
                manifest,
                "\n[[components]]\nname = \"{name}\"\ndriver = \"helm\"\nrelease = \"{name}\"\nchart = \"chart\"\n\
                 namespace = \"{namespace}\"\nset = {{ tag = \"{tag}\", dataDir = \"{data}\" }}\ntimeout = \"{HELM_TIMEOUT}\"\n\
                 tests = true\n"
            );
        }
        for (version, to) in [("1.0.0", "20260101000000"), ("2.0.0", "20260202000000"), ("3.0.0", "20260202000000")] {
            let _ = write!(manifest, "\n[[releases]]\nversion = \"{version}\"\nmigrate_to = \"{to}\"\n");
        }
        ctx.write("upshift.toml", &manifest);
        let charts = Charts { ctx, kubeconfig, namespace };
        let created = Command::new("kubectl")
            .args(["--kubeconfig", &charts.kubeconfig, "create", "namespace", &charts.namespace])
            .output()
            .unwrap();
        assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
        Some(charts)
    }

    fn command(&self) -> Command {
        let mut command = self.ctx.command();
        command.env("KUBECONFIG", &self.kubeconfig);
        command
    }

    fn upshift(&self, args: &[&str]) -> Run {
        Run::from(&self.command().args(args).arg("--yes").output().unwrap())
    }

    fn status(&self) -> Status {
        self.upshift(&["status", "--output", "json"]).success().json()
    }

    fn history(&self, release: &str) -> Vec<Entry> {
        let out = Command::new("helm")
            .args(["history", release, "--namespace", &self.namespace, "--output", "json"])
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .unwrap();
        if !out.status.success() {
            return Vec::new();
        }
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn has_table(&self, table: &str) -> bool {
        let db = rusqlite::Connection::open(self.ctx.join("data/notes.db")).unwrap();
        db.query_row("SELECT count(*) FROM sqlite_master WHERE name = ?1", [table], |r| r.get::<_, i64>(0)).unwrap()
            == 1
    }
}

#[test]
fn three_charts_upgrade_in_order_and_a_failure_in_the_second_undoes_the_first_and_the_schema() {
    // The data chart runs `data-<version>` images: leaving one out fails it.
    let Some(charts) = Charts::new(&[("platform", "{version}"), ("data", "data-{version}"), ("services", "{version}")])
    else {
        return;
    };
    docker_tag("upshift-demo-notes:1.0.0", "upshift-demo-notes:data-1.0.0");
    // A tag left by an earlier run of this test would let 2.0.0 pass.
    let _ = Command::new("docker").args(["rmi", "upshift-demo-notes:data-2.0.0"]).output();
    charts.upshift(&["upgrade", "--to", "1.0.0"]).success().stderr_has("deploy platform (helm, as its chart says)");
    for release in ["platform", "data", "services"] {
        assert_eq!(charts.history(release).last().unwrap().status, "deployed", "{release}");
    }
    // 2.0.0: the data chart's image is not there, so its `helm upgrade --wait` times out.
    // platform is rolled back to its recorded revision, services never started, and the
    // expand migration is reverted.
    let run = charts.upshift(&["upgrade", "--to", "2.0.0"]);
    run.code(3).stderr_has("deploy data").stderr_has("undoing (code + down)").stderr_has("platform: 1.0.0 is back");
    let platform = charts.history("platform");
    assert_eq!(
        platform.iter().map(|r| r.status.as_str()).collect::<Vec<_>>(),
        ["superseded", "superseded", "deployed"]
    );
    assert_eq!(platform.last().unwrap().description, "Rollback to 1");
    assert_eq!(charts.history("data").last().unwrap().description, "Rollback to 1");
    assert_eq!(charts.history("services").len(), 1, "services was touched");
    assert!(!charts.has_table("tags"), "the expand revision was not reverted");
    // `history` puts each Helm revision next to the upshift release whose run made it.
    let history: Vec<serde_json::Value> = charts.upshift(&["history", "--output", "json"]).success().json();
    assert_eq!(history[0]["helm"], serde_json::json!({ "platform": [1], "data": [1], "services": [1] }));
    assert_eq!(history[1]["helm"], serde_json::json!({ "platform": [2, 3], "data": [2, 3] }));
    charts.upshift(&["history"]).success().stdout_has("data r2,r3; platform r2,r3");
    let status = charts.status();
    assert_eq!(status.version.as_deref(), Some("1.0.0"));
    assert!(status.components.iter().all(|c| c.healthy && c.version.as_deref() == Some("1.0.0")), "{status:?}");

    // With the image there, the same upgrade goes through, in order.
    docker_tag("upshift-demo-notes:2.0.0", "upshift-demo-notes:data-2.0.0");
    charts.upshift(&["upgrade", "--to", "2.0.0"]).success();
    assert!(charts.has_table("tags"));
    // And `upshift rollback` takes all three back, with the database (restore).
    charts.upshift(&["rollback"]).success().stderr_has("restored backup");
    let status = charts.status();
    assert!(status.components.iter().all(|c| c.healthy && c.version.as_deref() == Some("1.0.0")), "{status:?}");
    assert!(!charts.has_table("tags"));
}

#[test]
fn a_failing_helm_test_fails_verify_and_the_release_is_undone() {
    let Some(charts) = Charts::new(&[("services", "{version}")]) else { return };
    charts.upshift(&["upgrade", "--to", "1.0.0"]).success();
    // The plan shows the values that change, from the cluster's own rendering.
    charts.upshift(&["plan", "--to", "2.0.0"]).success().stdout_has("helm services values: tag \"1.0.0\" -> \"2.0.0\"");
    charts.ctx.write("data/fail-helm-test-2.0.0", "");
    charts.upshift(&["upgrade", "--to", "2.0.0"]).code(3).stderr_has("helm test services").stderr_has("1.0.0 is back");
    assert_eq!(charts.status().components[0].version.as_deref(), Some("1.0.0"));
}

/// Starts `upgrade --to 2.0.0`, waits until Helm marks the release pending, and kills
/// upshift and its `helm` with SIGKILL.
fn kill_during_helm_upgrade(charts: &Charts) {
    let mut child = charts
        .command()
        .args(["upgrade", "--to", "2.0.0", "--yes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_mins(1);
    while !charts.history("services").last().is_some_and(|r| r.status.starts_with("pending-")) {
        assert!(Instant::now() < deadline, "the release never went pending");
        assert!(child.try_wait().unwrap().is_none(), "upshift ended before helm upgrade began");
        std::thread::sleep(Duration::from_millis(20));
    }
    let group = i32::try_from(child.id()).unwrap();
    let killed = Command::new("kill").args(["-KILL", "--", &format!("-{group}")]).status().unwrap();
    assert!(killed.success());
    let _ = child.wait();
}

#[test]
fn killed_during_helm_upgrade_then_resume_or_abort_leaves_nothing_pending() {
    // `slow-2.0.0` has no image: the upgrade stays pending until its timeout, long enough
    // to be killed in the middle.
    let Some(charts) = Charts::new(&[("services", "slow-{version}")]) else { return };
    docker_tag("upshift-demo-notes:1.0.0", "upshift-demo-notes:slow-1.0.0");
    charts.upshift(&["upgrade", "--to", "1.0.0"]).success();
    for recovery in ["abort", "resume"] {
        kill_during_helm_upgrade(&charts);
        assert!(charts.history("services").last().unwrap().status.starts_with("pending-"));
        // Preflight of another upgrade refuses to touch a pending release.
        charts.upshift(&["upgrade", "--to", "2.0.0"]).code(1).stderr_has("did not finish");
        let run = charts.upshift(&[recovery]);
        assert!([0, 3].contains(&run.code), "{recovery}: {}", run.stderr);
        run.stderr_has("by an interrupted run");
        let last = charts.history("services").pop().unwrap();
        assert_eq!(last.status, "deployed", "{recovery}: {last:?}");
        let status = charts.status();
        assert!(status.run.is_none(), "{recovery}: {status:?}");
        assert_eq!(status.components[0].version, status.version, "{recovery}: {status:?}");
        assert!(status.components[0].healthy, "{recovery}: {status:?}");
        // Undoing again is a no-op.
        charts.upshift(&["abort"]).code(1).stderr_has("nothing is in flight");
        eprintln!("{recovery}: {} at revision {}", status.version.unwrap_or_default(), last.revision);
    }
}

/// The crash-at-every-write contract on Helm: 1.0.0 -> 2.0.0 killed after each journal
/// write, then `resume` or `abort` (alternating): nothing in flight, no release pending,
/// the journal's version is what the release runs.
#[test]
fn killed_at_every_journal_write_then_resume_or_abort_converges() {
    let Some(charts) = Charts::new(&[("services", "{version}")]) else { return };
    charts.upshift(&["upgrade", "--to", "1.0.0"]).success();
    let points = common::crash_at_every_write(
        || {
            let mut command = charts.command();
            command.args(["upgrade", "--to", "2.0.0", "--yes"]);
            command
        },
        |recovery| charts.upshift(&[recovery, "--output", "json"]),
        |context| {
            let status = charts.status();
            assert!(status.run.is_none(), "{context}: {status:?}");
            assert_eq!(status.components[0].version, status.version, "{context}: {status:?}");
            assert!(status.components[0].healthy, "{context}: {status:?}");
            let last = charts.history("services").pop().unwrap();
            assert_eq!(last.status, "deployed", "{context}: {last:?}");
            status.version.unwrap_or_else(|| panic!("{context}: nothing deployed"))
        },
    );
    eprintln!("{points} crash points, each converged with no release pending");
}

#[test]
fn helm_settings_are_checked_with_their_line() {
    let ctx = Context::new();
    let manifest = |extra: &str| {
        format!(
            "[app]\nname = \"x\"\n\n[[components]]\nname = \"api\"\ndriver = \"helm\"\nrelease = \"api\"\nchart = \"c\"\n{extra}\n\n[[releases]]\nversion = \"1.0.0\"\n"
        )
    };
    ctx.write("upshift.toml", &manifest("strategy = \"rolling\""));
    ctx.run(&["plan", "--to", "1.0.0"]).code(2).stderr_has("upshift.toml:5").stderr_has("rolls out as its chart says");
    ctx.write("upshift.toml", &manifest("set = { \"image.tag\" = \"{version}\" }"));
    ctx.run(&["plan", "--to", "1.0.0"]).success().stdout_has("deploy api (helm, as its chart says)");
    // The example's manifest holds.
    let example = format!("{EXAMPLE}/upshift.toml");
    let run = Run::from(
        &ctx.command()
            .args(["config", "check", "--to", "2.0.0", "--config", &example])
            .env("NOTES_DATA", "/tmp")
            .output()
            .unwrap(),
    );
    run.success();
}
