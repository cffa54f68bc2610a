//! Push-side chunking judged by real Nix: `larder push` sends only the chunks a cache lacks,
//! real Nix substitutes and verifies every generation pushed that way, an interrupted push
//! sends only the rest when run again, and concurrent pushes sharing chunks while eviction
//! and garbage collection run never leave a published path whose NAR cannot be served.

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Deterministic bytes that do not compress, with compressible runs.
fn contents(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for i in (0..len).step_by(300_000) {
        out[i..(i + 40_000).min(len)].fill(b'.');
    }
    out
}

/// `nix-store --add` a file holding `bytes`, named `name`.
fn add_to_store(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let file = dir.join(name);
    std::fs::write(&file, bytes).unwrap();
    let o = larder_testkit::nix::command("nix-store")
        .arg("--add")
        .arg(&file)
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().trim().to_owned()
}

/// `nix copy --from` the cache into a fresh store, checking signatures, then verify it.
fn substitute(url: &str, key: &str, path: &str) -> Result<(), String> {
    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("store");
    let conf = format!("{NIX_CONFIG}\nrequire-sigs = true\ntrusted-public-keys = {key}");
    for args in [
        vec!["copy", "--from", url, "--to"],
        vec!["store", "verify", "--store"],
    ] {
        let o = larder_testkit::nix::command("nix")
            .args(&args)
            .arg(&store)
            .arg(path)
            .env("NIX_CONFIG", &conf)
            .env("XDG_CACHE_HOME", work.path().join("xdg"))
            .output()
            .unwrap();
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).into_owned());
        }
    }
    Ok(())
}

/// The summary line of `larder push --json`.
fn summary(stdout: &str) -> serde_json::Value {
    let last = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["event"], "summary", "{stdout}");
    v
}

/// `larder push CACHE PATHS --json`: (NAR bytes, bytes uploaded) of the pushed paths.
fn push(server: &Server, token: &str, cache: &str, paths: &[&str]) -> (u64, u64) {
    let mut args = vec!["push", cache, "--json"];
    args.extend_from_slice(paths);
    let s = summary(&server.cli_ok(token, &args));
    (
        s["bytes"].as_u64().unwrap(),
        s["uploaded"].as_u64().unwrap(),
    )
}

fn public_key(info: &serde_json::Value) -> String {
    info["public_key"].as_str().unwrap().to_owned()
}

#[test]
fn larder_push_sends_only_new_chunks_and_nix_substitutes_every_generation() {
    require_nix();
    let server = Server::start();
    let key = public_key(&server.create_cache("gens", &[]));
    let push_token = server.token("push", "gens");
    let work = tempfile::tempdir().unwrap();
    let tag = unique_tag();
    let mut data = contents(6 << 20, tag.len() as u64 * 7919 + 3);
    let mut paths = Vec::new();
    for generation in 1..=4usize {
        if generation > 1 {
            // An insertion that shifts what follows, and an edit in place.
            let at = generation * 800_000;
            data.splice(at..at, format!("generation {generation}\n").bytes());
            data[at + 2_000_000..at + 2_000_050].fill(b'0' + generation as u8);
        }
        let path = add_to_store(work.path(), &format!("gen-{tag}-{generation}"), &data);
        let (nar, sent) = push(&server, &push_token, "gens", &[&path]);
        eprintln!("generation {generation}: {nar} NAR bytes, {sent} uploaded");
        if generation == 1 {
            // Sent whole, and uncompressed to a server on this machine: the summary counts
            // the bytes sent, not what the server stored (its own compression).
            assert!(
                sent >= nar,
                "the first push sends it all, uncompressed: {sent} of {nar}"
            );
        } else {
            assert!(
                sent * 10 < nar,
                "generation {generation} sent {sent} of {nar} NAR bytes"
            );
        }
        paths.push(path);
    }
    let url = format!("{}/gens", server.url);
    for path in &paths {
        substitute(&url, &key, path).unwrap_or_else(|e| panic!("substituting {path}: {e}"));
    }
    // A second push of the same paths has nothing to send.
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    assert_eq!(push(&server, &push_token, "gens", &refs), (0, 0));
}

