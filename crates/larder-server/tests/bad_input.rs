//! Bad input: hostile paths, malformed names and hashes, broken NARs and compressed streams,
//! lying narinfos, oversized and interrupted uploads, malformed JSON. Each gets a 4xx with a
//! short reason, never a 5xx (checked for every response by the harness), never a server path
//! in the body, and leaves nothing visible or stored.

mod common;

use axum::body::Body;
use axum::http::{header, Method, StatusCode};
use bytes::Bytes;
use common::{nar_url, request, with_field, Auth, Comp, Server, TestPath};
use larder_nix::hash::Sha256;
use larder_server::config::{ConfigFile, SizeValue};
use serde_json::json;

const HASH32: &str = "0c6kzph7l0dcbfmjap64f0czdafn3b7x";

/// A server with one public cache `c`.
async fn server() -> Server {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    srv
}

/// Nothing was stored: no path, no object, nothing in staging.
async fn assert_nothing_stored(srv: &Server) {
    assert_eq!(srv.path_count("c").await, 0, "a path was published");
    assert_eq!(srv.chunk_files(), 0, "an object was stored");
    assert_eq!(srv.staging_files(), 0, "a staging file was left behind");
}

#[track_caller]
fn assert_4xx(r: &common::Resp, what: &str) {
    assert!(
        r.status.is_client_error(),
        "{what}: want 4xx, got {}: {}",
        r.status,
        r.text()
    );
}

#[tokio::test]
async fn hostile_paths_are_refused() {
    let srv = server().await;
    let nar = TestPath::new("p", "hostile").compressed(Comp::None);
    let h52 = Sha256::digest(&nar).to_nix32();
    let long = "a".repeat(5000);
    // (uri, the exact status when a handler is reached; None: any 4xx, e.g. the router's 404)
    let cases: Vec<(String, Option<u16>)> = vec![
        ("/c/../x".into(), None),
        ("/c/..".into(), None),
        ("/c/%2e%2e".into(), None),
        ("/c/%2e%2e/x".into(), None),
        ("/%2e%2e/nix-cache-info".into(), Some(400)),
        ("/../c/nix-cache-info".into(), None),
        ("/c/%2e%2e%2fadmin-token".into(), None),
        ("/c/..%2Fadmin-token".into(), None),
        (
            "/c/%2e%2e%2f%2e%2e%2fetc%2fpasswd.narinfo".into(),
            Some(400),
        ),
        ("/c/nar/..%2F..%2Fadmin-token".into(), Some(400)),
        ("/c/nar/%2e%2e%2f%2e%2e%2flarder.db".into(), Some(400)),
        (format!("/c/nar/..%2F{h52}.nar"), Some(400)),
        (format!("/c/nar/{h52}.nar%2F..%2F..%2Fx"), Some(400)),
        ("/c/log/..%2F..%2Fadmin-token".into(), Some(400)),
        ("/c/log/%2e%2e".into(), Some(400)),
        (format!("/c/log/{HASH32}-x"), Some(400)),
        (format!("/c/log/{HASH32}-x.drv%00"), Some(400)),
        (format!("/c/{HASH32}%00.narinfo"), Some(400)),
        ("/c/%00.narinfo".into(), Some(400)),
        (format!("/c/nar/{h52}%00.nar"), Some(400)),
        (format!("/c/nar/{h52}.nar%00"), Some(400)),
        ("/c%00/nix-cache-info".into(), Some(400)),
        ("/%ff/nix-cache-info".into(), Some(400)),
        ("/c/%ff%fe.narinfo".into(), Some(400)),
        ("/C/nix-cache-info".into(), Some(400)),
        ("/-c/nix-cache-info".into(), Some(400)),
        (format!("/{long}/nix-cache-info"), Some(400)),
        (format!("/c/{long}.narinfo"), Some(400)),
        (format!("/c/nar/{long}.nar"), Some(400)),
        (format!("/c/log/{long}.drv"), Some(400)),
        // Bad hash alphabet (e, o, u, t are not nix32), case, and length.
        (
            "/c/0c6kzph7l0dcbfmjap64f0czdafn3b7e.narinfo".into(),
            Some(400),
        ),
        (
            "/c/0c6kzph7l0dcbfmjap64f0czdafn3b7o.narinfo".into(),
            Some(400),
        ),
        (
            "/c/0C6KZPH7L0DCBFMJAP64F0CZDAFN3B7X.narinfo".into(),
            Some(400),
        ),
        (
            "/c/0c6kzph7l0dcbfmjap64f0czdafn3b7.narinfo".into(),
            Some(400),
        ),
        (
            "/c/0c6kzph7l0dcbfmjap64f0czdafn3b7xx.narinfo".into(),
            Some(400),
        ),
        ("/c/.narinfo".into(), Some(400)),
        ("/c/0c6kzph7l0dcbfmjap64f0czdafn3b7e.ls".into(), Some(400)),
        // NAR file names: bad hash, bad length, bad or missing extension.
        (format!("/c/nar/{}.nar.zst", &h52[..51]), Some(400)),
        (format!("/c/nar/{h52}x.nar.zst"), Some(400)),
        (format!("/c/nar/{}.nar.zst", h52.to_uppercase()), Some(400)),
        (format!("/c/nar/{}e.nar.zst", &h52[..51]), Some(400)),
        (format!("/c/nar/{h52}"), Some(400)),
        (format!("/c/nar/{h52}.zst"), Some(400)),
        (format!("/c/nar/{h52}.nar.zip"), Some(400)),
        (format!("/c/nar/{h52}.nar.zst.zst"), Some(400)),
        (format!("/c/nar/{h52}.NAR"), Some(400)),
        (format!("/c/nar/{HASH32}.nar"), Some(400)),
        (format!("/c/nar/{h52}.narinfo"), Some(400)),
        // The JSON API's cache names.
        (format!("/api/v1/caches/{long}"), Some(400)),
        ("/api/v1/caches/..%2f..%2fx".into(), Some(400)),
        ("/api/v1/caches/%2e%2e/missing".into(), Some(400)),
        ("/api/v1/caches/API".into(), Some(400)),
    ];
    for (uri, want) in &cases {
        for method in [Method::GET, Method::HEAD, Method::PUT] {
            let r = srv
                .send(request(method.clone(), uri, srv.admin(), nar.clone()))
                .await;
            let what = format!("{method} {}", common_prefix(uri));
            assert_4xx(&r, &what);
            if let Some(code) = want {
                // A PUT to a read-only route is 405; otherwise the exact status.
                let route_has_no_put = r.status == StatusCode::METHOD_NOT_ALLOWED;
                if !route_has_no_put {
                    assert_eq!(r.status.as_u16(), *code, "{what}: {}", r.text());
                }
            }
            assert!(
                !r.text().contains(&srv.admin),
                "{what} leaks the admin token"
            );
            assert!(!r.text().contains("SQLite"), "{what} leaks the database");
        }
    }
    assert_nothing_stored(&srv).await;
}

