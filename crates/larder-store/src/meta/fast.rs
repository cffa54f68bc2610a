//! The hot read path on SQLite: a narinfo lookup (hit or miss), and a NAR's row and chunk list
//! by FileHash (what a NAR download looks up), answered by direct, synchronous `rusqlite`
//! queries on the calling thread instead of through `sqlx`.
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
//! For a NAR the `sqlx` path was the time to the first byte of a download not in the hot
//! cache: its chunk list (a row per 32 KiB or so) crossed threads row by row (bench/dedup.sh's
//! NARs, ~270 chunks: 4-13 ms where nginx starts in 0.3).
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
use super::paths::{ChunkRow, NarRow, PathRow};
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

/// A path's row id by cache and hash part (the unique index alone), as
/// [`super::Metadata::path_id`] reads it.
const PATH_ID: &str = "SELECT id FROM paths WHERE cache_id = ?1 AND hash = ?2";

/// A NAR by FileHash if a path of the cache uses it or used it until `?3` (evicted since), as
/// [`super::Metadata::servable_nar_by_file_hash`] reads it.
const SERVABLE_NAR: &str = "SELECT n.id, n.nar_hash, n.nar_size, n.compression, n.file_hash, \
     n.file_size FROM nars n WHERE n.file_hash = ?1 AND (EXISTS \
     (SELECT 1 FROM paths p WHERE p.cache_id = ?2 AND p.nar_id = n.id) OR EXISTS \
     (SELECT 1 FROM evicted_nars e WHERE e.cache_id = ?2 AND e.nar_id = n.id \
     AND e.evicted_at >= ?3))";
/// A NAR's chunks in order, as [`super::Metadata::nar_chunks`] reads them.
const NAR_CHUNKS: &str = "SELECT c.chunk_hash, c.file_size, c.pack, c.pack_offset \
     FROM nar_chunks nc JOIN chunks c ON c.chunk_hash = nc.chunk_hash WHERE nc.nar_id = ?1 \
     ORDER BY nc.seq";

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

    /// Run the query `f` on a free connection: its answer, or `None` when every connection is
    /// in use or the database is busy (the caller then takes the `sqlx` path).
    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<Result<T, MetaError>>,
    ) -> Option<Result<T, MetaError>> {
        match self.with(f)? {
            Ok(answer) => Some(answer),
            Err(e) if busy(&e) => None,
            Err(e) => Some(Err(MetaError::FastRead(e))),
        }
    }

    /// [`super::Metadata::get_path`]; `None` when no connection is free or the database is
    /// busy.
    pub(super) fn get_path(
        &self,
        cache_id: i64,
        hash: &str,
    ) -> Option<Result<Option<PathRow>, MetaError>> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(GET_PATH)?;
            let row = stmt.query_row((cache_id, hash), |row| Ok(path_row(row)));
            row.optional().map(Option::transpose)
        })
    }

    /// [`super::Metadata::path_id`]; `None` when no connection is free or the database is
    /// busy.
    pub(super) fn path_id(
        &self,
        cache_id: i64,
        hash: &str,
    ) -> Option<Result<Option<i64>, MetaError>> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(PATH_ID)?;
            Ok(Ok(stmt
                .query_row((cache_id, hash), |row| row.get(0))
                .optional()?))
        })
    }
}

impl FastReads {
    /// [`super::Metadata::servable_nar_by_file_hash`]; `None` when no connection is free or
    /// the database is busy.
    pub(super) fn servable_nar(
        &self,
        cache_id: i64,
        file_hash: &str,
        evicted_since: i64,
    ) -> Option<Result<Option<NarRow>, MetaError>> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(SERVABLE_NAR)?;
            let row = stmt.query_row((file_hash, cache_id, evicted_since), |row| {
                Ok(nar_row(row, 0))
            });
            row.optional().map(Option::transpose)
        })
    }

    /// [`super::Metadata::nar_chunks`]; `None` when no connection is free or the database is
    /// busy. A row per chunk (a NAR of 256 MiB has ~8 000): a millisecond or two on the
    /// calling thread for the largest, where the `sqlx` path sent each row across threads.
    pub(super) fn nar_chunks(&self, nar_id: i64) -> Option<Result<Vec<ChunkRow>, MetaError>> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(NAR_CHUNKS)?;
            let rows = stmt.query_map([nar_id], |row| Ok(chunk_row(row)))?;
            rows.collect::<rusqlite::Result<Result<Vec<ChunkRow>, MetaError>>>()
        })
    }
}

