//! Flags, environment and manifest resolved into the settings a command runs with.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use upshift_core::Manifest;
use upshift_core::manifest::DatabaseVia;
use upshift_migrate::DatabaseUrl;

use crate::cli::{BackupArgs, ConnectArgs, DatabaseArgs, GlobalArgs};
use crate::exit::UsageError;
use crate::printer::Printer;

/// Reads the manifest: the one `--config` names (which must exist), else `./upshift.toml`
/// when there is one. A manifest that exists is always checked, so a broken one stops
/// every command.
pub(crate) fn manifest(global: &GlobalArgs) -> anyhow::Result<Option<Manifest>> {
    let path = match &global.config {
        Some(path) => path.clone(),
        None if Path::new("upshift.toml").exists() => PathBuf::from("upshift.toml"),
        None => return Ok(None),
    };
    Ok(Some(Manifest::load(&path, |name| std::env::var(name).ok())?))
}

/// The manifest, which this command cannot do without.
pub(crate) fn required_manifest(global: &GlobalArgs) -> anyhow::Result<Manifest> {
    manifest(global)?.ok_or_else(|| {
        UsageError("no upshift.toml here: run `upshift init` to write one, or pass --config PATH".into()).into()
    })
}

/// The database URL: `--database-url` (or `UPSHIFT_DATABASE_URL`, which names upshift's
/// database on purpose), then the manifest's `[database] url`, then `DATABASE_URL`.
///
/// `DATABASE_URL` is read by many tools, so it may be left exported from other work; it
/// never silently redirects a manifest that names its own database (a manifest that wants it
/// says `url = "${DATABASE_URL}"`). When it is set and differs, a warning names both,
/// redacted. Unparsed: commands that do not need a URL must not fail on it.
pub(crate) fn database_url(
    args: &DatabaseArgs,
    manifest: Option<&Manifest>,
    printer: &Printer,
) -> anyhow::Result<Option<String>> {
    let environment = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty());
    if let Some(url) = &args.database_url {
        return Ok(Some(url.clone()));
    }
    match (manifest.and_then(|m| m.database_url.as_ref().map(|url| (m, url))), environment) {
        (Some((manifest, url)), Some(environment)) => {
            if &environment != url {
                printer.warn(&format!(
                    "DATABASE_URL ({}) is ignored: {} sets [database] url ({}); use --database-url or UPSHIFT_DATABASE_URL to override it",
                    upshift_migrate::redact(&environment),
                    manifest.path.display(),
                    manifest.redact(&upshift_migrate::redact(url))
                ));
            }
            via(manifest, url).map(Some)
        }
        (Some((manifest, url)), None) => via(manifest, url).map(Some),
        (None, environment) => Ok(environment),
    }
}

/// The manifest's URL with its host replaced by where `[database] via` says the database
/// is: a Compose service's container address, or the local end of a port-forward tunnel
/// to a pod (opened here, for as long as this command runs).
fn via(manifest: &Manifest, url: &str) -> anyhow::Result<String> {
    let address = match &manifest.database_via {
        None => return Ok(url.to_owned()),
        Some(DatabaseVia::Compose { service }) => {
            with_host(url, &upshift_deploy::service_address(manifest, service)?, None)
        }
        Some(DatabaseVia::Kubernetes { pod, port, namespace, context }) => {
            tunnel(pod, *port, namespace.as_deref(), context.as_deref())
                .map(|local| with_host(url, &local.ip().to_string(), Some(local.port())))?
        }
    };
    address.ok_or_else(|| {
        UsageError(format!(
            "{}: [database] via needs a URL like postgres://user@host:port/db in [database] url",
            manifest.path.display()
        ))
        .into()
    })
}

#[cfg(feature = "kubernetes")]
fn tunnel(
    pod: &str,
    port: u16,
    namespace: Option<&str>,
    context: Option<&str>,
) -> anyhow::Result<std::net::SocketAddr> {
    let target = upshift_deploy::TunnelTarget { context, namespace, pod, port };
    Ok(upshift_deploy::tunnel(&target)?)
}

#[cfg(not(feature = "kubernetes"))]
fn tunnel(
    _pod: &str,
    _port: u16,
    _namespace: Option<&str>,
    _context: Option<&str>,
) -> anyhow::Result<std::net::SocketAddr> {
    Err(UsageError("[database] via = { kubernetes = ... } needs upshift built with the `kubernetes` feature".into())
        .into())
}

/// `url` (`scheme://[user[:password]@]host[:port][/...]`) with another host, and another
/// port when `port` is given.
fn with_host(url: &str, host: &str, port: Option<u16>) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, hostport) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    let port_text = if hostport.starts_with('[') {
        hostport.find(']').map(|end| &hostport[end + 1..])?
    } else {
        hostport.find(':').map_or("", |colon| &hostport[colon..])
    };
    let host = if host.contains(':') { format!("[{host}]") } else { host.to_owned() };
    let port = port.map_or_else(|| port_text.to_owned(), |p| format!(":{p}"));
    Some(format!("{scheme}://{userinfo}{host}{port}{tail}"))
}

/// The database URL, or a usage error saying where to put one.
fn require_url(url: Option<&str>) -> anyhow::Result<DatabaseUrl> {
    let text = url.ok_or_else(|| {
        UsageError(
            "no database URL: pass --database-url, set UPSHIFT_DATABASE_URL or DATABASE_URL, or set [database] url in upshift.toml"
                .into(),
        )
    })?;
    DatabaseUrl::parse(text).context("the database URL cannot be used")
}

