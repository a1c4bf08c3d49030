//! The HTTPS+JSON API (`/v1`) over mutual TLS. Every refusal is
//! `{"error": {"code", "message"}}` with the status of its [`ErrorCode`].

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

/// What the TLS layer learned about the caller, attached to every request of a connection.
#[derive(Debug, Clone)]
struct PeerIdentity(Result<Identity, String>);

/// Extractor: the caller as its certificate says, registered or not (only `whoami` uses it).
#[derive(Debug, Clone)]
pub struct CertifiedCaller(pub Identity);

impl<S: Send + Sync> FromRequestParts<S> for CertifiedCaller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        match parts.extensions.get::<PeerIdentity>() {
            Some(PeerIdentity(Ok(id))) => Ok(CertifiedCaller(id.clone())),
            Some(PeerIdentity(Err(why))) => refuse(ErrorCode::NotAuthenticated, why.clone()),
            None => refuse(ErrorCode::NotAuthenticated, "no client certificate"),
        }
    }
}

/// Extractor: the authenticated caller. A host or gateway certificate only counts while that
/// host or gateway is registered: deleting it from the registry locks its certificate out.
#[derive(Debug, Clone)]
pub struct Caller(pub Identity);

impl FromRequestParts<Shared> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, reg: &Shared) -> Result<Self, ApiError> {
        let CertifiedCaller(id) = CertifiedCaller::from_request_parts(parts, reg).await?;
        let registered = match id.role {
            Role::Admin => true,
            Role::Host => reg.read().hosts.contains_key(&id.id),
            Role::Gateway => reg.read().gateways.contains_key(&id.id),
        };
        if !registered {
            return refuse(
                ErrorCode::UnknownIdentity,
                format!(
                    "certificate identity {id} is not registered (vnpctl {} create {})",
                    id.role, id.id
                ),
            );
        }
        Ok(Caller(id))
    }
}

impl Caller {
    fn admin(&self) -> Result<(), ApiError> {
        if self.0.role == Role::Admin {
            Ok(())
        } else {
            refuse(
                ErrorCode::AdminRequired,
                format!("{} may not do this; it needs an admin certificate", self.0),
            )
        }
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
        .route("/v1/networks", get(list_networks).post(create_network))
        .route("/v1/networks/{id}", get(get_network).delete(delete_network))
        .route("/v1/hosts", get(list_hosts).post(create_host))
        .route("/v1/hosts/{id}", get(get_host).delete(delete_host))
        .route("/v1/host/vms", get(host_vms))
        .route("/v1/gateways", get(list_gateways).post(create_gateway))
        .route("/v1/gateways/{id}", get(get_gateway).delete(delete_gateway))
        .route("/v1/gateways/{id}/secret", get(gateway_secret))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{id}", get(get_vm).delete(delete_vm))
        .route("/v1/vms/{id}/secret", get(vm_secret))
        .route("/v1/vms/{id}/secret/rotate", post(rotate_secret))
        .route("/v1/vms/{id}/move", post(move_vm))
        .route("/v1/vms/{id}/endpoint", put(register_endpoint))
        .route("/v1/policy", get(list_rules).post(create_rule))
        .route("/v1/policy/{id}", axum::routing::delete(delete_rule))
        .route("/v1/tokens", post(token))
        .route("/v1/watch", get(watch))
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

async fn whoami(CertifiedCaller(id): CertifiedCaller) -> Json<Identity> {
    Json(id)
}

async fn health(_: Caller, State(reg): State<Shared>) -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok", "generation": reg.read().generation}))
}

// ---- networks

async fn list_networks(_: Caller, State(reg): State<Shared>) -> Json<Vec<Network>> {
    Json(reg.read().networks.values().cloned().collect())
}

async fn get_network(
    _: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Network> {
    reg.read()
        .networks
        .get(&id)
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownNetwork, format!("no network {id}")))
}

async fn create_network(c: Caller, State(reg): State<Shared>, body: Bytes) -> ApiResult<Network> {
    c.admin()?;
    let spec: NetworkSpec = parse(&body)?;
    let out = write(&reg, move |r| r.write(|m| plan::create_network(m, &spec))).await?;
    log::info!(
        "{} created network {} ({}, vni {})",
        c.0,
        out.id,
        out.cidr,
        out.vni
    );
    Ok(Json(out))
}

