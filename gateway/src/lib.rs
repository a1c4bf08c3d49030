//! The vnp gateway's pure logic: no I/O, so every decision is unit- and property-tested.
//!
//! - [`table`]: NAT reverse lookup (public port -> VM by its port blocks) and forwarding rules,
//!   built from the registry's `GatewayConfig`;
//! - [`translate`]: outbound and inbound address rewrites with incremental checksum updates;
//! - [`icmp`]: ICMP errors about NATed flows translated back to the VM;
//! - [`services`]: load-balanced services (Maglev table, flow table; issue #10);
//! - [`rx`]: the VNP receive checks with the gateway's secret and the `OUTSIDE` rule;
//! - [`tokens`]: the gateway's cache of registry tokens towards VMs;
//! - [`metrics`]: drop reasons, counters, port-block use, Prometheus text.
//!
//! The daemon (`src/bin/vnp-gateway`) adds the sockets, the TUN device and the registry.

pub mod icmp;
pub mod metrics;
pub mod rx;
pub mod services;
pub mod table;
pub mod tokens;
pub mod translate;

pub use metrics::DropReason;
