//! A typed client of the server's JSON API (`/api/v1`), shared by every CLI verb.
//!
//! Requests and answers are `larder-api`'s types, the ones the server uses: a field renamed on
//! one side fails to compile, or fails to decode with the endpoint named, never reads as 0.
//! Errors keep what the server said (`{"error": "…"}`) and the HTTP status, so the CLI can
//! print the server's reason and a hint that fits the status.

use larder_api::{
    AssembleRequest, ChunksMissingRequest, ChunksMissingResponse, ChunksStored, ErrorBody,
    MissingRequest, MissingResponse, MultipartList, Upload,
};
use serde::de::DeserializeOwned;

/// The API's types (a cache and a token under the names this client has always given them).
pub use larder_api::{
    Cache as CacheInfo, ConfigureCache, CreateCache, CreateToken, DeleteReport, DeletedPath,
    GcReport, Keep, MultipartDetail, MultipartPart, MultipartUpload, PathDetail, PathEntry,
    PathList, Perm, Pin, PinRef, PinRequest, PublishRequest, Published, Reason, Reference, Size,
    Token as TokenInfo, Victim, WhoAmI,
};

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
    /// An upload request that made no progress for the push's stall timeout (`stall`).
    #[error(
        "the server stalled: no progress for {secs}s on {url} (the stall timeout, \
         LARDER_STALL_TIMEOUT)"
    )]
    Stalled { url: String, secs: u64 },
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

    /// The server is away, stalled or overloaded (unreachable, no progress, 408, 429, or a 5xx
    /// other than 501 Not Implemented and 507 Insufficient Storage), as opposed to refusing the
    /// request (every other 4xx, a definitive answer): worth retrying, after `Retry-After` when
    /// it sent one.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } | ClientError::Stalled { .. } => true,
            // 408: the server gave up waiting for the request (its body stalled on the way).
            ClientError::Status { status, .. } => {
                *status == 408
                    || *status == 429
                    || (*status >= 500 && *status != 507 && *status != 501)
            }
            _ => false,
        }
    }

    /// For a transient failure, `Some` of how long the server asked to wait (if it did);
    /// `None` for a failure not worth retrying.
    pub fn retry_wait(&self) -> Option<Option<std::time::Duration>> {
        match self {
            ClientError::Status { retry_after, .. } if self.is_transient() => Some(*retry_after),
            _ if self.is_transient() => Some(None),
            _ => None,
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

/// Percent-encoding of one URL path segment (store path names may hold `?`, `=` or `+`).
use larder_nix::url::encode_component as segment;

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

    /// Send `token` from now on (one made by [`ApiClient::oidc_exchange`]).
    pub fn set_token(&mut self, token: String) {
        self.token = Some(token);
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
        let message = serde_json::from_str::<ErrorBody>(&text)
            .ok()
            .map(|b| b.error)
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

    pub async fn create_cache(&self, body: &CreateCache) -> Result<CacheInfo> {
        self.json(
            self.request(reqwest::Method::POST, "/api/v1/caches")
                .json(body),
            "cache create",
        )
        .await
    }

    pub async fn configure_cache(&self, name: &str, body: &ConfigureCache) -> Result<CacheInfo> {
        self.json(
            self.request(reqwest::Method::PATCH, &format!("/api/v1/caches/{name}"))
                .json(body),
            "cache configure",
        )
        .await
    }

    /// Switch `cache` to client-side signing with this public key (`name:base64`).
    pub async fn register_public_key(&self, cache: &str, public_key: &str) -> Result<()> {
        let body = larder_api::RegisterKey {
            public_key: public_key.to_owned(),
        };
        self.send(
            self.request(
                reqwest::Method::POST,
                &format!("/api/v1/caches/{cache}/public-key"),
            )
            .json(&body),
        )
        .await?;
        Ok(())
    }

    pub async fn delete_cache(&self, name: &str) -> Result<()> {
        self.send(self.request(reqwest::Method::DELETE, &format!("/api/v1/caches/{name}")))
            .await?;
        Ok(())
    }

    pub async fn create_token(&self, body: &CreateToken) -> Result<TokenInfo> {
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
        let list: MultipartList = self
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

    /// Which of `paths` (store paths or hash parts) the cache lacks, in their order.
    pub async fn missing(&self, cache: &str, paths: Vec<String>) -> Result<Vec<String>> {
        let answer: MissingResponse = self
            .json(
                self.request(
                    reqwest::Method::POST,
                    &format!("/api/v1/caches/{cache}/missing"),
                )
                .json(&MissingRequest { paths }),
                "missing paths",
            )
            .await?;
        Ok(answer.missing)
    }

    /// Which of the chunks `ids` of a NAR being pushed (push session `session`) the cache
    /// lacks, in their order.
    pub async fn missing_chunks(
        &self,
        cache: &str,
        session: &str,
        ids: Vec<String>,
    ) -> Result<Vec<String>> {
        let answer: ChunksMissingResponse = self
            .json(
                self.request(
                    reqwest::Method::POST,
                    &format!("/api/v1/caches/{cache}/chunks/missing"),
                )
                .json(&ChunksMissingRequest {
                    session: session.to_owned(),
                    chunks: ids,
                }),
                "missing chunks",
            )
            .await?;
        Ok(answer.missing)
    }

    /// Upload chunks: `frames` is one zstd frame per chunk, back to back.
    pub async fn upload_chunks(
        &self,
        cache: &str,
        session: &str,
        frames: Vec<u8>,
    ) -> Result<ChunksStored> {
        self.json(
            self.request(
                reqwest::Method::POST,
                &format!("/api/v1/caches/{cache}/chunks?session={session}"),
            )
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(frames),
            "chunk upload",
        )
        .await
    }

    /// Have the server assemble, verify and hold a NAR made of chunks it has.
    pub async fn assemble(&self, cache: &str, body: &AssembleRequest) -> Result<Upload> {
        self.json(
            self.request(
                reqwest::Method::POST,
                &format!("/api/v1/caches/{cache}/chunks/assemble"),
            )
            .json(body),
            "NAR assembly",
        )
        .await
    }

    /// Publish a store path whose NAR was uploaded; the answer says whether it was created.
    pub async fn publish(&self, cache: &str, body: &PublishRequest) -> Result<Published> {
        self.json(
            self.request(
                reqwest::Method::POST,
                &format!("/api/v1/caches/{cache}/paths"),
            )
            .json(body),
            "path publication",
        )
        .await
    }

    /// Evict what the cache's size limit requires (with `dry_run`, only say what would go).
    pub async fn gc(&self, cache: &str, dry_run: bool) -> Result<GcReport> {
        self.json(
            self.request(
                reqwest::Method::POST,
                &format!("/api/v1/caches/{cache}/gc?dry_run={dry_run}"),
            ),
            "garbage collection",
        )
        .await
    }

    pub async fn list_pins(&self, cache: &str) -> Result<Vec<Pin>> {
        self.json(
            self.request(
                reqwest::Method::GET,
                &format!("/api/v1/caches/{cache}/pins"),
            ),
            "pin list",
        )
        .await
    }

    pub async fn create_pin(&self, cache: &str, body: &PinRequest) -> Result<Pin> {
        self.json(
            self.request(
                reqwest::Method::POST,
                &format!("/api/v1/caches/{cache}/pins"),
            )
            .json(body),
            "pin",
        )
        .await
    }

    pub async fn delete_pin(&self, cache: &str, name: &str) -> Result<()> {
        self.send(self.request(
            reqwest::Method::DELETE,
            &format!("/api/v1/caches/{cache}/pins/{}", segment(name)),
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

    #[test]
    fn transient_failures_are_outages_not_refusals() {
        let status = |status| ClientError::Status {
            status,
            message: String::new(),
            retry_after: None,
        };
        for s in [408, 429, 500, 502, 503] {
            assert!(status(s).is_transient(), "{s}");
        }
        let stalled = ClientError::Stalled {
            url: "u".into(),
            secs: 1,
        };
        assert!(stalled.is_transient());
        for s in [400, 401, 403, 404, 409, 413, 501, 507] {
            assert!(!status(s).is_transient(), "{s}");
        }
    }
}
