//! A throwaway PostgreSQL cluster on loopback.
//!
//! [`PgCluster::start`] copies a cluster template (made once per machine with `initdb` and
//! reused: `initdb` costs seconds, a copy milliseconds) into a temporary directory, configures
//! it to listen on a free port of 127.0.0.1 with its unix socket inside that directory, and
//! starts it with `pg_ctl`. When the tests run as root, every PostgreSQL command runs as the
//! `postgres` user (PostgreSQL refuses to run as root), through `runuser`.
//!
//! TCP connections need the superuser's password (SCRAM), so that tests can check it never
//! leaks into logs or responses; the testkit's own `psql` calls use the unix socket (trust).
//! Durability settings are off (`fsync`, `synchronous_commit`): a crash of the machine is not
//! what these tests are about, and each cluster lives for one test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::{free_port, run_ok, running_as_root, tail};

/// Where Debian installs the server binaries: `/usr/lib/postgresql/<major>/bin`.
const DEBIAN_PG_ROOT: &str = "/usr/lib/postgresql";
/// Overrides the directory holding `initdb`, `pg_ctl`, `psql`.
pub const BIN_DIR_ENV: &str = "LARDER_TEST_PG_BIN";

/// A running PostgreSQL cluster, stopped and deleted on drop.
pub struct PgCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    password: String,
    /// Run the PostgreSQL commands as the `postgres` user (we are root).
    as_postgres: bool,
}

static DATABASES: AtomicU32 = AtomicU32::new(0);

