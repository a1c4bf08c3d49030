//! A development PKI so a demo needs no external CA (`vnpctl ca init`, `vnpctl cert ...`).
//!
//! Layout of the TLS directory (what `vnp-registry --tls-dir` and `vnpctl --tls-dir` read):
//!
//! ```text
//! ca.pem ca.key                       the CA (key 0600; keep it off production hosts)
//! server.pem server.key               the registry (SAN 127.0.0.1, localhost, extra names)
//! admin.pem admin.key                 identity vnp:admin:admin
//! host-<id>.pem host-<id>.key         identity vnp:host:<id>
//! gateway-<id>.pem gateway-<id>.key   identity vnp:gateway:<id>
//! admin-<id>.pem admin-<id>.key       further operators
//! ```
//!
//! Identities are URI subject alternative names `vnp:<role>:<id>` (see [`Identity`]).

use crate::api::{validate_id, Identity, Role};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
pub use time::{Duration, OffsetDateTime};

/// The CA's subject; fixed so the issuer can be rebuilt from its key alone.
const CA_CN: &str = "vnp development CA";

/// Why a PKI operation failed. Never contains key material.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PkiError(String);

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> PkiError + '_ {
    move |e| PkiError(format!("{what}: {e}"))
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path.display().to_string();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err(&name))?;
    f.write_all(contents.as_bytes()).map_err(err(&name))
}

fn ca_params() -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err("CA"))?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, CA_CN);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = OffsetDateTime::now_utc() - Duration::days(1);
    p.not_after = OffsetDateTime::now_utc() + Duration::days(3650);
    Ok(p)
}

fn leaf_params(
    cn: &str,
    sans: Vec<SanType>,
    server: bool,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err("certificate"))?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.subject_alt_names = sans;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    p.not_before = not_before;
    p.not_after = not_after;
    Ok(p)
}

/// A development CA living in a directory.
pub struct DevCa {
    dir: PathBuf,
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl DevCa {
    /// Creates a CA, the registry's server certificate (SAN 127.0.0.1, localhost and
    /// `extra_sans`, each an IP address or DNS name) and `admin.pem` in `dir`.
    pub fn init(
        dir: &Path,
        extra_sans: &[String],
        days: i64,
        force: bool,
    ) -> Result<DevCa, PkiError> {
        if days <= 0 {
            return Err(PkiError("validity must be at least one day".into()));
        }
        if dir.join("ca.key").exists() && !force {
            return Err(PkiError(format!(
                "{} already has a CA (ca.key); pass --force to replace it",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(err(&dir.display().to_string()))?;
        let key = KeyPair::generate().map_err(err("key generation"))?;
        let cert = ca_params()?.self_signed(&key).map_err(err("CA"))?;
        write_file(&dir.join("ca.pem"), &cert.pem(), false)?;
        write_file(&dir.join("ca.key"), &key.serialize_pem(), true)?;
        let ca = DevCa {
            dir: dir.to_path_buf(),
            cert,
            key,
        };

        let mut sans = vec![
            SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
            SanType::DnsName("localhost".try_into().map_err(err("san"))?),
        ];
        for s in extra_sans {
            sans.push(match s.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(s.as_str().try_into().map_err(err("--san"))?),
            });
        }
        let (from, to) = validity(days);
        ca.sign("server", leaf_params("vnp-registry", sans, true, from, to)?)?;
        ca.issue(
            &Identity {
                role: Role::Admin,
                id: "admin".into(),
            },
            "admin",
            days,
        )?;
        Ok(ca)
    }

    /// Opens the CA in `dir` (reads `ca.key`).
    pub fn open(dir: &Path) -> Result<DevCa, PkiError> {
        let path = dir.join("ca.key");
        let pem = std::fs::read_to_string(&path).map_err(err(&path.display().to_string()))?;
        let key = KeyPair::from_pem(&pem)
            .map_err(|_| PkiError(format!("{}: not a usable key", path.display())))?;
        let cert = ca_params()?.self_signed(&key).map_err(err("CA"))?;
        Ok(DevCa {
            dir: dir.to_path_buf(),
            cert,
            key,
        })
    }

    /// The directory the CA writes into.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn sign(&self, stem: &str, params: CertificateParams) -> Result<PathBuf, PkiError> {
        let key = KeyPair::generate().map_err(err("key generation"))?;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(err("signing"))?;
        let pem = self.dir.join(format!("{stem}.pem"));
        write_file(&pem, &cert.pem(), false)?;
        write_file(
            &self.dir.join(format!("{stem}.key")),
            &key.serialize_pem(),
            true,
        )?;
        Ok(pem)
    }

    /// Issues a client certificate for `identity`, valid from an hour ago for `days`, as
    /// `<stem>.pem` / `<stem>.key`.
    pub fn issue(&self, identity: &Identity, stem: &str, days: i64) -> Result<PathBuf, PkiError> {
        validate_id(&identity.id).map_err(PkiError)?;
        if days <= 0 {
            return Err(PkiError("validity must be at least one day".into()));
        }
        let (from, to) = validity(days);
        self.issue_custom(stem, Some(&identity.to_uri()), from, to)
    }

    /// Issues a client certificate with an arbitrary (or no) URI SAN and validity window; for
    /// tests of what the registry refuses.
    pub fn issue_custom(
        &self,
        stem: &str,
        uri: Option<&str>,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<PathBuf, PkiError> {
        let sans = match uri {
            Some(u) => vec![SanType::URI(u.try_into().map_err(err("identity URI"))?)],
            None => vec![],
        };
        self.sign(
            stem,
            leaf_params(uri.unwrap_or(stem), sans, false, not_before, not_after)?,
        )
    }
}

fn validity(days: i64) -> (OffsetDateTime, OffsetDateTime) {
    // An hour of slack for clocks that are slightly behind.
    let from = OffsetDateTime::now_utc() - Duration::hours(1);
    (from, from + Duration::hours(1) + Duration::days(days))
}

/// File stem `vnpctl cert` uses for an identity: `host-h1`, `gateway-gw1`, `admin-ops`.
pub fn stem_for(identity: &Identity) -> String {
    format!("{}-{}", identity.role, identity.id)
}
