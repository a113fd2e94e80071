//! PostgreSQL: `pg_dump --format=directory --jobs=N --compress=0` from an exported snapshot,
//! each file compressed with multi-threaded zstd while `pg_dump` writes it (see [`follow`]);
//! restored into a scratch database that is renamed over the target only when the restore
//! succeeded, so a failed or killed restore leaves the target as it was. A restore runs
//! `pg_restore --exit-on-error --jobs=N` section by section, and streams each big table's
//! data from the backup through N sessions of its own: one table's COPY is most of a
//! restore's time, and `pg_restore` gives it one session.
//!
//! Every child process's exit status is checked directly (no shell pipes). The password
//! reaches the tools through `PGPASSWORD` in their environment, never their arguments.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use postgres::config::Host;
use postgres::{Client, IsolationLevel};
use upshift_postgres::Config;

use crate::artifact::{self, Codec, FileEntry, Identities};
use crate::error::Error;
use crate::follow;
use crate::manifest::{DatabaseInfo, EngineKind, Extension};

/// Where the dump's files go inside a backup.
pub(crate) const DB_DIR: &str = "db";
/// The roles, when they could be read.
pub(crate) const ROLES: &str = "roles.sql.zst";

/// A database error with the server's own message in it.
fn pg_error(action: impl Into<String>) -> impl FnOnce(postgres::Error) -> Error {
    let action = action.into();
    move |e| Error::Database { source: upshift_migrate::engine::postgres_message(&e).into(), action }
}

fn connect(config: &Config, database: Option<&str>) -> Result<Client, Error> {
    let mut config = config.clone();
    if let Some(database) = database {
        config.dbname(database);
    }
    if config.get_application_name().is_none() {
        config.application_name("upshift backup");
    }
    config.connect().map_err(|e| Error::Database {
        source: match e.postgres() {
            Some(client) if client.as_db_error().is_some() => upshift_migrate::engine::postgres_message(client).into(),
            _ => e.to_string().into(),
        },
        action: "connect to PostgreSQL".into(),
    })
}

fn database_name(config: &Config) -> String {
    config.get_dbname().or(config.get_user()).unwrap_or("postgres").to_owned()
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

fn server_major(client: &mut Client) -> Result<u32, Error> {
    let number: String =
        client.query_one("SHOW server_version_num", &[]).map_err(pg_error("read the server version"))?.get(0);
    number.parse::<u32>().map(|n| n / 10000).map_err(|e| Error::database("read the server version", e))
}

/// The `pg_dump`/`pg_restore`/`pg_dumpall` of one installation.
pub(crate) struct Tools {
    bindir: PathBuf,
    major: u32,
}

fn tool_major(path: &Path) -> Option<u32> {
    let output = Command::new(path).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    // "pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
    text.split_whitespace().nth(2)?.split('.').next()?.parse().ok()
}

impl Tools {
    /// The client tools that fit a server of major version `server_major`: the same major
    /// if installed, else the newest newer one. Looks in `pg_config --bindir`,
    /// `/usr/lib/postgresql/<major>/bin`, then PATH.
    pub(crate) fn find(server_major: u32) -> Result<Tools, Error> {
        let mut folders: Vec<PathBuf> = Vec::new();
        if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
            folders.push(PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()));
        }
        if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
            folders.extend(entries.filter_map(Result::ok).map(|e| e.path().join("bin")));
        }
        folders.extend(std::env::var_os("PATH").iter().flat_map(std::env::split_paths));
        let mut found: Vec<Tools> = folders
            .into_iter()
            .filter(|dir| ["pg_dump", "pg_restore"].iter().all(|t| dir.join(t).is_file()))
            .filter_map(|bindir| Some(Tools { major: tool_major(&bindir.join("pg_dump"))?, bindir }))
            .filter(|tools| tools.major >= server_major)
            .collect();
        found.sort_by_key(|tools| (tools.major != server_major, std::cmp::Reverse(tools.major)));
        found.into_iter().next().ok_or_else(|| Error::Tool {
            program: "pg_dump".into(),
            message: format!(
                "for PostgreSQL {server_major} or newer was not found (looked in pg_config --bindir, \
                 /usr/lib/postgresql/*/bin and PATH); install postgresql-client-{server_major}"
            ),
        })
    }

    fn command(&self, tool: &str, config: &Config, database: &str) -> Command {
        let mut command = Command::new(self.bindir.join(tool));
        for var in ["PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "PGSERVICE", "PGOPTIONS"]
            .iter()
            .chain(upshift_postgres::TOOL_VARIABLES)
        {
            command.env_remove(var);
        }
        // The same TLS settings as upshift's own connections, through the environment.
        command.envs(config.tool_env());
        match config.get_hosts().first() {
            Some(Host::Tcp(host)) => {
                command.env("PGHOST", host);
            }
            Some(Host::Unix(path)) => {
                command.env("PGHOST", path);
            }
            None => {}
        }
        if let Some(port) = config.get_ports().first() {
            command.env("PGPORT", port.to_string());
        }
        if let Some(user) = config.get_user() {
            command.env("PGUSER", user);
        }
        if let Some(password) = config.get_password() {
            command.env("PGPASSWORD", String::from_utf8_lossy(password).into_owned());
        }
        command.env("PGDATABASE", database).env("PGAPPNAME", format!("upshift {tool}")).stdin(Stdio::null());
        command
    }

    /// `tool` run on its own, to read a dump or say its version: no server, no stdin.
    fn offline(&self, tool: &str) -> Command {
        let mut command = Command::new(self.bindir.join(tool));
        command.stdin(Stdio::null());
        command
    }

    fn version(&self) -> String {
        self.offline("pg_dump")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    }
}

