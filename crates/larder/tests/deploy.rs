//! Deploying larder: the Nix packaging (`nix/`, `flake.nix`), the NixOS and home-manager modules
//! and the systemd units of `dist/systemd/`, judged by the real tools.
//!
//! - The modules are evaluated with Nixpkgs' own module system (`tests/nixos/nixpkgs-lib`, a
//!   vendored copy of Nixpkgs' `lib`) next to stub modules declaring the NixOS and
//!   home-manager options they set with those projects' types (`tests/nixos/*-stub.nix`), and a
//!   small stand-in for `pkgs` whose files are real derivations built by the machine's Nix
//!   (`tests/nixos/fake-pkgs.nix`). `tests/nixos/eval.nix` renders the units as NixOS and
//!   home-manager write them.
//! - Every rendered unit passes `systemd-analyze verify` without a warning, and the server's
//!   `systemd-analyze security` exposure is "OK" or better (below 5.0; systemd 252 rates
//!   1.0–4.9 "OK").
//! - The rendered server unit's `ExecStart` (the package is a directory whose `bin/larder` is
//!   the binary under test) is run the way systemd runs it: clean environment, `NOTIFY_SOCKET`
//!   (`Type=notify`: `READY=1` only once `/healthz` answers), the declared caches exist with
//!   their settings, the push daemon's start script and the post-build hook from the module
//!   push a closure, and real Nix substitutes it into fresh stores (the oracle). Restarting
//!   with a changed declaration updates the cache; an undeclared cache stays unless
//!   `deleteUndeclaredCaches`.
//!
//! Requires `nix-instantiate`/`nix-build` (Debian's nix-bin 2.8) and `systemd-analyze`
//! (Debian's systemd); `.ci/run` installs both.

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The host paths the NixOS module uses for the push daemon, swapped for temporary ones when
/// its scripts run here.
const DAEMON_STATE: &str = "/var/lib/larder-daemon";
const DAEMON_SOCKET: &str = "/var/lib/larder-daemon/daemon.sock";

fn eval_nix() -> PathBuf {
    repo_root().join("tests/nixos/eval.nix")
}

