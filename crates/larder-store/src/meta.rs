//! The metadata database: caches, tokens, NARs and their chunks, store paths, pending uploads,
//! build logs and per-cache daily statistics (`meta/stats.rs`).
//!
//! This file holds what every concept shares: connecting, the engine, errors, and the retry of
//! a transaction that lost a race. Each concept has its file: `caches`, `tokens`, `paths`
//! (NARs, chunks, publishing, logs), `uploads` (pending uploads and chunk claims), `gc`,
//! `usage`, `retention` (eviction and pins), `contents` (browsing), `fsck` (what
//! `larder fsck` checks and repairs), `sizes` (the counters of what caches and the store
//! hold), `stats`, `lock`,
//! `schema`, `transfer`. Rows are decoded once, into domain types, by `FromRow` derives over
//! the column encodings of `columns`: what leaves this module is never a stored string to be
//! parsed again.
//!
//! One query layer for every engine: `sqlx`'s `Any` driver with queries written in the SQL both
//! SQLite and PostgreSQL accept (`$N` parameters, `ON CONFLICT`, `RETURNING`, `BIGINT` columns,
//! sums cast back to `BIGINT`). Only the DDL differs, in [`schema`].
//!
//! Invariants kept here:
//! - a `paths` row exists only for a published store path: its NAR is stored and (checked in the
//!   same transaction) every reference other than itself is a published path of the same cache;
//! - an existing path is never replaced: publishing different content under the same store path
//!   is reported as [`Publish::Conflict`];
//! - a NAR row is referenced by `paths`, by a pending `uploads` row, or by an `evicted_nars`
//!   row younger than the grace period, or it is garbage;
//! - `path_refs` holds exactly the references (other than itself) of every `paths` row, written
//!   in the same transaction, so referrers can be queried by index;
//! - eviction removes a path only together with, or after, every path of the cache that
//!   references it, and never a pinned path (checked in the evicting transaction).

use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;

use crate::now_unix;

mod batch;
mod caches;
mod chunks;
mod columns;
mod contents;
mod fast;
mod fsck;
mod gc;
mod lock;
mod packs;
mod paths;
mod present;
mod realisations;
mod retention;
mod schema;
mod sizes;
mod stats;
mod tokens;
pub mod transfer;
mod uploads;
mod usage;

pub use batch::BatchItem;
pub use caches::{CacheRow, CacheStats, CacheUpdate, NewCache};
pub use chunks::StoreTotals;
pub use columns::{CacheScope, InvalidValue, SecretKey, SigningMode};
pub use contents::{PathCursor, PathEntry};
pub use fsck::{PathUse, Unpublished};
pub use gc::{DeleteObject, ORPHAN_BATCH};
pub use lock::{HeldLock, LockName};
pub use packs::Pack;
pub(crate) use paths::ref_hashes;
pub use paths::{
    cdc_chunk_id, chunk_hash_of_key, chunk_object_key, listing_object_key, pack_hash_of_key,
    pack_object_key, runs, ChunkName, ChunkRow, NarRow, NewPath, PathRow, Publish, Run,
};
pub use present::PresenceBuilt;
pub use realisations::{PutRealisation, RealisationRow};
pub use retention::{Evicted, Keep, LruPath, PinRow};
pub use stats::{CacheDay, Downloads};
pub use tokens::TokenRow;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("unsupported database URL {0:?} (expected sqlite://PATH or postgres://…)")]
    UnsupportedUrl(String),
    #[error("database error")]
    Db(#[from] sqlx::Error),
    #[error("stored value of {field} is invalid: {value:?}")]
    Corrupt { field: &'static str, value: String },
    /// A row read back holds a value that does not decode (a row edited by hand, or written
    /// by something else than larder).
    #[error("stored value of {table}.{column} is invalid")]
    Undecodable {
        table: &'static str,
        column: String,
        #[source]
        source: sqlx::error::BoxDynError,
    },
    #[error(
        "the database schema (version {found}) is newer than this larder knows (version \
         {known}); upgrade larder"
    )]
    SchemaTooNew { found: i64, known: i64 },
    #[error("cleaning up unreferenced objects failed")]
    Cleanup(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("connecting to the database timed out")]
    ConnectTimeout,
    /// A query of the SQLite read path (`meta/fast.rs`) failed.
    #[error("database error")]
    FastRead(#[source] rusqlite::Error),
}

