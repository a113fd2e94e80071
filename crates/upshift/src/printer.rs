//! All output goes through here: data on stdout, messages for people on stderr, colour
//! only on a terminal and never when `NO_COLOR` is set or in json mode.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{IsTerminal, Write};

use serde::Serialize;

use crate::cli::Output;

pub(crate) struct Printer {
    output: Output,
    verbose: u8,
    color: bool,
}

impl Printer {
    pub(crate) fn new(output: Output, verbose: u8) -> Printer {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Printer { output, verbose, color: output == Output::Human && !no_color && std::io::stderr().is_terminal() }
    }

    pub(crate) fn is_json(&self) -> bool {
        self.output == Output::Json
    }

    /// Prints the command's result: `human` in human mode, `json` as one document in json mode.
    pub(crate) fn result<T: Serialize>(&self, json: &T, human: impl FnOnce() -> String) -> anyhow::Result<()> {
        let mut stdout = std::io::stdout().lock();
        if self.is_json() {
            serde_json::to_writer_pretty(&mut stdout, json)?;
            writeln!(stdout)?;
        } else {
            let text = human();
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
            eprintln!("{line}");
        }
    }

    /// A detail shown with `-v`.
    pub(crate) fn verbose(&self, line: &str) {
        if self.verbose > 0 && !self.is_json() {
            eprintln!("{line}");
        }
    }

    pub(crate) fn warn(&self, line: &str) {
        eprintln!("{}: {line}", self.paint("warning", "33"));
    }

    /// `error:`, then a `Caused by:` line per cause, then a `hint:` when there is one.
    pub(crate) fn error(&self, error: &anyhow::Error) {
        let mut stderr = std::io::stderr().lock();
        let _ = writeln!(stderr, "{}: {error}", self.paint("error", "31;1"));
        for cause in error.chain().skip(1) {
            let _ = writeln!(stderr, "  {} {cause}", self.paint("Caused by:", "31"));
        }
        if let Some(hint) = crate::exit::hint(error) {
            let _ = writeln!(stderr, "{}: {hint}", self.paint("hint", "36;1"));
        }
    }

    fn paint(&self, text: &str, code: &str) -> String {
        if self.color { format!("\x1b[{code}m{text}\x1b[0m") } else { text.to_owned() }
    }
}
