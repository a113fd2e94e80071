//! The linter: what a revision's up section would do to the old code while it runs (locks
//! that stall it) and after (renames and drops that break it), each with the safe rewrite.
//!
//! `upshift migrate lint` runs it over a folder; `plan` and `upgrade` run it over the
//! release's pending revisions and refuse an expand revision that the old code cannot
//! survive ([`Rule::breaks_old_code`]). The rules are squawk's best-known ones, read from the
//! tokens of each statement (no SQL parser), in PostgreSQL; for SQLite only the rules that
//! do not depend on locks ([`Rule::any_dialect`]).
//!
//! `-- upshift:allow RULE reason` accepts findings of RULE: in the comments before a
//! statement, that statement's; before the first statement (the header), the whole
//! revision's. The reason is required; an allow that accepts nothing is itself a finding.

mod rules;
mod tokens;

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use self::rules::{Context, Hit, Matcher, Schema};
use crate::error::Error;
use crate::lexer::{self, Dialect};
use crate::migrator::Migrator;
use crate::source::{Phase, Revision};

/// What the linter checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// `CREATE INDEX` without `CONCURRENTLY` on an existing table.
    IndexWithoutConcurrently,
    /// `DROP INDEX` without `CONCURRENTLY`.
    DropIndexWithoutConcurrently,
    /// `ADD COLUMN ... NOT NULL` without a `DEFAULT`.
    NotNullWithoutDefault,
    /// A `CHECK` or `FOREIGN KEY` added without `NOT VALID` (or validated in its own
    /// transaction).
    ConstraintWithoutNotValid,
    /// A `UNIQUE` or `PRIMARY KEY` constraint that builds its index under the lock.
    UniqueWithoutIndex,
    /// `ALTER COLUMN ... TYPE`.
    ColumnTypeChange,
    /// `SET NOT NULL` without a validated `CHECK (column IS NOT NULL)`.
    SetNotNullWithoutCheck,
    /// `ADD COLUMN` with a volatile default, a serial type, an identity or a stored
    /// generated value.
    AddColumnRewritesTable,
    /// An ACCESS EXCLUSIVE lock taken without a `lock_timeout`.
    MissingLockTimeout,
    /// A table renamed in an expand revision.
    RenameTable,
    /// A column renamed in an expand revision.
    RenameColumn,
    /// A table dropped in an expand revision.
    DropTable,
    /// A column dropped in an expand revision.
    DropColumn,
    /// An expand revision without a down section, or with an empty one.
    Irreversible,
    /// An `-- upshift:allow` that accepts no finding.
    UnusedAllow,
}

impl Rule {
    /// Every rule.
    pub const ALL: [Rule; 15] = [
        Rule::IndexWithoutConcurrently,
        Rule::DropIndexWithoutConcurrently,
        Rule::NotNullWithoutDefault,
        Rule::ConstraintWithoutNotValid,
        Rule::UniqueWithoutIndex,
        Rule::ColumnTypeChange,
        Rule::SetNotNullWithoutCheck,
        Rule::AddColumnRewritesTable,
        Rule::MissingLockTimeout,
        Rule::RenameTable,
        Rule::RenameColumn,
        Rule::DropTable,
        Rule::DropColumn,
        Rule::Irreversible,
        Rule::UnusedAllow,
    ];

