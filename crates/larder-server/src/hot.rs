//! In-memory caches of the hot read path: cache rows by name, rendered narinfos, the NARs
//! downloads ask for, and resolved tokens. Nix asks for thousands of narinfos per closure; answering most of them without a
//! database round trip is what lets larder keep up with a static file server.
//!
//! Entries expire after a short TTL so that changes made through another replica (a cache made
//! private, a token revoked, a path evicted) take effect within seconds everywhere; changes
//! made through this process invalidate the entries at once. Negative answers (404) are never
//! cached, so a freshly published path is visible immediately.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use larder_nix::hash::Sha256;
use larder_store::meta::{CacheRow, NarRow};
use quick_cache::sync::Cache;

use crate::auth::Grant;

/// How long a cache row or a token stays in memory before it is read again.
pub const SETTINGS_TTL: Duration = Duration::from_secs(2);
/// How long a rendered narinfo stays in memory.
pub const NARINFO_TTL: Duration = Duration::from_secs(5);
/// Most narinfos kept (about 1 KiB each).
const NARINFO_CAPACITY: usize = 100_000;
/// How long a NAR's metadata (its row and chunks, for downloads) stays in memory. Shorter than
/// the shortest `evicted_nar_grace` (10 s): a NAR found servable stays servable about that
/// long, and one whose objects are gone meanwhile is answered 404.
pub const NAR_TTL: Duration = Duration::from_secs(5);
/// Most NARs' metadata kept (about 300 bytes each), and their object ranges (about 100 bytes
/// each) with them: [`BySpans`].
const NAR_CAPACITY: usize = 100_000;
const NAR_WEIGHT: u64 = 300_000;
/// How long a NAR file's object ranges stay in memory. They change only when compaction moves
/// the file's chunks into a new pack, and the old pack stays readable for the claim lifetime
/// (hours) after: a download reading the old ranges within this is served whole. One that
/// finds an object gone reads them again (`binary_cache::serve_nar`).
pub const SPANS_TTL: Duration = Duration::from_secs(600);
/// Object ranges kept, in all (about 100 bytes each).
const SPANS_WEIGHT: u64 = 300_000;

/// Bytes of small NAR files kept in memory: what a static file server's open-file cache and
/// the page cache give it, without a file opened and read per download.
const SMALL_FILES_BYTES: u64 = 64 << 20;

/// Weighs a small file by its length (plus a little for the entry).
#[derive(Clone)]
struct ByLength;

impl quick_cache::Weighter<[u8; 52], bytes::Bytes> for ByLength {
    fn weight(&self, _key: &[u8; 52], val: &bytes::Bytes) -> u64 {
        val.len() as u64 + 64
    }
}

/// What a NAR download needs from the database: the NAR, and where its file's bytes are (the
/// object ranges it is made of, in order: `chunked_nar::spans` of its chunks over the whole
/// file; one for most NARs, a few for a NAR sharing chunks with others).
pub struct ServedNar {
    pub nar: NarRow,
    pub spans: Arc<Spans>,
    /// The spans came from [`HotCache::spans`], not from the database just now.
    pub spans_remembered: bool,
}

/// A NAR file's object ranges, in order (`chunked_nar::spans` over the whole file).
pub type Spans = Vec<(String, std::ops::Range<u64>)>;

/// Weighs a file's object ranges by their number.
#[derive(Clone)]
struct ByRanges;

impl quick_cache::Weighter<[u8; 32], Timed<Arc<Spans>>> for ByRanges {
    fn weight(&self, _key: &[u8; 32], val: &Timed<Arc<Spans>>) -> u64 {
        1 + val.value.len() as u64
    }
}

/// Weighs a NAR's entry by its object ranges, so that NARs made of many keep the cache's
/// memory bounded (an entry per chunk list was up to ~1.6 MB for a NAR of 256 MiB).
#[derive(Clone)]
struct BySpans;

impl quick_cache::Weighter<(i64, [u8; 32]), Timed<Arc<ServedNar>>> for BySpans {
    fn weight(&self, _key: &(i64, [u8; 32]), val: &Timed<Arc<ServedNar>>) -> u64 {
        1 + val.value.spans.len() as u64
    }
}

/// A chunk key without allocating: the 52-character nix32 chunk hash as bytes.
fn nar_key(file_hash: &str) -> [u8; 52] {
    let mut k = [0u8; 52];
    for (d, s) in k.iter_mut().zip(file_hash.bytes()) {
        *d = s;
    }
    k
}
const SETTINGS_CAPACITY: usize = 10_000;

