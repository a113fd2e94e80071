//! Keeps instances running: starts them, restarts one that exits on its own (with backoff),
//! stops them gracefully, writes their output to rotated log files, and saves what should
//! run to `agent.json` so a restarted agent starts it again.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::protocol::{InstanceStatus, Spec};

/// A log file is rotated (to `<name>.1`) when it grows past this.
const LOG_LIMIT: u64 = 10 * 1024 * 1024;
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
}

/// Whether `pid` is alive and runs `spec`'s program (so a reused pid is left alone).
fn runs(pid: u32, spec: &Spec) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // A zombie (state Z) has exited already.
    let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
    let program = spec.command.first().map(String::as_bytes).unwrap_or_default();
    state != Some('Z') && !program.is_empty() && cmdline.split(|b| *b == 0).next() == Some(program)
}

struct Instance {
    spec: Spec,
    child: Option<Child>,
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

/// Appends lines to a log file, rotating it when it grows too large.
struct LogFile {
    path: PathBuf,
    file: File,
    size: u64,
}

impl LogFile {
    fn open(path: &Path) -> std::io::Result<LogFile> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(LogFile { path: path.to_path_buf(), file, size })
    }

    fn write_line(&mut self, line: &[u8]) {
        if self.size + line.len() as u64 > LOG_LIMIT {
            let rotated = self.path.with_extension("log.1");
            if fs::rename(&self.path, &rotated).is_ok()
                && let Ok(file) = OpenOptions::new().create(true).append(true).open(&self.path)
            {
                self.file = file;
                self.size = 0;
            }
        }
        if self.file.write_all(line).is_ok() {
            self.size += line.len() as u64;
        }
    }
}

fn pump(source: impl Read + Send + 'static, log: Arc<Mutex<LogFile>>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(source);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            log.lock().expect("log lock").write_line(&line);
            line.clear();
        }
    });
}

fn log_path(state_dir: &Path, spec: &Spec) -> PathBuf {
    state_dir.join("logs").join(format!("{}-{}.log", spec.component, spec.version))
}

fn spawn(spec: &Spec, log: &Path) -> std::io::Result<Child> {
    let (program, args) = spec
        .command
        .split_first()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"))?;
    if let Some(parent) = log.parent() {
        fs::create_dir_all(parent)?;
    }
    let log = Arc::new(Mutex::new(LogFile::open(log)?));
    let mut child = Command::new(program)
        .args(args)
        .envs(&spec.env)
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: signals meant for the agent do not reach it.
        .process_group(0)
        .spawn()?;
    pump(child.stdout.take().expect("piped"), Arc::clone(&log));
    pump(child.stderr.take().expect("piped"), log);
    Ok(child)
}

/// SIGTERM, up to `grace` to exit, then SIGKILL.
pub(crate) fn terminate(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Supervisor {
    /// A supervisor for `state_dir`, starting what `agent.json` says should run.
    pub(crate) fn new(state_dir: &Path) -> Arc<Supervisor> {
        let supervisor =
            Arc::new(Supervisor { state_dir: state_dir.to_path_buf(), instances: Mutex::new(BTreeMap::new()) });
        let saved: Vec<Saved> = fs::read_to_string(supervisor.saved_path())
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        for saved in saved {
            // A process the dead agent left running would hold its address: it is stopped
            // and started again under this agent (adopting it instead is future work).
            if let Some(pid) = saved.pid
                && runs(pid, &saved.spec)
            {
                let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
                let deadline = Instant::now() + Duration::from_secs(10);
                while runs(pid, &saved.spec) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if runs(pid, &saved.spec) {
                    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
                }
            }
            // Best effort: what cannot start is retried by the restart loop.
            let _ = supervisor.start(saved.spec);
        }
        supervisor
    }

    fn saved_path(&self) -> PathBuf {
        self.state_dir.join("agent.json")
    }

    /// Writes what should run, with each pid, atomically (temp file + rename).
    fn save(&self, instances: &BTreeMap<Key, Instance>) {
        let specs: Vec<Saved> =
            instances.values().map(|i| Saved { spec: i.spec.clone(), pid: i.child.as_ref().map(Child::id) }).collect();
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
            let _ = writeln!(std::io::stderr(), "could not save agent.json: {e}");
        }
    }

    /// Starts an instance; refuses when its slot already runs.
    pub(crate) fn start(&self, spec: Spec) -> Result<u32, String> {
        let key = (spec.component.clone(), spec.slot.clone());
        let mut instances = self.instances.lock().expect("instances lock");
        if let Some(existing) = instances.get_mut(&key)
            && existing.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
        {
            return Err(format!(
                "{} {} already runs {}; stop it first",
                spec.component, spec.slot, existing.spec.version
            ));
        }
        let log = log_path(&self.state_dir, &spec);
        let child = spawn(&spec, &log).map_err(|e| format!("could not start {}: {e}", spec.command.join(" ")))?;
        let pid = child.id();
        instances.insert(
            key,
            Instance {
                spec,
                child: Some(child),
                started_at: Instant::now(),
                restarts: 0,
                backoff: FIRST_BACKOFF,
                restart_at: None,
                log,
            },
        );
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
                if let Some(child) = instance.child.as_mut() {
                    terminate(child, grace);
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
                let running = i.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)));
                InstanceStatus {
                    spec: i.spec.clone(),
                    pid: running.then(|| i.child.as_ref().map(Child::id)).flatten(),
                    running,
                    restarts: i.restarts,
                    log: i.log.clone(),
                }
            })
            .collect()
    }

    /// Restarts instances that exited on their own, with backoff.
    pub(crate) fn tick(&self) {
        let mut instances = self.instances.lock().expect("instances lock");
        let now = Instant::now();
        for instance in instances.values_mut() {
            if let Some(child) = instance.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let ran = now.duration_since(instance.started_at);
                if ran >= STABLE_AFTER {
                    instance.backoff = FIRST_BACKOFF;
                }
                let note = format!(
                    "[upshift agent] {} {} exited ({status}) after {}; restarting in {}\n",
                    instance.spec.component,
                    instance.spec.version,
                    humantime::format_duration(Duration::from_secs(ran.as_secs())),
                    humantime::format_duration(instance.backoff)
                );
                if let Ok(mut log) = LogFile::open(&instance.log) {
                    log.write_line(note.as_bytes());
                }
                instance.child = None;
                instance.restart_at = Some(now + instance.backoff);
                instance.backoff = (instance.backoff * 2).min(MAX_BACKOFF);
            }
            if instance.child.is_none() && instance.restart_at.is_some_and(|at| at <= now) {
                match spawn(&instance.spec, &instance.log) {
                    Ok(child) => {
                        instance.child = Some(child);
                        instance.started_at = now;
                        instance.restarts += 1;
                        instance.restart_at = None;
                    }
                    Err(_) => instance.restart_at = Some(now + instance.backoff),
                }
            }
        }
    }

    /// Stops everything and forgets it: `upshift agent stop`. (An agent that dies instead
    /// leaves `agent.json` as it was, and the next agent starts it all again.)
    pub(crate) fn shutdown(&self, grace: Duration) {
        let mut instances = std::mem::take(&mut *self.instances.lock().expect("instances lock"));
        self.save(&BTreeMap::new());
        for instance in instances.values_mut() {
            if let Some(child) = instance.child.as_mut() {
                terminate(child, grace);
            }
        }
    }
}
