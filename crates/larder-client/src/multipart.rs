//! Multi-part uploads of large NARs, resumed across runs.
//!
//! A NAR above the part size is split into parts of `part_size` NAR bytes, each compressed as
//! an independent frame (their concatenation is one valid stream) and sent, and on a transient
//! failure re-sent, on its own; the server verifies the whole at completion.
//!
//! An interrupted upload (Ctrl-C, a crash of either machine, a server restart) resumes in the
//! next run, whatever the client lost: uploads are opened with the NAR's hash and size as their
//! label, so the next push of the path finds its upload on the server
//! (`GET …/multipart?nar_hash=…&nar_size=…`, push permission on that cache only), asks the
//! server to measure the parts it holds, and keeps the leading parts whose NAR bytes (their
//! size and SHA-256, decompressed by the server) are exactly the ones it would send. That takes
//! one read of the kept NAR bytes to compare them; the rest is compressed and sent as usual,
//! numbered after the kept parts, and completion names the parts that make the NAR, so parts
//! kept under another part size (or compression level) fit. The server trusts none of it: it
//! verifies the concatenation at completion as for a fresh upload.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use larder_api::{MultipartOpened, Upload};
use larder_nix::hash::{Sha256, Sha256Hasher};
use tokio::sync::mpsc;

use crate::api::{ApiClient, ClientError};
use crate::local_store::{LocalStoreError, PathInfo};
use crate::retry::Retry;
use crate::stall::{self, Progress};
use crate::upload::{
    error_line, refused, transient, write_nar, Compression, Observer, PushError, PushOptions,
    SourceRef, UploadResp, Verify,
};

/// Compressed parts waiting to be sent, per upload (bounds memory to about two parts).
const PARTS_IN_FLIGHT: usize = 1;

/// Upload `info`'s NAR in parts, resuming the cache's unfinished upload of the same NAR when
/// there is one.
pub(crate) async fn upload(
    client: &ApiClient,
    cache: &str,
    info: &PathInfo,
    opts: &PushOptions,
    observer: &Arc<dyn Observer>,
) -> Result<UploadResp, PushError> {
    if let Some((id, kept)) = find(client, cache, info, opts).await? {
        match send(client, cache, info, opts, observer, &id, &kept).await {
            Ok(done) => return Ok(done),
            // Gone meanwhile (completed by another push of the same path, or expired), or
            // its parts do not make the NAR (two pushes wrote it with different part sizes):
            // start again, once, with an upload of our own.
            Err(PushError::Client(
                e @ ClientError::Status {
                    status: 400 | 404, ..
                },
            )) => {
                observer.retrying(
                    info,
                    &format!(
                        "cannot resume the unfinished upload ({}); uploading it whole",
                        error_line(&e)
                    ),
                    1,
                );
                abort(client, cache, opts, &id).await;
            }
            Err(e) => return Err(abandon_if_refused(client, cache, opts, &id, e).await),
        }
    }
    let id = open(client, cache, info, opts).await?;
    match send(client, cache, info, opts, observer, &id, &[]).await {
        Ok(done) => Ok(done),
        Err(e) => Err(abandon_if_refused(client, cache, opts, &id, e).await),
    }
}

/// After upload `id` failed with `e`: when the server refused it for good (a part over the
/// cache's staging bound, 413; a NAR that does not verify, 400), abandon the upload so that its
/// parts stop counting against the cache's bounds at once, instead of holding them until they
/// expire and locking the cache's next uploads out meanwhile. A transient failure keeps it, for
/// the retry (or the next run) to resume.
async fn abandon_if_refused(
    client: &ApiClient,
    cache: &str,
    opts: &PushOptions,
    id: &str,
    e: PushError,
) -> PushError {
    if refused(&e) {
        abort(client, cache, opts, id).await;
    }
    e
}

/// Abandon upload `id`, best effort: one that cannot be deleted now expires.
async fn abort(client: &ApiClient, cache: &str, opts: &PushOptions, id: &str) {
    let url = format!("/api/v1/caches/{cache}/multipart/{id}");
    let progress = Progress::new(false);
    let _ = stall::watch(
        client.abort_multipart(cache, id),
        &progress,
        opts.stall_timeout,
        Duration::ZERO,
        &url,
    )
    .await;
}

