//! Storing uploads and publishing store paths: the integrity rules of every upload path.
//!
//! 1. [`store_upload`]: a verified [`Ingested`] NAR becomes a pending upload of a cache, its
//!    chunks stored once across caches ([`crate::chunked`]); an identical NAR (same NarHash)
//!    already in the cache is reused as it is.
//! 2. [`publish`]: a path's metadata is checked against the NAR the *server* measured
//!    (NarHash, NarSize), its signature checked (client-signed caches) or made (managed
//!    caches), and the path published atomically with its references checked present.
//!
//! The server never trusts a client's NarHash, NarSize, FileHash or FileSize.

use larder_nix::hash::Sha256;
use larder_nix::narinfo::NarInfo;
use larder_nix::signing::{Signature, SigningKey, VerifyingKey};
use larder_nix::store_path::StorePath;
use larder_store::meta::{
    CacheRow, Engine, HeldLock, LockName, NarRow, NewPath, PathRow, Publish, SigningMode,
};

use crate::error::{ApiError, Rejection};
use crate::ingest::{truncate, Ingested};
use crate::AppState;

pub(crate) fn random_id() -> Result<String, ApiError> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(|e| ApiError::internal(std::io::Error::other(e)))?;
    Ok(hex::encode(b))
}

/// Make a verified NAR a pending upload of `cache`, under `key` (the file name Nix's uploader
/// used) if given, storing its chunks ([`crate::chunked::store_nar`]). Returns the upload id
/// and the stored NAR.
pub async fn store_upload(
    state: &AppState,
    cache: &CacheRow,
    key: Option<&str>,
    up: Ingested,
) -> Result<(String, NarRow), ApiError> {
    let upload_id = random_id()?;
    let measured = crate::chunked::Measured {
        nar_hash: up.nar_hash,
        nar_size: up.nar_size,
    };
    let nar =
        crate::chunked::store_nar(state, cache, &upload_id, key, measured, up.chunked).await?;
    store_listing(state, &nar, &up.listing).await;
    Ok((upload_id, nar))
}

/// NARs smaller than this (and those of a batch, at most this) do not have their `.ls`
/// listing stored when they arrive: it is made from the NAR when first asked for
/// (`binary_cache::make_listing`), a read of at most this much. Storing it was an object and an `fsync` per path, a third of the server's time for
/// pushes of many small paths, for a file few clients ever ask for.
pub const UNLISTED_NAR: u64 = 256 << 10;

/// Store a NAR's `.ls` listing (written while the NAR was verified) next to it, unless the NAR
/// is smaller than [`UNLISTED_NAR`]. A failure only costs time later: a listing found missing
/// is made again when first asked for.
pub async fn store_listing(state: &AppState, nar: &NarRow, listing: &crate::ingest::Listing) {
    if (nar.nar_size as u64) < UNLISTED_NAR {
        return;
    }
    if let Err(e) = put_listing(state, &nar.nar_hash, listing).await {
        tracing::warn!(error = %crate::error::error_chain(&e), "cannot store a NAR listing; it is made again when asked for");
    }
}

/// Store `listing` as the listing of the NAR `nar_hash` (made durable, as every object).
pub async fn put_listing(
    state: &AppState,
    nar_hash: &larder_nix::hash::Sha256,
    listing: &crate::ingest::Listing,
) -> Result<(), larder_store::objects::ObjectError> {
    let key = larder_store::meta::listing_object_key(nar_hash);
    match listing {
        crate::ingest::Listing::Memory(bytes) => state.objects.put_bytes(&key, bytes).await,
        crate::ingest::Listing::File(path) => state.objects.put_file(&key, path).await,
    }
}

/// A store path's metadata as a client declares it, already parsed and validated.
#[derive(Debug, Clone)]
pub struct PathInfo {
    pub store_path: StorePath,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub ca: Option<String>,
    pub sigs: Vec<Signature>,
    /// Signed metadata of references that are not in the cache but upstream.
    pub upstream: Vec<UpstreamRef>,
}

/// A reference available from an upstream cache, as the pushing client describes it.
#[derive(Debug, Clone)]
pub struct UpstreamRef {
    pub store_path: StorePath,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    pub references: Vec<StorePath>,
    pub sigs: Vec<Signature>,
}

/// The keys whose signature marks a path as available upstream for `cache`: the server's
/// `upstream_keys` and the cache's own. The same keys decide what a pull-through fetch from
/// the cache's `upstreams` may serve ([`crate::upstream`]).
pub(crate) fn upstream_keys(state: &AppState, cache: &CacheRow) -> Vec<VerifyingKey> {
    let mut keys = state.config.upstream_keys.clone();
    keys.extend(cache.upstream_keys.iter().cloned());
    keys
}

