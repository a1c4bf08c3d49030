//! The ports that public traffic reaches on VMs stay out of NAT blocks (issue #10): a
//! forwarding rule's VM port, and a service's VM port and health-check port.
//!
//! - **A forward's VM port, on its VM.** vnpd takes a packet to a port inside its VM's NAT
//!   blocks for the answer to one of the VM's own NATed flows (`NatTable::inbound`), so the
//!   rule's connections would be dropped as `UnknownMapping`; and the gateway turns the VM's
//!   packets from the rule's VM port into the rule's replies, so a NATed flow mapped to that
//!   port would leave from the rule's public port. Other VMs' blocks are harmless: the gateway
//!   keys forwarded replies by VM, and only the rule's VM receives forwarded traffic.
//! - **A service's VM port, on every VM of the network.** The same vnpd reason holds on each
//!   member, and the gateway takes a packet from the service's VM port of *any* VM of the
//!   network for a service reply (flows placed on a VM later removed from the pool finish), so
//!   a non-member's NATed flow mapped to that port would leave from the service's port.
//! - **A service's health-check port, on every VM of the network.** A member's vnpd would take
//!   the probe for a NAT answer and the member would never come up. Pools select VMs by tag,
//!   including VMs created later, so the whole network is kept clear rather than today's
//!   members.
//!
//! Both directions are checked: a new forward or service is refused if its port is in a NAT
//! block already handed out (`port_in_use`, naming the rule or service and the VM's block), and
//! a NAT block handed out later (a new VM, `nat-grow`) skips those ports.

use super::*;

/// A port public traffic reaches on a VM, and what reaches it (for error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReachedPort {
    pub port: u16,
    pub what: String,
}

/// The ports of `service` that must stay outside the NAT blocks of every VM of its network.
fn service_ports(id: &str, vm_port: u16, check_port: u16) -> Vec<ReachedPort> {
    let mut out = vec![ReachedPort {
        port: vm_port,
        what: format!("service {id}'s VM port {vm_port}"),
    }];
    if check_port != vm_port {
        out.push(ReachedPort {
            port: check_port,
            what: format!("service {id}'s health-check port {check_port}"),
        });
    }
    out
}

/// The ports reached on VM `vm` of `network` (a VM that may not exist yet): the VM ports of
/// the forwards towards it, and the VM and health-check ports of the network's services.
pub(crate) fn reached_ports(model: &Model, network: &str, vm: &str) -> Vec<ReachedPort> {
    let forwards = model
        .forwards
        .values()
        .filter(|f| f.vm == vm)
        .map(|f| ReachedPort {
            port: f.vm_port,
            what: format!("forward {}'s VM port {}", f.id, f.vm_port),
        });
    let services = model
        .services
        .values()
        .filter(|s| s.network == network)
        .flat_map(|s| service_ports(&s.id, s.vm_port, s.check_port()));
    forwards.chain(services).collect()
}

/// Refuses `reached` if it is inside a NAT block of one of `vms`.
pub(crate) fn check_outside_blocks<'v>(
    mut vms: impl Iterator<Item = &'v VmRecord>,
    reached: &ReachedPort,
) -> Result<(), ApiError> {
    let hit = vms.find_map(|v| {
        v.nat_ports
            .iter()
            .find(|b| b.contains(reached.port))
            .map(|b| (v, b))
    });
    match hit {
        Some((vm, block)) => refuse(
            ErrorCode::PortInUse,
            format!(
                "{} is inside VM {}'s NAT block {block}: vnpd would take its traffic for \
                 answers to the VM's own NAT flows; use a port below {NAT_FIRST_PORT} or \
                 outside the NAT blocks of network {}",
                reached.what, vm.id, vm.network
            ),
        ),
        None => Ok(()),
    }
}

/// Refuses a service (`id`) whose VM port or health-check port is inside a NAT block of one
/// of `vms`.
pub(crate) fn check_service_ports<'v>(
    vms: impl Iterator<Item = &'v VmRecord> + Clone,
    id: &str,
    vm_port: u16,
    check_port: u16,
) -> Result<(), ApiError> {
    for reached in service_ports(id, vm_port, check_port) {
        check_outside_blocks(vms.clone(), &reached)?;
    }
    Ok(())
}

/// What a new forward or service must not share its VM port with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SharedWith {
    /// A new service: the forwards of its network.
    Forwards,
    /// A new forward: the services of its network.
    Services,
}

/// Refuses a forward and a service of one network that share a VM port and protocol.
///
/// The gateway turns a VM's packet from a forward's VM port into the forward's reply, and a
/// packet from a service's VM port (on any VM of the network) into the service's reply; with
/// both on one port it cannot tell which flow a packet answers, and it takes the forward
/// (`ServiceTable::build`), so the service's clients would get their answers from the
/// forward's public port. Found by the `gateway` fuzz target. (Two forwards may share a VM
/// port: the gateway keys their replies by VM.)
pub(crate) fn check_no_shared_vm_port(
    model: &Model,
    against: SharedWith,
    (network, proto, vm_port): (&str, L4Proto, u16),
    what: &str,
) -> Result<(), ApiError> {
    let other = match against {
        SharedWith::Forwards => model
            .forwards
            .values()
            .find(|f| f.network == network && f.proto == proto && f.vm_port == vm_port)
            .map(|f| format!("forward {} (to {}:{})", f.id, f.vm, f.vm_port)),
        SharedWith::Services => model
            .services
            .values()
            .find(|s| s.network == network && s.proto == proto && s.vm_port == vm_port)
            .map(|s| format!("service {}", s.id)),
    };
    match other {
        Some(other) => refuse(
            ErrorCode::PortInUse,
            format!(
                "{what} uses VM port {vm_port}/{proto} like {other} in network {network}: \
                 the gateway could not tell their replies apart; use another VM port"
            ),
        ),
        None => Ok(()),
    }
}
