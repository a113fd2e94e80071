//! The saga's contract, as a reusable harness: a fake driver (in memory, with scriptable
//! failures), a lab (a manifest, real migrations and a real SQLite database in a folder),
//! scenarios (upgrades that pass, upgrades that fail and are undone, rollbacks), and a crash
//! switch that stops a run right after its Nth journal write, for every N.
//!
//! After each crash, `resume` or `abort` (each itself crashed at each of its writes, then run
//! again) must converge: no run in flight, the version the journal says is deployed is the
//! version every driver says runs, the schema is that version's, and a row written before
//! the crash is still there unless the undo restored a backup. Running the undo again is a
//! no-op. The checks go through the [`Driver`] trait only, so a new driver passes the same
//! suite by giving the lab its drivers.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::json;
use upshift_migrate::DatabaseUrl;

use crate::driver::{ComponentStatus, Deployed, Driver, DriverError, Drivers};
use crate::journal::Journal;
use crate::manifest::{Component, DriverKind, Manifest};
use crate::plan::{PlanInput, UndoDepth};
use crate::runner::{self, Context, Outcome, RunError};

/// What the fake driver runs, shared by every handle (like processes outliving a crash).
#[derive(Clone, Debug, Default)]
pub struct FakeWorld {
    /// Component name to the version it runs.
    pub running: BTreeMap<String, String>,
    /// Versions whose health check fails once deployed.
    pub unhealthy: BTreeSet<String>,
    /// Versions whose artifacts are gone (`check_put_back` refuses them).
    pub missing: BTreeSet<String>,
    /// The next this many `put_back` calls fail.
    pub failing_put_backs: u32,
    /// Every call, for tests that count them.
    pub calls: Vec<String>,
}

/// A driver that runs nothing: it keeps what "runs" in a [`FakeWorld`].
#[derive(Clone, Default)]
pub struct FakeDriver {
    /// The world it changes.
    pub world: Arc<Mutex<FakeWorld>>,
}

