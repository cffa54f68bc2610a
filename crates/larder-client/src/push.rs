//! The push pipeline: local store → (closure, filters, one bulk "missing" query) → parallel
//! streaming uploads, published in dependency order.
//!
//! Each path's NAR is serialised by larder from the filesystem ([`dump_verified`], which checks
//! the NarHash against the store's record while streaming), compressed on the client, and
//! streamed to `POST /api/v1/caches/<c>/nars`; memory stays bounded by a few blocks per job
//! whatever the NAR size; large NARs go up in parts and resume across runs (`multipart`). The
//! server measures the NAR itself; publishing
//! (`POST …/paths`) then happens only after every reference of the path is published, so an
//! interrupted push never leaves a path without its references. Uploads run in parallel
//! (`jobs`); a path waits only for its own references.
//!
//! Paths signed by an upstream key (default `cache.nixos.org-1`) are skipped: Nix substitutes
//! them from upstream. Their signed metadata is sent along with the paths that reference them
//! so the server can check the upstream signature instead of the reference's presence.

use std::collections::{HashMap, HashSet};
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use larder_api::{PathMetadata, PublishRequest, PublishStatus, Upload, UpstreamRef};
use larder_nix::store_path::StorePath;
use serde::Serialize;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::api::{ApiClient, ClientError};
pub use crate::chunked::MIN_CHUNKED_NAR;
use crate::local_store::{LocalStore, LocalStoreError, PathInfo};
use crate::retry::Retry;
pub use crate::stall::DEFAULT_STALL_TIMEOUT;
use crate::stall::{self, Progress};
pub use crate::upload::{
    error_line, failure_line, Compression, Failure, NarSource, Observer, Outcome, PushError,
    PushOptions, SourceRef, DEFAULT_PART_SIZE,
};
use crate::upload::{transient, write_nar, UploadResp, Verify};

/// Blocks of compressed NAR in flight per upload.
pub(crate) const CHANNEL_BLOCKS: usize = 8;
/// Size of one block sent to the network.
const BLOCK: usize = 256 * 1024;
/// Paths per bulk `missing` query.
const MISSING_BATCH: usize = 5000;
/// NARs larger than this are compressed with zstd's worker threads.
const MT_THRESHOLD: u64 = 8 << 20;

/// What a push will do, decided before any byte is uploaded.
#[derive(Debug, Default)]
pub struct Plan {
    /// Paths to upload, in dependency order.
    pub paths: Vec<PathInfo>,
    /// Paths considered (closure size after `--no-closure`).
    pub total: usize,
    /// Already in the cache.
    pub present: usize,
    /// Skipped because an upstream key signed them.
    pub upstream: Vec<PathInfo>,
    /// Skipped by `--exclude`.
    pub excluded: usize,
    /// Realisations of content-addressed derivations to write once the paths are in, in
    /// dependency order (`crate::realisations`).
    pub realisations: Vec<larder_nix::realisation::Realisation>,
}

impl Plan {
    pub fn nar_bytes(&self) -> u64 {
        self.paths.iter().map(|p| p.nar_size).sum()
    }
}

/// Which of `paths` (absolute store paths) the cache lacks: bulk queries of
/// [`MISSING_BATCH`] paths.
pub async fn missing(
    client: &ApiClient,
    cache: &str,
    paths: Vec<String>,
) -> Result<HashSet<String>, PushError> {
    let mut missing = HashSet::new();
    for batch in paths.chunks(MISSING_BATCH) {
        missing.extend(client.missing(cache, batch.to_vec()).await?);
    }
    Ok(missing)
}

