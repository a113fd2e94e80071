//! `upshift.toml`: read, checked, and expanded.
//!
//! Every mistake names the file, line and column and says what was expected. Unknown keys
//! are refused. `${VAR}` is read from the environment when the manifest is loaded; an
//! undefined variable is an error, never an empty string.
//!
//! Typed so far: `[app]`, `[database]` and `[backup]`, which the migration and backup
//! commands read. The other tables of PRODUCT.md (`[[components]]`, `[verify]`,
//! `[[releases]]`, `[agent]`) are accepted as tables and typed by the issues that use them.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// A manifest that could not be used.
#[derive(Debug, thiserror::Error)]
pub struct ManifestError {
    /// The manifest file.
    pub path: PathBuf,
    /// 1-based line and column of the mistake, when it has a place.
    pub position: Option<(usize, usize)>,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        write!(f, ": {}", self.message)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    app: Option<RawApp>,
    database: Option<RawDatabase>,
    backup: Option<RawBackup>,
    components: Option<Vec<toml::Table>>,
    verify: Option<toml::Table>,
    releases: Option<Vec<toml::Table>>,
    agent: Option<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    name: String,
    state_dir: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackup {
    dir: Option<String>,
    keep_last: Option<usize>,
    keep_within: Option<Spanned<String>>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    encrypt_to: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: Option<Spanned<String>>,
    migrations: Option<String>,
    min_server: Option<String>,
}

/// A loaded manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The manifest file.
    pub path: PathBuf,
    /// `[app] name`.
    pub app_name: Option<String>,
    /// `[app] state_dir`, relative to the manifest's folder (default `.upshift`).
    pub state_dir: PathBuf,
    /// `[database] url`, with `${VAR}` expanded. Holds secrets: print it only redacted.
    pub database_url: Option<String>,
    /// `[database] migrations`, relative to the manifest's folder (default `migrations`).
    pub migrations_dir: PathBuf,
    /// The manifest's folder: where relative paths start.
    pub base_dir: PathBuf,
    /// `[backup]`.
    pub backup: BackupSettings,
}

/// `[backup]`, paths resolved against the manifest's folder.
#[derive(Debug, Clone, Default)]
pub struct BackupSettings {
    /// `dir` (default `.upshift/backups`).
    pub dir: PathBuf,
    /// `keep_last`.
    pub keep_last: Option<usize>,
    /// `keep_within`, e.g. `7d`.
    pub keep_within: Option<Duration>,
    /// `paths`: files and folders saved beside the database, relative to the manifest.
    pub paths: Vec<PathBuf>,
    /// `encrypt_to`: age recipients.
    pub encrypt_to: Vec<String>,
}

impl Manifest {
    /// Reads and checks the manifest at `path`, expanding `${VAR}` from `env`.
    pub fn load(path: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Manifest, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|e| ManifestError {
            path: path.to_path_buf(),
            position: None,
            message: format!("could not read it: {e}"),
        })?;
        Manifest::parse(path, &text, env)
    }

    /// Checks manifest text read from `path`.
    pub fn parse(path: &Path, text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Manifest, ManifestError> {
        let error = |span: Option<Range<usize>>, message: String| ManifestError {
            path: path.to_path_buf(),
            position: span.map(|s| line_column(text, s.start)),
            message,
        };
        let raw: RawManifest = toml::from_str(text).map_err(|e| error(e.span(), e.message().to_owned()))?;
        // Accepted here and typed by the commands that use them.
        let _ = (&raw.components, &raw.verify, &raw.releases, &raw.agent);
        let base = path.parent().unwrap_or(Path::new(""));
        let (database_url, migrations, _min_server) = match raw.database {
            Some(database) => {
                let url = match database.url {
                    Some(url) => {
                        let span = url.span();
                        Some(expand(url.get_ref(), &env).map_err(|message| error(Some(span), message))?)
                    }
                    None => None,
                };
                (url, database.migrations, database.min_server)
            }
            None => (None, None, None),
        };
        let backup = match raw.backup {
            Some(backup) => BackupSettings {
                dir: base.join(backup.dir.unwrap_or_else(|| ".upshift/backups".into())),
                keep_last: backup.keep_last,
                keep_within: match backup.keep_within {
                    Some(text) => Some(humantime::parse_duration(text.get_ref()).map_err(|e| {
                        error(
                            Some(text.span()),
                            format!("`keep_within`: {e}; expected a duration like \"7d\" or \"12h\""),
                        )
                    })?),
                    None => None,
                },
                paths: backup.paths.iter().map(PathBuf::from).collect(),
                encrypt_to: backup.encrypt_to,
            },
            None => BackupSettings { dir: base.join(".upshift/backups"), ..BackupSettings::default() },
        };
        let app = raw.app;
        Ok(Manifest {
            base_dir: base.to_path_buf(),
            backup,
            path: path.to_path_buf(),
            app_name: app.as_ref().map(|a| a.name.clone()),
            state_dir: base.join(app.and_then(|a| a.state_dir).unwrap_or_else(|| ".upshift".into())),
            database_url,
            migrations_dir: base.join(migrations.unwrap_or_else(|| "migrations".into())),
        })
    }
}

