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
    reg.read()
        .networks
        .get(&id)
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownNetwork, format!("no network {id}")))
}

pub(super) async fn create_network(
    c: Caller,
    State(reg): State<Shared>,
    once: Once,
    body: Bytes,
) -> ApiResult<Network> {
    c.admin()?;
    let spec: NetworkSpec = parse(&body)?;
    let out = write(&reg, move |r| {
        r.write_once(once.key(), |m| plan::create_network(m, &spec))
    })
    .await?;
    log::info!(
        "{} created network {} ({}, vni {})",
        c.0,
        out.id,
        out.cidr,
        out.vni
    );
    Ok(Json(out))
}

pub(super) async fn delete_network(
    c: Caller,
    State(reg): State<Shared>,
    once: Once,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Deleted> {
    c.admin()?;
    let cascade = flag(&q, "cascade")?;
    let out = write(&reg, move |r| {
        let reuse = r.port_reuse();
        r.write_once(once.key(), |m| plan::delete_network(m, &id, cascade, reuse))
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

pub(super) async fn list_hosts(c: Caller, State(reg): State<Shared>) -> ApiResult<Vec<Host>> {
    c.admin()?;
    Ok(Json(reg.read().hosts.values().cloned().collect()))
}

pub(super) async fn get_host(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Host> {
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

pub(super) async fn create_host(
    c: Caller,
    State(reg): State<Shared>,
    once: Once,
    body: Bytes,
) -> ApiResult<Host> {
    c.admin()?;
    let spec: HostSpec = parse(&body)?;
    let out = write(&reg, move |r| {
        r.write_once(once.key(), |m| plan::create_host(m, &spec))
    })
    .await?;
    log::info!("{} created host {} at {}", c.0, out.id, out.underlay_addr);
    Ok(Json(out))
}

pub(super) async fn delete_host(
    c: Caller,
    State(reg): State<Shared>,
    once: Once,
    Path(id): Path<String>,
) -> ApiResult<Deleted> {
    c.admin()?;
    let out = write(&reg, move |r| {
        r.write_once(once.key(), |m| plan::delete_host(m, &id))
    })
    .await?;
    log::info!("{} deleted {}", c.0, out.deleted);
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

pub(super) async fn create_gateway(
    c: Caller,
    State(reg): State<Shared>,
    once: Once,
    body: Bytes,
) -> ApiResult<Gateway> {
    c.admin()?;
    let spec: GatewaySpec = parse(&body)?;
    let out = write(&reg, move |r| {
        r.write_once_with_secret(once.key(), |m, s| plan::create_gateway(m, &spec, s))
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

pub(super) async fn delete_gateway(
    c: Caller,
    State(reg): State<Shared>,
    once: Once,
    Path(id): Path<String>,
) -> ApiResult<Deleted> {
    c.admin()?;
    let out = write(&reg, move |r| {
        r.write_once(once.key(), |m| plan::delete_gateway(m, &id))
    })
    .await?;
    log::info!("{} deleted {}", c.0, out.deleted);
    Ok(Json(out))
}

pub(super) async fn gateway_secret(
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

pub(super) async fn create_rule(
    c: Caller,
    State(reg): State<Shared>,
    once: Once,
    body: Bytes,
) -> ApiResult<PolicyRule> {
    c.admin()?;
    let spec: PolicyRuleSpec = parse(&body)?;
    let out = write(&reg, move |r| {
        r.write_once(once.key(), |m| plan::create_rule(m, &spec))
    })
    .await?;
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

pub(super) async fn delete_rule(
    c: Caller,
    State(reg): State<Shared>,
    once: Once,
    Path(id): Path<String>,
) -> ApiResult<Deleted> {
    c.admin()?;
    let out = write(&reg, move |r| {
        r.write_once(once.key(), |m| plan::delete_rule(m, &id))
    })
    .await?;
    log::info!("{} deleted {}", c.0, out.deleted);
    Ok(Json(out))
}