/// Starts a tool with its stderr captured.
fn spawn(mut command: Command, tool: &str) -> Result<std::process::Child, Error> {
    command
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Tool { program: tool.to_owned(), message: format!("could not be started: {e}") })
}

/// Waits for a started tool, failing with its stderr unless it exited 0.
fn finish(child: std::process::Child, tool: &str) -> Result<Output, Error> {
    let output = child
        .wait_with_output()
        .map_err(|e| Error::Tool { program: tool.to_owned(), message: format!("could not be waited for: {e}") })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(Error::Tool {
            program: tool.to_owned(),
            message: format!("failed ({}):\n{}", output.status, tail.join("\n")),
        });
    }
    Ok(output)
}

/// Runs a tool to completion, failing with its stderr unless it exited 0.
fn run(command: Command, tool: &str) -> Result<Output, Error> {
    finish(spawn(command, tool)?, tool)
}

fn jobs(codec: &Codec) -> usize {
    codec.threads.max(1) as usize
}

/// Rows per table, as the given transaction sees them.
fn row_counts(client: &mut impl postgres::GenericClient) -> Result<BTreeMap<String, i64>, Error> {
    let tables = client
        .query(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%' ORDER BY 1, 2",
            &[],
        )
        .map_err(pg_error("list tables"))?;
    let mut counts = BTreeMap::new();
    for row in tables {
        let (schema, table): (String, String) = (row.get(0), row.get(1));
        let count: i64 = client
            .query_one(&format!("SELECT count(*) FROM {}.{}", quote(&schema), quote(&table)), &[])
            .map_err(pg_error(format!("count rows of {schema}.{table}")))?
            .get(0);
        counts.insert(format!("{schema}.{table}"), count);
    }
    Ok(counts)
}

