//! Nothing a pusher sees depends on what caches it cannot read hold (issue 14, item 8): a guess
//! of another cache's NAR, uploaded into the pusher's own cache, is answered, described and
//! served exactly like a NAR no cache holds. Identical NARs may still be stored once; that is
//! the store's business, invisible from outside.
//!
//! Ignored while the defect is open: run it with `cargo nextest run -p larder-server --test
//! dedup_oracle --run-ignored all` (today it fails: the guess comes back as `zstd`, 300 bytes,
//! where a NAR no cache holds comes back as `none`, 3760 bytes).
#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;

use common::{Auth, Comp, Server, TestPath};
use larder_nix::NarInfo;
use serde_json::Value;

/// What the pusher sees of uploading `tp` uncompressed into its cache `mine` and publishing
/// it: the upload's answer (without its id), the narinfo's FileSize, Compression and URL
/// form, and the bytes served at that URL.
async fn pusher_view(srv: &Server, auth: Auth<'_>, tp: &TestPath) -> (Value, String, Vec<u8>) {
    let up = srv
        .upload_api("mine", auth, &tp.compressed(Comp::None), "none")
        .await
        .expect(201)
        .json();
    let id = up["upload_id"].as_str().unwrap().to_owned();
    let mut answer = up.clone();
    answer.as_object_mut().unwrap().remove("upload_id");
    srv.publish_api("mine", auth, &tp.publish_body(&id, None))
        .await
        .expect(201);
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

#[tokio::test]
#[ignore = "issue 14 item 8 is open: a guess of a NAR stored for another cache is answered with \
            that cache's stored form (zstd, its FileSize); left to the content-defined chunking \
            work, which changes how identical NARs are stored"]
async fn a_guess_of_another_private_caches_nar_looks_like_any_new_nar() {
    let srv = Server::new().await;
    srv.create_cache("victim", true).await;
    srv.create_cache("mine", false).await;
    let pusher = srv.token(&["push", "pull"], Some(&["mine"])).await;
    // The victim's private cache holds this NAR, compressed with zstd.
    let secret = TestPath::new("secret", "the victim's private file");
    srv.push_api("victim", srv.admin(), &secret, Comp::Zstd)
        .await
        .expect(201);
    // The same guess, as two store paths of identical contents: one whose NAR the victim's
    // cache holds, and a control that no cache holds (another server, same bytes).
    let guess = TestPath::with_nar("guess", "guessed", secret.nar.clone());
    let seen = pusher_view(&srv, pusher.bearer(), &guess).await;

    let fresh = Server::new().await;
    fresh.create_cache("mine", false).await;
    let fresh_pusher = fresh.token(&["push", "pull"], Some(&["mine"])).await;
    let control = pusher_view(&fresh, fresh_pusher.bearer(), &guess).await;

    assert_eq!(
        seen.0, control.0,
        "the upload's answer depends on another cache's content"
    );
    assert_eq!(
        seen.1, control.1,
        "the narinfo depends on another cache's content"
    );
    assert!(
        seen.2 == control.2,
        "the served file depends on another cache's content"
    );
    assert_eq!(
        control.2, guess.nar,
        "uploaded uncompressed, served as sent"
    );
}
