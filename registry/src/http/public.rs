//! The public side of a network: port-forwarding rules, NAT port growth, and the gateway's
//! view of its network (`GET /v1/gateways/{id}/config`).

use super::*;
use crate::model::Model;

pub(super) async fn list_forwards(
    c: Caller,
    State(reg): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Vec<ForwardRule>> {
    c.admin()?;
    let m = reg.read();
    let net = q.get("network");
    Ok(Json(
        m.forwards
            .values()
            .filter(|f| net.is_none_or(|n| f.network == *n))
            .cloned()
            .collect(),
    ))
}

pub(super) async fn create_forward(
    c: Caller,
    State(reg): State<Shared>,
    once: Once,
    body: Bytes,
) -> ApiResult<ForwardRule> {
    c.admin()?;
    let spec: ForwardSpec = parse(&body)?;
    let out = write(&reg, move |r| {
        r.write_once(once.key(), |m| plan::create_forward(m, &spec))
    })
    .await?;
    log::info!(
        "{} added forward {}: {}:{}/{} -> {}:{}",
        c.0,
        out.id,
        out.public_addr,
        out.public_port,
        out.proto,
        out.vm,
        out.vm_port
    );
    Ok(Json(out))
}

pub(super) async fn delete_forward(
    c: Caller,
    State(reg): State<Shared>,
    once: Once,
    Path(id): Path<String>,
) -> ApiResult<Deleted> {
    c.admin()?;
    let out = write(&reg, move |r| {
        r.write_once(once.key(), |m| plan::delete_forward(m, &id))
    })
    .await?;
    log::info!("{} deleted {}", c.0, out.deleted);
    Ok(Json(out))
}

pub(super) async fn grow_nat_ports(
    c: Caller,
    State(reg): State<Shared>,
    once: Once,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<VmRecord> {
    c.admin()?;
    let req: NatGrow = if body.is_empty() {
        NatGrow { blocks: 1 }
    } else {
        parse(&body)?
    };
    let out = write(&reg, move |r| {
        r.write_once(once.key(), |m| plan::grow_nat_ports(m, &id, req.blocks))
    })
    .await?;
    log::info!(
        "{} grew VM {}'s NAT ports to {:?}",
        c.0,
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
    if !(c.0.role == Role::Gateway && c.0.id == id) {
        c.admin()?;
    }
    config_of(&reg.read(), &id).map(Json)
}

/// What gateway `id` runs on, from the model (pure).
pub(crate) fn config_of(m: &Model, id: &str) -> Result<GatewayConfig, ApiError> {
    let gw = m
        .gateways
        .get(id)
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownGateway, format!("no gateway {id}")))?;
    let network = m.networks.get(&gw.network).ok_or_else(|| {
        ApiError::new(
            ErrorCode::UnknownNetwork,
            format!("no network {}", gw.network),
        )
    })?;
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
