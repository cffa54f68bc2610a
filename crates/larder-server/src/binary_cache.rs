//! The Nix binary cache protocol, per cache under `/<cache>/`: what Nix's `http://`
//! substituter reads (`nix-cache-info`, `<hash>.narinfo`, `nar/<file>`, `<hash>.ls`,
//! `log/<drv>`) and what Nix's own uploader (`nix copy --to http://…`) writes with `PUT`.
//! See Nix's src/libstore/http-binary-cache-store.cc and binary-cache-store.cc.
//!
//! Read access: public caches are open to anyone; private caches answer 401 to anonymous
//! requests and 403 to tokens without `pull`, before looking at the requested path, so the
//! answer never reveals whether a path exists. `nix-cache-info` is always readable (Nix gives
//! up on a substituter whose `nix-cache-info` fails).

use std::ops::Range;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{StreamExt, TryStreamExt};
use larder_nix::cache_info::CacheInfo;
use larder_nix::narinfo::NarInfo;
use larder_nix::store_path::{validate_hash_part, StorePath};
use larder_store::meta::{ChunkRow, NarRow};

use crate::access::{CacheAccess, Pull, Push};
use crate::auth::{principal, Perm};
use crate::cache_lookup::find_cache;
use crate::config::NarRedirect;
use crate::error::ApiError;
use crate::ingest::{ingest, parse_nar_file_name, truncate};
use crate::publish::{publish, render_narinfo, store_upload, PathInfo};
use crate::routes::Routes;
use crate::AppState;

/// Largest narinfo accepted by `PUT` (thousands of references fit easily).
const MAX_NARINFO_BYTES: usize = 4 << 20;
/// Largest build log accepted by `PUT`.
const MAX_LOG_BYTES: u64 = 256 << 20;

pub fn routes() -> Routes {
    Routes::new()
        .get("/{cache}/nix-cache-info", get_cache_info)
        .put("/{cache}/nix-cache-info", put_cache_info)
        .get("/{cache}/{file}", get_file)
        .put("/{cache}/{file}", put_narinfo)
        .get("/{cache}/nar/{file}", get_nar)
        .get("/{cache}/upstream-nar/{hash}/{file}", get_upstream_nar)
        .put("/{cache}/nar/{file}", put_nar)
        .get("/{cache}/log/{drv}", get_log)
        .put("/{cache}/log/{drv}", put_log)
}

/// `nix-cache-info` stays readable to everyone, as Nix needs it before it sends a request that
/// may carry credentials. Who may not pull the cache gets the same answer for a private cache
/// as for a name no cache has (the default priority), so it tells them nothing; only a token
/// that covers every cache is told 404 for a missing one.
async fn get_cache_info(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let cache = find_cache(&state, &name).await?;
    let may_pull = || async {
        principal(&state, &headers)
            .await
            .is_ok_and(|p| p.require(Perm::Pull, &name).is_ok())
    };
    let priority = match &cache {
        Some(c) if !c.private || may_pull().await => c.priority,
        None if may_pull().await => {
            return Err(ApiError::not_found(format!("no cache named {name:?}")))
        }
        _ => crate::config::DEFAULT_PRIORITY,
    };
    let info = CacheInfo {
        store_dir: larder_nix::store_path::STORE_DIR.to_owned(),
        want_mass_query: true,
        priority: Some(priority.clamp(0, u32::MAX as i64) as u32),
    };
    Ok((
        [(header::CONTENT_TYPE, "text/x-nix-cache-info")],
        info.to_string(),
    )
        .into_response())
}

/// Nix's uploader writes `nix-cache-info` when it initialises a cache: accepted (from a
/// pusher) and ignored, since the server owns it.
async fn put_cache_info(
    State(_state): State<AppState>,
    Path(_name): Path<String>,
    _: CacheAccess<Push>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let _ = axum::body::to_bytes(body, 64 * 1024).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Split `<hash>.<ext>` and validate the hash part.
fn hash_file<'a>(file: &'a str, ext: &str) -> Result<Option<&'a str>, ApiError> {
    let Some(hash) = file.strip_suffix(ext) else {
        return Ok(None);
    };
    validate_hash_part(hash)
        .map_err(|_| ApiError::bad(format!("invalid store path hash {:?}", truncate(hash))))?;
    Ok(Some(hash))
}

