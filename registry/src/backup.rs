//! Export and import of the whole model (`vnpctl export` / `vnpctl import`): backup and
//! restore, and moving a registry between stores (redb <-> etcd).

use crate::error::{refuse, ApiError};
use crate::model::{MetaKey, MetaRecord, Model, Op, SecretEntry, SecretOwner};
use crate::store::sealing::KeyRing;
use vnp_protocol::token::VmSecret;
use vnp_registry_client::api::ErrorCode;
use vnp_registry_client::backup::{Export, ImportSummary, SealedSecret, EXPORT_FORMAT};
use zeroize::Zeroize;

/// Ops per commit of an import: well under etcd's default limit of 128 per transaction.
pub const IMPORT_BATCH: usize = 100;

fn aad(owner: &SecretOwner) -> String {
    format!("vnp-export/{}", owner.key())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// The whole model, secrets sealed with `ring`.
pub fn export(model: &Model, ring: &KeyRing) -> Result<Export, ApiError> {
    let mut owners: Vec<&SecretOwner> = model.secrets.keys().collect();
    owners.sort();
    let mut secrets = Vec::with_capacity(owners.len());
    for owner in owners {
        let entry = &model.secrets[owner];
        let mut plain = [0u8; 40];
        plain[..32].copy_from_slice(entry.secret.as_bytes());
        plain[32..].copy_from_slice(&entry.generation.to_be_bytes());
        let sealed = ring.seal(aad(owner).as_bytes(), &plain);
        plain.zeroize();
        let sealed = sealed.map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
        secrets.push(SealedSecret {
            owner: owner.key(),
            sealed: hex(&sealed),
        });
    }
    Ok(Export {
        format: EXPORT_FORMAT.into(),
        networks: model.networks.values().cloned().collect(),
        hosts: model.hosts.values().cloned().collect(),
        gateways: model.gateways.values().cloned().collect(),
        vms: model.vms.values().cloned().collect(),
        rules: model.rules.values().cloned().collect(),
        forwards: model.forwards.values().cloned().collect(),
        services: model.services.values().cloned().collect(),
        secrets,
        changes: model.changes.iter().cloned().collect(),
        metadata: meta_records(model)?,
    })
}

/// Every metadata record, as stored.
fn meta_records(model: &Model) -> Result<Vec<serde_json::Value>, ApiError> {
    let m = &model.meta;
    let records = m
        .vms
        .values()
        .map(|r| MetaRecord::Vm(r.clone()))
        .chain(m.projects.values().map(|r| MetaRecord::Project(r.clone())))
        .chain(
            m.signing_keys
                .values()
                .map(|r| MetaRecord::SigningKey(r.clone())),
        );
    records
        .map(|r| {
            serde_json::to_value(r).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))
        })
        .collect()
}

/// The metadata records of an export, each checked against what else it holds.
fn parse_meta(e: &Export) -> Result<Vec<MetaRecord>, ApiError> {
    let mut out = Vec::with_capacity(e.metadata.len());
    for value in &e.metadata {
        let record: MetaRecord = serde_json::from_value(value.clone())
            .map_err(|err| bad(format!("metadata record: {err}")))?;
        let resolves = match &record {
            MetaRecord::Vm(r) => e.vms.iter().any(|v| v.id == r.vm),
            MetaRecord::Project(r) => e.networks.iter().any(|n| n.id == r.network),
            MetaRecord::SigningKey(r) => {
                let owner = SecretOwner::SigningKey(r.kid.clone()).key();
                e.secrets.iter().any(|s| s.owner == owner)
            }
        };
        if !resolves {
            return Err(bad(format!(
                "metadata record {} names a VM or network not in the export, or lacks its private key",
                record.key().key()
            )));
        }
        out.push(record);
    }
    Ok(out)
}

/// Ops that drop the signing keys of `model` when the export brings its own: an imported
/// registry signs and publishes what the exported one did (the key the empty target made at
/// its first start has signed nothing, as it had no VMs).
pub fn replace_signing_keys_ops(model: &Model, export: &Export) -> Vec<Op> {
    let brings_keys = export
        .metadata
        .iter()
        .any(|v| v["kind"].as_str() == Some("signing_key"));
    if !brings_keys {
        return vec![];
    }
    model
        .meta
        .signing_keys
        .keys()
        .flat_map(|kid| {
            [
                Op::DeleteMeta(MetaKey::SigningKey(kid.clone())),
                Op::DeleteSecret(SecretOwner::SigningKey(kid.clone())),
            ]
        })
        .collect()
}

fn bad(message: String) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, message)
}

