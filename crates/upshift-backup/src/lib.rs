//! The backup engine of upshift: verified, restorable backups of a SQLite or PostgreSQL
//! database and of saved paths, in a store where a half-written backup is never listed.

pub mod artifact;
mod error;
mod follow;
pub mod manifest;
mod paths;
mod postgres;
mod sqlite;
mod store;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use upshift_migrate::DatabaseUrl;

pub use artifact::{Codec, Identities, Progress};
pub use error::Error;
pub use manifest::{BackupManifest, DatabaseInfo, EngineKind};
pub use store::{Pruned, Retention, Store};

/// What to back up.
pub struct CreateOptions<'a> {
    /// The database, if any.
    pub database: Option<&'a DatabaseUrl>,
    /// Files and folders to save, relative to `base`.
    pub paths: &'a [PathBuf],
    /// The folder paths are relative to (the manifest's folder).
    pub base: &'a Path,
    /// A note for `list`.
    pub label: Option<String>,
    /// `[app] name`.
    pub app: Option<String>,
    /// The deployed version.
    pub version: Option<String>,
    /// zstd settings and age recipients.
    pub codec: Codec,
    /// State that is not the database, each made by its own command.
    pub artifacts: &'a [ArtifactSource<'a>],
}

/// An artifact of a backup: state that is not the database (a Vault snapshot, a Redis
/// dump), written by `make` into the file it is given, then compressed, checksummed and
/// encrypted like the dump.
pub struct ArtifactSource<'a> {
    /// Its name: letters, digits, `-` and `_`.
    pub name: &'a str,
    /// Writes the artifact into the file at the path; says why not.
    pub make: &'a dyn Fn(&Path) -> Result<(), String>,
}

/// Where artifacts go in a backup, compressed.
fn artifact_path(name: &str) -> String {
    format!("artifacts/{name}.zst")
}

