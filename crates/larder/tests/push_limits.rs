//! `larder push` against a server that refuses or stops answering, with real Nix building the
//! paths and a real `larder serve`:
//! - a multi-part upload the server refuses for good (the cache's staging bound, 413) is
//!   abandoned at once (its parts freed), not retried, and the user reads the server's reason;
//!   concurrent refused pushes leave nothing staged that would lock the cache's next uploads out;
//! - a server frozen mid-upload (SIGSTOP) costs the push its stall timeout per attempt: the
//!   push fails naming the stall instead of hanging, and succeeds when the server comes back
//!   within its retries; the push daemon does the same;
//! - a reference the push found in the cache and then saw evicted before its referrer was
//!   published is sent again (the push plans again), not reported as a failure.

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A store path of `kib` KiB of random bytes (incompressible), built by real Nix.
fn random_path(name: &str, kib: u32) -> String {
    let unique = format!("{name}-{}", unique_tag());
    build_expr(&format!(
        "derivation {{ name = \"{unique}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; \
         args = [\"-c\" \"export PATH=/bin:/usr/bin; head -c {kib}K /dev/urandom > $out\"]; }}"
    ))
    .remove(0)
}

/// The unfinished multi-part uploads (directories) in the server's staging directory.
fn open_uploads(data: &std::path::Path) -> Vec<String> {
    let Ok(dirs) = std::fs::read_dir(data.join("store/tmp")) else {
        return Vec::new();
    };
    dirs.flatten()
        .filter(|d| d.file_name().to_string_lossy().starts_with("multipart-"))
        .map(|u| u.path().display().to_string())
        .collect()
}

/// `larder ARGS` against `server` with `token` and extra environment, running.
fn spawn_cli(server: &Server, token: &str, args: &[&str], env: &[(&str, &str)]) -> Child {
    spawn_logged(server, token, args, env, Stdio::piped())
}

/// [`spawn_cli`] with its standard error going to `stderr`.
fn spawn_logged(
    server: &Server,
    token: &str,
    args: &[&str],
    env: &[(&str, &str)],
    stderr: Stdio,
) -> Child {
    let home = server.data.path().join("client-home");
    std::fs::create_dir_all(&home).unwrap();
    let mut cmd = larder_testkit::nix::command(larder_bin());
    cmd.args(args)
        .env("LARDER_SERVER", &server.url)
        .env("LARDER_TOKEN", token)
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env_remove("LARDER_CONFIG")
        .stdout(Stdio::piped())
        .stderr(stderr);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// Wait for `child`, at most `limit`: its exit code, stderr, and how long it ran from `since`.
fn finish(child: Child, since: Instant, limit: Duration) -> (Option<i32>, String, Duration) {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            signal(pid, "KILL");
            panic!("larder did not end within {limit:?}");
        }
    };
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        since.elapsed(),
    )
}

