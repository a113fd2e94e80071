//! The runner: upgrades and rollbacks as sagas, journaled.
//!
//! An upgrade runs the plan's steps; each step's intent is in the journal before it starts
//! (with what it sets out to do: the revisions it will apply, the deployment it replaces)
//! and its outcome after. When a step fails (or SIGINT/SIGTERM arrive, or `upshift abort`
//! runs after a crash), the undo is planned from what the journal says was done, checked
//! against the database's own applied set, and checked whole before it touches anything
//! (the backup present and verified, the down sections, what is put back). Then it is
//! journaled as a list of actions and the run turns `undoing`: from there it only goes on
//! undoing, whatever command picks it up. Every action is safe to run again, so a crash
//! mid-undo is finished by running the actions not yet done.
//!
//! A rollback returns to the release deployed before the current one, by revision: it
//! undoes the upgrades after it, newest first, by the same rules, and is itself a run that
//! starts `undoing` with all its actions.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use upshift_backup::{CreateOptions, RestoreOptions, Retention, Store};
use upshift_migrate::{DatabaseUrl, DownTarget, Migrator, UpTarget};

use crate::driver::{Deployed, Drivers};
use crate::journal::{
    ActionState, Journal, JournalError, NewRelease, ReleaseRow, ReleaseStatus, Replaced, RollbackPlan, RunPlan, RunRow,
    RunState, SmokeResult, StepDetail, StepRow, StepState, UndoAction, UndoChoice,
};
use crate::manifest::{Component, Manifest};
use crate::plan::{Plan, PlanStep, StepKind, UndoDepth};

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    /// The release is deployed (exit 0).
    Succeeded {
        /// Its revision.
        revision: i64,
    },
    /// The run was undone (exit 3 after a failure; 0 for `abort`; 1 when nothing had
    /// changed).
    RolledBack {
        /// How deep the undo went.
        depth: UndoDepth,
        /// Why that depth.
        why: String,
        /// What failed, or why it was undone.
        failure: String,
    },
    /// A step failed and the undo failed too: the run stays in the journal (exit 4).
    Stuck {
        /// What failed first.
        failure: String,
        /// Why the undo failed.
        undo_failure: String,
    },
}

/// A failure before anything changed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The journal refused (another run, a run in flight), failed, or is damaged.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The plan was refused (unknown target, downgrade, unmet `upgrade_from`, bad files):
    /// bad input, exit 2.
    #[error(transparent)]
    Plan(#[from] crate::plan::PlanError),
    /// A check before the first action failed; nothing was changed (exit 1).
    #[error("preflight: {0}")]
    Preflight(String),
    /// The request cannot be done (no earlier release to roll back to, a revision that was
    /// never deployed): bad usage, exit 2, nothing changed.
    #[error("{0}")]
    Refused(String),
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
    /// Run the components, one driver per kind.
    pub drivers: &'a mut Drivers,
    /// Hears of progress, for people.
    pub say: &'a dyn Fn(&str),
    /// Set by SIGINT/SIGTERM: the run stops at the next step boundary and undoes.
    pub interrupted: &'a AtomicBool,
    /// How long migrations wait for the database lock.
    pub lock_timeout: Duration,
}

/// An error with its causes, for people: `what: cause: cause`.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

