//! `vnpctl network create|list|show|delete`.

use crate::output::{fields, json as to_json, table};
use vnp_registry_client::{Ipv4Cidr, Network, NetworkSpec, PolicyAction, RegistryClient};

/// `vnpctl network` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum NetworkCmd {
    /// Create a network.
    Create {
        id: String,
        /// IPv4 CIDR, e.g. 10.1.0.0/24 (the first host address is the virtual router).
        #[arg(long)]
        cidr: Ipv4Cidr,
        /// Numeric network id used in tokens (allocated if absent).
        #[arg(long)]
        vni: Option<u32>,
        /// Guest MTU (default 1400).
        #[arg(long)]
        mtu: Option<u16>,
        /// Policy for pairs no rule matches.
        #[arg(long, value_parser = parse_action)]
        default_policy: Option<PolicyAction>,
        /// NAT source ports per VM (default 1024).
        #[arg(long)]
        nat_block: Option<u16>,
    },
    /// List networks.
    List,
    /// Show one network.
    Show { id: String },
    /// Delete a network.
    Delete {
        id: String,
        /// Also delete its VMs, gateway and rules.
        #[arg(long)]
        cascade: bool,
    },
}

/// Parses `allow` / `deny`.
pub fn parse_action(s: &str) -> Result<PolicyAction, String> {
    match s {
        "allow" => Ok(PolicyAction::Allow),
        "deny" => Ok(PolicyAction::Deny),
        _ => Err(format!("{s:?}: expected allow or deny")),
    }
}

fn show(n: &Network) -> String {
    fields(&[
        ("id", n.id.clone()),
        ("vni", n.vni.to_string()),
        ("cidr", n.cidr.to_string()),
        ("router", n.router.to_string()),
        ("mtu", n.mtu.to_string()),
        ("default policy", n.default_policy.to_string()),
        ("nat block", n.nat_block.to_string()),
    ])
}

/// Runs the subcommand.
pub fn run(c: &RegistryClient, cmd: &NetworkCmd, json: bool) -> Result<String, String> {
    let e = |e: vnp_registry_client::ClientError| e.to_string();
    match cmd {
        NetworkCmd::Create {
            id,
            cidr,
            vni,
            mtu,
            default_policy,
            nat_block,
        } => {
            let spec = NetworkSpec {
                id: id.clone(),
                vni: *vni,
                cidr: *cidr,
                mtu: *mtu,
                default_policy: *default_policy,
                nat_block: *nat_block,
            };
            let n = c.create_network(&spec).map_err(e)?;
            Ok(if json { to_json(&n) } else { show(&n) })
        }
        NetworkCmd::List => {
            let list = c.list_networks().map_err(e)?;
            if json {
                return Ok(to_json(&list));
            }
            let rows = list
                .iter()
                .map(|n| {
                    vec![
                        n.id.clone(),
                        n.vni.to_string(),
                        n.cidr.to_string(),
                        n.router.to_string(),
                        n.mtu.to_string(),
                        n.default_policy.to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            Ok(table(
                &["ID", "VNI", "CIDR", "ROUTER", "MTU", "DEFAULT"],
                &rows,
            ))
        }
        NetworkCmd::Show { id } => {
            let n = c.get_network(id).map_err(e)?;
            Ok(if json { to_json(&n) } else { show(&n) })
        }
        NetworkCmd::Delete { id, cascade } => {
            let d = c.delete_network(id, *cascade).map_err(e)?;
            Ok(if json {
                to_json(&d)
            } else {
                crate::deleted(&d)
            })
        }
    }
}
