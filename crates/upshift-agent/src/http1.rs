//! The proxy's HTTP/1.1 path, written for the one thing it does: read a request head, send
//! it on a kept-alive upstream connection, and pass the answer back, all in the client
//! connection's own task. Requests on HTTP/2 (h2c) still go through hyper (see
//! [`crate::proxy`]); this path exists because hyper's server and client are two state
//! machines with a task wake between them, which cost the proxy a quarter of its throughput.
//!
//! What it holds to (RFC 9112), and where it is stricter than the RFC allows, it says so:
//! - A request with both `Content-Length` and `Transfer-Encoding`, with differing lengths, a
//!   length that is not a number, or a transfer coding other than `chunked` is refused
//!   (400, or 501 for the coding) and its connection closed: no upstream ever sees framing
//!   that two parsers could read two ways (request smuggling).
//! - Request bodies are read whole (up to [`MAX_BODY`]) and sent with a `Content-Length`,
//!   so a request can be sent again; `Expect: 100-continue` is answered by the proxy.
//! - Hop-by-hop headers, and those the `Connection` header names (but never `Host`), are not
//!   forwarded; `X-Forwarded-For` gets the client's address appended and
//!   `X-Forwarded-Proto` is set. An absolute-form target (`GET http://host/path`) is sent
//!   in origin form with its authority as `Host`.
//! - Response bodies stream through as they come: by length, chunked (passed through as
//!   is, or decoded for an HTTP/1.0 client), or up to the upstream's close (then the client
//!   connection closes too). 1xx answers other than 101 are skipped; a 101 to an upgrade
//!   request turns both connections into one byte stream (WebSocket).

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

use crate::gate::{Busy, Ticket};
use crate::proxy::{
    BODY_TIMEOUT, Backend, Failed, HEADER_TIMEOUT, HOP_BY_HOP, MAX_BODY, Reusable, Route, UPSTREAM_TIMEOUT,
};

/// The longest request or response head.
const MAX_HEAD: usize = 64 * 1024;
/// The most header lines in a head (hyper's default too).
const MAX_HEADERS: usize = 100;
/// How long a kept-alive client connection may wait for its next request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// How long a client may take to take each part of an answer (nginx's `send_timeout`); an
/// upstream gets [`UPSTREAM_TIMEOUT`] for each part of its answer's body.
const SEND_TIMEOUT: Duration = if cfg!(test) { Duration::from_secs(1) } else { Duration::from_mins(1) };
/// How long an upstream that already answered may take nothing more of its request
/// before the proxy stops sending it.
const STALL: Duration = Duration::from_secs(1);
/// How long a refused client may go on sending, read and dropped, before its connection
/// closes (so the refusal is not lost to a reset), and how much of it.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;
/// Bytes read from a socket at a time.
const READ_SIZE: usize = 16 * 1024;
/// The longest chunk-size line (with its extensions) or trailer section.
const MAX_CHUNK_LINE: usize = 4096;

/// Writes `bytes` to a peer; false when it failed, or the peer did not take them within
/// [`SEND_TIMEOUT`] (a client that stops reading does not hold its upstream forever).
async fn deliver(client: &mut TcpStream, bytes: &[u8]) -> bool {
    matches!(tokio::time::timeout(SEND_TIMEOUT, client.write_all(bytes)).await, Ok(Ok(())))
}

/// Reads what the socket has into the spare room of `buf`; 0 at the end of the stream.
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.capacity() - buf.len() < READ_SIZE / 2 {
        buf.reserve(READ_SIZE);
    }
    stream.read_buf(buf).await
}

fn eq(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

/// The comma-separated elements of a header value, trimmed, empty ones left out.
fn elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|e| !e.is_empty())
}

/// A `Content-Length` value: digits only.
fn length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Whether a `Transfer-Encoding` (all its values, in order) ends in `chunked`, and whether
/// `chunked` is its only coding.
fn chunked_coding(values: &[&[u8]]) -> (bool, bool) {
    let codings: Vec<&[u8]> = values.iter().flat_map(|v| elements(v)).collect();
    let last = codings.last().is_some_and(|c| eq(c, "chunked"));
    (last, last && codings.len() == 1)
}

/// Headers that concern one connection only, never forwarded as they are.
fn hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|hop| name.eq_ignore_ascii_case(hop.as_str()))
}

/// The `Connection` header's tokens: whether it says close, keep-alive or upgrade, and
/// the other header names it lists.
#[derive(Default)]
struct Tokens<'a> {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
    named: Vec<&'a [u8]>,
}

