//! Realisations of content-addressed derivations (tables `realisations` and
//! `realisation_deps`, migration 7): which store path of a cache a derivation output
//! (`sha256:<drv hash>!<output>`) was built to, with its signatures and the realisations it
//! depends on. The server serves them as `realisations/<id>.doi`; the format is
//! `larder_nix::realisation`.
//!
//! Invariants kept here:
//! - a realisation exists only while its out path is a published path of the same cache, and
//!   while every realisation it depends on exists in the cache with the out path it names
//!   (checked when it is stored, share-locked on PostgreSQL like a path's references; deleted
//!   in the evicting transaction, together with every realisation that depended on a deleted
//!   one);
//! - an existing realisation is never changed to another out path
//!   ([`PutRealisation::Conflict`]).

use sqlx::Row;

use super::{placeholders, retry, Engine, Metadata, Result, IN_BATCH, TX_ATTEMPTS};
use crate::now_unix;

/// A stored realisation, as the server renders it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RealisationRow {
    /// `sha256:<base16>!<output>`.
    pub drv_output: String,
    /// The out path's base name.
    pub out_path: String,
    pub sigs: Vec<String>,
    /// `(output id, out path base name)` of the realisations it depends on.
    pub deps: Vec<(String, String)>,
}

/// What storing a realisation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutRealisation {
    Created,
    /// The same output was already realised to the same path; nothing changed.
    AlreadyPresent,
    /// The output is already realised to another path, which is kept.
    Conflict {
        existing_out_path: String,
    },
    /// The out path is not a published path of the cache.
    MissingPath,
    /// These dependencies (output ids) are not realisations of the cache with the out path
    /// named.
    MissingDependencies(Vec<String>),
}

impl Metadata {
    /// Store a realisation in a cache (see the module's invariants).
    pub async fn put_realisation(
        &self,
        cache_id: i64,
        row: &RealisationRow,
    ) -> Result<PutRealisation> {
        let mut attempt = 1;
        loop {
            match retry(super::FOREIGN_KEY, || {
                self.put_realisation_once(cache_id, row)
            })
            .await?
            {
                // The row that stopped the insert was deleted before it could be read (an
                // eviction): store again.
                PutRealisation::Conflict { existing_out_path }
                    if existing_out_path.is_empty() && attempt < TX_ATTEMPTS =>
                {
                    attempt += 1;
                }
                other => return Ok(other),
            }
        }
    }

