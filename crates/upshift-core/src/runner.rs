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
    ActionState, Journal, JournalError, NewRelease, RanHook, ReleaseRow, ReleaseStatus, Replaced, RollbackPlan,
    RunPlan, RunRow, RunState, SmokeResult, StepDetail, StepRow, StepState, UndoAction, UndoChoice,
};
use crate::manifest::{Component, Hook, HookPoint, Manifest, NotifyEvent, RollbackPolicy};
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

/// `argv` with `{version}` and `{from}` filled (`${VAR}` stays for [`run_hook`]).
fn fill(argv: &[String], version: &str, from: &str) -> Vec<String> {
    argv.iter().map(|a| a.replace("{version}", version).replace("{from}", from)).collect()
}

/// The last `keep` bytes of `text`, on a character boundary.
fn tail(text: &str, keep: usize) -> String {
    let mut start = text.len().saturating_sub(keep);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

/// Runs a hook's command (placeholders filled) with its environment and upshift's
/// (`UPSHIFT_HOOK`, `UPSHIFT_RUN`), `${VAR}` expanded only now; returns its redacted output.
fn run_hook(
    ctx: &Context<'_>,
    run: &str,
    name: &str,
    argv: &[String],
    env: &BTreeMap<String, String>,
    timeout: Duration,
) -> Result<String, String> {
    let manifest = ctx.manifest;
    let argv: Vec<String> = argv.iter().map(|a| manifest.expand(a)).collect::<Result<_, _>>()?;
    let mut vars = vec![("UPSHIFT_HOOK".to_owned(), name.to_owned()), ("UPSHIFT_RUN".to_owned(), run.to_owned())];
    for (key, value) in env {
        vars.push((key.clone(), manifest.expand(value)?));
    }
    (ctx.say)(&format!("  hook {name}: {}", manifest.redact(&argv.join(" "))));
    crate::command::run_with(&argv, timeout, &crate::command::Options { env: &vars, ..Default::default() })
        .and_then(|done| done.success(&argv))
        .map(|output| manifest.redact(&output))
        .map_err(|e| manifest.redact(&e))
}

/// The component of a stop or deploy step and its driver, once what runs for it now is
/// recorded in the step's detail (`Replaced`: what an undo puts back), before anything is
/// stopped. A step run again by `resume` keeps the first record.
fn replaced_first<'c, 'm>(
    ctx: &'c mut Context<'m>,
    journal: &mut Journal,
    run: &str,
    step: &PlanStep,
    detail: &mut StepDetail,
) -> Result<(&'m Component, &'c mut dyn crate::driver::Driver), String> {
    let what = step.kind.as_str();
    let name = step.component.as_deref().ok_or_else(|| format!("a {what} step without a component"))?;
    let component = component(ctx.manifest, name)?;
    let driver = ctx.drivers.get(component).map_err(|e| format!("{what} {name}: {}", chain(&e)))?;
    if detail.replaced.is_none() {
        let previous = driver.current(component).map_err(|e| format!("{what} {name}: {}", chain(&e)))?;
        detail.replaced = Some(Replaced { previous, component: component.clone() });
        journal.step_detail(run, step.number, detail).map_err(|e| chain(&e))?;
    }
    Ok((component, driver))
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
        StepKind::Hook => {
            let hook = step.hook.as_ref().ok_or("a hook step without its hook")?;
            let from = plan.from.as_ref().map(ToString::to_string).unwrap_or_default();
            let result = run_hook(ctx, run, &hook.name, &fill(&hook.run, &version, &from), &hook.env, hook.timeout);
            let output = match &result {
                Ok(output) => output.clone(),
                Err(e) => e.clone(),
            };
            detail.output = vec![tail(&output, 4096)];
            journal.step_detail(run, seq, detail).map_err(|e| chain(&e))?;
            result.map(drop).map_err(|e| format!("hook {}: {e}", hook.name))?;
            (ctx.say)(&format!("  hook {} done", hook.name));
            Ok(())
        }
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
            let backup = crate::artifacts::with_sources(manifest, |artifacts| {
                upshift_backup::create(
                    &store(manifest),
                    &CreateOptions {
                        artifacts,
                        database: ctx.database,
                        paths: &manifest.backup.paths,
                        base: &manifest.base_dir,
                        label: Some(format!("before {version}")),
                        app: manifest.app_name.clone(),
                        version: plan.from.as_ref().map(ToString::to_string),
                        codec: upshift_backup::Codec::default(),
                    },
                )
            })
            .map_err(|e| format!("backup: {}", chain(&e)))?;
            (ctx.say)(&format!("  backup {} ({} bytes)", backup.id, backup.size_bytes()));
            detail.backup = Some(backup.id);
            journal.step_detail(run, seq, detail).map_err(|e| chain(&e))
        }
        StepKind::Expand => migrate_up(ctx, journal, run, seq, &plan.expand, detail),
        StepKind::Contract => migrate_up(ctx, journal, run, seq, &plan.contract, detail),
        StepKind::Stop => {
            let say = ctx.say;
            let (component, driver) = replaced_first(ctx, journal, run, step, detail)?;
            let name = &component.name;
            driver.put_back(component, None).map_err(|e| format!("stop {name}: {}", chain(&e)))?;
            say(&format!("  {name} is stopped until its deploy"));
            Ok(())
        }
        StepKind::Deploy => {
            let say = ctx.say;
            let (component, driver) = replaced_first(ctx, journal, run, step, detail)?;
            let name = &component.name;
            driver.deploy(component, &version, say).map_err(|e| format!("deploy {name}: {}", chain(&e)))?;
            say(&format!("  {name} {version} is up"));
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
            if ctx.manifest.verify.watch.is_zero() {
                return Ok(());
            }
            let until = std::time::SystemTime::now() + ctx.manifest.verify.watch;
            detail.watch_until = Some(humantime::format_rfc3339_seconds(until).to_string());
            journal.step_detail(run, seq, detail).map_err(|e| chain(&e))?;
            watch(ctx, &version)
        }
    }
}

