//! Retention: usage recording, closure-safe least-recently-used eviction under a cache's
//! `max_size`, and the pins that protect closures from it (SPEC §2.6).
//!
//! - **Usage.** A narinfo or NAR fetch marks the path used. The request only inserts into an
//!   in-memory set under a mutex; [`Usage::flush`] (every [`USAGE_FLUSH_INTERVAL`], and before
//!   every eviction) stamps those uses with its time into the latest uses it holds in memory
//!   and writes a path's use to the database at most once per resolution:
//!   [`LIMITED_USAGE_RESOLUTION`] (a minute) in a cache with a size limit,
//!   [`USAGE_RESOLUTION`] without. Whatever orders or shows recency (eviction, the path list,
//!   path info) merges the uses held with the database's ([`Usage::last_used`]), so eviction
//!   on a replica sees every use it served. At most [`MAX_HELD_USES`] are held; evicted and
//!   deleted paths are forgotten. Never-used paths age from their upload (`created_at`).
//!   Under the same lock the request counts the download for the cache's daily statistics,
//!   which the same flush writes ([`crate::stats`]).
//! - **Order.** A path's *closure recency* is the latest use of the path or of any path in the
//!   cache that (transitively) references it: a library stays as long as something that needs
//!   it is used. Paths are evicted oldest closure recency first, each together with every path
//!   that references it, so no remaining narinfo ever names a missing reference. The closures
//!   of pinned paths are never evicted.
//! - **Safety against concurrency.** One eviction per cache at a time, across replicas too (a
//!   database lock on PostgreSQL). The plan is made from a snapshot; the evicting
//!   transaction re-checks that no remaining path references an evicted one and no pin names
//!   one ([`larder_store::meta::Metadata::evict_paths`]), and retries otherwise. Evicted paths'
//!   narinfos are dropped from the hot cache at once; their NARs stay servable and safe from
//!   garbage collection for `evicted_nar_grace` (longer than the narinfo TTL), so a narinfo
//!   served just before an eviction never points at a deleted NAR.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

pub use larder_api::{DeleteReport, DeletedPath, GcReport, Reason, Victim};
use larder_store::meta::{CacheRow, Evicted, LockName, LruPath, PinRow};
use larder_store::now_unix;

use crate::error::ApiError;
use crate::AppState;

/// How often recorded uses are written to the database.
pub const USAGE_FLUSH_INTERVAL: Duration = Duration::from_secs(2);
/// In a cache without a size limit, a path's use is written to the database at most once per
/// this much time (and not when the database's is less than this much older): nothing evicts
/// by it there (it is shown, and read if a limit is set later), and writing every use was a
/// row write per distinct path every flush, a quarter of the CPU of a server answering random
/// narinfos of 100 000 paths (bench/scale.sh, perf).
pub const USAGE_RESOLUTION: Duration = Duration::from_secs(600);
/// In a cache with a size limit, a path's use is written to the database at most once per
/// this much time; the uses in between are held in memory ([`Usage`]) and merged by everything
/// that reads recency (eviction, the path list, path info), so eviction on a replica orders
/// by its own uses as exactly as the flush ([`USAGE_FLUSH_INTERVAL`]) stamps them. Writing every
/// use to the second was a row write per served path and flush, ~24 % of the server's CPU
/// under random narinfos over 100 000 paths (bench/scale.sh). Other replicas see a use
/// through the database, at most this (and a flush) late.
pub const LIMITED_USAGE_RESOLUTION: Duration = Duration::from_secs(60);
/// The most uses (paths, or NARs) a replica holds in memory. A flush that ends with more
/// drops uses already written to the database (writing those that are not first), so memory
/// stays bounded whatever the size of the caches; a request that finds this many uses waiting
/// for the next flush starts it at once. 262 144 uses take about 40 MiB.
pub const MAX_HELD_USES: usize = 262_144;
/// Share of `max_size` past which a cache is reported as nearly full.
pub const WARN_FRACTION: f64 = 0.85;
/// Attempts of one eviction when concurrent publishing invalidates its plan.
const EVICT_ATTEMPTS: usize = 5;

/// What a use names: a path by its hash part (a narinfo), or the paths of a NAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Used {
    Path([u8; 32]),
    Nar(i64),
}

fn hash_key(hash: &str) -> Used {
    let mut k = [0u8; 32];
    for (d, s) in k.iter_mut().zip(hash.bytes()) {
        *d = s;
    }
    Used::Path(k)
}

