//! Content-defined chunking of stored NARs: NARs sharing bytes share chunks, whatever path
//! and compression they arrive by; a chunked NAR is served whole and by ranges, as one valid
//! zstd stream; a chunk missing or damaged behind the server's back fails the download
//! (never a short `200`); garbage collection keeps a chunk while any NAR uses it; and nothing
//! an uploader sees depends on what another cache holds.

#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;

use axum::body::Body;
use axum::http::{header, Method, StatusCode};
use common::{request, Auth, Comp, Server, TestPath};
use http_body_util::BodyExt;
use larder_nix::hash::Sha256;
use larder_nix::NarInfo;
use larder_store::meta::ChunkRow;
use serde_json::json;
use tower::ServiceExt;

/// A NAR of one file of `len` bytes: noise with a few compressible runs, so that chunks
/// compress differently and frames have different sizes.
fn big_contents(len: usize, seed: &str) -> Vec<u8> {
    let mut data = common::noise(len, seed);
    for i in (0..len).step_by(400_000) {
        let end = (i + 50_000).min(len);
        data[i..end].fill(b'a');
    }
    data
}

/// `data` with `insert` inserted at `at` (shifting what follows).
fn inserted(data: &[u8], at: usize, insert: &[u8]) -> Vec<u8> {
    [&data[..at], insert, &data[at..]].concat()
}

/// The objects holding chunks (packs, and chunks stored on their own) in the store.
fn chunk_objects(srv: &Server) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for kind in ["chunk", "pack"] {
        let root = srv.data_dir().join("store/objects").join(kind);
        for d in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
                out.push(f.path());
            }
        }
    }
    out.sort();
    out
}

/// The chunks of the NAR `tp` is published with in `cache`, in order.
async fn nar_chunks(srv: &Server, cache: &str, tp: &TestPath) -> Vec<ChunkRow> {
    let c = srv.state.meta.get_cache(cache).await.unwrap().unwrap();
    let path = srv
        .state
        .meta
        .get_path(c.id, &tp.hash())
        .await
        .unwrap()
        .unwrap();
    srv.state.meta.nar_chunks(path.nar.id).await.unwrap()
}

/// Bytes the store occupies (every pack and chunk object once).
async fn stored_bytes(srv: &Server) -> i64 {
    srv.state.meta.store_totals().await.unwrap().stored
}

/// The narinfo a cache serves for `tp`, and the NAR file it points to, checked: FileHash and
/// FileSize of the served bytes, a zstd stream decompressing to `tp`'s NAR.
async fn served(srv: &Server, cache: &str, tp: &TestPath, auth: Auth<'_>) -> (NarInfo, Vec<u8>) {
    let text = srv
        .get(&format!("/{cache}/{}.narinfo", tp.hash()), auth)
        .await
        .expect(200)
        .text();
    let ni = NarInfo::parse(&text).expect("narinfo parses");
    assert_eq!(ni.compression, "zstd", "chunked NARs are served as zstd");
    assert!(ni.url.ends_with(".nar.zst"), "{}", ni.url);
    let nar = srv
        .get(&format!("/{cache}/{}", ni.url), auth)
        .await
        .expect(200);
    assert_eq!(
        nar.header(header::CONTENT_LENGTH),
        Some(nar.body.len().to_string().as_str())
    );
    assert_eq!(ni.file_hash, Some(Sha256::digest(&nar.body)), "FileHash");
    assert_eq!(ni.file_size, Some(nar.body.len() as u64), "FileSize");
    let nar_bytes = zstd::decode_all(&nar.body[..]).expect("one valid zstd stream");
    assert_eq!(nar_bytes, tp.nar, "served NAR decompresses to ours");
    (ni, nar.body)
}

