//! A typed client of the server's JSON API (`/api/v1`), shared by every CLI verb.
//!
//! Errors keep what the server said (`{"error": "…"}`) and the HTTP status, so the CLI can
//! print the server's reason and a hint that fits the status.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server URL {0:?} (expected http://HOST:PORT or https://…)")]
    InvalidUrl(String),
    #[error("cannot reach the server at {url}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the server answered {status}: {message}")]
    Status {
        status: u16,
        message: String,
        /// The server's `Retry-After`, when it sent one.
        retry_after: Option<std::time::Duration>,
    },
    #[error("cannot use the CA certificates of {var}={path}: {reason}")]
    CaFile {
        var: &'static str,
        path: String,
        reason: String,
    },
    #[error("unexpected answer from the server for {what}")]
    Decode {
        what: String,
        #[source]
        source: reqwest::Error,
    },
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The server is away or overloaded (unreachable, 429, or a 5xx other than 501 Not
    /// Implemented and 507 Insufficient Storage), as opposed to refusing the request: worth
    /// retrying, after `Retry-After` when it sent one.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } => true,
            ClientError::Status { status, .. } => {
                *status == 429 || (*status >= 500 && *status != 507 && *status != 501)
            }
            _ => false,
        }
    }
}

type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A client of one server, with an optional token.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheInfo {
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
    /// Whether `size` has passed 85 % of `max_size` (older servers: absent, false).
    #[serde(default)]
    pub near_limit: bool,
    /// Keys the cache trusts as upstream beside the server's (older servers: absent, none).
    #[serde(default)]
    pub upstream_keys: Vec<String>,
    pub nix_conf: String,
    /// The same as a flake `nixConfig` block (older servers: absent, empty).
    #[serde(default)]
    pub flake_nix_config: String,
}

/// One path of a cache's contents list.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathEntry {
    pub store_path: String,
    pub hash: String,
    pub name: String,
    pub nar_size: i64,
    /// Stored (compressed) bytes.
    pub file_size: i64,
    pub compression: String,
    pub uploaded_at: i64,
    /// `None`: never fetched.
    pub last_used_at: Option<i64>,
}

/// One page of a cache's contents.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathList {
    pub paths: Vec<PathEntry>,
    /// Where the next page starts; `None` on the last page.
    pub next_cursor: Option<String>,
    /// Paths matching the query, on every page.
    pub total: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reference {
    pub store_path: String,
    /// False for a reference accepted as available upstream.
    pub in_cache: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinRef {
    pub name: String,
    pub revision: i64,
    /// The pinned path whose closure holds the path.
    pub store_path: String,
}

/// One path of a cache in detail (`larder path-info`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathDetail {
    pub store_path: String,
    pub hash: String,
    pub name: String,
    pub url: String,
    pub compression: String,
    pub file_hash: String,
    pub file_size: i64,
    pub nar_hash: String,
    pub nar_size: i64,
    pub references: Vec<Reference>,
    pub deriver: Option<String>,
    pub ca: Option<String>,
    pub sigs: Vec<String>,
    pub referrers: Vec<String>,
    pub referrer_count: i64,
    pub pins: Vec<PinRef>,
    pub uploaded_at: i64,
    pub last_used_at: Option<i64>,
    pub narinfo: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeletedPath {
    pub store_path: String,
    pub file_size: i64,
}

/// What `larder path delete` removed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeleteReport {
    pub cache: String,
    pub deleted: Vec<DeletedPath>,
    pub freed: i64,
}

/// An unfinished multi-part upload on the server (`GET /caches/{c}/multipart`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MultipartUpload {
    pub upload_id: String,
    pub compression: String,
    /// The NAR it was opened for (`sha256:<nix32>`), when the client said.
    pub nar_hash: Option<String>,
    pub nar_size: Option<u64>,
    pub part_count: usize,
    /// Stored (compressed) bytes of its parts.
    pub part_bytes: u64,
    pub updated_at: i64,
    pub expires_at: i64,
}

