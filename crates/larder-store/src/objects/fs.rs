//! The local backend: objects as files under a directory, `DIR/objects/<key>`, staging in
//! `DIR/tmp` (same filesystem, so storing an object is a rename).
//!
//! Durable before visible: an object's data is `fsync`ed, then renamed into place (atomic on
//! POSIX filesystems), then its directory is `fsync`ed.
//!
//!
//! A batch of small objects ([`FsObjects::put_many`], the chunks of one upload) is written in
//! one blocking task by [`PUT_MANY_THREADS`] threads, each `fsync`ing its files, and each
//! directory is `fsync`ed once after all of them: concurrent `fsync`s share the disk's cache
//! flushes. Measured on this machine's ext4 (virtio disk), 60 objects of 40 KiB: 40-240 ms
//! one after another, 13-28 ms from 4-16 threads. (`syncfs` per batch cost 12-16 ms too,
//! but it writes whatever else is dirty on the filesystem: 1.5 GB of another process's
//! writes here, which made it the slower choice on a shared disk.) Each worker stages its
//! files in a directory of its own, `DIR/tmp/objects-<n>`: creating a file locks its
//! directory, and so does renaming one out of it, and with one shared staging directory the
//! workers spent a tenth of a large upload's server CPU spinning on that lock (`perf`, the
//! 8 000 chunk objects of a 256 MiB NAR; their writing took 2.6 s instead of 3.5 s).

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{ListedObject, ObjectBody, ObjectError, READ_CHUNK};

/// Threads writing one [`FsObjects::put_many`] batch.
const PUT_MANY_THREADS: usize = 8;

#[derive(Debug, Clone)]
pub struct FsObjects {
    root: PathBuf,
    pub(super) tmp: PathBuf,
}

/// Read `range` of object `key` under `root` to the end of `buf` (its spare capacity: zeroing
/// it first cost a tenth of a chunked download's CPU). Blocking.
fn read_piece(
    root: &Path,
    key: &str,
    range: Range<u64>,
    buf: &mut Vec<u8>,
) -> Result<(), ObjectError> {
    use std::io::{Read, Seek};
    let len = range.end.saturating_sub(range.start);
    let read = std::fs::File::open(root.join(key)).and_then(|mut file| {
        if range.start > 0 {
            file.seek(io::SeekFrom::Start(range.start))?;
        }
        file.take(len).read_to_end(buf)
    });
    let read = read.map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => ObjectError::NotFound(key.to_owned()),
        _ => io_err(key)(source),
    })?;
    if read as u64 != len {
        return Err(io_err(key)(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "object shorter than the {len} bytes asked at {}",
                range.start
            ),
        )));
    }
    Ok(())
}

/// Read what [`read_cached`] left of `pieces` (from piece `done`, whose first `partial` bytes
/// `buf` holds) to the end of `buf`. Blocking.
fn read_rest(
    root: &Path,
    pieces: &[(String, Range<u64>)],
    done: usize,
    partial: u64,
    buf: &mut Vec<u8>,
) -> Result<(), ObjectError> {
    for (i, (key, range)) in pieces.iter().enumerate().skip(done) {
        let skip = if i == done { partial } else { 0 };
        read_piece(root, key, range.start + skip..range.end, buf)?;
    }
    Ok(())
}

/// Read the leading `pieces` that the kernel's caches hold, to the end of `buf`, without
/// waiting for the disk: each object opened only if its path is in the dentry cache
/// (`openat2` with `RESOLVE_CACHED`), read only from the page cache (`preadv2` with
/// `RWF_NOWAIT`). Returns how many pieces were read whole, and how many bytes of the next
/// one. Anything else (not cached, a kernel without these calls, an object shorter than asked)
/// stops here and is left to [`read_piece`] on a blocking thread, which also reports it; an
/// object that is not there at all is `NotFound` at once.
fn read_cached(
    root: &Path,
    pieces: &[(String, Range<u64>)],
    buf: &mut Vec<u8>,
) -> Result<(usize, u64), ObjectError> {
    use rustix::fs::{openat2, Mode, OFlags, ResolveFlags, CWD};
    use rustix::io::{preadv2, Errno, ReadWriteFlags};
    for (i, (key, range)) in pieces.iter().enumerate() {
        let file = match openat2(
            CWD,
            root.join(key),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::CACHED,
        ) {
            Ok(file) => file,
            Err(Errno::NOENT) => return Err(ObjectError::NotFound(key.clone())),
            Err(_) => return Ok((i, 0)),
        };
        let len = range.end.saturating_sub(range.start);
        let mut got = 0;
        while got < len {
            let at = buf.len();
            buf.resize(at + (len - got) as usize, 0);
            let n = preadv2(
                &file,
                &mut [io::IoSliceMut::new(&mut buf[at..])],
                range.start + got,
                ReadWriteFlags::NOWAIT,
            );
            match n {
                Ok(n) if n > 0 => {
                    buf.truncate(at + n);
                    got += n as u64;
                }
                // Not cached, interrupted, the end of the object, unsupported: the rest
                // waits for a blocking thread.
                _ => {
                    buf.truncate(at);
                    return Ok((i, got));
                }
            }
        }
    }
    Ok((pieces.len(), 0))
}

