//! Which paths the caches may hold, in memory: a Bloom filter over the cache and hash part of
//! every published path, so that a lookup of a path no cache holds (what Nix asks most: every
//! substituter is asked for every path of a closure) is answered without reading the database.
//!
//! Why: at a million paths, a narinfo miss on the embedded default read two or three B-tree
//! pages of the `(cache_id, hash)` index, mostly from the operating system's page cache (each
//! read connection keeps 4 MiB of its own), a third of the server's CPU under random misses;
//! nginx answering the same misses with a `stat` of a missing file was 1.6x as fast
//! (bench/scale.sh). With the filter a miss is a few memory reads.
//!
//! Correctness rests on one rule: **a key is in the filter before the transaction that
//! publishes its path commits.** So "not in the filter" means "not published", and the filter
//! only ever answers "absent" (then the database is not asked) or "maybe" (then it is, as
//! before). Keys are never removed: an evicted or deleted path stays a "maybe", and the lookup
//! finds it gone. Publishing inserts every key it may publish before its transaction starts
//! ([`Presence::publishing`]; one that ends up not published is a harmless "maybe") and holds
//! a share of [`Presence::gate`] until it ends.
//!
//! Building the filter (at start, [`Presence::build`]; again when more keys were inserted than
//! it was sized for, which also drops evicted paths' keys) reads every path's key with a
//! connection of its own. Keys published meanwhile are also queued and added before the new
//! filter replaces the old one. A publication that inserted its keys before the queue existed
//! may commit after the read began and be missed by it, so the build first takes
//! [`Presence::gate`] exclusively, once: every such publication has ended by then. Until the
//! first build completes (and if a build fails) every lookup asks the database.
//!
//! Only the embedded default (SQLite, one `larder serve` per data directory, which the data
//! directory's lock enforces) has a filter: on PostgreSQL, replicas publish without telling
//! each other, and a miss must never be served stale.

use std::sync::RwLock;

/// Bits of filter per key it is sized for, at its capacity: with [`PROBES`] probes in one
/// 512-bit block, about one "maybe" in 800 for an absent key when full, far fewer before.
const BITS_PER_KEY: usize = 16;
/// Bits set per key, all in one 64-byte block (one cache line read per lookup).
const PROBES: u64 = 8;
/// A filter is sized for twice the paths it is built from, and never for fewer than this.
const MIN_CAPACITY: usize = 1 << 16;

/// The key of a path: 64 bits mixed from its cache and hash part. Not keyed by a secret: a
/// client that finds two colliding hash parts only makes one of them a "maybe".
pub(super) fn key(cache_id: i64, hash: &str) -> u64 {
    key_of_bytes(cache_id, hash.as_bytes())
}

/// [`key`] of a hash part as its bytes (as a database row holds it).
pub(super) fn key_of_bytes(cache_id: i64, hash: &[u8]) -> u64 {
    const M: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = (cache_id as u64).wrapping_add(M).wrapping_mul(M);
    for word in hash.chunks(8) {
        let mut w = [0u8; 8];
        w[..word.len()].copy_from_slice(word);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(M);
        h ^= h >> 31;
    }
    mix(h)
}

