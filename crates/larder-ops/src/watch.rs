//! What `larder watch-store` and `larder watch-exec` do: push every path that becomes valid in the
//! local store (watch-exec: every path its command builds).
//!
//! The Nix database is polled read-only for `ValidPaths` rows newer than the last one seen
//! ([`DbStore::valid_since`]). Only valid paths have rows, so a path is never pushed while it is
//! still being built or substituted (Cachix's watcher follows lock files and can crash when a
//! lock disappears before its path is valid). At most [`CHUNK`] new rows are read and pushed at
//! a time, so a flood of new paths costs time, not memory. On SIGINT/SIGTERM (or when
//! watch-exec's command exits) the watcher reads the database one last time and pushes what is
//! left before exiting.
//!
//! watch-exec prefers Nix's `post-build-hook` when Nix will run a hook the user sets (single-user
//! install, root, or a user in the daemon's `trusted-users`): the command runs with
//! `NIX_CONFIG` adding a hook that appends each build's outputs to a spool file, which is read
//! like the database. That pushes exactly what the command built (not what other processes
//! added to the store meanwhile); `--mode store` watches the store instead.
//!
//! While the server is unreachable a round waits 1 s, 2 s, 4 s, … up to a minute between tries
//! (`backon`'s exponential backoff). Progress lines go to stderr.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use larder_client::local_store::{default_db_path, DbStore, LocalStoreError, NewPath};
use larder_nix::store_path::StorePath;

use crate::pusher::{server_backoff, LineObserver, Pusher, MAX_BACKOFF};
use crate::shell::{find_nix_store, shell_quote};

/// New paths read and pushed per round.
const CHUNK: usize = 500;

