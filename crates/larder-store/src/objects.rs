//! Object storage: immutable, content-addressed blobs (NAR chunks, build logs).
//!
//! Objects are written once under a key derived from their content and never modified, so a
//! reader can never observe a half-written object:
//! - [`fs`]: a local directory; an object is written into a temporary file, `fsync`ed and
//!   renamed into place.
//! - [`s3`]: any S3-compatible store (AWS S3, Garage, MinIO, …); an object is one `PUT`, or a
//!   multipart upload that S3 makes visible only when it is completed.
//!
//! Uploads are always verified in a local staging file first ([`ObjectStore::staging_dir`]),
//! then handed over with [`ObjectStore::put_file`]. Keys are validated here (`[a-z0-9/._-]`,
//! no `..`) for every backend, so that no caller can escape the object directory or name an
//! odd S3 key, whatever it passes.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

pub mod fs;
pub mod migrate;
pub mod s3;

pub use fs::FsObjects;
pub use s3::{S3Credentials, S3Objects, Secret};

/// Read size when streaming an object: large reads keep syscall and task overhead low.
const READ_CHUNK: usize = 256 * 1024;
/// Objects of one [`ObjectStore::put_many`] sent to S3 at once.
const S3_PUT_CONCURRENCY: usize = 8;
/// Object reads (or existence checks) of one [`ObjectStore::read_pieces`] (or
/// [`ObjectStore::first_missing`]) sent to S3 at once: each is a request, a few at once hide
/// their latency.
const S3_READ_CONCURRENCY: usize = 16;

/// `body` (of object `key`) read whole into memory, `capacity` bytes reserved.
async fn collect(
    key: &str,
    body: ObjectBody,
    capacity: usize,
) -> Result<bytes::BytesMut, ObjectError> {
    let mut out = bytes::BytesMut::with_capacity(capacity);
    let mut stream = body.stream;
    while let Some(piece) = stream.next().await {
        out.extend_from_slice(&piece.map_err(|source| ObjectError::Io {
            key: key.to_owned(),
            source,
        })?);
    }
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("invalid object key {0:?}")]
    InvalidKey(String),
    #[error("object {0:?} not found")]
    NotFound(String),
    #[error(
        "unsupported storage URL {0:?} (expected file:///path or s3://bucket?endpoint=…&region=…)"
    )]
    UnsupportedUrl(String),
    #[error("invalid storage URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// The store is configured wrongly (missing credentials, no such bucket, credentials
    /// rejected): retrying will not help.
    #[error("object store misconfigured: {0}")]
    Misconfigured(String),
    #[error("object storage I/O on {key:?}")]
    Io {
        key: String,
        #[source]
        source: std::io::Error,
    },
    /// A remote store could not be reached or failed to answer (after bounded retries): the
    /// request may succeed later.
    #[error("object store unavailable ({op} {key:?})")]
    Unavailable {
        op: &'static str,
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ObjectError {
    /// Whether the store is (temporarily) out of reach rather than the request being wrong.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, ObjectError::Unavailable { .. })
    }
}

/// A streamed object (or a range of it) with its length known up front.
pub struct ObjectBody {
    pub len: u64,
    pub stream: BoxStream<'static, std::io::Result<Bytes>>,
}

/// An object as a listing names it ([`ObjectStore::list_detailed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    pub key: String,
    /// Stored bytes.
    pub size: u64,
    /// When the object was written: the file's mtime, or S3's `Last-Modified`.
    pub modified: SystemTime,
}

/// What [`ObjectStore::open`] needs besides the URL.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Local directory for staging uploads when the store is remote (S3). A local store
    /// stages inside its own directory so that storing is a rename.
    pub staging_dir: PathBuf,
    /// S3 credentials; required for `s3://` URLs (the binary resolves them from the config
    /// file or the `AWS_*` environment variables). Never part of the URL, never logged.
    pub s3_credentials: Option<S3Credentials>,
}

/// The object store. An enum rather than a trait object: backends are few and known, and
/// native `async fn` keeps working without boxing every call.
#[derive(Debug, Clone)]
pub enum ObjectStore {
    Fs(FsObjects),
    S3(S3Objects),
}

