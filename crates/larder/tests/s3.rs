//! larder on S3-compatible object storage: a real Garage started by the test (see
//! `larder-testkit`), a real `larder serve` with `--storage s3://…`, and real Nix as the judge.
//! - the oracle passes through a server whose NARs live in Garage (Nix's uploader and
//!   `larder push`, single and multi-part), and nothing lands in the data directory;
//! - `nar_redirect = presigned`: Nix follows the redirects, Range still works, HEAD is served;
//! - Garage killed mid-traffic: 503 within seconds, no narinfo for a NAR that never reached
//!   the bucket, and after Garage restarts pushes and pulls work again with the same server.

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

use std::time::{Duration, Instant};

use common::*;
use larder_testkit::garage::Garage;

fn s3_server(garage: &Garage, extra: &[&str]) -> Server {
    let url = garage.storage_url();
    let mut args = vec!["--storage", &url];
    args.extend_from_slice(extra);
    Server::start_env(&args, &garage.env())
}

/// Run the oracle: build a fresh closure, push it with `push_cmd`, verify with real Nix.
fn oracle_push(server: &Server, cache: &str, key: &str, push_cmd: String) -> tempfile::TempDir {
    let work = tempfile::tempdir().unwrap();
    let cache_url = format!("{}/{cache}", server.url);
    oracle_pass(&work.path().join("oracle"), &cache_url, key, Some(push_cmd));
    work
}

fn nix_copy_push(server: &Server, cache: &str, dir: &std::path::Path) -> String {
    let netrc = server.netrc(dir, "push.netrc", &server.token("push", cache));
    format!(
        "XDG_CACHE_HOME=$(mktemp -d) nix copy --option netrc-file {} --to \"$CACHE_URL\" \"$TOP\"",
        netrc.display()
    )
}

fn larder_push(server: &Server, cache: &str, dir: &std::path::Path, env: &str) -> String {
    format!(
        "env -u LARDER_CONFIG HOME={home} LARDER_SERVER={url} LARDER_TOKEN={token} {env} {bin} push {cache} \"$TOP\"",
        home = dir.display(),
        url = server.url,
        token = server.token("push", cache),
        bin = larder_bin(),
    )
}

fn public_key(info: &serde_json::Value) -> String {
    info["public_key"].as_str().unwrap().to_owned()
}