/// The "package" the modules are given: a directory whose `bin/larder` is the binary under
/// test. At a fixed path, so the store paths rendered from it stay the same between runs.
fn fake_package() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("deploy-package");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    // Replaced atomically: tests run in parallel processes.
    let tmp = bin.join(format!("larder.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(larder_bin(), &tmp).unwrap();
    std::fs::rename(&tmp, bin.join("larder")).unwrap();
    dir
}

/// The prefix of the machine's Nix (`/usr` for Debian's nix-bin): the modules' `pkgs.nix`.
fn nix_prefix() -> String {
    let out = Command::new("sh")
        .args(["-c", "command -v nix-store"])
        .output()
        .unwrap();
    let path = String::from_utf8(out.stdout).unwrap();
    let path = Path::new(path.trim());
    assert!(
        path.is_absolute(),
        "nix-store not found (apt-get install nix-bin; .ci/run installs it)"
    );
    path.parent()
        .and_then(Path::parent)
        .unwrap()
        .display()
        .to_string()
}

/// `nix-instantiate`/`nix-build` on tests/nixos/eval.nix for `kind` ("nixos" or
/// "home-manager") and a configuration module (a Nix expression).
fn eval_command(program: &str, kind: &str, configuration: &str) -> Command {
    let mut cmd = larder_testkit::nix::command(program);
    cmd.arg(eval_nix())
        .args([
            "--argstr",
            "kind",
            kind,
            "--arg",
            "configuration",
            configuration,
        ])
        .arg("--argstr")
        .arg("larder")
        .arg(fake_package())
        .args([
            "--argstr",
            "nix",
            &nix_prefix(),
            "--argstr",
            "coreutils",
            "/usr",
        ]);
    cmd
}

fn eval_output(kind: &str, configuration: &str) -> Output {
    eval_command("nix-instantiate", kind, configuration)
        .args(["--eval", "--strict", "--json", "-A", "summary"])
        .output()
        .expect("run nix-instantiate (apt-get install nix-bin)")
}

/// The evaluated configuration's summary (eval.nix's `summary`).
#[track_caller]
fn evaluate(kind: &str, configuration: &str) -> Value {
    let out = eval_output(kind, configuration);
    assert!(
        out.status.success(),
        "evaluating {configuration}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The error of a configuration that must not evaluate.
#[track_caller]
fn evaluation_error(kind: &str, configuration: &str) -> String {
    let out = eval_output(kind, configuration);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{configuration} evaluated:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// Build everything the configuration renders; returns the directory of unit files,
/// `nix.conf` and `activation.sh` (the settings file and scripts are their references).
#[track_caller]
fn render(kind: &str, configuration: &str) -> PathBuf {
    let out = eval_command("nix-build", kind, configuration)
        .args(["-A", "files", "--no-out-link"])
        .output()
        .expect("run nix-build");
    assert!(
        out.status.success(),
        "building {configuration}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The value of `key=` in a unit file (the first one).
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in\n{unit}"))
        .to_owned()
}

/// The store path in `text` whose name ends with `suffix`.
fn store_path_ending(text: &str, suffix: &str) -> PathBuf {
    text.split(|c: char| c.is_whitespace() || c == '"' || c == '=')
        .find(|w| w.starts_with("/nix/store/") && w.ends_with(suffix))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no store path ending in {suffix} in\n{text}"))
}

const BUILDER: &str = r#"{
  services.larder = {
    enable = true;
    openFirewall = true;
    settings.listen = "0.0.0.0:8080";
    settings.public_url = "http://shoshin:8080";
    settings.max_upload_size = "16GiB";
    settings.gc_interval = "30m";
    caches.modular-workspace = { maxSize = "200GiB"; };
    caches.secret = {
      public = false;
      priority = 30;
      compression = "xz";
      upstreamKeys = [ "nix-community.cachix.org-1:mB9FSh9qf2dCimDSUo8Zy7bkq5CX+/rkCWyvRCYg3Fs=" ];
      upstreams = [ "https://cache.nixos.org" "https://nix-community.cachix.org/" ];
    };
    pushDaemon = { enable = true; cache = "modular-workspace"; };
  };
}"#;

#[test]
fn the_nixos_module_makes_a_hardened_notify_service_a_user_a_firewall_port_and_a_hook() {
    let v = evaluate("nixos", BUILDER);
    let pkg = fake_package().display().to_string();
    let larder = &v["services"]["larder"];
    let sc = &larder["serviceConfig"];
    assert_eq!(sc["Type"], "notify");
    let exec = sc["ExecStart"].as_str().unwrap();
    assert!(
        exec.starts_with(&format!("{pkg}/bin/larder serve --config /nix/store/"))
            && exec.ends_with("-larder.toml"),
        "{exec}"
    );
    assert_eq!(sc["User"], "larder");
    assert_eq!(sc["Group"], "larder");
    assert_eq!(sc["StateDirectory"], "larder");
    assert_eq!(sc["StateDirectoryMode"], "0700");
    assert_eq!(sc["UMask"], "0077");
    assert_eq!(sc["Restart"], "on-failure");
    for (key, value) in [
        ("ProtectSystem", Value::from("strict")),
        ("ProtectHome", true.into()),
        ("PrivateTmp", true.into()),
        ("PrivateDevices", true.into()),
        ("PrivateUsers", true.into()),
        ("NoNewPrivileges", true.into()),
        ("MemoryDenyWriteExecute", true.into()),
        ("CapabilityBoundingSet", "".into()),
        ("AmbientCapabilities", "".into()),
        ("SystemCallArchitectures", "native".into()),
        (
            "SystemCallFilter",
            serde_json::json!(["@system-service", "~@privileged"]),
        ),
        (
            "RestrictAddressFamilies",
            serde_json::json!(["AF_UNIX", "AF_INET", "AF_INET6"]),
        ),
    ] {
        assert_eq!(sc[key], value, "{key}");
    }
    // No TLS: no reload (SIGHUP re-reads the certificate only).
    assert!(sc.get("ExecReload").is_none());
    assert_eq!(larder["wantedBy"], serde_json::json!(["multi-user.target"]));
    assert_eq!(
        larder["after"],
        serde_json::json!(["network-online.target"])
    );

    let user = &v["users"]["larder"];
    assert_eq!(user["isSystemUser"], true);
    assert_eq!(user["group"], "larder");
    // The admin token stays in the state directory, the user's home.
    assert_eq!(user["home"], "/var/lib/larder");
    assert_eq!(v["groups"], serde_json::json!(["larder"]));
    assert_eq!(v["firewall"]["allowedTCPPorts"], serde_json::json!([8080]));
    assert_eq!(v["systemPackages"], serde_json::json!([pkg]));
    assert_eq!(v["warnings"], serde_json::json!([]));

    // The push daemon: a service reading its token as a credential (by default the server's
    // bootstrap admin token), and the hook in nix.conf.
    let hook = v["nixSettings"]["post-build-hook"].as_str().unwrap();
    assert!(
        hook.starts_with("/nix/store/") && hook.ends_with("-larder-post-build-hook"),
        "{hook}"
    );
    let daemon = &v["services"]["larder-daemon"];
    assert_eq!(
        daemon["serviceConfig"]["LoadCredential"],
        serde_json::json!(["token:/var/lib/larder/admin-token"])
    );
    assert_eq!(daemon["serviceConfig"]["StateDirectory"], "larder-daemon");
    assert_eq!(daemon["environment"]["NIX_REMOTE"], "daemon");
    assert_eq!(
        daemon["after"],
        serde_json::json!([
            "network-online.target",
            "nix-daemon.socket",
            "larder.service"
        ])
    );
    assert!(
        daemon["description"]
            .as_str()
            .unwrap()
            .contains("http://shoshin:8080/modular-workspace"),
        "{daemon}"
    );

    // The settings file: what `larder serve --config` reads.
    let files = render("nixos", BUILDER);
    let toml_path = store_path_ending(&read(&files.join("larder.service")), "-larder.toml");
    // The server accepts it as it is: these are its declared caches.
    let file = larder_server::config::ConfigFile::load(&toml_path).unwrap();
    let resolved = larder_server::config::Config::resolve(file, "/unused".into()).unwrap();
    assert_eq!(resolved.data_dir, Path::new("/var/lib/larder"));
    assert_eq!(resolved.max_upload_size, 16 << 30);
    let declared: Vec<_> = resolved.declared_caches.iter().map(|c| &c.name).collect();
    assert_eq!(declared, ["modular-workspace", "secret"]);
    assert_eq!(resolved.declared_caches[0].max_size, Some(Some(200 << 30)));
    assert_eq!(resolved.declared_caches[1].max_size, Some(None));
    assert_eq!(
        resolved.declared_caches[1].upstreams.as_deref(),
        Some(
            &[
                "https://cache.nixos.org".to_owned(),
                "https://nix-community.cachix.org".to_owned()
            ][..]
        )
    );
    assert!(!resolved.delete_undeclared_caches);
    let settings: toml::Value = toml::from_str(&read(&toml_path)).unwrap();
    let expected: toml::Value = toml::from_str(
        r#"
        data_dir = "/var/lib/larder"
        listen = "0.0.0.0:8080"
        public_url = "http://shoshin:8080"
        max_upload_size = "16GiB"
        gc_interval = "30m"
        [caches.modular-workspace]
        private = false
        priority = 41
        max_size = "200GiB"
        compression = "zstd"
        upstream_keys = []
        upstreams = []
        [caches.secret]
        private = true
        priority = 30
        max_size = "none"
        compression = "xz"
        upstream_keys = ["nix-community.cachix.org-1:mB9FSh9qf2dCimDSUo8Zy7bkq5CX+/rkCWyvRCYg3Fs="]
        upstreams = ["https://cache.nixos.org", "https://nix-community.cachix.org/"]
        "#,
    )
    .unwrap();
    assert_eq!(settings, expected, "{}", read(&toml_path));

    // The hook and the daemon's start script name the binary, the socket and Nix by path.
    let hook_text = read(Path::new(hook));
    assert!(
        hook_text.contains(&format!(
            "{pkg}/bin/larder daemon push --socket {DAEMON_SOCKET} $OUT_PATHS"
        )),
        "{hook_text}"
    );
    assert!(
        hook_text.contains(&format!("{}/bin/nix-store -q --outputs", nix_prefix())),
        "{hook_text}"
    );
    let start = store_path_ending(
        &read(&files.join("larder-daemon.service")),
        "-larder-daemon-start",
    );
    let start_text = read(&start);
    assert!(
        start_text.contains(&format!(
            "exec {pkg}/bin/larder daemon run http://shoshin:8080/modular-workspace --socket {DAEMON_SOCKET}"
        )),
        "{start_text}"
    );
    assert!(
        start_text.contains("LARDER_TOKEN=$(< \"$CREDENTIALS_DIRECTORY/token\")"),
        "{start_text}"
    );
}

#[test]
fn the_nixos_module_adapts_the_unit_to_its_settings() {
    // Only the server: no hook, no daemon, no open port.
    let v = evaluate("nixos", "{ services.larder.enable = true; }");
    assert_eq!(v["firewall"]["allowedTCPPorts"], serde_json::json!([]));
    assert!(v["nixSettings"].get("post-build-hook").is_none(), "{v}");
    assert!(v["services"].get("larder-daemon").is_none(), "{v}");
    // Nothing at all when disabled.
    let v = evaluate("nixos", "{ }");
    assert_eq!(v["services"], serde_json::json!({}));
    assert_eq!(v["users"], serde_json::json!({}));

    // A privileged port: the capability to bind it, and no user namespace (in which the
    // capability would not count).
    let v = evaluate(
        "nixos",
        r#"{ services.larder = { enable = true; openFirewall = true; settings.listen = "[::]:443";
             settings.tls_cert = "/var/lib/acme/cache/fullchain.pem";
             settings.tls_key = "/var/lib/acme/cache/key.pem"; }; }"#,
    );
    let sc = &v["services"]["larder"]["serviceConfig"];
    assert_eq!(sc["CapabilityBoundingSet"], "CAP_NET_BIND_SERVICE");
    assert_eq!(sc["AmbientCapabilities"], "CAP_NET_BIND_SERVICE");
    assert_eq!(sc["PrivateUsers"], false);
    assert_eq!(v["firewall"]["allowedTCPPorts"], serde_json::json!([443]));
    // TLS: `systemctl reload` re-reads the certificate.
    assert_eq!(sc["ExecReload"], "/usr/bin/kill -HUP $MAINPID");

    // Data, store and database elsewhere: writable, and the data directory created.
    let v = evaluate(
        "nixos",
        r#"{ services.larder = { enable = true; settings.data_dir = "/srv/larder";
             settings.storage = "file:///mnt/nars";
             settings.database = "sqlite:///srv/larder-db/larder.db";
             environmentFile = "/run/secrets/larder.env";
             settings.s3_secret_access_key = "oops"; }; }"#,
    );
    let sc = &v["services"]["larder"]["serviceConfig"];
    assert!(sc.get("StateDirectory").is_none(), "{sc}");
    assert_eq!(
        sc["ReadWritePaths"],
        serde_json::json!(["/srv/larder", "/mnt/nars", "/srv/larder-db"])
    );
    assert_eq!(sc["EnvironmentFile"], "/run/secrets/larder.env");
    assert_eq!(
        v["tmpfiles"],
        serde_json::json!(["d /srv/larder 0700 larder larder - -"])
    );
    assert_eq!(v["users"]["larder"]["home"], "/srv/larder");
    let warnings = v["warnings"].to_string();
    assert!(
        warnings.contains("s3_secret_access_key is world-readable"),
        "{warnings}"
    );

    // A push daemon alone (the server elsewhere) has no server or token by default.
    let error = evaluation_error(
        "nixos",
        r#"{ services.larder.pushDaemon = { enable = true; cache = "ci"; }; }"#,
    );
    assert!(
        error.contains(
            "The option `services.larder.pushDaemon.server' was accessed but has no value defined"
        ),
        "{error}"
    );
    // With them: its own URL and token file, and a signing key.
    let v = evaluate(
        "nixos",
        r#"{ services.larder.pushDaemon = { enable = true; server = "https://cache.example.org";
             cache = "ci"; tokenFile = "/run/secrets/larder-push";
             signingKeyFile = "/run/secrets/larder-key"; }; }"#,
    );
    assert!(v["services"].get("larder").is_none(), "{v}");
    let daemon = &v["services"]["larder-daemon"];
    assert_eq!(
        daemon["serviceConfig"]["LoadCredential"],
        serde_json::json!([
            "token:/run/secrets/larder-push",
            "signing-key:/run/secrets/larder-key"
        ])
    );
    assert_eq!(
        daemon["after"],
        serde_json::json!(["network-online.target", "nix-daemon.socket"])
    );
}

