//! Pure planning of every write: validate against the current [`Model`] and return the
//! [`Op`]s to commit. No I/O and no randomness (secrets are passed in), so each rule about bad
//! input is unit-tested here.

use crate::error::{refuse, ApiError};
use crate::model::{Model, Op, SecretEntry, SecretOwner, CHANGE_LOG_RETAIN};
use std::net::Ipv4Addr;
use vnp_protocol::token::VmSecret;
use vnp_registry_client::api::*;
use vnp_registry_client::net::{MacAddr, PortRange};

/// Guest MTU when a network does not say: 1500 minus VNP encapsulation (48) and headroom.
pub const DEFAULT_MTU: u16 = 1400;
/// Ports each VM gets for NAT at the gateway unless the network says otherwise.
pub const DEFAULT_NAT_BLOCK: u16 = 1024;
/// First NAT source port handed out (below are well-known/registered low ports).
pub const NAT_FIRST_PORT: u16 = 1024;
/// Per-host UDP port range for VMs unless the host says otherwise.
pub const DEFAULT_HOST_PORTS: PortRange = PortRange {
    first: 40000,
    last: 49999,
};

type Planned<T> = Result<(Vec<Op>, T), ApiError>;

fn check_id(id: &str) -> Result<(), ApiError> {
    validate_id(id).map_err(|m| ApiError::new(ErrorCode::InvalidId, m))
}

/// Appends a change-log entry (and trims the log when it is full).
fn change_ops(model: &Model, vm: &VmRecord, kind: ChangeKind) -> Vec<Op> {
    let mut ops = Vec::with_capacity(2);
    let generation = model.generation + 1;
    ops.push(Op::AppendChange(VmChange {
        generation,
        vm: vm.id.clone(),
        kind,
        host: vm.host.clone(),
        endpoint: vm.endpoint,
        secret_generation: vm.secret_generation,
    }));
    if model.changes.len() >= CHANGE_LOG_RETAIN {
        let drop_to = model.changes.len() + 1 - CHANGE_LOG_RETAIN;
        if let Some(first_kept) = model.changes.get(drop_to) {
            ops.push(Op::TrimChanges(first_kept.generation));
        }
    }
    ops
}

// ---------------------------------------------------------------- networks

/// Creates a network.
pub fn create_network(model: &Model, spec: &NetworkSpec) -> Planned<Network> {
    check_id(&spec.id)?;
    if model.networks.contains_key(&spec.id) {
        return refuse(
            ErrorCode::Duplicate,
            format!("network {} already exists", spec.id),
        );
    }
    let vni = match spec.vni {
        Some(0) => return refuse(ErrorCode::BadRequest, "vni 0 is reserved"),
        Some(v) => {
            if let Some(other) = model.networks.values().find(|n| n.vni == v) {
                return refuse(
                    ErrorCode::DuplicateVni,
                    format!("vni {v} is used by network {}", other.id),
                );
            }
            v
        }
        None => model
            .networks
            .values()
            .map(|n| n.vni)
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or_else(|| ApiError::new(ErrorCode::PoolExhausted, "no free vni"))?,
    };
    if let Some(other) = model
        .networks
        .values()
        .find(|n| n.cidr.contains(spec.cidr.network()) || spec.cidr.contains(n.cidr.network()))
    {
        // Overlap is legal between tenants in principle, but the router/gateway tables of one
        // deployment are simpler and safer without it; refuse clearly.
        return refuse(
            ErrorCode::Duplicate,
            format!(
                "cidr {} overlaps network {} ({})",
                spec.cidr, other.id, other.cidr
            ),
        );
    }
    let mtu = spec.mtu.unwrap_or(DEFAULT_MTU);
    if !(576..=9000).contains(&mtu) {
        return refuse(
            ErrorCode::BadRequest,
            format!("mtu {mtu} outside 576..=9000"),
        );
    }
    let nat_block = spec.nat_block.unwrap_or(DEFAULT_NAT_BLOCK);
    if nat_block == 0 || nat_block > u16::MAX - NAT_FIRST_PORT {
        return refuse(
            ErrorCode::BadRequest,
            format!("nat_block {nat_block} is not usable"),
        );
    }
    let net = Network {
        id: spec.id.clone(),
        vni,
        cidr: spec.cidr,
        router: spec.cidr.router(),
        mtu,
        default_policy: spec.default_policy.unwrap_or(PolicyAction::Allow),
        nat_block,
    };
    Ok((vec![Op::PutNetwork(net.clone())], net))
}

