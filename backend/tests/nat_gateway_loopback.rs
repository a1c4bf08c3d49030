//! NAT through a real `VmPort` (issue #9, vnpd side): a guest (the test vhost-user frontend)
//! sends to outside addresses; a plain UDP socket on loopback plays the gateway, checking the
//! gateway-scoped token with the gateway's secret and answering with tokens over the OUTSIDE
//! wildcard, as `docs/protocol.md` specifies. The registry's part (one grant per VM and
//! gateway) is played by a control plane that mints what the registry mints; the gateway
//! daemon itself is tested in `tests/tests/gateway.rs`.

mod dataplane_common;
// Shared fixture: this test uses part of it.
#[allow(unused_imports)]
mod dataplane_frontend;

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use dataplane_common::*;
use dataplane_frontend::{ethernet, TestFrontend, VNET_HDR};
use vnp_protocol::token::{mint, Expiry, TokenFields, VmSecret};
use vnp_protocol::wire::icmpv4::{self, msg_type, CODE_FRAG_NEEDED};
use vnp_protocol::wire::ipv4::{self, protocol, Repr, DEFAULT_TTL};
use vnp_protocol::wire::tcp::{self, flags};
use vnp_protocol::wire::{udp, VnpDatagram};
use vnpd::datapath::{ControlPlane, PeerToken, VmPort};
use vnpd::edge::ROUTER_MAC;
use vnpd::metrics::counters::DropReason;
use vnpd::nat::{PortBlock, OUTSIDE};

const T: Duration = Duration::from_secs(5);
const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const BLOCK: (u16, u16) = (40000, 40003);

/// The registry's part: every request of the VM for an outside destination is answered with
/// the one (VM, gateway) grant, minted with the gateway's secret over `0.0.0.0`.
struct GatewayGrants {
    tx: Mutex<Sender<Ipv4Addr>>,
    requests: Arc<AtomicUsize>,
    asked_for: Arc<Mutex<Vec<Ipv4Addr>>>,
}

impl GatewayGrants {
    fn new(port: Weak<VmPort>, vm_ip: Ipv4Addr, gw: SocketAddrV4, gw_secret: VmSecret) -> Self {
        let (tx, rx) = mpsc::channel::<Ipv4Addr>();
        let asked_for: Arc<Mutex<Vec<Ipv4Addr>>> = Arc::default();
        let asked = asked_for.clone();
        std::thread::spawn(move || {
            while let Ok(dst) = rx.recv() {
                asked.lock().unwrap().push(dst);
                let Some(port) = port.upgrade() else { return };
                let expiry = Expiry(now() + 600);
                let fields = TokenFields {
                    src_host: *port.udp_addr().ip(),
                    src_port: port.udp_addr().port(),
                    src_vm: vm_ip,
                    dst_host: *gw.ip(),
                    dst_port: gw.port(),
                    dst_vm: OUTSIDE,
                    network_id: NETWORK,
                    expiry,
                };
                let token = PeerToken {
                    dst_host: *gw.ip(),
                    dst_port: gw.port(),
                    token: mint(&gw_secret, &fields),
                    expiry,
                };
                port.install_token(dst, token);
            }
        });
        Self {
            tx: Mutex::new(tx),
            requests: Arc::default(),
            asked_for,
        }
    }
}

/// The control plane handed to the port before the port exists: forwards to the grants.
#[derive(Default)]
struct LateControl {
    grants: Mutex<Option<Arc<GatewayGrants>>>,
}

impl ControlPlane for LateControl {
    fn request_token(&self, _src_vm: &str, dst: Ipv4Addr) {
        if let Some(g) = self.grants.lock().unwrap().as_ref() {
            g.requests.fetch_add(1, Ordering::Relaxed);
            let _ = g.tx.lock().unwrap().send(dst);
        }
    }
}

struct Setup {
    port: Arc<VmPort>,
    vm_ip: Ipv4Addr,
    vm_mac: [u8; 6],
    vm_secret: VmSecret,
    guest: TestFrontend,
    gateway: UdpSocket,
    gw_addr: SocketAddrV4,
    gw_secret: VmSecret,
    grants: Arc<GatewayGrants>,
}