fn io_err(key: &str) -> impl Fn(io::Error) -> ObjectError + '_ {
    move |source| ObjectError::Io {
        key: key.to_owned(),
        source,
    }
}

impl FsObjects {
    pub fn new(dir: PathBuf) -> Result<Self, ObjectError> {
        let root = dir.join("objects");
        let tmp = dir.join("tmp");
        for d in [&root, &tmp] {
            std::fs::create_dir_all(d).map_err(io_err(""))?;
        }
        Ok(FsObjects { root, tmp })
    }

    pub(super) async fn put_file(&self, key: &str, src: &Path) -> Result<(), ObjectError> {
        self.store_file(key, src, false).await
    }

    /// [`Self::put_file`] that replaces an existing object (a rename over it).
    pub(super) async fn replace_file(&self, key: &str, src: &Path) -> Result<(), ObjectError> {
        self.store_file(key, src, true).await
    }

    async fn store_file(&self, key: &str, src: &Path, replace: bool) -> Result<(), ObjectError> {
        let dst = self.root.join(key);
        let src = src.to_owned();
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            std::fs::File::open(&src)?.sync_all()?;
            let parent = dst.parent().unwrap_or(Path::new("/"));
            if !parent.exists() {
                std::fs::create_dir_all(parent)?;
                // The new directories' entries are durable too (`chunk/ab` in `chunk`, …):
                // otherwise a power loss could lose the object after its row committed.
                for dir in parent.ancestors().skip(1) {
                    std::fs::File::open(dir)?.sync_all()?;
                    if dir == root {
                        break;
                    }
                }
            }
            if !replace && dst.exists() {
                std::fs::remove_file(&src)?;
                // Stored by a concurrent upload that may not have made it durable yet.
                std::fs::File::open(parent)?.sync_all()?;
                return Ok(());
            }
            std::fs::rename(&src, &dst)?;
            std::fs::File::open(parent)?.sync_all()?;
            Ok(())
        })
        .await
        .map_err(|e| io_err(key)(io::Error::other(e)))?
        .map_err(io_err(key))
    }

    /// Store a batch of objects; see the module's documentation.
    pub(super) async fn put_many(
        &self,
        items: Vec<(String, bytes::Bytes)>,
    ) -> Result<(), ObjectError> {
        if items.is_empty() {
            return Ok(());
        }
        let root = self.root.clone();
        let tmp = self.tmp.clone();
        tokio::task::spawn_blocking(move || put_many_blocking(&root, &tmp, items))
            .await
            .map_err(|e| io_err("")(io::Error::other(e)))?
    }

    pub(super) async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
    ) -> Result<ObjectBody, ObjectError> {
        let not_found = |source: io::Error| {
            if source.kind() == io::ErrorKind::NotFound {
                ObjectError::NotFound(key.to_owned())
            } else {
                io_err(key)(source)
            }
        };
        let mut file = tokio::fs::File::open(self.root.join(key))
            .await
            .map_err(not_found)?;
        let size = file.metadata().await.map_err(not_found)?.len();
        let range = range.unwrap_or(0..size);
        let range = range.start.min(size)..range.end.min(size);
        if range.start > 0 {
            file.seek(io::SeekFrom::Start(range.start))
                .await
                .map_err(not_found)?;
        }
        let len = range.end.saturating_sub(range.start);
        let reader = file.take(len);
        let stream = tokio_util::io::ReaderStream::with_capacity(reader, READ_CHUNK).boxed();
        Ok(ObjectBody { len, stream })
    }

    /// `pieces` (each a key and a range of that object) read one after another into one
    /// buffer. What the kernel's caches hold is read here, on the calling (serving) thread,
    /// without ever waiting for the disk ([`read_cached`]); the rest in one blocking call:
    /// at most one thread hop, however many objects the pieces span (a NAR's chunks are
    /// served this way; a hop per chunk cost half the CPU, and a hop per batch still a
    /// quarter of a download's server CPU when every byte was in the page cache). A piece
    /// shorter than asked is an error naming its object.
    pub(super) async fn read_pieces(
        &self,
        pieces: Vec<(String, Range<u64>)>,
    ) -> Result<bytes::Bytes, ObjectError> {
        let total: u64 = pieces
            .iter()
            .map(|(_, r)| r.end.saturating_sub(r.start))
            .sum();
        let mut buf = Vec::with_capacity(total as usize);
        let (done, partial) = read_cached(&self.root, &pieces, &mut buf)?;
        if done == pieces.len() {
            return Ok(bytes::Bytes::from(buf));
        }
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            read_rest(&root, &pieces, done, partial, &mut buf)?;
            Ok(bytes::Bytes::from(buf))
        })
        .await
        .map_err(|e| io_err("(pieces)")(io::Error::other(e)))?
    }

    /// The first of `keys` that is not stored, checked in one blocking call.
    pub(super) async fn first_missing(
        &self,
        keys: Vec<String>,
    ) -> Result<Option<String>, ObjectError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            for key in keys {
                match std::fs::symlink_metadata(root.join(&key)) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Some(key)),
                    Err(source) => return Err(io_err(&key)(source)),
                }
            }
            Ok(None)
        })
        .await
        .map_err(|e| io_err("(existence check)")(io::Error::other(e)))?
    }

    /// The whole object if it is at most `max` bytes, read synchronously (see
    /// [`super::ObjectStore::get_small`]).
    pub(super) fn get_small(
        &self,
        key: &str,
        max: u64,
    ) -> Result<Option<bytes::Bytes>, ObjectError> {
        use std::io::Read;
        let not_found = |source: io::Error| {
            if source.kind() == io::ErrorKind::NotFound {
                ObjectError::NotFound(key.to_owned())
            } else {
                io_err(key)(source)
            }
        };
        let mut file = std::fs::File::open(self.root.join(key)).map_err(not_found)?;
        let size = file.metadata().map_err(not_found)?.len();
        if size > max {
            return Ok(None);
        }
        let mut buf = Vec::with_capacity(size as usize);
        file.read_to_end(&mut buf).map_err(not_found)?;
        Ok(Some(bytes::Bytes::from(buf)))
    }

    pub(super) async fn exists(&self, key: &str) -> Result<bool, ObjectError> {
        tokio::fs::try_exists(self.root.join(key))
            .await
            .map_err(io_err(key))
    }

    pub(super) async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        match tokio::fs::remove_file(self.root.join(key)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(io_err(key)(source)),
        }
    }

    /// Every object under the object directory, walked on a blocking thread and sent as
    /// found. A file deleted between the walk and its `stat` is left out.
    pub(super) fn list(&self) -> BoxStream<'static, Result<ListedObject, ObjectError>> {
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let mut dirs = vec![root.clone()];
            while let Some(dir) = dirs.pop() {
                let entries = match std::fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(io_err("")(e)));
                        return;
                    }
                };
                for entry in entries {
                    let item = entry.and_then(|e| Ok((e.path(), e.file_type()?)));
                    let (path, ty) = match item {
                        Ok(x) => x,
                        Err(e) => {
                            let _ = tx.blocking_send(Err(io_err("")(e)));
                            return;
                        }
                    };
                    if ty.is_dir() {
                        dirs.push(path);
                        continue;
                    }
                    let key = path
                        .strip_prefix(&root)
                        .ok()
                        .and_then(|k| k.to_str())
                        .filter(|k| ty.is_file() && super::check_key(k).is_ok());
                    let Some(key) = key else { continue };
                    let listed = match std::fs::symlink_metadata(&path) {
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => Err(io_err(key)(e)),
                        Ok(meta) => meta
                            .modified()
                            .map(|modified| ListedObject {
                                key: key.to_owned(),
                                size: meta.len(),
                                modified,
                            })
                            .map_err(io_err(key)),
                    };
                    let failed = listed.is_err();
                    if tx.blocking_send(listed).is_err() || failed {
                        return;
                    }
                }
            }
        });
        tokio_stream_from(rx)
    }

    pub(super) async fn ping(&self) -> Result<(), ObjectError> {
        tokio::fs::metadata(&self.root)
            .await
            .map(|_| ())
            .map_err(io_err(""))
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> BoxStream<'static, T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

/// [`FsObjects::put_many`], on a blocking thread.
fn put_many_blocking(
    root: &Path,
    tmp: &Path,
    items: Vec<(String, bytes::Bytes)>,
) -> Result<(), ObjectError> {
    let workers = PUT_MANY_THREADS.min(items.len()).max(1);
    let per = items.len().div_ceil(workers);
    // Each worker writes and syncs its share of the objects; the directories they went into
    // are synced once each, after all of them (concurrent `fsync`s share the disk's flushes).
    let dirs: Vec<std::collections::BTreeSet<PathBuf>> = std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(per)
            .enumerate()
            .map(|(i, share)| scope.spawn(move || put_share(root, tmp, i, share)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io_err("")(io::Error::other("panicked"))))
            })
            .collect::<Result<_, _>>()
    })?;
    let dirs: Vec<PathBuf> = dirs
        .into_iter()
        .flatten()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let per = dirs.len().div_ceil(workers).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = dirs
            .chunks(per)
            .map(|share| {
                scope.spawn(move || {
                    share
                        .iter()
                        .try_for_each(|d| std::fs::File::open(d)?.sync_all())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(io::Error::other("panicked")))
        })
    })
    .map_err(io_err(""))
}

