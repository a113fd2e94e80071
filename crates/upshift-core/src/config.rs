//! `upshift config check`: the options a release needs, against what is set.
//!
//! Known options are those the releases up to the target declare (`config_added`,
//! `config_changed`), less the ones a release removed (`config_removed`). What is set comes
//! from an env file (`KEY=VALUE` lines) or, for `plan` and `upgrade`, from the environment
//! and the components' `env` tables.

use std::collections::BTreeSet;
use std::path::Path;

use semver::Version;
use serde::Serialize;

use crate::manifest::Manifest;

/// A required option that is not set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Missing {
    /// The option.
    pub name: String,
    /// The release that added it.
    pub added_in: String,
    /// What it does.
    pub doc: Option<String>,
}

/// What a configuration check found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConfigReport {
    /// Required options that are not set: the upgrade cannot run.
    pub missing: Vec<Missing>,
    /// Removed options that are still set: they do nothing any more.
    pub removed: Vec<String>,
    /// Options set that no release up to the target declares (checked for env files only).
    pub unknown: Vec<String>,
}

impl ConfigReport {
    /// Whether the upgrade can run (no required option missing).
    pub fn ok(&self) -> bool {
        self.missing.is_empty()
    }
}

/// A malformed env file.
#[derive(Debug, thiserror::Error)]
#[error("{path}:{line}: {message}")]
pub struct EnvFileError {
    /// The file.
    pub path: String,
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// The option names an env file sets: `KEY=VALUE` lines, `export KEY=VALUE` too; blank
/// lines and `#` comments are skipped.
pub fn read_env_file(path: &Path) -> Result<BTreeSet<String>, EnvFileError> {
    let error = |line: usize, message: String| EnvFileError { path: path.display().to_string(), line, message };
    let text = std::fs::read_to_string(path).map_err(|e| error(0, format!("cannot be read: {e}")))?;
    let mut names = BTreeSet::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((name, _)) = line.split_once('=') else {
            return Err(error(index + 1, format!("expected KEY=VALUE, found `{line}`")));
        };
        let name = name.trim();
        if name.is_empty()
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            || name.starts_with(|c: char| c.is_ascii_digit())
        {
            return Err(error(index + 1, format!("`{name}` is not a variable name; expected letters, digits and _")));
        }
        names.insert(name.to_owned());
    }
    Ok(names)
}

/// The options set for `plan` and `upgrade`: the environment and every component's `env`.
pub fn options_set(manifest: &Manifest) -> BTreeSet<String> {
    std::env::vars()
        .map(|(name, _)| name)
        .chain(manifest.components.iter().filter_map(|c| c.process()).flat_map(|p| p.env.keys().cloned()))
        .collect()
}

/// Checks `set` against the releases up to `to`. Unknown options are reported only when
/// `report_unknown` (an env file, where every line is meant as application config).
pub fn check(manifest: &Manifest, to: &Version, set: &BTreeSet<String>, report_unknown: bool) -> ConfigReport {
    let releases: Vec<_> = manifest.releases.iter().filter(|r| &r.version <= to).collect();
    let removed: BTreeSet<&str> = releases.iter().flat_map(|r| r.config_removed.iter().map(String::as_str)).collect();
    let mut known: BTreeSet<&str> = BTreeSet::new();
    let mut report = ConfigReport::default();
    for release in &releases {
        for added in &release.config_added {
            known.insert(&added.name);
            if added.required && !removed.contains(added.name.as_str()) && !set.contains(&added.name) {
                report.missing.push(Missing {
                    name: added.name.clone(),
                    added_in: release.version.to_string(),
                    doc: added.doc.clone(),
                });
            }
        }
        known.extend(release.config_changed.iter().map(|c| c.name.as_str()));
    }
    report.removed = removed.iter().filter(|name| set.contains(**name)).map(|name| (*name).to_owned()).collect();
    if report_unknown {
        report.unknown = set
            .iter()
            .filter(|name| !known.contains(name.as_str()) && !removed.contains(name.as_str()))
            .cloned()
            .collect();
    }
    report
}
