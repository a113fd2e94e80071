//! One module per command; each resolves its settings, calls the libraries, and prints
//! through the [`Printer`].

mod backup;
mod graph_lines;
mod init;
mod migrate;
mod plan;

use crate::cli::{Cli, Command};
use crate::printer::Printer;

pub(crate) fn run(cli: &Cli, printer: &Printer) -> anyhow::Result<()> {
    match &cli.command {
        Command::Migrate(args) => migrate::run(&cli.global, args, printer),
        Command::Backup(args) => backup::run(&cli.global, args, printer),
        Command::Init { name } => init::run(&cli.global, name.as_deref(), printer),
        Command::Plan { to, no_backup, database } => plan::run(&cli.global, to, *no_backup, database, printer),
    }
}
