//! Uploads that should work, through both paths (Nix's uploader and the JSON API), and what a
//! substituter then reads: narinfo fields that match the served bytes, signatures that verify
//! with the cache's key, ranges, `.ls` listings, logs, deduplication across caches, the bulk
//! `missing` query, reference checks, conflicts, idempotence and client-signed caches.

mod common;

use std::io::Read;

use axum::http::{header, Method, StatusCode};
use common::{nar_url, request, Auth, Comp, Server, TestPath};
use larder_nix::hash::Sha256;
use larder_nix::NarInfo;
use serde_json::{json, Value};

const ALL: [Comp; 3] = [Comp::Zstd, Comp::Xz, Comp::None];

fn decompress(comp: Comp, bytes: &[u8]) -> Vec<u8> {
    match comp {
        Comp::None => bytes.to_vec(),
        Comp::Zstd => zstd::decode_all(bytes).expect("served zstd decodes"),
        Comp::Xz => {
            let mut out = Vec::new();
            xz2::read::XzDecoder::new_multi_decoder(bytes)
                .read_to_end(&mut out)
                .expect("served xz decodes");
            out
        }
    }
}

/// Fetch `tp`'s narinfo from `cache` as a substituter would and check it against the NAR the
/// cache serves: FileHash/FileSize of the served bytes, NarHash/NarSize of their
/// decompression, our references and deriver, and a signature by the cache's public key.
/// Returns the narinfo and the served NAR file.
async fn check_served(srv: &Server, cache: &str, tp: &TestPath) -> (NarInfo, Vec<u8>) {
    let r = srv
        .get(&format!("/{cache}/{}.narinfo", tp.hash()), Auth::Anon)
        .await
        .expect(200);
    assert_eq!(r.header(header::CONTENT_TYPE), Some("text/x-nix-narinfo"));
    let text = r.text();
    let ni = NarInfo::parse(&text).expect("served narinfo parses");
    assert_eq!(ni.to_string(), text, "served narinfo is in canonical form");
    assert!(
        text.contains("\nCompression: "),
        "Compression is always present: {text}"
    );
    assert_eq!(ni.store_path, tp.path);
    assert_eq!(ni.nar_hash, tp.nar_hash());
    assert_eq!(ni.nar_size, tp.nar_size());
    assert_eq!(ni.references, tp.references);
    assert_eq!(ni.deriver, tp.deriver);
    let key = srv.public_key(cache).await;
    assert!(ni.verify(&key), "Sig does not verify with {key}: {text}");

    let comp = match ni.compression.as_str() {
        "zstd" => Comp::Zstd,
        "xz" => Comp::Xz,
        "none" => Comp::None,
        other => panic!("unexpected Compression {other}"),
    };
    let nar = srv
        .get(&format!("/{cache}/{}", ni.url), Auth::Anon)
        .await
        .expect(200);
    assert_eq!(
        nar.header(header::CONTENT_TYPE),
        Some("application/x-nix-nar")
    );
    let len = nar.body.len().to_string();
    assert_eq!(nar.header(header::CONTENT_LENGTH), Some(len.as_str()));
    assert_eq!(ni.file_hash, Some(Sha256::digest(&nar.body)), "FileHash");
    assert_eq!(ni.file_size, Some(nar.body.len() as u64), "FileSize");
    assert_eq!(ni.url, nar_url(&nar.body, comp));
    assert_eq!(
        decompress(comp, &nar.body),
        tp.nar,
        "served NAR decompresses to ours"
    );
    (ni, nar.body)
}

#[tokio::test]
async fn nix_uploader_round_trip() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let key = srv.public_key("c").await;
    assert_eq!(
        key.name(),
        "c.127.0.0.1-1",
        "managed key named <cache>.<host>-1"
    );
    for comp in ALL {
        let tp = TestPath::new(&format!("hello-{}", comp.name()), comp.name());
        let (nar, info) = srv.push_nix("c", srv.admin(), &tp, comp).await;
        nar.expect(204);
        info.expect(204);
        let (ni, body) = check_served(&srv, "c", &tp).await;
        assert_eq!(ni.compression, "zstd", "stored in the server's form");
        assert_eq!(body, tp.stored(), "served as the server's chunks");
        // HEAD: same headers, no body.
        let h = srv
            .head(&format!("/c/{}.narinfo", tp.hash()), Auth::Anon)
            .await
            .expect(200);
        assert!(h.body.is_empty());
        let h = srv
            .head(&format!("/c/{}", ni.url), Auth::Anon)
            .await
            .expect(200);
        assert!(h.body.is_empty());
        let len = body.len().to_string();
        assert_eq!(h.header(header::CONTENT_LENGTH), Some(len.as_str()));
    }
    assert_eq!(srv.path_count("c").await, 3);
    assert_eq!(srv.staging_files(), 0);
}

#[tokio::test]
async fn json_api_round_trip() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let push = srv.token(&["push"], Some(&["c"])).await;
    for comp in ALL {
        let tp = TestPath::new(&format!("api-{}", comp.name()), comp.name());
        let bytes = tp.compressed(comp);
        let up = srv
            .upload_api("c", push.bearer(), &bytes, comp.name())
            .await
            .expect(201)
            .json();
        assert_eq!(up["nar_hash"], json!(tp.nar_hash().to_string()));
        assert_eq!(up["nar_size"], json!(tp.nar_size()));
        let stored = tp.stored();
        assert_eq!(up["file_hash"], json!(Sha256::digest(&stored).to_string()));
        assert_eq!(up["file_size"], json!(stored.len()));
        assert_eq!(up["compression"], json!("zstd"));
        let id = up["upload_id"].as_str().expect("upload id");
        let r = srv
            .publish_api("c", push.bearer(), &tp.publish_body(id, None))
            .await
            .expect(201)
            .json();
        assert_eq!(r["status"], json!("created"));
        assert_eq!(r["store_path"], json!(tp.path.to_absolute()));
        check_served(&srv, "c", &tp).await;
        // Publishing the same path again is idempotent.
        let r = srv
            .push_api("c", push.basic(), &tp, comp)
            .await
            .expect(200)
            .json();
        assert_eq!(r["status"], json!("already_present"));
    }
    assert_eq!(srv.path_count("c").await, 3);
}