#[tokio::test]
async fn nars_sharing_bytes_share_chunks_whatever_the_upload_path() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let base = big_contents(6 << 20, "gen1");
    let gen1 = TestPath::with_nar("gen-1", "gen-1", common::file_nar(&base));
    // An insertion that shifts everything after it, and an edit in place.
    let mut edited = inserted(&base, 2_000_000, b"a line added in the middle\n");
    edited[5_000_000..5_000_100].fill(b'z');
    let gen2 = TestPath::with_nar("gen-2", "gen-2", common::file_nar(&edited));

    srv.push_nix("c", srv.admin(), &gen1, Comp::Xz)
        .await
        .1
        .expect(204);
    let first = nar_chunks(&srv, "c", &gen1).await;
    assert!(
        first.len() >= 8,
        "a 6 MiB NAR makes many chunks: {}",
        first.len()
    );
    // Stored together: one object, which is exactly the NAR's file.
    assert_eq!(chunk_objects(&srv).len(), 1);
    let before = stored_bytes(&srv).await;
    srv.push_api("c", srv.admin(), &gen2, Comp::None)
        .await
        .expect(201);
    let second = nar_chunks(&srv, "c", &gen2).await;
    let old: std::collections::HashSet<&str> =
        first.iter().map(|c| c.chunk_hash.as_str()).collect();
    let new: Vec<&ChunkRow> = second
        .iter()
        .filter(|c| !old.contains(c.chunk_hash.as_str()))
        .collect();
    // Each change rewrites the chunk it falls in and maybe its neighbour.
    assert!(
        new.len() <= 6,
        "an insertion and an edit add a few chunks, not a NAR's worth: {} of {}",
        new.len(),
        first.len()
    );
    // Only those are stored, in one new object.
    assert_eq!(chunk_objects(&srv).len(), 2);
    let added: i64 = new.iter().map(|c| c.file_size).sum();
    assert_eq!(stored_bytes(&srv).await - before, added);
    let (ni1, _) = served(&srv, "c", &gen1, Auth::Anon).await;
    let (ni2, _) = served(&srv, "c", &gen2, Auth::Anon).await;
    assert_ne!(ni1.file_hash, ni2.file_hash);
    assert_eq!(srv.staging_files(), 0);
}

#[tokio::test]
async fn the_served_file_does_not_depend_on_the_client_compression() {
    let srv = Server::new().await;
    for (i, comp) in [Comp::Zstd, Comp::Xz, Comp::None].into_iter().enumerate() {
        let cache = format!("c{i}");
        srv.create_cache(&cache, false).await;
        let tp = TestPath::with_nar(
            "same",
            "same",
            common::file_nar(&big_contents(3 << 20, "s")),
        );
        srv.push_api(&cache, srv.admin(), &tp, comp)
            .await
            .expect(201);
    }
    let tp = TestPath::with_nar(
        "same",
        "same",
        common::file_nar(&big_contents(3 << 20, "s")),
    );
    let mut files = Vec::new();
    for i in 0..3 {
        files.push(served(&srv, &format!("c{i}"), &tp, Auth::Anon).await.1);
    }
    assert!(files.windows(2).all(|w| w[0] == w[1]));
}

/// What a push token on its own cache sees when it uploads a guess of what a private cache
/// holds is exactly what it sees on a server where no cache holds it: the upload's answer,
/// the narinfo and the served file (the cross-cache oracle of issue 14, item 8).
#[tokio::test]
async fn an_upload_learns_nothing_from_other_caches() {
    let secret = common::file_nar(&big_contents(2 << 20, "the secret"));
    let small_secret = common::file_nar(b"a small secret");
    let observe = |with_secret: bool| {
        let (secret, small_secret) = (secret.clone(), small_secret.clone());
        async move {
            let srv = Server::new().await;
            srv.create_cache("private", true).await;
            srv.create_cache("mine", false).await;
            if with_secret {
                for (name, nar) in [("secret", &secret), ("small", &small_secret)] {
                    let tp = TestPath::with_nar(name, "owner", nar.clone());
                    srv.push_api("private", srv.admin(), &tp, Comp::Zstd)
                        .await
                        .expect(201);
                }
            }
            let push = srv.token(&["push", "pull"], Some(&["mine"])).await;
            let mut seen = Vec::new();
            for (name, nar) in [("guess", &secret), ("small-guess", &small_secret)] {
                let tp = TestPath::with_nar(name, "attacker", nar.clone());
                let up = srv
                    .upload_api("mine", push.bearer(), &tp.compressed(Comp::None), "none")
                    .await
                    .expect(201)
                    .json();
                let mut answer = up.clone();
                answer["upload_id"] = json!("");
                let id = up["upload_id"].as_str().expect("id").to_owned();
                srv.publish_api("mine", push.bearer(), &tp.publish_body(&id, None))
                    .await
                    .expect(201);
                let (ni, file) = served(&srv, "mine", &tp, push.bearer()).await;
                seen.push((answer, ni.url, ni.file_size, file));
            }
            seen
        }
    };
    let without = observe(false).await;
    let with = observe(true).await;
    assert_eq!(with, without);
}

