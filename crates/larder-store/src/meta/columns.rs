//! How domain values are kept in the metadata's columns, and read back once, at the store
//! boundary: rows come out of the store as store paths, hashes, compressions, signatures,
//! permission sets and cache scopes, never as the strings they are stored as.
//!
//! The schema keeps its text encodings (no migration, and `larder migrate` copies rows as they
//! are): a SHA-256 is bare nix32, references are space-separated basenames, signatures and
//! upstream keys one per line, permissions and a token's cache scope comma-separated (an ended
//! scope, a deleted cache, is `!NAME`), a flag an integer. [`Stored`] and [`Flag`] decode a
//! column through `sqlx`'s `Any` driver, so rows derive `FromRow` (`#[sqlx(try_from =
//! "Stored<T>")]`); a value that does not decode fails the query with
//! [`MetaError::Undecodable`](super::MetaError::Undecodable), naming the table, the column and
//! the value. The `*_text` functions are the other direction, for binding.

use std::collections::BTreeSet;

use larder_api::Perm;
use larder_nix::compression::Compression;
use larder_nix::hash::Sha256;
use larder_nix::realisation::DrvOutput;
use larder_nix::signing::{Signature, SigningKey, VerifyingKey};
use larder_nix::store_path::StorePath;
use sqlx::any::{Any, AnyTypeInfo, AnyValueRef};
use sqlx::error::BoxDynError;
use sqlx::{Decode, Type, ValueRef};

/// A stored value that does not decode as what its column holds.
#[derive(Debug, thiserror::Error)]
#[error("{value:?} is not {expected}")]
pub struct InvalidValue {
    /// The value, truncated.
    pub value: String,
    pub expected: &'static str,
}

/// The longest part of an invalid value that an error repeats.
const SHOWN: usize = 100;

impl InvalidValue {
    pub(super) fn new(value: &str, expected: &'static str) -> InvalidValue {
        let end = (0..=SHOWN.min(value.len()))
            .rev()
            .find(|i| value.is_char_boundary(*i))
            .unwrap_or(0);
        InvalidValue {
            value: value[..end].to_owned(),
            expected,
        }
    }
}

/// A cache a token is scoped to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CacheScope {
    /// The cache of this name.
    Cache(String),
    /// A cache of this name that was deleted since: it grants nothing, and a cache created
    /// later under the same name is another cache.
    Ended(String),
}

/// The prefix of an ended scope in the `tokens.caches` column: no cache name starts with it.
const ENDED_PREFIX: char = '!';

/// A type kept in one text column.
pub trait Column: Sized {
    /// What the column holds, for errors ("a nix32 SHA-256").
    const WHAT: &'static str;
    fn from_text(text: &str) -> Option<Self>;
    /// Whether an error must not repeat the value (a secret).
    const SECRET: bool = false;
    /// The value a NULL stands for, if the column may be NULL.
    fn from_null() -> Option<Self> {
        None
    }
}

/// A column decoded as `T`; see the module documentation.
#[derive(Debug)]
pub struct Stored<T>(pub T);

impl<T> Type<Any> for Stored<T> {
    fn type_info() -> AnyTypeInfo {
        <str as Type<Any>>::type_info()
    }
    fn compatible(ty: &AnyTypeInfo) -> bool {
        <str as Type<Any>>::compatible(ty)
    }
}

impl<'r, T: Column> Decode<'r, Any> for Stored<T> {
    fn decode(value: AnyValueRef<'r>) -> Result<Self, BoxDynError> {
        if value.is_null() {
            return T::from_null()
                .map(Stored)
                .ok_or_else(|| Box::new(sqlx::error::UnexpectedNullError) as BoxDynError);
        }
        let text = <&str as Decode<Any>>::decode(value)?;
        match T::from_text(text) {
            Some(v) => Ok(Stored(v)),
            None if T::SECRET => Err(Box::new(InvalidValue::new("(secret)", T::WHAT))),
            None => Err(Box::new(InvalidValue::new(text, T::WHAT))),
        }
    }
}

