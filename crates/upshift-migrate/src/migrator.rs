//! The logic every engine shares: targets, plans, checks, and running steps under the lock.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::engine::{AppliedRevision, Direction, Engine, PreparedStatement, Step, TABLE, table_ddl};
use crate::error::Error;
use crate::external::{External, ExternalEngine};
use crate::graph::Graph;
use crate::lexer::{self, Dialect};
use crate::source::{self, Revision};
use crate::url::DatabaseUrl;

/// Where `up` goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpTarget {
    /// Every pending revision (the history must have one head).
    Heads,
    /// The next N pending revisions.
    Next(usize),
    /// The revision and everything it follows.
    Revision(String),
}

/// Where `down` goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DownTarget {
    /// Revert everything.
    Base,
    /// The last N applied revisions.
    Last(usize),
    /// Revert everything applied that does not lead to this revision; it stays applied.
    Revision(String),
    /// Revert exactly these revisions where they are still applied (an undo of a run that
    /// recorded what it applied): one already reverted is skipped, so reverting twice does
    /// nothing the second time. Refused when an applied revision outside the set follows
    /// one of them.
    Exactly(Vec<String>),
}

fn count(text: &str, what: &str) -> Result<usize, Error> {
    match text.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(Error::Target(format!("`{what}` needs a positive count, not `{text}`"))),
    }
}

impl FromStr for UpTarget {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        Ok(match text {
            "heads" | "head" => UpTarget::Heads,
            _ if text.starts_with('+') => UpTarget::Next(count(&text[1..], "+N")?),
            _ if text.starts_with('-') => {
                return Err(Error::Target(format!("`{text}` goes down: use `upshift migrate down {text}`")));
            }
            _ => UpTarget::Revision(text.to_owned()),
        })
    }
}

impl FromStr for DownTarget {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        Ok(match text {
            "base" => DownTarget::Base,
            _ if text.starts_with('-') => DownTarget::Last(count(&text[1..], "-N")?),
            _ if text.starts_with('+') => {
                return Err(Error::Target(format!("`{text}` goes up: use `upshift migrate up {text}`")));
            }
            _ => DownTarget::Revision(text.to_owned()),
        })
    }
}

/// Where the database stands against the migrations folder.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// Applied revisions, in the order they can be applied.
    pub applied: Vec<String>,
    /// Revisions not applied yet, in the order `up` would apply them.
    pub pending: Vec<String>,
    /// The heads of the graph.
    pub heads: Vec<String>,
    /// The applied revisions that no applied revision follows.
    pub current: Vec<String>,
    /// Applied revisions whose file is gone.
    pub vanished: Vec<String>,
    /// Applied revisions whose up section changed since.
    pub drifted: Vec<String>,
}

/// The migrations of one folder, checked, and what can be done with them.
#[derive(Debug)]
pub struct Migrator {
    dir: PathBuf,
    graph: Graph,
    /// The tool that runs the revisions, when they are not upshift's own files.
    external: Option<External>,
}

impl Migrator {
    /// Reads and checks the folder: file format, duplicate ids, parents, cycles.
    pub fn load(dir: &Path) -> Result<Migrator, Error> {
        Migrator::load_with(dir, &[])
    }

    /// Reads `dir`, running the revisions `no_transaction` names outside a transaction
    /// (the manifest's `[database] no_transaction`, so nobody edits upstream files). An id
    /// that names no revision is refused.
    pub fn load_with(dir: &Path, no_transaction: &[String]) -> Result<Migrator, Error> {
        let mut revisions = source::read_dir(dir)?;
        for id in no_transaction {
            let revision = revisions.iter_mut().find(|r| &r.id == id).ok_or_else(|| {
                Error::Target(format!(
                    "[database] no_transaction names {id}, which is not a revision in {}",
                    dir.display()
                ))
            })?;
            revision.no_transaction = true;
        }
        let graph = Graph::new(revisions)?;
        Ok(Migrator { dir: dir.to_path_buf(), graph, external: None })
    }

    /// Asks an external tool (Alembic, or any tool's commands) for its revisions; the
    /// tool runs them.
    pub fn load_external(external: &External) -> Result<Migrator, Error> {
        let graph = Graph::new(external.revisions()?)?;
        Ok(Migrator { dir: external.dir(), graph, external: Some(external.clone()) })
    }

