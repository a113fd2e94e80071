//! `upshift upgrade`, `rollback`, `resume`, `abort`, `status` and `history`: the runner and
//! the journal, seen from the command line.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, IsTerminal, Write as _};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;
use serde::Serialize;
use upshift_core::Manifest;
use upshift_core::driver::{ComponentStatus, Driver, DriverError, Drivers};
use upshift_core::journal::{Journal, ReleaseRow, RunRow};
use upshift_core::manifest::DriverKind;
use upshift_core::plan::{Migrations, PlanInput};
use upshift_core::runner::{self, Context, Outcome};
use upshift_deploy::{ComposeDriver, ProcessDriver};
use upshift_migrate::DatabaseUrl;

use crate::cli::{DatabaseArgs, GlobalArgs, TargetArgs};
use crate::exit::{RolledBack, Stuck, UsageError};
use crate::printer::Printer;
use crate::settings::{database_url, required_manifest};

/// Test-only fault switch: the process aborts (like kill -9) right after the journal's
/// Nth committed write.
const CRASH_AT_WRITE: &str = "UPSHIFT_TEST_CRASH_AT_WRITE";

fn database(database: &DatabaseArgs, manifest: &Manifest, printer: &Printer) -> anyhow::Result<Option<DatabaseUrl>> {
    Ok(database_url(database, Some(manifest), printer)?.map(|text| DatabaseUrl::parse(&text)).transpose()?)
}

/// The drivers this build has, each made when a component first needs it (the process
/// driver starts the agent then).
pub(crate) fn drivers(manifest: &Manifest) -> anyhow::Result<Drivers> {
    let program = std::env::current_exe().context("finding the upshift binary")?;
    let mut drivers = Drivers::new();
    let (for_process, for_compose) = (manifest.clone(), manifest.clone());
    let program_for_compose = program.clone();
    drivers.register_lazy(
        DriverKind::Process,
        Box::new(move || Ok(Box::new(ProcessDriver::new(&for_process, &program)?) as Box<dyn Driver>)),
    );
    drivers.register_lazy(
        DriverKind::Compose,
        Box::new(
            move || Ok(Box::new(ComposeDriver::new(&for_compose, Some(&program_for_compose))?) as Box<dyn Driver>),
        ),
    );
    register_kubernetes(&mut drivers, manifest);
    Ok(drivers)
}

/// The Kubernetes and Helm drivers, in builds with the `kubernetes` feature.
fn register_kubernetes(drivers: &mut Drivers, manifest: &Manifest) {
    #[cfg(feature = "kubernetes")]
    {
        let manifest = manifest.clone();
        let for_helm = manifest.clone();
        drivers.register_lazy(
            DriverKind::Kubernetes,
            Box::new(move || Ok(Box::new(upshift_deploy::KubernetesDriver::new(&manifest)?) as Box<dyn Driver>)),
        );
        drivers.register_lazy(
            DriverKind::Helm,
            Box::new(move || Ok(Box::new(upshift_deploy::HelmDriver::new(&for_helm)?) as Box<dyn Driver>)),
        );
    }
    #[cfg(not(feature = "kubernetes"))]
    let _ = (drivers, manifest);
}

/// SIGINT and SIGTERM set the flag; the runner stops at the next step boundary and undoes.
fn interrupt_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&flag)).context("installing the signal handler")?;
    }
    Ok(flag)
}

fn crash_at_write() -> Option<u64> {
    std::env::var(CRASH_AT_WRITE).ok().and_then(|v| v.parse().ok())
}

#[derive(Serialize)]
struct RunJson<'a> {
    outcome: &'a str,
    revision: Option<i64>,
    undo: Option<&'a str>,
    why: Option<&'a str>,
    failure: Option<&'a str>,
}

