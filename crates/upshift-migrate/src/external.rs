//! Migration tools other than upshift's own files: Alembic, or any tool with `list`,
//! `current`, `up` and `down` commands. upshift drives them through their commands, one
//! revision at a time, so the [`crate::Migrator`]'s plans, checks and undo rules work
//! unchanged, and a run journals each revision as it is applied.
//!
//! - The revisions: `alembic history --verbose` (ids, parents, branch names, files), or the
//!   tool's `list` command (ids oldest first: a line).
//! - Their phase: contract when the id, or one of its Alembic branch names, is in the
//!   manifest's `contract` list; else expand.
//! - What is applied: Alembic's `alembic_version` table (its heads), or the `current`
//!   command; every ancestor of a head is applied.
//! - Up: `alembic upgrade REV`, or `up` with `{revision}`. Down: `alembic downgrade REV@-1`
//!   (REV alone, on its branch), or `down` with `{revision}` and `{parent}`.
//!
//! The tool gets the database's URL as `DATABASE_URL` (and `UPSHIFT_DATABASE_URL`): its
//! configuration (Alembic's `env.py`) reads it from there. On PostgreSQL a run holds the
//! same advisory lock as upshift's own migrations.

use std::collections::{BTreeSet, HashMap};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::engine::{AppliedRevision, Direction, Engine, PostgresEngine, Step};
use crate::error::Error;
use crate::lexer::Dialect;
use crate::source::{Origin, Phase, Revision, Section};
use crate::url::DatabaseUrl;

/// A migration tool upshift drives through its commands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tool {
    /// An Alembic project.
    Alembic {
        /// The project's `alembic.ini`; Alembic runs in its folder.
        config: PathBuf,
        /// How to run Alembic (`["alembic"]`, a virtualenv's, `docker compose run ...`).
        command: Vec<String>,
    },
    /// Any tool, through four commands run in `dir`.
    Commands {
        /// Where the commands run.
        dir: PathBuf,
        /// Prints the revision ids, oldest first, one a line (a name may follow the id).
        list: Vec<String>,
        /// Prints the applied revision, or nothing when none is.
        current: Vec<String>,
        /// Applies revisions up to `{revision}`.
        up: Vec<String>,
        /// Reverts `{revision}`, leaving `{parent}` (or `base`) applied.
        down: Vec<String>,
    },
}

/// An external migration tool and the revisions that run in the contract step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct External {
    /// The tool.
    pub tool: Tool,
    /// Revision ids, or Alembic branch labels, whose revisions are contract.
    pub contract: Vec<String>,
}

impl External {
    /// The tool's name, for messages.
    pub fn name(&self) -> &'static str {
        match self.tool {
            Tool::Alembic { .. } => "Alembic",
            Tool::Commands { .. } => "the migration commands",
        }
    }

    /// Where the tool's revisions live, for messages.
    pub(crate) fn dir(&self) -> PathBuf {
        match &self.tool {
            Tool::Alembic { config, .. } => config.clone(),
            Tool::Commands { dir, .. } => dir.clone(),
        }
    }

    /// Asks the tool for its revisions, as upshift revisions without SQL.
    pub(crate) fn revisions(&self) -> Result<Vec<Revision>, Error> {
        let listed = match &self.tool {
            Tool::Alembic { config, command } => {
                let mut argv = command.clone();
                argv.extend(["-c".to_owned(), config_name(config), "history".to_owned(), "--verbose".to_owned()]);
                let output = read(&argv, &folder(config), None)
                    .map_err(|message| Error::Listing { command: argv.join(" "), message })?;
                parse_alembic_history(&output, &folder(config))
            }
            Tool::Commands { dir, list, .. } => {
                let output =
                    read(list, dir, None).map_err(|message| Error::Listing { command: list.join(" "), message })?;
                parse_list(&output, dir)
            }
        };
        if listed.is_empty() {
            return Err(Error::Listing {
                command: self.name().to_owned(),
                message: "it lists no revision; check its configuration".to_owned(),
            });
        }
        let contract = |r: &Listed| self.contract.iter().any(|c| *c == r.id || r.branches.contains(c));
        Ok(listed
            .iter()
            .map(|r| {
                let section = Section { sql: String::new(), path: r.path.clone(), first_line: 1 };
                Revision {
                    id: r.id.clone(),
                    name: r.name.clone(),
                    path: r.path.clone(),
                    declared_parents: Some(r.parents.clone()),
                    phase: if contract(r) { Phase::Contract } else { Phase::Expand },
                    phase_declared: true,
                    no_transaction: false,
                    down_no_transaction: false,
                    up: section.clone(),
                    down: Some(section),
                    checksum: String::new(),
                    allows: Vec::new(),
                    origin: Origin::Tool,
                }
            })
            .collect())
    }
}

