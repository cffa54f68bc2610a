//! Storage limits: closure-safe least-recently-used eviction, pins, usage recording, and
//! eviction racing uploads and downloads (SPEC §2.6).
#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::{noise, Comp, Server, TestPath};
use larder_nix::NarInfo;
use serde_json::{json, Value};

fn sized(name: &str, seed: &str, len: usize) -> TestPath {
    TestPath::with_nar(name, seed, common::file_nar(&noise(len, seed)))
}

async fn push(srv: &Server, cache: &str, tp: &TestPath) {
    srv.push_api(cache, srv.admin(), tp, Comp::None)
        .await
        .expect(201);
}

/// Fetch a narinfo and its NAR, as Nix does (both count as uses).
async fn fetch(srv: &Server, cache: &str, tp: &TestPath) {
    let ni = srv
        .get(&format!("/{cache}/{}.narinfo", tp.hash()), srv.admin())
        .await
        .expect(200);
    let ni = NarInfo::parse(&ni.text()).unwrap();
    srv.get(&format!("/{cache}/{}", ni.url), srv.admin())
        .await
        .expect(200);
}

/// Every narinfo the cache serves among `all`: its NAR and every reference are served too.
/// Returns the hashes served.
async fn walk(srv: &Server, cache: &str, all: &[&TestPath]) -> HashSet<String> {
    let mut served = HashSet::new();
    for tp in all {
        let r = srv
            .get(&format!("/{cache}/{}.narinfo", tp.hash()), srv.admin())
            .await;
        if r.status == 404 {
            continue;
        }
        let ni = NarInfo::parse(&r.expect(200).text()).unwrap();
        srv.get(&format!("/{cache}/{}", ni.url), srv.admin())
            .await
            .expect(200);
        for reference in &ni.references {
            srv.get(
                &format!("/{cache}/{}.narinfo", reference.hash_part()),
                srv.admin(),
            )
            .await
            .expect(200);
        }
        served.insert(tp.hash());
    }
    served
}

async fn gc(srv: &Server, cache: &str, dry_run: bool) -> Value {
    srv.post_json(
        &format!("/api/v1/caches/{cache}/gc?dry_run={dry_run}"),
        srv.admin(),
        &json!({}),
    )
    .await
    .expect(200)
    .json()
}

