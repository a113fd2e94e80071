//! `[notify]`: telling people a run started, succeeded, failed or was rolled back.
//!
//! One JSON message per event, sent by `POST` to the webhook (HTTP/1.1, `https://` through rustls
//! with the system's roots, or `SSL_CERT_FILE`) and written to the command's stdin. A
//! notification never fails a run: the runner journals whether each one arrived.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::manifest::{Notify, NotifyEvent};

/// What a notification says (its JSON body).
#[derive(Debug, Serialize)]
pub struct Message<'a> {
    /// `[app] name`.
    pub app: Option<&'a str>,
    /// The run's id.
    pub run: &'a str,
    /// `upgrade` or `rollback`.
    pub kind: &'a str,
    /// `start`, `success`, `failure` or `rollback`.
    pub event: &'a str,
    /// The version it started from.
    pub from: Option<&'a str>,
    /// The version it goes to.
    pub to: &'a str,
    /// `running`, `succeeded`, `rolled-back` or `stuck`.
    pub outcome: &'a str,
    /// The undo's depth, when there was one.
    pub undo: Option<&'a str>,
    /// What failed.
    pub failure: Option<&'a str>,
    /// Time since the run began, in milliseconds.
    pub duration_ms: u64,
}

/// Sends `message` for `event` to each target that listens to it; returns each target's
/// name (`webhook`, `command`) and how it went, errors redacted with `redact`.
pub fn send(
    notify: &Notify,
    event: NotifyEvent,
    message: &Message<'_>,
    redact: &dyn Fn(&str) -> String,
) -> Vec<(&'static str, Result<(), String>)> {
    if !notify.on.contains(&event) {
        return Vec::new();
    }
    let body = serde_json::to_vec(message).expect("a message serializes");
    let mut sent = Vec::new();
    if let Some(url) = &notify.webhook {
        let result = post(url, &body, notify.timeout).map_err(|e| redact(&format!("webhook {url}: {e}")));
        sent.push(("webhook", result));
    }
    if let Some(command) = &notify.command {
        let env = [("UPSHIFT_EVENT".to_owned(), event.as_str().to_owned())];
        let result = crate::command::run_with(
            command,
            notify.timeout,
            &crate::command::Options { env: &env, stdin: Some(&body), ..Default::default() },
        )
        .and_then(|done| done.success(command))
        .map(drop)
        .map_err(|e| redact(&format!("command: {e}")));
        sent.push(("command", result));
    }
    sent
}

/// A webhook's address.
struct Url<'a> {
    tls: bool,
    host: &'a str,
    port: u16,
    path: &'a str,
}

fn parse(url: &str) -> Result<Url<'_>, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err("not an http:// or https:// URL".into());
    };
    let (authority, path) = rest.find('/').map_or((rest, "/"), |at| (&rest[..at], &rest[at..]));
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => {
            (host, port.parse().map_err(|_| format!("`{port}` is not a port"))?)
        }
        _ => (authority, if tls { 443 } else { 80 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err("the URL has no host".into());
    }
    Ok(Url { tls, host, port, path })
}

/// POSTs `body` as JSON; a 2xx answer is delivery.
fn post(url: &str, body: &[u8], timeout: Duration) -> Result<(), String> {
    let url = parse(url)?;
    let addresses: Vec<_> =
        (url.host, url.port).to_socket_addrs().map_err(|e| format!("cannot resolve {}: {e}", url.host))?.collect();
    let mut last = format!("{} has no address", url.host);
    let mut stream = None;
    for address in addresses {
        match TcpStream::connect_timeout(&address, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = format!("cannot connect to {address}: {e}"),
        }
    }
    let stream = stream.ok_or(last)?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let host_header = if url.host.contains(':') { format!("[{}]", url.host) } else { url.host.to_owned() };
    let mut request = format!(
        "POST {} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: upshift/{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        url.path,
        env!("CARGO_PKG_VERSION"),
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    let answer = if url.tls {
        let mut tls = rustls::StreamOwned::new(client(url.host)?, stream);
        exchange(&mut tls, &request)?
    } else {
        let mut stream = stream;
        exchange(&mut stream, &request)?
    };
    let status_line = answer.lines().next().unwrap_or_default();
    let code: u16 = status_line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    if (200..300).contains(&code) { Ok(()) } else { Err(format!("answered `{}`", status_line.trim())) }
}

/// Writes the request, reads the answer's head (enough for its status line).
fn exchange(stream: &mut impl ReadWrite, request: &[u8]) -> Result<String, String> {
    stream.write_all(request).map_err(|e| format!("sending: {e}"))?;
    stream.flush().map_err(|e| format!("sending: {e}"))?;
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buffer).map_err(|e| format!("reading the answer: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buffer[..n]);
    }
    if head.is_empty() {
        return Err("the server closed the connection without an answer".into());
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// A TLS client for `host`, checking its certificate against the system's roots.
fn client(host: &str) -> Result<rustls::ClientConnection, String> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        // A system root rustls cannot parse is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err("no trusted root certificates on this system (set SSL_CERT_FILE)".into());
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| format!("{host}: {e}"))?;
    rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_read_with_their_default_ports() {
        let url = parse("https://hooks.example.com/services/T0/B1").unwrap();
        assert!(url.tls);
        assert_eq!((url.host, url.port, url.path), ("hooks.example.com", 443, "/services/T0/B1"));
        let url = parse("http://127.0.0.1:8080").unwrap();
        assert_eq!((url.host, url.port, url.path), ("127.0.0.1", 8080, "/"));
        let url = parse("http://[::1]:9/x").unwrap();
        assert_eq!((url.host, url.port), ("::1", 9));
        assert!(parse("ftp://x").is_err());
        assert!(parse("http://:80/").is_err());
        assert!(parse("http://h:port/").is_err());
    }
}
