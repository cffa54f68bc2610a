//! `larder daemon`: a push queue for Nix's `post-build-hook`.
//!
//! The hook runs `larder daemon push $OUT_PATHS`, which hands the paths to the daemon over a
//! Unix socket ([`client`]) and returns as soon as the daemon has written them to its queue
//! (an fsync'd SQLite transaction, [`larder_client::queue`]): a build never waits on the
//! network. The daemon ([`server`]) pushes the queue in batches (closures, one bulk `missing`
//! query per batch) and marks entries done or failed; entries still queued when it dies —
//! crash, `kill -9`, reboot — are pushed when it starts again. [`protocol`] holds the typed
//! messages; the daemon's log lines go to stderr (the service manager's journal).
//!
//! The hook must be run by Nix as a trusted setting (see README, "Automation").

pub mod client;
pub mod protocol;
pub mod server;

use std::path::{Path, PathBuf};

use larder_client::queue::QueueError;

use crate::pusher::PusherError;
use crate::shell::shell_quote;

/// What went wrong talking to, or being, the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("a larder daemon is already listening on {}", .0.display())]
    AlreadyRunning(PathBuf),
    #[error("no larder daemon is listening on {}", .0.display())]
    NotRunning(PathBuf),
    #[error("cannot create {}", .path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove the stale socket {}", .path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {}", .path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot handle SIGINT and SIGTERM")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Pusher(#[from] PusherError),
    #[error("the daemon closed the connection")]
    Closed,
    #[error("bad reply from the daemon")]
    BadReply(#[source] serde_json::Error),
    #[error("the daemon refused: {0}")]
    Refused(String),
    #[error("the daemon stopped")]
    Stopped,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl DaemonError {
    /// The fix to try.
    pub fn hint(&self) -> Option<String> {
        match self {
            DaemonError::AlreadyRunning(_) => {
                Some("stop it with `larder daemon stop`, or pass another --socket".into())
            }
            DaemonError::NotRunning(_) => {
                Some("start one with `larder daemon run CACHE` (with the same --socket)".into())
            }
            DaemonError::Pusher(e) => e.hint(),
            _ => None,
        }
    }
}

/// The daemon's socket by default: `$XDG_STATE_HOME/larder/daemon.sock`.
pub fn default_socket() -> Result<PathBuf, crate::xdg::NoHome> {
    Ok(crate::xdg::larder_dir(crate::xdg::Base::State)?.join("daemon.sock"))
}

/// The queue file of the daemon listening on `socket`: next to it, `.queue.db`.
pub fn queue_path(socket: &Path) -> PathBuf {
    socket.with_extension("queue.db")
}

/// Create `dir` and its parents.
fn create_dir(dir: &Path) -> Result<(), DaemonError> {
    std::fs::create_dir_all(dir).map_err(|source| DaemonError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_queues_the_outputs_through_the_socket_and_never_fails() {
        let s = hook_script(
            Path::new("/run/current-system/sw/bin/larder"),
            "/nix/store/x-nix/bin/nix-store",
            Path::new("/var/lib/my state/daemon.sock"),
        );
        assert!(s.starts_with("#!/bin/sh\n"));
        assert!(s.contains(
            "/run/current-system/sw/bin/larder daemon push --socket '/var/lib/my state/daemon.sock' $OUT_PATHS"
        ));
        assert!(s.contains("/nix/store/x-nix/bin/nix-store -q --outputs \"$DRV_PATH\""));
        assert!(s.ends_with("exit 0\n"));
        assert_eq!(
            queue_path(Path::new("/s/daemon.sock")),
            Path::new("/s/daemon.queue.db")
        );
    }
}
