//! CI identity end to end: a real `larder serve` whose `[oidc]` trusts an issuer the test runs
//! on loopback (`larder_testkit::oidc::Issuer`), and `larder push` with no token at all, only
//! the CI's ID token: `LARDER_OIDC_TOKEN` (GitLab's `id_tokens:`), then GitHub Actions'
//! `ACTIONS_ID_TOKEN_REQUEST_URL`/`_TOKEN` against the issuer's stand-in token endpoint. Real
//! Nix builds each closure and substitutes it from the cache into a fresh store (the oracle).

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

use common::*;
use larder_testkit::oidc::Issuer;
use serde_json::json;

/// The job the issuer vouches for: `mitsio/dotfiles` on `main`.
fn claims(issuer: &Issuer, aud: &str, repository: &str) -> serde_json::Value {
    issuer.claims(
        aud,
        json!({ "repository": repository, "ref": "refs/heads/main", "run_id": "77" }),
    )
}

/// A server on a port chosen first, so that its URL (the audience the client asks GitHub
/// for by default) can be in its configuration.
fn server(issuer: &Issuer) -> Server {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let data = private_tempdir();
    let config = data.path().join("serve.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[oidc]
max_lifetime = "10m"

[[oidc.issuers]]
issuer = "{issuer}"
audience = "{url}"

[[oidc.issuers.rules]]
claims = {{ repository = "mitsio/dotfiles", ref = "refs/heads/main" }}
perm = "push"
caches = ["gitlab", "github"]
"#,
            issuer = issuer.url
        ),
    )
    .unwrap();
    let server = Server::start_listening(
        data,
        &format!("127.0.0.1:{port}"),
        &["--config", config.to_str().unwrap()],
        None,
        &[],
    );
    assert_eq!(server.url, url);
    server
}

/// `larder push CACHE "$TOP"` with no token and no client config, and `env` (the CI's).
fn push_cmd(server: &Server, home: &std::path::Path, cache: &str, env: &str) -> String {
    format!(
        "env -u LARDER_CONFIG -u LARDER_TOKEN -u LARDER_OIDC_TOKEN -u ACTIONS_ID_TOKEN_REQUEST_URL \
         -u ACTIONS_ID_TOKEN_REQUEST_TOKEN -u LARDER_OIDC_AUDIENCE HOME={home} \
         XDG_CONFIG_HOME={home}/.config LARDER_SERVER={url} {env} {bin} push {cache} \"$TOP\"",
        home = home.display(),
        url = server.url,
        bin = larder_bin(),
    )
}

#[test]
fn a_ci_job_pushes_with_its_oidc_id_token_only() {
    require_nix();
    let issuer = Issuer::start();
    let server = server(&issuer);
    let home = tempfile::tempdir().unwrap();

    // GitLab CI: the ID token in LARDER_OIDC_TOKEN. The oracle builds a closure with real
    // Nix, runs the push, and substitutes the closure from the cache into a fresh store.
    let gitlab = server.create_cache("gitlab", &[]);
    let id_token = issuer.sign(&claims(&issuer, &server.url, "mitsio/dotfiles"));
    let work = tempfile::tempdir().unwrap();
    let stderr = oracle_pass(
        &work.path().join("oracle"),
        &format!("{}/gitlab", server.url),
        gitlab["public_key"].as_str().unwrap(),
        Some(push_cmd(
            &server,
            home.path(),
            "gitlab",
            &format!("LARDER_OIDC_TOKEN={id_token}"),
        )),
    );
    assert!(
        stderr.contains("authenticated with the CI job's OIDC ID token"),
        "{stderr}"
    );
    let info = server.cli_ok(&server.admin_token, &["cache", "info", "gitlab", "--json"]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert!(info["paths"].as_u64().unwrap() >= 2, "{info}");

    // GitHub Actions: the ID token asked of the job's token endpoint, for the server's URL.
    let github = server.create_cache("github", &[]);
    let endpoint = issuer.github_actions(
        "request-token-1",
        claims(&issuer, "overwritten", "mitsio/dotfiles"),
    );
    let work = tempfile::tempdir().unwrap();
    oracle_pass(
        &work.path().join("oracle"),
        &format!("{}/github", server.url),
        github["public_key"].as_str().unwrap(),
        Some(push_cmd(
            &server,
            home.path(),
            "github",
            &format!(
                "ACTIONS_ID_TOKEN_REQUEST_URL='{endpoint}' \
                 ACTIONS_ID_TOKEN_REQUEST_TOKEN=request-token-1"
            ),
        )),
    );
    assert_eq!(issuer.audiences(), vec![server.url.clone()]);

    // Both tokens are listed, labelled with the job's claims, and expire within 10 minutes.
    let list = server.cli_ok(&server.admin_token, &["token", "list", "--json"]);
    let list: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
    let oidc: Vec<&serde_json::Value> = list
        .iter()
        .filter(|t| t["label"].as_str().unwrap().starts_with("oidc "))
        .collect();
    assert_eq!(oidc.len(), 2, "{list:?}");
    for t in &oidc {
        let label = t["label"].as_str().unwrap();
        assert!(
            label.contains("repository=mitsio/dotfiles") && label.contains("ref=refs/heads/main"),
            "{label}"
        );
        let left = t["expires_at"].as_i64().unwrap() - larder_testkit::oidc::now();
        assert!((0..=600).contains(&left), "{t}");
    }

    // A job the rules do not name is refused, with the reason and a hint; no token is made.
    let stranger = issuer.sign(&claims(&issuer, &server.url, "someone/else"));
    let top = build_file("oidc-refused", "x");
    let out = std::process::Command::new("bash")
        .args([
            "-c",
            &push_cmd(
                &server,
                home.path(),
                "gitlab",
                &format!("LARDER_OIDC_TOKEN={stranger}"),
            ),
        ])
        .env("TOP", &top)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no matching rule"), "{stderr}");
    assert!(stderr.contains("hint:"), "{stderr}");
    // The admin's and the two exchanged: the refused job made none.
    let list = server.cli_ok(&server.admin_token, &["token", "list", "--json"]);
    let list: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
    assert_eq!(list.len(), 3, "{list:?}");

    // `larder login --oidc` saves the traded token; pushing then needs no CI variable.
    let login_home = tempfile::tempdir().unwrap();
    let out = larder_testkit::nix::command(larder_bin())
        .args(["login", &server.url, "--oidc", "--cache", "gitlab"])
        .env_remove("LARDER_TOKEN")
        .env_remove("LARDER_SERVER")
        .env_remove("LARDER_CONFIG")
        .env("HOME", login_home.path())
        .env("XDG_CONFIG_HOME", login_home.path().join(".config"))
        .env("LARDER_OIDC_TOKEN", &id_token)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("logged in to") && stderr.contains("push on caches gitlab"),
        "{stderr}"
    );
    let out = larder_testkit::nix::command(larder_bin())
        .args(["push", "gitlab", &top])
        .env_remove("LARDER_TOKEN")
        .env_remove("LARDER_SERVER")
        .env_remove("LARDER_CONFIG")
        .env_remove("LARDER_OIDC_TOKEN")
        .env("HOME", login_home.path())
        .env("XDG_CONFIG_HOME", login_home.path().join(".config"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, _) = server.http("GET", &format!("/gitlab/{}.narinfo", hash_part(&top)), None);
    assert_eq!(status, 200);
}

fn hash_part(path: &str) -> &str {
    let name = path.strip_prefix("/nix/store/").unwrap();
    &name[..32]
}
