//! The JSON API under `/api/v1`: what the `larder` client uses (cache and token
//! administration, the bulk "which paths are missing" query, NAR + path upload, contents,
//! retention), described by the OpenAPI document served at `/api/v1/openapi.json`.
//!
//! Uploads take two requests: `POST /caches/{c}/nars?compression=…` streams a NAR and returns
//! what the server measured (upload id, NarHash, NarSize, FileHash, FileSize); then
//! `POST /caches/{c}/paths` publishes a store path whose metadata must match that NAR. This is
//! the same two-step shape as Nix's own uploader (NAR first, then narinfo), so both go through
//! one publishing path.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use larder_api::{
    Cache, ConfigureCache, CreateCache, CreateToken, MissingRequest, MissingResponse, PathMetadata,
    PublishRequest, PublishStatus, Published, RegisterKey, Size, Token, Upload, WhoAmI,
};
use larder_nix::hash::Sha256;
use larder_nix::signing::{Signature, SigningKey, VerifyingKey};
use larder_nix::store_path::StorePath;
use larder_store::meta::{
    CacheRow, CacheScope, CacheUpdate, NewCache, Publish, SecretKey, SigningMode, TokenRow,
};
use larder_store::now_unix;
use serde::Deserialize;

use crate::access::{can_see, Admin, CacheAccess, Caller, Pull, Push, ServerAdmin};
use crate::auth::{new_token, token_hash};
use crate::config::{parse_duration, parse_size, DEFAULT_PRIORITY};
use crate::error::ApiError;
use crate::ingest::{ingest, parse_compression, truncate, Compression};
use crate::publish::{publish, store_upload, PathInfo, UpstreamRef};
use crate::routes::Routes;
use crate::{valid_cache_name, AppState};

mod batch;
mod chunks;
pub(crate) mod contents;
pub(crate) mod multipart;
mod oidc;
mod openapi;
mod retention;
mod stats;

/// Most paths one `missing` query may ask about.
const MAX_MISSING_QUERY: usize = 100_000;

pub fn routes() -> Routes {
    Routes::new()
        .get("/openapi.json", openapi)
        .get("/whoami", whoami)
        .get("/caches", list_caches)
        .post("/caches", create_cache)
        .get("/caches/{cache}", cache_info)
        .patch("/caches/{cache}", configure_cache)
        .delete("/caches/{cache}", delete_cache)
        .post("/caches/{cache}/missing", missing)
        .post("/caches/{cache}/nars", upload_nar)
        .post("/caches/{cache}/chunks/missing", chunks::missing)
        .post("/caches/{cache}/chunks", chunks::upload)
        .post("/caches/{cache}/chunks/assemble", chunks::assemble)
        .get("/caches/{cache}/paths", contents::list_paths)
        .post("/caches/{cache}/paths", publish_path)
        .post("/caches/{cache}/paths/batch", batch::publish_batch)
        .get("/caches/{cache}/paths/{path}", contents::path_info)
        .delete("/caches/{cache}/paths/{path}", contents::delete_path)
        .get("/caches/{cache}/multipart", multipart::list)
        .post("/caches/{cache}/multipart", multipart::open)
        .get("/caches/{cache}/multipart/{id}", multipart::show)
        .delete("/caches/{cache}/multipart/{id}", multipart::abort)
        .put(
            "/caches/{cache}/multipart/{id}/parts/{n}",
            multipart::put_part,
        )
        .post(
            "/caches/{cache}/multipart/{id}/complete",
            multipart::complete,
        )
        .post("/caches/{cache}/public-key", register_public_key)
        .post("/caches/{cache}/gc", retention::gc)
        .get("/caches/{cache}/pins", retention::list_pins)
        .post("/caches/{cache}/pins", retention::create_pin)
        .delete("/caches/{cache}/pins/{pin}", retention::delete_pin)
        .get("/caches/{cache}/stats", stats::cache_stats)
        .get("/tokens", list_tokens)
        .post("/tokens", create_token)
        .delete("/tokens/{id}", revoke_token)
        .post("/oidc/exchange", oidc::exchange)
        .fallback(|| async { ApiError::not_found("no such API endpoint") })
}

