//! Published store paths and the NARs they serve: NAR and chunk rows, the object keys they
//! name, publishing a path (atomically, with its references checked), looking paths and NARs
//! up, and the build logs stored beside them.

use std::collections::{BTreeSet, HashSet};

use larder_nix::compression::Compression;
use larder_nix::hash::Sha256;
use larder_nix::signing::Signature;
use larder_nix::store_path::StorePath;
use sqlx::FromRow;

use super::columns::{refs_text, sigs_text, Stored};
use super::{
    decoding, decoding_with_nar, now_unix, placeholders, retry, Engine, Metadata, Result,
    FOREIGN_KEY, IN_BATCH, TX_ATTEMPTS,
};

/// A stored NAR file: the NAR's hash and size, and the stored (compressed) file's.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct NarRow {
    #[sqlx(rename = "nar_id")]
    pub id: i64,
    #[sqlx(try_from = "Stored<Sha256>")]
    pub nar_hash: Sha256,
    pub nar_size: i64,
    #[sqlx(try_from = "Stored<Compression>")]
    pub compression: Compression,
    /// SHA-256 of the stored (compressed) file.
    #[sqlx(try_from = "Stored<Sha256>")]
    pub file_hash: Sha256,
    pub file_size: i64,
}

/// One stored chunk of a NAR file: an independently decompressible frame.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct ChunkRow {
    /// The chunk's id, which also names its object (see [`ChunkName`]): the nix32 SHA-256 of
    /// its stored bytes (a NAR file stored whole or a multi-part upload's part, before
    /// content-defined chunking), or `<nix32>.zst`, the SHA-256 of its uncompressed bytes (a
    /// content-defined chunk, stored as one canonical zstd frame).
    pub chunk_hash: String,
    /// Stored (compressed) size in bytes.
    pub file_size: i64,
    /// Where the chunk's bytes are: `None`, its own object ([`chunk_object_key`], as every
    /// chunk was stored before packs); `Some("")`, nowhere yet (a row an upload created and
    /// has not located: no NAR uses such a row); otherwise the pack (see [`pack_object_key`])
    /// holding it at `pack_offset`.
    pub pack: Option<String>,
    pub pack_offset: Option<i64>,
}

impl ChunkRow {
    /// A chunk of `file_size` stored bytes, with no pack: how a caller names chunks to claim
    /// and record (those take only the id and the size; where a chunk is comes from a
    /// [`crate::meta::Pack`], or is its own object).
    pub fn new(chunk_hash: String, file_size: i64) -> Self {
        ChunkRow {
            chunk_hash,
            file_size,
            pack: None,
            pack_offset: None,
        }
    }

    /// The object holding the chunk, and the chunk's bytes in it.
    pub fn location(&self) -> (String, std::ops::Range<u64>) {
        let len = self.file_size as u64;
        match self.pack.as_deref() {
            Some(pack) if !pack.is_empty() => {
                let at = self.pack_offset.unwrap_or(0) as u64;
                (pack_object_key(pack), at..at + len)
            }
            _ => (chunk_object_key(&self.chunk_hash), 0..len),
        }
    }
}

/// Chunks stored one after another in one object (a pack, or a chunk's own object): the
/// object, the bytes they occupy in it, and their positions in the list they came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub key: String,
    pub range: std::ops::Range<u64>,
    pub chunks: std::ops::Range<usize>,
}

/// `chunks`, in order, as runs of at most `max` bytes each (a chunk larger than `max` is a run
/// of its own): what a reader of every chunk reads in one request per run.
pub fn runs(chunks: &[ChunkRow], max: u64) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let (key, range) = c.location();
        match out.last_mut() {
            Some(run)
                if run.key == key
                    && run.range.end == range.start
                    && range.end - run.range.start <= max =>
            {
                run.range.end = range.end;
                run.chunks.end = i + 1;
            }
            _ => out.push(Run {
                key,
                range,
                chunks: i..i + 1,
            }),
        }
    }
    out
}

/// The object of a pack: the frames of chunks an upload stored together, named by the
/// nix32 SHA-256 of its bytes (so a pack holding exactly a NAR's file is named by its
/// FileHash).
pub fn pack_object_key(pack_hash: &str) -> String {
    let prefix = pack_hash.get(..2).unwrap_or("00");
    format!("pack/{prefix}/{pack_hash}")
}

