//! The registry's state as one in-memory value, and the mutations that change it.
//!
//! Every write is planned as a list of [`Op`]s by a pure function (see `plan`), persisted by the
//! [`Store`](crate::store::Store) in one transaction, and only then applied here. A failed commit
//! therefore leaves both the disk and the memory as they were: nothing is half-written.

pub use crate::metastate::{MetaKey, MetaRecord, MetaState};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv4Addr;
use vnp_protocol::token::{TokenMinter, VmSecret};
use vnp_registry_client::api::{
    ForwardRule, Gateway, HealthView, Host, Network, PolicyRule, Service, VmChange, VmRecord,
};

/// How many change-log entries are kept for watchers; older ones force a resync.
pub const CHANGE_LOG_RETAIN: usize = 10_000;

/// Whose secret a stored secret is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SecretOwner {
    Vm(String),
    Gateway(String),
    /// The private scalar of a registry signing key (by kid).
    SigningKey(String),
}

impl SecretOwner {
    /// Key used by stores: `vm/<id>` or `gw/<id>`.
    pub fn key(&self) -> String {
        match self {
            SecretOwner::Vm(id) => format!("vm/{id}"),
            SecretOwner::Gateway(id) => format!("gw/{id}"),
            SecretOwner::SigningKey(kid) => format!("sk/{kid}"),
        }
    }

    /// Inverse of [`SecretOwner::key`].
    pub fn from_key(key: &str) -> Option<SecretOwner> {
        if let Some(id) = key.strip_prefix("vm/") {
            return Some(SecretOwner::Vm(id.to_string()));
        }
        if let Some(kid) = key.strip_prefix("sk/") {
            return Some(SecretOwner::SigningKey(kid.to_string()));
        }
        key.strip_prefix("gw/")
            .map(|id| SecretOwner::Gateway(id.to_string()))
    }
}

/// A secret with its generation and a ready keyed HMAC state for fast minting.
#[derive(Clone)]
pub struct SecretEntry {
    pub secret: VmSecret,
    pub generation: u64,
    pub minter: TokenMinter,
}

impl SecretEntry {
    /// Wraps a secret.
    pub fn new(secret: VmSecret, generation: u64) -> SecretEntry {
        let minter = TokenMinter::new(&secret);
        SecretEntry {
            secret,
            generation,
            minter,
        }
    }
}

impl std::fmt::Debug for SecretEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretEntry(<redacted>, generation {})", self.generation)
    }
}

/// The answer to a write that carried an idempotency key, kept so that a client retrying it
/// (on this or another replica) gets the same answer instead of a second write.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RememberedWrite {
    /// `"<caller> <METHOD> <path>"`: a key reused for another request is refused.
    pub request: String,
    /// The JSON the write answered.
    pub response: String,
    /// When (Unix seconds); forgotten after [`REMEMBER_WRITES_S`].
    pub at: u64,
}

/// A VM's UDP port on a host that the VM gave up (deleted, moved, re-registered elsewhere):
/// no other VM gets it before `until`, so traffic still addressed to the previous VM (late,
/// replayed, from peers with old tokens) cannot land in the next one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QuarantinedPort {
    pub host: String,
    pub port: u16,
    /// The VM that had it; it may take it back at once.
    pub vm: String,
    /// Unix seconds when the port becomes free.
    pub until: u64,
}

impl QuarantinedPort {
    /// Key used by stores: `<host>/<port>` (host ids have no `/`).
    pub fn key(&self) -> String {
        port_key(&self.host, self.port)
    }
}

/// Store key of a host port: `<host>/<port>`.
pub fn port_key(host: &str, port: u16) -> String {
    format!("{host}/{port}")
}

/// Inverse of [`port_key`].
pub fn parse_port_key(key: &str) -> Option<(String, u16)> {
    let (host, port) = key.rsplit_once('/')?;
    Some((host.to_string(), port.parse().ok()?))
}

