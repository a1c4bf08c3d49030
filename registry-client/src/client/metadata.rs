//! The metadata and credential endpoints (issue #11): what a host's service bridge asks for
//! the VMs it runs, and what operators set and read.

use super::failover::Repeat;
use super::{path_seg, RegistryClient};
use crate::error::ClientError;
use crate::metadata::*;
use std::time::Duration;

impl RegistryClient {
    /// `GET /v1/vms/{id}/metadata` (the host that runs the VM, or an admin). With
    /// `wait = Some((etag, timeout))` it long-polls: returns as soon as the document's etag
    /// differs from `etag`, or after `timeout` (at most 300 s) with the unchanged document.
    pub fn vm_metadata(
        &self,
        id: &str,
        wait: Option<(&str, Duration)>,
    ) -> Result<VmMetadata, ClientError> {
        let mut path = format!("/v1/vms/{}/metadata", path_seg(id));
        let mut recv = None;
        if let Some((etag, timeout)) = wait {
            path.push_str(&format!(
                "?wait_etag={}&timeout_sec={}",
                path_seg(etag),
                timeout.as_secs()
            ));
            recv = Some(timeout + self.timeout);
        }
        Self::finish(self.exchange("GET", &path, None, Repeat::Safe, recv))
    }

    /// `POST /v1/vms/{id}/access-token`: a fresh access token for the VM's service account
    /// (the host that runs the VM, or an admin).
    pub fn mint_access_token(&self, id: &str) -> Result<AccessToken, ClientError> {
        self.post_safe(
            &format!("/v1/vms/{}/access-token", path_seg(id)),
            &serde_json::json!({}),
        )
    }

    /// `POST /v1/vms/{id}/identity-token`: an identity token for `audience`, with GCE's
    /// `google.compute_engine` claims if `full` (the host that runs the VM, or an admin).
    pub fn mint_identity_token(
        &self,
        id: &str,
        audience: &str,
        full: bool,
    ) -> Result<IdentityToken, ClientError> {
        let format = if full {
            IdentityFormat::Full
        } else {
            IdentityFormat::Standard
        };
        self.post_safe(
            &format!("/v1/vms/{}/identity-token", path_seg(id)),
            &IdentityTokenRequest {
                audience: audience.to_string(),
                format,
            },
        )
    }

    /// `PUT /v1/vms/{id}/guest-attributes/{namespace}/{key}` (the host that runs the VM, on
    /// the guest's behalf): the body is the value.
    pub fn put_guest_attribute(
        &self,
        id: &str,
        namespace: &str,
        key: &str,
        value: &str,
    ) -> Result<(), ClientError> {
        let path = format!(
            "/v1/vms/{}/guest-attributes/{}/{}",
            path_seg(id),
            path_seg(namespace),
            path_seg(key)
        );
        let _: serde_json::Value =
            Self::finish(self.exchange("PUT", &path, Some(value.as_bytes()), Repeat::Safe, None))?;
        Ok(())
    }

    /// `GET /v1/jwks`: the registry's public signing keys (any TLS client).
    pub fn jwks(&self) -> Result<Jwks, ClientError> {
        self.get("/v1/jwks")
    }

    /// `GET /v1/signing-keys` (admin): every signing key the registry holds, without the
    /// private parts.
    pub fn list_signing_keys(&self) -> Result<Vec<SigningKeyInfo>, ClientError> {
        self.get("/v1/signing-keys")
    }

    /// `POST /v1/signing-keys/rotate` (admin): a new key signs from now on; the old one stays
    /// published until its tokens have expired. Returns the keys after the rotation.
    pub fn rotate_signing_key(&self) -> Result<Vec<SigningKeyInfo>, ClientError> {
        self.post("/v1/signing-keys/rotate", &serde_json::json!({}))
    }

    /// `PUT /v1/vms/{id}/attributes/{key}` (admin): sets an operator attribute.
    pub fn set_vm_attribute(
        &self,
        id: &str,
        key: &str,
        value: &str,
    ) -> Result<Attributes, ClientError> {
        let path = format!("/v1/vms/{}/attributes/{}", path_seg(id), path_seg(key));
        let r: AttributesResponse =
            Self::finish(self.exchange("PUT", &path, Some(value.as_bytes()), Repeat::Safe, None))?;
        Ok(r.attributes)
    }

    /// `DELETE /v1/vms/{id}/attributes/{key}` (admin); removing a missing key is no error.
    pub fn unset_vm_attribute(&self, id: &str, key: &str) -> Result<Attributes, ClientError> {
        let path = format!("/v1/vms/{}/attributes/{}", path_seg(id), path_seg(key));
        let r: AttributesResponse =
            Self::finish(self.exchange("DELETE", &path, None, Repeat::Safe, None))?;
        Ok(r.attributes)
    }

    /// `PUT /v1/vms/{id}/scopes` (admin): the scopes of the VM's service account (empty: the
    /// default).
    pub fn set_vm_scopes(&self, id: &str, scopes: &[String]) -> Result<Vec<String>, ClientError> {
        let body = serde_json::to_vec(&ScopesUpdate {
            scopes: scopes.to_vec(),
        })
        .map_err(|e| ClientError::Config(e.to_string()))?;
        let path = format!("/v1/vms/{}/scopes", path_seg(id));
        let r: ScopesUpdate =
            Self::finish(self.exchange("PUT", &path, Some(&body), Repeat::Safe, None))?;
        Ok(r.scopes)
    }

    /// `GET /v1/networks/{id}/project` (admin).
    pub fn get_project(&self, network: &str) -> Result<Project, ClientError> {
        self.get(&format!("/v1/networks/{}/project", path_seg(network)))
    }

    /// `PUT /v1/networks/{id}/project` (admin): project id and zone.
    pub fn update_project(
        &self,
        network: &str,
        update: &ProjectUpdate,
    ) -> Result<Project, ClientError> {
        self.put(
            &format!("/v1/networks/{}/project", path_seg(network)),
            update,
        )
    }

    /// `PUT /v1/networks/{id}/project/attributes/{key}` (admin).
    pub fn set_project_attribute(
        &self,
        network: &str,
        key: &str,
        value: &str,
    ) -> Result<Project, ClientError> {
        let path = format!(
            "/v1/networks/{}/project/attributes/{}",
            path_seg(network),
            path_seg(key)
        );
        Self::finish(self.exchange("PUT", &path, Some(value.as_bytes()), Repeat::Safe, None))
    }

    /// `DELETE /v1/networks/{id}/project/attributes/{key}` (admin).
    pub fn unset_project_attribute(
        &self,
        network: &str,
        key: &str,
    ) -> Result<Project, ClientError> {
        let path = format!(
            "/v1/networks/{}/project/attributes/{}",
            path_seg(network),
            path_seg(key)
        );
        Self::finish(self.exchange("DELETE", &path, None, Repeat::Safe, None))
    }
}
