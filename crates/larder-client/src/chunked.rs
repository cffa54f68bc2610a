//! Push-side chunking: a NAR cut into content-defined chunks on the client (the server's own
//! cut, [`larder_nix::chunking`]), and only the chunks the cache lacks uploaded.
//!
//! The NAR is read once, on a blocking thread, and handed over in windows of [`WINDOW`] NAR
//! bytes (memory stays bounded whatever the NAR's size). For each window one bulk request asks
//! which of its chunks the cache lacks (`POST …/chunks/missing`); those are compressed, each
//! into a zstd frame of its own, and sent in bodies of a few frames (`POST …/chunks`); the
//! server answers with the ids it computed, which must be ours. Then `POST …/chunks/assemble`
//! with the NAR's chunk list has the server verify the whole NAR and hold it as a pending
//! upload, published like any other.
//!
//! The push session is the NAR's hash: chunks sent by an interrupted push stay claimed on the
//! server under it, so a rerun (or a retry) asks again and sends only the rest.
//!
//! When the cache lacks every chunk of the NAR's first window (a path new to it, the usual
//! first push), the NAR is sent whole instead ([`upload`] answers `None`; single-shot, or in
//! parts above `part_size`, resumable part by part): the server cuts
//! and stores it the same way, into the same chunks and the same file, but verifies it in one
//! pass as it arrives, where the chunked path verifies each chunk on upload and then reads
//! all of them back to assemble the NAR (bench/dedup.sh's first push of 100 MiB: 1.83-1.98 s
//! chunked, 1.33 s whole; bench/push.sh's new 256 MiB path: 6.30 s chunked, 4.42 s in
//! parts). Only the first window's chunking is spent; a NAR whose first MiB is all new
//! but whose rest the cache has is then sent in full, the price of deciding early.

use std::collections::HashSet;
use std::io::{self, Write};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use larder_api::AssembleRequest;
use larder_nix::chunking::Chunker;
use larder_nix::hash::Sha256;
use tokio::sync::mpsc;

use crate::api::{ApiClient, ClientError};
use crate::local_store::{LocalStoreError, PathInfo};
use crate::stall::{self, Progress};
use crate::upload::{write_nar, Observer, PushError, PushOptions, UploadResp, Verify};

/// NARs at least this large are pushed in chunks; smaller ones (a chunk or two) whole, which
/// costs one request instead of three.
pub const MIN_CHUNKED_NAR: u64 = 256 << 10;
/// NAR bytes per window: one `missing` query each.
const WINDOW: usize = 4 << 20;
/// NAR bytes of the first window, the one that decides whether the NAR is sent whole: small,
/// since for a path new to the cache its chunking is spent (bench/dedup.sh's first push, 24
/// NARs: 4 MiB cost the client ~0.1 s of SHA-256 and cutting that the server then redoes).
const FIRST_WINDOW: usize = 1 << 20;
/// Frame bytes per upload request.
const BODY: usize = 2 << 20;
/// Upload requests of one NAR at once.
const UPLOADS: usize = 2;
/// The zstd level of the frames sent: the server's (`larder_server::chunked::ZSTD_LEVEL`), so
/// that its canonical frame of a chunk is the frame it received.
const LEVEL: i32 = 3;

/// One chunk of a window: its id and bytes.
struct Chunk {
    id: String,
    bytes: Vec<u8>,
}

/// The chunk id of `bytes` (what the server names it: `<nix32 sha256>.zst`).
fn chunk_id(bytes: &[u8]) -> String {
    format!("{}.zst", Sha256::digest(bytes).to_nix32())
}

/// Cuts the NAR written through it into chunks and sends them on in windows.
struct ChunkSink {
    chunker: Chunker,
    window: Window,
}

/// The chunks not yet sent on.
struct Window {
    chunks: Vec<Chunk>,
    bytes: usize,
    tx: mpsc::Sender<Vec<Chunk>>,
    /// Until the first window is answered: whether to go on (a message) or stop (closed).
    /// Without it the NAR's next windows were read, cut and hashed while the first was asked
    /// about, and then again to send the NAR whole: most of a NAR of a few windows twice.
    gate: Option<std::sync::mpsc::Receiver<()>>,
}

impl Window {
    fn take(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.chunks.push(Chunk {
            id: chunk_id(chunk),
            bytes: chunk.to_vec(),
        });
        self.bytes += chunk.len();
        if self.bytes
            >= if self.gate.is_some() {
                FIRST_WINDOW
            } else {
                WINDOW
            }
        {
            self.send()?;
        }
        Ok(())
    }

    fn send(&mut self) -> io::Result<()> {
        if self.chunks.is_empty() {
            return Ok(());
        }
        self.bytes = 0;
        let stopped = || io::Error::new(io::ErrorKind::BrokenPipe, "chunk upload stopped");
        self.tx
            .blocking_send(std::mem::take(&mut self.chunks))
            .map_err(|_| stopped())?;
        match self.gate.take() {
            Some(gate) => gate.recv().map_err(|_| stopped()),
            None => Ok(()),
        }
    }
}

