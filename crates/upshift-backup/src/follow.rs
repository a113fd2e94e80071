//! Compressing a folder's files while another process writes them, as `tail -f` reads: each
//! file is read as it grows and finished once the writer has closed it (inotify's
//! `IN_CLOSE_WRITE`) or has exited. `pg_dump --format=directory` writes every file of its
//! dump once, from start to end, and closes it; at most `--jobs` of them at a time.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::fs::inotify;
use rustix::io::Errno;

use crate::artifact::{Codec, FileEntry, Writer};
use crate::error::Error;

/// How long the follower waits for news when every file it follows has been read to its end.
const IDLE_WAIT_MS: i64 = 20;
/// Bytes read from one file before the others get their turn.
const TURN: usize = 16 << 20;
/// Files followed at once (each holds two descriptors and a zstd context). `pg_dump` writes
/// `--jobs` at a time; the rest wait, closed, in the folder.
const FOLLOWED_AT_ONCE: usize = 32;

/// An inotify watch on a folder for files closed after writing.
pub(crate) struct Watch {
    fd: OwnedFd,
    /// The kernel's event queue overflowed: closes may have been missed, so files are
    /// finished only once the writer has exited.
    overflowed: AtomicBool,
}

impl Watch {
    /// Watches `dir`. Must be set up before the writer starts.
    pub(crate) fn new(dir: &Path) -> io::Result<Watch> {
        let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
        inotify::add_watch(&fd, dir, inotify::WatchFlags::CLOSE_WRITE)?;
        Ok(Watch { fd, overflowed: AtomicBool::new(false) })
    }

    /// Whether every close has been heard.
    fn complete(&self) -> bool {
        !self.overflowed.load(Ordering::Relaxed)
    }

    /// The names of the files closed since the last call, waiting up to `timeout_ms` for
    /// the first one.
    fn closed(&self, timeout_ms: i64) -> io::Result<Vec<OsString>> {
        let timeout = Timespec { tv_sec: 0, tv_nsec: timeout_ms * 1_000_000 };
        match poll(&mut [PollFd::new(&self.fd, PollFlags::IN)], Some(&timeout)) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(error) => return Err(error.into()),
        }
        let mut names = Vec::new();
        let mut buffer = [MaybeUninit::<u8>::uninit(); 16 * 1024];
        let mut events = inotify::Reader::new(&self.fd, &mut buffer);
        loop {
            match events.next() {
                Ok(event) if event.events().contains(inotify::ReadFlags::QUEUE_OVERFLOW) => {
                    self.overflowed.store(true, Ordering::Relaxed);
                }
                Ok(event) => {
                    if let Some(name) = event.file_name() {
                        names.push(OsStr::from_bytes(name.to_bytes()).to_owned());
                    }
                }
                Err(Errno::AGAIN) => return Ok(names),
                Err(Errno::INTR) => {}
                Err(error) => return Err(error.into()),
            }
        }
    }
}

struct Followed {
    name: OsString,
    source: File,
    writer: Writer,
}

