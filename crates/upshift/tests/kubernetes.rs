//! The Kubernetes driver against a real v1.20 cluster (`ci/engines/kubernetes.sh start`:
//! API server, controllers, scheduler and a real kubelet on the Docker Engine): the notes
//! service as a Deployment (its image made by `upshift demo --compose --prepare-only`, its
//! SQLite file on a hostPath), upgraded, stuck at its progress deadline and put back,
//! rolled back, and killed at every journal write. Skipped, with the reason, when no
//! cluster answers; under CI (`CI` set) a missing cluster fails instead.

#![allow(clippy::print_stderr)] // the skip reason, and the figures the closing note quotes

mod common;

use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use common::{Context, Run, Status};

/// The kubeconfig of the test cluster: `UPSHIFT_TEST_KUBECONFIG`, else the one
/// `ci/engines/kubernetes.sh start` writes.
fn kubeconfig() -> Option<String> {
    let path = std::env::var("UPSHIFT_TEST_KUBECONFIG").unwrap_or_else(|_| "/tmp/upshift-k8s/kubeconfig".into());
    let answers = std::path::Path::new(&path).exists()
        && Command::new("kubectl")
            .args(["--kubeconfig", &path, "get", "--raw", "/readyz"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if answers {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI starts every engine, but no Kubernetes cluster answers at {path} (ci/engines/kubernetes.sh start)"
    );
    eprintln!("skipped: no Kubernetes cluster answers at {path} (ci/engines/kubernetes.sh start runs one)");
    None
}

/// The test Deployment. Its progress deadline is 30 s: a rolling update under the load of
/// the other cluster tests on two cores once took longer than 12 s in CI; a rollout that
/// progresses ends as soon as it is done, so only the releases that never get ready (on
/// purpose) wait it whole.
const DEPLOYMENT: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: notes, namespace: NAMESPACE}
spec:
  replicas: 2
  progressDeadlineSeconds: 30
  selector: {matchLabels: {app: notes}}
  template:
    metadata: {labels: {app: notes}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: notes
        image: upshift-demo-notes:1.0.0
        imagePullPolicy: Never
        env: [{name: DATABASE_URL, value: "sqlite:/data/notes.db"}]
        ports: [{containerPort: 8080}]
        readinessProbe: {httpGet: {path: /health, port: 8080}, periodSeconds: 1, failureThreshold: 2}
        volumeMounts: [{name: data, mountPath: /data}]
      volumes: [{name: data, hostPath: {path: DATA_DIR}}]
"#;

/// A namespace with the notes Deployment running 1.0.0 (applied by hand, as before
/// upshift), its database migrated to 1.0.0; the namespace goes on drop.
struct Cluster {
    ctx: Context,
    kubeconfig: String,
    namespace: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.kubectl_output(&["delete", "namespace", &self.namespace, "--wait=false"]);
    }
}

impl Cluster {
    fn new() -> Option<Cluster> {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let kubeconfig = kubeconfig()?;
        common::notes_images();
        let ctx = Context::new();
        let namespace = format!("upshift-test-{}-{}", std::process::id(), COUNT.fetch_add(1, Ordering::SeqCst));
        std::fs::create_dir_all(ctx.join("data")).unwrap();
        for (name, text) in notes::MIGRATIONS {
            ctx.write(&format!("migrations/{name}"), text);
        }
        ctx.write(
            "upshift.toml",
            &format!(
                r#"[app]
name = "notes"

[database]
url = "sqlite:data/notes.db"

[[components]]
name = "api"
driver = "kubernetes"
namespace = "{namespace}"
deployment = "notes"
image = "upshift-demo-notes:{{version}}"

[[releases]]
version = "1.0.0"
migrate_to = "20260101000000"

[[releases]]
version = "2.0.0"
migrate_to = "20260202000000"

[[releases]]
version = "3.0.0"
migrate_to = "20260202000000"
"#
            ),
        );
        let cluster = Cluster { ctx, kubeconfig, namespace };
        cluster.ctx.run(&["migrate", "up", "20260101000000"]).success();
        cluster.kubectl(&["create", "namespace", &cluster.namespace]);
        let deployment = DEPLOYMENT
            .replace("NAMESPACE", &cluster.namespace)
            .replace("DATA_DIR", &cluster.ctx.join("data").display().to_string());
        cluster.ctx.write("deployment.yaml", &deployment);
        cluster.kubectl(&["apply", "-f", &cluster.ctx.join("deployment.yaml").display().to_string()]);
        cluster.kubectl(&["-n", &cluster.namespace, "rollout", "status", "deployment/notes", "--timeout=60s"]);
        Some(cluster)
    }

    /// Puts a Service in front of the Deployment and the component on blue-green through it,
    /// with `extra` manifest keys.
    fn blue_green(&self, extra: &str) {
        self.ctx.write("service.yaml", &SERVICE.replace("NAMESPACE", &self.namespace));
        self.kubectl(&["apply", "-f", &self.ctx.join("service.yaml").display().to_string()]);
        let manifest = self.ctx.read("upshift.toml").replace(
            "deployment = \"notes\"",
            &format!("deployment = \"notes\"\nstrategy = \"blue-green\"\nservice = \"notes\"\n{extra}"),
        );
        self.ctx.write("upshift.toml", &manifest);
    }

    /// Puts the component on canary with steps 50 and 100 of `step_interval` each.
    fn canary(&self, step_interval: &str) {
        let manifest = self.ctx.read("upshift.toml").replace(
            "deployment = \"notes\"",
            &format!(
                "deployment = \"notes\"\nstrategy = \"canary\"\nsteps = [50, 100]\nstep_interval = \"{step_interval}\""
            ),
        );
        self.ctx.write("upshift.toml", &manifest);
    }

    fn kubectl_output(&self, args: &[&str]) -> std::process::Output {
        Command::new("kubectl").arg("--kubeconfig").arg(&self.kubeconfig).args(args).output().unwrap()
    }

    fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_output(args);
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn upshift(&self, args: &[&str]) -> Run {
        let mut command = self.ctx.command();
        command.args(args).arg("--yes").env("KUBECONFIG", &self.kubeconfig);
        Run::from(&command.output().unwrap())
    }

    fn status(&self) -> Status {
        self.upshift(&["status", "--output", "json"]).success().json()
    }

    /// The Deployment's field at `path` (a kubectl `JSONPath`).
    fn field(&self, path: &str) -> String {
        self.kubectl(&["-n", &self.namespace, "get", "deployment", "notes", "-o", &format!("jsonpath={{{path}}}")])
    }

    /// The pods (matching the label `selector`, if any) that are ready and not going away.
    fn ready_pods(&self, selector: Option<&str>) -> Vec<serde_json::Value> {
        let mut args = vec!["-n", &self.namespace, "get", "pods", "-o", "json"];
        if let Some(selector) = selector {
            args.extend(["-l", selector]);
        }
        let pods: serde_json::Value = serde_json::from_str(&self.kubectl(&args)).unwrap();
        pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .filter(|p| {
                p["status"]["conditions"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
            })
            .cloned()
            .collect()
    }

    /// The images of the pods that are ready and not going away.
    fn ready_images(&self) -> Vec<String> {
        let mut images: Vec<String> = self
            .ready_pods(None)
            .iter()
            .map(|p| p["spec"]["containers"][0]["image"].as_str().unwrap().to_owned())
            .collect();
        images.sort();
        images
    }
}

/// Watches the Deployment's available replicas while `work` runs; the lowest seen.
fn fewest_available(cluster: &Cluster, work: impl FnOnce()) -> i64 {
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, kubeconfig, namespace) = (Arc::clone(&stop), cluster.kubeconfig.clone(), cluster.namespace.clone());
        std::thread::spawn(move || {
            let mut fewest = i64::MAX;
            while !stop.load(Ordering::SeqCst) {
                let out = Command::new("kubectl")
                    .args(["--kubeconfig", &kubeconfig, "-n", &namespace, "get", "deployment", "notes"])
                    .args(["-o", "jsonpath={.status.availableReplicas}"])
                    .output()
                    .unwrap();
                if let Ok(n) = String::from_utf8_lossy(&out.stdout).trim().parse::<i64>() {
                    fewest = fewest.min(n);
                } else {
                    fewest = 0;
                }
            }
            fewest
        })
    };
    work();
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap()
}

