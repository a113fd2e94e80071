//! `upshift migrate ...`: the schema engine on its own.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serde::Serialize;
use upshift_migrate::{
    AppliedRevision, DatabaseUrl, Direction, DownTarget, Engine, Migrator, UpTarget, lexer::Dialect,
};

use super::graph_lines::{self, Node};
use crate::cli::{GlobalArgs, MigrateArgs, MigrateCommand, PhaseArg, Way};
use crate::exit::UsageError;
use crate::printer::Printer;
use crate::settings::MigrateSettings;

pub(crate) fn run(global: &GlobalArgs, args: &MigrateArgs, printer: &Printer) -> anyhow::Result<()> {
    let settings = MigrateSettings::resolve(global, &args.connect, printer)?;
    match &args.command {
        MigrateCommand::New { slug, phase } => new(&settings, slug, *phase, printer),
        MigrateCommand::Merge { message } => merge(&settings, message.as_deref(), printer),
        MigrateCommand::Heads => heads(&settings, printer),
        MigrateCommand::Sql { way, target } => sql(&settings, *way, target.as_deref(), printer),
        MigrateCommand::Status => status(&settings, printer),
        MigrateCommand::History => history(&settings, printer),
        MigrateCommand::Verify => verify(&settings, printer),
        MigrateCommand::Up { target } => up(&settings, target, printer),
        MigrateCommand::Down { target } => down(&settings, target, printer),
        MigrateCommand::Baseline { id } => baseline(&settings, id, printer),
        MigrateCommand::Lint { revisions } => lint(&settings, revisions, printer),
    }
}

fn load(settings: &MigrateSettings) -> anyhow::Result<Migrator> {
    Ok(match &settings.external {
        Some(external) => Migrator::load_external(external)?,
        None => Migrator::load_with(&settings.dir, &settings.no_transaction)?,
    })
}

/// Opens the database the migrator's revisions run against; `create` only for commands
/// that write.
fn open(migrator: &Migrator, url: &DatabaseUrl, create: bool, printer: &Printer) -> anyhow::Result<Box<dyn Engine>> {
    let mut engine = migrator.connect(url, create)?;
    if let Ok(version) = engine.server_version() {
        printer.verbose(&format!("database {url} ({version})"));
    }
    Ok(engine)
}

fn applied(migrator: &Migrator, settings: &MigrateSettings, printer: &Printer) -> anyhow::Result<Vec<AppliedRevision>> {
    Ok(open(migrator, &settings.url()?, false, printer)?.applied()?)
}

#[derive(Serialize)]
struct StatusJson<'a> {
    applied: &'a [String],
    pending: &'a [String],
    heads: &'a [String],
    current: &'a [String],
    drifted: &'a [String],
    vanished: &'a [String],
    /// Revisions without a down section (or an empty one): only a restore undoes them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    irreversible: Vec<&'a str>,
}

fn status(settings: &MigrateSettings, printer: &Printer) -> anyhow::Result<()> {
    let migrator = load(settings)?;
    let url = settings.url()?;
    let rows = applied(&migrator, settings, printer)?;
    let status = migrator.status(&rows);
    for id in &status.drifted {
        printer.warn(&format!("revision {id} changed after it was applied (`upshift migrate verify` says how)"));
    }
    for id in &status.vanished {
        printer.warn(&format!("revision {id} is applied but its file is gone"));
    }
    let json = StatusJson {
        applied: &status.applied,
        pending: &status.pending,
        heads: &status.heads,
        current: &status.current,
        drifted: &status.drifted,
        vanished: &status.vanished,
        irreversible: migrator.graph().revisions().iter().filter(|r| !r.reversible()).map(|r| r.id.as_str()).collect(),
    };
    printer.result(&json, || {
        let list = |ids: &[String]| if ids.is_empty() { "-".to_owned() } else { ids.join(", ") };
        let mut out = String::new();
        let _ = writeln!(out, "database  {url}");
        match migrator.external() {
            Some(external) => {
                let _ = writeln!(out, "migrator  {} ({})", external.name(), migrator.dir().display());
            }
            None => {
                let _ = writeln!(out, "folder    {}", migrator.dir().display());
            }
        }
        let _ = writeln!(out, "applied   {} of {}", status.applied.len(), migrator.graph().revisions().len());
        let _ = writeln!(out, "current   {}", list(&status.current));
        let _ = writeln!(out, "heads     {}", list(&status.heads));
        let _ = writeln!(out, "pending   {}", list(&status.pending));
        if !json.irreversible.is_empty() {
            let _ = writeln!(
                out,
                "irreversible in practice: {} (no down section, or an empty one: only a restore undoes them)",
                json.irreversible.join(", ")
            );
        }
        out
    })
}

