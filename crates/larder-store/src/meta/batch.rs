//! Publishing a batch of small paths with their NARs in one transaction
//! (`POST /caches/{cache}/paths/batch`): what [`Metadata::insert_nar_for_pack`] and
//! [`Metadata::publish_path`] do for one path, done for many with a few multi-row statements,
//! and no pending upload in between (the NARs are recorded and published at once).
//!
//! A path of ten bytes cost about twenty statements through those two, each a round trip to
//! the database's thread, which was most of what pushing it cost the server; here a batch of
//! a hundred paths costs about as many statements as one path did.

use std::collections::{BTreeSet, HashMap, HashSet};

use larder_nix::hash::Sha256;
use larder_nix::store_path::StorePath;

use super::columns::{refs_text, sigs_text, Stored};
use super::paths::{published_refs, ref_hashes, NAR_COLS};
use super::uploads::record_chunks;
use super::{
    batches, decoding, now_unix, placeholders, retry, sizes, value_rows, ChunkRow, MetaError,
    Metadata, NarRow, NewPath, Publish, Result, FOREIGN_KEY, INSERT_BATCH, IN_BATCH, TX_ATTEMPTS,
};

/// One path of a batch: its NAR as stored (`nar.id` is not read), the NAR's chunks in order,
/// and the path (`path.nar_id` is not read; every path of a batch is in one cache).
#[derive(Debug, Clone)]
pub struct BatchItem {
    pub nar: NarRow,
    pub chunks: Vec<ChunkRow>,
    pub path: NewPath,
}

/// Rows of a multi-row `INSERT` into `nars` (6 parameters each) or `paths` (10).
const NAR_ROWS: usize = 32;
const PATH_ROWS: usize = 16;

impl Metadata {
    /// Record the NARs of `items` and publish their paths, in one transaction: what
    /// [`Metadata::insert_nar_for_pack`] then [`Metadata::publish_path`] do for each, with the
    /// same guarantees. The chunks not visible in the cache are in `pack` (claimed with
    /// [`Metadata::claim_pack`] and durably written); those used as stored are claimed by
    /// `claim_id`, whose claims are released. A NAR recorded before is used as it is.
    ///
    /// Each path gets its own answer, in order: a path whose references are neither published
    /// (before, or by this batch) nor vouched for upstream is not published
    /// ([`Publish::MissingReferences`]), and neither is any path of the batch referring to it.
    pub async fn publish_batch(
        &self,
        claim_id: &str,
        pack: Option<&super::Pack>,
        items: &[BatchItem],
    ) -> Result<Vec<(Publish, NarRow)>> {
        let _publishing = match items.first() {
            Some(first) => {
                let hashes = items.iter().map(|i| i.path.store_path.hash_part());
                self.publishing(first.path.cache_id, hashes).await
            }
            None => None,
        };
        let mut attempt = 1;
        loop {
            let once = || self.publish_batch_once(claim_id, pack, items);
            match retry(FOREIGN_KEY, once).await? {
                Some(done) => return Ok(done),
                // A path that stopped an insert was deleted (an eviction) before it could be
                // read: nothing conflicts any more, so run again.
                None if attempt < TX_ATTEMPTS => attempt += 1,
                None => return Err(sqlx::Error::RowNotFound.into()),
            }
        }
    }

