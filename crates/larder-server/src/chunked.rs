//! Content-defined chunking of every NAR the server stores: cut ([`larder_nix::chunking`]),
//! each chunk compressed on its own into one zstd frame, each frame stored once as the object
//! `chunk/ab/<hash>.zst`, named by the SHA-256 of the chunk's uncompressed bytes. A NAR's file
//! (what `nar/<filehash>.nar.zst` serves) is the concatenation of its chunks' frames, which is
//! one valid zstd stream.
//!
//! The frame is canonical: compressed by the server, at [`ZSTD_LEVEL`], without a checksum,
//! with the content size, single-threaded. So the file served for a NAR does not depend on
//! how the client compressed it, nor on which of its chunks the server had before: an upload
//! into one cache learns nothing from what other caches hold (see ARCHITECTURE.md, "No
//! cross-cache oracle"). For the same reason a chunk is written unless it is *visible in the
//! cache being uploaded to* (`Metadata::chunks_visible_in_cache`), not merely present in the
//! store; writing a chunk that exists keeps the stored object, which has the same bytes.
//!
//! [`ChunkWriter`] runs on the upload's blocking thread, fed the NAR as it is verified; it
//! appends each frame to one staging file and remembers where it is. [`store_nar`] then
//! claims the chunks, writes the missing ones, and records the NAR.

use std::collections::HashSet;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

use futures::StreamExt;
use larder_nix::chunking::Chunker;
use larder_nix::compression::Compression;
use larder_nix::hash::{Sha256, Sha256Hasher};
use larder_store::meta::{cdc_chunk_id, CacheRow, ChunkRow, NarRow};
use tempfile::TempPath;

use crate::error::ApiError;
use crate::AppState;

/// The zstd level of every stored chunk. Never changed lightly: a chunk stored at another
/// level keeps its frame, and NARs made with it then differ from those made without it.
/// Level 3 (zstd's default) compresses at about 300 MB/s per core here, which keeps the
/// server ahead of one client's upload; higher levels cost more CPU than they save bytes on
/// NARs.
pub const ZSTD_LEVEL: i32 = 3;

/// Frame bytes of chunk objects stored in one batch while storing a NAR.
const PUT_BATCH: u64 = 8 << 20;

/// One chunk of a NAR cut by [`ChunkWriter`]: its name and where its frame is in the file.
#[derive(Debug, Clone)]
pub struct NewChunk {
    /// SHA-256 of the chunk's uncompressed bytes.
    pub raw_hash: Sha256,
    /// Offset and length of its frame in [`ChunkedFile::path`].
    pub offset: u64,
    pub len: u64,
}

/// A NAR cut into chunks: the concatenation of their frames (the file to serve), its SHA-256
/// and size, and the chunks in order.
#[derive(Debug)]
pub struct ChunkedFile {
    pub path: TempPath,
    pub file_hash: Sha256,
    pub file_size: u64,
    pub chunks: Vec<NewChunk>,
}

/// Cuts a NAR fed in blocks into chunks and writes each one's frame to a file.
pub struct ChunkWriter {
    chunker: Chunker,
    compressor: zstd::bulk::Compressor<'static>,
    out: io::BufWriter<std::fs::File>,
    hasher: Sha256Hasher,
    size: u64,
    chunks: Vec<NewChunk>,
    frame: Vec<u8>,
}

/// The compressor of canonical frames: [`ZSTD_LEVEL`], no checksum, the content size recorded.
pub fn canonical_compressor() -> io::Result<zstd::bulk::Compressor<'static>> {
    let mut compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL)?;
    compressor.include_checksum(false)?;
    compressor.include_contentsize(true)?;
    Ok(compressor)
}

/// `chunk`'s canonical frame, into `frame` (cleared first).
pub fn canonical_frame(
    compressor: &mut zstd::bulk::Compressor<'static>,
    chunk: &[u8],
    frame: &mut Vec<u8>,
) -> io::Result<()> {
    frame.clear();
    frame.reserve(zstd::zstd_safe::compress_bound(chunk.len()));
    compressor.compress_to_buffer(chunk, frame)?;
    Ok(())
}

impl ChunkWriter {
    pub fn new(file: std::fs::File) -> io::Result<Self> {
        let compressor = canonical_compressor()?;
        Ok(ChunkWriter {
            chunker: Chunker::new(),
            compressor,
            out: io::BufWriter::with_capacity(256 * 1024, file),
            hasher: Sha256Hasher::new(),
            size: 0,
            chunks: Vec::new(),
            frame: Vec::new(),
        })
    }