/// Every path of a cache with what eviction needs, as [`super::Metadata::lru_paths`] reads it.
/// `NOT INDEXED`: through the `(cache_id, hash)` index SQLite would fetch each row from wherever
/// it lies in the table, a random read per path (7.5 s at a million paths, against 1.1 s for
/// reading `paths`, and `nars` filled in the same order, front to back).
const LRU_PATHS: &str = "SELECT p.id, p.hash, p.name, p.nar_id, n.file_size, p.created_at, \
     (SELECT u.last_used_at FROM path_uses u WHERE u.path_id = p.id) \
     FROM paths p NOT INDEXED JOIN nars n ON n.id = p.nar_id WHERE p.cache_id = ?1";
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

impl FastReads {
    /// The filter of every path of every cache (`meta/present.rs`), sized for twice the paths
    /// the counters of `meta/sizes.rs` say there are, filled by a scan of the `(cache_id,
    /// hash)` index (about a second at a million paths). Nothing is held per path on the way:
    /// the filter is the only memory it takes. Blocking.
    pub(super) fn path_filter(&self) -> Result<super::present::Bloom, MetaError> {
        let conn = self.scan()?;
        let fail = MetaError::FastRead;
        let paths: i64 = conn
            .query_row("SELECT COALESCE(SUM(paths), 0) FROM cache_sizes", [], |r| {
                r.get(0)
            })
            .map_err(fail)?;
        let mut filter = super::present::Bloom::with_capacity(2 * paths.max(0) as usize);
        let mut stmt = conn
            .prepare("SELECT cache_id, hash FROM paths")
            .map_err(fail)?;
        let mut rows = stmt.query([]).map_err(fail)?;
        while let Some(row) = rows.next().map_err(fail)? {
            let cache_id: i64 = row.get(0).map_err(fail)?;
            let hash = match row.get_ref(1).map_err(fail)? {
                ValueRef::Text(t) => t,
                _ => {
                    return Err(MetaError::Corrupt {
                        field: "paths.hash",
                        value: "not text".to_owned(),
                    })
                }
            };
            filter.insert(super::present::key_of_bytes(cache_id, hash));
        }
        Ok(filter)
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
        nar: nar_row(row, 9)?,
    })
}

/// Decode the NAR columns (`id, nar_hash, nar_size, compression, file_hash, file_size`) of a
/// row, from column `at`.
fn nar_row(row: &Row<'_>, at: usize) -> Result<NarRow, MetaError> {
    let int = |i: usize, column: &'static str| {
        row.get::<_, i64>(at + i)
            .map_err(|e| MetaError::Undecodable {
                table: "nars",
                column: column.to_owned(),
                source: Box::new(e),
            })
    };
    let text = |i: usize, column| Decoded {
        row,
        i: at + i,
        table: "nars",
        column,
    };
    Ok(NarRow {
        id: int(0, "nar_id")?,
        nar_hash: text(1, "nar_hash").get()?,
        nar_size: int(2, "nar_size")?,
        compression: text(3, "compression").get()?,
        file_hash: text(4, "file_hash").get()?,
        file_size: int(5, "file_size")?,
    })
}

/// A row of [`NAR_CHUNKS`].
fn chunk_row(row: &Row<'_>) -> Result<ChunkRow, MetaError> {
    let bad = |column: &str, e: rusqlite::Error| MetaError::Undecodable {
        table: "chunks",
        column: column.to_owned(),
        source: Box::new(e),
    };
    Ok(ChunkRow {
        chunk_hash: row.get(0).map_err(|e| bad("chunk_hash", e))?,
        file_size: row.get(1).map_err(|e| bad("file_size", e))?,
        pack: row.get(2).map_err(|e| bad("pack", e))?,
        pack_offset: row.get(3).map_err(|e| bad("pack_offset", e))?,
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