fn common_prefix(uri: &str) -> String {
    uri.chars().take(120).collect()
}

#[tokio::test]
async fn unknown_caches_are_404() {
    let srv = server().await;
    let tp = TestPath::new("p", "unknown-cache");
    let bytes = tp.compressed(Comp::Zstd);
    let admin = srv.admin();
    // To whoever could read a cache of that name if it existed, 404; to anyone else, what a
    // private cache answers (auth_matrix.rs).
    srv.get("/nope/nix-cache-info", admin).await.expect(404);
    srv.get(&format!("/nope/{}.narinfo", tp.hash()), admin)
        .await
        .expect(404);
    srv.get(&format!("/nope/{}.narinfo", tp.hash()), Auth::Anon)
        .await
        .expect(401);
    srv.get(&format!("/nope/{}", nar_url(&bytes, Comp::Zstd)), admin)
        .await
        .expect(404);
    srv.put_nar("nope", admin, &bytes, Comp::Zstd)
        .await
        .expect(404);
    srv.put_narinfo("nope", admin, &tp, &tp.narinfo(Comp::Zstd, None))
        .await
        .expect(404);
    srv.upload_api("nope", admin, &bytes, "zstd")
        .await
        .expect(404);
    srv.get("/api/v1/caches/nope", admin).await.expect(404);
    srv.patch_json("/api/v1/caches/nope", admin, &json!({ "priority": 1 }))
        .await
        .expect(404);
    srv.delete("/api/v1/caches/nope", admin).await.expect(404);
    srv.post_json(
        "/api/v1/caches/nope/missing",
        admin,
        &json!({ "paths": [] }),
    )
    .await
    .expect(404);
    srv.get("/api/v1/no-such-endpoint", admin).await.expect(404);
    assert_nothing_stored(&srv).await;
}

#[tokio::test]
async fn invalid_cache_names_are_refused() {
    let srv = Server::new().await;
    let too_long = "a".repeat(64);
    for name in [
        "api",
        "ui",
        "static",
        "metrics",
        "healthz",
        "Upper",
        "UPPER",
        too_long.as_str(),
        "-lead",
        "",
        "under_score",
        "a/b",
        "a b",
        "dot.dot",
        "..",
        ".",
        "caché",
        "a%2fb",
        "a\0b",
    ] {
        let r = srv
            .post_json("/api/v1/caches", srv.admin(), &json!({ "name": name }))
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{name:?}: {}", r.text());
    }
    assert_eq!(
        srv.get("/api/v1/caches", srv.admin())
            .await
            .expect(200)
            .json(),
        json!([])
    );
    for name in ["a", "0", "a-", "x-1", &"b".repeat(63)] {
        srv.post_json("/api/v1/caches", srv.admin(), &json!({ "name": name }))
            .await
            .expect(201);
    }
    srv.post_json("/api/v1/caches", srv.admin(), &json!({ "name": "a" }))
        .await
        .expect(409);
}