/// A revision as the tool lists it.
#[derive(Debug, PartialEq, Eq)]
struct Listed {
    id: String,
    name: String,
    parents: Vec<String>,
    branches: Vec<String>,
    path: PathBuf,
}

fn folder(config: &Path) -> PathBuf {
    config.parent().filter(|p| !p.as_os_str().is_empty()).map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn config_name(config: &Path) -> String {
    config.file_name().map_or_else(|| "alembic.ini".to_owned(), |n| n.to_string_lossy().into_owned())
}

/// Reads `alembic history --verbose`: blocks of `Rev: ID (flags)`, `Parent: ID|<base>` or
/// `Merges: A, B`, `Branch names: ...`, `Path: ...`, then the indented message.
fn parse_alembic_history(text: &str, dir: &Path) -> Vec<Listed> {
    let mut listed: Vec<Listed> = Vec::new();
    let list = |rest: &str| rest.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Rev: ") {
            let id = rest.split_whitespace().next().unwrap_or_default().to_owned();
            listed.push(Listed {
                id,
                name: String::new(),
                parents: Vec::new(),
                branches: Vec::new(),
                path: dir.into(),
            });
            continue;
        }
        let Some(current) = listed.last_mut() else { continue };
        if let Some(rest) = line.strip_prefix("Parent: ") {
            current.parents = if rest.trim() == "<base>" { Vec::new() } else { list(rest) };
        } else if let Some(rest) = line.strip_prefix("Merges: ") {
            current.parents = list(rest);
        } else if let Some(rest) = line.strip_prefix("Branch names: ") {
            current.branches = list(rest);
        } else if let Some(rest) = line.strip_prefix("Path: ") {
            current.path = PathBuf::from(rest.trim());
        } else if current.name.is_empty() && line.starts_with("    ") && !line.trim().is_empty() {
            line.trim().clone_into(&mut current.name);
        }
    }
    // History is newest first; upshift lists oldest first.
    listed.reverse();
    listed
}

/// Reads a `list` command's output: an id (and a name) a line, oldest first, each following
/// the one before it.
fn parse_list(text: &str, dir: &Path) -> Vec<Listed> {
    let mut listed: Vec<Listed> = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (id, name) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let parents = listed.last().map(|previous| vec![previous.id.clone()]).unwrap_or_default();
        listed.push(Listed {
            id: id.to_owned(),
            name: name.trim().to_owned(),
            parents,
            branches: Vec::new(),
            path: dir.to_path_buf(),
        });
    }
    listed
}

/// `argv` as a command that runs in `dir`, with the database's URL in its environment.
fn command(argv: &[String], dir: &Path, database: Option<&str>) -> Result<Command, String> {
    let (program, rest) = argv.split_first().ok_or("the command is empty")?;
    // `./tool` means the one in `dir` (the manifest's folder), wherever upshift runs.
    let path = if program.contains('/') { dir.join(program) } else { PathBuf::from(program) };
    let mut command = Command::new(path);
    command.args(rest).current_dir(dir).stdin(std::process::Stdio::null());
    if let Some(url) = database {
        command.env("DATABASE_URL", url).env("UPSHIFT_DATABASE_URL", url);
    }
    Ok(command)
}

fn could_not_run(argv: &[String], dir: &Path, e: &std::io::Error) -> String {
    format!("could not run `{}` in {}: {e}", argv[0], dir.display())
}

/// Runs a command that answers a question (`history`, `list`, `current`): what it printed
/// on stdout; its stderr is for people, and shown when it fails.
fn read(argv: &[String], dir: &Path, database: Option<&str>) -> Result<String, String> {
    let output = command(argv, dir, database)?.output().map_err(|e| could_not_run(argv, dir, &e))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!("{}; its output ends:\n{}", output.status, tail(&String::from_utf8_lossy(&output.stderr))))
    }
}

