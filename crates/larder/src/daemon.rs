//! `larder daemon`: the verbs of the push queue for Nix's `post-build-hook`. The daemon, its
//! queue and its socket protocol are [`larder_ops::daemon`]; this module parses the verbs and
//! prints what they did.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use larder_ops::daemon::{self, client, protocol::Reply, server, DaemonError};

use crate::output::{count, fail_with_hint, print};

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
            None => daemon::default_socket()?,
        };
        Ok(if p.is_relative() {
            std::env::current_dir()?.join(p)
        } else {
            p
        })
    }
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

async fn run(cache_arg: &str, socket: &Path) -> anyhow::Result<()> {
    server::prepare(socket).await?;
    let pusher = crate::push_cmd::connect_pusher(cache_arg).await?;
    server::run(socket, cache_arg, pusher).await?;
    Ok(())
}

/// The store paths named by `args` (symlinks such as ./result followed), each once.
fn resolve_paths(args: &[String]) -> anyhow::Result<Vec<String>> {
    let mut paths = Vec::new();
    for a in args {
        let p = larder_client::local_store::LocalStore::resolve_arg(a)?.to_absolute();
        if !paths.contains(&p) {
            paths.push(p);
        }
    }
    Ok(paths)
}

async fn push(args: &[String], wait: bool, socket: &Path) -> anyhow::Result<()> {
    let paths = resolve_paths(args)?;
    let mut conn = match client::Conn::open(socket).await {
        Ok(c) => c,
        Err(DaemonError::NotRunning(_)) if !wait => {
            // No daemon: queue the paths in its file; it pushes them when it starts.
            let qpath = client::enqueue_offline(socket, &paths)?;
            eprintln!(
                "larder: no daemon on {}; queued {} paths in {} for when it starts",
                socket.display(),
                paths.len(),
                qpath.display()
            );
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let queued = client::push(&mut conn, paths.clone(), wait).await?;
    if !wait {
        eprintln!("larder: queued {queued} paths");
        return Ok(());
    }
    wait_for_push(&mut conn, paths.len()).await
}

/// Show the daemon's progress on a waited-for push until it is over.
async fn wait_for_push(conn: &mut client::Conn, total: usize) -> anyhow::Result<()> {
    loop {
        let reply = conn.reply().await.map_err(|e| {
            anyhow::Error::new(e).context(
                "lost the daemon while waiting; the paths stay queued and are pushed when it runs again",
            )
        })?;
        let (done, failures) = match reply {
            Reply::Progress { progress: p } => {
                eprintln!("larder: {}/{} pushed, {} failed", p.done, p.total, p.failed);
                continue;
            }
            Reply::Finished { done, failures, .. } => (done, failures),
            other => anyhow::bail!("unexpected reply from the daemon: {other:?}"),
        };
        for f in &failures {
            eprintln!("error: {}: {}", f.path, f.error);
        }
        if failures.is_empty() {
            eprintln!(
                "larder: {} done: pushed with their closures, or already in the cache",
                count(done, "queued path")
            );
            return Ok(());
        }
        return Err(fail_with_hint(
            format!("{} of {total} paths failed to push", failures.len()),
            "the errors above say why; `larder push CACHE PATH` retries one by hand",
        ));
    }
}

async fn stop(socket: &Path) -> anyhow::Result<()> {
    let mut conn = client::Conn::open(socket).await?;
    eprintln!("larder: waiting for the daemon to push its queue…");
    let c = client::stop(&mut conn).await?;
    eprintln!(
        "larder: daemon stopped ({} done, {} failed, {} still queued)",
        c.done, c.failed, c.queued
    );
    Ok(())
}

/// `daemon status --json`: the queue's counts, and whether a daemon runs.
#[derive(serde::Serialize)]
struct StatusJson {
    #[serde(flatten)]
    counts: larder_ops::daemon::protocol::Counts,
    running: bool,
}

async fn status(socket: &Path, json_out: bool) -> anyhow::Result<()> {
    let (running, counts) = match client::Conn::open(socket).await {
        Ok(mut conn) => (true, client::status(&mut conn).await?),
        // Not running is a status like any other (exit 0), whether or not a daemon ever ran
        // here; its queue, if any, is read directly.
        Err(DaemonError::NotRunning(_)) => (false, client::offline_counts(socket)?),
        Err(e) => return Err(e.into()),
    };
    if json_out {
        let line = serde_json::to_string(&StatusJson { counts, running })?;
        return print(&format!("{line}\n"));
    }
    let daemon = if running {
        format!(
            "running, pushing to {}",
            counts.cache.as_deref().unwrap_or("?")
        )
    } else {
        format!(
            "not running on {} (start it with `larder daemon run CACHE`)",
            socket.display()
        )
    };
    print(&format!(
        "daemon: {daemon}\nqueued: {}\ndone: {}\nfailed: {}\n",
        counts.queued, counts.done, counts.failed
    ))
}

fn hook(socket: &Path, path: Option<PathBuf>, to_stdout: bool) -> anyhow::Result<()> {
    let larder = std::env::current_exe().context("cannot find the larder binary")?;
    let script = daemon::hook_script(&larder, &larder_ops::shell::find_nix_store(), socket);
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
