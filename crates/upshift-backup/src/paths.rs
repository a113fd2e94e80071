//! Saved paths (config files, data folders) as one zstd-compressed tar.
//!
//! On restore, every entry is checked before anything is written: it must be under one of
//! the saved paths the restore may write (the manifest's, not the archive's word), with no
//! absolute path or `..`, and every symlink, and every path written through symlinks, must
//! end inside its own saved path once the whole chain of links is followed. The archive is
//! unpacked into a staging folder on the target's filesystem ([`stage`]); the caller moves
//! it into place ([`Staged::commit`]) only after the database step succeeded.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use crate::artifact::{self, Codec, FileEntry, Identities};
use crate::error::Error;

/// The archive's name inside a backup.
pub(crate) const ARCHIVE: &str = "paths.tar.zst";

/// Checks a configured path: relative, no `..`, and present.
pub(crate) fn relative_inside(base: &Path, path: &Path) -> Result<PathBuf, Error> {
    let relative = if path.is_absolute() {
        path.strip_prefix(base).map(Path::to_path_buf).map_err(|_| {
            Error::Usage(format!(
                "the path {} to save is outside {}; save paths below it",
                path.display(),
                base.display()
            ))
        })?
    } else {
        path.to_path_buf()
    };
    if relative.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(Error::Usage(format!("the path {} to save leaves {}", path.display(), base.display())));
    }
    if !base.join(&relative).exists() {
        return Err(Error::Usage(format!("the path {} to save does not exist", base.join(&relative).display())));
    }
    Ok(relative)
}

/// A pipe end fed by a thread that writes the tar, so the tar streams into zstd.
fn tar_stream(base: PathBuf, paths: Vec<PathBuf>) -> (io::PipeReader, std::thread::JoinHandle<io::Result<()>>) {
    let (reader, writer) = io::pipe().expect("a pipe");
    let handle = std::thread::spawn(move || {
        let mut builder = tar::Builder::new(writer);
        builder.follow_symlinks(false);
        for path in &paths {
            let full = base.join(path);
            if full.is_dir() {
                builder.append_dir_all(path, &full)?;
            } else {
                builder.append_path_with_name(&full, path)?;
            }
        }
        builder.into_inner()?.flush()
    });
    (reader, handle)
}

pub(crate) fn archive(
    base: &Path,
    paths: &[PathBuf],
    dir: &Path,
    codec: &Codec,
) -> Result<(FileEntry, Vec<String>), Error> {
    let relative: Vec<PathBuf> = paths.iter().map(|p| relative_inside(base, p)).collect::<Result<_, _>>()?;
    codec.phase("saving paths", None);
    let (mut reader, handle) = tar_stream(base.to_path_buf(), relative.clone());
    let written = artifact::write_compressed(&mut reader, dir, ARCHIVE, codec);
    drop(reader);
    let tarred = handle.join().expect("the tar thread does not panic");
    tarred.map_err(Error::io("archive", base))?;
    let names = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    Ok((written?, names))
}

/// The saved path (one of `saved`, component-wise) that `path` is under, if any.
fn saved_path_of<'a>(path: &Path, saved: &'a [PathBuf]) -> Option<&'a PathBuf> {
    saved.iter().find(|s| path.starts_with(s))
}

