//! `vnpctl`: the vnp operator's command line.
//!
//! Talks to the registry over mutual TLS (`--registry`, `--tls-dir` or `--ca/--cert/--key`, or
//! the `VNP_*` environment variables), creates a development PKI (`ca`, `cert`), and drives a
//! local vnpd (`vnpd`). Tables by default; `--json` after a command group prints JSON.

mod forward;
mod gateway;
mod host;
mod lb;
mod metadata;
mod network;
mod output;
mod pki;
mod policy;
mod token;
mod vm;
mod vnpd;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use vnp_registry_client::{ClientConfig, Deleted, Export, RegistryClient};

#[derive(Debug, Parser)]
#[command(version, about = "vnp operator CLI")]
struct Cli {
    /// Registry URL, or several replicas' URLs separated by commas (fails over between them).
    #[arg(
        long,
        env = "VNP_REGISTRY",
        default_value = "https://127.0.0.1:7443",
        global = true
    )]
    registry: String,
    /// Directory from `vnpctl ca init`: uses ca.pem, admin.pem, admin.key unless overridden.
    #[arg(long, env = "VNP_TLS_DIR", global = true)]
    tls_dir: Option<PathBuf>,
    /// CA certificate of the registry.
    #[arg(long, env = "VNP_CA", global = true)]
    ca: Option<PathBuf>,
    /// Client certificate.
    #[arg(long, env = "VNP_CERT", global = true)]
    cert: Option<PathBuf>,
    /// Client key.
    #[arg(long, env = "VNP_KEY", global = true)]
    key: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// A registry command group with its own `--json`.
