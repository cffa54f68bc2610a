//! Pull-through upstream caching with real Nix 2.8: a cache whose upstreams are nginx serving a
//! `file://` binary cache made by `nix copy` (signed with a key the test makes) and another
//! larder. A consumer store whose only substituter is larder substitutes a closure half pushed
//! to larder, half only upstream; a second consumer does not touch the upstream (nginx's access
//! log); a tampered upstream NAR is refused and not kept; a narinfo signed by an untrusted key
//! is not served; a private cache fetches nothing for outsiders; a push after a remembered miss
//! is served; with the upstreams down (one refusing connections, one never answering) local
//! paths are served and misses answered in bounded time.
#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

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

#[track_caller]
fn ok(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// nginx serving `root` on a free loopback port, logging every request to `log`.
struct Nginx {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Nginx {
    fn start(work: &Path, root: &Path) -> Nginx {
        let port = free_port();
        let prefix = work.join("nginx");
        std::fs::create_dir_all(prefix.join("logs")).unwrap();
        let log = prefix.join("access.log");
        let conf = prefix.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nuser root root;\npid {pid};\n\
                 error_log {err} warn;\nevents {{ worker_connections 64; }}\n\
                 http {{\n  access_log {log};\n  client_body_temp_path {tmp};\n  \
                 proxy_temp_path {tmp};\n  fastcgi_temp_path {tmp};\n  uwsgi_temp_path {tmp};\n  \
                 scgi_temp_path {tmp};\n  types {{ text/x-nix-narinfo narinfo; }}\n  \
                 server {{ listen 127.0.0.1:{port}; root {root}; }}\n}}\n",
                pid = prefix.join("nginx.pid").display(),
                err = prefix.join("error.log").display(),
                log = log.display(),
                tmp = prefix.join("tmp").display(),
                root = root.display(),
            ),
        )
        .unwrap();
        std::fs::create_dir_all(prefix.join("tmp")).unwrap();
        let nginx = ["/usr/sbin/nginx", "nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists() || *p == "nginx")
            .unwrap();
        let child = Command::new(nginx)
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx is required (apt-get install nginx; .ci/run installs it)");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Nginx { child, url, log }
    }

    /// The request lines nginx logged so far.
    fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Nix signing key pair made by `nix key`: (secret key file, public key).
fn key_pair(work: &Path, name: &str) -> (PathBuf, String) {
    let secret = ok(
        &run(
            "nix",
            &["key", "generate-secret", "--key-name", name],
            NIX_CONFIG,
            work,
        ),
        "nix key generate-secret",
    );
    let file = work.join(format!("{name}.sk"));
    std::fs::write(&file, secret.trim()).unwrap();
    let out = larder_testkit::nix::command("nix")
        .args(["key", "convert-secret-to-public"])
        .env("NIX_CONFIG", NIX_CONFIG)
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    (
        file,
        ok(&out, "nix key convert-secret-to-public")
            .trim()
            .to_owned(),
    )
}

/// Sign `paths` (and their closures) in the local store with `key`, and copy them into the
/// `file://` binary cache at `dir`.
fn sign_and_copy(work: &Path, key: &Path, dir: &Path, paths: &[&str]) {
    let mut sign = vec!["store", "sign", "-r", "-k", key.to_str().unwrap()];
    sign.extend_from_slice(paths);
    ok(&run("nix", &sign, NIX_CONFIG, work), "nix store sign");
    let to = format!("file://{}?compression=xz", dir.display());
    let mut copy = vec!["copy", "--to", to.as_str()];
    copy.extend_from_slice(paths);
    ok(
        &run("nix", &copy, NIX_CONFIG, work),
        "nix copy --to file://",
    );
}

/// Build `name` writing `content` (which may interpolate other paths, making references).
fn build(name: &str, tag: &str, content: &str) -> String {
    let expr = format!(
        "derivation {{ name = \"{name}-{tag}\"; system = builtins.currentSystem; \
         builder = \"/bin/sh\"; args = [\"-c\" \"echo '{content}' > $out\"]; }}"
    );
    build_expr(&expr).remove(0)
}

fn hash_of(path: &str) -> &str {
    &path["/nix/store/".len().."/nix/store/".len() + 32]
}

/// A consumer: a fresh chroot store whose only substituter is `url`, trusting `keys`,
/// realises `paths` (substitution only: nothing can be built, no derivation is there).
fn consume(work: &Path, url: &str, keys: &str, paths: &[&str]) -> Output {
    let store = tempfile::tempdir_in(work).unwrap();
    let conf = format!(
        "{NIX_CONFIG}\nsubstituters = {url}\ntrusted-public-keys = {keys}\nrequire-sigs = true\n\
         connect-timeout = 20",
    )
    .replace("\nsubstituters =\n", "\n");
    let mut args = vec!["--store", store.path().to_str().unwrap(), "-r"];
    args.extend_from_slice(paths);
    run("nix-store", &args, &conf, work)
}

/// `GET path` with curl: (curl's exit code, HTTP status, elapsed).
fn curl(url: &str) -> (i32, u16, Duration) {
    let t = Instant::now();
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "60",
            url,
        ])
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (out.status.code().unwrap_or(-1), code, t.elapsed())
}

