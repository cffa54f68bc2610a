//! What a cache holds, and what the store holds, as counters kept in the transactions that
//! change them, so that reading them costs a few rows however large a cache grows (issue #12:
//! at a million paths, summing `paths`/`nars` and `chunks` took 20-30 s).
//!
//! - `cache_sizes`: per cache, its published paths, their NAR files' bytes (`size`, what the
//!   size limit counts), their uncompressed NAR bytes and their stored bytes after
//!   deduplication (`stored`: each chunk their NAR files use counted once).
//! - `cache_chunks`: per cache and chunk, how many uses the cache's published paths make of
//!   it (one per path and position in its NAR's chunk list); a row exists exactly while that
//!   number is positive, so a chunk's size enters `stored` when its row is created and leaves
//!   it when its row is deleted.
//! - `store_sizes`: the bytes of every object holding chunks, server-wide (awaiting collection
//!   included): each pack (`meta/packs.rs`) from its row's insertion to its collection, and
//!   each chunk stored as an object of its own (`pack` NULL), from when its row says so to its
//!   collection.
//!
//! Every publication ([`count_paths`] with +1) and every unpublication (eviction, deletion,
//! fsck's repair, through `delete_path_rows`: −1) updates them in its own transaction, from
//! the rows it actually inserted or deleted (`RETURNING`), so a concurrent transaction that
//! deleted the same path first is never counted twice. The updates are row-level additions
//! (`SET n = n + $delta`, upserts), never values computed from an earlier read: on
//! PostgreSQL, concurrent replicas' transactions add up. `cache_sizes` and `store_sizes` have
//! [`SHARDS`] rows per cache (resp. for the store), each transaction adding to one at random,
//! so publications to one cache from several replicas rarely wait for each other's commit; a
//! figure is the sum of its rows. Chunk rows are updated in hash order and the counters last,
//! just before the commit, to keep lock waits short and deadlocks rare (a deadlock is retried
//! like any lost race).
//!
//! Migration 9 computes them once from the tables; [`Metadata::recount_cache_stats`] and
//! [`Metadata::recount_store_totals`] are those full scans, for tests and checks.

use std::collections::{BTreeMap, HashMap};

use sqlx::FromRow;

use super::chunks::StoreTotals;
use super::{
    batches, decoding, placeholders, CacheStats, Metadata, Result, INSERT_BATCH, IN_BATCH,
};

/// Counter rows per cache in `cache_sizes`, and of the store in `store_sizes`.
pub(super) const SHARDS: u64 = 16;

type Tx<'a, 'c> = &'a mut sqlx::Transaction<'c, sqlx::Any>;

/// The counter row a transaction adds to.
fn shard() -> i64 {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (r % SHARDS) as i64
}

