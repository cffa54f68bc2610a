//! `ApiError`: every failure a handler can return, mapped to a status code in one `match`.
//!
//! Malformed input is a 4xx with a short reason. Storage, database and I/O failures are a plain
//! 500 (or 503 when a backend is unreachable) whose body says nothing about the server's
//! internals; the cause is logged once, here.

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
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("upload larger than the server's limit of {0} bytes")]
    PayloadTooLarge(u64),
    #[error("{0}")]
    UnsupportedMedia(String),
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("storage backend unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
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

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized | ApiError::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMedia(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl From<larder_store::MetaError> for ApiError {
    fn from(e: larder_store::MetaError) -> Self {
        match &e {
            larder_store::MetaError::Db(sqlx_err) if is_unavailable(sqlx_err) => {
                ApiError::Unavailable(Box::new(e))
            }
            _ => ApiError::internal(e),
        }
    }
}

fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed
    )
}

impl From<larder_store::ObjectError> for ApiError {
    fn from(e: larder_store::ObjectError) -> Self {
        ApiError::internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            ApiError::Internal(source) | ApiError::Unavailable(source) => {
                tracing::error!(error = %error_chain(source.as_ref()), "{status}");
            }
            _ => tracing::debug!(%status, "{self}"),
        }
        let body = serde_json::json!({ "error": self.to_string() }).to_string() + "\n";
        let mut resp = (status, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"larder\""),
            );
        }
        resp
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
