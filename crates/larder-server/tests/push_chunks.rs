//! Push-side chunking (`/api/v1/caches/{c}/chunks…`): a client sends only the chunks a cache
//! lacks and has the server assemble the NAR; the server names every chunk itself, verifies
//! the assembled NAR like any upload, stores it as its own chunking would, and answers
//! "which chunks do you lack" from the cache's own content only.

#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;

use std::collections::HashSet;

use common::{Auth, Server, TestPath};
use larder_nix::hash::Sha256;
use serde_json::{json, Value};

/// Noise with compressible runs.
fn big_data(len: usize, seed: &str) -> Vec<u8> {
    let mut data = common::noise(len, seed);
    for i in (0..len).step_by(300_000) {
        let end = (i + 40_000).min(len);
        data[i..end].fill(b'x');
    }
    data
}

/// A NAR of one file of [`big_data`], several chunks long.
fn big_nar(len: usize, seed: &str) -> Vec<u8> {
    common::file_nar(&big_data(len, seed))
}

/// The NAR cut as the server cuts it: (id, bytes) per chunk.
fn chunks_of(nar: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    for n in larder_nix::chunking::chunk_lengths(nar) {
        let bytes = nar[at..at + n].to_vec();
        out.push((format!("{}.zst", Sha256::digest(&bytes).to_nix32()), bytes));
        at += n;
    }
    out
}

fn frames(chunks: &[&(String, Vec<u8>)], level: i32) -> Vec<u8> {
    chunks
        .iter()
        .flat_map(|(_, b)| zstd::bulk::compress(b, level).unwrap())
        .collect()
}

fn ids(chunks: &[(String, Vec<u8>)]) -> Vec<String> {
    chunks.iter().map(|(id, _)| id.clone()).collect()
}

async fn missing(srv: &Server, cache: &str, auth: Auth<'_>, session: &str, ids: &[String]) -> Resp {
    srv.post_json(
        &format!("/api/v1/caches/{cache}/chunks/missing"),
        auth,
        &json!({"session": session, "chunks": ids}),
    )
    .await
}

type Resp = common::Resp;

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

async fn upload(srv: &Server, cache: &str, auth: Auth<'_>, session: &str, body: Vec<u8>) -> Resp {
    srv.send(common::request(
        axum::http::Method::POST,
        &format!("/api/v1/caches/{cache}/chunks?session={session}"),
        auth,
        body,
    ))
    .await
}

async fn assemble(
    srv: &Server,
    cache: &str,
    auth: Auth<'_>,
    session: &str,
    ids: &[String],
) -> Resp {
    srv.post_json(
        &format!("/api/v1/caches/{cache}/chunks/assemble"),
        auth,
        &json!({"session": session, "chunks": ids}),
    )
    .await
}

