//! The metadata database: caches, tokens, NARs and their chunks, store paths, pending uploads,
//! build logs and per-cache daily statistics (`meta/stats.rs`).
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

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::now_unix;

mod contents;
mod lock;
mod realisations;
mod schema;
mod stats;
pub mod transfer;

pub use lock::{HeldLock, LockName};

pub use contents::{PathCursor, PathEntry};
pub use realisations::{PutRealisation, RealisationRow};
pub use stats::{CacheDay, Downloads};

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("unsupported database URL {0:?} (expected sqlite://PATH or postgres://…)")]
    UnsupportedUrl(String),
    #[error("database error")]
    Db(#[from] sqlx::Error),
    #[error("stored value of {field} is invalid: {value:?}")]
    Corrupt { field: &'static str, value: String },
    #[error(
        "the database schema (version {found}) is newer than this larder knows (version \
         {known}); upgrade larder"
    )]
    SchemaTooNew { found: i64, known: i64 },
    #[error("cleaning up unreferenced objects failed")]
    Cleanup(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("connecting to the database timed out")]
    ConnectTimeout,
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
}

impl std::fmt::Debug for Metadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metadata")
            .field("engine", &self.engine)
            .field("url", &redact_url(&self.url))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CacheRow {
    pub id: i64,
    pub name: String,
    pub private: bool,
    pub priority: i64,
    pub compression: String,
    pub max_size: Option<i64>,
    /// `managed` (the server holds `secret_key`) or `client` (only `public_key` is known).
    pub signing_mode: String,
    pub public_key: Option<String>,
    #[serde(skip)]
    pub secret_key: Option<String>,
    pub created_at: i64,
    /// Public keys (`name:base64`) trusted as upstream for this cache, beside the server's.
    pub upstream_keys: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct NewCache {
    pub name: String,
    pub private: bool,
    pub priority: i64,
    pub compression: String,
    pub max_size: Option<i64>,
    pub signing_mode: String,
    pub public_key: Option<String>,
    pub secret_key: Option<String>,
    pub upstream_keys: Vec<String>,
}

/// Changes to a cache; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct CacheUpdate {
    pub private: Option<bool>,
    pub priority: Option<i64>,
    pub compression: Option<String>,
    /// `Some(None)` removes the limit.
    pub max_size: Option<Option<i64>>,
    /// Switch to client signing with this public key (`Some`), dropping the managed secret.
    pub client_public_key: Option<String>,
    /// Replace the cache's own upstream keys.
    pub upstream_keys: Option<Vec<String>>,
}

/// The prefix of an ended scope in [`TokenRow::caches`]: `!NAME` names a cache that was
/// deleted. No cache name starts with it, so an ended scope never matches a cache again.
pub const ENDED_SCOPE: char = '!';

/// `caches` (a token's comma-separated scope) with `name` marked ended, or `None` when it
/// does not name `name`.
fn end_scope(caches: &str, name: &str) -> Option<String> {
    let mut found = false;
    let ended: Vec<String> = caches
        .split(',')
        .map(|c| {
            if c == name {
                found = true;
                format!("{ENDED_SCOPE}{c}")
            } else {
                c.to_owned()
            }
        })
        .collect();
    found.then(|| ended.join(","))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    /// Public identifier (shown in `token list`, used to revoke); not a secret.
    pub id: String,
    /// SHA-256 (hex) of the secret token; the token itself is never stored.
    pub secret_hash: String,
    pub label: String,
    /// Comma-separated permissions: `pull`, `push`, `admin`.
    pub perms: String,
    /// Comma-separated cache names, or `None` for every cache. A name prefixed with
    /// [`ENDED_SCOPE`] is a cache deleted since: it grants nothing.
    pub caches: Option<String>,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarRow {
    pub id: i64,
    /// nix32, no `sha256:` prefix.
    pub nar_hash: String,
    pub nar_size: i64,
    pub compression: String,
    /// nix32 SHA-256 of the stored (compressed) file, no prefix.
    pub file_hash: String,
    pub file_size: i64,
}

/// One stored chunk of a NAR file: an independently decompressible frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRow {
    /// nix32 SHA-256 of the chunk's stored bytes; also names its object.
    pub chunk_hash: String,
    /// Stored (compressed) size in bytes.
    pub file_size: i64,
}

impl ChunkRow {
    /// The object key of a chunk.
    pub fn object_key(&self) -> String {
        chunk_object_key(&self.chunk_hash)
    }
}

/// The object holding the `.ls` listing (JSON) of the NAR with this NarHash (nix32), written
/// when the NAR is stored and deleted by garbage collection with the NAR's row.
pub fn listing_object_key(nar_hash: &str) -> String {
    let prefix = nar_hash.get(..2).unwrap_or("00");
    format!("ls/{prefix}/{nar_hash}")
}

pub fn chunk_object_key(chunk_hash: &str) -> String {
    let prefix = chunk_hash.get(..2).unwrap_or("00");
    format!("chunk/{prefix}/{chunk_hash}")
}

/// The chunk hash that `key` names, if `key` is exactly the object key of a chunk
/// (`chunk/<first two characters>/<52 nix32 characters>`): the inverse of [`chunk_object_key`].
pub fn chunk_hash_of_key(key: &str) -> Option<&str> {
    let hash = key.strip_prefix("chunk/")?.get(3..)?;
    let valid = larder_nix::nixbase32::decode_fixed::<32>(hash).is_ok();
    (valid && chunk_object_key(hash) == key).then_some(hash)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRow {
    pub id: i64,
    pub cache_id: i64,
    /// The 32-character hash part of the store path.
    pub hash: String,
    /// The name part of the store path.
    pub name: String,
    /// Space-separated basenames of the references.
    pub refs: String,
    /// Basename of the deriver.
    pub deriver: Option<String>,
    pub ca: Option<String>,
    /// Newline-separated signatures (`name:base64`).
    pub sigs: String,
    pub created_at: i64,
    pub nar: NarRow,
}

#[derive(Debug, Clone)]
pub struct NewPath {
    pub cache_id: i64,
    pub hash: String,
    pub name: String,
    pub refs: Vec<String>,
    pub deriver: Option<String>,
    pub ca: Option<String>,
    pub sigs: Vec<String>,
    pub nar_id: i64,
    /// References (basenames) accepted without being in the cache: their metadata carried a
    /// valid signature by a trusted upstream key, so Nix gets them from upstream.
    pub upstream_refs: Vec<String>,
}

/// What happened when publishing a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Publish {
    Created,
    /// The same store path with the same NAR was already there (idempotent re-upload).
    AlreadyPresent,
    /// The store path exists with a different NAR hash (given here); nothing was changed.
    Conflict {
        existing_nar_hash: String,
    },
    /// These references (basenames) are not published in the cache; nothing was stored.
    MissingReferences(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    pub paths: i64,
    /// Bytes stored for the cache (compressed NAR files).
    pub size: i64,
    /// Uncompressed NAR bytes.
    pub nar_size: i64,
}

/// A path as eviction sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LruPath {
    /// Row id: increases with upload order.
    pub id: i64,
    pub hash: String,
    pub name: String,
    pub nar_id: i64,
    /// Stored (compressed) bytes of its NAR file.
    pub file_size: i64,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
}