/// The watch after verify: every component with a health check must stay healthy for
/// `[verify] watch`, checked every `watch_interval`, and the new version behind the proxy
/// must keep within its `max_error_rate` and `max_p99_ms` (once it had 20 requests); the
/// first breach fails the step, and the release is undone like any other failure.
/// SIGINT/SIGTERM end the watch early and keep the release (a second one undoes it).
fn watch(ctx: &mut Context<'_>, version: &str) -> Result<(), String> {
    let verify = &ctx.manifest.verify;
    (ctx.say)(&format!("  watching for {}", humantime::format_duration(verify.watch)));
    let started = std::time::Instant::now();
    while started.elapsed() < verify.watch {
        if ctx.interrupted.swap(false, Ordering::SeqCst) {
            (ctx.say)(&format!(
                "  the watch was ended early by SIGINT/SIGTERM after {}s: the release is kept and the run goes on (another signal undoes it)",
                started.elapsed().as_secs()
            ));
            return Ok(());
        }
        for component in &ctx.manifest.components {
            let driver = ctx.drivers.get(component).map_err(|e| format!("watch: {}", chain(&e)))?;
            let status = driver.status(component).map_err(|e| format!("watch: {}", chain(&e)))?;
            if component.checks_health() && !status.healthy {
                return Err(format!(
                    "watch: {} became unhealthy {}s after the verify: {}",
                    component.name,
                    started.elapsed().as_secs(),
                    status.problem.unwrap_or_default()
                ));
            }
            if let Some(broken) = watch_breach(component, &status, version) {
                return Err(format!("watch: {broken}, {}s after the verify", started.elapsed().as_secs()));
            }
        }
        std::thread::sleep(verify.watch_interval.min(verify.watch.saturating_sub(started.elapsed())));
    }
    (ctx.say)("  healthy through the watch");
    Ok(())
}

/// What breaks `component`'s limits in the figures the proxy measured of `version`, once it
/// had enough requests to judge.
fn watch_breach(component: &Component, status: &crate::driver::ComponentStatus, version: &str) -> Option<String> {
    let figures = status.versions.iter().find(|v| v.version == version)?;
    let window = &figures.window;
    if window.requests < crate::driver::JUDGE_MIN_REQUESTS {
        return None;
    }
    let broken = crate::driver::limits_broken(component, window.requests, window.errors, window.p99_ms)?;
    Some(format!(
        "{} {version} got {} requests, {} errors in {:.1}s: {broken}",
        component.name, window.requests, window.errors, window.seconds
    ))
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
    /// Hooks that started, in order.
    hooks: Vec<RanHook>,
}

