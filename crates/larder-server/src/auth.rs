//! Tokens and permissions.
//!
//! A token is an opaque random string (`larder_` + 52 nix32 characters = 260 random bits). The
//! server stores only its SHA-256, so a database leak reveals no usable token. Clients send it
//! as `Authorization: Bearer TOKEN`, or as the password of HTTP Basic auth with any user name,
//! which is what Nix sends from a netrc file.
//!
//! Permissions are `pull`, `push` and `admin`, each on a list of caches or on all caches; they
//! nest: `admin` on a cache implies `push` there, and `push` implies `pull`. `admin` on all
//! caches makes a server admin, who alone creates caches and manages tokens.

use axum::http::{header, HeaderMap};
use base64::Engine as _;
use larder_store::meta::TokenRow;
use larder_store::now_unix;
use sha2::Digest;

use crate::error::ApiError;
use crate::AppState;

pub use larder_api::Perm;

/// Who is making a request.
#[derive(Debug, Clone)]
pub enum Principal {
    Anonymous,
    Token(Grant),
}

/// What a valid token may do.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Grant {
    pub id: String,
    pub label: String,
    pub perms: Vec<Perm>,
    /// `None`: every cache.
    pub caches: Option<Vec<String>>,
    pub expires_at: Option<i64>,
}

impl Grant {
    fn from_row(row: &TokenRow) -> Grant {
        Grant {
            id: row.id.clone(),
            label: row.label.clone(),
            perms: row.perms.iter().copied().collect(),
            // An ended scope (a deleted cache) grants nothing.
            caches: row
                .live_caches()
                .map(|c| c.into_iter().map(str::to_owned).collect()),
            expires_at: row.expires_at,
        }
    }

    fn covers(&self, cache: &str) -> bool {
        match &self.caches {
            None => true,
            Some(list) => list.iter().any(|c| c == cache),
        }
    }

    /// Whether this token may do `perm` on `cache` (permissions nest: admin ⊇ push ⊇ pull).
    pub fn allows(&self, perm: Perm, cache: &str) -> bool {
        self.covers(cache) && self.perms.iter().any(|p| *p >= perm)
    }

    pub fn is_server_admin(&self) -> bool {
        self.caches.is_none() && self.perms.contains(&Perm::Admin)
    }
}

impl Principal {
    pub fn grant(&self) -> Option<&Grant> {
        match self {
            Principal::Anonymous => None,
            Principal::Token(g) => Some(g),
        }
    }

