//! `POST /oidc/exchange`: a CI job's OIDC ID token for a short-lived larder token.
//!
//! The ID token is verified ([`crate::oidc`]); the rules of its issuer whose claims all match
//! decide what the new token may do; the token lives `oidc.max_lifetime` (at most an hour), is
//! labelled with the claims that identify the job, and is an ordinary token from then on
//! (`token list`, `token revoke`). Every refusal is a 401 naming its reason, and creates
//! nothing.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use larder_api::{OidcExchange, Perm, Token};
use larder_store::meta::{CacheScope, TokenRow};
use larder_store::now_unix;
use serde_json::{Map, Value};

use super::{token_json, JsonBody};
use crate::auth::{new_token, token_hash};
use crate::config::TrustedIssuer;
use crate::error::ApiError;
use crate::oidc::{shorten, OidcError};
use crate::AppState;

/// Claims shown in a token's label when present, besides those the matching rules name: they
/// tell which job made it (GitHub Actions' and GitLab CI's names).
const LABEL_CLAIMS: &[&str] = &["run_id", "pipeline_id", "job_id"];
/// Longest label written.
const MAX_LABEL: usize = 300;

/// Exchange a CI job's OIDC ID token for a short-lived token.
///
/// Needs no larder token: the ID token, signed by an issuer the server trusts (`[oidc]` in its
/// configuration), is the credential. The answer is a token (with its secret) that may do what
/// the issuer's matching rules grant, expiring within `oidc.max_lifetime` (at most an hour). A
/// wrong audience or issuer, an expired or unsigned token (`alg: none`), a shared-secret
/// algorithm (`HS256`), an unknown key id and claims that match no rule are each a 401 whose
/// `error` names the reason.
#[utoipa::path(
    post,
    path = "/oidc/exchange",
    tag = "tokens",
    operation_id = "oidcExchange",
    security(()),
    request_body = larder_api::OidcExchange,
    responses(
        (status = 201, description = "The new token, with `token`.", body = larder_api::Token),
        (status = 400, response = crate::api::openapi::BadRequest),
        (status = 401, response = crate::api::openapi::Unauthorized),
    ),
)]
pub(super) async fn exchange(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<OidcExchange>,
) -> Result<(StatusCode, Json<Token>), ApiError> {
    let issuers = &state.config.oidc.issuers;
    let verified = state
        .oidc
        .verify(issuers, &req.token)
        .await
        .map_err(refusal)?;
    let mut granted = grants(verified.issuer, &verified.claims);
    if granted.is_empty() {
        return Err(refused(format!(
            "no matching rule: no rule of issuer {} grants anything to this token ({})",
            verified.issuer.issuer,
            describe(verified.issuer, &verified.claims)
        )));
    }
    if let Some(wanted) = &req.caches {
        granted.retain(|c, _| wanted.contains(c));
        if granted.is_empty() {
            return Err(refused(format!(
                "no matching rule grants this token anything on {} ({})",
                wanted
                    .iter()
                    .map(|c| shorten(c))
                    .collect::<Vec<_>>()
                    .join(", "),
                describe(verified.issuer, &verified.claims)
            )));
        }
    }
    // A rule may name a cache that is not there (yet): a scope naming it would grant nothing
    // now, and a cache created later under that name must not be reached by this token.
    let mut existing = BTreeMap::new();
    for (cache, perm) in granted {
        if state.meta.get_cache(&cache).await?.is_some() {
            existing.insert(cache, perm);
        }
    }
    // One token has one set of permissions over its caches: the highest permission granted,
    // on the caches granted it (ask with `caches` for the others).
    let Some(perm) = existing.values().max().copied() else {
        return Err(refused(format!(
            "the rules matching this token grant only caches that do not exist ({})",
            describe(verified.issuer, &verified.claims)
        )));
    };
    let caches: Vec<String> = existing
        .into_iter()
        .filter(|(_, p)| *p == perm)
        .map(|(c, _)| c)
        .collect();
    let lifetime = state.config.oidc.max_lifetime.as_secs() as i64;
    let (secret, id) = new_token()?;
    let row = TokenRow {
        id,
        secret_hash: token_hash(&secret),
        label: label(verified.issuer, &verified.claims),
        perms: [perm].into_iter().collect(),
        caches: Some(caches.into_iter().map(CacheScope::Cache).collect()),
        expires_at: Some(now_unix().saturating_add(lifetime)),
        revoked_at: None,
        created_at: now_unix(),
    };
    state.meta.create_token(&row).await?;
    tracing::info!(token = %row.id, label = %row.label, "OIDC exchange: token created");
    Ok((StatusCode::CREATED, Json(token_json(&row, Some(secret)))))
}