impl<'a> Tokens<'a> {
    fn of(headers: &[httparse::Header<'a>]) -> Tokens<'a> {
        let mut tokens = Tokens::default();
        for header in headers.iter().filter(|h| h.name.eq_ignore_ascii_case("connection")) {
            for token in elements(header.value) {
                if eq(token, "close") {
                    tokens.close = true;
                } else if eq(token, "keep-alive") {
                    tokens.keep_alive = true;
                } else if eq(token, "upgrade") {
                    tokens.upgrade = true;
                } else {
                    tokens.named.push(token);
                }
            }
        }
        tokens
    }

    /// Whether it names `name` to be dropped. It never takes away the framing or the
    /// `Host`: a `Connection: content-length` would make the proxy and the next hop read
    /// the body's end in two places.
    fn names(&self, name: &str) -> bool {
        let kept = ["host", "content-length"].iter().any(|k| name.eq_ignore_ascii_case(k));
        !kept && self.named.iter().any(|n| eq(n, name))
    }
}

/// A request that is refused without asking an upstream; its connection then closes.
#[derive(Debug, PartialEq, Eq)]
struct Refusal {
    status: u16,
    message: &'static str,
}

fn refuse(status: u16, message: &'static str) -> Refusal {
    Refusal { status, message }
}

/// How a request's body is framed.
#[derive(Debug, PartialEq, Eq)]
enum RequestBody {
    None,
    Length(usize),
    Chunked,
}

/// A client's request head, read and rewritten for the upstream.
#[derive(Debug)]
#[allow(clippy::struct_excessive_bools, reason = "independent facts of one head")]
struct Request {
    /// Bytes of the head in the client's buffer.
    len: usize,
    /// The request line and the header lines to send, without the end of the head: `Host`
    /// (when the client sent none) and `Content-Length` are added per upstream.
    lines: Vec<u8>,
    has_host: bool,
    body: RequestBody,
    /// A HEAD request: its answer has no body whatever its headers say.
    head_method: bool,
    /// Safe to send twice.
    idempotent: bool,
    /// The client speaks HTTP/1.0 (no chunked answers).
    http10: bool,
    /// The client connection stays open after this exchange.
    keep_alive: bool,
    expect_continue: bool,
    /// Asks to switch protocols (WebSocket).
    upgrade: bool,
}

impl Request {
    /// The request as sent to an upstream whose address is `host` (used when the client
    /// named none).
    fn wire(&self, body: &[u8], host: &str) -> Vec<u8> {
        let mut wire = Vec::with_capacity(self.lines.len() + body.len() + 64);
        wire.extend_from_slice(&self.lines);
        if !self.has_host {
            wire.extend_from_slice(b"Host: ");
            wire.extend_from_slice(host.as_bytes());
            wire.extend_from_slice(b"\r\n");
        }
        if self.body != RequestBody::None {
            wire.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
        }
        wire.extend_from_slice(b"\r\n");
        wire.extend_from_slice(body);
        wire
    }
}

/// Parses the request head at the start of `buf`; `None` while it is incomplete. `peer` is
/// the client's address, appended to `X-Forwarded-For`.
fn parse_request(buf: &[u8], peer: &[u8]) -> Result<Option<Request>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
        Ok(_) | Err(httparse::Error::TooManyHeaders) => return Err(refuse(431, "the request head is too large")),
        Err(_) => return Err(refuse(400, "the request is not valid HTTP/1.1")),
    };
    let (Some(method), Some(target), Some(version)) = (request.method, request.path, request.version) else {
        return Err(refuse(400, "the request is not valid HTTP/1.1"));
    };
    let tokens = Tokens::of(request.headers);
    let (path, authority) = origin(target)?;
    let mut lines = Vec::with_capacity(len + 96);
    lines.extend_from_slice(method.as_bytes());
    lines.push(b' ');
    if !path.starts_with('/') && path != "*" {
        lines.push(b'/');
    }
    lines.extend_from_slice(path.as_bytes());
    lines.extend_from_slice(b" HTTP/1.1\r\n");
    let mut hosts = 0;
    let mut lengths: Vec<u64> = Vec::new();
    let mut codings: Vec<&[u8]> = Vec::new();
    let mut upgrade: Option<&[u8]> = None;
    let mut forwarded_for: Vec<&[u8]> = Vec::new();
    let mut expect_continue = false;
    for header in request.headers.iter() {
        let name = header.name;
        if hop_by_hop(name) {
            if name.eq_ignore_ascii_case("transfer-encoding") {
                codings.push(header.value);
            } else if name.eq_ignore_ascii_case("upgrade") {
                upgrade = Some(header.value);
            }
            continue;
        }
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
            if authority.is_some() {
                continue;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            lengths.push(length(header.value).ok_or(refuse(400, "the Content-Length is not a number"))?);
            continue;
        } else if tokens.names(name) {
            continue;
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded_for.push(header.value);
            continue;
        } else if name.eq_ignore_ascii_case("x-forwarded-proto") {
            continue;
        } else if name.eq_ignore_ascii_case("expect") && eq(header.value, "100-continue") {
            expect_continue = true;
            continue;
        }
        lines.extend_from_slice(name.as_bytes());
        lines.extend_from_slice(b": ");
        lines.extend_from_slice(header.value);
        lines.extend_from_slice(b"\r\n");
    }
    if hosts > 1 {
        return Err(refuse(400, "the request has more than one Host"));
    }
    if let Some(authority) = authority {
        lines.extend_from_slice(b"Host: ");
        lines.extend_from_slice(authority.as_bytes());
        lines.extend_from_slice(b"\r\n");
    }
    let http10 = version == 0;
    let body = request_body(&codings, &lengths, http10)?;
    lines.extend_from_slice(b"X-Forwarded-For: ");
    for earlier in &forwarded_for {
        lines.extend_from_slice(earlier);
        lines.extend_from_slice(b", ");
    }
    lines.extend_from_slice(peer);
    lines.extend_from_slice(b"\r\nX-Forwarded-Proto: http\r\n");
    // An upgrade counts only when `Connection` names it (RFC 9110, 7.8), on HTTP/1.1.
    // `Upgrade: h2c` asks a server to switch to HTTP/2 cleartext: hop-by-hop, never passed on.
    let upgrade = upgrade.filter(|v| tokens.upgrade && !http10 && !eq(v.trim_ascii(), "h2c"));
    if let Some(protocol) = upgrade {
        lines.extend_from_slice(b"Connection: upgrade\r\nUpgrade: ");
        lines.extend_from_slice(protocol);
        lines.extend_from_slice(b"\r\n");
    }
    Ok(Some(Request {
        len,
        lines,
        has_host: hosts > 0,
        body,
        head_method: method == "HEAD",
        idempotent: matches!(method, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE"),
        http10,
        keep_alive: !tokens.close && (!http10 || tokens.keep_alive),
        expect_continue,
        upgrade: upgrade.is_some(),
    }))
}

/// The target in origin form, and the authority of an absolute-form one.
fn origin(target: &str) -> Result<(&str, Option<&str>), Refusal> {
    if target.starts_with('/') || target == "*" {
        return Ok((target, None));
    }
    let Some(rest) = ["http://", "https://"].iter().find_map(|scheme| strip_prefix_ignore_case(target, scheme)) else {
        return Err(refuse(400, "the request target is not a path (CONNECT is not proxied)"));
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    // Credentials in the target (`http://user:secret@host/`) are not the host.
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    if authority.is_empty() {
        return Err(refuse(400, "the request target has no host"));
    }
    Ok((path, Some(authority)))
}

/// How a request's body is framed, from its `Transfer-Encoding` and `Content-Length` values.
fn request_body(codings: &[&[u8]], lengths: &[u64], http10: bool) -> Result<RequestBody, Refusal> {
    Ok(match (codings.is_empty(), lengths) {
        (true, []) => RequestBody::None,
        (true, [first, rest @ ..]) => {
            if rest.iter().any(|l| l != first) {
                return Err(refuse(400, "the request has two different Content-Lengths"));
            }
            match usize::try_from(*first) {
                Ok(n) if n <= MAX_BODY => RequestBody::Length(n),
                _ => return Err(refuse(413, "the request body is too large")),
            }
        }
        (false, []) if !http10 => match chunked_coding(codings) {
            (_, true) => RequestBody::Chunked,
            (true, false) => return Err(refuse(501, "only the chunked transfer coding is accepted")),
            (false, _) => return Err(refuse(400, "the request's transfer coding does not end in chunked")),
        },
        _ => return Err(refuse(400, "the request body's length is given two ways")),
    })
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

/// How an upstream's answer is framed, as the proxy relays it.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// No body (HEAD, 204, 304).
    Empty,
    Length(u64),
    /// Chunked: passed through as it is, or decoded for an HTTP/1.0 client.
    Chunked {
        decode: bool,
    },
    /// Up to the upstream's close.
    Close,
    /// A 101 to an upgrade request: the connections become one byte stream.
    Upgrade,
}

/// An upstream's answer head, rewritten for the client.
#[derive(Debug)]
struct Answer {
    /// Bytes of the head in the upstream's buffer.
    len: usize,
    status: u16,
    /// The head to send to the client.
    head: Vec<u8>,
    framing: Framing,
    /// The upstream connection can carry another request after this answer.
    reusable: bool,
    /// The client connection can carry another request after this answer.
    keep_client: bool,
}

/// What the start of an upstream's buffer holds.
#[derive(Debug)]
enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// An interim answer (1xx other than 101) of this many bytes, skipped.
    Interim(usize),
    Final(Answer),
}

/// Parses the answer head at the start of `buf`, to the request `request`.
fn parse_response(buf: &[u8], request: &Request) -> Result<Parsed, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(Parsed::Partial),
        Ok(_) | Err(httparse::Error::TooManyHeaders) => return Err("the upstream's answer head is too large"),
        Err(_) => return Err("the upstream's answer is not valid HTTP/1.1"),
    };
    let (Some(version), Some(status)) = (response.version, response.code) else {
        return Err("the upstream's answer is not valid HTTP/1.1");
    };
    if (100..200).contains(&status) && status != 101 {
        return Ok(Parsed::Interim(len));
    }
    if status == 101 && !request.upgrade {
        return Err("the upstream switched protocols unasked");
    }
    let tokens = Tokens::of(response.headers);
    let codings: Vec<&[u8]> =
        response.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding")).map(|h| h.value).collect();
    let mut lengths = response.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("content-length"));
    let first_length = lengths.next();
    // A length given both ways is read by the coding, and the connection is not reused.
    let both_ways = first_length.is_some() && !codings.is_empty();
    let length = match first_length {
        Some(first) if codings.is_empty() => {
            let n = length(first.value).ok_or("the upstream's Content-Length is not a number")?;
            if lengths.any(|other| length(other.value) != Some(n)) {
                return Err("the upstream sent two different Content-Lengths");
            }
            Some(n)
        }
        _ => None,
    };
    let chunked = chunked_coding(&codings).0;
    let framing = if status == 101 {
        Framing::Upgrade
    } else if request.head_method || status == 204 || status == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked { decode: request.http10 }
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    let reusable = version == 1 && !tokens.close && !both_ways && !matches!(framing, Framing::Close | Framing::Upgrade);
    let keep_client = request.keep_alive && framing != Framing::Close && framing != (Framing::Chunked { decode: true });
    let mut head = Vec::with_capacity(len + 32);
    head.extend_from_slice(format!("HTTP/1.1 {status} ").as_bytes());
    head.extend_from_slice(response.reason.unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for header in response.headers.iter() {
        let name = header.name;
        let upgrade_header =
            status == 101 && (name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("upgrade"));
        // No length with a coding, nor on a 204 (RFC 9110, 8.6).
        let framing_header = name.eq_ignore_ascii_case("content-length") && (!codings.is_empty() || status == 204);
        if framing_header || (!upgrade_header && (hop_by_hop(name) || tokens.names(name))) {
            continue;
        }
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(header.value);
        head.extend_from_slice(b"\r\n");
    }
    if framing == (Framing::Chunked { decode: false }) || (framing == Framing::Close && !codings.is_empty()) {
        // Passed through as it is: the codings with it.
        head.extend_from_slice(b"Transfer-Encoding: ");
        head.extend_from_slice(&codings.join(&b", "[..]));
        head.extend_from_slice(b"\r\n");
    }
    if status != 101 {
        head.extend_from_slice(match (keep_client, request.http10) {
            (false, _) => b"Connection: close\r\n".as_slice(),
            (true, true) => b"Connection: keep-alive\r\n",
            (true, false) => b"",
        });
    }
    head.extend_from_slice(b"\r\n");
    Ok(Parsed::Final(Answer { len, status, head, framing, reusable, keep_client }))
}