/// Dumps the database into the backup folder `dir`.
pub(crate) fn dump(config: &Config, dir: &Path, codec: &Codec) -> Result<(Vec<FileEntry>, DatabaseInfo), Error> {
    let database = database_name(config);
    let mut client = connect(config, None)?;
    let major = server_major(&mut client)?;
    let server_version: String =
        client.query_one("SHOW server_version", &[]).map_err(pg_error("read the server version"))?.get(0);
    let tools = Tools::find(major)?;

    // One snapshot for the row counts and the dump, so deep verify compares like with like.
    // Its transaction then waits, idle, for the whole dump: no server timeout may end it.
    client
        .batch_execute("SET idle_in_transaction_session_timeout = 0")
        .map_err(pg_error("set up the snapshot session"))?;
    let mut snapshot_tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(pg_error("open a snapshot"))?;
    let snapshot: String =
        snapshot_tx.query_one("SELECT pg_export_snapshot()", &[]).map_err(pg_error("export a snapshot"))?.get(0);

    // pg_dump writes into `.raw` while the follower compresses each file as it grows and
    // removes it once pg_dump has closed it: compression overlaps the dump, and the
    // uncompressed dump never piles up on disk.
    let raw = dir.join(".raw");
    artifact::private_dir(&raw)?;
    let watch = follow::Watch::new(&raw).map_err(Error::io("watch", &raw))?;
    let mut pg_dump = tools.command("pg_dump", config, &database);
    pg_dump
        // No fsync by pg_dump: its files are removed once compressed, and upshift fsyncs
        // what it writes.
        .args(["--format=directory", "--compress=0", "--no-sync", "--no-password"])
        .arg(format!("--jobs={}", jobs(codec)))
        .arg(format!("--snapshot={snapshot}"))
        .arg("--file")
        .arg(&raw)
        .stdout(Stdio::null());
    codec.phase("dumping with pg_dump and compressing", None);
    let dumping = spawn(pg_dump, "pg_dump")?;
    let pid = rustix::process::Pid::from_child(&dumping);
    let exited = std::sync::atomic::AtomicBool::new(false);
    let (dumped, counted, followed) = std::thread::scope(|scope| {
        let follower = scope.spawn(|| {
            let compressed = follow::compress(&raw, dir, DB_DIR, codec, &watch, &exited);
            // A dump nobody compresses any more would only fill the disk: stop pg_dump (it
            // stops its workers on SIGTERM). Not once it has been waited for: its pid may
            // then be another process's.
            if compressed.is_err() && !exited.load(std::sync::atomic::Ordering::Acquire) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            compressed
        });
        // While pg_dump reads the snapshot, count its rows in the same snapshot. If counting
        // fails, pg_dump is still waited for (and its folder removed with the partial backup).
        let counted = row_counts(&mut snapshot_tx).and_then(|counts| {
            let extensions = snapshot_tx
                .query("SELECT extname, extversion FROM pg_extension ORDER BY 1", &[])
                .map_err(pg_error("list extensions"))?
                .iter()
                .map(|row| Extension { name: row.get(0), version: row.get(1) })
                .collect::<Vec<_>>();
            Ok((counts, extensions))
        });
        let dumped = finish(dumping, "pg_dump");
        exited.store(true, std::sync::atomic::Ordering::Release);
        let compressed = follower.join().unwrap_or_else(|_| {
            Err(Error::Tool { program: "upshift".into(), message: "the compressing thread panicked".into() })
        });
        (dumped, counted, compressed)
    });
    // The follower's failure first: it is the cause when pg_dump was stopped for it.
    let mut files = followed?;
    let (row_counts, extensions) = counted?;
    dumped?;
    snapshot_tx.commit().map_err(pg_error("close the snapshot"))?;
    fs::remove_dir(&raw).map_err(Error::io("remove", &raw))?;

    // Roles, when the user may read them (no password hashes: they are secrets).
    let mut dumpall = tools.command("pg_dumpall", config, &database);
    dumpall.args(["--globals-only", "--no-role-passwords", "--no-password"]).stdout(Stdio::piped());
    let roles_saved = match run(dumpall, "pg_dumpall") {
        Ok(output) => {
            files.push(artifact::write_compressed(&mut &output.stdout[..], dir, ROLES, codec)?);
            true
        }
        Err(_) => false,
    };

    let info = DatabaseInfo {
        engine: EngineKind::Postgres,
        name: database,
        server_version,
        server_major: Some(major),
        pg_dump_version: Some(tools.version()),
        extensions,
        roles_saved,
        row_counts,
    };
    Ok((files, info))
}

/// Table data files of at least this many bytes (before compression) are not unpacked for a
/// restore: they are streamed from the backup into the database by several sessions at once.
/// Below it, a table loads in a fraction of a second and a session more saves little.
pub(crate) const STREAM_OVER: u64 = 32 << 20;

/// The dump in `pg_dump`'s directory format in a temp folder: `toc.dat` and the data files,
/// less the ones left in the backup to be streamed.
pub(crate) struct Unpacked<'a> {
    folder: tempfile::TempDir,
    backup_dir: PathBuf,
    identities: Option<&'a Identities>,
    /// Data files left in the backup: their name in the dump, and their entry.
    streamed: Vec<(String, FileEntry)>,
}

