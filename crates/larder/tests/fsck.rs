//! `larder fsck` on real stores, judged by real Nix:
//! - a NAR's chunks (their pack) deleted behind the server's back: Nix's download fails,
//!   fsck names the path, `--repair` unpublishes it and the path depending on it (not an
//!   unrelated one), and Nix then misses cleanly and builds locally;
//! - a bit flipped in a chunk's frame in its pack on Garage (S3) with PostgreSQL: found, the
//!   chunk named, repaired (the path unpublished, the chunk forgotten), and a push again
//!   replaces the damaged pack;
//! - an interrupted run continues from its checkpoint.

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

/// `larder fsck ARGS…` with `env` (the server's own settings).
fn fsck(data: &Path, args: &[&str], env: &[(&str, String)]) -> Output {
    let mut cmd = larder_testkit::nix::command(larder_bin());
    cmd.arg("fsck")
        .arg("--data")
        .arg(data)
        .args(args)
        .env_remove("LARDER_SERVE_CONFIG")
        .env_remove("LARDER_DATABASE")
        .env_remove("LARDER_STORAGE")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The objects holding NAR bytes: packs (a NAR's chunks stored together), and chunks stored
/// on their own.
fn chunk_files(data: &Path) -> HashSet<PathBuf> {
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

/// `nix copy --to` the cache with a push token.
fn nix_copy(server: &Server, cache: &str, netrc: &Path, path: &str) {
    let xdg = tempfile::tempdir().unwrap();
    let url = format!("{}/{cache}", server.url);
    let o = nix(
        &[
            "copy",
            "--option",
            "netrc-file",
            netrc.to_str().unwrap(),
            "--to",
            &url,
            path,
        ],
        xdg.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The `<hash>-<name>` of a store path.
fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap()
}

fn hash_part(path: &str) -> &str {
    &basename(path)[..32]
}

/// `nix-build` `expr` with the cache as the only substituter; returns whether it worked and
/// its stderr.
fn build_with_cache(expr: &str, url: &str, key: &str) -> (bool, String) {
    let xdg = tempfile::tempdir().unwrap();
    let conf = format!(
        "{NIX_CONFIG}\nsubstituters = {url}\ntrusted-public-keys = {key}\nrequire-sigs = true\n\
         narinfo-cache-negative-ttl = 0\nnarinfo-cache-positive-ttl = 0"
    );
    let o = larder_testkit::nix::command("nix-build")
        .args(["--no-out-link", "-E", expr])
        .env("NIX_CONFIG", conf)
        .env("XDG_CACHE_HOME", xdg.path())
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Delete store paths from the local store, so that Nix must substitute or build them.
fn delete_local(paths: &[&str]) {
    let o = larder_testkit::nix::command("nix-store")
        .arg("--delete")
        .args(paths)
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_lost_chunk_is_named_and_repair_unpublishes_its_closure_so_nix_builds_locally() {
    require_nix();
    let server = Server::start();
    let info = server.create_cache("fsck", &[]);
    let key = info["public_key"].as_str().unwrap().to_owned();
    let work = tempfile::tempdir().unwrap();
    let netrc = server.netrc(work.path(), "push.netrc", &server.token("push", "fsck"));
    let tag = unique_tag();
    // 3 MB of random bytes (a dozen chunks), a path referencing it, and an unrelated path.
    let big = format!(
        "derivation {{ name = \"fsck-big-{tag}\"; system = builtins.currentSystem; \
         builder = \"/bin/sh\"; args = [\"-c\" \"/usr/bin/head -c 3000000 /dev/urandom > $out\"]; }}"
    );
    let top = format!(
        "let big = {big}; in derivation {{ name = \"fsck-top-{tag}\"; \
         system = builtins.currentSystem; builder = \"/bin/sh\"; \
         args = [\"-c\" \"echo ${{big}} > $out\"]; }}"
    );
    let big_path = build_expr(&big).remove(0);
    let top_path = build_expr(&top).remove(0);
    let other_path = build_file("fsck-other", "unrelated");
    let before = chunk_files(server.data.path());
    nix_copy(&server, "fsck", &netrc, &big_path);
    let big_chunks: Vec<PathBuf> = chunk_files(server.data.path())
        .difference(&before)
        .cloned()
        .collect();
    // Its dozen chunks, stored together: one object.
    assert_eq!(big_chunks.len(), 1, "{big_chunks:?}");
    nix_copy(&server, "fsck", &netrc, &top_path);
    nix_copy(&server, "fsck", &netrc, &other_path);

    // Sound: exit 0.
    let o = fsck(server.data.path(), &[], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("no damage found"), "{out}");
    assert!(err.contains("checking 3 NARs"), "{err}");

    // The big path's chunks deleted behind the server's back.
    let lost = big_chunks
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    std::fs::remove_file(lost).unwrap();
    let lost_id = lost.file_name().unwrap().to_str().unwrap();
    // Nix's download fails (the narinfo is served, the NAR is not), rather than getting a
    // short NAR; it then builds the path itself, after an error.
    delete_local(&[&top_path, &big_path]);
    let url = format!("{}/fsck", server.url);
    let (_, err) = build_with_cache(&top, &url, &key);
    let failed_download = format!("copying path '{big_path}' from");
    assert!(err.contains(&failed_download), "{err}");
    assert!(err.contains("error: file 'nar/"), "{err}");
    delete_local(&[&top_path, &big_path]);

    let o = fsck(server.data.path(), &[], &[]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    assert!(
        out.contains(&format!("damaged: fsck/{}", basename(&big_path))),
        "{out}"
    );
    assert!(out.contains(&format!("{lost_id} is missing")), "{out}");
    assert!(!out.contains(basename(&top_path)), "{out}");
    assert!(err.contains("larder fsck --repair"), "{err}");
    // Report only: nothing changed.
    let (status, _) = server.http(
        "GET",
        &format!("/fsck/{}.narinfo", hash_part(&big_path)),
        None,
    );
    assert_eq!(status, 200);

    let o = fsck(server.data.path(), &["--repair"], &[]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    assert!(
        out.contains(&format!(
            "unpublished: fsck/{} (its NAR is damaged)",
            basename(&big_path)
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "unpublished: fsck/{} (it references {}, which is unpublished)",
            basename(&top_path),
            basename(&big_path)
        )),
        "{out}"
    );
    assert!(!out.contains(basename(&other_path)), "{out}");
    // The repair waited out the server's narinfo TTL: once it returns, the cache answers a
    // clean miss for both (the damaged path's narinfo was served just before it ran).
    for (path, want) in [(&big_path, 404), (&top_path, 404), (&other_path, 200)] {
        let (status, _) = server.http("GET", &format!("/fsck/{}.narinfo", hash_part(path)), None);
        assert_eq!(status, want, "{path}");
    }
    // Nix misses cleanly (no download tried, no error) and builds locally.
    let (ok, err) = build_with_cache(&top, &url, &key);
    assert!(ok, "{err}");
    assert!(!err.contains("error:"), "{err}");
    assert!(!err.contains(&failed_download), "{err}");
    assert!(err.contains("building '"), "{err}");
    // The cache is sound again, and its paths can be pushed again.
    let o = fsck(server.data.path(), &[], &[]);
    assert!(o.status.success(), "{:?}", text(&o));
    let big_path = build_expr(&big).remove(0);
    nix_copy(&server, "fsck", &netrc, &top_path);
    let o = fsck(server.data.path(), &[], &[]);
    assert!(o.status.success(), "{:?}", text(&o));
    delete_local(&[&top_path, &big_path]);
    let (ok, err) = build_with_cache(&top, &url, &key);
    assert!(ok, "{err}");
    assert!(
        err.contains("copying path") && err.contains(basename(&big_path)),
        "substituted again: {err}"
    );
    assert!(server.stop().success());
}

#[test]
fn an_interrupted_run_continues_from_its_checkpoint() {
    require_nix();
    let server = Server::start();
    server.create_cache("resume", &[]);
    let work = tempfile::tempdir().unwrap();
    let netrc = server.netrc(work.path(), "push.netrc", &server.token("push", "resume"));
    // Five one-chunk NARs, pushed one by one (NARs are checked in the order they were stored).
    let mut chunks = Vec::new();
    for i in 0..5 {
        let before = chunk_files(server.data.path());
        let path = build_file(&format!("resume-{i}"), &format!("content {i}"));
        nix_copy(&server, "resume", &netrc, &path);
        let new: Vec<PathBuf> = chunk_files(server.data.path())
            .difference(&before)
            .cloned()
            .collect();
        assert_eq!(new.len(), 1, "{new:?}");
        chunks.push(new[0].clone());
    }
    let checkpoint = server.data.path().join("fsck-checkpoint.json");
    // The third NAR's object cannot be read (a directory in its place): the run stops there,
    // keeping what it did.
    let third = std::fs::read(&chunks[2]).unwrap();
    std::fs::remove_file(&chunks[2]).unwrap();
    std::fs::create_dir(&chunks[2]).unwrap();
    let o = fsck(server.data.path(), &[], &[]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    assert!(err.contains("fsck stopped after 2 NARs"), "{err}");
    assert!(err.contains("run the same command again"), "{err}");
    assert!(checkpoint.exists());
    // Repaired; and the first NAR's chunk lost since it was checked.
    std::fs::remove_dir(&chunks[2]).unwrap();
    std::fs::write(&chunks[2], third).unwrap();
    std::fs::remove_file(&chunks[0]).unwrap();
    let o = fsck(server.data.path(), &[], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(
        err.contains("continuing the interrupted run (2 NARs checked, 0 damaged)"),
        "{err}"
    );
    assert!(err.contains("5 NARs"), "the total is every NAR: {err}");
    assert!(out.contains("no damage found"), "{out}");
    assert!(
        !checkpoint.exists(),
        "a finished run forgets its checkpoint"
    );
    // A new run checks everything again.
    let o = fsck(server.data.path(), &[], &[]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    assert!(out.contains("is missing"), "{out}");
    // --cache limits the run; a checkpoint of another scope is not continued.
    std::fs::write(
        &checkpoint,
        r#"{"scope":null,"after":4,"checked":4,"bytes":0,"started_at":0,"damaged":[]}"#,
    )
    .unwrap();
    server.create_cache("empty", &[]);
    let o = fsck(server.data.path(), &["--cache", "empty"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(err.contains("starting over for cache \"empty\""), "{err}");
    assert!(err.contains("checking 0 NARs"), "{err}");
    // --restart ignores a checkpoint that would skip the damaged NAR.
    std::fs::write(
        &checkpoint,
        r#"{"scope":null,"after":4,"checked":4,"bytes":0,"started_at":0,"damaged":[]}"#,
    )
    .unwrap();
    let o = fsck(server.data.path(), &[], &[]);
    assert!(o.status.success(), "{:?}", text(&o));
    std::fs::write(
        &checkpoint,
        r#"{"scope":null,"after":4,"checked":4,"bytes":0,"started_at":0,"damaged":[]}"#,
    )
    .unwrap();
    let o = fsck(server.data.path(), &["--restart"], &[]);
    assert_eq!(o.status.code(), Some(1), "{:?}", text(&o));
    let o = fsck(server.data.path(), &["--cache", "nope"], &[]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("no cache named \"nope\""), "{err}");
    assert!(server.stop().success());
}

#[test]
fn a_flipped_bit_on_garage_with_postgres_is_found_and_repaired() {
    require_nix();
    let garage = larder_testkit::garage::Garage::start();
    let pg = larder_testkit::postgres::PgCluster::start();
    let database = pg.create_database();
    let storage = garage.storage_url();
    let mut env = garage.env();
    env.push(("LARDER_DATABASE", database.clone()));
    env.push(("LARDER_STORAGE", storage.clone()));
    let server = Server::start_env(&[], &env);
    server.create_cache("s3", &[]);
    let work = tempfile::tempdir().unwrap();
    let netrc = server.netrc(work.path(), "push.netrc", &server.token("push", "s3"));
    let tag = unique_tag();
    let big = format!(
        "derivation {{ name = \"fsck-s3-{tag}\"; system = builtins.currentSystem; \
         builder = \"/bin/sh\"; args = [\"-c\" \"/usr/bin/head -c 1500000 /dev/urandom > $out\"]; }}"
    );
    let path = build_expr(&big).remove(0);
    let other = build_file("fsck-s3-other", "fine");
    let before: HashSet<String> = garage_keys(&garage).into_iter().collect();
    nix_copy(&server, "s3", &netrc, &path);
    let chunk = garage_keys(&garage)
        .into_iter()
        .find(|k| !before.contains(k) && k.starts_with("pack/"))
        .unwrap();
    nix_copy(&server, "s3", &netrc, &other);
    let o = fsck(server.data.path(), &[], &env);
    assert!(o.status.success(), "{:?}", text(&o));

    // Flip one bit of the chunk's frame, in place.
    let store = garage_store(&garage, work.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let len = store.get(&chunk, None).await.unwrap().len;
        let mut bytes = store.read_range(&chunk, 0..len).await.unwrap().to_vec();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x10;
        store.delete(&chunk).await.unwrap();
        store.put_bytes(&chunk, &bytes).await.unwrap();
    });
    let o = fsck(server.data.path(), &["--cache", "s3"], &env);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    assert!(
        out.contains(&format!("damaged: s3/{}", basename(&path))),
        "{out}"
    );
    let id = out
        .split("chunk ")
        .nth(1)
        .and_then(|rest| rest.split(" is corrupt").next())
        .unwrap_or_else(|| panic!("no corrupt chunk named: {out}"))
        .to_owned();
    let o = fsck(server.data.path(), &["--cache", "s3", "--repair"], &env);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    assert!(
        out.contains(&format!(
            "unpublished: s3/{} (its NAR is damaged)",
            basename(&path)
        )),
        "{out}"
    );
    // The chunk is forgotten; its pack, which holds the NAR's other chunks, stays.
    assert!(
        out.contains(&format!("forgot corrupt chunk {id} (stored in a pack)")),
        "{out}"
    );
    // Once the repair returns, the server has forgotten the path (it waited out the TTL).
    let (status, _) = server.http("GET", &format!("/s3/{}.narinfo", hash_part(&path)), None);
    assert_eq!(status, 404);
    let (status, _) = server.http("GET", &format!("/s3/{}.narinfo", hash_part(&other)), None);
    assert_eq!(status, 200);
    // Pushed again, the pack is written anew (the same bytes, the same name: the damaged
    // object is replaced) and the cache is sound.
    nix_copy(&server, "s3", &netrc, &path);
    assert!(garage_keys(&garage).contains(&chunk));
    let o = fsck(server.data.path(), &[], &env);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(server.stop().success());
}
