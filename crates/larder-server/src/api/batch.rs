//! `POST /caches/{cache}/paths/batch`: small store paths pushed many to a request, each with its
//! NAR, verified, stored in one pack and published in one transaction.
//!
//! A path of a few bytes pushed on its own costs two requests (the NAR, then its metadata), a
//! pack object with its `fsync`, and about twenty statements; that per-path cost, not bytes,
//! limited pushes of many small paths. A batch pays it once. Each path is checked exactly as a
//! single upload and publication would check it, and gets its own answer.
//!
//! The body (compressed as a whole as `?compression=` says: `none`, `zstd` or `xz`) is a
//! sequence of entries,
//! each: a 4-byte big-endian length, that many bytes of JSON ([`PathMetadata`]), then the
//! path's NAR, exactly `nar_size` bytes. At most [`MAX_PATHS`] entries, each NAR at most
//! [`MAX_NAR`] bytes and all of them at most [`MAX_NAR_BYTES`]: memory stays bounded while
//! the batch is held for its transaction.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::Json;
use bytes::{Buf, Bytes};
use larder_api::{BatchOutcome, BatchPublished, BatchStatus, PathMetadata};
use larder_nix::compression::Compression;
use larder_nix::hash::Sha256;
use larder_nix::nar::parse::{NarError, NarParser};
use larder_store::meta::{
    cdc_chunk_id, pack_object_key, BatchItem, CacheRow, ChunkRow, NarRow, NewPath, Pack, Publish,
};

use super::UploadCompression;
use crate::access::{CacheAccess, Push};
use crate::chunked::{ChunkWriter, NewChunk};
use crate::error::{ApiError, Rejection};
use crate::publish::{answer, checked_path, random_id, PathInfo};
use crate::AppState;

/// Most paths in one batch.
pub const MAX_PATHS: usize = 1000;
/// Largest NAR a batch may carry (bigger ones are uploaded on their own): those whose listing
/// is made when first asked for.
pub const MAX_NAR: u64 = crate::publish::UNLISTED_NAR;
/// Most NAR bytes in one batch.
pub const MAX_NAR_BYTES: u64 = 16 << 20;
/// Batches held in memory at once, server-wide (each up to [`MAX_NAR_BYTES`] of NAR, about as
/// much again of frames); others wait their turn before their body is read.
static IN_MEMORY: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);
/// Largest metadata entry (a path with thousands of references and signatures fits).
const MAX_HEADER: usize = 1 << 20;

/// One entry of the body: the path as declared, and its NAR as measured (or why it is not one).
struct Entry {
    meta: PathMetadata,
    nar: Result<Measured, ApiError>,
}

/// A NAR of a batch, verified and cut: its figures, and its chunks' frames one after another
/// (the file to serve).
///
/// Its `.ls` listing is not stored: a small NAR's is made when first asked for
/// ([`crate::publish::UNLISTED_NAR`]).
struct Measured {
    nar_hash: Sha256,
    nar_size: u64,
    file_hash: Sha256,
    frames: Vec<u8>,
    chunks: Vec<NewChunk>,
}