/// Decompresses the dump's files into a temp folder inside `near` (the backup store), except
/// numbered data files of `stream_over` bytes or more (before compression), when given.
pub(crate) fn unpack<'a>(
    backup_dir: &Path,
    files: impl Iterator<Item = &'a FileEntry>,
    near: &Path,
    identities: Option<&'a Identities>,
    stream_over: Option<u64>,
) -> Result<Unpacked<'a>, String> {
    let folder = tempfile::Builder::new()
        .prefix(".unpacked-")
        .tempdir_in(near)
        .map_err(|e| format!("could not make a temp folder in {}: {e}", near.display()))?;
    let mut unpacked = Unpacked { folder, backup_dir: backup_dir.to_owned(), identities, streamed: Vec::new() };
    for entry in files {
        // db/<name>.zst or db/<name>.zst.age -> <name>, as pg_restore expects.
        let name = entry.path.strip_prefix(&format!("{DB_DIR}/")).unwrap_or(&entry.path);
        let name = name.strip_suffix(".age").unwrap_or(name);
        let name = name.strip_suffix(".zst").unwrap_or(name);
        let numbered = name.strip_suffix(".dat").is_some_and(|id| id.bytes().all(|b| b.is_ascii_digit()));
        // Backups from before sizes were recorded: zstd makes table data about 4 times smaller.
        let raw_size = entry.raw_size.unwrap_or(entry.size.saturating_mul(4));
        if numbered && stream_over.is_some_and(|over| raw_size >= over) {
            unpacked.streamed.push((name.to_owned(), entry.clone()));
        } else {
            unpacked.decompress(entry, name)?;
        }
    }
    Ok(unpacked)
}

impl Unpacked<'_> {
    /// Decodes an entry into the folder as `name`. A temp file: not fsynced.
    fn decompress(&self, entry: &FileEntry, name: &str) -> Result<(), String> {
        let dest = self.folder.path().join(name);
        artifact::decompress_to_file(&self.backup_dir, entry, self.identities, &dest, artifact::Fsync::Scratch)
    }

    fn corrupt(&self, message: String) -> Error {
        let id = self.backup_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Error::Corrupt { id, message }
    }
}

/// Reads the whole dump with `pg_restore -f /dev/null`, which fails on a truncated or
/// damaged archive (unlike `pg_restore --list`, which only reads the table of contents).
pub(crate) fn read_whole(unpacked: &Unpacked<'_>, dump_major: u32) -> Result<(), Error> {
    let tools = Tools::find(dump_major)?;
    let mut command = tools.offline("pg_restore");
    command.args(["--file=/dev/null"]).arg(unpacked.folder.path()).stdout(Stdio::null());
    run(command, "pg_restore").map(drop)
}

/// Whether the database holds any relation or function outside the system schemas.
fn has_objects(client: &mut Client) -> Result<bool, Error> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
                       AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%') \
                  + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
                     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema'))",
            &[],
        )
        .map_err(pg_error("look into the target database"))?;
    Ok(row.get::<_, i64>(0) > 0)
}

fn database_exists(maintenance: &mut Client, name: &str) -> Result<bool, Error> {
    Ok(maintenance
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .map_err(pg_error("look for the database"))?
        .is_some())
}

/// A database name derived from `base`, within PostgreSQL's 63-byte limit.
fn derived_name(base: &str, suffix: &str) -> String {
    let mut cut = base.len().min(63 - suffix.len());
    while !base.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", &base[..cut])
}

/// Restores into a new database called `name`, dropping it again if the restore fails.
fn restore_into(
    maintenance: &mut Client,
    config: &Config,
    unpacked: &Unpacked<'_>,
    name: &str,
    tools: &Tools,
    jobs: usize,
) -> Result<(), Error> {
    // Two statements, two queries: CREATE DATABASE cannot run in the implicit transaction
    // of a multi-statement query.
    maintenance
        .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote(name)))
        .map_err(pg_error(format!("drop the leftover scratch database {name}")))?;
    maintenance
        .batch_execute(&format!("CREATE DATABASE {} TEMPLATE template0", quote(name)))
        .map_err(pg_error(format!("create the scratch database {name}")))?;
    let result = if unpacked.streamed.is_empty() {
        run(pg_restore(tools, config, unpacked, name, jobs, &[]), "pg_restore").map(drop)
    } else {
        restore_in_sections(config, unpacked, name, tools, jobs)
    };
    if result.is_err() {
        let _ = maintenance.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote(name)));
    }
    result
}

