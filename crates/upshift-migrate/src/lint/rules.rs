//! The statement matcher: reads the tokens of each statement of a revision, in order, and
//! says which rules it breaks. A small matcher over the statement forms migrations use
//! (`CREATE TABLE/INDEX/VIEW`, `DROP TABLE/INDEX`, `ALTER TABLE` and its actions, `SET`,
//! `TRUNCATE`, `LOCK`), not a SQL parser: a statement it does not recognise breaks no rule.
//!
//! "Existing table" means one not created earlier in the same revision: a table the old
//! code may be using while the revision runs.

use std::collections::{HashMap, HashSet};

use super::Rule;
use super::tokens::{Kind, Token};

/// Functions whose value changes per row: a column added with one of them as its default
/// is filled row by row, which rewrites the table.
const VOLATILE: &[&str] = &[
    "random",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "uuidv4",
    "uuidv7",
    "clock_timestamp",
    "timeofday",
    "nextval",
];

const SERIAL: &[&str] = &["serial", "bigserial", "smallserial", "serial2", "serial4", "serial8"];

/// Words that end a column's type or default and start one of its constraints.
const COLUMN_CONSTRAINT: &[&str] =
    &["NOT", "NULL", "CONSTRAINT", "CHECK", "REFERENCES", "PRIMARY", "UNIQUE", "GENERATED", "COLLATE", "DEFAULT"];

/// A rule broken at one place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Hit {
    pub(super) rule: Rule,
    /// The file line of the clause that breaks it.
    pub(super) line: usize,
    /// The first line of its statement (where an allow before the statement points), or
    /// `None` for a finding about the whole revision.
    pub(super) statement: Option<usize>,
    pub(super) message: String,
    pub(super) fix: String,
}

/// The revision being read.
pub(super) struct Context {
    /// Runs statement by statement, each committing on its own.
    pub(super) no_transaction: bool,
    /// Whether its file says its phase (else expand is the default).
    pub(super) phase_declared: bool,
}

/// Facts about the schema that outlive a revision: the `CHECK (c IS NOT NULL)`
/// constraints, which let `SET NOT NULL` skip its scan once validated.
#[derive(Default)]
pub(super) struct Schema {
    /// `(table, constraint)` -> column of a `CHECK (column IS NOT NULL)` added `NOT VALID`.
    not_null_checks: HashMap<(String, String), String>,
    /// `(table, column)` pairs a validated check proves not null.
    validated: HashSet<(String, String)>,
}

/// What one revision has done so far.
#[derive(Default)]
pub(super) struct State {
    created_tables: HashSet<String>,
    created_indexes: HashSet<String>,
    created_views: HashSet<String>,
    /// Constraints this transaction added `NOT VALID` (it still holds their lock).
    not_valid_here: HashSet<(String, String)>,
    /// Checks validated in this revision's transaction: they count for later revisions.
    validated_here: HashSet<(String, String)>,
    /// A `lock_timeout` is in force.
    lock_timeout: bool,
    lock_timeout_reported: bool,
    /// Table renames, reported at the end unless a view takes the old name.
    renamed_tables: Vec<(String, Hit)>,
}

/// Reads a revision's statements in order and collects what they break.
pub(super) struct Matcher<'r> {
    revision: &'r Context,
    state: State,
    hits: Vec<Hit>,
}

impl<'r> Matcher<'r> {
    pub(super) fn new(revision: &'r Context) -> Self {
        Matcher { revision, state: State::default(), hits: Vec::new() }
    }

