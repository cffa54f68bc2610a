//! Authorization as extractors: a handler's signature says what it needs, and this module
//! alone decides whether the request has it.
//!
//! - [`Caller`]: who is asking (anonymous, or a valid token; a bad token is a 401).
//! - [`ServerAdmin`]: a token with admin on every cache (401 anonymous, 403 otherwise).
//! - [`CacheAccess<P>`]: the cache named by the route's `{cache}` segment, loaded, and the
//!   permission `P` ([`Pull`], [`Push`] or [`Admin`]) on it. Reading a public cache needs no
//!   token. Who lacks the permission is refused the same way whether or not the cache exists
//!   (401 or 403 before the 404), so a private cache is indistinguishable from a missing one.
//!
//! A handler that must report a malformed body or query before a refusal (as the API always
//! has) takes `Result<CacheAccess<P>, ApiError>` and applies `?` after checking its input.

use std::marker::PhantomData;
use std::sync::Arc;

use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use larder_store::meta::CacheRow;

use crate::auth::{principal, Grant, Perm, Principal};
use crate::error::ApiError;
use crate::AppState;

/// Who is making the request.
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Ok(Caller(principal(state, &parts.headers).await?))
    }
}

/// A server admin's token (admin on all caches): who alone creates caches and manages tokens.
pub struct ServerAdmin(pub Grant);

impl FromRequestParts<AppState> for ServerAdmin {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Caller(p) = Caller::from_request_parts(parts, state).await?;
        Ok(ServerAdmin(p.require_server_admin()?.clone()))
    }
}

/// A permission a handler needs on its cache, as a type.
pub trait Permission: Send + Sync + 'static {
    const PERM: Perm;
}

/// Read the cache (narinfos, NARs, contents, statistics).
pub struct Pull;
/// Upload to the cache, and manage its pins.
pub struct Push;
/// Configure, collect, delete paths of or delete the cache.
pub struct Admin;

impl Permission for Pull {
    const PERM: Perm = Perm::Pull;
}
impl Permission for Push {
    const PERM: Perm = Perm::Push;
}
impl Permission for Admin {
    const PERM: Perm = Perm::Admin;
}

/// The route's `{cache}`, loaded, on which the request has permission `P`.
pub struct CacheAccess<P: Permission> {
    pub cache: Arc<CacheRow>,
    need: PhantomData<P>,
}

impl<P: Permission> FromRequestParts<AppState> for CacheAccess<P> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad(e.body_text()))?;
        let Some((_, name)) = params.iter().find(|(k, _)| *k == "cache") else {
            return Err(ApiError::internal(std::io::Error::other(
                "CacheAccess on a route without a {cache} segment",
            )));
        };
        let cache = authorized_cache(state, &parts.headers, name, P::PERM).await?;
        Ok(CacheAccess {
            cache,
            need: PhantomData,
        })
    }
}

/// Load cache `name` and check the requester may `perm` it (pull on a public cache needs
/// nothing).
///
/// A cache that does not exist answers like a private one to whoever could not read a private
/// cache of that name (401 anonymous, 403 a token scoped elsewhere): nobody learns which
/// private caches exist by comparing the answers. Only a token that covers every cache
/// (which would read it if it existed) is told 404.
pub(crate) async fn authorized_cache(
    state: &AppState,
    headers: &HeaderMap,
    name: &str,
    perm: Perm,
) -> Result<Arc<CacheRow>, ApiError> {
    let Some(cache) = crate::cache_lookup::find_cache(state, name).await? else {
        principal(state, headers).await?.require(perm, name)?;
        return Err(ApiError::not_found(format!("no cache named {name:?}")));
    };
    if perm == Perm::Pull && !cache.private {
        return Ok(cache);
    }
    principal(state, headers)
        .await?
        .require(perm, &cache.name)?;
    Ok(cache)
}

/// Whether `p` may see cache `c` at all (in lists, the web UI, `/metrics`): it is public, or
/// `p` may pull it.
pub(crate) fn can_see(p: &Principal, c: &CacheRow) -> bool {
    !c.private || p.grant().is_some_and(|g| g.allows(Perm::Pull, &c.name))
}