/// `pg_restore --exit-on-error --jobs=N` of the unpacked dump into database `name`.
fn pg_restore(
    tools: &Tools,
    config: &Config,
    unpacked: &Unpacked<'_>,
    name: &str,
    jobs: usize,
    args: &[&str],
) -> Command {
    let mut pg_restore = tools.command("pg_restore", config, name);
    // Safe for a database nobody uses yet: it is swapped in by a rename whose commit is
    // synchronous, and WAL is flushed in order, so everything restored before it is on disk
    // by then; a crash before the swap leaves only the scratch database. Bigger sorts
    // memory speeds up the index builds.
    pg_restore.env("PGOPTIONS", "-c synchronous_commit=off -c maintenance_work_mem=256MB");
    pg_restore
        .args(["--exit-on-error", "--no-password"])
        .arg(format!("--jobs={jobs}"))
        .arg(format!("--dbname={name}"))
        .args(args)
        .arg(unpacked.folder.path())
        .stdout(Stdio::null());
    pg_restore
}

/// The restore in `pg_dump`'s three sections: the schema; then the data, the big tables
/// streamed from the backup by `jobs` sessions each while `pg_restore` loads the others; then
/// indexes and constraints. What `pg_restore` alone cannot do is load one table through
/// several sessions, and one big table is most of a restore's time.
fn restore_in_sections(
    config: &Config,
    unpacked: &Unpacked<'_>,
    name: &str,
    tools: &Tools,
    jobs: usize,
) -> Result<(), Error> {
    let folder = unpacked.folder.path();
    let mut list = tools.offline("pg_restore");
    list.arg("--list").arg(folder).stdout(Stdio::piped());
    let list = String::from_utf8_lossy(&run(list, "pg_restore")?.stdout).into_owned();
    // Each streamed file is a table's data with a COPY statement, or it is unpacked after all.
    let mut streamed = Vec::new();
    let mut skipped = HashSet::new();
    for (file, entry) in &unpacked.streamed {
        let id = file.strip_suffix(".dat").unwrap_or(file);
        let line = list.lines().find(|l| l.split(';').next() == Some(id) && l.contains(" TABLE DATA "));
        match line.map(|line| copy_statement(tools, folder, file, line)).transpose()?.flatten() {
            Some(statement) => {
                streamed.push((entry, statement));
                skipped.insert(id);
            }
            None => unpacked.decompress(entry, file).map_err(|m| unpacked.corrupt(m))?,
        }
    }
    // Every section runs from one list, without the streamed tables and without the
    // privileges: `pg_restore` grants and revokes last, after the data (an owner may have
    // revoked its own INSERT), and a section run would grant with its section.
    let (mut sections, mut privileges) = (String::new(), String::new());
    for line in list.lines() {
        if skipped.contains(line.split(';').next().unwrap_or("")) {
            sections.push(';');
        } else if is_privilege(line) {
            sections.push(';');
            privileges.push_str(line);
            privileges.push('\n');
        }
        sections.push_str(line);
        sections.push('\n');
    }
    let use_list = |file: &str, text: &str| -> Result<String, Error> {
        let path = folder.join(file);
        fs::write(&path, text).map_err(Error::io("write", &path))?;
        Ok(format!("--use-list={}", path.display()))
    };
    let sections = use_list("upshift-sections.list", &sections)?;

    run(pg_restore(tools, config, unpacked, name, jobs, &["--section=pre-data", &sections]), "pg_restore")?;
    let others = spawn(pg_restore(tools, config, unpacked, name, jobs, &["--section=data", &sections]), "pg_restore")?;
    let loaded = streamed.iter().try_for_each(|(entry, statement)| {
        let source = artifact::open_decoded(&unpacked.backup_dir, entry, unpacked.identities)
            .map_err(|m| unpacked.corrupt(m))?;
        copy_in(config, name, statement, source, jobs.min(LOADING_SESSIONS)).map_err(|e| match e {
            Loading::Source(e) => unpacked.corrupt(format!("{} does not decode: {e}", entry.path)),
            Loading::Database(e) => e,
        })
    });
    let others = finish(others, "pg_restore");
    loaded?;
    others?;
    run(pg_restore(tools, config, unpacked, name, jobs, &["--section=post-data", &sections]), "pg_restore")?;
    if !privileges.is_empty() {
        let privileges = use_list("upshift-privileges.list", &privileges)?;
        run(pg_restore(tools, config, unpacked, name, 1, &[&privileges]), "pg_restore")?;
    }
    Ok(())
}

