//! `ApiError`: every failure a handler can return, mapped to a status code in one `match`.
//!
//! Malformed input is a 4xx with a short reason. Storage, database and I/O failures are a plain
//! 500 (or 503 with `Retry-After` when a backend is unreachable) whose body says nothing about
//! the server's internals beyond which backend; the cause is logged once, here, and never holds
//! a connection string (the database driver's errors do not carry one).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("authentication required")]
    Unauthorized,
    #[error("{0}")]
    InvalidToken(&'static str),
    /// An OIDC ID token refused by the exchange (401), with the reason.
    #[error("{0}")]
    OidcRefused(String),
    /// An OIDC issuer whose keys cannot be fetched (and none are known): 503, the reason said.
    #[error("{0}")]
    OidcIssuerUnavailable(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A deletion refused because these store paths reference the path (listed in the body).
    #[error("{0}")]
    Referenced(String, Vec<String>),
    #[error("upload larger than the server's limit of {0} bytes")]
    PayloadTooLarge(u64),
    /// A (compressed) upload whose NAR expands past `max_nar_size`.
    #[error("the NAR expands to more than the server's max_nar_size of {0} bytes (uncompressed)")]
    NarTooLarge(u64),
    /// The staging space of a cache's unfinished uploads used up (413).
    #[error("{0}")]
    StagingFull(String),
    /// A cache has as many unfinished multi-part uploads as it may (429).
    #[error("{0}")]
    TooManyUploads(String),
    #[error("{0}")]
    UnsupportedMedia(String),
    /// An upload refused for a reason that `/metrics` counts by name.
    #[error("{1}")]
    Rejected(Rejection, String),
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("storage backend unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The metadata database cannot be reached (down, restarting, out of connections).
    #[error("metadata database unavailable; retry later")]
    DatabaseUnavailable(#[source] larder_store::MetaError),
    #[error("object store unavailable, try again later")]
    ObjectStoreUnavailable(#[source] larder_store::ObjectError),
    /// A request body that sent nothing for `header_timeout` (see `stall.rs`).
    #[error("the request body stalled: no data for {}s; nothing of it was kept (send it again)", .0.as_secs())]
    BodyStalled(std::time::Duration),
    /// A read that waited longer than `backend_timeout` for a backend (one that accepts
    /// connections but no longer answers).
    #[error("the metadata database or the object store did not answer within {}s; retry later", .0.as_secs())]
    BackendTimeout(std::time::Duration),
}

impl ApiError {
    pub fn bad(msg: impl Into<String>) -> Self {
        ApiError::BadRequest(msg.into())
    }
    pub fn not_found(msg: impl Into<String>) -> Self {
        ApiError::NotFound(msg.into())
    }
    pub fn internal(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        ApiError::Internal(Box::new(e))
    }
    pub fn rejected(reason: Rejection, msg: impl Into<String>) -> Self {
        ApiError::Rejected(reason, msg.into())
    }

    /// The reason label of this error in the upload metrics.
    pub fn rejection(&self) -> Rejection {
        match self {
            ApiError::Rejected(r, _) => *r,
            ApiError::BodyStalled(_) => Rejection::Interrupted,
            other => Rejection::from_status(other.status()),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized | ApiError::InvalidToken(_) | ApiError::OidcRefused(_) => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) | ApiError::Referenced(..) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) | ApiError::NarTooLarge(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::StagingFull(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyUploads(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::UnsupportedMedia(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Rejected(Rejection::BadSignature, _) => StatusCode::FORBIDDEN,
            ApiError::Rejected(_, _) => StatusCode::BAD_REQUEST,
            ApiError::BodyStalled(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(_)
            | ApiError::OidcIssuerUnavailable(_)
            | ApiError::DatabaseUnavailable(_)
            | ApiError::ObjectStoreUnavailable(_)
            | ApiError::BackendTimeout(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl From<larder_store::MetaError> for ApiError {
    fn from(e: larder_store::MetaError) -> Self {
        if e.is_unavailable() {
            ApiError::DatabaseUnavailable(e)
        } else {
            ApiError::internal(e)
        }
    }
}

impl From<larder_store::ObjectError> for ApiError {
    fn from(e: larder_store::ObjectError) -> Self {
        if e.is_unavailable() {
            ApiError::ObjectStoreUnavailable(e)
        } else {
            ApiError::internal(e)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            ApiError::Internal(source) | ApiError::Unavailable(source) => {
                tracing::error!(error = %error_chain(source.as_ref()), "{status}");
            }
            // Every request fails the same way while a backend is away: one line each,
            // without the chain's details repeated at error level.
            ApiError::DatabaseUnavailable(source) => {
                tracing::warn!(error = %error_chain(source), "{status}: {self}");
            }
            ApiError::ObjectStoreUnavailable(source) => {
                tracing::warn!(error = %error_chain(source), "{status}: {self}");
            }
            ApiError::BackendTimeout(_) => tracing::warn!("{status}: {self}"),
            _ => tracing::debug!(%status, "{self}"),
        }
        let body = match &self {
            ApiError::Referenced(msg, referrers) => larder_api::ErrorBody {
                error: msg.clone(),
                referrers: Some(referrers.clone()),
            },
            _ => larder_api::ErrorBody::new(self.to_string()),
        };
        // Serializing two strings cannot fail; the fallback keeps the shape all the same.
        let body = serde_json::to_string(&body)
            .unwrap_or_else(|_| r#"{"error":"internal error"}"#.to_owned())
            + "\n";
        let mut resp = (status, body).into_response();
        resp.extensions_mut().insert(self.rejection());
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // Clients (larder push, Nix) retry; a backend outage is usually seconds to minutes.
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"larder\""),
            );
        }
        resp
    }
}

/// Why a request (an upload, in the metrics) was refused: a small fixed set, so that it can
/// label a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The bytes are not a valid NAR in the declared compression.
    InvalidNar,
    NarHashMismatch,
    NarSizeMismatch,
    /// Nix's uploader named the NAR file after a hash its content does not have.
    FileHashMismatch,
    /// A reference is not in the cache (nor signed upstream).
    MissingReferences,
    /// A client-signed cache got a path without a valid signature by its key.
    BadSignature,
    /// The body ended early.
    Interrupted,
    /// The path exists with other content, or the cache has no key.
    Conflict,
    TooLarge,
    UnsupportedCompression,
    Unauthenticated,
    Forbidden,
    NotFound,
    /// Any other malformed request.
    Invalid,
    ServerError,
}

impl Rejection {
    /// Every reason, in the order `/metrics` lists them.
    pub const ALL: [Rejection; 15] = [
        Rejection::InvalidNar,
        Rejection::NarHashMismatch,
        Rejection::NarSizeMismatch,
        Rejection::FileHashMismatch,
        Rejection::MissingReferences,
        Rejection::BadSignature,
        Rejection::Interrupted,
        Rejection::Conflict,
        Rejection::TooLarge,
        Rejection::UnsupportedCompression,
        Rejection::Unauthenticated,
        Rejection::Forbidden,
        Rejection::NotFound,
        Rejection::Invalid,
        Rejection::ServerError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::InvalidNar => "invalid_nar",
            Rejection::NarHashMismatch => "nar_hash_mismatch",
            Rejection::NarSizeMismatch => "nar_size_mismatch",
            Rejection::FileHashMismatch => "file_hash_mismatch",
            Rejection::MissingReferences => "missing_references",
            Rejection::BadSignature => "bad_signature",
            Rejection::Interrupted => "interrupted",
            Rejection::Conflict => "conflict",
            Rejection::TooLarge => "too_large",
            Rejection::UnsupportedCompression => "unsupported_compression",
            Rejection::Unauthenticated => "unauthenticated",
            Rejection::Forbidden => "forbidden",
            Rejection::NotFound => "not_found",
            Rejection::Invalid => "invalid",
            Rejection::ServerError => "server_error",
        }
    }

    /// The reason of a refusal that did not say one (axum's own 404/405/…).
    pub fn from_status(status: StatusCode) -> Rejection {
        match status.as_u16() {
            401 => Rejection::Unauthenticated,
            403 => Rejection::Forbidden,
            404 => Rejection::NotFound,
            409 => Rejection::Conflict,
            413 => Rejection::TooLarge,
            415 => Rejection::UnsupportedCompression,
            500.. => Rejection::ServerError,
            _ => Rejection::Invalid,
        }
    }
}

/// "outer: inner: innermost", for logs.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
