//! The Helm driver: a component is a Helm release, driven through the `helm` CLI (Helm 3;
//! its Go SDK has no Rust counterpart), reading only its JSON outputs.
//!
//! - Deploy: `helm upgrade --install --wait` with the manifest's chart, values files and
//!   `set` values (`{version}` filled), the release label `upshift.dev/version` (Helm
//!   copies a revision's labels into a rollback to it, so every revision names its
//!   version, whatever `--history-max` prunes) and the description `upshift <version>`
//!   (the fallback when labels cannot be read: a `Rollback to N` runs N's version).
//! - What ran is journaled as the release's revision; put back is `helm rollback
//!   <release> <that revision> --wait` (with the schema and backup undo of the saga, which
//!   Helm never does), and `helm uninstall --keep-history` when nothing ran before (or
//!   while a backup is restored: a rollback to any revision works after it).
//! - A release left `pending-install`, `-upgrade` or `-rollback` by a crash is brought back
//!   by `resume`/`abort`: the pending revision's record (Helm's release Secret) is removed,
//!   which is what Helm's own maintainers advise, and the recorded revision rolled back to.
//!   Preflight refuses a pending release instead of touching it.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use upshift_core::Manifest;
use upshift_core::driver::{ComponentStatus, Deployed, Driver, DriverError};
use upshift_core::manifest::{Component, DriverKind, DriverSpec};

use crate::{say_aloud, strings};

fn refused(message: impl Into<String>) -> DriverError {
    DriverError::Refused(message.into())
}

/// One revision, as `helm history -o json` lists it.
#[derive(Clone, Debug, Deserialize)]
struct HistoryEntry {
    revision: u64,
    /// When it was made (RFC 3339).
    #[serde(default)]
    updated: String,
    status: String,
    chart: String,
    app_version: String,
    description: String,
}

/// The release label that names the version a revision runs.
const VERSION_LABEL: &str = "upshift.dev/version";

/// The description upshift gives its revisions.
fn description(version: &str) -> String {
    format!("upshift {version}")
}

/// The version a revision runs: upshift's description, or the revision a rollback went
/// back to; `None` for a revision upshift did not make (its chart's appVersion stands in).
fn version_of(history: &[HistoryEntry], revision: u64) -> Option<String> {
    let mut seen = 0;
    let mut at = history.iter().find(|r| r.revision == revision)?;
    loop {
        if let Some(version) = at.description.strip_prefix("upshift ") {
            return Some(version.to_owned());
        }
        let back: u64 = at.description.strip_prefix("Rollback to ")?.trim().parse().ok()?;
        at = history.iter().find(|r| r.revision == back)?;
        seen += 1;
        if seen > history.len() {
            return None;
        }
    }
}

/// The Helm settings of a component, `${VAR}` expanded.
struct Release {
    name: String,
    chart: String,
    chart_version: Option<String>,
    namespace: Option<String>,
    values: Vec<PathBuf>,
    set: Vec<(String, String)>,
    timeout: Duration,
    tests: bool,
}

/// Runs components as Helm releases.
pub struct HelmDriver {
    manifest: Manifest,
    /// The manifest's folder, absolute: local charts and values files are found from it.
    cwd: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl HelmDriver {
    /// A driver for the manifest's Helm components; nothing is run yet.
    pub fn new(manifest: &Manifest) -> Result<HelmDriver, DriverError> {
        let cwd = std::env::current_dir().map_err(|e| refused(e.to_string()))?.join(&manifest.base_dir);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| refused(format!("starting the Kubernetes client's runtime: {e}")))?;
        Ok(HelmDriver { manifest: manifest.clone(), cwd, runtime })
    }

    fn release(&self, component: &Component, version: &str) -> Result<Release, DriverError> {
        let DriverSpec::Helm { release, chart, chart_version, namespace, values, set, timeout, tests } =
            &component.driver
        else {
            return Err(refused(format!("component {} does not use the helm driver", component.name)));
        };
        let expand = |text: &String| self.manifest.expand(text).map_err(refused);
        let chart = expand(chart)?;
        // A local chart is a path from the manifest's folder; `repo/name` is Helm's.
        let local = self.cwd.join(&chart);
        Ok(Release {
            name: expand(release)?,
            chart: if local.exists() { local.display().to_string() } else { chart },
            chart_version: chart_version.as_ref().map(expand).transpose()?,
            namespace: namespace.as_ref().map(expand).transpose()?,
            values: values.iter().map(|v| Ok(self.cwd.join(expand(v)?))).collect::<Result<_, DriverError>>()?,
            set: set
                .iter()
                .map(|(k, v)| Ok((k.clone(), crate::process::fill(&expand(v)?, version, None))))
                .collect::<Result<_, DriverError>>()?,
            timeout: timeout.unwrap_or(Duration::from_mins(5)),
            tests: *tests,
        })
    }