impl FakeDriver {
    fn with<T>(&self, work: impl FnOnce(&mut FakeWorld) -> T) -> T {
        work(&mut self.world.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Driver for FakeDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Process
    }

    fn current(&mut self, component: &Component) -> Result<Option<Deployed>, DriverError> {
        Ok(self.with(|w| w.running.get(&component.name).cloned()).map(|v| Deployed::new(&v, component, json!({}))))
    }

    fn deploy(&mut self, component: &Component, version: &str, _say: &dyn Fn(&str)) -> Result<(), DriverError> {
        self.with(|w| {
            w.calls.push(format!("deploy {} {version}", component.name));
            w.running.insert(component.name.clone(), version.to_owned());
            if w.unhealthy.contains(version) {
                Err(DriverError::Unhealthy(format!("{} {version}: not healthy within 1s", component.name)))
            } else {
                Ok(())
            }
        })
    }

    fn put_back(&mut self, component: &Component, previous: Option<&Deployed>) -> Result<(), DriverError> {
        self.with(|w| {
            w.calls.push(format!("put back {} {:?}", component.name, previous.map(|p| &p.version)));
            if w.failing_put_backs > 0 {
                w.failing_put_backs -= 1;
                return Err(DriverError::Unavailable("the fake engine is down".into()));
            }
            match previous {
                Some(previous) => w.running.insert(component.name.clone(), previous.version.clone()),
                None => w.running.remove(&component.name),
            };
            Ok(())
        })
    }

    fn check_put_back(&mut self, previous: &Deployed, _fallback: &Component) -> Result<(), DriverError> {
        if self.with(|w| w.missing.contains(&previous.version)) {
            return Err(DriverError::Refused(format!("release {} is gone", previous.version)));
        }
        Ok(())
    }

    fn preflight(&mut self, component: &Component, version: &str) -> Result<(), DriverError> {
        if self.with(|w| w.missing.contains(version)) {
            return Err(DriverError::Refused(format!("{} {version}: release {version} is gone", component.name)));
        }
        Ok(())
    }

    fn check_health(&mut self, component: &Component) -> Result<(), DriverError> {
        match self.with(|w| w.running.get(&component.name).cloned()) {
            Some(version) if self.with(|w| w.unhealthy.contains(&version)) => {
                Err(DriverError::Unhealthy(format!("{} {version} is not healthy", component.name)))
            }
            Some(_) => Ok(()),
            None => Err(DriverError::Unhealthy(format!("{} is not deployed", component.name))),
        }
    }

    fn status(&mut self, component: &Component) -> Result<ComponentStatus, DriverError> {
        let version = self.with(|w| w.running.get(&component.name).cloned());
        let health = self.check_health(component);
        Ok(ComponentStatus {
            healthy: health.is_ok(),
            problem: health.err().map(|e| e.to_string()),
            version,
            ..ComponentStatus::default()
        })
    }
}

/// The lab's migrations: 1 creates `notes`; 2 (expand) adds `tags`; 3 (contract) drops
/// `notes.title`; 4 (expand) adds an index. All have down sections.
pub const MIGRATIONS: &[(&str, &str)] = &[
    (
        "1_create_notes.sql",
        "-- upshift:up\nCREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL, title TEXT);\n-- upshift:down\nDROP TABLE notes;\n",
    ),
    (
        "2_add_tags.sql",
        "-- upshift:up\nCREATE TABLE tags (id INTEGER PRIMARY KEY, note_id INTEGER NOT NULL, name TEXT NOT NULL);\n-- upshift:down\nDROP TABLE tags;\n",
    ),
    (
        "3_drop_title.sql",
        "-- upshift:phase contract\n-- upshift:up\nALTER TABLE notes DROP COLUMN title;\n-- upshift:down\nALTER TABLE notes ADD COLUMN title TEXT;\n",
    ),
    (
        "4_index_body.sql",
        "-- upshift:up\nCREATE INDEX notes_body ON notes (body);\n-- upshift:down\nDROP INDEX notes_body;\n",
    ),
];

/// The revisions each release's schema has.
pub fn schema_of(version: &str) -> BTreeSet<String> {
    let ids: &[&str] = match version {
        "1.0.0" => &["1"],
        "2.0.0" | "3.0.0" => &["1", "2", "3"],
        "2.1.0" => &["1", "2", "3", "4"],
        _ => &[],
    };
    ids.iter().map(|s| (*s).to_owned()).collect()
}

/// The lab's manifest: two components (an api and a worker) and four releases; 3.0.0 (and
/// 2.1.0 when [`FakeWorld::unhealthy`] says so) fails its health check.
pub const MANIFEST: &str = r#"[app]
name = "lab"

[database]
url = "sqlite:lab.db"

[[components]]
name = "api"
driver = "process"
run = ["lab", "{version}"]

[[components]]
name = "worker"
driver = "process"
run = ["lab-worker", "{version}"]

[[releases]]
version = "1.0.0"
migrate_to = "1"

[[releases]]
version = "2.0.0"
migrate_to = "3"

[[releases]]
version = "2.1.0"
migrate_to = "4"

[[releases]]
version = "3.0.0"
migrate_to = "4"
"#;

/// Makes the drivers a lab's runs use.
pub type LabDrivers = Arc<dyn Fn(&Lab) -> Drivers + Send + Sync>;

/// A test's folder: the manifest, migrations, database, journal and backups, and the
/// drivers its runs use (the fake driver unless [`Lab::with_drivers`] says otherwise).
pub struct Lab {
    /// The folder.
    pub dir: PathBuf,
    /// The fake driver's world.
    pub world: Arc<Mutex<FakeWorld>>,
    drivers: LabDrivers,
}

/// The fake driver over the lab's world.
fn fake_drivers(lab: &Lab) -> Drivers {
    let mut drivers = Drivers::new();
    drivers.register(Box::new(FakeDriver { world: Arc::clone(&lab.world) }));
    drivers
}

/// Stops a run after the journal's Nth write, as a crash would (the panic unwinds to the
/// harness; everything the run held is dropped, the database rolls back its open
/// transaction, the fake world keeps what "runs").
#[derive(Debug)]
pub struct Crash(pub u64);

/// Which command to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// `upgrade --to VERSION`.
    Upgrade(&'a str),
    /// `rollback`.
    Rollback,
    /// `rollback --to-revision N`.
    RollbackTo(i64),
    /// `resume`.
    Resume,
    /// `abort`.
    Abort,
}

/// How a command ended in the lab.
#[derive(Debug)]
pub enum Ended {
    /// It returned.
    Returned(Result<Outcome, RunError>),
    /// The crash switch stopped it.
    Crashed,
}

impl Lab {
    /// A lab in `dir` (which should be empty), nothing deployed.
    pub fn new(dir: &Path) -> Lab {
        std::fs::create_dir_all(dir.join("migrations")).expect("lab folder");
        std::fs::write(dir.join("upshift.toml"), MANIFEST).expect("lab manifest");
        for (name, text) in MIGRATIONS {
            std::fs::write(dir.join("migrations").join(name), text).expect("lab migration");
        }
        Lab { dir: dir.to_path_buf(), world: Arc::default(), drivers: Arc::new(fake_drivers) }
    }