    /// The name used in output and in `-- upshift:allow`.
    pub fn name(self) -> &'static str {
        match self {
            Rule::IndexWithoutConcurrently => "index-without-concurrently",
            Rule::DropIndexWithoutConcurrently => "drop-index-without-concurrently",
            Rule::NotNullWithoutDefault => "not-null-without-default",
            Rule::ConstraintWithoutNotValid => "constraint-without-not-valid",
            Rule::UniqueWithoutIndex => "unique-without-index",
            Rule::ColumnTypeChange => "column-type-change",
            Rule::SetNotNullWithoutCheck => "set-not-null-without-check",
            Rule::AddColumnRewritesTable => "add-column-rewrites-table",
            Rule::MissingLockTimeout => "missing-lock-timeout",
            Rule::RenameTable => "rename-table",
            Rule::RenameColumn => "rename-column",
            Rule::DropTable => "drop-table",
            Rule::DropColumn => "drop-column",
            Rule::Irreversible => "irreversible",
            Rule::UnusedAllow => "unused-allow",
        }
    }

    /// The rule with this name.
    pub fn from_name(name: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.name() == name)
    }

    /// The old code cannot survive it: in an expand revision (which runs while the old code
    /// serves), `plan` and `upgrade` refuse it unless it is allowed.
    pub fn breaks_old_code(self) -> bool {
        matches!(
            self,
            Rule::NotNullWithoutDefault | Rule::RenameTable | Rule::RenameColumn | Rule::DropTable | Rule::DropColumn
        )
    }

    /// Reported in expand revisions only: a contract revision is where these belong.
    pub fn expand_only(self) -> bool {
        matches!(self, Rule::RenameTable | Rule::RenameColumn | Rule::DropTable | Rule::DropColumn | Rule::Irreversible)
    }

    /// Checked for SQLite too (the others are about PostgreSQL's locks).
    pub fn any_dialect(self) -> bool {
        self.expand_only() || self == Rule::UnusedAllow
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One finding: where, which rule, why it blocks or breaks the old code, and the rewrite.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// The file.
    pub file: PathBuf,
    /// 1-based line in it.
    pub line: usize,
    /// The revision id.
    pub revision: String,
    /// The rule.
    pub rule: Rule,
    /// What goes wrong, for the old code.
    pub message: String,
    /// The safe way to do it.
    pub fix: String,
    /// An `-- upshift:allow` accepts it.
    pub allowed: bool,
    /// The allow's reason.
    pub reason: Option<String>,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}: ", self.file.display(), self.line, self.rule)?;
        match &self.reason {
            Some(reason) if self.allowed => write!(f, "allowed ({reason})"),
            _ => write!(f, "{}\n  fix: {}", self.message, self.fix),
        }
    }
}

/// Lints the revisions `selected` names (graph indexes, each with the phase it runs in),
/// in graph order. Every revision is read, in graph order, for what it leaves in the
/// schema (validated checks), so a revision is judged with what came before it.
///
/// Refuses (bad input) an unterminated construct in a selected revision and a malformed
/// `-- upshift:allow`.
pub fn lint(migrator: &Migrator, selected: &[(usize, Phase)], dialect: Dialect) -> Result<Vec<Finding>, Error> {
    let graph = migrator.graph();
    let mut schema = Schema::default();
    let mut findings = Vec::new();
    for &index in graph.topological() {
        let revision = graph.revision(index);
        if revision.origin == crate::source::Origin::Tool {
            // An external tool's revisions hold no SQL to read.
            continue;
        }
        let phase = selected.iter().find(|(i, _)| *i == index).map(|(_, p)| *p);
        let context = Context { no_transaction: revision.no_transaction, phase_declared: revision.phase_declared };
        let up = &revision.up;
        let pieces = match lexer::split(&up.sql, dialect) {
            Ok(pieces) => pieces,
            Err(e) if phase.is_some() => {
                return Err(Error::File {
                    path: up.path.clone(),
                    line: Some(up.first_line + e.line - 1),
                    message: format!("unterminated {}; close it or check the quotes before it", e.what),
                });
            }
            // A revision that is not linted only adds what it can to the schema.
            Err(_) => continue,
        };
        let mut matcher = Matcher::new(&context);
        let mut statement_lines = Vec::new();
        for piece in pieces.iter().filter(|p| !p.is_empty()) {
            let raw_line = up.first_line + up.sql[..piece.offset].matches('\n').count();
            let line = up.first_line + piece.line - 1;
            matcher.statement(&tokens::tokenize(piece.raw, raw_line, dialect), line, &mut schema);
            statement_lines.push(line);
        }
        let hits = matcher.finish(&mut schema);
        let Some(phase) = phase else { continue };
        let mut hits: Vec<(Hit, PathBuf)> = hits
            .into_iter()
            .filter(|h| {
                (dialect == Dialect::Postgres || h.rule.any_dialect())
                    && (phase == Phase::Expand || !h.rule.expand_only())
            })
            .map(|h| (h, up.path.clone()))
            .collect();
        if phase == Phase::Expand && !revision.reversible() {
            hits.push(irreversible(revision));
        }
        findings.extend(resolve_allows(revision, &statement_lines, hits)?);
    }
    Ok(findings)
}

