//! The stall watchdog of a push: an upload request that makes no progress for
//! `PushOptions::stall_timeout` (no body bytes taken by the connection, no answer) fails with
//! [`ClientError::Stalled`], which the push retries like a dropped connection, so a server that
//! froze mid-upload (stopped, a hung disk, a partition that drops packets without a reset) costs
//! a bounded time instead of hanging the push forever. TCP notices none of these: a stopped
//! process's kernel still acknowledges, and without traffic back a connection waits forever.
//!
//! Progress is what the server does with the request: the connection taking the next block of
//! the body (it only does once the kernel's send buffer drains, that is once the server reads),
//! then the answer. Once the whole body is sent the server may legitimately work a while before
//! answering (storing the NAR, verifying a multi-part upload's parts): that work is granted
//! [`work_allowance`] on top of the stall timeout, in proportion to the bytes it concerns.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;

use crate::api::ClientError;

/// How long an upload request may make no progress by default.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The slowest rate at which a server is assumed to work on what it received once a request's
/// body is in (hashing, storing, verifying): time granted on top of the stall timeout.
const SLOWEST_SERVER_WORK: u64 = 8 << 20;

/// Time a server may work on `bytes` bytes after their request's body is sent, on top of the
/// stall timeout, before the request counts as stalled.
pub(crate) fn work_allowance(bytes: u64) -> Duration {
    Duration::from_secs(bytes / SLOWEST_SERVER_WORK)
}

/// The progress of one request, shared between its body and its watchdog.
#[derive(Clone)]
pub(crate) struct Progress(Arc<Inner>);

struct Inner {
    start: Instant,
    /// Milliseconds from `start` to the last progress.
    last: AtomicU64,
    /// The whole body was taken by the connection.
    body_sent: AtomicBool,
    /// The connection waits for the next block of the body from us (compressing, reading the
    /// store), not for the server: that time is not the server's.
    waiting_on_us: AtomicBool,
}

impl Progress {
    /// For a request whose body (if any) is not watched: its body counts as sent.
    pub(crate) fn new(body_watched: bool) -> Self {
        Progress(Arc::new(Inner {
            start: Instant::now(),
            last: AtomicU64::new(0),
            body_sent: AtomicBool::new(!body_watched),
            waiting_on_us: AtomicBool::new(false),
        }))
    }

    fn touch(&self) {
        let ms = self.0.start.elapsed().as_millis() as u64;
        self.0.last.fetch_max(ms, Ordering::Relaxed);
    }

    fn since_last(&self) -> Duration {
        self.0
            .start
            .elapsed()
            .saturating_sub(Duration::from_millis(self.0.last.load(Ordering::Relaxed)))
    }

    /// `stream` as a request body whose every block taken by the connection is progress.
    pub(crate) fn body<S>(&self, stream: S) -> WatchedBody<S> {
        WatchedBody {
            inner: stream,
            progress: self.clone(),
        }
    }

    /// `bytes` as a request body in blocks of 64 KiB, each taken one progress, with its length
    /// declared (`Content-Length`, as for a plain body).
    pub(crate) fn bytes_body(&self, bytes: Bytes) -> reqwest::Body {
        const PIECE: usize = 64 << 10;
        let pieces: Vec<std::io::Result<Bytes>> = (0..bytes.len())
            .step_by(PIECE)
            .map(|at| Ok(bytes.slice(at..(at + PIECE).min(bytes.len()))))
            .collect();
        reqwest::Body::wrap_stream(self.body(futures::stream::iter(pieces)))
    }
}

/// A request body that reports its progress.
pub(crate) struct WatchedBody<S> {
    inner: S,
    progress: Progress,
}

