//! The runner against the fake driver: release semantics, refusals that change nothing,
//! and undos that check everything before their first action.

use upshift_core::contract::{Command, Ended, Lab};
use upshift_core::journal::{Journal, ReleaseStatus, RunState};
use upshift_core::plan::UndoDepth;
use upshift_core::runner::{Outcome, RunError};

fn lab(setup: &[&str]) -> (tempfile::TempDir, Lab) {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::new(dir.path());
    for version in setup {
        assert!(matches!(lab.must(Command::Upgrade(version)), Outcome::Succeeded { .. }), "setup {version}");
    }
    (dir, lab)
}

fn refused(lab: &Lab, command: Command<'_>) -> String {
    match lab.run(command, None).0 {
        Ended::Returned(Err(RunError::Refused(message))) => message,
        other => panic!("{command:?} was not refused: {other:?}"),
    }
}

fn history(lab: &Lab) -> Vec<(i64, String, ReleaseStatus)> {
    let journal = Journal::open(&lab.manifest().state_dir).unwrap();
    journal.releases().unwrap().into_iter().map(|r| (r.revision, r.version, r.status)).collect()
}

fn calls(lab: &Lab) -> usize {
    lab.world.lock().unwrap().calls.len()
}

#[test]
fn a_second_rollback_is_refused_and_changes_nothing() {
    let (_dir, lab) = lab(&["1.0.0", "2.0.0"]);
    assert!(matches!(lab.must(Command::Rollback), Outcome::Succeeded { revision: 3 }));
    assert_eq!(lab.last_undo(), Some(UndoDepth::Restore));
    assert_eq!(lab.converged().unwrap().as_deref(), Some("1.0.0"));
    lab.write_row("written at 1.0.0 after the rollback");
    let before = calls(&lab);
    let message = refused(&lab, Command::Rollback);
    assert!(message.contains("no earlier release"), "{message}");
    assert_eq!(calls(&lab), before, "a refused rollback called the driver");
    assert!(lab.has_row("written at 1.0.0 after the rollback"));
    assert_eq!(lab.converged().unwrap().as_deref(), Some("1.0.0"));
    assert_eq!(
        history(&lab),
        [
            (1, "1.0.0".into(), ReleaseStatus::Superseded),
            (2, "2.0.0".into(), ReleaseStatus::RolledBack),
            (3, "1.0.0".into(), ReleaseStatus::Deployed)
        ]
    );
}

#[test]
fn rollbacks_follow_the_line_of_releases() {
    let (_dir, lab) = lab(&["1.0.0", "2.0.0", "2.1.0"]);
    // 2.1.0 only ran an expand revision: code + down.
    lab.must(Command::Rollback);
    assert_eq!(lab.last_undo(), Some(UndoDepth::CodeAndDown));
    assert_eq!(lab.converged().unwrap().as_deref(), Some("2.0.0"));
    // Upgrading again, then rolling back twice, goes 2.1.0 -> 2.0.0 -> 1.0.0.
    lab.must(Command::Upgrade("2.1.0"));
    lab.must(Command::Rollback);
    assert_eq!(lab.converged().unwrap().as_deref(), Some("2.0.0"));
    lab.must(Command::Rollback);
    assert_eq!(lab.converged().unwrap().as_deref(), Some("1.0.0"));
    assert!(refused(&lab, Command::Rollback).contains("no earlier release"));
}

#[test]
fn rollback_to_a_revision_refuses_what_was_never_an_earlier_deployed_release() {
    let (_dir, lab) = lab(&["1.0.0", "2.0.0"]);
    lab.world.lock().unwrap().unhealthy.insert("3.0.0".into());
    assert!(matches!(lab.must(Command::Upgrade("3.0.0")), Outcome::RolledBack { depth: UndoDepth::CodeAndDown, .. }));
    let before = calls(&lab);
    assert!(refused(&lab, Command::RollbackTo(3)).contains("never deployed"));
    assert!(refused(&lab, Command::RollbackTo(9)).contains("does not exist"));
    assert!(refused(&lab, Command::RollbackTo(2)).contains("deployed now"));
    assert_eq!(calls(&lab), before);
    // Back two releases at once: 2.0.0 by restore of the backup taken before it.
    lab.must(Command::Upgrade("2.1.0"));
    assert!(matches!(lab.must(Command::RollbackTo(1)), Outcome::Succeeded { .. }));
    assert_eq!(lab.converged().unwrap().as_deref(), Some("1.0.0"));
    // Revision 4 (2.1.0) is not behind 1.0.0: it is an upgrade now.
    assert!(refused(&lab, Command::RollbackTo(4)).contains("upshift upgrade --to 2.1.0"));
}

