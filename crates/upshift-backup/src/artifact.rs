//! Backup files: compressed with zstd, their sha256 computed while they are written, fsynced,
//! mode 0600; and read back with the checksum checked on the way.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::Error;

/// One file of a backup, as its manifest records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the backup's folder.
    pub path: String,
    /// Size in bytes, as written.
    pub size: u64,
    /// Hex sha256 of the bytes written.
    pub sha256: String,
}

/// zstd settings for every artifact.
#[derive(Clone, Copy, Debug)]
pub struct Compression {
    /// zstd level (3 is zstd's default: about gzip -6's ratio at many times its speed).
    pub level: i32,
    /// Worker threads for one stream.
    pub threads: u32,
}

impl Default for Compression {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1));
        Compression { level: 3, threads }
    }
}

fn hex(digest: &[u8]) -> String {
    use std::fmt::Write as _;
    digest.iter().fold(String::with_capacity(64), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// Makes a folder with mode 0700 (and its parents).
pub(crate) fn private_dir(path: &Path) -> Result<(), Error> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(Error::io("create", path))
}

/// Creates a new file with mode 0600.
pub(crate) fn private_file(path: &Path) -> Result<File, Error> {
    OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(Error::io("create", path))
}

/// Counts and hashes what passes through to `inner`.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        self.size += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Compresses everything `source` yields into `backup_dir/relative`, returning its entry.
/// The file is fsynced before this returns.
pub(crate) fn write_compressed(
    source: &mut dyn Read,
    backup_dir: &Path,
    relative: &str,
    compression: Compression,
) -> Result<FileEntry, Error> {
    let path = backup_dir.join(relative);
    if let Some(parent) = path.parent() {
        private_dir(parent)?;
    }
    let file = private_file(&path)?;
    let hashing = HashingWriter { inner: BufWriter::with_capacity(1 << 20, file), hasher: Sha256::new(), size: 0 };
    let write_error = Error::io("write", &path);
    let result = (|| -> io::Result<HashingWriter<BufWriter<File>>> {
        let mut encoder = zstd::Encoder::new(hashing, compression.level)?;
        if compression.threads > 1 {
            encoder.multithread(compression.threads)?;
        }
        io::copy(source, &mut encoder)?;
        let mut hashing = encoder.finish()?;
        hashing.flush()?;
        Ok(hashing)
    })();
    let hashing = result.map_err(write_error)?;
    let file = hashing.inner.into_inner().map_err(|e| Error::io("write", &path)(e.into_error()))?;
    file.sync_all().map_err(Error::io("fsync", &path))?;
    Ok(FileEntry { path: relative.to_owned(), size: hashing.size, sha256: hex(&hashing.hasher.finalize()) })
}

/// Reads a file and checks its size and sha256 against `entry`.
pub(crate) fn check(backup_dir: &Path, entry: &FileEntry) -> Result<(), String> {
    let path = backup_dir.join(&entry.path);
    let mut file = File::open(&path).map_err(|e| format!("{} cannot be read: {e}", entry.path))?;
    let mut hasher = Sha256::new();
    let size = io::copy(&mut file, &mut hasher).map_err(|e| format!("{} cannot be read: {e}", entry.path))?;
    if size != entry.size {
        return Err(format!("{} is {size} bytes, the manifest says {}", entry.path, entry.size));
    }
    let sha256 = hex(&hasher.finalize());
    if sha256 != entry.sha256 {
        return Err(format!("{} has sha256 {sha256}, the manifest says {}", entry.path, entry.sha256));
    }
    Ok(())
}

/// Decompresses a checked artifact into `sink`. Call [`check`] first: this only reports
/// decompression errors.
pub(crate) fn decompress(backup_dir: &Path, entry: &FileEntry, sink: &mut dyn Write) -> Result<u64, String> {
    let path = backup_dir.join(&entry.path);
    let file = File::open(&path).map_err(|e| format!("{} cannot be read: {e}", entry.path))?;
    let mut decoder = zstd::Decoder::with_buffer(BufReader::with_capacity(1 << 20, file))
        .map_err(|e| format!("{}: {e}", entry.path))?;
    io::copy(&mut decoder, sink).map_err(|e| format!("{} does not decompress: {e}", entry.path))
}

/// Decompresses an artifact into a new file at `dest`, fsynced.
pub(crate) fn decompress_to_file(backup_dir: &Path, entry: &FileEntry, dest: &Path) -> Result<(), String> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(|e| format!("could not create {}: {e}", dest.display()))?;
    let mut writer = BufWriter::with_capacity(1 << 20, file);
    decompress(backup_dir, entry, &mut writer)?;
    let file = writer.into_inner().map_err(|e| format!("could not write {}: {}", dest.display(), e.error()))?;
    file.sync_all().map_err(|e| format!("could not fsync {}: {e}", dest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper_detection() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let entry =
            write_compressed(&mut &data[..], dir.path(), "db/a.zst", Compression { level: 3, threads: 2 }).unwrap();
        assert!(entry.size > 0 && entry.size < data.len() as u64);
        check(dir.path(), &entry).unwrap();
        let mut out = Vec::new();
        decompress(dir.path(), &entry, &mut out).unwrap();
        assert_eq!(out, data);
        let mode = fs::metadata(dir.path().join("db/a.zst")).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);

        let path = dir.path().join("db/a.zst");
        let mut bytes = fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        let message = check(dir.path(), &entry).unwrap_err();
        assert!(message.contains("sha256"), "{message}");
    }
}
