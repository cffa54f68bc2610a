//! Multi-part NAR uploads: a large NAR sent as several parts, each an independently compressed
//! frame of consecutive NAR bytes, so that a proxy's body limit or a dropped connection costs
//! one part, not the whole path, and an interrupted push (Ctrl-C, a crash, a server restart)
//! resumes where it stopped.
//!
//! `POST /caches/{c}/multipart?compression=…&nar_hash=…&nar_size=…` opens an upload (the NAR's
//! identity is a label to find it again by, trusted for nothing else);
//! `PUT …/multipart/{id}/parts/{n}` stores part `n` (re-sending a part replaces it);
//! `POST …/multipart/{id}/complete[?parts=N]` verifies the concatenation of parts `0..N`
//! exactly like a single upload (FileHash, NarHash, NarSize, NAR structure) and stores each
//! part as one chunk of the NAR: concatenated frames are one valid stream, so the chunks are
//! served back to back as the NAR file.
//!
//! Resuming: `GET /caches/{c}/multipart?nar_hash=…&nar_size=…` lists the cache's unfinished
//! uploads of that NAR, and `GET …/multipart/{id}` says what each stored part holds (its size
//! and hash, and the size and hash of the NAR bytes it decompresses to on its own, measured when
//! it was stored and kept beside it as `part-NNNNNN.json`), so a client keeps the
//! parts that hold the NAR bytes it would send and sends the rest. Nothing a client says about
//! a part is trusted: completion verifies the whole as always. `DELETE …/multipart/{id}`
//! abandons an upload. Every request needs push permission on the cache, and an upload belongs
//! to its cache (its directory is named after the cache's id): no token sees or touches
//! another cache's uploads.
//!
//! Parts wait in the staging directory of the replica that received them, across restarts
//! (`staging` sweeps only partial files), until completion or `multipart_idle_ttl` without a
//! new part.
//!
//! Bounds, on each server (the staging directory is its own): a cache, and a token, may have
//! at most `multipart_max_open` unfinished uploads (more are refused with 429 until some
//! complete, are abandoned or expire) holding at most `multipart_max_staged` bytes, and a
//! cache with a size limit at most that (a part beyond is refused with 413, nothing of it
//! kept). An upload records the token that opened it; its parts count against that token
//! whoever sends them. An upload idle past `multipart_idle_ttl` is deleted when it is next
//! counted, so it stops holding its place at once rather than at the next garbage collection.

use std::path::{Path as FsPath, PathBuf};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use larder_nix::hash::Sha256;
// A part's measurement is kept beside it (`part-NNNNNN.json`) as the API shows it.
use larder_api::{
    MultipartDetail, MultipartList, MultipartOpened, MultipartPart, MultipartUpload, Upload,
};
use serde::{Deserialize, Serialize};

use super::{upload_json, UploadCompression};
use crate::access::{CacheAccess, Push};
use crate::error::{ApiError, Rejection};
use crate::ingest::{measure_part, parse_compression, verify_parts, Compression};
use crate::AppState;

/// Most parts one upload may have.
const MAX_PARTS: u32 = 100_000;

/// The file in an upload's directory that says what it is (JSON [`Manifest`]). Uploads opened
/// by an older larder have only a `compression` file.
const MANIFEST: &str = "upload.json";
const LEGACY_COMPRESSION: &str = "compression";

