//! The load-balancing part of the gateway target (`gateway.rs`): the services of the
//! configuration (`vnp_gateway::services`: `ServiceTable::build` with a health view from the
//! input, `inbound` through `vnp_lb`'s flow table and Maglev table, `outbound` for the VMs'
//! replies, `probe_out` and `is_probe_answer` for health checks), driven as the daemon's data
//! plane drives them: a public packet is first offered to the probe and service paths, a VM's
//! packet first to the probe-answer and service-reply paths; only what they leave goes to NAT
//! and forwarding. The clock (milliseconds) is advanced by the input; the flow table is swept
//! once per clock second, as `dataplane.rs` does, and holds [`FLOW_CAPACITY`] flows, so that a
//! full table is reachable.
//!
//! Invariants asserted (a shadow of what the flow table must remember is kept):
//! - two builds of the same configuration and health view give the same Maglev tables (every
//!   gateway of an address must choose alike); a table holds exactly the pool's members with a
//!   weight that are not down;
//! - a packet placed on a new flow goes to the Maglev table's choice for its key, a member in
//!   the table; a packet of a remembered, live flow whose member is not down stays on that
//!   member; only the destination address and port (and the checksums, which verify after when
//!   they did before) change, to the member's address and the service's VM port;
//! - "no backend" only when the service's table is empty; "not remembered" only when the flow
//!   table is full;
//! - a VM's packet from a service's VM port (no forwarding rule on it) leaves from the public
//!   address and the service's public port, nothing else but the checksums changed; the reply
//!   to a balanced packet always does;
//! - a probe answer is TCP from a check port of a VM to a probe source; a probe goes only to
//!   a VM of the network, only as TCP.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use vnp_gateway::services::{self, Placed, ServiceTable};
use vnp_gateway::table::{NatTable, VmIndex};
use vnp_gateway::DropReason;
use vnp_lb::{FlowKey, FlowTable, FlowTimeouts, Proto};
use vnp_protocol::wire::ipv4::{self, protocol};
use vnp_registry_client::api::{
    GatewayConfig, GatewayService, HealthCheckSpec, HttpCheck, L4Proto, ResolvedMember, Service,
};

use crate::nat::l4_valid;

/// Op bit: with op 0, a new health view and a clock step instead of a datagram; with op 2, the
/// VM's reply to the last balanced packet; with op 1, the packet is made a health check from
/// the gateway's own kernel.
pub const LB_OP: u8 = 0x20;
/// Flows the target's flow table remembers.
pub const FLOW_CAPACITY: usize = 8;
/// The addresses health checks leave from (the gateways' underlay addresses).
pub const PROBE_SOURCES: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 51, 100, 9), crate::gateway::LOCAL_IP];
/// Table sizes a custom configuration picks from: some refused (too small, not prime).
const SIZES: [u32; 8] = [0, 1, 4, 7, 13, 31, 251, 1021];

/// What the flow table must remember about a flow.
#[derive(Debug, Clone)]
struct Remembered {
    member: String,
    last_ms: u64,
    closing: bool,
}

pub(crate) struct Lb {
    services: ServiceTable,
    /// (protocol number, VM port, public port) of every configured service on the gateway's
    /// address, built or skipped: replies of a skipped service's flows still leave as its.
    configured: Vec<(u8, u16, u16)>,
    flows: FlowTable,
    now_ms: u64,
    swept_ms: u64,
    /// (service, VM) pairs health checks took out.
    down: Vec<(String, String)>,
    shadow: HashMap<FlowKey, Remembered>,
    /// The last balanced packet as its VM got it, and the VM.
    last_placed: Option<(Vec<u8>, VmIndex)>,
}

impl Lb {
    pub(crate) fn new(cfg: &GatewayConfig, nat: &NatTable) -> Self {
        let mut lb = Lb {
            services: ServiceTable::default(),
            configured: cfg
                .services
                .iter()
                .filter(|s| s.service.public_addr == nat.public_addr)
                .map(|s| {
                    let proto = match s.service.proto {
                        L4Proto::Tcp => protocol::TCP,
                        L4Proto::Udp => protocol::UDP,
                    };
                    (proto, s.service.vm_port, s.service.public_port)
                })
                .collect(),
            flows: FlowTable::new(FLOW_CAPACITY, FlowTimeouts::default()),
            now_ms: 1_000_000,
            swept_ms: 1_000_000,
            down: Vec::new(),
            shadow: HashMap::new(),
            last_placed: None,
        };
        lb.rebuild(cfg, nat);
        lb
    }

    fn is_down(&self, service: &str, vm: &str) -> bool {
        self.down.iter().any(|(s, v)| s == service && v == vm)
    }

