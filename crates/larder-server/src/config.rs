//! Server configuration, defined once: [`Settings`] is every setting's TOML key, `larder serve`
//! flag, `LARDER_*` environment variable and help text; its defaults are the named constants
//! below; [`Settings::layered`] stacks flag > environment > file, and [`Config::resolve`] fills
//! in the defaults and checks every value. [`Config::to_masked_toml`] prints the result
//! (`larder serve --print-config`) with secrets masked.
//!
//! Sizes and durations are read and written by [`parse_size`], [`parse_duration`] and their
//! `format_` pair (`config/units.rs`).

use std::path::PathBuf;
use std::time::Duration;

mod oidc;
mod print;
mod settings;
mod units;
pub use oidc::{
    issuer_url_allowed, ClaimPattern, IssuerFile, OidcConfig, OidcFile, Rule, RuleFile,
    TrustedIssuer, MAX_OIDC_TOKEN_LIFETIME,
};
pub use print::mask_url;
pub use settings::{
    ConfigFile, SettingVar, Settings, MASK, S3_ACCESS_KEY_ID_ENV, S3_SECRET_ACCESS_KEY_ENV,
};
pub use units::{format_duration, format_size, parse_duration, parse_size};

/// Address `larder serve` listens on by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Preferred compression of new caches.
pub const DEFAULT_COMPRESSION: &str = "zstd";
/// zstd level clients use by default (fast, about 450 MB/s on two cores here).
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 3;
/// Largest single upload body accepted (a compressed NAR): 64 GiB.
pub const DEFAULT_MAX_UPLOAD_SIZE: u64 = 64 << 30;
/// How often garbage collection (expired uploads, unreferenced NARs) runs.
pub const DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(3600);
/// How long an uploaded NAR waits for its narinfo before it is garbage.
pub const PENDING_UPLOAD_TTL: Duration = Duration::from_secs(6 * 3600);
/// How long an unfinished multi-part upload is kept without a new part: long enough to resume
/// after an interruption, short enough that abandoned parts do not pile up.
pub const DEFAULT_MULTIPART_IDLE_TTL: Duration = Duration::from_secs(3600);
/// The shortest multi-part idle time accepted: a part takes longer than this to arrive only
/// on a link too slow for parts of this size.
pub const MIN_MULTIPART_IDLE_TTL: Duration = Duration::from_secs(60);
/// Most unfinished multi-part uploads one cache, and one token, may have at once on a server:
/// two `larder push` at once (8 jobs each) of nothing but large paths.
pub const DEFAULT_MULTIPART_MAX_OPEN: usize = 16;
/// How long the NAR of an evicted path stays servable (and safe from garbage collection):
/// a narinfo served just before the eviction, by this server or a proxy, must not name a
/// deleted NAR. Longer than the narinfo TTL of the hot cache by far.
pub const DEFAULT_EVICTED_NAR_GRACE: Duration = Duration::from_secs(3600);
/// The shortest grace accepted: the hot cache's narinfo TTL plus a margin.
pub const MIN_EVICTED_NAR_GRACE: Duration = Duration::from_secs(10);
/// How often the background replica scans the object store for orphaned objects (chunk
/// objects without a row): a full listing of the store, so rarely.
pub const DEFAULT_ORPHAN_SCAN_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// How old an orphaned object must be before the scan deletes it: objects copied into the
/// store before their rows (an ongoing `larder migrate`, a restore in progress) are left
/// alone for this long.
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::from_secs(24 * 3600);
/// The shortest orphan grace accepted. (Uploads are safe at any grace: they claim a chunk
/// before writing its object.)
pub const MIN_ORPHAN_GRACE: Duration = Duration::from_secs(3600);
/// How long a read (GET or HEAD) may take to produce its response head before it is
/// answered 503: a database or object store that stopped answering (a network partition, a
/// frozen server) would otherwise hold requests forever. Lookups take milliseconds.
pub const DEFAULT_BACKEND_TIMEOUT: Duration = Duration::from_secs(30);
/// The shortest backend timeout accepted.
pub const MIN_BACKEND_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest NAR accepted, uncompressed: what a compressed upload may expand to (a small zstd
/// or xz stream can claim terabytes).
pub const DEFAULT_MAX_NAR_SIZE: u64 = 64 << 30;
/// How long a connection may take to send a request head, and stay idle between requests:
/// long enough for any real client (Nix sends its next request at once), short enough that
/// silent connections cannot pile up.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections one client address may hold open: Nix opens at most `http-connections` (25
/// by default) per machine, and many machines behind one NAT address stay well below this.
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 256;
/// Keys whose signature marks a store path as available upstream: a pushed path may reference
/// such a path without it being in the cache (Nix substitutes it from upstream).
pub const DEFAULT_UPSTREAM_KEYS: &[&str] = &[larder_nix::signing::CACHE_NIXOS_ORG_KEY];
/// Most upstreams (pull-through, `[caches.NAME] upstreams`) a cache may have.
pub const MAX_UPSTREAMS: usize = 8;

/// Check and normalise an upstream URL: `http://` or `https://` with a host, no credentials,
/// query or fragment; a trailing `/` is dropped.
pub fn check_upstream_url(url: &str) -> Result<String, &'static str> {
    let parsed = url::Url::parse(url).map_err(|_| "not a URL")?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("only http:// and https:// upstreams are supported");
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("no host");
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("credentials are not allowed in the URL");
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err("no query or fragment allowed");
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// Priority of new caches in `nix-cache-info` (cache.nixos.org is 40; lower wins).
pub const DEFAULT_PRIORITY: i64 = 41;
/// How long a presigned NAR URL (`nar_redirect = "presigned"`) stays valid: long enough for
/// a client to start the download it was redirected to (and to resume it), short enough that
/// a URL copied from a log soon grants nothing.
pub const PRESIGNED_URL_TTL: Duration = Duration::from_secs(15 * 60);

/// How NAR downloads are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NarRedirect {
    /// The server streams the NAR from the object store (default; works with every store).
    #[default]
    Stream,
    /// The server answers `307` to a presigned URL of the object store (S3 only), so NAR
    /// bytes flow from the store to the client directly. NARs stored as several chunks are
    /// still streamed. `HEAD` is always answered by the server.
    Presigned,
}