    /// Reads one statement; `line` is its first line.
    pub(super) fn statement(&mut self, tokens: &[Token<'_>], line: usize, schema: &mut Schema) {
        let mut at = Cursor { tokens, pos: 0, statement: line };
        let Some(first) = at.bump() else { return };
        if first.is("CREATE") {
            self.create(&mut at);
        } else if first.is("DROP") {
            self.drop(&mut at);
        } else if first.is("ALTER") && at.eat("TABLE") {
            self.alter_table(&mut at, schema);
        } else if first.is("SET") || first.is("RESET") {
            self.set(first.is("RESET"), &mut at);
        } else if first.is("SELECT") {
            self.set_config(tokens);
        } else if first.is("TRUNCATE") {
            at.eat("TABLE");
            at.eat("ONLY");
            if let Some(table) = at.name() {
                self.access_exclusive(&at, "TRUNCATE", &table);
            }
        } else if first.is("LOCK") {
            at.eat("TABLE");
            at.eat("ONLY");
            let table = at.name();
            let rest = at.rest();
            let exclusive = !rest.iter().any(|t| t.is("IN")) || has_words(rest, &["ACCESS", "EXCLUSIVE"]);
            if let Some(table) = table
                && exclusive
                && !rest.iter().any(|t| t.is("NOWAIT"))
            {
                self.access_exclusive(&at, "LOCK TABLE", &table);
            }
        }
    }

    /// Ends the revision: what it validated counts for the revisions after it.
    pub(super) fn finish(mut self, schema: &mut Schema) -> Vec<Hit> {
        schema.validated.extend(std::mem::take(&mut self.state.validated_here));
        for (old, hit) in std::mem::take(&mut self.state.renamed_tables) {
            // `ALTER TABLE a RENAME TO b; CREATE VIEW a AS SELECT * FROM b;` keeps the old
            // code working: a simple view can be read and written like the table.
            if !self.state.created_views.contains(&old) {
                self.hits.push(hit);
            }
        }
        self.hits.sort_by_key(|h| h.line);
        self.hits
    }

    fn existing(&self, table: &str) -> bool {
        !self.state.created_tables.contains(table)
    }

    fn hit(&mut self, rule: Rule, line: usize, statement: usize, message: String, fix: String) {
        self.hits.push(Hit { rule, line, statement: Some(statement), message, fix });
    }

    /// Where rename and drop findings say why the revision counts as expand.
    fn expand_revision(&self) -> &'static str {
        if self.revision.phase_declared {
            "an expand revision"
        } else {
            "an expand revision (it has no `-- upshift:phase` line, and expand is the default)"
        }
    }

    /// A statement that waits for an ACCESS EXCLUSIVE lock on `table`: the first one in a
    /// revision without a `lock_timeout` is reported.
    fn access_exclusive(&mut self, at: &Cursor<'_, '_>, what: &str, table: &str) {
        if self.state.lock_timeout || self.state.lock_timeout_reported || !self.existing(table) {
            return;
        }
        self.state.lock_timeout_reported = true;
        let set = if self.revision.no_transaction { "SET" } else { "SET LOCAL" };
        self.hit(
            Rule::MissingLockTimeout,
            at.statement,
            at.statement,
            format!(
                "{what} waits for an ACCESS EXCLUSIVE lock on {table} with no lock_timeout: while it waits behind any long transaction on {table}, every query of the application on {table} queues behind it, reads included, and the application stalls"
            ),
            format!(
                "put `{set} lock_timeout = '5s';` before it: the revision then fails fast and can be run again, instead of stalling the application"
            ),
        );
    }

