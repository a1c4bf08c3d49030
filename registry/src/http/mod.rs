//! The HTTPS+JSON API (`/v1`) over mutual TLS. Every refusal is
//! `{"error": {"code", "message"}}` with the status of its [`ErrorCode`].
//!
//! - `auth`: the caller's identity (certificate, then registration);
//! - `inventory`: networks, hosts, gateways, policy; `vms`: VMs, secrets, endpoints;
//! - `tokens`: token requests and the long-poll watch;
//! - `serve`: the mutual-TLS accept loop and its connection limits;
//! - `body`: every request body read to its end before routing (reusable connections);
//! - `write`: what the handlers share (the admin-write extractor, `?network=` lists, lookups).

mod auth;
mod backup;
mod body;
mod inventory;
mod metadata;
mod public;
mod serve;
mod services;
mod tokens;
mod vms;
mod write;

use auth::PeerIdentity;
pub use auth::{Caller, CertifiedCaller, Once};
use inventory::*;
use public::*;
pub use serve::{serve, ConnectionLimits};
use services::*;
use tokens::*;
use vms::*;
use write::*;

use crate::error::{refuse, ApiError};
use crate::plan;
use crate::service::Registry;
use crate::tls::identity_from_cert;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use vnp_registry_client::api::*;

/// Longest long-poll a watcher may ask for.
pub const MAX_WATCH: Duration = Duration::from_secs(300);
/// Largest import body accepted.
pub const IMPORT_LIMIT: usize = 256 << 20;
/// Long-poll time when the watcher does not say.
pub const DEFAULT_WATCH: Duration = Duration::from_secs(30);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
            },
        };
        (status, Json(body)).into_response()
    }
}

/// Parses a JSON body with our error format (axum's own rejections are plain text).
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(ErrorCode::InvalidJson, format!("request body: {e}")))
}

type Shared = Arc<Registry>;
type ApiResult<T> = Result<Json<T>, ApiError>;

/// Runs a write on a blocking thread (commits wait for fsync).
async fn write<T: Send + 'static>(
    reg: &Shared,
    job: impl FnOnce(&Registry) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let reg = reg.clone();
    tokio::task::spawn_blocking(move || job(&reg))
        .await
        .unwrap_or_else(|_| refuse(ErrorCode::Internal, "write task failed"))
}

fn flag(q: &HashMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match q.get(name).map(String::as_str) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(v) => refuse(
            ErrorCode::BadRequest,
            format!("{name}={v:?}: expected true or false"),
        ),
    }
}

/// Builds the router.
pub fn router(reg: Shared) -> Router {
    Router::new()
        .route("/v1/whoami", get(whoami))
        .route("/v1/health", get(health))
        .route("/v1/metrics", get(metrics))
        .route("/v1/networks", get(list_networks).post(create_network))
        .route("/v1/networks/{id}", get(get_network).delete(delete_network))
        .route("/v1/hosts", get(list_hosts).post(create_host))
        .route("/v1/hosts/{id}", get(get_host).delete(delete_host))
        .route("/v1/host/vms", get(host_vms))
        .route("/v1/gateways", get(list_gateways).post(create_gateway))
        .route("/v1/gateways/{id}", get(get_gateway).delete(delete_gateway))
        .route("/v1/gateways/{id}/secret", get(gateway_secret))
        .route("/v1/gateways/{id}/config", get(gateway_config))
        .route("/v1/gateways/{id}/health", put(report_health))
        .route("/v1/forwards", get(list_forwards).post(create_forward))
        .route("/v1/forwards/{id}", axum::routing::delete(delete_forward))
        .route("/v1/services", get(list_services).post(create_service))
        .route("/v1/services/{id}", get(get_service).delete(delete_service))
        .route(
            "/v1/services/{id}/members",
            post(add_service_member).delete(remove_service_member),
        )
        .route("/v1/vms/{id}/nat-ports", post(grow_nat_ports))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{id}", get(get_vm).delete(delete_vm))
        .route("/v1/vms/{id}/secret", get(vm_secret))
        .route("/v1/vms/{id}/secret/rotate", post(rotate_secret))
        .route("/v1/vms/{id}/move", post(move_vm))
        .route(
            "/v1/vms/{id}/migration",
            post(start_migration).delete(cancel_migration),
        )
        .route("/v1/vms/{id}/endpoint", put(register_endpoint))
        .route("/v1/policy", get(list_rules).post(create_rule))
        .route("/v1/policy/{id}", axum::routing::delete(delete_rule))
        .route("/v1/tokens", post(token))
        .route("/v1/export", get(backup::export))
        .route(
            "/v1/import",
            // A whole registry is larger than axum's default 2 MiB body limit.
            post(backup::import).layer(axum::extract::DefaultBodyLimit::max(IMPORT_LIMIT)),
        )
        .route("/v1/watch", get(watch))
        .merge(metadata_routes())
        .fallback(|| async {
            ApiError::new(
                ErrorCode::NotFound,
                "no such endpoint (see docs/registry.md)",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(ErrorCode::BadRequest, "method not allowed on this endpoint")
        })
        .with_state(reg)
}

/// Metadata and credentials (issue #11).
fn metadata_routes() -> Router<Shared> {
    use metadata::*;
    Router::new()
        .route("/v1/jwks", get(jwks))
        .route("/v1/signing-keys", get(list_signing_keys))
        .route("/v1/signing-keys/rotate", post(rotate_signing_key))
        .route("/v1/vms/{id}/metadata", get(vm_metadata))
        .route("/v1/vms/{id}/access-token", post(access_token))
        .route("/v1/vms/{id}/identity-token", post(identity_token))
        .route(
            "/v1/vms/{id}/guest-attributes/{namespace}/{key}",
            put(put_guest_attribute),
        )
        .route(
            "/v1/vms/{id}/attributes/{key}",
            put(set_vm_attribute).delete(unset_vm_attribute),
        )
        .route("/v1/vms/{id}/scopes", put(set_vm_scopes))
        .route(
            "/v1/networks/{id}/project",
            get(get_project).put(update_project),
        )
        .route(
            "/v1/networks/{id}/project/attributes/{key}",
            put(set_project_attribute).delete(unset_project_attribute),
        )
}

async fn whoami(CertifiedCaller(id): CertifiedCaller) -> Json<Identity> {
    Json(id)
}

async fn metrics(c: Caller, State(reg): State<Shared>) -> Result<Response, ApiError> {
    c.admin()?;
    let text = reg.render_metrics();
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response())
}

async fn health(_: Caller, State(reg): State<Shared>) -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok", "generation": reg.read().generation}))
}
