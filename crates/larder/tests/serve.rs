//! `larder serve` itself, as a user starts it: configuration mistakes stop it at start with a
//! message naming the setting, and what it prints at start tells the user what to run next.

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

use common::*;

/// `larder serve --listen 127.0.0.1:0 --data DATA ARGS…` with `env`, which must fail at
/// start: its exit status is 1 and its stderr is returned. (`timeout`: a server that starts
/// anyway fails the test instead of hanging it.)
fn serve_fails(data: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = larder_testkit::nix::command("timeout");
    cmd.args([
        "20",
        larder_bin(),
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data",
    ])
    .arg(data)
    .args(args)
    .env_remove("LARDER_SERVE_CONFIG")
    .env_remove("LARDER_PUBLIC_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "larder serve {args:?}: {stderr}"
    );
    stderr
}

/// The line of the start-up message that shows how to log in.
fn login_line(lines: &[String]) -> &str {
    lines
        .iter()
        .find(|l| l.trim_start().starts_with("larder login "))
        .unwrap_or_else(|| panic!("no login hint:\n{}", lines.join("\n")))
}

#[test]
fn the_login_hint_uses_the_public_url() {
    // Through the harness (listening on 127.0.0.1): the hint names the public URL, not the
    // address bound.
    let server = Server::start_with(&["--public-url", "http://cache.example:1234/"]);
    let token_file = server.data.path().join("admin-token");
    assert!(
        server.log().contains(&format!(
            "  larder login http://cache.example:1234 \"$(cat {})\"",
            token_file.display()
        )),
        "{}",
        server.log()
    );
    // Without a public URL, the address bound is the one clients are told.
    let plain = Server::start();
    assert!(
        plain
            .log()
            .contains(&format!("larder login {} \"$(cat ", plain.url)),
        "{}",
        plain.log()
    );
    assert!(!plain.log().contains("warning"), "{}", plain.log());

    // Listening on every interface with a public URL: the public URL, no warning.
    let data = tempfile::tempdir().unwrap();
    let (mut child, lines) = serve_until_listening(
        data.path(),
        &[
            "--listen",
            "0.0.0.0:0",
            "--public-url",
            "http://shoshin.example:8080",
        ],
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        login_line(&lines).contains("larder login http://shoshin.example:8080 \"$(cat "),
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.contains("warning")), "{lines:?}");

    // Listening on every interface without one: 0.0.0.0 is no address to give clients, and
    // the server says so.
    let data = tempfile::tempdir().unwrap();
    let (mut child, lines) = serve_until_listening(data.path(), &["--listen", "0.0.0.0:0"]);
    let _ = child.kill();
    let _ = child.wait();
    let login = login_line(&lines);
    assert!(!login.contains("0.0.0.0"), "{lines:?}");
    assert!(
        login.contains("larder login http://<this machine's address>:"),
        "{lines:?}"
    );
    let warning = lines
        .iter()
        .find(|l| l.contains("warning"))
        .unwrap_or_else(|| panic!("no warning about 0.0.0.0: {lines:?}"));
    assert!(warning.contains("--public-url"), "{warning}");
}

#[test]
fn a_public_url_without_scheme_or_host_is_refused_from_flag_env_and_file() {
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("serve.toml");
    std::fs::write(&config, "public_url = \"shoshin:8080\"\n").unwrap();
    let config = config.to_str().unwrap();
    for (args, env) in [
        (vec!["--public-url", "shoshin:8080"], vec![]),
        (vec![], vec![("LARDER_PUBLIC_URL", "shoshin:8080")]),
        (vec!["--config", config], vec![]),
    ] {
        let stderr = serve_fails(data.path(), &args, &env);
        assert!(
            stderr.contains("invalid public_url \"shoshin:8080\""),
            "{args:?} {env:?}: {stderr}"
        );
        assert!(
            stderr.contains("--public-url, LARDER_PUBLIC_URL"),
            "{stderr}"
        );
        assert!(stderr.contains("http://shoshin:8080"), "{stderr}");
        assert!(!stderr.contains("listening on"), "{stderr}");
    }
    let stderr = serve_fails(data.path(), &["--public-url", "ftp://shoshin"], &[]);
    assert!(stderr.contains("http:// or https://"), "{stderr}");
    // Nothing was set up with the bad URL: no database, no admin token.
    assert!(!data.path().join("admin-token").exists());
    assert!(!data.path().join("larder.db").exists());
}

#[test]
fn a_second_server_on_the_same_data_directory_fails_fast() {
    let server = Server::start();
    let data = server.data.path().to_owned();
    let stderr = serve_fails(&data, &[], &[]);
    assert!(
        stderr.contains(&format!(
            "error: another larder serve is using {} (pid {})",
            data.display(),
            server.child.id()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("hint: stop it first"), "{stderr}");
    assert!(!stderr.contains("listening on"), "{stderr}");
    // The first one is untouched.
    assert_eq!(server.http("GET", "/healthz", None).0, 200);

    // Stopped, or killed, it leaves nothing that blocks the next start.
    let data = server.stop_keeping_data();
    let mut again = Server::start_in(data, &[], None);
    assert_eq!(again.http("GET", "/healthz", None).0, 200);
    again.crash();
    let data = std::mem::replace(&mut again.data, tempfile::tempdir().unwrap());
    let third = Server::start_in(data, &[], None);
    assert_eq!(third.http("GET", "/healthz", None).0, 200);
}
