//! `notes`: the example service that upshift deploys in its tests and its demo.
//!
//! A small HTTP/1.1 JSON API over SQLite or PostgreSQL, one codebase for three releases:
//! - `1.0.0` reads and writes `notes(id, title, body)`;
//! - `2.0.0` needs the `tags` table of an expand migration and never touches `notes.title`,
//!   which its contract migration drops;
//! - `3.0.0` serves like 2.0.0 but its health check always fails, to show an automatic
//!   rollback.
//!
//! The service never creates its schema: the migrations in [`MIGRATIONS`] do, run by upshift.
//! No async runtime: a thread per connection, a small request parser, and a graceful stop on
//! SIGTERM or SIGINT.

mod api;
mod database;
mod error;
mod http;
mod release;
mod server;
mod settings;

pub use database::DatabaseUrl;
pub use error::Error;
pub use release::Release;
pub use server::{GRACE, Server, Shutdown, serve};
pub use settings::{Command, Settings, USAGE};

/// The migrations of the example, in upshift's format, as `(file name, contents)` in id order.
pub const MIGRATIONS: &[(&str, &str)] = &[
    ("20260101000000_create_notes.sql", include_str!("../migrations/20260101000000_create_notes.sql")),
    ("20260201000000_add_tags.sql", include_str!("../migrations/20260201000000_add_tags.sql")),
    ("20260202000000_drop_note_title.sql", include_str!("../migrations/20260202000000_drop_note_title.sql")),
];

/// The releases this binary can run as, oldest first.
pub const RELEASES: &[&str] = &["1.0.0", "2.0.0", "3.0.0"];

/// The whole program: read the command line, serve, turn the result into an exit code.
/// `upshift` calls it too when a copy of it is named `notes` (see `upshift demo`).
pub fn main() -> std::process::ExitCode {
    use std::io::Write;
    let result = Command::from_env().and_then(|command| match command {
        Command::Serve(settings) => serve(&settings),
        Command::Help => {
            let _ = writeln!(std::io::stderr(), "{USAGE}");
            Ok(())
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            let mut stderr = std::io::stderr().lock();
            let _ = writeln!(stderr, "error: {error}");
            if let Error::Usage(_) = error {
                let _ = writeln!(stderr, "\n{USAGE}");
            }
            std::process::ExitCode::from(error.exit_code())
        }
    }
}
