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

use larder_nix::realisation::DrvOutput;
use larder_nix::signing::Signature;
use larder_nix::store_path::StorePath;
use sqlx::FromRow;

use super::columns::{sigs_text, Stored};
use super::{decoding, placeholders, retry, Engine, Metadata, Result, IN_BATCH, TX_ATTEMPTS};
use crate::now_unix;

/// A stored realisation, as the server renders it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RealisationRow {
    pub drv_output: DrvOutput,
    pub out_path: StorePath,
    pub sigs: Vec<Signature>,
    /// The realisations it depends on, with the out path each names.
    pub deps: Vec<(DrvOutput, StorePath)>,
}

/// The `realisations` columns of one row.
#[derive(FromRow)]
struct Realised {
    #[sqlx(try_from = "Stored<StorePath>")]
    out_path: StorePath,
    #[sqlx(try_from = "Stored<Vec<Signature>>")]
    sigs: Vec<Signature>,
}

/// One `realisation_deps` row.
#[derive(FromRow)]
struct Dependency {
    #[sqlx(try_from = "Stored<DrvOutput>")]
    dep: DrvOutput,
    #[sqlx(try_from = "Stored<StorePath>")]
    dep_out_path: StorePath,
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
    MissingDependencies(Vec<DrvOutput>),
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
        let out_hash = row.out_path.hash_part();
        let out_path = row.out_path.basename();
        let drv_output = row.drv_output.as_str();
        let mut tx = self.pool.begin().await?;
        // The write first, so that SQLite takes its write lock at once.
        let inserted: Option<i64> = sqlx::query_scalar(
            "INSERT INTO realisations (cache_id, drv_output, out_hash, out_path, sigs, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (cache_id, drv_output) DO NOTHING RETURNING cache_id",
        )
        .bind(cache_id)
        .bind(drv_output)
        .bind(&out_hash)
        .bind(&out_path)
        .bind(sigs_text(&row.sigs))
        .bind(now_unix())
        .fetch_optional(&mut *tx)
        .await?;
        if inserted.is_none() {
            let existing: Option<String> = sqlx::query_scalar(
                "SELECT out_path FROM realisations WHERE cache_id = $1 AND drv_output = $2",
            )
            .bind(cache_id)
            .bind(drv_output)
            .fetch_optional(&mut *tx)
            .await?;
            tx.rollback().await?;
            return Ok(match existing {
                Some(p) if p == out_path => PutRealisation::AlreadyPresent,
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
        .bind(&out_hash)
        .fetch_optional(&mut *tx)
        .await?;
        if path.as_deref() != Some(out_path.as_str()) {
            tx.rollback().await?;
            return Ok(PutRealisation::MissingPath);
        }
        let mut missing = Vec::new();
        for (dep, dep_path) in &row.deps {
            let found: Option<String> = sqlx::query_scalar(&format!(
                "SELECT out_path FROM realisations WHERE cache_id = $1 AND drv_output = $2{lock}"
            ))
            .bind(cache_id)
            .bind(dep.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            if found != Some(dep_path.basename()) {
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
            .bind(drv_output)
            .bind(dep.as_str())
            .bind(dep_path.basename())
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
        drv_output: &DrvOutput,
    ) -> Result<Option<RealisationRow>> {
        let mut tx = self.pool.begin().await?;
        let row: Option<Realised> = sqlx::query_as(
            "SELECT out_path, sigs FROM realisations WHERE cache_id = $1 AND drv_output = $2",
        )
        .bind(cache_id)
        .bind(drv_output.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(decoding("realisations"))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let deps: Vec<Dependency> = sqlx::query_as(
            "SELECT dep, dep_out_path FROM realisation_deps \
             WHERE cache_id = $1 AND referrer = $2 ORDER BY dep",
        )
        .bind(cache_id)
        .bind(drv_output.as_str())
        .fetch_all(&mut *tx)
        .await
        .map_err(decoding("realisation_deps"))?;
        tx.commit().await?;
        Ok(Some(RealisationRow {
            drv_output: drv_output.clone(),
            out_path: row.out_path,
            sigs: row.sigs,
            deps: deps.into_iter().map(|d| (d.dep, d.dep_out_path)).collect(),
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