/// The references of `info` whose upstream metadata carries a valid signature by a key in
/// `keys`.
fn verified_upstream(info: &PathInfo, keys: &[VerifyingKey]) -> Vec<StorePath> {
    info.upstream
        .iter()
        .filter(|u| info.references.contains(&u.store_path))
        .filter(|u| {
            let fp = larder_nix::signing::fingerprint(
                &u.store_path,
                &u.nar_hash,
                u.nar_size,
                &u.references,
            );
            u.sigs.iter().any(|s| keys.iter().any(|k| k.verify(&fp, s)))
        })
        .map(|u| u.store_path.clone())
        .collect()
}

/// The managed signing key of a cache, if it has one.
pub fn managed_key(cache: &CacheRow) -> Option<&SigningKey> {
    match (cache.signing_mode, &cache.secret_key) {
        (SigningMode::Managed, Some(sk)) => Some(&sk.0),
        _ => None,
    }
}

/// Check `info` against the measured `nar`, sign, and publish it in `cache`.
pub async fn publish(
    state: &AppState,
    cache: &CacheRow,
    info: PathInfo,
    nar: &NarRow,
    upload_id: &str,
) -> Result<Publish, ApiError> {
    publish_from(state, cache, info, nar, upload_id, None).await
}

/// Publish a path fetched from the upstream `upstream` (pull-through, see
/// [`crate::upstream`]): `info` is the upstream's narinfo, whose signature by a trusted
/// upstream key was checked before it was served. Checked against the measured `nar` like
/// any upload; its signatures are kept, the cache's own added when the server signs for it
/// (a client-signed cache cannot sign it, and needs none: consumers trust the upstream key);
/// its references may all be missing from the cache (the upstream has them, and they are
/// fetched when asked for); it is marked as from upstream.
pub async fn publish_fetched(
    state: &AppState,
    cache: &CacheRow,
    info: PathInfo,
    nar: &NarRow,
    upload_id: &str,
    upstream: &str,
) -> Result<Publish, ApiError> {
    publish_from(state, cache, info, nar, upload_id, Some(upstream)).await
}

/// [`publish`], or [`publish_fetched`] from `upstream`.
async fn publish_from(
    state: &AppState,
    cache: &CacheRow,
    info: PathInfo,
    nar: &NarRow,
    upload_id: &str,
    upstream: Option<&str>,
) -> Result<Publish, ApiError> {
    let new = checked_path(state, cache, &info, nar, upstream)?;
    let outcome = state.meta.publish_path(&new, upload_id).await?;
    answer(state, cache, &info.store_path, nar, outcome)
}

/// Check `info` against the measured `nar` and sign it (or check its signature) for `cache`:
/// the path to record, from `upstream` if given (pull-through).
pub(crate) fn checked_path(
    state: &AppState,
    cache: &CacheRow,
    info: &PathInfo,
    nar: &NarRow,
    upstream: Option<&str>,
) -> Result<NewPath, ApiError> {
    if info.nar_hash != nar.nar_hash {
        return Err(ApiError::rejected(
            Rejection::NarHashMismatch,
            format!(
                "NarHash mismatch for {}: declared {}, but the uploaded NAR hashes to {}",
                info.store_path, info.nar_hash, nar.nar_hash
            ),
        ));
    }
    if info.nar_size != nar.nar_size as u64 {
        return Err(ApiError::rejected(
            Rejection::NarSizeMismatch,
            format!(
                "NarSize mismatch for {}: declared {}, but the uploaded NAR has {} bytes",
                info.store_path, info.nar_size, nar.nar_size
            ),
        ));
    }
    if let Some(ca) = &info.ca {
        // Exactly as Nix parses it: a narinfo Nix cannot read would be signed and served.
        larder_nix::narinfo::check_ca(ca).map_err(|reason| {
            ApiError::bad(format!("invalid CA field {:?}: {reason}", truncate(ca)))
        })?;
    }
    let fingerprint = larder_nix::signing::fingerprint(
        &info.store_path,
        &info.nar_hash,
        info.nar_size,
        &info.references,
    );
    let mut sigs: Vec<Signature> = Vec::new();
    match managed_key(cache) {
        Some(key) => {
            // Our own signature replaces any that claims our key's name.
            for s in &info.sigs {
                if s.key_name() != key.name() && !sigs.contains(s) {
                    sigs.push(s.clone());
                }
            }
            sigs.push(key.sign(&fingerprint));
        }
        None if upstream.is_some() => {
            for s in &info.sigs {
                if !sigs.contains(s) {
                    sigs.push(s.clone());
                }
            }
        }
        None => {
            let pk = cache.public_key.as_ref().ok_or_else(|| {
                ApiError::Conflict(format!(
                    "cache {:?} has no signing key registered (hint: larder generate-keypair {})",
                    cache.name, cache.name
                ))
            })?;
            if !info.sigs.iter().any(|s| pk.verify(&fingerprint, s)) {
                return Err(ApiError::rejected(
                    Rejection::BadSignature,
                    format!(
                        "{} must be signed by the cache's key {} (hint: set LARDER_SIGNING_KEY)",
                        info.store_path,
                        pk.name()
                    ),
                ));
            }
            for s in &info.sigs {
                if !sigs.contains(s) {
                    sigs.push(s.clone());
                }
            }
        }
    }
    Ok(NewPath {
        cache_id: cache.id,
        store_path: info.store_path.clone(),
        refs: info.references.clone(),
        deriver: info.deriver.clone(),
        ca: info.ca.clone(),
        sigs,
        nar_id: nar.id,
        upstream_refs: match upstream {
            Some(_) => info.references.clone(),
            None => verified_upstream(info, &upstream_keys(state, cache)),
        },
        upstream: upstream.map(str::to_owned),
    })
}