    /// The external tool that runs the revisions, if any.
    pub fn external(&self) -> Option<&External> {
        self.external.as_ref()
    }

    /// Opens the database the revisions run against: upshift's engine for its own files,
    /// the external tool's otherwise. With `create` false a missing SQLite file is not made.
    pub fn connect(&self, url: &DatabaseUrl, create: bool) -> Result<Box<dyn Engine>, Error> {
        match &self.external {
            Some(external) => Ok(Box::new(ExternalEngine::connect(external, url, self.graph.revisions())?)),
            None => crate::engine::connect(url, create),
        }
    }

    /// Refuses what only upshift's own SQL files can do.
    fn own_files(&self, what: &str, instead: &str) -> Result<(), Error> {
        match &self.external {
            Some(external) => Err(Error::Target(format!(
                "{what} works on upshift's own SQL files; the revisions here are {}'s: {instead}",
                external.name()
            ))),
            None => Ok(()),
        }
    }

    /// The revision graph.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The migrations folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Compares the applied rows with the files.
    pub fn status(&self, applied: &[AppliedRevision]) -> Status {
        let rows: HashMap<&str, &AppliedRevision> = applied.iter().map(|r| (r.id.as_str(), r)).collect();
        let set = self.applied_set(applied);
        let ids = |indexes: &mut dyn Iterator<Item = usize>| -> Vec<String> {
            indexes.map(|i| self.graph.revision(i).id.clone()).collect()
        };
        let mut vanished: Vec<String> =
            applied.iter().filter(|r| self.graph.find(&r.id).is_none()).map(|r| r.id.clone()).collect();
        vanished.sort_by(|a, b| source::compare_ids(a, b));
        let topological = self.graph.topological();
        Status {
            applied: ids(&mut topological.iter().copied().filter(|i| set.contains(i))),
            pending: ids(&mut topological.iter().copied().filter(|i| !set.contains(i))),
            heads: ids(&mut self.graph.heads().into_iter()),
            current: ids(&mut self.graph.tips(&set).into_iter()),
            drifted: ids(&mut topological.iter().copied().filter(|&i| {
                let revision = self.graph.revision(i);
                rows.get(revision.id.as_str()).is_some_and(|row| row.checksum != revision.checksum)
            })),
            vanished,
        }
    }

    /// Refuses an applied set that no longer matches the files (changed or deleted).
    pub fn check_applied(&self, applied: &[AppliedRevision]) -> Result<(), Error> {
        for row in applied {
            let Some(index) = self.graph.find(&row.id) else {
                return Err(Error::Vanished { id: row.id.clone(), dir: self.dir.clone() });
            };
            let revision = self.graph.revision(index);
            if revision.checksum != row.checksum {
                return Err(Error::Drift {
                    id: row.id.clone(),
                    path: revision.path.clone(),
                    applied: row.checksum.clone(),
                    current: revision.checksum.clone(),
                });
            }
        }
        Ok(())
    }

    fn applied_set(&self, applied: &[AppliedRevision]) -> BTreeSet<usize> {
        applied.iter().filter_map(|r| self.graph.find(&r.id)).collect()
    }

    fn find(&self, id: &str) -> Result<usize, Error> {
        self.graph.find(id).ok_or_else(|| {
            Error::Target(format!("no revision `{id}` in {}; `upshift migrate history` lists them", self.dir.display()))
        })
    }

    /// Refuses two heads: branches that met in version control and were not merged. An
    /// external tool owns its graph, and its heads may be meant (Alembic's expand and
    /// contract branches): `heads` is all of them, as `alembic upgrade heads` says.
    fn single_head(&self) -> Result<(), Error> {
        let heads = self.graph.heads();
        if heads.len() > 1 && self.external.is_none() {
            return Err(Error::MultipleHeads {
                heads: heads.into_iter().map(|i| self.graph.revision(i).id.clone()).collect(),
            });
        }
        Ok(())
    }

    /// Checks what can be checked of an `up` target without the database.
    pub fn check_up_target(&self, target: &UpTarget) -> Result<(), Error> {
        match target {
            UpTarget::Heads | UpTarget::Next(_) => self.single_head(),
            UpTarget::Revision(id) => self.find(id).map(drop),
        }
    }

