//! Where larder's bytes and metadata live.
//!
//! - [`objects`]: the object store holding NAR chunks and build logs: a local directory, or a
//!   bucket of any S3-compatible store; [`objects::migrate`] copies one into another.
//! - [`meta`]: the metadata database (caches, tokens, NARs and their chunks, store paths,
//!   pending uploads), behind one query layer (`sqlx`'s `Any` driver) so SQLite and PostgreSQL
//!   share every query.
//! - [`fsck`]: reading every stored NAR back against its metadata (`larder fsck`).
//! - [`orphans`]: the scan that deletes objects no metadata names (left by a restored backup
//!   or an interrupted copy), guarded against a database that is not the store's.
//!
//! Nothing here knows about HTTP: the server maps these errors to status codes.

pub mod fsck;
pub mod meta;
pub mod objects;
pub mod orphans;

pub use meta::{MetaError, Metadata};
pub use objects::{
    ListedObject, ObjectBody, ObjectError, ObjectStore, OpenOptions, S3Credentials, Secret,
};

/// Seconds since the Unix epoch, the unit of every timestamp in the metadata.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
