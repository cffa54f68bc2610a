//! ed25519 signing keys, public keys and signatures in Nix's text format, and the fingerprint
//! that binary cache signatures cover.
//!
//! Follows Nix's [`src/libstore/crypto.cc`](https://github.com/NixOS/nix/blob/2.8.0/src/libstore/crypto.cc)
//! (key and signature text) and `ValidPathInfo::fingerprint` in
//! [`src/libstore/path-info.cc`](https://github.com/NixOS/nix/blob/2.8.0/src/libstore/path-info.cc).
//! Every value is `<name>:<base64>`: a secret key carries 64 bytes (the 32-byte seed followed by
//! the 32-byte public key, libsodium's layout), a public key 32 bytes, a signature 64 bytes.
//! Nix splits at the first `:`, so key names are non-empty and contain no `:`; this module also
//! refuses whitespace and control characters in names, which could not appear in
//! `trusted-public-keys` (a whitespace-separated list) or on a narinfo `Sig:` line.
//!
//! Errors about secret keys never repeat the key material.

use std::fmt;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SECRET_KEY_LENGTH};

use crate::hash::Sha256;
use crate::store_path::StorePath;
use crate::util::shorten;

/// Like Nix's `base64Decode`, tolerate missing `=` padding.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The name of cache.nixos.org's signing key: what marks a path as available upstream.
pub const CACHE_NIXOS_ORG_KEY_NAME: &str = "cache.nixos.org-1";
/// cache.nixos.org's public key, as Nix's default `trusted-public-keys` holds it.
pub const CACHE_NIXOS_ORG_KEY: &str =
    "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

/// Why a key or signature was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// No `name:` prefix.
    #[error("{what} is not of the form <name>:<base64>")]
    MissingName {
        /// `"secret key"`, `"public key"` or `"signature"`.
        what: &'static str,
    },
    /// A key name with a forbidden character.
    #[error("{what} name {name:?} is invalid: {reason}")]
    InvalidName {
        /// What kind of value.
        what: &'static str,
        /// The name (shortened).
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// The part after the name is not base64.
    #[error("{what} {name:?} is not valid base64")]
    Base64 {
        /// What kind of value.
        what: &'static str,
        /// The key name (shortened).
        name: String,
        /// The decoding error.
        #[source]
        source: base64::DecodeError,
    },
    /// The decoded bytes have the wrong length.
    #[error("{what} {name:?} has {len} bytes, expected {expected}")]
    WrongLength {
        /// What kind of value.
        what: &'static str,
        /// The key name (shortened).
        name: String,
        /// Decoded length.
        len: usize,
        /// Expected length.
        expected: usize,
    },
    /// The public key bytes are not a valid curve point. (ed25519-dalek's error says nothing
    /// more, so it is not kept as a source.)
    #[error("public key {name:?} is not a valid ed25519 key (not a curve point)")]
    InvalidPublicKey {
        /// The key name (shortened).
        name: String,
    },
    /// The public half of a secret key does not belong to its seed.
    #[error("secret key {name:?} is corrupt: its public half does not match its seed")]
    MismatchedSecretKey {
        /// The key name (shortened).
        name: String,
    },
}

fn check_name(what: &'static str, name: &str) -> Result<(), KeyError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.contains(':') {
        Some("contains ':'")
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("contains whitespace or a control character")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(KeyError::InvalidName {
            what,
            name: shorten(name),
            reason,
        }),
        None => Ok(()),
    }
}

/// Split `name:base64`, check the name, decode exactly `N` bytes.
fn split_decode<const N: usize>(
    what: &'static str,
    s: &str,
) -> Result<(String, [u8; N]), KeyError> {
    let (name, b64) = s.split_once(':').ok_or(KeyError::MissingName { what })?;
    check_name(what, name)?;
    let bytes = LENIENT_BASE64
        .decode(b64)
        .map_err(|source| KeyError::Base64 {
            what,
            name: shorten(name),
            source,
        })?;
    let len = bytes.len();
    let arr: [u8; N] = bytes.try_into().map_err(|_| KeyError::WrongLength {
        what,
        name: shorten(name),
        len,
        expected: N,
    })?;
    Ok((name.to_owned(), arr))
}

/// An ed25519 secret key with its Nix key name.
#[derive(Clone)]
pub struct SigningKey {
    name: String,
    key: ed25519_dalek::SigningKey,
}