/// Where a chunked body's reader is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum State {
    #[default]
    Size,
    /// Blanks after the size, before `;` or the line's end.
    SizeBlank,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    Trailer,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// Reads a chunked body as it comes, strictly (CRLF line ends, hex sizes of at most 15
/// digits, bounded extension and trailer lines): finds where it ends, and decodes it when
/// asked. Trailers are read and dropped.
#[derive(Debug, Default)]
struct Chunked {
    state: State,
    size: u64,
    digits: u32,
    line: usize,
}

impl Chunked {
    fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Reads from `input` up to the end of the body; returns the bytes read. The chunks'
    /// data go to `out` when given.
    fn read(&mut self, input: &[u8], mut out: Option<&mut Vec<u8>>) -> Result<usize, &'static str> {
        let mut i = 0;
        while i < input.len() && self.state != State::Done {
            let byte = input[i];
            i += 1;
            let expect = |wanted: u8, next: State| if byte == wanted { Ok(next) } else { Err("a chunk is malformed") };
            self.state = match self.state {
                State::Size => match (byte as char).to_digit(16) {
                    Some(digit) if self.digits < 15 => {
                        self.digits += 1;
                        self.size = self.size * 16 + u64::from(digit);
                        State::Size
                    }
                    Some(_) => return Err("a chunk is too large"),
                    None if self.digits == 0 => return Err("a chunk size is missing"),
                    None => after_size(byte)?,
                },
                State::SizeBlank => after_size(byte)?,
                State::Extension => {
                    self.line += 1;
                    match byte {
                        _ if self.line > MAX_CHUNK_LINE => return Err("a chunk extension is too long"),
                        b'\r' => State::SizeLf,
                        _ if control(byte) => return Err("a chunk extension is malformed"),
                        _ => State::Extension,
                    }
                }
                State::SizeLf => {
                    expect(b'\n', State::Data)?;
                    self.digits = 0;
                    self.line = 0;
                    if self.size == 0 { State::Trailer } else { State::Data }
                }
                State::Data => {
                    i -= 1;
                    let n = usize::try_from(self.size).unwrap_or(usize::MAX).min(input.len() - i);
                    if let Some(out) = out.as_deref_mut() {
                        out.extend_from_slice(&input[i..i + n]);
                    }
                    i += n;
                    self.size -= n as u64;
                    if self.size == 0 { State::DataCr } else { State::Data }
                }
                State::DataCr => expect(b'\r', State::DataLf)?,
                State::DataLf => expect(b'\n', State::Size)?,
                State::Trailer if byte == b'\r' => State::EndLf,
                State::Trailer | State::TrailerLine => {
                    self.line += 1;
                    match byte {
                        _ if self.line > MAX_CHUNK_LINE => return Err("the chunked trailers are too long"),
                        b'\r' => State::TrailerLf,
                        _ if control(byte) => return Err("a chunk trailer is malformed"),
                        _ => State::TrailerLine,
                    }
                }
                State::TrailerLf => expect(b'\n', State::Trailer)?,
                State::EndLf => expect(b'\n', State::Done)?,
                State::Done => State::Done,
            };
        }
        Ok(i)
    }
}