impl std::str::FromStr for NarRedirect {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stream" => Ok(NarRedirect::Stream),
            "presigned" => Ok(NarRedirect::Presigned),
            _ => Err(ConfigError::Value {
                key: "nar_redirect (stream or presigned)",
                value: s.to_owned(),
            }),
        }
    }
}

/// One `[caches.NAME]` table: every key is optional; a key left out keeps the cache's current
/// value (or the default, for a new cache).
#[derive(Debug, Default, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredCacheFile {
    /// Readable only with a token. Default: false.
    pub private: Option<bool>,
    /// `Priority` in `nix-cache-info` (lower wins; cache.nixos.org is 40). Default: 41.
    pub priority: Option<i64>,
    /// Size limit, e.g. `5GiB`, or `none` for no limit. Default: no limit.
    pub max_size: Option<SizeValue>,
    /// `zstd`, `xz` or `none`. Default: the server's `compression`.
    pub compression: Option<String>,
    /// Keys trusted as upstream for this cache, beside the server's `upstream_keys`: a pushed
    /// path may reference paths they sign, and a path fetched from `upstreams` is served only
    /// when one of them (or a server-wide one) signed it.
    pub upstream_keys: Option<Vec<String>>,
    /// Upstream caches (`http://` or `https://` URLs) asked, in order, for a path the cache
    /// lacks (pull-through); what they serve is kept. Default: none.
    pub upstreams: Option<Vec<String>>,
}

