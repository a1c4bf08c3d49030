//! VMs: records, secrets, moves, rotation and endpoint registration.

use super::*;

// ---- VMs

pub(super) async fn list_vms(
    c: Caller,
    State(reg): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Vec<VmRecord>> {
    let m = reg.read();
    let network = match c.0.role {
        Role::Admin => q.get("network").cloned(),
        // A gateway needs its network's VMs (NAT port blocks, port forwarding), nothing else.
        Role::Gateway => {
            let gw = lookup(&m.gateways, &c.0.id, ErrorCode::UnknownGateway, "gateway")?;
            Some(gw.network.clone())
        }
        Role::Host => {
            return refuse(
                ErrorCode::AdminRequired,
                "hosts list their own VMs with GET /v1/host/vms",
            )
        }
    };
    if let Some(n) = &network {
        if !m.networks.contains_key(n) {
            return refuse(ErrorCode::UnknownNetwork, format!("no network {n}"));
        }
    }
    Ok(Json(
        m.vms
            .values()
            .filter(|v| network.as_ref().is_none_or(|n| v.network == *n))
            .cloned()
            .collect(),
    ))
}

pub(super) async fn get_vm(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<VmRecord> {
    let m = reg.read();
    let vm = lookup(&m.vms, &id, ErrorCode::UnknownVm, "VM")?;
    let allowed = match c.0.role {
        Role::Admin => true,
        // The owner, the host a live migration goes to, and the previous host while the
        // endpoint is still its own: it learns from the record when the endpoint has moved.
        Role::Host => {
            vm.host.as_deref() == Some(c.0.id.as_str())
                || vm.incoming.as_ref().is_some_and(|i| i.host == c.0.id)
                || vm.endpoint.is_some_and(|ep| {
                    m.hosts
                        .get(&c.0.id)
                        .is_some_and(|h| h.underlay_addr == ep.host_addr)
                })
        }
        Role::Gateway => m
            .gateways
            .get(&c.0.id)
            .is_some_and(|g| g.network == vm.network),
    };
    if !allowed {
        return refuse(ErrorCode::NotOwner, format!("{} may not read VM {id}", c.0));
    }
    Ok(Json(vm.clone()))
}

pub(super) async fn create_vm(w: AdminWrite, body: Bytes) -> ApiResult<VmRecord> {
    let out = w
        .run_body(&body, |r, key, spec: VmSpec| {
            let reuse = r.port_reuse();
            r.write_once_with_secret(key, |m, s| plan::create_vm(m, &spec, s, reuse))
        })
        .await?;
    log::info!(
        "{} created VM {} ({} in {}, host {:?})",
        w.caller,
        out.id,
        out.ip,
        out.network,
        out.host
    );
    Ok(Json(out))
}

pub(super) async fn delete_vm(w: AdminWrite, Path(id): Path<String>) -> ApiResult<Deleted> {
    let out = w
        .run(move |r, key| {
            let reuse = r.port_reuse();
            r.write_once(key, |m| plan::delete_vm(m, &id, reuse))
        })
        .await?;
    log::info!("{} deleted {}", w.caller, out.deleted);
    Ok(Json(out))
}

/// `POST /v1/vms/{id}/migration` (admin): a live migration to another host begins.
pub(super) async fn start_migration(
    w: AdminWrite,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<VmRecord> {
    let out = w
        .run_body(&body, move |r, key, req: StartMigration| {
            let now = r.port_reuse().now;
            r.write_once(key, |m| plan::start_migration(m, &id, &req, now))
        })
        .await?;
    log::info!(
        "{} started migrating VM {} to {:?}",
        w.caller,
        out.id,
        out.incoming
    );
    Ok(Json(out))
}

/// `DELETE /v1/vms/{id}/migration` (admin): the migration was cancelled or failed.
pub(super) async fn cancel_migration(w: AdminWrite, Path(id): Path<String>) -> ApiResult<VmRecord> {
    let out = w.plan(move |m| plan::cancel_migration(m, &id)).await?;
    log::info!("{} cancelled the migration of VM {}", w.caller, out.id);
    Ok(Json(out))
}

pub(super) async fn move_vm(
    w: AdminWrite,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<VmRecord> {
    let out = w
        .run_body(&body, move |r, key, req: MoveVm| {
            let reuse = r.port_reuse();
            r.write_once(key, |m| plan::move_vm(m, &id, &req, reuse))
        })
        .await?;
    log::info!(
        "{} moved VM {} to host {:?} port {:?}",
        w.caller,
        out.id,
        out.host,
        out.host_port
    );
    Ok(Json(out))
}

pub(super) async fn rotate_secret(w: AdminWrite, Path(id): Path<String>) -> ApiResult<VmRecord> {
    let out = w
        .run(move |r, key| r.write_once_with_secret(key, |m, s| plan::rotate_vm_secret(m, &id, s)))
        .await?;
    log::info!(
        "{} rotated the secret of VM {} (generation {})",
        w.caller,
        out.id,
        out.secret_generation
    );
    Ok(Json(out))
}

pub(super) async fn vm_secret(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<SecretResponse> {
    let m = reg.read();
    let vm = lookup(&m.vms, &id, ErrorCode::UnknownVm, "VM")?;
    // Only the host that runs the VM; not even an admin (the secret never needs to leave the
    // registry except to the one host that verifies the VM's incoming tokens).
    // The host a migration goes to too: it verifies the VM's tokens once the VM resumes there.
    let runs_or_receives = vm.host.as_deref() == Some(c.0.id.as_str())
        || vm.incoming.as_ref().is_some_and(|i| i.host == c.0.id);
    if !(c.0.role == Role::Host && runs_or_receives) {
        log::warn!("refused secret of VM {id} to {}", c.0);
        return refuse(
            ErrorCode::NotOwner,
            format!(
                "{} does not run VM {id}; only its host may read its secret",
                c.0
            ),
        );
    }
    let entry = m
        .secrets
        .get(&crate::model::SecretOwner::Vm(id.clone()))
        .ok_or_else(|| ApiError::new(ErrorCode::Internal, "VM has no secret"))?;
    log::info!(
        "{} fetched the secret of VM {id} (generation {})",
        c.0,
        entry.generation
    );
    Ok(Json(SecretResponse {
        secret: SecretHex::from_secret(&entry.secret),
        generation: entry.generation,
    }))
}

pub(super) async fn register_endpoint(
    c: Caller,
    State(reg): State<Shared>,
    once: Once,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<EndpointAck> {
    if c.0.role != Role::Host {
        return refuse(
            ErrorCode::Forbidden,
            format!(
                "only the host that runs VM {id} registers its endpoint, not {}",
                c.0
            ),
        );
    }
    let update: EndpointUpdate = parse(&body)?;
    let host = c.0.id.clone();
    let vm = id.clone();
    let out = write(&reg, move |r| {
        let reuse = r.port_reuse();
        r.write_once(once.key(), |m| {
            plan::register_endpoint(m, &host, &vm, &update, reuse)
        })
    })
    .await?;
    log::info!(
        "{} registered VM {id} at {}:{} (generation {})",
        c.0,
        update.host_addr,
        update.port,
        out.generation
    );
    Ok(Json(out))
}