impl SigningKey {
    /// A key from its 32-byte seed (as `larder generate-keypair` makes from the OS RNG).
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Result<Self, KeyError> {
        check_name("secret key", name)?;
        Ok(Self {
            name: name.to_owned(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    /// Parse Nix's secret key text (`name:base64(seed || public)`), ignoring surrounding
    /// whitespace such as the trailing newline of a key file.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split_decode::<64>("secret key", s.trim())?;
        let key = ed25519_dalek::SigningKey::from_keypair_bytes(&bytes).map_err(|_| {
            KeyError::MismatchedSecretKey {
                name: shorten(&name),
            }
        })?;
        Ok(Self { name, key })
    }

    /// Nix's secret key text. Deliberately not `Display`, so it is not logged by accident.
    pub fn to_secret_string(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            STANDARD.encode(self.key.to_keypair_bytes())
        )
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The matching public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Sign `fingerprint` (see [`fingerprint`]).
    pub fn sign(&self, fingerprint: &str) -> Signature {
        Signature {
            key_name: self.name.clone(),
            bytes: self.key.sign(fingerprint.as_bytes()).to_bytes(),
        }
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("name", &self.name)
            .field(
                "public",
                &STANDARD.encode(self.key.verifying_key().as_bytes()),
            )
            .finish_non_exhaustive()
    }
}

/// An ed25519 public key with its Nix key name (an entry of `trusted-public-keys`).
#[derive(Clone, PartialEq, Eq)]
pub struct VerifyingKey {
    name: String,
    key: ed25519_dalek::VerifyingKey,
}

impl VerifyingKey {
    /// Parse Nix's public key text (`name:base64(32 bytes)`), ignoring surrounding whitespace.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split_decode::<32>("public key", s.trim())?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| {
            KeyError::InvalidPublicKey {
                name: shorten(&name),
            }
        })?;
        Ok(Self { name, key })
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `sig` is this key's valid signature of `fingerprint`; false when the signature's
    /// key name is not this key's name (as in Nix, names select keys).
    pub fn verify(&self, fingerprint: &str, sig: &Signature) -> bool {
        sig.key_name == self.name
            && self
                .key
                .verify_strict(
                    fingerprint.as_bytes(),
                    &ed25519_dalek::Signature::from_bytes(&sig.bytes),
                )
                .is_ok()
    }

    /// The raw 32 public key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.key.as_bytes()
    }
}

impl fmt::Display for VerifyingKey {
    /// Nix's public key text, `name:base64`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, STANDARD.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyingKey({self})")
    }
}

impl std::str::FromStr for VerifyingKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A detached ed25519 signature with the name of the key that made it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Signature {
    key_name: String,
    bytes: [u8; 64],
}

impl Signature {
    /// Parse `name:base64(64 bytes)`.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (key_name, bytes) = split_decode::<64>("signature", s)?;
        Ok(Self { key_name, bytes })
    }

    /// The name of the key that made it.
    pub fn key_name(&self) -> &str {
        &self.key_name
    }

    /// The raw 64 signature bytes.
    pub fn as_bytes(&self) -> &[u8; 64] {
        &self.bytes
    }
}

impl fmt::Display for Signature {
    /// `name:base64`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key_name, STANDARD.encode(self.bytes))
    }
}

impl std::str::FromStr for Signature {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// What a binary cache signature signs:
/// `1;<store path>;<sha256:nix32 NarHash>;<NarSize>;<references, comma-separated>`.
///
/// References are absolute paths, sorted and without duplicates whatever the order given,
/// because Nix prints them from a sorted set.
pub fn fingerprint(
    store_path: &StorePath,
    nar_hash: &Sha256,
    nar_size: u64,
    references: &[StorePath],
) -> String {
    let mut refs: Vec<&StorePath> = references.iter().collect();
    refs.sort();
    refs.dedup();
    let refs: Vec<String> = refs.into_iter().map(StorePath::to_absolute).collect();
    format!(
        "1;{};{};{};{}",
        store_path.to_absolute(),
        nar_hash.to_typed_nix32(),
        nar_size,
        refs.join(",")
    )
}

// Keep the seed length and our from_seed signature in step.
const _: () = assert!(SECRET_KEY_LENGTH == 32);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Generated by `nix-store --generate-binary-cache-key test-1 sk pk` (Nix 2.8).
    const NIX_SECRET: &str = "test-1:y123cWGDfZKFATi6RL/nbgxjgPKHeOQoHEPKriyAuy6rVpZy7gvF5Q+/N0u5ihXy1YgvQP8m6J+aRlc5+K1KRQ==";
    const NIX_PUBLIC: &str = "test-1:q1aWcu4LxeUPvzdLuYoV8tWIL0D/JuifmkZXOfitSkU=";

    fn path(b: &str) -> StorePath {
        StorePath::from_basename(b).unwrap()
    }

    #[test]
    fn cache_nixos_org_key_parses_and_has_its_name() {
        let key = VerifyingKey::parse(CACHE_NIXOS_ORG_KEY).unwrap();
        assert_eq!(key.name(), CACHE_NIXOS_ORG_KEY_NAME);
    }

    #[test]
    fn nix_key_pair_parses_and_matches() {
        let sk = SigningKey::parse(&format!("{NIX_SECRET}\n")).unwrap();
        assert_eq!(sk.name(), "test-1");
        assert_eq!(sk.to_secret_string(), NIX_SECRET);
        assert_eq!(sk.verifying_key().to_string(), NIX_PUBLIC);
        let pk = VerifyingKey::parse(NIX_PUBLIC).unwrap();
        assert_eq!(pk, sk.verifying_key());
        let debug = format!("{sk:?}");
        assert!(
            !debug.contains(NIX_SECRET.split(':').nth(1).unwrap()),
            "{debug}"
        );
        assert!(!debug.contains(&NIX_SECRET[10..30]), "{debug}");
    }

