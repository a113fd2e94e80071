//! All output goes through here: data on stdout, messages for people on stderr. Colour
//! follows `--color` (`auto`: a terminal, human mode, `NO_COLOR` unset); progress lines are
//! drawn on a terminal in human mode (`NO_COLOR` is about colour only).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use upshift_core::manifest::redact_secrets;

use crate::cli::{ColorChoice, Output};

pub(crate) struct Printer {
    output: Output,
    verbose: u8,
    color: bool,
    /// Progress lines are drawn: human mode, stderr a terminal.
    live: bool,
}

impl Printer {
    pub(crate) fn new(output: Output, verbose: u8, color: ColorChoice) -> Printer {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let live = output == Output::Human && std::io::stderr().is_terminal();
        let color = match color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => live && !no_color,
        };
        Printer { output, verbose, color, live }
    }

    /// A progress display on stderr, when output is live (a terminal, human mode).
    pub(crate) fn progress_bar(&self) -> Option<Arc<ProgressLine>> {
        self.live.then(|| Arc::new(ProgressLine { state: Mutex::new(None) }))
    }

    pub(crate) fn is_json(&self) -> bool {
        self.output == Output::Json
    }

    /// Prints the command's result: `human` in human mode, `json` as one document in json mode.
    /// A reader that went away (`upshift ... | head`) is not an error.
    pub(crate) fn result<T: Serialize>(&self, json: &T, human: impl FnOnce() -> String) -> anyhow::Result<()> {
        match self.write_result(json, human) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            result => Ok(result?),
        }
    }

    /// Prints a generated document (a completion script, a manual page) on stdout as it is,
    /// or in json mode as `{"document": "..."}`; a reader that went away is not an error.
    pub(crate) fn document(&self, bytes: &[u8]) -> anyhow::Result<()> {
        if self.is_json() {
            let text = String::from_utf8_lossy(bytes);
            return self.result(&serde_json::json!({ "document": text }), String::new);
        }
        let mut stdout = std::io::stdout().lock();
        match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            result => Ok(result?),
        }
    }

    fn write_result<T: Serialize>(&self, json: &T, human: impl FnOnce() -> String) -> std::io::Result<()> {
        let mut stdout = std::io::stdout().lock();
        if self.is_json() {
            let text = serde_json::to_string_pretty(json).map_err(std::io::Error::other)?;
            writeln!(stdout, "{}", redact_secrets(&text))?;
        } else {
            let text = redact_secrets(&human());
            write!(stdout, "{text}")?;
            if !text.is_empty() && !text.ends_with('\n') {
                writeln!(stdout)?;
            }
        }
        Ok(())
    }

    /// A progress line for people (stderr, human mode only).
    pub(crate) fn progress(&self, line: &str) {
        if !self.is_json() {
            eprintln!("{}", redact_secrets(line));
        }
    }

    /// A detail shown with `-v`.
    pub(crate) fn verbose(&self, line: &str) {
        if self.verbose > 0 && !self.is_json() {
            eprintln!("{}", redact_secrets(line));
        }
    }

    pub(crate) fn warn(&self, line: &str) {
        eprintln!("{}: {}", self.paint("warning", "33"), redact_secrets(line));
    }

    /// `error:`, then a `Caused by:` line per cause, then a `hint:` when there is one.
    pub(crate) fn error(&self, error: &anyhow::Error) {
        let mut stderr = std::io::stderr().lock();
        let _ = writeln!(stderr, "{}: {}", self.paint("error", "31;1"), redact_secrets(&error.to_string()));
        for cause in error.chain().skip(1) {
            let _ = writeln!(stderr, "  {} {}", self.paint("Caused by:", "31"), redact_secrets(&cause.to_string()));
        }
        if let Some(hint) = crate::exit::hint(error) {
            let _ = writeln!(stderr, "{}: {hint}", self.paint("hint", "36;1"));
        }
    }

    fn paint(&self, text: &str, code: &str) -> String {
        if self.color { format!("\x1b[{code}m{text}\x1b[0m") } else { text.to_owned() }
    }
}

/// One self-rewriting line on stderr: phase, bytes, rate and ETA.
pub(crate) struct ProgressLine {
    state: Mutex<Option<Phase>>,
}

struct Phase {
    what: String,
    total: Option<u64>,
    done: u64,
    started: Instant,
    drawn_at: Instant,
}

fn mebibytes(bytes: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let bytes = bytes as f64;
    bytes / 1_048_576.0
}

/// The text of a progress line.
fn render(what: &str, done: u64, total: Option<u64>, elapsed: Duration) -> String {
    let seconds = elapsed.as_secs_f64().max(0.001);
    let rate = mebibytes(done) / seconds;
    match total {
        Some(total) if total > 0 && done > 0 => {
            let left = mebibytes(total.saturating_sub(done)) / rate.max(0.001);
            format!(
                "{what}: {:.1} of {:.1} MiB, {rate:.1} MiB/s, ETA {}s",
                mebibytes(done),
                mebibytes(total),
                left.ceil()
            )
        }
        _ if done > 0 => format!("{what}: {:.1} MiB, {rate:.1} MiB/s", mebibytes(done)),
        _ => format!("{what}..."),
    }
}

impl ProgressLine {
    fn draw(phase: &Phase) {
        let line = render(&phase.what, phase.done, phase.total, phase.started.elapsed());
        eprint!("\r\x1b[2K{line}");
    }

    /// Ends the line, leaving the last state visible.
    pub(crate) fn finish(&self) {
        if let Some(phase) = self.state.lock().expect("progress lock").take() {
            Self::draw(&phase);
            eprintln!();
        }
    }
}

impl upshift_backup::Progress for ProgressLine {
    fn phase(&self, what: &str, total: Option<u64>) {
        let mut state = self.state.lock().expect("progress lock");
        if let Some(previous) = state.take() {
            Self::draw(&previous);
            eprintln!();
        }
        let now = Instant::now();
        let phase = Phase { what: what.to_owned(), total, done: 0, started: now, drawn_at: now };
        Self::draw(&phase);
        *state = Some(phase);
    }

    fn advance(&self, bytes: u64) {
        let mut state = self.state.lock().expect("progress lock");
        if let Some(phase) = state.as_mut() {
            phase.done += bytes;
            if phase.drawn_at.elapsed() >= Duration::from_millis(100) {
                phase.drawn_at = Instant::now();
                Self::draw(phase);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines() {
        assert_eq!(render("dumping", 0, None, Duration::from_secs(1)), "dumping...");
        assert_eq!(render("saving", 3 << 20, None, Duration::from_secs(2)), "saving: 3.0 MiB, 1.5 MiB/s");
        assert_eq!(
            render("compressing", 10 << 20, Some(40 << 20), Duration::from_secs(2)),
            "compressing: 10.0 of 40.0 MiB, 5.0 MiB/s, ETA 6s"
        );
    }
}
