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
        require_session_token: project.require_session_token,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{self, metadata as md, PortReuse};
    use vnp_protocol::token::VmSecret;
    use vnp_registry_client::api::{HostSpec, NetworkSpec, VmSpec};

    const REUSE: PortReuse = PortReuse {
        now: 1000,
        quarantine_secs: 0,
    };

    fn apply<T>(m: &mut Model, planned: crate::plan::Planned<T>) -> T {
        let (ops, out) = planned.unwrap();
        m.apply(&ops);
        out
    }

    /// n1 with h1 and VMs a, b on it.
    fn model() -> Model {
        let mut m = Model::default();
        let net = NetworkSpec {
            id: "n1".into(),
            vni: None,
            cidr: "10.1.0.0/24".parse().unwrap(),
            mtu: None,
            default_policy: None,
            nat_block: None,
        };
        let p = plan::create_network(&m, &net);
        apply(&mut m, p);
        let host = HostSpec {
            id: "h1".into(),
            underlay_addr: "198.18.0.1".parse().unwrap(),
            port_range: None,
        };
        let p = plan::create_host(&m, &host);
        apply(&mut m, p);
        for (id, b) in [("a", 1), ("b", 2)] {
            let spec = VmSpec {
                id: id.into(),
                network: "n1".into(),
                host: Some("h1".into()),
                ..VmSpec::default()
            };
            let p = plan::create_vm(&m, &spec, VmSecret::from_bytes([b; 32]), REUSE);
            apply(&mut m, p);
        }
        m
    }

    fn etag(m: &Model, vm: &str) -> String {
        vm_metadata(m, &m.vms[vm]).unwrap().etag
    }

    #[test]
    fn etag_changes_exactly_when_the_document_does() {
        let mut m = model();
        let first = etag(&m, "a");
        assert_eq!(etag(&m, "a"), first);
        assert_ne!(etag(&m, "b"), first, "documents of two VMs differ");
        // Another VM's change leaves a's etag alone.
        let p = md::set_vm_attribute(&m, "b", "k", Some("v"));
        apply(&mut m, p);
        assert_eq!(etag(&m, "a"), first);
        // Each part of a's document changes it.
        let p = md::set_vm_attribute(&m, "a", "k", Some("v"));
        apply(&mut m, p);
        let second = etag(&m, "a");
        assert_ne!(second, first);
        let p = md::put_guest_attribute(&m, "h1", "a", "ns", "k", "v");
        apply(&mut m, p);
        let third = etag(&m, "a");
        assert_ne!(third, second);
        let p = md::set_project_attribute(&m, "n1", "k", Some("v"));
        apply(&mut m, p);
        assert_ne!(etag(&m, "a"), third);
        // Writing what is already there plans nothing.
        assert!(md::set_vm_attribute(&m, "a", "k", Some("v"))
            .unwrap()
            .0
            .is_empty());
        assert!(md::put_guest_attribute(&m, "h1", "a", "ns", "k", "v")
            .unwrap()
            .0
            .is_empty());
    }

    #[test]
    fn identity_claims_and_caller_rules() {
        let m = model();
        let doc = vm_metadata(&m, &m.vms["a"]).unwrap();
        assert_eq!(doc.instance.id, instance_id("a"));
        assert!(
            doc.instance.id.parse::<i64>().unwrap() >= 0,
            "fits a signed 64-bit id"
        );
        assert_eq!(
            doc.instance.service_account.email,
            "default@n1.vnp.internal"
        );
        assert_eq!(service_account_email("x@y.example", "p"), "x@y.example");
        let policy = CredentialPolicy::default();
        let req = |audience: &str, format| IdentityTokenRequest {
            audience: audience.into(),
            format,
        };
        let full = identity_claims(&doc, &req("aud", IdentityFormat::Full), &policy, 100).unwrap();
        assert_eq!(full["exp"], 100 + DEFAULT_CREDENTIAL_TTL_S);
        assert_eq!(full["google"]["compute_engine"]["instance_name"], "a");
        let std =
            identity_claims(&doc, &req("aud", IdentityFormat::Standard), &policy, 100).unwrap();
        assert!(std.get("google").is_none());
        assert!(identity_claims(&doc, &req("a b", IdentityFormat::Standard), &policy, 1).is_err());
        let host = |id: &str| Identity {
            role: Role::Host,
            id: id.into(),
        };
        assert!(vm_for_caller(&m, &host("h1"), "a").is_ok());
        let gw = Identity {
            role: Role::Gateway,
            id: "g1".into(),
        };
        for caller in [host("h2"), gw] {
            assert_eq!(
                vm_for_caller(&m, &caller, "a").unwrap_err().code,
                ErrorCode::NotOwner
            );
        }
    }
}
