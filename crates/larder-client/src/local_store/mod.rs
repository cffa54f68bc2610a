//! Reading the local Nix store without the `nix` command: path metadata, closures and NARs.
//!
//! Metadata (NarHash, NarSize, references, deriver, signatures, CA) comes from one of two
//! sources, the same two Nix itself chooses between (`openStore` with `auto`, Nix 2.8's
//! [`src/libstore/store-api.cc`](https://github.com/NixOS/nix/blob/2.8.0/src/libstore/store-api.cc)):
//!
//! - [`DbStore`]: the store's SQLite database (`/nix/var/nix/db/db.sqlite`), opened read-only.
//!   Works where the database is readable and its `-wal`/`-shm` files exist or can be created:
//!   single-user installs, root. See [`db`].
//! - [`DaemonStore`]: the nix-daemon worker protocol over its Unix socket
//!   (`/nix/var/nix/daemon-socket/socket`), for multi-user installs. See [`daemon`].
//!
//! NARs are never asked of Nix: [`dump_verified`] serialises a path from the filesystem with
//! [`larder_nix::nar::dump::dump_path`] and checks the NarHash and NarSize the store recorded
//! while streaming, so corruption on disk is caught before anything is uploaded.
//!
//! Everything here is blocking; async callers use `spawn_blocking`.

pub mod daemon;
pub mod db;
mod nar;
mod realisations;
mod watch;

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::{Component, Path, PathBuf};

use larder_nix::hash::Sha256;
use larder_nix::store_path::{StorePath, STORE_DIR};

pub use daemon::DaemonStore;
pub use db::DbStore;
pub use nar::{dump_unverified, dump_verified};
pub use watch::NewPath;

/// Where Nix keeps its state when `NIX_STATE_DIR` is unset.
pub const DEFAULT_STATE_DIR: &str = "/nix/var/nix";
/// The database below the state directory.
pub const DB_SUBPATH: &str = "db/db.sqlite";
/// The daemon socket below the state directory.
pub const SOCKET_SUBPATH: &str = "daemon-socket/socket";
/// Most symlinks [`LocalStore::resolve_arg`] follows before giving up (Linux's `MAXSYMLINKS`).
const MAX_SYMLINK_HOPS: usize = 40;

/// What the local store records about one valid store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The store path.
    pub path: StorePath,
    /// SHA-256 of the path's NAR serialisation.
    pub nar_hash: Sha256,
    /// Size of the NAR serialisation in bytes.
    pub nar_size: u64,
    /// Store paths this one refers to (may include itself), sorted.
    pub references: Vec<StorePath>,
    /// The derivation that built it, if recorded.
    pub deriver: Option<StorePath>,
    /// Signatures, `name:base64` each, as Nix stores them.
    pub sigs: Vec<String>,
    /// Content-address assertion (`fixed:r:sha256:…`, `text:sha256:…`), if any.
    pub ca: Option<String>,
    /// When the path became valid, seconds since the Unix epoch.
    pub registration_time: i64,
}