/// Deletes a network; with `cascade` also its VMs, gateway and rules.
pub fn delete_network(model: &Model, id: &str, cascade: bool) -> Planned<Deleted> {
    if !model.networks.contains_key(id) {
        return refuse(ErrorCode::UnknownNetwork, format!("no network {id}"));
    }
    let vms: Vec<&VmRecord> = model.vms.values().filter(|v| v.network == id).collect();
    let gws: Vec<&Gateway> = model
        .gateways
        .values()
        .filter(|g| g.network == id)
        .collect();
    let rules: Vec<&PolicyRule> = model.rules.values().filter(|r| r.network == id).collect();
    let empty = vms.is_empty() && gws.is_empty() && rules.is_empty();
    if !cascade && !empty {
        return refuse(
            ErrorCode::NotEmpty,
            format!(
                "network {id} still has {} VM(s), {} gateway(s), {} rule(s); delete them or pass cascade=true",
                vms.len(),
                gws.len(),
                rules.len()
            ),
        );
    }
    let mut ops = Vec::new();
    let mut cascaded = Vec::new();
    for (generation, vm) in (model.generation + 1..).zip(vms) {
        ops.push(Op::DeleteVm(vm.id.clone()));
        ops.push(Op::DeleteSecret(SecretOwner::Vm(vm.id.clone())));
        ops.push(Op::AppendChange(VmChange {
            generation,
            vm: vm.id.clone(),
            kind: ChangeKind::Deleted,
            host: vm.host.clone(),
            endpoint: None,
            secret_generation: vm.secret_generation,
        }));
        cascaded.push(format!("vm/{}", vm.id));
    }
    for g in gws {
        ops.push(Op::DeleteGateway(g.id.clone()));
        ops.push(Op::DeleteSecret(SecretOwner::Gateway(g.id.clone())));
        cascaded.push(format!("gateway/{}", g.id));
    }
    for r in rules {
        ops.push(Op::DeleteRule(r.id.clone()));
        cascaded.push(format!("rule/{}", r.id));
    }
    ops.push(Op::DeleteNetwork(id.to_string()));
    Ok((
        ops,
        Deleted {
            deleted: format!("network/{id}"),
            cascaded,
        },
    ))
}

// ---------------------------------------------------------------- hosts

/// Creates a host.
pub fn create_host(model: &Model, spec: &HostSpec) -> Planned<Host> {
    check_id(&spec.id)?;
    if model.hosts.contains_key(&spec.id) {
        return refuse(
            ErrorCode::Duplicate,
            format!("host {} already exists", spec.id),
        );
    }
    if spec.underlay_addr.is_unspecified()
        || spec.underlay_addr.is_broadcast()
        || spec.underlay_addr.is_multicast()
    {
        return refuse(
            ErrorCode::BadRequest,
            format!("{} is not a usable underlay address", spec.underlay_addr),
        );
    }
    if let Some(other) = model
        .hosts
        .values()
        .find(|h| h.underlay_addr == spec.underlay_addr)
    {
        return refuse(
            ErrorCode::DuplicateIp,
            format!(
                "underlay address {} is used by host {}",
                spec.underlay_addr, other.id
            ),
        );
    }
    let host = Host {
        id: spec.id.clone(),
        underlay_addr: spec.underlay_addr,
        port_range: spec.port_range.unwrap_or(DEFAULT_HOST_PORTS),
    };
    Ok((vec![Op::PutHost(host.clone())], host))
}

