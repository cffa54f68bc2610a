//! Push-side chunking: a client cuts a NAR into content-defined chunks itself (the server's
//! cut, [`larder_nix::chunking`]), asks which the cache lacks, uploads only those and has the
//! server assemble the NAR from its chunk list.
//!
//! - `POST /caches/{c}/chunks/missing` `{session, chunks}`: the chunks to upload. A chunk is
//!   present only when it is *visible in the cache* (`meta/chunks.rs`) or was uploaded under
//!   the same session of the same cache; the visible ones are claimed for the session, so
//!   eviction and collection cannot free them before the assembly. Another cache's content
//!   never changes the answer (ARCHITECTURE.md, "No cross-cache oracle").
//! - `POST /caches/{c}/chunks?session=…`: a body of zstd frames, one per chunk. Each is
//!   decompressed, named by the SHA-256 of its bytes (the client's naming is not taken on
//!   trust: the answer lists the ids the server computed), compressed again into the canonical
//!   frame ([`crate::chunked`]), claimed for the session and written. Idempotent: sending a
//!   chunk again stores nothing new, and a rerun of an interrupted push (same session: larder
//!   uses the NAR's hash) finds what it sent before.
//! - `POST /caches/{c}/chunks/assemble` `{session, chunks}`: every chunk is claimed for the
//!   assembly, read back from the object store and checked against its name; the NAR they
//!   make is verified like any upload (NarHash, NarSize, structure, listing), the cut points
//!   must be the server's own (so a NAR's chunk list depends on its bytes only), FileHash and
//!   FileSize are those of the frames as stored, and only then is it recorded as a pending
//!   upload, published with `POST …/paths` like one sent whole. A failure stores nothing.

use std::collections::HashSet;
use std::io;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use bytes::Bytes;
use futures::StreamExt;
use larder_api::{
    AssembleRequest, ChunksMissingRequest, ChunksMissingResponse, ChunksStored, StoredChunk, Upload,
};
use larder_nix::chunking::{Chunker, MAX_SIZE};
use larder_nix::compression::Compression;
use larder_nix::hash::{Sha256, Sha256Hasher};
use larder_nix::nar::parse::NarParser;
use larder_store::meta::{cdc_chunk_id, pack_object_key, ChunkName, ChunkRow, NarRow, Pack};
use serde::Deserialize;

use super::{upload_json, JsonBody};
use crate::access::{CacheAccess, Push};
use crate::error::{ApiError, Rejection};
use crate::ingest::{truncate, Listing, ListingWriter};
use crate::AppState;

/// Most chunk ids one `missing` query may ask about.
const MAX_MISSING: usize = 10_000;
/// Most bytes of one `POST …/chunks` body, and of the chunks it decompresses to (a small
/// frame can expand to a whole chunk of zeros).
const MAX_UPLOAD_BODY: usize = 16 << 20;
const MAX_UPLOAD_RAW: usize = 64 << 20;
/// Most bytes of an assemble request (a chunk id is ~57 bytes of JSON: a 64 GiB NAR).
const MAX_ASSEMBLE_BODY: usize = 64 << 20;
/// The largest chunk any larder stored (chunks were up to 1 MiB before the sizes were
/// tuned): one larger than [`MAX_SIZE`] is then refused as cut elsewhere, not as damage.
const LARGEST_STORED_CHUNK: usize = 1 << 20;
/// Batches of chunks read ahead while assembling.
const READ_AHEAD: usize = 2;
/// Bytes of chunks read in one batch while assembling.
const READ_BATCH: u64 = 1 << 20;

/// The claim id of a push session of a cache: sessions of different caches never meet.
fn session_claim(cache_id: i64, session: &str) -> Result<String, ApiError> {
    let ok = !session.is_empty()
        && session.len() <= 64
        && session
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
    if !ok {
        return Err(ApiError::bad(format!(
            "invalid session {:?} (1 to 64 of [0-9a-z])",
            truncate(session)
        )));
    }
    Ok(format!("push-{cache_id}-{session}"))
}

