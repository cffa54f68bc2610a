//! Retention: evicting paths from a cache that is over its size limit (least recently used
//! first, never one a kept path references or a pin names) and pins, the named, revisioned
//! roots that eviction keeps.

use sqlx::FromRow;

use super::columns::InvalidValue;
use super::{
    decoding, decoding_with_nar, delete_path_rows, now_unix, placeholders, retry, sizes, Engine,
    MetaError, Metadata, Result, IN_BATCH, UNIQUE,
};

/// A path as eviction sees it.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct LruPath {
    /// Row id: increases with upload order.
    pub id: i64,
    pub hash: String,
    pub name: String,
    pub nar_id: i64,
    /// Stored (compressed) bytes of its NAR file.
    pub file_size: i64,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
}

/// What [`Metadata::evict_paths`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evicted {
    /// The paths are gone.
    Done,
    /// A path was published or pinned concurrently that needs one of them: nothing changed.
    Raced,
}

/// How long the revisions of a pin are kept. The newest revision is always kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Keep {
    Forever,
    /// The newest N revisions.
    Revisions(i64),
    /// Revisions younger than N days.
    Days(i64),
}

#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct PinRow {
    pub name: String,
    pub revision: i64,
    pub hash: String,
    /// Absolute store path.
    pub store_path: String,
    #[sqlx(flatten, try_from = "StoredKeep")]
    pub keep: Keep,
    pub created_at: i64,
}

/// A [`Keep`] as stored: its kind (`forever`, `revisions`, `days`) and its number.
#[derive(FromRow)]
pub struct StoredKeep {
    keep: String,
    keep_n: Option<i64>,
}

impl StoredKeep {
    fn of(keep: Keep) -> StoredKeep {
        let (kind, n) = match keep {
            Keep::Forever => ("forever", None),
            Keep::Revisions(n) => ("revisions", Some(n)),
            Keep::Days(n) => ("days", Some(n)),
        };
        StoredKeep {
            keep: kind.to_owned(),
            keep_n: n,
        }
    }
}

impl TryFrom<StoredKeep> for Keep {
    type Error = InvalidValue;
    fn try_from(s: StoredKeep) -> std::result::Result<Keep, InvalidValue> {
        match (s.keep.as_str(), s.keep_n) {
            ("forever", _) => Ok(Keep::Forever),
            ("revisions", Some(n)) => Ok(Keep::Revisions(n)),
            ("days", Some(n)) => Ok(Keep::Days(n)),
            _ => Err(InvalidValue::new(
                &format!("{} {:?}", s.keep, s.keep_n),
                "a pin's policy (forever, revisions N or days N)",
            )),
        }
    }
}

/// Run a long read of SQLite's direct connections on a blocking thread (one that panicked is
/// reported as a crashed database worker).
async fn blocking<T: Send + 'static>(
    read: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(read)
        .await
        .map_err(|_| MetaError::Db(sqlx::Error::WorkerCrashed))?
}

impl Metadata {
    /// Every path of a cache with what eviction needs to order it.
    pub async fn lru_paths(&self, cache_id: i64) -> Result<Vec<LruPath>> {
        if let Some(fast) = self.fast.clone() {
            return blocking(move || fast.lru_paths(cache_id)).await;
        }
        sqlx::query_as(
            "SELECT p.id, p.hash, p.name, p.nar_id, n.file_size, p.created_at, \
             (SELECT u.last_used_at FROM path_uses u WHERE u.path_id = p.id) AS last_used_at \
             FROM paths p JOIN nars n ON n.id = p.nar_id WHERE p.cache_id = $1",
        )
        .bind(cache_id)
        .fetch_all(&self.pool)
        .await
        .map_err(decoding_with_nar("paths"))
    }

    /// Every reference edge of a cache: `(referrer hash, referenced hash)`.
    pub async fn cache_refs(&self, cache_id: i64) -> Result<Vec<(String, String)>> {
        if let Some(fast) = self.fast.clone() {
            return blocking(move || fast.cache_refs(cache_id)).await;
        }
        sqlx::query_as("SELECT referrer, ref_hash FROM path_refs WHERE cache_id = $1")
            .bind(cache_id)
            .fetch_all(&self.pool)
            .await
            .map_err(decoding("path_refs"))
    }

    /// Remove these paths from a cache in one transaction, keeping their NARs servable (and
    /// safe from garbage collection) for a grace period. Refused ([`Evicted::Raced`]) if a
    /// path that stays references one of them or a pin names one of them: the caller's
    /// plan was made before that path or pin appeared.
    pub async fn evict_paths(&self, cache_id: i64, hashes: &[String]) -> Result<Evicted> {
        retry(&[], || self.evict_paths_once(cache_id, hashes)).await
    }