/// Compute what to push: closure, filters, and one bulk query for what the cache lacks.
pub async fn plan(
    client: &ApiClient,
    cache: &str,
    store: LocalStore,
    roots: Vec<StorePath>,
    opts: &PushOptions,
) -> Result<(Plan, LocalStore), PushError> {
    let closure = opts.closure;
    let (infos, store) = tokio::task::spawn_blocking(move || {
        let mut store = store;
        let r = if closure {
            store.closure(&roots)
        } else {
            store.query_path_infos(&roots).and_then(|v| {
                v.into_iter()
                    .zip(&roots)
                    .map(|(i, p)| {
                        i.ok_or_else(|| LocalStoreError::NotValid {
                            path: p.clone(),
                            referrer: None,
                        })
                    })
                    .collect()
            })
        };
        let r = r.and_then(|infos| {
            let paths: Vec<StorePath> = infos.iter().map(|i| i.path.clone()).collect();
            store.realisations_of(&paths).map(|rs| (infos, rs))
        });
        (r, store)
    })
    .await
    .map_err(|e| PushError::Internal(e.to_string()))?;
    let (infos, realisations) = infos?;
    let mut plan = Plan {
        total: infos.len(),
        ..Plan::default()
    };
    let mut candidates = Vec::new();
    for info in infos {
        let abs = info.path.to_absolute();
        if opts.exclude.iter().any(|r| r.is_match(&abs)) {
            plan.excluded += 1;
        } else if !opts.include_upstream
            && info.sigs.iter().any(|s| {
                let name = s.split(':').next().unwrap_or("");
                opts.upstream_keys.iter().any(|k| k == name)
            })
        {
            plan.upstream.push(info);
        } else {
            candidates.push(info);
        }
    }
    // A frozen server must not hang the plan either: a second per bulk query on top of the
    // stall timeout. The query only reads: a server away for a moment (restarting) is asked
    // again, as an upload would be.
    let batches = candidates.len().div_ceil(MISSING_BATCH) as u64;
    let asked: Vec<String> = candidates.iter().map(|i| i.path.to_absolute()).collect();
    let url = &format!("/api/v1/caches/{cache}/missing");
    let missing = crate::retry::repeat(
        opts.attempts,
        transient,
        |_, _, _| {},
        || {
            let asked = asked.clone();
            async move {
                // Each attempt's watchdog starts afresh.
                let progress = Progress::new(false);
                let query = missing(client, cache, asked);
                let after_body = Duration::from_secs(batches);
                stall::watch(query, &progress, opts.stall_timeout, after_body, url).await
            }
        },
    )
    .await?;
    let in_cache: HashSet<StorePath> = candidates.iter().map(|i| i.path.clone()).collect();
    plan.realisations = crate::realisations::pushable(realisations, &in_cache);
    for info in candidates {
        if missing.contains(&info.path.to_absolute()) {
            plan.paths.push(info);
        } else {
            plan.present += 1;
        }
    }
    Ok((plan, store))
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub pushed: usize,
    pub skipped: usize,
    pub failed: usize,
    /// NAR bytes of the pushed paths.
    pub bytes: u64,
    /// Bytes uploaded (request bodies: compressed NARs, parts, chunk frames), of failed paths
    /// too.
    pub uploaded: u64,
    pub seconds: f64,
    pub failures: Vec<Failure>,
}

impl Summary {
    /// Fold in the summary of a later round of the same push (after [`replan_needed`]): its
    /// failures replace ours; paths we skipped as present and it pushed count as pushed.
    pub fn absorb(&mut self, later: Summary) {
        self.pushed += later.pushed;
        self.bytes += later.bytes;
        self.uploaded += later.uploaded;
        self.seconds += later.seconds;
        self.skipped = self.skipped.saturating_sub(later.pushed);
        self.failed = later.failed;
        self.failures = later.failures;
    }
}