/// Upload `bytes` (claimed to be `comp`) through both paths and expect `want` each time.
async fn refuse_upload(srv: &Server, bytes: &[u8], comp: Comp, want: u16, what: &str) {
    let tp = TestPath::new("victim", what);
    let r = srv.put_nar("c", srv.admin(), bytes, comp).await;
    assert_eq!(r.status.as_u16(), want, "{what}: PUT nar: {}", r.text());
    // The narinfo that would publish it finds no NAR.
    let mut fields = tp.narinfo_fields(comp, None);
    for (k, v) in fields.iter_mut() {
        if k == "URL" {
            *v = nar_url(bytes, comp);
        }
    }
    let r = srv
        .put_narinfo("c", srv.admin(), &tp, &common::render_fields(&fields))
        .await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "{what}: PUT narinfo: {}",
        r.text()
    );
    let r = srv.upload_api("c", srv.admin(), bytes, comp.name()).await;
    assert_eq!(r.status.as_u16(), want, "{what}: API upload: {}", r.text());
    srv.assert_absent("c", &tp).await;
    assert_nothing_stored(srv).await;
}

#[tokio::test]
async fn broken_nars_are_refused() {
    let srv = server().await;
    let nar = TestPath::new("p", "broken").nar;
    let mut trailing = nar.clone();
    trailing.extend_from_slice(b"garbage!");
    let mut trailing_zeros = nar.clone();
    trailing_zeros.extend_from_slice(&[0u8; 8]);
    let mut bad_magic = nar.clone();
    bad_magic[10] ^= 0xff;
    // A NAR of one symlink to `target`, token by token (length, bytes, zero padding).
    let symlink_to = |target: &[u8]| {
        let mut out = Vec::new();
        for t in [
            &b"nix-archive-1"[..],
            b"(",
            b"type",
            b"symlink",
            b"target",
            target,
            b")",
        ] {
            out.extend_from_slice(&(t.len() as u64).to_le_bytes());
            out.extend_from_slice(t);
            out.resize(out.len().next_multiple_of(8), 0);
        }
        out
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty symlink target", symlink_to(b"")),
        ("symlink target with NUL", symlink_to(b"a\0b")),
        ("empty body", Vec::new()),
        ("not a NAR", b"hello, world\n".to_vec()),
        ("HTML", b"<html><body>404</body></html>".to_vec()),
        ("bad magic", bad_magic),
        ("truncated by 8", nar[..nar.len() - 8].to_vec()),
        ("truncated by 1", nar[..nar.len() - 1].to_vec()),
        ("truncated in half", nar[..nar.len() / 2].to_vec()),
        ("only the magic", nar[..24].to_vec()),
        ("trailing garbage", trailing),
        ("trailing zeros", trailing_zeros),
        ("two NARs", [nar.clone(), nar.clone()].concat()),
    ];
    for (what, bytes) in &cases {
        for comp in [Comp::None, Comp::Zstd, Comp::Xz] {
            let label = format!("{what} ({})", comp.name());
            refuse_upload(&srv, &comp.compress(bytes), comp, 400, &label).await;
        }
    }
}

#[tokio::test]
async fn broken_compressed_streams_are_refused() {
    let srv = server().await;
    let nar = TestPath::new("p", "broken-stream").nar;
    let zst = Comp::Zstd.compress(&nar);
    let xz = Comp::Xz.compress(&nar);
    let zst_checksummed = {
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("zstd");
        e.include_checksum(true).expect("zstd");
        std::io::Write::write_all(&mut e, &nar).expect("zstd");
        e.finish().expect("zstd")
    };
    let mut xz_flipped = xz.clone();
    let mid = xz_flipped.len() / 2;
    xz_flipped[mid] ^= 0x55;
    let mut zst_bad_header = zst.clone();
    zst_bad_header[5] ^= 0xff;
    let another_frame = Comp::Zstd.compress(b"more");
    let cases: Vec<(&str, Comp, Vec<u8>)> = vec![
        ("zstd: plain NAR", Comp::Zstd, nar.clone()),
        ("zstd: xz data", Comp::Zstd, xz.clone()),
        ("zstd: corrupt frame header", Comp::Zstd, zst_bad_header),
        ("zstd: truncated", Comp::Zstd, zst[..zst.len() - 3].to_vec()),
        (
            "zstd: garbage after the frame",
            Comp::Zstd,
            [zst.clone(), b"garbage!".to_vec()].concat(),
        ),
        // The NAR inside is complete, but the stream is not: clients would fail to decode it.
        (
            "zstd: checksum cut off",
            Comp::Zstd,
            zst_checksummed[..zst_checksummed.len() - 4].to_vec(),
        ),
        (
            "zstd: truncated second frame",
            Comp::Zstd,
            [
                zst.clone(),
                another_frame[..another_frame.len() - 2].to_vec(),
            ]
            .concat(),
        ),
        ("xz: plain NAR", Comp::Xz, nar.clone()),
        ("xz: zstd data", Comp::Xz, zst.clone()),
        ("xz: flipped byte", Comp::Xz, xz_flipped),
        ("xz: truncated", Comp::Xz, xz[..xz.len() - 3].to_vec()),
        (
            "xz: garbage after the stream",
            Comp::Xz,
            [xz.clone(), b"garbage!".to_vec()].concat(),
        ),
        ("none: zstd data", Comp::None, zst.clone()),
    ];
    for (what, comp, bytes) in &cases {
        refuse_upload(&srv, bytes, *comp, 400, what).await;
    }
}