fn migrator(ctx: &Context<'_>) -> Result<Migrator, String> {
    ctx.manifest.migrations().map_err(|e| chain(&e))
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

/// Applies `ids` (in order), recording each in the step's detail as it commits.
fn migrate_up(
    ctx: &Context<'_>,
    journal: &mut Journal,
    run: &str,
    seq: usize,
    ids: &[String],
    detail: &mut StepDetail,
) -> Result<(), String> {
    let Some(url) = ctx.database else { return Ok(()) };
    if ids.is_empty() {
        return Ok(());
    }
    let migrator = migrator(ctx)?;
    let mut engine = migrator.connect(url, true).map_err(|e| chain(&e))?;
    for id in ids {
        let mut journal_error = None;
        let result = migrator.up(
            engine.as_mut(),
            &UpTarget::Revision(id.clone()),
            ctx.lock_timeout,
            &mut |revision, duration| {
                (ctx.say)(&format!("  applied {} {} ({} ms)", revision.id, revision.name, duration.as_millis()));
                if !detail.applied.contains(&revision.id) {
                    detail.applied.push(revision.id.clone());
                }
                if let Err(e) = journal.step_detail(run, seq, detail) {
                    journal_error = Some(e);
                }
            },
        );
        if let Some(e) = journal_error {
            return Err(chain(&e));
        }
        // An external tool's output, shown and kept with the step.
        let output = engine.take_output();
        if !output.is_empty() {
            for line in &output {
                (ctx.say)(&format!("    {}", ctx.manifest.redact(&url.redact(line))));
            }
            detail.output.extend(output.iter().map(|line| ctx.manifest.redact(&url.redact(line))));
            journal.step_detail(run, seq, detail).map_err(|e| chain(&e))?;
        }
        if let Err(e) = result {
            // Half applied and recorded nowhere: only the backup can undo it.
            if let upshift_migrate::Error::Statement { id, partial: true, .. } = &e {
                detail.partial = Some(id.clone());
                journal.step_detail(run, seq, detail).map_err(|e| chain(&e))?;
            }
            return Err(chain(&e));
        }
    }
    Ok(())
}

fn run_smoke(ctx: &Context<'_>, version: &str, detail: &mut StepDetail) -> Result<(), String> {
    detail.smoke.clear();
    for command in &ctx.manifest.verify.smoke {
        let argv: Vec<String> = command.iter().map(|a| a.replace("{version}", version)).collect();
        let shown = ctx.manifest.redact(&argv.join(" "));
        let result = crate::command::run(&argv, ctx.manifest.verify.timeout);
        let output = ctx.manifest.redact(result.as_ref().unwrap_or_else(|e| e));
        detail.smoke.push(SmokeResult { command: shown.clone(), ok: result.is_ok(), output });
        result.map_err(|e| format!("smoke `{shown}` failed: {}", ctx.manifest.redact(&e)))?;
        (ctx.say)(&format!("  smoke ok: {shown}"));
    }
    Ok(())
}

/// Runs one step of the plan (not the record). `detail` is the journal's record of it,
/// kept from an earlier attempt when resuming.
fn execute(
    ctx: &mut Context<'_>,
    journal: &mut Journal,
    run: &str,
    plan: &Plan,
    step: &PlanStep,
    detail: &mut StepDetail,
) -> Result<(), String> {
    let seq = step.number;
    let version = plan.to.to_string();
    match step.kind {
        StepKind::Preflight | StepKind::Record => Ok(()),
        StepKind::Backup => {
            if plan.no_backup {
                return Ok(());
            }
            // A backup recorded by an attempt that crashed before finishing the step is
            // kept (it was taken before anything changed).
            if let Some(id) = &detail.backup
                && store(ctx.manifest).load(id).is_ok()
            {
                return Ok(());
            }
            let manifest = ctx.manifest;
            // A first deploy may find no SQLite file yet: the empty database is created (as
            // `migrate up` would) so the backup records, and a restore brings back, that state.
            if let Some(url @ DatabaseUrl::Sqlite { .. }) = ctx.database {
                upshift_migrate::connect(url, true).map_err(|e| format!("backup: {}", chain(&e)))?;
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
            .map_err(|e| format!("backup: {}", chain(&e)))?;
            (ctx.say)(&format!("  backup {} ({} bytes)", backup.id, backup.size_bytes()));
            detail.backup = Some(backup.id);
            journal.step_detail(run, seq, detail).map_err(|e| chain(&e))
        }
        StepKind::Expand => migrate_up(ctx, journal, run, seq, &plan.expand, detail),
        StepKind::Contract => migrate_up(ctx, journal, run, seq, &plan.contract, detail),
        StepKind::Deploy => {
            let name = step.component.as_deref().ok_or("a deploy step without a component")?;
            let component = component(ctx.manifest, name)?;
            let driver = ctx.drivers.get(component).map_err(|e| format!("deploy {name}: {}", chain(&e)))?;
            // What it replaces, recorded before anything is stopped (kept when this step is
            // re-run by `resume`).
            if detail.replaced.is_none() {
                let previous = driver.current(component).map_err(|e| format!("deploy {name}: {}", chain(&e)))?;
                detail.replaced = Some(Replaced { previous, component: component.clone() });
                journal.step_detail(run, seq, detail).map_err(|e| chain(&e))?;
            }
            driver.deploy(component, &version, ctx.say).map_err(|e| format!("deploy {name}: {}", chain(&e)))?;
            (ctx.say)(&format!("  {name} {version} is up"));
            Ok(())
        }
        StepKind::Verify => {
            for component in &ctx.manifest.components {
                if component.checks_health() {
                    let driver = ctx.drivers.get(component).map_err(|e| format!("verify: {}", chain(&e)))?;
                    driver.check_health(component).map_err(|e| format!("verify: {}", chain(&e)))?;
                    (ctx.say)(&format!("  {} is healthy", component.name));
                }
            }
            let result = run_smoke(ctx, &version, detail);
            journal.step_detail(run, seq, detail).map_err(|e| chain(&e))?;
            result?;
            watch(ctx)
        }
    }
}

/// The watch after verify: every component with a health check must stay healthy for
/// `[verify] watch`, checked every `watch_interval`; the first failure fails the step, and
/// the release is undone like any other failure. SIGINT/SIGTERM end the watch as a failure.
fn watch(ctx: &mut Context<'_>) -> Result<(), String> {
    let verify = &ctx.manifest.verify;
    if verify.watch.is_zero() {
        return Ok(());
    }
    (ctx.say)(&format!("  watching health for {}", humantime::format_duration(verify.watch)));
    let started = std::time::Instant::now();
    while started.elapsed() < verify.watch {
        if ctx.interrupted.load(Ordering::SeqCst) {
            return Err("interrupted (SIGINT/SIGTERM) during the watch".into());
        }
        for component in ctx.manifest.components.iter().filter(|c| c.checks_health()) {
            let driver = ctx.drivers.get(component).map_err(|e| format!("watch: {}", chain(&e)))?;
            let status = driver.status(component).map_err(|e| format!("watch: {}", chain(&e)))?;
            if !status.healthy {
                return Err(format!(
                    "watch: {} became unhealthy {}s after the verify: {}",
                    component.name,
                    started.elapsed().as_secs(),
                    status.problem.unwrap_or_default()
                ));
            }
        }
        std::thread::sleep(verify.watch_interval.min(verify.watch.saturating_sub(started.elapsed())));
    }
    (ctx.say)("  healthy through the watch");
    Ok(())
}

/// What an upgrade run did, read back from its steps.
#[derive(Default)]
struct Done {
    backup: Option<String>,
    /// A `no-transaction` revision left half applied.
    partial: Option<String>,
    /// Revisions the expand and contract steps set out to apply (or applied).
    expand: Vec<String>,
    contract: Vec<String>,
    /// Deploy steps that recorded what they replace, in order.
    deployed: Vec<Replaced>,
}

fn done(steps: &[StepRow]) -> Done {
    let mut done = Done::default();
    let union = |detail: &StepDetail| {
        let mut ids = detail.intends.clone();
        ids.extend(detail.applied.iter().filter(|id| !detail.intends.contains(id)).cloned());
        ids
    };
    for row in steps {
        match row.kind {
            StepKind::Backup => done.backup.clone_from(&row.detail.backup),
            StepKind::Expand => {
                done.expand = union(&row.detail);
                done.partial = done.partial.take().or_else(|| row.detail.partial.clone());
            }
            StepKind::Contract => {
                done.contract = union(&row.detail);
                done.partial = done.partial.take().or_else(|| row.detail.partial.clone());
            }
            StepKind::Deploy => done.deployed.extend(row.detail.replaced.clone()),
            StepKind::Preflight | StepKind::Verify | StepKind::Record => {}
        }
    }
    done
}

/// The database's applied set now.
fn applied_now(ctx: &Context<'_>) -> Result<BTreeSet<String>, String> {
    let Some(url) = ctx.database else { return Ok(BTreeSet::new()) };
    let mut engine = migrator(ctx)?.connect(url, false).map_err(|e| chain(&e))?;
    Ok(engine.applied().map_err(|e| chain(&e))?.into_iter().map(|r| r.id).collect())
}

/// An undo: its depth, why, and its actions.
struct Undo {
    choice: UndoChoice,
    actions: Vec<UndoAction>,
}

/// What undoing one release (or one run) takes, from what it did: the least destructive
/// depth that restores the old state.
fn undo_of(
    ctx: &Context<'_>,
    backup: Option<&str>,
    partial: Option<&str>,
    expand_applied: &[String],
    contract_applied: &[String],
    deployed: &[Replaced],
) -> Result<Undo, String> {
    let restore = |why: String| -> Result<(UndoDepth, String), String> {
        match backup {
            Some(_) => Ok((UndoDepth::Restore, format!("{why}: the backup taken before it is restored"))),
            None => Err(format!("{why}, and there is no backup to restore (--no-backup)")),
        }
    };
    let (depth, why) = if let Some(id) = partial {
        restore(format!(
            "revision {id} runs without a transaction and failed after some of its statements, which stay applied"
        ))?
    } else if !contract_applied.is_empty() {
        restore(format!("contract revisions ran ({})", contract_applied.join(", ")))?
    } else if !expand_applied.is_empty() {
        let migrator = migrator(ctx)?;
        let graph = migrator.graph();
        let irreversible: Vec<&String> =
            expand_applied.iter().filter(|id| graph.find(id).is_none_or(|i| !graph.revision(i).reversible())).collect();
        if irreversible.is_empty() {
            (
                UndoDepth::CodeAndDown,
                format!("expand revisions ran ({}) and all have down sections", expand_applied.join(", ")),
            )
        } else {
            restore(format!(
                "expand revision {} has no down section",
                irreversible.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ))?
        }
    } else if !deployed.is_empty() {
        (UndoDepth::Code, "no migration ran: only code changed".to_owned())
    } else {
        (UndoDepth::Nothing, "nothing was changed".to_owned())
    };
    let put_back = |r: &Replaced| UndoAction::PutBack { component: r.component.clone(), previous: r.previous.clone() };
    let mut actions: Vec<UndoAction> = Vec::new();
    match depth {
        UndoDepth::Code => actions.extend(deployed.iter().rev().map(put_back)),
        UndoDepth::CodeAndDown => {
            // The old code goes back first: the expand revisions keep it working.
            actions.extend(deployed.iter().rev().map(put_back));
            actions.push(UndoAction::Revert { revisions: expand_applied.to_vec() });
        }
        UndoDepth::Restore => {
            // The new code stops, the data goes back, then the old code starts on it.
            actions.extend(
                deployed.iter().rev().map(|r| UndoAction::PutBack { component: r.component.clone(), previous: None }),
            );
            actions.push(UndoAction::Restore { backup: backup.expect("a restore has a backup").to_owned() });
            actions.extend(deployed.iter().filter(|r| r.previous.is_some()).map(put_back));
        }
        UndoDepth::Nothing | UndoDepth::Impossible => {}
    }
    Ok(Undo { choice: UndoChoice { depth, why }, actions })
}

/// Checks that every action can be done, changing nothing: the backup is there and its
/// checksums pass, every revision to revert has its down section, every deployment to put
/// back can start.
fn check_actions(ctx: &mut Context<'_>, actions: &[UndoAction]) -> Result<(), String> {
    for action in actions {
        match action {
            UndoAction::Restore { backup } => {
                upshift_backup::verify(&store(ctx.manifest), backup, false, None, None)
                    .map_err(|e| format!("the backup {backup} cannot be restored: {}", chain(&e)))?;
            }
            UndoAction::Revert { revisions } => {
                let migrator = migrator(ctx)?;
                for id in revisions {
                    let index = migrator
                        .graph()
                        .find(id)
                        .ok_or_else(|| format!("revision {id}'s file is gone: it cannot be reverted"))?;
                    if !migrator.graph().revision(index).reversible() {
                        return Err(format!("revision {id} has no down section: it cannot be reverted"));
                    }
                }
            }
            UndoAction::PutBack { component, previous: Some(previous) } => {
                let driver = ctx.drivers.get(component).map_err(|e| chain(&e))?;
                driver.check_put_back(previous, component).map_err(|e| {
                    format!("{} {} cannot be put back: {}", component.name, previous.version, chain(&e))
                })?;
            }
            UndoAction::PutBack { previous: None, .. } => {}
        }
    }
    Ok(())
}

/// Does one undo action. Each is safe to do again.
fn act(ctx: &mut Context<'_>, action: &UndoAction) -> Result<(), String> {
    match action {
        UndoAction::PutBack { component, previous } => {
            let driver = ctx.drivers.get(component).map_err(|e| chain(&e))?;
            driver
                .put_back(component, previous.as_ref())
                .map_err(|e| format!("putting {} back: {}", component.name, chain(&e)))?;
            (ctx.say)(&format!(
                "  {}: {}",
                component.name,
                previous.as_ref().map_or_else(|| "stopped".to_owned(), |p| format!("{} is back", p.version))
            ));
        }
        UndoAction::Revert { revisions } => {
            let url = ctx.database.ok_or("no database to revert")?;
            let migrator = migrator(ctx)?;
            let mut engine = migrator.connect(url, true).map_err(|e| chain(&e))?;
            let result = migrator.down(
                engine.as_mut(),
                &DownTarget::Exactly(revisions.clone()),
                ctx.lock_timeout,
                &mut |revision, _| {
                    (ctx.say)(&format!("  reverted {} {}", revision.id, revision.name));
                },
            );
            for line in engine.take_output() {
                (ctx.say)(&format!("    {}", ctx.manifest.redact(&url.redact(&line))));
            }
            result.map_err(|e| format!("reverting {}: {}", revisions.join(", "), chain(&e)))?;
        }
        UndoAction::Restore { backup } => {
            upshift_backup::restore(
                &store(ctx.manifest),
                backup,
                &RestoreOptions {
                    target: ctx.database,
                    force: true,
                    paths_into: Some(&ctx.manifest.base_dir),
                    saved_paths: Some(&ctx.manifest.backup.paths),
                    identities: None,
                },
            )
            .map_err(|e| format!("restoring backup {backup}: {}", chain(&e)))?;
            (ctx.say)(&format!("  restored backup {backup}"));
        }
    }
    Ok(())
}

pub(crate) fn depth_name(depth: UndoDepth) -> &'static str {
    match depth {
        UndoDepth::Nothing => "nothing to undo",
        UndoDepth::Code => "code only",
        UndoDepth::CodeAndDown => "code + down",
        UndoDepth::Restore => "restore of the backup",
        UndoDepth::Impossible => "impossible",
    }
}

/// How a run ends once its undo is done.
enum Ending {
    /// An upgrade undone: its release is recorded as failed.
    Undone { state: RunState, version: String },
    /// A rollback: the release it returns to is deployed again.
    RolledBackTo(RollbackPlan),
}

/// Plans the undo of an upgrade run from its journal, checks it, and turns the run
/// `undoing`; then does it. A plan or check that fails leaves the run stuck, untouched.
fn start_undo(
    ctx: &mut Context<'_>,
    journal: &mut Journal,
    run: &str,
    failure: &str,
    ending: Ending,
) -> Result<Outcome, RunError> {
    (ctx.say)(&format!("failed: {failure}"));
    let planned = (|| {
        let done = done(&journal.steps(run).map_err(|e| chain(&e))?);
        let applied =
            if done.expand.is_empty() && done.contract.is_empty() { BTreeSet::new() } else { applied_now(ctx)? };
        let expand: Vec<String> = done.expand.iter().filter(|id| applied.contains(*id)).cloned().collect();
        let contract: Vec<String> = done.contract.iter().filter(|id| applied.contains(*id)).cloned().collect();
        let undo = undo_of(ctx, done.backup.as_deref(), done.partial.as_deref(), &expand, &contract, &done.deployed)?;
        check_actions(ctx, &undo.actions)?;
        Ok::<Undo, String>(undo)
    })();
    match planned {
        Ok(undo) => {
            (ctx.say)(&format!("undoing ({}): {}", depth_name(undo.choice.depth), undo.choice.why));
            journal.begin_undo(run, failure, &undo.choice, &undo.actions)?;
            finish_undo(ctx, journal, run, ending)
        }
        Err(undo_failure) => {
            let message = format!("{failure}; the undo cannot start: {undo_failure}");
            journal.set_stuck(run, Some(failure), &message)?;
            Ok(Outcome::Stuck { failure: failure.to_owned(), undo_failure })
        }
    }
}

/// Does the undo actions not yet done, then ends the run.
fn finish_undo(ctx: &mut Context<'_>, journal: &mut Journal, run: &str, ending: Ending) -> Result<Outcome, RunError> {
    let row = journal.run(run)?.ok_or_else(|| RunError::Nothing(format!("run {run} left the journal")))?;
    let failure = row.failure.clone().unwrap_or_default();
    for action in journal.undo_actions(run)? {
        if action.state == ActionState::Done {
            continue;
        }
        journal.action_state(run, action.seq, ActionState::Started)?;
        if let Err(undo_failure) = act(ctx, &action.action) {
            journal.set_stuck(run, None, &format!("undo failed at {}: {undo_failure}", action.action.describe()))?;
            return Ok(Outcome::Stuck { failure, undo_failure });
        }
        journal.action_state(run, action.seq, ActionState::Done)?;
    }
    let choice = row.undo.clone().unwrap_or(UndoChoice { depth: UndoDepth::Nothing, why: String::new() });
    let none = BTreeMap::new();
    match ending {
        Ending::Undone { state, version } => {
            let previous = journal.deployed()?.map(|r| r.revision);
            let backup = journal.steps(run)?.into_iter().find_map(|s| s.detail.backup);
            journal.finish_run(
                run,
                state,
                Some(&failure),
                Some(&NewRelease {
                    version: &version,
                    status: ReleaseStatus::Failed,
                    replaced_status: ReleaseStatus::Superseded,
                    previous,
                    returns_to: None,
                    backup_id: backup.as_deref(),
                    expand: &[],
                    contract: &[],
                    deployments: &none,
                }),
                None,
            )?;
            Ok(Outcome::RolledBack { depth: choice.depth, why: choice.why, failure })
        }
        Ending::RolledBackTo(plan) => {
            let releases = journal.releases()?;
            let target = release(&releases, plan.target_revision)?;
            let returns_to = release(&releases, plan.returns_to)?;
            let revision = journal
                .finish_run(
                    run,
                    RunState::Succeeded,
                    Some(&format!("rolled back to {} ({})", target.version, choice.why)),
                    Some(&NewRelease {
                        version: &target.version,
                        status: ReleaseStatus::Deployed,
                        replaced_status: ReleaseStatus::RolledBack,
                        previous: returns_to.previous,
                        returns_to: Some(plan.returns_to),
                        backup_id: None,
                        expand: &[],
                        contract: &[],
                        deployments: &none,
                    }),
                    None,
                )?
                .unwrap_or(0);
            Ok(Outcome::Succeeded { revision })
        }
    }
}

fn release(releases: &[ReleaseRow], revision: i64) -> Result<&ReleaseRow, RunError> {
    releases
        .iter()
        .find(|r| r.revision == revision)
        .ok_or_else(|| RunError::Nothing(format!("release revision {revision} is not in the journal")))
}

/// Records the release and ends the run in one journal write, then prunes backups.
fn record(ctx: &Context<'_>, journal: &mut Journal, run: &str, plan: &Plan, seq: usize) -> Result<Outcome, RunError> {
    let done = done(&journal.steps(run)?);
    let previous = journal.deployed()?.map(|r| r.revision);
    let deployments: BTreeMap<String, Option<Deployed>> =
        done.deployed.iter().map(|r| (r.component.name.clone(), r.previous.clone())).collect();
    let revision = journal
        .finish_run(
            run,
            RunState::Succeeded,
            None,
            Some(&NewRelease {
                version: &plan.to.to_string(),
                status: ReleaseStatus::Deployed,
                replaced_status: ReleaseStatus::Superseded,
                previous,
                returns_to: None,
                backup_id: done.backup.as_deref(),
                expand: &plan.expand,
                contract: &plan.contract,
                deployments: &deployments,
            }),
            Some(seq),
        )?
        .unwrap_or(0);
    if ctx.manifest.backup.keep_last.is_some() || ctx.manifest.backup.keep_within.is_some() {
        let retention =
            Retention { keep_last: ctx.manifest.backup.keep_last, keep_within: ctx.manifest.backup.keep_within };
        // A failed prune does not fail a deployed release: the backups stay.
        if let Err(e) = store(ctx.manifest).prune(retention, std::time::SystemTime::now()) {
            (ctx.say)(&format!("  warning: pruning backups failed: {}", chain(&e)));
        }
    }
    Ok(Outcome::Succeeded { revision })
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
    let mut earlier: BTreeMap<usize, StepDetail> = journal.steps(run)?.into_iter().map(|s| (s.seq, s.detail)).collect();
    for step in plan.steps.iter().filter(|s| s.number >= first) {
        if ctx.interrupted.load(Ordering::SeqCst) {
            failure = Some("interrupted (SIGINT/SIGTERM)".to_owned());
            break;
        }
        (ctx.say)(&format!("{:>2}. {}", step.number, step.title));
        let mut detail = earlier.remove(&step.number).unwrap_or_default();
        match step.kind {
            StepKind::Expand => detail.intends.clone_from(&plan.expand),
            StepKind::Contract => detail.intends.clone_from(&plan.contract),
            _ => {}
        }
        journal.step_started(run, step.number, step.kind, &step.title, &detail)?;
        if step.kind == StepKind::Record {
            return record(ctx, journal, run, plan, step.number);
        }
        match execute(ctx, journal, run, plan, step, &mut detail) {
            Ok(()) => journal.step_finished(run, step.number, StepState::Done)?,
            Err(message) => {
                journal.step_finished(run, step.number, StepState::Failed)?;
                failure = Some(message);
                break;
            }
        }
    }
    let failure = failure.unwrap_or_else(|| "the plan has no record step".to_owned());
    start_undo(
        ctx,
        journal,
        run,
        &failure,
        Ending::Undone { state: RunState::RolledBack, version: plan.to.to_string() },
    )
}

/// Checks before an upgrade touches anything.
fn preflight(ctx: &mut Context<'_>, journal: &Journal, plan: &Plan) -> Result<(), RunError> {
    journal.refuse_in_flight()?;
    let deployed = journal.deployed()?;
    for component in &ctx.manifest.components {
        let driver = ctx.drivers.get(component).map_err(|e| RunError::Preflight(chain(&e)))?;
        let current = driver.current(component).map_err(|e| RunError::Preflight(chain(&e)))?;
        match (&current, &deployed) {
            // A service run by hand, or a Deployment someone else applied: the first deploy
            // takes it over, and its undo puts it back as it was.
            (Some(running), None) if running.adopted => {
                (ctx.say)(&format!("  {}: taking over {} (not deployed by upshift)", component.name, running.version));
            }
            (Some(running), None) => {
                return Err(RunError::Preflight(format!(
                    "component {} already runs {}, but the journal records no deployed release; upshift will not treat this as a first deploy. If the journal was moved or deleted, put it back; else stop what runs (`upshift agent stop`) first",
                    component.name, running.version
                )));
            }
            (Some(running), Some(release)) if running.version != release.version => {
                return Err(RunError::Preflight(format!(
                    "the journal says {} is deployed but component {} runs {}; `upshift status` shows what runs",
                    release.version, component.name, running.version
                )));
            }
            _ => {}
        }
        if current.is_some() && component.checks_health() {
            driver.check_health(component).map_err(|e| {
                RunError::Preflight(format!("{}; fix it before upgrading (a rollback may help)", chain(&e)))
            })?;
        }
    }
    // The new version can be deployed: its program is there, its address free or ours.
    let version = plan.to.to_string();
    for component in &ctx.manifest.components {
        let driver = ctx.drivers.get(component).map_err(|e| RunError::Preflight(chain(&e)))?;
        driver.preflight(component, &version).map_err(|e| RunError::Preflight(chain(&e)))?;
    }
    if let Some(url) = ctx.database {
        let server = upshift_migrate::connect(url, false)
            .and_then(|mut engine| engine.server_version())
            .map_err(|e| RunError::Preflight(format!("the database {url} is not reachable: {}", chain(&e))))?;
        if let (DatabaseUrl::Postgres { .. }, Some(minimum)) = (url, &ctx.manifest.min_server)
            && version_parts(&server) < version_parts(minimum)
        {
            return Err(RunError::Preflight(format!(
                "the database server runs PostgreSQL {server}, older than [database] min_server {minimum}; upgrade the server first"
            )));
        }
    }
    if !plan.no_backup {
        check_free_space(ctx)?;
    }
    if plan.from.as_ref().map(ToString::to_string) != deployed.map(|r| r.version) {
        return Err(RunError::Preflight("the deployed release changed since the plan was made; plan again".into()));
    }
    Ok(())
}

/// The leading numbers of a version (`15.18 (Debian ...)` is `[15, 18]`), to compare.
fn version_parts(text: &str) -> Vec<u64> {
    text.split_whitespace().next().unwrap_or("").split('.').map_while(|part| part.parse().ok()).collect()
}

/// Free space for the backup: at least the database's and the saved paths' size before
/// compression, and 64 MiB more, on the backup dir's filesystem.
fn check_free_space(ctx: &Context<'_>) -> Result<(), RunError> {
    let backup = &ctx.manifest.backup;
    let needed = upshift_backup::estimate(ctx.database, &ctx.manifest.base_dir, &backup.paths)
        .map_err(|e| RunError::Preflight(format!("estimating the backup's size: {}", chain(&e))))?
        + 64 * 1024 * 1024;
    if let Some(free) = upshift_backup::free_space(&backup.dir)
        && free < needed
    {
        return Err(RunError::Preflight(format!(
            "the backup may need {} MiB and {} has {} MiB free; free some space, move [backup] dir, or prune old backups (`upshift backup prune`)",
            needed / (1024 * 1024),
            backup.dir.display(),
            free / (1024 * 1024)
        )));
    }
    Ok(())
}

/// Upgrades to the plan's target.
pub fn upgrade(ctx: &mut Context<'_>, journal: &mut Journal, plan: &Plan) -> Result<Outcome, RunError> {
    journal.lock()?;
    preflight(ctx, journal, plan)?;
    let from = plan.from.as_ref().map(ToString::to_string);
    let run = journal.begin_run(
        &RunPlan::Upgrade { plan: plan.clone() },
        &plan.to.to_string(),
        from.as_deref(),
        plan.no_backup,
        None,
    )?;
    ctx.drivers.note_run(&run);
    drive(ctx, journal, &run, plan, 1)
}

/// The run in flight, adopted by this process.
fn adopt(journal: &mut Journal, what: &str) -> Result<(RunRow, RunPlan), RunError> {
    journal.lock()?;
    let run =
        journal.in_flight()?.ok_or_else(|| RunError::Nothing(format!("no run to {what}: nothing is in flight")))?;
    journal.adopt_run(&run.id)?;
    let plan = journal.plan(&run.id)?;
    Ok((run, plan))
}

/// Finishes the run a crash left in the journal: a run still going forward goes on from
/// its first unfinished step; a run that was undoing (or stuck) finishes its undo. It
/// never runs forward once an undo began.
pub fn resume(ctx: &mut Context<'_>, journal: &mut Journal) -> Result<Outcome, RunError> {
    let (run, run_plan) = adopt(journal, "resume")?;
    ctx.drivers.note_run(&run.id);
    match run_plan {
        RunPlan::Upgrade { plan } => {
            let ending = Ending::Undone { state: RunState::RolledBack, version: plan.to.to_string() };
            if run.undo.is_some() {
                (ctx.say)(&format!("resuming the undo of run {} (upgrade to {})", run.id, run.target));
                return finish_undo(ctx, journal, &run.id, ending);
            }
            if run.state != RunState::Running {
                let failure = run.failure.unwrap_or_else(|| "the run's undo could not start".into());
                return start_undo(ctx, journal, &run.id, &failure, ending);
            }
            let steps = journal.steps(&run.id)?;
            let first = steps.iter().find(|s| s.state != StepState::Done).map_or(steps.len() + 1, |s| s.seq);
            (ctx.say)(&format!("resuming run {} (upgrade to {}) at step {first}", run.id, run.target));
            drive(ctx, journal, &run.id, &plan, first)
        }
        RunPlan::Rollback { plan } => {
            (ctx.say)(&format!("resuming run {} (rollback to {})", run.id, run.target));
            finish_undo(ctx, journal, &run.id, Ending::RolledBackTo(plan))
        }
    }
}

/// Undoes the run a crash (or a failed undo) left in the journal. A rollback in flight can
/// only be finished: its undo of the newer releases goes on.
pub fn abort(ctx: &mut Context<'_>, journal: &mut Journal) -> Result<Outcome, RunError> {
    let (run, run_plan) = adopt(journal, "abort")?;
    ctx.drivers.note_run(&run.id);
    match run_plan {
        RunPlan::Upgrade { plan } => {
            (ctx.say)(&format!("aborting run {} (upgrade to {})", run.id, run.target));
            let ending = Ending::Undone { state: RunState::Aborted, version: plan.to.to_string() };
            if run.undo.is_some() {
                return finish_undo(ctx, journal, &run.id, ending);
            }
            let failure = run.failure.unwrap_or_else(|| "aborted by `upshift abort`".to_owned());
            start_undo(ctx, journal, &run.id, &failure, ending)
        }
        RunPlan::Rollback { plan } => {
            (ctx.say)(&format!(
                "run {} is a rollback to {}: finishing it (a rollback cannot go back)",
                run.id, run.target
            ));
            finish_undo(ctx, journal, &run.id, Ending::RolledBackTo(plan))
        }
    }
}

/// The undo of one upgrade release, from its record.
fn undo_release(ctx: &Context<'_>, release: &ReleaseRow, applied: &BTreeSet<String>) -> Result<Undo, String> {
    let expand: Vec<String> = release.expand.iter().filter(|id| applied.contains(*id)).cloned().collect();
    let contract: Vec<String> = release.contract.iter().filter(|id| applied.contains(*id)).cloned().collect();
    let deployed: Vec<Replaced> = release
        .deployments
        .iter()
        .map(|(name, previous)| {
            // What runs now for it: the manifest's component, else the one recorded.
            let now = ctx
                .manifest
                .components
                .iter()
                .find(|c| &c.name == name)
                .cloned()
                .or_else(|| previous.as_ref().and_then(|p| p.component.clone()))
                .ok_or_else(|| format!("component {name} is neither in the manifest nor in the journal's record"))?;
            Ok(Replaced { previous: previous.clone(), component: now })
        })
        .collect::<Result<_, String>>()?;
    undo_of(ctx, release.backup_id.as_deref(), None, &expand, &contract, &deployed)
        .map_err(|e| format!("release {} (revision {}): {e}", release.version, release.revision))
}

/// A rollback worked out, before anything is done: what it returns to, and its undo.
pub struct RollbackPreview {
    /// The deployed release.
    pub from: ReleaseRow,
    /// The release it returns to.
    pub target: ReleaseRow,
    /// What it undoes, newest first, and the depth and why.
    pub choice: UndoChoice,
    /// Its actions, in order.
    pub actions: Vec<UndoAction>,
    plan: RollbackPlan,
}

impl RollbackPreview {
    /// What the rollback will do, for people (the confirmation prompt): each action, and
    /// for a restore the backup's age and that data written since is lost.
    pub fn describe(&self, manifest: &Manifest) -> String {
        let mut lines = vec![format!(
            "Roll back from {} (revision {}) to {} (revision {}): {}",
            self.from.version, self.from.revision, self.target.version, self.target.revision, self.choice.why
        )];
        for action in &self.actions {
            lines.push(format!("  - {}", action.describe()));
            if let UndoAction::Restore { backup } = action {
                let taken = store(manifest).load(backup).map_or_else(|_| "?".into(), |b| b.created_at);
                lines.push(format!(
                    "    taken {taken}: everything written to the database (and saved paths) since then is lost"
                ));
            }
        }
        lines.join("\n")
    }
}

/// Works out a rollback to the release deployed before the current one (or to revision
/// `to_revision`) and checks every action it needs, changing nothing.
pub fn preview_rollback(
    ctx: &mut Context<'_>,
    journal: &Journal,
    to_revision: Option<i64>,
) -> Result<RollbackPreview, RunError> {
    journal.refuse_in_flight()?;
    let releases = journal.releases()?;
    let current = releases
        .iter()
        .rev()
        .find(|r| r.status == ReleaseStatus::Deployed)
        .ok_or_else(|| RunError::Refused("nothing is deployed: there is nothing to roll back".into()))?;
    let (target, undoes) = rollback_target(&releases, current, to_revision)?;
    let applied = applied_now(ctx).map_err(RunError::Preflight)?;
    let mut actions = Vec::new();
    let mut depth = UndoDepth::Nothing;
    let mut why = Vec::new();
    for revision in &undoes {
        let undone = release(&releases, *revision)?;
        let undo = undo_release(ctx, undone, &applied).map_err(RunError::Preflight)?;
        depth = depth.max(undo.choice.depth);
        why.push(format!("{} ({})", undone.version, undo.choice.why));
        actions.extend(undo.actions);
    }
    check_actions(ctx, &actions).map_err(|e| RunError::Preflight(format!("{e}; nothing was changed")))?;
    let plan = RollbackPlan {
        from_revision: current.revision,
        target_revision: target.revision,
        returns_to: target.state_revision(),
        undoes,
    };
    Ok(RollbackPreview {
        from: current.clone(),
        target: target.clone(),
        choice: UndoChoice { depth, why: format!("undoing {}", why.join("; ")) },
        actions,
        plan,
    })
}

/// Rolls the deployed release back to the one deployed before it, or to revision
/// `to_revision`: each upgrade after the target is undone, newest first, by the rules of
/// an undo (code; code + `down` of its expand revisions; or a restore of the backup taken
/// before it). Everything the undo needs is checked before the first action; the rollback
/// is recorded as a new revision (like `helm rollback`).
pub fn rollback(ctx: &mut Context<'_>, journal: &mut Journal, to_revision: Option<i64>) -> Result<Outcome, RunError> {
    journal.lock()?;
    let preview = preview_rollback(ctx, journal, to_revision)?;
    run_rollback(ctx, journal, preview)
}

/// Runs a rollback worked out by [`preview_rollback`] (under the run lock).
pub fn run_rollback(
    ctx: &mut Context<'_>,
    journal: &mut Journal,
    preview: RollbackPreview,
) -> Result<Outcome, RunError> {
    journal.lock()?;
    let RollbackPreview { from, target, choice, actions, plan } = preview;
    (ctx.say)(&format!("rolling back to {} (revision {}): {}", target.version, target.revision, choice.why));
    let run = journal.begin_run(
        &RunPlan::Rollback { plan: plan.clone() },
        &target.version,
        Some(&from.version),
        false,
        Some((&choice, &actions)),
    )?;
    ctx.drivers.note_run(&run);
    finish_undo(ctx, journal, &run, Ending::RolledBackTo(plan))
}

/// The release a rollback returns to and the upgrade revisions it undoes (newest first).
/// Releases form a line through `previous`: an upgrade follows the release it replaced, a
/// rollback has the state of the upgrade it returns to. A rollback goes back along that
/// line only.
pub fn rollback_target<'r>(
    releases: &'r [ReleaseRow],
    current: &ReleaseRow,
    to_revision: Option<i64>,
) -> Result<(&'r ReleaseRow, Vec<i64>), RunError> {
    let find = |revision: i64| releases.iter().find(|r| r.revision == revision);
    let from_state = current.state_revision();
    // The line behind what is deployed: upgrade revisions, newest first.
    let mut line = vec![from_state];
    while let Some(previous) = find(*line.last().expect("not empty")).and_then(|r| r.previous) {
        let state = find(previous).map_or(previous, ReleaseRow::state_revision);
        if line.contains(&state) {
            break;
        }
        line.push(state);
    }
    let target = match to_revision {
        None => {
            let previous = find(from_state).and_then(|r| r.previous).ok_or_else(|| {
                RunError::Refused(format!(
                    "{} (revision {}) is the first release in its line: there is no earlier release to roll back to; nothing was changed",
                    current.version, current.revision
                ))
            })?;
            find(previous).ok_or_else(|| RunError::Refused(format!("revision {previous} is not in the journal")))?
        }
        Some(n) => {
            let row = find(n).ok_or_else(|| {
                RunError::Refused(format!("revision {n} does not exist; `upshift history` lists the revisions"))
            })?;
            if row.status == ReleaseStatus::Failed {
                return Err(RunError::Refused(format!(
                    "revision {n} ({}) failed: it was never deployed, so there is nothing to return to",
                    row.version
                )));
            }
            if row.state_revision() == from_state {
                return Err(RunError::Refused(format!(
                    "revision {n} ({}) is what is deployed now; nothing to roll back",
                    row.version
                )));
            }
            if !line.contains(&row.state_revision()) {
                return Err(RunError::Refused(format!(
                    "revision {n} ({}) is not an earlier release of what is deployed (it was rolled back or replaced since); `upshift upgrade --to {}` goes to it",
                    row.version, row.version
                )));
            }
            row
        }
    };
    let stop = target.state_revision();
    let undoes = line.into_iter().take_while(|r| *r != stop).collect();
    Ok((target, undoes))
}
