//! The public side of a network: VMs' NAT port blocks (allocation, growth) and port-forwarding
//! rules `public_addr:public_port/proto -> vm:vm_port`.
//!
//! All gateways sharing a public address serve one network (see `create_gateway`), so "the
//! ports of an address" are the NAT blocks of that network's VMs plus the forwarded ports on
//! that address: NAT blocks are disjoint within a network and never cover a forwarded port of
//! any of its public addresses, and a forwarded port is never inside a NAT block.

use super::*;

/// A forwarded public port of `network` inside `block`, if any.
fn forwarded_in<'m>(model: &'m Model, network: &str, block: &PortRange) -> Option<&'m ForwardRule> {
    model
        .forwards
        .values()
        .find(|f| f.network == network && block.contains(f.public_port))
}

/// The first free block of the network's block size from [`NAT_FIRST_PORT`] up for VM `vm`:
/// overlapping no VM's block of the network, no forwarded or service port of the network, and
/// no port public traffic reaches on `vm` ([`vm_ports::reached_ports`]).
pub(crate) fn pick_nat_block(
    model: &Model,
    net: &Network,
    vm: &str,
) -> Result<PortRange, ApiError> {
    pick_block_besides(model, net, vm, &[])
}

fn pick_block_besides(
    model: &Model,
    net: &Network,
    vm: &str,
    also_taken: &[PortRange],
) -> Result<PortRange, ApiError> {
    let reached = vm_ports::reached_ports(model, &net.id, vm);
    let size = u32::from(net.nat_block);
    let mut first = u32::from(NAT_FIRST_PORT);
    while first + size - 1 <= u32::from(u16::MAX) {
        let block = PortRange {
            first: first as u16,
            last: (first + size - 1) as u16,
        };
        let taken = model
            .vms
            .values()
            .filter(|v| v.network == net.id)
            .flat_map(|v| v.nat_ports.iter())
            .chain(also_taken)
            .any(|b| b.overlaps(&block));
        let serviced = service_port_in(model, &net.id, &block).is_some();
        let reached_in = reached.iter().any(|r| block.contains(r.port));
        if !taken && !serviced && !reached_in && forwarded_in(model, &net.id, &block).is_none() {
            return Ok(block);
        }
        first += size;
    }
    refuse(
        ErrorCode::PoolExhausted,
        format!("no free NAT port block of {size} in network {}", net.id),
    )
}

/// Most blocks one request may add (a typo must not take a whole address).
pub const MAX_GROW_BLOCKS: u16 = 16;

/// Gives VM `id` `blocks` more NAT port blocks. Watchers (its host's vnpd, the network's
/// gateways) see a `nat_ports` change and start using them; nothing restarts.
pub fn grow_nat_ports(model: &Model, id: &str, blocks: u16) -> Planned<VmRecord> {
    let mut vm = model
        .vms
        .get(id)
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownVm, format!("no VM {id}")))?
        .clone();
    if blocks == 0 || blocks > MAX_GROW_BLOCKS {
        return refuse(
            ErrorCode::BadRequest,
            format!("blocks must be 1..={MAX_GROW_BLOCKS}, not {blocks}"),
        );
    }
    let net = model.networks.get(&vm.network).ok_or_else(|| {
        ApiError::new(
            ErrorCode::UnknownNetwork,
            format!("no network {}", vm.network),
        )
    })?;
    let mut added = Vec::new();
    for _ in 0..blocks {
        added.push(pick_block_besides(model, net, &vm.id, &added)?);
    }
    vm.nat_ports.extend(added);
    let mut ops = vec![Op::PutVm(vm.clone())];
    ops.extend(change_ops(model, &vm, ChangeKind::NatPorts));
    Ok((ops, vm))
}

/// Adds a port-forwarding rule.
pub fn create_forward(model: &Model, spec: &ForwardSpec) -> Planned<ForwardRule> {
    check_id(&spec.id)?;
    if model.forwards.contains_key(&spec.id) {
        return refuse(
            ErrorCode::Duplicate,
            format!("forward {} already exists", spec.id),
        );
    }
    let vm = model
        .vms
        .get(&spec.vm)
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownVm, format!("no VM {}", spec.vm)))?;
    if spec.public_port == 0 || spec.vm_port == 0 {
        return refuse(ErrorCode::BadRequest, "ports must not be 0");
    }
    if !model
        .gateways_of(&vm.network)
        .any(|g| g.public_addr == spec.public_addr)
    {
        return refuse(
            ErrorCode::NoGateway,
            format!(
                "no gateway of network {} (VM {}'s) has public address {}",
                vm.network, vm.id, spec.public_addr
            ),
        );
    }
    if let Some(f) = model.forwards.values().find(|f| {
        (f.public_addr, f.public_port, f.proto) == (spec.public_addr, spec.public_port, spec.proto)
    }) {
        return refuse(
            ErrorCode::PortInUse,
            format!(
                "{}:{}/{} is forwarded by rule {}",
                spec.public_addr, spec.public_port, spec.proto, f.id
            ),
        );
    }
    if let Some(s) = service_on(model, spec.public_addr, spec.public_port, spec.proto) {
        return refuse(
            ErrorCode::PortInUse,
            format!(
                "{}:{}/{} is service {}",
                spec.public_addr, spec.public_port, spec.proto, s.id
            ),
        );
    }
    if let Some(owner) = model
        .vms
        .values()
        .find(|v| v.network == vm.network && v.owns_nat_port(spec.public_port))
    {
        return refuse(
            ErrorCode::PortInUse,
            format!(
                "public port {} is in VM {}'s NAT ports; forward a port outside the NAT blocks (below {NAT_FIRST_PORT} or a free block)",
                spec.public_port, owner.id
            ),
        );
    }
    let reached = vm_ports::ReachedPort {
        port: spec.vm_port,
        what: format!("forward {}'s VM port {}", spec.id, spec.vm_port),
    };
    vm_ports::check_outside_blocks(std::iter::once(vm), &reached)?;
    vm_ports::check_no_shared_vm_port(
        model,
        vm_ports::SharedWith::Services,
        (&vm.network, spec.proto, spec.vm_port),
        &format!("forward {}", spec.id),
    )?;
    let rule = ForwardRule {
        id: spec.id.clone(),
        network: vm.network.clone(),
        public_addr: spec.public_addr,
        public_port: spec.public_port,
        proto: spec.proto,
        vm: vm.id.clone(),
        vm_port: spec.vm_port,
    };
    let mut ops = vec![Op::PutForward(rule.clone())];
    ops.extend(change_ops(model, vm, ChangeKind::Forwards));
    Ok((ops, rule))
}

/// Removes a port-forwarding rule.
pub fn delete_forward(model: &Model, id: &str) -> Planned<Deleted> {
    let rule = model
        .forwards
        .get(id)
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownForward, format!("no forward {id}")))?;
    let mut ops = vec![Op::DeleteForward(id.to_string())];
    if let Some(vm) = model.vms.get(&rule.vm) {
        ops.extend(change_ops(model, vm, ChangeKind::Forwards));
    }
    Ok((
        ops,
        Deleted {
            deleted: format!("forward/{id}"),
            cascaded: vec![],
        },
    ))
}

/// Deletes the forwarding rules towards VM `id` (with the VM).
pub(crate) fn forwards_of_vm_ops(model: &Model, id: &str) -> Vec<Op> {
    model
        .forwards
        .values()
        .filter(|f| f.vm == id)
        .map(|f| Op::DeleteForward(f.id.clone()))
        .collect()
}
