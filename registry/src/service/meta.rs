//! The registry's metadata and credential operations (issue #11): signing keys, the metadata
//! document, access and identity tokens, attributes.

use super::{unix_now, Registry};
use crate::credentials::{self, vm_for_caller};
use crate::error::ApiError;
use crate::plan::metadata::{self as plan_md, NewSigningKey};
use vnp_protocol::token::VmSecret;
use vnp_registry_client::api::{ErrorCode, Identity};
use vnp_registry_client::jwt::JwtSigner;
use vnp_registry_client::metadata::*;

/// Guest attribute writes per VM and second, sustained (per replica).
pub const GUEST_WRITES_PER_SEC: f64 = 5.0;
/// Guest attribute writes per VM at once.
pub const GUEST_WRITE_BURST: u32 = 20;

fn internal(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Internal, message)
}

/// A fresh P-256 key with a kid naming its creation time.
fn draw_signing_key(now: u64) -> Result<NewSigningKey, ApiError> {
    let mut tag = [0u8; 4];
    getrandom::fill(&mut tag).map_err(|e| internal(format!("OS random: {e}")))?;
    let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    let kid = format!("k{now}-{tag}");
    let (signer, scalar) = JwtSigner::generate(&kid).map_err(internal)?;
    Ok(NewSigningKey {
        jwk: signer.jwk(),
        kid,
        private: VmSecret::from_bytes(*scalar),
        now,
    })
}

impl Registry {
    /// Creates the first signing key unless one signs already (at start; concurrent
    /// replicas create one between them). True if this call created it. Blocking.
    pub fn ensure_signing_key(&self) -> Result<bool, ApiError> {
        let new = draw_signing_key(u64::from(unix_now()))?;
        self.write(|m| plan_md::ensure_signing_key(m, &new))
    }

    /// A new signing key signs from now on; the previous one stays published for the
    /// credential lifetime (plus the verifiers' leeway). Blocking.
    pub fn rotate_signing_key(&self) -> Result<Vec<SigningKeyInfo>, ApiError> {
        let new = draw_signing_key(u64::from(unix_now()))?;
        let publish_for = self.options.credentials.ttl_s + vnp_registry_client::jwt::LEEWAY_S;
        self.write(|m| plan_md::rotate_signing_key(m, &new, publish_for))
    }

    /// Every signing key, without private parts.
    pub fn signing_keys(&self) -> Vec<SigningKeyInfo> {
        self.read()
            .meta
            .signing_keys
            .values()
            .map(|k| k.info())
            .collect()
    }

    /// The public keys verifiers need now: the signing one and retired ones whose tokens may
    /// still be valid.
    pub fn jwks(&self) -> Jwks {
        let now = u64::from(unix_now());
        Jwks {
            keys: self
                .read()
                .meta
                .signing_keys
                .values()
                .filter(|k| k.published(now))
                .map(|k| k.jwk.clone())
                .collect(),
        }
    }

    /// The metadata document of `vm` for `caller` (its host, or an admin).
    pub fn vm_metadata(&self, caller: &Identity, vm: &str) -> Result<VmMetadata, ApiError> {
        let m = self.read();
        credentials::vm_metadata(&m, vm_for_caller(&m, caller, vm)?)
    }

    /// Signs `claims` with the active key.
    fn sign(&self, claims: &serde_json::Value) -> Result<String, ApiError> {
        let signer = self.read().meta.active_signer().cloned().ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unavailable,
                "the registry has no signing key yet; try again",
            )
        })?;
        Ok(signer.sign(claims))
    }

    /// An access token for `vm`'s service account, for its host or an admin.
    pub fn mint_access_token(&self, caller: &Identity, vm: &str) -> Result<AccessToken, ApiError> {
        self.check_current()?;
        let now = u64::from(unix_now());
        let policy = &self.options.credentials;
        let md = self.vm_metadata(caller, vm)?;
        let token = self.sign(&credentials::access_claims(&md, policy, now))?;
        self.metrics.credential_minted();
        Ok(AccessToken {
            access_token: token,
            expires_in: policy.ttl_s,
            token_type: "Bearer".into(),
        })
    }

    /// An identity token of `vm` for an audience, for its host or an admin.
    pub fn mint_identity_token(
        &self,
        caller: &Identity,
        vm: &str,
        req: &IdentityTokenRequest,
    ) -> Result<IdentityToken, ApiError> {
        self.check_current()?;
        let now = u64::from(unix_now());
        let policy = &self.options.credentials;
        let md = self.vm_metadata(caller, vm)?;
        let token = self.sign(&credentials::identity_claims(&md, req, policy, now)?)?;
        self.metrics.credential_minted();
        Ok(IdentityToken {
            token,
            expires_in: policy.ttl_s,
        })
    }

    /// A guest attribute written through `host`, within the per-VM rate. Blocking.
    pub fn put_guest_attribute(
        &self,
        host: &str,
        vm: &str,
        namespace: &str,
        key: &str,
        value: &str,
    ) -> Result<(), ApiError> {
        // Who may write is checked before the rate is charged, so that another host cannot
        // spend a VM's budget.
        plan_md::put_guest_attribute(&self.read(), host, vm, namespace, key, value)?;
        if !self.guest_writes.allow(vm) {
            return Err(ApiError::new(
                ErrorCode::RateLimited,
                format!(
                    "VM {vm} writes guest attributes faster than {GUEST_WRITES_PER_SEC}/s (burst {GUEST_WRITE_BURST})"
                ),
            ));
        }
        self.write(|m| plan_md::put_guest_attribute(m, host, vm, namespace, key, value))
    }
}
