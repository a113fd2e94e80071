//! `upshift guide` (snapshots of the notes example's guides) and `upshift config check` on
//! real files.

mod common;

use common::Context;
use serde::Deserialize;

/// The demo's deployment, with release 2.0.0 declaring deprecations and config changes.
fn notes_deployment() -> Context {
    let ctx = Context::new();
    ctx.run(&["demo", "--dir", ".", "--prepare-only"]).success();
    let manifest = ctx.read("upshift.toml").replace(
        "breaking = [\"notes have no title; they carry tags\"]",
        r#"breaking = ["notes have no title; they carry tags"]
deprecated = [{ what = "POST /api/notes with a title", removed_in = "3.0.0", instead = "tags" }]
config_added = [{ name = "NOTES_MAX_TAGS", default = "16", required = false, doc = "tags per note" }, { name = "NOTES_SECRET", required = true, doc = "signs sessions" }]
config_removed = ["NOTES_TITLE_LENGTH"]
config_changed = [{ name = "NOTES_WORKERS", from = "1", to = "2", why = "throughput" }]"#,
    );
    ctx.write("upshift.toml", &manifest);
    ctx
}

#[test]
fn guide_from_1_to_2() {
    let ctx = notes_deployment();
    let guide = ctx.run(&["guide", "--from", "1.0.0", "--to", "2.0.0"]).success().stdout.clone();
    insta::assert_snapshot!(guide);
}

#[test]
fn guide_from_1_to_3_aggregates_both_releases() {
    let ctx = notes_deployment();
    let guide = ctx.run(&["guide", "--from", "1.0.0", "--to", "3.0.0"]).success().stdout.clone();
    insta::assert_snapshot!(guide);
}

#[test]
fn guide_refuses_an_empty_range() {
    let ctx = notes_deployment();
    ctx.run(&["guide", "--from", "2.0.0", "--to", "2.0.0"]).code(2).stderr_has("no release after 2.0.0 up to 2.0.0");
    ctx.run(&["guide", "--from", "1.0.0", "--to", "4.0.0"]).code(2).stderr_has("known releases: 1.0.0, 2.0.0, 3.0.0");
    let json: serde_json::Value = serde_json::from_str(
        &ctx.run(&["guide", "--from", "1.0.0", "--to", "2.0.0", "--output", "json"]).success().stdout,
    )
    .unwrap();
    assert!(json["markdown"].as_str().unwrap().starts_with("# Upgrade guide: notes 1.0.0 → 2.0.0"));
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Check {
    ok: bool,
    missing: Vec<Missing>,
    removed: Vec<String>,
    unknown: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Missing {
    name: String,
    added_in: String,
    doc: Option<String>,
}

#[test]
fn config_check_on_env_files() {
    let ctx = notes_deployment();
    ctx.write("missing.env", "# the 1.0.0 configuration\nNOTES_TITLE_LENGTH=80\nexport NOTES_WORKERS=1\n");
    let run = ctx.run(&["config", "check", "--to", "2.0.0", "--env-file", "missing.env", "--output", "json"]);
    let check: Check = run.code(2).json();
    assert!(!check.ok);
    assert_eq!(check.missing.len(), 1);
    assert_eq!((check.missing[0].name.as_str(), check.missing[0].added_in.as_str()), ("NOTES_SECRET", "2.0.0"));
    assert_eq!(check.missing[0].doc.as_deref(), Some("signs sessions"));
    assert_eq!(check.removed, ["NOTES_TITLE_LENGTH"]);
    assert!(check.unknown.is_empty(), "{:?}", check.unknown);
    run.stderr_has("requires options that are not set: NOTES_SECRET")
        .stderr_has("NOTES_TITLE_LENGTH is set but was removed");

    ctx.write("good.env", "NOTES_SECRET=s3cret\nNOTES_WORKER=2\n\n");
    let check: Check =
        ctx.run(&["config", "check", "--to", "2.0.0", "--env-file", "good.env", "--output", "json"]).success().json();
    assert!(check.ok && check.missing.is_empty() && check.removed.is_empty());
    assert_eq!(check.unknown, ["NOTES_WORKER"], "a typo of NOTES_WORKERS is caught");
    // 1.0.0 declares none of these: nothing is required yet.
    ctx.run(&["config", "check", "--to", "1.0.0", "--env-file", "missing.env"]).success().stdout_has("ok:");

    ctx.write("bad.env", "NOTES_SECRET=x\nthis line has no equals sign\n");
    ctx.run(&["config", "check", "--to", "2.0.0", "--env-file", "bad.env"])
        .code(2)
        .stderr_has("bad.env:2: expected KEY=VALUE");
}

#[test]
fn missing_required_options_stop_plan_and_upgrade_before_anything_runs() {
    let ctx = notes_deployment();
    ctx.run(&["upgrade", "--to", "1.0.0"]).success();
    ctx.run(&["plan", "--to", "2.0.0"]).code(2).stderr_has("needs options that are not set: NOTES_SECRET");
    ctx.run(&["upgrade", "--to", "2.0.0"]).code(2).stderr_has("NOTES_SECRET");
    let history = ctx.run(&["history", "--output", "json"]).success().stdout.clone();
    assert!(!history.contains("2.0.0"), "a refused upgrade was recorded: {history}");
    let plan = ctx.command().args(["plan", "--to", "2.0.0"]).env("NOTES_SECRET", "x").output().unwrap();
    assert!(plan.status.success(), "{}", String::from_utf8_lossy(&plan.stderr));
    assert!(ctx.run(&["agent", "stop"]).code == 0);
}
