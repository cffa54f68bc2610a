//! Scaling out on PostgreSQL, judged by real Nix: a server on PostgreSQL passes the oracle;
//! two replicas share one database (and one object directory, or one Garage bucket), a push
//! through one is served by the other, the same closure pushed through both at once is stored
//! once, and the background work moves when its replica dies; PostgreSQL going away mid-traffic gives fast
//! 503s and no corrupt entry, and service resumes when it returns, without a restart (so does
//! a PostgreSQL that freezes instead, after `backend_timeout`); an embedded deployment migrates
//! to PostgreSQL and keeps serving the same closure.
//!
//! Each test starts its own PostgreSQL cluster (and Garage, when it needs one) on loopback
//! (`larder-testkit`); PostgreSQL, Garage and Nix are required (`.ci/run` installs them).

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use larder_testkit::garage::Garage;
use larder_testkit::postgres::PgCluster;

/// The `PUSH_CMD` of the oracle: `larder push CACHE $TOP` to `server`, env-only config.
fn push_cmd(server: &Server, token: &str, cache: &str, home: &Path) -> String {
    format!(
        "env -u LARDER_CONFIG HOME={home} LARDER_SERVER={url} LARDER_TOKEN={token} {bin} push {cache} \"$TOP\"",
        home = home.display(),
        url = server.url,
        bin = larder_bin(),
    )
}

/// Build the oracle's closure, push it with `larder push` through `push_to`, and have real Nix
/// verify and substitute it through `verify_at`. Returns the oracle's work directory.
fn push_then_verify(push_to: &Server, verify_at: &Server, cache: &str, key: &str) -> PathBuf {
    let work = tempfile::tempdir().unwrap().keep();
    let token = push_to.token("push", cache);
    let cache_url = format!("{}/{cache}", verify_at.url);
    let push = push_cmd(push_to, &token, cache, &work);
    oracle_pass(&work.join("oracle"), &cache_url, key, Some(push));
    work
}

/// Real Nix verifies the closure the oracle built in `work` through `server`.
fn verify(work: &Path, server: &Server, cache: &str, key: &str) {
    let cache_url = format!("{}/{cache}", server.url);
    oracle_pass(&work.join("oracle"), &cache_url, key, None);
}

fn health(server: &Server) -> (u16, serde_json::Value) {
    let (code, body) = server.http("GET", "/healthz", None);
    let v = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("/healthz is not JSON ({e}): {code} {body:?}"));
    (code, v)
}

/// Poll `cond` every 200 ms for up to `secs`.
fn eventually(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn assert_no_secret(server: &Server, pg: &PgCluster) {
    let log = server.log();
    assert!(
        !log.contains(pg.password()),
        "the database password appears in the server's log"
    );
}

#[test]
fn real_nix_substitutes_from_a_server_on_postgres() {
    require_nix();
    let pg = PgCluster::start();
    let db = pg.create_database();
    let server = Server::start_with(&["--database", &db]);
    let info = server.create_cache("onpg", &[]);
    let key = info["public_key"].as_str().unwrap().to_owned();
    let work = push_then_verify(&server, &server, "onpg", &key);
    // The metadata really is in PostgreSQL.
    let closure = std::fs::read_to_string(work.join("oracle/closure")).unwrap();
    let rows = pg.psql(PgCluster::db_of(&db), "SELECT count(*) FROM paths");
    assert_eq!(rows, closure.lines().count().to_string());
    let (code, h) = health(&server);
    assert_eq!(code, 200, "{h}");
    assert_eq!(h["status"], "ok");
    assert_eq!(h["metadata"]["backend"], "postgres");
    assert_eq!(h["objects"]["backend"], "file");
    assert_no_secret(&server, &pg);
    assert!(server.stop().success());
}

/// On PostgreSQL nothing local is exclusive: a replica may even share another's data
/// directory (and with it the default `file://DATA/store`), since the database coordinates
/// them. Only SQLite deployments lock their data directory.
#[test]
fn replicas_on_postgres_may_share_a_data_directory() {
    let pg = PgCluster::start();
    let db = pg.create_database();
    let a = Server::start_with(&["--database", &db]);
    let (mut b, lines) = serve_until_listening(
        a.data.path(),
        &["--listen", "127.0.0.1:0", "--database", &db],
    );
    let b_url = lines
        .last()
        .and_then(|l| l.strip_prefix("larder: listening on "))
        .unwrap()
        .to_owned();
    a.create_cache("both", &[]);
    let out = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "30",
            &format!("{b_url}/both/nix-cache-info"),
        ])
        .output()
        .unwrap();
    let _ = b.kill();
    let _ = b.wait();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("StoreDir: /nix/store"),
        "{out:?}"
    );
    assert_eq!(a.http("GET", "/healthz", None).0, 200);
}