/// Concatenated zstd frames (or xz streams) are one valid stream: the shape of a NAR stored
/// as a list of independently compressed chunks (SPEC §2.7).
#[tokio::test]
async fn multi_frame_streams_are_accepted() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    for comp in [Comp::Zstd, Comp::Xz] {
        let tp = TestPath::with_nar(
            "chunked",
            comp.name(),
            common::file_nar(&common::noise(100_000, comp.name())),
        );
        let (a, b) = tp.nar.split_at(tp.nar.len() / 3);
        let (b, c) = b.split_at(b.len() / 2);
        let file = [comp.compress(a), comp.compress(b), comp.compress(c)].concat();
        let up = srv
            .upload_api("c", srv.admin(), &file, comp.name())
            .await
            .expect(201)
            .json();
        assert_eq!(up["nar_hash"], json!(tp.nar_hash().to_string()));
        let id = up["upload_id"].as_str().expect("upload id");
        srv.publish_api("c", srv.admin(), &tp.publish_body(id, None))
            .await
            .expect(201);
        let (_, served) = check_served(&srv, "c", &tp).await;
        assert_eq!(served, tp.stored(), "stored in the server's form");
        srv.get(&format!("/c/{}.ls", tp.hash()), Auth::Anon)
            .await
            .expect(200);
    }
}

#[tokio::test]
async fn client_file_hash_and_size_are_not_trusted() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let tp = TestPath::new("p", "file-hash-lie");
    let other = TestPath::new("q", "file-hash-lie-other");
    srv.put_nar("c", srv.admin(), &tp.compressed(Comp::Zstd), Comp::Zstd)
        .await
        .expect(204);
    let fields = tp.narinfo_fields(Comp::Zstd, None);
    let mut lying = Vec::new();
    for (k, v) in fields {
        let v = match k.as_str() {
            "FileHash" => other.nar_hash().to_string(),
            "FileSize" => "1".to_owned(),
            _ => v,
        };
        lying.push((k, v));
    }
    srv.put_narinfo("c", srv.admin(), &tp, &common::render_fields(&lying))
        .await
        .expect(204);
    let (ni, _) = check_served(&srv, "c", &tp).await;
    assert_ne!(ni.file_size, Some(1));
}

#[tokio::test]
async fn nar_ranges() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let tp = TestPath::with_nar(
        "big",
        "ranges",
        common::file_nar(&common::noise(200_000, "r")),
    );
    srv.push_api("c", srv.admin(), &tp, Comp::Zstd)
        .await
        .expect(201);
    let file = tp.stored();
    let len = file.len();
    let uri = format!("/c/{}", nar_url(&file, Comp::Zstd));
    let ranged = |range: String| {
        let mut req = request(Method::GET, &uri, Auth::Anon, "");
        req.headers_mut()
            .insert(header::RANGE, range.parse().expect("header value"));
        req
    };
    let full = srv.get(&uri, Auth::Anon).await.expect(200);
    assert_eq!(full.header(header::ACCEPT_RANGES), Some("bytes"));
    for (range, want) in [
        ("bytes=0-9".to_owned(), 0..10),
        ("bytes=100-199".to_owned(), 100..200),
        (format!("bytes={}-", len - 7), len - 7..len),
        ("bytes=-5".to_owned(), len - 5..len),
        (format!("bytes=10-{}", len * 2), 10..len),
        (format!("bytes={}-{}", len - 1, len - 1), len - 1..len),
        (format!("bytes=-{}", len * 3), 0..len),
        // Positions past 64 bits are past the end, which a range may name.
        ("bytes=0-99999999999999999999".to_owned(), 0..len),
        (
            "bytes=5-340282366920938463463374607431768211456".to_owned(),
            5..len,
        ),
        ("bytes=-99999999999999999999".to_owned(), 0..len),
    ] {
        let r = srv.send(ranged(range.clone())).await;
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            r.header(header::CONTENT_RANGE),
            Some(format!("bytes {}-{}/{len}", want.start, want.end - 1).as_str()),
            "{range}"
        );
        assert_eq!(
            r.header(header::CONTENT_LENGTH),
            Some((want.end - want.start).to_string().as_str())
        );
        assert_eq!(r.body, file[want.clone()], "{range}");
    }
    for range in [
        format!("bytes={len}-"),
        format!("bytes={}-", len + 100),
        "bytes=10-5".to_owned(),
        "bytes=-0".to_owned(),
        "bytes=abc".to_owned(),
        "bytes=x-y".to_owned(),
        "bytes=--1".to_owned(),
        "bytes=+5-9".to_owned(),
        "bytes=99999999999999999999-".to_owned(),
    ] {
        let r = srv.send(ranged(range.clone())).await;
        assert_eq!(
            r.status,
            StatusCode::RANGE_NOT_SATISFIABLE,
            "{range}: {}",
            r.text()
        );
        assert_eq!(
            r.header(header::CONTENT_RANGE),
            Some(format!("bytes */{len}").as_str()),
            "{range}"
        );
    }
    // Units other than bytes, and multiple ranges, get the whole file.
    for range in ["items=0-1", "bytes=0-1,5-6"] {
        let r = srv.send(ranged(range.to_owned())).await.expect(200);
        assert_eq!(r.body, file, "{range}");
    }
}

