//! `vnpctl token issue` (debugging) and `vnpctl watch`.

use crate::output::{fields, json as to_json, opt, table};
use std::net::Ipv4Addr;
use std::time::Duration;
use vnp_registry_client::{RegistryClient, TokenRequest};

/// `vnpctl token` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum TokenCmd {
    /// Ask for a token as the caller (an admin may ask for any VM; policy still applies).
    Issue {
        /// Source VM id.
        #[arg(
            long,
            conflicts_with = "src_gateway",
            required_unless_present = "src_gateway"
        )]
        src_vm: Option<String>,
        /// Source gateway id (towards a VM of its network).
        #[arg(long)]
        src_gateway: Option<String>,
        /// Outside source address (gateway requests; optional, not part of the token).
        #[arg(long)]
        src_ip: Option<Ipv4Addr>,
        /// Destination address.
        #[arg(long)]
        dst: Ipv4Addr,
    },
}

/// Arguments of `vnpctl watch`.
#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// VMs to watch (repeatable; all if none).
    #[arg(long = "vm")]
    pub vms: Vec<String>,
    /// Report changes after this generation.
    #[arg(long, default_value_t = 0)]
    pub since: u64,
    /// Long-poll time in seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}

/// Runs `vnpctl token ...`.
pub fn run(c: &RegistryClient, cmd: &TokenCmd, json: bool) -> Result<String, String> {
    let TokenCmd::Issue {
        src_vm,
        src_gateway,
        src_ip,
        dst,
    } = cmd;
    let req = TokenRequest {
        src_vm: src_vm.clone(),
        src_gateway: src_gateway.clone(),
        src_ip: *src_ip,
        dst_ip: *dst,
    };
    let g = c.request_token_raw(&req).map_err(|e| e.to_string())?;
    if json {
        return Ok(to_json(&g));
    }
    Ok(fields(&[
        (
            "dst vm",
            g.dst_vm.clone().unwrap_or_else(|| "(gateway)".into()),
        ),
        (
            "dst",
            format!("{} via {}:{}", g.dst_ip, g.dst_host, g.dst_port),
        ),
        (
            "src",
            format!("{} at {}:{}", g.src_ip, g.src_host, g.src_port),
        ),
        ("network id", g.network_id.to_string()),
        ("token", g.token.clone()),
        (
            "expiry",
            if g.expiry == u32::MAX {
                "never".into()
            } else {
                g.expiry.to_string()
            },
        ),
    ]))
}

/// Runs `vnpctl watch`: one long-poll.
pub fn watch(c: &RegistryClient, args: &WatchArgs, json: bool) -> Result<String, String> {
    let vms: Vec<&str> = args.vms.iter().map(String::as_str).collect();
    let w = c
        .watch(&vms, args.since, Duration::from_secs(args.timeout))
        .map_err(|e| e.to_string())?;
    if json {
        return Ok(to_json(&w));
    }
    let rows = w
        .changes
        .iter()
        .map(|ch| {
            let at = ch
                .endpoint
                .map_or("-".to_string(), |e| format!("{}:{}", e.host_addr, e.port));
            vec![
                ch.generation.to_string(),
                ch.vm.clone(),
                format!("{:?}", ch.kind).to_lowercase(),
                opt(&ch.host),
                at,
            ]
        })
        .collect::<Vec<_>>();
    let mut out = table(&["GEN", "VM", "CHANGE", "HOST", "ENDPOINT"], &rows);
    out.push_str(&format!(
        "generation {}{}\n",
        w.generation,
        if w.resync {
            " (resync: re-read your VMs)"
        } else {
            ""
        }
    ));
    Ok(out)
}
