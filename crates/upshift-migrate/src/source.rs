//! Reads a migrations folder into [`Revision`]s.
//!
//! Three layouts are read as they are:
//! - upshift files `<id>_<slug>.sql` with `-- upshift:` directives (`parents`, `phase`,
//!   `no-transaction`, `up`, `down`);
//! - dbmate files with `-- migrate:up` / `-- migrate:down` markers (and dbmate's
//!   `transaction:false` option);
//! - golang-migrate / sqlx pairs `<id>_<slug>.up.sql` + `<id>_<slug>.down.sql` (sqlx's
//!   `-- no-transaction` first line is honoured).
//!
//! A byte-order mark is dropped and CRLF line ends are read as LF before anything else, so
//! a file's checksum does not change when an editor or a checkout converts line ends.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::Error;

/// Whether a revision keeps the previous application version working.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Backward compatible: runs before the new code is deployed.
    Expand,
    /// Removes what the old code needs: runs only after the new code is verified.
    Contract,
}

impl Phase {
    /// The name used in files, the database and output.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Expand => "expand",
            Phase::Contract => "contract",
        }
    }

    /// Reads `expand` or `contract`.
    pub fn parse(text: &str) -> Option<Phase> {
        match text {
            "expand" => Some(Phase::Expand),
            "contract" => Some(Phase::Contract),
            _ => None,
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The SQL of one direction of a revision, with where it sits in its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    /// The SQL text (LF line ends).
    pub sql: String,
    /// The file the section comes from.
    pub path: PathBuf,
    /// 1-based line in that file where `sql` starts.
    pub first_line: usize,
}

/// One revision as read from the migrations folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revision {
    /// Everything before the first `_` of the file name.
    pub id: String,
    /// The slug after the id, for people.
    pub name: String,
    /// The file, or the `.up.sql` file of a pair.
    pub path: PathBuf,
    /// Parents named by a `parents` directive; `None` means "the previous file in id
    /// order", resolved by the graph.
    pub declared_parents: Option<Vec<String>>,
    /// The phase, `expand` when not declared.
    pub phase: Phase,
    /// Whether the file declared its phase (the linter checks undeclared ones).
    pub phase_declared: bool,
    /// Run outside a transaction (for `CREATE INDEX CONCURRENTLY` and the like), both ways.
    pub no_transaction: bool,
    /// The down section alone runs outside a transaction: a `.down.sql` file that says
    /// `-- no-transaction` on its first line (sqlx) or `-- upshift:no-transaction`, or
    /// dbmate's `-- migrate:down transaction:false`.
    pub down_no_transaction: bool,
    /// The `up` section.
    pub up: Section,
    /// The `down` section, when the revision has one.
    pub down: Option<Section>,
    /// Hex sha256 of the `up` section.
    pub checksum: String,
    /// The `-- upshift:allow` lines of the header and the up section, for the linter.
    pub allows: Vec<AllowLine>,
    /// Who runs it: upshift (its SQL sections), or an external tool.
    pub origin: Origin,
}

/// Who runs a revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// upshift, from the SQL of its file.
    Files,
    /// An external tool (Alembic's revisions): no SQL here, the tool runs it both ways.
    Tool,
}

/// A `-- upshift:allow RULE reason` line: the linter accepts a finding of RULE there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowLine {
    /// 1-based line in the file of the up section.
    pub line: usize,
    /// What follows `upshift:allow`, trimmed: the rule, then the reason.
    pub text: String,
}

impl Revision {
    /// Whether `down` can undo it: a down section that holds SQL, or nothing to undo. An
    /// empty down (or one of comments only) under an up that does something is no undo at
    /// all: "reverting" by it would only drop the bookkeeping row and break the next `up`.
    pub fn reversible(&self) -> bool {
        let has_sql = |sql: &str| {
            crate::lexer::split(sql, crate::lexer::Dialect::Postgres)
                .map_or(true, |pieces| pieces.iter().any(|p| !p.is_empty()))
        };
        // A revision whose up does nothing (a merge) has nothing to undo; an external tool
        // has a way down for each of its revisions.
        self.origin == Origin::Tool
            || self.down.as_ref().is_some_and(|down| has_sql(&down.sql))
            || !has_sql(&self.up.sql)
    }
}