/// Whether a line of `pg_restore --list` (`ID; catalog-oid oid DESC schema name owner`) is
/// a privilege entry (`ACL`, `ACL LANGUAGE`, `DEFAULT ACL`). The kind comes before any name,
/// so a table called ACL is not one.
fn is_privilege(line: &str) -> bool {
    let Some((_, rest)) = line.split_once("; ") else { return false };
    let kind = rest.splitn(3, ' ').nth(2).unwrap_or("");
    kind.starts_with("ACL ") || kind.starts_with("DEFAULT ACL ")
}

/// The `COPY ... FROM stdin;` that `pg_restore` would send for TOC entry `line`, read from a
/// script of that entry alone made against an empty data file; none if the dump's encoding
/// is not UTF-8.
fn copy_statement(tools: &Tools, folder: &Path, file: &str, line: &str) -> Result<Option<String>, Error> {
    let empty = folder.join(file);
    File::create(&empty).map_err(Error::io("create", &empty))?;
    let one = folder.join("upshift-one.list");
    fs::write(&one, format!("{line}\n")).map_err(Error::io("write", &one))?;
    let mut script = tools.offline("pg_restore");
    script.args(["--file=-"]).arg(format!("--use-list={}", one.display())).arg(folder).stdout(Stdio::piped());
    let output = run(script, "pg_restore")?;
    fs::remove_file(&empty).map_err(Error::io("remove", &empty))?;
    let script = String::from_utf8_lossy(&output.stdout);
    // The loading sessions speak UTF-8 (the driver's client encoding), so the rows must be
    // UTF-8 already; a dump in another encoding is left to `pg_restore`.
    if !script.lines().any(|l| l == "SET client_encoding = 'UTF8';") {
        return Ok(None);
    }
    Ok(script.lines().find(|l| l.starts_with("COPY ") && l.ends_with(" FROM stdin;")).map(str::to_owned))
}

/// Why streaming a table's data failed.
enum Loading {
    Source(std::io::Error),
    Database(Error),
}

/// What `pg_dump` writes after a table's rows: the end-of-data line and two blank lines.
const END_OF_DATA: &[u8] = b"\\.\n\n\n";
/// How `pg_restore` sets up its sessions (no timeouts, no row security, an empty search
/// path), and no waiting for commits, as for its own sessions here.
const LOADING_SESSION: &str = "SET synchronous_commit = off; SET statement_timeout = 0; SET lock_timeout = 0; \
     SET idle_in_transaction_session_timeout = 0; SET standard_conforming_strings = on; \
     SELECT pg_catalog.set_config('search_path', '', false); SET check_function_bodies = false; \
     SET xmloption = content; SET client_min_messages = warning; SET row_security = off";
/// The most sessions loading one table: beyond a few, they mostly wait on each other for
/// the table's extension lock, and each is one more connection beside `pg_restore`'s.
const LOADING_SESSIONS: usize = 4;
/// Bytes of rows handed to a session at a time.
const CHUNK: usize = 1 << 20;

/// Loads one table's COPY data (`pg_dump`'s text format: one row per line, newlines inside
/// values escaped) from `source` through `sessions` connections at once, each running
/// `statement` and fed whole lines. `pg_dump`'s end-of-data line is dropped.
fn copy_in(
    config: &Config,
    database: &str,
    statement: &str,
    mut source: Box<dyn Read>,
    sessions: usize,
) -> Result<(), Loading> {
    let (send, receive) = std::sync::mpsc::sync_channel::<Vec<u8>>(2 * sessions);
    // Shared by the sessions alone: once every one has ended, failed or not, the sender
    // finds nobody listening and the reading stops.
    let receive = std::sync::Arc::new(std::sync::Mutex::new(receive));
    std::thread::scope(|scope| {
        let loaders: Vec<_> = (0..sessions.max(1))
            .map(|_| {
                let receive = std::sync::Arc::clone(&receive);
                scope.spawn(move || -> Result<(), Error> {
                    let mut config = config.clone();
                    config.application_name("upshift load");
                    let mut client = connect(&config, Some(database))?;
                    client.batch_execute(LOADING_SESSION).map_err(pg_error("set up a loading session"))?;
                    // PostgreSQL 17's limit on a transaction's length (a session loads its share
                    // of a table in one), which `pg_restore` 17 lifts too.
                    if server_major(&mut client)? >= 17 {
                        client
                            .batch_execute("SET transaction_timeout = 0")
                            .map_err(pg_error("set up a loading session"))?;
                    }
                    let mut writer = client.copy_in(statement).map_err(pg_error(format!("start {statement}")))?;
                    loop {
                        let chunk = receive.lock().unwrap_or_else(std::sync::PoisonError::into_inner).recv();
                        let Ok(chunk) = chunk else { break };
                        writer.write_all(&chunk).map_err(|e| Error::database(format!("load rows ({statement})"), e))?;
                    }
                    writer.finish().map_err(pg_error(format!("load rows ({statement})")))?;
                    Ok(())
                })
            })
            .collect();
        drop(receive);
        let read = split_lines(&mut source, |chunk| send.send(chunk).is_ok());
        drop(send);
        let loaded = loaders
            .into_iter()
            .map(|loader| {
                loader.join().unwrap_or_else(|_| {
                    Err(Error::Tool { program: "upshift".into(), message: "a loading session panicked".into() })
                })
            })
            .collect::<Result<Vec<()>, Error>>();
        loaded.map_err(Loading::Database)?;
        read.map_err(Loading::Source)
    })
}