    /// Require `perm` on `cache`: 401 for anonymous, 403 for a token that lacks it.
    pub fn require(&self, perm: Perm, cache: &str) -> Result<&Grant, ApiError> {
        match self {
            Principal::Anonymous => Err(ApiError::Unauthorized),
            Principal::Token(g) if g.allows(perm, cache) => Ok(g),
            // Its own caches are the token's to know (and nothing about other caches, not
            // even whether `cache` exists, is said): a misspelt name shows at once.
            Principal::Token(Grant {
                caches: Some(list), ..
            }) if !list.iter().any(|c| c == cache) => Err(ApiError::Forbidden(format!(
                "this token is not valid for cache {cache:?} (only for {}{})",
                list.iter()
                    .take(5)
                    .map(|c| format!("{c:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                if list.len() > 5 { ", …" } else { "" }
            ))),
            Principal::Token(_) => Err(ApiError::Forbidden(format!(
                "this token has no {} permission on cache {cache:?}",
                perm.as_str()
            ))),
        }
    }

    pub fn require_server_admin(&self) -> Result<&Grant, ApiError> {
        match self {
            Principal::Anonymous => Err(ApiError::Unauthorized),
            Principal::Token(g) if g.is_server_admin() => Ok(g),
            Principal::Token(_) => Err(ApiError::Forbidden(
                "this needs a server admin token (admin on all caches)".into(),
            )),
        }
    }
}

/// SHA-256 (hex) of a token: what the database stores and looks up.
pub fn token_hash(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// A fresh random token and its public id.
pub fn new_token() -> Result<(String, String), ApiError> {
    let mut secret = [0u8; 32];
    let mut id = [0u8; 8];
    getrandom::getrandom(&mut secret).map_err(|e| ApiError::internal(std::io::Error::other(e)))?;
    getrandom::getrandom(&mut id).map_err(|e| ApiError::internal(std::io::Error::other(e)))?;
    Ok((
        format!("larder_{}", larder_nix::nixbase32::encode(&secret)),
        hex::encode(id),
    ))
}

/// The token in a request, from `Authorization: Bearer T` or Basic auth's password.
fn token_from_headers(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::InvalidToken("malformed Authorization header"))?;
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Ok(Some(rest.to_owned()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .map_err(|_| ApiError::InvalidToken("malformed Basic credentials"))?;
        let decoded = String::from_utf8(decoded)
            .map_err(|_| ApiError::InvalidToken("malformed Basic credentials"))?;
        let (_user, password) = decoded.split_once(':').unwrap_or(("", &decoded));
        return Ok(Some(password.to_owned()));
    }
    Err(ApiError::InvalidToken(
        "unsupported Authorization scheme (use Bearer or Basic)",
    ))
}

/// Resolve a request's principal. A token that is unknown, revoked or expired is a 401, never
/// silently anonymous: a client that sends credentials wants to know they do not work.
pub async fn principal(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let Some(token) = token_from_headers(headers)? else {
        return Ok(Principal::Anonymous);
    };
    principal_for_token(state, &token).await
}

/// The principal of a token given some other way (the web UI's cookie); errors as
/// [`principal`].
pub async fn principal_for_token(state: &AppState, token: &str) -> Result<Principal, ApiError> {
    if token.is_empty() || token.len() > 256 {
        return Err(ApiError::InvalidToken("invalid token"));
    }
    let hash = token_hash(token);
    let grant = match state.hot.token(&hash) {
        Some(g) => g,
        None => match state.meta.find_token(&hash).await? {
            None => return Err(ApiError::InvalidToken("invalid token")),
            Some(r) if r.revoked_at.is_some() => {
                return Err(ApiError::InvalidToken("token revoked"))
            }
            Some(r) => {
                let g = Grant::from_row(&r);
                state.hot.put_token(&hash, g.clone());
                g
            }
        },
    };
    if grant.expires_at.is_some_and(|t| t <= now_unix()) {
        return Err(ApiError::InvalidToken("token expired"));
    }
    Ok(Principal::Token(grant))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    fn grant(perms: &[Perm], caches: Option<&[&str]>) -> Grant {
        Grant {
            id: "x".into(),
            label: String::new(),
            perms: perms.to_vec(),
            caches: caches.map(|c| c.iter().map(|s| s.to_string()).collect()),
            expires_at: None,
        }
    }

    #[test]
    fn permissions_nest_and_scope() {
        let g = grant(&[Perm::Push], Some(&["a"]));
        assert!(g.allows(Perm::Pull, "a"));
        assert!(g.allows(Perm::Push, "a"));
        assert!(!g.allows(Perm::Admin, "a"));
        assert!(!g.allows(Perm::Pull, "b"));
        assert!(!g.is_server_admin());
        let admin = grant(&[Perm::Admin], None);
        assert!(admin.is_server_admin() && admin.allows(Perm::Push, "anything"));
        assert!(!grant(&[Perm::Admin], Some(&["a"])).is_server_admin());
    }

    #[test]
    fn basic_auth_password_is_the_token() {
        let mut h = HeaderMap::new();
        let creds = base64::engine::general_purpose::STANDARD.encode("nix:secret");
        h.insert(
            header::AUTHORIZATION,
            format!("Basic {creds}").parse().unwrap(),
        );
        assert_eq!(token_from_headers(&h).unwrap().as_deref(), Some("secret"));
        h.insert(header::AUTHORIZATION, "Bearer tok".parse().unwrap());
        assert_eq!(token_from_headers(&h).unwrap().as_deref(), Some("tok"));
        h.insert(header::AUTHORIZATION, "Digest x".parse().unwrap());
        assert!(token_from_headers(&h).is_err());
    }
}