#[tokio::test]
async fn ls_listing_matches_the_nar() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    for comp in ALL {
        let tp = TestPath::new("tree", &format!("ls-{}", comp.name()));
        let (nar, info) = srv.push_nix("c", srv.admin(), &tp, comp).await;
        nar.expect(204);
        info.expect(204);
        let r = srv
            .get(&format!("/c/{}.ls", tp.hash()), Auth::Anon)
            .await
            .expect(200);
        let expected = larder_nix::nar::parse::summarize(&tp.nar)
            .expect("our NAR parses")
            .listing
            .to_ls_json();
        assert_eq!(r.text(), expected);
        let ls: Value = r.json();
        assert_eq!(ls["version"], json!(1));
        let root = &ls["root"];
        assert_eq!(root["type"], json!("directory"));
        let hello = &root["entries"]["bin"]["entries"]["hello"];
        assert_eq!(hello["type"], json!("regular"));
        assert_eq!(hello["executable"], json!(true));
        let script = format!("#!/bin/sh\necho ls-{}\n", comp.name());
        assert_eq!(hello["size"], json!(script.len()));
        let at = hello["narOffset"].as_u64().expect("narOffset") as usize;
        assert_eq!(&tp.nar[at..at + script.len()], script.as_bytes());
        assert_eq!(
            root["entries"]["lib"],
            json!({ "type": "symlink", "target": "bin" })
        );
        assert_eq!(root["entries"]["empty"]["size"], json!(0));
        assert!(root["entries"]["empty"].get("executable").is_none());
        assert_eq!(root["entries"]["share"]["type"], json!("directory"));
    }
    let absent = TestPath::new("absent", "ls-absent");
    srv.get(&format!("/c/{}.ls", absent.hash()), Auth::Anon)
        .await
        .expect(404);
}

#[tokio::test]
async fn build_logs() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    srv.create_cache("p", true).await;
    let drv = common::store_path("hello.drv", "logs").basename();
    let log = "building '/nix/store/…-hello.drv'...\nunpacking sources\n";
    for cache in ["c", "p"] {
        srv.put(&format!("/{cache}/log/{drv}"), srv.admin(), log)
            .await
            .expect(204);
        let r = srv
            .get(&format!("/{cache}/log/{drv}"), srv.admin())
            .await
            .expect(200);
        assert_eq!(r.text(), log);
        assert!(r
            .header(header::CONTENT_TYPE)
            .is_some_and(|t| t.starts_with("text/plain")));
    }
    srv.get(&format!("/c/log/{drv}"), Auth::Anon)
        .await
        .expect(200);
    srv.get(&format!("/p/log/{drv}"), Auth::Anon)
        .await
        .expect(401);
    // A new log replaces the old one.
    srv.put(&format!("/c/log/{drv}"), srv.admin(), "second run\n")
        .await
        .expect(204);
    let r = srv
        .get(&format!("/c/log/{drv}"), Auth::Anon)
        .await
        .expect(200);
    assert_eq!(r.text(), "second run\n");
    let other = common::store_path("other.drv", "logs").basename();
    srv.get(&format!("/c/log/{other}"), Auth::Anon)
        .await
        .expect(404);
    // Logs are per cache.
    srv.create_cache("d", false).await;
    srv.get(&format!("/d/log/{drv}"), Auth::Anon)
        .await
        .expect(404);
}

#[tokio::test]
async fn identical_nars_are_stored_once() {
    let srv = Server::new().await;
    for c in ["a", "b", "x"] {
        srv.create_cache(c, false).await;
    }
    let tp = TestPath::new("shared", "dedup");
    let (nar, info) = srv.push_nix("a", srv.admin(), &tp, Comp::Zstd).await;
    nar.expect(204);
    info.expect(204);
    assert_eq!(srv.chunk_files(), 1);
    srv.push_api("b", srv.admin(), &tp, Comp::Zstd)
        .await
        .expect(201);
    assert_eq!(srv.chunk_files(), 1, "same file in a second cache");
    // The same NAR compressed differently is still the same NAR: stored once, in its
    // first form, which the third cache then advertises.
    let (nar, info) = srv.push_nix("x", srv.admin(), &tp, Comp::Xz).await;
    nar.expect(204);
    info.expect(204);
    assert_eq!(srv.chunk_files(), 1, "same NAR as xz");
    let (ni, _) = check_served(&srv, "x", &tp).await;
    assert_eq!(ni.compression, "zstd");
    // Another store path with identical contents, in the same cache: Nix skips the NAR upload
    // when the file its narinfo names already exists there, and sends only the narinfo.
    let twin = TestPath::with_nar("twin", "dedup-twin", tp.nar.clone());
    let narinfo = common::with_field(
        twin.narinfo_fields(Comp::Zstd, None),
        "URL",
        Some(&twin.stored_url()),
    );
    srv.put_narinfo("a", srv.admin(), &twin, &narinfo)
        .await
        .expect(204);
    check_served(&srv, "a", &twin).await;
    assert_eq!(srv.chunk_files(), 1);
    for c in ["a", "b", "x"] {
        check_served(&srv, c, &tp).await;
    }
    // The object goes away when the last cache using it does.
    srv.delete("/api/v1/caches/a", srv.admin())
        .await
        .expect(204);
    srv.delete("/api/v1/caches/b", srv.admin())
        .await
        .expect(204);
    assert_eq!(srv.chunk_files(), 1);
    check_served(&srv, "x", &tp).await;
    srv.delete("/api/v1/caches/x", srv.admin())
        .await
        .expect(204);
    assert_eq!(srv.chunk_files(), 0);
}

