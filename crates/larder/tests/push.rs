//! `larder push` judged by real Nix: the oracle builds a closure, `larder push` uploads it with
//! env-only configuration, and real Nix substitutes it into fresh stores and verifies
//! signatures (the cache's managed key, or a client-held key from `generate-keypair`).

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn run_oracle_with_push(
    server: &Server,
    cache: &str,
    key: &str,
    push_env: &str,
) -> std::path::PathBuf {
    let work = tempfile::tempdir().unwrap().keep();
    let push_token = server.token("push", cache);
    let cache_url = format!("{}/{cache}", server.url);
    let env = vec![
        ("CACHE_URL", cache_url.clone()),
        ("TRUSTED_PUBLIC_KEY", key.to_owned()),
        (
            "PUSH_CMD",
            format!(
                "env -u LARDER_CONFIG HOME={home} LARDER_SERVER={url} LARDER_TOKEN={push_token} {push_env} {bin} push {cache} \"$TOP\"",
                home = work.display(),
                url = server.url,
                bin = larder_bin(),
            ),
        ),
    ];
    let out = oracle(&["run"], &work.join("oracle"), &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "oracle failed:\n{stderr}");
    assert!(stderr.contains(&format!("PASS {cache_url}")), "{stderr}");
    work
}

fn top_of(work: &std::path::Path) -> String {
    std::fs::read_to_string(work.join("oracle/top"))
        .unwrap()
        .trim()
        .to_owned()
}

fn summary(stdout: &str) -> serde_json::Value {
    let last = stdout.lines().last().expect("json lines");
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["event"], "summary", "{stdout}");
    v
}

#[test]
fn push_managed_cache_then_second_push_uploads_nothing() {
    require_nix();
    let server = Server::start();
    let info = server.create_cache("managed", &[]);
    let key = info["public_key"].as_str().unwrap();
    let work = run_oracle_with_push(&server, "managed", key, "");
    let top = top_of(&work);
    let push = server.token("push", "managed");
    let out = server.cli_ok(&push, &["push", "managed", &top, "--json"]);
    let s = summary(&out);
    assert_eq!(s["pushed"], 0, "{out}");
    assert_eq!(s["failed"], 0);
    assert_eq!(s["bytes"], 0);
    assert!(s["skipped"].as_u64().unwrap() >= 20);
    let info = server.create_cache("managed2", &[]);
    assert_eq!(info["paths"], 0);
    // Dry run: lists, uploads nothing.
    let out = server.cli_ok(&push, &["push", "managed", &top, "--dry-run", "--json"]);
    assert!(out.contains("\"dry_run\":true"), "{out}");
    let _ = std::fs::remove_dir_all(work);
}