#[test]
fn a_refused_multipart_upload_is_abandoned_and_leaves_the_cache_usable() {
    require_nix();
    let server = Server::start();
    server.create_cache("small", &[]);
    server.cli_ok(
        &server.admin_token,
        &["cache", "configure", "small", "--max-size", "1MiB"],
    );
    let push = server.token("push", "small");
    // Four pushes at once, each of a NAR three times the cache's limit in 128 KiB parts: the
    // cache's staging bound (its limit) refuses their parts with 413.
    let paths: Vec<String> = (0..4)
        .map(|i| random_path(&format!("big{i}"), 3072))
        .collect();
    let t0 = Instant::now();
    let pushes: Vec<Child> = paths
        .iter()
        .map(|p| {
            spawn_cli(
                &server,
                &push,
                &["push", "small", p, "--part-size", "128KiB", "--no-chunking"],
                &[],
            )
        })
        .collect();
    for child in pushes {
        let (code, err, took) = finish(child, t0, Duration::from_secs(120));
        assert_eq!(code, Some(1), "{err}");
        // The server's reason, once: a refusal is not retried.
        assert!(
            err.contains("413") && err.contains("would hold more than"),
            "{err}"
        );
        assert!(!err.contains("retrying"), "a refusal was retried: {err}");
        // (As the server's answer: store paths here carry digits, "…0174293868…" among them.)
        assert!(!err.contains("answered 429"), "{err}");
        assert!(took < Duration::from_secs(60), "{took:?}: {err}");
    }
    // Every refused upload was abandoned: nothing is staged for the cache.
    assert_eq!(open_uploads(server.data.path()), Vec::<String>::new());
    // So the cache takes its next multi-part upload at once (the refused ones held its whole
    // staging allowance, and enough of them its count of open uploads, until they expired).
    let fits = random_path("fits", 600);
    let out = server.cli_ok(
        &push,
        &[
            "push",
            "small",
            &fits,
            "--part-size",
            "128KiB",
            "--no-chunking",
        ],
    );
    assert!(out.is_empty() || !out.contains("failed"), "{out}");
    let (code, body) = server.http(
        "GET",
        &format!("/small/{}.narinfo", &fits["/nix/store/".len()..][..32]),
        None,
    );
    assert_eq!(code, 200, "{body}");
}

/// Stops the server (SIGSTOP) while alive; continues it when dropped, so the test's server
/// can be stopped.
struct Frozen(u32);
impl Frozen {
    fn new(server: &Server) -> Frozen {
        signal(server.child.id(), "STOP");
        Frozen(server.child.id())
    }
}
impl Drop for Frozen {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

/// Wait until the server holds some of an upload (the push is mid-upload): a part of a
/// multi-part upload, or a MiB of a whole NAR's staging file.
fn wait_mid_upload(server: &Server, push: &mut Child) {
    wait_mid_upload_of(server, push, 0)
}

/// [`wait_mid_upload`] when `before` multi-part uploads with parts are there already.
fn wait_mid_upload_of(server: &Server, push: &mut Child, before: usize) {
    let tmp = server.data.path().join("store/tmp");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let uploads = open_uploads(server.data.path());
        let with_parts = uploads.iter().filter(|u| {
            std::fs::read_dir(u)
                .into_iter()
                .flatten()
                .flatten()
                .any(|f| {
                    let name = f.file_name().to_string_lossy().into_owned();
                    name.starts_with("part-") && name.ends_with(".json")
                })
        });
        let part = with_parts.count() > before;
        let whole = std::fs::read_dir(&tmp)
            .into_iter()
            .flatten()
            .flatten()
            .any(|f| {
                f.file_name().to_string_lossy().starts_with("upload-")
                    && f.metadata().is_ok_and(|m| m.len() > 1 << 20)
            });
        if part || whole {
            return;
        }
        if let Some(status) = push.try_wait().unwrap() {
            panic!("the push ended ({status}) before the server held some of its upload");
        }
        assert!(
            Instant::now() < deadline,
            "no upload on the server in 120 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_push_to_a_frozen_server_fails_naming_the_stall_and_survives_a_short_freeze() {
    require_nix();
    let server = Server::start();
    // xz: slow enough to compress that the test freezes the server mid-upload.
    server.create_cache("c", &["--compression", "xz"]);
    let push = server.token("push", "c");
    let stall = [("LARDER_STALL_TIMEOUT", "2s")];
    let args = |p: &'static str| -> Vec<String> {
        vec![
            "push".into(),
            "c".into(),
            p.into(),
            "--part-size".into(),
            "1MiB".into(),
            "--no-chunking".into(),
        ]
    };
    let path: &'static str = Box::leak(random_path("frozen", 24 << 10).into_boxed_str());

    // Frozen for good: every attempt stalls; the push fails within its retries, naming the stall.
    let a = args(path);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let mut child = spawn_cli(&server, &push, &a, &stall);
    wait_mid_upload(&server, &mut child);
    let frozen = Frozen::new(&server);
    let (code, err, took) = finish(child, Instant::now(), Duration::from_secs(180));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("the server stalled: no progress for 2s"),
        "the failure names the stall: {err}"
    );
    assert!(err.contains("retrying"), "stalls are retried: {err}");
    assert!(took < Duration::from_secs(90), "{took:?}");
    drop(frozen);

