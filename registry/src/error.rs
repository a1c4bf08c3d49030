//! The registry's refusal type: a stable code plus a human-readable message.

use vnp_registry_client::api::ErrorCode;

/// A refused or failed request. The message must never contain secret material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    /// Builds a refusal.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

/// Shorthand for `Err(ApiError::new(..))`.
pub fn refuse<T>(code: ErrorCode, message: impl Into<String>) -> Result<T, ApiError> {
    Err(ApiError::new(code, message))
}
