//! The backup folder: one folder per backup, named by its id.
//!
//! A backup is written into `<id>.partial` and renamed to `<id>` only when every file and
//! `manifest.json` are written and fsynced, so `list` never shows half a backup. Creating
//! and pruning hold an exclusive lock on `<dir>/.lock`, so prune never removes the
//! `.partial` folder of a backup still being written; whatever `.partial` folder it finds
//! is a leftover of a crash and goes.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::artifact::{self, private_dir};
use crate::error::Error;
use crate::manifest::BackupManifest;

const PARTIAL: &str = ".partial";
const MANIFEST: &str = "manifest.json";

/// A backup folder.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

/// A backup being written. Dropped without [`Partial::commit`], its folder is removed.
pub(crate) struct Partial {
    pub(crate) id: String,
    pub(crate) created_at: SystemTime,
    dir: PathBuf,
    final_dir: PathBuf,
    committed: bool,
    _lock: File,
}

/// Which backups to keep.
#[derive(Clone, Copy, Debug, Default)]
pub struct Retention {
    /// Keep the newest N.
    pub keep_last: Option<usize>,
    /// Keep every backup younger than this.
    pub keep_within: Option<Duration>,
}

/// What a prune did.
#[derive(Debug, Default)]
pub struct Pruned {
    /// Backups removed, oldest first.
    pub removed: Vec<String>,
    /// Backups kept, oldest first.
    pub kept: Vec<String>,
    /// Leftover `.partial` folders of interrupted backups that were removed.
    pub leftovers: Vec<String>,
}

fn fsync_dir(path: &Path) -> Result<(), Error> {
    File::open(path).and_then(|d| d.sync_all()).map_err(Error::io("fsync", path))
}

impl Store {
    /// The store in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Store {
        Store { dir: dir.into() }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The folder of backup `id`.
    pub fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn lock(&self) -> Result<File, Error> {
        private_dir(&self.dir)?;
        let path = self.dir.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(Error::io("open", &path))?;
        file.lock().map_err(Error::io("lock", &path))?;
        Ok(file)
    }

    /// Starts a backup: a new id and its `.partial` folder, under the store's lock.
    pub(crate) fn begin(&self) -> Result<Partial, Error> {
        let lock = self.lock()?;
        let created_at = SystemTime::now();
        let stamp = humantime::format_rfc3339_nanos(created_at).to_string();
        let digits: String = stamp.chars().filter(char::is_ascii_digit).collect();
        let salt = Sha256::digest(format!("{stamp} {}", std::process::id()).as_bytes());
        let id = format!("{}-{:02x}{:02x}{:02x}{:02x}", &digits[..14], salt[0], salt[1], salt[2], salt[3]);
        let dir = self.dir.join(format!("{id}{PARTIAL}"));
        private_dir(&dir)?;
        Ok(Partial { final_dir: self.dir.join(&id), id, created_at, dir, committed: false, _lock: lock })
    }

    /// Every complete backup, oldest first.
    pub fn list(&self) -> Result<Vec<BackupManifest>, Error> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("read", &self.dir)(e)),
        };
        let mut backups = Vec::new();
        for entry in entries {
            let entry = entry.map_err(Error::io("read", &self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.ends_with(PARTIAL) || !entry.path().join(MANIFEST).is_file() {
                continue;
            }
            backups.push(self.read_manifest(&name)?);
        }
        backups.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        Ok(backups)
    }

    fn read_manifest(&self, id: &str) -> Result<BackupManifest, Error> {
        let path = self.path(id).join(MANIFEST);
        let text = fs::read_to_string(&path).map_err(Error::io("read", &path))?;
        serde_json::from_str(&text).map_err(|e| Error::Corrupt {
            id: id.to_owned(),
            message: format!("{} cannot be read: {e}", path.display()),
        })
    }

    /// The manifest of backup `id`; `latest` names the newest.
    pub fn load(&self, id: &str) -> Result<BackupManifest, Error> {
        let not_found = || Error::NotFound { id: id.to_owned(), dir: self.dir.clone() };
        if id == "latest" {
            return self.list()?.pop().ok_or_else(not_found);
        }
        if id.contains('/') || id.starts_with('.') || !self.path(id).join(MANIFEST).is_file() {
            return Err(not_found());
        }
        self.read_manifest(id)
    }

    /// Checks the size and sha256 of every file of a backup.
    pub fn check(&self, manifest: &BackupManifest) -> Result<(), Error> {
        let dir = self.path(&manifest.id);
        for entry in &manifest.files {
            artifact::check(&dir, entry).map_err(|message| Error::Corrupt { id: manifest.id.clone(), message })?;
        }
        Ok(())
    }

    /// Removes what `retention` does not keep, never the newest backup whose checksums
    /// pass, and every leftover `.partial` folder.
    pub fn prune(&self, retention: Retention, now: SystemTime) -> Result<Pruned, Error> {
        let _lock = self.lock()?;
        let mut pruned = Pruned::default();
        for entry in fs::read_dir(&self.dir).map_err(Error::io("read", &self.dir))? {
            let entry = entry.map_err(Error::io("read", &self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(PARTIAL) {
                fs::remove_dir_all(entry.path()).map_err(Error::io("remove", &entry.path()))?;
                pruned.leftovers.push(name);
            }
        }
        let backups = self.list()?;
        let newest_good = backups.iter().rev().find(|b| self.check(b).is_ok()).map(|b| b.id.clone());
        let count = backups.len();
        for (index, backup) in backups.into_iter().enumerate() {
            let from_newest = count - 1 - index;
            let by_count = retention.keep_last.is_some_and(|n| from_newest < n);
            let by_age = retention.keep_within.is_some_and(|within| {
                humantime::parse_rfc3339(&backup.created_at)
                    .is_ok_and(|at| now.duration_since(at).unwrap_or_default() <= within)
            });
            let policy_set = retention.keep_last.is_some() || retention.keep_within.is_some();
            if !policy_set || by_count || by_age || newest_good.as_ref() == Some(&backup.id) {
                pruned.kept.push(backup.id);
            } else {
                let path = self.path(&backup.id);
                fs::remove_dir_all(&path).map_err(Error::io("remove", &path))?;
                pruned.removed.push(backup.id);
            }
        }
        if !pruned.removed.is_empty() || !pruned.leftovers.is_empty() {
            fsync_dir(&self.dir)?;
        }
        Ok(pruned)
    }
}

impl Partial {
    /// The folder files are written into.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `manifest.json`, fsyncs, and renames the folder to its id.
    pub(crate) fn commit(mut self, manifest: &BackupManifest) -> Result<(), Error> {
        let path = self.dir.join(MANIFEST);
        let mut file = artifact::private_file(&path)?;
        let text = serde_json::to_string_pretty(manifest).expect("a manifest serializes");
        file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(Error::io("write", &path))?;
        fsync_dir(&self.dir)?;
        fs::rename(&self.dir, &self.final_dir).map_err(Error::io("rename", &self.dir))?;
        fsync_dir(self.final_dir.parent().expect("a backup folder has a parent"))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: a crash leaves the folder instead, and prune removes it.
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
