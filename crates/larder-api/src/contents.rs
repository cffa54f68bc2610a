//! A cache's contents: the path list (`GET /caches/{c}/paths`), one path in detail
//! (`GET /caches/{c}/paths/{path}`) and what a deletion removed.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One path of a cache's contents list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PathEntry {
    pub store_path: String,
    pub hash: String,
    pub name: String,
    pub nar_size: i64,
    /// Stored (compressed) bytes.
    pub file_size: i64,
    pub compression: String,
    /// Unix time of publication.
    pub uploaded_at: i64,
    /// Unix time of the last narinfo or NAR fetch; null: never fetched.
    pub last_used_at: Option<i64>,
    /// The upstream cache the path was fetched from (pull-through); null: pushed (older
    /// servers: absent).
    #[serde(default)]
    pub upstream: Option<String>,
}

/// One page of a cache's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PathList {
    pub paths: Vec<PathEntry>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
    /// Paths matching the query, on every page.
    pub total: i64,
}

/// A reference of a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Reference {
    pub store_path: String,
    /// False: accepted as available upstream (signed by an upstream key).
    pub in_cache: bool,
}

/// A pin revision whose closure holds a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PinRef {
    pub name: String,
    pub revision: i64,
    /// The pinned path whose closure holds this one (it may be this one).
    pub store_path: String,
}

/// One path of a cache in detail (`larder path-info`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PathDetail {
    pub store_path: String,
    pub hash: String,
    pub name: String,
    pub url: String,
    pub compression: String,
    pub file_hash: String,
    pub file_size: i64,
    pub nar_hash: String,
    pub nar_size: i64,
    pub references: Vec<Reference>,
    pub deriver: Option<String>,
    pub ca: Option<String>,
    pub sigs: Vec<String>,
    /// Paths of the cache that reference this one directly (at most 1000, by name).
    pub referrers: Vec<String>,
    pub referrer_count: i64,
    /// Pin revisions whose closure holds this path (eviction never removes it).
    pub pins: Vec<PinRef>,
    pub uploaded_at: i64,
    pub last_used_at: Option<i64>,
    /// The upstream cache the path was fetched from; null: pushed (older servers: absent).
    #[serde(default)]
    pub upstream: Option<String>,
    /// The narinfo as served.
    pub narinfo: String,
}

/// One path removed by a deletion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeletedPath {
    pub store_path: String,
    /// Stored (compressed) bytes freed.
    pub file_size: i64,
}

/// What `DELETE /caches/{cache}/paths/{path}` removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeleteReport {
    pub cache: String,
    /// The requested path first, then its referrers.
    pub deleted: Vec<DeletedPath>,
    pub freed: i64,
}