    /// The revisions `up` runs, in order.
    pub fn plan_up(&self, applied: &[AppliedRevision], target: &UpTarget) -> Result<Vec<usize>, Error> {
        self.check_up_target(target)?;
        let set = self.applied_set(applied);
        let pending = self.graph.topological().iter().copied().filter(|i| !set.contains(i));
        Ok(match target {
            UpTarget::Heads => pending.collect(),
            UpTarget::Next(n) => {
                let plan: Vec<usize> = pending.take(*n).collect();
                if plan.len() < *n {
                    return Err(Error::Target(format!("`+{n}`: only {} revisions are pending", plan.len())));
                }
                plan
            }
            UpTarget::Revision(id) => {
                let wanted = self.graph.ancestors(self.find(id)?);
                pending.filter(|i| wanted.contains(i)).collect()
            }
        })
    }

    /// The revisions `down` reverts, in order. Checks that each has a down section.
    pub fn plan_down(&self, applied: &[AppliedRevision], target: &DownTarget) -> Result<Vec<usize>, Error> {
        let set = self.applied_set(applied);
        let applied_at: HashMap<usize, &str> =
            applied.iter().filter_map(|r| Some((self.graph.find(&r.id)?, r.applied_at.as_str()))).collect();
        let plan = match target {
            DownTarget::Base => self.revert_order(set, &applied_at),
            DownTarget::Last(n) => {
                let order = self.revert_order(set, &applied_at);
                if order.len() < *n {
                    return Err(Error::Target(format!("`-{n}`: only {} revisions are applied", order.len())));
                }
                order.into_iter().take(*n).collect()
            }
            DownTarget::Exactly(ids) => {
                let wanted: BTreeSet<usize> = ids.iter().map(|id| self.find(id)).collect::<Result<BTreeSet<_>, _>>()?;
                let revert: BTreeSet<usize> = set.intersection(&wanted).copied().collect();
                for &index in &revert {
                    let blocker = set.difference(&revert).find(|&&other| self.graph.ancestors(other).contains(&index));
                    if let Some(&other) = blocker {
                        return Err(Error::Target(format!(
                            "revision {} cannot be reverted alone: {} follows it and stays applied",
                            self.graph.revision(index).id,
                            self.graph.revision(other).id
                        )));
                    }
                }
                self.revert_order(revert, &applied_at)
            }
            DownTarget::Revision(id) => {
                let index = self.find(id)?;
                if !set.contains(&index) {
                    return Err(Error::Target(format!(
                        "revision {id} is not applied, so `down` cannot stop at it; `upshift migrate status` shows what is"
                    )));
                }
                let keep = self.graph.ancestors(index);
                self.revert_order(set.difference(&keep).copied().collect(), &applied_at)
            }
        };
        for &index in &plan {
            let revision = self.graph.revision(index);
            if !revision.reversible() {
                return Err(Error::NoDown { id: revision.id.clone(), path: revision.path.clone() });
            }
        }
        Ok(plan)
    }

    /// Orders `set` for reverting: always a revision that nothing left in the set follows,
    /// the most recently applied first (ties: the later in graph order).
    fn revert_order(&self, mut set: BTreeSet<usize>, applied_at: &HashMap<usize, &str>) -> Vec<usize> {
        let position: HashMap<usize, usize> =
            self.graph.topological().iter().enumerate().map(|(p, &i)| (i, p)).collect();
        let mut order = Vec::with_capacity(set.len());
        while !set.is_empty() {
            let next = self
                .graph
                .tips(&set)
                .into_iter()
                .max_by_key(|i| (applied_at.get(i).copied().unwrap_or(""), position[i]))
                .expect("a non-empty set has a tip");
            set.remove(&next);
            order.push(next);
        }
        order
    }