#[test]
fn a_rolling_upgrade_keeps_every_replica_available_and_a_stuck_rollout_is_put_back() {
    let Some(cluster) = Cluster::new() else { return };
    // The Deployment someone applied is taken over by the first deploy.
    let started = Instant::now();
    let fewest = fewest_available(&cluster, || {
        cluster.upshift(&["upgrade", "--to", "1.0.0"]).success().stderr_has("taking over 1.0.0");
    });
    eprintln!("take over 1.0.0: {:.1}s, fewest available replicas {fewest} of 2", started.elapsed().as_secs_f64());
    assert_eq!(fewest, 2, "a replica was unavailable during the rollout");

    let started = Instant::now();
    let fewest = fewest_available(&cluster, || {
        cluster.upshift(&["upgrade", "--to", "2.0.0"]).success().stderr_has("deploy api (kubernetes, rolling)");
    });
    eprintln!(
        "rolling 1.0.0 -> 2.0.0: {:.1}s, fewest available replicas {fewest} of 2",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(fewest, 2, "a replica was unavailable during the rollout");
    assert_eq!(cluster.ready_images(), ["upshift-demo-notes:2.0.0", "upshift-demo-notes:2.0.0"]);
    assert_eq!(cluster.field(".spec.strategy.rollingUpdate.maxUnavailable"), "0");

    // 3.0.0 never gets ready: stopped at the progress deadline, 2.0.0's template put back
    // from the journal, and 2.0.0 served throughout.
    let started = Instant::now();
    let fewest = fewest_available(&cluster, || {
        cluster
            .upshift(&["upgrade", "--to", "3.0.0"])
            .code(3)
            .stderr_has("exceeded its progress deadline")
            .stderr_has("2.0.0 is back");
    });
    eprintln!(
        "stuck 3.0.0, put back: {:.1}s, fewest available replicas {fewest} of 2",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(fewest, 2, "a replica was unavailable while 3.0.0 was stuck and put back");
    assert_eq!(cluster.ready_images(), ["upshift-demo-notes:2.0.0", "upshift-demo-notes:2.0.0"]);
    let status = cluster.status();
    assert_eq!(status.version.as_deref(), Some("2.0.0"));
    assert_eq!(status.components[0].version.as_deref(), Some("2.0.0"));
    assert!(status.components[0].healthy, "{status:?}");

    // Back to 1.0.0: the Deployment scaled to zero while the backup is restored, then 1.0.0.
    cluster.upshift(&["rollback"]).success().stderr_has("restored backup");
    assert_eq!(cluster.ready_images(), ["upshift-demo-notes:1.0.0", "upshift-demo-notes:1.0.0"]);
    assert_eq!(cluster.field(".spec.template.metadata.annotations.upshift\\.dev/version"), "1.0.0");
}

const SERVICE: &str = r"apiVersion: v1
kind: Service
metadata: {name: notes, namespace: NAMESPACE}
spec:
  selector: {app: notes}
  ports: [{port: 80, targetPort: 8080}]
";

/// While `work` runs, what the Service selects and how many ready endpoints it has,
/// sampled continuously: (slots seen, fewest endpoints).
fn watch_service(cluster: &Cluster, work: impl FnOnce()) -> (Vec<String>, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, kubeconfig, namespace) = (Arc::clone(&stop), cluster.kubeconfig.clone(), cluster.namespace.clone());
        std::thread::spawn(move || {
            let (mut slots, mut fewest) = (Vec::<String>::new(), usize::MAX);
            while !stop.load(Ordering::SeqCst) {
                let get = |what: &str, path: &str| {
                    let out = Command::new("kubectl")
                        .args(["--kubeconfig", &kubeconfig, "-n", &namespace, "get", what, "notes", "-o"])
                        .arg(format!("jsonpath={{{path}}}"))
                        .output()
                        .unwrap();
                    String::from_utf8_lossy(&out.stdout).trim().to_owned()
                };
                let slot = get("service", ".spec.selector.upshift\\.dev/slot");
                if slots.last() != Some(&slot) {
                    slots.push(slot);
                }
                fewest = fewest.min(get("endpoints", ".subsets[*].addresses[*].ip").split_whitespace().count());
            }
            (slots, fewest)
        })
    };
    work();
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap()
}

