//! `upshift guide --from A --to B`: the upgrade guide of seed 000, written from what upshift
//! knows (the releases, their migrations, the plan's rules), so it cannot drift from what an
//! upgrade really does.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use semver::Version;
use upshift_migrate::lexer::Dialect;
use upshift_migrate::{Direction, Migrator};

use crate::manifest::{Manifest, Release};
use crate::plan::split_phases;

/// Why a guide cannot be written (bad input: exit 2).
#[derive(Debug, thiserror::Error)]
pub enum GuideError {
    /// The range holds no release.
    #[error("no release after {from} up to {to} in {manifest}; known releases: {known}")]
    EmptyRange { from: String, to: String, manifest: String, known: String },
    /// The migrations cannot be read or a `migrate_to` is unknown.
    #[error(transparent)]
    Migrate(#[from] upshift_migrate::Error),
}

/// The revisions one release applies, split as `upgrade` runs them.
struct ReleaseMigrations<'a> {
    release: &'a Release,
    expand: Vec<usize>,
    contract: Vec<usize>,
}

fn target_of(migrator: &Migrator, release: &Release) -> Result<BTreeSet<usize>, upshift_migrate::Error> {
    let graph = migrator.graph();
    let tips: Vec<usize> = match &release.migrate_to {
        Some(id) => vec![graph.find(id).ok_or_else(|| {
            upshift_migrate::Error::Target(format!(
                "release {} has migrate_to = \"{id}\", which is no revision",
                release.version
            ))
        })?],
        None => graph.heads(),
    };
    Ok(tips.into_iter().flat_map(|tip| graph.ancestors(tip)).collect())
}

/// Writes the guide as Markdown.
pub fn guide(
    manifest: &Manifest,
    from: &Version,
    to: &Version,
    migrator: Option<&Migrator>,
    dialect: Dialect,
) -> Result<String, GuideError> {
    let mut range: Vec<&Release> = manifest.releases.iter().filter(|r| &r.version > from && &r.version <= to).collect();
    range.sort_by(|a, b| a.version.cmp(&b.version));
    if range.is_empty() || manifest.release(to).is_none() {
        return Err(GuideError::EmptyRange {
            from: from.to_string(),
            to: to.to_string(),
            manifest: manifest.path.display().to_string(),
            known: manifest.releases.iter().map(|r| r.version.to_string()).collect::<Vec<_>>().join(", "),
        });
    }
    // The revisions of each release: those its target adds to the previous release's.
    let mut per_release = Vec::new();
    if let Some(migrator) = migrator {
        let mut before = match manifest.release(from) {
            Some(release) => target_of(migrator, release)?,
            None => BTreeSet::new(),
        };
        for release in &range {
            let target = target_of(migrator, release)?;
            let pending: Vec<usize> = migrator
                .graph()
                .topological()
                .iter()
                .copied()
                .filter(|i| target.contains(i) && !before.contains(i))
                .collect();
            let (expand, contract) = split_phases(migrator, &pending);
            per_release.push(ReleaseMigrations { release, expand, contract });
            before.extend(target);
        }
    }
    let mut guide = Guide { manifest, to, migrator, dialect, range, per_release, out: String::new() };
    let app = manifest.app_name.as_deref().unwrap_or("the application");
    let _ = writeln!(guide.out, "# Upgrade guide: {app} {from} → {to}\n");
    let _ = writeln!(
        guide.out,
        "Written by `upshift guide --from {from} --to {to}` from the releases and migrations upshift deploys.\n"
    );
    guide.overview();
    guide.breaking();
    guide.deprecations();
    guide.prerequisites();
    guide.backup();
    guide.steps();
    guide.configuration();
    guide.rollback();
    guide.troubleshooting();
    guide.appendix()?;
    Ok(guide.out.trim_end().to_owned() + "\n")
}

/// The guide being written: one method per section of seed 000.
struct Guide<'a> {
    manifest: &'a Manifest,
    to: &'a Version,
    migrator: Option<&'a Migrator>,
    dialect: Dialect,
    range: Vec<&'a Release>,
    per_release: Vec<ReleaseMigrations<'a>>,
    out: String,
}

