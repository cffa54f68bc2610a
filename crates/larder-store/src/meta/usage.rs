//! Usage: when each path was last served, which eviction orders paths by.

use super::{placeholders, retry, Metadata, Result, IN_BATCH};

impl Metadata {
    /// Mark paths of a cache used at `at`: those with these hash parts and those whose NAR is
    /// one of `nar_ids`. One statement per [`IN_BATCH`] of each.
    ///
    /// A path whose recorded use is less than `resolution` seconds before `at` (or later) is
    /// left as it is: no row is written for it. Serving a path again and again then costs a
    /// write per `resolution`, not one per flush; at a million paths asked at random, writing
    /// every use rewrote most of the table's pages every flush (bench/scale.sh).
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
        for batch in hashes.chunks(IN_BATCH) {
            let sql = format!(
                "UPDATE paths SET last_used_at = $1 WHERE cache_id = $2 \
                 AND (last_used_at IS NULL OR last_used_at <= $3) AND hash IN ({})",
                placeholders(4, batch.len())
            );
            retry(&[], || {
                let mut q = sqlx::query(&sql).bind(at).bind(cache_id).bind(stale);
                for h in batch {
                    q = q.bind(h);
                }
                q.execute(&self.pool)
            })
            .await?;
        }
        for batch in nar_ids.chunks(IN_BATCH) {
            let sql = format!(
                "UPDATE paths SET last_used_at = $1 WHERE cache_id = $2 \
                 AND (last_used_at IS NULL OR last_used_at <= $3) AND nar_id IN ({})",
                placeholders(4, batch.len())
            );
            retry(&[], || {
                let mut q = sqlx::query(&sql).bind(at).bind(cache_id).bind(stale);
                for n in batch {
                    q = q.bind(n);
                }
                q.execute(&self.pool)
            })
            .await?;
        }
        Ok(())
    }
}
