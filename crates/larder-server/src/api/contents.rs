//! Contents endpoints: `GET /caches/{c}/paths` (the searchable, keyset-paginated path list),
//! `GET /caches/{c}/paths/{path}` (one path: narinfo fields, references, referrers, pins,
//! usage) and `DELETE /caches/{c}/paths/{path}[?with_referrers=true]` (admin on the cache).
//!
//! `{path}` is a store path's hash part, its basename `<hash>-<name>`, or the whole store path
//! (percent-encoded). Reads of a private cache need `pull` and are refused (401/403) before
//! the path is looked at, like the binary cache protocol.

use std::collections::HashSet;

use axum::extract::{Path, Query, State};
use axum::Json;
use larder_api::{PathDetail, PathEntry as PathJson, PathList, PinRef, Reference};
use larder_nix::signing::Signature;
use larder_nix::store_path::{validate_hash_part, StorePath, STORE_DIR};
use larder_store::meta::{CacheRow, PathCursor, PathEntry};
use serde::Deserialize;

use crate::access::{Admin, CacheAccess, Pull};
use crate::error::ApiError;
use crate::ingest::truncate;
use crate::publish::render_narinfo;
use crate::retention::{delete_path as delete, DeleteReport};
use crate::AppState;

/// Paths per page unless `limit` says otherwise.
pub const DEFAULT_PAGE: i64 = 100;
/// The largest page.
pub const MAX_PAGE: i64 = 1000;
/// Longest search text.
const MAX_QUERY: usize = 200;
/// Most direct referrers listed by `path-info` (`referrer_count` has the total).
const MAX_REFERRERS: i64 = 1000;

fn absolute(basename: &str) -> String {
    format!("{STORE_DIR}/{basename}")
}

/// A path as the list shows it.
fn path_json(e: PathEntry) -> PathJson {
    PathJson {
        store_path: absolute(&e.basename()),
        hash: e.hash,
        name: e.name,
        nar_size: e.nar_size,
        file_size: e.file_size,
        compression: e.compression.as_str().to_owned(),
        uploaded_at: e.created_at,
        last_used_at: e.last_used_at,
        upstream: e.upstream,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    /// Substring of the store path's basename `<hash>-<name>` (case-insensitive).
    query: Option<String>,
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// The cache's paths, by name, searchable, keyset-paginated (pull on a private cache).
#[utoipa::path(
    get,
    path = "/caches/{cache}/paths",
    tag = "caches",
    operation_id = "listPaths",
    params(
        crate::api::openapi::CachePath,
        ("query" = Option<String>, Query, description = "Substring of `<hash>-<name>` (case-insensitive).", max_length = 200),
        ("limit" = Option<u64>, Query, description = "Default: 100.", minimum = 1, maximum = 1000),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page."),
    ),
    responses(
        (status = 200, description = "One page.", body = larder_api::PathList),
        crate::api::openapi::CacheRefusals,
    ),
)]
pub(super) async fn list_paths(
    State(state): State<AppState>,
    Path(_name): Path<String>,
    CacheAccess { cache: c, .. }: CacheAccess<Pull>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<PathList>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad(format!("invalid query: {}", e.body_text())))?;
    let page = PageRequest::parse(
        q.query.as_deref(),
        q.cursor.as_deref(),
        q.limit.unwrap_or(DEFAULT_PAGE),
    )?;
    Ok(Json(list_page(&state, &c, &page).await?))
}

/// One page of a path listing, validated: what the API's `ls` and the web UI's path list ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PageRequest {
    /// Search text (trimmed, never empty; a full store path reduced to its basename).
    pub(crate) text: Option<String>,
    /// The page starts after this path.
    pub(crate) after: Option<PathCursor>,
    pub(crate) limit: i64,
}

