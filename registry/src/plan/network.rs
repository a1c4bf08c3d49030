//! Networks: creation (vni, CIDR overlap, MTU) and deletion (refuse or cascade).

use super::*;

/// Creates a network.
pub fn create_network(model: &Model, spec: &NetworkSpec) -> Planned<Network> {
    check_id(&spec.id)?;
    if model.networks.contains_key(&spec.id) {
        return refuse(
            ErrorCode::Duplicate,
            format!("network {} already exists", spec.id),
        );
    }
    let vni = match spec.vni {
        Some(0) => return refuse(ErrorCode::BadRequest, "vni 0 is reserved"),
        Some(v) => {
            if let Some(other) = model.networks.values().find(|n| n.vni == v) {
                return refuse(
                    ErrorCode::DuplicateVni,
                    format!("vni {v} is used by network {}", other.id),
                );
            }
            v
        }
        None => model
            .networks
            .values()
            .map(|n| n.vni)
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or_else(|| ApiError::new(ErrorCode::PoolExhausted, "no free vni"))?,
    };
    if let Some(other) = model
        .networks
        .values()
        .find(|n| n.cidr.contains(spec.cidr.network()) || spec.cidr.contains(n.cidr.network()))
    {
        // Overlap is legal between tenants in principle, but the router/gateway tables of one
        // deployment are simpler and safer without it; refuse clearly.
        return refuse(
            ErrorCode::Duplicate,
            format!(
                "cidr {} overlaps network {} ({})",
                spec.cidr, other.id, other.cidr
            ),
        );
    }
    let mtu = spec.mtu.unwrap_or(DEFAULT_MTU);
    if !(576..=9000).contains(&mtu) {
        return refuse(
            ErrorCode::BadRequest,
            format!("mtu {mtu} outside 576..=9000"),
        );
    }
    let nat_block = spec.nat_block.unwrap_or(DEFAULT_NAT_BLOCK);
    if nat_block == 0 || nat_block > u16::MAX - NAT_FIRST_PORT {
        return refuse(
            ErrorCode::BadRequest,
            format!("nat_block {nat_block} is not usable"),
        );
    }
    let net = Network {
        id: spec.id.clone(),
        vni,
        cidr: spec.cidr,
        router: spec.cidr.router(),
        mtu,
        default_policy: spec.default_policy.unwrap_or(PolicyAction::Allow),
        nat_block,
    };
    Ok((vec![Op::PutNetwork(net.clone())], net))
}

/// Deletes a network; with `cascade` also its VMs, gateway and rules.
pub fn delete_network(
    model: &Model,
    id: &str,
    cascade: bool,
    reuse: PortReuse,
) -> Planned<Deleted> {
    if !model.networks.contains_key(id) {
        return refuse(ErrorCode::UnknownNetwork, format!("no network {id}"));
    }
    let vms: Vec<&VmRecord> = model.vms.values().filter(|v| v.network == id).collect();
    let gws: Vec<&Gateway> = model
        .gateways
        .values()
        .filter(|g| g.network == id)
        .collect();
    let rules: Vec<&PolicyRule> = model.rules.values().filter(|r| r.network == id).collect();
    let empty = vms.is_empty() && gws.is_empty() && rules.is_empty();
    if !cascade && !empty {
        return refuse(
            ErrorCode::NotEmpty,
            format!(
                "network {id} still has {} VM(s), {} gateway(s), {} rule(s); delete them or pass cascade=true",
                vms.len(),
                gws.len(),
                rules.len()
            ),
        );
    }
    let mut ops = Vec::new();
    let mut cascaded = Vec::new();
    for (generation, vm) in (model.generation + 1..).zip(vms) {
        ops.push(Op::DeleteVm(vm.id.clone()));
        ops.push(Op::DeleteSecret(SecretOwner::Vm(vm.id.clone())));
        ops.extend(super::metadata::forget_vm_ops(model, &vm.id));
        ops.extend(release_vm_port_ops(model, vm, reuse));
        ops.push(Op::AppendChange(VmChange {
            generation,
            vm: vm.id.clone(),
            kind: ChangeKind::Deleted,
            host: vm.host.clone(),
            endpoint: None,
            secret_generation: vm.secret_generation,
            ip: Some(vm.ip),
        }));
        cascaded.push(format!("vm/{}", vm.id));
    }
    for g in gws {
        ops.push(Op::DeleteGateway(g.id.clone()));
        ops.push(Op::DeleteSecret(SecretOwner::Gateway(g.id.clone())));
        if model.health_views.contains_key(&g.id) {
            ops.push(Op::DeleteHealthView(g.id.clone()));
        }
        cascaded.push(format!("gateway/{}", g.id));
    }
    for r in rules {
        ops.push(Op::DeleteRule(r.id.clone()));
        cascaded.push(format!("rule/{}", r.id));
    }
    ops.extend(super::metadata::forget_project_ops(model, id));
    for f in model.forwards.values().filter(|f| f.network == id) {
        ops.push(Op::DeleteForward(f.id.clone()));
        cascaded.push(format!("forward/{}", f.id));
    }
    for s in services_where(model, |s| s.network == id) {
        ops.push(Op::DeleteService(s.id.clone()));
        cascaded.push(format!("service/{}", s.id));
    }
    ops.push(Op::DeleteNetwork(id.to_string()));
    Ok((
        ops,
        Deleted {
            deleted: format!("network/{id}"),
            cascaded,
        },
    ))
}