/// What [`Metadata::evict_paths`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evicted {
    /// The paths are gone.
    Done,
    /// A path was published or pinned concurrently that needs one of them: nothing changed.
    Raced,
}

/// How long the revisions of a pin are kept. The newest revision is always kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Keep {
    Forever,
    /// The newest N revisions.
    Revisions(i64),
    /// Revisions younger than N days.
    Days(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinRow {
    pub name: String,
    pub revision: i64,
    pub hash: String,
    /// Absolute store path.
    pub store_path: String,
    pub keep: Keep,
    pub created_at: i64,
}

/// The hash parts of `refs` (basenames), other than `own_hash`, deduplicated.
pub(crate) fn ref_hashes<'a>(
    own_hash: &str,
    refs: impl Iterator<Item = &'a str>,
) -> std::collections::BTreeSet<&'a str> {
    refs.filter_map(|r| r.get(..32))
        .filter(|h| *h != own_hash)
        .collect()
}

/// Deletes one object (by key) for [`Metadata::collect_garbage`] and
/// [`Metadata::delete_orphan_chunks`].
pub type DeleteObject<'a> = dyn Fn(
        String,
    ) -> futures::future::BoxFuture<
        'a,
        std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>,
    > + Send
    + Sync
    + 'a;

/// NARs and chunks deleted per garbage collection round (one transaction).
const GC_BATCH: usize = 256;

/// Chunk hashes looked at per transaction of [`Metadata::delete_orphan_chunks`].
pub const ORPHAN_BATCH: usize = 256;
/// Objects one transaction of [`Metadata::delete_orphan_chunks`] deletes at once.
const ORPHAN_DELETE_CONCURRENCY: usize = 8;

/// The largest `IN (…)` list sent in one query (SQLite's default limit is 32766 parameters).
const IN_BATCH: usize = 500;

fn flag(row: &AnyRow, col: &str) -> Result<bool> {
    Ok(row.try_get::<i64, _>(col)? != 0)
}

fn cache_from_row(row: &AnyRow) -> Result<CacheRow> {
    Ok(CacheRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        private: flag(row, "private")?,
        priority: row.try_get("priority")?,
        compression: row.try_get("compression")?,
        max_size: row.try_get("max_size")?,
        signing_mode: row.try_get("signing_mode")?,
        public_key: row.try_get("public_key")?,
        secret_key: row.try_get("secret_key")?,
        created_at: row.try_get("created_at")?,
        upstream_keys: split_keys(row.try_get("upstream_keys")?),
    })
}

/// `caches.upstream_keys`: newline-joined keys, NULL for none.
fn join_keys(keys: &[String]) -> Option<String> {
    (!keys.is_empty()).then(|| keys.join("\n"))
}

