//! Talking to the agent, and starting it detached when it does not run.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::protocol::{Request, Response};
use crate::server::SOCKET;

/// Why the agent could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket.
    #[error("the agent for {0} does not run")]
    NotRunning(String),
    /// It could not be started.
    #[error("could not start the agent: {0}")]
    Start(String),
    /// It answered with an error.
    #[error("the agent refused: {0}")]
    Refused(String),
    /// The conversation broke.
    #[error("lost the agent: {0}")]
    Io(#[from] std::io::Error),
}

/// A connection to the agent of one state dir.
pub struct Client {
    stream: BufReader<UnixStream>,
}

impl Client {
    /// Connects to a running agent.
    pub fn connect(state_dir: &Path) -> Result<Client, ClientError> {
        UnixStream::connect(state_dir.join(SOCKET))
            .map(|stream| Client { stream: BufReader::new(stream) })
            .map_err(|_| ClientError::NotRunning(state_dir.display().to_string()))
    }

    /// Connects, starting the agent detached first when it does not run: `program agent
    /// --state-dir DIR` in its own session-less process group, output to
    /// `logs/agent.log`.
    pub fn connect_or_start(state_dir: &Path, program: &Path) -> Result<Client, ClientError> {
        if let Ok(client) = Client::connect(state_dir) {
            return Ok(client);
        }
        let logs = state_dir.join("logs");
        crate::private_dir(state_dir)
            .and_then(|()| crate::private_dir(&logs))
            .map_err(|e| ClientError::Start(format!("{}: {e}", logs.display())))?;
        let log = std::os::unix::fs::OpenOptionsExt::mode(fs::OpenOptions::new().create(true).append(true), 0o600)
            .open(logs.join("agent.log"))
            .map_err(|e| ClientError::Start(e.to_string()))?;
        let state_dir = absolute(state_dir);
        Command::new(program)
            .arg("agent")
            .arg("--state-dir")
            .arg(&state_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| ClientError::Start(e.to_string()))?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| ClientError::Start(format!("{}: {e}", program.display())))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(client) = Client::connect(&state_dir) {
                return Ok(client);
            }
            if Instant::now() > deadline {
                return Err(ClientError::Start(format!(
                    "it did not answer within 10s; see {}",
                    state_dir.join("logs/agent.log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Sends one request and reads its answer; an error answer becomes [`ClientError::Refused`].
    pub fn request(&mut self, request: &Request) -> Result<Response, ClientError> {
        let mut line = serde_json::to_string(request).expect("a request serializes");
        line.push('\n');
        self.stream.get_mut().write_all(line.as_bytes())?;
        let mut answer = String::new();
        if self.stream.read_line(&mut answer)? == 0 {
            return Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the agent closed the connection",
            )));
        }
        match serde_json::from_str(&answer).map_err(|e| ClientError::Io(e.into()))? {
            Response::Error { message } => Err(ClientError::Refused(message)),
            response => Ok(response),
        }
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