/// A declared cache, checked: what [`crate::declared::apply`] makes true at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredCache {
    pub name: String,
    pub private: Option<bool>,
    pub priority: Option<i64>,
    /// `Some(None)`: no limit.
    pub max_size: Option<Option<u64>>,
    pub compression: Option<String>,
    pub upstream_keys: Option<Vec<String>>,
    /// Checked and normalised (no trailing `/`).
    pub upstreams: Option<Vec<String>>,
}

/// The TLS certificate and key files the server serves with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A size written as a number of bytes or a string like `5GiB`.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(
    untagged,
    expecting = "a size: a number of bytes or a string like \"5GiB\""
)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

/// A flag's or variable's value: checked, like the file's, by [`Config::resolve`], so an error
/// names the setting the same way wherever the value came from.
impl std::str::FromStr for SizeValue {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(SizeValue::Text(s.to_owned()))
    }
}

impl SizeValue {
    pub fn bytes(&self) -> Result<u64, ConfigError> {
        match self {
            SizeValue::Bytes(b) => Ok(*b),
            SizeValue::Text(t) => parse_size(t),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid size {0:?} (examples: 5GiB, 500MB, 1048576)")]
    Size(String),
    #[error("invalid duration {0:?} (examples: 90s, 30m, 1h, 7d)")]
    Duration(String),
    #[error("invalid {key}: {value:?}")]
    Value { key: &'static str, value: String },
    /// A value of the wrong form, with the setting it was given for.
    #[error("{key}: {inner}")]
    Setting {
        key: &'static str,
        inner: Box<ConfigError>,
    },
    #[error(
        "tls_{set} is set but tls_{unset} is not: give both (--tls-{set} and --tls-{unset}, \
         LARDER_TLS_{SET} and LARDER_TLS_{UNSET}, or tls_{set} and tls_{unset} in the config \
         file; they may come from different places)",
        SET = set.to_uppercase(),
        UNSET = unset.to_uppercase()
    )]
    TlsPair {
        set: &'static str,
        unset: &'static str,
    },
    #[error("invalid {key} of declared cache {cache:?} ([caches.{cache}]): {value:?}")]
    Declared {
        cache: String,
        key: &'static str,
        value: String,
    },
    #[error(
        "invalid public_url {value:?} (from --public-url, LARDER_PUBLIC_URL or the config \
         file): {reason}"
    )]
    PublicUrl { value: String, reason: String },
    #[error("cannot print the configuration")]
    Print(#[from] toml::ser::Error),
}

/// The resolved configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub data_dir: PathBuf,
    pub public_url: String,
    pub database: String,
    pub database_max_connections: Option<u32>,
    pub storage: String,
    pub s3_credentials: Option<larder_store::S3Credentials>,
    pub nar_redirect: NarRedirect,
    pub compression: String,
    pub compression_level: i32,
    pub max_upload_size: u64,
    pub max_nar_size: u64,
    pub gc_interval: Duration,
    pub evicted_nar_grace: Duration,
    /// `None`: no orphan scan.
    pub orphan_scan_interval: Option<Duration>,
    pub orphan_grace: Duration,
    pub backend_timeout: Duration,
    pub header_timeout: Duration,
    /// `None`: as many as the open-file limit allows ([`crate::conn::connections_for_fd_limit`]).
    pub max_connections: Option<usize>,
    pub max_connections_per_client: usize,
    /// Most unfinished multi-part uploads per cache and per token, on this server.
    pub multipart_max_open: usize,
    /// Most bytes of unfinished multi-part uploads per cache (further bounded by its size
    /// limit) and per token, on this server.
    pub multipart_max_staged: u64,
    pub multipart_idle_ttl: Duration,
    pub upstream_keys: Vec<larder_nix::signing::VerifyingKey>,
    /// HTTPS instead of plain HTTP.
    pub tls: Option<TlsFiles>,
    /// Trusted OIDC issuers and their rules (`[oidc]`); none by default.
    pub oidc: OidcConfig,
    pub declared_caches: Vec<DeclaredCache>,
    pub delete_undeclared_caches: bool,
}

