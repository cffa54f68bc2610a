//! A network partition between a replica and its PostgreSQL database, made by a TCP proxy in
//! this test that stops delivering bytes (and loses them, as a partition that outlasts TCP's
//! retries does), then heals. Requests during the partition are answered 503 within
//! `backend_timeout`; once it heals the replica answers again within seconds, because the
//! connections those requests dropped midway are closed instead of waiting for the rest of an
//! answer that will never come (`larder_store::meta::PG_RELEASE_CHECK_TIMEOUT`). Always on a
//! real PostgreSQL cluster, started here.
#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Auth, Server};
use larder_server::config::ConfigFile;
use larder_testkit::postgres::PgCluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Forwards TCP connections to `upstream`; while `cut` is set, every byte either way is lost.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let cut2 = cut.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, cut2.clone()));
                tokio::spawn(pump(sr, cw, cut2.clone()));
            }
        });
        Proxy { port, cut }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if cut.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A narinfo lookup of a path nobody pushed: one database query, answered 404 (503 while the
/// database does not answer, which `Server::get` would take for a failure).
async fn lookup(srv: &Server, n: u32) -> u16 {
    use tower::ServiceExt;
    let hash = format!("{n:0>32}").replace('0', "a");
    let req = common::request(
        axum::http::Method::GET,
        &format!("/c/{hash}.narinfo"),
        Auth::Anon,
        Vec::new(),
    );
    larder_server::router(srv.state.clone())
        .oneshot(req)
        .await
        .expect("the router is infallible")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_answers_again_within_seconds_after_a_database_partition_heals() {
    let pg = PgCluster::start();
    let url = pg.create_database();
    let proxy = Proxy::start(pg.port()).await;
    let via_proxy = url.replace(&format!(":{}/", pg.port()), &format!(":{}/", proxy.port));
    assert_ne!(via_proxy, url);
    let srv = Server::with_config(ConfigFile {
        database: Some(via_proxy),
        database_max_connections: Some(2),
        backend_timeout: Some("1s".into()),
        ..ConfigFile::default()
    })
    .await;
    srv.create_cache("c", false).await;
    assert_eq!(lookup(&srv, 1).await, 404);

    // The partition: more requests than the pool has connections, each cut off by
    // backend_timeout in the middle of its query.
    proxy.cut.store(true, Ordering::SeqCst);
    let during = futures::future::join_all((0..6).map(|i| lookup(&srv, 10 + i))).await;
    assert!(during.iter().all(|s| *s == 503), "{during:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.cut.store(false, Ordering::SeqCst);

    // Healed: the replica answers again within seconds (without the bound on the pool's
    // check of returned connections, those connections stayed checked out for good here, and
    // for TCP's ~15 minutes in a real partition).
    let healed = Instant::now();
    let mut n = 100;
    loop {
        let status = lookup(&srv, n).await;
        if status == 404 {
            break;
        }
        assert_eq!(status, 503);
        assert!(
            healed.elapsed() < Duration::from_secs(20),
            "still 503 {:?} after the partition healed",
            healed.elapsed()
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("answering again {:?} after the heal", healed.elapsed());
    // And keeps answering: every connection in the pool works.
    for i in 0..8 {
        assert_eq!(lookup(&srv, 1000 + i).await, 404);
    }
}
