//! Mutual TLS: the server configuration and reading the caller's identity from its certificate.
//!
//! Client certificates must chain to the registry's CA (`WebPkiClientVerifier`), so unknown
//! and expired certificates fail the handshake. A client may also present none: such a
//! connection has no identity, and every endpoint but the public `GET /v1/jwks` answers it
//! `401 not_authenticated` (services that verify the registry's tokens need its keys without
//! holding a registry certificate). The role and
//! id come from a URI subject alternative name `vnp:<role>:<id>` (see
//! [`Identity`](vnp_registry_client::api::Identity)).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::path::Path;
use std::sync::Arc;
use vnp_registry_client::api::Identity;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{path}: {detail}")]
    File { path: String, detail: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_err(path: &Path, detail: impl std::fmt::Display) -> TlsSetupError {
    TlsSetupError::File {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect();
    let certs = certs.map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate in file"));
    }
    Ok(certs)
}

/// Builds the rustls server configuration: our chain and key, and client certificates
/// verified against `ca` (optional: see the module documentation).
pub fn server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| file_err(ca, e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsSetupError::Config(e.to_string()))?;
    let chain = load_certs(cert)?;
    // Do not echo parse details for the key file: they could quote key material.
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|_| file_err(key, "no usable private key"))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsSetupError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The `vnp:<role>:<id>` identity in a (verified) client certificate.
pub fn identity_from_cert(der: &[u8]) -> Result<Identity, String> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("unparsable client certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("client certificate has no subjectAltName with a vnp: URI")?;
    let mut found = None;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name {
            if uri.starts_with("vnp:") {
                if found.is_some() {
                    return Err("client certificate carries more than one vnp: identity".into());
                }
                found = Some(
                    Identity::from_uri(uri)
                        .ok_or_else(|| format!("malformed identity URI {uri:?}"))?,
                );
            }
        }
    }
    found.ok_or_else(|| "client certificate has no vnp:<role>:<id> URI".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vnp_registry_client::api::Role;
    use vnp_registry_client::pki::{DevCa, Duration, OffsetDateTime};

    fn der(dir: &Path, stem: &str) -> Vec<u8> {
        load_certs(&dir.join(format!("{stem}.pem")))
            .unwrap()
            .remove(0)
            .as_ref()
            .to_vec()
    }

    #[test]
    fn identity_comes_from_the_vnp_uri() {
        let dir = std::env::temp_dir().join(format!("vnp-tls-unit-{}", std::process::id()));
        struct Cleanup(std::path::PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _cleanup = Cleanup(dir.clone());
        let ca = DevCa::init(&dir, &[], 1, false).unwrap();
        let now = OffsetDateTime::now_utc();
        let (from, to) = (now - Duration::hours(1), now + Duration::days(1));
        ca.issue_custom("h", Some("vnp:host:h7"), from, to).unwrap();
        ca.issue_custom("none", None, from, to).unwrap();
        ca.issue_custom("role", Some("vnp:root:h7"), from, to)
            .unwrap();
        ca.issue_custom("other", Some("spiffe://example/host/h7"), from, to)
            .unwrap();

        assert_eq!(
            identity_from_cert(&der(&dir, "h")).unwrap(),
            Identity {
                role: Role::Host,
                id: "h7".into()
            }
        );
        assert_eq!(
            identity_from_cert(&der(&dir, "admin")).unwrap().role,
            Role::Admin
        );
        assert!(identity_from_cert(&der(&dir, "none"))
            .unwrap_err()
            .contains("subjectAltName"));
        assert!(identity_from_cert(&der(&dir, "role"))
            .unwrap_err()
            .contains("malformed"));
        assert!(identity_from_cert(&der(&dir, "other"))
            .unwrap_err()
            .contains("no vnp:"));
        assert!(identity_from_cert(b"not a certificate").is_err());
        // The server certificate has no identity at all.
        assert!(identity_from_cert(&der(&dir, "server")).is_err());
        // And the whole server configuration loads from the same directory.
        server_config(
            &dir.join("ca.pem"),
            &dir.join("server.pem"),
            &dir.join("server.key"),
        )
        .unwrap();
        assert!(server_config(
            &dir.join("ca.pem"),
            &dir.join("server.pem"),
            &dir.join("nope.key")
        )
        .is_err());
    }
}