impl PageRequest {
    /// Check a search text, a cursor (`next_cursor` of the previous page) and a page size.
    pub(crate) fn parse(
        query: Option<&str>,
        cursor: Option<&str>,
        limit: i64,
    ) -> Result<PageRequest, ApiError> {
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(ApiError::bad(format!("limit must be 1 to {MAX_PAGE}")));
        }
        let text = query.map(str::trim).filter(|t| !t.is_empty());
        if text.is_some_and(|t| t.len() > MAX_QUERY) {
            return Err(ApiError::bad(format!(
                "query: at most {MAX_QUERY} characters"
            )));
        }
        // A store path given in full searches for its basename.
        let text = text.map(|t| {
            t.strip_prefix(&format!("{STORE_DIR}/"))
                .unwrap_or(t)
                .to_owned()
        });
        let after = cursor
            .map(|cur| {
                StorePath::from_basename(cur)
                    .map(|p| PathCursor {
                        name: p.name().to_owned(),
                        hash: p.hash_part(),
                    })
                    .map_err(|_| ApiError::bad(format!("invalid cursor {:?}", truncate(cur))))
            })
            .transpose()?;
        Ok(PageRequest { text, after, limit })
    }
}

/// One page of a cache's paths (the caller checked the requester may read the cache).
pub(crate) async fn list_page(
    state: &AppState,
    c: &CacheRow,
    req: &PageRequest,
) -> Result<PathList, ApiError> {
    let text = req.text.as_deref();
    // Show the latest uses, not those of two seconds ago.
    state.retention.usage.flush(&state.meta).await?;
    let mut page = state
        .meta
        .list_paths(c.id, text, req.after.as_ref(), req.limit + 1)
        .await?;
    let more = page.len() as i64 > req.limit;
    page.truncate(req.limit as usize);
    for e in &mut page {
        e.last_used_at = state
            .retention
            .usage
            .last_used(c.id, &e.hash, e.nar_id, e.last_used_at);
    }
    let next_cursor = if more {
        page.last().map(PathEntry::basename)
    } else {
        None
    };
    let total = state.meta.count_paths(c.id, text).await?;
    Ok(PathList {
        paths: page.into_iter().map(path_json).collect(),
        next_cursor,
        total,
    })
}

/// The hash part of a `{path}` argument, and the name it must have if one was given.
fn path_arg(arg: &str) -> Result<(String, Option<String>), ApiError> {
    let invalid = |e: &dyn std::fmt::Display| {
        ApiError::bad(format!("invalid store path {:?}: {e}", truncate(arg)))
    };
    if arg.starts_with('/') {
        let p = StorePath::from_absolute(arg).map_err(|e| invalid(&e))?;
        return Ok((p.hash_part(), Some(p.name().to_owned())));
    }
    if arg.len() == 32 {
        validate_hash_part(arg).map_err(|e| invalid(&e))?;
        return Ok((arg.to_owned(), None));
    }
    let p = StorePath::from_basename(arg).map_err(|e| invalid(&e))?;
    Ok((p.hash_part(), Some(p.name().to_owned())))
}

/// One path: narinfo fields, references, referrers, pins, usage (pull on a private cache).
#[utoipa::path(
    get,
    path = "/caches/{cache}/paths/{path}",
    tag = "caches",
    operation_id = "pathInfo",
    params(
        crate::api::openapi::CachePath,
        ("path" = String, Path, description = "Hash part, basename `<hash>-<name>`, or the whole store path (percent-encoded)."),
    ),
    responses(
        (status = 200, description = "The path.", body = larder_api::PathDetail),
        crate::api::openapi::CacheRefusals,
    ),
)]
pub(super) async fn path_info(
    State(state): State<AppState>,
    Path((_name, arg)): Path<(String, String)>,
    CacheAccess { cache: c, .. }: CacheAccess<Pull>,
) -> Result<Json<PathDetail>, ApiError> {
    Ok(Json(path_detail(&state, &c, &arg).await?))
}

