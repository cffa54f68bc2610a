//! The daemon itself: a Unix socket taking [`Request`]s, a queue on disk, and a loop pushing
//! the queue in batches. While the server is unreachable the loop waits 1 s, 2 s, 4 s, … up
//! to a minute between tries (`backon`'s exponential backoff); a signal or `stop` drains what
//! is queued and ends it.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use larder_client::queue::{EntryState, Queue};
use larder_nix::store_path::StorePath;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Notify};

use super::protocol::{encode, Counts, Failure, Progress, Reply, Request};
use super::{create_dir, queue_path, DaemonError};
use crate::pusher::{server_backoff, LineObserver, Pusher, MAX_BACKOFF};
use crate::signals::Signals;
use crate::text::count;

/// Queue entries pushed together (one plan, one bulk `missing` query).
const BATCH: usize = 1000;
/// How often the daemon looks at the queue without being woken (entries written directly by
/// a `daemon push` that found no daemon).
const POLL: Duration = Duration::from_secs(2);
/// Finished entries are kept this long for `--wait` and `status`.
const KEEP_FINISHED: Duration = Duration::from_secs(24 * 3600);
const LOG: &str = "larder daemon: ";

/// Make way for a daemon on `socket`: its directory exists, and a socket left by a daemon
/// that died is removed. Fails when a daemon answers there.
pub async fn prepare(socket: &Path) -> Result<(), DaemonError> {
    if let Some(dir) = socket.parent() {
        create_dir(dir)?;
    }
    if socket.exists() {
        if UnixStream::connect(socket).await.is_ok() {
            return Err(DaemonError::AlreadyRunning(socket.to_path_buf()));
        }
        // Left behind by a daemon that died: nobody listens on it.
        std::fs::remove_file(socket).map_err(|source| DaemonError::RemoveStale {
            path: socket.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

struct Shared {
    cache: String,
    queue: Mutex<Queue>,
    wake: Notify,
    /// Bumped after every batch, so `--wait` clients look again.
    progress: watch::Sender<u64>,
    stopping: AtomicBool,
    /// Connections waiting for the drain that `stop` asked for.
    stop_waiters: tokio::sync::Mutex<Vec<OwnedWriteHalf>>,
}

impl Shared {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Run the daemon on `socket` (after [`prepare`]) until a signal or `stop`, pushing with
/// `pusher`; `cache` is how the user named the cache, for the log and `status`. Returns the
/// queue's counts at the end.
pub async fn run(socket: &Path, cache: &str, mut pusher: Pusher) -> Result<Counts, DaemonError> {
    let qpath = queue_path(socket);
    let queue = Queue::open(&qpath)?;
    let resumed = queue.counts()?.queued;
    let listener = UnixListener::bind(socket).map_err(|source| DaemonError::Listen {
        path: socket.to_path_buf(),
        source,
    })?;
    // The hook runs as the Nix daemon's user (root), which may connect anyway; others may
    // only queue paths, which the daemon checks against the local store before pushing.
    let _ = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666));
    eprintln!(
        "{LOG}pushing to {cache}; listening on {}; queue {}{}",
        socket.display(),
        qpath.display(),
        if resumed > 0 {
            format!(" ({resumed} entries resumed)")
        } else {
            String::new()
        }
    );
    let shared = Arc::new(Shared {
        cache: cache.to_owned(),
        queue: Mutex::new(queue),
        wake: Notify::new(),
        progress: watch::channel(0).0,
        stopping: AtomicBool::new(false),
        stop_waiters: tokio::sync::Mutex::new(Vec::new()),
    });
    let acceptor = tokio::spawn(accept(listener, shared.clone()));
    let signals = Signals::new().map_err(DaemonError::Signals)?;
    let ended = push_until_stopped(&shared, &mut pusher, signals).await;
    acceptor.abort();
    let _ = std::fs::remove_file(socket);
    ended?;
    let counts = Counts::new(None, shared.queue().counts()?);
    let reply = encode(&Reply::Counts(counts.clone()));
    for mut w in shared.stop_waiters.lock().await.drain(..) {
        let _ = w.write_all(reply.as_bytes()).await;
        let _ = w.shutdown().await;
    }
    eprintln!(
        "{LOG}stopped; {} entries still queued (pushed at the next start)",
        counts.queued
    );
    Ok(counts)
}

async fn accept(listener: UnixListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_conn(conn, shared).await {
                        tracing::debug!("daemon connection: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("{LOG}accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Push the queue batch by batch until a signal, or `stop` once the queue is empty.
async fn push_until_stopped(
    shared: &Shared,
    pusher: &mut Pusher,
    mut signals: Signals,
) -> Result<(), DaemonError> {
    let mut delays = server_backoff();
    let observer = Arc::new(LineObserver { prefix: LOG });
    loop {
        let pending = shared.queue().pending(BATCH)?;
        if pending.is_empty() {
            if shared.stopping.load(Ordering::SeqCst) {
                return Ok(());
            }
            tokio::select! {
                _ = shared.wake.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
                _ = signals.recv() => return Ok(()),
            }
            continue;
        }
        match push_batch(pusher, &pending, observer.clone()).await {
            Ok(results) => {
                let mut q = shared.queue();
                q.finish(&results)?;
                let _ = q.prune(KEEP_FINISHED);
                drop(q);
                delays = server_backoff();
                shared.progress.send_modify(|n| *n += 1);
            }
            Err(e) => {
                // The queue keeps the entries: try again later.
                let wait = delays.next().unwrap_or(MAX_BACKOFF);
                eprintln!(
                    "{LOG}cannot push {} queued paths, retrying in {}s: {}",
                    pending.len(),
                    wait.as_secs(),
                    larder_client::push::error_line(&e)
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = signals.recv() => return Ok(()),
                }
            }
        }
        if signals.received() {
            return Ok(());
        }
    }
}

/// Push one batch; the result of every entry (`None` = done). `Err`: nothing was decided.
async fn push_batch(
    pusher: &mut Pusher,
    entries: &[(i64, String)],
    observer: Arc<LineObserver>,
) -> Result<Vec<(i64, Option<String>)>, DaemonError> {
    let mut results = Vec::new();
    let mut roots: Vec<StorePath> = Vec::new();
    let mut parsed = Vec::new();
    for (id, p) in entries {
        match StorePath::from_absolute(p) {
            Ok(sp) => {
                if !roots.contains(&sp) {
                    roots.push(sp.clone());
                }
                parsed.push((*id, sp));
            }
            Err(e) => results.push((*id, Some(format!("not a store path: {e}")))),
        }
    }
    let batch = pusher.push(roots, observer).await?;
    let failures: HashMap<&str, &str> = batch
        .summary
        .failures
        .iter()
        .map(|f| (f.path.as_str(), f.error.as_str()))
        .collect();
    for (id, sp) in parsed {
        let abs = sp.to_absolute();
        let r = if batch.invalid.contains(&sp) {
            Some("not valid in the local store".to_owned())
        } else {
            failures.get(abs.as_str()).map(|e| (*e).to_owned())
        };
        results.push((id, r));
    }
    if batch.summary.pushed + batch.summary.failed > 0 {
        eprintln!(
            "{LOG}batch of {}: {} pushed, {} already in the cache, {} failed",
            match entries.len() {
                1 => "1 entry".to_owned(),
                n => format!("{n} entries"),
            },
            count(batch.summary.pushed as u64, "path"),
            batch.present,
            batch.summary.failed
        );
    }
    Ok(results)
}

async fn serve_conn(conn: UnixStream, shared: Arc<Shared>) -> Result<(), DaemonError> {
    let (r, mut w) = conn.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let req: Request = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) if e.is_data() => {
                send(&mut w, &Reply::refused("unknown op")).await?;
                continue;
            }
            Err(e) => {
                send(&mut w, &Reply::refused(format!("bad request: {e}"))).await?;
                continue;
            }
        };
        match req {
            Request::Push { paths, wait } => push(&mut w, &shared, paths, wait).await?,
            Request::Status => {
                let c = Counts::new(Some(shared.cache.clone()), shared.queue().counts()?);
                send(&mut w, &Reply::Counts(c)).await?;
            }
            Request::Stop => {
                // Register for the reply before the main loop can see `stopping` and exit,
                // or the reply could be lost with the process.
                shared.stop_waiters.lock().await.push(w);
                shared.stopping.store(true, Ordering::SeqCst);
                shared.wake.notify_one();
                return Ok(());
            }
        }
    }
    Ok(())
}

async fn push(
    w: &mut OwnedWriteHalf,
    shared: &Shared,
    paths: Vec<String>,
    wait: bool,
) -> Result<(), DaemonError> {
    if shared.stopping.load(Ordering::SeqCst) {
        return send(w, &Reply::refused("the daemon is stopping")).await;
    }
    let ids = shared.queue().enqueue(&paths);
    let ids = match ids {
        Ok(ids) => ids,
        Err(e) => return send(w, &Reply::refused(larder_client::push::error_line(&e))).await,
    };
    send(
        w,
        &Reply::Queued {
            ok: true,
            queued: ids.len() as u64,
        },
    )
    .await?;
    shared.wake.notify_one();
    if wait {
        wait_for(w, shared, &ids, &paths).await?;
    }
    Ok(())
}

async fn wait_for(
    w: &mut OwnedWriteHalf,
    shared: &Shared,
    ids: &[i64],
    paths: &[String],
) -> Result<(), DaemonError> {
    let mut rx = shared.progress.subscribe();
    let mut last = None;
    loop {
        let states: Vec<EntryState> = {
            let q = shared.queue();
            ids.iter()
                .map(|id| q.state(*id))
                .collect::<Result<_, _>>()?
        };
        let done = states.iter().filter(|s| **s == EntryState::Done).count() as u64;
        let failures: Vec<Failure> = states
            .iter()
            .zip(paths)
            .filter_map(|(s, p)| {
                let error = match s {
                    EntryState::Failed(e) => e.clone(),
                    EntryState::Unknown => "no longer in the queue".to_owned(),
                    _ => return None,
                };
                Some(Failure {
                    path: p.clone(),
                    error,
                })
            })
            .collect();
        let failed = failures.len() as u64;
        if done + failed == ids.len() as u64 {
            let ok = failures.is_empty();
            return send(w, &Reply::Finished { ok, done, failures }).await;
        }
        if last != Some((done, failed)) {
            last = Some((done, failed));
            let total = ids.len() as u64;
            let progress = Progress {
                done,
                failed,
                total,
            };
            send(w, &Reply::Progress { progress }).await?;
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return Err(DaemonError::Stopped) },
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

async fn send(w: &mut OwnedWriteHalf, reply: &Reply) -> Result<(), DaemonError> {
    w.write_all(encode(reply).as_bytes()).await?;
    Ok(())
}
