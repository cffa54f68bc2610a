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
//! store; a chunk stored elsewhere keeps its location, and the copy in this upload's pack is
//! unused.
//!
//! [`ChunkWriter`] runs on the upload's blocking thread, fed the NAR as it is verified; the
//! chunks it cuts are named and compressed on a pool of threads, one per core, and it appends
//! each frame, in the NAR's order, to one staging file and remembers where it is.
//! [`store_nar`] then claims the chunks it uses as stored, writes the others as one pack, and
//! records the NAR.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::sync::{mpsc, Arc, Mutex, OnceLock};

use futures::StreamExt;
use larder_nix::chunking::Chunker;
use larder_nix::compression::Compression;
use larder_nix::hash::{Sha256, Sha256Hasher};
use larder_store::meta::{cdc_chunk_id, pack_object_key, CacheRow, ChunkRow, NarRow, Pack};
use tempfile::TempPath;

use crate::error::ApiError;
use crate::AppState;

/// The zstd level of every stored chunk. Never changed lightly: a chunk stored at another
/// level keeps its frame, and NARs made with it then differ from those made without it.
/// Level 3 (zstd's default) compresses at about 300 MB/s per core here, which keeps the
/// server ahead of one client's upload; higher levels cost more CPU than they save bytes on
/// NARs.
pub const ZSTD_LEVEL: i32 = 3;

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

/// Chunks of one [`ChunkWriter`] being hashed and compressed at once, per pool thread: enough
/// to keep every thread busy while the writer waits for the oldest one, few enough that an
/// upload holds little memory (a chunk is at most 128 KiB, its frame about as much).
const IN_FLIGHT_PER_THREAD: usize = 4;

/// The threads that name and compress chunks ([`ChunkWriter`]), one per core, shared by every
/// upload: each has its own compressor, and the frame of a chunk does not depend on which
/// thread made it (a frame is compressed on its own, single-threaded, with the same settings).
struct Pool {
    jobs: mpsc::Sender<Job>,
    threads: usize,
}

/// A chunk to name and compress: the `seq`-th of a writer, which waits on `done`.
struct Job {
    seq: u64,
    chunk: Vec<u8>,
    done: mpsc::Sender<Done>,
}

/// A chunk's name and canonical frame.
struct Done {
    seq: u64,
    raw_hash: Sha256,
    frame: io::Result<Vec<u8>>,
}

/// The pool, started on first use (a server that never receives a NAR of more than one chunk
/// never starts it). Threads that fail to start are left out; with none, writers compress on
/// their own thread.
fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut threads = 0;
        for i in 0..cores {
            let rx = rx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("larder-chunk-{i}"))
                .spawn(move || pool_thread(&rx));
            threads += usize::from(thread.is_ok());
        }
        Pool { jobs: tx, threads }
    })
}

/// One thread of [`pool`]: takes jobs until the server exits.
fn pool_thread(jobs: &Mutex<mpsc::Receiver<Job>>) {
    let mut compressor = None;
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        // A panic (none is known) fails this chunk's upload, not the thread: the writer
        // waiting on it gets an error rather than waiting for ever.
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let raw_hash = Sha256::digest(&job.chunk);
            let frame = compress(&mut compressor, &job.chunk);
            (raw_hash, frame)
        }));
        let (raw_hash, frame) = done.unwrap_or_else(|_| {
            compressor = None;
            let failed = io::Error::other("compressing a chunk panicked");
            (Sha256::from_bytes([0; 32]), Err(failed))
        });
        // The writer is gone (its upload failed): nothing waits for this chunk.
        let _ = job.done.send(Done {
            seq: job.seq,
            raw_hash,
            frame,
        });
    }
}

/// `chunk`'s canonical frame, with `compressor` (made on first use).
fn compress(
    compressor: &mut Option<zstd::bulk::Compressor<'static>>,
    chunk: &[u8],
) -> io::Result<Vec<u8>> {
    let compressor = match compressor {
        Some(c) => c,
        None => compressor.insert(canonical_compressor()?),
    };
    let mut frame = Vec::new();
    canonical_frame(compressor, chunk, &mut frame)?;
    Ok(frame)
}