#[derive(Serialize)]
struct HistoryEntry<'a> {
    id: &'a str,
    name: &'a str,
    parents: Vec<&'a str>,
    phase: &'a str,
    applied: bool,
    applied_at: Option<&'a str>,
}

fn history(settings: &MigrateSettings, printer: &Printer) -> anyhow::Result<()> {
    let migrator = load(settings)?;
    let rows = applied(&migrator, settings, printer)?;
    let applied_at: HashMap<&str, &str> = rows.iter().map(|r| (r.id.as_str(), r.applied_at.as_str())).collect();
    let graph = migrator.graph();
    let entries: Vec<HistoryEntry<'_>> = graph
        .topological()
        .iter()
        .rev()
        .map(|&index| {
            let revision = graph.revision(index);
            HistoryEntry {
                id: &revision.id,
                name: &revision.name,
                parents: graph.parents(index).iter().map(|&p| graph.revision(p).id.as_str()).collect(),
                phase: revision.phase.as_str(),
                applied: applied_at.contains_key(revision.id.as_str()),
                // An external tool does not say when (Alembic keeps no time).
                applied_at: applied_at.get(revision.id.as_str()).copied().filter(|at| !at.is_empty()),
            }
        })
        .collect();
    printer.result(&entries, || {
        let nodes: Vec<Node<'_>> = entries.iter().map(|e| Node { id: e.id, parents: e.parents.clone() }).collect();
        let lines = graph_lines::draw(&nodes);
        let width = lines.iter().map(|l| l.art.len()).max().unwrap_or(0);
        let id_width = entries.iter().map(|e| e.id.len()).max().unwrap_or(0);
        let name_width = entries.iter().map(|e| e.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for line in &lines {
            match line.node {
                Some(i) => {
                    let e = &entries[i];
                    let state = match (e.applied, e.applied_at) {
                        (true, Some(at)) => format!("applied {at}"),
                        (true, None) => "applied".to_owned(),
                        (false, _) => "pending".to_owned(),
                    };
                    let _ = writeln!(
                        out,
                        "{:width$}  {:id_width$}  {:name_width$}  {:8}  {state}",
                        line.art, e.id, e.name, e.phase
                    );
                }
                None => {
                    let _ = writeln!(out, "{}", line.art);
                }
            }
        }
        if entries.is_empty() {
            let _ = writeln!(out, "no revisions in {}", migrator.dir().display());
        }
        out
    })
}

#[derive(Serialize)]
struct HeadsJson<'a> {
    heads: Vec<&'a str>,
}

fn heads(settings: &MigrateSettings, printer: &Printer) -> anyhow::Result<()> {
    let migrator = load(settings)?;
    let graph = migrator.graph();
    let heads: Vec<&str> = graph.heads().into_iter().map(|i| graph.revision(i).id.as_str()).collect();
    printer.result(&HeadsJson { heads: heads.clone() }, || {
        let mut out = String::new();
        for id in &heads {
            let revision = graph.revision(graph.find(id).expect("a head exists"));
            let _ = writeln!(out, "{id}  {}", revision.name);
        }
        out
    })
}