impl MetaError {
    /// Whether the database could not be reached (down, restarting, refusing connections,
    /// pool exhausted): a condition that passes, as opposed to a failing query.
    pub fn is_unavailable(&self) -> bool {
        match self {
            MetaError::ConnectTimeout => true,
            MetaError::Db(e) => db_unavailable(e),
            _ => false,
        }
    }
}

fn db_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        // PostgreSQL: connection exceptions (class 08), shutting down or starting up (57P0x),
        // out of connections (53300).
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "53300"),
        _ => false,
    }
}

type Result<T, E = MetaError> = std::result::Result<T, E>;

/// Map the error of a query reading rows of `table`: a column that does not decode is
/// [`MetaError::Undecodable`], naming the table and the column (the source names the value).
fn decoding(table: &'static str) -> impl Fn(sqlx::Error) -> MetaError {
    move |e| match e {
        sqlx::Error::ColumnDecode { index, source } => MetaError::Undecodable {
            table,
            column: index.trim_matches('"').to_owned(),
            source,
        },
        e => MetaError::Db(e),
    }
}

/// [`decoding`] for rows of `table` joined with their NAR (`nars n`, [`paths::NAR_COLS`]): a
/// column of the NAR names table `nars`.
fn decoding_with_nar(table: &'static str) -> impl Fn(sqlx::Error) -> MetaError {
    move |e| match decoding(table)(e) {
        MetaError::Undecodable { column, source, .. }
            if paths::NAR_COLUMNS.contains(&column.as_str()) =>
        {
            MetaError::Undecodable {
                table: "nars",
                column,
                source,
            }
        }
        e => e,
    }
}

/// Most connections a replica opens to PostgreSQL by default (its pool; the background lock
/// holds one more). Several replicas share the server's `max_connections` (100 by default).
pub const DEFAULT_PG_MAX_CONNECTIONS: u32 = 16;
/// Connections to one SQLite file: readers run in parallel in WAL mode, writers queue.
const SQLITE_MAX_CONNECTIONS: u32 = 8;
/// How long a request waits for a PostgreSQL connection (connecting included) before it is
/// answered 503: an unreachable database fails requests fast instead of piling them up.
pub const PG_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// A pooled connection idle for longer than this is checked before it is used.
const PG_CHECK_IDLE_AFTER: Duration = Duration::from_secs(1);
/// Idle pooled connections are closed after this long.
const PG_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a connection handed back to the pool may take to show it still works (one round
/// trip, after the rest of a query dropped midway, by `backend_timeout` say) before it is
/// closed instead of pooled: see [`release_check`].
pub const PG_RELEASE_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    /// The engine a database URL names, if larder supports it.
    pub fn of_url(url: &str) -> Option<Engine> {
        if url.starts_with("sqlite:") {
            Some(Engine::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Engine::Postgres)
        } else {
            None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Sqlite => "sqlite",
            Engine::Postgres => "postgres",
        }
    }
}

/// A database URL fit for logs and messages: no password, no query parameters (which may
/// carry one), e.g. `postgres://larder@db.internal:5432/larder`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // Not a URL (a plain path): nothing in it to hide.
        return url.to_owned();
    };
    let rest = rest.split(['?', '#']).next().unwrap_or(rest);
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{user}@{host}")
        }
        None => authority.to_owned(),
    };
    format!("{scheme}://{authority}{path}")
}

/// How to connect.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnectOptions {
    /// Pool size; `None`: [`DEFAULT_PG_MAX_CONNECTIONS`] for PostgreSQL, 8 for SQLite.
    pub max_connections: Option<u32>,
}

/// Handle to the metadata database (a connection pool; cheap to clone).
#[derive(Clone)]
pub struct Metadata {
    pool: AnyPool,
    engine: Engine,
    /// PostgreSQL: the URL, for the dedicated connections that hold advisory locks. A secret
    /// (it may carry a password): never printed, see the `Debug` impl.
    url: std::sync::Arc<str>,
    /// SQLite on a file: the direct read connections of the hot read path (`meta/fast.rs`).
    fast: Option<std::sync::Arc<fast::FastReads>>,
    /// SQLite on a file: the filter of the paths it may hold (`meta/present.rs`).
    present: Option<std::sync::Arc<present::Presence>>,
}

impl std::fmt::Debug for Metadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metadata")
            .field("engine", &self.engine)
            .field("url", &redact_url(&self.url))
            .finish_non_exhaustive()
    }
}