/// Push `tp` the way `larder push` does: ask, upload what is missing (at zstd `level`),
/// assemble, publish. Returns the chunks uploaded and the upload's answer.
async fn push_chunked(
    srv: &Server,
    cache: &str,
    auth: Auth<'_>,
    tp: &TestPath,
    level: i32,
) -> (usize, Value) {
    let session = tp.nar_hash().to_nix32();
    let chunks = chunks_of(&tp.nar);
    let all = ids(&chunks);
    let want: HashSet<String> = strings(
        &missing(srv, cache, auth, &session, &all)
            .await
            .expect(200)
            .json()["missing"],
    )
    .into_iter()
    .collect();
    let mut seen = HashSet::new();
    let todo: Vec<&(String, Vec<u8>)> = chunks
        .iter()
        .filter(|(id, _)| want.contains(id) && seen.insert(id.clone()))
        .collect();
    if !todo.is_empty() {
        let stored = upload(srv, cache, auth, &session, frames(&todo, level))
            .await
            .expect(201)
            .json();
        let named: Vec<String> = stored["chunks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect();
        let sent: Vec<String> = todo.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(named, sent, "the server names chunks by their bytes");
    }
    let up = assemble(srv, cache, auth, &session, &all)
        .await
        .expect(201)
        .json();
    let id = up["upload_id"].as_str().unwrap().to_owned();
    srv.publish_api(cache, auth, &tp.publish_body(&id, None))
        .await
        .expect(201);
    (todo.len(), up)
}

#[tokio::test]
async fn a_nar_pushed_in_chunks_is_verified_stored_canonically_and_served() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let pusher = srv.token(&["push", "pull"], Some(&["c"])).await;
    let data = big_data(3 << 20, "gen1");
    let tp = TestPath::with_nar("big", "big", common::file_nar(&data));
    // Frames at another level than the server's: what is stored and served does not change.
    let (sent, up) = push_chunked(&srv, "c", pusher.bearer(), &tp, 9).await;
    assert!(sent >= 4, "{sent}");
    let stored = tp.stored();
    assert_eq!(up["nar_hash"], tp.nar_hash().to_string());
    assert_eq!(up["nar_size"], tp.nar_size());
    assert_eq!(up["file_hash"], Sha256::digest(&stored).to_string());
    assert_eq!(up["file_size"], stored.len());
    assert_eq!(up["compression"], "zstd");
    let served = srv
        .get(&format!("/c/{}", tp.stored_url()), pusher.bearer())
        .await
        .expect(200)
        .body;
    assert_eq!(&served[..], &stored[..]);
    srv.assert_present("c", &tp).await;

    // The next generation: an insertion that shifts what follows and an edit in place. Only
    // the chunks around them are sent.
    let mut data = data;
    data.splice(1_000_000..1_000_000, b"inserted".iter().copied());
    data[2_000_000..2_000_100].fill(b'!');
    let next = TestPath::with_nar("big", "big2", common::file_nar(&data));
    let total = chunks_of(&next.nar).len();
    let (sent, _) = push_chunked(&srv, "c", pusher.bearer(), &next, 3).await;
    assert!(sent <= 4 && total >= 10, "sent {sent} of {total} chunks");
    let served = srv
        .get(&format!("/c/{}", next.stored_url()), pusher.bearer())
        .await
        .expect(200)
        .body;
    assert_eq!(&served[..], &next.stored()[..]);
}

#[tokio::test]
async fn no_answer_depends_on_a_private_cache_the_token_cannot_read() {
    let srv = Server::new().await;
    srv.create_cache("victim", true).await;
    srv.create_cache("mine", false).await;
    let pusher = srv.token(&["push", "pull"], Some(&["mine"])).await;
    let secret = TestPath::with_nar("secret", "secret", big_nar(2 << 20, "the victim's"));
    push_chunked(&srv, "victim", srv.admin(), &secret, 3).await;
    // Also a push in flight in the victim's cache, under the session a guesser would pick.
    let session = secret.nar_hash().to_nix32();
    let inflight = chunks_of(&big_nar(1 << 20, "in flight"));
    upload(
        &srv,
        "victim",
        srv.admin(),
        &session,
        frames(&inflight.iter().collect::<Vec<_>>(), 3),
    )
    .await
    .expect(201);

    // Probing the victim's chunks from "mine": all missing, exactly like random ids.
    let guessed = ids(&chunks_of(&secret.nar));
    let guessed_inflight = ids(&inflight);
    let random: Vec<String> = (0..guessed.len())
        .map(|i| {
            format!(
                "{}.zst",
                Sha256::digest(format!("r{i}").as_bytes()).to_nix32()
            )
        })
        .collect();
    for probe in [&guessed, &guessed_inflight, &random] {
        let got = strings(
            &missing(&srv, "mine", pusher.bearer(), &session, probe)
                .await
                .expect(200)
                .json()["missing"],
        );
        assert_eq!(&got, probe, "every chunk is missing");
        // Assembling without uploading them is refused alike.
        let r = assemble(&srv, "mine", pusher.bearer(), &session, probe).await;
        assert_eq!(r.status.as_u16(), 409);
    }
    // Uploading the guess and assembling it answers what a server without the victim's NAR
    // answers: the canonical file, nothing of the victim's.
    let guess = TestPath::with_nar("guess", "guess", secret.nar.clone());
    let (sent, seen) = push_chunked(&srv, "mine", pusher.bearer(), &guess, 3).await;
    let fresh = Server::new().await;
    fresh.create_cache("mine", false).await;
    let (fresh_sent, control) = push_chunked(&fresh, "mine", fresh.admin(), &guess, 3).await;
    assert_eq!(sent, fresh_sent);
    let strip = |mut v: Value| {
        v.as_object_mut().unwrap().remove("upload_id");
        v
    };
    assert_eq!(strip(seen), strip(control));
}