#[tokio::test]
async fn unknown_compression_is_415() {
    let srv = server().await;
    let tp = TestPath::new("p", "bz2");
    let bytes = tp.nar.clone();
    let h = Sha256::digest(&bytes).to_nix32();
    for ext in ["bz2", "br", "gz", "lz4"] {
        let r = srv
            .put(&format!("/c/nar/{h}.nar.{ext}"), srv.admin(), bytes.clone())
            .await;
        assert_eq!(
            r.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{ext}: {}",
            r.text()
        );
    }
    for comp in ["bzip2", "bz2", "gzip", "ZSTD", ""] {
        let r = srv.upload_api("c", srv.admin(), &bytes, comp).await;
        assert_eq!(
            r.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{comp:?}: {}",
            r.text()
        );
    }
    // Missing ?compression= is a plain 400.
    srv.send(request(
        Method::POST,
        "/api/v1/caches/c/nars",
        srv.admin(),
        bytes.clone(),
    ))
    .await
    .expect(400);
    // A cache may not be configured with one either.
    srv.post_json(
        "/api/v1/caches",
        srv.admin(),
        &json!({ "name": "d", "compression": "bz2" }),
    )
    .await
    .expect(415);
    srv.patch_json(
        "/api/v1/caches/c",
        srv.admin(),
        &json!({ "compression": "lzma" }),
    )
    .await
    .expect(415);
    srv.assert_absent("c", &tp).await;
    assert_nothing_stored(&srv).await;
}

#[tokio::test]
async fn uploads_over_the_size_limit_are_413() {
    let srv = Server::with_config(ConfigFile {
        max_upload_size: Some(SizeValue::Bytes(4096)),
        ..ConfigFile::default()
    })
    .await;
    srv.create_cache("c", false).await;
    let big = TestPath::with_nar(
        "big",
        "big",
        common::file_nar(&common::noise(64 * 1024, "big")),
    );
    for comp in [Comp::None, Comp::Zstd, Comp::Xz] {
        let bytes = big.compressed(comp);
        assert!(bytes.len() > 4096);
        srv.put_nar("c", srv.admin(), &bytes, comp)
            .await
            .expect(413);
        srv.upload_api("c", srv.admin(), &bytes, comp.name())
            .await
            .expect(413);
        srv.put_narinfo("c", srv.admin(), &big, &big.narinfo(comp, None))
            .await
            .expect(400);
    }
    srv.assert_absent("c", &big).await;
    assert_nothing_stored(&srv).await;
    // Just under the limit is fine.
    let small = TestPath::with_nar("small", "small", common::file_nar(b"small"));
    let (nar, info) = srv.push_nix("c", srv.admin(), &small, Comp::Zstd).await;
    nar.expect(204);
    info.expect(204);
}

/// A body that yields `data` and then fails, as when a client disconnects mid-upload (what
/// hyper reports when fewer bytes than `Content-Length` arrive).
fn interrupted_body(data: Vec<u8>) -> Body {
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from(data)),
        Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before the end of the body",
        )),
    ];
    Body::from_stream(futures::stream::iter(chunks))
}

