//! Pull-through caching in process (over SQLite, and PostgreSQL with
//! `LARDER_TEST_DATABASE=postgres`): the upstream is a static file server on loopback holding
//! a binary cache's narinfos and NARs (and logging every request). Fetched paths are served,
//! verified, kept, marked, counted against the limit and deleted or evicted with their
//! referrers; one download serves concurrent requests; a tampered NAR is not kept and its
//! download fails; untrusted narinfos are not served; misses are remembered without hiding a
//! later push; a private cache asks nothing for an outsider.
#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Method, StatusCode, Uri};
use common::{request, signing_key, Auth, Comp, Server, TestPath};
use http_body_util::BodyExt;
use larder_nix::signing::SigningKey;
use larder_nix::NarInfo;
use serde_json::json;
use tower::ServiceExt;

/// A binary cache served over HTTP from memory, recording the paths it was asked for.
struct Upstream {
    url: String,
    files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    asked: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    async fn start() -> Upstream {
        let files: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
        let asked: Arc<Mutex<Vec<String>>> = Arc::default();
        let (f, a) = (files.clone(), asked.clone());
        let app = axum::Router::new().fallback(move |uri: Uri| {
            let (f, a) = (f.clone(), a.clone());
            async move {
                a.lock().unwrap().push(uri.path().to_owned());
                match f.lock().unwrap().get(uri.path()) {
                    Some(bytes) => (StatusCode::OK, bytes.clone()),
                    None => (StatusCode::NOT_FOUND, Vec::new()),
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Upstream { url, files, asked }
    }

    /// Hold `tp` as Nix's uploader would write it (xz), signed by `key`.
    fn add(&self, tp: &TestPath, key: &SigningKey) {
        let file = tp.compressed(Comp::Xz);
        let mut files = self.files.lock().unwrap();
        files.insert(format!("/{}", common::nar_url(&file, Comp::Xz)), file);
        files.insert(
            format!("/{}.narinfo", tp.hash()),
            tp.narinfo(Comp::Xz, Some(key)).into_bytes(),
        );
    }

    fn times_asked(&self, what: &str) -> usize {
        self.asked
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.contains(what))
            .count()
    }
}

/// A cache pulling through from `up`, trusting `key`.
async fn cache(srv: &Server, name: &str, private: bool, up: &Upstream, key: &SigningKey) {
    srv.post_json(
        "/api/v1/caches",
        srv.admin(),
        &json!({"name": name, "private": private, "upstreams": [format!("{}/", up.url)],
                "upstream_keys": [key.verifying_key().to_string()]}),
    )
    .await
    .expect(201);
}

async fn narinfo(srv: &Server, cache: &str, tp: &TestPath, status: u16) -> Option<NarInfo> {
    let r = srv
        .get(&format!("/{cache}/{}.narinfo", tp.hash()), Auth::Anon)
        .await
        .expect(status);
    (status == 200).then(|| NarInfo::parse(&r.text()).unwrap())
}

#[tokio::test]
async fn fetched_paths_are_verified_kept_marked_and_evicted_with_their_referrers() {
    let srv = Server::new().await;
    let up = Upstream::start().await;
    let key = signing_key("upstream-1", 3);
    let a = TestPath::new("a", "pull-a");
    let b = TestPath::new("b", "pull-b").referencing(&[&a]);
    up.add(&a, &key);
    up.add(&b, &key);
    cache(&srv, "c", false, &up, &key).await;
    let info = srv.cache_info("c").await;
    assert_eq!(info["upstreams"], json!([up.url]), "normalised: {info}");

    // The upstream's narinfo, pointing into this cache, its signature kept beside ours.
    let ni = narinfo(&srv, "c", &b, 200).await.unwrap();
    assert!(
        ni.url.starts_with(&format!("upstream-nar/{}/", b.hash())),
        "{}",
        ni.url
    );
    assert!(ni.verify(&key.verifying_key()));
    assert!(ni.verify(&srv.public_key("c").await));
    assert_eq!(srv.path_count("c").await, 0, "nothing kept before the NAR");

    // The NAR: streamed, verified, kept; the path is then the cache's own.
    let body = srv
        .get(&format!("/c/{}", ni.url), Auth::Anon)
        .await
        .expect(200);
    assert_eq!(body.body, b.compressed(Comp::Xz));
    assert_eq!(srv.path_count("c").await, 1);
    let local = narinfo(&srv, "c", &b, 200).await.unwrap();
    assert!(local.url.starts_with("nar/"), "{}", local.url);
    assert!(local.verify(&key.verifying_key()));
    let list = srv
        .get("/api/v1/caches/c/paths", srv.admin())
        .await
        .expect(200)
        .json();
    assert_eq!(list["paths"][0]["upstream"], json!(up.url));
    assert!(srv.cache_info("c").await["size"].as_i64().unwrap() > 0);
    // The web UI marks it, and names the upstream on its page.
    let page = srv.get("/ui/caches/c", Auth::Anon).await.expect(200).text();
    assert!(page.contains("(from upstream)"), "{page}");
    let detail = srv
        .get(
            &format!("/ui/caches/c/paths/{}", b.path.basename()),
            Auth::Anon,
        )
        .await
        .expect(200)
        .text();
    assert!(
        detail.contains("From upstream") && detail.contains(&up.url),
        "{detail}"
    );
    // Asked again: served locally, the upstream is not asked. (The server stores the NAR
    // as its own chunks, so the kept file is the local narinfo's, not the upstream's: a
    // consumer still holding the upstream narinfo gets its NAR from the upstream again.)
    let before = up.asked.lock().unwrap().len();
    let again = srv
        .get(&format!("/c/{}", local.url), Auth::Anon)
        .await
        .expect(200);
    assert_eq!(Some(again.body.len() as u64), local.file_size);
    narinfo(&srv, "c", &b, 200).await;
    assert_eq!(up.asked.lock().unwrap().len(), before);

    // Two requests for one NAR at once: one download.
    let ni_a = narinfo(&srv, "c", &a, 200).await.unwrap();
    let url = format!("/c/{}", ni_a.url);
    let (r1, r2) = tokio::join!(srv.get(&url, Auth::Anon), srv.get(&url, Auth::Anon));
    assert_eq!(r1.expect(200).body, a.compressed(Comp::Xz));
    assert_eq!(r2.expect(200).body, a.compressed(Comp::Xz));
    // The second waits for the first and, as the kept NAR is the cache's own chunked file
    // and not the upstream's, downloads it once more (verified again; README, pull-through).
    let downloads = up.times_asked("/nar/");
    assert!(
        (2..=3).contains(&downloads),
        "b once, a at most twice: {downloads}"
    );

    // A pushed path referencing a fetched one; deleting the fetched leaf takes its referrers
    // along (or nothing).
    let c = TestPath::new("c", "pull-c").referencing(&[&b]);
    srv.push_api("c", srv.admin(), &c, Comp::Zstd)
        .await
        .expect(201);
    srv.delete(&format!("/api/v1/caches/c/paths/{}", a.hash()), srv.admin())
        .await
        .expect(409);
    let gone = srv
        .delete(
            &format!("/api/v1/caches/c/paths/{}?with_referrers=true", a.hash()),
            srv.admin(),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(gone["deleted"].as_array().unwrap().len(), 3, "{gone}");
    assert_eq!(srv.path_count("c").await, 0);

    // Fetched again, then evicted by a limit like any path.
    let ni = narinfo(&srv, "c", &b, 200).await.unwrap();
    srv.get(&format!("/c/{}", ni.url), Auth::Anon)
        .await
        .expect(200);
    assert_eq!(srv.path_count("c").await, 1);
    srv.patch_json("/api/v1/caches/c", srv.admin(), &json!({"max_size": 1}))
        .await
        .expect(200);
    assert_eq!(srv.path_count("c").await, 0);

    // /metrics counts what happened.
    let metrics = srv.get("/metrics", srv.admin()).await.expect(200).text();
    for family in ["hits", "bytes"] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&format!("larder_upstream_{family}_total{{cache=\"c\"}}")))
            .unwrap_or_else(|| panic!("{metrics}"));
        assert_ne!(line.rsplit(' ').next(), Some("0"), "{line}");
    }
}

#[tokio::test]
async fn a_tampered_nar_is_refused_and_its_download_fails() {
    // Flipped bytes (not even valid xz), and another path's NAR (valid xz, valid NAR: only
    // the hashes tell).
    for (i, swapped) in [false, true].into_iter().enumerate() {
        tampered_nar_is_refused(swapped, &format!("pull-tampered-{i}")).await;
    }
}

async fn tampered_nar_is_refused(swapped: bool, seed: &str) {
    let srv = Server::new().await;
    let up = Upstream::start().await;
    let key = signing_key("upstream-1", 3);
    let t = TestPath::new("t", seed);
    up.add(&t, &key);
    let file = t.compressed(Comp::Xz);
    let name = format!("/{}", common::nar_url(&file, Comp::Xz));
    let tampered = if swapped {
        TestPath::new("other", &format!("{seed}-other")).compressed(Comp::Xz)
    } else {
        let mut bytes = file.clone();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x55;
        bytes
    };
    up.files.lock().unwrap().insert(name, tampered);
    cache(&srv, "c", false, &up, &key).await;
    let ni = narinfo(&srv, "c", &t, 200).await.unwrap();
    let resp = larder_server::router(srv.state.clone())
        .oneshot(request(
            Method::GET,
            &format!("/c/{}", ni.url),
            Auth::Anon,
            Body::empty(),
        ))
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "the download starts before the end is known"
    );
    assert!(
        resp.into_body().collect().await.is_err(),
        "the body must end in an error, not a clean short body"
    );
    assert_eq!(srv.path_count("c").await, 0, "nothing kept");
    assert_eq!(srv.staging_files(), 0, "no staging file left");
}

