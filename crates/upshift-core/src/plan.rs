//! The plan of an upgrade: the exact steps `upshift upgrade --to V` takes, and for each
//! point of failure the undo depth it would use.
//!
//! Pending revisions up to the release's `migrate_to` (default: the one head) are split in
//! two: the expand step runs, in graph order, every pending `expand` revision none of whose
//! pending ancestors is a `contract` one; the contract step runs the rest, after the new
//! code is verified. Both are linted in the phase they run in: an expand revision with a
//! finding the old code cannot survive stops the plan; other findings are its warnings.

use std::collections::BTreeSet;

use semver::Version;
use serde::{Deserialize, Serialize};
use upshift_migrate::lexer::Dialect;
use upshift_migrate::lint::Finding;
use upshift_migrate::{AppliedRevision, Migrator, Phase, UpTarget};

use crate::manifest::{DriverKind, Hook, HookPoint, Manifest, Probe, RollbackPolicy};

/// Why a plan cannot be made. All of these are bad input: nothing was touched.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The target is not a `[[releases]]` version.
    #[error("{target} is not a release in {manifest}; known releases: {}", if known.is_empty() { "none (add [[releases]])".to_owned() } else { known.join(", ") })]
    UnknownTarget { target: Version, manifest: String, known: Vec<String> },
    /// The target is the deployed version or older.
    #[error("{target} is not newer than the deployed {deployed}; to go back, use `upshift rollback`")]
    NotNewer { target: Version, deployed: Version },
    /// The deployed version does not satisfy the release's `upgrade_from`.
    #[error(
        "release {target} upgrades from {requirement}, but {deployed} is deployed; upgrade to an intermediate release first"
    )]
    UpgradeFrom { target: Version, requirement: String, deployed: Version },
    /// Required options of the target release are not set.
    #[error("release {target} needs options that are not set: {}; set them (see `upshift config check --to {target}`)", missing.join(", "))]
    Config { target: Version, missing: Vec<String> },
    /// The migrations cannot be planned (heads, drift, unknown `migrate_to`).
    #[error(transparent)]
    Migrate(#[from] upshift_migrate::Error),
    /// `--only` cannot be done (an unknown component, one already at the target, or a
    /// release with migrations).
    #[error("{0}")]
    Only(String),
    /// An expand revision does what the old code cannot survive (the linter says so, and
    /// no `-- upshift:allow` accepts it).
    #[error(
        "the old code cannot survive {}, which run{} while it still serves:\n\n{}\n\nrewrite each as its fix says, or accept one with `-- upshift:allow RULE reason` on the line before its statement",
        if findings.len() == 1 { "this expand revision" } else { "these expand revisions" },
        if findings.len() == 1 { "s" } else { "" },
        findings.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n\n")
    )]
    Lint { findings: Vec<Finding> },
}

/// How deep an undo goes, least destructive first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UndoDepth {
    /// Nothing was changed.
    Nothing,
    /// Put the old code back; no migration ran.
    Code,
    /// Put the old code back and run `down` of the applied expand revisions.
    CodeAndDown,
    /// Restore the backup of step 2.
    Restore,
    /// A restore would be needed but there is no backup (`--no-backup`): the run stops
    /// with exit 4 and waits for `resume` or `abort`.
    Impossible,
}

/// What undoing a failure at one point would do, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnFailure {
    /// The depth.
    pub undo: UndoDepth,
    /// Why that depth.
    pub why: String,
}

/// The kinds of steps, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepKind {
    /// Checks before anything is touched.
    Preflight,
    /// The backup.
    Backup,
    /// Expand migrations.
    Expand,
    /// Deploy one component.
    Deploy,
    /// Health of every component, then the smoke commands.
    Verify,
    /// Contract migrations.
    Contract,
    /// Record the release; prune backups.
    Record,
    /// A `[[hooks]]` command.
    Hook,
    /// Stop one component for the release's downtime.
    Stop,
}

/// One step of the plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanStep {
    /// 1-based position.
    pub number: usize,
    /// Its kind.
    pub kind: StepKind,
    /// One line for people.
    pub title: String,
    /// What it does in detail: each check, each revision with its SQL file, each command.
    pub details: Vec<String>,
    /// What a failure here would undo.
    pub on_failure: OnFailure,
    /// The component a deploy step rolls out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    /// The hook a hook step runs, as the manifest said when the plan was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<Hook>,
}