#[tokio::test]
async fn interrupted_uploads_leave_nothing() {
    let srv = server().await;
    let tp = TestPath::with_nar(
        "p",
        "interrupted",
        common::file_nar(&common::noise(300_000, "i")),
    );
    for comp in [Comp::None, Comp::Zstd, Comp::Xz] {
        let full = tp.compressed(comp);
        for sent in [0, 100, full.len() / 2, full.len()] {
            let label = format!("{} sent {sent} of {}", comp.name(), full.len());
            let uri = format!("/c/{}", nar_url(&full, comp));
            let mut req = request(
                Method::PUT,
                &uri,
                srv.admin(),
                interrupted_body(full[..sent].to_vec()),
            );
            req.headers_mut()
                .insert(header::CONTENT_LENGTH, full.len().into());
            let r = srv.send(req).await;
            assert_eq!(
                r.status,
                StatusCode::BAD_REQUEST,
                "{label}: PUT nar: {}",
                r.text()
            );

            let uri = format!("/api/v1/caches/c/nars?compression={}", comp.name());
            let mut req = request(
                Method::POST,
                &uri,
                srv.admin(),
                interrupted_body(full[..sent].to_vec()),
            );
            req.headers_mut()
                .insert(header::CONTENT_LENGTH, full.len().into());
            let r = srv.send(req).await;
            assert_eq!(
                r.status,
                StatusCode::BAD_REQUEST,
                "{label}: API upload: {}",
                r.text()
            );

            // The body simply ending early (no error) is a truncated NAR.
            if sent < full.len() {
                let uri = format!("/c/{}", nar_url(&full, comp));
                let mut req = request(Method::PUT, &uri, srv.admin(), full[..sent].to_vec());
                req.headers_mut()
                    .insert(header::CONTENT_LENGTH, full.len().into());
                let r = srv.send(req).await;
                assert_eq!(
                    r.status,
                    StatusCode::BAD_REQUEST,
                    "{label}: short PUT: {}",
                    r.text()
                );
            }
            let r = srv
                .put_narinfo("c", srv.admin(), &tp, &tp.narinfo(comp, None))
                .await;
            assert_eq!(
                r.status,
                StatusCode::BAD_REQUEST,
                "{label}: narinfo: {}",
                r.text()
            );
            srv.assert_absent("c", &tp).await;
            assert_nothing_stored(&srv).await;
        }
    }
    // Interrupted narinfo and log uploads store nothing either.
    srv.put_nar("c", srv.admin(), &tp.compressed(Comp::Zstd), Comp::Zstd)
        .await
        .expect(204);
    let text = tp.narinfo(Comp::Zstd, None);
    let req = request(
        Method::PUT,
        &format!("/c/{}.narinfo", tp.hash()),
        srv.admin(),
        interrupted_body(text.as_bytes()[..text.len() / 2].to_vec()),
    );
    srv.send(req).await.expect(400);
    srv.assert_absent("c", &tp).await;
    let drv = tp.deriver.as_ref().expect("deriver").basename();
    let req = request(
        Method::PUT,
        &format!("/c/log/{drv}"),
        srv.admin(),
        interrupted_body(b"half a log".to_vec()),
    );
    srv.send(req).await.expect(400);
    srv.get(&format!("/c/log/{drv}"), Auth::Anon)
        .await
        .expect(404);
    assert_eq!(srv.staging_files(), 0);
}

#[tokio::test]
async fn nar_file_name_must_match_its_content() {
    let srv = server().await;
    let tp = TestPath::new("p", "name-mismatch");
    let other = TestPath::new("q", "name-mismatch-other");
    for comp in [Comp::None, Comp::Zstd, Comp::Xz] {
        let bytes = tp.compressed(comp);
        // Named after another file.
        let r = srv
            .put(
                &format!("/c/{}", nar_url(&other.compressed(comp), comp)),
                srv.admin(),
                bytes.clone(),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::BAD_REQUEST,
            "{}: {}",
            comp.name(),
            r.text()
        );
        // Named after the uncompressed NAR (a common client mistake).
        if comp != Comp::None {
            let h = Sha256::digest(&tp.nar).to_nix32();
            srv.put(
                &format!("/c/nar/{h}.nar{}", comp.ext()),
                srv.admin(),
                bytes.clone(),
            )
            .await
            .expect(400);
        }
        // Right content, wrong compression extension.
        if comp != Comp::None {
            let h = Sha256::digest(&bytes).to_nix32();
            srv.put(&format!("/c/nar/{h}.nar"), srv.admin(), bytes.clone())
                .await
                .expect(400);
        }
    }
    srv.assert_absent("c", &tp).await;
    assert_nothing_stored(&srv).await;
}

