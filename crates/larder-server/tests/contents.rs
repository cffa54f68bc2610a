//! Cache contents through the JSON API: the paginated, searchable path list, one path's
//! details (references, referrers, pins, usage), deleting a path (refused while referenced,
//! or with every referrer), and who may do each.
#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;

use std::collections::{BTreeSet, HashSet};

use common::{noise, Auth, Comp, Server, TestPath};
use larder_nix::NarInfo;
use serde_json::{json, Value};

fn sized(name: &str, seed: &str, len: usize) -> TestPath {
    TestPath::with_nar(name, seed, common::file_nar(&noise(len, seed)))
}

async fn push(srv: &Server, cache: &str, tp: &TestPath) {
    srv.push_api(cache, srv.admin(), tp, Comp::Zstd)
        .await
        .expect(201);
}

async fn page(srv: &Server, cache: &str, params: &str, auth: Auth<'_>) -> Value {
    srv.get(&format!("/api/v1/caches/{cache}/paths?{params}"), auth)
        .await
        .expect(200)
        .json()
}

fn store_paths(page: &Value) -> Vec<String> {
    page["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["store_path"].as_str().unwrap().to_owned())
        .collect()
}

/// Every page of a listing, following `next_cursor`; asserts pages are full until the last.
async fn all_pages(srv: &Server, cache: &str, query: &str, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut params = format!("limit={limit}&query={query}");
        if let Some(c) = &cursor {
            params.push_str(&format!("&cursor={c}"));
        }
        let p = page(srv, cache, &params, srv.admin()).await;
        let paths = store_paths(&p);
        out.extend(paths.iter().cloned());
        match p["next_cursor"].as_str() {
            Some(c) => {
                assert_eq!(paths.len(), limit, "a page before the last is full");
                cursor = Some(c.to_owned());
            }
            None => return out,
        }
    }
}

fn sort_key(store_path: &str) -> (String, String) {
    let base = store_path.rsplit('/').next().unwrap();
    (base[33..].to_owned(), base[..32].to_owned())
}

