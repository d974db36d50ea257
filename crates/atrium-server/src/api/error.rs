//! API errors: every refusal is a status code with a reason an operator can act on.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::types::ErrorBody;

/// An API request that could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request itself is wrong (400).
    #[error("{0}")]
    BadRequest(String),
    /// No or an unknown token (401).
    #[error("{0}")]
    Unauthorized(String),
    /// The caller may not do this, or the device is refused (403).
    #[error("{0}")]
    Forbidden(String),
    /// No such thing (404).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (409).
    #[error("{0}")]
    Conflict(String),
    /// The request body is over the limit (413).
    #[error("{0}")]
    TooLarge(String),
    /// Well-formed but refused content, such as an invalid update artifact (422).
    #[error("{0}")]
    Unprocessable(String),
    /// Too many attempts; try again later (429).
    #[error("{0}")]
    TooManyRequests(String),
    /// The server failed; details are logged, not sent (500).
    #[error("internal error")]
    Internal(String),
    /// The server is shutting down or overloaded (503).
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "request failed");
        }
        let body = ErrorBody {
            error: self.to_string(),
        };
        (self.status(), Json(body)).into_response()
    }
}

impl From<atrium_store::StoreError> for ApiError {
    fn from(e: atrium_store::StoreError) -> Self {
        use atrium_store::StoreError as E;
        match e {
            E::NotFound { .. } => ApiError::NotFound(e.to_string()),
            E::Conflict(_) | E::InvalidTransition { .. } => ApiError::Conflict(e.to_string()),
            E::KeyDecommissioned { .. } => ApiError::Forbidden(e.to_string()),
            E::Invalid(_) => ApiError::BadRequest(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<atrium_pki::PkiError> for ApiError {
    fn from(e: atrium_pki::PkiError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}
