//! Copy every object of one store into another (`larder migrate --from file://… --to s3://…`).
//!
//! Verifiable: every key ends in the nix32 SHA-256 of its object's bytes (`chunk/ab/<hash>`,
//! `log/<hash>`), and each object is hashed while it is copied and stored only when it matches.
//! Resumable: objects the destination already has are skipped (stores are written atomically,
//! so an object that exists is complete), so an interrupted copy just runs again.
//! Memory is bounded: each object goes through a staging file of the destination.

use futures::{StreamExt, TryStreamExt};
use larder_nix::hash::{Sha256, Sha256Hasher};
use tokio::io::AsyncWriteExt;

use super::{ObjectError, ObjectStore};

/// Objects copied at once.
const COPY_CONCURRENCY: usize = 4;

/// What a copy did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CopyReport {
    /// Objects copied (and verified).
    pub copied: u64,
    /// Bytes of the objects copied.
    pub bytes: u64,
    /// Objects the destination already had.
    pub skipped: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Store(#[from] ObjectError),
    #[error("object {key:?} is corrupt in the source: its content hashes to {actual}")]
    Corrupt { key: String, actual: String },
    #[error("object {0:?} is not named by its content hash; cannot verify it")]
    Unverifiable(String),
    #[error("cannot write the staging file for {key:?}")]
    Staging {
        key: String,
        #[source]
        source: std::io::Error,
    },
}

/// The nix32 SHA-256 an object's key names (its last path segment).
fn expected_hash(key: &str) -> Option<&str> {
    let last = key.rsplit('/').next()?;
    (last.len() == 52 && larder_nix::nixbase32::decode_fixed::<32>(last).is_ok()).then_some(last)
}

/// Hashes an object's bytes the way its key names them: as stored, or (a content-defined
/// chunk, `chunk/ab/<hash>.zst`) as the bytes its zstd frame decompresses to.
pub struct ContentHasher {
    kind: HasherKind,
    expected: Sha256,
}

enum HasherKind {
    Stored(Sha256Hasher),
    Zstd(Box<zstd::stream::write::Decoder<'static, Sha256Hasher>>),
}

impl ContentHasher {
    /// The hasher for the object at `key`, if its key names its hash.
    pub fn for_key(key: &str) -> Option<Self> {
        use crate::meta::ChunkName;
        let (kind, expected) = match crate::meta::chunk_hash_of_key(key).and_then(ChunkName::parse)
        {
            Some(ChunkName::Zstd(h)) => (
                HasherKind::Zstd(Box::new(
                    zstd::stream::write::Decoder::new(Sha256Hasher::new()).ok()?,
                )),
                h,
            ),
            Some(ChunkName::Stored(h)) => (HasherKind::Stored(Sha256Hasher::new()), h),
            None => {
                let h = expected_hash(key)?;
                let bytes = larder_nix::nixbase32::decode_fixed::<32>(h).ok()?;
                (
                    HasherKind::Stored(Sha256Hasher::new()),
                    Sha256::from_bytes(bytes),
                )
            }
        };
        Some(ContentHasher { kind, expected })
    }

    /// The hash the key names.
    pub fn expected(&self) -> &Sha256 {
        &self.expected
    }

    /// Feed the object's next bytes. An error: a frame that does not decompress.
    pub fn update(&mut self, block: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        match &mut self.kind {
            HasherKind::Stored(h) => {
                h.update(block);
                Ok(())
            }
            HasherKind::Zstd(d) => d.write_all(block),
        }
    }

