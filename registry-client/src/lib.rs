//! Registry API types and the client that hosts and gateways use; vnpctl.
//!
//! - [`api`]: every request and response of the registry's HTTPS+JSON API (`docs/registry.md`).
//! - [`net`]: CIDR, MAC and port-range value types with strict parsing.
//! - [`client`]: a blocking mutual-TLS client for plain threads (vnpd's control thread).
//! - `pki` (feature `pki`): the development CA behind `vnpctl ca` / `vnpctl cert`.
//! - [`watcher`]: follows VM changes across long-polls (what live migration relies on).
//! - [`token_cache`]: bounded token cache with refresh-ahead and invalidation on endpoint change.
//!
//! Deliberately free of the server's dependencies (no async runtime, web framework or store).

pub mod api;
pub mod client;
pub mod error;
pub mod net;
#[cfg(feature = "pki")]
pub mod pki;
pub mod token_cache;
pub mod watcher;

pub use api::*;
pub use client::{ClientConfig, RegistryClient};
pub use error::ClientError;
pub use net::{Ipv4Cidr, MacAddr, NetParseError, PortRange};
pub use token_cache::{PairKey, TokenCache};
pub use watcher::{EndpointWatcher, WatchEvent};
