//! larder's HTTP API on the wire.
//!
//! One definition of every JSON body the server answers and the client sends, shared by
//! `larder-server` and `larder-client`, so a renamed field fails to compile instead of reading
//! as a default. Pure types: no I/O, no dependency on the server or the client.
//!
//! Every type derives `utoipa::ToSchema`: the server's OpenAPI document
//! (`/api/v1/openapi.json`) is generated from these definitions, and its tests check that the
//! server's answers and the client's requests match it.

mod caches;
mod contents;
mod error;
mod oidc;
mod retention;
mod stats;
mod tokens;
mod uploads;

pub use caches::{
    Cache, ConfigureCache, CreateCache, MissingRequest, MissingResponse, RegisterKey, Size, WhoAmI,
    COMPRESSIONS,
};
pub use contents::{DeleteReport, DeletedPath, PathDetail, PathEntry, PathList, PinRef, Reference};
pub use error::ErrorBody;
pub use oidc::OidcExchange;
pub use retention::{GcReport, Keep, Pin, PinRequest, Reason, Victim};
pub use stats::{CacheStats, DayStats};
pub use tokens::{CreateToken, Token};
pub use uploads::{
    AssembleRequest, BatchOutcome, BatchPublished, BatchStatus, ChunksMissingRequest,
    ChunksMissingResponse, ChunksStored, MultipartDetail, MultipartList, MultipartOpened,
    MultipartPart, MultipartUpload, PathMetadata, PublishRequest, PublishStatus, Published,
    StoredChunk, Upload, UpstreamRef,
};

use std::fmt;
use std::str::FromStr;

/// A permission on a cache (or on every cache). They nest: `admin` implies `push`, and `push`
/// implies `pull`.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Perm {
    Pull,
    Push,
    Admin,
}

impl Perm {
    /// Every permission, weakest first.
    pub const ALL: [Perm; 3] = [Perm::Pull, Perm::Push, Perm::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Perm::Pull => "pull",
            Perm::Push => "push",
            Perm::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Perm> {
        Perm::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// `perms` as words between `sep`: `pull+push`.
    pub fn join(perms: &[Perm], sep: &str) -> String {
        perms
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join(sep)
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A word that is not `pull`, `push` or `admin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownPerm(pub String);

impl fmt::Display for UnknownPerm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown permission {:?} (expected pull, push or admin)",
            self.0
        )
    }
}

impl std::error::Error for UnknownPerm {}

impl FromStr for Perm {
    type Err = UnknownPerm;
    fn from_str(s: &str) -> Result<Perm, UnknownPerm> {
        Perm::parse(s).ok_or_else(|| UnknownPerm(s.to_owned()))
    }
}

/// Every schema of the API, by the name its OpenAPI document gives it: the document's
/// `components.schemas` (the server adds the operations).
#[derive(utoipa::OpenApi)]
#[openapi(components(schemas(
    ErrorBody,
    WhoAmI,
    Perm,
    Size,
    Cache,
    CreateCache,
    ConfigureCache,
    RegisterKey,
    MissingRequest,
    MissingResponse,
    Upload,
    ChunksMissingRequest,
    ChunksMissingResponse,
    StoredChunk,
    ChunksStored,
    AssembleRequest,
    MultipartOpened,
    MultipartUpload,
    MultipartList,
    MultipartPart,
    MultipartDetail,
    UpstreamRef,
    PublishRequest,
    PublishStatus,
    Published,
    PathEntry,
    PathList,
    Reference,
    PinRef,
    PathDetail,
    DeletedPath,
    DeleteReport,
    Reason,
    Victim,
    GcReport,
    Keep,
    PinRequest,
    Pin,
    CacheStats,
    DayStats,
    CreateToken,
    Token,
    OidcExchange,
)))]
pub struct Schemas;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_read_back_as_written() {
        for p in Perm::ALL {
            assert_eq!(p.as_str().parse::<Perm>(), Ok(p));
        }
        assert!("root".parse::<Perm>().is_err());
        assert!(Perm::Pull < Perm::Push && Perm::Push < Perm::Admin);
        assert_eq!(Perm::join(&[Perm::Pull, Perm::Admin], "+"), "pull+admin");
    }

    #[test]
    fn every_schema_is_registered_under_its_wire_name() {
        use utoipa::OpenApi as _;
        let components = Schemas::openapi().components.unwrap_or_default();
        for name in [
            "Error",
            "Cache",
            "Token",
            "Perm",
            "Keep",
            "Victim",
            "Reference",
        ] {
            assert!(components.schemas.contains_key(name), "{name}");
        }
        // Every `$ref` points at a registered schema.
        let text = serde_json::to_string(&components.schemas).unwrap();
        for r in text.split("#/components/schemas/").skip(1) {
            let name: String = r.chars().take_while(|c| c.is_alphanumeric()).collect();
            assert!(
                components.schemas.contains_key(&name),
                "dangling $ref {name}"
            );
        }
    }
}
