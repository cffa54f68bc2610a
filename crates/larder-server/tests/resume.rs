//! Resuming multi-part uploads: an unfinished upload is found again by its NAR's identity,
//! each stored part measured by the server (NAR bytes it holds), completed from the parts that
//! make the NAR, kept across a restart, and seen by push tokens of its own cache only.
#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;

use common::{Auth, Comp, Server, TestPath};
use larder_nix::hash::Sha256;
use serde_json::Value;

/// A path whose NAR (incompressible, about 300 KB) goes up in 4 parts of 100 000 NAR bytes.
fn big(seed: &str) -> TestPath {
    TestPath::with_nar("big", seed, common::file_nar(&common::noise(300_000, seed)))
}

fn chunks(tp: &TestPath) -> Vec<&[u8]> {
    tp.nar.chunks(100_000).collect()
}

fn identity(tp: &TestPath) -> String {
    format!(
        "nar_hash={}&nar_size={}",
        tp.nar_hash().to_typed_nix32(),
        tp.nar_size()
    )
}

async fn open(srv: &Server, cache: &str, auth: Auth<'_>, query: &str) -> String {
    srv.post_json(
        &format!("/api/v1/caches/{cache}/multipart?{query}"),
        auth,
        &Value::Null,
    )
    .await
    .expect(201)
    .json()["upload_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn put_part(srv: &Server, cache: &str, auth: Auth<'_>, id: &str, n: u32, bytes: Vec<u8>) {
    srv.put(
        &format!("/api/v1/caches/{cache}/multipart/{id}/parts/{n}"),
        auth,
        bytes,
    )
    .await
    .expect(204);
}

/// Complete `id` with its first `parts` parts and publish `tp` from it.
async fn complete_and_publish(srv: &Server, cache: &str, id: &str, parts: u32, tp: &TestPath) {
    let done = srv
        .post_json(
            &format!("/api/v1/caches/{cache}/multipart/{id}/complete?parts={parts}"),
            srv.admin(),
            &Value::Null,
        )
        .await
        .expect(201)
        .json();
    assert_eq!(done["nar_hash"], tp.nar_hash().to_typed_nix32());
    srv.publish_api(
        cache,
        srv.admin(),
        &tp.publish_body(done["upload_id"].as_str().unwrap(), None),
    )
    .await
    .expect(201);
    srv.assert_present(cache, tp).await;
}

#[tokio::test]
async fn an_unfinished_upload_is_found_by_its_nar_and_its_parts_measured() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let tp = big("found");
    let parts = chunks(&tp);
    let id = open(
        &srv,
        "c",
        srv.admin(),
        &format!("compression=zstd&{}", identity(&tp)),
    )
    .await;
    // Another upload, of an unnamed NAR: not listed under this NAR.
    let other = open(&srv, "c", srv.admin(), "compression=zstd").await;
    put_part(
        &srv,
        "c",
        srv.admin(),
        &id,
        0,
        Comp::Zstd.compress(parts[0]),
    )
    .await;
    put_part(
        &srv,
        "c",
        srv.admin(),
        &id,
        1,
        Comp::Zstd.compress(parts[1]),
    )
    .await;
    // A part that is no whole zstd stream on its own (cut short).
    let cut = Comp::Zstd.compress(parts[2]);
    put_part(
        &srv,
        "c",
        srv.admin(),
        &id,
        2,
        cut[..cut.len() / 2].to_vec(),
    )
    .await;

    let listed = srv
        .get(
            &format!("/api/v1/caches/c/multipart?{}", identity(&tp)),
            srv.admin(),
        )
        .await
        .expect(200)
        .json();
    let uploads = listed["uploads"].as_array().unwrap();
    assert_eq!(uploads.len(), 1, "{listed}");
    assert_eq!(uploads[0]["upload_id"], id.as_str());
    assert_eq!(uploads[0]["part_count"], 3);
    assert_eq!(uploads[0]["nar_size"], tp.nar_size());
    assert_eq!(uploads[0]["compression"], "zstd");
    let all = srv
        .get("/api/v1/caches/c/multipart", srv.admin())
        .await
        .expect(200)
        .json();
    let ids: Vec<&str> = all["uploads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["upload_id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&id.as_str()) && ids.contains(&other.as_str()));
    // Another spelling of the same hash finds it too; another NAR does not.
    let hex = format!(
        "nar_hash=sha256:{}&nar_size={}",
        tp.nar_hash().to_hex(),
        tp.nar_size()
    );
    let r = srv
        .get(&format!("/api/v1/caches/c/multipart?{hex}"), srv.admin())
        .await
        .expect(200)
        .json();
    assert_eq!(r["uploads"].as_array().unwrap().len(), 1);
    let r = srv
        .get(
            &format!("/api/v1/caches/c/multipart?{}", identity(&big("else"))),
            srv.admin(),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(r["uploads"], serde_json::json!([]));

    // The server measures what each part holds.
    let shown = srv
        .get(&format!("/api/v1/caches/c/multipart/{id}"), srv.admin())
        .await
        .expect(200)
        .json();
    let measured = shown["parts"].as_array().unwrap();
    assert_eq!(measured.len(), 3);
    for n in 0..2 {
        assert_eq!(measured[n]["n"], n);
        assert_eq!(measured[n]["nar_size"], parts[n].len());
        assert_eq!(
            measured[n]["nar_hash"],
            Sha256::digest(parts[n]).to_typed_nix32()
        );
        let stored = Comp::Zstd.compress(parts[n]);
        assert_eq!(measured[n]["file_size"], stored.len());
        assert_eq!(
            measured[n]["file_hash"],
            Sha256::digest(&stored).to_typed_nix32()
        );
    }
    assert_eq!(measured[2]["nar_size"], Value::Null, "{shown}");
    assert_eq!(measured[2]["nar_hash"], Value::Null, "{shown}");

    // Resumed: the cut part again, the last one, and a stray part past the end (from a run
    // with another part size) that completion leaves out.
    put_part(
        &srv,
        "c",
        srv.admin(),
        &id,
        2,
        Comp::Zstd.compress(parts[2]),
    )
    .await;
    put_part(
        &srv,
        "c",
        srv.admin(),
        &id,
        3,
        Comp::Zstd.compress(parts[3]),
    )
    .await;
    put_part(&srv, "c", srv.admin(), &id, 4, b"stray".to_vec()).await;
    complete_and_publish(&srv, "c", &id, 4, &tp).await;
    srv.get(&format!("/api/v1/caches/c/multipart/{id}"), srv.admin())
        .await
        .expect(404);
    // Abandoning an upload deletes its parts at once.
    put_part(&srv, "c", srv.admin(), &other, 0, b"x".to_vec()).await;
    srv.delete(&format!("/api/v1/caches/c/multipart/{other}"), srv.admin())
        .await
        .expect(204);
    assert_eq!(srv.staging_files(), 0);
}

