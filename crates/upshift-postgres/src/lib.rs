//! PostgreSQL connections as libpq makes them: `sslmode` (`disable`, `allow`, `prefer`,
//! `require`, `verify-ca`, `verify-full`), `sslrootcert`, `sslcert`, `sslkey` and
//! `sslnegotiation` read from the URL's query, else from `PGSSLMODE`, `PGSSLROOTCERT`,
//! `PGSSLCERT`, `PGSSLKEY` and `PGSSLNEGOTIATION`; TLS through rustls; and the same settings
//! handed to `pg_dump` and `pg_restore` through their environment, never argv.
//!
//! As in libpq: the default is `prefer` (TLS when the server offers it, without checking
//! its certificate); `require` checks nothing either, unless a root certificate is given,
//! when it behaves like `verify-ca`; `verify-ca` checks the chain; `verify-full` checks the
//! chain and that the certificate names the host. Without `sslrootcert`, the chain is checked
//! against the system's root certificates (`sslrootcert=system` says so explicitly).

mod session;
mod verify;

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use postgres::Client;
use postgres::config::{SslMode as WireMode, SslNegotiation};
use tokio_postgres_rustls::MakeRustlsConnect;

pub use self::session::{BatchError, Session};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// How hard to insist on TLS, and what to check: libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// Plain first; TLS when the server refuses plain.
    Allow,
    /// TLS when the server offers it, else plain; nothing checked (libpq's default).
    Prefer,
    /// TLS or fail; nothing checked (unless a root certificate is given: then as `VerifyCa`).
    Require,
    /// TLS, and the server's certificate chains to a trusted root.
    VerifyCa,
    /// As `VerifyCa`, and the certificate names the host connected to.
    VerifyFull,
}

impl SslMode {
    /// Its name in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(text: &str) -> Result<SslMode, String> {
        Ok(match text {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode `{other}` is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ));
            }
        })
    }
}

/// Where the trusted roots come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Roots {
    /// The system's root certificates.
    System,
    /// A PEM file of root certificates.
    File(PathBuf),
}

/// The TLS settings of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`: `None` when not given (the system's roots, for the modes that check).
    pub root_cert: Option<Roots>,
    /// `sslcert`: a client certificate (PEM).
    pub cert: Option<PathBuf>,
    /// `sslkey`: its private key (PEM).
    pub key: Option<PathBuf>,
    /// `sslnegotiation=direct`: TLS from the first byte (PostgreSQL 17 and later).
    pub direct: bool,
}

/// A connection's settings: the client's own plus TLS.
///
/// They are kept as tokio-postgres's settings, which both the blocking [`Client`] and a
/// [`Session`] are made from.
#[derive(Clone, Debug)]
pub struct Config {
    inner: tokio_postgres::Config,
    tls: Tls,
}

impl Deref for Config {
    type Target = tokio_postgres::Config;

    fn deref(&self) -> &tokio_postgres::Config {
        &self.inner
    }
}

impl DerefMut for Config {
    fn deref_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.inner
    }
}

/// Why a connection could not be made: the mode asked for, what failed, and the fix.
#[derive(Debug, thiserror::Error)]
pub struct ConnectError {
    /// The `sslmode` asked for.
    pub mode: SslMode,
    /// What failed.
    pub message: String,
    /// What to do about it, when known.
    pub hint: Option<String>,
    #[source]
    source: Option<postgres::Error>,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sslmode={}: {}", self.mode.as_str(), self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "; {hint}")?;
        }
        Ok(())
    }
}

impl ConnectError {
    /// The client's own error, when the failure came from it.
    pub fn postgres(&self) -> Option<&postgres::Error> {
        self.source.as_ref()
    }
}

const TLS_KEYS: &[&str] = &["sslmode", "sslrootcert", "sslcert", "sslkey", "sslnegotiation"];