/// Replaces each `${NAME}` in `value` with the variable's value; `$$` is a literal `$`.
pub fn expand(value: &str, env: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('{') {
            let end =
                inner.find('}').ok_or_else(|| format!("`${{` without a closing `}}` in {value:?}; write ${{NAME}}"))?;
            let name = &inner[..end];
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!("`${{{name}}}` is not a variable name; expected letters, digits and _"));
            }
            let found = env(name)
                .ok_or_else(|| format!("environment variable {name} is not set; set it or write the value here"))?;
            out.push_str(&found);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "DATABASE_URL").then(|| "sqlite:app.db".to_owned())
    }

    #[test]
    fn reads_database_settings() {
        let m = Manifest::parse(
            Path::new("deploy/upshift.toml"),
            "[app]\nname = \"notes\"\n[database]\nurl = \"${DATABASE_URL}\"\nmigrations = \"db\"\n",
            env,
        )
        .unwrap();
        assert_eq!(m.database_url.as_deref(), Some("sqlite:app.db"));
        assert_eq!(m.migrations_dir, PathBuf::from("deploy/db"));
        assert_eq!(m.state_dir, PathBuf::from("deploy/.upshift"));
    }

    #[test]
    fn undefined_variable_names_line_and_column() {
        let err = Manifest::parse(Path::new("upshift.toml"), "[database]\nurl = \"${NOPE}\"\n", env).unwrap_err();
        assert_eq!(err.position, Some((2, 7)));
        assert!(err.to_string().starts_with("upshift.toml:2:7: environment variable NOPE is not set"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused_with_their_place() {
        let err = Manifest::parse(Path::new("upshift.toml"), "[database]\nurll = \"x\"\n", env).unwrap_err();
        assert_eq!(err.position.map(|p| p.0), Some(2));
        assert!(err.message.contains("unknown field `urll`"), "{err}");
        assert!(err.message.contains("expected one of"), "{err}");
    }

    #[test]
    fn backup_settings() {
        let m = Manifest::parse(
            Path::new("app/upshift.toml"),
            "[backup]\nkeep_last = 3\nkeep_within = \"7d\"\npaths = [\"config/\"]\n",
            env,
        )
        .unwrap();
        assert_eq!(m.backup.dir, PathBuf::from("app/.upshift/backups"));
        assert_eq!(m.backup.keep_last, Some(3));
        assert_eq!(m.backup.keep_within, Some(Duration::from_hours(7 * 24)));
        assert_eq!(m.backup.paths, [PathBuf::from("config/")]);
        let err = Manifest::parse(Path::new("u.toml"), "[backup]\nkeep_within = \"soon\"\n", env).unwrap_err();
        assert_eq!(err.position, Some((2, 15)));
    }

    #[test]
    fn expansion_rules() {
        assert_eq!(expand("a$$b ${DATABASE_URL} $x", env).unwrap(), "a$b sqlite:app.db $x");
        assert!(expand("${", env).is_err());
        assert!(expand("${A-B}", env).is_err());
    }
}
