//! `larder daemon`: a push queue for Nix's `post-build-hook`.
//!
//! The hook runs `larder daemon push $OUT_PATHS`, which hands the paths to the daemon over a
//! Unix socket and returns as soon as the daemon has written them to its queue (an fsync'd
//! SQLite transaction, [`larder_client::queue`]): a build never waits on the network. The
//! daemon pushes the queue in batches (closures, one bulk `missing` query per batch) and marks
//! entries done or failed; entries still queued when it dies — crash, `kill -9`, reboot — are
//! pushed when it starts again.
//!
//! Protocol: one JSON object per line each way.
//! - `{"op":"push","paths":[…],"wait":false}` → `{"ok":true,"queued":N}`; with `"wait":true`
//!   then `{"progress":{"done":D,"failed":F,"total":N}}` lines and a final
//!   `{"ok":BOOL,"done":D,"failures":[{"path":…,"error":…}]}`.
//! - `{"op":"status"}` → `{"ok":true,"cache":…,"queued":Q,"done":D,"failed":F}`.
//! - `{"op":"stop"}` → the daemon stops taking pushes, drains the queue, replies
//!   `{"ok":true,"queued":0,…}` and exits.
//!
//! The hook must be run by Nix as a trusted setting (see README, "Automation").

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use larder_client::queue::{EntryState, Queue};
use larder_nix::store_path::StorePath;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Notify};

use crate::output::{fail_with_hint, print};
use crate::pusher::{LineObserver, Pusher};

/// Queue entries pushed together (one plan, one bulk `missing` query).
const BATCH: usize = 1000;
/// How often the daemon looks at the queue without being woken (entries written directly by
/// a `daemon push` that found no daemon).
const POLL: Duration = Duration::from_secs(2);
/// Longest wait between retries while the server is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Finished entries are kept this long for `--wait` and `status`.
const KEEP_FINISHED: Duration = Duration::from_secs(24 * 3600);

