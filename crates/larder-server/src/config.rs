//! Server configuration, defined once: [`Settings`] is every setting's TOML key, `larder serve`
//! flag, `LARDER_*` environment variable and help text; its defaults are the named constants
//! below; [`Settings::layered`] stacks flag > environment > file, and [`Config::resolve`] fills
//! in the defaults and checks every value. [`Config::to_masked_toml`] prints the result
//! (`larder serve --print-config`) with secrets masked.
//!
//! Sizes and durations are read and written by [`units`].

use std::path::{Path, PathBuf};
use std::time::Duration;

mod units;
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
pub const MULTIPART_IDLE_TTL: Duration = Duration::from_secs(3600);
/// Most unfinished multi-part uploads one cache may have at once.
pub const MAX_OPEN_MULTIPART_PER_CACHE: usize = 16;
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
pub const DEFAULT_UPSTREAM_KEYS: &[&str] =
    &["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="];
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

/// Defines the settings struct and, from the same field list, [`Settings::KEYS`] and
/// [`Settings::overlay`], so a new key needs no second spelling.
macro_rules! settings {
    (
        $(#[$meta:meta])*
        pub struct $name:ident { $( $(#[$field_meta:meta])* pub $field:ident : $ty:ty, )* }
    ) => {
        $(#[$meta])*
        pub struct $name { $( $(#[$field_meta])* pub $field: $ty, )* }

        impl $name {
            /// Every key, in the order of the definition.
            pub const KEYS: &'static [&'static str] = &[$(stringify!($field)),*];

            /// `top`'s values replace these, key by key; a key `top` leaves unset keeps this
            /// value.
            pub fn overlay(&mut self, top: $name) {
                $( Layer::layer(&mut self.$field, top.$field); )*
            }
        }
    };
}

settings! {
    /// Every setting of `larder serve`, defined once: the field is the TOML key, `#[arg]` names
    /// the flag and the `LARDER_*` environment variable (file-only keys are `#[arg(skip)]`),
    /// the doc comment is the `--help` text, and the default (in [`Config::resolve`]) is a
    /// named constant of this module. Every key is optional: an unset one takes the next layer's
    /// value ([`Settings::layered`]: flag > environment > file > default).
    ///
    /// The README's settings table is checked against this definition by a test.
    #[derive(Debug, Default, Clone, serde::Deserialize, serde::Serialize, clap::Args)]
    #[serde(deny_unknown_fields)]
    pub struct Settings {
        /// Address to listen on; `127.0.0.1:0` picks a free port. [default: 127.0.0.1:8080]
        #[arg(long, env = "LARDER_LISTEN")]
        pub listen: Option<String>,
        /// Data directory (SQLite database, NAR objects, admin token). On SQLite, one server
        /// at a time uses it (DATA/lock).
        /// [default: $XDG_DATA_HOME/larder]
        #[arg(long = "data", env = "LARDER_DATA_DIR")]
        pub data_dir: Option<PathBuf>,
        /// Base URL clients use to reach this server: http:// or https:// and a host, e.g.
        /// http://shoshin:8080. [default: http://<listen>, https://<listen> with TLS]
        #[arg(long, env = "LARDER_PUBLIC_URL")]
        pub public_url: Option<String>,
        /// Metadata database: sqlite://PATH or postgres://… [default: sqlite://DATA/larder.db]
        #[arg(long, env = "LARDER_DATABASE")]
        pub database: Option<String>,
        /// Most connections to the database, per replica. [default: 16 for PostgreSQL, 8 for
        /// SQLite]
        #[arg(long, env = "LARDER_DATABASE_MAX_CONNECTIONS")]
        pub database_max_connections: Option<u32>,
        /// NAR storage: file:///DIR or s3://BUCKET[/PREFIX]?endpoint=URL&region=NAME (credentials
        /// from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the config file).
        /// [default: file://DATA/store]
        #[arg(long, env = "LARDER_STORAGE")]
        pub storage: Option<String>,
        /// S3 access key id. File only: the standard `AWS_ACCESS_KEY_ID` overrides it, and
        /// there is no flag (a flag is visible to every user in the process list).
        #[arg(skip)]
        pub s3_access_key_id: Option<String>,
        /// S3 secret access key (`AWS_SECRET_ACCESS_KEY` overrides it). Never logged, and
        /// printed masked.
        #[arg(skip)]
        #[serde(serialize_with = "masked_secret")]
        pub s3_secret_access_key: Option<larder_store::Secret>,
        /// NAR downloads: `stream` through the server, or `presigned` (a 307 redirect to a
        /// presigned URL of the S3 store). [default: stream]
        #[arg(long, env = "LARDER_NAR_REDIRECT")]
        pub nar_redirect: Option<String>,
        /// Preferred compression of new caches: zstd, xz or none. [default: zstd]
        #[arg(long, env = "LARDER_COMPRESSION")]
        pub compression: Option<String>,
        /// Compression level clients use by default. [default: 3]
        #[arg(long, env = "LARDER_COMPRESSION_LEVEL")]
        pub compression_level: Option<i32>,
        /// Largest accepted upload, e.g. 64GiB. [default: 64GiB]
        #[arg(long, env = "LARDER_MAX_UPLOAD_SIZE")]
        pub max_upload_size: Option<SizeValue>,
        /// Largest NAR accepted once decompressed, e.g. 64GiB: a compressed upload expanding past
        /// it is refused (413) as soon as it does. [default: 64GiB]
        #[arg(long, env = "LARDER_MAX_NAR_SIZE")]
        pub max_nar_size: Option<SizeValue>,
        /// Garbage collection interval, e.g. 1h. [default: 1h]
        #[arg(long, env = "LARDER_GC_INTERVAL")]
        pub gc_interval: Option<String>,
        /// How long an evicted path's NAR stays servable (a narinfo fetched just before the
        /// eviction still works), e.g. 1h; at least 10s. [default: 1h]
        #[arg(long, env = "LARDER_EVICTED_NAR_GRACE")]
        pub evicted_nar_grace: Option<String>,
        /// How often to delete orphaned objects (objects in the store that no metadata names,
        /// older than `orphan_grace`), e.g. 24h; 0 or `off` disables it. [default: 24h]
        #[arg(long, env = "LARDER_ORPHAN_SCAN_INTERVAL")]
        pub orphan_scan_interval: Option<String>,
        /// How old an orphaned object must be before the scan deletes it, e.g. 24h; at least 1h.
        /// [default: 24h]
        #[arg(long, env = "LARDER_ORPHAN_GRACE")]
        pub orphan_grace: Option<String>,
        /// How long a download or lookup (GET, HEAD) waits for the database and the object store
        /// before it is answered 503 with Retry-After, e.g. 30s; at least 1s. [default: 30s]
        #[arg(long, env = "LARDER_BACKEND_TIMEOUT")]
        pub backend_timeout: Option<String>,
        /// How long a connection may take to send a request head, and stay idle between
        /// requests, before the server closes it, e.g. 30s; at least 1s. [default: 30s]
        #[arg(long, env = "LARDER_HEADER_TIMEOUT")]
        pub header_timeout: Option<String>,
        /// Most connections open at once; more are closed at once. [default: as many as the
        /// open-file limit allows, two descriptors each after 128 kept for the rest]
        #[arg(long, env = "LARDER_MAX_CONNECTIONS")]
        pub max_connections: Option<usize>,
        /// Most connections open at once from one client address. [default: 256]
        #[arg(long, env = "LARDER_MAX_CONNECTIONS_PER_CLIENT")]
        pub max_connections_per_client: Option<usize>,
        /// Public keys (`name:base64`) of upstream caches: a pushed path may reference a path
        /// one of them signed without it being in the cache. File only. Default: cache.nixos.org's
        /// key.
        #[arg(skip)]
        pub upstream_keys: Option<Vec<String>>,
        /// Serve HTTPS with this PEM certificate chain (needs --tls-key); re-read on SIGHUP.
        #[arg(long, env = "LARDER_TLS_CERT")]
        pub tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1); re-read on SIGHUP.
        #[arg(long, env = "LARDER_TLS_KEY")]
        pub tls_key: Option<PathBuf>,
        /// Caches declared here (`[caches.NAME]`, file only): created at start when missing,
        /// and their declared settings applied when they exist. Undeclared caches are left alone
        /// unless `delete_undeclared_caches` is set.
        #[arg(skip)]
        #[serde(default)]
        pub caches: std::collections::BTreeMap<String, DeclaredCacheFile>,
        /// Delete, at start, every cache the file does not declare (and its paths). File only.
        /// Default: false.
        #[arg(skip)]
        pub delete_undeclared_caches: Option<bool>,
    }
}

/// The settings as the config file holds them (the file is [`Settings`] in TOML).
pub type ConfigFile = Settings;

/// The standard variable of the S3 access key id: it overrides `s3_access_key_id`.
pub const S3_ACCESS_KEY_ID_ENV: &str = "AWS_ACCESS_KEY_ID";
/// The standard variable of the S3 secret key: it overrides `s3_secret_access_key`.
pub const S3_SECRET_ACCESS_KEY_ENV: &str = "AWS_SECRET_ACCESS_KEY";

/// A setting's value in one layer, and how a higher layer replaces it.
trait Layer {
    fn layer(&mut self, top: Self);
}

impl<T> Layer for Option<T> {
    fn layer(&mut self, top: Self) {
        if top.is_some() {
            *self = top;
        }
    }
}

impl<K, V> Layer for std::collections::BTreeMap<K, V> {
    fn layer(&mut self, top: Self) {
        if !top.is_empty() {
            *self = top;
        }
    }
}

/// A setting an environment variable sets ([`Settings::environment`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingVar {
    /// The TOML key.
    pub key: &'static str,
    /// The variable.
    pub var: String,
    /// The flag (`--data`), if the setting has one.
    pub flag: Option<String>,
}

/// Written in place of a secret wherever settings are printed.
pub const MASK: &str = "********";

fn masked_secret<S: serde::Serializer>(
    secret: &Option<larder_store::Secret>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match secret {
        Some(_) => s.serialize_some(MASK),
        None => s.serialize_none(),
    }
}

impl Settings {
    /// Read a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// The one place where the layers meet: `given` (flags and `LARDER_*` variables, which
    /// clap has already merged, a flag winning) over the S3 variables read with `env`, over
    /// `file`. What is still unset takes its default in [`Config::resolve`].
    pub fn layered(
        given: Settings,
        file: Option<Settings>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Settings {
        let mut settings = file.unwrap_or_default();
        settings.overlay(Settings {
            s3_access_key_id: env(S3_ACCESS_KEY_ID_ENV),
            s3_secret_access_key: env(S3_SECRET_ACCESS_KEY_ENV).map(larder_store::Secret::new),
            ..Settings::default()
        });
        settings.overlay(given);
        settings
    }

    /// Each key that an environment variable sets, with that variable and the flag, if any:
    /// the `LARDER_*` ones of the flags, and the standard S3 ones (which have no flag).
    pub fn environment() -> Vec<SettingVar> {
        use clap::Args;
        let command = Settings::augment_args(clap::Command::new("serve"));
        let mut vars: Vec<SettingVar> = Settings::KEYS
            .iter()
            .filter_map(|key| {
                let arg = command.get_arguments().find(|a| a.get_id() == *key)?;
                Some(SettingVar {
                    key,
                    var: arg.get_env()?.to_string_lossy().into_owned(),
                    flag: arg.get_long().map(|l| format!("--{l}")),
                })
            })
            .collect();
        for (key, var) in [
            ("s3_access_key_id", S3_ACCESS_KEY_ID_ENV),
            ("s3_secret_access_key", S3_SECRET_ACCESS_KEY_ENV),
        ] {
            vars.push(SettingVar {
                key,
                var: var.to_owned(),
                flag: None,
            });
        }
        vars
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
    /// Keys trusted as upstream for this cache, beside the server's `upstream_keys`.
    pub upstream_keys: Option<Vec<String>>,
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
    pub upstream_keys: Vec<larder_nix::signing::VerifyingKey>,
    /// HTTPS instead of plain HTTP.
    pub tls: Option<TlsFiles>,
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
        for (key, value) in [
            ("max_connections (at least 1)", file.max_connections),
            (
                "max_connections_per_client (at least 1)",
                file.max_connections_per_client,
            ),
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
        })
    }

    /// The settings that run this configuration, every key written out: what
    /// [`Config::to_masked_toml`] prints. Keys chosen at run time are left unset
    /// (`database_max_connections`, `max_connections`).
    pub fn settings(&self) -> Settings {
        let duration = |d: Duration| Some(format_duration(d));
        let size = |b: u64| Some(SizeValue::Text(format_size(b)));
        let (s3_access_key_id, s3_secret_access_key) = match &self.s3_credentials {
            Some(c) => (
                Some(c.access_key_id.clone()),
                Some(c.secret_access_key.clone()),
            ),
            None => (None, None),
        };
        let caches = self
            .declared_caches
            .iter()
            .map(|c| {
                let max_size = c.max_size.map(|limit| match limit {
                    Some(b) => SizeValue::Text(format_size(b)),
                    None => SizeValue::Text("none".to_owned()),
                });
                let declared = DeclaredCacheFile {
                    private: c.private,
                    priority: c.priority,
                    max_size,
                    compression: c.compression.clone(),
                    upstream_keys: c.upstream_keys.clone(),
                };
                (c.name.clone(), declared)
            })
            .collect();
        Settings {
            listen: Some(self.listen.clone()),
            data_dir: Some(self.data_dir.clone()),
            public_url: Some(self.public_url.clone()),
            database: Some(self.database.clone()),
            database_max_connections: self.database_max_connections,
            storage: Some(self.storage.clone()),
            s3_access_key_id,
            s3_secret_access_key,
            nar_redirect: Some(
                match self.nar_redirect {
                    NarRedirect::Stream => "stream",
                    NarRedirect::Presigned => "presigned",
                }
                .to_owned(),
            ),
            compression: Some(self.compression.clone()),
            compression_level: Some(self.compression_level),
            max_upload_size: size(self.max_upload_size),
            max_nar_size: size(self.max_nar_size),
            gc_interval: duration(self.gc_interval),
            evicted_nar_grace: duration(self.evicted_nar_grace),
            orphan_scan_interval: Some(
                self.orphan_scan_interval
                    .map_or_else(|| "off".to_owned(), format_duration),
            ),
            orphan_grace: duration(self.orphan_grace),
            backend_timeout: duration(self.backend_timeout),
            header_timeout: duration(self.header_timeout),
            max_connections: self.max_connections,
            max_connections_per_client: Some(self.max_connections_per_client),
            upstream_keys: Some(self.upstream_keys.iter().map(|k| k.to_string()).collect()),
            tls_cert: self.tls.as_ref().map(|t| t.cert.clone()),
            tls_key: self.tls.as_ref().map(|t| t.key.clone()),
            caches,
            delete_undeclared_caches: Some(self.delete_undeclared_caches),
        }
    }

    /// This configuration as a config file (TOML) that would run the same server, with every
    /// secret replaced by [`MASK`]: the S3 keys, a password in the database or storage URL,
    /// and URL query values whose name says password, secret, token or key.
    pub fn to_masked_toml(&self) -> Result<String, ConfigError> {
        let mut settings = self.settings();
        if settings.s3_access_key_id.is_some() {
            settings.s3_access_key_id = Some(MASK.to_owned());
        }
        settings.database = settings.database.as_deref().map(mask_url);
        settings.storage = settings.storage.as_deref().map(mask_url);
        let mut text = String::from(
            "# larder serve: the resolved configuration (flags > environment > file > defaults); \
             secrets are masked\n",
        );
        if self.database_max_connections.is_none() {
            text.push_str("# database_max_connections is unset: 16 for PostgreSQL, 8 for SQLite\n");
        }
        if self.max_connections.is_none() {
            text.push_str("# max_connections is unset: as many as the open-file limit allows\n");
        }
        text.push_str(&toml::to_string(&settings)?);
        Ok(text)
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
    Ok(DeclaredCache {
        name: name.clone(),
        private: c.private,
        priority: c.priority,
        max_size,
        compression: c.compression,
        upstream_keys: c.upstream_keys,
    })
}

/// `url` with its password and any query value named like a secret replaced by [`MASK`];
/// anything that is not a URL is returned as it is (it holds no credentials a URL could).
pub fn mask_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return url.to_owned();
    };
    let mut masked = false;
    if parsed.password().is_some() && parsed.set_password(Some(MASK)).is_ok() {
        masked = true;
    }
    let secret_name = |name: &str| {
        let name = name.to_ascii_lowercase();
        ["password", "passwd", "secret", "token", "key", "credential"]
            .iter()
            .any(|word| name.contains(word))
    };
    if parsed.query_pairs().any(|(name, _)| secret_name(&name)) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(name, value)| {
                let value = if secret_name(&name) {
                    MASK.to_owned()
                } else {
                    value.into_owned()
                };
                (name.into_owned(), value)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
        masked = true;
    }
    if masked {
        parsed.to_string()
    } else {
        url.to_owned()
    }
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

    #[test]
    fn layers_stack_flag_env_over_file_over_default() {
        let file: Settings = toml::from_str(
            "listen = \"0.0.0.0:1\"\ngc_interval = \"5m\"\ns3_access_key_id = \"FILE\"\n\
             s3_secret_access_key = \"file-secret\"\n[caches.a]\n",
        )
        .unwrap();
        let given = Settings {
            listen: Some("0.0.0.0:2".into()),
            tls_cert: Some("/c.pem".into()),
            ..Settings::default()
        };
        let env = |name: &str| (name == S3_ACCESS_KEY_ID_ENV).then(|| "ENV".to_owned());
        let s = Settings::layered(given, Some(file), env);
        assert_eq!(s.listen.as_deref(), Some("0.0.0.0:2"));
        assert_eq!(s.gc_interval.as_deref(), Some("5m"));
        assert_eq!(s.s3_access_key_id.as_deref(), Some("ENV"));
        assert_eq!(
            s.s3_secret_access_key.as_ref().map(|k| k.expose()),
            Some("file-secret")
        );
        assert_eq!(s.caches.keys().collect::<Vec<_>>(), ["a"]);
        // The TLS pair may come from two layers; a half pair still names both halves.
        assert!(matches!(
            Config::resolve(s, "/d".into()).unwrap_err(),
            ConfigError::TlsPair { set: "cert", .. }
        ));
        let s = Settings::layered(Settings::default(), None, |_| None);
        assert_eq!(
            Config::resolve(s, "/d".into()).unwrap().listen,
            DEFAULT_LISTEN
        );
    }

    #[test]
    fn every_key_is_a_field_and_every_flag_a_key() {
        use clap::Args;
        let command = Settings::augment_args(clap::Command::new("serve"));
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            assert!(Settings::KEYS.contains(&id), "flag {id} is no key");
            let env = arg.get_env().unwrap().to_string_lossy().into_owned();
            assert_eq!(env, format!("LARDER_{}", id.to_uppercase()), "{id}");
        }
        let printed = Config::resolve(Settings::default(), "/d".into())
            .unwrap()
            .settings();
        let table = toml::Table::try_from(&printed).unwrap();
        for key in table.keys() {
            assert!(Settings::KEYS.contains(&key.as_str()), "{key}");
        }
    }

    /// The rows of the README's settings table: key, variable (if any), default column.
    fn readme_rows() -> Vec<(String, Option<String>, String)> {
        let readme = include_str!("../../../README.md");
        let table = readme
            .split("\n## Server configuration\n")
            .nth(1)
            .unwrap()
            .lines()
            .skip_while(|l| !l.starts_with("| key |"))
            .skip(2)
            .take_while(|l| l.starts_with('|'));
        let names = |cell: &str| -> Vec<String> {
            cell.split(", ")
                .map(|n| n.trim().trim_matches('`').to_owned())
                .collect()
        };
        let mut rows = Vec::new();
        for line in table {
            let cells: Vec<&str> = line.split(" | ").collect();
            let keys = names(cells[0].trim_start_matches("| "));
            let vars = names(cells[1]);
            for (i, key) in keys.into_iter().enumerate() {
                let key = key.trim_end_matches(".NAME").to_owned();
                let var = vars.get(i).filter(|v| *v != "—").cloned();
                rows.push((key, var, cells[2].to_owned()));
            }
        }
        rows
    }

    /// The first `code` span of a README cell.
    fn first_code(cell: &str) -> Option<&str> {
        cell.split('`').nth(1)
    }

    #[test]
    fn the_readme_table_matches_the_definition() {
        let rows = readme_rows();
        let keys: Vec<&str> = rows.iter().map(|(k, _, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            Settings::KEYS,
            "README rows, in the definition's order"
        );
        let environment = Settings::environment();
        for (key, var, _) in &rows {
            let defined = environment
                .iter()
                .find(|v| v.key == key)
                .map(|v| v.var.clone());
            assert_eq!(var, &defined, "the variable of {key}");
        }
        // Each default the README shows is the one the server runs with, and the one `--help`
        // shows.
        let defaults = Config::resolve(Settings::default(), "DATA".into())
            .unwrap()
            .settings();
        let defaults = toml::Table::try_from(&defaults).unwrap();
        use clap::Args;
        let command = Settings::augment_args(clap::Command::new("serve"));
        for (key, _, default) in &rows {
            let Some(shown) = first_code(default) else {
                continue;
            };
            if let Some(value) = defaults
                .get(key)
                .filter(|_| !["data_dir", "public_url"].contains(&key.as_str()))
            {
                let value = match value {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                assert_eq!(shown, value, "the README's default of {key}");
            }
            if let Some(arg) = command.get_arguments().find(|a| a.get_id() == key.as_str()) {
                let help = arg.get_help().unwrap().to_string();
                let help_default = help.split("[default: ").nth(1).unwrap_or_default();
                assert!(help_default.contains(shown), "--help of {key}: {help}");
            }
        }
    }

    #[test]
    fn printed_configuration_runs_the_same_server_and_hides_secrets() {
        let file: Settings = toml::from_str(
            "database = \"postgres://larder:hunter2@db:5432/larder?sslmode=require\"\n\
             storage = \"s3://nars?endpoint=http://127.0.0.1:3900&region=garage\"\n\
             s3_access_key_id = \"GK1\"\ns3_secret_access_key = \"hunter3\"\n\
             max_upload_size = \"10G\"\norphan_scan_interval = \"off\"\n\
             backend_timeout = \"90\"\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\n\
             delete_undeclared_caches = true\n\
             [caches.main]\nmax_size = \"none\"\npriority = 30\n[caches.big]\nmax_size = 1073741824\n",
        )
        .unwrap();
        let config = Config::resolve(file, "/d".into()).unwrap();
        let text = config.to_masked_toml().unwrap();
        for secret in ["hunter2", "hunter3", "GK1"] {
            assert!(!text.contains(secret), "{secret} in:\n{text}");
        }
        assert!(
            text.contains(
                "database = \"postgres://larder:********@db:5432/larder?sslmode=require\""
            ),
            "{text}"
        );
        assert!(text.contains("max_upload_size = \"10GiB\""), "{text}");
        assert!(text.contains("backend_timeout = \"90s\""), "{text}");
        assert!(text.contains("max_connections is unset"), "{text}");
        // Read back, it is the same configuration (but for the masked secrets).
        let back: Settings = toml::from_str(&text).unwrap();
        let again = Config::resolve(back, "/elsewhere".into()).unwrap();
        assert_eq!(again.settings().caches.len(), 2);
        assert_eq!(
            format!("{:?}", again.declared_caches),
            format!("{:?}", config.declared_caches)
        );
        assert_eq!(again.to_masked_toml().unwrap(), text);
        // Every default, printed and read back, is itself.
        let defaults = Config::resolve(Settings::default(), "/d".into()).unwrap();
        let text = defaults.to_masked_toml().unwrap();
        let back = Config::resolve(toml::from_str(&text).unwrap(), "/x".into()).unwrap();
        assert_eq!(back.to_masked_toml().unwrap(), text);
    }

    #[test]
    fn urls_lose_their_secrets() {
        for (url, masked) in [
            ("sqlite:///d/larder.db", "sqlite:///d/larder.db"),
            ("postgres://u:pw@h/db", "postgres://u:********@h/db"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            (
                "postgres://h/db?user=u&password=pw",
                "postgres://h/db?user=u&password=********",
            ),
            (
                "s3://b?endpoint=http://x:1&region=r",
                "s3://b?endpoint=http://x:1&region=r",
            ),
            (
                "s3://b?region=r&secret_access_key=s",
                "s3://b?region=r&secret_access_key=********",
            ),
            ("not a url", "not a url"),
        ] {
            assert_eq!(mask_url(url), masked, "{url}");
        }
    }
}