#[tokio::test]
async fn missing_reports_exactly_the_absent_paths() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let paths: Vec<TestPath> = (0..5)
        .map(|i| TestPath::new(&format!("p{i}"), &format!("missing-{i}")))
        .collect();
    for tp in [&paths[1], &paths[3]] {
        srv.push_api("c", srv.admin(), tp, Comp::Zstd)
            .await
            .expect(201);
    }
    let query: Vec<String> = vec![
        paths[0].path.to_absolute(),
        paths[1].hash(),
        paths[2].hash(),
        paths[3].path.to_absolute(),
        paths[4].path.to_absolute(),
    ];
    let r = srv
        .post_json(
            "/api/v1/caches/c/missing",
            Auth::Anon,
            &json!({ "paths": query }),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(
        r["missing"],
        json!([query[0], query[2], query[4]]),
        "absent paths, in the spelling and order asked"
    );
    let r = srv
        .post_json(
            "/api/v1/caches/c/missing",
            Auth::Anon,
            &json!({ "paths": [] }),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(r["missing"], json!([]));
    // An upload that was never published is still missing.
    let pending = &paths[0];
    srv.upload_api("c", srv.admin(), &pending.compressed(Comp::Zstd), "zstd")
        .await
        .expect(201);
    assert_eq!(
        srv.missing("c", &[pending.hash()]).await,
        vec![pending.hash()]
    );
    // Many at once.
    let many: Vec<String> = (0..2000)
        .map(|i| common::store_path("x", &format!("many-{i}")).hash_part())
        .chain([paths[1].hash()])
        .collect();
    assert_eq!(srv.missing("c", &many).await, many[..2000].to_vec());
}

#[tokio::test]
async fn references_must_be_present_first() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let lib = TestPath::new("lib", "refs-lib");
    let mut app = TestPath::new("app", "refs-app");
    app.references = vec![lib.path.clone(), app.path.clone()]; // a self-reference is fine
    app.references.sort();
    let api_app = {
        let mut t = TestPath::new("api-app", "refs-api-app");
        t.references = vec![lib.path.clone()];
        t
    };

    // Nix's uploader: the NAR is accepted, the narinfo is not (yet).
    srv.put_nar("c", srv.admin(), &app.compressed(Comp::Zstd), Comp::Zstd)
        .await
        .expect(204);
    let r = srv
        .put_narinfo("c", srv.admin(), &app, &app.narinfo(Comp::Zstd, None))
        .await
        .expect(400);
    assert!(
        r.text().contains(&lib.path.basename()),
        "names the missing path: {}",
        r.text()
    );
    srv.assert_absent("c", &app).await;
    // The JSON API: same rule.
    let up = srv
        .upload_api("c", srv.admin(), &api_app.compressed(Comp::Zstd), "zstd")
        .await
        .expect(201)
        .json();
    let id = up["upload_id"].as_str().expect("upload id").to_owned();
    srv.publish_api("c", srv.admin(), &api_app.publish_body(&id, None))
        .await
        .expect(400);
    srv.assert_absent("c", &api_app).await;
    assert_eq!(srv.path_count("c").await, 0);

    // A reference present in another cache does not count.
    srv.create_cache("d", false).await;
    srv.push_api("d", srv.admin(), &lib, Comp::Zstd)
        .await
        .expect(201);
    srv.put_narinfo("c", srv.admin(), &app, &app.narinfo(Comp::Zstd, None))
        .await
        .expect(400);

    // Once the reference is in, the same requests succeed.
    srv.push_api("c", srv.admin(), &lib, Comp::Zstd)
        .await
        .expect(201);
    srv.put_narinfo("c", srv.admin(), &app, &app.narinfo(Comp::Zstd, None))
        .await
        .expect(204);
    srv.publish_api("c", srv.admin(), &api_app.publish_body(&id, None))
        .await
        .expect(201);
    check_served(&srv, "c", &app).await;
    check_served(&srv, "c", &api_app).await;
    assert_eq!(srv.path_count("c").await, 3);
}

#[tokio::test]
async fn existing_paths_are_never_overwritten() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let original = TestPath::new("p", "conflict");
    srv.push_api("c", srv.admin(), &original, Comp::Zstd)
        .await
        .expect(201);
    let before_info = srv
        .get(&format!("/c/{}.narinfo", original.hash()), Auth::Anon)
        .await
        .expect(200)
        .body;
    let (_, before_nar) = check_served(&srv, "c", &original).await;

    // Same store path, different contents.
    let mut impostor = TestPath::new("p", "conflict-impostor");
    impostor.path = original.path.clone();
    assert_ne!(impostor.nar, original.nar);
    for comp in ALL {
        srv.put_nar("c", srv.admin(), &impostor.compressed(comp), comp)
            .await
            .expect(204);
        srv.put_narinfo("c", srv.admin(), &impostor, &impostor.narinfo(comp, None))
            .await
            .expect(409);
        srv.push_api("c", srv.admin(), &impostor, comp)
            .await
            .expect(409);
    }
    assert_eq!(srv.path_count("c").await, 1);
    let after_info = srv
        .get(&format!("/c/{}.narinfo", original.hash()), Auth::Anon)
        .await
        .expect(200)
        .body;
    assert_eq!(after_info, before_info, "narinfo unchanged");
    let (_, after_nar) = check_served(&srv, "c", &original).await;
    assert_eq!(after_nar, before_nar, "NAR served byte for byte as before");

    // Same contents again, by either path and any compression: success, nothing changes.
    for comp in ALL {
        let (nar, info) = srv.push_nix("c", srv.admin(), &original, comp).await;
        nar.expect(204);
        info.expect(204);
        let r = srv
            .push_api("c", srv.admin(), &original, comp)
            .await
            .expect(200)
            .json();
        assert_eq!(r["status"], json!("already_present"));
    }
    assert_eq!(srv.path_count("c").await, 1);
    let again = srv
        .get(&format!("/c/{}.narinfo", original.hash()), Auth::Anon)
        .await
        .expect(200)
        .body;
    assert_eq!(again, before_info);
}