    pub fn write(&mut self, nar: &[u8]) -> io::Result<()> {
        let ChunkWriter {
            chunker,
            compressor,
            out,
            hasher,
            size,
            chunks,
            frame,
        } = self;
        let mut emit = |chunk: &[u8]| emit(compressor, out, hasher, size, chunks, frame, chunk);
        chunker.feed(nar, &mut emit)
    }

    /// The file's SHA-256, its size and the chunks.
    pub fn finish(self) -> io::Result<(Sha256, u64, Vec<NewChunk>)> {
        let ChunkWriter {
            chunker,
            mut compressor,
            mut out,
            mut hasher,
            mut size,
            mut chunks,
            mut frame,
        } = self;
        let mut emit = |chunk: &[u8]| {
            emit(
                &mut compressor,
                &mut out,
                &mut hasher,
                &mut size,
                &mut chunks,
                &mut frame,
                chunk,
            )
        };
        chunker.finish(&mut emit)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok((hasher.finalize(), size, chunks))
    }
}

/// Compress one chunk into its canonical frame and append it.
fn emit(
    compressor: &mut zstd::bulk::Compressor<'static>,
    out: &mut io::BufWriter<std::fs::File>,
    hasher: &mut Sha256Hasher,
    size: &mut u64,
    chunks: &mut Vec<NewChunk>,
    frame: &mut Vec<u8>,
    chunk: &[u8],
) -> io::Result<()> {
    canonical_frame(compressor, chunk, frame)?;
    out.write_all(frame)?;
    hasher.update(frame);
    chunks.push(NewChunk {
        raw_hash: Sha256::digest(chunk),
        offset: *size,
        len: frame.len() as u64,
    });
    *size += frame.len() as u64;
    Ok(())
}

/// The NAR a client sent, as the server measured it.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub nar_hash: Sha256,
    pub nar_size: u64,
}

/// Store a verified, chunked NAR and make it the pending upload `upload_id` of `cache` (under
/// `key`, the file name Nix's uploader used, if given). A NAR already visible in the cache is
/// reused as it is; otherwise every chunk not visible in the cache is written (and claimed
/// first, so garbage collection leaves it alone until the NAR's row holds it).
pub async fn store_nar(
    state: &AppState,
    cache: &CacheRow,
    upload_id: &str,
    key: Option<&str>,
    measured: Measured,
    file: ChunkedFile,
) -> Result<NarRow, ApiError> {
    if state
        .meta
        .nar_visible_in_cache(cache.id, &measured.nar_hash)
        .await?
    {
        if let Some(nar) = state
            .meta
            .reuse_nar_for_upload(upload_id, cache.id, key, &measured.nar_hash)
            .await?
        {
            return Ok(nar);
        }
    }
    let mut rows: Vec<ChunkRow> = file
        .chunks
        .iter()
        .map(|c| ChunkRow {
            chunk_hash: cdc_chunk_id(&c.raw_hash),
            file_size: c.len as i64,
        })
        .collect();
    state.meta.claim_chunks(upload_id, &rows).await?;
    let mut ids: Vec<String> = rows.iter().map(|r| r.chunk_hash.clone()).collect();
    ids.sort_unstable();
    ids.dedup();
    let visible = state.meta.chunks_visible_in_cache(cache.id, &ids).await?;
    let stored = state.meta.chunk_sizes(&ids).await?;
    // A chunk stored earlier with another frame (another zstd version) keeps it: the file is
    // made of the frames as stored.
    let mut foreign = HashSet::new();
    let mut todo = Vec::new();
    let mut seen = HashSet::new();
    for (row, chunk) in rows.iter().zip(&file.chunks) {
        if !seen.insert(row.chunk_hash.as_str()) || visible.contains(&row.chunk_hash) {
            continue;
        }
        match stored.get(&row.chunk_hash) {
            Some(size) if *size != row.file_size => {
                foreign.insert(row.chunk_hash.clone());
            }
            _ => todo.push((row.object_key(), chunk.offset, chunk.len)),
        }
    }
    let frames = std::sync::Arc::new(std::fs::File::open(&file.path).map_err(ApiError::internal)?);
    // In batches of about [`PUT_BATCH`] bytes: a few syncs per NAR rather than two `fsync`s
    // per chunk (`ObjectStore::put_many`), in bounded memory.
    let mut todo = todo.into_iter().peekable();
    while todo.peek().is_some() {
        let mut batch = Vec::new();
        let mut batch_bytes = 0u64;
        while let Some(item) = todo.next_if(|_| batch_bytes < PUT_BATCH) {
            batch_bytes += item.2;
            batch.push(item);
        }
        let frames = frames.clone();
        let items = tokio::task::spawn_blocking(move || {
            batch
                .into_iter()
                .map(|(key, offset, len)| {
                    let mut buf = vec![0u8; len as usize];
                    frames.read_exact_at(&mut buf, offset)?;
                    Ok((key, bytes::Bytes::from(buf)))
                })
                .collect::<io::Result<Vec<_>>>()
        })
        .await
        .map_err(|e| ApiError::internal(io::Error::other(e)))?
        .map_err(ApiError::internal)?;
        state.objects.put_many(items).await?;
    }
    let (file_hash, file_size) = if foreign.is_empty() {
        (file.file_hash, file.file_size)
    } else {
        for row in &mut rows {
            if let Some(size) = stored
                .get(&row.chunk_hash)
                .filter(|_| foreign.contains(&row.chunk_hash))
            {
                row.file_size = *size;
            }
        }
        hash_stored(state, &rows, &foreign, &frames, &file.chunks).await?
    };
    let row = NarRow {
        id: 0,
        nar_hash: measured.nar_hash,
        nar_size: measured.nar_size as i64,
        compression: Compression::Zstd,
        file_hash,
        file_size: file_size as i64,
    };
    // A NAR recorded concurrently (or earlier, in another cache) is used instead: for a NAR
    // stored by this version it is the same file.
    let (nar, _inserted) = state
        .meta
        .insert_nar_for_upload(upload_id, cache.id, key, &row, &rows)
        .await?;
    Ok(nar)
}