/// The object storage two replicas share.
enum Shared {
    Dir(tempfile::TempDir),
    Garage(Garage),
}

impl Shared {
    fn storage_url(&self) -> String {
        match self {
            Shared::Dir(d) => format!("file://{}", d.path().display()),
            Shared::Garage(g) => g.storage_url(),
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        match self {
            Shared::Dir(_) => Vec::new(),
            Shared::Garage(g) => g.env(),
        }
    }

    /// How many objects holding NAR bytes (packs, chunks stored on their own) the storage
    /// holds.
    fn chunk_objects(&self) -> usize {
        match self {
            Shared::Dir(d) => {
                count_files(&d.path().join("objects/chunk"))
                    + count_files(&d.path().join("objects/pack"))
            }
            Shared::Garage(g) => garage_keys(g)
                .iter()
                .filter(|k| k.starts_with("chunk/") || k.starts_with("pack/"))
                .count(),
        }
    }
}

#[test]
fn two_replicas_share_one_database_store_once_and_hand_over_background_work() {
    two_replicas(Shared::Dir(tempfile::tempdir().unwrap()));
}

#[test]
fn two_replicas_on_postgres_and_garage_serve_each_others_pushes_and_store_once() {
    two_replicas(Shared::Garage(Garage::start()));
}

/// Two replicas over one PostgreSQL and `shared` objects: a push through A passes real Nix's
/// verification through B; the same closure pushed through both at once is stored once (paths,
/// NAR rows, chunk rows and objects); background work runs on one of them and moves when it dies.
fn two_replicas(shared: Shared) {
    require_nix();
    let pg = PgCluster::start();
    let db = pg.create_database();
    let storage = shared.storage_url();
    let env = shared.env();
    let args = [
        "--database",
        &db,
        "--storage",
        &storage,
        "--gc-interval",
        "1s",
    ];
    let a = Server::start_full(tempfile::tempdir().unwrap(), &args, None, &env);
    let b = Server::start_full(
        tempfile::tempdir().unwrap(),
        &args,
        Some(&a.admin_token),
        &env,
    );
    assert!(
        !b.data.path().join("admin-token").exists(),
        "the second replica bootstrapped another admin token"
    );
    let info = a.create_cache("shared", &[]);
    let key = info["public_key"].as_str().unwrap().to_owned();

    // A push through replica A is served by replica B at once: real Nix checks it.
    push_then_verify(&a, &b, "shared", &key);

    // The same closure pushed through both replicas at the same moment: both succeed, and
    // every path and every NAR is stored once.
    let tag = unique_tag();
    let top = build_expr(&format!(
        "let mk = n: derivation {{ name = \"race-${{n}}-{tag}\"; system = builtins.currentSystem; \
         builder = \"/bin/sh\"; args = [\"-c\" \"echo ${{n}} {tag} > $out\"]; }}; \
         deps = map (n: mk (toString n)) [1 2 3 4 5 6 7 8]; in \
         derivation {{ name = \"race-top-{tag}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; \
         args = [\"-c\" \"echo ${{toString deps}} > $out\"]; }}"
    ))
    .remove(0);
    let token = a.token("push", "shared");
    let pushes: Vec<_> = [&a, &b]
        .iter()
        .map(|s| {
            larder_testkit::nix::command(larder_bin())
                .args(["push", "shared", &top, "--json", "-j", "8"])
                .env("LARDER_SERVER", &s.url)
                .env("LARDER_TOKEN", &token)
                .env("HOME", a.data.path())
                .env_remove("LARDER_CONFIG")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for p in pushes {
        let out = p.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "concurrent push failed: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary: serde_json::Value =
            serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(summary["failed"], 0, "{summary}");
    }
    let dbname = PgCluster::db_of(&db);
    let q = |sql: &str| pg.psql(dbname, sql);
    let paths = q(&format!(
        "SELECT count(*) FROM paths WHERE name LIKE 'race-%-{tag}'"
    ));
    assert_eq!(paths, "9", "each store path published once");
    let nars = q(&format!(
        "SELECT count(DISTINCT n.id) FROM nars n JOIN paths p ON p.nar_id = n.id \
         WHERE p.name LIKE 'race-%-{tag}'"
    ));
    // The eight leaves differ, so nine NARs: one row each, shared by nothing else.
    assert_eq!(nars, "9");
    // No NAR stored twice: every NAR row is one a published path uses.
    assert_eq!(
        q("SELECT count(*) FROM nars"),
        q("SELECT count(DISTINCT nar_id) FROM paths"),
        "a NAR stored twice"
    );
    // Every object holding NAR bytes has its row: a pack's, or a chunk's stored on its own.
    let rows: usize = q("SELECT (SELECT count(*) FROM packs) + \
         (SELECT count(*) FROM chunks WHERE pack IS NULL)")
    .parse()
    .unwrap();
    assert_eq!(shared.chunk_objects(), rows, "objects and rows disagree");

    // Background work runs on exactly one replica, and moves when that one dies.
    let runs = |s: &Server| health(s).1["background_work"] == true;
    eventually(20, "one replica to run the background work", || {
        runs(&a) != runs(&b)
    });
    let (mut leader, other) = if runs(&a) { (a, b) } else { (b, a) };
    leader.crash();
    eventually(
        20,
        "the surviving replica to take the background work",
        || runs(&other),
    );
    let (code, _) = other.http("GET", "/shared/nix-cache-info", None);
    assert_eq!(code, 200);
    assert_no_secret(&other, &pg);
    assert_no_secret(&leader, &pg);
    if let Shared::Garage(g) = &shared {
        for s in [&other, &leader] {
            assert!(
                !s.log().contains(&g.secret_access_key),
                "the S3 secret key appears in a replica's log"
            );
        }
    }
}

/// Files under `dir`, but the servers' staging owner locks (`owner-<id>.lock`).
fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with("owner-"))
                .map(|e| {
                    if e.path().is_dir() {
                        count_files(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn postgres_outage_answers_503_fast_and_service_resumes_without_restart() {
    require_nix();
    let pg = PgCluster::start();
    let db = pg.create_database();
    let server = Server::start_with(&["--database", &db]);
    let info = server.create_cache("faults", &[]);
    let key = info["public_key"].as_str().unwrap().to_owned();
    let before = push_then_verify(&server, &server, "faults", &key);
    let top = std::fs::read_to_string(before.join("oracle/top")).unwrap();
    let top_hash = Path::new(top.trim()).file_name().unwrap().to_string_lossy()[..32].to_owned();
    let push_token = server.token("push", "faults");

    // Traffic: narinfo, NAR listing and nix-cache-info requests in a loop, all through.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, url) = (stop.clone(), server.url.clone());
        let paths = [
            format!("/faults/{top_hash}.narinfo"),
            "/faults/00000000000000000000000000000000.narinfo".to_owned(),
            "/faults/nix-cache-info".to_owned(),
            "/api/v1/caches/faults".to_owned(),
        ];
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for p in &paths {
                    let out = Command::new("curl")
                        .args([
                            "-s",
                            "-o",
                            "/dev/null",
                            "-w",
                            "%{http_code}",
                            "--max-time",
                            "30",
                        ])
                        .arg(format!("{url}{p}"))
                        .output()
                        .unwrap();
                    seen.push((p.clone(), String::from_utf8_lossy(&out.stdout).into_owned()));
                }
            }
            seen
        })
    };
    std::thread::sleep(Duration::from_secs(1));

    pg.stop();
    // Past the in-memory caches' few seconds, requests reach the database: 503, fast, with a
    // short reason and nothing about the database's address or password.
    std::thread::sleep(Duration::from_secs(6));
    let started = Instant::now();
    let (code, body) = server.http(
        "GET",
        &format!("/faults/{top_hash}.narinfo"),
        Some(&push_token),
    );
    let took = started.elapsed();
    assert_eq!(code, 503, "{body}");
    assert!(took < Duration::from_secs(6), "a 503 took {took:?}");
    assert!(body.contains("metadata database unavailable"), "{body}");
    assert!(
        !body.contains(pg.password()) && !body.contains("postgres://"),
        "{body}"
    );
    let (code, h) = health(&server);
    assert_eq!(code, 503, "{h}");
    assert_eq!(h["metadata"]["ok"], false);
    assert_eq!(h["metadata"]["error"], "unreachable");
    assert_eq!(h["objects"]["ok"], true);
    // An upload during the outage is refused and leaves nothing behind.
    let nar = tempfile::NamedTempFile::new().unwrap();
    let dump = larder_testkit::nix::command("nix-store")
        .args(["--dump", top.trim()])
        .output()
        .unwrap();
    std::fs::write(nar.path(), &dump.stdout).unwrap();
    let up = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "30",
            "-X",
            "POST",
        ])
        .args(["-H", &format!("Authorization: Bearer {push_token}")])
        .arg("--data-binary")
        .arg(format!("@{}", nar.path().display()))
        .arg(format!(
            "{}/api/v1/caches/faults/nars?compression=none",
            server.url
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&up.stdout), "503");
    assert_eq!(
        count_files(&server.data.path().join("store/tmp")),
        0,
        "a refused upload left staging files"
    );