#[tokio::test]
async fn client_signed_caches_need_valid_signatures() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let push = srv.token(&["push"], Some(&["c"])).await;
    let key = common::signing_key("c.example.org-1", 1);
    let impostor_key = common::signing_key("c.example.org-1", 2); // same name, other key
    let stranger_key = common::signing_key("stranger-1", 3);
    let body = json!({ "public_key": key.verifying_key().to_string() });
    srv.post_json("/api/v1/caches/c/public-key", push.bearer(), &body)
        .await
        .expect(403);
    let info = srv
        .post_json("/api/v1/caches/c/public-key", srv.admin(), &body)
        .await
        .expect(200)
        .json();
    assert_eq!(info["signing_mode"], json!("client"));
    assert_eq!(info["public_key"], json!(key.verifying_key().to_string()));
    assert!(info["nix_conf"]
        .as_str()
        .is_some_and(|c| c.contains(&key.verifying_key().to_string())));

    for comp in [Comp::Zstd, Comp::Xz] {
        let tp = TestPath::new("signed", &format!("client-signed-{}", comp.name()));
        let other = TestPath::new("other", &format!("client-signed-other-{}", comp.name()));
        srv.put_nar("c", push.bearer(), &tp.compressed(comp), comp)
            .await
            .expect(204);
        let wrong_fingerprint = {
            let mut fields = tp.narinfo_fields(comp, None);
            fields.push(("Sig".into(), key.sign(&other.fingerprint()).to_string()));
            common::render_fields(&fields)
        };
        for (what, text) in [
            ("unsigned", tp.narinfo(comp, None)),
            (
                "signed by an impostor key",
                tp.narinfo(comp, Some(&impostor_key)),
            ),
            (
                "signed by a stranger",
                tp.narinfo(comp, Some(&stranger_key)),
            ),
            ("signature of another path", wrong_fingerprint),
        ] {
            let r = srv.put_narinfo("c", push.bearer(), &tp, &text).await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{what}: {}", r.text());
            srv.assert_absent("c", &tp).await;
        }
        // A stranger's signature next to ours is kept; ours makes it valid.
        let mut fields = tp.narinfo_fields(comp, Some(&key));
        fields.push((
            "Sig".into(),
            stranger_key.sign(&tp.fingerprint()).to_string(),
        ));
        srv.put_narinfo("c", push.bearer(), &tp, &common::render_fields(&fields))
            .await
            .expect(204);
        let (ni, _) = check_served(&srv, "c", &tp).await;
        assert!(ni.verify(&key.verifying_key()));
        let names: Vec<&str> = ni.sigs.iter().map(|s| s.key_name()).collect();
        assert_eq!(
            names,
            ["c.example.org-1", "stranger-1"],
            "no server signature added"
        );

        // The JSON API follows the same rule.
        let up = srv
            .upload_api("c", push.bearer(), &other.compressed(comp), comp.name())
            .await
            .expect(201)
            .json();
        let id = up["upload_id"].as_str().expect("upload id").to_owned();
        for signer in [None, Some(&impostor_key), Some(&stranger_key)] {
            srv.publish_api("c", push.bearer(), &other.publish_body(&id, signer))
                .await
                .expect(403);
            srv.assert_absent("c", &other).await;
        }
        srv.publish_api("c", push.bearer(), &other.publish_body(&id, Some(&key)))
            .await
            .expect(201);
        check_served(&srv, "c", &other).await;
    }
    assert_eq!(srv.path_count("c").await, 4);
}

#[tokio::test]
async fn managed_caches_sign_with_their_own_key() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let key = srv.public_key("c").await;
    let upstream = common::signing_key("cache.nixos.org-1", 7);
    let forger = common::signing_key(key.name(), 8); // claims the cache's key name
    let tp = TestPath::new("p", "managed");
    let mut fields = tp.narinfo_fields(Comp::Zstd, Some(&upstream));
    fields.push(("Sig".into(), forger.sign(&tp.fingerprint()).to_string()));
    srv.put_nar("c", srv.admin(), &tp.compressed(Comp::Zstd), Comp::Zstd)
        .await
        .expect(204);
    srv.put_narinfo("c", srv.admin(), &tp, &common::render_fields(&fields))
        .await
        .expect(204);
    let (ni, _) = check_served(&srv, "c", &tp).await;
    let names: Vec<&str> = ni.sigs.iter().map(|s| s.key_name()).collect();
    assert_eq!(
        names,
        ["cache.nixos.org-1", key.name()],
        "upstream kept, forgery replaced"
    );
    assert!(ni.verify(&upstream.verifying_key()));
    assert!(ni
        .sigs
        .iter()
        .all(|s| s.key_name() != key.name() || key.verify(&ni.fingerprint(), s)));
}