/// What an upload is, written when it is opened.
#[derive(Serialize, Deserialize)]
struct Manifest {
    compression: String,
    /// The NAR the client said it would send (`sha256:<nix32>`): a label to find the upload
    /// again by, checked at completion.
    #[serde(default)]
    nar_hash: Option<String>,
    #[serde(default)]
    nar_size: Option<u64>,
    /// The id of the token that opened the upload (its parts count against that token's
    /// bounds); none for uploads opened by an older larder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

/// The NAR identity in a query: `nar_hash` (any SHA-256 spelling Nix accepts) and `nar_size`.
#[derive(Deserialize, Default)]
pub struct IdentityQuery {
    nar_hash: Option<String>,
    nar_size: Option<String>,
}

impl IdentityQuery {
    /// `(nar_hash as sha256:<nix32>, nar_size)`, each when given.
    fn parse(&self) -> Result<(Option<String>, Option<u64>), ApiError> {
        let hash = match &self.nar_hash {
            Some(h) => Some(
                Sha256::parse(h)
                    .map_err(|e| ApiError::bad(format!("invalid nar_hash: {e}")))?
                    .to_typed_nix32(),
            ),
            None => None,
        };
        let size = match &self.nar_size {
            Some(n) => Some(n.parse::<u64>().map_err(|_| {
                ApiError::bad(format!(
                    "invalid nar_size {:?} (a number of bytes)",
                    crate::ingest::truncate(n)
                ))
            })?),
            None => None,
        };
        Ok((hash, size))
    }
}

fn query<T: Default>(
    q: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::bad(format!("invalid query: {}", e.body_text())))
}

fn upload_dir(state: &AppState, cache_id: i64, id: &str) -> Result<PathBuf, ApiError> {
    if id.len() != 32
        || !id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return Err(ApiError::bad("invalid multi-part upload id"));
    }
    Ok(state
        .objects
        .staging_dir()
        .join(format!("multipart-{cache_id}-{id}")))
}

fn no_such_upload() -> ApiError {
    ApiError::not_found("no such multi-part upload (expired or completed?)")
}

fn part_name(n: u32) -> String {
    format!("part-{n:06}")
}

/// Where what the server measured of a part is kept: `part-NNNNNN.json`.
fn measurement_path(part: &FsPath) -> PathBuf {
    part.with_extension("json")
}

/// Measure the part stored at `path` (see [`measure_part`]).
fn measure(
    n: u32,
    path: &FsPath,
    compression: Compression,
    max_nar_size: u64,
) -> std::io::Result<MultipartPart> {
    let m = measure_part(path, compression, max_nar_size)?;
    Ok(MultipartPart {
        n,
        file_size: m.file_size,
        file_hash: m.file_hash.to_typed_nix32(),
        nar_size: m.nar.map(|(_, size)| size),
        nar_hash: m.nar.map(|(hash, _)| hash.to_typed_nix32()),
    })
}

/// What was measured of part `n` at `path` when it was stored, or (a part stored by an older
/// larder, or replaced meanwhile: the recorded size differs) measured now.
fn measured(
    n: u32,
    path: &FsPath,
    size: u64,
    compression: Compression,
    max_nar_size: u64,
) -> std::io::Result<MultipartPart> {
    let recorded = std::fs::read(measurement_path(path))
        .ok()
        .and_then(|b| serde_json::from_slice::<MultipartPart>(&b).ok())
        .filter(|m| m.n == n && m.file_size == size);
    match recorded {
        Some(m) => Ok(m),
        None => measure(n, path, compression, max_nar_size),
    }
}

