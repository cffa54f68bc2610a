//! Caches declared in the config file (`[caches.NAME]`), made true when the server starts:
//! a missing cache is created, an existing one gets the declared settings (keys left out of
//! its table keep their current value), and, only when `delete_undeclared_caches` is set,
//! caches the file does not declare are deleted. Replicas starting together with one file
//! converge: creation is idempotent and updates write the same values.

use larder_nix::signing::VerifyingKey;
use larder_store::meta::CacheUpdate;

use crate::config::DeclaredCache;
use crate::{ApiError, AppState};

/// Apply the declared caches; returns one line per change, for the start-up log.
pub async fn apply(state: &AppState) -> Result<Vec<String>, ApiError> {
    let mut changes = Vec::new();
    for d in &state.config.declared_caches {
        if let Some(change) = apply_one(state, d).await? {
            changes.push(change);
        }
    }
    if state.config.delete_undeclared_caches {
        let mut deleted = false;
        for c in state.meta.list_caches().await? {
            if state
                .config
                .declared_caches
                .iter()
                .any(|d| d.name == c.name)
            {
                continue;
            }
            state.meta.delete_cache(&c.name).await?;
            state.hot.forget_cache(&c.name);
            changes.push(format!(
                "deleted cache {:?} (not declared, and delete_undeclared_caches is set)",
                c.name
            ));
            deleted = true;
        }
        if deleted {
            // Scopes naming the deleted caches ended in the database.
            state.hot.forget_tokens();
            crate::publish::collect_garbage(state).await?;
        }
    }
    Ok(changes)
}

async fn apply_one(state: &AppState, d: &DeclaredCache) -> Result<Option<String>, ApiError> {
    let max_size = |m: Option<u64>| m.map(|b| b as i64);
    if state.meta.get_cache(&d.name).await?.is_none() {
        let new = larder_store::meta::NewCache {
            upstream_keys: upstream_keys(d)?.unwrap_or_default(),
            upstreams: d.upstreams.clone().unwrap_or_default(),
            ..crate::api::managed_cache(
                state,
                &d.name,
                d.private.unwrap_or(false),
                d.priority,
                d.compression.as_deref(),
                d.max_size.flatten().map(|b| b as i64),
            )?
        };
        // `None`: another replica created it just now; fall through to the update.
        if state.meta.create_cache(&new).await?.is_some() {
            return Ok(Some(format!("created declared cache {:?}", d.name)));
        }
    }
    let Some(current) = state.meta.get_cache(&d.name).await? else {
        return Ok(None);
    };
    let update = CacheUpdate {
        private: differs(d.private, current.private),
        priority: differs(d.priority, current.priority),
        compression: differs(
            d.compression
                .as_deref()
                .map(crate::ingest::parse_compression)
                .transpose()?,
            current.compression,
        ),
        max_size: differs(d.max_size.map(max_size), current.max_size),
        client_public_key: None,
        upstream_keys: differs(upstream_keys(d)?, current.upstream_keys.clone()),
        upstreams: differs(d.upstreams.clone(), current.upstreams.clone()),
    };
    let mut changed = Vec::new();
    for (name, set) in [
        ("private", update.private.is_some()),
        ("priority", update.priority.is_some()),
        ("compression", update.compression.is_some()),
        ("max_size", update.max_size.is_some()),
        ("upstream_keys", update.upstream_keys.is_some()),
        ("upstreams", update.upstreams.is_some()),
    ] {
        if set {
            changed.push(name);
        }
    }
    if changed.is_empty() {
        return Ok(None);
    }
    let row = state
        .meta
        .update_cache(&d.name, &update)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no cache named {:?}", d.name)))?;
    state.hot.forget_cache(&d.name);
    // A lower limit holds at once, as when it is set through the API.
    if update.max_size.is_some_and(|m| m.is_some()) {
        crate::retention::evict(state, &row, false).await?;
    }
    Ok(Some(format!(
        "updated declared cache {:?}: {}",
        d.name,
        changed.join(", ")
    )))
}

/// A declared cache's own upstream keys (checked when the configuration was read).
fn upstream_keys(d: &DeclaredCache) -> Result<Option<Vec<VerifyingKey>>, ApiError> {
    d.upstream_keys
        .as_ref()
        .map(|keys| {
            keys.iter()
                .map(|k| VerifyingKey::parse(k).map_err(ApiError::internal))
                .collect()
        })
        .transpose()
}

/// The declared value, when there is one and it is not what the cache has.
fn differs<T: PartialEq>(want: Option<T>, have: T) -> Option<T> {
    want.filter(|w| *w != have)
}