/// Cuts a NAR fed in blocks into chunks and writes each one's frame to a file.
///
/// Naming (SHA-256) and compressing the chunks is most of the CPU an upload costs, so it is
/// done on [`pool`]'s threads, a bounded number of chunks of this writer at a time
/// ([`IN_FLIGHT_PER_THREAD`] per thread); the frames are written in the NAR's order, so the
/// file is the same as one thread would make. The last chunks (those [`ChunkWriter::finish`]
/// cuts, less than 128 KiB: all of a small NAR) are compressed on the calling thread, which
/// spares the many small NARs two thread hand-offs.
///
/// The file is not `fsync`ed: it is a staging file, read back to store each chunk as an
/// object that is made durable itself before any row names it.
pub struct ChunkWriter<W: Write = io::BufWriter<std::fs::File>> {
    chunker: Chunker,
    frames: Frames<W>,
}

/// What [`ChunkWriter::finish_output`] gives back: the frames' SHA-256 and size, the chunks,
/// the output, and the compressor of the last chunks (for the next writer to reuse).
pub struct Cut<W> {
    pub file_hash: Sha256,
    pub file_size: u64,
    pub chunks: Vec<NewChunk>,
    pub out: W,
    pub compressor: Option<zstd::bulk::Compressor<'static>>,
}

/// What [`ChunkWriter`] does with the chunks its chunker cuts.
struct Frames<W> {
    out: W,
    hasher: Sha256Hasher,
    size: u64,
    chunks: Vec<NewChunk>,
    /// The pool's queue and its size (`None`: compress here).
    pool: Option<(mpsc::Sender<Job>, usize)>,
    done_tx: mpsc::Sender<Done>,
    done_rx: mpsc::Receiver<Done>,
    /// Chunks sent to the pool so far; `chunks.len()` of them are written.
    sent: u64,
    /// Chunks back from the pool before an earlier one, by number.
    early: BTreeMap<u64, (Sha256, Vec<u8>)>,
    /// For the chunks compressed on this thread.
    compressor: Option<zstd::bulk::Compressor<'static>>,
}

thread_local! {
    /// The compressor of the last chunks of the uploads this thread verified, kept for the
    /// next one: making a compressor costs more than compressing the few bytes of a small NAR,
    /// which Nix's uploader sends one to a request.
    static LAST_CHUNKS: std::cell::Cell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::Cell::new(None) };
}

impl ChunkWriter {
    pub fn new(file: std::fs::File) -> io::Result<Self> {
        Ok(Self::with_output(
            io::BufWriter::with_capacity(256 * 1024, file),
            LAST_CHUNKS.take(),
        ))
    }

    /// The file's SHA-256, its size and the chunks.
    pub fn finish(self) -> io::Result<(Sha256, u64, Vec<NewChunk>)> {
        let mut cut = self.finish_output()?;
        cut.out.flush()?;
        LAST_CHUNKS.set(cut.compressor);
        Ok((cut.file_hash, cut.file_size, cut.chunks))
    }
}

impl<W: Write> ChunkWriter<W> {
    /// A writer of frames to `out` (a buffer, for the small NARs of a batch), compressing the
    /// last chunks with `compressor` if given (making one costs more than compressing a
    /// chunk of a few bytes).
    pub fn with_output(out: W, compressor: Option<zstd::bulk::Compressor<'static>>) -> Self {
        let (done_tx, done_rx) = mpsc::channel();
        ChunkWriter {
            chunker: Chunker::new(),
            frames: Frames {
                out,
                hasher: Sha256Hasher::new(),
                size: 0,
                chunks: Vec::new(),
                pool: None,
                done_tx,
                done_rx,
                sent: 0,
                early: BTreeMap::new(),
                compressor,
            },
        }
    }

    pub fn write(&mut self, nar: &[u8]) -> io::Result<()> {
        let frames = &mut self.frames;
        self.chunker
            .feed(nar, &mut |chunk: &[u8]| frames.send(chunk))
    }

