//! Load-balanced services at the gateway (issue #10): a packet from the public side to a
//! service's `public address:port/proto` goes to a VM of the service's pool, chosen by the
//! local flow table (an established flow stays on its VM while that VM is healthy) or else by
//! the service's Maglev table, built from the pool's healthy members with the fixed hash keys of
//! `vnp_lb`, so every gateway given the same config and the same health view chooses the same
//! VM for a new flow without talking to the others.
//!
//! **Transparent**: only the destination changes (the service address and port become the VM's
//! own address and the service's `vm_port`); the VM sees the client's real address and port.
//! vnpd delivers it as an inbound flow (its destination port is outside the VM's NAT blocks)
//! and sends the reply unchanged to its gateway, whichever gateway of the public address that
//! is: there [`outbound`] puts back the service address and port as the source. The VM sees its
//! own address as the destination, never the service's.
//!
//! **Health checks** leave from the gateway's own kernel (a TCP connection from its underlay
//! address to the VM, routed into the TUN): [`probe_out`] sends such a packet to its VM through
//! VNP, and [`is_probe_answer`] recognises the VM's answer, which reaches whichever gateway of
//! the address the VM's host sends to; that gateway hands it unchanged to its kernel, which
//! delivers it (its own probe) or routes it to the gateway that probed.

use crate::table::{NatTable, VmIndex};
use crate::translate::{l4_of, port, set_addr, set_port, L4};
use crate::DropReason;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use vnp_lb::{CheckKind, Choice, FlowKey, FlowTable, HealthConfig, Member, Proto, Table};
use vnp_protocol::wire::{ipv4, tcp};
use vnp_registry_client::api::{GatewayConfig, GatewayService, L4Proto};

/// One service as the data path uses it.
#[derive(Debug, Clone)]
pub struct ServiceEntry {
    pub id: String,
    pub proto: Proto,
    pub public_port: u16,
    pub vm_port: u16,
    /// Over the healthy members' VM ids.
    pub table: Table,
    pub health: HealthConfig,
    /// The whole resolved pool (healthy or not): VM id, its index, weight.
    pub pool: Vec<(String, VmIndex, u32)>,
    /// Pool members this gateway's health checks took out, sorted.
    pub down: Vec<String>,
}

impl ServiceEntry {
    /// Whether `vm` is in the table (in the pool, healthy in this gateway's view).
    pub fn in_table(&self, vm: &str) -> bool {
        self.table
            .members()
            .binary_search_by(|m| m.as_str().cmp(vm))
            .is_ok()
    }

    /// Whether a flow remembered on `vm` stays there: the VM was not taken out by a health
    /// check (an operator removing it from the pool does not move its established flows).
    pub fn keeps_flows(&self, vm: &str) -> bool {
        self.down.binary_search_by(|m| m.as_str().cmp(vm)).is_err()
    }
}

/// Every service on the gateway's public address, immutable once built.
#[derive(Debug, Clone, Default)]
pub struct ServiceTable {
    pub services: Vec<ServiceEntry>,
    /// (protocol number, public port) -> index in `services`.
    by_port: HashMap<(u8, u16), usize>,
    /// (VM, protocol number, VM port) -> public port: replies of balanced flows.
    replies: HashMap<(VmIndex, u8, u16), u16>,
    /// VM id -> index, for flows remembered on a VM that has left the pool.
    vm_by_id: HashMap<String, VmIndex>,
    /// Underlay addresses health checks of this public address's gateways leave from.
    pub probe_sources: Vec<Ipv4Addr>,
    /// The ports health checks go to (sorted): the only source ports of a VM's answer to one.
    pub check_ports: Vec<u16>,
}

/// A service whose table could not be built (the registry checks the size; a pool larger
/// than the table can still happen with tags): it is left out and logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub service: String,
    pub why: String,
}

fn proto_of(p: L4Proto) -> Proto {
    match p {
        L4Proto::Tcp => Proto::Tcp,
        L4Proto::Udp => Proto::Udp,
    }
}

/// The health-check settings of `s` as `vnp_lb` takes them.
pub fn health_config(s: &GatewayService) -> HealthConfig {
    let h = &s.service.health;
    let port = s.service.check_port();
    HealthConfig {
        kind: match &h.http {
            Some(http) => CheckKind::Http {
                port,
                path: http.path.clone(),
                expect_status: http.expect_status,
            },
            None => CheckKind::TcpConnect { port },
        },
        interval_ms: h.interval_ms,
        timeout_ms: h.timeout_ms,
        rise: h.rise,
        fall: h.fall,
    }
}

