//! `upshift backup` through the real binary, against real SQLite files and the real
//! throwaway PostgreSQL cluster.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Context;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Created {
    id: String,
    size_bytes: u64,
    duration_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Listed {
    id: String,
    created_at: String,
    size_bytes: u64,
    version: Option<String>,
    label: Option<String>,
    database: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pruned {
    removed: Vec<String>,
    kept: Vec<String>,
    leftovers: Vec<String>,
}

fn create(ctx: &Context, args: &[&str]) -> Created {
    let mut all = vec!["backup", "create", "--output", "json"];
    all.extend_from_slice(args);
    ctx.run(&all).success().json()
}

/// Flips one bit in the middle of a file.
fn flip_a_bit(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

// ---- SQLite ----

fn sqlite_fingerprint(path: &Path) -> (i64, String) {
    let connection = rusqlite::Connection::open(path).unwrap();
    let count = connection.query_row("SELECT count(*) FROM notes", [], |r| r.get(0)).unwrap();
    let digest = connection
        .query_row("SELECT group_concat(id || ':' || body, ',') FROM (SELECT * FROM notes ORDER BY id)", [], |r| {
            r.get::<_, Option<String>>(0)
        })
        .unwrap()
        .unwrap_or_default();
    (count, digest)
}

fn sqlite_notes(ctx: &Context, rows: usize) {
    let connection = rusqlite::Connection::open(ctx.join("app.db")).unwrap();
    connection.execute_batch("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)").unwrap();
    let mut insert = connection.prepare("INSERT INTO notes (body) VALUES (?1)").unwrap();
    for i in 0..rows {
        insert.execute([format!("note {i}")]).unwrap();
    }
}

#[test]
fn sqlite_create_list_verify_restore() {
    let ctx = Context::new();
    sqlite_notes(&ctx, 500);
    ctx.write("config/app.toml", "workers = 1\n");
    ctx.write(
        "upshift.toml",
        "[app]\nname = \"notes\"\n[database]\nurl = \"sqlite:app.db\"\n[backup]\nkeep_last = 2\npaths = [\"config\"]\n",
    );
    let before = sqlite_fingerprint(&ctx.join("app.db"));

    let created = create(&ctx, &["--label", "before 2.0"]);
    assert!(created.size_bytes > 0);
    let _ = created.duration_ms;
    let dir = ctx.join(&format!(".upshift/backups/{}", created.id));
    assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    for file in ["manifest.json", "db/database.sqlite.zst", "paths.tar.zst"] {
        assert_eq!(std::fs::metadata(dir.join(file)).unwrap().permissions().mode() & 0o777, 0o600, "{file}");
    }

    let listed: Vec<Listed> = ctx.run(&["backup", "list", "--output", "json"]).success().json();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, created.id);
    assert_eq!(listed[0].label.as_deref(), Some("before 2.0"));
    assert_eq!(listed[0].database.as_deref(), Some("app.db"));
    assert_eq!(listed[0].size_bytes, created.size_bytes);
    assert!(listed[0].version.is_none() && listed[0].created_at.ends_with('Z'));

    ctx.run(&["backup", "verify", &created.id]).success().stdout_has("read back whole");
    ctx.run(&["backup", "verify", "latest", "--deep"]).success().stdout_has("row counts of 1 table(s) match");

    // Into a new file: identical content; the live paths are not touched by a copy.
    ctx.write("config/app.toml", "workers = 2\n");
    ctx.run(&["backup", "restore", &created.id, "--target-url", "sqlite:copy.db"]).success();
    assert_eq!(sqlite_fingerprint(&ctx.join("copy.db")), before);
    assert_eq!(ctx.read("config/app.toml"), "workers = 2\n");

    // Onto the changed original: refused without --force and untouched.
    rusqlite::Connection::open(ctx.join("app.db")).unwrap().execute("DELETE FROM notes WHERE id > 10", []).unwrap();
    let changed = sqlite_fingerprint(&ctx.join("app.db"));
    ctx.run(&["backup", "restore", &created.id]).code(2).stderr_has("not empty").stderr_has("--force");
    assert_eq!(sqlite_fingerprint(&ctx.join("app.db")), changed);
    assert_eq!(ctx.read("config/app.toml"), "workers = 2\n");

    ctx.run(&["backup", "restore", &created.id, "--force"]).success().stdout_has("paths put back: config");
    assert_eq!(sqlite_fingerprint(&ctx.join("app.db")), before);
    assert_eq!(ctx.read("config/app.toml"), "workers = 1\n");

    ctx.run(&["backup", "verify", "nope"]).code(2).stderr_has("no backup `nope`");
}

#[test]
fn sqlite_flipped_byte_is_caught_and_never_restored() {
    let ctx = Context::new();
    sqlite_notes(&ctx, 2000);
    let url = "sqlite:app.db";
    let created = create(&ctx, &["--database-url", url]);
    ctx.run(&["backup", "restore", &created.id, "--database-url", "sqlite:copy.db"]).success();
    let good = sqlite_fingerprint(&ctx.join("copy.db"));
    rusqlite::Connection::open(ctx.join("copy.db")).unwrap().execute("DELETE FROM notes WHERE id > 5", []).unwrap();
    let changed = sqlite_fingerprint(&ctx.join("copy.db"));
    assert_ne!(good, changed);

    flip_a_bit(&ctx.join(&format!(".upshift/backups/{}/db/database.sqlite.zst", created.id)));
    ctx.run(&["backup", "verify", &created.id, "--database-url", url])
        .code(1)
        .stderr_has("is damaged")
        .stderr_has("sha256");
    ctx.run(&["backup", "restore", &created.id, "--database-url", "sqlite:copy.db", "--force"])
        .code(1)
        .stderr_has("will not be restored");
    assert_eq!(sqlite_fingerprint(&ctx.join("copy.db")), changed, "a damaged backup touched the target");
}

/// Backups taken while another process writes are consistent snapshots: every pair of rows
/// written in one transaction is in the copy together.
#[test]
fn sqlite_backup_is_consistent_under_a_concurrent_writer() {
    let ctx = Context::new();
    let path = ctx.join("app.db");
    {
        let connection = rusqlite::Connection::open(&path).unwrap();
        connection
            .execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE a (n INTEGER); CREATE TABLE b (n INTEGER);")
            .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (stop, progress) = (Arc::clone(&stop), Arc::clone(&progress));
        let path = path.clone();
        std::thread::spawn(move || {
            let mut connection = rusqlite::Connection::open(&path).unwrap();
            connection.busy_timeout(Duration::from_secs(10)).unwrap();
            let mut written = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let tx = connection.transaction().unwrap();
                tx.execute("INSERT INTO a VALUES (?1)", [written]).unwrap();
                tx.execute("INSERT INTO b VALUES (?1)", [written]).unwrap();
                tx.commit().unwrap();
                written += 1;
                progress.store(written, Ordering::SeqCst);
            }
            written
        })
    };
    let mut ids = Vec::new();
    for _ in 0..4 {
        // Each backup starts after the writer committed more pairs since the last one.
        let before = progress.load(Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while progress.load(Ordering::SeqCst) < before + 10 {
            assert!(std::time::Instant::now() < deadline, "the writer stopped writing");
            std::thread::yield_now();
        }
        ids.push(create(&ctx, &["--database-url", "sqlite:app.db"]).id);
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(written > 0);
    let mut seen = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let copy = format!("copy{i}.db");
        ctx.run(&["backup", "verify", id, "--deep", "--database-url", "sqlite:app.db"]).success();
        ctx.run(&["backup", "restore", id, "--target-url", &format!("sqlite:{copy}")]).success();
        let connection = rusqlite::Connection::open(ctx.join(&copy)).unwrap();
        let (a, b): (i64, i64) = connection
            .query_row("SELECT (SELECT count(*) FROM a), (SELECT count(*) FROM b)", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap();
        assert_eq!(a, b, "backup {id} holds half a transaction");
        seen.push(a);
    }
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
}

#[test]
fn prune_keeps_what_the_policy_says() {
    let ctx = Context::new();
    ctx.write("config/app.toml", "x = 1\n");
    let ids: Vec<String> = (0..4).map(|_| create(&ctx, &["--path", "config"]).id).collect();
    std::fs::create_dir_all(ctx.join(".upshift/backups/20200101000000-dead.partial")).unwrap();
    let listed: Vec<Listed> = ctx.run(&["backup", "list", "--output", "json"]).success().json();
    assert_eq!(listed.iter().map(|l| l.id.clone()).collect::<Vec<_>>(), ids, "a .partial folder is never listed");

    let pruned: Pruned = ctx.run(&["backup", "prune", "--keep-within", "1h", "--output", "json"]).success().json();
    assert!(pruned.removed.is_empty());
    assert_eq!(pruned.leftovers, ["20200101000000-dead.partial"]);

    let pruned: Pruned = ctx.run(&["backup", "prune", "--keep-last", "2", "--output", "json"]).success().json();
    assert_eq!(pruned.removed, ids[..2]);
    assert_eq!(pruned.kept, ids[2..]);

    // The newest good backup stays even when the policy would keep only a damaged one.
    flip_a_bit(&ctx.join(&format!(".upshift/backups/{}/paths.tar.zst", ids[3])));
    let pruned: Pruned = ctx.run(&["backup", "prune", "--keep-last", "1", "--output", "json"]).success().json();
    assert!(pruned.removed.is_empty(), "{pruned:?}");
    assert_eq!(pruned.kept, ids[2..]);
}

#[test]
fn bad_input_exits_2() {
    let ctx = Context::new();
    ctx.run(&["backup", "create"]).code(2).stderr_has("nothing to back up");
    ctx.run(&["backup", "create", "--path", "../outside"]).code(2).stderr_has("leaves");
    ctx.run(&["backup", "create", "--path", "missing"]).code(2).stderr_has("does not exist");
    ctx.write("upshift.toml", "[backup]\nencrypt_to = [\"age1xyz\"]\n");
    ctx.run(&["backup", "list"])
        .code(2)
        .stderr_has("upshift.toml: [backup] encrypt_to: `age1xyz` is not an age recipient");
    assert!(!ctx.join(".upshift").exists(), "a refused command wrote files");
}

/// A new age identity written to `name` in the context; returns its public key.
fn age_identity(ctx: &Context, name: &str) -> String {
    use age::secrecy::ExposeSecret;
    let identity = age::x25519::Identity::generate();
    ctx.write(name, &format!("{}\n", identity.to_string().expose_secret()));
    identity.to_public().to_string()
}

#[test]
fn sqlite_encrypted_backups_need_the_identity() {
    let ctx = Context::new();
    sqlite_notes(&ctx, 300);
    ctx.write("config/app.toml", "token = \"s3cret\"\n");
    let recipient = age_identity(&ctx, "key.txt");
    age_identity(&ctx, "other.txt");
    ctx.write(
        "upshift.toml",
        &format!(
            "[database]\nurl = \"sqlite:app.db\"\n[backup]\npaths = [\"config\"]\nencrypt_to = [\"{recipient}\"]\n"
        ),
    );
    let before = sqlite_fingerprint(&ctx.join("app.db"));
    let created = create(&ctx, &[]);
    let dir = ctx.join(&format!(".upshift/backups/{}", created.id));
    for file in ["db/database.sqlite.zst.age", "paths.tar.zst.age"] {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        assert!(bytes.starts_with(b"age-encryption.org/v1"), "{file} is not an age file");
    }
    let manifest = ctx.read(&format!(".upshift/backups/{}/manifest.json", created.id));
    assert!(manifest.contains(&recipient));

    ctx.run(&["backup", "verify", &created.id]).code(2).stderr_has("is encrypted to").stderr_has("--identity");
    ctx.run(&["backup", "verify", &created.id, "--deep", "--identity", "key.txt"]).success();
    ctx.run(&["backup", "restore", &created.id, "--target-url", "sqlite:copy.db"]).code(2).stderr_has("--identity");
    ctx.run(&["backup", "restore", &created.id, "--target-url", "sqlite:copy.db", "--identity", "other.txt"])
        .code(1)
        .stderr_has("cannot be decrypted");
    assert!(!ctx.join("copy.db").exists(), "a failed decryption left a target behind");
    ctx.run(&["backup", "restore", &created.id, "--target-url", "sqlite:copy.db", "--identity", "key.txt"]).success();
    assert_eq!(sqlite_fingerprint(&ctx.join("copy.db")), before);
    ctx.write("config/app.toml", "changed\n");
    ctx.run(&["backup", "restore", &created.id, "--force", "--identity", "key.txt"]).success();
    assert_eq!(ctx.read("config/app.toml"), "token = \"s3cret\"\n");
}

// ---- PostgreSQL ----

fn pg_setup(url: &str, rows: i64) {
    let name = upshift_testing::database_name(url);
    upshift_testing::postgres()
        .connect(name)
        .batch_execute(&format!(
            "CREATE TABLE notes (id bigserial PRIMARY KEY, body text NOT NULL, created timestamptz NOT NULL DEFAULT '2026-01-01');
             INSERT INTO notes (body) SELECT 'note ' || g FROM generate_series(1, {rows}) g;
             CREATE TABLE tags (note_id bigint REFERENCES notes (id), name text NOT NULL);
             INSERT INTO tags SELECT g, 'tag' || (g % 7) FROM generate_series(1, least({rows}, 1000)) g;
             CREATE INDEX tags_name ON tags (name);
             CREATE FUNCTION add_one(i int) RETURNS int LANGUAGE sql IMMUTABLE AS $$ SELECT i + 1 $$;
             CREATE VIEW note_count AS SELECT count(*) AS n FROM notes;"
        ))
        .unwrap();
}

/// Row counts, a checksum over every row, the function's definition and the sequence.
fn pg_fingerprint(database: &str) -> String {
    let mut client = upshift_testing::postgres().connect(database);
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM notes)::text || ' ' || (SELECT count(*) FROM tags)::text || ' ' ||
                    (SELECT md5(coalesce(string_agg(n::text, ',' ORDER BY n.id), '')) FROM notes n) || ' ' ||
                    (SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM tags t) || ' ' ||
                    md5(pg_get_functiondef('add_one(int)'::regprocedure)) || ' ' ||
                    (SELECT last_value FROM notes_id_seq)::text || ' ' || (SELECT n FROM note_count)::text",
            &[],
        )
        .unwrap();
    row.get(0)
}

