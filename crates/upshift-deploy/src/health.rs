//! Health checks: HTTP (status and optional body match), TCP, or a command; repeated every
//! `interval` until `healthy_after` consecutive passes, or failed at `deadline`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use upshift_core::manifest::{Health, Probe};

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to nothing"))
}

/// One HTTP GET; healthy on `status` (any 2xx when not given) and a body containing `body`.
fn http(addr: &str, path: &str, status: Option<u16>, body: Option<&str>, timeout: Duration) -> Result<(), String> {
    let mut stream =
        TcpStream::connect_timeout(&resolve(addr)?, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: upshift\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(|e| format!("read from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&response);
    let code: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("GET {path}: not an HTTP response"))?;
    let ok = match status {
        Some(expected) => code == expected,
        None => (200..300).contains(&code),
    };
    if !ok {
        return Err(format!("GET {path} answered {code}"));
    }
    if let Some(expected) = body {
        let content = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        if !content.contains(expected) {
            return Err(format!("GET {path} answered {code} without {expected:?} in the body"));
        }
    }
    Ok(())
}

/// One check.
pub fn once(probe: &Probe, addr: Option<&str>, timeout: Duration) -> Result<(), String> {
    let need_addr = || addr.ok_or_else(|| "this check needs an address and the component has none".to_owned());
    match probe {
        Probe::Http { path, status, body } => http(need_addr()?, path, *status, body.as_deref(), timeout),
        Probe::Tcp => {
            let addr = need_addr()?;
            TcpStream::connect_timeout(&resolve(addr)?, timeout).map(drop).map_err(|e| format!("connect {addr}: {e}"))
        }
        Probe::Command(argv) => upshift_core::command::run(argv, timeout).map(drop),
    }
}

/// Repeats the check until `healthy_after` consecutive passes, or fails at `deadline` with
/// the last failure.
pub fn wait(health: &Health, probe: &Probe, addr: Option<&str>) -> Result<(), String> {
    let deadline = Instant::now() + health.deadline;
    let mut passes = 0;
    loop {
        match once(probe, addr, health.timeout) {
            Ok(()) => {
                passes += 1;
                if passes >= health.healthy_after {
                    return Ok(());
                }
            }
            Err(message) => {
                passes = 0;
                if Instant::now() + health.interval > deadline {
                    return Err(format!("not healthy within {}ms: {message}", health.deadline.as_millis()));
                }
            }
        }
        std::thread::sleep(health.interval);
    }
}