#[tokio::test]
async fn untrusted_narinfos_are_not_served_and_misses_do_not_hide_pushes() {
    let srv = Server::new().await;
    let up = Upstream::start().await;
    let key = signing_key("upstream-1", 3);
    let stranger = signing_key("stranger-1", 4);
    let u = TestPath::new("u", "pull-untrusted");
    up.add(&u, &stranger);
    cache(&srv, "c", false, &up, &key).await;
    narinfo(&srv, "c", &u, 404).await;

    // A miss is remembered: asked once for two requests.
    let late = TestPath::new("late", "pull-late");
    narinfo(&srv, "c", &late, 404).await;
    narinfo(&srv, "c", &late, 404).await;
    assert_eq!(up.times_asked(&late.hash()), 1);
    // A push is served at once all the same.
    srv.push_api("c", srv.admin(), &late, Comp::Zstd)
        .await
        .expect(201);
    narinfo(&srv, "c", &late, 200).await;

    // A private cache asks nothing for an outsider, and what its pullers ask as usual.
    let p = TestPath::new("p", "pull-private");
    up.add(&p, &key);
    cache(&srv, "private", true, &up, &key).await;
    srv.get(&format!("/private/{}.narinfo", p.hash()), Auth::Anon)
        .await
        .expect(401);
    let stranger_token = srv.token(&["pull"], Some(&["c"])).await;
    srv.get(
        &format!("/private/{}.narinfo", p.hash()),
        stranger_token.bearer(),
    )
    .await
    .expect(403);
    assert_eq!(up.times_asked(&p.hash()), 0);
    let puller = srv.token(&["pull"], Some(&["private"])).await;
    srv.get(&format!("/private/{}.narinfo", p.hash()), puller.bearer())
        .await
        .expect(200);

    // The upstream NAR route: bad names are a 400, a path no upstream has a 404, and a cache
    // without upstreams asks nobody.
    let zeros = "0".repeat(52);
    srv.get("/c/upstream-nar/not-a-hash/x.nar.xz", Auth::Anon)
        .await
        .expect(400);
    srv.get(&format!("/c/upstream-nar/{}/garbage", p.hash()), Auth::Anon)
        .await
        .expect(400);
    srv.get(
        &format!("/c/upstream-nar/{}/{zeros}.nar.xz", "1".repeat(32)),
        Auth::Anon,
    )
    .await
    .expect(404);
    srv.create_cache("plain", false).await;
    let before = up.asked.lock().unwrap().len();
    srv.get(&format!("/plain/{}.narinfo", p.hash()), Auth::Anon)
        .await
        .expect(404);
    srv.get(
        &format!("/plain/upstream-nar/{}/{zeros}.nar.xz", p.hash()),
        Auth::Anon,
    )
    .await
    .expect(404);
    assert_eq!(up.asked.lock().unwrap().len(), before);

    // Bad upstream settings are a 400.
    for body in [
        json!({"upstreams": ["file:///nix/cache"]}),
        json!({"upstreams": ["https://user:pw@host/"]}),
        json!({"upstream_keys": ["not-a-key"]}),
    ] {
        srv.patch_json("/api/v1/caches/c", srv.admin(), &body)
            .await
            .expect(400);
    }
}