/// What went wrong reading the local store; each variant names the path or file involved and,
/// where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LocalStoreError {
    /// The database could not be opened or read.
    #[error(
        "cannot read the Nix database {db} read-only: {source}\nhint: where the database is not \
         readable (multi-user installs) read the store through the daemon: NIX_REMOTE=daemon"
    )]
    OpenDb {
        /// The database file.
        db: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// A query against an open database failed.
    #[error("querying the Nix database {db} for {what} failed: {source}")]
    Db {
        /// The database file.
        db: PathBuf,
        /// What was being looked up.
        what: String,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// A row or reply holds a value that is not what Nix writes there.
    #[error("the local store's record of {path} has an invalid {field}: {value:?} ({reason})")]
    BadRecord {
        /// The store path whose record is bad (or the raw value when the path itself is bad).
        path: String,
        /// Which field.
        field: &'static str,
        /// The value (shortened).
        value: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The daemon socket could not be connected to.
    #[error(
        "cannot connect to the nix-daemon at {socket}: {source}\nhint: is nix-daemon running? \
         (systemctl start nix-daemon) — or unset NIX_REMOTE to read the database directly"
    )]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The connect error.
        #[source]
        source: io::Error,
    },
    /// Reading from or writing to the daemon failed.
    #[error("talking to the nix-daemon at {socket} failed: {source}")]
    DaemonIo {
        /// The socket path.
        socket: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The daemon said something the worker protocol does not allow here.
    #[error("the nix-daemon at {socket} broke the worker protocol: {message}")]
    DaemonProtocol {
        /// The socket path.
        socket: PathBuf,
        /// What was unexpected.
        message: String,
    },
    /// The daemon reported an error for a request.
    #[error("the nix-daemon at {socket} refused {request}: {message}")]
    Daemon {
        /// The socket path.
        socket: PathBuf,
        /// The request, e.g. `QueryPathInfo /nix/store/…`.
        request: String,
        /// The daemon's message.
        message: String,
    },
    /// A NAR taken from another binary cache (`larder import`) could not be read or does not
    /// match its narinfo.
    #[error("{path}: {message}")]
    Source {
        /// The store path whose NAR failed.
        path: StorePath,
        /// What failed.
        message: String,
    },
    /// `NIX_REMOTE` names a store this module cannot read.
    #[error(
        "NIX_REMOTE={value:?} is not supported for reading the local store\nhint: use \
         NIX_REMOTE=daemon, NIX_REMOTE=unix:///path/to/socket, or leave it unset"
    )]
    UnsupportedRemote {
        /// The value of `NIX_REMOTE`.
        value: String,
    },
    /// A path to upload, or a reference of one, is not valid in the local store.
    #[error(
        "{path} is not valid in the local Nix store{}\nhint: build or fetch it first \
         (nix-store --realise {path})",
        match referrer { Some(r) => format!(" (it is a reference of {r})"), None => String::new() }
    )]
    NotValid {
        /// The missing path.
        path: StorePath,
        /// The path referring to it, when it was reached through references.
        referrer: Option<StorePath>,
    },
    /// A user argument does not lead into the Nix store.
    #[error(
        "{arg:?} is not in the Nix store (it resolves to {})\nhint: pass a store path such as \
         {STORE_DIR}/…-name, a path inside one, or a symlink to one such as ./result",
        resolved.display()
    )]
    NotInStore {
        /// The argument as given.
        arg: String,
        /// Where it led.
        resolved: PathBuf,
    },
    /// A user argument could not be followed.
    #[error("cannot resolve {arg:?} ({}): {source}", at.display())]
    Resolve {
        /// The argument as given.
        arg: String,
        /// The file that could not be read.
        at: PathBuf,
        /// The filesystem error.
        #[source]
        source: io::Error,
    },
    /// The path's contents do not match the store's record.
    #[error(
        "store path {path} is corrupt: its contents hash to {} ({} bytes) but the Nix database \
         records {} ({} bytes)\nhint: check it with `nix-store --verify-path {path}` and repair it \
         with `nix-store --repair-path {path}`, which fetches it again from a substituter or \
         rebuilds it (or `nix-store --verify --check-contents --repair` for the whole store)",
        mismatch.actual_hash, mismatch.actual_size, mismatch.expected_hash, mismatch.expected_size
    )]
    Corrupt {
        /// The corrupt path.
        path: StorePath,
        /// What was recorded and what was found (boxed: keeps the error small).
        mismatch: Box<NarMismatch>,
    },
    /// The path is gone from disk (typically garbage-collected after it was queued).
    #[error("store path {0} vanished from the store (garbage-collected?)")]
    Vanished(StorePath),
    /// Reading the path from the filesystem failed.
    #[error(
        "reading store path {path} failed: {source}\nhint: check it with \
         `nix-store --verify-path {path}`"
    )]
    Read {
        /// The path being read.
        path: StorePath,
        /// The filesystem error (names the file).
        #[source]
        source: io::Error,
    },
    /// The NAR could not be written to its destination.
    #[error("writing the NAR of {path} failed: {source}")]
    Write {
        /// The path being dumped.
        path: StorePath,
        /// The writer's error.
        #[source]
        source: io::Error,
    },
}

