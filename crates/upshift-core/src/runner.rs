//! The runner: an upgrade as a saga over the plan's steps, journaled.
//!
//! Each step's intent is in the journal before it starts and its outcome after; what a step
//! did (the backup id, each revision applied, the deployment it replaced) is written as it
//! happens. The undo is computed from the journal alone, so a failure, an interrupt, and a
//! crash followed by `upshift abort` all undo the same way: the least destructive depth that
//! restores the old state (code only; code + `down` of the expand revisions; a restore of
//! the run's backup). `upshift resume` continues a crashed run from its first unfinished
//! step, re-running that step (every step is safe to re-run).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use upshift_backup::{CreateOptions, RestoreOptions, Retention, Store};
use upshift_migrate::{DatabaseUrl, DownTarget, Migrator, UpTarget};

use crate::driver::{Deployed, Driver};
use crate::journal::{Journal, JournalError, NewRelease, StepRow};
use crate::manifest::{Component, Manifest};
use crate::plan::{Plan, PlanStep, StepKind, UndoDepth};

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    /// The release is deployed (exit 0).
    Succeeded { revision: i64 },
    /// A step failed and everything was undone (exit 3).
    RolledBack { depth: UndoDepth, why: String, failure: String },
    /// A step failed and the undo failed too: the run stays in the journal (exit 4).
    Stuck { failure: String, undo_failure: String },
}

/// A failure before anything changed (exit 1; the journal refusals say what to do).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The journal refused (another run, a run in flight) or failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The plan was refused (unknown target, downgrade, unmet `upgrade_from`, bad files):
    /// bad input, exit 2.
    #[error(transparent)]
    Plan(#[from] crate::plan::PlanError),
    /// A preflight check failed.
    #[error("preflight: {0}")]
    Preflight(String),
    /// Nothing to resume or abort.
    #[error("{0}")]
    Nothing(String),
}

/// Everything a run needs.
pub struct Context<'a> {
    /// The manifest.
    pub manifest: &'a Manifest,
    /// The database, when the application has one.
    pub database: Option<&'a DatabaseUrl>,
    /// Runs the components.
    pub driver: &'a mut dyn Driver,
    /// Hears of progress, for people.
    pub say: &'a dyn Fn(&str),
    /// Set by SIGINT/SIGTERM: the run stops at the next step boundary and undoes.
    pub interrupted: &'a AtomicBool,
    /// Test-only fault switch: called after each finished step with its number; a crash
    /// simulation aborts the process there.
    pub after_step: &'a dyn Fn(usize),
    /// How long migrations wait for the database lock.
    pub lock_timeout: Duration,
}

/// A step failure, for people.
type StepResult = Result<(), String>;

fn migrator(ctx: &Context<'_>) -> Result<Migrator, String> {
    Migrator::load(&ctx.manifest.migrations_dir).map_err(|e| e.to_string())
}

fn component<'m>(manifest: &'m Manifest, name: &str) -> Result<&'m Component, String> {
    manifest
        .components
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| format!("component {name} is no longer in the manifest"))
}

fn store(manifest: &Manifest) -> Store {
    Store::new(manifest.backup.dir.clone())
}