/// Runs `work` with a runner context and turns its outcome into output and an exit code.
fn with_runner(
    global: &GlobalArgs,
    database_args: &DatabaseArgs,
    printer: &Printer,
    undone_is_success: bool,
    work: impl FnOnce(&mut Context<'_>, &mut Journal, &Manifest) -> Result<Outcome, runner::RunError>,
) -> anyhow::Result<()> {
    let manifest = required_manifest(global)?;
    let url = database(database_args, &manifest, printer)?;
    let mut drivers = drivers(&manifest)?;
    let mut journal = Journal::open(&manifest.state_dir)?;
    if let Some(crash) = crash_at_write() {
        journal.set_write_hook(Box::new(move |write| {
            if write == crash {
                std::process::abort();
            }
        }));
    }
    let interrupted = interrupt_flag()?;
    let say = |line: &str| printer.progress(&manifest.redact(line));
    let mut context = Context {
        manifest: &manifest,
        database: url.as_ref(),
        drivers: &mut drivers,
        say: &say,
        interrupted: &interrupted,
        lock_timeout: std::time::Duration::from_mins(1),
    };
    let outcome = work(&mut context, &mut journal, &manifest)?;
    match outcome {
        Outcome::Succeeded { revision } => printer.result(
            &RunJson { outcome: "succeeded", revision: Some(revision), undo: None, why: None, failure: None },
            || format!("done: revision {revision}\n"),
        ),
        Outcome::RolledBack { depth, why, failure } => {
            let depth = depth.as_str();
            printer.result(
                &RunJson {
                    outcome: "rolled-back",
                    revision: None,
                    undo: Some(depth),
                    why: Some(&why),
                    failure: Some(&failure),
                },
                || format!("undone ({depth}): {why}\n"),
            )?;
            if undone_is_success {
                Ok(())
            } else if depth == "nothing" {
                // Failed before changing anything: exit 1, like any failure that changed nothing.
                Err(anyhow::anyhow!("{failure}; nothing was changed"))
            } else {
                Err(RolledBack(format!("{failure}; everything was undone ({depth})")).into())
            }
        }
        Outcome::Stuck { failure, undo_failure } => {
            printer.result(
                &RunJson {
                    outcome: "stuck",
                    revision: None,
                    undo: None,
                    why: Some(&undo_failure),
                    failure: Some(&failure),
                },
                String::new,
            )?;
            Err(Stuck(format!(
                "{failure}; the undo failed too: {undo_failure}\nthe run stays in the journal: `upshift status` shows it, `upshift resume` or `upshift abort` continue"
            ))
            .into())
        }
    }
}

/// On a terminal without `--yes`: shows what is about to happen, then asks.
fn confirm(global: &GlobalArgs, what: impl FnOnce() -> String, question: &str) -> Result<(), runner::RunError> {
    if global.yes || !std::io::stdin().is_terminal() {
        return Ok(());
    }
    let cancelled = || runner::RunError::Refused("cancelled; nothing was done".into());
    let mut stderr = std::io::stderr();
    write!(stderr, "{}\n{question} [y/N] ", what()).map_err(|_| cancelled())?;
    stderr.flush().map_err(|_| cancelled())?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer).map_err(|_| cancelled())?;
    if matches!(answer.trim(), "y" | "Y" | "yes") { Ok(()) } else { Err(cancelled()) }
}

/// The plan in a few lines: each step and what a failure there would undo.
fn plan_summary(plan: &upshift_core::Plan) -> String {
    let mut out = format!(
        "Upgrade {} to {}:\n",
        plan.from.as_ref().map_or_else(|| "(nothing deployed)".to_owned(), ToString::to_string),
        plan.to
    );
    for step in &plan.steps {
        let _ = writeln!(out, "  {:>2}. {}  (on failure: {})", step.number, step.title, step.on_failure.undo.as_str());
    }
    out.push_str("`upshift plan` shows every check, revision and command.");
    out
}