/// Blue-green by Service selector (seed 003): the new version in the other slot's
/// Deployment, waited ready, the selector switched in one patch, the old slot scaled to
/// zero; a release that never gets ready is never selected; rollback selects the old slot.
#[test]
fn blue_green_switches_the_service_selector_and_a_failed_release_is_never_selected() {
    let Some(cluster) = Cluster::new() else { return };
    cluster.blue_green("");
    let slot = || {
        cluster.kubectl(&[
            "-n",
            &cluster.namespace,
            "get",
            "service",
            "notes",
            "-o",
            "jsonpath={.spec.selector.upshift\\.dev/slot}",
        ])
    };

    // The first deploy takes the Deployment over as slot blue (its pods relabelled, then
    // selected), then deploys into slot green and switches to it, without a gap.
    let replicas = |name: &str| {
        cluster.kubectl(&["-n", &cluster.namespace, "get", "deployment", name, "-o", "jsonpath={.spec.replicas}"])
    };
    let (slots, fewest) = watch_service(&cluster, || {
        cluster.upshift(&["upgrade", "--to", "1.0.0"]).success().stderr_has("becomes slot blue");
    });
    assert_eq!(slot(), "green", "{slots:?}");
    assert!(fewest >= 1, "the Service had no endpoint during the take-over");
    assert_eq!((replicas("notes"), replicas("notes-green")), ("0".to_owned(), "2".to_owned()));

    let started = Instant::now();
    let (slots, fewest) = watch_service(&cluster, || {
        cluster.upshift(&["upgrade", "--to", "2.0.0"]).success().stderr_has("selects slot blue");
    });
    eprintln!(
        "blue-green 1.0.0 -> 2.0.0: {:.1}s, slots {slots:?}, fewest endpoints {fewest}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(slots.last().map(String::as_str), Some("blue"));
    assert!(fewest >= 1, "the Service had no endpoint during the switch");
    assert_eq!(cluster.ready_images(), ["upshift-demo-notes:2.0.0", "upshift-demo-notes:2.0.0"]);
    assert_eq!((replicas("notes"), replicas("notes-green")), ("2".to_owned(), "0".to_owned()));

    // 3.0.0 never gets ready in slot green: the Service stays on blue throughout.
    let (slots, fewest) = watch_service(&cluster, || {
        cluster.upshift(&["upgrade", "--to", "3.0.0"]).code(3).stderr_has("exceeded its progress deadline");
    });
    assert_eq!(slots, ["blue"], "the Service selected a release that was not ready");
    assert!(fewest >= 2, "blue lost endpoints while 3.0.0 failed");
    assert_eq!(cluster.status().components[0].version.as_deref(), Some("2.0.0"));
    assert_eq!(replicas("notes-green"), "0");

    // Rollback: slot green gets 1.0.0's template and replicas back and is selected.
    cluster.upshift(&["rollback"]).success();
    assert_eq!(slot(), "green");
    assert_eq!(cluster.ready_images(), ["upshift-demo-notes:1.0.0", "upshift-demo-notes:1.0.0"]);
    assert_eq!(cluster.status().components[0].version.as_deref(), Some("1.0.0"));
}

/// The ready pods of one Deployment (`notes-canary`, or the others).
fn ready_of(cluster: &Cluster, track: &str) -> usize {
    let selector = if track == "canary" { "upshift.dev/track=canary" } else { "!upshift.dev/track" };
    cluster.ready_pods(Some(selector)).len()
}

/// Canary by replica share: at 50 % one of the two replicas runs the new version in
/// `notes-canary`, watched for its step, then the Deployment rolls and the canary goes to
/// zero. A canary that never gets ready is undone: the Deployment never gave up a replica.
#[test]
fn a_canary_follows_its_steps_and_one_that_never_gets_ready_is_undone() {
    let Some(cluster) = Cluster::new() else { return };
    cluster.canary("2s");
    cluster.upshift(&["upgrade", "--to", "1.0.0"]).success();

    let started = Instant::now();
    let fewest = fewest_available(&cluster, || {
        cluster
            .upshift(&["upgrade", "--to", "2.0.0"])
            .success()
            .stderr_has("canary at 50%: 1 of 2 replicas run 2.0.0")
            .stderr_has("every canary pod stayed ready for 2s")
            .stderr_has("canary at 100%: notes rolls to 2.0.0");
    });
    eprintln!("canary 1.0.0 -> 2.0.0 (50%, 100%): {:.1}s", started.elapsed().as_secs_f64());
    assert!(fewest >= 1, "the Deployment had no available replica");
    assert_eq!(cluster.ready_images(), ["upshift-demo-notes:2.0.0", "upshift-demo-notes:2.0.0"]);
    assert_eq!(
        cluster.kubectl(&[
            "-n",
            &cluster.namespace,
            "get",
            "deployment",
            "notes-canary",
            "-o",
            "jsonpath={.spec.replicas}"
        ]),
        "0"
    );

    let started = Instant::now();
    let fewest = fewest_available(&cluster, || {
        cluster
            .upshift(&["upgrade", "--to", "3.0.0"])
            .code(3)
            .stderr_has("canary at 50%")
            .stderr_has("exceeded its progress deadline")
            .stderr_has("2.0.0 is back");
    });
    eprintln!("canary 3.0.0 never ready, undone: {:.1}s", started.elapsed().as_secs_f64());
    assert_eq!(fewest, 2, "the Deployment gave up a replica to a canary that was never ready");
    assert_eq!(ready_of(&cluster, "canary"), 0);
    assert_eq!(ready_of(&cluster, "stable"), 2);
    assert_eq!(cluster.ready_images(), ["upshift-demo-notes:2.0.0", "upshift-demo-notes:2.0.0"]);
    assert_eq!(cluster.status().components[0].version.as_deref(), Some("2.0.0"));
}

/// A real Prometheus (Debian's `prometheus`, `ci/engines/prometheus.sh`) on a free port,
/// scraping itself every 200 ms; stopped on drop.
struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start() -> Option<Prometheus> {
        if Command::new("prometheus").arg("--version").output().is_err() {
            assert!(std::env::var_os("CI").is_none(), "CI installs Prometheus (ci/engines/prometheus.sh)");
            eprintln!("skipped: no `prometheus` binary (ci/engines/prometheus.sh installs Debian's)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 200ms, evaluation_interval: 200ms}}\n\
                 scrape_configs: [{{job_name: prometheus, static_configs: [{{targets: ['127.0.0.1:{port}']}}]}}]\n"
            ),
        )
        .unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let prometheus = Prometheus { child, url: format!("http://127.0.0.1:{port}"), _dir: dir };
        // Ready when its own scrape has a sample to query.
        let deadline = Instant::now() + std::time::Duration::from_mins(1);
        loop {
            let out = Command::new("curl")
                .args(["-sf", &format!("{}/api/v1/query", prometheus.url), "--data-urlencode"])
                .arg("query=up{job=\"prometheus\"}")
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).contains("\"value\"") {
                return Some(prometheus);
            }
            assert!(Instant::now() < deadline, "Prometheus never scraped itself");
        }
    }
}

