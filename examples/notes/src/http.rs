//! A small HTTP/1.1 server side: reads requests (request line, headers, a Content-Length
//! body) from a keep-alive connection and writes JSON responses.
//!
//! Deliberately small: no chunked request bodies (411), no pipelining beyond keeping the
//! bytes of the next request, no `Upgrade`. Every response has `Content-Type`,
//! `Content-Length` and `Connection`.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

/// Largest request line plus headers.
const MAX_HEAD: usize = 64 * 1024;
/// Largest request body.
const MAX_BODY: usize = 1024 * 1024;
/// How long an idle keep-alive connection stays open.
const IDLE_TIMEOUT: Duration = Duration::from_mins(1);
/// How long a client may take to send one whole request once it started.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a blocked read wakes up to look at the stop flag.
pub(crate) const POLL: Duration = Duration::from_millis(100);

/// One parsed request.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) method: String,
    /// The request target as sent: path and query.
    pub(crate) target: String,
    /// `HTTP/1.<minor>`.
    minor_version: u8,
    headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Request {
    /// The target without its query.
    pub(crate) fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(path, _)| path)
    }

    /// The value of query parameter `name` (no percent-decoding: the API needs none).
    pub(crate) fn query(&self, name: &str) -> Option<&str> {
        let (_, query) = self.target.split_once('?')?;
        query.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name).then_some(value)
        })
    }

    /// The first value of header `name` (case-insensitive).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
    }

    /// Whether the client wants the connection kept open after this request.
    pub(crate) fn keep_alive(&self) -> bool {
        let has = |token: &str| {
            self.headers
                .iter()
                .filter(|(key, _)| key.eq_ignore_ascii_case("connection"))
                .flat_map(|(_, value)| value.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        };
        if self.minor_version == 0 { has("keep-alive") && !has("close") } else { !has("close") }
    }
}

/// A JSON response.
#[derive(Debug)]
pub(crate) struct Response {
    pub(crate) status: u16,
    headers: Vec<(&'static str, String)>,
    pub(crate) body: Vec<u8>,
}

impl Response {
    /// `value` as JSON with `status`.
    pub(crate) fn json(status: u16, value: &impl serde::Serialize) -> Response {
        let body = serde_json::to_vec(value).expect("API values serialize");
        Response { status, headers: Vec::new(), body }
    }

    /// `{"error": message}` with `status`.
    pub(crate) fn error(status: u16, message: impl Into<String>) -> Response {
        Response::json(status, &serde_json::json!({ "error": message.into() }))
    }

    /// Adds a header.
    pub(crate) fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    pub(crate) fn to_bytes(&self, keep_alive: bool) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {}\r\n",
            self.status,
            reason(self.status),
            self.body.len(),
            if keep_alive { "keep-alive" } else { "close" },
        );
        for (name, value) in &self.headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// What reading the next request gave.
#[derive(Debug)]
pub(crate) enum Next {
    /// A whole request.
    Request(Request),
    /// The peer closed, the connection idled out, or the server is stopping: close quietly.
    Close,
    /// A request that cannot be served: send this, then close.
    Reject(Response),
}

/// A client connection with the bytes read but not used yet.
pub(crate) struct Connection {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl Connection {
    /// Wraps an accepted stream; reads wake every [`POLL`] to look at the stop flag.
    pub(crate) fn new(stream: TcpStream) -> io::Result<Connection> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(POLL))?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        Ok(Connection { stream, buffer: Vec::new() })
    }

    /// Reads the next request. Between requests, `stopping` is polled: when it turns true,
    /// the idle connection is closed. A request that has started arriving is read to its end.
    pub(crate) fn next_request(&mut self, stopping: impl Fn() -> bool) -> Next {
        let waiting_since = Instant::now();
        let mut started = (!self.buffer.is_empty()).then(Instant::now);
        let mut sent_continue = false;
        loop {
            match parse_head(&self.buffer) {
                Err(response) => return Next::Reject(response),
                Ok(Some(head)) => {
                    let end = head.length + head.content_length;
                    if self.buffer.len() >= end {
                        let body = self.buffer[head.length..end].to_vec();
                        self.buffer.drain(..end);
                        return Next::Request(Request { body, ..head.request });
                    }
                    // curl and others wait for this before sending a larger body.
                    let expects_continue =
                        head.request.header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
                    if expects_continue && !sent_continue && self.buffer.len() == head.length {
                        sent_continue = true;
                        if self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
                            return Next::Close;
                        }
                    }
                }
                Ok(None) => {}
            }
            let mut chunk = [0; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Next::Close,
                Ok(n) => {
                    self.buffer.extend_from_slice(&chunk[..n]);
                    started.get_or_insert_with(Instant::now);
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => match started {
                    None if stopping() || waiting_since.elapsed() > IDLE_TIMEOUT => return Next::Close,
                    Some(since) if since.elapsed() > REQUEST_TIMEOUT => {
                        return Next::Reject(Response::error(408, "the request took too long to arrive"));
                    }
                    _ => {}
                },
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Next::Close,
            }
        }
    }

    /// Writes a response.
    pub(crate) fn send(&mut self, response: &Response, keep_alive: bool) -> io::Result<()> {
        self.stream.write_all(&response.to_bytes(keep_alive))?;
        self.stream.flush()
    }

