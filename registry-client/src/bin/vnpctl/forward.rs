//! `vnpctl forward add|list|rm`: `public_addr:port/proto -> vm:port`.

use crate::output::{json as to_json, table};
use vnp_registry_client::{ForwardRule, ForwardSpec, L4Proto, RegistryClient};

/// `vnpctl forward` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ForwardCmd {
    /// Forward a gateway's public port to a VM's port.
    Add {
        id: String,
        /// Public address (a gateway's `--public-addr`) and port: `203.0.113.1:443`.
        #[arg(long)]
        public: std::net::SocketAddrV4,
        #[arg(long, default_value = "tcp")]
        proto: L4Proto,
        /// The VM and its port: `web-1:8443`.
        #[arg(long)]
        to: String,
    },
    /// List forwarding rules.
    List {
        #[arg(long)]
        network: Option<String>,
    },
    /// Remove a forwarding rule.
    Rm { id: String },
}

/// The rules as a table.
pub fn rules_table(rules: &[ForwardRule]) -> String {
    let rows = rules
        .iter()
        .map(|f| {
            vec![
                f.id.clone(),
                format!("{}:{}/{}", f.public_addr, f.public_port, f.proto),
                format!("{}:{}", f.vm, f.vm_port),
                f.network.clone(),
            ]
        })
        .collect::<Vec<_>>();
    table(&["ID", "PUBLIC", "TO", "NETWORK"], &rows)
}

fn parse_target(to: &str) -> Result<(String, u16), String> {
    let (vm, port) = to
        .rsplit_once(':')
        .ok_or_else(|| format!("--to {to:?}: expected VM:PORT"))?;
    let port = port
        .parse()
        .map_err(|_| format!("--to {to:?}: {port:?} is not a port"))?;
    Ok((vm.to_string(), port))
}

/// Runs the subcommand.
pub fn run(c: &RegistryClient, cmd: &ForwardCmd, json: bool) -> Result<String, String> {
    let e = |e: vnp_registry_client::ClientError| e.to_string();
    match cmd {
        ForwardCmd::Add {
            id,
            public,
            proto,
            to,
        } => {
            let (vm, vm_port) = parse_target(to)?;
            let spec = ForwardSpec {
                id: id.clone(),
                public_addr: *public.ip(),
                public_port: public.port(),
                proto: *proto,
                vm,
                vm_port,
            };
            let f = c.create_forward(&spec).map_err(e)?;
            Ok(if json { to_json(&f) } else { rules_table(&[f]) })
        }
        ForwardCmd::List { network } => {
            let list = c.list_forwards(network.as_deref()).map_err(e)?;
            Ok(if json {
                to_json(&list)
            } else {
                rules_table(&list)
            })
        }
        ForwardCmd::Rm { id } => {
            let d = c.delete_forward(id).map_err(e)?;
            Ok(if json {
                to_json(&d)
            } else {
                crate::deleted(&d)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(parse_target("web-1:8443"), Ok(("web-1".into(), 8443)));
        assert!(parse_target("web-1").is_err());
        assert!(parse_target("web-1:http").is_err());
    }
}