#[test]
fn push_client_signed_cache_with_generated_key() {
    require_nix();
    let server = Server::start();
    server.create_cache("signed", &[]);
    // generate-keypair prints the public key and keeps the secret in the client config,
    // shown nowhere (terminal scrollback, CI logs); the cache then refuses unsigned uploads.
    let out = server.cli(&server.admin_token, &["generate-keypair", "signed"]);
    assert!(out.status.success());
    let info: serde_json::Value = serde_json::from_str(
        &server.cli_ok(&server.admin_token, &["cache", "info", "signed", "--json"]),
    )
    .unwrap();
    assert_eq!(info["signing_mode"], "client");
    let key = info["public_key"].as_str().unwrap().to_owned();
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{key}\n"));
    let config = server
        .data
        .path()
        .join("client-home/.config/larder/config.toml");
    let config: toml::Table = toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let secret = config["signing_keys"]
        .as_table()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let secret_part = secret.split_once(':').unwrap().1;
    assert!(!stderr.contains(secret_part), "{stderr}");
    assert!(stderr.contains("--print-secret"), "{stderr}");
    // Without the key: a clear error before anything is uploaded.
    let p = build_file("unsigned", "x");
    let push = server.token("push", "signed");
    // The key is in the client config that generate-keypair wrote: that push signs.
    let out = server.cli_ok(&push, &["push", "signed", &p, "--json"]);
    assert_eq!(summary(&out)["pushed"], 1, "{out}");
    // On another machine (a fresh HOME) without the key: refused before uploading.
    let p = build_file("unsigned2", "z");
    let home = tempfile::tempdir().unwrap();
    let o = larder_testkit::nix::command(larder_bin())
        .args(["push", "signed", &p])
        .env("LARDER_SERVER", &server.url)
        .env("LARDER_TOKEN", &push)
        .env("HOME", home.path())
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("LARDER_SIGNING_KEY")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("LARDER_SIGNING_KEY"), "{err}");
    // With the key (env only), the oracle passes with the client key as the trusted key.
    let work = run_oracle_with_push(
        &server,
        "signed",
        &key,
        &format!("LARDER_SIGNING_KEY={secret}"),
    );
    let _ = std::fs::remove_dir_all(work);

    // Running it again would strand every signed path: refused, the key is unchanged.
    let o = server.cli(&server.admin_token, &["generate-keypair", "signed"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--rotate") && err.contains(&key), "{err}");
    let info: serde_json::Value = serde_json::from_str(
        &server.cli_ok(&server.admin_token, &["cache", "info", "signed", "--json"]),
    )
    .unwrap();
    assert_eq!(info["public_key"], key.as_str());
    // On purpose: a new name, and the line consumers need to trust both.
    let o = server.cli(
        &server.admin_token,
        &["generate-keypair", "signed", "--rotate", "--print-secret"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    // Asked for, the secret is printed as the line a CI secret or a shell takes.
    let printed = String::from_utf8_lossy(&o.stdout);
    assert!(
        printed.starts_with("export LARDER_SIGNING_KEY=signed.127.0.0.1-client-2:"),
        "{printed}"
    );
    let info: serde_json::Value = serde_json::from_str(
        &server.cli_ok(&server.admin_token, &["cache", "info", "signed", "--json"]),
    )
    .unwrap();
    let new_key = info["public_key"].as_str().unwrap();
    assert!(
        new_key.starts_with("signed.127.0.0.1-client-2:"),
        "{new_key}"
    );
    assert!(
        err.contains(&format!("extra-trusted-public-keys = {key} {new_key}")),
        "{err}"
    );
}

#[test]
fn push_through_a_nix_daemon() {
    require_nix();
    let server = Server::start();
    let info = server.create_cache("viadaemon", &[]);
    let key = info["public_key"].as_str().unwrap();
    let sockdir = tempfile::tempdir().unwrap();
    let socket = sockdir.path().join("socket");
    let mut daemon = larder_testkit::nix::command("nix-daemon")
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("NIX_DAEMON_SOCKET_PATH", &socket)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start nix-daemon");
    // Ready once it accepts a connection (the socket file exists a moment before).
    for _ in 0..400 {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let env = format!("NIX_REMOTE=unix://{}", socket.display());
    let work = run_oracle_with_push(&server, "viadaemon", key, &env);
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = std::fs::remove_dir_all(work);
}

#[test]
fn push_bad_input_fails_clearly_and_stores_nothing() {
    require_nix();
    let server = Server::start();
    server.create_cache("strict", &[]);
    let push = server.token("push", "strict");
    let pull = server.token("pull", "strict");
    let strict_url = format!("{}/strict", server.url);
    let cases: Vec<(Vec<&str>, &str, String)> = vec![
        (
            vec!["push", "strict", "/etc/passwd"],
            "not in the Nix store",
            push.clone(),
        ),
        (
            vec![
                "push",
                "strict",
                "/nix/store/00000000000000000000000000000000-missing",
            ],
            "",
            push.clone(),
        ),
        (
            vec!["push", "nosuchcache", "/etc/passwd"],
            "nosuchcache",
            push.clone(),
        ),
        (
            vec!["push", "strict", "--exclude", "("],
            "regex",
            push.clone(),
        ),
        // The cache's URL works where its name does; a server's URL is named as such.
        (
            vec!["push", &strict_url, "/etc/passwd"],
            "not in the Nix store",
            push.clone(),
        ),
        (
            vec!["push", "http://127.0.0.1:1:strict", "/etc/passwd"],
            "is not a cache's URL",
            push.clone(),
        ),
    ];
    for (args, needle, token) in cases {
        let o = server.cli(&token, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // A token without push: refused before anything is sent, with the fix.
    let xdg = tempfile::tempdir().unwrap();
    let p = build_file("badinput", "y");
    let o = server.cli(&pull, &["push", "strict", &p]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot push to \"strict\"")
            && err.contains("larder token create --perm push --cache strict"),
        "{err}"
    );
    // An unreachable server.
    let o = larder_testkit::nix::command(larder_bin())
        .args(["push", "strict", &p])
        .env("LARDER_SERVER", "http://127.0.0.1:9")
        .env("LARDER_TOKEN", &push)
        .env("HOME", xdg.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot reach") && err.contains("hint:"),
        "{err}"
    );
    let info: serde_json::Value = serde_json::from_str(
        &server.cli_ok(&server.admin_token, &["cache", "info", "strict", "--json"]),
    )
    .unwrap();
    assert_eq!(info["paths"], 0);
}

/// A token that cannot push is one clear error, once, before any upload: also when every
/// path is already in the (public) cache, where nothing else would have noticed.
#[test]
fn a_token_that_cannot_push_fails_once_even_with_nothing_to_push() {
    require_nix();
    let server = Server::start();
    server.create_cache("gate", &[]);
    server.create_cache("elsewhere", &[]);
    let p = build_file("gate", "g");
    server.cli_ok(&server.token("push", "gate"), &["push", "gate", &p]);
    let expiring = server
        .cli_ok(
            &server.admin_token,
            &[
                "token",
                "create",
                "--perm",
                "push",
                "--cache",
                "gate",
                "--expires",
                "1s",
            ],
        )
        .trim()
        .to_owned();
    let created: serde_json::Value = serde_json::from_str(&server.cli_ok(
        &server.admin_token,
        &[
            "token", "create", "--perm", "push", "--cache", "gate", "--json",
        ],
    ))
    .unwrap();
    let revoked = created["token"].as_str().unwrap().to_owned();
    server.cli_ok(
        &server.admin_token,
        &["token", "revoke", created["id"].as_str().unwrap()],
    );
    std::thread::sleep(Duration::from_secs(2));
    let cases = [
        ("larder_not-a-token".to_owned(), "invalid token"),
        (expiring, "token expired"),
        (revoked, "token revoked"),
        (server.token("pull", "gate"), "it has pull on caches gate"),
        (
            server.token("push", "elsewhere"),
            "it has push on caches elsewhere",
        ),
        (String::new(), "needs a token"),
    ];
    for (token, why) in cases {
        let o = server.cli(&token, &["push", "gate", &p]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{why}: {err}");
        assert!(
            err.contains(why) && err.contains("nothing was pushed"),
            "{why}: {err}"
        );
        assert_eq!(err.matches("error:").count(), 1, "{why}: {err}");
        assert!(
            err.contains("larder token create --perm push --cache gate"),
            "{err}"
        );
    }
}

#[test]
fn corrupted_store_path_is_refused_and_nothing_is_visible() {
    require_nix();
    let server = Server::start();
    server.create_cache("corrupt", &[]);
    let push = server.token("push", "corrupt");
    let p = build_file("tamper", "original");
    // Tamper with the store path's contents (same size, different bytes).
    let _ = Command::new("chmod").args(["u+w", &p]).status();
    std::fs::write(&p, "tampered\n").unwrap();
    let o = server.cli(&push, &["push", "corrupt", &p]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("corrupt") && err.contains("--repair-path"),
        "{err}"
    );
    let info: serde_json::Value = serde_json::from_str(
        &server.cli_ok(&server.admin_token, &["cache", "info", "corrupt", "--json"]),
    )
    .unwrap();
    assert_eq!(info["paths"], 0);
    let hash = &p["/nix/store/".len()..][..32];
    let o = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("{}/corrupt/{hash}.narinfo", server.url),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "404");
    // Clean up the tampered path so later runs are not confused by it.
    let _ = larder_testkit::nix::command("nix-store")
        .env("NIX_CONFIG", NIX_CONFIG)
        .args(["--delete", &p])
        .output();
}

#[test]
fn large_nars_are_pushed_in_parts() {
    require_nix();
    let server = Server::start();
    let info = server.create_cache("parts", &[]);
    let key = info["public_key"].as_str().unwrap();
    // 64 KiB parts: the oracle's 1 MiB path goes up in 16+ parts, stored as as many chunks,
    // and real Nix must still substitute it byte for byte.
    let work = run_oracle_with_push(&server, "parts", key, "LARDER_PUSH_PART_SIZE=64KiB");
    let chunks = walk_files(&server.data.path().join("store/objects"));
    assert!(
        chunks > 30,
        "expected the big NAR split into many chunks, found {chunks} objects"
    );
    let _ = std::fs::remove_dir_all(work);
}

fn walk_files(dir: &std::path::Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            n += walk_files(&e.path());
        } else {
            n += 1;
        }
    }
    n
}

/// A cache whose pins alone exceed its limit evicts every other path right after its upload:
/// the push fails and says so instead of leaving the user to find the path gone.
#[test]
fn a_push_into_a_cache_over_its_limit_fails_and_says_why() {
    require_nix();
    let server = Server::start();
    server.create_cache("tight", &[]);
    let push = server.token("push", "tight");
    // Incompressible content, well over the limit set below.
    let noise: String = (0..2000u32)
        .map(|i| format!("{:08x}", i.wrapping_mul(2_654_435_761)))
        .collect();
    let kept = build_file("kept", &noise);
    server.cli_ok(&push, &["push", "tight", &kept]);
    server.cli_ok(&server.admin_token, &["pin", "tight", "release", &kept]);
    server.cli_ok(
        &server.admin_token,
        &["cache", "configure", "tight", "--max-size", "1KiB"],
    );
    let o = server.cli(&push, &["push", "tight", &build_file("fresh", "f")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("against its limit of 1.0 KiB") && err.contains("pinned"),
        "{err}"
    );
    assert!(err.contains("cache \"tight\" evicted 1 path"), "{err}");
    // Under the limit, a push says nothing of the kind.
    server.cli_ok(
        &server.admin_token,
        &["cache", "configure", "tight", "--max-size", "1GiB"],
    );
    let o = server.cli(&push, &["push", "tight", &build_file("fresh2", "f")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && !err.contains("limit"), "{err}");
}