pub use openapi::openapi_json;

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "api",
    operation_id = "openapi",
    responses(
        (status = 200, description = "The OpenAPI document.", body = crate::api::openapi::OpenApiSchema),
    ),
)]
async fn openapi() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        openapi_json(),
    )
}

/// A JSON body extractor whose rejections are our 4xx errors.
pub struct JsonBody<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(JsonBody(v)),
            Err(e) => Err(ApiError::bad(format!(
                "invalid JSON body: {}",
                e.body_text()
            ))),
        }
    }
}

/// Who the request's token is (anonymous without one).
#[utoipa::path(
    get,
    path = "/whoami",
    tag = "api",
    operation_id = "whoami",
    responses(
        (status = 200, description = "The principal.", body = larder_api::WhoAmI),
        (status = 401, response = crate::api::openapi::Unauthorized),
    ),
)]
async fn whoami(Caller(p): Caller) -> Result<Json<WhoAmI>, ApiError> {
    Ok(Json(match p.grant() {
        None => WhoAmI {
            authenticated: false,
            token_id: None,
            label: None,
            perms: vec![],
            caches: None,
            server_admin: false,
            expires_at: None,
        },
        Some(g) => WhoAmI {
            authenticated: true,
            token_id: Some(g.id.clone()),
            label: Some(g.label.clone()),
            perms: g.perms.clone(),
            caches: g.caches.clone(),
            server_admin: g.is_server_admin(),
            expires_at: g.expires_at,
        },
    }))
}

pub(crate) async fn cache_json(state: &AppState, c: &CacheRow) -> Result<Cache, ApiError> {
    let stats = state.meta.cache_stats(c.id).await?;
    let stored_size = state.meta.cache_stored_size(c.id).await?;
    let url = format!("{}/{}", state.config.public_url, c.name);
    let key = c
        .public_key
        .as_ref()
        .map(VerifyingKey::to_string)
        .unwrap_or_default();
    Ok(Cache {
        nix_conf: format!("extra-substituters = {url}\nextra-trusted-public-keys = {key}\n"),
        flake_nix_config: format!(
            "nixConfig = {{\n  extra-substituters = [ \"{url}\" ];\n  \
             extra-trusted-public-keys = [ \"{key}\" ];\n}};\n"
        ),
        name: c.name.clone(),
        url,
        public_key: c.public_key.as_ref().map(VerifyingKey::to_string),
        private: c.private,
        priority: c.priority,
        compression: c.compression.as_str().to_owned(),
        max_size: c.max_size,
        signing_mode: c.signing_mode.as_str().to_owned(),
        size: stats.size,
        nar_size: stats.nar_size,
        stored_size,
        paths: stats.paths,
        near_limit: crate::retention::over_warning(c, stats.size),
        upstream_keys: c
            .upstream_keys
            .iter()
            .map(VerifyingKey::to_string)
            .collect(),
        upstreams: c.upstreams.clone(),
    })
}

/// The caches the requester may see (private ones need pull).
#[utoipa::path(
    get,
    path = "/caches",
    tag = "caches",
    operation_id = "listCaches",
    responses(
        (status = 200, description = "Caches, by name.", body = Vec<larder_api::Cache>),
        (status = 401, response = crate::api::openapi::Unauthorized),
    ),
)]
async fn list_caches(
    State(state): State<AppState>,
    Caller(p): Caller,
) -> Result<Json<Vec<Cache>>, ApiError> {
    let mut out = Vec::new();
    for c in state.meta.list_caches().await? {
        if can_see(&p, &c) {
            out.push(cache_json(&state, &c).await?);
        }
    }
    Ok(Json(out))
}

