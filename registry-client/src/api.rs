//! Request and response types of the registry's HTTPS+JSON API (`/v1`).
//!
//! The server (`vnp-registry`) and every client share these definitions, so the wire format is
//! defined exactly once. See `docs/registry.md` for the endpoint reference.

use crate::net::{Ipv4Cidr, MacAddr, PortRange};
pub use crate::secret::SecretHex;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;

mod service;
pub use service::*;

/// Longest id the registry accepts.
pub const MAX_ID_LEN: usize = 63;

/// Checks an operator-chosen id: `[a-z0-9-]{1,63}`, not starting or ending with `-`.
pub fn validate_id(id: &str) -> Result<(), String> {
    let ok_chars = id
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if id.is_empty() || id.len() > MAX_ID_LEN || !ok_chars {
        return Err(format!(
            "invalid id {id:?}: use 1-{MAX_ID_LEN} characters of [a-z0-9-]"
        ));
    }
    if id.starts_with('-') || id.ends_with('-') {
        return Err(format!("invalid id {id:?}: must not start or end with '-'"));
    }
    Ok(())
}

/// What a certificate allows its holder to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Operator: may create and delete everything, but never reads secrets.
    Admin,
    /// A host running vnpd: secrets and tokens for the VMs it runs, endpoint registration.
    Host,
    /// A gateway: its own secret and tokens towards VMs of its network.
    Gateway,
}

impl Role {
    /// The word used in certificate URIs (`vnp:<role>:<id>`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Host => "host",
            Role::Gateway => "gateway",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The caller's identity as the registry read it from the client certificate.
///
/// Certificates carry it as a URI subject alternative name `vnp:<role>:<id>`
/// (for example `vnp:host:h1`), which is what `vnpctl cert` writes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    pub role: Role,
    pub id: String,
}

impl Identity {
    /// The certificate URI SAN for this identity.
    pub fn to_uri(&self) -> String {
        format!("vnp:{}:{}", self.role, self.id)
    }

    /// Parses `vnp:<role>:<id>`; `None` for anything else.
    pub fn from_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix("vnp:")?;
        let (role, id) = rest.split_once(':')?;
        let role = match role {
            "admin" => Role::Admin,
            "host" => Role::Host,
            "gateway" => Role::Gateway,
            _ => return None,
        };
        validate_id(id).ok()?;
        Some(Identity {
            role,
            id: id.to_string(),
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.role, self.id)
    }
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyAction {
    Allow,
    Deny,
}

impl fmt::Display for PolicyAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyAction::Allow => "allow",
            PolicyAction::Deny => "deny",
        })
    }
}

/// `POST /v1/networks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    pub id: String,
    /// Numeric network id carried in VNP headers and tokens; allocated (from 1) if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    pub cidr: Ipv4Cidr,
    /// Guest MTU (after encapsulation overhead); default 1400.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Policy for pairs no rule matches; default `allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_policy: Option<PolicyAction>,
    /// Size of each VM's NAT source-port block; default 512 (see `docs/gateway.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_block: Option<u16>,
}

/// A virtual network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub id: String,
    pub vni: u32,
    pub cidr: Ipv4Cidr,
    /// The virtual router address (first host address of the CIDR).
    pub router: Ipv4Addr,
    pub mtu: u16,
    pub default_policy: PolicyAction,
    pub nat_block: u16,
}

/// `POST /v1/hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    pub id: String,
    /// The host's underlay address (where its VMs' UDP ports live).
    pub underlay_addr: Ipv4Addr,
    /// Range the per-VM UDP ports are allocated from; default 40000-49999.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_range: Option<PortRange>,
}

/// A host that runs vnpd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub id: String,
    pub underlay_addr: Ipv4Addr,
    pub port_range: PortRange,
}