pub(crate) struct MigrateSettings {
    pub(crate) dir: PathBuf,
    /// The manifest's `[database] no_transaction`.
    pub(crate) no_transaction: Vec<String>,
    /// The manifest's external migrator (Alembic, commands), which owns the revisions.
    pub(crate) external: Option<upshift_migrate::external::External>,
    url: Option<String>,
    pub(crate) lock_timeout: Duration,
}

impl MigrateSettings {
    pub(crate) fn resolve(
        global: &GlobalArgs,
        connect: &ConnectArgs,
        printer: &Printer,
    ) -> anyhow::Result<MigrateSettings> {
        let manifest = manifest(global)?;
        let url = database_url(&connect.database, manifest.as_ref(), printer)?;
        let no_transaction = manifest.as_ref().map(|m| m.no_transaction.clone()).unwrap_or_default();
        let external = manifest.as_ref().and_then(|m| m.migrator.clone());
        let dir = connect
            .dir
            .clone()
            .or_else(|| manifest.map(|m| m.migrations_dir))
            .unwrap_or_else(|| PathBuf::from("migrations"));
        Ok(MigrateSettings { dir, no_transaction, external, url, lock_timeout: connect.lock_timeout })
    }

    /// The database URL, or a usage error saying where to put one.
    pub(crate) fn url(&self) -> anyhow::Result<DatabaseUrl> {
        require_url(self.url.as_deref())
    }

    /// The URL when one is given; a bad one is still an error.
    pub(crate) fn optional_url(&self) -> anyhow::Result<Option<DatabaseUrl>> {
        self.url.as_ref().map(|_| self.url()).transpose()
    }
}

pub(crate) struct BackupSettings {
    pub(crate) store: upshift_backup::Store,
    url: Option<String>,
    /// Where saved paths are relative to: the manifest's folder, else the current one.
    pub(crate) base: PathBuf,
    pub(crate) paths: Vec<PathBuf>,
    pub(crate) retention: upshift_backup::Retention,
    pub(crate) app: Option<String>,
    /// zstd settings and the age recipients of `[backup] encrypt_to`.
    pub(crate) codec: upshift_backup::Codec,
    /// The manifest, when there is one: its `[[backup.artifacts]]` commands.
    pub(crate) manifest: Option<upshift_core::Manifest>,
}

impl BackupSettings {
    pub(crate) fn resolve(global: &GlobalArgs, args: &BackupArgs, printer: &Printer) -> anyhow::Result<BackupSettings> {
        let manifest = manifest(global)?;
        let settings = manifest.as_ref().map(|m| m.backup.clone()).unwrap_or_default();
        let manifest_path = manifest.as_ref().map_or_else(|| PathBuf::from("upshift.toml"), |m| m.path.clone());
        let recipients = settings
            .encrypt_to
            .iter()
            .map(|text| {
                text.parse::<age::x25519::Recipient>().map_err(|e| {
                    UsageError(format!(
                        "{}: [backup] encrypt_to: `{text}` is not an age recipient ({e}); expected a public key like age1...",
                        manifest_path.display()
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let dir = args
            .backup_dir
            .clone()
            .or_else(|| manifest.as_ref().map(|m| m.backup.dir.clone()))
            .unwrap_or_else(|| PathBuf::from(".upshift/backups"));
        Ok(BackupSettings {
            store: upshift_backup::Store::new(dir),
            url: database_url(&args.database, manifest.as_ref(), printer)?,
            base: manifest.as_ref().map_or_else(|| PathBuf::from("."), |m| m.base_dir.clone()),
            paths: settings.paths,
            retention: upshift_backup::Retention { keep_last: settings.keep_last, keep_within: settings.keep_within },
            app: manifest.as_ref().and_then(|m| m.app_name.clone()),
            codec: upshift_backup::Codec { recipients, ..upshift_backup::Codec::default() },
            manifest,
        })
    }

    pub(crate) fn url(&self) -> anyhow::Result<DatabaseUrl> {
        require_url(self.url.as_deref())
    }

    pub(crate) fn optional_url(&self) -> anyhow::Result<Option<DatabaseUrl>> {
        self.url.as_ref().map(|_| self.url()).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::with_host;

    #[test]
    fn via_replaces_only_the_host() {
        let cases = [
            (
                "postgres://app:s3cret@db:5432/app?sslmode=disable",
                "postgres://app:s3cret@172.18.0.2:5432/app?sslmode=disable",
            ),
            ("postgresql://db/app", "postgresql://172.18.0.2/app"),
            ("postgres://u:p%40ss@db", "postgres://u:p%40ss@172.18.0.2"),
            ("postgres://u@[::1]:6432/x", "postgres://u@172.18.0.2:6432/x"),
        ];
        for (url, expected) in cases {
            assert_eq!(with_host(url, "172.18.0.2", None).as_deref(), Some(expected), "{url}");
        }
        assert_eq!(with_host("postgres://db:5432/x", "fd00::2", None).as_deref(), Some("postgres://[fd00::2]:5432/x"));
        assert_eq!(
            with_host("postgres://u:p@postgresql:5432/x?sslmode=disable", "127.0.0.1", Some(40123)).as_deref(),
            Some("postgres://u:p@127.0.0.1:40123/x?sslmode=disable")
        );
        assert_eq!(
            with_host("postgres://u@db/x", "127.0.0.1", Some(40123)).as_deref(),
            Some("postgres://u@127.0.0.1:40123/x")
        );
        assert_eq!(with_host("host=db dbname=x", "172.18.0.2", None), None);
    }
}