/// A use held in memory.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// The latest use: the time of the flush that took it.
    used: i64,
    /// When this replica last wrote a use of it to the database (a flush's time), if ever.
    written_at: Option<i64>,
    /// `used` is not written yet.
    dirty: bool,
}

#[derive(Default)]
struct Batch {
    uses: HashSet<(i64, Used)>,
    stats: crate::stats::Pending,
}

/// Uses of paths: those served since the last flush, and the latest use of every path served
/// lately, which the database may not have yet (see [`LIMITED_USAGE_RESOLUTION`]).
///
/// Readers of recency merge [`Usage::last_used`] with the database's `last_used_at` (never
/// older). An evicted or deleted path is forgotten ([`Usage::forget`]), so a path pushed
/// again starts unused.
#[derive(Default)]
pub struct Usage {
    /// Taken by every served narinfo and NAR: a set insert and a counter.
    batch: Mutex<Batch>,
    /// The latest uses, at most [`MAX_HELD_USES`] after each flush.
    held: Mutex<HashMap<(i64, Used), Held>>,
    /// One flush (or forgetting) at a time: a use marked written stays held until its row is
    /// written, so readers never miss it.
    flushing: tokio::sync::Mutex<()>,
    /// Woken when [`MAX_HELD_USES`] uses wait for the next flush ([`usage_loop`]).
    wake: tokio::sync::Notify,
    stats: crate::stats::Recorder,
}

impl Usage {
    fn used(&self, cache_id: i64, key: Used, stats: impl FnOnce(&mut crate::stats::Pending)) {
        if let Ok(mut b) = self.batch.lock() {
            b.uses.insert((cache_id, key));
            stats(&mut b.stats);
            if b.uses.len() == MAX_HELD_USES {
                self.wake.notify_one();
            }
        }
    }

    /// A narinfo of `cache_id` was served: `bytes` long, or `None` for a `HEAD`, which is no
    /// download. Hot path: one lock, a set insert and a counter.
    pub fn narinfo(&self, cache_id: i64, hash: &str, bytes: Option<usize>) {
        let day = bytes.map(|_| crate::stats::today());
        self.used(cache_id, hash_key(hash), |s| {
            if let (Some(day), Some(n)) = (day, bytes) {
                s.narinfo(cache_id, day, n as u64);
            }
        });
    }

    /// A NAR of `cache_id` was served: `bytes` of its file (the range asked for), or `None`
    /// for a `HEAD`, which is no download.
    pub fn nar(&self, cache_id: i64, nar_id: i64, bytes: Option<u64>) {
        let day = bytes.map(|_| crate::stats::today());
        self.used(cache_id, Used::Nar(nar_id), |s| {
            if let (Some(day), Some(n)) = (day, bytes) {
                s.nar(cache_id, day, n);
            }
        });
    }

    /// The paths of `cache_id` changed (published, evicted, deleted; a new cache): the next
    /// flush samples its size for the statistics.
    pub fn resized(&self, cache_id: i64) {
        if let Ok(mut b) = self.batch.lock() {
            b.stats.resized(cache_id);
        }
    }

    /// The latest use of the path `hash` (whose NAR is `nar_id`) of `cache_id`: `recorded`
    /// (the database's) or a later one held in memory.
    pub fn last_used(
        &self,
        cache_id: i64,
        hash: &str,
        nar_id: i64,
        recorded: Option<i64>,
    ) -> Option<i64> {
        let Ok(held) = self.held.lock() else {
            return recorded;
        };
        latest(&held, cache_id, hash, nar_id, recorded)
    }

    /// [`Usage::last_used`] for every path eviction looks at, under one lock.
    pub fn merge_lru(&self, cache_id: i64, paths: &mut [LruPath]) {
        let Ok(held) = self.held.lock() else {
            return;
        };
        if held.is_empty() {
            return;
        }
        for p in paths {
            p.last_used_at = latest(&held, cache_id, &p.hash, p.nar_id, p.last_used_at);
        }
    }

    /// How many uses are held in memory (at most [`MAX_HELD_USES`] after a flush).
    pub fn held(&self) -> usize {
        self.held.lock().map_or(0, |h| h.len())
    }

    /// Whether a use of the path `hash` or of the NAR `nar_id` of `cache_id` is held in memory
    /// or waits for the next flush.
    pub fn holds(&self, cache_id: i64, hash: &str, nar_id: i64) -> bool {
        let keys = [(cache_id, hash_key(hash)), (cache_id, Used::Nar(nar_id))];
        let waiting = self
            .batch
            .lock()
            .is_ok_and(|b| keys.iter().any(|k| b.uses.contains(k)));
        let held = self
            .held
            .lock()
            .is_ok_and(|h| keys.iter().any(|k| h.contains_key(k)));
        waiting || held
    }

