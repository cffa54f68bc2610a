//! Pull-through caching: a cache with `upstreams` asks them, in order, for a path it does not
//! have, serves what one of them has (once its signature checks), and keeps the NAR while it
//! streams it to the client, so the next consumer gets it locally.
//!
//! - Narinfo ([`narinfo`]): on a local miss, `GET <upstream>/<hash>.narinfo` with bounded time
//!   ([`CONNECT_TIMEOUT`], [`NARINFO_TIMEOUT`], [`NARINFO_BUDGET`] for all of them). Served only when the upstream's narinfo is
//!   signed by a key trusted for the cache (the server's `upstream_keys` and the cache's own)
//!   and names a NAR larder can store (xz, zstd or none, with a FileHash). The answer keeps the
//!   upstream's signatures, gets the cache's own when the server signs for it, and points at
//!   `upstream-nar/<hash>/<file>` in this cache, so any replica can serve the NAR request
//!   from the store hash alone. A miss of every upstream is remembered for [`MISS_TTL`] (in
//!   memory, at most [`MAX_REMEMBERED`] entries); the local lookup always comes first, so a
//!   path pushed meanwhile is never hidden by it. An upstream that fails or times out is left
//!   alone for [`BACKOFF`]: a down upstream costs one bounded wait, then nothing.
//! - NAR ([`fetch_nar`]): streamed from the upstream to the client and, at the same time,
//!   into the upload pipeline ([`crate::ingest::ingest`]: FileHash, NarHash, NarSize measured).
//!   The last block is held back until the measured figures match the verified narinfo; only
//!   then is the path stored and published ([`crate::publish::publish_fetched`]) and the
//!   client's body completed. On a mismatch nothing is kept and the client's body ends in an
//!   error (the connection is closed short of its Content-Length), so Nix fails that
//!   substitution. One fetch per path at a time: a second request waits for the first and is
//!   then served locally.
//!
//! Nix's side: `src/libstore/binary-cache-store.cc` (narinfo, then `URL` relative to the
//! cache). Private caches are checked before any of this (`access::CacheAccess<Pull>`), so an
//! outsider cannot make a private cache fetch anything.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use futures::StreamExt;
use larder_nix::compression::Compression;
use larder_nix::hash::Sha256;
use larder_nix::narinfo::NarInfo;
use larder_nix::signing::VerifyingKey;
use larder_store::meta::CacheRow;

use crate::error::ApiError;
use crate::publish::{managed_key, PathInfo};
use crate::AppState;

pub use crate::config::{check_upstream_url as check_url, MAX_UPSTREAMS};

/// Time to open a connection to an upstream.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time for a whole narinfo request to an upstream, and for a NAR response's head.
pub const NARINFO_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for all of a cache's upstreams to answer one narinfo miss: upstreams not asked by then
/// are skipped (and the miss is not remembered), so a miss is answered well within the
/// server's `backend_timeout` however many upstreams hang.
pub const NARINFO_BUDGET: Duration = Duration::from_secs(10);
/// A NAR download from an upstream that sends nothing for this long is abandoned.
pub const NAR_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long "no upstream has it" and a verified upstream narinfo are remembered.
pub const MISS_TTL: Duration = Duration::from_secs(60);
/// How long an upstream that failed (connection, timeout, 5xx) is not asked again.
pub const BACKOFF: Duration = Duration::from_secs(30);
/// Most misses and narinfos remembered (each), so memory stays bounded.
pub const MAX_REMEMBERED: usize = 50_000;
/// Largest upstream narinfo read.
const MAX_NARINFO_BYTES: usize = 1 << 20;

/// An upstream's narinfo, verified: signed by a trusted key, naming a NAR larder can store.
#[derive(Debug)]
pub struct Found {
    /// The upstream's base URL.
    pub upstream: String,
    pub info: NarInfo,
    /// `info.compression`, parsed.
    pub compression: Compression,
    /// `info.file_hash`, present.
    pub file_hash: Sha256,
}

