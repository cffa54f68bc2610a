//! A throwaway single-node [Garage](https://garagehq.deuxfleurs.fr) (an S3-compatible object
//! store written in Rust) on loopback: its own config, data and metadata in a temporary
//! directory, a one-node layout, one bucket and one access key allowed on it.
//!
//! The `garage` binary is looked up as `$GARAGE_BIN`, then on `PATH`, then in
//! `$CARGO_HOME/bin` (`~/.cargo/bin`), where `.ci/run` installs it
//! (`cargo install garage --locked`). Without it the calling test fails: no skipping.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The bucket every harness creates.
pub const BUCKET: &str = "larder";
/// The region Garage is configured to answer for.
pub const REGION: &str = "garage";

/// A running (or stopped, see [`Garage::stop`]) single-node Garage.
pub struct Garage {
    dir: tempfile::TempDir,
    child: Option<Child>,
    bin: PathBuf,
    /// Port of the S3 API on 127.0.0.1.
    pub s3_port: u16,
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// Where the `garage` binary is; panics with how to install it when it is nowhere.
pub fn garage_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GARAGE_BIN") {
        return PathBuf::from(p);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("garage");
            if p.is_file() {
                return p;
            }
        }
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(p) = cargo_home
        .map(|c| c.join("bin/garage"))
        .filter(|p| p.is_file())
    {
        return p;
    }
    panic!(
        "the `garage` binary (an S3-compatible object store) is required by the S3 tests and \
         was not found on PATH, in $GARAGE_BIN or in ~/.cargo/bin; `.ci/run` installs it \
         (cargo install garage --locked)"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

fn random_hex(bytes: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

impl Garage {
    /// Start Garage and set up its layout, bucket and key. Panics (failing the test) when
    /// Garage is missing or does not come up.
    pub fn start() -> Garage {
        let bin = garage_bin();
        let dir = tempfile::tempdir().expect("tempdir");
        let (s3_port, rpc_port) = (free_port(), free_port());
        let root = dir.path().display().to_string();
        let config = format!(
            r#"metadata_dir = "{root}/meta"
data_dir = "{root}/data"
db_engine = "sqlite"
metadata_fsync = false
data_fsync = false
replication_factor = 1
# NARs arrive compressed (zstd/xz): compressing Garage's blocks again only costs CPU.
compression_level = "none"
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"
"#,
            secret = random_hex(32),
        );
        write_private(&dir.path().join("garage.toml"), &config);
        let mut g = Garage {
            dir,
            child: None,
            bin,
            s3_port,
            access_key_id: format!("GK{}", random_hex(12)),
            secret_access_key: random_hex(32),
        };
        g.spawn();
        let node = g.cli_ok(&["node", "id", "-q"]);
        let node = node.trim().split('@').next().unwrap_or("").to_owned();
        assert!(!node.is_empty(), "garage node id printed nothing");
        g.cli_ok(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        g.cli_ok(&["layout", "apply", "--version", "1"]);
        g.cli_ok(&["bucket", "create", BUCKET]);
        let (id, secret) = (g.access_key_id.clone(), g.secret_access_key.clone());
        g.cli_ok(&["key", "import", "--yes", "-n", "larder-test", &id, &secret]);
        g.cli_ok(&[
            "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", &id,
        ]);
        g
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("garage.toml")
    }

    fn spawn(&mut self) {
        let log = |name| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join(name))
                .expect("garage log file")
        };
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(self.config_path())
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log("garage.out"))
            .stderr(log("garage.log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = self.cli(&["status"]).status.success()
                && std::net::TcpStream::connect(("127.0.0.1", self.s3_port)).is_ok();
            if up {
                return;
            }
            if let Some(Some(st)) = self.child.as_mut().map(|c| c.try_wait().ok().flatten()) {
                panic!("garage exited ({st}) at start:\n{}", self.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "garage did not come up within 60 s:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Run the `garage` CLI against this node.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("-c")
            .arg(self.config_path())
            .args(args)
            .env("RUST_LOG", "error")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()))
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "garage {args:?} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The last lines of Garage's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// larder's `storage` setting for this Garage's bucket.
    pub fn storage_url(&self) -> String {
        format!("s3://{BUCKET}?endpoint={}&region={REGION}", self.endpoint())
    }

    /// The environment that gives larder this Garage's credentials.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key.clone()),
        ]
    }

    /// Kill Garage (SIGKILL: an outage, not a clean shutdown) and wait until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start Garage again on the same ports and data, and wait until it answers.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The directory holding Garage's data (for tests that look at the stored blocks).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}

fn write_private(path: &Path, contents: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("write garage config");
    f.write_all(contents.as_bytes())
        .expect("write garage config");
}
