//! Small paths pushed many to a request (`POST /api/v1/caches/<c>/paths/batch`): the paths'
//! metadata and NARs in one body, verified and published by the server in one transaction,
//! each path answered on its own.
//!
//! A path of a few bytes pushed on its own costs two requests and a database commit; that,
//! not bytes, limited pushes of many small paths (see ARCHITECTURE.md, "Push speed"). Paths
//! whose NAR is under [`MIN_CHUNKED_NAR`] go up in batches of at most [`MAX_PATHS`] paths and
//! [`MAX_NAR_BYTES`] of NAR, formed in dependency order: a path's references are published
//! before it, or by the same batch, before it. A server without batches (older than this
//! client) gets the paths one by one, as does a path the server asks to receive on its own.

use std::collections::{HashMap, HashSet};
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use larder_api::{BatchPublished, BatchStatus, UpstreamRef};
use tokio::sync::{mpsc, watch};

use crate::api::{ApiClient, ClientError};
use crate::chunked::MIN_CHUNKED_NAR;
use crate::local_store::PathInfo;
use crate::push::{
    first_failed, path_metadata, push_counted, send_produced, ChannelWriter, Counted,
    CHANNEL_BLOCKS,
};
use crate::retry::Retry;
use crate::stall::{self, Progress};
use crate::upload::{
    error_line, transient, write_nar, Compression, Observer, Outcome, PushError, PushOptions,
    Verify,
};

/// Most paths in one batch (the server takes up to 1 000).
pub const MAX_PATHS: usize = 200;
/// Most NAR bytes in one batch (the server takes up to 16 MiB).
pub const MAX_NAR_BYTES: u64 = 8 << 20;

/// Whether `info` goes up in a batch rather than on its own.
pub(crate) fn batchable(info: &PathInfo) -> bool {
    info.nar_size < MIN_CHUNKED_NAR
}

/// A path of a batch: the references it waits for outside the batch, and where it says
/// whether it was published (for the paths that wait for it).
pub(crate) struct Member {
    pub info: PathInfo,
    pub deps: crate::push::Waits,
    pub done: watch::Sender<Option<bool>>,
}

/// What a push shares between its batches.
pub(crate) struct Shared {
    pub client: ApiClient,
    pub cache: String,
    pub opts: PushOptions,
    pub observer: Arc<dyn Observer>,
    pub upstream: Arc<HashMap<String, UpstreamRef>>,
    /// The server answered that it has no batches: every later path goes up on its own.
    pub unsupported: AtomicBool,
}

