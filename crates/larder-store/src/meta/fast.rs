//! The hot read path on SQLite: a narinfo lookup (hit or miss) answered by a direct, synchronous
//! `rusqlite` query on the calling thread instead of through `sqlx`.
//!
//! Why: profiling `larder serve` under wrk with 100 000 paths (random hashes, bench/scale.sh)
//! showed most of a narinfo request's time in `sqlx`'s SQLite driver rather than in SQLite:
//! every query is sent to the connection's worker thread and its answer sent back (two thread
//! hand-offs, a wake-up each), through the pool's acquire/release and the `Any` driver's
//! conversion of every value, for an indexed lookup that SQLite itself answers in a few
//! microseconds. Here the same query runs where the request is, on one of a few read-only
//! connections kept for it.
//!
//! Consistency is SQLite's own: the connections read the same WAL database file, and each
//! statement sees every transaction committed before it starts, so a path is found the moment
//! its publishing transaction commits and is gone the moment an eviction's does. Nothing here
//! is cached across statements.
//!
//! Bounded: a fixed number of connections, each with a bounded page cache; a request finding
//! them all busy takes the `sqlx` path, so requests never wait here. A statement holds its
//! connection for one indexed lookup (no `.await` in between), which blocks the calling
//! runtime thread for microseconds, as a lock would.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, TryLockError};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row};

use super::columns::{Column, InvalidValue};
use super::paths::{NarRow, PathRow};
use super::retention::LruPath;
use super::MetaError;

/// Page cache of each read connection (SQLite's `cache_size` in KiB when negative): the
/// operating system's page cache holds the rest of the file.
const PAGE_CACHE_KIB: i64 = 4096;
/// Most read connections, whatever the number of CPUs.
const MAX_CONNECTIONS: usize = 8;

/// A path and its NAR by cache and hash part, as [`super::Metadata::get_path`] reads it.
const GET_PATH: &str = "SELECT p.id, p.cache_id, p.hash || '-' || p.name, p.refs, p.deriver, \
     p.ca, p.sigs, p.created_at, p.upstream, n.id, n.nar_hash, n.nar_size, n.compression, \
     n.file_hash, n.file_size FROM paths p JOIN nars n ON n.id = p.nar_id \
     WHERE p.cache_id = ?1 AND p.hash = ?2";

/// Read-only connections to the SQLite database, used by whoever finds one free.
pub(super) struct FastReads {
    conns: Box<[Mutex<Connection>]>,
    /// The database file, for the connections of long reads ([`FastReads::scan`]).
    path: PathBuf,
}

impl std::fmt::Debug for FastReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastReads")
            .field("connections", &self.conns.len())
            .finish()
    }
}

impl FastReads {
    /// Open one read connection per CPU (at most [`MAX_CONNECTIONS`]) to the database file at
    /// `path`, which the `sqlx` pool has created and migrated.
    pub(super) fn open(path: &Path) -> rusqlite::Result<FastReads> {
        let n = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(2, MAX_CONNECTIONS);
        let conns = (0..n)
            .map(|_| {
                let c = Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                c.pragma_update(None, "query_only", true)?;
                c.pragma_update(None, "cache_size", -PAGE_CACHE_KIB)?;
                // Never wait on the runtime thread: a busy database (rare for a WAL reader)
                // sends the query to the `sqlx` path instead.
                c.busy_timeout(std::time::Duration::ZERO)?;
                c.set_prepared_statement_cache_capacity(4);
                Ok(Mutex::new(c))
            })
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(FastReads {
            conns: conns.into(),
            path: path.to_owned(),
        })
    }

    /// Run `f` on a free connection; `None` when every connection is in use.
    fn with<T>(&self, f: impl FnOnce(&Connection) -> T) -> Option<T> {
        for c in self.conns.iter() {
            match c.try_lock() {
                Ok(conn) => return Some(f(&conn)),
                // A poisoned connection is skipped (the panic that poisoned it left it in an
                // unknown state); WouldBlock: someone else's turn.
                Err(TryLockError::Poisoned(_)) | Err(TryLockError::WouldBlock) => {}
            }
        }
        None
    }

    /// [`super::Metadata::get_path`]; `None` when no connection is free or the database is
    /// busy.
    pub(super) fn get_path(
        &self,
        cache_id: i64,
        hash: &str,
    ) -> Option<Result<Option<PathRow>, MetaError>> {
        self.with(|conn| {
            let mut stmt = conn.prepare_cached(GET_PATH)?;
            stmt.query_row((cache_id, hash), |row| Ok(path_row(row)))
                .optional()
        })
        .and_then(|r| match r {
            Ok(row) => Some(row.transpose()),
            Err(e) if busy(&e) => None,
            Err(e) => Some(Err(MetaError::FastRead(e))),
        })
    }
}

/// Every path of a cache with what eviction needs, as [`super::Metadata::lru_paths`] reads it.
/// `NOT INDEXED`: through the `(cache_id, hash)` index SQLite would fetch each row from wherever
/// it lies in the table, a random read per path (7.5 s at a million paths, against 1.1 s for
/// reading `paths`, and `nars` filled in the same order, front to back).
const LRU_PATHS: &str = "SELECT p.id, p.hash, p.name, p.nar_id, n.file_size, p.created_at, \
     p.last_used_at FROM paths p NOT INDEXED JOIN nars n ON n.id = p.nar_id \
     WHERE p.cache_id = ?1";