async fn get_file(
    State(state): State<AppState>,
    method: Method,
    Path((_name, file)): Path<(String, String)>,
    CacheAccess { cache, .. }: CacheAccess<Pull>,
) -> Result<Response, ApiError> {
    if let Some(hash) = hash_file(&file, ".narinfo")? {
        use crate::hot::Remembered;
        let remembered = match state.hot.narinfo(cache.id, hash) {
            Remembered::Fresh(text) => Some(text),
            Remembered::Stale(hot) => {
                let generation = state.hot.narinfo_generation();
                let same = state.meta.path_id(cache.id, hash).await? == Some(hot.path_id);
                same.then(|| {
                    let text = hot.text.clone();
                    state.hot.put_narinfo(cache.id, hash, hot, generation);
                    text
                })
            }
            Remembered::Absent => None,
        };
        let text = match remembered {
            Some(text) => text,
            None => match read_narinfo(&state, &method, &cache, hash).await? {
                Ok(text) => text,
                Err(pulled) => return Ok(pulled),
            },
        };
        let served = (method != Method::HEAD).then_some(text.len());
        state.retention.usage.narinfo(cache.id, hash, served);
        let body = Body::from(bytes::Bytes::from_owner(ArcStr(text)));
        return Ok(([(header::CONTENT_TYPE, "text/x-nix-narinfo")], body).into_response());
    }
    if let Some(hash) = hash_file(&file, ".ls")? {
        let path = state
            .meta
            .get_path(cache.id, hash)
            .await?
            .ok_or_else(|| ApiError::not_found("no such path in this cache"))?;
        return serve_listing(&state, &path.nar).await;
    }
    Err(ApiError::not_found(format!(
        "no such file {:?}",
        truncate(&file)
    )))
}

/// A narinfo read from the database and rendered, remembered in the hot cache; or, for a path
/// the cache does not publish, the whole answer (`Err`): what an upstream serves (pull-through)
/// or a 404.
async fn read_narinfo(
    state: &AppState,
    method: &Method,
    cache: &larder_store::meta::CacheRow,
    hash: &str,
) -> Result<Result<std::sync::Arc<str>, Response>, ApiError> {
    let generation = state.hot.narinfo_generation();
    let Some(path) = state.meta.get_path(cache.id, hash).await? else {
        // Pull-through: asked only after the local lookup, so a path pushed since an
        // upstream miss was remembered is found.
        return match crate::upstream::narinfo(state, cache, hash).await {
            Some(found) => {
                let text = found.render(cache);
                // Counted in the cache's downloads like any narinfo served.
                let served = (method != Method::HEAD).then_some(text.len());
                state.retention.usage.narinfo(cache.id, hash, served);
                Ok(Err(
                    ([(header::CONTENT_TYPE, "text/x-nix-narinfo")], text).into_response()
                ))
            }
            None => Err(ApiError::not_found("no such path in this cache")),
        };
    };
    let text: std::sync::Arc<str> = render_narinfo(&path).into();
    let hot = crate::hot::HotNarinfo {
        path_id: path.id,
        text: text.clone(),
    };
    state.hot.put_narinfo(cache.id, hash, hot, generation);
    if method != Method::HEAD {
        warm_spans(state, &path.nar);
    }
    Ok(Ok(text))
}

/// Shares a cached narinfo with the response body without copying it.
struct ArcStr(std::sync::Arc<str>);

