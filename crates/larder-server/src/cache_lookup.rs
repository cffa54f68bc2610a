//! Looking a cache up by name: the one lookup every handler, the authorization extractors and
//! the web UI share. A leaf: it uses only the hot cache (through `AppState`) and the
//! metadata, so every module above it may call it.

use std::sync::Arc;

use larder_store::meta::CacheRow;

use crate::error::ApiError;
use crate::ingest::truncate;
use crate::{valid_cache_name, AppState};

/// Look a cache up by name: 400 for a malformed name, 404 for an unknown one.
pub async fn load_cache(state: &AppState, name: &str) -> Result<Arc<CacheRow>, ApiError> {
    if !valid_cache_name(name) {
        return Err(ApiError::bad(format!(
            "invalid cache name {:?}",
            truncate(name)
        )));
    }
    if let Some(c) = state.hot.cache(name) {
        return Ok(c);
    }
    let row = state
        .meta
        .get_cache(name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no cache named {name:?}")))?;
    let row = Arc::new(row);
    state.hot.put_cache(row.clone());
    Ok(row)
}

/// The cache named `name`, or `None` when there is none.
pub(crate) async fn find_cache(
    state: &AppState,
    name: &str,
) -> Result<Option<Arc<CacheRow>>, ApiError> {
    match load_cache(state, name).await {
        Ok(cache) => Ok(Some(cache)),
        Err(ApiError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}