#[tokio::test]
async fn lying_narinfos_are_refused() {
    let srv = server().await;
    let tp = TestPath::new("p", "lies");
    let other = TestPath::new("q", "lies-other");
    let comp = Comp::Zstd;
    srv.put_nar("c", srv.admin(), &tp.compressed(comp), comp)
        .await
        .expect(204);
    let fields = tp.narinfo_fields(comp, None);
    let wrong_hash = other.nar_hash().to_string();
    let bigger = (tp.nar_size() + 8).to_string();
    let smaller = (tp.nar_size() - 8).to_string();
    let cases: Vec<(&str, String)> = vec![
        (
            "NarHash mismatch",
            with_field(fields.clone(), "NarHash", Some(&wrong_hash)),
        ),
        (
            "NarSize too big",
            with_field(fields.clone(), "NarSize", Some(&bigger)),
        ),
        (
            "NarSize too small",
            with_field(fields.clone(), "NarSize", Some(&smaller)),
        ),
        (
            "NarSize zero",
            with_field(fields.clone(), "NarSize", Some("0")),
        ),
        (
            "NarSize negative",
            with_field(fields.clone(), "NarSize", Some("-1")),
        ),
        (
            "NarSize not a number",
            with_field(fields.clone(), "NarSize", Some("12x")),
        ),
        (
            "NarSize overflow",
            with_field(fields.clone(), "NarSize", Some("99999999999999999999999")),
        ),
        (
            "no StorePath",
            with_field(fields.clone(), "StorePath", None),
        ),
        ("no URL", with_field(fields.clone(), "URL", None)),
        ("no NarHash", with_field(fields.clone(), "NarHash", None)),
        ("no NarSize", with_field(fields.clone(), "NarSize", None)),
        ("empty", String::new()),
        (
            "no final newline",
            tp.narinfo(comp, None).trim_end().to_owned(),
        ),
        (
            "malformed line",
            format!("{}garbage\n", tp.narinfo(comp, None)),
        ),
        (
            "duplicate field",
            format!("{}NarSize: 1\n", tp.narinfo(comp, None)),
        ),
        (
            "bad NarHash",
            with_field(fields.clone(), "NarHash", Some("sha256:xyz")),
        ),
        (
            "md5 NarHash",
            with_field(
                fields.clone(),
                "NarHash",
                Some("md5:0123456789abcdef0123456789abcdef"),
            ),
        ),
        (
            "StorePath of another path",
            with_field(fields.clone(), "StorePath", Some(&other.path.to_absolute())),
        ),
        (
            "StorePath outside the store",
            with_field(
                fields.clone(),
                "StorePath",
                Some(&format!("/tmp/{}", tp.path.basename())),
            ),
        ),
        (
            "StorePath with a bad name",
            with_field(
                fields.clone(),
                "StorePath",
                Some(&format!("/nix/store/{}-a b", tp.hash())),
            ),
        ),
        (
            "bad reference",
            with_field(fields.clone(), "References", Some("not-a-store-path")),
        ),
        (
            "uppercase reference hash",
            with_field(
                fields.clone(),
                "References",
                Some(&format!("{}-x", HASH32.to_uppercase())),
            ),
        ),
        (
            "bad deriver",
            with_field(fields.clone(), "Deriver", Some("../../etc/passwd")),
        ),
        (
            "bad signature",
            format!("{}Sig: nonsense\n", tp.narinfo(comp, None)),
        ),
        (
            "URL traversal",
            with_field(fields.clone(), "URL", Some("../../admin-token")),
        ),
        (
            "URL absolute",
            with_field(fields.clone(), "URL", Some("/etc/passwd")),
        ),
        (
            "URL not under nar/",
            with_field(fields.clone(), "URL", Some("other/x.nar")),
        ),
        (
            "URL with a bad file name",
            with_field(fields.clone(), "URL", Some("nar/x.nar")),
        ),
        (
            "URL of a NAR never uploaded",
            with_field(
                fields.clone(),
                "URL",
                Some(&nar_url(&other.compressed(comp), comp)),
            ),
        ),
        (
            "CA that is not one",
            common::render_fields(
                &[fields.clone(), vec![("CA".into(), "sha256:abc".into())]].concat(),
            ),
        ),
        (
            "CA with markup",
            common::render_fields(
                &[
                    fields.clone(),
                    vec![("CA".into(), "fixed:\"><script>alert(1)</script>".into())],
                ]
                .concat(),
            ),
        ),
    ];
    for (what, text) in &cases {
        let r = srv.put_narinfo("c", srv.admin(), &tp, text).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}: {}", r.text());
        srv.assert_absent("c", &tp).await;
    }
    // Not UTF-8.
    let mut raw = tp.narinfo(comp, None).into_bytes();
    raw.extend_from_slice(b"X: \xff\xfe\n");
    srv.put(&format!("/c/{}.narinfo", tp.hash()), srv.admin(), raw)
        .await
        .expect(400);
    // A narinfo that is far too large.
    let huge = format!(
        "{}X-Padding: {}\n",
        tp.narinfo(comp, None),
        "a".repeat(5 << 20)
    );
    let r = srv.put_narinfo("c", srv.admin(), &tp, &huge).await;
    assert_4xx(&r, "huge narinfo");
    srv.assert_absent("c", &tp).await;
    // A narinfo uploaded under a name that is not a hash.
    srv.put("/c/hello.narinfo", srv.admin(), tp.narinfo(comp, None))
        .await
        .expect(400);
    srv.put("/c/hello", srv.admin(), tp.narinfo(comp, None))
        .await
        .expect(400);
    assert_eq!(srv.path_count("c").await, 0);
    // After all that, the honest narinfo still publishes the NAR.
    srv.put_narinfo("c", srv.admin(), &tp, &tp.narinfo(comp, None))
        .await
        .expect(204);
    srv.assert_present("c", &tp).await;
}