    async fn evict_paths_once(&self, cache_id: i64, hashes: &[String]) -> Result<Evicted> {
        let now = now_unix();
        let mut tx = self.pool.begin().await?;
        let mut nar_ids = Vec::new();
        // Writes first, so SQLite takes its write lock at once.
        for batch in hashes.chunks(IN_BATCH) {
            let sql = format!(
                "INSERT INTO evicted_nars (cache_id, nar_id, evicted_at) \
                 SELECT DISTINCT cache_id, nar_id, $1 FROM paths WHERE cache_id = $2 AND hash IN ({}) \
                 ON CONFLICT (cache_id, nar_id) DO UPDATE SET evicted_at = excluded.evicted_at",
                placeholders(3, batch.len())
            );
            let mut q = sqlx::query(&sql).bind(now).bind(cache_id);
            for h in batch {
                q = q.bind(h);
            }
            q.execute(&mut *tx).await?;
            delete_path_rows(&mut tx, cache_id, batch, &mut nar_ids).await?;
        }
        super::realisations::forget_paths(&mut tx, cache_id, hashes).await?;
        for batch in hashes.chunks(IN_BATCH) {
            let ph = placeholders(2, batch.len());
            for sql in [
                format!(
                    "SELECT COUNT(*) FROM path_refs WHERE cache_id = $1 AND ref_hash IN ({ph})"
                ),
                format!("SELECT COUNT(*) FROM pins WHERE cache_id = $1 AND hash IN ({ph})"),
            ] {
                let mut q = sqlx::query_scalar::<_, i64>(&sql).bind(cache_id);
                for h in batch {
                    q = q.bind(h);
                }
                if q.fetch_one(&mut *tx).await? > 0 {
                    tx.rollback().await?;
                    return Ok(Evicted::Raced);
                }
            }
        }
        sizes::count_paths(&mut tx, cache_id, &nar_ids, -1).await?;
        tx.commit().await?;
        Ok(Evicted::Done)
    }

    /// Pin `store_path` (hash part `hash`) as a new revision of `name`, if the cache publishes
    /// it (in the same transaction). `Ok(None)`: the path is not in the cache.
    pub async fn add_pin(
        &self,
        cache_id: i64,
        name: &str,
        hash: &str,
        store_path: &str,
        keep: Keep,
    ) -> Result<Option<PinRow>> {
        let StoredKeep {
            keep: kind,
            keep_n: n,
        } = StoredKeep::of(keep);
        // Two pins of one name at once compute the same revision: one fails the unique key
        // and runs again.
        let added = retry(UNIQUE, || async {
            let now = now_unix();
            let mut tx = self.pool.begin().await?;
            if self.engine == Engine::Postgres {
                // Share-lock the path: a concurrent eviction deleting it either waits for this
                // pin (and then sees it and gives up) or has deleted it (and the pin fails).
                let present: Option<i64> = sqlx::query_scalar(
                    "SELECT id FROM paths WHERE cache_id = $1 AND hash = $2 FOR SHARE",
                )
                .bind(cache_id)
                .bind(hash)
                .fetch_optional(&mut *tx)
                .await?;
                if present.is_none() {
                    tx.rollback().await?;
                    return Ok(false);
                }
            }
            let done = sqlx::query(
                "INSERT INTO pins (cache_id, name, revision, hash, store_path, keep, keep_n, \
                 created_at) SELECT $1, $2, COALESCE((SELECT MAX(revision) FROM pins \
                 WHERE cache_id = $1 AND name = $2), 0) + 1, $3, $4, $5, $6, $7 \
                 WHERE EXISTS (SELECT 1 FROM paths WHERE cache_id = $1 AND hash = $3)",
            )
            .bind(cache_id)
            .bind(name)
            .bind(hash)
            .bind(store_path)
            .bind(&kind)
            .bind(n)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
            tx.commit().await?;
            Ok::<_, MetaError>(true)
        })
        .await?;
        if !added {
            return Ok(None);
        }
        self.prune_pins(cache_id).await?;
        Ok(self
            .list_pins(cache_id)
            .await?
            .into_iter()
            .find(|p| p.name == name))
    }

    /// Every kept revision of every pin of a cache, by name, newest revision first.
    pub async fn list_pins(&self, cache_id: i64) -> Result<Vec<PinRow>> {
        sqlx::query_as(
            "SELECT name, revision, hash, store_path, keep, keep_n, created_at FROM pins \
             WHERE cache_id = $1 ORDER BY name, revision DESC",
        )
        .bind(cache_id)
        .fetch_all(&self.pool)
        .await
        .map_err(decoding("pins"))
    }

    /// Delete every revision of a pin; false if there was none.
    pub async fn delete_pin(&self, cache_id: i64, name: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM pins WHERE cache_id = $1 AND name = $2")
            .bind(cache_id)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Drop the revisions that their pin's newest revision's policy no longer keeps.
    pub async fn prune_pins(&self, cache_id: i64) -> Result<u64> {
        let pins = self.list_pins(cache_id).await?;
        let now = now_unix();
        let mut dropped = 0;
        let mut i = 0;
        while i < pins.len() {
            let newest = &pins[i];
            let group: Vec<&PinRow> = pins[i..]
                .iter()
                .take_while(|p| p.name == newest.name)
                .collect();
            i += group.len();
            for (age, p) in group.iter().enumerate().skip(1) {
                let keep = match newest.keep {
                    Keep::Forever => true,
                    Keep::Revisions(n) => (age as i64) < n.max(1),
                    Keep::Days(d) => p.created_at >= now - d.saturating_mul(86400),
                };
                if !keep {
                    dropped += sqlx::query(
                        "DELETE FROM pins WHERE cache_id = $1 AND name = $2 AND revision = $3",
                    )
                    .bind(cache_id)
                    .bind(&p.name)
                    .bind(p.revision)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                }
            }
        }
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_policies_read_back_as_stored() {
        for keep in [Keep::Forever, Keep::Revisions(3), Keep::Days(7)] {
            assert_eq!(Keep::try_from(StoredKeep::of(keep)).ok(), Some(keep));
        }
        let odd = StoredKeep {
            keep: "revisions".into(),
            keep_n: None,
        };
        assert!(Keep::try_from(odd).is_err());
    }
}