/// A NAR whose hash or size differs from the store's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarMismatch {
    /// NarHash the store records.
    pub expected_hash: Sha256,
    /// NarHash of what is on disk.
    pub actual_hash: Sha256,
    /// NarSize the store records.
    pub expected_size: u64,
    /// NarSize of what is on disk.
    pub actual_size: u64,
}

/// A read-only view of the local Nix store, through its database or its daemon.
#[derive(Debug)]
pub enum LocalStore {
    /// The SQLite database, read directly.
    Db(DbStore),
    /// The nix-daemon, over its socket.
    Daemon(DaemonStore),
}

/// Nix's state directory: `NIX_STATE_DIR` or [`DEFAULT_STATE_DIR`].
pub fn state_dir() -> PathBuf {
    std::env::var_os("NIX_STATE_DIR")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), PathBuf::from)
}

/// The database Nix uses: `$NIX_STATE_DIR/db/db.sqlite`.
pub fn default_db_path() -> PathBuf {
    state_dir().join(DB_SUBPATH)
}

/// The daemon socket Nix uses: `NIX_DAEMON_SOCKET_PATH` or `$NIX_STATE_DIR/daemon-socket/socket`.
pub fn default_socket_path() -> PathBuf {
    std::env::var_os("NIX_DAEMON_SOCKET_PATH")
        .filter(|v| !v.is_empty())
        .map_or_else(|| state_dir().join(SOCKET_SUBPATH), PathBuf::from)
}

impl LocalStore {
    /// Open the store the way Nix would: the daemon socket if `NIX_REMOTE=daemon` (or
    /// `unix://SOCKET`); the database if `NIX_REMOTE=local`; otherwise the database at
    /// [`default_db_path`], falling back to the daemon at [`default_socket_path`] when the
    /// database cannot be read and the socket exists.
    pub fn open_default() -> Result<Self, LocalStoreError> {
        let remote = std::env::var("NIX_REMOTE").unwrap_or_default();
        match remote.as_str() {
            "daemon" => Self::open_daemon(&default_socket_path()),
            "local" => Self::open_db(&default_db_path()),
            "" | "auto" => match Self::open_db(&default_db_path()) {
                Ok(store) => Ok(store),
                Err(db_err) => {
                    let socket = default_socket_path();
                    if socket.exists() {
                        Self::open_daemon(&socket)
                    } else {
                        Err(db_err)
                    }
                }
            },
            other => match other.strip_prefix("unix://") {
                Some(socket) if !socket.is_empty() => Self::open_daemon(Path::new(socket)),
                _ => Err(LocalStoreError::UnsupportedRemote {
                    value: other.to_owned(),
                }),
            },
        }
    }

    /// Open the database at `path` read-only.
    pub fn open_db(path: &Path) -> Result<Self, LocalStoreError> {
        DbStore::open(path).map(Self::Db)
    }

    /// Connect to the nix-daemon listening on `socket`.
    pub fn open_daemon(socket: &Path) -> Result<Self, LocalStoreError> {
        DaemonStore::connect(socket).map(Self::Daemon)
    }

    /// Where metadata comes from, for messages: `database /nix/var/nix/db/db.sqlite` or
    /// `nix-daemon 2.8.0 at /nix/var/nix/daemon-socket/socket`.
    pub fn describe(&self) -> String {
        match self {
            Self::Db(db) => format!("database {}", db.path().display()),
            Self::Daemon(d) => match d.nix_version() {
                Some(v) => format!("nix-daemon {v} at {}", d.socket().display()),
                None => format!("nix-daemon at {}", d.socket().display()),
            },
        }
    }

    /// The store's record of `path`, or `None` if it is not valid.
    pub fn query_path_info(
        &mut self,
        path: &StorePath,
    ) -> Result<Option<PathInfo>, LocalStoreError> {
        let mut infos = self.query_path_infos(std::slice::from_ref(path))?;
        Ok(infos.pop().flatten())
    }

    /// The records of `paths`, in the same order, `None` for paths that are not valid.
    pub fn query_path_infos(
        &mut self,
        paths: &[StorePath],
    ) -> Result<Vec<Option<PathInfo>>, LocalStoreError> {
        match self {
            Self::Db(db) => db.query_path_infos(paths),
            Self::Daemon(d) => d.query_path_infos(paths),
        }
    }