    // Frozen for a few seconds, mid-upload of another path: the stalled attempt is retried
    // and the push completes.
    let other: &'static str = Box::leak(random_path("thawed", 24 << 10).into_boxed_str());
    let a = args(other);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let mut child = spawn_cli(&server, &push, &a, &stall);
    wait_mid_upload_of(&server, &mut child, 1);
    let frozen = Frozen::new(&server);
    std::thread::sleep(Duration::from_secs(6));
    drop(frozen);
    let (code, err, _) = finish(child, Instant::now(), Duration::from_secs(180));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("the server stalled"),
        "the freeze was noticed: {err}"
    );
    let (status, body) = server.http(
        "GET",
        &format!("/c/{}.narinfo", &other["/nix/store/".len()..][..32]),
        None,
    );
    assert_eq!(status, 200, "{body}");
}

/// The push daemon under a frozen server: the stalled upload fails after its retries, the
/// entry is marked failed with the stall named (`daemon push --wait` exits 1 saying so), and
/// the daemon keeps serving: once the server is back, the next entry is pushed.
#[test]
fn the_push_daemon_fails_a_stalled_upload_and_keeps_going() {
    require_nix();
    let server = Server::start();
    // xz: slow enough to compress that the test freezes the server mid-upload.
    server.create_cache("c", &["--compression", "xz"]);
    let push = server.token("push", "c");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let socket_s = socket.display().to_string();
    // Below the default part size and not chunked: one whole-NAR upload.
    let stall = [
        ("LARDER_STALL_TIMEOUT", "2s"),
        ("LARDER_PUSH_NO_CHUNKING", "1"),
    ];
    let log = dir.path().join("daemon.log");
    let mut daemon = spawn_logged(
        &server,
        &push,
        &["daemon", "run", "c", "--socket", &socket_s],
        &stall,
        Stdio::from(std::fs::File::create(&log).unwrap()),
    );
    let daemon_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the daemon made no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let big = random_path("daemon-frozen", 12 << 10);
    let mut waiting = spawn_cli(
        &server,
        &push,
        &["daemon", "push", "--wait", "--socket", &socket_s, &big],
        &[],
    );
    wait_mid_upload(&server, &mut waiting);
    let frozen = Frozen::new(&server);
    // Each attempt compresses the NAR again (xz, slow) until the connection's buffers are
    // full, then stalls: minutes at most, where without the watchdog it waits forever.
    let (code, err, took) = finish(waiting, Instant::now(), Duration::from_secs(300));
    drop(frozen);
    assert_eq!(code, Some(1), "{err}\n{}", daemon_log());
    assert!(err.contains("the server stalled"), "{err}");
    assert!(
        took < Duration::from_secs(240),
        "{took:?}: {err}\n{}",
        daemon_log()
    );
    // The daemon is alive and pushes the next entry.
    let small = build_file("daemon-after", "after the freeze");
    let out = server.cli(
        &push,
        &["daemon", "push", "--wait", "--socket", &socket_s, &small],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon_log()
    );
    assert!(daemon.try_wait().unwrap().is_none(), "the daemon exited");
    signal(daemon.id(), "TERM");
    let _ = daemon.wait();
}