/// Deletes a host; refuses while VMs are assigned to it.
pub fn delete_host(model: &Model, id: &str) -> Planned<Deleted> {
    if !model.hosts.contains_key(id) {
        return refuse(ErrorCode::UnknownHost, format!("no host {id}"));
    }
    let on_it: Vec<&str> = model
        .vms
        .values()
        .filter(|v| v.host.as_deref() == Some(id))
        .map(|v| v.id.as_str())
        .collect();
    if !on_it.is_empty() {
        return refuse(
            ErrorCode::NotEmpty,
            format!(
                "host {id} still runs VM(s) {}; move or delete them first",
                on_it.join(", ")
            ),
        );
    }
    Ok((
        vec![Op::DeleteHost(id.to_string())],
        Deleted {
            deleted: format!("host/{id}"),
            cascaded: vec![],
        },
    ))
}

// ---------------------------------------------------------------- gateways

/// Registers a network's gateway with a fresh secret.
pub fn create_gateway(model: &Model, spec: &GatewaySpec, secret: VmSecret) -> Planned<Gateway> {
    check_id(&spec.id)?;
    if model.gateways.contains_key(&spec.id) {
        return refuse(
            ErrorCode::Duplicate,
            format!("gateway {} already exists", spec.id),
        );
    }
    let net = model.networks.get(&spec.network).ok_or_else(|| {
        ApiError::new(
            ErrorCode::UnknownNetwork,
            format!("no network {}", spec.network),
        )
    })?;
    if let Some(g) = model.gateway_of(&spec.network) {
        return refuse(
            ErrorCode::Duplicate,
            format!("network {} already has gateway {}", spec.network, g.id),
        );
    }
    if spec.port == 0 {
        return refuse(ErrorCode::BadRequest, "gateway port must not be 0");
    }
    let gw = Gateway {
        id: spec.id.clone(),
        network: net.id.clone(),
        vni: net.vni,
        underlay_addr: spec.underlay_addr,
        port: spec.port,
        secret_generation: 1,
    };
    let ops = vec![
        Op::PutGateway(gw.clone()),
        Op::PutSecret(
            SecretOwner::Gateway(gw.id.clone()),
            SecretEntry::new(secret, 1),
        ),
    ];
    Ok((ops, gw))
}

/// Removes a gateway and its secret.
pub fn delete_gateway(model: &Model, id: &str) -> Planned<Deleted> {
    if !model.gateways.contains_key(id) {
        return refuse(ErrorCode::UnknownGateway, format!("no gateway {id}"));
    }
    let ops = vec![
        Op::DeleteGateway(id.to_string()),
        Op::DeleteSecret(SecretOwner::Gateway(id.to_string())),
    ];
    Ok((
        ops,
        Deleted {
            deleted: format!("gateway/{id}"),
            cascaded: vec![],
        },
    ))
}

// ---------------------------------------------------------------- VMs

fn check_name(what: &str, value: &str) -> Result<(), ApiError> {
    validate_id(value).map_err(|m| ApiError::new(ErrorCode::BadRequest, format!("{what}: {m}")))
}

fn check_service_account(sa: &str) -> Result<(), ApiError> {
    let ok = !sa.is_empty()
        && sa.len() <= 128
        && sa
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@._-".contains(&b));
    if ok {
        Ok(())
    } else {
        refuse(
            ErrorCode::BadRequest,
            format!("invalid service account {sa:?}: use 1-128 of [A-Za-z0-9@._-]"),
        )
    }
}

fn pick_ip(model: &Model, net: &Network, wanted: Option<Ipv4Addr>) -> Result<Ipv4Addr, ApiError> {
    if let Some(ip) = wanted {
        if !net.cidr.contains(ip) {
            return refuse(
                ErrorCode::AddressOutsideCidr,
                format!("{ip} is outside network {} ({})", net.id, net.cidr),
            );
        }
        if !net.cidr.is_assignable(ip) {
            return refuse(
                ErrorCode::AddressReserved,
                format!(
                    "{ip} is reserved in {} (network, broadcast or router {})",
                    net.cidr, net.router
                ),
            );
        }
        if let Some(other) = model.vm_by_ip(&net.id, ip) {
            return refuse(
                ErrorCode::DuplicateIp,
                format!("{ip} is already used by VM {}", other.id),
            );
        }
        return Ok(ip);
    }
    net.cidr
        .assignable()
        .find(|ip| model.vm_by_ip(&net.id, *ip).is_none())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::PoolExhausted,
                format!("no free address left in {}", net.cidr),
            )
        })
}