/// Reads `source` to its end in chunks of whole lines, holding the last one back to drop
/// `pg_dump`'s end-of-data marker, and hands each to `deliver` until it returns false.
fn split_lines(source: &mut dyn Read, mut deliver: impl FnMut(Vec<u8>) -> bool) -> std::io::Result<()> {
    let mut pending: Vec<u8> = Vec::new();
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let mut chunk = std::mem::take(&mut carry);
        chunk.reserve(CHUNK);
        let filled = (&mut *source).take(CHUNK as u64).read_to_end(&mut chunk)?;
        if filled == 0 {
            pending.extend_from_slice(&chunk);
            if pending.ends_with(END_OF_DATA)
                && (pending.len() == END_OF_DATA.len() || pending[pending.len() - END_OF_DATA.len() - 1] == b'\n')
            {
                pending.truncate(pending.len() - END_OF_DATA.len());
            }
            if !pending.is_empty() {
                deliver(pending);
            }
            return Ok(());
        }
        match chunk.iter().rposition(|&b| b == b'\n') {
            Some(end) => {
                carry = chunk.split_off(end + 1);
                // A short tail joins the held chunk, which then holds the marker whole.
                if chunk.len() <= END_OF_DATA.len() {
                    pending.extend_from_slice(&chunk);
                    continue;
                }
                let previous = std::mem::replace(&mut pending, chunk);
                if !previous.is_empty() && !deliver(previous) {
                    return Ok(());
                }
            }
            None => carry = chunk,
        }
    }
}

/// A restore target that passed its checks.
pub(crate) struct Target<'a> {
    config: &'a Config,
    name: String,
    exists: bool,
    tools: Tools,
}

/// Checks a restore target before anything is unpacked or touched: its server is not older
/// than the dump's, and it is empty unless `force`.
pub(crate) fn check_target<'a>(config: &'a Config, info: &DatabaseInfo, force: bool) -> Result<Target<'a>, Error> {
    let name = database_name(config);
    let mut maintenance = maintenance(config)?;
    let major = server_major(&mut maintenance)?;
    let dump_major = info.server_major.unwrap_or(major);
    if major < dump_major {
        return Err(Error::OlderServer { dump_major, server_major: major });
    }
    let exists = database_exists(&mut maintenance, &name)?;
    if exists && !force && has_objects(&mut connect(config, None)?)? {
        return Err(Error::NotEmpty { target: name });
    }
    Ok(Target { config, name, exists, tools: Tools::find(major)? })
}

/// A session on another database than the target (which is renamed and dropped under
/// it): `postgres`, or `template1` when the target is `postgres` itself.
fn maintenance(config: &Config) -> Result<Client, Error> {
    let [first, second] =
        if database_name(config) == "postgres" { ["template1", "postgres"] } else { ["postgres", "template1"] };
    connect(config, Some(first)).or_else(|_| connect(config, Some(second)))
}