/// `POST /v1/gateways`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySpec {
    pub id: String,
    /// Network whose traffic to outside addresses this gateway carries (a network may have
    /// several).
    pub network: String,
    /// Underlay address and UDP port the gateway receives VNP packets on.
    pub underlay_addr: Ipv4Addr,
    pub port: u16,
    /// The address the gateway's NATed and forwarded traffic uses on the public side; default
    /// `underlay_addr`. Gateways sharing a public address form one NAT pool (any of them can
    /// carry a reply), so they must serve the same network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_addr: Option<Ipv4Addr>,
}

/// A gateway between a virtual network and the outside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gateway {
    pub id: String,
    pub network: String,
    pub vni: u32,
    pub underlay_addr: Ipv4Addr,
    pub port: u16,
    /// Public address (source of NATed traffic, destination of forwarded traffic).
    pub public_addr: Ipv4Addr,
    pub secret_generation: u64,
}

/// `POST /v1/vms`. Everything but `id` and `network` is allocated when absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub id: String,
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Owning host; may be set later with a move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// UDP port on the owning host; allocated from the host's range when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// Where a VM is currently served: what hosts register and tokens are minted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub host_addr: Ipv4Addr,
    pub port: u16,
    /// The registry generation at which this endpoint was registered.
    pub generation: u64,
}

/// A VM as the registry knows it. Never contains the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: String,
    pub network: String,
    pub vni: u32,
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    pub hostname: String,
    pub host: Option<String>,
    pub host_port: Option<u16>,
    /// This VM's NAT source ports at its network's public addresses: disjoint blocks, in the
    /// order they were handed out (`POST /v1/vms/{id}/nat-ports` adds one).
    pub nat_ports: Vec<PortRange>,
    pub service_account: String,
    pub tags: Vec<String>,
    pub secret_generation: u64,
    /// Last endpoint registered by a host; `None` until the owning host registers.
    pub endpoint: Option<Endpoint>,
    /// A live migration under way: the host the VM is going to and the port reserved there.
    /// That host may read the secret; its endpoint registration makes it the owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incoming: Option<IncomingMigration>,
}

/// Where a migrating VM is going (`VmRecord::incoming`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingMigration {
    pub host: String,
    pub host_port: u16,
}

/// `POST /v1/vms/{id}/migration`: announce a live migration of the VM to `host`. The VM stays
/// owned by its current host (which keeps sending and receiving) until `host` registers the
/// endpoint when the migrated VM resumes there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartMigration {
    pub host: String,
    /// UDP port on `host`; allocated from its range when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
}

impl VmRecord {
    /// True if `port` is one of this VM's NAT source ports.
    pub fn owns_nat_port(&self, port: u16) -> bool {
        self.nat_ports.iter().any(|b| b.contains(port))
    }
}

/// `POST /v1/vms/{id}/move`: hand the VM to another host (the first step of a migration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveVm {
    /// New owning host, or `null` to detach.
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
}

/// `GET /v1/vms/{id}/secret` (owning host only) and `GET /v1/gateways/{id}/secret` (that gateway).
///
/// `secret` is 64 hex characters, held in a [`SecretHex`] (zeroized on drop, never printed).
/// Convert it and drop the response promptly; the client never logs it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretResponse {
    pub secret: SecretHex,
    pub generation: u64,
}

impl fmt::Debug for SecretResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretResponse")
            .field("secret", &"<redacted>")
            .field("generation", &self.generation)
            .finish()
    }
}

/// `PUT /v1/vms/{id}/endpoint`: "VM id is now served at (host_addr, port)".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointUpdate {
    pub host_addr: Ipv4Addr,
    pub port: u16,
}

/// Answer to an endpoint registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointAck {
    pub generation: u64,
}

/// One side of a pair-policy rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum Selector {
    /// Any VM of the network.
    Any,
    /// The VM with this id.
    Vm(String),
    /// Any VM carrying this tag.
    Tag(String),
    /// Any address outside the network (reached through its gateway).
    External,
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Any => f.write_str("any"),
            Selector::Vm(v) => write!(f, "vm:{v}"),
            Selector::Tag(t) => write!(f, "tag:{t}"),
            Selector::External => f.write_str("external"),
        }
    }
}