#[tokio::test]
async fn ranges_span_chunks() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let tp = TestPath::with_nar("ranged", "r", common::file_nar(&big_contents(4 << 20, "r")));
    srv.push_api("c", srv.admin(), &tp, Comp::Zstd)
        .await
        .expect(201);
    let (ni, file) = served(&srv, "c", &tp, Auth::Anon).await;
    let len = file.len() as u64;
    for (spec, want) in [
        (format!("bytes=0-{}", len - 1), 0..len),
        ("bytes=100-2000000".to_owned(), 100..2_000_001),
        (format!("bytes={}-", len - 10), len - 10..len),
        ("bytes=-5".to_owned(), len - 5..len),
        (format!("bytes=1000-{}", u64::MAX), 1000..len),
    ] {
        let mut req = request(
            Method::GET,
            &format!("/c/{}", ni.url),
            Auth::Anon,
            Body::empty(),
        );
        req.headers_mut()
            .insert(header::RANGE, spec.parse().expect("header"));
        let r = srv.send(req).await.expect(206);
        assert_eq!(
            r.body,
            file[want.start as usize..want.end as usize],
            "{spec}"
        );
        assert_eq!(
            r.header(header::CONTENT_RANGE),
            Some(format!("bytes {}-{}/{len}", want.start, want.end - 1).as_str())
        );
    }
}

/// A chunk deleted behind the server's back: the download is refused before it starts
/// (404, as for any missing NAR), never a `200` with a short body; a chunk cut short aborts
/// the body (the client sees an error, not a complete response).
#[tokio::test]
async fn a_damaged_chunk_fails_the_download() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let tp = TestPath::with_nar(
        "fragile",
        "f",
        common::file_nar(&big_contents(4 << 20, "f")),
    );
    srv.push_api("c", srv.admin(), &tp, Comp::Zstd)
        .await
        .expect(201);
    let (ni, _) = served(&srv, "c", &tp, Auth::Anon).await;
    assert!(nar_chunks(&srv, "c", &tp).await.len() > 3);
    let objects = chunk_objects(&srv);
    assert_eq!(objects.len(), 1, "its chunks are stored together");

    // Cut it short: the response starts (the object exists) but the body fails.
    let victim = &objects[0];
    let bytes = std::fs::read(victim).expect("chunk");
    std::fs::write(victim, &bytes[..bytes.len() / 2]).expect("truncate");
    let resp = larder_server::router(srv.state.clone())
        .oneshot(request(
            Method::GET,
            &format!("/c/{}", ni.url),
            Auth::Anon,
            Body::empty(),
        ))
        .await
        .expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    let declared: usize = resp.headers()[header::CONTENT_LENGTH]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("number");
    let body = resp.into_body().collect().await;
    assert!(
        body.is_err(),
        "a damaged chunk must abort the body, not end it cleanly"
    );
    let _ = declared;

    // Delete it: refused before any byte.
    std::fs::remove_file(victim).expect("delete");
    srv.get(&format!("/c/{}", ni.url), Auth::Anon)
        .await
        .expect(404);
}

