//! The `upshift` binary: parse, run, turn the result into an exit code.

mod cli;
mod commands;
mod exit;
mod printer;
mod settings;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let printer = printer::Printer::new(cli.global.output, cli.global.verbose);
    match commands::run(&cli, &printer) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            printer.error(&error);
            ExitCode::from(exit::code(&error))
        }
    }
}