impl std::str::FromStr for Selector {
    type Err = String;
    /// `any`, `external`, `vm:<id>`, `tag:<tag>`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "any" => return Ok(Selector::Any),
            "external" => return Ok(Selector::External),
            _ => {}
        }
        let (kind, value) = s.split_once(':').ok_or_else(|| {
            format!("invalid selector {s:?}: use any, external, vm:ID or tag:TAG")
        })?;
        validate_id(value)?;
        match kind {
            "vm" => Ok(Selector::Vm(value.to_string())),
            "tag" => Ok(Selector::Tag(value.to_string())),
            _ => Err(format!(
                "invalid selector {s:?}: use any, external, vm:ID or tag:TAG"
            )),
        }
    }
}

/// `POST /v1/policy`: a rule about unordered pairs `{a, b}` in one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRuleSpec {
    pub id: String,
    pub network: String,
    pub action: PolicyAction,
    pub a: Selector,
    pub b: Selector,
}

/// A stored pair-policy rule (same shape as its spec).
pub type PolicyRule = PolicyRuleSpec;

/// `POST /v1/tokens`.
///
/// A host asks on behalf of `src_vm` (a VM it runs). A gateway asks with `src_gateway` (itself)
/// and the VM's address as `dst_ip`; `src_ip` is optional and not part of the token (which
/// carries [`vnp_protocol::OUTSIDE`] for the outside end: see
/// `docs/protocol.md`, *Tokens with a gateway*), but if given it must be outside the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_vm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_ip: Option<Ipv4Addr>,
    pub dst_ip: Ipv4Addr,
}

/// The patent's answer to a token request: where to send and what to put in the header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenGrant {
    /// Destination VM id, or `None` when the destination is outside (the gateway's tuple).
    pub dst_vm: Option<String>,
    /// The destination address the token was minted for (the inner packet's destination).
    pub dst_ip: Ipv4Addr,
    pub dst_host: Ipv4Addr,
    pub dst_port: u16,
    /// 16 hex characters (64 bits).
    pub token: String,
    /// Seconds since the Unix epoch; `u32::MAX` never expires.
    pub expiry: u32,
    pub network_id: u32,
    /// The source tuple the token is bound to (the sender must use exactly these).
    pub src_host: Ipv4Addr,
    pub src_port: u16,
    pub src_ip: Ipv4Addr,
}

/// Transport protocol of a port-forwarding rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum L4Proto {
    Tcp,
    Udp,
}

impl L4Proto {
    /// The IPv4 protocol number.
    pub fn number(self) -> u8 {
        match self {
            L4Proto::Tcp => 6,
            L4Proto::Udp => 17,
        }
    }
}

impl fmt::Display for L4Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            L4Proto::Tcp => "tcp",
            L4Proto::Udp => "udp",
        })
    }
}

impl std::str::FromStr for L4Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(L4Proto::Tcp),
            "udp" => Ok(L4Proto::Udp),
            _ => Err(format!("invalid protocol {s:?}: use tcp or udp")),
        }
    }
}

/// `POST /v1/forwards`: `public_addr:public_port/proto -> vm:vm_port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardSpec {
    pub id: String,
    /// A public address of a gateway of the VM's network.
    pub public_addr: Ipv4Addr,
    pub public_port: u16,
    pub proto: L4Proto,
    pub vm: String,
    pub vm_port: u16,
}

/// A stored port-forwarding rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardRule {
    pub id: String,
    /// The VM's network (filled in by the registry).
    pub network: String,
    pub public_addr: Ipv4Addr,
    pub public_port: u16,
    pub proto: L4Proto,
    pub vm: String,
    pub vm_port: u16,
}