/// Runs a command that does something (`upgrade`, `downgrade`, `up`, `down`): what it
/// printed (stdout and stderr, in order), or why it failed.
fn run(argv: &[String], dir: &Path, database: Option<&str>) -> Result<String, String> {
    let program = argv.first().ok_or("the command is empty")?;
    let mut command = command(argv, dir, database)?;
    let (mut reader, writer) = std::io::pipe().map_err(|e| format!("could not make a pipe: {e}"))?;
    let stderr = writer.try_clone().map_err(|e| format!("could not make a pipe: {e}"))?;
    command.stdout(writer).stderr(stderr);
    let mut child = command.spawn().map_err(|e| could_not_run(argv, dir, &e))?;
    // The command holds the pipe's writing ends: drop them, or the read never ends.
    drop(command);
    let mut bytes = Vec::new();
    let drained = reader.read_to_end(&mut bytes);
    let status = child.wait().map_err(|e| format!("could not wait for `{program}`: {e}"))?;
    drained.map_err(|e| format!("could not read the output of `{program}`: {e}"))?;
    let output = String::from_utf8_lossy(&bytes).into_owned();
    if status.success() { Ok(output) } else { Err(format!("{status}; its output ends:\n{}", tail(&output))) }
}

/// The last lines of a command's output: where a failure says why.
fn tail(output: &str) -> String {
    let lines: Vec<&str> = output.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A database migrated by an external tool.
pub struct ExternalEngine {
    external: External,
    url: DatabaseUrl,
    /// Each revision's parents, to turn the tool's heads into the applied set.
    parents: HashMap<String, Vec<String>>,
    phases: HashMap<String, Phase>,
    /// PostgreSQL: the connection that holds the advisory lock and reads `alembic_version`.
    postgres: Option<PostgresEngine>,
    output: Vec<String>,
}

impl ExternalEngine {
    /// Connects to the database the tool migrates; `revisions` are the tool's.
    pub(crate) fn connect(external: &External, url: &DatabaseUrl, revisions: &[Revision]) -> Result<Self, Error> {
        let postgres = match url {
            DatabaseUrl::Postgres { config, redacted, .. } => Some(PostgresEngine::connect(config, redacted)?),
            DatabaseUrl::Sqlite { .. } => None,
        };
        Ok(ExternalEngine {
            external: external.clone(),
            url: url.clone(),
            parents: revisions.iter().map(|r| (r.id.clone(), r.declared_parents.clone().unwrap_or_default())).collect(),
            phases: revisions.iter().map(|r| (r.id.clone(), r.phase)).collect(),
            postgres,
            output: Vec::new(),
        })
    }

    /// The revisions the tool says are applied last (Alembic: one per branch).
    fn heads(&mut self) -> Result<Vec<String>, Error> {
        match &self.external.tool {
            Tool::Alembic { .. } => self.alembic_version(),
            Tool::Commands { dir, current, .. } => {
                let output = read(current, dir, Some(&self.url.secret_text()))
                    .map_err(|message| Error::Listing { command: current.join(" "), message })?;
                Ok(output.split_whitespace().take(1).map(str::to_owned).collect())
            }
        }
    }

    /// Alembic's `alembic_version` rows; none when the table does not exist yet.
    fn alembic_version(&mut self) -> Result<Vec<String>, Error> {
        let read = |what: &str, e: &dyn std::fmt::Display| Error::Database {
            action: format!("read alembic_version ({what})"),
            source: e.to_string().into(),
        };
        match (&mut self.postgres, &self.url) {
            (Some(postgres), _) => {
                let client = postgres.client();
                let exists: bool = client
                    .query_one("SELECT to_regclass('alembic_version') IS NOT NULL", &[])
                    .map_err(|e| read("look for the table", &e))?
                    .get(0);
                if !exists {
                    return Ok(Vec::new());
                }
                let rows =
                    client.query("SELECT version_num FROM alembic_version", &[]).map_err(|e| read("query", &e))?;
                Ok(rows.iter().map(|row| row.get(0)).collect())
            }
            (None, DatabaseUrl::Sqlite { path }) => {
                if !path.exists() {
                    return Ok(Vec::new());
                }
                let connection =
                    rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                        .map_err(|e| read("open", &e))?;
                let exists: bool = connection
                    .query_row(
                        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'",
                        [],
                        |row| row.get(0),
                    )
                    .map_err(|e| read("look for the table", &e))?;
                if !exists {
                    return Ok(Vec::new());
                }
                let mut statement =
                    connection.prepare("SELECT version_num FROM alembic_version").map_err(|e| read("query", &e))?;
                let heads = statement
                    .query_map([], |row| row.get(0))
                    .and_then(Iterator::collect)
                    .map_err(|e| read("query", &e))?;
                Ok(heads)
            }
            (None, DatabaseUrl::Postgres { .. }) => unreachable!("a PostgreSQL URL has a connection"),
        }
    }

    /// The command that moves one revision.
    fn argv(&self, step: &Step<'_>) -> (Vec<String>, PathBuf) {
        let id = &step.revision.id;
        match &self.external.tool {
            Tool::Alembic { config, command } => {
                let mut argv = command.clone();
                argv.extend(["-c".to_owned(), config_name(config)]);
                match step.direction {
                    Direction::Up => argv.extend(["upgrade".to_owned(), id.clone()]),
                    // `REV@-1`: one step down on REV's own branch; a plain parent would take
                    // every branch that shares it down too.
                    Direction::Down => argv.extend(["downgrade".to_owned(), format!("{id}@-1")]),
                }
                (argv, folder(config))
            }
            Tool::Commands { dir, up, down, .. } => {
                let parent = self.parents.get(id).and_then(|p| p.first()).map_or("base", String::as_str);
                let template = if step.direction == Direction::Up { up } else { down };
                let argv = template.iter().map(|a| a.replace("{revision}", id).replace("{parent}", parent)).collect();
                (argv, dir.clone())
            }
        }
    }
}

impl Engine for ExternalEngine {
    fn dialect(&self) -> Dialect {
        self.url.dialect()
    }

    fn server_version(&mut self) -> Result<String, Error> {
        match &mut self.postgres {
            Some(postgres) => postgres.server_version(),
            None => Ok(format!("SQLite {}", rusqlite::version())),
        }
    }

    fn applied(&mut self) -> Result<Vec<AppliedRevision>, Error> {
        let mut applied = BTreeSet::new();
        let mut unseen = self.heads()?;
        while let Some(id) = unseen.pop() {
            if applied.insert(id.clone()) {
                unseen.extend(self.parents.get(&id).into_iter().flatten().cloned());
            }
        }
        Ok(applied
            .into_iter()
            .map(|id| AppliedRevision {
                phase: self.phases.get(&id).copied().unwrap_or(Phase::Expand).as_str().to_owned(),
                id,
                checksum: String::new(),
                applied_at: String::new(),
                duration_ms: 0,
            })
            .collect())
    }

    fn lock(&mut self, timeout: Duration) -> Result<(), Error> {
        // SQLite: the tool takes SQLite's write lock itself, for each of its transactions.
        match &mut self.postgres {
            Some(postgres) => postgres.advisory_lock(timeout),
            None => Ok(()),
        }
    }

    fn unlock(&mut self) -> Result<(), Error> {
        match &mut self.postgres {
            Some(postgres) => postgres.unlock(),
            None => Ok(()),
        }
    }

    fn execute(&mut self, step: &Step<'_>) -> Result<Duration, Error> {
        let (argv, dir) = self.argv(step);
        let shown = argv.join(" ");
        let started = Instant::now();
        self.output.push(format!("$ {shown}"));
        match run(&argv, &dir, Some(&self.url.secret_text())) {
            Ok(output) => {
                self.output.extend(output.lines().map(str::to_owned));
                Ok(started.elapsed())
            }
            Err(message) => {
                Err(Error::Command { id: step.revision.id.clone(), command: shown, message: self.url.redact(&message) })
            }
        }
    }

    fn take_output(&mut self) -> Vec<String> {
        std::mem::take(&mut self.output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HISTORY: &str = "Rev: m1 (head) (mergepoint)
Merges: e2, c1
Branch names: contract, expand
Path: /p/versions/m1_join.py

    join

    Revision ID: m1
    Revises: e2, c1

Rev: c1
Parent: a1
Branch names: contract
Path: /p/versions/c1_contract_title.py

    contract title

Rev: e2
Parent: e1
Branch names: expand
Path: /p/versions/e2_expand_two.py

    expand two

Rev: e1
Parent: a1
Branch names: expand
Path: /p/versions/e1_expand_tags.py

    expand tags

Rev: a1 (branchpoint)
Parent: <base>
Branches into: e1, c1
Path: /p/versions/a1_create_notes.py

    create notes
";

    #[test]
    fn alembic_history_is_read_oldest_first_with_parents_and_branches() {
        let listed = parse_alembic_history(HISTORY, Path::new("/p"));
        let summary: Vec<(&str, &str, Vec<&str>, Vec<&str>)> = listed
            .iter()
            .map(|l| {
                (
                    l.id.as_str(),
                    l.name.as_str(),
                    l.parents.iter().map(String::as_str).collect(),
                    l.branches.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("a1", "create notes", vec![], vec![]),
                ("e1", "expand tags", vec!["a1"], vec!["expand"]),
                ("e2", "expand two", vec!["e1"], vec!["expand"]),
                ("c1", "contract title", vec!["a1"], vec!["contract"]),
                ("m1", "join", vec!["e2", "c1"], vec!["contract", "expand"]),
            ]
        );
        assert_eq!(listed[0].path, Path::new("/p/versions/a1_create_notes.py"));
    }

    #[test]
    fn phases_come_from_branch_labels_or_ids() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("history");
        std::fs::write(&script, format!("cat <<'EOF'\n{HISTORY}EOF\n")).unwrap();
        let tool = |contract: &[&str]| External {
            tool: Tool::Alembic {
                config: dir.path().join("alembic.ini"),
                command: vec!["sh".into(), script.display().to_string()],
            },
            contract: contract.iter().map(|s| (*s).to_owned()).collect(),
        };
        let phases = |external: External| -> Vec<(String, Phase)> {
            external.revisions().unwrap().into_iter().map(|r| (r.id, r.phase)).collect()
        };
        let by_label = phases(tool(&["contract"]));
        let contract: Vec<&str> =
            by_label.iter().filter(|(_, p)| *p == Phase::Contract).map(|(id, _)| id.as_str()).collect();
        assert_eq!(contract, ["c1", "m1"]);
        let by_id = phases(tool(&["e2"]));
        assert_eq!(by_id.iter().filter(|(_, p)| *p == Phase::Contract).count(), 1);
    }

    #[test]
    fn a_list_command_is_a_line_of_revisions() {
        let listed = parse_list("\n001 create notes\n002\n  003 drop title  \n", Path::new("."));
        let parents: Vec<(&str, &str, Vec<&str>)> = listed
            .iter()
            .map(|l| (l.id.as_str(), l.name.as_str(), l.parents.iter().map(String::as_str).collect()))
            .collect();
        assert_eq!(
            parents,
            [("001", "create notes", vec![]), ("002", "", vec!["001"]), ("003", "drop title", vec!["002"])]
        );
    }

    #[test]
    fn commands_report_their_output_and_failures() {
        let dir = tempfile::tempdir().unwrap();
        let sh = |script: &str| vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()];
        let output =
            run(&sh("echo out; echo err >&2; echo \"$DATABASE_URL\""), dir.path(), Some("sqlite:x.db")).unwrap();
        assert_eq!(output, "out\nerr\nsqlite:x.db\n");
        let failed = run(&sh("echo why; exit 3"), dir.path(), None).unwrap_err();
        assert!(failed.contains("exit status: 3") && failed.ends_with("why"), "{failed}");
        let missing = run(&["no-such-program-here".to_owned()], dir.path(), None).unwrap_err();
        assert!(missing.contains("could not run `no-such-program-here`"), "{missing}");
        // A question's answer is stdout alone; its stderr says why when it fails.
        assert_eq!(read(&sh("echo a1; echo NOTICE: noise >&2"), dir.path(), None).unwrap(), "a1\n");
        let failed = read(&sh("echo no; echo because >&2; exit 1"), dir.path(), None).unwrap_err();
        assert!(failed.ends_with("because") && !failed.contains("no\n"), "{failed}");
    }
}
