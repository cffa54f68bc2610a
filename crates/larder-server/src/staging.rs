//! Who owns a staging file, so that what a killed server left behind is removed and nothing a
//! live one is writing is touched.
//!
//! Every upload is received into a staging file first (`upload-…` for a NAR, `spool-…` for a
//! multi-part part or a build log). A server deletes its own when a request ends, but a
//! `kill -9`, a crash or a power cut leaves them. Each server process therefore takes an owner
//! id at start, holds an exclusive `flock` on `owner-<id>.lock` in the staging directory for
//! its whole life, and names its files `upload-<id>-…`, `spool-<id>-…`. [`Staging::sweep`]
//! (at start and at every background tick) deletes the files of every owner whose lock can be
//! taken, that is, whose process is gone, and files named before owners existed. Several
//! replicas sharing one staging directory (a `file://` store on a shared file system) each
//! keep what they are writing.
//!
//! Multi-part uploads (`multipart-…` directories) outlive the process on purpose, so a client
//! can resume them; they expire by age (`publish::remove_stale_multipart`). Only the partial
//! `spool-…` files inside them are swept here.

use std::fs::File;
use std::path::{Path, PathBuf};

/// This process's claim on its staging files.
pub struct Staging {
    dir: PathBuf,
    id: String,
    /// Holds the exclusive flock on `owner-<id>.lock` until the process ends.
    _lock: File,
}

/// The kinds of staging file (name prefixes) the sweep may delete.
const KINDS: &[&str] = &["upload", "spool"];

impl Staging {
    /// Take a new owner id in `dir` (created if missing) and lock it.
    pub fn open(dir: &Path) -> std::io::Result<Staging> {
        use rustix::fs::{flock, FlockOperation};
        std::fs::create_dir_all(dir)?;
        let mut raw = [0u8; 8];
        getrandom::getrandom(&mut raw).map_err(std::io::Error::other)?;
        let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let lock = File::create(dir.join(format!("owner-{id}.lock")))?;
        flock(&lock, FlockOperation::NonBlockingLockExclusive)?;
        Ok(Staging {
            dir: dir.to_owned(),
            id,
            _lock: lock,
        })
    }

    /// The staging directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new staging file of `kind` (`upload` or `spool`) in `dir` (the staging directory or
    /// one of its multi-part directories), named for this owner; deleted when dropped.
    pub fn tempfile(&self, kind: &str, dir: &Path) -> std::io::Result<tempfile::NamedTempFile> {
        self.later(kind, dir).make()
    }

    /// What [`Staging::tempfile`] would make, to make later (on another thread, and only
    /// if it turns out to be needed).
    pub fn later(&self, kind: &str, dir: &Path) -> Later {
        debug_assert!(KINDS.contains(&kind));
        Later {
            dir: dir.to_owned(),
            prefix: format!("{kind}-{}-", self.id),
        }
    }

    /// Delete the staging files of owners that are gone (their lock is free), with their lock
    /// files, in the staging directory and in its multi-part directories. Returns how many
    /// files were deleted; failures are skipped (the next sweep tries again).
    pub fn sweep(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut live = std::collections::HashMap::new();
        let mut dirs = vec![self.dir.clone()];
        let mut removed = 0;
        for entry in entries.map_while(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("multipart-") {
                dirs.push(entry.path());
            }
        }
        for dir in &dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.map_while(Result::ok) {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(owner) = staged_owner(&name) else {
                    continue;
                };
                let alive = *live
                    .entry(owner.clone())
                    .or_insert_with(|| self.owner_alive(owner.as_deref()));
                if !alive && std::fs::remove_file(entry.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        // The lock files of owners found gone, and of gone owners that left no file.
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.map_while(Result::ok) {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(owner) = name
                    .strip_prefix("owner-")
                    .and_then(|rest| rest.strip_suffix(".lock"))
                else {
                    continue;
                };
                if owner != self.id && !self.owner_alive(Some(owner)) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        removed
    }

    /// Whether the process that owns `owner` still runs: its lock file exists and is locked.
    /// Files without an owner (`None`, named by an older larder) belong to nobody alive.
    fn owner_alive(&self, owner: Option<&str>) -> bool {
        use rustix::fs::{flock, FlockOperation};
        let Some(owner) = owner else { return false };
        if owner == self.id {
            return true;
        }
        let Ok(lock) = File::open(self.dir.join(format!("owner-{owner}.lock"))) else {
            return false;
        };
        // Taken: its owner is gone (the lock is dropped with the file handle right after).
        flock(&lock, FlockOperation::NonBlockingLockShared).is_err()
    }
}

/// For a staging file name: `Some(Some(owner))` for `KIND-OWNER-RANDOM`, `Some(None)` for a
/// staging file without an owner (`KIND` followed by tempfile's random suffix, as older
/// versions named them), `None` for anything else (left alone).
fn staged_owner(name: &str) -> Option<Option<String>> {
    let rest = KINDS
        .iter()
        .find_map(|kind| name.strip_prefix(kind)?.strip_prefix('-'))?;
    Some(match rest.split_once('-') {
        Some((owner, _)) if owner.len() == 16 && owner.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(owner.to_owned())
        }
        _ => None,
    })
}

/// A staging file not made yet ([`Staging::later`]).
#[derive(Debug, Clone)]
pub struct Later {
    dir: PathBuf,
    prefix: String,
}

impl Later {
    /// Make the file; deleted when dropped.
    pub fn make(&self) -> std::io::Result<tempfile::NamedTempFile> {
        tempfile::Builder::new()
            .prefix(&self.prefix)
            .tempfile_in(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_their_owner() {
        assert_eq!(
            staged_owner("upload-0123456789abcdef-XyZ123"),
            Some(Some("0123456789abcdef".into()))
        );
        assert_eq!(staged_owner("spool-Ab12Cd"), Some(None));
        assert_eq!(staged_owner("part-000001"), None);
        assert_eq!(staged_owner("owner-0123456789abcdef.lock"), None);
        assert_eq!(staged_owner("uploader"), None);
    }

    #[test]
    fn a_sweep_removes_only_what_dead_owners_left() {
        let dir = tempfile::tempdir().unwrap();
        let dead = Staging::open(dir.path()).unwrap();
        let dead_file = dead
            .tempfile("upload", dir.path())
            .unwrap()
            .keep()
            .unwrap()
            .1;
        let mp = dir.path().join("multipart-1-00");
        std::fs::create_dir(&mp).unwrap();
        std::fs::write(mp.join("part-000000"), "verified part").unwrap();
        let dead_spool = dead.tempfile("spool", &mp).unwrap().keep().unwrap().1;
        let legacy = dir.path().join("upload-AbC123");
        std::fs::write(&legacy, "from an older larder").unwrap();
        drop(dead);

        let alive = Staging::open(dir.path()).unwrap();
        let alive_file = alive.tempfile("upload", dir.path()).unwrap();
        let me = Staging::open(dir.path()).unwrap();
        let mine = me.tempfile("spool", dir.path()).unwrap();
        assert_eq!(me.sweep(), 3);
        assert!(!dead_file.exists() && !dead_spool.exists() && !legacy.exists());
        assert!(alive_file.path().exists() && mine.path().exists());
        assert!(mp.join("part-000000").exists(), "verified parts stay");
        let locks: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("owner-"))
            .collect();
        assert_eq!(locks.len(), 2, "the dead owner's lock is gone: {locks:?}");
    }
}