/// Check every id is a content-defined chunk's (`<nix32>.zst`).
fn check_ids(ids: &[String]) -> Result<(), ApiError> {
    for id in ids {
        if !matches!(ChunkName::parse(id), Some(ChunkName::Zstd(_))) {
            return Err(ApiError::bad(format!(
                "invalid chunk id {:?} (expected <nix32 sha256>.zst)",
                truncate(id)
            )));
        }
    }
    Ok(())
}

/// `ids` each once, sorted.
fn unique(ids: &[String]) -> Vec<String> {
    let mut u = ids.to_vec();
    u.sort_unstable();
    u.dedup();
    u
}

/// Which chunks of a NAR being pushed the cache lacks.
#[utoipa::path(
    post,
    path = "/caches/{cache}/chunks/missing",
    tag = "caches",
    operation_id = "missingChunks",
    params(crate::api::openapi::CachePath),
    request_body = larder_api::ChunksMissingRequest,
    responses(
        (status = 200, description = "The chunks to upload.", body = larder_api::ChunksMissingResponse),
        crate::api::openapi::CacheRefusals,
    ),
)]
pub async fn missing(
    State(state): State<AppState>,
    Path(_name): Path<String>,
    access: Result<CacheAccess<Push>, ApiError>,
    JsonBody(req): JsonBody<ChunksMissingRequest>,
) -> Result<Json<ChunksMissingResponse>, ApiError> {
    let c = access?.cache;
    let claim = session_claim(c.id, &req.session)?;
    if req.chunks.len() > MAX_MISSING {
        return Err(ApiError::bad(format!(
            "at most {MAX_MISSING} chunks per query"
        )));
    }
    check_ids(&req.chunks)?;
    let ids = unique(&req.chunks);
    let visible: Vec<String> = state
        .meta
        .chunks_visible_in_cache(c.id, &ids)
        .await?
        .into_iter()
        .collect();
    // Kept alive for the session until it assembles (or the claim expires); a chunk collected
    // between the two queries is not claimed, and so is reported missing.
    state.meta.claim_existing_chunks(&claim, &visible).await?;
    let held = state.meta.claimed_chunks(&claim, &ids).await?;
    let mut seen = HashSet::new();
    Ok(Json(ChunksMissingResponse {
        missing: req
            .chunks
            .into_iter()
            .filter(|id| !held.contains(id) && seen.insert(id.clone()))
            .collect(),
    }))
}

#[derive(Deserialize)]
pub struct SessionQuery {
    session: String,
}

/// A frame of an upload body, checked and made canonical.
struct Checked {
    id: String,
    size: u64,
    frame: Vec<u8>,
}

/// Split `body` into zstd frames, decompress and name each, and make its canonical frame.
/// Blocking.
fn check_frames(body: &[u8]) -> Result<Vec<Checked>, ApiError> {
    let mut out = Vec::new();
    let mut rest = body;
    let mut raw_total = 0usize;
    let mut decompressor = zstd::bulk::Decompressor::new().map_err(ApiError::internal)?;
    let mut compressor = crate::chunked::canonical_compressor().map_err(ApiError::internal)?;
    let mut raw = Vec::with_capacity(MAX_SIZE);
    while !rest.is_empty() {
        let bad = |what: &str| {
            ApiError::rejected(
                Rejection::InvalidNar,
                format!("frame {} of the body {what}", out.len()),
            )
        };
        let n = zstd::zstd_safe::find_frame_compressed_size(rest)
            .map_err(|_| bad("is not a complete zstd frame"))?;
        let (frame, tail) = rest.split_at(n.min(rest.len()));
        rest = tail;
        raw.clear();
        decompressor
            .decompress_to_buffer(frame, &mut raw)
            .map_err(|_| bad(&format!("does not decompress to at most {MAX_SIZE} bytes")))?;
        if raw.is_empty() {
            return Err(bad("is empty"));
        }
        raw_total += raw.len();
        if raw_total > MAX_UPLOAD_RAW {
            return Err(ApiError::PayloadTooLarge(MAX_UPLOAD_RAW as u64));
        }
        let mut canonical = Vec::new();
        crate::chunked::canonical_frame(&mut compressor, &raw, &mut canonical)
            .map_err(ApiError::internal)?;
        out.push(Checked {
            id: cdc_chunk_id(&Sha256::digest(&raw)),
            size: raw.len() as u64,
            frame: canonical,
        });
    }
    Ok(out)
}

