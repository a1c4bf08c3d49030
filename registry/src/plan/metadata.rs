//! Planning of metadata writes: operator attributes of VMs and projects, guest attributes
//! with their limits, scopes, and the signing keys' life (created, rotated, forgotten).

use super::*;
use crate::metastate::{MetaKey, MetaRecord, ProjectRecord, SigningKeyRecord, VmMetadataRecord};
use vnp_registry_client::metadata::{
    Attributes, Jwk, Project, ProjectUpdate, SigningKeyInfo, DEFAULT_ZONE,
};

/// Longest value of an operator attribute (VM or project).
pub const MAX_ATTRIBUTE_VALUE: usize = 64 * 1024;
/// Most bytes (keys + values) of one VM's or project's operator attributes.
pub const MAX_ATTRIBUTES_TOTAL: usize = 256 * 1024;
/// Longest value of a guest attribute.
pub const MAX_GUEST_VALUE: usize = 4096;
/// Most guest attributes per VM.
pub const MAX_GUEST_ATTRIBUTES: usize = 64;
/// Most bytes (keys + values) of one VM's guest attributes.
pub const MAX_GUEST_TOTAL: usize = 64 * 1024;
/// Most scopes of a service account, and the longest scope.
pub const MAX_SCOPES: usize = 32;
const MAX_SCOPE_LEN: usize = 256;

/// `[A-Za-z0-9_-]{1,max}`: attribute keys, guest namespaces and keys.
pub fn check_attribute_name(what: &str, name: &str, max: usize) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        return Ok(());
    }
    refuse(
        ErrorCode::BadRequest,
        format!("{what} {name:?}: use 1-{max} of [A-Za-z0-9_-]"),
    )
}

fn total(attrs: &Attributes) -> usize {
    attrs.iter().map(|(k, v)| k.len() + v.len()).sum()
}

fn vm_meta(model: &Model, vm: &str) -> VmMetadataRecord {
    model
        .meta
        .vms
        .get(vm)
        .cloned()
        .unwrap_or_else(|| VmMetadataRecord {
            vm: vm.to_string(),
            ..VmMetadataRecord::default()
        })
}

fn store_vm_meta(record: VmMetadataRecord) -> Op {
    if record.is_empty() {
        Op::DeleteMeta(MetaKey::Vm(record.vm))
    } else {
        Op::PutMeta(MetaRecord::Vm(record))
    }
}

fn known_vm<'m>(model: &'m Model, vm: &str) -> Result<&'m VmRecord, ApiError> {
    model
        .vms
        .get(vm)
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownVm, format!("no VM {vm}")))
}

/// Sets (`Some`) or removes (`None`) an operator attribute; removing a missing one is no
/// error. Returns the VM's attributes after the write.
pub fn set_vm_attribute(
    model: &Model,
    vm: &str,
    key: &str,
    value: Option<&str>,
) -> Planned<Attributes> {
    known_vm(model, vm)?;
    check_attribute_name("attribute key", key, 128)?;
    let mut record = vm_meta(model, vm);
    set_attribute(&mut record.attributes, key, value)?;
    let out = record.attributes.clone();
    if model.meta.vms.get(vm) == Some(&record) {
        return Ok((vec![], out));
    }
    Ok((vec![store_vm_meta(record)], out))
}

/// The operator-attribute rules shared by VMs and projects.
fn set_attribute(attrs: &mut Attributes, key: &str, value: Option<&str>) -> Result<(), ApiError> {
    let Some(value) = value else {
        attrs.remove(key);
        return Ok(());
    };
    if value.len() > MAX_ATTRIBUTE_VALUE {
        return refuse(
            ErrorCode::TooLarge,
            format!(
                "attribute {key}: {} bytes, at most {MAX_ATTRIBUTE_VALUE}",
                value.len()
            ),
        );
    }
    attrs.insert(key.to_string(), value.to_string());
    if total(attrs) > MAX_ATTRIBUTES_TOTAL {
        return refuse(
            ErrorCode::TooMany,
            format!("attributes would take more than {MAX_ATTRIBUTES_TOTAL} bytes in all"),
        );
    }
    Ok(())
}