#[derive(Debug, clap::Args)]
struct Group<C: Subcommand> {
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: C,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Development certificate authority.
    #[command(subcommand)]
    Ca(pki::CaCmd),
    /// Issue host, gateway and admin certificates from the development CA.
    #[command(subcommand)]
    Cert(pki::CertCmd),
    /// Show the identity the registry reads from our certificate.
    Whoami {
        #[arg(long)]
        json: bool,
    },
    /// Virtual networks.
    Network(Group<network::NetworkCmd>),
    /// Hosts running vnpd.
    Host(Group<host::HostCmd>),
    /// Virtual machines.
    Vm(Group<vm::VmCmd>),
    /// Pair policy rules.
    Policy(Group<policy::PolicyCmd>),
    /// Gateways to the outside.
    Gateway(Group<gateway::GatewayCmd>),
    /// Port forwarding from a gateway's public address to a VM.
    Forward(Group<forward::ForwardCmd>),
    /// Load-balanced services on a gateway's public address.
    Lb(Group<lb::LbCmd>),
    /// Tokens (debugging).
    Token(Group<token::TokenCmd>),
    /// Wait for VM changes (one long-poll).
    Watch {
        #[command(flatten)]
        args: token::WatchArgs,
        #[arg(long)]
        json: bool,
    },
    /// The registry's counters (Prometheus text format).
    Metrics,
    /// Write the whole registry as JSON (secrets sealed with the registry's --secret-keys).
    Export {
        /// File to write (created 0600); stdout if absent.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Load an export into an empty registry (either store; it needs the same secret key).
    Import {
        /// File written by `vnpctl export`.
        file: PathBuf,
    },
    /// A local vnpd, over its admin socket.
    Vnpd(vnpd::VnpdArgs),
    /// Projects (each network is one): project id, zone, attributes.
    Project(Group<metadata::ProjectCmd>),
    /// The registry's signing keys for access and identity tokens.
    Keys(Group<metadata::KeysCmd>),
    /// Print the registry's public signing keys (JWKS), for services that verify its tokens.
    Jwks {
        /// File to write; stdout if absent.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify an access or identity token against the registry's JWKS (or a JWKS file).
    VerifyToken {
        #[command(flatten)]
        args: metadata::VerifyArgs,
        #[arg(long)]
        json: bool,
    },
}

/// One-line acknowledgement of a delete.
pub fn deleted(d: &Deleted) -> String {
    if d.cascaded.is_empty() {
        format!("deleted {}\n", d.deleted)
    } else {
        format!("deleted {} and {}\n", d.deleted, d.cascaded.join(", "))
    }
}

fn connect(cli: &Cli) -> Result<RegistryClient, String> {
    let from_dir = |name: &str| cli.tls_dir.as_ref().map(|d| d.join(name));
    let need = |explicit: &Option<PathBuf>, name: &str, flag: &str| {
        explicit
            .clone()
            .or_else(|| from_dir(name))
            .ok_or_else(|| format!("no {flag}: give --{flag}, --tls-dir or VNP_TLS_DIR"))
    };
    let ca = need(&cli.ca, "ca.pem", "ca")?;
    let cert = need(&cli.cert, "admin.pem", "cert")?;
    let key = need(&cli.key, "admin.key", "key")?;
    let config =
        ClientConfig::from_files(&cli.registry, &ca, &cert, &key).map_err(|e| e.to_string())?;
    RegistryClient::new(config).map_err(|e| e.to_string())
}

fn export(client: &RegistryClient, out: Option<&std::path::Path>) -> Result<String, String> {
    let export = client.export().map_err(|e| e.to_string())?;
    let text = output::json(&export);
    let Some(path) = out else {
        return Ok(text);
    };
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(format!(
        "exported {} VMs and {} sealed secrets to {}\n",
        export.vms.len(),
        export.secrets.len(),
        path.display()
    ))
}

fn run(cli: &Cli) -> Result<String, String> {
    match &cli.cmd {
        Cmd::Ca(c) => pki::run_ca(c),
        Cmd::Cert(c) => pki::run_cert(c),
        Cmd::Vnpd(a) => vnpd::run(a),
        Cmd::Whoami { json } => {
            let id = connect(cli)?.whoami().map_err(|e| e.to_string())?;
            Ok(if *json {
                output::json(&id)
            } else {
                format!("{} ({})\n", id, id.to_uri())
            })
        }
        Cmd::Network(g) => network::run(&connect(cli)?, &g.cmd, g.json),
        Cmd::Host(g) => host::run(&connect(cli)?, &g.cmd, g.json),
        Cmd::Vm(g) => vm::run(&connect(cli)?, &g.cmd, g.json),
        Cmd::Policy(g) => policy::run(&connect(cli)?, &g.cmd, g.json),
        Cmd::Gateway(g) => gateway::run(&connect(cli)?, &g.cmd, g.json),
        Cmd::Forward(g) => forward::run(&connect(cli)?, &g.cmd, g.json),
        Cmd::Lb(g) => lb::run(&connect(cli)?, &g.cmd, g.json),
        Cmd::Token(g) => token::run(&connect(cli)?, &g.cmd, g.json),
        Cmd::Watch { args, json } => token::watch(&connect(cli)?, args, *json),
        Cmd::Metrics => connect(cli)?.metrics_text().map_err(|e| e.to_string()),
        Cmd::Export { out } => export(&connect(cli)?, out.as_deref()),
        Cmd::Project(g) => metadata::run_project(&connect(cli)?, &g.cmd, g.json),
        Cmd::Keys(g) => metadata::run_keys(&connect(cli)?, &g.cmd, g.json),
        Cmd::Jwks { out } => {
            let text = output::json(&connect(cli)?.jwks().map_err(|e| e.to_string())?);
            match out {
                None => Ok(text),
                Some(path) => std::fs::write(path, text)
                    .map(|()| format!("wrote {}\n", path.display()))
                    .map_err(|e| format!("{}: {e}", path.display())),
            }
        }
        Cmd::VerifyToken { args, json } => {
            let jwks = match &args.jwks {
                Some(path) => metadata::read_jwks(path)?,
                None => connect(cli)?.jwks().map_err(|e| e.to_string())?,
            };
            metadata::verify(args, &jwks, *json)
        }
        Cmd::Import { file } => {
            let text = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
            let export: Export = serde_json::from_slice(&text)
                .map_err(|e| format!("{}: not a registry export: {e}", file.display()))?;
            let s = connect(cli)?.import(&export).map_err(|e| e.to_string())?;
            Ok(format!(
                "imported {} networks, {} hosts, {} gateways, {} VMs, {} rules, {} secrets, {} changes, {} metadata records\n",
                s.networks, s.hosts, s.gateways, s.vms, s.rules, s.secrets, s.changes, s.metadata
            ))
        }
    }
}

fn main() {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(out) => print!("{out}"),
        Err(e) => {
            eprintln!("vnpctl: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
