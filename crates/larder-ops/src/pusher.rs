//! A push session shared by the automation verbs (`daemon run`, `watch-store`, `watch-exec`,
//! `build`): one connection to the cache, the options `larder push` would use by default, and
//! the local store kept open between batches. [`ensure_can_push`] is the one token check every
//! pushing verb makes before uploading.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

use larder_client::local_store::{LocalStore, LocalStoreError, PathInfo};
use larder_client::push::{
    self, failure_line, Compression, Observer, Outcome, PushError, PushOptions, Summary,
};
use larder_client::{ApiClient, ClientError};
use larder_nix::signing::SigningKey;
use larder_nix::store_path::StorePath;

use crate::text::{count, human_size};

/// First wait before trying again while the server is unreachable; it doubles each time.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between tries while the server is unreachable.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The waits between tries of the long-running pushers (the daemon, the store watcher) while
/// the server is unreachable: 1 s, 2 s, 4 s, … 60 s, 60 s, … (never giving up).
pub fn server_backoff() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(FIRST_BACKOFF)
        .with_max_delay(MAX_BACKOFF)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

/// Why a push session could not start, or a batch pushed nothing.
#[derive(Debug, thiserror::Error)]
pub enum PusherError {
    #[error("cannot use cache {cache:?}")]
    Cache {
        cache: String,
        #[source]
        source: ClientError,
    },
    #[error("the server refused the token ({error}); nothing was pushed")]
    TokenRefused { cache: String, error: ClientError },
    #[error("cannot check the token")]
    Whoami(#[source] ClientError),
    #[error("pushing to {cache:?} needs a token and none is set; nothing was pushed")]
    NoToken { cache: String },
    #[error(
        "the token {label} cannot push to {cache:?} (it has {perms} on {scope}); nothing was pushed"
    )]
    CannotPush {
        cache: String,
        label: String,
        perms: String,
        scope: String,
    },
    #[error("cache {cache:?} requires uploads signed by its key")]
    NeedsSigningKey { cache: String, cache_arg: String },
    #[error("cannot open the local store")]
    OpenStore(#[source] LocalStoreError),
    #[error("cannot query the local store")]
    QueryStore(#[source] LocalStoreError),
    #[error("local store reader panicked")]
    Panicked(#[source] tokio::task::JoinError),
    #[error("cannot plan the push")]
    Plan(#[source] PushError),
}

impl PusherError {
    /// The fix to try.
    pub fn hint(&self) -> Option<String> {
        match self {
            PusherError::TokenRefused { cache, .. }
            | PusherError::NoToken { cache }
            | PusherError::CannotPush { cache, .. } => Some(format!(
                "an admin creates one with `larder token create --perm push --cache {cache}`; use it \
                 with `larder login URL TOKEN` or LARDER_TOKEN"
            )),
            PusherError::NeedsSigningKey { cache_arg, .. } => Some(format!(
                "set LARDER_SIGNING_KEY, or run `larder generate-keypair {cache_arg}`"
            )),
            _ => None,
        }
    }
}

pub struct Pusher {
    pub client: ApiClient,
    pub cache: String,
    pub opts: PushOptions,
    store: Option<LocalStore>,
}

/// What one batch did.
#[derive(Debug, Default)]
pub struct Batch {
    /// Roots that are not valid in the local store (garbage-collected, or never built).
    pub invalid: Vec<StorePath>,
    /// Closure size considered.
    pub total: usize,
    /// Already in the cache.
    pub present: usize,
    pub summary: Summary,
}

/// Fail at once, with one fix, when the token cannot push to `cache` (none, invalid, expired,
/// revoked, read-only, or for other caches), instead of a 401/403 for every path, or nothing
/// at all when everything is already there (reads of a public cache need no token).
pub async fn ensure_can_push(client: &ApiClient, cache: &str) -> Result<(), PusherError> {
    let who = match client.whoami().await {
        Ok(w) => w,
        Err(e) if e.status() == Some(401) => {
            return Err(PusherError::TokenRefused {
                cache: cache.to_owned(),
                error: e,
            })
        }
        Err(e) => return Err(PusherError::Whoami(e)),
    };
    if !who.authenticated {
        return Err(PusherError::NoToken {
            cache: cache.to_owned(),
        });
    }
    if !who.grants(larder_client::api::Perm::Push, cache) {
        let label = match (who.label.as_deref(), who.token_id.as_deref()) {
            (Some(l), _) if !l.is_empty() => format!("{l:?}"),
            (_, Some(id)) => id.to_owned(),
            _ => "in use".to_owned(),
        };
        let scope = match &who.caches {
            Some(c) => format!("caches {}", c.join(", ")),
            None => "all caches".to_owned(),
        };
        let perms = if who.perms.is_empty() {
            "no permission".to_owned()
        } else {
            larder_client::api::Perm::join(&who.perms, ", ")
        };
        return Err(PusherError::CannotPush {
            cache: cache.to_owned(),
            label,
            perms,
            scope,
        });
    }
    Ok(())
}

/// A push's first request, the cache's settings: a server away for a moment (restarting) is
/// asked again after the usual waits, saying so on standard error.
pub(crate) async fn cache_info(
    client: &ApiClient,
    cache: &str,
) -> Result<larder_client::api::CacheInfo, PusherError> {
    larder_client::retry::repeat(
        PushOptions::default().attempts,
        ClientError::retry_wait,
        |e, attempt, wait| {
            eprintln!(
                "retrying cache {cache:?} (attempt {attempt}, again in {} s): {e}",
                wait.as_secs()
            )
        },
        || client.cache_info(cache),
    )
    .await
    .map_err(|source| PusherError::Cache {
        cache: cache.to_owned(),
        source,
    })
}

impl Pusher {
    /// Check the cache (reachable, token can push) and prepare `larder push`'s defaults.
    /// `cache_arg` is how the user named the cache, for the hint.
    pub async fn connect(
        client: ApiClient,
        cache: String,
        cache_arg: &str,
        signing_key: Option<SigningKey>,
    ) -> Result<Self, PusherError> {
        let info = cache_info(&client, &cache).await?;
        ensure_can_push(&client, &cache).await?;
        // `larder push`'s defaults (`plan.rs`).
        let loopback = crate::plan::is_loopback(client.base_url());
        let compression = Compression::from_name(crate::plan::default_compression(
            loopback,
            &info.compression,
        ))
        .unwrap_or(Compression::Zstd);
        if info.signing_mode == "client" && signing_key.is_none() {
            return Err(PusherError::NeedsSigningKey {
                cache: info.name,
                cache_arg: cache_arg.to_owned(),
            });
        }
        Ok(Self {
            client,
            cache,
            opts: PushOptions {
                compression,
                level: if compression == Compression::Xz { 6 } else { 3 },
                signing_key,
                part_size: crate::plan::default_part_size(loopback),
                // The push daemon honours `larder push --no-chunking`'s variable too.
                chunking: !std::env::var("LARDER_PUSH_NO_CHUNKING").is_ok_and(|v| {
                    matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
                }),
                ..PushOptions::default()
            },
            store: None,
        })
    }

    /// How long an upload may make no progress before it is retried (`None`: forever); see
    /// [`PushOptions::stall_timeout`].
    pub fn set_stall_timeout(&mut self, stall: Option<std::time::Duration>) {
        self.opts.stall_timeout = stall;
    }

    async fn take_store(&mut self) -> Result<LocalStore, PusherError> {
        match self.store.take() {
            Some(s) => Ok(s),
            None => tokio::task::spawn_blocking(LocalStore::open_default)
                .await
                .map_err(PusherError::Panicked)?
                .map_err(PusherError::OpenStore),
        }
    }

    /// Push the closures of `roots` (one bulk missing query). Roots that are not valid are
    /// reported, not fatal. An `Err` means nothing was pushed (store or server trouble).
    pub async fn push(
        &mut self,
        roots: Vec<StorePath>,
        observer: Arc<dyn Observer>,
    ) -> Result<Batch, PusherError> {
        let store = self.take_store().await?;
        let (found, store) = tokio::task::spawn_blocking(move || {
            let mut store = store;
            let r = store.query_path_infos(&roots);
            (r.map(|v| (roots, v)), store)
        })
        .await
        .map_err(PusherError::Panicked)?;
        self.store = Some(store);
        let (roots, found) = found.map_err(PusherError::QueryStore)?;
        let mut batch = Batch::default();
        let mut valid = Vec::new();
        for (root, info) in roots.into_iter().zip(found) {
            match info {
                Some(_) => valid.push(root),
                None => batch.invalid.push(root),
            }
        }
        if valid.is_empty() {
            return Ok(batch);
        }
        for round in 1..=push::PUSH_ROUNDS {
            let store = self.take_store().await?;
            let (plan, store) =
                push::plan(&self.client, &self.cache, store, valid.clone(), &self.opts)
                    .await
                    .map_err(PusherError::Plan)?;
            self.store = Some(store);
            let summary = push::execute(
                &self.client,
                &self.cache,
                &plan,
                &self.opts,
                observer.clone(),
            )
            .await;
            let again = round < push::PUSH_ROUNDS && push::replan_needed(&summary);
            if round == 1 {
                batch.total = plan.total;
                batch.present = plan.present;
                batch.summary = summary;
            } else {
                batch.summary.absorb(summary);
            }
            // References evicted meanwhile: planning again uploads them.
            if !again {
                break;
            }
        }
        Ok(batch)
    }
}

/// Progress as plain lines on stderr, prefixed (`daemon: pushed …`).
pub struct LineObserver {
    pub prefix: &'static str,
}

impl Observer for LineObserver {
    fn resumed(&self, path: &PathInfo, parts: u32, nar_bytes: u64) {
        eprintln!(
            "{}resuming {}: the server has {} ({} of {} NAR) from an interrupted upload",
            self.prefix,
            path.path.to_absolute(),
            count(u64::from(parts), "part"),
            human_size(nar_bytes as i64),
            human_size(path.nar_size as i64)
        );
    }
    fn retrying(&self, path: &PathInfo, error: &str, attempt: u32) {
        eprintln!(
            "{}retrying {} (attempt {attempt}): {error}",
            self.prefix, path.path
        );
    }
    fn finished(&self, path: &PathInfo, outcome: &Outcome) {
        match outcome {
            Outcome::Pushed { uploaded, .. } => eprintln!(
                "{}pushed {} ({} NAR, {} uploaded)",
                self.prefix,
                path.path.to_absolute(),
                human_size(path.nar_size as i64),
                human_size(*uploaded as i64)
            ),
            Outcome::AlreadyPresent => {}
            Outcome::Vanished => eprintln!(
                "{}warning: skipped {}: it vanished from the local store",
                self.prefix,
                path.path.to_absolute()
            ),
            Outcome::Failed { error, .. } => eprintln!(
                "{}error: {}",
                self.prefix,
                failure_line(&path.path.to_absolute(), error)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_server_waits_double_up_to_a_minute() {
        let waits: Vec<u64> = server_backoff().take(8).map(|d| d.as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
    }
}