    #[test]
    fn sign_and_verify() {
        let sk = SigningKey::from_seed("cache.example-1", [7; 32]).unwrap();
        let pk = sk.verifying_key();
        let sig = sk.sign("hello");
        assert!(pk.verify("hello", &sig));
        assert!(!pk.verify("hello!", &sig));
        let text = sig.to_string();
        assert!(text.starts_with("cache.example-1:"));
        assert_eq!(Signature::parse(&text), Ok(sig.clone()));
        let other = SigningKey::from_seed("cache.example-1", [8; 32]).unwrap();
        assert!(!other.verifying_key().verify("hello", &sig));
        // Same key bytes under another name: names select keys, so this fails.
        let renamed = SigningKey::from_seed("other-1", [7; 32])
            .unwrap()
            .verifying_key();
        assert!(!renamed.verify("hello", &sig));
        assert_eq!(
            SigningKey::parse(&sk.to_secret_string())
                .unwrap()
                .verifying_key(),
            pk
        );
    }

    #[test]
    fn rejects() {
        let b64_32 = STANDARD.encode([1u8; 32]);
        let b64_64 = STANDARD.encode([1u8; 64]);
        assert!(matches!(
            SigningKey::parse("nocolon"),
            Err(KeyError::MissingName { .. })
        ));
        assert!(matches!(
            SigningKey::parse(&format!(":{b64_64}")),
            Err(KeyError::InvalidName { .. })
        ));
        assert!(matches!(
            SigningKey::parse(&format!("a b:{b64_64}")),
            Err(KeyError::InvalidName { .. })
        ));
        assert!(matches!(
            SigningKey::parse(&format!("k:{b64_32}")),
            Err(KeyError::WrongLength {
                len: 32,
                expected: 64,
                ..
            })
        ));
        // Seed and public half that do not belong together.
        assert!(matches!(
            SigningKey::parse(&format!("k:{b64_64}")),
            Err(KeyError::MismatchedSecretKey { .. })
        ));
        let err = SigningKey::parse("k:!!!secret!!!").unwrap_err();
        assert!(!err.to_string().contains("secret!!!"), "{err}");
        assert!(matches!(
            VerifyingKey::parse(&format!("k:{b64_64}")),
            Err(KeyError::WrongLength { .. })
        ));
        assert!(matches!(
            VerifyingKey::parse("k:@@@@"),
            Err(KeyError::Base64 { .. })
        ));
        assert!(matches!(
            Signature::parse(&format!("k:{b64_32}")),
            Err(KeyError::WrongLength { .. })
        ));
        assert!(matches!(
            Signature::parse(&format!("k\n:{b64_64}")),
            Err(KeyError::InvalidName { .. })
        ));
        assert!(SigningKey::from_seed("a:b", [0; 32]).is_err());
        assert!(SigningKey::from_seed("", [0; 32]).is_err());
        // Unpadded base64 is accepted like Nix does.
        assert!(VerifyingKey::parse(NIX_PUBLIC.trim_end_matches('=')).is_ok());
    }

    #[test]
    fn fingerprint_layout_sorts_references() {
        let p = path("7rjj86a15146cq1d3qy068lml7n8ykzm-hello");
        let a = path("0000000000000000000000000000000a-a");
        let z = path("z0000000000000000000000000000000-z");
        let h = Sha256::digest(b"");
        let fp = fingerprint(&p, &h, 120, &[z.clone(), a.clone(), z.clone()]);
        assert_eq!(
            fp,
            format!(
                "1;/nix/store/7rjj86a15146cq1d3qy068lml7n8ykzm-hello;sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73;120;{a},{z}"
            )
        );
        assert_eq!(fingerprint(&p, &h, 1, &[]), format!("1;{p};{h};1;"));
    }

    proptest! {
        #[test]
        fn sign_verify_roundtrip(seed in any::<[u8; 32]>(), name in "[a-z0-9.-]{1,20}", msg in "\\PC{0,100}") {
            let sk = SigningKey::from_seed(&name, seed).unwrap();
            let sig = Signature::parse(&sk.sign(&msg).to_string()).unwrap();
            let pk = VerifyingKey::parse(&sk.verifying_key().to_string()).unwrap();
            prop_assert!(pk.verify(&msg, &sig));
            let other = format!("{msg}x");
            prop_assert!(!pk.verify(&other, &sig));
            let sk2 = SigningKey::parse(&sk.to_secret_string()).unwrap();
            prop_assert_eq!(sk2.sign(&msg), sig);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,120}") {
            let _ = SigningKey::parse(&s);
            let _ = VerifyingKey::parse(&s);
            let _ = Signature::parse(&s);
        }
    }
}