/// Takes a backup into `store`.
pub fn create(store: &Store, options: &CreateOptions<'_>) -> Result<BackupManifest, Error> {
    if options.database.is_none() && options.paths.is_empty() && options.artifacts.is_empty() {
        return Err(Error::Usage(
            "nothing to back up: give a database URL (--database-url, DATABASE_URL or the manifest) or --path".into(),
        ));
    }
    // Everything that can be refused is refused before the store is touched.
    let relative_paths: Vec<PathBuf> =
        options.paths.iter().map(|p| paths::relative_inside(options.base, p)).collect::<Result<_, _>>()?;
    if let Some(DatabaseUrl::Sqlite { path }) = options.database
        && !path.is_file()
    {
        return Err(Error::Usage(format!("the SQLite database {} does not exist", path.display())));
    }
    let started = Instant::now();
    let partial = store.begin()?;
    let mut files = Vec::new();
    let mut database = None;
    let mut applied_revisions = Vec::new();
    if let Some(url) = options.database {
        let mut applied: Vec<String> =
            upshift_migrate::connect(url, false)?.applied()?.into_iter().map(|r| r.id).collect();
        applied.sort_by(|a, b| upshift_migrate::source::compare_ids(a, b));
        applied_revisions = applied;
        let info = match url {
            DatabaseUrl::Sqlite { path } => {
                let (entry, info) = sqlite::dump(path, partial.dir(), &options.codec)?;
                files.push(entry);
                info
            }
            DatabaseUrl::Postgres { config, .. } => {
                let (entries, info) = postgres::dump(config, partial.dir(), &options.codec)?;
                files.extend(entries);
                info
            }
        };
        database = Some(info);
    }
    let mut saved_paths = Vec::new();
    if !options.paths.is_empty() {
        let (entry, names) = paths::archive(options.base, &relative_paths, partial.dir(), &options.codec)?;
        files.push(entry);
        saved_paths = names;
    }
    let mut artifacts = Vec::new();
    for source in options.artifacts {
        // Made beside the backup (a crash leaves it in the `.partial` folder, which goes),
        // then compressed into place.
        let raw = partial.dir().join(format!("artifacts/{}.raw", source.name));
        artifact::private_dir(raw.parent().expect("in a folder"))?;
        (source.make)(&raw)
            .map_err(|message| Error::Tool { program: format!("artifact {}:", source.name), message })?;
        let mut file = std::fs::File::open(&raw).map_err(Error::io("read", &raw))?;
        files.push(artifact::write_compressed(&mut file, partial.dir(), &artifact_path(source.name), &options.codec)?);
        std::fs::remove_file(&raw).map_err(Error::io("remove", &raw))?;
        artifacts.push(source.name.to_owned());
    }
    let manifest = BackupManifest {
        format: manifest::FORMAT,
        id: partial.id.clone(),
        created_at: humantime::format_rfc3339_millis(partial.created_at).to_string(),
        label: options.label.clone(),
        app: options.app.clone(),
        version: options.version.clone(),
        applied_revisions,
        database,
        paths: saved_paths,
        artifacts,
        files,
        encrypted_to: options.codec.recipients.iter().map(ToString::to_string).collect(),
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    partial.commit(&manifest)?;
    Ok(manifest)
}

/// What `verify` checked.
#[derive(Debug)]
pub struct Verified {
    /// The backup.
    pub id: String,
    /// Files whose checksums and decompression passed.
    pub files: usize,
    /// Tables whose row counts matched after a scratch restore (deep only).
    pub tables_compared: Option<usize>,
}

/// The differences between recorded and restored row counts, for people.
pub(crate) fn compare_counts(recorded: &BTreeMap<String, i64>, restored: &BTreeMap<String, i64>) -> Vec<String> {
    let mut differences = Vec::new();
    for (table, count) in recorded {
        match restored.get(table) {
            Some(found) if found == count => {}
            Some(found) => differences.push(format!("{table}: {count} rows recorded, {found} restored")),
            None => differences.push(format!("{table}: missing after the restore")),
        }
    }
    differences
        .extend(restored.keys().filter(|t| !recorded.contains_key(*t)).map(|t| format!("{t}: not in the backup")));
    differences
}

/// Checks a backup: every checksum, every artifact fully decompressed, the dump read whole
/// (`pg_restore -f /dev/null`) or the SQLite copy through `PRAGMA integrity_check`. With
/// `deep`, also restores into a scratch database (a temp file for SQLite; for PostgreSQL a
/// temporary database on the server of `scratch_server`, dropped afterwards) and compares
/// the row counts recorded at backup time.
pub fn verify(
    store: &Store,
    id: &str,
    deep: bool,
    scratch_server: Option<&DatabaseUrl>,
    identities: Option<&Identities>,
) -> Result<Verified, Error> {
    let manifest = store.load(id)?;
    let id = manifest.id.clone();
    let dir = store.path(&id);
    let corrupt = |message: String| Error::Corrupt { id: id.clone(), message };
    require_identity(&manifest, identities)?;
    store.check(&manifest)?;
    for entry in manifest.files.iter().filter(|f| !f.path.starts_with("db/")) {
        artifact::decompress(&dir, entry, identities, &mut io::sink()).map_err(corrupt)?;
    }
    let mut tables_compared = None;
    if let Some(info) = &manifest.database {
        let differences = match info.engine {
            EngineKind::Sqlite => {
                let entry =
                    manifest.database_files().next().ok_or_else(|| corrupt("the database file is missing".into()))?;
                let unpacked =
                    sqlite::unpack(&dir, entry, &store.dir().join("scratch"), identities).map_err(corrupt)?;
                if deep {
                    compare_counts(&info.row_counts, &sqlite::row_counts(&unpacked.connection)?)
                } else {
                    Vec::new()
                }
            }
            EngineKind::Postgres => {
                let unpacked = postgres::unpack(&dir, manifest.database_files(), store.dir(), identities, None)
                    .map_err(corrupt)?;
                postgres::read_whole(&unpacked, info.server_major.unwrap_or(0))
                    .map_err(|e| corrupt(format!("pg_restore cannot read the whole dump: {e}")))?;
                if deep {
                    let Some(DatabaseUrl::Postgres { config, .. }) = scratch_server else {
                        return Err(Error::Usage(
                            "verify --deep of a PostgreSQL backup restores it into a scratch database: \
                             give a PostgreSQL server with --database-url"
                                .into(),
                        ));
                    };
                    postgres::deep_verify(&unpacked, info, config, &id, &Codec::default())?
                } else {
                    Vec::new()
                }
            }
        };
        if !differences.is_empty() {
            return Err(corrupt(format!("row counts differ after a scratch restore: {}", differences.join("; "))));
        }
        if deep {
            tables_compared = Some(info.row_counts.len());
        }
    }
    Ok(Verified { id, files: manifest.files.len(), tables_compared })
}

/// Where and how to restore.
pub struct RestoreOptions<'a> {
    /// The database to restore into; must be of the backup's engine.
    pub target: Option<&'a DatabaseUrl>,
    /// Replace a target that holds data.
    pub force: bool,
    /// Where saved paths go back to (the manifest's folder); `None` leaves them.
    pub paths_into: Option<&'a Path>,
    /// The saved paths the restore may write (the manifest's `[backup] paths`); `None`:
    /// those the backup recorded. An archive entry outside them refuses the restore.
    pub saved_paths: Option<&'a [PathBuf]>,
    /// Identities for an encrypted backup.
    pub identities: Option<&'a Identities>,
}