fn refused(reason: String) -> ApiError {
    tracing::info!(%reason, "OIDC exchange refused");
    ApiError::OidcRefused(reason)
}

fn refusal(e: OidcError) -> ApiError {
    match e {
        OidcError::IssuerUnreachable { .. } => {
            tracing::warn!("OIDC exchange: {e}");
            ApiError::OidcIssuerUnavailable(e.to_string())
        }
        e => refused(e.to_string()),
    }
}

/// Each cache the matching rules of `issuer` grant, with the highest permission granted there.
fn grants(issuer: &TrustedIssuer, claims: &Map<String, Value>) -> BTreeMap<String, Perm> {
    let mut out: BTreeMap<String, Perm> = BTreeMap::new();
    for rule in issuer.rules.iter().filter(|r| r.matches(claims)) {
        for cache in &rule.caches {
            let p = out.entry(cache.clone()).or_insert(rule.perm);
            *p = (*p).max(rule.perm);
        }
    }
    out
}

/// The claims that say who the token is: `sub`, those the issuer's rules look at, and a job's
/// id, as `name=value` pairs.
fn identity(issuer: &TrustedIssuer, claims: &Map<String, Value>) -> Vec<String> {
    let mut names: Vec<&str> = vec!["sub"];
    for rule in &issuer.rules {
        for (name, _) in &rule.claims {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    names.extend(LABEL_CLAIMS.iter().copied());
    let mut seen = Vec::new();
    names
        .into_iter()
        .filter(|n| {
            let new = !seen.contains(n);
            seen.push(*n);
            new
        })
        .filter_map(|n| {
            let v = match claims.get(n)? {
                Value::String(s) => s.clone(),
                v @ (Value::Number(_) | Value::Bool(_)) => v.to_string(),
                _ => return None,
            };
            Some(format!("{n}={}", shorten(&v)))
        })
        .collect()
}

fn describe(issuer: &TrustedIssuer, claims: &Map<String, Value>) -> String {
    identity(issuer, claims).join(", ")
}

/// `oidc sub=… repository=… ref=… run_id=… (ISSUER)`, at most [`MAX_LABEL`] characters.
fn label(issuer: &TrustedIssuer, claims: &Map<String, Value>) -> String {
    let text = format!(
        "oidc {} ({})",
        identity(issuer, claims).join(" "),
        issuer.issuer
    );
    text.chars()
        .filter(|c| !c.is_control())
        .take(MAX_LABEL)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;
    use crate::config::{ClaimPattern, Rule};

    #[test]
    fn the_highest_permission_per_cache_and_a_label_of_the_claims() {
        let rule = |claims: &[(&str, &str)], perm, caches: &[&str]| Rule {
            claims: claims
                .iter()
                .map(|(k, v)| (k.to_string(), ClaimPattern::new(*v)))
                .collect(),
            perm,
            caches: caches.iter().map(|c| c.to_string()).collect(),
        };
        let issuer = TrustedIssuer {
            issuer: "https://token.actions.githubusercontent.com".into(),
            audience: "https://cache".into(),
            rules: vec![
                rule(&[("repository", "o/*")], Perm::Pull, &["a", "b"]),
                rule(
                    &[("repository", "o/r"), ("ref", "refs/heads/main")],
                    Perm::Push,
                    &["a"],
                ),
                rule(&[("repository", "x/y")], Perm::Push, &["c"]),
            ],
        };
        let claims = serde_json::json!({
            "sub": "repo:o/r:ref:refs/heads/main", "repository": "o/r",
            "ref": "refs/heads/main", "run_id": "42", "aud": "https://cache",
        });
        let claims = claims.as_object().unwrap();
        let g = grants(&issuer, claims);
        assert_eq!(g.get("a"), Some(&Perm::Push));
        assert_eq!(g.get("b"), Some(&Perm::Pull));
        assert_eq!(g.get("c"), None);
        assert_eq!(
            label(&issuer, claims),
            "oidc sub=repo:o/r:ref:refs/heads/main repository=o/r ref=refs/heads/main \
             run_id=42 (https://token.actions.githubusercontent.com)"
        );
        let mut other = claims.clone();
        other.insert("ref".into(), "refs/heads/dev".into());
        assert_eq!(grants(&issuer, &other).get("a"), Some(&Perm::Pull));
    }
}
