//! The whole registry as one JSON document (`GET /v1/export`, `POST /v1/import`), for backup
//! and restore and for moving between stores (redb <-> etcd).
//!
//! Secrets are never in the clear in an export: each is sealed with the exporting registry's
//! `--secret-keys` key (envelope encryption, bound to its owner), so a restore needs a registry
//! holding that key.

use crate::api::{ForwardRule, Gateway, Host, Network, PolicyRule, Service, VmChange, VmRecord};
use serde::{Deserialize, Serialize};

/// The value of [`Export::format`].
pub const EXPORT_FORMAT: &str = "vnp-registry-export/1";

/// Everything the registry holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Export {
    /// [`EXPORT_FORMAT`].
    pub format: String,
    pub networks: Vec<Network>,
    pub hosts: Vec<Host>,
    pub gateways: Vec<Gateway>,
    pub vms: Vec<VmRecord>,
    pub rules: Vec<PolicyRule>,
    /// Port-forwarding rules (absent in exports from before they existed).
    #[serde(default)]
    pub forwards: Vec<ForwardRule>,
    /// Load-balanced services (absent in exports from before they existed).
    #[serde(default)]
    pub services: Vec<Service>,
    pub secrets: Vec<SealedSecret>,
    /// The change log, oldest first (watchers resume across a restore).
    pub changes: Vec<VmChange>,
    /// Metadata records as stored (`{"kind": "vm"|"project"|"signing_key", ...}`): VM
    /// attributes and guest attributes, projects, the signing keys' public halves (their
    /// private halves are in `secrets`, as `sk/<kid>`). Absent in older exports.
    #[serde(default)]
    pub metadata: Vec<serde_json::Value>,
}

/// One VM's or gateway's secret, sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedSecret {
    /// `vm/<id>`, `gw/<id>` or `sk/<kid>` (a signing key).
    pub owner: String,
    /// The sealed secret and its generation, hex.
    pub sealed: String,
}

/// What an import wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportSummary {
    pub networks: usize,
    pub hosts: usize,
    pub gateways: usize,
    pub vms: usize,
    pub rules: usize,
    #[serde(default)]
    pub forwards: usize,
    #[serde(default)]
    pub services: usize,
    pub secrets: usize,
    pub changes: usize,
    #[serde(default)]
    pub metadata: usize,
}