/// Publish many small paths, each with its NAR, in one request.
///
/// Each path is verified and checked as `POST …/nars` then `POST …/paths` would (NarHash and
/// NarSize measured, the NAR parsed, the signature checked or made, references published or
/// in the same batch before it) and answered on its own: a refused path does not stop the
/// others, but does stop those of the batch that refer to it.
#[utoipa::path(
    post,
    path = "/caches/{cache}/paths/batch",
    tag = "caches",
    operation_id = "publishBatch",
    params(
        crate::api::openapi::CachePath,
        ("compression" = String, Query, description = "How the whole body is compressed: `none`, `zstd` or `xz`."),
    ),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "Entries, each a 4-byte big-endian length, that many bytes of JSON (PathMetadata), then the NAR (nar_size bytes)."),
    responses(
        (status = 200, description = "What became of each path, in order.", body = BatchPublished),
        crate::api::openapi::CacheRefusals,
    ),
)]
pub(super) async fn publish_batch(
    State(state): State<AppState>,
    Path(_name): Path<String>,
    UploadCompression(compression): UploadCompression,
    CacheAccess { cache, .. }: CacheAccess<Push>,
    body: Body,
) -> Result<Json<BatchPublished>, ApiError> {
    state.objects.check_available().await?;
    let _turn = IN_MEMORY
        .acquire()
        .await
        .map_err(|e| ApiError::internal(io::Error::other(e)))?;
    let entries = receive(body, compression, state.config.max_upload_size).await?;
    let names: Vec<String> = entries.iter().map(|e| e.meta.store_path.clone()).collect();
    let mut seen = HashSet::new();
    if let Some(twice) = names.iter().find(|n| !seen.insert(n.as_str())) {
        return Err(ApiError::bad(format!(
            "{} is sent twice in one batch",
            crate::ingest::truncate(twice)
        )));
    }

    let measured: Vec<Option<(Sha256, u64)>> = (entries.iter())
        .map(|e| e.nar.as_ref().ok().map(|m| (m.nar_hash, m.nar_size)))
        .collect();
    // Each path checked against its NAR as measured, and signed.
    let mut answers: Vec<Option<BatchStatus>> = vec![None; entries.len()];
    let mut ready: Vec<Ready> = Vec::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let checked = entry.nar.and_then(|m| {
            let info = super::path_info(entry.meta)?;
            let new = checked_path(&state, &cache, &info, &nar_row(&m), None)?;
            Ok((info, m, new))
        });
        match checked {
            Ok((info, m, new)) => ready.push(Ready {
                index: i,
                info,
                rows: rows_of(&m),
                nar: m,
                new,
            }),
            Err(e) => answers[i] = Some(failed(e)?),
        }
    }

    // Which chunks the cache can see (used as stored, claimed) and which this batch stores,
    // as `chunked::store_nar` decides for one NAR.
    let claim_id = random_id()?;
    let ours: HashMap<&str, i64> = (ready.iter().flat_map(|r| &r.rows))
        .map(|r| (r.chunk_hash.as_str(), r.file_size))
        .collect();
    let stored = crate::chunked::hold_stored(&state, cache.id, &claim_id, &ours).await?;
    // A NAR sharing a chunk stored with another frame (another zstd) would be served as the
    // frames stored, whose hash this batch did not measure: it goes up on its own instead.
    ready.retain(|r| {
        let foreign = (r.rows.iter()).any(|c| {
            stored
                .get(&c.chunk_hash)
                .is_some_and(|s| s.file_size != c.file_size)
        });
        if foreign {
            answers[r.index] = Some(BatchStatus::SendAlone);
        }
        !foreign
    });
    let stored: HashSet<String> = stored.into_keys().collect();
    let result = store_and_publish(&state, &cache, &claim_id, stored, ready, &mut answers).await;
    if result.is_err() {
        let _ = state.meta.release_claims(&claim_id).await;
    }
    result?;
    let paths = (answers.into_iter().zip(names).zip(measured))
        .map(|((status, store_path), measured)| BatchOutcome {
            store_path,
            status: status.unwrap_or(BatchStatus::SendAlone),
            nar_hash: measured.map(|(h, _)| h.to_string()),
            nar_size: measured.map(|(_, n)| n),
        })
        .collect();
    Ok(Json(BatchPublished { paths }))
}

/// A path of the batch ready to publish: its place in the batch, its metadata, its NAR, the
/// NAR's chunk rows and the path to record.
struct Ready {
    index: usize,
    info: PathInfo,
    nar: Measured,
    rows: Vec<ChunkRow>,
    new: NewPath,
}

fn rows_of(m: &Measured) -> Vec<ChunkRow> {
    (m.chunks.iter())
        .map(|c| ChunkRow::new(cdc_chunk_id(&c.raw_hash), c.len as i64))
        .collect()
}

