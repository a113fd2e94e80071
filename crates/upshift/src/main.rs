//! The `upshift` binary: parse, run, turn the result into an exit code.

mod cli;
mod commands;
mod exit;
mod printer;
mod settings;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // A copy of (or link to) this binary named `notes` is the bundled example service, so
    // `upshift demo` needs nothing but this one binary.
    if std::env::args_os()
        .next()
        .is_some_and(|argv0| std::path::Path::new(&argv0).file_name() == Some("notes".as_ref()))
    {
        return notes::main();
    }
    let cli = cli::Cli::parse();
    let printer = printer::Printer::new(cli.global.output, cli.global.verbose, cli.global.color);
    match commands::run(&cli, &printer) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            printer.error(&error);
            ExitCode::from(exit::code(&error))
        }
    }
}