/// A canary step judged on PromQL too: the queries (with `{version}`) asked of a real
/// Prometheus at the end of each step, with the process driver's verdict rule. Real data
/// (Prometheus's own `up` series) scaled to the figures each case needs.
#[test]
fn a_canary_is_judged_on_prometheus_queries_when_they_are_set() {
    let Some(cluster) = Cluster::new() else { return };
    let Some(prometheus) = Prometheus::start() else { return };
    let original = cluster.ctx.read("upshift.toml");
    let manifest = |error_rate: &str, p99: &str| {
        let canary = original.replace(
            "deployment = \"notes\"\n",
            "deployment = \"notes\"\nstrategy = \"canary\"\nsteps = [50, 100]\nstep_interval = \"1s\"\n\
             max_error_rate = 0.05\nmax_p99_ms = 100\n",
        );
        let (head, releases) = canary.split_once("[[releases]]").unwrap();
        let verify = format!(
            "[verify]\nprometheus = {{ url = \"{}\", error_rate = '{error_rate}', p99_ms = '{p99}' }}\n\n",
            prometheus.url
        );
        cluster.ctx.write("upshift.toml", &format!("{head}{verify}[[releases]]{releases}"));
    };
    let up = "sum(up{job=\"prometheus\"})";
    manifest(&format!("{up} * 0"), &format!("{up} * 12"));
    cluster.upshift(&["upgrade", "--to", "1.0.0"]).success();
    cluster
        .upshift(&["upgrade", "--to", "2.0.0"])
        .success()
        .stderr_has("canary at 50%: Prometheus says error rate 0.0%, p99 12.0 ms");
    cluster.upshift(&["rollback"]).success();

    // A p99 over max_p99_ms undoes the canary: the Deployment never left 1.0.0.
    manifest(&format!("{up} * 0"), &format!("{up} * 250"));
    cluster
        .upshift(&["upgrade", "--to", "2.0.0"])
        .code(3)
        .stderr_has("canary at 50%: p99 250.0 ms is over max_p99_ms 100 ms (Prometheus)")
        .stderr_has("1.0.0 is back");
    assert_eq!(cluster.ready_images(), ["upshift-demo-notes:1.0.0", "upshift-demo-notes:1.0.0"]);
    assert_eq!(ready_of(&cluster, "canary"), 0);

    // No data for the new version: too little to judge, so the step does not pass.
    manifest("sum(rate(http_requests_total{version=\"{version}\"}[1m]))", &format!("{up} * 12"));
    cluster
        .upshift(&["upgrade", "--to", "2.0.0"])
        .code(3)
        .stderr_has("the error_rate query returned no data")
        .stderr_has("version=\"2.0.0\"");
    assert_eq!(cluster.status().components[0].version.as_deref(), Some("1.0.0"));
}

