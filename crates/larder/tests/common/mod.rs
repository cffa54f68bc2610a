//! Shared harness of the end-to-end tests: a real `larder serve` process on a free loopback
//! port with its own data directory, the `larder` CLI run against it with env-only
//! configuration, and real Nix (which these tests require: a missing `nix` fails them).
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The suite's Nix settings (no sandbox, no build users, no substituters): the one definition
/// in `larder_testkit::nix`, which also keeps every test's Nix away from the machine's and the
/// user's nix.conf.
pub use larder_testkit::nix::NIX_CONFIG;

pub fn larder_bin() -> &'static str {
    env!("CARGO_BIN_EXE_larder")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Fail (not skip) when real Nix is missing: the end-to-end tests are required.
pub fn require_nix() {
    let ok = larder_testkit::nix::command("nix")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "real Nix is required for the end-to-end tests (apt-get install nix-bin); `.ci/run` installs it"
    );
}

pub struct Server {
    pub child: Child,
    pub url: String,
    pub port: u16,
    pub data: tempfile::TempDir,
    pub admin_token: String,
    /// Every line the server printed on stderr so far.
    log: Arc<Mutex<Vec<String>>>,
}

/// A temporary data directory of mode 0700, as `larder serve` creates its own (a readable one
/// makes the server warn at start).
pub fn private_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    dir
}