fn pick_mac(
    model: &Model,
    net: &Network,
    ip: Ipv4Addr,
    wanted: Option<MacAddr>,
) -> Result<MacAddr, ApiError> {
    let used = |m: &MacAddr| model.vms.values().find(|v| v.mac == *m);
    if let Some(mac) = wanted {
        if let Some(other) = used(&mac) {
            return refuse(
                ErrorCode::DuplicateMac,
                format!("MAC {mac} is already used by VM {}", other.id),
            );
        }
        return Ok(mac);
    }
    // Deterministic: 02:<vni low byte>:<ip>; on a clash (another network with the same
    // addresses) walk the second byte.
    let o = ip.octets();
    let start = (net.vni & 0xff) as u8;
    (0..=255u8)
        .map(|i| MacAddr([0x02, start.wrapping_add(i), o[0], o[1], o[2], o[3]]))
        .find(|m| used(m).is_none())
        .ok_or_else(|| ApiError::new(ErrorCode::PoolExhausted, "no free MAC address"))
}

/// Port for `vm_id` on `host`: the wanted one if free and in range, else the lowest free one.
fn pick_host_port(
    model: &Model,
    host: &Host,
    vm_id: &str,
    wanted: Option<u16>,
) -> Result<u16, ApiError> {
    let taken = |p: u16| {
        model.vms.values().find(|v| {
            v.id != vm_id && v.host.as_deref() == Some(host.id.as_str()) && v.host_port == Some(p)
        })
    };
    if let Some(p) = wanted {
        if !host.port_range.contains(p) {
            return refuse(
                ErrorCode::PortOutsideRange,
                format!(
                    "port {p} is outside host {}'s range {}",
                    host.id, host.port_range
                ),
            );
        }
        if let Some(other) = taken(p) {
            return refuse(
                ErrorCode::DuplicatePort,
                format!("port {p} on host {} is used by VM {}", host.id, other.id),
            );
        }
        return Ok(p);
    }
    (host.port_range.first..=host.port_range.last)
        .find(|p| taken(*p).is_none())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::PoolExhausted,
                format!("no free port on host {}", host.id),
            )
        })
}

fn pick_nat_block(model: &Model, net: &Network) -> Result<PortRange, ApiError> {
    let size = u32::from(net.nat_block);
    let mut first = u32::from(NAT_FIRST_PORT);
    while first + size - 1 <= u32::from(u16::MAX) {
        let block = PortRange {
            first: first as u16,
            last: (first + size - 1) as u16,
        };
        if !model
            .vms
            .values()
            .any(|v| v.network == net.id && v.nat_ports.overlaps(&block))
        {
            return Ok(block);
        }
        first += size;
    }
    refuse(
        ErrorCode::PoolExhausted,
        format!("no free NAT port block of {size} in network {}", net.id),
    )
}