/// Every reference edge of a cache, as [`super::Metadata::cache_refs`] reads it.
const CACHE_REFS: &str = "SELECT referrer, ref_hash FROM path_refs WHERE cache_id = ?1";

impl FastReads {
    /// A connection of its own for one long read (a scan of a whole cache), so the hot path
    /// keeps its connections. Blocking: call from a blocking thread.
    fn scan(&self) -> Result<Connection, MetaError> {
        let c = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(MetaError::FastRead)?;
        c.pragma_update(None, "query_only", true)
            .map_err(MetaError::FastRead)?;
        c.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(MetaError::FastRead)?;
        Ok(c)
    }

    /// [`super::Metadata::lru_paths`] on SQLite: a million rows decoded here take a second,
    /// through `sqlx`'s `Any` driver (a hand-off and a conversion per value) ten. Blocking.
    pub(super) fn lru_paths(&self, cache_id: i64) -> Result<Vec<LruPath>, MetaError> {
        let conn = self.scan()?;
        let mut stmt = conn.prepare(LRU_PATHS).map_err(MetaError::FastRead)?;
        let rows = stmt
            .query_map([cache_id], |row| {
                Ok(LruPath {
                    id: row.get(0)?,
                    hash: row.get(1)?,
                    name: row.get(2)?,
                    nar_id: row.get(3)?,
                    file_size: row.get(4)?,
                    created_at: row.get(5)?,
                    last_used_at: row.get(6)?,
                })
            })
            .map_err(MetaError::FastRead)?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(MetaError::FastRead)
    }

    /// [`super::Metadata::cache_refs`] on SQLite (see [`FastReads::lru_paths`]). Blocking.
    pub(super) fn cache_refs(&self, cache_id: i64) -> Result<Vec<(String, String)>, MetaError> {
        let conn = self.scan()?;
        let mut stmt = conn.prepare(CACHE_REFS).map_err(MetaError::FastRead)?;
        let rows = stmt
            .query_map([cache_id], |row| Ok((row.get(0)?, row.get(1)?)))
            .map_err(MetaError::FastRead)?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(MetaError::FastRead)
    }
}

/// Whether a query failed only because another connection held a lock.
fn busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Decode a row of [`GET_PATH`], column by column as the `sqlx` rows are (see `columns`).
fn path_row(row: &Row<'_>) -> Result<PathRow, MetaError> {
    let int = |i: usize, table: &'static str, column: &'static str| {
        row.get::<_, i64>(i).map_err(|e| MetaError::Undecodable {
            table,
            column: column.to_owned(),
            source: Box::new(e),
        })
    };
    let text = |i, table, column| Decoded {
        row,
        i,
        table,
        column,
    };
    Ok(PathRow {
        id: int(0, "paths", "id")?,
        cache_id: int(1, "paths", "cache_id")?,
        store_path: text(2, "paths", "basename").get()?,
        refs: text(3, "paths", "refs").get()?,
        deriver: text(4, "paths", "deriver").get()?,
        ca: text(5, "paths", "ca").get::<Option<Raw>>()?.map(|r| r.0),
        sigs: text(6, "paths", "sigs").get()?,
        created_at: int(7, "paths", "created_at")?,
        upstream: text(8, "paths", "upstream")
            .get::<Option<Raw>>()?
            .map(|r| r.0),
        nar: NarRow {
            id: int(9, "nars", "nar_id")?,
            nar_hash: text(10, "nars", "nar_hash").get()?,
            nar_size: int(11, "nars", "nar_size")?,
            compression: text(12, "nars", "compression").get()?,
            file_hash: text(13, "nars", "file_hash").get()?,
            file_size: int(14, "nars", "file_size")?,
        },
    })
}

/// A text column of a row, to be decoded as a [`Column`].
struct Decoded<'a, 'r> {
    row: &'a Row<'r>,
    i: usize,
    table: &'static str,
    column: &'static str,
}

impl Decoded<'_, '_> {
    fn get<T: Column>(self) -> Result<T, MetaError> {
        let invalid = |value: &str| MetaError::Undecodable {
            table: self.table,
            column: self.column.to_owned(),
            source: Box::new(InvalidValue::new(
                if T::SECRET { "(secret)" } else { value },
                T::WHAT,
            )),
        };
        match self.row.get_ref(self.i).map_err(MetaError::FastRead)? {
            ValueRef::Null => T::from_null().ok_or_else(|| invalid("NULL")),
            ValueRef::Text(bytes) => {
                let text = std::str::from_utf8(bytes).map_err(|_| invalid("(not UTF-8)"))?;
                T::from_text(text).ok_or_else(|| invalid(text))
            }
            _ => Err(invalid("(not text)")),
        }
    }
}

/// A text column kept as it is (`ca`, `upstream`).
struct Raw(String);

impl Column for Raw {
    const WHAT: &'static str = "text";
    fn from_text(text: &str) -> Option<Self> {
        Some(Raw(text.to_owned()))
    }
}