    fn create(&mut self, at: &mut Cursor<'_, '_>) {
        at.eat_all(&["OR", "REPLACE"]);
        for modifier in ["GLOBAL", "LOCAL", "TEMP", "TEMPORARY", "UNLOGGED", "RECURSIVE"] {
            at.eat(modifier);
        }
        if at.eat("TABLE") {
            at.eat_all(&["IF", "NOT", "EXISTS"]);
            if let Some(table) = at.name() {
                self.state.created_tables.insert(table);
            }
        } else if at.eat("VIEW") || at.eat_all(&["MATERIALIZED", "VIEW"]) {
            at.eat_all(&["IF", "NOT", "EXISTS"]);
            if let Some(view) = at.name() {
                self.state.created_views.insert(view);
            }
        } else if at.eat("INDEX") || at.eat_all(&["UNIQUE", "INDEX"]) {
            let concurrently = at.eat("CONCURRENTLY");
            at.eat_all(&["IF", "NOT", "EXISTS"]);
            let index = if at.peek_is("ON") { None } else { at.name() };
            if !at.eat("ON") {
                return;
            }
            at.eat("ONLY");
            let Some(table) = at.name() else { return };
            if let Some(index) = &index {
                self.state.created_indexes.insert(index.clone());
            }
            if !concurrently && self.existing(&table) {
                let name = index.map_or_else(String::new, |i| format!(" {i}"));
                self.hit(
                    Rule::IndexWithoutConcurrently,
                    at.statement,
                    at.statement,
                    format!(
                        "CREATE INDEX{name} on {table}, a table that exists before this revision, holds a SHARE lock on it for the whole build: the application's INSERT, UPDATE and DELETE on {table} wait until the index is built"
                    ),
                    "build it with CREATE INDEX CONCURRENTLY, in a revision of its own marked `-- upshift:no-transaction` (a failed concurrent build leaves an INVALID index: DROP INDEX CONCURRENTLY it, then run the revision again)".to_owned(),
                );
            }
        }
    }

    fn drop(&mut self, at: &mut Cursor<'_, '_>) {
        if at.eat("TABLE") {
            at.eat_all(&["IF", "EXISTS"]);
            for table in at.names() {
                if !self.existing(&table) {
                    continue;
                }
                self.access_exclusive(at, "DROP TABLE", &table);
                let expand = self.expand_revision();
                self.hit(
                    Rule::DropTable,
                    at.statement,
                    at.statement,
                    format!(
                        "DROP TABLE {table} in {expand}: the old code runs until the new code is verified and fails without {table}; and an upgrade that fails after it can only get the rows back from a backup"
                    ),
                    "drop it in a `-- upshift:phase contract` revision, which runs after the new code is verified".to_owned(),
                );
            }
        } else if at.eat("INDEX") {
            let concurrently = at.eat("CONCURRENTLY");
            at.eat_all(&["IF", "EXISTS"]);
            let names: Vec<String> =
                at.names().into_iter().filter(|i| !self.state.created_indexes.contains(i)).collect();
            if names.is_empty() || concurrently {
                return;
            }
            let list = names.join(", ");
            self.access_exclusive(at, &format!("DROP INDEX {list}"), &names[0]);
            self.hit(
                Rule::DropIndexWithoutConcurrently,
                at.statement,
                at.statement,
                format!(
                    "DROP INDEX {list} takes an ACCESS EXCLUSIVE lock on the index's table: the application's queries on that table wait, reads included, until it is done"
                ),
                format!("DROP INDEX CONCURRENTLY {list}, in a revision marked `-- upshift:no-transaction`"),
            );
        }
    }

    fn set(&mut self, reset: bool, at: &mut Cursor<'_, '_>) {
        if reset {
            if at.eat("ALL") || at.eat("lock_timeout") {
                self.state.lock_timeout = false;
            }
            return;
        }
        let local = at.eat("LOCAL");
        at.eat("SESSION");
        if !at.eat("lock_timeout") {
            return;
        }
        if !at.eat("TO") {
            at.eat_symbol('=');
        }
        let on = at.bump().is_some_and(|value| timeout_is_set(value));
        // SET LOCAL outside a transaction block does nothing.
        if !(local && self.revision.no_transaction) {
            self.state.lock_timeout = on;
        }
    }

