//! The command line, as clap derive types. Flags only: settings are resolved in
//! [`crate::settings`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// One safe command for application upgrades: check, back up, migrate, roll out, verify,
/// and undo when anything fails.
#[derive(Debug, Parser)]
#[command(name = "upshift", version, propagate_version = true, max_term_width = 100)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: GlobalArgs,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Args)]
pub(crate) struct GlobalArgs {
    /// The manifest [default: ./upshift.toml, when it exists]
    #[arg(long, global = true, value_name = "PATH", env = "UPSHIFT_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// `json` prints one JSON document on stdout, for scripts and CI
    #[arg(long, global = true, value_enum, default_value_t = Output::Human)]
    pub(crate) output: Output,
    /// Say more about what is done (repeat for more)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,
    /// Answer yes to every confirmation
    #[arg(long, global = true)]
    pub(crate) yes: bool,
    /// Colour on stderr: `auto` on a terminal unless `NO_COLOR` is set
    #[arg(long, global = true, value_enum, value_name = "WHEN", default_value_t = ColorChoice::Auto)]
    pub(crate) color: ColorChoice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Print a shell completion script (e.g. `upshift completions bash > /etc/bash_completion.d/upshift`)
    Completions {
        /// The shell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page, in roff (e.g. `upshift man | man -l -`)
    Man,
    /// The schema engine on its own (also usable without a manifest)
    Migrate(MigrateArgs),
    /// The backup engine on its own
    Backup(BackupArgs),
    /// Write a commented upshift.toml and a migrations folder
    Init {
        /// The application's name [default: this folder's name]
        #[arg(long)]
        name: Option<String>,
    },
    /// Upgrade to a release: check, back up, migrate, roll out, verify; undo on failure
    Upgrade(TargetArgs),
    /// The deployed version, its health, and any run in flight
    Status {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// The release revisions, like `helm history`
    History,
    /// Back to the previous release (or a given revision)
    Rollback {
        /// The revision to go back to [default: the one before the deployed one]
        #[arg(long, value_name = "N", conflicts_with = "only")]
        to_revision: Option<i64>,
        /// Put back the previous version of this component alone (code only)
        #[arg(long, value_name = "COMPONENT")]
        only: Option<String>,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Finish the run a crash left in the journal
    Resume {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Undo the run a crash (or a failed undo) left in the journal
    Abort {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// The local supervisor of the process driver (started detached by the commands that need it)
    Agent {
        /// The state dir [else the manifest's, else .upshift]
        #[arg(long, global = true, value_name = "PATH")]
        state_dir: Option<PathBuf>,
        /// Start it in the background and return once it answers
        #[arg(long)]
        detach: bool,
        #[command(subcommand)]
        command: Option<AgentCommand>,
    },
    /// Write the notes example deployment and run its whole story under load
    Demo {
        /// Where to write it
        #[arg(long, value_name = "D", default_value = "upshift-demo")]
        dir: PathBuf,
        /// The port the service is served on [default: 18080, or a free one when it is taken]
        #[arg(long, value_name = "P")]
        port: Option<u16>,
        /// A PostgreSQL database to use instead of a SQLite file
        #[arg(long, value_name = "URL")]
        database_url: Option<String>,
        /// Write the deployment and stop, to drive it by hand
        #[arg(long)]
        prepare_only: bool,
        /// Run it as a Docker Compose stack (needs Docker with Compose v2; images are made
        /// from this binary)
        #[arg(long)]
        compose: bool,
    },
    /// The upgrade guide for a range of releases, in Markdown
    Guide {
        /// The deployed version the guide starts from
        #[arg(long, value_name = "VERSION")]
        from: String,
        /// The release it goes to
        #[arg(long, value_name = "VERSION")]
        to: String,
    },
    /// Configuration checks against the releases' declared options
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Dry run: every step an upgrade would take, and what a failure at each would undo
    Plan(TargetArgs),
}

/// Where an upgrade goes: `upgrade` and `plan` take the same arguments.
#[derive(Debug, Args)]
pub(crate) struct TargetArgs {
    /// The release to upgrade to
    #[arg(long, value_name = "VERSION")]
    pub(crate) to: String,
    /// Skip the backup (recorded; a failure that needs a restore then cannot be undone: exit 4)
    #[arg(long)]
    pub(crate) no_backup: bool,
    /// Deploy only this component (repeatable); code only: refused when the release migrates the schema
    #[arg(long, value_name = "COMPONENT")]
    pub(crate) only: Vec<String>,
    #[command(flatten)]
    pub(crate) database: DatabaseArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Required options missing, removed options still set, unknown options
    Check {
        /// The release to check against
        #[arg(long, value_name = "VERSION")]
        to: String,
        /// A KEY=VALUE file with the application's configuration [default: the environment and the components' env]
        #[arg(long, value_name = "FILE")]
        env_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum AgentCommand {
    /// Stop the agent and every process it supervises
    Stop,
    /// Write a component's output (on stdin) to its log, rotating it (started by the agent)
    #[command(hide = true)]
    Log {
        /// The log file
        path: PathBuf,
    },
}

#[derive(Debug, Args)]
pub(crate) struct BackupArgs {
    #[command(flatten)]
    pub(crate) database: DatabaseArgs,
    /// The backup folder [else the manifest's `[backup] dir`, else .upshift/backups]
    #[arg(long, global = true, value_name = "PATH")]
    pub(crate) backup_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: BackupCommand,
}

#[derive(Debug, Subcommand)]
pub(crate) enum BackupCommand {
    /// Back up the database and the saved paths
    Create {
        /// A note shown by `list`
        #[arg(long)]
        label: Option<String>,
        /// A file or folder to save (repeatable) [else the manifest's `[backup] paths`]
        #[arg(long = "path", value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// The backups, oldest first
    List,
    /// Check a backup's checksums, decompress it all and read the whole dump
    Verify {
        /// A backup id, or `latest`
        id: String,
        /// Also restore it into a scratch database and compare row counts
        #[arg(long)]
        deep: bool,
        /// An age identity file, for an encrypted backup
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
    },
    /// Restore a backup (atomically: a failure leaves the target as it was)
    Restore {
        /// A backup id, or `latest`
        id: String,
        /// The database to restore into [default: the database URL]
        #[arg(long, value_name = "URL", hide_env_values = true)]
        target_url: Option<String>,
        /// Replace a target that holds data
        #[arg(long)]
        force: bool,
        /// An age identity file, for an encrypted backup
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
    },
    /// Remove backups the retention policy does not keep, and leftovers of interrupted ones
    Prune {
        /// Keep the newest N [else the manifest's `keep_last`]
        #[arg(long, value_name = "N")]
        keep_last: Option<usize>,
        /// Keep every backup younger than this, e.g. 7d [else the manifest's `keep_within`]
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        keep_within: Option<Duration>,
    },
}

/// Which database.
#[derive(Debug, Args)]
pub(crate) struct DatabaseArgs {
    /// postgres://user:pass@host:port/db or sqlite:PATH [else the manifest's, then `DATABASE_URL`]
    #[arg(long, global = true, value_name = "URL", env = "UPSHIFT_DATABASE_URL", hide_env_values = true)]
    pub(crate) database_url: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct MigrateArgs {
    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
    #[command(subcommand)]
    pub(crate) command: MigrateCommand,
}

/// Where the database and the migrations are.
#[derive(Debug, Args)]
pub(crate) struct ConnectArgs {
    #[command(flatten)]
    pub(crate) database: DatabaseArgs,
    /// The migrations folder [else the manifest's, else ./migrations]
    #[arg(long, global = true, value_name = "PATH")]
    pub(crate) dir: Option<PathBuf>,
    /// How long to wait for another run's lock before giving up
    #[arg(long, global = true, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) lock_timeout: Duration,
}

#[derive(Debug, Subcommand)]
pub(crate) enum MigrateCommand {
    /// Write a new revision file whose parents are the current heads
    New {
        /// What the revision does, in a few words (becomes the file name)
        slug: String,
        /// expand: the old code still works after it; contract: removes what the old code needs
        #[arg(long, value_enum, default_value_t = PhaseArg::Expand)]
        phase: PhaseArg,
    },
    /// Applied, pending, heads and current revisions
    Status,
    /// The revision graph, newest first, applied ones marked
    History,
    /// The revisions no revision follows
    Heads,
    /// Apply pending revisions
    Up {
        /// A revision id, +N, or heads
        #[arg(default_value = "heads", allow_hyphen_values = true)]
        target: String,
    },
    /// Revert applied revisions
    Down {
        /// A revision id (it stays applied), -N, or base
        #[arg(allow_hyphen_values = true)]
        target: String,
    },
    /// Write a merge revision over the current heads
    Merge {
        /// What the merge is for (becomes the file name)
        #[arg(short, long)]
        message: Option<String>,
    },
    /// Print the exact SQL of a range, offline: nothing is executed
    Sql {
        /// Which way
        #[arg(value_enum, default_value_t = Way::Up)]
        way: Way,
        /// up: a revision id, +N or heads (from base); down: a revision id, -N or base (from the heads)
        #[arg(allow_hyphen_values = true)]
        target: Option<String>,
    },
    /// Check the checksums of applied revisions against the files
    Verify,
    /// Report what revisions would do to the code running beside them (locks that stall it,
    /// renames and drops that break it), each with the safe rewrite; offline
    Lint {
        /// The revisions to lint [default: every revision in the folder]
        revisions: Vec<String>,
    },
    /// Mark an existing schema as being at a revision, without running anything
    Baseline {
        /// The revision the schema is at; it and everything before it are recorded
        id: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum PhaseArg {
    Expand,
    Contract,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Way {
    Up,
    Down,
}
