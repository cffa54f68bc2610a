//! Verifying stored NARs against their metadata (`larder fsck`).
//!
//! Every NAR a path, a pending upload or an evicted path's grace period still uses is read
//! back, chunk by chunk, in its chunk list's order ([`check_nar`]):
//! - each chunk's object exists, has the size its row records, and hashes to its name: a
//!   content-defined chunk (`<nix32>.zst`) is one zstd frame whose decompressed bytes hash to
//!   it, any other chunk's stored bytes hash to it (see [`crate::meta::ChunkName`]);
//! - the concatenation of the stored bytes has the NAR's FileHash and FileSize, and decompresses
//!   (zstd, xz or none, one stream over every chunk) to its NarHash and NarSize: exactly what
//!   Nix checks after a download.
//!
//! Memory is bounded: objects are streamed, NARs are read a page at a time in id order
//! ([`crate::Metadata::fsck_nars`]), and what a run has done fits in a [`Checkpoint`] (the last
//! NAR id finished, counters, and the damaged NARs found, which are few), so an interrupted run
//! continues after the last NAR it finished. A store that fails to answer stops the run with
//! an error; only a missing object or bytes that disagree with their name are damage.

use std::io::Write;
use std::path::Path;

use futures::StreamExt;
use larder_nix::compression::Compression;
use larder_nix::hash::{Sha256, Sha256Hasher};

use crate::meta::{MetaError, NarRow, PathUse};
use crate::objects::migrate::ContentHasher;
use crate::objects::{ObjectError, ObjectStore};
use crate::Metadata;

/// NARs read from the metadata at a time.
pub const PAGE: i64 = 64;

/// What is wrong with a stored NAR.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Damage {
    /// A chunk's object is not in the object store.
    MissingChunk { chunk: String },
    /// A chunk's object holds other bytes than its name says.
    CorruptChunk { chunk: String, problem: String },
    /// An object holding several of the NAR's chunks (a pack) is missing or cut short.
    BadObject {
        object: String,
        problem: String,
        chunks: Vec<String>,
    },
    /// The NAR's chunks are all sound, but together they are not the NAR its row describes
    /// (`field`: FileHash, FileSize, NarHash or NarSize).
    Mismatch {
        field: String,
        expected: String,
        actual: String,
    },
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::MissingChunk { chunk } => write!(f, "chunk {chunk} is missing"),
            Damage::CorruptChunk { chunk, problem } => {
                write!(f, "chunk {chunk} is corrupt: {problem}")
            }
            Damage::BadObject {
                object,
                problem,
                chunks,
            } => write!(f, "{object} {problem} ({} of its chunks)", chunks.len()),
            Damage::Mismatch {
                field,
                expected,
                actual,
            } => write!(f, "{field} is {actual}, not {expected}"),
        }
    }
}

impl Damage {
    /// The chunk whose object should be deleted by a repair: one holding wrong bytes (a new
    /// upload of the same content keeps an existing object, so a corrupt one would stay).
    pub fn corrupt_chunk(&self) -> Option<&str> {
        match self {
            Damage::CorruptChunk { chunk, .. } => Some(chunk),
            _ => None,
        }
    }

    /// The chunks whose bytes are missing (or cut short in a pack), if that is the damage.
    pub fn missing_chunks(&self) -> Vec<&str> {
        match self {
            Damage::MissingChunk { chunk } => vec![chunk],
            Damage::BadObject { chunks, .. } => chunks.iter().map(String::as_str).collect(),
            _ => Vec::new(),
        }
    }
}

/// A NAR found damaged, and the paths it was published with when it was found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DamagedNar {
    pub nar_id: i64,
    pub nar_hash: String,
    pub damage: Vec<Damage>,
    pub paths: Vec<PathUse>,
}