/// `POST /v1/vms/{id}/nat-ports`: add NAT port blocks to a VM (default one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatGrow {
    #[serde(default = "one_block")]
    pub blocks: u16,
}

fn one_block() -> u16 {
    1
}

/// A VNP underlay address: where a VM is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnderlayAddr {
    pub host_addr: Ipv4Addr,
    pub port: u16,
}

/// What a gateway needs to know about one VM of its network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayPeer {
    pub id: String,
    pub ip: Ipv4Addr,
    pub nat_ports: Vec<PortRange>,
    /// Where the VM is reached (its endpoint, else its host's address and port); `None` while
    /// it is on no host.
    pub location: Option<UnderlayAddr>,
    /// Whether pair policy lets the VM start connections to the outside (`{vm, external}`).
    pub egress: bool,
}

/// `GET /v1/gateways/{id}/config`: everything a gateway runs on. Follow it with
/// `GET /v1/watch` (any change of the network's VMs, including `nat_ports` and `forwards`) and
/// fetch it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayConfig {
    /// The registry generation this answer reflects (pass it as the watch's `since`).
    pub generation: u64,
    pub gateway: Gateway,
    pub network: Network,
    /// The other gateways sharing this one's public address (one NAT pool).
    pub pool: Vec<String>,
    pub vms: Vec<GatewayPeer>,
    /// Forwarding rules on this gateway's public address.
    pub forwards: Vec<ForwardRule>,
    /// Load-balanced services on this gateway's public address, with their resolved pools.
    #[serde(default)]
    pub services: Vec<GatewayService>,
    /// Underlay addresses of every gateway on this public address, this one included: health
    /// checks leave from them, and a VM's answer to any of them is handed to the kernel, which
    /// routes it to the gateway that probed.
    #[serde(default)]
    pub probe_sources: Vec<std::net::Ipv4Addr>,
}

/// What happened to a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Created,
    Endpoint,
    Moved,
    SecretRotated,
    Deleted,
    /// The VM's NAT port blocks grew.
    NatPorts,
    /// A port-forwarding rule towards the VM was added or removed, or a service pool holding
    /// it changed (gateways refetch their config).
    Forwards,
}

/// One entry of the change log that `GET /v1/watch` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmChange {
    pub generation: u64,
    pub vm: String,
    pub kind: ChangeKind,
    pub host: Option<String>,
    pub endpoint: Option<Endpoint>,
    pub secret_generation: u64,
    /// The VM's address: hosts that only ever learned a return token from the VM (and so never
    /// asked the registry about it) forget that token by address when the VM moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
}

/// Answer of `GET /v1/watch?vms=a,b&since=G&timeout_ms=T`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchResponse {
    /// Pass this as `since` next time.
    pub generation: u64,
    pub changes: Vec<VmChange>,
    /// True when `since` is older than the retained log: re-read the VMs you care about.
    pub resync: bool,
}

/// Stable machine-readable refusal reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    InvalidJson,
    InvalidId,
    NotAuthenticated,
    /// A host or gateway certificate whose identity is not (or no longer) registered.
    UnknownIdentity,
    Forbidden,
    AdminRequired,
    NotOwner,
    WrongHost,
    PolicyDenied,
    UnknownNetwork,
    UnknownHost,
    UnknownVm,
    UnknownGateway,
    UnknownRule,
    UnknownForward,
    UnknownService,
    NotFound,
    NoSuchDestination,
    NoGateway,
    NoEndpoint,
    Duplicate,
    DuplicateIp,
    DuplicateMac,
    DuplicatePort,
    /// The host port was another VM's until recently and is in quarantine.
    PortQuarantined,
    DuplicateVni,
    AddressOutsideCidr,
    AddressReserved,
    PortOutsideRange,
    /// A forwarding rule's public port is inside a VM's NAT block, or a NAT block would cover
    /// a forwarded port, or the same public port is forwarded twice.
    PortInUse,
    PoolExhausted,
    NotEmpty,
    /// A concurrent write through another replica kept winning; nothing was changed.
    Conflict,
    Storage,
    Internal,
    /// This replica cannot answer now (it may be stale); another replica can.
    Unavailable,
    /// A value larger than its limit (guest attributes, VM and project attributes).
    TooLarge,
    /// Too many entries (guest attributes of one VM), or too many bytes in all of them.
    TooMany,
    /// Writes faster than the per-VM rate; try again later.
    RateLimited,
}

