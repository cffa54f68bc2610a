//! Usage: when each path was last served, which eviction orders paths by.

use super::{placeholders, retry, Metadata, Result, IN_BATCH};

impl Metadata {
    /// Mark paths of a cache used at `at`: those with these hash parts and those whose NAR is
    /// one of `nar_ids`.
    ///
    /// A path whose recorded use is less than `resolution` seconds before `at` (or later) is
    /// left as it is: no row is written for it. Serving a path again and again then costs a
    /// write per `resolution`, not one per flush; at a million paths asked at random, writing
    /// every use rewrote most of the table's pages every flush (bench/scale.sh).
    ///
    /// Uses live in `path_uses`, a narrow table of their own (schema version 11): in the wide
    /// rows of `paths`, the first uses of paths served at random changed a page each, and
    /// with a transaction per statement each page was written again and again (3 GB in 12 s
    /// of random narinfos over 100 000 paths; a third fewer requests answered than once the
    /// uses were written). Here a page of uses holds a few hundred paths, and a transaction
    /// carries [`STATEMENTS_PER_TX`] statements.
    pub async fn record_usage(
        &self,
        cache_id: i64,
        hashes: &[String],
        nar_ids: &[i64],
        at: i64,
        resolution: i64,
    ) -> Result<()> {
        let stale = at.saturating_sub(resolution.max(0));
        // Sorted: replicas flushing overlapping sets lock rows in the same order.
        let mut hashes = hashes.to_vec();
        hashes.sort();
        let mut nar_ids = nar_ids.to_vec();
        nar_ids.sort();
        let per_tx = IN_BATCH * STATEMENTS_PER_TX;
        for part in hashes.chunks(per_tx) {
            retry(&[], || {
                self.record_uses(cache_id, Used::Hashes(part), at, stale)
            })
            .await?;
        }
        for part in nar_ids.chunks(per_tx) {
            retry(&[], || {
                self.record_uses(cache_id, Used::Nars(part), at, stale)
            })
            .await?;
        }
        Ok(())
    }

    /// One transaction of [`Metadata::record_usage`].
    async fn record_uses(&self, cache_id: i64, used: Used<'_>, at: i64, stale: i64) -> Result<()> {
        let (column, n) = match used {
            Used::Hashes(h) => ("hash", h.len()),
            Used::Nars(n) => ("nar_id", n.len()),
        };
        let mut tx = self.pool.begin().await?;
        let mut start = 0;
        while start < n {
            let len = IN_BATCH.min(n - start);
            let sql = format!(
                "INSERT INTO path_uses (path_id, last_used_at) SELECT p.id, $1 FROM paths p \
                 WHERE p.cache_id = $2 AND p.{column} IN ({}) \
                 ON CONFLICT (path_id) DO UPDATE SET last_used_at = excluded.last_used_at \
                 WHERE path_uses.last_used_at <= $3",
                placeholders(4, len)
            );
            let mut q = sqlx::query(&sql).bind(at).bind(cache_id).bind(stale);
            match used {
                Used::Hashes(h) => {
                    for h in &h[start..start + len] {
                        q = q.bind(h);
                    }
                }
                Used::Nars(n) => {
                    for n in &n[start..start + len] {
                        q = q.bind(n);
                    }
                }
            }
            q.execute(&mut *tx).await?;
            start += len;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Statements of [`IN_BATCH`] uses in one transaction of [`Metadata::record_usage`]: at most
/// 4 000 paths' uses written under one write lock (milliseconds; a publication waits that
/// long at worst).
const STATEMENTS_PER_TX: usize = 8;

/// The paths a transaction of [`Metadata::record_usage`] marks: by hash part, or by NAR.
#[derive(Clone, Copy)]
enum Used<'a> {
    Hashes(&'a [String]),
    Nars(&'a [i64]),
}