fn irreversible(revision: &Revision) -> (Hit, PathBuf) {
    let (file, line, what) = match &revision.down {
        Some(down) => (down.path.clone(), down.first_line, "an empty down section"),
        None => (revision.path.clone(), revision.up.first_line, "no down section"),
    };
    let hit = Hit {
        rule: Rule::Irreversible,
        line,
        statement: None,
        message: format!(
            "expand revision {} has {what}: it is irreversible in practice, so `upshift migrate down` cannot pass it and a failed upgrade is undone by restoring the backup instead of reverting it",
            revision.id
        ),
        fix: format!("write its reverse {}", crate::error::where_down_goes(&revision.path)),
    };
    (hit, file)
}

/// Where an allow applies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Before the first statement: the whole revision.
    Revision,
    /// Before the statement starting at this line.
    Statement(usize),
    /// After the last statement: nothing.
    Nothing,
}

struct Allow {
    line: usize,
    rule: Rule,
    reason: String,
    scope: Scope,
    used: bool,
}

/// Reads the revision's allows, marks the hits they accept, and reports the ones that
/// accept nothing.
fn resolve_allows(
    revision: &Revision,
    statement_lines: &[usize],
    hits: Vec<(Hit, PathBuf)>,
) -> Result<Vec<Finding>, Error> {
    let path = &revision.up.path;
    let mut allows = Vec::new();
    for allow in &revision.allows {
        let bad = |message: String| Error::File { path: path.clone(), line: Some(allow.line), message };
        let (name, reason) = allow.text.split_once(char::is_whitespace).unwrap_or((&allow.text, ""));
        if name.is_empty() {
            return Err(bad(
                "`-- upshift:allow` needs a rule and the reason it is safe here, e.g. `-- upshift:allow index-without-concurrently the table holds 12 rows`".into(),
            ));
        }
        let rule = Rule::from_name(name).filter(|r| *r != Rule::UnusedAllow).ok_or_else(|| {
            let names: Vec<&str> = Rule::ALL.iter().filter(|r| **r != Rule::UnusedAllow).map(|r| r.name()).collect();
            bad(format!("`-- upshift:allow {name}`: no such rule; the rules are {}", names.join(", ")))
        })?;
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(bad(format!(
                "`-- upshift:allow {name}` needs a reason after the rule: say why it is safe here (it stays in the file for the next reader)"
            )));
        }
        let scope = match statement_lines.iter().find(|&&line| line > allow.line) {
            _ if statement_lines.first().is_none_or(|&first| allow.line < first) => Scope::Revision,
            Some(&line) => Scope::Statement(line),
            None => Scope::Nothing,
        };
        allows.push(Allow { line: allow.line, rule, reason: reason.to_owned(), scope, used: false });
    }
    let mut findings: Vec<Finding> = hits
        .into_iter()
        .map(|(hit, file)| {
            let allow = allows.iter_mut().find(|a| {
                a.rule == hit.rule
                    && (a.scope == Scope::Revision || hit.statement.is_some_and(|s| a.scope == Scope::Statement(s)))
            });
            let reason = allow.map(|a| {
                a.used = true;
                a.reason.clone()
            });
            Finding {
                file,
                line: hit.line,
                revision: revision.id.clone(),
                rule: hit.rule,
                message: hit.message,
                fix: hit.fix,
                allowed: reason.is_some(),
                reason,
            }
        })
        .collect();
    for allow in allows.iter().filter(|a| !a.used) {
        let place = match allow.scope {
            Scope::Revision => "in this revision",
            Scope::Statement(_) => "at the statement after it",
            Scope::Nothing => "here: no statement follows it",
        };
        findings.push(Finding {
            file: path.clone(),
            line: allow.line,
            revision: revision.id.clone(),
            rule: Rule::UnusedAllow,
            message: format!("`-- upshift:allow {}` accepts no {} finding {place}", allow.rule, allow.rule),
            fix: "remove it (the statement it was for changed, or the rule does not apply to it), so that it cannot hide a later finding".to_owned(),
            allowed: false,
            reason: None,
        });
    }
    findings.sort_by_key(|f| f.line);
    Ok(findings)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Lints a folder of `(file name, text)`, each revision in its own phase; returns
    /// `(rule, line)` of each finding, `+` after the rule when it is allowed.
    fn lint_files(files: &[(&str, &str)], dialect: Dialect) -> Vec<(String, usize)> {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        findings(dir.path(), dialect)
            .into_iter()
            .map(|f| (format!("{}{}", f.rule, if f.allowed { "+" } else { "" }), f.line))
            .collect()
    }

    fn findings(dir: &Path, dialect: Dialect) -> Vec<Finding> {
        let migrator = Migrator::load(dir).unwrap();
        let graph = migrator.graph();
        let all: Vec<(usize, Phase)> = graph.topological().iter().map(|&i| (i, graph.revision(i).phase)).collect();
        lint(&migrator, &all, dialect).unwrap()
    }

    /// One expand revision (with a down section, so it is reversible) after a revision
    /// that makes the tables `t` and `u`; the findings in it.
    fn expand(sql: &str) -> Vec<(String, usize)> {
        revision("", sql)
    }

    fn revision(header: &str, sql: &str) -> Vec<(String, usize)> {
        let base = "-- upshift:up\nCREATE TABLE t (id bigint, a int, b text);\nCREATE TABLE u (id bigint);\n-- upshift:down\nDROP TABLE u, t;\n";
        let text = format!("{header}-- upshift:up\n{sql}\n-- upshift:down\nSELECT 1;\n");
        let mut found = lint_files(&[("1_base.sql", base), ("2_change.sql", &text)], Dialect::Postgres);
        found.retain(|(rule, _)| rule != "missing-lock-timeout");
        found
    }

    fn rules(found: &[(String, usize)]) -> Vec<&str> {
        found.iter().map(|(r, _)| r.as_str()).collect()
    }

    #[test]
    fn indexes_on_existing_tables_need_concurrently() {
        assert_eq!(expand("CREATE INDEX t_a ON t (a);"), [("index-without-concurrently".to_owned(), 2)]);
        assert_eq!(
            rules(&expand("create unique index if not exists t_a on public.t using btree (a);")),
            ["index-without-concurrently"]
        );
        assert!(
            expand("CREATE TABLE n (a int);\nCREATE INDEX ON n (a);").is_empty(),
            "a table made in the revision is not in use"
        );
        assert!(expand("CREATE TABLE \"N\" (a int);\nCREATE INDEX n_a ON public.\"N\" (a);").is_empty());
        assert_eq!(
            rules(&expand("CREATE TABLE \"N\" (a int);\nCREATE INDEX n_a ON n (a);")),
            ["index-without-concurrently"],
            "n is not \"N\""
        );
        let concurrently = "-- upshift:no-transaction\n-- upshift:up\nCREATE INDEX CONCURRENTLY t_a ON t (a);\n-- upshift:down\nDROP INDEX CONCURRENTLY t_a;\n";
        let base = "CREATE TABLE t (a int);\n-- upshift:down\nDROP TABLE t;\n";
        assert!(lint_files(&[("1_t.sql", base), ("2_i.sql", concurrently)], Dialect::Postgres).is_empty());
        assert_eq!(rules(&expand("DROP INDEX t_a;")), ["drop-index-without-concurrently"]);
        assert!(
            expand("CREATE INDEX CONCURRENTLY t_b ON t (b);\nDROP INDEX t_b;").is_empty(),
            "an index made here is not in use"
        );
    }

    #[test]
    fn new_columns() {
        assert_eq!(rules(&expand("ALTER TABLE t ADD COLUMN c int NOT NULL;")), ["not-null-without-default"]);
        assert_eq!(
            rules(&expand("ALTER TABLE IF EXISTS ONLY t ADD c int CONSTRAINT c_nn NOT NULL;")),
            ["not-null-without-default"]
        );
        assert!(expand("ALTER TABLE t ADD COLUMN c int NOT NULL DEFAULT 0;").is_empty());
        assert!(expand("ALTER TABLE t ADD COLUMN c timestamptz DEFAULT now() NOT NULL;").is_empty(), "now() is stable");
        assert!(
            expand("ALTER TABLE t ADD COLUMN c int CHECK (c IS NOT NULL);").is_empty(),
            "NOT NULL inside a check is no column constraint"
        );
        assert_eq!(
            rules(&expand("ALTER TABLE t ADD COLUMN c uuid NOT NULL DEFAULT gen_random_uuid();")),
            ["add-column-rewrites-table"]
        );
        assert_eq!(rules(&expand("ALTER TABLE t ADD COLUMN c bigserial;")), ["add-column-rewrites-table"]);
        assert_eq!(
            rules(&expand("ALTER TABLE t ADD COLUMN c bigint GENERATED ALWAYS AS IDENTITY NOT NULL;")),
            ["add-column-rewrites-table"]
        );
        assert_eq!(
            rules(&expand("ALTER TABLE t ADD COLUMN c int GENERATED ALWAYS AS (a * 2) STORED;")),
            ["add-column-rewrites-table"]
        );
        assert_eq!(rules(&expand("ALTER TABLE t ADD COLUMN c text UNIQUE;")), ["unique-without-index"]);
        assert!(
            expand("ALTER TABLE t ADD COLUMN c text;\nALTER TABLE t ADD COLUMN d int REFERENCES u (id);").is_empty()
        );
        // Each action of one ALTER TABLE is judged on its own line.
        assert_eq!(
            expand("ALTER TABLE t\n  ADD COLUMN c int NOT NULL,\n  ADD COLUMN d int,\n  ALTER COLUMN a TYPE bigint;"),
            [("not-null-without-default".to_owned(), 3), ("column-type-change".to_owned(), 5)]
        );
    }

    #[test]
    fn constraints_need_not_valid_and_a_later_validate() {
        assert_eq!(
            rules(&expand("ALTER TABLE t ADD CONSTRAINT a_pos CHECK (a > 0);")),
            ["constraint-without-not-valid"]
        );
        assert_eq!(
            rules(&expand("ALTER TABLE t ADD CONSTRAINT t_u FOREIGN KEY (id) REFERENCES u (id);")),
            ["constraint-without-not-valid"]
        );
        assert!(expand("ALTER TABLE t ADD CONSTRAINT t_u FOREIGN KEY (id) REFERENCES u (id) NOT VALID;").is_empty());
        // Validating in the transaction that added it holds the ADD's lock through the scan.
        assert_eq!(
            expand(
                "ALTER TABLE t ADD CONSTRAINT a_pos CHECK (a > 0) NOT VALID;\nALTER TABLE t VALIDATE CONSTRAINT a_pos;"
            ),
            [("constraint-without-not-valid".to_owned(), 3)]
        );
        assert!(
            revision(
                "-- upshift:no-transaction\n",
                "ALTER TABLE t ADD CONSTRAINT a_pos CHECK (a > 0) NOT VALID;\nALTER TABLE t VALIDATE CONSTRAINT a_pos;"
            )
            .is_empty()
        );
        assert_eq!(rules(&expand("ALTER TABLE t ADD CONSTRAINT t_b UNIQUE (b);")), ["unique-without-index"]);
        assert_eq!(rules(&expand("ALTER TABLE t ADD PRIMARY KEY (id);")), ["unique-without-index"]);
        assert!(expand("ALTER TABLE t ADD CONSTRAINT t_b UNIQUE USING INDEX t_b_idx;").is_empty());
    }

    #[test]
    fn set_not_null_needs_a_check_validated_before() {
        assert_eq!(rules(&expand("ALTER TABLE t ALTER COLUMN a SET NOT NULL;")), ["set-not-null-without-check"]);
        assert!(expand("ALTER TABLE t ALTER COLUMN a DROP NOT NULL;").is_empty());
        let base = "CREATE TABLE t (a int);\n-- upshift:down\nDROP TABLE t;\n";
        let add = "ALTER TABLE t ADD CONSTRAINT t_a_nn CHECK (a IS NOT NULL) NOT VALID;\n-- upshift:down\nALTER TABLE t DROP CONSTRAINT t_a_nn;\n";
        let validate = "ALTER TABLE t VALIDATE CONSTRAINT t_a_nn;\n-- upshift:down\nSELECT 1;\n";
        let set = "-- upshift:phase contract\n-- upshift:up\nALTER TABLE t ALTER a SET NOT NULL;\nALTER TABLE t DROP CONSTRAINT t_a_nn;\n";
        let found = |files: &[(&str, &str)]| -> Vec<String> {
            lint_files(files, Dialect::Postgres)
                .into_iter()
                .map(|(r, _)| r)
                .filter(|r| r != "missing-lock-timeout")
                .collect()
        };
        assert!(found(&[("1.sql", base), ("2.sql", add), ("3.sql", validate), ("4.sql", set)]).is_empty());
        // Without the validate, the check proves nothing.
        assert_eq!(found(&[("1.sql", base), ("2.sql", add), ("4.sql", set)]), ["set-not-null-without-check"]);
        // Validated in the same transaction as the SET NOT NULL: the scan runs under the lock.
        let statements =
            format!("{}{}", validate.split("--").next().unwrap(), set.split("-- upshift:up\n").nth(1).unwrap());
        let together = format!("{statements}-- upshift:down\nSELECT 1;\n");
        assert_eq!(found(&[("1.sql", base), ("2.sql", add), ("3.sql", &together)]), ["set-not-null-without-check"]);
        let apart = format!("-- upshift:no-transaction\n-- upshift:up\n{together}");
        assert!(found(&[("1.sql", base), ("2.sql", add), ("3.sql", &apart)]).is_empty());
    }

    #[test]
    fn renames_and_drops_break_the_old_code_in_expand_only() {
        assert_eq!(
            rules(&expand("ALTER TABLE t RENAME COLUMN b TO body;\nALTER TABLE t RENAME TO things;")),
            ["rename-column", "rename-table"]
        );
        assert_eq!(
            rules(&expand("ALTER TABLE t DROP COLUMN IF EXISTS b CASCADE;\nDROP TABLE IF EXISTS u;")),
            ["drop-column", "drop-table"]
        );
        assert!(expand("ALTER TABLE t DROP CONSTRAINT t_pkey;\nALTER TABLE t RENAME CONSTRAINT a TO b;").is_empty());
        assert!(expand("CREATE TABLE n (a int);\nDROP TABLE n;").is_empty());
        // A view with the old name keeps the old code working.
        assert!(expand("ALTER TABLE t RENAME TO things;\nCREATE VIEW t AS SELECT * FROM things;").is_empty());
        let contract = revision(
            "-- upshift:phase contract\n",
            "ALTER TABLE t DROP COLUMN b;\nALTER TABLE t RENAME a TO c;\nDROP TABLE u;",
        );
        assert!(contract.is_empty(), "{contract:?}");
        // An undeclared phase is expand, and the message says so.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("1_a.sql"), "CREATE TABLE t (a int);\n-- upshift:down\nDROP TABLE t;\n")
            .unwrap();
        std::fs::write(dir.path().join("2_b.sql"), "ALTER TABLE t DROP COLUMN a;\n-- upshift:down\nSELECT 1;\n")
            .unwrap();
        let found = findings(dir.path(), Dialect::Postgres);
        let drop = found.iter().find(|f| f.rule == Rule::DropColumn).unwrap();
        assert!(drop.message.contains("no `-- upshift:phase` line"), "{}", drop.message);
        assert!(drop.fix.contains("upshift:phase contract"), "{}", drop.fix);
    }

    #[test]
    fn access_exclusive_locks_need_a_lock_timeout_once_per_revision() {
        let base = "CREATE TABLE t (a int);\n-- upshift:down\nDROP TABLE t;\n";
        let lint_second = |text: &str| lint_files(&[("1_t.sql", base), ("2_x.sql", text)], Dialect::Postgres);
        let none = lint_second(
            "ALTER TABLE t ADD COLUMN b int;\nALTER TABLE t ADD COLUMN c int;\n-- upshift:down\nSELECT 1;\n",
        );
        assert_eq!(none, [("missing-lock-timeout".to_owned(), 1)]);
        for set in [
            "SET LOCAL lock_timeout = '5s'",
            "set lock_timeout to 5000",
            "SELECT set_config('lock_timeout', '2s', true)",
        ] {
            let text = format!("{set};\nALTER TABLE t ADD COLUMN b int;\n-- upshift:down\nSELECT 1;\n");
            assert!(lint_second(&text).is_empty(), "{set}");
        }
        for off in
            ["SET lock_timeout = 0", "SET lock_timeout = '5s'; RESET lock_timeout", "SET lock_timeout TO DEFAULT"]
        {
            let text = format!("{off};\nALTER TABLE t ADD COLUMN b int;\n-- upshift:down\nSELECT 1;\n");
            assert_eq!(rules(&lint_second(&text)), ["missing-lock-timeout"], "{off}");
        }
        // SET LOCAL does nothing outside a transaction block.
        let local = "-- upshift:no-transaction\n-- upshift:up\nSET LOCAL lock_timeout = '5s';\nALTER TABLE t ADD b int;\n-- upshift:down\nSELECT 1;\n";
        assert_eq!(rules(&lint_second(local)), ["missing-lock-timeout"]);
        // Weaker locks, and tables made here, need none.
        let weak = "ALTER TABLE t VALIDATE CONSTRAINT c;\nCREATE TABLE n (a int);\nALTER TABLE n ADD b int;\n-- upshift:down\nSELECT 1;\n";
        assert!(lint_second(weak).is_empty());
        assert_eq!(rules(&lint_second("LOCK TABLE t;\n-- upshift:down\nSELECT 1;\n")), ["missing-lock-timeout"]);
        assert!(lint_second("LOCK t IN SHARE MODE;\n-- upshift:down\nSELECT 1;\n").is_empty());
    }

    #[test]
    fn allows_accept_findings_with_a_reason() {
        let base = "CREATE TABLE t (a int, b int);\n-- upshift:down\nDROP TABLE t;\n";
        let text = "-- upshift:allow missing-lock-timeout nothing else uses t during upgrades\n-- upshift:up\nCREATE INDEX t_a ON t (a);\n-- upshift:allow index-without-concurrently t holds 12 rows\n-- and this comment sits between\nCREATE INDEX t_b ON t (b);\n-- upshift:allow drop-column not this one\nALTER TABLE t ADD c int;\n-- upshift:down\nSELECT 1;\n";
        let found = lint_files(&[("1_t.sql", base), ("2_i.sql", text)], Dialect::Postgres);
        assert_eq!(
            found,
            [
                ("index-without-concurrently".to_owned(), 3),
                ("index-without-concurrently+".to_owned(), 6),
                ("unused-allow".to_owned(), 7),
                ("missing-lock-timeout+".to_owned(), 8),
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("1_t.sql"), base).unwrap();
        let refused = |allow: &str| {
            std::fs::write(dir.path().join("2_i.sql"), format!("{allow}\nCREATE INDEX t_a ON t (a);\n")).unwrap();
            let migrator = Migrator::load(dir.path()).unwrap();
            let all: Vec<(usize, Phase)> = (0..2).map(|i| (i, Phase::Expand)).collect();
            lint(&migrator, &all, Dialect::Postgres).unwrap_err().to_string()
        };
        let err = refused("-- upshift:allow index-without-concurrently");
        assert!(err.contains("2_i.sql:1") && err.contains("needs a reason"), "{err}");
        let err = refused("-- upshift:allow no-such-rule because");
        assert!(err.contains("no such rule") && err.contains("index-without-concurrently"), "{err}");
        assert!(refused("-- upshift:allow").contains("needs a rule"));
    }

    #[test]
    fn sqlite_gets_the_phase_rules_only() {
        let base = "CREATE TABLE t (a int, b int);\n-- upshift:down\nDROP TABLE t;\n";
        let text = "CREATE INDEX t_a ON [t] (a);\nALTER TABLE `t` DROP COLUMN b;\nALTER TABLE t RENAME TO u;\n";
        let found = lint_files(&[("1_t.sql", base), ("2_x.sql", text)], Dialect::Sqlite);
        assert_eq!(rules(&found), ["irreversible", "drop-column", "rename-table"]);
    }

    #[test]
    fn expand_revisions_without_a_real_down_are_irreversible() {
        let found = lint_files(
            &[
                ("1_a.sql", "CREATE TABLE a (x int);\n"),
                ("2_b.up.sql", "CREATE TABLE b (x int);\n"),
                ("2_b.down.sql", "-- nothing\n"),
                ("3_c.sql", "-- upshift:phase contract\n-- upshift:up\nDROP TABLE a;\n"),
            ],
            Dialect::Postgres,
        );
        assert_eq!(
            found,
            [("irreversible".to_owned(), 1), ("irreversible".to_owned(), 1), ("missing-lock-timeout".to_owned(), 3)]
        );
    }
}