    pg.restart();
    // Service resumes by itself: no restart of larder.
    eventually(15, "/healthz to report ok again", || {
        health(&server).0 == 200
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = traffic.join().unwrap();
    let codes: std::collections::BTreeSet<&str> = seen.iter().map(|(_, c)| c.as_str()).collect();
    for (path, code) in &seen {
        assert!(
            matches!(code.as_str(), "200" | "404" | "503"),
            "{path} answered {code} during the outage"
        );
    }
    assert!(
        codes.contains("503"),
        "the traffic never saw the outage: {codes:?}"
    );
    // What was there is intact, and real Nix pushes and pulls a new closure.
    verify(&before, &server, "faults", &key);
    push_then_verify(&server, &server, "faults", &key);
    assert_no_secret(&server, &pg);
    assert!(server.stop().success());
}

/// A database that accepts connections but never answers (frozen: a partition, a hung host)
/// cannot refuse anything; reads give up after `backend_timeout` with a 503, `/healthz` names
/// the database, and everything works again once it answers, without a restart.
#[test]
fn a_frozen_postgres_gets_503_after_the_backend_timeout_and_service_resumes() {
    require_nix();
    let pg = PgCluster::start();
    let db = pg.create_database();
    let server = Server::start_with(&["--database", &db, "--backend-timeout", "2s"]);
    let info = server.create_cache("frozen", &[]);
    let key = info["public_key"].as_str().unwrap().to_owned();
    let before = push_then_verify(&server, &server, "frozen", &key);
    let top = std::fs::read_to_string(before.join("oracle/top")).unwrap();
    let top_hash = Path::new(top.trim()).file_name().unwrap().to_string_lossy()[..32].to_owned();

    // Traffic that keeps the database busy (a missing narinfo is looked up every time), so
    // the freeze catches queries in flight on connections the pool does not check first.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, url) = (stop.clone(), server.url.clone());
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let out = Command::new("curl")
                    .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                    .args(["--max-time", "30"])
                    .arg(format!(
                        "{url}/frozen/00000000000000000000000000000000.narinfo"
                    ))
                    .output()
                    .unwrap();
                seen.push((
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                    started.elapsed(),
                ));
            }
            seen
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    pg.freeze();
    // Past the in-memory caches' few seconds, every request reaches the database.
    std::thread::sleep(Duration::from_secs(6));
    for path in [
        format!("/frozen/{top_hash}.narinfo"),
        "/frozen/00000000000000000000000000000000.narinfo".to_owned(),
        "/api/v1/caches/frozen".to_owned(),
    ] {
        let started = Instant::now();
        let (code, body) = server.http("GET", &path, None);
        let took = started.elapsed();
        assert_eq!(code, 503, "{path}: {body}");
        assert!(body.contains("did not answer within 2s"), "{path}: {body}");
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(8),
            "{path}: a 503 after {took:?}"
        );
    }
    let (code, h) = health(&server);
    assert_eq!(code, 503, "{h}");
    // "unreachable" (no connection could be checked out in time) or "timed out".
    assert_eq!(h["metadata"]["ok"], false, "{h}");
    assert_eq!(h["objects"]["ok"], true, "{h}");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = traffic.join().unwrap();
    assert!(seen.iter().any(|(code, _)| code == "503"), "{seen:?}");
    for (code, took) in &seen {
        assert!(matches!(code.as_str(), "404" | "503"), "{seen:?}");
        assert!(*took < Duration::from_secs(8), "{seen:?}");
    }

