//! Running a command with a time limit (smoke commands, command health checks).

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
    let started = Instant::now();
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("`{}` took longer than {}", argv.join(" "), humantime::format_duration(timeout)));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    let mut cut = text.len().min(KEEP);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    if output.status.success() {
        Ok(text)
    } else {
        Err(format!("`{}` exited with {}: {}", argv.join(" "), output.status, text.trim()))
    }
}