/// A 64-bit finaliser (SplitMix64's).
fn mix(mut h: u64) -> u64 {
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

/// A blocked Bloom filter: a key sets [`PROBES`] bits of one 512-bit block.
pub(super) struct Bloom {
    blocks: Vec<[u64; 8]>,
    /// Keys it was sized for; past this many insertions it is rebuilt.
    capacity: usize,
    inserted: usize,
}

impl Bloom {
    /// A filter for `keys` keys (a build sizes it for twice the paths it reads).
    pub(super) fn with_capacity(keys: usize) -> Bloom {
        let capacity = keys.max(MIN_CAPACITY);
        let blocks = (capacity * BITS_PER_KEY).div_ceil(512);
        Bloom {
            blocks: vec![[0; 8]; blocks],
            capacity,
            inserted: 0,
        }
    }

    /// The block of `key` and the bits it sets there (double hashing within the block).
    fn probes(&self, key: u64) -> (usize, impl Iterator<Item = u64>) {
        let block = ((u128::from(key) * self.blocks.len() as u128) >> 64) as usize;
        let h = mix(key);
        let step = (h >> 32) | 1;
        (
            block,
            (0..PROBES).map(move |i| h.wrapping_add(i * step) & 511),
        )
    }

    pub(super) fn insert(&mut self, key: u64) {
        let (b, bits) = self.probes(key);
        let block = &mut self.blocks[b];
        for bit in bits {
            block[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        self.inserted += 1;
    }

    fn may_hold(&self, key: u64) -> bool {
        let (b, mut bits) = self.probes(key);
        let block = &self.blocks[b];
        bits.all(|bit| block[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }

    fn bytes(&self) -> usize {
        self.blocks.len() * 64
    }
}

#[derive(Default)]
struct State {
    /// `None` until the first build: every lookup is a "maybe".
    filter: Option<Bloom>,
    /// While a build runs: the keys published since it began, for the new filter.
    queued: Option<Vec<u64>>,
}

/// The filter of the paths a database may hold, shared by the handles of one
/// [`super::Metadata`].
#[derive(Default)]
pub(super) struct Presence {
    state: RwLock<State>,
    /// Shared by every publication from before it inserts its keys until it ends; taken
    /// exclusively, once, by a build before it reads the paths (see the module's comment).
    gate: tokio::sync::RwLock<()>,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.read();
        let filter = state.as_ref().ok().and_then(|s| s.filter.as_ref());
        f.debug_struct("Presence")
            .field("keys", &filter.map(|b| b.inserted))
            .field("bytes", &filter.map(Bloom::bytes))
            .finish()
    }
}

/// What a build of the filter did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceBuilt {
    /// Paths read from the database.
    pub paths: usize,
    /// Keys published while it read them, added after.
    pub queued: usize,
    /// Memory the filter takes.
    pub bytes: usize,
}

impl Presence {
    /// Whether the path `hash` of `cache_id` may be published: `false` only if it certainly
    /// is not.
    pub(super) fn may_hold(&self, cache_id: i64, hash: &str) -> bool {
        match self.state.read() {
            Ok(s) => s
                .filter
                .as_ref()
                .is_none_or(|f| f.may_hold(key(cache_id, hash))),
            Err(_) => true,
        }
    }

    /// Insert the keys of paths about to be published; hold the returned guard until the
    /// publishing transaction has ended. Returns whether the filter is now past its capacity
    /// (time to build it again).
    pub(super) async fn publishing(
        &self,
        keys: impl Iterator<Item = (i64, impl AsRef<str>)>,
    ) -> (tokio::sync::RwLockReadGuard<'_, ()>, bool) {
        let guard = self.gate.read().await;
        let mut full = false;
        // A poisoned lock (a panic while holding it, which nothing here can do) is taken as
        // it is: every key is still inserted.
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        let State { filter, queued } = &mut *state;
        for (cache_id, hash) in keys {
            let k = key(cache_id, hash.as_ref());
            if let Some(f) = filter.as_mut() {
                f.insert(k);
            }
            if let Some(q) = queued.as_mut() {
                q.push(k);
            }
        }
        if let Some(f) = filter {
            full = f.inserted > f.capacity && queued.is_none();
        }
        (guard, full)
    }

    /// Build the filter with `read` (a blocking read of every path of the database into a
    /// filter it sizes, run on a blocking thread) and replace the current one with it. `None`
    /// if a build was already running.
    pub(super) async fn build<E: Send + 'static>(
        &self,
        read: impl FnOnce() -> Result<Bloom, E> + Send + 'static,
    ) -> Option<Result<PresenceBuilt, E>> {
        {
            let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
            if state.queued.is_some() {
                return None;
            }
            state.queued = Some(Vec::new());
        }
        // Every publication that inserted its keys before the queue existed has ended.
        drop(self.gate.write().await);
        // Filled off the lock: readers go on with the current filter meanwhile.
        let read = tokio::task::spawn_blocking(read).await;
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        let queued = state.queued.take().unwrap_or_default();
        let mut bloom = match read {
            Ok(Ok(bloom)) => bloom,
            // The current filter (or none) stays: it holds every key published meanwhile.
            Ok(Err(e)) => return Some(Err(e)),
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        };
        let paths = bloom.inserted;
        for k in &queued {
            bloom.insert(*k);
        }
        let built = PresenceBuilt {
            paths,
            queued: queued.len(),
            bytes: bloom.bytes(),
        };
        state.filter = Some(bloom);
        Some(Ok(built))
    }
}

impl super::Metadata {
    /// Build (or build again) the in-memory filter of the paths this database may hold, so
    /// that lookups of absent paths stop reading the database (see `meta/present.rs`). Only
    /// the embedded default on a file has one: `Ok(None)` elsewhere, and when a build is
    /// already running. Reads every path's key on a connection of its own.
    ///
    /// Only for the handle (and its clones) through which everything is published: another
    /// handle opened on the same file publishes without telling this one's filter. `larder
    /// serve` holds the data directory's lock, so no other server writes to its database.
    pub async fn remember_paths(&self) -> super::Result<Option<PresenceBuilt>> {
        let (Some(present), Some(fast)) = (&self.present, &self.fast) else {
            return Ok(None);
        };
        let fast = fast.clone();
        present.build(move || fast.path_filter()).await.transpose()
    }

    /// Whether the path `hash` of `cache_id` may be published: `false` only when the filter
    /// says it certainly is not.
    pub(super) fn may_hold(&self, cache_id: i64, hash: &str) -> bool {
        self.present
            .as_ref()
            .is_none_or(|p| p.may_hold(cache_id, hash))
    }

    /// Before a transaction that may publish the paths `hashes` of `cache_id`: insert their
    /// keys into the filter, and hold the returned guard until the transaction has ended. A
    /// filter past its capacity is built again in the background.
    ///
    /// `hashes` is not iterated at all without a filter (PostgreSQL).
    pub(super) async fn publishing(
        &self,
        cache_id: i64,
        hashes: impl Iterator<Item = impl AsRef<str>>,
    ) -> Option<tokio::sync::RwLockReadGuard<'_, ()>> {
        let present = self.present.as_ref()?;
        let (guard, full) = present.publishing(hashes.map(|h| (cache_id, h))).await;
        if full {
            let meta = self.clone();
            tokio::spawn(async move {
                match meta.remember_paths().await {
                    Ok(Some(b)) => tracing::info!(
                        paths = b.paths,
                        bytes = b.bytes,
                        "the filter of published paths was rebuilt past its capacity"
                    ),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(
                        error = %e,
                        "cannot rebuild the filter of published paths (the old one stays)"
                    ),
                }
            });
        }
        Some(guard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn bloom_of(keys: &[u64]) -> Bloom {
        let mut b = Bloom::with_capacity(2 * keys.len());
        for k in keys {
            b.insert(*k);
        }
        b
    }

    fn hash(i: u64) -> String {
        // 32 characters of the Nix base-32 alphabet, as a hash part.
        const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
        let mut h = mix(i);
        (0..32)
            .map(|n| {
                if n % 12 == 0 {
                    h = mix(h ^ n);
                }
                let c = ALPHABET[(h % 32) as usize] as char;
                h /= 32;
                c
            })
            .collect()
    }

    #[test]
    fn every_inserted_key_is_held_and_few_absent_ones_are() {
        let n = 100_000;
        let mut b = Bloom::with_capacity(n);
        for i in 0..n as u64 {
            b.insert(key(1, &hash(i)));
        }
        assert!((0..n as u64).all(|i| b.may_hold(key(1, &hash(i)))));
        // The same hashes in another cache, and other hashes: "maybe" rarely (at capacity,
        // about 1 in 800 expected).
        let other_cache = (0..n as u64)
            .filter(|i| b.may_hold(key(2, &hash(*i))))
            .count();
        let other_hash = (n as u64..2 * n as u64)
            .filter(|i| b.may_hold(key(1, &hash(*i))))
            .count();
        assert!(other_cache < n / 200, "{other_cache} false maybes of {n}");
        assert!(other_hash < n / 200, "{other_hash} false maybes of {n}");
    }

    #[tokio::test]
    async fn keys_published_during_a_build_are_in_the_filter_it_makes() {
        let p = Arc::new(Presence::default());
        // Before the first build: everything is a "maybe".
        assert!(p.may_hold(1, &hash(7)));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let building = {
            let p = p.clone();
            tokio::spawn(async move {
                p.build(move || {
                    // The read waits until a publication has inserted its key.
                    rx.recv().unwrap();
                    Ok::<_, ()>(bloom_of(&[key(1, &hash(1))]))
                })
                .await
            })
        };
        // A second build while one runs does nothing.
        while p.state.read().unwrap().queued.is_none() {
            tokio::task::yield_now().await;
        }
        assert!(p.build(|| Ok::<_, ()>(bloom_of(&[]))).await.is_none());
        let (guard, full) = p.publishing([(1, hash(2).as_str())].into_iter()).await;
        assert!(!full);
        drop(guard);
        tx.send(()).unwrap();
        let built = building.await.unwrap().unwrap().unwrap();
        assert_eq!((built.paths, built.queued), (1, 1));
        assert!(p.may_hold(1, &hash(1)));
        assert!(p.may_hold(1, &hash(2)));
        let absent = (10..1010).filter(|i| p.may_hold(1, &hash(*i))).count();
        assert!(absent < 10, "{absent} of 1000 absent paths are maybes");
    }

    #[tokio::test]
    async fn a_build_waits_for_publications_that_began_before_it() {
        let p = Arc::new(Presence::default());
        p.build(|| Ok::<_, ()>(bloom_of(&[])))
            .await
            .unwrap()
            .unwrap();
        // A publication in progress (its keys inserted into the current filter only).
        let (guard, _) = p.publishing([(1, hash(5).as_str())].into_iter()).await;
        let read_started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut building = {
            let (p, started) = (p.clone(), read_started.clone());
            tokio::spawn(async move {
                p.build(move || {
                    started.store(true, std::sync::atomic::Ordering::SeqCst);
                    Ok::<_, ()>(bloom_of(&[]))
                })
                .await
            })
        };
        let waited = std::time::Duration::from_millis(300);
        assert!(
            tokio::time::timeout(waited, &mut building).await.is_err(),
            "the build ended while a publication was in progress"
        );
        assert!(
            !read_started.load(std::sync::atomic::Ordering::SeqCst),
            "the build read the database while a publication was in progress"
        );
        drop(guard);
        building.await.unwrap().unwrap().unwrap();
        assert!(read_started.load(std::sync::atomic::Ordering::SeqCst));
        // The new filter was read after that publication ended; its key (which a real read
        // would have found committed) is not carried over by the queue.
        assert!(!p.may_hold(1, &hash(5)));
    }

    #[tokio::test]
    async fn a_failed_build_keeps_the_filter_it_had() {
        let p = Presence::default();
        p.build(|| Ok::<_, ()>(bloom_of(&[key(1, &hash(1))])))
            .await
            .unwrap()
            .unwrap();
        assert!(p.build(|| Err::<Bloom, _>("disk")).await.unwrap().is_err());
        assert!(p.may_hold(1, &hash(1)));
        // And publications during the failed build went into it too.
        let (g, _) = p.publishing([(1, hash(9).as_str())].into_iter()).await;
        drop(g);
        assert!(p.may_hold(1, &hash(9)));
    }

    #[tokio::test]
    async fn a_filter_past_its_capacity_asks_to_be_built_again() {
        let p = Presence::default();
        p.build(|| Ok::<_, ()>(bloom_of(&[])))
            .await
            .unwrap()
            .unwrap();
        let hashes: Vec<String> = (0..MIN_CAPACITY as u64 + 1).map(hash).collect();
        let (g, full) = p.publishing(hashes.iter().map(|h| (1, h.as_str()))).await;
        drop(g);
        assert!(full);
    }
}
