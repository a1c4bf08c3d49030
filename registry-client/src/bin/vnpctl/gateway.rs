//! `vnpctl gateway create|list|delete`.

use crate::output::{json as to_json, table};
use std::net::Ipv4Addr;
use vnp_registry_client::{GatewaySpec, RegistryClient};

/// `vnpctl gateway` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum GatewayCmd {
    /// Register the gateway of a network (then issue its certificate with `vnpctl cert gateway`).
    Create {
        id: String,
        #[arg(long)]
        network: String,
        /// Underlay address the gateway receives VNP on.
        #[arg(long)]
        addr: Ipv4Addr,
        /// UDP port the gateway receives VNP on.
        #[arg(long)]
        port: u16,
    },
    /// List gateways.
    List,
    /// Delete a gateway.
    Delete { id: String },
}

/// Runs the subcommand.
pub fn run(c: &RegistryClient, cmd: &GatewayCmd, json: bool) -> Result<String, String> {
    let e = |e: vnp_registry_client::ClientError| e.to_string();
    match cmd {
        GatewayCmd::Create {
            id,
            network,
            addr,
            port,
        } => {
            let spec = GatewaySpec {
                id: id.clone(),
                network: network.clone(),
                underlay_addr: *addr,
                port: *port,
            };
            let g = c.create_gateway(&spec).map_err(e)?;
            Ok(if json {
                to_json(&g)
            } else {
                format!(
                    "gateway {} for {} at {}:{}\n",
                    g.id, g.network, g.underlay_addr, g.port
                )
            })
        }
        GatewayCmd::List => {
            let list = c.list_gateways().map_err(e)?;
            if json {
                return Ok(to_json(&list));
            }
            let rows = list
                .iter()
                .map(|g| {
                    vec![
                        g.id.clone(),
                        g.network.clone(),
                        format!("{}:{}", g.underlay_addr, g.port),
                        g.secret_generation.to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            Ok(table(&["ID", "NETWORK", "ENDPOINT", "SECRET GEN"], &rows))
        }
        GatewayCmd::Delete { id } => {
            let d = c.delete_gateway(id).map_err(e)?;
            Ok(if json {
                to_json(&d)
            } else {
                crate::deleted(&d)
            })
        }
    }
}
