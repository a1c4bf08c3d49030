//! Pure planning of every write: validate against the current [`Model`] and return the
//! [`Op`]s to commit. No I/O and no randomness (secrets are passed in), so each rule about bad
//! input is unit-tested here.

use crate::error::{refuse, ApiError};
use crate::model::{Model, Op, SecretEntry, SecretOwner, CHANGE_LOG_RETAIN};
use std::net::Ipv4Addr;
use vnp_protocol::token::VmSecret;
use vnp_registry_client::api::*;
use vnp_registry_client::net::{MacAddr, PortRange};

/// Guest MTU when a network does not say: 1500 minus VNP encapsulation (48) and headroom.
pub const DEFAULT_MTU: u16 = 1400;
/// Ports each VM gets for NAT at the gateway unless the network says otherwise.
pub const DEFAULT_NAT_BLOCK: u16 = 1024;
/// First NAT source port handed out (below are well-known/registered low ports).
pub const NAT_FIRST_PORT: u16 = 1024;
/// Per-host UDP port range for VMs unless the host says otherwise.
pub const DEFAULT_HOST_PORTS: PortRange = PortRange {
    first: 40000,
    last: 49999,
};

pub type Planned<T> = Result<(Vec<Op>, T), ApiError>;

pub(crate) fn check_id(id: &str) -> Result<(), ApiError> {
    validate_id(id).map_err(|m| ApiError::new(ErrorCode::InvalidId, m))
}

/// Appends a change-log entry (and trims the log when it is full).
pub(crate) fn change_ops(model: &Model, vm: &VmRecord, kind: ChangeKind) -> Vec<Op> {
    let mut ops = Vec::with_capacity(2);
    let generation = model.generation + 1;
    ops.push(Op::AppendChange(VmChange {
        generation,
        vm: vm.id.clone(),
        kind,
        host: vm.host.clone(),
        endpoint: vm.endpoint,
        secret_generation: vm.secret_generation,
    }));
    if model.changes.len() >= CHANGE_LOG_RETAIN {
        let drop_to = model.changes.len() + 1 - CHANGE_LOG_RETAIN;
        if let Some(first_kept) = model.changes.get(drop_to) {
            ops.push(Op::TrimChanges(first_kept.generation));
        }
    }
    ops
}

pub(crate) fn check_name(what: &str, value: &str) -> Result<(), ApiError> {
    validate_id(value).map_err(|m| ApiError::new(ErrorCode::BadRequest, format!("{what}: {m}")))
}

mod host;
mod network;
mod policy;
mod vm;

pub use host::{create_gateway, create_host, delete_gateway, delete_host};
pub use network::{create_network, delete_network};
pub use policy::{create_rule, delete_rule};
pub use vm::{create_vm, delete_vm, move_vm, register_endpoint, rotate_vm_secret};

#[cfg(test)]
mod tests;