/// Record that `sign` (+1: published, −1: unpublished) paths using each of `nar_ids` (one
/// entry per path: a NAR used by two paths is given twice) changed in `cache_id`, in the
/// transaction that inserted or deleted their rows. Call it last before the commit.
pub(super) async fn count_paths(
    tx: Tx<'_, '_>,
    cache_id: i64,
    nar_ids: &[i64],
    sign: i64,
) -> Result<()> {
    if nar_ids.is_empty() {
        return Ok(());
    }
    let mut paths_of: BTreeMap<i64, i64> = BTreeMap::new();
    for id in nar_ids {
        *paths_of.entry(*id).or_default() += 1;
    }
    let ids: Vec<i64> = paths_of.keys().copied().collect();
    let mut delta = CacheStats {
        paths: sign * nar_ids.len() as i64,
        ..CacheStats::default()
    };
    // Chunk id → (change of its uses, its stored size).
    let mut uses: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for batch in batches(&ids, IN_BATCH) {
        let ph = placeholders(1, batch.len());
        let sql = format!("SELECT id, file_size, nar_size FROM nars WHERE id IN ({ph})");
        let mut q = sqlx::query_as::<_, (i64, i64, i64)>(&sql);
        for id in batch {
            q = q.bind(id);
        }
        for (id, file_size, nar_size) in q.fetch_all(&mut **tx).await? {
            let n = sign * paths_of[&id];
            delta.size += n * file_size;
            delta.nar_size += n * nar_size;
        }
        let sql = format!(
            "SELECT nc.nar_id, nc.chunk_hash, c.file_size FROM nar_chunks nc \
             JOIN chunks c ON c.chunk_hash = nc.chunk_hash WHERE nc.nar_id IN ({ph})"
        );
        let mut q = sqlx::query_as::<_, (i64, String, i64)>(&sql);
        for id in batch {
            q = q.bind(id);
        }
        for (nar_id, chunk, size) in q.fetch_all(&mut **tx).await? {
            uses.entry(chunk).or_insert((0, size)).0 += sign * paths_of[&nar_id];
        }
    }
    let entries: Vec<(String, (i64, i64))> = uses.into_iter().collect();
    // INSERT_BATCH rows (201 parameters) rather than IN_BATCH (1 001): SQLite's binding costs
    // the square of a statement's parameters (a sixth of its thread's time in a first push).
    for batch in batches(&entries, INSERT_BATCH) {
        let values = (0..batch.len())
            .map(|i| format!("($1, ${}, ${})", 2 * i + 2, 2 * i + 3))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "INSERT INTO cache_chunks (cache_id, chunk_hash, uses) VALUES {values} \
             ON CONFLICT (cache_id, chunk_hash) DO UPDATE SET uses = cache_chunks.uses + \
             excluded.uses RETURNING chunk_hash, uses"
        );
        let mut q = sqlx::query_as::<_, (String, i64)>(&sql).bind(cache_id);
        for (chunk, (d, _)) in batch {
            q = q.bind(chunk).bind(d);
        }
        let changed: HashMap<String, i64> = q.fetch_all(&mut **tx).await?.into_iter().collect();
        let mut gone = Vec::new();
        for (chunk, (d, size)) in batch {
            match changed.get(chunk) {
                // No use left: the chunk leaves the cache.
                Some(&n) if n <= 0 => {
                    delta.stored_size -= size;
                    gone.push(chunk);
                }
                // Its first uses: the chunk enters the cache.
                Some(&n) if n == *d => delta.stored_size += size,
                _ => {}
            }
        }
        if !gone.is_empty() {
            let sql = format!(
                "DELETE FROM cache_chunks WHERE cache_id = $1 AND chunk_hash IN ({})",
                placeholders(2, gone.len())
            );
            let mut q = sqlx::query(&sql).bind(cache_id);
            for chunk in gone {
                q = q.bind(chunk);
            }
            q.execute(&mut **tx).await?;
        }
    }
    sqlx::query(
        "INSERT INTO cache_sizes (cache_id, shard, paths, size, nar_size, stored) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (cache_id, shard) DO UPDATE SET \
         paths = cache_sizes.paths + excluded.paths, size = cache_sizes.size + excluded.size, \
         nar_size = cache_sizes.nar_size + excluded.nar_size, \
         stored = cache_sizes.stored + excluded.stored",
    )
    .bind(cache_id)
    .bind(shard())
    .bind(delta.paths)
    .bind(delta.size)
    .bind(delta.nar_size)
    .bind(delta.stored_size)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Record that chunk rows of `bytes` in all were inserted (positive) or deleted (negative) in
/// this transaction. Call it last before the commit.
pub(super) async fn count_chunk_bytes(tx: Tx<'_, '_>, bytes: i64) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO store_sizes (shard, chunk_bytes) VALUES ($1, $2) ON CONFLICT (shard) \
         DO UPDATE SET chunk_bytes = store_sizes.chunk_bytes + excluded.chunk_bytes",
    )
    .bind(shard())
    .bind(bytes)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A cache's [`CacheStats`], by cache id.
#[derive(FromRow)]
struct CacheIdStats {
    cache_id: i64,
    #[sqlx(flatten)]
    stats: CacheStats,
}

/// The sums of a cache's `cache_sizes` rows, as [`CacheStats`] columns.
const SUMS: &str = "CAST(COALESCE(SUM(paths), 0) AS BIGINT) AS paths, \
                    CAST(COALESCE(SUM(size), 0) AS BIGINT) AS size, \
                    CAST(COALESCE(SUM(nar_size), 0) AS BIGINT) AS nar_size, \
                    CAST(COALESCE(SUM(stored), 0) AS BIGINT) AS stored_size";

