//! Who is calling: the identity from the client certificate, checked against the registry.

use super::*;

/// What the TLS layer learned about the caller, attached to every request of a connection.
#[derive(Debug, Clone)]
pub(super) struct PeerIdentity(pub(super) Result<Identity, String>);

/// Extractor: the caller as its certificate says, registered or not (only `whoami` uses it).
#[derive(Debug, Clone)]
pub struct CertifiedCaller(pub Identity);

impl<S: Send + Sync> FromRequestParts<S> for CertifiedCaller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        match parts.extensions.get::<PeerIdentity>() {
            Some(PeerIdentity(Ok(id))) => Ok(CertifiedCaller(id.clone())),
            Some(PeerIdentity(Err(why))) => refuse(ErrorCode::NotAuthenticated, why.clone()),
            None => refuse(ErrorCode::NotAuthenticated, "no client certificate"),
        }
    }
}

/// Extractor: the authenticated caller. A host or gateway certificate only counts while that
/// host or gateway is registered: deleting it from the registry locks its certificate out.
#[derive(Debug, Clone)]
pub struct Caller(pub Identity);

impl FromRequestParts<Shared> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, reg: &Shared) -> Result<Self, ApiError> {
        let CertifiedCaller(id) = CertifiedCaller::from_request_parts(parts, reg).await?;
        let registered = match id.role {
            Role::Admin => true,
            Role::Host => reg.read().hosts.contains_key(&id.id),
            Role::Gateway => reg.read().gateways.contains_key(&id.id),
        };
        if !registered {
            return refuse(
                ErrorCode::UnknownIdentity,
                format!(
                    "certificate identity {id} is not registered (vnpctl {} create {})",
                    id.role, id.id
                ),
            );
        }
        Ok(Caller(id))
    }
}

impl Caller {
    /// Whether the caller is the `role` `id` itself.
    pub(super) fn is(&self, role: Role, id: &str) -> bool {
        self.0.role == role && self.0.id == id
    }

    /// Refuses anyone but the `role` `id` itself and admins.
    pub(super) fn admin_or(&self, role: Role, id: &str) -> Result<(), ApiError> {
        if self.is(role, id) {
            Ok(())
        } else {
            self.admin()
        }
    }

    pub(super) fn admin(&self) -> Result<(), ApiError> {
        if self.0.role == Role::Admin {
            Ok(())
        } else {
            refuse(
                ErrorCode::AdminRequired,
                format!("{} may not do this; it needs an admin certificate", self.0),
            )
        }
    }
}

/// Extractor: the request's `Idempotency-Key`, if any (`[A-Za-z0-9-]{8,64}`), bound to the
/// caller, method and path, so that a retry of the write on another replica writes once.
#[derive(Debug, Clone)]
pub struct Once(pub Option<crate::service::RequestKey>);

impl Once {
    pub(super) fn key(&self) -> Option<&crate::service::RequestKey> {
        self.0.as_ref()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Once {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get("idempotency-key") else {
            return Ok(Once(None));
        };
        let id = value.to_str().unwrap_or_default().to_string();
        let valid = (8..=64).contains(&id.len())
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !valid {
            return refuse(
                ErrorCode::BadRequest,
                "Idempotency-Key must be 8-64 of [A-Za-z0-9-]",
            );
        }
        let CertifiedCaller(caller) = CertifiedCaller::from_request_parts(parts, state).await?;
        Ok(Once(Some(crate::service::RequestKey {
            id,
            request: format!("{caller} {} {}", parts.method, parts.uri.path()),
        })))
    }
}