#[tokio::test]
async fn nix_cache_info_follows_the_cache() {
    let srv = Server::new().await;
    srv.create_cache("c", true).await;
    let r = srv.get("/c/nix-cache-info", Auth::Anon).await.expect(200);
    assert_eq!(
        r.header(header::CONTENT_TYPE),
        Some("text/x-nix-cache-info")
    );
    let text = r.text();
    for line in ["StoreDir: /nix/store", "WantMassQuery: 1", "Priority: 41"] {
        assert!(text.lines().any(|l| l == line), "{line:?} missing: {text}");
    }
    srv.patch_json("/api/v1/caches/c", srv.admin(), &json!({ "priority": 30 }))
        .await
        .expect(200);
    // Nix's uploader writes nix-cache-info: accepted, ignored.
    srv.put(
        "/c/nix-cache-info",
        srv.admin(),
        "StoreDir: /elsewhere\nPriority: 1\n",
    )
    .await
    .expect(204);
    let text = srv
        .get("/c/nix-cache-info", srv.admin())
        .await
        .expect(200)
        .text();
    assert!(
        text.contains("Priority: 30") && text.contains("StoreDir: /nix/store"),
        "{text}"
    );
    // The cache is private: who cannot read it sees what a missing cache would answer.
    let text = srv
        .get("/c/nix-cache-info", Auth::Anon)
        .await
        .expect(200)
        .text();
    assert!(text.contains("Priority: 41"), "{text}");
    srv.get("/healthz", Auth::Anon).await.expect(200);
}

#[tokio::test]
async fn uploaded_bodies_are_never_run_by_a_browser() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let drv = common::store_path("evil.drv", "xss").basename();
    let log = "<html><script>fetch('/api/v1/tokens')</script>\n";
    srv.put(&format!("/c/log/{drv}"), srv.admin(), log)
        .await
        .expect(204);
    let tp = TestPath::new("evil", "xss");
    srv.push_api("c", srv.admin(), &tp, Comp::Zstd)
        .await
        .expect(201);
    for (what, uri, status) in [
        ("log", format!("/c/log/{drv}"), 200),
        ("narinfo", format!("/c/{}.narinfo", tp.hash()), 200),
        ("listing", format!("/c/{}.ls", tp.hash()), 200),
        ("error", "/c/%3Cscript%3E.narinfo".to_owned(), 400),
        ("api", "/api/v1/caches/c".to_owned(), 200),
    ] {
        let r = srv.get(&uri, Auth::Anon).await;
        assert_eq!(r.status.as_u16(), status, "{what}: {}", r.text());
        assert_eq!(
            r.header(header::X_CONTENT_TYPE_OPTIONS),
            Some("nosniff"),
            "{what}"
        );
        let csp = r
            .header(header::CONTENT_SECURITY_POLICY)
            .unwrap_or_default();
        assert!(
            csp.contains("sandbox") && csp.contains("default-src 'none'"),
            "{what}: {csp:?}"
        );
    }
    // The web UI's pages keep their own policy (which lets them load their stylesheet).
    let page = srv.get("/ui/", Auth::Anon).await.expect(200);
    let csp = page
        .header(header::CONTENT_SECURITY_POLICY)
        .unwrap_or_default();
    assert!(
        !csp.contains("sandbox") && csp.contains("style-src"),
        "{csp:?}"
    );
}

/// The listing objects stored beside the NARs (`store/objects/ls/…`).
fn listing_files(srv: &Server) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let root = srv.data_dir().join("store/objects/ls");
    for dir in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            found.push(f.path());
        }
    }
    found
}

#[tokio::test]
async fn listings_are_made_once_stored_and_collected_with_their_nar() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let listing_of = |tp: &TestPath| {
        larder_nix::nar::parse::summarize(&tp.nar)
            .expect("our NAR parses")
            .listing
            .to_ls_json()
    };
    // A small NAR's listing is made when first asked for (a read of a few KiB), and kept.
    let small = TestPath::new("tree", "small-listing");
    srv.push_api("c", srv.admin(), &small, Comp::Xz)
        .await
        .expect(201);
    assert!(listing_files(&srv).is_empty(), "{:?}", listing_files(&srv));
    let r = srv
        .get(&format!("/c/{}.ls", small.hash()), Auth::Anon)
        .await
        .expect(200);
    assert_eq!(r.text(), listing_of(&small));
    let small_listing = listing_files(&srv);
    assert_eq!(small_listing.len(), 1);
    srv.delete(
        &format!("/api/v1/caches/c/paths/{}", small.hash()),
        srv.admin(),
    )
    .await
    .expect(200);
    // A larger one's is written when the NAR is verified, before anyone asks.
    let nar = common::file_nar(&common::noise(300 << 10, "stored-listing"));
    let tp = TestPath::with_nar("big", "stored-listing", nar);
    srv.push_api("c", srv.admin(), &tp, Comp::Xz)
        .await
        .expect(201);
    let expected = listing_of(&tp);
    let stored: Vec<_> = listing_files(&srv)
        .into_iter()
        .filter(|f| !small_listing.contains(f))
        .collect();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(std::fs::read_to_string(&stored[0]).unwrap(), expected);
    let uri = format!("/c/{}.ls", tp.hash());
    let r = srv.get(&uri, Auth::Anon).await.expect(200);
    assert_eq!(r.text(), expected);
    assert_eq!(
        r.header(header::CONTENT_LENGTH),
        Some(expected.len().to_string().as_str())
    );
    // Lost (or stored by an older larder, which kept none): made again once, and kept.
    std::fs::remove_file(&stored[0]).unwrap();
    assert_eq!(srv.get(&uri, Auth::Anon).await.expect(200).text(), expected);
    assert!(listing_files(&srv).contains(&stored[0]));
    // Deleting the path and collecting garbage deletes the listing with the NAR.
    srv.delete(
        &format!("/api/v1/caches/c/paths/{}", tp.hash()),
        srv.admin(),
    )
    .await
    .expect(200);
    // Past the grace period in which an evicted NAR stays servable.
    let mut config = (*srv.state.config).clone();
    config.evicted_nar_grace = std::time::Duration::ZERO;
    let state = larder_server::AppState::new(larder_server::Shared {
        config: std::sync::Arc::new(config),
        ..(*srv.state).clone()
    });
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    larder_server::publish::collect_garbage(&state)
        .await
        .unwrap();
    assert_eq!(srv.chunk_files(), 0);
    assert!(listing_files(&srv).is_empty(), "{:?}", listing_files(&srv));
}