/// `larder push` reads NARs without hashing them and relies on the server's measurement: a
/// store path whose contents differ from the Nix database's record is refused with the
/// repair hint, and nothing of it becomes visible, whichever way its NAR is sent (whole, in
/// chunks the cache mostly has, in parts).
#[test]
fn a_corrupt_store_path_is_refused_however_its_nar_is_sent() {
    require_nix();
    let server = Server::start();
    server.create_cache("tamper", &[]);
    let push_token = server.token("push", "tamper");
    let work = tempfile::tempdir().unwrap();
    let tag = unique_tag();
    let seed = tag.len() as u64 * 104_729 + 11;
    // Chunks the cache will have: a path pushed intact first.
    let base = contents(2 << 20, seed);
    let intact = add_to_store(work.path(), &format!("intact-{tag}"), &base);
    push(&server, &push_token, "tamper", &[&intact]);
    let mut shared = base.clone();
    shared.extend_from_slice(&contents(300_000, seed + 1));
    let cases: [(&str, Vec<u8>, &[&str]); 3] = [
        ("whole", contents(1 << 20, seed + 2), &[]),
        ("chunked", shared, &[]),
        (
            "parts",
            contents(1 << 20, seed + 3),
            &["--no-chunking", "--part-size", "256KiB"],
        ),
    ];
    for (how, bytes, flags) in cases {
        let path = add_to_store(work.path(), &format!("{how}-{tag}"), &bytes);
        // Same size, different bytes near the end (the chunked case's new chunks).
        let mut tampered = bytes.clone();
        let n = tampered.len();
        tampered[n - 1000..n - 900].fill(b'!');
        std::fs::write(&path, &tampered).unwrap();
        let mut args = vec!["push", "tamper", &path];
        args.extend_from_slice(flags);
        let o = server.cli(&push_token, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{how}: {err}");
        assert!(
            err.contains("is corrupt") && err.contains(&format!("--repair-path {path}")),
            "{how}: {err}"
        );
        // The error names the path once, not as a prefix of an error naming it again.
        assert!(
            err.lines()
                .any(|l| l.starts_with(&format!("error: store path {path} is corrupt"))),
            "{how}: {err}"
        );
        // What the server received and measured counts as uploaded, refused or not (a NAR
        // sent in parts is checked on this side, before its upload completes).
        if how != "parts" {
            assert!(!err.contains(", 0 B uploaded)"), "{how}: {err}");
        }
        let hash = &path["/nix/store/".len()..][..32];
        let url = format!("{}/tamper/{hash}.narinfo", server.url);
        let code = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &url])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&code.stdout), "404", "{how}");
        // Put it back for whoever else reads the store.
        std::fs::write(&path, &bytes).unwrap();
    }
}

/// Bytes of the objects holding NAR bytes in the server's store (packs, and chunks stored on
/// their own).
fn chunk_bytes(data: &Path) -> u64 {
    ["chunk", "pack"]
        .iter()
        .flat_map(|kind| std::fs::read_dir(data.join("store/objects").join(kind)))
        .flatten()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.len())
        .sum()
}

