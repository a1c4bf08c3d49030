//! Metadata and credentials (issue #11): the JWKS, signing keys, a VM's metadata document
//! (with long-poll), access and identity tokens, attributes and projects.

use super::*;
use vnp_registry_client::metadata::*;

/// Long-poll time of a metadata GET with `wait_etag` when `timeout_sec` is not given.
pub const DEFAULT_METADATA_WAIT: Duration = Duration::from_secs(60);

/// The request body as UTF-8 text (attribute values).
fn text(body: &Bytes) -> Result<String, ApiError> {
    String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::new(ErrorCode::BadRequest, "the value must be UTF-8 text"))
}

/// `GET /v1/jwks`: any TLS client, with or without a client certificate.
pub(super) async fn jwks(State(reg): State<Shared>) -> Json<Jwks> {
    Json(reg.jwks())
}

pub(super) async fn list_signing_keys(
    c: Caller,
    State(reg): State<Shared>,
) -> ApiResult<Vec<SigningKeyInfo>> {
    c.admin()?;
    Ok(Json(reg.signing_keys()))
}

pub(super) async fn rotate_signing_key(
    c: Caller,
    State(reg): State<Shared>,
) -> ApiResult<Vec<SigningKeyInfo>> {
    c.admin()?;
    let keys = write(&reg, |r| r.rotate_signing_key()).await?;
    let active: Vec<&str> = keys
        .iter()
        .filter(|k| k.active)
        .map(|k| k.kid.as_str())
        .collect();
    log::info!(
        "{} rotated the signing key; now signing with {active:?}",
        c.0
    );
    Ok(Json(keys))
}

fn wait_params(q: &HashMap<String, String>) -> Result<Option<(String, Duration)>, ApiError> {
    let Some(etag) = q.get("wait_etag") else {
        return Ok(None);
    };
    let timeout = match q.get("timeout_sec") {
        None => DEFAULT_METADATA_WAIT,
        Some(s) => Duration::from_secs(s.parse().map_err(|_| {
            ApiError::new(
                ErrorCode::BadRequest,
                format!("timeout_sec={s:?} is not a number"),
            )
        })?),
    };
    Ok(Some((etag.clone(), timeout.min(MAX_WATCH))))
}

/// `GET /v1/vms/{id}/metadata[?wait_etag=E&timeout_sec=N]`: with `wait_etag`, answers once
/// the document's etag differs from E (woken by every change the model applies, also from
/// another replica through the store's feed), or after N seconds with the document as is.
pub(super) async fn vm_metadata(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<VmMetadata> {
    let wait = wait_params(&q)?;
    let mut rx = reg.subscribe();
    let deadline = tokio::time::Instant::now() + wait.as_ref().map_or(Duration::ZERO, |w| w.1);
    loop {
        // Marked before reading: a change applied after the read wakes the wait below.
        rx.mark_unchanged();
        let md = reg.vm_metadata(&c.0, &id)?;
        match &wait {
            Some((etag, _)) if *etag == md.etag => {}
            _ => return Ok(Json(md)),
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => continue,
            _ => return Ok(Json(md)),
        }
    }
}

pub(super) async fn access_token(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<AccessToken> {
    reg.mint_access_token(&c.0, &id)
        .inspect_err(|e| log::info!("access token for {id} refused to {}: {}", c.0, e.message))
        .map(Json)
}

pub(super) async fn identity_token(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<IdentityToken> {
    let req: IdentityTokenRequest = parse(&body)?;
    reg.mint_identity_token(&c.0, &id, &req)
        .inspect_err(|e| log::info!("identity token for {id} refused to {}: {}", c.0, e.message))
        .map(Json)
}

pub(super) async fn put_guest_attribute(
    c: Caller,
    State(reg): State<Shared>,
    Path((id, namespace, key)): Path<(String, String, String)>,
    body: Bytes,
) -> ApiResult<serde_json::Value> {
    if c.0.role != Role::Host {
        return refuse(
            ErrorCode::Forbidden,
            format!("guest attributes are written by the VM's host, not {}", c.0),
        );
    }
    let value = text(&body)?;
    let host = c.0.id.clone();
    let (vm, ns, k) = (id.clone(), namespace.clone(), key.clone());
    let size = value.len();
    write(&reg, move |r| {
        r.put_guest_attribute(&host, &vm, &ns, &k, &value)
    })
    .await
    .inspect_err(|e| {
        log::info!(
            "guest attribute {namespace}/{key} of {id} refused to {}: {}",
            c.0,
            e.message
        )
    })?;
    Ok(Json(
        serde_json::json!({"vm": id, "namespace": namespace, "key": key, "size": size}),
    ))
}

pub(super) async fn set_vm_attribute(
    c: Caller,
    State(reg): State<Shared>,
    Path((id, key)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<AttributesResponse> {
    c.admin()?;
    let value = text(&body)?;
    let attributes = write(&reg, move |r| {
        r.write(|m| plan::metadata::set_vm_attribute(m, &id, &key, Some(&value)))
    })
    .await?;
    Ok(Json(AttributesResponse { attributes }))
}

pub(super) async fn unset_vm_attribute(
    c: Caller,
    State(reg): State<Shared>,
    Path((id, key)): Path<(String, String)>,
) -> ApiResult<AttributesResponse> {
    c.admin()?;
    let attributes = write(&reg, move |r| {
        r.write(|m| plan::metadata::set_vm_attribute(m, &id, &key, None))
    })
    .await?;
    Ok(Json(AttributesResponse { attributes }))
}

pub(super) async fn set_vm_scopes(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<ScopesUpdate> {
    c.admin()?;
    let req: ScopesUpdate = parse(&body)?;
    let scopes = write(&reg, move |r| {
        r.write(|m| plan::metadata::set_vm_scopes(m, &id, &req.scopes))
    })
    .await?;
    Ok(Json(ScopesUpdate { scopes }))
}

pub(super) async fn get_project(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Project> {
    c.admin()?;
    let m = reg.read();
    if !m.networks.contains_key(&id) {
        return refuse(ErrorCode::UnknownNetwork, format!("no network {id}"));
    }
    Ok(Json(plan::metadata::project_view(
        &id,
        m.meta.projects.get(&id),
    )))
}

pub(super) async fn update_project(
    c: Caller,
    State(reg): State<Shared>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Project> {
    c.admin()?;
    let req: ProjectUpdate = parse(&body)?;
    let out = write(&reg, move |r| {
        r.write(|m| plan::metadata::update_project(m, &id, &req))
    })
    .await?;
    Ok(Json(out))
}

pub(super) async fn set_project_attribute(
    c: Caller,
    State(reg): State<Shared>,
    Path((id, key)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Project> {
    c.admin()?;
    let value = text(&body)?;
    let out = write(&reg, move |r| {
        r.write(|m| plan::metadata::set_project_attribute(m, &id, &key, Some(&value)))
    })
    .await?;
    Ok(Json(out))
}

pub(super) async fn unset_project_attribute(
    c: Caller,
    State(reg): State<Shared>,
    Path((id, key)): Path<(String, String)>,
) -> ApiResult<Project> {
    c.admin()?;
    let out = write(&reg, move |r| {
        r.write(|m| plan::metadata::set_project_attribute(m, &id, &key, None))
    })
    .await?;
    Ok(Json(out))
}