/// A cache's storage limit in bytes (given as bytes or as text such as "5GiB").
fn size_bytes(size: &Size) -> Result<i64, ApiError> {
    let b = match size {
        Size::Bytes(b) => *b,
        Size::Text(t) => parse_size(t).map_err(|e| ApiError::bad(e.to_string()))?,
    };
    if b == 0 {
        // Not "no limit" (that is null), and a limit of nothing would evict everything.
        return Err(ApiError::bad(
            "max_size must be more than 0: use null (`--max-size none`) to remove the limit",
        ));
    }
    i64::try_from(b).map_err(|_| ApiError::bad("size too large"))
}

/// Upstream keys as the API takes them: Nix `name:base64` public keys.
fn parse_upstream_keys(keys: &[String]) -> Result<Vec<VerifyingKey>, ApiError> {
    keys.iter()
        .map(|k| {
            VerifyingKey::parse(k).map_err(|_| {
                ApiError::bad(format!(
                    "invalid upstream key {:?} (a Nix public key name:base64)",
                    truncate(k)
                ))
            })
        })
        .collect()
}

/// Upstream cache URLs as the API takes them (see [`crate::config::check_upstream_url`]), at most
/// [`crate::config::MAX_UPSTREAMS`].
fn parse_upstreams(urls: &[String]) -> Result<Vec<String>, ApiError> {
    if urls.len() > crate::config::MAX_UPSTREAMS {
        return Err(ApiError::bad(format!(
            "at most {} upstreams",
            crate::config::MAX_UPSTREAMS
        )));
    }
    urls.iter()
        .map(|u| {
            crate::config::check_upstream_url(u).map_err(|why| {
                ApiError::bad(format!("invalid upstream URL {:?}: {why}", truncate(u)))
            })
        })
        .collect()
}

fn check_priority(p: i64) -> Result<i64, ApiError> {
    if (0..=1_000_000).contains(&p) {
        Ok(p)
    } else {
        Err(ApiError::bad("priority must be between 0 and 1000000"))
    }
}

fn random_seed() -> Result<[u8; 32], ApiError> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| ApiError::internal(std::io::Error::other(e)))?;
    Ok(seed)
}

/// A new cache that the server signs for, with a fresh key named after the server's host;
/// unset settings take the server's defaults.
pub(crate) fn managed_cache(
    state: &AppState,
    name: &str,
    private: bool,
    priority: Option<i64>,
    compression: Option<&str>,
    max_size: Option<i64>,
) -> Result<NewCache, ApiError> {
    let compression = parse_compression(compression.unwrap_or(&state.config.compression))?;
    let key_name = format!("{name}.{}-1", state.config.public_host());
    let key = SigningKey::from_seed(&key_name, random_seed()?).map_err(ApiError::internal)?;
    Ok(NewCache {
        name: name.to_owned(),
        private,
        priority: check_priority(priority.unwrap_or(DEFAULT_PRIORITY))?,
        compression,
        max_size,
        signing_mode: SigningMode::Managed,
        public_key: Some(key.verifying_key()),
        secret_key: Some(SecretKey(key)),
        upstream_keys: Vec::new(),
        upstreams: Vec::new(),
    })
}