fn setup(tag: &str) -> Setup {
    let control = Arc::new(LateControl::default());
    let (att, vm_secret) = vm(tag, 2, 0x21, 1);
    let (vm_ip, vm_mac, socket) = (att.vm_ip, att.mac, att.socket_path.clone());
    let port = Arc::new(VmPort::start(att, control.clone()).expect("start port"));
    port.set_nat_blocks(&[PortBlock::new(BLOCK.0, BLOCK.1).unwrap()]);
    let (gateway, gw_addr) = raw_peer();
    gateway.set_read_timeout(Some(T)).unwrap();
    let gw_secret = VmSecret::from_bytes([0x99; 32]);
    let grants = Arc::new(GatewayGrants::new(
        Arc::downgrade(&port),
        vm_ip,
        gw_addr,
        VmSecret::from_bytes(*gw_secret.as_bytes()),
    ));
    *control.grants.lock().unwrap() = Some(grants.clone());
    let mut guest = TestFrontend::connect(&socket, 1);
    guest.post_rx(0, 32, 2048);
    Setup {
        port,
        vm_ip,
        vm_mac,
        vm_secret,
        guest,
        gateway,
        gw_addr,
        gw_secret,
        grants,
    }
}

impl Setup {
    fn send(&mut self, ip_packet: &[u8]) {
        let frame = ethernet(ROUTER_MAC, self.vm_mac, 0x0800, ip_packet);
        self.guest.send(0, &frame);
    }

    /// The next datagram at the gateway: checks its token with the gateway's secret (OUTSIDE
    /// as the destination VM) and returns the inner packet.
    fn at_gateway(&self) -> Vec<u8> {
        let mut buf = [0u8; 2048];
        let (n, from) = self
            .gateway
            .recv_from(&mut buf)
            .expect("a datagram at the gateway");
        let std::net::SocketAddr::V4(from) = from else {
            unreachable!()
        };
        let d = VnpDatagram::parse(&buf[..n]).expect("VNP");
        let fields = TokenFields {
            src_host: *from.ip(),
            src_port: from.port(),
            src_vm: self.vm_ip,
            dst_host: *self.gw_addr.ip(),
            dst_port: self.gw_addr.port(),
            dst_vm: OUTSIDE,
            network_id: NETWORK,
            expiry: d.header.expiry,
        };
        assert_eq!(
            d.header.token,
            mint(&self.gw_secret, &fields),
            "gateway-scoped token"
        );
        d.inner.to_vec()
    }

    /// Sends `inner` from the gateway to the VM with a gateway -> VM token (OUTSIDE source).
    fn gateway_sends(&self, inner: &[u8]) {
        let to = self.port.udp_addr();
        let e = Expiry(now() + 300);
        let token = token_for(
            self.gw_addr,
            OUTSIDE,
            to,
            self.vm_ip,
            &self.vm_secret,
            NETWORK,
            e,
        );
        let d = datagram(NETWORK, token, e, inner, None);
        self.gateway.send_to(&d, to).unwrap();
    }

    /// The IPv4 packets the guest received within `timeout` (at least `min`).
    fn guest_got(&mut self, min: usize, timeout: Duration) -> Vec<Vec<u8>> {
        self.guest
            .recv(0, min, timeout)
            .into_iter()
            .map(|(_, _, data)| {
                // Without the Ethernet padding of short frames.
                let ip = &data[VNET_HDR + 14..];
                ip[..ipv4::Packet::new_checked(ip).unwrap().total_len()].to_vec()
            })
            .collect()
    }

    fn drops(&self, r: DropReason) -> u64 {
        self.port.counters().snapshot().drops(r)
    }
}

fn ip(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20 + l4.len()];
    p[20..].copy_from_slice(l4);
    Repr {
        src_addr: src,
        dst_addr: dst,
        protocol: proto,
        payload_len: l4.len(),
        ttl: DEFAULT_TTL,
    }
    .emit(&mut ipv4::Packet::new_unchecked(&mut p[..]));
    p
}

fn udp_packet(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8 + data.len()];
    let mut v = udp::Packet::new_unchecked(&mut u[..]);
    v.set_src_port(sport);
    v.set_dst_port(dport);
    v.set_len((8 + data.len()) as u16);
    v.payload_mut().copy_from_slice(data);
    v.fill_checksum(src, dst);
    ip(src, dst, protocol::UDP, &u)
}