async fn delete_network(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Deleted> {
    c.admin()?;
    let cascade = flag(&q, "cascade")?;
    let out = write(&reg, move |r| {
        r.write(|m| plan::delete_network(m, &id, cascade))
    })
    .await?;
    log::info!(
        "{} deleted {} (cascaded: {:?})",
        c.0,
        out.deleted,
        out.cascaded
    );
    Ok(Json(out))
}

// ---- hosts

async fn list_hosts(c: Caller, State(reg): State<Shared>) -> ApiResult<Vec<Host>> {
    c.admin()?;
    Ok(Json(reg.read().hosts.values().cloned().collect()))
}

async fn get_host(c: Caller, State(reg): State<Shared>, Path(id): Path<String>) -> ApiResult<Host> {
    if !(c.0.role == Role::Host && c.0.id == id) {
        c.admin()?;
    }
    reg.read()
        .hosts
        .get(&id)
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownHost, format!("no host {id}")))
}

async fn create_host(c: Caller, State(reg): State<Shared>, body: Bytes) -> ApiResult<Host> {
    c.admin()?;
    let spec: HostSpec = parse(&body)?;
    let out = write(&reg, move |r| r.write(|m| plan::create_host(m, &spec))).await?;
    log::info!("{} created host {} at {}", c.0, out.id, out.underlay_addr);
    Ok(Json(out))
}

async fn delete_host(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Deleted> {
    c.admin()?;
    let out = write(&reg, move |r| r.write(|m| plan::delete_host(m, &id))).await?;
    log::info!("{} deleted {}", c.0, out.deleted);
    Ok(Json(out))
}

async fn host_vms(c: Caller, State(reg): State<Shared>) -> ApiResult<Vec<VmRecord>> {
    if c.0.role != Role::Host {
        return refuse(
            ErrorCode::Forbidden,
            "only hosts have VMs of their own; admins use GET /v1/vms",
        );
    }
    let m = reg.read();
    Ok(Json(
        m.vms
            .values()
            .filter(|v| v.host.as_deref() == Some(c.0.id.as_str()))
            .cloned()
            .collect(),
    ))
}

// ---- gateways

async fn list_gateways(c: Caller, State(reg): State<Shared>) -> ApiResult<Vec<Gateway>> {
    c.admin()?;
    Ok(Json(reg.read().gateways.values().cloned().collect()))
}

async fn get_gateway(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Gateway> {
    if !(c.0.role == Role::Gateway && c.0.id == id) {
        c.admin()?;
    }
    reg.read()
        .gateways
        .get(&id)
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownGateway, format!("no gateway {id}")))
}

async fn create_gateway(c: Caller, State(reg): State<Shared>, body: Bytes) -> ApiResult<Gateway> {
    c.admin()?;
    let spec: GatewaySpec = parse(&body)?;
    let out = write(&reg, move |r| {
        r.write_with_secret(|m, s| plan::create_gateway(m, &spec, s))
    })
    .await?;
    log::info!(
        "{} created gateway {} for network {}",
        c.0,
        out.id,
        out.network
    );
    Ok(Json(out))
}

async fn delete_gateway(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Deleted> {
    c.admin()?;
    let out = write(&reg, move |r| r.write(|m| plan::delete_gateway(m, &id))).await?;
    log::info!("{} deleted {}", c.0, out.deleted);
    Ok(Json(out))
}

async fn gateway_secret(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<SecretResponse> {
    if !(c.0.role == Role::Gateway && c.0.id == id) {
        return refuse(
            ErrorCode::NotOwner,
            format!("only gateway {id} may read its secret, not {}", c.0),
        );
    }
    let m = reg.read();
    let entry = m
        .secrets
        .get(&crate::model::SecretOwner::Gateway(id.clone()))
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownGateway, format!("no gateway {id}")))?;
    log::info!(
        "{} fetched its secret (generation {})",
        c.0,
        entry.generation
    );
    Ok(Json(SecretResponse {
        secret: entry.secret.to_hex().to_string(),
        generation: entry.generation,
    }))
}

// ---- VMs

