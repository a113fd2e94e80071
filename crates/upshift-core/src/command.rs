//! Running a command with a time limit (smoke commands, command health checks, hooks,
//! preflight checks, notification commands).

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Output kept of a command, at most.
const KEEP: usize = 64 * 1024;

/// How a command ran to its end.
#[derive(Debug)]
pub struct Finished {
    /// Its exit status.
    pub status: ExitStatus,
    /// Its stdout then stderr (the first 64 KiB of each).
    pub output: String,
}

/// What a command gets besides its argv.
#[derive(Default)]
pub struct Options<'a> {
    /// Variables added to upshift's environment.
    pub env: &'a [(String, String)],
    /// Written to its stdin (else stdin is empty).
    pub stdin: Option<&'a [u8]>,
    /// A file its stdin reads instead.
    pub stdin_file: Option<&'a std::path::Path>,
    /// A new file its stdout goes to instead of being kept (its output is then stderr).
    pub stdout_file: Option<&'a std::path::Path>,
}

/// Runs `argv` with no stdin and at most `timeout`; returns its stdout and stderr (the
/// first 64 KiB) when it exits 0, or says how it failed, with that output.
pub fn run(argv: &[String], timeout: Duration) -> Result<String, String> {
    run_with(argv, timeout, &Options::default())?.success(argv)
}

impl Finished {
    /// Its output when it exited 0, else how `argv` failed, with that output.
    pub fn success(self, argv: &[String]) -> Result<String, String> {
        if self.status.success() {
            Ok(self.output)
        } else {
            Err(format!("`{}` exited with {}: {}", argv.join(" "), self.status, self.output.trim()))
        }
    }
}

/// Runs `argv` in a process group of its own for at most `timeout` (then the whole group
/// is killed: a shell's children too) and returns how it ended, whatever its exit code.
pub fn run_with(argv: &[String], timeout: Duration, options: &Options<'_>) -> Result<Finished, String> {
    let (program, rest) = argv.split_first().ok_or("empty command")?;
    let open = |path: &std::path::Path, write: bool| {
        let mut file = std::fs::OpenOptions::new();
        if write {
            std::os::unix::fs::OpenOptionsExt::mode(file.write(true).create_new(true), 0o600);
        } else {
            file.read(true);
        }
        file.open(path).map_err(|e| format!("{}: {e}", path.display()))
    };
    let stdin = match (options.stdin, options.stdin_file) {
        (Some(_), _) => Stdio::piped(),
        (None, Some(path)) => Stdio::from(open(path, false)?),
        (None, None) => Stdio::null(),
    };
    let stdout = match options.stdout_file {
        Some(path) => Stdio::from(open(path, true)?),
        None => Stdio::piped(),
    };
    let mut child = Command::new(program)
        .args(rest)
        .envs(options.env.iter().map(|(k, v)| (k, v)))
        .stdin(stdin)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    if let (Some(mut pipe), Some(input)) = (child.stdin.take(), options.stdin) {
        let input = input.to_vec();
        // A command that does not read its stdin must not block us: write from a thread.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
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
            kill_group(child.id());
            let _ = child.wait();
            return Err(format!("`{}` took longer than {}", argv.join(" "), humantime::format_duration(timeout)));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // A child left running in the group keeps the pipes open: it goes with its leader.
    let drained = Instant::now();
    while !(stdout.is_finished() && stderr.is_finished()) {
        if drained.elapsed() > Duration::from_millis(200) {
            kill_group(child.id());
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut text = String::from_utf8_lossy(&stdout.join().unwrap_or_default()).into_owned();
    text.push_str(&String::from_utf8_lossy(&stderr.join().unwrap_or_default()));
    let mut cut = text.len().min(KEEP);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    Ok(Finished { status, output: text })
}

/// SIGKILL to the process group `leader` leads (gone already: nothing happens).
fn kill_group(leader: u32) {
    // `kill -KILL -PGID` without unsafe code: the group is the leader's pid.
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{leader}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
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
