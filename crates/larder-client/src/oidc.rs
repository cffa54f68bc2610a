//! CI identity on the client side: an OIDC ID token fetched from GitHub Actions' token
//! endpoint ([`github_actions_id_token`]), and traded with the server for a short-lived larder
//! token ([`ApiClient::oidc_exchange`], `POST /api/v1/oidc/exchange`). Which variables hold
//! what is the binary's business (`larder`'s `oidc_login.rs`).

use larder_api::OidcExchange;

use crate::api::{ApiClient, ClientError, TokenInfo};

/// Why no ID token could be had from GitHub Actions.
#[derive(Debug, thiserror::Error)]
pub enum IdTokenError {
    #[error("invalid ACTIONS_ID_TOKEN_REQUEST_URL {0:?}")]
    InvalidUrl(String),
    #[error("cannot reach GitHub Actions' ID token endpoint")]
    Unreachable(#[source] reqwest::Error),
    #[error("GitHub Actions' ID token endpoint answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("GitHub Actions' ID token endpoint answered without a token (no \"value\")")]
    NoToken,
}

#[derive(serde::Deserialize)]
struct ActionsToken {
    value: Option<String>,
}

/// GitHub Actions' ID token for `audience`: `GET request_url&audience=AUDIENCE` with the job's
/// request token as bearer, answered `{"value": "eyJ…"}` (what `core.getIDToken()` does; the
/// job needs `permissions: id-token: write`).
pub async fn github_actions_id_token(
    request_url: &str,
    request_token: &str,
    audience: &str,
) -> Result<String, IdTokenError> {
    let mut url = reqwest::Url::parse(request_url)
        .map_err(|_| IdTokenError::InvalidUrl(request_url.chars().take(200).collect()))?;
    url.query_pairs_mut().append_pair("audience", audience);
    let http = crate::api::http_builder()
        .map_err(|_| IdTokenError::InvalidUrl(request_url.chars().take(200).collect()))?
        .user_agent(concat!("larder/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(IdTokenError::Unreachable)?;
    let resp = http
        .get(url)
        .bearer_auth(request_token)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(IdTokenError::Unreachable)?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Err(IdTokenError::Status {
            status: status.as_u16(),
            message: text.trim().chars().take(300).collect(),
        });
    }
    let body: ActionsToken = resp.json().await.map_err(IdTokenError::Unreachable)?;
    body.value
        .filter(|v| !v.is_empty())
        .ok_or(IdTokenError::NoToken)
}

impl ApiClient {
    /// Trade `id_token` for a larder token (its secret in `token`), limited to `caches` when
    /// given. Needs no token of its own.
    pub async fn oidc_exchange(
        &self,
        id_token: &str,
        caches: Option<Vec<String>>,
    ) -> Result<TokenInfo, ClientError> {
        let body = OidcExchange {
            token: id_token.trim().to_owned(),
            caches,
        };
        let rb = self
            .http()
            .post(format!("{}/api/v1/oidc/exchange", self.base_url()))
            .json(&body);
        let resp = self.send(rb).await?;
        resp.json().await.map_err(|source| ClientError::Decode {
            what: "oidc exchange".into(),
            source,
        })
    }

    /// This client with `token` instead of its own.
    pub fn with_token(&self, token: String) -> ApiClient {
        let mut c = self.clone();
        c.set_token(token);
        c
    }
}