#[test]
fn a_missing_deployment_or_container_is_refused_in_preflight() {
    let Some(cluster) = Cluster::new() else { return };
    let manifest = cluster.ctx.read("upshift.toml");
    cluster.ctx.write("upshift.toml", &manifest.replace("deployment = \"notes\"", "deployment = \"nope\""));
    cluster.upshift(&["upgrade", "--to", "1.0.0"]).code(1).stderr_has("deployment nope does not exist");
    cluster.ctx.write(
        "upshift.toml",
        &manifest.replace("deployment = \"notes\"", "deployment = \"notes\"\ncontainer = \"sidecar\""),
    );
    cluster.upshift(&["upgrade", "--to", "1.0.0"]).code(1).stderr_has("has no container sidecar (it has notes)");
    // Nothing was changed: still the hand-applied 1.0.0, not annotated.
    assert_eq!(cluster.field(".spec.template.metadata.annotations"), "");
}

/// The crash-at-every-write contract on the cluster's component: 1.0.0 -> 2.0.0 killed
/// after each journal write in turn, then `resume` or `abort` (alternating): nothing in
/// flight after, the journal's version is what the component runs and every ready pod
/// (of whichever slot) runs it. Returns the number of crash points.
fn converges_at_every_write(cluster: &Cluster) -> u64 {
    cluster.upshift(&["upgrade", "--to", "1.0.0"]).success();
    common::crash_at_every_write(
        || {
            let mut command = cluster.ctx.command();
            command.args(["upgrade", "--to", "2.0.0", "--yes"]).env("KUBECONFIG", &cluster.kubeconfig);
            command
        },
        |recovery| cluster.upshift(&[recovery, "--output", "json"]),
        |context| {
            let status = cluster.status();
            assert!(status.run.is_none(), "{context}: {status:?}");
            let version = status.version.clone().unwrap_or_else(|| panic!("{context}: nothing deployed"));
            assert_eq!(status.components[0].version.as_deref(), Some(version.as_str()), "{context}: {status:?}");
            assert!(status.components[0].healthy, "{context}: {:?}", status.components[0].problem);
            let image = format!("upshift-demo-notes:{version}");
            assert_eq!(cluster.ready_images(), [image.clone(), image], "{context}: another version still serves");
            version
        },
    )
}

#[test]
fn killed_mid_rollout_at_every_journal_write_then_resume_or_abort_converges() {
    let Some(cluster) = Cluster::new() else { return };
    let points = converges_at_every_write(&cluster);
    eprintln!("{points} crash points, each converged");
}

/// The same contract under blue-green: whatever write the kill comes after, `resume` or
/// `abort` leaves the Service selecting one slot, that slot running the journal's version
/// on every ready pod, and the other slot at zero.
#[test]
fn killed_mid_blue_green_at_every_journal_write_then_resume_or_abort_converges() {
    let Some(cluster) = Cluster::new() else { return };
    cluster.blue_green("drain = \"1s\"");
    let points = converges_at_every_write(&cluster);
    eprintln!("blue-green: {points} crash points, each converged");
}

/// The same contract under canary: `resume` or `abort` leaves the canary at zero and
/// every ready pod on the journal's version.
#[test]
fn killed_mid_canary_at_every_journal_write_then_resume_or_abort_converges() {
    let Some(cluster) = Cluster::new() else { return };
    cluster.canary("1s");
    let points = converges_at_every_write(&cluster);
    assert_eq!(ready_of(&cluster, "canary"), 0);
    eprintln!("canary: {points} crash points, each converged");
}

