//! `larder watch-store` and `larder watch-exec`: the verbs over [`larder_ops::watch`], which
//! reads new valid paths (the Nix database, or watch-exec's post-build-hook spool) and pushes
//! them. This module parses the arguments, runs watch-exec's command, and prints the totals.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use larder_client::local_store::default_db_path;
use larder_ops::nixconf::{self, Trust};
use larder_ops::pusher::Pusher;
use larder_ops::signals::Signals;
use larder_ops::watch::{self, Source, Totals, WatchOptions};

use crate::output::{count, human_size};

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

impl WatchArgs {
    fn options(&self) -> WatchOptions {
        WatchOptions {
            include_drv: self.include_drv,
            interval: Duration::from_millis(self.interval_ms),
        }
    }
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
    let mut pusher = crate::push_cmd::connect_pusher(&args.cache).await?;
    let db = watch::open_db()?;
    let mut signals = Signals::new().context("cannot handle SIGINT and SIGTERM")?;
    let source = Source::Db(db);
    // Paths valid from now on are pushed; say so only once that point is fixed.
    let cursor = source.start()?;
    eprintln!(
        "watching {} for new store paths, pushing to {}; Ctrl-C stops after pushing what is pending",
        default_db_path().display(),
        args.cache
    );
    let t0 = Instant::now();
    let stop = async move { signals.recv().await };
    let totals = watch::watch_until(&mut pusher, &source, cursor, args.options(), stop).await?;
    report(&totals, t0.elapsed().as_secs_f64());
    if totals.failed > 0 {
        anyhow::bail!("{} failed to push", count(totals.failed as u64, "path"));
    }
    Ok(())
}

/// Whether watch-exec sees the command's builds through a post-build-hook.
fn use_hook(mode: ExecMode) -> bool {
    match mode {
        ExecMode::Hook => true,
        ExecMode::Store => false,
        ExecMode::Auto => {
            let trust = nixconf::decide_trust(&nixconf::probe_trust(), "", None);
            matches!(
                trust,
                Trust::SingleUser | Trust::Root | Trust::TrustedUser(_)
            )
        }
    }
}

/// A spool file and a post-build-hook appending to it, in a directory kept until dropped;
/// `cmd` runs with `NIX_CONFIG` adding the hook.
fn hook_source(cmd: &mut tokio::process::Command) -> anyhow::Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::Builder::new()
        .prefix("larder-watch-exec-")
        .tempdir()
        .context("cannot create a directory for the post-build-hook")?;
    let spool = dir.path().join("built");
    std::fs::write(&spool, b"").context("cannot create the hook's spool file")?;
    let script = dir.path().join("post-build-hook");
    watch::write_exec_hook(&script, &spool)?;
    let mut conf = crate::env::var("NIX_CONFIG").unwrap_or_default();
    if !conf.is_empty() && !conf.ends_with('\n') {
        conf.push('\n');
    }
    conf.push_str(&format!("post-build-hook = {}\n", script.display()));
    cmd.env("NIX_CONFIG", conf);
    Ok((dir, spool))
}

/// Run the command, push what became valid meanwhile, exit with the command's status.
pub async fn watch_exec(args: WatchExecArgs) -> anyhow::Result<()> {
    let mut pusher = crate::push_cmd::connect_pusher(&args.watch.cache).await?;
    let mut cmd = tokio::process::Command::new(&args.command[0]);
    cmd.args(&args.command[1..]);
    // Keeps the spool directory until we are done.
    let mut spool_dir = None;
    let source = if use_hook(args.mode) {
        let (dir, spool) = hook_source(&mut cmd)?;
        eprintln!(
            "pushing what the command builds to {} (post-build-hook; --mode store watches the \
             whole store instead)",
            args.watch.cache
        );
        spool_dir = Some(dir);
        Source::Spool(spool)
    } else {
        let db = watch::open_db()?;
        eprintln!(
            "pushing new valid store paths to {} while the command runs (store watch)",
            args.watch.cache
        );
        Source::Db(db)
    };
    // Before the command starts: everything it makes is after this point.
    let cursor = source.start()?;
    let code = run_and_push(&args, cmd, &mut pusher, &source, cursor, spool_dir).await?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// Run `cmd` while pushing what `source` reports, until it exits and what it made is pushed;
/// its exit status.
async fn run_and_push(
    args: &WatchExecArgs,
    mut cmd: tokio::process::Command,
    pusher: &mut Pusher,
    source: &Source,
    cursor: i64,
    spool_dir: Option<tempfile::TempDir>,
) -> anyhow::Result<i32> {
    // Our own SIGINT/SIGTERM go to the command (same process group on a terminal); we keep
    // watching until it exits so nothing it built is left behind.
    let _signals = Signals::new().context("cannot handle SIGINT and SIGTERM")?;
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
    let totals = watch::watch_until(pusher, source, cursor, args.watch.options(), stop).await?;
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
    Ok(code)
}