/// The number of a part file's name (`part-000042`), or `None` for any other file.
fn part_number(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("part-")?;
    (digits.len() == 6 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The manifest of the upload in `dir`; 404 when there is no such upload.
async fn read_manifest(dir: &FsPath) -> Result<Manifest, ApiError> {
    match tokio::fs::read(dir.join(MANIFEST)).await {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(ApiError::internal),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let compression = tokio::fs::read_to_string(dir.join(LEGACY_COMPRESSION))
                .await
                .map_err(|_| no_such_upload())?;
            Ok(Manifest {
                compression: compression.trim().to_owned(),
                nar_hash: None,
                nar_size: None,
                token: None,
            })
        }
        Err(e) => Err(ApiError::internal(e)),
    }
}

/// The part files of the upload in `dir` by number, with their sizes.
fn stored_parts(dir: &FsPath) -> std::io::Result<Vec<(u32, PathBuf, u64)>> {
    let mut parts = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(n) = part_number(&entry.file_name().to_string_lossy()) else {
            continue;
        };
        // A part replaced meanwhile is still there under the same name.
        let Ok(meta) = entry.metadata() else { continue };
        parts.push((n, entry.path(), meta.len()));
    }
    parts.sort_by_key(|p| p.0);
    Ok(parts)
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The upload in `dir` as the API shows it (its parts counted, not measured).
fn upload_info(
    id: String,
    dir: &FsPath,
    manifest: Manifest,
    ttl: Duration,
) -> std::io::Result<MultipartUpload> {
    let parts = stored_parts(dir)?;
    let updated = std::fs::metadata(dir)?.modified()?;
    Ok(MultipartUpload {
        upload_id: id,
        compression: manifest.compression,
        nar_hash: manifest.nar_hash,
        nar_size: manifest.nar_size,
        part_count: parts.len(),
        part_bytes: parts.iter().map(|p| p.2).sum(),
        updated_at: unix(updated),
        expires_at: unix(updated + ttl),
    })
}

/// One unfinished multi-part upload on this server, as its bounds count it.
pub(crate) struct Staged {
    pub cache_id: i64,
    /// The token that opened it.
    pub token: Option<String>,
    /// The bytes of its files.
    pub bytes: u64,
}

/// Every unfinished multi-part upload in the staging directory `root`, except that one idle
/// (nothing in it written) for longer than `ttl` is deleted instead of counted, and the file
/// `except` (a part about to be replaced) is not counted.
pub(crate) fn scan(root: &FsPath, ttl: Duration, except: Option<&FsPath>) -> Vec<Staged> {
    let mut found = Vec::new();
    for dir in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = dir.file_name().to_string_lossy().into_owned();
        let Some(cache_id) = name
            .strip_prefix("multipart-")
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(id, _)| id.parse::<i64>().ok())
        else {
            continue;
        };
        let path = dir.path();
        // The newest write in it: a part being received (its spool file grows) keeps it.
        let mut newest = dir.metadata().and_then(|m| m.modified()).ok();
        let mut bytes = 0;
        for f in std::fs::read_dir(&path).into_iter().flatten().flatten() {
            let Ok(meta) = f.metadata() else { continue };
            newest = newest.max(meta.modified().ok());
            if except != Some(f.path().as_path()) {
                bytes += meta.len();
            }
        }
        if newest
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > ttl)
        {
            let _ = std::fs::remove_dir_all(&path);
            continue;
        }
        let token = std::fs::read(path.join(MANIFEST))
            .ok()
            .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok())
            .and_then(|m| m.token);
        found.push(Staged {
            cache_id,
            token,
            bytes,
        });
    }
    found
}

/// Every unfinished multi-part upload on this server, as [`scan`] counts them (`except`: the
/// part a re-send replaces).
pub(crate) async fn staged(
    state: &AppState,
    except: Option<PathBuf>,
) -> Result<Vec<Staged>, ApiError> {
    let root = state.staging.dir().to_owned();
    let ttl = state.config.multipart_idle_ttl;
    tokio::task::spawn_blocking(move || scan(&root, ttl, except.as_deref()))
        .await
        .map_err(|e| ApiError::internal(std::io::Error::other(e)))
}

/// `(uploads, bytes)` of those of `staged` that `pick` selects.
fn tally(staged: &[Staged], pick: impl Fn(&Staged) -> bool) -> (usize, u64) {
    staged
        .iter()
        .filter(|s| pick(s))
        .fold((0, 0), |(n, b), s| (n + 1, b + s.bytes))
}

/// The id of the token a request carries (every multi-part request needs push, so one).
async fn token_id(state: &AppState, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    Ok(match crate::auth::principal(state, headers).await? {
        crate::auth::Principal::Token(g) => Some(g.id),
        crate::auth::Principal::Anonymous => None,
    })
}

/// How many bytes of unfinished parts a cache may hold, and the setting that says so: its
/// size limit (what does not fit in the cache need not be staged for it) when it is below
/// `multipart_max_staged`.
pub(crate) fn staging_allowance(
    state: &AppState,
    c: &larder_store::meta::CacheRow,
) -> (u64, &'static str) {
    let limit = state.config.multipart_max_staged;
    match c.max_size.and_then(|m| u64::try_from(m).ok()) {
        Some(m) if m < limit => (m, "its size limit"),
        _ => (limit, "multipart_max_staged"),
    }
}

