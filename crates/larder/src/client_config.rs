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
    Ok(larder_ops::xdg::larder_dir(larder_ops::xdg::Base::Config)?.join("config.toml"))
}

impl ClientConfig {
    /// The saved token of the server at `url`, if it is saved with one.
    pub fn token_for(&self, url: &str) -> Option<String> {
        self.servers
            .values()
            .find(|s| s.url.trim_end_matches('/') == url.trim_end_matches('/'))
            .and_then(|s| s.token.clone())
    }

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
            let token = env::var(env::TOKEN).or_else(|| cfg.token_for(&url));
            return Ok(ApiClient::new(&url, token)?);
        }
    }
    let name = match server {
        Some(s) => s.to_owned(),
        None => cfg.default_server.clone().ok_or_else(|| {
            fail_with_hint(
                "no server configured",
                "give the cache's URL instead of its name (e.g. `larder use \
                 http://shoshin:8080/CACHE`), or save the server once with `larder login URL` \
                 (add a TOKEN for private caches and for pushing), or set LARDER_SERVER",
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

/// Resolve a `CACHE`, `SERVER:CACHE` or cache URL (`http://HOST:PORT/CACHE`) argument.
pub fn target(arg: &str) -> anyhow::Result<Target> {
    // A cache's URL (as `cache info`, the web UI and `nix.conf` show it): the server is
    // everything before the last segment, the cache is the last segment.
    if let Some((scheme, rest)) = arg.split_once("://") {
        let rest = rest.trim_end_matches('/');
        let name = rest.rsplit_once('/').map(|(_, name)| name);
        let Some(name) = name.filter(|n| larder_server::valid_cache_name(n)) else {
            return Err(fail_with_hint(
                format!("{arg:?} is not a cache's URL"),
                "give the cache's URL as `larder cache list` or the web UI shows it, \
                 http://HOST:PORT/CACHE (or a cache name with `larder login URL` first)",
            ));
        };
        let base = format!("{scheme}://{}", &rest[..rest.len() - name.len() - 1]);
        let cfg = ClientConfig::load()?;
        let token = env::var(env::TOKEN).or_else(|| cfg.token_for(&base));
        return Ok(Target {
            client: ApiClient::new(&base, token)?,
            cache: name.to_owned(),
        });
    }
    let (server, cache) = split_cache_arg(arg);
    Ok(Target {
        client: connect(server)?,
        cache: cache.to_owned(),
    })
}

/// The cache `t` names, looked up on its server; when there is none (or it is private and the
/// token cannot see it), an error that names the closest cache that does exist.
pub async fn require_cache(t: &Target) -> anyhow::Result<larder_client::api::CacheInfo> {
    // The server answers a cache nobody may show the requester (missing, or private to
    // others) 404, 401 (anonymous) or 403 (a token without access) alike.
    let hidden = |e: &larder_client::ClientError| match e.status() {
        Some(404 | 403) => true,
        Some(401) => t.client.token().is_none(),
        _ => false,
    };
    match t.client.cache_info(&t.cache).await {
        Ok(info) => Ok(info),
        Err(e) if hidden(&e) => {
            let names: Vec<String> = t
                .client
                .list_caches()
                .await
                .map(|l| l.into_iter().map(|c| c.name).collect())
                .unwrap_or_default();
            let hint = match closest(&t.cache, &names) {
                Some(near) => format!("did you mean {near:?}?"),
                None if names.is_empty() => {
                    "this server shows no cache to you (a private one needs a token: `larder \
                     login URL TOKEN`)"
                        .to_owned()
                }
                None => format!(
                    "the caches you can see: {} (a private one needs a token that can pull it: \
                     `larder login URL TOKEN`)",
                    names.join(", ")
                ),
            };
            Err(fail_with_hint(
                format!(
                    "{} has no cache named {:?} that you can see",
                    t.client.base_url(),
                    t.cache
                ),
                hint,
            ))
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot look up cache {:?}", t.cache))),
    }
}

/// The name in `names` closest to `wanted` by edit distance, if it is close enough to be a
/// typo of it (at most a third of its letters, and at least one, differ).
fn closest<'a>(wanted: &str, names: &'a [String]) -> Option<&'a str> {
    let limit = (wanted.chars().count() / 3).max(1);
    names
        .iter()
        .map(|n| (edit_distance(wanted, n), n))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n.as_str())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_find_their_cache() {
        let names = vec!["modular-workspace".to_owned(), "secrets".to_owned()];
        assert_eq!(
            closest("modular-worksapce", &names),
            Some("modular-workspace")
        );
        assert_eq!(
            closest("modular-workspac", &names),
            Some("modular-workspace")
        );
        assert_eq!(closest("secret", &names), Some("secrets"));
        assert_eq!(closest("other", &names), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
