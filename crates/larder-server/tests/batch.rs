//! `POST /api/v1/caches/<c>/paths/batch`: small paths pushed many to a request. Each path is
//! stored and served as a single upload would be, refused alone (and with it only what refers
//! to it), and a body that is not a well-formed batch stores nothing.

mod common;

use axum::http::{header, Method};
use common::{request, Auth, Comp, Server, TestPath};
use larder_nix::hash::Sha256;
use larder_nix::store_path::StorePath;
use larder_nix::NarInfo;
use serde_json::{json, Value};

/// A path's metadata as `larder push` sends it in a batch.
fn meta(tp: &TestPath) -> Value {
    json!({
        "store_path": tp.path.to_absolute(),
        "nar_hash": tp.nar_hash().to_string(),
        "nar_size": tp.nar_size(),
        "references": tp.references.iter().map(StorePath::to_absolute).collect::<Vec<_>>(),
        "deriver": tp.deriver.as_ref().map(StorePath::basename),
    })
}

/// A batch body: each entry's metadata length, metadata and NAR.
fn body(entries: &[(Value, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (meta, nar) in entries {
        let json = serde_json::to_vec(meta).expect("json");
        out.extend_from_slice(&(json.len() as u32).to_be_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(nar);
    }
    out
}

fn entries(paths: &[&TestPath]) -> Vec<u8> {
    let e: Vec<(Value, &[u8])> = paths.iter().map(|tp| (meta(tp), &tp.nar[..])).collect();
    body(&e)
}

async fn send(
    srv: &Server,
    cache: &str,
    auth: Auth<'_>,
    comp: Comp,
    bytes: Vec<u8>,
) -> common::Resp {
    let uri = format!(
        "/api/v1/caches/{cache}/paths/batch?compression={}",
        comp.name()
    );
    srv.send(request(Method::POST, &uri, auth, comp.compress(&bytes)))
        .await
}

/// Each answer's status (and error, if any), in order.
fn statuses(r: &Value) -> Vec<(String, String)> {
    r["paths"]
        .as_array()
        .expect("paths")
        .iter()
        .map(|p| {
            let status = p["status"].as_str().expect("status").to_owned();
            (status, p["error"].as_str().unwrap_or("").to_owned())
        })
        .collect()
}

/// What a substituter reads of `tp` in `cache`: a narinfo signed by the cache's key with our
/// metadata, and a NAR file that matches its FileHash/FileSize and decompresses to our NAR.
async fn assert_served(srv: &Server, cache: &str, tp: &TestPath) {
    let text = srv
        .get(&format!("/{cache}/{}.narinfo", tp.hash()), Auth::Anon)
        .await
        .expect(200)
        .text();
    let ni = NarInfo::parse(&text).expect("narinfo parses");
    assert_eq!(ni.store_path, tp.path);
    assert_eq!((ni.nar_hash, ni.nar_size), (tp.nar_hash(), tp.nar_size()));
    assert_eq!(ni.references, tp.references);
    assert_eq!(ni.deriver, tp.deriver);
    assert!(ni.verify(&srv.public_key(cache).await), "signed: {text}");
    let nar = srv
        .get(&format!("/{cache}/{}", ni.url), Auth::Anon)
        .await
        .expect(200);
    assert_eq!(ni.file_hash, Some(Sha256::digest(&nar.body)));
    assert_eq!(ni.file_size, Some(nar.body.len() as u64));
    assert_eq!(zstd::decode_all(&nar.body[..]).expect("zstd"), tp.nar);
    assert_eq!(
        nar.body,
        tp.stored(),
        "the server's chunks, as a single upload"
    );
    let ls = srv
        .get(&format!("/{cache}/{}.ls", tp.hash()), Auth::Anon)
        .await
        .expect(200);
    assert!(
        ls.text().starts_with("{\"version\":1,\"root\":"),
        "{}",
        ls.text()
    );
}

#[tokio::test]
async fn a_batch_publishes_each_path_as_a_single_upload_would() {
    let srv = Server::new().await;
    let push = srv.token(&["push"], None).await;
    for (cache, comp) in [
        ("plain", Comp::None),
        ("zstd", Comp::Zstd),
        ("xz", Comp::Xz),
    ] {
        srv.create_cache(cache, false).await;
        let leaf = TestPath::new("leaf", cache);
        let lib = TestPath::new("lib", &format!("{cache}-lib")).referencing(&[&leaf]);
        // Refers to itself and to a path earlier in the batch.
        let mut app = TestPath::new("app", &format!("{cache}-app"));
        app = app.clone().referencing(&[&lib, &leaf, &app]);
        let paths = [&leaf, &lib, &app];
        let r = send(&srv, cache, push.bearer(), comp, entries(&paths))
            .await
            .expect(200)
            .json();
        for (answer, tp) in r["paths"].as_array().expect("paths").iter().zip(paths) {
            assert_eq!(answer["store_path"], json!(tp.path.to_absolute()));
            assert_eq!(answer["status"], json!("created"), "{r}");
            assert_eq!(answer["file_size"], json!(tp.stored().len()));
        }
        for tp in paths {
            assert_served(&srv, cache, tp).await;
        }
        assert_eq!(srv.path_count(cache).await, 3);
        // The same batch again changes nothing.
        let again = send(&srv, cache, push.bearer(), comp, entries(&paths))
            .await
            .expect(200)
            .json();
        assert_eq!(
            statuses(&again),
            vec![("already_present".to_owned(), String::new()); 3]
        );
        assert_eq!(srv.path_count(cache).await, 3);
        let info = srv.cache_info(cache).await;
        assert_eq!(
            info["nar_size"],
            json!(paths.iter().map(|p| p.nar_size()).sum::<u64>()),
            "{info}"
        );
    }
    assert_eq!(srv.staging_files(), 0);
}

#[tokio::test]
async fn a_refused_path_in_a_batch_stops_only_what_refers_to_it() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let push = srv.token(&["push"], Some(&["c"])).await;
    let good = TestPath::new("good", "1");
    // Declared with another NAR's hash: what a corrupt store path looks like.
    let corrupt = TestPath::new("corrupt", "2");
    let mut corrupt_meta = meta(&corrupt);
    corrupt_meta["nar_hash"] = json!(good.nar_hash().to_string());
    let dependant = TestPath::new("dependant", "3").referencing(&[&corrupt]);
    let garbage = vec![7u8; 200];
    let not_nar = TestPath::with_nar("not-a-nar", "4", garbage);
    let orphan = TestPath::new("orphan", "5").referencing(&[&TestPath::new("absent", "6")]);
    let after = TestPath::new("after", "7").referencing(&[&good]);
    let bytes = body(&[
        (meta(&good), &good.nar),
        (corrupt_meta, &corrupt.nar),
        (meta(&dependant), &dependant.nar),
        (meta(&not_nar), &not_nar.nar),
        (meta(&orphan), &orphan.nar),
        (meta(&after), &after.nar),
    ]);
    let r = send(&srv, "c", push.bearer(), Comp::None, bytes)
        .await
        .expect(200)
        .json();
    let s = statuses(&r);
    assert_eq!(s[0].0, "created", "{r}");
    assert_eq!(s[1].0, "failed");
    assert!(s[1].1.contains("NarHash mismatch"), "{r}");
    assert_eq!(r["paths"][1]["code"], json!(400));
    assert_eq!(s[2].0, "failed");
    assert!(s[2].1.contains("not in cache"), "{r}");
    assert_eq!(s[3].0, "failed");
    assert!(s[3].1.contains("not a valid NAR"), "{r}");
    assert_eq!(s[4].0, "failed");
    assert!(s[4].1.contains("not in cache"), "{r}");
    assert_eq!(s[5].0, "created", "{r}");
    assert_eq!(srv.path_count("c").await, 2);
    assert_served(&srv, "c", &good).await;
    assert_served(&srv, "c", &after).await;
    for tp in [&corrupt, &dependant, &not_nar, &orphan] {
        srv.assert_absent("c", tp).await;
    }
}

#[tokio::test]
async fn a_malformed_batch_is_refused_whole_and_stores_nothing() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    srv.create_cache("other", false).await;
    let push = srv.token(&["push"], Some(&["c"])).await;
    let a = TestPath::new("a", "1");
    let b = TestPath::new("b", "2");
    let whole = entries(&[&a, &b]);
    let mut oversized = meta(&b);
    oversized["nar_size"] = json!(2u64 << 20);
    let mut unknown_field = meta(&b);
    unknown_field["upload_id"] = json!("x");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("inside a NAR", whole[..whole.len() - 5].to_vec()),
        (
            "inside an entry",
            whole[..whole.len() - b.nar.len() - 10].to_vec(),
        ),
        ("sent twice", entries(&[&a, &a])),
        (
            "too large",
            body(&[(meta(&a), &a.nar), (oversized, &b.nar)]),
        ),
        (
            "invalid path metadata",
            body(&[(meta(&a), &a.nar), (unknown_field, &b.nar)]),
        ),
        (
            "metadata",
            [&whole[..], &u32::MAX.to_be_bytes()[..]].concat(),
        ),
    ];
    for (what, bytes) in cases {
        let r = send(&srv, "c", push.bearer(), Comp::None, bytes)
            .await
            .expect(400);
        assert!(r.text().contains(what), "{what}: {}", r.text());
    }
    // Not valid zstd.
    let r = srv
        .send(request(
            Method::POST,
            "/api/v1/caches/c/paths/batch?compression=zstd",
            push.bearer(),
            whole.clone(),
        ))
        .await
        .expect(400);
    assert_eq!(r.header(header::CONTENT_TYPE), Some("application/json"));
    // Another cache's token, and no token.
    send(&srv, "other", push.bearer(), Comp::None, whole.clone())
        .await
        .expect(403);
    send(&srv, "c", Auth::Anon, Comp::None, whole.clone())
        .await
        .expect(401);
    assert_eq!(srv.path_count("c").await, 0);
    assert_eq!(srv.path_count("other").await, 0);
    srv.assert_absent("c", &a).await;
    assert_eq!(srv.staging_files(), 0);
    // An empty batch publishes nothing, and the cache still takes a good one.
    let r = send(&srv, "c", push.bearer(), Comp::None, Vec::new())
        .await
        .expect(200)
        .json();
    assert_eq!(r, json!({"paths": []}));
    send(&srv, "c", push.bearer(), Comp::None, whole)
        .await
        .expect(200);
    assert_eq!(srv.path_count("c").await, 2);
}