/// What stopped a watch.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch the store: {0}")]
    OpenDb(#[source] LocalStoreError),
    #[error("cannot read the Nix database")]
    ReadDb(#[source] LocalStoreError),
    #[error("cannot read the hook's spool {}", .path.display())]
    Spool {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}", .path.display())]
    WriteHook {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl WatchError {
    /// The fix to try.
    pub fn hint(&self) -> Option<String> {
        match self {
            WatchError::OpenDb(_) => Some(
                "watching reads the Nix database; run as a user who can read it (root on a \
                 single-user install), or use the post-build hook instead (`larder daemon hook`)"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// What a watch pushed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub pushed: usize,
    pub bytes: u64,
    pub failed: usize,
}

/// What a watch reads and how often.
#[derive(Debug, Clone, Copy)]
pub struct WatchOptions {
    /// Also push new .drv files and sources (by default only outputs).
    pub include_drv: bool,
    /// How often to look for new paths.
    pub interval: Duration,
}

/// The Nix database, opened read-only to watch it.
pub fn open_db() -> Result<DbStore, WatchError> {
    DbStore::open(&default_db_path()).map_err(WatchError::OpenDb)
}

fn wanted(p: &NewPath, include_drv: bool) -> bool {
    include_drv || !(p.is_drv() || p.is_source())
}

/// Where new paths come from, read in rounds of at most [`CHUNK`].
pub enum Source {
    /// `ValidPaths` rows after the cursor (a row id).
    Db(DbStore),
    /// Lines appended by the post-build-hook after the cursor (a byte offset).
    Spool(PathBuf),
}

/// One round: the paths to push, the cursor after them, whether more may be waiting.
struct Round {
    roots: Vec<StorePath>,
    next: i64,
    full: bool,
}

impl Source {
    /// The cursor now: what becomes valid after this point is pushed.
    pub fn start(&self) -> Result<i64, WatchError> {
        match self {
            Source::Db(db) => db.last_valid_id().map_err(WatchError::ReadDb),
            Source::Spool(_) => Ok(0),
        }
    }

    fn read(&self, cursor: i64, include_drv: bool) -> Result<Round, WatchError> {
        match self {
            Source::Db(db) => {
                let rows = db.valid_since(cursor, CHUNK).map_err(WatchError::ReadDb)?;
                Ok(Round {
                    full: rows.len() == CHUNK,
                    next: rows.last().map_or(cursor, |r| r.id),
                    roots: rows
                        .iter()
                        .filter(|r| wanted(r, include_drv))
                        .filter_map(|r| StorePath::from_absolute(&r.path).ok())
                        .collect(),
                })
            }
            Source::Spool(file) => read_spool(file, cursor),
        }
    }
}

/// Complete lines of the spool after byte `from` (a line still being written is left for
/// the next round), at most [`CHUNK`] of them.
fn read_spool(file: &Path, from: i64) -> Result<Round, WatchError> {
    use std::io::{Read, Seek, SeekFrom};
    let fail = |source| WatchError::Spool {
        path: file.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(file).map_err(fail)?;
    f.seek(SeekFrom::Start(from as u64)).map_err(fail)?;
    let mut buf = Vec::new();
    f.take(CHUNK as u64 * 256)
        .read_to_end(&mut buf)
        .map_err(fail)?;
    let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
        return Ok(Round {
            roots: Vec::new(),
            next: from,
            full: false,
        });
    };
    let text = String::from_utf8_lossy(&buf[..end]);
    let mut roots = Vec::new();
    let mut lines = 0;
    let mut used = 0;
    for line in text.split('\n') {
        if lines == CHUNK {
            break;
        }
        lines += 1;
        used += line.len() + 1;
        match StorePath::from_absolute(line.trim()) {
            Ok(p) if !roots.contains(&p) => roots.push(p),
            Ok(_) => {}
            Err(_) if line.trim().is_empty() => {}
            Err(e) => eprintln!("note: the hook reported {line:?}, not a store path: {e}"),
        }
    }
    Ok(Round {
        roots,
        next: from + used as i64,
        full: lines == CHUNK || buf.len() == CHUNK * 256,
    })
}

/// Push new paths after `cursor` (from [`Source::start`]) until `stop` completes, then drain
/// what is left.
pub async fn watch_until(
    pusher: &mut Pusher,
    source: &Source,
    mut cursor: i64,
    opts: WatchOptions,
    stop: impl Future<Output = ()>,
) -> Result<Totals, WatchError> {
    let interval = opts.interval.max(Duration::from_millis(10));
    let observer = Arc::new(LineObserver { prefix: "" });
    let mut totals = Totals::default();
    let mut delays = server_backoff();
    tokio::pin!(stop);
    let mut stopping = false;
    loop {
        let Round {
            roots,
            next: next_cursor,
            full,
        } = source.read(cursor, opts.include_drv)?;
        if !roots.is_empty() {
            let n = roots.len();
            match pusher.push(roots, observer.clone()).await {
                Ok(batch) => {
                    totals.pushed += batch.summary.pushed;
                    totals.bytes += batch.summary.bytes;
                    totals.failed += batch.summary.failed;
                    for p in &batch.invalid {
                        eprintln!("note: skipped {p}: no longer valid (garbage-collected?)");
                    }
                    delays = server_backoff();
                }
                Err(e) => {
                    let wait = delays.next().unwrap_or(MAX_BACKOFF);
                    eprintln!(
                        "cannot push new paths, retrying in {}s: {}",
                        wait.as_secs(),
                        larder_client::push::error_line(&e)
                    );
                    if stopping {
                        eprintln!("warning: stopping with new paths not pushed");
                        totals.failed += n;
                        return Ok(totals);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = &mut stop => stopping = true,
                    }
                    continue;
                }
            }
        }
        cursor = next_cursor;
        if full {
            continue;
        }
        if stopping {
            return Ok(totals);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            // One more round reads what became valid up to now, then we return.
            _ = &mut stop => stopping = true,
        }
    }
}

/// watch-exec's hook: append the build's outputs to `spool`, one per line, and never fail the
/// build. Nix 2.8.0 runs post-build hooks with an empty `$OUT_PATHS`; the outputs of
/// `$DRV_PATH` are asked of `nix-store` then.
pub fn write_exec_hook(script: &Path, spool: &Path) -> Result<(), WatchError> {
    use std::os::unix::fs::PermissionsExt;
    let text = format!(
        "#!/bin/sh\n\
         # larder watch-exec post-build-hook: note what was built for the running watch-exec.\n\
         set -f\n\
         paths=$OUT_PATHS\n\
         if [ -z \"$paths\" ] && [ -n \"$DRV_PATH\" ]; then\n  \
         paths=$({} -q --outputs \"$DRV_PATH\" 2>/dev/null)\n\
         fi\n\
         for p in $paths; do printf '%s\\n' \"$p\" >> {} 2>/dev/null; done\n\
         exit 0\n",
        shell_quote(&find_nix_store()),
        shell_quote(&spool.display().to_string()),
    );
    let fail = |source| WatchError::WriteHook {
        path: script.to_path_buf(),
        source,
    };
    std::fs::write(script, text).map_err(fail)?;
    std::fs::set_permissions(script, std::fs::Permissions::from_mode(0o755)).map_err(fail)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn spool_is_read_by_complete_lines() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("built");
        let a = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a";
        let b = "/nix/store/ffffffffffffffffffffffffffffffff-b";
        std::fs::write(&f, format!("{a}\n{a}\nnot a path\n{b}")).unwrap();
        let r = read_spool(&f, 0).unwrap();
        assert_eq!(r.roots.len(), 1, "duplicates are pushed once");
        assert_eq!(r.next as usize, 2 * (a.len() + 1) + "not a path\n".len());
        assert!(!r.full);
        // The half-written line is read once it is complete.
        std::fs::write(&f, format!("{a}\n{a}\nnot a path\n{b}\n")).unwrap();
        let r2 = read_spool(&f, r.next).unwrap();
        assert_eq!(r2.roots.len(), 1);
        assert_eq!(r2.roots[0].to_string(), b);
        let r3 = read_spool(&f, r2.next).unwrap();
        assert!(r3.roots.is_empty() && r3.next == r2.next);
    }

    #[test]
    fn exec_hook_appends_the_outputs_to_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("hook");
        write_exec_hook(&script, &dir.path().join("my spool")).unwrap();
        let text = std::fs::read_to_string(&script).unwrap();
        assert!(text.contains(&format!(">> '{}/my spool'", dir.path().display())));
        assert!(text.ends_with("exit 0\n"));
    }
}