fn evicted_paths(report: &Value) -> Vec<String> {
    report["evicted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["store_path"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn least_recently_used_closures_go_first_and_pins_stay() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    const N: usize = 10_000;
    let base = sized("base", "base", N / 2);
    let stale = sized("stale", "stale", N);
    let libs: Vec<TestPath> = (0..6)
        .map(|k| sized(&format!("lib{k}"), &format!("lib{k}"), N))
        .collect();
    let apps: Vec<TestPath> = (0..6)
        .map(|k| sized(&format!("app{k}"), &format!("app{k}"), N).referencing(&[&libs[k], &base]))
        .collect();
    let pinlib = sized("pinlib", "pinlib", N);
    let pinapp = sized("pinapp", "pinapp", N).referencing(&[&pinlib]);
    for tp in [&base, &stale, &pinlib, &pinapp]
        .into_iter()
        .chain(libs.iter())
        .chain(apps.iter())
    {
        push(&srv, "c", tp).await;
    }
    let pin = srv
        .post_json(
            "/api/v1/caches/c/pins",
            srv.admin(),
            &json!({ "name": "release", "store_path": pinapp.path.to_absolute() }),
        )
        .await
        .expect(201)
        .json();
    assert_eq!(pin["revision"], 1);
    assert_eq!(pin["keep"], "forever");

    // Known access pattern: apps 3, 0, 5, 1, 4, 2, each in its own second. The pinned
    // closure and `stale` are never used (they age from their upload, the oldest time).
    let t0 = larder_store::now_unix();
    for (i, k) in [3, 0, 5, 1, 4, 2].into_iter().enumerate() {
        fetch(&srv, "c", &apps[k]).await;
        srv.state
            .retention
            .usage
            .flush_at(&srv.state.meta, t0 + 10 * (i as i64 + 1))
            .await
            .unwrap();
    }

    // A limit that forces out `stale` and the closures of apps 3, 0 and 5, exactly.
    let size = |tps: &[&TestPath]| tps.iter().map(|t| t.nar.len() as i64).sum::<i64>();
    let total = srv.cache_info("c").await["size"].as_i64().unwrap();
    let must_go = size(&[
        &stale, &libs[3], &apps[3], &libs[0], &apps[0], &libs[5], &apps[5],
    ]);
    let limit = total - must_go;
    // Set in the database (a PATCH would evict at once): the dry run below shows the plan.
    srv.set_limit_quietly("c", limit).await;
    let info = srv.cache_info("c").await;
    assert_eq!(info["near_limit"], true, "{info}");

    // Each app goes before the library it references (as recent as the app, through it).
    let expected: Vec<String> = [
        &stale, &apps[3], &libs[3], &apps[0], &libs[0], &apps[5], &libs[5],
    ]
    .iter()
    .map(|t| t.path.to_absolute())
    .collect();
    let objects = srv.chunk_files();
    let paths = srv.path_count("c").await;

    let dry = gc(&srv, "c", true).await;
    assert_eq!(dry["dry_run"], true);
    assert_eq!(evicted_paths(&dry), expected, "{dry:#}");
    for victim in dry["evicted"].as_array().unwrap() {
        assert_eq!(victim["reason"], "least-recently-used", "{victim}");
    }
    assert_eq!(
        srv.path_count("c").await,
        paths,
        "a dry run deletes nothing"
    );

    let done = gc(&srv, "c", false).await;
    assert_eq!(evicted_paths(&done), expected, "{done:#}");
    let info = srv.cache_info("c").await;
    assert!(info["size"].as_i64().unwrap() <= limit, "{info}");
    assert_eq!(info["paths"].as_i64().unwrap(), paths - 7);
    // The NARs stay for the grace period (a narinfo served just before may name them).
    assert_eq!(srv.chunk_files(), objects);

    for tp in [
        &stale, &libs[3], &apps[3], &libs[0], &apps[0], &libs[5], &apps[5],
    ] {
        srv.assert_absent("c", tp).await;
    }
    let mut all: Vec<&TestPath> = vec![&base, &stale, &pinlib, &pinapp];
    all.extend(libs.iter());
    all.extend(apps.iter());
    let served = walk(&srv, "c", &all).await;
    for tp in [
        &base, &pinlib, &pinapp, &libs[1], &apps[1], &libs[4], &apps[4], &libs[2], &apps[2],
    ] {
        assert!(served.contains(&tp.hash()), "{} was evicted", tp.path);
    }

    // Under the limit now: nothing more goes.
    assert_eq!(
        evicted_paths(&gc(&srv, "c", false).await),
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn a_pinned_closure_survives_a_limit_it_alone_exceeds() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let lib = sized("lib", "lib", 5000);
    let app = sized("app", "app", 5000).referencing(&[&lib]);
    let other = sized("other", "other", 5000);
    for tp in [&lib, &app, &other] {
        push(&srv, "c", tp).await;
    }
    srv.post_json(
        "/api/v1/caches/c/pins",
        srv.admin(),
        &json!({ "name": "app", "store_path": app.path.to_string() }),
    )
    .await
    .expect(201);
    srv.set_limit_quietly("c", 100).await;
    let report = gc(&srv, "c", false).await;
    assert_eq!(evicted_paths(&report), vec![other.path.to_absolute()]);
    assert_eq!(report["pinned_paths"], 2);
    assert!(report["warning"].as_str().unwrap().contains("pinned"));
    srv.assert_present("c", &lib).await;
    srv.assert_present("c", &app).await;
}

#[tokio::test]
async fn pins_are_revisioned_and_must_name_a_path_in_the_cache() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let paths: Vec<TestPath> = (0..4)
        .map(|k| sized(&format!("p{k}"), &format!("p{k}"), 100))
        .collect();
    for tp in &paths {
        push(&srv, "c", tp).await;
    }
    let absent = sized("absent", "absent", 100);
    let r = srv
        .post_json(
            "/api/v1/caches/c/pins",
            srv.admin(),
            &json!({ "name": "x", "store_path": absent.path.to_absolute() }),
        )
        .await
        .expect(400);
    assert!(r.text().contains("not in cache"), "{}", r.text());
    srv.post_json(
        "/api/v1/caches/c/pins",
        srv.admin(),
        &json!({ "name": "x", "store_path": paths[0].path.to_absolute(), "keep_revisions": 2, "keep_days": 3 }),
    )
    .await
    .expect(400);
    for (k, tp) in paths.iter().enumerate() {
        let pin = srv
            .post_json(
                "/api/v1/caches/c/pins",
                srv.admin(),
                &json!({ "name": "x", "store_path": tp.path.to_absolute(), "keep_revisions": 2 }),
            )
            .await
            .expect(201)
            .json();
        assert_eq!(pin["revision"], k as i64 + 1);
        assert_eq!(pin["keep"], json!({ "revisions": 2 }));
    }
    let list = srv
        .get("/api/v1/caches/c/pins", srv.admin())
        .await
        .expect(200)
        .json();
    let revs: Vec<(i64, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["revision"].as_i64().unwrap(),
                p["store_path"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        revs,
        vec![
            (4, paths[3].path.to_absolute()),
            (3, paths[2].path.to_absolute())
        ]
    );
    // Anonymous users may read the pins of a public cache, not change them.
    srv.get("/api/v1/caches/c/pins", common::Auth::Anon)
        .await
        .expect(200);
    srv.delete("/api/v1/caches/c/pins/x", common::Auth::Anon)
        .await
        .expect(401);
    srv.delete("/api/v1/caches/c/pins/x", srv.admin())
        .await
        .expect(204);
    srv.delete("/api/v1/caches/c/pins/x", srv.admin())
        .await
        .expect(404);
    let list = srv
        .get("/api/v1/caches/c/pins", srv.admin())
        .await
        .expect(200)
        .json();
    assert_eq!(list, json!([]));
}

#[tokio::test]
async fn gc_needs_admin_on_the_cache() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let push_token = srv.token(&["push"], Some(&["c"])).await;
    srv.post_json(
        "/api/v1/caches/c/gc?dry_run=true",
        common::Auth::Anon,
        &json!({}),
    )
    .await
    .expect(401);
    srv.post_json(
        "/api/v1/caches/c/gc?dry_run=true",
        push_token.bearer(),
        &json!({}),
    )
    .await
    .expect(403);
    let admin = srv.token(&["admin"], Some(&["c"])).await;
    srv.post_json("/api/v1/caches/c/gc", admin.bearer(), &json!({}))
        .await
        .expect(200);
}

/// A cache without a limit loses nothing to gc, and the report still says what it holds (read
/// from its counters, not from its paths).
#[tokio::test]
async fn gc_of_a_cache_without_a_limit_reports_its_size_and_evicts_nothing() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let lib = sized("lib", "lib", 3_000);
    let app = sized("app", "app", 5_000).referencing(&[&lib]);
    for tp in [&lib, &app] {
        push(&srv, "c", tp).await;
    }
    let info: Value = srv
        .get("/api/v1/caches/c", srv.admin())
        .await
        .expect(200)
        .json();
    for dry_run in [true, false] {
        let report = gc(&srv, "c", dry_run).await;
        assert_eq!(report["dry_run"], json!(dry_run));
        assert_eq!(report["max_size"], Value::Null);
        assert_eq!(report["paths_before"], json!(2));
        assert_eq!(report["paths_after"], json!(2));
        assert_eq!(report["size_before"], info["size"]);
        assert_eq!(report["size_after"], info["size"]);
        assert!(info["size"].as_i64().unwrap() > 8_000, "{info}");
        assert_eq!(evicted_paths(&report), Vec::<String>::new());
    }
    assert_eq!(walk(&srv, "c", &[&lib, &app]).await.len(), 2);
}