#[tokio::test]
async fn parts_that_make_another_nar_than_declared_are_refused() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let (tp, other) = (big("declared"), big("sent"));
    let id = open(
        &srv,
        "c",
        srv.admin(),
        &format!("compression=none&{}", identity(&tp)),
    )
    .await;
    for (n, part) in chunks(&other).into_iter().enumerate() {
        put_part(&srv, "c", srv.admin(), &id, n as u32, part.to_vec()).await;
    }
    let complete = |parts: u32| {
        let srv = &srv;
        let id = &id;
        async move {
            srv.post_json(
                &format!("/api/v1/caches/c/multipart/{id}/complete?parts={parts}"),
                srv.admin(),
                &Value::Null,
            )
            .await
        }
    };
    let r = complete(5).await.expect(400);
    assert!(
        r.text().contains("part 4 of 5 was not uploaded"),
        "{}",
        r.text()
    );
    let r = complete(4).await.expect(400);
    assert!(
        r.text().contains("this upload was opened for"),
        "{}",
        r.text()
    );
    assert_eq!(srv.chunk_files(), 0, "nothing stored");
    srv.get(&format!("/api/v1/caches/c/multipart/{id}"), srv.admin())
        .await
        .expect(200);
}

/// What a server process leaves of an unfinished upload is resumed by the next one on the same
/// data directory: the sweep at start deletes partial files only.
#[tokio::test]
async fn unfinished_uploads_survive_a_restart() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let tp = big("restart");
    let parts = chunks(&tp);
    let id = open(
        &srv,
        "c",
        srv.admin(),
        &format!("compression=xz&{}", identity(&tp)),
    )
    .await;
    for n in 0..2 {
        put_part(
            &srv,
            "c",
            srv.admin(),
            &id,
            n,
            Comp::Xz.compress(parts[n as usize]),
        )
        .await;
    }
    // A part being received when the server died: a partial spool file of a gone owner.
    let dir = std::fs::read_dir(srv.data_dir().join("store/tmp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("multipart-")
        })
        .unwrap();
    std::fs::write(dir.join("spool-AbC123"), b"half a part").unwrap();
    // And an upload an older larder left (a `compression` note, parts never measured).
    let old = big("older");
    let old_id = "0123456789abcdef0123456789abcdef";
    let cache_id = dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .split('-')
        .nth(1)
        .unwrap()
        .to_owned();
    let old_dir = dir.with_file_name(format!("multipart-{cache_id}-{old_id}"));
    std::fs::create_dir(&old_dir).unwrap();
    std::fs::write(old_dir.join("compression"), "zstd").unwrap();
    for (n, part) in chunks(&old).into_iter().enumerate() {
        std::fs::write(
            old_dir.join(format!("part-{n:06}")),
            Comp::Zstd.compress(part),
        )
        .unwrap();
    }

    let after = srv.replica_sharing_data().await;
    assert_eq!(after.state.staging.sweep(), 1, "only the partial file");
    let listed = after
        .get(
            &format!("/api/v1/caches/c/multipart?{}", identity(&tp)),
            srv.admin(),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(listed["uploads"][0]["upload_id"], id.as_str());
    let shown = after
        .get(&format!("/api/v1/caches/c/multipart/{id}"), srv.admin())
        .await
        .expect(200)
        .json();
    assert_eq!(shown["parts"].as_array().unwrap().len(), 2);
    assert_eq!(shown["parts"][1]["nar_size"], parts[1].len());
    for n in 2..4 {
        put_part(
            &after,
            "c",
            srv.admin(),
            &id,
            n,
            Comp::Xz.compress(parts[n as usize]),
        )
        .await;
    }
    complete_and_publish(&after, "c", &id, 4, &tp).await;

    let shown = after
        .get(&format!("/api/v1/caches/c/multipart/{old_id}"), srv.admin())
        .await
        .expect(200)
        .json();
    assert_eq!(shown["nar_hash"], Value::Null);
    assert_eq!(
        shown["parts"][3]["nar_size"],
        chunks(&old)[3].len(),
        "{shown}"
    );
    complete_and_publish(&after, "c", old_id, 4, &old).await;
}

