//! `vnpctl gateway create|list|delete|config`.

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
        /// Public address of its NAT and forwarded traffic (default: --addr). Gateways with
        /// the same public address form one NAT pool.
        #[arg(long)]
        public_addr: Option<Ipv4Addr>,
    },
    /// List gateways.
    List,
    /// Delete a gateway.
    Delete { id: String },
    /// What the gateway runs on: its network's VMs with their NAT ports, its forwarding rules.
    Config { id: String },
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
            public_addr,
        } => {
            let spec = GatewaySpec {
                id: id.clone(),
                network: network.clone(),
                underlay_addr: *addr,
                port: *port,
                public_addr: *public_addr,
            };
            let g = c.create_gateway(&spec).map_err(e)?;
            Ok(if json {
                to_json(&g)
            } else {
                format!(
                    "gateway {} for {} at {}:{}, public address {}\n",
                    g.id, g.network, g.underlay_addr, g.port, g.public_addr
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
                        g.public_addr.to_string(),
                        g.secret_generation.to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            Ok(table(
                &["ID", "NETWORK", "ENDPOINT", "PUBLIC", "SECRET GEN"],
                &rows,
            ))
        }
        GatewayCmd::Config { id } => {
            let cfg = c.gateway_config(id).map_err(e)?;
            if json {
                return Ok(to_json(&cfg));
            }
            let rows = cfg
                .vms
                .iter()
                .map(|v| {
                    vec![
                        v.id.clone(),
                        v.ip.to_string(),
                        crate::vm::port_blocks(&v.nat_ports),
                        v.location
                            .map_or("-".into(), |l| format!("{}:{}", l.host_addr, l.port)),
                        if v.egress { "allow" } else { "deny" }.into(),
                    ]
                })
                .collect::<Vec<_>>();
            let mut out = table(&["VM", "IP", "NAT PORTS", "AT", "EGRESS"], &rows);
            out.push('\n');
            out.push_str(&crate::forward::rules_table(&cfg.forwards));
            Ok(out)
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
