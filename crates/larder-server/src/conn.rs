//! Accepting and serving connections, with the bounds that keep one client from starving the
//! others: a deadline on every request head (which is also the idle keep-alive timeout), a cap
//! on open connections and a lower one per client address, and the file-descriptor limit
//! raised at start.
//!
//! A connection over a cap is accepted and closed at once (the client sees a reset and may
//! retry), so the listening queue never fills with connections nobody will read; everyone else
//! is served as before. A connection that sends nothing, or half a request head, is closed
//! after `header_timeout`, so a cap held by silent connections is given back within that time.
//! `/metrics` shows the open connections, the caps, and how many were refused at each.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;

/// How long a connection that has sent no request yet is given to send its first one when the
/// server shuts down.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);

/// How long a serving thread with more open connections than another waits before it accepts
/// one more, so that an idle thread takes it instead.
const SPREAD_WAIT: Duration = Duration::from_millis(1);

/// File descriptors kept for everything but client sockets (the database, staged uploads,
/// object files, the object store's connections).
const RESERVED_FDS: u64 = 128;

/// Raise the soft `RLIMIT_NOFILE` to the hard limit (each connection needs a descriptor, and a
/// NAR being served another) and return the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if let Some(hard) = limit.maximum {
        if limit.current.is_some_and(|soft| soft < hard) {
            limit.current = Some(hard);
            if let Err(e) = setrlimit(Resource::Nofile, limit) {
                tracing::warn!(error = %e, "cannot raise the open-file limit to {hard}");
            }
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// How many connections can be open at once under an open-file limit of `fd_limit`: two
/// descriptors per connection (its socket and a file it may be streaming), after
/// [`RESERVED_FDS`].
pub fn connections_for_fd_limit(fd_limit: u64) -> usize {
    let n = fd_limit.saturating_sub(RESERVED_FDS) / 2;
    usize::try_from(n).unwrap_or(usize::MAX).max(16)
}

/// Counts open connections, in total and per client address, shared by every serving thread.
pub struct Admission {
    max_total: usize,
    max_per_client: usize,
    open: Mutex<Open>,
    last_warning: AtomicU64,
    /// Connections refused at the server's cap, and at a client's.
    refused_total: AtomicU64,
    refused_per_client: AtomicU64,
}

/// What `/metrics` shows of the connections ([`Admission::counts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCounts {
    pub open: usize,
    pub max_total: usize,
    pub max_per_client: usize,
    /// Refused since start because the server had `max_total` open.
    pub refused_total: u64,
    /// Refused since start because their client had `max_per_client` open.
    pub refused_per_client: u64,
}

#[derive(Default)]
struct Open {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// One admitted connection; dropping it gives its place back.
pub struct Ticket {
    admission: Arc<Admission>,
    client: IpAddr,
}

impl Admission {
    pub fn new(max_total: usize, max_per_client: usize) -> Arc<Admission> {
        Arc::new(Admission {
            max_total,
            max_per_client,
            open: Mutex::default(),
            last_warning: AtomicU64::new(0),
            refused_total: AtomicU64::new(0),
            refused_per_client: AtomicU64::new(0),
        })
    }

    /// Open connections, the caps, and how many were refused at each.
    pub fn counts(&self) -> ConnectionCounts {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner()).total;
        ConnectionCounts {
            open,
            max_total: self.max_total,
            max_per_client: self.max_per_client,
            refused_total: self.refused_total.load(Ordering::Relaxed),
            refused_per_client: self.refused_per_client.load(Ordering::Relaxed),
        }
    }

    /// Admit a connection from `client`, or `None` when a cap is reached.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Option<Ticket> {
        let refused = {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            let mine = open.per_client.get(&client).copied().unwrap_or(0);
            if open.total >= self.max_total {
                self.refused_total.fetch_add(1, Ordering::Relaxed);
                Some("the server's max_connections")
            } else if mine >= self.max_per_client {
                self.refused_per_client.fetch_add(1, Ordering::Relaxed);
                Some("max_connections_per_client")
            } else {
                open.total += 1;
                *open.per_client.entry(client).or_default() += 1;
                None
            }
        };
        match refused {
            None => Some(Ticket {
                admission: self.clone(),
                client,
            }),
            Some(cap) => {
                self.warn(client, cap);
                None
            }
        }
    }

    /// At most one warning a minute: a flood must not also flood the log.
    fn warn(&self, client: IpAddr, cap: &str) {
        let now = larder_store::now_unix().max(0).unsigned_abs();
        let last = self.last_warning.load(Ordering::Relaxed);
        if now >= last + 60
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                %client,
                "refusing connections over {cap} ({} in all, {} per client); \
                 silent connections are closed after header_timeout",
                self.max_total,
                self.max_per_client
            );
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut open = self
            .admission
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.per_client.remove(&self.client);
            }
        }
    }
}

/// Open connections per serving thread. Every thread accepts on the same sockets, and a thread
/// that wakes to several waiting connections would take them all (wrk's 16 connections all
/// landed on one of two threads, leaving the other core idle); a thread holding more than one
/// connection over the least busy one therefore waits [`SPREAD_WAIT`] before accepting, once,
/// so the other thread takes the connection if it can (and it is accepted anyway if not).
pub struct Spread {
    open: Vec<AtomicUsize>,
}

impl Spread {
    pub fn new(threads: usize) -> Arc<Spread> {
        Arc::new(Spread {
            open: (0..threads.max(1)).map(|_| AtomicUsize::new(0)).collect(),
        })
    }

    /// Whether thread `me` holds more than one connection over the least busy thread.
    fn ahead(&self, me: usize) -> bool {
        let mine = self.open[me].load(Ordering::Relaxed);
        let least = self
            .open
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        mine > least + 1
    }
}

