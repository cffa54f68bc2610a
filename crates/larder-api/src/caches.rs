//! Caches: what `GET /caches[/{cache}]` answers ([`Cache`]), the bodies that create and
//! configure one ([`CreateCache`], [`ConfigureCache`], [`RegisterKey`]), the bulk "which paths
//! are missing" query, and `GET /whoami`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Perm;

/// A cache's compression of new uploads.
pub const COMPRESSIONS: [&str; 3] = ["zstd", "xz", "none"];

/// A cache as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Cache {
    pub name: String,
    /// The substituter URL.
    pub url: String,
    /// Nix `name:base64` key; null for a client-signed cache without a registered key.
    pub public_key: Option<String>,
    pub private: bool,
    pub priority: i64,
    #[schema(pattern = "^(zstd|xz|none)$")]
    pub compression: String,
    /// Storage limit in bytes; null: none.
    pub max_size: Option<i64>,
    /// `managed` (the server signs) or `client` (pushers sign).
    #[schema(pattern = "^(managed|client)$")]
    pub signing_mode: String,
    /// Stored (compressed) bytes.
    pub size: i64,
    /// Uncompressed NAR bytes.
    pub nar_size: i64,
    /// Bytes the cache's NAR files occupy in the store after deduplication: each chunk they
    /// use counted once, however many of its NARs (or other caches) share it. `size` is what
    /// the limit counts (older servers: absent, 0).
    #[serde(default)]
    pub stored_size: i64,
    pub paths: i64,
    /// size is past 85 % of max_size (older servers: absent, false).
    #[serde(default)]
    pub near_limit: bool,
    /// Public keys trusted as upstream for this cache, beside the server's upstream_keys
    /// (older servers: absent, none): pushed paths may reference what they sign, and what
    /// `upstreams` serve is kept only when one of them signed it.
    #[serde(default)]
    pub upstream_keys: Vec<String>,
    /// Upstream caches asked, in order, for paths the cache lacks (pull-through); fetched
    /// paths are kept (older servers: absent, none).
    #[serde(default)]
    pub upstreams: Vec<String>,
    /// nix.conf lines (extra-substituters, extra-trusted-public-keys).
    pub nix_conf: String,
    /// The same as a flake `nixConfig` block (older servers: absent, empty).
    #[serde(default)]
    pub flake_nix_config: String,
}

/// Bytes, or text such as "5GiB"; more than 0 (null, where allowed, means no limit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

/// `POST /caches`: a new cache, which the server signs for with a fresh key; unset settings
/// take the server's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCache {
    pub name: String,
    #[serde(default)]
    pub private: bool,
    pub priority: Option<i64>,
    /// `zstd`, `xz` or `none`.
    pub compression: Option<String>,
    pub max_size: Option<Size>,
    /// Upstream cache URLs (`http://`, `https://`), asked in order on a miss.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<String>,
    /// Nix `name:base64` keys trusted for upstream paths, beside the server's upstream_keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstream_keys: Vec<String>,
}

/// `PATCH /caches/{cache}`: only the settings given change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigureCache {
    // No `default` on these: a JSON array is refused (serde would read one with no element
    // as a struct of defaults), while an absent field still reads as None.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    /// `zstd`, `xz` or `none`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// A size, or null to remove the limit (absent: unchanged).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    #[schema(value_type = Option<Size>)]
    pub max_size: Option<Option<Size>>,
    /// Replaces the upstream cache URLs (an empty list: no pull-through).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstreams: Option<Vec<String>>,
    /// Replaces the cache's own upstream keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_keys: Option<Vec<String>>,
}

impl ConfigureCache {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == ConfigureCache::default()
    }
}

/// A field that is present (possibly null): `Some(None)` for null, `Some(Some(_))` for a value.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<Size>>, D::Error> {
    Ok(Some(Option::deserialize(d)?))
}

/// `POST /caches/{cache}/public-key`: switch the cache to client-side signing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterKey {
    /// Nix `name:base64` public key.
    pub public_key: String,
}

/// `POST /caches/{cache}/missing`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MissingRequest {
    /// Store paths or their 32-character hash parts.
    pub paths: Vec<String>,
}

