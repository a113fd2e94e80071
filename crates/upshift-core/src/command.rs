//! Running a command with a time limit (smoke commands, command health checks).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Output kept of a command, at most.
const KEEP: usize = 64 * 1024;

/// Runs `argv` with no stdin and at most `timeout`; returns its stdout and stderr (the
/// first 64 KiB) when it exits 0, or says how it failed, with that output.
pub fn run(argv: &[String], timeout: Duration) -> Result<String, String> {
    let (program, rest) = argv.split_first().ok_or("empty command")?;
    let mut child = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    // Both pipes are read while the command runs, so one that prints more than a pipe holds
    // (64 KiB) does not block on a full pipe until its timeout. Past KEEP it is drained.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            if let Some(mut pipe) = pipe {
                let mut buffer = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut buffer) {
                    if n == 0 {
                        break;
                    }
                    let room = KEEP.saturating_sub(kept.len());
                    kept.extend_from_slice(&buffer[..n.min(room)]);
                }
            }
            kept
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("`{}` took longer than {}", argv.join(" "), humantime::format_duration(timeout)));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut text = String::from_utf8_lossy(&stdout.join().unwrap_or_default()).into_owned();
    text.push_str(&String::from_utf8_lossy(&stderr.join().unwrap_or_default()));
    let mut cut = text.len().min(KEEP);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    if status.success() { Ok(text) } else { Err(format!("`{}` exited with {status}: {}", argv.join(" "), text.trim())) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a command printing more than a pipe holds hung until its timeout.
    #[test]
    fn a_command_that_prints_a_lot_finishes() {
        let argv: Vec<String> = ["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' x; echo done >&2"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        // Before, it blocked on the full pipe and failed with "took longer than 20s".
        let output = run(&argv, Duration::from_secs(20)).unwrap();
        assert_eq!(output.len(), KEEP, "the first 64 KiB are kept");
        assert!(output.bytes().all(|b| b == b'x'));
    }
}