/// An upgrade plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The deployed version (none on a first deploy).
    pub from: Option<Version>,
    /// The target.
    pub to: Version,
    /// Ids of the expand revisions, in order.
    pub expand: Vec<String>,
    /// Ids of the contract revisions, in order.
    pub contract: Vec<String>,
    /// `--no-backup`: the backup step takes none.
    pub no_backup: bool,
    /// The components it deploys when not all of them (`--only`, or finishing a release
    /// some components of which run an older version); empty: every component.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub only: Vec<String>,
    /// The steps.
    pub steps: Vec<PlanStep>,
    /// What the linter found in the pending revisions that no allow accepts and that does
    /// not stop the plan: warnings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lint: Vec<Finding>,
}

/// The migrations of a plan and the database they run against.
pub struct Migrations<'a> {
    /// The revisions.
    pub migrator: &'a Migrator,
    /// The applied ones.
    pub applied: &'a [AppliedRevision],
    /// The database's dialect, which the linter reads the SQL in.
    pub dialect: Dialect,
}

/// What a plan is made from.
pub struct PlanInput<'a> {
    /// The manifest.
    pub manifest: &'a Manifest,
    /// The target version.
    pub target: &'a Version,
    /// The deployed version, from the journal.
    pub deployed: Option<&'a Version>,
    /// The migrations and the applied revisions, when there is a database.
    pub migrations: Option<Migrations<'a>>,
    /// A printable description of the database (URL without password, server version).
    pub database: Option<String>,
    /// `--no-backup`.
    pub no_backup: bool,
    /// The configuration options that are set (see [`crate::config::options_set`]).
    pub options: &'a std::collections::BTreeSet<String>,
    /// `--only`: deploy these components alone (code only); empty: all.
    pub only: &'a [String],
    /// Components the journal records at an older version than the deployed release
    /// (after `upgrade --only` or `rollback --only`): an upgrade to the deployed version
    /// deploys them.
    pub behind: &'a [String],
}

fn failure(undo: UndoDepth, why: impl Into<String>) -> OnFailure {
    OnFailure { undo, why: why.into() }
}

/// Splits pending revisions (in graph order) into the expand step's and the contract
/// step's: an `expand` revision waits for the contract step when a pending ancestor of it
/// is a `contract` one.
pub fn split_phases(migrator: &Migrator, pending: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let graph = migrator.graph();
    let (mut expand, mut contract) = (Vec::new(), Vec::new());
    let mut deferred: BTreeSet<usize> = BTreeSet::new();
    for &index in pending {
        let after_contract = graph.parents(index).iter().any(|p| deferred.contains(p));
        if graph.revision(index).phase == Phase::Expand && !after_contract {
            expand.push(index);
        } else {
            deferred.insert(index);
            contract.push(index);
        }
    }
    (expand, contract)
}

/// Plans an upgrade to `input.target`.
pub fn plan(input: &PlanInput<'_>) -> Result<Plan, PlanError> {
    let manifest = input.manifest;
    let release = manifest.release(input.target).ok_or_else(|| PlanError::UnknownTarget {
        target: input.target.clone(),
        manifest: manifest.path.display().to_string(),
        known: manifest.releases.iter().map(|r| r.version.to_string()).collect(),
    })?;
    // An upgrade to the deployed version finishes it: the components still behind.
    let finishing = input.deployed == Some(input.target) && !input.behind.is_empty();
    if let Some(deployed) = input.deployed {
        if input.target < deployed || (input.target == deployed && !finishing) {
            return Err(PlanError::NotNewer { target: input.target.clone(), deployed: deployed.clone() });
        }
        if let Some(requirement) = &release.upgrade_from
            && !finishing
            && !requirement.matches(deployed)
        {
            return Err(PlanError::UpgradeFrom {
                target: input.target.clone(),
                requirement: requirement.to_string(),
                deployed: deployed.clone(),
            });
        }
    }
    let only = deploy_set(input, finishing)?;
    let config = crate::config::check(manifest, input.target, input.options, false);
    if !config.ok() {
        return Err(PlanError::Config {
            target: input.target.clone(),
            missing: config.missing.into_iter().map(|m| m.name).collect(),
        });
    }

    // Split the pending revisions into expand and contract.
    if let Some(Migrations { migrator, applied, dialect }) = input.migrations {
        migrator.check_applied(applied)?;
        let target = match &release.migrate_to {
            Some(id) => UpTarget::Revision(id.clone()),
            None => UpTarget::Heads,
        };
        let graph = migrator.graph();
        let (expand, contract) = split_phases(migrator, &migrator.plan_up(applied, &target)?);
        let lint = lint(migrator, &expand, &contract, dialect)?;
        let expand_reversible = expand.iter().all(|&i| graph.revision(i).reversible());
        let describe = |index: &usize| {
            let revision = graph.revision(*index);
            format!(
                "{} {} ({}){}",
                revision.id,
                revision.name,
                revision.path.display(),
                if revision.no_transaction { ", no transaction" } else { "" }
            )
        };
        let expand_details: Vec<String> = expand.iter().map(describe).collect();
        let contract_details: Vec<String> = contract.iter().map(describe).collect();
        let ids = |indexes: &[usize]| indexes.iter().map(|&i| graph.revision(i).id.clone()).collect::<Vec<_>>();
        let migrates = !expand.is_empty() || !contract.is_empty();
        if !only.is_empty() && migrates {
            let pending: Vec<String> = ids(&expand).into_iter().chain(ids(&contract)).collect();
            return Err(PlanError::Only(format!(
                "release {} migrates the schema ({}): every component must move with it, so it cannot be deployed to {} alone; upgrade without --only",
                input.target,
                pending.join(", "),
                only.join(", ")
            )));
        }
        let mut plan =
            build(input, ids(&expand), ids(&contract), expand_details, contract_details, expand_reversible, &only);
        plan.only = only;
        plan.lint = lint;
        return Ok(plan);
    }
    let mut plan = build(input, Vec::new(), Vec::new(), Vec::new(), Vec::new(), true, &only);
    plan.only = only;
    Ok(plan)
}

