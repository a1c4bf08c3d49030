//! The public side of a network: port-forwarding rules, NAT port growth, and the gateway's
//! view of its network (`GET /v1/gateways/{id}/config`).

use super::*;
use crate::model::Model;

pub(super) async fn list_forwards(
    c: Caller,
    State(reg): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Vec<ForwardRule>> {
    admin_list(&c, &reg, &q, |m| &m.forwards, |f| &f.network)
}

pub(super) async fn create_forward(w: AdminWrite, body: Bytes) -> ApiResult<ForwardRule> {
    let out = w.plan_body(&body, plan::create_forward).await?;
    log::info!(
        "{} added forward {}: {}:{}/{} -> {}:{}",
        w.caller,
        out.id,
        out.public_addr,
        out.public_port,
        out.proto,
        out.vm,
        out.vm_port
    );
    Ok(Json(out))
}

pub(super) async fn delete_forward(w: AdminWrite, Path(id): Path<String>) -> ApiResult<Deleted> {
    let out = w.plan(move |m| plan::delete_forward(m, &id)).await?;
    log::info!("{} deleted {}", w.caller, out.deleted);
    Ok(Json(out))
}

pub(super) async fn grow_nat_ports(
    w: AdminWrite,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<VmRecord> {
    let out = if body.is_empty() {
        w.plan(move |m| plan::grow_nat_ports(m, &id, 1)).await?
    } else {
        w.plan_body(&body, move |m, req: &NatGrow| {
            plan::grow_nat_ports(m, &id, req.blocks)
        })
        .await?
    };
    log::info!(
        "{} grew VM {}'s NAT ports to {:?}",
        w.caller,
        out.id,
        out.nat_ports
    );
    Ok(Json(out))
}

pub(super) async fn gateway_config(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<GatewayConfig> {
    c.admin_or(Role::Gateway, &id)?;
    config_of(&reg.read(), &id).map(Json)
}

/// What gateway `id` runs on, from the model (pure).
pub(crate) fn config_of(m: &Model, id: &str) -> Result<GatewayConfig, ApiError> {
    let gw = lookup(&m.gateways, id, ErrorCode::UnknownGateway, "gateway")?;
    let network = lookup(
        &m.networks,
        &gw.network,
        ErrorCode::UnknownNetwork,
        "network",
    )?;
    let vms = m
        .vms
        .values()
        .filter(|v| v.network == gw.network)
        .map(|v| GatewayPeer {
            id: v.id.clone(),
            ip: v.ip,
            nat_ports: v.nat_ports.clone(),
            location: m
                .location_of(v)
                .map(|(host_addr, port)| UnderlayAddr { host_addr, port }),
            egress: crate::tokens::egress_allowed(m, v),
        })
        .collect();
    Ok(GatewayConfig {
        generation: m.generation,
        gateway: gw.clone(),
        network: network.clone(),
        pool: m
            .gateways
            .values()
            .filter(|g| g.public_addr == gw.public_addr && g.id != gw.id)
            .map(|g| g.id.clone())
            .collect(),
        vms,
        forwards: m
            .forwards
            .values()
            .filter(|f| f.public_addr == gw.public_addr)
            .cloned()
            .collect(),
        services: m
            .services
            .values()
            .filter(|s| s.public_addr == gw.public_addr)
            .map(|s| GatewayService {
                pool: plan::resolve_pool(m, s),
                service: s.clone(),
            })
            .collect(),
        probe_sources: m
            .gateways
            .values()
            .filter(|g| g.public_addr == gw.public_addr)
            .map(|g| g.underlay_addr)
            .collect(),
    })
}