fn done(steps: &[StepRow], plan: &Plan) -> Done {
    let mut done = Done::default();
    let mut deploying = false;
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
            StepKind::Deploy | StepKind::Stop => {
                deploying |= row.kind == StepKind::Deploy;
                // A component stopped for the downtime was recorded (running) by its stop
                // step; its deploy step found it stopped.
                if let Some(replaced) = &row.detail.replaced
                    && !done.deployed.iter().any(|r| r.component.name == replaced.component.name)
                {
                    done.deployed.push(replaced.clone());
                }
            }
            StepKind::Hook => {
                let hook = plan.steps.iter().find(|s| s.number == row.seq).and_then(|s| s.hook.clone());
                if let Some(hook) = hook {
                    let after_deploy = deploying || matches!(hook.at, HookPoint::PostDeploy | HookPoint::PostVerify);
                    done.hooks.push(RanHook { hook, after_deploy });
                }
            }
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
    // A component with `rollback = "never"` stays as deployed, whatever the depth.
    let kept: Vec<&str> = deployed
        .iter()
        .filter(|r| r.component.rollback == RollbackPolicy::Never)
        .map(|r| r.component.name.as_str())
        .collect();
    let deployed: Vec<Replaced> =
        deployed.iter().filter(|r| r.component.rollback != RollbackPolicy::Never).cloned().collect();
    let deployed = deployed.as_slice();
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
    let why = if kept.is_empty() {
        why
    } else {
        format!("{why} ({} kept as deployed: rollback = \"never\")", kept.join(", "))
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
                    .and_then(|_| store(ctx.manifest).load(backup))
                    .map_err(|e| chain(&e))
                    .and_then(|loaded| crate::artifacts::check_restorable(ctx.manifest, &loaded))
                    .map_err(|e| format!("the backup {backup} cannot be restored: {e}"))?;
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
            UndoAction::PutBack { previous: None, .. } | UndoAction::Hook { .. } => {}
        }
    }
    Ok(())
}

/// Does one undo action. Each is safe to do again.
fn act(ctx: &mut Context<'_>, run: &str, action: &UndoAction) -> Result<(), String> {
    match action {
        UndoAction::Hook { name, run: argv, env, timeout, required } => {
            match run_hook(ctx, run, name, argv, env, *timeout) {
                Ok(_) => (ctx.say)(&format!("  hook {name} done")),
                Err(e) if *required => return Err(format!("hook {name}: {e}")),
                // An on-failure or on-rollback hook tells or tidies; the undo goes on.
                Err(e) => (ctx.say)(&format!("  warning: hook {name} failed (the undo goes on): {e}")),
            }
        }
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
            let store = store(ctx.manifest);
            let loaded = store.load(backup).map_err(|e| format!("restoring backup {backup}: {}", chain(&e)))?;
            crate::artifacts::restore_all(ctx.manifest, &store, &loaded, None, ctx.say)?;
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
    plan: &Plan,
    failure: &str,
    ending: Ending,
) -> Result<Outcome, RunError> {
    (ctx.say)(&format!("failed: {failure}"));
    let planned = (|| {
        let done = done(&journal.steps(run).map_err(|e| chain(&e))?, plan);
        let applied =
            if done.expand.is_empty() && done.contract.is_empty() { BTreeSet::new() } else { applied_now(ctx)? };
        let expand: Vec<String> = done.expand.iter().filter(|id| applied.contains(*id)).cloned().collect();
        let contract: Vec<String> = done.contract.iter().filter(|id| applied.contains(*id)).cloned().collect();
        let undo = undo_of(ctx, done.backup.as_deref(), done.partial.as_deref(), &expand, &contract, &done.deployed)?;
        let undo = with_hooks(ctx.manifest, undo, &done.hooks, &plan.to.to_string(), plan.from.as_ref());
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

/// An undo action running `hook`'s `command` (placeholders filled).
fn hook_action(hook: &Hook, command: &[String], version: &str, from: &str, required: bool) -> UndoAction {
    UndoAction::Hook {
        name: hook.name.clone(),
        run: fill(command, version, from),
        env: hook
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.replace("{version}", version).replace("{from}", from)))
            .collect(),
        timeout: hook.timeout,
        required,
    }
}

/// The manifest's hooks at `at` (`on-failure`, `on-rollback`) as undo actions that tell or
/// tidy: their failure does not stop the undo.
fn point_hooks(manifest: &Manifest, at: HookPoint, version: &str, from: &str) -> Vec<UndoAction> {
    manifest.hooks.iter().filter(|h| h.at == at).map(|h| hook_action(h, &h.run, version, from, false)).collect()
}

/// The `undo` commands of the hooks in `ran` that ran after deploying began (or before),
/// newest first.
fn hook_undos<'r>(
    ran: &'r [RanHook],
    after_deploy: bool,
    version: &'r str,
    from: &'r str,
) -> impl Iterator<Item = UndoAction> + 'r {
    ran.iter()
        .rev()
        .filter(move |r| r.after_deploy == after_deploy)
        .filter_map(move |r| Some(hook_action(&r.hook, r.hook.undo.as_ref()?, version, from, true)))
}

