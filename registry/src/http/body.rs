//! Every request body is read to its end before the request is routed.
//!
//! hyper keeps a connection alive only when the request's body was read to its end. When a
//! handler answers without reading it (a caller refused by the extractor, the 404 fallback, a
//! handler that takes no body), hyper drains only what has already arrived and otherwise closes
//! the connection after the response, which has already gone out without `Connection: close`.
//! A client that put the connection back in its pool then sends its next request into a closing
//! connection and gets "peer disconnected" (seen in CI under load, on the PUT after a refused
//! one). Reading the body first leaves every answered connection reusable, and bounds how long
//! a client may take to send a body (hyper's header-read timeout covers only the head).

use super::IMPORT_LIMIT;
use crate::error::ApiError;
use axum::body::{Body, HttpBody};
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::time::Duration;
use vnp_registry_client::api::ErrorCode;

/// Largest body buffered here (axum's default body limit); the import carries its own limit.
pub const BODY_LIMIT: usize = 2 << 20;

/// The middleware: reads the body within `timeout` and at most [`BODY_LIMIT`] bytes, then hands
/// the request on with the buffered body. The import (up to [`IMPORT_LIMIT`], read by its
/// handler) and bodiless requests pass through untouched.
pub async fn read_first(req: Request, next: Next, timeout: Duration) -> Response {
    if req.body().is_end_stream() || req.uri().path() == "/v1/import" {
        return next.run(req).await;
    }
    if declared_length(&req).is_some_and(|n| n > BODY_LIMIT as u64) {
        return too_large().into_response();
    }
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, BODY_LIMIT)).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(e)) if is_length_limit(&e) => too_large().into_response(),
        Ok(Err(e)) => {
            ApiError::new(ErrorCode::BadRequest, format!("request body: {e}")).into_response()
        }
        Err(_) => ApiError::new(
            ErrorCode::BadRequest,
            format!(
                "the request body did not arrive within {} s",
                timeout.as_secs()
            ),
        )
        .into_response(),
    }
}

/// The `Content-Length` the client declared, if any.
fn declared_length(req: &Request) -> Option<u64> {
    req.headers()
        .get(axum::http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn too_large() -> ApiError {
    ApiError::new(
        ErrorCode::TooLarge,
        format!(
            "request body larger than {BODY_LIMIT} bytes (an import may be up to {IMPORT_LIMIT})"
        ),
    )
}

/// Whether `e` is the body limit being hit (rather than the connection failing).
fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}
