//! `upshift migrate` through the real binary, against real SQLite files and the real
//! throwaway PostgreSQL cluster.

mod common;

use std::process::Stdio;

use common::{Context, LintFinding, Run};
use serde::Deserialize;

/// A database the tests can look into.
enum Db {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Db {
    fn sqlite(ctx: &Context) -> (Db, String) {
        (Db::Sqlite(ctx.join("app.db")), "sqlite:app.db".to_owned())
    }

    fn postgres() -> (Db, String) {
        let url = upshift_testing::fresh_database();
        (Db::Postgres(upshift_testing::database_name(&url).to_owned()), url)
    }

    fn count(&self, sql: &str) -> i64 {
        match self {
            Db::Sqlite(path) => rusqlite::Connection::open(path).unwrap().query_row(sql, [], |r| r.get(0)).unwrap(),
            Db::Postgres(name) => upshift_testing::postgres().connect(name).query_one(sql, &[]).unwrap().get(0),
        }
    }

    fn has_table(&self, table: &str) -> bool {
        match self {
            Db::Sqlite(path) => {
                path.exists()
                    && self
                        .count(&format!("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '{table}'"))
                        == 1
            }
            Db::Postgres(_) => self.count(&format!("SELECT count(*) FROM pg_tables WHERE tablename = '{table}'")) == 1,
        }
    }
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Status {
    applied: Vec<String>,
    pending: Vec<String>,
    heads: Vec<String>,
    current: Vec<String>,
    drifted: Vec<String>,
    vanished: Vec<String>,
    #[serde(default)]
    irreversible: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Applied {
    applied: Vec<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Reverted {
    reverted: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryEntry {
    id: String,
    name: String,
    parents: Vec<String>,
    phase: String,
    applied: bool,
    applied_at: Option<String>,
}

/// What `migrate new` and `migrate merge` print.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Created {
    id: String,
    path: String,
    parents: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Recorded {
    recorded: Vec<String>,
}

fn status(ctx: &Context, url: &str) -> Status {
    ctx.migrate(url, &["status", "--output", "json"]).success().json()
}

fn linear_three(ctx: &Context) {
    ctx.write(
        "migrations/1_users.sql",
        "-- upshift:up\nCREATE TABLE users (id int);\n-- upshift:down\nDROP TABLE users;\n",
    );
    ctx.write(
        "migrations/2_posts.sql",
        "-- upshift:up\nCREATE TABLE posts (id int);\n-- upshift:down\nDROP TABLE posts;\n",
    );
    ctx.write(
        "migrations/3_likes.sql",
        "-- upshift:phase contract\n-- upshift:up\nCREATE TABLE likes (id int);\n-- upshift:down\nDROP TABLE likes;\n",
    );
}

fn up_and_down(ctx: &Context, db: &Db, url: &str) {
    linear_three(ctx);
    assert_eq!(
        status(ctx, url),
        Status {
            applied: vec![],
            pending: vec!["1".into(), "2".into(), "3".into()],
            heads: vec!["3".into()],
            current: vec![],
            drifted: vec![],
            vanished: vec![],
            irreversible: vec![],
        }
    );
    let up: Applied = ctx.migrate(url, &["up", "--output", "json"]).success().json();
    assert_eq!(up.applied, ["1", "2", "3"]);
    assert!(up.error.is_none());
    assert!(db.has_table("likes"));
    assert_eq!(db.count("SELECT count(*) FROM upshift_migrations"), 3);
    assert_eq!(db.count("SELECT count(*) FROM upshift_migrations WHERE phase = 'contract'"), 1);

    let nothing: Applied = ctx.migrate(url, &["up", "--output", "json"]).success().json();
    assert!(nothing.applied.is_empty());

    let down: Reverted = ctx.migrate(url, &["down", "-1", "--output", "json"]).success().json();
    assert_eq!(down.reverted, ["3"]);
    assert!(!db.has_table("likes"));
    assert!(db.has_table("posts"));
    assert_eq!(status(ctx, url).current, ["2"]);

    let down: Reverted = ctx.migrate(url, &["down", "base", "--output", "json"]).success().json();
    assert_eq!(down.reverted, ["2", "1"]);
    assert!(!db.has_table("users"));
    assert_eq!(db.count("SELECT count(*) FROM upshift_migrations"), 0);

    // Up to a target, then +N.
    ctx.migrate(url, &["up", "1"]).success();
    assert_eq!(status(ctx, url).applied, ["1"]);
    ctx.migrate(url, &["up", "+1"]).success();
    assert_eq!(status(ctx, url).applied, ["1", "2"]);
    ctx.migrate(url, &["up", "+5"]).code(2).stderr_has("only 1 revisions are pending");
    // Down to a revision keeps that revision.
    ctx.migrate(url, &["up"]).success();
    let down: Reverted = ctx.migrate(url, &["down", "1", "--output", "json"]).success().json();
    assert_eq!(down.reverted, ["3", "2"]);
    assert_eq!(status(ctx, url).applied, ["1"]);
}

#[test]
fn sqlite_up_and_down() {
    let ctx = Context::new();
    let (db, url) = Db::sqlite(&ctx);
    up_and_down(&ctx, &db, &url);
}

#[test]
fn postgres_up_and_down() {
    let ctx = Context::new();
    let (db, url) = Db::postgres();
    up_and_down(&ctx, &db, &url);
}

/// A failing statement after others in one revision: exit 1, nothing of that revision
/// remains, and the revisions before it in the same run stay applied.
fn failure_leaves_no_trace(ctx: &Context, db: &Db, url: &str) {
    ctx.write("migrations/1_ok.sql", "-- upshift:up\nCREATE TABLE ok (id int);\n-- upshift:down\nDROP TABLE ok;\n");
    ctx.write(
        "migrations/2_bad.sql",
        "-- upshift:up\nCREATE TABLE half (id int);\nINSERT INTO half VALUES (1);\n\nINSERT INTO no_such_table VALUES (1);\n-- upshift:down\nDROP TABLE half;\n",
    );
    let run = ctx.migrate(url, &["up", "--output", "json"]);
    run.code(1).stderr_has("revision 2 failed at").stderr_has("2_bad.sql:5").stderr_has("nothing of it was applied");
    let partial: Applied = run.json();
    assert_eq!(partial.applied, ["1"]);
    assert!(partial.error.unwrap().contains("no_such_table"));
    assert!(!db.has_table("half"), "the first statements of the failed revision left a trace");
    assert!(db.has_table("ok"));
    assert_eq!(status(ctx, url).applied, ["1"]);
}

#[test]
fn sqlite_failure_leaves_no_trace() {
    let ctx = Context::new();
    let (db, url) = Db::sqlite(&ctx);
    failure_leaves_no_trace(&ctx, &db, &url);
}

#[test]
fn postgres_failure_leaves_no_trace() {
    let ctx = Context::new();
    let (db, url) = Db::postgres();
    failure_leaves_no_trace(&ctx, &db, &url);
}

/// A transactional revision goes to PostgreSQL as one message (BEGIN, statements, row,
/// COMMIT). What that must not change: a savepoint still works (an explicit transaction,
/// not an implicit block); a last statement ending in a line comment without `;` still
/// ends; a failure names its own line, also a syntax error, which stops the whole message
/// before it runs; the bookkeeping row survives quotes and backslashes in the name.
#[test]
fn postgres_revision_sent_as_one_batch() {
    let ctx = Context::new();
    let (db, url) = Db::postgres();
    ctx.write(
        "migrations/1_it's a \\ name.sql",
        "-- upshift:up\nSET standard_conforming_strings = off;\nCREATE TABLE a (x int);\nSAVEPOINT s;\nINSERT INTO a VALUES (1);\nRELEASE SAVEPOINT s;\nCREATE TABLE b (x int) -- no semicolon\n-- upshift:down\nDROP TABLE b;\nDROP TABLE a;\n",
    );
    ctx.migrate(&url, &["up"]).success();
    assert_eq!(db.count("SELECT count(*) FROM a"), 1);
    assert!(db.has_table("b"));
    assert_eq!(db.count("SELECT count(*) FROM upshift_migrations WHERE name = E'it\\'s a \\\\ name'"), 1);
    ctx.write(
        "migrations/2_syntax.sql",
        "-- upshift:up\nCREATE TABLE c (x int);\n\nCREATE TABLE d (x int;\nCREATE TABLE e (x int);\n",
    );
    ctx.migrate(&url, &["up"]).code(1).stderr_has("2_syntax.sql:4").stderr_has("syntax error");
    ctx.write(
        "migrations/2_syntax.sql",
        "-- upshift:up\nCREATE TABLE c (x int);\nCREATE TABLE d (x int);\nCREATE TABLE c (x int);\nCREATE TABLE e (x int);\n",
    );
    ctx.migrate(&url, &["up"]).code(1).stderr_has("2_syntax.sql:4").stderr_has("already exists");
    assert!(!db.has_table("c") && !db.has_table("d"), "a failed revision left a trace");
    assert_eq!(status(&ctx, &url).applied, ["1"]);
}

#[test]
fn postgres_lexer_cases_run_for_real() {
    let ctx = Context::new();
    let (db, url) = Db::postgres();
    ctx.write(
        "migrations/1_tricky.sql",
        r#"-- upshift:up
/* a comment; /* nested; */ still comment; */
CREATE TABLE "odd;name" ("semi;col" text, "quote""d" text);
INSERT INTO "odd;name" VALUES ('a;b', 'it''s; fine');
INSERT INTO "odd;name" VALUES (E'esc\'aped;', 'x'); -- trailing; comment
CREATE FUNCTION plpgsql_fn() RETURNS int LANGUAGE plpgsql AS $fn$
BEGIN
  -- a $$ inside the tagged body; not the end
  RETURN 1;
END
$fn$;
DO $$ BEGIN INSERT INTO "odd;name" VALUES ('from do;', 'y'); END $$;
CREATE FUNCTION atomic_fn(a int) RETURNS int LANGUAGE sql
BEGIN ATOMIC
  SELECT CASE WHEN a > 0 THEN a ELSE 0 END;
END;
-- upshift:down
DROP FUNCTION atomic_fn(int);
DROP FUNCTION plpgsql_fn();
DROP TABLE "odd;name";
"#,
    );
    ctx.migrate(&url, &["up"]).success();
    assert_eq!(db.count(r#"SELECT count(*) FROM "odd;name""#), 3);
    assert_eq!(db.count(r#"SELECT count(*) FROM "odd;name" WHERE "semi;col" = E'esc\'aped;'"#), 1);
    assert_eq!(db.count("SELECT plpgsql_fn()::bigint + atomic_fn(41)::bigint"), 42);
    ctx.migrate(&url, &["down", "base"]).success();
    assert!(!db.has_table("odd;name"));
}

#[test]
fn sqlite_lexer_cases_run_for_real() {
    let ctx = Context::new();
    let (db, url) = Db::sqlite(&ctx);
    ctx.write(
        "migrations/1_tricky.sql",
        "-- upshift:up\r\n\
         CREATE TABLE `odd;name` ([semi;col] TEXT, \"quote\"\"d\" TEXT);\r\n\
         CREATE TABLE audit (n INTEGER);\r\n\
         CREATE TRIGGER log_insert AFTER INSERT ON `odd;name` BEGIN\r\n\
         \tINSERT INTO audit VALUES (CASE WHEN new.[semi;col] = 'a;b' THEN 1 ELSE 2 END);\r\n\
         \tINSERT INTO audit VALUES (10);\r\n\
         END;\r\n\
         INSERT INTO `odd;name` VALUES ('a;b', 'it''s; fine'); /* c; */\r\n\
         -- upshift:down\r\n\
         DROP TABLE audit;\r\n\
         DROP TABLE `odd;name`;\r\n",
    );
    ctx.migrate(&url, &["up"]).success();
    assert_eq!(db.count("SELECT sum(n) FROM audit"), 11);
    ctx.migrate(&url, &["down", "base"]).success();
    assert!(!db.has_table("audit"));
}

#[test]
fn unterminated_quote_is_refused_before_anything_runs() {
    let ctx = Context::new();
    let (db, url) = Db::sqlite(&ctx);
    ctx.write("migrations/1_a.sql", "-- upshift:up\nCREATE TABLE a (id int);\n");
    ctx.write("migrations/2_b.sql", "-- upshift:up\nCREATE TABLE b (id int);\nSELECT 'open;\n");
    ctx.migrate(&url, &["up"]).code(2).stderr_has("2_b.sql:3").stderr_has("unterminated string");
    assert!(!db.has_table("a"), "revision 1 ran although the run was refused");
}

#[test]
fn branch_is_refused_until_merged() {
    let ctx = Context::new();
    let (db, url) = Db::sqlite(&ctx);
    ctx.write(
        "migrations/1_base.sql",
        "-- upshift:parents\n-- upshift:up\nCREATE TABLE base (id int);\n-- upshift:down\nDROP TABLE base;\n",
    );
    ctx.write(
        "migrations/2_left.sql",
        "-- upshift:parents 1\n-- upshift:up\nCREATE TABLE l (id int);\n-- upshift:down\nDROP TABLE l;\n",
    );
    ctx.write(
        "migrations/3_right.sql",
        "-- upshift:parents 1\n-- upshift:up\nCREATE TABLE r (id int);\n-- upshift:down\nDROP TABLE r;\n",
    );

    ctx.migrate(&url, &["up"]).code(2).stderr_has("2 heads (2, 3)").stderr_has("upshift migrate merge");
    assert!(!db.has_table("base"));
    // An explicit target on one branch is fine.
    ctx.migrate(&url, &["up", "2"]).success();
    assert_eq!(status(&ctx, &url).current, ["2"]);

    let merge: Created = ctx.run(&["migrate", "merge", "-m", "join branches", "--output", "json"]).success().json();
    assert_eq!(merge.parents, ["2", "3"]);
    assert!(merge.path.ends_with("_join_branches.sql"), "{}", merge.path);

    let up: Applied = ctx.migrate(&url, &["up", "--output", "json"]).success().json();
    assert_eq!(up.applied, ["3".to_owned(), merge.id.clone()]);
    let s = status(&ctx, &url);
    assert_eq!(s.heads, std::slice::from_ref(&merge.id));
    assert_eq!(s.current, std::slice::from_ref(&merge.id));

    let history: Vec<HistoryEntry> = ctx.migrate(&url, &["history", "--output", "json"]).success().json();
    assert_eq!(history[0].id, merge.id);
    assert_eq!(history[0].parents, ["2", "3"]);
    assert_eq!(history[0].name, "join_branches");
    assert_eq!(history[0].phase, "expand");
    assert!(history.iter().all(|h| h.applied && h.applied_at.is_some()));
    assert_eq!(history.last().unwrap().id, "1");

    let drawn = ctx.migrate(&url, &["history"]).success().stdout.clone();
    let art: Vec<&str> = drawn.lines().map(|l| l.split("  ").next().unwrap().trim_end()).collect();
    assert_eq!(art, ["*", "|\\", "| *", "* |", "|/", "*"], "{drawn}");

    // Reverting the merge and one branch, newest first.
    let down: Reverted = ctx.migrate(&url, &["down", "-2", "--output", "json"]).success().json();
    assert_eq!(down.reverted, [merge.id.clone(), "3".to_owned()]);
}

#[test]
fn drift_and_vanished_files_are_refused() {
    let ctx = Context::new();
    let (_db, url) = Db::sqlite(&ctx);
    linear_three(&ctx);
    ctx.migrate(&url, &["up", "2"]).success();
    ctx.migrate(&url, &["verify"]).success().stdout_has("2 applied revision(s) match");

    // Line ends and a BOM are not changes.
    let original = ctx.read("migrations/1_users.sql");
    ctx.write("migrations/1_users.sql", &format!("\u{feff}{}", original.replace('\n', "\r\n")));
    ctx.migrate(&url, &["verify"]).success();

    ctx.write("migrations/1_users.sql", &original.replace("id int", "id bigint"));
    ctx.migrate(&url, &["up"]).code(2).stderr_has("revision 1 was applied with checksum").stderr_has("1_users.sql");
    ctx.migrate(&url, &["down", "base"]).code(2);
    ctx.migrate(&url, &["verify"]).code(2);
    let s = status(&ctx, &url);
    assert_eq!(s.drifted, ["1"]);
    assert_eq!(status(&ctx, &url).pending, ["3"], "nothing ran");

    ctx.write("migrations/1_users.sql", &original);
    std::fs::remove_file(ctx.join("migrations/2_posts.sql")).unwrap();
    ctx.migrate(&url, &["up"]).code(2).stderr_has("revision 2 is applied in the database but has no file");
    assert_eq!(status(&ctx, &url).vanished, ["2"]);
}

#[test]
fn bad_graphs_are_refused_with_exit_2() {
    // What is wrong, the files, and what the error must say.
    type Case = (&'static str, &'static [(&'static str, &'static str)], &'static str);
    let cases: &[Case] = &[
        ("missing parent", &[("1_a.sql", "-- upshift:parents 0\nSELECT 1;")], "parent revision 0 does not exist"),
        (
            "cycle",
            &[("1_a.sql", "-- upshift:parents 2\nSELECT 1;"), ("2_b.sql", "-- upshift:parents 1\nSELECT 1;")],
            "cycle through",
        ),
        ("duplicate id", &[("1_a.sql", "SELECT 1;"), ("1_b.up.sql", "SELECT 1;")], "two files have revision id 1"),
        ("bad phase", &[("1_a.sql", "-- upshift:phase maybe\nSELECT 1;")], "1_a.sql:1: unknown phase `maybe`"),
    ];
    for (what, files, message) in cases {
        let ctx = Context::new();
        for (name, text) in *files {
            ctx.write(&format!("migrations/{name}"), text);
        }
        let run = ctx.migrate("sqlite:app.db", &["up"]);
        assert_eq!(run.code, 2, "{what}: {run:?}");
        assert!(run.stderr.contains(message), "{what}: {}", run.stderr);
        assert!(!ctx.join("app.db").exists(), "{what}: the database was touched");
    }
}

#[test]
fn down_through_a_revision_without_down_is_refused() {
    let ctx = Context::new();
    let (db, url) = Db::sqlite(&ctx);
    ctx.write("migrations/1_a.sql", "CREATE TABLE a (id int);\n");
    ctx.write("migrations/2_b.sql", "-- upshift:up\nCREATE TABLE b (id int);\n-- upshift:down\nDROP TABLE b;\n");
    ctx.migrate(&url, &["up"]).success();
    ctx.migrate(&url, &["down", "base"]).code(2).stderr_has("revision 1").stderr_has("has no down SQL");
    assert!(db.has_table("b"), "revision 2 was reverted although the run was refused");
    ctx.migrate(&url, &["down", "-1"]).success();
}

#[test]
fn bad_urls_and_missing_urls_exit_2() {
    let ctx = Context::new();
    linear_three(&ctx);
    ctx.migrate("mysql://root:hunter2@db/app", &["status"])
        .code(2)
        .stderr_has("expected postgres://")
        .stderr_has("mysql://root:***@db/app");
    ctx.run(&["migrate", "status"]).code(2).stderr_has("no database URL");
    ctx.run(&["migrate", "bogus"]).code(2);
}

#[test]
fn sql_prints_without_touching_the_database() {
    let ctx = Context::new();
    linear_three(&ctx);
    let run = ctx.migrate("sqlite:app.db", &["sql", "up", "2"]);
    run.success().stdout_has("CREATE TABLE users (id int);").stdout_has("CREATE TABLE posts (id int);");
    assert!(!run.stdout.contains("likes"));
    assert!(run.stdout.contains("INSERT INTO upshift_migrations"));
    assert!(!ctx.join("app.db").exists(), "sql created the database");
    let run = ctx.migrate("sqlite:app.db", &["sql", "down", "-2"]);
    let likes = run.stdout.find("DROP TABLE likes").expect("likes dropped");
    let posts = run.stdout.find("DROP TABLE posts").expect("posts dropped");
    assert!(likes < posts);
    assert!(!run.stdout.contains("DROP TABLE users"));

    let (db, url) = Db::postgres();
    ctx.migrate(&url, &["sql"]).success().stdout_has("clock_timestamp()");
    assert!(!db.has_table("upshift_migrations"));
}

#[test]
fn postgres_no_transaction_revisions() {
    let ctx = Context::new();
    let (db, url) = Db::postgres();
    ctx.write("migrations/1_t.sql", "-- upshift:up\nCREATE TABLE t (a int);\n-- upshift:down\nDROP TABLE t;\n");
    ctx.write(
        "migrations/2_index.sql",
        "-- upshift:no-transaction\n-- upshift:up\nCREATE INDEX CONCURRENTLY t_a ON t (a);\nCREATE INDEX CONCURRENTLY t_a2 ON t (a);\n-- upshift:down\nDROP INDEX CONCURRENTLY t_a;\nDROP INDEX CONCURRENTLY t_a2;\n",
    );
    ctx.migrate(&url, &["up"]).success();
    assert_eq!(db.count("SELECT count(*) FROM pg_indexes WHERE tablename = 't'"), 2);
    ctx.migrate(&url, &["down", "-1"]).success();
    assert_eq!(db.count("SELECT count(*) FROM pg_indexes WHERE tablename = 't'"), 0);
    // A failure after some statements says exactly which stayed applied.
    ctx.write(
        "migrations/3_half.sql",
        "-- upshift:no-transaction\n-- upshift:up\nCREATE INDEX CONCURRENTLY t_b ON t (a);\nCREATE TABLE u (a int);\nSELECT * FROM nope;\n",
    );
    ctx.migrate(&url, &["up"])
        .code(1)
        .stderr_has("3_half.sql:5")
        .stderr_has("the statements at line 3, 4 ran and stay applied");
}

#[test]
fn dbmate_and_golang_migrate_folders_read_as_they_are() {
    let ctx = Context::new();
    let (db, url) = Db::sqlite(&ctx);
    ctx.write(
        "dbmate/20200101000000_users.sql",
        "-- migrate:up\nCREATE TABLE users (id int);\n\n-- migrate:down\nDROP TABLE users;\n",
    );
    ctx.write(
        "dbmate/20200102000000_posts.sql",
        "-- migrate:up transaction:false\nCREATE TABLE posts (id int);\n-- migrate:down\nDROP TABLE posts;\n",
    );
    ctx.migrate(&url, &["up", "--dir", "dbmate"]).success();
    assert!(db.has_table("posts"));
    ctx.migrate(&url, &["down", "base", "--dir", "dbmate"]).success();
    assert!(!db.has_table("users"));

    ctx.write("golang/1_a.up.sql", "CREATE TABLE a (id int);");
    ctx.write("golang/1_a.down.sql", "DROP TABLE a;");
    ctx.write("golang/10_b.up.sql", "CREATE TABLE b (id int);");
    ctx.write("golang/10_b.down.sql", "DROP TABLE b;");
    ctx.write("golang/2_c.up.sql", "CREATE TABLE c (id int);");
    ctx.write("golang/2_c.down.sql", "DROP TABLE c;");
    let up: Applied = ctx.migrate(&url, &["up", "--dir", "golang", "--output", "json"]).success().json();
    assert_eq!(up.applied, ["1", "2", "10"]);
}

#[test]
fn baseline_records_without_running() {
    let ctx = Context::new();
    let (db, url) = Db::postgres();
    linear_three(&ctx);
    let recorded: Recorded = ctx.migrate(&url, &["baseline", "2", "--output", "json"]).success().json();
    assert_eq!(recorded.recorded, ["1", "2"]);
    assert!(!db.has_table("users"), "baseline ran a migration");
    let up: Applied = ctx.migrate(&url, &["up", "--output", "json"]).success().json();
    assert_eq!(up.applied, ["3"]);
}

#[test]
fn postgres_lock_names_its_holder_and_times_out() {
    let ctx = Context::new();
    let (db, url) = Db::postgres();
    linear_three(&ctx);
    let Db::Postgres(name) = &db else { unreachable!() };
    let mut holder = upshift_testing::postgres().connect(name);
    holder.batch_execute("SET application_name = 'held-by-test'").unwrap();
    let pid: i32 = holder.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    // The key upshift uses: "upshmigr" as a big-endian integer.
    holder.execute("SELECT pg_advisory_lock($1)", &[&0x7570_7368_6d69_6772_i64]).unwrap();
    ctx.migrate(&url, &["up", "--lock-timeout", "300ms"])
        .code(1)
        .stderr_has(&format!("pid {pid}"))
        .stderr_has("held-by-test")
        .stderr_has("waited 300ms");
    assert!(!db.has_table("users"));
    holder.execute("SELECT pg_advisory_unlock_all()", &[]).unwrap();
    ctx.migrate(&url, &["up", "--lock-timeout", "300ms"]).success();
}

#[test]
fn sqlite_lock_times_out_with_exit_1() {
    let ctx = Context::new();
    let (db, url) = Db::sqlite(&ctx);
    linear_three(&ctx);
    ctx.migrate(&url, &["up", "1"]).success();
    let holder = rusqlite::Connection::open(ctx.join("app.db")).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    ctx.migrate(&url, &["up", "--lock-timeout", "200ms"]).code(1).stderr_has("another process is writing to app.db");
    holder.execute_batch("COMMIT").unwrap();
    drop(holder);
    assert!(!db.has_table("posts"));
    ctx.migrate(&url, &["up"]).success();
}

/// Two runs at once against one PostgreSQL database: each revision runs exactly once.
#[test]
fn postgres_concurrent_runs_apply_each_revision_once() {
    let ctx = Context::new();
    let (db, url) = Db::postgres();
    ctx.write("migrations/001_log.sql", "CREATE TABLE log (revision text);\nINSERT INTO log VALUES ('001');\n");
    for i in 2..=12 {
        // A short sleep in each keeps both runs alive together.
        ctx.write(
            &format!("migrations/{i:03}_step.sql"),
            &format!("SELECT pg_sleep(0.02);\nINSERT INTO log VALUES ('{i:03}');\n"),
        );
    }
    let spawn = || {
        ctx.command()
            .args(["migrate", "up", "--output", "json", "--database-url", &url])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (spawn(), spawn());
    let mut all = Vec::new();
    for child in [first, second] {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let applied: Applied = serde_json::from_slice(&output.stdout).unwrap();
        all.extend(applied.applied);
    }
    all.sort();
    let expected: Vec<String> = (1..=12).map(|i| format!("{i:03}")).collect();
    assert_eq!(all, expected, "each revision applied by exactly one run");
    assert_eq!(db.count("SELECT count(*) FROM log"), 12);
    assert_eq!(db.count("SELECT count(DISTINCT revision) FROM log"), 12);
}

#[test]
fn passwords_never_appear_in_output() {
    let ctx = Context::new();
    linear_three(&ctx);
    let url = upshift_testing::fresh_database().replace("postgres@", "postgres:sup3r-secret@");
    for args in [&["status", "-v"][..], &["up", "-v"], &["history"], &["up", "nope"]] {
        let run = ctx.migrate(&url, args);
        assert!(!run.stdout.contains("sup3r-secret") && !run.stderr.contains("sup3r-secret"), "{args:?}: {run:?}");
    }
    let unreachable = "postgres://u:sup3r-secret@127.0.0.1:1/db";
    let run = ctx.migrate(unreachable, &["status"]);
    run.code(1).stderr_has("could not connect to postgres://u:***@127.0.0.1:1/db");
    assert!(!run.stderr.contains("sup3r-secret"));
}

#[test]
fn new_writes_heads_as_parents_and_phase() {
    let ctx = Context::new();
    let run = ctx.run(&["migrate", "new", "Create Notes!", "--output", "json"]);
    let first: Created = run.success().json();
    assert_eq!(first.id.len(), 14);
    assert!(first.path.ends_with(&format!("{}_create_notes.sql", first.id)));
    assert!(first.parents.is_empty());
    let second: Created =
        ctx.run(&["migrate", "new", "drop old", "--phase", "contract", "--output", "json"]).success().json();
    assert!(second.id > first.id, "ids stay in order within one second");
    assert_eq!(second.parents, std::slice::from_ref(&first.id));
    let text = ctx.read(&second.path);
    assert!(text.starts_with(&format!("-- upshift:parents {}\n-- upshift:phase contract\n-- upshift:up\n", first.id)));
    ctx.run(&["migrate", "heads"]).success().stdout_has(&second.id);
    ctx.run(&["migrate", "merge"]).code(2).stderr_has("nothing to merge");
}

#[test]
fn manifest_supplies_url_and_folder() {
    let ctx = Context::new();
    ctx.write(
        "upshift.toml",
        "[app]\nname = \"notes\"\n\n[database]\nurl = \"${NOTES_DB}\"\nmigrations = \"db/migrations\"\n",
    );
    ctx.write("db/migrations/1_a.sql", "CREATE TABLE a (id int);\n");
    let run = ctx.command().args(["migrate", "up"]).env("NOTES_DB", "sqlite:notes.db").output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(ctx.join("notes.db").exists());

    ctx.run(&["migrate", "status"]).code(2).stderr_has("upshift.toml:5:7: environment variable NOTES_DB is not set");
    ctx.write("upshift.toml", "[database]\nurl = \"sqlite:x.db\"\nmigratons = \"m\"\n");
    ctx.run(&["migrate", "status"]).code(2).stderr_has("upshift.toml:3:1").stderr_has("unknown field `migratons`");
    ctx.run(&["--config", "missing.toml", "migrate", "heads"]).code(2).stderr_has("missing.toml");
}

/// `DATABASE_URL` left exported from other work never silently redirects a manifest that
/// names its own database: the manifest's wins and a warning names both (redacted);
/// `UPSHIFT_DATABASE_URL` and `--database-url` still override it on purpose.
#[test]
fn database_url_from_the_environment_does_not_override_the_manifest() {
    let ctx = Context::new();
    linear_three(&ctx);
    ctx.write("upshift.toml", "[database]\nurl = \"sqlite:manifest.db\"\n");
    let run = Run::from(
        &ctx.command()
            .args(["migrate", "up"])
            .env("DATABASE_URL", "postgres://me:s3cret@elsewhere/db")
            .output()
            .unwrap(),
    );
    run.success()
        .stderr_has("DATABASE_URL (postgres://me:***@elsewhere/db) is ignored")
        .stderr_has("[database] url (sqlite:manifest.db)");
    assert!(!run.stderr.contains("s3cret"), "{}", run.stderr);
    assert!(ctx.join("manifest.db").exists());
    // The same value: nothing to say.
    let same = Run::from(
        &ctx.command().args(["migrate", "status"]).env("DATABASE_URL", "sqlite:manifest.db").output().unwrap(),
    );
    assert!(!same.success().stderr.contains("ignored"), "{}", same.stderr);
    // UPSHIFT_DATABASE_URL is meant for upshift: it wins, quietly.
    let chosen = Run::from(
        &ctx.command().args(["migrate", "up"]).env("UPSHIFT_DATABASE_URL", "sqlite:chosen.db").output().unwrap(),
    );
    assert!(!chosen.success().stderr.contains("ignored"));
    assert!(ctx.join("chosen.db").exists());
}

/// Every line upshift prints goes through one redaction layer: a value read from `${VAR}`
/// never shows, even in an error that quotes it whole.
#[test]
fn values_from_the_environment_never_show_in_errors() {
    let ctx = Context::new();
    ctx.write("upshift.toml", "[database]\nurl = \"${SECRET_URL}\"\n");
    linear_three(&ctx);
    let run = Run::from(
        &ctx.command().args(["migrate", "status"]).env("SECRET_URL", "hunter2-is-not-a-url").output().unwrap(),
    );
    run.code(2).stderr_has("***");
    assert!(!run.stderr.contains("hunter2") && !run.stdout.contains("hunter2"), "{}", run.stderr);
}

/// Regression: a file with its own BEGIN/COMMIT ended upshift's transaction on PostgreSQL,
/// and a later failure left tables with no bookkeeping row while upshift said "nothing of
/// it was applied"; an unmarked CREATE INDEX CONCURRENTLY failed with only the server's
/// message; an unedited `migrate new` file applied as an empty revision. Each is refused
/// before anything runs, with the file, the line and the fix.
#[test]
fn what_a_transaction_cannot_hold_is_refused_before_anything_runs() {
    let db = upshift_testing::fresh_database();
    let ctx = Context::new();
    ctx.write("migrations/1_notes.sql", "-- upshift:up\nCREATE TABLE notes (id int);\n");
    ctx.write(
        "migrations/2_own_tx.sql",
        "-- upshift:up\nBEGIN;\nCREATE TABLE tags (id int);\nCOMMIT;\nSELECT * FROM nope;\n",
    );
    ctx.migrate(&db, &["up"])
        .code(2)
        .stderr_has("2_own_tx.sql:2")
        .stderr_has("`BEGIN` controls the transaction itself")
        .stderr_has("-- upshift:no-transaction");
    let cluster = upshift_testing::postgres();
    let tables: i64 = cluster
        .connect(upshift_testing::database_name(&db))
        .query_one("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' AND table_name <> 'upshift_migrations'", &[])
        .unwrap()
        .get(0);
    assert_eq!(tables, 0, "something ran");
    ctx.write("migrations/2_own_tx.sql", "-- upshift:up\nCREATE INDEX CONCURRENTLY notes_id ON notes (id);\n");
    ctx.migrate(&db, &["up"]).code(2).stderr_has("2_own_tx.sql:2").stderr_has("cannot run inside a transaction block");
    ctx.write(
        "migrations/2_own_tx.sql",
        "-- upshift:no-transaction\n-- upshift:up\nCREATE INDEX CONCURRENTLY notes_id ON notes (id);\n",
    );
    ctx.migrate(&db, &["up"]).success();
    ctx.write("migrations/3_todo.sql", "-- upshift:up\n-- TODO\n-- upshift:down\n");
    ctx.migrate(&db, &["up"]).code(2).stderr_has("3_todo.sql").stderr_has("empty up section");
}

/// Regression: SQLite ran migrations with foreign keys on (rusqlite's default), so the
/// documented table rebuild failed with "FOREIGN KEY constraint failed"; a bare `;` failed
/// with "bad parameter or other API misuse". Now foreign keys are off for the run and
/// `PRAGMA foreign_key_check` runs before each revision is kept, naming broken rows.
#[test]
fn sqlite_table_rebuilds_work_and_broken_foreign_keys_are_named() {
    let ctx = Context::new();
    ctx.write(
        "migrations/1_init.sql",
        "-- upshift:up\nCREATE TABLE a (id INTEGER PRIMARY KEY);\nCREATE TABLE b (id INTEGER PRIMARY KEY, a_id INTEGER REFERENCES a (id));\nINSERT INTO a VALUES (1);\nINSERT INTO b VALUES (1, 1);\n;\n-- an empty statement\n;\n",
    );
    ctx.write(
        "migrations/2_rebuild.sql",
        "-- upshift:up\nCREATE TABLE a_new (id INTEGER PRIMARY KEY, name TEXT);\nINSERT INTO a_new (id) SELECT id FROM a;\nDROP TABLE a;\nALTER TABLE a_new RENAME TO a;\n",
    );
    ctx.migrate("sqlite:app.db", &["up"]).success();
    ctx.write("migrations/3_dangle.sql", "-- upshift:up\nDELETE FROM a;\n");
    ctx.migrate("sqlite:app.db", &["up"])
        .code(1)
        .stderr_has("3_dangle.sql")
        .stderr_has("b rowid 1 references a missing row of a");
    let connection = rusqlite::Connection::open(ctx.join("app.db")).unwrap();
    let kept: i64 = connection.query_row("SELECT count(*) FROM a", [], |r| r.get(0)).unwrap();
    assert_eq!(kept, 1, "the revision that broke the keys was kept");
}

/// Regression: an empty down section counted as reverted (it only dropped the bookkeeping
/// row) and the next `up` broke. Now it is no down at all, and the hint fits the layout.
#[test]
fn an_empty_down_section_is_not_an_undo() {
    let ctx = Context::new();
    ctx.write(
        "migrations/1_notes.sql",
        "-- upshift:up\nCREATE TABLE notes (id int);\n-- upshift:down\n-- nothing to see\n",
    );
    ctx.write("migrations/2_tags.up.sql", "CREATE TABLE tags (id int);\n");
    ctx.migrate("sqlite:app.db", &["up"]).success();
    ctx.migrate("sqlite:app.db", &["down", "-1"])
        .code(2)
        .stderr_has("revision 2")
        .stderr_has("in 2_tags.down.sql beside it");
    ctx.write("migrations/2_tags.down.sql", "DROP TABLE tags;\n");
    ctx.migrate("sqlite:app.db", &["down", "-1"]).success();
    ctx.migrate("sqlite:app.db", &["down", "-1"])
        .code(2)
        .stderr_has("has no down SQL (its down section is missing or empty)")
        .stderr_has("under `-- upshift:down` in the file");
    // Nothing was "reverted": up again is a no-op, not a failure.
    ctx.migrate("sqlite:app.db", &["up"]).success();
}

/// Regression: a diesel folder (`<version>_<name>/up.sql`) was read as empty ("nothing to
/// do"), and so was an Alembic project. diesel folders are read (with metadata.toml's
/// `run_in_transaction = false`), and a folder of files upshift does not read is refused
/// with what it looks like.
#[test]
fn diesel_folders_are_read_and_unknown_layouts_refused() {
    let ctx = Context::new();
    ctx.write("migrations/2024-01-01-000000_create_notes/up.sql", "CREATE TABLE notes (id INTEGER PRIMARY KEY);\n");
    ctx.write("migrations/2024-01-01-000000_create_notes/down.sql", "DROP TABLE notes;\n");
    ctx.write("migrations/2024-02-01-000000_index_notes/up.sql", "VACUUM;\n");
    ctx.write("migrations/2024-02-01-000000_index_notes/down.sql", "SELECT 1;\n");
    ctx.write("migrations/2024-02-01-000000_index_notes/metadata.toml", "run_in_transaction = false\n");
    ctx.write("migrations/README.md", "how we write migrations\n");
    let url = "sqlite:app.db";
    let status: serde_json::Value = ctx.migrate(url, &["status", "--output", "json"]).success().json();
    assert_eq!(status["pending"].as_array().unwrap().len(), 2, "{status}");
    ctx.migrate(url, &["up"]).success();
    ctx.migrate(url, &["down", "base"]).success();
    ctx.migrate(url, &["up"]).success();
    let applied: serde_json::Value = ctx.migrate(url, &["status", "--output", "json"]).success().json();
    assert_eq!(applied["applied"], serde_json::json!(["2024-01-01-000000", "2024-02-01-000000"]));

    let alembic = Context::new();
    alembic.write("migrations/env.py", "# alembic\n");
    alembic.write("migrations/versions/abc123_create_notes.py", "revision = 'abc123'\n");
    alembic.migrate(url, &["status"]).code(2).stderr_has("an Alembic project");
    let stray = Context::new();
    stray.write("migrations/1_a.sql", "-- upshift:up\nCREATE TABLE a (id int);\n");
    stray.write("migrations/schema.json", "{}\n");
    stray.migrate(url, &["up"]).code(2).stderr_has("`schema.json`, which is not a migration upshift reads");
}

/// Regression: there was no way to run a revision outside a transaction without editing
/// it: sqlx's `-- no-transaction` first line was ignored in single files, and the manifest
/// had no list. Both work now, and a list entry naming no revision is refused.
#[test]
fn revisions_run_outside_a_transaction_by_sqlx_marker_or_manifest_list() {
    let db = upshift_testing::fresh_database();
    let ctx = Context::new();
    ctx.write("migrations/1_notes.sql", "CREATE TABLE notes (id int, body text);\n");
    ctx.write("migrations/2_by_sqlx.sql", "-- no-transaction\nCREATE INDEX CONCURRENTLY notes_id ON notes (id);\n");
    ctx.write("migrations/3_upstream.sql", "CREATE INDEX CONCURRENTLY notes_body ON notes (body);\n");
    ctx.migrate(&db, &["up"])
        .code(2)
        .stderr_has("3_upstream.sql:1")
        .stderr_has("cannot run inside a transaction block");
    ctx.write("upshift.toml", "[database]\nno_transaction = [\"3\"]\n");
    ctx.migrate(&db, &["up"]).success();
    ctx.write("upshift.toml", "[database]\nno_transaction = [\"4\"]\n");
    ctx.migrate(&db, &["status"]).code(2).stderr_has("no_transaction names 4, which is not a revision");
}

/// `migrate lint` names each finding with its file and line, rule, what it does to the old code
/// and the safe rewrite, and fails (exit 1) until each is rewritten or allowed with a
/// reason; it is offline, and a malformed allow is bad input (exit 2).
#[test]
fn lint_names_what_blocks_or_breaks_the_old_code() {
    let ctx = Context::new();
    ctx.write(
        "migrations/1_notes.sql",
        "-- upshift:up\nCREATE TABLE notes (id bigint PRIMARY KEY, title text, body text);\nCREATE INDEX notes_title ON notes (title);\n-- upshift:down\nDROP TABLE notes;\n",
    );
    let body = "-- upshift:phase expand\n-- upshift:up\nSET LOCAL lock_timeout = '5s';\nCREATE INDEX notes_body ON notes (body);\nALTER TABLE notes RENAME COLUMN title TO heading;\n-- upshift:down\nDROP INDEX notes_body;\nALTER TABLE notes RENAME COLUMN heading TO title;\n";
    ctx.write("migrations/2_body.sql", body);
    // A contract revision is where a drop belongs.
    ctx.write(
        "migrations/3_drop.up.sql",
        "-- upshift:phase contract\nSET LOCAL lock_timeout = '5s';\nALTER TABLE notes DROP COLUMN body;\n",
    );

    let run = ctx.run(&["migrate", "lint"]);
    run.code(1)
        .stdout_has("migrations/2_body.sql:4: index-without-concurrently: CREATE INDEX notes_body on notes, a table that exists before this revision, holds a SHARE lock")
        .stdout_has("fix: build it with CREATE INDEX CONCURRENTLY, in a revision of its own marked `-- upshift:no-transaction`")
        .stdout_has("migrations/2_body.sql:5: rename-column: RENAME COLUMN title of notes to heading in an expand revision")
        .stdout_has("3 revision(s) linted: 2 finding(s), 0 allowed")
        .stderr_has("2 finding(s) not allowed")
        .stderr_has("-- upshift:allow RULE reason");
    assert!(!run.stdout.contains("3_drop"), "{}", run.stdout);
    let findings: Vec<LintFinding> = ctx.run(&["migrate", "lint", "--output", "json"]).code(1).json();
    let summary: Vec<(&str, usize, &str, &str)> =
        findings.iter().map(|f| (f.file.as_str(), f.line, f.revision.as_str(), f.rule.as_str())).collect();
    assert_eq!(
        summary,
        [
            ("migrations/2_body.sql", 4, "2", "index-without-concurrently"),
            ("migrations/2_body.sql", 5, "2", "rename-column")
        ]
    );
    assert!(findings.iter().all(|f| !f.allowed && f.reason.is_none() && !f.message.is_empty()));
    assert!(findings[1].fix.contains("upshift:phase contract"), "{}", findings[1].fix);

    // Allowed with reasons, one before its statement and one in the header: exit 0.
    let allowed = "-- upshift:allow rename-column 2.0.0 reads heading, and 1.0.0 is never run again\n-- upshift:phase expand\n-- upshift:up\nSET LOCAL lock_timeout = '5s';\n-- upshift:allow index-without-concurrently notes holds a few hundred rows\nCREATE INDEX notes_body ON notes (body);\nALTER TABLE notes RENAME COLUMN title TO heading;\n-- upshift:down\nDROP INDEX notes_body;\nALTER TABLE notes RENAME COLUMN heading TO title;\n";
    ctx.write("migrations/2_body.sql", allowed);
    ctx.run(&["migrate", "lint"])
        .success()
        .stdout_has("migrations/2_body.sql:6: index-without-concurrently: allowed (notes holds a few hundred rows)")
        .stdout_has("2 finding(s), 2 allowed");
    let findings: Vec<LintFinding> = ctx.run(&["migrate", "lint", "--output", "json"]).success().json();
    assert_eq!(
        findings.iter().map(|f| f.reason.as_deref()).collect::<Vec<_>>(),
        [Some("notes holds a few hundred rows"), Some("2.0.0 reads heading, and 1.0.0 is never run again")]
    );

    // Only the revisions asked for; an unknown one is bad input.
    ctx.write("migrations/2_body.sql", body);
    ctx.run(&["migrate", "lint", "3"]).success().stdout_has("1 revision(s) linted: 0 finding(s)");
    ctx.run(&["migrate", "lint", "9"]).code(2).stderr_has("no revision `9`");
    // SQLite has no such locks: only the phase rules apply; nothing is created.
    ctx.migrate("sqlite:app.db", &["lint"]).code(1).stdout_has("rename-column").stderr_has("SQLite: only the rules");
    assert!(!ctx.migrate("sqlite:app.db", &["lint"]).stdout.contains("index-without-concurrently"));
    assert!(!ctx.join("app.db").exists());

    // An allow without a reason, or naming no rule, stops it with the place.
    ctx.write(
        "migrations/2_body.sql",
        &body.replace("CREATE INDEX", "-- upshift:allow index-without-concurrently\nCREATE INDEX"),
    );
    ctx.run(&["migrate", "lint"]).code(2).stderr_has("migrations/2_body.sql:4:").stderr_has("needs a reason");
    ctx.write(
        "migrations/2_body.sql",
        &body.replace("CREATE INDEX", "-- upshift:allow concurrently small table\nCREATE INDEX"),
    );
    ctx.run(&["migrate", "lint"]).code(2).stderr_has("`-- upshift:allow concurrently`: no such rule");
    // An allow in the down section is read nowhere: refused with its line.
    ctx.write("migrations/2_body.sql", &format!("{body}-- upshift:allow drop-index-without-concurrently new index\n"));
    ctx.run(&["migrate", "lint"]).code(2).stderr_has("migrations/2_body.sql:9:").stderr_has("down section");
}

/// Regression: a `.down.sql` file's own `-- no-transaction` was ignored, so a down that
/// drops an index concurrently was refused ("cannot run inside a transaction block") unless
/// the up file said it for both. Now the down file says it for itself; a failure there says
/// which statements stayed applied.
#[test]
fn a_down_file_runs_outside_a_transaction_by_its_own_marker() {
    let db = upshift_testing::fresh_database();
    let pg = upshift_testing::postgres();
    let name = upshift_testing::database_name(&db).to_owned();
    let indexes = |like: &str| -> i64 {
        pg.connect(&name).query_one("SELECT count(*) FROM pg_indexes WHERE indexname LIKE $1", &[&like]).unwrap().get(0)
    };
    let ctx = Context::new();
    ctx.write("migrations/1_notes.up.sql", "CREATE TABLE notes (id int, body text);\n");
    ctx.write("migrations/1_notes.down.sql", "DROP TABLE notes;\n");
    ctx.write(
        "migrations/2_index.up.sql",
        "CREATE INDEX notes_body ON notes (body);\nCREATE INDEX notes_id ON notes (id);\n",
    );
    ctx.write(
        "migrations/2_index.down.sql",
        "DROP INDEX CONCURRENTLY notes_body;\nDROP INDEX CONCURRENTLY notes_id;\n",
    );
    ctx.migrate(&db, &["up"]).success();
    // Unmarked, the down is refused before anything runs, with the marker to add.
    ctx.migrate(&db, &["down", "-1"])
        .code(2)
        .stderr_has("2_index.down.sql:1")
        .stderr_has("add `-- no-transaction` as the first line of this down file");
    assert_eq!(indexes("notes_%"), 2);

    // Marked, with a statement that fails after the first: the first stays done, and the
    // error says so; the revision stays applied.
    ctx.write(
        "migrations/2_index.down.sql",
        "-- no-transaction\nDROP INDEX CONCURRENTLY notes_body;\nDROP INDEX CONCURRENTLY no_such_index;\n",
    );
    let sql = ctx.migrate(&db, &["sql", "down", "1"]).success().stdout.clone();
    assert!(
        sql.contains("-- revision 2 (index), expand, down\n-- no-transaction: each statement commits on its own\n"),
        "{sql}"
    );
    assert!(!sql.contains("BEGIN"), "{sql}");
    ctx.migrate(&db, &["down", "-1"])
        .code(1)
        .stderr_has("2_index.down.sql:3")
        .stderr_has("the statements at line 2 ran and stay applied");
    assert_eq!(indexes("notes_%"), 1);
    assert_eq!(status(&ctx, &db).applied, ["1", "2"]);

    ctx.write(
        "migrations/2_index.down.sql",
        "-- no-transaction\nDROP INDEX CONCURRENTLY IF EXISTS notes_body;\nDROP INDEX CONCURRENTLY notes_id;\n",
    );
    ctx.migrate(&db, &["down", "-1"]).success();
    assert_eq!(indexes("notes_%"), 0);
    assert_eq!(status(&ctx, &db).applied, ["1"]);
    // The up file still runs in a transaction: up again, and down once more.
    ctx.migrate(&db, &["up"]).success();
    assert_eq!(indexes("notes_%"), 2);
    ctx.migrate(&db, &["down", "-1"]).success();
}

/// An empty down section is no undo: `migrate status` says which revisions only a restore
/// can undo (issue 17).
#[test]
fn status_names_the_revisions_without_a_real_down_section() {
    let ctx = Context::new();
    let url = format!("sqlite:{}", ctx.join("app.db").display());
    linear_three(&ctx);
    ctx.write("migrations/4_empty_down.sql", "-- upshift:up\nCREATE TABLE t (id int);\n-- upshift:down\n-- nothing\n");
    ctx.write("migrations/5_no_down.sql", "-- upshift:up\nCREATE TABLE u (id int);\n");
    assert_eq!(status(&ctx, &url).irreversible, ["4", "5"]);
    ctx.migrate(&url, &["status"]).success().stdout_has("irreversible in practice: 4, 5");
}