/// The periodic pass evicts from a cache over its limit and leaves a cache within its limit
/// (exactly at it) untouched; it decides from the caches' counters.
#[tokio::test]
async fn the_background_pass_evicts_only_from_caches_over_their_limit() {
    let srv = Server::new().await;
    let old = sized("old", "old", 5_000);
    let new = sized("new", "new", 5_000);
    for cache in ["over", "within"] {
        srv.create_cache(cache, false).await;
        for tp in [&old, &new] {
            push(&srv, cache, tp).await;
        }
    }
    let size = |info: Value| info["size"].as_i64().unwrap();
    let full = size(
        srv.get("/api/v1/caches/within", srv.admin())
            .await
            .expect(200)
            .json(),
    );
    srv.set_limit_quietly("within", full).await;
    srv.set_limit_quietly("over", full - 1).await;
    larder_server::retention::evict_all(&srv.state)
        .await
        .unwrap();
    srv.assert_present("within", &old).await;
    srv.assert_present("within", &new).await;
    srv.assert_absent("over", &old).await;
    srv.assert_present("over", &new).await;
}

#[tokio::test]
async fn a_lower_limit_holds_at_once() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let paths: Vec<TestPath> = (0..6)
        .map(|k| sized(&format!("q{k}"), &format!("q{k}"), 10_000))
        .collect();
    for tp in &paths {
        push(&srv, "c", tp).await;
    }
    let info = srv
        .patch_json(
            "/api/v1/caches/c",
            srv.admin(),
            &json!({ "max_size": 30_000 }),
        )
        .await
        .expect(200)
        .json();
    // The answer to the change already shows the cache within its new limit.
    assert!(info["size"].as_i64().unwrap() <= 30_000, "{info}");
    assert!(srv.cache_info("c").await["size"].as_i64().unwrap() <= 30_000);
    srv.assert_present("c", &paths[5]).await;
}

