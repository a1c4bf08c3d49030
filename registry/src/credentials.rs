//! The metadata document of a VM and the claims of the credentials minted for it (issue
//! #11). Pure functions of the model and the clock; signing happens in the service with the
//! active key.

use crate::error::{refuse, ApiError};
use crate::metastate::VmMetadataRecord;
use crate::model::Model;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use vnp_registry_client::api::{ErrorCode, Identity, Role, VmRecord};
use vnp_registry_client::metadata::*;

/// Lifetime of access and identity tokens unless the registry is told otherwise
/// (`--credential-ttl-secs`).
pub const DEFAULT_CREDENTIAL_TTL_S: u64 = 600;

/// How credentials are minted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialPolicy {
    /// The `iss` claim (`--token-issuer`).
    pub issuer: String,
    /// Token lifetime in seconds.
    pub ttl_s: u64,
}

impl Default for CredentialPolicy {
    fn default() -> Self {
        CredentialPolicy {
            issuer: "vnp-registry".into(),
            ttl_s: DEFAULT_CREDENTIAL_TTL_S,
        }
    }
}

/// The VM `caller` may get metadata and credentials of: the host that runs it now, or an
/// admin.
pub fn vm_for_caller<'m>(
    model: &'m Model,
    caller: &Identity,
    vm: &str,
) -> Result<&'m VmRecord, ApiError> {
    let record = model
        .vms
        .get(vm)
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownVm, format!("no VM {vm}")))?;
    let allowed = match caller.role {
        Role::Admin => true,
        Role::Host => record.host.as_deref() == Some(caller.id.as_str()),
        Role::Gateway => false,
    };
    if !allowed {
        return refuse(
            ErrorCode::NotOwner,
            format!("{caller} does not run VM {vm}; only its host (or an admin) may ask"),
        );
    }
    Ok(record)
}

/// The numeric instance id of a VM: the first 63 bits of SHA-256("vnp-instance:" + id).
pub fn instance_id(vm: &str) -> String {
    let digest = Sha256::digest(format!("vnp-instance:{vm}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) >> 1).to_string()
}

/// A service account's email: the account itself if it has an `@`, else
/// `<account>@<project id>.vnp.internal`.
pub fn service_account_email(account: &str, project_id: &str) -> String {
    if account.contains('@') {
        account.to_string()
    } else {
        format!("{account}@{project_id}.vnp.internal")
    }
}

/// The scopes of a VM's service account.
pub fn scopes_of(record: Option<&VmMetadataRecord>) -> Vec<String> {
    match record.and_then(|r| r.scopes.clone()) {
        Some(s) => s,
        None => DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect(),
    }
}

/// The etag of a metadata document: 16 hex digits of SHA-256 over its JSON (maps are
/// ordered, so equal documents give equal etags and any change gives another).
fn etag_of(instance: &InstanceMetadata, project: &ProjectMetadata, guest: &Attributes) -> String {
    let bytes = serde_json::to_vec(&(instance, project, guest)).unwrap_or_default();
    Sha256::digest(&bytes)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Everything the metadata server shows VM `vm`.
pub fn vm_metadata(model: &Model, vm: &VmRecord) -> Result<VmMetadata, ApiError> {
    let network = model.networks.get(&vm.network).ok_or_else(|| {
        ApiError::new(ErrorCode::Internal, format!("VM {} has no network", vm.id))
    })?;
    let project =
        crate::plan::metadata::project_view(&network.id, model.meta.projects.get(&network.id));
    let record = model.meta.vms.get(&vm.id);
    let instance = InstanceMetadata {
        id: instance_id(&vm.id),
        name: vm.id.clone(),
        hostname: vm.hostname.clone(),
        zone: project.zone.clone(),
        ip: vm.ip,
        mac: vm.mac,
        network: network.id.clone(),
        gateway: network.router,
        mtu: network.mtu,
        attributes: record.map(|r| r.attributes.clone()).unwrap_or_default(),
        service_account: ServiceAccount {
            email: service_account_email(&vm.service_account, &project.project_id),
            scopes: scopes_of(record),
        },
    };
    let project = ProjectMetadata {
        project_id: project.project_id,
        attributes: project.attributes,
    };
    let guest_attributes = record
        .map(|r| r.guest_attributes.clone())
        .unwrap_or_default();
    Ok(VmMetadata {
        etag: etag_of(&instance, &project, &guest_attributes),
        instance,
        project,
        guest_attributes,
    })
}

/// Claims of an access token for the VM whose metadata is `md`, issued at `now`.
pub fn access_claims(md: &VmMetadata, policy: &CredentialPolicy, now: u64) -> Value {
    let sa = &md.instance.service_account;
    json!({
        "iss": policy.issuer,
        "sub": sa.email,
        "email": sa.email,
        "scope": sa.scopes.join(" "),
        "iat": now,
        "exp": now + policy.ttl_s,
        "token_use": "access",
        "vnp": {"vm": md.instance.name, "network": md.instance.network,
                "project_id": md.project.project_id},
    })
}

/// Checks an identity token's audience: 1-512 printable ASCII characters.
pub fn check_audience(audience: &str) -> Result<(), ApiError> {
    let ok = !audience.is_empty()
        && audience.len() <= 512
        && audience.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        return Ok(());
    }
    refuse(
        ErrorCode::BadRequest,
        "audience: 1-512 printable ASCII characters without spaces",
    )
}

/// Claims of an identity token for `audience`.
pub fn identity_claims(
    md: &VmMetadata,
    req: &IdentityTokenRequest,
    policy: &CredentialPolicy,
    now: u64,
) -> Result<Value, ApiError> {
    check_audience(&req.audience)?;
    let sa = &md.instance.service_account;
    let mut claims = json!({
        "iss": policy.issuer,
        "aud": req.audience,
        "sub": sa.email,
        "email": sa.email,
        "email_verified": true,
        "iat": now,
        "exp": now + policy.ttl_s,
        "token_use": "identity",
        "vnp": {"vm": md.instance.name, "network": md.instance.network,
                "ip": md.instance.ip.to_string()},
    });
    if req.format == IdentityFormat::Full {
        claims["google"] = json!({"compute_engine": {
            "instance_id": md.instance.id,
            "instance_name": md.instance.name,
            "project_id": md.project.project_id,
            "zone": md.instance.zone,
        }});
    }
    Ok(claims)
}