/// Read the frame at `offset` of the chunked file.
async fn read_frame(
    frames: std::sync::Arc<std::fs::File>,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, ApiError> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        frames.read_exact_at(&mut buf, offset).map(|()| buf)
    })
    .await
    .map_err(|e| ApiError::internal(io::Error::other(e)))?
    .map_err(ApiError::internal)
}

/// The SHA-256 and size of the file made of `rows`' frames as stored: ours, except the
/// `foreign` ones, read from the object store.
async fn hash_stored(
    state: &AppState,
    rows: &[ChunkRow],
    foreign: &HashSet<String>,
    frames: &std::sync::Arc<std::fs::File>,
    chunks: &[crate::chunked::NewChunk],
) -> Result<(Sha256, u64), ApiError> {
    let mut hasher = Sha256Hasher::new();
    let mut size = 0u64;
    for (row, chunk) in rows.iter().zip(chunks) {
        if foreign.contains(&row.chunk_hash) {
            let mut body = state.objects.get(&row.object_key(), None).await?;
            while let Some(block) = body.stream.next().await {
                let block = block.map_err(ApiError::internal)?;
                hasher.update(&block);
                size += block.len() as u64;
            }
        } else {
            let bytes = read_frame(frames.clone(), chunk.offset, chunk.len).await?;
            hasher.update(&bytes);
            size += bytes.len() as u64;
        }
    }
    Ok((hasher.finalize(), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_concatenate_to_the_nar_and_are_canonical() {
        let nar: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ (i / 5000) as u8)
            .collect();
        let cut = |block: usize| {
            let tmp = tempfile::NamedTempFile::new().unwrap();
            let mut w = ChunkWriter::new(tmp.reopen().unwrap()).unwrap();
            for piece in nar.chunks(block) {
                w.write(piece).unwrap();
            }
            let (hash, size, chunks) = w.finish().unwrap();
            let file = std::fs::read(tmp.path()).unwrap();
            (hash, size, chunks, file)
        };
        let (hash, size, chunks, file) = cut(65_536);
        assert_eq!(size, file.len() as u64);
        assert_eq!(hash, Sha256::digest(&file));
        assert!(chunks.len() > 1);
        let whole = zstd::stream::decode_all(&file[..]).unwrap();
        assert_eq!(whole, nar);
        for c in &chunks {
            let frame = &file[c.offset as usize..(c.offset + c.len) as usize];
            let raw = zstd::bulk::decompress(frame, 1 << 21).unwrap();
            assert_eq!(Sha256::digest(&raw), c.raw_hash);
        }
        // Whatever blocks the NAR arrives in, the same file.
        let (hash2, _, _, _) = cut(1000);
        assert_eq!(hash2, hash);
    }
}