/// The answer to [`MissingRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MissingResponse {
    /// The given entries the cache lacks, in input order.
    pub missing: Vec<String>,
}

/// `GET /whoami`: what the request's token may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    pub authenticated: bool,
    pub token_id: Option<String>,
    pub label: Option<String>,
    pub perms: Vec<Perm>,
    /// null: every cache.
    pub caches: Option<Vec<String>>,
    pub server_admin: bool,
    pub expires_at: Option<i64>,
}

impl WhoAmI {
    /// Whether the token grants `perm` (each includes the ones before it) on `cache`, as the
    /// server decides.
    pub fn grants(&self, perm: Perm, cache: &str) -> bool {
        self.server_admin
            || (self.perms.iter().any(|p| *p >= perm)
                && self
                    .caches
                    .as_ref()
                    .is_none_or(|c| c.iter().any(|c| c == cache)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    #[test]
    fn configure_tells_a_null_limit_from_an_absent_one() {
        let absent: ConfigureCache = serde_json::from_str(r#"{"priority": 3}"#).unwrap();
        assert_eq!(absent.max_size, None);
        let null: ConfigureCache = serde_json::from_str(r#"{"max_size": null}"#).unwrap();
        assert_eq!(null.max_size, Some(None));
        let text: ConfigureCache = serde_json::from_str(r#"{"max_size": "5GiB"}"#).unwrap();
        assert_eq!(text.max_size, Some(Some(Size::Text("5GiB".into()))));
        // And they are sent back as they were read.
        assert_eq!(
            serde_json::to_string(&null).unwrap(),
            r#"{"max_size":null}"#
        );
        assert_eq!(serde_json::to_string(&absent).unwrap(), r#"{"priority":3}"#);
        assert!(ConfigureCache::default().is_empty() && !null.is_empty());
        assert!(serde_json::from_str::<ConfigureCache>(r#"{"size": 1}"#).is_err());
        assert!(serde_json::from_str::<ConfigureCache>("[]").is_err());
    }

    #[test]
    fn sizes_are_bytes_or_text() {
        assert_eq!(serde_json::from_str::<Size>("12").unwrap(), Size::Bytes(12));
        assert_eq!(
            serde_json::to_string(&Size::Text("1GiB".into())).unwrap(),
            r#""1GiB""#
        );
    }

    #[test]
    fn a_cache_without_newer_fields_still_decodes_and_a_renamed_one_fails() {
        let old = r#"{"name":"a","url":"u","public_key":null,"private":false,"priority":40,
            "compression":"zstd","max_size":null,"signing_mode":"managed","size":0,
            "nar_size":0,"paths":0,"nix_conf":""}"#;
        let c: Cache = serde_json::from_str(old).unwrap();
        assert!(!c.near_limit && c.upstream_keys.is_empty());
        let renamed = old.replace("\"paths\"", "\"path_count\"");
        assert!(serde_json::from_str::<Cache>(&renamed).is_err());
    }

    // Moved here with `WhoAmI` from larder-client's api module, where it took strings.
    fn who(perms: &[Perm], caches: Option<&[&str]>, server_admin: bool) -> WhoAmI {
        WhoAmI {
            authenticated: true,
            token_id: None,
            label: None,
            perms: perms.to_vec(),
            caches: caches.map(|c| c.iter().map(|c| c.to_string()).collect()),
            server_admin,
            expires_at: None,
        }
    }

    #[test]
    fn permissions_include_the_lesser_ones_within_their_caches() {
        let push_a = who(&[Perm::Push], Some(&["a"]), false);
        assert!(push_a.grants(Perm::Pull, "a") && push_a.grants(Perm::Push, "a"));
        assert!(!push_a.grants(Perm::Admin, "a") && !push_a.grants(Perm::Pull, "b"));
        let pull_all = who(&[Perm::Pull], None, false);
        assert!(pull_all.grants(Perm::Pull, "any") && !pull_all.grants(Perm::Push, "any"));
        assert!(who(&[Perm::Admin], None, true).grants(Perm::Admin, "any"));
        assert!(!who(&[], None, false).grants(Perm::Pull, "a"));
        // A word that is no permission grants nothing: it does not even decode.
        assert!("sudo".parse::<Perm>().is_err());
    }
}
