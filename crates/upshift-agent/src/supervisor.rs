//! Keeps instances running: starts them, restarts one that exits on its own (with backoff),
//! stops them gracefully, sends their output to rotated log files, and saves what should
//! run (with each pid) to `agent.json`, so that an agent started after this one dies adopts
//! the processes still running and starts the others.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::protocol::{InstanceStatus, Spec};

/// The first restart waits this long; each quick exit doubles it, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A process that ran this long before exiting restarts with the first backoff again.
const STABLE_AFTER: Duration = Duration::from_secs(30);

type Key = (String, String);

/// An instance as `agent.json` keeps it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    #[serde(flatten)]
    spec: Spec,
    pid: Option<u32>,
    /// The process's start time (`/proc/<pid>/stat`, field 22), so a reused pid is not
    /// taken for it.
    #[serde(default)]
    started: Option<u64>,
}

/// The start time of `pid` in clock ticks after boot and its process group, when it is
/// alive (not a zombie).
fn identity(pid: u32) -> Option<(u64, u32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (in parentheses, which may hold spaces): state, then more.
    let rest = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    // Fields 5 (process group) and 22 (start time) of the line: the 3rd and 20th after
    // the command name.
    Some((fields.get(19)?.parse().ok()?, fields.get(2)?.parse().ok()?))
}

/// The start time of `pid`, when it is alive.
fn start_time(pid: u32) -> Option<u64> {
    identity(pid).map(|(started, _)| started)
}

/// Whether `pid` is the process that was saved: alive, started when it was, and the leader
/// of its own process group (the agent starts every instance as one). The pid and start
/// time identify a process whatever it runs, so an interpreter or a shebang script (whose
/// `argv[0]` is not the program in the spec) is adopted too. A record without a start time
/// (an older agent's) falls back to the program name.
fn runs(pid: u32, started: Option<u64>, spec: &Spec) -> bool {
    let Some((now, group)) = identity(pid) else { return false };
    if let Some(started) = started {
        return now == started && group == pid;
    }
    let program = spec.command.first().map(String::as_bytes).unwrap_or_default();
    fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| !program.is_empty() && cmdline.split(|b| *b == 0).next() == Some(program))
}

/// A running instance's process: a child of this agent, or one a previous agent started
/// and this one adopted (it cannot be waited for, so it is watched through `/proc`).
enum Process {
    Child(Child),
    Adopted { pid: u32, started: Option<u64> },
}

impl Process {
    fn pid(&self) -> u32 {
        match self {
            Process::Child(child) => child.id(),
            Process::Adopted { pid, .. } => *pid,
        }
    }

    /// `None` while it runs; how it ended once it has.
    fn exited(&mut self, spec: &Spec) -> Option<String> {
        match self {
            Process::Child(child) => match child.try_wait() {
                Ok(None) => None,
                Ok(Some(status)) => Some(status.to_string()),
                Err(e) => Some(e.to_string()),
            },
            Process::Adopted { pid, started } => (!runs(*pid, *started, spec)).then(|| "exited".to_owned()),
        }
    }