    /// The closure of `roots` (following references), every path once, sorted so that each
    /// path comes after all its references: uploading in this order never leaves a path in
    /// a cache without its references. The order is deterministic for a given store.
    ///
    /// Fails with [`LocalStoreError::NotValid`] naming the path (and its referrer) if a root or
    /// reference is not valid.
    pub fn closure(&mut self, roots: &[StorePath]) -> Result<Vec<PathInfo>, LocalStoreError> {
        let mut infos: HashMap<StorePath, PathInfo> = HashMap::new();
        // Breadth-first, one batch per level: the daemon answers a batch in one round trip.
        let mut frontier: Vec<(StorePath, Option<StorePath>)> = {
            let unique: BTreeSet<&StorePath> = roots.iter().collect();
            unique.into_iter().map(|p| (p.clone(), None)).collect()
        };
        while !frontier.is_empty() {
            let paths: Vec<StorePath> = frontier.iter().map(|(p, _)| p.clone()).collect();
            let found = self.query_path_infos(&paths)?;
            let mut next = Vec::new();
            let mut queued = BTreeSet::new();
            for ((path, referrer), info) in frontier.into_iter().zip(found) {
                let info = info.ok_or(LocalStoreError::NotValid { path, referrer })?;
                for r in &info.references {
                    if !infos.contains_key(r) && *r != info.path && queued.insert(r.clone()) {
                        next.push((r.clone(), Some(info.path.clone())));
                    }
                }
                infos.insert(info.path.clone(), info);
            }
            next.retain(|(p, _)| !infos.contains_key(p));
            frontier = next;
        }
        Ok(topo_sort(infos))
    }

    /// Resolve a user argument to a store path: a store path, a path inside one
    /// (`/nix/store/…-name/bin/foo` gives `/nix/store/…-name`), or a symlink into the store such
    /// as `./result` (followed through any number of hops). Relative arguments are taken from
    /// the current directory. The store path is not checked for validity here.
    pub fn resolve_arg(arg: &str) -> Result<StorePath, LocalStoreError> {
        let resolve_err = |at: &Path, source| LocalStoreError::Resolve {
            arg: arg.to_owned(),
            at: at.to_owned(),
            source,
        };
        let mut current = PathBuf::from(arg);
        if current.is_relative() {
            let cwd = std::env::current_dir().map_err(|e| resolve_err(Path::new("."), e))?;
            current = cwd.join(current);
        }
        for _ in 0..=MAX_SYMLINK_HOPS {
            current = normalize(&current);
            if let Some(found) = store_path_prefix(&current) {
                return Ok(found);
            }
            let meta = std::fs::symlink_metadata(&current).map_err(|e| resolve_err(&current, e))?;
            if !meta.file_type().is_symlink() {
                // Not a link itself, but a parent directory may be one (./result/bin/foo).
                let real = std::fs::canonicalize(&current).map_err(|e| resolve_err(&current, e))?;
                return match store_path_prefix(&real) {
                    Some(found) => Ok(found),
                    None => Err(LocalStoreError::NotInStore {
                        arg: arg.to_owned(),
                        resolved: real,
                    }),
                };
            }
            let target = std::fs::read_link(&current).map_err(|e| resolve_err(&current, e))?;
            current = match current.parent() {
                Some(parent) => parent.join(target),
                None => target,
            };
        }
        Err(resolve_err(
            &current,
            io::Error::other(format!("more than {MAX_SYMLINK_HOPS} symlinks")),
        ))
    }
}

