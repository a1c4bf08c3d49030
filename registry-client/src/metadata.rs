//! Types of the metadata and credential endpoints (issue #11): what the service bridge on a
//! host serves to its VMs, and the registry's signing keys. See `docs/registry.md`
//! ("Metadata and credentials").

use crate::net::MacAddr;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// Attributes: key -> value (operator-set on VMs and projects, guest-written as
/// `"<namespace>/<key>"`).
pub type Attributes = BTreeMap<String, String>;

/// The scopes a VM's service account has unless an operator says otherwise.
pub const DEFAULT_SCOPES: &[&str] = &["https://www.googleapis.com/auth/cloud-platform"];

/// `GET /v1/vms/{id}/metadata[?wait_etag=E&timeout_sec=N]`: everything the metadata server
/// of the VM's host shows the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMetadata {
    /// Changes exactly when something else in this document changes (a hash of it).
    pub etag: String,
    pub instance: InstanceMetadata,
    pub project: ProjectMetadata,
    /// What the guest wrote through its host, keyed `"<namespace>/<key>"`.
    pub guest_attributes: Attributes,
}

/// The `instance/` part of [`VmMetadata`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceMetadata {
    /// Numeric instance id (decimal), stable for the VM's id: the first 63 bits of
    /// SHA-256("vnp-instance:" + VM id).
    pub id: String,
    /// The VM's id in the registry.
    pub name: String,
    pub hostname: String,
    /// The project's zone.
    pub zone: String,
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    /// The network's id.
    pub network: String,
    /// The network's router address (vnpd answers for it).
    pub gateway: Ipv4Addr,
    pub mtu: u16,
    /// Operator-set (`vnpctl vm set-attr`).
    pub attributes: Attributes,
    pub service_account: ServiceAccount,
}

/// The VM's service account as tokens name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAccount {
    pub email: String,
    pub scopes: Vec<String>,
}

/// The `project/` part of [`VmMetadata`]: the VM's network's project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectMetadata {
    pub project_id: String,
    /// Operator-set (`vnpctl project set-attr`).
    pub attributes: Attributes,
    /// The network's metadata servers require an IMDSv2-style session token on every request
    /// (`vnpctl project set NET --require-session-token true`; see `docs/metadata.md`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_session_token: bool,
}

/// `POST /v1/vms/{id}/access-token`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessToken {
    /// An ES256 JWT naming the VM's service account and scopes.
    pub access_token: String,
    /// Seconds until it expires.
    pub expires_in: u64,
    /// Always `"Bearer"`.
    pub token_type: String,
}

/// Format of an identity token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityFormat {
    /// iss, aud, sub, iat, exp, email, and the VM and network (`vnp` claim).
    #[default]
    Standard,
    /// Standard plus GCE's `google.compute_engine` claims (instance id and name, project
    /// id, zone).
    Full,
}

/// `POST /v1/vms/{id}/identity-token`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityTokenRequest {
    /// Who the token is for (its `aud`); 1-512 printable ASCII characters.
    pub audience: String,
    #[serde(default)]
    pub format: IdentityFormat,
}

/// Answer of `POST /v1/vms/{id}/identity-token`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityToken {
    /// An ES256 JWT.
    pub token: String,
    pub expires_in: u64,
}

/// `GET /v1/jwks`: the registry's public signing keys (RFC 7517).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// One P-256 public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// `"EC"`.
    pub kty: String,
    /// `"P-256"`.
    pub crv: String,
    /// Affine coordinates, base64url without padding (32 bytes each).
    pub x: String,
    pub y: String,
    pub kid: String,
    /// `"ES256"`.
    pub alg: String,
    /// `"sig"`.
    #[serde(rename = "use")]
    pub use_: String,
}

/// A signing key as `GET /v1/signing-keys` (admin) shows it: never the private part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningKeyInfo {
    pub kid: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Whether new tokens are signed with it (exactly one key is active).
    pub active: bool,
    /// When it stopped signing (Unix seconds), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<u64>,
    /// It stays in the JWKS until then (its last tokens have expired), and is forgotten after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_until: Option<u64>,
}

/// `PUT /v1/networks/{id}/project` (admin): the network's project settings; absent fields keep
/// their value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Turns the network's metadata session requirement on or off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_session_token: Option<bool>,
}

/// A network's project (`GET /v1/networks/{id}/project`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    pub network: String,
    /// Defaults to the network's id.
    pub project_id: String,
    /// Defaults to [`DEFAULT_ZONE`].
    pub zone: String,
    pub attributes: Attributes,
    /// Metadata requests of the network's VMs need a session token (IMDSv2-style).
    #[serde(default)]
    pub require_session_token: bool,
}

/// The zone of a project that does not name one.
pub const DEFAULT_ZONE: &str = "vnp-zone-a";

/// `PUT /v1/vms/{id}/scopes` (admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopesUpdate {
    /// Empty: back to [`DEFAULT_SCOPES`].
    pub scopes: Vec<String>,
}

/// Answer of the attribute writes: the attributes after the write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttributesResponse {
    pub attributes: Attributes,
}