fn tcp_packet(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, fl: u8) -> Vec<u8> {
    let mut t = [0u8; 20];
    let mut v = tcp::Packet::new_unchecked(&mut t[..]);
    v.set_src_port(sport);
    v.set_dst_port(dport);
    v.set_seq_number(7);
    v.set_header_len(20);
    v.set_flags(fl);
    v.set_window_len(1000);
    v.fill_checksum(src, dst);
    ip(src, dst, protocol::TCP, &t)
}

fn udp_of(p: &[u8]) -> udp::Packet<&[u8]> {
    udp::Packet::new_checked(&p[20..]).unwrap()
}

fn tcp_of(p: &[u8]) -> tcp::Packet<&[u8]> {
    tcp::Packet::new_checked(&p[20..]).unwrap()
}

fn in_block(p: u16) -> bool {
    (BLOCK.0..=BLOCK.1).contains(&p)
}

#[test]
fn outbound_flows_are_mapped_and_replies_come_back() {
    let mut s = setup("nat-udp");
    s.send(&udp_packet(s.vm_ip, 5353, SERVER, 53, b"query"));
    let out = s.at_gateway();
    let mapped = udp_of(&out).src_port();
    assert!(in_block(mapped), "port {mapped} in the VM's block");
    assert!(udp_of(&out).verify_checksum(s.vm_ip, SERVER));
    assert_eq!(udp_of(&out).payload(), b"query");
    // A second outside peer: no further registry request.
    s.send(&udp_packet(s.vm_ip, 5353, OTHER, 53, b"query2"));
    let out2 = s.at_gateway();
    assert!(in_block(udp_of(&out2).src_port()));
    assert_ne!(udp_of(&out2).src_port(), mapped);
    assert_eq!(s.grants.requests.load(Ordering::Relaxed), 1);
    assert_eq!(*s.grants.asked_for.lock().unwrap(), vec![OUTSIDE]);

    // The reply: only the destination address was put back by the gateway.
    s.gateway_sends(&udp_packet(SERVER, 53, s.vm_ip, mapped, b"answer"));
    let got = s.guest_got(1, T);
    assert_eq!(got.len(), 1);
    assert_eq!(udp_of(&got[0]).dst_port(), 5353);
    assert!(udp_of(&got[0]).verify_checksum(SERVER, s.vm_ip));
    assert_eq!(udp_of(&got[0]).payload(), b"answer");

    // A reply to a port nobody holds, or from another remote: dropped and counted.
    let unused = (BLOCK.0..=BLOCK.1)
        .find(|p| *p != mapped && *p != udp_of(&out2).src_port())
        .unwrap();
    s.gateway_sends(&udp_packet(SERVER, 53, s.vm_ip, unused, b"stray"));
    s.gateway_sends(&udp_packet(OTHER, 9, s.vm_ip, mapped, b"stray"));
    wait_for("two unknown-mapping drops", T, || {
        s.drops(DropReason::RxNatUnknownMapping) == 2
    });
    assert!(s.guest_got(0, Duration::from_millis(200)).is_empty());

    // An ICMP "fragmentation needed" about the flow reaches the guest translated back.
    let mut seen_outside = out.clone();
    let mut seen = ipv4::Packet::new_unchecked(&mut seen_outside[..]);
    seen.set_src_addr(Ipv4Addr::new(192, 0, 2, 9));
    seen.fill_checksum();
    let mut m = vec![0u8; 8 + 28];
    let mut icmp = icmpv4::Packet::new_unchecked(&mut m[..]);
    icmp.set_msg_type(msg_type::DST_UNREACHABLE);
    icmp.set_msg_code(CODE_FRAG_NEEDED);
    icmp.set_next_hop_mtu(1280);
    icmp.data_mut().copy_from_slice(&seen_outside[..28]);
    icmp.fill_checksum();
    s.gateway_sends(&ip(
        Ipv4Addr::new(192, 0, 2, 77),
        s.vm_ip,
        protocol::ICMP,
        &m,
    ));
    let got = s.guest_got(1, T);
    let icmp = icmpv4::Packet::new_checked(&got[0][20..]).unwrap();
    assert!(icmp.verify_checksum());
    assert_eq!(icmp.next_hop_mtu(), 1280);
    let quoted = ipv4::Packet::new_checked(icmp.data()).unwrap();
    assert_eq!(quoted.src_addr(), s.vm_ip);
    assert!(quoted.verify_checksum());
    assert_eq!(
        udp::Packet::new_unchecked(quoted.payload()).src_port(),
        5353
    );

    let (table, now) = s.port.nat_snapshot();
    assert_eq!(table.flows(now).len(), 2);
    // What `vnpctl vnpd nat` shows.
    let info = vnpd::admin::manager::to_nat_info("vm-nat-udp", &table, now);
    assert_eq!(info.blocks, vec![BLOCK]);
    assert!(info
        .flows
        .iter()
        .all(|f| f.proto == "udp" && f.local_port == 5353 && f.mapped.is_some_and(in_block)));
    assert_eq!(s.port.counters().snapshot().nat.mapped_flows[1], 2);
}