    fn started(&self) -> Option<u64> {
        match self {
            Process::Child(child) => start_time(child.id()),
            Process::Adopted { started, .. } => *started,
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL.
    fn terminate(&mut self, spec: &Spec, grace: Duration) {
        if self.exited(spec).is_some() {
            return;
        }
        // The whole process group: what `sh -c` or a wrapper started goes too.
        let group = format!("-{}", self.pid());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited(spec).is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        if let Process::Child(child) = self {
            let _ = child.wait();
        }
    }
}

struct Instance {
    spec: Spec,
    process: Option<Process>,
    started_at: Instant,
    restarts: u32,
    backoff: Duration,
    restart_at: Option<Instant>,
    log: PathBuf,
}

/// The supervisor of one state dir.
pub(crate) struct Supervisor {
    state_dir: PathBuf,
    instances: Mutex<BTreeMap<Key, Instance>>,
}

/// Appends one of the agent's own lines to an instance's log.
fn note(log: &Path, line: &str) {
    if let Ok(mut file) = OpenOptions::new().create(true).append(true).mode(0o600).open(log) {
        let _ = file.write_all(line.as_bytes());
    }
}

fn log_path(state_dir: &Path, spec: &Spec) -> PathBuf {
    state_dir.join("logs").join(format!("{}-{}.log", spec.component, spec.version))
}

/// The variable that names the state dir of the agent that started an instance.
const AGENT_DIR_VAR: &str = "UPSHIFT_AGENT_DIR";
/// The variable that holds an instance's spec (JSON): how a later agent finds and adopts
/// it when `agent.json` cannot say (damaged, or the agent died between start and save).
const INSTANCE_VAR: &str = "UPSHIFT_INSTANCE";

/// `state_dir` as instances name it.
fn agent_dir(state_dir: &Path) -> PathBuf {
    fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf())
}

/// The instances an agent of `state_dir` started that still run, found by their
/// environment: process-group leaders whose `UPSHIFT_AGENT_DIR` is this state dir, with
/// their spec, pid and start time.
fn find_instances(state_dir: &Path) -> Vec<(Spec, u32, u64)> {
    let wanted = agent_dir(state_dir);
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(environ) = fs::read(entry.path().join("environ")) else { continue };
        let mut dir = None;
        let mut spec = None;
        for pair in environ.split(|b| *b == 0) {
            let text = String::from_utf8_lossy(pair);
            if let Some(value) = text.strip_prefix(&format!("{AGENT_DIR_VAR}=")) {
                dir = Some(PathBuf::from(value));
            } else if let Some(value) = text.strip_prefix(&format!("{INSTANCE_VAR}=")) {
                spec = serde_json::from_str::<Spec>(value).ok();
            }
        }
        if let (Some(dir), Some(spec), Some((started, group))) = (dir, spec, identity(pid))
            && dir == wanted
            && group == pid
        {
            found.push((spec, pid, started));
        }
    }
    found
}

/// Starts `spec`'s process with its output going through a pipe to its own log writer
/// (`upshift agent log`, see `log_writer`), so both outlive this agent, a later agent can
/// adopt the process, and rotation loses nothing. Its environment names this agent's state
/// dir and holds its spec ([`find_instances`]).
fn spawn(spec: &Spec, log: &Path, state_dir: &Path) -> std::io::Result<Child> {
    let (program, args) = spec
        .command
        .split_first()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"))?;
    if let Some(parent) = log.parent() {
        crate::private_dir(parent)?;
    }
    let mut writer = Command::new(std::env::current_exe()?)
        .args(["agent", "log"])
        .arg(log)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own group: stopping the component does not cut its last lines off.
        .process_group(0)
        .spawn()?;
    let pipe: std::os::fd::OwnedFd = writer.stdin.take().expect("piped").into();
    let output = pipe.try_clone()?;
    // Reaped when it ends (after the component and its children close the pipe).
    std::thread::spawn(move || writer.wait());
    let marker = serde_json::to_string(spec).map_err(std::io::Error::other)?;
    Command::new(program)
        .args(args)
        .envs(&spec.env)
        .env(AGENT_DIR_VAR, agent_dir(state_dir))
        .env(INSTANCE_VAR, marker)
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(output)
        .stderr(pipe)
        // Its own process group: signals meant for the agent do not reach it.
        .process_group(0)
        .spawn()
}