/// Issue 14 item 12: a push racing an eviction of what it references. The leaf is in the
/// cache when `larder push top` plans (so only top is sent); while top's NAR is uploading, the
/// push is paused and the leaf deleted; resumed, publishing top is refused (a reference the
/// cache lacks), and the push plans again, sends the leaf and publishes top: exit 0.
#[test]
fn a_reference_evicted_while_a_push_runs_is_sent_again() {
    require_nix();
    let server = Server::start();
    // xz: slow enough to compress that the test pauses the push mid-upload.
    server.create_cache("c", &["--compression", "xz"]);
    let push = server.token("push", "c");
    let tag = unique_tag();
    let built = build_expr(&format!(
        "let leaf = derivation {{ name = \"leaf-{tag}\"; system = builtins.currentSystem; \
         builder = \"/bin/sh\"; args = [\"-c\" \"echo leaf > $out\"]; }}; in \
         derivation {{ name = \"top-{tag}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; \
         args = [\"-c\" \"export PATH=/bin:/usr/bin; head -c 24M /dev/urandom > $out; echo ${{leaf}} >> $out\"]; }}"
    ));
    let top = built[0].clone();
    let refs = larder_testkit::nix::command("nix-store")
        .args(["--query", "--references", &top])
        .output()
        .unwrap();
    let leaf = String::from_utf8(refs.stdout)
        .unwrap()
        .lines()
        .find(|l| l.contains(&format!("leaf-{tag}")))
        .expect("top references the leaf")
        .to_owned();
    let narinfo = |p: &str| {
        server
            .http(
                "GET",
                &format!("/c/{}.narinfo", &p["/nix/store/".len()..][..32]),
                None,
            )
            .0
    };
    server.cli_ok(&push, &["push", "c", &leaf]);
    assert_eq!(narinfo(&leaf), 200);

    let mut child = spawn_cli(
        &server,
        &push,
        &["push", "c", &top, "--part-size", "1MiB", "--no-chunking"],
        &[],
    );
    wait_mid_upload(&server, &mut child);
    signal(child.id(), "STOP");
    let deleted = server.cli(&server.admin_token, &["path", "delete", "c", &leaf]);
    signal(child.id(), "CONT");
    assert!(
        deleted.status.success(),
        "{}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    assert_eq!(narinfo(&leaf), 404, "the leaf is gone while top uploads");
    let (code, err, _) = finish(child, Instant::now(), Duration::from_secs(180));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("references were evicted from the cache while this ran"),
        "{err}"
    );
    assert_eq!(narinfo(&leaf), 200);
    assert_eq!(narinfo(&top), 200);
}

/// A server restarting when the push starts (issue 14's kill runs: a `kill -9` landing during
/// the push's first request made it give up at once): the first requests (the cache's
/// settings, the missing query) are asked again after the usual waits, saying so, and the
/// push completes once the server is back.
#[test]
fn a_push_started_while_the_server_restarts_waits_for_it() {
    require_nix();
    let server = Server::start();
    server.create_cache("c", &[]);
    let push = server.token("push", "c");
    let path = random_path("restart", 64);
    let url = server.url.clone();
    let listen = url.trim_start_matches("http://").to_owned();
    let data = server.stop_keeping_data();

    let home = data.path().join("client-home");
    std::fs::create_dir_all(&home).unwrap();
    let child = larder_testkit::nix::command(larder_bin())
        .args(["push", "c", &path])
        .env("LARDER_SERVER", &url)
        .env("LARDER_TOKEN", &push)
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env_remove("LARDER_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let since = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let server = Server::start_listening(data, &listen, &[], None, &[]);
    let (code, err, took) = finish(child, since, Duration::from_secs(60));
    assert_eq!(code, Some(0), "the push waited for the server: {err}");
    assert!(
        err.contains("retrying cache \"c\" (attempt 1, again in 1 s)"),
        "the user is told why nothing happens: {err}"
    );
    assert!(took < Duration::from_secs(20), "{took:?}");
    let (status, body) = server.http(
        "GET",
        &format!("/c/{}.narinfo", &path["/nix/store/".len()..][..32]),
        None,
    );
    assert_eq!(status, 200, "{body}");
}