#[tokio::test]
async fn garbage_collection_keeps_chunks_other_nars_use() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let base = big_contents(3 << 20, "gc");
    let a = TestPath::with_nar("a", "a", common::file_nar(&base));
    let b = TestPath::with_nar(
        "b",
        "b",
        common::file_nar(&inserted(&base, 1_500_000, b"b's own bytes")),
    );
    srv.push_api("c", srv.admin(), &a, Comp::Zstd)
        .await
        .expect(201);
    srv.push_api("c", srv.admin(), &b, Comp::Zstd)
        .await
        .expect(201);
    let a_chunks = nar_chunks(&srv, "c", &a).await;
    let b_chunks = nar_chunks(&srv, "c", &b).await;
    let ids =
        |rows: &[ChunkRow]| -> Vec<String> { rows.iter().map(|r| r.chunk_hash.clone()).collect() };
    let both = stored_bytes(&srv).await;
    srv.delete(&format!("/api/v1/caches/c/paths/{}", a.hash()), srv.admin())
        .await
        .expect(200);
    // Past the evicted NAR's grace period at once.
    let delete = |key| srv.state.objects.delete_boxed(key);
    srv.state
        .meta
        .collect_garbage(3600, -1, 3600, &delete)
        .await
        .expect("gc");
    let left = srv
        .state
        .meta
        .located_chunks(&ids(&a_chunks))
        .await
        .unwrap();
    let shared: std::collections::HashSet<String> = ids(&b_chunks).into_iter().collect();
    assert!(
        left.keys().all(|id| shared.contains(id)),
        "a's own chunks are collected"
    );
    assert!(
        left.len() > a_chunks.len() / 2,
        "the chunks b shares are kept: {} of {}",
        left.len(),
        a_chunks.len()
    );
    // a's pack is mostly b's now: kept whole (compacting it would save little).
    assert_eq!(stored_bytes(&srv).await, both);
    served(&srv, "c", &b, Auth::Anon).await;
}

/// A pack left less than half used (the NAR it was written for is gone, a newer one uses a
/// little of it) is compacted: its live chunks are copied into a new pack, the old one is
/// deleted once no download can still be reading it, and what the store occupies follows
/// what the NARs use. The NAR using the moved chunks is served whole throughout.
#[tokio::test]
async fn packs_mostly_dead_are_compacted() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let base = big_contents(3 << 20, "compact");
    let a = TestPath::with_nar("a", "a", common::file_nar(&base));
    // b keeps a's first quarter, and has its own bytes after it.
    let own = big_contents(2 << 20, "b's own");
    let b = TestPath::with_nar(
        "b",
        "b",
        common::file_nar(&[&base[..base.len() / 4], &own[..]].concat()),
    );
    srv.push_api("c", srv.admin(), &a, Comp::Zstd)
        .await
        .expect(201);
    srv.push_api("c", srv.admin(), &b, Comp::Zstd)
        .await
        .expect(201);
    assert_eq!(chunk_objects(&srv).len(), 2);
    let a_size = a.stored().len() as i64;
    srv.delete(&format!("/api/v1/caches/c/paths/{}", a.hash()), srv.admin())
        .await
        .expect(200);
    let delete = |key| srv.state.objects.delete_boxed(key);
    srv.state
        .meta
        .collect_garbage(3600, -1, 3600, &delete)
        .await
        .expect("gc");
    let live: i64 = {
        let b_rows = nar_chunks(&srv, "c", &b).await;
        // The first chunk holds the NAR's header (b's own), the second is a's.
        let a_pack = b_rows[1].pack.clone().expect("packed");
        let mut seen = std::collections::HashSet::new();
        b_rows
            .iter()
            .filter(|r| r.pack.as_deref() == Some(a_pack.as_str()))
            .filter(|r| seen.insert(r.chunk_hash.clone()))
            .map(|r| r.file_size)
            .sum()
    };
    assert!(live > 0 && 2 * live < a_size, "{live} of {a_size}");
    // Downloaded before the move: the server remembers where b's bytes were.
    let (ni, _) = served(&srv, "c", &b, Auth::Anon).await;
    let before = stored_bytes(&srv).await;
    assert_eq!(
        larder_server::chunked::compact_packs(&srv.state)
            .await
            .unwrap(),
        1
    );
    served(&srv, "c", &b, Auth::Anon).await;
    // The old pack stays while a download may still read it (the claim lifetime)...
    assert_eq!(chunk_objects(&srv).len(), 3);
    assert_eq!(stored_bytes(&srv).await, before + live);
    srv.state
        .meta
        .collect_garbage(3600, -1, 3600, &delete)
        .await
        .expect("gc");
    assert_eq!(chunk_objects(&srv).len(), 3);
    // ... and goes after it.
    srv.state
        .meta
        .collect_garbage(3600, -1, -1, &delete)
        .await
        .expect("gc");
    assert_eq!(chunk_objects(&srv).len(), 2);
    assert_eq!(stored_bytes(&srv).await, before + live - a_size);
    assert_eq!(
        srv.state.meta.store_totals().await.unwrap(),
        srv.state.meta.recount_store_totals().await.unwrap()
    );
    // The old pack went at once here (a claim lifetime of -1; hours in a server), so let the
    // NAR's few seconds in memory and the check of its objects pass: its row is read again,
    // and the object ranges remembered from before the move (they live longer), which name
    // the deleted pack, are read again too, not answered 404.
    let c = srv.state.meta.get_cache("c").await.unwrap().unwrap();
    srv.state.hot.forget_nar(c.id, &ni.file_hash.unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(5_100)).await;
    served(&srv, "c", &b, Auth::Anon).await;
}