/// Read a request body of at most `limit` bytes into memory.
async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut stream = body.into_data_stream();
    let mut out = Vec::new();
    while let Some(block) = stream.next().await {
        let block = block.map_err(|e| {
            ApiError::rejected(Rejection::Interrupted, format!("upload interrupted: {e}"))
        })?;
        if out.len() + block.len() > limit {
            return Err(ApiError::PayloadTooLarge(limit as u64));
        }
        out.extend_from_slice(&block);
    }
    Ok(out)
}

/// Upload chunks (zstd frames, one per chunk, back to back) for a push session.
#[utoipa::path(
    post,
    path = "/caches/{cache}/chunks",
    tag = "caches",
    operation_id = "uploadChunks",
    params(
        crate::api::openapi::CachePath,
        ("session" = String, Query, pattern = "^[0-9a-z]{1,64}$"),
    ),
    request_body(content = inline(crate::api::openapi::Bytes), content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "The chunks stored, as the server named them.", body = larder_api::ChunksStored),
        crate::api::openapi::CacheRefusals,
        (status = 413, response = crate::api::openapi::TooLarge),
    ),
)]
pub async fn upload(
    State(state): State<AppState>,
    Path(_name): Path<String>,
    Query(q): Query<SessionQuery>,
    CacheAccess { cache: c, .. }: CacheAccess<Push>,
    body: Body,
) -> Result<(StatusCode, Json<ChunksStored>), ApiError> {
    let claim = session_claim(c.id, &q.session)?;
    state.objects.check_available().await?;
    let body = read_body(body, MAX_UPLOAD_BODY).await?;
    let checked = tokio::task::spawn_blocking(move || check_frames(&body))
        .await
        .map_err(|e| ApiError::internal(io::Error::other(e)))??;
    let rows: Vec<ChunkRow> = checked
        .iter()
        .map(|c| ChunkRow::new(c.id.clone(), c.frame.len() as i64))
        .collect();
    check_staging(&state, &c, &rows).await?;
    // Claimed by this request while the objects are written, and for the session only once
    // they are: a session never holds a claim on a chunk whose object was not written.
    let writing = format!("{claim}-{}", crate::publish::random_id()?);
    state.meta.claim_chunks(&writing, &rows).await?;
    // The body's frames, each once, as one pack: one object written (see ARCHITECTURE.md,
    // "Packs").
    let mut bytes = Vec::new();
    let mut pack = Pack {
        hash: String::new(),
        size: 0,
        chunks: Vec::new(),
    };
    let mut seen = HashSet::new();
    for (row, chunk) in rows.iter().zip(&checked) {
        if seen.insert(row.chunk_hash.as_str()) {
            pack.chunks
                .push((row.chunk_hash.clone(), bytes.len() as i64, row.file_size));
            bytes.extend_from_slice(&chunk.frame);
        }
    }
    pack.hash = Sha256::digest(&bytes).to_nix32();
    pack.size = bytes.len() as i64;
    let written = async {
        state.meta.claim_pack(&pack.hash, pack.size).await?;
        state
            .objects
            .replace_bytes(&pack_object_key(&pack.hash), &bytes)
            .await?;
        state.meta.locate_chunks(&pack).await?;
        Ok::<_, ApiError>(())
    }
    .await;
    if let Err(e) = written {
        let _ = state.meta.release_claims(&writing).await;
        return Err(e);
    }
    state.meta.claim_chunks(&claim, &rows).await?;
    state.meta.release_claims(&writing).await?;
    Ok((
        StatusCode::CREATED,
        Json(ChunksStored {
            chunks: checked
                .into_iter()
                .map(|c| StoredChunk {
                    id: c.id,
                    size: c.size,
                })
                .collect(),
        }),
    ))
}

