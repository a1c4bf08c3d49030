//! `vnpctl vm create|list|show|delete|move|migrate|rotate-secret`.

use crate::output::{fields, json as to_json, opt, table};
use std::net::Ipv4Addr;
use vnp_registry_client::{MacAddr, MoveVm, RegistryClient, StartMigration, VmRecord, VmSpec};

/// `vnpctl vm` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum VmCmd {
    /// Create a VM; unset fields are allocated.
    Create {
        id: String,
        #[arg(long)]
        network: String,
        #[arg(long)]
        ip: Option<Ipv4Addr>,
        #[arg(long)]
        mac: Option<MacAddr>,
        #[arg(long)]
        hostname: Option<String>,
        /// Owning host.
        #[arg(long)]
        host: Option<String>,
        /// UDP port on the owning host.
        #[arg(long)]
        port: Option<u16>,
        #[arg(long)]
        service_account: Option<String>,
        /// Tag (repeatable), used by policy rules.
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// List VMs.
    List {
        #[arg(long)]
        network: Option<String>,
    },
    /// Show one VM.
    Show { id: String },
    /// Delete a VM.
    Delete { id: String },
    /// Hand a VM to another host (migration step 1; the new host then registers the endpoint).
    Move {
        id: String,
        #[arg(long, conflicts_with = "detach", required_unless_present = "detach")]
        host: Option<String>,
        #[arg(long, requires = "host")]
        port: Option<u16>,
        /// Take the VM off every host.
        #[arg(long)]
        detach: bool,
    },
    /// Announce a live migration to HOST: HOST may prepare the VM (`vnpctl vnpd attach
    /// --incoming`); it becomes the owner when the migrated VM resumes there. `--cancel` forgets
    /// a migration that was cancelled or failed.
    Migrate {
        id: String,
        #[arg(long, conflicts_with = "cancel", required_unless_present = "cancel")]
        host: Option<String>,
        /// UDP port on HOST (allocated when absent).
        #[arg(long, requires = "host")]
        port: Option<u16>,
        #[arg(long)]
        cancel: bool,
    },
    /// Replace the VM's secret (its host must fetch the new one).
    RotateSecret { id: String },
    #[command(flatten)]
    Meta(crate::metadata::VmMetaCmd),
    /// Give the VM more NAT source-port blocks (its host and gateways follow without restart).
    NatGrow {
        id: String,
        /// How many blocks of the network's block size.
        #[arg(long, default_value_t = 1)]
        blocks: u16,
    },
}

/// `1024-1535,3072-3583`.
pub fn port_blocks(blocks: &[vnp_registry_client::PortRange]) -> String {
    let list: Vec<String> = blocks.iter().map(ToString::to_string).collect();
    if list.is_empty() {
        "-".into()
    } else {
        list.join(",")
    }
}

fn show(v: &VmRecord) -> String {
    let endpoint = v.endpoint.map_or("-".to_string(), |e| {
        format!("{}:{} (generation {})", e.host_addr, e.port, e.generation)
    });
    fields(&[
        ("id", v.id.clone()),
        ("network", format!("{} (vni {})", v.network, v.vni)),
        ("ip", v.ip.to_string()),
        ("mac", v.mac.to_string()),
        ("hostname", v.hostname.clone()),
        ("host", opt(&v.host)),
        ("host port", opt(&v.host_port)),
        ("endpoint", endpoint),
        (
            "migrating to",
            v.incoming
                .as_ref()
                .map_or("-".into(), |i| format!("{} port {}", i.host, i.host_port)),
        ),
        ("nat ports", port_blocks(&v.nat_ports)),
        ("service account", v.service_account.clone()),
        (
            "tags",
            if v.tags.is_empty() {
                "-".into()
            } else {
                v.tags.join(",")
            },
        ),
        ("secret generation", v.secret_generation.to_string()),
    ])
}

/// Runs the subcommand.
pub fn run(c: &RegistryClient, cmd: &VmCmd, json: bool) -> Result<String, String> {
    let e = |e: vnp_registry_client::ClientError| e.to_string();
    let one = |v: VmRecord| if json { to_json(&v) } else { show(&v) };
    match cmd {
        VmCmd::Create {
            id,
            network,
            ip,
            mac,
            hostname,
            host,
            port,
            service_account,
            tags,
        } => {
            let spec = VmSpec {
                id: id.clone(),
                network: network.clone(),
                ip: *ip,
                mac: *mac,
                hostname: hostname.clone(),
                host: host.clone(),
                host_port: *port,
                service_account: service_account.clone(),
                tags: tags.clone(),
            };
            Ok(one(c.create_vm(&spec).map_err(e)?))
        }
        VmCmd::List { network } => {
            let list = c.list_vms(network.as_deref()).map_err(e)?;
            if json {
                return Ok(to_json(&list));
            }
            let rows = list
                .iter()
                .map(|v| {
                    let at = v
                        .endpoint
                        .map_or("-".to_string(), |e| format!("{}:{}", e.host_addr, e.port));
                    vec![
                        v.id.clone(),
                        v.network.clone(),
                        v.ip.to_string(),
                        v.mac.to_string(),
                        opt(&v.host),
                        at,
                        v.tags.join(","),
                    ]
                })
                .collect::<Vec<_>>();
            Ok(table(
                &["ID", "NETWORK", "IP", "MAC", "HOST", "ENDPOINT", "TAGS"],
                &rows,
            ))
        }
        VmCmd::Show { id } => Ok(one(c.get_vm(id).map_err(e)?)),
        VmCmd::Delete { id } => {
            let d = c.delete_vm(id).map_err(e)?;
            Ok(if json {
                to_json(&d)
            } else {
                crate::deleted(&d)
            })
        }
        VmCmd::Move {
            id,
            host,
            port,
            detach,
        } => {
            let req = MoveVm {
                host: if *detach { None } else { host.clone() },
                host_port: *port,
            };
            Ok(one(c.move_vm(id, &req).map_err(e)?))
        }
        VmCmd::Migrate {
            id,
            host: Some(host),
            port,
            cancel: false,
        } => {
            let req = StartMigration {
                host: host.clone(),
                host_port: *port,
            };
            Ok(one(c.start_migration(id, &req).map_err(e)?))
        }
        VmCmd::Migrate { id, .. } => Ok(one(c.cancel_migration(id).map_err(e)?)),
        VmCmd::RotateSecret { id } => Ok(one(c.rotate_vm_secret(id).map_err(e)?)),
        VmCmd::Meta(m) => crate::metadata::run_vm(c, m, json),
        VmCmd::NatGrow { id, blocks } => Ok(one(c.grow_nat_ports(id, *blocks).map_err(e)?)),
    }
}