impl Found {
    /// The file name the NAR is served under: `<filehash>.nar<ext>`.
    pub fn file_name(&self) -> String {
        format!(
            "{}.nar{}",
            self.file_hash.to_nix32(),
            self.compression.extension()
        )
    }

    /// The narinfo this cache serves for it: the upstream's, its URL in this cache, signed
    /// by the cache's managed key too when it has one.
    pub fn render(&self, cache: &CacheRow) -> String {
        let mut info = self.info.clone();
        info.url = format!(
            "upstream-nar/{}/{}",
            info.store_path.hash_part(),
            self.file_name()
        );
        if let Some(key) = managed_key(cache) {
            info.sign(key);
        }
        info.to_string()
    }
}

/// A path of a cache: (cache id, store path hash part).
type PathKey = (i64, String);
/// Entries by path, behind a lock.
type ByPath<V> = Mutex<HashMap<PathKey, V>>;

/// What pull-through keeps in memory: the HTTP client, remembered misses and narinfos,
/// upstreams backed off, and the fetches in progress.
pub struct Upstreams {
    http: reqwest::Client,
    misses: ByPath<Instant>,
    found: ByPath<(Instant, Arc<Found>)>,
    down: Mutex<HashMap<String, Instant>>,
    fetching: ByPath<Arc<tokio::sync::Mutex<()>>>,
}

impl Default for Upstreams {
    fn default() -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("larder/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Upstreams {
            http,
            misses: Mutex::default(),
            found: Mutex::default(),
            down: Mutex::default(),
            fetching: Mutex::default(),
        }
    }
}

/// Insert into a bounded map of timed entries: expired entries go first, and if it is still
/// full, everything (a burst of misses must not grow memory).
fn remember<V>(map: &ByPath<V>, key: PathKey, v: V, fresh: impl Fn(&V) -> bool) {
    if let Ok(mut m) = map.lock() {
        if m.len() >= MAX_REMEMBERED {
            m.retain(|_, v| fresh(v));
            if m.len() >= MAX_REMEMBERED {
                m.clear();
            }
        }
        m.insert(key, v);
    }
}

impl Upstreams {
    /// Forget what is remembered about `cache_id` (its upstreams or keys changed).
    pub fn forget_cache(&self, cache_id: i64) {
        if let Ok(mut m) = self.misses.lock() {
            m.retain(|k, _| k.0 != cache_id);
        }
        if let Ok(mut m) = self.found.lock() {
            m.retain(|k, _| k.0 != cache_id);
        }
    }

    fn is_down(&self, url: &str) -> bool {
        self.down
            .lock()
            .ok()
            .and_then(|m| m.get(url).copied())
            .is_some_and(|until| Instant::now() < until)
    }

    fn back_off(&self, url: &str) {
        if let Ok(mut m) = self.down.lock() {
            m.insert(url.to_owned(), Instant::now() + BACKOFF);
        }
    }

    fn came_back(&self, url: &str) {
        if let Ok(mut m) = self.down.lock() {
            m.remove(url);
        }
    }
}

/// What asking one upstream gave.
enum Answer {
    Found(Box<Found>),
    /// It does not have it (404, 403, 410).
    Miss,
    /// It has it, but unsigned by a trusted key, or in a form larder cannot store: not served.
    Refused,
    /// It could not answer: connection, timeout, another status.
    Failed,
}