/// Refuse chunks that would make the cache's unassembled push sessions hold more than its
/// staging allowance (the multi-part bound: `multipart_max_staged`, or the cache's size
/// limit when smaller): uploaded chunks no NAR uses yet are kept for their session until
/// their claim expires, and are not counted against the cache's size otherwise. Checked
/// before anything is stored; requests racing each other may overshoot by their bodies.
async fn check_staging(
    state: &AppState,
    c: &larder_store::meta::CacheRow,
    rows: &[ChunkRow],
) -> Result<(), ApiError> {
    let (allowance, bound) = super::multipart::staging_allowance(state, c);
    let held = state
        .meta
        .claimed_unused_bytes(&format!("push-{}-", c.id))
        .await?;
    let new: i64 = rows.iter().map(|r| r.file_size).sum();
    if u64::try_from(held.saturating_add(new)).unwrap_or(u64::MAX) > allowance {
        return Err(ApiError::StagingFull(format!(
            "the chunks of unassembled pushes to cache {:?} would hold more than {allowance} \
             bytes ({bound}) on this server ({held} held): let those pushes finish (a rerun of \
             `larder push` assembles what an interrupted one sent), or wait for abandoned \
             chunks to expire",
            c.name
        )));
    }
    Ok(())
}

/// Assemble a NAR from chunks the cache has or the session uploaded, verify it and make it a
/// pending upload.
#[utoipa::path(
    post,
    path = "/caches/{cache}/chunks/assemble",
    tag = "caches",
    operation_id = "assembleNar",
    params(crate::api::openapi::CachePath),
    request_body = larder_api::AssembleRequest,
    responses(
        (status = 201, description = "What the server measured.", body = larder_api::Upload),
        crate::api::openapi::CacheRefusals,
        (status = 409, response = crate::api::openapi::Conflict),
        (status = 413, response = crate::api::openapi::TooLarge),
    ),
)]
pub async fn assemble(
    State(state): State<AppState>,
    Path(_name): Path<String>,
    CacheAccess { cache: c, .. }: CacheAccess<Push>,
    body: Body,
) -> Result<(StatusCode, Json<Upload>), ApiError> {
    let body = read_body(body, MAX_ASSEMBLE_BODY).await?;
    let req: AssembleRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))?;
    let claim = session_claim(c.id, &req.session)?;
    check_ids(&req.chunks)?;
    if req.chunks.is_empty() {
        return Err(ApiError::bad("a NAR has at least one chunk"));
    }
    state.objects.check_available().await?;
    let upload_id = crate::publish::random_id()?;
    let ids = unique(&req.chunks);
    // Kept alive from here until the NAR's row holds them (or this fails).
    state.meta.claim_existing_chunks(&upload_id, &ids).await?;
    match assemble_claimed(&state, c.id, &claim, &upload_id, &ids, req.chunks).await {
        Ok(nar) => {
            // The NAR's row now holds the chunks the session sent for it: their claims only
            // cost (each upload of chunks counts the session's claims against the staging
            // bound; kept until they expired, a cache's sessions of the last 6 hours made
            // every push slower than the one before). Others stay, for another NAR.
            if let Err(e) = state.meta.release_claimed_chunks(&claim, &ids).await {
                tracing::warn!("releasing the claims of push session {claim}: {e}");
            }
            Ok((StatusCode::CREATED, Json(upload_json(upload_id, nar))))
        }
        Err(e) => {
            let _ = state.meta.release_claims(&upload_id).await;
            Err(e)
        }
    }
}

