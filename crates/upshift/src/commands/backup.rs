//! `upshift backup ...`: the backup engine on its own.

use std::fmt::Write as _;
use std::time::SystemTime;

use serde::Serialize;
use upshift_backup::{CreateOptions, Identities, RestoreOptions, Retention};

use crate::cli::{BackupArgs, BackupCommand, GlobalArgs};
use crate::exit::UsageError;
use crate::printer::Printer;
use crate::settings::BackupSettings;

pub(crate) fn run(global: &GlobalArgs, args: &BackupArgs, printer: &Printer) -> anyhow::Result<()> {
    let settings = BackupSettings::resolve(global, args, printer)?;
    match &args.command {
        BackupCommand::Create { label, paths } => create(&settings, label.clone(), paths, printer),
        BackupCommand::List => list(&settings, printer),
        BackupCommand::Verify { id, deep, identity } => {
            let identities = identity.as_deref().map(Identities::from_file).transpose()?;
            verify(&settings, id, *deep, identities.as_ref(), printer)
        }
        BackupCommand::Restore { id, target_url, force, identity } => {
            let identities = identity.as_deref().map(Identities::from_file).transpose()?;
            restore(&settings, id, target_url.as_deref(), *force, identities.as_ref(), printer)
        }
        BackupCommand::Prune { keep_last, keep_within } => {
            let retention = Retention {
                keep_last: keep_last.or(settings.retention.keep_last),
                keep_within: keep_within.or(settings.retention.keep_within),
            };
            prune(&settings, retention, printer)
        }
    }
}

/// Bytes for people: 1536 -> "1.5 KiB".
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    #[allow(clippy::cast_precision_loss)]
    let mut size = bytes as f64;
    let mut unit = 0;
    while size >= 1024.0 && unit < UNITS.len() - 1 {
        size /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{size:.1} {}", UNITS[unit]) }
}

#[derive(Serialize)]
struct CreateJson<'a> {
    id: &'a str,
    size_bytes: u64,
    duration_ms: u64,
}

fn create(
    settings: &BackupSettings,
    label: Option<String>,
    paths: &[std::path::PathBuf],
    printer: &Printer,
) -> anyhow::Result<()> {
    let url = settings.optional_url()?;
    let paths = if paths.is_empty() { settings.paths.as_slice() } else { paths };
    printer.progress(&format!("backing up into {}", settings.store.dir().display()));
    let bar = printer.progress_bar();
    let mut codec = settings.codec.clone();
    codec.progress = bar.clone().map(|b| b as std::sync::Arc<dyn upshift_backup::Progress>);
    let create = |artifacts: &[upshift_backup::ArtifactSource<'_>]| {
        upshift_backup::create(
            &settings.store,
            &CreateOptions {
                database: url.as_ref(),
                paths,
                base: &settings.base,
                label,
                app: settings.app.clone(),
                version: None,
                codec,
                artifacts,
            },
        )
    };
    let created = match &settings.manifest {
        Some(manifest) => upshift_core::artifacts::with_sources(manifest, create),
        None => create(&[]),
    };
    if let Some(bar) = bar {
        bar.finish();
    }
    let manifest = created?;
    let json = CreateJson { id: &manifest.id, size_bytes: manifest.size_bytes(), duration_ms: manifest.duration_ms };
    printer.result(&json, || {
        format!(
            "created backup {} ({}, {} file(s), {} ms)\n",
            manifest.id,
            human_size(manifest.size_bytes()),
            manifest.files.len(),
            manifest.duration_ms
        )
    })
}

#[derive(Serialize)]
struct ListEntry<'a> {
    id: &'a str,
    created_at: &'a str,
    size_bytes: u64,
    version: Option<&'a str>,
    label: Option<&'a str>,
    database: Option<&'a str>,
    /// Only when there are some: the contract's shape stays as it was without artifacts.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    artifacts: &'a [String],
}

fn list(settings: &BackupSettings, printer: &Printer) -> anyhow::Result<()> {
    let backups = settings.store.list()?;
    let entries: Vec<ListEntry<'_>> = backups
        .iter()
        .map(|b| ListEntry {
            id: &b.id,
            created_at: &b.created_at,
            size_bytes: b.size_bytes(),
            version: b.version.as_deref(),
            label: b.label.as_deref(),
            database: b.database.as_ref().map(|d| d.name.as_str()),
            artifacts: &b.artifacts,
        })
        .collect();
    printer.result(&entries, || {
        if entries.is_empty() {
            return format!("no backups in {}\n", settings.store.dir().display());
        }
        let mut out = format!("{:24}  {:24}  {:>10}  {:8}  {}\n", "ID", "CREATED", "SIZE", "VERSION", "LABEL");
        for e in &entries {
            let artifacts = if e.artifacts.is_empty() {
                String::new()
            } else {
                format!(" (artifacts: {})", e.artifacts.join(", "))
            };
            let _ = writeln!(
                out,
                "{:24}  {:24}  {:>10}  {:8}  {}{artifacts}",
                e.id,
                e.created_at,
                human_size(e.size_bytes),
                e.version.unwrap_or("-"),
                e.label.unwrap_or("")
            );
        }
        out
    })
}

