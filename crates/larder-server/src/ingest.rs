//! The upload pipeline: a (compressed) NAR body streamed from the network into a staging file.
//!
//! On a blocking thread, each received block is written to the staging file, hashed into the
//! FileHash, decompressed, and fed to the NAR validator, which computes NarHash and NarSize.
//! Nothing the client claims is trusted: the caller compares these figures with the narinfo.
//! Memory is bounded by the channel (a few blocks), the decoders' windows and the chunker's
//! buffer, whatever the NAR size. A rejected or interrupted upload leaves only staging files,
//! which are deleted.
//!
//! What is kept is not the file received but the NAR cut into content-defined chunks, each
//! compressed the server's way ([`crate::chunked`]): what is stored and served does not depend
//! on how the client compressed it.

use std::io::{self, Write};

use axum::body::Body;
use bytes::Bytes;
use futures::StreamExt;
use larder_nix::hash::{Sha256, Sha256Hasher};
use larder_nix::nar::parse::{NarError, NarParser};
use tempfile::TempPath;
use tokio::io::AsyncWriteExt;

use crate::chunked::{ChunkWriter, ChunkedFile, NewChunk};
use crate::error::{ApiError, Rejection};

/// Blocks in flight between the network task and the hashing thread.
const CHANNEL_BLOCKS: usize = 16;

pub use larder_nix::compression::Compression;

/// Parse a compression name, or answer 415 naming the supported ones.
pub fn parse_compression(s: &str) -> Result<Compression, ApiError> {
    Compression::from_name(s).ok_or_else(|| {
        ApiError::UnsupportedMedia(format!(
            "unsupported compression {:?} (supported: zstd, xz, none)",
            truncate(s)
        ))
    })
}

/// Parse a NAR file name `<52 nix32>.nar[.xz|.zst]` into its FileHash and compression.
pub fn parse_nar_file_name(name: &str) -> Result<(Sha256, Compression), ApiError> {
    let bad = || ApiError::bad(format!("invalid NAR file name {:?}", truncate(name)));
    let (hash, ext) = name.split_once('.').ok_or_else(bad)?;
    let compression = match Compression::from_nar_suffix(ext) {
        Some(c) => c,
        // Compressions Nix knows but larder does not store: say so (415), with a hint.
        None if matches!(
            ext,
            "nar.bz2" | "nar.br" | "nar.lz4" | "nar.lzip" | "nar.gz"
        ) =>
        {
            return Err(ApiError::UnsupportedMedia(format!(
                "unsupported NAR compression in {:?} (supported: zstd, xz, none; \
                 hint: nix copy --to 'http://…?compression=zstd')",
                truncate(name)
            )))
        }
        None => return Err(bad()),
    };
    if hash.len() != 52 {
        return Err(bad());
    }
    let bytes = larder_nix::nixbase32::decode_fixed::<32>(hash).map_err(|_| bad())?;
    Ok((Sha256::from_bytes(bytes), compression))
}

pub fn truncate(s: &str) -> String {
    let mut t: String = s.chars().take(64).collect();
    if t.len() < s.len() {
        t.push('…');
    }
    t
}

/// Listings up to this size are kept in memory while the NAR is verified; a longer one goes to
/// a staging file as it grows. A small NAR's listing is a few hundred bytes and is not even
/// stored ([`crate::publish::UNLISTED_NAR`]): making a file for it, and syncing it, was a
/// third of the time Nix's uploader waited for each small NAR.
const LISTING_IN_MEMORY: usize = 64 << 10;

/// A NAR's `.ls` listing (JSON), as written while the NAR was verified.
#[derive(Debug)]
pub enum Listing {
    Memory(Vec<u8>),
    /// A staging file, deleted when dropped.
    File(TempPath),
}

/// Writes a listing: to memory until it passes [`LISTING_IN_MEMORY`], then to a staging
/// file (memory never grows with the number of entries).
pub struct ListingWriter {
    memory: Vec<u8>,
    file: Option<(io::BufWriter<std::fs::File>, TempPath)>,
    later: crate::staging::Later,
}

impl ListingWriter {
    /// A writer whose staging file, if the listing needs one, is an `upload` file of `staging`.
    pub fn new(staging: &crate::staging::Staging) -> Self {
        ListingWriter {
            memory: Vec::new(),
            file: None,
            later: staging.later("upload", staging.dir()),
        }
    }