/// A narinfo key without allocating: the 32-character hash part as bytes.
fn key(hash: &str) -> [u8; 32] {
    let mut k = [0u8; 32];
    for (d, s) in k.iter_mut().zip(hash.bytes()) {
        *d = s;
    }
    k
}

/// A narinfo as rendered from its path's row, and that row's id.
#[derive(Clone)]
pub struct HotNarinfo {
    pub path_id: i64,
    pub text: Arc<str>,
}

/// What memory holds of a narinfo ([`HotCache::narinfo`]).
pub enum Remembered {
    /// Read within [`NARINFO_TTL`]: served as it is.
    Fresh(Arc<str>),
    /// Read longer ago: served again once the database confirms the path still has this row
    /// (an index-only read, where reading it whole also reads the path's and its NAR's rows
    /// and renders them), since a path's row never changes while it is published.
    Stale(HotNarinfo),
    Absent,
}

#[derive(Clone)]
struct Timed<T> {
    at: Instant,
    value: T,
}

fn fresh<T: Clone>(t: Option<Timed<T>>, ttl: Duration) -> Option<T> {
    t.filter(|t| t.at.elapsed() < ttl).map(|t| t.value)
}

pub struct HotCache {
    caches: Cache<String, Timed<Arc<CacheRow>>>,
    narinfos: Cache<(i64, [u8; 32]), Timed<HotNarinfo>>,
    /// Bumped by every forget, so that a read racing it does not cache a stale narinfo.
    narinfo_generation: AtomicU64,
    tokens: Cache<String, Timed<Grant>>,
    nars: Cache<(i64, [u8; 32]), Timed<Arc<ServedNar>>, BySpans>,
    /// NAR files' object ranges by FileHash: whether a cache may serve the file is decided by
    /// `nars` and the database, never by this.
    spans: Cache<[u8; 32], Timed<Arc<Spans>>, ByRanges>,
    /// Small NAR files by chunk hash. Content-addressed, so never stale; whether a cache may
    /// serve one is decided by `nars` and the database, never by this.
    small_files: Cache<[u8; 52], bytes::Bytes, ByLength>,
}

impl Default for HotCache {
    fn default() -> Self {
        HotCache {
            caches: Cache::new(SETTINGS_CAPACITY),
            narinfos: Cache::new(NARINFO_CAPACITY),
            narinfo_generation: AtomicU64::new(0),
            tokens: Cache::new(SETTINGS_CAPACITY),
            nars: Cache::with_weighter(NAR_CAPACITY, NAR_WEIGHT, BySpans),
            spans: Cache::with_weighter(NAR_CAPACITY, SPANS_WEIGHT, ByRanges),
            small_files: Cache::with_weighter(4096, SMALL_FILES_BYTES, ByLength),
        }
    }
}

impl HotCache {
    pub fn cache(&self, name: &str) -> Option<Arc<CacheRow>> {
        fresh(self.caches.get(name), SETTINGS_TTL)
    }
    pub fn put_cache(&self, row: Arc<CacheRow>) {
        self.caches.insert(
            row.name.clone(),
            Timed {
                at: Instant::now(),
                value: row,
            },
        );
    }
    /// Forget a cache's row (after it changed or was deleted here).
    pub fn forget_cache(&self, name: &str) {
        self.caches.remove(name);
    }

    pub fn narinfo(&self, cache_id: i64, hash: &str) -> Remembered {
        match self.narinfos.get(&(cache_id, key(hash))) {
            Some(t) if t.at.elapsed() < NARINFO_TTL => Remembered::Fresh(t.value.text),
            Some(t) => Remembered::Stale(t.value),
            None => Remembered::Absent,
        }
    }
    /// The narinfo generation, read before looking a narinfo up in the database.
    pub fn narinfo_generation(&self) -> u64 {
        self.narinfo_generation.load(Ordering::SeqCst)
    }
    /// Cache a narinfo read (or confirmed) from the database at `generation`, for
    /// [`NARINFO_TTL`] from now. If any narinfo was forgotten since (an eviction or deletion
    /// raced the read), the entry is not kept: a stale narinfo must never outlive the
    /// forgetting of its path.
    pub fn put_narinfo(&self, cache_id: i64, hash: &str, narinfo: HotNarinfo, generation: u64) {
        let k = (cache_id, key(hash));
        if self.narinfo_generation() != generation {
            return;
        }
        self.narinfos.insert(
            k,
            Timed {
                at: Instant::now(),
                value: narinfo,
            },
        );
        // A forget between the check and the insert bumped the generation first: undo.
        if self.narinfo_generation() != generation {
            self.narinfos.remove(&k);
        }
    }
    pub fn forget_narinfo(&self, cache_id: i64, hash: &str) {
        self.narinfo_generation.fetch_add(1, Ordering::SeqCst);
        self.narinfos.remove(&(cache_id, key(hash)));
    }