    /// Sends a rejection and closes without a reset: the client may still be sending a body
    /// we will not read, and closing with unread bytes would make the kernel send RST, which
    /// can destroy the response before the client reads it.
    pub(crate) fn reject(mut self, response: &Response) {
        if self.send(response, false).is_err() {
            return;
        }
        let _ = self.stream.shutdown(Shutdown::Write);
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut sink = [0; 16 * 1024];
        while Instant::now() < deadline {
            match self.stream.read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

/// A parsed request line and headers.
struct Head {
    request: Request,
    /// Bytes of the head, blank line included.
    length: usize,
    content_length: usize,
}

/// Parses the head at the start of `buffer`: `Ok(None)` while it is incomplete.
fn parse_head(buffer: &[u8]) -> Result<Option<Head>, Response> {
    // RFC 9112 2.2: ignore empty lines before the request line.
    let skipped = buffer.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
    let rest = &buffer[skipped..];
    let Some((text_end, head_end)) = find_head_end(rest) else {
        if rest.len() > MAX_HEAD {
            return Err(Response::error(431, "the request head is larger than 64 KiB"));
        }
        return Ok(None);
    };
    if text_end > MAX_HEAD {
        return Err(Response::error(431, "the request head is larger than 64 KiB"));
    }
    let bad = |message: &str| Response::error(400, message);
    let text = std::str::from_utf8(&rest[..text_end]).map_err(|_| bad("the request head is not UTF-8"))?;
    let mut lines = text.split('\n').map(|line| line.strip_suffix('\r').unwrap_or(line));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line: expected `METHOD TARGET HTTP/1.1`"));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) || !target.starts_with('/') {
        return Err(bad("malformed request line: expected `METHOD /path HTTP/1.1`"));
    }
    let minor_version = match version {
        "HTTP/1.1" => 1,
        "HTTP/1.0" => 0,
        _ => return Err(Response::error(505, format!("unsupported protocol `{version}`: use HTTP/1.1"))),
    };

    let mut headers = Vec::new();
    let mut content_length: Option<usize> = None;
    for line in lines {
        if line.starts_with([' ', '\t']) {
            return Err(bad("folded header lines are not supported"));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad("malformed header line: expected `Name: value`"));
        };
        if name.is_empty() || name.contains([' ', '\t']) {
            return Err(bad("malformed header name"));
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Response::error(411, "chunked request bodies are not supported: send a Content-Length"));
        }
        if name.eq_ignore_ascii_case("content-length") {
            let length = value
                .parse::<usize>()
                .ok()
                .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| bad("Content-Length is not a number"))?;
            if content_length.is_some_and(|previous| previous != length) {
                return Err(bad("conflicting Content-Length headers"));
            }
            if length > MAX_BODY {
                return Err(Response::error(413, "the request body is larger than 1 MiB"));
            }
            content_length = Some(length);
        }
        headers.push((name.to_owned(), value.to_owned()));
    }
    Ok(Some(Head {
        request: Request {
            method: method.to_owned(),
            target: target.to_owned(),
            minor_version,
            headers,
            body: Vec::new(),
        },
        length: skipped + head_end,
        content_length: content_length.unwrap_or(0),
    }))
}

/// Where the head's text ends and where the body starts: the first blank line, CRLF or LF.
fn find_head_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let crlf = buffer.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, i + 4));
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| (i, i + 2));
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<Head>, Response> {
        parse_head(text.as_bytes())
    }

    #[test]
    fn parses_a_request_head() {
        let text =
            "\r\nPOST /api/notes?x=1&ms=20 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: Close\r\n\r\nhello";
        let head = head(text).unwrap().unwrap();
        assert_eq!(head.request.method, "POST");
        assert_eq!(head.request.path(), "/api/notes");
        assert_eq!(head.request.query("ms"), Some("20"));
        assert_eq!(head.request.query("y"), None);
        assert_eq!(head.request.header("host"), Some("a"));
        assert_eq!(head.content_length, 5);
        assert_eq!(&text[head.length..], "hello");
        assert!(!head.request.keep_alive());
    }

    #[test]
    fn keep_alive_defaults_by_version() {
        assert!(head("GET / HTTP/1.1\r\n\r\n").unwrap().unwrap().request.keep_alive());
        assert!(!head("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap().request.keep_alive());
        assert!(head("GET / HTTP/1.0\nConnection: keep-alive\n\n").unwrap().unwrap().request.keep_alive());
    }

    #[test]
    fn waits_for_a_whole_head() {
        assert!(head("GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
        assert!(head("").unwrap().is_none());
    }

    #[test]
    fn rejects_what_it_cannot_serve() {
        let status = |text: &str| head(text).err().map(|r| r.status);
        assert_eq!(status("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), Some(411));
        assert_eq!(status("POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), Some(400));
        assert_eq!(status("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"), Some(400));
        assert_eq!(status("POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"), Some(413));
        assert_eq!(status("GET / HTTP/2.0\r\n\r\n"), Some(505));
        assert_eq!(status("GET /\r\n\r\n"), Some(400));
        assert_eq!(status("GET / HTTP/1.1\r\nno colon\r\n\r\n"), Some(400));
    }

    #[test]
    fn writes_json_with_length_and_connection() {
        let bytes = Response::error(404, "nope").with_header("Allow", "GET").to_bytes(false);
        let text = String::from_utf8(bytes).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 16\r\nConnection: close\r\nAllow: GET\r\n\r\n{\"error\":\"nope\"}"
        );
    }
}
