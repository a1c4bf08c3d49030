//! vnpd: the per-host vhost-user-net backend of the vnp virtual network.
//!
//! Folder layout follows the data flow:
//! - [`edge`]: what a guest sees of the network: ARP and DHCP answered locally (pure functions).
//! - [`ring`]: the ring engine: guest memory, descriptor chains, RX buffers, message batches
//!   (knows nothing of VNP).
//! - [`device`]: the vhost-user-net device: feature negotiation, one handler per queue pair.
//! - [`datapath`]: VNP encapsulation/decapsulation, receive checks, pending queue, UDP batching;
//!   the device's queue-pair handler.
//! - [`nat`]: per-VM NAT port remapping for traffic through the gateway (pure).
//! - [`metrics`]: counters by VM and drop reason, Prometheus text rendering.
//! - [`control`]: the control thread that talks to the registry (tokens, endpoints, secrets).
//! - [`admin`]: the local admin API (unix socket) and persisted attachments.
//! - [`migrate_state`]: the NAT flows and metadata sessions that move with a migrating VM.

pub mod admin;
pub mod bridge;
pub mod config;
pub mod control;
pub mod datapath;
pub mod device;
pub mod edge;
pub mod metrics;
pub mod migrate_state;
pub mod nat;
pub mod ring;
