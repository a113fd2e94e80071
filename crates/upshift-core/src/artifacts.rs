//! `[[backup.artifacts]]`: state that is not the database (a vault raft snapshot, a
//! Qdrant snapshot, a Redis dump), made and put back by the manifest's commands, stored in
//! the backup beside the dump (compressed, checksummed, encrypted like it).

use std::path::Path;

use upshift_backup::{ArtifactSource, BackupManifest, Identities, Store};

use crate::command::{Options, run_with};
use crate::manifest::{BackupArtifact, Manifest};

/// Calls `with` with the manifest's artifacts as the sources of a backup
/// ([`upshift_backup::CreateOptions::artifacts`]), each made by [`create`].
pub fn with_sources<T>(manifest: &Manifest, with: impl FnOnce(&[ArtifactSource<'_>]) -> T) -> T {
    type Make<'m> = Box<dyn Fn(&Path) -> Result<(), String> + 'm>;
    let makers: Vec<Make<'_>> = manifest
        .backup
        .artifacts
        .iter()
        .map(|artifact| Box::new(move |out: &Path| create(manifest, artifact, out)) as Make<'_>)
        .collect();
    let sources: Vec<ArtifactSource<'_>> = manifest
        .backup
        .artifacts
        .iter()
        .zip(&makers)
        .map(|(artifact, make)| ArtifactSource { name: &artifact.name, make: make.as_ref() })
        .collect();
    with(&sources)
}

/// Runs `artifact`'s `create` so that the artifact ends up in the file `out`: the command
/// writes `{out}`, or (without `{out}`) its stdout is the artifact.
pub fn create(manifest: &Manifest, artifact: &BackupArtifact, out: &Path) -> Result<(), String> {
    let writes_out = artifact.create.iter().any(|a| a.contains("{out}"));
    let argv = fill(&artifact.create, "{out}", out);
    let options = Options { stdout_file: (!writes_out).then_some(out), ..Options::default() };
    finish(manifest, &argv, run_with(&argv, artifact.timeout, &options))?;
    if !out.is_file() {
        return Err(format!("`{}` exited 0 but wrote no {}", manifest.redact(&argv.join(" ")), out.display()));
    }
    Ok(())
}

/// Checks that every artifact of `backup` can be put back: the manifest has a
/// `[[backup.artifacts]]` of that name (its `restore` command).
pub fn check_restorable(manifest: &Manifest, backup: &BackupManifest) -> Result<(), String> {
    for name in &backup.artifacts {
        if !manifest.backup.artifacts.iter().any(|a| &a.name == name) {
            return Err(format!(
                "backup {} holds artifact `{name}`, and the manifest has no [[backup.artifacts]] named so to restore it",
                backup.id
            ));
        }
    }
    Ok(())
}

/// Puts back every artifact of `backup` with its `restore` command: each is decompressed
/// into a file that the command reads as `{in}` (or as its stdin), removed afterwards.
pub fn restore_all(
    manifest: &Manifest,
    store: &Store,
    backup: &BackupManifest,
    identities: Option<&Identities>,
    say: &dyn Fn(&str),
) -> Result<(), String> {
    check_restorable(manifest, backup)?;
    for name in &backup.artifacts {
        let artifact = manifest.backup.artifacts.iter().find(|a| &a.name == name).expect("checked");
        let file = store.dir().join(format!(".artifact-{}-{name}", backup.id));
        // A copy left by a crash is stale: it is made again.
        let _ = std::fs::remove_file(&file);
        let result = upshift_backup::extract_artifact(store, &backup.id, name, &file, identities)
            .map_err(|e| crate::runner::chain(&e))
            .and_then(|()| {
                let reads_in = artifact.restore.iter().any(|a| a.contains("{in}"));
                let argv = fill(&artifact.restore, "{in}", &file);
                let options = Options { stdin_file: (!reads_in).then_some(file.as_path()), ..Options::default() };
                finish(manifest, &argv, run_with(&argv, artifact.timeout, &options))
            });
        let _ = std::fs::remove_file(&file);
        result.map_err(|e| format!("restoring artifact {name}: {e}"))?;
        say(&format!("  restored artifact {name}"));
    }
    Ok(())
}

fn fill(argv: &[String], placeholder: &str, path: &Path) -> Vec<String> {
    argv.iter().map(|a| a.replace(placeholder, &path.to_string_lossy())).collect()
}

/// A command's end as a result, redacted.
fn finish(manifest: &Manifest, argv: &[String], ran: Result<crate::command::Finished, String>) -> Result<(), String> {
    ran.and_then(|done| done.success(argv)).map(drop).map_err(|e| manifest.redact(&e))
}