    pub fn write_all(&mut self, text: &[u8]) -> io::Result<()> {
        if let Some((file, _)) = &mut self.file {
            return file.write_all(text);
        }
        if self.memory.len() + text.len() <= LISTING_IN_MEMORY {
            self.memory.extend_from_slice(text);
            return Ok(());
        }
        let (file, path) = self.later.make()?.into_parts();
        let mut file = io::BufWriter::with_capacity(64 * 1024, file);
        file.write_all(&self.memory)?;
        file.write_all(text)?;
        self.memory = Vec::new();
        self.file = Some((file, path));
        Ok(())
    }

    /// The listing written. A file is not synced: whoever stores it makes its copy durable.
    pub fn finish(self) -> io::Result<Listing> {
        match self.file {
            None => Ok(Listing::Memory(self.memory)),
            Some((file, path)) => {
                file.into_inner().map_err(|e| e.into_error())?;
                Ok(Listing::File(path))
            }
        }
    }
}

/// A verified upload waiting in the staging directory.
#[derive(Debug)]
pub struct Ingested {
    pub nar_hash: Sha256,
    pub nar_size: u64,
    /// SHA-256 and size of the body as received (what Nix's uploader names the file by).
    pub file_hash: Sha256,
    pub file_size: u64,
    pub compression: Compression,
    /// The NAR cut into chunks, each compressed as it is stored.
    pub chunked: ChunkedFile,
    /// The NAR's `.ls` listing, written while it was verified.
    pub listing: Listing,
}

/// Feeds decompressed bytes to the NAR validator, remembering its error for reporting, and
/// writes the listing it produces as it goes.
struct NarSink {
    parser: NarParser,
    error: Option<NarError>,
    listing: ListingWriter,
    /// `max_nar_size`: a NAR expanding past it is refused at once (a small compressed stream
    /// can claim terabytes).
    max_nar_size: u64,
    too_large: bool,
    /// Cuts and compresses the NAR as it is stored, when it is to be stored.
    chunks: Option<ChunkWriter>,
}

