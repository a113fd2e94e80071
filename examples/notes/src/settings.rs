//! The command line: `notes --release R --listen ADDR [--database-url URL]`.

use crate::database::DatabaseUrl;
use crate::error::Error;
use crate::release::Release;

/// How to call the binary, shown by `--help` and after a usage error.
pub const USAGE: &str = "\
usage: notes --release <1.0.0|2.0.0|3.0.0> --listen <ADDR> [--database-url <URL>] [--error-percent <N>]

  --release       which release to behave as
  --listen        the address to listen on, e.g. 127.0.0.1:8080 (port 0: any free port)
  --database-url  sqlite:PATH, sqlite://PATH, postgres://user:pass@host:port/db or
                  postgresql://...; defaults to the DATABASE_URL environment variable
  --error-percent that share (0 to 100) of /api/notes requests answer 500 while /health
                  stays healthy: a faulty release, to watch a canary stop it

The service does not create its schema: run the migrations in examples/notes/migrations
first (upshift does). SIGTERM or SIGINT stops it gracefully.";

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// Serve with these settings.
    Serve(Settings),
    /// Show [`USAGE`].
    Help,
}

impl Command {
    /// Reads the process's arguments and its `DATABASE_URL`.
    pub fn from_env() -> Result<Command, Error> {
        Command::parse(std::env::args().skip(1), std::env::var("DATABASE_URL").ok())
    }

    /// Reads `args` (without the program name); `database_url_env` is the fallback URL.
    pub fn parse(args: impl IntoIterator<Item = String>, database_url_env: Option<String>) -> Result<Command, Error> {
        let mut release = None;
        let mut listen = None;
        let mut database_url = None;
        let mut error_percent = None;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            if arg == "--help" || arg == "-h" {
                return Ok(Command::Help);
            }
            let (name, inline) = match arg.split_once('=') {
                Some((name, value)) if name.starts_with("--") => (name.to_owned(), Some(value.to_owned())),
                _ => (arg.clone(), None),
            };
            let slot = match name.as_str() {
                "--release" => &mut release,
                "--listen" => &mut listen,
                "--database-url" => &mut database_url,
                "--error-percent" => &mut error_percent,
                _ => return Err(Error::Usage(format!("unknown argument `{arg}`"))),
            };
            let value = match inline {
                Some(value) => value,
                None => args.next().ok_or_else(|| Error::Usage(format!("`{name}` needs a value")))?,
            };
            *slot = Some(value);
        }

        let release = release.ok_or_else(|| Error::Usage("missing `--release`".into()))?;
        let release = Release::parse(&release).ok_or_else(|| {
            Error::Usage(format!("unknown release `{release}`: expected one of {}", crate::RELEASES.join(", ")))
        })?;
        let listen = listen.ok_or_else(|| Error::Usage("missing `--listen`, e.g. `--listen 127.0.0.1:8080`".into()))?;
        let database_url = database_url
            .or(database_url_env)
            .filter(|url| !url.is_empty())
            .ok_or_else(|| Error::Usage("no database URL: pass `--database-url` or set DATABASE_URL".into()))?;
        let database_url = DatabaseUrl::parse(&database_url).map_err(Error::Usage)?;
        let error_percent = match error_percent {
            None => 0,
            Some(text) => text
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= 100)
                .ok_or_else(|| Error::Usage(format!("`--error-percent` is 0 to 100, not `{text}`")))?,
        };
        Ok(Command::Serve(Settings { release, listen, database_url, error_percent }))
    }
}

/// Everything the service needs to start.
#[derive(Debug)]
pub struct Settings {
    /// The release to behave as.
    pub release: Release,
    /// The address to bind, as given (`host:port`).
    pub listen: String,
    /// The database to serve from.
    pub database_url: DatabaseUrl,
    /// The share of `/api/notes` requests that fail on purpose.
    pub error_percent: u8,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], env: Option<&str>) -> Result<Command, Error> {
        Command::parse(args.iter().map(|s| (*s).to_owned()), env.map(str::to_owned))
    }

    #[test]
    fn reads_flags_and_the_environment_fallback() {
        let Command::Serve(settings) =
            parse(&["--release", "2.0.0", "--listen=127.0.0.1:0"], Some("sqlite:a.db")).unwrap()
        else {
            panic!("expected serve");
        };
        assert_eq!(settings.release, Release::V2);
        assert_eq!(settings.listen, "127.0.0.1:0");
        assert_eq!(settings.database_url.to_string(), "sqlite:a.db");

        let Command::Serve(settings) =
            parse(&["--release", "1.0.0", "--listen", ":0", "--database-url", "sqlite://b.db"], Some("sqlite:a.db"))
                .unwrap()
        else {
            panic!("expected serve");
        };
        assert_eq!(settings.database_url.to_string(), "sqlite:b.db");
    }

    #[test]
    fn refuses_bad_usage() {
        let usage = |args: &[&str], env: Option<&str>| match parse(args, env) {
            Err(Error::Usage(message)) => message,
            other => panic!("expected a usage error, got {other:?}"),
        };
        assert!(usage(&["--release", "9.9.9", "--listen", ":0"], Some("sqlite:a")).contains("unknown release"));
        assert!(usage(&["--release", "1.0.0", "--listen", ":0"], None).contains("DATABASE_URL"));
        assert!(usage(&["--release", "1.0.0", "--listen", ":0"], Some("")).contains("DATABASE_URL"));
        assert!(usage(&["--release", "1.0.0", "--listen", ":0"], Some("mysql://x")).contains("unknown scheme"));
        assert!(usage(&["--listen", ":0"], Some("sqlite:a")).contains("--release"));
        assert!(usage(&["--release"], None).contains("needs a value"));
        assert!(usage(&["--verbose"], None).contains("unknown argument"));
        assert!(matches!(parse(&["--help"], None), Ok(Command::Help)));
    }
}