#[test]
fn a_rollback_whose_backup_is_damaged_touches_nothing() {
    let (_dir, lab) = lab(&["1.0.0", "2.0.0"]);
    let backups = lab.dir.join(".upshift/backups");
    for entry in std::fs::read_dir(&backups).unwrap().flatten().filter(|e| e.path().is_dir()) {
        for file in std::fs::read_dir(entry.path().join("db")).unwrap().flatten() {
            std::fs::write(file.path(), b"garbage").unwrap();
        }
    }
    let before = calls(&lab);
    match lab.run(Command::Rollback, None).0 {
        Ended::Returned(Err(RunError::Preflight(message))) => {
            assert!(message.contains("cannot be restored") && message.contains("nothing was changed"), "{message}");
        }
        other => panic!("not refused: {other:?}"),
    }
    assert_eq!(calls(&lab), before, "the driver was called");
    assert_eq!(lab.converged().unwrap().as_deref(), Some("2.0.0"));
}

#[test]
fn a_rollback_whose_old_release_is_gone_touches_nothing() {
    let (_dir, lab) = lab(&["1.0.0", "2.0.0", "2.1.0"]);
    lab.world.lock().unwrap().missing.insert("2.0.0".into());
    match lab.run(Command::Rollback, None).0 {
        Ended::Returned(Err(RunError::Preflight(message))) => assert!(message.contains("2.0.0 is gone"), "{message}"),
        other => panic!("not refused: {other:?}"),
    }
    assert_eq!(lab.converged().unwrap().as_deref(), Some("2.1.0"));
}

#[test]
fn a_failed_undo_is_stuck_and_abort_finishes_it() {
    let (_dir, lab) = lab(&["1.0.0", "2.0.0"]);
    {
        let mut world = lab.world.lock().unwrap();
        world.unhealthy.insert("2.1.0".into());
        world.failing_put_backs = 1;
    }
    assert!(matches!(lab.must(Command::Upgrade("2.1.0")), Outcome::Stuck { .. }));
    let journal = Journal::open(&lab.manifest().state_dir).unwrap();
    let run = journal.in_flight().unwrap().expect("the stuck run stays in the journal");
    assert_eq!(run.state, RunState::Stuck);
    assert_eq!(run.undo.map(|u| u.depth), Some(UndoDepth::CodeAndDown));
    drop(journal);
    // A new upgrade is refused while it is in flight.
    assert!(matches!(lab.run(Command::Upgrade("2.1.0"), None).0, Ended::Returned(Err(RunError::Journal(_)))));
    assert!(matches!(lab.must(Command::Abort), Outcome::RolledBack { depth: UndoDepth::CodeAndDown, .. }));
    assert_eq!(lab.converged().unwrap().as_deref(), Some("2.0.0"));
}

#[test]
fn an_undo_that_cannot_start_leaves_the_run_stuck_and_untouched() {
    let (_dir, lab) = lab(&["1.0.0", "2.0.0"]);
    {
        let mut world = lab.world.lock().unwrap();
        world.unhealthy.insert("2.1.0".into());
        world.missing.insert("2.0.0".into());
    }
    match lab.must(Command::Upgrade("2.1.0")) {
        Outcome::Stuck { undo_failure, .. } => assert!(undo_failure.contains("2.0.0 is gone"), "{undo_failure}"),
        other => panic!("not stuck: {other:?}"),
    }
    // The new code still runs and revision 4 is still applied: nothing was half-undone.
    assert_eq!(lab.world.lock().unwrap().running["api"], "2.1.0");
    assert!(lab.applied().contains("4"));
    lab.world.lock().unwrap().missing.clear();
    assert!(matches!(lab.must(Command::Resume), Outcome::RolledBack { .. }));
    assert_eq!(lab.converged().unwrap().as_deref(), Some("2.0.0"));
}

/// Regression: a `no-transaction` revision that failed after some of its statements was
/// undone as "nothing was changed", leaving those statements applied. Only the backup can
/// undo what no bookkeeping row records.
#[test]
fn a_half_applied_no_transaction_revision_is_undone_by_restore() {
    let (_dir, lab) = lab(&["1.0.0", "2.0.0", "2.1.0"]);
    std::fs::write(
        lab.dir.join("migrations/5_half.sql"),
        "-- upshift:no-transaction\n-- upshift:up\nCREATE TABLE half (id int);\nSELECT * FROM no_such_table;\n-- upshift:down\nDROP TABLE half;\n",
    )
    .unwrap();
    let manifest = std::fs::read_to_string(lab.dir.join("upshift.toml")).unwrap();
    std::fs::write(
        lab.dir.join("upshift.toml"),
        format!("{manifest}\n[[releases]]\nversion = \"2.2.0\"\nmigrate_to = \"5\"\n"),
    )
    .unwrap();
    match lab.must(Command::Upgrade("2.2.0")) {
        Outcome::RolledBack { depth, why, failure } => {
            assert_eq!(depth, UndoDepth::Restore, "{why}");
            assert!(
                why.contains("runs without a transaction") && failure.contains("no_such_table"),
                "{why}; {failure}"
            );
        }
        other => panic!("{other:?}"),
    }
    let connection = rusqlite::Connection::open(lab.dir.join("lab.db")).unwrap();
    let half: i64 =
        connection.query_row("SELECT count(*) FROM sqlite_master WHERE name = 'half'", [], |r| r.get(0)).unwrap();
    assert_eq!(half, 0, "the half-applied statement stayed");
    assert_eq!(lab.converged().unwrap().as_deref(), Some("2.1.0"));
}
