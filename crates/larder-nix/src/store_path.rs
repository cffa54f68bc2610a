//! Store paths: `/nix/store/<hash>-<name>`.
//!
//! Follows `StorePath::StorePath` and `checkName` in Nix's
//! [`src/libstore/path.cc`](https://github.com/NixOS/nix/blob/2.8.0/src/libstore/path.cc). The
//! hash part is 32 nix32 characters (a 160-bit digest); the name is 1 to 211 characters of
//! `[A-Za-z0-9+\-._?=]`.
//!
//! Names: Nix 2.8 itself accepts any name in that charset, including ones starting with `.`
//! (`builtins.toFile ".hidden" …` makes such paths, so rejecting every leading `.` would refuse
//! real store paths). Current Nix additionally rejects `.`, `..` and names whose first
//! dash-separated component is `.` or `..` (`.-x`, `..-x`); this module follows that newer,
//! stricter rule, so every path it accepts is valid for old and new Nix alike.
//!
//! Parsing is stricter than Nix's `parseStorePath`, which canonicalises first: an absolute path
//! must be exactly `/nix/store/` + basename, with no trailing slash, `//` or sub-path, so a path
//! has exactly one spelling.
//!
//! Ordering matches Nix's (which compares basenames as strings): nix32 prints the digest's last
//! byte first, so the order of hash parts is the order of the reversed digest bytes.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use crate::nixbase32;
use crate::util::shorten;

/// The store directory every path of a binary cache lives in.
pub const STORE_DIR: &str = "/nix/store";
/// Number of nix32 characters in the hash part.
pub const HASH_LEN: usize = 32;
/// Longest allowed name, as in Nix.
pub const MAX_NAME_LEN: usize = 211;
/// Length of the digest behind the hash part, in bytes.
pub const DIGEST_LEN: usize = 20;

/// Why a store path, hash part or name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    /// An absolute path outside `/nix/store/`, or with a sub-path or trailing slash.
    #[error("{path:?} is not directly inside {STORE_DIR}")]
    NotInStore {
        /// The input (shortened).
        path: String,
    },
    /// No `-` after the 32-character hash part.
    #[error("store path basename {basename:?} does not have the form <32-char hash>-<name>")]
    MissingDash {
        /// The input (shortened).
        basename: String,
    },
    /// The hash part is not 32 nix32 characters.
    #[error("store path hash part {hash:?} is invalid")]
    InvalidHash {
        /// The hash part (shortened).
        hash: String,
        /// What was wrong with it.
        #[source]
        source: nixbase32::DecodeError,
    },
    /// The name is empty.
    #[error("store path name is empty")]
    EmptyName,
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("store path name {name:?} is {len} characters long; at most {MAX_NAME_LEN} allowed")]
    NameTooLong {
        /// The name (shortened).
        name: String,
        /// Its length.
        len: usize,
    },
    /// The name has a character outside `[A-Za-z0-9+\-._?=]`.
    #[error("store path name {name:?} contains illegal character {character:?}")]
    InvalidNameCharacter {
        /// The name (shortened).
        name: String,
        /// The first offending character.
        character: char,
    },
    /// The name is `.`/`..` or starts with `.-`/`..-`.
    #[error(
        "store path name {name:?} is not allowed: its first dash-separated component is . or .."
    )]
    DotName {
        /// The name (shortened).
        name: String,
    },
}

/// A valid store path: a 20-byte digest and a name.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StorePath {
    digest: [u8; DIGEST_LEN],
    name: String,
}

/// Check `name` with Nix's rules (see the module docs).
pub fn validate_name(name: &str) -> Result<(), StorePathError> {
    if name.is_empty() {
        return Err(StorePathError::EmptyName);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StorePathError::NameTooLong {
            name: shorten(name),
            len: name.chars().count(),
        });
    }
    if let Some(character) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.' | '_' | '?' | '=')))
    {
        return Err(StorePathError::InvalidNameCharacter {
            name: shorten(name),
            character,
        });
    }
    let first_component = name.split('-').next().unwrap_or(name);
    if first_component == "." || first_component == ".." {
        return Err(StorePathError::DotName {
            name: shorten(name),
        });
    }
    Ok(())
}

/// Check that `s` is exactly 32 nix32 characters and return the digest they encode.
pub fn validate_hash_part(s: &str) -> Result<[u8; DIGEST_LEN], StorePathError> {
    nixbase32::decode_fixed::<DIGEST_LEN>(s).map_err(|source| StorePathError::InvalidHash {
        hash: shorten(s),
        source,
    })
}