impl Metadata {
    /// A cache's path count and sizes (from its counters: a few rows).
    pub async fn cache_stats(&self, cache_id: i64) -> Result<CacheStats> {
        sqlx::query_as(&format!(
            "SELECT {SUMS} FROM cache_sizes WHERE cache_id = $1"
        ))
        .bind(cache_id)
        .fetch_one(&self.pool)
        .await
        .map_err(decoding("cache_sizes"))
    }

    /// [`Metadata::cache_stats`] of every cache that has paths, by cache id, in one query.
    pub async fn all_cache_stats(&self) -> Result<Vec<(i64, CacheStats)>> {
        let rows: Vec<CacheIdStats> = sqlx::query_as(&format!(
            "SELECT cache_id, {SUMS} FROM cache_sizes GROUP BY cache_id HAVING SUM(paths) > 0"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(decoding("cache_sizes"))?;
        Ok(rows.into_iter().map(|r| (r.cache_id, r.stats)).collect())
    }

    /// The bytes a cache's published paths occupy in the store: each chunk their NAR files
    /// use counted once (a NAR in two paths, or chunks shared by NARs, once).
    pub async fn cache_stored_size(&self, cache_id: i64) -> Result<i64> {
        Ok(self.cache_stats(cache_id).await?.stored_size)
    }

    /// [`Metadata::cache_stored_size`] of every cache with paths, by cache id.
    pub async fn all_cache_stored_sizes(&self) -> Result<HashMap<i64, i64>> {
        Ok(self
            .all_cache_stats()
            .await?
            .into_iter()
            .map(|(id, s)| (id, s.stored_size))
            .collect())
    }

    /// Server-wide [`StoreTotals`].
    pub async fn store_totals(&self) -> Result<StoreTotals> {
        let logical: i64 =
            sqlx::query_scalar("SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM cache_sizes")
                .fetch_one(&self.pool)
                .await?;
        let stored: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(chunk_bytes), 0) AS BIGINT) FROM store_sizes",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(StoreTotals { logical, stored })
    }

    /// [`Metadata::cache_stats`] computed from the tables themselves (full scans of the
    /// cache's paths, their NARs and chunks): what the counters must always equal.
    pub async fn recount_cache_stats(&self, cache_id: i64) -> Result<CacheStats> {
        let (paths, size, nar_size): (i64, i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), CAST(COALESCE(SUM(n.file_size), 0) AS BIGINT), \
             CAST(COALESCE(SUM(n.nar_size), 0) AS BIGINT) \
             FROM paths p JOIN nars n ON n.id = p.nar_id WHERE p.cache_id = $1",
        )
        .bind(cache_id)
        .fetch_one(&self.pool)
        .await?;
        let stored_size: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(c.file_size), 0) AS BIGINT) FROM chunks c WHERE \
             c.chunk_hash IN (SELECT nc.chunk_hash FROM nar_chunks nc JOIN paths p \
             ON p.nar_id = nc.nar_id WHERE p.cache_id = $1)",
        )
        .bind(cache_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(CacheStats {
            paths,
            size,
            nar_size,
            stored_size,
        })
    }

    /// [`Metadata::store_totals`] computed from the tables themselves.
    pub async fn recount_store_totals(&self) -> Result<StoreTotals> {
        let logical: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(n.file_size), 0) AS BIGINT) FROM paths p \
             JOIN nars n ON n.id = p.nar_id",
        )
        .fetch_one(&self.pool)
        .await?;
        // Chunks of their own objects, and packs (see `meta/packs.rs`).
        let own: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(file_size), 0) AS BIGINT) FROM chunks WHERE pack IS NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        let packs: i64 =
            sqlx::query_scalar("SELECT CAST(COALESCE(SUM(file_size), 0) AS BIGINT) FROM packs")
                .fetch_one(&self.pool)
                .await?;
        Ok(StoreTotals {
            logical,
            stored: own + packs,
        })
    }
}