/// Where `path` (relative to the restore folder) leads once every symlink on it is followed,
/// using the links the archive itself holds (the only ones a restore creates): `None` when
/// the chain leaves the restore folder, is absolute, or loops.
fn resolve<'a>(links: &'a HashMap<PathBuf, PathBuf>, path: &'a Path) -> Option<PathBuf> {
    let mut resolved = PathBuf::new();
    let mut pending: VecDeque<Component<'a>> = path.components().collect();
    let mut hops = 0;
    while let Some(component) = pending.pop_front() {
        match component {
            Component::Normal(name) => {
                let candidate = resolved.join(name);
                if let Some(target) = links.get(&candidate) {
                    hops += 1;
                    if hops > 40 || target.is_absolute() {
                        return None;
                    }
                    // The target is relative to the link's folder: `resolved` as it is.
                    for part in target.components().rev() {
                        pending.push_front(part);
                    }
                } else {
                    resolved = candidate;
                }
            }
            Component::ParentDir => {
                if !resolved.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(resolved)
}

/// What one archive entry is, read in the checking pass.
struct Checked {
    path: PathBuf,
    link: Option<(PathBuf, bool)>,
}

fn read_entry<R: Read>(entry: &tar::Entry<'_, R>) -> Result<Checked, String> {
    let path = entry.path().map_err(|e| format!("an entry has an unreadable path: {e}"))?.into_owned();
    if path.as_os_str().is_empty() || path.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!("entry {} is absolute or contains `..`", path.display()));
    }
    let kind = entry.header().entry_type();
    let link = if kind.is_symlink() || kind.is_hard_link() {
        let target = entry
            .link_name()
            .map_err(|e| format!("entry {} has an unreadable link: {e}", path.display()))?
            .ok_or_else(|| format!("entry {} is a link without a target", path.display()))?
            .into_owned();
        Some((target, kind.is_hard_link()))
    } else {
        None
    };
    Ok(Checked { path: path.components().collect(), link })
}

/// Checks every entry against the saved paths, with every symlink chain resolved: an entry
/// outside the saved paths, or a link (or a path through links) that ends outside the
/// saved path it is in, refuses the whole archive.
fn check_entries(entries: &[Checked], saved: &[PathBuf]) -> Result<(), String> {
    let links: HashMap<PathBuf, PathBuf> = entries
        .iter()
        .filter_map(|e| match &e.link {
            Some((target, false)) => Some((e.path.clone(), target.clone())),
            _ => None,
        })
        .collect();
    for entry in entries {
        let Some(home) = saved_path_of(&entry.path, saved) else {
            return Err(format!(
                "entry {} is not under a saved path ({})",
                entry.path.display(),
                saved.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            ));
        };
        // The folder it is written into, through whatever links the archive makes.
        let parent = entry.path.parent().unwrap_or(Path::new(""));
        if entry.path != *home && !resolve(&links, parent).is_some_and(|p| p.starts_with(home)) {
            return Err(format!(
                "entry {} is written through a link that leaves {}",
                entry.path.display(),
                home.display()
            ));
        }
        match &entry.link {
            Some((target, true)) => {
                let target: PathBuf = target.components().collect();
                if target.components().any(|c| !matches!(c, Component::Normal(_)))
                    || saved_path_of(&target, saved) != Some(home)
                {
                    return Err(format!(
                        "entry {} is a hard link to {}, outside {}",
                        entry.path.display(),
                        target.display(),
                        home.display()
                    ));
                }
            }
            Some((target, false)) if !resolve(&links, &entry.path).is_some_and(|p| p.starts_with(home)) => {
                return Err(format!(
                    "entry {} links to {}, which leads outside {}",
                    entry.path.display(),
                    target.display(),
                    home.display()
                ));
            }
            Some((_, false)) | None => {}
        }
    }
    Ok(())
}

/// Saved paths unpacked into a staging folder beside their destination, checked and ready
/// to be moved into place by [`Staged::commit`]. Dropped uncommitted, it removes itself and
/// the live paths are untouched.
pub(crate) struct Staged {
    staging: tempfile::TempDir,
    target: PathBuf,
    tops: Vec<PathBuf>,
}

