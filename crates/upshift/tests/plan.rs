//! `upshift init` and `upshift plan` through the real binary.

mod common;

use common::{Context, LintFinding};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanJson {
    app: Option<String>,
    from: Option<String>,
    to: String,
    expand: Vec<String>,
    contract: Vec<String>,
    no_backup: bool,
    steps: Vec<Step>,
    #[serde(default)]
    lint: Vec<LintFinding>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    number: usize,
    kind: String,
    title: String,
    details: Vec<String>,
    on_failure: OnFailure,
    #[serde(default)]
    component: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnFailure {
    undo: String,
    why: String,
}

fn plan(ctx: &Context, args: &[&str]) -> PlanJson {
    let mut all = vec!["plan", "--output", "json"];
    all.extend_from_slice(args);
    ctx.run(&all).success().json()
}

fn kinds(plan: &PlanJson) -> Vec<&str> {
    plan.steps.iter().map(|s| s.kind.as_str()).collect()
}

fn undo_of<'a>(plan: &'a PlanJson, kind: &str) -> &'a str {
    &plan.steps.iter().find(|s| s.kind == kind).unwrap_or_else(|| panic!("no {kind} step")).on_failure.undo
}

const MANIFEST: &str = r#"
[app]
name = "notes"

[database]
url = "sqlite:notes.db"

[backup]
keep_last = 3

[[components]]
name = "api"
driver = "process"
run = ["releases/{version}/notes", "--listen", "{addr}"]
serve = "127.0.0.1:18080"
strategy = "blue-green"
health = { http = "/health" }

[[components]]
name = "worker"
driver = "process"
run = ["releases/{version}/notes", "--worker"]

[verify]
smoke = [["curl", "-fsS", "http://127.0.0.1:18080/api/notes"]]

[[releases]]
version = "1.0.0"
migrate_to = "1"

[[releases]]
version = "2.0.0"
upgrade_from = ">=1.0.0"
"#;

fn revisions(ctx: &Context, second_has_down: bool) {
    ctx.write(
        "migrations/1_notes.sql",
        "-- upshift:up\nCREATE TABLE notes (id integer, body text);\n-- upshift:down\nDROP TABLE notes;\n",
    );
    let down = if second_has_down { "-- upshift:down\nDROP TABLE tags;\n" } else { "" };
    ctx.write(
        "migrations/2_tags.sql",
        &format!("-- upshift:up\nCREATE TABLE tags (note_id integer, name text);\n{down}"),
    );
    ctx.write(
        "migrations/3_drop_body.sql",
        "-- upshift:phase contract\n-- upshift:up\nALTER TABLE notes DROP COLUMN body;\n",
    );
    // An expand revision after a contract one waits for the contract step.
    ctx.write(
        "migrations/4_index.sql",
        "-- upshift:up\nCREATE INDEX tags_name ON tags (name);\n-- upshift:down\nDROP INDEX tags_name;\n",
    );
}

#[test]
fn init_writes_a_manifest_that_plans() {
    let ctx = Context::new();
    ctx.run(&["init", "--name", "shop"]).success().stdout_has("wrote upshift.toml");
    assert!(ctx.join("migrations").is_dir());
    assert!(ctx.read("upshift.toml").contains("name = \"shop\""));
    let plan = plan(&ctx, &["--to", "1.0.0"]);
    assert_eq!(plan.app.as_deref(), Some("shop"));
    assert_eq!(kinds(&plan), ["preflight", "backup", "verify", "record"]);
    let before = ctx.read("upshift.toml");
    ctx.run(&["init"]).code(2).stderr_has("never overwrites");
    assert_eq!(ctx.read("upshift.toml"), before);
}