/// The pack hash that `key` names, if `key` is exactly a pack's object key: the inverse of
/// [`pack_object_key`].
pub fn pack_hash_of_key(key: &str) -> Option<&str> {
    let hash = key.strip_prefix("pack/")?.get(3..)?;
    let valid = matches!(ChunkName::parse(hash), Some(ChunkName::Stored(_)));
    (valid && pack_object_key(hash) == key).then_some(hash)
}

/// The object holding the `.ls` listing (JSON) of the NAR with this NarHash, written when the
/// NAR is stored and deleted by garbage collection with the NAR's row.
pub fn listing_object_key(nar_hash: &Sha256) -> String {
    listing_key(&nar_hash.to_nix32())
}

/// [`listing_object_key`] of a NarHash as stored (nix32): garbage collection deletes the
/// listing of a NAR row whatever that row holds.
pub(super) fn listing_key(nar_hash: &str) -> String {
    let prefix = nar_hash.get(..2).unwrap_or("00");
    format!("ls/{prefix}/{nar_hash}")
}

/// What a chunk id says its object's bytes hash to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkName {
    /// The SHA-256 of the object's bytes as stored.
    Stored(Sha256),
    /// The SHA-256 of the bytes the object (one zstd frame) decompresses to.
    Zstd(Sha256),
}

impl ChunkName {
    /// Parse a chunk id; `None` if it is of neither form.
    pub fn parse(id: &str) -> Option<Self> {
        let (hash, zstd) = match id.strip_suffix(CDC_SUFFIX) {
            Some(h) => (h, true),
            None => (id, false),
        };
        if hash.len() != 52 {
            return None;
        }
        let h = Sha256::from_bytes(larder_nix::nixbase32::decode_fixed::<32>(hash).ok()?);
        Some(if zstd {
            ChunkName::Zstd(h)
        } else {
            ChunkName::Stored(h)
        })
    }
}

/// The suffix of content-defined chunks' ids (and object keys).
const CDC_SUFFIX: &str = ".zst";

/// The id of the content-defined chunk whose uncompressed bytes hash to `raw_hash`.
pub fn cdc_chunk_id(raw_hash: &Sha256) -> String {
    format!("{}{CDC_SUFFIX}", raw_hash.to_nix32())
}

pub fn chunk_object_key(chunk_hash: &str) -> String {
    let prefix = chunk_hash.get(..2).unwrap_or("00");
    format!("chunk/{prefix}/{chunk_hash}")
}

/// The chunk id that `key` names, if `key` is exactly the object key of a chunk
/// (`chunk/<first two characters>/<id>`, the id of either form of [`ChunkName`]): the inverse
/// of [`chunk_object_key`].
pub fn chunk_hash_of_key(key: &str) -> Option<&str> {
    let hash = key.strip_prefix("chunk/")?.get(3..)?;
    let valid = ChunkName::parse(hash).is_some();
    (valid && chunk_object_key(hash) == key).then_some(hash)
}

/// A published store path, as a narinfo serves it.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct PathRow {
    pub id: i64,
    pub cache_id: i64,
    #[sqlx(rename = "basename", try_from = "Stored<StorePath>")]
    pub store_path: StorePath,
    /// In the order they were published.
    #[sqlx(try_from = "Stored<Vec<StorePath>>")]
    pub refs: Vec<StorePath>,
    #[sqlx(try_from = "Stored<Option<StorePath>>")]
    pub deriver: Option<StorePath>,
    pub ca: Option<String>,
    #[sqlx(try_from = "Stored<Vec<Signature>>")]
    pub sigs: Vec<Signature>,
    pub created_at: i64,
    /// The upstream cache it was fetched from (pull-through); `None`: pushed.
    pub upstream: Option<String>,
    #[sqlx(flatten)]
    pub nar: NarRow,
}

#[derive(Debug, Clone)]
pub struct NewPath {
    pub cache_id: i64,
    pub store_path: StorePath,
    pub refs: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub ca: Option<String>,
    pub sigs: Vec<Signature>,
    pub nar_id: i64,
    /// References accepted without being in the cache: their metadata carried a valid
    /// signature by a trusted upstream key, so Nix gets them from upstream.
    pub upstream_refs: Vec<StorePath>,
    /// The upstream cache URL it was fetched from (pull-through); `None`: pushed.
    pub upstream: Option<String>,
}