impl ServiceTable {
    /// Builds the tables from `cfg` (VM indices from `nat`); `down(service, vm)` says which
    /// members this gateway's health checks took out.
    pub fn build(
        cfg: &GatewayConfig,
        nat: &NatTable,
        down: impl Fn(&str, &str) -> bool,
    ) -> (ServiceTable, Vec<Skipped>) {
        let mut out = ServiceTable {
            vm_by_id: nat
                .vms
                .iter()
                .enumerate()
                .map(|(i, v)| (v.id.clone(), i))
                .collect(),
            probe_sources: cfg.probe_sources.clone(),
            ..ServiceTable::default()
        };
        let mut skipped = Vec::new();
        for s in cfg
            .services
            .iter()
            .filter(|s| s.service.public_addr == nat.public_addr)
        {
            let svc = &s.service;
            let pool: Vec<(String, VmIndex, u32)> = s
                .pool
                .iter()
                .filter_map(|m| Some((m.vm.clone(), nat.vm_by_ip(m.ip)?, m.weight)))
                .collect();
            let mut down_now: Vec<String> = pool
                .iter()
                .filter(|(vm, _, _)| down(&svc.id, vm))
                .map(|(vm, _, _)| vm.clone())
                .collect();
            down_now.sort();
            let healthy: Vec<Member> = pool
                .iter()
                .filter(|(vm, _, _)| down_now.binary_search(vm).is_err())
                .map(|(vm, _, w)| Member::new(vm.clone(), *w))
                .collect();
            let proto = proto_of(svc.proto);
            // Every VM of the network, not only the pool's: flows placed on a VM before an
            // operator removed it from the pool finish; and before the table is built, so that
            // they also finish when a health change makes it fail (more healthy members than
            // slots). A forwarding rule on the same VM port keeps its replies.
            for vm in 0..nat.vms.len() {
                if nat.forward_out(vm, proto.number(), svc.vm_port).is_none() {
                    out.replies
                        .entry((vm, proto.number(), svc.vm_port))
                        .or_insert(svc.public_port);
                }
            }
            let table = match Table::build(&healthy, svc.table_size) {
                Ok(t) => t,
                Err(e) => {
                    skipped.push(Skipped {
                        service: svc.id.clone(),
                        why: e.to_string(),
                    });
                    continue;
                }
            };
            out.by_port
                .insert((proto.number(), svc.public_port), out.services.len());
            out.services.push(ServiceEntry {
                id: svc.id.clone(),
                proto,
                public_port: svc.public_port,
                vm_port: svc.vm_port,
                table,
                health: health_config(s),
                pool,
                down: down_now,
            });
        }
        out.check_ports = cfg
            .services
            .iter()
            .map(|s| s.service.check_port())
            .collect();
        out.check_ports.sort_unstable();
        out.check_ports.dedup();
        (out, skipped)
    }

    /// The service on public `proto`/`port`.
    pub fn service_at(&self, proto: u8, port: u16) -> Option<&ServiceEntry> {
        self.by_port.get(&(proto, port)).map(|i| &self.services[*i])
    }

