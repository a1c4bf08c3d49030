//! The `gateway` target's configurations (the default one, one from the input's bytes, and
//! whether one is as the registry would hand it out) and the packets its operations build.

use std::net::Ipv4Addr;

use vnp_gateway::table::NatTable;
use vnp_protocol::wire::icmpv4::msg_type;
use vnp_protocol::wire::ipv4::{self, protocol};
use vnp_registry_client::api::{
    ForwardRule, Gateway, GatewayConfig, GatewayPeer, HealthCheckSpec, HttpCheck, L4Proto, Network,
    PolicyAction, UnderlayAddr,
};
use vnp_registry_client::net::PortRange;

use super::{Sent, HOST, LOCAL, LOCAL_IP, NETWORK_ID, PUBLIC, ROUTER};
use crate::gateway_lb::{custom_services, service, PROBE_SOURCES};
use crate::nat::fill_checksums;

/// A configuration the registry could hand out: blocks pairwise disjoint, rule ports in no
/// block, one rule per public port and per VM port.
pub(super) fn consistent(cfg: &GatewayConfig) -> bool {
    let blocks: Vec<PortRange> = cfg.vms.iter().flat_map(|v| v.nat_ports.clone()).collect();
    let disjoint = blocks.iter().enumerate().all(|(i, a)| {
        blocks[i + 1..]
            .iter()
            .all(|b| a.last < b.first || b.last < a.first)
    });
    let rules_apart = cfg.forwards.iter().enumerate().all(|(i, f)| {
        !blocks.iter().any(|b| b.contains(f.public_port))
            && cfg.forwards[i + 1..].iter().all(|g| {
                f.proto != g.proto
                    || (f.public_port != g.public_port && (f.vm != g.vm || f.vm_port != g.vm_port))
            })
    });
    // Services (as the registry checks them): a public port in no block and no rule of its
    // protocol, one service per public port, a VM port in no block.
    let services_apart = cfg.services.iter().enumerate().all(|(i, s)| {
        let s = &s.service;
        !blocks
            .iter()
            .any(|b| b.contains(s.public_port) || b.contains(s.vm_port))
            && !cfg
                .forwards
                .iter()
                .any(|f| f.proto == s.proto && f.public_port == s.public_port)
            && cfg.services[i + 1..]
                .iter()
                .all(|t| t.service.proto != s.proto || t.service.public_port != s.public_port)
    });
    disjoint && rules_apart && services_apart
}

pub(super) fn peer(
    id: &str,
    last: u8,
    blocks: Vec<PortRange>,
    egress: bool,
    located: bool,
) -> GatewayPeer {
    GatewayPeer {
        id: id.into(),
        ip: Ipv4Addr::new(10, 1, 0, last),
        nat_ports: blocks,
        location: located.then_some(UnderlayAddr {
            host_addr: *HOST.ip(),
            port: HOST.port(),
        }),
        egress,
    }
}

pub(super) fn rule(
    id: &str,
    proto: L4Proto,
    public_port: u16,
    vm: &str,
    vm_port: u16,
) -> ForwardRule {
    ForwardRule {
        id: id.into(),
        network: "n1".into(),
        public_addr: PUBLIC,
        public_port,
        proto,
        vm: vm.into(),
        vm_port,
    }
}

pub(super) fn range(first: u16, last: u16) -> PortRange {
    PortRange { first, last }
}

/// VM a: 1024-1535 and 2048-2559 with egress; b: 1536-2047 without, TCP 443 -> b:8443;
/// c: 2560-3071, on no host, UDP 53 -> c:5353.
pub fn default_config() -> GatewayConfig {
    let mut cfg = GatewayConfig {
        generation: 1,
        gateway: Gateway {
            id: "g1".into(),
            network: "n1".into(),
            vni: NETWORK_ID,
            underlay_addr: *LOCAL.ip(),
            port: LOCAL.port(),
            public_addr: PUBLIC,
            secret_generation: 1,
        },
        network: Network {
            id: "n1".into(),
            vni: NETWORK_ID,
            cidr: "10.1.0.0/24".parse().expect("cidr"),
            router: Ipv4Addr::new(10, 1, 0, 1),
            mtu: 1400,
            default_policy: PolicyAction::Allow,
            nat_block: 512,
        },
        pool: vec![],
        vms: vec![
            peer(
                "a",
                2,
                vec![range(1024, 1535), range(2048, 2559)],
                true,
                true,
            ),
            peer("b", 3, vec![range(1536, 2047)], false, true),
            peer("c", 4, vec![range(2560, 3071)], true, false),
        ],
        forwards: vec![
            rule("web", L4Proto::Tcp, 443, "b", 8443),
            rule("dns", L4Proto::Udp, 53, "c", 5353),
        ],
        services: Vec::new(),
        probe_sources: PROBE_SOURCES.to_vec(),
    };
    let http = HealthCheckSpec {
        http: Some(HttpCheck {
            path: "/health".into(),
            expect_status: 200,
        }),
        ..HealthCheckSpec::default()
    };
    let tcp_check = HealthCheckSpec {
        port: Some(5301),
        ..HealthCheckSpec::default()
    };
    cfg.services = vec![
        service(
            &cfg,
            "web",
            L4Proto::Tcp,
            (80, 8080),
            &[(0, 1), (1, 2), (2, 1)],
            31,
            http,
        ),
        service(
            &cfg,
            "dns",
            L4Proto::Udp,
            (5300, 53),
            &[(0, 1), (2, 1)],
            13,
            tcp_check,
        ),
    ];
    cfg
}