/// Nix reads a closure's narinfos before its NARs: a narinfo served has the server read where
/// its (large) NAR file's bytes are, in the background, so the download does not.
#[tokio::test]
async fn a_narinfo_served_readies_its_nars_ranges() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let a = TestPath::with_nar(
        "a",
        "warm",
        common::file_nar(&big_contents(1 << 20, "warm")),
    );
    srv.push_api("c", srv.admin(), &a, Comp::Zstd)
        .await
        .expect(201);
    let text = srv
        .get(&format!("/c/{}.narinfo", a.hash()), Auth::Anon)
        .await
        .expect(200)
        .text();
    let file_hash = NarInfo::parse(&text).unwrap().file_hash.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while srv.state.hot.spans(&file_hash).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "ranges not read after the narinfo"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    served(&srv, "c", &a, Auth::Anon).await;
}

/// Pushes of NARs sharing most of their chunks, several at once, while eviction and garbage
/// collection (with no grace period at all) run in a loop: every path published at the end
/// serves its whole NAR, every chunk of it present. Several rounds, each a fresh race.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pushes_sharing_chunks_with_eviction_never_lose_a_chunk() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let srv = Arc::new(Server::new().await);
    srv.create_cache("c", false).await;
    let base = Arc::new(big_contents(1 << 20, "shared base"));
    let (mut kept, mut evicted) = (0, 0);
    for round in 0..4 {
        // Small enough that eviction keeps running into what is being pushed.
        srv.set_limit_quietly("c", 1_500_000).await;
        let stop = Arc::new(AtomicBool::new(false));
        let evictor = {
            let (srv, stop) = (srv.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let cache = srv.state.meta.get_cache("c").await.unwrap().unwrap();
                    larder_server::retention::evict(&srv.state, &cache, false)
                        .await
                        .unwrap();
                    let delete = |key| srv.state.objects.delete_boxed(key);
                    srv.state
                        .meta
                        .collect_garbage(3600, -1, 3600, &delete)
                        .await
                        .unwrap();
                    tokio::task::yield_now().await;
                }
            })
        };
        let mut pushers = Vec::new();
        for p in 0..4 {
            let (srv, base) = (srv.clone(), base.clone());
            pushers.push(tokio::spawn(async move {
                let mut pushed = Vec::new();
                for k in 0..3 {
                    let seed = format!("r{round}-p{p}-k{k}");
                    let at = 100_000 * (p + 1) + 7 * k;
                    let nar = common::file_nar(&inserted(&base, at, seed.as_bytes()));
                    let tp = TestPath::with_nar("shares", &seed, nar);
                    let comp = [Comp::Zstd, Comp::None, Comp::Xz][k % 3];
                    let r = srv.push_api("c", srv.admin(), &tp, comp).await;
                    assert_eq!(r.status, 201, "push: {}", r.text());
                    pushed.push(tp);
                }
                pushed
            }));
        }
        let mut all = Vec::new();
        for p in pushers {
            all.extend(p.await.unwrap());
        }
        stop.store(true, Ordering::Relaxed);
        evictor.await.unwrap();
        // What the database says is published (the in-memory narinfos may be a moment
        // behind an eviction) must be served whole.
        let cache = srv.state.meta.get_cache("c").await.unwrap().unwrap();
        for tp in &all {
            let found = srv.state.meta.get_path(cache.id, &tp.hash()).await.unwrap();
            match found {
                Some(_) => kept += 1,
                None => evicted += 1,
            }
            if let Some(path) = found {
                for chunk in srv.state.meta.nar_chunks(path.nar.id).await.unwrap() {
                    assert!(
                        srv.state.objects.exists(&chunk.location().0).await.unwrap(),
                        "round {round}: {} lost chunk {}",
                        tp.path,
                        chunk.chunk_hash
                    );
                }
                let url = larder_server::publish::render_narinfo(&path);
                let ni = NarInfo::parse(&url).unwrap();
                let nar = srv
                    .get(&format!("/c/{}", ni.url), Auth::Anon)
                    .await
                    .expect(200);
                assert_eq!(zstd::decode_all(&nar.body[..]).unwrap(), tp.nar);
            }
        }
    }
    assert!(
        kept > 0 && evicted > 0,
        "kept {kept}, evicted {evicted}: no race was run"
    );
    // Without eviction, everything pushed now is served whole.
    let tp = TestPath::with_nar("after", "after", common::file_nar(&base));
    srv.push_api("c", srv.admin(), &tp, Comp::Zstd)
        .await
        .expect(201);
    served(&srv, "c", &tp, Auth::Anon).await;
}

