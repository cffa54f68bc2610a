//! Multi-part NAR uploads: a large NAR sent as several parts, each an independently compressed
//! frame of consecutive NAR bytes, so that a proxy's body limit or a dropped connection costs
//! one part, not the whole path.
//!
//! `POST /caches/{c}/multipart?compression=…` opens an upload; `PUT …/multipart/{id}/parts/{n}`
//! stores part `n` (re-sending a part replaces it); `POST …/multipart/{id}/complete` verifies
//! the concatenation exactly like a single upload (FileHash, NarHash, NarSize, NAR structure)
//! and stores each part as one chunk of the NAR: concatenated frames are one valid stream, so
//! the chunks are served back to back as the NAR file. Parts wait in the staging directory of
//! the replica that received them until completion or expiry.

use std::path::PathBuf;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use larder_store::meta::{ChunkRow, NarRow};
use serde::Serialize;

use super::{UploadCompression, UploadResp};
use crate::auth::Perm;
use crate::error::ApiError;
use crate::ingest::{parse_compression, verify_parts};
use crate::AppState;

/// Most parts one upload may have.
const MAX_PARTS: u32 = 100_000;

#[derive(Serialize)]
pub struct Opened {
    upload_id: String,
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

pub async fn open(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    UploadCompression(compression): UploadCompression,
) -> Result<(StatusCode, Json<Opened>), ApiError> {
    let c = crate::publish::authorized_cache(&state, &headers, &name, Perm::Push).await?;
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
    tokio::fs::write(dir.join("compression"), compression.as_str())
        .await
        .map_err(ApiError::internal)?;
    Ok((StatusCode::CREATED, Json(Opened { upload_id: id })))
}

pub async fn put_part(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((name, id, n)): Path<(String, String, u32)>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let c = crate::publish::authorized_cache(&state, &headers, &name, Perm::Push).await?;
    if n >= MAX_PARTS {
        return Err(ApiError::bad(format!(
            "part number must be below {MAX_PARTS}"
        )));
    }
    let dir = upload_dir(&state, c.id, &id)?;
    state.objects.check_available().await?;
    if !tokio::fs::try_exists(&dir).await.unwrap_or(false) {
        return Err(ApiError::not_found(
            "no such multi-part upload (expired or completed?)",
        ));
    }
    let part = dir.join(format!("part-{n:06}"));
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
    let (tmp, _hash, _size) = super::spool_body(body, limit, &state.staging, &dir)
        .await
        .map_err(|e| match e {
            ApiError::PayloadTooLarge(_) if limit < state.config.max_upload_size => full(),
            e => e,
        })?;
    // Atomic: a part is either absent or complete, and re-sending one replaces it.
    tmp.persist(&part)
        .map_err(|e| ApiError::internal(e.error))?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn complete(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((name, id)): Path<(String, String)>,
) -> Result<(StatusCode, Json<UploadResp>), ApiError> {
    let c = crate::publish::authorized_cache(&state, &headers, &name, Perm::Push).await?;
    let dir = upload_dir(&state, c.id, &id)?;
    let compression = tokio::fs::read_to_string(dir.join("compression"))
        .await
        .map_err(|_| ApiError::not_found("no such multi-part upload (expired or completed?)"))?;
    let compression = parse_compression(compression.trim())?;
    let mut parts = Vec::new();
    while tokio::fs::try_exists(dir.join(format!("part-{:06}", parts.len())))
        .await
        .unwrap_or(false)
    {
        parts.push(dir.join(format!("part-{:06}", parts.len())));
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
    let upload_id = id.clone();
    let nar_hash = verified.nar_hash.to_nix32();
    let nar = match state
        .meta
        .reuse_nar_for_upload(&upload_id, c.id, None, &nar_hash)
        .await?
    {
        Some(nar) => nar,
        None => {
            let chunks: Vec<ChunkRow> = verified
                .parts
                .iter()
                .map(|(hash, size)| ChunkRow {
                    chunk_hash: hash.to_nix32(),
                    file_size: *size as i64,
                })
                .collect();
            // Claimed before they are written (see `Metadata::claim_chunks`).
            state.meta.claim_chunks(&upload_id, &chunks).await?;
            for (path, chunk) in parts.iter().zip(&chunks) {
                if let Err(e) = state.objects.put_file(&chunk.object_key(), path).await {
                    // Storing consumed the parts before this one: the upload cannot complete
                    // any more. The client starts a new one (a 503 is retried).
                    let _ = tokio::fs::remove_dir_all(&dir).await;
                    return Err(e.into());
                }
            }
            let row = NarRow {
                id: 0,
                nar_hash,
                nar_size: verified.nar_size as i64,
                compression: compression.as_str().to_owned(),
                file_hash: verified.file_hash.to_nix32(),
                file_size: verified.file_size as i64,
            };
            let nar = state
                .meta
                .insert_nar_for_upload(&upload_id, c.id, None, &row, &chunks)
                .await?
                .0;
            crate::publish::store_listing(&state, &nar.nar_hash, &verified.listing).await;
            nar
        }
    };
    let _ = tokio::fs::remove_dir_all(&dir).await;
    Ok((
        StatusCode::CREATED,
        Json(UploadResp::from_nar(upload_id, nar)),
    ))
}