/// Checks the archive against `saved` (the saved paths the restore may write) and unpacks
/// it into a staging folder inside `target`, touching nothing of the live paths.
pub(crate) fn stage(
    backup_dir: &Path,
    entry: &FileEntry,
    target: &Path,
    saved: &[PathBuf],
    id: &str,
    identities: Option<&Identities>,
) -> Result<Staged, Error> {
    let corrupt = |message: String| Error::Corrupt { id: id.to_owned(), message };
    let decode = || artifact::open_decoded(backup_dir, entry, identities).map(tar::Archive::new);
    let saved: Vec<PathBuf> =
        saved.iter().map(|p| p.components().filter(|c| !matches!(c, Component::CurDir)).collect()).collect();
    // First pass: read and check every entry, touching nothing.
    let mut entries = Vec::new();
    let mut checking = decode().map_err(corrupt)?;
    for item in checking.entries().map_err(|e| corrupt(e.to_string()))? {
        let item = item.map_err(|e| corrupt(e.to_string()))?;
        entries.push(
            read_entry(&item)
                .map_err(|m| Error::Usage(format!("backup {id} holds an unsafe path, nothing restored: {m}")))?,
        );
    }
    check_entries(&entries, &saved)
        .map_err(|m| Error::Usage(format!("backup {id} holds an unsafe path, nothing restored: {m}")))?;
    let mut tops: Vec<PathBuf> = Vec::new();
    for entry in &entries {
        if let Some(home) = saved_path_of(&entry.path, &saved)
            && !tops.contains(home)
        {
            tops.push(home.clone());
        }
    }
    // Second pass: unpack into a staging folder on the target's filesystem.
    fs::create_dir_all(target).map_err(Error::io("create", target))?;
    let staging = tempfile::Builder::new()
        .prefix(".upshift-paths-")
        .tempdir_in(target)
        .map_err(Error::io("create a temp folder in", target))?;
    let mut archive = decode().map_err(corrupt)?;
    archive.set_preserve_permissions(true);
    archive.set_overwrite(true);
    for item in archive.entries().map_err(|e| corrupt(e.to_string()))? {
        let mut item = item.map_err(|e| corrupt(e.to_string()))?;
        item.unpack_in(staging.path()).map_err(Error::io("unpack into", staging.path()))?;
    }
    Ok(Staged { staging, target: target.to_path_buf(), tops })
}

