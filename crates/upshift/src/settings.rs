//! Flags, environment and manifest resolved into the settings a command runs with.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use upshift_core::Manifest;
use upshift_migrate::DatabaseUrl;

use crate::cli::{ConnectArgs, GlobalArgs};
use crate::exit::UsageError;

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

pub(crate) struct MigrateSettings {
    pub(crate) dir: PathBuf,
    url: Option<String>,
    pub(crate) lock_timeout: Duration,
}

impl MigrateSettings {
    pub(crate) fn resolve(global: &GlobalArgs, connect: &ConnectArgs) -> anyhow::Result<MigrateSettings> {
        let manifest = manifest(global)?;
        let url = connect
            .database_url
            .clone()
            .or_else(|| std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()))
            .or_else(|| manifest.as_ref().and_then(|m| m.database_url.clone()));
        let dir = connect
            .dir
            .clone()
            .or_else(|| manifest.map(|m| m.migrations_dir))
            .unwrap_or_else(|| PathBuf::from("migrations"));
        Ok(MigrateSettings { dir, url, lock_timeout: connect.lock_timeout })
    }

    /// The database URL, or a usage error saying where to put one.
    pub(crate) fn url(&self) -> anyhow::Result<DatabaseUrl> {
        let text = self.url.as_deref().ok_or_else(|| {
            UsageError(
                "no database URL: pass --database-url, set UPSHIFT_DATABASE_URL or DATABASE_URL, or set [database] url in upshift.toml"
                    .into(),
            )
        })?;
        DatabaseUrl::parse(text).context("the database URL cannot be used")
    }

    /// The URL when one is given; a bad one is still an error.
    pub(crate) fn optional_url(&self) -> anyhow::Result<Option<DatabaseUrl>> {
        self.url.as_ref().map(|_| self.url()).transpose()
    }
}