/// How to make room, for a refusal's message.
fn make_room(state: &AppState) -> String {
    format!(
        "complete or abandon some (`GET /api/v1/caches/CACHE/multipart` lists them, `DELETE \
         …/multipart/ID` abandons one), or wait for abandoned ones to expire ({} min without a \
         new part)",
        state.config.multipart_idle_ttl.as_secs() / 60
    )
}

/// Open a multi-part NAR upload (push).
///
/// `nar_hash` and `nar_size` name the NAR the client will send: a label to find the upload
/// again by (`GET …/multipart?nar_hash=…`) after an interruption, checked at completion and
/// trusted for nothing else.
#[utoipa::path(
    post,
    path = "/caches/{cache}/multipart",
    tag = "caches",
    operation_id = "openMultipart",
    params(
        crate::api::openapi::CachePath,
        ("compression" = String, Query, pattern = "^(zstd|xz|none)$"),
        ("nar_hash" = Option<String>, Query, description = "SHA-256 of the NAR (`sha256:<nix32>`, or any spelling Nix accepts). Optional."),
        ("nar_size" = Option<u64>, Query, description = "Size of the NAR in bytes. Optional.", minimum = 0),
    ),
    responses(
        (status = 201, description = "The upload's id.", body = larder_api::MultipartOpened),
        crate::api::openapi::CacheRefusals,
        (status = 415, response = crate::api::openapi::UnsupportedMedia),
        (status = 429, description = "The cache, or the token, has as many unfinished multi-part uploads on this server as it may (`multipart_max_open`, 16 by default).", body = larder_api::ErrorBody),
    ),
)]
pub async fn open(
    State(state): State<AppState>,
    Path(_name): Path<String>,
    UploadCompression(compression): UploadCompression,
    CacheAccess { cache: c, .. }: CacheAccess<Push>,
    headers: HeaderMap,
    identity: Result<Query<IdentityQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<(StatusCode, Json<MultipartOpened>), ApiError> {
    let (nar_hash, nar_size) = query(identity)?.parse()?;
    let token = token_id(&state, &headers).await?;
    let all = staged(&state, None).await?;
    let most = state.config.multipart_max_open;
    for (whose, (open, _)) in [
        (
            format!("cache {:?}", c.name),
            tally(&all, |s| s.cache_id == c.id),
        ),
        (
            "this token".to_owned(),
            tally(&all, |s| token.is_some() && s.token == token),
        ),
    ] {
        if open >= most {
            return Err(ApiError::TooManyUploads(format!(
                "{whose} has {open} unfinished multi-part uploads on this server, the most it \
                 may have (multipart_max_open = {most}): {}",
                make_room(&state)
            )));
        }
    }
    let mut id = [0u8; 16];
    getrandom::getrandom(&mut id).map_err(|e| ApiError::internal(std::io::Error::other(e)))?;
    let id = hex::encode(id);
    let dir = upload_dir(&state, c.id, &id)?;
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(ApiError::internal)?;
    let manifest = serde_json::to_vec(&Manifest {
        compression: compression.as_str().to_owned(),
        nar_hash,
        nar_size,
        token,
    })
    .map_err(ApiError::internal)?;
    // Atomic: a listing sees the whole manifest or none (an upload without one is skipped).
    let staging = state.staging.clone();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write;
        let mut tmp = staging.tempfile("spool", &dir)?;
        tmp.write_all(&manifest)?;
        tmp.as_file().sync_all()?;
        tmp.persist(dir.join(MANIFEST)).map_err(|e| e.error)?;
        Ok(())
    })
    .await
    .map_err(|e| ApiError::internal(std::io::Error::other(e)))?
    .map_err(ApiError::internal)?;
    Ok((StatusCode::CREATED, Json(MultipartOpened { upload_id: id })))
}