/// Push `members` (in dependency order) as one batch once the references they wait for are
/// published; each path's outcome, in order.
pub(crate) async fn push(shared: &Shared, members: Vec<Member>) -> Vec<(PathInfo, Outcome)> {
    let t0 = Instant::now();
    for m in &members {
        shared.observer.started(&m.info);
    }
    // A path whose reference failed, outside the batch or in it, fails without being sent.
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(members.len());
    let mut dropped: HashSet<String> = HashSet::new();
    for m in &members {
        let inside = (m.info.references.iter())
            .map(|r| r.to_absolute())
            .find(|r| dropped.contains(r));
        let failed = match inside {
            Some(r) => Some(r),
            None => first_failed(m.deps.clone()).await,
        };
        match failed {
            None => outcomes.push(None),
            Some(r) => {
                dropped.insert(m.info.path.to_absolute());
                outcomes.push(Some(failure(&PushError::DependencyFailed(r), 0)));
            }
        }
    }
    let sending: Vec<usize> = (0..members.len())
        .filter(|&i| outcomes[i].is_none())
        .collect();
    let mut alone: Vec<usize> = Vec::new();
    if shared.unsupported.load(Ordering::Relaxed) {
        alone = sending;
    } else if !sending.is_empty() {
        let infos: Vec<&PathInfo> = sending.iter().map(|&i| &members[i].info).collect();
        let nar_total: u64 = infos.iter().map(|i| i.nar_size).sum::<u64>().max(1);
        let (answer, sent) = send(shared, &infos).await;
        let share = |i: &PathInfo| sent * i.nar_size / nar_total;
        match answer {
            Ok(published) => {
                let secs = t0.elapsed().as_secs_f64();
                let mut failed: HashSet<String> = HashSet::new();
                // The paths to send on their own, after (those in `alone`).
                let mut redo: HashSet<String> = HashSet::new();
                for (&i, p) in sending.iter().zip(published.paths) {
                    let info = &members[i].info;
                    // The first reference of this path in `set`.
                    let lacks = |set: &HashSet<String>| {
                        (info.references.iter())
                            .filter(|r| **r != info.path)
                            .map(|r| r.to_absolute())
                            .find(|r| set.contains(r))
                    };
                    // What the server measured is not what the store records: the path
                    // is damaged on disk, whatever else the server answered.
                    let received = crate::upload::UploadResp {
                        upload_id: String::new(),
                        file_size: 0,
                        nar_hash: p.nar_hash.unwrap_or_default(),
                        nar_size: p.nar_size.unwrap_or(info.nar_size),
                    };
                    let status = match received.check(info) {
                        Err(corrupt) if !received.nar_hash.is_empty() => {
                            failed.insert(info.path.to_absolute());
                            outcomes[i] = Some(failure(&PushError::Store(corrupt), share(info)));
                            continue;
                        }
                        _ => p.status,
                    };
                    outcomes[i] = Some(match status {
                        BatchStatus::Created { file_size } => Outcome::Pushed {
                            file_size: file_size.max(0) as u64,
                            uploaded: share(info),
                            secs,
                        },
                        BatchStatus::AlreadyPresent => Outcome::AlreadyPresent,
                        // Refused because a path it refers to is sent again on its own: so
                        // is it, after.
                        BatchStatus::Failed { .. } if lacks(&redo).is_some() => {
                            redo.insert(info.path.to_absolute());
                            alone.push(i);
                            continue;
                        }
                        BatchStatus::Failed { .. } if lacks(&failed).is_some() => {
                            let r = lacks(&failed).unwrap_or_default();
                            failed.insert(info.path.to_absolute());
                            failure(&PushError::DependencyFailed(r), share(info))
                        }
                        BatchStatus::Failed { code, error } => {
                            failed.insert(info.path.to_absolute());
                            let e = PushError::Client(ClientError::Status {
                                status: code,
                                message: error,
                                retry_after: None,
                            });
                            failure(&e, share(info))
                        }
                        BatchStatus::SendAlone => {
                            redo.insert(info.path.to_absolute());
                            alone.push(i);
                            continue;
                        }
                    });
                }
            }
            // A server without batches, or a path that could not be read here (vanished, say):
            // one by one, each with its own outcome.
            Err(PushError::Client(ClientError::Status {
                status: 404,
                message,
                ..
            })) if message.contains("no such API endpoint") => {
                shared.unsupported.store(true, Ordering::Relaxed);
                alone = sending;
            }
            // A server whose upload size limit is below a batch: one by one, each within it
            // or refused on its own.
            Err(PushError::Client(ClientError::Status { status: 413, .. })) => alone = sending,
            Err(PushError::Store(_)) => alone = sending,
            Err(e) => {
                for &i in &sending {
                    outcomes[i] = Some(failure(&e, share(&members[i].info)));
                }
            }
        }
    }
    // Each path as soon as its outcome is known, so that what waits for it can go on.
    let announce = |i: usize, outcome: &Outcome| {
        let ok = matches!(outcome, Outcome::Pushed { .. } | Outcome::AlreadyPresent);
        let _ = members[i].done.send(Some(ok));
        shared.observer.finished(&members[i].info, outcome);
    };
    for (i, o) in outcomes.iter().enumerate() {
        if let Some(o) = o {
            if !alone.contains(&i) {
                announce(i, o);
            }
        }
    }
    // The paths sent on their own, at most `jobs` at once, each after its references in the
    // batch.
    let alone_set: HashSet<String> = alone
        .iter()
        .map(|&i| members[i].info.path.to_absolute())
        .collect();
    let singles: Vec<_> = alone
        .iter()
        .copied()
        .map(|i| {
            let info = &members[i].info;
            let deps: crate::push::Waits = members
                .iter()
                .filter(|m| {
                    m.info.path != info.path && alone_set.contains(&m.info.path.to_absolute())
                })
                .filter(|m| info.references.contains(&m.info.path))
                .map(|m| (m.info.path.to_absolute(), m.done.subscribe()))
                .collect();
            async move {
                let outcome = push_counted(shared, info, deps).await;
                announce(i, &outcome);
                (i, outcome)
            }
        })
        .collect();
    let done: Vec<(usize, Outcome)> = futures::stream::iter(singles)
        .buffered(shared.opts.jobs.max(1))
        .collect()
        .await;
    for (i, outcome) in done {
        outcomes[i] = Some(outcome);
    }
    members
        .into_iter()
        .zip(outcomes)
        .map(|(m, o)| {
            let o = o.unwrap_or_else(|| failure(&PushError::Internal("no answer".into()), 0));
            (m.info, o)
        })
        .collect()
}

fn failure(e: &PushError, uploaded: u64) -> Outcome {
    Outcome::Failed {
        error: error_line(e),
        uploaded,
    }
}