/// Why a check stopped: the stores failed, not the data.
#[derive(Debug, thiserror::Error)]
pub enum FsckError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Objects(#[from] ObjectError),
    #[error("reading object {key:?} failed")]
    Read {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use the checkpoint file {path}")]
    Checkpoint {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Counts bytes and hashes them: the decompressed NAR.
struct Measure {
    hasher: Sha256Hasher,
    size: u64,
}

impl Write for Measure {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.hasher.update(buf);
        self.size += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The NAR file decompressed as one stream across its chunks (concatenated frames are one
/// valid stream, as Nix reads them).
enum NarDecoder {
    None(Measure),
    Xz(xz2::write::XzDecoder<Measure>),
    Zstd(Box<zstd::stream::write::Decoder<'static, Measure>>),
    Failed(String),
}

impl NarDecoder {
    fn new(compression: Compression) -> Self {
        let m = Measure {
            hasher: Sha256Hasher::new(),
            size: 0,
        };
        match compression {
            Compression::None => NarDecoder::None(m),
            Compression::Xz => NarDecoder::Xz(xz2::write::XzDecoder::new_multi_decoder(m)),
            Compression::Zstd => match zstd::stream::write::Decoder::new(m) {
                Ok(d) => NarDecoder::Zstd(Box::new(d)),
                Err(e) => NarDecoder::Failed(format!("cannot start a zstd decoder: {e}")),
            },
        }
    }

    fn write(&mut self, block: &[u8]) {
        let r = match self {
            NarDecoder::None(m) => m.write_all(block),
            NarDecoder::Xz(d) => d.write_all(block),
            NarDecoder::Zstd(d) => d.write_all(block),
            NarDecoder::Failed(_) => return,
        };
        if let Err(e) = r {
            *self = NarDecoder::Failed(format!("the file does not decompress: {e}"));
        }
    }

    /// The NAR's hash and size, or why the file does not decompress.
    fn finish(self) -> Result<(Sha256, u64), String> {
        let m = match self {
            NarDecoder::None(m) => m,
            NarDecoder::Xz(mut d) => d
                .finish()
                .map_err(|e| format!("the file does not decompress: {e}"))?,
            NarDecoder::Zstd(mut d) => {
                d.do_finish()
                    .map_err(|e| format!("the file does not decompress: {e}"))?;
                d.into_inner()
            }
            NarDecoder::Failed(why) => return Err(why),
        };
        Ok((m.hasher.finalize(), m.size))
    }
}

/// Verify one NAR (see the module's documentation). Returns the bytes read and what is
/// wrong, if anything; an error means the stores failed and nothing was decided.
pub async fn check_nar(
    objects: &ObjectStore,
    meta: &Metadata,
    nar: &NarRow,
) -> Result<(u64, Vec<Damage>), FsckError> {
    let chunks = meta.nar_chunks(nar.id).await?;
    let mut damage = Vec::new();
    let mut file = Sha256Hasher::new();
    let mut file_size = 0u64;
    let mut decoder = NarDecoder::new(nar.compression);
    // Chunks stored together (a pack, read in ranges of at most [`GROUP_BYTES`]) are read
    // in one request; each chunk's bytes are then checked on their own.
    for run in crate::meta::runs(&chunks, GROUP_BYTES) {
        let (key, range) = (run.key, run.range);
        let group = &chunks[run.chunks];
        let packed = group[0].pack.is_some();
        let bad_object = |problem: &str| Damage::BadObject {
            object: key.clone(),
            problem: problem.to_owned(),
            chunks: group.iter().map(|c| c.chunk_hash.clone()).collect(),
        };
        let bytes = match objects.read_range(&key, range).await {
            Ok(b) => Some(b),
            Err(ObjectError::NotFound(_)) if packed => {
                damage.push(bad_object("is missing"));
                None
            }
            Err(ObjectError::NotFound(_)) => {
                damage.extend(group.iter().map(|c| Damage::MissingChunk {
                    chunk: c.chunk_hash.clone(),
                }));
                None
            }
            Err(ObjectError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                if packed {
                    damage.push(bad_object("is cut short"));
                } else {
                    damage.extend(group.iter().map(|c| Damage::CorruptChunk {
                        chunk: c.chunk_hash.clone(),
                        problem: format!("its object {key} is cut short ({source})"),
                    }));
                }
                None
            }
            Err(e) => return Err(e.into()),
        };
        let Some(bytes) = bytes else { continue };
        let mut at = 0usize;
        for chunk in group {
            let len = chunk.file_size as usize;
            let block = &bytes[at..at + len];
            at += len;
            file_size += len as u64;
            file.update(block);
            decoder.write(block);
            if let Some(problem) = check_chunk(&chunk.chunk_hash, block) {
                damage.push(Damage::CorruptChunk {
                    chunk: chunk.chunk_hash.clone(),
                    problem,
                });
            }
        }
    }
    if chunks.is_empty() {
        damage.push(Damage::Mismatch {
            field: "chunk list".into(),
            expected: "at least one chunk".into(),
            actual: "empty".into(),
        });
    }
    // A damaged chunk already explains why the whole disagrees.
    if damage.is_empty() {
        let mut mismatch = |field: &str, expected: String, actual: String| {
            if expected != actual {
                damage.push(Damage::Mismatch {
                    field: field.into(),
                    expected,
                    actual,
                });
            }
        };
        mismatch(
            "FileHash",
            nar.file_hash.to_typed_nix32(),
            file.finalize().to_typed_nix32(),
        );
        mismatch("FileSize", nar.file_size.to_string(), file_size.to_string());
        match decoder.finish() {
            Ok((hash, size)) => {
                mismatch(
                    "NarHash",
                    nar.nar_hash.to_typed_nix32(),
                    hash.to_typed_nix32(),
                );
                mismatch("NarSize", nar.nar_size.to_string(), size.to_string());
            }
            Err(why) => mismatch("NarHash", nar.nar_hash.to_typed_nix32(), why),
        }
    }
    Ok((file_size, damage))
}

/// Bytes of chunks stored together read in one request.
const GROUP_BYTES: u64 = 8 << 20;

/// What is wrong with the stored bytes of the chunk `id`, if anything: they must hash to its
/// name (a content-defined chunk's once its one zstd frame is decompressed).
fn check_chunk(id: &str, bytes: &[u8]) -> Option<String> {
    let Some(mut content) = ContentHasher::for_key(&crate::meta::chunk_object_key(id)) else {
        return Some("its name is not a content hash".to_owned());
    };
    let expected = *content.expected();
    if let Err(e) = content.update(bytes) {
        return Some(format!("its zstd frame does not decompress ({e})"));
    }
    match content.finish() {
        Ok(actual) if actual == expected => None,
        Ok(actual) => Some(format!("its content hashes to {actual}")),
        Err(e) => Some(format!("its zstd frame is cut short ({e})")),
    }
}

/// Where an fsck run is, saved after every few NARs so that an interrupted run continues
/// there. `scope` is the cache the run is limited to (`None`: every cache); a checkpoint of
/// another scope is not continued.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    pub scope: Option<String>,
    /// Every NAR with an id up to this one has been checked.
    pub after: i64,
    /// NARs checked so far, and their stored bytes.
    pub checked: u64,
    pub bytes: u64,
    /// When the run started (Unix seconds).
    pub started_at: i64,
    pub damaged: Vec<DamagedNar>,
}

impl Checkpoint {
    /// The checkpoint saved at `path`, if there is one that parses.
    pub fn load(path: &Path) -> Result<Option<Checkpoint>, FsckError> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(FsckError::Checkpoint {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Save atomically (a file beside it, renamed over it).
    pub fn save(&self, path: &Path) -> Result<(), FsckError> {
        let err = |source| FsckError::Checkpoint {
            path: path.display().to_string(),
            source,
        };
        let tmp = path.with_extension("tmp");
        let json = serde_json::to_vec(self).map_err(|e| err(e.into()))?;
        std::fs::write(&tmp, json).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// Forget the checkpoint at `path` (a finished or restarted run).
    pub fn remove(path: &Path) -> Result<(), FsckError> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(FsckError::Checkpoint {
                path: path.display().to_string(),
                source,
            }),
        }
    }
}

/// NARs verified at once (reads overlap with hashing).
pub const CONCURRENCY: usize = 4;

/// Check every NAR in use in `scope` (a cache id, or every cache) after `state.after`, in id
/// order, updating `state` as each finishes; `after_each` is called then, with the NAR's
/// damage if it has any (to save the checkpoint now and then, report progress, print).
pub async fn run(
    objects: &ObjectStore,
    meta: &Metadata,
    scope: Option<i64>,
    state: &mut Checkpoint,
    mut after_each: impl FnMut(&Checkpoint, Option<&DamagedNar>) -> Result<(), FsckError>,
) -> Result<(), FsckError> {
    loop {
        let page = meta.fsck_nars(scope, state.after, PAGE).await?;
        if page.is_empty() {
            return Ok(());
        }
        let mut checked = futures::stream::iter(page)
            .map(|nar| async move {
                let r = check_nar(objects, meta, &nar).await;
                (nar, r)
            })
            .buffered(CONCURRENCY);
        while let Some((nar, result)) = checked.next().await {
            let (bytes, damage) = result?;
            state.after = nar.id;
            state.checked += 1;
            state.bytes += bytes;
            // A NAR that stopped being used while it was read may have lost its objects to
            // garbage collection: not damage, it is gone.
            if damage.is_empty() || !meta.nar_in_use(nar.id, scope).await? {
                after_each(state, None)?;
                continue;
            }
            let found = DamagedNar {
                nar_id: nar.id,
                nar_hash: nar.nar_hash.to_typed_nix32(),
                damage,
                paths: meta.nar_paths(nar.id, scope).await?,
            };
            state.damaged.push(found.clone());
            after_each(state, Some(&found))?;
        }
    }
}