impl<S, T> Stream for WatchedBody<S>
where
    S: Stream<Item = T> + Unpin,
{
    type Item = T;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let next = Pin::new(&mut self.inner).poll_next(cx);
        let progress = &self.progress.0;
        progress
            .waiting_on_us
            .store(next.is_pending(), Ordering::Relaxed);
        if next.is_ready() || progress.waiting_on_us.load(Ordering::Relaxed) {
            self.progress.touch();
        }
        if let Poll::Ready(None) = next {
            progress.body_sent.store(true, Ordering::Relaxed);
        }
        next
    }
}

/// Run `request` (sending a request and reading its answer) under the watchdog: it fails with
/// [`ClientError::Stalled`] after `stall` without progress, or `stall + after_body` once its
/// body is sent. `None`: no watchdog.
pub(crate) async fn watch<T, E: From<ClientError>>(
    request: impl Future<Output = Result<T, E>>,
    progress: &Progress,
    stall: Option<Duration>,
    after_body: Duration,
    url: &str,
) -> Result<T, E> {
    let Some(stall) = stall else {
        return request.await;
    };
    let mut request = std::pin::pin!(request);
    loop {
        if progress.0.waiting_on_us.load(Ordering::Relaxed) {
            progress.touch();
        }
        let limit = if progress.0.body_sent.load(Ordering::Relaxed) {
            stall + after_body
        } else {
            stall
        };
        let left = limit.saturating_sub(progress.since_last());
        if left.is_zero() {
            return Err(ClientError::Stalled {
                url: url.to_owned(),
                secs: limit.as_secs(),
            }
            .into());
        }
        // Wake at the deadline the last progress set, then look again: progress meanwhile (or
        // the body just finished) moved it.
        if let Ok(r) = tokio::time::timeout(left, &mut request).await {
            return r;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn a_request_without_progress_stalls_and_progress_keeps_it_alive() {
        let ms = Duration::from_millis;
        let stall = Some(ms(500));
        // No progress at all: stalled after the timeout.
        let p = Progress::new(false);
        let t0 = Instant::now();
        let r = watch(
            futures::future::pending::<Result<(), ClientError>>(),
            &p,
            stall,
            Duration::ZERO,
            "u",
        )
        .await;
        assert!(matches!(r, Err(ClientError::Stalled { .. })), "{r:?}");
        assert!(t0.elapsed() >= ms(500) && t0.elapsed() < ms(2000));
        // A body the connection takes block after block, 150 ms apart, for 1.5 s: alive.
        let taken = |pause: Duration| {
            let p = Progress::new(true);
            let mut body = p.body(futures::stream::iter(0..10));
            let sending = async move {
                while body.next().await.is_some() {
                    tokio::time::sleep(pause).await;
                }
                Ok::<_, ClientError>("answered")
            };
            (p, sending)
        };
        let (p, sending) = taken(ms(150));
        assert_eq!(
            watch(sending, &p, stall, Duration::ZERO, "u").await.ok(),
            Some("answered")
        );
        // The connection stops taking blocks (the server stopped reading): stalled.
        let (p, sending) = taken(ms(900));
        let r = watch(sending, &p, stall, Duration::ZERO, "u").await;
        assert!(matches!(r, Err(ClientError::Stalled { .. })), "{r:?}");
        // The body waits 1.5 s for us (compressing): not the server's stall.
        let p = Progress::new(true);
        let body = p.body(Box::pin(futures::stream::once(async {
            tokio::time::sleep(ms(1500)).await;
        })));
        let sending = async {
            body.collect::<Vec<_>>().await;
            Ok::<_, ClientError>(())
        };
        assert!(watch(sending, &p, stall, Duration::ZERO, "u").await.is_ok());
        // Once the body is in, the server's work gets its allowance on top.
        let p = Progress::new(false);
        let working = async {
            tokio::time::sleep(ms(900)).await;
            Ok::<_, ClientError>(())
        };
        assert!(watch(working, &p, stall, ms(1000), "u").await.is_ok());
        assert_eq!(work_allowance(80 << 20), Duration::from_secs(10));
    }
}