impl Server {
    pub fn start() -> Server {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Server {
        Self::start_in(private_tempdir(), extra, None)
    }

    /// Start with extra flags and environment variables (e.g. S3 credentials).
    pub fn start_env(extra: &[&str], env: &[(&str, String)]) -> Server {
        Self::start_full(private_tempdir(), extra, None, env)
    }

    /// Start on the data directory `data` (fresh or used before) with `extra` arguments.
    /// `admin_token`: the token to use when the data directory has no `admin-token` file (a
    /// replica sharing an already bootstrapped database).
    pub fn start_in(data: tempfile::TempDir, extra: &[&str], admin_token: Option<&str>) -> Server {
        Self::start_full(data, extra, admin_token, &[])
    }

    /// [`Server::start_in`] with environment variables for the server.
    pub fn start_full(
        data: tempfile::TempDir,
        extra: &[&str],
        admin_token: Option<&str>,
        env: &[(&str, String)],
    ) -> Server {
        Self::start_listening(data, "127.0.0.1:0", extra, admin_token, env)
    }

    /// [`Server::start_full`] listening on `listen` (a port chosen before, for a URL the
    /// configuration must name).
    pub fn start_listening(
        data: tempfile::TempDir,
        listen: &str,
        extra: &[&str],
        admin_token: Option<&str>,
        env: &[(&str, String)],
    ) -> Server {
        let mut cmd = larder_testkit::nix::command(larder_bin());
        cmd.args(["serve", "--listen", listen, "--data"])
            .arg(data.path())
            .args(extra)
            .env_remove("LARDER_SERVE_CONFIG")
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("LARDER_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn larder serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log_lines = log.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(url) = line.strip_prefix("larder: listening on ") {
                        let _ = tx.send(url.to_owned());
                        sent = true;
                    }
                }
                if std::env::var_os("LARDER_TEST_VERBOSE").is_some() {
                    eprintln!("[server] {line}");
                }
                log_lines.lock().unwrap().push(line);
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "server did not print its listening line:\n{}",
                    log.lock().unwrap().join("\n")
                )
            });
        let port = url.rsplit(':').next().unwrap().parse().unwrap();
        let admin_token = match std::fs::read_to_string(data.path().join("admin-token")) {
            Ok(t) => t.trim().to_owned(),
            Err(_) => admin_token
                .expect("admin-token written at first start")
                .to_owned(),
        };
        Server {
            child,
            url,
            port,
            data,
            admin_token,
            log,
        }
    }

    /// Everything the server printed on stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// `GET` (or another method) a path of this server with curl: `(status, body)`.
    pub fn http(&self, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-s",
            "-X",
            method,
            "--max-time",
            "30",
            "-w",
            "\n%{http_code}",
        ]);
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        let out = cmd
            .arg(format!("{}{path}", self.url))
            .output()
            .expect("run curl (apt-get install curl)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// Requests this server answered with a success (2xx) on a route whose pattern contains
    /// `route` (its `/metrics`).
    pub fn requests_to(&self, route: &str) -> u64 {
        let (code, metrics) = self.http("GET", "/metrics", None);
        assert_eq!(code, 200, "{metrics}");
        metrics
            .lines()
            .filter(|l| l.starts_with("larder_http_requests_total{"))
            .filter(|l| l.contains(route) && l.contains("status=\"2"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Stop the server (SIGTERM) and hand back its data directory.
    pub fn stop_keeping_data(mut self) -> tempfile::TempDir {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        std::mem::replace(&mut self.data, tempfile::tempdir().unwrap())
    }

    /// Kill the server at once (SIGKILL), as a crash would.
    pub fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Run the CLI against this server with `token` (env-only configuration).
    pub fn cli(&self, token: &str, args: &[&str]) -> Output {
        let home = self.data.path().join("client-home");
        std::fs::create_dir_all(&home).unwrap();
        larder_testkit::nix::command(larder_bin())
            .args(args)
            .env("LARDER_SERVER", &self.url)
            .env("LARDER_TOKEN", token)
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env_remove("LARDER_CONFIG")
            .output()
            .expect("run larder")
    }

    /// Run the CLI and require success; returns stdout.
    pub fn cli_ok(&self, token: &str, args: &[&str]) -> String {
        let out = self.cli(token, args);
        assert!(
            out.status.success(),
            "larder {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn create_cache(&self, name: &str, extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["cache", "create", name, "--json"];
        args.extend_from_slice(extra);
        serde_json::from_str(&self.cli_ok(&self.admin_token, &args)).unwrap()
    }

    pub fn token(&self, perm: &str, cache: &str) -> String {
        self.cli_ok(
            &self.admin_token,
            &[
                "token", "create", "--perm", perm, "--cache", cache, "--label", "test",
            ],
        )
        .trim()
        .to_owned()
    }

    /// A netrc file granting `token` on this server (what Nix reads).
    pub fn netrc(&self, dir: &Path, name: &str, token: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(
            &p,
            format!("machine 127.0.0.1 login larder password {token}\n"),
        )
        .unwrap();
        p
    }

    pub fn stop(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `larder serve --data DATA ARGS…` and read its stderr up to its listening line: the
/// running server and the lines it printed until then.
pub fn serve_until_listening(data: &Path, args: &[&str]) -> (Child, Vec<String>) {
    let mut child = larder_testkit::nix::command(larder_bin())
        .args(["serve", "--data"])
        .arg(data)
        .args(args)
        .env_remove("LARDER_SERVE_CONFIG")
        .env_remove("LARDER_PUBLIC_URL")
        .env("LARDER_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("larder serve exited:\n{}", seen.join("\n")))
            .unwrap();
        let done = line.starts_with("larder: listening on ");
        seen.push(line);
        if done {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    (child, seen)
}

/// Run the Nix oracle (tests/oracle/nix-oracle.sh, a copy of the project's judge) with `env`.
pub fn oracle(args: &[&str], workdir: &Path, env: &[(&str, String)]) -> Output {
    let script = repo_root().join("tests/oracle/nix-oracle.sh");
    let mut cmd = larder_testkit::nix::command("bash");
    cmd.arg(script).args(args).env("WORKDIR", workdir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run nix-oracle.sh")
}

/// Run the oracle's `run` (with `push_cmd`) or `verify` (without) against `cache_url` with
/// `key` trusted, in `workdir`; fail the test unless it passes. Returns its stderr.
#[track_caller]
pub fn oracle_pass(workdir: &Path, cache_url: &str, key: &str, push_cmd: Option<String>) -> String {
    let mut env = vec![
        ("CACHE_URL", cache_url.to_owned()),
        ("TRUSTED_PUBLIC_KEY", key.to_owned()),
    ];
    let cmd = match push_cmd {
        Some(push) => {
            env.push(("PUSH_CMD", push));
            "run"
        }
        None => "verify",
    };
    let out = oracle(&[cmd], workdir, &env);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "oracle {cmd} failed:\n{stderr}");
    assert!(stderr.contains(&format!("PASS {cache_url}")), "{stderr}");
    stderr
}

pub fn nix(args: &[&str], xdg: &Path) -> Output {
    larder_testkit::nix::command("nix")
        .args(args)
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("XDG_CACHE_HOME", xdg)
        .output()
        .expect("run nix")
}

/// Build a Nix expression (`nix-build -E`) with real Nix; returns its output paths.
pub fn build_expr(expr: &str) -> Vec<String> {
    let xdg = tempfile::tempdir().unwrap();
    let o = larder_testkit::nix::command("nix-build")
        .args(["--no-out-link", "-E", expr])
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("XDG_CACHE_HOME", xdg.path())
        .output()
        .expect("run nix-build");
    assert!(
        o.status.success(),
        "nix-build: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Digits unique to this moment and process, to keep test derivations (and so store paths)
/// apart from every earlier run's.
pub fn unique_tag() -> String {
    format!(
        "{}{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// Build a one-file test derivation with real Nix; returns its output path.
pub fn build_file(name: &str, content: &str) -> String {
    let unique = format!("{name}-{}", unique_tag());
    let expr = format!(
        "derivation {{ name = \"{unique}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; \
         args = [\"-c\" \"echo {content} > $out\"]; }}"
    );
    build_expr(&expr).remove(0)
}

/// Garage's bucket through larder's own S3 backend, staging in `staging`.
pub fn garage_store(
    garage: &larder_testkit::garage::Garage,
    staging: &Path,
) -> larder_store::ObjectStore {
    larder_store::ObjectStore::open(
        &garage.storage_url(),
        larder_store::OpenOptions {
            staging_dir: staging.to_owned(),
            s3_credentials: Some(larder_store::S3Credentials {
                access_key_id: garage.access_key_id.clone(),
                secret_access_key: larder_store::Secret::new(garage.secret_access_key.clone()),
            }),
        },
    )
    .unwrap()
}

/// The objects in Garage's bucket, listed through larder's own S3 backend.
pub fn garage_keys(garage: &larder_testkit::garage::Garage) -> Vec<String> {
    use futures::StreamExt;
    let staging = tempfile::tempdir().unwrap();
    let store = garage_store(garage, staging.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(store.list().map(|k| k.unwrap()).collect())
}

/// `larder serve --listen 127.0.0.1:0 --data DATA ARGS…` with `env`, which must fail at
/// start: its exit status is 1 and its stderr is returned. (`timeout`: a server that starts
/// anyway fails the test instead of hanging it.)
pub fn serve_fails(data: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> String {
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

/// A port free on loopback right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
