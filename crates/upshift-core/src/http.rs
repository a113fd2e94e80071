//! A small HTTP client for the few calls upshift makes itself: webhooks (`POST`, see
//! `notify`) and Prometheus queries (`GET`, see `prometheus`). One request per connection;
//! `https://` through rustls with the system's roots (or `SSL_CERT_FILE`).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

/// An address to send to.
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

/// An answer: its status code and body.
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The status line, for messages.
    pub status_line: String,
    /// The body (read to the end of the connection).
    pub body: String,
}

/// POSTs `body` as JSON; a 2xx answer is delivery.
pub fn post(url: &str, body: &[u8], timeout: Duration) -> Result<(), String> {
    let answer = send(url, "POST", Some(body), timeout)?;
    if (200..300).contains(&answer.status) { Ok(()) } else { Err(format!("answered `{}`", answer.status_line)) }
}

/// GETs `url` (asked as HTTP/1.0, so the answer is never chunked) and returns the answer,
/// whatever its status.
pub fn get(url: &str, timeout: Duration) -> Result<Answer, String> {
    send(url, "GET", None, timeout)
}

/// A `POST` is sent as HTTP/1.1 and only its status line is read (a webhook's answer
/// carries nothing upshift needs); a `GET` as HTTP/1.0, read to the end.
fn send(url: &str, method: &str, body: Option<&[u8]>, timeout: Duration) -> Result<Answer, String> {
    let (version, whole) = if method == "GET" { ("HTTP/1.0", true) } else { ("HTTP/1.1", false) };
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
        "{method} {} {version}\r\nHost: {host_header}\r\nUser-Agent: upshift/{}\r\nConnection: close\r\n",
        url.path,
        env!("CARGO_PKG_VERSION"),
    );
    if let Some(body) = body {
        request = format!("{request}Content-Type: application/json\r\nContent-Length: {}\r\n", body.len());
    }
    request.push_str("\r\n");
    let mut request = request.into_bytes();
    request.extend_from_slice(body.unwrap_or_default());
    let answer = if url.tls {
        let mut tls = rustls::StreamOwned::new(client(url.host)?, stream);
        exchange(&mut tls, &request, whole)?
    } else {
        let mut stream = stream;
        exchange(&mut stream, &request, whole)?
    };
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status_line = head.lines().next().unwrap_or_default().trim().to_owned();
    let status = status_line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok(Answer { status, status_line, body: body.to_owned() })
}

/// At most this much of an answer is read.
const MAX_ANSWER: usize = 4 << 20;

/// Writes the request, reads the answer: `whole`, until the server closes the connection;
/// else its status line.
fn exchange(stream: &mut impl ReadWrite, request: &[u8], whole: bool) -> Result<String, String> {
    stream.write_all(request).map_err(|e| format!("sending: {e}"))?;
    stream.flush().map_err(|e| format!("sending: {e}"))?;
    let mut answer = Vec::new();
    let mut buffer = [0u8; 8192];
    while answer.len() < MAX_ANSWER && (whole || !answer.windows(2).any(|w| w == b"\r\n")) {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
            // A peer that closes a TLS stream without close_notify, or a timeout after the
            // head arrived: what was read is the answer.
            Err(_) if answer.windows(4).any(|w| w == b"\r\n\r\n") => break,
            Err(e) => return Err(format!("reading the answer: {e}")),
        }
    }
    if answer.is_empty() {
        return Err("the server closed the connection without an answer".into());
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
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

/// `text` percent-encoded for a URL's query (every byte but the unreserved ones).
pub fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
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

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(encode(r#"sum(rate(x{code=~"5.."}[1m]))"#), "sum%28rate%28x%7Bcode%3D~%225..%22%7D%5B1m%5D%29%29");
        assert_eq!(encode("a b+c/é"), "a%20b%2Bc%2F%C3%A9");
    }
}
