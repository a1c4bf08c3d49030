//! Load-balanced services (issue #10): `public_addr:public_port/proto -> a pool of VMs` (by id
//! or tag, with weights), their health-check settings and Maglev table size.
//!
//! A service's public port belongs to the public address like a forwarded port: never inside a
//! NAT block of the address's network, never forwarded, never another service's. Every change
//! of a pool appends a `Forwards` change for each VM it adds or removes, so the gateways (which
//! refetch their config on any change) rebuild their tables.

use super::*;
use std::collections::BTreeMap;

/// The service on `public_addr:port/proto`, if any.
pub(crate) fn service_on(
    model: &Model,
    public_addr: Ipv4Addr,
    port: u16,
    proto: L4Proto,
) -> Option<&Service> {
    model
        .services
        .values()
        .find(|s| (s.public_addr, s.public_port, s.proto) == (public_addr, port, proto))
}

/// A service port of `network` inside `block`, if any (NAT blocks avoid them).
pub(crate) fn service_port_in(model: &Model, network: &str, block: &PortRange) -> Option<u16> {
    model
        .services
        .values()
        .find(|s| s.network == network && block.contains(s.public_port))
        .map(|s| s.public_port)
}

/// The VMs a pool selects, sorted by id: a VM selected by several entries gets the largest of
/// their weights; entries naming a VM of another network or a missing VM select nothing.
pub fn resolve_pool(model: &Model, service: &Service) -> Vec<ResolvedMember> {
    let mut out: BTreeMap<&str, ResolvedMember> = BTreeMap::new();
    for entry in &service.members {
        let selected = model.vms.values().filter(|v| {
            v.network == service.network
                && match (&entry.vm, &entry.tag) {
                    (Some(id), _) => v.id == *id,
                    (None, Some(tag)) => v.tags.iter().any(|t| t == tag),
                    (None, None) => false,
                }
        });
        for vm in selected {
            let m = out.entry(&vm.id).or_insert(ResolvedMember {
                vm: vm.id.clone(),
                ip: vm.ip,
                weight: 0,
            });
            m.weight = m.weight.max(entry.weight);
        }
    }
    out.into_values().collect()
}

fn bad(message: String) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, message)
}

/// Checks one pool entry: exactly one selector, a weight in range, a VM of `network`.
fn check_member(model: &Model, network: &str, m: &PoolMember) -> Result<(), ApiError> {
    if !(1..=MAX_WEIGHT).contains(&m.weight) {
        return Err(bad(format!(
            "weight must be 1..={MAX_WEIGHT}, not {}",
            m.weight
        )));
    }
    match (&m.vm, &m.tag) {
        (Some(id), None) => match model.vms.get(id) {
            None => refuse(ErrorCode::UnknownVm, format!("no VM {id}")),
            Some(vm) if vm.network != network => Err(bad(format!(
                "VM {id} is in network {}, the service's is {network}",
                vm.network
            ))),
            Some(_) => Ok(()),
        },
        (None, Some(tag)) => check_name("tag", tag),
        _ => Err(bad("a pool entry names exactly one of vm or tag".into())),
    }
}

/// Checks health-check settings (the rules of `vnp_lb::HealthConfig::validate`).
fn check_health(h: &HealthCheckSpec) -> Result<(), ApiError> {
    let kind = match &h.http {
        Some(http) => {
            if !(100..=599).contains(&http.expect_status) {
                return Err(bad(format!(
                    "expected HTTP status {} is not 100..=599",
                    http.expect_status
                )));
            }
            vnp_lb::CheckKind::Http {
                port: 1,
                path: http.path.clone(),
                expect_status: http.expect_status,
            }
        }
        None => vnp_lb::CheckKind::TcpConnect { port: 1 },
    };
    if h.port == Some(0) {
        return Err(bad("health-check port must not be 0".into()));
    }
    if h.interval_ms > 3_600_000 || h.rise > 100 || h.fall > 100 {
        return Err(bad(
            "interval at most 3600000 ms, rise and fall at most 100".into(),
        ));
    }
    vnp_lb::HealthConfig {
        kind,
        interval_ms: h.interval_ms,
        timeout_ms: h.timeout_ms,
        rise: h.rise,
        fall: h.fall,
    }
    .validate()
    .map_err(bad)
}

/// The network served on `public_addr` (all its gateways serve one).
fn network_of_addr(model: &Model, public_addr: Ipv4Addr) -> Result<String, ApiError> {
    model
        .gateways
        .values()
        .find(|g| g.public_addr == public_addr)
        .map(|g| g.network.clone())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::NoGateway,
                format!("no gateway has public address {public_addr}"),
            )
        })
}

