//! How a NAR file in a binary cache is compressed: the narinfo `Compression:` field and the
//! file extension after `.nar` (Nix's src/libstore/binary-cache-store.cc names files
//! `nar/<filehash>.nar<ext>`). larder stores and serves zstd, xz and uncompressed NARs.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Xz,
    Zstd,
}

impl Compression {
    /// Every supported compression.
    pub const ALL: [Compression; 3] = [Compression::Zstd, Compression::Xz, Compression::None];

    /// From the narinfo spelling: `none`, `xz`, `zstd`.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
        }
    }

    /// The file extension after `.nar` (`""`, `.xz`, `.zst`).
    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Xz => ".xz",
            Compression::Zstd => ".zst",
        }
    }

    /// From the part of a NAR file name after the hash: `nar`, `nar.xz`, `nar.zst`.
    pub fn from_nar_suffix(suffix: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|c| suffix.strip_prefix("nar") == Some(c.extension()))
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_suffixes_round_trip() {
        for c in Compression::ALL {
            assert_eq!(Compression::from_name(c.as_str()), Some(c));
            assert_eq!(
                Compression::from_nar_suffix(&format!("nar{}", c.extension())),
                Some(c)
            );
        }
        assert_eq!(Compression::from_name("bzip2"), None);
        assert_eq!(Compression::from_nar_suffix("nar.bz2"), None);
        assert_eq!(Compression::from_nar_suffix("narx"), None);
    }
}
