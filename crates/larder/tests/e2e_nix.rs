//! The real Nix client as the judge: `nix copy --to http://…` (Nix's own uploader, with a netrc
//! push token) into a running `larder serve`, then the oracle substitutes the closure into
//! fresh stores, checks NARs byte for byte, signatures by the cache's managed key, and that a
//! wrong key is rejected.

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

use common::*;

fn oracle_with_nix_copy(private: bool) {
    require_nix();
    let server = Server::start();
    let name = if private { "secret" } else { "public" };
    let extra: &[&str] = if private { &["--private"] } else { &[] };
    let info = server.create_cache(name, extra);
    let key = info["public_key"].as_str().unwrap().to_owned();
    assert!(key.starts_with(&format!("{name}.127.0.0.1-1:")), "{key}");
    assert_eq!(info["private"], private);

    let work = tempfile::tempdir().unwrap();
    let push = server.token("push", name);
    let push_netrc = server.netrc(work.path(), "push.netrc", &push);
    let cache_url = format!("{}/{name}", server.url);
    let mut env = vec![
        ("CACHE_URL", cache_url.clone()),
        ("TRUSTED_PUBLIC_KEY", key),
        (
            "PUSH_CMD",
            format!(
                "XDG_CACHE_HOME=$(mktemp -d) nix copy --option netrc-file {} --to \"$CACHE_URL\" \"$TOP\"",
                push_netrc.display()
            ),
        ),
    ];
    if private {
        let pull = server.token("pull", name);
        env.push((
            "NETRC_FILE",
            server
                .netrc(work.path(), "pull.netrc", &pull)
                .display()
                .to_string(),
        ));
    }
    let out = oracle(&["run"], &work.path().join("oracle"), &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "oracle failed:\n{stderr}");
    assert!(stderr.contains(&format!("PASS {cache_url}")), "{stderr}");

    if private {
        // Anonymous Nix cannot read the private cache's narinfos, but nix-cache-info stays open.
        let top = std::fs::read_to_string(work.path().join("oracle/top")).unwrap();
        let xdg = tempfile::tempdir().unwrap();
        let o = nix(
            &["path-info", "--store", &cache_url, top.trim()],
            xdg.path(),
        );
        assert!(
            !o.status.success(),
            "anonymous read of a private cache succeeded"
        );
        let o = nix(&["store", "ping", "--store", &cache_url], xdg.path());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // SIGTERM: a clean exit.
    assert!(server.stop().success());
}

#[test]
fn nix_copy_then_substitute_public_cache() {
    oracle_with_nix_copy(false);
}

#[test]
fn nix_copy_then_substitute_private_cache() {
    oracle_with_nix_copy(true);
}