#[tokio::test]
async fn bad_chunks_and_bad_assemblies_are_refused_and_publish_nothing() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let p = srv.token(&["push", "pull"], Some(&["c"])).await;
    let auth = p.bearer();
    // Not zstd; a frame expanding past the largest chunk; an empty frame; a bad session.
    upload(&srv, "c", auth, "s", b"not a frame".to_vec())
        .await
        .expect(400);
    let huge = zstd::bulk::compress(&vec![0u8; (1 << 20) + 1], 3).unwrap();
    upload(&srv, "c", auth, "s", huge).await.expect(400);
    upload(&srv, "c", auth, "s", zstd::bulk::compress(&[], 3).unwrap())
        .await
        .expect(400);
    upload(&srv, "c", auth, "BAD/../x", vec![])
        .await
        .expect(400);
    missing(&srv, "c", auth, "s", &["nope".into()])
        .await
        .expect(400);
    assemble(&srv, "c", auth, "s", &[]).await.expect(400);

    // Chunks the server would not cut: two halves of a NAR.
    let tp = TestPath::with_nar("halves", "halves", big_nar(200_000, "halves"));
    let half = tp.nar.len() / 2;
    let halves: Vec<(String, Vec<u8>)> = [&tp.nar[..half], &tp.nar[half..]]
        .iter()
        .map(|b| (format!("{}.zst", Sha256::digest(b).to_nix32()), b.to_vec()))
        .collect();
    upload(
        &srv,
        "c",
        auth,
        "s",
        frames(&halves.iter().collect::<Vec<_>>(), 3),
    )
    .await
    .expect(201);
    let r = assemble(&srv, "c", auth, "s", &ids(&halves))
        .await
        .expect(400);
    assert!(
        r.text().contains("not cut where the server cuts"),
        "{}",
        r.text()
    );
    // Chunks that do not make a NAR.
    let junk = vec![(
        format!("{}.zst", Sha256::digest(b"junk").to_nix32()),
        b"junk".to_vec(),
    )];
    upload(
        &srv,
        "c",
        auth,
        "s",
        frames(&junk.iter().collect::<Vec<_>>(), 3),
    )
    .await
    .expect(201);
    assemble(&srv, "c", auth, "s", &ids(&junk))
        .await
        .expect(400);
    // A chunk uploaded under another session is not this one's.
    let good = chunks_of(&tp.nar);
    upload(
        &srv,
        "c",
        auth,
        "other",
        frames(&good.iter().collect::<Vec<_>>(), 3),
    )
    .await
    .expect(201);
    assemble(&srv, "c", auth, "s", &ids(&good))
        .await
        .expect(409);
    assert_eq!(srv.path_count("c").await, 0);
    srv.assert_absent("c", &tp).await;
    // Pull only: refused.
    let puller = srv.token(&["pull"], Some(&["c"])).await;
    missing(&srv, "c", puller.bearer(), "s", &ids(&good))
        .await
        .expect(403);
}

#[tokio::test]
async fn claims_keep_a_sessions_chunks_through_garbage_collection() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let tp = TestPath::with_nar("kept", "kept", big_nar(2 << 20, "kept"));
    let session = tp.nar_hash().to_nix32();
    let chunks = chunks_of(&tp.nar);
    upload(
        &srv,
        "c",
        srv.admin(),
        &session,
        frames(&chunks.iter().collect::<Vec<_>>(), 3),
    )
    .await
    .expect(201);
    let before = srv.chunk_files();
    srv.post_json("/api/v1/caches/c/gc", srv.admin(), &json!({}))
        .await
        .expect(200);
    assert_eq!(
        srv.chunk_files(),
        before,
        "collection freed a claimed chunk"
    );
    // A rerun of the push finds them: nothing to send.
    let got = strings(
        &missing(&srv, "c", srv.admin(), &session, &ids(&chunks))
            .await
            .expect(200)
            .json()["missing"],
    );
    assert!(got.is_empty(), "{got:?}");
    let up = assemble(&srv, "c", srv.admin(), &session, &ids(&chunks))
        .await
        .expect(201)
        .json();
    srv.publish_api(
        "c",
        srv.admin(),
        &tp.publish_body(up["upload_id"].as_str().unwrap(), None),
    )
    .await
    .expect(201);
    srv.assert_present("c", &tp).await;
}

