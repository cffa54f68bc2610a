//! Throwaway real backend servers for larder's tests, started on loopback by the test itself
//! and torn down when dropped: no mocks, and nothing shared with the host's own services.
//!
//! - [`postgres::PgCluster`]: a PostgreSQL cluster (`initdb` + `pg_ctl`, as the `postgres`
//!   user when the tests run as root) in a temporary directory, on a free port.
//! - [`garage`]: a single-node Garage (S3-compatible object store) with a bucket and a key.
//! - [`oidc::Issuer`]: an OIDC issuer (discovery document, JWKS, GitHub Actions' token
//!   endpoint) with keys it generates, signing ID tokens with `jsonwebtoken`.
//!
//! A missing server binary fails the test with a message naming `.ci/run`, which installs it:
//! a required component is never silently skipped.
#![allow(clippy::unwrap_used)] // test support: a panic is how a test fails

pub mod garage;
pub mod nix;
pub mod oidc;
pub mod postgres;

use std::path::Path;
use std::process::{Command, Output};

/// Whether this process runs as root (the owner of `/proc/self` is the effective user).
pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A free TCP port on 127.0.0.1 (free when asked; a server binding it later may still race
/// another process, so callers retry on a bind failure).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

/// Run `cmd`, panicking with its output when it cannot start or fails.
#[track_caller]
pub fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The last `n` lines of a text file (a server log), for failure messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
