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
    /// Size in bytes before compression (absent in backups made before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_size: Option<u64>,
}

/// Hears how a long write goes, for a progress display.
pub trait Progress: Send + Sync {
    /// A new phase begins; `total` is its size in bytes when known.
    fn phase(&self, what: &str, total: Option<u64>);
    /// `bytes` more were read in the current phase.
    fn advance(&self, bytes: u64);
}

/// How artifacts are written: zstd settings and, when recipients are given, age encryption.
#[derive(Clone)]
pub struct Codec {
    /// zstd level. 1, by measurement: on the bench's realistic dump (hex digests, JSON,
    /// timestamps) level 1 is both faster and smaller than 3 (290.8 MB in 1.9 s of one core
    /// against 303.4 MB in 3.3 s), and on pgbench's filler both are about 100 times smaller
    /// than the input.
    pub level: i32,
    /// Worker threads for one stream.
    pub threads: u32,
    /// age recipients; empty means no encryption.
    pub recipients: Vec<age::x25519::Recipient>,
    /// Told of every byte compressed.
    pub progress: Option<std::sync::Arc<dyn Progress>>,
}

impl Default for Codec {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1));
        Codec { level: 1, threads, recipients: Vec::new(), progress: None }
    }
}

impl Codec {
    /// Announces a phase to the progress display, if any.
    pub(crate) fn phase(&self, what: &str, total: Option<u64>) {
        if let Some(progress) = &self.progress {
            progress.phase(what, total);
        }
    }
}

/// Tells the progress display of every byte read through it.
struct Metered<'a> {
    inner: &'a mut dyn Read,
    progress: Option<&'a dyn Progress>,
}

impl Read for Metered<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        if let Some(progress) = self.progress {
            progress.advance(read as u64);
        }
        Ok(read)
    }
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec").field("level", &self.level).field("threads", &self.threads).finish_non_exhaustive()
    }
}

/// age identities that can open encrypted backups (`--identity FILE`).
pub struct Identities(Vec<Box<dyn age::Identity>>);

impl Identities {
    /// Reads an age identity file (`AGE-SECRET-KEY-1...` lines).
    pub fn from_file(path: &Path) -> Result<Identities, Error> {
        let file = age::IdentityFile::from_file(path.to_string_lossy().into_owned())
            .map_err(Error::io("read the identity file", path))?;
        let identities = file
            .into_identities()
            .map_err(|e| Error::Usage(format!("{} is not an age identity file: {e}", path.display())))?;
        Ok(Identities(identities))
    }
}

/// Suffix of encrypted artifacts.
const AGE: &str = ".age";

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

type Hashing = HashingWriter<BufWriter<File>>;

/// zstd (and, with recipients, age) on the way to the file.
enum Encoder {
    Plain(zstd::Encoder<'static, Hashing>),
    Sealed(zstd::Encoder<'static, age::stream::StreamWriter<Hashing>>),
}

/// An artifact being written: bytes go in as they come and are compressed (and encrypted)
/// on the way to the file; [`Writer::finish`] fsyncs it and returns its entry.
pub(crate) struct Writer {
    encoder: Encoder,
    /// Bytes taken in, before compression.
    raw_size: u64,
    path: std::path::PathBuf,
    relative: String,
}

fn zstd_encoder<W: Write>(output: W, codec: &Codec) -> io::Result<zstd::Encoder<'static, W>> {
    let mut encoder = zstd::Encoder::new(output, codec.level)?;
    if codec.threads > 1 {
        encoder.multithread(codec.threads)?;
    }
    Ok(encoder)
}

impl Writer {
    /// Creates `backup_dir/relative` (plus `.age` when encrypted), mode 0600.
    pub(crate) fn create(backup_dir: &Path, relative: &str, codec: &Codec) -> Result<Writer, Error> {
        let relative = if codec.recipients.is_empty() { relative.to_owned() } else { format!("{relative}{AGE}") };
        let path = backup_dir.join(&relative);
        if let Some(parent) = path.parent() {
            private_dir(parent)?;
        }
        let file = private_file(&path)?;
        let hashing = HashingWriter { inner: BufWriter::with_capacity(1 << 20, file), hasher: Sha256::new(), size: 0 };
        let encoder = if codec.recipients.is_empty() {
            zstd_encoder(hashing, codec).map(Encoder::Plain)
        } else {
            let recipients = codec.recipients.iter().map(|r| r as &dyn age::Recipient);
            age::Encryptor::with_recipients(recipients)
                .map_err(io::Error::other)
                .and_then(|encryptor| encryptor.wrap_output(hashing))
                .and_then(|sealed| zstd_encoder(sealed, codec))
                .map(Encoder::Sealed)
        };
        let encoder = encoder.map_err(Error::io("write", &path))?;
        Ok(Writer { encoder, raw_size: 0, path, relative })
    }

    /// Ends the streams, fsyncs the file and returns its entry.
    pub(crate) fn finish(self) -> Result<FileEntry, Error> {
        let path = self.path;
        let hashing = match self.encoder {
            Encoder::Plain(encoder) => encoder.finish(),
            Encoder::Sealed(encoder) => encoder.finish().and_then(age::stream::StreamWriter::finish),
        };
        let mut hashing = hashing.map_err(Error::io("write", &path))?;
        hashing.flush().map_err(Error::io("write", &path))?;
        let file = hashing.inner.into_inner().map_err(|e| Error::io("write", &path)(e.into_error()))?;
        file.sync_all().map_err(Error::io("fsync", &path))?;
        Ok(FileEntry {
            path: self.relative,
            size: hashing.size,
            sha256: hex(&hashing.hasher.finalize()),
            raw_size: Some(self.raw_size),
        })
    }