#[test]
fn garage_storage_passes_the_oracle() {
    require_nix();
    let garage = Garage::start();
    let server = s3_server(&garage, &[]);
    let scratch = tempfile::tempdir().unwrap();

    // Nix's own uploader (PUT nar, PUT narinfo).
    let key = public_key(&server.create_cache("nixcopy", &[]));
    oracle_push(
        &server,
        "nixcopy",
        &key,
        nix_copy_push(&server, "nixcopy", scratch.path()),
    );
    let after_first = garage_keys(&garage).len();
    assert!(after_first >= 20, "{after_first} objects in the bucket");

    // larder push with 64 KiB parts: the 1 MiB path goes up in 16+ parts, stored as as many
    // chunks, served back to back to Nix.
    let key = public_key(&server.create_cache("parts", &[]));
    oracle_push(
        &server,
        "parts",
        &key,
        larder_push(
            &server,
            "parts",
            scratch.path(),
            "LARDER_PUSH_PART_SIZE=64KiB LARDER_PUSH_NO_CHUNKING=1",
        ),
    );
    let after_second = garage_keys(&garage).len();
    assert!(
        after_second > after_first,
        "nothing stored: {after_first} → {after_second} objects"
    );
    let parts = server.requests_to("/multipart/{id}/parts/{n}");
    assert!(
        parts >= 16,
        "expected the big NAR in 16+ parts, found {parts}"
    );
    // Nothing but staging space is used locally.
    assert!(
        !server.data.path().join("store").exists(),
        "objects were written to the data directory"
    );
    assert!(server.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_redirects_work_with_nix_and_keep_range() {
    require_nix();
    let garage = Garage::start();
    let server = s3_server(&garage, &["--nar-redirect", "presigned"]);
    let scratch = tempfile::tempdir().unwrap();
    let key = public_key(&server.create_cache("direct", &[]));
    let push = nix_copy_push(&server, "direct", scratch.path());
    let work = tokio::task::spawn_blocking({
        let (server_url, key) = (server.url.clone(), key.clone());
        move || {
            // The oracle's Nix downloads every NAR through the redirect.
            let work = tempfile::tempdir().unwrap();
            let cache_url = format!("{server_url}/direct");
            oracle_pass(&work.path().join("oracle"), &cache_url, &key, Some(push));
            work
        }
    })
    .await
    .unwrap();

    // A NAR of one object (the top path's, a few KiB): a redirect to Garage, a HEAD answered
    // here, Range through the redirect. The big path's NAR is many chunks, stored together in
    // one pack that is exactly its file: redirected too.
    let top = std::fs::read_to_string(work.path().join("oracle/top")).unwrap();
    let refs = std::fs::read_to_string(format!("{}/refs", top.trim())).unwrap();
    let big = refs
        .split_whitespace()
        .find(|p| p.contains("-big-"))
        .unwrap();
    let hash_of = |p: &str| {
        p.trim_start_matches("/nix/store/")
            .split('-')
            .next()
            .unwrap()
            .to_owned()
    };
    let nar_of = |hash: String| {
        let server_url = server.url.clone();
        async move {
            let narinfo = reqwest::get(format!("{server_url}/direct/{hash}.narinfo"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let field = |k: &str| {
                narinfo
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{k}: ")))
                    .unwrap()
                    .to_owned()
            };
            let file_size: u64 = field("FileSize").parse().unwrap();
            (format!("{server_url}/direct/{}", field("URL")), file_size)
        }
    };
    let (big_url, big_size) = nar_of(hash_of(big)).await;
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(&big_url)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        307,
        "a NAR whose chunks are stored together is one object"
    );
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let body = reqwest::get(&location)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body.len() as u64, big_size);
    let (nar_url, file_size) = nar_of(hash_of(top.trim())).await;

    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_follow.get(&nar_url).send().await.unwrap();
    assert_eq!(r.status(), 307);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&garage.endpoint()), "{location}");
    assert!(location.contains("X-Amz-Signature="), "{location}");
    assert!(!location.contains(&garage.secret_access_key));
    assert_eq!(r.headers()["cache-control"], "no-store");
    let r = no_follow.head(&nar_url).send().await.unwrap();
    assert_eq!(r.status(), 200, "HEAD is answered by larder");
    assert_eq!(
        r.headers()["content-length"],
        file_size.to_string().as_str()
    );

    let follow = reqwest::Client::new();
    let whole = follow.get(&nar_url).send().await.unwrap();
    assert_eq!(whole.status(), 200);
    let whole = whole.bytes().await.unwrap();
    assert_eq!(whole.len() as u64, file_size);
    let r = follow
        .get(&nar_url)
        .header("Range", format!("bytes=10-{}", file_size / 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.bytes().await.unwrap(),
        whole.slice(10..(file_size / 2 + 1) as usize)
    );

    // A private cache: anonymous gets 401 (no redirect), Nix with a pull token in its netrc
    // follows the redirect (curl sends the netrc's credentials to Garage too, which ignores
    // them in favour of the presigned signature).
    server.create_cache("hidden", &["--private"]);
    let push_token = server.token("push", "hidden");
    let path = build_file("presigned-private", "behind a redirect");
    server.cli_ok(&push_token, &["push", "hidden", &path]);
    let hash = path
        .trim_start_matches("/nix/store/")
        .split('-')
        .next()
        .unwrap();
    let narinfo_url = format!("{}/hidden/{hash}.narinfo", server.url);
    assert_eq!(
        no_follow.get(&narinfo_url).send().await.unwrap().status(),
        401
    );
    let netrc = server.netrc(
        scratch.path(),
        "pull.netrc",
        &server.token("pull", "hidden"),
    );
    let store = tempfile::tempdir().unwrap();
    let xdg = tempfile::tempdir().unwrap();
    let out = larder_testkit::nix::command("nix")
        .args(["copy", "--no-check-sigs", "--option", "netrc-file"])
        .arg(&netrc)
        .args(["--from", &format!("{}/hidden", server.url), "--to"])
        .arg(store.path())
        .arg(&path)
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("XDG_CACHE_HOME", xdg.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nix copy from a private cache through a redirect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let copied = std::fs::read_to_string(store.path().join(path.trim_start_matches('/'))).unwrap();
    assert_eq!(copied.trim(), "behind a redirect");
}

async fn status_of(client: &reqwest::Client, url: &str) -> (u16, String) {
    match client.get(url).send().await {
        Ok(r) => {
            let s = r.status().as_u16();
            (s, r.text().await.unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_outage_gets_503_and_recovers_without_restart() {
    require_nix();
    let mut garage = Garage::start();
    let server = s3_server(&garage, &[]);
    let key = public_key(&server.create_cache("flaky", &[]));
    let push_token = server.token("push", "flaky");
    // Larger than what the server keeps in memory (64 KiB) and incompressible: its NAR is
    // read from the object store at every download.
    let before = build_expr(&format!(
        "derivation {{ name = \"before-outage-{}\"; system = builtins.currentSystem; \
         builder = \"/bin/sh\"; args = [\"-c\" \"/usr/bin/head -c 300000 /dev/urandom > $out\"]; }}",
        unique_tag()
    ))
    .remove(0);
    server.cli_ok(&push_token, &["push", "flaky", &before]);
    // A small NAR downloaded once is kept in memory, and stays servable through the outage.
    let small = build_file("small-before-outage", "kept in memory");
    server.cli_ok(&push_token, &["push", "flaky", &small]);
    let hash_of = |p: &str| {
        p.trim_start_matches("/nix/store/")
            .split('-')
            .next()
            .unwrap()
            .to_owned()
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let narinfo_url = format!("{}/flaky/{}.narinfo", server.url, hash_of(&before));
    let narinfo = client
        .get(&narinfo_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let nar_url = format!(
        "{}/flaky/{}",
        server.url,
        narinfo
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .unwrap()
    );
    assert_eq!(status_of(&client, &nar_url).await.0, 200);
    let small_narinfo = client
        .get(format!("{}/flaky/{}.narinfo", server.url, hash_of(&small)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let small_nar_url = format!(
        "{}/flaky/{}",
        server.url,
        small_narinfo
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .unwrap()
    );
    assert_eq!(status_of(&client, &small_nar_url).await.0, 200);

    // Traffic runs while Garage dies: every answer is a 200 or a 503, never another error.
    let traffic = tokio::spawn({
        let (client, nar_url) = (client.clone(), nar_url.clone());
        async move {
            let mut seen = Vec::new();
            let until = Instant::now() + Duration::from_secs(4);
            while Instant::now() < until {
                seen.push(status_of(&client, &nar_url).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    garage.stop();
    let seen = traffic.await.unwrap();
    assert!(
        seen.iter().all(|(s, _)| *s == 200 || *s == 503),
        "unexpected answers during the outage: {seen:?}"
    );
    assert!(seen.iter().any(|(s, _)| *s == 503), "no 503 seen: {seen:?}");

    // Fail fast, with a short reason.
    let t = Instant::now();
    let (status, body) = status_of(&client, &nar_url).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("object store unavailable"), "{body}");
    assert_eq!(
        status_of(&client, &small_nar_url).await.0,
        200,
        "a small NAR in memory is served while the store is down"
    );
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "503 took {:?}",
        t.elapsed()
    );
    let (status, body) = status_of(&client, &format!("{}/healthz", server.url)).await;
    assert_eq!(status, 503);
    assert!(body.contains("object store unavailable"), "{body}");

    // Pushes fail, through Nix's uploader and larder push, and leave no narinfo behind.
    let during = build_file("during-outage", "pushed during the outage");
    let scratch = tempfile::tempdir().unwrap();
    let netrc = server.netrc(scratch.path(), "push.netrc", &push_token);
    let xdg = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let out = larder_testkit::nix::command("timeout")
        .args(["120", "nix", "copy", "--option", "netrc-file"])
        .arg(&netrc)
        .args(["--to", &format!("{}/flaky", server.url), &during])
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("XDG_CACHE_HOME", xdg.path())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "nix copy succeeded with the object store down"
    );
    // Refused before its body is read: Nix's retries (which re-send a PUT without its body)
    // get their 503 at once instead of stalling.
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "nix copy took {:?} to fail: {}",
        t.elapsed(),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = server.cli(&push_token, &["push", "flaky", &during]);
    assert!(
        !out.status.success(),
        "larder push succeeded with the object store down"
    );
    let during_narinfo = format!("{}/flaky/{}.narinfo", server.url, hash_of(&during));
    assert_eq!(status_of(&client, &during_narinfo).await.0, 404);

    // Garage returns: the same larder process serves and stores again.
    garage.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_of(&client, &format!("{}/healthz", server.url))
        .await
        .0
        != 200
    {
        assert!(Instant::now() < deadline, "healthz did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(status_of(&client, &during_narinfo).await.0, 404);
    assert_eq!(status_of(&client, &nar_url).await.0, 200);
    server.cli_ok(&push_token, &["push", "flaky", &during]);
    assert_eq!(status_of(&client, &during_narinfo).await.0, 200);
    // Real Nix pushes and pulls a whole closure again.
    let push = nix_copy_push(&server, "flaky", scratch.path());
    let server_ref = &server;
    tokio::task::block_in_place(|| {
        oracle_push(server_ref, "flaky", &key, push);
    });
}

/// A wrong configuration stops `larder serve` at start with a clear reason, and the secret
/// never appears in what it prints.
#[test]
fn misconfigured_s3_storage_fails_at_start_without_leaking_the_secret() {
    let garage = Garage::start();
    let run = |storage: &str, secret: &str| {
        let data = tempfile::tempdir().unwrap();
        // `timeout`: a server that starts anyway must fail the test, not hang it.
        let out = larder_testkit::nix::command("timeout")
            .args([
                "20",
                larder_bin(),
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data",
            ])
            .arg(data.path())
            .args(["--storage", storage])
            .env_remove("LARDER_SERVE_CONFIG")
            .env("AWS_ACCESS_KEY_ID", &garage.access_key_id)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("LARDER_LOG", "debug")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(1),
            "larder serve with {storage}: {stderr}"
        );
        stderr
    };
    let wrong = "0".repeat(64);
    let stderr = run(&garage.storage_url(), &wrong);
    assert!(stderr.contains("credentials were rejected"), "{stderr}");
    assert!(!stderr.contains(&wrong), "the secret was printed: {stderr}");
    let missing = garage
        .storage_url()
        .replace("s3://larder", "s3://no-such-bucket");
    let stderr = run(&missing, &garage.secret_access_key);
    assert!(stderr.contains("bucket does not exist"), "{stderr}");
    assert!(!stderr.contains(&garage.secret_access_key), "{stderr}");
    let stderr = run("s3://larder?endpoint=http://127.0.0.1:1&color=blue", &wrong);
    assert!(stderr.contains("unknown parameter \"color\""), "{stderr}");
}

/// The migration path: an embedded deployment's objects copied into Garage with
/// `larder migrate`, then the same data directory served with `--storage s3://…` to real Nix.
#[test]
fn migrate_embedded_objects_to_garage_then_serve_from_it() {
    use std::io::{BufRead, BufReader};
    require_nix();
    let garage = Garage::start();
    let mut first = Server::start();
    first.create_cache("moving", &[]);
    let push = first.token("push", "moving");
    let path = build_file("migrated", "moved to S3");
    first.cli_ok(&push, &["push", "moving", &path]);
    let data = first.data.path().to_owned();
    let _ = first.child.kill();
    let _ = first.child.wait();

    let migrate = |extra: &[&str]| {
        let mut cmd = larder_testkit::nix::command(larder_bin());
        cmd.args(["migrate", "--from"])
            .arg(format!("file://{}", data.join("store").display()))
            .args(["--to", &garage.storage_url()])
            .args(extra);
        for (k, v) in garage.env() {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let report = migrate(&["--json"]);
    assert!(report["copied"].as_u64().unwrap() >= 1, "{report}");
    assert_eq!(report["skipped"], 0);
    // Resumable: a second run finds everything there.
    let again = migrate(&["--json"]);
    assert_eq!(again["copied"], 0, "{again}");
    assert_eq!(again["skipped"], report["copied"]);
    // Mixing kinds is a usage mistake, said plainly.
    let out = larder_testkit::nix::command(larder_bin())
        .args([
            "migrate",
            "--from",
            "sqlite:///x.db",
            "--to",
            &garage.storage_url(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("separately"));

    // The objects leave the data directory; the same metadata is served from Garage.
    std::fs::remove_dir_all(data.join("store")).unwrap();
    let url = garage.storage_url();
    let mut cmd = larder_testkit::nix::command(larder_bin());
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .args(["--storage", &url])
        .env_remove("LARDER_SERVE_CONFIG")
        .stderr(std::process::Stdio::piped());
    for (k, v) in garage.env() {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let base = loop {
        let line = lines.next().expect("server exited").unwrap();
        if let Some(u) = line.strip_prefix("larder: listening on ") {
            break u.to_owned();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    let store = tempfile::tempdir().unwrap();
    let xdg = tempfile::tempdir().unwrap();
    let out = larder_testkit::nix::command("nix")
        .args([
            "copy",
            "--no-check-sigs",
            "--from",
            &format!("{base}/moving"),
            "--to",
        ])
        .arg(store.path())
        .arg(&path)
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("XDG_CACHE_HOME", xdg.path())
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let copied = std::fs::read_to_string(store.path().join(path.trim_start_matches('/'))).unwrap();
    assert_eq!(copied.trim(), "moved to S3");
}
