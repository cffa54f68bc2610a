//! Packs: the chunks an upload stores, written together as one object (see ARCHITECTURE.md,
//! "Packs"), so that storing a NAR costs one object write and one `fsync` (or one `PUT`)
//! rather than one per chunk, and reading a NAR whose chunks were stored together is reading
//! one range of one object.
//!
//! - A `chunks` row says where its frame is: `pack` NULL, its own object (every chunk stored
//!   before packs); `pack = ''`, nowhere yet (created by a claim, not located; no NAR uses
//!   such a row); otherwise `pack_offset` in the pack `pack`.
//! - A `packs` row exists for every pack object, from *before* it is written
//!   ([`Metadata::claim_pack`]) until garbage collection deletes the object. `writers` counts
//!   the uploads between their claim and the location of their chunks ([`locate`]); packs are
//!   named by their content, so two uploads may write the same one. Collection deletes a
//!   pack only when no chunk is located in it (`unused`) and no upload is writing it (or the
//!   last claim, `created_at`, is older than the claim lifetime: an upload that gave up). An
//!   upload that writes a pack therefore finds it alive until it has located its chunks.
//! - A chunk row's location is set once, when it is not located ([`locate`]): a chunk already
//!   stored elsewhere keeps its location (its frame is the same bytes), and the upload's copy
//!   is dead weight in its pack. That is the price of answering every upload alike whatever
//!   other caches hold (ARCHITECTURE.md, "No cross-cache oracle"); it stays small, since it
//!   needs two caches to store the same chunk.
//! - A pack's bytes count in `store_sizes` from its `packs` row's insertion to its deletion.
//! - Compaction: when garbage collection leaves a pack less than half used (`unused = 2`),
//!   the server copies its live chunks into a new pack ([`Metadata::packs_to_compact`],
//!   [`Metadata::pack_chunks`], [`Metadata::relocate_chunks`]), and the old one is collected
//!   once the claim lifetime has passed: a download that looked its chunks up before the move
//!   still reads them.

use super::{batches, now_unix, placeholders, sizes, MetaError, Metadata, Result, IN_BATCH};

type Tx<'a, 'c> = &'a mut sqlx::Transaction<'c, sqlx::Any>;

/// A pack an upload wrote: its name (nix32 SHA-256 of its bytes), its size, and the chunks in
/// it: id, offset and stored size of each frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pack {
    pub hash: String,
    pub size: i64,
    pub chunks: Vec<(String, i64, i64)>,
}

/// Chunk rows located per statement (three parameters per row, and the pack). Small: SQLite
/// finds each `$N` by a scan of the statement's parameters, so a statement of n parameters
/// costs n² to bind (a sixth of the database thread's time in a first push, at 200 rows).
const LOCATE_BATCH: usize = 64;

