//! CI identity: when no larder token is configured, `larder push` and `larder login --oidc`
//! take the job's OIDC ID token from the CI and trade it with the server for a token that
//! lives at most an hour (`POST /api/v1/oidc/exchange`):
//!
//! - `LARDER_OIDC_TOKEN`: the ID token itself (GitLab CI: `id_tokens: LARDER_OIDC_TOKEN: aud:
//!   …`; Forgejo or any CI that hands one out);
//! - else GitHub Actions' `ACTIONS_ID_TOKEN_REQUEST_URL` and `ACTIONS_ID_TOKEN_REQUEST_TOKEN`
//!   (set for jobs with `permissions: id-token: write`): the token is asked for with the
//!   audience `LARDER_OIDC_AUDIENCE`, by default the server's URL.

use anyhow::Context;
use larder_client::api::TokenInfo;
use larder_client::ApiClient;

use crate::env;
use crate::output::fail_with_hint;

/// Where a CI job's ID token comes from.
enum Source {
    /// `LARDER_OIDC_TOKEN`.
    Raw(String),
    /// GitHub Actions' token endpoint.
    GitHubActions { url: String, token: String },
}

fn source() -> Option<Source> {
    if let Some(t) = env::var(env::OIDC_TOKEN) {
        return Some(Source::Raw(t));
    }
    match (
        env::var("ACTIONS_ID_TOKEN_REQUEST_URL"),
        env::var("ACTIONS_ID_TOKEN_REQUEST_TOKEN"),
    ) {
        (Some(url), Some(token)) => Some(Source::GitHubActions { url, token }),
        _ => None,
    }
}

/// The audience to ask GitHub Actions for: `LARDER_OIDC_AUDIENCE`, else the server's URL.
fn audience(client: &ApiClient) -> String {
    env::var(env::OIDC_AUDIENCE).unwrap_or_else(|| client.base_url().to_owned())
}

/// The ID token of this job, and where it came from; `None` outside CI.
async fn id_token(client: &ApiClient) -> anyhow::Result<Option<(String, &'static str)>> {
    match source() {
        None => Ok(None),
        Some(Source::Raw(t)) => Ok(Some((t, env::OIDC_TOKEN))),
        Some(Source::GitHubActions { url, token }) => {
            let aud = audience(client);
            let t = larder_client::oidc::github_actions_id_token(&url, &token, &aud)
                .await
                .map_err(|e| {
                    fail_with_hint(
                        format!("cannot get the job's ID token from GitHub Actions: {e}"),
                        "give the job `permissions: id-token: write` (and `contents: read`)",
                    )
                })?;
            Ok(Some((t, "ACTIONS_ID_TOKEN_REQUEST_URL")))
        }
    }
}

/// Trade the job's ID token for a larder token of `client`'s server, limited to `caches` when
/// given; `None` when this environment has no ID token.
pub async fn exchange(
    client: &ApiClient,
    caches: Option<Vec<String>>,
) -> anyhow::Result<Option<TokenInfo>> {
    let Some((id_token, from)) = id_token(client).await? else {
        return Ok(None);
    };
    let token = client.oidc_exchange(&id_token, caches).await.map_err(|e| {
        let hint = match e.status() {
            Some(401) => format!(
                "the server names the reason above; its [[oidc.issuers]] must trust this \
                     issuer with the audience the token carries (GitHub Actions: \
                     LARDER_OIDC_AUDIENCE, default {}), and one of its rules must match this \
                     job's claims",
                client.base_url()
            ),
            _ => "check that the server is reachable and has `[oidc]` configured".into(),
        };
        fail_with_hint(
            format!("the server refused the CI job's ID token (from {from}): {e}"),
            hint,
        )
    })?;
    Ok(Some(token))
}

/// `client`, or, when it has no token and the environment has an ID token, a client with the
/// token the server traded for it (limited to `cache`).
pub async fn unless_token(client: ApiClient, cache: &str) -> anyhow::Result<ApiClient> {
    if client.token().is_some() {
        return Ok(client);
    }
    let Some(token) = exchange(&client, Some(vec![cache.to_owned()])).await? else {
        return Ok(client);
    };
    let secret = token
        .token
        .context("the server's answer to the OIDC exchange holds no token")?;
    eprintln!(
        "larder: authenticated with the CI job's OIDC ID token: token {} ({} on {}){}",
        token.id,
        larder_client::api::Perm::join(&token.perms, "+"),
        token.caches.unwrap_or_default().join(", "),
        token
            .expires_at
            .map(|t| format!(", expires in {}s", t - now()))
            .unwrap_or_default()
    );
    Ok(client.with_token(secret))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// `larder login URL --oidc`: the token traded for the job's ID token; an error when the
/// environment has none.
pub async fn login_token(
    client: &ApiClient,
    caches: Option<Vec<String>>,
) -> anyhow::Result<TokenInfo> {
    exchange(client, caches).await?.ok_or_else(|| {
        fail_with_hint(
            "--oidc: no OIDC ID token in the environment",
            "set LARDER_OIDC_TOKEN to the job's ID token (GitLab CI: `id_tokens:`), or run in a \
             GitHub Actions job with `permissions: id-token: write`",
        )
    })
}
