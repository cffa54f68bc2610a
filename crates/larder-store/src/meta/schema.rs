//! The schema and its migrations. Columns use types both engines share (`BIGINT`, `TEXT`);
//! only the auto-increment primary key is spelled per engine. Each migration runs once, in
//! order, recorded in `larder_schema`. A migration is never edited once released; changes
//! are new entries. Version 2 adds `path_refs` (who references whom, for eviction's referrer
//! queries), `evicted_nars` (the grace period of evicted paths' NARs) and `pins`; its
//! `path_refs` rows are filled from `paths.refs` in Rust, since splitting a list is not
//! portable SQL. Version 3 indexes paths by name for the contents list's keyset pagination.
//! Version 4 adds `chunk_claims`: chunks an upload is writing, which garbage collection must
//! not delete (see `Metadata::claim_chunks`). Version 5 adds `caches.upstream_keys`: the
//! cache's own upstream keys (newline-joined), trusted beside the server-wide ones.
//! Version 6 adds `cache_days`: per cache and UTC day (days since 1970-01-01), the narinfo and
//! NAR downloads served (requests and body bytes, added up by every replica's flushes) and the
//! cache's stored size as last sampled that day (`size_at`: when, in milliseconds, so that an
//! older sample written late never replaces a newer one). No foreign key: rows are written
//! from in-memory counters after the fact, and deleting a cache deletes its rows.
//! Version 7 adds `realisations` (content-addressed derivation outputs and the path each was
//! built to) and `realisation_deps` (the realisations each depends on); see
//! `meta/realisations.rs`.
//! Version 8 adds pull-through caching: `caches.upstreams` (the upstream cache URLs a narinfo
//! miss is asked of, newline-joined, in order) and `paths.upstream` (the upstream a path was
//! fetched from; NULL for a pushed path).
//! Version 9 adds the size counters of `meta/sizes.rs` (`cache_chunks`, `cache_sizes`,
//! `store_sizes`), computed here once from the tables (a few seconds per 100 000 paths) and
//! kept by every transaction since: a cache's info no longer sums its paths and chunks.
//! Version 10 adds packs (`meta/packs.rs`): `chunks.pack`/`pack_offset` say where a chunk's
//! frame is (NULL: its own object, as before), `packs` lists the pack objects. Chunks no NAR
//! uses become "not located" (`pack = ''`), so an upload writes them again into its pack
//! rather than trusting an object an interrupted upload may never have written; their bytes
//! leave `store_sizes` (a row of its own, shard 1000, holds the difference).
//! Version 11 moves a path's last use out of `paths` into `path_uses` (a row of two numbers
//! per used path, deleted with its path): `paths` rows are wide, so the first uses of paths
//! served at random rewrote a page of `paths` each, 3 GB written in 12 s of random narinfos
//! over 100 000 paths (`meta/usage.rs`).
//!
//! On PostgreSQL the migrations run in one transaction under an advisory lock, so replicas
//! starting together apply them once; a database migrated by a newer larder is refused.

use sqlx::AnyPool;

use super::{Engine, MetaError};

