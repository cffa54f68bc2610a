//! `larder watch-store` and `larder watch-exec`: push every path that becomes valid in the
//! local store.
//!
//! The Nix database is polled read-only for `ValidPaths` rows newer than the last one seen
//! ([`DbStore::valid_since`]). Only valid paths have rows, so a path is never pushed while it is
//! still being built or substituted (Cachix's watcher follows lock files and can crash when a
//! lock disappears before its path is valid). At most [`CHUNK`] new rows are read and pushed at
//! a time, so a flood of new paths costs time, not memory. On SIGINT/SIGTERM (or when
//! watch-exec's command exits) the watcher reads the database one last time and pushes what is
//! left before exiting.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use larder_client::local_store::{default_db_path, DbStore, NewPath};
use larder_nix::store_path::StorePath;
use tokio::sync::watch;

use crate::output::{fail_with_hint, human_size};
use crate::pusher::{LineObserver, Pusher};

/// New paths read and pushed per round.
const CHUNK: usize = 500;
/// Longest wait between retries while the server is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// SIGINT and SIGTERM, remembered: a signal that arrives during a push is seen afterwards.
pub struct Signals {
    rx: watch::Receiver<bool>,
}

impl Signals {
    pub fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            let _ = tx.send(true);
            // Keep the handlers installed: a second signal must not kill us mid-drain.
            loop {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
        });
        Ok(Self { rx })
    }

    /// Wait for a signal (returns at once if one came already).
    pub async fn recv(&mut self) {
        if self.rx.wait_for(|v| *v).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    pub fn received(&self) -> bool {
        *self.rx.borrow()
    }
}

#[derive(clap::Args)]
pub struct WatchArgs {
    /// CACHE or SERVER:CACHE
    cache: String,
    /// Also push new .drv files and sources added to the store (by default only build and
    /// substitution outputs are pushed, with their closures).
    #[arg(long)]
    include_drv: bool,
    /// How often to look at the Nix database, in milliseconds.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    interval_ms: u64,
}

#[derive(clap::Args)]
pub struct WatchExecArgs {
    #[command(flatten)]
    watch: WatchArgs,
    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Default)]
struct Totals {
    pushed: usize,
    bytes: u64,
    failed: usize,
}

fn open_db() -> anyhow::Result<DbStore> {
    let path = default_db_path();
    DbStore::open(&path).map_err(|e| {
        fail_with_hint(
            format!("cannot watch the store: {e}"),
            "watching reads the Nix database; run as a user who can read it (root on a \
             single-user install), or use the post-build hook instead (`larder daemon hook`)",
        )
    })
}

fn wanted(p: &NewPath, include_drv: bool) -> bool {
    include_drv || !(p.is_drv() || p.is_source())
}

/// Push new paths until `stop` completes, then drain what is left.
async fn watch_until(
    pusher: &mut Pusher,
    db: &DbStore,
    args: &WatchArgs,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<Totals> {
    let mut cursor = db.last_valid_id()?;
    let interval = Duration::from_millis(args.interval_ms.max(10));
    let observer = Arc::new(LineObserver { prefix: "" });
    let mut totals = Totals::default();
    let mut backoff = Duration::from_secs(1);
    tokio::pin!(stop);
    let mut stopping = false;
    loop {
        let rows = db.valid_since(cursor, CHUNK)?;
        let full = rows.len() == CHUNK;
        let next_cursor = rows.last().map_or(cursor, |r| r.id);
        let roots: Vec<StorePath> = rows
            .iter()
            .filter(|r| wanted(r, args.include_drv))
            .filter_map(|r| StorePath::from_absolute(&r.path).ok())
            .collect();
        if !roots.is_empty() {
            match pusher.push(roots, observer.clone()).await {
                Ok(batch) => {
                    totals.pushed += batch.summary.pushed;
                    totals.bytes += batch.summary.bytes;
                    totals.failed += batch.summary.failed;
                    for p in &batch.invalid {
                        eprintln!("note: skipped {p}: no longer valid (garbage-collected?)");
                    }
                    backoff = Duration::from_secs(1);
                }
                Err(e) => {
                    eprintln!(
                        "cannot push new paths, retrying in {}s: {e:#}",
                        backoff.as_secs()
                    );
                    if stopping {
                        eprintln!("warning: stopping with new paths not pushed");
                        totals.failed += rows.len();
                        return Ok(totals);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = &mut stop => stopping = true,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
        }
        cursor = next_cursor;
        if full {
            continue;
        }
        if stopping {
            return Ok(totals);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            // One more round reads what became valid up to now, then we return.
            _ = &mut stop => stopping = true,
        }
    }
}

fn report(totals: &Totals, secs: f64) {
    eprintln!(
        "pushed {} paths ({} NAR) in {secs:.1}s{}",
        totals.pushed,
        human_size(totals.bytes as i64),
        if totals.failed > 0 {
            format!("; {} failed", totals.failed)
        } else {
            String::new()
        }
    );
}

pub async fn watch_store(args: WatchArgs) -> anyhow::Result<()> {
    let mut pusher = Pusher::connect(&args.cache).await?;
    let db = open_db()?;
    let mut signals = Signals::new()?;
    eprintln!(
        "watching {} for new store paths, pushing to {}; Ctrl-C stops after pushing what is pending",
        db.path().display(),
        args.cache
    );
    let t0 = Instant::now();
    let totals = watch_until(&mut pusher, &db, &args, async move { signals.recv().await }).await?;
    report(&totals, t0.elapsed().as_secs_f64());
    if totals.failed > 0 {
        anyhow::bail!("{} paths failed to push", totals.failed);
    }
    Ok(())
}

/// Run the command, push what became valid meanwhile, exit with the command's status.
pub async fn watch_exec(args: WatchExecArgs) -> anyhow::Result<()> {
    let mut pusher = Pusher::connect(&args.watch.cache).await?;
    let db = open_db()?;
    // Our own SIGINT/SIGTERM go to the command (same process group on a terminal); we keep
    // watching until it exits so nothing it built is left behind.
    let _signals = Signals::new()?;
    let mut child = tokio::process::Command::new(&args.command[0])
        .args(&args.command[1..])
        .spawn()
        .with_context(|| format!("cannot run {:?}", args.command[0]))?;
    let t0 = Instant::now();
    let (status_tx, status_rx) = tokio::sync::oneshot::channel();
    let stop = async move {
        let st = child.wait().await;
        let _ = status_tx.send(st);
    };
    let totals = watch_until(&mut pusher, &db, &args.watch, stop).await?;
    let status = status_rx
        .await
        .context("lost the command")?
        .context("cannot wait for the command")?;
    report(&totals, t0.elapsed().as_secs_f64());
    let code = status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        128 + status.signal().unwrap_or(0)
    });
    if totals.failed > 0 && code == 0 {
        anyhow::bail!("{} paths failed to push", totals.failed);
    }
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}