/// Send one batch of `paths`, trying again on transient failures: the server's answer and the
/// bytes sent.
async fn send(shared: &Shared, paths: &[&PathInfo]) -> (Result<BatchPublished, PushError>, u64) {
    let counted = Arc::new(Counted::new(shared.observer.clone()));
    let observer: Arc<dyn Observer> = counted.clone();
    let mut retry = Retry::new(shared.opts.attempts);
    loop {
        let r = send_once(shared, paths, &observer).await;
        match r {
            Err(e) if !matches!(e, PushError::Store(_)) => match retry.wait(transient(&e)) {
                Some(wait) => {
                    for p in paths {
                        observer.retrying(p, &error_line(&e), retry.attempt());
                    }
                    tokio::time::sleep(wait).await;
                    retry.next();
                }
                None => return (Err(e), counted.sent()),
            },
            r => return (r, counted.sent()),
        }
    }
}

async fn send_once(
    shared: &Shared,
    paths: &[&PathInfo],
    observer: &Arc<dyn Observer>,
) -> Result<BatchPublished, PushError> {
    let opts = &shared.opts;
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(CHANNEL_BLOCKS);
    let progress = Progress::new(true);
    let stream = futures::stream::poll_fn({
        let mut rx = rx;
        move |cx| rx.poll_recv(cx)
    });
    let body = reqwest::Body::wrap_stream(progress.body(stream));
    let url = format!(
        "/api/v1/caches/{}/paths/batch?compression={}",
        shared.cache,
        opts.compression.as_str()
    );
    let request = shared
        .client
        .request(reqwest::Method::POST, &url)
        .body(body);
    let entries: Vec<(PathInfo, Vec<u8>)> = paths
        .iter()
        .map(|info| {
            let meta = path_metadata(info, opts, &shared.upstream);
            let json = serde_json::to_vec(&meta).map_err(|e| PushError::Internal(e.to_string()))?;
            Ok(((*info).clone(), json))
        })
        .collect::<Result<_, PushError>>()?;
    let nar_bytes: u64 = paths.iter().map(|p| p.nar_size).sum();
    let (compression, level, source) = (opts.compression, opts.level, opts.source.clone());
    let observer = observer.clone();
    let producer = tokio::task::spawn_blocking(move || -> Result<(), PushError> {
        let err_tx = tx.clone();
        let w = ChannelWriter::new(tx, observer.clone());
        let first = entries[0].0.path.clone();
        let werr = |source| crate::local_store::LocalStoreError::Write {
            path: first.clone(),
            source,
        };
        // Each encoder finished, its end written to the channel writer, and that flushed: a
        // compressed stream cut short is refused whole by the server.
        let r = (|| -> Result<(), PushError> {
            let mut w = match compression {
                Compression::None => write_entries(&entries, &source, &observer, w)?,
                Compression::Zstd => {
                    let enc = zstd::Encoder::new(w, level).map_err(werr)?;
                    let enc = write_entries(&entries, &source, &observer, enc)?;
                    enc.finish().map_err(werr)?
                }
                Compression::Xz => {
                    let enc = xz2::write::XzEncoder::new(w, level.clamp(0, 9) as u32);
                    let enc = write_entries(&entries, &source, &observer, enc)?;
                    enc.finish().map_err(werr)?
                }
            };
            Ok(w.flush().map_err(werr)?)
        })();
        if let Err(e) = &r {
            // Abort the HTTP body so that the server discards the batch.
            let _ = err_tx.blocking_send(Err(io::Error::other(e.to_string())));
        }
        r
    });
    let allowance = stall::work_allowance(nar_bytes);
    let resp = send_produced(
        &shared.client,
        request,
        &progress,
        opts,
        allowance,
        &url,
        producer,
    )
    .await?;
    let published: BatchPublished = resp
        .json()
        .await
        .map_err(|e| PushError::Internal(format!("bad answer to the batch: {e}")))?;
    if published.paths.len() != paths.len() {
        return Err(PushError::Internal(format!(
            "the server answered for {} paths of a batch of {}",
            published.paths.len(),
            paths.len()
        )));
    }
    Ok(published)
}

/// Write each entry of a batch into `w`: its metadata's length (4 bytes, big-endian), the
/// metadata, then its NAR.
fn write_entries<W: Write>(
    entries: &[(PathInfo, Vec<u8>)],
    source: &Option<crate::upload::SourceRef>,
    observer: &Arc<dyn Observer>,
    mut w: W,
) -> Result<W, PushError> {
    for (info, json) in entries {
        let werr = |source| crate::local_store::LocalStoreError::Write {
            path: info.path.clone(),
            source,
        };
        let len = u32::try_from(json.len())
            .map_err(|_| PushError::Internal("path metadata too large".into()))?;
        w.write_all(&len.to_be_bytes()).map_err(werr)?;
        w.write_all(json).map_err(werr)?;
        w = write_nar(source, info, w, Verify::ByServer, observer)?;
    }
    Ok(w)
}