impl Supervisor {
    /// A supervisor for `state_dir`: adopts the processes a previous agent left running
    /// (they keep serving through the restart) and starts what `agent.json` says should run
    /// but does not.
    pub(crate) fn new(state_dir: &Path) -> Arc<Supervisor> {
        let supervisor =
            Arc::new(Supervisor { state_dir: state_dir.to_path_buf(), instances: Mutex::new(BTreeMap::new()) });
        // A damaged agent.json is recovered from the running instances alone.
        let saved: Vec<Saved> = crate::read_state(&supervisor.saved_path()).unwrap_or_default();
        // What runs, found by its environment: the instances agent.json names but whose
        // pid it lost (an agent killed between start and save), and those it cannot name.
        let mut running: BTreeMap<Key, (Spec, u32, u64)> = find_instances(state_dir)
            .into_iter()
            .map(|(spec, pid, started)| ((spec.component.clone(), spec.slot.clone()), (spec, pid, started)))
            .collect();
        for saved in saved {
            let key = (saved.spec.component.clone(), saved.spec.slot.clone());
            match saved.pid {
                Some(pid) if runs(pid, saved.started, &saved.spec) => {
                    running.remove(&key);
                    supervisor.adopt(saved.spec, pid, saved.started, "from the previous agent");
                }
                _ => match running.remove(&key) {
                    Some((spec, pid, started)) => {
                        supervisor.adopt(spec, pid, Some(started), "found by its environment");
                    }
                    // Best effort: what cannot start is retried by the restart loop.
                    None => drop(supervisor.start(saved.spec)),
                },
            }
        }
        for (spec, pid, started) in running.into_values() {
            supervisor.adopt(spec, pid, Some(started), "found by its environment (agent.json did not name it)");
        }
        supervisor
    }

    /// Takes a running process on as `spec`'s instance.
    fn adopt(&self, spec: Spec, pid: u32, started: Option<u64>, how: &str) {
        let mut instances = self.instances.lock().expect("instances lock");
        let log = log_path(&self.state_dir, &spec);
        note(&log, &format!("[upshift agent] adopted pid {pid} {how}\n"));
        tracing::info!(component = %spec.component, version = %spec.version, slot = %spec.slot, pid, how, "adopted");
        let key = (spec.component.clone(), spec.slot.clone());
        instances.insert(key, Instance::new(spec, Process::Adopted { pid, started }, log));
        self.save(&instances);
    }

    fn saved_path(&self) -> PathBuf {
        self.state_dir.join("agent.json")
    }

    /// Writes what should run, with each pid, atomically (temp file + rename).
    fn save(&self, instances: &BTreeMap<Key, Instance>) {
        let specs: Vec<Saved> = instances
            .values()
            .map(|i| Saved {
                spec: i.spec.clone(),
                pid: i.process.as_ref().map(Process::pid),
                started: i.process.as_ref().and_then(Process::started),
            })
            .collect();
        // The specs hold each process's environment (secrets included): owner-only.
        let temp = self.state_dir.join("agent.json.tmp");
        let written = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .and_then(|mut file| {
                file.write_all(&serde_json::to_vec_pretty(&specs).expect("specs serialize"))?;
                file.sync_all()
            })
            .and_then(|()| fs::rename(&temp, self.saved_path()));
        if let Err(e) = written {
            tracing::error!(error = %e, "could not save agent.json");
        }
    }

    /// Starts an instance; refuses when its slot already runs.
    pub(crate) fn start(&self, spec: Spec) -> Result<u32, String> {
        let key = (spec.component.clone(), spec.slot.clone());
        let mut instances = self.instances.lock().expect("instances lock");
        if let Some(existing) = instances.get_mut(&key)
            && let Some(process) = existing.process.as_mut()
            && process.exited(&existing.spec).is_none()
        {
            return Err(format!(
                "{} {} already runs {}; stop it first",
                spec.component, spec.slot, existing.spec.version
            ));
        }
        let log = log_path(&self.state_dir, &spec);
        let child = spawn(&spec, &log, &self.state_dir)
            .map_err(|e| format!("could not start {}: {e}", spec.command.join(" ")))?;
        let pid = child.id();
        instances.insert(key, Instance::new(spec, Process::Child(child), log));
        self.save(&instances);
        Ok(pid)
    }