impl Write for NarSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.parser.bytes_seen() + buf.len() as u64 > self.max_nar_size {
            self.too_large = true;
            return Err(io::Error::new(io::ErrorKind::InvalidData, "NAR too large"));
        }
        if let Err(e) = self.parser.feed(buf) {
            self.error = Some(e);
            return Err(io::Error::new(io::ErrorKind::InvalidData, "invalid NAR"));
        }
        self.listing
            .write_all(self.parser.take_listing().as_bytes())?;
        if let Some(chunks) = &mut self.chunks {
            chunks.write(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Decoder {
    None(NarSink),
    Xz(xz2::write::XzDecoder<NarSink>),
    Zstd(zstd::stream::write::Decoder<'static, NarSink>),
}

impl Decoder {
    fn sink(&mut self) -> &mut NarSink {
        match self {
            Decoder::None(s) => s,
            Decoder::Xz(d) => d.get_mut(),
            Decoder::Zstd(d) => d.get_mut(),
        }
    }
}

struct Pipeline {
    /// `None` for an uncompressed body: its SHA-256 is the NarHash, computed by the parser.
    file_hasher: Option<Sha256Hasher>,
    file_size: u64,
    decoder: Decoder,
    compression: Compression,
}

impl Pipeline {
    fn new(
        listing: ListingWriter,
        chunks: Option<std::fs::File>,
        compression: Compression,
        max_nar_size: u64,
    ) -> io::Result<Self> {
        let sink = NarSink {
            parser: NarParser::streaming_listing(),
            error: None,
            listing,
            max_nar_size,
            too_large: false,
            chunks: chunks.map(ChunkWriter::new).transpose()?,
        };
        let decoder = match compression {
            Compression::None => Decoder::None(sink),
            Compression::Xz => Decoder::Xz(xz2::write::XzDecoder::new_multi_decoder(sink)),
            Compression::Zstd => Decoder::Zstd(zstd::stream::write::Decoder::new(sink)?),
        };
        Ok(Pipeline {
            file_hasher: (compression != Compression::None).then(Sha256Hasher::new),
            file_size: 0,
            decoder,
            compression,
        })
    }

    fn write(&mut self, block: &[u8]) -> Result<(), ApiError> {
        if let Some(h) = &mut self.file_hasher {
            h.update(block);
        }
        self.file_size += block.len() as u64;
        let res = match &mut self.decoder {
            Decoder::None(s) => s.write_all(block),
            Decoder::Xz(d) => d.write_all(block),
            Decoder::Zstd(d) => d.write_all(block),
        };
        res.map_err(|e| self.decode_error(e))
    }

    fn decode_error(&mut self, e: io::Error) -> ApiError {
        let sink = self.decoder.sink();
        if sink.too_large {
            return ApiError::NarTooLarge(sink.max_nar_size);
        }
        match sink.error.take() {
            Some(nar) => ApiError::rejected(
                Rejection::InvalidNar,
                format!("upload is not a valid NAR: {nar}"),
            ),
            None => ApiError::rejected(
                Rejection::InvalidNar,
                format!(
                    "upload is not a valid {} stream: {e}",
                    self.compression.as_str()
                ),
            ),
        }
    }

    fn finish(mut self) -> Result<Finished, ApiError> {
        let flushed = match &mut self.decoder {
            Decoder::None(_) => Ok(()),
            Decoder::Xz(_) => Ok(()), // finished below
            // Not just a flush: a stream that stops inside a frame is truncated, even when
            // the NAR it carries happens to be complete (clients would fail to decode it).
            Decoder::Zstd(d) => d.do_finish(),
        };
        flushed.map_err(|e| self.decode_error(e))?;
        let sink = match self.decoder {
            Decoder::None(s) => s,
            Decoder::Xz(mut d) => d.finish().map_err(|e| {
                ApiError::rejected(
                    Rejection::InvalidNar,
                    format!("upload is not a valid xz stream: {e}"),
                )
            })?,
            Decoder::Zstd(d) => d.into_inner(),
        };
        let NarSink {
            parser,
            listing,
            chunks,
            ..
        } = sink;
        let summary = parser.finish().map_err(|e| {
            ApiError::rejected(
                Rejection::InvalidNar,
                format!("upload is not a valid NAR: {e}"),
            )
        })?;
        let listing = listing.finish().map_err(ApiError::internal)?;
        let chunks = chunks
            .map(ChunkWriter::finish)
            .transpose()
            .map_err(ApiError::internal)?;
        Ok(Finished {
            nar_hash: summary.nar_hash,
            nar_size: summary.nar_size,
            file_hash: self
                .file_hasher
                .map_or(summary.nar_hash, Sha256Hasher::finalize),
            file_size: self.file_size,
            chunks,
            listing,
        })
    }
}

/// What a [`Pipeline`] measured.
struct Finished {
    nar_hash: Sha256,
    nar_size: u64,
    file_hash: Sha256,
    file_size: u64,
    listing: Listing,
    /// The stored form's figures and chunks, when it was cut.
    chunks: Option<(Sha256, u64, Vec<NewChunk>)>,
}

impl Finished {
    fn chunked(&mut self, path: TempPath) -> Result<ChunkedFile, ApiError> {
        let (file_hash, file_size, chunks) = self
            .chunks
            .take()
            .ok_or_else(|| ApiError::internal(io::Error::other("the NAR was not chunked")))?;
        Ok(ChunkedFile {
            path,
            file_hash,
            file_size,
            chunks,
        })
    }
}

/// Stream `body` into a staging file under `staging`, verifying it is a `compression`-compressed
/// NAR of at most `limit` stored bytes.
pub async fn ingest(
    body: Body,
    compression: Compression,
    limit: u64,
    max_nar_size: u64,
    staging: &crate::staging::Staging,
) -> Result<Ingested, ApiError> {
    let (file, path) = staging
        .tempfile("upload", staging.dir())
        .map_err(ApiError::internal)?
        .into_parts();
    let listing = ListingWriter::new(staging);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(CHANNEL_BLOCKS);
    let worker = tokio::task::spawn_blocking(move || {
        let mut pipeline = Pipeline::new(listing, Some(file), compression, max_nar_size)
            .map_err(ApiError::internal)?;
        while let Some(block) = rx.blocking_recv() {
            pipeline.write(&block)?;
        }
        pipeline.finish()
    });

    let failure = forward_body(body, limit, tx).await;
    let result = worker
        .await
        .map_err(|e| ApiError::internal(io::Error::other(e)))?;
    if let Some(f) = failure {
        return Err(f);
    }
    let mut done = result?;
    Ok(Ingested {
        nar_hash: done.nar_hash,
        nar_size: done.nar_size,
        file_hash: done.file_hash,
        file_size: done.file_size,
        compression,
        chunked: done.chunked(path)?,
        listing: done.listing,
    })
}

/// Hand `body`'s blocks to `tx` (a blocking worker's) until the body ends, the worker stops
/// taking them (it failed, and says why), or more than `limit` bytes arrived: the body's own
/// failure, if any (interrupted, or too large), which explains a worker's failure best.
pub async fn forward_body(
    body: Body,
    limit: u64,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) -> Option<ApiError> {
    let mut stream = body.into_data_stream();
    let mut received: u64 = 0;
    while let Some(block) = stream.next().await {
        let block = match block {
            Ok(b) => b,
            Err(e) => {
                return Some(ApiError::rejected(
                    Rejection::Interrupted,
                    format!("upload interrupted: {e}"),
                ))
            }
        };
        received += block.len() as u64;
        if received > limit {
            return Some(ApiError::PayloadTooLarge(limit));
        }
        if tx.send(block).await.is_err() {
            break;
        }
    }
    None
}

/// The `.ls` listing of a stored `compression`-compressed NAR file, whose blocks arrive on
/// `blocks`, made with the same pipeline that verifies uploads (the file was verified when it
/// was stored, so no size limit applies), written with `listing`. Blocking: call from a
/// blocking thread.
pub fn list_stored(
    blocks: &mut tokio::sync::mpsc::Receiver<Bytes>,
    compression: Compression,
    listing: ListingWriter,
) -> Result<Listing, ApiError> {
    let mut pipeline =
        Pipeline::new(listing, None, compression, u64::MAX).map_err(ApiError::internal)?;
    while let Some(block) = blocks.blocking_recv() {
        pipeline.write(&block)?;
    }
    pipeline.finish().map(|done| done.listing)
}

/// What verifying a multi-part upload measured: the whole file's figures and each part's hash.
#[derive(Debug)]
pub struct VerifiedParts {
    pub nar_hash: Sha256,
    pub nar_size: u64,
    pub file_hash: Sha256,
    pub file_size: u64,
    /// The NAR cut into chunks, each compressed as it is stored.
    pub chunked: ChunkedFile,
    /// The NAR's `.ls` listing.
    pub listing: Listing,
}

/// Verify the concatenation of `parts` (files, in order) as one `compression`-compressed NAR,
/// exactly like a single upload. Blocking: call from a blocking thread.
pub fn verify_parts(
    parts: &[std::path::PathBuf],
    compression: Compression,
    max_nar_size: u64,
    staging: &crate::staging::Staging,
) -> Result<VerifiedParts, ApiError> {
    use std::io::Read;
    let listing = ListingWriter::new(staging);
    let (chunk_file, chunk_path) = staging
        .tempfile("upload", staging.dir())
        .map_err(ApiError::internal)?
        .into_parts();
    let mut pipeline = Pipeline::new(listing, Some(chunk_file), compression, max_nar_size)
        .map_err(ApiError::internal)?;
    let mut buf = vec![0u8; 256 * 1024];
    for part in parts {
        let mut f = std::fs::File::open(part).map_err(ApiError::internal)?;
        loop {
            let n = f.read(&mut buf).map_err(ApiError::internal)?;
            if n == 0 {
                break;
            }
            pipeline.write(buf.get(..n).unwrap_or_default())?;
        }
    }
    let mut done = pipeline.finish()?;
    Ok(VerifiedParts {
        nar_hash: done.nar_hash,
        nar_size: done.nar_size,
        file_hash: done.file_hash,
        file_size: done.file_size,
        chunked: done.chunked(chunk_path)?,
        listing: done.listing,
    })
}

/// What one stored part of a multi-part upload holds, measured by the server: the part as
/// stored, and the NAR bytes it decompresses to on its own (`None` when it is not a whole
/// `compression` stream by itself, or would expand past the limit).
#[derive(Debug)]
pub struct MeasuredPart {
    pub file_hash: Sha256,
    pub file_size: u64,
    pub nar: Option<(Sha256, u64)>,
}

/// Hashes and counts what is read through it.
struct Tee<'a, R> {
    inner: R,
    hasher: &'a mut Sha256Hasher,
    size: &'a mut u64,
}

impl<R: io::Read> io::Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let read = buf.get(..n).unwrap_or_default();
        self.hasher.update(read);
        *self.size += n as u64;
        Ok(n)
    }
}