    /// Splits the statements of each planned revision. Every script is lexed before any
    /// runs, so a malformed file stops the run before it starts.
    pub fn steps(&self, plan: &[usize], direction: Direction, dialect: Dialect) -> Result<Vec<Step<'_>>, Error> {
        plan.iter()
            .map(|&index| {
                let revision = self.graph.revision(index);
                if revision.origin == source::Origin::Tool {
                    return Ok(Step { revision, direction, statements: Vec::new() });
                }
                let section = match direction {
                    Direction::Up => &revision.up,
                    Direction::Down => revision
                        .down
                        .as_ref()
                        .ok_or_else(|| Error::NoDown { id: revision.id.clone(), path: revision.path.clone() })?,
                };
                let statements = lexer::split(&section.sql, dialect)
                    .map_err(|e| Error::File {
                        path: section.path.clone(),
                        line: Some(section.first_line + e.line - 1),
                        message: format!("unterminated {}; close it or check the quotes before it", e.what),
                    })?
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .map(|s| PreparedStatement { sql: s.sql().to_owned(), line: section.first_line + s.line - 1 })
                    .collect::<Vec<_>>();
                if direction == Direction::Up && statements.is_empty() && self.graph.parents(index).len() < 2 {
                    return Err(Error::File {
                        path: section.path.clone(),
                        line: Some(section.first_line),
                        message: format!(
                            "revision {} has an empty up section (an unedited `upshift migrate new` file?); write its SQL, or delete the file",
                            revision.id
                        ),
                    });
                }
                let step = Step { revision, direction, statements };
                if !step.no_transaction() {
                    // A down file of its own (a pair, a diesel folder) can say it alone.
                    let marker = if direction == Direction::Down && section.path != revision.path {
                        "add `-- no-transaction` as the first line of this down file"
                    } else {
                        "add `-- upshift:no-transaction` to the file's header"
                    };
                    for statement in &step.statements {
                        if let Some(message) = refused_in_a_transaction(&statement.sql, dialect, marker) {
                            return Err(Error::File {
                                path: section.path.clone(),
                                line: Some(statement.line),
                                message,
                            });
                        }
                    }
                }
                Ok(step)
            })
            .collect()
    }

    /// Applies revisions up to `target` under the lock. `done` hears of each revision as
    /// it is committed, so a caller knows what stays applied when a later one fails.
    pub fn up(
        &self,
        engine: &mut dyn Engine,
        target: &UpTarget,
        lock_timeout: Duration,
        done: &mut dyn FnMut(&Revision, Duration),
    ) -> Result<(), Error> {
        self.check_up_target(target)?;
        self.run_locked(engine, lock_timeout, Direction::Up, |applied| self.plan_up(applied, target), done)
    }

    /// Reverts revisions down to `target` under the lock; `done` as for [`Migrator::up`].
    pub fn down(
        &self,
        engine: &mut dyn Engine,
        target: &DownTarget,
        lock_timeout: Duration,
        done: &mut dyn FnMut(&Revision, Duration),
    ) -> Result<(), Error> {
        match target {
            DownTarget::Revision(id) => drop(self.find(id)?),
            DownTarget::Exactly(ids) => ids.iter().try_for_each(|id| self.find(id).map(drop))?,
            DownTarget::Base | DownTarget::Last(_) => {}
        }
        self.run_locked(engine, lock_timeout, Direction::Down, |applied| self.plan_down(applied, target), done)
    }

    /// Under the lock: reads the applied set (only now, so concurrent runs see each other's
    /// work), refuses drift, plans, lexes every script, then runs the steps.
    fn run_locked(
        &self,
        engine: &mut dyn Engine,
        lock_timeout: Duration,
        direction: Direction,
        plan: impl FnOnce(&[AppliedRevision]) -> Result<Vec<usize>, Error>,
        done: &mut dyn FnMut(&Revision, Duration),
    ) -> Result<(), Error> {
        locked(engine, lock_timeout, |engine| {
            let applied = engine.applied()?;
            self.check_applied(&applied)?;
            let steps = self.steps(&plan(&applied)?, direction, engine.dialect())?;
            run(engine, &steps, done)
        })
    }

    /// Records `id` and every revision it follows as applied, without running them: for a
    /// database whose schema already is at `id`. Returns the ids recorded.
    pub fn baseline(&self, engine: &mut dyn Engine, id: &str, lock_timeout: Duration) -> Result<Vec<String>, Error> {
        self.own_files("`baseline`", "`alembic stamp` (or the tool's own) records a revision without running it")?;
        let index = self.find(id)?;
        locked(engine, lock_timeout, |engine| {
            let applied = engine.applied()?;
            self.check_applied(&applied)?;
            let plan = self.plan_up(&applied, &UpTarget::Revision(self.graph.revision(index).id.clone()))?;
            let mut recorded = Vec::new();
            for &i in &plan {
                let revision = self.graph.revision(i);
                engine.execute(&Step { revision, direction: Direction::Up, statements: Vec::new() })?;
                recorded.push(revision.id.clone());
            }
            Ok(recorded)
        })
    }

    /// The SQL `up` or `down` would run from an empty (for up) or fully applied (for
    /// down) database to `target`, with the bookkeeping, as one script. Nothing runs.
    pub fn sql(&self, direction: Direction, target: Option<&str>, dialect: Dialect) -> Result<String, Error> {
        let plan = match direction {
            Direction::Up => self.plan_up(&[], &target.unwrap_or("heads").parse()?)?,
            Direction::Down => {
                let all: Vec<AppliedRevision> = self
                    .graph
                    .revisions()
                    .iter()
                    .map(|r| AppliedRevision {
                        id: r.id.clone(),
                        checksum: r.checksum.clone(),
                        phase: r.phase.as_str().to_owned(),
                        applied_at: String::new(),
                        duration_ms: 0,
                    })
                    .collect();
                self.plan_down(&all, &target.unwrap_or("base").parse()?)?
            }
        };
        self.render_sql(&plan, direction, dialect)
    }

    /// The SQL script of `plan` (revision indexes, in the order they would run), with the
    /// bookkeeping table and rows, as `sql` prints it.
    pub fn render_sql(&self, plan: &[usize], direction: Direction, dialect: Dialect) -> Result<String, Error> {
        self.own_files("printing the SQL", "`alembic upgrade --sql` (or the tool's own) prints theirs")?;
        let steps = self.steps(plan, direction, dialect)?;
        let mut script = format!("{};\n", table_ddl(dialect));
        for step in &steps {
            let revision = step.revision;
            let way = if direction == Direction::Up { "up" } else { "down" };
            let _ = writeln!(script, "\n-- revision {} ({}), {}, {way}", revision.id, revision.name, revision.phase);
            if step.no_transaction() {
                script.push_str("-- no-transaction: each statement commits on its own\n");
            } else {
                script.push_str("BEGIN;\n");
            }
            for statement in &step.statements {
                script.push_str(&statement.sql);
                if !statement.sql.ends_with(';') {
                    script.push(';');
                }
                script.push('\n');
            }
            let quote = |text: &str| format!("'{}'", text.replace('\'', "''"));
            match direction {
                Direction::Up => {
                    let now = if dialect == Dialect::Postgres {
                        "clock_timestamp()"
                    } else {
                        "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
                    };
                    let _ = writeln!(
                        script,
                        "INSERT INTO {TABLE} (revision, name, checksum, phase, applied_at, duration_ms) VALUES ({}, {}, {}, {}, {now}, 0);",
                        quote(&revision.id),
                        quote(&revision.name),
                        quote(&revision.checksum),
                        quote(revision.phase.as_str()),
                    );
                }
                Direction::Down => {
                    let _ = writeln!(script, "DELETE FROM {TABLE} WHERE revision = {};", quote(&revision.id));
                }
            }
            if !step.no_transaction() {
                script.push_str("COMMIT;\n");
            }
        }
        Ok(script)
    }
}

