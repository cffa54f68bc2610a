//! Per-cache daily statistics: downloads (narinfo and NAR requests and their body bytes) and
//! the stored size, per UTC day, for the web UI's charts and
//! `GET /api/v1/caches/{cache}/stats`. Recorded by the server itself in the metadata database
//! (table `cache_days`, `larder_store::meta::Downloads`); no external service.
//!
//! - **Counting costs the hot path nothing new**: a served narinfo or NAR adds to an in-memory
//!   [`Pending`] under the lock the request already takes to record the path's use
//!   ([`crate::retention::Usage`]); the usage flush (every 2 s) writes the counts with one
//!   upsert that *adds* them to the day's row, so replicas and flushes never overwrite each
//!   other. A `HEAD` is no download. Bytes are those of the response body: the narinfo, the
//!   NAR file or the range asked for (a presigned redirect counts what it sends the client
//!   to fetch). A server stopped by a crash loses at most the last flush interval's counts.
//! - **Size** (compressed bytes stored, what `cache info` calls size) is sampled when it may
//!   have changed (a path published, evicted or deleted; a cache created, see
//!   [`crate::retention::Usage::resized`]) at the next flush, and for every cache at each
//!   process's first flush of a UTC day. A day keeps its last sample, the one read last
//!   across replicas; a day without a sample had the size of the day before.
//! - **Kept** [`KEEP_DAYS`] days: the day's first flush deletes older rows. Deleting a cache
//!   deletes its rows.

pub use larder_api::{CacheStats, DayStats};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};

use larder_store::meta::{CacheRow, Downloads};
use larder_store::Metadata;

use crate::error::ApiError;
use crate::AppState;

/// Days of statistics kept (today included); older ones are deleted.
pub const KEEP_DAYS: i64 = 90;
/// Days a series shows unless asked otherwise (the web UI's charts).
pub const DEFAULT_DAYS: i64 = 30;

const DAY_SECS: i64 = 86_400;