#[tokio::test]
async fn listing_is_paginated_by_name_searchable_and_stable_under_inserts() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let mut all: Vec<TestPath> = Vec::new();
    for i in 0..23 {
        let name = if i % 3 == 0 {
            format!("python3_{i:02}-lib")
        } else {
            format!("hello-{i:02}")
        };
        let tp = TestPath::new(&name, &format!("seed{i}"));
        push(&srv, "c", &tp).await;
        all.push(tp);
    }
    // Everything, in (name, hash) order, over pages of 5, nothing twice.
    let listed = all_pages(&srv, "c", "", 5).await;
    let mut expected: Vec<String> = all.iter().map(|t| t.path.to_absolute()).collect();
    expected.sort_by_key(|p| sort_key(p));
    assert_eq!(listed, expected);
    let first = page(&srv, "c", "limit=5", srv.admin()).await;
    assert_eq!(first["total"], 23);
    let entry = &first["paths"][0];
    let tp = all
        .iter()
        .find(|t| t.path.to_absolute() == entry["store_path"])
        .unwrap();
    assert_eq!(entry["nar_size"], tp.nar_size());
    assert_eq!(entry["file_size"], tp.stored().len());
    assert_eq!(entry["compression"], "zstd");
    assert_eq!(entry["hash"], tp.hash());
    assert!(entry["uploaded_at"].as_i64().unwrap() > 1_700_000_000);
    assert_eq!(entry["last_used_at"], Value::Null);

    // Search: a name substring (case-insensitive), `_` taken literally, a hash prefix, a
    // whole store path.
    let py = all_pages(&srv, "c", "PYTHON3_", 3).await;
    assert_eq!(py.len(), 8, "{py:?}");
    assert!(py.iter().all(|p| p.contains("python3_")));
    let none = page(&srv, "c", "query=python3%25lib", srv.admin()).await;
    assert_eq!(none["total"], 0, "% is not a wildcard");
    let by_hash = page(
        &srv,
        "c",
        &format!("query={}", &all[4].hash()[..10]),
        srv.admin(),
    )
    .await;
    assert_eq!(store_paths(&by_hash), vec![all[4].path.to_absolute()]);
    let by_path = page(
        &srv,
        "c",
        &format!("query={}", all[7].path.to_absolute()),
        srv.admin(),
    )
    .await;
    assert_eq!(store_paths(&by_path), vec![all[7].path.to_absolute()]);

    // Stable under inserts: paths published between page requests, sorting before and
    // after the cursor, never make a listed path repeat or vanish.
    let p1 = page(&srv, "c", "limit=10", srv.admin()).await;
    let before = TestPath::new("aaa-early", "ins1");
    let after = TestPath::new("zzz-late", "ins2");
    push(&srv, "c", &before).await;
    push(&srv, "c", &after).await;
    let cursor = p1["next_cursor"].as_str().unwrap();
    let mut seen = store_paths(&p1);
    let mut cursor = Some(cursor.to_owned());
    while let Some(c) = cursor {
        let p = page(&srv, "c", &format!("limit=10&cursor={c}"), srv.admin()).await;
        seen.extend(store_paths(&p));
        cursor = p["next_cursor"].as_str().map(str::to_owned);
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a path was listed twice");
    for p in &expected {
        assert!(seen.contains(p), "{p} was skipped");
    }
    assert!(seen.contains(&after.path.to_absolute()));
    assert!(
        !seen.contains(&before.path.to_absolute()),
        "sorts before the cursor"
    );

    // Usage shows up in the listing.
    srv.get(&format!("/c/{}.narinfo", all[0].hash()), Auth::Anon)
        .await
        .expect(200);
    let used = page(&srv, "c", &format!("query={}", all[0].hash()), srv.admin()).await;
    assert!(
        used["paths"][0]["last_used_at"].as_i64().unwrap()
            >= used["paths"][0]["uploaded_at"].as_i64().unwrap()
    );

    // Bad parameters are 400s.
    for bad in [
        "limit=0",
        "limit=1001",
        "limit=ten",
        "cursor=not-a-store-path",
        "cursor=../../etc",
        "bogus=1",
    ] {
        srv.get(&format!("/api/v1/caches/c/paths?{bad}"), srv.admin())
            .await
            .expect(400);
    }
    let long = "x".repeat(201);
    srv.get(&format!("/api/v1/caches/c/paths?query={long}"), srv.admin())
        .await
        .expect(400);
}

/// lib <- mid <- app (app references mid, mid references lib), plus `other` alone.
struct Closure {
    lib: TestPath,
    mid: TestPath,
    app: TestPath,
    app2: TestPath,
    other: TestPath,
}

async fn closure(srv: &Server, cache: &str) -> Closure {
    let lib = sized("lib", "lib", 3000);
    let mid = sized("mid", "mid", 2000).referencing(&[&lib]);
    let mut app = sized("app", "app", 1000).referencing(&[&mid, &lib]);
    app.references.push(app.path.clone()); // a self-reference, as Nix writes them
    let app2 = sized("app2", "app2", 1000).referencing(&[&mid]);
    let other = sized("other", "other", 500);
    for tp in [&lib, &mid, &app, &app2, &other] {
        push(srv, cache, tp).await;
    }
    Closure {
        lib,
        mid,
        app,
        app2,
        other,
    }
}