fn listed(server: &Server, token: &str, cache: &str) -> Vec<serde_json::Value> {
    let out = server.cli_ok(token, &["ls", cache, "--all", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .cloned()
        .or_else(|| v["paths"].as_array().cloned())
        .unwrap()
}

#[test]
fn a_cache_pulls_through_from_nginx_and_larder_upstreams() {
    require_nix();
    let work = private_tempdir();
    let w = work.path();
    let tag = unique_tag();

    // The closure: `top` and `mid` are pushed to larder; `up2` and `up1` only upstream.
    let built = build_expr(&format!(
        "let mk = name: text: derivation {{ name = \"${{name}}-{tag}\"; \
         system = builtins.currentSystem; builder = \"/bin/sh\"; \
         args = [\"-c\" \"echo ${{text}} > $out\"]; }}; \
         up1 = mk \"up1\" \"leaf\"; up2 = mk \"up2\" \"needs ${{up1}}\"; \
         mid = mk \"mid\" \"needs ${{up2}}\"; top = mk \"top\" \"needs ${{mid}} ${{up1}}\"; \
         in [ up1 up2 mid top ]"
    ));
    let [up1, up2, mid, top] = <[String; 4]>::try_from(built).unwrap();
    let tampered = build("tampered", &tag, "changed on the way");
    let untrusted = build("untrusted", &tag, "signed by a stranger");
    let late = build("late", &tag, "pushed after a miss");

    let (upstream_sk, upstream_pk) = key_pair(w, &format!("upstream-{tag}-1"));
    let (stranger_sk, _) = key_pair(w, &format!("stranger-{tag}-1"));
    let file_cache = w.join("file-cache");
    sign_and_copy(w, &upstream_sk, &file_cache, &[&up2, &tampered]);
    sign_and_copy(w, &stranger_sk, &file_cache, &[&untrusted]);
    // Tamper with one NAR file: it becomes another path's (a valid xz NAR, so only the
    // hashes tell).
    let nar_of = |path: &str| {
        let ni =
            std::fs::read_to_string(file_cache.join(format!("{}.narinfo", hash_of(path)))).unwrap();
        file_cache.join(ni.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap())
    };
    std::fs::copy(nar_of(&up1), nar_of(&tampered)).unwrap();
    let mut nginx = Nginx::start(w, &file_cache);

    // The second upstream: another larder, with a path only it has.
    let other = Server::start();
    let other_cache = other.create_cache("up", &[]);
    let other_pk = other_cache["public_key"].as_str().unwrap().to_owned();
    let only_other = build("only-other", &tag, "from the other larder");
    let other_push = other.token("push", "up");
    other.cli_ok(&other_push, &["push", "up", &only_other]);

    // larder: the laptop's one substituter.
    let server = Server::start();
    let other_url = format!("{}/up", other.url);
    let laptop = server.create_cache(
        "laptop",
        &[
            "--upstream",
            &nginx.url,
            "--upstream",
            &other_url,
            "--upstream-key",
            &upstream_pk,
            "--upstream-key",
            &other_pk,
        ],
    );
    assert_eq!(laptop["upstreams"][0], nginx.url.as_str(), "{laptop}");
    let laptop_pk = laptop["public_key"].as_str().unwrap().to_owned();
    let push = server.token("push", "laptop");
    // `larder push` skips up2 and up1 (signed by a key the cache trusts as upstream).
    let out = server.cli(&push, &["push", "laptop", &top]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let local: Vec<_> = listed(&server, &push, "laptop");
    assert_eq!(
        local.len(),
        2,
        "only top and mid pushed: {local:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = format!("{}/laptop", server.url);
    let before = nginx.requests().len();

    // 1. A consumer trusting larder's key and the upstream's gets the whole closure.
    let keys = format!("{laptop_pk} {upstream_pk} {other_pk}");
    let t = Instant::now();
    ok(&consume(w, &url, &keys, &[&top]), "first consumer");
    eprintln!("first consumer (half from upstream): {:?}", t.elapsed());
    let fetched: Vec<String> = nginx.requests()[before..].to_vec();
    for p in [&up1, &up2] {
        assert!(
            fetched
                .iter()
                .any(|l| l.contains(&format!("/{}.narinfo", hash_of(p)))),
            "{p} asked upstream: {fetched:#?}"
        );
    }
    assert!(
        fetched.iter().filter(|l| l.contains("GET /nar/")).count() == 2,
        "two NARs fetched once each: {fetched:#?}"
    );
    assert!(
        !fetched
            .iter()
            .any(|l| l.contains(hash_of(&top)) || l.contains(hash_of(&mid))),
        "local paths are not asked upstream: {fetched:#?}"
    );
    // Kept, marked as from upstream; the upstream's signature kept beside larder's.
    let paths = listed(&server, &push, "laptop");
    assert_eq!(paths.len(), 4, "{paths:?}");
    for p in &paths {
        let from_upstream = p["upstream"].as_str();
        let name = p["store_path"].as_str().unwrap();
        if name == up1 || name == up2 {
            assert_eq!(from_upstream, Some(nginx.url.as_str()), "{p}");
        } else {
            assert_eq!(from_upstream, None, "{p}");
        }
    }
    let table = server.cli_ok(&push, &["ls", "laptop"]);
    let marked: Vec<&str> = table
        .lines()
        .filter(|l| l.ends_with("[upstream]"))
        .collect();
    assert_eq!(marked.len(), 2, "{table}");
    let (status, narinfo) = server.http("GET", &format!("/laptop/{}.narinfo", hash_of(&up1)), None);
    assert_eq!(status, 200);
    let sig_names: Vec<&str> = narinfo
        .lines()
        .filter_map(|l| l.strip_prefix("Sig: "))
        .filter_map(|s| s.split(':').next())
        .collect();
    assert!(
        sig_names.contains(&format!("upstream-{tag}-1").as_str()),
        "{narinfo}"
    );
    assert!(
        sig_names.contains(&laptop_pk.split(':').next().unwrap()),
        "{narinfo}"
    );

    // 2. The second consumer's fetch does not touch the upstream.
    let before = nginx.requests().len();
    let t = Instant::now();
    ok(&consume(w, &url, &keys, &[&top]), "second consumer");
    eprintln!("second consumer (all local): {:?}", t.elapsed());
    assert_eq!(nginx.requests()[before..], [] as [String; 0]);
    // Trusting only larder's key is enough: it signed what it verified.
    ok(
        &consume(w, &url, &laptop_pk, &[&top]),
        "consumer trusting larder only",
    );

    // 3. The other larder as upstream (after nginx, which does not have it).
    ok(
        &consume(w, &url, &keys, &[&only_other]),
        "from the other larder",
    );
    let paths = listed(&server, &push, "laptop");
    let kept = paths
        .iter()
        .find(|p| p["store_path"] == only_other.as_str())
        .unwrap();
    assert_eq!(kept["upstream"], other_url.as_str());

    // 4. A tampered upstream NAR: the download is cut (no clean body), nothing kept, and Nix
    // fails to substitute it.
    let (status, ni) = server.http(
        "GET",
        &format!("/laptop/{}.narinfo", hash_of(&tampered)),
        None,
    );
    assert_eq!(status, 200, "the narinfo itself is genuine");
    let nar = ni.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap();
    let (exit, _, _) = curl(&format!("{url}/{nar}"));
    assert_ne!(exit, 0, "curl must see a failed transfer");
    assert!(consume(w, &url, &keys, &[&tampered]).status.code() != Some(0));
    let paths = listed(&server, &push, "laptop");
    assert!(
        !paths.iter().any(|p| p["store_path"] == tampered.as_str()),
        "{paths:?}"
    );
    assert!(
        server.log().contains("upstream NAR refused"),
        "{}",
        server.log()
    );

    // 5. A narinfo signed by a key the cache does not trust is not served.
    let (status, _) = server.http(
        "GET",
        &format!("/laptop/{}.narinfo", hash_of(&untrusted)),
        None,
    );
    assert_eq!(status, 404);

    // 6. A private cache with the same upstream fetches nothing for an outsider.
    server.create_cache(
        "private",
        &[
            "--private",
            "--upstream",
            &nginx.url,
            "--upstream-key",
            &upstream_pk,
        ],
    );
    let before = nginx.requests().len();
    let (status, _) = server.http("GET", &format!("/private/{}.narinfo", hash_of(&up2)), None);
    assert_eq!(status, 401);
    let (status, _) = server.http(
        "GET",
        &format!(
            "/private/upstream-nar/{}/{}",
            hash_of(&up2),
            "0".repeat(52) + ".nar.xz"
        ),
        None,
    );
    assert_eq!(status, 401);
    assert_eq!(nginx.requests()[before..], [] as [String; 0]);
    let pull = server.token("pull", "private");
    let (status, _) = server.http(
        "GET",
        &format!("/private/{}.narinfo", hash_of(&up2)),
        Some(&pull),
    );
    assert_eq!(status, 200, "a puller may");

    // 7. A miss is remembered, but a path pushed meanwhile is served at once.
    let (status, _) = server.http("GET", &format!("/laptop/{}.narinfo", hash_of(&late)), None);
    assert_eq!(status, 404);
    server.cli_ok(&push, &["push", "laptop", &late]);
    let (status, _) = server.http("GET", &format!("/laptop/{}.narinfo", hash_of(&late)), None);
    assert_eq!(status, 200);

    // 8. /metrics counts hits, misses, errors and bytes.
    let (_, metrics) = server.http("GET", "/metrics", Some(&server.admin_token));
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}{{cache=\"laptop\"}} ")))
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
            .parse()
            .unwrap()
    };
    assert!(value("larder_upstream_hits_total") >= 3);
    assert!(value("larder_upstream_misses_total") >= 1);
    assert!(
        value("larder_upstream_errors_total") >= 2,
        "tampered and untrusted"
    );
    assert!(value("larder_upstream_bytes_total") > 0);

    // 9. The upstreams go down: one refuses connections, one accepts and never answers.
    nginx.stop();
    drop(other);
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let admin = server.admin_token.clone();
    server.cli_ok(
        &admin,
        &[
            "cache",
            "configure",
            "laptop",
            "--upstream",
            &silent_url,
            "--upstream",
            &nginx.url,
        ],
    );
    let t = Instant::now();
    ok(
        &consume(w, &url, &keys, &[&top]),
        "consumer with the upstreams down",
    );
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    let never = "0".repeat(32);
    let (_, status, first) = curl(&format!("{url}/{never}.narinfo"));
    assert_eq!(status, 404);
    assert!(first < Duration::from_secs(15), "bounded: {first:?}");
    let (_, status, second) = curl(&format!("{url}/{}.narinfo", "1".repeat(32)));
    assert_eq!(status, 404);
    assert!(second < Duration::from_secs(2), "backed off: {second:?}");
    let (_, status, local) = curl(&format!("{url}/{}.narinfo", hash_of(&top)));
    assert_eq!(status, 200);
    assert!(local < Duration::from_secs(2), "{local:?}");
    eprintln!(
        "upstreams down: first miss {first:?} (one silent upstream, one refusing), \
         backed-off miss {second:?}, local hit {local:?}"
    );
    drop(silent);
}