async fn assemble_claimed(
    state: &AppState,
    cache_id: i64,
    session_claim: &str,
    upload_id: &str,
    ids: &[String],
    chunks: Vec<String>,
) -> Result<NarRow, ApiError> {
    let visible = state.meta.chunks_visible_in_cache(cache_id, ids).await?;
    let held = state.meta.claimed_chunks(session_claim, ids).await?;
    let absent: Vec<&String> = ids
        .iter()
        .filter(|id| !visible.contains(*id) && !held.contains(*id))
        .collect();
    if let Some(first) = absent.first() {
        return Err(ApiError::Conflict(format!(
            "{} chunk(s) of the NAR are not in the cache, e.g. {first}: ask which are \
             missing and upload them first",
            absent.len()
        )));
    }
    let located = state.meta.located_chunks(ids).await?;
    let mut rows = Vec::with_capacity(chunks.len());
    for id in &chunks {
        let row = located.get(id).cloned().ok_or_else(|| {
            ApiError::Conflict(format!("chunk {id} was collected meanwhile: push again"))
        })?;
        rows.push(row);
    }
    // Batches of frames: each chunk's name and length, and their bytes one after another.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Vec<(Sha256, usize)>, Bytes)>(READ_AHEAD);
    let listing = ListingWriter::new(&state.staging);
    let max_nar_size = state.config.max_nar_size;
    let worker = tokio::task::spawn_blocking(move || {
        let mut a = Assembler::new(listing, max_nar_size)?;
        while let Some((frames, bytes)) = rx.blocking_recv() {
            let mut at = 0;
            for (hash, len) in frames {
                a.frame(&hash, &bytes[at..at + len])?;
                at += len;
            }
        }
        a.finish()
    });
    // Read in batches of about [`READ_BATCH`] bytes, chunks stored one after another in a
    // pack read as one range: a read per chunk (a thread hop and a file opened each) was
    // most of an assembly's time once chunks were packed.
    let mut reads = Vec::new();
    let mut batch: ReadBatch = Default::default();
    let mut batch_bytes = 0u64;
    let runs = larder_store::meta::runs(&rows, READ_BATCH);
    let last = runs.len();
    for (i, run) in runs.into_iter().enumerate() {
        for row in &rows[run.chunks.clone()] {
            let Some(ChunkName::Zstd(hash)) = ChunkName::parse(&row.chunk_hash) else {
                return Err(ApiError::bad("invalid chunk id"));
            };
            batch.1.push((hash, row.file_size as usize));
        }
        batch_bytes += run.range.end - run.range.start;
        batch.0.push((run.key, run.range));
        if batch_bytes >= READ_BATCH || i + 1 == last {
            let (pieces, frames) = std::mem::take(&mut batch);
            batch_bytes = 0;
            reads.push(async move {
                let bytes = state.objects.read_pieces(pieces).await?;
                Ok::<_, ApiError>((frames, bytes))
            });
        }
    }
    let reads = futures::stream::iter(reads).buffered(READ_AHEAD);
    futures::pin_mut!(reads);
    let mut failure = None;
    while let Some(r) = reads.next().await {
        match r {
            Ok(item) => {
                if tx.send(item).await.is_err() {
                    break; // the worker failed: its error is reported below
                }
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let done = worker
        .await
        .map_err(|e| ApiError::internal(io::Error::other(e)))?;
    if let Some(e) = failure {
        return Err(e);
    }
    let done = done?;
    let row = NarRow {
        id: 0,
        nar_hash: done.nar_hash,
        nar_size: done.nar_size as i64,
        compression: Compression::Zstd,
        file_hash: done.file_hash,
        file_size: done.file_size as i64,
    };
    let nar = if state
        .meta
        .nar_visible_in_cache(cache_id, &done.nar_hash)
        .await?
    {
        state
            .meta
            .reuse_nar_for_upload(upload_id, cache_id, None, &done.nar_hash)
            .await?
    } else {
        None
    };
    let nar = match nar {
        Some(nar) => {
            state.meta.release_claims(upload_id).await?;
            nar
        }
        None => {
            state
                .meta
                .insert_nar_for_upload(upload_id, cache_id, None, &row, &rows)
                .await?
                .0
        }
    };
    crate::publish::store_listing(state, &nar, &done.listing).await;
    Ok(nar)
}

/// Object ranges to read, and the chunks (name, frame length) their bytes hold in order.
type ReadBatch = (Vec<(String, std::ops::Range<u64>)>, Vec<(Sha256, usize)>);

/// What assembling measured.
struct Assembled {
    nar_hash: Sha256,
    nar_size: u64,
    file_hash: Sha256,
    file_size: u64,
    listing: Listing,
}

/// Verifies the frames of a NAR as they are read back: each against its name, the NAR they
/// make (structure, NarHash, NarSize, listing), and the cut points against the server's.
struct Assembler {
    parser: NarParser,
    listing: ListingWriter,
    max_nar_size: u64,
    decompressor: zstd::bulk::Decompressor<'static>,
    raw: Vec<u8>,
    file_hasher: Sha256Hasher,
    file_size: u64,
    chunker: Chunker,
    /// Chunk lengths as given, and as the server cuts.
    given: Vec<usize>,
    cut: Vec<usize>,
}

impl Assembler {
    fn new(listing: ListingWriter, max_nar_size: u64) -> Result<Self, ApiError> {
        Ok(Assembler {
            parser: NarParser::streaming_listing(),
            listing,
            max_nar_size,
            decompressor: zstd::bulk::Decompressor::new().map_err(ApiError::internal)?,
            raw: Vec::with_capacity(LARGEST_STORED_CHUNK.max(MAX_SIZE)),
            file_hasher: Sha256Hasher::new(),
            file_size: 0,
            chunker: Chunker::new(),
            given: Vec::new(),
            cut: Vec::new(),
        })
    }

    fn frame(&mut self, hash: &Sha256, frame: &[u8]) -> Result<(), ApiError> {
        self.raw.clear();
        // A stored object that is not its chunk is damage, never the client's doing.
        self.decompressor
            .decompress_to_buffer(frame, &mut self.raw)
            .map_err(|e| ApiError::internal(io::Error::other(e)))?;
        if Sha256::digest(&self.raw) != *hash {
            return Err(ApiError::internal(io::Error::other(format!(
                "stored chunk {} does not hash to its name",
                cdc_chunk_id(hash)
            ))));
        }
        if self.parser.bytes_seen() + self.raw.len() as u64 > self.max_nar_size {
            return Err(ApiError::NarTooLarge(self.max_nar_size));
        }
        self.parser.feed(&self.raw).map_err(|e| {
            ApiError::rejected(
                Rejection::InvalidNar,
                format!("the chunks do not make a valid NAR: {e}"),
            )
        })?;
        self.listing
            .write_all(self.parser.take_listing().as_bytes())
            .map_err(ApiError::internal)?;
        let cut = &mut self.cut;
        self.chunker.feed(&self.raw, &mut |c: &[u8]| {
            cut.push(c.len());
            Ok::<_, ApiError>(())
        })?;
        self.given.push(self.raw.len());
        self.file_hasher.update(frame);
        self.file_size += frame.len() as u64;
        Ok(())
    }

    fn finish(self) -> Result<Assembled, ApiError> {
        let Assembler {
            parser,
            listing,
            chunker,
            given,
            mut cut,
            file_hasher,
            file_size,
            ..
        } = self;
        let summary = parser.finish().map_err(|e| {
            ApiError::rejected(
                Rejection::InvalidNar,
                format!("the chunks do not make a valid NAR: {e}"),
            )
        })?;
        chunker.finish(&mut |c: &[u8]| {
            cut.push(c.len());
            Ok::<_, ApiError>(())
        })?;
        if cut != given {
            return Err(ApiError::bad(
                "the NAR is not cut where the server cuts it (content-defined chunking with \
                 other parameters?): push it whole",
            ));
        }
        let listing = listing.finish().map_err(ApiError::internal)?;
        Ok(Assembled {
            listing,
            nar_hash: summary.nar_hash,
            nar_size: summary.nar_size,
            file_hash: file_hasher.finalize(),
            file_size,
        })
    }
}