/// Sets the scopes of a VM's service account (empty: back to the default).
pub fn set_vm_scopes(model: &Model, vm: &str, scopes: &[String]) -> Planned<Vec<String>> {
    known_vm(model, vm)?;
    if scopes.len() > MAX_SCOPES {
        return refuse(
            ErrorCode::TooMany,
            format!("{} scopes, at most {MAX_SCOPES}", scopes.len()),
        );
    }
    for s in scopes {
        let ok =
            !s.is_empty() && s.len() <= MAX_SCOPE_LEN && s.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            return refuse(
                ErrorCode::BadRequest,
                format!("scope {s:?}: 1-{MAX_SCOPE_LEN} printable ASCII characters, no spaces"),
            );
        }
    }
    let mut record = vm_meta(model, vm);
    record.scopes = (!scopes.is_empty()).then(|| scopes.to_vec());
    let out = crate::credentials::scopes_of(Some(&record));
    if model.meta.vms.get(vm) == Some(&record) {
        return Ok((vec![], out));
    }
    Ok((vec![store_vm_meta(record)], out))
}

/// A guest attribute written by the guest of `vm` through `host`, which must run it. Limits:
/// [`MAX_GUEST_VALUE`] bytes a value, [`MAX_GUEST_ATTRIBUTES`] and [`MAX_GUEST_TOTAL`] bytes a
/// VM. Writing the value an attribute already has writes nothing.
pub fn put_guest_attribute(
    model: &Model,
    host: &str,
    vm: &str,
    namespace: &str,
    key: &str,
    value: &str,
) -> Planned<()> {
    let record = known_vm(model, vm)?;
    if record.host.as_deref() != Some(host) {
        return refuse(
            ErrorCode::NotOwner,
            format!("host {host} does not run VM {vm}; only its host writes its guest attributes"),
        );
    }
    check_attribute_name("guest attribute namespace", namespace, 64)?;
    check_attribute_name("guest attribute key", key, 64)?;
    if value.len() > MAX_GUEST_VALUE {
        return refuse(
            ErrorCode::TooLarge,
            format!(
                "guest attribute {namespace}/{key}: {} bytes, at most {MAX_GUEST_VALUE}",
                value.len()
            ),
        );
    }
    let mut meta = vm_meta(model, vm);
    let full_key = format!("{namespace}/{key}");
    if meta.guest_attributes.get(&full_key).map(String::as_str) == Some(value) {
        return Ok((vec![], ()));
    }
    meta.guest_attributes.insert(full_key, value.to_string());
    if meta.guest_attributes.len() > MAX_GUEST_ATTRIBUTES {
        return refuse(
            ErrorCode::TooMany,
            format!("VM {vm} already has {MAX_GUEST_ATTRIBUTES} guest attributes"),
        );
    }
    if total(&meta.guest_attributes) > MAX_GUEST_TOTAL {
        return refuse(
            ErrorCode::TooMany,
            format!("VM {vm}'s guest attributes would take more than {MAX_GUEST_TOTAL} bytes"),
        );
    }
    Ok((vec![store_vm_meta(meta)], ()))
}

/// Ops that forget a VM's metadata (with the VM).
pub fn forget_vm_ops(model: &Model, vm: &str) -> Vec<Op> {
    match model.meta.vms.contains_key(vm) {
        true => vec![Op::DeleteMeta(MetaKey::Vm(vm.to_string()))],
        false => vec![],
    }
}

/// Ops that forget a network's project (with the network).
pub fn forget_project_ops(model: &Model, network: &str) -> Vec<Op> {
    match model.meta.projects.contains_key(network) {
        true => vec![Op::DeleteMeta(MetaKey::Project(network.to_string()))],
        false => vec![],
    }
}

/// The project of `network` as the API shows it (defaults filled in).
pub fn project_view(network: &str, record: Option<&ProjectRecord>) -> Project {
    Project {
        network: network.to_string(),
        project_id: record
            .and_then(|r| r.project_id.clone())
            .unwrap_or_else(|| network.to_string()),
        zone: record
            .and_then(|r| r.zone.clone())
            .unwrap_or_else(|| DEFAULT_ZONE.to_string()),
        attributes: record.map(|r| r.attributes.clone()).unwrap_or_default(),
        require_session_token: record.is_some_and(|r| r.require_session_token),
    }
}