    /// A servable NAR of `cache_id` by its file hash, as a download found it lately.
    pub fn nar(&self, cache_id: i64, file_hash: &Sha256) -> Option<Arc<ServedNar>> {
        fresh(self.nars.get(&(cache_id, *file_hash.as_bytes())), NAR_TTL)
    }
    pub fn put_nar(&self, cache_id: i64, served: Arc<ServedNar>) {
        self.nars.insert(
            (cache_id, *served.nar.file_hash.as_bytes()),
            Timed {
                at: Instant::now(),
                value: served,
            },
        );
    }
    pub fn forget_nar(&self, cache_id: i64, file_hash: &Sha256) {
        self.nars.remove(&(cache_id, *file_hash.as_bytes()));
    }

    /// A NAR file's object ranges, by its hash, as a download read them lately.
    pub fn spans(&self, file_hash: &Sha256) -> Option<Arc<Spans>> {
        fresh(self.spans.get(file_hash.as_bytes()), SPANS_TTL)
    }
    pub fn put_spans(&self, file_hash: &Sha256, spans: Arc<Spans>) {
        self.spans.insert(
            *file_hash.as_bytes(),
            Timed {
                at: Instant::now(),
                value: spans,
            },
        );
    }
    pub fn forget_spans(&self, file_hash: &Sha256) {
        self.spans.remove(file_hash.as_bytes());
    }

    /// The bytes of a small NAR file, by its FileHash (nix32).
    pub fn small_file(&self, file_hash: &str) -> Option<bytes::Bytes> {
        self.small_files.get(&nar_key(file_hash))
    }
    pub fn put_small_file(&self, file_hash: &str, bytes: bytes::Bytes) {
        self.small_files.insert(nar_key(file_hash), bytes);
    }
    pub fn forget_small_file(&self, chunk_hash: &str) {
        self.small_files.remove(&nar_key(chunk_hash));
    }

    pub fn token(&self, secret_hash: &str) -> Option<Grant> {
        fresh(self.tokens.get(secret_hash), SETTINGS_TTL)
    }
    pub fn put_token(&self, secret_hash: &str, grant: Grant) {
        self.tokens.insert(
            secret_hash.to_owned(),
            Timed {
                at: Instant::now(),
                value: grant,
            },
        );
    }
    /// Forget every resolved token (after a revocation here; revocations are rare).
    pub fn forget_tokens(&self) {
        self.tokens.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NAR of `spans` object ranges, distinct by `n`.
    fn served(n: u32, spans: usize) -> Arc<ServedNar> {
        let hash = Sha256::digest(&n.to_le_bytes());
        Arc::new(ServedNar {
            nar: NarRow {
                id: i64::from(n),
                nar_hash: hash,
                nar_size: 1,
                compression: larder_nix::compression::Compression::Zstd,
                file_hash: hash,
                file_size: spans as i64,
            },
            spans: Arc::new(
                (0..spans as u64)
                    .map(|i| (format!("pack/{n}"), i * 2..i * 2 + 1))
                    .collect(),
            ),
            spans_remembered: false,
        })
    }

    #[test]
    fn nars_made_of_many_ranges_keep_the_cache_bounded() {
        let hot = HotCache::default();
        // A thousand NARs of a thousand ranges each: ten times what the cache may hold.
        for n in 0..1000 {
            hot.put_nar(1, served(n, 1000));
        }
        assert!(hot.nars.weight() <= NAR_WEIGHT, "{}", hot.nars.weight());
        for n in 0..1000 {
            let s = served(n, 1000);
            hot.put_spans(&s.nar.file_hash, s.spans.clone());
        }
        assert!(hot.spans.weight() <= SPANS_WEIGHT, "{}", hot.spans.weight());
        let last = served(999, 1000);
        assert_eq!(hot.spans(&last.nar.file_hash), Some(last.spans.clone()));
        // The latest is served from memory, whole.
        let last = served(999, 1000);
        let got = hot
            .nar(1, &last.nar.file_hash)
            .expect("the latest NAR is kept");
        assert_eq!(got.spans, last.spans);
        // NARs of one range each: as many as the count allows.
        let hot = HotCache::default();
        for n in 0..10_000 {
            hot.put_nar(1, served(n, 1));
        }
        let kept = (0..10_000)
            .filter(|&n| hot.nar(1, &served(n, 1).nar.file_hash).is_some())
            .count();
        assert!(kept > 9_000, "{kept} of 10 000 kept");
    }
}