/// The verified narinfo of `hash` from the first of `cache`'s upstreams that has it, or
/// `None`. Never an error: an upstream's failure is a miss here (logged, counted, backed off).
pub async fn narinfo(state: &AppState, cache: &CacheRow, hash: &str) -> Option<Arc<Found>> {
    if cache.upstreams.is_empty() {
        return None;
    }
    let up = &state.upstream;
    let key = (cache.id, hash.to_owned());
    let now = Instant::now();
    if let Some((at, found)) = up.found.lock().ok().and_then(|m| m.get(&key).cloned()) {
        if now.duration_since(at) < MISS_TTL {
            return Some(found);
        }
    }
    let missed = up.misses.lock().ok().and_then(|m| m.get(&key).copied());
    if missed.is_some_and(|at| now.duration_since(at) < MISS_TTL) {
        state.metrics.upstream_miss(cache.id);
        return None;
    }
    let keys = crate::publish::upstream_keys(state, cache);
    let deadline = now + NARINFO_BUDGET;
    let mut complete = true;
    for base in &cache.upstreams {
        if up.is_down(base) {
            continue;
        }
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            complete = false;
            break;
        };
        match ask(state, base, hash, &keys, left.min(NARINFO_TIMEOUT)).await {
            Answer::Found(found) => {
                up.came_back(base);
                let found: Arc<Found> = Arc::from(found);
                remember(
                    &up.found,
                    key,
                    (Instant::now(), found.clone()),
                    |(at, _)| at.elapsed() < MISS_TTL,
                );
                state.metrics.upstream_hit(cache.id);
                return Some(found);
            }
            Answer::Miss => up.came_back(base),
            Answer::Refused => {
                up.came_back(base);
                state.metrics.upstream_error(cache.id);
            }
            Answer::Failed => {
                state.metrics.upstream_error(cache.id);
                up.back_off(base);
            }
        }
    }
    if complete {
        remember(&up.misses, key, Instant::now(), |at| {
            at.elapsed() < MISS_TTL
        });
    }
    state.metrics.upstream_miss(cache.id);
    None
}

/// Ask one upstream for `hash`'s narinfo and check it.
async fn ask(
    state: &AppState,
    base: &str,
    hash: &str,
    keys: &[VerifyingKey],
    timeout: Duration,
) -> Answer {
    let url = format!("{base}/{hash}.narinfo");
    let resp = state.upstream.http.get(&url).timeout(timeout).send().await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(upstream = %base, error = %crate::error::error_chain(&e), "upstream unreachable; not asked again for {}s", BACKOFF.as_secs());
            return Answer::Failed;
        }
    };
    let status = resp.status();
    if matches!(status.as_u16(), 404 | 403 | 410) {
        return Answer::Miss;
    }
    if !status.is_success() {
        tracing::warn!(upstream = %base, %status, "upstream failed a narinfo request; not asked again for {}s", BACKOFF.as_secs());
        return Answer::Failed;
    }
    let body = match read_bounded(resp, MAX_NARINFO_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(upstream = %base, error = %e, "cannot read an upstream narinfo");
            return Answer::Failed;
        }
    };
    match check_narinfo(&body, hash, keys) {
        Ok((info, compression, file_hash)) => Answer::Found(Box::new(Found {
            upstream: base.to_owned(),
            info,
            compression,
            file_hash,
        })),
        Err(why) => {
            tracing::warn!(upstream = %base, path = %hash, "upstream narinfo not served: {why}");
            Answer::Refused
        }
    }
}

/// A response body of at most `limit` bytes.
async fn read_bounded(resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(block) = stream.next().await {
        let block = block.map_err(|e| e.to_string())?;
        if out.len() + block.len() > limit {
            return Err(format!("larger than {limit} bytes"));
        }
        out.extend_from_slice(&block);
    }
    Ok(out)
}

/// Parse an upstream narinfo for `hash` and check it may be served: its store path, a
/// signature by one of `keys`, a NAR larder can store, a relative URL.
fn check_narinfo(
    body: &[u8],
    hash: &str,
    keys: &[VerifyingKey],
) -> Result<(NarInfo, Compression, Sha256), String> {
    let text = std::str::from_utf8(body).map_err(|_| "not UTF-8".to_owned())?;
    let info = NarInfo::parse(text).map_err(|e| format!("invalid narinfo: {e}"))?;
    if info.store_path.hash_part() != hash {
        return Err(format!("it describes {}", info.store_path));
    }
    if !keys.iter().any(|k| info.verify(k)) {
        return Err("not signed by a trusted upstream key".into());
    }
    let compression = Compression::from_name(&info.compression)
        .ok_or_else(|| format!("compression {:?} cannot be stored", info.compression))?;
    let file_hash = info.file_hash.ok_or("no FileHash")?;
    if larder_nix::narinfo::url_problem(&info.url).is_some() || info.url.contains("://") {
        return Err(format!("URL {:?} is not relative", info.url));
    }
    if let Some(ca) = &info.ca {
        larder_nix::narinfo::check_ca(ca).map_err(|r| format!("invalid CA: {r}"))?;
    }
    Ok((info, compression, file_hash))
}