#[tokio::test]
async fn a_nar_expanding_past_max_nar_size_is_refused_early() {
    let srv = Server::with_config(larder_server::config::ConfigFile {
        max_nar_size: Some(larder_server::config::SizeValue::Text("1MiB".into())),
        ..Default::default()
    })
    .await;
    srv.create_cache("c", false).await;
    // 64 MiB of zeros: a few KiB of zstd, 64 times the limit once expanded.
    let bomb = TestPath::with_nar("bomb", "bomb", common::file_nar(&vec![0u8; 64 << 20]));
    let compressed = bomb.compressed(Comp::Zstd);
    assert!(compressed.len() < 64 << 10);
    let r = srv.upload_api("c", srv.admin(), &compressed, "zstd").await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());
    assert!(r.text().contains("max_nar_size"), "{}", r.text());
    let (nar, _) = srv.push_nix("c", srv.admin(), &bomb, Comp::Zstd).await;
    assert_eq!(nar.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", nar.text());
    assert_eq!(srv.chunk_files(), 0);
    assert_eq!(srv.staging_files(), 0);
    // Below the limit, accepted.
    let fine = TestPath::with_nar("fine", "fine", common::file_nar(&vec![0u8; 512 << 10]));
    srv.push_api("c", srv.admin(), &fine, Comp::Zstd)
        .await
        .expect(201);
}

#[tokio::test]
async fn unfinished_multipart_uploads_are_bounded_per_cache() {
    let srv = Server::new().await;
    srv.post_json(
        "/api/v1/caches",
        srv.admin(),
        &json!({ "name": "small", "max_size": 1 << 20 }),
    )
    .await
    .expect(201);
    let srv = &srv;
    let open = || async {
        srv.post_json(
            "/api/v1/caches/small/multipart?compression=none",
            srv.admin(),
            &json!({}),
        )
        .await
    };
    let id = open().await.expect(201).json()["upload_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let id = &id;
    let part = |n: u32, len: usize| async move {
        srv.put(
            &format!("/api/v1/caches/small/multipart/{id}/parts/{n}"),
            srv.admin(),
            vec![0u8; len],
        )
        .await
    };
    part(0, 700 << 10).await.expect(204);
    // Re-sending a part replaces it: it does not count twice.
    part(0, 700 << 10).await.expect(204);
    // More than the cache's limit staged: refused, and nothing of it kept.
    let r = part(1, 400 << 10).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());
    assert!(r.text().contains("size limit"), "{}", r.text());
    assert_eq!(
        srv.staging_files(),
        3,
        "the upload's manifest, part 0 and what was measured of it"
    );
    // At most 16 unfinished uploads per cache.
    for _ in 1..16 {
        open().await.expect(201);
    }
    let r = open().await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    assert!(
        r.text().contains("unfinished multi-part uploads"),
        "{}",
        r.text()
    );
}

/// Open a multi-part upload in `cache` as `auth`.
async fn open_multipart(srv: &Server, cache: &str, auth: Auth<'_>) -> common::Resp {
    srv.post_json(
        &format!("/api/v1/caches/{cache}/multipart?compression=none"),
        auth,
        &json!({}),
    )
    .await
}

/// `PUT` part `n` of upload `id` in `cache`: `len` zero bytes.
async fn put_part(
    srv: &Server,
    cache: &str,
    auth: Auth<'_>,
    id: &str,
    n: u32,
    len: usize,
) -> common::Resp {
    srv.put(
        &format!("/api/v1/caches/{cache}/multipart/{id}/parts/{n}"),
        auth,
        vec![0u8; len],
    )
    .await
}