#[tokio::test]
async fn lying_api_publishes_are_refused() {
    let srv = server().await;
    let tp = TestPath::new("p", "api-lies");
    let other = TestPath::new("q", "api-lies-other");
    let up = srv
        .upload_api("c", srv.admin(), &tp.compressed(Comp::Zstd), "zstd")
        .await
        .expect(201)
        .json();
    // The server reports what it measured, not what anyone claimed.
    assert_eq!(up["nar_hash"], json!(tp.nar_hash().to_string()));
    assert_eq!(up["nar_size"], json!(tp.nar_size()));
    let id = up["upload_id"].as_str().expect("upload id").to_owned();
    let good = tp.publish_body(&id, None);
    let patch = |key: &str, value: serde_json::Value| {
        let mut b = good.clone();
        b[key] = value;
        b
    };
    let cases = vec![
        (
            "NarHash mismatch",
            patch("nar_hash", json!(other.nar_hash().to_string())),
        ),
        (
            "NarSize mismatch",
            patch("nar_size", json!(tp.nar_size() + 1)),
        ),
        ("NarSize negative", patch("nar_size", json!(-1))),
        ("NarSize a string", patch("nar_size", json!("12"))),
        ("bad nar_hash", patch("nar_hash", json!("sha256:nope"))),
        (
            "unknown upload",
            patch("upload_id", json!("0123456789abcdef0123456789abcdef")),
        ),
        (
            "hostile upload id",
            patch("upload_id", json!("../../admin-token")),
        ),
        (
            "bad store path",
            patch("store_path", json!("/nix/store/short-x")),
        ),
        (
            "store path outside the store",
            patch("store_path", json!("/etc/passwd")),
        ),
        (
            "bad reference",
            patch("references", json!(["/nix/store/nope"])),
        ),
        ("bad deriver", patch("deriver", json!("x.drv"))),
        ("bad signature", patch("sigs", json!(["nokey"]))),
        (
            "CA with markup",
            patch("ca", json!("fixed:\"><script>alert(1)</script>")),
        ),
        (
            "CA with a short hash",
            patch("ca", json!("fixed:r:sha256:abc")),
        ),
        (
            "unknown field",
            patch("nar_hash_claimed_by_client", json!(true)),
        ),
        ("missing field", {
            let mut b = good.clone();
            b.as_object_mut().expect("object").remove("nar_size");
            b
        }),
        ("not an object", json!([1, 2, 3])),
    ];
    for (what, body) in &cases {
        let r = srv.publish_api("c", srv.admin(), body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}: {}", r.text());
        srv.assert_absent("c", &tp).await;
    }
    // The upload belongs to cache c: another cache cannot publish it.
    srv.create_cache("d", false).await;
    srv.publish_api("d", srv.admin(), &good).await.expect(400);
    srv.assert_absent("d", &tp).await;
    srv.publish_api("c", srv.admin(), &good).await.expect(201);
    srv.assert_present("c", &tp).await;
}

