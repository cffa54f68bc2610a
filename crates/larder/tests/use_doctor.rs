//! `larder use` / `remove` / `doctor` against a running server, with real Nix as the judge:
//! `nix show-config` must see what `use` wrote (through `NIX_USER_CONF_FILES`), a private
//! cache must be readable by Nix through the netrc `use` wrote, and `doctor` must agree.
//! Everything lives in a temporary home; the host's nix.conf is never touched.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use larder_testkit::nix::NIX_CONFIG_BASE;

/// Settings every Nix call here needs (root without build users; no narinfo disk cache, so
/// each lookup reaches the server), without `substituters` so the user nix.conf under test
/// decides them.
fn nix_env_config() -> String {
    format!("{NIX_CONFIG_BASE}\nnarinfo-cache-positive-ttl = 0\nnarinfo-cache-negative-ttl = 0")
}

struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Home {
        Home {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn config(&self) -> PathBuf {
        self.path().join(".config")
    }
    fn nix_conf(&self) -> PathBuf {
        self.config().join("nix/nix.conf")
    }
    fn netrc(&self) -> PathBuf {
        self.config().join("larder/netrc")
    }

    /// Environment shared by larder and nix: this home, its nix.conf as the user's config.
    fn env(&self, cmd: &mut Command) {
        cmd.env("HOME", self.path())
            .env("XDG_CONFIG_HOME", self.config())
            .env("XDG_CACHE_HOME", self.path().join(".cache"))
            .env("NIX_USER_CONF_FILES", self.nix_conf())
            .env("NIX_CONFIG", nix_env_config())
            .env_remove("LARDER_CONFIG")
            .env_remove("LARDER_NIX_CONF")
            .env_remove("LARDER_NETRC")
            .env_remove("NIX_REMOTE");
    }

    fn larder(&self, server: &Server, token: &str, args: &[&str]) -> Output {
        let mut cmd = larder_testkit::nix::command(larder_bin());
        cmd.args(args)
            .env("LARDER_SERVER", &server.url)
            .env("LARDER_TOKEN", token);
        self.env(&mut cmd);
        cmd.output().expect("run larder")
    }

    fn larder_ok(&self, server: &Server, token: &str, args: &[&str]) -> String {
        let out = self.larder(server, token, args);
        assert!(
            out.status.success(),
            "larder {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn nix(&self, args: &[&str]) -> Output {
        let mut cmd = larder_testkit::nix::command("nix");
        cmd.args(args);
        self.env(&mut cmd);
        cmd.output().expect("run nix")
    }

    fn show_config(&self) -> String {
        let o = self.nix(&["show-config"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    }
}

fn setting<'a>(show_config: &'a str, name: &str) -> Vec<&'a str> {
    show_config
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} = ")))
        .map(|v| v.split_whitespace().collect())
        .unwrap_or_default()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn use_public_cache_then_remove() {
    require_nix();
    let server = Server::start();
    let info = server.create_cache("public", &[]);
    let key = info["public_key"].as_str().unwrap().to_owned();
    let url = format!("{}/public", server.url);
    let token = server.token("pull", "public");
    let home = Home::new();
    let original = "# my own settings\nextra-substituters = https://nix-community.cachix.org  # community\nmax-jobs = 2\n";
    std::fs::create_dir_all(home.nix_conf().parent().unwrap()).unwrap();
    std::fs::write(home.nix_conf(), original).unwrap();

    // Before `use`: doctor fails and says how to fix it.
    let o = home.larder(&server, &token, &["doctor", "public"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let out = stdout(&o);
    assert!(out.contains("fail  substituters"), "{out}");
    assert!(out.contains("fix: `larder use public`"), "{out}");
    assert!(out.contains("ok    nix "), "{out}");

    home.larder_ok(
        &server,
        &token,
        &["use", "public", "--mode", "user-nixconf"],
    );
    let written = std::fs::read_to_string(home.nix_conf()).unwrap();
    assert!(written.starts_with("# my own settings\n"), "{written}");
    assert!(written.contains("max-jobs = 2\n"), "{written}");

    // Real Nix sees the substituter and the key, next to the ones already configured.
    let cfg = home.show_config();
    let subs = setting(&cfg, "substituters");
    assert!(subs.contains(&url.as_str()), "{subs:?}");
    assert!(
        subs.contains(&"https://nix-community.cachix.org"),
        "{subs:?}"
    );
    assert!(subs.contains(&"https://cache.nixos.org/"), "{subs:?}");
    assert!(
        setting(&cfg, "trusted-public-keys").contains(&key.as_str()),
        "{cfg}"
    );
    assert_eq!(setting(&cfg, "max-jobs"), vec!["2"]);

    // A second `use` changes nothing, byte for byte.
    home.larder_ok(
        &server,
        &token,
        &["use", "public", "--mode", "user-nixconf"],
    );
    assert_eq!(std::fs::read_to_string(home.nix_conf()).unwrap(), written);

    // doctor agrees now; --json gives the same checks.
    let out = home.larder_ok(&server, &token, &["doctor", "public"]);
    assert!(!out.contains("fail"), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&home.larder_ok(&server, &token, &["doctor", "public", "--json"]))
            .unwrap();
    let checks = json.as_array().unwrap();
    for name in [
        "nix",
        "server",
        "token",
        "cache",
        "nix-cache-info",
        "substituters",
        "trusted-public-keys",
        "trusted user",
    ] {
        let c = checks
            .iter()
            .find(|c| c["check"] == name)
            .unwrap_or_else(|| panic!("no {name}: {json}"));
        assert_eq!(c["status"], "ok", "{c}");
    }

    // remove gives back the original file exactly, and Nix no longer lists the cache.
    home.larder_ok(
        &server,
        &token,
        &["remove", "public", "--mode", "user-nixconf"],
    );
    assert_eq!(std::fs::read_to_string(home.nix_conf()).unwrap(), original);
    let cfg = home.show_config();
    assert!(!setting(&cfg, "substituters").contains(&url.as_str()));
    assert!(!setting(&cfg, "trusted-public-keys").contains(&key.as_str()));
}

#[test]
fn use_private_cache_writes_netrc_that_nix_reads() {
    require_nix();
    let server = Server::start();
    server.create_cache("secret", &["--private"]);
    let url = format!("{}/secret", server.url);
    // push ⊇ pull: the same netrc lets Nix upload a path and read it back.
    let token = server.token("push", "secret");
    let home = Home::new();

    // It works, and says that a token written for Nix could be read-only.
    let o = home.larder(
        &server,
        &token,
        &["use", "secret", "--mode", "user-nixconf"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("can also push to secret")
            && err.contains("larder token create --perm pull --cache secret"),
        "{err}"
    );
    let conf = std::fs::read_to_string(home.nix_conf()).unwrap();
    let netrc = home.netrc();
    assert!(
        conf.contains(&format!("netrc-file = {}\n", netrc.display())),
        "{conf}"
    );
    let text = std::fs::read_to_string(&netrc).unwrap();
    assert_eq!(
        text,
        format!("machine 127.0.0.1 login larder password {token}\n")
    );
    let mode = std::fs::metadata(&netrc).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "netrc mode {mode:o}");

    // Idempotent for both files.
    home.larder_ok(
        &server,
        &token,
        &["use", "secret", "--mode", "user-nixconf"],
    );
    assert_eq!(std::fs::read_to_string(home.nix_conf()).unwrap(), conf);
    assert_eq!(std::fs::read_to_string(&netrc).unwrap(), text);

    // Real Nix through the written config: ping, upload a path, read its narinfo back.
    let o = home.nix(&["store", "ping", "--store", &url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let file = home.path().join("hello.txt");
    std::fs::write(&file, format!("larder use test {}\n", server.port)).unwrap();
    let o = larder_testkit::nix::command("nix-store")
        .arg("--add")
        .arg(&file)
        .env("NIX_CONFIG", nix_env_config())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let path = String::from_utf8(o.stdout).unwrap().trim().to_owned();
    let o = home.nix(&["copy", "--to", &url, &path]);
    assert!(
        o.status.success(),
        "nix copy: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = home.nix(&["path-info", "--store", &url, &path]);
    assert!(
        o.status.success(),
        "nix path-info: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    let out = home.larder_ok(&server, &token, &["doctor", "secret"]);
    assert!(out.contains("ok    netrc"), "{out}");
    assert!(out.contains("ok    pull"), "{out}");

    // remove: nix.conf back to nothing, the netrc (which held only this token) gone.
    home.larder_ok(
        &server,
        &token,
        &["remove", "secret", "--mode", "user-nixconf"],
    );
    assert_eq!(std::fs::read_to_string(home.nix_conf()).unwrap(), "");
    assert!(!netrc.exists());
    // Without the netrc Nix cannot read the private cache any more.
    let o = home.nix(&["path-info", "--store", &url, &path]);
    assert!(
        !o.status.success(),
        "anonymous read of a private cache succeeded"
    );
    let o = home.larder(&server, &token, &["doctor", "secret"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("fail  netrc"), "{}", stdout(&o));
}

#[test]
fn print_mode_writes_nothing_and_shows_the_flake_block() {
    require_nix();
    let server = Server::start();
    let info = server.create_cache("printed", &[]);
    let key = info["public_key"].as_str().unwrap();
    let url = format!("{}/printed", server.url);
    let home = Home::new();
    let out = home.larder_ok(
        &server,
        &server.admin_token,
        &["use", "printed", "--mode", "print"],
    );
    assert!(
        out.contains(&format!("extra-substituters = {url}\n")),
        "{out}"
    );
    assert!(
        out.contains(&format!("extra-trusted-public-keys = {key}\n")),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "--option extra-substituters {url} --option extra-trusted-public-keys {key}"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "  nixConfig = {{\n    extra-substituters = [\n      \"{url}\"\n    ];\n    extra-trusted-public-keys = [\n      \"{key}\"\n    ];\n  }};\n"
        )),
        "{out}"
    );
    assert!(!home.nix_conf().exists());
}

#[test]
fn nixos_mode_writes_a_module_nix_can_evaluate() {
    require_nix();
    let server = Server::start();
    let info = server.create_cache("nixos", &[]);
    let key = info["public_key"].as_str().unwrap();
    let url = format!("{}/nixos", server.url);
    let home = Home::new();
    let folder = home.path().join("etc-nixos");
    let args = [
        "use",
        "nixos",
        "--mode",
        "nixos",
        "--nixos-folder",
        folder.to_str().unwrap(),
    ];
    let o = home.larder(&server, &server.admin_token, &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("imports = [ ./larder-nixos.nix ];"));
    let module = folder.join("larder-nixos.nix");
    let text = std::fs::read_to_string(&module).unwrap();
    home.larder_ok(&server, &server.admin_token, &args);
    assert_eq!(
        std::fs::read_to_string(&module).unwrap(),
        text,
        "second use is a no-op"
    );

    let o = larder_testkit::nix::command("nix-instantiate")
        .args(["--eval", "--strict", "--json", "-E"])
        .arg(format!("(import {}).nix.settings", module.display()))
        .env("NIX_CONFIG", nix_env_config())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["substituters"], serde_json::json!([url]));
    assert_eq!(v["trusted-public-keys"], serde_json::json!([key]));

    let rm = [
        "remove",
        "nixos",
        "--mode",
        "nixos",
        "--nixos-folder",
        folder.to_str().unwrap(),
    ];
    home.larder_ok(&server, &server.admin_token, &rm);
    assert!(!module.exists());
}

#[test]
fn doctor_without_server_fails_with_a_fix() {
    let home = Home::new();
    let mut cmd = larder_testkit::nix::command(larder_bin());
    cmd.args(["doctor"])
        .env_remove("LARDER_SERVER")
        .env_remove("LARDER_TOKEN");
    home.env(&mut cmd);
    let o = cmd.output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.contains("fail  client config"), "{out}");
    assert!(out.contains("run `larder login URL [TOKEN]`"), "{out}");
}

impl Home {
    /// larder as a fresh consumer runs it: no server in the environment, no token.
    fn consumer(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write;
        let mut cmd = larder_testkit::nix::command(larder_bin());
        cmd.args(args)
            .env_remove("LARDER_SERVER")
            .env_remove("LARDER_TOKEN")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        self.env(&mut cmd);
        let mut child = cmd.spawn().expect("run larder");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }
}

#[test]
fn a_fresh_consumer_uses_a_public_cache_by_url_or_an_anonymous_login() {
    require_nix();
    let server = Server::start();
    let info = server.create_cache("modular-workspace", &[]);
    let key = info["public_key"].as_str().unwrap().to_owned();
    server.create_cache("secret", &["--private"]);
    let cache_url = format!("{}/modular-workspace", server.url);

    // The cache's URL is all it takes: no login, no token.
    let home = Home::new();
    let o = home.consumer(&["use", &cache_url, "--mode", "user-nixconf"], "");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let conf = home.show_config();
    assert!(
        setting(&conf, "extra-substituters").contains(&cache_url.as_str())
            || setting(&conf, "substituters").contains(&cache_url.as_str()),
        "{conf}"
    );
    assert!(
        setting(&conf, "trusted-public-keys").contains(&key.as_str()),
        "{conf}"
    );

    // Or the server saved once without a token (an empty answer to the prompt), then names.
    let home = Home::new();
    let o = home.consumer(&["login", &server.url], "\n");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("without a token"), "{err}");
    let o = home.consumer(&["use", "modular-workspace", "--mode", "print"], "");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&o).contains(&cache_url), "{}", stdout(&o));
    assert!(home
        .consumer(&["login", &server.url, "--anonymous"], "")
        .status
        .success());

    // A misspelt name is caught before anything is written, with the name meant.
    let o = home.consumer(&["use", "modular-worksapce", "--mode", "print"], "");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("did you mean \"modular-workspace\"?"), "{err}");
    // A typo in the URL is named as such, with no command built from it.
    let typo = format!("{}:modular-workspace", server.url);
    let o = home.consumer(&["use", &typo, "--mode", "print"], "");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is not a cache's URL") && !err.contains(&format!("login {typo}")),
        "{err}"
    );
    // A private cache, without a token: looks missing (nobody learns it exists), and the
    // hint says a private one needs a token.
    let o = home.consumer(
        &[
            "use",
            &format!("{}/secret", server.url),
            "--mode",
            "user-nixconf",
        ],
        "",
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("needs a token"), "{err}");
}