    /// Cut and compress what is left; the output is not flushed.
    pub fn finish_output(self) -> io::Result<Cut<W>> {
        let ChunkWriter {
            chunker,
            mut frames,
        } = self;
        while frames.in_flight() > 0 {
            frames.receive()?;
        }
        chunker.finish(&mut |chunk: &[u8]| {
            let frame = compress(&mut frames.compressor, chunk)?;
            frames.append(Sha256::digest(chunk), &frame)
        })?;
        Ok(Cut {
            file_hash: frames.hasher.finalize(),
            file_size: frames.size,
            chunks: frames.chunks,
            out: frames.out,
            compressor: frames.compressor,
        })
    }
}

impl<W: Write> Frames<W> {
    fn in_flight(&self) -> u64 {
        self.sent - self.chunks.len() as u64
    }

    /// Hand `chunk` to the pool, once fewer than the bound are in flight.
    fn send(&mut self, chunk: &[u8]) -> io::Result<()> {
        let (jobs, threads) = match &self.pool {
            Some(pool) => pool.clone(),
            None if pool().threads > 0 => {
                let pool = pool();
                self.pool.insert((pool.jobs.clone(), pool.threads)).clone()
            }
            None => {
                let frame = compress(&mut self.compressor, chunk)?;
                return self.append(Sha256::digest(chunk), &frame);
            }
        };
        while self.in_flight() >= (threads * IN_FLIGHT_PER_THREAD) as u64 {
            self.receive()?;
        }
        let job = Job {
            seq: self.sent,
            chunk: chunk.to_vec(),
            done: self.done_tx.clone(),
        };
        jobs.send(job)
            .map_err(|_| io::Error::other("the chunk compression threads are gone"))?;
        self.sent += 1;
        Ok(())
    }

    /// Wait for the next chunk back from the pool, and write every chunk that is then next.
    fn receive(&mut self) -> io::Result<()> {
        let done = self
            .done_rx
            .recv()
            .map_err(|_| io::Error::other("the chunk compression threads are gone"))?;
        self.early.insert(done.seq, (done.raw_hash, done.frame?));
        while let Some((raw_hash, frame)) = self.early.remove(&(self.chunks.len() as u64)) {
            self.append(raw_hash, &frame)?;
        }
        Ok(())
    }

    /// Append the next chunk's frame.
    fn append(&mut self, raw_hash: Sha256, frame: &[u8]) -> io::Result<()> {
        self.out.write_all(frame)?;
        self.hasher.update(frame);
        self.chunks.push(NewChunk {
            raw_hash,
            offset: self.size,
            len: frame.len() as u64,
        });
        self.size += frame.len() as u64;
        Ok(())
    }
}

/// The NAR a client sent, as the server measured it.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub nar_hash: Sha256,
    pub nar_size: u64,
}

/// Store a verified, chunked NAR and make it the pending upload `upload_id` of `cache` (under
/// `key`, the file name Nix's uploader used, if given). A NAR already visible in the cache is
/// reused as it is; otherwise every chunk not visible in the cache is written into one pack,
/// and the chunks used as stored (visible ones) are claimed first, so that garbage collection
/// leaves them alone until the NAR's row holds them.
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
        .map(|c| ChunkRow::new(cdc_chunk_id(&c.raw_hash), c.len as i64))
        .collect();
    let ours: HashMap<&str, i64> = rows
        .iter()
        .map(|r| (r.chunk_hash.as_str(), r.file_size))
        .collect();
    let stored = hold_stored(state, cache.id, upload_id, &ours).await?;
    let mut foreign = HashSet::new();
    // The chunks to store, by position in the NAR: each one not visible in the cache, once.
    let mut todo = Vec::new();
    let mut seen = HashSet::new();
    for (i, row) in rows.iter().enumerate() {
        if !seen.insert(row.chunk_hash.as_str()) {
            continue;
        }
        // `stored` holds located chunks only: one whose bytes were lost (fsck's repair
        // forgets where it was) is stored again, even if visible.
        match stored.get(&row.chunk_hash) {
            Some(s) if s.file_size != row.file_size => {
                foreign.insert(row.chunk_hash.clone());
            }
            Some(_) => {}
            None => todo.push(i),
        }
    }
    let frames = std::sync::Arc::new(std::fs::File::open(&file.path).map_err(ApiError::internal)?);
    let (file_hash, file_size) = if foreign.is_empty() {
        (file.file_hash, file.file_size)
    } else {
        for row in &mut rows {
            if let Some(s) = stored
                .get(&row.chunk_hash)
                .filter(|_| foreign.contains(&row.chunk_hash))
            {
                row.file_size = s.file_size;
            }
        }
        hash_stored(state, &rows, &foreign, &frames, &file.chunks).await?
    };
    let pack = if todo.is_empty() {
        None
    } else {
        Some(write_pack(state, &file, frames, &rows, &todo).await?)
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
    let (nar, _inserted) = match &pack {
        Some(pack) => {
            state
                .meta
                .insert_nar_for_pack(upload_id, cache.id, key, &row, &rows, pack)
                .await?
        }
        None => {
            state
                .meta
                .insert_nar_for_upload(upload_id, cache.id, key, &row, &rows)
                .await?
        }
    };
    Ok(nar)
}

