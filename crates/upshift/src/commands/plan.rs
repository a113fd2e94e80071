//! `upshift plan --to V`: every step of the upgrade, with what a failure at each undoes.

use std::fmt::Write as _;

use anyhow::Context as _;
use serde::Serialize;
use upshift_core::journal;
use upshift_core::manifest::DriverKind;
use upshift_core::plan::{Migrations, Plan, PlanInput, StepKind, UndoDepth};
use upshift_migrate::DatabaseUrl;

use crate::cli::{GlobalArgs, TargetArgs};
use crate::exit::UsageError;
use crate::printer::Printer;
use crate::settings::{database_url, required_manifest};

#[derive(Serialize)]
struct PlanJson<'a> {
    app: Option<&'a str>,
    #[serde(flatten)]
    plan: &'a Plan,
}

fn depth(undo: UndoDepth) -> &'static str {
    match undo {
        UndoDepth::Nothing => "nothing to undo",
        UndoDepth::Code => "undo: code only",
        UndoDepth::CodeAndDown => "undo: code + down of the expand revisions",
        UndoDepth::Restore => "undo: restore the backup",
        UndoDepth::Impossible => "cannot be undone (exit 4)",
    }
}

pub(crate) fn run(global: &GlobalArgs, target_args: &TargetArgs, printer: &Printer) -> anyhow::Result<()> {
    let TargetArgs { to, no_backup, only, database } = target_args;
    let no_backup = *no_backup;
    let manifest = required_manifest(global)?;
    let target: semver::Version =
        to.parse().map_err(|e| UsageError(format!("`--to {to}` is not a version ({e}); expected one like 2.0.0")))?;
    let (release, deployed) = journal::deployed_release(&manifest.state_dir)?.unzip();
    let behind = upshift_core::runner::behind(&manifest, release.as_ref());
    let url = database_url(database, Some(&manifest), printer)?.map(|text| DatabaseUrl::parse(&text)).transpose()?;
    let (migrator, applied, described) = match &url {
        Some(url) => {
            let migrator = manifest.migrations()?;
            let mut engine = migrator.connect(url, false)?;
            let version = engine.server_version().with_context(|| format!("the database {url} is not reachable"))?;
            let applied = engine.applied()?;
            (Some((migrator, url.dialect())), applied, Some(format!("{url} ({version})")))
        }
        None => (None, Vec::new(), None),
    };
    let mut plan = upshift_core::plan(&PlanInput {
        manifest: &manifest,
        target: &target,
        deployed: deployed.as_ref(),
        migrations: migrator.as_ref().map(|(migrator, dialect)| Migrations {
            migrator,
            applied: applied.as_slice(),
            dialect: *dialect,
        }),
        database: described,
        no_backup,
        options: &upshift_core::config::options_set(&manifest),
        only,
        behind: &behind,
    })?;
    describe_changes(&manifest, &mut plan, &target.to_string())?;
    for finding in &plan.lint {
        printer.warn(&finding.to_string());
    }
    let app = manifest.app_name.as_deref();
    printer.result(&PlanJson { app, plan: &plan }, || {
        let mut out = format!(
            "Plan: {} {} -> {}\n\n",
            app.unwrap_or("the application"),
            plan.from.as_ref().map_or_else(|| "(nothing deployed)".to_owned(), ToString::to_string),
            plan.to
        );
        for step in &plan.steps {
            let _ = writeln!(out, "{:>2}. {}", step.number, step.title);
            for detail in &step.details {
                let _ = writeln!(out, "      - {detail}");
            }
            let _ = writeln!(out, "      if it fails: {} ({})", depth(step.on_failure.undo), step.on_failure.why);
        }
        out
    })
}

/// Adds to each Helm deploy step what it changes beyond the version (values, chart), as
/// the cluster says; what cannot be asked is said instead. Other drivers are not started:
/// a plan changes nothing.
fn describe_changes(manifest: &upshift_core::Manifest, plan: &mut Plan, version: &str) -> anyhow::Result<()> {
    let helm = |name: &str| manifest.components.iter().find(|c| c.name == name && c.driver.kind() == DriverKind::Helm);
    if !plan.steps.iter().any(|s| s.component.as_deref().is_some_and(|c| helm(c).is_some())) {
        return Ok(());
    }
    let mut drivers = super::run::drivers(manifest)?;
    for step in plan.steps.iter_mut().filter(|s| s.kind == StepKind::Deploy) {
        let Some(component) = step.component.as_deref().and_then(helm) else { continue };
        match drivers.get(component).and_then(|driver| driver.describe_change(component, version)) {
            Ok(lines) => step.details.extend(lines),
            Err(e) => {
                let why = manifest.redact(&e.to_string());
                step.details.push(format!("could not compare with what runs: {why}"));
            }
        }
    }
    Ok(())
}