#[tokio::test]
async fn path_info_shows_narinfo_references_referrers_and_pins() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let c = closure(&srv, "c").await;
    srv.post_json(
        "/api/v1/caches/c/pins",
        srv.admin(),
        &json!({ "name": "release", "store_path": c.app.path.to_absolute() }),
    )
    .await
    .expect(201);

    let served = srv
        .get(&format!("/c/{}.narinfo", c.mid.hash()), Auth::Anon)
        .await
        .expect(200)
        .text();
    let info = srv
        .get(
            &format!("/api/v1/caches/c/paths/{}", c.mid.hash()),
            Auth::Anon,
        )
        .await
        .expect(200)
        .json();
    assert_eq!(info["store_path"], c.mid.path.to_absolute());
    assert_eq!(info["narinfo"], served.as_str(), "the narinfo as served");
    let ni = NarInfo::parse(&served).unwrap();
    assert_eq!(info["url"], ni.url.as_str());
    assert_eq!(info["nar_hash"], c.mid.nar_hash().to_string());
    assert_eq!(info["nar_size"], c.mid.nar_size());
    assert_eq!(info["file_hash"], ni.file_hash.unwrap().to_string());
    assert_eq!(info["file_size"], ni.file_size.unwrap());
    assert_eq!(info["compression"], "zstd");
    assert_eq!(
        info["deriver"],
        c.mid.deriver.as_ref().unwrap().to_absolute()
    );
    let sigs = info["sigs"].as_array().unwrap();
    assert_eq!(sigs.len(), 1);
    assert!(sigs[0].as_str().unwrap().starts_with("c."));
    assert_eq!(
        info["references"],
        json!([{ "store_path": c.lib.path.to_absolute(), "in_cache": true }])
    );
    let referrers: BTreeSet<&str> = info["referrers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let app_abs = c.app.path.to_absolute();
    let app2_abs = c.app2.path.to_absolute();
    assert_eq!(
        referrers,
        BTreeSet::from([app_abs.as_str(), app2_abs.as_str()])
    );
    assert_eq!(info["referrer_count"], 2);
    assert_eq!(
        info["pins"],
        json!([{ "name": "release", "revision": 1, "store_path": c.app.path.to_absolute() }]),
        "mid is in the pinned closure of app"
    );
    assert!(
        info["last_used_at"].as_i64().is_some(),
        "the narinfo fetch is a use"
    );

    // The same path by basename and by full store path (percent-encoded); `other` is in no
    // pinned closure and has no referrers.
    let by_base = srv
        .get(
            &format!("/api/v1/caches/c/paths/{}", c.mid.path.basename()),
            Auth::Anon,
        )
        .await
        .expect(200)
        .json();
    assert_eq!(by_base["store_path"], info["store_path"]);
    let encoded = c.other.path.to_absolute().replace('/', "%2F");
    let other = srv
        .get(&format!("/api/v1/caches/c/paths/{encoded}"), Auth::Anon)
        .await
        .expect(200)
        .json();
    assert_eq!(other["referrers"], json!([]));
    assert_eq!(other["pins"], json!([]));
    assert_eq!(other["last_used_at"], Value::Null);
    let app = srv
        .get(
            &format!("/api/v1/caches/c/paths/{}", c.app.hash()),
            Auth::Anon,
        )
        .await
        .expect(200)
        .json();
    assert_eq!(
        app["references"].as_array().unwrap().len(),
        3,
        "self included"
    );

    // Unknown, misnamed and malformed paths.
    let absent = common::store_path("absent", "absent");
    srv.get(
        &format!("/api/v1/caches/c/paths/{}", absent.hash_part()),
        Auth::Anon,
    )
    .await
    .expect(404);
    srv.get(
        &format!("/api/v1/caches/c/paths/{}-wrongname", c.mid.hash()),
        Auth::Anon,
    )
    .await
    .expect(404);
    for bad in [
        "short",
        "..",
        "%2Fetc%2Fpasswd",
        "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
    ] {
        srv.get(&format!("/api/v1/caches/c/paths/{bad}"), Auth::Anon)
            .await
            .expect(400);
    }
}

/// Every narinfo the cache serves among `all` has its NAR and every reference served too.
async fn assert_closed(srv: &Server, cache: &str, all: &[&TestPath]) -> BTreeSet<String> {
    let mut served = BTreeSet::new();
    for tp in all {
        let r = srv
            .get(&format!("/{cache}/{}.narinfo", tp.hash()), Auth::Anon)
            .await;
        if r.status == 404 {
            continue;
        }
        let ni = NarInfo::parse(&r.expect(200).text()).unwrap();
        srv.get(&format!("/{cache}/{}", ni.url), Auth::Anon)
            .await
            .expect(200);
        for reference in &ni.references {
            srv.get(
                &format!("/{cache}/{}.narinfo", reference.hash_part()),
                Auth::Anon,
            )
            .await
            .expect(200);
        }
        served.insert(tp.path.name().to_owned());
    }
    served
}