    /// `lb.rs`: the tables from the configuration and the health view, checked.
    fn rebuild(&mut self, cfg: &GatewayConfig, nat: &NatTable) {
        let (built, _skipped) = ServiceTable::build(cfg, nat, |s, vm| self.is_down(s, vm));
        let (again, _) = ServiceTable::build(cfg, nat, |s, vm| self.is_down(s, vm));
        for (a, b) in built.services.iter().zip(&again.services) {
            let owners = |t: &vnp_lb::Table| {
                (0..t.size())
                    .map(|i| t.slot_owner(i).map(str::to_string))
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                owners(&a.table),
                owners(&b.table),
                "Maglev not deterministic"
            );
            let mut want: Vec<&str> = a
                .pool
                .iter()
                .filter(|(vm, _, w)| *w > 0 && !self.is_down(&a.id, vm))
                .map(|(vm, _, _)| vm.as_str())
                .collect();
            want.sort_unstable();
            let members: Vec<&str> = a.table.members().iter().map(String::as_str).collect();
            assert_eq!(members, want, "table members of {}", a.id);
        }
        self.services = built;
    }

    /// A health view and a clock step: `[dt] [down mask per service]...` (bit i: the pool's
    /// i-th member is down).
    pub(crate) fn health(&mut self, cfg: &GatewayConfig, nat: &NatTable, bytes: &[u8]) {
        let dt = bytes.first().copied().unwrap_or(0);
        self.now_ms += match dt {
            0..=199 => u64::from(dt) * 100,
            _ => u64::from(dt - 199) * 10_000,
        };
        if self.now_ms >= self.swept_ms + 1000 {
            self.flows.expire(self.now_ms);
            self.swept_ms = self.now_ms;
        }
        self.down.clear();
        for (s, mask) in cfg.services.iter().zip(bytes.iter().skip(1)) {
            for (i, m) in s.pool.iter().enumerate().take(8) {
                if mask & (1 << i) != 0 {
                    self.down.push((s.service.id.clone(), m.vm.clone()));
                }
            }
        }
        self.rebuild(cfg, nat);
    }

    /// `dataplane::from_public` before NAT: a probe from the gateway's own kernel, or a packet
    /// for a service. `None`: neither (NAT and forwarding go on).
    pub(crate) fn public(&mut self, nat: &NatTable, packet: &[u8]) -> Option<()> {
        if let Some(probe) = services::probe_out(nat, crate::gateway::LOCAL_IP, packet) {
            let ip = ipv4::Packet::new_unchecked(packet);
            match probe {
                Ok(vm) => {
                    assert_eq!(ip.protocol(), protocol::TCP, "a probe is TCP");
                    assert_eq!(nat.vms[vm].ip, ip.dst_addr(), "probe to its VM");
                }
                Err(DropReason::UnknownVm) => assert!(nat.vm_by_ip(ip.dst_addr()).is_none()),
                Err(_) => {}
            }
            return Some(());
        }
        let key = flow_key(packet)?;
        let service = self
            .services
            .service_at(key.proto.number(), key.service_port);
        let sticky = service.and_then(|s| {
            let r = self.shadow.get(&key)?;
            let live = self.now_ms < r.last_ms + timeout(key.proto, r.closing);
            (live && !self.is_down(&s.id, &r.member)).then(|| r.member.clone())
        });
        let mut after = packet.to_vec();
        let result = services::inbound(
            &self.services,
            nat,
            &mut self.flows,
            &mut after,
            self.now_ms,
        )?;
        match result {
            Ok(placed) => self.check_placed(nat, key, sticky, &placed, packet, &after),
            Err(DropReason::NoBackend) => {
                let s = service.expect("no backend of a service");
                assert!(s.table.members().is_empty(), "no backend with members");
                self.shadow.remove(&key);
            }
            Err(_) => {}
        }
        Some(())
    }

    fn check_placed(
        &mut self,
        nat: &NatTable,
        key: FlowKey,
        sticky: Option<String>,
        placed: &Placed,
        before: &[u8],
        after: &[u8],
    ) {
        let svc = &self.services.services[placed.service];
        assert_eq!(
            (svc.proto, svc.public_port),
            (key.proto, key.service_port),
            "service"
        );
        let member = nat.vms[placed.vm].id.clone();
        assert!(
            svc.pool.iter().any(|(vm, _, _)| *vm == member),
            "not in the pool"
        );
        if let Some(m) = &sticky {
            assert!(!placed.new_flow, "a live flow re-placed");
            assert_eq!(&member, m, "an established flow moved");
        }
        if placed.new_flow {
            assert!(
                svc.in_table(&member),
                "new flow on a member not in the table"
            );
            assert_eq!(
                svc.table.lookup(&key),
                Some(member.as_str()),
                "Maglev choice"
            );
        }
        if placed.unremembered {
            assert!(
                self.flows.len() >= FLOW_CAPACITY,
                "unremembered, table not full"
            );
            self.shadow.remove(&key);
        } else {
            assert_eq!(self.flows.get(&key), Some(member.as_str()), "remembered");
            let fin = closing(before);
            let closing =
                fin || (!placed.new_flow && self.shadow.get(&key).is_some_and(|r| r.closing));
            self.shadow.insert(
                key,
                Remembered {
                    member,
                    last_ms: self.now_ms,
                    closing,
                },
            );
        }
        let vm_ip = nat.vms[placed.vm].ip;
        check_rewrite(before, after, false, vm_ip, svc.vm_port);
        self.last_placed = Some((after.to_vec(), placed.vm));
    }

