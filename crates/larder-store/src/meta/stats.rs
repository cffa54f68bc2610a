//! Per-cache daily statistics (table `cache_days`, migration 6): what the web UI's charts and
//! `GET /api/v1/caches/{c}/stats` show.
//!
//! A row is one cache on one UTC day (days since 1970-01-01). Downloads are *added*: every
//! replica flushes the counts it gathered in memory with an upsert that adds them to the row
//! (`ON CONFLICT … DO UPDATE SET n = n + excluded.n`), so flushes and replicas never overwrite
//! each other. The size is a gauge: a sample replaces the day's value only if it was read
//! later than the one stored (`size_at`, milliseconds), so a slow replica's older reading
//! cannot win. Both statements are written once for SQLite and PostgreSQL.

use sqlx::FromRow;

use super::{decoding, retry, Metadata, Result};

/// Downloads of one cache on one day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromRow)]
pub struct Downloads {
    pub narinfo_requests: i64,
    /// Body bytes of the narinfos served.
    pub narinfo_bytes: i64,
    pub nar_requests: i64,
    /// Body bytes of the NARs served (the requested range of a partial request).
    pub nar_bytes: i64,
}

impl Downloads {
    pub fn add(&mut self, other: &Downloads) {
        self.narinfo_requests += other.narinfo_requests;
        self.narinfo_bytes += other.narinfo_bytes;
        self.nar_requests += other.nar_requests;
        self.nar_bytes += other.nar_bytes;
    }

    pub fn is_empty(&self) -> bool {
        *self == Downloads::default()
    }
}

/// A recorded day of a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromRow)]
pub struct CacheDay {
    /// Days since 1970-01-01 (UTC).
    pub day: i64,
    #[sqlx(flatten)]
    pub downloads: Downloads,
    /// Stored bytes, as last sampled that day; `None` if no sample was taken that day.
    pub size: Option<i64>,
}

/// Rows written by one statement (each binds at most 6 parameters).
const ROWS_PER_UPSERT: usize = 500;

impl Metadata {
    /// Add downloads to `(cache, day)` rows, creating them as needed. Rows are written in key
    /// order, so replicas flushing overlapping sets lock them in the same order.
    pub async fn add_downloads(&self, rows: &[(i64, i64, Downloads)]) -> Result<()> {
        let mut rows: Vec<&(i64, i64, Downloads)> =
            rows.iter().filter(|(_, _, d)| !d.is_empty()).collect();
        rows.sort_by_key(|(cache, day, _)| (*cache, *day));
        for batch in rows.chunks(ROWS_PER_UPSERT) {
            let tuples: Vec<String> = (0..batch.len())
                .map(|i| format!("({}, NULL, NULL)", super::placeholders(i * 6 + 1, 6)))
                .collect();
            let sql = format!(
                "INSERT INTO cache_days (cache_id, day, narinfo_requests, narinfo_bytes, \
                 nar_requests, nar_bytes, size, size_at) VALUES {} \
                 ON CONFLICT (cache_id, day) DO UPDATE SET \
                 narinfo_requests = cache_days.narinfo_requests + excluded.narinfo_requests, \
                 narinfo_bytes = cache_days.narinfo_bytes + excluded.narinfo_bytes, \
                 nar_requests = cache_days.nar_requests + excluded.nar_requests, \
                 nar_bytes = cache_days.nar_bytes + excluded.nar_bytes",
                tuples.join(", ")
            );
            retry(&[], || {
                let mut q = sqlx::query(&sql);
                for (cache, day, d) in batch {
                    q = q
                        .bind(*cache)
                        .bind(*day)
                        .bind(d.narinfo_requests)
                        .bind(d.narinfo_bytes)
                        .bind(d.nar_requests)
                        .bind(d.nar_bytes);
                }
                q.execute(&self.pool)
            })
            .await?;
        }
        Ok(())
    }

    /// Record each `(cache, size)` as its size on `day`, read at `at_ms` (milliseconds since
    /// 1970): the day keeps the latest reading, whichever replica writes last.
    pub async fn record_sizes(&self, day: i64, at_ms: i64, sizes: &[(i64, i64)]) -> Result<()> {
        let mut sizes = sizes.to_vec();
        sizes.sort_unstable();
        sizes.dedup_by_key(|(cache, _)| *cache);
        for batch in sizes.chunks(ROWS_PER_UPSERT) {
            let tuples: Vec<String> = (0..batch.len())
                .map(|i| {
                    let p = i * 4;
                    format!(
                        "(${}, ${}, 0, 0, 0, 0, ${}, ${})",
                        p + 1,
                        p + 2,
                        p + 3,
                        p + 4
                    )
                })
                .collect();
            let sql = format!(
                "INSERT INTO cache_days (cache_id, day, narinfo_requests, narinfo_bytes, \
                 nar_requests, nar_bytes, size, size_at) VALUES {} \
                 ON CONFLICT (cache_id, day) DO UPDATE SET \
                 size = excluded.size, size_at = excluded.size_at \
                 WHERE cache_days.size_at IS NULL OR cache_days.size_at <= excluded.size_at",
                tuples.join(", ")
            );
            retry(&[], || {
                let mut q = sqlx::query(&sql);
                for (cache, size) in batch {
                    q = q.bind(*cache).bind(day).bind(*size).bind(at_ms);
                }
                q.execute(&self.pool)
            })
            .await?;
        }
        Ok(())
    }

    /// The recorded days of a cache from `from` to `to` (inclusive), oldest first, and the
    /// last size recorded before `from` (the size on `from` if that day has no sample).
    pub async fn cache_days(
        &self,
        cache_id: i64,
        from: i64,
        to: i64,
    ) -> Result<(Vec<CacheDay>, Option<i64>)> {
        let days = sqlx::query_as(
            "SELECT day, narinfo_requests, narinfo_bytes, nar_requests, nar_bytes, size \
             FROM cache_days WHERE cache_id = $1 AND day >= $2 AND day <= $3 ORDER BY day",
        )
        .bind(cache_id)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await
        .map_err(decoding("cache_days"))?;
        let before: Option<i64> = sqlx::query_scalar(
            "SELECT size FROM cache_days WHERE cache_id = $1 AND day < $2 AND size IS NOT NULL \
             ORDER BY day DESC LIMIT 1",
        )
        .bind(cache_id)
        .bind(from)
        .fetch_optional(&self.pool)
        .await?;
        Ok((days, before))
    }

    /// Delete the days before `before`, and any row of a cache that no longer exists (a flush
    /// racing the cache's deletion). Returns the rows deleted.
    pub async fn prune_cache_days(&self, before: i64) -> Result<u64> {
        let done = retry(&[], || {
            sqlx::query(
                "DELETE FROM cache_days WHERE day < $1 \
                 OR cache_id NOT IN (SELECT id FROM caches)",
            )
            .bind(before)
            .execute(&self.pool)
        })
        .await?;
        Ok(done.rows_affected())
    }
}
