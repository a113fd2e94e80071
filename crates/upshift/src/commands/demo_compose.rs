//! `upshift demo --compose`: the notes example as a Docker Compose stack (the service over
//! SQLite on a bind mount, and a worker that drains on SIGTERM), with images made here
//! from this very binary: no registry, no Dockerfile, no network.

use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::Context as _;

/// The image the demo's releases run: `upshift-demo-notes:<release>`.
pub(crate) const IMAGE: &str = "upshift-demo-notes";

/// The Compose project the demo's stack runs as.
pub(crate) const PROJECT: &str = "upshift-demo";

/// The demo's compose file: `api` is the notes service (published by the agent's proxy,
/// so no `ports:`), `worker` a loop that finishes its task on SIGTERM.
pub(crate) const COMPOSE_FILE: &str = r#"# The notes example as a Compose stack, written by `upshift demo --compose`.
services:
  api:
    image: upshift-demo-notes:1.0.0
    init: true
    environment:
      DATABASE_URL: sqlite:/data/notes.db
    volumes: ["./data:/data"]
    healthcheck:
      test: ["CMD", "/busybox", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/health"]
      interval: 250ms
      timeout: 2s
      retries: 2
  worker:
    image: upshift-demo-notes:1.0.0
    init: true
    environment:
      V: "${WORKER_VERSION:-1.0.0}"
    volumes: ["./data:/data"]
    entrypoint:
      - /busybox
      - sh
      - -c
      - >-
        echo "worker $$V started" >> /data/worker.log;
        trap 'echo "worker $$V: SIGTERM, finishing its task" >> /data/worker.log; /busybox sleep 1; echo "worker $$V: task done, exiting" >> /data/worker.log; exit 0' TERM;
        while true; do /busybox sleep 0.2; done
"#;

/// The demo's manifest for the stack.
pub(crate) fn manifest(port: u16) -> String {
    format!(
        r#"# The notes example as a Compose stack, written by `upshift demo --compose`. By hand:
#   upshift upgrade --to 1.0.0 && upshift upgrade --to 2.0.0 && upshift upgrade --to 3.0.0
#   upshift status && upshift rollback
#   docker compose -p {PROJECT} down && upshift agent stop

[app]
name = "notes"

[database]
url = "sqlite:data/notes.db"       # the same file the containers see as /data/notes.db

[backup]
keep_last = 5

[[components]]
name = "api"
driver = "compose"
project = "{PROJECT}"
service = "api"
image = "{IMAGE}:{{version}}"
port = 8080                        # where the service listens in its container
serve = "127.0.0.1:{port}"
strategy = "blue-green"            # a new container beside the old one, then the proxy switches
health = {{ http = "/health", interval = "100ms", healthy_after = 2, deadline = "10s" }}
drain = "5s"

[[components]]
name = "worker"
driver = "compose"
project = "{PROJECT}"
service = "worker"
version_env = "WORKER_VERSION"     # the compose file's own variable carries the version
stop_signal = "SIGTERM"            # a warm shutdown: the task in hand is finished
drain = "5s"

[[releases]]
version = "1.0.0"
summary = "Notes with a title and a body"
migrate_to = "20260101000000"

[[releases]]
version = "2.0.0"
upgrade_from = ">=1.0.0"
summary = "Tags on notes; the title goes away"
migrate_to = "20260202000000"

[[releases]]
version = "3.0.0"
upgrade_from = ">=2.0.0"
summary = "A release whose health check fails after start, to show the automatic rollback"
migrate_to = "20260202000000"
"#
    )
}

/// Says what is missing when Docker with Compose v2 does not answer.
pub(crate) fn check_docker() -> anyhow::Result<()> {
    let said = |args: &[&str]| -> Result<(), String> {
        match Command::new("docker").args(args).stdin(Stdio::null()).output() {
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or("").to_owned()),
            Err(e) => Err(format!("no docker command ({e})")),
        }
    };
    if let Err(why) = said(&["info", "--format", "{{.ServerVersion}}"]) {
        anyhow::bail!(
            "the Compose demo needs a running Docker Engine, and `docker info` fails: {why}\n\
             hint: install Docker (on Debian: apt-get install docker.io) and start it; `upshift demo` without --compose needs nothing"
        );
    }
    if let Err(why) = said(&["compose", "version"]) {
        anyhow::bail!(
            "the Compose demo needs Docker Compose v2 (`docker compose`), and `docker compose version` fails: {why}\n\
             hint: install the docker-compose-plugin, or see ci/engines/docker.sh in upshift's repository"
        );
    }
    Ok(())
}

