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
    // A misspelt cache name says so, with the names the token is for (its own to know).
    let o = server.cli(&server.token("push", "gate"), &["push", "gaet", &p]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(r#"not valid for cache "gaet" (only for "gate")"#)
            && err.contains("hint: check the cache's name"),
        "{err}"
    );
    // An admin token, which would see the cache, is told the closest name there is.
    for args in [vec!["push", "gatr", &p], vec!["cache", "info", "gatr"]] {
        let o = server.cli(&server.admin_token, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(r#"no cache named "gatr""#) && err.contains(r#"did you mean "gate"?"#),
            "{args:?}: {err}"
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
    // The repair hint on a line of its own, after the error naming the path.
    assert!(
        err.lines()
            .any(|l| l.starts_with("hint: check it with `nix-store --verify-path")),
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

/// A damaged path fails alone with the paths that refer to it, each of which names it; the
/// rest of the closure is published.
#[test]
fn a_damaged_path_fails_with_its_referrers_which_name_it() {
    require_nix();
    let server = Server::start();
    server.create_cache("dmg", &[]);
    let push = server.token("push", "dmg");
    let unique = unique_tag();
    let drv = |name: &str, body: &str| {
        format!(
            "derivation {{ name = \"{name}-{unique}\"; system = builtins.currentSystem; \
             builder = \"/bin/sh\"; args = [\"-c\" \"echo {body} > $out\"]; }}"
        )
    };
    let (lib, other) = (drv("dmg-lib", "lib"), drv("dmg-other", "other"));
    let app = build_expr(&format!(
        "let lib = {lib}; other = {other}; in {}",
        drv("dmg-app", "${lib} ${other}")
    ))
    .remove(0);
    let lib_path = build_expr(&lib).remove(0);
    let _ = Command::new("chmod").args(["u+w", &lib_path]).status();
    std::fs::write(&lib_path, "LIB\n").unwrap();
    let o = server.cli(&push, &["push", "dmg", &app]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("is corrupt"), "{err}");
    assert!(
        err.contains(&format!("a path it references failed to push ({lib_path})")),
        "{err}"
    );
    assert!(err.contains("2 of 3 paths failed"), "{err}");
    let info: serde_json::Value = serde_json::from_str(
        &server.cli_ok(&server.admin_token, &["cache", "info", "dmg", "--json"]),
    )
    .unwrap();
    assert_eq!(info["paths"], 1, "the undamaged reference is published");
    let _ = larder_testkit::nix::command("nix-store")
        .env("NIX_CONFIG", NIX_CONFIG)
        .args(["--delete", &app, &lib_path])
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
    let work = run_oracle_with_push(
        &server,
        "parts",
        key,
        "LARDER_PUSH_PART_SIZE=64KiB LARDER_PUSH_NO_CHUNKING=1",
    );
    // The 1 MiB path went up in 16 parts or more (and its small paths in a batch).
    let parts = server.requests_to("/multipart/{id}/parts/{n}");
    assert!(
        parts >= 16,
        "expected the big NAR in 16+ parts, found {parts}"
    );
    assert!(server.requests_to("/paths/batch") >= 1);
    let _ = std::fs::remove_dir_all(work);
}

/// Compressed, as to a server on another machine (zstd, or xz when asked), small paths go up
/// in batches whose body is one compressed stream, ended properly: real Nix substitutes every
/// path of the closure.
#[test]
fn compressed_batches_pass_the_oracle() {
    require_nix();
    let server = Server::start();
    for comp in ["zstd", "xz"] {
        let cache = format!("batch-{comp}");
        let info = server.create_cache(&cache, &[]);
        let key = info["public_key"].as_str().unwrap();
        let work = tempfile::tempdir().unwrap();
        let push = format!(
            "env -u LARDER_CONFIG HOME={home} LARDER_SERVER={url} LARDER_TOKEN={token} {bin} \
             push --compression {comp} {cache} \"$TOP\"",
            home = work.path().display(),
            url = server.url,
            token = server.token("push", &cache),
            bin = larder_bin(),
        );
        let cache_url = format!("{}/{cache}", server.url);
        oracle_pass(&work.path().join("oracle"), &cache_url, key, Some(push));
    }
    assert!(server.requests_to("/paths/batch") >= 2);
}

/// `--no-closure` with a reference the cache lacks fails once, saying which, without a round
/// of "references were evicted … sending them again" that sends nothing.
#[test]
fn no_closure_with_a_missing_reference_fails_once_and_names_it() {
    require_nix();
    let server = Server::start();
    server.create_cache("nc", &[]);
    let push = server.token("push", "nc");
    let unique = unique_tag();
    let app = build_expr(&format!(
        "let lib = derivation {{ name = \"nc-lib-{unique}\"; system = builtins.currentSystem; \
         builder = \"/bin/sh\"; args = [\"-c\" \"echo lib > $out\"]; }}; in \
         derivation {{ name = \"nc-app-{unique}\"; system = builtins.currentSystem; \
         builder = \"/bin/sh\"; args = [\"-c\" \"echo ${{lib}} > $out\"]; }}"
    ))
    .remove(0);
    let o = server.cli(&push, &["push", "--no-closure", "nc", &app]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("nc-lib-{unique}")), "{err}");
    assert!(!err.contains("evicted"), "{err}");
    assert_eq!(err.matches("not in cache").count(), 1, "{err}");
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

// ---- resuming interrupted uploads ------------------------------------------------------------

/// A store path of `mib` MiB of random bytes (incompressible), built by real Nix.
fn random_path(name: &str, mib: u32) -> String {
    let unique = format!("{name}-{}", unique_tag());
    build_expr(&format!(
        "derivation {{ name = \"{unique}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; \
         args = [\"-c\" \"export PATH=/bin:/usr/bin; head -c {mib}M /dev/urandom > $out\"]; }}"
    ))
    .remove(0)
}

/// The parts of unfinished multi-part uploads in the server's staging directory.
fn staged_parts(data: &std::path::Path) -> usize {
    let Ok(dirs) = std::fs::read_dir(data.join("store/tmp")) else {
        return 0;
    };
    dirs.flatten()
        .filter(|d| d.file_name().to_string_lossy().starts_with("multipart-"))
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .filter(|f| {
            // `part-NNNNNN`, not what the server measured of it (`part-NNNNNN.json`).
            let name = f.file_name().to_string_lossy().into_owned();
            name.starts_with("part-") && !name.contains('.')
        })
        .count()
}

/// [`staged_parts`] once it has stayed the same for half a second (at most 10 s).
fn settled_parts(data: &std::path::Path) -> usize {
    let mut last = staged_parts(data);
    for _ in 0..20 {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let now = staged_parts(data);
        if now == last {
            break;
        }
        last = now;
    }
    last
}

/// Body bytes the server received in multi-part part uploads since it started (`/metrics`).
fn part_bytes_received(server: &Server) -> u64 {
    let (code, metrics) = server.http("GET", "/metrics", None);
    assert_eq!(code, 200, "{metrics}");
    let series = "larder_http_request_body_bytes_total{route=\"/api/v1/caches/{cache}/multipart/{id}/parts/{n}\",method=\"PUT\"} ";
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .map_or(0, |n| n.parse().unwrap())
}

/// `larder push ARGS` against `server` with `token`, running (as `Server::cli` runs it).
fn spawn_push(server: &Server, token: &str, args: &[&str]) -> std::process::Child {
    let home = server.data.path().join("client-home");
    std::fs::create_dir_all(&home).unwrap();
    larder_testkit::nix::command(larder_bin())
        .args(args)
        .env("LARDER_SERVER", &server.url)
        .env("LARDER_TOKEN", token)
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env_remove("LARDER_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

/// Wait until the server at `data` holds at least `n` parts while `push` runs.
fn wait_for_parts(data: &std::path::Path, push: &mut std::process::Child, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    while staged_parts(data) < n {
        if let Some(status) = push.try_wait().unwrap() {
            panic!("larder push ended ({status}) before the server held {n} parts");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {n} parts in 240 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The JSON event lines of a `larder push --json` run.
fn events(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Push `path` with `--json` and 4 MiB parts; returns its events and the part bytes the server
/// received meanwhile.
fn push_measured(
    server: &Server,
    token: &str,
    cache: &str,
    path: &str,
) -> (Vec<serde_json::Value>, u64) {
    let before = part_bytes_received(server);
    let out = server.cli_ok(
        token,
        &[
            "push",
            cache,
            path,
            "--part-size",
            "4MiB",
            "--no-chunking",
            "--json",
        ],
    );
    let events = events(&out);
    assert_eq!(summary(&out)["pushed"], 1, "{out}");
    (events, part_bytes_received(server) - before)
}

/// The `resumed` event of a push: (parts, NAR bytes) the server had.
fn resumed(events: &[serde_json::Value]) -> Option<(u64, u64)> {
    events.iter().find(|e| e["event"] == "resumed").map(|e| {
        (
            e["parts"].as_u64().unwrap(),
            e["nar_bytes"].as_u64().unwrap(),
        )
    })
}

/// Assert that `sent` compressed bytes are about `nar` bytes of random data (zstd adds a few
/// bytes per block).
#[track_caller]
fn about(sent: u64, nar: u64) {
    assert!(
        sent >= nar - nar / 100 && sent <= nar + nar / 100 + (64 << 10),
        "sent {sent} bytes for {nar} NAR bytes"
    );
}

/// Real Nix substitutes `path` from `cache` into a fresh store, checking its signature, and
/// verifies it.
fn nix_substitutes(server: &Server, cache: &str, key: &str, path: &str) {
    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("store");
    let conf = format!("{NIX_CONFIG}\nrequire-sigs = true\ntrusted-public-keys = {key}");
    for args in [
        vec!["copy", "--from", &format!("{}/{cache}", server.url), "--to"],
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
        assert!(
            o.status.success(),
            "nix {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Ctrl-C during a multi-part upload: the push stops at once, says what was pushed and what
/// the server keeps, exits 130, and leaves the upload on the server; the same command run
/// again sends only the parts the server lacks, and real Nix substitutes the result.
#[test]
fn ctrl_c_keeps_the_parts_and_a_rerun_sends_only_the_rest() {
    require_nix();
    let server = Server::start();
    let info = server.create_cache("resume", &[]);
    let key = info["public_key"].as_str().unwrap();
    let push = server.token("push", "resume");
    let p = random_path("resume-big", 64);
    let mut child = spawn_push(
        &server,
        &push,
        &["push", "resume", &p, "--part-size", "4MiB", "--no-chunking"],
    );
    wait_for_parts(server.data.path(), &mut child, 4);
    // Frozen there, so that Ctrl-C lands mid-upload however fast the machine.
    signal(&child, "STOP");
    let held = staged_parts(server.data.path());
    assert!(
        held < 17,
        "the upload finished before Ctrl-C ({held} parts)"
    );
    signal(&child, "INT");
    signal(&child, "CONT");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("error: interrupted after pushing 0 of 1 path (0 B NAR)"),
        "{err}"
    );
    let told: usize = err
        .split("kept on the server: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("{err}"))
        .parse()
        .unwrap();
    assert!(
        err.contains(&format!("MiB of 64.0 MiB NAR) of {p}")),
        "{err}"
    );
    assert!(
        err.contains("hint: run the same command again to resume"),
        "{err}"
    );
    // The upload is not abandoned: the server keeps every part it stored (a part whose body
    // had all arrived before Ctrl-C may still be landing: count once the count holds).
    let kept = settled_parts(server.data.path());
    assert!(
        kept >= held && told <= kept && told + 1 >= held,
        "{told} {held} {kept}"
    );

    let (events, sent) = push_measured(&server, &push, "resume", &p);
    let (parts, nar_bytes) = resumed(&events).unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(parts, kept as u64);
    assert_eq!(nar_bytes, parts * (4 << 20));
    let nar_size = events[0]["nar_bytes"].as_u64().unwrap();
    about(sent, nar_size - nar_bytes);
    assert_eq!(staged_parts(server.data.path()), 0);
    nix_substitutes(&server, "resume", key, &p);
}

/// The server stops mid-upload (SIGTERM, or SIGKILL as a crash would), the push is stopped,
/// and the server starts again on the same data directory: another cache's token neither sees
/// nor resumes the upload (its push of the same path sends it whole), and the same push
/// resumes it.
fn resume_after_server_stop(sig: &str) {
    require_nix();
    let mut server = Server::start();
    let info = server.create_cache("resume", &[]);
    let key = info["public_key"].as_str().unwrap().to_owned();
    let other_info = server.create_cache("other", &[]);
    let other_key = other_info["public_key"].as_str().unwrap().to_owned();
    let push = server.token("push", "resume");
    let other = server.token("push", "other");
    let p = random_path(&format!("restart-{}", sig.to_lowercase()), 64);
    let mut child = spawn_push(
        &server,
        &push,
        &[
            "push",
            "resume",
            &p,
            "--part-size",
            "4MiB",
            "--no-chunking",
            "--json",
        ],
    );
    wait_for_parts(server.data.path(), &mut child, 4);
    let data = if sig == "TERM" {
        server.stop_keeping_data()
    } else {
        server.crash();
        std::mem::replace(&mut server.data, tempfile::tempdir().unwrap())
    };
    signal(&child, "INT");
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // In JSON, the last event says what the server keeps.
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = events(&stdout).pop().unwrap();
    assert_eq!(last["event"], "interrupted", "{stdout}");
    assert_eq!(last["pushed"], 0, "{stdout}");
    assert_eq!(last["kept"][0]["path"], p.as_str(), "{stdout}");
    assert!(last["kept"][0]["parts"].as_u64().unwrap() >= 3, "{stdout}");

    let server = Server::start_in(data, &[], None);
    let kept = staged_parts(server.data.path());
    assert!(kept >= 4, "{kept} parts kept across the restart");
    let (events, sent) = push_measured(&server, &other, "other", &p);
    assert_eq!(resumed(&events), None, "{events:?}");
    let nar_size = events[0]["nar_bytes"].as_u64().unwrap();
    about(sent, nar_size);
    assert_eq!(staged_parts(server.data.path()), kept, "untouched");

    let (events, sent) = push_measured(&server, &push, "resume", &p);
    let (parts, nar_bytes) = resumed(&events).unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(parts, kept as u64);
    about(sent, nar_size - nar_bytes);
    nix_substitutes(&server, "resume", &key, &p);
    nix_substitutes(&server, "other", &other_key, &p);
}

#[test]
fn an_upload_resumes_after_the_server_stops() {
    resume_after_server_stop("TERM");
}

#[test]
fn an_upload_resumes_after_the_server_crashes() {
    resume_after_server_stop("KILL");
}