/// FNV-1a over `vm`, a separator and `gateway`: stable across builds and replicas (unlike
/// std's randomly keyed hasher), which is all rendezvous hashing needs.
fn rendezvous(vm: &str, gateway: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in vm.bytes().chain([0u8]).chain(gateway.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// How long idempotency keys are remembered.
pub const REMEMBER_WRITES_S: u64 = 3600;

/// One persisted mutation. A write request is a `Vec<Op>` committed atomically.
#[derive(Debug, Clone)]
pub enum Op {
    PutNetwork(Network),
    DeleteNetwork(String),
    PutHost(Host),
    DeleteHost(String),
    PutGateway(Gateway),
    DeleteGateway(String),
    PutVm(VmRecord),
    DeleteVm(String),
    PutRule(PolicyRule),
    DeleteRule(String),
    PutForward(ForwardRule),
    DeleteForward(String),
    PutService(Service),
    DeleteService(String),
    /// A gateway's view of its services' members (not exported: gateways report it again).
    PutHealthView(HealthView),
    /// Forgets a gateway's view (by gateway id).
    DeleteHealthView(String),
    PutSecret(SecretOwner, SecretEntry),
    DeleteSecret(SecretOwner),
    /// Appends to the change log and advances the global generation to `change.generation`.
    AppendChange(VmChange),
    /// Forgets change-log entries with a generation below this.
    TrimChanges(u64),
    /// Remembers the answer to a write under its idempotency key.
    RememberWrite(String, RememberedWrite),
    /// Forgets an idempotency key.
    ForgetWrite(String),
    /// Keeps a host port from other VMs for a while.
    QuarantinePort(QuarantinedPort),
    /// Ends a port's quarantine (expired, or its host is gone): `(host, port)`.
    ReleasePort(String, u16),
    /// Stores a metadata record (VM attributes, project, signing key).
    PutMeta(MetaRecord),
    /// Deletes a metadata record.
    DeleteMeta(MetaKey),
}

/// The whole registry state.
#[derive(Debug, Default, Clone)]
pub struct Model {
    pub networks: BTreeMap<String, Network>,
    pub hosts: BTreeMap<String, Host>,
    pub gateways: BTreeMap<String, Gateway>,
    pub vms: BTreeMap<String, VmRecord>,
    pub rules: BTreeMap<String, PolicyRule>,
    /// Port-forwarding rules by id.
    pub forwards: BTreeMap<String, ForwardRule>,
    /// Load-balanced services by id.
    pub services: BTreeMap<String, Service>,
    /// Each gateway's last health report, by gateway id.
    pub health_views: BTreeMap<String, HealthView>,
    pub secrets: HashMap<SecretOwner, SecretEntry>,
    /// Index: (network id, VM address) -> VM id.
    pub by_ip: HashMap<(String, Ipv4Addr), String>,
    /// Change log, oldest first.
    pub changes: VecDeque<VmChange>,
    /// Answers to writes by idempotency key.
    pub requests: BTreeMap<String, RememberedWrite>,
    /// Host ports in quarantine, by (host, port).
    pub quarantined: BTreeMap<(String, u16), QuarantinedPort>,
    /// Attributes, projects and signing keys.
    pub meta: MetaState,
    /// Generation of the newest change (0 before any). Stored with the change log, so it is
    /// the same on every replica of a shared store.
    pub generation: u64,
    /// The store revision this model reflects (see [`Store`](crate::store::Store)): writes
    /// planned on it commit only if nothing was committed after it.
    pub revision: u64,
}

impl Model {
    /// Applies committed operations.
    pub fn apply(&mut self, ops: &[Op]) {
        for op in ops {
            self.apply_one(op);
        }
    }

    fn apply_one(&mut self, op: &Op) {
        match op {
            Op::PutNetwork(n) => {
                self.networks.insert(n.id.clone(), n.clone());
            }
            Op::DeleteNetwork(id) => {
                self.networks.remove(id);
            }
            Op::PutHost(h) => {
                self.hosts.insert(h.id.clone(), h.clone());
            }
            Op::DeleteHost(id) => {
                self.hosts.remove(id);
            }
            Op::PutGateway(g) => {
                self.gateways.insert(g.id.clone(), g.clone());
            }
            Op::DeleteGateway(id) => {
                self.gateways.remove(id);
            }
            Op::PutVm(vm) => {
                if let Some(old) = self.vms.get(&vm.id) {
                    self.by_ip.remove(&(old.network.clone(), old.ip));
                }
                self.by_ip
                    .insert((vm.network.clone(), vm.ip), vm.id.clone());
                self.vms.insert(vm.id.clone(), vm.clone());
            }
            Op::DeleteVm(id) => {
                if let Some(old) = self.vms.remove(id) {
                    self.by_ip.remove(&(old.network, old.ip));
                }
            }
            Op::PutRule(r) => {
                self.rules.insert(r.id.clone(), r.clone());
            }
            Op::DeleteRule(id) => {
                self.rules.remove(id);
            }
            Op::PutForward(f) => {
                self.forwards.insert(f.id.clone(), f.clone());
            }
            Op::DeleteForward(id) => {
                self.forwards.remove(id);
            }
            Op::PutService(s) => {
                self.services.insert(s.id.clone(), s.clone());
            }
            Op::DeleteService(id) => {
                self.services.remove(id);
            }
            Op::PutHealthView(v) => {
                self.health_views.insert(v.gateway.clone(), v.clone());
            }
            Op::DeleteHealthView(id) => {
                self.health_views.remove(id);
            }
            Op::PutSecret(owner, entry) => {
                self.meta.secret_changed(owner, Some(entry));
                self.secrets.insert(owner.clone(), entry.clone());
            }
            Op::DeleteSecret(owner) => {
                self.meta.secret_changed(owner, None);
                self.secrets.remove(owner);
            }
            Op::AppendChange(c) => {
                self.generation = self.generation.max(c.generation);
                self.changes.push_back(c.clone());
            }
            Op::TrimChanges(below) => {
                while self.changes.front().is_some_and(|c| c.generation < *below) {
                    self.changes.pop_front();
                }
            }
            Op::RememberWrite(key, w) => {
                self.requests.insert(key.clone(), w.clone());
            }
            Op::ForgetWrite(key) => {
                self.requests.remove(key);
            }
            Op::QuarantinePort(q) => {
                self.quarantined.insert((q.host.clone(), q.port), q.clone());
            }
            Op::ReleasePort(host, port) => {
                self.quarantined.remove(&(host.clone(), *port));
            }
            Op::PutMeta(record) => self.meta.put(record),
            Op::DeleteMeta(key) => self.meta.delete(key),
        }
    }

    /// The VM whose address is `ip` in `network`.
    pub fn vm_by_ip(&self, network: &str, ip: Ipv4Addr) -> Option<&VmRecord> {
        self.by_ip
            .get(&(network.to_string(), ip))
            .and_then(|id| self.vms.get(id))
    }

    /// The VM other than `except` that holds `port` on `host`: as its current port, or reserved
    /// for a migration to `host` under way.
    pub fn vm_on_port(&self, host: &str, port: u16, except: &str) -> Option<&VmRecord> {
        self.vms.values().find(|v| {
            v.id != except
                && ((v.host.as_deref() == Some(host) && v.host_port == Some(port))
                    || v.incoming
                        .as_ref()
                        .is_some_and(|i| i.host == host && i.host_port == port))
        })
    }

    /// The quarantine keeping `port` on `host` from VMs other than `vm` at `now`, if any.
    pub fn port_quarantine(
        &self,
        host: &str,
        port: u16,
        vm: &str,
        now: u64,
    ) -> Option<&QuarantinedPort> {
        self.quarantined
            .get(&(host.to_string(), port))
            .filter(|q| q.vm != vm && q.until > now)
    }

    /// The gateways of `network`.
    pub fn gateways_of<'m>(&'m self, network: &'m str) -> impl Iterator<Item = &'m Gateway> + 'm {
        self.gateways.values().filter(move |g| g.network == network)
    }

    /// The gateway `vm` sends to for outside destinations: rendezvous hashing over the
    /// network's gateways, so each VM sticks to one gateway (one token, one public address)
    /// and adding or removing a gateway moves only the VMs that hashed to it.
    pub fn gateway_for(&self, vm: &VmRecord) -> Option<&Gateway> {
        self.gateways
            .values()
            .filter(|g| g.network == vm.network)
            .max_by_key(|g| (rendezvous(&vm.id, &g.id), std::cmp::Reverse(g.id.clone())))
    }

    /// Where packets for `vm` go now: its registered endpoint, else its owning host's underlay
    /// address and its allocated port. `None` if it is on no host.
    pub fn location_of(&self, vm: &VmRecord) -> Option<(Ipv4Addr, u16)> {
        if let Some(ep) = vm.endpoint {
            return Some((ep.host_addr, ep.port));
        }
        let host = self.hosts.get(vm.host.as_deref()?)?;
        Some((host.underlay_addr, vm.host_port?))
    }

    /// Where `vm` sends from: its owning host's underlay address and its port there. Unlike
    /// [`Model::location_of`] this ignores the registered endpoint, which during a migration
    /// still names the old host while the new owner already sends.
    pub fn source_of(&self, vm: &VmRecord) -> Option<(Ipv4Addr, u16)> {
        let host = self.hosts.get(vm.host.as_deref()?)?;
        Some((host.underlay_addr, vm.host_port?))
    }

    /// Changes after `since` concerning `vms` (all if empty); `resync` if the log no longer
    /// reaches back to `since`.
    pub fn changes_since(&self, since: u64, vms: &[String]) -> (Vec<VmChange>, bool) {
        let oldest = self
            .changes
            .front()
            .map_or(self.generation + 1, |c| c.generation);
        let resync = since + 1 < oldest && since < self.generation;
        let wanted = |c: &VmChange| vms.is_empty() || vms.contains(&c.vm);
        let found = self
            .changes
            .iter()
            .filter(|c| c.generation > since && wanted(c))
            .cloned()
            .collect();
        (found, resync)
    }
}
