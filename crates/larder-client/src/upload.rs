//! What every upload of a push shares, and what the push pipeline ([`crate::push`]), its
//! multi-part uploads ([`crate::multipart`]) and its realisations ([`crate::realisations`])
//! all speak: the options, where NARs come from, the progress events, the errors (and which
//! are worth a retry), the server's answer to an upload. A leaf under those three: it uses
//! the API client and the local store only. `push` re-exports the public items, their
//! documented home.

use std::io::{self, Write};
use std::sync::Arc;
use std::time::Duration;

use larder_api::Upload;
use larder_nix::signing::SigningKey;
use regex::Regex;
use serde::Serialize;

use crate::api::ClientError;
use crate::local_store::{dump_unverified, dump_verified, LocalStoreError, NarMismatch, PathInfo};

/// Default part size of multi-part uploads (NAR bytes per part).
pub const DEFAULT_PART_SIZE: u64 = 32 << 20;

pub use larder_nix::compression::Compression;

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Store(#[from] LocalStoreError),
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A reference (named) that this run was to push failed.
    #[error("not published: a path it references failed to push ({0})")]
    DependencyFailed(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Where the NARs of a push come from when not from the local store: another binary cache
/// for `larder import`.
pub trait NarSource: Send + Sync {
    /// Stream the NAR of `info` into `out`, checked against `info.nar_hash` and
    /// `info.nar_size` (an error at the end means: discard what was written). Blocking; called
    /// on a blocking thread. Failures of `out` are [`LocalStoreError::Write`].
    fn write_nar(&self, info: &PathInfo, out: &mut dyn Write) -> Result<(), LocalStoreError>;
}

/// A shared [`NarSource`].
#[derive(Clone)]
pub struct SourceRef(pub Arc<dyn NarSource>);

impl std::fmt::Debug for SourceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SourceRef(..)")
    }
}

/// Stream `info`'s NAR from `source` (the local store when `None`) into `out`, telling
/// `observer` how many NAR bytes went through ([`Observer::nar_bytes`]).
///
/// From the local store it is hashed on the way only with [`Verify::Here`] (see [`Verify`]).
pub(crate) fn write_nar<W: Write>(
    source: &Option<SourceRef>,
    info: &PathInfo,
    out: W,
    verify: Verify,
    observer: &Arc<dyn Observer>,
) -> Result<W, LocalStoreError> {
    let out = CountedNar {
        inner: out,
        observer: observer.clone(),
    };
    let out = match source {
        None => match verify {
            Verify::Here => dump_verified(info, out)?,
            Verify::ByServer => dump_unverified(info, out)?,
        },
        Some(s) => {
            let mut out = out;
            s.0.write_nar(info, &mut out)?;
            out
        }
    };
    Ok(out.inner)
}

/// Who checks that a NAR read from the local store is what the Nix database records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verify {
    /// [`write_nar`] hashes it on the way and fails at the end if it differs.
    Here,
    /// The server that receives it: it measures every NAR, and the push compares its answer
    /// with the record ([`UploadResp::check`]) before publishing, so a corrupt path is
    /// refused with the same error. This spares a SHA-256 pass over every NAR the client
    /// sends, which on a machine that also runs the server is CPU taken from the server's
    /// own verification. Not for uploads in parts: their completion only says that the NAR
    /// differs from the one the upload was opened for, which a resumed upload written with
    /// other part sizes also causes.
    ByServer,
}

/// Counts the (uncompressed) NAR bytes written through it for the observer.
struct CountedNar<W> {
    inner: W,
    observer: Arc<dyn Observer>,
}

impl<W: Write> Write for CountedNar<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        self.observer.nar_bytes(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[derive(Debug, Clone)]
pub struct PushOptions {
    pub jobs: usize,
    pub compression: Compression,
    pub level: i32,
    /// Push the closures of the given paths (default) or just the paths.
    pub closure: bool,
    pub exclude: Vec<Regex>,
    pub include_upstream: bool,
    /// Key names whose signature marks a path as available upstream.
    pub upstream_keys: Vec<String>,
    pub omit_deriver: bool,
    pub signing_key: Option<SigningKey>,
    /// Attempts per path (or part) on network errors, stalls, 408, 429 and 5xx.
    pub attempts: u32,
    /// NARs larger than this are uploaded in parts of this many NAR bytes, each retried on its
    /// own, so a dropped connection or a proxy's body limit costs one part.
    pub part_size: u64,
    /// Where NARs come from; `None`: the local store.
    pub source: Option<SourceRef>,
    /// An upload request that makes no progress this long fails (and is retried like a
    /// dropped connection): see `crate::stall`. `None`: wait forever.
    pub stall_timeout: Option<Duration>,
    /// Cut NARs of at least `push::MIN_CHUNKED_NAR` bytes into content-defined chunks and
    /// upload only those the cache lacks (`crate::chunked`); otherwise upload every NAR whole
    /// (or in parts) and let the server chunk it.
    pub chunking: bool,
    /// Send NARs under `push::MIN_CHUNKED_NAR` many to a request with their metadata
    /// (`crate::batch`); otherwise each path with two requests of its own.
    pub batching: bool,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            jobs: 8,
            compression: Compression::Zstd,
            level: 3,
            closure: true,
            exclude: Vec::new(),
            include_upstream: false,
            upstream_keys: vec![larder_nix::signing::CACHE_NIXOS_ORG_KEY_NAME.into()],
            omit_deriver: false,
            signing_key: None,
            attempts: 4,
            part_size: DEFAULT_PART_SIZE,
            source: None,
            stall_timeout: Some(crate::stall::DEFAULT_STALL_TIMEOUT),
            chunking: true,
            batching: true,
        }
    }
}