/// A configuration from bytes: `[VMs] ([egress] [blocks] ([first u16] [length])*)*
/// [rules] ([proto] [public port u16] [VM] [VM port u16])*`.
pub(super) fn custom_config(bytes: &[u8]) -> GatewayConfig {
    let mut it = bytes.iter().copied();
    let mut next = || it.next().unwrap_or(0);
    let mut cfg = default_config();
    cfg.vms = (0..1 + next() % 4)
        .map(|i| {
            let egress = next() & 1 == 1;
            let blocks = (0..next() % 3)
                .map(|_| {
                    let first = u16::from_be_bytes([next(), next()]).max(1);
                    range(first, first.saturating_add(u16::from(next())))
                })
                .collect();
            peer(&format!("v{i}"), 2 + i, blocks, egress, true)
        })
        .collect();
    let vms = cfg.vms.len() as u8;
    cfg.forwards = (0..next() % 5)
        .map(|i| {
            let proto = if next() & 1 == 0 {
                L4Proto::Tcp
            } else {
                L4Proto::Udp
            };
            let public = u16::from_be_bytes([next(), next()]);
            let vm = format!("v{}", next() % vms);
            let vm_port = u16::from_be_bytes([next(), next()]);
            rule(&format!("r{i}"), proto, public, &vm, vm_port)
        })
        .collect();
    cfg.services = custom_services(&cfg, &mut next);
    cfg
}

/// Makes a well-formed public packet a health check from the gateway's own kernel to a VM
/// (chosen by the destination's last byte), checksums filled.
pub(super) fn make_probe(p: &mut [u8], table: &NatTable) {
    if p.len() < ipv4::MIN_HEADER_LEN {
        return;
    }
    let vm = &table.vms[usize::from(p[19]) % table.vms.len()];
    let mut ip = ipv4::Packet::new_unchecked(&mut p[..]);
    ip.set_src_addr(LOCAL_IP);
    ip.set_dst_addr(vm.ip);
    fill_checksums(p);
}

/// Makes raw bytes a well-formed packet from `vm` (`Some`) to the outside, or from the outside
/// to the public address (`None`), checksums filled.
pub(super) fn fix_packet(p: &mut Vec<u8>, vm: Option<Ipv4Addr>) {
    if p.len() < 28 {
        p.resize(28, 0);
    }
    let ihl = usize::from(p[0] & 0x0f).clamp(5, 15).min(p.len() / 4 - 2);
    p[0] = 0x40 | ihl as u8;
    let proto = match p[9] {
        protocol::TCP | protocol::UDP | protocol::ICMP => p[9],
        b => [protocol::TCP, protocol::UDP, protocol::ICMP][usize::from(b % 3)],
    };
    if proto == protocol::TCP && p.len() < ihl * 4 + 20 {
        p.resize(ihl * 4 + 20, 0);
    }
    p.truncate(usize::from(u16::MAX));
    let len = p.len() as u16;
    let mut ip = ipv4::Packet::new_unchecked(&mut p[..]);
    ip.set_total_len(len);
    ip.set_unfragmented(false);
    ip.set_protocol(proto);
    let o = ip.dst_addr().octets();
    let outside = Ipv4Addr::new(198, 51, o[2], o[3]);
    match vm {
        Some(vm) => {
            ip.set_src_addr(vm);
            ip.set_dst_addr(outside);
        }
        None => {
            ip.set_src_addr(outside);
            ip.set_dst_addr(PUBLIC);
        }
    }
    fill_checksums(p);
}

/// The remote's answer to the packet that left (destination: the public address and port).
pub(super) fn reply_to(sent: &Sent, bytes: &[u8]) -> Option<Vec<u8>> {
    let ip = ipv4::Packet::new_checked(&sent.packet[..]).ok()?;
    let (hl, proto, remote) = (ip.header_len(), ip.protocol(), ip.dst_addr());
    let n = if proto == protocol::TCP { 20 } else { 8 };
    let mut head = sent.packet.get(hl..hl + n)?.to_vec();
    if proto == protocol::ICMP {
        head[0] = msg_type::ECHO_REPLY;
    } else {
        let s = [head[0], head[1]];
        head.copy_within(2..4, 0);
        head[2..4].copy_from_slice(&s);
        if proto == protocol::TCP {
            head[12] = 0x50;
            head[13] = bytes.first().copied().unwrap_or(0x12);
        }
    }
    head.extend_from_slice(bytes.get(1..).unwrap_or(&[]));
    let mut p = crate::seeds::ip_packet(remote, PUBLIC, proto, &head);
    fill_checksums(&mut p);
    Some(p)
}

/// An ICMP error from a router about the packet that left: type, code, extra quoted bytes.
pub(super) fn icmp_error_about(sent: &Sent, bytes: &[u8]) -> Option<Vec<u8>> {
    let b = |i: usize| bytes.get(i).copied().unwrap_or(0);
    let types = [
        msg_type::DST_UNREACHABLE,
        msg_type::TIME_EXCEEDED,
        msg_type::PARAM_PROBLEM,
        msg_type::SOURCE_QUENCH,
        msg_type::REDIRECT,
    ];
    let hl = ipv4::Packet::new_checked(&sent.packet[..])
        .ok()?
        .header_len();
    let quoted = (hl + 8 + usize::from(b(2) % 64)).min(sent.packet.len());
    let mut m = vec![
        types[usize::from(b(0)) % types.len()],
        b(1),
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    m.extend_from_slice(sent.packet.get(..quoted)?);
    let mut p = crate::seeds::ip_packet(ROUTER, PUBLIC, protocol::ICMP, &m);
    fill_checksums(&mut p);
    Some(p)
}

pub(super) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