impl Metadata {
    /// Announce that the pack `hash` of `size` bytes is about to be written: garbage
    /// collection leaves its object alone for the claim lifetime from now. Call it before
    /// writing the object, and locate its chunks ([`Metadata::locate_chunks`], or the
    /// pack given to [`Metadata::insert_nar_for_pack`]) within that lifetime. Committed at
    /// once.
    pub async fn claim_pack(&self, hash: &str, size: i64) -> Result<()> {
        let now = now_unix();
        let mut tx = self.pool.begin().await?;
        let inserted: Option<i64> = sqlx::query_scalar(
            "INSERT INTO packs (pack_hash, file_size, created_at, writers, unused) \
             VALUES ($1, $2, $3, 1, 1) ON CONFLICT (pack_hash) DO NOTHING RETURNING file_size",
        )
        .bind(hash)
        .bind(size)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        match inserted {
            Some(bytes) => sizes::count_chunk_bytes(&mut tx, bytes).await?,
            None => {
                sqlx::query(
                    "UPDATE packs SET created_at = $2, writers = writers + 1 WHERE pack_hash = $1",
                )
                .bind(hash)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Locate, in one transaction, those of `pack`'s chunks whose rows are not located (the
    /// others keep where they are).
    pub async fn locate_chunks(&self, pack: &Pack) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        locate(&mut tx, pack).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Packs that garbage collection found less than half used, at most `limit`, with their
    /// sizes.
    pub async fn packs_to_compact(&self, limit: i64) -> Result<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT pack_hash, file_size FROM packs WHERE unused = 2 ORDER BY pack_hash LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The chunks located in the pack `hash`, in the pack's order.
    pub async fn pack_chunks(&self, hash: &str) -> Result<Vec<super::ChunkRow>> {
        Ok(sqlx::query_as(
            "SELECT chunk_hash, file_size, pack, pack_offset FROM chunks WHERE pack = $1 \
             ORDER BY pack_offset",
        )
        .bind(hash)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Move the chunks of `new` (a pack claimed and written by compaction) out of the pack
    /// `old`, in one transaction: a chunk no longer in `old` (collected meanwhile) is left
    /// alone. `old` is then collected when nothing is located in it any more, once the claim
    /// lifetime has passed (it counts as being written until then), so that downloads that
    /// looked its chunks up before the move can still read them.
    pub async fn relocate_chunks(&self, old: &str, new: &Pack) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let mut sorted: Vec<&(String, i64, i64)> = new.chunks.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        for batch in sorted.chunks(LOCATE_BATCH) {
            let n = batch.len();
            let case = (0..n)
                .map(|i| format!("WHEN ${} THEN ${}", 3 + 2 * i, 4 + 2 * i))
                .collect::<Vec<_>>()
                .join(" ");
            let ids = (0..n)
                .map(|i| format!("${}", 3 + 2 * i))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "UPDATE chunks SET pack = $1, pack_offset = CASE chunk_hash {case} END \
                 WHERE pack = $2 AND chunk_hash IN ({ids})"
            );
            let mut q = sqlx::query(&sql).bind(&new.hash).bind(old);
            for (id, offset, _) in batch {
                q = q.bind(id).bind(*offset);
            }
            q.execute(&mut *tx).await?;
        }
        locate(
            &mut tx,
            &Pack {
                chunks: Vec::new(),
                ..new.clone()
            },
        )
        .await?;
        sqlx::query(
            "UPDATE packs SET unused = CASE WHEN EXISTS \
             (SELECT 1 FROM chunks c WHERE c.pack = $1) THEN 0 ELSE 1 END, \
             writers = writers + 1, created_at = $2 WHERE pack_hash = $1",
        )
        .bind(old)
        .bind(now_unix())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Forget where the chunk `chunk_hash` is (fsck's repair of a chunk whose stored bytes are
    /// missing or damaged): the next upload of it stores it again. The NARs that use it stay
    /// damaged until unpublished.
    pub async fn unlocate_chunk(&self, chunk_hash: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        // Of its own object: its bytes leave `store_sizes` (the caller deletes the object).
        let own: Vec<i64> = sqlx::query_scalar(
            "UPDATE chunks SET pack = '' WHERE chunk_hash = $1 AND pack IS NULL \
             RETURNING file_size",
        )
        .bind(chunk_hash)
        .fetch_all(&mut *tx)
        .await?;
        let pack: Option<String> =
            sqlx::query_scalar("SELECT pack FROM chunks WHERE chunk_hash = $1 AND pack <> ''")
                .bind(chunk_hash)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(pack) = pack {
            sqlx::query("UPDATE chunks SET pack = '' WHERE chunk_hash = $1")
                .bind(chunk_hash)
                .execute(&mut *tx)
                .await?;
            // Collected once nothing else is located in it.
            sqlx::query(
                "UPDATE packs SET unused = 1 WHERE pack_hash = $1 AND NOT EXISTS \
                 (SELECT 1 FROM chunks c WHERE c.pack = $1)",
            )
            .bind(&pack)
            .execute(&mut *tx)
            .await?;
        }
        sizes::count_chunk_bytes(&mut tx, -own.iter().sum::<i64>()).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Locate `pack`'s chunks whose rows are not located, in hash order (as claims lock them),
/// and mark the pack used or not. Fails if the pack's row is gone (collected: the upload took
/// longer than the claim lifetime), which rolls the caller's transaction back.
pub(super) async fn locate(tx: Tx<'_, '_>, pack: &Pack) -> Result<()> {
    let mut sorted: Vec<&(String, i64, i64)> = pack.chunks.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted.dedup_by(|a, b| a.0 == b.0);
    for batch in batches(&sorted, LOCATE_BATCH) {
        let n = batch.len();
        // $1 the pack; then per row: id, offset, size.
        let case = |col: usize| {
            (0..n)
                .map(|i| format!("WHEN ${} THEN ${}", 2 + 3 * i, 2 + 3 * i + col))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let ids = (0..n)
            .map(|i| format!("${}", 2 + 3 * i))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "UPDATE chunks SET pack = $1, \
             pack_offset = CASE chunk_hash {} END, file_size = CASE chunk_hash {} END \
             WHERE pack = '' AND chunk_hash IN ({ids})",
            case(1),
            case(2)
        );
        let mut q = sqlx::query(&sql).bind(&pack.hash);
        for (id, offset, size) in batch {
            q = q.bind(id).bind(*offset).bind(*size);
        }
        q.execute(&mut **tx).await?;
    }
    let marked = sqlx::query(
        "UPDATE packs SET unused = CASE WHEN EXISTS \
         (SELECT 1 FROM chunks c WHERE c.pack = $1) THEN 0 ELSE 1 END, \
         writers = CASE WHEN writers > 0 THEN writers - 1 ELSE 0 END WHERE pack_hash = $1",
    )
    .bind(&pack.hash)
    .execute(&mut **tx)
    .await?;
    if marked.rows_affected() == 0 {
        return Err(MetaError::Corrupt {
            field: "packs.pack_hash (collected before its chunks were located: the upload \
                    outlived the claim lifetime)",
            value: pack.hash.clone(),
        });
    }
    Ok(())
}

/// Make the rows of `hashes` that are not located chunks of their own objects (a caller that
/// stored them so, see [`Metadata::insert_nar_for_upload`]). Returns their bytes, which now
/// count in `store_sizes` ([`sizes::count_chunk_bytes`]).
pub(super) async fn settle_unlocated(tx: Tx<'_, '_>, hashes: &[&str]) -> Result<i64> {
    let mut added = 0i64;
    for batch in hashes.chunks(IN_BATCH) {
        let sql = format!(
            "UPDATE chunks SET pack = NULL WHERE pack = '' AND chunk_hash IN ({}) \
             RETURNING file_size",
            placeholders(1, batch.len())
        );
        let mut q = sqlx::query_scalar::<_, i64>(&sql);
        for h in batch {
            q = q.bind(*h);
        }
        added += q.fetch_all(&mut **tx).await?.into_iter().sum::<i64>();
    }
    Ok(added)
}