/// Restores the unpacked dump over the target database: into a scratch database first, then
/// swapped in by two renames. Until the first rename the target is untouched.
pub(crate) fn restore(unpacked: &Unpacked<'_>, target: &Target<'_>, codec: &Codec) -> Result<(), Error> {
    let name = &target.name;
    let mut maintenance = maintenance(target.config)?;
    let scratch = derived_name(name, "__upshift_restore");
    restore_into(&mut maintenance, target.config, unpacked, &scratch, &target.tools, jobs(codec))?;

    let swap = |maintenance: &mut Client| -> Result<(), postgres::Error> {
        if target.exists {
            let old = derived_name(name, "__upshift_old");
            maintenance.batch_execute(&format!("DROP DATABASE IF EXISTS {}", quote(&old)))?;
            maintenance.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[name],
            )?;
            maintenance.batch_execute(&format!("ALTER DATABASE {} RENAME TO {}", quote(name), quote(&old)))?;
            maintenance.batch_execute(&format!("ALTER DATABASE {} RENAME TO {}", quote(&scratch), quote(name)))?;
            maintenance.batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", quote(&old)))
        } else {
            maintenance.batch_execute(&format!("ALTER DATABASE {} RENAME TO {}", quote(&scratch), quote(name)))
        }
    };
    swap(&mut maintenance).map_err(|e| {
        let _ = maintenance.batch_execute(&format!("DROP DATABASE IF EXISTS {}", quote(&scratch)));
        pg_error(format!("swap the restored database in for {name}"))(e)
    })
}

/// Restores into a scratch database on the server of `config`, compares row counts with
/// the ones recorded at backup time, and drops it. Returns the differences.
pub(crate) fn deep_verify(
    unpacked: &Unpacked<'_>,
    info: &DatabaseInfo,
    config: &Config,
    id: &str,
    codec: &Codec,
) -> Result<Vec<String>, Error> {
    let mut maintenance = maintenance(config)?;
    let major = server_major(&mut maintenance)?;
    let dump_major = info.server_major.unwrap_or(major);
    if major < dump_major {
        return Err(Error::OlderServer { dump_major, server_major: major });
    }
    let tools = Tools::find(major)?;
    let scratch = derived_name(&format!("upshift_verify_{}", id.replace('-', "_")), "");
    restore_into(&mut maintenance, config, unpacked, &scratch, &tools, jobs(codec))?;
    let counted = connect(config, Some(&scratch)).and_then(|mut client| row_counts(&mut client));
    let _ = maintenance.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote(&scratch)));
    Ok(crate::compare_counts(&info.row_counts, &counted?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(input: &[u8]) -> Vec<Vec<u8>> {
        let mut chunks = Vec::new();
        split_lines(&mut &input[..], |chunk| {
            chunks.push(chunk);
            true
        })
        .unwrap();
        chunks
    }

    #[test]
    fn rows_are_split_at_line_ends_and_the_end_of_data_line_is_dropped() {
        let mut rows = Vec::new();
        let mut i = 0u64;
        while rows.len() < 3 * CHUNK {
            rows.extend(format!("{i}\t{}\tsome\\nescaped text\n", i * 7919).as_bytes());
            i += 1;
        }
        // A one-column table's empty string is an empty line: it is a row, and it stays.
        rows.extend(b"\n");
        let mut dump = rows.clone();
        dump.extend(END_OF_DATA);
        let chunks = split(&dump);
        assert!(chunks.len() >= 3, "{} chunks", chunks.len());
        assert!(chunks.iter().all(|c| c.ends_with(b"\n")));
        assert!(chunks.concat() == rows);
    }

    #[test]
    fn privilege_entries_are_known_by_their_kind() {
        assert!(is_privilege("4420; 0 0 ACL public TABLE accounts alice"));
        assert!(is_privilege("4421; 0 0 ACL LANGUAGE - LANGUAGE plpgsql postgres"));
        assert!(is_privilege("4422; 826 16384 DEFAULT ACL public DEFAULT PRIVILEGES FOR TABLES alice"));
        assert!(!is_privilege("216; 1259 16390 TABLE public ACL alice"));
        assert!(!is_privilege("3360; 0 16403 TABLE DATA public events postgres"));
        assert!(!is_privilege(";     Format: DIRECTORY"));
    }

    #[test]
    fn an_end_of_data_line_cut_by_a_chunk_boundary_is_dropped() {
        let mut rows = vec![b'x'; CHUNK - 3];
        rows[CHUNK - 4] = b'\n';
        rows.push(b'\n');
        rows.truncate(CHUNK - 3);
        let mut dump = rows.clone();
        dump.extend(END_OF_DATA);
        assert_eq!(&dump[CHUNK - 3..CHUNK], b"\\.\n");
        assert!(split(&dump).concat() == rows);
        // Without the marker (no table rows at all, or another writer) nothing is dropped.
        assert_eq!(split(b"a\n\\.x\n").concat(), b"a\n\\.x\n");
        assert!(split(END_OF_DATA).is_empty());
    }
}