/// `path` without `.` components and repeated separators. `..` is kept: only the filesystem
/// knows what it means after a symlink.
fn normalize(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

/// The store path `path` lies in, if it is lexically inside the store (and has no `..`).
/// Entries of the store directory that are not store paths (`.links`) give `None`.
fn store_path_prefix(path: &Path) -> Option<StorePath> {
    let rest = path.strip_prefix(STORE_DIR).ok()?;
    let mut components = rest.components();
    let Some(Component::Normal(first)) = components.next() else {
        return None;
    };
    if components.any(|c| matches!(c, Component::ParentDir)) {
        return None;
    }
    StorePath::from_basename(first.to_str()?).ok()
}

/// Parse a store path found in the record of `owner`.
fn parse_path(
    owner: &StorePath,
    field: &'static str,
    s: &str,
) -> Result<StorePath, LocalStoreError> {
    StorePath::from_absolute(s).map_err(|e| bad(owner, field, s, e))
}

/// A [`LocalStoreError::BadRecord`] for `field` of `path`.
fn bad(
    path: &StorePath,
    field: &'static str,
    value: &str,
    reason: impl ToString,
) -> LocalStoreError {
    LocalStoreError::BadRecord {
        path: path.to_absolute(),
        field,
        value: value.chars().take(100).collect(),
        reason: reason.to_string(),
    }
}

/// Order `infos` so that every path follows its references: an iterative depth-first
/// post-order, visiting paths and references in store-path order so the result is stable.
fn topo_sort(mut infos: HashMap<StorePath, PathInfo>) -> Vec<PathInfo> {
    let mut roots: Vec<StorePath> = infos.keys().cloned().collect();
    roots.sort();
    let mut done: BTreeSet<StorePath> = BTreeSet::new();
    let mut order: Vec<StorePath> = Vec::with_capacity(roots.len());
    for root in roots {
        if done.contains(&root) {
            continue;
        }
        // Stack of (path, index of the next reference to visit).
        let mut stack: Vec<(StorePath, usize)> = vec![(root.clone(), 0)];
        let mut on_stack: BTreeSet<StorePath> = BTreeSet::from([root]);
        while let Some((path, next)) = stack.last_mut() {
            let refs = infos.get(path).map_or(&[][..], |i| &i.references[..]);
            let mut pushed = None;
            while let Some(r) = refs.get(*next) {
                *next += 1;
                // Self-references and (impossible in a sane store) cycles are skipped.
                if !done.contains(r) && !on_stack.contains(r) && infos.contains_key(r) {
                    pushed = Some(r.clone());
                    break;
                }
            }
            match pushed {
                Some(r) => {
                    on_stack.insert(r.clone());
                    stack.push((r, 0));
                }
                None => {
                    let path = path.clone();
                    stack.pop();
                    on_stack.remove(&path);
                    done.insert(path.clone());
                    order.push(path);
                }
            }
        }
    }
    order.into_iter().filter_map(|p| infos.remove(&p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(c: char, name: &str) -> StorePath {
        StorePath::from_basename(&format!("{}-{name}", c.to_string().repeat(32)))
            .expect("valid test path")
    }

    fn info(path: &StorePath, refs: &[&StorePath]) -> PathInfo {
        PathInfo {
            path: path.clone(),
            nar_hash: Sha256::digest(b""),
            nar_size: 0,
            references: refs.iter().map(|r| (*r).clone()).collect(),
            deriver: None,
            sigs: vec![],
            ca: None,
            registration_time: 0,
        }
    }

    #[test]
    fn topo_sort_puts_references_first() {
        let (a, b, c, d) = (sp('a', "a"), sp('b', "b"), sp('c', "c"), sp('d', "d"));
        // a -> b -> d, a -> c -> d, c -> c (self)
        let infos: HashMap<_, _> = [
            info(&a, &[&b, &c]),
            info(&b, &[&d]),
            info(&c, &[&c, &d]),
            info(&d, &[]),
        ]
        .into_iter()
        .map(|i| (i.path.clone(), i))
        .collect();
        let order: Vec<StorePath> = topo_sort(infos).into_iter().map(|i| i.path).collect();
        assert_eq!(order, [d, b, c, a]);
    }

    #[test]
    fn store_prefix_is_lexical() {
        let p = format!("{STORE_DIR}/{}-x/bin/foo", "a".repeat(32));
        assert_eq!(store_path_prefix(Path::new(&p)), Some(sp('a', "x")));
        let up = format!("{STORE_DIR}/{}-x/../../etc", "a".repeat(32));
        assert_eq!(store_path_prefix(Path::new(&up)), None);
        assert_eq!(store_path_prefix(Path::new("/etc/passwd")), None);
        assert_eq!(store_path_prefix(Path::new("/nix/store/.links/abc")), None);
    }
}
