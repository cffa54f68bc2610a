//! Content-addressed derivations with real Nix 2.8 (`experimental-features = ca-derivations`):
//! a CA derivation with a CA dependency is pushed with Nix's own uploader (`nix copy --to
//! http://…`) and with `larder push`; a second store whose only substituter is larder builds
//! the same derivation without building anything; a tampered `.doi` is refused; what a
//! consumer trusting another key does; private caches; deletion takes realisations along.
#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use larder_testkit::nix::NIX_CONFIG_BASE;

/// Nix with CA derivations on and no substituter.
fn ca_conf() -> String {
    format!("{NIX_CONFIG_BASE} ca-derivations\nsubstituters =")
}

/// A CA derivation whose output references the output of a CA dependency.
fn write_expr(dir: &Path, tag: &str) -> PathBuf {
    let ca = "__contentAddressed = true; outputHashMode = \"recursive\"; \
              outputHashAlgo = \"sha256\"; system = builtins.currentSystem; \
              builder = \"/bin/sh\";";
    let expr = format!(
        "let dep = derivation {{ name = \"ca-dep-{tag}\"; {ca} args = [\"-c\" \"echo dep {tag} > $out\"]; }};\n\
         in derivation {{ name = \"ca-top-{tag}\"; {ca} args = [\"-c\" \"echo ${{dep}} > $out\"]; }}\n"
    );
    let file = dir.join("ca.nix");
    std::fs::write(&file, expr).unwrap();
    file
}

/// Run a Nix command with `conf` and a fresh cache directory under `work`.
fn run(program: &str, args: &[&str], conf: &str, work: &Path) -> Output {
    let xdg = tempfile::tempdir_in(work).unwrap();
    larder_testkit::nix::command(program)
        .args(args)
        .env("NIX_CONFIG", conf)
        .env("XDG_CACHE_HOME", xdg.path())
        .output()
        .unwrap()
}