/// The largest `IN (…)` list sent in one query (SQLite's default limit is 32766 parameters).
const IN_BATCH: usize = 500;

fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Rows written by one multi-row `INSERT`: an upload of a 256 MiB NAR lists ~8 000 chunks,
/// and a statement per row was a round trip (and on SQLite a statement preparation) each.
/// Well below both engines' limits on bound parameters.
const INSERT_BATCH: usize = 100;

/// `items` in slices of `max`, then what is left in slices of decreasing powers of two: the
/// statements made for the slices' lengths are then few, each prepared once and kept by the
/// connection's statement cache, where a length of its own per NAR (its chunk count) had
/// SQLite prepare a statement of hundreds of parameters anew for each (a sixth of the
/// database thread's time in bench/dedup.sh's first push).
fn batches<T>(items: &[T], max: usize) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = if rest.len() >= max {
            max
        } else {
            1 << rest.len().ilog2()
        };
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Some(head)
    })
}

/// `VALUES` rows for a multi-row `INSERT`: `rows` tuples of `cols` placeholders, numbered
/// from `$1`.
fn value_rows(rows: usize, cols: usize) -> String {
    (0..rows)
        .map(|r| format!("({})", placeholders(r * cols + 1, cols)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Delete the `paths` rows of `hashes` (at most [`IN_BATCH`]) in `cache_id`, and the
/// reference rows they hold: what unpublishing a path removes (eviction, fsck's repair).
/// Appends the NAR of each path this transaction deleted to `nar_ids`, for
/// [`sizes::count_paths`] (a path a concurrent transaction deleted first is not there).
async fn delete_path_rows(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    cache_id: i64,
    hashes: &[String],
    nar_ids: &mut Vec<i64>,
) -> Result<()> {
    let ph = placeholders(2, hashes.len());
    let sql = format!("DELETE FROM path_refs WHERE cache_id = $1 AND referrer IN ({ph})");
    let mut q = sqlx::query(&sql).bind(cache_id);
    for h in hashes {
        q = q.bind(h);
    }
    q.execute(&mut **tx).await?;
    let sql = format!("DELETE FROM paths WHERE cache_id = $1 AND hash IN ({ph}) RETURNING nar_id");
    let mut q = sqlx::query_scalar::<_, i64>(&sql).bind(cache_id);
    for h in hashes {
        q = q.bind(h);
    }
    nar_ids.extend(q.fetch_all(&mut **tx).await?);
    Ok(())
}

/// Error codes of a constraint that a concurrent transaction made fail (PostgreSQL SQLSTATE,
/// SQLite extended result code): a foreign key whose target was deleted meanwhile.
const FOREIGN_KEY: &[&str] = &["23503", "787"];
/// … a unique key taken meanwhile.
const UNIQUE: &[&str] = &["23505", "2067", "1555"];
/// Attempts of a transaction that failed only because of a concurrent one.
const TX_ATTEMPTS: u32 = 6;

/// Whether `e` says a transaction lost a race and may simply run again: a serialization
/// failure or deadlock (PostgreSQL), a busy database (SQLite), or one of `also`.
fn retryable(e: &MetaError, also: &[&str]) -> bool {
    let MetaError::Db(sqlx::Error::Database(db)) = e else {
        return false;
    };
    db.code().is_some_and(|c| {
        matches!(&*c, "40001" | "40P01" | "5" | "6" | "517") || also.contains(&&*c)
    })
}

/// Run a transaction, again (after a short, jittered pause) while it loses races to
/// concurrent ones ([`retryable`]). Each attempt must be a complete transaction.
async fn retry<T, E, F, Fut>(also: &[&str], mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: Into<MetaError>,
{
    let mut n = 1;
    loop {
        match attempt().await.map_err(Into::into) {
            Err(e) if n < TX_ATTEMPTS && retryable(&e, also) => {
                use std::hash::{BuildHasher, Hasher};
                let jitter = std::collections::hash_map::RandomState::new()
                    .build_hasher()
                    .finish()
                    % 10;
                tokio::time::sleep(Duration::from_millis((5 << n) + jitter)).await;
                n += 1;
            }
            r => return r,
        }
    }
}

/// Whether a PostgreSQL connection handed back to the pool still answers within
/// [`PG_RELEASE_CHECK_TIMEOUT`]; an error closes it.
///
/// The pool checks every connection it takes back with a round trip, without a time limit. A
/// request dropped midway (its `backend_timeout` passed) leaves its connection waiting for the
/// rest of the query's answer first; in a network partition the round trip then waits for TCP
/// to give up on the unacknowledged bytes, about 15 minutes (Linux's `tcp_retries2`), with the
/// connection still counted against the pool's size, so a partition of seconds exhausts the
/// pool for a quarter of an hour. Bounded here, such a connection is closed after a few
/// seconds and the pool opens a fresh one once the database is back. The pool's own round
/// trip still follows (answered at once by a connection that just answered this one).
async fn release_check(conn: &mut sqlx::AnyConnection) -> Result<bool, sqlx::Error> {
    match tokio::time::timeout(PG_RELEASE_CHECK_TIMEOUT, sqlx::Connection::ping(conn)).await {
        Ok(Ok(())) => Ok(true),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "a pooled connection did not answer within {}s: closed",
                PG_RELEASE_CHECK_TIMEOUT.as_secs()
            ),
        ))),
    }
}

