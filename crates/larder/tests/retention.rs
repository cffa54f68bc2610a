//! Retention with real Nix (issue "Retention and visibility"): a cache with a 5 MiB limit
//! receives a dozen ~1 MiB closures pushed by `larder push` with a known access pattern;
//! eviction keeps it under the limit, least recently used closures first, every served
//! narinfo's references and NAR are served, the pinned closure stays, and real Nix substitutes
//! every remaining closure. A second test runs `larder gc` in a loop while closures are pushed
//! and pulled, and checks that no served narinfo ever names a NAR that is gone. A third drops
//! stray objects into a server's object directory and checks that the orphan scan deletes the
//! chunk-shaped one only, and that real Nix still substitutes the closure pushed before.

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

/// `n` closures `app-i → {blob-i (random, `kib` KiB), lib}`; returns the app paths.
fn build_closures(tag: &str, n: usize, kib: usize) -> Vec<String> {
    build_expr(&format!(
        r#"let
  mk = name: script: derivation {{ inherit name; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" ("export PATH=/bin:/usr/bin; set -e; " + script) ]; }};
  lib = mk "ret-lib-{tag}" "echo lib > $out";
  blob = i: mk "ret-blob-${{toString i}}-{tag}" "head -c {bytes} /dev/urandom > $out";
  app = i: mk "ret-app-${{toString i}}-{tag}" "echo ${{lib}} ${{blob i}} > $out";
in builtins.genList app {n}"#,
        bytes = kib * 1024
    ))
}

/// The closure of a local store path (real Nix's view).
fn closure(path: &str) -> Vec<String> {
    let o = larder_testkit::nix::command("nix-store")
        .args(["-qR", path])
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap();
    assert!(o.status.success());
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn hash_part(path: &str) -> &str {
    &path["/nix/store/".len().."/nix/store/".len() + 32]
}

struct Narinfo {
    references: Vec<String>,
    url: String,
}

fn parse_narinfo(text: &str) -> Narinfo {
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or("")
            .trim()
            .to_owned()
    };
    Narinfo {
        references: field("References:")
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        url: field("URL:"),
    }
}

async fn get(client: &reqwest::Client, url: &str) -> (u16, String) {
    let r = client.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

/// Every narinfo the cache serves among `paths`: its references' narinfos and its NAR are
/// served too. Returns which of `paths` are served.
async fn walk(cache_url: &str, paths: &[String]) -> HashMap<String, bool> {
    let client = reqwest::Client::new();
    let mut served = HashMap::new();
    for p in paths {
        let (st, text) = get(&client, &format!("{cache_url}/{}.narinfo", hash_part(p))).await;
        assert!(st == 200 || st == 404, "narinfo of {p}: {st}");
        served.insert(p.clone(), st == 200);
        if st != 200 {
            continue;
        }
        let ni = parse_narinfo(&text);
        for r in &ni.references {
            let (st, _) = get(&client, &format!("{cache_url}/{}.narinfo", &r[..32])).await;
            assert_eq!(st, 200, "{p} is served but its reference {r} is not");
        }
        let nar = client
            .head(format!("{cache_url}/{}", ni.url))
            .send()
            .await
            .unwrap();
        assert_eq!(
            nar.status().as_u16(),
            200,
            "{p} is served but its NAR is not"
        );
    }
    served
}

fn cache_size(server: &Server, cache: &str) -> (u64, u64) {
    let info: serde_json::Value = serde_json::from_str(
        &server.cli_ok(&server.admin_token, &["cache", "info", cache, "--json"]),
    )
    .unwrap();
    (
        info["size"].as_u64().unwrap(),
        info["max_size"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lru_eviction_keeps_closures_whole_and_real_nix_substitutes_what_remains() {
    require_nix();
    let server = Server::start();
    let info = server.create_cache("ret", &["--max-size", "5MiB"]);
    let key = info["public_key"].as_str().unwrap().to_owned();
    let admin = server.token("admin", "ret");
    let url = format!("{}/ret", server.url);
    let tag = unique_tag();
    let apps = build_closures(&tag, 12, 1024);
    assert_eq!(apps.len(), 12);
    let closures: Vec<Vec<String>> = apps.iter().map(|a| closure(a)).collect();
    assert_eq!(closures[0].len(), 3, "{:?}", closures[0]);
    let every: Vec<String> = {
        let mut v: Vec<String> = closures.iter().flatten().cloned().collect();
        v.sort();
        v.dedup();
        v
    };

    // Recency is kept in whole seconds: space the events so their order is unambiguous.
    let tick = || std::thread::sleep(Duration::from_millis(1100));
    let push = |i: usize| {
        server.cli_ok(&admin, &["push", "ret", &apps[i]]);
    };
    // A use of app 0: real Nix looks up its narinfo.
    let touch0 = || {
        let xdg = tempfile::tempdir().unwrap();
        let o = nix(&["path-info", "--store", &url, &apps[0]], xdg.path());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    for i in 0..4 {
        push(i);
        tick();
    }
    server.cli_ok(&admin, &["pin", "ret", "keep", &apps[1]]);
    for i in 4..12 {
        touch0();
        tick();
        push(i);
        tick();
        let (size, max) = cache_size(&server, "ret");
        assert!(size <= max, "after push {i}: {size} > {max}");
    }

    let (size, max) = cache_size(&server, "ret");
    assert_eq!(max, 5 * MIB);
    assert!(size <= max && size > 3 * MIB, "size {size}");
    let served = walk(&url, &every).await;
    let whole = |i: usize| closures[i].iter().all(|p| served[p]);
    let gone = |i: usize| !served[&apps[i]];
    assert!(whole(0), "the closure used before every push was evicted");
    assert!(whole(1), "the pinned closure was evicted");
    assert!(whole(11), "the newest closure was evicted");
    // Of the never-used closures, the oldest went first: what remains is the newest ones.
    let kept: Vec<usize> = (2..12).filter(|&i| !gone(i)).collect();
    let first_kept = kept[0];
    assert_eq!(kept, (first_kept..12).collect::<Vec<_>>(), "not LRU order");
    assert!(first_kept >= 4, "nothing was evicted: {kept:?}");
    eprintln!("kept closures 0 (used), 1 (pinned), {kept:?}; cache size {size} of {max}");
    for (i, c) in closures.iter().enumerate().take(first_kept).skip(2) {
        // Evicted closures went whole (the shared lib stays: others still reference it).
        assert!(
            c.iter().all(|p| !served[p] || p.contains("ret-lib")),
            "closure {i} half evicted"
        );
    }
    // Nothing more to evict; the dry run says so.
    let dry: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&admin, &["gc", "ret", "--dry-run", "--json"]))
            .unwrap();
    assert_eq!(dry["evicted"].as_array().unwrap().len(), 0, "{dry}");

    // Real Nix substitutes every remaining closure into a fresh store, checking signatures.
    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("store");
    let remaining: Vec<&String> = std::iter::once(0)
        .chain(std::iter::once(1))
        .chain(kept.iter().copied())
        .map(|i| &apps[i])
        .collect();
    let conf = format!("{NIX_CONFIG}\nrequire-sigs = true\ntrusted-public-keys = {key}");
    let o = larder_testkit::nix::command("nix")
        .args(["copy", "--from", &url, "--to"])
        .arg(&store)
        .args(&remaining)
        .env("NIX_CONFIG", &conf)
        .env("XDG_CACHE_HOME", work.path().join("xdg"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = larder_testkit::nix::command("nix")
        .args(["store", "verify", "-r", "--store"])
        .arg(&store)
        .args(&remaining)
        .env("NIX_CONFIG", &conf)
        .env("XDG_CACHE_HOME", work.path().join("xdg"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `larder gc` in a loop while `larder push` and real Nix pulls run: every narinfo the server
/// serves names a NAR it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_loop_during_push_and_pull_never_serves_a_narinfo_without_its_nar() {
    require_nix();
    let server = Server::start();
    let info = server.create_cache("race", &["--max-size", "2MiB"]);
    let key = info["public_key"].as_str().unwrap().to_owned();
    let admin = server.token("admin", "race");
    let url = format!("{}/race", server.url);
    let apps = build_closures(&unique_tag(), 10, 384);
    let every: Vec<String> = {
        let mut v: Vec<String> = apps.iter().flat_map(|a| closure(a)).collect();
        v.sort();
        v.dedup();
        v
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));

    // Readers: narinfo, then its NAR, over and over.
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (url, every, stop) = (url.clone(), every.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut checked = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for p in &every {
                    let (st, text) = get(&client, &format!("{url}/{}.narinfo", hash_part(p))).await;
                    if st == 404 {
                        continue;
                    }
                    assert_eq!(st, 200);
                    let ni = parse_narinfo(&text);
                    let (st, _) = get(&client, &format!("{url}/{}", ni.url)).await;
                    assert_eq!(
                        st, 200,
                        "{p}'s narinfo was served, its NAR {} is gone",
                        ni.url
                    );
                    checked += 1;
                }
            }
            checked
        }));
    }
    // The evictor: `larder gc` as fast as it goes.
    let gc = {
        let (stop, server_url, admin) = (stop.clone(), server.url.clone(), admin.clone());
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let o = larder_testkit::nix::command(larder_bin())
                    .args(["gc", "race", "--json"])
                    .env("LARDER_SERVER", &server_url)
                    .env("LARDER_TOKEN", &admin)
                    .env_remove("LARDER_CONFIG")
                    .output()
                    .unwrap();
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                runs += 1;
            }
            runs
        })
    };
    // Push each closure, then pull it with real Nix into a fresh store. A pull may find the
    // closure already evicted (that is a miss, not an error of the cache); what it fetches must
    // verify.
    let t0 = Instant::now();
    let mut pulled = 0;
    for (i, app) in apps.iter().enumerate() {
        // Eviction may take the closure as soon as it is in (the readers keep older closures
        // more recently used): then the push fails and says so, which is also a pass here.
        let o = server.cli(&admin, &["push", "race", app]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() || err.contains("evicted"),
            "push failed: {err}"
        );
        let work = tempfile::tempdir().unwrap();
        let conf = format!("{NIX_CONFIG}\nrequire-sigs = true\ntrusted-public-keys = {key}");
        let o = larder_testkit::nix::command("nix")
            .args(["copy", "--from", &url, "--to"])
            .arg(work.path().join("store"))
            .arg(app)
            .env("NIX_CONFIG", &conf)
            .env("XDG_CACHE_HOME", work.path().join("xdg"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        if o.status.success() {
            pulled += 1;
        } else {
            assert!(
                err.contains("does not exist") || err.contains("no substituter"),
                "pull {i} failed for another reason than a miss: {err}"
            );
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let gc_runs = tokio::task::spawn_blocking(move || gc.join().unwrap())
        .await
        .unwrap();
    let mut checked = 0;
    for r in readers {
        checked += r.await.unwrap();
    }
    assert!(
        gc_runs > 3 && checked > 0,
        "gc runs {gc_runs}, checks {checked}"
    );
    assert!(pulled > 0, "no pull succeeded");
    eprintln!(
        "{gc_runs} gc runs, {checked} narinfo+NAR checks, {pulled}/10 pulls in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let (size, max) = cache_size(&server, "race");
    assert!(size <= max, "{size} > {max}");
    walk(&url, &every).await;
}

/// Every file under `dir`, relative to it.
fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// Set a file's mtime two days back (beyond the default 24 h orphan grace).
fn age(path: &std::path::Path) {
    let ok = Command::new("touch")
        .args(["-d", "2 days ago"])
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "touch {}", path.display());
}

/// `larder serve` with a 1 s orphan scan and the default 24 h grace: after a closure is pushed
/// with `larder push`, a chunk-shaped object that no metadata names (two days old) is deleted,
/// while the closure's own chunks (aged the same) and files that are not chunks stay, and real
/// Nix still substitutes the closure.
#[test]
fn orphan_scan_deletes_a_stray_chunk_and_keeps_the_closure() {
    require_nix();
    let server = Server::start_with(&["--gc-interval", "1s", "--orphan-scan-interval", "1s"]);
    let info = server.create_cache("orph", &[]);
    let key = info["public_key"].as_str().unwrap().to_owned();
    let work = tempfile::tempdir().unwrap();
    let cache_url = format!("{}/orph", server.url);
    let push = format!(
        "env -u LARDER_CONFIG HOME={home} LARDER_SERVER={url} LARDER_TOKEN={token} {bin} push orph \"$TOP\"",
        home = work.path().display(),
        url = server.url,
        token = server.token("push", "orph"),
        bin = larder_bin(),
    );
    oracle_pass(&work.path().join("oracle"), &cache_url, &key, Some(push));

    let objects = server.data.path().join("store/objects");
    let pushed = files_under(&objects);
    assert!(
        pushed.len() >= 2
            && pushed
                .iter()
                .all(|k| k.starts_with("pack/") || k.starts_with("ls/")),
        "{pushed:?}"
    );
    let hash = larder_nix::hash::Sha256::digest(b"stray").to_nix32();
    let stray = format!("chunk/{}/{hash}", &hash[..2]);
    let stray_pack = format!("pack/{}/{hash}", &hash[..2]);
    let others = [format!("{stray}.part"), "notes/readme".to_owned()];
    for k in others.iter().chain([&stray, &stray_pack]) {
        let p = objects.join(k);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"stray").unwrap();
    }
    for k in files_under(&objects) {
        age(&objects.join(k));
    }

    // One scan or two: a scan may run while the files above are being aged, and find one
    // old enough and the other not yet.
    let deadline = Instant::now() + Duration::from_secs(60);
    while objects.join(&stray).exists() || objects.join(&stray_pack).exists() {
        assert!(
            Instant::now() < deadline,
            "no scan deleted the stray chunk and pack:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        server.log().contains("orphan scan: deleted"),
        "{}",
        server.log()
    );
    let mut expected: Vec<String> = pushed.iter().chain(&others).cloned().collect();
    expected.sort();
    assert_eq!(files_under(&objects), expected);
    let (code, metrics) = server.http("GET", "/metrics", None);
    assert_eq!(code, 200);
    assert!(
        metrics.contains("\nlarder_orphaned_objects_deleted_total 2\n"),
        "{metrics}"
    );

    oracle_pass(&work.path().join("oracle"), &cache_url, &key, None);
}

#[test]
fn a_push_whose_closure_is_evicted_at_once_fails() {
    require_nix();
    let server = Server::start();
    server.create_cache("tight", &["--max-size", "1MiB"]);
    let admin = server.admin_token.clone();
    let tag = unique_tag();
    // 700 KiB pinned, then a 600 KiB closure: it cannot fit beside the pin.
    let old = build_closures(&format!("old{tag}"), 1, 700);
    server.cli_ok(&admin, &["push", "tight", &old[0]]);
    server.cli_ok(&admin, &["pin", "tight", "keep", &old[0]]);
    let new = build_closures(&format!("new{tag}"), 1, 600);
    let o = server.cli(&admin, &["push", "tight", &new[0]]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "a useless push succeeded: {err}");
    assert!(
        err.contains("cache \"tight\" evicted") && err.contains("--max-size"),
        "{err}"
    );
    // The pinned closure is whole.
    for p in closure(&old[0]) {
        let (code, _) = server.http("GET", &format!("/tight/{}.narinfo", hash_part(&p)), None);
        assert_eq!(code, 200, "{p}");
    }
    // With room, the same push succeeds.
    server.cli_ok(
        &admin,
        &["cache", "configure", "tight", "--max-size", "4MiB"],
    );
    server.cli_ok(&admin, &["push", "tight", &new[0]]);
}