/// Why `--only NAME` names nothing: with the components there are.
pub(crate) fn no_such_component(manifest: &Manifest, name: &str) -> String {
    let known: Vec<&str> = manifest.components.iter().map(|c| c.name.as_str()).collect();
    format!("--only {name}: there is no such component; expected one of: {}", known.join(", "))
}

/// The components a partial upgrade deploys (empty: all): those `--only` names, and when
/// finishing the deployed release, only those still behind it.
fn deploy_set(input: &PlanInput<'_>, finishing: bool) -> Result<Vec<String>, PlanError> {
    let components = &input.manifest.components;
    if let Some(name) = input.only.iter().find(|name| !components.iter().any(|c| &c.name == *name)) {
        return Err(PlanError::Only(no_such_component(input.manifest, name)));
    }
    if input.only.is_empty() && !finishing {
        return Ok(Vec::new());
    }
    let set: Vec<String> = components
        .iter()
        .map(|c| &c.name)
        .filter(|name| input.only.is_empty() || input.only.contains(name))
        .filter(|name| !finishing || input.behind.contains(name))
        .cloned()
        .collect();
    if set.is_empty() {
        return Err(PlanError::Only(format!(
            "{} already run {}: nothing to deploy",
            input.only.join(", "),
            input.target
        )));
    }
    Ok(set)
}

/// Whether a plan deploying `only` (empty: all) deploys `name`.
fn deploys(only: &[String], name: &str) -> bool {
    only.is_empty() || only.iter().any(|o| o == name)
}

/// Lints the pending revisions, each in the step that runs it. Refuses an expand revision
/// with a finding the old code cannot survive; returns the other findings not allowed.
fn lint(
    migrator: &Migrator,
    expand: &[usize],
    contract: &[usize],
    dialect: Dialect,
) -> Result<Vec<Finding>, PlanError> {
    let selected: Vec<(usize, Phase)> =
        expand.iter().map(|&i| (i, Phase::Expand)).chain(contract.iter().map(|&i| (i, Phase::Contract))).collect();
    let graph = migrator.graph();
    let in_expand = |id: &str| expand.iter().any(|&i| graph.revision(i).id == id);
    let (refused, warnings): (Vec<Finding>, Vec<Finding>) = upshift_migrate::lint::lint(migrator, &selected, dialect)?
        .into_iter()
        .filter(|f| !f.allowed)
        .partition(|f| f.rule.breaks_old_code() && in_expand(&f.revision));
    if refused.is_empty() { Ok(warnings) } else { Err(PlanError::Lint { findings: refused }) }
}

/// Builds the steps, one method per kind.
struct Builder<'a> {
    input: &'a PlanInput<'a>,
    expand: Vec<String>,
    contract: Vec<String>,
    expand_reversible: bool,
    /// The components deployed (empty: all).
    only: &'a [String],
    steps: Vec<PlanStep>,
}

