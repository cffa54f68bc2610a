//! `larder serve` itself, as a user starts it: configuration mistakes stop it at start with a
//! message naming the setting, and what it prints at start tells the user what to run next.

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

use std::time::Duration;

use common::*;

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
    let data = private_tempdir();
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
    let data = private_tempdir();
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
    let data = private_tempdir();
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

/// Whether the peer closed `conn` (end of stream or reset) within `within`.
async fn closed_within(conn: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A response (to a complete request) or an error page: keep reading.
            Ok(Ok(_)) => continue,
        }
    }
}

/// A connection from `from` (a loopback address: all of 127/8 is this machine) to `port`.
async fn connect_from(from: &str, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{from}:0").parse().unwrap())?;
    socket
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_cannot_crowd_out_other_clients() {
    use std::time::Instant;
    use tokio::io::AsyncWriteExt;
    // The server raises its open-file limit to the hard limit: start it with a low soft one.
    let lowered = std::process::Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string(), "--nofile=512:"])
        .status()
        .unwrap();
    assert!(lowered.success());
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "header_timeout = \"2s\"\nmax_connections_per_client = 50\n",
    )
    .unwrap();
    let server = Server::start_with(&["--config", config.path().to_str().unwrap()]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.child.id())).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(open_files[3], open_files[4], "soft = hard: {limits}");

    // 200 connections from one address, four times its cap: half send nothing, half half a
    // request line.
    let mut silent = Vec::new();
    for i in 0..200 {
        let Ok(mut conn) = connect_from("127.0.0.2", server.port).await else {
            continue;
        };
        if i % 2 == 0 {
            let _ = conn.write_all(b"GET /healthz HT").await;
        }
        silent.push(conn);
    }
    assert_eq!(
        silent.len(),
        200,
        "the kernel queues what the server has not accepted"
    );
    // What an operator sees meanwhile: the connections held, and those refused at the cap.
    let url = server.url.clone();
    let metrics = tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("curl")
            .args(["-sf", "-m", "5"])
            .arg(format!("{url}/metrics"))
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    })
    .await
    .unwrap();
    let series = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in {metrics}"))
            .parse()
            .unwrap()
    };
    assert!(
        series("larder_connections_open") >= 51.0,
        "50 silent and this scrape: {metrics}"
    );
    assert!(
        (140.0..=150.0).contains(&series(
            "larder_connections_refused_total{cap=\"max_connections_per_client\"}"
        )),
        "{metrics}"
    );
    assert_eq!(
        series("larder_connections_max{cap=\"max_connections_per_client\"}"),
        50.0
    );
    // A kept-alive connection that went idle after a request, from a third address.
    let mut idle = connect_from("127.0.0.3", server.port).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: larder\r\n\r\n")
        .await
        .unwrap();

    // Meanwhile, everybody else is served at once.
    let started = Instant::now();
    let url = server.url.clone();
    let statuses = tokio::task::spawn_blocking(move || {
        (0..20)
            .map(|_| {
                let out = std::process::Command::new("curl")
                    .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5"])
                    .arg(format!("{url}/healthz"))
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert!(statuses.iter().all(|s| s == "200"), "{statuses:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // The connections over the cap were closed at once; the others after header_timeout.
    let started = Instant::now();
    let mut at_once = 0;
    for conn in silent.iter_mut().skip(50) {
        at_once += usize::from(closed_within(conn, Duration::from_millis(200)).await);
    }
    assert!(
        at_once >= 140,
        "{at_once} of 150 over the cap closed at once"
    );
    for (i, conn) in silent.iter_mut().enumerate() {
        assert!(
            closed_within(conn, Duration::from_secs(6)).await,
            "silent connection {i} still open after {:?}",
            started.elapsed()
        );
    }
    assert!(
        closed_within(&mut idle, Duration::from_secs(4)).await,
        "idle keep-alive"
    );
    // Their places are given back: the same address is served again.
    let mut again = connect_from("127.0.0.2", server.port).await.unwrap();
    again
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: larder\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut again, &mut answer)
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn everything_the_server_creates_is_private_even_in_a_readable_data_directory() {
    use std::os::unix::fs::PermissionsExt;
    let data = tempfile::tempdir().unwrap();
    std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = Server::start_in(data, &[], None);
    assert!(
        server.log().contains(&format!(
            "larder: warning: the data directory {} has mode 755: other local users can read it",
            server.data.path().display()
        )),
        "{}",
        server.log()
    );
    // A cache and a pushed path: the database, its journal, the objects and their directories.
    server.create_cache("private-files", &[]);
    let path = build_file("private-files", "secret");
    server.cli_ok(&server.admin_token, &["push", "private-files", &path]);
    let hash = &path["/nix/store/".len()..][..32];
    let narinfo = format!("/private-files/{hash}.narinfo");
    assert_eq!(server.http("GET", &narinfo, None).0, 200);
    let mut seen = 0;
    for entry in walkdir(server.data.path()) {
        let mode = std::fs::symlink_metadata(&entry)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        // The directory itself, and the test's own client home (made by `Server::cli`).
        if entry == server.data.path() || entry.starts_with(server.data.path().join("client-home"))
        {
            continue;
        }
        assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", entry.display());
        seen += 1;
    }
    assert!(seen >= 5, "{seen} files checked");
}

/// Every file and directory under `dir`.
fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut all = vec![dir.to_owned()];
    let mut i = 0;
    while i < all.len() {
        if all[i].is_dir() && !all[i].is_symlink() {
            for e in std::fs::read_dir(&all[i]).unwrap() {
                all.push(e.unwrap().path());
            }
        }
        i += 1;
    }
    all
}

/// The names in `dir` but this server's own owner lock.
fn staged_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with("owner-"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn staging_left_by_a_killed_server_is_removed_at_the_next_start() {
    use std::io::Write;
    let mut server = Server::start();
    server.create_cache("killed", &[]);
    let token = server.token("push", "killed");
    let staging = server.data.path().join("store/tmp");
    // Two uploads in flight (Nix's uploader: a NAR, then a build log), their bodies never
    // finished.
    let mut uploads = Vec::new();
    for (path, body) in [
        (
            format!("/killed/nar/{}.nar", "1".repeat(52)),
            "nix-archive-1",
        ),
        (
            format!("/killed/log/{}-x.drv", "1".repeat(32)),
            "a build log",
        ),
    ] {
        let mut curl = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-X", "PUT", "-T", "-"])
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .arg(format!("{}{path}", server.url))
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = curl.stdin.take().unwrap();
        stdin.write_all(body.as_bytes()).unwrap();
        stdin.flush().unwrap();
        uploads.push((curl, stdin));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while staged_files(&staging).len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            staged_files(&staging)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.crash();
    let left = staged_files(&staging);
    assert!(
        left.iter().any(|n| n.starts_with("upload-"))
            && left.iter().any(|n| n.starts_with("spool-")),
        "{left:?}"
    );
    drop(uploads);

    let data = std::mem::replace(&mut server.data, tempfile::tempdir().unwrap());
    let again = Server::start_in(data, &[], None);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !staged_files(&staging).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "still staged after the restart: {:?}",
            staged_files(&staging)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let locks = std::fs::read_dir(&staging).unwrap().count();
    assert_eq!(locks, 1, "only the running server's owner lock is left");
    // The log line follows the removal; the thread reading the server's stderr may lag.
    while !again
        .log()
        .contains("removed staging files left by a stopped server")
    {
        assert!(std::time::Instant::now() < deadline, "{}", again.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The server's peak resident memory so far (`VmHWM`), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn memory_does_not_grow_with_the_entries_of_a_nar() {
    use larder_nix::hash::Sha256Hasher;
    use std::io::{Read, Write};
    const ENTRIES: usize = 400_000;
    let server = Server::start();
    server.create_cache("entries", &[]);
    let token = server.token("push", "entries");
    // One directory of 400 000 empty files: a 77 MiB NAR.
    let work = tempfile::tempdir().unwrap();
    let nar_file = work.path().join("many.nar");
    let mut w = larder_nix::nar::write::NarWriter::new(std::io::BufWriter::new(
        std::fs::File::create(&nar_file).unwrap(),
    ))
    .unwrap();
    w.begin_directory().unwrap();
    for i in 0..ENTRIES {
        w.entry(format!("f{i:07}")).unwrap();
        w.regular_bytes(false, b"").unwrap();
    }
    w.end_directory().unwrap();
    w.finish().unwrap().flush().unwrap();
    let (mut hasher, mut size, mut buf) = (Sha256Hasher::new(), 0u64, vec![0u8; 1 << 20]);
    let mut f = std::fs::File::open(&nar_file).unwrap();
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let hash = hasher.finalize();
    let before = peak_rss_kib(server.child.id());

    // Nix's way: the NAR, then its narinfo.
    let curl_put = |path: &str, data: &str| {
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .args(["--data-binary", data])
            .arg(format!("{}{path}", server.url))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let file_hash = hash.to_nix32();
    let nar_path = format!("/entries/nar/{file_hash}.nar");
    assert_eq!(
        curl_put(&nar_path, &format!("@{}", nar_file.display())),
        "204"
    );
    let store_hash = &file_hash[..32];
    let narinfo = format!(
        "StorePath: /nix/store/{store_hash}-many-files\nURL: nar/{file_hash}.nar\n\
         Compression: none\nFileHash: sha256:{file_hash}\nFileSize: {size}\n\
         NarHash: sha256:{file_hash}\nNarSize: {size}\nReferences: \n"
    );
    let narinfo_file = work.path().join("narinfo");
    std::fs::write(&narinfo_file, narinfo).unwrap();
    let code = curl_put(
        &format!("/entries/{store_hash}.narinfo"),
        &format!("@{}", narinfo_file.display()),
    );
    assert_eq!(code, "204");
    let after_upload = peak_rss_kib(server.child.id());

    // Four readers of its listing at once.
    let readers: Vec<_> = (0..4)
        .map(|_| {
            std::process::Command::new("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %{size_download}",
                ])
                .arg(format!("{}/entries/{store_hash}.ls", server.url))
                .spawn_with_output()
        })
        .collect();
    for r in readers {
        let out = r.join().unwrap();
        let (code, bytes) = out.split_once(' ').unwrap();
        assert_eq!(code, "200");
        assert!(bytes.parse::<u64>().unwrap() > ENTRIES as u64 * 40, "{out}");
    }
    let after_listing = peak_rss_kib(server.child.id());
    eprintln!("peak RSS: {before} KiB, {after_upload} KiB after the upload, {after_listing} KiB after the listings");
    // Before this was bounded, the upload alone cost ~135 bytes per entry (+50 MiB here), and
    // each listing request as much again.
    assert!(
        after_upload - before < 20 * 1024 && after_listing - before < 20 * 1024,
        "peak RSS {before} KiB → {after_upload} KiB after the upload → {after_listing} KiB \
         after four listings"
    );
}

/// Run a command on a thread of its own; its standard output when it ends.
trait SpawnWithOutput {
    fn spawn_with_output(&mut self) -> std::thread::JoinHandle<String>;
}

impl SpawnWithOutput for std::process::Command {
    fn spawn_with_output(&mut self) -> std::thread::JoinHandle<String> {
        let child = self.stdout(std::process::Stdio::piped()).spawn().unwrap();
        std::thread::spawn(move || {
            String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).into_owned()
        })
    }
}

/// `GET /api/v1/caches/NAME` as the admin: the cache's settings, or `None` if it is gone.
fn cache_settings(server: &Server, name: &str) -> Option<serde_json::Value> {
    let (status, body) = server.http(
        "GET",
        &format!("/api/v1/caches/{name}"),
        Some(&server.admin_token),
    );
    match status {
        200 => Some(serde_json::from_str(&body).unwrap()),
        404 => None,
        other => panic!("GET cache {name}: {other} {body}"),
    }
}

const UPSTREAM_KEY: &str = "up.example.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

#[test]
fn caches_declared_in_the_config_file_are_created_then_updated_and_deleted_only_when_asked() {
    let conf_dir = tempfile::tempdir().unwrap();
    let conf = conf_dir.path().join("larder.toml");
    let conf_arg = conf.to_str().unwrap();
    std::fs::write(
        &conf,
        format!(
            "[caches.declared]\nprivate = true\npriority = 30\nmax_size = \"1GiB\"\n\
             compression = \"xz\"\nupstream_keys = [\"{UPSTREAM_KEY}\"]\n\
             upstreams = [\"https://cache.nixos.org/\"]\n\n[caches.plain]\n"
        ),
    )
    .unwrap();
    let server = Server::start_with(&["--config", conf_arg]);
    assert!(
        server.log().contains("created declared cache \"declared\""),
        "{}",
        server.log()
    );
    let c = cache_settings(&server, "declared").expect("declared cache created");
    assert_eq!(c["private"], true);
    assert_eq!(c["priority"], 30);
    assert_eq!(c["max_size"], 1u64 << 30);
    assert_eq!(c["compression"], "xz");
    assert_eq!(c["upstream_keys"], serde_json::json!([UPSTREAM_KEY]));
    assert_eq!(
        c["upstreams"],
        serde_json::json!(["https://cache.nixos.org"])
    );
    let key = c["public_key"].as_str().unwrap().to_owned();
    // Keys left out take the defaults a new cache gets.
    let plain = cache_settings(&server, "plain").expect("plain cache created");
    assert_eq!(plain["private"], false);
    assert_eq!(plain["priority"], 41);
    assert_eq!(plain["max_size"], serde_json::Value::Null);
    // Anonymous clients cannot tell the private one from a cache that does not exist.
    assert_eq!(
        server.http("GET", "/api/v1/caches/declared", None).0,
        server.http("GET", "/api/v1/caches/no-such-cache", None).0
    );
    server.create_cache("by-hand", &[]);

    // The declaration changes: what it says is applied, what it leaves out is kept, and
    // caches it no longer names stay.
    let data = server.stop_keeping_data();
    std::fs::write(
        &conf,
        "[caches.declared]\npriority = 50\nmax_size = \"none\"\n",
    )
    .unwrap();
    let server = Server::start_in(data, &["--config", conf_arg], None);
    assert!(
        server
            .log()
            .contains("updated declared cache \"declared\": priority, max_size"),
        "{}",
        server.log()
    );
    let c = cache_settings(&server, "declared").unwrap();
    assert_eq!(c["priority"], 50);
    assert_eq!(c["max_size"], serde_json::Value::Null);
    assert_eq!(c["private"], true, "a key left out keeps its value");
    assert_eq!(c["public_key"], key.as_str(), "the signing key is kept");
    assert!(cache_settings(&server, "plain").is_some());
    assert!(cache_settings(&server, "by-hand").is_some());

    // Starting again with the same declaration changes nothing.
    let data = server.stop_keeping_data();
    let server = Server::start_in(data, &["--config", conf_arg], None);
    assert!(!server.log().contains("declared cache"), "{}", server.log());

    // Asked to, the server deletes what is not declared.
    let data = server.stop_keeping_data();
    std::fs::write(
        &conf,
        "delete_undeclared_caches = true\n[caches.declared]\n",
    )
    .unwrap();
    let server = Server::start_in(data, &["--config", conf_arg], None);
    assert!(cache_settings(&server, "plain").is_none());
    assert!(cache_settings(&server, "by-hand").is_none());
    assert!(cache_settings(&server, "declared").is_some());
    assert!(
        server.log().contains("deleted cache \"by-hand\""),
        "{}",
        server.log()
    );
}

#[test]
fn a_bad_declared_cache_stops_the_server_naming_the_cache_and_the_key() {
    let conf_dir = tempfile::tempdir().unwrap();
    let conf = conf_dir.path().join("larder.toml");
    for (toml, expect) in [
        (
            "[caches.ok]\nmax_size = \"5 elephants\"\n",
            "invalid max_size (more than 0, like 5GiB, or \"none\" for no limit) of declared \
             cache \"ok\" ([caches.ok]): \"5 elephants\"",
        ),
        (
            "[caches.ok]\ncompression = \"gzip\"\n",
            "invalid compression (zstd, xz or none) of declared cache \"ok\"",
        ),
        (
            "[caches.ok]\npriority = -1\n",
            "invalid priority (0 to 1000000) of declared cache \"ok\"",
        ),
        (
            "[caches.Bad_Name]\n",
            "invalid name (1-63 of [a-z0-9-], starting with a letter or digit) of declared \
             cache \"Bad_Name\"",
        ),
        (
            "[caches.ok]\nupstream_keys = [\"nonsense\"]\n",
            "invalid upstream_keys (name:base64 public keys) of declared cache \"ok\"",
        ),
        (
            "[caches.ok]\nupstreams = [\"file:///srv/cache\"]\n",
            "invalid upstreams (http:// or https:// URLs) of declared cache \"ok\"",
        ),
        ("[caches.ok]\nprivat = true\n", "unknown field `privat`"),
        (
            "[caches.api]\n",
            "invalid name (reserved: api, ui, static, metrics and healthz are routes) of \
             declared cache \"api\"",
        ),
        (
            "[caches.ok]\nmax_size = -1\n",
            "a size: a number of bytes or a string like \"5GiB\"",
        ),
        (
            "delete_undeclared_caches = true\n",
            "it would delete every cache, since no [caches.NAME] table is declared",
        ),
    ] {
        std::fs::write(&conf, toml).unwrap();
        let data = private_tempdir();
        let stderr = serve_fails(data.path(), &["--config", conf.to_str().unwrap()], &[]);
        assert!(stderr.contains(expect), "{toml}: {stderr}");
    }
}

/// A cache's declared upstream key works like the server's: a path that references a path
/// signed by that key is accepted without it (and `larder push` does not upload it), while a
/// cache without the key still asks for the reference.
#[test]
fn a_declared_upstream_key_lets_pushes_reference_what_it_signed() {
    require_nix();
    let keys = tempfile::tempdir().unwrap();
    let secret = keys.path().join("up.sec");
    let xdg = tempfile::tempdir().unwrap();
    let out = nix(
        &["key", "generate-secret", "--key-name", "up.example.org-1"],
        xdg.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&secret, &out.stdout).unwrap();
    let public = larder_testkit::nix::command("nix")
        .args(["key", "convert-secret-to-public"])
        .env("NIX_CONFIG", NIX_CONFIG)
        .stdin(std::fs::File::open(&secret).unwrap())
        .output()
        .unwrap();
    assert!(public.status.success());
    let public = String::from_utf8(public.stdout).unwrap().trim().to_owned();

    let tag = unique_tag();
    let dep = build_expr(&format!(
        "derivation {{ name = \"upstream-dep-{tag}\"; system = builtins.currentSystem; \
         builder = \"/bin/sh\"; args = [\"-c\" \"echo dep > $out\"]; }}"
    ))
    .remove(0);
    let top = build_expr(&format!(
        "let dep = derivation {{ name = \"upstream-dep-{tag}\"; system = builtins.currentSystem; \
         builder = \"/bin/sh\"; args = [\"-c\" \"echo dep > $out\"]; }}; in \
         derivation {{ name = \"upstream-top-{tag}\"; system = builtins.currentSystem; \
         builder = \"/bin/sh\"; args = [\"-c\" \"echo ${{dep}} > $out\"]; }}"
    ))
    .remove(0);
    let signed = nix(
        &[
            "store",
            "sign",
            "--key-file",
            secret.to_str().unwrap(),
            &dep,
        ],
        xdg.path(),
    );
    assert!(
        signed.status.success(),
        "{}",
        String::from_utf8_lossy(&signed.stderr)
    );

    let conf_dir = tempfile::tempdir().unwrap();
    let conf = conf_dir.path().join("larder.toml");
    std::fs::write(
        &conf,
        format!("[caches.trusting]\nupstream_keys = [\"{public}\"]\n[caches.plain]\n"),
    )
    .unwrap();
    let server = Server::start_with(&["--config", conf.to_str().unwrap()]);
    let out = server.cli_ok(&server.admin_token, &["push", "trusting", &top, "--json"]);
    assert!(!out.contains(&dep), "the upstream path was uploaded: {out}");
    let dep_hash = &dep["/nix/store/".len()..][..32];
    let top_hash = &top["/nix/store/".len()..][..32];
    assert_eq!(
        server
            .http("GET", &format!("/trusting/{top_hash}.narinfo"), None)
            .0,
        200
    );
    assert_eq!(
        server
            .http("GET", &format!("/trusting/{dep_hash}.narinfo"), None)
            .0,
        404
    );
    // Without the key, the same push uploads the dependency too.
    server.cli_ok(&server.admin_token, &["push", "plain", &top]);
    assert_eq!(
        server
            .http("GET", &format!("/plain/{dep_hash}.narinfo"), None)
            .0,
        200
    );
}

#[test]
fn a_data_directory_in_the_config_file_needs_no_home() {
    let data = private_tempdir();
    let conf_dir = tempfile::tempdir().unwrap();
    let conf = conf_dir.path().join("larder.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
            data.path().display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(larder_bin())
        .args(["serve", "--config"])
        .arg(&conf)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let first = std::io::BufRead::lines(std::io::BufReader::new(stderr))
        .map_while(Result::ok)
        .find(|l| l.starts_with("larder: listening on") || l.starts_with("error"));
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        first
            .as_deref()
            .is_some_and(|l| l.starts_with("larder: listening on")),
        "{first:?}"
    );
}

#[test]
fn print_config_shows_every_layer_resolved_with_secrets_masked_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        "listen = \"0.0.0.0:9\"\ngc_interval = \"5m\"\nmax_upload_size = \"1G\"\n\
         database = \"postgres://larder:db-password@db.example/larder\"\n\
         s3_secret_access_key = \"file-secret\"\ns3_access_key_id = \"GKFILE\"\n\
         [caches.main]\nprivate = true\n",
    )
    .unwrap();
    let out = std::process::Command::new(larder_bin())
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--data")
        .arg(&data)
        .args(["--listen", "127.0.0.1:7", "--print-config"])
        .env_remove("LARDER_PUBLIC_URL")
        .env("LARDER_GC_INTERVAL", "10m")
        .env("LARDER_ORPHAN_GRACE", "2h")
        .env("AWS_SECRET_ACCESS_KEY", "env-secret")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Flag over file, environment over file, file over default, defaults filled in.
    let printed: toml::Table = toml::from_str(&stdout).unwrap();
    assert_eq!(printed["listen"].as_str(), Some("127.0.0.1:7"), "{stdout}");
    assert_eq!(printed["gc_interval"].as_str(), Some("10m"), "{stdout}");
    assert_eq!(printed["orphan_grace"].as_str(), Some("2h"), "{stdout}");
    assert_eq!(
        printed["max_upload_size"].as_str(),
        Some("1GiB"),
        "{stdout}"
    );
    assert_eq!(printed["header_timeout"].as_str(), Some("30s"), "{stdout}");
    assert_eq!(printed["public_url"].as_str(), Some("http://127.0.0.1:7"));
    assert_eq!(printed["caches"]["main"]["private"].as_bool(), Some(true));
    for secret in ["db-password", "file-secret", "env-secret", "GKFILE"] {
        assert!(!stdout.contains(secret), "{secret} printed:\n{stdout}");
    }
    assert_eq!(
        printed["database"].as_str(),
        Some("postgres://larder:********@db.example/larder")
    );
    // Nothing was started or created: no data directory, no token, nothing said on stderr.
    assert!(!data.exists());
    assert!(stderr.is_empty(), "{stderr}");
    // A bad value still stops it, naming the setting.
    let out = std::process::Command::new(larder_bin())
        .args([
            "serve",
            "--print-config",
            "--header-timeout",
            "soon",
            "--data",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("header_timeout: invalid duration \"soon\""),
        "{stderr}"
    );
}

/// An upload whose body stops arriving is answered 408 and its connection closed after
/// `header_timeout` of silence (half a body, or nothing after `Expect: 100-continue`, which is
/// how Nix 2.8 re-sends a PUT after a failure), and nothing of it is kept; an upload that keeps
/// sending, however slowly, is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_body_that_stops_arriving_is_dropped() {
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), "header_timeout = \"1s\"\n").unwrap();
    let server = Server::start_with(&["--config", config.path().to_str().unwrap()]);
    server.cli_ok(&server.admin_token, &["cache", "create", "stall"]);
    let nar = "/stall/nar/1ylvfcrs4j8dzfwaiazj4j9bw557qzxp8d78v9inpcw9whfb7yg3.nar.zst";
    let head = |extra: &str| {
        format!(
            "PUT {nar} HTTP/1.1\r\nHost: larder\r\nAuthorization: Bearer {}\r\n\
             Content-Length: 1048576\r\n{extra}\r\n",
            server.admin_token
        )
    };
    for (what, request) in [
        ("half a body", format!("{}\u{28}\u{b5}\u{2f}", head(""))),
        (
            "nothing after 100-continue",
            head("Expect: 100-continue\r\n"),
        ),
    ] {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", server.port))
            .await
            .unwrap();
        conn.write_all(request.as_bytes()).await.unwrap();
        let started = Instant::now();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("{what}: still open after 10 s"));
        let _ = read; // a reset after the answer is fine
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.contains("408 Request Timeout") && answer.contains("stalled"),
            "{what}: {answer}"
        );
        assert!(started.elapsed() < Duration::from_secs(5), "{what}");
    }
    // A slow upload that keeps sending (a byte every 400 ms, over more than the timeout) is
    // not cut: it reaches the server's own verdict on its bytes.
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    // A valid uncompressed NAR (one file) under a name that is not its hash: refused at the
    // end, once the server has every byte.
    let mut body = Vec::new();
    for word in [
        "nix-archive-1",
        "(",
        "type",
        "regular",
        "contents",
        "hello",
        ")",
    ] {
        body.extend((word.len() as u64).to_le_bytes());
        body.extend(word.as_bytes());
        body.resize(body.len().div_ceil(8) * 8, 0);
    }
    let plain = nar.trim_end_matches(".zst");
    let slow_head = format!(
        "PUT {plain} HTTP/1.1\r\nHost: larder\r\nAuthorization: Bearer {}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        server.admin_token,
        body.len()
    );
    conn.write_all(slow_head.as_bytes()).await.unwrap();
    for chunk in body.chunks(body.len() / 4 + 1) {
        tokio::time::sleep(Duration::from_millis(400)).await;
        conn.write_all(chunk).await.unwrap();
    }
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("does not match its content"),
        "{answer}"
    );
    // Nothing was stored; the server counted the stalls as interrupted uploads.
    let (_, narinfo) = server.http("GET", "/stall/nix-cache-info", None);
    assert!(narinfo.contains("StoreDir"));
    let (_, metrics) = server.http("GET", "/metrics", Some(&server.admin_token));
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("interrupted") && l.trim_end().ends_with(" 2")),
        "{metrics}"
    );
}
