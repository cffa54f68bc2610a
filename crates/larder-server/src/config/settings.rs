//! The definition of every setting of `larder serve` ([`Settings`]) and how the layers that
//! give them stack ([`Settings::layered`]): one struct whose fields are the TOML keys and whose
//! attributes derive the flags, the `LARDER_*` variables and the `--help` text, so a new
//! setting is written once (its default goes beside the others in [`super`], its check in
//! [`Config::resolve`](super::Config::resolve), and the README row a test asks for).

use std::path::{Path, PathBuf};

use super::{ConfigError, DeclaredCacheFile, OidcFile, SizeValue};

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
    /// the doc comment is the `--help` text, and the default (in [`Config::resolve`](super::Config::resolve)) is a
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
        /// http://shoshin:8080. [default: http://LISTEN, https://LISTEN with TLS]
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
        /// How long a connection may take to send a request head, stay idle between requests,
        /// or send nothing in the middle of a request body (answered 408), before the server
        /// closes it, e.g. 30s; at least 1s. [default: 30s]
        #[arg(long, env = "LARDER_HEADER_TIMEOUT")]
        pub header_timeout: Option<String>,
        /// Most connections open at once; more are closed at once. [default: as many as the
        /// open-file limit allows, two descriptors each after 128 kept for the rest]
        #[arg(long, env = "LARDER_MAX_CONNECTIONS")]
        pub max_connections: Option<usize>,
        /// Most connections open at once from one client address. [default: 256]
        #[arg(long, env = "LARDER_MAX_CONNECTIONS_PER_CLIENT")]
        pub max_connections_per_client: Option<usize>,
        /// Most unfinished multi-part uploads one cache, and one token, may have at once on
        /// this server; more are refused (429) until some complete, are abandoned or expire.
        /// [default: 16]
        #[arg(long, env = "LARDER_MULTIPART_MAX_OPEN")]
        pub multipart_max_open: Option<usize>,
        /// Most bytes the unfinished multi-part uploads of one cache (at most its size limit),
        /// and of one token, may hold on this server, e.g. 20GiB; a part beyond is refused
        /// (413). Per cache it also bounds the chunks of `larder push` sessions not yet
        /// assembled into a NAR. [default: 64GiB (max_upload_size)]
        #[arg(long, env = "LARDER_MULTIPART_MAX_STAGED")]
        pub multipart_max_staged: Option<SizeValue>,
        /// How long an unfinished multi-part upload is kept without a new part (a resumed push
        /// continues it), e.g. 1h; at least 1m. [default: 1h]
        #[arg(long, env = "LARDER_MULTIPART_IDLE_TTL")]
        pub multipart_idle_ttl: Option<String>,
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
        /// CI identity (`[oidc]`, file only): the OIDC issuers whose ID tokens
        /// `POST /api/v1/oidc/exchange` trades for short-lived tokens, and the rules that map
        /// their claims to permissions. Default: none (the exchange refuses every token).
        #[arg(skip)]
        pub oidc: Option<OidcFile>,
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
    /// `file`. What is still unset takes its default in [`Config::resolve`](super::Config::resolve).
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
        // `--data data` (or `data_dir = "data"`) means ./data: the default database and
        // storage URLs are made from it, and `file://data/store` would name a host.
        if let Some(dir) = settings.data_dir.take() {
            settings.data_dir = Some(std::path::absolute(&dir).unwrap_or(dir));
        }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;
    use crate::config::{Config, DEFAULT_LISTEN};

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
    fn a_relative_data_directory_is_taken_from_the_working_directory() {
        let given = Settings {
            data_dir: Some("rel/data".into()),
            ..Settings::default()
        };
        let s = Settings::layered(given, None, |_| None);
        let abs = std::env::current_dir().unwrap().join("rel/data");
        let c = Config::resolve(s, "/d".into()).unwrap();
        assert_eq!(c.data_dir, abs);
        assert_eq!(c.storage, format!("file://{}", abs.join("store").display()));
        assert_eq!(
            c.database,
            format!("sqlite://{}", abs.join("larder.db").display())
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
        let readme = include_str!("../../../../README.md");
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
}
