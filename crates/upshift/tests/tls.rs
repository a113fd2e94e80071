//! PostgreSQL over TLS, like libpq, against a real TLS-only cluster whose CA and server
//! certificate (for `localhost`) the test made: every `sslmode`, the errors that say which
//! mode failed and why, and `migrate` and `backup` over `verify-full`.

mod common;

use common::{Context, Run};
use upshift_testing::{TlsPostgres, tls_postgres};

fn migrations(ctx: &Context) {
    ctx.write(
        "migrations/1_notes.sql",
        "-- upshift:up\nCREATE TABLE notes (id int PRIMARY KEY, body text);\nINSERT INTO notes VALUES (1, 'over TLS');\n-- upshift:down\nDROP TABLE notes;\n",
    );
}

fn full(tls: &TlsPostgres, host: &str, database: &str, ca: &std::path::Path) -> String {
    tls.url(host, database, &format!("sslmode=verify-full&sslrootcert={}", ca.display()))
}

fn up(ctx: &Context, url: &str) -> Run {
    ctx.migrate(url, &["up"])
}

#[test]
fn every_sslmode_as_libpq_documents_it() {
    let tls = tls_postgres();
    let ctx = Context::new();
    migrations(&ctx);
    let db = tls.create_database();
    // require: encrypted, nothing checked.
    up(&ctx, &tls.url("127.0.0.1", &db, "sslmode=require")).success();
    // prefer (the default): the server offers TLS, so it is used (plain TCP is rejected).
    ctx.migrate(&tls.url("127.0.0.1", &db, ""), &["status"]).success();
    // verify-full: the right CA and the host on the certificate.
    ctx.migrate(&full(tls, "localhost", &db, &tls.ca), &["status"]).success();
    // verify-ca: the chain is enough, whatever host name was used.
    let ca_only = tls.url("127.0.0.1", &db, &format!("sslmode=verify-ca&sslrootcert={}", tls.ca.display()));
    ctx.migrate(&ca_only, &["status"]).success();
    // verify-full to 127.0.0.1: not the name on the certificate.
    ctx.migrate(&full(tls, "127.0.0.1", &db, &tls.ca), &["status"])
        .code(1)
        .stderr_has("sslmode=verify-full: the server's certificate does not name the host 127.0.0.1")
        .stderr_has("sslmode=verify-ca");
    // The wrong CA.
    ctx.migrate(&full(tls, "localhost", &db, &tls.other_ca), &["status"])
        .code(1)
        .stderr_has("does not chain to a trusted root")
        .stderr_has("sslrootcert=");
    // require with a root certificate behaves like verify-ca: the wrong CA fails.
    let require_other = tls.url("127.0.0.1", &db, &format!("sslmode=require&sslrootcert={}", tls.other_ca.display()));
    ctx.migrate(&require_other, &["status"]).code(1).stderr_has("does not chain to a trusted root");
    // disable, against a server that takes TLS only.
    ctx.migrate(&tls.url("127.0.0.1", &db, "sslmode=disable"), &["status"])
        .code(1)
        .stderr_has("sslmode=disable: the server refuses connections without TLS")
        .stderr_has("use sslmode=require or stronger");
    // A bad mode is bad input.
    ctx.migrate(&tls.url("127.0.0.1", &db, "sslmode=strict"), &["status"]).code(2).stderr_has("verify-full");
}

#[test]
fn the_mode_comes_from_pgsslmode_when_the_url_says_none() {
    let tls = tls_postgres();
    let ctx = Context::new();
    migrations(&ctx);
    let db = tls.create_database();
    let url = tls.url("127.0.0.1", &db, "");
    let run = |mode: &str| {
        Run::from(
            &ctx.command().args(["migrate", "up", "--database-url", &url]).env("PGSSLMODE", mode).output().unwrap(),
        )
    };
    run("disable").code(1).stderr_has("sslmode=disable");
    run("require").success();
}

#[test]
fn a_server_without_tls_is_refused_when_tls_is_required() {
    let ctx = Context::new();
    migrations(&ctx);
    let plain = upshift_testing::fresh_database();
    up(&ctx, &format!("{plain}?sslmode=require")).code(1).stderr_has("sslmode=require: the server does not offer TLS");
    // prefer falls back to plain text, like libpq.
    up(&ctx, &format!("{plain}?sslmode=prefer")).success();
}

#[test]
fn backup_and_restore_over_verify_full() {
    let tls = tls_postgres();
    let ctx = Context::new();
    migrations(&ctx);
    let db = tls.create_database();
    let url = full(tls, "localhost", &db, &tls.ca);
    up(&ctx, &url).success();
    // pg_dump and pg_restore get the same settings through PGSSLMODE / PGSSLROOTCERT.
    ctx.run(&["backup", "create", "--database-url", &url]).success();
    ctx.run(&["backup", "verify", "latest", "--deep", "--database-url", &url]).success();
    tls.cluster.connect(&db).batch_execute("DELETE FROM notes").unwrap();
    ctx.run(&["backup", "restore", "latest", "--force", "--database-url", &url]).success();
    let body: String = tls.cluster.connect(&db).query_one("SELECT body FROM notes", &[]).unwrap().get(0);
    assert_eq!(body, "over TLS");
}
