//! What a cache can see of the chunk store: the questions whose answers must depend only on a
//! cache's own content, never on another cache's (see ARCHITECTURE.md, "No cross-cache
//! oracle"). A chunk or a NAR is *visible in a cache* when a NAR of one of its published
//! paths, of its pending uploads or of its paths evicted within the grace period uses it.

use std::collections::{HashMap, HashSet};

use larder_nix::hash::Sha256;

use super::{batches, placeholders, ChunkRow, Metadata, Result, IN_BATCH};

/// Whether the NAR with id `{nar}` is visible in the cache `$1`: one indexed probe per table
/// (`paths_nar`, `uploads_nar`, `evicted_nars_nar`). A sub-select of every NAR of the cache
/// was materialised by both engines at each query: a million rows for a cache of a million
/// paths, at every upload and every `missing` query.
fn nar_in_cache(nar: &str) -> String {
    format!(
        "(EXISTS (SELECT 1 FROM paths p WHERE p.nar_id = {nar} AND p.cache_id = $1) \
         OR EXISTS (SELECT 1 FROM uploads u WHERE u.nar_id = {nar} AND u.cache_id = $1) \
         OR EXISTS (SELECT 1 FROM evicted_nars e WHERE e.nar_id = {nar} AND e.cache_id = $1))"
    )
}

/// Whether the NAR with id `{nar}` is pending or evicted within its grace in the cache `$1`
/// (the part of [`nar_in_cache`] that `cache_chunks` does not count).
fn nar_pending_in_cache(nar: &str) -> String {
    format!(
        "(EXISTS (SELECT 1 FROM uploads u WHERE u.nar_id = {nar} AND u.cache_id = $1) \
         OR EXISTS (SELECT 1 FROM evicted_nars e WHERE e.nar_id = {nar} AND e.cache_id = $1))"
    )
}

impl Metadata {
    /// Whether the NAR with `nar_hash` is visible in the cache.
    pub async fn nar_visible_in_cache(&self, cache_id: i64, nar_hash: &Sha256) -> Result<bool> {
        let sql = format!(
            "SELECT COUNT(*) FROM nars n WHERE n.nar_hash = $2 AND {}",
            nar_in_cache("n.id")
        );
        let n: i64 = sqlx::query_scalar(&sql)
            .bind(cache_id)
            .bind(nar_hash.to_nix32())
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    /// Which of the chunks `ids` are visible in the cache: those its published paths use (the
    /// `cache_chunks` counters, one key lookup each), and those of its pending uploads and of
    /// its paths evicted within the grace period.
    pub async fn chunks_visible_in_cache(
        &self,
        cache_id: i64,
        ids: &[String],
    ) -> Result<HashSet<String>> {
        let mut visible = HashSet::new();
        for batch in batches(ids, IN_BATCH) {
            let sql = format!(
                "SELECT chunk_hash FROM cache_chunks WHERE cache_id = $1 AND chunk_hash IN ({})",
                placeholders(2, batch.len())
            );
            let mut q = sqlx::query_scalar::<_, String>(&sql).bind(cache_id);
            for id in batch {
                q = q.bind(id);
            }
            visible.extend(q.fetch_all(&self.pool).await?);
            let rest: Vec<&String> = batch.iter().filter(|id| !visible.contains(*id)).collect();
            for rest in batches(&rest, IN_BATCH) {
                let sql = format!(
                    "SELECT DISTINCT nc.chunk_hash FROM nar_chunks nc \
                     WHERE nc.chunk_hash IN ({}) AND {}",
                    placeholders(2, rest.len()),
                    nar_pending_in_cache("nc.nar_id")
                );
                let mut q = sqlx::query_scalar::<_, String>(&sql).bind(cache_id);
                for id in rest {
                    q = q.bind(id);
                }
                let found: Vec<String> = q.fetch_all(&self.pool).await?;
                visible.extend(found);
            }
        }
        Ok(visible)
    }

    /// The rows of those of the chunks `ids` that are located (stored somewhere: see
    /// `meta/packs.rs`), by id.
    pub async fn located_chunks(&self, ids: &[String]) -> Result<HashMap<String, ChunkRow>> {
        let mut rows = HashMap::new();
        for batch in batches(ids, IN_BATCH) {
            let sql = format!(
                "SELECT chunk_hash, file_size, pack, pack_offset FROM chunks \
                 WHERE (pack IS NULL OR pack <> '') AND chunk_hash IN ({})",
                placeholders(1, batch.len())
            );
            let mut q = sqlx::query_as::<_, ChunkRow>(&sql);
            for id in batch {
                q = q.bind(id);
            }
            for row in q.fetch_all(&self.pool).await? {
                rows.insert(row.chunk_hash.clone(), row);
            }
        }
        Ok(rows)
    }
}

/// Bytes stored, server-wide: what the caches' limits count, and what their chunks occupy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreTotals {
    /// The NAR files of every published path, each counted in every cache that has it.
    pub logical: i64,
    /// Every chunk object once, whatever uses it (including chunks awaiting collection).
    pub stored: i64,
}
