//! The crash-at-every-write suite on the fake driver: for each scenario, the run is stopped
//! after its Nth journal write for every N; then `resume` and `abort` are each stopped after
//! their Mth write for every M and run again; every path must converge (see
//! `upshift_core::contract`). The labs live on tmpfs when there is one: the suite makes
//! thousands of journal commits, and fsync is not what it tests.
#![allow(clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::sync::Once;

use upshift_core::contract::{Command, Crash, Ended, Lab};
use upshift_core::plan::UndoDepth;
use upshift_core::runner::{Outcome, RunError};

fn quiet_crashes() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<Crash>() {
                default(info);
            }
        }));
    });
}

fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::Builder::new().prefix("upshift-saga").tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

struct Scenario {
    name: &'static str,
    /// Commands that bring the lab to its starting point.
    setup: &'static [Command<'static>],
    /// Versions whose health check fails.
    unhealthy: &'static [&'static str],
    /// The command crashed at every write.
    command: Command<'static>,
    /// Where `resume` ends (when the crash left the run in flight).
    after_resume: Option<&'static str>,
    /// Where `abort` ends.
    after_abort: Option<&'static str>,
}

/// Runs a recovery to its end. `Nothing` (the crash came after the run's last write) is fine.
fn recover(lab: &Lab, recovery: Command<'_>) {
    match lab.run(recovery, None).0 {
        Ended::Returned(Ok(Outcome::Stuck { failure, undo_failure })) => {
            panic!("{recovery:?} got stuck: {failure}; {undo_failure}")
        }
        Ended::Returned(Ok(_) | Err(RunError::Nothing(_))) => {}
        other => panic!("{recovery:?} failed: {other:?}"),
    }
}

/// Checks a lab after a recovery: converged to `expected`, rows intact, the undo a no-op
/// when run again.
fn check(lab: &Lab, scenario: &Scenario, expected: Option<&str>, context: &str) {
    let version = lab.converged().unwrap_or_else(|e| panic!("{context}: {e}"));
    assert_eq!(version.as_deref(), expected, "{context}");
    let restored = lab.last_undo() == Some(UndoDepth::Restore);
    if !scenario.setup.is_empty() {
        // An upgrade's backup is taken after the row was written, so even a restore keeps
        // it; a rollback restores a backup older than it, which the user asked for.
        let before_kept = !restored || matches!(scenario.command, Command::Upgrade(_));
        assert!(!before_kept || lab.has_row("before"), "{context}: the row written before the run is gone");
        assert!(restored || lab.has_row("after-crash"), "{context}: the row written after the crash is gone");
    }
    for again in [Command::Abort, Command::Resume] {
        match lab.run(again, None).0 {
            Ended::Returned(Err(RunError::Nothing(_))) => {}
            other => panic!("{context}: {again:?} again was not a no-op: {other:?}"),
        }
    }
    assert_eq!(lab.converged().unwrap().as_deref(), expected, "{context}: changed by a second undo");
}