/// Creates a VM with a fresh secret, allocating whatever the spec leaves open.
pub fn create_vm(model: &Model, spec: &VmSpec, secret: VmSecret) -> Planned<VmRecord> {
    check_id(&spec.id)?;
    if model.vms.contains_key(&spec.id) {
        return refuse(
            ErrorCode::Duplicate,
            format!("VM {} already exists", spec.id),
        );
    }
    let net = model.networks.get(&spec.network).ok_or_else(|| {
        ApiError::new(
            ErrorCode::UnknownNetwork,
            format!("no network {}", spec.network),
        )
    })?;
    let hostname = spec.hostname.clone().unwrap_or_else(|| spec.id.clone());
    check_name("hostname", &hostname)?;
    let service_account = spec
        .service_account
        .clone()
        .unwrap_or_else(|| "default".to_string());
    check_service_account(&service_account)?;
    let mut tags = spec.tags.clone();
    for t in &tags {
        check_name("tag", t)?;
    }
    tags.sort();
    tags.dedup();
    let ip = pick_ip(model, net, spec.ip)?;
    let mac = pick_mac(model, net, ip, spec.mac)?;
    let (host, host_port) = match &spec.host {
        Some(h) => {
            let host = model
                .hosts
                .get(h)
                .ok_or_else(|| ApiError::new(ErrorCode::UnknownHost, format!("no host {h}")))?;
            (
                Some(h.clone()),
                Some(pick_host_port(model, host, &spec.id, spec.host_port)?),
            )
        }
        None if spec.host_port.is_some() => {
            return refuse(ErrorCode::BadRequest, "host_port given without host")
        }
        None => (None, None),
    };
    let nat_ports = pick_nat_block(model, net)?;
    let vm = VmRecord {
        id: spec.id.clone(),
        network: net.id.clone(),
        vni: net.vni,
        ip,
        mac,
        hostname,
        host,
        host_port,
        nat_ports,
        service_account,
        tags,
        secret_generation: 1,
        endpoint: None,
    };
    let mut ops = vec![
        Op::PutVm(vm.clone()),
        Op::PutSecret(SecretOwner::Vm(vm.id.clone()), SecretEntry::new(secret, 1)),
    ];
    ops.extend(change_ops(model, &vm, ChangeKind::Created));
    Ok((ops, vm))
}

fn get_vm<'m>(model: &'m Model, id: &str) -> Result<&'m VmRecord, ApiError> {
    model
        .vms
        .get(id)
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownVm, format!("no VM {id}")))
}

/// Deletes a VM and its secret.
pub fn delete_vm(model: &Model, id: &str) -> Planned<Deleted> {
    let vm = get_vm(model, id)?;
    let mut ops = vec![
        Op::DeleteVm(id.to_string()),
        Op::DeleteSecret(SecretOwner::Vm(id.to_string())),
    ];
    let mut gone = vm.clone();
    gone.endpoint = None;
    ops.extend(change_ops(model, &gone, ChangeKind::Deleted));
    Ok((
        ops,
        Deleted {
            deleted: format!("vm/{id}"),
            cascaded: vec![],
        },
    ))
}

/// Hands a VM to another host (or detaches it). The endpoint stays where it was until the new
/// host registers, so packets keep flowing to the old host during a migration.
pub fn move_vm(model: &Model, id: &str, req: &MoveVm) -> Planned<VmRecord> {
    let mut vm = get_vm(model, id)?.clone();
    match &req.host {
        Some(h) => {
            let host = model
                .hosts
                .get(h)
                .ok_or_else(|| ApiError::new(ErrorCode::UnknownHost, format!("no host {h}")))?;
            let keep = if vm.host.as_deref() == Some(h.as_str()) {
                vm.host_port
            } else {
                None
            };
            vm.host_port = Some(pick_host_port(model, host, id, req.host_port.or(keep))?);
            vm.host = Some(h.clone());
        }
        None => {
            if req.host_port.is_some() {
                return refuse(ErrorCode::BadRequest, "host_port given without host");
            }
            vm.host = None;
            vm.host_port = None;
        }
    }
    let mut ops = vec![Op::PutVm(vm.clone())];
    ops.extend(change_ops(model, &vm, ChangeKind::Moved));
    Ok((ops, vm))
}

/// Replaces a VM's secret.
pub fn rotate_vm_secret(model: &Model, id: &str, secret: VmSecret) -> Planned<VmRecord> {
    let mut vm = get_vm(model, id)?.clone();
    vm.secret_generation += 1;
    let mut ops = vec![
        Op::PutVm(vm.clone()),
        Op::PutSecret(
            SecretOwner::Vm(id.to_string()),
            SecretEntry::new(secret, vm.secret_generation),
        ),
    ];
    ops.extend(change_ops(model, &vm, ChangeKind::SecretRotated));
    Ok((ops, vm))
}

