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
//! Small NAR files of one object range are read whole in `binary_cache::small_body`;
//! everything else, a large file of one object included, is streamed here.

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

/// The body of `range` of the file whose object ranges are `whole` (in order, [`spans`] of
/// its chunks over the whole file), after checking every object holding one of them exists
/// (`ApiError::NotFound` if one does not).
pub async fn body(
    objects: &ObjectStore,
    nar_id: i64,
    whole: &[(String, Range<u64>)],
    range: Range<u64>,
) -> Result<Body, ApiError> {
    if !recently_checked(nar_id) {
        check_all(objects, whole).await?;
        mark_checked(nar_id);
    }
    Ok(Body::from_stream(stream(
        objects.clone(),
        nar_id,
        within(whole, range),
    )))
}

/// `ApiError::NotFound` unless every object of `spans` exists.
async fn check_all(objects: &ObjectStore, spans: &[(String, Range<u64>)]) -> Result<(), ApiError> {
    let mut keys: Vec<String> = spans.iter().map(|(key, _)| key.clone()).collect();
    keys.sort_unstable();
    keys.dedup();
    if let Some(key) = objects.first_missing(keys).await? {
        tracing::error!(%key, "a chunk of a published NAR is missing from the object store (hint: larder fsck)");
        return Err(ApiError::NotFound(key));
    }
    Ok(())
}

/// The object ranges that `range` of the file made of `chunks` covers, in order: a run of
/// chunks stored one after another in one object (a pack) is one range.
pub fn spans(chunks: &[ChunkRow], range: Range<u64>) -> Vec<(String, Range<u64>)> {
    let mut spans: Vec<(String, Range<u64>)> = Vec::new();
    let mut offset = 0u64;
    for c in chunks {
        let len = c.file_size as u64;
        let (start, end) = (offset, offset + len);
        offset = end;
        if end <= range.start || start >= range.end {
            continue;
        }
        let (key, at) = c.location();
        let from = at.start + (range.start.max(start) - start);
        let to = at.start + (range.end.min(end) - start);
        match spans.last_mut() {
            Some((k, r)) if *k == key && r.end == from => r.end = to,
            _ => spans.push((key, from..to)),
        }
    }
    spans
}

/// The object ranges that `range` of a file covers, given the object ranges of the whole file
/// (`whole`, in order: [`spans`] over all of it): what [`spans`] gives for `range`, without the
/// chunk list.
pub fn within(whole: &[(String, Range<u64>)], range: Range<u64>) -> Vec<(String, Range<u64>)> {
    let mut out = Vec::new();
    if range.is_empty() {
        return out;
    }
    let mut offset = 0u64;
    for (key, r) in whole {
        let (start, end) = (offset, offset + (r.end - r.start));
        offset = end;
        if end <= range.start || start >= range.end {
            continue;
        }
        let from = r.start + (range.start.max(start) - start);
        let to = r.start + (range.end.min(end) - start);
        out.push((key.clone(), from..to));
    }
    out
}

/// `spans` cut into pieces of at most [`BATCH_BYTES`].
fn pieces(spans: Vec<(String, Range<u64>)>) -> Vec<(String, Range<u64>)> {
    let mut out = Vec::with_capacity(spans.len());
    for (key, r) in spans {
        let mut at = r.start;
        while at < r.end {
            let to = r.end.min(at + BATCH_BYTES);
            out.push((key.clone(), at..to));
            at = to;
        }
    }
    out
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
    spans: Vec<(String, Range<u64>)>,
) -> BoxStream<'static, std::io::Result<Bytes>> {
    let body = futures::stream::iter(batches(pieces(spans)))
        .map(move |batch| {
            let objects = objects.clone();
            // A batch of pieces read in one go: on a local store, on this thread as far as
            // the page cache holds it, and at most one thread hop for the rest.
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
        ChunkRow::new(format!("{}{}", n, "0".repeat(51)), size)
    }

    fn packed(n: u8, size: i64, pack: &str, at: i64) -> ChunkRow {
        ChunkRow {
            pack: Some(pack.to_owned()),
            pack_offset: Some(at),
            ..chunk(n, size)
        }
    }

    #[test]
    fn ranges_map_onto_chunks() {
        let chunks = [chunk(1, 10), chunk(2, 5), chunk(3, 20)];
        let r: Vec<_> = spans(&chunks, 0..35).into_iter().map(|p| p.1).collect();
        assert_eq!(r, vec![0..10, 0..5, 0..20]);
        let r: Vec<_> = spans(&chunks, 12..16).into_iter().map(|p| p.1).collect();
        assert_eq!(r, vec![2..5, 0..1]);
        let r: Vec<_> = spans(&chunks, 34..35).into_iter().map(|p| p.1).collect();
        assert_eq!(r, vec![19..20]);
        assert!(spans(&chunks, 35..35).is_empty());
    }

    /// 45 bytes of file: two runs of pack `a` (the first returned) with a gap between them (a
    /// chunk stored elsewhere), then one of pack `b`.
    fn two_packs() -> (String, [ChunkRow; 5]) {
        let (a, b) = ("a".repeat(52), "b".repeat(52));
        let chunks = [
            packed(1, 10, &a, 0),
            packed(2, 5, &a, 10),
            chunk(3, 7),
            packed(4, 20, &a, 15),
            packed(5, 3, &b, 100),
        ];
        (a, chunks)
    }

    #[test]
    fn chunks_stored_together_are_one_span() {
        let (a, chunks) = two_packs();
        let got = spans(&chunks, 0..45);
        let pack_a = larder_store::meta::pack_object_key(&a);
        assert_eq!(got.len(), 4);
        assert_eq!(got[0], (pack_a.clone(), 0..15));
        assert_eq!(got[1].1, 0..7);
        assert_eq!(got[2], (pack_a.clone(), 15..35));
        assert_eq!(got[3].1, 100..103);
        // A range inside: offsets within the pack.
        assert_eq!(spans(&chunks, 3..12), vec![(pack_a.clone(), 3..12)]);
        // Long spans are read in pieces of a batch at most.
        let big = pieces(vec![(pack_a.clone(), 5..5 + 2 * BATCH_BYTES + 1)]);
        assert_eq!(big.len(), 3);
        assert_eq!(big[2].1.end - big[2].1.start, 1);
    }

    #[test]
    fn a_range_of_the_whole_files_spans_is_the_ranges_spans() {
        let (_, chunks) = two_packs();
        let whole = spans(&chunks, 0..45);
        // Every non-empty range (an empty one is never asked for: a request's range has a
        // byte at least).
        for start in 0..45 {
            for end in start + 1..=45 {
                assert_eq!(
                    within(&whole, start..end),
                    spans(&chunks, start..end),
                    "{start}..{end}"
                );
            }
        }
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