/// One stored part of a multi-part upload, as the server measured it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MultipartPart {
    pub n: u32,
    pub file_size: u64,
    pub file_hash: String,
    /// The NAR bytes it decompresses to on its own; `None` when it does not.
    pub nar_size: Option<u64>,
    pub nar_hash: Option<String>,
}

/// A multi-part upload with its parts (`GET /caches/{c}/multipart/{id}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MultipartDetail {
    #[serde(flatten)]
    pub upload: MultipartUpload,
    pub parts: Vec<MultipartPart>,
}

/// Percent-encoding of one URL path segment (store path names may hold `?`, `=` or `+`).
use larder_nix::url::encode_component as segment;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub label: String,
    pub perms: Vec<String>,
    pub caches: Option<Vec<String>>,
    /// Caches it was scoped to that were deleted since (that scope ended).
    #[serde(default)]
    pub deleted_caches: Vec<String>,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub created_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WhoAmI {
    pub authenticated: bool,
    pub token_id: Option<String>,
    pub label: Option<String>,
    pub perms: Vec<String>,
    pub caches: Option<Vec<String>>,
    pub server_admin: bool,
    pub expires_at: Option<i64>,
}

impl WhoAmI {
    /// Whether the token grants `perm` (`pull`, `push` or `admin`; each includes the ones
    /// before it) on `cache`, as the server decides.
    pub fn grants(&self, perm: &str, cache: &str) -> bool {
        const LEVELS: [&str; 3] = ["pull", "push", "admin"];
        let level = |p: &str| LEVELS.iter().position(|l| *l == p);
        let Some(wanted) = level(perm) else {
            return false;
        };
        self.server_admin
            || (self
                .perms
                .iter()
                .any(|p| level(p).is_some_and(|l| l >= wanted))
                && self
                    .caches
                    .as_ref()
                    .is_none_or(|c| c.iter().any(|c| c == cache)))
    }
}

/// The variables naming a PEM bundle of CA certificates, in the order Nix reads them (its
/// `ssl-cert-file` defaults to the first one set): a server whose certificate a private CA
/// signed is trusted by larder as by Nix.
pub const CA_FILE_VARS: [&str; 2] = ["NIX_SSL_CERT_FILE", "SSL_CERT_FILE"];