/// Refuses a public port already used on the address: a service, a forward, a NAT block.
fn check_port_free(model: &Model, network: &str, spec: &ServiceSpec) -> Result<(), ApiError> {
    let (addr, port, proto) = (spec.public_addr, spec.public_port, spec.proto);
    if let Some(s) = service_on(model, addr, port, proto) {
        return refuse(
            ErrorCode::PortInUse,
            format!("{addr}:{port}/{proto} is service {}", s.id),
        );
    }
    if let Some(f) = model
        .forwards
        .values()
        .find(|f| (f.public_addr, f.public_port, f.proto) == (addr, port, proto))
    {
        return refuse(
            ErrorCode::PortInUse,
            format!("{addr}:{port}/{proto} is forwarded by rule {}", f.id),
        );
    }
    if let Some(owner) = model
        .vms
        .values()
        .find(|v| v.network == network && v.owns_nat_port(port))
    {
        return refuse(
            ErrorCode::PortInUse,
            format!(
                "public port {port} is in VM {}'s NAT ports; use a port below {NAT_FIRST_PORT} or outside the NAT blocks",
                owner.id
            ),
        );
    }
    Ok(())
}

/// Creates a service.
pub fn create_service(model: &Model, spec: &ServiceSpec) -> Planned<Service> {
    check_id(&spec.id)?;
    if model.services.contains_key(&spec.id) {
        return refuse(
            ErrorCode::Duplicate,
            format!("service {} already exists", spec.id),
        );
    }
    if spec.public_port == 0 || spec.vm_port == Some(0) {
        return Err(bad("ports must not be 0".into()));
    }
    let table_size = spec.table_size.unwrap_or(DEFAULT_TABLE_SIZE);
    vnp_lb::Table::build(&[], table_size).map_err(|e| bad(e.to_string()))?;
    if spec.members.len() > MAX_POOL_ENTRIES {
        return Err(bad(format!("at most {MAX_POOL_ENTRIES} pool entries")));
    }
    check_health(&spec.health)?;
    let network = network_of_addr(model, spec.public_addr)?;
    for m in &spec.members {
        check_member(model, &network, m)?;
    }
    check_port_free(model, &network, spec)?;
    let vm_port = spec.vm_port.unwrap_or(spec.public_port);
    let check_port = spec.health.port.unwrap_or(vm_port);
    let in_network = model.vms.values().filter(|v| v.network == network);
    vm_ports::check_service_ports(in_network, &spec.id, vm_port, check_port)?;
    vm_ports::check_no_shared_vm_port(
        model,
        vm_ports::SharedWith::Forwards,
        (&network, spec.proto, vm_port),
        &format!("service {}", spec.id),
    )?;
    let mut members: Vec<PoolMember> = Vec::new();
    for m in &spec.members {
        upsert(&mut members, m.clone());
    }
    let service = Service {
        id: spec.id.clone(),
        network,
        public_addr: spec.public_addr,
        public_port: spec.public_port,
        proto: spec.proto,
        vm_port,
        members,
        health: spec.health.clone(),
        table_size,
    };
    let mut ops = vec![Op::PutService(service.clone())];
    ops.extend(pool_change_ops(model, &[], &resolve_pool(model, &service)));
    Ok((ops, service))
}

/// Puts `m` in `members`, replacing the entry with the same selector.
fn upsert(members: &mut Vec<PoolMember>, m: PoolMember) {
    match members
        .iter_mut()
        .find(|e| (&e.vm, &e.tag) == (&m.vm, &m.tag))
    {
        Some(e) => e.weight = m.weight,
        None => members.push(m),
    }
}

fn get<'m>(model: &'m Model, id: &str) -> Result<&'m Service, ApiError> {
    model
        .services
        .get(id)
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownService, format!("no service {id}")))
}

/// Ops storing `new` in place of `old`, with the pool's changes.
fn replace(model: &Model, old: &Service, new: Service) -> Planned<Service> {
    let before = resolve_pool(model, old);
    let after = resolve_pool(model, &new);
    let mut ops = vec![Op::PutService(new.clone())];
    ops.extend(pool_change_ops(model, &before, &after));
    Ok((ops, new))
}

/// Adds a pool entry, or sets the weight of the entry with the same selector.
pub fn add_member(model: &Model, id: &str, member: &PoolMember) -> Planned<Service> {
    let old = get(model, id)?;
    check_member(model, &old.network, member)?;
    let mut new = old.clone();
    upsert(&mut new.members, member.clone());
    // The network's NAT blocks skip the service's ports; a service stored before that rule may
    // still overlap a VM's block, which must not join the pool.
    let joining = Service {
        members: vec![member.clone()],
        ..old.clone()
    };
    for m in resolve_pool(model, &joining) {
        let vm = model.vms.get(&m.vm).into_iter();
        vm_ports::check_service_ports(vm, &old.id, old.vm_port, old.check_port())?;
    }
    if new.members.len() > MAX_POOL_ENTRIES {
        return Err(bad(format!("at most {MAX_POOL_ENTRIES} pool entries")));
    }
    replace(model, old, new)
}

