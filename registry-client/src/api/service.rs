//! Load-balanced services (issue #10): `public_addr:public_port/proto -> a pool of VMs` (by id
//! or tag, with weights), with health-check settings and the Maglev table size. The gateways of
//! the public address balance new flows over the pool's healthy members (`docs/load-balancing.md`).

use super::L4Proto;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// Default Maglev lookup-table size (a prime).
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;
/// Largest weight a pool member may have.
pub const MAX_WEIGHT: u32 = 100;
/// Most members (entries, not resolved VMs) in one pool.
pub const MAX_POOL_ENTRIES: usize = 1000;

/// One entry of a pool: a VM by id, or every VM of the service's network with a tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolMember {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Relative share of new flows, 1..=[`MAX_WEIGHT`] (default 1).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

impl PoolMember {
    /// What the entry selects, as `vm:ID` or `tag:T` (how `vnpctl` names it).
    pub fn selector(&self) -> String {
        match (&self.vm, &self.tag) {
            (Some(v), _) => format!("vm:{v}"),
            (None, Some(t)) => format!("tag:{t}"),
            (None, None) => "nothing".into(),
        }
    }
}

/// An HTTP health check: `GET path` answered with `expect_status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    pub path: String,
    #[serde(default = "ok_status")]
    pub expect_status: u16,
}

fn ok_status() -> u16 {
    200
}

/// How each gateway checks each member (through the virtual network). Without `http` the check
/// is a TCP connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheck>,
    /// Port probed on the VM; default the service's `vm_port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Consecutive successes that bring a down member back.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that take a member out.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_interval() -> u64 {
    2000
}
fn default_timeout() -> u64 {
    1000
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

impl Default for HealthCheckSpec {
    /// TCP connect every 2 s, 1 s timeout, rise 2, fall 3.
    fn default() -> Self {
        Self {
            http: None,
            port: None,
            interval_ms: default_interval(),
            timeout_ms: default_timeout(),
            rise: default_rise(),
            fall: default_fall(),
        }
    }
}

/// `POST /v1/services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub id: String,
    /// A public address of a gateway of the pool's network.
    pub public_addr: Ipv4Addr,
    pub public_port: u16,
    pub proto: L4Proto,
    /// Port on the VMs; default `public_port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_port: Option<u16>,
    #[serde(default)]
    pub members: Vec<PoolMember>,
    #[serde(default)]
    pub health: HealthCheckSpec,
    /// Maglev table size, a prime; default [`DEFAULT_TABLE_SIZE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_size: Option<u32>,
}

/// A stored service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub id: String,
    /// The network of the gateways with `public_addr` (filled in by the registry).
    pub network: String,
    pub public_addr: Ipv4Addr,
    pub public_port: u16,
    pub proto: L4Proto,
    pub vm_port: u16,
    pub members: Vec<PoolMember>,
    pub health: HealthCheckSpec,
    pub table_size: u32,
}

impl Service {
    /// The port health checks go to.
    pub fn check_port(&self) -> u16 {
        self.health.port.unwrap_or(self.vm_port)
    }
}

/// `POST /v1/services/{id}/members`: adds an entry (or changes the weight of the same
/// selector). `DELETE /v1/services/{id}/members?vm=ID` or `?tag=T` removes one.
pub type MemberSpec = PoolMember;

/// One VM of a service's pool, resolved from the entries (a VM selected by several entries
/// gets the largest of their weights).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedMember {
    pub vm: String,
    pub ip: Ipv4Addr,
    pub weight: u32,
}

/// A service as a gateway runs it: the record and its resolved pool (sorted by VM id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayService {
    pub service: Service,
    pub pool: Vec<ResolvedMember>,
}

/// `GET /v1/services/{id}`: the service, its resolved pool, and what each gateway of its
/// address last reported about the service's members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub service: Service,
    pub pool: Vec<ResolvedMember>,
    #[serde(default)]
    pub views: Vec<HealthView>,
}

/// One member's health as one gateway sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberHealth {
    pub service: String,
    pub vm: String,
    pub up: bool,
}

/// `PUT /v1/gateways/{id}/health` (that gateway): its whole view, replacing the last one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthReport {
    pub members: Vec<MemberHealth>,
}

/// Most members one health report may hold.
pub const MAX_HEALTH_MEMBERS: usize = 100_000;

/// A gateway's last reported view (what `GET /v1/services/{id}` shows per gateway).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthView {
    pub gateway: String,
    /// Unix seconds of the report (the registry's clock).
    pub reported_at: u64,
    pub members: Vec<MemberHealth>,
}