/// What may follow a chunk's size: blanks, then `;` and extensions, or the line's end.
fn after_size(byte: u8) -> Result<State, &'static str> {
    match byte {
        b' ' | b'\t' => Ok(State::SizeBlank),
        b';' => Ok(State::Extension),
        b'\r' => Ok(State::SizeLf),
        _ => Err("a chunk size is malformed"),
    }
}

/// A control character other than a tab: never in a chunk extension or a trailer.
fn control(byte: u8) -> bool {
    (byte < 0x20 && byte != b'\t') || byte == 0x7f
}

/// A kept-alive connection to an upstream, with what was read from it and not used yet.
pub(crate) struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: &str) -> Result<Conn, Failed> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| Failed { not_sent: true, message: format!("could not connect to {addr}: {e}") })?;
        let _ = stream.set_nodelay(true);
        Ok(Conn { stream, buf: Vec::with_capacity(READ_SIZE) })
    }

    /// Reads more of an answer's body; an error when the upstream stays silent for
    /// [`UPSTREAM_TIMEOUT`].
    async fn more(&mut self) -> io::Result<usize> {
        tokio::time::timeout(UPSTREAM_TIMEOUT, fill(&mut self.stream, &mut self.buf))
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
    }

    /// Reads the answer head to `request`, skipping interim answers. The error says
    /// whether any byte of an answer came.
    async fn answer(&mut self, request: &Request) -> Result<Answer, (bool, String)> {
        let mut received = false;
        loop {
            match parse_response(&self.buf, request).map_err(|e| (true, e.to_owned()))? {
                Parsed::Final(answer) => {
                    self.buf.drain(..answer.len);
                    return Ok(answer);
                }
                Parsed::Interim(len) => {
                    self.buf.drain(..len);
                    received = true;
                    continue;
                }
                Parsed::Partial => {}
            }
            match fill(&mut self.stream, &mut self.buf).await {
                Ok(0) => {
                    return Err((received || !self.buf.is_empty(), "the upstream closed the connection".to_owned()));
                }
                Ok(_) => {}
                Err(e) => {
                    return Err((received || !self.buf.is_empty(), format!("the upstream connection failed: {e}")));
                }
            }
        }
    }
}