/// The chunks of `ours` (id -> the size of this upload's frame) that an upload into `cache_id`
/// uses without storing them, by id: those located and visible in the cache, or stored with
/// another frame (another zstd version: a NAR's file is made of the frames as stored). Claimed
/// for `claim_id`, so that collection keeps them until the NAR's row holds them; one collected
/// meanwhile is left out, and stored by the upload instead. The others are stored by the
/// upload, in its pack, and need no claim: their rows are created, or located, in the
/// transaction recording the NAR.
pub async fn hold_stored(
    state: &AppState,
    cache_id: i64,
    claim_id: &str,
    ours: &HashMap<&str, i64>,
) -> Result<HashMap<String, ChunkRow>, ApiError> {
    let mut ids: Vec<String> = ours.keys().map(|id| (*id).to_owned()).collect();
    ids.sort_unstable();
    let visible = state.meta.chunks_visible_in_cache(cache_id, &ids).await?;
    let mut stored = state.meta.located_chunks(&ids).await?;
    let relied: Vec<String> = stored
        .values()
        .filter(|s| visible.contains(&s.chunk_hash) || s.file_size != ours[s.chunk_hash.as_str()])
        .map(|s| s.chunk_hash.clone())
        .collect();
    let held = state.meta.claim_existing_chunks(claim_id, &relied).await?;
    stored.retain(|id, _| held.contains(id));
    Ok(stored)
}

/// Store the frames of the chunks at positions `todo` of `file` as one pack, claimed first
/// (see `larder_store::meta::Pack`). When they are the whole file, in order, the staging file
/// itself is the pack (named by the file's hash, moved into place); otherwise their frames are
/// copied, in the NAR's order, into a new staging file.
async fn write_pack(
    state: &AppState,
    file: &ChunkedFile,
    frames: std::sync::Arc<std::fs::File>,
    rows: &[ChunkRow],
    todo: &[usize],
) -> Result<Pack, ApiError> {
    let whole = todo.len() == file.chunks.len();
    let (path, hash, size, offsets) = if whole {
        let offsets = file.chunks.iter().map(|c| c.offset as i64).collect();
        (None, file.file_hash, file.file_size, offsets)
    } else {
        let pieces: Vec<(u64, u64)> = todo
            .iter()
            .map(|&i| (file.chunks[i].offset, file.chunks[i].len))
            .collect();
        let (out, path) = state
            .staging
            .tempfile("upload", state.staging.dir())
            .map_err(ApiError::internal)?
            .into_parts();
        let (hash, size, offsets) =
            tokio::task::spawn_blocking(move || copy_frames(&frames, &pieces, out))
                .await
                .map_err(|e| ApiError::internal(io::Error::other(e)))?
                .map_err(ApiError::internal)?;
        (Some(path), hash, size, offsets)
    };
    let pack = Pack {
        hash: hash.to_nix32(),
        size: size as i64,
        chunks: todo
            .iter()
            .zip(offsets)
            .map(|(&i, offset)| (rows[i].chunk_hash.clone(), offset, rows[i].file_size))
            .collect(),
    };
    state.meta.claim_pack(&pack.hash, pack.size).await?;
    let key = pack_object_key(&pack.hash);
    match &path {
        Some(path) => state.objects.replace_file(&key, path).await?,
        None => state.objects.replace_file(&key, &file.path).await?,
    }
    Ok(pack)
}