/// Compresses every file that appears in `raw` into `dir/<prefix>/<name>.zst` as it is
/// written, removing each once it is finished, until `exited` is set and all are done.
/// Returns the entries sorted by path.
pub(crate) fn compress(
    raw: &Path,
    dir: &Path,
    prefix: &str,
    codec: &Codec,
    watch: &Watch,
    exited: &AtomicBool,
) -> Result<Vec<FileEntry>, Error> {
    let mut following: Vec<Followed> = Vec::new();
    let mut seen: HashSet<OsString> = HashSet::new();
    let mut closed: HashSet<OsString> = HashSet::new();
    let mut entries = Vec::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        // Read before the folder is listed: once the writer has exited, nothing new appears
        // and every file is whole.
        let last = exited.load(Ordering::Acquire);
        for entry in fs::read_dir(raw).map_err(Error::io("read", raw))? {
            if following.len() >= FOLLOWED_AT_ONCE {
                break;
            }
            let name = entry.map_err(Error::io("read", raw))?.file_name();
            if seen.insert(name.clone()) {
                let path = raw.join(&name);
                let source = File::open(&path).map_err(Error::io("read", &path))?;
                let relative = format!("{prefix}/{}.zst", name.to_string_lossy());
                following.push(Followed { name, source, writer: Writer::create(dir, &relative, codec)? });
            }
        }
        closed.extend(watch.closed(0).map_err(Error::io("watch", raw))?);
        let mut progressed = false;
        let mut index = 0;
        while index < following.len() {
            let file = &mut following[index];
            // Known before the last read: what was written before the close is readable.
            let whole = last || (watch.complete() && closed.contains(&file.name));
            let mut turn = 0;
            let mut at_end = false;
            while turn < TURN {
                let path = raw.join(&file.name);
                let read = file.source.read(&mut buffer).map_err(Error::io("read", &path))?;
                if read == 0 {
                    at_end = true;
                    break;
                }
                file.writer.write_all(&buffer[..read]).map_err(Error::io("write", file.writer.path()))?;
                if let Some(progress) = &codec.progress {
                    progress.advance(read as u64);
                }
                turn += read;
                progressed = true;
            }
            if at_end && whole {
                let file = following.swap_remove(index);
                closed.remove(&file.name);
                entries.push(file.writer.finish()?);
                let path = raw.join(&file.name);
                fs::remove_file(&path).map_err(Error::io("remove", &path))?;
            } else {
                index += 1;
            }
        }
        // Done once the writer has exited and a listing made after that found nothing new
        // (with the cap, one listing may not have reached every file).
        if last && following.is_empty() && fs::read_dir(raw).map_err(Error::io("read", raw))?.next().is_none() {
            break;
        }
        if !progressed {
            closed.extend(watch.closed(IDLE_WAIT_MS).map_err(Error::io("watch", raw))?);
        }
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that closes one file while another stays open: the closed one is finished
    /// (and removed) before the writer exits, and both come out whole.
    #[test]
    fn files_are_finished_as_they_close_and_whole_at_exit() {
        let root = tempfile::tempdir().unwrap();
        let raw = root.path().join("raw");
        fs::create_dir(&raw).unwrap();
        let watch = Watch::new(&raw).unwrap();
        let exited = AtomicBool::new(false);
        let codec = Codec { threads: 1, ..Codec::default() };
        let first: Vec<u8> = (0..3_000_000u32).flat_map(|i| (i % 7919).to_le_bytes()).collect();
        let entries = std::thread::scope(|scope| {
            let follower = scope.spawn(|| compress(&raw, root.path(), "db", &codec, &watch, &exited));
            let mut open = File::create(raw.join("2.dat")).unwrap();
            open.write_all(b"part one\n").unwrap();
            let mut closing = File::create(raw.join("1.dat")).unwrap();
            for chunk in first.chunks(100_000) {
                closing.write_all(chunk).unwrap();
            }
            drop(closing);
            // The closed file is finished while the other is still open.
            while raw.join("1.dat").exists() && !follower.is_finished() {
                std::thread::yield_now();
            }
            open.write_all(b"part two\n").unwrap();
            drop(open);
            exited.store(true, Ordering::Release);
            follower.join().unwrap().unwrap()
        });
        assert_eq!(entries.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(), ["db/1.dat.zst", "db/2.dat.zst"]);
        let decoded = |entry: &FileEntry| {
            let mut out = Vec::new();
            crate::artifact::check(root.path(), entry).unwrap();
            crate::artifact::decompress(root.path(), entry, None, &mut out).unwrap();
            out
        };
        assert_eq!(decoded(&entries[0]), first);
        assert_eq!(decoded(&entries[1]), b"part one\npart two\n");
        assert_eq!(fs::read_dir(&raw).unwrap().count(), 0);
    }
}
