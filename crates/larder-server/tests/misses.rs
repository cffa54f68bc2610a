//! Misses answered from memory: on the embedded default a lookup of a path the cache does not
//! hold is answered by the filter of published paths (`larder_store::meta`'s `present.rs`)
//! without reading the database. Nix caches a miss for an hour, so a published path must
//! never be missed: it is found the moment its publication answers, however it was pushed and
//! whether it was asked for before; a deleted or evicted one is gone at once, and one pushed
//! again is back. The harness builds the filter as `larder serve` does at start; on
//! PostgreSQL (no filter) the same answers hold.
#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;

use common::{Comp, Server, TestPath};
use serde_json::json;

async fn status(srv: &Server, cache: &str, tp: &TestPath) -> u16 {
    srv.get(&format!("/{cache}/{}.narinfo", tp.hash()), srv.admin())
        .await
        .status
        .as_u16()
}

async fn narinfo(srv: &Server, tp: &TestPath) -> common::Resp {
    srv.get(&format!("/c/{}.narinfo", tp.hash()), srv.admin())
        .await
}

#[tokio::test]
async fn a_path_is_found_the_moment_it_is_published_and_gone_once_deleted() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    srv.create_cache("d", false).await;
    let by_nix = TestPath::new("by-nix", "m1");
    let by_api = TestPath::new("by-api", "m2");
    let never = TestPath::new("never", "m3");

    // Asked for first, as Nix asks every substituter before a push fills one.
    for tp in [&by_nix, &by_api, &never] {
        assert_eq!(status(&srv, "c", tp).await, 404);
    }
    let (nar, info) = srv.push_nix("c", srv.admin(), &by_nix, Comp::Zstd).await;
    assert!(nar.status.is_success() && info.status.is_success());
    assert_eq!(
        status(&srv, "c", &by_nix).await,
        200,
        "pushed by Nix's uploader"
    );
    srv.push_api("c", srv.admin(), &by_api, Comp::Zstd)
        .await
        .expect(201);
    assert_eq!(status(&srv, "c", &by_api).await, 200, "pushed by the API");
    assert_eq!(status(&srv, "c", &never).await, 404);
    // Another cache holds none of them.
    assert_eq!(status(&srv, "d", &by_nix).await, 404);
    assert_eq!(status(&srv, "d", &by_api).await, 404);
    srv.assert_present("c", &by_api).await;

    // Deleted: gone at once (the filter still says "maybe"; the database says no).
    srv.delete(
        &format!("/api/v1/caches/c/paths/{}", by_nix.hash()),
        srv.admin(),
    )
    .await
    .expect(200);
    assert_eq!(status(&srv, "c", &by_nix).await, 404);
    // Pushed again: back at once.
    srv.push_api("c", srv.admin(), &by_nix, Comp::Zstd)
        .await
        .expect(201);
    assert_eq!(status(&srv, "c", &by_nix).await, 200);

    // Evicted: the cache limited below its size loses its paths to gc, and they are gone.
    srv.patch_json("/api/v1/caches/c", srv.admin(), &json!({ "max_size": 1 }))
        .await
        .expect(200);
    srv.post_json("/api/v1/caches/c/gc", srv.admin(), &json!({}))
        .await
        .expect(200);
    assert_eq!(status(&srv, "c", &by_nix).await, 404);
    assert_eq!(status(&srv, "c", &by_api).await, 404);
    srv.patch_json(
        "/api/v1/caches/c",
        srv.admin(),
        &json!({ "max_size": null }),
    )
    .await
    .expect(200);

    // Built again from the database (as at the next start): the same answers.
    srv.push_api("c", srv.admin(), &by_api, Comp::None)
        .await
        .expect(201);
    if let Some(built) = srv.state.meta.remember_paths().await.unwrap() {
        assert_eq!(built.paths, 1, "{built:?}");
    }
    assert_eq!(status(&srv, "c", &by_api).await, 200);
    for tp in [&by_nix, &never] {
        assert_eq!(status(&srv, "c", tp).await, 404);
    }
}

/// A narinfo kept in memory past its time to live is served again only while its path has the
/// same row: one unpublished behind this server's back (`larder fsck --repair` is another
/// process, as is another replica) is a miss after that time, and one published again
/// elsewhere meanwhile (a new row) is served as it is now, not as remembered. One published
/// again through this server is served anew at once.
#[tokio::test]
async fn a_remembered_narinfo_outlives_its_time_only_while_its_path_is_unchanged() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let kept = TestPath::new("kept", "r1");
    let renewed = TestPath::new("renewed", "r2");
    let removed = TestPath::new("removed", "r3");
    let repushed = TestPath::new("repushed", "r4");
    let all = [&kept, &renewed, &removed, &repushed];
    for tp in all {
        srv.push_api("c", srv.admin(), tp, Comp::Zstd)
            .await
            .expect(201);
    }
    let mut before = Vec::new();
    for tp in all {
        before.push(narinfo(&srv, tp).await.expect(200).text());
    }
    assert!(before[1].contains("\nDeriver: "), "{}", before[1]);

    // Unpublished directly in the database, as fsck's repair does.
    let meta = &srv.state.meta;
    let cache = meta.get_cache("c").await.unwrap().unwrap();
    let mut nars = Vec::new();
    for tp in [&renewed, &removed, &repushed] {
        nars.push(
            meta.get_path(cache.id, &tp.hash())
                .await
                .unwrap()
                .unwrap()
                .nar
                .id,
        );
    }
    meta.unpublish_damaged(Some(cache.id), &nars).await.unwrap();
    // Published again with other metadata (no deriver): through another replica, which this
    // server's memory does not hear of, and through this server, which serves it at once.
    let without_deriver = |name, seed| {
        let mut tp = TestPath::new(name, seed);
        tp.deriver = None;
        tp
    };
    srv.replica()
        .await
        .push_api(
            "c",
            srv.admin(),
            &without_deriver("renewed", "r2"),
            Comp::Zstd,
        )
        .await
        .expect(201);
    srv.push_api(
        "c",
        srv.admin(),
        &without_deriver("repushed", "r4"),
        Comp::Zstd,
    )
    .await
    .expect(201);
    let now = narinfo(&srv, &repushed).await.expect(200).text();
    assert!(!now.contains("\nDeriver: "), "served anew at once: {now}");

    // Past the narinfo's time to live in memory.
    tokio::time::sleep(larder_server::hot::NARINFO_TTL + std::time::Duration::from_secs(1)).await;
    assert_eq!(narinfo(&srv, &kept).await.expect(200).text(), before[0]);
    let now = narinfo(&srv, &renewed).await.expect(200).text();
    assert!(
        !now.contains("\nDeriver: ") && now != before[1],
        "the narinfo of the path published again is read again: {now}"
    );
    assert_eq!(narinfo(&srv, &removed).await.status.as_u16(), 404);
}
