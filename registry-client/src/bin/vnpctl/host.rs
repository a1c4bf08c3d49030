//! `vnpctl host create|list|show|delete`.

use crate::output::{fields, json as to_json, table};
use std::net::Ipv4Addr;
use vnp_registry_client::{Host, HostSpec, PortRange, RegistryClient};

/// `vnpctl host` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum HostCmd {
    /// Register a host (then issue its certificate with `vnpctl cert host`).
    Create {
        id: String,
        /// Underlay address of the host.
        #[arg(long)]
        addr: Ipv4Addr,
        /// UDP ports for its VMs, FIRST-LAST (default 40000-49999).
        #[arg(long)]
        ports: Option<PortRange>,
    },
    /// List hosts.
    List,
    /// Show one host.
    Show { id: String },
    /// Delete a host (refused while VMs are assigned to it).
    Delete { id: String },
}

fn show(h: &Host) -> String {
    fields(&[
        ("id", h.id.clone()),
        ("underlay", h.underlay_addr.to_string()),
        ("ports", h.port_range.to_string()),
    ])
}

/// Runs the subcommand.
pub fn run(c: &RegistryClient, cmd: &HostCmd, json: bool) -> Result<String, String> {
    let e = |e: vnp_registry_client::ClientError| e.to_string();
    match cmd {
        HostCmd::Create { id, addr, ports } => {
            let h = c
                .create_host(&HostSpec {
                    id: id.clone(),
                    underlay_addr: *addr,
                    port_range: *ports,
                })
                .map_err(e)?;
            Ok(if json { to_json(&h) } else { show(&h) })
        }
        HostCmd::List => {
            let list = c.list_hosts().map_err(e)?;
            if json {
                return Ok(to_json(&list));
            }
            let rows = list
                .iter()
                .map(|h| {
                    vec![
                        h.id.clone(),
                        h.underlay_addr.to_string(),
                        h.port_range.to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            Ok(table(&["ID", "UNDERLAY", "PORTS"], &rows))
        }
        HostCmd::Show { id } => {
            let h = c.get_host(id).map_err(e)?;
            Ok(if json { to_json(&h) } else { show(&h) })
        }
        HostCmd::Delete { id } => {
            let d = c.delete_host(id).map_err(e)?;
            Ok(if json {
                to_json(&d)
            } else {
                crate::deleted(&d)
            })
        }
    }
}