fn run_scenario(scenario: &Scenario) -> usize {
    quiet_crashes();
    let root = scratch();
    let base = Lab::new(&root.path().join("base"));
    for command in scenario.setup {
        match base.must(*command) {
            Outcome::Succeeded { .. } => {}
            other => panic!("{}: setup {command:?}: {other:?}", scenario.name),
        }
    }
    base.world.lock().unwrap().unhealthy = scenario.unhealthy.iter().map(|v| (*v).to_owned()).collect();
    if !scenario.setup.is_empty() {
        base.write_row("before");
    }
    let dir = |name: String| -> PathBuf { root.path().join(name) };
    let writes = base.writes_of(scenario.command, &dir("count".into()));
    assert!(writes > 3, "{}: only {writes} journal writes", scenario.name);
    // Uncrashed, where it ends: for a crash after the last write.
    let clean = base.fork(&dir("clean".into()));
    let _ = clean.run(scenario.command, None);
    let finished = clean.converged().unwrap_or_else(|e| panic!("{}: uncrashed: {e}", scenario.name));
    let mut points = 0;
    for n in 1..=writes {
        let crashed = base.fork(&dir(format!("n{n}")));
        let (ended, _) = crashed.run(scenario.command, Some(n));
        assert!(matches!(ended, Ended::Crashed), "{}: write {n} of {writes} did not crash: {ended:?}", scenario.name);
        points += 1;
        if !scenario.setup.is_empty() {
            crashed.write_row("after-crash");
        }
        let in_flight = crashed.converged().is_err();
        for (recovery, target) in [(Command::Resume, scenario.after_resume), (Command::Abort, scenario.after_abort)] {
            let expected = if in_flight { target } else { finished.as_deref() };
            let context = format!("{}: crash at write {n}, then {recovery:?}", scenario.name);
            let inner = crashed.writes_of(recovery, &dir(format!("n{n}-count")));
            for m in 1..=inner {
                let twice = crashed.fork(&dir(format!("n{n}-{recovery:?}-m{m}")));
                let (ended, _) = twice.run(recovery, Some(m));
                assert!(matches!(ended, Ended::Crashed), "{context}: write {m} of {inner} did not crash");
                points += 1;
                // Picked up by either command: both must finish the same way.
                recover(&twice, recovery);
                check(&twice, scenario, expected, &format!("{context} crashed at its write {m}"));
                let _ = std::fs::remove_dir_all(&twice.dir);
            }
            let once = crashed.fork(&dir(format!("n{n}-{recovery:?}")));
            recover(&once, recovery);
            check(&once, scenario, expected, &context);
            let _ = std::fs::remove_dir_all(&once.dir);
        }
        let _ = std::fs::remove_dir_all(&crashed.dir);
    }
    eprintln!("{}: {writes} writes, {points} crash points, all converged", scenario.name);
    points
}

#[test]
fn first_deploy() {
    run_scenario(&Scenario {
        name: "first deploy of 1.0.0",
        setup: &[],
        unhealthy: &[],
        command: Command::Upgrade("1.0.0"),
        after_resume: Some("1.0.0"),
        after_abort: None,
    });
}

#[test]
fn upgrade_with_expand_and_contract() {
    run_scenario(&Scenario {
        name: "upgrade 1.0.0 -> 2.0.0",
        setup: &[Command::Upgrade("1.0.0")],
        unhealthy: &[],
        command: Command::Upgrade("2.0.0"),
        after_resume: Some("2.0.0"),
        after_abort: Some("1.0.0"),
    });
}

#[test]
fn failed_upgrade_undone_with_down() {
    run_scenario(&Scenario {
        name: "2.0.0 -> 2.1.0 fails its health check (code + down)",
        setup: &[Command::Upgrade("1.0.0"), Command::Upgrade("2.0.0")],
        unhealthy: &["2.1.0"],
        command: Command::Upgrade("2.1.0"),
        after_resume: Some("2.0.0"),
        after_abort: Some("2.0.0"),
    });
}

#[test]
fn failed_upgrade_undone_in_code() {
    run_scenario(&Scenario {
        name: "2.1.0 -> 3.0.0 fails its health check (code only)",
        setup: &[Command::Upgrade("1.0.0"), Command::Upgrade("2.0.0"), Command::Upgrade("2.1.0")],
        unhealthy: &["3.0.0"],
        command: Command::Upgrade("3.0.0"),
        after_resume: Some("2.1.0"),
        after_abort: Some("2.1.0"),
    });
}

#[test]
fn rollback_by_restore() {
    run_scenario(&Scenario {
        name: "rollback 2.0.0 -> 1.0.0 (restore)",
        setup: &[Command::Upgrade("1.0.0"), Command::Upgrade("2.0.0")],
        unhealthy: &[],
        command: Command::Rollback,
        after_resume: Some("1.0.0"),
        after_abort: Some("1.0.0"),
    });
}

#[test]
fn rollback_with_down() {
    run_scenario(&Scenario {
        name: "rollback 2.1.0 -> 2.0.0 (code + down)",
        setup: &[Command::Upgrade("1.0.0"), Command::Upgrade("2.0.0"), Command::Upgrade("2.1.0")],
        unhealthy: &[],
        command: Command::Rollback,
        after_resume: Some("2.0.0"),
        after_abort: Some("2.0.0"),
    });
}