#[derive(Serialize)]
struct UpJson {
    applied: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct DownJson {
    reverted: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Runs `work`, collecting the revisions it finishes; prints them (and the error, in json
/// mode) whether it succeeds or not, since what finished before a failure stays done. An
/// external tool's output goes to stderr before the result.
fn run_steps<T: Serialize>(
    printer: &Printer,
    verb: &str,
    engine: &mut dyn Engine,
    work: impl FnOnce(
        &mut dyn Engine,
        &mut dyn FnMut(&upshift_migrate::Revision, Duration),
    ) -> Result<(), upshift_migrate::Error>,
    json: impl FnOnce(Vec<String>, Option<String>) -> T,
) -> anyhow::Result<()> {
    let mut done = Vec::new();
    let result = work(engine, &mut |revision, duration| {
        printer.progress(&format!("{verb} {} {} ({} ms)", revision.id, revision.name, duration.as_millis()));
        done.push(revision.id.clone());
    });
    for line in engine.take_output() {
        printer.progress(&format!("  {line}"));
    }
    let error = result.as_ref().err().map(ToString::to_string);
    let count = done.len();
    printer.result(&json(done, error), || {
        if result.is_ok() {
            match count {
                0 => "nothing to do: already there\n".to_owned(),
                1 => format!("{verb} 1 revision\n"),
                n => format!("{verb} {n} revisions\n"),
            }
        } else {
            String::new()
        }
    })?;
    Ok(result?)
}

fn up(settings: &MigrateSettings, target: &str, printer: &Printer) -> anyhow::Result<()> {
    let migrator = load(settings)?;
    let target: UpTarget = target.parse()?;
    migrator.check_up_target(&target)?;
    let url = settings.url()?;
    let mut engine = open(&migrator, &url, true, printer)?;
    run_steps(
        printer,
        "applied",
        engine.as_mut(),
        |engine, done| migrator.up(engine, &target, settings.lock_timeout, done),
        |applied, error| UpJson { applied, error: error.map(|e| url.redact(&e)) },
    )
}

fn down(settings: &MigrateSettings, target: &str, printer: &Printer) -> anyhow::Result<()> {
    let migrator = load(settings)?;
    let target: DownTarget = target.parse()?;
    let url = settings.url()?;
    let mut engine = open(&migrator, &url, true, printer)?;
    run_steps(
        printer,
        "reverted",
        engine.as_mut(),
        |engine, done| migrator.down(engine, &target, settings.lock_timeout, done),
        |reverted, error| DownJson { reverted, error: error.map(|e| url.redact(&e)) },
    )
}

#[derive(Serialize)]
struct BaselineJson<'a> {
    recorded: &'a [String],
}

fn baseline(settings: &MigrateSettings, id: &str, printer: &Printer) -> anyhow::Result<()> {
    let migrator = load(settings)?;
    let mut engine = open(&migrator, &settings.url()?, true, printer)?;
    let recorded = migrator.baseline(engine.as_mut(), id, settings.lock_timeout)?;
    printer.result(&BaselineJson { recorded: &recorded }, || {
        format!("recorded {} revision(s) as applied without running them, up to {id}\n", recorded.len())
    })
}

#[derive(Serialize)]
struct VerifyJson<'a> {
    ok: bool,
    checked: usize,
    drifted: &'a [String],
    vanished: &'a [String],
}

fn verify(settings: &MigrateSettings, printer: &Printer) -> anyhow::Result<()> {
    let migrator = load(settings)?;
    let rows = applied(&migrator, settings, printer)?;
    let status = migrator.status(&rows);
    let ok = status.drifted.is_empty() && status.vanished.is_empty();
    let json = VerifyJson { ok, checked: rows.len(), drifted: &status.drifted, vanished: &status.vanished };
    printer.result(&json, || {
        if ok { format!("ok: {} applied revision(s) match their files\n", rows.len()) } else { String::new() }
    })?;
    // The first problem, with the whole explanation, becomes the error.
    migrator.check_applied(&rows)?;
    Ok(())
}

/// Findings that no `-- upshift:allow` accepts (exit 1: the files are read fine, and they
/// fail the check).
#[derive(Debug, thiserror::Error)]
#[error(
    "{count} finding(s) not allowed; rewrite each as its fix says, or accept it with `-- upshift:allow RULE reason` on the line before its statement"
)]
struct Findings {
    count: usize,
}

fn lint(settings: &MigrateSettings, revisions: &[String], printer: &Printer) -> anyhow::Result<()> {
    let migrator = load(settings)?;
    // Offline: the URL, when there is one, only picks the dialect.
    let dialect = settings.optional_url()?.map_or(Dialect::Postgres, |url| url.dialect());
    if dialect == Dialect::Sqlite {
        printer.progress(
            "SQLite: only the rules that do not depend on PostgreSQL's locks apply (renames, drops, irreversible revisions)",
        );
    }
    let graph = migrator.graph();
    let selected: Vec<(usize, upshift_migrate::Phase)> = if revisions.is_empty() {
        graph.topological().iter().map(|&i| (i, graph.revision(i).phase)).collect()
    } else {
        revisions
            .iter()
            .map(|id| {
                let index = graph.find(id).ok_or_else(|| {
                    upshift_migrate::Error::Target(format!(
                        "no revision `{id}` in {}; `upshift migrate history` lists them",
                        migrator.dir().display()
                    ))
                })?;
                Ok((index, graph.revision(index).phase))
            })
            .collect::<Result<_, upshift_migrate::Error>>()?
    };
    let findings = upshift_migrate::lint::lint(&migrator, &selected, dialect)?;
    let refused = findings.iter().filter(|f| !f.allowed).count();
    printer.result(&findings, || {
        let mut out = String::new();
        for finding in &findings {
            let _ = writeln!(out, "{finding}\n");
        }
        let allowed = findings.len() - refused;
        let _ =
            writeln!(out, "{} revision(s) linted: {} finding(s), {allowed} allowed", selected.len(), findings.len());
        out
    })?;
    if refused > 0 {
        return Err(Findings { count: refused }.into());
    }
    Ok(())
}

#[derive(Serialize)]
struct SqlJson<'a> {
    sql: &'a str,
}

