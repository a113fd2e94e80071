//! One module per command; each resolves its settings, calls the libraries, and prints
//! through the [`Printer`].

mod agent;
mod backup;
mod demo;
mod demo_compose;
mod graph_lines;
mod guide;
mod init;
mod migrate;
mod plan;
mod run;

use crate::cli::{Cli, Command};
use crate::printer::Printer;

pub(crate) fn run(cli: &Cli, printer: &Printer) -> anyhow::Result<()> {
    match &cli.command {
        Command::Migrate(args) => migrate::run(&cli.global, args, printer),
        Command::Backup(args) => backup::run(&cli.global, args, printer),
        Command::Init { name } => init::run(&cli.global, name.as_deref(), printer),
        Command::Guide { from, to } => guide::guide(&cli.global, from, to, printer),
        Command::Config { command: crate::cli::ConfigCommand::Check { to, env_file } } => {
            guide::config_check(&cli.global, to, env_file.as_deref(), printer)
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut command, "upshift", &mut script);
            printer.document(&script)
        }
        Command::Man => {
            let mut page = Vec::new();
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut page)?;
            printer.document(&page)
        }
        Command::Demo { dir, port, database_url, prepare_only, compose } => demo::run(
            &demo::DemoArgs {
                dir,
                port: *port,
                database_url: database_url.as_deref(),
                prepare_only: *prepare_only,
                compose: *compose,
            },
            printer,
        ),
        Command::Plan(target) => plan::run(&cli.global, target, printer),
        Command::Upgrade(target) => run::upgrade(&cli.global, target, printer),
        Command::Status { database } => run::status(&cli.global, database, printer),
        Command::History => run::history(&cli.global, printer),
        Command::Rollback { to_revision, only, database } => {
            run::rollback(&cli.global, *to_revision, only.as_deref(), database, printer)
        }
        Command::Resume { database } => run::resume(&cli.global, database, printer),
        Command::Abort { database } => run::abort(&cli.global, database, printer),
        Command::Agent { state_dir, detach, command } => {
            agent::run(&cli.global, state_dir.as_deref(), *detach, command.as_ref(), printer)
        }
    }
}
