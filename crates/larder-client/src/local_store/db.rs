//! The Nix store database (`/nix/var/nix/db/db.sqlite`), read-only.
//!
//! Schema and spellings follow Nix 2.8's
//! [`src/libstore/schema.sql`](https://github.com/NixOS/nix/blob/2.8.0/src/libstore/schema.sql)
//! and `LocalStore::queryPathInfoUncached` in
//! [`local-store.cc`](https://github.com/NixOS/nix/blob/2.8.0/src/libstore/local-store.cc):
//! `ValidPaths(id, path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca)` with
//! `hash` as `sha256:<base16>`, `sigs` space-separated, `deriver`/`ca` NULL when absent, and
//! `Refs(referrer, reference)` joining ids.
//!
//! WAL: Nix keeps the database in WAL mode. A read-only SQLite connection to a WAL database
//! needs the `-wal` and `-shm` files to exist or to be creatable, so this works as the store's
//! owner (root on a single-user install) or whenever Nix has them open; otherwise opening fails
//! with a hint to use the daemon. We never use `immutable=1`: it skips the WAL and would return
//! stale data while Nix writes. Each batch of lookups runs in one read transaction, so a path
//! and its references come from one consistent snapshot even while Nix commits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use larder_nix::hash::Sha256;
use larder_nix::store_path::StorePath;

use super::{bad, parse_path, LocalStoreError, PathInfo};

/// How long a read waits for a lock Nix holds (WAL recovery, checkpoints) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The store database, opened read-only.
#[derive(Debug)]
pub struct DbStore {
    conn: Connection,
    path: PathBuf,
}

impl DbStore {
    /// Open the database at `path` read-only and check that it can be queried.
    pub fn open(path: &Path) -> Result<Self, LocalStoreError> {
        let open_err = |source| LocalStoreError::OpenDb {
            db: path.to_owned(),
            source,
        };
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        // Opening is lazy: a missing -shm or an unreadable file only shows on the first read.
        let conn = Connection::open_with_flags(path, flags).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        conn.query_row("SELECT count(*) FROM ValidPaths WHERE id = 0", [], |_| {
            Ok(())
        })
        .map_err(open_err)?;
        Ok(Self {
            conn,
            path: path.to_owned(),
        })
    }

    /// The open connection (read-only).
    pub(super) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The records of `paths`, in order, `None` for paths that are not valid; one snapshot.
    pub fn query_path_infos(
        &mut self,
        paths: &[StorePath],
    ) -> Result<Vec<Option<PathInfo>>, LocalStoreError> {
        let db = self.path.clone();
        let db_err = |what: &str, source| LocalStoreError::Db {
            db: db.clone(),
            what: what.to_owned(),
            source,
        };
        let tx = self
            .conn
            .transaction()
            .map_err(|e| db_err("a read transaction", e))?;
        let mut out = Vec::with_capacity(paths.len());
        {
            let mut by_path = tx
                .prepare_cached(
                    "SELECT id, hash, registrationTime, deriver, narSize, sigs, ca \
                     FROM ValidPaths WHERE path = ?1",
                )
                .map_err(|e| db_err("ValidPaths", e))?;
            let mut refs = tx
                .prepare_cached(
                    "SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.reference \
                     WHERE r.referrer = ?1",
                )
                .map_err(|e| db_err("Refs", e))?;
            for path in paths {
                let abs = path.to_absolute();
                let row = by_path
                    .query_row([&abs], |r| {
                        Ok(Row {
                            id: r.get(0)?,
                            hash: r.get(1)?,
                            registration_time: r.get(2)?,
                            deriver: r.get(3)?,
                            nar_size: r.get(4)?,
                            sigs: r.get(5)?,
                            ca: r.get(6)?,
                        })
                    })
                    .optional()
                    .map_err(|e| db_err(&abs, e))?;
                let Some(row) = row else {
                    out.push(None);
                    continue;
                };
                let mut references = refs
                    .query_map([row.id], |r| r.get::<_, String>(0))
                    .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| db_err(&format!("references of {abs}"), e))?
                    .iter()
                    .map(|r| parse_path(path, "reference", r))
                    .collect::<Result<Vec<_>, _>>()?;
                references.sort();
                out.push(Some(row.into_info(path, references)?));
            }
        }
        tx.commit()
            .map_err(|e| db_err("the end of a read transaction", e))?;
        Ok(out)
    }
}

/// One `ValidPaths` row as stored.
struct Row {
    id: i64,
    hash: String,
    registration_time: i64,
    deriver: Option<String>,
    nar_size: Option<i64>,
    sigs: Option<String>,
    ca: Option<String>,
}

impl Row {
    fn into_info(
        self,
        path: &StorePath,
        references: Vec<StorePath>,
    ) -> Result<PathInfo, LocalStoreError> {
        let nar_hash = Sha256::parse(&self.hash).map_err(|e| bad(path, "hash", &self.hash, e))?;
        // Nix reads a NULL narSize as 0 (databases from before it was recorded).
        let nar_size = u64::try_from(self.nar_size.unwrap_or(0))
            .map_err(|e| bad(path, "narSize", &format!("{:?}", self.nar_size), e))?;
        let deriver = match self.deriver.as_deref() {
            None | Some("") => None,
            Some(d) => Some(parse_path(path, "deriver", d)?),
        };
        Ok(PathInfo {
            path: path.clone(),
            nar_hash,
            nar_size,
            references,
            deriver,
            sigs: self
                .sigs
                .as_deref()
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            ca: self.ca.filter(|c| !c.is_empty()),
            registration_time: self.registration_time,
        })
    }
}