/// A boolean kept as an integer (0 or 1), which both engines store alike.
#[derive(Debug)]
pub struct Flag(pub bool);

impl Type<Any> for Flag {
    fn type_info() -> AnyTypeInfo {
        <i64 as Type<Any>>::type_info()
    }
    fn compatible(ty: &AnyTypeInfo) -> bool {
        <i64 as Type<Any>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Any> for Flag {
    fn decode(value: AnyValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(Flag(<i64 as Decode<Any>>::decode(value)? != 0))
    }
}

impl From<Flag> for bool {
    fn from(f: Flag) -> bool {
        f.0
    }
}

/// `Stored<T>` into `T`, for each `T` a row holds (one impl each: `T` is foreign).
macro_rules! unwrap_stored {
    ($($t:ty),* $(,)?) => {
        $(impl From<Stored<$t>> for $t {
            fn from(s: Stored<$t>) -> $t {
                s.0
            }
        })*
    };
}

unwrap_stored!(
    Sha256,
    Compression,
    SigningMode,
    Option<VerifyingKey>,
    Option<SecretKey>,
    Vec<VerifyingKey>,
    StorePath,
    Option<StorePath>,
    Vec<StorePath>,
    Vec<Signature>,
    DrvOutput,
    BTreeSet<Perm>,
    Option<Vec<CacheScope>>,
    Vec<String>,
);

impl<T: Column> Column for Option<T> {
    const WHAT: &'static str = T::WHAT;
    const SECRET: bool = T::SECRET;
    fn from_text(text: &str) -> Option<Self> {
        T::from_text(text).map(Some)
    }
    fn from_null() -> Option<Self> {
        Some(None)
    }
}

impl Column for Sha256 {
    const WHAT: &'static str = "a nix32 SHA-256";
    fn from_text(text: &str) -> Option<Self> {
        larder_nix::nixbase32::decode_fixed::<32>(text)
            .ok()
            .map(Sha256::from_bytes)
    }
}

impl Column for Compression {
    const WHAT: &'static str = "a compression (zstd, xz or none)";
    fn from_text(text: &str) -> Option<Self> {
        Compression::from_name(text)
    }
}

impl Column for StorePath {
    const WHAT: &'static str = "a store path basename";
    fn from_text(text: &str) -> Option<Self> {
        StorePath::from_basename(text).ok()
    }
}

impl Column for DrvOutput {
    const WHAT: &'static str = "a derivation output id (sha256:<base16>!<output>)";
    fn from_text(text: &str) -> Option<Self> {
        DrvOutput::parse(text).ok()
    }
}

impl Column for Vec<StorePath> {
    const WHAT: &'static str = "store path basenames separated by spaces";
    fn from_text(text: &str) -> Option<Self> {
        text.split(' ')
            .filter(|r| !r.is_empty())
            .map(|r| StorePath::from_basename(r).ok())
            .collect()
    }
}

impl Column for Vec<Signature> {
    const WHAT: &'static str = "signatures (name:base64), one a line";
    fn from_text(text: &str) -> Option<Self> {
        text.lines()
            .filter(|s| !s.is_empty())
            .map(|s| Signature::parse(s).ok())
            .collect()
    }
}

impl Column for VerifyingKey {
    const WHAT: &'static str = "a public key (name:base64)";
    fn from_text(text: &str) -> Option<Self> {
        VerifyingKey::parse(text).ok()
    }
}

impl Column for SecretKey {
    const WHAT: &'static str = "a secret key (name:base64)";
    const SECRET: bool = true;
    fn from_text(text: &str) -> Option<Self> {
        SigningKey::parse(text).ok().map(SecretKey)
    }
}

/// Upstream keys, one a line; NULL for none.
impl Column for Vec<VerifyingKey> {
    const WHAT: &'static str = "public keys (name:base64), one a line";
    fn from_text(text: &str) -> Option<Self> {
        text.lines()
            .filter(|k| !k.is_empty())
            .map(|k| VerifyingKey::parse(k).ok())
            .collect()
    }
    fn from_null() -> Option<Self> {
        Some(Vec::new())
    }
}

/// Upstream cache URLs (`caches.upstreams`), one per line, in the order they are tried;
/// NULL: none. The server checks each is an `http(s)://` URL before storing it.
impl Column for Vec<String> {
    const WHAT: &'static str = "upstream URLs, one per line";
    fn from_text(text: &str) -> Option<Self> {
        Some(
            text.lines()
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    }
    fn from_null() -> Option<Self> {
        Some(Vec::new())
    }
}

/// Upstream URLs as stored (see `Column for Vec<String>`).
pub fn urls_text(urls: &[String]) -> Option<String> {
    (!urls.is_empty()).then(|| urls.join("\n"))
}

impl Column for SigningMode {
    const WHAT: &'static str = "a signing mode (managed or client)";
    fn from_text(text: &str) -> Option<Self> {
        [SigningMode::Managed, SigningMode::Client]
            .into_iter()
            .find(|m| m.as_str() == text)
    }
}

/// Who signs a cache's paths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SigningMode {
    /// The server, with the cache's secret key.
    #[default]
    Managed,
    /// The pushing client; the server knows only the public key.
    Client,
}

impl SigningMode {
    /// As stored and shown: `managed`, `client`.
    pub fn as_str(self) -> &'static str {
        match self {
            SigningMode::Managed => "managed",
            SigningMode::Client => "client",
        }
    }
}

impl std::fmt::Display for SigningMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A cache's managed signing key, as the store holds it: compared by value (for tests of
/// rows), never shown.
#[derive(Clone)]
pub struct SecretKey(pub SigningKey);

impl PartialEq for SecretKey {
    fn eq(&self, other: &SecretKey) -> bool {
        self.0.to_secret_string() == other.0.to_secret_string()
    }
}

impl Eq for SecretKey {}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({})", self.0.name())
    }
}