/// Today (UTC), in days since 1970-01-01.
pub fn today() -> i64 {
    larder_store::now_unix().div_euclid(DAY_SECS)
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar (Howard
/// Hinnant's `civil_from_days`).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `YYYY-MM-DD` of a day number.
pub fn date(day: i64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// What requests gathered since the last flush.
#[derive(Default)]
pub struct Pending {
    downloads: HashMap<(i64, i64), Downloads>,
    resized: HashSet<i64>,
}

impl Pending {
    pub fn narinfo(&mut self, cache_id: i64, day: i64, bytes: u64) {
        let d = self.downloads.entry((cache_id, day)).or_default();
        d.narinfo_requests += 1;
        d.narinfo_bytes += bytes as i64;
    }

    pub fn nar(&mut self, cache_id: i64, day: i64, bytes: u64) {
        let d = self.downloads.entry((cache_id, day)).or_default();
        d.nar_requests += 1;
        d.nar_bytes += bytes as i64;
    }

    pub fn resized(&mut self, cache_id: i64) {
        self.resized.insert(cache_id);
    }

    /// Take back what a failed flush could not write.
    pub fn merge(&mut self, other: Pending) {
        for (k, d) in other.downloads {
            self.downloads.entry(k).or_default().add(&d);
        }
        self.resized.extend(other.resized);
    }
}

/// This process's part of the recording: the day it last sampled every cache and pruned.
pub struct Recorder {
    sampled_day: AtomicI64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            sampled_day: AtomicI64::new(i64::MIN),
        }
    }
}

impl Recorder {
    /// Write `pending`: add the downloads, sample the sizes that may have changed (every
    /// cache's at the first flush of a day, when older days are also pruned). On failure,
    /// what was not written comes back with the error.
    pub async fn flush(
        &self,
        meta: &Metadata,
        pending: Pending,
    ) -> Result<(), (ApiError, Pending)> {
        let rows: Vec<(i64, i64, Downloads)> = pending
            .downloads
            .iter()
            .map(|(&(cache, day), d)| (cache, day, *d))
            .collect();
        if let Err(e) = meta.add_downloads(&rows).await {
            return Err((e.into(), pending));
        }
        let unsent = Pending {
            downloads: HashMap::new(),
            resized: pending.resized,
        };
        let at = now_millis();
        let today = at.div_euclid(DAY_SECS * 1000);
        let new_day = self.sampled_day.load(Ordering::Relaxed) != today;
        match sample(meta, today, at, new_day, &unsent.resized).await {
            Ok(()) => {
                if new_day {
                    self.sampled_day.store(today, Ordering::Relaxed);
                }
                Ok(())
            }
            Err(e) => Err((e, unsent)),
        }
    }
}

async fn sample(
    meta: &Metadata,
    today: i64,
    at: i64,
    all: bool,
    resized: &HashSet<i64>,
) -> Result<(), ApiError> {
    let sizes: Vec<(i64, i64)> = if all {
        let sizes: HashMap<i64, i64> = meta
            .all_cache_stats()
            .await?
            .into_iter()
            .map(|(id, s)| (id, s.size))
            .collect();
        meta.list_caches()
            .await?
            .iter()
            .map(|c| (c.id, sizes.get(&c.id).copied().unwrap_or(0)))
            .collect()
    } else {
        let mut sizes = Vec::with_capacity(resized.len());
        for &id in resized {
            sizes.push((id, meta.cache_stats(id).await?.size));
        }
        sizes
    };
    meta.record_sizes(today, at, &sizes).await?;
    if all {
        let pruned = meta.prune_cache_days(today - KEEP_DAYS + 1).await?;
        if pruned > 0 {
            tracing::debug!(
                rows = pruned,
                "deleted statistics older than {KEEP_DAYS} days"
            );
        }
    }
    Ok(())
}

/// The last `days` days of `cache` (today included), every day present; today's size is
/// `size_now` (what `cache info` says now), earlier days' the recorded samples.
pub async fn series(
    state: &AppState,
    c: &CacheRow,
    days: i64,
    size_now: i64,
) -> Result<CacheStats, ApiError> {
    let to = today();
    let from = to - days.clamp(1, KEEP_DAYS) + 1;
    let (rows, before) = state.meta.cache_days(c.id, from, to).await?;
    let mut rows = rows.into_iter().peekable();
    let mut size = before;
    let mut out = Vec::with_capacity((to - from + 1) as usize);
    for day in from..=to {
        let row = rows.next_if(|r| r.day == day);
        let d = row.map(|r| r.downloads).unwrap_or_default();
        if let Some(s) = row.and_then(|r| r.size) {
            size = Some(s);
        }
        if day == to {
            size = Some(size_now);
        }
        out.push(DayStats {
            date: date(day),
            requests: d.narinfo_requests + d.nar_requests,
            narinfo_requests: d.narinfo_requests,
            nar_requests: d.nar_requests,
            bytes: d.narinfo_bytes + d.nar_bytes,
            narinfo_bytes: d.narinfo_bytes,
            nar_bytes: d.nar_bytes,
            size,
        });
    }
    Ok(CacheStats {
        cache: c.name.clone(),
        max_size: c.max_size,
        days: out,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    #[test]
    fn pending_counts_add_up_and_merge_back() {
        let mut p = Pending::default();
        p.narinfo(1, 10, 300);
        p.narinfo(1, 10, 200);
        p.nar(1, 10, 4096);
        p.nar(1, 11, 1);
        p.resized(2);
        let mut q = Pending::default();
        q.nar(1, 10, 4);
        q.merge(p);
        assert_eq!(
            q.downloads[&(1, 10)],
            Downloads {
                narinfo_requests: 2,
                narinfo_bytes: 500,
                nar_requests: 2,
                nar_bytes: 4100,
            }
        );
        assert_eq!(q.downloads[&(1, 11)].nar_requests, 1);
        assert!(q.resized.contains(&2));
    }

    #[test]
    fn dates_are_utc() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(20_000), "2024-10-04");
    }
}