impl AsRef<[u8]> for ArcStr {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// Serve a NAR's `.ls` listing: the object stored with the NAR, streamed. A NAR stored
/// before listings were kept (or whose listing was lost) gets its listing made once
/// ([`make_listing`]); no request parses a NAR that already has one, so `.ls` costs the
/// same as any small download, however large or deeply compressed the NAR.
async fn serve_listing(state: &AppState, nar: &NarRow) -> Result<Response, ApiError> {
    let key = larder_store::meta::listing_object_key(&nar.nar_hash);
    let obj = match state.objects.get(&key, None).await {
        Err(larder_store::ObjectError::NotFound(_)) => {
            make_listing(state, nar).await?;
            state.objects.get(&key, None).await?
        }
        other => other?,
    };
    let mut resp = Response::new(Body::from_stream(obj.stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(obj.len));
    Ok(resp)
}

/// Listings made from stored NARs one at a time per server: each costs a decompression and a
/// parse of the whole NAR, and must not be a way to keep the CPUs busy.
static LISTING_BUILDS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// Make a stored NAR's `.ls` listing by streaming, decompressing and parsing its stored file
/// (a long listing goes to a staging file: memory does not grow with the NAR), and store it.
async fn make_listing(state: &AppState, nar: &NarRow) -> Result<(), ApiError> {
    let key = larder_store::meta::listing_object_key(&nar.nar_hash);
    let _turn = LISTING_BUILDS
        .acquire()
        .await
        .map_err(|e| ApiError::internal(std::io::Error::other(e)))?;
    // Made by the request before this one.
    if state.objects.exists(&key).await? {
        return Ok(());
    }
    let compression = nar.compression;
    let chunks = state.meta.nar_chunks(nar.id).await?;
    let body = chunk_stream(state, &chunks, 0..nar.file_size as u64).await?;
    let listing = crate::ingest::ListingWriter::new(&state.staging);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
    let worker = tokio::task::spawn_blocking(move || {
        crate::ingest::list_stored(&mut rx, compression, listing)
    });
    let mut body = body;
    while let Some(block) = body.next().await {
        let block = block.map_err(ApiError::internal)?;
        if tx.send(block).await.is_err() {
            break;
        }
    }
    drop(tx);
    let listing = worker
        .await
        .map_err(|e| ApiError::internal(std::io::Error::other(e)))??;
    crate::publish::put_listing(state, &nar.nar_hash, &listing).await?;
    Ok(())
}

/// The body of `range` of a small NAR file (at most [`SMALL_NAR`]) stored as one range of one
/// object (`span`: an object of its own, or a run of chunks stored together in a pack): read
/// whole (one read, no stream: most NARs are a few KiB) and kept in the hot cache's small
/// files. A missing object is `ApiError::NotFound`, decided before any byte is sent.
async fn small_body(
    state: &AppState,
    file_hash: &larder_nix::hash::Sha256,
    (key, span): (&str, Range<u64>),
    range: Range<u64>,
) -> Result<Body, ApiError> {
    let not_found = |e| match e {
        larder_store::ObjectError::NotFound(k) => ApiError::NotFound(k),
        e => e.into(),
    };
    let len = span.end - span.start;
    // By the file's hash: the bytes of a NAR file, wherever they are stored.
    let cached = file_hash.to_nix32();
    let bytes = match state.hot.small_file(&cached) {
        Some(bytes) => bytes,
        None => {
            // An object that is exactly the file (a NAR's own pack, a chunk of its own) is
            // read on this thread; a piece of a larger one in a read.
            let whole = match span.start {
                0 => state
                    .objects
                    .get_small(key, SMALL_NAR)
                    .await
                    .map_err(not_found)?,
                _ => None,
            };
            let bytes = match whole {
                Some(b) if b.len() as u64 == len => b,
                Some(b) if b.len() as u64 > len => b.slice(..len as usize),
                _ => state
                    .objects
                    .read_range(key, span.clone())
                    .await
                    .map_err(not_found)?,
            };
            state.hot.put_small_file(&cached, bytes.clone());
            bytes
        }
    };
    let end = (range.end as usize).min(bytes.len());
    let start = (range.start as usize).min(end);
    Ok(Body::from(bytes.slice(start..end)))
}

/// Read the object ranges of the NAR file a narinfo just named into memory, in the background:
/// Nix fetches a closure's narinfos before its NARs, so the downloads then find them there
/// rather than each reading its chunk list (serially, as far as Nix's copy follows
/// references). Only for files larger than [`SMALL_NAR`] (a small file is one range, read
/// whole and kept by its hash), and not when they are in memory already.
fn warm_spans(state: &AppState, nar: &larder_store::meta::NarRow) {
    if nar.file_size as u64 <= SMALL_NAR || state.hot.spans(&nar.file_hash).is_some() {
        return;
    }
    let (state, nar) = (state.clone(), nar.clone());
    tokio::spawn(async move {
        // A failure is the download's to report, when it reads them itself.
        if let Ok(chunks) = state.meta.nar_chunks(nar.id).await {
            file_spans(&state, &nar, &chunks);
        }
    });
}

/// The object ranges of `nar`'s file, from its chunks; remembered by its FileHash when they
/// cover the whole file (a NAR collected meanwhile has no chunks left).
fn file_spans(
    state: &AppState,
    nar: &larder_store::meta::NarRow,
    chunks: &[larder_store::meta::ChunkRow],
) -> Arc<crate::hot::Spans> {
    let len = nar.file_size as u64;
    let spans = Arc::new(crate::chunked_nar::spans(chunks, 0..len));
    let covered: u64 = spans.iter().map(|(_, r)| r.end - r.start).sum();
    if covered == len {
        state.hot.put_spans(&nar.file_hash, spans.clone());
    }
    spans
}

/// NAR files up to this size are read whole rather than streamed.
const SMALL_NAR: u64 = 64 << 10;

/// Stream `range` of the file made of `chunks`, object range after object range. The first
/// object is opened before this returns.
async fn chunk_stream(
    state: &AppState,
    chunks: &[ChunkRow],
    range: Range<u64>,
) -> Result<futures::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>, ApiError> {
    let mut spans = crate::chunked_nar::spans(chunks, range).into_iter();
    let Some((key, r)) = spans.next() else {
        return Ok(futures::stream::empty().boxed());
    };
    let first = match state.objects.get(&key, Some(r)).await {
        Ok(body) => body.stream,
        Err(larder_store::ObjectError::NotFound(k)) => return Err(ApiError::NotFound(k)),
        Err(e) => return Err(e.into()),
    };
    let objects = state.objects.clone();
    let rest = futures::stream::iter(spans)
        .then(move |(key, r)| {
            let objects = objects.clone();
            async move {
                objects
                    .get(&key, Some(r))
                    .await
                    .map(|b| b.stream)
                    .map_err(std::io::Error::other)
            }
        })
        .try_flatten();
    Ok(first.chain(rest).boxed())
}

/// A byte position of a `Range` header: digits only; a number too large for 64 bits is past
/// any end, so it counts as the largest (RFC 9110: a last position beyond the end means the
/// end).
fn position(digits: &str) -> Result<u64, ()> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(());
    }
    Ok(digits.parse().unwrap_or(u64::MAX))
}