    /// The public port a reply from `vm`'s `proto` port `vm_port` leaves with.
    pub fn reply_port(&self, vm: VmIndex, proto: u8, vm_port: u16) -> Option<u16> {
        self.replies.get(&(vm, proto, vm_port)).copied()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

/// TCP FIN or RST: the flow is closing.
fn closing(l4: L4, payload: &[u8]) -> bool {
    l4 == L4::Tcp && payload[13] & (tcp::flags::FIN | tcp::flags::RST) != 0
}

/// What [`inbound`] did with a packet for a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub vm: VmIndex,
    pub service: usize,
    /// A flow the gateway had not seen (or had to re-place): counted per member.
    pub new_flow: bool,
    /// Placed by the table but not remembered: the flow table is full.
    pub unremembered: bool,
}

/// A public packet: `None` if it is not for a service (NAT return, forwarding: the caller
/// goes on with `translate::inbound`), else the VM it was rewritten for, or why it is dropped.
pub fn inbound(
    services: &ServiceTable,
    nat: &NatTable,
    flows: &mut FlowTable,
    packet: &mut [u8],
    now_ms: u64,
) -> Option<Result<Placed, DropReason>> {
    if services.is_empty() {
        return None;
    }
    let ip = ipv4::Packet::new_checked(&*packet).ok()?;
    let proto = ip.protocol();
    if !matches!(proto, ipv4::PROTO_TCP | ipv4::PROTO_UDP)
        || ip.dst_addr() != nat.public_addr
        || ip.check_len(packet.len()).is_err()
        || ip.is_later_fragment()
    {
        return None;
    }
    let l4 = match l4_of(proto, ip.payload()) {
        Ok(l4) => l4,
        Err(why) => return Some(Err(why)),
    };
    let dport = port(l4, ip.payload(), false);
    let index = *services.by_port.get(&(proto, dport))?;
    let svc = &services.services[index];
    let key = FlowKey {
        proto: svc.proto,
        client: ip.src_addr(),
        client_port: port(l4, ip.payload(), true),
        service: nat.public_addr,
        service_port: dport,
    };
    let fin = closing(l4, ip.payload());
    let choice = flows.choose(key, now_ms, fin, &svc.table, |m| {
        svc.keeps_flows(m) && services.vm_by_id.contains_key(m)
    });
    let (member, new_flow, unremembered) = match &choice {
        Choice::Existing(m) => (m, false, false),
        Choice::New(m) => (m, true, false),
        Choice::Unremembered(m) => (m, true, true),
        Choice::NoBackend => return Some(Err(DropReason::NoBackend)),
    };
    let Some(&vm) = services.vm_by_id.get(&**member) else {
        return Some(Err(DropReason::NoBackend));
    };
    let hl = ip.header_len();
    set_port(&mut packet[hl..], l4, false, svc.vm_port);
    set_addr(packet, l4, false, nat.vms[vm].ip);
    Some(Ok(Placed {
        vm,
        service: index,
        new_flow,
        unremembered,
    }))
}

/// A VM's packet (through the receive checks): `None` if it is no reply of a balanced flow
/// (the caller goes on with `translate::outbound`), else its source rewritten to the service's
/// public address and port.
pub fn outbound(
    services: &ServiceTable,
    nat: &NatTable,
    packet: &mut [u8],
) -> Option<Result<VmIndex, DropReason>> {
    // Not `services.is_empty()`: a service skipped at the last build keeps its replies.
    if services.replies.is_empty() {
        return None;
    }
    let ip = ipv4::Packet::new_checked(&*packet).ok()?;
    let proto = ip.protocol();
    if !matches!(proto, ipv4::PROTO_TCP | ipv4::PROTO_UDP)
        || ip.check_len(packet.len()).is_err()
        || ip.is_later_fragment()
    {
        return None;
    }
    let l4 = l4_of(proto, ip.payload()).ok()?;
    let vm = nat.vm_by_ip(ip.src_addr())?;
    let public_port = services.reply_port(vm, proto, port(l4, ip.payload(), true))?;
    let hl = ip.header_len();
    set_port(&mut packet[hl..], l4, true, public_port);
    set_addr(packet, l4, true, nat.public_addr);
    Some(Ok(vm))
}

/// A packet from the public side (TUN) that this gateway's kernel sent from `own` (its
/// underlay address) to a VM: a health check. `None` if it is not one; else the VM to send it
/// to, or why it is dropped (only TCP to a VM of the network).
pub fn probe_out(
    nat: &NatTable,
    own: Ipv4Addr,
    packet: &[u8],
) -> Option<Result<VmIndex, DropReason>> {
    let ip = ipv4::Packet::new_checked(packet).ok()?;
    if ip.src_addr() != own {
        return None;
    }
    if ip.protocol() != ipv4::PROTO_TCP || ip.check_len(packet.len()).is_err() {
        return Some(Err(DropReason::UnsupportedProtocol));
    }
    Some(nat.vm_by_ip(ip.dst_addr()).ok_or(DropReason::UnknownVm))
}

/// Whether a VM's packet (through the receive checks) answers a health check: TCP from a
/// check port of a VM of the network to one of the probe sources. It goes to the kernel as it
/// is.
pub fn is_probe_answer(services: &ServiceTable, nat: &NatTable, packet: &[u8]) -> bool {
    let Ok(ip) = ipv4::Packet::new_checked(packet) else {
        return false;
    };
    let payload = ip.payload();
    ip.protocol() == ipv4::PROTO_TCP
        && payload.len() >= tcp::MIN_HEADER_LEN
        && services.probe_sources.contains(&ip.dst_addr())
        && nat.vm_by_ip(ip.src_addr()).is_some()
        && services
            .check_ports
            .binary_search(&port(L4::Tcp, payload, true))
            .is_ok()
}

#[cfg(test)]
#[path = "services_tests.rs"]
mod tests;