/// The shared libraries a dynamically linked program needs, from `ldd` (none for a static one).
fn libraries(program: &Path) -> Vec<String> {
    Command::new("ldd")
        .arg(program)
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|line| line.split_whitespace().find(|w| w.starts_with('/')).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Makes `upshift-demo-notes:<release>` for each release: a root filesystem of this binary
/// as `/notes` (it runs the notes service under that name), its shared libraries and a
/// busybox (for the healthcheck and the worker), imported with `docker import`. An image
/// made from this same binary (a label keeps its size and time) is kept.
pub(crate) fn build_images(releases: &[&str]) -> anyhow::Result<()> {
    let program = std::env::current_exe().context("finding the upshift binary")?;
    let meta = fs::metadata(&program).context("reading the upshift binary")?;
    let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    let build = format!("{}-{}", meta.len(), modified.map_or(0, |d| d.as_nanos()));
    let current = |release: &str| {
        Command::new("docker")
            .args(["image", "inspect", "--format", "{{index .Config.Labels \"dev.upshift.build\"}}"])
            .arg(format!("{IMAGE}:{release}"))
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == build)
    };
    if releases.iter().all(|r| current(r)) {
        return Ok(());
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox", "/usr/local/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .context("the demo's images need busybox for their healthcheck (on Debian: apt-get install busybox-static)")?;
    let mut archive = tar::Builder::new(Vec::new());
    // Docker's importer takes no GNU sparse entries.
    archive.sparse(false);
    archive.append_path_with_name(&program, "notes").context("packing the upshift binary")?;
    archive.append_path_with_name(busybox, "busybox").context("packing busybox")?;
    let mut libs = libraries(&program);
    libs.extend(libraries(busybox));
    libs.sort();
    libs.dedup();
    for lib in libs {
        let real = fs::canonicalize(&lib).with_context(|| format!("finding {lib}"))?;
        archive.append_path_with_name(real, lib.trim_start_matches('/')).with_context(|| format!("packing {lib}"))?;
    }
    let mut data = tar::Header::new_gnu();
    data.set_entry_type(tar::EntryType::Directory);
    data.set_mode(0o777);
    data.set_size(0);
    archive.append_data(&mut data, "data", std::io::empty()).context("packing /data")?;
    let rootfs = archive.into_inner().context("packing the image")?;
    for release in releases {
        let mut import = Command::new("docker")
            .args(["import", "--change"])
            .arg(format!(r#"ENTRYPOINT ["/notes", "--release", "{release}", "--listen", "0.0.0.0:8080"]"#))
            .args(["--change", &format!("LABEL dev.upshift.build={build}"), "-", &format!("{IMAGE}:{release}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .context("running docker import")?;
        import.stdin.take().context("docker import's stdin")?.write_all(&rootfs).context("feeding docker import")?;
        anyhow::ensure!(import.wait().context("docker import")?.success(), "docker import of {IMAGE}:{release} failed");
    }
    Ok(())
}

/// Stops the demo's stack: its containers (upshift's side-by-side ones, which Compose
/// counts as one-off, too) and its network.
pub(crate) fn down(dir: &Path) -> anyhow::Result<()> {
    let filter = format!("label=com.docker.compose.project={PROJECT}");
    let listed = Command::new("docker").args(["ps", "--all", "--quiet", "--filter", &filter]).output();
    let ids: Vec<String> = listed
        .map(|out| String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    if !ids.is_empty() {
        let _ = Command::new("docker").args(["stop", "--time", "5"]).args(&ids).output();
    }
    let out = Command::new("docker")
        .args(["compose", "-p", PROJECT, "down", "--remove-orphans"])
        .current_dir(dir)
        .output()
        .context("running docker compose down")?;
    anyhow::ensure!(
        out.status.success(),
        "`docker compose -p {PROJECT} down` failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
