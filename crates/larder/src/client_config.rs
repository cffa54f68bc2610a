//! The client config file, `$XDG_CONFIG_HOME/larder/config.toml` (mode 0600), and how a
//! command finds its server: `LARDER_SERVER` + `LARDER_TOKEN` first, then the named or default
//! server of the config file.
//!
//! ```toml
//! default_server = "home"
//! [servers.home]
//! url = "http://shoshin:8080"
//! token = "larder_…"
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use larder_client::ApiClient;
use serde::{Deserialize, Serialize};

use crate::env;
use crate::output::fail_with_hint;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub default_server: Option<String>,
    #[serde(default)]
    pub servers: BTreeMap<String, ServerEntry>,
    /// Client-held signing keys (Nix secret key text) by `SERVER:CACHE`.
    #[serde(default)]
    pub signing_keys: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerEntry {
    pub url: String,
    pub token: Option<String>,
}

pub fn config_path() -> anyhow::Result<PathBuf> {
    if let Some(p) = env::var(env::CONFIG) {
        return Ok(PathBuf::from(p));
    }
    let base = match env::var("XDG_CONFIG_HOME") {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(env::var("HOME").context("neither XDG_CONFIG_HOME nor HOME is set")?)
            .join(".config"),
    };
    Ok(base.join("larder").join("config.toml"))
}

impl ClientConfig {
    pub fn load() -> anyhow::Result<Self> {
        let path = config_path()?;
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text)
                .with_context(|| format!("invalid client config {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Write atomically with mode 0600 (it holds tokens and secret keys).
    pub fn save(&self) -> anyhow::Result<PathBuf> {
        let path = config_path()?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let text = toml::to_string_pretty(self)?;
        let tmp = path.with_extension("toml.tmp");
        larder_server::write_secret_file(&tmp, &text)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }
}

/// A command's target: the server client and the cache name.
pub struct Target {
    pub client: ApiClient,
    pub cache: String,
}

/// Split `SERVER:CACHE` (or plain `CACHE`).
pub fn split_cache_arg(arg: &str) -> (Option<&str>, &str) {
    match arg.split_once(':') {
        Some((s, c)) => (Some(s), c),
        None => (None, arg),
    }
}

/// The client for `server` (a config name), or the environment's / default server.
pub fn connect(server: Option<&str>) -> anyhow::Result<ApiClient> {
    let cfg = ClientConfig::load()?;
    if server.is_none() {
        if let Some(url) = env::var(env::SERVER) {
            let token = env::var(env::TOKEN).or_else(|| {
                cfg.servers
                    .values()
                    .find(|s| s.url.trim_end_matches('/') == url.trim_end_matches('/'))
                    .and_then(|s| s.token.clone())
            });
            return Ok(ApiClient::new(&url, token)?);
        }
    }
    let name = match server {
        Some(s) => s.to_owned(),
        None => cfg.default_server.clone().ok_or_else(|| {
            fail_with_hint(
                "no server configured",
                "run `larder login URL TOKEN`, or set LARDER_SERVER and LARDER_TOKEN",
            )
        })?,
    };
    let entry = cfg.servers.get(&name).ok_or_else(|| {
        fail_with_hint(
            format!(
                "no server named {name:?} in {}",
                config_path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
            format!("run `larder login URL TOKEN --name {name}`"),
        )
    })?;
    let token = env::var(env::TOKEN).or_else(|| entry.token.clone());
    Ok(ApiClient::new(&entry.url, token)?)
}

/// Resolve a `CACHE` or `SERVER:CACHE` argument.
pub fn target(arg: &str) -> anyhow::Result<Target> {
    // A cache's URL (as `cache info` prints it) where its name belongs.
    if let Some((scheme, rest)) = arg.split_once("://") {
        let rest = rest.trim_end_matches('/');
        let (base, hint) = match rest.rsplit_once('/') {
            Some((host, name)) => (
                format!("{scheme}://{host}"),
                format!(", then pass `{name}`"),
            ),
            None => (
                format!("{scheme}://{rest}"),
                ", then pass the cache's name".to_owned(),
            ),
        };
        return Err(fail_with_hint(
            format!("{arg:?} is a URL; larder takes a cache's name (CACHE or SERVER:CACHE)"),
            format!("run `larder login {base} TOKEN` (or set LARDER_SERVER={base}){hint}"),
        ));
    }
    let (server, cache) = split_cache_arg(arg);
    Ok(Target {
        client: connect(server)?,
        cache: cache.to_owned(),
    })
}