fn sql(settings: &MigrateSettings, way: Way, target: Option<&str>, printer: &Printer) -> anyhow::Result<()> {
    let migrator = load(settings)?;
    // Offline: the URL, when there is one, only picks the dialect; nothing connects.
    let dialect = settings.optional_url()?.map_or(Dialect::Postgres, |url| url.dialect());
    let direction = match way {
        Way::Up => Direction::Up,
        Way::Down => Direction::Down,
    };
    let script = migrator.sql(direction, target, dialect)?;
    printer.result(&SqlJson { sql: &script }, || script.clone())
}

#[derive(Serialize)]
struct NewJson<'a> {
    id: &'a str,
    path: &'a Path,
    parents: &'a [String],
}

/// A file-name slug: lower case, runs of anything but letters and digits become `_`.
fn slugify(text: &str) -> anyhow::Result<String> {
    let mut slug = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.ends_with('_') && !slug.is_empty() {
            slug.push('_');
        }
    }
    let slug = slug.trim_end_matches('_').to_owned();
    if slug.is_empty() {
        return Err(UsageError(format!("`{text}` has no letters or digits to name the file with")).into());
    }
    Ok(slug)
}

/// A new id: the UTC time as YYYYMMDDHHMMSS, moved past the newest timestamp id so files
/// stay in order when two are made in one second.
fn new_id(migrator: Option<&Migrator>) -> String {
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let mut id: u64 = now.chars().filter(char::is_ascii_digit).collect::<String>().parse().expect("digits");
    if let Some(newest) = migrator.and_then(|m| {
        m.graph()
            .revisions()
            .iter()
            .filter_map(|r| (r.id.len() == 14).then(|| r.id.parse::<u64>().ok()).flatten())
            .max()
    }) {
        id = id.max(newest + 1);
    }
    id.to_string()
}

/// Writes a revision file that must not exist yet.
fn write_revision(dir: &Path, id: &str, slug: &str, text: &str) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
    let path = dir.join(format!("{id}_{slug}.sql"));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("could not create {}", path.display()))?;
    std::io::Write::write_all(&mut file, text.as_bytes())
        .with_context(|| format!("could not write {}", path.display()))?;
    Ok(path)
}

fn head_ids(migrator: Option<&Migrator>) -> Vec<String> {
    migrator
        .map_or_else(Vec::new, |m| m.graph().heads().into_iter().map(|i| m.graph().revision(i).id.clone()).collect())
}

/// Refuses to write upshift files beside an external migrator's revisions.
fn own_files(settings: &MigrateSettings, what: &str) -> anyhow::Result<()> {
    match &settings.external {
        Some(external) => Err(UsageError(format!(
            "the revisions are {}'s ([database] migrator): {what} with it (`alembic revision`, `alembic merge`), not with upshift",
            external.name()
        ))
        .into()),
        None => Ok(()),
    }
}

fn new(settings: &MigrateSettings, slug: &str, phase: PhaseArg, printer: &Printer) -> anyhow::Result<()> {
    own_files(settings, "write new revisions")?;
    let slug = slugify(slug)?;
    let migrator = if settings.dir.exists() { Some(load(settings)?) } else { None };
    let parents = head_ids(migrator.as_ref());
    let id = new_id(migrator.as_ref());
    let phase = match phase {
        PhaseArg::Expand => "expand",
        PhaseArg::Contract => "contract",
    };
    let text = format!(
        "-- upshift:parents {}\n-- upshift:phase {phase}\n-- upshift:up\n\n-- upshift:down\n\n",
        parents.join(" ")
    );
    let path = write_revision(&settings.dir, &id, &slug, &text)?;
    printer.result(&NewJson { id: &id, path: &path, parents: &parents }, || format!("created {}\n", path.display()))
}

fn merge(settings: &MigrateSettings, message: Option<&str>, printer: &Printer) -> anyhow::Result<()> {
    own_files(settings, "merge heads")?;
    let migrator = load(settings)?;
    let parents = head_ids(Some(&migrator));
    if parents.len() < 2 {
        return Err(UsageError(format!(
            "nothing to merge: the migrations have {} head(s); a merge joins two or more",
            parents.len()
        ))
        .into());
    }
    let slug = slugify(message.unwrap_or("merge"))?;
    let id = new_id(Some(&migrator));
    let text = format!(
        "-- upshift:parents {}\n-- upshift:phase expand\n-- upshift:up\n-- merges {}\n-- upshift:down\n",
        parents.join(" "),
        parents.join(" and ")
    );
    let path = write_revision(&settings.dir, &id, &slug, &text)?;
    let merged: BTreeSet<&str> = parents.iter().map(String::as_str).collect();
    printer.result(&NewJson { id: &id, path: &path, parents: &parents }, || {
        format!("created {} merging {}\n", path.display(), merged.into_iter().collect::<Vec<_>>().join(", "))
    })
}
