//! Load-balancing decisions for vnp gateways (issue #10, seed US8958293), with no I/O.
//!
//! - [`maglev`]: the consistent lookup table. Every gateway that builds it from the same healthy
//!   members (same ids, same weights, same table size) gets the identical table, because the
//!   hashes use a fixed seed; so gateways agree on a flow's VM without talking.
//! - [`flows`]: the local flow table that keeps an established flow on its VM when the pool
//!   changes (unless that VM became unhealthy).
//! - [`health`]: the per-member health state machine (rise/fall thresholds).
//! - [`FlowKey`]: the 5-tuple a decision is made for.
//!
//! The gateway daemon owns the clocks, sockets and probes; everything here takes `now` as an
//! argument so that it is deterministic and unit-testable.

pub mod flows;
pub mod health;
pub mod maglev;

use std::net::Ipv4Addr;

pub use flows::{Choice, FlowTable, FlowTimeouts};
pub use health::{http_reply_ok, CheckKind, HealthConfig, HealthState, Probe};
pub use maglev::{BuildError, Member, Table, DEFAULT_TABLE_SIZE};

/// IP protocol numbers a service can be defined for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IPv4 protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
}

/// A flow as the public side sees it: client address and port, service address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub proto: Proto,
    pub client: Ipv4Addr,
    pub client_port: u16,
    pub service: Ipv4Addr,
    pub service_port: u16,
}

impl FlowKey {
    /// The bytes the flow hash is computed over (fixed layout, so every gateway hashes alike).
    pub fn to_bytes(&self) -> [u8; 13] {
        let mut b = [0u8; 13];
        b[0] = self.proto.number();
        b[1..5].copy_from_slice(&self.client.octets());
        b[5..7].copy_from_slice(&self.client_port.to_be_bytes());
        b[7..11].copy_from_slice(&self.service.octets());
        b[11..13].copy_from_slice(&self.service_port.to_be_bytes());
        b
    }
}