async fn open(
    client: &ApiClient,
    cache: &str,
    info: &PathInfo,
    opts: &PushOptions,
) -> Result<String, PushError> {
    let url = format!("/api/v1/caches/{cache}/multipart");
    let request = client.request(reqwest::Method::POST, &url).query(&[
        ("compression", opts.compression.as_str().to_owned()),
        ("nar_hash", info.nar_hash.to_typed_nix32()),
        ("nar_size", info.nar_size.to_string()),
    ]);
    let opening = async {
        client
            .send(request)
            .await?
            .json::<MultipartOpened>()
            .await
            .map_err(|e| PushError::Internal(format!("bad answer opening an upload: {e}")))
    };
    let progress = Progress::new(false);
    let opened = stall::watch(opening, &progress, opts.stall_timeout, Duration::ZERO, &url).await?;
    Ok(opened.upload_id)
}

/// A part the server holds, as it measured it.
#[derive(Debug, Clone, Copy)]
struct KeptPart {
    /// SHA-256 and size of the NAR bytes it holds.
    nar_hash: Sha256,
    nar_size: u64,
}

/// The cache's unfinished upload of this NAR in our compression, if any: its id and its
/// leading parts.
async fn find(
    client: &ApiClient,
    cache: &str,
    info: &PathInfo,
    opts: &PushOptions,
) -> Result<Option<(String, Vec<KeptPart>)>, PushError> {
    let url = format!("/api/v1/caches/{cache}/multipart");
    let nar_hash = info.nar_hash.to_typed_nix32();
    let listing = client.multipart_uploads(cache, &nar_hash, info.nar_size);
    let uploads = match stall::watch(
        listing,
        &Progress::new(false),
        opts.stall_timeout,
        Duration::ZERO,
        &url,
    )
    .await
    {
        Ok(u) => u,
        // A server that cannot list uploads (older than resumable uploads).
        Err(ClientError::Status {
            status: 404 | 405, ..
        }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Some(upload) = uploads
        .into_iter()
        .find(|u| u.compression == opts.compression.as_str())
    else {
        return Ok(None);
    };
    let detail = match stall::watch(
        client.multipart_upload(cache, &upload.upload_id),
        &Progress::new(false),
        opts.stall_timeout,
        Duration::ZERO,
        &url,
    )
    .await
    {
        Ok(d) => d,
        // Completed or expired since it was listed.
        Err(ClientError::Status { status: 404, .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Ok(Some((upload.upload_id, leading_parts(&detail.parts))))
}

/// The parts numbered from 0 with no gap that decompress on their own.
fn leading_parts(parts: &[crate::api::MultipartPart]) -> Vec<KeptPart> {
    let mut kept = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let hash = p.nar_hash.as_deref().and_then(|h| Sha256::parse(h).ok());
        match (hash, p.nar_size) {
            (Some(nar_hash), Some(nar_size)) if p.n as usize == i && nar_size > 0 => {
                kept.push(KeptPart { nar_hash, nar_size })
            }
            _ => break,
        }
    }
    kept
}

/// Sets its flag when dropped: a blocking reader stops when the push that started it is gone
/// (Ctrl-C).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// How many of the `kept` parts hold the NAR's first bytes, and how many bytes they hold.
#[derive(Default)]
struct Matched {
    parts: u32,
    bytes: u64,
    /// The comparison ended before the NAR did (a part differs, or all were compared).
    stopped: bool,
}

/// Compares the NAR written through it with the kept parts' figures, in order, and stops the
/// writer (an error) at the first part that differs or once every part is compared.
struct KeptChecker {
    kept: Vec<KeptPart>,
    hasher: Sha256Hasher,
    in_part: u64,
    matched: Arc<Mutex<Matched>>,
    cancel: Arc<AtomicBool>,
}

impl KeptChecker {
    fn stop(&self) -> io::Error {
        if let Ok(mut m) = self.matched.lock() {
            m.stopped = true;
        }
        io::Error::other("compared every kept part")
    }
}

impl Write for KeptChecker {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "push stopped"));
        }
        let done = self.matched.lock().map_or(0, |m| m.parts) as usize;
        let Some(&KeptPart {
            nar_hash: hash,
            nar_size: size,
            ..
        }) = self.kept.get(done)
        else {
            return Err(self.stop());
        };
        let room = (size - self.in_part).min(data.len() as u64) as usize;
        self.hasher.update(data.get(..room).unwrap_or(data));
        self.in_part += room as u64;
        if self.in_part == size {
            if std::mem::take(&mut self.hasher).finalize() != hash {
                return Err(self.stop());
            }
            self.in_part = 0;
            if let Ok(mut m) = self.matched.lock() {
                m.parts += 1;
                m.bytes += size;
            }
        }
        Ok(room)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Read the NAR up to the end of the kept parts, comparing: how many lead it, and their bytes.
async fn count_kept(
    source: &Option<SourceRef>,
    info: &PathInfo,
    kept: &[KeptPart],
) -> Result<(u32, u64), PushError> {
    let matched = Arc::new(Mutex::new(Matched::default()));
    let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
    let checker = KeptChecker {
        kept: kept.to_vec(),
        hasher: Sha256Hasher::new(),
        in_part: 0,
        matched: matched.clone(),
        cancel: cancel.0.clone(),
    };
    let (source, info2) = (source.clone(), info.clone());
    let read = tokio::task::spawn_blocking(move || {
        let silent: Arc<dyn Observer> = Arc::new(Silent);
        write_nar(&source, &info2, checker, Verify::ByServer, &silent).map(drop)
    })
    .await
    .map_err(|e| PushError::Internal(e.to_string()))?;
    let m = matched
        .lock()
        .map_err(|_| PushError::Internal("kept-part comparison panicked".into()))?;
    match read {
        Ok(()) => {}
        Err(LocalStoreError::Write { .. }) if m.stopped => {}
        Err(e) => return Err(e.into()),
    }
    Ok((m.parts, m.bytes))
}

/// Observes nothing: for reads whose bytes are counted elsewhere.
struct Silent;
impl Observer for Silent {}

/// Send what the server lacks of `info`'s NAR to upload `id`, which holds the parts `kept`
/// (from part 0), and complete it.
async fn send(
    client: &ApiClient,
    cache: &str,
    info: &PathInfo,
    opts: &PushOptions,
    observer: &Arc<dyn Observer>,
    id: &str,
    kept: &[KeptPart],
) -> Result<UploadResp, PushError> {
    let (first, skip) = if kept.is_empty() {
        (0, 0)
    } else {
        count_kept(&opts.source, info, kept).await?
    };
    if first > 0 {
        observer.resumed(info, first, skip);
    }
    let parts = if skip >= info.nar_size && first > 0 {
        first
    } else {
        send_parts(client, cache, info, opts, observer, id, first, skip).await?
    };
    let url = format!("/api/v1/caches/{cache}/multipart/{id}/complete?parts={parts}");
    let completing = async {
        client
            .send(client.request(reqwest::Method::POST, &url))
            .await?
            .json::<Upload>()
            .await
            .map(UploadResp::from)
            .map_err(|e| PushError::Internal(format!("bad answer completing an upload: {e}")))
    };
    // The server reads and verifies every part before it answers.
    let done = stall::watch(
        completing,
        &Progress::new(false),
        opts.stall_timeout,
        stall::work_allowance(info.nar_size),
        &url,
    )
    .await?;
    // The parts became the stored NAR: no unfinished upload is left to resume.
    observer.parts_kept(info, 0, 0);
    Ok(done)
}

/// Compress and send the NAR from byte `skip` on as parts `first`, `first + 1`, …: how many
/// parts the upload has then.
#[allow(clippy::too_many_arguments)]
async fn send_parts(
    client: &ApiClient,
    cache: &str,
    info: &PathInfo,
    opts: &PushOptions,
    observer: &Arc<dyn Observer>,
    id: &str,
    first: u32,
    skip: u64,
) -> Result<u32, PushError> {
    let (tx, mut rx) = mpsc::channel::<(Bytes, u64)>(PARTS_IN_FLIGHT);
    let splitter = PartSplitter {
        compression: opts.compression,
        level: opts.level,
        part_size: opts.part_size.max(1),
        skip,
        in_part: 0,
        current: None,
        tx,
        observer: observer.clone(),
    };
    let (source, info2) = (opts.source.clone(), info.clone());
    let producer = tokio::task::spawn_blocking(move || -> Result<(), PushError> {
        // The splitter counts the NAR bytes it compresses; those it skips were counted as kept.
        let silent: Arc<dyn Observer> = Arc::new(Silent);
        let mut splitter = write_nar(&source, &info2, splitter, Verify::Here, &silent)?;
        splitter
            .flush_part()
            .map_err(|source| LocalStoreError::Write {
                path: info2.path.clone(),
                source,
            })?;
        Ok(())
    });
    let mut n = first;
    let mut on_server = skip;
    let mut failure = None;
    while let Some((part, nar_bytes)) = rx.recv().await {
        let url = format!("/api/v1/caches/{cache}/multipart/{id}/parts/{n}");
        let mut retry = Retry::new(opts.attempts);
        loop {
            let progress = Progress::new(true);
            let request = client
                .request(reqwest::Method::PUT, &url)
                .header(reqwest::header::CONTENT_LENGTH, part.len())
                .body(progress.bytes_body(part.clone()));
            let r = stall::watch(
                client.send(request),
                &progress,
                opts.stall_timeout,
                stall::work_allowance(nar_bytes),
                &url,
            )
            .await;
            match r {
                Ok(_) => break,
                Err(e) => {
                    let e = PushError::Client(e);
                    match retry.wait(transient(&e)) {
                        Some(wait) => {
                            observer.retrying(
                                info,
                                &format!("part {n}: {}", error_line(&e)),
                                retry.attempt(),
                            );
                            tokio::time::sleep(wait).await;
                            retry.next();
                        }
                        None => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
            }
        }
        if failure.is_some() {
            break;
        }
        observer.bytes(part.len() as u64);
        n += 1;
        on_server += nar_bytes;
        observer.parts_kept(info, n, on_server);
    }
    drop(rx);
    let produced = producer
        .await
        .map_err(|e| PushError::Internal(e.to_string()))?;
    if let Some(e) = failure {
        return Err(e);
    }
    produced?;
    Ok(n)
}

/// Splits a NAR stream into parts of `part_size` NAR bytes, each compressed as an independent
/// frame (so their concatenation is one valid stream), handing each finished part and the NAR
/// bytes it holds to `tx`. The first `skip` bytes (held by kept parts) are dropped.
struct PartSplitter {
    compression: Compression,
    level: i32,
    part_size: u64,
    skip: u64,
    in_part: u64,
    current: Option<PartEncoder>,
    tx: mpsc::Sender<(Bytes, u64)>,
    observer: Arc<dyn Observer>,
}

enum PartEncoder {
    None(Vec<u8>),
    Zstd(zstd::Encoder<'static, Vec<u8>>),
    Xz(xz2::write::XzEncoder<Vec<u8>>),
}

impl PartSplitter {
    fn encoder(&self) -> io::Result<PartEncoder> {
        Ok(match self.compression {
            Compression::None => PartEncoder::None(Vec::new()),
            Compression::Zstd => {
                let mut e = zstd::Encoder::new(Vec::new(), self.level)?;
                let n = std::thread::available_parallelism().map_or(1, |n| n.get());
                let _ = e.multithread(n as u32);
                PartEncoder::Zstd(e)
            }
            Compression::Xz => PartEncoder::Xz(xz2::write::XzEncoder::new(
                Vec::new(),
                self.level.clamp(0, 9) as u32,
            )),
        })
    }

    /// Finish the current part (if any) and send it.
    fn flush_part(&mut self) -> io::Result<()> {
        let Some(enc) = self.current.take() else {
            return Ok(());
        };
        let bytes = match enc {
            PartEncoder::None(v) => v,
            PartEncoder::Zstd(e) => e.finish()?,
            PartEncoder::Xz(e) => e.finish()?,
        };
        let nar_bytes = std::mem::take(&mut self.in_part);
        self.tx
            .blocking_send((Bytes::from(bytes), nar_bytes))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "upload stopped"))
    }
}

impl Write for PartSplitter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.skip > 0 {
            let n = self.skip.min(data.len() as u64);
            self.skip -= n;
            return Ok(n as usize);
        }
        if self.in_part >= self.part_size {
            self.flush_part()?;
        }
        if self.current.is_none() {
            self.current = Some(self.encoder()?);
        }
        let room = (self.part_size - self.in_part).min(data.len() as u64) as usize;
        let chunk = data.get(..room).unwrap_or(data);
        match self.current.as_mut() {
            Some(PartEncoder::None(v)) => v.extend_from_slice(chunk),
            Some(PartEncoder::Zstd(e)) => e.write_all(chunk)?,
            Some(PartEncoder::Xz(e)) => e.write_all(chunk)?,
            None => {}
        }
        self.in_part += chunk.len() as u64;
        self.observer.nar_bytes(chunk.len() as u64);
        Ok(chunk.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::MultipartPart;
    use crate::push::NarSource;
    use larder_nix::store_path::StorePath;

    fn part(n: u32, nar: Option<&[u8]>) -> MultipartPart {
        MultipartPart {
            n,
            file_size: 1,
            file_hash: Sha256::digest(b"").to_typed_nix32(),
            nar_size: nar.map(|b| b.len() as u64),
            nar_hash: nar.map(|b| Sha256::digest(b).to_typed_nix32()),
        }
    }

    #[test]
    fn only_leading_parts_that_decompress_are_kept() {
        let kept = leading_parts(&[
            part(0, Some(b"ab")),
            part(1, Some(b"cd")),
            part(3, Some(b"x")),
        ]);
        assert_eq!(kept.len(), 2, "a gap ends the kept parts");
        assert!(leading_parts(&[part(0, None), part(1, Some(b"cd"))]).is_empty());
        assert!(leading_parts(&[part(1, Some(b"cd"))]).is_empty());
    }

    struct Fixed(Vec<u8>);
    impl NarSource for Fixed {
        fn write_nar(&self, _: &PathInfo, out: &mut dyn Write) -> Result<(), LocalStoreError> {
            for chunk in self.0.chunks(7) {
                out.write_all(chunk)
                    .map_err(|source| LocalStoreError::Write {
                        path: StorePath::from_basename("00000000000000000000000000000000-x")
                            .expect("store path"),
                        source,
                    })?;
            }
            Ok(())
        }
    }

    fn info(nar: &[u8]) -> PathInfo {
        PathInfo {
            path: StorePath::from_basename("00000000000000000000000000000000-x").expect("path"),
            nar_hash: Sha256::digest(nar),
            nar_size: nar.len() as u64,
            references: vec![],
            deriver: None,
            sigs: vec![],
            ca: None,
            registration_time: 0,
        }
    }

    #[tokio::test]
    async fn kept_parts_count_while_they_hold_the_nar() {
        let nar: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let source = Some(SourceRef(Arc::new(Fixed(nar.clone()))));
        let figures = |ranges: &[(usize, usize)], nar: &[u8]| -> Vec<KeptPart> {
            ranges
                .iter()
                .map(|&(a, b)| KeptPart {
                    nar_hash: Sha256::digest(&nar[a..b]),
                    nar_size: (b - a) as u64,
                })
                .collect()
        };
        let i = info(&nar);
        // Parts of any size, as long as they hold the NAR's bytes in order.
        let kept = figures(&[(0, 100), (100, 350), (350, 400)], &nar);
        assert_eq!(count_kept(&source, &i, &kept).await.ok(), Some((3, 400)));
        // The second part holds other bytes: only the first is kept.
        let mut other = nar.clone();
        other[150] ^= 1;
        let kept = figures(&[(0, 100), (100, 350)], &other);
        assert_eq!(count_kept(&source, &i, &kept).await.ok(), Some((1, 100)));
        // The whole NAR kept, and parts past its end.
        let kept = figures(&[(0, 500), (500, 1000)], &nar);
        assert_eq!(count_kept(&source, &i, &kept).await.ok(), Some((2, 1000)));
        let mut longer = nar.clone();
        longer.extend_from_slice(b"more");
        let kept = figures(&[(0, 500), (500, 1004)], &longer);
        assert_eq!(count_kept(&source, &i, &kept).await.ok(), Some((1, 500)));
    }

    #[test]
    fn the_splitter_starts_after_the_kept_bytes() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut s = PartSplitter {
            compression: Compression::None,
            level: 0,
            part_size: 300,
            skip: 400,
            in_part: 0,
            current: None,
            tx,
            observer: Arc::new(Silent),
        };
        let nar: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        for chunk in nar.chunks(7) {
            s.write_all(chunk).expect("write");
        }
        s.flush_part().expect("flush");
        drop(s);
        let mut parts = Vec::new();
        while let Ok((bytes, n)) = rx.try_recv() {
            assert_eq!(bytes.len() as u64, n);
            parts.push(bytes);
        }
        assert_eq!(parts.len(), 2);
        assert_eq!(parts.concat(), nar[400..]);
    }
}