#[tokio::test]
async fn only_push_tokens_of_its_cache_see_or_touch_an_upload() {
    let srv = Server::new().await;
    srv.create_cache("a", false).await;
    srv.create_cache("b", false).await;
    srv.create_cache("secret", true).await;
    let push_a = srv.token(&["push"], Some(&["a"])).await;
    let push_b = srv.token(&["push"], Some(&["b"])).await;
    let pull_a = srv.token(&["pull"], Some(&["a"])).await;
    let tp = big("private");
    let q = format!("compression=none&{}", identity(&tp));
    let id = open(&srv, "a", push_a.bearer(), &q).await;
    put_part(&srv, "a", push_a.bearer(), &id, 0, chunks(&tp)[0].to_vec()).await;
    let secret = open(&srv, "secret", srv.admin(), &q).await;

    let on = |cache: &str, id: &str| {
        [
            (
                "GET",
                format!("/api/v1/caches/{cache}/multipart?{}", identity(&tp)),
            ),
            ("GET", format!("/api/v1/caches/{cache}/multipart/{id}")),
            (
                "PUT",
                format!("/api/v1/caches/{cache}/multipart/{id}/parts/0"),
            ),
            (
                "POST",
                format!("/api/v1/caches/{cache}/multipart/{id}/complete"),
            ),
            ("DELETE", format!("/api/v1/caches/{cache}/multipart/{id}")),
        ]
    };
    let send = |method: &str, uri: &str, auth: Auth<'_>| {
        let req = common::request(
            method.parse().unwrap(),
            uri,
            auth,
            if method == "PUT" {
                b"junk".to_vec()
            } else {
                Vec::new()
            },
        );
        srv.send(req)
    };
    // Another cache's push token, a pull token, no token: refused on cache a.
    for (auth, status) in [
        (push_b.bearer(), 403),
        (pull_a.bearer(), 403),
        (Auth::Anon, 401),
    ] {
        for (method, uri) in on("a", &id) {
            let r = send(method, &uri, auth).await;
            assert_eq!(r.status.as_u16(), status, "{method} {uri}: {}", r.text());
        }
    }
    // Through its own cache, the other token finds nothing of cache a's.
    for (method, uri) in on("b", &id).into_iter().skip(1) {
        let r = send(method, &uri, push_b.bearer()).await;
        assert_eq!(r.status.as_u16(), 404, "{method} {uri}: {}", r.text());
    }
    let r = send("GET", &on("b", &id)[0].1, push_b.bearer())
        .await
        .expect(200);
    assert_eq!(r.json()["uploads"], serde_json::json!([]));
    // A private cache's uploads: the same 401 as a cache that does not exist.
    for cache in ["secret", "nosuch"] {
        let r = send("GET", &on(cache, &secret)[0].1, Auth::Anon).await;
        assert_eq!(r.status.as_u16(), 401, "{cache}: {}", r.text());
    }
    // The upload is as its owner left it.
    let shown = srv
        .get(&format!("/api/v1/caches/a/multipart/{id}"), push_a.bearer())
        .await
        .expect(200)
        .json();
    assert_eq!(shown["parts"][0]["nar_size"], 100_000);
}
