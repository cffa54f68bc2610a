//! `larder watch-store` and `larder watch-exec`: push every path that becomes valid in the
//! local store (watch-exec: every path its command builds).
//!
//! The Nix database is polled read-only for `ValidPaths` rows newer than the last one seen
//! ([`DbStore::valid_since`]). Only valid paths have rows, so a path is never pushed while it is
//! still being built or substituted (Cachix's watcher follows lock files and can crash when a
//! lock disappears before its path is valid). At most [`CHUNK`] new rows are read and pushed at
//! a time, so a flood of new paths costs time, not memory. On SIGINT/SIGTERM (or when
//! watch-exec's command exits) the watcher reads the database one last time and pushes what is
//! left before exiting.
//!
//! watch-exec prefers Nix's `post-build-hook` when Nix will run a hook the user sets (single-user
//! install, root, or a user in the daemon's `trusted-users`): the command runs with
//! `NIX_CONFIG` adding a hook that appends each build's outputs to a spool file, which is read
//! like the database. That pushes exactly what the command built (not what other processes
//! added to the store meanwhile); `--mode store` watches the store instead.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use larder_client::local_store::{default_db_path, DbStore, NewPath};
use larder_nix::store_path::StorePath;
use tokio::sync::watch;

use crate::nixconf::Trust;
use crate::output::{count, fail_with_hint, human_size};
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
    /// CACHE, SERVER:CACHE or the cache's URL (http://HOST:PORT/CACHE)
    cache: String,
    /// Also push new .drv files and sources added to the store (by default only build and
    /// substitution outputs are pushed, with their closures).
    #[arg(long)]
    include_drv: bool,
    /// How often to look at the Nix database, in milliseconds.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    interval_ms: u64,
}

/// How watch-exec learns what the command builds.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExecMode {
    /// `hook` when Nix runs a post-build-hook set by this user, `store` otherwise.
    Auto,
    /// Run the command with a post-build-hook (needs a trusted user): only its builds.
    Hook,
    /// Watch the store for new valid paths: builds and substitutions, of any process.
    Store,
}

#[derive(clap::Args)]
pub struct WatchExecArgs {
    #[command(flatten)]
    watch: WatchArgs,
    /// How to see what the command builds.
    #[arg(long, value_enum, default_value_t = ExecMode::Auto)]
    mode: ExecMode,
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

/// Where new paths come from, read in rounds of at most [`CHUNK`].
enum Source {
    /// `ValidPaths` rows after the cursor (a row id).
    Db(DbStore),
    /// Lines appended by the post-build-hook after the cursor (a byte offset).
    Spool(PathBuf),
}

/// One round: the paths to push, the cursor after them, whether more may be waiting.
struct Round {
    roots: Vec<StorePath>,
    next: i64,
    full: bool,
}

impl Source {
    fn start(&self) -> anyhow::Result<i64> {
        match self {
            Source::Db(db) => Ok(db.last_valid_id()?),
            Source::Spool(_) => Ok(0),
        }
    }

    fn read(&self, cursor: i64, include_drv: bool) -> anyhow::Result<Round> {
        match self {
            Source::Db(db) => {
                let rows = db.valid_since(cursor, CHUNK)?;
                Ok(Round {
                    full: rows.len() == CHUNK,
                    next: rows.last().map_or(cursor, |r| r.id),
                    roots: rows
                        .iter()
                        .filter(|r| wanted(r, include_drv))
                        .filter_map(|r| StorePath::from_absolute(&r.path).ok())
                        .collect(),
                })
            }
            Source::Spool(file) => read_spool(file, cursor),
        }
    }
}

/// Complete lines of the spool after byte `from` (a line still being written is left for
/// the next round), at most [`CHUNK`] of them.
fn read_spool(file: &Path, from: i64) -> anyhow::Result<Round> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(file)
        .with_context(|| format!("cannot read the hook's spool {}", file.display()))?;
    f.seek(SeekFrom::Start(from as u64))?;
    let mut buf = Vec::new();
    f.take(CHUNK as u64 * 256).read_to_end(&mut buf)?;
    let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
        return Ok(Round {
            roots: Vec::new(),
            next: from,
            full: false,
        });
    };
    let text = String::from_utf8_lossy(&buf[..end]);
    let mut roots = Vec::new();
    let mut lines = 0;
    let mut used = 0;
    for line in text.split('\n') {
        if lines == CHUNK {
            break;
        }
        lines += 1;
        used += line.len() + 1;
        match StorePath::from_absolute(line.trim()) {
            Ok(p) if !roots.contains(&p) => roots.push(p),
            Ok(_) => {}
            Err(_) if line.trim().is_empty() => {}
            Err(e) => eprintln!("note: the hook reported {line:?}, not a store path: {e}"),
        }
    }
    Ok(Round {
        roots,
        next: from + used as i64,
        full: lines == CHUNK || buf.len() == CHUNK * 256,
    })
}

