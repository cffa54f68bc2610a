//! The JSON API under `/api/v1`: what the `larder` client uses (cache and token
//! administration, the bulk "which paths are missing" query, NAR + path upload, contents,
//! retention), described by the OpenAPI document served at `/api/v1/openapi.json`.
//!
//! Uploads take two requests: `POST /caches/{c}/nars?compression=…` streams a NAR and returns
//! what the server measured (upload id, NarHash, NarSize, FileHash, FileSize); then
//! `POST /caches/{c}/paths` publishes a store path whose metadata must match that NAR. This is
//! the same two-step shape as Nix's own uploader (NAR first, then narinfo), so both go through
//! one publishing path.

use tokio::io::AsyncWriteExt;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use futures::StreamExt;
use larder_nix::hash::{Sha256, Sha256Hasher};
use larder_nix::signing::{Signature, SigningKey, VerifyingKey};
use larder_nix::store_path::StorePath;
use larder_store::meta::{
    CacheRow, CacheScope, CacheUpdate, NewCache, Publish, SecretKey, SigningMode, TokenRow,
};
use larder_store::now_unix;
use serde::{Deserialize, Serialize};

use crate::auth::{new_token, principal, token_hash, Perm, Principal};
use crate::config::{parse_duration, parse_size, DEFAULT_PRIORITY};
use crate::error::ApiError;
use crate::ingest::{ingest, parse_compression, truncate, Compression};
use crate::publish::{publish, store_upload, PathInfo, UpstreamRef};
use crate::routes::Routes;
use crate::{valid_cache_name, AppState};

pub(crate) mod contents;
mod multipart;
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
        .get("/caches/{cache}/paths", contents::list_paths)
        .post("/caches/{cache}/paths", publish_path)
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
        .fallback(|| async { ApiError::not_found("no such API endpoint") })
}

/// The OpenAPI 3.1 document of this API (hand-written; `tests/openapi.rs` keeps it true: every
/// route is documented, and real responses match the documented schemas).
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

async fn openapi() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI_JSON,
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

#[derive(Serialize)]
struct WhoAmI {
    authenticated: bool,
    token_id: Option<String>,
    label: Option<String>,
    perms: Vec<Perm>,
    caches: Option<Vec<String>>,
    server_admin: bool,
    expires_at: Option<i64>,
}

