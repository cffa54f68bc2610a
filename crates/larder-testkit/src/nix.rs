//! The one definition of how larder's tests run real Nix: settings that make the result the
//! same on every machine, whatever its kernel allows and whatever its own Nix configuration says.
//!
//! - `sandbox = false`: Nix 2.8 sandboxes builds by default wherever user namespaces work, and
//!   inside Debian's sandbox `/bin/sh` (every test derivation's builder) does not exist. Where
//!   namespaces do not work Nix silently builds unsandboxed, so without this setting the suite
//!   passed on one machine and failed on the next.
//! - No machine-wide or per-user nix.conf is read: [`isolate`] points `NIX_CONF_DIR` at an empty
//!   directory (so neither `/etc/nix/nix.conf` nor `/etc/nix/netrc` counts) and sets
//!   `NIX_USER_CONF_FILES` to nothing (so `~/.config/nix/nix.conf` does not count either).
//!   `NIX_CONFIG` is then all the configuration a test's Nix sees.
//! - No daemon: `NIX_REMOTE` is removed, so Nix (run as root) opens the store itself even where
//!   the machine runs a `nix-daemon`.
//!
//! The shell scripts (`tests/oracle/`, `bench/`) take the same settings from
//! `tests/lib/nix-env.sh`.

use std::path::PathBuf;
use std::process::Command;

/// Settings every Nix call of a test needs, without `substituters` (for the tests where a
/// nix.conf under test decides them): root without build users, no sandbox, `nix` commands on.
pub const NIX_CONFIG_BASE: &str =
    "build-users-group =\nsandbox = false\nexperimental-features = nix-command";

/// [`NIX_CONFIG_BASE`] and no substituter (no network: cache.nixos.org cannot be reached here,
/// and a test names the substituters it means).
pub const NIX_CONFIG: &str =
    "build-users-group =\nsandbox = false\nexperimental-features = nix-command\nsubstituters =";

/// An empty directory for `NIX_CONF_DIR`, shared by every test on the machine. It must stay
/// empty: a test that means to edit a machine-wide nix.conf points `NIX_CONF_DIR` (or
/// `LARDER_NIX_CONF`) at a directory of its own.
pub fn empty_conf_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("larder-tests-empty-nix-conf-dir");
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let stray: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map_while(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        stray.is_empty(),
        "{} must stay empty (it is every test's NIX_CONF_DIR), but holds {stray:?}: a test \
         wrote a machine-wide Nix configuration there; remove them",
        dir.display()
    );
    dir
}

/// Make `cmd` (Nix itself, or a program that runs Nix, such as `larder` or the oracle) see no
/// Nix configuration but [`NIX_CONFIG`]; see the module documentation. A caller that needs
/// other settings sets `NIX_CONFIG` after this call (starting from [`NIX_CONFIG`] or
/// [`NIX_CONFIG_BASE`]), and one that tests a user nix.conf sets `NIX_USER_CONF_FILES`.
pub fn isolate(cmd: &mut Command) -> &mut Command {
    cmd.env("NIX_CONFIG", NIX_CONFIG)
        .env("NIX_CONF_DIR", empty_conf_dir())
        .env("NIX_USER_CONF_FILES", "")
        .env_remove("NIX_REMOTE")
}

/// A [`Command`] for `program`, [`isolate`]d.
pub fn command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    isolate(&mut cmd);
    cmd
}
