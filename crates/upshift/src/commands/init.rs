//! `upshift init`: a commented starting manifest and a migrations folder.

use std::fs;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use serde::Serialize;

use crate::cli::GlobalArgs;
use crate::exit::UsageError;
use crate::printer::Printer;

/// The starting manifest; `{name}` is the application's name.
const TEMPLATE: &str = r#"# upshift.toml: how this application is upgraded.
# `upshift plan --to VERSION` shows every step an upgrade would take; `upshift migrate` and
# `upshift backup` work on their own too.

[app]
name = "{name}"
# state_dir = ".upshift"            # journal, lock, agent socket

[database]
url = "sqlite:{name}.db"
# url = "${DATABASE_URL}"           # ${VAR} is read from the environment and never printed
migrations = "migrations"           # `upshift migrate new SLUG` writes revisions here

[backup]
dir = ".upshift/backups"
keep_last = 5
# keep_within = "7d"
# paths = ["config/"]               # files and folders saved beside the database
# encrypt_to = ["age1..."]          # age recipients; verify and restore with --identity FILE

# [[components]]
# name = "api"
# driver = "process"                # process (compose | kubernetes | helm later)
# run = ["releases/{version}/{name}", "--listen", "{addr}"]
# serve = "127.0.0.1:8080"          # the stable address; the agent's proxy holds it
# strategy = "blue-green"           # recreate | rolling | blue-green | canary
# health = { http = "/health", interval = "250ms", timeout = "2s", healthy_after = 3, deadline = "30s" }
# drain = "10s"

# [verify]
# smoke = [["curl", "-fsS", "http://127.0.0.1:8080/health"]]

[[releases]]
version = "1.0.0"
summary = "The first release upshift deploys"
# upgrade_from = ">=0.9.0"          # semver requirement on the deployed version
# migrate_to = "20261122093000"     # the revision this release's schema is at (default: the head)
# breaking = ["..."]
# deprecated = [{ what = "GET /api/old", removed_in = "2.0.0", instead = "GET /api/v2" }]
# config_added = [{ name = "MAX_SIZE", default = "1MiB", required = false, doc = "..." }]
# config_removed = ["LEGACY_MODE"]
# config_changed = [{ name = "workers", from = "1", to = "2", why = "throughput" }]
"#;

#[derive(Serialize)]
struct InitJson<'a> {
    manifest: &'a str,
    migrations: &'a str,
}

pub(crate) fn run(global: &GlobalArgs, name: Option<&str>, printer: &Printer) -> anyhow::Result<()> {
    let path = global.config.clone().unwrap_or_else(|| PathBuf::from("upshift.toml"));
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).map_or_else(|| PathBuf::from("."), PathBuf::from);
    let name = match name {
        Some(name) => name.to_owned(),
        None => fs::canonicalize(&folder)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "app".to_owned()),
    };
    let name: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' }).collect();
    let mut file = match fs::OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(
                UsageError(format!("{} already exists; upshift init never overwrites it", path.display())).into()
            );
        }
        Err(e) => return Err(e).with_context(|| format!("could not create {}", path.display())),
    };
    // `{version}` and `{addr}` are the manifest's own placeholders and stay as they are.
    file.write_all(TEMPLATE.replace("{name}", &name).as_bytes())
        .with_context(|| format!("could not write {}", path.display()))?;
    let migrations = folder.join("migrations");
    fs::create_dir_all(&migrations).with_context(|| format!("could not create {}", migrations.display()))?;
    printer.result(
        &InitJson { manifest: &path.to_string_lossy(), migrations: &migrations.to_string_lossy() },
        || {
            format!(
                "wrote {} and {}/\nnext: `upshift migrate new SLUG` for a revision, `upshift plan --to 1.0.0` for the plan\n",
                path.display(),
                migrations.display()
            )
        },
    )
}