/// Upload `plan.paths` with up to `opts.jobs` in parallel, publishing each after its
/// references. `skipped` in the summary counts present, upstream, excluded and vanished paths.
pub async fn execute(
    client: &ApiClient,
    cache: &str,
    plan: &Plan,
    opts: &PushOptions,
    observer: Arc<dyn Observer>,
) -> Summary {
    let start = Instant::now();
    let upstream: Arc<HashMap<String, UpstreamRef>> = Arc::new(
        plan.upstream
            .iter()
            .map(|i| (i.path.to_absolute(), upstream_ref(i)))
            .collect(),
    );
    let shared = Arc::new(crate::batch::Shared {
        client: client.clone(),
        cache: cache.to_owned(),
        opts: opts.clone(),
        observer: observer.clone(),
        upstream,
        unsupported: AtomicBool::new(false),
    });
    let mut done: HashMap<String, watch::Receiver<Option<bool>>> = HashMap::new();
    let sem = Arc::new(Semaphore::new(opts.jobs.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for unit in units(&plan.paths, opts.batching) {
        // Spawned in dependency order: a task only ever waits for earlier tasks, which hold
        // permits or are finished, so the semaphore cannot deadlock.
        let permit = match sem.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => break,
        };
        let shared = shared.clone();
        match unit {
            Unit::One(info) => {
                let deps = waits(&done, &info, &HashSet::new());
                let (tx, rx) = watch::channel(None);
                done.insert(info.path.to_absolute(), rx);
                tasks.spawn(async move {
                    let _permit = permit;
                    shared.observer.started(&info);
                    let outcome = push_counted(&shared, &info, deps).await;
                    let _ = tx.send(Some(matches!(
                        outcome,
                        Outcome::Pushed { .. } | Outcome::AlreadyPresent
                    )));
                    shared.observer.finished(&info, &outcome);
                    vec![(info, outcome)]
                });
            }
            Unit::Batch(infos) => {
                let inside: HashSet<StorePath> = infos.iter().map(|i| i.path.clone()).collect();
                let members: Vec<crate::batch::Member> = infos
                    .into_iter()
                    .map(|info| {
                        let deps = waits(&done, &info, &inside);
                        let (tx, rx) = watch::channel(None);
                        done.insert(info.path.to_absolute(), rx);
                        crate::batch::Member {
                            info,
                            deps,
                            done: tx,
                        }
                    })
                    .collect();
                tasks.spawn(async move {
                    let _permit = permit;
                    crate::batch::push(&shared, members).await
                });
            }
        }
    }
    let mut s = Summary {
        skipped: plan.present + plan.upstream.len() + plan.excluded,
        ..Summary::default()
    };
    while let Some(res) = tasks.join_next().await {
        match res {
            Ok(outcomes) => {
                for (info, outcome) in outcomes {
                    match outcome {
                        Outcome::Pushed { uploaded, .. } => {
                            s.pushed += 1;
                            s.bytes += info.nar_size;
                            s.uploaded += uploaded;
                        }
                        Outcome::AlreadyPresent | Outcome::Vanished => s.skipped += 1,
                        Outcome::Failed { error: e, uploaded } => {
                            s.failed += 1;
                            s.uploaded += uploaded;
                            s.failures.push(Failure {
                                path: info.path.to_absolute(),
                                error: e,
                            });
                        }
                    }
                }
            }
            Err(e) => {
                s.failed += 1;
                s.failures.push(Failure {
                    path: String::new(),
                    error: format!("internal error: {e}"),
                });
            }
        }
    }
    let failed: HashSet<String> = s.failures.iter().map(|f| f.path.clone()).collect();
    let realisation_failures = crate::realisations::push(
        client,
        cache,
        &plan.realisations,
        opts.signing_key.as_ref(),
        &failed,
    )
    .await;
    s.failed += realisation_failures.len();
    s.failures.extend(realisation_failures);
    s.seconds = start.elapsed().as_secs_f64();
    s
}

/// Rounds of planning and pushing [`replan_needed`] allows before giving up.
pub const PUSH_ROUNDS: usize = 3;

/// Whether a push failed only because the server no longer had a reference that was present
/// when the push was planned (evicted meanwhile), and the paths depending on it: planning again
/// uploads the reference, so the caller should plan and execute once more.
pub fn replan_needed(summary: &Summary) -> bool {
    let gone = |f: &Failure| f.error.contains("path(s) not in cache");
    let dependent = |f: &Failure| f.error.contains("a path it references failed to push");
    summary.failures.iter().any(gone) && summary.failures.iter().all(|f| gone(f) || dependent(f))
}

/// The references a path waits for before it is published (pushed by this run): each one's
/// store path, and where its push says whether it was published.
pub(crate) type Waits = Vec<(String, watch::Receiver<Option<bool>>)>;

/// Wait for `deps`: the first one that was not published, if any.
pub(crate) async fn first_failed(deps: Waits) -> Option<String> {
    for (path, mut d) in deps {
        if !matches!(d.wait_for(|v| v.is_some()).await.as_deref(), Ok(Some(true))) {
            return Some(path);
        }
    }
    None
}

/// What one task of a push uploads: a path on its own, or a batch of small ones.
enum Unit {
    One(PathInfo),
    Batch(Vec<PathInfo>),
}

/// `paths` (in dependency order) as the tasks that upload them, in the same order: small paths
/// in batches (when `batching`), the others on their own. A path on its own that refers to a
/// path of the batch being filled closes it first, so that the batch is spawned, and waited
/// for, before it.
fn units(paths: &[PathInfo], batching: bool) -> Vec<Unit> {
    let mut units = Vec::new();
    let mut open: Vec<PathInfo> = Vec::new();
    let mut open_bytes = 0u64;
    let close = |open: &mut Vec<PathInfo>, units: &mut Vec<Unit>| {
        if !open.is_empty() {
            units.push(Unit::Batch(std::mem::take(open)));
        }
    };
    for info in paths {
        if batching && crate::batch::batchable(info) {
            open_bytes += info.nar_size;
            open.push(info.clone());
            if open.len() >= crate::batch::MAX_PATHS || open_bytes >= crate::batch::MAX_NAR_BYTES {
                close(&mut open, &mut units);
                open_bytes = 0;
            }
        } else {
            if (info.references.iter()).any(|r| open.iter().any(|o| o.path == *r)) {
                close(&mut open, &mut units);
                open_bytes = 0;
            }
            units.push(Unit::One(info.clone()));
        }
    }
    close(&mut open, &mut units);
    units
}

/// What `info` waits for before it is published: its references being pushed by this run,
/// but those in `inside` (its own batch, which the server publishes in order).
fn waits(
    done: &HashMap<String, watch::Receiver<Option<bool>>>,
    info: &PathInfo,
    inside: &HashSet<StorePath>,
) -> Waits {
    info.references
        .iter()
        .filter(|r| **r != info.path && !inside.contains(*r))
        .filter_map(|r| {
            let abs = r.to_absolute();
            done.get(&abs).map(|rx| (abs, rx.clone()))
        })
        .collect()
}

/// Upload and publish `info` on its own once `deps` are published: its outcome, with the
/// bytes it sent.
pub(crate) async fn push_counted(
    shared: &crate::batch::Shared,
    info: &PathInfo,
    deps: Waits,
) -> Outcome {
    let t0 = Instant::now();
    let counted = Arc::new(Counted::new(shared.observer.clone()));
    let watched: Arc<dyn Observer> = counted.clone();
    let (client, cache, opts) = (&shared.client, &shared.cache, &shared.opts);
    match push_one(client, cache, info, opts, &watched, deps, &shared.upstream).await {
        Ok(Some(upload)) => Outcome::Pushed {
            file_size: upload.file_size,
            uploaded: counted.sent(),
            secs: t0.elapsed().as_secs_f64(),
        },
        Ok(None) => Outcome::AlreadyPresent,
        Err(PushError::Store(LocalStoreError::Vanished(_))) => Outcome::Vanished,
        Err(e) => Outcome::Failed {
            error: error_line(&e),
            uploaded: counted.sent(),
        },
    }
}

/// The metadata `info` is published with: its references, deriver (unless omitted), CA,
/// signatures (ours added when we sign), and the upstream metadata of those of its references
/// that are upstream's.
pub(crate) fn path_metadata(
    info: &PathInfo,
    opts: &PushOptions,
    upstream: &HashMap<String, UpstreamRef>,
) -> PathMetadata {
    let refs: Vec<String> = info.references.iter().map(StorePath::to_absolute).collect();
    let mut sigs = info.sigs.clone();
    if let Some(key) = &opts.signing_key {
        let fp = larder_nix::signing::fingerprint(
            &info.path,
            &info.nar_hash,
            info.nar_size,
            &info.references,
        );
        let sig = key.sign(&fp).to_string();
        sigs.retain(|s| !s.starts_with(&format!("{}:", key.name())));
        sigs.push(sig);
    }
    PathMetadata {
        store_path: info.path.to_absolute(),
        nar_hash: info.nar_hash.to_typed_nix32(),
        nar_size: info.nar_size,
        deriver: if opts.omit_deriver {
            None
        } else {
            info.deriver.as_ref().map(StorePath::to_absolute)
        },
        ca: info.ca.clone(),
        sigs,
        upstream: refs
            .iter()
            .filter_map(|r| upstream.get(r))
            .cloned()
            .collect(),
        references: refs,
    }
}

/// Metadata of an upstream path a pushed path refers to, with its upstream signatures.
fn upstream_ref(i: &PathInfo) -> UpstreamRef {
    UpstreamRef {
        store_path: i.path.to_absolute(),
        nar_hash: i.nar_hash.to_typed_nix32(),
        nar_size: i.nar_size,
        references: i.references.iter().map(StorePath::to_absolute).collect(),
        sigs: i.sigs.clone(),
    }
}

/// An observer of one path that counts the bytes its uploads hand to the network, for the
/// summary of a path that fails (a corrupt NAR the server received, or sent in parts before
/// the local check found it).
pub(crate) struct Counted {
    inner: Arc<dyn Observer>,
    sent: AtomicU64,
}

impl Counted {
    pub(crate) fn new(inner: Arc<dyn Observer>) -> Self {
        Counted {
            inner,
            sent: AtomicU64::new(0),
        }
    }

    /// Bytes handed to the network so far.
    pub(crate) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

impl Observer for Counted {
    fn started(&self, path: &PathInfo) {
        self.inner.started(path)
    }
    fn bytes(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
        self.inner.bytes(n)
    }
    fn nar_bytes(&self, n: u64) {
        self.inner.nar_bytes(n)
    }
    fn resumed(&self, path: &PathInfo, parts: u32, nar_bytes: u64) {
        self.inner.resumed(path, parts, nar_bytes)
    }
    fn parts_kept(&self, path: &PathInfo, parts: u32, nar_bytes: u64) {
        self.inner.parts_kept(path, parts, nar_bytes)
    }
    fn finished(&self, path: &PathInfo, outcome: &Outcome) {
        self.inner.finished(path, outcome)
    }
    fn retrying(&self, path: &PathInfo, error: &str, attempt: u32) {
        self.inner.retrying(path, error, attempt)
    }
}

/// Upload and publish one path, retrying transient failures: what the server measured of its
/// NAR, or `None` when the cache had the path already.
async fn push_one(
    client: &ApiClient,
    cache: &str,
    info: &PathInfo,
    opts: &PushOptions,
    observer: &Arc<dyn Observer>,
    deps: Waits,
    upstream: &HashMap<String, UpstreamRef>,
) -> Result<Option<UploadResp>, PushError> {
    let mut retry = Retry::new(opts.attempts);
    let mut chunked = opts.chunking && info.nar_size >= MIN_CHUNKED_NAR;
    let upload = loop {
        let r = if chunked {
            match crate::chunked::upload(client, cache, info, opts, observer).await {
                // A server without push-side chunking (older than this client): whole NARs.
                Err(PushError::Client(ClientError::Status {
                    status: 404,
                    message,
                    ..
                })) if message.contains("no such API endpoint") => {
                    chunked = false;
                    continue;
                }
                // New to the cache: sent whole (see `chunked`).
                Ok(None) => {
                    chunked = false;
                    continue;
                }
                Ok(Some(u)) => Ok(u),
                Err(e) => Err(e),
            }
        } else if info.nar_size > opts.part_size {
            crate::multipart::upload(client, cache, info, opts, observer).await
        } else {
            upload_nar(client, cache, info, opts, observer).await
        };
        match r {
            Ok(u) => break u,
            Err(e) => match retry.wait(transient(&e)) {
                Some(wait) => {
                    observer.retrying(info, &error_line(&e), retry.attempt());
                    tokio::time::sleep(wait).await;
                    retry.next();
                }
                None => return Err(e),
            },
        }
    };
    upload.check(info)?;
    if let Some(failed) = first_failed(deps).await {
        return Err(PushError::DependencyFailed(failed));
    }
    let body = PublishRequest::new(
        upload.upload_id.clone(),
        path_metadata(info, opts, upstream),
    );
    let mut retry = Retry::new(opts.attempts);
    let url = format!("/api/v1/caches/{cache}/paths");
    loop {
        let r = stall::watch(
            client.publish(cache, &body),
            &Progress::new(false),
            opts.stall_timeout,
            Duration::ZERO,
            &url,
        )
        .await;
        match r {
            Ok(published) => {
                let created = published.status == PublishStatus::Created;
                return Ok(created.then_some(upload));
            }
            Err(e) => {
                let e = PushError::Client(e);
                match retry.wait(transient(&e)) {
                    Some(wait) => {
                        observer.retrying(info, &error_line(&e), retry.attempt());
                        tokio::time::sleep(wait).await;
                        retry.next();
                    }
                    None => return Err(e),
                }
            }
        }
    }
}

/// Sends compressed NAR bytes to the network in blocks, counting them.
pub(crate) struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
    observer: Arc<dyn Observer>,
}

impl ChannelWriter {
    pub(crate) fn new(tx: mpsc::Sender<io::Result<Bytes>>, observer: Arc<dyn Observer>) -> Self {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(BLOCK),
            observer,
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let block = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(BLOCK)));
        self.observer.bytes(block.len() as u64);
        self.tx
            .blocking_send(Ok(block))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "upload connection closed"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= BLOCK {
            self.send()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Serialise, compress and stream one NAR to the server; returns what the server measured.
async fn upload_nar(
    client: &ApiClient,
    cache: &str,
    info: &PathInfo,
    opts: &PushOptions,
    observer: &Arc<dyn Observer>,
) -> Result<UploadResp, PushError> {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(CHANNEL_BLOCKS);
    let progress = Progress::new(true);
    let body = reqwest::Body::wrap_stream(progress.body(receiver_stream(rx)));
    let url = format!(
        "/api/v1/caches/{cache}/nars?compression={}",
        opts.compression.as_str()
    );
    let request = client.request(reqwest::Method::POST, &url).body(body);
    let (compression, level, info2) = (opts.compression, opts.level, info.clone());
    let source = opts.source.clone();
    let observer = observer.clone();
    let producer = tokio::task::spawn_blocking(move || -> Result<(), PushError> {
        let err_tx = tx.clone();
        let w = ChannelWriter {
            tx,
            buf: Vec::with_capacity(BLOCK),
            observer: observer.clone(),
        };
        let werr = |source| LocalStoreError::Write {
            path: info2.path.clone(),
            source,
        };
        let r = (|| -> Result<(), PushError> {
            match compression {
                Compression::None => {
                    let mut w = write_nar(&source, &info2, w, Verify::ByServer, &observer)?;
                    w.flush().map_err(werr)?;
                }
                Compression::Zstd => {
                    let mut enc = zstd::Encoder::new(w, level).map_err(werr)?;
                    if info2.nar_size > MT_THRESHOLD {
                        let n = std::thread::available_parallelism()
                            .map(|n| n.get())
                            .unwrap_or(1);
                        let _ = enc.multithread(n as u32);
                    }
                    let enc = write_nar(&source, &info2, enc, Verify::ByServer, &observer)?;
                    let mut w = enc.finish().map_err(werr)?;
                    w.flush().map_err(werr)?;
                }
                Compression::Xz => {
                    let enc = xz2::write::XzEncoder::new(w, level.clamp(0, 9) as u32);
                    let enc = write_nar(&source, &info2, enc, Verify::ByServer, &observer)?;
                    let mut w = enc.finish().map_err(werr)?;
                    w.flush().map_err(werr)?;
                }
            }
            Ok(())
        })();
        if let Err(e) = &r {
            // Abort the HTTP body so that the server discards the partial upload.
            let _ = err_tx.blocking_send(Err(io::Error::other(e.to_string())));
        }
        r
    });
    // The server hashes the NAR as it arrives; once it is in, it stores it.
    let allowance = stall::work_allowance(info.nar_size);
    let resp = send_produced(client, request, &progress, opts, allowance, &url, producer).await?;
    resp.json::<Upload>()
        .await
        .map(UploadResp::from)
        .map_err(|e| PushError::Internal(format!("bad answer to the NAR upload: {e}")))
}

/// Send `request`, whose body `producer` writes, under the stall watchdog: the answer, or
/// what explains a failure best (the server's refusal when it stopped reading, a local error
/// such as a corrupt or vanished path otherwise).
pub(crate) async fn send_produced(
    client: &ApiClient,
    request: reqwest::RequestBuilder,
    progress: &Progress,
    opts: &PushOptions,
    allowance: Duration,
    url: &str,
    producer: tokio::task::JoinHandle<Result<(), PushError>>,
) -> Result<reqwest::Response, PushError> {
    let sent = stall::watch(
        client.send(request),
        progress,
        opts.stall_timeout,
        allowance,
        url,
    )
    .await;
    let produced = producer
        .await
        .map_err(|e| PushError::Internal(e.to_string()))?;
    match (produced, sent) {
        (Ok(()), sent) => Ok(sent?),
        // The server stopped reading (it refused the upload): its answer says why.
        (Err(PushError::Store(LocalStoreError::Write { .. })), Err(e)) => Err(e.into()),
        // A local error (corrupt or vanished path) explains a failed request best.
        (Err(e), _) => Err(e),
    }
}

fn receiver_stream(
    mut rx: mpsc::Receiver<io::Result<Bytes>>,
) -> impl futures::Stream<Item = io::Result<Bytes>> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NAR source of fixed bytes (an import's, say).
    struct Fixed(Vec<u8>);
    impl NarSource for Fixed {
        fn write_nar(&self, _: &PathInfo, out: &mut dyn Write) -> Result<(), LocalStoreError> {
            for chunk in self.0.chunks(1000) {
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

    #[derive(Default)]
    struct Counts {
        nar: AtomicU64,
        sent: AtomicU64,
    }
    impl Observer for Counts {
        fn bytes(&self, n: u64) {
            self.sent.fetch_add(n, Ordering::Relaxed);
        }
        fn nar_bytes(&self, n: u64) {
            self.nar.fetch_add(n, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_push_plans_again_only_when_a_reference_was_evicted_meanwhile() {
        let failure = |error: &str| Failure {
            path: "/nix/store/x".into(),
            error: error.into(),
        };
        let summary = |errors: &[&str]| Summary {
            failures: errors.iter().map(|e| failure(e)).collect(),
            ..Summary::default()
        };
        let gone = "the server answered 400: 1 referenced path(s) not in cache: /nix/store/r";
        let dependent = "not published: a path it references failed to push (/nix/store/r)";
        assert!(replan_needed(&summary(&[gone])));
        assert!(replan_needed(&summary(&[gone, dependent, dependent])));
        // Nothing evicted, or another failure beside it: planning again would not help.
        assert!(!replan_needed(&summary(&[])));
        assert!(!replan_needed(&summary(&[dependent])));
        assert!(!replan_needed(&summary(&[
            gone,
            "the server answered 413: too large"
        ])));
    }

    #[test]
    fn small_paths_go_in_batches_closed_before_a_path_that_refers_to_one() {
        let path = |name: &str, nar_size: u64, refs: &[&PathInfo]| PathInfo {
            path: StorePath::from_basename(&format!("{:0>32}-{name}", name.len())).unwrap(),
            nar_hash: larder_nix::hash::Sha256::digest(name.as_bytes()),
            nar_size,
            references: refs.iter().map(|r| r.path.clone()).collect(),
            deriver: None,
            sigs: vec![],
            ca: None,
            registration_time: 0,
        };
        let names = |units: &[Unit]| -> Vec<String> {
            units
                .iter()
                .map(|u| match u {
                    Unit::One(i) => i.path.name().to_owned(),
                    Unit::Batch(b) => b
                        .iter()
                        .map(|i| i.path.name())
                        .collect::<Vec<_>>()
                        .join("+"),
                })
                .collect()
        };
        let a = path("a", 100, &[]);
        let b = path("bb", 100, &[&a]);
        let big = path("big", MIN_CHUNKED_NAR, &[]);
        let large = path("large", 1 << 30, &[&b]);
        let c = path("ccc", 100, &[&large]);
        let d = path("dddd", 100, &[]);
        let plan = [a, b, big, large, c, d];
        // `big` refers to nothing in the batch: the batch stays open across it.
        assert_eq!(
            names(&units(&plan, true)),
            ["big", "a+bb", "large", "ccc+dddd"]
        );
        assert_eq!(
            names(&units(&plan, false)),
            ["a", "bb", "big", "large", "ccc", "dddd"]
        );
        let many: Vec<PathInfo> = (0..201).map(|i| path(&format!("p{i}"), 10, &[])).collect();
        let sizes: Vec<usize> = units(&many, true)
            .iter()
            .map(|u| match u {
                Unit::Batch(b) => b.len(),
                Unit::One(_) => 0,
            })
            .collect();
        assert_eq!(sizes, [crate::batch::MAX_PATHS, 1]);
    }

    #[test]
    fn progress_counts_nar_bytes_whatever_the_compression() {
        let nar = vec![b'a'; 300_000];
        let info = PathInfo {
            path: StorePath::from_basename("00000000000000000000000000000000-x").unwrap(),
            nar_hash: larder_nix::hash::Sha256::digest(&nar),
            nar_size: nar.len() as u64,
            references: vec![],
            deriver: None,
            sigs: vec![],
            ca: None,
            registration_time: 0,
        };
        let counts = Arc::new(Counts::default());
        let observer: Arc<dyn Observer> = counts.clone();
        let source = Some(SourceRef(Arc::new(Fixed(nar.clone()))));
        let enc = zstd::Encoder::new(Vec::new(), 3).unwrap();
        let compressed = write_nar(&source, &info, enc, Verify::Here, &observer)
            .unwrap()
            .finish()
            .unwrap();
        assert_eq!(counts.nar.load(Ordering::Relaxed), nar.len() as u64);
        assert!(compressed.len() < nar.len() / 100);
    }
}
