//! The service bridge's [`MetadataSource`] on the registry: the host's client (mutual TLS, host
//! certificate) calling the metadata endpoints for the VMs it runs, with the registry's types
//! turned into the bridge's.

use std::collections::BTreeMap;
use std::time::Duration;

use vnp_registry_client::metadata as reg;
use vnp_registry_client::{ClientError, RegistryClient};

use crate::bridge::source::{
    AccessToken, IdentityToken, InstanceMetadata, MetadataSource, ProjectMetadata, ServiceAccount,
    SourceError, VmMetadata,
};

/// The registry, as the bridge's source of metadata and credentials.
#[derive(Clone)]
pub struct RegistrySource(pub RegistryClient);

impl std::fmt::Debug for RegistrySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RegistrySource")
    }
}

/// A registry refusal (4xx) is the guest's request's fault; everything else means "try later".
fn source_error(e: ClientError) -> SourceError {
    match e.status() {
        Some(status) if (400..500).contains(&status) => SourceError::Refused {
            status,
            message: e.to_string(),
        },
        _ => SourceError::Unavailable(e.to_string()),
    }
}

/// Guest attributes keyed `"<namespace>/<key>"` as namespace -> key -> value.
fn nest(flat: &BTreeMap<String, String>) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (k, v) in flat {
        if let Some((ns, key)) = k.split_once('/') {
            out.entry(ns.to_string())
                .or_default()
                .insert(key.to_string(), v.clone());
        }
    }
    out
}

/// The registry's metadata document as the bridge's.
pub fn from_registry(md: reg::VmMetadata) -> VmMetadata {
    let i = md.instance;
    VmMetadata {
        etag: md.etag,
        guest_attributes: nest(&md.guest_attributes),
        instance: InstanceMetadata {
            id: i.id,
            name: i.name,
            hostname: i.hostname,
            zone: i.zone,
            ip: i.ip.to_string(),
            mac: i.mac.to_string(),
            network: i.network,
            gateway: i.gateway.to_string(),
            mtu: u32::from(i.mtu),
            attributes: i.attributes,
            service_account: ServiceAccount {
                email: i.service_account.email,
                scopes: i.service_account.scopes,
            },
        },
        project: ProjectMetadata {
            project_id: md.project.project_id,
            attributes: md.project.attributes,
            require_session_token: md.project.require_session_token,
        },
    }
}

impl MetadataSource for RegistrySource {
    fn vm_metadata(
        &self,
        vm_id: &str,
        wait: Option<(&str, Duration)>,
    ) -> Result<VmMetadata, SourceError> {
        self.0
            .vm_metadata(vm_id, wait)
            .map(from_registry)
            .map_err(source_error)
    }

    fn mint_access_token(&self, vm_id: &str) -> Result<AccessToken, SourceError> {
        let t = self.0.mint_access_token(vm_id).map_err(source_error)?;
        Ok(AccessToken {
            access_token: t.access_token,
            expires_in: t.expires_in,
            token_type: t.token_type,
        })
    }

    fn mint_identity_token(
        &self,
        vm_id: &str,
        audience: &str,
        full: bool,
    ) -> Result<IdentityToken, SourceError> {
        let t = self
            .0
            .mint_identity_token(vm_id, audience, full)
            .map_err(source_error)?;
        Ok(IdentityToken {
            token: t.token,
            expires_in: t.expires_in,
        })
    }

    fn put_guest_attribute(
        &self,
        vm_id: &str,
        namespace: &str,
        key: &str,
        value: &str,
    ) -> Result<(), SourceError> {
        self.0
            .put_guest_attribute(vm_id, namespace, key, value)
            .map_err(source_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_attributes_are_nested_by_namespace() {
        let mut flat = BTreeMap::new();
        flat.insert("hostkeys/ssh-ed25519".to_string(), "AAAA".to_string());
        flat.insert("hostkeys/ssh-rsa".to_string(), "BBBB".to_string());
        flat.insert("other/k".to_string(), "v".to_string());
        let n = nest(&flat);
        assert_eq!(n["hostkeys"].len(), 2);
        assert_eq!(n["other"]["k"], "v");
    }
}