impl Guide<'_> {
    fn overview(&mut self) {
        let range = &self.range;
        let w = &mut self.out;
        let _ = writeln!(w, "## Overview\n");
        for release in range {
            let _ = writeln!(w, "- **{}**: {}", release.version, release.summary.as_deref().unwrap_or("(no summary)"));
        }
        let _ = writeln!(w);
    }

    fn breaking(&mut self) {
        let range = &self.range;
        let w = &mut self.out;
        let _ = writeln!(w, "## Breaking changes\n");
        let breaking: Vec<String> =
            range.iter().flat_map(|r| r.breaking.iter().map(move |b| format!("- {b} ({})", r.version))).collect();
        let _ = writeln!(w, "{}\n", if breaking.is_empty() { "None.".to_owned() } else { breaking.join("\n") });
    }

    fn deprecations(&mut self) {
        let range = &self.range;
        let w = &mut self.out;
        let _ = writeln!(w, "## Deprecations\n");
        let deprecations: Vec<_> = range.iter().flat_map(|r| r.deprecated.iter().map(move |d| (r, d))).collect();
        if deprecations.is_empty() {
            let _ = writeln!(w, "None.\n");
        } else {
            let _ = writeln!(w, "| Deprecated | Since | Removed in | Instead |\n| --- | --- | --- | --- |");
            for (release, d) in deprecations {
                let _ = writeln!(
                    w,
                    "| {} | {} | {} | {} |",
                    d.what,
                    release.version,
                    d.removed_in.as_deref().unwrap_or("-"),
                    d.instead.as_deref().unwrap_or("-")
                );
            }
            let _ = writeln!(w);
        }
    }

    fn prerequisites(&mut self) {
        let manifest = self.manifest;
        let range = &self.range;
        let to = self.to;
        let migrator = self.migrator;
        let dialect = self.dialect;
        let w = &mut self.out;
        let _ = writeln!(w, "## Prerequisites\n");
        match &range[0].upgrade_from {
            Some(requirement) => {
                let _ = writeln!(
                    w,
                    "- The deployed version must satisfy `{requirement}` (upshift refuses the upgrade otherwise)."
                );
            }
            None => {
                let _ = writeln!(w, "- Any deployed version may upgrade to {}.", range[0].version);
            }
        }
        for pair in range.windows(2) {
            if let Some(requirement) = &pair[1].upgrade_from {
                let _ = writeln!(
                    w,
                    "- {} upgrades from `{requirement}`: go through {} first.",
                    pair[1].version, pair[0].version
                );
            }
        }
        let engine = match dialect {
            Dialect::Postgres => "PostgreSQL",
            Dialect::Sqlite => "SQLite",
        };
        if migrator.is_some() {
            match &manifest.min_server {
                Some(min) => {
                    let _ = writeln!(w, "- Database: {engine} {min} or newer.");
                }
                None => {
                    let _ = writeln!(w, "- Database: {engine}.");
                }
            }
        }
        let _ = writeln!(w, "\n### Pre-upgrade checklist\n");
        let _ = writeln!(w, "- [ ] Read the breaking changes and deprecations above.");
        let _ = writeln!(w, "- [ ] `upshift config check --to {to}`: required options set, removed ones gone.");
        let _ = writeln!(w, "- [ ] `upshift status`: every component healthy, no run in flight.");
        let _ = writeln!(
            w,
            "- [ ] `upshift plan --to {}`: review every step and what a failure would undo.",
            range[0].version
        );
        let _ = writeln!(w, "- [ ] Free disk for a backup in `{}`.\n", manifest.backup.dir.display());
    }

    fn backup(&mut self) {
        let manifest = self.manifest;
        let to = self.to;
        let w = &mut self.out;
        let _ = writeln!(w, "## Backup\n");
        let paths: Vec<String> = manifest.backup.paths.iter().map(|p| format!("`{}`", p.display())).collect();
        let what =
            if paths.is_empty() { "the database".to_owned() } else { format!("the database and {}", paths.join(", ")) };
        let _ = writeln!(
            w,
            "`upshift upgrade` takes a backup of {what} before it changes anything (unless `--no-backup`), every file checksummed, into `{}`. To take and check one by hand:\n",
            manifest.backup.dir.display()
        );
        let _ = writeln!(
            w,
            "```sh\nupshift backup create --label \"before {to}\"\nupshift backup verify latest --deep\n```\n"
        );
    }

    fn steps(&mut self) {
        let manifest = self.manifest;
        let range = &self.range;
        let migrator = self.migrator;
        let per_release = &self.per_release;
        let w = &mut self.out;
        let _ = writeln!(w, "## Upgrade steps\n");
        for (step, release) in range.iter().enumerate() {
            let _ = writeln!(w, "### Step {}: upgrade to {}\n", step + 1, release.version);
            let _ = writeln!(w, "```sh\nupshift upgrade --to {}\n```\n", release.version);
            let _ = writeln!(w, "What it does, in order:\n");
            let _ = writeln!(w, "1. Preflight checks, then a backup.");
            let migrations = per_release.iter().find(|m| m.release.version == release.version);
            let describe = |indexes: &[usize]| -> String {
                let migrator = migrator.expect("revisions come from a migrator");
                indexes
                    .iter()
                    .map(|&i| {
                        let r = migrator.graph().revision(i);
                        format!("`{}` {}", r.id, r.name)
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            match migrations {
                Some(m) if !m.expand.is_empty() => {
                    let _ = writeln!(w, "2. Expand migrations (the old code keeps working): {}.", describe(&m.expand));
                }
                _ => {
                    let _ = writeln!(w, "2. No expand migration.");
                }
            }
            let deploys: Vec<String> = manifest
                .components
                .iter()
                .map(|c| format!("`{}` ({}, health-gated)", c.name, c.strategy.as_str()))
                .collect();
            let _ = writeln!(
                w,
                "3. Deploy {}.",
                if deploys.is_empty() { "nothing (no components)".to_owned() } else { deploys.join(", then ") }
            );
            let _ = writeln!(w, "4. Verify: the health of every component, then the smoke commands.");
            match migrations {
                Some(m) if !m.contract.is_empty() => {
                    let _ = writeln!(w, "5. Contract migrations (only after verification): {}.", describe(&m.contract));
                }
                _ => {
                    let _ = writeln!(w, "5. No contract migration.");
                }
            }
            let _ = writeln!(w, "6. Record the release (`upshift history`) and prune old backups.\n");
        }
    }

    fn configuration(&mut self) {
        let range = &self.range;
        let w = &mut self.out;
        let _ = writeln!(w, "## Configuration changes\n");
        let added: Vec<_> = range.iter().flat_map(|r| r.config_added.iter().map(move |c| (r, c))).collect();
        let removed: Vec<_> = range.iter().flat_map(|r| r.config_removed.iter().map(move |c| (r, c))).collect();
        let changed: Vec<_> = range.iter().flat_map(|r| r.config_changed.iter().map(move |c| (r, c))).collect();
        if added.is_empty() && removed.is_empty() && changed.is_empty() {
            let _ = writeln!(w, "None.\n");
        }
        if !added.is_empty() {
            let _ = writeln!(
                w,
                "### New options\n\n| Option | Since | Default | Required | Description |\n| --- | --- | --- | --- | --- |"
            );
            for (release, c) in added {
                let _ = writeln!(
                    w,
                    "| `{}` | {} | {} | {} | {} |",
                    c.name,
                    release.version,
                    c.default.as_deref().map_or_else(|| "-".to_owned(), |d| format!("`{d}`")),
                    if c.required { "yes" } else { "no" },
                    c.doc.as_deref().unwrap_or("-")
                );
            }
            let _ = writeln!(w);
        }
        if !removed.is_empty() {
            let _ = writeln!(w, "### Removed options\n\n| Option | Removed in |\n| --- | --- |");
            for (release, name) in removed {
                let _ = writeln!(w, "| `{name}` | {} |", release.version);
            }
            let _ = writeln!(w);
        }
        if !changed.is_empty() {
            let _ = writeln!(
                w,
                "### Changed defaults\n\n| Option | Since | Old default | New default | Why |\n| --- | --- | --- | --- | --- |"
            );
            for (release, c) in changed {
                let _ = writeln!(
                    w,
                    "| `{}` | {} | `{}` | `{}` | {} |",
                    c.name,
                    release.version,
                    c.from,
                    c.to,
                    c.why.as_deref().unwrap_or("-")
                );
            }
            let _ = writeln!(w);
        }
    }

    fn rollback(&mut self) {
        let w = &mut self.out;
        let _ = writeln!(w, "## Rollback\n");
        let _ =
            writeln!(w, "A failed upgrade undoes itself (exit 3) at the least destructive depth, and says which:\n");
        let _ = writeln!(w, "1. **Code only**: no migration ran; the previous version is started again.");
        let _ = writeln!(
            w,
            "2. **Code + down**: the expand migrations ran and all have down sections; the old code goes back and they are reverted."
        );
        let _ = writeln!(
            w,
            "3. **Restore**: anything else (a contract migration ran, or an expand one cannot be reverted); the backup taken before the upgrade is restored.\n"
        );
        let _ = writeln!(w, "After a successful upgrade, the same rules take a release back:\n");
        let _ = writeln!(
            w,
            "```sh\nupshift rollback                    # to the previous release\nupshift rollback --to-revision N    # to a revision of `upshift history`\nupshift backup list && upshift backup restore ID --force   # by hand, if all else failed\n```\n"
        );
    }

    fn troubleshooting(&mut self) {
        let w = &mut self.out;
        let _ = writeln!(w, "## Troubleshooting\n");
        let _ = writeln!(w, "| Exit code | Meaning | What to do |\n| --- | --- | --- |");
        let _ = writeln!(w, "| 0 | Deployed. | Watch `upshift status`. |");
        let _ = writeln!(
            w,
            "| 1 | Failed before changing anything, or refused (another run holds the lock). | Read the error; nothing needs undoing. |"
        );
        let _ = writeln!(
            w,
            "| 2 | Bad usage, manifest, migration files or configuration; nothing was touched. | Fix what the message names (file:line), then retry. |"
        );
        let _ = writeln!(
            w,
            "| 3 | A step failed and everything was undone. | The message says which step and which undo; fix the cause, retry. |"
        );
        let _ = writeln!(
            w,
            "| 4 | A step failed and the undo failed too; the run is in the journal. | `upshift status`, fix the cause, then `upshift resume` or `upshift abort`. |\n"
        );
        let _ = writeln!(
            w,
            "After a crash or a kill, `upshift status` shows the run in flight: `upshift resume` finishes it, `upshift abort` undoes it.\n"
        );
    }

    fn appendix(&mut self) -> Result<(), upshift_migrate::Error> {
        let migrator = self.migrator;
        let dialect = self.dialect;
        let per_release = &self.per_release;
        let w = &mut self.out;
        let _ = writeln!(w, "## Appendix: migration SQL\n");
        match migrator {
            Some(migrator) if per_release.iter().any(|m| !m.expand.is_empty() || !m.contract.is_empty()) => {
                for m in per_release {
                    for (phase, indexes) in [("expand", &m.expand), ("contract", &m.contract)] {
                        if indexes.is_empty() {
                            continue;
                        }
                        let _ = writeln!(w, "### {} ({phase})\n\n```sql", m.release.version);
                        let sql = migrator.render_sql(indexes, Direction::Up, dialect)?;
                        // Without the bookkeeping table's DDL, which heads every script.
                        let body = sql.split_once("\n\n").map_or(sql.as_str(), |(_, rest)| rest);
                        let _ = writeln!(w, "{body}```\n");
                    }
                }
            }
            _ => {
                let _ = writeln!(w, "No migration in this range.\n");
            }
        }
        Ok(())
    }
}