/// The token bounds (issue 14 item 6): a token holds at most `multipart_max_open` unfinished
/// uploads and `multipart_max_staged` bytes of them on a server, across every cache it may
/// push to, whatever each cache's own bounds leave; another token is not held back by it,
/// and what a refusal says names the bound and how to make room.
#[tokio::test]
async fn unfinished_multipart_uploads_are_bounded_per_token() {
    let srv = Server::with_config(larder_server::config::ConfigFile {
        multipart_max_open: Some(3),
        multipart_max_staged: Some(larder_server::config::SizeValue::Text("1MiB".into())),
        ..Default::default()
    })
    .await;
    for name in ["a", "b", "c"] {
        srv.create_cache(name, false).await;
    }
    let t = srv.token(&["push"], Some(&["a", "b", "c"])).await;
    let other = srv.token(&["push"], Some(&["a", "b", "c"])).await;
    let id = |r: common::Resp| {
        r.expect(201).json()["upload_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // Three uploads in three caches: each cache is far below its bound, the token at its own.
    let a = id(open_multipart(&srv, "a", t.bearer()).await);
    let b = id(open_multipart(&srv, "b", t.bearer()).await);
    id(open_multipart(&srv, "c", t.bearer()).await);
    let r = open_multipart(&srv, "c", t.bearer()).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    for said in [
        "this token has 3",
        "multipart_max_open = 3",
        "DELETE",
        "expire",
    ] {
        assert!(r.text().contains(said), "{said:?} in {}", r.text());
    }
    // Another token opens in the same cache.
    let o = id(open_multipart(&srv, "c", other.bearer()).await);
    // Bytes: 700 KiB in "a", then 400 KiB more in "b" is past the token's 1 MiB.
    put_part(&srv, "a", t.bearer(), &a, 0, 700 << 10)
        .await
        .expect(204);
    let before = srv.staging_files();
    let r = put_part(&srv, "b", t.bearer(), &b, 0, 400 << 10).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());
    for said in ["of this token", "multipart_max_staged", "DELETE"] {
        assert!(r.text().contains(said), "{said:?} in {}", r.text());
    }
    assert_eq!(
        srv.staging_files(),
        before,
        "nothing of the refused part kept"
    );
    // Parts count against the token that opened the upload, whoever sends them.
    let r = put_part(&srv, "b", other.bearer(), &b, 0, 400 << 10).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());
    // The other token's own uploads are not held back.
    put_part(&srv, "c", other.bearer(), &o, 0, 700 << 10)
        .await
        .expect(204);
    // Abandoning makes room at once.
    srv.delete(&format!("/api/v1/caches/a/multipart/{a}"), t.bearer())
        .await
        .expect(204);
    put_part(&srv, "b", t.bearer(), &b, 0, 400 << 10)
        .await
        .expect(204);
    id(open_multipart(&srv, "a", t.bearer()).await);
}

/// An upload idle past `multipart_idle_ttl` stops counting against the bounds as soon as they
/// are next counted (not at the next garbage collection, an hour later), and is deleted then.
#[tokio::test]
async fn an_expired_multipart_upload_frees_its_place_at_once() {
    let srv = Server::with_config(larder_server::config::ConfigFile {
        multipart_max_open: Some(2),
        multipart_idle_ttl: Some("10m".into()),
        ..Default::default()
    })
    .await;
    srv.create_cache("c", false).await;
    for _ in 0..2 {
        open_multipart(&srv, "c", srv.admin()).await.expect(201);
    }
    let r = open_multipart(&srv, "c", srv.admin()).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    // Both left alone for 11 minutes (their clocks set back).
    let staging = srv.data_dir().join("store/tmp");
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(11 * 60);
    let uploads: Vec<_> = std::fs::read_dir(&staging)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("multipart-"))
        .map(|e| e.path())
        .collect();
    assert_eq!(uploads.len(), 2);
    for dir in &uploads {
        for f in std::fs::read_dir(dir).unwrap().flatten() {
            std::fs::File::open(f.path())
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        std::fs::File::open(dir).unwrap().set_modified(old).unwrap();
    }
    open_multipart(&srv, "c", srv.admin()).await.expect(201);
    assert!(
        uploads.iter().all(|d| !d.exists()),
        "expired uploads deleted"
    );
}

/// A NAR download looked up moments ago (its metadata kept in memory) whose object has since
/// gone (garbage collection after its grace, on another replica) is answered 404, as Nix
/// expects of a vanished substitute, never 500; small NARs (read whole, kept in memory) and
/// large ones (streamed) alike, and Ranges of both are right.
#[tokio::test]
async fn a_nar_whose_object_vanished_after_lookup_is_a_404() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let large = |seed: &str| {
        TestPath::with_nar(
            "large",
            seed,
            common::file_nar(&common::noise(200_000, seed)),
        )
    };
    let served = [
        TestPath::new("small", "vanish-small-1"),
        large("vanish-large-1"),
    ];
    for tp in &served {
        srv.push_api("c", srv.admin(), tp, Comp::None)
            .await
            .expect(201);
        for _ in 0..2 {
            // Twice: from the store, then (small) from memory.
            let (ni, body) = check_served(&srv, "c", tp).await;
            assert_eq!(body, tp.stored());
            let mut req = request(Method::GET, &format!("/c/{}", ni.url), Auth::Anon, "");
            req.headers_mut()
                .insert(header::RANGE, "bytes=10-19".parse().unwrap());
            let r = srv.send(req).await.expect(206);
            assert_eq!(r.body, body[10..20]);
        }
    }
    // Two more, looked up (HEAD: the metadata only) just before their objects go behind the
    // server's back.
    let vanishing = [
        TestPath::new("small", "vanish-small-2"),
        large("vanish-large-2"),
    ];
    let mut urls = Vec::new();
    for tp in &vanishing {
        srv.push_api("c", srv.admin(), tp, Comp::None)
            .await
            .expect(201);
        let ni = srv
            .get(&format!("/c/{}.narinfo", tp.hash()), Auth::Anon)
            .await
            .expect(200);
        let url = format!("/c/{}", NarInfo::parse(&ni.text()).unwrap().url);
        srv.head(&url, Auth::Anon).await.expect(200);
        urls.push(url);
    }
    std::fs::remove_dir_all(srv.data_dir().join("store/objects/pack")).unwrap();
    for url in &urls {
        srv.get(url, Auth::Anon).await.expect(404);
    }
}