#[tokio::test]
async fn an_upload_that_crosses_the_limit_triggers_eviction() {
    let srv = Server::new().await;
    srv.post_json(
        "/api/v1/caches",
        srv.admin(),
        &json!({ "name": "c", "max_size": 30_000 }),
    )
    .await
    .expect(201);
    let paths: Vec<TestPath> = (0..6)
        .map(|k| sized(&format!("p{k}"), &format!("p{k}"), 10_000))
        .collect();
    for tp in &paths {
        push(&srv, "c", tp).await;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let size = srv.cache_info("c").await["size"].as_i64().unwrap();
        if size <= 30_000 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {size} bytes");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The newest upload survives.
    srv.assert_present("c", &paths[5]).await;
}

/// Eviction running while paths are pushed and pulled: a narinfo that is served never names a
/// NAR that 404s, and the closure of every served narinfo is complete at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eviction_racing_uploads_and_downloads_never_breaks_a_served_narinfo() {
    let srv = Arc::new(Server::new().await);
    srv.post_json(
        "/api/v1/caches",
        srv.admin(),
        &json!({ "name": "c", "max_size": 40_000 }),
    )
    .await
    .expect(201);
    let base = sized("base", "base", 2000);
    push(&srv, "c", &base).await;
    let closures: Arc<Vec<(TestPath, TestPath)>> = Arc::new(
        (0..40)
            .map(|k| {
                let lib = sized(&format!("lib{k}"), &format!("rlib{k}"), 3000);
                let app = sized(&format!("app{k}"), &format!("rapp{k}"), 3000)
                    .referencing(&[&lib, &base]);
                (lib, app)
            })
            .collect(),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let pusher = {
        let (srv, closures, base) = (srv.clone(), closures.clone(), base.clone());
        tokio::spawn(async move {
            for (lib, app) in closures.iter() {
                // The base may have been evicted: push the whole closure, as a client does.
                for tp in [&base, lib, app] {
                    let r = srv.push_api("c", srv.admin(), tp, Comp::None).await;
                    assert!(
                        r.status.is_success() || r.status == 400,
                        "push: {} {}",
                        r.status,
                        r.text()
                    );
                }
            }
        })
    };
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (srv, closures, stop) = (srv.clone(), closures.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut checked = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (lib, app) in closures.iter() {
                    for tp in [app, lib] {
                        let r = srv
                            .get(&format!("/c/{}.narinfo", tp.hash()), srv.admin())
                            .await;
                        if r.status == 404 {
                            continue;
                        }
                        let ni = NarInfo::parse(&r.expect(200).text()).unwrap();
                        let nar = srv.get(&format!("/c/{}", ni.url), srv.admin()).await;
                        assert_eq!(
                            nar.status, 200,
                            "{} names a NAR that is gone",
                            ni.store_path
                        );
                        checked += 1;
                    }
                }
            }
            checked
        }));
    }
    let evictor = {
        let (srv, stop) = (srv.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let cache = srv.state.meta.get_cache("c").await.unwrap().unwrap();
                larder_server::retention::evict(&srv.state, &cache, false)
                    .await
                    .unwrap();
                larder_server::publish::collect_garbage(&srv.state)
                    .await
                    .unwrap();
            }
        })
    };
    pusher.await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    evictor.await.unwrap();
    let mut checked = 0;
    for r in readers {
        checked += r.await.unwrap();
    }
    assert!(checked > 0);

    // The racing pusher accepts a 400 when eviction took a reference between two uploads;
    // make sure the newest closure is really in before checking that eviction keeps it.
    let (lib, app) = &closures[39];
    for tp in [&base, lib, app] {
        let r = srv.push_api("c", srv.admin(), tp, Comp::None).await;
        assert!(r.status.is_success(), "push: {} {}", r.status, r.text());
    }
    let cache = srv.state.meta.get_cache("c").await.unwrap().unwrap();
    larder_server::retention::evict(&srv.state, &cache, false)
        .await
        .unwrap();
    let info = srv.cache_info("c").await;
    assert!(info["size"].as_i64().unwrap() <= 40_000, "{info}");
    let mut all: Vec<&TestPath> = vec![&base];
    for (lib, app) in closures.iter() {
        all.push(lib);
        all.push(app);
    }
    let served = walk(&srv, "c", &all).await;
    assert!(
        served.contains(&closures[39].1.hash()),
        "the newest closure was evicted"
    );
}