    async fn publish_batch_once(
        &self,
        claim_id: &str,
        pack: Option<&super::Pack>,
        items: &[BatchItem],
    ) -> Result<Option<Vec<(Publish, NarRow)>>> {
        let Some(first) = items.first() else {
            return Ok(Some(Vec::new()));
        };
        let cache_id = first.path.cache_id;
        let now = now_unix();
        let mut tx = self.pool.begin().await?;

        // The NARs: inserted where new (in hash order), then all read back.
        let mut nars: Vec<&NarRow> = items.iter().map(|i| &i.nar).collect();
        nars.sort_by_key(|n| n.nar_hash.to_nix32());
        nars.dedup_by_key(|n| n.nar_hash);
        let mut new_ids: HashMap<Sha256, i64> = HashMap::new();
        for batch in batches(&nars, NAR_ROWS) {
            let sql = format!(
                "INSERT INTO nars (nar_hash, nar_size, compression, file_hash, file_size, \
                 created_at) VALUES {} ON CONFLICT DO NOTHING RETURNING id, nar_hash",
                value_rows(batch.len(), 6)
            );
            let mut q = sqlx::query_as::<_, (i64, Stored<Sha256>)>(&sql);
            for n in batch {
                q = q
                    .bind(n.nar_hash.to_nix32())
                    .bind(n.nar_size)
                    .bind(n.compression.as_str())
                    .bind(n.file_hash.to_nix32())
                    .bind(n.file_size)
                    .bind(now);
            }
            for (id, Stored(hash)) in q.fetch_all(&mut *tx).await.map_err(decoding("nars"))? {
                new_ids.insert(hash, id);
            }
        }
        let mut rows: HashMap<Sha256, NarRow> = HashMap::new();
        for batch in batches(&nars, IN_BATCH) {
            let sql = format!(
                "SELECT {NAR_COLS} FROM nars n WHERE n.nar_hash IN ({})",
                placeholders(1, batch.len())
            );
            let mut q = sqlx::query_as::<_, NarRow>(&sql);
            for n in batch {
                q = q.bind(n.nar_hash.to_nix32());
            }
            for row in q.fetch_all(&mut *tx).await.map_err(decoding("nars"))? {
                rows.insert(row.nar_hash, row);
            }
        }

        // The chunk rows of the new NARs (in hash order, as claims take them), located in the
        // pack where it holds them, then the NARs' chunk lists.
        let mut fresh: Vec<&BatchItem> = Vec::new();
        for item in items {
            if new_ids.contains_key(&item.nar.nar_hash)
                && !fresh.iter().any(|f| f.nar.nar_hash == item.nar.nar_hash)
            {
                fresh.push(item);
            }
        }
        let chunks = fresh.iter().flat_map(|i| &i.chunks);
        let added = record_chunks(&mut tx, chunks, pack, now).await?;
        let mut listed: Vec<(i64, i64, &str)> = Vec::new();
        for item in &fresh {
            let id = new_ids[&item.nar.nar_hash];
            for (seq, chunk) in item.chunks.iter().enumerate() {
                listed.push((id, seq as i64, chunk.chunk_hash.as_str()));
            }
        }
        for batch in batches(&listed, INSERT_BATCH) {
            let sql = format!(
                "INSERT INTO nar_chunks (nar_id, seq, chunk_hash) VALUES {}",
                value_rows(batch.len(), 3)
            );
            let mut q = sqlx::query(&sql);
            for (id, seq, chunk) in batch {
                q = q.bind(*id).bind(*seq).bind(*chunk);
            }
            q.execute(&mut *tx).await?;
        }
        // The NARs now keep what they use.
        sqlx::query("DELETE FROM chunk_claims WHERE claim_id = $1")
            .bind(claim_id)
            .execute(&mut *tx)
            .await?;

        // The paths.
        let nar_of = |item: &BatchItem| -> Result<NarRow> {
            rows.get(&item.nar.nar_hash)
                .cloned()
                .ok_or_else(|| MetaError::Corrupt {
                    field: "nars.nar_hash",
                    value: item.nar.nar_hash.to_nix32(),
                })
        };
        let mut inserted: HashSet<String> = HashSet::new();
        for batch in batches(items, PATH_ROWS) {
            let sql = format!(
                "INSERT INTO paths (cache_id, hash, name, nar_id, refs, deriver, ca, sigs, \
                 created_at, upstream) VALUES {} ON CONFLICT (cache_id, hash) DO NOTHING \
                 RETURNING hash",
                value_rows(batch.len(), 10)
            );
            let mut q = sqlx::query_scalar::<_, String>(&sql);
            for item in batch {
                let p = &item.path;
                q = q
                    .bind(cache_id)
                    .bind(p.store_path.hash_part())
                    .bind(p.store_path.name().to_owned())
                    .bind(nar_of(item)?.id)
                    .bind(refs_text(&p.refs))
                    .bind(p.deriver.as_ref().map(StorePath::basename))
                    .bind(p.ca.clone())
                    .bind(sigs_text(&p.sigs))
                    .bind(now)
                    .bind(p.upstream.clone());
            }
            inserted.extend(q.fetch_all(&mut *tx).await?);
        }
        // Those already there: the same NAR, or a conflict.
        let others: Vec<String> = items
            .iter()
            .map(|i| i.path.store_path.hash_part())
            .filter(|h| !inserted.contains(h))
            .collect();
        let mut existing: HashMap<String, Sha256> = HashMap::new();
        for batch in batches(&others, IN_BATCH) {
            let sql = format!(
                "SELECT p.hash, n.nar_hash FROM paths p JOIN nars n ON n.id = p.nar_id \
                 WHERE p.cache_id = $1 AND p.hash IN ({})",
                placeholders(2, batch.len())
            );
            let mut q = sqlx::query_as::<_, (String, Stored<Sha256>)>(&sql).bind(cache_id);
            for h in batch {
                q = q.bind(h);
            }
            let found = q.fetch_all(&mut *tx).await.map_err(decoding("nars"))?;
            existing.extend(found.into_iter().map(|(h, Stored(n))| (h, n)));
        }
        if others.iter().any(|h| !existing.contains_key(h)) {
            tx.rollback().await?;
            return Ok(None);
        }

        // References: published before, or by this batch (inserted above); share-locked on
        // PostgreSQL as in `publish_path`.
        let mut wanted: BTreeSet<String> = BTreeSet::new();
        for item in items
            .iter()
            .filter(|i| inserted.contains(&i.path.store_path.hash_part()))
        {
            let own = item.path.store_path.hash_part();
            let refs = item
                .path
                .refs
                .iter()
                .map(StorePath::basename)
                .collect::<Vec<_>>();
            wanted.extend(
                ref_hashes(&own, refs.iter().map(String::as_str))
                    .into_iter()
                    .map(str::to_owned),
            );
        }
        let wanted: Vec<String> = wanted.into_iter().collect();
        let mut present = published_refs(&mut tx, self.engine, cache_id, &wanted).await?;
        // A path missing a reference is not published, nor what refers to it: until nothing
        // changes.
        let mut missing: HashMap<usize, Vec<StorePath>> = HashMap::new();
        loop {
            let mut changed = false;
            for (i, item) in items.iter().enumerate() {
                let p = &item.path;
                if missing.contains_key(&i) || !inserted.contains(&p.store_path.hash_part()) {
                    continue;
                }
                let lacking = p.missing_refs(&present);
                if !lacking.is_empty() {
                    present.remove(&p.store_path.basename());
                    missing.insert(i, lacking);
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        let unpublished: Vec<String> = missing
            .keys()
            .map(|&i| items[i].path.store_path.hash_part())
            .collect();
        for batch in batches(&unpublished, IN_BATCH) {
            let sql = format!(
                "DELETE FROM paths WHERE cache_id = $1 AND hash IN ({})",
                placeholders(2, batch.len())
            );
            let mut q = sqlx::query(&sql).bind(cache_id);
            for h in batch {
                q = q.bind(h);
            }
            q.execute(&mut *tx).await?;
        }

        // The published paths' reference rows and counters.
        let mut answers = Vec::with_capacity(items.len());
        let mut edges: Vec<(String, String)> = Vec::new();
        let mut counted: Vec<i64> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let p = &item.path;
            let hash = p.store_path.hash_part();
            let nar = nar_of(item)?;
            let answer = if let Some(lacking) = missing.remove(&i) {
                Publish::MissingReferences(lacking)
            } else if inserted.contains(&hash) {
                let refs = p.refs.iter().map(StorePath::basename).collect::<Vec<_>>();
                for r in ref_hashes(&hash, refs.iter().map(String::as_str)) {
                    edges.push((hash.clone(), r.to_owned()));
                }
                counted.push(nar.id);
                Publish::Created
            } else if existing[&hash] == nar.nar_hash {
                Publish::AlreadyPresent
            } else {
                Publish::Conflict {
                    existing_nar_hash: existing[&hash],
                }
            };
            answers.push((answer, nar));
        }
        for batch in batches(&edges, INSERT_BATCH) {
            let sql = format!(
                "INSERT INTO path_refs (cache_id, referrer, ref_hash) VALUES {} \
                 ON CONFLICT DO NOTHING",
                value_rows(batch.len(), 3)
            );
            let mut q = sqlx::query(&sql);
            for (referrer, r) in batch {
                q = q.bind(cache_id).bind(referrer).bind(r);
            }
            q.execute(&mut *tx).await?;
        }
        sizes::count_chunk_bytes(&mut tx, added).await?;
        sizes::count_paths(&mut tx, cache_id, &counted, 1).await?;
        tx.commit().await?;
        Ok(Some(answers))
    }
}