/// What the publication of `store_path` with `nar` in `cache` answers: a conflict or missing
/// references are errors; a path created counts towards the cache's limit.
pub(crate) fn answer(
    state: &AppState,
    cache: &CacheRow,
    store_path: &StorePath,
    nar: &NarRow,
    outcome: Publish,
) -> Result<Publish, ApiError> {
    match outcome {
        Publish::Conflict { existing_nar_hash } => Err(ApiError::Conflict(format!(
            "{} is already in cache {:?} with different content (NarHash {}); \
             an existing path is never overwritten",
            store_path, cache.name, existing_nar_hash
        ))),
        Publish::MissingReferences(missing) => Err(ApiError::rejected(
            Rejection::MissingReferences,
            format!(
                "{} references {} path(s) not in cache {:?} (push references first): {}",
                store_path,
                missing.len(),
                cache.name,
                missing
                    .iter()
                    .take(5)
                    .map(StorePath::basename)
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        )),
        Publish::Created => {
            // A narinfo this server remembers for the path is of an earlier row, unpublished
            // meanwhile by another process (`larder fsck --repair`) or replica: the new one is
            // served from now on, not after the remembered one's 5 s.
            state.hot.forget_narinfo(cache.id, &store_path.hash_part());
            crate::retention::after_publish(state, cache, nar.file_size);
            Ok(Publish::Created)
        }
        ok => Ok(ok),
    }
}

/// The narinfo of a published path, as served.
pub fn render_narinfo(path: &PathRow) -> String {
    let nar = &path.nar;
    let info = NarInfo {
        store_path: path.store_path.clone(),
        url: format!(
            "nar/{}.nar{}",
            nar.file_hash.to_nix32(),
            nar.compression.extension()
        ),
        compression: nar.compression.as_str().to_owned(),
        file_hash: Some(nar.file_hash),
        file_size: Some(nar.file_size as u64),
        nar_hash: nar.nar_hash,
        nar_size: nar.nar_size as u64,
        references: path.refs.clone(),
        deriver: path.deriver.clone(),
        sigs: path.sigs.clone(),
        ca: path.ca.clone(),
    };
    info.to_string()
}

/// Delete what nothing refers to any more: expired pending uploads, their NARs, NARs of paths
/// evicted longer than the grace period ago, and the chunks' objects (see
/// `Metadata::collect_garbage`). Returns how many objects were deleted.
///
/// Safe to run on several replicas at once (its transactions serialise on the rows); the
/// periodic run happens on one replica at a time ([`gc_loop`]).
pub async fn collect_garbage(state: &AppState) -> Result<usize, ApiError> {
    let ttl = crate::config::PENDING_UPLOAD_TTL.as_secs() as i64;
    let grace = state.config.evicted_nar_grace.as_secs() as i64;
    let delete = |key| state.objects.delete_boxed(key);
    // A chunk's claim lives as long as a pending upload: what is claimed is recorded within
    // that time or is garbage.
    let deleted = state.meta.collect_garbage(ttl, grace, ttl, &delete).await?;
    crate::chunked::compact_packs(state).await?;
    Ok(deleted)
}

/// Delete the objects that no metadata names, last modified longer than `orphan_grace` ago
/// (see `larder_store::orphans`), and log what was done. Whether the scan is over until the
/// next interval: false when a backend failed, so that it runs again at the next tick.
async fn remove_orphans(state: &AppState) -> bool {
    let Some(cutoff) = std::time::SystemTime::now().checked_sub(state.config.orphan_grace) else {
        return true;
    };
    match larder_store::orphans::remove_orphans(&state.meta, &state.objects, cutoff).await {
        Ok(r) => {
            state.metrics.orphans_deleted(r.deleted);
            // Like garbage collection, a scan that found nothing is not news.
            if r.deleted == 0 {
                tracing::debug!(
                    objects = r.objects,
                    chunks = r.chunks,
                    "orphan scan: nothing to delete"
                );
            } else {
                tracing::info!(
                    objects = r.objects,
                    chunks = r.chunks,
                    unknown = r.unknown,
                    deleted = r.deleted,
                    deleted_bytes = r.deleted_bytes,
                    "orphan scan: deleted {} orphaned objects",
                    r.deleted
                );
            }
            true
        }
        Err(e @ larder_store::orphans::OrphanError::MostlyUnknown { .. }) => {
            tracing::warn!(error = %e, "orphan scan refused");
            true
        }
        Err(e) => {
            tracing::warn!(error = %crate::error::error_chain(&e), "orphan scan failed; retrying at the next tick");
            false
        }
    }
}

/// The periodic background work, every `gc_interval`: on every replica, the cleanup of its
/// staging directory (what stopped servers left, [`crate::staging::Staging::sweep`], and
/// expired multi-part uploads); on the one replica holding the background lock, eviction in every
/// cache with a limit, garbage collection, and every `orphan_scan_interval` the orphan scan.
/// The lock is a PostgreSQL session lock, so when its holder dies another replica takes it at
/// its next tick (SQLite: always this process).
pub(crate) async fn gc_loop(state: AppState) {
    let mut interval = tokio::time::interval(state.config.gc_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lease: Option<HeldLock> = None;
    let mut last_orphan_scan: Option<std::time::Instant> = None;
    let mut orphan_scan: Option<tokio::task::JoinHandle<bool>> = None;
    loop {
        interval.tick().await;
        // At start (the first tick is immediate) and after: what killed servers left.
        let staging = state.staging.clone();
        match tokio::task::spawn_blocking(move || staging.sweep()).await {
            Ok(0) | Err(_) => {}
            Ok(n) => tracing::info!(files = n, "removed staging files left by a stopped server"),
        }
        remove_stale_multipart(&state).await;
        if !hold_background_lock(&state, &mut lease).await {
            continue;
        }
        if let Err(e) = crate::retention::evict_all(&state).await {
            tracing::warn!(error = %e, "eviction failed");
        }
        match collect_garbage(&state).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(objects = n, "garbage collected"),
            Err(e) => tracing::warn!(error = %e, "garbage collection failed"),
        }
        // The first scan runs when this replica first holds the lock, so a replica restarted
        // more often than the interval still scans. It runs beside the loop: listing a large
        // bucket takes minutes, and eviction and garbage collection must not wait for it.
        if let Some(every) = state.config.orphan_scan_interval {
            if let Some(scan) = orphan_scan.take_if(|t| t.is_finished()) {
                // false (or a panic): run it again at the next tick.
                if matches!(scan.await, Ok(true)) {
                    last_orphan_scan = Some(std::time::Instant::now());
                }
            }
            if orphan_scan.is_none() && last_orphan_scan.is_none_or(|t| t.elapsed() >= every) {
                let state = state.clone();
                orphan_scan = Some(tokio::spawn(async move { remove_orphans(&state).await }));
            }
        }
    }
}

/// Keep the background lock, or take it if it is free: whether this replica holds it.
async fn hold_background_lock(state: &AppState, lease: &mut Option<HeldLock>) -> bool {
    use std::sync::atomic::Ordering;
    if let Some(held) = lease {
        if held.alive().await {
            return true;
        }
        tracing::warn!("lost the background-work lock (database session ended); retrying");
        *lease = None;
        state.background.store(false, Ordering::SeqCst);
    }
    match state.meta.try_lock(LockName::Background).await {
        Ok(Some(held)) => {
            if state.meta.engine() == Engine::Postgres {
                tracing::info!(
                    "this replica runs the background work (eviction, garbage collection)"
                );
            }
            *lease = Some(held);
            state.background.store(true, Ordering::SeqCst);
            true
        }
        Ok(None) => {
            tracing::debug!("another replica runs the background work");
            false
        }
        Err(e) => {
            tracing::warn!(error = %crate::error::error_chain(&e), "cannot take the background-work lock");
            false
        }
    }
}

/// Delete multi-part uploads idle for `multipart_idle_ttl` (nothing written in them): those
/// counted against the bounds are deleted as they are counted (`api::multipart::scan`); this
/// removes those of caches nobody uploads to any more.
async fn remove_stale_multipart(state: &AppState) {
    let root = state.staging.dir().to_owned();
    let ttl = state.config.multipart_idle_ttl;
    let _ =
        tokio::task::spawn_blocking(move || crate::api::multipart::scan(&root, ttl, None)).await;
}