/// The cache's unfinished multi-part uploads on this server, most recently written first
/// (push).
///
/// With `nar_hash` and `nar_size`, only the uploads opened for that NAR: how a client finds the
/// upload an interrupted push left, to resume it.
#[utoipa::path(
    get,
    path = "/caches/{cache}/multipart",
    tag = "caches",
    operation_id = "listMultipart",
    params(
        crate::api::openapi::CachePath,
        ("nar_hash" = Option<String>, Query, description = "SHA-256 of the NAR (`sha256:<nix32>`, or any spelling Nix accepts). Only uploads opened for it."),
        ("nar_size" = Option<u64>, Query, description = "Size of the NAR in bytes. Only uploads opened for it.", minimum = 0),
    ),
    responses(
        (status = 200, description = "The uploads.", body = larder_api::MultipartList),
        crate::api::openapi::CacheRefusals,
    ),
)]
// The cache's unfinished uploads on this server, most recently written first; with

// `nar_hash`/`nar_size`, only those opened for that NAR.

pub async fn list(
    State(state): State<AppState>,
    Path(_name): Path<String>,
    CacheAccess { cache: c, .. }: CacheAccess<Push>,
    identity: Result<Query<IdentityQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<MultipartList>, ApiError> {
    let (nar_hash, nar_size) = query(identity)?.parse()?;
    let prefix = format!("multipart-{}-", c.id);
    let mut uploads = Vec::new();
    let mut dirs = tokio::fs::read_dir(state.objects.staging_dir())
        .await
        .map_err(ApiError::internal)?;
    while let Some(entry) = dirs.next_entry().await.map_err(ApiError::internal)? {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_prefix(&prefix) else {
            continue;
        };
        let dir = entry.path();
        // Not yet (or no longer) an upload: skipped.
        let Ok(manifest) = read_manifest(&dir).await else {
            continue;
        };
        if nar_hash
            .as_ref()
            .is_some_and(|h| manifest.nar_hash.as_ref() != Some(h))
            || nar_size.is_some_and(|n| manifest.nar_size != Some(n))
        {
            continue;
        }
        let id = id.to_owned();
        let ttl = state.config.multipart_idle_ttl;
        let info = tokio::task::spawn_blocking(move || upload_info(id, &dir, manifest, ttl))
            .await
            .map_err(|e| ApiError::internal(std::io::Error::other(e)))?;
        // Completed or expired while listed.
        if let Ok(info) = info {
            uploads.push(info);
        }
    }
    uploads.sort_by_key(|u| std::cmp::Reverse(u.updated_at));
    Ok(Json(MultipartList { uploads }))
}

/// One unfinished multi-part upload with each stored part measured (push).
///
/// For each stored part: its size and SHA-256, and the size and SHA-256 of the NAR bytes it
/// decompresses to on its own (null when it does not), so a resuming client keeps the parts
/// that hold the NAR bytes it would send. Asking holds the upload for another idle period, as a
/// new part would.
#[utoipa::path(
    get,
    path = "/caches/{cache}/multipart/{id}",
    tag = "caches",
    operation_id = "showMultipart",
    params(
        crate::api::openapi::CachePath,
        ("id" = String, Path),
    ),
    responses(
        (status = 200, description = "The upload and its parts.", body = larder_api::MultipartDetail),
        crate::api::openapi::CacheRefusals,
    ),
)]
// One upload with every stored part measured (see [`measure_part`]). Asking holds the

// upload for another `multipart_idle_ttl`, as a new part would: the client

// asks to resume it.

pub async fn show(
    State(state): State<AppState>,
    Path((_name, id)): Path<(String, String)>,
    CacheAccess { cache: c, .. }: CacheAccess<Push>,
) -> Result<Json<MultipartDetail>, ApiError> {
    let dir = upload_dir(&state, c.id, &id)?;
    let manifest = read_manifest(&dir).await?;
    let compression = parse_compression(&manifest.compression)?;
    let (max_nar_size, ttl) = (state.config.max_nar_size, state.config.multipart_idle_ttl);
    let detail = tokio::task::spawn_blocking(move || -> std::io::Result<MultipartDetail> {
        std::fs::File::open(&dir)?.set_modified(SystemTime::now())?;
        let mut parts = Vec::new();
        for (n, path, size) in stored_parts(&dir)? {
            match measured(n, &path, size, compression, max_nar_size) {
                Ok(m) => parts.push(m),
                // Completed meanwhile: not there to keep.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(MultipartDetail {
            upload: upload_info(id, &dir, manifest, ttl)?,
            parts,
        })
    })
    .await
    .map_err(|e| ApiError::internal(std::io::Error::other(e)))?
    .map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => no_such_upload(),
        _ => ApiError::internal(e),
    })?;
    Ok(Json(detail))
}

