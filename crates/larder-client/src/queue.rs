//! The push daemon's durable queue: a small SQLite database of store paths waiting to be
//! pushed.
//!
//! An enqueue is one transaction with `synchronous=FULL`, so when [`Queue::enqueue`] returns
//! the rows are on disk: a crash, `kill -9` or reboot of the daemon afterwards loses nothing,
//! and the daemon resumes the rows still `queued` when it starts again. Rows move from
//! `queued` to `done` or `failed` (with the error); finished rows are kept for a while so that
//! `larder daemon push --wait` and `status` can report them, then pruned.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};

/// How long a write waits for another writer (the daemon and a fallback `daemon push`).
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
#[error("push queue {db}: {what}")]
pub struct QueueError {
    pub db: PathBuf,
    pub what: String,
    #[source]
    pub source: rusqlite::Error,
}

/// The state of one queued path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryState {
    Queued,
    Done,
    Failed(String),
    /// Pruned, or never there.
    Unknown,
}

/// Counts by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub queued: u64,
    pub done: u64,
    pub failed: u64,
}

/// The queue database, opened read-write.
#[derive(Debug)]
pub struct Queue {
    conn: Connection,
    path: PathBuf,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Queue {
    /// Open (creating if needed) the queue at `path`.
    pub fn open(path: &Path) -> Result<Self, QueueError> {
        let err = |what: &str| {
            let db = path.to_owned();
            let what = what.to_owned();
            move |source| QueueError { db, what, source }
        };
        let conn = Connection::open(path).map_err(err("cannot open"))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(err("cannot configure"))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=FULL;
             CREATE TABLE IF NOT EXISTS queue (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 path TEXT NOT NULL,
                 state TEXT NOT NULL DEFAULT 'queued',
                 error TEXT,
                 enqueued_at INTEGER NOT NULL,
                 finished_at INTEGER
             );
             CREATE INDEX IF NOT EXISTS queue_state ON queue(state, id);",
        )
        .map_err(err("cannot create the schema"))?;
        let queue = Self {
            conn,
            path: path.to_owned(),
        };
        queue.give_to_directory_owner();
        Ok(queue)
    }

    /// When root writes the queue of a user's daemon (nix-daemon runs the post-build hook as
    /// root, and the hook queues by itself while the daemon is down), the files it creates
    /// must stay writable by that user, or the daemon fails on its own queue: the database and
    /// its WAL files go to the owner of their directory.
    fn give_to_directory_owner(&self) {
        use std::os::unix::fs::MetadataExt;
        let Some(dir) = self.path.parent() else {
            return;
        };
        let Ok(owner) = std::fs::metadata(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        }) else {
            return;
        };
        if !rustix::process::geteuid().is_root() || owner.uid() == 0 {
            return;
        }
        let mut files = vec![self.path.clone()];
        for suffix in ["-wal", "-shm"] {
            let mut name = self.path.clone().into_os_string();
            name.push(suffix);
            files.push(PathBuf::from(name));
        }
        for f in files {
            // Missing WAL files appear later; the next open or enqueue hands them over.
            let _ = std::os::unix::fs::chown(&f, Some(owner.uid()), Some(owner.gid()));
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, what: &str) -> impl Fn(rusqlite::Error) -> QueueError {
        let db = self.path.clone();
        let what = what.to_owned();
        move |source| QueueError {
            db: db.clone(),
            what: what.clone(),
            source,
        }
    }

    /// Append `paths` durably (one fsync'd transaction); returns their entry ids.
    pub fn enqueue(&mut self, paths: &[String]) -> Result<Vec<i64>, QueueError> {
        let e = self.err("cannot enqueue");
        let tx = self.conn.transaction().map_err(&e)?;
        let mut ids = Vec::with_capacity(paths.len());
        {
            let mut st = tx
                .prepare("INSERT INTO queue (path, enqueued_at) VALUES (?1, ?2)")
                .map_err(&e)?;
            let t = now();
            for p in paths {
                st.execute(params![p, t]).map_err(&e)?;
                ids.push(tx.last_insert_rowid());
            }
        }
        tx.commit().map_err(&e)?;
        self.give_to_directory_owner();
        Ok(ids)
    }