/// A serving thread's place in [`Spread`].
#[derive(Clone)]
pub struct Worker {
    pub spread: Arc<Spread>,
    pub index: usize,
}

/// Counts a connection as open on its thread until dropped.
struct Held(Worker);

impl Held {
    fn new(worker: &Worker) -> Held {
        worker.spread.open[worker.index].fetch_add(1, Ordering::Relaxed);
        Held(worker.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.spread.open[self.0.index].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accept on `listener` and serve each admitted connection with `app` (over TLS when `tls` is
/// given) until `stop` turns true, then let the open connections finish their requests and
/// return.
pub async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    admission: Arc<Admission>,
    tls: Option<Arc<crate::tls::Tls>>,
    header_timeout: Duration,
    worker: Worker,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // Each connection holds a receiver: when all are dropped, every connection has ended.
    let (closed_tx, closed_rx) = tokio::sync::watch::channel(());
    loop {
        if worker.spread.ahead(worker.index) {
            tokio::select! {
                _ = tokio::time::sleep(SPREAD_WAIT) => {}
                _ = stop.wait_for(|stopped| *stopped) => break,
            }
        }
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stopped| *stopped) => break,
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors or a connection reset before it was accepted: wait a
                // little rather than spin, then go on accepting.
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Some(ticket) = admission.admit(canonical_ip(peer)) else {
            drop(tcp);
            continue;
        };
        // Nix issues thousands of small requests: never let Nagle delay one.
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let stop = stop.clone();
        let closed = closed_rx.clone();
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        let held = Held::new(&worker);
        tokio::spawn(async move {
            match acceptor {
                None => serve_connection(tcp, app, header_timeout, stop).await,
                // The handshake is part of the request head's deadline: a client that opens a
                // connection and never finishes its handshake is closed like a silent one.
                Some(acceptor) => {
                    match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_connection(stream, app, header_timeout, stop).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, %peer, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(ticket);
            drop(held);
            drop(closed);
        });
    }
    drop(closed_rx);
    closed_tx.closed().await;
}

/// An IPv4 client seen through an IPv6 socket counts as its IPv4 address.
fn canonical_ip(peer: SocketAddr) -> IpAddr {
    match peer.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

async fn serve_connection<S>(
    io: S,
    app: Router,
    header_timeout: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;
    // Whether a request has begun on this connection, and a wake-up when one does.
    let first_request = Arc::new((
        std::sync::atomic::AtomicBool::new(false),
        tokio::sync::Notify::new(),
    ));
    let requested = first_request.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        requested.0.store(true, Ordering::Relaxed);
        requested.1.notify_one();
        app.clone().oneshot(req.map(axum::body::Body::new))
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    // The deadline runs from the moment the server waits for a request head, on a new
    // connection and between requests on a kept-alive one.
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let conn = http.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::trace!(error = %e, "connection ended");
            }
            return;
        }
        _ = stop.wait_for(|stopped| *stopped) => {}
    }
    // Shutting down. A connection accepted just before may have its first request on the way,
    // and closing it unread would lose that request (a restart under socket activation must
    // lose none): wait for it a moment, unless a request has already begun. A kept-alive
    // connection between requests is closed at once, which clients expect and retry.
    if !first_request.0.load(Ordering::Relaxed) {
        tokio::select! {
            result = conn.as_mut() => {
                let _ = result;
                return;
            }
            _ = first_request.1.notified() => {}
            _ = tokio::time::sleep(header_timeout.min(FIRST_REQUEST_GRACE)) => {}
        }
    }
    // Finish the request in flight, take no other.
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_two_connections_ahead_lets_the_others_accept() {
        let spread = Spread::new(2);
        let zero = Worker {
            spread: spread.clone(),
            index: 0,
        };
        let one = Worker {
            spread: spread.clone(),
            index: 1,
        };
        let first = Held::new(&zero);
        assert!(!spread.ahead(0), "one connection ahead still accepts");
        let second = Held::new(&zero);
        assert!(spread.ahead(0) && !spread.ahead(1));
        let _other = Held::new(&one);
        assert!(!spread.ahead(0));
        drop((first, second));
        assert!(
            !spread.ahead(0) && !spread.ahead(1),
            "closed connections no longer count"
        );
    }

    #[test]
    fn caps_count_per_client_and_in_total() {
        let a = Admission::new(3, 2);
        let one: IpAddr = "192.0.2.1".parse().unwrap();
        let two: IpAddr = "192.0.2.2".parse().unwrap();
        let t1 = a.admit(one).unwrap();
        let t2 = a.admit(one).unwrap();
        assert!(
            a.admit(one).is_none(),
            "a third from one client is over its cap"
        );
        let t3 = a.admit(two).unwrap();
        assert!(a.admit(two).is_none(), "the server is full");
        drop(t1);
        let _t4 = a.admit(two).unwrap();
        drop((t2, t3));
        assert_eq!(
            a.counts(),
            ConnectionCounts {
                open: 1,
                max_total: 3,
                max_per_client: 2,
                refused_total: 1,
                refused_per_client: 1,
            }
        );
        assert!(!a.open.lock().unwrap().per_client.contains_key(&one));
    }

    #[test]
    fn mapped_ipv4_counts_as_ipv4() {
        let v6: SocketAddr = "[::ffff:192.0.2.1]:80".parse().unwrap();
        assert_eq!(canonical_ip(v6), "192.0.2.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn connections_follow_the_fd_limit() {
        assert_eq!(connections_for_fd_limit(1024), 448);
        assert_eq!(connections_for_fd_limit(10), 16);
    }
}