impl Staged {
    /// Moves each staged saved path into place (the old one aside first): renames on one
    /// filesystem. Returns the saved paths restored.
    pub(crate) fn commit(self) -> Result<Vec<String>, Error> {
        let aside = self.staging.path().join(".old");
        fs::create_dir(&aside).map_err(Error::io("create", &aside))?;
        for top in &self.tops {
            let destination = self.target.join(top);
            let staged = self.staging.path().join(top);
            if staged.symlink_metadata().is_err() {
                continue;
            }
            if destination.symlink_metadata().is_ok() {
                let parked = aside.join(top.to_string_lossy().replace('/', "%2F"));
                fs::rename(&destination, &parked).map_err(Error::io("move aside", &destination))?;
            }
            if let Some(parent) = destination.parent() {
                fs::create_dir_all(parent).map_err(Error::io("create", parent))?;
            }
            fs::rename(&staged, &destination).map_err(Error::io("move into place", &destination))?;
        }
        Ok(self.tops.iter().map(|t| t.to_string_lossy().into_owned()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(pairs: &[(&str, &str)]) -> HashMap<PathBuf, PathBuf> {
        pairs.iter().map(|(a, b)| (PathBuf::from(a), PathBuf::from(b))).collect()
    }

    #[test]
    fn chains_of_links_are_followed_to_their_end() {
        let none = links(&[]);
        assert_eq!(resolve(&none, Path::new("config/app.toml")), Some("config/app.toml".into()));
        assert_eq!(resolve(&none, Path::new("config/../../x")), None);
        let chain =
            links(&[("config/s1", ".."), ("config/s2", "s1/.."), ("config/s3", "s2/.."), ("config/s4", "s3/..")]);
        assert_eq!(resolve(&chain, Path::new("config/s1")), Some(PathBuf::new()));
        assert_eq!(resolve(&chain, Path::new("config/s2")), None, "s1/.. is above the restore folder");
        let inside = links(&[("config/current", "v2"), ("config/v2/latest", "../v1")]);
        assert_eq!(resolve(&inside, Path::new("config/current/latest")), Some("config/v1".into()));
        assert_eq!(resolve(&links(&[("a", "b"), ("b", "a")]), Path::new("a")), None, "a loop");
    }

    #[test]
    fn only_the_saved_paths_and_links_inside_them_pass() {
        let saved = [PathBuf::from("config")];
        let file = |p: &str| Checked { path: p.into(), link: None };
        let link = |p: &str, t: &str| Checked { path: p.into(), link: Some((t.into(), false)) };
        assert!(check_entries(&[file("config/app.toml"), link("config/l", "app.toml")], &saved).is_ok());
        assert!(check_entries(&[file(".upshift/journal.db")], &saved).unwrap_err().contains("not under a saved path"));
        assert!(check_entries(&[link("config/l", "../data/x")], &saved).unwrap_err().contains("leads outside config"));
        let chain = [
            link("config/s1", ".."),
            link("config/s2", "s1/.."),
            link("config/s3", "s2/.."),
            link("config/s4", "s3/.."),
        ];
        assert!(check_entries(&chain, &saved).is_err());
        let through = [link("config/d", "../releases"), file("config/d/evil.sh")];
        let err = check_entries(&through, &saved).unwrap_err();
        assert!(err.contains("config/d"), "{err}");
        // Written through a link to the restore folder's root: refused for the file too.
        assert!(check_entries(&[file("config/d/x")], &saved).is_ok(), "a plain folder is fine");
        let up = [file("config"), link("config/d", ".."), file("config/d/.upshift/x")];
        assert!(check_entries(&up, &saved).is_err());
    }
}

#[cfg(test)]
mod archive_tests {
    use std::io::Write as _;

    use super::*;
    use crate::artifact::{Codec, write_compressed};

    /// Writes a tar with one raw entry (bypassing the tar crate's own path checks, as an
    /// attacker's archive would) into a backup folder and returns its entry.
    fn crafted(dir: &Path, name: &[u8], kind: tar::EntryType, link: &[u8]) -> FileEntry {
        let mut header = tar::Header::new_old();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        header.set_entry_type(kind);
        header.set_mode(0o644);
        header.set_size(if kind == tar::EntryType::Regular { 4 } else { 0 });
        header.set_cksum();
        let mut tar = Vec::new();
        tar.write_all(header.as_bytes()).unwrap();
        if kind == tar::EntryType::Regular {
            tar.extend_from_slice(b"evil");
            tar.resize(tar.len() + 508, 0);
        }
        tar.resize(tar.len() + 1024, 0);
        write_compressed(&mut &tar[..], dir, ARCHIVE, &Codec { threads: 1, ..Codec::default() }).unwrap()
    }

    #[test]
    fn unsafe_entries_are_refused_and_nothing_is_written() {
        for (name, kind, link) in [
            (&b"../evil"[..], tar::EntryType::Regular, &b""[..]),
            (b".upshift/journal.db", tar::EntryType::Regular, b""),
            (b"config/up", tar::EntryType::Symlink, b".."),
            (b"/tmp/evil", tar::EntryType::Regular, b""),
            (b"config/link", tar::EntryType::Symlink, b"../../etc/passwd"),
            (b"config/abs", tar::EntryType::Symlink, b"/etc/passwd"),
            (b"config/hard", tar::EntryType::Link, b"../outside"),
        ] {
            let backup = tempfile::tempdir().unwrap();
            let target = tempfile::tempdir().unwrap();
            let entry = crafted(backup.path(), name, kind, link);
            let err = stage(backup.path(), &entry, target.path(), &[PathBuf::from("config")], "x", None).err().unwrap();
            assert!(err.to_string().contains("unsafe path"), "{}: {err}", String::from_utf8_lossy(name));
            assert_eq!(fs::read_dir(target.path()).unwrap().count(), 0, "{}", String::from_utf8_lossy(name));
        }
    }

    #[test]
    fn a_link_inside_is_restored() {
        let backup = tempfile::tempdir().unwrap();
        let target = tempfile::tempdir().unwrap();
        let entry = crafted(backup.path(), b"config/link", tar::EntryType::Symlink, b"app.toml");
        let staged = stage(backup.path(), &entry, target.path(), &[PathBuf::from("config")], "x", None).unwrap();
        assert_eq!(staged.commit().unwrap(), ["config"]);
        assert_eq!(fs::read_link(target.path().join("config/link")).unwrap(), Path::new("app.toml"));
    }
}