/// Create a cache (server admin).
#[utoipa::path(
    post,
    path = "/caches",
    tag = "caches",
    operation_id = "createCache",
    request_body = larder_api::CreateCache,
    responses(
        (status = 201, description = "The new cache.", body = larder_api::Cache),
        (status = 400, response = crate::api::openapi::BadRequest),
        (status = 401, response = crate::api::openapi::Unauthorized),
        (status = 403, response = crate::api::openapi::Forbidden),
        (status = 409, response = crate::api::openapi::Conflict),
    ),
)]
async fn create_cache(
    State(state): State<AppState>,
    admin: Result<ServerAdmin, ApiError>,
    JsonBody(req): JsonBody<CreateCache>,
) -> Result<(StatusCode, Json<Cache>), ApiError> {
    admin?;
    if !valid_cache_name(&req.name) {
        return Err(ApiError::bad(format!(
            "invalid cache name {:?}: use 1-63 of [a-z0-9-], starting with a letter or digit, \
             not one of {}",
            truncate(&req.name),
            crate::RESERVED_NAMES.join(", ")
        )));
    }
    let new = NewCache {
        upstream_keys: parse_upstream_keys(&req.upstream_keys)?,
        upstreams: parse_upstreams(&req.upstreams)?,
        ..managed_cache(
            &state,
            &req.name,
            req.private,
            req.priority,
            req.compression.as_deref(),
            req.max_size.as_ref().map(size_bytes).transpose()?,
        )?
    };
    let row = state
        .meta
        .create_cache(&new)
        .await?
        .ok_or_else(|| ApiError::Conflict(format!("cache {:?} already exists", req.name)))?;
    // Its statistics start today, at size 0.
    state.retention.usage.resized(row.id);
    Ok((StatusCode::CREATED, Json(cache_json(&state, &row).await?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheInfoQuery {
    /// Answer once the evictions that uploads to the cache triggered are done (bounded by
    /// `backend_timeout`): what a pusher asks before it checks its closure is still there.
    #[serde(default)]
    settled: bool,
}

/// A cache: size vs limit, path count, public key, nix.conf lines.
#[utoipa::path(
    get,
    path = "/caches/{cache}",
    tag = "caches",
    operation_id = "cacheInfo",
    params(
        crate::api::openapi::CachePath,
        ("settled" = Option<bool>, Query, description = "Answer once the evictions that uploads to the cache triggered on this server are done (at most backend_timeout): what a pusher asks before it checks that its closure is still all there. Default: false."),
    ),
    responses(
        (status = 200, description = "The cache.", body = larder_api::Cache),
        crate::api::openapi::CacheRefusals,
    ),
)]
async fn cache_info(
    State(state): State<AppState>,
    Path(_name): Path<String>,
    access: Result<CacheAccess<Pull>, ApiError>,
    query: Result<Query<CacheInfoQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Cache>, ApiError> {
    let Query(q) = query.map_err(|_| ApiError::bad("settled must be true or false"))?;
    let c = access?.cache;
    if q.settled {
        // Under the read deadline (`backend_timeout`), with room for the answer.
        let wait = state
            .config
            .backend_timeout
            .saturating_sub(std::time::Duration::from_secs(1));
        crate::retention::settle(&state, &c, wait).await;
    }
    Ok(Json(cache_json(&state, &c).await?))
}

/// Change a cache's settings (admin on the cache).
#[utoipa::path(
    patch,
    path = "/caches/{cache}",
    tag = "caches",
    operation_id = "configureCache",
    params(
        crate::api::openapi::CachePath,
    ),
    request_body = larder_api::ConfigureCache,
    responses(
        (status = 200, description = "The cache.", body = larder_api::Cache),
        crate::api::openapi::CacheRefusals,
    ),
)]
async fn configure_cache(
    State(state): State<AppState>,
    Path(name): Path<String>,
    access: Result<CacheAccess<Admin>, ApiError>,
    JsonBody(req): JsonBody<ConfigureCache>,
) -> Result<Json<Cache>, ApiError> {
    access?;
    let update = CacheUpdate {
        private: req.private,
        priority: req.priority.map(check_priority).transpose()?,
        compression: req
            .compression
            .as_deref()
            .map(parse_compression)
            .transpose()?,
        max_size: req
            .max_size
            .map(|m| m.as_ref().map(size_bytes).transpose())
            .transpose()?,
        client_public_key: None,
        upstream_keys: req
            .upstream_keys
            .as_deref()
            .map(parse_upstream_keys)
            .transpose()?,
        upstreams: req.upstreams.as_deref().map(parse_upstreams).transpose()?,
    };
    let row = state
        .meta
        .update_cache(&name, &update)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no cache named {name:?}")))?;
    state.hot.forget_cache(&name);
    if update.upstreams.is_some() || update.upstream_keys.is_some() {
        // Misses and narinfos remembered under the old upstreams or keys no longer hold.
        state.upstream.forget_cache(row.id);
    }
    // A new limit holds at once, not at the next upload or collection: `cache info` must not
    // show a cache over its limit.
    if update.max_size.is_some_and(|m| m.is_some()) {
        crate::retention::evict(&state, &row, false).await?;
    }
    let row = state.meta.get_cache(&name).await?.unwrap_or(row);
    Ok(Json(cache_json(&state, &row).await?))
}

/// Delete a cache and everything in it (admin on the cache).
#[utoipa::path(
    delete,
    path = "/caches/{cache}",
    tag = "caches",
    operation_id = "deleteCache",
    params(
        crate::api::openapi::CachePath,
    ),
    responses(
        (status = 204, description = "Done."),
        crate::api::openapi::CacheRefusals,
    ),
)]
async fn delete_cache(
    State(state): State<AppState>,
    Path(name): Path<String>,
    _: CacheAccess<Admin>,
) -> Result<StatusCode, ApiError> {
    state.meta.delete_cache(&name).await?;
    // Its scopes ended in the database; tokens resolved here before must not keep them.
    state.hot.forget_tokens();
    state.hot.forget_cache(&name);
    if let Err(e) = crate::publish::collect_garbage(&state).await {
        tracing::warn!(error = %e, "garbage collection after deleting a cache failed");
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Switch to client signing with this public key (admin on the cache).
#[utoipa::path(
    post,
    path = "/caches/{cache}/public-key",
    tag = "caches",
    operation_id = "registerPublicKey",
    params(
        crate::api::openapi::CachePath,
    ),
    request_body = larder_api::RegisterKey,
    responses(
        (status = 200, description = "The cache.", body = larder_api::Cache),
        crate::api::openapi::CacheRefusals,
    ),
)]
// Switch a cache to client-side signing with this public key (`larder generate-keypair`).

