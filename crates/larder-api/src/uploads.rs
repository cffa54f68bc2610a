//! Uploads: a NAR sent whole (`POST /caches/{c}/nars`) or in parts (`/caches/{c}/multipart…`),
//! what the server measured of it ([`Upload`]), and the store path published with it
//! ([`PublishRequest`] to `POST /caches/{c}/paths`).

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
