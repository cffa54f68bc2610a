//! The Nix ARchive (NAR) format: a canonical serialisation of a file system object.
//!
//! Follows `dump` and `parseDump` in Nix's
//! [`src/libutil/archive.cc`](https://github.com/NixOS/nix/blob/2.8.0/src/libutil/archive.cc).
//! Every token is a *string*: a little-endian `u64` length, the bytes, and zero bytes up to the
//! next multiple of 8. The grammar (all literals are such strings):
//!
//! ```text
//! nar       = "nix-archive-1" node
//! node      = "(" "type" ( regular | symlink | directory ) ")"
//! regular   = "regular" [ "executable" "" ] "contents" <file contents as one string>
//! symlink   = "symlink" "target" <target>
//! directory = "directory" { "entry" "(" "name" <name> "node" node ")" }
//! ```
//!
//! Directory entries are sorted by the raw bytes of their names and unique, so a tree has exactly
//! one NAR and one NAR hash. [`write`](mod@write) produces NARs, [`parse`] checks and hashes them without
//! buffering file contents, and [`listing`] is the `.ls` JSON that describes one.

pub mod listing;
pub mod parse;
pub mod write;

#[cfg(feature = "fs")]
pub mod dump;

/// The first string of every NAR.
pub const MAGIC: &str = "nix-archive-1";

/// Bytes of zero padding after a string of `len` bytes.
pub(crate) const fn padding(len: u64) -> u64 {
    (8 - len % 8) % 8
}