/// kill -9 of upshift while its canary is being judged (one replica on each Deployment),
/// then `resume` (the canary goes on with the same total, 2.0.0 everywhere) and, after a
/// rollback and another kill, `abort` (1.0.0's template and both replicas back, the canary
/// at zero).
#[test]
fn killed_while_a_canary_is_judged_then_resume_or_abort_converges() {
    let Some(cluster) = Cluster::new() else { return };
    cluster.canary("15s");
    cluster.upshift(&["upgrade", "--to", "1.0.0"]).success();
    let replicas = || cluster.field(".spec.replicas");
    let kill_mid_canary = || {
        let mut child = cluster.ctx.command();
        let mut child = child
            .args(["upgrade", "--to", "2.0.0", "--yes"])
            .env("KUBECONFIG", &cluster.kubeconfig)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + std::time::Duration::from_mins(1);
        while !(ready_of(&cluster, "canary") == 1 && replicas() == "1") {
            assert!(Instant::now() < deadline, "the canary never reached its 50% step");
            assert!(child.try_wait().unwrap().is_none(), "upshift ended before the canary was judged");
        }
        let group = format!("-{}", child.id());
        assert!(Command::new("kill").args(["-KILL", "--", &group]).status().unwrap().success());
        let _ = child.wait();
    };
    let converged = |version: &str| {
        let status = cluster.status();
        assert!(status.run.is_none(), "{status:?}");
        assert_eq!(status.version.as_deref(), Some(version));
        let image = format!("upshift-demo-notes:{version}");
        assert_eq!(cluster.ready_images(), [image.clone(), image]);
        assert_eq!(replicas(), "2");
        assert_eq!(ready_of(&cluster, "canary"), 0);
    };

    kill_mid_canary();
    cluster.upshift(&["resume"]).success().stderr_has("canary at 50%");
    converged("2.0.0");
    cluster.upshift(&["rollback"]).success();
    converged("1.0.0");

    kill_mid_canary();
    cluster.upshift(&["abort"]).success();
    converged("1.0.0");
    cluster.upshift(&["abort"]).code(1).stderr_has("nothing is in flight");
}

/// `manifests`: the component's objects in files, `{version}` filled in, applied
/// server-side by the field manager `upshift`; what an undo puts back is every object as it
/// was, from the journal.
#[test]
fn manifests_are_applied_server_side_and_put_back_from_the_journal() {
    let Some(cluster) = Cluster::new() else { return };
    let ns = cluster.namespace.clone();
    // The hand-applied Deployment goes: the files create it.
    cluster.kubectl(&["-n", &ns, "delete", "deployment", "notes", "--wait=true"]);
    let deployment = DEPLOYMENT
        .replace("namespace: NAMESPACE", "labels: {app: notes}")
        .replace("upshift-demo-notes:1.0.0", "upshift-demo-notes:{version}")
        .replace("DATA_DIR", &cluster.ctx.join("data").display().to_string());
    cluster.ctx.write("k8s/deployment.yaml", &deployment);
    cluster.ctx.write(
        "k8s/settings.yaml",
        "# the release's settings\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes-settings}\ndata: {release: \"{version}\"}\n---\n",
    );
    let manifest = cluster
        .ctx
        .read("upshift.toml")
        .replace("image = \"upshift-demo-notes:{version}\"", "manifests = [\"k8s/*.yaml\"]");
    cluster.ctx.write("upshift.toml", &manifest);
    let setting =
        || cluster.kubectl(&["-n", &ns, "get", "configmap", "notes-settings", "-o", "jsonpath={.data.release}"]);

    cluster.upshift(&["upgrade", "--to", "1.0.0"]).success().stderr_has("applying 2 object(s) server-side");
    assert_eq!(setting(), "1.0.0");
    assert_eq!(cluster.ready_images(), ["upshift-demo-notes:1.0.0", "upshift-demo-notes:1.0.0"]);
    let managers = cluster.kubectl(&[
        "-n",
        &ns,
        "get",
        "configmap",
        "notes-settings",
        "-o",
        "jsonpath={.metadata.managedFields[*].manager}/{.metadata.managedFields[*].operation}",
    ]);
    assert_eq!(managers, "upshift/Apply");

    cluster.upshift(&["upgrade", "--to", "2.0.0"]).success();
    assert_eq!(setting(), "2.0.0");
    assert_eq!(cluster.ready_images(), ["upshift-demo-notes:2.0.0", "upshift-demo-notes:2.0.0"]);

    // 3.0.0 never gets ready: every object is put back as 2.0.0 left it.
    cluster
        .upshift(&["upgrade", "--to", "3.0.0"])
        .code(3)
        .stderr_has("exceeded its progress deadline")
        .stderr_has("2.0.0 is back");
    assert_eq!(setting(), "2.0.0");
    assert_eq!(cluster.ready_images(), ["upshift-demo-notes:2.0.0", "upshift-demo-notes:2.0.0"]);
    assert_eq!(cluster.status().components[0].version.as_deref(), Some("2.0.0"));

    cluster.upshift(&["rollback"]).success().stderr_has("restored backup");
    assert_eq!(setting(), "1.0.0");
    assert_eq!(cluster.ready_images(), ["upshift-demo-notes:1.0.0", "upshift-demo-notes:1.0.0"]);

    // Preflight asks the API server (a dry run) and changes nothing when it refuses.
    cluster.ctx.write("k8s/zz-bad.yaml", "apiVersion: v1\nkind: Nonsense\nmetadata: {name: x}\n");
    cluster
        .upshift(&["upgrade", "--to", "2.0.0"])
        .code(1)
        .stderr_has("v1 Nonsense: the API server serves no such kind");
    cluster.ctx.write("k8s/zz-bad.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {n: [1]}\n");
    cluster.upshift(&["upgrade", "--to", "2.0.0"]).code(1).stderr_has("ConfigMap x: the API server refused it");
    cluster.ctx.write("k8s/zz-bad.yaml", "kind: [\n");
    cluster.upshift(&["upgrade", "--to", "2.0.0"]).code(1).stderr_has("zz-bad.yaml: not YAML of Kubernetes objects");
    assert_eq!(setting(), "1.0.0");
}