impl Config {
    /// Fill every unset key with its default.
    pub fn resolve(file: ConfigFile, default_data_dir: PathBuf) -> Result<Config, ConfigError> {
        let listen = file.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let data_dir = file.data_dir.unwrap_or(default_data_dir);
        let tls = match (file.tls_cert, file.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (cert, _) => {
                let (set, unset) = if cert.is_some() {
                    ("cert", "key")
                } else {
                    ("key", "cert")
                };
                return Err(ConfigError::TlsPair { set, unset });
            }
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        if let Some(url) = &file.public_url {
            check_public_url(url).map_err(|reason| ConfigError::PublicUrl {
                value: url.clone(),
                reason,
            })?;
        }
        let public_url = file
            .public_url
            .unwrap_or_else(|| format!("{scheme}://{listen}"))
            .trim_end_matches('/')
            .to_owned();
        let database = file
            .database
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("larder.db").display()));
        if file.database_max_connections == Some(0) {
            return Err(ConfigError::Value {
                key: "database_max_connections (at least 1)",
                value: "0".into(),
            });
        }
        let storage = file
            .storage
            .unwrap_or_else(|| format!("file://{}", data_dir.join("store").display()));
        let s3_credentials = match (file.s3_access_key_id, file.s3_secret_access_key) {
            (Some(access_key_id), Some(secret_access_key)) => Some(larder_store::S3Credentials {
                access_key_id,
                secret_access_key,
            }),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Value {
                    key: "S3 credentials (set both s3_access_key_id and s3_secret_access_key)",
                    value: "only one of them".to_owned(),
                })
            }
        };
        let nar_redirect = match file.nar_redirect {
            Some(s) => s.parse()?,
            None => NarRedirect::default(),
        };
        let compression = file
            .compression
            .unwrap_or_else(|| DEFAULT_COMPRESSION.to_owned());
        if !matches!(compression.as_str(), "zstd" | "xz" | "none") {
            return Err(ConfigError::Value {
                key: "compression",
                value: compression,
            });
        }
        let setting = |key: &'static str| {
            move |inner: ConfigError| ConfigError::Setting {
                key,
                inner: Box::new(inner),
            }
        };
        let max_nar_size = match file.max_nar_size {
            Some(s) => s.bytes().map_err(setting("max_nar_size"))?,
            None => DEFAULT_MAX_NAR_SIZE,
        };
        let max_upload_size = match file.max_upload_size {
            Some(s) => s.bytes().map_err(setting("max_upload_size"))?,
            None => DEFAULT_MAX_UPLOAD_SIZE,
        };
        let gc_interval = match file.gc_interval {
            Some(s) => parse_duration(&s).map_err(setting("gc_interval"))?,
            None => DEFAULT_GC_INTERVAL,
        };
        let evicted_nar_grace = match file.evicted_nar_grace {
            Some(s) => parse_duration(&s).map_err(setting("evicted_nar_grace"))?,
            None => DEFAULT_EVICTED_NAR_GRACE,
        };
        if evicted_nar_grace < MIN_EVICTED_NAR_GRACE {
            return Err(ConfigError::Value {
                key: "evicted_nar_grace (at least 10s)",
                value: format!("{}s", evicted_nar_grace.as_secs()),
            });
        }
        let orphan_scan_interval = match file.orphan_scan_interval.as_deref() {
            Some("off") => None,
            Some(s) => Some(parse_duration(s).map_err(setting("orphan_scan_interval"))?)
                .filter(|d| !d.is_zero()),
            None => Some(DEFAULT_ORPHAN_SCAN_INTERVAL),
        };
        let orphan_grace = match file.orphan_grace {
            Some(s) => parse_duration(&s).map_err(setting("orphan_grace"))?,
            None => DEFAULT_ORPHAN_GRACE,
        };
        if orphan_grace < MIN_ORPHAN_GRACE {
            return Err(ConfigError::Value {
                key: "orphan_grace (at least 1h)",
                value: format!("{}s", orphan_grace.as_secs()),
            });
        }
        let backend_timeout = match file.backend_timeout {
            Some(s) => parse_duration(&s).map_err(setting("backend_timeout"))?,
            None => DEFAULT_BACKEND_TIMEOUT,
        };
        if backend_timeout < MIN_BACKEND_TIMEOUT {
            return Err(ConfigError::Value {
                key: "backend_timeout (at least 1s)",
                value: format!("{}s", backend_timeout.as_secs()),
            });
        }
        let header_timeout = match file.header_timeout {
            Some(s) => parse_duration(&s).map_err(setting("header_timeout"))?,
            None => DEFAULT_HEADER_TIMEOUT,
        };
        if header_timeout < Duration::from_secs(1) {
            return Err(ConfigError::Value {
                key: "header_timeout (at least 1s)",
                value: format!("{}s", header_timeout.as_secs()),
            });
        }
        let multipart_max_staged = match file.multipart_max_staged {
            Some(s) => s.bytes().map_err(setting("multipart_max_staged"))?,
            None => max_upload_size,
        };
        let multipart_idle_ttl = match file.multipart_idle_ttl {
            Some(s) => parse_duration(&s).map_err(setting("multipart_idle_ttl"))?,
            None => DEFAULT_MULTIPART_IDLE_TTL,
        };
        if multipart_idle_ttl < MIN_MULTIPART_IDLE_TTL {
            return Err(ConfigError::Value {
                key: "multipart_idle_ttl (at least 1m)",
                value: format!("{}s", multipart_idle_ttl.as_secs()),
            });
        }
        for (key, value) in [
            ("max_connections (at least 1)", file.max_connections),
            (
                "max_connections_per_client (at least 1)",
                file.max_connections_per_client,
            ),
            ("multipart_max_open (at least 1)", file.multipart_max_open),
        ] {
            if value == Some(0) {
                return Err(ConfigError::Value {
                    key,
                    value: "0".into(),
                });
            }
        }
        let upstream_keys = match file.upstream_keys {
            Some(keys) => keys,
            None => DEFAULT_UPSTREAM_KEYS
                .iter()
                .map(|k| k.to_string())
                .collect(),
        }
        .iter()
        .map(|k| {
            larder_nix::signing::VerifyingKey::parse(k).map_err(|_| ConfigError::Value {
                key: "upstream_keys",
                value: k.clone(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
        let oidc = match file.oidc {
            Some(o) => o.resolve()?,
            None => OidcConfig::default(),
        };
        let declared_caches = file
            .caches
            .into_iter()
            .map(|(name, c)| declared_cache(name, c))
            .collect::<Result<Vec<_>, _>>()?;
        let delete_undeclared_caches = file.delete_undeclared_caches.unwrap_or(false);
        if delete_undeclared_caches && declared_caches.is_empty() {
            return Err(ConfigError::Value {
                key: "delete_undeclared_caches (it would delete every cache, since no \
                      [caches.NAME] table is declared; declare the caches to keep)",
                value: "true".into(),
            });
        }
        Ok(Config {
            upstream_keys,
            tls,
            oidc,
            declared_caches,
            delete_undeclared_caches,
            listen,
            data_dir,
            public_url,
            database,
            database_max_connections: file.database_max_connections,
            storage,
            s3_credentials,
            nar_redirect,
            compression,
            compression_level: file.compression_level.unwrap_or(DEFAULT_COMPRESSION_LEVEL),
            max_upload_size,
            max_nar_size,
            gc_interval,
            evicted_nar_grace,
            orphan_scan_interval,
            orphan_grace,
            backend_timeout,
            header_timeout,
            max_connections: file.max_connections,
            max_connections_per_client: file
                .max_connections_per_client
                .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_CLIENT),
            multipart_max_open: file
                .multipart_max_open
                .unwrap_or(DEFAULT_MULTIPART_MAX_OPEN),
            multipart_max_staged,
            multipart_idle_ttl,
        })
    }

    /// The host part of `public_url`, used to name managed signing keys.
    pub fn public_host(&self) -> String {
        let rest = self
            .public_url
            .split_once("://")
            .map(|(_, r)| r)
            .unwrap_or(&self.public_url);
        let authority = rest.split('/').next().unwrap_or(rest);
        let authority = authority
            .rsplit_once('@')
            .map(|(_, h)| h)
            .unwrap_or(authority);
        if let Some(v6) = authority.strip_prefix('[') {
            return v6.split(']').next().unwrap_or(v6).to_owned();
        }
        authority.split(':').next().unwrap_or(authority).to_owned()
    }
}

/// Check one `[caches.NAME]` table; errors name the table and the key.
fn declared_cache(name: String, c: DeclaredCacheFile) -> Result<DeclaredCache, ConfigError> {
    let bad = |key: &'static str, value: String| ConfigError::Declared {
        cache: name.clone(),
        key,
        value,
    };
    if crate::RESERVED_NAMES.contains(&name.as_str()) {
        return Err(bad(
            "name (reserved: api, ui, static, metrics and healthz are routes)",
            name.clone(),
        ));
    }
    if !crate::valid_cache_name(&name) {
        return Err(bad(
            "name (1-63 of [a-z0-9-], starting with a letter or digit)",
            name.clone(),
        ));
    }
    if let Some(p) = c.priority {
        if !(0..=1_000_000).contains(&p) {
            return Err(bad("priority (0 to 1000000)", p.to_string()));
        }
    }
    if let Some(comp) = &c.compression {
        if !matches!(comp.as_str(), "zstd" | "xz" | "none") {
            return Err(bad("compression (zstd, xz or none)", comp.clone()));
        }
    }
    let max_size = match c.max_size {
        None => None,
        Some(SizeValue::Text(t)) if t == "none" => Some(None),
        Some(s) => {
            let shown = match &s {
                SizeValue::Bytes(b) => b.to_string(),
                SizeValue::Text(t) => t.clone(),
            };
            match s.bytes() {
                Ok(b) if b > 0 && b <= i64::MAX as u64 => Some(Some(b)),
                _ => {
                    return Err(bad(
                        "max_size (more than 0, like 5GiB, or \"none\" for no limit)",
                        shown,
                    ))
                }
            }
        }
    };
    if let Some(keys) = &c.upstream_keys {
        for k in keys {
            larder_nix::signing::VerifyingKey::parse(k)
                .map_err(|_| bad("upstream_keys (name:base64 public keys)", k.clone()))?;
        }
    }
    if c.upstreams
        .as_ref()
        .is_some_and(|u| u.len() > MAX_UPSTREAMS)
    {
        return Err(bad(
            "upstreams (at most 8)",
            format!("{} URLs", c.upstreams.as_ref().map_or(0, Vec::len)),
        ));
    }
    let upstreams = c
        .upstreams
        .map(|urls| {
            urls.iter()
                .map(|u| {
                    check_upstream_url(u)
                        .map_err(|_| bad("upstreams (http:// or https:// URLs)", u.clone()))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    Ok(DeclaredCache {
        name: name.clone(),
        private: c.private,
        priority: c.priority,
        max_size,
        compression: c.compression,
        upstream_keys: c.upstream_keys,
        upstreams,
    })
}

/// Why `url` cannot be the base URL clients are given (in `cache info`, nix.conf lines) and
/// whose host names managed signing keys: it must be `http://` or `https://` with a host,
/// and nothing that would break `<public_url>/<cache>` (credentials, query, fragment).
fn check_public_url(url: &str) -> Result<(), String> {
    let example = "e.g. http://cache.example.org:8080 or https://cache.example.org";
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!(
            "it must start with http:// or https:// (did you mean \"http://{url}\"?)"
        ));
    };
    if scheme != "http" && scheme != "https" {
        return Err(format!(
            "it must start with http:// or https://, not {scheme}:// ({example})"
        ));
    }
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("it names no host ({example})"));
    }
    let parsed = url::Url::parse(url).map_err(|e| format!("{e} ({example})"))?;
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("it names no host ({example})"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("it must not carry a user name or password".into());
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err("it must not have a query (?…) or fragment (#…)".into());
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("it must not contain spaces or control characters".into());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("5GiB").unwrap(), 5 << 30);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(toml::from_str::<ConfigFile>("listn = \"x\"").is_err());
        let f: ConfigFile =
            toml::from_str("listen = \"0.0.0.0:1\"\nmax_upload_size = \"1GiB\"").unwrap();
        let c = Config::resolve(f, "/d".into()).unwrap();
        assert_eq!(c.public_url, "http://0.0.0.0:1");
        assert_eq!(c.max_upload_size, 1 << 30);
        assert_eq!(c.database, "sqlite:///d/larder.db");
        assert_eq!(c.database_max_connections, None);
        let f: ConfigFile = toml::from_str("database_max_connections = 0").unwrap();
        assert!(Config::resolve(f, "/d".into()).is_err());
    }

    #[test]
    fn orphan_scan_settings() {
        let c = Config::resolve(ConfigFile::default(), "/d".into()).unwrap();
        assert_eq!(c.orphan_scan_interval, Some(DEFAULT_ORPHAN_SCAN_INTERVAL));
        assert_eq!(c.orphan_grace, DEFAULT_ORPHAN_GRACE);
        for off in ["off", "0", "0s"] {
            let f: ConfigFile =
                toml::from_str(&format!("orphan_scan_interval = \"{off}\"")).unwrap();
            assert_eq!(
                Config::resolve(f, "/d".into())
                    .unwrap()
                    .orphan_scan_interval,
                None
            );
        }
        let f: ConfigFile =
            toml::from_str("orphan_scan_interval = \"6h\"\norphan_grace = \"2d\"").unwrap();
        let c = Config::resolve(f, "/d".into()).unwrap();
        assert_eq!(c.orphan_scan_interval, Some(Duration::from_secs(6 * 3600)));
        assert_eq!(c.orphan_grace, Duration::from_secs(2 * 86400));
        for bad in ["orphan_grace = \"59m\"", "orphan_scan_interval = \"daily\""] {
            let f: ConfigFile = toml::from_str(bad).unwrap();
            assert!(Config::resolve(f, "/d".into()).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bad_value_names_its_setting() {
        for (text, says) in [
            (
                "gc_interval = \"5 parsecs\"",
                "gc_interval: invalid duration \"5 parsecs\"",
            ),
            (
                "orphan_scan_interval = \"daily\"",
                "orphan_scan_interval: invalid duration",
            ),
            (
                "backend_timeout = \"soon\"",
                "backend_timeout: invalid duration",
            ),
            (
                "max_upload_size = \"big\"",
                "max_upload_size: invalid size \"big\"",
            ),
        ] {
            let f: ConfigFile = toml::from_str(text).unwrap();
            let e = Config::resolve(f, "/d".into()).unwrap_err().to_string();
            assert!(e.starts_with(says), "{text}: {e}");
        }
    }

    #[test]
    fn backend_timeout_setting() {
        let c = Config::resolve(ConfigFile::default(), "/d".into()).unwrap();
        assert_eq!(c.backend_timeout, DEFAULT_BACKEND_TIMEOUT);
        let f: ConfigFile = toml::from_str("backend_timeout = \"5s\"").unwrap();
        let c = Config::resolve(f, "/d".into()).unwrap();
        assert_eq!(c.backend_timeout, Duration::from_secs(5));
        for bad in ["0", "500ms", "soon"] {
            let f: ConfigFile = toml::from_str(&format!("backend_timeout = \"{bad}\"")).unwrap();
            assert!(Config::resolve(f, "/d".into()).is_err(), "{bad}");
        }
    }

    #[test]
    fn connection_settings() {
        let c = Config::resolve(ConfigFile::default(), "/d".into()).unwrap();
        assert_eq!(c.header_timeout, DEFAULT_HEADER_TIMEOUT);
        assert_eq!(c.max_connections, None);
        assert_eq!(
            c.max_connections_per_client,
            DEFAULT_MAX_CONNECTIONS_PER_CLIENT
        );
        let f: ConfigFile = toml::from_str(
            "header_timeout = \"5s\"\nmax_connections = 100\nmax_connections_per_client = 10",
        )
        .unwrap();
        let c = Config::resolve(f, "/d".into()).unwrap();
        assert_eq!(c.header_timeout, Duration::from_secs(5));
        assert_eq!(c.max_connections, Some(100));
        assert_eq!(c.max_connections_per_client, 10);
        for bad in [
            "header_timeout = \"0\"",
            "max_connections = 0",
            "max_connections_per_client = 0",
        ] {
            let f: ConfigFile = toml::from_str(bad).unwrap();
            let e = Config::resolve(f, "/d".into()).unwrap_err().to_string();
            assert!(e.contains("at least"), "{bad}: {e}");
        }
    }

    #[test]
    fn s3_settings() {
        let f: ConfigFile = toml::from_str(
            "storage = \"s3://nars?endpoint=http://127.0.0.1:3900&region=garage\"\n\
             s3_access_key_id = \"GK1\"\ns3_secret_access_key = \"hunter2\"\n\
             nar_redirect = \"presigned\"",
        )
        .unwrap();
        assert!(!format!("{f:?}").contains("hunter2"));
        let c = Config::resolve(f, "/d".into()).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(c.nar_redirect, NarRedirect::Presigned);
        let creds = c.s3_credentials.unwrap();
        assert_eq!(creds.secret_access_key.expose(), "hunter2");
        let half: ConfigFile = toml::from_str("s3_access_key_id = \"GK1\"").unwrap();
        assert!(Config::resolve(half, "/d".into()).is_err());
        let bad: ConfigFile = toml::from_str("nar_redirect = \"teleport\"").unwrap();
        assert!(Config::resolve(bad, "/d".into()).is_err());
    }

    #[test]
    fn public_url_must_be_http_with_a_host() {
        let resolve = |url: &str| {
            let f = ConfigFile {
                public_url: Some(url.to_owned()),
                ..ConfigFile::default()
            };
            Config::resolve(f, "/d".into())
        };
        for good in [
            "http://shoshin:8080",
            "https://cache.example.org/",
            "https://cache.example.org/larder",
            "http://[::1]:8080",
            "http://10.0.0.2",
        ] {
            let c = resolve(good).unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(c.public_url, good.trim_end_matches('/'));
        }
        for bad in [
            "shoshin:8080",
            "shoshin",
            "ftp://shoshin",
            "HTTP//shoshin",
            "http://",
            "http:///x",
            "https://:8080",
            "http://shoshin:port",
            "http://user:pw@shoshin",
            "http://shoshin/?x=1",
            "http://shoshin/#top",
            "http://sho shin",
            "",
        ] {
            let e = resolve(bad).expect_err(bad).to_string();
            assert!(e.starts_with("invalid public_url"), "{bad}: {e}");
            assert!(e.contains("--public-url, LARDER_PUBLIC_URL"), "{bad}: {e}");
        }
        let e = resolve("shoshin:8080").unwrap_err().to_string();
        assert!(e.contains("did you mean \"http://shoshin:8080\"?"), "{e}");
    }

    #[test]
    fn public_host() {
        let mut c = Config::resolve(ConfigFile::default(), "/d".into()).unwrap();
        assert_eq!(c.public_host(), "127.0.0.1");
        c.public_url = "https://user@cache.example.org:8443/x".into();
        assert_eq!(c.public_host(), "cache.example.org");
    }
}
