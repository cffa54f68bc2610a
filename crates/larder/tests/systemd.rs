//! `larder serve` under systemd, driven by systemd's own tools: readiness and stopping on
//! `NOTIFY_SOCKET` (`Type=notify`), the listening socket handed over by socket activation
//! (`systemd-socket-activate`), a restart under socket activation that loses no request, and
//! logs fit for the journal and for log shippers.

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// One HTTP/1.1 request on a new connection (`Connection: close`): the status, or why there
/// was none.
fn get(port: u16, path: &str) -> Result<u16, String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(|e| e.to_string())?;
    answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP answer: {answer:?}"))
}

/// The next datagram on the notify socket, as text.
fn next_notification(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_is_sent_once_requests_are_answered_and_stopping_when_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let conf = dir.path().join("larder.toml");
    std::fs::write(&conf, "[caches.declared]\n").unwrap();
    let data = private_tempdir();
    let port = free_port();
    let mut child = larder_testkit::nix::command(larder_bin())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
        .arg(data.path())
        .arg("--config")
        .arg(&conf)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ready = next_notification(&notify);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    // At once, with no retry: the port answers, and what start-up does (the declared cache) is
    // done.
    assert_eq!(get(port, "/healthz"), Ok(200));
    assert_eq!(get(port, "/declared/nix-cache-info"), Ok(200));
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let stopping = next_notification(&notify);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert!(child.wait().unwrap().success());
}

/// Under `systemd-socket-activate`, which listens itself and starts the server on the first
/// connection with the socket as fd 3: the server serves on that socket (its own `listen`
/// would fail), and a restart (stop, start again on the same socket, as systemd does with a
/// .socket unit) loses none of the requests a client sends in a loop meanwhile.
#[test]
fn socket_activation_hands_over_the_socket_and_a_restart_loses_no_request() {
    require_nix();
    let dir = tempfile::tempdir().unwrap();
    let data = private_tempdir();
    let conf = dir.path().join("larder.toml");
    std::fs::write(&conf, "[caches.declared]\n").unwrap();
    let pid_file = dir.path().join("pid");
    let port = free_port();
    // Two servers in turn on the socket systemd-socket-activate hands to this shell, each
    // with LISTEN_PID naming itself (what systemd sets for each start of a service).
    let script = format!(
        "for round in 1 2; do sh -c 'echo $$ > {pid}; export LISTEN_PID=$$; exec {bin} serve \
         --data {data} --config {conf} --listen 256.0.0.1:1' || exit 1; done",
        pid = pid_file.display(),
        bin = larder_bin(),
        data = data.path().display(),
        conf = conf.display(),
    );
    let mut activator = Activator(
        Command::new("systemd-socket-activate")
            .args(["-l", &format!("127.0.0.1:{port}"), "-E", "LARDER_LOG=info"])
            .args(["sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("systemd-socket-activate (Debian's systemd package)"),
        data.path().display().to_string(),
    );
    let log = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let lines = log.clone();
    let stderr = activator.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            lines.lock().unwrap().push(line);
        }
    });
    let show = || log.lock().unwrap().join("\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !show().contains("Listening on") {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate: {}",
            show()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The first connection starts the server, which answers it.
    assert_eq!(get(port, "/healthz"), Ok(200), "{}", show());
    assert!(
        show().contains(&format!("larder: listening on http://127.0.0.1:{port}")),
        "{}",
        show()
    );
    let first_pid = std::fs::read_to_string(&pid_file).unwrap();

    // A path to ask for, pushed through the activated socket.
    let token = std::fs::read_to_string(data.path().join("admin-token")).unwrap();
    let path = build_file("activated", "hello");
    let push = larder_testkit::nix::command(larder_bin())
        .args(["push", "declared", &path])
        .env("LARDER_SERVER", format!("http://127.0.0.1:{port}"))
        .env("LARDER_TOKEN", token.trim())
        .env("HOME", dir.path())
        .env_remove("LARDER_CONFIG")
        .output()
        .unwrap();
    assert!(
        push.status.success(),
        "{}",
        String::from_utf8_lossy(&push.stderr)
    );
    let narinfo = format!("/declared/{}.narinfo", &path["/nix/store/".len()..][..32]);

    // Clients asking for the narinfo in a loop, each request on a new connection.
    let done = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let done = done.clone();
            let narinfo = narinfo.clone();
            std::thread::spawn(move || {
                let mut answers = Vec::new();
                while !done.load(Ordering::Relaxed) {
                    answers.push(get(port, &narinfo));
                }
                answers
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    Command::new("kill")
        .args(["-TERM", first_pid.trim()])
        .status()
        .unwrap();
    // Wait for the second server to take over, then let the client go on a little.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pid = std::fs::read_to_string(&pid_file).unwrap_or_default();
        if pid != first_pid && !pid.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "no second start:\n{}", show());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(1500));
    done.store(true, Ordering::Relaxed);
    let answers: Vec<_> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    let failed: Vec<_> = answers.iter().filter(|a| **a != Ok(200)).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across the restart: {:?}\n{}",
        failed.len(),
        answers.len(),
        &failed[..failed.len().min(5)],
        show()
    );
    assert!(answers.len() > 50, "only {} requests", answers.len());
    assert_eq!(
        show().matches("larder: listening on").count(),
        2,
        "{}",
        show()
    );
}

/// systemd-socket-activate and the servers it started (found by their data directory), ended
/// when the test ends, failed or not.
struct Activator(std::process::Child, String);

impl Drop for Activator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = Command::new("pkill").args(["-f", &self.1]).status();
        let _ = self.0.wait();
    }
}

#[test]
fn logs_are_plain_off_a_terminal_and_json_when_asked() {
    let data = private_tempdir();
    let server = Server::start_in(data, &[], None);
    server.http("GET", "/no-such-cache/nix-cache-info", None);
    let data = server.stop_keeping_data();
    // Piped stderr: no colour codes.
    let (mut child, lines) = serve_until_listening(data.path(), &["--listen", "127.0.0.1:0"]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines.iter().all(|l| !l.contains('\u{1b}')),
        "colour codes off a terminal: {lines:?}"
    );

    // JSON: every line is a record, the start-up messages too.
    let mut child = larder_testkit::nix::command(larder_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data.path())
        .env("LARDER_LOG_FORMAT", "json")
        .env("LARDER_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut records = Vec::new();
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        let message = v["fields"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        records.push(line);
        if message.starts_with("listening on http://127.0.0.1:") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        records.iter().any(|l| l.contains("listening on")),
        "{records:?}"
    );
}