/// Holds one path's fetch: released when the fetch is over.
pub struct FetchTurn {
    _guard: tokio::sync::OwnedMutexGuard<()>,
    state: AppState,
    key: PathKey,
}

impl Drop for FetchTurn {
    fn drop(&mut self) {
        if let Ok(mut m) = self.state.upstream.fetching.lock() {
            m.remove(&self.key);
        }
    }
}

/// Wait for the turn to fetch `hash` into `cache`: a concurrent fetch of it finishes first
/// (and the caller then finds the path local).
pub async fn fetch_turn(state: &AppState, cache: &CacheRow, hash: &str) -> FetchTurn {
    let key = (cache.id, hash.to_owned());
    let lock = state
        .upstream
        .fetching
        .lock()
        .map(|mut m| m.entry(key.clone()).or_default().clone())
        .unwrap_or_default();
    FetchTurn {
        _guard: lock.lock_owned().await,
        state: state.clone(),
        key,
    }
}

/// Start fetching `found`'s NAR: once the upstream answered, a body that streams it to the
/// client while it is verified and stored (see the module documentation). `turn` is held
/// until the fetch ends, even if the client goes away (the NAR is still kept).
pub async fn fetch_nar(
    state: &AppState,
    cache: &CacheRow,
    found: Arc<Found>,
    turn: FetchTurn,
) -> Result<Body, ApiError> {
    let url = format!("{}/{}", found.upstream, found.info.url);
    let resp = tokio::time::timeout(NARINFO_TIMEOUT, state.upstream.http.get(&url).send()).await;
    let resp = match resp {
        Ok(Ok(r)) if r.status().is_success() => r,
        Ok(Ok(r)) if r.status() == reqwest::StatusCode::NOT_FOUND => {
            state.metrics.upstream_error(cache.id);
            return Err(ApiError::not_found("the upstream no longer has this NAR"));
        }
        other => {
            let why = match other {
                Ok(Ok(r)) => format!("status {}", r.status()),
                Ok(Err(e)) => crate::error::error_chain(&e),
                Err(_) => "timed out".to_owned(),
            };
            tracing::warn!(upstream = %found.upstream, "upstream NAR request failed: {why}");
            state.metrics.upstream_error(cache.id);
            state.upstream.back_off(&found.upstream);
            return Err(ApiError::Unavailable(
                std::io::Error::other("upstream unavailable").into(),
            ));
        }
    };
    let (to_client, client_rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
    let (to_ingest, ingest_rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
    let ingest_body = Body::from_stream(receiver_stream(ingest_rx));
    let st = state.clone();
    let limits = (st.config.max_upload_size, st.config.max_nar_size);
    let compression = found.compression;
    let ingesting = tokio::spawn(async move {
        crate::ingest::ingest(ingest_body, compression, limits.0, limits.1, &st.staging).await
    });
    let st = state.clone();
    let cache = cache.clone();
    tokio::spawn(async move {
        let _turn = turn;
        let mut upstream = resp.bytes_stream();
        let mut held: Option<Bytes> = None;
        let mut client = Some(to_client);
        let mut failure: Option<String> = None;
        loop {
            let block = match tokio::time::timeout(NAR_IDLE_TIMEOUT, upstream.next()).await {
                Ok(Some(Ok(b))) => b,
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    failure = Some(format!("download interrupted: {e}"));
                    break;
                }
                Err(_) => {
                    failure = Some("download stalled".into());
                    break;
                }
            };
            st.metrics.upstream_bytes(cache.id, block.len() as u64);
            if to_ingest.send(Ok(block.clone())).await.is_err() {
                break; // the pipeline refused it: reported below
            }
            if let Some(prev) = held.replace(block) {
                if let Some(tx) = &client {
                    if tx.send(Ok(prev)).await.is_err() {
                        client = None; // gone: keep storing for the next consumer
                    }
                }
            }
        }
        if let Some(f) = &failure {
            let _ = to_ingest.send(Err(std::io::Error::other(f.clone()))).await;
        }
        drop(to_ingest);
        let verdict = match ingesting.await {
            Ok(Ok(up)) if failure.is_none() => keep(&st, &cache, &found, up).await,
            Ok(Ok(_)) => Err(failure.unwrap_or_default()),
            Ok(Err(e)) => Err(failure.unwrap_or_else(|| e.to_string())),
            Err(e) => Err(e.to_string()),
        };
        match verdict {
            Ok(()) => {
                if let (Some(tx), Some(last)) = (&client, held) {
                    let _ = tx.send(Ok(last)).await;
                }
            }
            Err(why) => {
                st.metrics.upstream_error(cache.id);
                tracing::warn!(upstream = %found.upstream, path = %found.info.store_path, "upstream NAR refused, not kept: {why}");
                if let Some(tx) = &client {
                    let _ = tx
                        .send(Err(std::io::Error::other(
                            "upstream NAR failed verification",
                        )))
                        .await;
                }
            }
        }
    });
    Ok(Body::from_stream(receiver_stream(client_rx)))
}

fn receiver_stream<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

/// Check what the pipeline measured against the verified narinfo, then store and publish the
/// path. An error is why the NAR was refused (nothing kept).
async fn keep(
    state: &AppState,
    cache: &CacheRow,
    found: &Found,
    up: crate::ingest::Ingested,
) -> Result<(), String> {
    let info = &found.info;
    if up.file_hash != found.file_hash {
        return Err(format!(
            "FileHash {} instead of {}",
            up.file_hash, found.file_hash
        ));
    }
    if info.file_size.is_some_and(|s| s != up.file_size) {
        return Err(format!(
            "FileSize {} instead of {:?}",
            up.file_size, info.file_size
        ));
    }
    if up.nar_hash != info.nar_hash || up.nar_size != info.nar_size {
        return Err(format!(
            "NarHash {} ({} bytes) instead of {} ({} bytes)",
            up.nar_hash, up.nar_size, info.nar_hash, info.nar_size
        ));
    }
    // Verified: from here on a failure only means the next consumer fetches it again.
    let path = PathInfo {
        store_path: info.store_path.clone(),
        nar_hash: info.nar_hash,
        nar_size: info.nar_size,
        references: info.references.clone(),
        deriver: info.deriver.clone(),
        ca: info.ca.clone(),
        sigs: info.sigs.clone(),
        upstream: Vec::new(),
    };
    let file_size = up.file_size;
    let stored = async {
        let (upload_id, nar) = crate::publish::store_upload(state, cache, None, up).await?;
        crate::publish::publish_fetched(state, cache, path, &nar, &upload_id, &found.upstream)
            .await?;
        // The client's download: a use of the path, counted in the cache's downloads.
        state.retention.usage.nar(cache.id, nar.id, Some(file_size));
        Ok::<_, ApiError>(())
    };
    if let Err(e) = stored.await {
        tracing::warn!(path = %info.store_path, error = %crate::error::error_chain(&e), "a verified upstream NAR could not be kept");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls_are_http_with_a_host_and_nothing_else() {
        assert_eq!(
            check_url("https://cache.nixos.org/").unwrap(),
            "https://cache.nixos.org"
        );
        assert_eq!(
            check_url("http://10.0.0.1:8080/c").unwrap(),
            "http://10.0.0.1:8080/c"
        );
        for bad in [
            "file:///nix/cache",
            "s3://bucket",
            "https://u:p@host/",
            "https://host/?x=1",
            "https://host/#f",
            "cache.nixos.org",
            "",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }
}
