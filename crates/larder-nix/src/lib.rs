//! The Nix formats a binary cache speaks, as pure Rust: store paths, nixbase32, SHA-256 hashes,
//! NAR reading/writing and listings, narinfo, nix-cache-info and ed25519 signing.
//!
//! Nothing here does I/O except `nar::dump` (behind the `fs` feature), and no input makes any
//! function panic: every parser returns a module-specific error saying which field and value
//! was wrong. Each module documents the Nix source file whose format it follows (Nix 2.8).

pub mod cache_info;
pub mod chunking;
pub mod compression;
pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub mod realisation;
pub mod signing;
pub mod size;
pub mod store_path;
pub mod url;
mod util;

pub use cache_info::CacheInfo;
pub use hash::Sha256;
pub use narinfo::NarInfo;
pub use signing::{Signature, SigningKey, VerifyingKey};
pub use store_path::StorePath;
