//! The service bridge (issue #11): metadata, DNS and short-lived credentials served on the
//! host, one per VM, never trusting the guest. See `docs/metadata.md`.
//!
//! - [`source`]: the registry calls behind a trait ([`MetadataSource`]).
//! - [`http`], [`routes`], [`tree`]: the GCE-compatible metadata server, pure: request bytes
//!   and state in, a response (or what to fetch first) out.
//! - [`dns`]: answers for `metadata.google.internal` and the VM's own name, pure.

mod bridged;
mod conn;
pub mod counters;
pub mod dns;
pub mod dns_forward;
pub mod http;
pub mod netif;
pub mod routes;
pub mod server;
pub mod service;
pub mod session;
pub mod source;
pub mod thread;
pub mod tree;

use std::net::Ipv4Addr;

pub use server::BridgeLimits;
pub use source::MetadataSource;
pub use thread::{Bridge, BridgeSpec, Deliver, Inbox};

/// The metadata server's address (GCE's, link-local): also the resolver DHCP hands out.
pub const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
