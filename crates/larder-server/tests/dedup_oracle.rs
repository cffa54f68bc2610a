//! Nothing a pusher sees depends on what caches it cannot read hold (issue 14, item 8): a guess
//! of another cache's NAR, uploaded into the pusher's own cache, is answered, described and
//! served exactly like a NAR no cache holds. Identical NARs may still be stored once; that is
//! the store's business, invisible from outside.
//!
//! Each way of uploading a NAR is checked: the JSON API in one request, Nix's `PUT
//! nar/…` + `PUT ….narinfo`, and a multi-part upload. What remains (ARCHITECTURE.md, "No
//! cross-cache oracle"): a NAR stored whole by a larder older than content-defined chunking
//! is still reused by NarHash across caches.
#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;

use common::{Auth, Comp, Server, TestPath};
use larder_nix::NarInfo;
use serde_json::{json, Value};

/// How a NAR is uploaded.
#[derive(Clone, Copy, Debug)]
enum Route {
    /// `POST /api/v1/caches/C/nars` and `POST …/paths`.
    Api,
    /// Nix's uploader: `PUT /C/nar/….nar` and `PUT /C/H.narinfo`.
    Nix,
    /// `POST …/multipart`, one part, `…/complete`, then `POST …/paths`.
    Multipart,
}

/// What the pusher sees of uploading `tp` uncompressed into its cache `mine` by `route` and
/// publishing it: the upload's answer (without its id), the narinfo's FileSize, Compression
/// and URL form, and the bytes served at that URL.
async fn pusher_view(
    srv: &Server,
    auth: Auth<'_>,
    tp: &TestPath,
    route: Route,
) -> (Value, String, Vec<u8>) {
    let answer = match route {
        Route::Api => {
            let up = srv
                .upload_api("mine", auth, &tp.compressed(Comp::None), "none")
                .await
                .expect(201)
                .json();
            publish(srv, auth, tp, up).await
        }
        Route::Nix => {
            let (nar, info) = srv.push_nix("mine", auth, tp, Comp::None).await;
            json!({ "nar": nar.expect(204).text(), "narinfo": info.expect(204).text() })
        }
        Route::Multipart => {
            let id = srv
                .post_json(
                    "/api/v1/caches/mine/multipart?compression=none",
                    auth,
                    &json!({}),
                )
                .await
                .expect(201)
                .json()["upload_id"]
                .as_str()
                .unwrap()
                .to_owned();
            srv.put(
                &format!("/api/v1/caches/mine/multipart/{id}/parts/0"),
                auth,
                tp.compressed(Comp::None),
            )
            .await
            .expect(204);
            let up = srv
                .post_json(
                    &format!("/api/v1/caches/mine/multipart/{id}/complete"),
                    auth,
                    &json!({}),
                )
                .await
                .expect(201)
                .json();
            publish(srv, auth, tp, up).await
        }
    };
    let text = srv
        .get(&format!("/mine/{}.narinfo", tp.hash()), auth)
        .await
        .expect(200)
        .text();
    let ni = NarInfo::parse(&text).unwrap();
    let served = srv
        .get(&format!("/mine/{}", ni.url), auth)
        .await
        .expect(200)
        .body;
    let described = format!(
        "Compression: {}\nFileSize: {:?}\nURL ends: {}",
        ni.compression,
        ni.file_size,
        ni.url.rsplit('.').next().unwrap_or("")
    );
    (answer, described, served)
}

/// Publish the upload answered `up` and return that answer without its (random) id.
async fn publish(srv: &Server, auth: Auth<'_>, tp: &TestPath, mut up: Value) -> Value {
    let id = up["upload_id"].as_str().unwrap().to_owned();
    up.as_object_mut().unwrap().remove("upload_id");
    srv.publish_api("mine", auth, &tp.publish_body(&id, None))
        .await
        .expect(201);
    up
}

#[tokio::test]
async fn a_guess_of_another_private_caches_nar_looks_like_any_new_nar() {
    // One chunk, and many (some of them shared with the victim's other NAR).
    let small = TestPath::new("secret", "the victim's private file");
    let shared = common::noise(3 << 20, "shared");
    let mut bytes = shared.clone();
    bytes.extend_from_slice(b"the victim's private file");
    let large = TestPath::with_nar("secret", "large", common::file_nar(&bytes));
    for secret in [&small, &large] {
        for route in [Route::Api, Route::Nix, Route::Multipart] {
            guess_by(route, secret, &shared).await;
        }
    }
}

async fn guess_by(route: Route, secret: &TestPath, shared: &[u8]) {
    let srv = Server::new().await;
    srv.create_cache("victim", true).await;
    srv.create_cache("mine", false).await;
    let pusher = srv.token(&["push", "pull"], Some(&["mine"])).await;
    // The victim's private cache holds this NAR, compressed with zstd, and another that
    // shares its first chunks.
    srv.push_api("victim", srv.admin(), secret, Comp::Zstd)
        .await
        .expect(201);
    let other = TestPath::with_nar("other", "other", common::file_nar(shared));
    srv.push_api("victim", srv.admin(), &other, Comp::Zstd)
        .await
        .expect(201);
    // The same guess, as two store paths of identical contents: one whose NAR the victim's
    // cache holds, and a control that no cache holds (another server, same bytes).
    let guess = TestPath::with_nar("guess", "guessed", secret.nar.clone());
    let seen = pusher_view(&srv, pusher.bearer(), &guess, route).await;

    let fresh = Server::new().await;
    fresh.create_cache("mine", false).await;
    let fresh_pusher = fresh.token(&["push", "pull"], Some(&["mine"])).await;
    let control = pusher_view(&fresh, fresh_pusher.bearer(), &guess, route).await;

    assert_eq!(
        seen.0, control.0,
        "{route:?}: the upload's answer depends on another cache's content"
    );
    assert_eq!(
        seen.1, control.1,
        "{route:?}: the narinfo depends on another cache's content"
    );
    assert!(
        seen.2 == control.2,
        "{route:?}: the served file depends on another cache's content"
    );
    // The file the server makes of the NAR on its own (its chunks, each a zstd frame),
    // whatever the upload's compression.
    assert!(
        control.2 == guess.stored(),
        "{route:?}: not the NAR's own chunked file"
    );
}