/// One worker's share of [`put_many_blocking`]: each object written into a staging file,
/// `fsync`ed and renamed into place (an existing one kept). The directories to sync.
fn put_share(
    root: &Path,
    tmp: &Path,
    worker: usize,
    share: &[(String, bytes::Bytes)],
) -> Result<std::collections::BTreeSet<PathBuf>, ObjectError> {
    use std::io::Write;
    // A staging directory of the worker's own (see the module's documentation).
    let tmp = tmp.join(format!("objects-{worker}"));
    std::fs::create_dir_all(&tmp).map_err(io_err(""))?;
    let mut dirs = std::collections::BTreeSet::new();
    for (key, bytes) in share {
        let dst = root.join(key);
        let parent = dst.parent().unwrap_or(Path::new("/")).to_owned();
        if !parent.exists() {
            std::fs::create_dir_all(&parent).map_err(io_err(key))?;
            // The new directories' entries are durable too (`chunk/ab` in `chunk`, …).
            for dir in parent.ancestors().skip(1) {
                dirs.insert(dir.to_owned());
                if dir == root {
                    break;
                }
            }
        }
        // Stored by a concurrent upload that may not have made it durable yet: its
        // directory is synced below.
        if !dst.exists() {
            let mut file = tempfile::Builder::new()
                .prefix("object-")
                .tempfile_in(&tmp)
                .map_err(io_err(key))?;
            file.write_all(bytes).map_err(io_err(key))?;
            file.as_file().sync_all().map_err(io_err(key))?;
            file.into_temp_path()
                .persist_noclobber(&dst)
                .or_else(|e| {
                    if dst.exists() {
                        Ok(()) // stored meanwhile; the staging file is deleted on drop
                    } else {
                        Err(e.error)
                    }
                })
                .map_err(io_err(key))?;
        }
        dirs.insert(parent);
    }
    Ok(dirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever [`read_cached`] got (it stops wherever the page cache does), the blocking
    /// rest completes the same bytes: every stopping point, piece by piece and mid-piece.
    #[test]
    fn the_blocking_rest_continues_where_the_cached_read_stopped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"abcdefghij").unwrap();
        std::fs::write(dir.path().join("b"), b"0123456789").unwrap();
        let pieces = vec![
            ("a".to_owned(), 2..6),
            ("b".to_owned(), 0..3),
            ("a".to_owned(), 8..10),
        ];
        let whole = b"cdef012ij".to_vec();
        let mut cached = Vec::new();
        assert_eq!(
            read_cached(dir.path(), &pieces, &mut cached).unwrap(),
            (3, 0),
            "files just written are in the page cache"
        );
        assert_eq!(cached, whole);
        let mut at = 0;
        for (i, (_, range)) in pieces.iter().enumerate() {
            for partial in 0..range.end - range.start {
                let mut buf = whole[..at + partial as usize].to_vec();
                read_rest(dir.path(), &pieces, i, partial, &mut buf).unwrap();
                assert_eq!(buf, whole, "stopped in piece {i} after {partial} bytes");
            }
            at += (range.end - range.start) as usize;
        }
    }
}
