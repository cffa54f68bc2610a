//! `larder serve` itself, as a user starts it: configuration mistakes stop it at start with a
//! message naming the setting, and what it prints at start tells the user what to run next.

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

use std::process::Command;

use common::*;

/// `larder serve --listen 127.0.0.1:0 --data DATA ARGS…` with `env`, which must fail at
/// start: its exit status is 1 and its stderr is returned. (`timeout`: a server that starts
/// anyway fails the test instead of hanging it.)
fn serve_fails(data: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new("timeout");
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
