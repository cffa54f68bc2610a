//! What `larder fsck` asks of the metadata: the NARs to verify, page by page in id order (so
//! a run can stop and continue after the last NAR it finished), the paths that publish a NAR,
//! and the repair: unpublishing, in one transaction, every path whose NAR cannot be served
//! together with every path of the same cache that depends on it (see
//! [`Metadata::unpublish_damaged`]). Verifying the bytes is `crate::fsck`'s job.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::FromRow;

use super::paths::NAR_COLS;
use super::{
    decoding, decoding_with_nar, delete_path_rows, placeholders, retry, Metadata, NarRow, Result,
    IN_BATCH,
};

/// A NAR counts when something could still serve or publish it: a path, a pending upload or
/// an evicted path in its grace period (of the cache `$at`, when the check is limited to
/// one). Unused NARs are garbage collection's, not fsck's.
fn in_use(scope: Option<i64>, at: usize) -> String {
    let cache = match scope {
        None => String::new(),
        Some(_) => format!(" AND x.cache_id = ${at}"),
    };
    format!(
        "(EXISTS (SELECT 1 FROM paths x WHERE x.nar_id = n.id{cache}) \
         OR EXISTS (SELECT 1 FROM uploads x WHERE x.nar_id = n.id{cache}) \
         OR EXISTS (SELECT 1 FROM evicted_nars x WHERE x.nar_id = n.id{cache}))"
    )
}

/// A path published with a given NAR.
#[derive(Debug, Clone, PartialEq, Eq, FromRow, serde::Serialize, serde::Deserialize)]
pub struct PathUse {
    /// The cache's name.
    pub cache: String,
    /// `<hash>-<name>`.
    pub basename: String,
}

/// Why [`Metadata::unpublish_damaged`] unpublished a path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Unpublished {
    /// Its own NAR is damaged (`nar_id`).
    Damaged { path: PathUse, nar_id: i64 },
    /// It references (`needs`, `<hash>-<name>`) a path unpublished in the same run: Nix could
    /// not substitute it without that reference.
    Dependant { path: PathUse, needs: String },
}

impl Unpublished {
    pub fn path(&self) -> &PathUse {
        match self {
            Unpublished::Damaged { path, .. } | Unpublished::Dependant { path, .. } => path,
        }
    }
}

impl Metadata {
    /// How many NARs an fsck of `scope` (a cache id, or every cache) checks, and their bytes
    /// as stored.
    pub async fn fsck_totals(&self, scope: Option<i64>) -> Result<(i64, i64)> {
        let sql = format!(
            "SELECT COUNT(*), CAST(COALESCE(SUM(n.file_size), 0) AS BIGINT) FROM nars n \
             WHERE {}",
            in_use(scope, 1)
        );
        let mut q = sqlx::query_as::<_, (i64, i64)>(&sql);
        if let Some(c) = scope {
            q = q.bind(c);
        }
        Ok(q.fetch_one(&self.pool).await?)
    }

    /// Up to `limit` NARs in use in `scope` with an id above `after`, in id order.
    pub async fn fsck_nars(
        &self,
        scope: Option<i64>,
        after: i64,
        limit: i64,
    ) -> Result<Vec<NarRow>> {
        let sql = format!(
            "SELECT {NAR_COLS} FROM nars n WHERE n.id > $1 AND {} ORDER BY n.id LIMIT $2",
            in_use(scope, 3)
        );
        let mut q = sqlx::query_as::<_, NarRow>(&sql).bind(after).bind(limit);
        if let Some(c) = scope {
            q = q.bind(c);
        }
        q.fetch_all(&self.pool).await.map_err(decoding("nars"))
    }

    /// Whether the NAR `nar_id` is still in use in `scope`: garbage collection may have
    /// deleted the objects of one that stopped being used while it was read.
    pub async fn nar_in_use(&self, nar_id: i64, scope: Option<i64>) -> Result<bool> {
        let sql = format!(
            "SELECT COUNT(*) FROM nars n WHERE n.id = $1 AND {}",
            in_use(scope, 2)
        );
        let mut q = sqlx::query_scalar::<_, i64>(&sql).bind(nar_id);
        if let Some(c) = scope {
            q = q.bind(c);
        }
        Ok(q.fetch_one(&self.pool).await? > 0)
    }

    /// The paths of `scope` (a cache id, or every cache) published with the NAR `nar_id`.
    pub async fn nar_paths(&self, nar_id: i64, scope: Option<i64>) -> Result<Vec<PathUse>> {
        let sql = format!(
            "SELECT c.name AS cache, p.hash || '-' || p.name AS basename FROM paths p \
             JOIN caches c ON c.id = p.cache_id WHERE p.nar_id = $1 {} ORDER BY c.name, p.name",
            if scope.is_some() {
                "AND p.cache_id = $2"
            } else {
                ""
            }
        );
        let mut q = sqlx::query_as::<_, PathUse>(&sql).bind(nar_id);
        if let Some(c) = scope {
            q = q.bind(c);
        }
        q.fetch_all(&self.pool).await.map_err(decoding("paths"))
    }

