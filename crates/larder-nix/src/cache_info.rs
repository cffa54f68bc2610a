//! `nix-cache-info`: the file at the root of a binary cache that says which store it serves.
//!
//! Follows `BinaryCacheStore::init` in Nix's
//! [`src/libstore/binary-cache-store.cc`](https://github.com/NixOS/nix/blob/2.8.0/src/libstore/binary-cache-store.cc).
//! Lines are `Key: value`; Nix reads `StoreDir`, `WantMassQuery` (true only when `1`) and
//! `Priority`, trims values, skips lines without a colon and ignores unknown keys, and so does
//! this parser. A missing `StoreDir` is taken as `/nix/store` (Nix does not insist on it either).
//! Printing always gives this layout, `Priority` only when set:
//!
//! ```text
//! StoreDir: /nix/store
//! WantMassQuery: 1
//! Priority: 41
//! ```

use std::fmt;

use crate::store_path::STORE_DIR;
use crate::util::shorten;

/// Why a nix-cache-info was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheInfoError {
    /// `Priority` is not a non-negative integer.
    #[error("nix-cache-info has invalid Priority {value:?}")]
    Priority {
        /// The value (shortened).
        value: String,
        /// Why.
        #[source]
        source: std::num::ParseIntError,
    },
    /// `StoreDir` is not an absolute path without whitespace or control characters.
    #[error("nix-cache-info has invalid StoreDir {value:?}")]
    StoreDir {
        /// The value (shortened).
        value: String,
    },
}

/// The contents of `nix-cache-info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheInfo {
    /// The store directory the cache's paths belong to (Nix refuses a cache for another one).
    pub store_dir: String,
    /// Whether Nix may query many paths at once (for `nix path-info --all` style queries).
    pub want_mass_query: bool,
    /// Substituter priority: lower is tried first (cache.nixos.org is 40).
    pub priority: Option<u32>,
}

impl CacheInfo {
    /// What a cache of `/nix/store` paths with the given priority serves.
    pub fn new(priority: Option<u32>) -> Self {
        Self {
            store_dir: STORE_DIR.to_owned(),
            want_mass_query: true,
            priority,
        }
    }

    /// Parse the file the way Nix does; see the module docs.
    pub fn parse(text: &str) -> Result<Self, CacheInfoError> {
        let mut info = CacheInfo {
            store_dir: STORE_DIR.to_owned(),
            want_mass_query: false,
            priority: None,
        };
        for line in text.split('\n') {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key {
                "StoreDir" => {
                    if !value.starts_with('/')
                        || value.chars().any(|c| c.is_whitespace() || c.is_control())
                    {
                        return Err(CacheInfoError::StoreDir {
                            value: shorten(value),
                        });
                    }
                    info.store_dir = value.to_owned();
                }
                "WantMassQuery" => info.want_mass_query = value == "1",
                "Priority" => {
                    let p = value
                        .parse::<u32>()
                        .map_err(|source| CacheInfoError::Priority {
                            value: shorten(value),
                            source,
                        })?;
                    info.priority = Some(p);
                }
                _ => {}
            }
        }
        Ok(info)
    }
}

impl fmt::Display for CacheInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "StoreDir: {}", self.store_dir)?;
        writeln!(f, "WantMassQuery: {}", u8::from(self.want_mass_query))?;
        if let Some(p) = self.priority {
            writeln!(f, "Priority: {p}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for CacheInfo {
    type Err = CacheInfoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn roundtrip_layout() {
        let text = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 41\n";
        let info = CacheInfo::parse(text).unwrap();
        assert_eq!(info, CacheInfo::new(Some(41)));
        assert_eq!(info.to_string(), text);
        let no_prio = CacheInfo::new(None);
        assert_eq!(
            no_prio.to_string(),
            "StoreDir: /nix/store\nWantMassQuery: 1\n"
        );
    }

    #[test]
    fn lenient_like_nix() {
        // What `nix copy --to file://…` writes.
        let info = CacheInfo::parse("StoreDir: /nix/store\n").unwrap();
        assert_eq!(info.store_dir, "/nix/store");
        assert!(!info.want_mass_query);
        assert_eq!(info.priority, None);
        let info =
            CacheInfo::parse("garbage\nWantMassQuery:  1  \r\nX-Other: y\nPriority:40").unwrap();
        assert!(info.want_mass_query);
        assert_eq!(info.priority, Some(40));
        assert_eq!(CacheInfo::parse("").unwrap().store_dir, STORE_DIR);
        assert!(
            !CacheInfo::parse("WantMassQuery: true\n")
                .unwrap()
                .want_mass_query
        );
    }

    #[test]
    fn rejects() {
        assert!(matches!(
            CacheInfo::parse("Priority: high\n"),
            Err(CacheInfoError::Priority { .. })
        ));
        assert!(matches!(
            CacheInfo::parse("Priority: -1\n"),
            Err(CacheInfoError::Priority { .. })
        ));
        assert!(matches!(
            CacheInfo::parse("StoreDir: nix/store\n"),
            Err(CacheInfoError::StoreDir { .. })
        ));
        assert!(matches!(
            CacheInfo::parse("StoreDir: /a b\n"),
            Err(CacheInfoError::StoreDir { .. })
        ));
    }

    proptest! {
        #[test]
        fn print_parse(p in proptest::option::of(any::<u32>()), w in any::<bool>(), d in "/[a-z/]{0,20}") {
            let info = CacheInfo { store_dir: d, want_mass_query: w, priority: p };
            prop_assert_eq!(CacheInfo::parse(&info.to_string()), Ok(info));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,200}") {
            let _ = CacheInfo::parse(&s);
        }
    }
}
