//! Talking to a running daemon: a connection sending [`Request`]s and reading [`Reply`]s,
//! and what `daemon push`, `stop` and `status` do with them. Without a daemon, `push` writes
//! the paths straight into its queue file and `status` reads that file.

use std::path::Path;

use larder_client::queue::Queue;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use super::protocol::{encode, Counts, Reply, Request};
use super::{create_dir, queue_path, DaemonError};

/// A client connection to the daemon.
pub struct Conn {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    w: OwnedWriteHalf,
}

impl Conn {
    /// Connect; [`DaemonError::NotRunning`] when nothing listens on `socket`.
    pub async fn open(socket: &Path) -> Result<Self, DaemonError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|_| DaemonError::NotRunning(socket.to_path_buf()))?;
        let (r, w) = stream.into_split();
        Ok(Self {
            lines: BufReader::new(r).lines(),
            w,
        })
    }

    pub async fn request(&mut self, req: &Request) -> Result<(), DaemonError> {
        self.w.write_all(encode(req).as_bytes()).await?;
        Ok(())
    }

    /// The next reply; a refusal is an error.
    pub async fn reply(&mut self) -> Result<Reply, DaemonError> {
        let line = self.lines.next_line().await?.ok_or(DaemonError::Closed)?;
        match serde_json::from_str(&line).map_err(DaemonError::BadReply)? {
            Reply::Refused { error, .. } => Err(DaemonError::Refused(error)),
            reply => Ok(reply),
        }
    }

    /// The next reply, which must be the queue's counts.
    pub async fn counts(&mut self) -> Result<Counts, DaemonError> {
        match self.reply().await? {
            Reply::Counts(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(reply: Reply) -> DaemonError {
    DaemonError::Refused(format!("unexpected reply {}", encode(&reply).trim_end()))
}

/// Queue `paths` in the queue file of the daemon of `socket`, which pushes them when it
/// starts (for a `daemon push` that found no daemon). Returns the queue file.
pub fn enqueue_offline(socket: &Path, paths: &[String]) -> Result<std::path::PathBuf, DaemonError> {
    let qpath = queue_path(socket);
    if let Some(dir) = qpath.parent() {
        create_dir(dir)?;
    }
    Queue::open(&qpath)?.enqueue(paths)?;
    Ok(qpath)
}

/// The counts of the queue file of `socket`'s daemon, read directly (all zero without one).
pub fn offline_counts(socket: &Path) -> Result<Counts, DaemonError> {
    let qpath = queue_path(socket);
    let c = if qpath.exists() {
        Queue::open(&qpath)?.counts()?
    } else {
        larder_client::queue::Counts::default()
    };
    Ok(Counts::new(None, c))
}

/// Ask the daemon to drain its queue and stop; its counts at the end.
pub async fn stop(conn: &mut Conn) -> Result<Counts, DaemonError> {
    conn.request(&Request::Stop).await?;
    conn.counts().await
}

/// The daemon's counts, and which cache it pushes to.
pub async fn status(conn: &mut Conn) -> Result<Counts, DaemonError> {
    conn.request(&Request::Status).await?;
    conn.counts().await
}

/// Queue `paths`; how many the daemon queued.
pub async fn push(conn: &mut Conn, paths: Vec<String>, wait: bool) -> Result<u64, DaemonError> {
    conn.request(&Request::Push { paths, wait }).await?;
    match conn.reply().await? {
        Reply::Queued { queued, .. } => Ok(queued),
        other => Err(unexpected(other)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn offline_queue_is_counted_without_a_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sub/d.sock");
        assert_eq!(offline_counts(&socket).unwrap().queued, 0);
        let q = enqueue_offline(&socket, &["/nix/store/a".into(), "/nix/store/b".into()]).unwrap();
        assert_eq!(q, dir.path().join("sub/d.queue.db"));
        let c = offline_counts(&socket).unwrap();
        assert_eq!((c.queued, c.done, c.failed, c.cache), (2, 0, 0, None));
    }
}
