//! SHA-256 hashes as Nix spells them.
//!
//! Follows `Hash::to_string`, `Hash::parseAnyPrefixed` and `Hash::parseNonSRIUnprefixed` in Nix's
//! [`src/libutil/hash.cc`](https://github.com/NixOS/nix/blob/2.8.0/src/libutil/hash.cc). A hash is
//! written as `sha256:<digest>` (what narinfo files use, with a nix32 digest), as SRI
//! `sha256-<base64>`, or bare; the digest's encoding is told apart by its length: 52 characters
//! nix32, 64 hex, 44 base64 (padded, as Nix writes it). SRI hashes are always base64.
//! Only SHA-256 is supported: it is the only algorithm binary caches use for NarHash/FileHash.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use sha2::Digest as _;

use crate::nixbase32;
use crate::util::shorten;

/// Why a hash string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    /// The `algo:` / `algo-` prefix names something other than `sha256`.
    #[error("unsupported hash algorithm {algorithm:?} in {input:?} (only sha256 is supported)")]
    UnsupportedAlgorithm {
        /// The algorithm named (shortened).
        algorithm: String,
        /// The whole input (shortened).
        input: String,
    },
    /// The digest's length matches none of the encodings allowed here.
    #[error("hash {input:?} has a digest of {len} characters; expected {expected}")]
    WrongLength {
        /// The input (shortened).
        input: String,
        /// Length of the digest part.
        len: usize,
        /// The lengths that were acceptable, in words.
        expected: &'static str,
    },
    /// The digest is not valid nix32.
    #[error("hash {input:?} is not valid nix32")]
    Nix32 {
        /// The input (shortened).
        input: String,
        /// What was wrong with the digits.
        #[source]
        source: nixbase32::DecodeError,
    },
    /// The digest is not valid hex.
    #[error("hash {input:?} is not valid hexadecimal")]
    Hex {
        /// The input (shortened).
        input: String,
    },
    /// The digest is not valid base64.
    #[error("hash {input:?} is not valid base64")]
    Base64 {
        /// The input (shortened).
        input: String,
        /// What was wrong with it.
        #[source]
        source: base64::DecodeError,
    },
}

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256([u8; 32]);

/// Length of a SHA-256 digest in nix32 characters.
pub const NIX32_LEN: usize = nixbase32::encoded_len(32);

impl Sha256 {
    /// The SHA-256 of `data`.
    pub fn digest(data: &[u8]) -> Self {
        Self(sha2::Sha256::digest(data).into())
    }

    /// Wrap raw digest bytes.
    pub const fn from_bytes(b: [u8; 32]) -> Self {
        Self(b)
    }

    /// The raw digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The digest in nix32, without prefix (52 characters).
    pub fn to_nix32(&self) -> String {
        nixbase32::encode(&self.0)
    }

    /// The digest in lower-case hex, without prefix (64 characters).
    pub fn to_hex(&self) -> String {
        use fmt::Write as _;
        let mut s = String::with_capacity(64);
        for b in self.0 {
            let _ = write!(s, "{b:02x}");
        }
        s
    }

    /// Subresource-integrity spelling: `sha256-<base64>`.
    pub fn to_sri(&self) -> String {
        format!(
            "sha256-{}",
            base64::engine::general_purpose::STANDARD.encode(self.0)
        )
    }

    /// `sha256:<nix32>`, the spelling narinfo files and fingerprints use.
    pub fn to_typed_nix32(&self) -> String {
        format!("sha256:{}", self.to_nix32())
    }

    /// Parse any spelling Nix accepts for a SHA-256: `sha256:<nix32|hex|base64>`,
    /// `sha256-<base64>` (SRI), or a bare nix32 (52) or hex (64) digest.
    pub fn parse(s: &str) -> Result<Self, HashError> {
        if let Some((algorithm, rest)) = s.split_once(':') {
            check_algorithm(algorithm, s)?;
            return parse_digest(rest, s, true);
        }
        if let Some((algorithm, rest)) = s.split_once('-') {
            check_algorithm(algorithm, s)?;
            return decode_base64(rest, s);
        }
        parse_digest(s, s, false)
    }
}

fn check_algorithm(algorithm: &str, input: &str) -> Result<(), HashError> {
    if algorithm == "sha256" {
        Ok(())
    } else {
        Err(HashError::UnsupportedAlgorithm {
            algorithm: shorten(algorithm),
            input: shorten(input),
        })
    }
}

/// Parse a digest by its length; `allow_base64` for the `sha256:` prefixed form.
fn parse_digest(digest: &str, input: &str, allow_base64: bool) -> Result<Sha256, HashError> {
    match digest.len() {
        NIX32_LEN => nixbase32::decode_fixed::<32>(digest)
            .map(Sha256)
            .map_err(|source| HashError::Nix32 {
                input: shorten(input),
                source,
            }),
        64 => decode_hex(digest).ok_or_else(|| HashError::Hex {
            input: shorten(input),
        }),
        44 if allow_base64 => decode_base64(digest, input),
        len => Err(HashError::WrongLength {
            input: shorten(input),
            len,
            expected: if allow_base64 {
                "52 (nix32), 64 (hex) or 44 (base64)"
            } else {
                "52 (nix32) or 64 (hex)"
            },
        }),
    }
}

fn decode_hex(digest: &str) -> Option<Sha256> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let mut out = [0u8; 32];
    let pairs = digest.as_bytes().chunks_exact(2);
    if !pairs.remainder().is_empty() {
        return None;
    }
    for (o, pair) in out.iter_mut().zip(pairs) {
        let &[hi, lo] = pair else {
            return None;
        };
        *o = nibble(hi)? << 4 | nibble(lo)?;
    }
    Some(Sha256(out))
}