    /// `dataplane::from_vms` before NAT, for an accepted inner packet: a probe answer or a
    /// service's reply. `None`: neither. `reply`: it answers the last balanced packet.
    pub(crate) fn vm_packet(&self, nat: &NatTable, packet: &[u8], reply: bool) -> Option<()> {
        if services::is_probe_answer(&self.services, nat, packet) {
            let ip = ipv4::Packet::new_unchecked(packet);
            assert_eq!(ip.protocol(), protocol::TCP);
            assert!(self.services.probe_sources.contains(&ip.dst_addr()));
            assert!(nat.vm_by_ip(ip.src_addr()).is_some());
            return Some(());
        }
        let mut after = packet.to_vec();
        let Some(result) = services::outbound(&self.services, nat, &mut after) else {
            // A forwarding rule on the service's VM port keeps that port's replies
            // (`ServiceTable::build`): they leave through the rule.
            if reply {
                let ip = ipv4::Packet::new_unchecked(packet);
                let ruled = nat
                    .vm_by_ip(ip.src_addr())
                    .and_then(|vm| nat.forward_out(vm, ip.protocol(), port_of(packet, 0)));
                assert!(
                    ruled.is_some(),
                    "the reply to a balanced packet was not a service's"
                );
            }
            return None;
        };
        let vm = result.expect("services::outbound refuses nothing");
        let ip = ipv4::Packet::new_unchecked(packet);
        assert_eq!(nat.vms[vm].ip, ip.src_addr(), "reply from its VM");
        let (proto, sport) = (ip.protocol(), port_of(packet, 0));
        let public = self
            .configured
            .iter()
            .find(|(p, vm_port, _)| *p == proto && *vm_port == sport)
            .filter(|_| nat.forward_out(vm, proto, sport).is_none())
            .map(|(_, _, public)| *public)
            .expect("a service on that VM port");
        check_rewrite(packet, &after, true, crate::gateway::PUBLIC, public);
        Some(())
    }

    /// The VM's reply to the last balanced packet (`bytes`: TCP flags, payload) as an inner
    /// packet, and its VM.
    pub(crate) fn reply_to_last(&self, bytes: &[u8]) -> Option<(Vec<u8>, VmIndex)> {
        let (p, vm) = self.last_placed.as_ref()?;
        let ip = ipv4::Packet::new_checked(&p[..]).ok()?;
        let (hl, proto) = (ip.header_len(), ip.protocol());
        let n = if proto == protocol::TCP { 20 } else { 8 };
        let mut head = p.get(hl..hl + n)?.to_vec();
        let s = [head[0], head[1]];
        head.copy_within(2..4, 0);
        head[2..4].copy_from_slice(&s);
        if proto == protocol::TCP {
            head[12] = 0x50;
            head[13] = bytes.first().copied().unwrap_or(0x12);
        }
        head.extend_from_slice(bytes.get(1..).unwrap_or(&[]));
        let mut out = crate::seeds::ip_packet(ip.dst_addr(), ip.src_addr(), proto, &head);
        crate::nat::fill_checksums(&mut out);
        Some((out, *vm))
    }
}

/// The flow key of a public TCP/UDP packet to the public address (`None`: not one, or too
/// short for its ports).
fn flow_key(p: &[u8]) -> Option<FlowKey> {
    let ip = ipv4::Packet::new_checked(p).ok()?;
    let proto = match ip.protocol() {
        protocol::TCP => Proto::Tcp,
        protocol::UDP => Proto::Udp,
        _ => return None,
    };
    let l4 = p.get(ip.header_len()..ip.header_len() + 4)?;
    Some(FlowKey {
        proto,
        client: ip.src_addr(),
        client_port: u16::from_be_bytes([l4[0], l4[1]]),
        service: ip.dst_addr(),
        service_port: u16::from_be_bytes([l4[2], l4[3]]),
    })
}