/// A limited cache whose limit stays far off while its paths are used.
async fn limited_cache(srv: &Server, name: &str) -> i64 {
    srv.post_json(
        "/api/v1/caches",
        srv.admin(),
        &json!({ "name": name, "max_size": 1_000_000_000 }),
    )
    .await
    .expect(201);
    srv.state.meta.get_cache(name).await.unwrap().unwrap().id
}

/// Each path's use as the database has it, and its NAR's row.
async fn recorded(srv: &Server, cache_id: i64, tp: &TestPath) -> (Option<i64>, i64) {
    let lru = srv.state.meta.lru_paths(cache_id).await.unwrap();
    let p = lru.iter().find(|p| p.hash == tp.hash()).unwrap();
    (p.last_used_at, p.nar_id)
}

/// What path info says of a path's last use.
async fn last_use(srv: &Server, cache: &str, tp: &TestPath) -> Value {
    srv.get(
        &format!("/api/v1/caches/{cache}/paths/{}", tp.hash()),
        srv.admin(),
    )
    .await
    .expect(200)
    .json()["last_used_at"]
        .clone()
}

/// A use within a minute of the path's last written one stays in memory only; eviction, the
/// path list and path info see it all the same, and a path evicted leaves no use behind.
/// Shutdown writes the latest use of every path exactly, in a cache without a limit too
/// (whose uses are otherwise written once per 10 minutes): a restart shows the same last use.
#[tokio::test]
async fn shutdown_writes_the_latest_use_of_every_path() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let c = srv.state.meta.get_cache("c").await.unwrap().unwrap().id;
    let tp = sized("used-twice", "used-twice", 1_000);
    push(&srv, "c", &tp).await;
    let t0 = larder_store::now_unix();
    let usage = &srv.state.retention.usage;
    for at in [t0, t0 + 5] {
        fetch(&srv, "c", &tp).await;
        usage.flush_at(&srv.state.meta, at).await.unwrap();
    }
    // The second use is held in memory: the database has the first.
    assert_eq!(recorded(&srv, c, &tp).await.0, Some(t0));
    assert_eq!(last_use(&srv, "c", &tp).await, json!(t0 + 5));
    usage.flush_all(&srv.state.meta).await.unwrap();
    assert_eq!(recorded(&srv, c, &tp).await.0, Some(t0 + 5));
}