async fn register_public_key(
    State(state): State<AppState>,
    Path(name): Path<String>,
    access: Result<CacheAccess<Admin>, ApiError>,
    JsonBody(req): JsonBody<RegisterKey>,
) -> Result<Json<Cache>, ApiError> {
    access?;
    let key = VerifyingKey::parse(req.public_key.trim())
        .map_err(|e| ApiError::bad(format!("invalid public key: {e}")))?;
    let update = CacheUpdate {
        client_public_key: Some(key),
        ..Default::default()
    };
    let row = state
        .meta
        .update_cache(&name, &update)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no cache named {name:?}")))?;
    state.hot.forget_cache(&name);
    Ok(Json(cache_json(&state, &row).await?))
}

/// Which of these store paths the cache lacks (pull on a private cache).
#[utoipa::path(
    post,
    path = "/caches/{cache}/missing",
    tag = "caches",
    operation_id = "missing",
    params(
        crate::api::openapi::CachePath,
    ),
    request_body = larder_api::MissingRequest,
    responses(
        (status = 200, description = "The missing ones.", body = larder_api::MissingResponse),
        crate::api::openapi::CacheRefusals,
    ),
)]
async fn missing(
    State(state): State<AppState>,
    Path(_name): Path<String>,
    access: Result<CacheAccess<Pull>, ApiError>,
    JsonBody(req): JsonBody<MissingRequest>,
) -> Result<Json<MissingResponse>, ApiError> {
    let c = access?.cache;
    if req.paths.len() > MAX_MISSING_QUERY {
        return Err(ApiError::bad(format!(
            "at most {MAX_MISSING_QUERY} paths per query"
        )));
    }
    let mut hashes = Vec::with_capacity(req.paths.len());
    for p in &req.paths {
        let hash = if p.starts_with('/') {
            StorePath::from_absolute(p)
                .map_err(|e| ApiError::bad(format!("invalid store path: {e}")))?
                .hash_part()
        } else {
            larder_nix::store_path::validate_hash_part(p)
                .map_err(|e| ApiError::bad(format!("invalid store path hash: {e}")))?;
            p.clone()
        };
        hashes.push(hash);
    }
    let missing: std::collections::HashSet<String> = state
        .meta
        .missing_hashes(c.id, &hashes)
        .await?
        .into_iter()
        .collect();
    Ok(Json(MissingResponse {
        missing: req
            .paths
            .iter()
            .zip(&hashes)
            .filter(|(_, h)| missing.contains(*h))
            .map(|(p, _)| p.clone())
            .collect(),
    }))
}