fn build(
    input: &PlanInput<'_>,
    expand: Vec<String>,
    contract: Vec<String>,
    expand_details: Vec<String>,
    contract_details: Vec<String>,
    expand_reversible: bool,
    only: &[String],
) -> Plan {
    let mut builder = Builder { input, expand, contract, expand_reversible, only, steps: Vec::new() };
    builder.preflight();
    builder.hooks(HookPoint::PreBackup);
    builder.backup();
    builder.hooks(HookPoint::PostBackup);
    builder.stop();
    builder.expand(expand_details);
    builder.hooks(HookPoint::PreDeploy);
    builder.deploy();
    builder.hooks(HookPoint::PostDeploy);
    builder.verify();
    builder.hooks(HookPoint::PostVerify);
    builder.contract(contract_details);
    builder.record();
    // From the first hook with an `undo` on, a failure also runs the `undo` of each hook
    // that ran (the record step excepted: nothing is undone there).
    if let Some(first) = builder.steps.iter().position(|s| s.hook.as_ref().is_some_and(|h| h.undo.is_some())) {
        let last = builder.steps.len() - 1;
        for step in &mut builder.steps[first..last] {
            step.on_failure.why.push_str("; the hooks that ran are undone by their `undo`, newest first");
        }
    }
    Plan {
        from: input.deployed.cloned(),
        to: input.target.clone(),
        expand: builder.expand,
        contract: builder.contract,
        no_backup: input.no_backup || nothing_to_back_up(input),
        only: Vec::new(),
        steps: builder.steps,
        lint: Vec::new(),
    }
}

/// Whether an upgrade has nothing to back up: no database and no saved paths (a stateless
/// service, a worker without state of its own).
fn nothing_to_back_up(input: &PlanInput<'_>) -> bool {
    input.database.is_none() && input.manifest.backup.paths.is_empty() && input.manifest.backup.artifacts.is_empty()
}

