//! Pure planning of every write: validate against the current [`Model`] and return the
//! [`Op`]s to commit. No I/O and no randomness (secrets are passed in), so each rule about bad
//! input is unit-tested here.

use crate::error::{refuse, ApiError};
use crate::model::{Model, Op, QuarantinedPort, SecretEntry, SecretOwner, CHANGE_LOG_RETAIN};
use std::net::Ipv4Addr;
use vnp_protocol::token::VmSecret;
use vnp_registry_client::api::*;
use vnp_registry_client::net::{MacAddr, PortRange};

/// Guest MTU when a network does not say: 1500 minus VNP encapsulation (48) and headroom.
pub const DEFAULT_MTU: u16 = 1400;
/// Ports each VM's first NAT block holds unless the network says otherwise. The public ports
/// 1024..=65535 (64512) of one address are shared by the VMs of its network: 512 ports per VM
/// fit 126 VMs on one address (1024 fit only 63), and 512 concurrent flows per VM (vnpd maps
/// endpoint-independently, so one port per flow) cover all but busy servers and crawlers,
/// which grow by further blocks (`POST /v1/vms/{id}/nat-ports`) without any restart. Cloud
/// NAT's 64 is too few for a browser or package manager. See `docs/gateway.md`.
pub const DEFAULT_NAT_BLOCK: u16 = 512;
/// First NAT source port handed out (below are well-known/registered low ports).
pub const NAT_FIRST_PORT: u16 = 1024;
/// Per-host UDP port range for VMs unless the host says otherwise.
pub const DEFAULT_HOST_PORTS: PortRange = PortRange {
    first: 40000,
    last: 49999,
};

pub type Planned<T> = Result<(Vec<Op>, T), ApiError>;

/// How long a host port stays out of reach of other VMs after its VM gave it up, unless the
/// registry is told otherwise (`--port-quarantine-secs`).
pub const DEFAULT_PORT_QUARANTINE_SECS: u64 = 600;

/// The clock and the rule for reusing host ports, given to every planner that hands out or
/// gives up a VM's host port (planners read no clock themselves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortReuse {
    /// Unix seconds.
    pub now: u64,
    /// A port a VM gave up goes to no other VM for this long.
    pub quarantine_secs: u64,
}

/// Ops for `vm` giving up `port` on `host`: the port goes into quarantine, and quarantines on
/// that host that have run out are forgotten (except for ports a VM holds again: this batch
/// may quarantine those for another VM it releases).
pub(crate) fn release_port_ops(
    model: &Model,
    host: &str,
    port: u16,
    vm: &str,
    reuse: PortReuse,
) -> Vec<Op> {
    let held = |p: u16| {
        model
            .vms
            .values()
            .any(|v| v.host.as_deref() == Some(host) && v.host_port == Some(p))
    };
    let mut ops: Vec<Op> = model
        .quarantined
        .range((host.to_string(), 0)..=(host.to_string(), u16::MAX))
        .filter(|(_, q)| q.until <= reuse.now && q.port != port && !held(q.port))
        .map(|(_, q)| Op::ReleasePort(q.host.clone(), q.port))
        .collect();
    if reuse.quarantine_secs > 0 {
        ops.push(Op::QuarantinePort(QuarantinedPort {
            host: host.to_string(),
            port,
            vm: vm.to_string(),
            until: reuse.now.saturating_add(reuse.quarantine_secs),
        }));
    }
    ops
}

/// [`release_port_ops`] for whatever port `vm` holds now, if it holds one.
pub(crate) fn release_vm_port_ops(model: &Model, vm: &VmRecord, reuse: PortReuse) -> Vec<Op> {
    match (&vm.host, vm.host_port) {
        (Some(host), Some(port)) => release_port_ops(model, host, port, &vm.id, reuse),
        _ => Vec::new(),
    }
}

/// Refuses `port` on `host` for `vm` while it is in another VM's quarantine.
pub(crate) fn check_not_quarantined(
    model: &Model,
    host: &str,
    port: u16,
    vm: &str,
    now: u64,
) -> Result<(), ApiError> {
    match model.port_quarantine(host, port, vm, now) {
        Some(q) => refuse(
            ErrorCode::PortQuarantined,
            format!(
                "port {port} on host {host} was VM {}'s and is quarantined for {} s more",
                q.vm,
                q.until - now
            ),
        ),
        None => Ok(()),
    }
}

pub(crate) fn check_id(id: &str) -> Result<(), ApiError> {
    validate_id(id).map_err(|m| ApiError::new(ErrorCode::InvalidId, m))
}

/// Appends a change-log entry (and trims the log when it is full).
pub(crate) fn change_ops(model: &Model, vm: &VmRecord, kind: ChangeKind) -> Vec<Op> {
    let mut ops = Vec::with_capacity(2);
    ops.push(Op::AppendChange(change_entry(
        vm,
        model.generation + 1,
        kind,
    )));
    if model.changes.len() >= CHANGE_LOG_RETAIN {
        let drop_to = model.changes.len() + 1 - CHANGE_LOG_RETAIN;
        if let Some(first_kept) = model.changes.get(drop_to) {
            ops.push(Op::TrimChanges(first_kept.generation));
        }
    }
    ops
}

/// One change-log entry about `vm`.
pub(crate) fn change_entry(vm: &VmRecord, generation: u64, kind: ChangeKind) -> VmChange {
    VmChange {
        generation,
        vm: vm.id.clone(),
        kind,
        host: vm.host.clone(),
        endpoint: vm.endpoint,
        secret_generation: vm.secret_generation,
        ip: Some(vm.ip),
    }
}

pub(crate) fn check_name(what: &str, value: &str) -> Result<(), ApiError> {
    validate_id(value).map_err(|m| ApiError::new(ErrorCode::BadRequest, format!("{what}: {m}")))
}

mod forward;
mod host;
pub mod metadata;
mod network;
mod policy;
mod service;
mod vm;
mod vm_ports;

pub use forward::{create_forward, delete_forward, grow_nat_ports};
pub(crate) use forward::{forwards_of_vm_ops, pick_nat_block};

pub use host::{create_gateway, create_host, delete_gateway, delete_host};
pub use network::{create_network, delete_network};
pub use policy::{create_rule, delete_rule};
pub use service::{
    add_member, create_service, delete_service, remove_member, report_health, resolve_pool,
    views_of,
};
pub(crate) use service::{service_on, service_port_in, services_of_vm_ops, services_where};
pub use vm::{
    cancel_migration, create_vm, delete_vm, move_vm, register_endpoint, rotate_vm_secret,
    start_migration,
};

#[cfg(test)]
mod public_tests;
#[cfg(test)]
mod service_tests;
#[cfg(test)]
mod tests;