async fn whoami(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<WhoAmI>, ApiError> {
    let p = principal(&state, &headers).await?;
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

/// A cache as the API shows it.
#[derive(Serialize)]
pub struct CacheJson {
    pub name: String,
    pub url: String,
    pub public_key: Option<String>,
    pub private: bool,
    pub priority: i64,
    pub compression: String,
    pub max_size: Option<i64>,
    pub signing_mode: String,
    pub size: i64,
    pub nar_size: i64,
    pub paths: i64,
    /// Whether `size` has passed 85 % of `max_size`.
    pub near_limit: bool,
    /// Keys trusted as upstream for this cache beside the server's (declared in the config).
    pub upstream_keys: Vec<String>,
    /// The nix.conf lines that make Nix substitute from this cache.
    pub nix_conf: String,
    /// The same as a flake's `nixConfig` block.
    pub flake_nix_config: String,
}

pub(crate) async fn cache_json(state: &AppState, c: &CacheRow) -> Result<CacheJson, ApiError> {
    let stats = state.meta.cache_stats(c.id).await?;
    let url = format!("{}/{}", state.config.public_url, c.name);
    let key = c
        .public_key
        .as_ref()
        .map(VerifyingKey::to_string)
        .unwrap_or_default();
    Ok(CacheJson {
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
        paths: stats.paths,
        near_limit: crate::retention::over_warning(c, stats.size),
        upstream_keys: c
            .upstream_keys
            .iter()
            .map(VerifyingKey::to_string)
            .collect(),
    })
}

pub(crate) fn can_see(p: &Principal, c: &CacheRow) -> bool {
    !c.private || p.grant().is_some_and(|g| g.allows(Perm::Pull, &c.name))
}

async fn list_caches(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Vec<CacheJson>>, ApiError> {
    let p = principal(&state, &headers).await?;
    let mut out = Vec::new();
    for c in state.meta.list_caches().await? {
        if can_see(&p, &c) {
            out.push(cache_json(&state, &c).await?);
        }
    }
    Ok(Json(out))
}

/// A cache's storage limit, given as bytes or as text such as "5GiB".
#[derive(Deserialize)]
#[serde(untagged)]
enum SizeArg {
    Bytes(u64),
    Text(String),
}

impl SizeArg {
    fn bytes(&self) -> Result<i64, ApiError> {
        let b = match self {
            SizeArg::Bytes(b) => *b,
            SizeArg::Text(t) => parse_size(t).map_err(|e| ApiError::bad(e.to_string()))?,
        };
        if b == 0 {
            // Not "no limit" (that is null), and a limit of nothing would evict everything.
            return Err(ApiError::bad(
                "max_size must be more than 0: use null (`--max-size none`) to remove the limit",
            ));
        }
        i64::try_from(b).map_err(|_| ApiError::bad("size too large"))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateCache {
    name: String,
    #[serde(default)]
    private: bool,
    priority: Option<i64>,
    compression: Option<String>,
    max_size: Option<SizeArg>,
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
    upstream_keys: Vec<VerifyingKey>,
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
        upstream_keys,
    })
}

async fn create_cache(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<CreateCache>,
) -> Result<(StatusCode, Json<CacheJson>), ApiError> {
    principal(&state, &headers).await?.require_server_admin()?;
    if !valid_cache_name(&req.name) {
        return Err(ApiError::bad(format!(
            "invalid cache name {:?}: use 1-63 of [a-z0-9-], starting with a letter or digit, \
             not one of {}",
            truncate(&req.name),
            crate::RESERVED_NAMES.join(", ")
        )));
    }
    let new = managed_cache(
        &state,
        &req.name,
        req.private,
        req.priority,
        req.compression.as_deref(),
        req.max_size.as_ref().map(SizeArg::bytes).transpose()?,
        Vec::new(),
    )?;
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

async fn cache_info(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    query: Result<Query<CacheInfoQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<CacheJson>, ApiError> {
    let Query(q) = query.map_err(|_| ApiError::bad("settled must be true or false"))?;
    let c = crate::publish::authorized_cache(&state, &headers, &name, Perm::Pull).await?;
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigureCache {
    private: Option<bool>,
    priority: Option<i64>,
    compression: Option<String>,
    /// A size, or null to remove the limit.
    #[serde(default, deserialize_with = "double_option")]
    max_size: Option<Option<SizeArg>>,
}

fn double_option<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<SizeArg>>, D::Error> {
    Ok(Some(Option::deserialize(d)?))
}

async fn configure_cache(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<ConfigureCache>,
) -> Result<Json<CacheJson>, ApiError> {
    crate::publish::authorized_cache(&state, &headers, &name, Perm::Admin).await?;
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
            .map(|m| m.as_ref().map(SizeArg::bytes).transpose())
            .transpose()?,
        client_public_key: None,
        upstream_keys: None,
    };
    let row = state
        .meta
        .update_cache(&name, &update)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no cache named {name:?}")))?;
    state.hot.forget_cache(&name);
    // A new limit holds at once, not at the next upload or collection: `cache info` must not
    // show a cache over its limit.
    if update.max_size.is_some_and(|m| m.is_some()) {
        crate::retention::evict(&state, &row, false).await?;
    }
    let row = state.meta.get_cache(&name).await?.unwrap_or(row);
    Ok(Json(cache_json(&state, &row).await?))
}

async fn delete_cache(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    crate::publish::authorized_cache(&state, &headers, &name, Perm::Admin).await?;
    state.meta.delete_cache(&name).await?;
    // Its scopes ended in the database; tokens resolved here before must not keep them.
    state.hot.forget_tokens();
    state.hot.forget_cache(&name);
    if let Err(e) = crate::publish::collect_garbage(&state).await {
        tracing::warn!(error = %e, "garbage collection after deleting a cache failed");
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterKey {
    public_key: String,
}

/// Switch a cache to client-side signing with this public key (`larder generate-keypair`).
async fn register_public_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<RegisterKey>,
) -> Result<Json<CacheJson>, ApiError> {
    crate::publish::authorized_cache(&state, &headers, &name, Perm::Admin).await?;
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MissingReq {
    /// Store paths (absolute) or their 32-character hash parts.
    paths: Vec<String>,
}

#[derive(Serialize)]
struct MissingResp {
    missing: Vec<String>,
}

async fn missing(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<MissingReq>,
) -> Result<Json<MissingResp>, ApiError> {
    let c = crate::publish::authorized_cache(&state, &headers, &name, Perm::Pull).await?;
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
    Ok(Json(MissingResp {
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
#[derive(Serialize)]
struct UploadResp {
    upload_id: String,
    nar_hash: String,
    nar_size: i64,
    file_hash: String,
    file_size: i64,
    compression: String,
}

impl UploadResp {
    fn from_nar(upload_id: String, nar: larder_store::meta::NarRow) -> Self {
        UploadResp {
            upload_id,
            nar_hash: nar.nar_hash.to_typed_nix32(),
            nar_size: nar.nar_size,
            file_hash: nar.file_hash.to_typed_nix32(),
            file_size: nar.file_size,
            compression: nar.compression.as_str().to_owned(),
        }
    }
}

async fn upload_nar(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    UploadCompression(compression): UploadCompression,
    body: Body,
) -> Result<(StatusCode, Json<UploadResp>), ApiError> {
    let c = crate::publish::authorized_cache(&state, &headers, &name, Perm::Push).await?;
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
    Ok((
        StatusCode::CREATED,
        Json(UploadResp::from_nar(upload_id, nar)),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishReq {
    upload_id: String,
    store_path: String,
    nar_hash: String,
    nar_size: u64,
    #[serde(default)]
    references: Vec<String>,
    deriver: Option<String>,
    ca: Option<String>,
    #[serde(default)]
    sigs: Vec<String>,
    /// Signed metadata of references available upstream (not pushed).
    #[serde(default)]
    upstream: Vec<UpstreamReq>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamReq {
    store_path: String,
    nar_hash: String,
    nar_size: u64,
    #[serde(default)]
    references: Vec<String>,
    #[serde(default)]
    sigs: Vec<String>,
}

#[derive(Serialize)]
struct PublishResp {
    store_path: String,
    status: &'static str,
}

async fn publish_path(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<PublishReq>,
) -> Result<(StatusCode, Json<PublishResp>), ApiError> {
    let c = crate::publish::authorized_cache(&state, &headers, &name, Perm::Push).await?;
    let path = |s: &str| {
        StorePath::from_absolute(s)
            .or_else(|_| StorePath::from_basename(s))
            .map_err(|e| ApiError::bad(format!("invalid store path: {e}")))
    };
    let sig = |s: &String| {
        Signature::parse(s).map_err(|e| ApiError::bad(format!("invalid signature: {e}")))
    };
    let upstream = req
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
    let info = PathInfo {
        upstream,
        store_path: path(&req.store_path)?,
        nar_hash: Sha256::parse(&req.nar_hash)
            .map_err(|e| ApiError::bad(format!("invalid nar_hash: {e}")))?,
        nar_size: req.nar_size,
        references: req
            .references
            .iter()
            .map(|r| path(r))
            .collect::<Result<_, _>>()?,
        deriver: req.deriver.as_deref().map(path).transpose()?,
        ca: req.ca,
        sigs: req
            .sigs
            .iter()
            .map(|s| {
                Signature::parse(s).map_err(|e| ApiError::bad(format!("invalid signature: {e}")))
            })
            .collect::<Result<_, _>>()?,
    };
    let nar = state
        .meta
        .upload_nar(c.id, &req.upload_id)
        .await?
        .ok_or_else(|| {
            ApiError::bad(format!(
                "unknown upload id {:?} (uploads expire after {} hours)",
                truncate(&req.upload_id),
                crate::config::PENDING_UPLOAD_TTL.as_secs() / 3600
            ))
        })?;
    let store_path = info.store_path.to_absolute();
    let outcome = publish(&state, &c, info, &nar, &req.upload_id).await?;
    let (code, status) = match outcome {
        Publish::Created => (StatusCode::CREATED, "created"),
        _ => (StatusCode::OK, "already_present"),
    };
    Ok((code, Json(PublishResp { store_path, status })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    perms: Vec<Perm>,
    /// Caches the token applies to; absent or null: every cache.
    caches: Option<Vec<String>>,
    /// Lifetime such as "30d"; absent: never expires.
    expires_in: Option<String>,
    #[serde(default)]
    label: String,
}

#[derive(Serialize)]
struct TokenJson {
    id: String,
    label: String,
    perms: Vec<String>,
    /// The caches it is scoped to (`None`: every cache).
    caches: Option<Vec<String>>,
    /// Caches it was scoped to that were deleted since: that scope ended with the cache, and
    /// a cache created later under the same name is not in it.
    deleted_caches: Vec<String>,
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
    created_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

fn token_json(t: &TokenRow, secret: Option<String>) -> TokenJson {
    TokenJson {
        id: t.id.clone(),
        label: t.label.clone(),
        perms: t.perms.iter().map(|p| p.as_str().to_owned()).collect(),
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

async fn create_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<CreateToken>,
) -> Result<(StatusCode, Json<TokenJson>), ApiError> {
    principal(&state, &headers).await?.require_server_admin()?;
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

async fn list_tokens(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Vec<TokenJson>>, ApiError> {
    principal(&state, &headers).await?.require_server_admin()?;
    let rows = state.meta.list_tokens().await?;
    Ok(Json(rows.iter().map(|t| token_json(t, None)).collect()))
}

async fn revoke_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    principal(&state, &headers).await?.require_server_admin()?;
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

/// Stream a body into a staging file in `dir` (at most `limit` bytes), returning its path, SHA-256
/// and size.
pub async fn spool_body(
    body: Body,
    limit: u64,
    staging: &crate::staging::Staging,
    dir: &std::path::Path,
) -> Result<(tempfile::TempPath, Sha256, u64), ApiError> {
    let tmp = staging.tempfile("spool", dir).map_err(ApiError::internal)?;
    let (file, path) = tmp.into_parts();
    // Async writes: a serving thread runs many connections and must never block on the disk.
    let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, tokio::fs::File::from_std(file));
    let mut hasher = Sha256Hasher::new();
    let mut size = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(block) = stream.next().await {
        let block = block.map_err(|e| ApiError::bad(format!("upload interrupted: {e}")))?;
        size += block.len() as u64;
        if size > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        hasher.update(&block);
        out.write_all(&block).await.map_err(ApiError::internal)?;
    }
    out.flush().await.map_err(ApiError::internal)?;
    let file = out.into_inner();
    file.sync_all().await.map_err(ApiError::internal)?;
    Ok((path, hasher.finalize(), size))
}
