//! Errors the client reports.

use crate::api::ErrorCode;

/// Everything that can go wrong talking to the registry.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The client configuration (URL, PEM files) is unusable.
    #[error("registry client configuration: {0}")]
    Config(String),
    /// Connecting, TLS, or reading the response failed.
    #[error("registry transport error: {0}")]
    Transport(String),
    /// The registry refused the request with a reason.
    #[error("registry refused ({status} {code}): {message}")]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
    },
    /// The registry answered something this client does not understand.
    #[error("registry answered an unexpected {status} response: {detail}")]
    Protocol { status: u16, detail: String },
}

impl ClientError {
    /// The registry's refusal code, if this is a refusal.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The HTTP status, if the registry answered at all.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } | ClientError::Protocol { status, .. } => Some(*status),
            _ => None,
        }
    }
}