async fn list_vms(
    c: Caller,
    State(reg): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Vec<VmRecord>> {
    let m = reg.read();
    let network = match c.0.role {
        Role::Admin => q.get("network").cloned(),
        // A gateway needs its network's VMs (NAT port blocks, port forwarding), nothing else.
        Role::Gateway => {
            let gw = m.gateways.get(&c.0.id).ok_or_else(|| {
                ApiError::new(ErrorCode::UnknownGateway, format!("no gateway {}", c.0.id))
            })?;
            Some(gw.network.clone())
        }
        Role::Host => {
            return refuse(
                ErrorCode::AdminRequired,
                "hosts list their own VMs with GET /v1/host/vms",
            )
        }
    };
    if let Some(n) = &network {
        if !m.networks.contains_key(n) {
            return refuse(ErrorCode::UnknownNetwork, format!("no network {n}"));
        }
    }
    Ok(Json(
        m.vms
            .values()
            .filter(|v| network.as_ref().is_none_or(|n| v.network == *n))
            .cloned()
            .collect(),
    ))
}

async fn get_vm(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<VmRecord> {
    let m = reg.read();
    let vm = m
        .vms
        .get(&id)
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownVm, format!("no VM {id}")))?;
    let allowed = match c.0.role {
        Role::Admin => true,
        Role::Host => vm.host.as_deref() == Some(c.0.id.as_str()),
        Role::Gateway => m
            .gateways
            .get(&c.0.id)
            .is_some_and(|g| g.network == vm.network),
    };
    if !allowed {
        return refuse(ErrorCode::NotOwner, format!("{} may not read VM {id}", c.0));
    }
    Ok(Json(vm.clone()))
}

async fn create_vm(c: Caller, State(reg): State<Shared>, body: Bytes) -> ApiResult<VmRecord> {
    c.admin()?;
    let spec: VmSpec = parse(&body)?;
    let out = write(&reg, move |r| {
        r.write_with_secret(|m, s| plan::create_vm(m, &spec, s))
    })
    .await?;
    log::info!(
        "{} created VM {} ({} in {}, host {:?})",
        c.0,
        out.id,
        out.ip,
        out.network,
        out.host
    );
    Ok(Json(out))
}