    /// Runs `helm ARGS` (in the release's namespace); its stdout, or what Helm said.
    fn helm(&self, release: &Release, args: &[String]) -> Result<String, DriverError> {
        let mut command = Command::new("helm");
        command.args(args).current_dir(&self.cwd).stdin(Stdio::null());
        if let Some(namespace) = &release.namespace {
            command.args(["--namespace", namespace]);
        }
        let output = command.output().map_err(|e| {
            DriverError::Unavailable(format!("could not run helm ({e}); install Helm 3 (see ci/engines/helm.sh)"))
        })?;
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        let said = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        let shown = args.iter().take(3).cloned().collect::<Vec<_>>().join(" ");
        if said.contains("Kubernetes cluster unreachable") {
            return Err(DriverError::Unavailable(format!("`helm {shown}`: {said}")));
        }
        Err(refused(format!("`helm {shown}` failed: {said}")))
    }

    /// The release's revisions, oldest first; empty when it is not installed.
    fn history(&self, release: &Release) -> Result<Vec<HistoryEntry>, DriverError> {
        let args = strings(&["history", &release.name, "--max", "256", "--output", "json"]);
        match self.helm(release, &args) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| refused(format!("`helm history` printed something unexpected: {e}"))),
            Err(DriverError::Refused(message)) if message.contains("release: not found") => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// `helm upgrade --install` of `version`, waited; `dry_run` only renders and checks it.
    fn upgrade(&self, release: &Release, version: &str, dry_run: bool) -> Result<(), DriverError> {
        let mut args = self.upgrade_args(release, version);
        if dry_run {
            args.push("--dry-run".into());
        } else {
            args.extend(["--wait".to_owned(), "--timeout".to_owned(), format!("{}s", release.timeout.as_secs())]);
        }
        self.helm(release, &args).map(drop)
    }

    /// `helm upgrade --install` of `version` with the chart, values and `set` values.
    #[allow(clippy::unused_self)]
    fn upgrade_args(&self, release: &Release, version: &str) -> Vec<String> {
        let mut args = strings(&["upgrade", "--install", &release.name, &release.chart]);
        if let Some(chart_version) = &release.chart_version {
            args.extend(strings(&["--version", chart_version]));
        }
        for file in &release.values {
            args.extend(["--values".to_owned(), file.display().to_string()]);
        }
        for (key, value) in &release.set {
            args.extend(["--set".to_owned(), format!("{key}={value}")]);
        }
        args.extend(["--description".to_owned(), description(version)]);
        // A release label, which Helm copies into a rollback's revision: each revision
        // names its version itself, whatever Helm prunes (--history-max).
        args.extend(["--labels".to_owned(), format!("{VERSION_LABEL}={version}")]);
        args
    }