fn database_exists(name: &str) -> bool {
    upshift_testing::postgres()
        .connect("postgres")
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .unwrap()
        .is_some()
}

#[test]
fn postgres_create_verify_restore() {
    let ctx = Context::new();
    // A password in the URL (the test cluster trusts every login) must never be written.
    let url = upshift_testing::fresh_database().replace("postgres@", "postgres:pa55-word@");
    let name = upshift_testing::database_name(&url).to_owned();
    pg_setup(&url, 3000);
    let before = pg_fingerprint(&name);

    let run = ctx.run(&["backup", "create", "--database-url", &url, "--output", "json"]);
    let created: Created = run.success().json();
    let manifest = ctx.read(&format!(".upshift/backups/{}/manifest.json", created.id));
    for text in [&manifest, &run.stdout, &run.stderr] {
        assert!(!text.contains("pa55-word"), "the password leaked: {text}");
    }
    let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    let database = &manifest["database"];
    assert_eq!(database["engine"], "postgres");
    assert_eq!(database["row_counts"]["public.notes"], 3000);
    assert!(database["pg_dump_version"].as_str().unwrap().contains("PostgreSQL"));
    assert!(manifest["files"].as_array().unwrap().iter().any(|f| f["path"] == "db/toc.dat.zst"));

    ctx.run(&["backup", "verify", &created.id]).success();
    ctx.run(&["backup", "verify", &created.id, "--deep", "--database-url", &url])
        .success()
        .stdout_has("row counts of 2 table(s) match");
    assert!(
        !database_exists(&format!("upshift_verify_{}", created.id.replace('-', "_"))),
        "the scratch database stayed"
    );

    // Into a database that does not exist yet: created, identical.
    let copy = format!("{name}_copy");
    let copy_url = upshift_testing::postgres().url(&copy);
    ctx.run(&["backup", "restore", &created.id, "--database-url", &url, "--target-url", &copy_url]).success();
    assert_eq!(pg_fingerprint(&copy), before);

    // Onto a non-empty database: refused without --force, untouched; with it, replaced.
    upshift_testing::postgres()
        .connect(&copy)
        .batch_execute("DELETE FROM tags; DELETE FROM notes WHERE id > 3")
        .unwrap();
    let changed = pg_fingerprint(&copy);
    ctx.run(&["backup", "restore", &created.id, "--target-url", &copy_url]).code(2).stderr_has("not empty");
    assert_eq!(pg_fingerprint(&copy), changed);
    ctx.run(&["backup", "restore", &created.id, "--target-url", &copy_url, "--force"]).success();
    assert_eq!(pg_fingerprint(&copy), before);
    assert!(!database_exists(&format!("{copy}__upshift_restore")) && !database_exists(&format!("{copy}__upshift_old")));

    // A flipped byte: caught by verify, refused by restore, target untouched.
    upshift_testing::postgres().connect(&copy).batch_execute("DELETE FROM tags").unwrap();
    let changed = pg_fingerprint(&copy);
    let toc = ctx.join(&format!(".upshift/backups/{}/db/toc.dat.zst", created.id));
    flip_a_bit(&toc);
    ctx.run(&["backup", "verify", &created.id]).code(1).stderr_has("is damaged");
    ctx.run(&["backup", "restore", &created.id, "--target-url", &copy_url, "--force"]).code(1);
    assert_eq!(pg_fingerprint(&copy), changed);
}

