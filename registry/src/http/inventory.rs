//! Networks, hosts, gateways and pair-policy rules.

use super::*;

// ---- networks

pub(super) async fn list_networks(_: Caller, State(reg): State<Shared>) -> Json<Vec<Network>> {
    Json(reg.read().networks.values().cloned().collect())
}

pub(super) async fn get_network(
    _: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Network> {
    let m = reg.read();
    lookup(&m.networks, &id, ErrorCode::UnknownNetwork, "network").map(|n| Json(n.clone()))
}

pub(super) async fn create_network(w: AdminWrite, body: Bytes) -> ApiResult<Network> {
    let out = w.plan_body(&body, plan::create_network).await?;
    log::info!(
        "{} created network {} ({}, vni {})",
        w.caller,
        out.id,
        out.cidr,
        out.vni
    );
    Ok(Json(out))
}

pub(super) async fn delete_network(
    w: AdminWrite,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Deleted> {
    let out = w
        .run(move |r, key| {
            let cascade = flag(&q, "cascade")?;
            let reuse = r.port_reuse();
            r.write_once(key, |m| plan::delete_network(m, &id, cascade, reuse))
        })
        .await?;
    log::info!(
        "{} deleted {} (cascaded: {:?})",
        w.caller,
        out.deleted,
        out.cascaded
    );
    Ok(Json(out))
}

// ---- hosts

pub(super) async fn list_hosts(c: Caller, State(reg): State<Shared>) -> ApiResult<Vec<Host>> {
    c.admin()?;
    Ok(Json(reg.read().hosts.values().cloned().collect()))
}

pub(super) async fn get_host(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Host> {
    c.admin_or(Role::Host, &id)?;
    let m = reg.read();
    lookup(&m.hosts, &id, ErrorCode::UnknownHost, "host").map(|h| Json(h.clone()))
}

pub(super) async fn create_host(w: AdminWrite, body: Bytes) -> ApiResult<Host> {
    let out = w.plan_body(&body, plan::create_host).await?;
    log::info!(
        "{} created host {} at {}",
        w.caller,
        out.id,
        out.underlay_addr
    );
    Ok(Json(out))
}

pub(super) async fn delete_host(w: AdminWrite, Path(id): Path<String>) -> ApiResult<Deleted> {
    let out = w.plan(move |m| plan::delete_host(m, &id)).await?;
    log::info!("{} deleted {}", w.caller, out.deleted);
    Ok(Json(out))
}

pub(super) async fn host_vms(c: Caller, State(reg): State<Shared>) -> ApiResult<Vec<VmRecord>> {
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

pub(super) async fn list_gateways(c: Caller, State(reg): State<Shared>) -> ApiResult<Vec<Gateway>> {
    c.admin()?;
    Ok(Json(reg.read().gateways.values().cloned().collect()))
}

pub(super) async fn get_gateway(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Gateway> {
    c.admin_or(Role::Gateway, &id)?;
    let m = reg.read();
    lookup(&m.gateways, &id, ErrorCode::UnknownGateway, "gateway").map(|g| Json(g.clone()))
}

pub(super) async fn create_gateway(w: AdminWrite, body: Bytes) -> ApiResult<Gateway> {
    let out = w
        .run_body(&body, |r, key, spec: GatewaySpec| {
            r.write_once_with_secret(key, |m, s| plan::create_gateway(m, &spec, s))
        })
        .await?;
    log::info!(
        "{} created gateway {} for network {}",
        w.caller,
        out.id,
        out.network
    );
    Ok(Json(out))
}

pub(super) async fn delete_gateway(w: AdminWrite, Path(id): Path<String>) -> ApiResult<Deleted> {
    let out = w.plan(move |m| plan::delete_gateway(m, &id)).await?;
    log::info!("{} deleted {}", w.caller, out.deleted);
    Ok(Json(out))
}

pub(super) async fn gateway_secret(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<SecretResponse> {
    if !c.is(Role::Gateway, &id) {
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
        secret: SecretHex::from_secret(&entry.secret),
        generation: entry.generation,
    }))
}

// ---- policy

pub(super) async fn list_rules(
    c: Caller,
    State(reg): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Vec<PolicyRule>> {
    admin_list(&c, &reg, &q, |m| &m.rules, |r| &r.network)
}

pub(super) async fn create_rule(w: AdminWrite, body: Bytes) -> ApiResult<PolicyRule> {
    let out = w.plan_body(&body, plan::create_rule).await?;
    log::info!(
        "{} added rule {}: {} {} <-> {}",
        w.caller,
        out.id,
        out.action,
        out.a,
        out.b
    );
    Ok(Json(out))
}

pub(super) async fn delete_rule(w: AdminWrite, Path(id): Path<String>) -> ApiResult<Deleted> {
    let out = w.plan(move |m| plan::delete_rule(m, &id)).await?;
    log::info!("{} deleted {}", w.caller, out.deleted);
    Ok(Json(out))
}
