//! Retention endpoints: `POST /caches/{c}/gc[?dry_run=true]` (admin on the cache) runs or
//! previews an eviction; `/caches/{c}/pins[/{name}]` creates (push), lists (pull) and deletes
//! (push) pins. See [`crate::retention`].

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use larder_api::{Pin, PinRequest};
use larder_nix::store_path::StorePath;
use larder_store::meta::{Keep, PinRow};
use serde::Deserialize;

use super::JsonBody;
use crate::access::{Admin, CacheAccess, Pull, Push};
use crate::error::ApiError;
use crate::ingest::truncate;
use crate::retention::{evict, GcReport};
use crate::AppState;

#[derive(Deserialize)]
pub(super) struct GcQuery {
    #[serde(default)]
    dry_run: bool,
}

/// Evict least recently used closures until the cache fits its limit (admin on the cache).
#[utoipa::path(
    post,
    path = "/caches/{cache}/gc",
    tag = "caches",
    operation_id = "gc",
    params(
        crate::api::openapi::CachePath,
        ("dry_run" = Option<bool>, Query, description = "Default: false."),
    ),
    responses(
        (status = 200, description = "What was (or would be) evicted.", body = larder_api::GcReport),
        crate::api::openapi::CacheRefusals,
    ),
)]
pub(super) async fn gc(
    State(state): State<AppState>,
    Path(_name): Path<String>,
    CacheAccess { cache: c, .. }: CacheAccess<Admin>,
    query: Result<Query<GcQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<GcReport>, ApiError> {
    let Query(q) = query.map_err(|_| ApiError::bad("dry_run must be true or false"))?;
    let report = evict(&state, &c, q.dry_run).await?;
    if !q.dry_run {
        if let Err(e) = crate::publish::collect_garbage(&state).await {
            tracing::warn!(error = %e, "garbage collection after an eviction failed");
        }
    }
    Ok(Json(report))
}

fn pin_json(p: PinRow) -> Pin {
    Pin {
        name: p.name,
        revision: p.revision,
        store_path: p.store_path,
        keep: match p.keep {
            Keep::Forever => larder_api::Keep::Forever,
            Keep::Revisions(n) => larder_api::Keep::Revisions(n),
            Keep::Days(n) => larder_api::Keep::Days(n),
        },
        created_at: p.created_at,
    }
}

fn valid_pin_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 100
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'))
}

/// Pin a path of the cache (push); re-pinning a name makes a new revision.
#[utoipa::path(
    post,
    path = "/caches/{cache}/pins",
    tag = "caches",
    operation_id = "createPin",
    params(
        crate::api::openapi::CachePath,
    ),
    request_body = larder_api::PinRequest,
    responses(
        (status = 201, description = "The new revision.", body = larder_api::Pin),
        crate::api::openapi::CacheRefusals,
    ),
)]
pub(super) async fn create_pin(
    State(state): State<AppState>,
    Path(_name): Path<String>,
    access: Result<CacheAccess<Push>, ApiError>,
    JsonBody(req): JsonBody<PinRequest>,
) -> Result<(StatusCode, Json<Pin>), ApiError> {
    let c = access?.cache;
    if !valid_pin_name(&req.name) {
        return Err(ApiError::bad(format!(
            "invalid pin name {:?}: use 1-100 of [A-Za-z0-9._+-]",
            truncate(&req.name)
        )));
    }
    let keep = match (req.keep_revisions, req.keep_days, req.keep_forever) {
        (None, None, _) => Keep::Forever,
        (Some(n), None, false) if n >= 1 => Keep::Revisions(n),
        (None, Some(n), false) if n >= 1 => Keep::Days(n),
        (Some(_), None, false) | (None, Some(_), false) => {
            return Err(ApiError::bad(
                "keep_revisions and keep_days must be at least 1",
            ))
        }
        _ => {
            return Err(ApiError::bad(
                "give at most one of keep_revisions, keep_days, keep_forever",
            ))
        }
    };
    let path = StorePath::from_absolute(&req.store_path)
        .or_else(|_| StorePath::from_basename(&req.store_path))
        .map_err(|e| ApiError::bad(format!("invalid store path: {e}")))?;
    let pin = state
        .meta
        .add_pin(
            c.id,
            &req.name,
            &path.hash_part(),
            &path.to_absolute(),
            keep,
        )
        .await?
        .ok_or_else(|| {
            ApiError::bad(format!(
                "{path} is not in cache {:?}: only paths in the cache can be pinned \
                 (hint: larder push {} {path})",
                c.name, c.name
            ))
        })?;
    Ok((StatusCode::CREATED, Json(pin_json(pin))))
}

/// Every kept pin revision (pull on a private cache).
#[utoipa::path(
    get,
    path = "/caches/{cache}/pins",
    tag = "caches",
    operation_id = "listPins",
    params(
        crate::api::openapi::CachePath,
    ),
    responses(
        (status = 200, description = "Pins by name, newest revision first.", body = Vec<larder_api::Pin>),
        crate::api::openapi::CacheRefusals,
    ),
)]
pub(super) async fn list_pins(
    State(state): State<AppState>,
    Path(_name): Path<String>,
    CacheAccess { cache: c, .. }: CacheAccess<Pull>,
) -> Result<Json<Vec<Pin>>, ApiError> {
    let pins = state.meta.list_pins(c.id).await?;
    Ok(Json(pins.into_iter().map(pin_json).collect()))
}

/// Delete every revision of a pin (push).
#[utoipa::path(
    delete,
    path = "/caches/{cache}/pins/{pin}",
    tag = "caches",
    operation_id = "deletePin",
    params(
        crate::api::openapi::CachePath,
        ("pin" = String, Path),
    ),
    responses(
        (status = 204, description = "Done."),
        crate::api::openapi::CacheRefusals,
    ),
)]
pub(super) async fn delete_pin(
    State(state): State<AppState>,
    Path((_name, pin)): Path<(String, String)>,
    CacheAccess { cache: c, .. }: CacheAccess<Push>,
) -> Result<StatusCode, ApiError> {
    if state.meta.delete_pin(c.id, &pin).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "no pin named {:?} in cache {:?}",
            truncate(&pin),
            c.name
        )))
    }
}
