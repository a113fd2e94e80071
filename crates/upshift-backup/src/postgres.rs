//! PostgreSQL: `pg_dump --format=directory --jobs=N --compress=0` from an exported snapshot,
//! every file then compressed with multi-threaded zstd; restored by `pg_restore
//! --exit-on-error --jobs=N` into a scratch database that is renamed over the target only
//! when the restore succeeded, so a failed or killed restore leaves the target as it was.
//!
//! Every child process's exit status is checked directly (no shell pipes). The password
//! reaches the tools through `PGPASSWORD` in their environment, never their arguments.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use postgres::config::Host;
use postgres::{Client, IsolationLevel};
use upshift_postgres::Config;

use crate::artifact::{self, Codec, FileEntry, Identities};
use crate::error::Error;
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

    fn version(&self) -> String {
        Command::new(self.bindir.join("pg_dump"))
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

fn jobs(codec: &Codec) -> String {
    codec.threads.max(1).to_string()
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
    let mut snapshot_tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(pg_error("open a snapshot"))?;
    let snapshot: String =
        snapshot_tx.query_one("SELECT pg_export_snapshot()", &[]).map_err(pg_error("export a snapshot"))?.get(0);

    let raw = dir.join(".raw");
    let mut pg_dump = tools.command("pg_dump", config, &database);
    pg_dump
        .args(["--format=directory", "--compress=0", "--no-password"])
        .arg(format!("--jobs={}", jobs(codec)))
        .arg(format!("--snapshot={snapshot}"))
        .arg("--file")
        .arg(&raw)
        .stdout(Stdio::null());
    codec.phase("dumping with pg_dump", None);
    let dumping = spawn(pg_dump, "pg_dump")?;
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
    let (row_counts, extensions) = counted?;
    dumped?;
    snapshot_tx.commit().map_err(pg_error("close the snapshot"))?;

    let mut names: Vec<String> = fs::read_dir(&raw)
        .map_err(Error::io("read", &raw))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let total = names.iter().filter_map(|n| fs::metadata(raw.join(n)).ok()).map(|m| m.len()).sum();
    codec.phase("compressing", Some(total));
    let mut files = Vec::with_capacity(names.len() + 1);
    for name in names {
        let path = raw.join(&name);
        let mut file = File::open(&path).map_err(Error::io("read", &path))?;
        files.push(artifact::write_compressed(&mut file, dir, &format!("{DB_DIR}/{name}.zst"), codec)?);
        fs::remove_file(&path).map_err(Error::io("remove", &path))?;
    }
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

/// The dump decompressed into a temp folder, in `pg_dump`'s directory format.
pub(crate) struct Unpacked {
    folder: tempfile::TempDir,
}

/// Decompresses the dump's files into a temp folder inside `near` (the backup store).
pub(crate) fn unpack<'a>(
    backup_dir: &Path,
    files: impl Iterator<Item = &'a FileEntry>,
    near: &Path,
    identities: Option<&Identities>,
) -> Result<Unpacked, String> {
    let folder = tempfile::Builder::new()
        .prefix(".unpacked-")
        .tempdir_in(near)
        .map_err(|e| format!("could not make a temp folder in {}: {e}", near.display()))?;
    for entry in files {
        // db/<name>.zst or db/<name>.zst.age -> <name>, as pg_restore expects.
        let name = entry.path.strip_prefix(&format!("{DB_DIR}/")).unwrap_or(&entry.path);
        let name = name.strip_suffix(".age").unwrap_or(name);
        let name = name.strip_suffix(".zst").unwrap_or(name);
        artifact::decompress_to_file(backup_dir, entry, identities, &folder.path().join(name))?;
    }
    Ok(Unpacked { folder })
}

/// Reads the whole dump with `pg_restore -f /dev/null`, which fails on a truncated or
/// damaged archive (unlike `pg_restore --list`, which only reads the table of contents).
pub(crate) fn read_whole(unpacked: &Unpacked, dump_major: u32) -> Result<(), Error> {
    let tools = Tools::find(dump_major)?;
    let mut command = Command::new(tools.bindir.join("pg_restore"));
    command.args(["--file=/dev/null"]).arg(unpacked.folder.path()).stdin(Stdio::null()).stdout(Stdio::null());
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
    unpacked: &Unpacked,
    name: &str,
    tools: &Tools,
    jobs: &str,
) -> Result<(), Error> {
    // Two statements, two queries: CREATE DATABASE cannot run in the implicit transaction
    // of a multi-statement query.
    maintenance
        .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote(name)))
        .map_err(pg_error(format!("drop the leftover scratch database {name}")))?;
    maintenance
        .batch_execute(&format!("CREATE DATABASE {} TEMPLATE template0", quote(name)))
        .map_err(pg_error(format!("create the scratch database {name}")))?;
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
        .arg(unpacked.folder.path())
        .stdout(Stdio::null());
    let result = run(pg_restore, "pg_restore");
    if result.is_err() {
        let _ = maintenance.batch_execute(&format!("DROP DATABASE IF EXISTS {}", quote(name)));
    }
    result.map(drop)
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
pub(crate) fn restore(unpacked: &Unpacked, target: &Target<'_>, codec: &Codec) -> Result<(), Error> {
    let name = &target.name;
    let mut maintenance = maintenance(target.config)?;
    let scratch = derived_name(name, "__upshift_restore");
    restore_into(&mut maintenance, target.config, unpacked, &scratch, &target.tools, &jobs(codec))?;

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
    unpacked: &Unpacked,
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
    restore_into(&mut maintenance, config, unpacked, &scratch, &tools, &jobs(codec))?;
    let counted = connect(config, Some(&scratch)).and_then(|mut client| row_counts(&mut client));
    let _ = maintenance.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote(&scratch)));
    Ok(crate::compare_counts(&info.row_counts, &counted?))
}