#[test]
fn doctor_runs_every_check_it_can_while_the_server_is_down() {
    require_nix();
    let server = Server::start();
    server.create_cache("public", &[]);
    let url = format!("{}/public", server.url);
    let home = Home::new();
    let o = home.consumer(&["use", &url, "--mode", "user-nixconf"], "");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(server.stop().success());

    let o = home.consumer(&["doctor", &url, "--json"], "");
    assert_eq!(o.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let status = |name: &str| {
        json.as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == name)
            .map(|c| c["status"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("no {name} check: {json}"))
    };
    assert_eq!(status("server"), "fail");
    // What needs no server is still checked: nix.conf has the cache.
    assert_eq!(status("nix"), "ok");
    assert_eq!(status("substituters"), "ok", "{json}");
    assert_eq!(status("trusted-public-keys"), "warn", "{json}");
    assert_eq!(status("trusted user"), "ok", "{json}");
}

#[test]
fn remove_without_a_mode_undoes_use_wherever_it_wrote() {
    require_nix();
    let server = Server::start();
    server.create_cache("secret", &["--private"]);
    let token = server.token("pull", "secret");
    let url = format!("{}/secret", server.url);
    let home = Home::new();
    // As root, `use --mode user-nixconf` writes the user's nix.conf, not the system's.
    home.larder_ok(
        &server,
        &token,
        &["use", "secret", "--mode", "user-nixconf"],
    );
    let conf = std::fs::read_to_string(home.nix_conf()).unwrap();
    assert!(
        conf.contains(&url) && conf.contains("netrc-file = "),
        "{conf}"
    );
    assert!(home.netrc().exists());

    // `remove` without --mode finds it there, and takes out all `use` added: the substituter,
    // the key, the netrc-file line and the netrc entry with the token.
    let o = home.larder(&server, &token, &["remove", "secret"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains(&format!("removed {url} from")), "{err}");
    let conf = std::fs::read_to_string(home.nix_conf()).unwrap();
    assert!(
        !conf.contains(&url) && !conf.contains("netrc-file"),
        "{conf}"
    );
    assert!(
        !home.netrc().exists(),
        "the netrc with the token is still there"
    );
    let cfg = home.show_config();
    assert!(
        !setting(&cfg, "substituters").contains(&url.as_str()),
        "{cfg}"
    );

    // Again: nothing is configured anywhere, and it says where it looked.
    let o = home.larder(&server, &token, &["remove", "secret"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("is not configured in")
            && err.contains(&home.nix_conf().display().to_string()),
        "{err}"
    );
}

/// Nix remembers a narinfo it found for 30 days (`narinfo-cache-positive-ttl`, left at its
/// default here): a consumer that substituted a path once still believes it is in the cache
/// after the cache evicted it. Asked for that path again, it must build it itself, not fail.
/// It does with Nix's default settings (no `fallback`) because the server answers 404 for the
/// evicted NAR, which Nix takes as "the substitute is gone" and builds; any other failure
/// (a 5xx, a 403) would fail the build without `--fallback`.
#[test]
fn a_consumer_with_a_warm_narinfo_cache_builds_an_evicted_path_itself() {
    require_nix();
    let conf_dir = tempfile::tempdir().unwrap();
    let server_conf = conf_dir.path().join("larder.toml");
    std::fs::write(&server_conf, "evicted_nar_grace = \"10s\"\n").unwrap();
    let server = Server::start_with(&[
        "--config",
        server_conf.to_str().unwrap(),
        "--gc-interval",
        "1s",
    ]);
    server.create_cache("evicting", &[]);
    let tag = unique_tag();
    let expr = format!(
        "derivation {{ name = \"warm-{tag}\"; system = builtins.currentSystem; \
         builder = \"/bin/sh\"; args = [\"-c\" \"echo warm {tag} > $out\"]; }}"
    );
    let out = build_expr(&expr).remove(0);
    server.cli_ok(&server.admin_token, &["push", "evicting", &out]);
    let delete_local = || {
        let o = larder_testkit::nix::command("nix-store")
            .args(["--delete", &out])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    delete_local();

    // The consumer: its own nix.conf from `use`, Nix's default narinfo TTLs, one disk cache
    // kept across its builds.
    let home = Home::new();
    let token = server.token("pull", "evicting");
    home.larder_ok(
        &server,
        &token,
        &["use", "evicting", "--mode", "user-nixconf"],
    );
    let consumer_build = |extra: &[&str]| {
        let mut cmd = larder_testkit::nix::command("nix-build");
        cmd.args(["--no-out-link", "-E", &expr]).args(extra);
        home.env(&mut cmd);
        cmd.env("NIX_CONFIG", NIX_CONFIG_BASE);
        cmd.output().unwrap()
    };
    let first = consumer_build(&[]);
    let stderr = String::from_utf8_lossy(&first.stderr).into_owned();
    assert!(first.status.success(), "{stderr}");
    assert!(stderr.contains("copying path"), "not substituted: {stderr}");
    delete_local();

    // The cache evicts it, and its NAR is gone once the grace has passed.
    let narinfo = format!("/evicting/{}.narinfo", &out["/nix/store/".len()..][..32]);
    let (status, text) = server.http("GET", &narinfo, None);
    assert_eq!(status, 200);
    let nar = text
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_owned();
    server.cli_ok(&server.admin_token, &["path", "delete", "evicting", &out]);
    assert_eq!(server.http("GET", &narinfo, None).0, 404);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while server.http("GET", &format!("/evicting/{nar}"), None).0 != 404 {
        assert!(
            std::time::Instant::now() < deadline,
            "the evicted NAR is still served"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }

    // The consumer's disk cache still promises the NAR: Nix asks for it, gets the 404, and
    // builds the path itself, with the settings `use` wrote and Nix's defaults.
    let rebuilt = consumer_build(&[]);
    let stderr = String::from_utf8_lossy(&rebuilt.stderr).into_owned();
    assert!(rebuilt.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("'{nar}' does not exist in binary cache")),
        "the NAR was not asked for (the narinfo disk cache was not warm): {stderr}"
    );
    assert!(stderr.contains("building '"), "{stderr}");
    assert!(std::path::Path::new(&out).exists());
}
