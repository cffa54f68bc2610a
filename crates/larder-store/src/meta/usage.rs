//! Usage: when each path was last served, which eviction orders paths by.

use super::{placeholders, retry, Metadata, Result, IN_BATCH};

impl Metadata {
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
}
