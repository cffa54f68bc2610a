//! The seed's automation (Part 5) and cross-machine workflow (Part 6) with real Nix: the
//! post-build-hook daemon survives `kill -9`, `watch-store` pushes what Nix builds.

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `n` independent test derivations in one expression.
fn many_expr(tag: &str, n: usize) -> String {
    format!(
        "builtins.genList (i: derivation {{ name = \"{tag}-${{toString i}}\"; \
         system = builtins.currentSystem; builder = \"/bin/sh\"; \
         args = [\"-c\" \"echo ${{toString i}} {tag} > $out\"]; }}) {n}"
    )
}

fn larder(server: &Server, token: &str, args: &[&str]) -> Command {
    let home = server.data.path().join("client-home");
    std::fs::create_dir_all(&home).unwrap();
    let mut c = larder_testkit::nix::command(larder_bin());
    c.args(args)
        .env("LARDER_SERVER", &server.url)
        .env("LARDER_TOKEN", token)
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_STATE_HOME", home.join(".state"))
        .env_remove("LARDER_CONFIG");
    c
}

/// The `extra-…` nix.conf lines `larder use CACHE --mode print` gives (what a consumer adds).
fn use_lines(server: &Server, token: &str, cache: &str) -> String {
    server
        .cli_ok(token, &["use", cache, "--mode", "print"])
        .lines()
        .filter(|l| l.starts_with("extra-"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// `dir/default.nix`: an attribute set with `app`, a new one-file derivation printing `text`.
fn write_app_file(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let file = dir.join("default.nix");
    std::fs::write(
        &file,
        format!(
            "{{ app = derivation {{ name = \"{name}-{}\"; system = builtins.currentSystem; \
             builder = \"/bin/sh\"; args = [\"-c\" \"echo {text} > $out\"]; }}; }}",
            unique_tag()
        ),
    )
    .unwrap();
    file
}

fn start_daemon(server: &Server, token: &str, cache: &str, socket: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    let child = larder(server, token, &["daemon", "run", cache, "--socket"])
        .arg(socket)
        .stderr(log)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "daemon did not create its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn in_cache(url: &str, path: &str) -> bool {
    let xdg = tempfile::tempdir().unwrap();
    nix(&["path-info", "--store", url, path], xdg.path())
        .status
        .success()
}

#[test]
fn daemon_queue_survives_kill_9_and_pushes_everything_after_restart() {
    require_nix();
    let server = Server::start();
    server.create_cache("auto", &[]);
    let token = server.token("push", "auto");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("daemon.sock");
    let hook = dir.path().join("post-build-hook");

    // The hook in one step: the script and the nix.conf line.
    let o = larder(&server, &token, &["daemon", "hook", "--socket"])
        .arg(&socket)
        .arg("--path")
        .arg(&hook)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line = String::from_utf8(o.stdout).unwrap();
    assert_eq!(line.trim(), format!("post-build-hook = {}", hook.display()));

    let mut daemon = start_daemon(&server, &token, "auto", &socket, &dir.path().join("d1.log"));
    // Freeze the server: the daemon's pushes hang, so the queue is still full at kill -9.
    assert!(Command::new("kill")
        .args(["-STOP", &server.child.id().to_string()])
        .status()
        .unwrap()
        .success());

    // 20 builds, each queued by the real post-build-hook (root is trusted with it).
    let tag = format!("hooked-{}", unique_tag());
    let xdg = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let o = larder_testkit::nix::command("nix-build")
        .args(["--no-out-link", "-E", &many_expr(&tag, 20)])
        .env(
            "NIX_CONFIG",
            format!("{NIX_CONFIG}\npost-build-hook = {}", hook.display()),
        )
        .env("XDG_CACHE_HOME", xdg.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o_build_err = o.stderr.clone();
    let build_secs = t0.elapsed().as_secs_f64();
    let outs: Vec<String> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(outs.len(), 20);
    // The hook never waited for the (frozen) network.
    assert!(build_secs < 60.0, "builds took {build_secs}s");

    daemon.kill().unwrap(); // SIGKILL
    daemon.wait().unwrap();
    let o = larder(&server, &token, &["daemon", "status", "--json", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let why = format!(
        "{status}\nnix-build stderr:\n{}\ndaemon log:\n{}",
        String::from_utf8_lossy(&o_build_err),
        std::fs::read_to_string(dir.path().join("d1.log")).unwrap_or_default()
    );
    assert_eq!(status["running"], false, "{why}");
    assert_eq!(status["queued"], 20, "{why}");

    assert!(Command::new("kill")
        .args(["-CONT", &server.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let url = format!("{}/auto", server.url);
    assert!(outs.iter().all(|p| !in_cache(&url, p)));

    // Restart (the stale socket is replaced); `stop` drains the queue before exiting.
    let mut daemon = start_daemon(&server, &token, "auto", &socket, &dir.path().join("d2.log"));
    // And `--wait` reports a push result: a fresh path, pushed before the wait returns.
    let extra = build_file("waited", "w");
    let o = larder(&server, &token, &["daemon", "push", "--wait", "--socket"])
        .arg(&socket)
        .arg(&extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(in_cache(&url, &extra));
    let o = larder(&server, &token, &["daemon", "stop", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st = daemon.wait().unwrap();
    assert!(st.success());
    assert!(!socket.exists());
    for p in &outs {
        assert!(
            in_cache(&url, p),
            "{p} not in the cache after restart; daemon log:\n{}",
            std::fs::read_to_string(dir.path().join("d2.log")).unwrap_or_default()
        );
    }
}

#[test]
fn daemon_push_wait_fails_for_a_path_that_is_not_valid() {
    require_nix();
    let server = Server::start();
    server.create_cache("auto", &[]);
    let token = server.token("push", "auto");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    // Before any daemon ran here, `status` reports it not running (not an error).
    let o = larder(&server, &token, &["daemon", "status", "--json", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (st["running"].clone(), st["queued"].clone()),
        (false.into(), 0.into())
    );
    // Without a daemon, --wait refuses with a hint.
    let o = larder(&server, &token, &["daemon", "push", "--wait", "--socket"])
        .arg(&socket)
        .arg("/nix/store/00000000000000000000000000000000-nope")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("larder daemon run"));
    let mut daemon = start_daemon(&server, &token, "auto", &socket, &dir.path().join("d.log"));
    let o = larder(&server, &token, &["daemon", "push", "--wait", "--socket"])
        .arg(&socket)
        .arg("/nix/store/00000000000000000000000000000000-nope")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not valid in the local store"), "{err}");
    larder(&server, &token, &["daemon", "stop", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    daemon.wait().unwrap();
}

#[test]
fn watch_store_pushes_new_builds_and_drains_on_sigterm() {
    require_nix();
    let server = Server::start();
    server.create_cache("watched", &[]);
    let token = server.token("push", "watched");
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("w.log")).unwrap();
    let mut w = larder(
        &server,
        &token,
        &["watch-store", "watched", "--interval-ms", "200"],
    )
    .stderr(log)
    .spawn()
    .unwrap();
    // The watcher starts from the end of the database once it says it is watching.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(dir.path().join("w.log"))
        .unwrap()
        .contains("watching")
    {
        assert!(Instant::now() < deadline, "watch-store did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let tag = format!("watched-{}", unique_tag());
    let xdg = tempfile::tempdir().unwrap();
    let o = larder_testkit::nix::command("nix-build")
        .args(["--no-out-link", "-E", &many_expr(&tag, 5)])
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("XDG_CACHE_HOME", xdg.path())
        .output()
        .unwrap();
    assert!(o.status.success());
    let outs: Vec<String> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    // SIGTERM right away: the watcher drains what became valid before exiting.
    Command::new("kill")
        .args(["-TERM", &w.id().to_string()])
        .status()
        .unwrap();
    let st = w.wait().unwrap();
    let log = std::fs::read_to_string(dir.path().join("w.log")).unwrap();
    assert!(st.success(), "{log}");
    let url = format!("{}/watched", server.url);
    for p in &outs {
        assert!(in_cache(&url, p), "{p} not pushed:\n{log}");
    }
    // .drv files are not pushed by default.
    assert!(!log.contains(".drv"), "{log}");
}

/// watch-exec runs the command, pushes what it builds, and exits with its status. While the
/// command waits, the test builds another path outside it: the post-build-hook mode (the
/// default for root) pushes only the command's builds, the store-watching mode pushes both.
fn watch_exec_case(mode: Option<&str>) {
    require_nix();
    let server = Server::start();
    server.create_cache("exec", &[]);
    let token = server.token("push", "exec");
    let tag = format!("exec-{}", unique_tag());
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("outs");
    let marker = dir.path().join("go-on");
    let script = format!(
        "nix-build --no-out-link -E '{}' > {outs} && \
         while [ ! -e {marker} ]; do sleep 0.05; done && \
         nix-build --no-out-link -E '{}' >> {outs} && exit 3",
        many_expr(&format!("{tag}-a"), 2),
        many_expr(&format!("{tag}-b"), 1),
        outs = out_file.display(),
        marker = marker.display(),
    );
    let mut args = vec!["watch-exec", "exec"];
    if let Some(m) = mode {
        args.extend(["--mode", m]);
    }
    args.extend(["--", "sh", "-c", &script]);
    let child = larder(&server, &token, &args)
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("XDG_CACHE_HOME", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the command's first build, then build something else outside it.
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::read_to_string(&out_file).map_or(0, |s| s.lines().count()) < 2 {
        assert!(
            Instant::now() < deadline,
            "the command's first build did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let outside = build_file(&format!("{tag}-outside"), "outside");
    std::fs::write(&marker, b"").unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    let url = format!("{}/exec", server.url);
    let outs = std::fs::read_to_string(&out_file).unwrap();
    assert_eq!(outs.lines().count(), 3);
    for p in outs.lines() {
        assert!(in_cache(&url, p), "{p} not pushed:\n{err}");
    }
    let hook_mode = mode != Some("store");
    assert_eq!(err.contains("post-build-hook"), hook_mode, "{err}");
    assert_eq!(
        in_cache(&url, &outside),
        !hook_mode,
        "a path built outside the command ({outside}); hook mode = {hook_mode}:\n{err}"
    );
}

#[test]
fn watch_exec_hook_mode_pushes_exactly_what_the_command_builds() {
    watch_exec_case(None);
}

#[test]
fn watch_exec_store_mode_pushes_every_new_path() {
    watch_exec_case(Some("store"));
}

/// The seed's journey: `larder build` on the builder, `larder pull` on a consumer (a separate
/// chroot store configured from `larder use --mode print`), everything fetched, nothing built.
#[test]
fn build_once_pull_everywhere() {
    require_nix();
    let server = Server::start();
    server.create_cache("ws", &[]);
    let token = server.token("push", "ws");
    let dir = tempfile::tempdir().unwrap();
    let flake = dir.path().join("flake");
    std::fs::create_dir_all(&flake).unwrap();
    let tag = unique_tag();
    std::fs::write(
        flake.join("flake.nix"),
        format!(
            r#"{{ outputs = {{ self }}: let
  sys = "x86_64-linux";
  lib = derivation {{ name = "journey-lib-{tag}"; system = sys; builder = "/bin/sh"; args = ["-c" "echo lib > $out"]; }};
  mk = n: derivation {{ name = "journey-${{n}}-{tag}"; system = sys; builder = "/bin/sh"; args = ["-c" "echo ${{n}} ${{lib}} > $out"]; }};
in {{ packages.${{sys}} = {{ shoshin = mk "shoshin"; gyakusatsu = mk "gyakusatsu"; }}; }}; }}
"#
        ),
    )
    .unwrap();
    let flakes = format!("{NIX_CONFIG}\nexperimental-features = nix-command flakes");
    let a = format!("path:{}#shoshin", flake.display());
    let b = format!("path:{}#gyakusatsu", flake.display());
    let logs = dir.path().join("logs");
    let o = larder(&server, &token, &["build", "ws", &a, &b, "--log-dir"])
        .arg(&logs)
        .env("NIX_CONFIG", &flakes)
        .env("XDG_CACHE_HOME", dir.path().join("xdg"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        report.contains("[1/2] Building:") && report.contains("[2/2] Building:"),
        "{report}"
    );
    assert!(
        report.contains("Build time:") && report.contains("Push time:"),
        "{report}"
    );
    assert!(report.contains("Artifacts: 2 paths pushed"), "{report}"); // output + lib
    assert!(report.contains("Artifacts: 1 path pushed"), "{report}"); // lib already there
    let log_line = report.lines().find(|l| l.starts_with("Logs: ")).unwrap();
    let log = Path::new(log_line.trim_start_matches("Logs: "));
    assert!(log.starts_with(&logs) && log.exists(), "{report}");
    let name = log.file_name().unwrap().to_str().unwrap();
    assert!(
        name.starts_with("build-") && name.ends_with(".log") && name.len() == 25,
        "{name}"
    );
    // The log shows each command as it can be run again.
    let text = std::fs::read_to_string(log).unwrap();
    assert!(
        text.contains(&format!("$ nix build --json --no-link -L {b}\n")),
        "{text}"
    );
    // Again, for scripts: one JSON object per installable, then the summary; nothing new.
    let o = larder(
        &server,
        &token,
        &["build", "ws", &a, &b, "--json", "--log-dir"],
    )
    .arg(&logs)
    .env("NIX_CONFIG", &flakes)
    .env("XDG_CACHE_HOME", dir.path().join("xdg"))
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3, "{events:?}");
    for e in &events[..2] {
        assert_eq!(e["ok"], true, "{e}");
        assert_eq!(e["pushed"], 0, "{e}");
        assert_eq!(e["present"], 2, "{e}");
    }
    assert_eq!(events[2]["summary"], true);
    assert_eq!(events[2]["failed"], 0);

    // The consumer: its own store, configured from `larder use --mode print`.
    let lines = server.cli_ok(&token, &["use", "ws", "--mode", "print"]);
    let nixconf: String = lines
        .lines()
        .filter(|l| {
            l.starts_with("extra-substituters") || l.starts_with("extra-trusted-public-keys")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(nixconf.lines().count() == 2, "{lines}");
    let consumer = dir.path().join("consumer");
    let consumer_conf = format!("{flakes}\nstore = {}\n{nixconf}", consumer.display());
    // Not configured: the pull refuses and says what to run.
    let o = larder(&server, &token, &["pull", "ws", &a])
        .env(
            "NIX_CONFIG",
            format!("{flakes}\nstore = {}", consumer.display()),
        )
        .env("XDG_CACHE_HOME", dir.path().join("xdg"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("larder use ws"));
    // Dry run: the plan, nothing realised.
    let o = larder(&server, &token, &["pull", "ws", &a, &b, "--dry-run"])
        .env("NIX_CONFIG", &consumer_conf)
        .env("XDG_CACHE_HOME", dir.path().join("xdg"))
        .output()
        .unwrap();
    let plan = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{plan}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        plan.contains("3 paths to fetch")
            && plan.contains("3 of them from ws")
            && plan.contains("0 derivations to build"),
        "{plan}"
    );
    let o = larder(
        &server,
        &token,
        &["pull", "ws", &a, &b, "--dry-run", "--json"],
    )
    .env("NIX_CONFIG", &consumer_conf)
    .env("XDG_CACHE_HOME", dir.path().join("xdg"))
    .output()
    .unwrap();
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(plan["fetch_from_cache"], 3, "{plan}");
    assert!(
        plan["fetch_from_cache_nar_bytes"].as_u64().unwrap() > 0,
        "{plan}"
    );
    assert_eq!(plan["build"].as_array().unwrap().len(), 0, "{plan}");
    let marker = dir.path().join("switched");
    let o = larder(&server, &token, &["pull", "ws", &a, &b, "--", "touch"])
        .arg(&marker)
        .env("NIX_CONFIG", &consumer_conf)
        .env("XDG_CACHE_HOME", dir.path().join("xdg"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let url = format!("{}/ws", server.url);
    assert!(
        report.contains(&format!("Fetched: 3 paths (3 from {url}: ")),
        "{report}"
    );
    assert!(report.contains("Built locally: 0"), "{report}");
    assert!(marker.exists(), "the command after -- did not run");
    // The consumer store verifies (contents and signatures by the cache's key).
    let outs = larder_testkit::nix::command("nix")
        .args(["build", "--dry-run", "--json", "--no-link", &a, &b])
        .env("NIX_CONFIG", &consumer_conf)
        .env("XDG_CACHE_HOME", dir.path().join("xdg"))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&outs.stdout).unwrap();
    let paths: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["outputs"]["out"].as_str().unwrap().to_owned())
        .collect();
    let o = larder_testkit::nix::command("nix")
        .args(["store", "verify", "-r"])
        .args(&paths)
        .env("NIX_CONFIG", &consumer_conf)
        .env("XDG_CACHE_HOME", dir.path().join("xdg"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The seed's "falls back to local build if cache unavailable": with the cache's server down,
/// `larder pull` warns, builds locally, and succeeds.
#[test]
fn pull_builds_locally_when_the_cache_is_down() {
    require_nix();
    let server = Server::start();
    server.create_cache("down", &[]);
    let token = server.token("pull", "down");
    let nixconf = use_lines(&server, &token, "down");
    let dir = tempfile::tempdir().unwrap();
    let file = write_app_file(dir.path(), "fallback", "local");
    let url = server.url.clone();
    let home = dir.path().join("home");
    assert!(server.stop().success());
    let o = larder_testkit::nix::command(larder_bin())
        .args(["pull", "down", "-f"])
        .arg(&file)
        .arg("app")
        .env("LARDER_SERVER", &url)
        .env("LARDER_TOKEN", &token)
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        // Nix's defaults otherwise (`substituters` is cache.nixos.org, `fallback = false`),
        // as a user has them: only what root without a daemon needs is set.
        .env(
            "NIX_CONFIG",
            format!("{}\n{nixconf}", larder_testkit::nix::NIX_CONFIG_BASE),
        )
        .env("XDG_CACHE_HOME", dir.path().join("xdg"))
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("! Cache unreachable"), "{out}");
    assert!(
        err.contains("is unreachable") && err.contains("built locally"),
        "{err}"
    );
    assert!(out.contains("Built locally: 1"), "{out}");
}

/// Like a shell: a command that does not exist is exit status 127, with the reason.
#[test]
fn watch_exec_of_a_missing_command_exits_127() {
    require_nix();
    let server = Server::start();
    server.create_cache("exec", &[]);
    let token = server.token("push", "exec");
    let o = larder(
        &server,
        &token,
        &["watch-exec", "exec", "--", "no-such-command-anywhere"],
    )
    .env("NIX_CONFIG", NIX_CONFIG)
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(127), "{err}");
    assert!(
        err.contains("cannot run \"no-such-command-anywhere\""),
        "{err}"
    );
}

#[test]
fn pull_from_a_private_cache_nix_cannot_read_stops_with_the_fix() {
    require_nix();
    let server = Server::start();
    server.create_cache("hidden", &["--private"]);
    let token = server.token("pull", "hidden");
    let nixconf = use_lines(&server, &token, "hidden");
    let dir = tempfile::tempdir().unwrap();
    let file = write_app_file(dir.path(), "private", "x");
    let home = dir.path().join("home");
    let pull = |netrc: &std::path::Path| {
        larder_testkit::nix::command(larder_bin())
            .args(["pull", "hidden", "--dry-run", "-f"])
            .arg(&file)
            .arg("app")
            .env("LARDER_SERVER", &server.url)
            .env("LARDER_TOKEN", &token)
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env(
                "NIX_CONFIG",
                format!("{NIX_CONFIG}\n{nixconf}netrc-file = {}\n", netrc.display()),
            )
            .env("XDG_CACHE_HOME", dir.path().join("xdg"))
            .output()
            .unwrap()
    };
    // The substituter is configured, but Nix has no credentials for it: not a cache miss.
    let o = pull(&dir.path().join("no-netrc"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("Nix would be refused") && err.contains("has no entry for 127.0.0.1"),
        "{err}"
    );
    assert!(err.contains("larder use hidden"), "{err}");
    // A wrong token in the netrc: the same, naming the token.
    let bad = server.netrc(dir.path(), "bad-netrc", "larder_wrong");
    let err = String::from_utf8_lossy(&pull(&bad).stderr).into_owned();
    assert!(err.contains("cannot read cache hidden"), "{err}");
    // The netrc `use` would write: the plan goes on.
    let good = server.netrc(dir.path(), "netrc", &token);
    let o = pull(&good);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn build_passes_nix_arguments_through() {
    require_nix();
    let server = Server::start();
    server.create_cache("args", &[]);
    let token = server.token("push", "args");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("default.nix");
    let tag = unique_tag();
    std::fs::write(
        &file,
        format!(
            "{{ greeting, times }}: {{ app = derivation {{ name = \"args-{tag}\"; \
             system = builtins.currentSystem; builder = \"/bin/sh\"; \
             args = [\"-c\" \"echo ${{greeting}} ${{toString times}} > $out\"]; }}; }}"
        ),
    )
    .unwrap();
    let o = larder(
        &server,
        &token,
        &[
            "build",
            "args",
            "-f",
            file.to_str().unwrap(),
            "app",
            "--argstr",
            "greeting",
            "hello",
            "--arg",
            "times",
            "3",
            "--option",
            "max-jobs",
            "1",
            "--impure",
        ],
    )
    .env("NIX_CONFIG", NIX_CONFIG)
    .env("XDG_CACHE_HOME", dir.path().join("xdg"))
    .output()
    .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // What Nix built with the arguments, pushed to the cache.
    let built = build_expr(&format!(
        "(import {} {{ greeting = \"hello\"; times = 3; }}).app",
        file.display()
    ))
    .remove(0);
    assert_eq!(std::fs::read_to_string(&built).unwrap(), "hello 3\n");
    let hash = &built["/nix/store/".len()..][..32];
    assert_eq!(
        server.http("GET", &format!("/args/{hash}.narinfo"), None).0,
        200
    );
}

#[test]
fn build_and_pull_alone_do_the_daily_job_from_larder_toml() {
    require_nix();
    let server = Server::start();
    server.create_cache("daily", &[]);
    let token = server.token("push", "daily");
    let dir = tempfile::tempdir().unwrap();
    let tag = unique_tag();
    std::fs::write(
        dir.path().join("default.nix"),
        format!(
            "{{ app = derivation {{ name = \"daily-{tag}\"; system = builtins.currentSystem; \
             builder = \"/bin/sh\"; args = [\"-c\" \"echo daily > $out\"]; }}; }}"
        ),
    )
    .unwrap();
    // Without a cache and without larder.toml: what to write.
    let o = larder(&server, &token, &["build"])
        .current_dir(dir.path())
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("larder.toml") && err.contains("cache = "),
        "{err}"
    );

    std::fs::write(
        dir.path().join("larder.toml"),
        "cache = \"daily\"\nfile = \"default.nix\"\nbuild = [\"app\"]\npull = [\"app\"]\n",
    )
    .unwrap();
    let o = larder(&server, &token, &["build"])
        .current_dir(dir.path())
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("XDG_CACHE_HOME", dir.path().join("xdg"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("All 1 builds completed and pushed"), "{out}");
    // `larder pull` alone, on a consumer whose Nix uses the cache.
    let nixconf = use_lines(&server, &token, "daily");
    let store = dir.path().join("consumer");
    let o = larder(&server, &token, &["pull"])
        .current_dir(dir.path())
        .env(
            "NIX_CONFIG",
            format!("{NIX_CONFIG}\nstore = {}\n{nixconf}", store.display()),
        )
        .env("XDG_CACHE_HOME", dir.path().join("xdg2"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("Built locally: 0"), "{out}");
}