#[derive(Deserialize)]
struct CompressionQuery {
    compression: String,
}

/// The `?compression=zstd|xz|none` of an upload request.
pub(crate) struct UploadCompression(pub Compression);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for UploadCompression {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        let Query(q) = Query::<CompressionQuery>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::bad("missing ?compression=zstd|xz|none"))?;
        Ok(UploadCompression(parse_compression(&q.compression)?))
    }
}

/// What the server measured of an uploaded NAR.
pub(crate) fn upload_json(upload_id: String, nar: larder_store::meta::NarRow) -> Upload {
    Upload {
        upload_id,
        nar_hash: nar.nar_hash.to_typed_nix32(),
        nar_size: nar.nar_size,
        file_hash: nar.file_hash.to_typed_nix32(),
        file_size: nar.file_size,
        compression: nar.compression.as_str().to_owned(),
    }
}

/// Upload a compressed NAR (push); verified and measured by the server.
#[utoipa::path(
    post,
    path = "/caches/{cache}/nars",
    tag = "caches",
    operation_id = "uploadNar",
    params(
        crate::api::openapi::CachePath,
        ("compression" = String, Query, pattern = "^(zstd|xz|none)$"),
    ),
    request_body(content = inline(crate::api::openapi::Bytes), content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "What the server measured.", body = larder_api::Upload),
        crate::api::openapi::CacheRefusals,
        (status = 413, response = crate::api::openapi::TooLarge),
        (status = 415, response = crate::api::openapi::UnsupportedMedia),
    ),
)]
async fn upload_nar(
    State(state): State<AppState>,
    Path(_name): Path<String>,
    UploadCompression(compression): UploadCompression,
    CacheAccess { cache: c, .. }: CacheAccess<Push>,
    body: Body,
) -> Result<(StatusCode, Json<Upload>), ApiError> {
    state.objects.check_available().await?;
    let up = ingest(
        body,
        compression,
        state.config.max_upload_size,
        state.config.max_nar_size,
        &state.staging,
    )
    .await?;
    let (upload_id, nar) = store_upload(&state, &c, None, up).await?;
    Ok((StatusCode::CREATED, Json(upload_json(upload_id, nar))))
}

/// Publish a store path whose NAR was uploaded (push).
#[utoipa::path(
    post,
    path = "/caches/{cache}/paths",
    tag = "caches",
    operation_id = "publishPath",
    params(
        crate::api::openapi::CachePath,
    ),
    request_body = larder_api::PublishRequest,
    responses(
        (status = 201, description = "Published.", body = larder_api::Published),
        (status = 200, description = "Already there with the same content.", body = larder_api::Published),
        crate::api::openapi::CacheRefusals,
        (status = 409, response = crate::api::openapi::Conflict),
    ),
)]
async fn publish_path(
    State(state): State<AppState>,
    Path(_name): Path<String>,
    access: Result<CacheAccess<Push>, ApiError>,
    JsonBody(req): JsonBody<PublishRequest>,
) -> Result<(StatusCode, Json<Published>), ApiError> {
    let c = access?.cache;
    let (upload_id, meta) = req.into_parts();
    let info = path_info(meta)?;
    let nar = state
        .meta
        .upload_nar(c.id, &upload_id)
        .await?
        .ok_or_else(|| {
            ApiError::bad(format!(
                "unknown upload id {:?} (uploads expire after {} hours)",
                truncate(&upload_id),
                crate::config::PENDING_UPLOAD_TTL.as_secs() / 3600
            ))
        })?;
    let store_path = info.store_path.to_absolute();
    let outcome = publish(&state, &c, info, &nar, &upload_id).await?;
    let (code, status) = match outcome {
        Publish::Created => (StatusCode::CREATED, PublishStatus::Created),
        _ => (StatusCode::OK, PublishStatus::AlreadyPresent),
    };
    Ok((code, Json(Published { store_path, status })))
}