fn spawn_push(server: &Server, token: &str, args: &[&str]) -> Child {
    let home = server.data.path().join("client-home");
    std::fs::create_dir_all(&home).unwrap();
    larder_testkit::nix::command(larder_bin())
        .args(args)
        .env("LARDER_SERVER", &server.url)
        .env("LARDER_TOKEN", token)
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env_remove("LARDER_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn an_interrupted_chunked_push_sends_only_the_rest_when_run_again() {
    require_nix();
    let server = Server::start();
    let key = public_key(&server.create_cache("resume", &[]));
    let push_token = server.token("push", "resume");
    let work = tempfile::tempdir().unwrap();
    let tag = unique_tag();
    let data = contents(64 << 20, tag.len() as u64 * 31 + 5);
    let path = add_to_store(work.path(), &format!("big-{tag}"), &data);
    // A path the cache has that shares most of the first 4 MiB: the push goes in chunks (a
    // NAR whose first window is all new would be sent whole, in parts).
    let head = add_to_store(work.path(), &format!("head-{tag}"), &data[..6 << 20]);
    push(&server, &push_token, "resume", &[&head]);
    // Killed (SIGKILL: no goodbye) once the server holds some of its chunks.
    let mut child = spawn_push(
        &server,
        &push_token,
        &["push", "resume", &path, "--jobs", "1"],
    );
    let deadline = Instant::now() + Duration::from_secs(240);
    let before = chunk_bytes(server.data.path());
    while chunk_bytes(server.data.path()) < before + (3 << 20) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("larder push ended ({status}) before it was interrupted");
        }
        assert!(Instant::now() < deadline, "no 3 MiB of chunks in 240 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let held = chunk_bytes(server.data.path()) - before;
    let (code, _) = server.http(
        "GET",
        &format!("/resume/{}.narinfo", &path["/nix/store/".len()..][..32]),
        None,
    );
    assert_eq!(code, 404, "the interrupted push published the path");
    // The rerun asks again and sends only what the server does not hold.
    let (nar, sent) = push(&server, &push_token, "resume", &[&path]);
    eprintln!("{held} bytes of chunks held; the rerun sent {sent} bytes of {nar} NAR bytes");
    // The server held at least 3 MiB of the NAR's chunks (compressed: more of the NAR).
    assert!(sent + (3 << 20) <= nar, "sent {sent} of {nar}");
    substitute(&format!("{}/resume", server.url), &key, &path).unwrap();
}

#[test]
fn concurrent_pushes_sharing_chunks_under_eviction_never_publish_a_broken_nar() {
    require_nix();
    // Eviction to the cache's limit and collection every second, NARs of evicted paths kept
    // the shortest grace: chunks shared by the pushes are evicted and collected while later
    // pushes ask for them, claim them and assemble with them.
    let server = Server::start_with(&["--gc-interval", "1s", "--evicted-nar-grace", "10s"]);
    let key = public_key(&server.create_cache("c", &[]));
    server.cli_ok(
        &server.admin_token,
        &["cache", "configure", "c", "--max-size", "10MiB"],
    );
    let push_token = server.token("push", "c");
    let work = tempfile::tempdir().unwrap();
    let tag = unique_tag();
    let base = contents(3 << 20, tag.len() as u64 * 131 + 7);
    let url = format!("{}/c", server.url);
    let mut earlier: Vec<String> = Vec::new();
    let start = Instant::now();
    for round in 0..8 {
        // Three paths sharing the base (and so most chunks) with each other and every round;
        // the last two are the same NAR (two CI jobs that built the same path), pushed at
        // once under one push session: the first to assemble releases the chunks the other
        // relies on.
        let paths: Vec<String> = (0..3)
            .map(|i| {
                let mut d = base.clone();
                let tail = 2 * round + i.min(1);
                d.extend(contents(300_000, (2 * tail + 1) as u64));
                add_to_store(work.path(), &format!("share-{tag}-{round}-{i}"), &d)
            })
            .collect();
        let children: Vec<Child> = paths
            .iter()
            .map(|p| spawn_push(&server, &push_token, &["push", "c", p]))
            .collect();
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {round}: {}\nSERVERLOG\n{}",
                String::from_utf8_lossy(&out.stderr),
                server.log()
            );
        }
        // Every path of this and the last rounds the cache still publishes is served whole.
        earlier.extend(paths);
        let from = earlier.len().saturating_sub(6);
        for path in &earlier[from..] {
            if let Err(e) = substitute(&url, &key, path) {
                let (code, _) = server.http(
                    "GET",
                    &format!("/c/{}.narinfo", &path["/nix/store/".len()..][..32]),
                    None,
                );
                assert_eq!(
                    code, 404,
                    "round {round}: {path} is published but broken: {e}"
                );
            }
        }
        std::thread::sleep(Duration::from_millis(1500));
    }
    eprintln!("8 rounds in {:?}", start.elapsed());
    // Eviction did run: the cache holds less than everything pushed.
    let published = earlier
        .iter()
        .filter(|p| {
            server
                .http(
                    "GET",
                    &format!("/c/{}.narinfo", &p["/nix/store/".len()..][..32]),
                    None,
                )
                .0
                == 200
        })
        .count();
    assert!(
        published < earlier.len(),
        "nothing was evicted: {published}"
    );
}
