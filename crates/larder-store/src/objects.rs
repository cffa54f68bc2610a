//! Object storage: immutable, content-addressed blobs (NAR chunks, build logs).
//!
//! Objects are written once under a key derived from their content and never modified, so a
//! reader can never observe a half-written object: the local backend writes into a temporary
//! file, `fsync`s it and renames it into place (rename is atomic on POSIX filesystems).
//!
//! Keys are validated here (`[a-z0-9/._-]`, no `..`) so that no caller can escape the object
//! directory, whatever it passes.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// Read size when streaming an object: large reads keep syscall and task overhead low.
const READ_CHUNK: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("invalid object key {0:?}")]
    InvalidKey(String),
    #[error("object {0:?} not found")]
    NotFound(String),
    #[error("unsupported storage URL {0:?} (expected file:///path)")]
    UnsupportedUrl(String),
    #[error("object storage I/O on {key:?}")]
    Io {
        key: String,
        #[source]
        source: io::Error,
    },
}

/// A streamed object (or a range of it) with its length known up front.
pub struct ObjectBody {
    pub len: u64,
    pub stream: BoxStream<'static, io::Result<Bytes>>,
}

/// The object store. An enum rather than a trait object: backends are few and known, and
/// native `async fn` keeps working without boxing every call.
#[derive(Debug, Clone)]
pub enum ObjectStore {
    Fs(FsObjects),
}

impl ObjectStore {
    /// Open a store from its URL: `file:///abs/dir` (created if missing).
    pub fn open(url: &str) -> Result<Self, ObjectError> {
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(ObjectError::UnsupportedUrl(url.to_owned()));
            }
            return Ok(ObjectStore::Fs(FsObjects::new(PathBuf::from(path))?));
        }
        Err(ObjectError::UnsupportedUrl(url.to_owned()))
    }

    /// A directory for temporary files of in-flight uploads, on the same filesystem as the
    /// objects where possible so that publishing is a rename.
    pub fn staging_dir(&self) -> &Path {
        match self {
            ObjectStore::Fs(fs) => &fs.tmp,
        }
    }

    /// Store the complete file at `src` under `key`, consuming `src`. Atomic: the object is
    /// either absent or complete. Storing an existing key is a no-op (keys are content hashes).
    pub async fn put_file(&self, key: &str, src: &Path) -> Result<(), ObjectError> {
        match self {
            ObjectStore::Fs(fs) => fs.put_file(key, src).await,
        }
    }

    /// Stream an object, or `range` of it (clamped by the caller to the object's length).
    pub async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
    ) -> Result<ObjectBody, ObjectError> {
        match self {
            ObjectStore::Fs(fs) => fs.get(key, range).await,
        }
    }

    pub async fn exists(&self, key: &str) -> Result<bool, ObjectError> {
        match self {
            ObjectStore::Fs(fs) => fs.exists(key).await,
        }
    }

    /// Delete an object; deleting a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        match self {
            ObjectStore::Fs(fs) => fs.delete(key).await,
        }
    }
}

fn check_key(key: &str) -> Result<(), ObjectError> {
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

/// Objects as files under a directory: `DIR/objects/<key>`, staging in `DIR/tmp`.
#[derive(Debug, Clone)]
pub struct FsObjects {
    root: PathBuf,
    tmp: PathBuf,
}

impl FsObjects {
    pub fn new(dir: PathBuf) -> Result<Self, ObjectError> {
        let root = dir.join("objects");
        let tmp = dir.join("tmp");
        for d in [&root, &tmp] {
            std::fs::create_dir_all(d).map_err(|source| ObjectError::Io {
                key: String::new(),
                source,
            })?;
        }
        Ok(FsObjects { root, tmp })
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, ObjectError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    async fn put_file(&self, key: &str, src: &Path) -> Result<(), ObjectError> {
        let dst = self.path_of(key)?;
        let io_err = |source| ObjectError::Io {
            key: key.to_owned(),
            source,
        };
        let src = src.to_owned();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            // Durable before visible: the data is synced, then renamed, then the directory synced.
            std::fs::File::open(&src)?.sync_all()?;
            let parent = dst.parent().unwrap_or(Path::new("/"));
            std::fs::create_dir_all(parent)?;
            if dst.exists() {
                std::fs::remove_file(&src)?;
                return Ok(());
            }
            std::fs::rename(&src, &dst)?;
            std::fs::File::open(parent)?.sync_all()?;
            Ok(())
        })
        .await
        .map_err(|e| io_err(io::Error::other(e)))?
        .map_err(io_err)
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ObjectBody, ObjectError> {
        let path = self.path_of(key)?;
        let io_err = |source: io::Error| {
            if source.kind() == io::ErrorKind::NotFound {
                ObjectError::NotFound(key.to_owned())
            } else {
                ObjectError::Io {
                    key: key.to_owned(),
                    source,
                }
            }
        };
        let mut file = tokio::fs::File::open(&path).await.map_err(io_err)?;
        let size = file.metadata().await.map_err(io_err)?.len();
        let range = range.unwrap_or(0..size);
        let range = range.start.min(size)..range.end.min(size);
        if range.start > 0 {
            file.seek(io::SeekFrom::Start(range.start))
                .await
                .map_err(io_err)?;
        }
        let len = range.end - range.start;
        let reader = file.take(len);
        let stream = tokio_util::io::ReaderStream::with_capacity(reader, READ_CHUNK).boxed();
        Ok(ObjectBody { len, stream })
    }

    async fn exists(&self, key: &str) -> Result<bool, ObjectError> {
        let path = self.path_of(key)?;
        tokio::fs::try_exists(&path)
            .await
            .map_err(|source| ObjectError::Io {
                key: key.to_owned(),
                source,
            })
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        let path = self.path_of(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ObjectError::Io {
                key: key.to_owned(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape() {
        for bad in ["", "../x", "a/../b", "/abs", "a//b", "A", "a\0b", "a/./b"] {
            assert!(check_key(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_key("chunk/ab/0123.zst").is_ok());
    }

    #[tokio::test]
    async fn put_get_range_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(&format!("file://{}", dir.path().display())).unwrap();
        let src = store.staging_dir().join("upload");
        std::fs::write(&src, b"hello world").unwrap();
        store.put_file("chunk/aa/x", &src).await.unwrap();
        assert!(!src.exists());
        let body = store.get("chunk/aa/x", Some(6..100)).await.unwrap();
        assert_eq!(body.len, 5);
        let data: Vec<Bytes> = body.stream.map(|r| r.unwrap()).collect().await;
        assert_eq!(data.concat(), b"world");
        assert!(store.exists("chunk/aa/x").await.unwrap());
        store.delete("chunk/aa/x").await.unwrap();
        store.delete("chunk/aa/x").await.unwrap();
        assert!(matches!(
            store.get("chunk/aa/x", None).await,
            Err(ObjectError::NotFound(_))
        ));
    }
}