/// Runs `up` to `target`, writing each applied revision into the step's detail as it
/// commits, so a crash mid-step still knows what was applied.
fn migrate_up(
    ctx: &Context<'_>,
    journal: &Journal,
    run: &str,
    seq: usize,
    target: &UpTarget,
    detail: &mut serde_json::Value,
) -> StepResult {
    let Some(url) = ctx.database else { return Ok(()) };
    let migrator = migrator(ctx)?;
    let mut engine = upshift_migrate::connect(url, true).map_err(|e| e.to_string())?;
    let mut applied: Vec<String> = detail["applied"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let mut journal_error = None;
    let result = migrator.up(engine.as_mut(), target, ctx.lock_timeout, &mut |revision, duration| {
        (ctx.say)(&format!("  applied {} {} ({} ms)", revision.id, revision.name, duration.as_millis()));
        applied.push(revision.id.clone());
        detail["applied"] = json!(applied);
        if let Err(e) = journal.step_detail(run, seq, detail) {
            journal_error = Some(e);
        }
    });
    if let Some(e) = journal_error {
        return Err(e.to_string());
    }
    result.map_err(|e| e.to_string())
}

fn run_smoke(ctx: &Context<'_>, version: &str, detail: &mut serde_json::Value) -> StepResult {
    let mut outputs = Vec::new();
    for command in &ctx.manifest.verify.smoke {
        let argv: Vec<String> = command.iter().map(|a| a.replace("{version}", version)).collect();
        let shown = ctx.manifest.redact(&argv.join(" "));
        let result = crate::command::run(&argv, ctx.manifest.verify.timeout);
        outputs.push(json!({ "command": shown, "ok": result.is_ok(), "output": ctx.manifest.redact(result.as_ref().unwrap_or_else(|e| e)) }));
        detail["smoke"] = json!(outputs);
        result.map_err(|e| format!("smoke `{shown}` failed: {}", ctx.manifest.redact(&e)))?;
        (ctx.say)(&format!("  smoke ok: {shown}"));
    }
    Ok(())
}

/// Runs one step of the plan. `detail` is the journal's record of it (kept from a previous
/// attempt when resuming).
fn execute(
    ctx: &mut Context<'_>,
    journal: &mut Journal,
    run: &str,
    plan: &Plan,
    step: &PlanStep,
    detail: &mut serde_json::Value,
) -> StepResult {
    let seq = step.number;
    let version = plan.to.to_string();
    match step.kind {
        StepKind::Preflight => Ok(()),
        StepKind::Backup => {
            if step.title.contains("--no-backup") {
                return Ok(());
            }
            let manifest = ctx.manifest;
            // A first deploy may find no SQLite file yet: the empty database is created (as
            // `migrate up` would) so the backup records, and a restore brings back, that state.
            if let Some(url @ DatabaseUrl::Sqlite { .. }) = ctx.database {
                upshift_migrate::connect(url, true).map_err(|e| format!("backup: {e}"))?;
            }
            let backup = upshift_backup::create(
                &store(manifest),
                &CreateOptions {
                    database: ctx.database,
                    paths: &manifest.backup.paths,
                    base: &manifest.base_dir,
                    label: Some(format!("before {version}")),
                    app: manifest.app_name.clone(),
                    version: plan.from.as_ref().map(ToString::to_string),
                    codec: upshift_backup::Codec::default(),
                },
            )
            .map_err(|e| format!("backup: {e}"))?;
            (ctx.say)(&format!("  backup {} ({} bytes)", backup.id, backup.size_bytes()));
            detail["backup"] = json!(backup.id);
            journal.step_detail(run, seq, detail).map_err(|e| e.to_string())?;
            journal.set_backup(run, &backup.id).map_err(|e| e.to_string())
        }
        StepKind::Expand => {
            // Up to each expand revision: none of them follows a pending contract one.
            for id in &plan.expand {
                migrate_up(ctx, journal, run, seq, &UpTarget::Revision(id.clone()), detail)?;
            }
            Ok(())
        }
        StepKind::Deploy => {
            let name = step.component.as_deref().ok_or("a deploy step without a component")?;
            let component = component(ctx.manifest, name)?;
            // The deployment it replaces, recorded before anything is stopped (kept when
            // this step is re-run by `resume`).
            if detail.get("previous").is_none() {
                let previous = ctx.driver.current(component).map_err(|e| e.to_string())?;
                detail["previous"] = json!(previous);
                journal.step_detail(run, seq, detail).map_err(|e| e.to_string())?;
            }
            ctx.driver.deploy(component, &version, ctx.say).map_err(|e| format!("deploy {name}: {e}"))?;
            (ctx.say)(&format!("  {name} {version} is up"));
            Ok(())
        }
        StepKind::Verify => {
            for component in &ctx.manifest.components {
                if component.health.is_some() {
                    ctx.driver.check_health(component).map_err(|e| format!("verify: {e}"))?;
                    (ctx.say)(&format!("  {} is healthy", component.name));
                }
            }
            run_smoke(ctx, &version, detail)
        }
        StepKind::Contract => {
            let release = ctx.manifest.release(&plan.to).ok_or("the target release left the manifest")?;
            let target = release.migrate_to.clone().map_or(UpTarget::Heads, UpTarget::Revision);
            migrate_up(ctx, journal, run, seq, &target, detail)
        }
        StepKind::Record => record(ctx, journal, run, plan),
    }
}

/// What the steps of a run did, read back from the journal.
struct Done {
    backup: Option<String>,
    expand: Vec<String>,
    contract: Vec<String>,
    /// Deploy steps that started, in order: the component and what it replaced.
    deployed: Vec<(String, Option<Deployed>)>,
}

fn ids(detail: &serde_json::Value) -> Vec<String> {
    detail["applied"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn done(plan: &Plan, steps: &[StepRow]) -> Done {
    let mut done = Done { backup: None, expand: Vec::new(), contract: Vec::new(), deployed: Vec::new() };
    for row in steps {
        let Some(step) = plan.steps.iter().find(|s| i64::try_from(s.number).ok() == Some(row.seq)) else { continue };
        match step.kind {
            StepKind::Backup => done.backup = row.detail["backup"].as_str().map(str::to_owned),
            StepKind::Expand => done.expand = ids(&row.detail),
            StepKind::Contract => done.contract = ids(&row.detail),
            StepKind::Deploy => {
                if let (Some(name), Some(previous)) = (&step.component, row.detail.get("previous")) {
                    done.deployed.push((name.clone(), serde_json::from_value(previous.clone()).unwrap_or(None)));
                }
            }
            _ => {}
        }
    }
    done
}

/// The depth an undo of `done` needs, and why.
fn depth(ctx: &Context<'_>, done: &Done) -> (UndoDepth, String) {
    let restore = |why: String| {
        if done.backup.is_some() {
            (UndoDepth::Restore, format!("{why}: the run's backup is restored"))
        } else {
            (UndoDepth::Impossible, format!("{why}, and the run has no backup to restore"))
        }
    };
    if !done.contract.is_empty() {
        return restore(format!("contract revisions ran ({})", done.contract.join(", ")));
    }
    if !done.expand.is_empty() {
        let reversible = migrator(ctx).is_ok_and(|m| {
            done.expand.iter().all(|id| m.graph().find(id).is_some_and(|i| m.graph().revision(i).down.is_some()))
        });
        return if reversible {
            (
                UndoDepth::CodeAndDown,
                format!("expand revisions ran ({}) and all have down sections", done.expand.join(", ")),
            )
        } else {
            restore(format!("an expand revision of {} has no down section", done.expand.join(", ")))
        };
    }
    if done.deployed.is_empty() {
        (UndoDepth::Nothing, "nothing was changed".to_owned())
    } else {
        (UndoDepth::Code, "no migration ran: only code changed".to_owned())
    }
}

/// Undoes what the journal says the run did, and marks its steps undone. Returns the depth
/// used and why.
fn undo(ctx: &mut Context<'_>, journal: &Journal, run: &str, plan: &Plan) -> Result<(UndoDepth, String), String> {
    let steps = journal.steps(run).map_err(|e| e.to_string())?;
    let result = undo_done(ctx, &done(plan, &steps))?;
    for row in &steps {
        if row.state != "undone" {
            journal.step_finished(run, usize::try_from(row.seq).unwrap_or(0), "undone").map_err(|e| e.to_string())?;
        }
    }
    Ok(result)
}

/// Undoes `done` at the least destructive depth that restores the old state.
fn undo_done(ctx: &mut Context<'_>, done: &Done) -> Result<(UndoDepth, String), String> {
    let (depth, why) = depth(ctx, done);
    (ctx.say)(&format!("undoing ({}): {why}", depth_name(depth)));
    if depth == UndoDepth::Impossible {
        return Err(why);
    }
    // Code first, newest first. For code and code + down the old code goes back at once:
    // expand revisions keep it working. For a restore the new code is only stopped here, and
    // the old code starts on the restored data below.
    for (name, previous) in done.deployed.iter().rev() {
        let component = component(ctx.manifest, name)?;
        let previous = if depth == UndoDepth::Restore { None } else { previous.as_ref() };
        ctx.driver.put_back(component, previous).map_err(|e| format!("putting {name} back: {e}"))?;
        (ctx.say)(&format!(
            "  {name}: {}",
            previous.map_or_else(|| "stopped".to_owned(), |p| format!("{} is back", p.version))
        ));
    }
    match depth {
        UndoDepth::CodeAndDown => {
            let url = ctx.database.ok_or("no database to revert")?;
            let migrator = migrator(ctx)?;
            let mut engine = upshift_migrate::connect(url, true).map_err(|e| e.to_string())?;
            let count = done.expand.len();
            migrator
                .down(engine.as_mut(), &DownTarget::Last(count), ctx.lock_timeout, &mut |revision, _| {
                    (ctx.say)(&format!("  reverted {} {}", revision.id, revision.name));
                })
                .map_err(|e| format!("reverting the expand revisions: {e}"))?;
        }
        UndoDepth::Restore => {
            let backup = done.backup.as_deref().expect("a restore has a backup");
            upshift_backup::restore(
                &store(ctx.manifest),
                backup,
                &RestoreOptions {
                    target: ctx.database,
                    force: true,
                    paths_into: Some(&ctx.manifest.base_dir),
                    identities: None,
                },
            )
            .map_err(|e| format!("restoring backup {backup}: {e}"))?;
            (ctx.say)(&format!("  restored backup {backup}"));
            for (name, previous) in &done.deployed {
                let component = component(ctx.manifest, name)?;
                ctx.driver.put_back(component, previous.as_ref()).map_err(|e| format!("restarting {name}: {e}"))?;
                if let Some(previous) = previous {
                    (ctx.say)(&format!("  {name}: {} is back", previous.version));
                }
            }
        }
        UndoDepth::Code | UndoDepth::Nothing | UndoDepth::Impossible => {}
    }
    Ok((depth, why))
}

fn depth_name(depth: UndoDepth) -> &'static str {
    match depth {
        UndoDepth::Nothing => "nothing to undo",
        UndoDepth::Code => "code only",
        UndoDepth::CodeAndDown => "code + down",
        UndoDepth::Restore => "restore of the backup",
        UndoDepth::Impossible => "impossible",
    }
}

fn record(ctx: &Context<'_>, journal: &mut Journal, run: &str, plan: &Plan) -> StepResult {
    let steps = journal.steps(run).map_err(|e| e.to_string())?;
    let done = done(plan, &steps);
    let row = journal.run(run).map_err(|e| e.to_string())?.ok_or("the run left the journal")?;
    let deployments: serde_json::Map<String, serde_json::Value> =
        done.deployed.iter().map(|(name, previous)| (name.clone(), json!(previous))).collect();
    journal
        .record_release(&NewRelease {
            version: &plan.to.to_string(),
            status: "deployed",
            replaced_status: "superseded",
            started_at: &row.started_at,
            run_id: run,
            backup_id: done.backup.as_deref(),
            expand: &done.expand,
            contract: &done.contract,
            deployments: &serde_json::Value::Object(deployments),
        })
        .map_err(|e| e.to_string())?;
    if ctx.manifest.backup.keep_last.is_some() || ctx.manifest.backup.keep_within.is_some() {
        let retention =
            Retention { keep_last: ctx.manifest.backup.keep_last, keep_within: ctx.manifest.backup.keep_within };
        // A failed prune does not fail a deployed release: the backups stay.
        if let Err(e) = store(ctx.manifest).prune(retention, std::time::SystemTime::now()) {
            (ctx.say)(&format!("  warning: pruning backups failed: {e}"));
        }
    }
    Ok(())
}

/// Runs the plan's steps from `first`, then undoes on failure.
fn drive(
    ctx: &mut Context<'_>,
    journal: &mut Journal,
    run: &str,
    plan: &Plan,
    first: usize,
) -> Result<Outcome, RunError> {
    let mut failure = None;
    for step in plan.steps.iter().filter(|s| s.number >= first) {
        if ctx.interrupted.load(Ordering::SeqCst) {
            failure = Some("interrupted (SIGINT/SIGTERM)".to_owned());
            break;
        }
        (ctx.say)(&format!("{:>2}. {}", step.number, step.title));
        let mut detail = journal
            .steps(run)?
            .into_iter()
            .find(|s| i64::try_from(step.number).ok() == Some(s.seq))
            .map_or_else(|| json!({}), |s| if s.detail.is_object() { s.detail } else { json!({}) });
        journal.step_started(run, step.number, &format!("{:?}", step.kind).to_lowercase(), &step.title)?;
        journal.step_detail(run, step.number, &detail)?;
        match execute(ctx, journal, run, plan, step, &mut detail) {
            Ok(()) => {
                journal.step_finished(run, step.number, "done")?;
                (ctx.after_step)(step.number);
            }
            Err(message) => {
                journal.step_finished(run, step.number, "failed")?;
                failure = Some(message);
                break;
            }
        }
    }
    let Some(failure) = failure else {
        let revision = journal.deployed()?.map_or(0, |r| r.revision);
        journal.finish_run(run, "succeeded", None)?;
        return Ok(Outcome::Succeeded { revision });
    };
    (ctx.say)(&format!("failed: {failure}"));
    match undo(ctx, journal, run, plan) {
        Ok((depth, why)) => {
            let started = journal.run(run)?.map(|r| r.started_at).unwrap_or_default();
            let no_ids: Vec<String> = Vec::new();
            journal.record_release(&NewRelease {
                version: &plan.to.to_string(),
                status: "failed",
                replaced_status: "superseded",
                started_at: &started,
                run_id: run,
                backup_id: journal.run(run)?.and_then(|r| r.backup_id).as_deref(),
                expand: &no_ids,
                contract: &no_ids,
                deployments: &json!({}),
            })?;
            journal.finish_run(run, "rolled-back", Some(&failure))?;
            Ok(Outcome::RolledBack { depth, why, failure })
        }
        Err(undo_failure) => {
            journal.finish_run(run, "stuck", Some(&format!("{failure}; undo failed: {undo_failure}")))?;
            Ok(Outcome::Stuck { failure, undo_failure })
        }
    }
}

/// Checks before a run touches anything.
fn preflight(ctx: &mut Context<'_>, journal: &Journal) -> Result<(), RunError> {
    journal.refuse_in_flight()?;
    for component in &ctx.manifest.components {
        if ctx.driver.current(component).map_err(|e| RunError::Preflight(e.to_string()))?.is_some()
            && component.health.is_some()
        {
            ctx.driver
                .check_health(component)
                .map_err(|e| RunError::Preflight(format!("{e}; fix it before upgrading (a rollback may help)")))?;
        }
    }
    if let Some(url) = ctx.database {
        upshift_migrate::connect(url, false)
            .and_then(|mut engine| engine.server_version())
            .map_err(|e| RunError::Preflight(format!("the database {url} is not reachable: {e}")))?;
    }
    Ok(())
}

/// Upgrades to the plan's target.
pub fn upgrade(
    ctx: &mut Context<'_>,
    journal: &mut Journal,
    plan: &Plan,
    no_backup: bool,
) -> Result<Outcome, RunError> {
    journal.lock()?;
    preflight(ctx, journal)?;
    let run = journal.begin_run("upgrade", plan, no_backup)?;
    drive(ctx, journal, &run, plan, 1)
}

/// Finishes the run a crash left in the journal, from its first unfinished step.
pub fn resume(ctx: &mut Context<'_>, journal: &mut Journal) -> Result<Outcome, RunError> {
    journal.lock()?;
    let run = journal.running()?.ok_or_else(|| RunError::Nothing("no run to resume: nothing is in flight".into()))?;
    if run.state == "stuck" {
        return Err(RunError::Nothing(format!(
            "run {} failed and its undo failed too ({}); fix the cause, then `upshift abort` retries the undo",
            run.id,
            run.message.unwrap_or_default()
        )));
    }
    journal.adopt_run(&run.id)?;
    let plan = journal.plan(&run.id)?;
    let steps = journal.steps(&run.id)?;
    let first =
        steps.iter().find(|s| s.state != "done").map_or(steps.len() + 1, |s| usize::try_from(s.seq).unwrap_or(1));
    (ctx.say)(&format!("resuming run {} ({} to {}) at step {first}", run.id, run.kind, run.target));
    drive(ctx, journal, &run.id, &plan, first)
}

/// Undoes the run a crash (or a failed undo) left in the journal.
pub fn abort(ctx: &mut Context<'_>, journal: &mut Journal) -> Result<Outcome, RunError> {
    journal.lock()?;
    let run = journal.running()?.ok_or_else(|| RunError::Nothing("no run to abort: nothing is in flight".into()))?;
    journal.adopt_run(&run.id)?;
    let plan = journal.plan(&run.id)?;
    (ctx.say)(&format!("aborting run {} ({} to {})", run.id, run.kind, run.target));
    let failure = "aborted by `upshift abort`".to_owned();
    match undo(ctx, journal, &run.id, &plan) {
        Ok((depth, why)) => {
            journal.finish_run(&run.id, "aborted", Some(&failure))?;
            Ok(Outcome::RolledBack { depth, why, failure })
        }
        Err(undo_failure) => {
            journal.finish_run(&run.id, "stuck", Some(&undo_failure))?;
            Ok(Outcome::Stuck { failure, undo_failure })
        }
    }
}

/// Rolls the deployed release back to the one before it, or to revision `to_revision`:
/// each release after the target is undone, newest first, by the rules of an undo (code;
/// code + `down` of its expand revisions; or a restore of the backup taken before it).
pub fn rollback(ctx: &mut Context<'_>, journal: &mut Journal, to_revision: Option<i64>) -> Result<Outcome, RunError> {
    journal.lock()?;
    journal.refuse_in_flight()?;
    let releases = journal.releases()?;
    let current = releases
        .iter()
        .rev()
        .find(|r| r.status == "deployed")
        .ok_or_else(|| RunError::Nothing("nothing is deployed: there is nothing to roll back".into()))?;
    let was_deployed = |r: &&crate::journal::ReleaseRow| {
        matches!(r.status.as_str(), "superseded" | "rolled-back") && r.revision < current.revision
    };
    let target = match to_revision {
        Some(n) => releases.iter().filter(was_deployed).find(|r| r.revision == n).ok_or_else(|| {
            RunError::Nothing(format!("revision {n} is not an earlier deployed release; `upshift history` lists them"))
        })?,
        None => releases.iter().rev().find(|r| r.status == "superseded" && r.revision < current.revision).ok_or_else(
            || {
                RunError::Nothing(format!(
                    "{} is the first release: there is no earlier one to roll back to",
                    current.version
                ))
            },
        )?,
    };
    // The releases to undo: every deployed one after the target, newest first.
    let chain: Vec<&crate::journal::ReleaseRow> = releases
        .iter()
        .rev()
        .filter(|r| r.revision > target.revision && matches!(r.status.as_str(), "deployed" | "superseded"))
        .collect();
    let plan = Plan {
        from: current.version.parse().ok(),
        to: target
            .version
            .parse()
            .map_err(|e| RunError::Nothing(format!("the journal's version {} is not semver: {e}", target.version)))?,
        expand: Vec::new(),
        contract: Vec::new(),
        steps: Vec::new(),
    };
    let run = journal.begin_run("rollback", &plan, true)?;
    let mut last = (UndoDepth::Nothing, String::new());
    for release in &chain {
        (ctx.say)(&format!("rolling back {} (revision {})", release.version, release.revision));
        let done = Done {
            backup: release.backup_id.clone(),
            expand: release.expand.clone(),
            contract: release.contract.clone(),
            deployed: release
                .deployments
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(name, previous)| {
                            (name.clone(), serde_json::from_value(previous.clone()).unwrap_or(None))
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        match undo_done(ctx, &done) {
            Ok(result) => last = result,
            Err(undo_failure) => {
                journal.finish_run(&run, "stuck", Some(&undo_failure))?;
                return Ok(Outcome::Stuck { failure: format!("rolling back {}", release.version), undo_failure });
            }
        }
    }
    let revision = journal.record_release(&NewRelease {
        version: &target.version,
        status: "deployed",
        replaced_status: "rolled-back",
        started_at: &journal.run(&run)?.map(|r| r.started_at).unwrap_or_default(),
        run_id: &run,
        backup_id: target.backup_id.as_deref(),
        expand: &target.expand,
        contract: &target.contract,
        deployments: &target.deployments,
    })?;
    journal.finish_run(&run, "succeeded", Some(&format!("rolled back to {} ({})", target.version, last.1)))?;
    Ok(Outcome::Succeeded { revision })
}