    async fn put_realisation_once(
        &self,
        cache_id: i64,
        row: &RealisationRow,
    ) -> Result<PutRealisation> {
        let out_hash = row.out_path.get(..32).unwrap_or(&row.out_path);
        let mut tx = self.pool.begin().await?;
        // The write first, so that SQLite takes its write lock at once.
        let inserted: Option<i64> = sqlx::query_scalar(
            "INSERT INTO realisations (cache_id, drv_output, out_hash, out_path, sigs, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (cache_id, drv_output) DO NOTHING RETURNING cache_id",
        )
        .bind(cache_id)
        .bind(&row.drv_output)
        .bind(out_hash)
        .bind(&row.out_path)
        .bind(row.sigs.join("\n"))
        .bind(now_unix())
        .fetch_optional(&mut *tx)
        .await?;
        if inserted.is_none() {
            let existing: Option<String> = sqlx::query_scalar(
                "SELECT out_path FROM realisations WHERE cache_id = $1 AND drv_output = $2",
            )
            .bind(cache_id)
            .bind(&row.drv_output)
            .fetch_optional(&mut *tx)
            .await?;
            tx.rollback().await?;
            return Ok(match existing {
                Some(p) if p == row.out_path => PutRealisation::AlreadyPresent,
                Some(p) => PutRealisation::Conflict {
                    existing_out_path: p,
                },
                None => PutRealisation::Conflict {
                    existing_out_path: String::new(),
                },
            });
        }
        // Share-locked on PostgreSQL: an eviction deleting the path or a dependency waits for
        // this transaction and then deletes this realisation too, or has already deleted
        // them and they count as missing. SQLite serialises writers.
        let lock = match self.engine {
            Engine::Postgres => " FOR SHARE",
            Engine::Sqlite => "",
        };
        let path: Option<String> = sqlx::query_scalar(&format!(
            "SELECT hash || '-' || name FROM paths WHERE cache_id = $1 AND hash = $2{lock}"
        ))
        .bind(cache_id)
        .bind(out_hash)
        .fetch_optional(&mut *tx)
        .await?;
        if path.as_deref() != Some(&row.out_path) {
            tx.rollback().await?;
            return Ok(PutRealisation::MissingPath);
        }
        let mut missing = Vec::new();
        for (dep, dep_path) in &row.deps {
            let found: Option<String> = sqlx::query_scalar(&format!(
                "SELECT out_path FROM realisations WHERE cache_id = $1 AND drv_output = $2{lock}"
            ))
            .bind(cache_id)
            .bind(dep)
            .fetch_optional(&mut *tx)
            .await?;
            if found.as_ref() != Some(dep_path) {
                missing.push(dep.clone());
            }
        }
        if !missing.is_empty() {
            tx.rollback().await?;
            return Ok(PutRealisation::MissingDependencies(missing));
        }
        for (dep, dep_path) in &row.deps {
            sqlx::query(
                "INSERT INTO realisation_deps (cache_id, referrer, dep, dep_out_path) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .bind(cache_id)
            .bind(&row.drv_output)
            .bind(dep)
            .bind(dep_path)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(PutRealisation::Created)
    }

    /// The realisation of `drv_output` in a cache.
    pub async fn get_realisation(
        &self,
        cache_id: i64,
        drv_output: &str,
    ) -> Result<Option<RealisationRow>> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT out_path, sigs FROM realisations WHERE cache_id = $1 AND drv_output = $2",
        )
        .bind(cache_id)
        .bind(drv_output)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let deps = sqlx::query(
            "SELECT dep, dep_out_path FROM realisation_deps \
             WHERE cache_id = $1 AND referrer = $2 ORDER BY dep",
        )
        .bind(cache_id)
        .bind(drv_output)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("dep")?, r.try_get("dep_out_path")?)))
        .collect::<Result<Vec<(String, String)>>>()?;
        tx.commit().await?;
        let sigs: String = row.try_get("sigs")?;
        Ok(Some(RealisationRow {
            drv_output: drv_output.to_owned(),
            out_path: row.try_get("out_path")?,
            sigs: sigs
                .lines()
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            deps,
        }))
    }

    /// The output ids realised to a path of a cache (its hash part).
    pub async fn realisations_of_path(&self, cache_id: i64, hash: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT drv_output FROM realisations WHERE cache_id = $1 AND out_hash = $2 \
             ORDER BY drv_output",
        )
        .bind(cache_id)
        .bind(hash)
        .fetch_all(&self.pool)
        .await?)
    }
}

/// Delete, inside an evicting transaction, the realisations of these paths (hash parts) and,
/// transitively, every realisation that depended on a deleted one.
pub(super) async fn forget_paths(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    cache_id: i64,
    hashes: &[String],
) -> Result<()> {
    let mut deleted = 0;
    for batch in hashes.chunks(IN_BATCH) {
        let sql = format!(
            "DELETE FROM realisations WHERE cache_id = $1 AND out_hash IN ({})",
            placeholders(2, batch.len())
        );
        let mut q = sqlx::query(&sql).bind(cache_id);
        for h in batch {
            q = q.bind(h);
        }
        deleted += q.execute(&mut **tx).await?.rows_affected();
    }
    if deleted == 0 {
        return Ok(());
    }
    loop {
        let gone = sqlx::query(
            "DELETE FROM realisations WHERE cache_id = $1 AND drv_output IN \
             (SELECT d.referrer FROM realisation_deps d WHERE d.cache_id = $1 AND NOT EXISTS \
              (SELECT 1 FROM realisations r WHERE r.cache_id = $1 AND r.drv_output = d.dep))",
        )
        .bind(cache_id)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if gone == 0 {
            break;
        }
    }
    sqlx::query(
        "DELETE FROM realisation_deps WHERE cache_id = $1 AND NOT EXISTS \
         (SELECT 1 FROM realisations r WHERE r.cache_id = $1 \
          AND r.drv_output = realisation_deps.referrer)",
    )
    .bind(cache_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
