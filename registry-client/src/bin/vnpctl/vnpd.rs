//! `vnpctl vnpd ...`: drives a local vnpd over its admin socket.
//!
//! ```text
//! vnpctl vnpd attach vm-a [--socket-path P] [--queue-pairs N] [--incoming]
//! vnpctl vnpd detach vm-a
//! vnpctl vnpd list
//! vnpctl vnpd stats [vm-a] [--all]
//! vnpctl vnpd nat vm-a
//! ```
//! Output is a plain table; `--json` prints the admin API's JSON instead (for scripts).

use std::fmt::Write as _;
use std::path::PathBuf;
use vnpd_admin_api::{AttachmentInfo, NatInfo, VmStats, VnpdAdminClient};

/// Arguments of `vnpctl vnpd`.
#[derive(Debug, clap::Args)]
pub struct VnpdArgs {
    /// vnpd's admin socket.
    #[arg(long, env = "VNPD_ADMIN_SOCKET", default_value = "/run/vnp/vnpd.sock")]
    pub admin_socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: VnpdCmd,
}

/// `vnpctl vnpd` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum VnpdCmd {
    /// Attach a VM (known to the registry and assigned to this host) to vnpd.
    Attach {
        /// The VM's registry id.
        vm_id: String,
        /// vhost-user socket for the VM (default: vnpd's socket_dir/<vm>.sock).
        #[arg(long)]
        socket_path: Option<PathBuf>,
        /// Queue pairs of the virtio-net device.
        #[arg(long)]
        queue_pairs: Option<u16>,
        /// Live-migration destination: prepare the VM here without taking over its endpoint;
        /// vnpd registers the endpoint itself when the migrated VM resumes on this host.
        #[arg(long)]
        incoming: bool,
    },
    /// Detach a VM.
    Detach {
        /// The VM's registry id.
        vm_id: String,
    },
    /// List attached VMs.
    List,
    /// Show packet counters and drops by reason.
    Stats {
        /// Only this VM.
        vm_id: Option<String>,
        /// Also show drop reasons that are zero.
        #[arg(long)]
        all: bool,
    },
    /// Show a VM's NAT port blocks and its flows to and from the outside.
    Nat {
        /// The VM's registry id.
        vm_id: String,
    },
}

/// Runs the subcommand; returns what to print.
pub fn run(args: &VnpdArgs) -> Result<String, String> {
    let client = VnpdAdminClient::new(&args.admin_socket);
    match &args.cmd {
        VnpdCmd::Attach {
            vm_id,
            socket_path,
            queue_pairs,
            incoming,
        } => {
            let a = client
                .attach_with(vm_id, socket_path.clone(), *queue_pairs, *incoming)
                .map_err(|e| e.to_string())?;
            Ok(if args.json {
                json(&a)
            } else {
                format!(
                    "attached {}{} ({}/{} on {}) socket {} udp {}:{}\n",
                    a.vm_id,
                    if *incoming { " (incoming)" } else { "" },
                    a.vm_ip,
                    a.prefix_len,
                    a.network,
                    a.socket_path.display(),
                    a.host_addr,
                    a.udp_port
                )
            })
        }
        VnpdCmd::Detach { vm_id } => {
            client.detach(vm_id).map_err(|e| e.to_string())?;
            Ok(if args.json {
                format!(
                    "{{\"detached\":{}}}\n",
                    serde_json::Value::from(vm_id.as_str())
                )
            } else {
                format!("detached {vm_id}\n")
            })
        }
        VnpdCmd::List => {
            let list = client.list().map_err(|e| e.to_string())?;
            Ok(if args.json {
                json(&list)
            } else {
                format_list(&list)
            })
        }
        VnpdCmd::Stats { vm_id, all } => {
            let stats = client.stats(vm_id.as_deref()).map_err(|e| e.to_string())?;
            Ok(if args.json {
                json(&stats)
            } else {
                format_stats(&stats, *all)
            })
        }
        VnpdCmd::Nat { vm_id } => {
            let nat = client.nat(vm_id).map_err(|e| e.to_string())?;
            Ok(if args.json {
                json(&nat)
            } else {
                format_nat(&nat)
            })
        }
    }
}

/// A VM's NAT blocks and flows (pure).
pub fn format_nat(nat: &NatInfo) -> String {
    let mut out = String::new();
    let blocks: Vec<String> = nat.blocks.iter().map(|(a, b)| format!("{a}-{b}")).collect();
    let mapped = nat.flows.iter().filter(|f| f.mapped.is_some()).count();
    let _ = writeln!(
        out,
        "{}: blocks {} ({} ports per protocol), {} mapped flows, {} inbound",
        nat.vm_id,
        if blocks.is_empty() {
            "none".to_string()
        } else {
            blocks.join(",")
        },
        nat.ports,
        mapped,
        nat.flows.len() - mapped
    );
    if nat.flows.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "{:<5} {:>6} {:>7} {:<21} {:<12} {:>8}",
        "PROTO", "GUEST", "MAPPED", "REMOTE", "STATE", "EXPIRES"
    );
    for f in &nat.flows {
        let _ = writeln!(
            out,
            "{:<5} {:>6} {:>7} {:<21} {:<12} {:>7}s",
            f.proto,
            f.local_port,
            f.mapped.map_or("inbound".to_string(), |p| p.to_string()),
            format!("{}:{}", f.remote, f.remote_port),
            f.state,
            f.expires_in
        );
    }
    out
}

