//! External migrators through upshift, on the real throwaway PostgreSQL: Alembic projects
//! (`[database] migrator = "alembic"`: the example project in `examples/alembic` and a
//! real Alembic from the Python package index, `ci/engines/alembic.sh`) and any tool's
//! commands (`migrator = "commands"`: a small migration tool written here in bash over
//! psql). Without that Alembic its tests are skipped with the reason; under CI (`CI` set,
//! where `.ci/run` installs it) they fail instead.
#![allow(clippy::print_stderr)] // the skip reason

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Context;
use serde::Deserialize;

/// The Alembic the tests run, or `None` (skipped) when there is none outside CI.
fn alembic() -> Option<PathBuf> {
    let path = std::env::var_os("UPSHIFT_TEST_ALEMBIC")
        .map_or_else(|| PathBuf::from("/var/cache/upshift-alembic/bin/alembic"), PathBuf::from);
    if Command::new(&path).arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI installs Alembic (ci/engines/alembic.sh), but {} does not run",
        path.display()
    );
    eprintln!("skipped: no Alembic at {} (ci/engines/alembic.sh installs one)", path.display());
    None
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            if entry.file_name() != "__pycache__" {
                copy_tree(&entry.path(), &target);
            }
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The example project in its own folder, on a fresh database, run by `alembic`.
struct Project {
    ctx: Context,
    url: String,
    database: String,
}

