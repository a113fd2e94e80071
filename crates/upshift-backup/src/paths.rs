//! Saved paths (config files, data folders) as one zstd-compressed tar.
//!
//! On restore, every entry is checked before anything is written: absolute paths, `..`,
//! and links whose target leaves the restore folder are refused. The archive is unpacked
//! into a temp folder beside the target first and each top-level path is then renamed into
//! place, so a failure partway leaves the old files.

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

/// Whether `link` (a symlink at `at`, both relative to the restore folder) stays inside it.
fn link_stays_inside(at: &Path, link: &Path) -> bool {
    if link.is_absolute() {
        return false;
    }
    let mut depth: i64 = at.parent().map_or(0, |p| i64::try_from(p.components().count()).unwrap_or(i64::MAX));
    for component in link.components() {
        match component {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

/// Refuses an archive entry that would write outside the restore folder.
fn check_entry<R: Read>(entry: &tar::Entry<'_, R>) -> Result<(), String> {
    let path = entry.path().map_err(|e| format!("an entry has an unreadable path: {e}"))?;
    if path.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(format!("entry {} is absolute or contains `..`", path.display()));
    }
    let kind = entry.header().entry_type();
    if kind.is_symlink() || kind.is_hard_link() {
        let link = entry
            .link_name()
            .map_err(|e| format!("entry {} has an unreadable link: {e}", path.display()))?
            .ok_or_else(|| format!("entry {} is a link without a target", path.display()))?;
        let inside = if kind.is_hard_link() {
            link.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        } else {
            link_stays_inside(&path, &link)
        };
        if !inside {
            return Err(format!("entry {} links to {}, outside the restore folder", path.display(), link.display()));
        }
    }
    Ok(())
}

/// Restores the archive into `target`, replacing the saved top-level paths.
pub(crate) fn extract(
    backup_dir: &Path,
    entry: &FileEntry,
    target: &Path,
    id: &str,
    identities: Option<&Identities>,
) -> Result<Vec<String>, Error> {
    let corrupt = |message: String| Error::Corrupt { id: id.to_owned(), message };
    let decode = || artifact::open_decoded(backup_dir, entry, identities).map(tar::Archive::new);
    // First pass: check every entry, touching nothing.
    let mut tops = Vec::new();
    let mut checking = decode().map_err(corrupt)?;
    for item in checking.entries().map_err(|e| corrupt(e.to_string()))? {
        let item = item.map_err(|e| corrupt(e.to_string()))?;
        check_entry(&item)
            .map_err(|m| Error::Usage(format!("backup {id} holds an unsafe path, nothing restored: {m}")))?;
        let path = item.path().map_err(|e| corrupt(e.to_string()))?.into_owned();
        if let Some(Component::Normal(top)) = path.components().find(|c| matches!(c, Component::Normal(_))) {
            let top = top.to_string_lossy().into_owned();
            if !tops.contains(&top) {
                tops.push(top);
            }
        }
    }
    // Second pass: unpack beside the target, then move each top-level path into place.
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
    let aside = staging.path().join(".old");
    fs::create_dir(&aside).map_err(Error::io("create", &aside))?;
    for top in &tops {
        let destination = target.join(top);
        if destination.symlink_metadata().is_ok() {
            fs::rename(&destination, aside.join(top)).map_err(Error::io("move aside", &destination))?;
        }
        fs::rename(staging.path().join(top), &destination).map_err(Error::io("move into place", &destination))?;
    }
    Ok(tops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_that_leave_are_caught() {
        assert!(link_stays_inside(Path::new("config/link"), Path::new("app.toml")));
        assert!(link_stays_inside(Path::new("config/link"), Path::new("../data/x")));
        assert!(!link_stays_inside(Path::new("config/link"), Path::new("../../etc/passwd")));
        assert!(!link_stays_inside(Path::new("link"), Path::new("/etc/passwd")));
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
            (b"/tmp/evil", tar::EntryType::Regular, b""),
            (b"config/link", tar::EntryType::Symlink, b"../../etc/passwd"),
            (b"config/abs", tar::EntryType::Symlink, b"/etc/passwd"),
            (b"config/hard", tar::EntryType::Link, b"../outside"),
        ] {
            let backup = tempfile::tempdir().unwrap();
            let target = tempfile::tempdir().unwrap();
            let entry = crafted(backup.path(), name, kind, link);
            let err = extract(backup.path(), &entry, target.path(), "x", None).unwrap_err();
            assert!(err.to_string().contains("unsafe path"), "{}: {err}", String::from_utf8_lossy(name));
            assert_eq!(fs::read_dir(target.path()).unwrap().count(), 0, "{}", String::from_utf8_lossy(name));
        }
    }

    #[test]
    fn a_link_inside_is_restored() {
        let backup = tempfile::tempdir().unwrap();
        let target = tempfile::tempdir().unwrap();
        let entry = crafted(backup.path(), b"config/link", tar::EntryType::Symlink, b"app.toml");
        assert_eq!(extract(backup.path(), &entry, target.path(), "x", None).unwrap(), ["config"]);
        assert_eq!(fs::read_link(target.path().join("config/link")).unwrap(), Path::new("app.toml"));
    }
}