/// `%XX` escapes of a URL query value.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(value) = text.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(value);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Config {
    /// Reads a `postgres://` / `postgresql://` URL; TLS settings from its query, else from
    /// the `PGSSL*` variables of `env`.
    pub fn parse(url: &str, env: impl Fn(&str) -> Option<String>) -> Result<Config, String> {
        let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
        let mut kept = Vec::new();
        let mut given = std::collections::BTreeMap::new();
        for pair in query.iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if TLS_KEYS.contains(&key) {
                given.insert(key.to_owned(), decode(value));
            } else {
                kept.push(pair);
            }
        }
        let setting = |key: &str, var: &str| given.get(key).cloned().or_else(|| env(var)).filter(|v| !v.is_empty());
        let mode = setting("sslmode", "PGSSLMODE").map_or(Ok(SslMode::Prefer), |m| SslMode::parse(&m))?;
        let root_cert = setting("sslrootcert", "PGSSLROOTCERT")
            .map(|r| if r == "system" { Roots::System } else { Roots::File(PathBuf::from(r)) });
        let direct = match setting("sslnegotiation", "PGSSLNEGOTIATION").as_deref() {
            None | Some("postgres") => false,
            Some("direct") => true,
            Some(other) => return Err(format!("sslnegotiation `{other}` is not one of postgres, direct")),
        };
        let tls = Tls {
            mode,
            root_cert,
            cert: setting("sslcert", "PGSSLCERT").map(PathBuf::from),
            key: setting("sslkey", "PGSSLKEY").map(PathBuf::from),
            direct,
        };
        if direct && matches!(mode, SslMode::Disable | SslMode::Allow | SslMode::Prefer) {
            return Err(format!("sslnegotiation=direct needs sslmode require or stronger, not {}", mode.as_str()));
        }
        let rest = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
        let inner: tokio_postgres::Config = rest.parse().map_err(|e: postgres::Error| e.to_string())?;
        Ok(Config { inner, tls })
    }

    /// The TLS settings.
    pub fn tls(&self) -> &Tls {
        &self.tls
    }

    /// Connects as the settings say.
    pub fn connect(&self) -> Result<Client, ConnectError> {
        self.connect_with(|config, tls| {
            let config = postgres::Config::from(config.clone());
            match tls {
                None => config.connect(postgres::NoTls),
                Some(tls) => config.connect(tls),
            }
        })
    }

    /// Tries the connections the mode asks for, in libpq's order: `connect` gets the
    /// client's settings with the wire mode set, and the TLS connector (none: plain).
    fn connect_with<C>(
        &self,
        connect: impl Fn(&tokio_postgres::Config, Option<MakeRustlsConnect>) -> Result<C, postgres::Error>,
    ) -> Result<C, ConnectError> {
        let mode = self.tls.mode;
        let fail = |message: String, hint: Option<&str>| ConnectError {
            mode,
            message,
            hint: hint.map(str::to_owned),
            source: None,
        };
        let mut config = self.inner.clone();
        match mode {
            SslMode::Disable => {
                config.ssl_mode(WireMode::Disable);
                connect(&config, None).map_err(|e| self.explain(e))
            }
            SslMode::Allow => {
                config.ssl_mode(WireMode::Disable);
                if let Ok(client) = connect(&config, None) {
                    return Ok(client);
                }
                config.ssl_mode(WireMode::Require);
                connect(&config, Some(self.connector(false).map_err(|m| fail(m, None))?)).map_err(|e| self.explain(e))
            }
            SslMode::Prefer => {
                config.ssl_mode(WireMode::Prefer);
                connect(&config, Some(self.connector(false).map_err(|m| fail(m, None))?)).map_err(|e| self.explain(e))
            }
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                config.ssl_mode(WireMode::Require);
                if self.tls.direct {
                    config.ssl_negotiation(SslNegotiation::Direct);
                }
                let check = mode != SslMode::Require || matches!(self.tls.root_cert, Some(Roots::File(_)));
                let connector = self.connector(check).map_err(|m| fail(m, Some(CERT_HINT)))?;
                connect(&config, Some(connector)).map_err(|e| self.explain(e))
            }
        }
    }

    /// The TLS connector: checking the server's certificate (`check`) against the roots,
    /// and its name too in `verify-full`; presenting the client certificate when given.
    fn connector(&self, check: bool) -> Result<MakeRustlsConnect, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = if check {
            let roots = Arc::new(self.roots()?);
            let verifier = verify::checking(roots, provider, self.tls.mode == SslMode::VerifyFull)?;
            builder.dangerous().with_custom_certificate_verifier(verifier)
        } else {
            builder.dangerous().with_custom_certificate_verifier(verify::nothing(provider))
        };
        let config = match (&self.tls.cert, &self.tls.key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                    .map_err(|e| format!("sslcert {}: {e}", cert.display()))?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("sslkey {}: {e}", key.display()))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| format!("the client certificate: {e}"))?
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err("sslcert and sslkey go together: give both, or neither".into());
            }
            (None, None) => builder.with_no_client_auth(),
        };
        Ok(MakeRustlsConnect::new(config))
    }

    /// The trusted roots: the `sslrootcert` file, else the system's.
    fn roots(&self) -> Result<rustls::RootCertStore, String> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.tls.root_cert {
            Some(Roots::File(path)) => {
                for cert in
                    CertificateDer::pem_file_iter(path).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?
                {
                    let cert = cert.map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                    roots.add(cert).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                }
            }
            Some(Roots::System) | None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        if roots.is_empty() {
            return Err(match &self.tls.root_cert {
                Some(Roots::File(path)) => format!("sslrootcert {} holds no certificate", path.display()),
                _ => "no sslrootcert was given and the system has no root certificates".into(),
            });
        }
        Ok(roots)
    }

    /// A failed connection, said with the mode asked for and the fix.
    fn explain(&self, error: postgres::Error) -> ConnectError {
        let text = error_chain(&error);
        let lower = text.to_lowercase();
        let host = self.inner.get_hosts().first().map(|h| match h {
            postgres::config::Host::Tcp(host) => host.clone(),
            postgres::config::Host::Unix(path) => path.display().to_string(),
        });
        let (message, hint) = if lower.contains("notvalidforname") || lower.contains("not valid for name") {
            (
                format!("the server's certificate does not name the host {}", host.unwrap_or_default()),
                Some("connect with the host name on the certificate, or use sslmode=verify-ca to check the chain only"),
            )
        } else if lower.contains("unknownissuer") || lower.contains("unknown issuer") || lower.contains("badsignature")
        {
            ("the server's certificate does not chain to a trusted root".to_owned(), Some(CERT_HINT))
        } else if lower.contains("server does not support tls") {
            (
                "the server does not offer TLS".to_owned(),
                Some("enable ssl on the server, or use sslmode=prefer (or disable) if plain text is acceptable"),
            )
        } else if lower.contains("ssl off") || lower.contains("no encryption") {
            (
                format!("the server refuses connections without TLS: {text}"),
                Some("use sslmode=require or stronger (verify-full for a managed database)"),
            )
        } else {
            (text, None)
        };
        ConnectError { mode: self.tls.mode, message, hint: hint.map(str::to_owned), source: Some(error) }
    }

    /// The variables that give `pg_dump`, `pg_restore` and `psql` the same TLS settings.
    pub fn tool_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("PGSSLMODE", self.tls.mode.as_str().to_owned())];
        match &self.tls.root_cert {
            Some(Roots::File(path)) => env.push(("PGSSLROOTCERT", path.display().to_string())),
            // libpq before 16 has no `system`: give it the system bundle's file.
            Some(Roots::System) | None if matches!(self.tls.mode, SslMode::VerifyCa | SslMode::VerifyFull) => {
                if let Some(bundle) = system_bundle() {
                    env.push(("PGSSLROOTCERT", bundle.display().to_string()));
                }
            }
            _ => {}
        }
        if let Some(cert) = &self.tls.cert {
            env.push(("PGSSLCERT", cert.display().to_string()));
        }
        if let Some(key) = &self.tls.key {
            env.push(("PGSSLKEY", key.display().to_string()));
        }
        if self.tls.direct {
            env.push(("PGSSLNEGOTIATION", "direct".to_owned()));
        }
        env
    }
}

