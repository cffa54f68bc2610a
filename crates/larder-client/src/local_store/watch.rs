//! Noticing new valid paths: `ValidPaths.id` only grows (SQLite `INTEGER PRIMARY KEY`
//! assigned by Nix's `registerValidPath`), so "rows with id > the last one seen" are exactly
//! the paths registered since. A row appears only once its path is valid (Nix registers in the
//! transaction that finishes a build or substitution), so a watcher reading the database never
//! sees a path that is still being written — unlike one watching the store directory or locks.
//! See `LocalStore::registerValidPaths` in Nix 2.8's `src/libstore/local-store.cc`.

use rusqlite::params;

use super::db::DbStore;
use super::LocalStoreError;

/// One newly registered path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPath {
    /// Its `ValidPaths.id`, the watcher's cursor.
    pub id: i64,
    /// Absolute store path.
    pub path: String,
    /// The deriver recorded, if any.
    pub has_deriver: bool,
    /// Content address, if any (`fixed:…` for added sources, `text:…` for `.drv` files).
    pub ca: Option<String>,
}

impl NewPath {
    /// A `.drv` file.
    pub fn is_drv(&self) -> bool {
        self.path.ends_with(".drv")
    }

    /// A source added to the store (`nix-store --add`, a path in a Nix expression): no
    /// deriver and a content address.
    pub fn is_source(&self) -> bool {
        !self.has_deriver && self.ca.is_some()
    }
}

impl DbStore {
    /// The largest `ValidPaths.id` now (0 for an empty store).
    pub fn last_valid_id(&self) -> Result<i64, LocalStoreError> {
        let db = self.path().to_owned();
        self.conn()
            .query_row("SELECT coalesce(max(id), 0) FROM ValidPaths", [], |r| {
                r.get(0)
            })
            .map_err(|source| LocalStoreError::Db {
                db,
                what: "max(ValidPaths.id)".into(),
                source,
            })
    }

    /// Up to `limit` paths registered after `after_id`, in registration order.
    pub fn valid_since(
        &self,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<NewPath>, LocalStoreError> {
        let db = self.path().to_owned();
        let err = |source| LocalStoreError::Db {
            db: db.clone(),
            what: "new ValidPaths rows".into(),
            source,
        };
        let mut st = self
            .conn()
            .prepare_cached(
                "SELECT id, path, deriver, ca FROM ValidPaths WHERE id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(err)?;
        let rows = st
            .query_map(params![after_id, limit as i64], |r| {
                Ok(NewPath {
                    id: r.get(0)?,
                    path: r.get(1)?,
                    has_deriver: r
                        .get::<_, Option<String>>(2)?
                        .is_some_and(|d| !d.is_empty()),
                    ca: r.get::<_, Option<String>>(3)?.filter(|c| !c.is_empty()),
                })
            })
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }
}