#[test]
fn a_bad_nixos_setting_fails_evaluation_with_a_readable_message() {
    for (setting, says) in [
        (
            r#"settings.compression = "gzip";"#,
            r#"option `services.larder.settings.compression' is not of type `null or one of "zstd", "xz", "none"'"#,
        ),
        (
            r#"settings.listen = "nonsense";"#,
            "option `services.larder.settings.listen' is not of type `address HOST:PORT",
        ),
        (
            r#"settings.listen = "127.0.0.1:99999";"#,
            "option `services.larder.settings.listen' is not of type `address HOST:PORT",
        ),
        (
            r#"caches.x.maxSize = "5 elephants";"#,
            "option `services.larder.caches.x.maxSize' is not of type `null or size: a number of bytes or a string like \"5GiB\"",
        ),
        (
            r#"settings.max_nar_size = "big";"#,
            "option `services.larder.settings.max_nar_size' is not of type `null or size",
        ),
        (
            r#"settings.gc_interval = "soon";"#,
            "option `services.larder.settings.gc_interval' is not of type `null or duration like \"90s\"",
        ),
        (
            r#"settings.orphan_grace = "30m";"#,
            "option `services.larder.settings.orphan_grace' is not of type `null or duration of at least 1h",
        ),
        (
            r#"settings.public_url = "shoshin:8080";"#,
            "option `services.larder.settings.public_url' is not of type `null or http:// or https:// URL",
        ),
        (
            r#"settings.nar_redirect = "teleport";"#,
            "option `services.larder.settings.nar_redirect' is not of type `null or one of \"stream\", \"presigned\"'",
        ),
        (
            r#"caches.x.priority = -1;"#,
            "option `services.larder.caches.x.priority' is not of type `integer between 0 and 1000000",
        ),
        (
            r#"caches.x.upstreamKeys = [ "cache.nixos.org" ];"#,
            "is not of type `Nix public key NAME:BASE64",
        ),
        (
            r#"settings.listn = "0.0.0.0:8080";"#,
            // Freeform keys reach the file, where the server rejects unknown ones; the module
            // passes them through (for settings newer than the module).
            "",
        ),
        (
            "environmentFile = ./secrets.env;",
            "option `services.larder.environmentFile' is not of type `null or absolute path given as a string (not a Nix path",
        ),
        (
            "caches.Bad_Name = { };",
            "Failed assertions:\n       - services.larder.caches.\"Bad_Name\": not a valid cache name",
        ),
        (
            "caches.api = { };",
            "services.larder.caches.\"api\": not a valid cache name",
        ),
        (
            r#"settings.tls_cert = "/etc/larder/cert.pem";"#,
            "services.larder.settings: set both tls_cert and tls_key, or neither",
        ),
        (
            r#"openFirewall = true; settings.listen = "0.0.0.0:0";"#,
            "services.larder.openFirewall: settings.listen has port 0",
        ),
        (
            r#"pushDaemon = { enable = true; cache = "Not A Cache"; };"#,
            "option `services.larder.pushDaemon.cache' is not of type `cache name",
        ),
    ] {
        let configuration = format!("{{ services.larder = {{ enable = true; {setting} }}; }}");
        if says.is_empty() {
            evaluate("nixos", &configuration);
            continue;
        }
        let error = evaluation_error("nixos", &configuration);
        assert!(error.contains(says), "{setting}: {error}");
    }
}

