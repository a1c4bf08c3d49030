//! `vnpctl ca init` and `vnpctl cert ...`: a development PKI so a demo needs no external CA.
//!
//! Layout of the TLS directory (what `vnp-registry --tls-dir` and `vnpctl --tls-dir` read):
//!
//! ```text
//! ca.pem ca.key                  the CA (key 0600; keep it off production hosts)
//! server.pem server.key          the registry's certificate (SAN 127.0.0.1, localhost, --san)
//! admin.pem admin.key            identity vnp:admin:admin
//! host-<id>.pem host-<id>.key    identity vnp:host:<id>
//! gateway-<id>.pem gateway-<id>.key   identity vnp:gateway:<id>
//! admin-<name>.pem admin-<name>.key   further admins
//! ```

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};
use vnp_registry_client::api::{validate_id, Identity, Role};

/// The CA's subject; fixed so the issuer can be rebuilt from the key alone.
const CA_CN: &str = "vnp development CA";

/// `vnpctl ca` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CaCmd {
    /// Create a CA, the registry's server certificate and an admin certificate in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Extra names or addresses for the server certificate (repeatable).
        #[arg(long)]
        san: Vec<String>,
        /// Validity of the issued certificates in days.
        #[arg(long, default_value_t = 365)]
        days: i64,
        /// Overwrite an existing CA.
        #[arg(long)]
        force: bool,
    },
}

/// `vnpctl cert` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CertCmd {
    /// Certificate for a host (vnpd): identity vnp:host:ID.
    Host(LeafArgs),
    /// Certificate for a gateway: identity vnp:gateway:ID.
    Gateway(LeafArgs),
    /// Certificate for another operator: identity vnp:admin:ID.
    Admin(LeafArgs),
}

/// Common arguments for a leaf certificate.
#[derive(Debug, clap::Args)]
pub struct LeafArgs {
    /// TLS directory made by `vnpctl ca init`.
    #[arg(long)]
    pub dir: PathBuf,
    /// The identity's id (`[a-z0-9-]`).
    #[arg(long, alias = "name")]
    pub id: String,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    pub days: i64,
}

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err(&path.display().to_string()))?;
    f.write_all(contents.as_bytes())
        .map_err(err(&path.display().to_string()))
}

fn ca_params() -> Result<CertificateParams, String> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err("CA params"))?;
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

/// The parameters of a leaf certificate valid from `not_before` for `days`.
pub fn leaf_params(
    cn: &str,
    sans: Vec<SanType>,
    server: bool,
    not_before: OffsetDateTime,
    days: i64,
) -> Result<CertificateParams, String> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err("params"))?;
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
    p.not_after = not_before + Duration::days(days);
    Ok(p)
}

fn identity_san(identity: &Identity) -> Result<SanType, String> {
    Ok(SanType::URI(
        identity.to_uri().try_into().map_err(err("identity URI"))?,
    ))
}

/// Loads the CA from DIR: its key and a rebuilt issuer certificate.
fn load_ca(dir: &Path) -> Result<(rcgen::Certificate, KeyPair), String> {
    let path = dir.join("ca.key");
    let pem = std::fs::read_to_string(&path).map_err(err(&path.display().to_string()))?;
    let key =
        KeyPair::from_pem(&pem).map_err(|_| format!("{}: not a usable key", path.display()))?;
    let cert = ca_params()?.self_signed(&key).map_err(err("CA"))?;
    Ok((cert, key))
}

/// Issues a certificate for `identity` signed by the CA in `dir`; writes `<stem>.pem/.key`.
pub fn issue(
    dir: &Path,
    stem: &str,
    identity: &Identity,
    not_before: OffsetDateTime,
    days: i64,
) -> Result<PathBuf, String> {
    let (ca, ca_key) = load_ca(dir)?;
    let key = KeyPair::generate().map_err(err("key generation"))?;
    let params = leaf_params(
        &identity.to_string(),
        vec![identity_san(identity)?],
        false,
        not_before,
        days,
    )?;
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .map_err(err("signing"))?;
    let pem = dir.join(format!("{stem}.pem"));
    write_file(&pem, &cert.pem(), false)?;
    write_file(&dir.join(format!("{stem}.key")), &key.serialize_pem(), true)?;
    Ok(pem)
}

fn ca_init(dir: &Path, extra_sans: &[String], days: i64, force: bool) -> Result<String, String> {
    if dir.join("ca.key").exists() && !force {
        return Err(format!(
            "{} already has a CA (ca.key); pass --force to replace it",
            dir.display()
        ));
    }
    std::fs::create_dir_all(dir).map_err(err(&dir.display().to_string()))?;
    let ca_key = KeyPair::generate().map_err(err("key generation"))?;
    let ca = ca_params()?.self_signed(&ca_key).map_err(err("CA"))?;
    write_file(&dir.join("ca.pem"), &ca.pem(), false)?;
    write_file(&dir.join("ca.key"), &ca_key.serialize_pem(), true)?;

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
    let now = OffsetDateTime::now_utc() - Duration::hours(1);
    let server_key = KeyPair::generate().map_err(err("key generation"))?;
    let server = leaf_params("vnp-registry", sans, true, now, days)?
        .signed_by(&server_key, &ca, &ca_key)
        .map_err(err("signing"))?;
    write_file(&dir.join("server.pem"), &server.pem(), false)?;
    write_file(&dir.join("server.key"), &server_key.serialize_pem(), true)?;
    let admin = Identity {
        role: Role::Admin,
        id: "admin".into(),
    };
    issue(dir, "admin", &admin, now, days)?;
    Ok(format!(
        "wrote {d}/ca.pem, ca.key, server.pem, server.key, admin.pem, admin.key\n\
         run: vnp-registry --tls-dir {d} --data DATA_DIR\n",
        d = dir.display()
    ))
}

/// Runs `vnpctl ca ...`.
pub fn run_ca(cmd: &CaCmd) -> Result<String, String> {
    match cmd {
        CaCmd::Init {
            dir,
            san,
            days,
            force,
        } => ca_init(dir, san, *days, *force),
    }
}

/// Runs `vnpctl cert ...`.
pub fn run_cert(cmd: &CertCmd) -> Result<String, String> {
    let (role, args, prefix) = match cmd {
        CertCmd::Host(a) => (Role::Host, a, "host"),
        CertCmd::Gateway(a) => (Role::Gateway, a, "gateway"),
        CertCmd::Admin(a) => (Role::Admin, a, "admin"),
    };
    validate_id(&args.id)?;
    if args.days <= 0 {
        return Err("--days must be positive".into());
    }
    let identity = Identity {
        role,
        id: args.id.clone(),
    };
    let stem = format!("{prefix}-{}", args.id);
    let now = OffsetDateTime::now_utc() - Duration::hours(1);
    let pem = issue(&args.dir, &stem, &identity, now, args.days)?;
    Ok(format!(
        "wrote {} and {stem}.key for {}\n",
        pem.display(),
        identity.to_uri()
    ))
}
