//! Load-balanced services (`/v1/services`, admin only): `public_addr:port/proto -> a pool of
//! VMs`, with health checks. The gateways read them in their config.

use super::*;

pub(super) async fn list_services(
    c: Caller,
    State(reg): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Vec<Service>> {
    admin_list(&c, &reg, &q, |m| &m.services, |s| &s.network)
}

pub(super) async fn get_service(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<ServiceStatus> {
    c.admin()?;
    let m = reg.read();
    let service = lookup(&m.services, &id, ErrorCode::UnknownService, "service")?;
    Ok(Json(ServiceStatus {
        pool: plan::resolve_pool(&m, service),
        views: plan::views_of(&m, &id),
        service: service.clone(),
    }))
}

pub(super) async fn create_service(w: AdminWrite, body: Bytes) -> ApiResult<Service> {
    let out = w.plan_body(&body, plan::create_service).await?;
    log::info!(
        "{} added service {}: {}:{}/{} -> {} pool entries, port {}",
        w.caller,
        out.id,
        out.public_addr,
        out.public_port,
        out.proto,
        out.members.len(),
        out.vm_port
    );
    Ok(Json(out))
}

pub(super) async fn delete_service(w: AdminWrite, Path(id): Path<String>) -> ApiResult<Deleted> {
    let out = w.plan(move |m| plan::delete_service(m, &id)).await?;
    log::info!("{} deleted {}", w.caller, out.deleted);
    Ok(Json(out))
}

pub(super) async fn add_service_member(
    w: AdminWrite,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Service> {
    let out = w
        .plan_body(&body, move |m, member: &MemberSpec| {
            plan::add_member(m, &id, member)
        })
        .await?;
    log::info!("{} changed service {}'s pool", w.caller, out.id);
    Ok(Json(out))
}

pub(super) async fn remove_service_member(
    w: AdminWrite,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Service> {
    let out = w
        .plan(move |m| {
            let vm = q.get("vm").map(String::as_str);
            plan::remove_member(m, &id, vm, q.get("tag").map(String::as_str))
        })
        .await?;
    log::info!("{} changed service {}'s pool", w.caller, out.id);
    Ok(Json(out))
}

/// `PUT /v1/gateways/{id}/health`: that gateway's view of its services' members.
pub(super) async fn report_health(
    c: Caller,
    State(reg): State<Shared>,
    once: Once,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<HealthView> {
    if !c.is(Role::Gateway, &id) {
        return refuse(
            ErrorCode::Forbidden,
            "only the gateway itself reports its health view",
        );
    }
    let report: HealthReport = parse(&body)?;
    let now = u64::from(crate::service::unix_now());
    let out = write(&reg, move |r| {
        r.write_once(once.key(), |m| plan::report_health(m, &id, &report, now))
    })
    .await?;
    let down = out.members.iter().filter(|m| !m.up).count();
    log::info!(
        "gateway {} reports {} members, {down} down",
        out.gateway,
        out.members.len()
    );
    Ok(Json(out))
}