impl ObjectStore {
    /// Open a store from its URL: `file:///abs/dir` (created if missing) or
    /// `s3://bucket[/prefix]?endpoint=URL&region=NAME[&addressing=path|virtual]`.
    pub fn open(url: &str, options: OpenOptions) -> Result<Self, ObjectError> {
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(ObjectError::UnsupportedUrl(url.to_owned()));
            }
            return Ok(ObjectStore::Fs(FsObjects::new(PathBuf::from(path))?));
        }
        if url.starts_with("s3://") {
            return Ok(ObjectStore::S3(S3Objects::open(url, options)?));
        }
        Err(ObjectError::UnsupportedUrl(url.to_owned()))
    }

    /// A directory for temporary files of in-flight uploads, on the same filesystem as the
    /// objects where possible so that publishing is a rename.
    pub fn staging_dir(&self) -> &Path {
        match self {
            ObjectStore::Fs(fs) => &fs.tmp,
            ObjectStore::S3(s3) => s3.staging_dir(),
        }
    }

    /// Store the complete file at `src` under `key`, consuming `src`. Atomic: the object is
    /// either absent or complete. Storing an existing key is a no-op (keys are content hashes).
    pub async fn put_file(&self, key: &str, src: &Path) -> Result<(), ObjectError> {
        check_key(key)?;
        match self {
            ObjectStore::Fs(fs) => fs.put_file(key, src).await,
            ObjectStore::S3(s3) => s3.note(s3.put_file(key, src).await),
        }
    }

    /// Store the complete file at `src` under `key` like [`Self::put_file`], but write it even
    /// when `key` exists, replacing the object atomically (a reader sees the old bytes or the
    /// new ones): for objects whose name a damaged copy may hold (packs, see
    /// `meta/packs.rs`), so that storing the content again heals them.
    pub async fn replace_file(&self, key: &str, src: &Path) -> Result<(), ObjectError> {
        check_key(key)?;
        match self {
            ObjectStore::Fs(fs) => fs.replace_file(key, src).await,
            ObjectStore::S3(s3) => s3.note(s3.replace_file(key, src).await),
        }
    }

    /// [`Self::replace_file`] of `bytes`.
    pub async fn replace_bytes(&self, key: &str, bytes: &[u8]) -> Result<(), ObjectError> {
        check_key(key)?;
        let io = |source| ObjectError::Io {
            key: key.to_owned(),
            source,
        };
        let path = stage_bytes(self.staging_dir(), bytes).await.map_err(io)?;
        self.replace_file(key, &path).await
    }

    /// Store `bytes` under `key`, like [`Self::put_file`] (through a staging file, so the
    /// object is durable and complete before it is visible; an existing key is kept as is).
    pub async fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<(), ObjectError> {
        check_key(key)?;
        let io = |source| ObjectError::Io {
            key: key.to_owned(),
            source,
        };
        let path = stage_bytes(self.staging_dir(), bytes).await.map_err(io)?;
        // `put_file` consumes the file; the TempPath deletes it if storing failed.
        self.put_file(key, &path).await
    }

    /// Store many small objects (the chunks of one upload), like [`Self::put_bytes`] each:
    /// every object is complete and durable before it is visible, an existing key is kept.
    /// On a local directory, one blocking task whose threads `fsync` at once (see [`fs`]);
    /// on S3, a few `PUT`s at once.
    pub async fn put_many(&self, items: Vec<(String, bytes::Bytes)>) -> Result<(), ObjectError> {
        for (key, _) in &items {
            check_key(key)?;
        }
        match self {
            ObjectStore::Fs(fs) => fs.put_many(items).await,
            ObjectStore::S3(_) => {
                futures::stream::iter(items)
                    .map(|(key, bytes)| async move { self.put_bytes(&key, &bytes).await })
                    .buffer_unordered(S3_PUT_CONCURRENCY)
                    .try_collect::<Vec<()>>()
                    .await?;
                Ok(())
            }
        }
    }

    /// Stream an object, or `range` of it. A range reaching past the end is cut at the end;
    /// callers pass ranges that start inside the object (they know its length).
    pub async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
    ) -> Result<ObjectBody, ObjectError> {
        check_key(key)?;
        match self {
            ObjectStore::Fs(fs) => fs.get(key, range).await,
            ObjectStore::S3(s3) => s3.note(s3.get(key, range).await),
        }
    }

    /// `range` of an object in memory, exactly (an object shorter than the range is an
    /// error).
    pub async fn read_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, ObjectError> {
        self.read_pieces(vec![(key.to_owned(), range)]).await
    }

    /// `pieces` (each a key and a range of that object) in memory, one after another in one
    /// buffer, exactly (an object shorter than its range is an error naming it): for callers
    /// that hold a few such batches at a time, such as a NAR's chunks being served. On a local
    /// directory one thread hop for the whole batch; on S3 [`S3_READ_CONCURRENCY`] requests at
    /// once.
    pub async fn read_pieces(
        &self,
        pieces: Vec<(String, Range<u64>)>,
    ) -> Result<Bytes, ObjectError> {
        for (key, _) in &pieces {
            check_key(key)?;
        }
        match self {
            ObjectStore::Fs(fs) => fs.read_pieces(pieces).await,
            ObjectStore::S3(_) => {
                let total: u64 = pieces
                    .iter()
                    .map(|(_, r)| r.end.saturating_sub(r.start))
                    .sum();
                let mut out = bytes::BytesMut::with_capacity(total as usize);
                let mut reads = futures::stream::iter(pieces)
                    .map(|(key, range)| async move {
                        let want = range.end.saturating_sub(range.start);
                        let body = self.get(&key, Some(range)).await?;
                        let piece = collect(&key, body, want as usize).await?;
                        if piece.len() as u64 != want {
                            return Err(ObjectError::Io {
                                key,
                                source: std::io::Error::new(
                                    std::io::ErrorKind::UnexpectedEof,
                                    format!("read {} of {want} bytes", piece.len()),
                                ),
                            });
                        }
                        Ok(piece)
                    })
                    .buffered(S3_READ_CONCURRENCY);
                while let Some(piece) = reads.next().await {
                    out.extend_from_slice(&piece?);
                }
                Ok(out.freeze())
            }
        }
    }

    /// The first of `keys` that is not stored (`None`: all are). On a local directory one
    /// thread hop for them all; on S3 [`S3_READ_CONCURRENCY`] `HEAD`s at once.
    pub async fn first_missing(&self, keys: Vec<String>) -> Result<Option<String>, ObjectError> {
        for key in &keys {
            check_key(key)?;
        }
        match self {
            ObjectStore::Fs(fs) => fs.first_missing(keys).await,
            ObjectStore::S3(_) => {
                futures::stream::iter(keys)
                    .map(|key| async move {
                        Ok::<_, ObjectError>((!self.exists(&key).await?).then_some(key))
                    })
                    .buffer_unordered(S3_READ_CONCURRENCY)
                    .try_filter_map(|m| std::future::ready(Ok(m)))
                    .boxed()
                    .try_next()
                    .await
            }
        }
    }

    /// A whole small object in memory: `Ok(None)` when it is larger than `max` bytes (stream it
    /// with [`Self::get`] instead). On a local directory this is one read of a file the page
    /// cache most likely holds, done on the calling thread: cheaper than the thread hops of a
    /// stream, which is what serving a few-KiB NAR costs otherwise.
    pub async fn get_small(
        &self,
        key: &str,
        max: u64,
    ) -> Result<Option<bytes::Bytes>, ObjectError> {
        check_key(key)?;
        match self {
            ObjectStore::Fs(fs) => fs.get_small(key, max),
            ObjectStore::S3(_) => {
                let body = self.get(key, None).await?;
                if body.len > max {
                    return Ok(None);
                }
                let len = body.len as usize;
                Ok(Some(collect(key, body, len).await?.freeze()))
            }
        }
    }

    pub async fn exists(&self, key: &str) -> Result<bool, ObjectError> {
        check_key(key)?;
        match self {
            ObjectStore::Fs(fs) => fs.exists(key).await,
            ObjectStore::S3(s3) => s3.note(s3.exists(key).await),
        }
    }

    /// Delete an object; deleting a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        check_key(key)?;
        match self {
            ObjectStore::Fs(fs) => fs.delete(key).await,
            ObjectStore::S3(s3) => s3.note(s3.delete(key).await),
        }
    }

    /// [`ObjectStore::delete`] with its error boxed: the shape of the metadata's cleanup
    /// callback ([`crate::meta::DeleteObject`]), e.g. `&|key| objects.delete_boxed(key)`.
    pub fn delete_boxed(
        &self,
        key: String,
    ) -> futures::future::BoxFuture<'_, Result<(), Box<dyn std::error::Error + Send + Sync>>> {
        Box::pin(async move { Ok(self.delete(&key).await?) })
    }

    /// Every object's key, in no particular order (objects named outside the key alphabet,
    /// which larder never writes, are left out).
    pub fn list(&self) -> BoxStream<'static, Result<String, ObjectError>> {
        self.list_detailed().map_ok(|o| o.key).boxed()
    }

    /// [`Self::list`] with each object's size and last-modified time. Streamed: memory does
    /// not grow with the number of objects.
    pub fn list_detailed(&self) -> BoxStream<'static, Result<ListedObject, ObjectError>> {
        match self {
            ObjectStore::Fs(fs) => fs.list(),
            ObjectStore::S3(s3) => s3.list(),
        }
    }

    /// A URL from which anyone holding it may `GET` the object for `ttl`, when the backend
    /// can make one (S3 presigned URLs); `None` for a local directory.
    pub async fn presigned_get(
        &self,
        key: &str,
        ttl: Duration,
    ) -> Result<Option<String>, ObjectError> {
        check_key(key)?;
        match self {
            ObjectStore::Fs(_) => Ok(None),
            ObjectStore::S3(s3) => s3.presigned_get(key, ttl).await.map(Some),
        }
    }

    /// Whether presigned URLs can be made ([`Self::presigned_get`]).
    pub fn can_presign(&self) -> bool {
        matches!(self, ObjectStore::S3(_))
    }

    /// Fail fast while the store is known to be unreachable: free while it answers, a `ping`
    /// after a request found it unreachable. Uploads call this before reading their body, so
    /// a client is refused at once instead of after sending a whole NAR.
    pub async fn check_available(&self) -> Result<(), ObjectError> {
        match self {
            ObjectStore::Fs(_) => Ok(()),
            ObjectStore::S3(s3) => s3.check_available().await,
        }
    }

    /// Check that the store answers (for `/healthz` and start-up).
    pub async fn ping(&self) -> Result<(), ObjectError> {
        match self {
            ObjectStore::Fs(fs) => fs.ping().await,
            ObjectStore::S3(s3) => s3.note(s3.ping().await),
        }
    }
}