/// How one path ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Pushed {
        /// The stored (compressed) size of its NAR.
        file_size: u64,
        /// What this run sent of it: less than `file_size` when an interrupted upload resumed.
        uploaded: u64,
        secs: f64,
    },
    /// The server already had it (pushed concurrently by someone else).
    AlreadyPresent,
    /// Deleted from the local store after planning (e.g. by garbage collection).
    Vanished,
    Failed {
        /// The error, on one line ([`error_line`]).
        error: String,
        /// What this run sent of it before it failed (a NAR the server received and measured
        /// as not the one the store records, say; 0 when the upload itself failed).
        uploaded: u64,
    },
}

/// The line that reports a path's failure: `PATH: ERROR`, or the error alone when it names
/// the path already (`store path PATH is corrupt …`).
pub fn failure_line(path: &str, error: &str) -> String {
    if error.contains(path) {
        error.to_owned()
    } else {
        format!("{path}: {error}")
    }
}

/// Receives progress as the push runs (called from several tasks).
pub trait Observer: Send + Sync {
    fn started(&self, _path: &PathInfo) {}
    /// Compressed bytes handed to the network.
    fn bytes(&self, _n: u64) {}
    /// NAR bytes read and compressed (the unit of the plan's total size, so a progress bar in
    /// it is true whatever the compression ratio).
    fn nar_bytes(&self, _n: u64) {}
    /// A multi-part upload of `path` resumes: the server already holds `parts` parts with its
    /// first `nar_bytes` NAR bytes, which count as processed (a progress bar starts there).
    fn resumed(&self, _path: &PathInfo, _parts: u32, _nar_bytes: u64) {}
    /// The server now holds `parts` parts of `path`'s multi-part upload, with its first
    /// `nar_bytes` NAR bytes: what an interrupted push leaves for the next run to resume
    /// (`0, 0` once the upload is complete: nothing is left to resume).
    fn parts_kept(&self, _path: &PathInfo, _parts: u32, _nar_bytes: u64) {}
    fn finished(&self, _path: &PathInfo, _outcome: &Outcome) {}
    /// A retry after a transient error.
    fn retrying(&self, _path: &PathInfo, _error: &str, _attempt: u32) {}
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub path: String,
    pub error: String,
}

/// An error on one line: the error and its causes (each once), for progress and log lines.
pub fn error_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    // A hint stays apart from the error it follows.
    s.replace("\nhint: ", "; hint: ").replace('\n', " ")
}

/// A definitive refusal by the server (a 4xx other than 408 and 429): sending the same request
/// again cannot succeed.
pub(crate) fn refused(e: &PushError) -> bool {
    matches!(e, PushError::Client(c @ ClientError::Status { status: 400..=499, .. }) if !c.is_transient())
}

/// For a transient failure, how long the server asked to wait (if it did).
pub(crate) fn transient(e: &PushError) -> Option<Option<Duration>> {
    match e {
        PushError::Client(c) => c.retry_wait(),
        _ => None,
    }
}

/// What the server measured of an uploaded NAR (the fields the push needs).
pub(crate) struct UploadResp {
    pub(crate) upload_id: String,
    pub(crate) file_size: u64,
    /// The NarHash (`sha256:<nix32>`) and NarSize the server measured.
    pub(crate) nar_hash: String,
    pub(crate) nar_size: u64,
}

impl UploadResp {
    /// Whether the server received `info`'s NAR as the store records it: a
    /// [`LocalStoreError::Corrupt`] naming the path otherwise (its contents on disk differ
    /// from the Nix database's record; see [`Verify::ByServer`]).
    pub(crate) fn check(&self, info: &PathInfo) -> Result<(), LocalStoreError> {
        let measured = larder_nix::hash::Sha256::parse(&self.nar_hash).ok();
        if measured == Some(info.nar_hash) && self.nar_size == info.nar_size {
            return Ok(());
        }
        Err(LocalStoreError::Corrupt {
            path: info.path.clone(),
            mismatch: Box::new(NarMismatch {
                expected_hash: info.nar_hash,
                // Unreadable only from a broken server; the sizes then tell the story.
                actual_hash: measured.unwrap_or(info.nar_hash),
                expected_size: info.nar_size,
                actual_size: self.nar_size,
            }),
        })
    }
}

impl From<Upload> for UploadResp {
    fn from(u: Upload) -> Self {
        UploadResp {
            upload_id: u.upload_id,
            // A size is never negative; were it, nothing of it was sent.
            file_size: u64::try_from(u.file_size).unwrap_or(0),
            nar_size: u64::try_from(u.nar_size).unwrap_or(0),
            nar_hash: u.nar_hash,
        }
    }
}