    /// Up to `limit` queued entries, oldest first.
    pub fn pending(&self, limit: usize) -> Result<Vec<(i64, String)>, QueueError> {
        let e = self.err("cannot read pending entries");
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT id, path FROM queue WHERE state = 'queued' ORDER BY id LIMIT ?1",
            )
            .map_err(&e)?;
        let rows = st
            .query_map([limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(&e)?;
        rows.collect::<Result<_, _>>().map_err(e)
    }

    /// Record how entries ended: `None` = done, `Some(error)` = failed.
    pub fn finish(&mut self, results: &[(i64, Option<String>)]) -> Result<(), QueueError> {
        let e = self.err("cannot record push results");
        let tx = self.conn.transaction().map_err(&e)?;
        {
            let mut st = tx
                .prepare("UPDATE queue SET state = ?2, error = ?3, finished_at = ?4 WHERE id = ?1")
                .map_err(&e)?;
            let t = now();
            for (id, error) in results {
                let state = if error.is_some() { "failed" } else { "done" };
                st.execute(params![id, state, error, t]).map_err(&e)?;
            }
        }
        tx.commit().map_err(e)
    }

    /// The state of entry `id`.
    pub fn state(&self, id: i64) -> Result<EntryState, QueueError> {
        let e = self.err("cannot read an entry");
        let row: Option<(String, Option<String>)> = self
            .conn
            .query_row("SELECT state, error FROM queue WHERE id = ?1", [id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(e)?;
        Ok(match row {
            Some((s, _)) if s == "queued" => EntryState::Queued,
            Some((s, _)) if s == "done" => EntryState::Done,
            Some((_, err)) => EntryState::Failed(err.unwrap_or_default()),
            None => EntryState::Unknown,
        })
    }

    pub fn counts(&self) -> Result<Counts, QueueError> {
        let e = self.err("cannot count entries");
        let mut st = self
            .conn
            .prepare_cached("SELECT state, count(*) FROM queue GROUP BY state")
            .map_err(&e)?;
        let mut c = Counts::default();
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(&e)?;
        for row in rows {
            let (s, n) = row.map_err(&e)?;
            match s.as_str() {
                "queued" => c.queued = n as u64,
                "done" => c.done = n as u64,
                _ => c.failed += n as u64,
            }
        }
        Ok(c)
    }

    /// Forget finished entries older than `age`.
    pub fn prune(&mut self, age: Duration) -> Result<usize, QueueError> {
        let e = self.err("cannot prune");
        self.conn
            .execute(
                "DELETE FROM queue WHERE state != 'queued' AND finished_at < ?1",
                [now() - age.as_secs() as i64],
            )
            .map_err(e)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_reopening_and_finish() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("q.db");
        let mut q = Queue::open(&db).unwrap();
        let ids = q
            .enqueue(&["/nix/store/a".into(), "/nix/store/b".into()])
            .unwrap();
        drop(q);
        let mut q = Queue::open(&db).unwrap();
        assert_eq!(q.pending(10).unwrap().len(), 2);
        q.finish(&[(ids[0], None), (ids[1], Some("boom".into()))])
            .unwrap();
        assert_eq!(q.state(ids[0]).unwrap(), EntryState::Done);
        assert_eq!(q.state(ids[1]).unwrap(), EntryState::Failed("boom".into()));
        assert!(q.pending(10).unwrap().is_empty());
        assert_eq!(
            q.counts().unwrap(),
            Counts {
                queued: 0,
                done: 1,
                failed: 1
            }
        );
    }

    /// The post-build hook runs as root (nix-daemon) and queues by itself while a user's
    /// daemon is down; the user's daemon must then still be able to write its queue.
    #[test]
    fn a_queue_root_writes_for_a_user_stays_writable_by_that_user() {
        use std::os::unix::fs::MetadataExt;
        assert!(
            rustix::process::geteuid().is_root(),
            "this test runs as root (as .ci/run does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let nobody = 65534;
        std::os::unix::fs::chown(dir.path(), Some(nobody), Some(nobody)).unwrap();
        let db = dir.path().join("daemon.queue.db");
        let mut q = Queue::open(&db).unwrap();
        q.enqueue(&["/nix/store/a".into()]).unwrap();
        drop(q);
        for name in [
            "daemon.queue.db",
            "daemon.queue.db-wal",
            "daemon.queue.db-shm",
        ] {
            let p = dir.path().join(name);
            if p.exists() {
                assert_eq!(std::fs::metadata(&p).unwrap().uid(), nobody, "{name}");
            }
        }
        // The user's daemon records a result: a thread that is that user (for good).
        let as_user = db.clone();
        std::thread::spawn(move || {
            use rustix::process::{Gid, Uid};
            let (uid, gid) = (Uid::from_raw(nobody), Gid::from_raw(nobody));
            rustix::thread::set_thread_res_gid(gid, gid, gid).unwrap();
            rustix::thread::set_thread_res_uid(uid, uid, uid).unwrap();
            let mut q = Queue::open(&as_user).unwrap();
            let (id, _) = q.pending(1).unwrap()[0].clone();
            q.finish(&[(id, None)]).unwrap();
        })
        .join()
        .unwrap();
        let q = Queue::open(&db).unwrap();
        assert!(q.pending(10).unwrap().is_empty());
    }
}