#[tokio::test]
async fn invalid_json_bodies_are_400() {
    let srv = server().await;
    let cases: Vec<(Method, &str, &str)> = vec![
        (Method::POST, "/api/v1/caches", "{"),
        (Method::POST, "/api/v1/caches", "null"),
        (Method::POST, "/api/v1/caches", r#"{"name": 5}"#),
        (
            Method::POST,
            "/api/v1/caches",
            r#"{"name": "x", "bogus": 1}"#,
        ),
        (
            Method::POST,
            "/api/v1/caches",
            r#"{"name": "x", "priority": -1}"#,
        ),
        (
            Method::POST,
            "/api/v1/caches",
            r#"{"name": "x", "priority": "high"}"#,
        ),
        (
            Method::POST,
            "/api/v1/caches",
            r#"{"name": "x", "max_size": "5 parsecs"}"#,
        ),
        (
            Method::POST,
            "/api/v1/caches",
            r#"{"name": "x", "max_size": -5}"#,
        ),
        (Method::PATCH, "/api/v1/caches/c", r#"{"privat": true}"#),
        (
            Method::PATCH,
            "/api/v1/caches/c",
            r#"{"priority": 99999999999}"#,
        ),
        (Method::PATCH, "/api/v1/caches/c", "[]"),
        (Method::POST, "/api/v1/tokens", r#"{"perms": ["root"]}"#),
        (Method::POST, "/api/v1/tokens", r#"{"perms": []}"#),
        (
            Method::POST,
            "/api/v1/tokens",
            r#"{"perms": ["pull"], "caches": []}"#,
        ),
        (
            Method::POST,
            "/api/v1/tokens",
            r#"{"perms": ["pull"], "caches": ["Bad Name"]}"#,
        ),
        (
            Method::POST,
            "/api/v1/tokens",
            r#"{"perms": ["pull"], "expires_in": "soon"}"#,
        ),
        (
            Method::POST,
            "/api/v1/tokens",
            r#"{"perms": ["pull"], "label": "a\nb"}"#,
        ),
        (
            Method::POST,
            "/api/v1/tokens",
            r#"{"perms": ["pull"], "sudo": true}"#,
        ),
        (
            Method::POST,
            "/api/v1/caches/c/missing",
            r#"{"paths": ["/etc/passwd"]}"#,
        ),
        (
            Method::POST,
            "/api/v1/caches/c/missing",
            r#"{"paths": ["0C6KZPH7L0DCBFMJAP64F0CZDAFN3B7X"]}"#,
        ),
        (
            Method::POST,
            "/api/v1/caches/c/missing",
            r#"{"paths": "x"}"#,
        ),
        (Method::POST, "/api/v1/caches/c/missing", r#"{"path": []}"#),
        (
            Method::POST,
            "/api/v1/caches/c/public-key",
            r#"{"public_key": "nope"}"#,
        ),
        (
            Method::POST,
            "/api/v1/caches/c/public-key",
            r#"{"public_key": "k:AAAA"}"#,
        ),
    ];
    for (method, uri, body) in &cases {
        let mut req = request(method.clone(), uri, srv.admin(), body.to_string());
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            "application/json".parse().expect("value"),
        );
        let r = srv.send(req).await;
        assert_eq!(
            r.status,
            StatusCode::BAD_REQUEST,
            "{method} {uri} {body}: {}",
            r.text()
        );
        assert!(
            r.json()["error"].is_string(),
            "{method} {uri}: error body {}",
            r.text()
        );
    }
    // No Content-Type: still a 4xx.
    let r = srv
        .send(request(
            Method::POST,
            "/api/v1/caches",
            srv.admin(),
            r#"{"name":"x"}"#,
        ))
        .await;
    assert_4xx(&r, "JSON without Content-Type");
    // Nothing was created or changed along the way.
    let caches = srv
        .get("/api/v1/caches", srv.admin())
        .await
        .expect(200)
        .json();
    assert_eq!(caches.as_array().map(Vec::len), Some(1));
    let c = srv.cache_info("c").await;
    assert_eq!(c["priority"], json!(41));
    assert_eq!(c["private"], json!(false));
    assert_eq!(c["signing_mode"], json!("managed"));
    let tokens = srv
        .get("/api/v1/tokens", srv.admin())
        .await
        .expect(200)
        .json();
    assert_eq!(
        tokens.as_array().map(Vec::len),
        Some(1),
        "only the bootstrap token"
    );
}

/// A token that could never be used is refused when asked for, with a reason a user can act
/// on: one expired at birth, or one scoped to a cache that does not exist (a typo).
#[tokio::test]
async fn tokens_that_would_grant_nothing_are_refused() {
    let srv = server().await;
    for (body, says) in [
        (
            json!({ "perms": ["pull"], "expires_in": "0s" }),
            "not in the future",
        ),
        (
            json!({ "perms": ["pull"], "expires_in": "0" }),
            "not in the future",
        ),
        (
            json!({ "perms": ["push"], "caches": ["nosuchcache"] }),
            "no cache named \"nosuchcache\"",
        ),
        (
            json!({ "perms": ["pull"], "caches": ["c", "nosuchcache"] }),
            "no cache named \"nosuchcache\"",
        ),
    ] {
        let r = srv
            .post_json("/api/v1/tokens", srv.admin(), &body)
            .await
            .expect(400);
        let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
        assert!(error.contains(says), "{body}: {error}");
        if says.starts_with("no cache") {
            assert!(error.contains("larder cache list"), "{error}");
        }
    }
    let tokens = srv
        .get("/api/v1/tokens", srv.admin())
        .await
        .expect(200)
        .json();
    assert_eq!(
        tokens.as_array().map(Vec::len),
        Some(1),
        "only the bootstrap token: {tokens}"
    );
    // The same requests, made right, succeed.
    srv.post_json(
        "/api/v1/tokens",
        srv.admin(),
        &json!({ "perms": ["pull"], "caches": ["c"], "expires_in": "1s" }),
    )
    .await
    .expect(201);
}

/// A storage limit of 0 is refused, not read as "no limit" (which is null) nor kept as a limit
/// that would evict everything; the limit in place stays.
#[tokio::test]
async fn a_zero_size_limit_is_refused() {
    let srv = server().await;
    srv.patch_json(
        "/api/v1/caches/c",
        srv.admin(),
        &json!({ "max_size": "1GiB" }),
    )
    .await
    .expect(200);
    for zero in [json!(0), json!("0"), json!("0GiB"), json!("0.0001")] {
        for (r, what) in [
            (
                srv.post_json(
                    "/api/v1/caches",
                    srv.admin(),
                    &json!({ "name": "zero", "max_size": zero }),
                )
                .await,
                "create",
            ),
            (
                srv.patch_json(
                    "/api/v1/caches/c",
                    srv.admin(),
                    &json!({ "max_size": zero }),
                )
                .await,
                "configure",
            ),
        ] {
            let r = r.expect(400);
            let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
            assert!(
                error.contains("more than 0") && error.contains("--max-size none"),
                "{what} {zero}: {error}"
            );
        }
    }
    assert_eq!(srv.cache_info("c").await["max_size"], json!(1u64 << 30));
    srv.get("/api/v1/caches/zero", srv.admin())
        .await
        .expect(404);
    // null is how a limit is removed.
    srv.patch_json(
        "/api/v1/caches/c",
        srv.admin(),
        &json!({ "max_size": null }),
    )
    .await
    .expect(200);
    assert_eq!(srv.cache_info("c").await["max_size"], json!(null));
}