impl Builder<'_> {
    /// A command as the plan shows it: `{version}` filled with the target (addresses are
    /// only known when it runs), values from the environment redacted.
    fn shown(&self, argv: &[String]) -> String {
        let target = self.input.target.to_string();
        self.input.manifest.redact(&argv.join(" ").replace("{version}", &target))
    }

    fn push(&mut self, kind: StepKind, title: String, details: Vec<String>, on_failure: OnFailure) {
        self.steps.push(PlanStep {
            number: self.steps.len() + 1,
            kind,
            title,
            details,
            on_failure,
            component: None,
            hook: None,
        });
    }

    fn restore_or_impossible(&self, why: &str) -> OnFailure {
        if self.input.no_backup {
            failure(
                UndoDepth::Impossible,
                format!(
                    "{why}, and --no-backup left nothing to restore: the run stops for `upshift resume` or `upshift abort`"
                ),
            )
        } else {
            failure(UndoDepth::Restore, format!("{why}: the backup of step 2 is restored"))
        }
    }

    /// Once code may have changed: the least destructive undo that restores the old state.
    fn after_code(&self) -> OnFailure {
        if self.expand.is_empty() {
            failure(UndoDepth::Code, "no migration ran: the old code is put back")
        } else if self.expand_reversible {
            failure(
                UndoDepth::CodeAndDown,
                "the expand revisions have down sections: the old code is put back and they are reverted",
            )
        } else {
            self.restore_or_impossible("an expand revision has no down section")
        }
    }

    fn preflight(&mut self) {
        let input = self.input;
        let manifest = input.manifest;
        let release = manifest.release(input.target).expect("checked by plan");
        let mut checks = vec![format!("manifest {} is valid", manifest.path.display())];
        checks.push(match (&release.upgrade_from, input.deployed) {
            (Some(requirement), Some(deployed)) => {
                format!("release {} upgrades from {requirement}: {deployed} is deployed", input.target)
            }
            (_, None) => format!("release {} is known; nothing is deployed yet (first deploy)", input.target),
            (None, Some(deployed)) => format!("release {} is known; {deployed} is deployed", input.target),
        });
        if let Some(database) = &input.database {
            checks.push(if input.migrations.as_ref().is_some_and(|m| m.migrator.external().is_some()) {
                "the migrator's revisions are sane: no drift, no applied revision it does not know".to_owned()
            } else {
                "migrations folder is sane: one head, no drift, no vanished file".to_owned()
            });
            checks.push(format!("database {database} is reachable"));
            if let Some(minimum) = &manifest.min_server {
                checks.push(format!("a PostgreSQL server is at least [database] min_server {minimum}"));
            }
            if !input.no_backup {
                checks.push("free disk for the backup: the database's and saved paths' size, plus 64 MiB".to_owned());
            }
        }
        for component in &manifest.components {
            checks.push(format!("component {} is healthy now (when deployed)", component.name));
            let serve = component.serve().map_or_else(String::new, |s| format!("; {s} is free or already its own"));
            checks.push(format!(
                "component {}: the program of {} is there and executable{serve}",
                component.name, input.target
            ));
        }
        for check in &manifest.preflight {
            let prints = check.expect_output.as_ref().map(|text| format!(" and prints `{text}`")).unwrap_or_default();
            let expected = format!("exits {}{prints}", check.expect_exit);
            checks.push(format!("{}: `{}` {expected}", check.name, manifest.redact(&check.run.join(" "))));
        }
        let config = crate::config::check(manifest, input.target, input.options, false);
        checks.push("configuration: every required option is set".to_owned());
        for name in &config.removed {
            checks.push(format!("warning: {name} is set but was removed; it does nothing any more"));
        }
        checks.push("no other run is in flight".to_owned());
        self.push(
            StepKind::Preflight,
            "preflight".to_owned(),
            checks,
            failure(UndoDepth::Nothing, "nothing was changed yet"),
        );
    }

    /// The hooks at `at`, one step each. A failure in one undoes what ran before it, and
    /// every hook that started is undone by its `undo` command.
    fn hooks(&mut self, at: HookPoint) {
        let manifest = self.input.manifest;
        for hook in manifest.hooks.iter().filter(|h| h.at == at) {
            let mut details = vec![format!("run: {}", self.shown_hook(&hook.run))];
            details.push(match &hook.undo {
                Some(undo) => format!("undo: {}", self.shown_hook(undo)),
                None => "undo: none (the hook has no `undo`)".to_owned(),
            });
            details.push(format!("timeout: {}", humantime::format_duration(hook.timeout)));
            let after_change = match at {
                HookPoint::PostDeploy | HookPoint::PostVerify => true,
                HookPoint::PreDeploy => !self.expand.is_empty(),
                _ => false,
            };
            let on_failure = if after_change {
                self.after_code()
            } else {
                failure(UndoDepth::Nothing, "nothing else was changed yet")
            };
            self.push(StepKind::Hook, format!("hook {} ({})", hook.name, at.as_str()), details, on_failure);
            self.steps.last_mut().expect("just pushed").hook = Some(hook.clone());
        }
    }

    /// A hook's command as the plan shows it.
    fn shown_hook(&self, argv: &[String]) -> String {
        let from = self.input.deployed.map(ToString::to_string).unwrap_or_default();
        self.shown(argv).replace("{from}", &from)
    }

    fn backup(&mut self) {
        let input = self.input;
        if input.no_backup || nothing_to_back_up(input) {
            let nothing = failure(UndoDepth::Nothing, "nothing was changed yet");
            let title = if input.no_backup {
                "backup skipped (--no-backup, recorded)"
            } else {
                "backup skipped: no database and no [backup] paths (a stateless application)"
            };
            self.push(StepKind::Backup, title.to_owned(), Vec::new(), nothing);
            return;
        }
        let mut what = Vec::new();
        if input.database.is_some() {
            what.push("the database".to_owned());
        }
        what.extend(input.manifest.backup.paths.iter().map(|p| p.display().to_string()));
        what.extend(
            input
                .manifest
                .backup
                .artifacts
                .iter()
                .map(|a| format!("artifact {}: {}", a.name, input.manifest.redact(&a.create.join(" ")))),
        );
        let nothing = failure(UndoDepth::Nothing, "nothing was changed yet; a partial backup is removed");
        self.push(StepKind::Backup, format!("backup into {}", input.manifest.backup.dir.display()), what, nothing);
    }

    /// The components of the release's `downtime`, stopped one step each (none on a first
    /// deploy: nothing runs yet).
    fn stop(&mut self) {
        let input = self.input;
        let release = input.manifest.release(input.target).expect("checked by plan");
        if input.deployed.is_none() {
            return;
        }
        let only = self.only;
        for name in release.downtime.iter().filter(|n| deploys(only, n)) {
            let details = vec![
                format!(
                    "{name} is down from here until its deploy step is healthy: through the expand migrations ({} revision(s)) and the rollout",
                    self.expand.len()
                ),
                "behind the agent's proxy, requests get 503 with Retry-After meanwhile".to_owned(),
            ];
            let on_failure =
                failure(UndoDepth::Code, "the components stopped so far start again with their old version");
            self.push(StepKind::Stop, format!("stop {name} (downtime of {})", input.target), details, on_failure);
            self.steps.last_mut().expect("just pushed").component = Some(name.clone());
        }
    }

    fn expand(&mut self, details: Vec<String>) {
        if self.expand.is_empty() {
            return;
        }
        let stopped = self.steps.iter().any(|s| s.kind == StepKind::Stop);
        let on_failure = if self.expand.len() == 1 && stopped {
            failure(
                UndoDepth::Code,
                "the failing revision rolls back in its transaction; the components stopped for the downtime start again",
            )
        } else if self.expand.len() == 1 {
            failure(UndoDepth::Nothing, "the failing revision rolls back in its transaction")
        } else if self.expand_reversible {
            failure(
                UndoDepth::CodeAndDown,
                "the failing revision rolls back in its transaction; the ones before it are reverted with down",
            )
        } else {
            self.restore_or_impossible("an applied expand revision has no down section")
        };
        self.push(StepKind::Expand, format!("migrate expand: {}", self.expand.join(", ")), details, on_failure);
    }

    fn deploy(&mut self) {
        let manifest = self.input.manifest;
        let only = self.only;
        for component in manifest.components.iter().filter(|c| deploys(only, &c.name)) {
            let mut details = Vec::new();
            if let Some(process) = component.process() {
                details.push(format!("run: {}", self.shown(&process.run)));
                if let Some(serve) = &process.serve {
                    details.push(format!("serve: {serve} (the agent's proxy)"));
                }
            }
            if let Some(health) = &component.health {
                let probe = match &health.probe {
                    Probe::Http { path, .. } => format!("GET {path}"),
                    Probe::Tcp => "TCP connect".to_owned(),
                    Probe::Command(command) => self.shown(command),
                };
                details.push(format!("health-gated: {probe} within {}", humantime::format_duration(health.deadline)));
            }
            // A chart rolls out its workloads its own way.
            let strategy = if component.driver.kind() == DriverKind::Helm {
                "as its chart says"
            } else {
                component.strategy.as_str()
            };
            if component.rollback == RollbackPolicy::Never {
                details.push("rollback = \"never\": an undo leaves it as deployed".to_owned());
            }
            let title = format!("deploy {} ({}, {strategy})", component.name, component.driver.kind().as_str());
            let on_failure = self.after_code();
            self.push(StepKind::Deploy, title, details, on_failure);
            self.steps.last_mut().expect("just pushed").component = Some(component.name.clone());
        }
    }

    fn verify(&mut self) {
        let manifest = self.input.manifest;
        let mut checks: Vec<String> =
            manifest.components.iter().filter(|c| c.checks_health()).map(|c| format!("health of {}", c.name)).collect();
        checks.extend(manifest.verify.smoke.iter().map(|command| format!("smoke: {}", self.shown(command))));
        if !manifest.verify.watch.is_zero() {
            checks.push(format!(
                "watch: every health check passes every {} for {}; a failure undoes the release",
                humantime::format_duration(manifest.verify.watch_interval),
                humantime::format_duration(manifest.verify.watch)
            ));
        }
        let on_failure = self.after_code();
        self.push(StepKind::Verify, "verify".to_owned(), checks, on_failure);
    }

    fn contract(&mut self, details: Vec<String>) {
        if self.contract.is_empty() {
            return;
        }
        // The first contract revision fails inside its transaction; after one has
        // committed, what the old code needs is gone.
        let on_failure = if self.contract.len() == 1 {
            self.after_code()
        } else {
            self.restore_or_impossible("contract revisions remove what the old code needs")
        };
        self.push(StepKind::Contract, format!("migrate contract: {}", self.contract.join(", ")), details, on_failure);
    }

    fn record(&mut self) {
        let input = self.input;
        let mut details = vec![format!("release {} becomes the deployed revision in the journal", input.target)];
        if let Some(keep) = input.manifest.backup.keep_last {
            details.push(format!("prune backups: keep the last {keep}"));
        }
        let nothing = failure(UndoDepth::Nothing, "the release is in place; only its record is retried");
        self.push(StepKind::Record, "record the release".to_owned(), details, nothing);
    }
}