impl Reusable for Conn {
    /// Whether the upstream closed it (or sent what nobody asked for) while it sat idle:
    /// one non-blocking read, and none when the reactor saw nothing happen on it.
    fn is_closed(&self) -> bool {
        let mut byte = [0u8; 1];
        !matches!(self.stream.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// Holds an upstream's in-flight count while its request is forwarded and answered, so a
/// drain waits for answers still streaming.
struct InFlight(Arc<Backend>);

impl InFlight {
    fn new(backend: &Arc<Backend>) -> InFlight {
        backend.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(backend))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Writes all of `wire` while reading what the upstream sends meanwhile into `buf`; the
/// error says whether a part of the request went out. Interim answers (1xx) are skipped.
/// An upstream that gave its final answer before it read the whole request (a 413, a 401
/// to an upload) may never read the rest: once it has, and takes nothing more for
/// [`STALL`], writing stops and its answer is relayed.
async fn send(stream: &TcpStream, buf: &mut Vec<u8>, wire: &[u8], request: &Request) -> Result<(), (bool, io::Error)> {
    let mut written = 0;
    let mut answered = false;
    while written < wire.len() {
        // Nothing can come before the request started; and what comes is read up to a cap.
        let read = written > 0 && buf.len() < MAX_BODY;
        let interest = if read { Interest::WRITABLE | Interest::READABLE } else { Interest::WRITABLE };
        let ready = if answered {
            match tokio::time::timeout(STALL, stream.ready(interest)).await {
                Ok(ready) => ready,
                Err(_) => {
                    return Err((true, io::Error::other("the upstream answered and stopped reading the request")));
                }
            }
        } else {
            stream.ready(interest).await
        };
        let ready = ready.map_err(|e| (written > 0, e))?;
        if ready.is_readable() && read {
            // Readiness can be stale: only bytes (or the end) that are there count.
            let start = buf.len();
            buf.resize(start + READ_SIZE, 0);
            let got = stream.try_read(&mut buf[start..]);
            buf.truncate(start + *got.as_ref().unwrap_or(&0));
            match got {
                Ok(0) => return Err((true, io::ErrorKind::UnexpectedEof.into())),
                Ok(_) if !answered => loop {
                    match parse_response(buf, request) {
                        Ok(Parsed::Interim(len)) => {
                            buf.drain(..len);
                        }
                        Ok(Parsed::Partial) => break,
                        Ok(Parsed::Final(_)) | Err(_) => {
                            answered = true;
                            break;
                        }
                    }
                },
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err((true, e)),
            }
        }
        if ready.is_writable() {
            match stream.try_write(&wire[written..]) {
                Ok(0) => return Err((written > 0, io::ErrorKind::WriteZero.into())),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err((written > 0, e)),
            }
        }
    }
    Ok(())
}

/// Sends `wire` on a pooled connection of `backend`, or a new one, and reads the answer's
/// head. A pooled connection that turns out closed is given up for the next when nothing
/// reached the upstream, or when the request is safe to send again.
async fn exchange(backend: &Backend, wire: &[u8], request: &Request) -> Result<(Conn, Answer), Failed> {
    loop {
        let (mut conn, pooled) = match backend.conns.checkout() {
            Some(conn) => (conn, true),
            None => (Conn::open(&backend.addr).await?, false),
        };
        let (not_sent, outcome) = match send(&conn.stream, &mut conn.buf, wire, request).await {
            Ok(()) => (false, conn.answer(request).await),
            // The upstream answered (a 413, a 401) or closed before it read the whole
            // request: its answer is the one to relay, and the connection is done.
            Err((true, e)) => {
                let answer = conn.answer(request).await.map(|answer| Answer { reusable: false, ..answer });
                (false, answer.map_err(|(got, m)| (got, format!("could not send to {}: {e}; {m}", backend.addr))))
            }
            Err((false, e)) => (true, Err((false, format!("could not send to {}: {e}", backend.addr)))),
        };
        match outcome {
            Ok(answer) => return Ok((conn, answer)),
            Err((false, _)) if pooled && (not_sent || request.idempotent) => {}
            Err((_, message)) => return Err(Failed { not_sent, message }),
        }
    }
}

/// An answer being relayed: the upstream connection it came on, and its upstream kept busy.
struct Exchange {
    conn: Conn,
    answer: Answer,
    in_flight: InFlight,
}

async fn forward(backend: &Arc<Backend>, request: &Request, body: &[u8]) -> Result<Exchange, Failed> {
    let wire = request.wire(body, &backend.addr);
    let in_flight = InFlight::new(backend);
    let started = Instant::now();
    let result = match tokio::time::timeout(UPSTREAM_TIMEOUT, exchange(backend, &wire, request)).await {
        Ok(result) => result,
        Err(_) => Err(Failed { not_sent: false, message: "the upstream timed out".to_owned() }),
    };
    let error = result.as_ref().map_or(true, |(_, answer)| answer.status >= 500);
    backend.record(started.elapsed(), error);
    result.map(|(conn, answer)| Exchange { conn, answer, in_flight })
}

/// The proxy's own answer to `request` (`None`: to a request refused, and the connection
/// then closes): a JSON error message.
fn own_answer(status: u16, message: &str, request: Option<&Request>, extra: &str) -> Vec<u8> {
    let body = crate::proxy::error_json(message);
    let reason = hyper::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
    let connection = match request {
        Some(request) if request.keep_alive && request.http10 => "Connection: keep-alive\r\n",
        Some(request) if request.keep_alive => "",
        _ => "Connection: close\r\n",
    };
    let mut answer = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{connection}{extra}\r\n",
        body.len()
    )
    .into_bytes();
    if !request.is_some_and(|r| r.head_method) {
        answer.extend_from_slice(body.as_bytes());
    }
    answer
}

/// Closes the sending side, then reads and drops what the client still sends (up to
/// [`LINGER`] and [`LINGER_BYTES`]): a socket closed with unread bytes sends a reset, which
/// can destroy the answer the client has not read yet (nginx's lingering close).
async fn linger(client: &mut TcpStream) {
    if client.shutdown().await.is_err() {
        return;
    }
    let mut scratch = vec![0u8; READ_SIZE];
    let _ = tokio::time::timeout(LINGER, async {
        let mut total = 0;
        while total < LINGER_BYTES {
            match client.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

/// Reads the next request head into `buf` and parses it. `None` when the client closed,
/// stayed idle too long, or sent an incomplete head too slowly.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>, peer: &[u8]) -> Result<Option<Request>, Refusal> {
    if buf.is_empty() {
        match tokio::time::timeout(IDLE_TIMEOUT, fill(stream, buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Ok(None),
        }
    }
    let deadline = tokio::time::Instant::now() + HEADER_TIMEOUT;
    loop {
        if let Some(head) = parse_request(buf, peer)? {
            return Ok(Some(head));
        }
        match tokio::time::timeout_at(deadline, fill(stream, buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return Ok(None),
            Err(_) => return Err(refuse(408, "the request head took too long")),
        }
    }
}

/// Reads the request's body from `buf` and the client; `None` when the client closed first.
async fn read_body(stream: &mut TcpStream, buf: &mut Vec<u8>, request: &Request) -> Result<Option<Vec<u8>>, Refusal> {
    // Asked to, and not sent the body yet: the client is told to go on.
    let wanted = match request.body {
        RequestBody::None => return Ok(Some(Vec::new())),
        RequestBody::Length(n) => n,
        RequestBody::Chunked => 1,
    };
    if request.expect_continue
        && !request.http10
        && buf.len() < wanted
        && stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err()
    {
        return Ok(None);
    }
    if let RequestBody::Length(n) = request.body {
        while buf.len() < n {
            if !matches!(fill(stream, buf).await, Ok(read) if read > 0) {
                return Ok(None);
            }
        }
        let rest = buf.split_off(n);
        return Ok(Some(std::mem::replace(buf, rest)));
    }
    let mut chunked = Chunked::default();
    let mut body = Vec::new();
    loop {
        let read = chunked.read(buf, Some(&mut body)).map_err(|_| refuse(400, "the request's chunks are malformed"))?;
        buf.drain(..read);
        if body.len() > MAX_BODY {
            return Err(refuse(413, "the request body is too large"));
        }
        if chunked.done() {
            return Ok(Some(body));
        }
        if !matches!(fill(stream, buf).await, Ok(read) if read > 0) {
            return Ok(None);
        }
    }
}

/// Passes the answer's body to the client as it comes; returns whether it was all passed
/// (so both connections can carry another exchange).
async fn relay_body(client: &mut TcpStream, conn: &mut Conn, framing: &Framing, mut out: Vec<u8>) -> bool {
    match *framing {
        Framing::Empty | Framing::Upgrade => deliver(client, &out).await,
        Framing::Length(mut left) => loop {
            let take = usize::try_from(left).unwrap_or(usize::MAX).min(conn.buf.len());
            out.extend_from_slice(&conn.buf[..take]);
            conn.buf.drain(..take);
            left -= take as u64;
            if !deliver(client, &out).await {
                return false;
            }
            if left == 0 {
                return true;
            }
            out.clear();
            if !matches!(conn.more().await, Ok(n) if n > 0) {
                return false;
            }
        },
        Framing::Chunked { decode } => {
            let mut chunked = Chunked::default();
            loop {
                let read = if decode {
                    chunked.read(&conn.buf, Some(&mut out))
                } else {
                    chunked.read(&conn.buf, None).inspect(|&read| out.extend_from_slice(&conn.buf[..read]))
                };
                let Ok(read) = read else { return false };
                conn.buf.drain(..read);
                if !out.is_empty() && !deliver(client, &out).await {
                    return false;
                }
                if chunked.done() {
                    return true;
                }
                out.clear();
                if !matches!(conn.more().await, Ok(n) if n > 0) {
                    return false;
                }
            }
        }
        Framing::Close => loop {
            out.append(&mut conn.buf);
            if !deliver(client, &out).await {
                return false;
            }
            out.clear();
            match conn.more().await {
                Ok(0) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        },
    }
}

/// Serves one client connection speaking HTTP/1.x until it closes, asks to close, is told
/// to give way by the gate, or breaks.
pub(crate) async fn serve(mut client: TcpStream, peer: &[u8], route: &Route, ticket: &Ticket) {
    let mut buf: Vec<u8> = Vec::with_capacity(READ_SIZE);
    loop {
        // Between requests and while one is read the connection is idle: the gate may close it.
        let read = async {
            let Some(request) = read_head(&mut client, &mut buf, peer).await? else { return Ok(None) };
            buf.drain(..request.len);
            match tokio::time::timeout(BODY_TIMEOUT, read_body(&mut client, &mut buf, &request)).await {
                Ok(body) => Ok(body?.map(|body| (request, body))),
                Err(_) => Err(refuse(408, "the request body took too long")),
            }
        };
        let read = tokio::select! {
            biased;
            read = read => read,
            () = ticket.close.notified() => return,
        };
        let (request, body) = match read {
            Ok(Some(read)) => read,
            Ok(None) => return,
            Err(refusal) => {
                let answer = own_answer(refusal.status, refusal.message, None, "");
                if deliver(&mut client, &answer).await {
                    linger(&mut client).await;
                }
                return;
            }
        };
        let busy = Busy::new(&ticket.busy);
        let next = answer(&mut client, &mut buf, route, &request, &body).await;
        drop(busy);
        match next {
            Next::Request => {}
            Next::Close => return,
            Next::Splice(mut upstream, in_flight) => {
                // Bytes flow both ways until either side closes. The connection counts as
                // idle for the gate: at the cap it may be told to give way.
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut upstream.stream) => {}
                    () = ticket.close.notified() => {}
                }
                drop(in_flight);
                return;
            }
        }
    }
}

/// What a client connection does after an exchange.
enum Next {
    /// Reads the next request.
    Request,
    Close,
    /// Becomes one byte stream with the upstream connection (an upgrade both agreed to).
    Splice(Conn, InFlight),
}

impl Next {
    fn after(written: bool, keep: bool) -> Next {
        if written && keep { Next::Request } else { Next::Close }
    }
}

/// Forwards one request and relays its answer.
async fn answer(client: &mut TcpStream, buf: &mut Vec<u8>, route: &Route, request: &Request, body: &[u8]) -> Next {
    let own = |status, message: &str, extra| own_answer(status, message, Some(request), extra);
    let Some(first) = route.pick(None) else {
        // Stopped for an upgrade's downtime (or not started yet): clients are told to retry.
        let answer = own(503, "no upstream is live", "Retry-After: 5\r\n");
        return Next::after(deliver(client, &answer).await, request.keep_alive);
    };
    let result = match forward(&first, request, body).await {
        // Safe to send once more, elsewhere when possible: an idempotent request, or any
        // request that never reached its upstream (a connect error).
        Err(Failed { not_sent, message }) if request.idempotent || not_sent => {
            let second = route.pick(Some(&first.addr)).unwrap_or(first);
            forward(&second, request, body).await.map_err(|again| Failed {
                not_sent: again.not_sent,
                message: format!("{message}; then {}", again.message),
            })
        }
        result => result,
    };
    let Exchange { mut conn, answer, in_flight } = match result {
        Ok(exchange) => exchange,
        Err(failed) => {
            let answer = own(502, &failed.message, "");
            return Next::after(deliver(client, &answer).await, request.keep_alive);
        }
    };
    if answer.framing == Framing::Upgrade {
        // Both sides agreed: what each already sent past the heads goes first.
        let mut out = answer.head;
        out.append(&mut conn.buf);
        if !deliver(client, &out).await || !deliver(&mut conn.stream, buf).await {
            return Next::Close;
        }
        buf.clear();
        return Next::Splice(conn, in_flight);
    }
    let whole = relay_body(client, &mut conn, &answer.framing, answer.head).await;
    if whole && answer.reusable && conn.buf.is_empty() {
        in_flight.0.conns.checkin(conn);
    }
    Next::after(whole, answer.keep_client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> Result<Option<Request>, Refusal> {
        let head = parse_request(text.as_bytes(), b"10.0.0.9")?;
        if let Some(head) = &head {
            assert!(text[head.len - 4..].starts_with("\r\n\r\n"), "{text:?} {}", head.len);
        }
        Ok(head)
    }

    fn lines(head: &Request) -> String {
        String::from_utf8(head.lines.clone()).unwrap()
    }

    #[test]
    fn a_request_head_is_rewritten_for_the_upstream() {
        let head = request(
            "GET /a?b=1 HTTP/1.1\r\nHost: example.org\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret\r\n\
             Keep-Alive: timeout=5\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\nAccept: */*\r\n\r\nnext",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            lines(&head),
            "GET /a?b=1 HTTP/1.1\r\nHost: example.org\r\nAccept: */*\r\n\
             X-Forwarded-For: 1.2.3.4, 10.0.0.9\r\nX-Forwarded-Proto: http\r\n"
        );
        assert!(head.keep_alive && head.idempotent && head.has_host && !head.upgrade);
        assert_eq!(head.body, RequestBody::None);
        assert_eq!(head.wire(b"", "u:1"), [head.lines.as_slice(), b"\r\n"].concat());
    }

    #[test]
    fn an_incomplete_head_waits_and_a_bad_one_is_refused() {
        assert!(request("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        assert_eq!(request("GET / HTTP/1.1\r\nHost x\r\n\r\n").unwrap_err().status, 400);
        assert_eq!(request("CONNECT example.org:443 HTTP/1.1\r\n\r\n").unwrap_err().status, 400);
        assert_eq!(request("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").unwrap_err().status, 400);
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(request(&huge).unwrap_err().status, 431);
    }

    #[test]
    fn a_body_framed_two_ways_is_refused() {
        let refused = |text: &str| request(text).unwrap_err().status;
        // Request smuggling: both framings, or lengths that disagree.
        assert_eq!(refused("POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"), 400);
        assert_eq!(refused("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"), 400);
        assert_eq!(refused("POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n"), 400);
        assert_eq!(refused("POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n"), 400);
        assert_eq!(refused("POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"), 400);
        assert_eq!(refused("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"), 501);
        assert_eq!(refused("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"), 400);
        assert_eq!(refused(&format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1)), 413);
        let same = request("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n").unwrap().unwrap();
        assert_eq!(same.body, RequestBody::Length(3));
        assert!(!same.idempotent);
        let chunked = request("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n").unwrap().unwrap();
        assert_eq!(chunked.body, RequestBody::Chunked);
        // Sent on with the length of the body read, never the coding.
        let wire = String::from_utf8(chunked.wire(b"hello", "u:1")).unwrap();
        assert!(wire.ends_with("Host: u:1\r\nContent-Length: 5\r\n\r\nhello"), "{wire}");
        assert!(!wire.to_ascii_lowercase().contains("transfer-encoding"), "{wire}");
    }

    #[test]
    fn absolute_targets_http10_and_upgrades() {
        let absolute = request("GET http://svc.local:8080?q=1 HTTP/1.1\r\nHost: other\r\n\r\n").unwrap().unwrap();
        assert_eq!(
            lines(&absolute),
            "GET /?q=1 HTTP/1.1\r\nHost: svc.local:8080\r\nX-Forwarded-For: 10.0.0.9\r\nX-Forwarded-Proto: http\r\n"
        );
        let old = request("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(old.http10 && !old.keep_alive && !old.has_host);
        assert!(String::from_utf8(old.wire(b"", "u:1")).unwrap().contains("\r\nHost: u:1\r\n"));
        assert!(request("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap().unwrap().keep_alive);
        assert!(!request("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap().unwrap().keep_alive);
        let ws = request("GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(ws.upgrade);
        assert!(lines(&ws).ends_with("Connection: upgrade\r\nUpgrade: websocket\r\n"), "{}", lines(&ws));
        let h2c = request("GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n").unwrap().unwrap();
        assert!(!h2c.upgrade && !lines(&h2c).to_ascii_lowercase().contains("upgrade"));
        // An upgrade needs `Connection: upgrade`, and HTTP/1.1.
        let bare = request("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n").unwrap().unwrap();
        assert!(!bare.upgrade && !lines(&bare).to_ascii_lowercase().contains("upgrade"), "{}", lines(&bare));
        let old = request("GET /ws HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n").unwrap().unwrap();
        assert!(!old.upgrade);
        // `Connection` cannot take the Host or the length away.
        let host = request("GET / HTTP/1.1\r\nHost: x\r\nConnection: host\r\n\r\n").unwrap().unwrap();
        assert!(lines(&host).contains("Host: x\r\n"));
        let length = request("POST / HTTP/1.1\r\nHost: x\r\nConnection: content-length\r\nContent-Length: 30\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(length.body, RequestBody::Length(30));
        // Credentials in an absolute target are not the host.
        let credentials = request("GET http://user:secret@svc/ HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert!(lines(&credentials).contains("Host: svc\r\n") && !lines(&credentials).contains("secret"));
    }

    fn response(text: &str, to: &str) -> Answer {
        let request = request(to).unwrap().unwrap();
        match parse_response(text.as_bytes(), &request).unwrap() {
            Parsed::Final(answer) => answer,
            other => panic!("{other:?}"),
        }
    }

    const GET: &str = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn answers_are_framed_and_their_heads_rewritten() {
        let plain = response("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nKeep-Alive: timeout=5\r\n\r\nhello", GET);
        assert_eq!(plain.framing, Framing::Length(5));
        assert_eq!(String::from_utf8(plain.head).unwrap(), "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
        assert!(plain.reusable && plain.keep_client);
        let chunked = response("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n", GET);
        assert_eq!(chunked.framing, Framing::Chunked { decode: false });
        assert_eq!(String::from_utf8(chunked.head).unwrap(), "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(!chunked.reusable, "a length given both ways closes the upstream connection");
        let old = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        );
        assert_eq!((old.framing, old.keep_client), (Framing::Chunked { decode: true }, false));
        assert_eq!(String::from_utf8(old.head).unwrap(), "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
        let coded = response("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", GET);
        assert_eq!(coded.framing, Framing::Close);
        assert!(String::from_utf8(coded.head).unwrap().contains("\r\nTransfer-Encoding: gzip\r\n"));
        let until_close = response("HTTP/1.1 200 OK\r\n\r\n", GET);
        assert_eq!(
            (until_close.framing, until_close.reusable, until_close.keep_client),
            (Framing::Close, false, false)
        );
        let head = response("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "HEAD / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!((head.framing, head.reusable), (Framing::Empty, true));
        assert_eq!(response("HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", GET).framing, Framing::Empty);
        let no_content = response("HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", GET);
        assert_eq!(String::from_utf8(no_content.head).unwrap(), "HTTP/1.1 204 No Content\r\n\r\n");
        let named = response("HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\n", GET);
        assert_eq!(String::from_utf8(named.head).unwrap(), "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
        let closing = response("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", GET);
        assert!(!closing.reusable && closing.keep_client);
        let request = request(GET).unwrap().unwrap();
        assert!(matches!(parse_response(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1", &request), Ok(Parsed::Interim(25))));
        assert!(parse_response(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", &request).is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", &request).is_err()
        );
    }

    #[test]
    fn the_proxys_own_answers_keep_an_http10_connection_only_when_asked() {
        let text = |request: Option<&Request>| String::from_utf8(own_answer(502, "down", request, "")).unwrap();
        let old = request("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap().unwrap();
        assert!(text(Some(&old)).contains("\r\nConnection: keep-alive\r\n"));
        let head = request("HEAD / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap().unwrap();
        assert!(text(Some(&head)).ends_with("Content-Length: 17\r\n\r\n"), "{}", text(Some(&head)));
        assert!(text(None).contains("\r\nConnection: close\r\n") && text(None).ends_with("{\"error\": \"down\"}"));
    }

    /// Feeds `input` to a reader in pieces of `step` bytes; what it read and decoded.
    fn chunks(input: &[u8], step: usize) -> Result<(usize, Vec<u8>, bool), &'static str> {
        let mut chunked = Chunked::default();
        let mut out = Vec::new();
        let mut read = 0;
        for piece in input.chunks(step) {
            read += chunked.read(piece, Some(&mut out))?;
            if chunked.done() {
                break;
            }
        }
        Ok((read, out, chunked.done()))
    }

    #[test]
    fn chunked_bodies_are_read_in_any_pieces_and_strictly() {
        let body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, body.len()] {
            assert_eq!(chunks(body, step).unwrap(), (body.len() - 4, b"hello world".to_vec(), true), "step {step}");
        }
        assert_eq!(chunks(b"0\r\n\r\n", 1).unwrap(), (5, Vec::new(), true));
        assert!(!chunks(b"5\r\nhel", 100).unwrap().2);
        assert_eq!(chunks(b"3 \t;a=\"b c\"\r\nabc\r\n0 \r\n\r\n", 4).unwrap().1, b"abc");
        let bad: [&[u8]; 8] = [
            b"5\nhello\r\n0\r\n\r\n",
            b"x\r\n",
            b"5\r\nhelloXX",
            b"1234567890abcdef0\r\n",
            b"\r\n",
            b"5 5\r\nhello\r\n",
            b"5;\x00\r\nhello\r\n",
            b"0\r\nX: \x01\r\n\r\n",
        ];
        for bad in bad {
            assert!(chunks(bad, 100).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let long = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert!(chunks(long.as_bytes(), 100).is_err());
    }
}