fn ok(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The output ids (`sha256:…!out`) the local store realised to `out_path`.
fn local_ids(out_path: &str) -> Vec<String> {
    let db = larder_client::local_store::default_db_path();
    let mut store = larder_client::local_store::LocalStore::open_db(&db).unwrap();
    let path = larder_nix::StorePath::from_absolute(out_path).unwrap();
    store
        .realisations_of(&[path])
        .unwrap()
        .into_iter()
        .filter(|r| r.out_path.to_absolute() == out_path)
        .map(|r| r.id.to_string())
        .collect()
}

/// A second machine: a chroot store whose only substituter is `url`, trusting `key`, builds
/// `expr` with `--max-jobs 0` (fails if anything would have to be built).
fn consumer_build(work: &Path, url: &str, key: &str, expr: &Path) -> Output {
    let store = tempfile::tempdir_in(work).unwrap();
    let conf = format!(
        "{}\nsubstituters = {url}\ntrusted-public-keys = {key}\nrequire-sigs = true",
        ca_conf().replace("\nsubstituters =", "")
    );
    run(
        "nix-build",
        &[
            "--store",
            store.path().to_str().unwrap(),
            "--no-out-link",
            "--max-jobs",
            "0",
            expr.to_str().unwrap(),
        ],
        &conf,
        work,
    )
}

#[test]
fn ca_derivations_round_trip_through_larder() {
    require_nix();
    let server = Server::start();
    let work = private_tempdir();
    let tag = unique_tag();
    let expr = write_expr(work.path(), &tag);
    let conf = ca_conf();
    let top = ok(
        &run(
            "nix-build",
            &["--no-out-link", expr.to_str().unwrap()],
            &conf,
            work.path(),
        ),
        "nix-build",
    )
    .trim()
    .to_owned();
    let dep = std::fs::read_to_string(&top).unwrap().trim().to_owned();
    assert!(dep.contains(&format!("ca-dep-{tag}")), "{dep}");
    let top_ids = local_ids(&top);
    let dep_ids = local_ids(&dep);
    assert!(
        !top_ids.is_empty() && !dep_ids.is_empty(),
        "{top_ids:?} {dep_ids:?}"
    );
    // 1. Nix's own uploader.
    let by_nix = server.create_cache("by-nix", &[]);
    let nix_key = by_nix["public_key"].as_str().unwrap().to_owned();
    let push = server.token("push", "by-nix");
    let netrc = server.netrc(work.path(), "netrc", &push);
    let nix_url = format!("{}/by-nix", server.url);
    ok(
        &run(
            "nix",
            &[
                "copy",
                "--option",
                "netrc-file",
                netrc.to_str().unwrap(),
                "--to",
                &nix_url,
                "-f",
                expr.to_str().unwrap(),
            ],
            &conf,
            work.path(),
        ),
        "nix copy --to larder",
    );
    // 2. larder push.
    let by_larder = server.create_cache("by-larder", &[]);
    let larder_key = by_larder["public_key"].as_str().unwrap().to_owned();
    let push2 = server.token("push", "by-larder");
    let out = server.cli_ok(&push2, &["push", "by-larder", &top, "--json"]);
    assert!(out.contains("\"failed\":0"), "{out}");
    let larder_url = format!("{}/by-larder", server.url);

    // larder push wrote every realisation of the closure; Nix's uploader those of the
    // installable's outputs and their dependencies. Each is served signed by the cache,
    // naming its out path.
    for (cache, key) in [("by-nix", &nix_key), ("by-larder", &larder_key)] {
        for (ids, path) in [(&top_ids, &top), (&dep_ids, &dep)] {
            let mut found = 0;
            for id in ids {
                let url = format!("/{cache}/realisations/{id}.doi");
                let (code, body) = server.http("GET", &url, None);
                if code == 404 && cache == "by-nix" {
                    continue;
                }
                assert_eq!(code, 200, "{cache} {id}: {body}");
                found += 1;
                let r = larder_nix::realisation::Realisation::parse(body.as_bytes()).unwrap();
                assert_eq!(&r.out_path.to_absolute(), path);
                assert!(r.verify(&key.parse().unwrap()), "{cache}: {body}");
                assert_eq!(head(&server, &url, None), 200);
            }
            assert!(found > 0, "{cache} has no realisation of {path}");
        }
    }

    // 3. A second store, larder as its only substituter, builds nothing (--max-jobs 0).
    for (url, key) in [(&nix_url, &nix_key), (&larder_url, &larder_key)] {
        let o = consumer_build(work.path(), url, key, &expr);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "consumer of {url}: {stderr}");
        assert!(!stderr.contains("building '"), "{stderr}");
        assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("ca-top-{tag}")));
    }
    // 4. A tampered .doi is refused: the cache's signature no longer matches the content.
    let id = &top_ids[0];
    let (_, body) = server.http("GET", &format!("/by-larder/realisations/{id}.doi"), None);
    let top_base = top.trim_start_matches("/nix/store/");
    let dep_base = dep.trim_start_matches("/nix/store/");
    let tampered = body.replace(top_base, dep_base);
    assert_ne!(tampered, body);
    let (code, msg) = put(&server, "by-larder", id, &tampered, &push2);
    assert_eq!(code, 400, "{msg}");
    assert!(msg.contains("does not match its content"), "{msg}");
    // … as is one whose id is not its file name's, malformed JSON, a path not in the cache.
    let (code, msg) = put(&server, "by-larder", &dep_ids[0], &body, &push2);
    assert_eq!(code, 400, "{msg}");
    let (code, msg) = put(&server, "by-larder", id, "{\"id\":", &push2);
    assert_eq!(code, 400, "{msg}");
    let other = format!(
        "{{\"dependentRealisations\":{{}},\"id\":\"sha256:{}!out\",\"outPath\":\"{}\",\"signatures\":[]}}",
        "0".repeat(64),
        "00000000000000000000000000000000-missing"
    );
    let (code, msg) = put(
        &server,
        "by-larder",
        &format!("sha256:{}!out", "0".repeat(64)),
        &other,
        &push2,
    );
    assert_eq!(code, 400, "{msg}");
    assert!(msg.contains("not in cache"), "{msg}");
    // An existing realisation is never changed to another path.
    let unsigned = tampered.replace(
        &tampered[tampered.find("\"signatures\":").unwrap()..],
        "\"signatures\":[]}",
    );
    let (code, msg) = put(&server, "by-larder", id, &unsigned, &push2);
    assert_eq!(code, 409, "{msg}");
    // Without a token, nothing is written.
    let (code, _) = put(&server, "by-larder", id, &body, "");
    assert_eq!(code, 401);

    // 5. A consumer trusting another key. Nix 2.8 does not check a realisation's signatures
    // when it substitutes (DrvOutputSubstitutionGoal::outPathValid calls the one-argument
    // registerDrvOutput, which checks nothing), and a content-addressed path needs no
    // signature (ValidPathInfo::checkSignatures counts it as fully signed). So this consumer
    // still substitutes: what stands between it and a forged realisation is the server, which
    // only serves realisations signed by the cache's key (step 4 and the README). Asserted, so
    // that a Nix that starts checking shows up here.
    let wrong = wrong_key(work.path());
    let o = consumer_build(work.path(), &nix_url, &wrong, &expr);
    assert!(
        o.status.success(),
        "Nix 2.8 now checks realisation signatures? {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // 6. Deleting the paths deletes their realisations.
    let admin = server.admin_token.clone();
    server.cli_ok(
        &admin,
        &["path", "delete", "by-larder", &dep, "--with-referrers"],
    );
    for id in top_ids.iter().chain(&dep_ids) {
        let (code, _) = server.http("GET", &format!("/by-larder/realisations/{id}.doi"), None);
        assert_eq!(code, 404, "{id}");
    }
    let _ = std::fs::remove_dir_all(work.path().join("store"));
}