/// Everything known about one path of a cache, named by `arg` (hash part, basename or store
/// path); the caller checked the requester may read the cache.
pub(crate) async fn path_detail(
    state: &AppState,
    c: &CacheRow,
    arg: &str,
) -> Result<PathDetail, ApiError> {
    let (hash, want_name) = path_arg(arg)?;
    let not_found = || ApiError::not_found("no such path in this cache");
    state.retention.usage.flush(&state.meta).await?;
    let path = state
        .meta
        .get_path(c.id, &hash)
        .await?
        .filter(|p| want_name.as_ref().is_none_or(|n| n == p.store_path.name()))
        .ok_or_else(not_found)?;
    let entry = state
        .meta
        .path_entry(c.id, &hash)
        .await?
        .ok_or_else(not_found)?;
    let narinfo = render_narinfo(&path);
    let ref_hashes: Vec<String> = path.refs.iter().map(StorePath::hash_part).collect();
    let missing: HashSet<String> = state
        .meta
        .missing_hashes(c.id, &ref_hashes)
        .await?
        .into_iter()
        .collect();
    let (referrers, referrer_count) = state
        .meta
        .direct_referrers(c.id, &hash, MAX_REFERRERS)
        .await?;
    let pins = state.meta.list_pins(c.id).await?;
    let pinned: Vec<String> = pins
        .iter()
        .map(|p| p.hash.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let holding: HashSet<String> = if pinned.is_empty() {
        HashSet::new()
    } else {
        state
            .meta
            .closures_holding(c.id, &hash, &pinned)
            .await?
            .into_iter()
            .collect()
    };
    let nar = &path.nar;
    Ok(PathDetail {
        store_path: absolute(&entry.basename()),
        url: format!(
            "nar/{}.nar{}",
            nar.file_hash.to_nix32(),
            nar.compression.extension()
        ),
        file_hash: nar.file_hash.to_typed_nix32(),
        file_size: nar.file_size,
        nar_hash: nar.nar_hash.to_typed_nix32(),
        nar_size: nar.nar_size,
        references: path
            .refs
            .iter()
            .zip(&ref_hashes)
            .map(|(r, h)| Reference {
                store_path: r.to_absolute(),
                in_cache: !missing.contains(h),
            })
            .collect(),
        deriver: path.deriver.as_ref().map(StorePath::to_absolute),
        ca: path.ca.clone(),
        sigs: path.sigs.iter().map(Signature::to_string).collect(),
        referrers: referrers.iter().map(|e| absolute(&e.basename())).collect(),
        referrer_count,
        pins: pins
            .into_iter()
            .filter(|p| holding.contains(&p.hash))
            .map(|p| PinRef {
                name: p.name,
                revision: p.revision,
                store_path: p.store_path,
            })
            .collect(),
        uploaded_at: entry.created_at,
        last_used_at: state.retention.usage.last_used(
            c.id,
            &entry.hash,
            entry.nar_id,
            entry.last_used_at,
        ),
        upstream: entry.upstream.clone(),
        narinfo,
        compression: nar.compression.as_str().to_owned(),
        hash: entry.hash,
        name: entry.name,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeleteQuery {
    #[serde(default)]
    with_referrers: bool,
}

/// Delete a path (admin on the cache); refused (409, with `referrers`) while other paths
/// reference it unless with_referrers, and for pinned paths.
#[utoipa::path(
    delete,
    path = "/caches/{cache}/paths/{path}",
    tag = "caches",
    operation_id = "deletePath",
    params(
        crate::api::openapi::CachePath,
        ("path" = String, Path, description = "Hash part, basename `<hash>-<name>`, or the whole store path (percent-encoded)."),
        ("with_referrers" = Option<bool>, Query, description = "Also delete every path that (transitively) references it. Default: false."),
    ),
    responses(
        (status = 200, description = "What was deleted.", body = larder_api::DeleteReport),
        crate::api::openapi::CacheRefusals,
        (status = 409, response = crate::api::openapi::Conflict),
    ),
)]
pub(super) async fn delete_path(
    State(state): State<AppState>,
    Path((_name, arg)): Path<(String, String)>,
    CacheAccess { cache: c, .. }: CacheAccess<Admin>,
    query: Result<Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeleteReport>, ApiError> {
    let Query(q) = query.map_err(|_| ApiError::bad("with_referrers must be true or false"))?;
    let (hash, want_name) = path_arg(&arg)?;
    if let Some(n) = want_name {
        let entry = state.meta.path_entry(c.id, &hash).await?;
        if entry.is_none_or(|e| e.name != n) {
            return Err(ApiError::not_found("no such path in this cache"));
        }
    }
    Ok(Json(delete(&state, &c, &hash, q.with_referrers).await?))
}