impl NewPath {
    /// Its references, other than itself, that are neither in `present` (basenames of
    /// published paths) nor vouched for upstream.
    pub(super) fn missing_refs(&self, present: &HashSet<String>) -> Vec<StorePath> {
        (self.refs.iter())
            .filter(|r| {
                **r != self.store_path
                    && !present.contains(&r.basename())
                    && !self.upstream_refs.contains(r)
            })
            .cloned()
            .collect()
    }
}

/// What happened when publishing a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Publish {
    Created,
    /// The same store path with the same NAR was already there (idempotent re-upload).
    AlreadyPresent,
    /// The store path exists with a different NAR hash (given here); nothing was changed.
    Conflict {
        existing_nar_hash: Sha256,
    },
    /// These references are not published in the cache; nothing was stored.
    MissingReferences(Vec<StorePath>),
}

/// The hash parts of `refs` (basenames), other than `own_hash`, deduplicated.
pub(crate) fn ref_hashes<'a>(
    own_hash: &str,
    refs: impl Iterator<Item = &'a str>,
) -> BTreeSet<&'a str> {
    refs.filter_map(|r| r.get(..32))
        .filter(|h| *h != own_hash)
        .collect()
}

/// The columns a [`NarRow`] reads, from `nars n`.
pub(super) const NAR_COLS: &str =
    "n.id AS nar_id, n.nar_hash, n.nar_size, n.compression, n.file_hash, n.file_size";
/// The names of the columns of `nars` that rows joined with a NAR read.
pub(super) const NAR_COLUMNS: &[&str] = &[
    "nar_id",
    "nar_hash",
    "nar_size",
    "compression",
    "file_hash",
    "file_size",
];

/// Which of the paths `hashes` (hash parts) `cache_id` publishes, as basenames, in a
/// transaction publishing paths that refer to them. On PostgreSQL they are share-locked, so a
/// concurrent eviction deleting one either waits for this transaction (and then sees the new
/// referrer and gives up) or has already deleted it (and the reference counts as missing).
/// SQLite serialises writers, which gives the same guarantee.
pub(super) async fn published_refs(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    engine: Engine,
    cache_id: i64,
    hashes: &[String],
) -> Result<HashSet<String>> {
    let lock = match engine {
        Engine::Postgres => " FOR SHARE",
        Engine::Sqlite => "",
    };
    let mut present = HashSet::new();
    for batch in hashes.chunks(IN_BATCH) {
        let sql = format!(
            "SELECT hash || '-' || name FROM paths WHERE cache_id = $1 AND hash IN ({}){lock}",
            placeholders(2, batch.len())
        );
        let mut q = sqlx::query_scalar::<_, String>(&sql).bind(cache_id);
        for h in batch {
            q = q.bind(h);
        }
        present.extend(q.fetch_all(&mut **tx).await?);
    }
    Ok(present)
}