/// Refuses to read an encrypted backup without an identity, before anything is read.
fn require_identity(manifest: &BackupManifest, identities: Option<&Identities>) -> Result<(), Error> {
    if identities.is_none() && manifest.files.iter().any(artifact::is_encrypted) {
        return Err(Error::Usage(format!(
            "backup {} is encrypted to {}: pass --identity FILE with the matching age identity",
            manifest.id,
            manifest.encrypted_to.join(", ")
        )));
    }
    Ok(())
}

/// What a restore did.
#[derive(Debug)]
pub struct Restored {
    /// The backup.
    pub id: String,
    /// The database restored into, printable (no password).
    pub database: Option<String>,
    /// Top-level saved paths put back.
    pub paths: Vec<String>,
}

/// Restores a backup whose checksums pass. The database restore is atomic: a failure
/// leaves the target as it was.
pub fn restore(store: &Store, id: &str, options: &RestoreOptions<'_>) -> Result<Restored, Error> {
    let manifest = store.load(id)?;
    let id = manifest.id.clone();
    let dir = store.path(&id);
    let corrupt = |message: String| Error::Corrupt { id: id.clone(), message };
    require_identity(&manifest, options.identities)?;
    store.check(&manifest)?;
    let mut restored = Restored { id: id.clone(), database: None, paths: Vec::new() };
    // The saved paths are checked and unpacked first, beside their destination, and moved
    // into place only after the database is restored: both, or neither.
    let recorded: Vec<PathBuf> = manifest.paths.iter().map(PathBuf::from).collect();
    let staged = match (manifest.paths_file(), options.paths_into) {
        (Some(entry), Some(into)) => {
            let saved = options.saved_paths.unwrap_or(&recorded);
            Some(paths::stage(&dir, entry, into, saved, &id, options.identities)?)
        }
        _ => None,
    };
    if let Some(info) = &manifest.database {
        let target = options.target.ok_or_else(|| {
            Error::Usage(
                "the backup holds a database: give the database to restore into with --target-url or --database-url"
                    .into(),
            )
        })?;
        match (info.engine, target) {
            (EngineKind::Sqlite, DatabaseUrl::Sqlite { path }) => {
                sqlite::check_target(path, options.force)?;
                let entry =
                    manifest.database_files().next().ok_or_else(|| corrupt("the database file is missing".into()))?;
                let unpacked = sqlite::unpack(&dir, entry, path, options.identities).map_err(corrupt)?;
                sqlite::restore(&unpacked, path)?;
            }
            (EngineKind::Postgres, DatabaseUrl::Postgres { config, .. }) => {
                let checked = postgres::check_target(config, info, options.force)?;
                let unpacked = postgres::unpack(
                    &dir,
                    manifest.database_files(),
                    store.dir(),
                    options.identities,
                    Some(postgres::STREAM_OVER),
                )
                .map_err(corrupt)?;
                postgres::restore(&unpacked, &checked, &Codec::default())?;
            }
            (engine, _) => {
                return Err(Error::Usage(format!(
                    "backup {id} holds a {} database and cannot be restored into {target}",
                    if engine == EngineKind::Sqlite { "SQLite" } else { "PostgreSQL" }
                )));
            }
        }
        restored.database = Some(target.to_string());
    }
    if let Some(staged) = staged {
        restored.paths = staged.commit()?;
    }
    Ok(restored)
}