fn timeout(proto: Proto, closing: bool) -> u64 {
    let t = FlowTimeouts::default();
    match (proto, closing) {
        (Proto::Udp, _) => t.udp_ms,
        (Proto::Tcp, true) => t.tcp_closing_ms,
        (Proto::Tcp, false) => t.tcp_ms,
    }
}

/// TCP FIN or RST.
fn closing(p: &[u8]) -> bool {
    let ip = ipv4::Packet::new_unchecked(p);
    ip.protocol() == protocol::TCP && p.get(ip.header_len() + 13).is_some_and(|f| f & 0x05 != 0)
}

/// The L4 port at `at` (0 source, 2 destination) of a packet.
fn port_of(p: &[u8], at: usize) -> u16 {
    let hl = ipv4::Packet::new_unchecked(p).header_len();
    u16::from_be_bytes([p[hl + at], p[hl + at + 1]])
}

/// Only the source (`source`) or destination address and port changed, to `addr` and `port`,
/// besides the checksums, which verify after when they did before.
fn check_rewrite(before: &[u8], after: &[u8], source: bool, addr: Ipv4Addr, port: u16) {
    let ip = ipv4::Packet::new_unchecked(before);
    let (hl, proto) = (ip.header_len(), ip.protocol());
    let out = ipv4::Packet::new_unchecked(after);
    let (addr_at, port_at) = if source { (12, 0) } else { (16, 2) };
    let got = if source {
        out.src_addr()
    } else {
        out.dst_addr()
    };
    assert_eq!((got, port_of(after, port_at)), (addr, port), "rewritten to");
    let csum = if proto == protocol::TCP { 16 } else { 6 };
    for (i, (a, b)) in before.iter().zip(after).enumerate() {
        let ok = matches!(i, 10 | 11)
            || (addr_at..addr_at + 4).contains(&i)
            || i.checked_sub(hl)
                .is_some_and(|l| [port_at, port_at + 1, csum, csum + 1].contains(&l));
        assert!(a == b || ok, "balanced rewrite changed byte {i}");
    }
    assert!(
        out.verify_checksum() || !ip.verify_checksum(),
        "IPv4 checksum"
    );
    if l4_valid(before) == Some(true) {
        assert_eq!(l4_valid(after), Some(true), "balanced L4 checksum");
    }
}

/// A service of the configuration: `public_port/proto -> vm_port` over `pool` (VM index,
/// weight), its table size and health check.
pub(crate) fn service(
    cfg: &GatewayConfig,
    id: &str,
    proto: L4Proto,
    ports: (u16, u16),
    pool: &[(usize, u32)],
    table_size: u32,
    health: HealthCheckSpec,
) -> GatewayService {
    let members = pool
        .iter()
        .filter_map(|(i, w)| {
            let v = cfg.vms.get(*i)?;
            Some(ResolvedMember {
                vm: v.id.clone(),
                ip: v.ip,
                weight: *w,
            })
        })
        .collect();
    GatewayService {
        service: Service {
            id: id.into(),
            network: "n1".into(),
            public_addr: crate::gateway::PUBLIC,
            public_port: ports.0,
            proto,
            vm_port: ports.1,
            members: Vec::new(),
            health,
            table_size,
        },
        pool: members,
    }
}

/// Services from the bytes after a custom configuration's rules: `[count]
/// ([proto] [public port u16] [VM port u16] [size] [http] [check port?] [u16] [members]
/// ([VM] [weight])*)*`.
pub(crate) fn custom_services(
    cfg: &GatewayConfig,
    next: &mut impl FnMut() -> u8,
) -> Vec<GatewayService> {
    let vms = cfg.vms.len();
    (0..next() % 3)
        .map(|i| {
            let proto = if next() & 1 == 0 {
                L4Proto::Tcp
            } else {
                L4Proto::Udp
            };
            let public = u16::from_be_bytes([next(), next()]);
            let vm_port = u16::from_be_bytes([next(), next()]);
            let size = SIZES[usize::from(next() % 8)];
            let http = (next() & 1 == 1).then(|| HttpCheck {
                path: "/health".into(),
                expect_status: 200,
            });
            let check_port = (next() & 1 == 1).then(|| u16::from_be_bytes([next(), next()]));
            let pool: Vec<(usize, u32)> = (0..next() % 5)
                .map(|_| (usize::from(next()) % vms, u32::from(next() % 4)))
                .collect();
            let health = HealthCheckSpec {
                http,
                port: check_port,
                ..HealthCheckSpec::default()
            };
            service(
                cfg,
                &format!("s{i}"),
                proto,
                (public, vm_port),
                &pool,
                size,
                health,
            )
        })
        .collect()
}