/// The user's configuration of a consumer that also builds: two caches (one private), the
/// push daemon and its hook.
fn home_configuration(home: &Path, token: &Path) -> String {
    format!(
        r#"{{
  home.username = "mitsio";
  home.homeDirectory = "{home}";
  xdg.configHome = "{home}/.config";
  xdg.stateHome = "{home}/.local/state";
  programs.larder = {{
    enable = true;
    caches.modular-workspace = {{
      url = "http://shoshin:8080/modular-workspace";
      publicKey = "modular-workspace.shoshin-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
    }};
    caches.secret = {{
      url = "https://cache.example.org:8443/secret";
      publicKey = "secret.cache.example.org-1:mB9FSh9qf2dCimDSUo8Zy7bkq5CX+/rkCWyvRCYg3Fs=";
      tokenFile = "{token}";
    }};
    pushDaemon = {{
      enable = true;
      server = "http://shoshin:8080";
      cache = "modular-workspace";
      tokenFile = "{token}";
      postBuildHook = true;
    }};
  }};
}}"#,
        home = home.display(),
        token = token.display()
    )
}

#[test]
fn the_home_manager_module_configures_nix_a_netrc_and_the_push_daemon() {
    let home = tempfile::tempdir().unwrap();
    let token = home.path().join("pull-token");
    std::fs::write(&token, "larder_t0ken\n").unwrap();
    let configuration = home_configuration(home.path(), &token);
    let v = evaluate("home-manager", &configuration);
    let pkg = fake_package().display().to_string();
    let settings = &v["nixSettings"];
    assert_eq!(
        settings["extra-substituters"],
        serde_json::json!([
            "http://shoshin:8080/modular-workspace",
            "https://cache.example.org:8443/secret"
        ])
    );
    assert_eq!(
        settings["extra-trusted-public-keys"],
        serde_json::json!([
            "modular-workspace.shoshin-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=",
            "secret.cache.example.org-1:mB9FSh9qf2dCimDSUo8Zy7bkq5CX+/rkCWyvRCYg3Fs="
        ])
    );
    let netrc = home.path().join(".config/larder/netrc");
    assert_eq!(settings["netrc-file"], netrc.display().to_string());
    assert!(settings["post-build-hook"]
        .as_str()
        .unwrap()
        .ends_with("-larder-post-build-hook"));
    assert_eq!(v["packages"], serde_json::json!([pkg]));
    assert_eq!(
        v["activation"]["larderNetrc"]["after"],
        serde_json::json!(["writeBoundary"])
    );
    let unit = &v["services"]["larder-daemon"];
    assert_eq!(
        unit["Install"]["WantedBy"],
        serde_json::json!(["default.target"])
    );
    assert_eq!(unit["Service"]["Restart"], "on-failure");

    let files = render("home-manager", &configuration);
    // The unit verifies as a user unit, and its start script reads the token at start.
    let unit_file = files.join("larder-daemon.service");
    verify(&unit_file, true);
    let start = store_path_ending(&read(&unit_file), "-larder-daemon-start");
    let state = home.path().join(".local/state/larder/daemon.sock");
    assert!(
        read(&start).contains(&format!(
            "exec {pkg}/bin/larder daemon run http://shoshin:8080/modular-workspace --socket {}",
            state.display()
        )),
        "{}",
        read(&start)
    );
    let (score, label) = security(&unit_file, true);
    eprintln!("home-manager larder-daemon.service: exposure {score} {label}");

    // Activation writes the netrc (mode 0600) from the token file, for the private cache only.
    let activation = files.join("activation.sh");
    let out = Command::new("bash").arg(&activation).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        read(&netrc),
        "machine cache.example.org login larder password larder_t0ken\n"
    );
    let mode = std::fs::metadata(&netrc).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A dry run writes nothing; a missing token file is a warning, not a failed activation.
    std::fs::remove_file(&netrc).unwrap();
    let out = Command::new("bash")
        .arg(&activation)
        .env("DRY_RUN", "1")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!netrc.exists());
    std::fs::remove_file(&token).unwrap();
    let out = Command::new("bash").arg(&activation).output().unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("gets no netrc entry"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(read(&netrc), "");

    // Bad values fail evaluation, naming the option.
    for (bad, says) in [
        (
            r#"url = "shoshin:8080/x"; publicKey = "c-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";"#,
            "option `programs.larder.caches.c.url' is not of type `http:// or https:// URL",
        ),
        (
            r#"url = "http://shoshin/c"; publicKey = "shoshin";"#,
            "option `programs.larder.caches.c.publicKey' is not of type `Nix public key",
        ),
    ] {
        let configuration = format!(
            r#"{{ home.username = "u"; home.homeDirectory = "/home/u"; xdg.configHome = "/home/u/.config";
                 xdg.stateHome = "/home/u/.local/state";
                 programs.larder.caches.c = {{ {bad} }}; }}"#
        );
        let error = evaluation_error("home-manager", &configuration);
        assert!(error.contains(says), "{bad}: {error}");
    }
}

