//! The administration verbs (`larder cache …`, `larder token …`) against a real server: what
//! they print, and the mistakes they refuse with a message that says what to do instead.

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

use common::*;

/// Run the CLI, require exit status 1, and return its stderr.
#[track_caller]
fn fails(server: &Server, args: &[&str]) -> String {
    let out = server.cli(&server.admin_token, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "larder {args:?}: {stderr}");
    stderr
}

/// Create a token with `extra` arguments; returns its id.
fn token_id(server: &Server, extra: &[&str]) -> String {
    let mut args = vec!["token", "create", "--perm", "pull", "--json"];
    args.extend_from_slice(extra);
    let v: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&server.admin_token, &args)).unwrap();
    v["id"].as_str().unwrap().to_owned()
}

#[test]
fn token_list_says_which_tokens_still_work_and_useless_tokens_are_refused() {
    let server = Server::start();
    server.create_cache("tokens", &[]);

    let stderr = fails(
        &server,
        &["token", "create", "--perm", "pull", "--expires", "0s"],
    );
    assert!(stderr.contains("not in the future"), "{stderr}");
    let stderr = fails(
        &server,
        &[
            "token",
            "create",
            "--perm",
            "push",
            "--cache",
            "nosuchcache",
        ],
    );
    assert!(
        stderr.contains("no cache named \"nosuchcache\""),
        "{stderr}"
    );
    assert!(stderr.contains("larder cache list"), "{stderr}");

    let active = token_id(&server, &["--cache", "tokens", "--expires", "30d"]);
    let expired = token_id(&server, &["--cache", "tokens", "--expires", "1s"]);
    let revoked = token_id(&server, &[]);
    server.cli_ok(&server.admin_token, &["token", "revoke", &revoked]);
    // Expiry has a one-second resolution: wait until the token is certainly past it.
    std::thread::sleep(std::time::Duration::from_millis(2100));

    let list = server.cli_ok(&server.admin_token, &["token", "list"]);
    let state = |id: &str| -> String {
        let line = list
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("token {id} not listed:\n{list}"));
        line.split_whitespace().last().unwrap().to_owned()
    };
    assert_eq!(state(&active), "active", "{list}");
    assert_eq!(state(&expired), "expired", "{list}");
    assert_eq!(state(&revoked), "revoked", "{list}");
    // Only the refused requests made no token: bootstrap + the three above.
    assert_eq!(list.lines().count(), 1 + 4, "{list}");
}

#[test]
fn a_zero_max_size_is_refused_and_none_means_no_limit() {
    let server = Server::start();
    for args in [
        &["cache", "create", "zero", "--max-size", "0"][..],
        &["cache", "create", "zero", "--max-size", "0GiB"][..],
    ] {
        let stderr = fails(&server, args);
        assert!(stderr.contains("is not a limit"), "{stderr}");
        assert!(stderr.contains("--max-size none"), "{stderr}");
    }
    let info = server.create_cache("limited", &["--max-size", "5GiB"]);
    assert_eq!(info["max_size"], 5u64 << 30);
    let stderr = fails(
        &server,
        &["cache", "configure", "limited", "--max-size", "0"],
    );
    assert!(stderr.contains("--max-size none"), "{stderr}");
    let info = server.cli_ok(&server.admin_token, &["cache", "info", "limited", "--json"]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["max_size"], 5u64 << 30, "the limit in place stays");

    let out = server.cli_ok(
        &server.admin_token,
        &["cache", "configure", "limited", "--max-size", "none"],
    );
    assert!(out.contains("(no limit)"), "{out}");
    let info = server.create_cache("unlimited", &["--max-size", "none"]);
    assert!(info["max_size"].is_null(), "{info}");
    let list = server.cli_ok(&server.admin_token, &["cache", "list", "--json"]);
    assert!(!list.contains("\"zero\""), "{list}");
}