    /// A lab whose runs use the drivers `make` gives (a real driver under the contract);
    /// its manifest's components must suit them.
    #[must_use]
    pub fn with_drivers(mut self, make: LabDrivers) -> Lab {
        self.drivers = make;
        self
    }

    /// A copy of this lab in `dir`: files and the fake world.
    #[must_use]
    pub fn fork(&self, dir: &Path) -> Lab {
        copy_tree(&self.dir, dir);
        let world = self.world.lock().unwrap_or_else(PoisonError::into_inner).clone();
        Lab { dir: dir.to_path_buf(), world: Arc::new(Mutex::new(world)), drivers: Arc::clone(&self.drivers) }
    }

    /// The lab's manifest.
    pub fn manifest(&self) -> Manifest {
        Manifest::load(&self.dir.join("upshift.toml"), |_| None).expect("the lab manifest loads")
    }

    /// The lab's database.
    pub fn url(&self) -> DatabaseUrl {
        DatabaseUrl::parse(&format!("sqlite:{}", self.dir.join("lab.db").display())).expect("a SQLite URL")
    }

    /// Runs `command`, stopped after the journal's `crash_at`-th write when given; returns
    /// how it ended and how many journal writes it committed.
    pub fn run(&self, command: Command<'_>, crash_at: Option<u64>) -> (Ended, u64) {
        let mut manifest = self.manifest();
        manifest.database_url = Some(self.url().to_string());
        let url = self.url();
        let mut drivers = (self.drivers)(self);
        let interrupted = AtomicBool::new(false);
        let writes = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&writes);
        let result = catch_unwind(AssertUnwindSafe(|| {
            let mut journal = Journal::open(&manifest.state_dir).expect("the lab journal opens");
            journal.set_write_hook(Box::new(move |write| {
                counter.store(write, Ordering::SeqCst);
                if crash_at == Some(write) {
                    std::panic::panic_any(Crash(write));
                }
            }));
            let mut ctx = Context {
                manifest: &manifest,
                database: Some(&url),
                drivers: &mut drivers,
                say: &|_| {},
                interrupted: &interrupted,
                lock_timeout: Duration::from_secs(5),
            };
            match command {
                Command::Upgrade(version) => {
                    let plan = plan(&manifest, &url, &journal, version)?;
                    runner::upgrade(&mut ctx, &mut journal, &plan)
                }
                Command::Rollback => runner::rollback(&mut ctx, &mut journal, None),
                Command::RollbackTo(n) => runner::rollback(&mut ctx, &mut journal, Some(n)),
                Command::Resume => runner::resume(&mut ctx, &mut journal),
                Command::Abort => runner::abort(&mut ctx, &mut journal),
            }
        }));
        let ended = match result {
            Ok(returned) => Ended::Returned(returned),
            Err(payload) if payload.is::<Crash>() => Ended::Crashed,
            Err(payload) => std::panic::resume_unwind(payload),
        };
        (ended, writes.load(Ordering::SeqCst))
    }

    /// Runs `command` to its end and returns its outcome; panics on a refusal.
    pub fn must(&self, command: Command<'_>) -> Outcome {
        match self.run(command, None).0 {
            Ended::Returned(Ok(outcome)) => outcome,
            other => panic!("{command:?} did not finish: {other:?}"),
        }
    }

