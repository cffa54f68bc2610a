//! Copy every object of one store into another (`larder migrate --from file://… --to s3://…`).
//!
//! Verifiable: every key ends in the nix32 SHA-256 of its object's bytes (`chunk/ab/<hash>`,
//! `log/<hash>`), and each object is hashed while it is copied and stored only when it matches.
//! Resumable: objects the destination already has are skipped (stores are written atomically,
//! so an object that exists is complete), so an interrupted copy just runs again.
//! Memory is bounded: each object goes through a staging file of the destination.

use futures::{StreamExt, TryStreamExt};
use larder_nix::hash::Sha256Hasher;
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
    let want = if key.starts_with("ls/") {
        None
    } else {
        Some(expected_hash(key).ok_or_else(|| CopyError::Unverifiable(key.to_owned()))?)
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
    let mut hasher = Sha256Hasher::new();
    let mut size = 0u64;
    while let Some(block) = body.stream.next().await {
        let block = block.map_err(|source| ObjectError::Io {
            key: key.to_owned(),
            source,
        })?;
        hasher.update(&block);
        size += block.len() as u64;
        out.write_all(&block).await.map_err(staging)?;
    }
    out.flush().await.map_err(staging)?;
    let actual = hasher.finalize().to_nix32();
    if want.is_some_and(|want| actual != want) {
        return Err(CopyError::Corrupt {
            key: key.to_owned(),
            actual,
        });
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
}