/// Chunks uploaded under a session that never assembles count against the cache's staging
/// allowance (`multipart_max_staged`, or its size limit when smaller): beyond it an upload is
/// refused with 413 and a message naming the bound, nothing of it stored; another cache is
/// not held back, and once the session assembles its NAR its chunks stop counting.
#[tokio::test]
async fn unassembled_push_sessions_are_bounded_by_the_staging_allowance() {
    let srv = Server::with_config(larder_server::config::ConfigFile {
        multipart_max_staged: Some(larder_server::config::SizeValue::Text("1MiB".into())),
        ..Default::default()
    })
    .await;
    srv.create_cache("c", false).await;
    srv.create_cache("d", false).await;
    // Noise compresses to about its size: ~700 KiB of frames per NAR.
    let nar_of = |seed: &str| {
        TestPath::with_nar(
            seed,
            seed,
            common::file_nar(&common::noise(700 << 10, seed)),
        )
    };
    let first = nar_of("staged-1");
    let second = nar_of("staged-2");
    let send = |tp: &TestPath, cache: &'static str| {
        let session = tp.nar_hash().to_nix32();
        let chunks = chunks_of(&tp.nar);
        let body = frames(&chunks.iter().collect::<Vec<_>>(), 3);
        let srv = &srv;
        async move { upload(srv, cache, srv.admin(), &session, body).await }
    };
    send(&first, "c").await.expect(201);
    let files = srv.chunk_files();
    let said = send(&second, "c").await.expect(413).text();
    for word in ["unassembled", "multipart_max_staged", r#"cache \"c\""#] {
        assert!(said.contains(word), "{word:?} not in {said}");
    }
    assert_eq!(srv.chunk_files(), files, "a refused upload stored chunks");
    // Another cache has its own allowance.
    send(&second, "d").await.expect(201);
    // Assembled and published, the first session's chunks are a NAR's: room again.
    let session = first.nar_hash().to_nix32();
    let up = assemble(
        &srv,
        "c",
        srv.admin(),
        &session,
        &ids(&chunks_of(&first.nar)),
    )
    .await
    .expect(201)
    .json();
    // Its claims went with the assembly: the NAR's row holds the chunks now (kept until they
    // expired, a cache's sessions of the last hours made each chunk upload slower).
    let c = srv.state.meta.get_cache("c").await.unwrap().unwrap();
    let claim = format!("push-{}-{session}", c.id);
    let sent = ids(&chunks_of(&first.nar));
    let held = srv.state.meta.claimed_chunks(&claim, &sent).await.unwrap();
    assert_eq!(held.len(), 0, "claims left after the assembly");
    srv.publish_api(
        "c",
        srv.admin(),
        &first.publish_body(up["upload_id"].as_str().unwrap(), None),
    )
    .await
    .expect(201);
    send(&second, "c").await.expect(201);
}

/// Chunks uploaded in one request are stored together, in one pack: two small NARs sent so
/// (their chunks in one body) are each one range of that pack, and each is served its own
/// bytes, again and again (the second download comes from the in-memory small files), whole
/// and by ranges.
#[tokio::test]
async fn nars_stored_in_one_pack_are_each_served_their_own_bytes() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let pusher = srv.token(&["push", "pull"], Some(&["c"])).await;
    let (a, b) = (TestPath::new("a", "pack-a"), TestPath::new("b", "pack-b"));
    let (ca, cb) = (chunks_of(&a.nar), chunks_of(&b.nar));
    assert_eq!((ca.len(), cb.len()), (1, 1), "small NARs are one chunk");
    let session = "onepack";
    upload(
        &srv,
        "c",
        pusher.bearer(),
        session,
        frames(&[&ca[0], &cb[0]], 3),
    )
    .await
    .expect(201);
    assert_eq!(srv.chunk_files(), 1, "one request, one object");
    for (tp, chunks) in [(&a, &ca), (&b, &cb)] {
        let up = assemble(&srv, "c", pusher.bearer(), session, &ids(chunks))
            .await
            .expect(201)
            .json();
        let id = up["upload_id"].as_str().unwrap().to_owned();
        srv.publish_api("c", pusher.bearer(), &tp.publish_body(&id, None))
            .await
            .expect(201);
    }
    assert_eq!(srv.chunk_files(), 1);
    for _ in 0..2 {
        for tp in [&a, &b] {
            let served = srv
                .get(&format!("/c/{}", tp.stored_url()), Auth::Anon)
                .await
                .expect(200)
                .body;
            assert_eq!(&served[..], &tp.stored()[..], "{}", tp.path);
        }
    }
    let stored = b.stored();
    let resp = srv
        .send(
            axum::http::Request::get(format!("/c/{}", b.stored_url()))
                .header("range", "bytes=3-9")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .expect(206);
    assert_eq!(&resp.body[..], &stored[3..10]);
}