pub(crate) fn upgrade(global: &GlobalArgs, target_args: &TargetArgs, printer: &Printer) -> anyhow::Result<()> {
    let TargetArgs { to, no_backup, only, database: database_args } = target_args;
    let no_backup = *no_backup;
    let target: semver::Version =
        to.parse().map_err(|e| UsageError(format!("`--to {to}` is not a version ({e}); expected one like 2.0.0")))?;
    with_runner(global, database_args, printer, false, |context, journal, manifest| {
        let release = journal.deployed()?;
        let deployed = release.as_ref().and_then(|r| r.version.parse().ok());
        let behind = runner::behind(manifest, release.as_ref());
        let applied;
        let migrator;
        let migrations = match context.database {
            Some(url) => {
                migrator = manifest.migrations().map_err(|e| runner::RunError::Preflight(e.to_string()))?;
                applied = migrator
                    .connect(url, false)
                    .and_then(|mut e| e.applied())
                    .map_err(|e| runner::RunError::Preflight(format!("the database {url}: {e}")))?;
                Some(Migrations { migrator: &migrator, applied: applied.as_slice(), dialect: url.dialect() })
            }
            None => None,
        };
        let plan = upshift_core::plan(&PlanInput {
            manifest,
            target: &target,
            deployed: deployed.as_ref(),
            migrations,
            database: context.database.map(ToString::to_string),
            no_backup,
            options: &upshift_core::config::options_set(manifest),
            only,
            behind: &behind,
        })?;
        for finding in &plan.lint {
            printer.warn(&finding.to_string());
        }
        confirm(global, || plan_summary(&plan), &format!("Upgrade to {target}?"))?;
        runner::upgrade(context, journal, &plan)
    })
}

pub(crate) fn rollback(
    global: &GlobalArgs,
    to_revision: Option<i64>,
    only: Option<&str>,
    database_args: &DatabaseArgs,
    printer: &Printer,
) -> anyhow::Result<()> {
    with_runner(global, database_args, printer, false, |context, journal, manifest| {
        journal.lock()?;
        let preview = match only {
            Some(name) => runner::preview_rollback_only(context, journal, name)?,
            None => runner::preview_rollback(context, journal, to_revision)?,
        };
        confirm(global, || preview.describe(manifest), "Roll back?")?;
        runner::run_rollback(context, journal, preview)
    })
}

pub(crate) fn resume(global: &GlobalArgs, database_args: &DatabaseArgs, printer: &Printer) -> anyhow::Result<()> {
    with_runner(global, database_args, printer, false, |context, journal, _| runner::resume(context, journal))
}

pub(crate) fn abort(global: &GlobalArgs, database_args: &DatabaseArgs, printer: &Printer) -> anyhow::Result<()> {
    with_runner(global, database_args, printer, true, |context, journal, _| runner::abort(context, journal))
}

#[derive(Serialize)]
struct StatusRun<'a> {
    id: &'a str,
    target: &'a str,
    state: &'a str,
    step: Option<usize>,
    /// While the verify step watches: until when (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    watching_until: Option<String>,
}

#[derive(Serialize)]
struct StatusComponent<'a> {
    name: &'a str,
    #[serde(flatten)]
    status: ComponentStatus,
}

#[derive(Serialize)]
struct StatusJson<'a> {
    version: Option<&'a str>,
    revision: Option<i64>,
    run: Option<StatusRun<'a>>,
    components: Vec<StatusComponent<'a>>,
}

pub(crate) fn status(global: &GlobalArgs, _database: &DatabaseArgs, printer: &Printer) -> anyhow::Result<()> {
    let manifest = required_manifest(global)?;
    let journal = Journal::open_existing(&manifest.state_dir)?;
    let deployed = journal.as_ref().map(Journal::deployed).transpose()?.flatten();
    let running = journal.as_ref().map(Journal::in_flight).transpose()?.flatten();
    let current = match (&journal, &running) {
        (Some(journal), Some(run)) => journal.current_step(&run.id)?,
        _ => None,
    };
    let step = current.as_ref().map(|s| s.seq);
    let watching_until =
        current.filter(|s| s.state == upshift_core::journal::StepState::Started).and_then(|s| s.detail.watch_until);
    // Status starts nothing: without a running agent, process components show as down.
    let mut drivers = Drivers::new();
    match ProcessDriver::connect(&manifest) {
        Some(process) => drivers.register(Box::new(process)),
        None => drivers.register_lazy(
            DriverKind::Process,
            Box::new(|| {
                Err(DriverError::Unavailable(
                    "the agent does not run (`upshift agent --detach` starts it; `upshift upgrade` does too)".into(),
                ))
            }),
        ),
    }
    let for_compose = manifest.clone();
    drivers.register_lazy(
        DriverKind::Compose,
        Box::new(move || Ok(Box::new(ComposeDriver::new(&for_compose, None)?) as Box<dyn Driver>)),
    );
    register_kubernetes(&mut drivers, &manifest);
    let components: Vec<StatusComponent<'_>> = manifest
        .components
        .iter()
        .map(|component| StatusComponent {
            name: &component.name,
            status: drivers.get(component).and_then(|driver| driver.status(component)).unwrap_or_else(
                |e: DriverError| ComponentStatus { problem: Some(e.to_string()), ..ComponentStatus::default() },
            ),
        })
        .collect();
    let json = StatusJson {
        version: deployed.as_ref().map(|r| r.version.as_str()),
        revision: deployed.as_ref().map(|r| r.revision),
        run: running.as_ref().map(|r| StatusRun {
            id: &r.id,
            target: &r.target,
            state: r.state.as_str(),
            step,
            watching_until: watching_until.clone(),
        }),
        components,
    };
    printer.result(&json, || render_status(&json, deployed.as_ref(), running.as_ref(), step))
}

