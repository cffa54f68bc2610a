//! Serving a NAR file made of several chunks ([`crate::chunked`]): one stream, with the file's
//! Content-Length and any byte range, failing closed.
//!
//! Every chunk is checked to exist before the response starts, so a NAR missing one is an
//! error status (the caller answers 404, as for a missing single-object NAR), never a `200`
//! cut short. A NAR found whole is not checked again for [`CHECKED_FOR`] (a NAR fetched by
//! many clients, or by ranges, costs one check per chunk, not one per download: on S3 each is
//! a request); a failure while streaming forgets that, so the next download is checked. A chunk that then fails to read, or ends before its recorded length, ends the
//! body with an error: the connection is aborted, the client sees fewer bytes than the
//! Content-Length announced and its download fails (Nix then tries its next substituter or
//! builds), rather than a clean short body that a client could take for the whole file.
//!
//! The single-object path (most NARs) stays in `binary_cache::chunk_body`.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use larder_store::meta::ChunkRow;
use larder_store::{ObjectError, ObjectStore};

use crate::error::ApiError;

/// Chunk objects checked for existence at once.
const CHECK_CONCURRENCY: usize = 16;
/// Chunk pieces read ahead of the one being sent (on S3 each is a request: a few ahead hide
/// their latency). Each is at most a chunk (1 MiB compressed, at most), so a download holds
/// at most this many MiB.
const OPEN_AHEAD: usize = 3;
/// How long a NAR whose chunks were all found stays checked: a NAR downloaded again and
/// again (many clients, or ranges) is not checked chunk by chunk each time. A chunk lost
/// meanwhile still fails the download, by aborting it mid-body.
const CHECKED_FOR: Duration = Duration::from_secs(5);
/// NARs remembered as checked, at most (then all are forgotten at once).
const CHECKED_MAX: usize = 4096;

/// NAR ids whose chunks were all found, and when.
static CHECKED: Mutex<Option<HashMap<i64, Instant>>> = Mutex::new(None);

fn recently_checked(nar_id: i64) -> bool {
    let checked = CHECKED.lock().unwrap_or_else(|p| p.into_inner());
    checked
        .as_ref()
        .and_then(|m| m.get(&nar_id))
        .is_some_and(|t| t.elapsed() < CHECKED_FOR)
}

/// Forget that a NAR was checked: one of its chunks failed, so the next download checks
/// them all again (and is refused with a status rather than aborted).
fn forget_checked(nar_id: i64) {
    let mut checked = CHECKED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(m) = checked.as_mut() {
        m.remove(&nar_id);
    }
}

fn mark_checked(nar_id: i64) {
    let mut checked = CHECKED.lock().unwrap_or_else(|p| p.into_inner());
    let m = checked.get_or_insert_with(HashMap::new);
    if m.len() >= CHECKED_MAX {
        m.clear();
    }
    m.insert(nar_id, Instant::now());
}

/// The body of `range` of the file made of `chunks`, after checking every chunk exists
/// (`ApiError::NotFound` if one does not).
pub async fn body(
    objects: &ObjectStore,
    nar_id: i64,
    chunks: &[ChunkRow],
    range: Range<u64>,
) -> Result<Body, ApiError> {
    if !recently_checked(nar_id) {
        check_all(objects, chunks).await?;
        mark_checked(nar_id);
    }
    Ok(Body::from_stream(stream(
        objects.clone(),
        nar_id,
        chunks,
        range,
    )))
}

/// `ApiError::NotFound` unless every chunk's object exists.
async fn check_all(objects: &ObjectStore, chunks: &[ChunkRow]) -> Result<(), ApiError> {
    let missing = futures::stream::iter(chunks.iter().map(ChunkRow::object_key))
        .map(|key| async move {
            match objects.exists(&key).await {
                Ok(true) => Ok(None),
                Ok(false) => Ok(Some(key)),
                Err(e) => Err(e),
            }
        })
        .buffer_unordered(CHECK_CONCURRENCY)
        .try_filter_map(|m| std::future::ready(Ok(m)))
        .boxed()
        .try_next()
        .await?;
    if let Some(key) = missing {
        tracing::error!(%key, "a chunk of a published NAR is missing from the object store (hint: larder fsck)");
        return Err(ApiError::NotFound(key));
    }
    Ok(())
}

/// The pieces of `chunks` that `range` covers: object key and range within the object.
pub fn pieces(chunks: &[ChunkRow], range: Range<u64>) -> Vec<(String, Range<u64>)> {
    let mut parts = Vec::new();
    let mut offset = 0u64;
    for c in chunks {
        let len = c.file_size as u64;
        let (start, end) = (offset, offset + len);
        offset = end;
        if end <= range.start || start >= range.end {
            continue;
        }
        let from = range.start.max(start) - start;
        let to = range.end.min(end) - start;
        parts.push((c.object_key(), from..to));
    }
    parts
}

fn stream(
    objects: ObjectStore,
    nar_id: i64,
    chunks: &[ChunkRow],
    range: Range<u64>,
) -> BoxStream<'static, std::io::Result<Bytes>> {
    let body = futures::stream::iter(pieces(chunks, range))
        .map(move |(key, r)| {
            let objects = objects.clone();
            // Each piece read whole (at most a chunk, 1 MiB), a few ahead: one thread hop per
            // chunk on a local store, rather than several per chunk for a stream.
            async move { objects.read_range(&key, r).await.map_err(broken(&key)) }
        })
        .buffered(OPEN_AHEAD);
    body.inspect_err(move |_| forget_checked(nar_id)).boxed()
}

fn broken(key: &str) -> impl Fn(ObjectError) -> std::io::Error + '_ {
    move |e| {
        tracing::error!(%key, error = %e, "a NAR chunk cannot be read mid-body; aborting the response");
        std::io::Error::other(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8, size: i64) -> ChunkRow {
        ChunkRow {
            chunk_hash: format!("{}{}", n, "0".repeat(51)),
            file_size: size,
        }
    }

    #[test]
    fn ranges_map_onto_chunks() {
        let chunks = [chunk(1, 10), chunk(2, 5), chunk(3, 20)];
        let r: Vec<_> = pieces(&chunks, 0..35).into_iter().map(|p| p.1).collect();
        assert_eq!(r, vec![0..10, 0..5, 0..20]);
        let r: Vec<_> = pieces(&chunks, 12..16).into_iter().map(|p| p.1).collect();
        assert_eq!(r, vec![2..5, 0..1]);
        let r: Vec<_> = pieces(&chunks, 34..35).into_iter().map(|p| p.1).collect();
        assert_eq!(r, vec![19..20]);
        assert!(pieces(&chunks, 35..35).is_empty());
    }
}