    /// Paths of `cache_id` are gone (evicted, deleted): drop their uses, waiting or held, and
    /// those of these NARs, so that nothing of them stays in memory and a path pushed again
    /// starts unused.
    pub async fn forget(&self, cache_id: i64, hashes: &[String], nar_ids: &[i64]) {
        let _one_at_a_time = self.flushing.lock().await;
        let keys: Vec<(i64, Used)> = hashes
            .iter()
            .map(|h| (cache_id, hash_key(h)))
            .chain(nar_ids.iter().map(|&n| (cache_id, Used::Nar(n))))
            .collect();
        if let Ok(mut b) = self.batch.lock() {
            for k in &keys {
                b.uses.remove(k);
            }
        }
        if let Ok(mut h) = self.held.lock() {
            for k in &keys {
                h.remove(k);
            }
        }
    }

    /// Take the uses served since the last flush, stamped `at`, into memory; write those due
    /// (never written by this replica, or last written at least the cache's resolution ago),
    /// every one with `everything`; keep the held uses within [`MAX_HELD_USES`]; and write the
    /// statistics gathered since the last flush (those that could not be written are kept for
    /// the next one).
    async fn flush_with(
        &self,
        meta: &larder_store::Metadata,
        at: i64,
        everything: bool,
    ) -> Result<(), ApiError> {
        let _one_at_a_time = self.flushing.lock().await;
        let batch = match self.batch.lock() {
            Ok(mut b) => std::mem::take(&mut *b),
            Err(_) => return Ok(()),
        };
        let held_any = !batch.uses.is_empty() || self.held() > 0;
        // The caches without a size limit; when they cannot be listed, every cache is limited
        // (its uses written more often, never less).
        let unlimited: HashSet<i64> = if held_any {
            meta.list_caches()
                .await
                .map(|cs| {
                    cs.into_iter()
                        .filter(|c| c.max_size.is_none())
                        .map(|c| c.id)
                        .collect()
                })
                .unwrap_or_default()
        } else {
            HashSet::new()
        };
        let resolution = |cache: i64| {
            if unlimited.contains(&cache) {
                USAGE_RESOLUTION
            } else {
                LIMITED_USAGE_RESOLUTION
            }
            .as_secs() as i64
        };
        let due = match self.held.lock() {
            Ok(mut held) => {
                for key in batch.uses {
                    let h = held.entry(key).or_insert(Held {
                        used: at,
                        written_at: None,
                        dirty: true,
                    });
                    if at > h.used {
                        h.used = at;
                        h.dirty = true;
                    }
                }
                take_due(&mut held, at, everything, &resolution)
            }
            Err(_) => Vec::new(),
        };
        let mut result = self.write(meta, &due, &unlimited, everything).await;
        if result.is_ok() && self.held() > MAX_HELD_USES {
            // Over the bound: drop uses the database has; if that is not enough, write the
            // rest first (a flush keeps at most the uses of one interval unwritten, so this is
            // rare: the previous flush left at most MAX_HELD_USES, all new ones are written).
            if !trim(&self.held, MAX_HELD_USES, false) {
                let rest = match self.held.lock() {
                    Ok(mut held) => take_due(&mut held, at, true, &resolution),
                    Err(_) => Vec::new(),
                };
                result = self.write(meta, &rest, &unlimited, true).await;
                if !trim(&self.held, MAX_HELD_USES, false) {
                    // The database refuses them: memory stays bounded, at their expense.
                    tracing::warn!("dropping path uses the database did not take");
                    trim(&self.held, MAX_HELD_USES, true);
                }
            }
        }
        if let Err((e, unsent)) = self.stats.flush(meta, batch.stats).await {
            if let Ok(mut b) = self.batch.lock() {
                b.stats.merge(unsent);
            }
            result = result.and(Err(e));
        }
        result
    }