#[derive(Serialize)]
struct HistoryEntry<'a> {
    revision: i64,
    version: &'a str,
    status: &'a str,
    started_at: &'a str,
    finished_at: Option<&'a str>,
    /// Per Helm component, the Helm revisions its run made (its upgrade, and the rollback
    /// of an undo).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    helm: BTreeMap<String, Vec<u64>>,
}

pub(crate) fn history(global: &GlobalArgs, printer: &Printer) -> anyhow::Result<()> {
    let manifest = required_manifest(global)?;
    let releases = Journal::open_existing(&manifest.state_dir)?.map(|j| j.releases()).transpose()?.unwrap_or_default();
    let helm = helm_revisions(&manifest, printer);
    let entries: Vec<HistoryEntry<'_>> = releases
        .iter()
        .map(|r| HistoryEntry {
            revision: r.revision,
            version: &r.version,
            status: r.status.as_str(),
            started_at: &r.started_at,
            finished_at: r.finished_at.as_deref(),
            helm: helm
                .iter()
                .map(|(component, revisions)| {
                    let made = revisions.iter().filter(|(_, at)| within(at, &r.started_at, r.finished_at.as_deref()));
                    (component.clone(), made.map(|(n, _)| *n).collect::<Vec<_>>())
                })
                .filter(|(_, made)| !made.is_empty())
                .collect(),
        })
        .collect();
    printer.result(&entries, || {
        let helm_column = !helm.is_empty();
        let mut out = format!("{:<9} {:<10} {:<12} {:<25}", "REVISION", "VERSION", "STATUS", "STARTED");
        out.push_str(if helm_column { " HELM\n" } else { "\n" });
        for e in &entries {
            let _ = write!(out, "{:<9} {:<10} {:<12} {:<25}", e.revision, e.version, e.status, e.started_at);
            if helm_column {
                let made: Vec<String> = e
                    .helm
                    .iter()
                    .map(|(c, n)| format!("{c} {}", n.iter().map(|n| format!("r{n}")).collect::<Vec<_>>().join(",")))
                    .collect();
                let _ = write!(out, " {}", made.join("; "));
            }
            out.push('\n');
        }
        out
    })
}

/// Each Helm component's revisions with when they were made; a release that cannot be
/// asked is left out with a warning (`history` needs no cluster).
fn helm_revisions(manifest: &Manifest, printer: &Printer) -> BTreeMap<String, Vec<(u64, String)>> {
    #[cfg_attr(not(feature = "kubernetes"), allow(unused_mut))]
    let mut found = BTreeMap::new();
    #[cfg(feature = "kubernetes")]
    for component in manifest.components.iter().filter(|c| c.driver.kind() == DriverKind::Helm) {
        match upshift_deploy::helm_revisions(manifest, component) {
            Ok(revisions) => {
                found.insert(component.name.clone(), revisions);
            }
            Err(e) => printer.warn(&format!("the Helm revisions of {} are not shown: {e}", component.name)),
        }
    }
    #[cfg(not(feature = "kubernetes"))]
    let _ = (manifest, printer);
    found
}

/// Whether the RFC 3339 time `at` falls in a run's window.
fn within(at: &str, started: &str, finished: Option<&str>) -> bool {
    match (rfc3339(at), rfc3339(started)) {
        (Some(at), Some(started)) => at >= started && finished.and_then(rfc3339).is_none_or(|end| at <= end),
        _ => false,
    }
}

