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

/// A cache's daily statistics: downloads (requests and bytes) and stored size, per UTC day, as
/// the web UI's charts show them.
///
/// Recorded by the server: every replica counts the narinfo and NAR downloads it serves (a HEAD
/// is none) and adds them to the day's row every 2 s; the size is sampled whenever paths are
/// published, evicted or deleted and once a day. Days older than 90 are deleted. Readable by
/// whoever may read the cache (as `GET /caches/{cache}`).
#[utoipa::path(
    get,
    path = "/caches/{cache}/stats",
    tag = "caches",
    operation_id = "cacheStats",
    params(
        crate::api::openapi::CachePath,
        ("days" = Option<u64>, Query, description = "How many days, up to today. Default: 30.", minimum = 1, maximum = 90),
    ),
    responses(
        (status = 200, description = "One entry per day, oldest first.", body = larder_api::CacheStats),
        crate::api::openapi::CacheRefusals,
    ),
)]
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