/// Copy `pieces` (offset and length in `frames`) one after another into `out`: the pack's
/// SHA-256, its size, and each piece's offset in it.
fn copy_frames(
    frames: &std::fs::File,
    pieces: &[(u64, u64)],
    out: std::fs::File,
) -> io::Result<(Sha256, u64, Vec<i64>)> {
    let mut out = io::BufWriter::with_capacity(256 * 1024, out);
    let mut hasher = Sha256Hasher::new();
    let mut size = 0u64;
    let mut offsets = Vec::with_capacity(pieces.len());
    let mut buf = Vec::new();
    for &(offset, len) in pieces {
        buf.resize(len as usize, 0);
        frames.read_exact_at(&mut buf, offset)?;
        out.write_all(&buf)?;
        hasher.update(&buf);
        offsets.push(size as i64);
        size += len;
    }
    out.flush()?;
    Ok((hasher.finalize(), size, offsets))
}

/// Packs compacted per garbage collection at most (each a few reads and one write).
const COMPACT_PER_RUN: i64 = 16;
/// Bytes of live chunks read in one request while compacting.
const COMPACT_READ: u64 = 8 << 20;

/// Copy the live chunks of packs that garbage collection found less than half used into new
/// packs (see `larder_store::meta::Pack`), so that the store occupies about what the NARs
/// use. Returns the packs compacted; a pack that fails is logged and tried again next time.
pub async fn compact_packs(state: &AppState) -> Result<usize, ApiError> {
    let mut done = 0;
    for (old, size) in state.meta.packs_to_compact(COMPACT_PER_RUN).await? {
        match compact_pack(state, &old).await {
            Ok(Some(new)) => {
                done += 1;
                tracing::info!(
                    pack = %old,
                    size,
                    live = new.size,
                    "compacted a pack less than half used"
                );
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(pack = %old, error = %e, "compacting a pack failed"),
        }
    }
    Ok(done)
}

async fn compact_pack(state: &AppState, old: &str) -> Result<Option<Pack>, ApiError> {
    let live = state.meta.pack_chunks(old).await?;
    if live.is_empty() {
        return Ok(None); // collected as unused
    }
    let (out, path) = state
        .staging
        .tempfile("upload", state.staging.dir())
        .map_err(ApiError::internal)?
        .into_parts();
    let mut out = tokio::io::BufWriter::new(tokio::fs::File::from_std(out));
    let mut hasher = Sha256Hasher::new();
    let mut chunks = Vec::with_capacity(live.len());
    let mut size = 0i64;
    for row in &live {
        chunks.push((row.chunk_hash.clone(), size, row.file_size));
        size += row.file_size;
    }
    // The live chunks in the pack's order, neighbours read together.
    for run in larder_store::meta::runs(&live, COMPACT_READ) {
        let bytes = state.objects.read_range(&run.key, run.range).await?;
        hasher.update(&bytes);
        tokio::io::AsyncWriteExt::write_all(&mut out, &bytes)
            .await
            .map_err(ApiError::internal)?;
    }
    tokio::io::AsyncWriteExt::flush(&mut out)
        .await
        .map_err(ApiError::internal)?;
    let new = Pack {
        hash: hasher.finalize().to_nix32(),
        size,
        chunks,
    };
    state.meta.claim_pack(&new.hash, new.size).await?;
    state
        .objects
        .replace_file(&pack_object_key(&new.hash), &path)
        .await?;
    state.meta.relocate_chunks(old, &new).await?;
    Ok(Some(new))
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
            let (key, range) = row.location();
            let mut body = state.objects.get(&key, Some(range)).await?;
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
        // Each frame, whichever pool thread made it, is the one a lone compressor makes.
        let mut alone = canonical_compressor().unwrap();
        let mut want = Vec::new();
        for c in &chunks {
            let frame = &file[c.offset as usize..(c.offset + c.len) as usize];
            let raw = zstd::bulk::decompress(frame, 1 << 21).unwrap();
            assert_eq!(Sha256::digest(&raw), c.raw_hash);
            canonical_frame(&mut alone, &raw, &mut want).unwrap();
            assert_eq!(frame, &want[..]);
        }
        // Whatever blocks the NAR arrives in, the same file.
        let (hash2, _, _, _) = cut(1000);
        assert_eq!(hash2, hash);
    }
}
