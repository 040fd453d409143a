//! The server's error type and how every error becomes a response.
//!
//! Handlers return [`ApiError`]. Its response carries the error in an extension; the
//! [`crate::middleware::request_context`] layer, which knows the request id, writes the JSON
//! body and logs the error once. Internals (store errors, I/O) are logged, never shown.

use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hive_api::ErrorCode;
use hive_store::{ConflictKind, StoreError};

/// An error answered to a client: a stable code and a message for humans.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Seconds, for `rate_limited` and `unavailable`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn not_found(kind: &str, name: &str, tenant: Option<&str>) -> Self {
        let message = match tenant {
            Some(t) => format!("{kind} {name:?} not found in tenant {t:?}"),
            None => format!("{kind} {name:?} not found"),
        };
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Invalid, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthenticated, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    /// Maps a store error met while acting on `kind` `name`.
    pub fn from_store(err: StoreError, kind: &str, name: &str, tenant: Option<&str>) -> Self {
        match err {
            StoreError::Conflict {
                kind: ConflictKind::Exists { .. },
                ..
            } => {
                let message = match tenant {
                    Some(t) => format!("{kind} {name:?} already exists in tenant {t:?}"),
                    None => format!("{kind} {name:?} already exists"),
                };
                Self::new(ErrorCode::AlreadyExists, message)
            }
            StoreError::Conflict {
                kind: ConflictKind::Missing,
                ..
            } => Self::not_found(kind, name, tenant),
            StoreError::Conflict {
                kind: ConflictKind::RevisionMismatch { expected, actual },
                ..
            } => Self::new(
                ErrorCode::Conflict,
                format!(
                    "{kind} {name:?} changed: revision {expected} is stale, the current one is \
                     {actual}; read it again and retry"
                ),
            ),
            other => other.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Compacted {
                requested,
                compacted,
            } => Self::new(
                ErrorCode::RevisionCompacted,
                format!(
                    "revision {requested} is compacted (history starts after {compacted}): list \
                     again and watch from the list's revision"
                ),
            ),
            StoreError::Unavailable(msg) => {
                tracing::warn!(error = %msg, "store unavailable");
                Self {
                    retry_after: Some(1),
                    ..Self::new(
                        ErrorCode::Unavailable,
                        "the state store is unavailable, retry later",
                    )
                }
            }
            StoreError::Invalid(msg) => Self::invalid(msg),
            StoreError::Conflict { key, kind } => Self::new(
                ErrorCode::Conflict,
                format!("concurrent change ({kind}), retry"),
            )
            .log_cause(format!("store conflict on {key}: {kind}")),
            StoreError::Backend(msg) => Self::internal("internal error").log_cause(msg),
        }
    }
}

impl ApiError {
    /// Logs the internal cause now; the client sees only the message.
    pub(crate) fn log_cause(self, cause: String) -> Self {
        tracing::error!(code = %self.code, %cause, "internal error");
        self
    }
}

impl From<hive_api::ValidationError> for ApiError {
    fn from(e: hive_api::ValidationError) -> Self {
        ApiError::new(ErrorCode::Invalid, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let code = match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
            _ => ErrorCode::MalformedBody,
        };
        let message = match code {
            ErrorCode::PayloadTooLarge => "request body is larger than the server's limit".into(),
            ErrorCode::UnsupportedMediaType => {
                "request body must be JSON with content-type application/json".into()
            }
            _ => rejection.body_text(),
        };
        Self::new(code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = status.into_response();
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response.extensions_mut().insert(self);
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
