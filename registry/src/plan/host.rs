//! Hosts and gateways.

use super::*;

/// Creates a host.
pub fn create_host(model: &Model, spec: &HostSpec) -> Planned<Host> {
    check_id(&spec.id)?;
    if model.hosts.contains_key(&spec.id) {
        return refuse(
            ErrorCode::Duplicate,
            format!("host {} already exists", spec.id),
        );
    }
    if spec.underlay_addr.is_unspecified()
        || spec.underlay_addr.is_broadcast()
        || spec.underlay_addr.is_multicast()
    {
        return refuse(
            ErrorCode::BadRequest,
            format!("{} is not a usable underlay address", spec.underlay_addr),
        );
    }
    if let Some(other) = model
        .hosts
        .values()
        .find(|h| h.underlay_addr == spec.underlay_addr)
    {
        return refuse(
            ErrorCode::DuplicateIp,
            format!(
                "underlay address {} is used by host {}",
                spec.underlay_addr, other.id
            ),
        );
    }
    let host = Host {
        id: spec.id.clone(),
        underlay_addr: spec.underlay_addr,
        port_range: spec.port_range.unwrap_or(DEFAULT_HOST_PORTS),
    };
    Ok((vec![Op::PutHost(host.clone())], host))
}

/// Deletes a host; refuses while VMs are assigned to it. Its port quarantines go with it.
pub fn delete_host(model: &Model, id: &str) -> Planned<Deleted> {
    if !model.hosts.contains_key(id) {
        return refuse(ErrorCode::UnknownHost, format!("no host {id}"));
    }
    let on_it: Vec<&str> = model
        .vms
        .values()
        .filter(|v| v.host.as_deref() == Some(id))
        .map(|v| v.id.as_str())
        .collect();
    if !on_it.is_empty() {
        return refuse(
            ErrorCode::NotEmpty,
            format!(
                "host {id} still runs VM(s) {}; move or delete them first",
                on_it.join(", ")
            ),
        );
    }
    let mut ops = vec![Op::DeleteHost(id.to_string())];
    ops.extend(
        model
            .quarantined
            .range((id.to_string(), 0)..=(id.to_string(), u16::MAX))
            .map(|(_, q)| Op::ReleasePort(q.host.clone(), q.port)),
    );
    Ok((
        ops,
        Deleted {
            deleted: format!("host/{id}"),
            cascaded: vec![],
        },
    ))
}

/// Registers a network's gateway with a fresh secret.
pub fn create_gateway(model: &Model, spec: &GatewaySpec, secret: VmSecret) -> Planned<Gateway> {
    check_id(&spec.id)?;
    if model.gateways.contains_key(&spec.id) {
        return refuse(
            ErrorCode::Duplicate,
            format!("gateway {} already exists", spec.id),
        );
    }
    let net = model.networks.get(&spec.network).ok_or_else(|| {
        ApiError::new(
            ErrorCode::UnknownNetwork,
            format!("no network {}", spec.network),
        )
    })?;
    if let Some(g) = model.gateway_of(&spec.network) {
        return refuse(
            ErrorCode::Duplicate,
            format!("network {} already has gateway {}", spec.network, g.id),
        );
    }
    if spec.port == 0 {
        return refuse(ErrorCode::BadRequest, "gateway port must not be 0");
    }
    let gw = Gateway {
        id: spec.id.clone(),
        network: net.id.clone(),
        vni: net.vni,
        underlay_addr: spec.underlay_addr,
        port: spec.port,
        secret_generation: 1,
    };
    let ops = vec![
        Op::PutGateway(gw.clone()),
        Op::PutSecret(
            SecretOwner::Gateway(gw.id.clone()),
            SecretEntry::new(secret, 1),
        ),
    ];
    Ok((ops, gw))
}

/// Removes a gateway and its secret.
pub fn delete_gateway(model: &Model, id: &str) -> Planned<Deleted> {
    if !model.gateways.contains_key(id) {
        return refuse(ErrorCode::UnknownGateway, format!("no gateway {id}"));
    }
    let ops = vec![
        Op::DeleteGateway(id.to_string()),
        Op::DeleteSecret(SecretOwner::Gateway(id.to_string())),
    ];
    Ok((
        ops,
        Deleted {
            deleted: format!("gateway/{id}"),
            cascaded: vec![],
        },
    ))
}