/// Pretty JSON plus a newline.
fn json<T: serde::Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("answers always serialize");
    s.push('\n');
    s
}

/// Table of attachments (pure).
pub fn format_list(list: &[AttachmentInfo]) -> String {
    if list.is_empty() {
        return "no VMs attached\n".to_string();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<18} {:<17} {:<12} {:>5} {:>3}  SOCKET",
        "VM", "ADDRESS", "MAC", "NETWORK", "PORT", "QP"
    );
    for a in list {
        let _ = writeln!(
            out,
            "{:<20} {:<18} {:<17} {:<12} {:>5} {:>3}  {}",
            a.vm_id,
            format!("{}/{}", a.vm_ip, a.prefix_len),
            a.mac,
            a.network,
            a.udp_port,
            a.queue_pairs,
            a.socket_path.display()
        );
    }
    out
}

/// Counters per VM, then non-zero drops (all drops with `all`) (pure).
pub fn format_stats(stats: &[VmStats], all: bool) -> String {
    if stats.is_empty() {
        return "no VMs attached\n".to_string();
    }
    let mut out = String::new();
    for s in stats {
        let _ = writeln!(out, "{}", s.vm_id);
        for (k, v) in &s.counters {
            let _ = writeln!(out, "  {k:<28} {v:>14}");
        }
        let total: u64 = s.drops.values().sum();
        let _ = writeln!(out, "  {:<28} {total:>14}", "drops");
        for (k, v) in &s.drops {
            if all || *v > 0 {
                let _ = writeln!(out, "    {k:<26} {v:>14}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn nat_table_shows_blocks_and_flows() {
        let flow = |mapped, state: &str| vnpd_admin_api::NatFlowInfo {
            proto: "tcp".into(),
            local_port: 33000,
            remote: "203.0.113.5".parse().unwrap(),
            remote_port: 80,
            mapped,
            state: state.into(),
            expires_in: 7439,
        };
        let nat = NatInfo {
            vm_id: "vm-a".into(),
            blocks: vec![(40000, 40511)],
            ports: 512,
            flows: vec![flow(Some(40007), "established"), flow(None, "handshake")],
        };
        let text = format_nat(&nat);
        assert!(text.starts_with(
            "vm-a: blocks 40000-40511 (512 ports per protocol), 1 mapped flows, 1 inbound"
        ));
        assert!(text.contains("40007") && text.contains("203.0.113.5:80"));
        assert!(text.contains("inbound") && text.contains("established"));
        let empty = NatInfo {
            blocks: vec![],
            flows: vec![],
            ..nat
        };
        assert!(format_nat(&empty).contains("blocks none"));
    }

    #[test]
    fn list_table_has_one_row_per_vm() {
        assert_eq!(format_list(&[]), "no VMs attached\n");
        let a = AttachmentInfo {
            vm_id: "vm-a".into(),
            network: "net1".into(),
            network_id: 7,
            vm_ip: "10.0.0.2".parse().unwrap(),
            prefix_len: 24,
            router_ip: "10.0.0.1".parse().unwrap(),
            mac: "02:00:00:00:00:02".into(),
            hostname: "a".into(),
            guest_mtu: 1452,
            host_addr: "198.18.0.10".parse().unwrap(),
            udp_port: 47000,
            socket_path: "/run/vnp/sockets/vm-a.sock".into(),
            queue_pairs: 1,
        };
        let t = format_list(&[a]);
        let lines: Vec<_> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].starts_with("vm-a "), "{t}");
        assert!(
            lines[1].contains("10.0.0.2/24") && lines[1].contains("47000"),
            "{t}"
        );
    }

    #[test]
    fn stats_hide_zero_drops_unless_asked() {
        let s = VmStats {
            vm_id: "vm-a".into(),
            counters: BTreeMap::from([("rx_packets".to_string(), 5)]),
            drops: BTreeMap::from([
                ("rx_bad_token".to_string(), 2),
                ("rx_expired".to_string(), 0),
            ]),
        };
        let t = format_stats(std::slice::from_ref(&s), false);
        assert!(
            t.contains("rx_bad_token") && !t.contains("rx_expired"),
            "{t}"
        );
        assert!(t.contains("drops") && t.contains(" 2\n"), "{t}");
        let t = format_stats(&[s], true);
        assert!(t.contains("rx_expired"), "{t}");
    }
}