#[derive(clap::Subcommand)]
pub enum DaemonCommand {
    /// Run the push daemon for CACHE in the foreground (use your service manager to keep it
    /// running). Entries queued before a crash or restart are pushed when it starts.
    Run {
        /// CACHE, SERVER:CACHE or the cache's URL (http://HOST:PORT/CACHE)
        cache: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Queue store paths (and their closures) for the daemon; returns once they are on disk.
    /// Without a running daemon the paths go straight into its queue file (unless --wait).
    Push {
        /// Store paths, or symlinks to them such as ./result.
        #[arg(required = true)]
        paths: Vec<String>,
        /// Wait until the daemon has pushed them, showing progress; exit 1 if any failed.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Ask the daemon to push everything still queued, then exit.
    Stop {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Show the queue: entries queued, done and failed.
    Status {
        #[command(flatten)]
        socket: SocketArg,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Write the post-build-hook script (executable) and print the `post-build-hook = …` line
    /// to add to nix.conf.
    Hook {
        #[command(flatten)]
        socket: SocketArg,
        /// Where to write the script. [default: $XDG_CONFIG_HOME/larder/post-build-hook]
        #[arg(long)]
        path: Option<PathBuf>,
        /// Print the script to stdout instead of writing it.
        #[arg(long)]
        print: bool,
    },
}

#[derive(clap::Args)]
pub struct SocketArg {
    /// The daemon's socket; its queue is the file next to it with the extension `.queue.db`.
    /// [default: $XDG_STATE_HOME/larder/daemon.sock]
    #[arg(long, env = "LARDER_DAEMON_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
}

impl SocketArg {
    fn path(&self) -> anyhow::Result<PathBuf> {
        let p = match &self.socket {
            Some(p) => p.clone(),
            None => state_dir()?.join("daemon.sock"),
        };
        Ok(if p.is_relative() {
            std::env::current_dir()?.join(p)
        } else {
            p
        })
    }
}

/// `$XDG_STATE_HOME/larder` (default `~/.local/state/larder`).
pub fn state_dir() -> anyhow::Result<PathBuf> {
    let base = match crate::env::var("XDG_STATE_HOME") {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(
            crate::env::var("HOME").context("neither XDG_STATE_HOME nor HOME is set")?,
        )
        .join(".local/state"),
    };
    Ok(base.join("larder"))
}

fn queue_path(socket: &Path) -> PathBuf {
    socket.with_extension("queue.db")
}

pub async fn daemon(cmd: DaemonCommand) -> anyhow::Result<()> {
    match cmd {
        DaemonCommand::Run { cache, socket } => run(&cache, &socket.path()?).await,
        DaemonCommand::Push {
            paths,
            wait,
            socket,
        } => push(&paths, wait, &socket.path()?).await,
        DaemonCommand::Stop { socket } => stop(&socket.path()?).await,
        DaemonCommand::Status { socket, json } => status(&socket.path()?, json).await,
        DaemonCommand::Hook {
            socket,
            path,
            print: to_stdout,
        } => hook(&socket.path()?, path, to_stdout),
    }
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

async fn run(cache_arg: &str, socket: &Path) -> anyhow::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if socket.exists() {
        if UnixStream::connect(socket).await.is_ok() {
            return Err(fail_with_hint(
                format!(
                    "a larder daemon is already listening on {}",
                    socket.display()
                ),
                "stop it with `larder daemon stop`, or pass another --socket",
            ));
        }
        // Left behind by a daemon that died: nobody listens on it.
        std::fs::remove_file(socket)
            .with_context(|| format!("cannot remove the stale socket {}", socket.display()))?;
    }
    let mut pusher = Pusher::connect(cache_arg).await?;
    let qpath = queue_path(socket);
    let queue = Queue::open(&qpath)?;
    let resumed = queue.counts()?.queued;
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    // The hook runs as the Nix daemon's user (root), which may connect anyway; others may
    // only queue paths, which the daemon checks against the local store before pushing.
    let _ = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666));
    eprintln!(
        "larder daemon: pushing to {cache_arg}; listening on {}; queue {}{}",
        socket.display(),
        qpath.display(),
        if resumed > 0 {
            format!(" ({resumed} entries resumed)")
        } else {
            String::new()
        }
    );
    let shared = Arc::new(Shared {
        cache: cache_arg.to_owned(),
        queue: Mutex::new(queue),
        wake: Notify::new(),
        progress: watch::channel(0).0,
        stopping: AtomicBool::new(false),
        stop_waiters: tokio::sync::Mutex::new(Vec::new()),
    });
    let acceptor = {
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((conn, _)) => {
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            if let Err(e) = serve_conn(conn, shared).await {
                                tracing::debug!("daemon connection: {e:#}");
                            }
                        });
                    }
                    Err(e) => {
                        eprintln!("larder daemon: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
    };
    let mut signals = crate::watch::Signals::new()?;
    let mut backoff = Duration::from_secs(1);
    let observer = Arc::new(LineObserver {
        prefix: "larder daemon: ",
    });
    loop {
        let pending = shared.queue().pending(BATCH)?;
        if pending.is_empty() {
            if shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            tokio::select! {
                _ = shared.wake.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
                _ = signals.recv() => break,
            }
            continue;
        }
        match push_batch(&mut pusher, &pending, observer.clone()).await {
            Ok(results) => {
                let mut q = shared.queue();
                q.finish(&results)?;
                let _ = q.prune(KEEP_FINISHED);
                drop(q);
                backoff = Duration::from_secs(1);
                shared.progress.send_modify(|n| *n += 1);
            }
            Err(e) => {
                // The queue keeps the entries: try again later.
                eprintln!(
                    "larder daemon: cannot push {} queued paths, retrying in {}s: {e:#}",
                    pending.len(),
                    backoff.as_secs()
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = signals.recv() => break,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        if signals.received() {
            break;
        }
    }
    acceptor.abort();
    let _ = std::fs::remove_file(socket);
    let counts = shared.queue().counts()?;
    let reply =
        json!({"ok": true, "queued": counts.queued, "done": counts.done, "failed": counts.failed});
    for mut w in shared.stop_waiters.lock().await.drain(..) {
        let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
        let _ = w.shutdown().await;
    }
    eprintln!(
        "larder daemon: stopped; {} entries still queued (pushed at the next start)",
        counts.queued
    );
    Ok(())
}

/// Push one batch; the result of every entry (`None` = done). `Err`: nothing was decided.
async fn push_batch(
    pusher: &mut Pusher,
    entries: &[(i64, String)],
    observer: Arc<LineObserver>,
) -> anyhow::Result<Vec<(i64, Option<String>)>> {
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
    let failures: std::collections::HashMap<&str, &str> = batch
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
            "larder daemon: batch of {}: {} pushed, {} already in the cache, {} failed",
            match entries.len() {
                1 => "1 entry".to_owned(),
                n => format!("{n} entries"),
            },
            crate::output::count(batch.summary.pushed as u64, "path"),
            batch.present,
            batch.summary.failed
        );
    }
    Ok(results)
}

async fn serve_conn(conn: UnixStream, shared: Arc<Shared>) -> anyhow::Result<()> {
    let (r, mut w) = conn.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let req: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                send(
                    &mut w,
                    &json!({"ok": false, "error": format!("bad request: {e}")}),
                )
                .await?;
                continue;
            }
        };
        match req["op"].as_str() {
            Some("push") => {
                if shared.stopping.load(Ordering::SeqCst) {
                    send(
                        &mut w,
                        &json!({"ok": false, "error": "the daemon is stopping"}),
                    )
                    .await?;
                    continue;
                }
                let paths: Vec<String> = req["paths"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                let ids = {
                    let mut q = shared.queue();
                    q.enqueue(&paths)
                };
                let ids = match ids {
                    Ok(ids) => ids,
                    Err(e) => {
                        send(&mut w, &json!({"ok": false, "error": format!("{e:#}")})).await?;
                        continue;
                    }
                };
                send(&mut w, &json!({"ok": true, "queued": ids.len()})).await?;
                shared.wake.notify_one();
                if req["wait"].as_bool() == Some(true) {
                    wait_for(&mut w, &shared, &ids, &paths).await?;
                }
            }
            Some("status") => {
                let c = shared.queue().counts()?;
                send(
                    &mut w,
                    &json!({"ok": true, "cache": shared.cache, "queued": c.queued, "done": c.done, "failed": c.failed}),
                )
                .await?;
            }
            Some("stop") => {
                // Register for the reply before the main loop can see `stopping` and exit,
                // or the reply could be lost with the process.
                shared.stop_waiters.lock().await.push(w);
                shared.stopping.store(true, Ordering::SeqCst);
                shared.wake.notify_one();
                return Ok(());
            }
            _ => send(&mut w, &json!({"ok": false, "error": "unknown op"})).await?,
        }
    }
    Ok(())
}

async fn wait_for(
    w: &mut OwnedWriteHalf,
    shared: &Shared,
    ids: &[i64],
    paths: &[String],
) -> anyhow::Result<()> {
    let mut rx = shared.progress.subscribe();
    let mut last = None;
    loop {
        let states: Vec<EntryState> = {
            let q = shared.queue();
            ids.iter()
                .map(|id| q.state(*id))
                .collect::<Result<_, _>>()?
        };
        let done = states.iter().filter(|s| **s == EntryState::Done).count();
        let failures: Vec<Value> = states
            .iter()
            .zip(paths)
            .filter_map(|(s, p)| match s {
                EntryState::Failed(e) => Some(json!({"path": p, "error": e})),
                EntryState::Unknown => Some(json!({"path": p, "error": "no longer in the queue"})),
                _ => None,
            })
            .collect();
        if done + failures.len() == ids.len() {
            return send(
                w,
                &json!({"ok": failures.is_empty(), "done": done, "failures": failures}),
            )
            .await;
        }
        if last != Some((done, failures.len())) {
            last = Some((done, failures.len()));
            send(
                w,
                &json!({"progress": {"done": done, "failed": failures.len(), "total": ids.len()}}),
            )
            .await?;
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { anyhow::bail!("the daemon stopped") },
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

async fn send(w: &mut OwnedWriteHalf, v: &Value) -> anyhow::Result<()> {
    w.write_all(format!("{v}\n").as_bytes()).await?;
    Ok(())
}

/// A client connection to the daemon.
struct Conn {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    w: OwnedWriteHalf,
}

impl Conn {
    async fn open(socket: &Path) -> std::io::Result<Self> {
        let (r, w) = UnixStream::connect(socket).await?.into_split();
        Ok(Self {
            lines: BufReader::new(r).lines(),
            w,
        })
    }
    async fn request(&mut self, v: &Value) -> anyhow::Result<()> {
        send(&mut self.w, v).await
    }
    async fn reply(&mut self) -> anyhow::Result<Value> {
        let line = self
            .lines
            .next_line()
            .await?
            .context("the daemon closed the connection")?;
        let v: Value = serde_json::from_str(&line).context("bad reply from the daemon")?;
        if v["ok"] == false && v.get("error").is_some() {
            anyhow::bail!("the daemon refused: {}", v["error"].as_str().unwrap_or(""));
        }
        Ok(v)
    }
}

fn not_running(socket: &Path) -> anyhow::Error {
    fail_with_hint(
        format!("no larder daemon is listening on {}", socket.display()),
        "start one with `larder daemon run CACHE` (with the same --socket)",
    )
}

async fn push(args: &[String], wait: bool, socket: &Path) -> anyhow::Result<()> {
    let mut paths = Vec::new();
    for a in args {
        let p = larder_client::local_store::LocalStore::resolve_arg(a)?.to_absolute();
        if !paths.contains(&p) {
            paths.push(p);
        }
    }
    let mut conn = match Conn::open(socket).await {
        Ok(c) => c,
        Err(_) if !wait => {
            // No daemon: queue the paths in its file; it pushes them when it starts.
            let qpath = queue_path(socket);
            if let Some(dir) = qpath.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            Queue::open(&qpath)?.enqueue(&paths)?;
            eprintln!(
                "larder: no daemon on {}; queued {} paths in {} for when it starts",
                socket.display(),
                paths.len(),
                qpath.display()
            );
            return Ok(());
        }
        Err(_) => return Err(not_running(socket)),
    };
    conn.request(&json!({"op": "push", "paths": paths, "wait": wait}))
        .await?;
    let first = conn.reply().await?;
    if !wait {
        eprintln!("larder: queued {} paths", first["queued"]);
        return Ok(());
    }
    loop {
        let v = conn.reply().await.map_err(|e| {
            e.context("lost the daemon while waiting; the paths stay queued and are pushed when it runs again")
        })?;
        if let Some(p) = v.get("progress") {
            eprintln!(
                "larder: {}/{} pushed, {} failed",
                p["done"], p["total"], p["failed"]
            );
            continue;
        }
        let failures = v["failures"].as_array().cloned().unwrap_or_default();
        for f in &failures {
            eprintln!(
                "error: {}: {}",
                f["path"].as_str().unwrap_or(""),
                f["error"].as_str().unwrap_or("")
            );
        }
        if failures.is_empty() {
            eprintln!(
                "larder: {} done: pushed with their closures, or already in the cache",
                crate::output::count(v["done"].as_u64().unwrap_or(0), "queued path")
            );
            return Ok(());
        }
        return Err(fail_with_hint(
            format!("{} of {} paths failed to push", failures.len(), paths.len()),
            "the errors above say why; `larder push CACHE PATH` retries one by hand",
        ));
    }
}

async fn stop(socket: &Path) -> anyhow::Result<()> {
    let mut conn = Conn::open(socket).await.map_err(|_| not_running(socket))?;
    eprintln!("larder: waiting for the daemon to push its queue…");
    conn.request(&json!({"op": "stop"})).await?;
    let v = conn.reply().await?;
    eprintln!(
        "larder: daemon stopped ({} done, {} failed, {} still queued)",
        v["done"], v["failed"], v["queued"]
    );
    Ok(())
}

async fn status(socket: &Path, json_out: bool) -> anyhow::Result<()> {
    let (running, v) = match Conn::open(socket).await {
        Ok(mut conn) => {
            conn.request(&json!({"op": "status"})).await?;
            (true, conn.reply().await?)
        }
        // Not running is a status like any other (exit 0), whether or not a daemon ever ran
        // here; its queue, if any, is read directly.
        Err(_) => {
            let qpath = queue_path(socket);
            let (queued, done, failed) = if qpath.exists() {
                let c = Queue::open(&qpath)?.counts()?;
                (c.queued, c.done, c.failed)
            } else {
                (0, 0, 0)
            };
            (
                false,
                json!({"ok": true, "queued": queued, "done": done, "failed": failed}),
            )
        }
    };
    if json_out {
        let mut v = v;
        v["running"] = json!(running);
        return print(&format!("{v}\n"));
    }
    print(&format!(
        "daemon: {}\nqueued: {}\ndone: {}\nfailed: {}\n",
        if running {
            format!("running, pushing to {}", v["cache"].as_str().unwrap_or("?"))
        } else {
            format!(
                "not running on {} (start it with `larder daemon run CACHE`)",
                socket.display()
            )
        },
        v["queued"],
        v["done"],
        v["failed"]
    ))
}

/// The hook script: queue `$OUT_PATHS` and never fail the build. Nix 2.8.0 runs the hook
/// with an empty `OUT_PATHS` (a regression of that release), so the script falls back to the
/// outputs of `$DRV_PATH`.
pub fn hook_script(larder: &Path, nix_store: &str, socket: &Path) -> String {
    format!(
        "#!/bin/sh\n\
         # larder post-build-hook (written by `larder daemon hook`): queue the outputs of every\n\
         # build for `larder daemon run`. It never waits for the network and never fails a build.\n\
         set -f # $OUT_PATHS is a space-separated list; no globbing\n\
         export IFS=' '\n\
         if [ -z \"$OUT_PATHS\" ] && [ -n \"$DRV_PATH\" ]; then\n  \
         OUT_PATHS=$({nix_store} -q --outputs \"$DRV_PATH\" | tr '\\n' ' ')\n\
         fi\n\
         {larder} daemon push --socket {socket} $OUT_PATHS \\\n  \
         || echo \"larder post-build-hook: could not queue $OUT_PATHS\" >&2\n\
         exit 0\n",
        larder = shell_quote(&larder.display().to_string()),
        nix_store = shell_quote(nix_store),
        socket = shell_quote(&socket.display().to_string()),
    )
}

/// `nix-store` on PATH, absolute (the hook runs with the Nix daemon's PATH, not ours).
pub fn find_nix_store() -> String {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("nix-store"))
                .find(|p| p.is_file())
        })
        .map_or_else(|| "nix-store".to_owned(), |p| p.display().to_string())
}

pub fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:@".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn hook(socket: &Path, path: Option<PathBuf>, to_stdout: bool) -> anyhow::Result<()> {
    let larder = std::env::current_exe().context("cannot find the larder binary")?;
    let script = hook_script(&larder, &find_nix_store(), socket);
    if to_stdout {
        return print(&script);
    }
    let path = match path {
        Some(p) => p,
        None => crate::client_config::config_path()?
            .parent()
            .context("config path has no directory")?
            .join("post-build-hook"),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(&path, &script).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot make {} executable", path.display()))?;
    eprintln!(
        "wrote {}; add the line below to /etc/nix/nix.conf (post-build-hook is a trusted \
         setting), restart nix-daemon, and keep `larder daemon run CACHE` running",
        path.display()
    );
    print(&format!("post-build-hook = {}\n", path.display()))
}