#[test]
fn kubernetes_settings_are_checked_with_their_line() {
    let ctx = Context::new();
    let manifest = |extra: &str| {
        format!(
            "[app]\nname = \"x\"\n\n[[components]]\nname = \"api\"\ndriver = \"kubernetes\"\ndeployment = \"api\"\nimage = \"a:{{version}}\"\n{extra}\n\n[[releases]]\nversion = \"1.0.0\"\n"
        )
    };
    ctx.write("upshift.toml", &manifest("strategy = \"canary\"\nmax_error_rate = 0.05"));
    ctx.run(&["plan", "--to", "1.0.0"]).code(2).stderr_has("upshift.toml:5").stderr_has("readiness and restarts");
    let prometheus = "[verify]\nprometheus = { url = \"http://127.0.0.1:9090\", error_rate = 'vector(0)' }\n\n";
    ctx.write("upshift.toml", &format!("{prometheus}{}", manifest("strategy = \"canary\"\nmax_error_rate = 0.05")));
    ctx.run(&["plan", "--to", "1.0.0"]).success();
    ctx.write("upshift.toml", &format!("[verify]\nprometheus = {{ url = \"http://x\" }}\n\n{}", manifest("")));
    ctx.run(&["plan", "--to", "1.0.0"]).code(2).stderr_has("upshift.toml:2").stderr_has("needs a query");
    ctx.write("upshift.toml", &manifest("strategy = \"canary\"\nsteps = [50, 100]"));
    ctx.run(&["plan", "--to", "1.0.0"]).success().stdout_has("deploy api (kubernetes, canary)");
    ctx.write("upshift.toml", &manifest("strategy = \"blue-green\""));
    ctx.run(&["plan", "--to", "1.0.0"]).code(2).stderr_has("needs `service`");
    ctx.write("upshift.toml", &manifest("health = { http = \"/health\" }"));
    ctx.run(&["plan", "--to", "1.0.0"]).code(2).stderr_has("readinessProbe");
    ctx.write("upshift.toml", &manifest("serve = \"127.0.0.1:1\""));
    ctx.run(&["plan", "--to", "1.0.0"]).code(2).stderr_has("`serve` is a setting of the process and compose driver");
    ctx.write("upshift.toml", &manifest("service = \"notes\""));
    ctx.run(&["plan", "--to", "1.0.0"]).code(2).stderr_has("means nothing to another strategy");
    let files = manifest("").replace("image = \"a:{version}\"", "manifests = [\"k8s/*.yaml\"]");
    ctx.write("upshift.toml", &files.replace("deployment = \"api\"", "deployment = \"api\"\nimage = \"a:{version}\""));
    ctx.run(&["plan", "--to", "1.0.0"]).code(2).stderr_has("upshift.toml:9").stderr_has("the files hold the image");
    ctx.write("upshift.toml", &files.replace("deployment = \"api\"", "deployment = \"api\"\nstrategy = \"recreate\""));
    ctx.run(&["plan", "--to", "1.0.0"]).code(2).stderr_has("as their files' `spec.strategy` says");
    ctx.write("upshift.toml", &files);
    ctx.run(&["plan", "--to", "1.0.0"]).success().stdout_has("deploy api (kubernetes, rolling)");
    ctx.write("upshift.toml", &manifest("context = \"prod\""));
    ctx.run(&["plan", "--to", "1.0.0"]).success().stdout_has("deploy api (kubernetes, rolling)");
    let via = |url: &str, via: &str| format!("[database]\nurl = \"{url}\"\nvia = {via}\n\n{}", manifest(""));
    let pod = "{ kubernetes = { pod = \"postgresql-0\", port = 5432 } }";
    ctx.write("upshift.toml", &via("sqlite:x.db", pod));
    ctx.run(&["plan", "--to", "1.0.0"]).code(2).stderr_has("upshift.toml:3").stderr_has("needs a PostgreSQL URL");
    ctx.write("upshift.toml", &via("postgres://db/x", "{ kubernetes = { pod = \"postgresql-0\", port = 0 } }"));
    ctx.run(&["plan", "--to", "1.0.0"]).code(2).stderr_has("upshift.toml:3").stderr_has("kubernetes.port");
    ctx.write("upshift.toml", &via("postgres://db/x", "{ kubernetes = { pod = \"postgresql-0\" } }"));
    ctx.run(&["plan", "--to", "1.0.0"]).code(2).stderr_has("upshift.toml:3").stderr_has("port");
    ctx.write("upshift.toml", &via("postgres://db/x", "{}"));
    ctx.run(&["plan", "--to", "1.0.0"]).code(2).stderr_has("upshift.toml:3").stderr_has("takes one of");
}