/// "VM `id` is now served at `update`", from host `caller`.
pub fn register_endpoint(
    model: &Model,
    caller: &str,
    id: &str,
    update: &EndpointUpdate,
) -> Planned<EndpointAck> {
    let mut vm = get_vm(model, id)?.clone();
    if vm.host.as_deref() != Some(caller) {
        let owner = vm.host.as_deref().unwrap_or("no host");
        return refuse(
            ErrorCode::NotOwner,
            format!(
                "host {caller} does not run VM {id} (owner: {owner}); an admin must move it first"
            ),
        );
    }
    let host = model
        .hosts
        .get(caller)
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownHost, format!("no host {caller}")))?;
    if update.host_addr != host.underlay_addr {
        return refuse(
            ErrorCode::WrongHost,
            format!(
                "host {caller} has underlay address {}, not {}",
                host.underlay_addr, update.host_addr
            ),
        );
    }
    if update.port == 0 {
        return refuse(ErrorCode::BadRequest, "endpoint port must not be 0");
    }
    if let Some(other) = model.vms.values().find(|v| {
        v.id != id && v.host.as_deref() == Some(caller) && v.host_port == Some(update.port)
    }) {
        return refuse(
            ErrorCode::DuplicatePort,
            format!(
                "port {} on host {caller} belongs to VM {}",
                update.port, other.id
            ),
        );
    }
    if let Some(ep) = vm.endpoint {
        let same = ep.host_addr == update.host_addr && ep.port == update.port;
        if same && vm.host_port == Some(update.port) {
            // Re-registering (vnpd restarting, retries) is idempotent: no new generation, so
            // watchers do not throw away good tokens.
            return Ok((
                vec![],
                EndpointAck {
                    generation: ep.generation,
                },
            ));
        }
    }
    let generation = model.generation + 1;
    vm.host_port = Some(update.port);
    vm.endpoint = Some(Endpoint {
        host_addr: update.host_addr,
        port: update.port,
        generation,
    });
    let mut ops = vec![Op::PutVm(vm.clone())];
    ops.extend(change_ops(model, &vm, ChangeKind::Endpoint));
    Ok((ops, EndpointAck { generation }))
}

// ---------------------------------------------------------------- policy

/// Adds a rule.
pub fn create_rule(model: &Model, spec: &PolicyRuleSpec) -> Planned<PolicyRule> {
    check_id(&spec.id)?;
    if model.rules.contains_key(&spec.id) {
        return refuse(
            ErrorCode::Duplicate,
            format!("rule {} already exists", spec.id),
        );
    }
    if !model.networks.contains_key(&spec.network) {
        return refuse(
            ErrorCode::UnknownNetwork,
            format!("no network {}", spec.network),
        );
    }
    for sel in [&spec.a, &spec.b] {
        match sel {
            Selector::Vm(v) | Selector::Tag(v) => check_name("selector", v)?,
            Selector::Any | Selector::External => {}
        }
    }
    if spec.a == Selector::External && spec.b == Selector::External {
        return refuse(
            ErrorCode::BadRequest,
            "a rule between external and external never matches",
        );
    }
    Ok((vec![Op::PutRule(spec.clone())], spec.clone()))
}