impl PgCluster {
    /// Start a fresh cluster. Panics (failing the test) when PostgreSQL is not installed.
    pub fn start() -> PgCluster {
        let bin = bin_dir();
        let as_postgres = running_as_root();
        let template = template(&bin, as_postgres);
        let password = std::fs::read_to_string(template.join("password"))
            .expect("template password")
            .trim()
            .to_owned();
        let dir = tempfile::Builder::new()
            .prefix("larder-pg-")
            .tempdir()
            .expect("temp dir");
        run_ok(
            Command::new("cp")
                .arg("-a")
                .arg(template.join("data"))
                .arg(dir.path().join("data")),
            "copying the PostgreSQL template",
        );
        std::fs::create_dir(dir.path().join("sock")).expect("socket dir");
        if as_postgres {
            let (uid, gid) = postgres_ids();
            for p in [dir.path().to_path_buf(), dir.path().join("sock")] {
                std::os::unix::fs::chown(&p, Some(uid), Some(gid)).expect("chown to postgres");
            }
        }
        let mut cluster = PgCluster {
            bin,
            dir,
            port: 0,
            password,
            as_postgres,
        };
        // A free port may be taken between asking and binding: try a few.
        for attempt in 1..=5 {
            cluster.port = free_port();
            cluster.write_config();
            let out = cluster.pg_ctl(&["start", "-w", "-t", "60"]).output();
            if out.as_ref().is_ok_and(|o| o.status.success()) {
                return cluster;
            }
            if attempt == 5 {
                panic!(
                    "cannot start PostgreSQL: {out:?}\nserver log:\n{}",
                    tail(&cluster.dir.path().join("log"), 30)
                );
            }
        }
        unreachable!()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's password (part of every URL; tests check it never leaks).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// `postgres://postgres:PASSWORD@127.0.0.1:PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{db}",
            self.password, self.port
        )
    }

    /// Create a new, empty database and return its URL.
    pub fn create_database(&self) -> String {
        let name = format!(
            "larder_{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::SeqCst)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// Run SQL in database `db` through `psql` over the unix socket; returns its unaligned,
    /// tuples-only output, trimmed (`"3"` for `SELECT count(*) …`). Panics on an SQL error.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = run_ok(
            self.command("psql")
                .arg("-h")
                .arg(self.dir.path().join("sock"))
                .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db])
                .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql]),
            "psql",
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The database name of a URL made by [`PgCluster::url`].
    pub fn db_of(url: &str) -> &str {
        url.rsplit('/').next().unwrap_or(url)
    }

    /// Stop the server (`pg_ctl stop -m fast`: sessions are terminated at once), keeping its
    /// data; [`PgCluster::restart`] brings it back on the same port.
    pub fn stop(&self) {
        run_ok(
            &mut self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"]),
            "pg_ctl stop",
        );
    }

    /// Start the server again after [`PgCluster::stop`], on the same port.
    pub fn restart(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.pg_ctl(&["start", "-w", "-t", "60"]).output();
            if out.as_ref().is_ok_and(|o| o.status.success()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cannot restart PostgreSQL: {out:?}\n{}",
                tail(&self.dir.path().join("log"), 30)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Freeze the server (SIGSTOP to the postmaster, then to every backend): connections are
    /// still accepted by the kernel and queries are sent, but nothing is answered, like a
    /// server behind a network partition. [`PgCluster::thaw`] resumes it.
    pub fn freeze(&self) {
        self.signal_all("-STOP");
    }

    /// Resume a server frozen by [`PgCluster::freeze`].
    pub fn thaw(&self) {
        self.signal_all("-CONT");
    }

    /// Send `signal` (`-STOP`, `-CONT`) to the postmaster, then to its children.
    fn signal_all(&self, signal: &str) {
        let Ok(pidfile) = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid"))
        else {
            return;
        };
        let Some(pid) = pidfile.lines().next().map(str::trim) else {
            return;
        };
        let _ = Command::new("kill").args([signal, pid]).status();
        let _ = Command::new("pkill").args([signal, "-P", pid]).status();
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    fn write_config(&self) {
        use std::io::Write;
        // Later lines win in postgresql.conf, so a retry on another port just appends.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("data/postgresql.conf"))
            .expect("postgresql.conf");
        writeln!(
            f,
            "\n# larder-testkit\nport = {}\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\nshared_buffers = 16MB\nmax_connections = 100\n",
            self.port,
            self.dir.path().join("sock").display()
        )
        .expect("write postgresql.conf");
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(args);
        cmd
    }

    fn command(&self, tool: &str) -> Command {
        as_user(&self.bin.join(tool), self.as_postgres, self.dir.path())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // A frozen server would not hear the stop.
        self.thaw();
        // Immediate: no checkpoint, the data is thrown away with the directory.
        let _ = self
            .pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"])
            .output();
    }
}

/// `tool`, run as `postgres` through `runuser` when `as_postgres`, in `cwd` (which that user
/// must be able to enter).
fn as_user(tool: &Path, as_postgres: bool, cwd: &Path) -> Command {
    let mut cmd = if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(tool);
        c
    } else {
        Command::new(tool)
    };
    cmd.current_dir(cwd).env("LC_ALL", "C");
    cmd
}

/// The directory of `initdb`/`pg_ctl`/`psql`: `$LARDER_TEST_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<major>/bin`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return PathBuf::from(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(DEBIAN_PG_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL is required for this test, but no initdb was found under \
             {DEBIAN_PG_ROOT}/*/bin (or ${BIN_DIR_ENV}); `.ci/run` installs it \
             (apt-get install -y postgresql)"
        ),
    }
}

fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("run id");
        assert!(
            out.status.success(),
            "the tests run as root, so PostgreSQL must run as the `postgres` user, which does \
             not exist; `.ci/run` installs PostgreSQL (apt-get install -y postgresql), which \
             creates it"
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("numeric id")
    };
    (id("-u"), id("-g"))
}

/// The cluster template for this PostgreSQL version: made once with `initdb` (under a lock,
/// so concurrent test processes make it once), then only copied.
fn template(bin: &Path, as_postgres: bool) -> PathBuf {
    let version = bin
        .parent()
        .and_then(|p| p.file_name())
        .map(|v| v.to_string_lossy().into_owned())
        .unwrap_or_else(|| "custom".into());
    let user = if as_postgres { "root" } else { "user" };
    let root = std::env::temp_dir().join(format!("larder-testkit-{user}"));
    std::fs::create_dir_all(&root).expect("testkit dir");
    // The suffix changes with the initdb options, so that an older template is not reused.
    let template = root.join(format!("pg{version}-template-v2"));
    if template.join("complete").exists() {
        return template;
    }
    let lock = std::fs::File::create(root.join("pg-template.lock")).expect("lock file");
    lock.lock().expect("lock the template");
    if template.join("complete").exists() {
        return template;
    }
    let staging = root.join(format!("pg{version}-template.tmp"));
    let _ = std::fs::remove_dir_all(root.join(format!("pg{version}-template")));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir(&staging).expect("template staging dir");
    let password = random_password();
    std::fs::write(staging.join("pwfile"), format!("{password}\n")).expect("pwfile");
    if as_postgres {
        // The template's parents must be enterable by postgres; its contents are its own.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))
            .expect("chmod testkit dir");
        let (uid, gid) = postgres_ids();
        for p in [staging.clone(), staging.join("pwfile")] {
            std::os::unix::fs::chown(&p, Some(uid), Some(gid)).expect("chown to postgres");
        }
    }
    run_ok(
        as_user(&bin.join("initdb"), as_postgres, &staging)
            .arg("-D")
            .arg(staging.join("data"))
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-locale",
                "-E",
                "UTF8",
                "--no-sync",
                // 1 MiB WAL segments instead of 16: the template is copied for every cluster.
                "--wal-segsize=1",
            ])
            .arg(format!("--pwfile={}", staging.join("pwfile").display())),
        "initdb",
    );
    std::fs::remove_file(staging.join("pwfile")).expect("remove pwfile");
    std::fs::write(staging.join("password"), &password).expect("password file");
    std::fs::write(staging.join("complete"), "").expect("marker");
    std::fs::rename(&staging, &template).expect("publish the template");
    template
}

fn random_password() -> String {
    use std::hash::{BuildHasher, Hasher};
    // Not a secret worth a CSPRNG: it only has to be unique enough to spot in a log.
    let mut out = String::from("pw");
    for i in 0..3u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_starts_serves_stops_and_restarts() {
        let pg = PgCluster::start();
        let url = pg.create_database();
        let db = PgCluster::db_of(&url);
        pg.psql(
            db,
            "CREATE TABLE t (x BIGINT); INSERT INTO t VALUES (41), (1)",
        );
        assert_eq!(pg.psql(db, "SELECT SUM(x) FROM t"), "42");
        // TCP on loopback with the password is what servers use.
        assert!(url.starts_with("postgres://postgres:pw"), "{url}");
        assert!(std::net::TcpStream::connect(("127.0.0.1", pg.port())).is_ok());
        pg.stop();
        assert!(std::net::TcpStream::connect(("127.0.0.1", pg.port())).is_err());
        pg.restart();
        assert_eq!(pg.psql(db, "SELECT SUM(x) FROM t"), "42");
    }
}
