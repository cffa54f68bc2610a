//! The local store's realisations of content-addressed derivations, read from its database.
//!
//! Nix 2.8 keeps them (only once `ca-derivations` has been enabled: the tables are created
//! then) in `Realisations(id, drvPath, outputName, outputPath, signatures)`, where `drvPath`
//! holds the output id's hash part (`DrvOutput::strHash()`, `sha256:<base16>`), `outputPath`
//! is a `ValidPaths.id` and `signatures` a space-separated list, and in
//! `RealisationsRefs(referrer, realisationReference)` joining a realisation to those it depends
//! on. See `LocalStore::registerDrvOutput`, `queryRealisation_` and the `ca-specific-schema.sql`
//! of Nix 2.8's src/libstore.
//!
//! Through the daemon there are none for now: the worker protocol's `QueryRealisation` needs
//! the output ids, which only the derivations know.

use std::collections::{BTreeMap, HashSet};

use larder_nix::realisation::{DrvOutput, Realisation};
use larder_nix::signing::Signature;
use larder_nix::store_path::StorePath;
use rusqlite::OptionalExtension;

use super::db::DbStore;
use super::{LocalStore, LocalStoreError};

/// One `Realisations` row, its dependencies not yet followed.
struct Row {
    id: i64,
    realisation: Realisation,
}

impl LocalStore {
    /// The realisations whose out path is one of `paths`, with every realisation they depend
    /// on, each once, dependencies first (the order a cache must receive them in).
    pub fn realisations_of(
        &mut self,
        paths: &[StorePath],
    ) -> Result<Vec<Realisation>, LocalStoreError> {
        match self {
            Self::Db(db) => db.realisations_of(paths),
            Self::Daemon(_) => Ok(Vec::new()),
        }
    }
}

impl DbStore {
    /// See [`LocalStore::realisations_of`].
    pub fn realisations_of(
        &mut self,
        paths: &[StorePath],
    ) -> Result<Vec<Realisation>, LocalStoreError> {
        let db = self.path().to_owned();
        let db_err = |what: &str, source| LocalStoreError::Db {
            db: db.clone(),
            what: what.to_owned(),
            source,
        };
        let conn = self.conn();
        let tx = conn
            .unchecked_transaction()
            .map_err(|e| db_err("a read transaction", e))?;
        let has_table: Option<i64> = tx
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'Realisations'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| db_err("the Realisations table", e))?;
        if has_table.is_none() {
            return Ok(Vec::new());
        }
        let mut by_path = tx
            .prepare_cached(
                "SELECT r.id, r.drvPath, r.outputName, v.path, r.signatures FROM Realisations r \
                 JOIN ValidPaths v ON v.id = r.outputPath WHERE v.path = ?1",
            )
            .map_err(|e| db_err("Realisations", e))?;
        let mut deps_of = tx
            .prepare_cached(
                "SELECT d.id, d.drvPath, d.outputName, v.path, d.signatures \
                 FROM RealisationsRefs rr JOIN Realisations d ON d.id = rr.realisationReference \
                 JOIN ValidPaths v ON v.id = d.outputPath WHERE rr.referrer = ?1",
            )
            .map_err(|e| db_err("RealisationsRefs", e))?;
        let read = |r: &rusqlite::Row<'_>| -> rusqlite::Result<(i64, String, String, String, Option<String>)> {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        };
        let mut roots = Vec::new();
        for path in paths {
            let abs = path.to_absolute();
            let rows = by_path
                .query_map([&abs], read)
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(|e| db_err(&format!("realisations of {abs}"), e))?;
            for row in rows {
                roots.push(to_row(row)?);
            }
        }
        // Depth-first, dependencies before dependents; each output id once.
        let mut out: Vec<Realisation> = Vec::new();
        let mut seen: HashSet<DrvOutput> = HashSet::new();
        let mut stack: Vec<(Row, bool)> = roots.into_iter().rev().map(|r| (r, false)).collect();
        while let Some((row, expanded)) = stack.pop() {
            if seen.contains(&row.realisation.id) {
                continue;
            }
            if expanded {
                seen.insert(row.realisation.id.clone());
                out.push(row.realisation);
                continue;
            }
            let deps = deps_of
                .query_map([row.id], read)
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(|e| db_err(&format!("dependencies of {}", row.realisation.id), e))?
                .into_iter()
                .map(to_row)
                .collect::<Result<Vec<_>, _>>()?;
            let mut row = row;
            row.realisation.dependent_realisations = deps
                .iter()
                .map(|d| (d.realisation.id.clone(), d.realisation.out_path.clone()))
                .collect::<BTreeMap<_, _>>();
            stack.push((row, true));
            stack.extend(
                deps.into_iter()
                    .filter(|d| !seen.contains(&d.realisation.id))
                    .map(|d| (d, false)),
            );
        }
        drop(by_path);
        drop(deps_of);
        tx.commit()
            .map_err(|e| db_err("the end of a read transaction", e))?;
        Ok(out)
    }
}

fn bad(path: &str, field: &'static str, value: &str, reason: impl ToString) -> LocalStoreError {
    LocalStoreError::BadRecord {
        path: path.to_owned(),
        field,
        value: value.chars().take(100).collect(),
        reason: reason.to_string(),
    }
}

fn to_row(
    (id, drv_hash, output, path, sigs): (i64, String, String, String, Option<String>),
) -> Result<Row, LocalStoreError> {
    let out_path = StorePath::from_absolute(&path)
        .map_err(|e| bad(&path, "realisation outputPath", &path, e))?;
    let drv_output = DrvOutput::parse(&format!("{drv_hash}!{output}"))
        .map_err(|e| bad(&path, "realisation id", &drv_hash, e))?;
    let mut realisation = Realisation {
        id: drv_output,
        out_path,
        signatures: Vec::new(),
        dependent_realisations: BTreeMap::new(),
    };
    for sig in sigs
        .as_deref()
        .unwrap_or("")
        .split(' ')
        .filter(|s| !s.is_empty())
    {
        realisation.add_signature(
            Signature::parse(sig).map_err(|e| bad(&path, "realisation signature", sig, e))?,
        );
    }
    Ok(Row { id, realisation })
}
