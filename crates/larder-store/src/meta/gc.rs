//! Garbage collection: forgetting expired uploads, claims and evicted NARs, then deleting the
//! NARs and chunks nothing refers to (their objects first), and orphaned chunk objects that no
//! row names.

use std::time::Duration;

use super::paths::listing_key;
use super::{
    chunk_object_key, now_unix, pack_object_key, placeholders, retry, retryable, Engine, MetaError,
    Metadata, Result, FOREIGN_KEY, IN_BATCH, TX_ATTEMPTS,
};

/// Deletes one object (by key) for [`Metadata::collect_garbage`] and
/// [`Metadata::delete_orphan_chunks`].
pub type DeleteObject<'a> = dyn Fn(
        String,
    ) -> futures::future::BoxFuture<
        'a,
        std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>,
    > + Send
    + Sync
    + 'a;

/// NARs and chunks deleted per garbage collection round (one transaction).
const GC_BATCH: usize = 256;

/// A NAR `n` no path, pending upload or path evicted within its grace uses.
const NAR_UNUSED: &str = "NOT EXISTS (SELECT 1 FROM paths p WHERE p.nar_id = n.id) AND \
     NOT EXISTS (SELECT 1 FROM uploads u WHERE u.nar_id = n.id) AND \
     NOT EXISTS (SELECT 1 FROM evicted_nars e WHERE e.nar_id = n.id)";

/// A chunk `c` no NAR uses and no upload claims.
const CHUNK_UNUSED: &str =
    "NOT EXISTS (SELECT 1 FROM nar_chunks nc WHERE nc.chunk_hash = c.chunk_hash) AND \
     NOT EXISTS (SELECT 1 FROM chunk_claims cc WHERE cc.chunk_hash = c.chunk_hash)";

/// Chunk hashes looked at per transaction of [`Metadata::delete_orphan_chunks`].
pub const ORPHAN_BATCH: usize = 256;
/// Objects one transaction of [`Metadata::delete_orphan_chunks`] deletes at once.
const ORPHAN_DELETE_CONCURRENCY: usize = 8;

impl Metadata {
    /// Forget pending uploads older than `max_upload_age_secs`, chunk claims older than
    /// `claim_ttl_secs`, NARs nothing refers to, and chunks no NAR and no claim uses; delete
    /// their objects with `delete_object`. Returns how many objects were deleted.
    ///
    /// Works in rounds of at most [`GC_BATCH`] NARs and chunks, each one transaction that
    /// deletes the objects *before* it commits, while the chunk rows are locked: an upload
    /// claiming one of those chunks ([`Metadata::claim_chunks`]) waits for the round, then
    /// writes the object again. If deleting an object fails, the round is rolled back (rows
    /// whose objects are gone are unreferenced, and are deleted again next time). A NAR or a
    /// chunk that gains a reference or a claim while a round decides it is garbage fails the
    /// round's foreign keys (never deleting anything in use), and the round runs again.
    ///
    /// The NAR of an evicted path stays for `evicted_grace_secs` after its eviction (see
    /// [`Metadata::evict_paths`]), so a narinfo served just before the eviction still works.
    pub async fn collect_garbage(
        &self,
        max_upload_age_secs: i64,
        evicted_grace_secs: i64,
        claim_ttl_secs: i64,
        delete_object: &DeleteObject<'_>,
    ) -> Result<usize> {
        // What decided these objects are garbage (an eviction, a deleted path) must survive a
        // power loss before any object goes: otherwise the database could come back with a
        // path whose NAR was deleted.
        if !self.make_durable().await? {
            return Ok(0); // the next collection tries again
        }
        let now = now_unix();
        let cutoffs = (
            now - max_upload_age_secs,
            now - evicted_grace_secs,
            now - claim_ttl_secs,
        );
        let mut deleted = 0;
        loop {
            let mut attempt = 1;
            let (nars, objects, rows) = loop {
                match self.gc_round(cutoffs, delete_object).await {
                    Err(e) if attempt < TX_ATTEMPTS && retryable(&e, FOREIGN_KEY) => {
                        tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
                        attempt += 1;
                    }
                    r => break r?,
                }
            };
            deleted += objects;
            // Rows forgotten (expired uploads, say) may have left NARs unused: another round
            // looks for them.
            if nars + objects + rows == 0 {
                return Ok(deleted);
            }
        }
    }