/// Removes the pool entry selecting VM `vm` or tag `tag`.
pub fn remove_member(
    model: &Model,
    id: &str,
    vm: Option<&str>,
    tag: Option<&str>,
) -> Planned<Service> {
    let old = get(model, id)?;
    let selector = match (vm, tag) {
        (Some(v), None) => (Some(v.to_string()), None),
        (None, Some(t)) => (None, Some(t.to_string())),
        _ => return Err(bad("name exactly one of vm or tag".into())),
    };
    let mut new = old.clone();
    new.members
        .retain(|e| (&e.vm, &e.tag) != (&selector.0, &selector.1));
    if new.members.len() == old.members.len() {
        return refuse(
            ErrorCode::NotFound,
            format!("service {id} has no pool entry {vm:?} {tag:?}"),
        );
    }
    replace(model, old, new)
}

/// Deletes a service.
pub fn delete_service(model: &Model, id: &str) -> Planned<Deleted> {
    let old = get(model, id)?;
    let mut ops = vec![Op::DeleteService(id.to_string())];
    ops.extend(pool_change_ops(model, &resolve_pool(model, old), &[]));
    Ok((
        ops,
        Deleted {
            deleted: format!("service/{id}"),
            cascaded: vec![],
        },
    ))
}

/// A `Forwards` change for each VM in `before` or `after` whose membership or weight changed,
/// with consecutive generations (and the log trimmed to its size).
fn pool_change_ops(model: &Model, before: &[ResolvedMember], after: &[ResolvedMember]) -> Vec<Op> {
    let mut touched: Vec<&str> = before
        .iter()
        .filter(|b| !after.contains(b))
        .chain(after.iter().filter(|a| !before.contains(a)))
        .map(|m| m.vm.as_str())
        .collect();
    touched.sort_unstable();
    touched.dedup();
    let mut ops = Vec::new();
    let vms = touched.iter().filter_map(|id| model.vms.get(*id));
    for (generation, vm) in (model.generation + 1..).zip(vms) {
        ops.push(Op::AppendChange(change_entry(
            vm,
            generation,
            ChangeKind::Forwards,
        )));
    }
    let kept = model.changes.len() + ops.len();
    if kept > CHANGE_LOG_RETAIN {
        if let Some(first_kept) = model.changes.get(kept - CHANGE_LOG_RETAIN) {
            ops.push(Op::TrimChanges(first_kept.generation));
        }
    }
    ops
}

/// With VM `id` deleted: its `vm` entries leave every pool (tag entries stay).
pub(crate) fn services_of_vm_ops(model: &Model, id: &str) -> Vec<Op> {
    model
        .services
        .values()
        .filter(|s| s.members.iter().any(|m| m.vm.as_deref() == Some(id)))
        .map(|s| {
            let mut s = s.clone();
            s.members.retain(|m| m.vm.as_deref() != Some(id));
            Op::PutService(s)
        })
        .collect()
}

/// The services on `public_addr` (deleted with its last gateway) or of `network`.
pub(crate) fn services_where(model: &Model, pred: impl Fn(&Service) -> bool) -> Vec<&Service> {
    model.services.values().filter(|s| pred(s)).collect()
}

/// Stores gateway `id`'s health report (at `now`, Unix seconds): only members of services on
/// its public address count; the rest is refused.
pub fn report_health(
    model: &Model,
    id: &str,
    report: &HealthReport,
    now: u64,
) -> Planned<HealthView> {
    let gw = model
        .gateways
        .get(id)
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownGateway, format!("no gateway {id}")))?;
    if report.members.len() > MAX_HEALTH_MEMBERS {
        return refuse(
            ErrorCode::TooMany,
            format!("at most {MAX_HEALTH_MEMBERS} members in a report"),
        );
    }
    for m in &report.members {
        let ours = model
            .services
            .get(&m.service)
            .is_some_and(|s| s.public_addr == gw.public_addr);
        if !ours {
            return Err(bad(format!(
                "service {:?} is not on gateway {id}'s public address",
                m.service
            )));
        }
        check_id(&m.vm)?;
    }
    let mut members = report.members.clone();
    members.sort_by(|a, b| (&a.service, &a.vm).cmp(&(&b.service, &b.vm)));
    let view = HealthView {
        gateway: id.to_string(),
        reported_at: now,
        members,
    };
    Ok((vec![Op::PutHealthView(view.clone())], view))
}

/// What each gateway reported about `service`'s members.
pub fn views_of(model: &Model, service: &str) -> Vec<HealthView> {
    model
        .health_views
        .values()
        .map(|v| HealthView {
            members: v
                .members
                .iter()
                .filter(|m| m.service == service)
                .cloned()
                .collect(),
            ..v.clone()
        })
        .filter(|v| !v.members.is_empty())
        .collect()
}

/// A gateway joined or left `gw`'s public address: the other gateways of the address must
/// learn its underlay address (`probe_sources`, for health-check answers), and they refetch
/// their config on any change. One `Forwards` change for a VM of the network wakes them (none
/// when the address has no service: nothing to check).
pub(crate) fn gateways_changed_ops(model: &Model, gw: &Gateway) -> Vec<Op> {
    let serviced = model
        .services
        .values()
        .any(|s| s.public_addr == gw.public_addr);
    match model.vms.values().find(|v| v.network == gw.network) {
        Some(vm) if serviced => super::change_ops(model, vm, ChangeKind::Forwards),
        _ => Vec::new(),
    }
}
