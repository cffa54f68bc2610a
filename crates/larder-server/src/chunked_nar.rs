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

/// Bytes of chunk pieces read in one batch (one thread hop on a local store: a hop per chunk
/// was half the CPU of a download). A batch is a little larger when its last piece crosses
/// the mark.
const BATCH_BYTES: u64 = 1 << 20;
/// Batches read ahead of the one being sent, so reading and sending overlap: a download
/// holds about (1 + this) × [`BATCH_BYTES`].
const READ_AHEAD: usize = 2;
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
    let keys = chunks.iter().map(ChunkRow::object_key).collect();
    if let Some(key) = objects.first_missing(keys).await? {
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

/// `pieces` grouped into consecutive batches of about [`BATCH_BYTES`] (a piece is never split).
fn batches(pieces: Vec<(String, Range<u64>)>) -> Vec<Vec<(String, Range<u64>)>> {
    let mut out: Vec<Vec<(String, Range<u64>)>> = Vec::new();
    let mut size = BATCH_BYTES;
    for piece in pieces {
        let len = piece.1.end - piece.1.start;
        if size + len > BATCH_BYTES {
            out.push(Vec::new());
            size = 0;
        }
        size += len;
        out.last_mut().expect("a batch was pushed").push(piece);
    }
    out
}

fn stream(
    objects: ObjectStore,
    nar_id: i64,
    chunks: &[ChunkRow],
    range: Range<u64>,
) -> BoxStream<'static, std::io::Result<Bytes>> {
    let body = futures::stream::iter(batches(pieces(chunks, range)))
        .map(move |batch| {
            let objects = objects.clone();
            // A batch of pieces read in one go: one thread hop per batch on a local store.
            async move { objects.read_pieces(batch).await.map_err(broken) }
        })
        .buffered(READ_AHEAD);
    body.inspect_err(move |_| forget_checked(nar_id)).boxed()
}

fn broken(e: ObjectError) -> std::io::Error {
    tracing::error!(error = %e, "a NAR chunk cannot be read mid-body; aborting the response");
    std::io::Error::other(e)
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

    #[test]
    fn batches_keep_the_order_and_split_near_the_mark() {
        let piece = |n: u64, len: u64| (format!("k{n}"), 0..len);
        let big = BATCH_BYTES / 3;
        let all: Vec<_> = (0..7).map(|n| piece(n, big)).collect();
        let got = batches(all.clone());
        assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 3, 1]);
        assert_eq!(got.concat(), all);
        assert!(batches(Vec::new()).is_empty());
        // A piece larger than a batch is a batch of its own, never split.
        let got = batches(vec![piece(0, 10), piece(1, 2 * BATCH_BYTES), piece(2, 10)]);
        assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1, 1]);
    }
}