/// Parse a single `Range: bytes=…` against `len`. `Ok(None)`: serve everything.
fn parse_range(headers: &HeaderMap, len: u64) -> Result<Option<Range<u64>>, ()> {
    let Some(v) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None); // multiple ranges: serve the whole file, which is allowed
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n = position(b)?;
        if n == 0 {
            return Err(());
        }
        len.saturating_sub(n)..len
    } else {
        let start = position(a)?;
        let end = if b.is_empty() {
            len
        } else {
            position(b)?.saturating_add(1).min(len)
        };
        if start >= len || start >= end {
            return Err(());
        }
        start..end
    };
    Ok(Some(range))
}

async fn get_nar(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    Path((_name, file)): Path<(String, String)>,
    CacheAccess { cache, .. }: CacheAccess<Pull>,
) -> Result<Response, ApiError> {
    let (file_hash, compression) = parse_nar_file_name(&file)?;
    serve_nar(&state, &method, &headers, &cache, &file_hash, compression).await
}

/// `GET /<cache>/upstream-nar/<hash>/<file>`: the NAR of a path served from an upstream
/// (pull-through, [`crate::upstream`]): from the cache once it was fetched, else fetched,
/// verified and kept while it streams. Ranges are not offered for a NAR being fetched.
async fn get_upstream_nar(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    Path((_name, hash, file)): Path<(String, String, String)>,
    CacheAccess { cache, .. }: CacheAccess<Pull>,
) -> Result<Response, ApiError> {
    validate_hash_part(&hash)
        .map_err(|_| ApiError::bad(format!("invalid store path hash {:?}", truncate(&hash))))?;
    let (file_hash, compression) = parse_nar_file_name(&file)?;
    // Served locally once the path is published here with this very file (a NAR kept only
    // for an evicted path's grace period is fetched again, so the path is kept again).
    let local = |state: AppState, cache| {
        let hash = hash.clone();
        async move {
            let path = state.meta.get_path(cache, &hash).await?;
            Ok::<_, ApiError>(path.is_some_and(|p| p.nar.file_hash == file_hash))
        }
    };
    if local(state.clone(), cache.id).await? {
        return serve_nar(&state, &method, &headers, &cache, &file_hash, compression).await;
    }
    let not_found = || ApiError::not_found("no such NAR in this cache or its upstreams");
    let found = crate::upstream::narinfo(&state, &cache, &hash)
        .await
        .filter(|f| f.file_hash == file_hash && f.compression == compression)
        .ok_or_else(not_found)?;
    let mut resp = if method == Method::HEAD {
        Response::new(Body::empty())
    } else {
        let turn = crate::upstream::fetch_turn(&state, &cache, &hash).await;
        // A fetch that held the turn before this request has kept the NAR by now.
        if local(state.clone(), cache.id).await? {
            drop(turn);
            return serve_nar(&state, &method, &headers, &cache, &file_hash, compression).await;
        }
        Response::new(crate::upstream::fetch_nar(&state, &cache, found.clone(), turn).await?)
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-nix-nar"),
    );
    if let Some(size) = found.info.file_size {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    Ok(resp)
}

/// Answer a request for the NAR file `file_hash` of `cache`: 404 unless the cache may serve
/// it (a published path's, or an evicted one's within the grace period).
async fn serve_nar(
    state: &AppState,
    method: &Method,
    headers: &HeaderMap,
    cache: &larder_store::meta::CacheRow,
    file_hash: &larder_nix::hash::Sha256,
    compression: larder_nix::compression::Compression,
) -> Result<Response, ApiError> {
    // Object ranges remembered (`HotCache::spans`) that name an object gone are read from
    // the database, once.
    for reread in [false, true] {
        let attempt = serve_nar_attempt(
            state,
            method,
            headers,
            cache,
            file_hash,
            compression,
            reread,
        );
        if let Attempt::Done(resp) = attempt.await? {
            return Ok(resp);
        }
    }
    Err(ApiError::not_found("no such NAR in this cache"))
}

/// What one attempt at serving a NAR gave.
enum Attempt {
    Done(Response),
    /// The object ranges came from memory and an object they name is gone.
    Reread,
}

/// [`serve_nar`], with the NAR's object ranges from memory unless `reread`.
async fn serve_nar_attempt(
    state: &AppState,
    method: &Method,
    headers: &HeaderMap,
    cache: &larder_store::meta::CacheRow,
    file_hash: &larder_nix::hash::Sha256,
    compression: larder_nix::compression::Compression,
    reread: bool,
) -> Result<Attempt, ApiError> {
    let (state, file_hash) = (state.clone(), *file_hash);
    let served = match state.hot.nar(cache.id, &file_hash).filter(|_| !reread) {
        Some(served) => served,
        None => {
            let nar = state
                .meta
                .servable_nar_by_file_hash(cache.id, &file_hash, evicted_since(&state))
                .await?
                .ok_or_else(|| ApiError::not_found("no such NAR in this cache"))?;
            // A file's object ranges change only when compaction moves its chunks, whose old
            // pack stays readable for hours after: remembered longer than the NAR's row
            // (`hot::SPANS_TTL`), keyed by the file's hash.
            let remembered = state.hot.spans(&file_hash).filter(|_| !reread);
            let (spans, spans_remembered) = match remembered {
                Some(spans) => (spans, true),
                None => {
                    let chunks = state.meta.nar_chunks(nar.id).await?;
                    (file_spans(&state, &nar, &chunks), false)
                }
            };
            let served = Arc::new(crate::hot::ServedNar {
                nar,
                spans,
                spans_remembered,
            });
            state.hot.put_nar(cache.id, served.clone());
            served
        }
    };
    let nar = &served.nar;
    if nar.compression != compression {
        return Err(ApiError::not_found("no such NAR in this cache"));
    }
    let len = nar.file_size as u64;
    let range = match parse_range(headers, len) {
        Ok(r) => r,
        Err(()) => {
            return Ok(Attempt::Done(
                (
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(header::CONTENT_RANGE, format!("bytes */{len}"))],
                )
                    .into_response(),
            ))
        }
    };
    let (status, r) = match range {
        Some(r) => (StatusCode::PARTIAL_CONTENT, r),
        None => (StatusCode::OK, 0..len),
    };
    // Once the answer is certain, the path is used and, unless a HEAD, the download counted
    // (a redirect counts the bytes it sends the client to fetch).
    let used = |bytes| state.retention.usage.nar(cache.id, nar.id, bytes);
    // HEAD (Nix's uploader asks whether a NAR exists) is answered from the metadata alone.
    let body = if *method == Method::HEAD {
        used(None);
        Body::empty()
    } else {
        // Where the whole file is: one range of one object for most NARs (a NAR stored
        // whole, or whose chunks were stored together), several for a NAR sharing chunks.
        let whole = &served.spans;
        if state.config.nar_redirect == NarRedirect::Presigned {
            // An object that is exactly the file: named by its FileHash, from its start.
            let file = nar.file_hash.to_nix32();
            if let [(key, span)] = whole.as_slice() {
                if span.start == 0 && key.rsplit('/').next() == Some(file.as_str()) {
                    // Signing needs no request: check the store is not known to be down, so
                    // the client gets a 503 here rather than a redirect to a dead endpoint.
                    state.objects.check_available().await?;
                    // The client follows the redirect and re-sends its Range header, if any.
                    let ttl = crate::config::PRESIGNED_URL_TTL;
                    if let Some(url) = state.objects.presigned_get(key, ttl).await? {
                        used(Some(r.end - r.start));
                        return Ok(Attempt::Done(
                            (
                                StatusCode::TEMPORARY_REDIRECT,
                                [
                                    (header::LOCATION, url),
                                    // The URL expires: no cache may keep the redirect.
                                    (header::CACHE_CONTROL, "no-store".to_owned()),
                                ],
                            )
                                .into_response(),
                        ));
                    }
                }
            }
        }
        // A file in several objects (or several ranges of one) is served by its own module.
        // A small file of one range is read whole; anything else is streamed in batches
        // read ahead (`chunked_nar`): for a large file of one object too, where batches of
        // 1 MiB read two ahead outran a stream of the object (bench/serve.sh, 256 MiB, one
        // connection: 2 620 against 1 820 MiB/s; nginx 2 180).
        let body = match whole.as_slice() {
            [(key, span)] if span.end - span.start <= SMALL_NAR => {
                small_body(&state, &file_hash, (key, span.clone()), r.clone()).await
            }
            [] => Err(ApiError::NotFound("a NAR without chunks".to_owned())),
            _ => crate::chunked_nar::body(&state.objects, nar.id, whole, r.clone()).await,
        };
        match body {
            Ok(body) => {
                used(Some(r.end - r.start));
                body
            }
            // Collected since this replica looked it up (its grace ended): gone, as Nix expects.
            Err(ApiError::NotFound(_)) => {
                state.hot.forget_nar(cache.id, &file_hash);
                if served.spans_remembered {
                    state.hot.forget_spans(&file_hash);
                    return Ok(Attempt::Reread);
                }
                return Err(ApiError::not_found("no such NAR in this cache"));
            }
            Err(e) => return Err(e),
        }
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-nix-nar"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(r.end - r.start));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    // Content-addressed: the file under this name never changes.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {}-{}/{len}", r.start, r.end - 1))
                .map_err(ApiError::internal)?,
        );
    }
    Ok(Attempt::Done(resp))
}

