//! `upshift guide` and `upshift config check`: what a release range means for the operator.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use upshift_core::config::{self, ConfigReport};
use upshift_migrate::lexer::Dialect;
use upshift_migrate::{DatabaseUrl, Migrator};

use crate::cli::GlobalArgs;
use crate::exit::UsageError;
use crate::printer::Printer;
use crate::settings::required_manifest;
use upshift_core::driver::DriverError;

fn version(flag: &str, text: &str) -> anyhow::Result<semver::Version> {
    Ok(text
        .parse()
        .map_err(|e| UsageError(format!("`--{flag} {text}` is not a version ({e}); expected one like 2.0.0")))?)
}

#[derive(Serialize)]
struct GuideJson<'a> {
    markdown: &'a str,
}

pub(crate) fn guide(global: &GlobalArgs, from: &str, to: &str, printer: &Printer) -> anyhow::Result<()> {
    let manifest = required_manifest(global)?;
    let (from, to) = (version("from", from)?, version("to", to)?);
    // Offline: the URL (if any) only says which SQL dialect the appendix is in.
    let dialect = manifest
        .database_url
        .as_deref()
        .and_then(|u| DatabaseUrl::parse(u).ok())
        .map_or(Dialect::Postgres, |u| u.dialect());
    // An external migrator's revisions hold no SQL to show: the guide leaves them out.
    let migrator = if manifest.migrator.is_none() && manifest.database_url.is_some() && manifest.migrations_dir.is_dir()
    {
        Some(Migrator::load_with(&manifest.migrations_dir, &manifest.no_transaction)?)
    } else {
        None
    };
    let markdown = upshift_core::guide::guide(&manifest, &from, &to, migrator.as_ref(), dialect)?;
    let markdown = manifest.redact(&markdown);
    printer.result(&GuideJson { markdown: &markdown }, || markdown.clone())
}

#[derive(Serialize)]
struct CheckJson<'a> {
    ok: bool,
    #[serde(flatten)]
    report: &'a ConfigReport,
}

pub(crate) fn config_check(
    global: &GlobalArgs,
    to: &str,
    env_file: Option<&Path>,
    printer: &Printer,
) -> anyhow::Result<()> {
    let manifest = required_manifest(global)?;
    let to = version("to", to)?;
    if manifest.release(&to).is_none() {
        return Err(UsageError(format!(
            "{to} is not a release in {}; known releases: {}",
            manifest.path.display(),
            manifest.releases.iter().map(|r| r.version.to_string()).collect::<Vec<_>>().join(", ")
        ))
        .into());
    }
    let (set, from_file) = match env_file {
        Some(path) => (config::read_env_file(path)?, true),
        None => (config::options_set(&manifest), false),
    };
    let report = config::check(&manifest, &to, &set, from_file);
    // Compose files are configuration too: Compose itself says whether they hold with
    // this release's override (when Docker answers; the upgrade's preflight checks again).
    for component in manifest.components.iter().filter(|c| c.compose().is_some()) {
        match upshift_deploy::check_compose_files(&manifest, component, &to.to_string()) {
            Ok(()) => {}
            Err(DriverError::Refused(message)) => {
                return Err(UsageError(format!("the compose files of {}: {message}", component.name)).into());
            }
            Err(e) => printer.warn(&format!("the compose files of {} were not checked: {e}", component.name)),
        }
    }
    for name in &report.removed {
        printer.warn(&format!("{name} is set but was removed; it does nothing any more"));
    }
    for name in &report.unknown {
        printer.warn(&format!("{name} is set but no release up to {to} declares it"));
    }
    printer.result(&CheckJson { ok: report.ok(), report: &report }, || {
        let mut out = String::new();
        if report.ok() {
            let _ = writeln!(out, "ok: every option {to} requires is set");
        }
        for missing in &report.missing {
            let _ = writeln!(
                out,
                "missing: {} (required since {}){}",
                missing.name,
                missing.added_in,
                missing.doc.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
            );
        }
        out
    })?;
    if report.ok() {
        Ok(())
    } else {
        Err(UsageError(format!(
            "release {to} requires options that are not set: {}",
            report.missing.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
        ))
        .into())
    }
}