/// Abandon a multi-part upload: its parts are deleted (push).
#[utoipa::path(
    delete,
    path = "/caches/{cache}/multipart/{id}",
    tag = "caches",
    operation_id = "abortMultipart",
    params(
        crate::api::openapi::CachePath,
        ("id" = String, Path),
    ),
    responses(
        (status = 204, description = "Deleted."),
        crate::api::openapi::CacheRefusals,
    ),
)]
// Abandon an upload: its parts are deleted at once.

pub async fn abort(
    State(state): State<AppState>,
    Path((_name, id)): Path<(String, String)>,
    CacheAccess { cache: c, .. }: CacheAccess<Push>,
) -> Result<StatusCode, ApiError> {
    let dir = upload_dir(&state, c.id, &id)?;
    match tokio::fs::remove_dir_all(&dir).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(no_such_upload()),
        Err(e) => Err(ApiError::internal(e)),
    }
}

/// Every this many bytes of a part received, its bounds are checked again against the staging
/// directory as it is then (parts being received at once included, at their size so far), so
/// parts sent at once cannot each take the same room: each overshoots by at most this.
const RECHECK_BYTES: u64 = 4 << 20;

/// The bounds a part counts against: its cache's and its tokens'.
struct PartBounds<'a> {
    cache_id: i64,
    cache: &'a str,
    /// The cache's allowance, and the setting it comes from.
    allowance: u64,
    bound: &'static str,
    tokens: Vec<String>,
    /// The part this one replaces (not counted).
    replaced: PathBuf,
}

impl PartBounds<'_> {
    /// Refuse (413) when the uploads counted hold more than a bound allows, or (`before`: no
    /// byte of the part received yet) as much.
    async fn check(&self, state: &AppState, before: bool) -> Result<(), ApiError> {
        let all = staged(state, Some(self.replaced.clone())).await?;
        let over = |held: u64, most: u64| if before { held >= most } else { held > most };
        let refuse = |what: String, most: u64, bound: &str| {
            ApiError::StagingFull(format!(
                "the unfinished multi-part uploads of {what} would hold more than {most} bytes \
                 ({bound}) on this server: {}",
                make_room(state)
            ))
        };
        if over(
            tally(&all, |s| s.cache_id == self.cache_id).1,
            self.allowance,
        ) {
            return Err(refuse(
                format!("cache {:?}", self.cache),
                self.allowance,
                self.bound,
            ));
        }
        let most = state.config.multipart_max_staged;
        for token in &self.tokens {
            if over(tally(&all, |s| s.token.as_ref() == Some(token)).1, most) {
                return Err(refuse(
                    "this token".to_owned(),
                    most,
                    "multipart_max_staged",
                ));
            }
        }
        Ok(())
    }
}

/// Receive a part's body into a staging file in `dir`, within `max_upload_size` and its
/// bounds (checked every [`RECHECK_BYTES`] and at the end).
async fn spool_part(
    state: &AppState,
    body: Body,
    dir: &FsPath,
    bounds: &PartBounds<'_>,
) -> Result<tempfile::TempPath, ApiError> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    let limit = state.config.max_upload_size;
    let tmp = state
        .staging
        .tempfile("spool", dir)
        .map_err(ApiError::internal)?;
    let (file, path) = tmp.into_parts();
    let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, tokio::fs::File::from_std(file));
    let (mut size, mut checked) = (0u64, 0u64);
    let mut stream = body.into_data_stream();
    while let Some(block) = stream.next().await {
        let block = block.map_err(|e| ApiError::bad(format!("upload interrupted: {e}")))?;
        size += block.len() as u64;
        if size > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        out.write_all(&block).await.map_err(ApiError::internal)?;
        if size - checked >= RECHECK_BYTES {
            out.flush().await.map_err(ApiError::internal)?;
            bounds.check(state, false).await?;
            checked = size;
        }
    }
    out.flush().await.map_err(ApiError::internal)?;
    bounds.check(state, false).await?;
    out.into_inner()
        .sync_all()
        .await
        .map_err(ApiError::internal)?;
    Ok(path)
}