    /// Make every committed transaction durable; `false` if that could not be done now.
    ///
    /// PostgreSQL commits durably (`synchronous_commit`). SQLite runs in WAL mode with
    /// `synchronous = NORMAL`: a commit is atomic and consistent at once, but reaches the disk
    /// only at the next checkpoint, so an OS crash or power loss can undo the last
    /// transactions (uploads and publications a client was told succeeded, evictions; never
    /// half of one). Objects are written and `fsync`ed before the rows that name them commit,
    /// so an undone publication leaves an unreferenced object, which garbage collection
    /// deletes. The other way round needs this checkpoint: garbage collection deletes objects
    /// only after the rows that made them garbage are on disk.
    pub async fn make_durable(&self) -> Result<bool> {
        match self.engine {
            Engine::Postgres => Ok(true),
            Engine::Sqlite => {
                // FULL: waits (busy_timeout) for readers and writers, then syncs the WAL and
                // copies every frame into the database file.
                // The first column of its one row: 1 if it could not finish for a busy lock.
                let (busy, _, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(FULL)")
                    .fetch_one(&self.pool)
                    .await?;
                Ok(busy == 0)
            }
        }
    }

    /// One round of [`Metadata::collect_garbage`]: `(NARs, objects, rows)` deleted (rows:
    /// chunks, and expired uploads, evicted NARs and claims).
    ///
    /// The candidates are found first, outside the round's transaction: finding them reads
    /// every NAR and chunk (seconds at a million paths), and inside the transaction, whose
    /// first statement takes SQLite's write lock, every push waited for that read. The
    /// transaction checks again, by key, only the candidates, so what it deletes is unused
    /// as of its own snapshot, as before; one used since then fails the foreign keys.
    async fn gc_round(
        &self,
        (upload_cutoff, grace_cutoff, claim_cutoff): (i64, i64, i64),
        delete_object: &DeleteObject<'_>,
    ) -> Result<(usize, usize, usize)> {
        let nar_candidates: Vec<i64> = sqlx::query_scalar(&format!(
            "SELECT id FROM nars n WHERE {NAR_UNUSED} LIMIT {GC_BATCH}"
        ))
        .fetch_all(&self.pool)
        .await?;
        let chunk_candidates: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT chunk_hash FROM chunks c WHERE {CHUNK_UNUSED} LIMIT {GC_BATCH}"
        ))
        .fetch_all(&self.pool)
        .await?;
        let mut tx = self.pool.begin().await?;
        let mut expired = 0;
        for (sql, cutoff) in [
            ("DELETE FROM uploads WHERE created_at < $1", upload_cutoff),
            (
                "DELETE FROM evicted_nars WHERE evicted_at < $1",
                grace_cutoff,
            ),
            (
                "DELETE FROM chunk_claims WHERE claimed_at < $1",
                claim_cutoff,
            ),
        ] {
            let done = sqlx::query(sql).bind(cutoff).execute(&mut *tx).await?;
            expired += done.rows_affected() as usize;
        }
        // Decided once: the NARs deleted are exactly these, whatever commits meanwhile; one
        // referenced meanwhile fails the foreign keys of `paths`/`uploads` below.
        let doomed: Vec<(i64, String)> = if nar_candidates.is_empty() {
            Vec::new()
        } else {
            let sql = format!(
                "SELECT id, nar_hash FROM nars n WHERE id IN ({}) AND {NAR_UNUSED}",
                placeholders(1, nar_candidates.len())
            );
            let mut q = sqlx::query_as(&sql);
            for id in &nar_candidates {
                q = q.bind(id);
            }
            q.fetch_all(&mut *tx).await?
        };
        let nars: Vec<i64> = doomed.iter().map(|(id, _)| *id).collect();
        if !nars.is_empty() {
            let ph = placeholders(1, nars.len());
            for sql in [
                format!("DELETE FROM nar_chunks WHERE nar_id IN ({ph})"),
                format!("DELETE FROM nars WHERE id IN ({ph})"),
            ] {
                let mut q = sqlx::query(&sql);
                for id in &nars {
                    q = q.bind(id);
                }
                q.execute(&mut *tx).await?;
            }
        }
        // Chunks used by a NAR or claimed by an upload committed meanwhile fail the foreign
        // keys of `nar_chunks`/`chunk_claims`, like NARs above. Those the NARs above used are
        // candidates of the next round.
        let chunks: Vec<(String, i64, Option<String>)> = if chunk_candidates.is_empty() {
            Vec::new()
        } else {
            let sql = format!(
                "DELETE FROM chunks WHERE chunk_hash IN (SELECT c.chunk_hash FROM chunks c \
                 WHERE c.chunk_hash IN ({}) AND {CHUNK_UNUSED}) \
                 RETURNING chunk_hash, file_size, pack",
                placeholders(1, chunk_candidates.len())
            );
            let mut q = sqlx::query_as(&sql);
            for hash in &chunk_candidates {
                q = q.bind(hash);
            }
            q.fetch_all(&mut *tx).await?
        };
        let mut freed = 0i64;
        let mut deleted = 0;
        let mut packs: Vec<&str> = Vec::new();
        for (hash, size, pack) in &chunks {
            match pack.as_deref() {
                Some(pack) if !pack.is_empty() => {
                    packs.push(pack);
                    continue;
                }
                // Not located: no object of ours, but a database from before packs may have
                // left one.
                Some(_) => {}
                None => freed += size,
            }
            if let Err(e) = delete_object(chunk_object_key(hash)).await {
                tx.rollback().await?;
                return Err(MetaError::Cleanup(e));
            }
            deleted += 1;
        }
        packs.sort_unstable();
        packs.dedup();
        for batch in packs.chunks(IN_BATCH) {
            let sql = format!(
                "UPDATE packs SET unused = 1 WHERE pack_hash IN ({}) AND NOT EXISTS \
                 (SELECT 1 FROM chunks c WHERE c.pack = packs.pack_hash)",
                placeholders(1, batch.len())
            );
            let mut q = sqlx::query(&sql);
            for p in batch {
                q = q.bind(*p);
            }
            q.execute(&mut *tx).await?;
        }
        // Packs mostly dead: their live chunks are copied into a new pack by compaction
        // (`Metadata::packs_to_compact`), so what the store occupies follows what is used.
        for batch in packs.chunks(IN_BATCH) {
            let sql = format!(
                "UPDATE packs SET unused = 2 WHERE pack_hash IN ({}) AND unused = 0 AND \
                 2 * (SELECT COALESCE(SUM(c.file_size), 0) FROM chunks c \
                 WHERE c.pack = packs.pack_hash) < file_size",
                placeholders(1, batch.len())
            );
            let mut q = sqlx::query(&sql);
            for p in batch {
                q = q.bind(*p);
            }
            q.execute(&mut *tx).await?;
        }
        // Packs no chunk is located in that no upload is writing (one that claimed it longer
        // than the claim lifetime ago gave up; see `meta/packs.rs`). The conditions on the row
        // itself are repeated outside the sub-select so that PostgreSQL checks them again on a
        // row an upload's claim changed meanwhile.
        let dead: Vec<(String, i64)> = sqlx::query_as(&format!(
            "DELETE FROM packs WHERE unused = 1 AND (writers = 0 OR created_at < $1) AND \
             pack_hash IN (SELECT p.pack_hash FROM packs p WHERE p.unused = 1 AND \
             (p.writers = 0 OR p.created_at < $1) AND \
             NOT EXISTS (SELECT 1 FROM chunks c WHERE c.pack = p.pack_hash) LIMIT {GC_BATCH}) \
             RETURNING pack_hash, file_size"
        ))
        .bind(claim_cutoff)
        .fetch_all(&mut *tx)
        .await?;
        for (hash, size) in &dead {
            if let Err(e) = delete_object(pack_object_key(hash)).await {
                tx.rollback().await?;
                return Err(MetaError::Cleanup(e));
            }
            freed += size;
            deleted += 1;
        }
        // The NARs' listings. A NAR stored again meanwhile under the same hash finds its
        // listing missing and writes it again when it is first asked for.
        for (_, nar_hash) in &doomed {
            if let Err(e) = delete_object(listing_key(nar_hash)).await {
                tx.rollback().await?;
                return Err(MetaError::Cleanup(e));
            }
        }
        super::sizes::count_chunk_bytes(&mut tx, -freed).await?;
        tx.commit().await?;
        Ok((nars.len(), deleted, chunks.len() + expired))
    }

    /// Which of `hashes` have no `chunks` row, in input order. Read only, and stale as soon as
    /// it returns: a cheap filter before [`Metadata::delete_orphan_chunks`], which decides.
    pub async fn unknown_chunks(&self, hashes: &[String]) -> Result<Vec<String>> {
        self.unknown("SELECT chunk_hash FROM chunks WHERE chunk_hash", hashes)
            .await
    }

    /// Which of `hashes` have no `packs` row, in input order (like
    /// [`Metadata::unknown_chunks`], before [`Metadata::delete_orphan_packs`]).
    pub async fn unknown_packs(&self, hashes: &[String]) -> Result<Vec<String>> {
        self.unknown("SELECT pack_hash FROM packs WHERE pack_hash", hashes)
            .await
    }

    /// Those of `hashes` that `select … IN (…)` does not return, in input order.
    async fn unknown(&self, select: &str, hashes: &[String]) -> Result<Vec<String>> {
        let mut known = std::collections::HashSet::new();
        for batch in hashes.chunks(IN_BATCH) {
            let sql = format!("{select} IN ({})", placeholders(1, batch.len()));
            let mut q = sqlx::query_scalar::<_, String>(&sql);
            for h in batch {
                q = q.bind(h);
            }
            known.extend(q.fetch_all(&self.pool).await?);
        }
        Ok(hashes
            .iter()
            .filter(|h| !known.contains(*h))
            .cloned()
            .collect())
    }

    /// Delete the objects of the chunks among `hashes` that have no `chunks` row (orphans:
    /// objects the database does not know) with `delete_object`; returns those hashes.
    ///
    /// Race-free against uploads, by the pattern of [`Metadata::collect_garbage`]: per
    /// [`ORPHAN_BATCH`] hashes, one transaction inserts a row for each (`ON CONFLICT DO
    /// NOTHING`). The rows it inserted are exactly the orphans, and are locked by it: an upload
    /// claiming one of those chunks ([`Metadata::claim_chunks`]) waits. The objects are
    /// deleted, then the rows, then the transaction commits, and the waiting claim goes on to
    /// write its object again. If deleting an object fails, the transaction rolls back
    /// ([`MetaError::Cleanup`]).
    pub async fn delete_orphan_chunks(
        &self,
        hashes: &[String],
        delete_object: &DeleteObject<'_>,
    ) -> Result<Vec<String>> {
        // In hash order, like claims, so that the two cannot deadlock.
        let mut sorted: Vec<&str> = hashes.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut deleted = Vec::new();
        for batch in sorted.chunks(ORPHAN_BATCH) {
            // Deletes are idempotent: a batch that lost a race (deadlock, busy) runs again whole.
            deleted.extend(retry(&[], || self.delete_orphan_batch(batch, delete_object)).await?);
        }
        Ok(deleted)
    }

    async fn delete_orphan_batch(
        &self,
        batch: &[&str],
        delete_object: &DeleteObject<'_>,
    ) -> Result<Vec<String>> {
        use futures::{StreamExt, TryStreamExt};
        let mut tx = self.pool.begin().await?;
        let values = (0..batch.len())
            .map(|i| format!("(${}, 0, $1)", i + 2))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "INSERT INTO chunks (chunk_hash, file_size, created_at) VALUES {values} \
             ON CONFLICT (chunk_hash) DO NOTHING RETURNING chunk_hash"
        );
        let mut q = sqlx::query_scalar::<_, String>(&sql).bind(now_unix());
        for h in batch {
            q = q.bind(*h);
        }
        let orphans = q.fetch_all(&mut *tx).await?;
        if orphans.is_empty() {
            tx.rollback().await?;
            return Ok(orphans);
        }
        // The futures are made before they are streamed: a stream mapping through a closure
        // over borrowed items would make the caller's future not `Send` (rustc cannot prove it).
        let deletes: Vec<_> = orphans
            .iter()
            .map(|h| delete_object(chunk_object_key(h)))
            .collect();
        let deleted = futures::stream::iter(deletes)
            .buffer_unordered(ORPHAN_DELETE_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await;
        if let Err(e) = deleted {
            tx.rollback().await?;
            return Err(MetaError::Cleanup(e));
        }
        let sql = format!(
            "DELETE FROM chunks WHERE chunk_hash IN ({})",
            placeholders(1, orphans.len())
        );
        let mut q = sqlx::query(&sql);
        for h in &orphans {
            q = q.bind(h);
        }
        q.execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(orphans)
    }

    /// Delete the pack objects among `hashes` that have no `packs` row, like
    /// [`Metadata::delete_orphan_chunks`] (a row inserted for each locks it against an
    /// upload's [`Metadata::claim_pack`] while its object is deleted); returns those hashes.
    pub async fn delete_orphan_packs(
        &self,
        hashes: &[String],
        delete_object: &DeleteObject<'_>,
    ) -> Result<Vec<String>> {
        let mut sorted: Vec<&str> = hashes.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut deleted = Vec::new();
        for batch in sorted.chunks(ORPHAN_BATCH) {
            deleted
                .extend(retry(&[], || self.delete_orphan_pack_batch(batch, delete_object)).await?);
        }
        Ok(deleted)
    }

    async fn delete_orphan_pack_batch(
        &self,
        batch: &[&str],
        delete_object: &DeleteObject<'_>,
    ) -> Result<Vec<String>> {
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "INSERT INTO packs (pack_hash, file_size, created_at, writers, unused) VALUES {} \
             ON CONFLICT (pack_hash) DO NOTHING RETURNING pack_hash",
            (0..batch.len())
                .map(|i| format!("(${}, 0, 0, 0, 1)", i + 1))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut q = sqlx::query_scalar::<_, String>(&sql);
        for h in batch {
            q = q.bind(*h);
        }
        let orphans = q.fetch_all(&mut *tx).await?;
        for h in &orphans {
            if let Err(e) = delete_object(pack_object_key(h)).await {
                tx.rollback().await?;
                return Err(MetaError::Cleanup(e));
            }
        }
        for part in orphans.chunks(IN_BATCH) {
            let sql = format!(
                "DELETE FROM packs WHERE pack_hash IN ({})",
                placeholders(1, part.len())
            );
            let mut q = sqlx::query(&sql);
            for h in part {
                q = q.bind(h);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(orphans)
    }
}
