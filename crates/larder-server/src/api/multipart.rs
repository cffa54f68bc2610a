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
//! (`staging` sweeps only partial files), until completion or [`MULTIPART_IDLE_TTL`] without a
//! new part.
//!
//! [`MULTIPART_IDLE_TTL`]: crate::config::MULTIPART_IDLE_TTL

use std::path::{Path as FsPath, PathBuf};
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
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
fn upload_info(id: String, dir: &FsPath, manifest: Manifest) -> std::io::Result<MultipartUpload> {
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
        expires_at: unix(updated + crate::config::MULTIPART_IDLE_TTL),
    })
}

/// A cache's unfinished multi-part uploads on this server: how many, and the bytes of their
/// parts (`except`: the part a re-send replaces, in the upload being written).
async fn staged(
    state: &AppState,
    cache_id: i64,
    except: Option<PathBuf>,
) -> Result<(usize, u64), ApiError> {
    let root = state.staging.dir().to_owned();
    let prefix = format!("multipart-{cache_id}-");
    tokio::task::spawn_blocking(move || {
        let (mut uploads, mut bytes) = (0, 0);
        for dir in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            if !dir.file_name().to_string_lossy().starts_with(&prefix) {
                continue;
            }
            uploads += 1;
            for f in std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if Some(f.path()) != except {
                    bytes += f.metadata().map_or(0, |m| m.len());
                }
            }
        }
        (uploads, bytes)
    })
    .await
    .map_err(|e| ApiError::internal(std::io::Error::other(e)))
}

/// How many bytes of unfinished parts a cache may hold: its size limit (what does not fit in
/// the cache need not be staged for it), at most `max_upload_size`.
fn staging_allowance(state: &AppState, c: &larder_store::meta::CacheRow) -> u64 {
    let limit = state.config.max_upload_size;
    c.max_size
        .and_then(|m| u64::try_from(m).ok())
        .map_or(limit, |m| m.min(limit))
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
        (status = 429, description = "The cache has as many unfinished multi-part uploads as it may (16).", body = larder_api::ErrorBody),
    ),
)]
pub async fn open(
    State(state): State<AppState>,
    Path(_name): Path<String>,
    UploadCompression(compression): UploadCompression,
    CacheAccess { cache: c, .. }: CacheAccess<Push>,
    identity: Result<Query<IdentityQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<(StatusCode, Json<MultipartOpened>), ApiError> {
    let (nar_hash, nar_size) = query(identity)?.parse()?;
    let (open, _) = staged(&state, c.id, None).await?;
    if open >= crate::config::MAX_OPEN_MULTIPART_PER_CACHE {
        return Err(ApiError::TooManyUploads(format!(
            "cache {:?} has {open} unfinished multi-part uploads, the most it may have: complete \
             them, or wait for abandoned ones to expire ({} min without a new part)",
            c.name,
            crate::config::MULTIPART_IDLE_TTL.as_secs() / 60
        )));
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
        let info = tokio::task::spawn_blocking(move || upload_info(id, &dir, manifest))
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

// upload for another [`crate::config::MULTIPART_IDLE_TTL`], as a new part would: the client

// asks to resume it.

pub async fn show(
    State(state): State<AppState>,
    Path((_name, id)): Path<(String, String)>,
    CacheAccess { cache: c, .. }: CacheAccess<Push>,
) -> Result<Json<MultipartDetail>, ApiError> {
    let dir = upload_dir(&state, c.id, &id)?;
    let manifest = read_manifest(&dir).await?;
    let compression = parse_compression(&manifest.compression)?;
    let max_nar_size = state.config.max_nar_size;
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
            upload: upload_info(id, &dir, manifest)?,
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
    let (_, held) = staged(&state, c.id, Some(part.clone())).await?;
    let allowance = staging_allowance(&state, &c);
    let room = allowance.saturating_sub(held);
    let full = || {
        ApiError::StagingFull(format!(
            "the unfinished multi-part uploads of cache {:?} would hold more than {allowance} \
             bytes (its size limit) on this server: complete or abandon some first",
            c.name
        ))
    };
    if room == 0 {
        return Err(full());
    }
    let limit = room.min(state.config.max_upload_size);
    let compression = parse_compression(&read_manifest(&dir).await?.compression)?;
    let (tmp, _hash, _size) = crate::ingest::spool_body(body, limit, &state.staging, &dir)
        .await
        .map_err(|e| match e {
            ApiError::PayloadTooLarge(_) if limit < state.config.max_upload_size => full(),
            e => e,
        })?;
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
    crate::publish::store_listing(&state, &nar.nar_hash, &verified.listing).await;
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