/// The NAR row of a measured NAR (its id not known yet).
fn nar_row(m: &Measured) -> NarRow {
    NarRow {
        id: 0,
        nar_hash: m.nar_hash,
        nar_size: m.nar_size as i64,
        compression: Compression::Zstd,
        file_hash: m.file_hash,
        file_size: m.frames.len() as i64,
    }
}

/// A path's refusal as its answer; a server error fails the whole batch (to be sent again).
fn failed(e: ApiError) -> Result<BatchStatus, ApiError> {
    let code = e.status();
    if code.is_server_error() {
        return Err(e);
    }
    Ok(BatchStatus::Failed {
        code: code.as_u16(),
        error: e.to_string(),
    })
}

/// Store the chunks of `ready` that `stored` (located and held) lacks, once each, as one pack,
/// then record the NARs and publish the paths in one transaction, answering each.
async fn store_and_publish(
    state: &AppState,
    cache: &CacheRow,
    claim_id: &str,
    stored: HashSet<String>,
    ready: Vec<Ready>,
    answers: &mut [Option<BatchStatus>],
) -> Result<(), ApiError> {
    let (ready, pack, bytes) = tokio::task::spawn_blocking(move || {
        let mut bytes = Vec::new();
        let mut chunks = Vec::new();
        let mut in_pack = HashSet::new();
        for r in &ready {
            for (c, row) in r.nar.chunks.iter().zip(&r.rows) {
                if stored.contains(&row.chunk_hash) || !in_pack.insert(row.chunk_hash.clone()) {
                    continue;
                }
                let frame = &r.nar.frames[c.offset as usize..(c.offset + c.len) as usize];
                chunks.push((row.chunk_hash.clone(), bytes.len() as i64, c.len as i64));
                bytes.extend_from_slice(frame);
            }
        }
        let pack = (!chunks.is_empty()).then(|| Pack {
            hash: Sha256::digest(&bytes).to_nix32(),
            size: bytes.len() as i64,
            chunks,
        });
        (ready, pack, bytes)
    })
    .await
    .map_err(|e| ApiError::internal(io::Error::other(e)))?;
    if let Some(pack) = &pack {
        state.meta.claim_pack(&pack.hash, pack.size).await?;
        (state.objects)
            .replace_bytes(&pack_object_key(&pack.hash), &bytes)
            .await?;
    }
    drop(bytes);
    let items: Vec<BatchItem> = ready
        .iter()
        .map(|r| BatchItem {
            nar: nar_row(&r.nar),
            chunks: r.rows.clone(),
            path: r.new.clone(),
        })
        .collect();
    let results = state
        .meta
        .publish_batch(claim_id, pack.as_ref(), &items)
        .await?;
    for (r, (outcome, nar)) in ready.into_iter().zip(results) {
        let status = match answer(state, cache, &r.info.store_path, &nar, outcome) {
            Ok(Publish::Created) => BatchStatus::Created {
                file_size: nar.file_size,
            },
            Ok(_) => BatchStatus::AlreadyPresent,
            Err(e) => failed(e)?,
        };
        answers[r.index] = Some(status);
    }
    Ok(())
}

/// Read the body's entries, each NAR verified and cut on a blocking thread as it arrives. A
/// body that is not a sequence of entries is refused whole (400); a NAR that is not valid is
/// its path's answer.
async fn receive(body: Body, compression: Compression, limit: u64) -> Result<Vec<Entry>, ApiError> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let worker = tokio::task::spawn_blocking(move || {
        let reader = BodyReader {
            rx,
            block: Bytes::new(),
        };
        match compression {
            Compression::None => parse(reader),
            Compression::Zstd => {
                parse(zstd::stream::read::Decoder::new(reader).map_err(ApiError::internal)?)
            }
            Compression::Xz => parse(xz2::read::XzDecoder::new_multi_decoder(reader)),
        }
    });
    let failure = crate::ingest::forward_body(body, limit, tx).await;
    let parsed = worker
        .await
        .map_err(|e| ApiError::internal(io::Error::other(e)))?;
    match failure {
        Some(f) => Err(f),
        None => parsed,
    }
}