impl Metadata {
    /// The NAR whose stored file has `file_hash`, if `cache_id` publishes a path using it.
    pub async fn cache_nar_by_file_hash(
        &self,
        cache_id: i64,
        file_hash: &Sha256,
    ) -> Result<Option<NarRow>> {
        let sql = format!(
            "SELECT {NAR_COLS} FROM nars n WHERE n.file_hash = $1 AND EXISTS \
             (SELECT 1 FROM paths p WHERE p.cache_id = $2 AND p.nar_id = n.id)"
        );
        sqlx::query_as(&sql)
            .bind(file_hash.to_nix32())
            .bind(cache_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(decoding("nars"))
    }

    /// The chunks of a NAR, in order.
    pub async fn nar_chunks(&self, nar_id: i64) -> Result<Vec<ChunkRow>> {
        // SQLite: a direct read when a read connection is free (see `meta/fast.rs`).
        if let Some(found) = self.fast.as_ref().and_then(|f| f.nar_chunks(nar_id)) {
            return found;
        }
        sqlx::query_as(
            "SELECT c.chunk_hash, c.file_size, c.pack, c.pack_offset FROM nar_chunks nc \
             JOIN chunks c ON c.chunk_hash = nc.chunk_hash WHERE nc.nar_id = $1 ORDER BY nc.seq",
        )
        .bind(nar_id)
        .fetch_all(&self.pool)
        .await
        .map_err(decoding("chunks"))
    }

    pub async fn get_path(&self, cache_id: i64, hash: &str) -> Result<Option<PathRow>> {
        // The embedded default knows without a read that most absent paths are absent
        // (`meta/present.rs`).
        if !self.may_hold(cache_id, hash) {
            return Ok(None);
        }
        // SQLite: a direct read when a read connection is free (see `meta/fast.rs`).
        if let Some(found) = self.fast.as_ref().and_then(|f| f.get_path(cache_id, hash)) {
            return found;
        }
        let sql = format!(
            "SELECT p.id, p.cache_id, p.hash || '-' || p.name AS basename, p.refs, p.deriver, \
             p.ca, p.sigs, p.created_at, p.upstream, {NAR_COLS} FROM paths p JOIN nars n ON n.id = p.nar_id \
             WHERE p.cache_id = $1 AND p.hash = $2"
        );
        sqlx::query_as(&sql)
            .bind(cache_id)
            .bind(hash)
            .fetch_optional(&self.pool)
            .await
            .map_err(decoding_with_nar("paths"))
    }

    /// The row id of the path `hash` of `cache_id`, if published: an index-only read, for
    /// confirming that a narinfo remembered from an earlier read is still the published one.
    /// Ids are never reused (an `AUTOINCREMENT` key, a PostgreSQL sequence), so a path
    /// deleted and published again has another.
    pub async fn path_id(&self, cache_id: i64, hash: &str) -> Result<Option<i64>> {
        if !self.may_hold(cache_id, hash) {
            return Ok(None);
        }
        if let Some(found) = self.fast.as_ref().and_then(|f| f.path_id(cache_id, hash)) {
            return found;
        }
        Ok(
            sqlx::query_scalar("SELECT id FROM paths WHERE cache_id = $1 AND hash = $2")
                .bind(cache_id)
                .bind(hash)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Which of `hashes` (32-character hash parts) the cache does not publish, in input order.
    pub async fn missing_hashes(&self, cache_id: i64, hashes: &[String]) -> Result<Vec<String>> {
        let mut present = std::collections::HashSet::new();
        // Those the filter of published paths rules out are not asked for (`meta/present.rs`).
        let maybe: Vec<&String> = hashes
            .iter()
            .filter(|h| self.may_hold(cache_id, h))
            .collect();
        for batch in maybe.chunks(IN_BATCH) {
            let sql = format!(
                "SELECT hash FROM paths WHERE cache_id = $1 AND hash IN ({})",
                placeholders(2, batch.len())
            );
            let mut q = sqlx::query_scalar::<_, String>(&sql).bind(cache_id);
            for h in batch {
                q = q.bind(h);
            }
            present.extend(q.fetch_all(&self.pool).await?);
        }
        Ok(hashes
            .iter()
            .filter(|h| !present.contains(*h))
            .cloned()
            .collect())
    }

    /// Publish a path from a pending upload, atomically: the path row is created, its
    /// references are checked to be published in the same cache, and the upload is consumed,
    /// or nothing changes.
    pub async fn publish_path(&self, p: &NewPath, upload_id: &str) -> Result<Publish> {
        let hash = std::iter::once_with(|| p.store_path.hash_part());
        let _publishing = self.publishing(p.cache_id, hash).await;
        let mut attempt = 1;
        loop {
            match retry(FOREIGN_KEY, || self.publish_path_once(p, upload_id)).await? {
                Some(done) => return Ok(done),
                // The row that stopped the insert was deleted (an eviction) before it could be
                // read: nothing conflicts any more, so publish again.
                None if attempt < TX_ATTEMPTS => attempt += 1,
                None => return Err(sqlx::Error::RowNotFound.into()),
            }
        }
    }

    /// One attempt of [`Metadata::publish_path`]; `None` if the path that stopped it vanished
    /// before it could be read.
    async fn publish_path_once(&self, p: &NewPath, upload_id: &str) -> Result<Option<Publish>> {
        let hash = p.store_path.hash_part();
        let mut tx = self.pool.begin().await?;
        // The write comes first so that SQLite takes its write lock at once (a deferred
        // transaction that reads first can fail to upgrade under concurrency).
        let new_id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO paths (cache_id, hash, name, nar_id, refs, deriver, ca, sigs, \
             created_at, upstream) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (cache_id, hash) DO NOTHING RETURNING id",
        )
        .bind(p.cache_id)
        .bind(&hash)
        .bind(p.store_path.name())
        .bind(p.nar_id)
        .bind(refs_text(&p.refs))
        .bind(p.deriver.as_ref().map(StorePath::basename))
        .bind(&p.ca)
        .bind(sigs_text(&p.sigs))
        .bind(now_unix())
        .bind(&p.upstream)
        .fetch_optional(&mut *tx)
        .await?;
        if new_id.is_none() {
            let existing: Option<Stored<Sha256>> = sqlx::query_scalar(
                "SELECT n.nar_hash FROM paths p JOIN nars n ON n.id = p.nar_id \
                 WHERE p.cache_id = $1 AND p.hash = $2",
            )
            .bind(p.cache_id)
            .bind(&hash)
            .fetch_optional(&mut *tx)
            .await
            .map_err(decoding("nars"))?;
            let nar_hash: Option<Stored<Sha256>> =
                sqlx::query_scalar("SELECT nar_hash FROM nars WHERE id = $1")
                    .bind(p.nar_id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(decoding("nars"))?;
            tx.rollback().await?;
            return Ok(match existing {
                Some(Stored(e)) if Some(e) == nar_hash.map(|h| h.0) => {
                    Some(Publish::AlreadyPresent)
                }
                Some(Stored(e)) => Some(Publish::Conflict {
                    existing_nar_hash: e,
                }),
                None => None,
            });
        }
        let wanted: Vec<String> = p
            .refs
            .iter()
            .filter(|r| **r != p.store_path)
            .map(StorePath::hash_part)
            .collect();
        let present = published_refs(&mut tx, self.engine, p.cache_id, &wanted).await?;
        let missing = p.missing_refs(&present);
        if !missing.is_empty() {
            tx.rollback().await?;
            return Ok(Some(Publish::MissingReferences(missing)));
        }
        let ref_hashes: BTreeSet<String> = wanted.into_iter().collect();
        for r in ref_hashes {
            sqlx::query(
                "INSERT INTO path_refs (cache_id, referrer, ref_hash) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(p.cache_id)
            .bind(&hash)
            .bind(r)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("DELETE FROM uploads WHERE cache_id = $1 AND id = $2")
            .bind(p.cache_id)
            .bind(upload_id)
            .execute(&mut *tx)
            .await?;
        super::sizes::count_paths(&mut tx, p.cache_id, &[p.nar_id], 1).await?;
        tx.commit().await?;
        Ok(Some(Publish::Created))
    }

    pub async fn put_log(
        &self,
        cache_id: i64,
        drv: &str,
        object_key: &str,
        size: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO logs (cache_id, drv, object_key, size, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (cache_id, drv) DO UPDATE \
             SET object_key = excluded.object_key, size = excluded.size, \
             created_at = excluded.created_at",
        )
        .bind(cache_id)
        .bind(drv)
        .bind(object_key)
        .bind(size)
        .bind(now_unix())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_log(&self, cache_id: i64, drv: &str) -> Result<Option<(String, i64)>> {
        sqlx::query_as("SELECT object_key, size FROM logs WHERE cache_id = $1 AND drv = $2")
            .bind(cache_id)
            .bind(drv)
            .fetch_optional(&self.pool)
            .await
            .map_err(decoding("logs"))
    }

    /// The NAR served as `nar/<file_hash>…` in a cache: one a published path uses, or one of a
    /// path evicted at or after `evicted_since` (a narinfo naming it may still be cached).
    pub async fn servable_nar_by_file_hash(
        &self,
        cache_id: i64,
        file_hash: &Sha256,
        evicted_since: i64,
    ) -> Result<Option<NarRow>> {
        // SQLite: a direct read when a read connection is free (see `meta/fast.rs`).
        let fast = self.fast.as_ref();
        let hash = file_hash.to_nix32();
        if let Some(found) = fast.and_then(|f| f.servable_nar(cache_id, &hash, evicted_since)) {
            return found;
        }
        let sql = format!(
            "SELECT {NAR_COLS} FROM nars n WHERE n.file_hash = $1 AND (EXISTS \
             (SELECT 1 FROM paths p WHERE p.cache_id = $2 AND p.nar_id = n.id) OR EXISTS \
             (SELECT 1 FROM evicted_nars e WHERE e.cache_id = $2 AND e.nar_id = n.id \
             AND e.evicted_at >= $3))"
        );
        sqlx::query_as(&sql)
            .bind(hash)
            .bind(cache_id)
            .bind(evicted_since)
            .fetch_optional(&self.pool)
            .await
            .map_err(decoding("nars"))
    }
}