fn decode_base64(digest: &str, input: &str) -> Result<Sha256, HashError> {
    if digest.len() != 44 {
        return Err(HashError::WrongLength {
            input: shorten(input),
            len: digest.len(),
            expected: "44 (base64)",
        });
    }
    let mut out = [0u8; 32];
    match base64::engine::general_purpose::STANDARD.decode_slice(digest, &mut out) {
        Ok(32) => Ok(Sha256(out)),
        Ok(_) => Err(HashError::WrongLength {
            input: shorten(input),
            len: digest.len(),
            expected: "44 (base64 of 32 bytes)",
        }),
        Err(base64::DecodeSliceError::DecodeError(source)) => Err(HashError::Base64 {
            input: shorten(input),
            source,
        }),
        Err(base64::DecodeSliceError::OutputSliceTooSmall) => Err(HashError::WrongLength {
            input: shorten(input),
            len: digest.len(),
            expected: "44 (base64 of 32 bytes)",
        }),
    }
}

impl fmt::Display for Sha256 {
    /// `sha256:<nix32>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_nix32())
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({self})")
    }
}

impl FromStr for Sha256 {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for Sha256 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Sha256 {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Sha256;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sha256 hash such as \"sha256:<nix32>\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Sha256, E> {
                Sha256::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// Incremental SHA-256, for data that arrives in pieces.
#[derive(Clone, Default)]
pub struct Sha256Hasher(sha2::Sha256);

impl Sha256Hasher {
    /// A hasher that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `data` to what is hashed.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The hash of everything added.
    pub fn finalize(self) -> Sha256 {
        Sha256(self.0.finalize().into())
    }
}

impl fmt::Debug for Sha256Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sha256Hasher")
    }
}

impl std::io::Write for Sha256Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EMPTY_NIX32: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
    const EMPTY_HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const EMPTY_B64: &str = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";

    #[test]
    fn spellings_of_empty_hash() {
        let h = Sha256::digest(b"");
        assert_eq!(h.to_nix32(), EMPTY_NIX32);
        assert_eq!(h.to_hex(), EMPTY_HEX);
        assert_eq!(h.to_sri(), format!("sha256-{EMPTY_B64}"));
        assert_eq!(h.to_typed_nix32(), format!("sha256:{EMPTY_NIX32}"));
        assert_eq!(h.to_string(), format!("sha256:{EMPTY_NIX32}"));
        for s in [
            format!("sha256:{EMPTY_NIX32}"),
            format!("sha256:{EMPTY_HEX}"),
            format!("sha256:{}", EMPTY_HEX.to_uppercase()),
            format!("sha256:{EMPTY_B64}"),
            format!("sha256-{EMPTY_B64}"),
            EMPTY_NIX32.to_owned(),
            EMPTY_HEX.to_owned(),
        ] {
            assert_eq!(Sha256::parse(&s), Ok(h), "{s}");
            assert_eq!(s.parse::<Sha256>(), Ok(h), "{s}");
        }
    }

    #[test]
    fn rejects() {
        let bad = [
            format!("md5:{EMPTY_NIX32}"),
            format!("sha1-{EMPTY_B64}"),
            format!("sha256-{EMPTY_NIX32}"),
            format!("sha256:{}", &EMPTY_NIX32[1..]),
            format!("sha256:{}e", &EMPTY_NIX32[1..]),
            format!("sha256:{}g", &EMPTY_HEX[1..]),
            format!("sha256:{}", EMPTY_B64.trim_end_matches('=')),
            format!("sha256:{}!", &EMPTY_B64[..43]),
            EMPTY_B64.to_owned(),
            String::new(),
            "sha256:".to_owned(),
            format!("sha256:{}é", &EMPTY_HEX[2..]),
            format!("z{}", &EMPTY_NIX32[1..]),
        ];
        for s in bad {
            assert!(Sha256::parse(&s).is_err(), "{s:?} accepted");
        }
        let long = format!("sha512:{}", "x".repeat(500));
        let msg = Sha256::parse(&long).unwrap_err().to_string();
        assert!(msg.len() < 300, "{msg}");
    }

    #[test]
    fn hasher_matches_digest() {
        let mut h = Sha256Hasher::new();
        h.update(b"hello ");
        h.update(b"world");
        assert_eq!(h.finalize(), Sha256::digest(b"hello world"));
    }

    #[test]
    fn serde_uses_typed_nix32() {
        let h = Sha256::digest(b"");
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, format!("\"sha256:{EMPTY_NIX32}\""));
        assert_eq!(serde_json::from_str::<Sha256>(&json).unwrap(), h);
        assert_eq!(
            serde_json::from_str::<Sha256>(&format!("\"sha256-{EMPTY_B64}\"")).unwrap(),
            h
        );
        assert!(serde_json::from_str::<Sha256>("\"sha256:nope\"").is_err());
        assert_eq!(format!("{h:?}"), format!("Sha256(sha256:{EMPTY_NIX32})"));
    }

    proptest! {
        #[test]
        fn every_spelling_roundtrips(bytes in any::<[u8; 32]>()) {
            let h = Sha256::from_bytes(bytes);
            for s in [h.to_typed_nix32(), h.to_sri(), h.to_nix32(), h.to_hex(),
                      format!("sha256:{}", h.to_hex())] {
                prop_assert_eq!(Sha256::parse(&s), Ok(h));
            }
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = Sha256::parse(&s);
        }
    }
}