impl ChunkSink {
    fn new(tx: mpsc::Sender<Vec<Chunk>>, gate: std::sync::mpsc::Receiver<()>) -> Self {
        ChunkSink {
            chunker: Chunker::new(),
            window: Window {
                chunks: Vec::new(),
                bytes: 0,
                tx,
                gate: Some(gate),
            },
        }
    }

    fn finish(self) -> io::Result<()> {
        let ChunkSink {
            chunker,
            mut window,
        } = self;
        chunker.finish(&mut |c: &[u8]| window.take(c))?;
        window.send()
    }
}

impl Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let ChunkSink { chunker, window } = self;
        chunker.feed(data, &mut |c: &[u8]| window.take(c))?;
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Compress `chunks` into frames and pack them into request bodies of about [`BODY`] bytes,
/// each with the ids it holds. Blocking.
fn pack(chunks: Vec<Chunk>) -> io::Result<Vec<(Vec<String>, Vec<u8>)>> {
    let mut c = zstd::bulk::Compressor::new(LEVEL)?;
    c.include_checksum(false)?;
    c.include_contentsize(true)?;
    let mut bodies = Vec::new();
    let (mut ids, mut body) = (Vec::new(), Vec::new());
    for chunk in chunks {
        body.extend_from_slice(&c.compress(&chunk.bytes)?);
        ids.push(chunk.id);
        if body.len() >= BODY {
            bodies.push((std::mem::take(&mut ids), std::mem::take(&mut body)));
        }
    }
    if !ids.is_empty() {
        bodies.push((ids, body));
    }
    Ok(bodies)
}

/// Passes over the NAR one push makes at most when its assembly is refused for chunks gone
/// from the cache (see [`upload`]).
const PASSES: u32 = 3;

/// Push `info`'s NAR in chunks: what the server measured of it once assembled. `None`, with
/// nothing sent, when the NAR is better sent whole (see the module's documentation).
///
/// The chunks a push relies on are held for its session from the query that found them to
/// the assembly; two pushes of the same NAR at once (two CI jobs that built the same path)
/// share that session, and the first to assemble releases them. If the cache meanwhile lost
/// the path whose NAR held them (evicted, say), the second's assembly is refused (409: chunks
/// not in the cache): it asks again, sends what is now missing, and assembles again.
pub(crate) async fn upload(
    client: &ApiClient,
    cache: &str,
    info: &PathInfo,
    opts: &PushOptions,
    observer: &Arc<dyn Observer>,
) -> Result<Option<UploadResp>, PushError> {
    let mut pass = 1;
    loop {
        match upload_pass(client, cache, info, opts, observer).await {
            Err(PushError::Client(e @ ClientError::Status { status: 409, .. }))
                if pass < PASSES =>
            {
                observer.retrying(info, &e.to_string(), pass + 1);
                pass += 1;
            }
            r => return r,
        }
    }
}

/// One pass of [`upload`]: the NAR read, its missing chunks sent, and the NAR assembled.
async fn upload_pass(
    client: &ApiClient,
    cache: &str,
    info: &PathInfo,
    opts: &PushOptions,
    observer: &Arc<dyn Observer>,
) -> Result<Option<UploadResp>, PushError> {
    let session = info.nar_hash.to_nix32();
    let (tx, mut rx) = mpsc::channel::<Vec<Chunk>>(1);
    let (go, gate) = std::sync::mpsc::channel();
    let (source, info2, obs) = (opts.source.clone(), info.clone(), observer.clone());
    let producer = tokio::task::spawn_blocking(move || -> Result<(), PushError> {
        let sink = write_nar(
            &source,
            &info2,
            ChunkSink::new(tx, gate),
            Verify::ByServer,
            &obs,
        )?;
        sink.finish().map_err(|source| {
            PushError::Store(LocalStoreError::Write {
                path: info2.path.clone(),
                source,
            })
        })
    });
    let sent = send_windows(client, cache, &session, opts, observer, &mut rx, go).await;
    drop(rx);
    let produced = producer
        .await
        .map_err(|e| PushError::Internal(e.to_string()))?;
    let ids = match (produced, sent) {
        // We stopped reading the NAR on purpose.
        (_, Ok(None)) => return Ok(None),
        (Ok(()), sent) => sent?.ok_or_else(|| PushError::Internal("unreachable".into()))?,
        // We stopped reading the NAR (a request failed): that failure says why.
        (Err(PushError::Store(LocalStoreError::Write { .. })), Err(e)) => return Err(e),
        // A local error (corrupt or vanished path) explains a failed request best.
        (Err(e), _) => return Err(e),
    };
    let url = format!("/api/v1/caches/{cache}/chunks/assemble");
    let upload = stall::watch(
        client.assemble(
            cache,
            &AssembleRequest {
                session,
                chunks: ids,
            },
        ),
        &Progress::new(false),
        opts.stall_timeout,
        stall::work_allowance(info.nar_size),
        &url,
    )
    .await?;
    Ok(Some(UploadResp::from(upload)))
}