/// Measure the part stored at `path` (see [`MeasuredPart`]): a client resuming an upload
/// keeps a part only when the NAR bytes it holds are the ones it would send, and the server
/// verifies the whole again at completion. Errors are I/O errors reading the file; a part
/// that does not decompress has `nar: None`. Blocking: call from a blocking thread.
pub fn measure_part(
    path: &std::path::Path,
    compression: Compression,
    max_nar_size: u64,
) -> io::Result<MeasuredPart> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let (mut file_hasher, mut file_size) = (Sha256Hasher::new(), 0u64);
    let tee = Tee {
        inner: file,
        hasher: &mut file_hasher,
        size: &mut file_size,
    };
    let mut decoder: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(tee),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(tee)?),
        Compression::Xz => Box::new(xz2::read::XzDecoder::new_multi_decoder(tee)),
    };
    let mut nar_hasher = Sha256Hasher::new();
    let mut nar_size = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    let whole = loop {
        match decoder.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => {
                nar_size += n as u64;
                if nar_size > max_nar_size {
                    break false;
                }
                nar_hasher.update(buf.get(..n).unwrap_or_default());
            }
            // Not a whole stream: the decoders report truncation and garbage as I/O errors,
            // which the file's own read errors are too; tell them apart by reading it again.
            Err(_) => break false,
        }
    };
    drop(decoder);
    if !whole || file_size != len {
        // Hash the stored bytes in full (the decoder may have stopped early); a read error
        // here is the file's.
        let (mut h, mut n) = (Sha256Hasher::new(), 0u64);
        let mut f = std::fs::File::open(path)?;
        loop {
            let k = f.read(&mut buf)?;
            if k == 0 {
                break;
            }
            h.update(buf.get(..k).unwrap_or_default());
            n += k as u64;
        }
        return Ok(MeasuredPart {
            file_hash: h.finalize(),
            file_size: n,
            nar: None,
        });
    }
    Ok(MeasuredPart {
        file_hash: file_hasher.finalize(),
        file_size,
        nar: Some((nar_hasher.finalize(), nar_size)),
    })
}