fn open_secret(s: &SealedSecret, ring: &KeyRing) -> Result<Op, ApiError> {
    let owner = SecretOwner::from_key(&s.owner).ok_or_else(|| {
        bad(format!(
            "secret owner {:?}: expected vm/ID or gw/ID",
            s.owner
        ))
    })?;
    let sealed = unhex(&s.sealed).ok_or_else(|| bad(format!("secret of {}: not hex", s.owner)))?;
    let plain = ring
        .open(aad(&owner).as_bytes(), &sealed)
        .map_err(|e| bad(format!("secret of {}: {e}", s.owner)))?;
    let bytes: &[u8; 40] = plain[..]
        .try_into()
        .map_err(|_| bad(format!("secret of {}: wrong length", s.owner)))?;
    let mut raw = [0u8; 32];
    raw.copy_from_slice(&bytes[..32]);
    let mut generation = [0u8; 8];
    generation.copy_from_slice(&bytes[32..]);
    let entry = SecretEntry::new(VmSecret::from_bytes(raw), u64::from_be_bytes(generation));
    raw.zeroize();
    Ok(Op::PutSecret(owner, entry))
}

/// Checks that every record's references resolve and every VM and gateway has its secret.
fn check_references(e: &Export) -> Result<(), ApiError> {
    let has = |list: &[String], id: &str| list.iter().any(|x| x == id);
    let networks: Vec<String> = e.networks.iter().map(|n| n.id.clone()).collect();
    let hosts: Vec<String> = e.hosts.iter().map(|h| h.id.clone()).collect();
    let owners: Vec<String> = e.secrets.iter().map(|s| s.owner.clone()).collect();
    for vm in &e.vms {
        if !has(&networks, &vm.network) || vm.host.as_ref().is_some_and(|h| !has(&hosts, h)) {
            return Err(bad(format!(
                "VM {} names a network or host not in the export",
                vm.id
            )));
        }
        if !has(&owners, &format!("vm/{}", vm.id)) {
            return Err(bad(format!("VM {} has no secret in the export", vm.id)));
        }
    }
    for g in &e.gateways {
        if !has(&networks, &g.network) || !has(&owners, &format!("gw/{}", g.id)) {
            return Err(bad(format!("gateway {} lacks its network or secret", g.id)));
        }
    }
    if let Some(r) = e.rules.iter().find(|r| !has(&networks, &r.network)) {
        return Err(bad(format!(
            "rule {} names a network not in the export",
            r.id
        )));
    }
    let vms: Vec<String> = e.vms.iter().map(|v| v.id.clone()).collect();
    if let Some(f) = e
        .forwards
        .iter()
        .find(|f| !has(&networks, &f.network) || !has(&vms, &f.vm))
    {
        return Err(bad(format!(
            "forward {} names a network or VM not in the export",
            f.id
        )));
    }
    for s in &e.services {
        let dangling = s.members.iter().filter_map(|m| m.vm.as_ref());
        if !has(&networks, &s.network) || dangling.clone().any(|v| !has(&vms, v)) {
            return Err(bad(format!(
                "service {} names a network or VM not in the export",
                s.id
            )));
        }
    }
    Ok(())
}

/// The ops that recreate `export`, in commits of at most [`IMPORT_BATCH`].
pub fn import_batches(
    export: &Export,
    ring: &KeyRing,
) -> Result<(Vec<Vec<Op>>, ImportSummary), ApiError> {
    if export.format != EXPORT_FORMAT {
        return Err(bad(format!(
            "format {:?}: this registry reads {EXPORT_FORMAT}",
            export.format
        )));
    }
    check_references(export)?;
    let mut ops: Vec<Op> = Vec::new();
    ops.extend(export.networks.iter().cloned().map(Op::PutNetwork));
    ops.extend(export.hosts.iter().cloned().map(Op::PutHost));
    ops.extend(export.gateways.iter().cloned().map(Op::PutGateway));
    ops.extend(export.vms.iter().cloned().map(Op::PutVm));
    ops.extend(export.rules.iter().cloned().map(Op::PutRule));
    ops.extend(export.forwards.iter().cloned().map(Op::PutForward));
    ops.extend(export.services.iter().cloned().map(Op::PutService));
    for s in &export.secrets {
        ops.push(open_secret(s, ring)?);
    }
    ops.extend(export.changes.iter().cloned().map(Op::AppendChange));
    ops.extend(parse_meta(export)?.into_iter().map(Op::PutMeta));
    let summary = ImportSummary {
        networks: export.networks.len(),
        hosts: export.hosts.len(),
        gateways: export.gateways.len(),
        vms: export.vms.len(),
        rules: export.rules.len(),
        forwards: export.forwards.len(),
        services: export.services.len(),
        secrets: export.secrets.len(),
        changes: export.changes.len(),
        metadata: export.metadata.len(),
    };
    Ok((
        ops.chunks(IMPORT_BATCH).map(<[Op]>::to_vec).collect(),
        summary,
    ))
}

/// Refuses unless `model` holds nothing an import could collide with.
pub fn check_empty(model: &Model) -> Result<(), ApiError> {
    if model.networks.is_empty() && model.hosts.is_empty() && model.vms.is_empty() {
        return Ok(());
    }
    refuse(
        ErrorCode::NotEmpty,
        "import only into an empty registry (no networks, hosts or VMs)",
    )
}