/// Store part n (from 0) of a multi-part upload; re-sending replaces it.
#[utoipa::path(
    put,
    path = "/caches/{cache}/multipart/{id}/parts/{n}",
    tag = "caches",
    operation_id = "putPart",
    params(
        crate::api::openapi::CachePath,
        ("id" = String, Path),
        ("n" = u64, Path, minimum = 0),
    ),
    request_body(content = inline(crate::api::openapi::Bytes), content_type = "application/octet-stream"),
    responses(
        (status = 204, description = "Done."),
        crate::api::openapi::CacheRefusals,
        (status = 413, response = crate::api::openapi::TooLarge),
    ),
)]
pub async fn put_part(
    State(state): State<AppState>,
    Path((_name, id, n)): Path<(String, String, u32)>,
    CacheAccess { cache: c, .. }: CacheAccess<Push>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    if n >= MAX_PARTS {
        return Err(ApiError::bad(format!(
            "part number must be below {MAX_PARTS}"
        )));
    }
    let dir = upload_dir(&state, c.id, &id)?;
    state.objects.check_available().await?;
    if !tokio::fs::try_exists(&dir).await.unwrap_or(false) {
        return Err(no_such_upload());
    }
    let part = dir.join(part_name(n));
    let manifest = read_manifest(&dir).await?;
    // The parts count against the token that opened the upload (and against the one
    // sending, when another sends them).
    let sender = token_id(&state, &headers).await?;
    let mut tokens: Vec<String> = manifest.token.iter().cloned().collect();
    if let Some(sender) = sender.filter(|s| manifest.token.as_ref() != Some(s)) {
        tokens.push(sender);
    }
    let (allowance, bound) = staging_allowance(&state, &c);
    let bounds = PartBounds {
        cache_id: c.id,
        cache: &c.name,
        allowance,
        bound,
        tokens,
        replaced: part.clone(),
    };
    bounds.check(&state, true).await?;
    let compression = parse_compression(&manifest.compression)?;
    let tmp = spool_part(&state, body, &dir, &bounds).await?;
    // Measured now, while the part is fresh in memory, so that a client asking to resume is
    // answered at once however large the upload. The measurement is written first: one
    // whose size is not its part's is not used.
    let (staging, max_nar_size) = (state.staging.clone(), state.config.max_nar_size);
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write;
        let m = measure(n, &tmp, compression, max_nar_size)?;
        let mut note = staging.tempfile("spool", &dir)?;
        note.write_all(&serde_json::to_vec(&m).map_err(std::io::Error::other)?)?;
        note.persist(measurement_path(&part)).map_err(|e| e.error)?;
        // Atomic: a part is either absent or complete, and re-sending one replaces it.
        tmp.persist(&part).map_err(|e| e.error)?;
        Ok(())
    })
    .await
    .map_err(|e| ApiError::internal(std::io::Error::other(e)))?
    .map_err(ApiError::internal)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
pub struct CompleteQuery {
    /// How many parts the NAR has: parts `0..parts`, each required; any beyond are dropped.
    /// Without it, the parts numbered from 0 up to the first gap.
    parts: Option<u32>,
}