impl ErrorCode {
    /// HTTP status the server answers with.
    pub fn http_status(&self) -> u16 {
        use ErrorCode::*;
        match self {
            BadRequest | InvalidJson | InvalidId | AddressOutsideCidr | AddressReserved
            | PortOutsideRange => 400,
            NotAuthenticated => 401,
            UnknownIdentity | Forbidden | AdminRequired | NotOwner | WrongHost | PolicyDenied => {
                403
            }
            UnknownNetwork | UnknownHost | UnknownVm | UnknownGateway | UnknownRule
            | UnknownForward | UnknownService | NotFound | NoSuchDestination => 404,
            NoGateway | NoEndpoint | Duplicate | DuplicateIp | DuplicateMac | DuplicatePort
            | PortQuarantined | DuplicateVni | PortInUse | PoolExhausted | NotEmpty | Conflict => {
                409
            }
            TooLarge => 413,
            TooMany => 409,
            RateLimited => 429,
            Storage | Internal => 500,
            Unavailable => 503,
        }
    }

    /// The snake_case name used on the wire.
    pub fn as_str(&self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str())
    }
}

/// Body of every refusal: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// Code and human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

/// `DELETE` answers and other acknowledgements.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    pub deleted: String,
    /// Dependent objects removed with it (only with `?cascade=true`).
    #[serde(default)]
    pub cascaded: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("vm-a").is_ok());
        assert!(validate_id("h1").is_ok());
        for bad in ["", "-a", "a-", "A", "a_b", "a b", "é", &"a".repeat(64)] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn identity_uri_round_trip() {
        let id = Identity {
            role: Role::Host,
            id: "h1".into(),
        };
        assert_eq!(id.to_uri(), "vnp:host:h1");
        assert_eq!(Identity::from_uri("vnp:host:h1"), Some(id));
        assert_eq!(Identity::from_uri("vnp:root:h1"), None);
        assert_eq!(Identity::from_uri("vnp:host:H1"), None);
        assert_eq!(Identity::from_uri("spiffe://x/host/h1"), None);
    }

    #[test]
    fn selectors() {
        assert_eq!("vm:a".parse::<Selector>(), Ok(Selector::Vm("a".into())));
        assert_eq!(
            "tag:web".parse::<Selector>(),
            Ok(Selector::Tag("web".into()))
        );
        assert_eq!("any".parse::<Selector>(), Ok(Selector::Any));
        assert!("host:a".parse::<Selector>().is_err());
        assert!("vm:".parse::<Selector>().is_err());
        let json = serde_json::to_string(&Selector::Tag("web".into())).unwrap();
        assert_eq!(json, r#"{"kind":"tag","value":"web"}"#);
    }

    #[test]
    fn error_codes_are_snake_case() {
        assert_eq!(ErrorCode::PolicyDenied.as_str(), "policy_denied");
        assert_eq!(ErrorCode::NoGateway.http_status(), 409);
        assert_eq!(ErrorCode::NotOwner.http_status(), 403);
    }

    #[test]
    fn unknown_fields_refused() {
        let r: Result<VmSpec, _> = serde_json::from_str(r#"{"id":"a","network":"n","colour":1}"#);
        assert!(r.is_err());
    }

    #[test]
    fn secret_response_debug_redacts() {
        let s = SecretResponse {
            secret: "ab".repeat(32).into(),
            generation: 1,
        };
        assert!(!format!("{s:?}").contains("abab"));
    }
}