#[test]
fn exhaustion_is_answered_and_existing_flows_carry_on() {
    let mut s = setup("nat-full");
    let mut mapped = Vec::new();
    for i in 0..4u16 {
        s.send(&tcp_packet(s.vm_ip, 33000 + i, SERVER, 80, flags::SYN));
        let out = s.at_gateway();
        assert!(tcp_of(&out).verify_checksum(s.vm_ip, SERVER));
        mapped.push(tcp_of(&out).src_port());
    }
    mapped.sort();
    assert_eq!(mapped, vec![40000, 40001, 40002, 40003]);
    // The fifth SYN: no port left. The guest gets a RST at once, nothing leaves.
    s.send(&tcp_packet(s.vm_ip, 34000, SERVER, 80, flags::SYN));
    let got = s.guest_got(1, T);
    assert_eq!(got.len(), 1, "an answer for the guest");
    let rst = tcp_of(&got[0]);
    assert_eq!(rst.flags(), flags::RST | flags::ACK);
    assert_eq!((rst.src_port(), rst.dst_port()), (80, 34000));
    assert_eq!(rst.ack_number(), 8);
    assert!(rst.verify_checksum(SERVER, s.vm_ip));
    assert_eq!(s.drops(DropReason::TxNatPortsExhausted), 1);
    // Existing flows are untouched: the first flow's next segment leaves on its port.
    s.send(&tcp_packet(s.vm_ip, 33000, SERVER, 80, flags::ACK));
    let out = s.at_gateway();
    assert!(in_block(tcp_of(&out).src_port()));
    assert_eq!(tcp_of(&out).flags(), flags::ACK);
    // UDP gets ICMP "administratively prohibited" once its ports are gone too.
    for i in 0..4u16 {
        s.send(&udp_packet(s.vm_ip, 6000 + i, SERVER, 53, b"q"));
        s.at_gateway();
    }
    s.send(&udp_packet(s.vm_ip, 7000, SERVER, 53, b"q"));
    let got = s.guest_got(1, T);
    let icmp = icmpv4::Packet::new_checked(&got[0][20..]).unwrap();
    assert_eq!((icmp.msg_type(), icmp.msg_code()), (3, 13));
    assert_eq!(s.drops(DropReason::TxNatPortsExhausted), 2);
}

#[test]
fn port_forwarded_flows_are_not_remapped() {
    let mut s = setup("nat-fwd");
    let client = Ipv4Addr::new(203, 0, 113, 9);
    s.gateway_sends(&tcp_packet(client, 51000, s.vm_ip, 8080, flags::SYN));
    let got = s.guest_got(1, T);
    assert_eq!(tcp_of(&got[0]).dst_port(), 8080);
    assert_eq!(tcp_of(&got[0]).src_port(), 51000);
    s.send(&tcp_packet(
        s.vm_ip,
        8080,
        client,
        51000,
        flags::SYN | flags::ACK,
    ));
    let out = s.at_gateway();
    assert_eq!(tcp_of(&out).src_port(), 8080, "a reply leaves unchanged");
    assert!(tcp_of(&out).verify_checksum(s.vm_ip, client));
    // Without a prior inbound SYN, the guest cannot send from 8080 past NAT.
    s.send(&tcp_packet(s.vm_ip, 8080, client, 51001, flags::ACK));
    wait_for("a no-flow drop", T, || {
        s.drops(DropReason::TxNatNoFlow) == 1
    });
    assert_eq!(s.port.counters().snapshot().nat.inbound_flows, 1);
}
