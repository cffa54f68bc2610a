//! One `larder serve` per embedded data directory.
//!
//! On SQLite the background work (eviction, garbage collection, the orphan scan) takes no
//! lock between processes ([`larder_store::Metadata::try_lock`] is a no-op there): a second
//! server on the same data directory would collect garbage in the same database and object
//! directory as the first. So a server on SQLite holds an exclusive `flock(2)` on
//! `DATA/lock` for its whole life; the kernel releases it when the process ends, however it
//! ends, so a crash leaves nothing stale behind. The file holds the holder's pid, for the
//! message the next one prints.
//!
//! On PostgreSQL nothing is locked: replicas coordinate through the database, and may share
//! one `file://` object directory (or even one data directory) on purpose.

use std::io::{Read, Seek, Write};
use std::path::PathBuf;

use larder_store::meta::Engine;

use crate::Config;

/// The lock file's name inside the data directory.
pub const LOCK_FILE: &str = "lock";

/// The held lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another larder serve is using {} ({})", dir.display(), match pid {
        Some(p) => format!("pid {p}"),
        None => "pid unknown".to_owned(),
    })]
    Busy { dir: PathBuf, pid: Option<u32> },
    #[error("cannot lock {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Take the data directory's lock if this configuration needs one (the database is SQLite),
/// creating the directory if needed. `Ok(None)`: nothing to lock (PostgreSQL).
pub fn lock_data_dir(config: &Config) -> Result<Option<DataDirLock>, LockError> {
    if Engine::of_url(&config.database) != Some(Engine::Sqlite) {
        return Ok(None);
    }
    let dir = &config.data_dir;
    let path = dir.join(LOCK_FILE);
    let io = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    crate::create_data_dir(dir).map_err(io)?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
            return Err(LockError::Busy {
                dir: dir.clone(),
                pid: holder_pid(&mut file),
            })
        }
        Err(e) => return Err(io(e.into())),
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(Some(DataDirLock { _file: file }))
}

/// The pid the lock's holder wrote (none if it has not written it yet).
fn holder_pid(file: &mut std::fs::File) -> Option<u32> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;
    use crate::config::ConfigFile;
    use std::path::Path;

    fn config(dir: &Path, database: Option<&str>) -> Config {
        let file = ConfigFile {
            database: database.map(str::to_owned),
            ..ConfigFile::default()
        };
        Config::resolve(file, dir.to_owned()).unwrap()
    }

    #[test]
    fn one_holder_per_sqlite_data_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let first = lock_data_dir(&config(&data, None)).unwrap();
        assert!(first.is_some(), "SQLite takes the lock");
        let pid = std::fs::read_to_string(data.join(LOCK_FILE)).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        // flock belongs to the open file, so a second open in this process conflicts too,
        // as a second process would.
        match lock_data_dir(&config(&data, None)) {
            Err(e @ LockError::Busy { .. }) => {
                let msg = e.to_string();
                assert_eq!(
                    msg,
                    format!(
                        "another larder serve is using {} (pid {})",
                        data.display(),
                        std::process::id()
                    )
                );
            }
            other => panic!("second lock: {other:?}"),
        }
        drop(first);
        assert!(lock_data_dir(&config(&data, None)).unwrap().is_some());
    }

    #[test]
    fn postgres_takes_no_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let pg = Some("postgres://larder@127.0.0.1:1/larder");
        let a = lock_data_dir(&config(tmp.path(), pg)).unwrap();
        let b = lock_data_dir(&config(tmp.path(), pg)).unwrap();
        assert!(a.is_none() && b.is_none());
        assert!(!tmp.path().join(LOCK_FILE).exists());
    }
}