/// Removes a rule.
pub fn delete_rule(model: &Model, id: &str) -> Planned<Deleted> {
    if !model.rules.contains_key(id) {
        return refuse(ErrorCode::UnknownRule, format!("no rule {id}"));
    }
    Ok((
        vec![Op::DeleteRule(id.to_string())],
        Deleted {
            deleted: format!("rule/{id}"),
            cascaded: vec![],
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> VmSecret {
        VmSecret::from_bytes([7; 32])
    }

    macro_rules! apply {
        ($m:ident, $planned:expr) => {{
            let (ops, out) = $planned.expect("planned");
            $m.apply(&ops);
            out
        }};
    }

    fn base() -> Model {
        let mut m = Model::default();
        let spec = NetworkSpec {
            id: "n1".into(),
            vni: None,
            cidr: "10.1.0.0/24".parse().unwrap(),
            mtu: None,
            default_policy: None,
            nat_block: None,
        };
        apply!(m, create_network(&m, &spec));
        let h = HostSpec {
            id: "h1".into(),
            underlay_addr: Ipv4Addr::new(198, 18, 0, 1),
            port_range: Some("40000-40001".parse().unwrap()),
        };
        apply!(m, create_host(&m, &h));
        m
    }

    fn vm_spec(id: &str) -> VmSpec {
        VmSpec {
            id: id.into(),
            network: "n1".into(),
            host: Some("h1".into()),
            ..VmSpec::default()
        }
    }

    fn code<T: std::fmt::Debug>(r: Planned<T>) -> ErrorCode {
        r.expect_err("should refuse").code
    }

    #[test]
    fn allocation_skips_reserved_and_is_deterministic() {
        let mut m = base();
        let a = apply!(m, create_vm(&m, &vm_spec("a"), secret()));
        assert_eq!(a.ip, Ipv4Addr::new(10, 1, 0, 2));
        assert_eq!(a.mac.to_string(), "02:01:0a:01:00:02");
        assert_eq!(a.host_port, Some(40000));
        assert_eq!(
            a.nat_ports,
            PortRange {
                first: 1024,
                last: 2047
            }
        );
        assert_eq!(a.hostname, "a");
        let b = apply!(m, create_vm(&m, &vm_spec("b"), secret()));
        assert_eq!(b.ip, Ipv4Addr::new(10, 1, 0, 3));
        assert_eq!(b.host_port, Some(40001));
        assert_eq!(b.nat_ports.first, 2048);
        assert_eq!(
            code(create_vm(&m, &vm_spec("c"), secret())),
            ErrorCode::PoolExhausted,
            "host ports used up"
        );
        assert_eq!(m.generation, 2);
        assert_eq!(m.vm_by_ip("n1", b.ip).unwrap().id, "b");
    }

    #[test]
    fn bad_vm_input_is_refused() {
        let mut m = base();
        apply!(m, create_vm(&m, &vm_spec("a"), secret()));
        let with = |f: &dyn Fn(&mut VmSpec)| {
            let mut s = vm_spec("z");
            f(&mut s);
            code(create_vm(&m, &s, secret()))
        };
        assert_eq!(
            with(&|s| s.ip = Some(Ipv4Addr::new(10, 2, 0, 5))),
            ErrorCode::AddressOutsideCidr
        );
        assert_eq!(
            with(&|s| s.ip = Some(Ipv4Addr::new(10, 1, 0, 1))),
            ErrorCode::AddressReserved
        );
        assert_eq!(
            with(&|s| s.ip = Some(Ipv4Addr::new(10, 1, 0, 255))),
            ErrorCode::AddressReserved
        );
        assert_eq!(
            with(&|s| s.ip = Some(Ipv4Addr::new(10, 1, 0, 2))),
            ErrorCode::DuplicateIp
        );
        assert_eq!(
            with(&|s| s.mac = Some("02:01:0a:01:00:02".parse().unwrap())),
            ErrorCode::DuplicateMac
        );
        assert_eq!(
            with(&|s| s.network = "nope".into()),
            ErrorCode::UnknownNetwork
        );
        assert_eq!(
            with(&|s| s.host = Some("nope".into())),
            ErrorCode::UnknownHost
        );
        assert_eq!(
            with(&|s| s.host_port = Some(40000)),
            ErrorCode::DuplicatePort
        );
        assert_eq!(
            with(&|s| s.host_port = Some(1)),
            ErrorCode::PortOutsideRange
        );
        assert_eq!(with(&|s| s.id = "Bad_Id".into()), ErrorCode::InvalidId);
        assert_eq!(with(&|s| s.id = "a".into()), ErrorCode::Duplicate);
        assert_eq!(
            with(&|s| s.tags = vec!["no spaces".into()]),
            ErrorCode::BadRequest
        );
        assert_eq!(
            with(&|s| s.service_account = Some("a b".into())),
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn network_rules() {
        let m = base();
        let mut spec = NetworkSpec {
            id: "n2".into(),
            vni: Some(1),
            cidr: "10.2.0.0/24".parse().unwrap(),
            mtu: None,
            default_policy: None,
            nat_block: None,
        };
        assert_eq!(code(create_network(&m, &spec)), ErrorCode::DuplicateVni);
        spec.vni = None;
        spec.cidr = "10.1.0.0/16".parse().unwrap();
        assert_eq!(
            code(create_network(&m, &spec)),
            ErrorCode::Duplicate,
            "overlap"
        );
        spec.cidr = "10.2.0.0/24".parse().unwrap();
        spec.mtu = Some(100);
        assert_eq!(code(create_network(&m, &spec)), ErrorCode::BadRequest);
        spec.mtu = None;
        let (_, n2) = create_network(&m, &spec).unwrap();
        assert_eq!(n2.vni, 2);
        assert_eq!(n2.router, Ipv4Addr::new(10, 2, 0, 1));
    }

    #[test]
    fn delete_network_refuses_unless_cascade() {
        let mut m = base();
        apply!(m, create_vm(&m, &vm_spec("a"), secret()));
        assert_eq!(code(delete_network(&m, "n1", false)), ErrorCode::NotEmpty);
        assert_eq!(code(delete_host(&m, "h1")), ErrorCode::NotEmpty);
        let d = apply!(m, delete_network(&m, "n1", true));
        assert_eq!(d.cascaded, vec!["vm/a".to_string()]);
        assert!(m.vms.is_empty() && m.secrets.is_empty() && m.by_ip.is_empty());
        assert_eq!(m.changes.back().unwrap().kind, ChangeKind::Deleted);
    }

    #[test]
    fn endpoint_only_from_owner_and_own_address() {
        let mut m = base();
        apply!(m, create_vm(&m, &vm_spec("a"), secret()));
        let h2 = HostSpec {
            id: "h2".into(),
            underlay_addr: Ipv4Addr::new(198, 18, 0, 2),
            port_range: None,
        };
        apply!(m, create_host(&m, &h2));
        let up = EndpointUpdate {
            host_addr: Ipv4Addr::new(198, 18, 0, 2),
            port: 40000,
        };
        assert_eq!(
            code(register_endpoint(&m, "h2", "a", &up)),
            ErrorCode::NotOwner
        );
        assert_eq!(
            code(register_endpoint(&m, "h1", "a", &up)),
            ErrorCode::WrongHost
        );
        // Migration: admin moves, destination registers, generation bumps.
        apply!(
            m,
            move_vm(
                &m,
                "a",
                &MoveVm {
                    host: Some("h2".into()),
                    host_port: None
                }
            )
        );
        let ack = apply!(m, register_endpoint(&m, "h2", "a", &up));
        assert_eq!(ack.generation, m.generation);
        let (ops, again) = register_endpoint(&m, "h2", "a", &up).unwrap();
        assert!(ops.is_empty(), "same endpoint again changes nothing");
        assert_eq!(again, ack);
        let vm = &m.vms["a"];
        assert_eq!(vm.endpoint.unwrap().host_addr, Ipv4Addr::new(198, 18, 0, 2));
        let (changes, resync) = m.changes_since(1, &["a".to_string()]);
        assert!(!resync);
        assert_eq!(
            changes.iter().map(|c| c.kind).collect::<Vec<_>>(),
            vec![ChangeKind::Moved, ChangeKind::Endpoint]
        );
    }

    #[test]
    fn rotation_bumps_generation() {
        let mut m = base();
        apply!(m, create_vm(&m, &vm_spec("a"), secret()));
        let vm = apply!(m, rotate_vm_secret(&m, "a", VmSecret::from_bytes([9; 32])));
        assert_eq!(vm.secret_generation, 2);
        let e = &m.secrets[&SecretOwner::Vm("a".into())];
        assert_eq!(e.generation, 2);
        assert_eq!(e.secret.as_bytes(), &[9; 32]);
    }

    #[test]
    fn change_log_is_trimmed_and_resync_reported() {
        let mut m = base();
        apply!(m, create_vm(&m, &vm_spec("a"), secret()));
        for _ in 0..CHANGE_LOG_RETAIN + 5 {
            apply!(m, rotate_vm_secret(&m, "a", secret()));
        }
        assert_eq!(m.changes.len(), CHANGE_LOG_RETAIN);
        let (_, resync) = m.changes_since(0, &[]);
        assert!(resync);
        let (changes, resync) = m.changes_since(m.generation - 1, &[]);
        assert!(!resync);
        assert_eq!(changes.len(), 1);
    }
}
