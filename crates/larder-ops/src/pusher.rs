//! A push session shared by the automation verbs (`daemon run`, `watch-store`, `watch-exec`,
//! `build`): one connection to the cache, the options `larder push` would use by default, and
//! the local store kept open between batches.

use anyhow::Context;
use larder_client::local_store::{LocalStore, PathInfo};
use larder_client::push::{self, Compression, Observer, Outcome, PushOptions, Summary};
use larder_client::ApiClient;
use larder_nix::store_path::StorePath;
use std::sync::Arc;

use crate::client_config::target;
use crate::output::{fail_with_hint, human_size};

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
pub(crate) async fn ensure_can_push(client: &ApiClient, cache: &str) -> anyhow::Result<()> {
    let create = format!(
        "an admin creates one with `larder token create --perm push --cache {cache}`; use it \
         with `larder login URL TOKEN` or LARDER_TOKEN"
    );
    let who = match client.whoami().await {
        Ok(w) => w,
        Err(e) if e.status() == Some(401) => {
            return Err(fail_with_hint(
                format!("the server refused the token ({e}); nothing was pushed"),
                create,
            ))
        }
        Err(e) => return Err(e).context("cannot check the token"),
    };
    if !who.authenticated {
        return Err(fail_with_hint(
            format!("pushing to {cache:?} needs a token and none is set; nothing was pushed"),
            create,
        ));
    }
    if !who.grants("push", cache) {
        let label = match (who.label.as_deref(), who.token_id.as_deref()) {
            (Some(l), _) if !l.is_empty() => format!("{l:?}"),
            (_, Some(id)) => id.to_owned(),
            _ => "in use".to_owned(),
        };
        let scope = match &who.caches {
            Some(c) => format!("caches {}", c.join(", ")),
            None => "all caches".to_owned(),
        };
        return Err(fail_with_hint(
            format!(
                "the token {label} cannot push to {cache:?} (it has {} on {scope}); nothing was pushed",
                if who.perms.is_empty() { "no permission".to_owned() } else { who.perms.join(", ") },
            ),
            create,
        ));
    }
    Ok(())
}

impl Pusher {
    /// Check the cache (reachable, token can push) and prepare `larder push`'s defaults.
    pub async fn connect(cache_arg: &str) -> anyhow::Result<Self> {
        let t = target(cache_arg)?;
        let info = t
            .client
            .cache_info(&t.cache)
            .await
            .with_context(|| format!("cannot use cache {:?}", t.cache))?;
        ensure_can_push(&t.client, &t.cache).await?;
        let compression = Compression::from_name(&info.compression).unwrap_or(Compression::Zstd);
        let signing_key = crate::push_cmd::signing_key(cache_arg, t.client.base_url())?;
        if info.signing_mode == "client" && signing_key.is_none() {
            return Err(fail_with_hint(
                format!("cache {:?} requires uploads signed by its key", info.name),
                format!("set LARDER_SIGNING_KEY, or run `larder generate-keypair {cache_arg}`"),
            ));
        }
        Ok(Self {
            client: t.client,
            cache: t.cache,
            opts: PushOptions {
                compression,
                level: if compression == Compression::Xz { 6 } else { 3 },
                signing_key,
                ..PushOptions::default()
            },
            store: None,
        })
    }

    async fn take_store(&mut self) -> anyhow::Result<LocalStore> {
        match self.store.take() {
            Some(s) => Ok(s),
            None => tokio::task::spawn_blocking(LocalStore::open_default)
                .await
                .context("cannot open the local store")?
                .context("cannot open the local store"),
        }
    }

    /// Push the closures of `roots` (one bulk missing query). Roots that are not valid are
    /// reported, not fatal. An `Err` means nothing was pushed (store or server trouble).
    pub async fn push(
        &mut self,
        roots: Vec<StorePath>,
        observer: Arc<dyn Observer>,
    ) -> anyhow::Result<Batch> {
        let store = self.take_store().await?;
        let (found, store) = tokio::task::spawn_blocking(move || {
            let mut store = store;
            let r = store.query_path_infos(&roots);
            (r.map(|v| (roots, v)), store)
        })
        .await
        .context("local store reader panicked")?;
        self.store = Some(store);
        let (roots, found) = found.context("cannot query the local store")?;
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
                    .context("cannot plan the push")?;
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
            crate::output::count(u64::from(parts), "part"),
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
            Outcome::Failed(e) => {
                eprintln!("{}error: {}: {e}", self.prefix, path.path.to_absolute())
            }
        }
    }
}
