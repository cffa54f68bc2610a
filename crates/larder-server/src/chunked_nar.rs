//! Serving a NAR file made of several chunks ([`crate::chunked`]): one stream, with the file's
//! Content-Length and any byte range, failing closed.
//!
//! Every chunk is checked to exist before the response starts, so a NAR missing one is an
//! error status (the caller answers 404, as for a missing single-object NAR), never a `200`
//! cut short. A chunk that then fails to read, or ends before its recorded length, ends the
//! body with an error: the connection is aborted, the client sees fewer bytes than the
//! Content-Length announced and its download fails (Nix then tries its next substituter or
//! builds), rather than a clean short body that a client could take for the whole file.
//!
//! The single-object path (most NARs) stays in `binary_cache::chunk_body`.

use std::ops::Range;

use axum::body::Body;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use larder_store::meta::ChunkRow;
use larder_store::{ObjectError, ObjectStore};

use crate::error::ApiError;

/// Chunk objects checked for existence at once.
const CHECK_CONCURRENCY: usize = 16;
/// Chunk objects opened ahead of the one being sent.
const OPEN_AHEAD: usize = 2;

/// The body of `range` of the file made of `chunks`, after checking every chunk exists
/// (`ApiError::NotFound` if one does not).
pub async fn body(
    objects: &ObjectStore,
    chunks: &[ChunkRow],
    range: Range<u64>,
) -> Result<Body, ApiError> {
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
    Ok(Body::from_stream(stream(objects.clone(), chunks, range)))
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
    chunks: &[ChunkRow],
    range: Range<u64>,
) -> BoxStream<'static, std::io::Result<Bytes>> {
    futures::stream::iter(pieces(chunks, range))
        .map(move |(key, r)| {
            let objects = objects.clone();
            async move {
                let want = r.end - r.start;
                let body = objects.get(&key, Some(r)).await.map_err(broken(&key))?;
                if body.len != want {
                    return Err(short(&key, body.len, want));
                }
                Ok(exactly(body.stream, key, want))
            }
        })
        .buffered(OPEN_AHEAD)
        .try_flatten()
        .boxed()
}

/// `inner`, failing if it ends before `want` bytes.
fn exactly(
    inner: BoxStream<'static, std::io::Result<Bytes>>,
    key: String,
    want: u64,
) -> BoxStream<'static, std::io::Result<Bytes>> {
    futures::stream::unfold(
        (inner, 0u64, false),
        move |(mut inner, sent, done)| {
            let key = key.clone();
            async move {
                if done {
                    return None;
                }
                match inner.next().await {
                    Some(Ok(block)) => {
                        let sent = sent + block.len() as u64;
                        Some((Ok(block), (inner, sent, false)))
                    }
                    Some(Err(e)) => {
                        tracing::error!(%key, error = %e, "reading a NAR chunk failed mid-body; aborting the response");
                        Some((Err(e), (inner, sent, true)))
                    }
                    None if sent < want => Some((Err(short(&key, sent, want)), (inner, sent, true))),
                    None => None,
                }
            }
        },
    )
    .boxed()
}

fn short(key: &str, got: u64, want: u64) -> std::io::Error {
    tracing::error!(%key, got, want, "a NAR chunk is shorter than recorded; aborting the response (hint: larder fsck)");
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        format!("chunk {key} ended after {got} of {want} bytes"),
    )
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
