//! VMs: allocation of address, MAC, host port and NAT block; moves, rotation, endpoints.

use super::*;

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
/// A port in another VM's quarantine is not free.
fn pick_host_port(
    model: &Model,
    host: &Host,
    vm_id: &str,
    wanted: Option<u16>,
    now: u64,
) -> Result<u16, ApiError> {
    let taken = |p: u16| model.vm_on_port(&host.id, p, vm_id);
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
        check_not_quarantined(model, &host.id, p, vm_id, now)?;
        return Ok(p);
    }
    (host.port_range.first..=host.port_range.last)
        .find(|p| taken(*p).is_none() && model.port_quarantine(&host.id, *p, vm_id, now).is_none())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::PoolExhausted,
                format!("no free port on host {}", host.id),
            )
        })
}

/// Creates a VM with a fresh secret, allocating whatever the spec leaves open.
pub fn create_vm(
    model: &Model,
    spec: &VmSpec,
    secret: VmSecret,
    reuse: PortReuse,
) -> Planned<VmRecord> {
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
                Some(pick_host_port(
                    model,
                    host,
                    &spec.id,
                    spec.host_port,
                    reuse.now,
                )?),
            )
        }
        None if spec.host_port.is_some() => {
            return refuse(ErrorCode::BadRequest, "host_port given without host")
        }
        None => (None, None),
    };
    let nat_ports = vec![pick_nat_block(model, net, &spec.id)?];
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
        incoming: None,
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

/// Deletes a VM and its secret; its host port goes into quarantine.
pub fn delete_vm(model: &Model, id: &str, reuse: PortReuse) -> Planned<Deleted> {
    let vm = get_vm(model, id)?;
    let mut ops = vec![
        Op::DeleteVm(id.to_string()),
        Op::DeleteSecret(SecretOwner::Vm(id.to_string())),
    ];
    ops.extend(super::metadata::forget_vm_ops(model, id));
    ops.extend(release_vm_port_ops(model, vm, reuse));
    ops.extend(forwards_of_vm_ops(model, id));
    ops.extend(services_of_vm_ops(model, id));
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
/// host registers, so packets keep flowing to the old host during a migration. A port it gives
/// up goes into quarantine.
pub fn move_vm(model: &Model, id: &str, req: &MoveVm, reuse: PortReuse) -> Planned<VmRecord> {
    let before = get_vm(model, id)?;
    let mut vm = before.clone();
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
            let wanted = req.host_port.or(keep);
            vm.host_port = Some(pick_host_port(model, host, id, wanted, reuse.now)?);
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
    // A move replaces any migration under way.
    vm.incoming = None;
    let mut ops = vec![Op::PutVm(vm.clone())];
    if (&before.host, before.host_port) != (&vm.host, vm.host_port) {
        ops.extend(release_vm_port_ops(model, before, reuse));
    }
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

/// "VM `id` is now served at `update`", from host `caller`. If that changes the VM's port, the
/// new one must not be in another VM's quarantine and the old one goes into quarantine.
pub fn register_endpoint(
    model: &Model,
    caller: &str,
    id: &str,
    update: &EndpointUpdate,
    reuse: PortReuse,
) -> Planned<EndpointAck> {
    let mut vm = get_vm(model, id)?.clone();
    let before = vm.clone();
    if let Some(arrival) = vm.incoming.take().filter(|i| i.host == caller) {
        // The migrated VM resumed on `caller`: ownership moves with this registration. The old
        // host's port goes into quarantine below (host_port differs from `before`'s).
        vm.host = Some(arrival.host);
        vm.host_port = Some(arrival.host_port);
        if update.port != arrival.host_port {
            return refuse(
                ErrorCode::BadRequest,
                format!(
                    "VM {id} migrates to port {} on host {caller}, not {}",
                    arrival.host_port, update.port
                ),
            );
        }
    } else if vm.host.as_deref() != Some(caller) {
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
    if let Some(other) = model.vm_on_port(caller, update.port, id) {
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
    check_not_quarantined(model, caller, update.port, id, reuse.now)?;
    let mut ops = Vec::new();
    if (&before.host, before.host_port) != (&vm.host, Some(update.port)) {
        ops.extend(release_vm_port_ops(model, &before, reuse));
    }
    let generation = model.generation + 1;
    vm.host_port = Some(update.port);
    vm.endpoint = Some(Endpoint {
        host_addr: update.host_addr,
        port: update.port,
        generation,
    });
    ops.push(Op::PutVm(vm.clone()));
    ops.extend(change_ops(model, &vm, ChangeKind::Endpoint));
    Ok((ops, EndpointAck { generation }))
}

/// Announces a live migration of VM `id` to `req.host`: reserves its port there and lets that
/// host read the secret. Ownership stays with the current host until the new one registers the
/// endpoint (when the migrated VM resumes), so the VM keeps its tokens during the pre-copy.
pub fn start_migration(
    model: &Model,
    id: &str,
    req: &StartMigration,
    now: u64,
) -> Planned<VmRecord> {
    let mut vm = get_vm(model, id)?.clone();
    let Some(owner) = vm.host.clone() else {
        return refuse(
            ErrorCode::Conflict,
            format!("VM {id} runs on no host; assign it with a move instead"),
        );
    };
    if owner == req.host {
        return refuse(
            ErrorCode::BadRequest,
            format!("VM {id} already runs on host {owner}"),
        );
    }
    let host = model
        .hosts
        .get(&req.host)
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownHost, format!("no host {}", req.host)))?;
    let keep = vm
        .incoming
        .as_ref()
        .filter(|i| i.host == req.host)
        .map(|i| i.host_port);
    let host_port = pick_host_port(model, host, id, req.host_port.or(keep), now)?;
    vm.incoming = Some(IncomingMigration {
        host: req.host.clone(),
        host_port,
    });
    let mut ops = vec![Op::PutVm(vm.clone())];
    ops.extend(change_ops(model, &vm, ChangeKind::Moved));
    Ok((ops, vm))
}

/// Forgets the migration under way (cancelled or failed): the VM stays where it is.
pub fn cancel_migration(model: &Model, id: &str) -> Planned<VmRecord> {
    let mut vm = get_vm(model, id)?.clone();
    if vm.incoming.take().is_none() {
        return Ok((vec![], vm));
    }
    let mut ops = vec![Op::PutVm(vm.clone())];
    ops.extend(change_ops(model, &vm, ChangeKind::Moved));
    Ok((ops, vm))
}