/// A `reqwest` client builder trusting the usual web roots and, when [`CA_FILE_VARS`] name
/// one, the certificates of that file.
pub fn http_builder() -> Result<reqwest::ClientBuilder> {
    let mut builder = reqwest::Client::builder();
    let Some((var, path)) = CA_FILE_VARS.iter().find_map(|v| {
        std::env::var(v)
            .ok()
            .filter(|p| !p.is_empty())
            .map(|p| (*v, p))
    }) else {
        return Ok(builder);
    };
    let err = |reason: String| ClientError::CaFile {
        var,
        path: path.clone(),
        reason,
    };
    let pem = std::fs::read(&path).map_err(|e| err(e.to_string()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in it".into()));
    }
    for cert in certs {
        builder = builder.add_root_certificate(cert);
    }
    Ok(builder)
}

impl ApiClient {
    pub fn new(base: &str, token: Option<String>) -> Result<Self> {
        let base = base.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) || base.len() < 10 {
            return Err(ClientError::InvalidUrl(base));
        }
        let http = http_builder()?
            .user_agent(concat!("larder/", env!("CARGO_PKG_VERSION")))
            .tcp_nodelay(true)
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|source| ClientError::Unreachable {
                url: base.clone(),
                source,
            })?;
        Ok(ApiClient { base, token, http })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The token this client sends, if any (`larder use` writes it into a netrc for Nix).
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// A request to `path` (relative to the server root) with the token attached.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, format!("{}{}", self.base, path));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// Send, and turn a non-2xx answer into [`ClientError::Status`] with the server's reason.
    pub async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = rb.send().await.map_err(|source| ClientError::Unreachable {
            url: self.base.clone(),
            source,
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(std::time::Duration::from_secs);
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| {
                let t = text.trim();
                if t.is_empty() {
                    status.canonical_reason().unwrap_or("error").to_owned()
                } else {
                    t.chars().take(300).collect()
                }
            });
        Err(ClientError::Status {
            status: status.as_u16(),
            message,
            retry_after,
        })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        rb: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<T> {
        let resp = self.send(rb).await?;
        resp.json().await.map_err(|source| ClientError::Decode {
            what: what.to_owned(),
            source,
        })
    }

    pub async fn whoami(&self) -> Result<WhoAmI> {
        self.json(
            self.request(reqwest::Method::GET, "/api/v1/whoami"),
            "whoami",
        )
        .await
    }

    /// GET `/<cache>/nix-cache-info` (what Nix checks first).
    pub async fn nix_cache_info(&self, cache: &str) -> Result<String> {
        let resp = self
            .send(self.request(reqwest::Method::GET, &format!("/{cache}/nix-cache-info")))
            .await?;
        resp.text().await.map_err(|source| ClientError::Decode {
            what: "nix-cache-info".into(),
            source,
        })
    }

    /// GET `/<cache>/<hash>.narinfo`: its text, or `None` when the cache does not have it.
    pub async fn narinfo(&self, cache: &str, hash: &str) -> Result<Option<String>> {
        match self
            .send(self.request(reqwest::Method::GET, &format!("/{cache}/{hash}.narinfo")))
            .await
        {
            Ok(resp) => resp
                .text()
                .await
                .map(Some)
                .map_err(|source| ClientError::Decode {
                    what: "narinfo".into(),
                    source,
                }),
            Err(ClientError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn list_caches(&self) -> Result<Vec<CacheInfo>> {
        self.json(
            self.request(reqwest::Method::GET, "/api/v1/caches"),
            "cache list",
        )
        .await
    }

    /// [`ApiClient::cache_info`] once the evictions that uploads to the cache triggered on the
    /// server are done (`?settled=true`).
    pub async fn cache_info_settled(&self, name: &str) -> Result<CacheInfo> {
        self.json(
            self.request(
                reqwest::Method::GET,
                &format!("/api/v1/caches/{name}?settled=true"),
            ),
            "cache info",
        )
        .await
    }

    pub async fn cache_info(&self, name: &str) -> Result<CacheInfo> {
        self.json(
            self.request(reqwest::Method::GET, &format!("/api/v1/caches/{name}")),
            "cache info",
        )
        .await
    }

    /// Create a cache. `body` holds `name`, `private`, `priority`, `compression`, `max_size`.
    pub async fn create_cache(&self, body: &Value) -> Result<CacheInfo> {
        self.json(
            self.request(reqwest::Method::POST, "/api/v1/caches")
                .json(body),
            "cache create",
        )
        .await
    }

    pub async fn configure_cache(&self, name: &str, body: &Value) -> Result<CacheInfo> {
        self.json(
            self.request(reqwest::Method::PATCH, &format!("/api/v1/caches/{name}"))
                .json(body),
            "cache configure",
        )
        .await
    }

    pub async fn delete_cache(&self, name: &str) -> Result<()> {
        self.send(self.request(reqwest::Method::DELETE, &format!("/api/v1/caches/{name}")))
            .await?;
        Ok(())
    }

    pub async fn create_token(&self, body: &Value) -> Result<TokenInfo> {
        self.json(
            self.request(reqwest::Method::POST, "/api/v1/tokens")
                .json(body),
            "token create",
        )
        .await
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>> {
        self.json(
            self.request(reqwest::Method::GET, "/api/v1/tokens"),
            "token list",
        )
        .await
    }

    /// One page of a cache's paths, by name: those whose `<hash>-<name>` contains `query`,
    /// after `cursor` (the previous page's `next_cursor`).
    pub async fn list_paths(
        &self,
        cache: &str,
        query: Option<&str>,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<PathList> {
        let mut params: Vec<(&str, String)> = Vec::new();
        if let Some(q) = query {
            params.push(("query", q.to_owned()));
        }
        if let Some(l) = limit {
            params.push(("limit", l.to_string()));
        }
        if let Some(c) = cursor {
            params.push(("cursor", c.to_owned()));
        }
        self.json(
            self.request(
                reqwest::Method::GET,
                &format!("/api/v1/caches/{cache}/paths"),
            )
            .query(&params),
            "path list",
        )
        .await
    }

    /// A path of a cache: `path` is its hash part, basename or store path.
    pub async fn path_info(&self, cache: &str, path: &str) -> Result<PathDetail> {
        self.json(
            self.request(
                reqwest::Method::GET,
                &format!("/api/v1/caches/{cache}/paths/{}", segment(path)),
            ),
            "path info",
        )
        .await
    }

    /// Delete a path of a cache (and, with `with_referrers`, every path referencing it).
    pub async fn delete_path(
        &self,
        cache: &str,
        path: &str,
        with_referrers: bool,
    ) -> Result<DeleteReport> {
        self.json(
            self.request(
                reqwest::Method::DELETE,
                &format!(
                    "/api/v1/caches/{cache}/paths/{}?with_referrers={with_referrers}",
                    segment(path)
                ),
            ),
            "path delete",
        )
        .await
    }

    /// The cache's unfinished multi-part uploads of the NAR with this hash (`sha256:…`) and
    /// size, most recently written first (needs push permission).
    pub async fn multipart_uploads(
        &self,
        cache: &str,
        nar_hash: &str,
        nar_size: u64,
    ) -> Result<Vec<MultipartUpload>> {
        #[derive(Deserialize)]
        struct List {
            uploads: Vec<MultipartUpload>,
        }
        let list: List = self
            .json(
                self.request(
                    reqwest::Method::GET,
                    &format!("/api/v1/caches/{cache}/multipart"),
                )
                .query(&[("nar_hash", nar_hash), ("nar_size", &nar_size.to_string())]),
                "multi-part upload list",
            )
            .await?;
        Ok(list.uploads)
    }

    /// A multi-part upload with every stored part measured by the server.
    pub async fn multipart_upload(&self, cache: &str, id: &str) -> Result<MultipartDetail> {
        self.json(
            self.request(
                reqwest::Method::GET,
                &format!("/api/v1/caches/{cache}/multipart/{id}"),
            ),
            "multi-part upload",
        )
        .await
    }

    /// Abandon a multi-part upload (its parts are deleted).
    pub async fn abort_multipart(&self, cache: &str, id: &str) -> Result<()> {
        self.send(self.request(
            reqwest::Method::DELETE,
            &format!("/api/v1/caches/{cache}/multipart/{id}"),
        ))
        .await?;
        Ok(())
    }

    pub async fn revoke_token(&self, id: &str) -> Result<()> {
        self.send(self.request(reqwest::Method::DELETE, &format!("/api/v1/tokens/{id}")))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(perms: &[&str], caches: Option<&[&str]>, server_admin: bool) -> WhoAmI {
        WhoAmI {
            authenticated: true,
            token_id: None,
            label: None,
            perms: perms.iter().map(|p| p.to_string()).collect(),
            caches: caches.map(|c| c.iter().map(|c| c.to_string()).collect()),
            server_admin,
            expires_at: None,
        }
    }

    #[test]
    fn permissions_include_the_lesser_ones_within_their_caches() {
        let push_a = who(&["push"], Some(&["a"]), false);
        assert!(push_a.grants("pull", "a") && push_a.grants("push", "a"));
        assert!(!push_a.grants("admin", "a") && !push_a.grants("pull", "b"));
        let pull_all = who(&["pull"], None, false);
        assert!(pull_all.grants("pull", "any") && !pull_all.grants("push", "any"));
        assert!(who(&["admin"], None, true).grants("admin", "any"));
        assert!(!who(&[], None, false).grants("pull", "a"));
        assert!(!push_a.grants("sudo", "a"));
    }

    #[test]
    fn transient_failures_are_outages_not_refusals() {
        let status = |status| ClientError::Status {
            status,
            message: String::new(),
            retry_after: None,
        };
        for s in [429, 500, 502, 503] {
            assert!(status(s).is_transient(), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 501, 507] {
            assert!(!status(s).is_transient(), "{s}");
        }
    }
}
