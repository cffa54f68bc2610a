//! Orphaned objects: chunk objects in the object store that no `chunks` row names, and pack
//! objects that no `packs` row names. Garbage
//! collection never sees them (it starts from rows); they are left behind by a database
//! restored from an older backup, an interrupted copy of objects, or a hand-made change.
//!
//! [`remove_orphans`] deletes the ones last modified before a cutoff (the caller's grace
//! period), in two streamed passes over the store's listing, so memory does not grow with the
//! number of objects:
//! 1. a census: how many chunk objects the database does not know. If that is most of them
//!    (more than half, and at least [`GUARD_MIN_UNKNOWN`]), the database is very likely not this
//!    store's (a wrong `database` or `storage`, one bucket shared by two deployments): nothing
//!    is deleted ([`OrphanError::MostlyUnknown`]).
//! 2. the deletion, per batch of old unknown chunks, by [`Metadata::delete_orphan_chunks`],
//!    which decides under lock (an upload claiming the same chunk meanwhile wins).
//!
//! Only keys exactly of a chunk's form (`chunk/<2>/<nix32 hash>`, see
//! [`crate::meta::chunk_hash_of_key`]) or a pack's (`pack/<2>/<nix32 hash>`) are looked at:
//! nothing else in the store is touched. (Packs are counted with chunks below.)

use std::collections::HashMap;
use std::time::SystemTime;

use futures::StreamExt;

use crate::meta::{chunk_hash_of_key, pack_hash_of_key, DeleteObject, MetaError, ORPHAN_BATCH};
use crate::objects::{ListedObject, ObjectError, ObjectStore};
use crate::Metadata;

/// The fewest unknown chunk objects that can stop a scan: a small store with a few orphans
/// (an interrupted upload's, say) is cleaned up even when they are most of it.
pub const GUARD_MIN_UNKNOWN: u64 = 10;

/// What a scan found and did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OrphanReport {
    /// Objects listed, of any kind.
    pub objects: u64,
    /// Of those, chunk and pack objects.
    pub chunks: u64,
    /// Chunk and pack objects without a row when the census looked.
    pub unknown: u64,
    /// Orphans deleted.
    pub deleted: u64,
    /// Their stored bytes.
    pub deleted_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum OrphanError {
    #[error("listing the object store failed")]
    List(#[source] ObjectError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(
        "{unknown} of the {chunks} chunk objects in the object store have no row in the \
         database; deleted nothing: the database is probably not this store's (a wrong \
         `database` or `storage`, or one bucket shared by two deployments)"
    )]
    MostlyUnknown { unknown: u64, chunks: u64 },
}

/// Delete the chunk objects that have no `chunks` row and were last modified before
/// `modified_before`, unless most chunk objects have no row (see the module docs).
pub async fn remove_orphans(
    meta: &Metadata,
    objects: &ObjectStore,
    modified_before: SystemTime,
) -> Result<OrphanReport, OrphanError> {
    let mut report = OrphanReport::default();
    let mut old_unknown = 0;
    let mut listing = objects.list_detailed().chunks(ORPHAN_BATCH);
    while let Some(batch) = listing.next().await {
        let (batch, packs) = chunk_objects(batch, &mut report)?;
        for (batch, unknown) in [
            (&batch, meta.unknown_chunks(&keys(&batch)).await?),
            (&packs, meta.unknown_packs(&keys(&packs)).await?),
        ] {
            for hash in unknown {
                report.unknown += 1;
                if batch
                    .get(&hash)
                    .is_some_and(|o| o.modified < modified_before)
                {
                    old_unknown += 1;
                }
            }
        }
    }
    if report.unknown >= GUARD_MIN_UNKNOWN && report.unknown * 2 > report.chunks {
        return Err(OrphanError::MostlyUnknown {
            unknown: report.unknown,
            chunks: report.chunks,
        });
    }
    if old_unknown == 0 {
        return Ok(report);
    }
    let delete: &DeleteObject<'_> = &|key| objects.delete_boxed(key);
    let mut listing = objects.list_detailed().chunks(ORPHAN_BATCH);
    let mut ignored = OrphanReport::default();
    while let Some(batch) = listing.next().await {
        let (mut batch, mut packs) = chunk_objects(batch, &mut ignored)?;
        batch.retain(|_, o| o.modified < modified_before);
        packs.retain(|_, o| o.modified < modified_before);
        let candidates = meta.unknown_chunks(&keys(&batch)).await?;
        if !candidates.is_empty() {
            for hash in meta.delete_orphan_chunks(&candidates, delete).await? {
                report.deleted += 1;
                report.deleted_bytes += batch.get(&hash).map_or(0, |o| o.size);
            }
        }
        let candidates = meta.unknown_packs(&keys(&packs)).await?;
        if !candidates.is_empty() {
            for hash in meta.delete_orphan_packs(&candidates, delete).await? {
                report.deleted += 1;
                report.deleted_bytes += packs.get(&hash).map_or(0, |o| o.size);
            }
        }
    }
    Ok(report)
}

type Listed = HashMap<String, ListedObject>;

fn keys(listed: &Listed) -> Vec<String> {
    listed.keys().cloned().collect()
}

/// The chunk objects and the pack objects of one batch of the listing, by hash, counting
/// what was listed.
fn chunk_objects(
    batch: Vec<Result<ListedObject, ObjectError>>,
    report: &mut OrphanReport,
) -> Result<(Listed, Listed), OrphanError> {
    let mut chunks = HashMap::new();
    let mut packs = HashMap::new();
    for listed in batch {
        let listed = listed.map_err(OrphanError::List)?;
        report.objects += 1;
        if let Some(hash) = chunk_hash_of_key(&listed.key) {
            report.chunks += 1;
            chunks.insert(hash.to_owned(), listed);
        } else if let Some(hash) = pack_hash_of_key(&listed.key) {
            report.chunks += 1;
            packs.insert(hash.to_owned(), listed);
        }
    }
    Ok((chunks, packs))
}
