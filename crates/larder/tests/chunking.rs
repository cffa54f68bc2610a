//! Content-defined chunking judged by real Nix: generations of a large path pushed with Nix's
//! own uploader (`nix copy --to http://…`, chunked by the server) share most of their chunks,
//! and real Nix substitutes every generation from the chunked cache and verifies it; a chunk
//! deleted behind the server's back makes the next download fail (never a short NAR).

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

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

/// The objects holding NAR bytes (packs, and chunks stored on their own).
fn chunk_objects(data: &Path) -> HashSet<PathBuf> {
    let mut out = HashSet::new();
    for kind in ["chunk", "pack"] {
        let root = data.join("store/objects").join(kind);
        for d in std::fs::read_dir(root).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
                out.insert(f.path());
            }
        }
    }
    out
}

fn bytes_of(objects: &[PathBuf]) -> u64 {
    objects
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
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

#[test]
fn real_nix_substitutes_every_generation_and_fails_on_a_lost_chunk() {
    require_nix();
    let server = Server::start();
    let info = server.create_cache("gens", &[]);
    let key = info["public_key"].as_str().unwrap().to_owned();
    let work = tempfile::tempdir().unwrap();
    let push = server.token("push", "gens");
    let netrc = server.netrc(work.path(), "push.netrc", &push);
    let url = format!("{}/gens", server.url);
    let tag = unique_tag();
    let mut data = contents(4 << 20, tag.len() as u64 * 7919 + 1);
    let mut paths = Vec::new();
    let mut before = chunk_objects(server.data.path());
    let mut added = Vec::new();
    for generation in 1..=3 {
        // An insertion that shifts what follows, and an edit in place.
        let at = generation * 900_000;
        data.splice(at..at, format!("generation {generation}\n").bytes());
        data[at + 1_000_000..at + 1_000_050].fill(b'0' + generation as u8);
        let path = add_to_store(work.path(), &format!("gen-{tag}-{generation}"), &data);
        let xdg = tempfile::tempdir().unwrap();
        let o = nix(
            &[
                "copy",
                "--option",
                "netrc-file",
                netrc.to_str().unwrap(),
                "--to",
                &url,
                &path,
            ],
            xdg.path(),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let now = chunk_objects(server.data.path());
        added.push(now.difference(&before).cloned().collect::<Vec<_>>());
        before = now;
        paths.push(path);
    }
    // Each generation's new chunks are stored together: one object each.
    assert!(added.iter().all(|a| a.len() == 1), "{added:?}");
    let first = bytes_of(&added[0]);
    assert!(
        first > 3 << 20,
        "the first generation is stored whole: {first}"
    );
    for later in &added[1..] {
        // An insertion and an edit change the chunks they fall in, and maybe a neighbour:
        // a few chunks of at most 128 KiB.
        let bytes = bytes_of(later);
        assert!(
            bytes <= 6 * (128 << 10),
            "a generation adds a few chunks, not {bytes} bytes"
        );
    }
    for path in &paths {
        substitute(&url, &key, path).unwrap_or_else(|e| panic!("substituting {path}: {e}"));
    }
    // The chunks only the last generation has, deleted behind the server's back.
    std::fs::remove_file(&added[2][0]).unwrap();
    let err = substitute(&url, &key, &paths[2]).expect_err("a NAR missing a chunk was served");
    assert!(err.contains("nar/"), "{err}");
    // The others are untouched.
    substitute(&url, &key, &paths[0]).unwrap();
    assert!(server.stop().success());
}
