//! Where the bridge's data comes from: the registry, over the host's mutual TLS, behind a small
//! trait so that the HTTP logic and the bridge thread can be tested on their own. The shapes
//! follow the Metadata contract of issue #11 (`GET /v1/vms/{id}/metadata`, token minting,
//! guest-attribute writes); the registry-backed implementation is `control::metadata`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything the metadata server shows one VM, as the registry answers it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VmMetadata {
    /// Changes whenever anything below changes (the registry's long-poll compares it).
    pub etag: String,
    /// The VM itself.
    pub instance: InstanceMetadata,
    /// Its project.
    pub project: ProjectMetadata,
    /// What the guest published, namespace -> key -> value.
    #[serde(default)]
    pub guest_attributes: BTreeMap<String, BTreeMap<String, String>>,
}

/// The `instance/` part.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct InstanceMetadata {
    /// Registry id of the VM.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its hostname (as DHCP hands it out).
    pub hostname: String,
    /// Zone (the host's).
    pub zone: String,
    /// Address on the virtual network.
    pub ip: String,
    /// MAC of its NIC.
    pub mac: String,
    /// Network name.
    pub network: String,
    /// The virtual router's address.
    pub gateway: String,
    /// Network MTU.
    pub mtu: u32,
    /// Operator-set attributes (`vnpctl vm set-attr`).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// The default service account.
    #[serde(default)]
    pub service_account: ServiceAccount,
}

/// `service-accounts/default/`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ServiceAccount {
    /// Account email.
    pub email: String,
    /// OAuth scopes.
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// The `project/` part.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProjectMetadata {
    /// Project id.
    pub project_id: String,
    /// Project-wide attributes.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// The network requires metadata session tokens (`session.rs`).
    #[serde(default)]
    pub require_session_token: bool,
}

/// A minted access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessToken {
    /// The bearer token (a signed JWT).
    pub access_token: String,
    /// Seconds it is valid from minting.
    pub expires_in: u64,
    /// Always "Bearer".
    pub token_type: String,
}

/// A minted identity token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityToken {
    /// The signed JWT.
    pub token: String,
    /// Seconds it is valid from minting.
    pub expires_in: u64,
}

/// Why the registry did not answer usefully.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// Not reachable, timed out, or a server error: try again later (503 to the guest).
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// The registry refused the request (a limit, a bad name): the guest's request was wrong.
    #[error("registry refused: {status}: {message}")]
    Refused {
        /// HTTP status the registry answered with (4xx).
        status: u16,
        /// Its message.
        message: String,
    },
}

/// The registry calls the bridge makes, on behalf of the VM whose port it serves. Blocking:
/// the bridge calls them from its own helper threads, never from the packet loop.
pub trait MetadataSource: Send + Sync + 'static {
    /// The VM's metadata; with `wait = Some((etag, d))` a long-poll that returns when the etag
    /// differs from `etag` or after `d`.
    fn vm_metadata(
        &self,
        vm_id: &str,
        wait: Option<(&str, Duration)>,
    ) -> Result<VmMetadata, SourceError>;
    /// Mints an access token for the VM's default service account.
    fn mint_access_token(&self, vm_id: &str) -> Result<AccessToken, SourceError>;
    /// Mints an identity token for `audience` (`full`: the long format, with the VM's details).
    fn mint_identity_token(
        &self,
        vm_id: &str,
        audience: &str,
        full: bool,
    ) -> Result<IdentityToken, SourceError>;
    /// Writes one guest attribute through to the registry.
    fn put_guest_attribute(
        &self,
        vm_id: &str,
        namespace: &str,
        key: &str,
        value: &str,
    ) -> Result<(), SourceError>;
}