/// Stream a body into a staging file in `dir` (at most `limit` bytes), returning its path, SHA-256
/// and size.
pub async fn spool_body(
    body: Body,
    limit: u64,
    staging: &crate::staging::Staging,
    dir: &std::path::Path,
) -> Result<(tempfile::TempPath, Sha256, u64), ApiError> {
    let tmp = staging.tempfile("spool", dir).map_err(ApiError::internal)?;
    let (file, path) = tmp.into_parts();
    // Async writes: a serving thread runs many connections and must never block on the disk.
    let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, tokio::fs::File::from_std(file));
    let mut hasher = Sha256Hasher::new();
    let mut size = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(block) = stream.next().await {
        let block = block.map_err(|e| ApiError::bad(format!("upload interrupted: {e}")))?;
        size += block.len() as u64;
        if size > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        hasher.update(&block);
        out.write_all(&block).await.map_err(ApiError::internal)?;
    }
    out.flush().await.map_err(ApiError::internal)?;
    let file = out.into_inner();
    file.sync_all().await.map_err(ApiError::internal)?;
    Ok((path, hasher.finalize(), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files_in(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().starts_with("upload-")
            })
            .count()
    }

    #[test]
    fn a_short_listing_stays_in_memory_and_a_long_one_goes_to_a_staging_file() {
        let dir = tempfile::tempdir().unwrap();
        let staging = crate::staging::Staging::open(dir.path()).unwrap();
        let mut short = ListingWriter::new(&staging);
        short.write_all(b"{\"version\":1,").unwrap();
        short.write_all(b"\"root\":{}}").unwrap();
        match short.finish().unwrap() {
            Listing::Memory(bytes) => assert_eq!(bytes, b"{\"version\":1,\"root\":{}}"),
            other => panic!("a short listing was written to {other:?}"),
        }
        assert_eq!(
            files_in(dir.path()),
            0,
            "no file is made for a short listing"
        );

        let mut long = ListingWriter::new(&staging);
        let mut expected = Vec::new();
        for i in 0..10_000 {
            let entry = format!("\"f{i}\":{{\"type\":\"regular\",\"size\":{i}}},");
            long.write_all(entry.as_bytes()).unwrap();
            expected.extend_from_slice(entry.as_bytes());
        }
        assert!(expected.len() > LISTING_IN_MEMORY);
        let Listing::File(path) = long.finish().unwrap() else {
            panic!("a listing of {} bytes was kept in memory", expected.len());
        };
        assert_eq!(
            std::fs::read(&path).unwrap(),
            expected,
            "every byte, in order"
        );
        assert_eq!(files_in(dir.path()), 1);
        drop(path);
        assert_eq!(
            files_in(dir.path()),
            0,
            "the staging file goes with the listing"
        );
    }
}