#[tokio::test]
async fn a_use_not_yet_written_still_orders_eviction() {
    let srv = Server::new().await;
    let c = limited_cache(&srv, "c").await;
    let early = sized("early", "early", 10_000);
    let late = sized("late", "late", 10_000);
    push(&srv, "c", &early).await;
    push(&srv, "c", &late).await;
    let t0 = larder_store::now_unix();
    let usage = &srv.state.retention.usage;
    for (tp, at) in [(&early, t0), (&late, t0 + 5), (&early, t0 + 10)] {
        fetch(&srv, "c", tp).await;
        usage.flush_at(&srv.state.meta, at).await.unwrap();
    }
    // The database was told of early's first use only: its second came 10 s later.
    assert_eq!(recorded(&srv, c, &early).await.0, Some(t0));
    assert_eq!(recorded(&srv, c, &late).await.0, Some(t0 + 5));
    assert_eq!(last_use(&srv, "c", &early).await, json!(t0 + 10));
    let list = srv
        .get("/api/v1/caches/c/paths?query=early", srv.admin())
        .await
        .expect(200)
        .json();
    assert_eq!(list["paths"][0]["last_used_at"], json!(t0 + 10), "{list}");

    // Room for one of them: the one used last stays.
    let total = srv.cache_info("c").await["size"].as_i64().unwrap();
    srv.set_limit_quietly("c", total - 1).await;
    let dry = gc(&srv, "c", true).await;
    assert_eq!(evicted_paths(&dry), [late.path.to_absolute()], "{dry:#}");
    assert_eq!(dry["evicted"][0]["last_used_at"], json!(t0 + 5));

    // A minute after its last write, the held use reaches the database.
    usage.flush_at(&srv.state.meta, t0 + 5 + 60).await.unwrap();
    assert_eq!(recorded(&srv, c, &early).await.0, Some(t0 + 10));

    let late_nar = recorded(&srv, c, &late).await.1;
    assert!(usage.holds(c, &late.hash(), late_nar));
    let done = gc(&srv, "c", false).await;
    assert_eq!(evicted_paths(&done), [late.path.to_absolute()], "{done:#}");
    assert!(
        !usage.holds(c, &late.hash(), late_nar),
        "an evicted path's use stays in memory"
    );
    // Pushed again, it is a new, unused path.
    srv.set_limit_quietly("c", 1_000_000_000).await;
    push(&srv, "c", &late).await;
    assert_eq!(last_use(&srv, "c", &late).await, Value::Null);
    assert_eq!(last_use(&srv, "c", &early).await, json!(t0 + 10));
}

/// However many paths are served, at most `MAX_HELD_USES` uses stay in memory, and a use the
/// database does not have yet is never the one dropped; a deleted path leaves none behind.
#[tokio::test]
async fn held_uses_stay_within_their_bound() {
    use larder_server::retention::MAX_HELD_USES;
    let srv = Server::new().await;
    let c = limited_cache(&srv, "c").await;
    let kept = sized("kept", "kept", 1000);
    push(&srv, "c", &kept).await;
    let t0 = larder_store::now_unix();
    let usage = &srv.state.retention.usage;
    for at in [t0, t0 + 10] {
        fetch(&srv, "c", &kept).await;
        usage.flush_at(&srv.state.meta, at).await.unwrap();
    }
    assert_eq!(recorded(&srv, c, &kept).await.0, Some(t0));

    // More distinct paths served than may be held (they need not exist to be counted).
    for i in 0..MAX_HELD_USES + 1000 {
        usage.narinfo(c, &format!("{i:032}"), None);
    }
    usage.flush_at(&srv.state.meta, t0 + 11).await.unwrap();
    let held = usage.held();
    assert!(held <= MAX_HELD_USES, "{held} uses held");
    assert!(held >= MAX_HELD_USES / 2, "only {held} uses held");
    assert_eq!(last_use(&srv, "c", &kept).await, json!(t0 + 10));

    let nar = recorded(&srv, c, &kept).await.1;
    fetch(&srv, "c", &kept).await;
    srv.delete(
        &format!("/api/v1/caches/c/paths/{}", kept.hash()),
        srv.admin(),
    )
    .await
    .expect(200);
    assert!(
        !usage.holds(c, &kept.hash(), nar),
        "a deleted path's use stays in memory"
    );
}