    /// Write `uses` (cache, key, time), grouped by cache and time. What could not be written
    /// is marked unwritten again. `exact`: for uses about to leave memory (shutdown, the
    /// bound), written whatever the database has unless it is later, in every cache.
    async fn write(
        &self,
        meta: &larder_store::Metadata,
        uses: &[(i64, Used, i64)],
        unlimited: &HashSet<i64>,
        exact: bool,
    ) -> Result<(), ApiError> {
        let mut groups: HashMap<(i64, i64), (Vec<String>, Vec<i64>)> = HashMap::new();
        for &(cache, key, used) in uses {
            let g = groups.entry((cache, used)).or_default();
            match key {
                Used::Path(h) => g.0.push(String::from_utf8_lossy(&h).into_owned()),
                Used::Nar(n) => g.1.push(n),
            }
        }
        let mut groups: Vec<_> = groups.into_iter().collect();
        groups.sort_by_key(|&((cache, used), _)| (used, cache));
        for ((cache, used), (hashes, nars)) in groups {
            // A limited cache's use is written whatever the database has (unless later: another
            // replica's), so that a use dropped from memory is still there, exactly; so is
            // every use leaving memory. An unlimited cache's use otherwise only when the
            // database's is older than the resolution.
            let below = if unlimited.contains(&cache) && !exact {
                USAGE_RESOLUTION.as_secs() as i64
            } else {
                0
            };
            if let Err(e) = meta.record_usage(cache, &hashes, &nars, used, below).await {
                if let Ok(mut held) = self.held.lock() {
                    for &(c, key, u) in uses {
                        if let Some(h) = held.get_mut(&(c, key)) {
                            if h.used == u {
                                // Due again at the next flush.
                                h.dirty = true;
                                h.written_at = None;
                            }
                        }
                    }
                }
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Write the uses served since the last flush, stamped `at`, and the statistics.
    pub async fn flush_at(&self, meta: &larder_store::Metadata, at: i64) -> Result<(), ApiError> {
        self.flush_with(meta, at, false).await
    }

    pub async fn flush(&self, meta: &larder_store::Metadata) -> Result<(), ApiError> {
        self.flush_at(meta, now_unix()).await
    }

    /// Write every use held, due or not: at shutdown.
    pub async fn flush_all(&self, meta: &larder_store::Metadata) -> Result<(), ApiError> {
        self.flush_with(meta, now_unix(), true).await
    }
}

/// The latest of `recorded` and the uses held of the path `hash` and of its NAR.
fn latest(
    held: &HashMap<(i64, Used), Held>,
    cache_id: i64,
    hash: &str,
    nar_id: i64,
    recorded: Option<i64>,
) -> Option<i64> {
    [(cache_id, hash_key(hash)), (cache_id, Used::Nar(nar_id))]
        .iter()
        .filter_map(|k| held.get(k).map(|h| h.used))
        .chain(recorded)
        .max()
}

/// The held uses to write now, marked written (at `at`): the unwritten ones never written or
/// last written at least their cache's resolution ago; every unwritten one with `everything`.
fn take_due(
    held: &mut HashMap<(i64, Used), Held>,
    at: i64,
    everything: bool,
    resolution: &impl Fn(i64) -> i64,
) -> Vec<(i64, Used, i64)> {
    let mut due = Vec::new();
    for (&(cache, key), h) in held.iter_mut() {
        if !h.dirty {
            continue;
        }
        if everything || h.written_at.is_none_or(|w| at - w >= resolution(cache)) {
            h.dirty = false;
            h.written_at = Some(at);
            due.push((cache, key, h.used));
        }
    }
    due
}

/// Drop written uses (any, with `unwritten_too`) until at most `max` are held; whether that
/// was enough.
fn trim(held: &Mutex<HashMap<(i64, Used), Held>>, max: usize, unwritten_too: bool) -> bool {
    let Ok(mut held) = held.lock() else {
        return true;
    };
    let mut over = held.len().saturating_sub(max);
    held.retain(|_, h| {
        if over > 0 && (unwritten_too || !h.dirty) {
            over -= 1;
            return false;
        }
        true
    });
    over == 0
}

/// Retention state shared by the handlers and the background loops.
#[derive(Default)]
pub struct Retention {
    pub usage: Usage,
    /// One eviction at a time (they read and delete the same rows).
    evicting: tokio::sync::Mutex<()>,
    /// Caches with an eviction check queued after an upload.
    queued: Mutex<HashSet<i64>>,
    /// Eviction checks after uploads not finished yet, per cache ([`settle`] waits for them).
    pending: Mutex<std::collections::HashMap<i64, usize>>,
}

fn store_path(p: &LruPath) -> String {
    format!(
        "{}/{}-{}",
        larder_nix::store_path::STORE_DIR,
        p.hash,
        p.name
    )
}

/// Choose what to evict so that the cache's paths fit in `max_size`. Pure: the snapshot in,
/// the ordered victims out, with their hash parts (in the same order), and how many paths the
/// pins hold.
pub fn plan(
    paths: &[LruPath],
    refs: &[(String, String)],
    pins: &[PinRow],
    max_size: i64,
) -> (Vec<Victim>, Vec<String>, usize) {
    let n = paths.len();
    let index: HashMap<&str, usize> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| (p.hash.as_str(), i))
        .collect();
    let mut referrers = vec![Vec::new(); n];
    let mut references = vec![Vec::new(); n];
    for (from, to) in refs {
        if let (Some(&f), Some(&t)) = (index.get(from.as_str()), index.get(to.as_str())) {
            if f != t {
                referrers[t].push(f);
                references[f].push(t);
            }
        }
    }
    // Pinned closures, following references.
    let mut pinned = vec![false; n];
    let mut queue: VecDeque<usize> = pins
        .iter()
        .filter_map(|p| index.get(p.hash.as_str()).copied())
        .collect();
    while let Some(i) = queue.pop_front() {
        if !std::mem::replace(&mut pinned[i], true) {
            queue.extend(references[i].iter().copied());
        }
    }
    // Closure recency, from the top (unreferenced paths) down the references.
    let own: Vec<i64> = paths
        .iter()
        .map(|p| p.last_used_at.unwrap_or(p.created_at).max(p.created_at))
        .collect();
    let mut recency = own.clone();
    // How far below the top each path is (the longest chain of referrers above it).
    let mut depth = vec![0usize; n];
    let mut pending: Vec<usize> = referrers.iter().map(Vec::len).collect();
    let mut ready: VecDeque<usize> = (0..n).filter(|&i| pending[i] == 0).collect();
    let mut ordered = vec![false; n];
    while let Some(i) = ready.pop_front() {
        ordered[i] = true;
        for &r in &references[i] {
            recency[r] = recency[r].max(recency[i]);
            depth[r] = depth[r].max(depth[i] + 1);
            pending[r] -= 1;
            if pending[r] == 0 {
                ready.push_back(r);
            }
        }
    }
    // Anything left is on a reference cycle (Nix never makes one): never evicted.
    for (p, o) in pinned.iter_mut().zip(&ordered) {
        *p |= !*o;
    }
    let mut order: Vec<usize> = (0..n).collect();
    // Among closures used as lately, referrers go before what they reference: a path takes its
    // referrers with it, so a dependency of thousands taken first (the uses of a cache without
    // a limit are recorded to the 10 minutes, so whole caches tie) evicted 61 % of a cache of
    // 100 000 paths asked to shed 10 % (bench/scale.sh). Then the older use, then the older
    // upload.
    order.sort_by_key(|&i| (recency[i], depth[i], own[i], paths[i].id));
    let mut size: i64 = paths.iter().map(|p| p.file_size).sum();
    let mut gone = vec![false; n];
    let mut victims = Vec::new();
    let mut hashes = Vec::new();
    for &c in &order {
        if size <= max_size {
            break;
        }
        if gone[c] || pinned[c] {
            continue;
        }
        // The path and everything that (transitively) references it.
        let mut group = vec![c];
        let mut seen = HashSet::from([c]);
        let mut k = 0;
        while k < group.len() {
            for &r in &referrers[group[k]] {
                if !gone[r] && seen.insert(r) {
                    group.push(r);
                }
            }
            k += 1;
        }
        if group.iter().any(|&g| pinned[g]) {
            continue; // unreachable: pinned closures are closed under references
        }
        let root = store_path(&paths[c]);
        for (k, &g) in group.iter().enumerate() {
            gone[g] = true;
            size -= paths[g].file_size;
            victims.push(Victim {
                store_path: store_path(&paths[g]),
                file_size: paths[g].file_size,
                last_used_at: recency[g],
                reason: if k == 0 {
                    Reason::LeastRecentlyUsed
                } else {
                    Reason::ReferencesEvicted
                },
                because_of: (k > 0).then(|| root.clone()),
            });
            hashes.push(paths[g].hash.clone());
        }
    }
    (victims, hashes, pinned.iter().filter(|p| **p).count())
}

/// What an eviction report (and the periodic pass) says of a cache past [`WARN_FRACTION`].
fn near_limit_warning(size: i64, max: i64) -> String {
    format!(
        "cache uses {size} of {max} bytes (over {:.0} %)",
        WARN_FRACTION * 100.0
    )
}

fn near_limit(size: i64, max: i64) -> bool {
    max > 0 && size as f64 >= max as f64 * WARN_FRACTION
}

/// Whether a cache of `size` bytes is past [`WARN_FRACTION`] of its limit.
pub fn over_warning(cache: &CacheRow, size: i64) -> bool {
    cache.max_size.is_some_and(|m| near_limit(size, m))
}

/// Evict least recently used closures of `cache` until it fits its limit (or, with
/// `dry_run`, say what would go). A cache without a limit loses nothing.
pub async fn evict(
    state: &AppState,
    cache: &CacheRow,
    dry_run: bool,
) -> Result<GcReport, ApiError> {
    let _one_at_a_time = state.retention.evicting.lock().await;
    // …and across replicas (PostgreSQL), one eviction per cache: two plans made from the same
    // snapshot would each evict enough to get under the limit. Released when dropped.
    let _one_replica_at_a_time = match dry_run {
        true => None,
        false => Some(state.meta.lock(LockName::Eviction(cache.id)).await?),
    };
    state.retention.usage.flush(&state.meta).await?;
    if !dry_run {
        state.meta.prune_pins(cache.id).await?;
    }
    let Some(max) = cache.max_size else {
        // Nothing to plan: the report is the cache's counters (reading every path of a cache
        // of a million took half a minute for this).
        let stats = state.meta.cache_stats(cache.id).await?;
        let paths = usize::try_from(stats.paths).unwrap_or_default();
        return Ok(GcReport {
            cache: cache.name.clone(),
            dry_run,
            max_size: None,
            size_before: stats.size,
            size_after: stats.size,
            paths_before: paths,
            paths_after: paths,
            pinned_paths: 0,
            evicted: Vec::new(),
            warning: None,
        });
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let started = std::time::Instant::now();
        let mut paths = state.meta.lru_paths(cache.id).await?;
        // The uses the database has not been told yet (at most a resolution old).
        state.retention.usage.merge_lru(cache.id, &mut paths);
        let refs = state.meta.cache_refs(cache.id).await?;
        let pins = state.meta.list_pins(cache.id).await?;
        let size_before: i64 = paths.iter().map(|p| p.file_size).sum();
        let read = started.elapsed();
        let (victims, hashes, pinned_paths) = plan(&paths, &refs, &pins, max);
        let planned = started.elapsed();
        let freed: i64 = victims.iter().map(|v| v.file_size).sum();
        let size_after = size_before - freed;
        let mut report = GcReport {
            cache: cache.name.clone(),
            dry_run,
            max_size: Some(max),
            size_before,
            size_after,
            paths_before: paths.len(),
            paths_after: paths.len() - victims.len(),
            pinned_paths,
            evicted: victims,
            warning: None,
        };
        if size_after > max {
            report.warning = Some(format!(
                "cache stays over its limit: {size_after} of {max} bytes are pinned"
            ));
        } else if near_limit(size_after, max) {
            report.warning = Some(near_limit_warning(size_after, max));
        }
        if dry_run || report.evicted.is_empty() {
            return Ok(report);
        }
        match state.meta.evict_paths(cache.id, &hashes).await? {
            Evicted::Done => {
                for h in &hashes {
                    state.hot.forget_narinfo(cache.id, h);
                }
                // Their NARs' uses too, unless a path that stays has the same NAR.
                let gone: HashSet<&str> = hashes.iter().map(String::as_str).collect();
                let kept_nars: HashSet<i64> = paths
                    .iter()
                    .filter(|p| !gone.contains(p.hash.as_str()))
                    .map(|p| p.nar_id)
                    .collect();
                let nars: Vec<i64> = paths
                    .iter()
                    .filter(|p| gone.contains(p.hash.as_str()) && !kept_nars.contains(&p.nar_id))
                    .map(|p| p.nar_id)
                    .collect();
                state.retention.usage.forget(cache.id, &hashes, &nars).await;
                state.metrics.evicted(cache.id, hashes.len(), freed);
                state.retention.usage.resized(cache.id);
                tracing::info!(
                    cache = %cache.name,
                    paths = hashes.len(),
                    bytes = freed,
                    size = size_after,
                    read_ms = read.as_millis(),
                    plan_ms = (planned - read).as_millis(),
                    total_ms = started.elapsed().as_millis(),
                    "evicted least recently used paths"
                );
                return Ok(report);
            }
            Evicted::Raced if attempt < EVICT_ATTEMPTS => continue,
            Evicted::Raced => {
                report.evicted.clear();
                report.size_after = size_before;
                report.paths_after = report.paths_before;
                report.warning = Some("eviction raced with uploads; will retry later".into());
                return Ok(report);
            }
        }
    }
}

/// Most referrers named in a refusal's message (the body lists them all).
const REFUSAL_NAMES: usize = 5;

/// Delete the path `hash` from `cache`, with every path that (transitively) references it when
/// `with_referrers`; without it, refuse (409, naming them) while any does. Pinned paths are
/// never deleted: the pin must go first. Removal is eviction's, with the same guarantees: one
/// transaction that re-checks for new referrers (retried, or refused), narinfos forgotten by
/// the hot cache at once, NARs kept servable for `evicted_nar_grace`.
pub async fn delete_path(
    state: &AppState,
    cache: &CacheRow,
    hash: &str,
    with_referrers: bool,
) -> Result<DeleteReport, ApiError> {
    let _one_at_a_time = state.retention.evicting.lock().await;
    // Across replicas too: a deletion is an eviction (see `evict`).
    let _one_replica_at_a_time = state.meta.lock(LockName::Eviction(cache.id)).await?;
    for _ in 0..EVICT_ATTEMPTS {
        let target = state
            .meta
            .path_entry(cache.id, hash)
            .await?
            .ok_or_else(|| ApiError::not_found("no such path in this cache"))?;
        let target_path = format!(
            "{}/{}",
            larder_nix::store_path::STORE_DIR,
            target.basename()
        );
        let referrers = state.meta.transitive_referrers(cache.id, hash).await?;
        let names = |entries: &[larder_store::meta::PathEntry]| -> Vec<String> {
            entries
                .iter()
                .map(|e| format!("{}/{}", larder_nix::store_path::STORE_DIR, e.basename()))
                .collect()
        };
        if !referrers.is_empty() && !with_referrers {
            let all = names(&referrers);
            let mut shown = all
                .iter()
                .take(REFUSAL_NAMES)
                .cloned()
                .collect::<Vec<_>>()
                .join(" ");
            if all.len() > REFUSAL_NAMES {
                shown.push_str(&format!(" (and {} more)", all.len() - REFUSAL_NAMES));
            }
            return Err(ApiError::Referenced(
                format!(
                    "{target_path} is referenced by {} other path(s) of cache {:?}: {shown}; \
                     delete them first, or all together with --with-referrers",
                    all.len(),
                    cache.name
                ),
                all,
            ));
        }
        let mut victims = vec![target];
        victims.extend(referrers);
        let pins = state.meta.list_pins(cache.id).await?;
        if let Some(pin) = pins
            .iter()
            .find(|p| victims.iter().any(|v| v.hash == p.hash))
        {
            return Err(ApiError::Conflict(format!(
                "{} is pinned as {:?} in cache {:?}; delete the pin first (larder pin delete {} {})",
                pin.store_path, pin.name, cache.name, cache.name, pin.name
            )));
        }
        let hashes: Vec<String> = victims.iter().map(|v| v.hash.clone()).collect();
        match state.meta.evict_paths(cache.id, &hashes).await? {
            Evicted::Done => {
                for h in &hashes {
                    state.hot.forget_narinfo(cache.id, h);
                }
                let nars: Vec<i64> = victims.iter().map(|v| v.nar_id).collect();
                state.retention.usage.forget(cache.id, &hashes, &nars).await;
                let freed = victims.iter().map(|v| v.file_size).sum();
                state.metrics.deleted(cache.id, victims.len(), freed);
                state.retention.usage.resized(cache.id);
                tracing::info!(
                    cache = %cache.name,
                    path = %target_path,
                    paths = victims.len(),
                    bytes = freed,
                    "deleted paths"
                );
                let deleted = names(&victims)
                    .into_iter()
                    .zip(&victims)
                    .map(|(store_path, v)| DeletedPath {
                        store_path,
                        file_size: v.file_size,
                    })
                    .collect();
                return Ok(DeleteReport {
                    cache: cache.name.clone(),
                    deleted,
                    freed,
                });
            }
            // A referrer or pin appeared since the snapshot: look again.
            Evicted::Raced => continue,
        }
    }
    Err(ApiError::Conflict(
        "concurrent uploads keep referencing this path; try again".into(),
    ))
}

/// After a path of `cache` was published: its size is sampled at the next flush (statistics),
/// and if the cache has a limit, it is checked (in the background, coalesced per cache), with
/// an eviction when it is crossed.
pub fn after_publish(state: &AppState, cache: &CacheRow, file_size: i64) {
    state.retention.usage.resized(cache.id);
    let Some(max) = cache.max_size else {
        return;
    };
    match state.retention.queued.lock() {
        Ok(mut q) => {
            if !q.insert(cache.id) {
                return; // a check is already queued and will see this path
            }
        }
        Err(_) => return,
    }
    if let Ok(mut p) = state.retention.pending.lock() {
        *p.entry(cache.id).or_default() += 1;
    }
    let state = state.clone();
    let cache = cache.clone();
    tokio::spawn(async move {
        check_after_publish(&state, &cache, max, file_size).await;
        if let Ok(mut p) = state.retention.pending.lock() {
            if let Some(n) = p.get_mut(&cache.id) {
                *n -= 1;
                if *n == 0 {
                    p.remove(&cache.id);
                }
            }
        }
    });
}

/// The check [`after_publish`] runs in the background.
async fn check_after_publish(state: &AppState, cache: &CacheRow, max: i64, file_size: i64) {
    // Wait for a running eviction: its plan may predate this path.
    drop(state.retention.evicting.lock().await);
    if let Ok(mut q) = state.retention.queued.lock() {
        q.remove(&cache.id);
    }
    let size = match state.meta.cache_stats(cache.id).await {
        Ok(s) => s.size,
        Err(e) => {
            tracing::warn!(cache = %cache.name, error = %e, "cannot check the cache size");
            return;
        }
    };
    if near_limit(size, max) && !near_limit(size - file_size, max) {
        tracing::warn!(cache = %cache.name, size, max_size = max, "cache is over 85 % of its limit");
    }
    if size > max {
        if let Err(e) = evict(state, cache, false).await {
            tracing::warn!(cache = %cache.name, error = %e, "eviction failed");
        }
    }
}

/// Wait (at most `limit`) until no eviction check of `cache` is queued or running on this
/// replica: what a pusher waits for before it checks that its closure is still all there.
pub async fn settle(state: &AppState, cache: &CacheRow, limit: std::time::Duration) {
    if cache.max_size.is_none() {
        return;
    }
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let pending = state
            .retention
            .pending
            .lock()
            .is_ok_and(|p| p.contains_key(&cache.id));
        if !pending {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The periodic part: prune pins and evict in every cache with a limit.
pub async fn evict_all(state: &AppState) -> Result<(), ApiError> {
    for cache in state.meta.list_caches().await? {
        let Some(max) = cache.max_size else {
            state.meta.prune_pins(cache.id).await?;
            continue;
        };
        // Within its limit (its counters say so exactly) a cache has nothing to evict: no need
        // to read every path of it (seconds at a million) at every tick.
        let size = state.meta.cache_stats(cache.id).await?.size;
        if size <= max {
            state.meta.prune_pins(cache.id).await?;
            if near_limit(size, max) {
                tracing::warn!(cache = %cache.name, "{}", near_limit_warning(size, max));
            }
            continue;
        }
        let report = evict(state, &cache, false).await?;
        if let Some(w) = &report.warning {
            tracing::warn!(cache = %cache.name, "{w}");
        }
    }
    Ok(())
}

/// Write recorded uses every [`USAGE_FLUSH_INTERVAL`], or at once when [`MAX_HELD_USES`] wait.
pub(crate) async fn usage_loop(state: AppState) {
    let mut interval = tokio::time::interval(USAGE_FLUSH_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = state.retention.usage.wake.notified() => {}
        }
        if let Err(e) = state.retention.usage.flush(&state.meta).await {
            tracing::warn!(error = %e, "recording path usage failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(id: i64, used: Option<i64>) -> LruPath {
        LruPath {
            id,
            hash: format!("{id:0>32}"),
            name: format!("p{id}"),
            nar_id: id,
            file_size: 10,
            created_at: 100,
            last_used_at: used,
        }
    }

    #[test]
    fn among_closures_used_as_lately_referrers_go_first() {
        // One dependency (uploaded first) under nine paths, all used in the same 10 minutes.
        let mut paths = vec![path(1, Some(500))];
        let mut refs = Vec::new();
        for id in 2..=10 {
            paths.push(path(id, Some(500)));
            refs.push((format!("{id:0>32}"), format!("{:0>32}", 1)));
        }
        // Shed one path's worth: one referrer goes, not the dependency with all nine.
        let (victims, hashes, _) = plan(&paths, &refs, &[], 90);
        assert_eq!(hashes, vec![format!("{:0>32}", 2)], "{victims:?}");
        // A referrer used later keeps the dependency it uses: the unused-since ones go first.
        paths[5].last_used_at = Some(900);
        let (_, hashes, _) = plan(&paths, &refs, &[], 20);
        assert_eq!(hashes.len(), 8);
        assert!(!hashes.contains(&format!("{:0>32}", 1)));
        assert!(!hashes.contains(&format!("{:0>32}", 6)));
        // Older use still comes first, whatever the depth.
        paths[0].last_used_at = Some(500);
        let lone = path(11, Some(400));
        paths.push(lone);
        let (_, hashes, _) = plan(&paths, &refs, &[], 100);
        assert_eq!(hashes, vec![format!("{:0>32}", 11)]);
    }
}