/// The figures a user reads: per cache the size its limit counts and what it occupies after
/// deduplication (`cache info`, the web UI, `/metrics`), server-wide the dedup ratio (only to
/// who may see every cache).
#[tokio::test]
async fn accounting_shows_logical_and_deduplicated_sizes() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    srv.create_cache("d", false).await;
    let base = big_contents(3 << 20, "acct");
    let a = TestPath::with_nar("a", "a", common::file_nar(&base));
    let b = TestPath::with_nar(
        "b",
        "b",
        common::file_nar(&inserted(&base, 1_000_000, b"b's change")),
    );
    srv.push_api("c", srv.admin(), &a, Comp::Zstd)
        .await
        .expect(201);
    srv.push_api("c", srv.admin(), &b, Comp::Zstd)
        .await
        .expect(201);
    srv.push_api("d", srv.admin(), &a, Comp::Xz)
        .await
        .expect(201);
    let (sa, sb) = (a.stored().len() as i64, b.stored().len() as i64);
    let info = srv.cache_info("c").await;
    assert_eq!(info["size"], json!(sa + sb), "{info}");
    let stored = info["stored_size"].as_i64().expect("stored_size");
    assert!(
        stored < sa + sb / 2 && stored >= sa,
        "two NARs sharing most chunks occupy little more than one: {stored} of {}",
        sa + sb
    );
    let d = srv.cache_info("d").await;
    assert_eq!(d["stored_size"], json!(sa), "{d}");
    let page = srv.get("/ui/caches/c", Auth::Anon).await.expect(200).text();
    assert!(page.contains("After deduplication"), "{page}");

    let text = srv.get("/metrics", srv.admin()).await.expect(200).text();
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in {text}"))
    };
    assert_eq!(
        value("larder_cache_stored_bytes{cache=\"c\"}") as i64,
        stored
    );
    assert_eq!(value("larder_store_logical_bytes") as i64, 2 * sa + sb);
    let physical = value("larder_store_stored_bytes");
    assert_eq!(physical as i64, stored, "d's NAR is c's");
    let ratio = value("larder_store_dedup_ratio");
    assert!(
        (ratio - (2 * sa + sb) as f64 / physical).abs() < 0.01,
        "{ratio}"
    );
    // A private cache hidden from the scraper: no server-wide figures.
    srv.create_cache("hidden", true).await;
    let anon = srv.get("/metrics", Auth::Anon).await.expect(200).text();
    assert!(!anon.contains("larder_store_stored_bytes"), "{anon}");
}
