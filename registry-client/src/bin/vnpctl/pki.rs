//! `vnpctl ca init` and `vnpctl cert ...`: the development PKI (`vnp_registry_client::pki`).

use std::path::PathBuf;
use vnp_registry_client::api::{Identity, Role};
use vnp_registry_client::pki::{stem_for, DevCa};

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
    /// Certificate for a host (vnpd): identity vnp:host:ID, files host-ID.pem/.key.
    Host(LeafArgs),
    /// Certificate for a gateway: identity vnp:gateway:ID, files gateway-ID.pem/.key.
    Gateway(LeafArgs),
    /// Certificate for another operator: identity vnp:admin:ID, files admin-ID.pem/.key.
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

/// Runs `vnpctl ca ...`.
pub fn run_ca(cmd: &CaCmd) -> Result<String, String> {
    let CaCmd::Init {
        dir,
        san,
        days,
        force,
    } = cmd;
    DevCa::init(dir, san, *days, *force).map_err(|e| e.to_string())?;
    Ok(format!(
        "wrote {d}/ca.pem, ca.key, server.pem, server.key, admin.pem, admin.key\n\
         run: vnp-registry --tls-dir {d} --data DATA_DIR\n",
        d = dir.display()
    ))
}

/// Runs `vnpctl cert ...`.
pub fn run_cert(cmd: &CertCmd) -> Result<String, String> {
    let (role, args) = match cmd {
        CertCmd::Host(a) => (Role::Host, a),
        CertCmd::Gateway(a) => (Role::Gateway, a),
        CertCmd::Admin(a) => (Role::Admin, a),
    };
    let identity = Identity {
        role,
        id: args.id.clone(),
    };
    let stem = stem_for(&identity);
    let ca = DevCa::open(&args.dir).map_err(|e| e.to_string())?;
    let pem = ca
        .issue(&identity, &stem, args.days)
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "wrote {} and {stem}.key for {}\n",
        pem.display(),
        identity.to_uri()
    ))
}
