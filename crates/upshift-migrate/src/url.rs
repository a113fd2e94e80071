//! Database URLs: which engine, where, and a form safe to print.

use std::fmt;
use std::path::PathBuf;

use crate::error::Error;
use crate::lexer::Dialect;

/// A parsed database URL. Its `Display` never shows a password.
#[derive(Clone)]
pub enum DatabaseUrl {
    /// `sqlite:PATH` or `sqlite://PATH`.
    Sqlite {
        /// The database file.
        path: PathBuf,
    },
    /// `postgres://user:pass@host:port/db` or `postgresql://...`, with `sslmode` and its
    /// settings like libpq (from the query, else `PGSSL*`).
    Postgres {
        /// Connection settings, TLS included.
        config: Box<upshift_postgres::Config>,
        /// The URL with its password replaced by `***`.
        redacted: String,
        /// The URL as given, password included: only for a tool's environment.
        url: String,
    },
}

impl DatabaseUrl {
    /// Reads a URL, refusing schemes other than PostgreSQL's and SQLite's.
    pub fn parse(url: &str) -> Result<DatabaseUrl, Error> {
        let redacted = redact(url);
        let bad = |message: String| Error::Url { url: redacted.clone(), message };
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            let path = path.split_once('?').map_or(path, |(p, _)| p);
            if path.is_empty() {
                return Err(bad("no file path: expected sqlite:PATH".into()));
            }
            return Ok(DatabaseUrl::Sqlite { path: PathBuf::from(path) });
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let config = upshift_postgres::Config::parse(url, |name| std::env::var(name).ok())
                .map_err(|e| bad(format!("{e}; expected postgres://user:pass@host:port/db[?sslmode=verify-full]")))?;
            return Ok(DatabaseUrl::Postgres { config: Box::new(config), redacted, url: url.to_owned() });
        }
        Err(bad(
            "unknown scheme: expected postgres://user:pass@host:port/db, postgresql://..., sqlite:PATH or sqlite://PATH".into(),
        ))
    }

    /// The URL with its password, for the environment of a migration tool that connects
    /// by itself. Never print it.
    pub fn secret_text(&self) -> String {
        match self {
            DatabaseUrl::Sqlite { path } => format!("sqlite:{}", path.display()),
            DatabaseUrl::Postgres { url, .. } => url.clone(),
        }
    }

    /// `text` with this URL, should it appear there, shown redacted.
    pub fn redact(&self, text: &str) -> String {
        match self {
            DatabaseUrl::Sqlite { .. } => text.to_owned(),
            DatabaseUrl::Postgres { url, redacted, .. } => text.replace(url.as_str(), redacted),
        }
    }

    /// The SQL dialect of the engine behind this URL.
    pub fn dialect(&self) -> Dialect {
        match self {
            DatabaseUrl::Sqlite { .. } => Dialect::Sqlite,
            DatabaseUrl::Postgres { .. } => Dialect::Postgres,
        }
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseUrl::Sqlite { path } => write!(f, "sqlite:{}", path.display()),
            DatabaseUrl::Postgres { redacted, .. } => f.write_str(redacted),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Replaces the password of a URL (`user:pass@` and `password=` parameters) with `***`.
pub fn redact(url: &str) -> String {
    if !url.contains("://") && url.contains('=') {
        return redact_key_values(url);
    }
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let authority_start = scheme_end + 3;
        let authority_end = out[authority_start..].find(['/', '?']).map_or(out.len(), |i| authority_start + i);
        if let Some(at) = out[authority_start..authority_end].rfind('@') {
            let userinfo = &out[authority_start..authority_start + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(authority_start + colon + 1..authority_start + at, "***");
            }
        }
    }
    if let Some(query_start) = out.find('?') {
        let (base, query) = out.split_at(query_start + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out = format!("{base}{}", query.join("&"));
    }
    out
}

/// A libpq key/value string (`host=db password=secret`) with its password hidden, quoted
/// values included (`password='a b'`).
fn redact_key_values(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.to_ascii_lowercase().find("password") {
        let (before, from) = rest.split_at(at);
        out.push_str(before);
        let after_key = &from["password".len()..];
        let trimmed = after_key.trim_start();
        if let Some(value) = trimmed.strip_prefix('=') {
            let value = value.trim_start();
            let end = if let Some(quoted) = value.strip_prefix('\'') {
                quoted.find('\'').map_or(value.len(), |i| i + 2)
            } else {
                value.find(char::is_whitespace).unwrap_or(value.len())
            };
            out.push_str("password=***");
            rest = &value[end..];
        } else {
            out.push_str("password");
            rest = after_key;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(redact("postgres://u:s3cr%40t@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(
            redact("postgres://u@h/db?password=x&sslmode=disable"),
            "postgres://u@h/db?password=***&sslmode=disable"
        );
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
        let url = DatabaseUrl::parse("postgresql://app:hunter2@localhost/notes").unwrap();
        assert!(!format!("{url} {url:?}").contains("hunter2"));
    }

    #[test]
    fn sqlite_forms() {
        for text in ["sqlite:data/app.db", "sqlite://data/app.db", "sqlite:data/app.db?mode=rwc"] {
            let DatabaseUrl::Sqlite { path } = DatabaseUrl::parse(text).unwrap() else { panic!() };
            assert_eq!(path, PathBuf::from("data/app.db"));
        }
        let DatabaseUrl::Sqlite { path } = DatabaseUrl::parse("sqlite:///tmp/a.db").unwrap() else { panic!() };
        assert_eq!(path, PathBuf::from("/tmp/a.db"));
    }

    #[test]
    fn unknown_schemes_are_refused_without_the_password() {
        let err = DatabaseUrl::parse("mysql://root:pw@h/db").unwrap_err().to_string();
        assert!(err.contains("expected postgres://"), "{err}");
        assert!(!err.contains("pw@"), "{err}");
        // Regression: a libpq key/value string was quoted whole, password and all.
        let err = DatabaseUrl::parse("host=db user=app password=hunter2 dbname=notes").unwrap_err().to_string();
        assert!(err.contains("password=***") && !err.contains("hunter2"), "{err}");
        assert_eq!(redact("host=h PASSWORD = 'a b c' port=1"), "host=h password=*** port=1");
    }
}
