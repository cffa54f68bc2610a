//! Uploads: a NAR sent whole (`POST /caches/{c}/nars`) or in parts (`/caches/{c}/multipart…`),
//! what the server measured of it ([`Upload`]), and the store path published with it
//! ([`PublishRequest`] to `POST /caches/{c}/paths`); or small paths sent with their NARs, many
//! in one request (`POST /caches/{c}/paths/batch`: [`PathMetadata`], [`BatchPublished`]).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What the server measured of an uploaded NAR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Upload {
    pub upload_id: String,
    /// sha256:<nix32>, measured by the server.
    pub nar_hash: String,
    pub nar_size: i64,
    /// sha256:<nix32> of the stored (compressed) file.
    pub file_hash: String,
    pub file_size: i64,
    pub compression: String,
}

/// Signed metadata of a reference available upstream (not pushed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamRef {
    pub store_path: String,
    pub nar_hash: String,
    pub nar_size: u64,
    #[serde(default)]
    pub references: Vec<String>,
    #[serde(default)]
    pub sigs: Vec<String>,
}

/// `POST /caches/{cache}/paths`: publish a store path whose NAR was uploaded as `upload_id`;
/// its metadata must match what the server measured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    pub upload_id: String,
    pub store_path: String,
    pub nar_hash: String,
    pub nar_size: u64,
    #[serde(default)]
    pub references: Vec<String>,
    pub deriver: Option<String>,
    pub ca: Option<String>,
    #[serde(default)]
    pub sigs: Vec<String>,
    /// Signed metadata of references available upstream (not pushed).
    #[serde(default)]
    pub upstream: Vec<UpstreamRef>,
}

/// A store path's metadata as a client declares it: what [`PublishRequest`] publishes with an
/// uploaded NAR, and what each path of a batch carries (`POST /caches/{cache}/paths/batch`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PathMetadata {
    pub store_path: String,
    pub nar_hash: String,
    pub nar_size: u64,
    #[serde(default)]
    pub references: Vec<String>,
    pub deriver: Option<String>,
    pub ca: Option<String>,
    #[serde(default)]
    pub sigs: Vec<String>,
    /// Signed metadata of references available upstream (not pushed).
    #[serde(default)]
    pub upstream: Vec<UpstreamRef>,
}

impl PublishRequest {
    pub fn new(upload_id: String, m: PathMetadata) -> Self {
        PublishRequest {
            upload_id,
            store_path: m.store_path,
            nar_hash: m.nar_hash,
            nar_size: m.nar_size,
            references: m.references,
            deriver: m.deriver,
            ca: m.ca,
            sigs: m.sigs,
            upstream: m.upstream,
        }
    }

    /// The upload id and the path's metadata.
    pub fn into_parts(self) -> (String, PathMetadata) {
        let m = PathMetadata {
            store_path: self.store_path,
            nar_hash: self.nar_hash,
            nar_size: self.nar_size,
            references: self.references,
            deriver: self.deriver,
            ca: self.ca,
            sigs: self.sigs,
            upstream: self.upstream,
        };
        (self.upload_id, m)
    }
}

/// What became of each path of a batch (`POST /caches/{cache}/paths/batch`), in the order
/// they were sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BatchPublished {
    pub paths: Vec<BatchOutcome>,
}

/// One path of a batch and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BatchOutcome {
    pub store_path: String,
    #[serde(flatten)]
    pub status: BatchStatus,
    /// sha256:<nix32> of the NAR sent for this path, measured by the server (absent when what
    /// was sent is not a NAR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nar_hash: Option<String>,
    /// Its size, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nar_size: Option<u64>,
}

/// What became of one path of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum BatchStatus {
    /// Published, its NAR stored as a file of `file_size` bytes.
    Created { file_size: i64 },
    /// The cache had the path with the same NAR.
    AlreadyPresent,
    /// Not published: the HTTP status and message a single upload would have been answered.
    Failed { code: u16, error: String },
    /// Not published: the server cannot take this one in a batch (its NAR shares chunks
    /// stored in another form); send it on its own (`POST …/nars`, then `POST …/paths`).
    SendAlone,
}

/// Whether a publication made the path or found it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PublishStatus {
    Created,
    AlreadyPresent,
}

/// The answer to [`PublishRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Published {
    pub store_path: String,
    pub status: PublishStatus,
}

/// `POST /caches/{cache}/multipart`: the new upload's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MultipartOpened {
    pub upload_id: String,
}

/// An unfinished multi-part upload on the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MultipartUpload {
    pub upload_id: String,
    pub compression: String,
    /// sha256:<nix32> the upload was opened for, if the client said.
    pub nar_hash: Option<String>,
    pub nar_size: Option<u64>,
    /// Parts stored, whatever their numbers.
    pub part_count: usize,
    /// Their stored (compressed) bytes.
    pub part_bytes: u64,
    /// Unix seconds of the last part stored (or of opening).
    pub updated_at: i64,
    /// Unix seconds when it is deleted unless a part comes first.
    pub expires_at: i64,
}

/// `GET /caches/{cache}/multipart`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MultipartList {
    pub uploads: Vec<MultipartUpload>,
}

/// One stored part of a multi-part upload, measured by the server when it stored it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MultipartPart {
    pub n: u32,
    pub file_size: u64,
    /// sha256:<nix32> of the part as stored.
    pub file_hash: String,
    /// NAR bytes it decompresses to on its own; null when it does not (a client sends such a
    /// part again).
    pub nar_size: Option<u64>,
    /// sha256:<nix32> of those NAR bytes.
    pub nar_hash: Option<String>,
}

/// A multi-part upload with its parts (`GET /caches/{cache}/multipart/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MultipartDetail {
    #[serde(flatten)]
    pub upload: MultipartUpload,
    /// Every stored part, by number.
    pub parts: Vec<MultipartPart>,
}

/// `POST /caches/{cache}/chunks/missing`: which content-defined chunks of a NAR being pushed
/// the cache lacks. A chunk counts as present only when the cache can see it (a NAR of its
/// paths, pending uploads or recently evicted paths uses it) or it was uploaded under the same
/// `session`; never because another cache holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChunksMissingRequest {
    /// The push session: what `POST …/chunks` and `POST …/chunks/assemble` name too (larder
    /// uses the NAR's hash in nix32, so a rerun of an interrupted push finds its chunks).
    #[schema(pattern = "^[0-9a-z]{1,64}$")]
    pub session: String,
    /// Chunk ids: `<nix32 of the SHA-256 of the chunk's uncompressed bytes>.zst`.
    pub chunks: Vec<String>,
}

/// The answer to [`ChunksMissingRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ChunksMissingResponse {
    /// The given chunks to upload, in input order (each once).
    pub missing: Vec<String>,
}

/// One chunk stored by `POST /caches/{cache}/chunks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StoredChunk {
    /// Its id, computed by the server from the bytes the frame decompresses to.
    pub id: String,
    /// Its uncompressed size.
    pub size: u64,
}

/// The answer to `POST /caches/{cache}/chunks`: the frames of the body, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ChunksStored {
    pub chunks: Vec<StoredChunk>,
}

/// `POST /caches/{cache}/chunks/assemble`: make a pending upload of the NAR that is the
/// concatenation of these chunks. The server reads every chunk, recomputes NarHash, NarSize,
/// FileHash and FileSize and checks the cut points are its own; the answer is an [`Upload`]
/// to publish like any other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssembleRequest {
    #[schema(pattern = "^[0-9a-z]{1,64}$")]
    pub session: String,
    /// The NAR's chunk ids, in order.
    pub chunks: Vec<String>,
}