#[test]
fn plan_lists_every_step_in_order_with_its_undo() {
    let ctx = Context::new();
    ctx.write("upshift.toml", MANIFEST);
    revisions(&ctx, true);
    let first = plan(&ctx, &["--to", "1.0.0"]);
    assert_eq!((first.from.as_deref(), first.to.as_str()), (None, "1.0.0"));
    assert_eq!(first.expand, ["1"], "migrate_to stops the schema at revision 1");
    assert!(first.contract.is_empty());

    let plan = plan(&ctx, &["--to", "2.0.0"]);
    assert_eq!(kinds(&plan), ["preflight", "backup", "expand", "deploy", "deploy", "verify", "contract", "record"]);
    assert_eq!(plan.steps.iter().map(|s| s.number).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
    assert_eq!(plan.expand, ["1", "2"]);
    assert_eq!(plan.contract, ["3", "4"]);
    assert_eq!(plan.steps[3].title, "deploy api (process, blue-green)");
    assert_eq!(plan.steps[4].title, "deploy worker (process, recreate)");
    assert_eq!(plan.steps[3].component.as_deref(), Some("api"));
    assert!(plan.steps[2].component.is_none());
    assert!(plan.steps[2].details.iter().any(|d| d.contains("migrations/2_tags.sql")));
    // Commands show the version they will run, not `{version}`; addresses come at run time.
    assert!(
        plan.steps[3].details.iter().any(|d| d == "run: releases/2.0.0/notes --listen {addr}"),
        "{:?}",
        plan.steps[3]
    );
    assert!(plan.steps[5].details.iter().any(|d| d.starts_with("smoke: curl")));
    assert!(plan.steps[7].details.iter().any(|d| d.contains("keep the last 3")));
    assert_eq!(undo_of(&plan, "preflight"), "nothing");
    assert_eq!(undo_of(&plan, "deploy"), "code-and-down");
    assert_eq!(undo_of(&plan, "verify"), "code-and-down");
    assert_eq!(undo_of(&plan, "contract"), "restore");
    assert!(plan.steps.iter().all(|s| !s.on_failure.why.is_empty()));

    // Human output says the same.
    let human = ctx.run(&["plan", "--to", "2.0.0"]).success().stdout.clone();
    assert!(human.contains(" 3. migrate expand: 1, 2") && human.contains("undo: restore the backup"), "{human}");
}

#[test]
fn irreversible_expand_means_restore_and_no_backup_means_exit_4() {
    let ctx = Context::new();
    ctx.write("upshift.toml", MANIFEST);
    revisions(&ctx, false);
    let plan_with_backup = plan(&ctx, &["--to", "2.0.0"]);
    assert_eq!(undo_of(&plan_with_backup, "deploy"), "restore");
    let without = plan(&ctx, &["--to", "2.0.0", "--no-backup"]);
    assert_eq!(undo_of(&without, "deploy"), "impossible");
    assert!(without.no_backup && without.steps[1].title.contains("--no-backup"));
}

#[test]
fn code_only_when_no_migration_runs() {
    let ctx = Context::new();
    ctx.write("upshift.toml", MANIFEST);
    ctx.write("migrations/1_notes.sql", "CREATE TABLE notes (id integer);\n");
    ctx.migrate("sqlite:notes.db", &["up"]).success();
    let plan = plan(&ctx, &["--to", "2.0.0"]);
    assert!(plan.expand.is_empty() && plan.contract.is_empty());
    assert_eq!(undo_of(&plan, "deploy"), "code");
}

#[test]
fn refused_plans_exit_2() {
    let ctx = Context::new();
    ctx.run(&["plan", "--to", "1.0.0"]).code(2).stderr_has("no upshift.toml here").stderr_has("upshift init");
    ctx.write("upshift.toml", MANIFEST);
    revisions(&ctx, true);
    ctx.run(&["plan", "--to", "9.0.0"]).code(2).stderr_has("known releases: 1.0.0, 2.0.0");
    ctx.run(&["plan", "--to", "two"]).code(2).stderr_has("is not a version");

    // Deployed 2.0.0: going down is refused with a pointer to rollback; an unmet
    // upgrade_from is refused too.
    drop(upshift_core::journal::Journal::open(&ctx.join(".upshift")).unwrap());
    let journal = rusqlite::Connection::open(ctx.join(".upshift/journal.db")).unwrap();
    journal
        .execute(
            "INSERT INTO releases (revision, version, kind, status, started_at, expand, contract, deployments) VALUES (1, '0.9.0', 'upgrade', 'deployed', 'x', '[]', '[]', '{}')",
            [],
        )
        .unwrap();
    ctx.run(&["plan", "--to", "2.0.0"]).code(2).stderr_has("upgrades from >=1.0.0, but 0.9.0 is deployed");
    journal
        .execute(
            "INSERT INTO releases (revision, version, kind, status, started_at, expand, contract, deployments) VALUES (2, '2.0.0', 'upgrade', 'deployed', 'x', '[]', '[]', '{}')",
            [],
        )
        .unwrap();
    ctx.run(&["plan", "--to", "1.0.0"]).code(2).stderr_has("use `upshift rollback`");

    // Two heads stop the plan like they stop `migrate up`.
    ctx.write("migrations/5_left.sql", "-- upshift:parents 4\nSELECT 1;\n");
    ctx.write("migrations/6_right.sql", "-- upshift:parents 4\nSELECT 1;\n");
    std::fs::remove_file(ctx.join(".upshift/journal.db")).unwrap();
    ctx.run(&["plan", "--to", "2.0.0"]).code(2).stderr_has("upshift migrate merge");

    ctx.write("upshift.toml", &MANIFEST.replace("{addr}", "{adr}"));
    ctx.run(&["plan", "--to", "2.0.0"])
        .code(2)
        .stderr_has("upshift.toml:14:48:")
        .stderr_has("unknown placeholder {adr}");
    ctx.write(
        "upshift.toml",
        &MANIFEST
            .replace("driver = \"process\"\nrun = [\"releases/{version}/notes\", \"--worker\"]", "driver = \"helm\""),
    );
    ctx.run(&["plan", "--to", "2.0.0"]).code(2).stderr_has("helm driver");
}

/// A manifest with a database and releases only: nothing to deploy.
fn schema_only(url: &str) -> String {
    format!(
        "[database]\nurl = \"{url}\"\n\n[[releases]]\nversion = \"1.0.0\"\nmigrate_to = \"1\"\n\n[[releases]]\nversion = \"2.0.0\"\n"
    )
}

/// `plan` and `upgrade` lint the release's revisions: an expand revision the old code
/// cannot survive (a drop, a rename, a NOT NULL column without default) is refused with
/// exit 2 before anything is touched, unless an allow with a reason accepts it; other
/// findings are warnings, and a drop in a contract revision is none.
#[test]
fn plan_and_upgrade_refuse_an_expand_revision_the_old_code_cannot_survive() {
    let ctx = Context::new();
    ctx.write("upshift.toml", &schema_only("sqlite:notes.db"));
    ctx.write(
        "migrations/1_notes.sql",
        "-- upshift:up\nCREATE TABLE notes (id integer, title text, body text);\n-- upshift:down\nDROP TABLE notes;\n",
    );
    let drop = "-- upshift:up\nALTER TABLE notes DROP COLUMN title;\n-- upshift:down\nALTER TABLE notes ADD COLUMN title text;\n";
    ctx.write("migrations/2_drop_title.sql", drop);
    ctx.run(&["plan", "--to", "2.0.0"])
        .code(2)
        .stderr_has("the old code cannot survive this expand revision, which runs while it still serves")
        .stderr_has("migrations/2_drop_title.sql:2: drop-column: DROP COLUMN title of notes in an expand revision (it has no `-- upshift:phase` line")
        .stderr_has("fix: drop it in a `-- upshift:phase contract` revision")
        .stderr_has("-- upshift:allow RULE reason");
    ctx.run(&["upgrade", "--to", "2.0.0", "--yes"]).code(2).stderr_has("drop-column");
    assert!(!ctx.join("notes.db").exists(), "the refused upgrade touched the database");
    assert!(!ctx.join(".upshift/backups").exists(), "the refused upgrade took a backup");

    // The same drop as a contract revision is what contract revisions are for.
    ctx.write("migrations/2_drop_title.sql", &format!("-- upshift:phase contract\n{drop}"));
    let plan = plan(&ctx, &["--to", "2.0.0"]);
    assert_eq!((plan.expand.as_slice(), plan.contract.as_slice()), (&["1".to_owned()][..], &["2".to_owned()][..]));
    assert!(plan.lint.is_empty(), "{:?}", plan.lint);

    // Allowed with a reason, it plans; an irreversible expand revision is a warning.
    ctx.write(
        "migrations/2_drop_title.sql",
        "-- upshift:allow drop-column title was never shown by 1.0.0, which selects id and body only\n-- upshift:up\nALTER TABLE notes DROP COLUMN title;\n",
    );
    let run = ctx.run(&["plan", "--to", "2.0.0", "--output", "json"]);
    run.success()
        .stderr_has("warning: migrations/2_drop_title.sql:3: irreversible: expand revision 2 has no down section");
    let plan: PlanJson = run.json();
    let lint: Vec<(&str, usize, &str, bool)> =
        plan.lint.iter().map(|f| (f.rule.as_str(), f.line, f.revision.as_str(), f.allowed)).collect();
    assert_eq!(lint, [("irreversible", 3, "2", false)]);
    assert!(plan.lint[0].file.ends_with("2_drop_title.sql") && plan.lint[0].fix.contains("-- upshift:down"));
    assert!(!plan.lint[0].message.is_empty() && plan.lint[0].reason.is_none());
}

/// With PostgreSQL the lock rules apply too: an index built without CONCURRENTLY on a
/// table the old code uses is a warning of the plan, not a refusal.
#[test]
fn postgres_plans_warn_about_locks() {
    let url = upshift_testing::fresh_database();
    let ctx = Context::new();
    ctx.write("upshift.toml", &schema_only(&url));
    ctx.write(
        "migrations/1_notes.sql",
        "-- upshift:up\nCREATE TABLE notes (id bigint, body text);\n-- upshift:down\nDROP TABLE notes;\n",
    );
    ctx.write(
        "migrations/2_index.sql",
        "-- upshift:up\nSET LOCAL lock_timeout = '5s';\nCREATE INDEX notes_body ON notes (body);\n-- upshift:down\nDROP INDEX notes_body;\n",
    );
    ctx.migrate(&url, &["up", "1"]).success();
    let run = ctx.run(&["plan", "--to", "2.0.0", "--output", "json"]);
    run.success().stderr_has("warning: migrations/2_index.sql:3: index-without-concurrently");
    let plan: PlanJson = run.json();
    assert_eq!(plan.expand, ["2"]);
    assert_eq!(plan.lint.iter().map(|f| f.rule.as_str()).collect::<Vec<_>>(), ["index-without-concurrently"]);
}
