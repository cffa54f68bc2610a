//! `larder import` with real Nix: a `file://` cache made by `nix copy` (the oracle's closure,
//! signed by the oracle's key) is imported; the oracle then verifies the imported cache with
//! the original key (signatures kept) and with the cache's own key (added). Also: resuming,
//! an HTTP source, and a corrupted NAR in the source.

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The oracle's closure in a fresh work dir, pushed to `file://DIR` with `compression`.
fn oracle_file_cache(work: &Path, compression: &str) -> std::path::PathBuf {
    let o = oracle(&["build"], work, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dir = work.join(format!("file-cache-{compression}"));
    let o = oracle(
        &["push-file", dir.to_str().unwrap(), compression],
        work,
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    dir
}

fn verify(work: &Path, cache_url: &str, key: &str) {
    let o = oracle(
        &["verify"],
        work,
        &[
            ("CACHE_URL", cache_url.to_owned()),
            ("TRUSTED_PUBLIC_KEY", key.to_owned()),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "oracle verify failed:\n{err}");
    assert!(err.contains(&format!("PASS {cache_url}")), "{err}");
}

fn closure_len(work: &Path) -> usize {
    std::fs::read_to_string(work.join("closure"))
        .unwrap()
        .lines()
        .count()
}

fn summary(stdout: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(stdout);
    let last = text.lines().last().unwrap_or("{}").to_owned();
    serde_json::from_str(&last).unwrap()
}

#[test]
fn import_of_a_nix_copy_file_cache_passes_the_oracle_and_resumes() {
    require_nix();
    let server = Server::start();
    let info = server.create_cache("imported", &[]);
    let cache_key = info["public_key"].as_str().unwrap().to_owned();
    let token = server.token("push", "imported");
    let work = tempfile::tempdir().unwrap();
    let dir = oracle_file_cache(work.path(), "xz");
    let n = closure_len(work.path());
    let source = format!("file://{}", dir.display());

    let o = server.cli(&token, &["import", "imported", &source, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = summary(&o.stdout);
    assert_eq!(s["event"], "summary");
    assert_eq!(s["pushed"], n, "{s}");
    assert_eq!(s["failed"], 0, "{s}");

    let url = format!("{}/imported", server.url);
    let oracle_key = std::fs::read_to_string(work.path().join("key.pub")).unwrap();
    // The source's signatures are kept…
    verify(work.path(), &url, oracle_key.trim());
    // …and the cache signs too.
    verify(work.path(), &url, &cache_key);

    // A second run finds everything there.
    let o = server.cli(&token, &["import", "imported", &source, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = summary(&o.stdout);
    assert_eq!(s["pushed"], 0, "{s}");
    assert_eq!(s["skipped"], n, "{s}");
}

fn http_server(dir: &Path) -> (Child, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let child = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .arg("--directory")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "http.server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, url)
}

#[test]
fn import_from_http_takes_roots_and_their_closures() {
    require_nix();
    let server = Server::start();
    let info = server.create_cache("fromhttp", &[]);
    let cache_key = info["public_key"].as_str().unwrap().to_owned();
    let token = server.token("push", "fromhttp");
    let work = tempfile::tempdir().unwrap();
    let dir = oracle_file_cache(work.path(), "zstd");
    let (mut http, source) = http_server(&dir);
    let top = std::fs::read_to_string(work.path().join("top")).unwrap();

    // No listing over HTTP: without roots the import says what to do.
    let o = server.cli(&token, &["import", "fromhttp", &source]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("name the store paths"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Named through a ./result-style symlink, as push and pin accept.
    let link = work.path().join("result");
    std::os::unix::fs::symlink(top.trim(), &link).unwrap();
    let o = server.cli(
        &token,
        &[
            "import",
            "fromhttp",
            &source,
            link.to_str().unwrap(),
            "--json",
        ],
    );
    let _ = http.kill();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(summary(&o.stdout)["pushed"], closure_len(work.path()));
    verify(work.path(), &format!("{}/fromhttp", server.url), &cache_key);
}

#[test]
fn a_corrupt_nar_in_the_source_is_refused_and_nothing_depending_on_it_is_published() {
    require_nix();
    let server = Server::start();
    server.create_cache("strict", &[]);
    let token = server.token("push", "strict");
    let work = tempfile::tempdir().unwrap();
    let dir = oracle_file_cache(work.path(), "none");
    // Flip one content byte of the big path's NAR (its structure stays valid).
    let ni = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "narinfo")
                && std::fs::read_to_string(p)
                    .unwrap()
                    .lines()
                    .any(|l| l.starts_with("StorePath:") && l.contains("-big-"))
        })
        .unwrap();
    let text = std::fs::read_to_string(&ni).unwrap();
    let nar_url = text.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap();
    let big = text
        .lines()
        .find_map(|l| l.strip_prefix("StorePath: "))
        .unwrap()
        .to_owned();
    let nar = dir.join(nar_url);
    let mut bytes = std::fs::read(&nar).unwrap();
    let k = bytes.len() - 100;
    bytes[k] ^= 1;
    std::fs::write(&nar, bytes).unwrap();

    let o = server.cli(
        &token,
        &["import", "strict", &format!("file://{}", dir.display())],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(&big) && err.contains("FileHash"), "{err}");
    let top = std::fs::read_to_string(work.path().join("top")).unwrap();
    let xdg = tempfile::tempdir().unwrap();
    let url = format!("{}/strict", server.url);
    for p in [&big, top.trim()] {
        let o = nix(&["path-info", "--store", &url, p], xdg.path());
        assert!(!o.status.success(), "{p} was published");
    }
    // What does not depend on it is there.
    let leaf = std::fs::read_to_string(work.path().join("closure"))
        .unwrap()
        .lines()
        .find(|l| l.contains("-leaf-"))
        .unwrap()
        .to_owned();
    let o = nix(&["path-info", "--store", &url, &leaf], xdg.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
