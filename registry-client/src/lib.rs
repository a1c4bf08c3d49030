//! Registry API types and the client that hosts and gateways use; vnpctl.
//!
//! - [`api`]: every request and response of the registry's HTTPS+JSON API (`docs/registry.md`).
//! - [`backup`]: the whole registry as one document (export/import).
//! - [`net`]: CIDR, MAC and port-range value types with strict parsing.
//! - [`client`]: a blocking mutual-TLS client for plain threads (vnpd's control thread), failing
//!   over between registry replicas.
//! - [`metadata`]: the metadata and credential endpoints' types (issue #11); [`jwt`]: ES256
//!   JWTs, signed by the registry and verified by `vnpctl verify-token`.
//! - [`grant`]: a token grant as protocol values (token, the fields it was minted over).
//! - `pki` (feature `pki`): the development CA behind `vnpctl ca` / `vnpctl cert`.
//!
//! Deliberately free of the server's dependencies (no async runtime, web framework or store).

pub mod api;
pub mod backup;
pub mod client;
pub mod error;
pub mod grant;
pub mod jwt;
pub mod metadata;
pub mod net;
#[cfg(feature = "pki")]
pub mod pki;
pub mod secret;

pub use api::*;
pub use backup::{Export, ImportSummary, SealedSecret};
pub use client::{ClientConfig, RegistryClient};
pub use error::ClientError;
pub use grant::BadToken;
pub use metadata::*;
pub use net::{Ipv4Cidr, MacAddr, NetParseError, PortRange};
pub use secret::SecretHex;