    /// `SELECT set_config('lock_timeout', '5s', is_local)`.
    fn set_config(&mut self, tokens: &[Token<'_>]) {
        let Some(call) = tokens.windows(4).position(|w| {
            w[0].is("set_config") && w[1].is_symbol('(') && w[2].string_value().as_deref() == Some("lock_timeout")
        }) else {
            return;
        };
        let Some(value) = tokens.get(call + 4) else { return };
        let local = tokens.get(call + 6).is_some_and(|t| t.is("true"));
        if !(local && self.revision.no_transaction) {
            self.state.lock_timeout = timeout_is_set(value);
        }
    }

    fn alter_table(&mut self, at: &mut Cursor<'_, '_>, schema: &mut Schema) {
        at.eat_all(&["IF", "EXISTS"]);
        at.eat("ONLY");
        let Some(table) = at.name() else { return };
        at.eat_symbol('*');
        let actions = split_commas(at.rest());
        let exclusive = actions.iter().any(|action| {
            let validate = action.first().is_some_and(|t| t.is("VALIDATE"));
            let foreign_key = action.first().is_some_and(|t| t.is("ADD")) && has_words(action, &["FOREIGN", "KEY"]);
            !validate && !foreign_key
        });
        if exclusive {
            self.access_exclusive(at, &format!("ALTER TABLE {table}"), &table);
        }
        if !self.existing(&table) {
            // A table made in this revision is not in use yet: only remember its checks.
            for action in &actions {
                let mut action_at = Cursor { tokens: action, pos: 0, statement: at.statement };
                if action_at.eat("ADD")
                    && let Some(column) = constraint_not_null_column(action)
                    && let Some(name) = constraint_name(&mut action_at)
                {
                    schema.not_null_checks.insert((table.clone(), name), column.clone());
                    self.validated(schema, &table, column);
                }
            }
            return;
        }
        for action in actions {
            let mut action_at = Cursor { tokens: action, pos: 0, statement: at.statement };
            self.alter_action(&table, &mut action_at, schema);
        }
    }

    /// Records that a check proves `table.column` not null: at once when each statement
    /// commits on its own, else for the revisions after this one.
    fn validated(&mut self, schema: &mut Schema, table: &str, column: String) {
        if self.revision.no_transaction {
            schema.validated.insert((table.to_owned(), column));
        } else {
            self.state.validated_here.insert((table.to_owned(), column));
        }
    }

    fn alter_action(&mut self, table: &str, at: &mut Cursor<'_, '_>, schema: &mut Schema) {
        let line = at.line();
        if at.eat("ADD") {
            let is_constraint =
                ["CONSTRAINT", "CHECK", "FOREIGN", "UNIQUE", "PRIMARY", "EXCLUDE"].iter().any(|k| at.peek_is(k));
            if is_constraint {
                self.add_constraint(table, at, line, schema);
            } else {
                at.eat("COLUMN");
                at.eat_all(&["IF", "NOT", "EXISTS"]);
                if let Some(column) = at.name() {
                    self.add_column(table, &column, at.rest(), line, at.statement);
                }
            }
        } else if at.eat("DROP") {
            if at.peek_is("CONSTRAINT") {
                return;
            }
            at.eat("COLUMN");
            at.eat_all(&["IF", "EXISTS"]);
            let Some(column) = at.name() else { return };
            let expand = self.expand_revision();
            self.hit(
                Rule::DropColumn,
                line,
                at.statement,
                format!(
                    "DROP COLUMN {column} of {table} in {expand}: the old code runs until the new code is verified, and its queries that name {column} (or SELECT * into a fixed shape) fail"
                ),
                "drop it in a `-- upshift:phase contract` revision, which runs after the new code is verified (and stop the new code from using it first)".to_owned(),
            );
        } else if at.eat("ALTER") {
            self.alter_column(table, at, line, schema);
        } else if at.eat("RENAME") {
            self.rename(table, at, line);
        } else if at.eat_all(&["VALIDATE", "CONSTRAINT"]) {
            let Some(name) = at.name() else { return };
            let key = (table.to_owned(), name.clone());
            if self.state.not_valid_here.contains(&key) {
                self.hit(
                    Rule::ConstraintWithoutNotValid,
                    line,
                    at.statement,
                    format!(
                        "VALIDATE CONSTRAINT {name} runs in the transaction that added it NOT VALID, which still holds that statement's lock on {table}: the scan blocks the application as if NOT VALID were not there"
                    ),
                    format!(
                        "validate it in a later revision, or mark this revision `-- upshift:no-transaction` so that the ADD CONSTRAINT commits (and lets go of {table}) first"
                    ),
                );
            }
            if let Some(column) = schema.not_null_checks.get(&key).cloned() {
                self.validated(schema, table, column);
            }
        }
    }

    /// `ALTER [COLUMN] column ...` of an existing table.
    fn alter_column(&mut self, table: &str, at: &mut Cursor<'_, '_>, line: usize, schema: &Schema) {
        at.eat("COLUMN");
        let Some(column) = at.name() else { return };
        if at.eat("TYPE") || at.eat_all(&["SET", "DATA", "TYPE"]) {
            self.hit(
                Rule::ColumnTypeChange,
                line,
                at.statement,
                format!(
                    "ALTER COLUMN {column} TYPE on {table} rewrites the table and rebuilds its indexes under an ACCESS EXCLUSIVE lock (unless the new type is binary-compatible, such as varchar(n) to text or to a longer varchar): the application's reads and writes on {table} wait for the rewrite, and the old code may not handle the new type"
                ),
                format!(
                    "add a column of the new type, fill it in batches and keep it in sync (a trigger) while the old code runs, move the code to it, and drop {column} in a contract revision; for a binary-compatible change, allow this finding and say so"
                ),
            );
        } else if at.eat_all(&["SET", "NOT", "NULL"]) {
            if schema.validated.contains(&(table.to_owned(), column.clone())) {
                return;
            }
            self.hit(
                Rule::SetNotNullWithoutCheck,
                line,
                at.statement,
                format!(
                    "SET NOT NULL on {table}.{column} scans every row under an ACCESS EXCLUSIVE lock: the application's reads and writes on {table} wait for the whole scan"
                ),
                format!(
                    "first `ALTER TABLE {table} ADD CONSTRAINT {table}_{column}_not_null CHECK ({column} IS NOT NULL) NOT VALID;`, then `ALTER TABLE {table} VALIDATE CONSTRAINT {table}_{column}_not_null;` in a later revision (or a `-- upshift:no-transaction` one); with that check validated, PostgreSQL 12+ sets NOT NULL without the scan (then drop the check)"
                ),
            );
        }
    }

    /// `RENAME ...` of an existing table.
    fn rename(&mut self, table: &str, at: &mut Cursor<'_, '_>, line: usize) {
        if at.peek_is("CONSTRAINT") {
            return;
        }
        let expand = self.expand_revision();
        if at.eat("TO") {
            let new = at.name().unwrap_or_default();
            let hit = Hit {
                rule: Rule::RenameTable,
                line,
                statement: Some(at.statement),
                message: format!(
                    "RENAME of table {table} to {new} in {expand}: the old code runs until the new code is verified and fails on the name {table}"
                ),
                fix: format!(
                    "keep the old name working: in the same revision, `CREATE VIEW {table} AS SELECT * FROM {new};` (a simple view is read and written like the table), and drop the view in a `-- upshift:phase contract` revision"
                ),
            };
            self.state.renamed_tables.push((table.to_owned(), hit));
        } else {
            at.eat("COLUMN");
            let Some(column) = at.name() else { return };
            let new = if at.eat("TO") { at.name().unwrap_or_default() } else { String::new() };
            self.hit(
                Rule::RenameColumn,
                line,
                at.statement,
                format!(
                    "RENAME COLUMN {column} of {table} to {new} in {expand}: the old code runs until the new code is verified, and its queries that name {column} fail"
                ),
                format!(
                    "add {new} beside {column} and keep the two in sync (a trigger) while the old code runs, move the code to {new}, and drop {column} in a `-- upshift:phase contract` revision"
                ),
            );
        }
    }

    fn add_constraint(&mut self, table: &str, at: &mut Cursor<'_, '_>, line: usize, schema: &mut Schema) {
        let action = at.rest();
        let name = constraint_name(at);
        let shown = name.clone().map_or_else(String::new, |n| format!(" {n}"));
        let not_valid = has_words(action, &["NOT", "VALID"]);
        if at.peek_is("CHECK") || at.peek_is("FOREIGN") {
            let check = at.peek_is("CHECK");
            if let Some(name) = &name
                && not_valid
                && !self.revision.no_transaction
            {
                self.state.not_valid_here.insert((table.to_owned(), name.clone()));
            }
            if let Some(column) = constraint_not_null_column(action) {
                if let Some(name) = &name {
                    schema.not_null_checks.insert((table.to_owned(), name.clone()), column.clone());
                }
                if !not_valid {
                    self.validated(schema, table, column);
                }
            }
            if not_valid {
                return;
            }
            let message = if check {
                format!(
                    "ADD CONSTRAINT{shown} CHECK on {table} checks every row while holding an ACCESS EXCLUSIVE lock: the application's reads and writes on {table} wait for the whole scan"
                )
            } else {
                let referenced = action
                    .iter()
                    .position(|t| t.is("REFERENCES"))
                    .and_then(|i| Cursor { tokens: &action[i + 1..], pos: 0, statement: line }.name())
                    .unwrap_or_else(|| "the table it references".to_owned());
                format!(
                    "ADD{} FOREIGN KEY on {table} checks every row while holding a SHARE ROW EXCLUSIVE lock on {table} and on {referenced}: the application's writes to both wait for the whole scan",
                    name.as_ref().map_or_else(String::new, |n| format!(" CONSTRAINT {n}"))
                )
            };
            let validate = name.unwrap_or_else(|| "name".to_owned());
            self.hit(
                Rule::ConstraintWithoutNotValid,
                line,
                at.statement,
                message,
                format!(
                    "add it with NOT VALID (new and changed rows are checked at once), then `ALTER TABLE {table} VALIDATE CONSTRAINT {validate};` in a later revision (or a `-- upshift:no-transaction` one): validating lets reads and writes go on"
                ),
            );
        } else if (at.peek_is("UNIQUE") || at.peek_is("PRIMARY")) && !has_words(action, &["USING", "INDEX"]) {
            let kind = if at.peek_is("UNIQUE") { "UNIQUE" } else { "PRIMARY KEY" };
            self.hit(
                Rule::UniqueWithoutIndex,
                line,
                at.statement,
                format!(
                    "ADD{shown} {kind} on {table} builds its index while holding an ACCESS EXCLUSIVE lock: the application's reads and writes on {table} wait for the whole build"
                ),
                format!(
                    "build the index first with `CREATE UNIQUE INDEX CONCURRENTLY` in a `-- upshift:no-transaction` revision, then `ALTER TABLE {table} ADD CONSTRAINT name {kind} USING INDEX index_name;`, which only attaches it"
                ),
            );
        }
    }

    /// `ADD COLUMN column <definition>` on an existing table.
    fn add_column(&mut self, table: &str, column: &str, definition: &[Token<'_>], line: usize, statement: usize) {
        let serial = definition.first().is_some_and(|t| SERIAL.iter().any(|s| t.is(s)));
        let default = depth_zero(definition).position(|(_, t)| t.is("DEFAULT"));
        let identity = has_words(definition, &["AS", "IDENTITY"]);
        let generated = has_words(definition, &["GENERATED"]) && !identity;
        let not_null = has_words(definition, &["NOT", "NULL"]);
        let volatile = default.and_then(|start| {
            let expression = definition[start + 1..]
                .iter()
                .take_while(|t| !COLUMN_CONSTRAINT.iter().any(|k| t.is(k)))
                .collect::<Vec<_>>();
            expression.windows(2).find_map(|w| {
                (w[0].kind == Kind::Word && w[1].is_symbol('(') && VOLATILE.iter().any(|f| w[0].is(f)))
                    .then(|| w[0].text.to_lowercase())
            })
        });
        if not_null && default.is_none() && !serial && !identity && !generated {
            self.hit(
                Rule::NotNullWithoutDefault,
                line,
                statement,
                format!(
                    "ADD COLUMN {column} NOT NULL without a DEFAULT on {table}: it fails when {table} has rows, and every INSERT of the old code, which does not know {column}, fails"
                ),
                "give it a constant DEFAULT (PostgreSQL 11+ adds it without rewriting the table), or add it nullable now and set NOT NULL in a contract revision, once the old code is gone and the rows are filled".to_owned(),
            );
        }
        let rewrite = if let Some(function) = volatile {
            Some(format!("a volatile default ({function}())"))
        } else if serial {
            Some("a serial type (its default is nextval(), which is volatile)".to_owned())
        } else if identity {
            Some("an identity".to_owned())
        } else if generated {
            Some("a stored generated value".to_owned())
        } else {
            None
        };
        if let Some(rewrite) = rewrite {
            self.hit(
                Rule::AddColumnRewritesTable,
                line,
                statement,
                format!(
                    "ADD COLUMN {column} with {rewrite} on {table} computes it for every existing row, rewriting the whole table under an ACCESS EXCLUSIVE lock: the application's reads and writes on {table} wait for the rewrite"
                ),
                format!(
                    "add {column} without a default (or with a constant one), then `ALTER TABLE {table} ALTER COLUMN {column} SET DEFAULT ...` for new rows, and fill the existing rows in batches"
                ),
            );
        }
        let unique = depth_zero(definition).any(|(_, t)| t.is("UNIQUE") || t.is("PRIMARY"));
        if unique {
            self.hit(
                Rule::UniqueWithoutIndex,
                line,
                statement,
                format!(
                    "ADD COLUMN {column} UNIQUE (or PRIMARY KEY) on {table} builds its index while holding an ACCESS EXCLUSIVE lock: the application's reads and writes on {table} wait for the whole build"
                ),
                format!(
                    "add {column} without the constraint, build the index with `CREATE UNIQUE INDEX CONCURRENTLY` in a `-- upshift:no-transaction` revision, then `ALTER TABLE {table} ADD CONSTRAINT name UNIQUE USING INDEX index_name;`"
                ),
            );
        }
    }
}

/// Whether a `lock_timeout` value turns the timeout on (`0` and `DEFAULT` turn it off).
fn timeout_is_set(value: &Token<'_>) -> bool {
    let text = match value.kind {
        Kind::String => value.string_value().unwrap_or_default(),
        Kind::Number => value.text.to_owned(),
        _ => return false,
    };
    let digits: String = text.trim().chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    digits.parse::<f64>().is_ok_and(|n| n > 0.0)
}

/// Reads `CONSTRAINT name` if it is there.
fn constraint_name(at: &mut Cursor<'_, '_>) -> Option<String> {
    if at.eat("CONSTRAINT") { at.name() } else { None }
}

/// The column of a `CHECK (column IS NOT NULL)` constraint.
fn constraint_not_null_column(action: &[Token<'_>]) -> Option<String> {
    let check = action.iter().position(|t| t.is("CHECK"))?;
    let inside: Vec<&Token<'_>> =
        action[check + 1..].iter().filter(|t| !t.is_symbol('(') && !t.is_symbol(')')).collect();
    match inside.as_slice() {
        [column, is, not, null, rest @ ..]
            if is.is("IS") && not.is("NOT") && null.is("NULL") && rest.iter().all(|t| t.is("NOT") || t.is("VALID")) =>
        {
            column.identifier()
        }
        _ => None,
    }
}

/// The tokens outside any parentheses, with their positions.
fn depth_zero<'s, 'a>(tokens: &'s [Token<'a>]) -> impl Iterator<Item = (usize, &'s Token<'a>)> {
    let mut depth = 0usize;
    tokens.iter().enumerate().filter(move |(_, t)| {
        if t.is_symbol('(') {
            depth += 1;
            false
        } else if t.is_symbol(')') {
            depth = depth.saturating_sub(1);
            false
        } else {
            depth == 0
        }
    })
}

/// Whether `words` appear one after the other outside parentheses.
fn has_words(tokens: &[Token<'_>], words: &[&str]) -> bool {
    let outside: Vec<&Token<'_>> = depth_zero(tokens).map(|(_, t)| t).collect();
    outside.windows(words.len()).any(|w| w.iter().zip(words).all(|(t, k)| t.is(k)))
}

/// Splits at the commas outside parentheses (the actions of an ALTER TABLE).
fn split_commas<'s, 'a>(tokens: &'s [Token<'a>]) -> Vec<&'s [Token<'a>]> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut depth = 0usize;
    for (i, t) in tokens.iter().enumerate() {
        if t.is_symbol('(') {
            depth += 1;
        } else if t.is_symbol(')') {
            depth = depth.saturating_sub(1);
        } else if depth == 0 && (t.is_symbol(',') || t.is_symbol(';')) {
            parts.push(&tokens[start..i]);
            start = i + 1;
        }
    }
    parts.push(&tokens[start..]);
    parts.retain(|p| !p.is_empty());
    parts
}