/// `systemd-analyze` with a runtime directory of its own (`--user` needs one).
fn systemd_analyze() -> Command {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "systemd-analyze is required (apt-get install systemd); .ci/run installs it"
    );
    // One directory for every test process (it only has to exist).
    let runtime = std::env::temp_dir().join("larder-tests-systemd-runtime");
    std::fs::create_dir_all(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut cmd = Command::new("systemd-analyze");
    cmd.env("XDG_RUNTIME_DIR", runtime);
    cmd
}

/// `systemd-analyze verify` passes without a single warning (it exits 0 on unknown keys and
/// values it cannot parse, so any output is a failure too).
#[track_caller]
fn verify(unit: &Path, user: bool) {
    let mut cmd = systemd_analyze();
    cmd.args(["verify", "--man=no"]);
    if user {
        cmd.arg("--user");
    }
    let out = cmd.arg(unit).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify {}:\n{text}\n{}",
        unit.display(),
        read(unit)
    );
}

/// `systemd-analyze security --offline=true`: the overall exposure and its label.
fn security(unit: &Path, user: bool) -> (f64, String) {
    let mut cmd = systemd_analyze();
    cmd.args(["security", "--offline=true", "--no-pager"]);
    if user {
        cmd.arg("--user");
    }
    let out = cmd.arg(unit).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "systemd-analyze security {}: {}",
        unit.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    // "→ Overall exposure level for larder.service: 1.4 OK 🙂"
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure in:\n{text}"));
    let mut words = line.rsplit_once(": ").unwrap().1.split_whitespace();
    let score = words.next().unwrap().parse().unwrap();
    (score, words.next().unwrap().to_owned())
}

/// "OK" or better in systemd 252: exposure below 5.0 ("MEDIUM" starts at 5.0).
#[track_caller]
fn assert_ok_or_better(unit: &str, (score, label): &(f64, String)) {
    assert!(
        *score < 5.0 && ["OK", "SAFE", "PERFECT"].contains(&label.as_str()),
        "{unit}: exposure {score} {label}, not OK or better"
    );
}

#[test]
fn the_rendered_nixos_units_verify_and_the_server_is_rated_ok() {
    let files = render("nixos", BUILDER);
    for name in ["larder.service", "larder-daemon.service"] {
        verify(&files.join(name), false);
    }
    let server = security(&files.join("larder.service"), false);
    let daemon = security(&files.join("larder-daemon.service"), false);
    eprintln!("NixOS larder.service: exposure {} {}", server.0, server.1);
    eprintln!(
        "NixOS larder-daemon.service: exposure {} {}",
        daemon.0, daemon.1
    );
    assert_ok_or_better("larder.service", &server);
    // The push daemon runs as root (see the module); it is sandboxed as tightly otherwise.
    assert_ok_or_better("larder-daemon.service", &daemon);

    // With a privileged port the server keeps its rating.
    let files = render(
        "nixos",
        r#"{ services.larder = { enable = true; settings.listen = "0.0.0.0:443"; }; }"#,
    );
    verify(&files.join("larder.service"), false);
    let privileged = security(&files.join("larder.service"), false);
    eprintln!(
        "NixOS larder.service on port 443: exposure {} {}",
        privileged.0, privileged.1
    );
    assert_ok_or_better("larder.service (port 443)", &privileged);
}