fn project_record(model: &Model, network: &str) -> Result<ProjectRecord, ApiError> {
    if !model.networks.contains_key(network) {
        return refuse(ErrorCode::UnknownNetwork, format!("no network {network}"));
    }
    Ok(model
        .meta
        .projects
        .get(network)
        .cloned()
        .unwrap_or_else(|| ProjectRecord {
            network: network.to_string(),
            ..ProjectRecord::default()
        }))
}

fn store_project(model: &Model, record: ProjectRecord) -> Planned<Project> {
    let view = project_view(&record.network, Some(&record));
    if model.meta.projects.get(&record.network) == Some(&record) {
        return Ok((vec![], view));
    }
    Ok((vec![Op::PutMeta(MetaRecord::Project(record))], view))
}

/// Sets a network's project id and zone (`[a-z0-9-]`, like ids).
pub fn update_project(model: &Model, network: &str, update: &ProjectUpdate) -> Planned<Project> {
    let mut record = project_record(model, network)?;
    if let Some(p) = &update.project_id {
        check_name("project_id", p)?;
        record.project_id = Some(p.clone());
    }
    if let Some(z) = &update.zone {
        check_name("zone", z)?;
        record.zone = Some(z.clone());
    }
    if let Some(required) = update.require_session_token {
        record.require_session_token = required;
    }
    store_project(model, record)
}

/// Sets (`Some`) or removes (`None`) a project attribute.
pub fn set_project_attribute(
    model: &Model,
    network: &str,
    key: &str,
    value: Option<&str>,
) -> Planned<Project> {
    let mut record = project_record(model, network)?;
    check_attribute_name("attribute key", key, 128)?;
    set_attribute(&mut record.attributes, key, value)?;
    store_project(model, record)
}

/// A signing key drawn by the caller (planners draw no randomness).
#[derive(Debug, Clone)]
pub struct NewSigningKey {
    pub kid: String,
    pub jwk: Jwk,
    /// The private scalar, as a 32-byte secret.
    pub private: VmSecret,
    /// Unix seconds.
    pub now: u64,
}

fn add_key_ops(new: &NewSigningKey) -> Vec<Op> {
    vec![
        Op::PutMeta(MetaRecord::SigningKey(SigningKeyRecord {
            kid: new.kid.clone(),
            jwk: new.jwk.clone(),
            created_at: new.now,
            retired_at: None,
            published_until: None,
        })),
        Op::PutSecret(
            SecretOwner::SigningKey(new.kid.clone()),
            SecretEntry::new(new.private.clone(), 1),
        ),
    ]
}

/// Adds `new` unless a key already signs (the first start; several replicas starting at once
/// add one between them). True if it was added.
pub fn ensure_signing_key(model: &Model, new: &NewSigningKey) -> Planned<bool> {
    if model.meta.active_signer().is_some() {
        return Ok((vec![], false));
    }
    Ok((add_key_ops(new), true))
}

/// `new` signs from now on; the keys that signed so far stay published for `publish_for_s`
/// (the longest token lifetime) and keys whose publication has ended are forgotten.
pub fn rotate_signing_key(
    model: &Model,
    new: &NewSigningKey,
    publish_for_s: u64,
) -> Planned<Vec<SigningKeyInfo>> {
    let mut ops = Vec::new();
    for key in model.meta.signing_keys.values() {
        if !key.published(new.now) {
            ops.push(Op::DeleteMeta(MetaKey::SigningKey(key.kid.clone())));
            ops.push(Op::DeleteSecret(SecretOwner::SigningKey(key.kid.clone())));
        } else if key.retired_at.is_none() {
            ops.push(Op::PutMeta(MetaRecord::SigningKey(SigningKeyRecord {
                retired_at: Some(new.now),
                published_until: Some(new.now.saturating_add(publish_for_s)),
                ..key.clone()
            })));
        }
    }
    ops.extend(add_key_ops(new));
    let mut after = model.meta.clone();
    for op in &ops {
        match op {
            Op::PutMeta(r) => after.put(r),
            Op::DeleteMeta(k) => after.delete(k),
            _ => {}
        }
    }
    let infos = after.signing_keys.values().map(|k| k.info()).collect();
    Ok((ops, infos))
}