#[derive(Serialize)]
struct VerifyJson<'a> {
    id: &'a str,
    ok: bool,
    files: usize,
    deep: bool,
    tables_compared: Option<usize>,
}

fn verify(
    settings: &BackupSettings,
    id: &str,
    deep: bool,
    identities: Option<&Identities>,
    printer: &Printer,
) -> anyhow::Result<()> {
    let url = if deep { settings.optional_url()? } else { None };
    let verified = upshift_backup::verify(&settings.store, id, deep, url.as_ref(), identities)?;
    let json = VerifyJson {
        id: &verified.id,
        ok: true,
        files: verified.files,
        deep,
        tables_compared: verified.tables_compared,
    };
    printer.result(&json, || {
        let mut out = format!(
            "ok: backup {} — {} file(s) match their checksums and read back whole",
            verified.id, verified.files
        );
        if let Some(tables) = verified.tables_compared {
            let _ = write!(out, "; restored into a scratch database, row counts of {tables} table(s) match");
        }
        out.push('\n');
        out
    })
}

#[derive(Serialize)]
struct RestoreJson<'a> {
    id: &'a str,
    database: Option<&'a str>,
    paths: &'a [String],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    artifacts: &'a [String],
}

fn restore(
    settings: &BackupSettings,
    id: &str,
    target_url: Option<&str>,
    force: bool,
    identities: Option<&Identities>,
    printer: &Printer,
) -> anyhow::Result<()> {
    let target = match target_url {
        Some(text) => Some(upshift_migrate::DatabaseUrl::parse(text)?),
        None => settings.optional_url()?,
    };
    if target.is_none() && settings.store.load(id)?.database.is_some() {
        return Err(UsageError(
            "the backup holds a database: say where to restore it with --target-url or --database-url".into(),
        )
        .into());
    }
    // Artifacts go back with the live state only, by the manifest's `restore` commands:
    // checked before anything is restored.
    let backup = settings.store.load(id)?;
    let artifacts = if target_url.is_none() && !backup.artifacts.is_empty() {
        let manifest = settings.manifest.as_ref().ok_or_else(|| {
            UsageError(format!(
                "backup {id} holds artifacts ({}), which only the manifest's [[backup.artifacts]] commands can restore; run it where upshift.toml is (or give --config)",
                backup.artifacts.join(", ")
            ))
        })?;
        upshift_core::artifacts::check_restorable(manifest, &backup).map_err(UsageError)?;
        Some(manifest)
    } else {
        None
    };
    let restored = upshift_backup::restore(
        &settings.store,
        id,
        // Restoring elsewhere (--target-url) is for a copy: the live paths stay as they are.
        &RestoreOptions {
            target: target.as_ref(),
            force,
            paths_into: target_url.is_none().then_some(settings.base.as_path()),
            // Only the saved paths the manifest (or --path) names may be written.
            saved_paths: (!settings.paths.is_empty()).then_some(settings.paths.as_slice()),
            identities,
        },
    )?;
    if let Some(manifest) = artifacts {
        upshift_core::artifacts::restore_all(manifest, &settings.store, &backup, identities, &|line| {
            printer.progress(line.trim());
        })
        .map_err(anyhow::Error::msg)?;
    }
    let restored_artifacts = if artifacts.is_some() { backup.artifacts.as_slice() } else { &[] };
    let json = RestoreJson {
        id: &restored.id,
        database: restored.database.as_deref(),
        paths: &restored.paths,
        artifacts: restored_artifacts,
    };
    printer.result(&json, || {
        let mut out = format!("restored backup {}", restored.id);
        if let Some(database) = &restored.database {
            let _ = write!(out, " into {database}");
        }
        if !restored.paths.is_empty() {
            let _ = write!(out, "; paths put back: {}", restored.paths.join(", "));
        }
        if !restored_artifacts.is_empty() {
            let _ = write!(out, "; artifacts restored: {}", restored_artifacts.join(", "));
        }
        out.push('\n');
        out
    })
}

#[derive(Serialize)]
struct PruneJson<'a> {
    removed: &'a [String],
    kept: &'a [String],
    leftovers: &'a [String],
}

fn prune(settings: &BackupSettings, retention: Retention, printer: &Printer) -> anyhow::Result<()> {
    if retention.keep_last.is_none() && retention.keep_within.is_none() {
        printer.warn("no retention policy (--keep-last, --keep-within or [backup] keep_last / keep_within): every backup is kept");
    }
    let pruned = settings.store.prune(retention, SystemTime::now())?;
    let json = PruneJson { removed: &pruned.removed, kept: &pruned.kept, leftovers: &pruned.leftovers };
    printer.result(&json, || {
        let mut out = format!("removed {} backup(s), kept {}", pruned.removed.len(), pruned.kept.len());
        if !pruned.leftovers.is_empty() {
            let _ = write!(out, "; removed {} leftover(s) of interrupted backups", pruned.leftovers.len());
        }
        out.push('\n');
        out
    })
}