/// A private cache's realisations answer outsiders exactly as a cache that does not exist.
#[test]
fn private_cache_realisations_are_hidden() {
    require_nix();
    let server = Server::start();
    let work = private_tempdir();
    let tag = unique_tag();
    let expr = write_expr(work.path(), &tag);
    let top = ok(
        &run(
            "nix-build",
            &["--no-out-link", expr.to_str().unwrap()],
            &ca_conf(),
            work.path(),
        ),
        "nix-build",
    )
    .trim()
    .to_owned();
    server.create_cache("secret", &["--private"]);
    let push = server.token("push", "secret");
    server.cli_ok(&push, &["push", "secret", &top]);
    let id = &local_ids(&top)[0];
    let (code, _) = server.http(
        "GET",
        &format!("/secret/realisations/{id}.doi"),
        Some(&push),
    );
    assert_eq!(code, 200);
    server.create_cache("other", &[]);
    let other = server.token("pull", "other");
    let hidden_path = format!("/secret/realisations/{id}.doi");
    let missing_path = format!("/no-such-cache/realisations/{id}.doi");
    for token in [None, Some(other.as_str())] {
        let hidden = server.http("GET", &hidden_path, token);
        // The same answer, naming the cache the request named.
        let missing = server.http("GET", &missing_path, token);
        assert_eq!(hidden.0, missing.0, "{token:?}");
        assert_eq!(hidden.1, missing.1.replace("no-such-cache", "secret"));
        assert!(matches!(hidden.0, 401 | 403 | 404), "{hidden:?}");
        assert_eq!(
            head(&server, &hidden_path, token),
            head(&server, &missing_path, token)
        );
    }
    eprintln!(
        "anonymous GET of a private cache's realisation: {:?}",
        server.http("GET", &hidden_path, None)
    );
}

/// The status of a `HEAD` request (curl's `-X HEAD` would wait for the body it announces).
fn head(server: &Server, path: &str, token: Option<&str>) -> u16 {
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-s",
        "-I",
        "-o",
        "/dev/null",
        "--max-time",
        "30",
        "-w",
        "%{http_code}",
    ]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd.arg(format!("{}{path}", server.url)).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn put(server: &Server, cache: &str, id: &str, body: &str, token: &str) -> (u16, String) {
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-s",
        "-X",
        "PUT",
        "--max-time",
        "30",
        "-w",
        "\n%{http_code}",
    ])
    .args(["--data-binary", body]);
    if !token.is_empty() {
        cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let out = cmd
        .arg(format!("{}/{cache}/realisations/{id}.doi", server.url))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// A public key no cache signs with.
fn wrong_key(work: &Path) -> String {
    let conf = ca_conf();
    let secret = ok(
        &run(
            "nix",
            &["key", "generate-secret", "--key-name", "wrong-1"],
            &conf,
            work,
        ),
        "nix key generate-secret",
    );
    let file = work.join("wrong.sec");
    std::fs::write(&file, &secret).unwrap();
    let o = larder_testkit::nix::command("nix")
        .args(["key", "convert-secret-to-public"])
        .env("NIX_CONFIG", &conf)
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    ok(&o, "nix key convert-secret-to-public").trim().to_owned()
}