/// The request body as a `Read`, on a blocking thread.
struct BodyReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    block: Bytes,
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.block.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.block = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.block.len());
        buf[..n].copy_from_slice(&self.block[..n]);
        self.block.advance(n);
        Ok(n)
    }
}

/// The entries of a (decompressed) body.
fn parse(mut body: impl Read) -> Result<Vec<Entry>, ApiError> {
    let mut entries = Vec::new();
    let mut total = 0u64;
    let mut compressor = None;
    let cut_short = |e: io::Error, what: &str| match e.kind() {
        io::ErrorKind::UnexpectedEof => ApiError::bad(format!("the batch ends inside {what}")),
        _ => ApiError::bad(format!("the batch is not a valid stream: {e}")),
    };
    loop {
        let mut len = [0u8; 4];
        // The end: no byte of another entry.
        let first = loop {
            match body.read(&mut len[..1]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(cut_short(e, "an entry")),
            }
        };
        if first == 0 {
            break;
        }
        let n = entries.len() + 1;
        body.read_exact(&mut len[1..])
            .map_err(|e| cut_short(e, "an entry's length"))?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_HEADER {
            return Err(ApiError::bad(format!(
                "entry {n} of the batch announces {len} bytes of metadata (at most {MAX_HEADER})"
            )));
        }
        if entries.len() == MAX_PATHS {
            return Err(ApiError::bad(format!(
                "a batch carries at most {MAX_PATHS} paths"
            )));
        }
        let mut header = vec![0; len];
        body.read_exact(&mut header)
            .map_err(|e| cut_short(e, "an entry's metadata"))?;
        let meta: PathMetadata = serde_json::from_slice(&header).map_err(|e| {
            ApiError::bad(format!(
                "entry {n} of the batch: invalid path metadata: {e}"
            ))
        })?;
        if meta.nar_size > MAX_NAR {
            return Err(ApiError::bad(format!(
                "{}: a NAR of {} bytes is too large for a batch (at most {MAX_NAR}); upload it on its own",
                crate::ingest::truncate(&meta.store_path),
                meta.nar_size
            )));
        }
        total += meta.nar_size;
        if total > MAX_NAR_BYTES {
            return Err(ApiError::bad(format!(
                "a batch carries at most {MAX_NAR_BYTES} bytes of NAR"
            )));
        }
        let mut nar = vec![0; meta.nar_size as usize];
        body.read_exact(&mut nar)
            .map_err(|e| cut_short(e, "a NAR"))?;
        let (measured, c) = verify(&nar, compressor.take())?;
        compressor = c;
        entries.push(Entry {
            meta,
            nar: measured,
        });
    }
    Ok(entries)
}

type Compressor = Option<zstd::bulk::Compressor<'static>>;

/// Verify `nar` is a NAR and cut it into chunks, as an upload's pipeline would: the NAR
/// measured, or why it is not one; and the compressor, to reuse.
fn verify(
    nar: &[u8],
    compressor: Compressor,
) -> Result<(Result<Measured, ApiError>, Compressor), ApiError> {
    let invalid = |e: NarError| {
        ApiError::rejected(
            Rejection::InvalidNar,
            format!("upload is not a valid NAR: {e}"),
        )
    };
    let mut parser = NarParser::streaming_listing();
    if let Err(e) = parser.feed(nar) {
        return Ok((Err(invalid(e)), compressor));
    }
    let summary = match parser.finish() {
        Ok(s) => s,
        Err(e) => return Ok((Err(invalid(e)), compressor)),
    };
    let mut writer = ChunkWriter::with_output(Vec::with_capacity(nar.len() / 2 + 64), compressor);
    writer.write(nar).map_err(ApiError::internal)?;
    let cut = writer.finish_output().map_err(ApiError::internal)?;
    let measured = Measured {
        nar_hash: summary.nar_hash,
        nar_size: summary.nar_size,
        file_hash: cut.file_hash,
        frames: cut.out,
        chunks: cut.chunks,
    };
    Ok((Ok(measured), cut.compressor))
}