/// The database file a `sqlite:` URL names; `None` for an in-memory database (which another
/// connection cannot open).
fn sqlite_file(url: &str) -> Option<&std::path::Path> {
    let rest = url
        .strip_prefix("sqlite://")
        .or(url.strip_prefix("sqlite:"))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let memory = path.is_empty() || path == ":memory:" || query.contains("mode=memory");
    (!memory).then_some(std::path::Path::new(path))
}

impl Metadata {
    /// Connect and apply migrations. `sqlite://PATH` (created if missing) or `postgres://…`.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, ConnectOptions::default()).await
    }

    /// [`Metadata::connect`] with options. On PostgreSQL, migrations run under an advisory
    /// lock, so replicas starting together apply each migration once.
    pub async fn connect_with(url: &str, options: ConnectOptions) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let engine =
            Engine::of_url(url).ok_or_else(|| MetaError::UnsupportedUrl(redact_url(url)))?;
        let full_url = match engine {
            Engine::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
            _ => url.to_owned(),
        };
        let opts = AnyPoolOptions::new();
        let opts = match engine {
            Engine::Sqlite => opts
                .max_connections(options.max_connections.unwrap_or(SQLITE_MAX_CONNECTIONS))
                .after_connect(|conn, _meta| {
                    Box::pin(async move {
                        // WAL: readers never block the writer; NORMAL sync is durable in WAL
                        // mode except for the last transactions on power loss, never corrupting.
                        for pragma in [
                            "PRAGMA journal_mode = WAL",
                            "PRAGMA synchronous = NORMAL",
                            "PRAGMA busy_timeout = 10000",
                            "PRAGMA foreign_keys = ON",
                        ] {
                            sqlx::query(pragma).execute(&mut *conn).await?;
                        }
                        Ok(())
                    })
                }),
            // A connection idle for a while is checked before use (one round trip), so that
            // after the database restarts requests do not fail on connections the restart
            // broke; one in steady use is not (the pool already checks every connection it
            // takes back).
            Engine::Postgres => opts
                .max_connections(
                    options
                        .max_connections
                        .unwrap_or(DEFAULT_PG_MAX_CONNECTIONS),
                )
                .min_connections(0)
                .acquire_timeout(PG_ACQUIRE_TIMEOUT)
                .idle_timeout(Some(PG_IDLE_TIMEOUT))
                .test_before_acquire(false)
                .after_release(|conn, _meta| Box::pin(release_check(conn)))
                .before_acquire(|conn, meta| {
                    Box::pin(async move {
                        if meta.idle_for < PG_CHECK_IDLE_AFTER {
                            return Ok(true);
                        }
                        Ok(sqlx::Connection::ping(conn).await.is_ok())
                    })
                }),
        };
        let pool = opts.connect(&full_url).await?;
        let mut meta = Metadata {
            pool,
            engine,
            url: url.into(),
            fast: None,
            present: None,
        };
        schema::migrate(&meta.pool, engine).await?;
        if let Some(file) = sqlite_file(url) {
            meta.fast = Some(std::sync::Arc::new(
                fast::FastReads::open(file).map_err(MetaError::FastRead)?,
            ));
            meta.present = Some(Default::default());
        }
        Ok(meta)
    }

    /// Close every pooled connection (the handle is unusable afterwards).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The schema version the database is at.
    pub async fn schema_version(&self) -> Result<i64> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM larder_schema")
            .fetch_one(&self.pool)
            .await?;
        Ok(v.unwrap_or(0))
    }

    /// A cheap round trip, for health checks.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_full_then_powers_of_two_and_keep_every_item_in_order() {
        let items: Vec<usize> = (0..233).collect();
        let lens: Vec<usize> = batches(&items, 100).map(<[usize]>::len).collect();
        assert_eq!(lens, [100, 100, 32, 1]);
        let again: Vec<usize> = batches(&items, 100).flatten().copied().collect();
        assert_eq!(again, items);
        assert_eq!(batches(&items[..0], 100).count(), 0);
        let lens: Vec<usize> = batches(&items[..99], 100).map(<[usize]>::len).collect();
        assert_eq!(lens, [64, 32, 2, 1]);
    }

    #[test]
    fn urls_are_shown_without_secrets() {
        assert_eq!(
            redact_url(
                "postgres://larder:s3cret@db.internal:5432/larder?sslmode=require&password=x"
            ),
            "postgres://larder@db.internal:5432/larder"
        );
        assert_eq!(
            redact_url("postgresql://db/larder"),
            "postgresql://db/larder"
        );
        assert_eq!(
            redact_url("sqlite:///var/lib/larder/larder.db"),
            "sqlite:///var/lib/larder/larder.db"
        );
        assert_eq!(redact_url("/srv/objects"), "/srv/objects");
        assert_eq!(Engine::of_url("postgresql://x/y"), Some(Engine::Postgres));
        assert_eq!(Engine::of_url("mysql://x/y"), None);
    }

    #[test]
    fn chunks_stored_one_after_another_are_read_as_runs() {
        let row = |n: u8, size: i64, pack: Option<(&str, i64)>| ChunkRow {
            pack: pack.map(|(p, _)| p.to_owned()),
            pack_offset: pack.map(|(_, at)| at),
            ..ChunkRow::new(format!("{n}{}", "0".repeat(51)), size)
        };
        let (a, b) = ("a".repeat(52), "b".repeat(52));
        let chunks = [
            row(1, 10, Some((&a, 0))),
            row(2, 5, Some((&a, 10))),
            row(3, 7, None),
            row(4, 20, Some((&a, 15))),
            row(5, 3, Some((&b, 0))),
            row(6, 4, Some((&b, 3))),
        ];
        let got: Vec<_> = runs(&chunks, 100)
            .into_iter()
            .map(|r| (r.range, r.chunks))
            .collect();
        assert_eq!(
            got,
            vec![(0..15, 0..2), (0..7, 2..3), (15..35, 3..4), (0..7, 4..6)]
        );
        // At most `max` bytes a run, however many follow each other.
        let got: Vec<_> = runs(&chunks, 12).into_iter().map(|r| r.chunks).collect();
        assert_eq!(got, vec![0..1, 1..2, 2..3, 3..4, 4..6]);
    }

    #[test]
    fn chunk_keys_name_their_hash() {
        let h = larder_nix::hash::Sha256::digest(b"chunk").to_nix32();
        let key = chunk_object_key(&h);
        assert_eq!(chunk_hash_of_key(&key), Some(h.as_str()));
        let raw = larder_nix::hash::Sha256::digest(b"raw");
        let cdc = cdc_chunk_id(&raw);
        assert_eq!(
            chunk_hash_of_key(&chunk_object_key(&cdc)),
            Some(cdc.as_str())
        );
        assert_eq!(ChunkName::parse(&cdc), Some(ChunkName::Zstd(raw)));
        assert_eq!(
            ChunkName::parse(&raw.to_nix32()),
            Some(ChunkName::Stored(raw))
        );
        assert_eq!(ChunkName::parse(&format!("{h}.xz")), None);
        let other_prefix = if h.starts_with("00") { "11" } else { "00" };
        for odd in [
            format!("{key}.part"),
            format!("log/{h}"),
            format!("x/{key}"),
            format!("chunk/{other_prefix}/{h}"),
            format!("chunk/{}/{}", &h[..2], &h[..51]),
            format!("chunk/{}/{}", &h[..2], h.to_uppercase()),
            format!("chunk/{}{h}", &h[..2]),
            "chunk/".to_owned(),
        ] {
            assert_eq!(chunk_hash_of_key(&odd), None, "{odd}");
        }
    }
}