pub(crate) fn check_key(key: &str) -> Result<(), ObjectError> {
    let ok = !key.is_empty()
        && key.len() <= 200
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"/._-".contains(&b))
        && !key.starts_with('/')
        && key
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..");
    if ok {
        Ok(())
    } else {
        Err(ObjectError::InvalidKey(key.chars().take(64).collect()))
    }
}

/// Write `bytes` to a new staging file in `dir`: complete on disk when this returns (the
/// object stores fsync, rename or upload it next), deleted when the returned path is dropped.
async fn stage_bytes(dir: &Path, bytes: &[u8]) -> std::io::Result<tempfile::TempPath> {
    let (file, path) = tempfile::Builder::new()
        .prefix("object-")
        .tempfile_in(dir)?
        .into_parts();
    let mut file = tokio::fs::File::from_std(file);
    tokio::io::AsyncWriteExt::write_all(&mut file, bytes).await?;
    // A tokio file's `write_all` returns with its last block still being written on a
    // blocking thread: without waiting for it, `put_file` fsynced and renamed the object
    // before its end was written, and a `kill -9` (or a power loss) then left a truncated
    // chunk object under a committed row (found by bench/adversarial.sh: 512 KiB of an
    // 844 KiB chunk). Test: `tests::staged_bytes_are_written_when_staging_returns`.
    tokio::io::AsyncWriteExt::flush(&mut file).await?;
    Ok(path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape() {
        for bad in ["", "../x", "a/../b", "/abs", "a//b", "A", "a\0b", "a/./b"] {
            assert!(check_key(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_key("chunk/ab/0123.zst").is_ok());
    }

    /// `stage_bytes` returns only once the bytes are in the file. The runtime has one blocking
    /// thread, held by a gate for 300 ms: the file's write waits behind it, so a `stage_bytes`
    /// that returned with the write still queued (no flush) finds an empty file here.
    #[test]
    fn staged_bytes_are_written_when_staging_returns() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .max_blocking_threads(1)
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..300 * 1024u32).map(|i| (i % 251) as u8).collect();
        rt.block_on(async {
            let (held, release) = std::sync::mpsc::channel::<()>();
            let (started, gate_up) = tokio::sync::oneshot::channel();
            let gate = tokio::task::spawn_blocking(move || {
                started.send(()).unwrap();
                release.recv().unwrap();
            });
            gate_up.await.unwrap();
            // The file is read the moment staging returns, on this thread.
            let stage = async {
                let path = stage_bytes(dir.path(), &bytes).await.unwrap();
                std::fs::read(&path).unwrap()
            };
            let open = async {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                held.send(()).unwrap();
            };
            let (staged, ()) = tokio::join!(stage, open);
            gate.await.unwrap();
            assert_eq!(
                staged.len(),
                bytes.len(),
                "staging returned before its write"
            );
            assert!(staged == bytes);
        });
    }
}