/// The first words of a statement, upper-cased, after any leading comments.
fn first_words(sql: &str, count: usize) -> Vec<String> {
    let mut rest = sql.trim_start();
    loop {
        if let Some(line) = rest.strip_prefix("--") {
            rest = line.split_once('\n').map_or("", |(_, after)| after).trim_start();
        } else if let Some(block) = rest.strip_prefix("/*") {
            rest = block.split_once("*/").map_or("", |(_, after)| after).trim_start();
        } else {
            break;
        }
    }
    rest.split(|c: char| c.is_whitespace() || c == ';' || c == '(')
        .filter(|w| !w.is_empty())
        .take(count)
        .map(str::to_ascii_uppercase)
        .collect()
}

/// Why `sql` cannot run in a revision that upshift runs in one transaction, if it cannot:
/// transaction control of its own, or a statement the server refuses inside a transaction
/// block. Said before anything runs, with the fix.
fn refused_in_a_transaction(sql: &str, dialect: Dialect, marker: &str) -> Option<String> {
    let words = first_words(sql, 4);
    let word = |i: usize| words.get(i).map_or("", String::as_str);
    let control = match word(0) {
        "BEGIN" if word(1) != "ATOMIC" => true,
        "COMMIT" | "ROLLBACK" | "END" | "ABORT" => true,
        "START" => word(1) == "TRANSACTION",
        _ => false,
    };
    if control {
        return Some(format!(
            "`{}` controls the transaction itself, but upshift runs this revision in one transaction with its bookkeeping row (a COMMIT here would end it early, and a failure after it would leave part of the revision applied and unrecorded); remove the transaction statements (the revision stays atomic), or {marker}",
            word(0)
        ));
    }
    let concurrently = words.iter().any(|w| w == "CONCURRENTLY");
    let outside_only = matches!(
        (dialect, word(0), word(1)),
        (Dialect::Postgres, "CREATE" | "DROP" | "REINDEX", _) if concurrently
    ) || matches!(
        (dialect, word(0), word(1)),
        (Dialect::Postgres, "CREATE" | "DROP", "DATABASE" | "TABLESPACE")
            | (Dialect::Postgres, "ALTER", "SYSTEM")
            | (_, "VACUUM", _)
    );
    outside_only.then(|| {
        format!(
            "`{}` cannot run inside a transaction block, and upshift runs this revision in one; {marker} (its statements then run one by one, and a failure says which stayed applied)",
            words.join(" ")
        )
    })
}

