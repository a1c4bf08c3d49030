//! Per-VM NAT port remapping (issue #9, US9419921): a VM's packets to destinations outside its
//! network leave with their source port (TCP, UDP) or echo identifier (ICMP) rewritten into
//! the VM's NAT port blocks, and go to the network's gateway, which rewrites only the source
//! address to its public address. Replies come back through any gateway of that public
//! address (it finds the VM from the destination port's block alone, no per-flow state) with
//! only the destination address put back; vnpd puts back the port. Pure: no I/O, the caller
//! passes the time.
//!
//! - [`flow`]: flow keys, TCP-state-aware idle timeouts (the numbers and why), port blocks;
//! - [`table`]: [`NatTable`], one VM's mappings (and inbound, port-forwarded flows);
//! - [`packet`]: the rewrite on a local copy of the headers, incremental checksums, ICMP
//!   errors translated back;
//! - [`answer`]: the guest's fast failure when its ports are used up;
//! - [`gateways`]: which gateway an inbound flow's replies leave through, and the tokens for
//!   gateways other than the assigned one.
//!
//! `datapath::nat_hook` calls these from vnpd's TX and RX paths; `docs/vnpd-datapath.md`
//! ("NAT and the gateway") describes the whole.

pub mod answer;
pub mod flow;
pub mod gateways;
pub mod packet;
pub mod table;

use std::net::Ipv4Addr;

pub use flow::{FlowKey, FlowState, PortBlock, Proto, CLOCK_START};
pub use packet::NatDrop;
pub use table::{FlowView, ImportReport, MovedFlow, NatRefusal, NatStats, NatTable};

/// The "outside" wildcard of gateway-scoped tokens (`IP_VM` of the outside end, whatever the
/// outside address is; `docs/protocol.md`).
pub use vnp_protocol::OUTSIDE;

/// Whether `addr` is inside the network `vm_ip/prefix_len` (else it is reached through the
/// gateway).
pub fn in_network(vm_ip: Ipv4Addr, prefix_len: u8, addr: Ipv4Addr) -> bool {
    if prefix_len == 0 {
        return true;
    }
    let mask = u32::MAX << (32 - u32::from(prefix_len.min(32)));
    u32::from(vm_ip) & mask == u32::from(addr) & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_membership() {
        let vm = Ipv4Addr::new(10, 0, 0, 2);
        assert!(in_network(vm, 24, Ipv4Addr::new(10, 0, 0, 200)));
        assert!(!in_network(vm, 24, Ipv4Addr::new(10, 0, 1, 1)));
        assert!(!in_network(vm, 24, Ipv4Addr::new(203, 0, 113, 5)));
        assert!(in_network(vm, 32, vm));
        assert!(!in_network(vm, 32, Ipv4Addr::new(10, 0, 0, 3)));
        assert!(in_network(vm, 0, Ipv4Addr::new(1, 2, 3, 4)));
    }
}