    pg.thaw();
    eventually(30, "/healthz to report ok again", || {
        health(&server).0 == 200
    });
    let (code, body) = server.http("GET", &format!("/frozen/{top_hash}.narinfo"), None);
    assert_eq!(code, 200, "{body}");
    verify(&before, &server, "frozen", &key);
    assert!(server.stop().success());
}

#[test]
fn an_embedded_deployment_migrates_to_postgres_and_serves_the_same_closure() {
    require_nix();
    let server = Server::start();
    let info = server.create_cache("moving", &[]);
    let key = info["public_key"].as_str().unwrap().to_owned();
    let work = push_then_verify(&server, &server, "moving", &key);
    let top = std::fs::read_to_string(work.join("oracle/top")).unwrap();
    server.cli_ok(
        &server.admin_token,
        &["pin", "moving", "release", top.trim()],
    );
    let admin = server.admin_token.clone();
    let data = server.stop_keeping_data();

    let pg = PgCluster::start();
    let db = pg.create_database();
    let sqlite = format!("sqlite://{}", data.path().join("larder.db").display());
    let migrate = |extra: &[&str]| {
        larder_testkit::nix::command(larder_bin())
            .args(["migrate", "--from", &sqlite, "--to", &db])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = migrate(&["--json"]);
    assert!(
        out.status.success(),
        "migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verified"], true);
    assert!(
        !report["to"].as_str().unwrap().contains(pg.password()),
        "{report}"
    );
    let rows = |table: &str| {
        report["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["table"] == table)
            .unwrap()["rows"]
            .as_i64()
            .unwrap()
    };
    let closure = std::fs::read_to_string(work.join("oracle/closure")).unwrap();
    assert_eq!(rows("paths"), closure.lines().count() as i64);
    assert_eq!((rows("caches"), rows("pins")), (1, 1));

    // A second run finds the target full: refused, unless asked to overwrite.
    let again = migrate(&[]);
    assert_eq!(again.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("not empty") && stderr.contains("--overwrite"),
        "{stderr}"
    );
    let over = migrate(&["--overwrite"]);
    assert!(
        over.status.success(),
        "{}",
        String::from_utf8_lossy(&over.stderr)
    );
    assert!(String::from_utf8_lossy(&over.stdout).contains("verified"));

    // The same data directory (objects, admin token), now on PostgreSQL.
    let server = Server::start_in(data, &["--database", &db], Some(&admin));
    let (_, h) = health(&server);
    assert_eq!(h["metadata"]["backend"], "postgres");
    verify(&work, &server, "moving", &key);
    let pins = server.cli_ok(&admin, &["pin", "list", "moving", "--json"]);
    assert!(pins.contains("release"), "{pins}");
    assert_no_secret(&server, &pg);
    assert!(server.stop().success());
}