/// Runs `work` holding the migration lock, and releases it whatever happens.
fn locked<T>(
    engine: &mut dyn Engine,
    timeout: Duration,
    work: impl FnOnce(&mut dyn Engine) -> Result<T, Error>,
) -> Result<T, Error> {
    engine.lock(timeout)?;
    let result = work(engine);
    let unlocked = engine.unlock();
    let value = result?;
    unlocked?;
    Ok(value)
}

fn run(engine: &mut dyn Engine, steps: &[Step<'_>], done: &mut dyn FnMut(&Revision, Duration)) -> Result<(), Error> {
    for step in steps {
        let duration = engine.execute(step)?;
        done(step.revision, duration);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::tests::revision;

    #[test]
    fn statements_a_transaction_cannot_hold_are_named() {
        let refused = |sql: &str| refused_in_a_transaction(sql, Dialect::Postgres, "add `-- upshift:no-transaction`");
        assert!(refused("BEGIN").unwrap().contains("`BEGIN` controls the transaction"));
        assert!(refused("-- done\nCOMMIT").is_some());
        assert!(refused("start transaction isolation level serializable").is_some());
        assert!(
            refused("CREATE INDEX CONCURRENTLY notes_body ON notes (body)").unwrap().contains("upshift:no-transaction")
        );
        assert!(refused("create unique index concurrently i on t (c)").is_some());
        assert!(refused("VACUUM ANALYZE notes").is_some());
        assert!(refused("ALTER SYSTEM SET work_mem = '64MB'").is_some());
        for fine in [
            "CREATE INDEX notes_body ON notes (body)",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END",
            "DO $$ BEGIN RAISE NOTICE 'x'; END $$",
            "UPDATE t SET begin_at = now()",
            "SAVEPOINT a",
        ] {
            assert!(refused(fine).is_none(), "{fine}");
        }
        assert!(
            refused_in_a_transaction("CREATE TRIGGER t AFTER INSERT ON a BEGIN SELECT 1; END", Dialect::Sqlite, "")
                .is_none()
        );
    }

    fn migrator(revisions: Vec<Revision>) -> Migrator {
        Migrator { dir: PathBuf::from("migrations"), graph: Graph::new(revisions).unwrap(), external: None }
    }

    fn applied(m: &Migrator, ids: &[(&str, &str)]) -> Vec<AppliedRevision> {
        ids.iter()
            .map(|(id, at)| AppliedRevision {
                id: (*id).to_owned(),
                checksum: m.graph.revision(m.graph.find(id).unwrap()).checksum.clone(),
                phase: "expand".into(),
                applied_at: (*at).to_owned(),
                duration_ms: 0,
            })
            .collect()
    }

    fn ids(m: &Migrator, plan: &[usize]) -> Vec<String> {
        plan.iter().map(|&i| m.graph.revision(i).id.clone()).collect()
    }

    fn branched() -> Migrator {
        migrator(vec![
            revision("1", None),
            revision("2", Some(&["1"])),
            revision("3", Some(&["1"])),
            revision("4", Some(&["2", "3"])),
        ])
    }

    #[test]
    fn targets_parse() {
        assert_eq!("heads".parse::<UpTarget>().unwrap(), UpTarget::Heads);
        assert_eq!("+2".parse::<UpTarget>().unwrap(), UpTarget::Next(2));
        assert_eq!("-1".parse::<DownTarget>().unwrap(), DownTarget::Last(1));
        assert_eq!("base".parse::<DownTarget>().unwrap(), DownTarget::Base);
        assert!("+0".parse::<UpTarget>().is_err());
        assert!("-x".parse::<DownTarget>().is_err());
        assert!("-1".parse::<UpTarget>().unwrap_err().to_string().contains("migrate down"));
    }

    #[test]
    fn up_plans() {
        let m = branched();
        assert_eq!(ids(&m, &m.plan_up(&[], &UpTarget::Heads).unwrap()), ["1", "2", "3", "4"]);
        let a = applied(&m, &[("1", "t1"), ("3", "t2")]);
        assert_eq!(ids(&m, &m.plan_up(&a, &UpTarget::Heads).unwrap()), ["2", "4"]);
        assert_eq!(ids(&m, &m.plan_up(&a, &UpTarget::Next(1)).unwrap()), ["2"]);
        assert!(m.plan_up(&a, &UpTarget::Next(3)).is_err());
        assert_eq!(ids(&m, &m.plan_up(&[], &UpTarget::Revision("3".into())).unwrap()), ["1", "3"]);
    }

    #[test]
    fn two_heads_need_a_target() {
        let m = migrator(vec![revision("1", None), revision("2", Some(&["1"])), revision("3", Some(&["1"]))]);
        assert!(matches!(m.plan_up(&[], &UpTarget::Heads), Err(Error::MultipleHeads { .. })));
        assert!(matches!(m.plan_up(&[], &UpTarget::Next(1)), Err(Error::MultipleHeads { .. })));
        assert_eq!(ids(&m, &m.plan_up(&[], &UpTarget::Revision("2".into())).unwrap()), ["1", "2"]);
    }

    #[test]
    fn down_plans_follow_application_order() {
        let m = branched();
        let a = applied(&m, &[("1", "t1"), ("3", "t2"), ("2", "t3"), ("4", "t4")]);
        assert_eq!(ids(&m, &m.plan_down(&a, &DownTarget::Base).unwrap()), ["4", "2", "3", "1"]);
        assert_eq!(ids(&m, &m.plan_down(&a, &DownTarget::Last(2)).unwrap()), ["4", "2"]);
        assert_eq!(ids(&m, &m.plan_down(&a, &DownTarget::Revision("3".into())).unwrap()), ["4", "2"]);
        assert!(m.plan_down(&a, &DownTarget::Last(5)).is_err());
        let partly = applied(&m, &[("1", "t1")]);
        assert!(m.plan_down(&partly, &DownTarget::Revision("3".into())).is_err());
    }

    #[test]
    fn down_refuses_revisions_without_down() {
        let mut second = revision("2", None);
        second.down = None;
        let m = migrator(vec![revision("1", None), second, revision("3", None)]);
        let a = applied(&m, &[("1", "t1"), ("2", "t2"), ("3", "t3")]);
        assert_eq!(ids(&m, &m.plan_down(&a, &DownTarget::Last(1)).unwrap()), ["3"]);
        let err = m.plan_down(&a, &DownTarget::Base).unwrap_err();
        assert!(matches!(err, Error::NoDown { ref id, .. } if id == "2"), "{err}");
    }

    #[test]
    fn status_and_checks() {
        let m = branched();
        let mut a = applied(&m, &[("1", "t1"), ("2", "t2")]);
        let status = m.status(&a);
        assert_eq!(status.applied, ["1", "2"]);
        assert_eq!(status.pending, ["3", "4"]);
        assert_eq!(status.heads, ["4"]);
        assert_eq!(status.current, ["2"]);
        assert!(m.check_applied(&a).is_ok());
        a[1].checksum = "changed".into();
        assert!(matches!(m.check_applied(&a), Err(Error::Drift { .. })));
        assert_eq!(m.status(&a).drifted, ["2"]);
        a.push(AppliedRevision { id: "9".into(), ..a[0].clone() });
        assert_eq!(m.status(&a).vanished, ["9"]);
    }
}