impl Column for BTreeSet<Perm> {
    const WHAT: &'static str = "permissions (pull, push, admin) separated by commas";
    fn from_text(text: &str) -> Option<Self> {
        text.split(',')
            .filter(|p| !p.is_empty())
            .map(Perm::parse)
            .collect()
    }
}

/// A token's scope; NULL for every cache.
impl Column for Option<Vec<CacheScope>> {
    const WHAT: &'static str = "cache names separated by commas";
    fn from_text(text: &str) -> Option<Self> {
        let scopes = text
            .split(',')
            .filter(|c| !c.is_empty())
            .map(|c| match c.strip_prefix(ENDED_PREFIX) {
                Some(name) => CacheScope::Ended(name.to_owned()),
                None => CacheScope::Cache(c.to_owned()),
            })
            .collect();
        Some(Some(scopes))
    }
    fn from_null() -> Option<Self> {
        Some(None)
    }
}

/// References as stored: basenames separated by spaces.
pub fn refs_text(refs: &[StorePath]) -> String {
    refs.iter()
        .map(StorePath::basename)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Signatures as stored: one a line.
pub fn sigs_text(sigs: &[Signature]) -> String {
    sigs.iter()
        .map(Signature::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Upstream keys as stored: one a line, NULL for none.
pub fn keys_text(keys: &[VerifyingKey]) -> Option<String> {
    (!keys.is_empty()).then(|| {
        keys.iter()
            .map(VerifyingKey::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// Permissions as stored: comma-separated, weakest first.
pub fn perms_text(perms: &BTreeSet<Perm>) -> String {
    perms
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// A token's scope as stored: comma-separated names, an ended one prefixed with `!`.
pub fn scopes_text(scopes: &[CacheScope]) -> String {
    scopes
        .iter()
        .map(|s| match s {
            CacheScope::Cache(name) => name.clone(),
            CacheScope::Ended(name) => format!("{ENDED_PREFIX}{name}"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sp(name: &str) -> StorePath {
        let d = Sha256::digest(name.as_bytes());
        let mut digest = [0u8; 20];
        digest.copy_from_slice(&d.as_bytes()[..20]);
        StorePath::from_parts(digest, name).unwrap()
    }

    fn other_key() -> SigningKey {
        SigningKey::from_seed("k-2", [8; 32]).unwrap()
    }

    #[test]
    fn every_encoding_reads_back() {
        let h = Sha256::digest(b"x");
        assert_eq!(Sha256::from_text(&h.to_nix32()), Some(h));
        for c in Compression::ALL {
            assert_eq!(Compression::from_text(c.as_str()), Some(c));
        }
        let refs = vec![sp("a"), sp("b")];
        assert_eq!(Vec::<StorePath>::from_text(&refs_text(&refs)), Some(refs));
        assert_eq!(Vec::<StorePath>::from_text(""), Some(vec![]));
        let key = SigningKey::from_seed("k-1", [7; 32]).unwrap();
        let sigs = vec![key.sign("one"), key.sign("two")];
        assert_eq!(Vec::<Signature>::from_text(&sigs_text(&sigs)), Some(sigs));
        assert_eq!(Vec::<Signature>::from_text(""), Some(vec![]));
        let perms: BTreeSet<Perm> = [Perm::Push, Perm::Pull].into();
        assert_eq!(perms_text(&perms), "pull,push");
        assert_eq!(BTreeSet::<Perm>::from_text("pull,push"), Some(perms));
        let scopes = vec![CacheScope::Cache("a".into()), CacheScope::Ended("b".into())];
        assert_eq!(scopes_text(&scopes), "a,!b");
        assert_eq!(
            Option::<Vec<CacheScope>>::from_text("a,!b"),
            Some(Some(scopes))
        );
        assert_eq!(Option::<Vec<CacheScope>>::from_null(), Some(None));
        let keys = vec![key.verifying_key(), other_key().verifying_key()];
        assert_eq!(
            Vec::<VerifyingKey>::from_text(&keys_text(&keys).unwrap()),
            Some(keys)
        );
        assert_eq!(keys_text(&[]), None);
        assert_eq!(Vec::<VerifyingKey>::from_null(), Some(vec![]));
        for m in [SigningMode::Managed, SigningMode::Client] {
            assert_eq!(SigningMode::from_text(m.as_str()), Some(m));
        }
        let secret = SecretKey::from_text(&key.to_secret_string()).unwrap();
        assert_eq!(secret, SecretKey(key.clone()));
        assert_ne!(secret, SecretKey(other_key()));
        assert_eq!(format!("{secret:?}"), "SecretKey(k-1)");
        assert_eq!(Option::<StorePath>::from_null(), Some(None));
    }

    #[test]
    fn garbage_does_not_decode() {
        assert_eq!(Sha256::from_text("not a hash"), None);
        assert_eq!(Sha256::from_text(&Sha256::digest(b"x").to_hex()), None);
        assert_eq!(Compression::from_text("gzip"), None);
        assert_eq!(StorePath::from_text("nohash"), None);
        assert_eq!(Vec::<StorePath>::from_text("a b"), None);
        assert_eq!(Vec::<Signature>::from_text("k-1:notbase64"), None);
        assert_eq!(BTreeSet::<Perm>::from_text("pull,root"), None);
        assert_eq!(Sha256::from_null(), None);
        assert_eq!(SigningMode::from_text("both"), None);
        assert_eq!(VerifyingKey::from_text("k-1:pk"), None);
        assert!(SecretKey::from_text("k-1:sk").is_none());
    }

    #[test]
    fn an_invalid_value_is_shown_truncated() {
        let long = "é".repeat(200);
        let e = InvalidValue::new(&long, Sha256::WHAT);
        assert_eq!(e.value.chars().count(), SHOWN / 2);
        assert!(e.to_string().ends_with("is not a nix32 SHA-256"));
    }
}