/// The variables [`Config::tool_env`] sets, to clear first.
pub const TOOL_VARIABLES: &[&str] = &["PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY", "PGSSLNEGOTIATION"];

const CERT_HINT: &str = "give the CA that signed the server's certificate with sslrootcert=/path/to/ca.pem (a managed database documents its CA)";

/// The system's root bundle as one file, where Debian, Fedora or Alpine keep it.
fn system_bundle() -> Option<PathBuf> {
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"]
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .map(Path::to_path_buf)
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn tls_settings_come_from_the_query_then_the_environment() {
        let config = Config::parse("postgres://u:p@db.example.com:5433/app", none).unwrap();
        assert_eq!(config.tls().mode, SslMode::Prefer, "libpq's default");
        assert_eq!(config.get_dbname(), Some("app"));
        let config = Config::parse(
            "postgres://u@h/app?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
            |v| (v == "PGSSLMODE").then(|| "disable".to_owned()),
        )
        .unwrap();
        assert_eq!(config.tls().mode, SslMode::VerifyFull, "the URL wins over PGSSLMODE");
        assert_eq!(config.tls().root_cert, Some(Roots::File("/etc/ca.pem".into())));
        assert_eq!(config.get_application_name(), Some("x"), "other options reach the client");
        let from_env = Config::parse("postgres://u@h/app", |v| match v {
            "PGSSLMODE" => Some("require".into()),
            "PGSSLROOTCERT" => Some("system".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!((from_env.tls().mode, from_env.tls().root_cert.clone()), (SslMode::Require, Some(Roots::System)));
    }

    #[test]
    fn bad_settings_say_what_is_expected() {
        let err = Config::parse("postgres://u@h/app?sslmode=verify", none).unwrap_err();
        assert!(err.contains("not one of disable, allow, prefer, require, verify-ca, verify-full"), "{err}");
        let err = Config::parse("postgres://u@h/app?sslnegotiation=direct", none).unwrap_err();
        assert!(err.contains("needs sslmode require or stronger"), "{err}");
    }

    #[test]
    fn tools_get_the_settings_through_their_environment() {
        let config = Config::parse(
            "postgres://u@h/app?sslmode=verify-ca&sslrootcert=/ca.pem&sslcert=/c.pem&sslkey=/k.pem",
            none,
        )
        .unwrap();
        let env = config.tool_env();
        for expected in
            [("PGSSLMODE", "verify-ca"), ("PGSSLROOTCERT", "/ca.pem"), ("PGSSLCERT", "/c.pem"), ("PGSSLKEY", "/k.pem")]
        {
            assert!(env.iter().any(|(k, v)| (*k, v.as_str()) == expected), "{env:?}");
        }
    }
}