/// `choice` saying which hooks of `ran` its undo runs.
fn hooks_undone(mut choice: UndoChoice, ran: &[RanHook]) -> UndoChoice {
    let names: Vec<&str> = ran.iter().filter(|r| r.hook.undo.is_some()).map(|r| r.hook.name.as_str()).collect();
    if !names.is_empty() {
        choice.why = format!("{}; hooks undone: {}", choice.why, names.join(", "));
    }
    choice
}

/// An upgrade's undo with its hooks: the `on-failure` hooks first; then the `undo` of each
/// hook that started, newest first: those that ran once deploying began before the code
/// and data go back, the earlier ones after; the `on-rollback` hooks last.
fn with_hooks(manifest: &Manifest, undo: Undo, ran: &[RanHook], version: &str, from: Option<&semver::Version>) -> Undo {
    let from = from.map(ToString::to_string).unwrap_or_default();
    let mut actions = point_hooks(manifest, HookPoint::OnFailure, version, &from);
    actions.extend(hook_undos(ran, true, version, &from));
    actions.extend(undo.actions);
    actions.extend(hook_undos(ran, false, version, &from));
    actions.extend(point_hooks(manifest, HookPoint::OnRollback, version, &from));
    Undo { choice: hooks_undone(undo.choice, ran), actions }
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
        if let Err(undo_failure) = act(ctx, run, &action.action) {
            journal.set_stuck(run, None, &format!("undo failed at {}: {undo_failure}", action.action.describe()))?;
            return Ok(Outcome::Stuck { failure, undo_failure });
        }
        journal.action_state(run, action.seq, ActionState::Done)?;
    }
    let choice = row.undo.clone().unwrap_or(UndoChoice { depth: UndoDepth::Nothing, why: String::new() });
    let none = BTreeMap::new();
    match ending {
        Ending::Undone { state, version } => {
            let none_versions = BTreeMap::new();
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
                    hooks: &[],
                    versions: &none_versions,
                }),
                None,
            )?;
            Ok(Outcome::RolledBack { depth: choice.depth, why: choice.why, failure })
        }
        Ending::RolledBackTo(plan) => {
            let releases = journal.releases()?;
            let target = release(&releases, plan.target_revision)?;
            let returns_to = release(&releases, plan.returns_to)?;
            let message = match &plan.only {
                Some(name) => format!(
                    "rolled {name} back to {} ({})",
                    plan.versions.get(name).map_or("its previous version", String::as_str),
                    choice.why
                ),
                None => format!("rolled back to {} ({})", target.version, choice.why),
            };
            let revision = journal
                .finish_run(
                    run,
                    RunState::Succeeded,
                    Some(&message),
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
                        hooks: &[],
                        versions: &plan.versions,
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
    let done = done(&journal.steps(run)?, plan);
    let deployed = journal.deployed()?;
    let previous = deployed.as_ref().map(|r| r.revision);
    let deployments: BTreeMap<String, Option<Deployed>> =
        done.deployed.iter().map(|r| (r.component.name.clone(), r.previous.clone())).collect();
    // After a partial upgrade the components it did not deploy keep their versions.
    let to = plan.to.to_string();
    let versions: BTreeMap<String, String> = match &deployed {
        Some(before) if !plan.only.is_empty() => ctx
            .manifest
            .components
            .iter()
            .filter(|c| !deployments.contains_key(&c.name))
            .map(|c| (c.name.clone(), before.version_of(&c.name).to_owned()))
            .filter(|(_, version)| *version != to)
            .collect(),
        _ => BTreeMap::new(),
    };
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
                hooks: &done.hooks.iter().filter(|r| r.hook.undo.is_some()).cloned().collect::<Vec<_>>(),
                versions: &versions,
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
        plan,
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
            // A component an undo never puts back may run a newer version than the release.
            (Some(running), Some(release))
                if running.version != release.version_of(&component.name)
                    && component.rollback != RollbackPolicy::Never =>
            {
                return Err(RunError::Preflight(format!(
                    "the journal says {} runs {} but it runs {}; `upshift status` shows what runs",
                    component.name,
                    release.version_of(&component.name),
                    running.version
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
    for check in &ctx.manifest.preflight {
        preflight_command(ctx.manifest, check)?;
        (ctx.say)(&format!("  preflight ok: {}", check.name));
    }
    if !plan.no_backup {
        check_free_space(ctx)?;
    }
    if plan.from.as_ref().map(ToString::to_string) != deployed.map(|r| r.version) {
        return Err(RunError::Preflight("the deployed release changed since the plan was made; plan again".into()));
    }
    Ok(())
}

/// A `[[preflight]]` command: its exit code, and its output when a text is expected.
fn preflight_command(manifest: &Manifest, check: &crate::manifest::PreflightCheck) -> Result<(), RunError> {
    let shown = manifest.redact(&check.run.join(" "));
    let fail = |what: String| RunError::Preflight(format!("[[preflight]] {}: `{shown}` {what}", check.name));
    let done = crate::command::run_with(&check.run, check.timeout, &crate::command::Options::default())
        .map_err(|e| fail(manifest.redact(&e)))?;
    let output = manifest.redact(done.output.trim());
    if done.status.code() != Some(check.expect_exit) {
        return Err(fail(format!("exited with {} (expected {}): {output}", done.status, check.expect_exit)));
    }
    if let Some(text) = &check.expect_output
        && !done.output.contains(text.as_str())
    {
        return Err(fail(format!("did not print `{text}`; it printed: {output}")));
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

/// Tells `[notify]` of `event` in `run` and journals whether each target heard it; a
/// notification that fails is reported, never a reason to fail the run.
fn notify(ctx: &Context<'_>, journal: &mut Journal, run: &str, event: NotifyEvent, outcome: Option<&Outcome>) {
    let Some(notify) = &ctx.manifest.notify else { return };
    let Ok(Some(row)) = journal.run(run) else { return };
    let started = humantime::parse_rfc3339_weak(&row.started_at).ok();
    let elapsed = started.and_then(|s| s.elapsed().ok()).unwrap_or_default();
    let (outcome_name, undo, failure) = match outcome {
        None => ("running", None, None),
        Some(Outcome::Succeeded { .. }) => ("succeeded", None, None),
        Some(Outcome::RolledBack { depth, failure, .. }) => {
            ("rolled-back", Some(depth_name(*depth)), Some(failure.as_str()))
        }
        Some(Outcome::Stuck { failure, .. }) => ("stuck", None, Some(failure.as_str())),
    };
    let message = crate::notify::Message {
        app: ctx.manifest.app_name.as_deref(),
        run,
        kind: row.kind.as_str(),
        event: event.as_str(),
        from: row.from_version.as_deref(),
        to: &row.target,
        outcome: outcome_name,
        undo,
        failure,
        duration_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
    };
    for (target, result) in crate::notify::send(notify, event, &message, &|t| ctx.manifest.redact(t)) {
        if let Err(e) = &result {
            (ctx.say)(&format!("  warning: the {} notification did not arrive: {e}", event.as_str()));
        }
        if let Err(e) = journal.notice(run, event.as_str(), target, &result) {
            (ctx.say)(&format!("  warning: journaling a notification failed: {}", chain(&e)));
        }
    }
}

/// The event that ends an upgrade run: deployed, or failed (undone or stuck).
fn upgrade_event(outcome: &Outcome) -> NotifyEvent {
    match outcome {
        Outcome::Succeeded { .. } => NotifyEvent::Success,
        Outcome::RolledBack { .. } | Outcome::Stuck { .. } => NotifyEvent::Failure,
    }
}

/// Tells `[notify]` how the run ended (when it ended at all) and passes the outcome on.
fn notify_end(
    ctx: &Context<'_>,
    journal: &mut Journal,
    run: &str,
    outcome: Result<Outcome, RunError>,
    event: impl Fn(&Outcome) -> NotifyEvent,
) -> Result<Outcome, RunError> {
    if let Ok(outcome) = &outcome {
        notify(ctx, journal, run, event(outcome), Some(outcome));
    }
    outcome
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
    notify(ctx, journal, &run, NotifyEvent::Start, None);
    let outcome = drive(ctx, journal, &run, plan, 1);
    notify_end(ctx, journal, &run, outcome, upgrade_event)
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
    let id = run.id.clone();
    let rollback = matches!(run_plan, RunPlan::Rollback { .. });
    let outcome = resume_run(ctx, journal, run, run_plan);
    notify_end(ctx, journal, &id, outcome, |o| if rollback { NotifyEvent::Rollback } else { upgrade_event(o) })
}

fn resume_run(
    ctx: &mut Context<'_>,
    journal: &mut Journal,
    run: RunRow,
    run_plan: RunPlan,
) -> Result<Outcome, RunError> {
    match run_plan {
        RunPlan::Upgrade { plan } => {
            let ending = Ending::Undone { state: RunState::RolledBack, version: plan.to.to_string() };
            if run.undo.is_some() {
                (ctx.say)(&format!("resuming the undo of run {} (upgrade to {})", run.id, run.target));
                return finish_undo(ctx, journal, &run.id, ending);
            }
            if run.state != RunState::Running {
                let failure = run.failure.unwrap_or_else(|| "the run's undo could not start".into());
                return start_undo(ctx, journal, &run.id, &plan, &failure, ending);
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
    let id = run.id.clone();
    let outcome = abort_run(ctx, journal, run, run_plan);
    notify_end(ctx, journal, &id, outcome, |_| NotifyEvent::Rollback)
}

fn abort_run(
    ctx: &mut Context<'_>,
    journal: &mut Journal,
    run: RunRow,
    run_plan: RunPlan,
) -> Result<Outcome, RunError> {
    match run_plan {
        RunPlan::Upgrade { plan } => {
            (ctx.say)(&format!("aborting run {} (upgrade to {})", run.id, run.target));
            let ending = Ending::Undone { state: RunState::Aborted, version: plan.to.to_string() };
            if run.undo.is_some() {
                return finish_undo(ctx, journal, &run.id, ending);
            }
            let failure = run.failure.unwrap_or_else(|| "aborted by `upshift abort`".to_owned());
            start_undo(ctx, journal, &run.id, &plan, &failure, ending)
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
fn undo_release(
    ctx: &Context<'_>,
    release: &ReleaseRow,
    from: &str,
    applied: &BTreeSet<String>,
) -> Result<Undo, String> {
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
    let undo = undo_of(ctx, release.backup_id.as_deref(), None, &expand, &contract, &deployed)
        .map_err(|e| format!("release {} (revision {}): {e}", release.version, release.revision))?;
    let mut actions: Vec<UndoAction> = hook_undos(&release.hooks, true, &release.version, from).collect();
    actions.extend(undo.actions);
    actions.extend(hook_undos(&release.hooks, false, &release.version, from));
    Ok(Undo { choice: hooks_undone(undo.choice, &release.hooks), actions })
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
        let mut lines = vec![match &self.plan.only {
            Some(name) => format!(
                "Roll back {name} alone, in {} (revision {}): {}",
                self.from.version, self.from.revision, self.choice.why
            ),
            None => format!(
                "Roll back from {} (revision {}) to {} (revision {}): {}",
                self.from.version, self.from.revision, self.target.version, self.target.revision, self.choice.why
            ),
        }];
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

/// The components of `manifest` that `deployed` records at another version than its own
/// (left behind by `upgrade --only` or put back by `rollback --only`).
pub fn behind(manifest: &Manifest, deployed: Option<&ReleaseRow>) -> Vec<String> {
    let Some(release) = deployed else { return Vec::new() };
    manifest
        .components
        .iter()
        .filter(|c| release.version_of(&c.name) != release.version)
        .map(|c| c.name.clone())
        .collect()
}

/// `rollback --only COMPONENT`: puts back the version of one component that the deployed
/// release replaced (code only), and records it as a new revision of the same release.
/// Refused when the release ran contract revisions (the old code may need what they
/// removed), when the component has `rollback = "never"`, or when the release did not
/// deploy it.
pub fn preview_rollback_only(
    ctx: &mut Context<'_>,
    journal: &Journal,
    name: &str,
) -> Result<RollbackPreview, RunError> {
    journal.refuse_in_flight()?;
    let releases = journal.releases()?;
    let current = releases
        .iter()
        .rev()
        .find(|r| r.status == ReleaseStatus::Deployed)
        .ok_or_else(|| RunError::Refused("nothing is deployed: there is nothing to roll back".into()))?;
    let state = release(&releases, current.state_revision())?;
    let component = ctx.manifest.components.iter().find(|c| c.name == name).cloned().ok_or_else(|| {
        let known: Vec<&str> = ctx.manifest.components.iter().map(|c| c.name.as_str()).collect();
        RunError::Refused(format!("--only {name}: there is no such component; expected one of: {}", known.join(", ")))
    })?;
    if component.rollback == RollbackPolicy::Never {
        return Err(RunError::Refused(format!("{name} has rollback = \"never\": it is not rolled back")));
    }
    if !state.contract.is_empty() {
        return Err(RunError::Refused(format!(
            "release {} ran contract revisions ({}), which removed what older code may need: roll back the whole release (`upshift rollback`); nothing was changed",
            state.version,
            state.contract.join(", ")
        )));
    }
    let previous = match state.deployments.get(name) {
        Some(Some(previous)) => previous.clone(),
        Some(None) => {
            return Err(RunError::Refused(format!(
                "{name} was first deployed by release {}: there is no earlier version of it to put back",
                state.version
            )));
        }
        None => {
            return Err(RunError::Refused(format!(
                "release {} (revision {}) did not deploy {name}: nothing to roll back for it alone",
                state.version, state.revision
            )));
        }
    };
    if current.version_of(name) == previous.version {
        return Err(RunError::Refused(format!("{name} already runs {}: nothing to roll back", previous.version)));
    }
    let mut actions = vec![UndoAction::PutBack { component, previous: Some(previous.clone()) }];
    actions.extend(point_hooks(ctx.manifest, HookPoint::OnRollback, &current.version, &current.version));
    check_actions(ctx, &actions).map_err(|e| RunError::Preflight(format!("{e}; nothing was changed")))?;
    let mut versions = current.versions.clone();
    versions.insert(name.to_owned(), previous.version.clone());
    let plan = RollbackPlan {
        from_revision: current.revision,
        target_revision: current.revision,
        returns_to: current.state_revision(),
        undoes: Vec::new(),
        versions,
        only: Some(name.to_owned()),
    };
    Ok(RollbackPreview {
        from: current.clone(),
        target: current.clone(),
        choice: UndoChoice {
            depth: UndoDepth::Code,
            why: format!("{name} only: {} goes back to {}, code only", current.version_of(name), previous.version),
        },
        actions,
        plan,
    })
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
        let from = undone.previous.and_then(|p| releases.iter().find(|r| r.revision == p)).map(|r| r.version.clone());
        let undo = undo_release(ctx, undone, &from.unwrap_or_default(), &applied).map_err(RunError::Preflight)?;
        depth = depth.max(undo.choice.depth);
        why.push(format!("{} ({})", undone.version, undo.choice.why));
        actions.extend(undo.actions);
    }
    actions.extend(point_hooks(ctx.manifest, HookPoint::OnRollback, &target.version, &current.version));
    check_actions(ctx, &actions).map_err(|e| RunError::Preflight(format!("{e}; nothing was changed")))?;
    let plan = RollbackPlan {
        from_revision: current.revision,
        target_revision: target.revision,
        returns_to: target.state_revision(),
        undoes,
        versions: target.versions.clone(),
        only: None,
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
    match &plan.only {
        Some(name) => (ctx.say)(&format!("rolling {name} back: {}", choice.why)),
        None => {
            (ctx.say)(&format!("rolling back to {} (revision {}): {}", target.version, target.revision, choice.why));
        }
    }
    let run = journal.begin_run(
        &RunPlan::Rollback { plan: plan.clone() },
        &target.version,
        Some(&from.version),
        false,
        Some((&choice, &actions)),
    )?;
    ctx.drivers.note_run(&run);
    notify(ctx, journal, &run, NotifyEvent::Start, None);
    let outcome = finish_undo(ctx, journal, &run, Ending::RolledBackTo(plan));
    notify_end(ctx, journal, &run, outcome, |_| NotifyEvent::Rollback)
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