    /// Where the file is, for error messages.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = match &mut self.encoder {
            Encoder::Plain(encoder) => encoder.write(buf),
            Encoder::Sealed(encoder) => encoder.write(buf),
        }?;
        self.raw_size += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.encoder {
            Encoder::Plain(encoder) => encoder.flush(),
            Encoder::Sealed(encoder) => encoder.flush(),
        }
    }
}

/// Compresses (and, with recipients, encrypts) everything `source` yields into
/// `backup_dir/relative` (plus `.age` when encrypted), returning its entry. The file is
/// fsynced before this returns.
pub(crate) fn write_compressed(
    source: &mut dyn Read,
    backup_dir: &Path,
    relative: &str,
    codec: &Codec,
) -> Result<FileEntry, Error> {
    let mut writer = Writer::create(backup_dir, relative, codec)?;
    io::copy(&mut Metered { inner: source, progress: codec.progress.as_deref() }, &mut writer)
        .map_err(Error::io("write", writer.path()))?;
    writer.finish()
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

/// Whether an artifact is encrypted.
pub(crate) fn is_encrypted(entry: &FileEntry) -> bool {
    entry.path.ends_with(AGE)
}

/// A reader of an artifact's original bytes: decrypted (with `identities`) and
/// decompressed. Call [`check`] first.
pub(crate) fn open_decoded(
    backup_dir: &Path,
    entry: &FileEntry,
    identities: Option<&Identities>,
) -> Result<Box<dyn Read>, String> {
    let path = backup_dir.join(&entry.path);
    let file = File::open(&path).map_err(|e| format!("{} cannot be read: {e}", entry.path))?;
    let file = BufReader::with_capacity(1 << 20, file);
    let compressed: Box<dyn Read> = if is_encrypted(entry) {
        let identities = identities.ok_or_else(|| format!("{} is encrypted and no identity was given", entry.path))?;
        let decryptor = age::Decryptor::new_buffered(file).map_err(|e| format!("{}: {e}", entry.path))?;
        let identities = identities.0.iter().map(|i| i.as_ref() as &dyn age::Identity);
        Box::new(decryptor.decrypt(identities).map_err(|e| format!("{} cannot be decrypted: {e}", entry.path))?)
    } else {
        Box::new(file)
    };
    Ok(Box::new(zstd::Decoder::new(compressed).map_err(|e| format!("{}: {e}", entry.path))?))
}

/// Decodes a checked artifact into `sink`. Call [`check`] first: this only reports
/// decryption and decompression errors.
pub(crate) fn decompress(
    backup_dir: &Path,
    entry: &FileEntry,
    identities: Option<&Identities>,
    sink: &mut dyn Write,
) -> Result<u64, String> {
    let mut reader = open_decoded(backup_dir, entry, identities)?;
    io::copy(&mut reader, sink).map_err(|e| format!("{} does not decode: {e}", entry.path))
}

/// Whether a file written is fsynced before it counts as written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fsync {
    /// A file that must survive a crash.
    Durable,
    /// Scratch that a crash throws away anyway (a restore's unpacked dump).
    Scratch,
}

/// Decodes an artifact into a new owner-only file at `dest`.
pub(crate) fn decompress_to_file(
    backup_dir: &Path,
    entry: &FileEntry,
    identities: Option<&Identities>,
    dest: &Path,
    sync: Fsync,
) -> Result<(), String> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(|e| format!("could not create {}: {e}", dest.display()))?;
    let mut writer = BufWriter::with_capacity(1 << 20, file);
    decompress(backup_dir, entry, identities, &mut writer)?;
    let file = writer.into_inner().map_err(|e| format!("could not write {}: {}", dest.display(), e.error()))?;
    if sync == Fsync::Durable {
        file.sync_all().map_err(|e| format!("could not fsync {}: {e}", dest.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper_detection() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let entry = write_compressed(
            &mut &data[..],
            dir.path(),
            "db/a.zst",
            &Codec { level: 3, threads: 2, ..Codec::default() },
        )
        .unwrap();
        assert!(entry.size > 0 && entry.size < data.len() as u64);
        assert_eq!(entry.raw_size, Some(data.len() as u64));
        check(dir.path(), &entry).unwrap();
        let mut out = Vec::new();
        decompress(dir.path(), &entry, None, &mut out).unwrap();
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

    #[test]
    fn encrypted_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let identity = age::x25519::Identity::generate();
        let codec = Codec { level: 3, threads: 1, recipients: vec![identity.to_public()], progress: None };
        let entry = write_compressed(&mut &b"secret rows"[..], dir.path(), "db/a.zst", &codec).unwrap();
        assert_eq!(entry.path, "db/a.zst.age");
        check(dir.path(), &entry).unwrap();
        assert!(decompress(dir.path(), &entry, None, &mut Vec::new()).unwrap_err().contains("no identity"));
        let wrong = Identities(vec![Box::new(age::x25519::Identity::generate())]);
        assert!(
            decompress(dir.path(), &entry, Some(&wrong), &mut Vec::new()).unwrap_err().contains("cannot be decrypted")
        );
        let right = Identities(vec![Box::new(identity)]);
        let mut out = Vec::new();
        decompress(dir.path(), &entry, Some(&right), &mut out).unwrap();
        assert_eq!(out, b"secret rows");
    }
}
