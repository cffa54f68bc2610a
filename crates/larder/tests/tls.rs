//! Native TLS (`tls_cert`, `tls_key`), with certificates the test makes with `openssl` and
//! the real clients: curl, real Nix (substituting and `nix copy --to https://…`), and larder's
//! own `push`, `use` and `doctor`; the pair re-read on SIGHUP without dropping open
//! connections; a bad pair stops `serve` at start naming both files.

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::*;

/// A test certificate authority and the certificates it signs, in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian's openssl package)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        openssl(
            dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=larder test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        Pki { dir }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A server certificate for 127.0.0.1 and localhost named `name`: (cert, key).
    fn server(&self, name: &str) -> (PathBuf, PathBuf) {
        let d = self.dir.path();
        let ext = d.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        let (key, csr, cert) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                ext.to_str().unwrap(),
            ],
        );
        (d.join(cert), d.join(key))
    }
}

/// curl with `args`: its exit code and stdout.
fn curl(args: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "20"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A TLS client connection (rustls) trusting only `ca`, kept open across requests.
struct Client {
    tls: rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
}

impl Client {
    fn connect(port: u16, ca: &Path) -> Client {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let conn = rustls::ClientConnection::new(
            Arc::new(config),
            rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(),
        )
        .unwrap();
        let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let mut client = Client {
            tls: rustls::StreamOwned::new(conn, tcp),
        };
        assert_eq!(client.get("/healthz"), 200);
        client
    }

    /// The leaf certificate the server presented, DER.
    fn server_cert(&self) -> Vec<u8> {
        self.tls.conn.peer_certificates().unwrap()[0].to_vec()
    }

    /// GET on this connection (kept alive): the status.
    fn get(&mut self, path: &str) -> u16 {
        write!(self.tls, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        self.tls.flush().unwrap();
        // Read the head, then exactly Content-Length bytes of body.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            self.tls.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        self.tls.read_exact(&mut body).unwrap();
        head.split(' ').nth(1).unwrap().parse().unwrap()
    }
}

fn pem_der(path: &Path) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_file(path)
        .unwrap()
        .to_vec()
}

#[test]
fn https_for_curl_nix_and_larder_and_a_certificate_renewed_on_sighup() {
    require_nix();
    let pki = Pki::new();
    let (cert, key) = pki.server("first");
    let conf_dir = tempfile::tempdir().unwrap();
    let (live_cert, live_key) = (
        conf_dir.path().join("cert.pem"),
        conf_dir.path().join("key.pem"),
    );
    std::fs::copy(&cert, &live_cert).unwrap();
    std::fs::copy(&key, &live_key).unwrap();
    let server = Server::start_with(&[
        "--tls-cert",
        live_cert.to_str().unwrap(),
        "--tls-key",
        live_key.to_str().unwrap(),
    ]);
    assert!(
        server.url.starts_with("https://127.0.0.1:"),
        "{}",
        server.url
    );
    let ca = pki.ca();
    let ca_arg = ca.to_str().unwrap();

    // curl: with the CA it works; without it, and in plain HTTP, it does not.
    let health = format!("{}/healthz", server.url);
    assert_eq!(curl(&["--cacert", ca_arg, &health]).0, 0);
    assert_eq!(
        curl(&[&health]).0,
        60,
        "a certificate no CA vouches for was accepted"
    );
    let plain = health.replacen("https://", "http://", 1);
    assert_ne!(
        curl(&["-o", "/dev/null", "-w", "%{http_code}", &plain]).1,
        "200"
    );

    let work = tempfile::tempdir().unwrap();
    // A user's home: its nix.conf is the one Nix reads (what `larder use` edits).
    let home = work.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let nix_conf = home.join(".config/nix/nix.conf");
    let user_env = |cmd: &mut Command| {
        cmd.env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .env("NIX_USER_CONF_FILES", &nix_conf)
            .env(
                "NIX_CONFIG",
                format!(
                    "{}\nnarinfo-cache-negative-ttl = 0",
                    larder_testkit::nix::NIX_CONFIG_BASE
                ),
            )
            .env("NIX_SSL_CERT_FILE", &ca)
            .env_remove("LARDER_CONFIG")
            .env_remove("LARDER_NIX_CONF")
            .env_remove("LARDER_NETRC");
    };
    let larder = |args: &[&str]| {
        let mut cmd = larder_testkit::nix::command(larder_bin());
        cmd.args(args)
            .env("LARDER_SERVER", &server.url)
            .env("LARDER_TOKEN", &server.admin_token);
        user_env(&mut cmd);
        cmd.output().unwrap()
    };
    let ok = |args: &[&str]| {
        let out = larder(args);
        assert!(
            out.status.success(),
            "larder {args:?} over https: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // The cache's URL is announced as https (public_url follows TLS).
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["cache", "create", "secure", "--json"])).unwrap();
    assert!(
        info["url"].as_str().unwrap().starts_with("https://"),
        "{info}"
    );
    let key_line = info["public_key"].as_str().unwrap().to_owned();

    // Real Nix: pushes with `nix copy --to https://…` and substitutes over https, trusting
    // the CA through ssl-cert-file; larder push, use and doctor work with it too.
    let push = ok(&[
        "token", "create", "--perm", "push", "--cache", "secure", "--label", "tls",
    ])
    .trim()
    .to_owned();
    let netrc = server.netrc(work.path(), "push.netrc", &push);
    let cache_url = format!("{}/secure", server.url);
    let nix_env = vec![
        ("CACHE_URL", cache_url.clone()),
        ("TRUSTED_PUBLIC_KEY", key_line.clone()),
        ("NIX_SSL_CERT_FILE", ca.display().to_string()),
        // The oracle's own checks (Python) trust what OpenSSL's SSL_CERT_FILE names.
        ("SSL_CERT_FILE", ca.display().to_string()),
        (
            "PUSH_CMD",
            format!(
                "XDG_CACHE_HOME=$(mktemp -d) nix copy --option ssl-cert-file {ca_arg} \
                 --option netrc-file {} --to \"$CACHE_URL\" \"$TOP\"",
                netrc.display()
            ),
        ),
    ];
    let out = oracle(&["run"], &work.path().join("nix-copy"), &nix_env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "oracle over https failed:\n{stderr}");
    assert!(stderr.contains(&format!("PASS {cache_url}")), "{stderr}");

    let path = build_file("over-tls", "secure");
    let pushed = larder(&["push", "secure", &path]);
    assert!(
        pushed.status.success(),
        "larder push over https: {}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    let hash = &path["/nix/store/".len()..][..32];
    let (code, body) = curl(&["--cacert", ca_arg, &format!("{cache_url}/{hash}.narinfo")]);
    assert_eq!(code, 0);
    assert!(body.contains(&format!("StorePath: {path}")), "{body}");
    ok(&["use", "secure", "--mode", "user-nixconf"]);
    let written = std::fs::read_to_string(&nix_conf).unwrap();
    assert!(written.contains(&cache_url), "{written}");
    let doctor = ok(&["doctor", "secure"]);
    assert!(doctor.contains("Nix trusts the certificate"), "{doctor}");
    // The CA in SSL_CERT_FILE only, while NIX_SSL_CERT_FILE names a bundle without it: larder
    // itself gets through, Nix would not, and doctor says so.
    let mut cmd = larder_testkit::nix::command(larder_bin());
    cmd.args(["doctor", "secure"])
        .env("LARDER_SERVER", &server.url)
        .env("LARDER_TOKEN", &server.admin_token);
    user_env(&mut cmd);
    let other_ca = pki.dir.path().join("first.pem");
    cmd.env("NIX_SSL_CERT_FILE", &other_ca)
        .env("SSL_CERT_FILE", &ca);
    let mismatch = cmd.output().unwrap();
    let said = String::from_utf8_lossy(&mismatch.stdout).into_owned()
        + &String::from_utf8_lossy(&mismatch.stderr);
    assert!(!mismatch.status.success(), "{said}");
    assert!(
        said.contains("nix tls") && said.contains("will refuse"),
        "{said}"
    );
    // The consumer's Nix, configured by `use` alone, substitutes the path over https.
    let store = tempfile::tempdir().unwrap();
    let mut realise = larder_testkit::nix::command("nix-store");
    realise.args([
        "--store",
        store.path().to_str().unwrap(),
        "--realise",
        &path,
    ]);
    user_env(&mut realise);
    let realised = realise.output().unwrap();
    assert!(
        realised.status.success(),
        "substitution over https: {}",
        String::from_utf8_lossy(&realised.stderr)
    );
    assert!(String::from_utf8_lossy(&realised.stderr).contains("copying path"));
    // Without the CA, larder refuses the server and says why.
    let untrusted = larder_testkit::nix::command(larder_bin())
        .args(["cache", "info", "secure"])
        .env("LARDER_SERVER", &server.url)
        .env("LARDER_TOKEN", &server.admin_token)
        .env("HOME", &home)
        .env_remove("NIX_SSL_CERT_FILE")
        .env_remove("SSL_CERT_FILE")
        .env_remove("LARDER_CONFIG")
        .output()
        .unwrap();
    assert!(!untrusted.status.success());
    let said = String::from_utf8_lossy(&untrusted.stderr);
    assert!(
        said.contains("is not trusted") && said.contains("NIX_SSL_CERT_FILE"),
        "{said}"
    );

    // Renewal: an open keep-alive connection, then new files and SIGHUP.
    let mut open = Client::connect(server.port, &ca);
    assert_eq!(open.server_cert(), pem_der(&cert));
    let (cert2, key2) = pki.server("second");
    std::fs::copy(&cert2, &live_cert).unwrap();
    std::fs::copy(&key2, &live_key).unwrap();
    Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !server
        .log()
        .contains("reloaded the TLS certificate and key")
    {
        assert!(std::time::Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let fresh = Client::connect(server.port, &ca);
    assert_eq!(
        fresh.server_cert(),
        pem_der(&cert2),
        "new connections get the new pair"
    );
    assert_eq!(
        open.get("/healthz"),
        200,
        "the open connection keeps working"
    );
    assert_eq!(open.get(&format!("/secure/{hash}.narinfo")), 200);

    // A bad pair on SIGHUP is refused; the server keeps serving the pair it has.
    std::fs::write(&live_key, "not a key").unwrap();
    Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status()
        .unwrap();
    while !server
        .log()
        .contains("still serving the previous certificate")
    {
        assert!(std::time::Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let after = Client::connect(server.port, &ca);
    assert_eq!(after.server_cert(), pem_der(&cert2));
    assert!(server.stop().success());
}

/// `larder serve --tls-cert C --tls-key K …` that must fail at start: its stderr.
fn serve_fails_with(cert: &Path, key: &Path) -> String {
    let data = private_tempdir();
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    serve_fails(data.path(), &["--tls-cert", cert, "--tls-key", key], &[])
}

#[test]
fn a_missing_unreadable_or_mismatched_pair_stops_serve_naming_the_files() {
    let pki = Pki::new();
    let (cert, key) = pki.server("one");
    let (_, other_key) = pki.server("two");
    let stderr = serve_fails_with(&cert, &other_key);
    assert!(
        stderr.contains(&format!(
            "the TLS key {} does not belong to the certificate {}",
            other_key.display(),
            cert.display()
        )),
        "{stderr}"
    );
    let missing = pki.dir.path().join("missing.pem");
    let stderr = serve_fails_with(&missing, &key);
    assert!(
        stderr.contains(&format!(
            "cannot read the TLS certificate {}",
            missing.display()
        )),
        "{stderr}"
    );
    let stderr = serve_fails_with(&cert, &cert);
    assert!(
        stderr.contains(&format!("cannot read the TLS key {}", cert.display())),
        "{stderr}"
    );
    // An encrypted key is named as such.
    let encrypted = pki.dir.path().join("encrypted.key");
    openssl(
        pki.dir.path(),
        &[
            "pkcs8",
            "-topk8",
            "-in",
            key.to_str().unwrap(),
            "-out",
            encrypted.to_str().unwrap(),
            "-passout",
            "pass:secret",
        ],
    );
    let stderr = serve_fails_with(&cert, &encrypted);
    assert!(
        stderr.contains("is encrypted with a passphrase"),
        "{stderr}"
    );
    // One without the other is refused, naming every place each can come from.
    let data = private_tempdir();
    let out = larder_testkit::nix::command(larder_bin())
        .args(["serve", "--data"])
        .arg(data.path())
        .arg("--tls-cert")
        .arg(&cert)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tls_cert is set but tls_key is not") && stderr.contains("LARDER_TLS_KEY"),
        "{stderr}"
    );
}

/// The certificate and the key may come from different places (file, environment, flag), as
/// every other setting; a fatal error at start is a JSON record under LARDER_LOG_FORMAT=json.
#[test]
fn the_pair_may_come_from_the_file_and_the_environment() {
    let pki = Pki::new();
    let (cert, key) = pki.server("layered");
    let conf_dir = tempfile::tempdir().unwrap();
    let conf = conf_dir.path().join("larder.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = \"127.0.0.1:0\"\ntls_cert = \"{}\"\n",
            cert.display()
        ),
    )
    .unwrap();
    let data = private_tempdir();
    let (mut child, lines) = {
        let mut cmd = larder_testkit::nix::command(larder_bin());
        cmd.args(["serve", "--config"])
            .arg(&conf)
            .arg("--data")
            .arg(data.path())
            .env("LARDER_TLS_KEY", &key)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines: Vec<String> = std::io::BufRead::lines(std::io::BufReader::new(stderr))
            .map_while(Result::ok)
            .take_while(|l| !l.starts_with("larder: listening on"))
            .collect();
        (child, lines)
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(lines.iter().all(|l| !l.starts_with("error")), "{lines:?}");

    // The same with a key that does not match, in JSON: one ERROR record.
    let (_, other_key) = pki.server("other");
    let out = larder_testkit::nix::command("timeout")
        .args(["20", larder_bin(), "serve", "--config"])
        .arg(&conf)
        .arg("--data")
        .arg(data.path())
        .env("LARDER_TLS_KEY", &other_key)
        .env("LARDER_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap()).unwrap();
    assert_eq!(last["level"], "ERROR");
    assert!(
        last["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("does not belong to the certificate"),
        "{last}"
    );
}