#[tokio::test]
async fn delete_refuses_referenced_paths_or_takes_every_referrer_along() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let c = closure(&srv, "c").await;
    let everything = [&c.lib, &c.mid, &c.app, &c.app2, &c.other];
    // A narinfo served (and cached in memory) before the deletion.
    let old_mid = NarInfo::parse(
        &srv.get(&format!("/c/{}.narinfo", c.mid.hash()), Auth::Anon)
            .await
            .expect(200)
            .text(),
    )
    .unwrap();

    // Refused while referenced: 409 naming every (transitive) referrer; nothing changes.
    let refused = srv
        .delete(
            &format!("/api/v1/caches/c/paths/{}", c.lib.hash()),
            srv.admin(),
        )
        .await
        .expect(409)
        .json();
    let named: BTreeSet<&str> = refused["referrers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let want = [&c.mid, &c.app, &c.app2].map(|t| t.path.to_absolute());
    assert_eq!(named, want.iter().map(String::as_str).collect());
    let error = refused["error"].as_str().unwrap();
    assert!(
        error.ends_with("; delete them first, or all together with --with-referrers"),
        "{error}"
    );
    assert!(!error.contains("  "), "stray spaces: {error:?}");
    assert_eq!(srv.path_count("c").await, 5);

    // A leaf goes alone.
    let report = srv
        .delete(
            &format!("/api/v1/caches/c/paths/{}", c.app2.path.basename()),
            srv.admin(),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(
        report["deleted"],
        json!([{ "store_path": c.app2.path.to_absolute(), "file_size": c.app2.stored().len() }])
    );
    srv.assert_absent("c", &c.app2).await;

    // A pinned closure is refused, even with --with-referrers, until the pin goes.
    srv.post_json(
        "/api/v1/caches/c/pins",
        srv.admin(),
        &json!({ "name": "keep", "store_path": c.app.path.to_absolute() }),
    )
    .await
    .expect(201);
    let pinned = srv
        .delete(
            &format!(
                "/api/v1/caches/c/paths/{}?with_referrers=true",
                c.mid.hash()
            ),
            srv.admin(),
        )
        .await
        .expect(409)
        .json();
    assert!(
        pinned["error"].as_str().unwrap().contains("\"keep\""),
        "{pinned}"
    );
    srv.delete("/api/v1/caches/c/pins/keep", srv.admin())
        .await
        .expect(204);

    // With referrers: mid and app go together; lib and other stay, and every remaining
    // narinfo still has all its references served.
    let report = srv
        .delete(
            &format!(
                "/api/v1/caches/c/paths/{}?with_referrers=true",
                c.mid.hash()
            ),
            srv.admin(),
        )
        .await
        .expect(200)
        .json();
    let deleted: Vec<&str> = report["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["store_path"].as_str().unwrap())
        .collect();
    let mid_abs = c.mid.path.to_absolute();
    let app_abs = c.app.path.to_absolute();
    assert_eq!(deleted, vec![mid_abs.as_str(), app_abs.as_str()]);
    assert_eq!(report["freed"], c.mid.stored().len() + c.app.stored().len());
    // The in-memory narinfo is gone at once ...
    srv.assert_absent("c", &c.mid).await;
    srv.assert_absent("c", &c.app).await;
    // ... but a download that began from the old narinfo still gets its NAR (grace period).
    srv.get(&format!("/c/{}", old_mid.url), Auth::Anon)
        .await
        .expect(200);
    let served = assert_closed(&srv, "c", &everything).await;
    assert_eq!(served, BTreeSet::from(["lib".into(), "other".into()]));
    assert_eq!(srv.path_count("c").await, 2);
    // Deleting it again: 404; lib is now deletable alone.
    srv.delete(
        &format!("/api/v1/caches/c/paths/{}", c.mid.hash()),
        srv.admin(),
    )
    .await
    .expect(404);
    srv.delete(
        &format!("/api/v1/caches/c/paths/{}", c.lib.hash()),
        srv.admin(),
    )
    .await
    .expect(200);
    // The deleted paths can be pushed again.
    push(&srv, "c", &c.lib).await;
    push(&srv, "c", &c.mid).await;
    srv.assert_present("c", &c.mid).await;
}

#[tokio::test]
async fn contents_follow_the_cache_permissions() {
    let srv = Server::new().await;
    srv.create_cache("secret", true).await;
    srv.create_cache("open", false).await;
    let c = closure(&srv, "secret").await;
    let tp = TestPath::new("pub", "pub");
    push(&srv, "open", &tp).await;
    let pull = srv.token(&["pull"], Some(&["secret"])).await;
    let push_tok = srv.token(&["push"], Some(&["secret"])).await;
    let cache_admin = srv.token(&["admin"], Some(&["secret"])).await;
    let other = srv.token(&["admin"], Some(&["open"])).await;
    let absent = common::store_path("absent", "absent").hash_part();
    let info = |h: &str| format!("/api/v1/caches/secret/paths/{h}");

    // Anonymous: 401 for the list and for any path, present or not, valid or not.
    srv.get("/api/v1/caches/secret/paths", Auth::Anon)
        .await
        .expect(401);
    for h in [c.lib.hash(), absent.clone(), "not-valid".into()] {
        let r = srv.get(&info(&h), Auth::Anon).await.expect(401);
        assert!(!r.text().contains("lib"), "{}", r.text());
        srv.delete(&info(&h), Auth::Anon).await.expect(401);
    }
    // A token for another cache: 403, identically for present and absent paths.
    srv.get("/api/v1/caches/secret/paths", other.bearer())
        .await
        .expect(403);
    let a = srv
        .get(&info(&c.lib.hash()), other.bearer())
        .await
        .expect(403);
    let b = srv.get(&info(&absent), other.bearer()).await.expect(403);
    assert_eq!(a.body, b.body);
    // pull reads but cannot delete; push cannot delete either; admin on the cache can.
    let listed = page(&srv, "secret", "", pull.bearer()).await;
    assert_eq!(listed["total"], 5);
    srv.get(&info(&c.lib.hash()), pull.basic())
        .await
        .expect(200);
    srv.delete(&info(&c.other.hash()), pull.bearer())
        .await
        .expect(403);
    srv.delete(&info(&c.other.hash()), push_tok.bearer())
        .await
        .expect(403);
    srv.delete(&info(&c.other.hash()), cache_admin.bearer())
        .await
        .expect(200);
    // Public caches: anyone reads, only an admin on the cache deletes.
    page(&srv, "open", "", Auth::Anon).await;
    srv.get(
        &format!("/api/v1/caches/open/paths/{}", tp.hash()),
        Auth::Anon,
    )
    .await
    .expect(200);
    let del = format!("/api/v1/caches/open/paths/{}", tp.hash());
    srv.delete(&del, Auth::Anon).await.expect(401);
    srv.delete(&del, pull.bearer()).await.expect(403);
    srv.delete(&del, other.bearer()).await.expect(200);
    // An invalid token is a 401 on a delete, even of a public cache.
    srv.delete(&del, Auth::Bearer("larder_nonsense"))
        .await
        .expect(401);
    // Unknown caches: what a private cache answers to whoever could not read one of that
    // name (nobody learns which private caches exist), 404 to who could.
    srv.get("/api/v1/caches/nope/paths", Auth::Anon)
        .await
        .expect(401);
    srv.get("/api/v1/caches/nope/paths", srv.admin())
        .await
        .expect(404);
}

#[tokio::test]
async fn cache_info_has_the_nix_conf_and_flake_lines() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    srv.patch_json(
        "/api/v1/caches/c",
        srv.admin(),
        &json!({ "max_size": 10_000 }),
    )
    .await
    .expect(200);
    let big = sized("big", "big", 9_000);
    srv.push_api("c", srv.admin(), &big, Comp::None)
        .await
        .expect(201);
    let info = srv.cache_info("c").await;
    let key = info["public_key"].as_str().unwrap();
    let url = info["url"].as_str().unwrap();
    assert_eq!(info["paths"], 1);
    assert_eq!(info["max_size"], 10_000);
    assert_eq!(info["near_limit"], true, "{info}");
    assert_eq!(
        info["nix_conf"],
        format!("extra-substituters = {url}\nextra-trusted-public-keys = {key}\n")
    );
    let flake = info["flake_nix_config"].as_str().unwrap();
    assert!(flake.starts_with("nixConfig = {"), "{flake}");
    assert!(flake.contains(&format!("extra-substituters = [ \"{url}\" ];")));
    assert!(flake.contains(&format!("extra-trusted-public-keys = [ \"{key}\" ];")));
}