/// An RFC 3339 time, `Z` or with an offset (Helm prints local time with one).
fn rfc3339(text: &str) -> Option<std::time::SystemTime> {
    let split = text.len().checked_sub(6).filter(|&i| text.is_char_boundary(i)).map(|i| text.split_at(i));
    let (base, offset) = match split {
        Some((base, offset)) if (offset.starts_with('+') || offset.starts_with('-')) && &offset[3..4] == ":" => {
            let minutes = offset[1..3].parse::<u64>().ok()? * 60 + offset[4..6].parse::<u64>().ok()?;
            (base, Some((offset.starts_with('-'), std::time::Duration::from_secs(minutes * 60))))
        }
        _ => (text.trim_end_matches('Z'), None),
    };
    let local = humantime::parse_rfc3339_weak(base).ok()?;
    match offset {
        // UTC = local time - offset.
        Some((false, by)) => local.checked_sub(by),
        Some((true, by)) => local.checked_add(by),
        None => Some(local),
    }
}

/// `status` for people.
fn render_status(
    json: &StatusJson<'_>,
    deployed: Option<&ReleaseRow>,
    running: Option<&RunRow>,
    step: Option<usize>,
) -> String {
    let mut out = match deployed {
        Some(r) => format!("deployed  {} (revision {})\n", r.version, r.revision),
        None => "deployed  nothing yet\n".to_owned(),
    };
    if let Some(run) = running {
        let watching = json
            .run
            .as_ref()
            .and_then(|r| r.watching_until.as_deref())
            .map(|until| format!(", watching until {until}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "in flight {} to {} ({}, step {}{watching}): `upshift resume` finishes it, `upshift abort` undoes it",
            run.kind.as_str(),
            run.target,
            run.state.as_str(),
            step.map_or_else(|| "?".to_owned(), |s| s.to_string())
        );
    }
    for c in &json.components {
        let _ = writeln!(
            out,
            "{:<10}{} {}",
            c.name,
            c.status.version.as_deref().unwrap_or("-"),
            match (&c.status.healthy, &c.status.problem) {
                (true, _) => "healthy".to_owned(),
                (false, Some(problem)) => format!("NOT healthy: {problem}"),
                (false, None) => "NOT healthy".to_owned(),
            }
        );
        for i in &c.status.instances {
            let figures = match (i.requests, i.errors) {
                (Some(requests), Some(errors)) => format!(
                    ", {requests} requests, {errors} errors, p99 {}",
                    i.p99_ms.map_or_else(|| "-".to_owned(), |p| format!("{p:.1} ms"))
                ),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "  {} {} at {} (pid {}): {}{}{}{}",
                i.slot,
                i.version,
                i.addr.as_deref().unwrap_or("-"),
                i.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                if i.running { "running" } else { "stopped" },
                if i.serving { ", serving" } else { "" },
                match i.restarts {
                    0 => String::new(),
                    1 => ", restarted once".to_owned(),
                    n => format!(", restarted {n} times"),
                },
                figures
            );
        }
        for v in &c.status.versions {
            let _ = writeln!(
                out,
                "  {} gets {:.0}% of requests; since the last switch ({:.0}s): {} requests, {} errors, p99 {}",
                v.version,
                v.share,
                v.window.seconds,
                v.window.requests,
                v.window.errors,
                v.window.p99_ms.map_or_else(|| "-".to_owned(), |p| format!("{p:.1} ms"))
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{rfc3339, within};

    #[test]
    fn helm_times_fall_in_run_windows_whatever_their_offset() {
        assert_eq!(rfc3339("2026-12-02T03:10:38.077689266+01:00"), rfc3339("2026-12-02T02:10:38.077689266Z"));
        assert_eq!(rfc3339("2026-12-01T21:10:38-05:00"), rfc3339("2026-12-02T02:10:38Z"));
        assert!(within("2026-12-02T02:10:38.0776Z", "2026-12-02T02:10:37.417Z", Some("2026-12-02T02:10:40.001Z")));
        assert!(within("2026-12-02T03:10:38+01:00", "2026-12-02T02:10:37.417Z", None));
        assert!(!within("2026-12-02T02:10:41Z", "2026-12-02T02:10:37.417Z", Some("2026-12-02T02:10:40.001Z")));
        assert!(!within("garbage", "2026-12-02T02:10:37.417Z", None));
    }
}