/// Writes artifact `name` of backup `id`, checked and decompressed, into the file `to`
/// (which must not exist).
pub fn extract_artifact(
    store: &Store,
    id: &str,
    name: &str,
    to: &Path,
    identities: Option<&Identities>,
) -> Result<(), Error> {
    let manifest = store.load(id)?;
    let dir = store.path(&manifest.id);
    let corrupt = |message: String| Error::Corrupt { id: manifest.id.clone(), message };
    require_identity(&manifest, identities)?;
    let wanted = artifact_path(name);
    let entry = manifest
        .files
        .iter()
        .find(|f| f.path.strip_suffix(".age").unwrap_or(&f.path) == wanted)
        .ok_or_else(|| Error::Usage(format!("backup {} holds no artifact `{name}`", manifest.id)))?;
    artifact::check(&dir, entry).map_err(corrupt)?;
    artifact::decompress_to_file(&dir, entry, identities, to, artifact::Fsync::Durable).map_err(corrupt)
}

/// What a backup of `database` and `paths` (under `base`) may take on disk at most: the
/// database's size (the SQLite file; `pg_database_size` for PostgreSQL) and the saved files',
/// before compression. Used by preflight, which wants this much free.
pub fn estimate(database: Option<&DatabaseUrl>, base: &Path, paths: &[PathBuf]) -> Result<u64, Error> {
    let mut bytes = match database {
        None => 0,
        Some(DatabaseUrl::Sqlite { path }) => std::fs::metadata(path).map_or(0, |m| m.len()),
        Some(DatabaseUrl::Postgres { config, .. }) => {
            let mut client = config.connect().map_err(|e| Error::Database {
                source: e.to_string().into(),
                action: "connect to PostgreSQL".into(),
            })?;
            let size: i64 = client
                .query_one("SELECT pg_database_size(current_database())", &[])
                .map_err(|e| Error::Database { source: e.to_string().into(), action: "measure the database".into() })?
                .get(0);
            u64::try_from(size).unwrap_or(0)
        }
    };
    for path in paths {
        let mut stack = vec![base.join(path)];
        while let Some(next) = stack.pop() {
            let Ok(meta) = std::fs::symlink_metadata(&next) else { continue };
            if meta.is_dir() {
                stack.extend(std::fs::read_dir(&next).into_iter().flatten().flatten().map(|e| e.path()));
            } else {
                bytes += meta.len();
            }
        }
    }
    Ok(bytes)
}

/// The bytes free for an unprivileged user on the filesystem of `dir` (or of its nearest
/// existing parent).
pub fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let existing = dir.ancestors().find(|p| p.exists())?;
    let path = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string that outlives the call and `stats` is
    // writable memory of the right type; statvfs fills it when it returns 0, and only then
    // is it read. (std has no statvfs; running `df` instead would fork while other threads
    // hold descriptors, such as the run lock.)
    #[allow(unsafe_code)]
    let stats = unsafe {
        if libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) != 0 {
            return None;
        }
        stats.assume_init()
    };
    Some(stats.f_bavail.saturating_mul(stats.f_frsize))
}