    /// The journal writes `command` commits when nothing stops it, run on a fork of this
    /// lab in `scratch` (removed afterwards).
    pub fn writes_of(&self, command: Command<'_>, scratch: &Path) -> u64 {
        let fork = self.fork(scratch);
        let (_, writes) = fork.run(command, None);
        let _ = std::fs::remove_dir_all(scratch);
        writes
    }

    /// Writes a row into `notes`; returns its id.
    pub fn write_row(&self, body: &str) -> i64 {
        let connection = rusqlite::Connection::open(self.dir.join("lab.db")).expect("the lab database opens");
        connection.execute("INSERT INTO notes (body) VALUES (?1)", [body]).expect("a row is written");
        connection.last_insert_rowid()
    }

    /// Whether the row with this body is there.
    pub fn has_row(&self, body: &str) -> bool {
        let connection = rusqlite::Connection::open(self.dir.join("lab.db")).expect("the lab database opens");
        connection
            .query_row("SELECT count(*) FROM notes WHERE body = ?1", [body], |r| r.get::<_, i64>(0))
            .is_ok_and(|n| n == 1)
    }

    /// The applied revisions.
    pub fn applied(&self) -> BTreeSet<String> {
        let mut engine = upshift_migrate::connect(&self.url(), true).expect("the lab database opens");
        engine.applied().expect("the applied set reads").into_iter().map(|r| r.id).collect()
    }

    /// Checks that the lab converged: nothing in flight, the journal's deployed version is
    /// what every driver runs, and the schema is that version's. Returns the version.
    pub fn converged(&self) -> Result<Option<String>, String> {
        let manifest = self.manifest();
        let journal = Journal::open(&manifest.state_dir).map_err(|e| e.to_string())?;
        if let Some(run) = journal.in_flight().map_err(|e| e.to_string())? {
            return Err(format!("run {} is still {}", run.id, run.state.as_str()));
        }
        let deployed = journal.deployed().map_err(|e| e.to_string())?.map(|r| r.version);
        let mut drivers = (self.drivers)(self);
        for component in &manifest.components {
            let runs = drivers
                .get(component)
                .and_then(|d| d.current(component))
                .map_err(|e| e.to_string())?
                .map(|d| d.version);
            if runs != deployed {
                return Err(format!("the journal says {deployed:?} is deployed but {} runs {runs:?}", component.name));
            }
        }
        let expected = deployed.as_deref().map(schema_of).unwrap_or_default();
        let applied = self.applied();
        if applied != expected {
            return Err(format!("{deployed:?} is deployed but the schema has {applied:?}, not {expected:?}"));
        }
        Ok(deployed)
    }

    /// The undo depth of the last run, if it chose one.
    pub fn last_undo(&self) -> Option<UndoDepth> {
        let journal = Journal::open(&self.manifest().state_dir).ok()?;
        journal.last_run().ok().flatten().and_then(|r| r.undo.map(|u| u.depth))
    }
}

fn plan(manifest: &Manifest, url: &DatabaseUrl, journal: &Journal, version: &str) -> Result<crate::Plan, RunError> {
    let target: semver::Version = version.parse().expect("a lab version");
    let deployed = journal.deployed()?.map(|r| r.version.parse().expect("semver in the journal"));
    let migrator = manifest.migrations().map_err(|e| RunError::Preflight(e.to_string()))?;
    let applied =
        migrator.connect(url, true).and_then(|mut e| e.applied()).map_err(|e| RunError::Preflight(e.to_string()))?;
    Ok(crate::plan(&PlanInput {
        manifest,
        target: &target,
        deployed: deployed.as_ref(),
        migrations: Some(crate::plan::Migrations { migrator: &migrator, applied: &applied, dialect: url.dialect() }),
        database: Some(url.to_string()),
        no_backup: false,
        options: &BTreeSet::new(),
        only: &[],
        behind: &[],
    })?)
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("a folder");
    for entry in std::fs::read_dir(from).expect("a readable folder").flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            copy_tree(&entry.path(), &target);
        } else if entry.file_name() != "run.lock" {
            std::fs::copy(entry.path(), &target).expect("a copy");
        }
    }
}
