//! `larder ls`, `larder path-info`, `larder path delete` and `larder cache info` against a real
//! server with a closure built and pushed by real Nix; after a deletion, real Nix still
//! substitutes what remains, and `/metrics` of the real (multi-threaded) server counted it.

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

fn unique(name: &str) -> String {
    format!("{name}-{}", unique_tag())
}

/// Build `top`, which references `dep`; returns (top, dep).
fn build_pair() -> (String, String) {
    let (dep, top) = (unique("dep"), unique("top"));
    let expr = format!(
        "let dep = derivation {{ name = \"{dep}\"; system = builtins.currentSystem; \
         builder = \"/bin/sh\"; args = [\"-c\" \"echo dep > $out\"]; }}; in \
         derivation {{ name = \"{top}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; \
         args = [\"-c\" \"echo ${{dep}} > $out\"]; }}"
    );
    let xdg = tempfile::tempdir().unwrap();
    let o = larder_testkit::nix::command("nix-build")
        .args(["--no-out-link", "-E", &expr])
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("XDG_CACHE_HOME", xdg.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let top = String::from_utf8(o.stdout).unwrap().trim().to_owned();
    let refs = larder_testkit::nix::command("nix-store")
        .args(["-q", "--references", &top])
        .output()
        .unwrap();
    let dep = String::from_utf8(refs.stdout).unwrap().trim().to_owned();
    assert!(dep.contains("-dep-"), "{dep}");
    (top, dep)
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn fail(server: &Server, token: &str, args: &[&str]) -> String {
    let out = server.cli(token, args);
    assert_eq!(out.status.code(), Some(1), "larder {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn ls_path_info_and_delete_with_real_nix() {
    require_nix();
    let server = Server::start();
    let info = server.create_cache("store", &[]);
    let key = info["public_key"].as_str().unwrap().to_owned();
    let admin = server.admin_token.clone();
    let push = server.token("push", "store");
    let (top, dep) = build_pair();
    let other = build_file("other", "alone");
    for p in [&top, &other] {
        server.cli_ok(&push, &["push", "store", p, "--json"]);
    }

    // ls: everything, pages, search.
    let all = json(&server.cli_ok(&push, &["ls", "store", "--json"]));
    assert_eq!(all["total"], 3, "{all}");
    let listed: Vec<&str> = all["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["store_path"].as_str().unwrap())
        .collect();
    let mut want = vec![dep.as_str(), other.as_str(), top.as_str()];
    want.sort_by_key(|p| p.split_once('-').unwrap().1.to_owned());
    assert_eq!(listed, want, "sorted by name");
    let out = server.cli(&push, &["ls", "store", "--limit", "1"]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("  NAR SIZE"), "{table}");
    assert!(
        table.contains(want[0]) && !table.contains(want[1]),
        "{table}"
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("--cursor"), "{stderr}");
    let every = server.cli_ok(&push, &["ls", "store", "--all", "--limit", "1"]);
    for p in &want {
        assert!(every.contains(p), "{every}");
    }
    let found = json(&server.cli_ok(&push, &["ls", "store", "--query", "TOP-", "--json"]));
    assert_eq!(found["total"], 1);
    assert_eq!(found["paths"][0]["store_path"], top.as_str());
    assert!(found["paths"][0]["nar_size"].as_i64().unwrap() > 0);

    // path-info: by store path, by hash part, through a ./result-style symlink.
    let ti = json(&server.cli_ok(&push, &["path-info", "store", &top, "--json"]));
    assert_eq!(ti["references"][0]["store_path"], dep.as_str());
    assert_eq!(ti["references"][0]["in_cache"], true);
    assert_eq!(ti["referrer_count"], 0);
    let hash = dep.trim_start_matches("/nix/store/")[..32].to_owned();
    let di = json(&server.cli_ok(&push, &["path-info", "store", &hash, "--json"]));
    assert_eq!(di["store_path"], dep.as_str());
    assert_eq!(di["referrers"], serde_json::json!([top]));
    let link_dir = tempfile::tempdir().unwrap();
    let link = link_dir.path().join("result");
    std::os::unix::fs::symlink(&dep, &link).unwrap();
    let text = server.cli_ok(&push, &["path-info", "store", link.to_str().unwrap()]);
    assert!(text.contains(&format!("store path:  {dep}")), "{text}");
    assert!(text.contains(&format!("referrers (1):\n  {top}")), "{text}");
    assert!(
        text.contains("signatures (1):\n  store.127.0.0.1-1:"),
        "{text}"
    );

    // cache info: nix.conf lines and the flake snippet.
    let text = server.cli_ok(&push, &["cache", "info", "store"]);
    assert!(
        text.contains(&format!("extra-trusted-public-keys = {key}")),
        "{text}"
    );
    assert!(text.contains("nixConfig = {"), "{text}");
    assert!(text.contains(&format!(
        "extra-substituters = [ \"{}/store\" ];",
        server.url
    )));
    let ci = json(&server.cli_ok(&push, &["cache", "info", "store", "--json"]));
    assert_eq!(ci["paths"], 3);
    assert!(ci["flake_nix_config"].as_str().unwrap().contains(&key));

    // path delete: needs admin; refused while referenced; --with-referrers takes top along.
    let err = fail(&server, &push, &["path", "delete", "store", &dep]);
    assert!(err.contains("403") && err.contains("hint:"), "{err}");
    let err = fail(&server, &admin, &["path", "delete", "store", &dep]);
    assert!(err.contains("409") && err.contains(&top), "{err}");
    assert!(err.contains("--with-referrers"), "{err}");
    let report = json(&server.cli_ok(
        &admin,
        &[
            "path",
            "delete",
            "store",
            &dep,
            "--with-referrers",
            "--json",
        ],
    ));
    let deleted: Vec<&str> = report["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["store_path"].as_str().unwrap())
        .collect();
    assert_eq!(deleted, vec![dep.as_str(), top.as_str()]);
    let left = json(&server.cli_ok(&push, &["ls", "store", "--json"]));
    assert_eq!(left["total"], 1);
    assert_eq!(left["paths"][0]["store_path"], other.as_str());

    // Real Nix: the deleted closure is gone, what remains substitutes with a valid signature.
    let url = format!("{}/store", server.url);
    let xdg = tempfile::tempdir().unwrap();
    let o = nix(&["path-info", "--store", &url, &top], xdg.path());
    assert!(!o.status.success(), "a deleted path is still served");
    let dest = tempfile::tempdir().unwrap();
    let xdg = tempfile::tempdir().unwrap();
    let o = nix(
        &[
            "copy",
            "--from",
            &url,
            "--to",
            dest.path().to_str().unwrap(),
            "--option",
            "trusted-public-keys",
            &key,
            &other,
        ],
        xdg.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = larder_testkit::nix::command("nix")
        .args(["store", "verify", "--store", dest.path().to_str().unwrap()])
        .args(["--trusted-public-keys", &key, &other])
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("XDG_CACHE_HOME", xdg.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // After it, `last use` shows in the listing.
    let used = json(&server.cli_ok(&push, &["ls", "store", "--json"]));
    assert!(used["paths"][0]["last_used_at"].is_i64(), "{used}");

    // The real server's /metrics (one runtime per core) counted the contents requests and
    // the deletion, without naming paths.
    let metrics = Command::new("curl")
        .args(["-sf", &format!("{}/metrics", server.url)])
        .output()
        .unwrap();
    assert!(metrics.status.success());
    let m = String::from_utf8(metrics.stdout).unwrap();
    let series = "larder_http_requests_total{route=\"/api/v1/caches/{cache}/paths\",method=\"GET\",status=\"200\"} ";
    let n: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .unwrap_or_else(|| panic!("{m}"))
        .parse()
        .unwrap();
    assert!(n >= 7, "{n}");
    assert!(
        m.contains("larder_deleted_paths_total{cache=\"store\"} 2"),
        "{m}"
    );
    assert!(!m.contains(&hash));
}