    /// Make the NARs `nar_ids` unservable in `scope` (a cache id, or every cache), in one
    /// transaction: unpublish every path using one of them and, transitively, every path of
    /// the same cache that references an unpublished path (closure safety: a narinfo is served
    /// only with its references), drop their pending uploads and their evicted-path grace
    /// (so a new upload of the same NAR stores it again rather than reusing the damaged one).
    /// Pins do not hold a damaged path: it could not be substituted anyway. Returns what was
    /// unpublished, each path once, damaged ones first.
    pub async fn unpublish_damaged(
        &self,
        scope: Option<i64>,
        nar_ids: &[i64],
    ) -> Result<Vec<Unpublished>> {
        retry(&[], || self.unpublish_damaged_once(scope, nar_ids)).await
    }

    async fn unpublish_damaged_once(
        &self,
        scope: Option<i64>,
        nar_ids: &[i64],
    ) -> Result<Vec<Unpublished>> {
        let mut tx = self.pool.begin().await?;
        let cache_filter = |at: usize| {
            scope
                .map(|_| format!(" AND cache_id = ${at}"))
                .unwrap_or_default()
        };
        // Writes first, so SQLite takes its write lock at once.
        for batch in nar_ids.chunks(IN_BATCH) {
            for table in ["evicted_nars", "uploads"] {
                let sql = format!(
                    "DELETE FROM {table} WHERE nar_id IN ({}){}",
                    placeholders(1, batch.len()),
                    cache_filter(batch.len() + 1)
                );
                let mut q = sqlx::query(&sql);
                for id in batch {
                    q = q.bind(id);
                }
                if let Some(c) = scope {
                    q = q.bind(c);
                }
                q.execute(&mut *tx).await?;
            }
        }
        // By cache id: hash → (unpublished row, in the order found).
        let mut caches: BTreeMap<i64, Vec<(String, Unpublished)>> = BTreeMap::new();
        for batch in nar_ids.chunks(IN_BATCH) {
            let sql = format!(
                "SELECT p.cache_id, c.name, p.hash, p.hash || '-' || p.name, p.nar_id FROM paths p \
                 JOIN caches c ON c.id = p.cache_id WHERE p.nar_id IN ({}){} \
                 ORDER BY p.cache_id, p.hash",
                placeholders(1, batch.len()),
                scope
                    .map(|_| format!(" AND p.cache_id = ${}", batch.len() + 1))
                    .unwrap_or_default()
            );
            let mut q = sqlx::query_as::<_, (i64, String, String, String, i64)>(&sql);
            for id in batch {
                q = q.bind(id);
            }
            if let Some(c) = scope {
                q = q.bind(c);
            }
            for (cache_id, cache, hash, basename, nar_id) in q
                .fetch_all(&mut *tx)
                .await
                .map_err(decoding_with_nar("paths"))?
            {
                let path = PathUse { cache, basename };
                caches
                    .entry(cache_id)
                    .or_default()
                    .push((hash, Unpublished::Damaged { path, nar_id }));
            }
        }
        let mut out = Vec::new();
        for (cache_id, mut found) in caches {
            let cache_name = found
                .first()
                .map(|(_, u)| u.path().cache.clone())
                .unwrap_or_default();
            let mut seen: BTreeSet<String> = found.iter().map(|(h, _)| h.clone()).collect();
            let mut frontier: Vec<(String, String)> = found
                .iter()
                .map(|(h, u)| (h.clone(), u.path().basename.clone()))
                .collect();
            while !frontier.is_empty() {
                let mut next = Vec::new();
                for batch in frontier.chunks(IN_BATCH) {
                    let sql = format!(
                        "SELECT r.ref_hash, p.hash, p.hash || '-' || p.name FROM path_refs r \
                         JOIN paths p ON p.cache_id = r.cache_id AND p.hash = r.referrer \
                         WHERE r.cache_id = $1 AND r.ref_hash IN ({}) ORDER BY p.hash",
                        placeholders(2, batch.len())
                    );
                    let mut q = sqlx::query_as::<_, (String, String, String)>(&sql).bind(cache_id);
                    for (hash, _) in batch {
                        q = q.bind(hash);
                    }
                    for (needed, hash, basename) in q.fetch_all(&mut *tx).await? {
                        if !seen.insert(hash.clone()) {
                            continue;
                        }
                        let needs = batch
                            .iter()
                            .find(|(h, _)| *h == needed)
                            .map(|(_, b)| b.clone())
                            .unwrap_or(needed);
                        let path = PathUse {
                            cache: cache_name.clone(),
                            basename: basename.clone(),
                        };
                        found.push((hash.clone(), Unpublished::Dependant { path, needs }));
                        next.push((hash, basename));
                    }
                }
                frontier = next;
            }
            let hashes: Vec<String> = found.iter().map(|(h, _)| h.clone()).collect();
            let mut gone = Vec::new();
            for batch in hashes.chunks(IN_BATCH) {
                delete_path_rows(&mut tx, cache_id, batch, &mut gone).await?;
            }
            super::realisations::forget_paths(&mut tx, cache_id, &hashes).await?;
            super::sizes::count_paths(&mut tx, cache_id, &gone, -1).await?;
            out.extend(found.into_iter().map(|(_, u)| u));
        }
        tx.commit().await?;
        out.sort_by_key(|u| matches!(u, Unpublished::Dependant { .. }));
        Ok(out)
    }
}
