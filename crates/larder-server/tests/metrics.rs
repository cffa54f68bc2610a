//! `GET /metrics`: counters move with real requests, labels are route patterns (never raw
//! paths), uploads are counted by outcome and reason, evictions and cache sizes are reported,
//! unfinished multi-part uploads and their bytes are counted, and private caches are named only
//! to tokens that may pull them.
#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;

use common::{noise, Auth, Comp, Server, TestPath};
use larder_nix::NarInfo;
use serde_json::json;

/// The value of the series `name{labels}` (labels exactly as rendered), 0 when absent.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
        .unwrap_or(0.0)
}

async fn scrape(srv: &Server, auth: Auth<'_>) -> String {
    let r = srv.get("/metrics", auth).await.expect(200);
    assert_eq!(
        r.header(axum::http::header::CONTENT_TYPE),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    r.text()
}

const NARINFO_200: &str =
    "larder_http_requests_total{route=\"/{cache}/{file}\",method=\"GET\",status=\"200\"}";
const NARINFO_404: &str =
    "larder_http_requests_total{route=\"/{cache}/{file}\",method=\"GET\",status=\"404\"}";
const NARINFO_COUNT: &str = "larder_http_request_duration_seconds_count{route=\"/{cache}/{file}\",method=\"GET\",status=\"200\"}";
const NARINFO_INF: &str = "larder_http_request_duration_seconds_bucket{route=\"/{cache}/{file}\",method=\"GET\",status=\"200\",le=\"+Inf\"}";
const NAR_BYTES: &str =
    "larder_http_response_body_bytes_total{route=\"/{cache}/nar/{file}\",method=\"GET\"}";
const UPLOAD_BYTES: &str =
    "larder_http_request_body_bytes_total{route=\"/api/v1/caches/{cache}/nars\",method=\"POST\"}";

#[tokio::test]
async fn counters_follow_real_requests() {
    let srv = Server::new().await;
    srv.create_cache("pubc", false).await;
    let tp = TestPath::with_nar("big", "big", common::file_nar(&noise(50_000, "big")));
    srv.push_api("pubc", srv.admin(), &tp, Comp::None)
        .await
        .expect(201);
    let before = scrape(&srv, Auth::Anon).await;

    let mut served = 0;
    for _ in 0..3 {
        let r = srv
            .get(&format!("/pubc/{}.narinfo", tp.hash()), Auth::Anon)
            .await
            .expect(200);
        served += r.body.len();
    }
    let ni = NarInfo::parse(
        &srv.get(&format!("/pubc/{}.narinfo", tp.hash()), Auth::Anon)
            .await
            .text(),
    )
    .unwrap();
    let nar = srv
        .get(&format!("/pubc/{}", ni.url), Auth::Anon)
        .await
        .expect(200);
    let absent = common::store_path("absent", "absent").hash_part();
    srv.get(&format!("/pubc/{absent}.narinfo"), Auth::Anon)
        .await
        .expect(404);
    // Uploads: one accepted pair, then rejections with their reasons.
    let ok = TestPath::new("ok", "ok");
    srv.push_api("pubc", srv.admin(), &ok, Comp::Zstd)
        .await
        .expect(201);
    let bad = TestPath::new("bad", "bad");
    let up = srv
        .upload_api("pubc", srv.admin(), &bad.compressed(Comp::Zstd), "zstd")
        .await
        .expect(201)
        .json();
    let mut body = bad.publish_body(up["upload_id"].as_str().unwrap(), None);
    body["nar_size"] = json!(bad.nar_size() + 1);
    srv.publish_api("pubc", srv.admin(), &body)
        .await
        .expect(400);
    srv.upload_api("pubc", srv.admin(), b"not a NAR", "none")
        .await
        .expect(400);
    srv.upload_api("pubc", Auth::Anon, b"x", "none")
        .await
        .expect(401);
    let misnamed = common::nar_url(b"other bytes", Comp::None);
    srv.put(&format!("/pubc/{misnamed}"), srv.admin(), bad.nar.clone())
        .await
        .expect(400);

    // The server's root redirects to the web UI.
    srv.get("/", Auth::Anon).await.expect(303);

    let after = scrape(&srv, Auth::Anon).await;
    let delta = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(delta(NARINFO_200), 4.0, "{after}");
    assert_eq!(
        delta("larder_http_requests_total{route=\"/\",method=\"GET\",status=\"303\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(delta(NARINFO_404), 1.0);
    assert_eq!(delta(NARINFO_COUNT), 4.0);
    assert_eq!(value(&after, NARINFO_INF), value(&after, NARINFO_COUNT));
    assert!(
        value(&after, "larder_http_request_duration_seconds_sum{route=\"/{cache}/{file}\",method=\"GET\",status=\"200\"}") > 0.0
    );
    assert_eq!(delta(NAR_BYTES), nar.body.len() as f64);
    assert!(
        delta("larder_http_response_body_bytes_total{route=\"/{cache}/{file}\",method=\"GET\"}")
            >= served as f64
    );
    assert!(value(&after, UPLOAD_BYTES) >= (tp.nar.len() + 9) as f64);
    // Route patterns only: no raw path, hash or cache name in any request label.
    assert!(!after.contains(&tp.hash()));
    assert!(!after.contains(&absent));
    assert!(after.contains("route=\"/api/v1/caches/{cache}/paths\""));
    assert!(after.contains("route=\"/metrics\""));
    // Uploads by outcome and reason.
    assert_eq!(delta("larder_uploads_accepted_total{kind=\"nar\"}"), 2.0);
    assert_eq!(delta("larder_uploads_accepted_total{kind=\"path\"}"), 1.0);
    for (kind, reason) in [
        ("path", "nar_size_mismatch"),
        ("nar", "invalid_nar"),
        ("nar", "unauthenticated"),
        ("nar", "file_hash_mismatch"),
    ] {
        assert_eq!(
            delta(&format!(
                "larder_uploads_rejected_total{{kind=\"{kind}\",reason=\"{reason}\"}}"
            )),
            1.0,
            "{kind} {reason}"
        );
    }
    // Cache sizes as the API reports them.
    let info = srv.cache_info("pubc").await;
    assert_eq!(
        value(&after, "larder_cache_paths{cache=\"pubc\"}"),
        info["paths"].as_f64().unwrap()
    );
    assert_eq!(
        value(&after, "larder_cache_size_bytes{cache=\"pubc\"}"),
        info["size"].as_f64().unwrap()
    );

    // Evictions and deletions are counted per cache.
    // The limit set in the database (a PATCH would evict at once), so that the collection
    // below reports what it evicted.
    srv.set_limit_quietly("pubc", 1000).await;
    let report = srv
        .post_json("/api/v1/caches/pubc/gc", srv.admin(), &json!({}))
        .await
        .expect(200)
        .json();
    let evicted = report["evicted"].as_array().unwrap();
    let freed: i64 = evicted
        .iter()
        .map(|v| v["file_size"].as_i64().unwrap())
        .sum();
    let m = scrape(&srv, Auth::Anon).await;
    assert_eq!(value(&m, "larder_evictions_total{cache=\"pubc\"}"), 1.0);
    assert_eq!(
        value(&m, "larder_evicted_paths_total{cache=\"pubc\"}"),
        evicted.len() as f64
    );
    assert_eq!(
        value(&m, "larder_evicted_bytes_total{cache=\"pubc\"}"),
        freed as f64
    );
    assert_eq!(
        value(&m, "larder_cache_max_size_bytes{cache=\"pubc\"}"),
        1000.0
    );
    let left = srv.path_count("pubc").await;
    assert_eq!(value(&m, "larder_cache_paths{cache=\"pubc\"}"), left as f64);
    let keep = TestPath::new("keep", "keep");
    srv.patch_json(
        "/api/v1/caches/pubc",
        srv.admin(),
        &json!({ "max_size": null }),
    )
    .await
    .expect(200);
    srv.push_api("pubc", srv.admin(), &keep, Comp::Zstd)
        .await
        .expect(201);
    srv.delete(
        &format!("/api/v1/caches/pubc/paths/{}", keep.hash()),
        srv.admin(),
    )
    .await
    .expect(200);
    let m = scrape(&srv, Auth::Anon).await;
    assert_eq!(value(&m, "larder_deleted_paths_total{cache=\"pubc\"}"), 1.0);
}

#[tokio::test]
async fn private_caches_are_named_only_to_who_may_pull_them() {
    let srv = Server::new().await;
    srv.create_cache("visible", false).await;
    srv.create_cache("hushhush", true).await;
    srv.push_api(
        "hushhush",
        srv.admin(),
        &TestPath::new("p", "p"),
        Comp::Zstd,
    )
    .await
    .expect(201);
    srv.get("/hushhush/nix-cache-info", Auth::Anon)
        .await
        .expect(200);
    let anon = scrape(&srv, Auth::Anon).await;
    assert!(
        anon.contains("larder_cache_paths{cache=\"visible\"} 0"),
        "{anon}"
    );
    assert!(!anon.contains("hushhush"), "{anon}");
    let pull = srv.token(&["pull"], Some(&["hushhush"])).await;
    let other = srv.token(&["admin"], Some(&["visible"])).await;
    assert!(!scrape(&srv, other.bearer()).await.contains("hushhush"));
    let m = scrape(&srv, pull.basic()).await;
    assert!(
        m.contains("larder_cache_paths{cache=\"hushhush\"} 1"),
        "{m}"
    );
    assert!(scrape(&srv, srv.admin()).await.contains("hushhush"));
    // A bad token is refused, not treated as anonymous.
    srv.get("/metrics", Auth::Bearer("larder_wrong"))
        .await
        .expect(401);
}

/// Open a multi-part upload in `cache` and store a part of `len` bytes in it: its id.
async fn staged_upload(srv: &Server, cache: &str, len: usize) -> String {
    let opened = srv
        .post_json(
            &format!("/api/v1/caches/{cache}/multipart?compression=none"),
            srv.admin(),
            &json!({}),
        )
        .await
        .expect(201);
    let id = opened.json()["upload_id"].as_str().unwrap().to_owned();
    srv.put(
        &format!("/api/v1/caches/{cache}/multipart/{id}/parts/0"),
        srv.admin(),
        vec![7u8; len],
    )
    .await
    .expect(204);
    id
}

/// What an operator under a staging flood (issue 14 item 6) watches: the unfinished
/// multi-part uploads of each cache and the bytes they hold, and in all for who may see every
/// cache; a private cache's are shown only to who may pull it.
#[tokio::test]
async fn unfinished_multipart_uploads_and_their_bytes_are_reported() {
    let srv = Server::new().await;
    srv.create_cache("pubc", false).await;
    srv.create_cache("hushhush", true).await;
    let a = staged_upload(&srv, "pubc", 100_000).await;
    staged_upload(&srv, "pubc", 30_000).await;
    staged_upload(&srv, "hushhush", 50_000).await;
    // A part's bytes, plus the small manifest and measurement files beside them.
    let about = |v: f64, bytes: f64| v >= bytes && v < bytes + 8192.0;

    let anon = scrape(&srv, Auth::Anon).await;
    assert_eq!(
        value(&anon, "larder_cache_multipart_uploads{cache=\"pubc\"}"),
        2.0,
        "{anon}"
    );
    let pubc = value(&anon, "larder_cache_multipart_staged_bytes{cache=\"pubc\"}");
    assert!(about(pubc, 130_000.0), "{pubc}");
    assert!(!anon.contains("hushhush"), "{anon}");
    assert!(
        !anon.contains("larder_multipart_uploads "),
        "the totals include a private cache: {anon}"
    );

    let admin = scrape(&srv, srv.admin()).await;
    assert_eq!(value(&admin, "larder_multipart_uploads"), 3.0, "{admin}");
    let total = value(&admin, "larder_multipart_staged_bytes");
    assert!(about(total, 180_000.0), "{total}");
    assert_eq!(
        value(&admin, "larder_cache_multipart_uploads{cache=\"hushhush\"}"),
        1.0
    );

    // Abandoned, an upload stops counting at once.
    srv.delete(&format!("/api/v1/caches/pubc/multipart/{a}"), srv.admin())
        .await
        .expect(204);
    let admin = scrape(&srv, srv.admin()).await;
    assert_eq!(value(&admin, "larder_multipart_uploads"), 2.0, "{admin}");
    assert_eq!(
        value(&admin, "larder_cache_multipart_uploads{cache=\"pubc\"}"),
        1.0
    );
    let pubc = value(
        &admin,
        "larder_cache_multipart_staged_bytes{cache=\"pubc\"}",
    );
    assert!(about(pubc, 30_000.0), "{pubc}");
}