impl StorePath {
    /// Parse `/nix/store/<hash>-<name>`.
    pub fn from_absolute(s: &str) -> Result<Self, StorePathError> {
        s.strip_prefix(STORE_DIR)
            .and_then(|rest| rest.strip_prefix('/'))
            .filter(|base| !base.contains('/'))
            .ok_or_else(|| StorePathError::NotInStore { path: shorten(s) })
            .and_then(Self::from_basename)
    }

    /// Parse `<hash>-<name>`.
    pub fn from_basename(s: &str) -> Result<Self, StorePathError> {
        // `get` on a byte offset fails on a non-ASCII boundary, which is a bad hash part anyway.
        let hash = s.get(..HASH_LEN);
        let rest = s.get(HASH_LEN..);
        match (hash, rest) {
            (Some(hash), Some(rest)) => {
                let digest = validate_hash_part(hash)?;
                let name = rest
                    .strip_prefix('-')
                    .ok_or_else(|| StorePathError::MissingDash {
                        basename: shorten(s),
                    })?;
                Self::from_parts(digest, name)
            }
            _ => {
                // Too short or cut inside a character: report the hash part problem if the
                // prefix up to the first dash is not a hash, else the missing dash.
                let hash = s.split('-').next().unwrap_or(s);
                validate_hash_part(hash)?;
                Err(StorePathError::MissingDash {
                    basename: shorten(s),
                })
            }
        }
    }

    /// A store path from its digest and name (the name is validated).
    pub fn from_parts(digest: [u8; DIGEST_LEN], name: &str) -> Result<Self, StorePathError> {
        validate_name(name)?;
        Ok(Self {
            digest,
            name: name.to_owned(),
        })
    }

    /// The 20-byte digest behind the hash part.
    pub fn digest(&self) -> &[u8; DIGEST_LEN] {
        &self.digest
    }

    /// The hash part: 32 nix32 characters.
    pub fn hash_part(&self) -> String {
        nixbase32::encode(&self.digest)
    }

    /// The name after the dash.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<hash>-<name>`.
    pub fn basename(&self) -> String {
        format!("{}-{}", self.hash_part(), self.name)
    }

    /// `/nix/store/<hash>-<name>`.
    pub fn to_absolute(&self) -> String {
        format!("{STORE_DIR}/{}-{}", self.hash_part(), self.name)
    }

    /// Whether this is a derivation (`.drv`) path.
    pub fn is_derivation(&self) -> bool {
        self.name.ends_with(".drv")
    }
}

impl Ord for StorePath {
    /// Nix's order: by basename string (see the module docs).
    fn cmp(&self, other: &Self) -> Ordering {
        self.digest
            .iter()
            .rev()
            .cmp(other.digest.iter().rev())
            .then_with(|| self.name.cmp(&other.name))
    }
}

impl PartialOrd for StorePath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for StorePath {
    /// The absolute path.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}-{}", self.hash_part(), self.name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

impl FromStr for StorePath {
    type Err = StorePathError;
    /// Parses the absolute form.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_absolute(s)
    }
}