/// A path's metadata as a client declared it, parsed: every store path, hash and signature
/// checked for form (an unparsable upstream signature simply does not count).
pub(crate) fn path_info(m: PathMetadata) -> Result<PathInfo, ApiError> {
    let path = |s: &str| {
        StorePath::from_absolute(s)
            .or_else(|_| StorePath::from_basename(s))
            .map_err(|e| ApiError::bad(format!("invalid store path: {e}")))
    };
    let sig = |s: &String| {
        Signature::parse(s).map_err(|e| ApiError::bad(format!("invalid signature: {e}")))
    };
    let upstream = m
        .upstream
        .iter()
        .take(10_000)
        .map(|u| {
            Ok(UpstreamRef {
                store_path: path(&u.store_path)?,
                nar_hash: Sha256::parse(&u.nar_hash)
                    .map_err(|e| ApiError::bad(format!("invalid nar_hash: {e}")))?,
                nar_size: u.nar_size,
                references: u
                    .references
                    .iter()
                    .map(|r| path(r))
                    .collect::<Result<_, _>>()?,
                // Unparsable upstream signatures simply do not count.
                sigs: u.sigs.iter().filter_map(|s| sig(s).ok()).collect(),
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(PathInfo {
        upstream,
        store_path: path(&m.store_path)?,
        nar_hash: Sha256::parse(&m.nar_hash)
            .map_err(|e| ApiError::bad(format!("invalid nar_hash: {e}")))?,
        nar_size: m.nar_size,
        references: m
            .references
            .iter()
            .map(|r| path(r))
            .collect::<Result<_, _>>()?,
        deriver: m.deriver.as_deref().map(path).transpose()?,
        ca: m.ca,
        sigs: m.sigs.iter().map(sig).collect::<Result<_, _>>()?,
    })
}

fn token_json(t: &TokenRow, secret: Option<String>) -> Token {
    Token {
        id: t.id.clone(),
        label: t.label.clone(),
        perms: t.perms.iter().copied().collect(),
        caches: t
            .live_caches()
            .map(|c| c.into_iter().map(str::to_owned).collect()),
        deleted_caches: t.ended_caches().into_iter().map(str::to_owned).collect(),
        expires_at: t.expires_at,
        revoked_at: t.revoked_at,
        created_at: t.created_at,
        token: secret,
    }
}

/// Create a token (server admin); the secret is in this answer only.
#[utoipa::path(
    post,
    path = "/tokens",
    tag = "tokens",
    operation_id = "createToken",
    request_body = larder_api::CreateToken,
    responses(
        (status = 201, description = "The token, with `token`.", body = larder_api::Token),
        (status = 400, response = crate::api::openapi::BadRequest),
        (status = 401, response = crate::api::openapi::Unauthorized),
        (status = 403, response = crate::api::openapi::Forbidden),
    ),
)]
async fn create_token(
    State(state): State<AppState>,
    admin: Result<ServerAdmin, ApiError>,
    JsonBody(req): JsonBody<CreateToken>,
) -> Result<(StatusCode, Json<Token>), ApiError> {
    admin?;
    if req.perms.is_empty() {
        return Err(ApiError::bad("a token needs at least one permission"));
    }
    if let Some(caches) = &req.caches {
        if caches.is_empty() {
            return Err(ApiError::bad("an empty cache list would grant nothing"));
        }
        for c in caches {
            if !valid_cache_name(c) {
                return Err(ApiError::bad(format!(
                    "invalid cache name {:?}",
                    truncate(c)
                )));
            }
            // A misspelt name would make a token that grants nothing, silently.
            if state.meta.get_cache(c).await?.is_none() {
                return Err(ApiError::bad(format!(
                    "no cache named {c:?}: a token for it would grant nothing (`larder cache \
                     list` shows the caches)"
                )));
            }
        }
    }
    if req.label.len() > 200 || req.label.chars().any(char::is_control) {
        return Err(ApiError::bad("label: at most 200 printable characters"));
    }
    let expires_at = req
        .expires_in
        .as_deref()
        .map(|e| {
            let d = parse_duration(e).map_err(|e| ApiError::bad(e.to_string()))?;
            if d.is_zero() {
                // It would be expired when created.
                return Err(ApiError::bad(format!(
                    "a lifetime of {:?} is not in the future: give one such as 12h or 30d, \
                     or none at all for a token that never expires",
                    truncate(e)
                )));
            }
            Ok(d)
        })
        .transpose()?
        .map(|d| now_unix().saturating_add(d.as_secs() as i64));
    let (secret, id) = new_token()?;
    let row = TokenRow {
        id,
        secret_hash: token_hash(&secret),
        label: req.label,
        perms: req.perms.iter().copied().collect(),
        caches: req
            .caches
            .map(|c| c.into_iter().map(CacheScope::Cache).collect()),
        expires_at,
        revoked_at: None,
        created_at: now_unix(),
    };
    state.meta.create_token(&row).await?;
    // A cache deleted between the check above and the insert did not end this new token's
    // scope (the deletion did not see it): check again, and take the token back if so.
    for c in row.live_caches().into_iter().flatten() {
        if state.meta.get_cache(c).await?.is_none() {
            state.meta.revoke_token(&row.id).await?;
            return Err(ApiError::bad(format!(
                "cache {c:?} was deleted while the token was created"
            )));
        }
    }
    Ok((StatusCode::CREATED, Json(token_json(&row, Some(secret)))))
}

/// Every token, never its secret (server admin).
#[utoipa::path(
    get,
    path = "/tokens",
    tag = "tokens",
    operation_id = "listTokens",
    responses(
        (status = 200, description = "Tokens.", body = Vec<larder_api::Token>),
        (status = 401, response = crate::api::openapi::Unauthorized),
        (status = 403, response = crate::api::openapi::Forbidden),
    ),
)]
async fn list_tokens(
    State(state): State<AppState>,
    _: ServerAdmin,
) -> Result<Json<Vec<Token>>, ApiError> {
    let rows = state.meta.list_tokens().await?;
    Ok(Json(rows.iter().map(|t| token_json(t, None)).collect()))
}

/// Revoke a token (server admin).
#[utoipa::path(
    delete,
    path = "/tokens/{id}",
    tag = "tokens",
    operation_id = "revokeToken",
    params(
        ("id" = String, Path),
    ),
    responses(
        (status = 204, description = "Done."),
        (status = 401, response = crate::api::openapi::Unauthorized),
        (status = 403, response = crate::api::openapi::Forbidden),
        (status = 404, response = crate::api::openapi::NotFound),
    ),
)]
async fn revoke_token(
    State(state): State<AppState>,
    Path(id): Path<String>,
    _: ServerAdmin,
) -> Result<StatusCode, ApiError> {
    if state.meta.revoke_token(&id).await? {
        state.hot.forget_tokens();
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "no active token with id {:?}",
            truncate(&id)
        )))
    }
}
