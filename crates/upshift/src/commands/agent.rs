//! `upshift agent`: the supervisor of the process driver, in the foreground or detached;
//! `upshift agent stop` ends it and every process it supervises.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Serialize;
use upshift_agent::{Client, ClientError, Request};

use crate::cli::{AgentCommand, GlobalArgs};
use crate::printer::Printer;
use crate::settings::manifest;

#[derive(Serialize)]
struct AgentJson<'a> {
    state_dir: &'a Path,
    running: bool,
}

pub(crate) fn run(
    global: &GlobalArgs,
    state_dir: Option<&Path>,
    detach: bool,
    command: Option<&AgentCommand>,
    printer: &Printer,
) -> anyhow::Result<()> {
    let state_dir = match state_dir {
        Some(dir) => dir.to_path_buf(),
        None => manifest(global)?.map_or_else(|| PathBuf::from(".upshift"), |m| m.state_dir),
    };
    match command {
        Some(AgentCommand::Log { path }) => {
            upshift_agent::log_writer::run(path, &mut std::io::stdin().lock(), upshift_agent::log_writer::limit())
                .with_context(|| format!("writing the log {}", path.display()))
        }
        Some(AgentCommand::Stop) => {
            // An agent that died (kill -9, OOM) left its processes running: start a new one,
            // which adopts them, so that stopping it stops them too.
            let connected = match Client::connect(&state_dir) {
                Err(ClientError::NotRunning(_)) if state_dir.join("agent.json").exists() => {
                    let program = std::env::current_exe().context("finding the upshift binary")?;
                    printer.progress("the agent was not running; starting one to stop what the last one left running");
                    Client::connect_or_start(&state_dir, &program)
                }
                other => other,
            };
            match connected {
                Ok(mut client) => {
                    client.request(&Request::Shutdown).context("stopping the agent")?;
                    // Wait for it to let go of its socket, so a new agent can start at once.
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                    while Client::connect(&state_dir).is_ok() && std::time::Instant::now() < deadline {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                }
                Err(ClientError::NotRunning(_)) => printer.progress("the agent was not running"),
                Err(e) => return Err(e.into()),
            }
            printer.result(&AgentJson { state_dir: &state_dir, running: false }, || "agent stopped\n".to_owned())
        }
        None if detach => {
            let program = std::env::current_exe().context("finding the upshift binary")?;
            Client::connect_or_start(&state_dir, &program)?;
            printer.result(&AgentJson { state_dir: &state_dir, running: true }, || {
                format!("agent running for {}\n", state_dir.display())
            })
        }
        None => {
            init_logging();
            Ok(upshift_agent::run(&state_dir)?)
        }
    }
}

/// The agent logs with `tracing` on stderr (its `logs/agent.log` when detached): UTC time,
/// level, message and fields. `UPSHIFT_LOG` filters like `RUST_LOG` (`debug`,
/// `upshift_agent=debug,hyper=warn`); the default is `info`.
fn init_logging() {
    let filter = std::env::var("UPSHIFT_LOG")
        .ok()
        .and_then(|text| text.parse::<tracing_subscriber::filter::Targets>().ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new().with_default(tracing_subscriber::filter::LevelFilter::INFO)
        });
    let subscriber = tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).finish();
    let _ = tracing::subscriber::set_global_default(tracing_subscriber::layer::SubscriberExt::with(subscriber, filter));
}