fn split_keys(text: Option<String>) -> Vec<String> {
    text.map(|t| t.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

fn token_from_row(row: &AnyRow) -> Result<TokenRow> {
    Ok(TokenRow {
        id: row.try_get("id")?,
        secret_hash: row.try_get("secret_hash")?,
        label: row.try_get("label")?,
        perms: row.try_get("perms")?,
        caches: row.try_get("caches")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
        created_at: row.try_get("created_at")?,
    })
}

fn nar_from_row(row: &AnyRow) -> Result<NarRow> {
    Ok(NarRow {
        id: row.try_get("nar_id")?,
        nar_hash: row.try_get("nar_hash")?,
        nar_size: row.try_get("nar_size")?,
        compression: row.try_get("compression")?,
        file_hash: row.try_get("file_hash")?,
        file_size: row.try_get("file_size")?,
    })
}

fn path_from_row(row: &AnyRow) -> Result<PathRow> {
    Ok(PathRow {
        id: row.try_get("id")?,
        cache_id: row.try_get("cache_id")?,
        hash: row.try_get("hash")?,
        name: row.try_get("name")?,
        refs: row.try_get("refs")?,
        deriver: row.try_get("deriver")?,
        ca: row.try_get("ca")?,
        sigs: row.try_get("sigs")?,
        created_at: row.try_get("created_at")?,
        nar: nar_from_row(row)?,
    })
}

const CACHE_COLS: &str = "id, name, private, priority, compression, max_size, signing_mode, \
                          public_key, secret_key, created_at, upstream_keys";
const TOKEN_COLS: &str =
    "id, secret_hash, label, perms, caches, expires_at, revoked_at, created_at";
const NAR_COLS: &str = "n.id AS nar_id, n.nar_hash, n.nar_size, n.compression, n.file_hash, \
                        n.file_size";

fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
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
        let meta = Metadata {
            pool,
            engine,
            url: url.into(),
        };
        schema::migrate(&meta.pool, engine).await?;
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

    // ---- caches -------------------------------------------------------------------------

    /// Create a cache; `Ok(None)` if the name is taken.
    pub async fn create_cache(&self, c: &NewCache) -> Result<Option<CacheRow>> {
        let sql = format!(
            "INSERT INTO caches (name, private, priority, compression, max_size, signing_mode, \
             public_key, secret_key, created_at, upstream_keys) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (name) DO NOTHING RETURNING {CACHE_COLS}"
        );
        let row = sqlx::query(&sql)
            .bind(&c.name)
            .bind(c.private as i64)
            .bind(c.priority)
            .bind(&c.compression)
            .bind(c.max_size)
            .bind(&c.signing_mode)
            .bind(&c.public_key)
            .bind(&c.secret_key)
            .bind(now_unix())
            .bind(join_keys(&c.upstream_keys))
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(cache_from_row).transpose()
    }

    pub async fn get_cache(&self, name: &str) -> Result<Option<CacheRow>> {
        let sql = format!("SELECT {CACHE_COLS} FROM caches WHERE name = $1");
        let row = sqlx::query(&sql)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(cache_from_row).transpose()
    }

    pub async fn list_caches(&self) -> Result<Vec<CacheRow>> {
        let sql = format!("SELECT {CACHE_COLS} FROM caches ORDER BY name");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(cache_from_row).collect()
    }

    pub async fn update_cache(&self, name: &str, u: &CacheUpdate) -> Result<Option<CacheRow>> {
        let mut tx = self.pool.begin().await?;
        if let Some(p) = u.private {
            sqlx::query("UPDATE caches SET private = $1 WHERE name = $2")
                .bind(p as i64)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(p) = u.priority {
            sqlx::query("UPDATE caches SET priority = $1 WHERE name = $2")
                .bind(p)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(c) = &u.compression {
            sqlx::query("UPDATE caches SET compression = $1 WHERE name = $2")
                .bind(c)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(m) = u.max_size {
            sqlx::query("UPDATE caches SET max_size = $1 WHERE name = $2")
                .bind(m)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(keys) = &u.upstream_keys {
            sqlx::query("UPDATE caches SET upstream_keys = $1 WHERE name = $2")
                .bind(join_keys(keys))
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(pk) = &u.client_public_key {
            sqlx::query(
                "UPDATE caches SET signing_mode = 'client', public_key = $1, secret_key = NULL \
                 WHERE name = $2",
            )
            .bind(pk)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        }
        let sql = format!("SELECT {CACHE_COLS} FROM caches WHERE name = $1");
        let row = sqlx::query(&sql)
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        row.as_ref().map(cache_from_row).transpose()
    }

    /// Delete a cache and everything published in it. NARs it alone used become garbage, to
    /// be collected by [`Metadata::collect_garbage`]. Returns whether the cache existed.
    pub async fn delete_cache(&self, name: &str) -> Result<bool> {
        retry(FOREIGN_KEY, || self.delete_cache_once(name)).await
    }

    async fn delete_cache_once(&self, name: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let id: Option<i64> = sqlx::query_scalar("SELECT id FROM caches WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(id) = id else {
            return Ok(false);
        };
        for table in [
            "paths",
            "path_refs",
            "uploads",
            "logs",
            "pins",
            "evicted_nars",
            "cache_days",
            "realisations",
            "realisation_deps",
        ] {
            sqlx::query(&format!("DELETE FROM {table} WHERE cache_id = $1"))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM caches WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        // End every token scope that named the cache, in the same transaction: a cache
        // created later under the same name is another cache, and no old token reaches it.
        let scoped: Vec<(String, String)> =
            sqlx::query_as("SELECT id, caches FROM tokens WHERE caches IS NOT NULL")
                .fetch_all(&mut *tx)
                .await?;
        for (token_id, caches) in scoped {
            if let Some(ended) = end_scope(&caches, name) {
                sqlx::query("UPDATE tokens SET caches = $1 WHERE id = $2")
                    .bind(ended)
                    .bind(token_id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(true)
    }

    pub async fn cache_stats(&self, cache_id: i64) -> Result<CacheStats> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS paths, CAST(COALESCE(SUM(n.file_size), 0) AS BIGINT) AS size, \
             CAST(COALESCE(SUM(n.nar_size), 0) AS BIGINT) AS nar_size \
             FROM paths p JOIN nars n ON n.id = p.nar_id WHERE p.cache_id = $1",
        )
        .bind(cache_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(CacheStats {
            paths: row.try_get("paths")?,
            size: row.try_get("size")?,
            nar_size: row.try_get("nar_size")?,
        })
    }

    // ---- tokens -------------------------------------------------------------------------

    pub async fn create_token(&self, t: &TokenRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO tokens (id, secret_hash, label, perms, caches, expires_at, revoked_at, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&t.id)
        .bind(&t.secret_hash)
        .bind(&t.label)
        .bind(&t.perms)
        .bind(&t.caches)
        .bind(t.expires_at)
        .bind(t.revoked_at)
        .bind(t.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Create `t` only if no token exists at all (the bootstrap admin token); false if one
    /// does. Replicas starting together on an empty database create one between them.
    pub async fn create_first_token(&self, t: &TokenRow) -> Result<bool> {
        retry(&[], || async {
            let mut tx = self.pool.begin().await?;
            if self.engine == Engine::Postgres {
                lock::xact_lock(&mut tx, LockName::Bootstrap).await?;
            }
            let done = sqlx::query(
                "INSERT INTO tokens (id, secret_hash, label, perms, caches, expires_at, \
                 revoked_at, created_at) SELECT $1, $2, $3, $4, $5, $6, $7, $8 \
                 WHERE NOT EXISTS (SELECT 1 FROM tokens)",
            )
            .bind(&t.id)
            .bind(&t.secret_hash)
            .bind(&t.label)
            .bind(&t.perms)
            .bind(&t.caches)
            .bind(t.expires_at)
            .bind(t.revoked_at)
            .bind(t.created_at)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok::<_, MetaError>(done.rows_affected() > 0)
        })
        .await
    }

    pub async fn token_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM tokens")
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn find_token(&self, secret_hash: &str) -> Result<Option<TokenRow>> {
        let sql = format!("SELECT {TOKEN_COLS} FROM tokens WHERE secret_hash = $1");
        let row = sqlx::query(&sql)
            .bind(secret_hash)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    pub async fn get_token(&self, id: &str) -> Result<Option<TokenRow>> {
        let sql = format!("SELECT {TOKEN_COLS} FROM tokens WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenRow>> {
        let sql = format!("SELECT {TOKEN_COLS} FROM tokens ORDER BY created_at, id");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(token_from_row).collect()
    }

    /// Revoke a token; returns false if no unrevoked token has this id.
    pub async fn revoke_token(&self, id: &str) -> Result<bool> {
        let done =
            sqlx::query("UPDATE tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now_unix())
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() > 0)
    }

    // ---- NARs and uploads ---------------------------------------------------------------

    /// Record a pending upload in `cache_id` that reuses the stored NAR with `nar_hash`, if
    /// one exists. One statement, so garbage collection cannot slip in between the lookup
    /// and the reference. Returns the NAR if it was reused.
    pub async fn reuse_nar_for_upload(
        &self,
        upload_id: &str,
        cache_id: i64,
        key: Option<&str>,
        nar_hash: &str,
    ) -> Result<Option<NarRow>> {
        if let Some(key) = key {
            self.drop_upload_key(cache_id, key).await?;
        }
        // A NAR that garbage collection deletes concurrently fails the foreign key; the retry
        // then finds no NAR to reuse.
        let done = retry(FOREIGN_KEY, || {
            sqlx::query(
                "INSERT INTO uploads (id, cache_id, nar_id, key, created_at) \
                 SELECT $1, $2, id, $3, $4 FROM nars WHERE nar_hash = $5",
            )
            .bind(upload_id)
            .bind(cache_id)
            .bind(key)
            .bind(now_unix())
            .bind(nar_hash)
            .execute(&self.pool)
        })
        .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        self.upload_nar(cache_id, upload_id).await
    }

    async fn drop_upload_key(&self, cache_id: i64, key: &str) -> Result<()> {
        sqlx::query("DELETE FROM uploads WHERE cache_id = $1 AND key = $2")
            .bind(cache_id)
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Claim chunks about to be written to object storage, for the upload `claim_id`: until
    /// the upload records its NAR ([`Metadata::insert_nar_for_upload`] releases the claims) or
    /// the claim expires, garbage collection does not delete these chunks. Without it, a
    /// collection that had decided a chunk was garbage could delete its object just after an
    /// upload of the same bytes found the object present. Committed at once.
    pub async fn claim_chunks(&self, claim_id: &str, chunks: &[ChunkRow]) -> Result<()> {
        // In hash order, so that concurrent claims of overlapping sets cannot deadlock.
        let mut sorted: Vec<&ChunkRow> = chunks.iter().collect();
        sorted.sort_by(|a, b| a.chunk_hash.cmp(&b.chunk_hash));
        sorted.dedup_by(|a, b| a.chunk_hash == b.chunk_hash);
        // A chunk that a collection deletes meanwhile fails the claim's foreign key: run again,
        // creating the chunk anew.
        retry(FOREIGN_KEY, || async {
            let now = now_unix();
            let mut tx = self.pool.begin().await?;
            for chunk in &sorted {
                sqlx::query(
                    "INSERT INTO chunks (chunk_hash, file_size, created_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (chunk_hash) DO NOTHING",
                )
                .bind(&chunk.chunk_hash)
                .bind(chunk.file_size)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO chunk_claims (claim_id, chunk_hash, claimed_at) \
                     VALUES ($1, $2, $3) ON CONFLICT (claim_id, chunk_hash) DO UPDATE \
                     SET claimed_at = excluded.claimed_at",
                )
                .bind(claim_id)
                .bind(&chunk.chunk_hash)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok::<_, MetaError>(())
        })
        .await
    }

    /// Record a newly stored NAR (its chunks claimed by `upload_id` with
    /// [`Metadata::claim_chunks`] and their objects durably stored) and a pending upload
    /// referencing it, releasing the claims. If the same NAR was recorded concurrently, the
    /// upload references that one instead and `Ok((nar, false))` says ours is redundant.
    pub async fn insert_nar_for_upload(
        &self,
        upload_id: &str,
        cache_id: i64,
        key: Option<&str>,
        nar: &NarRow,
        chunks: &[ChunkRow],
    ) -> Result<(NarRow, bool)> {
        if let Some(key) = key {
            self.drop_upload_key(cache_id, key).await?;
        }
        retry(FOREIGN_KEY, || {
            self.insert_nar_for_upload_once(upload_id, cache_id, key, nar, chunks)
        })
        .await
    }

    async fn insert_nar_for_upload_once(
        &self,
        upload_id: &str,
        cache_id: i64,
        key: Option<&str>,
        nar: &NarRow,
        chunks: &[ChunkRow],
    ) -> Result<(NarRow, bool)> {
        let now = now_unix();
        let mut tx = self.pool.begin().await?;
        let new_id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO nars (nar_hash, nar_size, compression, file_hash, file_size, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING id",
        )
        .bind(&nar.nar_hash)
        .bind(nar.nar_size)
        .bind(&nar.compression)
        .bind(&nar.file_hash)
        .bind(nar.file_size)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let inserted = new_id.is_some();
        if let Some(nar_id) = new_id {
            for (seq, chunk) in chunks.iter().enumerate() {
                sqlx::query(
                    "INSERT INTO chunks (chunk_hash, file_size, created_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (chunk_hash) DO NOTHING",
                )
                .bind(&chunk.chunk_hash)
                .bind(chunk.file_size)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                sqlx::query("INSERT INTO nar_chunks (nar_id, seq, chunk_hash) VALUES ($1, $2, $3)")
                    .bind(nar_id)
                    .bind(seq as i64)
                    .bind(&chunk.chunk_hash)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let linked = sqlx::query(
            "INSERT INTO uploads (id, cache_id, nar_id, key, created_at) \
             SELECT $1, $2, id, $3, $4 FROM nars WHERE nar_hash = $5",
        )
        .bind(upload_id)
        .bind(cache_id)
        .bind(key)
        .bind(now)
        .bind(&nar.nar_hash)
        .execute(&mut *tx)
        .await?;
        // The NAR (ours or the one recorded concurrently) now keeps what it uses.
        sqlx::query("DELETE FROM chunk_claims WHERE claim_id = $1")
            .bind(upload_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        if linked.rows_affected() == 0 {
            // Only possible if a file hash collided with a different NAR's; treat as corrupt.
            return Err(MetaError::Corrupt {
                field: "nars.file_hash",
                value: nar.file_hash.clone(),
            });
        }
        let row =
            self.upload_nar(cache_id, upload_id)
                .await?
                .ok_or_else(|| MetaError::Corrupt {
                    field: "uploads.id",
                    value: upload_id.to_owned(),
                })?;
        Ok((row, inserted))
    }

    /// The NAR of a pending upload.
    pub async fn upload_nar(&self, cache_id: i64, upload_id: &str) -> Result<Option<NarRow>> {
        let sql = format!(
            "SELECT {NAR_COLS} FROM uploads u JOIN nars n ON n.id = u.nar_id \
             WHERE u.cache_id = $1 AND u.id = $2"
        );
        let row = sqlx::query(&sql)
            .bind(cache_id)
            .bind(upload_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(nar_from_row).transpose()
    }

    /// The pending upload that Nix's uploader stored under `nar/<key>`.
    pub async fn upload_by_key(
        &self,
        cache_id: i64,
        key: &str,
    ) -> Result<Option<(String, NarRow)>> {
        let sql = format!(
            "SELECT u.id AS upload_id, {NAR_COLS} FROM uploads u JOIN nars n ON n.id = u.nar_id \
             WHERE u.cache_id = $1 AND u.key = $2 ORDER BY u.created_at DESC"
        );
        let row = sqlx::query(&sql)
            .bind(cache_id)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => Ok(Some((row.try_get("upload_id")?, nar_from_row(&row)?))),
            None => Ok(None),
        }
    }

    /// The NAR whose stored file has `file_hash`, if `cache_id` publishes a path using it.
    pub async fn cache_nar_by_file_hash(
        &self,
        cache_id: i64,
        file_hash: &str,
    ) -> Result<Option<NarRow>> {
        let sql = format!(
            "SELECT {NAR_COLS} FROM nars n WHERE n.file_hash = $1 AND EXISTS \
             (SELECT 1 FROM paths p WHERE p.cache_id = $2 AND p.nar_id = n.id)"
        );
        let row = sqlx::query(&sql)
            .bind(file_hash)
            .bind(cache_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(nar_from_row).transpose()
    }

    /// The chunks of a NAR, in order.
    pub async fn nar_chunks(&self, nar_id: i64) -> Result<Vec<ChunkRow>> {
        let rows = sqlx::query(
            "SELECT c.chunk_hash, c.file_size FROM nar_chunks nc \
             JOIN chunks c ON c.chunk_hash = nc.chunk_hash WHERE nc.nar_id = $1 ORDER BY nc.seq",
        )
        .bind(nar_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ChunkRow {
                    chunk_hash: r.try_get("chunk_hash")?,
                    file_size: r.try_get("file_size")?,
                })
            })
            .collect()
    }

    // ---- paths --------------------------------------------------------------------------

    pub async fn get_path(&self, cache_id: i64, hash: &str) -> Result<Option<PathRow>> {
        let sql = format!(
            "SELECT p.id, p.cache_id, p.hash, p.name, p.refs, p.deriver, p.ca, p.sigs, \
             p.created_at, {NAR_COLS} FROM paths p JOIN nars n ON n.id = p.nar_id \
             WHERE p.cache_id = $1 AND p.hash = $2"
        );
        let row = sqlx::query(&sql)
            .bind(cache_id)
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(path_from_row).transpose()
    }

    /// Which of `hashes` (32-character hash parts) the cache does not publish, in input order.
    pub async fn missing_hashes(&self, cache_id: i64, hashes: &[String]) -> Result<Vec<String>> {
        let mut present = std::collections::HashSet::new();
        for batch in hashes.chunks(IN_BATCH) {
            let sql = format!(
                "SELECT hash FROM paths WHERE cache_id = $1 AND hash IN ({})",
                placeholders(2, batch.len())
            );
            let mut q = sqlx::query_scalar::<_, String>(&sql).bind(cache_id);
            for h in batch {
                q = q.bind(h);
            }
            present.extend(q.fetch_all(&self.pool).await?);
        }
        Ok(hashes
            .iter()
            .filter(|h| !present.contains(*h))
            .cloned()
            .collect())
    }

    /// Publish a path from a pending upload, atomically: the path row is created, its
    /// references are checked to be published in the same cache, and the upload is consumed,
    /// or nothing changes.
    pub async fn publish_path(&self, p: &NewPath, upload_id: &str) -> Result<Publish> {
        let mut attempt = 1;
        loop {
            match retry(FOREIGN_KEY, || self.publish_path_once(p, upload_id)).await? {
                // The row that stopped the insert was deleted (an eviction) before it could be
                // read: nothing conflicts any more, so publish again.
                Publish::Conflict { existing_nar_hash }
                    if existing_nar_hash.is_empty() && attempt < TX_ATTEMPTS =>
                {
                    attempt += 1;
                }
                other => return Ok(other),
            }
        }
    }

    async fn publish_path_once(&self, p: &NewPath, upload_id: &str) -> Result<Publish> {
        let self_basename = format!("{}-{}", p.hash, p.name);
        let mut tx = self.pool.begin().await?;
        // The write comes first so that SQLite takes its write lock at once (a deferred
        // transaction that reads first can fail to upgrade under concurrency).
        let new_id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO paths (cache_id, hash, name, nar_id, refs, deriver, ca, sigs, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (cache_id, hash) DO NOTHING RETURNING id",
        )
        .bind(p.cache_id)
        .bind(&p.hash)
        .bind(&p.name)
        .bind(p.nar_id)
        .bind(p.refs.join(" "))
        .bind(&p.deriver)
        .bind(&p.ca)
        .bind(p.sigs.join("\n"))
        .bind(now_unix())
        .fetch_optional(&mut *tx)
        .await?;
        if new_id.is_none() {
            let existing: Option<String> = sqlx::query_scalar(
                "SELECT n.nar_hash FROM paths p JOIN nars n ON n.id = p.nar_id \
                 WHERE p.cache_id = $1 AND p.hash = $2",
            )
            .bind(p.cache_id)
            .bind(&p.hash)
            .fetch_optional(&mut *tx)
            .await?;
            let nar_hash: Option<String> =
                sqlx::query_scalar("SELECT nar_hash FROM nars WHERE id = $1")
                    .bind(p.nar_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            tx.rollback().await?;
            return Ok(match existing {
                Some(e) if Some(&e) == nar_hash.as_ref() => Publish::AlreadyPresent,
                Some(e) => Publish::Conflict {
                    existing_nar_hash: e,
                },
                None => Publish::Conflict {
                    existing_nar_hash: String::new(),
                },
            });
        }
        let wanted: Vec<String> = p
            .refs
            .iter()
            .filter(|r| **r != self_basename)
            .map(|r| r.get(..32).unwrap_or(r).to_owned())
            .collect();
        // On PostgreSQL the references are share-locked, so a concurrent eviction deleting one
        // either waits for this transaction (and then sees the new referrer and gives up) or
        // has already deleted it (and the reference counts as missing). SQLite serialises
        // writers, which gives the same guarantee.
        let lock = match self.engine {
            Engine::Postgres => " FOR SHARE",
            Engine::Sqlite => "",
        };
        let mut present = std::collections::HashSet::new();
        for batch in wanted.chunks(IN_BATCH) {
            let sql = format!(
                "SELECT hash || '-' || name FROM paths WHERE cache_id = $1 AND hash IN ({}){lock}",
                placeholders(2, batch.len())
            );
            let mut q = sqlx::query_scalar::<_, String>(&sql).bind(p.cache_id);
            for h in batch {
                q = q.bind(h);
            }
            present.extend(q.fetch_all(&mut *tx).await?);
        }
        let missing: Vec<String> = p
            .refs
            .iter()
            .filter(|r| {
                **r != self_basename && !present.contains(*r) && !p.upstream_refs.contains(r)
            })
            .cloned()
            .collect();
        if !missing.is_empty() {
            tx.rollback().await?;
            return Ok(Publish::MissingReferences(missing));
        }
        for r in ref_hashes(&p.hash, p.refs.iter().map(String::as_str)) {
            sqlx::query(
                "INSERT INTO path_refs (cache_id, referrer, ref_hash) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(p.cache_id)
            .bind(&p.hash)
            .bind(r)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("DELETE FROM uploads WHERE cache_id = $1 AND id = $2")
            .bind(p.cache_id)
            .bind(upload_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Publish::Created)
    }

    // ---- build logs ---------------------------------------------------------------------

    pub async fn put_log(
        &self,
        cache_id: i64,
        drv: &str,
        object_key: &str,
        size: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO logs (cache_id, drv, object_key, size, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (cache_id, drv) DO UPDATE \
             SET object_key = excluded.object_key, size = excluded.size, \
             created_at = excluded.created_at",
        )
        .bind(cache_id)
        .bind(drv)
        .bind(object_key)
        .bind(size)
        .bind(now_unix())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_log(&self, cache_id: i64, drv: &str) -> Result<Option<(String, i64)>> {
        let row = sqlx::query("SELECT object_key, size FROM logs WHERE cache_id = $1 AND drv = $2")
            .bind(cache_id)
            .bind(drv)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => Ok(Some((r.try_get("object_key")?, r.try_get("size")?))),
            None => Ok(None),
        }
    }

    // ---- garbage ------------------------------------------------------------------------

    /// Forget pending uploads older than `max_upload_age_secs`, chunk claims older than
    /// `claim_ttl_secs`, NARs nothing refers to, and chunks no NAR and no claim uses; delete
    /// their objects with `delete_object`. Returns how many objects were deleted.
    ///
    /// Works in rounds of at most [`GC_BATCH`] NARs and chunks, each one transaction that
    /// deletes the objects *before* it commits, while the chunk rows are locked: an upload
    /// claiming one of those chunks ([`Metadata::claim_chunks`]) waits for the round, then
    /// writes the object again. If deleting an object fails, the round is rolled back (rows
    /// whose objects are gone are unreferenced, and are deleted again next time). A NAR or a
    /// chunk that gains a reference or a claim while a round decides it is garbage fails the
    /// round's foreign keys (never deleting anything in use), and the round runs again.
    ///
    /// The NAR of an evicted path stays for `evicted_grace_secs` after its eviction (see
    /// [`Metadata::evict_paths`]), so a narinfo served just before the eviction still works.
    pub async fn collect_garbage(
        &self,
        max_upload_age_secs: i64,
        evicted_grace_secs: i64,
        claim_ttl_secs: i64,
        delete_object: &DeleteObject<'_>,
    ) -> Result<usize> {
        // What decided these objects are garbage (an eviction, a deleted path) must survive a
        // power loss before any object goes: otherwise the database could come back with a
        // path whose NAR was deleted.
        if !self.make_durable().await? {
            return Ok(0); // the next collection tries again
        }
        let now = now_unix();
        let cutoffs = (
            now - max_upload_age_secs,
            now - evicted_grace_secs,
            now - claim_ttl_secs,
        );
        let mut deleted = 0;
        loop {
            let mut attempt = 1;
            let (nars, objects) = loop {
                match self.gc_round(cutoffs, delete_object).await {
                    Err(e) if attempt < TX_ATTEMPTS && retryable(&e, FOREIGN_KEY) => {
                        tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
                        attempt += 1;
                    }
                    r => break r?,
                }
            };
            deleted += objects;
            if nars + objects == 0 {
                return Ok(deleted);
            }
        }
    }

    /// Make every committed transaction durable; `false` if that could not be done now.
    ///
    /// PostgreSQL commits durably (`synchronous_commit`). SQLite runs in WAL mode with
    /// `synchronous = NORMAL`: a commit is atomic and consistent at once, but reaches the disk
    /// only at the next checkpoint, so an OS crash or power loss can undo the last
    /// transactions (uploads and publications a client was told succeeded, evictions; never
    /// half of one). Objects are written and `fsync`ed before the rows that name them commit,
    /// so an undone publication leaves an unreferenced object, which garbage collection
    /// deletes. The other way round needs this checkpoint: garbage collection deletes objects
    /// only after the rows that made them garbage are on disk.
    pub async fn make_durable(&self) -> Result<bool> {
        match self.engine {
            Engine::Postgres => Ok(true),
            Engine::Sqlite => {
                // FULL: waits (busy_timeout) for readers and writers, then syncs the WAL and
                // copies every frame into the database file.
                let row = sqlx::query("PRAGMA wal_checkpoint(FULL)")
                    .fetch_one(&self.pool)
                    .await?;
                let busy: i64 = row.try_get(0)?;
                Ok(busy == 0)
            }
        }
    }

    /// One round of [`Metadata::collect_garbage`]: `(NARs, objects)` deleted.
    async fn gc_round(
        &self,
        (upload_cutoff, grace_cutoff, claim_cutoff): (i64, i64, i64),
        delete_object: &DeleteObject<'_>,
    ) -> Result<(usize, usize)> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM uploads WHERE created_at < $1")
            .bind(upload_cutoff)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM evicted_nars WHERE evicted_at < $1")
            .bind(grace_cutoff)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM chunk_claims WHERE claimed_at < $1")
            .bind(claim_cutoff)
            .execute(&mut *tx)
            .await?;
        // Decided once: the NARs deleted are exactly these, whatever commits meanwhile; one
        // referenced meanwhile fails the foreign keys of `paths`/`uploads` below.
        let doomed: Vec<(i64, String)> = sqlx::query_as(&format!(
            "SELECT id, nar_hash FROM nars n WHERE \
             NOT EXISTS (SELECT 1 FROM paths p WHERE p.nar_id = n.id) AND \
             NOT EXISTS (SELECT 1 FROM uploads u WHERE u.nar_id = n.id) AND \
             NOT EXISTS (SELECT 1 FROM evicted_nars e WHERE e.nar_id = n.id) LIMIT {GC_BATCH}"
        ))
        .fetch_all(&mut *tx)
        .await?;
        let nars: Vec<i64> = doomed.iter().map(|(id, _)| *id).collect();
        if !nars.is_empty() {
            let ph = placeholders(1, nars.len());
            for sql in [
                format!("DELETE FROM nar_chunks WHERE nar_id IN ({ph})"),
                format!("DELETE FROM nars WHERE id IN ({ph})"),
            ] {
                let mut q = sqlx::query(&sql);
                for id in &nars {
                    q = q.bind(id);
                }
                q.execute(&mut *tx).await?;
            }
        }
        // Chunks used by a NAR or claimed by an upload committed meanwhile fail the foreign
        // keys of `nar_chunks`/`chunk_claims`, like NARs above.
        let chunks: Vec<String> = sqlx::query_scalar(&format!(
            "DELETE FROM chunks WHERE chunk_hash IN (SELECT c.chunk_hash FROM chunks c WHERE \
             NOT EXISTS (SELECT 1 FROM nar_chunks nc WHERE nc.chunk_hash = c.chunk_hash) AND \
             NOT EXISTS (SELECT 1 FROM chunk_claims cc WHERE cc.chunk_hash = c.chunk_hash) \
             LIMIT {GC_BATCH}) RETURNING chunk_hash"
        ))
        .fetch_all(&mut *tx)
        .await?;
        for hash in &chunks {
            if let Err(e) = delete_object(chunk_object_key(hash)).await {
                tx.rollback().await?;
                return Err(MetaError::Cleanup(e));
            }
        }
        // The NARs' listings. A NAR stored again meanwhile under the same hash finds its
        // listing missing and writes it again when it is first asked for.
        for (_, nar_hash) in &doomed {
            if let Err(e) = delete_object(listing_object_key(nar_hash)).await {
                tx.rollback().await?;
                return Err(MetaError::Cleanup(e));
            }
        }
        tx.commit().await?;
        Ok((nars.len(), chunks.len()))
    }

    /// Which of `hashes` have no `chunks` row, in input order. Read only, and stale as soon as
    /// it returns: a cheap filter before [`Metadata::delete_orphan_chunks`], which decides.
    pub async fn unknown_chunks(&self, hashes: &[String]) -> Result<Vec<String>> {
        let mut known = std::collections::HashSet::new();
        for batch in hashes.chunks(IN_BATCH) {
            let sql = format!(
                "SELECT chunk_hash FROM chunks WHERE chunk_hash IN ({})",
                placeholders(1, batch.len())
            );
            let mut q = sqlx::query_scalar::<_, String>(&sql);
            for h in batch {
                q = q.bind(h);
            }
            known.extend(q.fetch_all(&self.pool).await?);
        }
        Ok(hashes
            .iter()
            .filter(|h| !known.contains(*h))
            .cloned()
            .collect())
    }

    /// Delete the objects of the chunks among `hashes` that have no `chunks` row (orphans:
    /// objects the database does not know) with `delete_object`; returns those hashes.
    ///
    /// Race-free against uploads, by the pattern of [`Metadata::collect_garbage`]: per
    /// [`ORPHAN_BATCH`] hashes, one transaction inserts a row for each (`ON CONFLICT DO
    /// NOTHING`). The rows it inserted are exactly the orphans, and are locked by it: an upload
    /// claiming one of those chunks ([`Metadata::claim_chunks`]) waits. The objects are
    /// deleted, then the rows, then the transaction commits, and the waiting claim goes on to
    /// write its object again. If deleting an object fails, the transaction rolls back
    /// ([`MetaError::Cleanup`]).
    pub async fn delete_orphan_chunks(
        &self,
        hashes: &[String],
        delete_object: &DeleteObject<'_>,
    ) -> Result<Vec<String>> {
        // In hash order, like claims, so that the two cannot deadlock.
        let mut sorted: Vec<&str> = hashes.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut deleted = Vec::new();
        for batch in sorted.chunks(ORPHAN_BATCH) {
            // Deletes are idempotent: a batch that lost a race (deadlock, busy) runs again whole.
            deleted.extend(retry(&[], || self.delete_orphan_batch(batch, delete_object)).await?);
        }
        Ok(deleted)
    }

    async fn delete_orphan_batch(
        &self,
        batch: &[&str],
        delete_object: &DeleteObject<'_>,
    ) -> Result<Vec<String>> {
        use futures::{StreamExt, TryStreamExt};
        let mut tx = self.pool.begin().await?;
        let values = (0..batch.len())
            .map(|i| format!("(${}, 0, $1)", i + 2))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "INSERT INTO chunks (chunk_hash, file_size, created_at) VALUES {values} \
             ON CONFLICT (chunk_hash) DO NOTHING RETURNING chunk_hash"
        );
        let mut q = sqlx::query_scalar::<_, String>(&sql).bind(now_unix());
        for h in batch {
            q = q.bind(*h);
        }
        let orphans = q.fetch_all(&mut *tx).await?;
        if orphans.is_empty() {
            tx.rollback().await?;
            return Ok(orphans);
        }
        // The futures are made before they are streamed: a stream mapping through a closure
        // over borrowed items would make the caller's future not `Send` (rustc cannot prove it).
        let deletes: Vec<_> = orphans
            .iter()
            .map(|h| delete_object(chunk_object_key(h)))
            .collect();
        let deleted = futures::stream::iter(deletes)
            .buffer_unordered(ORPHAN_DELETE_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await;
        if let Err(e) = deleted {
            tx.rollback().await?;
            return Err(MetaError::Cleanup(e));
        }
        let sql = format!(
            "DELETE FROM chunks WHERE chunk_hash IN ({})",
            placeholders(1, orphans.len())
        );
        let mut q = sqlx::query(&sql);
        for h in &orphans {
            q = q.bind(h);
        }
        q.execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(orphans)
    }

    // ---- usage, eviction and pins -------------------------------------------------------

    /// Mark paths of a cache used at `at`: those with these hash parts and those whose NAR is
    /// one of `nar_ids`. One statement per [`IN_BATCH`] of each.
    pub async fn record_usage(
        &self,
        cache_id: i64,
        hashes: &[String],
        nar_ids: &[i64],
        at: i64,
    ) -> Result<()> {
        // Sorted: replicas flushing overlapping sets lock rows in the same order.
        let mut hashes = hashes.to_vec();
        hashes.sort();
        let mut nar_ids = nar_ids.to_vec();
        nar_ids.sort();
        for batch in hashes.chunks(IN_BATCH) {
            let sql = format!(
                "UPDATE paths SET last_used_at = $1 WHERE cache_id = $2 AND hash IN ({})",
                placeholders(3, batch.len())
            );
            retry(&[], || {
                let mut q = sqlx::query(&sql).bind(at).bind(cache_id);
                for h in batch {
                    q = q.bind(h);
                }
                q.execute(&self.pool)
            })
            .await?;
        }
        for batch in nar_ids.chunks(IN_BATCH) {
            let sql = format!(
                "UPDATE paths SET last_used_at = $1 WHERE cache_id = $2 AND nar_id IN ({})",
                placeholders(3, batch.len())
            );
            retry(&[], || {
                let mut q = sqlx::query(&sql).bind(at).bind(cache_id);
                for n in batch {
                    q = q.bind(n);
                }
                q.execute(&self.pool)
            })
            .await?;
        }
        Ok(())
    }

    /// Every path of a cache with what eviction needs to order it.
    pub async fn lru_paths(&self, cache_id: i64) -> Result<Vec<LruPath>> {
        let rows = sqlx::query(
            "SELECT p.id, p.hash, p.name, p.nar_id, n.file_size, p.created_at, p.last_used_at \
             FROM paths p JOIN nars n ON n.id = p.nar_id WHERE p.cache_id = $1",
        )
        .bind(cache_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(LruPath {
                    id: r.try_get("id")?,
                    hash: r.try_get("hash")?,
                    name: r.try_get("name")?,
                    nar_id: r.try_get("nar_id")?,
                    file_size: r.try_get("file_size")?,
                    created_at: r.try_get("created_at")?,
                    last_used_at: r.try_get("last_used_at")?,
                })
            })
            .collect()
    }

    /// Every reference edge of a cache: `(referrer hash, referenced hash)`.
    pub async fn cache_refs(&self, cache_id: i64) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT referrer, ref_hash FROM path_refs WHERE cache_id = $1")
            .bind(cache_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("referrer")?, r.try_get("ref_hash")?)))
            .collect()
    }

    /// Remove these paths from a cache in one transaction, keeping their NARs servable (and
    /// safe from garbage collection) for a grace period. Refused ([`Evicted::Raced`]) if a
    /// path that stays references one of them or a pin names one of them: the caller's
    /// plan was made before that path or pin appeared.
    pub async fn evict_paths(&self, cache_id: i64, hashes: &[String]) -> Result<Evicted> {
        retry(&[], || self.evict_paths_once(cache_id, hashes)).await
    }

    async fn evict_paths_once(&self, cache_id: i64, hashes: &[String]) -> Result<Evicted> {
        let now = now_unix();
        let mut tx = self.pool.begin().await?;
        // Writes first, so SQLite takes its write lock at once.
        for batch in hashes.chunks(IN_BATCH) {
            let sql = format!(
                "INSERT INTO evicted_nars (cache_id, nar_id, evicted_at) \
                 SELECT DISTINCT cache_id, nar_id, $1 FROM paths WHERE cache_id = $2 AND hash IN ({}) \
                 ON CONFLICT (cache_id, nar_id) DO UPDATE SET evicted_at = excluded.evicted_at",
                placeholders(3, batch.len())
            );
            let mut q = sqlx::query(&sql).bind(now).bind(cache_id);
            for h in batch {
                q = q.bind(h);
            }
            q.execute(&mut *tx).await?;
            let ph = placeholders(2, batch.len());
            for sql in [
                format!("DELETE FROM path_refs WHERE cache_id = $1 AND referrer IN ({ph})"),
                format!("DELETE FROM paths WHERE cache_id = $1 AND hash IN ({ph})"),
            ] {
                let mut q = sqlx::query(&sql).bind(cache_id);
                for h in batch {
                    q = q.bind(h);
                }
                q.execute(&mut *tx).await?;
            }
        }
        realisations::forget_paths(&mut tx, cache_id, hashes).await?;
        for batch in hashes.chunks(IN_BATCH) {
            let ph = placeholders(2, batch.len());
            for sql in [
                format!(
                    "SELECT COUNT(*) FROM path_refs WHERE cache_id = $1 AND ref_hash IN ({ph})"
                ),
                format!("SELECT COUNT(*) FROM pins WHERE cache_id = $1 AND hash IN ({ph})"),
            ] {
                let mut q = sqlx::query_scalar::<_, i64>(&sql).bind(cache_id);
                for h in batch {
                    q = q.bind(h);
                }
                if q.fetch_one(&mut *tx).await? > 0 {
                    tx.rollback().await?;
                    return Ok(Evicted::Raced);
                }
            }
        }
        tx.commit().await?;
        Ok(Evicted::Done)
    }

    /// The NAR served as `nar/<file_hash>…` in a cache: one a published path uses, or one of a
    /// path evicted at or after `evicted_since` (a narinfo naming it may still be cached).
    pub async fn servable_nar_by_file_hash(
        &self,
        cache_id: i64,
        file_hash: &str,
        evicted_since: i64,
    ) -> Result<Option<NarRow>> {
        let sql = format!(
            "SELECT {NAR_COLS} FROM nars n WHERE n.file_hash = $1 AND (EXISTS \
             (SELECT 1 FROM paths p WHERE p.cache_id = $2 AND p.nar_id = n.id) OR EXISTS \
             (SELECT 1 FROM evicted_nars e WHERE e.cache_id = $2 AND e.nar_id = n.id \
             AND e.evicted_at >= $3))"
        );
        let row = sqlx::query(&sql)
            .bind(file_hash)
            .bind(cache_id)
            .bind(evicted_since)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(nar_from_row).transpose()
    }

    /// Pin `store_path` (hash part `hash`) as a new revision of `name`, if the cache publishes
    /// it (in the same transaction). `Ok(None)`: the path is not in the cache.
    pub async fn add_pin(
        &self,
        cache_id: i64,
        name: &str,
        hash: &str,
        store_path: &str,
        keep: Keep,
    ) -> Result<Option<PinRow>> {
        let (kind, n) = match keep {
            Keep::Forever => ("forever", None),
            Keep::Revisions(n) => ("revisions", Some(n)),
            Keep::Days(n) => ("days", Some(n)),
        };
        // Two pins of one name at once compute the same revision: one fails the unique key
        // and runs again.
        let added = retry(UNIQUE, || async {
            let now = now_unix();
            let mut tx = self.pool.begin().await?;
            if self.engine == Engine::Postgres {
                // Share-lock the path: a concurrent eviction deleting it either waits for this
                // pin (and then sees it and gives up) or has deleted it (and the pin fails).
                let present: Option<i64> = sqlx::query_scalar(
                    "SELECT id FROM paths WHERE cache_id = $1 AND hash = $2 FOR SHARE",
                )
                .bind(cache_id)
                .bind(hash)
                .fetch_optional(&mut *tx)
                .await?;
                if present.is_none() {
                    tx.rollback().await?;
                    return Ok(false);
                }
            }
            let done = sqlx::query(
                "INSERT INTO pins (cache_id, name, revision, hash, store_path, keep, keep_n, \
                 created_at) SELECT $1, $2, COALESCE((SELECT MAX(revision) FROM pins \
                 WHERE cache_id = $1 AND name = $2), 0) + 1, $3, $4, $5, $6, $7 \
                 WHERE EXISTS (SELECT 1 FROM paths WHERE cache_id = $1 AND hash = $3)",
            )
            .bind(cache_id)
            .bind(name)
            .bind(hash)
            .bind(store_path)
            .bind(kind)
            .bind(n)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
            tx.commit().await?;
            Ok::<_, MetaError>(true)
        })
        .await?;
        if !added {
            return Ok(None);
        }
        self.prune_pins(cache_id).await?;
        Ok(self
            .list_pins(cache_id)
            .await?
            .into_iter()
            .find(|p| p.name == name))
    }

    /// Every kept revision of every pin of a cache, by name, newest revision first.
    pub async fn list_pins(&self, cache_id: i64) -> Result<Vec<PinRow>> {
        let rows = sqlx::query(
            "SELECT name, revision, hash, store_path, keep, keep_n, created_at FROM pins \
             WHERE cache_id = $1 ORDER BY name, revision DESC",
        )
        .bind(cache_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let kind: String = r.try_get("keep")?;
                let n: Option<i64> = r.try_get("keep_n")?;
                let keep = match (kind.as_str(), n) {
                    ("forever", _) => Keep::Forever,
                    ("revisions", Some(n)) => Keep::Revisions(n),
                    ("days", Some(n)) => Keep::Days(n),
                    _ => {
                        return Err(MetaError::Corrupt {
                            field: "pins.keep",
                            value: kind,
                        })
                    }
                };
                Ok(PinRow {
                    name: r.try_get("name")?,
                    revision: r.try_get("revision")?,
                    hash: r.try_get("hash")?,
                    store_path: r.try_get("store_path")?,
                    keep,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// Delete every revision of a pin; false if there was none.
    pub async fn delete_pin(&self, cache_id: i64, name: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM pins WHERE cache_id = $1 AND name = $2")
            .bind(cache_id)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Drop the revisions that their pin's newest revision's policy no longer keeps.
    pub async fn prune_pins(&self, cache_id: i64) -> Result<u64> {
        let pins = self.list_pins(cache_id).await?;
        let now = now_unix();
        let mut dropped = 0;
        let mut i = 0;
        while i < pins.len() {
            let newest = &pins[i];
            let group: Vec<&PinRow> = pins[i..]
                .iter()
                .take_while(|p| p.name == newest.name)
                .collect();
            i += group.len();
            for (age, p) in group.iter().enumerate().skip(1) {
                let keep = match newest.keep {
                    Keep::Forever => true,
                    Keep::Revisions(n) => (age as i64) < n.max(1),
                    Keep::Days(d) => p.created_at >= now - d.saturating_mul(86400),
                };
                if !keep {
                    dropped += sqlx::query(
                        "DELETE FROM pins WHERE cache_id = $1 AND name = $2 AND revision = $3",
                    )
                    .bind(cache_id)
                    .bind(&p.name)
                    .bind(p.revision)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                }
            }
        }
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn chunk_keys_name_their_hash() {
        let h = larder_nix::hash::Sha256::digest(b"chunk").to_nix32();
        let key = chunk_object_key(&h);
        assert_eq!(chunk_hash_of_key(&key), Some(h.as_str()));
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
