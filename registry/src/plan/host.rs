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

/// Registers a gateway of a network with a fresh secret. A network may have several; gateways
/// that share a public address form one NAT pool and must therefore serve the same network
/// (the VMs' NAT blocks are disjoint within a network only).
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
    if spec.port == 0 {
        return refuse(ErrorCode::BadRequest, "gateway port must not be 0");
    }
    let public_addr = spec.public_addr.unwrap_or(spec.underlay_addr);
    check_public_addr(public_addr)?;
    if let Some(g) = model
        .gateways
        .values()
        .find(|g| g.public_addr == public_addr && g.network != net.id)
    {
        return refuse(
            ErrorCode::Duplicate,
            format!(
                "public address {public_addr} is gateway {}'s for network {}; a NAT pool serves one network",
                g.id, g.network
            ),
        );
    }
    if let Some(g) = model
        .gateways
        .values()
        .find(|g| (g.underlay_addr, g.port) == (spec.underlay_addr, spec.port))
    {
        return refuse(
            ErrorCode::DuplicatePort,
            format!(
                "{}:{} is gateway {}'s VNP address",
                spec.underlay_addr, spec.port, g.id
            ),
        );
    }
    let gw = Gateway {
        id: spec.id.clone(),
        network: net.id.clone(),
        vni: net.vni,
        underlay_addr: spec.underlay_addr,
        port: spec.port,
        public_addr,
        secret_generation: 1,
    };
    let mut ops = vec![
        Op::PutGateway(gw.clone()),
        Op::PutSecret(
            SecretOwner::Gateway(gw.id.clone()),
            SecretEntry::new(secret, 1),
        ),
    ];
    ops.extend(super::service::gateways_changed_ops(model, &gw));
    Ok((ops, gw))
}

fn check_public_addr(ip: Ipv4Addr) -> Result<(), ApiError> {
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() {
        return refuse(
            ErrorCode::BadRequest,
            format!("{ip} cannot be a gateway's public address"),
        );
    }
    Ok(())
}

/// Removes a gateway and its secret. The last gateway of a public address takes the
/// forwarding rules on that address with it.
pub fn delete_gateway(model: &Model, id: &str) -> Planned<Deleted> {
    let Some(gw) = model.gateways.get(id) else {
        return refuse(ErrorCode::UnknownGateway, format!("no gateway {id}"));
    };
    let mut ops = vec![
        Op::DeleteGateway(id.to_string()),
        Op::DeleteSecret(SecretOwner::Gateway(id.to_string())),
    ];
    if model.health_views.contains_key(id) {
        ops.push(Op::DeleteHealthView(id.to_string()));
    }
    ops.extend(super::service::gateways_changed_ops(model, gw));
    let shared = model
        .gateways
        .values()
        .any(|g| g.id != id && g.public_addr == gw.public_addr);
    let mut cascaded = Vec::new();
    if !shared {
        let mut generation = model.generation;
        for f in model
            .forwards
            .values()
            .filter(|f| f.public_addr == gw.public_addr)
        {
            generation += 1;
            ops.push(Op::DeleteForward(f.id.clone()));
            if let Some(vm) = model.vms.get(&f.vm) {
                ops.push(Op::AppendChange(change_entry(
                    vm,
                    generation,
                    ChangeKind::Forwards,
                )));
            }
            cascaded.push(format!("forward/{}", f.id));
        }
        // The pools' VMs are still there; gateways of the address are not: no change needed.
        for s in services_where(model, |s| s.public_addr == gw.public_addr) {
            ops.push(Op::DeleteService(s.id.clone()));
            cascaded.push(format!("service/{}", s.id));
        }
    }
    Ok((
        ops,
        Deleted {
            deleted: format!("gateway/{id}"),
            cascaded,
        },
    ))
}