/// The example in `examples/kubernetes` (seed 003's flow), from its own files.
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/kubernetes");

/// Seed 003 on the cluster, from `examples/kubernetes`: PostgreSQL in the cluster, its port
/// published nowhere, reached through upshift's port-forward tunnel by the migrations, the
/// backups and the restore; the notes Deployment switched blue-green by its Service. The
/// data is checked on the database pod's own address, not through upshift.
#[test]
fn the_kubernetes_example_migrates_backs_up_and_restores_through_a_tunnel() {
    let Some(kubeconfig) = kubeconfig() else { return };
    common::notes_images();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../ci/engines/postgres-image.sh");
    assert!(Command::new("bash").args([script, "upshift-postgres:local"]).status().unwrap().success(), "{script}");
    let ctx = Context::new();
    let namespace = format!("upshift-example-{}", std::process::id());
    let example =
        |file: &str| std::fs::read_to_string(format!("{EXAMPLE}/{file}")).unwrap().replace("notes-example", &namespace);
    ctx.write("upshift.toml", &example("upshift.toml").replace("../notes/migrations", "migrations"));
    for (name, text) in notes::MIGRATIONS {
        ctx.write(&format!("migrations/{name}"), text);
    }
    let cluster = Cluster { ctx, kubeconfig, namespace: namespace.clone() };
    let ns = namespace.clone();
    cluster.kubectl(&["create", "namespace", &ns]);
    cluster.ctx.write("postgresql.yaml", &example("postgresql.yaml"));
    cluster.kubectl(&["apply", "-f", &cluster.ctx.join("postgresql.yaml").display().to_string()]);
    cluster.kubectl(&["-n", &ns, "wait", "--for=condition=Ready", "pod/postgresql-0", "--timeout=60s"]);
    let database = cluster.kubectl(&["-n", &ns, "get", "pod", "postgresql-0", "-o", "jsonpath={.status.podIP}"]);
    let sql = |query: &str| -> Vec<String> {
        let mut client =
            postgres::Client::connect(&format!("host={database} user=postgres dbname=postgres"), postgres::NoTls)
                .unwrap();
        client
            .simple_query(query)
            .unwrap()
            .into_iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(row) => Some(row.get(0).unwrap_or("").to_owned()),
                _ => None,
            })
            .collect()
    };

    // The runbook's starting point: 1.0.0's schema, made by the old tooling (here through
    // the tunnel), and the Deployment applied by hand.
    cluster.upshift(&["migrate", "up", "20260101000000"]).success();
    cluster.ctx.write("notes.yaml", &example("notes.yaml").replace("POSTGRES_IP", &database));
    cluster.kubectl(&["apply", "-f", &cluster.ctx.join("notes.yaml").display().to_string()]);
    cluster.kubectl(&["-n", &ns, "rollout", "status", "deployment/notes", "--timeout=60s"]);
    cluster.upshift(&["upgrade", "--to", "1.0.0"]).success().stderr_has("becomes slot blue");
    sql("INSERT INTO notes (id, title, body) VALUES (1, 'first', 'kept across everything')");

    // 2.0.0: backed up and migrated through the tunnel around the switch.
    let started = Instant::now();
    cluster
        .upshift(&["upgrade", "--to", "2.0.0"])
        .success()
        .stderr_has("backup")
        .stderr_has("applied 20260202000000")
        .stderr_has("selects slot blue");
    eprintln!("example 1.0.0 -> 2.0.0 (backup, expand, switch, contract): {:.1}s", started.elapsed().as_secs_f64());
    let title = "SELECT count(*) FROM information_schema.columns WHERE table_name = 'notes' AND column_name = 'title'";
    assert_eq!(sql(title), ["0"]);
    assert_eq!(sql("SELECT body FROM notes"), ["kept across everything"]);

    // 3.0.0 never gets ready; the Service stays on 2.0.0's slot.
    cluster.upshift(&["upgrade", "--to", "3.0.0"]).code(3).stderr_has("2.0.0 is back");
    assert_eq!(cluster.status().components[0].version.as_deref(), Some("2.0.0"));

    // Back to 1.0.0: the contract dropped `title`, so the backup is restored through the
    // tunnel (with the host's pg_restore), and 1.0.0's slot selected again.
    cluster.upshift(&["rollback"]).success().stderr_has("restored backup");
    assert_eq!(sql(title), ["1"]);
    assert_eq!(sql("SELECT title FROM notes"), ["first"]);
    assert_eq!(cluster.status().components[0].version.as_deref(), Some("1.0.0"));
    let listed = cluster.upshift(&["backup", "list"]).success().stdout.clone();
    assert!(listed.lines().count() >= 3, "{listed}");

    // A pod that is not there is named.
    let manifest = cluster.ctx.read("upshift.toml").replace("pod = \"postgresql-0\"", "pod = \"postgresql-9\"");
    cluster.ctx.write("upshift.toml", &manifest);
    cluster.upshift(&["migrate", "status"]).code(1).stderr_has("pod postgresql-9 does not exist");
}