impl Project {
    fn new(alembic: &Path, extra: &str) -> Project {
        let url = upshift_testing::fresh_database();
        let ctx = Context::new();
        copy_tree(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/alembic"), ctx.path());
        let manifest = ctx.read("upshift.toml").replace(
            "url = \"${DATABASE_URL}\"",
            &format!("url = \"{url}\"\nalembic_command = [\"{}\"]", alembic.display()),
        );
        ctx.write("upshift.toml", &format!("{manifest}{extra}"));
        let database = upshift_testing::database_name(&url).to_owned();
        Project { ctx, url, database }
    }

    fn query(&self, sql: &str) -> Vec<String> {
        let mut client = upshift_testing::postgres().connect(&self.database);
        client.query(sql, &[]).unwrap().iter().map(|row| row.get(0)).collect()
    }

    /// `alembic_version`, sorted: what Alembic itself says is applied.
    fn versions(&self) -> Vec<String> {
        let mut versions = self.query(
            "SELECT version_num::text FROM alembic_version UNION ALL SELECT 'none' WHERE to_regclass('alembic_version') IS NULL",
        );
        versions.sort();
        versions
    }

    fn tables(&self) -> Vec<String> {
        self.query("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version' ORDER BY 1")
    }

    fn has_title(&self) -> bool {
        !self.query("SELECT column_name::text FROM information_schema.columns WHERE table_name = 'notes' AND column_name = 'title'").is_empty()
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Moved {
    #[serde(default)]
    applied: Vec<String>,
    #[serde(default)]
    reverted: Vec<String>,
    #[serde(default)]
    error: Option<String>,
}

/// `upshift migrate` on an Alembic project: the revisions and their branches from
/// `alembic history`, what is applied from `alembic_version`, each revision run by
/// `alembic upgrade` / `alembic downgrade REV@-1` with its output; up, down and up again.
#[test]
fn an_alembic_project_goes_up_down_and_up_again() {
    let Some(alembic) = alembic() else { return };
    let project = Project::new(&alembic, "");
    let ctx = &project.ctx;
    let status = |ctx: &Context| -> Status { ctx.run(&["migrate", "status", "--output", "json"]).success().json() };
    assert_eq!(
        status(ctx),
        Status {
            applied: vec![],
            pending: vec!["a1".into(), "c1".into(), "e1".into()],
            heads: vec!["c1".into(), "e1".into()],
            current: vec![],
            drifted: vec![],
            vanished: vec![],
        }
    );
    ctx.run(&["migrate", "status"]).success().stdout_has("migrator  Alembic (").stdout_has("heads     c1, e1");
    let history: serde_json::Value = ctx.run(&["migrate", "history", "--output", "json"]).success().json();
    let phases: Vec<(&str, &str)> =
        history.as_array().unwrap().iter().map(|e| (e["id"].as_str().unwrap(), e["phase"].as_str().unwrap())).collect();
    assert_eq!(phases, [("e1", "expand"), ("c1", "contract"), ("a1", "expand")], "the contract branch is contract");
    assert!(history.as_array().unwrap().iter().all(|e| e["applied_at"].is_null()));

    // Up: every head, each revision its own `alembic upgrade`, with Alembic's output.
    let run = ctx.run(&["migrate", "up", "--output", "json"]);
    run.success();
    let up: Moved = run.json();
    assert_eq!(up.applied, ["a1", "c1", "e1"]);
    let run = ctx.run(&["migrate", "up"]);
    run.success().stdout_has("nothing to do");
    assert_eq!(project.versions(), ["c1", "e1"]);
    assert_eq!(project.tables(), ["notes", "tags"]);
    let history: serde_json::Value = ctx.run(&["migrate", "history", "--output", "json"]).success().json();
    assert!(history.as_array().unwrap().iter().all(|e| e["applied"] == true && e["applied_at"].is_null()), "{history}");
    ctx.run(&["migrate", "history"]).success().stdout_has("expand    applied\n");
    assert!(!project.has_title());

    // Down one: the last on its own branch only, however Alembic's branches share a1.
    let run = ctx.run(&["migrate", "down", "-1"]);
    run.success()
        .stderr_has("reverted e1")
        .stderr_has("$ ")
        .stderr_has("downgrade e1@-1")
        .stderr_has("Running downgrade e1 -> a1");
    assert_eq!(project.versions(), ["c1"]);
    assert_eq!(project.tables(), ["notes"]);
    let down: Moved = ctx.run(&["migrate", "down", "base", "--output", "json"]).success().json();
    assert_eq!(down.reverted, ["c1", "a1"]);
    assert_eq!(project.versions(), Vec::<String>::new());
    assert!(project.tables().is_empty());

    // And up again, to a revision this time.
    ctx.run(&["migrate", "up", "e1"]).success().stderr_has("Running upgrade a1 -> e1");
    assert_eq!(project.versions(), ["e1"]);
    let now = status(ctx);
    assert_eq!(
        (now.applied, now.current, now.pending),
        (vec!["a1".into(), "e1".into()], vec!["e1".into()], vec!["c1".into()])
    );
    ctx.run(&["migrate", "up"]).success();
    assert_eq!(project.versions(), ["c1", "e1"]);

    // A revision that fails: Alembic's own words, exit 1, the ones before it applied.
    ctx.write(
        "migrations/versions/x1_broken.py",
        "revision = 'x1'\ndown_revision = 'e1'\nbranch_labels = None\ndepends_on = None\n\nfrom alembic import op\n\ndef upgrade():\n    op.execute('SELECT * FROM no_such_table')\n\ndef downgrade():\n    pass\n",
    );
    let run = ctx.run(&["migrate", "up", "x1", "--output", "json"]);
    run.code(1)
        .stderr_has("revision x1 failed: `")
        .stderr_has("upgrade x1` ended with exit status: 1")
        .stderr_has("no_such_table");
    let failed: Moved = run.json();
    assert!(failed.applied.is_empty() && failed.error.is_some_and(|e| e.contains("no_such_table")));
    assert_eq!(project.versions(), ["c1", "e1"]);
    assert!(!run.stderr.contains(&project.url), "the URL's password reached the output");

    // What only upshift's own files can do is refused, saying what to use instead.
    ctx.run(&["migrate", "new", "x"]).code(2).stderr_has("`alembic revision`");
    ctx.run(&["migrate", "sql"]).code(2).stderr_has("alembic upgrade --sql");
    ctx.run(&["migrate", "baseline", "a1"]).code(2).stderr_has("alembic stamp");
}

/// `upgrade` with Alembic: the `expand` branch before the deploy and the `contract` branch
/// after the verify, each revision journaled with Alembic's output; a failed verify is
/// undone with `alembic downgrade` (code + down), and a rollback after the contract
/// branch ran restores the backup, as the undo rules say.
#[test]
fn upgrades_split_alembic_branches_and_undo_them_to_the_right_depth() {
    let Some(alembic) = alembic() else { return };
    let flag = tempfile::tempdir().unwrap();
    let ok = flag.path().join("smoke-ok");
    let smoke = format!("\n[verify]\nsmoke = [[\"test\", \"-e\", \"{}\"]]\n", ok.display());
    let project = Project::new(&alembic, &smoke);
    let ctx = &project.ctx;
    std::fs::write(&ok, "").unwrap();
    ctx.run(&["upgrade", "--to", "1.0.0", "--yes"]).success().stderr_has("applied a1");
    assert_eq!(project.versions(), ["a1"]);

    let plan: serde_json::Value = ctx.run(&["plan", "--to", "2.0.0", "--output", "json"]).success().json();
    assert_eq!(plan["expand"], serde_json::json!(["e1"]));
    assert_eq!(plan["contract"], serde_json::json!(["c1"]));
    let verify = plan["steps"].as_array().unwrap().iter().find(|s| s["kind"] == "verify").unwrap();
    assert_eq!(verify["on_failure"]["undo"], "code-and-down", "{verify}");

    // The verify fails: e1 ran, and is undone with Alembic's downgrade; c1 never ran.
    std::fs::remove_file(&ok).unwrap();
    ctx.run(&["upgrade", "--to", "2.0.0", "--yes"])
        .code(3)
        .stderr_has("Running upgrade a1 -> e1")
        .stderr_has("undoing (code + down)")
        .stderr_has("downgrade e1@-1");
    assert_eq!(project.versions(), ["a1"]);
    assert_eq!(project.tables(), ["notes"]);
    assert!(project.has_title());

    // It passes: e1 before the verify, c1 after it, each journaled with its output.
    std::fs::write(&ok, "").unwrap();
    ctx.run(&["upgrade", "--to", "2.0.0", "--yes"]).success();
    assert_eq!(project.versions(), ["c1", "e1"]);
    assert!(!project.has_title());
    let journal = rusqlite::Connection::open(ctx.join(".upshift/journal.db")).unwrap();
    let details: Vec<(String, String)> = journal
        .prepare("SELECT kind, detail FROM steps WHERE kind IN ('expand', 'contract') ORDER BY run_id, seq")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let (kind, last) = details.last().unwrap();
    assert_eq!(kind, "contract");
    let detail: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(detail["applied"], serde_json::json!(["c1"]));
    let output: Vec<&str> = detail["output"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    assert!(output.iter().any(|l| l.contains("upgrade c1")), "{output:?}");
    assert!(output.iter().any(|l| l.contains("Running upgrade a1 -> c1")), "{output:?}");

    // The contract branch ran: going back takes the backup.
    ctx.run(&["rollback", "--yes"]).success().stderr_has("restore");
    assert_eq!(project.versions(), ["a1"]);
    assert!(project.has_title());
    assert_eq!(project.tables(), ["notes"]);
}

/// A migration tool of its own: `sql/NNN_name.up.sql` and `.down.sql`, the applied revision
/// in `tool_version`, run through psql. What the `commands` migrator drives.
const TOOL: &str = r#"#!/usr/bin/env bash
set -euo pipefail
cd "$(dirname "$0")"
psql() { "$PSQL" -X -q -t -A -v ON_ERROR_STOP=1 -d "$DATABASE_URL" "$@"; }
current() { psql -c "CREATE TABLE IF NOT EXISTS tool_version (v text)" -c "SELECT v FROM tool_version"; }
ids() { for f in sql/*.up.sql; do b=$(basename "$f" .up.sql); echo "${b%%_*}"; done; }
set_version() { psql -c "DELETE FROM tool_version" ${1:+-c "INSERT INTO tool_version VALUES ('$1')"}; }
case "$1" in
    list) for f in sql/*.up.sql; do b=$(basename "$f" .up.sql); echo "${b%%_*} ${b#*_}"; done ;;
    current) current ;;
    up)
        now=$(current)
        for id in $(ids); do
            if [[ "$id" > "$now" && ! "$id" > "$2" ]]; then
                echo "applying $id"
                psql -1 -f sql/"$id"_*.up.sql
                set_version "$id"
            fi
        done ;;
    down)
        now=$(current)
        for id in $(ids | sort -r); do
            if [[ ! "$id" > "$now" && ( "$2" == base || "$id" > "$2" ) ]]; then
                echo "reverting $id"
                psql -1 -f sql/"$id"_*.down.sql
                if [ "$2" = base ]; then set_version ""; else set_version "$2"; fi
            fi
        done ;;
esac
"#;

/// `migrator = "commands"`: any tool with `list`, `current`, `up` and `down` commands, its
/// revisions split by the manifest's `contract` list; up, down and up again, and an
/// upgrade that runs the expand revisions before the verify and the contract ones after.
#[test]
fn a_tool_with_four_commands_is_a_migrator() {
    let url = upshift_testing::fresh_database();
    let database = upshift_testing::database_name(&url).to_owned();
    let ctx = Context::new();
    ctx.write("tool", TOOL);
    std::fs::set_permissions(ctx.join("tool"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    ctx.write("sql/001_notes.up.sql", "CREATE TABLE notes (id int, title text, body text);\n");
    ctx.write("sql/001_notes.down.sql", "DROP TABLE notes;\n");
    ctx.write("sql/002_tags.up.sql", "CREATE TABLE tags (note_id int, name text);\n");
    ctx.write("sql/002_tags.down.sql", "DROP TABLE tags;\n");
    ctx.write("sql/003_drop_title.up.sql", "ALTER TABLE notes DROP COLUMN title;\n");
    ctx.write("sql/003_drop_title.down.sql", "ALTER TABLE notes ADD COLUMN title text;\n");
    let psql = upshift_testing::postgres().bindir().join("psql");
    ctx.write(
        "upshift.toml",
        &format!(
            "[database]\nurl = \"{url}\"\nmigrator = \"commands\"\ncontract = [\"003\"]\ncommands = {{ list = [\"./tool\", \"list\"], current = [\"./tool\", \"current\"], up = [\"./tool\", \"up\", \"{{revision}}\"], down = [\"./tool\", \"down\", \"{{parent}}\"] }}\n\n[[releases]]\nversion = \"1.0.0\"\nmigrate_to = \"001\"\n\n[[releases]]\nversion = \"2.0.0\"\n"
        ),
    );
    let run = |args: &[&str]| common::Run::from(&ctx.command().args(args).env("PSQL", &psql).output().unwrap());
    let version = || -> Vec<String> {
        let mut client = upshift_testing::postgres().connect(&database);
        client.query("SELECT v FROM tool_version", &[]).unwrap().iter().map(|r| r.get(0)).collect()
    };

    let status: Status = run(&["migrate", "status", "--output", "json"]).success().json();
    assert_eq!((status.applied.len(), status.pending), (0, vec!["001".into(), "002".into(), "003".into()]));
    let up: Moved = run(&["migrate", "up", "--output", "json"]).success().json();
    assert_eq!(up.applied, ["001", "002", "003"]);
    assert_eq!(version(), ["003"]);
    run(&["migrate", "down", "-1"])
        .success()
        .stderr_has("reverted 003")
        .stderr_has("./tool down 002")
        .stderr_has("reverting 003");
    assert_eq!(version(), ["002"]);
    let down: Moved = run(&["migrate", "down", "base", "--output", "json"]).success().json();
    assert_eq!(down.reverted, ["002", "001"]);
    assert!(version().is_empty());
    run(&["migrate", "up", "002"]).success();
    assert_eq!(version(), ["002"]);
    run(&["migrate", "down", "base"]).success();

    // In an upgrade: 001 for 1.0.0; then 002 before the verify, 003 (contract) after it.
    run(&["upgrade", "--to", "1.0.0", "--yes"]).success();
    assert_eq!(version(), ["001"]);
    let plan: serde_json::Value = run(&["plan", "--to", "2.0.0", "--output", "json"]).success().json();
    assert_eq!(
        (plan["expand"].clone(), plan["contract"].clone()),
        (serde_json::json!(["002"]), serde_json::json!(["003"]))
    );
    run(&["upgrade", "--to", "2.0.0", "--yes"]).success().stderr_has("applying 003");
    assert_eq!(version(), ["003"]);
}