    /// Stops an instance and forgets it.
    pub(crate) fn stop(&self, component: &str, slot: &str, grace: Duration) -> Result<(), String> {
        let removed = {
            let mut instances = self.instances.lock().expect("instances lock");
            let removed = instances.remove(&(component.to_owned(), slot.to_owned()));
            self.save(&instances);
            removed
        };
        match removed {
            Some(mut instance) => {
                if let Some(process) = instance.process.as_mut() {
                    process.terminate(&instance.spec, grace);
                }
                Ok(())
            }
            None => Err(format!("no instance {component} {slot}")),
        }
    }

    /// Every instance.
    pub(crate) fn status(&self) -> Vec<InstanceStatus> {
        let mut instances = self.instances.lock().expect("instances lock");
        instances
            .values_mut()
            .map(|i| {
                let spec = &i.spec;
                let pid = i.process.as_mut().and_then(|p| p.exited(spec).is_none().then(|| p.pid()));
                InstanceStatus {
                    spec: spec.clone(),
                    pid,
                    running: pid.is_some(),
                    restarts: i.restarts,
                    log: i.log.clone(),
                }
            })
            .collect()
    }

    /// Restarts instances that exited on their own, with backoff, and rotates their logs.
    pub(crate) fn tick(&self) {
        let mut instances = self.instances.lock().expect("instances lock");
        let now = Instant::now();
        let mut changed = false;
        for instance in instances.values_mut() {
            let spec = &instance.spec;
            if let Some(how) = instance.process.as_mut().and_then(|p| p.exited(spec)) {
                let ran = now.duration_since(instance.started_at);
                if ran >= STABLE_AFTER {
                    instance.backoff = FIRST_BACKOFF;
                }
                note(
                    &instance.log,
                    &format!(
                        "[upshift agent] {} {} exited ({how}) after {}; restarting in {}\n",
                        spec.component,
                        spec.version,
                        humantime::format_duration(Duration::from_secs(ran.as_secs())),
                        humantime::format_duration(instance.backoff)
                    ),
                );
                tracing::warn!(
                    component = %spec.component,
                    version = %spec.version,
                    slot = %spec.slot,
                    how = %how,
                    backoff_ms = u64::try_from(instance.backoff.as_millis()).unwrap_or(u64::MAX),
                    "exited on its own; restarting"
                );
                instance.process = None;
                instance.restart_at = Some(now + instance.backoff);
                instance.backoff = (instance.backoff * 2).min(MAX_BACKOFF);
            }
            if instance.process.is_none() && instance.restart_at.is_some_and(|at| at <= now) {
                match spawn(&instance.spec, &instance.log, &self.state_dir) {
                    Ok(child) => {
                        instance.process = Some(Process::Child(child));
                        instance.started_at = now;
                        instance.restarts += 1;
                        instance.restart_at = None;
                        changed = true;
                    }
                    Err(_) => instance.restart_at = Some(now + instance.backoff),
                }
            }
        }
        // The new pids, for an agent that adopts them later.
        if changed {
            self.save(&instances);
        }
    }

    /// Stops everything and forgets it: `upshift agent stop`. (An agent that dies instead
    /// leaves `agent.json` as it was, and the next agent adopts what still runs.)
    pub(crate) fn shutdown(&self, grace: Duration) {
        let mut instances = std::mem::take(&mut *self.instances.lock().expect("instances lock"));
        self.save(&BTreeMap::new());
        for instance in instances.values_mut() {
            if let Some(process) = instance.process.as_mut() {
                process.terminate(&instance.spec, grace);
            }
        }
    }
}

impl Instance {
    fn new(spec: Spec, process: Process, log: PathBuf) -> Instance {
        Instance {
            spec,
            process: Some(process),
            started_at: Instant::now(),
            restarts: 0,
            backoff: FIRST_BACKOFF,
            restart_at: None,
            log,
        }
    }
}
