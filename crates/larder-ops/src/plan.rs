//! What a push or an import transfers, round after round: the cache's upload settings, and
//! the planners that say, each time they are asked, which paths the cache still lacks. A
//! round that failed only because the cache evicted references meanwhile is planned again
//! (`larder_client::push::replan_needed`), so a planner is asked more than once.

use larder_client::api::CacheInfo;
use larder_client::local_store::{LocalStore, PathInfo};
use larder_client::push::{self, Compression, Plan, PushError, PushOptions};
use larder_client::ApiClient;
use larder_nix::signing::SigningKey;
use larder_nix::store_path::StorePath;

use crate::pusher::{ensure_can_push, PusherError};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Pusher(#[from] PusherError),
    #[error("unknown compression {0:?}")]
    UnknownCompression(String),
    #[error("cache {cache:?} requires uploads signed by its key {key}")]
    NeedsSigningKey {
        cache: String,
        key: String,
        cache_arg: String,
    },
    #[error("the local store was lost")]
    StoreLost,
    #[error("cannot plan the push")]
    Plan(#[source] PushError),
    #[error("cannot ask the cache what it lacks")]
    Missing(#[source] PushError),
}

impl PlanError {
    /// The fix to try.
    pub fn hint(&self) -> Option<String> {
        match self {
            PlanError::Pusher(e) => e.hint(),
            PlanError::NeedsSigningKey { cache_arg, .. } => Some(format!(
                "set LARDER_SIGNING_KEY, or run `larder generate-keypair {cache_arg}` on the \
                 machine that pushes"
            )),
            _ => None,
        }
    }
}

/// What every upload to the cache uses: its compression (or the one asked for), the level,
/// and the signing key (required when the cache has clients sign).
#[derive(Debug)]
pub struct UploadSettings {
    pub compression: Compression,
    pub level: i32,
    pub signing_key: Option<SigningKey>,
    /// Names of the keys the cache trusts as upstream beside cache.nixos.org's (declared in
    /// the server's configuration): paths they signed need not be pushed.
    pub upstream_key_names: Vec<String>,
    /// Whether the server is on this machine (a loopback address): bytes cost nothing there.
    pub loopback: bool,
}

impl UploadSettings {
    /// Check the cache (it exists, the token can push to it) and settle the upload settings:
    /// `compression` and `level` as asked (else none for a server on this machine, or the
    /// cache's, and its default level), with
    /// `signing_key`, which a cache whose clients sign requires. `cache_arg` is how the user
    /// named the cache, for the hint.
    pub async fn for_cache(
        client: &ApiClient,
        cache: &str,
        cache_arg: &str,
        compression: Option<&str>,
        level: Option<i32>,
        signing_key: Option<SigningKey>,
    ) -> Result<Self, PlanError> {
        let info = crate::pusher::cache_info(client, cache).await?;
        ensure_can_push(client, cache).await?;
        let loopback = is_loopback(client.base_url());
        let requested = compression.unwrap_or(default_compression(loopback, &info.compression));
        let compression = Compression::from_name(requested)
            .ok_or_else(|| PlanError::UnknownCompression(requested.to_owned()))?;
        let level = level.unwrap_or(match compression {
            Compression::Xz => 6,
            _ => 3,
        });
        if info.signing_mode == "client" && signing_key.is_none() {
            return Err(PlanError::NeedsSigningKey {
                cache: info.name,
                key: info.public_key.unwrap_or_default(),
                cache_arg: cache_arg.to_owned(),
            });
        }
        Ok(Self {
            compression,
            level,
            signing_key,
            upstream_key_names: upstream_key_names(&info),
            loopback,
        })
    }
}

/// The compression of a push that asks for none in particular. To a server on this machine
/// (`loopback`) bytes cost nothing and compressing only takes CPU from the server (which
/// stores its own zstd frames whatever it receives): none. Elsewhere, the cache's.
pub(crate) fn default_compression(loopback: bool, cache_compression: &str) -> &str {
    if loopback {
        "none"
    } else {
        cache_compression
    }
}

/// The part size of a push that asks for none in particular. Parts are for networks that drop
/// connections and proxies that limit bodies; to a server on this machine (`loopback`) a NAR
/// goes in one request, which the server verifies and stores as it arrives (parts wait for
/// the last).
pub fn default_part_size(loopback: bool) -> u64 {
    if loopback {
        u64::MAX
    } else {
        push::DEFAULT_PART_SIZE
    }
}

/// Whether the server at `base` (an `http[s]://host[:port]/…` URL) is on this machine by a
/// loopback address: `localhost`, `127.0.0.0/8` or `[::1]`.
pub(crate) fn is_loopback(base: &str) -> bool {
    let rest = base.split_once("://").map_or(base, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host_port.split(':').next().unwrap_or(""),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The names of the upstream keys a cache declares (`name:key` → `name`).
fn upstream_key_names(info: &CacheInfo) -> Vec<String> {
    info.upstream_keys
        .iter()
        .filter_map(|k| k.split_once(':').map(|(name, _)| name.to_owned()))
        .collect()
}

/// Makes the plan of each round of a push or an import.
pub trait Planner {
    /// What to transfer now, and why the other paths are skipped (for the summary line).
    fn plan(&mut self) -> impl std::future::Future<Output = Result<(Plan, String), PlanError>>;
}

/// `larder push`: the closures of store paths, read from the local store.
pub struct StorePlanner<'a> {
    pub client: &'a ApiClient,
    pub cache: &'a str,
    pub store: Option<LocalStore>,
    pub roots: Vec<StorePath>,
    pub opts: &'a PushOptions,
}

impl Planner for StorePlanner<'_> {
    async fn plan(&mut self) -> Result<(Plan, String), PlanError> {
        let store = self.store.take().ok_or(PlanError::StoreLost)?;
        let (plan, store) = push::plan(
            self.client,
            self.cache,
            store,
            self.roots.clone(),
            self.opts,
        )
        .await
        .map_err(PlanError::Plan)?;
        self.store = Some(store);
        let skips = format!(
            "{} already in the cache, {} signed by an upstream key{}, {} excluded",
            plan.present,
            plan.upstream.len(),
            if plan.upstream.is_empty() || self.opts.include_upstream {
                ""
            } else {
                " (--include-upstream pushes them)"
            },
            plan.excluded
        );
        Ok((plan, skips))
    }
}

/// `larder import`: the paths of another binary cache whose narinfos were read already.
pub struct ImportPlanner<'a> {
    pub client: &'a ApiClient,
    pub cache: &'a str,
    pub infos: Vec<PathInfo>,
}

impl Planner for ImportPlanner<'_> {
    async fn plan(&mut self) -> Result<(Plan, String), PlanError> {
        let all = self.infos.iter().map(|i| i.path.to_absolute()).collect();
        let missing = push::missing(self.client, self.cache, all)
            .await
            .map_err(PlanError::Missing)?;
        let paths: Vec<_> = self
            .infos
            .iter()
            .filter(|i| missing.contains(&i.path.to_absolute()))
            .cloned()
            .collect();
        let total = self.infos.len();
        let plan = Plan {
            present: total - paths.len(),
            paths,
            total,
            ..Plan::default()
        };
        let skips = format!("{} already in the cache", plan.present);
        Ok((plan, skips))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_servers_are_recognised() {
        for url in [
            "http://localhost:8080",
            "http://127.0.0.1:8080/",
            "https://127.3.4.5",
            "http://[::1]:8080/x",
            "http://LOCALHOST",
        ] {
            assert!(super::is_loopback(url), "{url}");
        }
        for url in [
            "http://cache.example:8080",
            "http://10.0.0.1",
            "http://[2001:db8::1]:80",
            "https://localhost.example.com",
        ] {
            assert!(!super::is_loopback(url), "{url}");
        }
    }

    use super::*;

    #[test]
    fn unknown_compression_and_missing_key_say_what_to_do() {
        let e = PlanError::UnknownCompression("lz4".into());
        assert_eq!(e.to_string(), "unknown compression \"lz4\"");
        assert_eq!(e.hint(), None);
        let e = PlanError::NeedsSigningKey {
            cache: "c".into(),
            key: "c-1:AAAA".into(),
            cache_arg: "srv:c".into(),
        };
        assert_eq!(
            e.to_string(),
            "cache \"c\" requires uploads signed by its key c-1:AAAA"
        );
        assert!(e
            .hint()
            .is_some_and(|h| h.contains("larder generate-keypair srv:c")));
    }
}