/// Ask, compress and upload window after window: the NAR's chunk ids, or
/// `None` (nothing sent) when the cache lacks every chunk of the first window.
async fn send_windows(
    client: &ApiClient,
    cache: &str,
    session: &str,
    opts: &PushOptions,
    observer: &Arc<dyn Observer>,
    rx: &mut mpsc::Receiver<Vec<Chunk>>,
    go: std::sync::mpsc::Sender<()>,
) -> Result<Option<Vec<String>>, PushError> {
    let mut first = true;
    let mut ids = Vec::new();
    let missing_url = format!("/api/v1/caches/{cache}/chunks/missing");
    let upload_url = format!("/api/v1/caches/{cache}/chunks");
    while let Some(window) = rx.recv().await {
        let mut asked = HashSet::new();
        let query: Vec<String> = window
            .iter()
            .filter(|c| asked.insert(c.id.clone()))
            .map(|c| c.id.clone())
            .collect();
        ids.extend(window.iter().map(|c| c.id.clone()));
        let missing: HashSet<String> = stall::watch(
            client.missing_chunks(cache, session, query),
            &Progress::new(false),
            opts.stall_timeout,
            Duration::from_secs(1),
            &missing_url,
        )
        .await?
        .into_iter()
        .collect();
        if std::mem::take(&mut first) {
            if missing.len() == asked.len() {
                return Ok(None);
            }
            // The reader waits for this after the first window (gone: it already ended).
            let _ = go.send(());
        }
        let mut once = HashSet::new();
        let todo: Vec<Chunk> = window
            .into_iter()
            .filter(|c| missing.contains(&c.id) && once.insert(c.id.clone()))
            .collect();
        if todo.is_empty() {
            continue;
        }
        let bodies = tokio::task::spawn_blocking(move || pack(todo))
            .await
            .map_err(|e| PushError::Internal(e.to_string()))?
            .map_err(|e| PushError::Internal(format!("cannot compress a chunk: {e}")))?;
        let requests: Vec<_> = bodies
            .into_iter()
            .map(|(want, body)| {
                let (len, url) = (body.len() as u64, &upload_url);
                async move {
                    let stored = stall::watch(
                        client.upload_chunks(cache, session, body),
                        &Progress::new(false),
                        opts.stall_timeout,
                        stall::work_allowance(WINDOW as u64),
                        url,
                    )
                    .await?;
                    let got: Vec<String> = stored.chunks.into_iter().map(|c| c.id).collect();
                    if got != want {
                        return Err(PushError::Internal(
                            "the server named the uploaded chunks otherwise".into(),
                        ));
                    }
                    observer.bytes(len);
                    Ok::<(), PushError>(())
                }
            })
            .collect();
        futures::stream::iter(requests)
            .buffer_unordered(UPLOADS)
            .try_collect::<Vec<()>>()
            .await?;
    }
    Ok(Some(ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_hold_the_servers_chunks_in_order() {
        let nar: Vec<u8> = (0..(9u32 << 20))
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let (tx, mut rx) = mpsc::channel(1000);
        let (go, gate) = std::sync::mpsc::channel();
        go.send(()).unwrap();
        let mut sink = ChunkSink::new(tx, gate);
        for piece in nar.chunks(100_000) {
            sink.write_all(piece).unwrap();
        }
        sink.finish().unwrap();
        let mut got = Vec::new();
        let mut windows = 0;
        while let Ok(w) = rx.try_recv() {
            windows += 1;
            got.extend(w);
        }
        assert!(windows >= 2, "{windows}");
        let lens: Vec<usize> = got.iter().map(|c| c.bytes.len()).collect();
        assert_eq!(lens, larder_nix::chunking::chunk_lengths(&nar));
        let joined: Vec<u8> = got.iter().flat_map(|c| c.bytes.clone()).collect();
        assert_eq!(joined, nar);
        assert!(got.iter().all(|c| c.id == chunk_id(&c.bytes)));
        // Frames packed into bodies decompress to the chunks, in order.
        let bodies = pack(got).unwrap();
        let mut back = Vec::new();
        for (_, body) in &bodies {
            back.extend(zstd::stream::decode_all(&body[..]).unwrap());
        }
        assert_eq!(back, nar);
    }

    /// The reader stops after the first window until told to go on, and stops for good when
    /// the NAR is to be sent whole instead (nothing more read, cut or hashed).
    #[test]
    fn the_reader_waits_for_the_first_windows_answer() {
        let nar: Vec<u8> = (0..(12u32 << 20))
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let (tx, mut rx) = mpsc::channel(1000);
        let (go, gate) = std::sync::mpsc::channel::<()>();
        let reader = std::thread::spawn(move || {
            let mut sink = ChunkSink::new(tx, gate);
            let mut written = 0;
            for piece in nar.chunks(100_000) {
                if sink.write_all(piece).is_err() {
                    return written;
                }
                written += piece.len();
            }
            sink.finish().map(|()| written).unwrap_or(written)
        });
        let first = rx.blocking_recv().unwrap();
        assert!(!first.is_empty());
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(rx.try_recv().is_err(), "a second window before the answer");
        drop(go);
        let written = reader.join().unwrap();
        assert!(
            written < 5 << 20,
            "read on after the first window: {written}"
        );
    }
}