    /// The hash of the content; an error if a frame was cut short.
    pub fn finish(self) -> std::io::Result<Sha256> {
        match self.kind {
            HasherKind::Stored(h) => Ok(h.finalize()),
            HasherKind::Zstd(mut d) => {
                use std::io::Write;
                d.flush()?;
                d.do_finish()?;
                Ok(d.into_inner().finalize())
            }
        }
    }
}

/// Copy every object of `from` that `to` lacks; `progress` is called after each object.
pub async fn copy_all(
    from: &ObjectStore,
    to: &ObjectStore,
    progress: impl Fn(&CopyReport) + Send + Sync,
) -> Result<CopyReport, CopyError> {
    let report = std::sync::Mutex::new(CopyReport::default());
    from.list()
        .map_err(CopyError::from)
        .try_for_each_concurrent(COPY_CONCURRENCY, |key| {
            let (report, progress) = (&report, &progress);
            async move {
                let copied = copy_one(from, to, &key).await?;
                let snapshot = {
                    let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
                    match copied {
                        Some(bytes) => {
                            r.copied += 1;
                            r.bytes += bytes;
                        }
                        None => r.skipped += 1,
                    }
                    r.clone()
                };
                progress(&snapshot);
                Ok(())
            }
        })
        .await?;
    Ok(report.into_inner().unwrap_or_else(|p| p.into_inner()))
}

/// Copy one object; `None` when the destination has it already.
pub async fn copy_one(
    from: &ObjectStore,
    to: &ObjectStore,
    key: &str,
) -> Result<Option<u64>, CopyError> {
    // A NAR's listing is named by the NAR's hash, not its own: derived data, copied as is (a
    // listing found wrong or missing can be made again from its NAR).
    let mut want = if key.starts_with("ls/") {
        None
    } else {
        Some(ContentHasher::for_key(key).ok_or_else(|| CopyError::Unverifiable(key.to_owned()))?)
    };
    if to.exists(key).await? {
        return Ok(None);
    }
    let staging = |source| CopyError::Staging {
        key: key.to_owned(),
        source,
    };
    let tmp = tempfile::Builder::new()
        .prefix("migrate-")
        .tempfile_in(to.staging_dir())
        .map_err(staging)?;
    let (file, path) = tmp.into_parts();
    let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, tokio::fs::File::from_std(file));
    let mut body = from.get(key, None).await?;
    let mut size = 0u64;
    while let Some(block) = body.stream.next().await {
        let block = block.map_err(|source| ObjectError::Io {
            key: key.to_owned(),
            source,
        })?;
        let corrupt = |e: std::io::Error| CopyError::Corrupt {
            key: key.to_owned(),
            actual: format!("(not a zstd frame: {e})"),
        };
        if let Some(w) = &mut want {
            w.update(&block).map_err(corrupt)?;
        }
        size += block.len() as u64;
        out.write_all(&block).await.map_err(staging)?;
    }
    out.flush().await.map_err(staging)?;
    if let Some(w) = want {
        let expected = *w.expected();
        let content = w.finish().map_err(|e| CopyError::Corrupt {
            key: key.to_owned(),
            actual: format!("(not a zstd frame: {e})"),
        })?;
        if content != expected {
            return Err(CopyError::Corrupt {
                key: key.to_owned(),
                actual: content.to_nix32(),
            });
        }
    }

    to.put_file(key, &path).await?;
    Ok(Some(size))
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_name_their_hash() {
        let h = "0".repeat(52);
        assert_eq!(super::expected_hash(&format!("chunk/00/{h}")), Some(&h[..]));
        assert_eq!(super::expected_hash(&format!("log/{h}")), Some(&h[..]));
        assert_eq!(super::expected_hash("chunk/00/short"), None);
    }

    #[test]
    fn content_defined_chunks_are_verified_decompressed() {
        use larder_nix::hash::Sha256;
        let raw = b"the chunk's bytes".repeat(100);
        let id = crate::meta::cdc_chunk_id(&Sha256::digest(&raw));
        let key = crate::meta::chunk_object_key(&id);
        let frame = zstd::bulk::compress(&raw, 3).unwrap();
        let check = |bytes: &[u8]| {
            let mut h = super::ContentHasher::for_key(&key).unwrap();
            let expected = *h.expected();
            h.update(bytes).and_then(|()| h.finish()).ok() == Some(expected)
        };
        assert!(check(&frame));
        assert!(!check(&frame[..frame.len() - 3]), "a cut frame");
        assert!(!check(&raw), "not a frame");
        let mut other = frame.clone();
        let last = other.len() - 1;
        other[last] ^= 1;
        assert!(!check(&other), "another content");
    }
}
