//! Pending uploads and chunk claims: a NAR received (or reused) but not yet published, keyed
//! by upload id (and by Nix's `nar/<key>` for uploads through the binary cache protocol), and
//! the claims that keep chunks being written safe from garbage collection.

use std::collections::{HashMap, HashSet};

use larder_nix::hash::Sha256;
use sqlx::FromRow;

use super::packs::Pack;
use super::paths::NAR_COLS;
use super::{
    batches, decoding, now_unix, placeholders, retry, value_rows, ChunkRow, MetaError, Metadata,
    NarRow, Result, FOREIGN_KEY, INSERT_BATCH, IN_BATCH,
};

/// A pending upload found by its key.
#[derive(FromRow)]
struct KeyedUpload {
    upload_id: String,
    #[sqlx(flatten)]
    nar: NarRow,
}

/// Chunk rows per statement of [`insert_chunks`] (5 parameters each: SQLite's binding costs
/// the square of a statement's parameters).
const CHUNK_INSERT_BATCH: usize = 40;

/// Insert the rows of `chunks` (at most [`CHUNK_INSERT_BATCH`]) that do not exist yet, in one
/// statement: located in `pack` if it holds them (its hash and their offsets), otherwise not
/// located (`pack = ''`, see `meta/packs.rs`: they count in no size until located). The ids
/// inserted.
async fn insert_chunks(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    chunks: impl ExactSizeIterator<Item = &ChunkRow>,
    pack: Option<(&str, &HashMap<&str, i64>)>,
    now: i64,
) -> Result<Vec<String>> {
    let sql = format!(
        "INSERT INTO chunks (chunk_hash, file_size, created_at, pack, pack_offset) VALUES {} \
         ON CONFLICT (chunk_hash) DO NOTHING RETURNING chunk_hash",
        value_rows(chunks.len(), 5)
    );
    let mut q = sqlx::query_scalar::<_, String>(&sql);
    for chunk in chunks {
        let at = pack.and_then(|(hash, offsets)| {
            offsets
                .get(chunk.chunk_hash.as_str())
                .map(|&offset| (hash, offset))
        });
        q = q
            .bind(&chunk.chunk_hash)
            .bind(chunk.file_size)
            .bind(now)
            .bind(at.map_or("", |(hash, _)| hash))
            .bind(at.map(|(_, offset)| offset));
    }
    Ok(q.fetch_all(&mut **tx).await?)
}

/// Create the rows of `chunks` that do not exist (in hash order, as claims take them), those
/// in `pack` located there; then locate in `pack` the rows that existed, not located
/// (collected meanwhile, or forgotten by fsck's repair), marking the pack used or not; or,
/// without a pack, make the unlocated rows chunks of their own objects. Returns the bytes that
/// now count in `store_sizes` ([`super::sizes::count_chunk_bytes`]).
pub(super) async fn record_chunks(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    chunks: impl Iterator<Item = &ChunkRow>,
    pack: Option<&Pack>,
    now: i64,
) -> Result<i64> {
    let mut sorted: Vec<&ChunkRow> = chunks.collect();
    sorted.sort_by(|a, b| a.chunk_hash.cmp(&b.chunk_hash));
    sorted.dedup_by(|a, b| a.chunk_hash == b.chunk_hash);
    let offsets: HashMap<&str, i64> = pack
        .iter()
        .flat_map(|p| {
            p.chunks
                .iter()
                .map(|(id, offset, _)| (id.as_str(), *offset))
        })
        .collect();
    let mut created = HashSet::new();
    for batch in batches(&sorted, CHUNK_INSERT_BATCH) {
        let into = pack.map(|p| (p.hash.as_str(), &offsets));
        created.extend(insert_chunks(tx, batch.iter().copied(), into, now).await?);
    }
    match pack {
        Some(pack) => {
            let rest = Pack {
                chunks: (pack.chunks.iter())
                    .filter(|(id, _, _)| !created.contains(id))
                    .cloned()
                    .collect(),
                ..pack.clone()
            };
            super::packs::locate(tx, &rest).await?;
            Ok(0)
        }
        None => {
            let ids: Vec<&str> = sorted.iter().map(|c| c.chunk_hash.as_str()).collect();
            super::packs::settle_unlocated(tx, &ids).await
        }
    }
}