    /// Each revision's version from its release label (Helm's default Secret storage);
    /// empty when they cannot be read (another storage driver): the descriptions serve.
    fn labelled_versions(&self, release: &Release) -> std::collections::BTreeMap<u64, String> {
        let found = self.runtime.block_on(async {
            let client = kube::Client::try_default().await.ok()?;
            let namespace = release.namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
            let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(client, &namespace);
            let params = kube::api::ListParams::default().labels(&format!("owner=helm,name={}", release.name));
            secrets.list(&params).await.ok()
        });
        found
            .map(|list| {
                list.items
                    .into_iter()
                    .filter_map(|secret| {
                        let labels = secret.metadata.labels?;
                        Some((labels.get("version")?.parse().ok()?, labels.get(VERSION_LABEL)?.clone()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The version each revision runs: its label, else its description chain (one look at
    /// the labels for the whole history).
    fn versions(&self, release: &Release, history: &[HistoryEntry]) -> std::collections::BTreeMap<u64, String> {
        let mut versions = self.labelled_versions(release);
        for entry in history {
            if let (std::collections::btree_map::Entry::Vacant(slot), Some(version)) =
                (versions.entry(entry.revision), version_of(history, entry.revision))
            {
                slot.insert(version);
            }
        }
        versions
    }

    /// The release `helm upgrade --install --dry-run` would make, as JSON.
    fn dry_run(&self, release: &Release, version: &str) -> Result<serde_json::Value, DriverError> {
        let mut args = self.upgrade_args(release, version);
        args.extend(strings(&["--dry-run", "--output", "json"]));
        let text = self.helm(release, &args)?;
        serde_json::from_str(&text)
            .map_err(|e| refused(format!("`helm upgrade --dry-run` printed something unexpected: {e}")))
    }

    /// Brings back a release an interrupted run left pending: the pending revision's
    /// record is removed so that Helm takes commands again. Says what it did.
    fn unstick(&self, release: &Release, history: &[HistoryEntry], say: &dyn Fn(&str)) -> Result<(), DriverError> {
        let Some(pending) = history.last().filter(|r| r.status.starts_with("pending-")) else { return Ok(()) };
        let client = self
            .runtime
            .block_on(kube::Client::try_default())
            .map_err(|e| DriverError::Unavailable(format!("the Kubernetes API: {e}")))?;
        let namespace = release.namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
        let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(client, &namespace);
        let name = format!("sh.helm.release.v1.{}.v{}", release.name, pending.revision);
        say(&format!(
            "  release {} was left {} at revision {} by an interrupted run: removing that revision's record ({name})",
            release.name, pending.status, pending.revision
        ));
        match self.runtime.block_on(secrets.delete(&name, &kube::api::DeleteParams::default())) {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(DriverError::Unavailable(format!("removing {name}: {e}"))),
        }
    }
}

/// Every leaf of a values tree, by its dotted path (`image.tag`, `hosts[0]`).
fn leaves(value: &serde_json::Value, path: &str, out: &mut std::collections::BTreeMap<String, String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, inner) in map {
                let next = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                leaves(inner, &next, out);
            }
        }
        serde_json::Value::Array(items) => {
            for (i, inner) in items.iter().enumerate() {
                leaves(inner, &format!("{path}[{i}]"), out);
            }
        }
        serde_json::Value::Null if path.is_empty() => {}
        leaf => {
            out.insert(path.to_owned(), leaf.to_string());
        }
    }
}

/// Whether a values key names a secret: its value is never shown.
fn secret_key(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    ["password", "secret", "token", "apikey", "api_key", "credential", "privatekey", "private_key"]
        .iter()
        .any(|word| lower.contains(word))
}

/// The user-supplied values that change, `+` added, `-` removed, secrets masked.
fn values_diff(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    let (mut before, mut after) = (std::collections::BTreeMap::new(), std::collections::BTreeMap::new());
    leaves(old, "", &mut before);
    leaves(new, "", &mut after);
    let shown = |key: &str, value: &str| if secret_key(key) { "***".to_owned() } else { value.to_owned() };
    let mut lines = Vec::new();
    for (key, value) in &after {
        match before.get(key) {
            Some(old) if old == value => {}
            Some(old) => lines.push(format!("{key} {} -> {}", shown(key, old), shown(key, value))),
            None => lines.push(format!("+ {key} {}", shown(key, value))),
        }
    }
    lines.extend(before.keys().filter(|k| !after.contains_key(*k)).map(|k| format!("- {k}")));
    lines
}

/// A Helm component's revisions with when each was made (RFC 3339), oldest first: for
/// `upshift history`, which puts each next to the upshift release whose run made it.
pub fn helm_revisions(manifest: &Manifest, component: &Component) -> Result<Vec<(u64, String)>, DriverError> {
    let driver = HelmDriver::new(manifest)?;
    let release = driver.release(component, "")?;
    Ok(driver.history(&release)?.into_iter().map(|r| (r.revision, r.updated)).collect())
}

impl Driver for HelmDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Helm
    }

    fn current(&mut self, component: &Component) -> Result<Option<Deployed>, DriverError> {
        let release = self.release(component, "")?;
        let history = self.history(&release)?;
        let Some(last) = history.last() else { return Ok(None) };
        if last.status == "uninstalled" {
            return Ok(None);
        }
        let detail = json!({ "revision": last.revision, "chart": last.chart, "status": last.status });
        Ok(Some(match self.versions(&release, &history).remove(&last.revision) {
            Some(version) if last.status == "deployed" => Deployed::new(&version, component, detail),
            // A failed or pending revision: what it runs is not a release of the journal.
            Some(version) => Deployed::new(&format!("{version} ({})", last.status), component, detail),
            None => Deployed::new(&last.app_version, component, detail).adopted(),
        }))
    }

    fn deploy(&mut self, component: &Component, version: &str, say: &dyn Fn(&str)) -> Result<(), DriverError> {
        let release = self.release(component, version)?;
        // Preflight refuses a pending release, so one here is this run's own, interrupted
        // before a `resume`.
        self.unstick(&release, &self.history(&release)?, say)?;
        say(&format!("  helm upgrade --install {} (waits up to {}s)", release.name, release.timeout.as_secs()));
        self.upgrade(&release, version, false).map_err(|e| match e {
            DriverError::Refused(m) => DriverError::Unhealthy(m),
            other => other,
        })
    }

    fn put_back(&mut self, component: &Component, previous: Option<&Deployed>) -> Result<(), DriverError> {
        let release = self.release(component, "")?;
        let history = self.history(&release)?;
        self.unstick(&release, &history, &say_aloud)?;
        let history = self.history(&release)?;
        // Nothing ran before, or the release stops while its database is restored: it is
        // uninstalled with its history kept, so that a rollback to any revision still works
        // (and a later `upgrade --install` installs it again).
        let Some(previous) = previous else {
            if let Some(last) = history.last().filter(|r| r.status != "uninstalled") {
                // The revision keeps its description (uninstall would write its own over
                // it), so a later rollback to it still maps to its version.
                let args = strings(&[
                    "uninstall",
                    &release.name,
                    "--keep-history",
                    "--wait",
                    "--description",
                    &last.description,
                ]);
                self.helm(&release, &args)?;
            }
            return Ok(());
        };
        let revision = previous.detail["revision"]
            .as_u64()
            .ok_or_else(|| refused(format!("the journal's record of {} has no Helm revision", component.name)))?;
        // Already back: that very revision, or a later one running the same version.
        if let Some(last) = history.last()
            && last.status == "deployed"
            && (last.revision == revision || {
                let versions = self.versions(&release, &history);
                versions.get(&last.revision).is_some_and(|v| versions.get(&revision) == Some(v))
            })
        {
            return Ok(());
        }
        let timeout = format!("{}s", release.timeout.as_secs());
        let args = strings(&["rollback", &release.name, &revision.to_string(), "--wait", "--timeout", &timeout]);
        self.helm(&release, &args).map(drop)
    }

    fn check_put_back(&mut self, previous: &Deployed, fallback: &Component) -> Result<(), DriverError> {
        let release = self.release(fallback, "")?;
        let revision = previous.detail["revision"].as_u64().ok_or_else(|| {
            refused(format!("the journal's record of {} {} has no Helm revision", fallback.name, previous.version))
        })?;
        if self.history(&release)?.iter().any(|r| r.revision == revision) {
            Ok(())
        } else {
            Err(refused(format!(
                "release {} no longer has revision {revision} ({} {}) in its history: Helm keeps only \
                 the last --history-max revisions",
                release.name, fallback.name, previous.version
            )))
        }
    }

    fn preflight(&mut self, component: &Component, version: &str) -> Result<(), DriverError> {
        let release = self.release(component, version)?;
        if let Some(last) = self.history(&release)?.last().filter(|r| r.status.starts_with("pending-")) {
            return Err(refused(format!(
                "release {} is {} at revision {}: another Helm operation runs, or one was interrupted \
                 (if upshift's, `upshift resume` or `upshift abort` brings it back)",
                release.name, last.status, last.revision
            )));
        }
        // Rendered and checked against the cluster, changing nothing.
        self.upgrade(&release, version, true).map_err(|e| match e {
            DriverError::Refused(m) => refused(format!("{} {version}: {m}", component.name)),
            other => other,
        })
    }

    fn describe_change(&mut self, component: &Component, version: &str) -> Result<Vec<String>, DriverError> {
        let release = self.release(component, version)?;
        let new = self.dry_run(&release, version)?;
        let chart = |name: &serde_json::Value, version: &serde_json::Value| {
            format!("{}-{}", name.as_str().unwrap_or("?"), version.as_str().unwrap_or("?"))
        };
        let new_chart = chart(&new["chart"]["metadata"]["name"], &new["chart"]["metadata"]["version"]);
        let history = self.history(&release)?;
        let Some(last) = history.last().filter(|r| r.status != "uninstalled") else {
            return Ok(vec![format!("helm: installs release {} (chart {new_chart})", release.name)]);
        };
        let mut lines = Vec::new();
        if last.chart != new_chart {
            lines.push(format!("helm {}: chart {} -> {new_chart}", release.name, last.chart));
        }
        let old = serde_json::from_str(
            &self.helm(&release, &strings(&["get", "values", &release.name, "--output", "json"]))?,
        )
        .unwrap_or(serde_json::Value::Null);
        let changes = values_diff(&old, &new["config"]);
        if changes.is_empty() && lines.is_empty() {
            lines.push(format!("helm {}: values unchanged (revision {} now)", release.name, last.revision));
        }
        lines
            .extend(changes.into_iter().map(|c| format!("helm {} values: {}", release.name, self.manifest.redact(&c))));
        Ok(lines)
    }

    fn check_health(&mut self, component: &Component) -> Result<(), DriverError> {
        let release = self.release(component, "")?;
        let history = self.history(&release)?;
        match history.last() {
            Some(last) if last.status == "deployed" => {}
            Some(last) => {
                return Err(DriverError::Unhealthy(format!(
                    "release {} is {} at revision {}: {}",
                    release.name, last.status, last.revision, last.description
                )));
            }
            None => return Err(DriverError::Unhealthy(format!("release {} is not installed", release.name))),
        }
        if release.tests {
            let timeout = format!("{}s", release.timeout.as_secs());
            self.helm(&release, &strings(&["test", &release.name, "--timeout", &timeout]))
                .map_err(|e| DriverError::Unhealthy(format!("helm test {}: {e}", release.name)))?;
        }
        Ok(())
    }

    fn status(&mut self, component: &Component) -> Result<ComponentStatus, DriverError> {
        let release = self.release(component, "")?;
        let history = self.history(&release)?;
        let Some(last) = history.last() else {
            return Ok(ComponentStatus {
                problem: Some(format!("release {} is not installed", release.name)),
                ..ComponentStatus::default()
            });
        };
        let healthy = last.status == "deployed";
        Ok(ComponentStatus {
            healthy,
            problem: (!healthy).then(|| format!("revision {} is {}: {}", last.revision, last.status, last.description)),
            version: self
                .versions(&release, &history)
                .remove(&last.revision)
                .or_else(|| Some(last.app_version.clone())),
            instances: Vec::new(),
            versions: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(revision: u64, status: &str, description: &str) -> HistoryEntry {
        HistoryEntry {
            revision,
            updated: String::new(),
            status: status.into(),
            chart: "notes-0.1.0".into(),
            app_version: "1.0.0".into(),
            description: description.into(),
        }
    }

    #[test]
    fn values_diff_shows_changes_and_masks_secrets() {
        let old =
            json!({ "image": { "tag": "1.0.0" }, "db": { "password": "hunter2" }, "debug": true, "hosts": ["a"] });
        let new =
            json!({ "image": { "tag": "2.0.0" }, "db": { "password": "s3cret" }, "hosts": ["a", "b"], "replicas": 3 });
        assert_eq!(
            values_diff(&old, &new),
            [
                "db.password *** -> ***",
                "+ hosts[1] \"b\"",
                "image.tag \"1.0.0\" -> \"2.0.0\"",
                "+ replicas 3",
                "- debug"
            ]
        );
        assert!(values_diff(&json!(null), &json!(null)).is_empty());
    }

    #[test]
    fn revisions_map_back_to_versions_through_rollbacks() {
        let history = [
            entry(1, "superseded", "Install complete"),
            entry(2, "superseded", "upshift 2.0.0"),
            entry(3, "failed", "Upgrade \"notes\" failed: context deadline exceeded"),
            entry(4, "superseded", "Rollback to 2"),
            entry(5, "deployed", "Rollback to 4"),
        ];
        assert_eq!(version_of(&history, 1), None);
        assert_eq!(version_of(&history, 2).as_deref(), Some("2.0.0"));
        assert_eq!(version_of(&history, 3), None);
        assert_eq!(version_of(&history, 5).as_deref(), Some("2.0.0"));
        // A loop of rollbacks (a hand-edited history) ends.
        let looped = [entry(1, "deployed", "Rollback to 2"), entry(2, "superseded", "Rollback to 1")];
        assert_eq!(version_of(&looped, 1), None);
    }
}
