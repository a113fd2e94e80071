//! The writer of a component's log: a small process (`upshift agent log PATH`) that reads
//! the component's output from a pipe and appends it to its log, rotating it to `PATH.1`
//! once it passes 10 MiB (`UPSHIFT_LOG_LIMIT` bytes, when set) by renaming the file and
//! opening a new one. It owns the file, so a rotation loses no line (copying then
//! truncating a file the component writes to itself lost what came in between), and the
//! agent does no log work. It runs in its own process group, outside the component's, so
//! stopping the component does not stop it: it ends when the last writer of the pipe
//! closes it, after writing everything. It does not depend on the agent either, so it lives
//! on through an agent restart with the component it serves.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The size past which a log is rotated, when `UPSHIFT_LOG_LIMIT` does not say.
pub const DEFAULT_LIMIT: u64 = 10 * 1024 * 1024;

fn open(path: &Path) -> io::Result<(File, u64)> {
    let file = OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
    let size = file.metadata()?.len();
    Ok((file, size))
}

/// Copies `input` into the log at `path` until the end of `input`, rotating at `limit`.
pub fn run(path: &Path, input: &mut dyn Read, limit: u64) -> io::Result<()> {
    let (mut file, mut size) = open(path)?;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match input.read(&mut buffer) {
            Ok(0) => return file.flush(),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // Rotate at a line boundary when the chunk has one, so a line is never split
        // across the two files.
        let chunk = &buffer[..n];
        let split =
            if size + n as u64 > limit { chunk.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1) } else { n };
        file.write_all(&chunk[..split])?;
        size += split as u64;
        if split < n || size > limit {
            file.flush()?;
            std::fs::rename(path, path.with_extension("log.1"))?;
            (file, size) = open(path)?;
            file.write_all(&chunk[split..])?;
            size += (n - split) as u64;
        }
    }
}

/// The rotation limit: `UPSHIFT_LOG_LIMIT` bytes, else [`DEFAULT_LIMIT`].
pub fn limit() -> u64 {
    std::env::var("UPSHIFT_LOG_LIMIT").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_LIMIT)
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;

    #[test]
    fn rotation_keeps_every_line_whole() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("api-1.0.0.log");
        let text = (0..500).fold(String::new(), |mut text, i| {
            let _ = writeln!(text, "line {i}");
            text
        });
        run(&log, &mut text.as_bytes(), 1000).unwrap();
        let previous = std::fs::read_to_string(log.with_extension("log.1")).unwrap();
        let current = std::fs::read_to_string(&log).unwrap();
        let kept = previous + &current;
        assert!(text.ends_with(&kept), "the last two files are the end of the output, whole");
        assert!(current.len() <= 1000 && kept.lines().all(|l| l.starts_with("line ")));
        let numbers: Vec<usize> = kept.lines().map(|l| l[5..].parse().unwrap()).collect();
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "no line lost at a rotation");
    }
}