#[test]
fn the_dist_units_verify() {
    let dist = repo_root().join("dist/systemd");
    let dir = tempfile::tempdir().unwrap();
    // As installed, with the binary at /usr/local/bin/larder: here the binary under test.
    for name in ["larder.service", "larder.socket", "larder-daemon@.service"] {
        let text = read(&dist.join(name)).replace("/usr/local/bin/larder", larder_bin());
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    verify(&dir.path().join("larder.service"), false);
    verify(&dir.path().join("larder.socket"), false);
    verify(&dir.path().join("larder-daemon@.service"), true);
    let server = security(&dir.path().join("larder.service"), false);
    let daemon = security(&dir.path().join("larder-daemon@.service"), true);
    eprintln!("dist larder.service: exposure {} {}", server.0, server.1);
    eprintln!(
        "dist larder-daemon@.service (user): exposure {} {}",
        daemon.0, daemon.1
    );
    assert_ok_or_better("dist/systemd/larder.service", &server);
    // The example configuration is one the server accepts.
    let example = larder_server::config::ConfigFile::load(&dist.join("larder.toml")).unwrap();
    let example = larder_server::config::Config::resolve(example, "/unused".into()).unwrap();
    assert_eq!(example.data_dir, Path::new("/var/lib/larder"));
    let sysusers = read(&dist.join("larder.sysusers"));
    assert!(
        sysusers.contains("u larder - \"larder Nix binary cache server\" /var/lib/larder"),
        "{sysusers}"
    );
}

#[test]
fn the_package_installs_completions_and_man_pages() {
    // nix/package.nix with Nixpkgs' lib and buildRustPackage's arguments handed back, so
    // its install step can be run here with the binary under test.
    let expr = format!(
        r#"let lib = import {lib};
           p = import {pkg} {{
             inherit lib;
             stdenv = {{ buildPlatform.canExecute = _: true; hostPlatform = {{ }}; }};
             rustPlatform.buildRustPackage = args: args;
             installShellFiles = null; pkg-config = null; xz = null;
           }};
        in {{ inherit (p) pname version doCheck cargoBuildFlags postInstall; lockFile = toString p.cargoLock.lockFile; mainProgram = p.meta.mainProgram; }}"#,
        lib = repo_root().join("tests/nixos/nixpkgs-lib/lib").display(),
        pkg = repo_root().join("nix/package.nix").display(),
    );
    let out = larder_testkit::nix::command("nix-instantiate")
        .args(["--eval", "--strict", "--json", "-E", &expr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(p["pname"], "larder");
    assert_eq!(p["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(p["doCheck"], false);
    assert_eq!(p["mainProgram"], "larder");
    assert_eq!(
        p["cargoBuildFlags"],
        serde_json::json!(["--package", "larder"])
    );
    assert!(p["lockFile"].as_str().unwrap().ends_with("/Cargo.lock"));

    // postInstall, with stand-ins for installShellFiles' two functions that put files where
    // they do (share/{bash-completion/completions,fish/vendor_completions.d,zsh/site-functions},
    // share/man/manN).
    let out_dir = tempfile::tempdir().unwrap();
    let out_path = out_dir.path().join("out");
    std::fs::create_dir_all(out_path.join("bin")).unwrap();
    std::os::unix::fs::symlink(larder_bin(), out_path.join("bin/larder")).unwrap();
    let script = format!(
        r#"set -euo pipefail
installShellCompletion() {{
  local cmd= shell= file
  while [ $# -gt 0 ]; do
    case $1 in
      --cmd) cmd=$2; shift 2 ;;
      --bash|--fish|--zsh) shell=${{1#--}}; file=$2; shift 2
        case $shell in
          bash) install -D -m 0644 "$file" "$out/share/bash-completion/completions/$cmd.bash" ;;
          fish) install -D -m 0644 "$file" "$out/share/fish/vendor_completions.d/$cmd.fish" ;;
          zsh) install -D -m 0644 "$file" "$out/share/zsh/site-functions/_$cmd" ;;
        esac ;;
      *) echo "unexpected argument $1" >&2; return 1 ;;
    esac
  done
}}
installManPage() {{
  local f
  for f in "$@"; do install -D -m 0644 "$f" "$out/share/man/man${{f##*.}}/$(basename "$f")"; done
}}
{}"#,
        p["postInstall"].as_str().unwrap()
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .env("out", &out_path)
        .current_dir(out_dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "postInstall failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (file, mentions) in [
        ("share/bash-completion/completions/larder.bash", "serve"),
        ("share/fish/vendor_completions.d/larder.fish", "serve"),
        ("share/zsh/site-functions/_larder", "serve"),
        ("share/man/man1/larder.1", ".TH"),
        ("share/man/man1/larder-serve.1", "\\-\\-config"),
        ("share/man/man1/larder-daemon-run.1", ".TH"),
    ] {
        let text = read(&out_path.join(file));
        assert!(text.contains(mentions), "{file} lacks {mentions:?}");
    }
}

/// A process started from a unit's command line, with its stderr collected.
struct Running {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Running {
    fn spawn(mut cmd: Command, name: &'static str) -> Running {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("LARDER_TEST_VERBOSE").is_some() {
                    eprintln!("[{name}] {line}");
                }
                lines.lock().unwrap().push(line);
            }
        });
        Running { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGTERM, as `systemctl stop` sends; the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "did not stop on SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(status, body)` of a GET with curl.
fn get(url: &str, token: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "10", "-w", "\n%{http_code}"]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd.arg(url).output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// The server configuration the run test deploys: a public and a private cache declared, the
/// push daemon pushing to the public one.
fn run_configuration(port: u16, data: &Path, extra: &str) -> String {
    format!(
        r#"{{
  services.larder = {{
    enable = true;
    settings.listen = "127.0.0.1:{port}";
    settings.data_dir = "{data}";
    pushDaemon = {{ enable = true; cache = "deploy-public"; }};
    {extra}
  }};
}}"#,
        data = data.display()
    )
}

/// Run the rendered server unit's ExecStart the way systemd does: a clean environment with
/// HOME (User=larder's home, the data directory) and NOTIFY_SOCKET; wait for READY=1.
fn start_unit(files: &Path, data: &Path, port: u16, work: &Path) -> Running {
    let unit = read(&files.join("larder.service"));
    assert_eq!(unit_value(&unit, "Type"), "notify");
    let exec = unit_value(&unit, "ExecStart");
    let argv: Vec<&str> = exec.split_whitespace().collect();
    let notify_path = work.join("notify.sock");
    let _ = std::fs::remove_file(&notify_path);
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", data)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("LARDER_LOG", "info");
    let mut server = Running::spawn(cmd, "larder.service");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 4096];
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            std::thread::sleep(Duration::from_millis(200)); // the log's last lines
            panic!(
                "larder.service exited ({status}) before READY=1:\n{}",
                server.log()
            );
        }
        if let Ok(n) = notify.recv(&mut buf) {
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            if message.lines().any(|l| l == "READY=1") {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no READY=1 on NOTIFY_SOCKET within 60 s:\n{}",
            server.log()
        );
    }
    // Ready means accepting: /healthz answers at once.
    let (status, body) = get(&format!("http://127.0.0.1:{port}/healthz"), None);
    assert_eq!(status, 200, "{body}\n{}", server.log());
    server
}