/// Verify the parts as one NAR and store it.
///
/// The NAR is the concatenation of parts `0..parts` (every one required; parts beyond are
/// dropped), or without `parts`, of the parts numbered from 0 up to the first gap. When the
/// upload was opened with `nar_hash`/`nar_size`, a concatenation of another NAR is refused
/// (400) and nothing is stored.
#[utoipa::path(
    post,
    path = "/caches/{cache}/multipart/{id}/complete",
    tag = "caches",
    operation_id = "completeMultipart",
    params(
        crate::api::openapi::CachePath,
        ("id" = String, Path),
        ("parts" = Option<u64>, Query, description = "How many parts make the NAR.", minimum = 1),
    ),
    responses(
        (status = 201, description = "What the server measured.", body = larder_api::Upload),
        crate::api::openapi::CacheRefusals,
        (status = 413, response = crate::api::openapi::TooLarge),
    ),
)]
pub async fn complete(
    State(state): State<AppState>,
    Path((_name, id)): Path<(String, String)>,
    CacheAccess { cache: c, .. }: CacheAccess<Push>,
    q: Result<Query<CompleteQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<(StatusCode, Json<Upload>), ApiError> {
    let q = query(q)?;
    let dir = upload_dir(&state, c.id, &id)?;
    let manifest = read_manifest(&dir).await?;
    let compression = parse_compression(&manifest.compression)?;
    let mut parts = Vec::new();
    match q.parts {
        Some(count) => {
            if count == 0 || count > MAX_PARTS {
                return Err(ApiError::bad(format!(
                    "parts must be between 1 and {MAX_PARTS}"
                )));
            }
            for n in 0..count {
                let p = dir.join(part_name(n));
                if !tokio::fs::try_exists(&p).await.unwrap_or(false) {
                    return Err(ApiError::bad(format!(
                        "part {n} of {count} was not uploaded"
                    )));
                }
                parts.push(p);
            }
        }
        None => {
            for n in 0..MAX_PARTS {
                let p = dir.join(part_name(n));
                if !tokio::fs::try_exists(&p).await.unwrap_or(false) {
                    break;
                }
                parts.push(p);
            }
        }
    }
    if parts.is_empty() {
        return Err(ApiError::bad(
            "no parts uploaded (parts are numbered from 0)",
        ));
    }
    let mut total = 0u64;
    for p in &parts {
        total += tokio::fs::metadata(p)
            .await
            .map_err(ApiError::internal)?
            .len();
    }
    if total > state.config.max_upload_size {
        let _ = tokio::fs::remove_dir_all(&dir).await;
        return Err(ApiError::PayloadTooLarge(state.config.max_upload_size));
    }
    let to_verify = parts.clone();
    let (max_nar_size, staging) = (state.config.max_nar_size, state.staging.clone());
    let verified = tokio::task::spawn_blocking(move || {
        verify_parts(&to_verify, compression, max_nar_size, &staging)
    })
    .await
    .map_err(|e| ApiError::internal(std::io::Error::other(e)))??;
    // Parts that do not make the NAR the upload was opened for (two clients writing one
    // upload with different part sizes): nothing is stored, and the client starts again.
    if let Some(declared) = &manifest.nar_hash {
        if *declared != verified.nar_hash.to_typed_nix32() {
            return Err(ApiError::rejected(
                Rejection::NarHashMismatch,
                format!(
                    "the parts make a NAR of hash {}, not the {declared} this upload was opened \
                     for: abandon it and upload again",
                    verified.nar_hash.to_typed_nix32()
                ),
            ));
        }
    }
    if let Some(declared) = manifest.nar_size {
        if declared != verified.nar_size {
            return Err(ApiError::rejected(
                Rejection::NarSizeMismatch,
                format!(
                    "the parts make a NAR of {} bytes, not the {declared} this upload was opened \
                     for: abandon it and upload again",
                    verified.nar_size
                ),
            ));
        }
    }
    let upload_id = id.clone();
    let measured = crate::chunked::Measured {
        nar_hash: verified.nar_hash,
        nar_size: verified.nar_size,
    };
    let nar =
        crate::chunked::store_nar(&state, &c, &upload_id, None, measured, verified.chunked).await?;
    crate::publish::store_listing(&state, &nar, &verified.listing).await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    Ok((StatusCode::CREATED, Json(upload_json(upload_id, nar))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_part_files_are_parts() {
        assert_eq!(part_number(&part_name(0)), Some(0));
        assert_eq!(part_number(&part_name(99_999)), Some(99_999));
        assert_eq!(part_number("part-00001"), None);
        assert_eq!(part_number("part-+00001"), None);
        assert_eq!(part_number("upload.json"), None);
        assert_eq!(part_number("spool-0123456789abcdef-x"), None);
    }
}