/// Migrations in order; `{ID}` is the engine's auto-increment primary key.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE caches (
    id {ID},
    name TEXT NOT NULL UNIQUE,
    private BIGINT NOT NULL,
    priority BIGINT NOT NULL,
    compression TEXT NOT NULL,
    max_size BIGINT,
    signing_mode TEXT NOT NULL,
    public_key TEXT,
    secret_key TEXT,
    created_at BIGINT NOT NULL
);
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL,
    perms TEXT NOT NULL,
    caches TEXT,
    expires_at BIGINT,
    revoked_at BIGINT,
    created_at BIGINT NOT NULL
);
CREATE TABLE nars (
    id {ID},
    nar_hash TEXT NOT NULL UNIQUE,
    nar_size BIGINT NOT NULL,
    compression TEXT NOT NULL,
    file_hash TEXT NOT NULL UNIQUE,
    file_size BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE chunks (
    chunk_hash TEXT PRIMARY KEY,
    file_size BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE nar_chunks (
    nar_id BIGINT NOT NULL REFERENCES nars (id),
    seq BIGINT NOT NULL,
    chunk_hash TEXT NOT NULL REFERENCES chunks (chunk_hash),
    PRIMARY KEY (nar_id, seq)
);
CREATE INDEX nar_chunks_chunk ON nar_chunks (chunk_hash);
CREATE TABLE paths (
    id {ID},
    cache_id BIGINT NOT NULL REFERENCES caches (id),
    hash TEXT NOT NULL,
    name TEXT NOT NULL,
    nar_id BIGINT NOT NULL REFERENCES nars (id),
    refs TEXT NOT NULL,
    deriver TEXT,
    ca TEXT,
    sigs TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT,
    UNIQUE (cache_id, hash)
);
CREATE INDEX paths_nar ON paths (nar_id);
CREATE TABLE uploads (
    id TEXT PRIMARY KEY,
    cache_id BIGINT NOT NULL REFERENCES caches (id),
    nar_id BIGINT NOT NULL REFERENCES nars (id),
    key TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX uploads_nar ON uploads (nar_id);
CREATE INDEX uploads_key ON uploads (cache_id, key);
CREATE TABLE logs (
    cache_id BIGINT NOT NULL REFERENCES caches (id),
    drv TEXT NOT NULL,
    object_key TEXT NOT NULL,
    size BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (cache_id, drv)
);
"#,
    r#"
CREATE TABLE path_refs (
    cache_id BIGINT NOT NULL,
    referrer TEXT NOT NULL,
    ref_hash TEXT NOT NULL,
    PRIMARY KEY (cache_id, referrer, ref_hash)
);
CREATE INDEX path_refs_ref ON path_refs (cache_id, ref_hash);
CREATE TABLE evicted_nars (
    cache_id BIGINT NOT NULL,
    nar_id BIGINT NOT NULL,
    evicted_at BIGINT NOT NULL,
    PRIMARY KEY (cache_id, nar_id)
);
CREATE INDEX evicted_nars_nar ON evicted_nars (nar_id);
CREATE TABLE pins (
    id {ID},
    cache_id BIGINT NOT NULL REFERENCES caches (id),
    name TEXT NOT NULL,
    revision BIGINT NOT NULL,
    hash TEXT NOT NULL,
    store_path TEXT NOT NULL,
    keep TEXT NOT NULL,
    keep_n BIGINT,
    created_at BIGINT NOT NULL,
    UNIQUE (cache_id, name, revision)
);
CREATE INDEX pins_hash ON pins (cache_id, hash)
"#,
    r#"
CREATE INDEX paths_by_name ON paths (cache_id, name, hash)
"#,
    r#"
CREATE TABLE chunk_claims (
    claim_id TEXT NOT NULL,
    chunk_hash TEXT NOT NULL REFERENCES chunks (chunk_hash),
    claimed_at BIGINT NOT NULL,
    PRIMARY KEY (claim_id, chunk_hash)
);
CREATE INDEX chunk_claims_chunk ON chunk_claims (chunk_hash)
"#,
    r#"
ALTER TABLE caches ADD COLUMN upstream_keys TEXT
"#,
    r#"
CREATE TABLE cache_days (
    cache_id BIGINT NOT NULL,
    day BIGINT NOT NULL,
    narinfo_requests BIGINT NOT NULL,
    narinfo_bytes BIGINT NOT NULL,
    nar_requests BIGINT NOT NULL,
    nar_bytes BIGINT NOT NULL,
    size BIGINT,
    size_at BIGINT,
    PRIMARY KEY (cache_id, day)
)
"#,
    r#"
CREATE TABLE realisations (
    cache_id BIGINT NOT NULL,
    drv_output TEXT NOT NULL,
    out_hash TEXT NOT NULL,
    out_path TEXT NOT NULL,
    sigs TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (cache_id, drv_output)
);
CREATE INDEX realisations_out ON realisations (cache_id, out_hash);
CREATE TABLE realisation_deps (
    cache_id BIGINT NOT NULL,
    referrer TEXT NOT NULL,
    dep TEXT NOT NULL,
    dep_out_path TEXT NOT NULL,
    PRIMARY KEY (cache_id, referrer, dep)
);
CREATE INDEX realisation_deps_dep ON realisation_deps (cache_id, dep)
"#,
    r#"
ALTER TABLE caches ADD COLUMN upstreams TEXT;
ALTER TABLE paths ADD COLUMN upstream TEXT
"#,
    r#"
CREATE TABLE cache_chunks (
    cache_id BIGINT NOT NULL,
    chunk_hash TEXT NOT NULL,
    uses BIGINT NOT NULL,
    PRIMARY KEY (cache_id, chunk_hash)
);
CREATE TABLE cache_sizes (
    cache_id BIGINT NOT NULL,
    shard BIGINT NOT NULL,
    paths BIGINT NOT NULL,
    size BIGINT NOT NULL,
    nar_size BIGINT NOT NULL,
    stored BIGINT NOT NULL,
    PRIMARY KEY (cache_id, shard)
);
CREATE TABLE store_sizes (
    shard BIGINT PRIMARY KEY,
    chunk_bytes BIGINT NOT NULL
);
INSERT INTO cache_chunks (cache_id, chunk_hash, uses)
SELECT p.cache_id, nc.chunk_hash, COUNT(*) FROM paths p JOIN nar_chunks nc ON nc.nar_id = p.nar_id
GROUP BY p.cache_id, nc.chunk_hash;
INSERT INTO cache_sizes (cache_id, shard, paths, size, nar_size, stored)
SELECT p.cache_id, 0, COUNT(*), COALESCE(SUM(n.file_size), 0), COALESCE(SUM(n.nar_size), 0), 0
FROM paths p JOIN nars n ON n.id = p.nar_id GROUP BY p.cache_id;
UPDATE cache_sizes SET stored = (SELECT COALESCE(SUM(c.file_size), 0) FROM cache_chunks cc
JOIN chunks c ON c.chunk_hash = cc.chunk_hash WHERE cc.cache_id = cache_sizes.cache_id);
INSERT INTO store_sizes (shard, chunk_bytes)
SELECT 0, t.bytes FROM (SELECT SUM(file_size) AS bytes FROM chunks) t WHERE t.bytes IS NOT NULL
"#,
    r#"
ALTER TABLE chunks ADD COLUMN pack TEXT;
ALTER TABLE chunks ADD COLUMN pack_offset BIGINT;
CREATE INDEX chunks_pack ON chunks (pack);
CREATE TABLE packs (
    pack_hash TEXT PRIMARY KEY,
    file_size BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    writers BIGINT NOT NULL,
    unused BIGINT NOT NULL
);
CREATE INDEX packs_unused ON packs (unused);
INSERT INTO store_sizes (shard, chunk_bytes)
SELECT 1000, -t.bytes FROM (SELECT SUM(c.file_size) AS bytes FROM chunks c WHERE NOT EXISTS
(SELECT 1 FROM nar_chunks nc WHERE nc.chunk_hash = c.chunk_hash)) t WHERE t.bytes IS NOT NULL;
UPDATE chunks SET pack = '' WHERE NOT EXISTS
(SELECT 1 FROM nar_chunks nc WHERE nc.chunk_hash = chunks.chunk_hash)
"#,
    r#"
CREATE TABLE path_uses (
    path_id BIGINT PRIMARY KEY REFERENCES paths (id) ON DELETE CASCADE,
    last_used_at BIGINT NOT NULL
) {WITHOUT_ROWID};
INSERT INTO path_uses (path_id, last_used_at)
SELECT id, last_used_at FROM paths WHERE last_used_at IS NOT NULL;
ALTER TABLE paths DROP COLUMN last_used_at
"#,
];

/// The schema version this build creates.
pub(super) const VERSION: i64 = MIGRATIONS.len() as i64;

/// Version after which `path_refs` exists and must be filled from `paths.refs`.
const PATH_REFS_VERSION: usize = 2;

pub(super) async fn migrate(pool: &AnyPool, engine: Engine) -> Result<(), MetaError> {
    let id = match engine {
        Engine::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
        Engine::Postgres => "BIGSERIAL PRIMARY KEY",
    };
    // A table whose primary key is its only index: on SQLite, stored in that key's order.
    let without_rowid = match engine {
        Engine::Sqlite => "WITHOUT ROWID",
        Engine::Postgres => "",
    };
    let mut tx = pool.begin().await?;
    if engine == Engine::Postgres {
        // Replicas starting together: the first migrates, the others wait and then find the
        // schema current. PostgreSQL's DDL is transactional, so a failed migration leaves
        // nothing behind.
        super::lock::xact_lock(&mut tx, super::LockName::Migrations).await?;
    }
    sqlx::query("CREATE TABLE IF NOT EXISTS larder_schema (version BIGINT NOT NULL)")
        .execute(&mut *tx)
        .await?;
    let current: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM larder_schema")
        .fetch_one(&mut *tx)
        .await?;
    let current = current.unwrap_or(0);
    if current > VERSION {
        // A newer larder migrated this database: an older replica must not write to it.
        return Err(MetaError::SchemaTooNew {
            found: current,
            known: VERSION,
        });
    }
    let current = current as usize;
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(current) {
        for stmt in migration
            .split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let stmt = stmt
                .replace("{ID}", id)
                .replace("{WITHOUT_ROWID}", without_rowid);
            sqlx::query(&stmt).execute(&mut *tx).await?;
        }
        if i + 1 == PATH_REFS_VERSION {
            backfill_path_refs(&mut tx).await?;
        }
        sqlx::query("INSERT INTO larder_schema (version) VALUES ($1)")
            .bind((i + 1) as i64)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn backfill_path_refs(tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<(), MetaError> {
    use sqlx::Row;
    let rows = sqlx::query("SELECT cache_id, hash, refs FROM paths")
        .fetch_all(&mut **tx)
        .await?;
    for row in rows {
        let cache_id: i64 = row.try_get("cache_id")?;
        let hash: String = row.try_get("hash")?;
        let refs: String = row.try_get("refs")?;
        for r in super::ref_hashes(&hash, refs.split(' ')) {
            sqlx::query(
                "INSERT INTO path_refs (cache_id, referrer, ref_hash) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(cache_id)
            .bind(&hash)
            .bind(r)
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(())
}