/// A position in a statement's tokens.
struct Cursor<'s, 'a> {
    tokens: &'s [Token<'a>],
    pos: usize,
    /// The statement's first line.
    statement: usize,
}

impl<'s, 'a> Cursor<'s, 'a> {
    fn peek(&self) -> Option<&'s Token<'a>> {
        self.tokens.get(self.pos)
    }

    fn peek_is(&self, keyword: &str) -> bool {
        self.peek().is_some_and(|t| t.is(keyword))
    }

    fn bump(&mut self) -> Option<&'s Token<'a>> {
        let token = self.peek()?;
        self.pos += 1;
        Some(token)
    }

    fn eat(&mut self, keyword: &str) -> bool {
        let found = self.peek_is(keyword);
        if found {
            self.pos += 1;
        }
        found
    }

    fn eat_symbol(&mut self, symbol: char) -> bool {
        let found = self.peek().is_some_and(|t| t.is_symbol(symbol));
        if found {
            self.pos += 1;
        }
        found
    }

    /// Eats all of `keywords` in order, or none of them.
    fn eat_all(&mut self, keywords: &[&str]) -> bool {
        let found = keywords.iter().enumerate().all(|(i, k)| self.tokens.get(self.pos + i).is_some_and(|t| t.is(k)));
        if found {
            self.pos += keywords.len();
        }
        found
    }

    /// A possibly qualified name (`schema.table`); its last part, folded.
    fn name(&mut self) -> Option<String> {
        let mut name = self.bump()?.identifier()?;
        while self.eat_symbol('.') {
            name = self.bump()?.identifier()?;
        }
        Some(name)
    }

    /// Comma-separated names, up to the first token that is not part of one.
    fn names(&mut self) -> Vec<String> {
        let mut names = Vec::new();
        while let Some(name) = self.name() {
            names.push(name);
            if !self.eat_symbol(',') {
                break;
            }
        }
        names
    }

    fn rest(&self) -> &'s [Token<'a>] {
        &self.tokens[self.pos.min(self.tokens.len())..]
    }

    /// The line of the next token (or the statement's, at the end).
    fn line(&self) -> usize {
        self.peek().map_or(self.statement, |t| t.line)
    }
}