#[test]
fn postgres_encrypted_backup_round_trip() {
    let ctx = Context::new();
    let url = upshift_testing::fresh_database();
    pg_setup(&url, 1000);
    let before = pg_fingerprint(upshift_testing::database_name(&url));
    let recipient = age_identity(&ctx, "key.txt");
    ctx.write("upshift.toml", &format!("[backup]\nencrypt_to = [\"{recipient}\"]\n"));
    let created = create(&ctx, &["--database-url", &url]);
    assert!(ctx.join(&format!(".upshift/backups/{}/db/toc.dat.zst.age", created.id)).is_file());
    ctx.run(&["backup", "verify", &created.id, "--deep", "--database-url", &url, "--identity", "key.txt"]).success();
    let copy = format!("{}_enc", upshift_testing::database_name(&url));
    let copy_url = upshift_testing::postgres().url(&copy);
    ctx.run(&["backup", "restore", &created.id, "--target-url", &copy_url, "--identity", "key.txt"]).success();
    assert_eq!(pg_fingerprint(&copy), before);
}

/// A table big enough to be streamed from the backup (over 32 MB before compression) is loaded by
/// several sessions at once and comes back row for row, its index, foreign key and sequence
/// with it.
#[test]
fn postgres_big_table_is_loaded_by_several_sessions() {
    let ctx = Context::new();
    let url = upshift_testing::fresh_database();
    let name = upshift_testing::database_name(&url).to_owned();
    pg_setup(&url, 3000);
    upshift_testing::postgres()
        .connect(&name)
        .batch_execute(
            "INSERT INTO notes (body) SELECT md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text)
             FROM generate_series(1, 500000) g",
        )
        .unwrap();
    let before = pg_fingerprint(&name);
    let created = create(&ctx, &["--database-url", &url]);

    let copy = format!("{name}_big");
    let mut child = ctx
        .command()
        .args(["backup", "restore", &created.id, "--target-url", &upshift_testing::postgres().url(&copy)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let scratch = format!("{copy}__upshift_restore");
    let mut most = 0;
    while child.try_wait().unwrap().is_none() {
        let loading: i64 = upshift_testing::postgres()
            .connect("postgres")
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'upshift load'",
                &[&scratch],
            )
            .unwrap()
            .get(0);
        most = most.max(loading);
        std::thread::sleep(Duration::from_millis(5));
    }
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(most >= 2, "at most {most} loading session(s) were seen");
    assert_eq!(pg_fingerprint(&copy), before);
    let mut restored = upshift_testing::postgres().connect(&copy);
    let kept: i64 = restored
        .query_one(
            "SELECT count(*) FROM pg_constraint WHERE conrelid = 'tags'::regclass AND contype = 'f' AND convalidated",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(kept, 1, "the foreign key was not restored");
    assert!(restored.query_opt("SELECT 1 FROM pg_indexes WHERE indexname = 'tags_name'", &[]).unwrap().is_some());
}

/// An owner who revoked its own INSERT on a big table (a read-only table) restores it as
/// itself: the privileges are applied last, after the data, as `pg_restore` does.
#[test]
fn postgres_privileges_are_restored_after_the_data() {
    let ctx = Context::new();
    let cluster = upshift_testing::postgres();
    let role = format!("owner_{}", std::process::id());
    let name = format!("acl_{}", std::process::id());
    let mut maintenance = cluster.connect("postgres");
    maintenance.batch_execute(&format!("CREATE ROLE {role} LOGIN CREATEDB")).unwrap();
    maintenance.batch_execute(&format!("CREATE DATABASE {name} OWNER {role}")).unwrap();
    cluster
        .connect(&name)
        .batch_execute(&format!(
            "SET ROLE {role};
             CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL);
             INSERT INTO notes SELECT g, md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text)
             FROM generate_series(1, 500000) g;
             REVOKE INSERT ON notes FROM {role};"
        ))
        .unwrap();
    let as_owner = |database: &str| cluster.url(database).replace("postgres@", &format!("{role}@"));
    let created = create(&ctx, &["--database-url", &as_owner(&name)]);
    let copy = format!("{name}_copy");
    ctx.run(&["backup", "restore", &created.id, "--target-url", &as_owner(&copy)]).success();
    let mut restored = cluster.connect(&copy);
    let rows: i64 = restored.query_one("SELECT count(*) FROM notes", &[]).unwrap().get(0);
    assert_eq!(rows, 500_000);
    let (select, insert): (bool, bool) = {
        let row = restored
            .query_one(
                "SELECT has_table_privilege($1, 'notes', 'SELECT'), has_table_privilege($1, 'notes', 'INSERT')",
                &[&role],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(select && !insert, "the privileges were not restored: SELECT {select}, INSERT {insert}");
}

/// A big table of a database in another encoding than UTF-8 is left to `pg_restore` (the
/// loading sessions speak UTF-8), and its accented rows come back as they were.
#[test]
fn postgres_big_table_in_latin1_comes_back_intact() {
    let ctx = Context::new();
    let name = format!("latin1_{}", std::process::id());
    let cluster = upshift_testing::postgres();
    cluster
        .connect("postgres")
        .batch_execute(&format!(
            "CREATE DATABASE {name} ENCODING 'LATIN1' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'"
        ))
        .unwrap();
    let fingerprint = |database: &str| -> String {
        cluster
            .connect(database)
            .query_one(
                "SELECT count(*)::text || ' ' || md5(convert_to(string_agg(body, ',' ORDER BY id), 'UTF8')) FROM notes",
                &[],
            )
            .unwrap()
            .get(0)
    };
    cluster
        .connect(&name)
        .batch_execute(
            "CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL);
             INSERT INTO notes SELECT g, 'café ' || md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text)
             FROM generate_series(1, 500000) g;",
        )
        .unwrap();
    let before = fingerprint(&name);
    let created = create(&ctx, &["--database-url", &cluster.url(&name)]);
    let copy = format!("{name}_copy");
    ctx.run(&["backup", "restore", &created.id, "--target-url", &cluster.url(&copy)]).success();
    assert_eq!(fingerprint(&copy), before);
    let accented: i64 =
        cluster.connect(&copy).query_one("SELECT count(*) FROM notes WHERE body LIKE 'café %'", &[]).unwrap().get(0);
    assert_eq!(accented, 500_000);
}

/// kill -9 of the whole restore (`upshift` and its `pg_restore`) while `pg_restore` runs: the
/// target is as it was, and the next restore succeeds.
#[test]
fn postgres_restore_killed_halfway_leaves_the_target() {
    restore_killed_while("upshift pg_restore%", None);
}

/// The same, killed while a big table streams into the scratch database through upshift's
/// own loading sessions.
#[test]
fn postgres_restore_killed_while_loading_a_big_table_leaves_the_target() {
    restore_killed_while(
        "upshift load",
        Some(
            "INSERT INTO notes (body) SELECT md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text) FROM generate_series(1, 500000) g",
        ),
    );
}

/// Kills a `restore --force` as soon as a session whose application name is like `sessions`
/// works on the scratch database, then checks the target and restores again.
fn restore_killed_while(sessions: &str, more_rows: Option<&str>) {
    let ctx = Context::new();
    let url = upshift_testing::fresh_database();
    let name = upshift_testing::database_name(&url).to_owned();
    pg_setup(&url, if more_rows.is_some() { 3000 } else { 600_000 });
    if let Some(sql) = more_rows {
        upshift_testing::postgres().connect(&name).batch_execute(sql).unwrap();
    }
    let rows: i64 =
        upshift_testing::postgres().connect(&name).query_one("SELECT count(*) FROM notes", &[]).unwrap().get(0);
    let created = create(&ctx, &["--database-url", &url]);
    upshift_testing::postgres()
        .connect(&name)
        .batch_execute("DELETE FROM tags; DELETE FROM notes WHERE id > 10")
        .unwrap();
    let changed = pg_fingerprint(&name);

    let mut child = ctx
        .command()
        .args(["backup", "restore", &created.id, "--force", "--database-url", &url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let scratch = format!("{name}__upshift_restore");
    let started = Instant::now();
    let mut killed = false;
    while started.elapsed() < Duration::from_mins(1) {
        let restoring = upshift_testing::postgres()
            .connect("postgres")
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name LIKE $2",
                &[&scratch, &sessions],
            )
            .unwrap()
            .get::<_, i64>(0)
            > 0;
        if restoring {
            let group = i32::try_from(child.id()).unwrap();
            let status =
                std::process::Command::new("kill").args(["-KILL", "--", &format!("-{group}")]).status().unwrap();
            assert!(status.success(), "kill failed");
            killed = true;
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the restore ended before it could be killed: make the data bigger"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(killed, "no {sessions} session was seen");
    let status = child.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "the restore was not killed: {status}");
    assert_eq!(pg_fingerprint(&name), changed, "a killed restore changed the target");

    ctx.run(&["backup", "restore", &created.id, "--force", "--database-url", &url]).success();
    assert_eq!(
        upshift_testing::postgres()
            .connect(&name)
            .query_one("SELECT count(*) FROM notes", &[])
            .unwrap()
            .get::<_, i64>(0),
        rows
    );
}

/// Progress is drawn on a terminal (a pty from `script`), never in json mode and never on a
/// pipe; `NO_COLOR` turns colour off, not progress.
#[test]
fn progress_only_on_a_terminal() {
    let ctx = Context::new();
    sqlite_notes(&ctx, 100);
    let on_terminal = |args: &str, no_color: bool| {
        let line = format!("'{}' backup create --database-url sqlite:app.db {args}", env!("CARGO_BIN_EXE_upshift"));
        let mut script = std::process::Command::new("script");
        script.current_dir(ctx.path()).env_remove("NO_COLOR").env_remove("DATABASE_URL").args([
            "-qec",
            &line,
            "/dev/null",
        ]);
        if no_color {
            script.env("NO_COLOR", "1");
        }
        let output = script.output().expect("script (util-linux) runs");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let drawn = on_terminal("", false);
    assert!(drawn.contains("compressing: ") && drawn.contains("MiB/s"), "{drawn}");
    let json = on_terminal("--output json", false);
    assert!(!json.contains("compressing"), "{json}");
    let no_color = on_terminal("", true);
    assert!(no_color.contains("compressing: ") && !no_color.contains("\u{1b}[0m"), "{no_color}");
    let piped = ctx
        .command()
        .env_remove("NO_COLOR")
        .args(["backup", "create", "--database-url", "sqlite:app.db"])
        .output()
        .unwrap();
    assert!(piped.status.success());
    assert!(!String::from_utf8_lossy(&piped.stderr).contains("compressing"));
}

/// Replaces a backup's `paths.tar.zst` with `entries` (name, symlink target or file text),
/// and its size and sha256 in `manifest.json`, as someone who can write the backup folder
/// could: the checksums are not a signature.
fn rewrite_paths_archive(backup: &Path, entries: &[(&str, Result<&str, &str>)]) {
    use sha2::Digest as _;
    let mut tar = Vec::new();
    for (name, what) in entries {
        let mut header = tar::Header::new_gnu();
        header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        match what {
            Ok(text) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(text.len() as u64);
                header.set_mode(0o755);
                header.set_cksum();
                tar.extend_from_slice(header.as_bytes());
                tar.extend_from_slice(text.as_bytes());
                tar.resize(tar.len().div_ceil(512) * 512, 0);
            }
            Err(link) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.as_gnu_mut().unwrap().linkname[..link.len()].copy_from_slice(link.as_bytes());
                header.set_size(0);
                header.set_mode(0o777);
                header.set_cksum();
                tar.extend_from_slice(header.as_bytes());
            }
        }
    }
    tar.resize(tar.len() + 1024, 0);
    let compressed = zstd::encode_all(&tar[..], 3).unwrap();
    std::fs::write(backup.join("paths.tar.zst"), &compressed).unwrap();
    let sha256 = format!("{:x}", sha2::Sha256::digest(&compressed));
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(backup.join("manifest.json")).unwrap()).unwrap();
    for file in manifest["files"].as_array_mut().unwrap() {
        if file["path"] == "paths.tar.zst" {
            file["size"] = serde_json::json!(compressed.len());
            file["sha256"] = serde_json::json!(sha256);
        }
    }
    std::fs::write(backup.join("manifest.json"), serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
}

/// Regression: a rewritten archive restored top-level entries the manifest never saved
/// (`.upshift`, `releases`) and followed a chain of symlinks out of the saved folder.
#[test]
fn a_rewritten_paths_archive_cannot_write_outside_the_saved_paths() {
    let ctx = Context::new();
    sqlite_notes(&ctx, 3);
    ctx.write("upshift.toml", "[database]\nurl = \"sqlite:app.db\"\n[backup]\npaths = [\"config\"]\n");
    ctx.write("config/app.toml", "kept = true\n");
    ctx.write(".upshift/journal-stand-in", "the journal\n");
    ctx.write("releases/1.0.0/notes", "the release\n");
    let id = create(&ctx, &[]).id;
    let backup = ctx.join(&format!(".upshift/backups/{id}"));
    let tricks: [&[(&str, Result<&str, &str>)]; 4] = [
        &[("config/app.toml", Ok("planted = true\n")), (".upshift/journal-stand-in", Ok("gone\n"))],
        &[("releases/1.0.0/notes", Ok("#!/bin/sh\nplanted\n"))],
        &[
            ("config/s1", Err("..")),
            ("config/s2", Err("s1/..")),
            ("config/s3", Err("s2/..")),
            ("config/s4", Err("s3/..")),
        ],
        &[("config/up", Err("../releases")), ("config/up/1.0.0/notes", Ok("planted\n"))],
    ];
    for entries in tricks {
        rewrite_paths_archive(&backup, entries);
        ctx.run(&["backup", "verify", &id]).success();
        ctx.run(&["backup", "restore", &id, "--force"]).code(2).stderr_has("holds an unsafe path, nothing restored");
        assert_eq!(ctx.read("config/app.toml"), "kept = true\n", "{entries:?}");
        assert_eq!(ctx.read(".upshift/journal-stand-in"), "the journal\n", "{entries:?}");
        assert_eq!(ctx.read("releases/1.0.0/notes"), "the release\n", "{entries:?}");
        assert!(!ctx.join("config/s4").exists() && !ctx.join("config/up").exists(), "{entries:?}");
    }
    // A link that stays inside its saved path is restored.
    rewrite_paths_archive(
        &backup,
        &[("config/app.toml", Ok("restored = true\n")), ("config/current", Err("app.toml"))],
    );
    ctx.run(&["backup", "restore", &id, "--force"]).success();
    assert_eq!(ctx.read("config/current"), "restored = true\n");
}