/// `PUT /<cache>/nar/<filehash>.nar[.xz|.zst]` from Nix's uploader: verified and staged until
/// the narinfo that names it arrives.
async fn put_nar(
    State(state): State<AppState>,
    Path((_name, file)): Path<(String, String)>,
    CacheAccess { cache, .. }: CacheAccess<Push>,
    body: Body,
) -> Result<Response, ApiError> {
    let (claimed, compression) = parse_nar_file_name(&file)?;
    // Refuse before reading the body while the store is down: Nix 2.x re-sends a PUT after
    // a 5xx without its body, and would wait for the stall timeout if we waited for it.
    state.objects.check_available().await?;
    let up = ingest(
        body,
        compression,
        state.config.max_upload_size,
        state.config.max_nar_size,
        &state.staging,
    )
    .await?;
    if up.file_hash != claimed {
        return Err(ApiError::rejected(
            crate::error::Rejection::FileHashMismatch,
            format!(
                "NAR file name {:?} does not match its content (FileHash {})",
                truncate(&file),
                up.file_hash
            ),
        ));
    }
    store_upload(&state, &cache, Some(&file), up).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `PUT /<cache>/<hash>.narinfo` from Nix's uploader: publishes the path whose NAR was
/// uploaded just before (or is already published in this cache).
async fn put_narinfo(
    State(state): State<AppState>,
    Path((_name, file)): Path<(String, String)>,
    CacheAccess { cache, .. }: CacheAccess<Push>,
    body: Body,
) -> Result<Response, ApiError> {
    let hash = hash_file(&file, ".narinfo")?
        .ok_or_else(|| ApiError::bad("only <hash>.narinfo, nar/…, log/… can be uploaded"))?;
    let bytes = axum::body::to_bytes(body, MAX_NARINFO_BYTES)
        .await
        .map_err(|e| ApiError::bad(format!("cannot read narinfo: {e}")))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| ApiError::bad("narinfo is not UTF-8"))?;
    let ni = NarInfo::parse(text).map_err(|e| ApiError::bad(format!("invalid narinfo: {e}")))?;
    if ni.store_path.hash_part() != hash {
        return Err(ApiError::bad(format!(
            "narinfo StorePath {} does not match its file name {file}",
            ni.store_path
        )));
    }
    let key = ni.url.strip_prefix("nar/").ok_or_else(|| {
        ApiError::bad(format!("narinfo URL {:?} is not nar/…", truncate(&ni.url)))
    })?;
    let (upload_id, nar) = match state.meta.upload_by_key(cache.id, key).await? {
        Some(found) => found,
        None => {
            // Nix skips the NAR upload when the file already exists in this cache (which
            // includes the NAR of a recently evicted path). A pending upload row keeps that
            // NAR from garbage collection until the path is published.
            let (file_hash, _) = parse_nar_file_name(key)?;
            let not_uploaded = || {
                ApiError::bad(format!(
                    "narinfo names {} but that NAR was not uploaded to cache {:?}",
                    truncate(&ni.url),
                    cache.name
                ))
            };
            let nar = state
                .meta
                .servable_nar_by_file_hash(cache.id, &file_hash, evicted_since(&state))
                .await?
                .ok_or_else(not_uploaded)?;
            let upload_id = crate::publish::random_id()?;
            let nar = state
                .meta
                .reuse_nar_for_upload(&upload_id, cache.id, None, &nar.nar_hash)
                .await?
                .ok_or_else(not_uploaded)?;
            (upload_id, nar)
        }
    };
    let info = PathInfo {
        store_path: ni.store_path,
        nar_hash: ni.nar_hash,
        nar_size: ni.nar_size,
        references: ni.references,
        deriver: ni.deriver,
        ca: ni.ca,
        sigs: ni.sigs,
        upstream: Vec::new(),
    };
    publish(&state, &cache, info, &nar, &upload_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Evicted paths' NARs stay servable when evicted at or after this time.
fn evicted_since(state: &AppState) -> i64 {
    larder_store::now_unix() - state.config.evicted_nar_grace.as_secs() as i64
}

fn drv_name(drv: &str) -> Result<StorePath, ApiError> {
    StorePath::from_basename(drv)
        .ok()
        .filter(StorePath::is_derivation)
        .ok_or_else(|| ApiError::bad(format!("invalid derivation name {:?}", truncate(drv))))
}

async fn get_log(
    State(state): State<AppState>,
    _headers: HeaderMap,
    Path((_name, drv)): Path<(String, String)>,
    CacheAccess { cache, .. }: CacheAccess<Pull>,
) -> Result<Response, ApiError> {
    let drv = drv_name(&drv)?;
    let (key, _size) = state
        .meta
        .get_log(cache.id, &drv.basename())
        .await?
        .ok_or_else(|| ApiError::not_found("no build log for this derivation"))?;
    let obj = state.objects.get(&key, None).await?;
    let mut resp = Response::new(Body::from_stream(obj.stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(obj.len));
    // A log is whatever the builder printed, served on the web UI's origin: a browser must
    // show it as text, never run it (`crate::harden` adds nosniff and a sandboxing CSP).
    Ok(resp)
}

async fn put_log(
    State(state): State<AppState>,
    Path((_name, drv)): Path<(String, String)>,
    CacheAccess { cache, .. }: CacheAccess<Push>,
    body: Body,
) -> Result<Response, ApiError> {
    let drv = drv_name(&drv)?;
    state.objects.check_available().await?;
    let (path, hash, size) =
        crate::ingest::spool_body(body, MAX_LOG_BYTES, &state.staging, state.staging.dir()).await?;
    let key = format!("log/{}", hash.to_nix32());
    state.objects.put_file(&key, &path).await?;
    state
        .meta
        .put_log(cache.id, &drv.basename(), &key, size as i64)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