impl Metadata {
    /// Record a pending upload in `cache_id` that reuses the stored NAR with `nar_hash`, if
    /// one exists. One statement, so garbage collection cannot slip in between the lookup
    /// and the reference. Returns the NAR if it was reused.
    pub async fn reuse_nar_for_upload(
        &self,
        upload_id: &str,
        cache_id: i64,
        key: Option<&str>,
        nar_hash: &Sha256,
    ) -> Result<Option<NarRow>> {
        if let Some(key) = key {
            self.drop_upload_key(cache_id, key).await?;
        }
        // A NAR that garbage collection deletes concurrently fails the foreign key; the retry
        // then finds no NAR to reuse.
        let nar_hash = nar_hash.to_nix32();
        let done = retry(FOREIGN_KEY, || {
            sqlx::query(
                "INSERT INTO uploads (id, cache_id, nar_id, key, created_at) \
                 SELECT $1, $2, id, $3, $4 FROM nars WHERE nar_hash = $5",
            )
            .bind(upload_id)
            .bind(cache_id)
            .bind(key)
            .bind(now_unix())
            .bind(&nar_hash)
            .execute(&self.pool)
        })
        .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        self.upload_nar(cache_id, upload_id).await
    }

    async fn drop_upload_key(&self, cache_id: i64, key: &str) -> Result<()> {
        sqlx::query("DELETE FROM uploads WHERE cache_id = $1 AND key = $2")
            .bind(cache_id)
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Claim chunks about to be written to object storage, for the upload `claim_id`: until
    /// the upload records its NAR ([`Metadata::insert_nar_for_upload`] releases the claims) or
    /// the claim expires, garbage collection does not delete these chunks. Without it, a
    /// collection that had decided a chunk was garbage could delete its object just after an
    /// upload of the same bytes found the object present. Committed at once.
    pub async fn claim_chunks(&self, claim_id: &str, chunks: &[ChunkRow]) -> Result<()> {
        // In hash order, so that concurrent claims of overlapping sets cannot deadlock.
        let mut sorted: Vec<&ChunkRow> = chunks.iter().collect();
        sorted.sort_by(|a, b| a.chunk_hash.cmp(&b.chunk_hash));
        sorted.dedup_by(|a, b| a.chunk_hash == b.chunk_hash);
        // A chunk that a collection deletes meanwhile fails the claim's foreign key: run again,
        // creating the chunk anew.
        retry(FOREIGN_KEY, || async {
            let now = now_unix();
            let mut tx = self.pool.begin().await?;
            for batch in sorted.chunks(INSERT_BATCH) {
                insert_chunks(&mut tx, batch.iter().copied(), None, now).await?;
                let sql = format!(
                    "INSERT INTO chunk_claims (claim_id, chunk_hash, claimed_at) VALUES {} \
                     ON CONFLICT (claim_id, chunk_hash) DO UPDATE \
                     SET claimed_at = excluded.claimed_at",
                    value_rows(batch.len(), 3)
                );
                let mut q = sqlx::query(&sql);
                for chunk in batch {
                    q = q.bind(claim_id).bind(&chunk.chunk_hash).bind(now);
                }
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok::<_, MetaError>(())
        })
        .await
    }

    /// The stored bytes of the chunks that claims named `<claim_prefix>…` hold and no NAR
    /// uses: what unassembled push sessions keep (counted against the staging bounds).
    pub async fn claimed_unused_bytes(&self, claim_prefix: &str) -> Result<i64> {
        let bytes: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(c.file_size), 0) AS BIGINT) FROM chunks c WHERE \
             c.chunk_hash IN (SELECT chunk_hash FROM chunk_claims WHERE claim_id LIKE $1) \
             AND NOT EXISTS (SELECT 1 FROM nar_chunks nc WHERE nc.chunk_hash = c.chunk_hash)",
        )
        .bind(format!("{claim_prefix}%"))
        .fetch_one(&self.pool)
        .await?;
        Ok(bytes)
    }

    /// Claim, for `claim_id`, those of the chunks `ids` that have a row, without creating any
    /// (a chunk a NAR of the cache uses, say, that an upload is about to rely on). Returns the
    /// ids claimed. Like [`Metadata::claim_chunks`], committed at once and in hash order.
    pub async fn claim_existing_chunks(
        &self,
        claim_id: &str,
        ids: &[String],
    ) -> Result<std::collections::HashSet<String>> {
        let mut sorted: Vec<&String> = ids.iter().collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut claimed = std::collections::HashSet::new();
        for batch in sorted.chunks(IN_BATCH) {
            // A chunk that a collection deletes between the select and the claim fails the
            // claim's foreign key (PostgreSQL): run again, and it is not claimed.
            let got: Vec<String> = retry(FOREIGN_KEY, || async {
                let now = now_unix();
                let mut tx = self.pool.begin().await?;
                let mut got = Vec::new();
                for ids in batch.chunks(INSERT_BATCH) {
                    // In hash order, as every claim is taken. (`WHERE` also keeps SQLite from
                    // reading `ON CONFLICT` as a join's constraint.)
                    let sql = format!(
                        "INSERT INTO chunk_claims (claim_id, chunk_hash, claimed_at) \
                         SELECT $1, chunk_hash, $2 FROM chunks WHERE chunk_hash IN ({}) \
                         ORDER BY chunk_hash \
                         ON CONFLICT (claim_id, chunk_hash) DO UPDATE \
                         SET claimed_at = excluded.claimed_at RETURNING chunk_hash",
                        placeholders(3, ids.len())
                    );
                    let mut q = sqlx::query_scalar::<_, String>(&sql)
                        .bind(claim_id)
                        .bind(now);
                    for id in ids {
                        q = q.bind(*id);
                    }
                    got.extend(q.fetch_all(&mut *tx).await?);
                }
                tx.commit().await?;
                Ok::<_, MetaError>(got)
            })
            .await?;
            claimed.extend(got);
        }
        Ok(claimed)
    }

    /// Which of the chunks `ids` `claim_id` holds claims on.
    pub async fn claimed_chunks(
        &self,
        claim_id: &str,
        ids: &[String],
    ) -> Result<std::collections::HashSet<String>> {
        let mut claimed = std::collections::HashSet::new();
        for batch in ids.chunks(IN_BATCH) {
            // Only located chunks: a chunk whose row lost its location (fsck's repair, or a
            // database from before packs) is uploaded again.
            let sql = format!(
                "SELECT cc.chunk_hash FROM chunk_claims cc JOIN chunks c \
                 ON c.chunk_hash = cc.chunk_hash WHERE cc.claim_id = $1 \
                 AND (c.pack IS NULL OR c.pack <> '') AND cc.chunk_hash IN ({})",
                placeholders(2, batch.len())
            );
            let mut q = sqlx::query_scalar::<_, String>(&sql).bind(claim_id);
            for id in batch {
                q = q.bind(id);
            }
            claimed.extend(q.fetch_all(&self.pool).await?);
        }
        Ok(claimed)
    }

    /// Drop the claims of `claim_id` on the chunks `ids` (a push session's chunks that an
    /// assembled NAR now holds; the session may still hold others, for another NAR).
    pub async fn release_claimed_chunks(&self, claim_id: &str, ids: &[String]) -> Result<()> {
        for batch in batches(ids, IN_BATCH) {
            let sql = format!(
                "DELETE FROM chunk_claims WHERE claim_id = $1 AND chunk_hash IN ({})",
                placeholders(2, batch.len())
            );
            let mut q = sqlx::query(&sql).bind(claim_id);
            for id in batch {
                q = q.bind(id);
            }
            q.execute(&self.pool).await?;
        }
        Ok(())
    }

    /// Drop every claim of `claim_id` (an upload that gave up).
    pub async fn release_claims(&self, claim_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM chunk_claims WHERE claim_id = $1")
            .bind(claim_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Record a newly stored NAR (its chunks claimed by `upload_id` with
    /// [`Metadata::claim_chunks`] and each either located or durably stored as an object of
    /// its own) and a pending upload referencing it, releasing the claims. If the same NAR was
    /// recorded concurrently, the upload references that one instead and `Ok((nar, false))`
    /// says ours is redundant.
    pub async fn insert_nar_for_upload(
        &self,
        upload_id: &str,
        cache_id: i64,
        key: Option<&str>,
        nar: &NarRow,
        chunks: &[ChunkRow],
    ) -> Result<(NarRow, bool)> {
        self.insert_nar(upload_id, cache_id, key, nar, chunks, None)
            .await
    }

    /// [`Metadata::insert_nar_for_upload`] of a NAR whose chunks not yet located are in
    /// `pack` (claimed with [`Metadata::claim_pack`] and durably written): they are located
    /// there in the same transaction.
    pub async fn insert_nar_for_pack(
        &self,
        upload_id: &str,
        cache_id: i64,
        key: Option<&str>,
        nar: &NarRow,
        chunks: &[ChunkRow],
        pack: &Pack,
    ) -> Result<(NarRow, bool)> {
        self.insert_nar(upload_id, cache_id, key, nar, chunks, Some(pack))
            .await
    }

    async fn insert_nar(
        &self,
        upload_id: &str,
        cache_id: i64,
        key: Option<&str>,
        nar: &NarRow,
        chunks: &[ChunkRow],
        pack: Option<&Pack>,
    ) -> Result<(NarRow, bool)> {
        if let Some(key) = key {
            self.drop_upload_key(cache_id, key).await?;
        }
        retry(FOREIGN_KEY, || {
            self.insert_nar_for_upload_once(upload_id, cache_id, key, nar, chunks, pack)
        })
        .await
    }

    async fn insert_nar_for_upload_once(
        &self,
        upload_id: &str,
        cache_id: i64,
        key: Option<&str>,
        nar: &NarRow,
        chunks: &[ChunkRow],
        pack: Option<&Pack>,
    ) -> Result<(NarRow, bool)> {
        let now = now_unix();
        let nar_hash = nar.nar_hash.to_nix32();
        let mut tx = self.pool.begin().await?;
        let new_id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO nars (nar_hash, nar_size, compression, file_hash, file_size, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING id",
        )
        .bind(&nar_hash)
        .bind(nar.nar_size)
        .bind(nar.compression.as_str())
        .bind(nar.file_hash.to_nix32())
        .bind(nar.file_size)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let inserted = new_id.is_some();
        let mut added = 0;
        if let (None, Some(pack)) = (new_id, pack) {
            // Recorded before (concurrently, or earlier and not yet collected): its chunks not
            // located (an fsck repair forgot them) are located in ours, which is collected if
            // nothing uses it.
            super::packs::locate(&mut tx, pack).await?;
        }
        if let Some(nar_id) = new_id {
            // The chunk rows first, then the list.
            added += record_chunks(&mut tx, chunks.iter(), pack, now).await?;
            let mut seq = 0i64;
            for batch in batches(chunks, INSERT_BATCH) {
                let sql = format!(
                    "INSERT INTO nar_chunks (nar_id, seq, chunk_hash) VALUES {}",
                    value_rows(batch.len(), 3)
                );
                let mut q = sqlx::query(&sql);
                for chunk in batch {
                    q = q.bind(nar_id).bind(seq).bind(&chunk.chunk_hash);
                    seq += 1;
                }
                q.execute(&mut *tx).await?;
            }
        }
        let linked = sqlx::query(
            "INSERT INTO uploads (id, cache_id, nar_id, key, created_at) \
             SELECT $1, $2, id, $3, $4 FROM nars WHERE nar_hash = $5",
        )
        .bind(upload_id)
        .bind(cache_id)
        .bind(key)
        .bind(now)
        .bind(&nar_hash)
        .execute(&mut *tx)
        .await?;
        // The NAR (ours or the one recorded concurrently) now keeps what it uses.
        sqlx::query("DELETE FROM chunk_claims WHERE claim_id = $1")
            .bind(upload_id)
            .execute(&mut *tx)
            .await?;
        if linked.rows_affected() == 0 {
            // Only possible if a file hash collided with a different NAR's; treat as corrupt.
            return Err(MetaError::Corrupt {
                field: "nars.file_hash",
                value: nar.file_hash.to_nix32(),
            });
        }
        // Read back in the transaction: once it commits, a concurrent upload of the same
        // `nar/<key>` replaces this one (`drop_upload_key`), and a read after the commit would
        // find nothing (that was a 500 for one of several `nix copy` racing on one path).
        let sql = format!(
            "SELECT {NAR_COLS} FROM uploads u JOIN nars n ON n.id = u.nar_id \
             WHERE u.cache_id = $1 AND u.id = $2"
        );
        let row: Option<NarRow> = sqlx::query_as(&sql)
            .bind(cache_id)
            .bind(upload_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(decoding("nars"))?;
        super::sizes::count_chunk_bytes(&mut tx, added).await?;
        tx.commit().await?;
        let row = row.ok_or_else(|| MetaError::Corrupt {
            field: "uploads.id",
            value: upload_id.to_owned(),
        })?;
        Ok((row, inserted))
    }

    /// The NAR of a pending upload.
    pub async fn upload_nar(&self, cache_id: i64, upload_id: &str) -> Result<Option<NarRow>> {
        let sql = format!(
            "SELECT {NAR_COLS} FROM uploads u JOIN nars n ON n.id = u.nar_id \
             WHERE u.cache_id = $1 AND u.id = $2"
        );
        sqlx::query_as(&sql)
            .bind(cache_id)
            .bind(upload_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(decoding("nars"))
    }

    /// The pending upload that Nix's uploader stored under `nar/<key>`.
    pub async fn upload_by_key(
        &self,
        cache_id: i64,
        key: &str,
    ) -> Result<Option<(String, NarRow)>> {
        let sql = format!(
            "SELECT u.id AS upload_id, {NAR_COLS} FROM uploads u JOIN nars n ON n.id = u.nar_id \
             WHERE u.cache_id = $1 AND u.key = $2 ORDER BY u.created_at DESC"
        );
        let keyed: Option<KeyedUpload> = sqlx::query_as(&sql)
            .bind(cache_id)
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(decoding("nars"))?;
        Ok(keyed.map(|k| (k.upload_id, k.nar)))
    }
}
