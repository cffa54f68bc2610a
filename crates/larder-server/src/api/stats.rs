//! `GET /caches/{cache}/stats?days=N`: a cache's daily downloads and size ([`crate::stats`]),
//! readable by whoever may read `cache info`.

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;

use crate::access::{CacheAccess, Pull};
use crate::error::ApiError;
use crate::stats::{series, CacheStats, DEFAULT_DAYS, KEEP_DAYS};
use crate::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StatsQuery {
    /// Days up to today (1 to [`KEEP_DAYS`]).
    days: Option<i64>,
}

pub(crate) async fn cache_stats(
    State(state): State<AppState>,
    Path(_name): Path<String>,
    CacheAccess { cache: c, .. }: CacheAccess<Pull>,
    query: Result<Query<StatsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<CacheStats>, ApiError> {
    let bad = || ApiError::bad(format!("days must be a number from 1 to {KEEP_DAYS}"));
    let Query(q) = query.map_err(|_| bad())?;
    let days = q.days.unwrap_or(DEFAULT_DAYS);
    if !(1..=KEEP_DAYS).contains(&days) {
        return Err(bad());
    }
    let size = state.meta.cache_stats(c.id).await?.size;
    Ok(Json(series(&state, &c, days, size).await?))
}
