//! Registry state for metadata and credentials (issue #11): per-VM attributes (operator-set
//! and guest-written), per-network projects, and the ES256 signing keys.
//!
//! Every record is stored as one JSON value under a [`MetaKey`] (`vm/<id>`, `project/<id>`,
//! `signing-key/<kid>`), so each store adds one table or key prefix for all of them. The
//! private half of a signing key is not in its record: it is a secret
//! ([`SecretOwner::SigningKey`](crate::model::SecretOwner)) stored, sealed and exported exactly
//! like VM secrets.

use crate::model::{SecretEntry, SecretOwner};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use vnp_registry_client::jwt::JwtSigner;
use vnp_registry_client::metadata::{Attributes, Jwk, SigningKeyInfo};

/// A VM's metadata beyond its record: absent until something is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMetadataRecord {
    pub vm: String,
    /// Operator-set (`vnpctl vm set-attr`).
    #[serde(default)]
    pub attributes: Attributes,
    /// Written by the guest through its host, keyed `"<namespace>/<key>"`.
    #[serde(default)]
    pub guest_attributes: Attributes,
    /// The service account's scopes; `None`: the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
}

impl VmMetadataRecord {
    /// Whether the record says nothing (then it is deleted rather than stored).
    pub fn is_empty(&self) -> bool {
        self.attributes.is_empty() && self.guest_attributes.is_empty() && self.scopes.is_none()
    }
}

/// A network's project: each network is one project (see `docs/registry.md`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectRecord {
    pub network: String,
    /// `None`: the network's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    /// `None`: [`DEFAULT_ZONE`](vnp_registry_client::metadata::DEFAULT_ZONE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default)]
    pub attributes: Attributes,
    /// The network's metadata servers require a session token (`docs/metadata.md`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_session_token: bool,
}

/// The public half and the life of a signing key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningKeyRecord {
    pub kid: String,
    pub jwk: Jwk,
    /// Unix seconds.
    pub created_at: u64,
    /// When it stopped signing; `None` while it signs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<u64>,
    /// Published in the JWKS until then (its last tokens have expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_until: Option<u64>,
}

impl SigningKeyRecord {
    /// Whether verifiers still need it at `now`.
    pub fn published(&self, now: u64) -> bool {
        self.published_until.is_none_or(|until| now < until)
    }

    /// As the admin API shows it.
    pub fn info(&self) -> SigningKeyInfo {
        SigningKeyInfo {
            kid: self.kid.clone(),
            created_at: self.created_at,
            active: self.retired_at.is_none(),
            retired_at: self.retired_at,
            published_until: self.published_until,
        }
    }
}

/// One stored metadata record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetaRecord {
    Vm(VmMetadataRecord),
    Project(ProjectRecord),
    SigningKey(SigningKeyRecord),
}

impl MetaRecord {
    /// Where it is stored.
    pub fn key(&self) -> MetaKey {
        match self {
            MetaRecord::Vm(r) => MetaKey::Vm(r.vm.clone()),
            MetaRecord::Project(r) => MetaKey::Project(r.network.clone()),
            MetaRecord::SigningKey(r) => MetaKey::SigningKey(r.kid.clone()),
        }
    }
}

/// Which metadata record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MetaKey {
    Vm(String),
    Project(String),
    SigningKey(String),
}

impl MetaKey {
    /// The store key: `vm/<id>`, `project/<network>` or `signing-key/<kid>`.
    pub fn key(&self) -> String {
        match self {
            MetaKey::Vm(id) => format!("vm/{id}"),
            MetaKey::Project(id) => format!("project/{id}"),
            MetaKey::SigningKey(id) => format!("signing-key/{id}"),
        }
    }

    /// Inverse of [`MetaKey::key`].
    pub fn from_key(key: &str) -> Option<MetaKey> {
        let (kind, id) = key.split_once('/')?;
        let id = id.to_string();
        match kind {
            "vm" => Some(MetaKey::Vm(id)),
            "project" => Some(MetaKey::Project(id)),
            "signing-key" => Some(MetaKey::SigningKey(id)),
            _ => None,
        }
    }
}

/// The metadata part of the model.
#[derive(Debug, Clone, Default)]
pub struct MetaState {
    pub vms: BTreeMap<String, VmMetadataRecord>,
    pub projects: BTreeMap<String, ProjectRecord>,
    pub signing_keys: BTreeMap<String, SigningKeyRecord>,
    /// Ready signers by kid, built from the signing-key secrets.
    pub signers: HashMap<String, Arc<JwtSigner>>,
}

impl MetaState {
    /// Applies a committed put.
    pub fn put(&mut self, record: &MetaRecord) {
        match record {
            MetaRecord::Vm(r) => drop(self.vms.insert(r.vm.clone(), r.clone())),
            MetaRecord::Project(r) => drop(self.projects.insert(r.network.clone(), r.clone())),
            MetaRecord::SigningKey(r) => drop(self.signing_keys.insert(r.kid.clone(), r.clone())),
        }
    }

    /// Applies a committed delete.
    pub fn delete(&mut self, key: &MetaKey) {
        match key {
            MetaKey::Vm(id) => drop(self.vms.remove(id)),
            MetaKey::Project(id) => drop(self.projects.remove(id)),
            MetaKey::SigningKey(id) => drop(self.signing_keys.remove(id)),
        }
    }

    /// Keeps [`MetaState::signers`] in step with the signing-key secrets.
    pub fn secret_changed(&mut self, owner: &SecretOwner, entry: Option<&SecretEntry>) {
        let SecretOwner::SigningKey(kid) = owner else {
            return;
        };
        match entry.and_then(|e| JwtSigner::from_scalar(kid, e.secret.as_bytes())) {
            Some(signer) => drop(self.signers.insert(kid.clone(), Arc::new(signer))),
            None => {
                if entry.is_some() {
                    log::error!("signing key {kid}: stored private key is not a P-256 scalar");
                }
                self.signers.remove(kid);
            }
        }
    }

    /// The key new tokens are signed with: the newest one that is not retired and whose
    /// private half is loaded.
    pub fn active_signer(&self) -> Option<&Arc<JwtSigner>> {
        self.signing_keys
            .values()
            .filter(|k| k.retired_at.is_none())
            .max_by_key(|k| (k.created_at, k.kid.clone()))
            .and_then(|k| self.signers.get(&k.kid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for k in [
            MetaKey::Vm("a".into()),
            MetaKey::Project("n1".into()),
            MetaKey::SigningKey("k-1-ab".into()),
        ] {
            assert_eq!(MetaKey::from_key(&k.key()), Some(k));
        }
        assert_eq!(MetaKey::from_key("vms/a"), None);
        assert_eq!(MetaKey::from_key("vm"), None);
    }

    #[test]
    fn records_are_tagged_json() {
        let r = MetaRecord::Project(ProjectRecord {
            network: "n1".into(),
            ..ProjectRecord::default()
        });
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.starts_with(r#"{"kind":"project""#), "{text}");
        assert_eq!(serde_json::from_str::<MetaRecord>(&text).unwrap(), r);
    }
}