impl serde::Serialize for StorePath {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for StorePath {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = StorePath;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an absolute store path such as \"/nix/store/<hash>-<name>\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StorePath, E> {
                StorePath::from_absolute(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HASH: &str = "7rjj86a15146cq1d3qy068lml7n8ykzm";

    #[test]
    fn accepts() {
        let p = StorePath::from_absolute(&format!("/nix/store/{HASH}-hello-2.12.1")).unwrap();
        assert_eq!(p.hash_part(), HASH);
        assert_eq!(p.name(), "hello-2.12.1");
        assert_eq!(p.basename(), format!("{HASH}-hello-2.12.1"));
        assert_eq!(p.to_absolute(), format!("/nix/store/{HASH}-hello-2.12.1"));
        assert_eq!(p.to_string(), p.to_absolute());
        assert!(!p.is_derivation());
        assert_eq!(StorePath::from_basename(&p.basename()), Ok(p.clone()));
        assert_eq!(p.to_absolute().parse::<StorePath>(), Ok(p.clone()));
        assert_eq!(StorePath::from_parts(*p.digest(), p.name()), Ok(p.clone()));
        assert_eq!(validate_hash_part(HASH), Ok(*p.digest()));
        for name in [
            "a",
            "x.drv",
            ".hidden",
            "..foo",
            "a-.",
            "A+Z-0.9_?=",
            &"n".repeat(MAX_NAME_LEN),
        ] {
            let p = StorePath::from_basename(&format!("{HASH}-{name}")).unwrap();
            assert_eq!(p.name(), name);
        }
        assert!(StorePath::from_basename(&format!("{HASH}-x.drv"))
            .unwrap()
            .is_derivation());
    }

    #[test]
    fn rejects() {
        let bad_abs = [
            format!("/nix/store/{HASH}-a/"),
            format!("/nix/store/{HASH}-a/bin"),
            format!("/nix/store//{HASH}-a"),
            format!("/nix/store/../{HASH}-a"),
            format!("/nix/storex/{HASH}-a"),
            format!("nix/store/{HASH}-a"),
            format!("{HASH}-a"),
            "/nix/store".to_owned(),
            "/nix/store/".to_owned(),
            String::new(),
        ];
        for s in bad_abs {
            assert!(StorePath::from_absolute(&s).is_err(), "{s:?} accepted");
        }
        let bad_base = [
            format!("{HASH}-"),
            HASH.to_owned(),
            format!("{HASH}a"),
            format!("{HASH}_a"),
            format!("{}-a", &HASH[1..]),
            format!("{HASH}0-a"),
            format!("e{}-a", &HASH[1..]),
            format!("{}-a", HASH.to_uppercase()),
            format!("{HASH}-a b"),
            format!("{HASH}-a/b"),
            format!("{HASH}-ü"),
            format!("{HASH}-."),
            format!("{HASH}-.."),
            format!("{HASH}-.-x"),
            format!("{HASH}-..-x"),
            format!("{HASH}-{}", "n".repeat(MAX_NAME_LEN + 1)),
            format!("ü{}-a", &HASH[2..]),
            "-a".to_owned(),
            String::new(),
        ];
        for s in bad_base {
            assert!(StorePath::from_basename(&s).is_err(), "{s:?} accepted");
        }
        assert!(matches!(
            StorePath::from_basename(&format!("{HASH}-a b")),
            Err(StorePathError::InvalidNameCharacter { character: ' ', .. })
        ));
        assert!(validate_hash_part(&HASH[1..]).is_err());
        assert!(validate_hash_part(&format!("{HASH}0")).is_err());
    }

    #[test]
    fn orders_like_nix_basenames() {
        let mut paths: Vec<StorePath> = [
            "0000000000000000000000000000000z-b",
            "z0000000000000000000000000000000-a",
            "10000000000000000000000000000000-a",
            "0000000000000000000000000000000z-a",
            "00000000000000000000000000000001-zz",
        ]
        .iter()
        .map(|b| StorePath::from_basename(b).unwrap())
        .collect();
        paths.sort();
        let mut names: Vec<String> = paths.iter().map(StorePath::basename).collect();
        let sorted = {
            let mut s = names.clone();
            s.sort();
            s
        };
        assert_eq!(names, sorted);
        names.dedup();
        assert_eq!(names.len(), 5);
    }

    #[test]
    fn serde_uses_absolute_path() {
        let p = StorePath::from_basename(&format!("{HASH}-x")).unwrap();
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, format!("\"/nix/store/{HASH}-x\""));
        assert_eq!(serde_json::from_str::<StorePath>(&json).unwrap(), p);
        assert!(serde_json::from_str::<StorePath>(&format!("\"{HASH}-x\"")).is_err());
    }

    proptest! {
        #[test]
        fn roundtrip(digest in any::<[u8; 20]>(), name in "[A-Za-z0-9+_?=][A-Za-z0-9+\\-._?=]{0,210}") {
            let p = StorePath::from_parts(digest, &name).unwrap();
            prop_assert_eq!(StorePath::from_absolute(&p.to_absolute()), Ok(p.clone()));
            prop_assert_eq!(StorePath::from_basename(&p.basename()), Ok(p));
        }

        #[test]
        fn order_matches_basename_order(a in any::<[u8; 20]>(), b in any::<[u8; 20]>(),
                                        na in "[a-z]{1,3}", nb in "[a-z]{1,3}") {
            let pa = StorePath::from_parts(a, &na).unwrap();
            let pb = StorePath::from_parts(b, &nb).unwrap();
            prop_assert_eq!(pa.cmp(&pb), pa.basename().cmp(&pb.basename()));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = StorePath::from_absolute(&s);
            let _ = StorePath::from_basename(&s);
        }
    }
}