/// Reads every revision in `dir`, sorted by id.
pub fn read_dir(dir: &Path) -> Result<Vec<Revision>, Error> {
    let entries = fs::read_dir(dir).map_err(|source| Error::Io {
        action: "read the migrations folder",
        path: dir.to_path_buf(),
        source,
    })?;
    let mut singles = Vec::new();
    let mut diesel = Vec::new();
    let mut singles_done: Vec<Revision> = Vec::new();
    let mut pairs: BTreeMap<String, (Option<PathBuf>, Option<PathBuf>)> = BTreeMap::new();
    for entry in entries {
        let entry = entry.map_err(|source| Error::Io {
            action: "read the migrations folder",
            path: dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        let Some(file_name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        if file_name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            // diesel: `<version>_<name>/up.sql` (+ `down.sql`, `metadata.toml`).
            if path.join("up.sql").is_file() {
                diesel.push((file_name, path));
                continue;
            }
            return Err(unknown_layout(dir, &path));
        }
        if let Some(stem) = file_name.strip_suffix(".up.sql") {
            pairs.entry(stem.to_owned()).or_default().0 = Some(path);
        } else if let Some(stem) = file_name.strip_suffix(".down.sql") {
            pairs.entry(stem.to_owned()).or_default().1 = Some(path);
        } else if let Some(stem) = file_name.strip_suffix(".sql") {
            singles.push((stem.to_owned(), path));
        } else if !is_documentation(&file_name) {
            return Err(unknown_layout(dir, &path));
        }
    }
    for (stem, folder) in diesel {
        let up = folder.join("up.sql");
        let down = Some(folder.join("down.sql")).filter(|p| p.is_file());
        let up_text = read_text(&up)?;
        let down_text = down.as_ref().map(|p| read_text(p)).transpose()?;
        let mut revision = parse_pair(&stem, &up, &up_text, down.as_deref(), down_text.as_deref())?;
        // diesel's own switch: `run_in_transaction = false` in metadata.toml.
        let metadata = folder.join("metadata.toml");
        if metadata.is_file()
            && read_text(&metadata)?.lines().any(|l| {
                l.split_once('=').is_some_and(|(k, v)| k.trim() == "run_in_transaction" && v.trim() == "false")
            })
        {
            revision.no_transaction = true;
        }
        singles_done.push(revision);
    }

    let mut revisions = singles_done;
    for (stem, path) in singles {
        let text = read_text(&path)?;
        revisions.push(parse_single(&stem, &path, &text)?);
    }
    for (stem, (up, down)) in pairs {
        let Some(up) = up else {
            let down = down.expect("a pair has at least one file");
            return Err(Error::File {
                path: down,
                line: None,
                message: format!("has no matching `{stem}.up.sql`; add it or remove this file"),
            });
        };
        let up_text = read_text(&up)?;
        let down_text = down.as_ref().map(|p| read_text(p)).transpose()?;
        revisions.push(parse_pair(&stem, &up, &up_text, down.as_deref(), down_text.as_deref())?);
    }
    revisions.sort_by(|a, b| compare_ids(&a.id, &b.id));
    Ok(revisions)
}

/// Files a migrations folder may hold beside its migrations.
fn is_documentation(name: &str) -> bool {
    name.to_ascii_lowercase().starts_with("readme")
        || Path::new(name).extension().is_some_and(|e| e.eq_ignore_ascii_case("md") || e.eq_ignore_ascii_case("txt"))
}

/// A folder holding something upshift does not read: refused, naming what it looks like,
/// never read as an empty folder.
fn unknown_layout(dir: &Path, found: &Path) -> Error {
    let name = found.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let alembic = found.extension().is_some_and(|e| e == "py")
        || name == "alembic.ini"
        || dir.join("env.py").is_file()
        || (found.is_dir()
            && fs::read_dir(found).is_ok_and(|d| d.flatten().any(|e| e.path().extension().is_some_and(|x| x == "py"))));
    let looks_like = if alembic {
        "an Alembic project (env.py, versions/*.py): upshift cannot run Alembic migrations yet".to_owned()
    } else {
        format!("`{name}`, which is not a migration upshift reads")
    };
    Error::File {
        path: found.to_path_buf(),
        line: None,
        message: format!(
            "the migrations folder {} holds {looks_like}; upshift reads <id>_<slug>.sql files (upshift, dbmate), <id>_<slug>.up.sql/.down.sql pairs (golang-migrate, sqlx) and diesel <version>_<name>/up.sql folders; point --dir (or [database] migrations) at such a folder",
            dir.display()
        ),
    }
}

/// Orders ids the way people number files: all-digit ids by value (so `2` < `10`), any
/// others as text.
pub fn compare_ids(a: &str, b: &str) -> std::cmp::Ordering {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if digits(a) && digits(b) {
        let a_trim = a.trim_start_matches('0');
        let b_trim = b.trim_start_matches('0');
        a_trim.len().cmp(&b_trim.len()).then_with(|| a_trim.cmp(b_trim)).then_with(|| a.cmp(b))
    } else {
        a.cmp(b)
    }
}

/// Hex sha256 of an `up` section: what `upshift_migrations.checksum` stores.
pub fn checksum(sql: &str) -> String {
    let digest = Sha256::digest(sql.as_bytes());
    digest.iter().fold(String::with_capacity(64), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    })
}

fn read_text(path: &Path) -> Result<String, Error> {
    let bytes = fs::read(path).map_err(|source| Error::Io { action: "read", path: path.to_path_buf(), source })?;
    let text = String::from_utf8(bytes).map_err(|e| Error::File {
        path: path.to_path_buf(),
        line: None,
        message: format!("is not UTF-8 (invalid byte at offset {})", e.utf8_error().valid_up_to()),
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    Ok(text.replace("\r\n", "\n"))
}

fn split_stem(stem: &str) -> (String, String) {
    match stem.split_once('_') {
        Some((id, name)) => (id.to_owned(), name.to_owned()),
        None => (stem.to_owned(), String::new()),
    }
}

/// What a directive line says.
enum Directive {
    Parents(Vec<String>),
    Phase(Phase),
    NoTransaction,
    Up { no_transaction: bool },
    Down { no_transaction: bool },
    Allow(AllowLine),
}

/// Reads a `-- upshift:` or `-- migrate:` line; `Ok(None)` for any other line.
fn directive(path: &Path, line_no: usize, line: &str) -> Result<Option<Directive>, Error> {
    let Some(comment) = line.trim().strip_prefix("--") else {
        return Ok(None);
    };
    let comment = comment.trim();
    let bad = |message: String| Error::File { path: path.to_path_buf(), line: Some(line_no), message };
    if let Some(rest) = comment.strip_prefix("upshift:") {
        let (name, args) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        let args: Vec<&str> = args.split_whitespace().collect();
        return match name {
            "parents" => Ok(Some(Directive::Parents(args.iter().map(|s| (*s).to_owned()).collect()))),
            "phase" => match args.as_slice() {
                [value] => Phase::parse(value)
                    .map(|p| Some(Directive::Phase(p)))
                    .ok_or_else(|| bad(format!("unknown phase `{value}`: expected `expand` or `contract`"))),
                _ => Err(bad("`upshift:phase` takes one value: `expand` or `contract`".into())),
            },
            "no-transaction" => Ok(Some(Directive::NoTransaction)),
            "up" => Ok(Some(Directive::Up { no_transaction: false })),
            "down" => Ok(Some(Directive::Down { no_transaction: false })),
            "allow" => {
                Ok(Some(Directive::Allow(AllowLine { line: line_no, text: rest["allow".len()..].trim().to_owned() })))
            }
            other => Err(bad(format!(
                "unknown directive `upshift:{other}`: expected one of parents, phase, no-transaction, up, down, allow"
            ))),
        };
    }
    if let Some(rest) = comment.strip_prefix("migrate:") {
        let mut words = rest.split_whitespace();
        let name = words.next().unwrap_or("");
        let no_transaction = words.any(|w| w == "transaction:false");
        return match name {
            "up" => Ok(Some(Directive::Up { no_transaction })),
            "down" => Ok(Some(Directive::Down { no_transaction })),
            other => {
                Err(bad(format!("unknown dbmate marker `migrate:{other}`: expected `migrate:up` or `migrate:down`")))
            }
        };
    }
    Ok(None)
}

fn is_allow(line: &str) -> bool {
    line.trim().strip_prefix("--").is_some_and(|comment| {
        comment
            .trim()
            .strip_prefix("upshift:allow")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
    })
}

#[derive(Default)]
struct Header {
    parents: Option<Vec<String>>,
    phase: Option<Phase>,
    no_transaction: bool,
    down_no_transaction: bool,
    allows: Vec<AllowLine>,
}

impl Header {
    fn apply(&mut self, directive: Directive) {
        match directive {
            Directive::Parents(parents) => self.parents = Some(parents),
            Directive::Phase(phase) => self.phase = Some(phase),
            Directive::NoTransaction => self.no_transaction = true,
            Directive::Up { no_transaction } => self.no_transaction |= no_transaction,
            Directive::Allow(allow) => self.allows.push(allow),
            Directive::Down { no_transaction } => self.down_no_transaction |= no_transaction,
        }
    }
}

fn parse_single(stem: &str, path: &Path, text: &str) -> Result<Revision, Error> {
    let (id, name) = split_stem(stem);
    let mut header = Header::default();
    // Byte ranges of the sections, with their first lines.
    let mut up: Option<(usize, usize)> = None;
    let mut down: Option<(usize, usize)> = None;
    let mut up_end: Option<usize> = None;
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let line_no = index + 1;
        let next = offset + line.len();
        if let Some(d) = directive(path, line_no, line)? {
            let dup = |what: &str| Error::File {
                path: path.to_path_buf(),
                line: Some(line_no),
                message: format!("has a second `{what}` marker; a file holds one up and one down section"),
            };
            match d {
                Directive::Up { .. } => {
                    if up.is_some() {
                        return Err(dup("up"));
                    }
                    if down.is_some() {
                        return Err(Error::File {
                            path: path.to_path_buf(),
                            line: Some(line_no),
                            message: "puts `up` after `down`; write the up section first".into(),
                        });
                    }
                    up = Some((next, line_no + 1));
                }
                Directive::Down { .. } => {
                    if down.is_some() {
                        return Err(dup("down"));
                    }
                    up_end = Some(offset);
                    down = Some((next, line_no + 1));
                }
                Directive::Allow(_) if down.is_some() => {
                    return Err(Error::File {
                        path: path.to_path_buf(),
                        line: Some(line_no),
                        message: "has `upshift:allow` in the down section, which the linter does not read; put it before the up statement it accepts, or in the header".into(),
                    });
                }
                Directive::Allow(_) => {}
                _ if up.is_some() || down.is_some() => {
                    return Err(Error::File {
                        path: path.to_path_buf(),
                        line: Some(line_no),
                        message: "has a header directive inside a section; put parents, phase and no-transaction before `-- upshift:up`".into(),
                    });
                }
                _ => {}
            }
            header.apply(d);
        }
        offset = next;
    }
    // sqlx's single files say `-- no-transaction` on their first line.
    if text.lines().next().is_some_and(|l| l.trim() == "-- no-transaction") {
        header.no_transaction = true;
    }
    // Without an up marker, everything before `down` (or the whole file) is the up section.
    let (up_start, up_line) = up.unwrap_or((0, 1));
    let up_sql = &text[up_start..up_end.unwrap_or(text.len())];
    let up = Section { sql: up_sql.to_owned(), path: path.to_path_buf(), first_line: up_line };
    let down =
        down.map(|(start, line)| Section { sql: text[start..].to_owned(), path: path.to_path_buf(), first_line: line });
    Ok(build(id, name, path, header, up, down))
}

fn parse_pair(
    stem: &str,
    up_path: &Path,
    up_text: &str,
    down_path: Option<&Path>,
    down_text: Option<&str>,
) -> Result<Revision, Error> {
    let (id, name) = split_stem(stem);
    let mut header = Header::default();
    for (index, line) in up_text.lines().enumerate() {
        // sqlx marks a migration that must not run in a transaction this way.
        if index == 0 && line.trim() == "-- no-transaction" {
            header.no_transaction = true;
        }
        if let Some(d) = directive(up_path, index + 1, line)? {
            header.apply(d);
        }
    }
    // A down file may say it for itself, the way an up file does.
    header.down_no_transaction = down_text.is_some_and(|text| {
        text.lines().enumerate().any(|(index, line)| {
            let comment = line.trim().strip_prefix("--").map(str::trim);
            (index == 0 && comment == Some("no-transaction")) || comment == Some("upshift:no-transaction")
        })
    });
    let up = Section { sql: up_text.to_owned(), path: up_path.to_path_buf(), first_line: 1 };
    let down = down_path.zip(down_text).map(|(path, sql)| Section {
        sql: sql.to_owned(),
        path: path.to_path_buf(),
        first_line: 1,
    });
    Ok(build(id, name, up_path, header, up, down))
}

fn build(id: String, name: String, path: &Path, header: Header, up: Section, down: Option<Section>) -> Revision {
    // `-- upshift:allow` lines are the linter's notes, not SQL: accepting a finding in a
    // revision that is already applied is no drift.
    let sql: String = up.sql.split_inclusive('\n').filter(|line| !is_allow(line)).collect();
    Revision {
        checksum: checksum(&sql),
        id,
        name,
        path: path.to_path_buf(),
        declared_parents: header.parents,
        phase: header.phase.unwrap_or(Phase::Expand),
        phase_declared: header.phase.is_some(),
        no_transaction: header.no_transaction,
        down_no_transaction: header.down_no_transaction,
        up,
        down,
        allows: header.allows,
        origin: Origin::Files,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn reads_upshift_files() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "20261121_tags.sql",
            "-- upshift:parents 1 2\n-- upshift:phase contract\n-- upshift:no-transaction\n-- upshift:up\nCREATE TABLE t (id int);\n-- upshift:down\nDROP TABLE t;\n",
        );
        let revs = read_dir(dir.path()).unwrap();
        let rev = &revs[0];
        assert_eq!(rev.id, "20261121");
        assert_eq!(rev.name, "tags");
        assert_eq!(rev.declared_parents.as_deref(), Some(&["1".to_owned(), "2".to_owned()][..]));
        assert_eq!(rev.phase, Phase::Contract);
        assert!(rev.no_transaction);
        assert_eq!(rev.up.sql, "CREATE TABLE t (id int);\n");
        assert_eq!(rev.up.first_line, 5);
        let down = rev.down.as_ref().unwrap();
        assert_eq!(down.sql, "DROP TABLE t;\n");
        assert_eq!(down.first_line, 7);
    }

    #[test]
    fn reads_dbmate_files() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "20200101000000_users.sql",
            "-- migrate:up transaction:false\nCREATE INDEX CONCURRENTLY i ON t (a);\n\n-- migrate:down\nDROP INDEX i;\n",
        );
        let rev = &read_dir(dir.path()).unwrap()[0];
        assert!(rev.no_transaction);
        assert_eq!(rev.up.sql, "CREATE INDEX CONCURRENTLY i ON t (a);\n\n");
        assert_eq!(rev.down.as_ref().unwrap().sql, "DROP INDEX i;\n");
        assert_eq!(rev.phase, Phase::Expand);
        assert!(!rev.phase_declared);
    }

    #[test]
    fn reads_pairs_and_orders_numeric_ids_by_value() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "10_b.up.sql", "-- no-transaction\nSELECT 10;");
        write(dir.path(), "10_b.down.sql", "SELECT -10;");
        write(dir.path(), "2_a.up.sql", "SELECT 2;");
        write(dir.path(), "README.md", "not a migration");
        let revs = read_dir(dir.path()).unwrap();
        let ids: Vec<&str> = revs.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["2", "10"]);
        assert!(revs[1].no_transaction);
        assert!(revs[0].down.is_none());
        assert_eq!(revs[1].down.as_ref().unwrap().sql, "SELECT -10;");
    }

    #[test]
    fn down_sections_say_no_transaction_for_themselves() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "1_a.up.sql", "CREATE INDEX i ON t (a);\n");
        write(dir.path(), "1_a.down.sql", "-- no-transaction\nDROP INDEX CONCURRENTLY i;\n");
        write(dir.path(), "2_b.up.sql", "CREATE INDEX j ON t (a);\n");
        write(dir.path(), "2_b.down.sql", "-- why: j is big\n-- upshift:no-transaction\nDROP INDEX CONCURRENTLY j;\n");
        write(dir.path(), "3_c.up.sql", "SELECT 1;\n");
        write(dir.path(), "3_c.down.sql", "SELECT 2;\n-- no-transaction is only a marker on the first line\n");
        write(
            dir.path(),
            "4_d.sql",
            "-- migrate:up\nCREATE INDEX k ON t (a);\n-- migrate:down transaction:false\nDROP INDEX CONCURRENTLY k;\n",
        );
        let revs = read_dir(dir.path()).unwrap();
        let flags: Vec<(bool, bool)> = revs.iter().map(|r| (r.no_transaction, r.down_no_transaction)).collect();
        assert_eq!(flags, [(false, true), (false, true), (false, false), (false, true)]);
    }

    #[test]
    fn bom_and_crlf_do_not_change_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "1_a.sql", "-- upshift:up\nSELECT 1;\n-- upshift:down\nSELECT 2;\n");
        write(dir.path(), "2_a.sql", "\u{feff}-- upshift:up\r\nSELECT 1;\r\n-- upshift:down\r\nSELECT 2;\r\n");
        let revs = read_dir(dir.path()).unwrap();
        assert_eq!(revs[0].checksum, revs[1].checksum);
        assert_eq!(revs[1].up.sql, "SELECT 1;\n");
    }

    #[test]
    fn allow_lines_are_read_and_left_out_of_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "1_a.sql", "-- upshift:up\nCREATE INDEX i ON t (a);\n");
        write(
            dir.path(),
            "2_a.sql",
            "-- upshift:allow drop-table  whole revision\n-- upshift:up\n  --  upshift:allow index-without-concurrently t is small\nCREATE INDEX i ON t (a);\n",
        );
        write(dir.path(), "3_a.up.sql", "-- upshift:allow x y\nCREATE INDEX i ON t (a);\n");
        let revs = read_dir(dir.path()).unwrap();
        assert_eq!(revs[0].checksum, revs[1].checksum);
        assert_eq!(revs[0].checksum, checksum("CREATE INDEX i ON t (a);\n"));
        assert_eq!(revs[1].checksum, revs[2].checksum);
        let allows: Vec<(usize, &str)> = revs[1].allows.iter().map(|a| (a.line, a.text.as_str())).collect();
        assert_eq!(allows, [(1, "drop-table  whole revision"), (3, "index-without-concurrently t is small")]);
        assert_eq!(revs[2].allows[0].text, "x y");
        // Only the linter reads them: in the down section one is refused.
        write(dir.path(), "4_a.sql", "SELECT 1;\n-- upshift:down\n-- upshift:allow drop-table x\nSELECT 2;\n");
        let err = read_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("4_a.sql:3") && err.contains("down section"), "{err}");
    }

    #[test]
    fn a_file_without_markers_is_all_up() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "1.sql", "CREATE TABLE a (id int);");
        let rev = &read_dir(dir.path()).unwrap()[0];
        assert_eq!((rev.id.as_str(), rev.name.as_str()), ("1", ""));
        assert_eq!(rev.up.sql, "CREATE TABLE a (id int);");
        assert!(rev.down.is_none());
    }

    #[test]
    fn bad_directives_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "1_a.sql", "-- upshift:up\nSELECT 1;\n-- upshift:phase sideways\n");
        let err = read_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("1_a.sql:3"), "{err}");
        assert!(err.contains("expected `expand` or `contract`"), "{err}");

        write(dir.path(), "1_a.sql", "-- upshift:upp\n");
        let err = read_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("unknown directive `upshift:upp`"), "{err}");
    }

    #[test]
    fn a_down_file_without_its_up_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "1_a.down.sql", "SELECT 1;");
        let err = read_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("1_a.up.sql"), "{err}");
    }
}