async fn delete_vm(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Deleted> {
    c.admin()?;
    let out = write(&reg, move |r| r.write(|m| plan::delete_vm(m, &id))).await?;
    log::info!("{} deleted {}", c.0, out.deleted);
    Ok(Json(out))
}

async fn move_vm(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<VmRecord> {
    c.admin()?;
    let req: MoveVm = parse(&body)?;
    let out = write(&reg, move |r| r.write(|m| plan::move_vm(m, &id, &req))).await?;
    log::info!(
        "{} moved VM {} to host {:?} port {:?}",
        c.0,
        out.id,
        out.host,
        out.host_port
    );
    Ok(Json(out))
}

async fn rotate_secret(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<VmRecord> {
    c.admin()?;
    let out = write(&reg, move |r| {
        r.write_with_secret(|m, s| plan::rotate_vm_secret(m, &id, s))
    })
    .await?;
    log::info!(
        "{} rotated the secret of VM {} (generation {})",
        c.0,
        out.id,
        out.secret_generation
    );
    Ok(Json(out))
}

async fn vm_secret(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<SecretResponse> {
    let m = reg.read();
    let vm = m
        .vms
        .get(&id)
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownVm, format!("no VM {id}")))?;
    // Only the host that runs the VM; not even an admin (the secret never needs to leave the
    // registry except to the one host that verifies the VM's incoming tokens).
    if !(c.0.role == Role::Host && vm.host.as_deref() == Some(c.0.id.as_str())) {
        log::warn!("refused secret of VM {id} to {}", c.0);
        return refuse(
            ErrorCode::NotOwner,
            format!(
                "{} does not run VM {id}; only its host may read its secret",
                c.0
            ),
        );
    }
    let entry = m
        .secrets
        .get(&crate::model::SecretOwner::Vm(id.clone()))
        .ok_or_else(|| ApiError::new(ErrorCode::Internal, "VM has no secret"))?;
    log::info!(
        "{} fetched the secret of VM {id} (generation {})",
        c.0,
        entry.generation
    );
    Ok(Json(SecretResponse {
        secret: entry.secret.to_hex().to_string(),
        generation: entry.generation,
    }))
}

async fn register_endpoint(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<EndpointAck> {
    if c.0.role != Role::Host {
        return refuse(
            ErrorCode::Forbidden,
            format!(
                "only the host that runs VM {id} registers its endpoint, not {}",
                c.0
            ),
        );
    }
    let update: EndpointUpdate = parse(&body)?;
    let host = c.0.id.clone();
    let vm = id.clone();
    let out = write(&reg, move |r| {
        r.write(|m| plan::register_endpoint(m, &host, &vm, &update))
    })
    .await?;
    log::info!(
        "{} registered VM {id} at {}:{} (generation {})",
        c.0,
        update.host_addr,
        update.port,
        out.generation
    );
    Ok(Json(out))
}

// ---- policy

async fn list_rules(
    c: Caller,
    State(reg): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Vec<PolicyRule>> {
    c.admin()?;
    let m = reg.read();
    let net = q.get("network");
    Ok(Json(
        m.rules
            .values()
            .filter(|r| net.is_none_or(|n| r.network == *n))
            .cloned()
            .collect(),
    ))
}

async fn create_rule(c: Caller, State(reg): State<Shared>, body: Bytes) -> ApiResult<PolicyRule> {
    c.admin()?;
    let spec: PolicyRuleSpec = parse(&body)?;
    let out = write(&reg, move |r| r.write(|m| plan::create_rule(m, &spec))).await?;
    log::info!(
        "{} added rule {}: {} {} <-> {}",
        c.0,
        out.id,
        out.action,
        out.a,
        out.b
    );
    Ok(Json(out))
}

async fn delete_rule(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Deleted> {
    c.admin()?;
    let out = write(&reg, move |r| r.write(|m| plan::delete_rule(m, &id))).await?;
    log::info!("{} deleted {}", c.0, out.deleted);
    Ok(Json(out))
}

// ---- tokens and watch

async fn token(c: Caller, State(reg): State<Shared>, body: Bytes) -> ApiResult<TokenGrant> {
    let req: TokenRequest = parse(&body)?;
    match reg.token(&c.0, &req) {
        Ok(g) => Ok(Json(g)),
        Err(e) => {
            log::info!("token refused to {}: {}", c.0, e.message);
            Err(e)
        }
    }
}

async fn watch(
    _: Caller,
    State(reg): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<WatchResponse> {
    let since: u64 = match q.get("since") {
        None => 0,
        Some(s) => s.parse().map_err(|_| {
            ApiError::new(
                ErrorCode::BadRequest,
                format!("since={s:?} is not a generation number"),
            )
        })?,
    };
    let timeout = match q.get("timeout_ms") {
        None => DEFAULT_WATCH,
        Some(s) => Duration::from_millis(s.parse().map_err(|_| {
            ApiError::new(
                ErrorCode::BadRequest,
                format!("timeout_ms={s:?} is not a number"),
            )
        })?),
    }
    .min(MAX_WATCH);
    let vms: Vec<String> = q
        .get("vms")
        .map(|s| {
            s.split(',')
                .filter(|v| !v.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    for v in &vms {
        validate_id(v).map_err(|m| ApiError::new(ErrorCode::InvalidId, m))?;
    }
    let mut rx = reg.subscribe();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        {
            let m = reg.read();
            if since > m.generation {
                // The client knows a future we do not: the store was replaced. Start over.
                return Ok(Json(WatchResponse {
                    generation: m.generation,
                    changes: vec![],
                    resync: true,
                }));
            }
            let (changes, resync) = m.changes_since(since, &vms);
            if !changes.is_empty() || resync {
                let generation = changes
                    .last()
                    .map_or(m.generation, |c| c.generation.max(since));
                let generation = if resync { m.generation } else { generation };
                return Ok(Json(WatchResponse {
                    generation,
                    changes,
                    resync,
                }));
            }
            rx.mark_unchanged();
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => continue,
            _ => {
                let generation = reg.read().generation;
                return Ok(Json(WatchResponse {
                    generation,
                    changes: vec![],
                    resync: false,
                }));
            }
        }
    }
}

// ---- serving

/// Accepts TLS connections on `listener` and serves the API until the process ends.
///
/// At most `max_connections` connections are open at once; further clients wait in the kernel's
/// accept queue instead of exhausting file descriptors. A client has 10 s to finish the TLS
/// handshake.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    reg: Shared,
    max_connections: usize,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let app = router(reg);
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        log::info!("TLS handshake with {peer} failed: {e}");
                        return;
                    }
                    Err(_) => {
                        log::info!("TLS handshake with {peer} timed out");
                        return;
                    }
                };
            let identity = {
                let (_, conn) = tls.get_ref();
                match conn.peer_certificates().and_then(|c| c.first()) {
                    Some(cert) => identity_from_cert(cert.as_ref()),
                    None => Err("no client certificate".to_string()),
                }
            };
            if let Err(why) = &identity {
                log::info!("connection from {peer} has no usable identity: {why}");
            }
            let peer_identity = PeerIdentity(identity);
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer_identity.clone());
                    let mut app = app.clone();
                    async move { tower_service::Service::call(&mut app, req).await }
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(tls), service);
            if let Err(e) = conn.await {
                log::debug!("connection from {peer} ended: {e}");
            }
        });
    }
}