/// Push new paths after `cursor` (from [`Source::start`]) until `stop` completes, then drain
/// what is left.
async fn watch_until(
    pusher: &mut Pusher,
    source: &Source,
    mut cursor: i64,
    args: &WatchArgs,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<Totals> {
    let interval = Duration::from_millis(args.interval_ms.max(10));
    let observer = Arc::new(LineObserver { prefix: "" });
    let mut totals = Totals::default();
    let mut backoff = Duration::from_secs(1);
    tokio::pin!(stop);
    let mut stopping = false;
    loop {
        let Round {
            roots,
            next: next_cursor,
            full,
        } = source.read(cursor, args.include_drv)?;
        if !roots.is_empty() {
            let n = roots.len();
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
                        totals.failed += n;
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
        "pushed {} ({} NAR) in {secs:.1}s{}",
        count(totals.pushed as u64, "path"),
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
    let source = Source::Db(db);
    // Paths valid from now on are pushed; say so only once that point is fixed.
    let cursor = source.start()?;
    eprintln!(
        "watching {} for new store paths, pushing to {}; Ctrl-C stops after pushing what is pending",
        default_db_path().display(),
        args.cache
    );
    let t0 = Instant::now();
    let totals = watch_until(&mut pusher, &source, cursor, &args, async move {
        signals.recv().await
    })
    .await?;
    report(&totals, t0.elapsed().as_secs_f64());
    if totals.failed > 0 {
        anyhow::bail!("{} failed to push", count(totals.failed as u64, "path"));
    }
    Ok(())
}

/// Run the command, push what became valid meanwhile, exit with the command's status.
pub async fn watch_exec(args: WatchExecArgs) -> anyhow::Result<()> {
    let mut pusher = Pusher::connect(&args.watch.cache).await?;
    let hook = match args.mode {
        ExecMode::Hook => true,
        ExecMode::Store => false,
        ExecMode::Auto => {
            let trust = crate::nixconf::decide_trust(&crate::nixconf::probe_trust(), "", None);
            matches!(
                trust,
                Trust::SingleUser | Trust::Root | Trust::TrustedUser(_)
            )
        }
    };
    // Keeps the spool directory until we are done.
    let mut spool_dir = None;
    let mut cmd = tokio::process::Command::new(&args.command[0]);
    cmd.args(&args.command[1..]);
    let source = if hook {
        let dir = tempfile::Builder::new()
            .prefix("larder-watch-exec-")
            .tempdir()
            .context("cannot create a directory for the post-build-hook")?;
        let spool = dir.path().join("built");
        std::fs::write(&spool, b"").context("cannot create the hook's spool file")?;
        let script = dir.path().join("post-build-hook");
        write_exec_hook(&script, &spool)?;
        let mut conf = crate::env::var("NIX_CONFIG").unwrap_or_default();
        if !conf.is_empty() && !conf.ends_with('\n') {
            conf.push('\n');
        }
        conf.push_str(&format!("post-build-hook = {}\n", script.display()));
        cmd.env("NIX_CONFIG", conf);
        eprintln!(
            "pushing what the command builds to {} (post-build-hook; --mode store watches the \
             whole store instead)",
            args.watch.cache
        );
        spool_dir = Some(dir);
        Source::Spool(spool)
    } else {
        let db = open_db()?;
        eprintln!(
            "pushing new valid store paths to {} while the command runs (store watch)",
            args.watch.cache
        );
        Source::Db(db)
    };
    // Before the command starts: everything it makes is after this point.
    let cursor = source.start()?;
    // Our own SIGINT/SIGTERM go to the command (same process group on a terminal); we keep
    // watching until it exits so nothing it built is left behind.
    let _signals = Signals::new()?;
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        // Like a shell: 127 for a command that is not found, 126 for one that cannot run.
        Err(e) => {
            drop(spool_dir); // exit() runs no destructors
            eprintln!("error: cannot run {:?}: {e}", args.command[0]);
            std::process::exit(if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            });
        }
    };
    let t0 = Instant::now();
    let (status_tx, status_rx) = tokio::sync::oneshot::channel();
    let stop = async move {
        let st = child.wait().await;
        let _ = status_tx.send(st);
    };
    let totals = watch_until(&mut pusher, &source, cursor, &args.watch, stop).await?;
    drop(spool_dir);
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
        anyhow::bail!("{} failed to push", count(totals.failed as u64, "path"));
    }
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// watch-exec's hook: append the build's outputs to `spool`, one per line, and never fail the
/// build. Nix 2.8.0 runs post-build hooks with an empty `$OUT_PATHS`; the outputs of
/// `$DRV_PATH` are asked of `nix-store` then.
fn write_exec_hook(script: &Path, spool: &Path) -> anyhow::Result<()> {
    use crate::daemon::{find_nix_store, shell_quote};
    use std::os::unix::fs::PermissionsExt;
    let text = format!(
        "#!/bin/sh\n\
         # larder watch-exec post-build-hook: note what was built for the running watch-exec.\n\
         set -f\n\
         paths=$OUT_PATHS\n\
         if [ -z \"$paths\" ] && [ -n \"$DRV_PATH\" ]; then\n  \
         paths=$({} -q --outputs \"$DRV_PATH\" 2>/dev/null)\n\
         fi\n\
         for p in $paths; do printf '%s\\n' \"$p\" >> {} 2>/dev/null; done\n\
         exit 0\n",
        shell_quote(&find_nix_store()),
        shell_quote(&spool.display().to_string()),
    );
    std::fs::write(script, text).with_context(|| format!("cannot write {}", script.display()))?;
    std::fs::set_permissions(script, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_is_read_by_complete_lines() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("built");
        let a = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a";
        let b = "/nix/store/ffffffffffffffffffffffffffffffff-b";
        std::fs::write(&f, format!("{a}\n{a}\nnot a path\n{b}")).unwrap();
        let r = read_spool(&f, 0).unwrap();
        assert_eq!(r.roots.len(), 1, "duplicates are pushed once");
        assert_eq!(r.next as usize, 2 * (a.len() + 1) + "not a path\n".len());
        assert!(!r.full);
        // The half-written line is read once it is complete.
        std::fs::write(&f, format!("{a}\n{a}\nnot a path\n{b}\n")).unwrap();
        let r2 = read_spool(&f, r.next).unwrap();
        assert_eq!(r2.roots.len(), 1);
        assert_eq!(r2.roots[0].to_string(), b);
        let r3 = read_spool(&f, r2.next).unwrap();
        assert!(r3.roots.is_empty() && r3.next == r2.next);
    }
}