/// A copy of a rendered script with the host paths of the push daemon swapped for `state`.
fn swapped_script(script: &Path, state: &Path, dir: &Path) -> PathBuf {
    let text = read(script).replace(DAEMON_STATE, &state.display().to_string());
    let copy = dir.join(script.file_name().unwrap());
    std::fs::write(&copy, text).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

fn cache_info(port: u16, cache: &str, token: &str) -> (u16, Value) {
    let (status, body) = get(
        &format!("http://127.0.0.1:{port}/api/v1/caches/{cache}"),
        Some(token),
    );
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[test]
fn the_nixos_service_runs_and_serves_a_real_nix_substitution() {
    require_nix();
    let port = larder_testkit::free_port();
    let data = private_tempdir();
    let work = tempfile::tempdir().unwrap();
    let caches = r#"
    caches.deploy-public = { priority = 30; maxSize = "1GiB"; };
    caches.deploy-private = { public = false; compression = "xz"; };"#;
    let files = render("nixos", &run_configuration(port, data.path(), caches));
    verify(&files.join("larder.service"), false);
    let mut server = start_unit(&files, data.path(), port, work.path());

    // The bootstrap admin token is in the data directory; the declared caches exist.
    let admin = read(&data.path().join("admin-token")).trim().to_owned();
    let (status, public) = cache_info(port, "deploy-public", &admin);
    assert_eq!(status, 200, "{public}\n{}", server.log());
    assert_eq!(public["private"], false);
    assert_eq!(public["priority"], 30);
    assert_eq!(public["max_size"], 1 << 30);
    assert_eq!(public["compression"], "zstd");
    let (status, private) = cache_info(port, "deploy-private", &admin);
    assert_eq!(status, 200, "{private}");
    assert_eq!(private["private"], true);
    assert_eq!(private["compression"], "xz");
    assert_eq!(private["max_size"], Value::Null);
    let (status, info) = get(
        &format!("http://127.0.0.1:{port}/deploy-public/nix-cache-info"),
        None,
    );
    assert_eq!(status, 200);
    assert!(info.contains("Priority: 30"), "{info}");
    let key = public["public_key"].as_str().unwrap().to_owned();

    // The push daemon from its unit: the start script (socket swapped for a temporary one),
    // its token as the systemd credential it reads (the default: the admin token). The
    // unit's NIX_REMOTE=daemon is left out: there is no nix-daemon here, the daemon reads the
    // store's database as root.
    let daemon_unit = read(&files.join("larder-daemon.service"));
    assert!(daemon_unit.contains("LoadCredential=token:"));
    let state = work.path().join("daemon-state");
    std::fs::create_dir_all(&state).unwrap();
    let start = swapped_script(
        &store_path_ending(&daemon_unit, "-larder-daemon-start"),
        &state,
        work.path(),
    );
    let credentials = work.path().join("credentials");
    std::fs::create_dir_all(&credentials).unwrap();
    std::fs::copy(data.path().join("admin-token"), credentials.join("token")).unwrap();
    let mut cmd = larder_testkit::nix::command(start.to_str().unwrap());
    cmd.env("CREDENTIALS_DIRECTORY", &credentials)
        .env("HOME", &state)
        .env_remove("LARDER_SERVER")
        .env_remove("LARDER_TOKEN")
        .env_remove("LARDER_CONFIG")
        .env_remove("LARDER_DAEMON_SOCKET");
    let mut daemon = Running::spawn(cmd, "larder-daemon.service");
    let socket = state.join("daemon.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the push daemon did not start:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The hook from nix.conf, run as Nix 2.8.0 runs it (empty OUT_PATHS, DRV_PATH set):
    // it queues the outputs, the daemon pushes their closure, and real Nix substitutes it.
    let nix_conf = read(&files.join("nix.conf"));
    let hook = swapped_script(
        &store_path_ending(&nix_conf, "-larder-post-build-hook"),
        &state,
        work.path(),
    );
    let status_cmd = format!(
        "{} daemon status --socket {} --json",
        larder_bin(),
        socket.display()
    );
    let push = format!(
        r#"set -e
OUT_PATHS= DRV_PATH="$(nix-store -q --deriver "$TOP")" {hook}
i=0
until {status_cmd} | grep -q '"queued":0'; do
  i=$((i + 1)); [ $i -lt 1200 ] || {{ echo "the daemon did not push within 2 minutes" >&2; exit 1; }}
  sleep 0.1
done
{status_cmd} | grep -q '"done":[1-9]' || {{ echo "the hook queued nothing: $({status_cmd})" >&2; exit 1; }}
{status_cmd} | grep -q '"failed":0' || {{ echo "pushes failed: $({status_cmd})" >&2; exit 1; }}"#,
        hook = hook.display(),
    );
    let cache_url = format!("http://127.0.0.1:{port}/deploy-public");
    oracle_pass(&work.path().join("oracle"), &cache_url, &key, Some(push));
    let (_, public) = cache_info(port, "deploy-public", &admin);
    assert!(public["paths"].as_i64().unwrap() > 0, "{public}");
    assert!(daemon.stop().success(), "{}", daemon.log());
    assert!(server.stop().success());

    // A changed declaration is applied at the next start; a cache no longer declared stays.
    let files = render(
        "nixos",
        &run_configuration(
            port,
            data.path(),
            r#"caches.deploy-public = { priority = 50; maxSize = "2GiB"; };"#,
        ),
    );
    let mut server = start_unit(&files, data.path(), port, work.path());
    let (_, public) = cache_info(port, "deploy-public", &admin);
    assert_eq!(public["priority"], 50, "{public}");
    assert_eq!(public["max_size"], 2i64 << 30);
    assert!(public["paths"].as_i64().unwrap() > 0, "{public}");
    let (status, _) = cache_info(port, "deploy-private", &admin);
    assert_eq!(status, 200, "an undeclared cache was deleted");
    assert!(server.stop().success());

    // Unless asked.
    let files = render(
        "nixos",
        &run_configuration(
            port,
            data.path(),
            r#"caches.deploy-public = { priority = 50; }; deleteUndeclaredCaches = true;"#,
        ),
    );
    let mut server = start_unit(&files, data.path(), port, work.path());
    let (status, _) = cache_info(port, "deploy-private", &admin);
    assert_eq!(status, 404, "{}", server.log());
    let (status, public) = cache_info(port, "deploy-public", &admin);
    assert_eq!(status, 200);
    assert_eq!(public["max_size"], Value::Null, "{public}");
    assert!(server.stop().success());
}

/// Every server setting is an option of the NixOS module with a type (so a bad value fails at
/// evaluation), and every option is a setting: the module's `settings` options read from its
/// source, against the settings' one definition. `caches` and `delete_undeclared_caches` are
/// the module's `caches` and `deleteUndeclaredCaches`.
#[test]
fn the_nixos_module_declares_every_server_setting() {
    let module = read(&repo_root().join("nix/nixos-module.nix"));
    let block = module
        .split("    settings = mkOption {")
        .nth(1)
        .and_then(|rest| rest.split("    environmentFile = mkOption").next())
        .expect("the module's settings option");
    let option = regex::Regex::new(r"(?m)^ {10}([a-z0-9_]+) = (?:nullOr|mkOption)").unwrap();
    let declared: Vec<&str> = option
        .captures_iter(block)
        .map(|c| c.get(1).unwrap().as_str())
        .collect();
    let expected: Vec<&str> = larder_server::config::Settings::KEYS
        .iter()
        .copied()
        .filter(|k| !["caches", "delete_undeclared_caches"].contains(k))
        .collect();
    assert_eq!(
        declared, expected,
        "the module's settings, in the definition's order"
    );
    for (name, option) in [
        ("caches", "    caches = mkOption"),
        (
            "delete_undeclared_caches",
            "    deleteUndeclaredCaches = mkOption",
        ),
    ] {
        assert!(module.contains(option), "{name}");
    }
}

/// `settings.oidc` is typed like the server's `[oidc]` table, and what the module renders is
/// a file the server accepts with the same issuers and rules (`max_lifetime` left out when
/// unset: the server's default applies).
#[test]
fn the_nixos_module_renders_the_oidc_table_the_server_reads() {
    let files = render(
        "nixos",
        r#"{ services.larder = { enable = true; settings.oidc.issuers = [ {
             issuer = "https://token.actions.githubusercontent.com";
             audience = "https://cache.example.org";
             rules = [ { claims = { repository = "mitsio/dotfiles"; ref = "refs/heads/main"; };
                         perm = "push"; caches = [ "modular-workspace" ]; } ]; } ]; }; }"#,
    );
    let toml_path = store_path_ending(&read(&files.join("larder.service")), "-larder.toml");
    let file = larder_server::config::ConfigFile::load(&toml_path).unwrap();
    let resolved = larder_server::config::Config::resolve(file, "/unused".into()).unwrap();
    let oidc = &resolved.oidc;
    assert_eq!(
        oidc.max_lifetime,
        larder_server::config::MAX_OIDC_TOKEN_LIFETIME
    );
    assert_eq!(oidc.issuers.len(), 1);
    assert_eq!(oidc.issuers[0].audience, "https://cache.example.org");
    let rule = &oidc.issuers[0].rules[0];
    assert_eq!(rule.perm, larder_server::auth::Perm::Push);
    assert_eq!(rule.caches, ["modular-workspace"]);
    assert_eq!(rule.claims.len(), 2);
    // A permission the server would refuse fails evaluation.
    let error = evaluation_error(
        "nixos",
        r#"{ services.larder = { enable = true; settings.oidc.issuers = [ {
             issuer = "https://gitlab.com"; audience = "x";
             rules = [ { claims = { project_path = "a/b"; }; perm = "admin"; caches = [ "c" ]; } ];
             } ]; }; }"#,
    );
    assert!(error.contains("perm"), "{error}");
}
