//! Seed inputs for each target: well-formed examples of what the target parses, written by
//! `cargo run -p vnp-fuzz --bin vnp-fuzz-seeds -- DIR` as the starting corpus of a campaign.
//! Well-formed seeds let the fuzzer start from the deep paths and mutate outwards.

use std::net::Ipv4Addr;

use vnp_protocol::token::{Expiry, Token};
use vnp_protocol::wire::options::{EndpointMoved, ReturnToken};
use vnp_protocol::wire::{ethernet, icmpv4, ipv4, tcp, udp, VnpRepr};

/// `(target, file name, bytes)` for every seed.
pub fn all() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| {
        out.push((target, name.to_string(), bytes));
    };
    for (name, bytes) in vnp_seeds() {
        add("vnp_datagram", &name, bytes);
    }
    for (name, frame) in frames() {
        for mode in [0u8, 1, 2] {
            add(
                "packet_views",
                &format!("{name}-{mode}"),
                with_mode(mode, &frame),
            );
        }
        for mode in [0u8, 5, 6, 7, 12, 13] {
            add("edge", &format!("{name}-{mode}"), with_mode(mode, &frame));
        }
    }
    for (i, text) in registry_seeds().iter().enumerate() {
        add(
            "registry_requests",
            &format!("seq-{i}"),
            text.as_bytes().to_vec(),
        );
    }
    for (name, bytes) in crate::metadata_http::seeds() {
        add("metadata_http", &name, bytes);
    }
    for (i, text) in admin_seeds().iter().enumerate() {
        add(
            "admin_protocol",
            &format!("admin-{i}"),
            text.as_bytes().to_vec(),
        );
    }
    for (name, bytes) in chain_seeds() {
        add("descriptor_chain", &name, bytes);
    }
    for (name, bytes) in crate::nat::seeds() {
        add("nat", &name, bytes);
    }
    for (name, bytes) in crate::gateway::seeds() {
        add("gateway", &name, bytes);
    }
    for (name, bytes) in crate::migrate_state::seeds() {
        add("migrate_state", &name, bytes);
    }
    out
}

fn with_mode(mode: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(bytes);
    v
}

/// An IPv4 packet `src -> dst` of protocol `proto` with `payload`.
pub(crate) fn ip_packet(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; ipv4::MIN_HEADER_LEN + payload.len()];
    p[ipv4::MIN_HEADER_LEN..].copy_from_slice(payload);
    let repr = ipv4::Repr {
        src_addr: src,
        dst_addr: dst,
        protocol: proto,
        payload_len: payload.len(),
        ttl: 64,
    };
    repr.emit(&mut ipv4::Packet::new_unchecked(&mut p[..]));
    p
}

fn vnp_seeds() -> Vec<(String, Vec<u8>)> {
    use crate::vnp::{FIX_FLAGS, FIX_HEADER, FORGE_TOKEN, NETWORK_ID, NOW, VM_IP};
    let src_vm = Ipv4Addr::new(10, 0, 0, 2);
    let inner = ip_packet(
        src_vm,
        VM_IP,
        ipv4::protocol::UDP,
        &[0, 53, 0, 53, 0, 12, 0, 0, 1, 2, 3, 4],
    );
    let header = |has_options| VnpRepr {
        network_id: NETWORK_ID,
        token: Token::from_bytes([0; 8]),
        expiry: Expiry(NOW + 600),
        has_options,
    };
    let rt = ReturnToken {
        token: Token::from_bytes([9; 8]),
        expiry: Expiry(NOW + 300),
    };
    let mut rt_bytes = [0u8; ReturnToken::WIRE_LEN];
    rt.emit(&mut rt_bytes).expect("fits");
    let moved = EndpointMoved { generation: 3 };
    let mut moved_bytes = [0u8; 2 + EndpointMoved::VALUE_LEN];
    moved.emit(&mut moved_bytes).expect("fits");
    let trailers: [(&str, Vec<u8>); 5] = [
        ("plain", vec![]),
        ("return-token", rt_bytes.to_vec()),
        ("moved", moved_bytes.to_vec()),
        ("unknown-skippable", vec![0x05, 2, 0xaa, 0xbb]),
        ("must-understand", vec![0x85, 0]),
    ];
    let mut out = Vec::new();
    for (name, trailer) in trailers {
        let mut d = header(!trailer.is_empty()).to_bytes().to_vec();
        d.extend_from_slice(&inner);
        d.extend_from_slice(&trailer);
        for mode in [0, FORGE_TOKEN, FORGE_TOKEN | FIX_HEADER | FIX_FLAGS] {
            out.push((format!("{name}-{mode}"), with_mode(mode, &d)));
        }
    }
    out
}

/// Guest frames: DHCP, ARP, ICMP echo to the router, TCP, UDP, an oversize DF packet.
fn frames() -> Vec<(&'static str, Vec<u8>)> {
    let vm_mac = crate::edge::VM_MAC;
    let router = Ipv4Addr::new(10, 1, 0, 1);
    let vm = Ipv4Addr::new(10, 1, 0, 10);
    let peer = Ipv4Addr::new(10, 1, 0, 2);
    let eth = |dst: [u8; 6], ty: u16, payload: &[u8]| {
        let mut f = ethernet::header(dst, vm_mac, ty).to_vec();
        f.extend_from_slice(payload);
        f
    };
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&vm_mac);
    arp.extend_from_slice(&vm.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&router.octets());
    let mut echo = vec![icmpv4::msg_type::ECHO_REQUEST, 0, 0, 0, 0, 1, 0, 1];
    echo.extend_from_slice(&[0x61; 56]);
    icmpv4::Packet::new_unchecked(&mut echo[..]).fill_checksum();
    let mut syn = vec![0u8; 20];
    {
        let mut t = tcp::Packet::new_unchecked(&mut syn[..]);
        t.set_src_port(40000);
        t.set_dst_port(80);
        t.set_header_len(20);
        t.set_flags(0x02);
        t.set_window_len(65535);
        t.fill_checksum(vm, peer);
    }
    let mut dns = vec![0u8; 8 + 12];
    {
        let mut u = udp::Packet::new_unchecked(&mut dns[..]);
        u.set_src_port(5353);
        u.set_dst_port(53);
        u.set_len(20);
        u.fill_checksum(vm, peer);
    }
    let mut big = ip_packet(vm, peer, ipv4::protocol::UDP, &[0u8; 1600]);
    ipv4::Packet::new_unchecked(&mut big[..]).set_unfragmented(true);
    ipv4::Packet::new_unchecked(&mut big[..]).fill_checksum();
    vec![
        ("dhcp-discover", dhcp_frame(1, &[])),
        (
            "dhcp-request",
            dhcp_frame(3, &[50, 4, 10, 1, 0, 10, 54, 4, 10, 1, 0, 1]),
        ),
        ("dhcp-inform", dhcp_frame(8, &[])),
        ("dhcp-release", dhcp_frame(7, &[])),
        (
            "arp-request",
            eth(ethernet::BROADCAST, ethernet::ethertype::ARP, &arp),
        ),
        (
            "icmp-echo",
            eth(
                vnpd::edge::ROUTER_MAC,
                ethernet::ethertype::IPV4,
                &ip_packet(vm, router, ipv4::protocol::ICMP, &echo),
            ),
        ),
        (
            "tcp-syn",
            eth(
                vnpd::edge::ROUTER_MAC,
                ethernet::ethertype::IPV4,
                &ip_packet(vm, peer, ipv4::protocol::TCP, &syn),
            ),
        ),
        (
            "udp-dns",
            eth(
                vnpd::edge::ROUTER_MAC,
                ethernet::ethertype::IPV4,
                &ip_packet(vm, peer, ipv4::protocol::UDP, &dns),
            ),
        ),
        (
            "oversize-df",
            eth(vnpd::edge::ROUTER_MAC, ethernet::ethertype::IPV4, &big),
        ),
    ]
}

/// A DHCP client frame as udhcpc sends it: broadcast from 0.0.0.0.
fn dhcp_frame(message_type: u8, extra_options: &[u8]) -> Vec<u8> {
    let vm_mac = crate::edge::VM_MAC;
    let mut bootp = vec![0u8; 240];
    bootp[0] = 1;
    bootp[1] = 1;
    bootp[2] = 6;
    bootp[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    bootp[28..34].copy_from_slice(&vm_mac);
    bootp[236..240].copy_from_slice(&[99, 130, 83, 99]);
    bootp.extend_from_slice(&[53, 1, message_type, 55, 5, 1, 3, 6, 12, 26]);
    bootp.extend_from_slice(extra_options);
    bootp.push(255);
    let mut datagram = vec![0u8; udp::HEADER_LEN];
    datagram.extend_from_slice(&bootp);
    {
        let len = datagram.len() as u16;
        let mut u = udp::Packet::new_unchecked(&mut datagram[..]);
        u.set_src_port(68);
        u.set_dst_port(67);
        u.set_len(len);
        u.fill_checksum(Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST);
    }
    let ip = ip_packet(
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::BROADCAST,
        ipv4::protocol::UDP,
        &datagram,
    );
    let mut f = ethernet::header(ethernet::BROADCAST, vm_mac, ethernet::ethertype::IPV4).to_vec();
    f.extend_from_slice(&ip);
    f
}

fn registry_seeds() -> Vec<String> {
    let lines = [
        "V\t{\"id\":\"c\",\"network\":\"n1\",\"host\":\"h1\",\"tags\":[\"db\"],\"hostname\":\"c-1\"}",
        "V\t{\"id\":\"d\",\"network\":\"n1\",\"ip\":\"10.1.0.77\",\"mac\":\"02:00:00:00:00:77\"}",
        "R\t{\"id\":\"r1\",\"network\":\"n1\",\"action\":\"deny\",\"a\":{\"kind\":\"tag\",\"value\":\"web\"},\"b\":{\"kind\":\"any\"}}",
        "G\t{\"id\":\"gw\",\"network\":\"n1\",\"underlay_addr\":\"198.18.0.9\",\"port\":4789}",
        "M\ta\t{\"host\":\"h2\",\"host_port\":40001}",
        "E\th1\ta\t{\"host_addr\":\"198.18.0.1\",\"port\":40000}",
        "S\tb",
        "T\th\th1\t{\"src_vm\":\"a\",\"dst_ip\":\"10.1.0.3\"}",
        "T\ta\tops\t{\"src_vm\":\"b\",\"dst_ip\":\"10.1.0.2\"}",
        "T\tg\tgw\t{\"src_gateway\":\"gw\",\"src_ip\":\"203.0.113.5\",\"dst_ip\":\"10.1.0.2\"}",
        "N\t{\"id\":\"n2\",\"vni\":9,\"cidr\":\"10.2.0.0/30\",\"mtu\":1300,\"default_policy\":\"deny\",\"nat_block\":256}",
        "v\tb",
        "h\th2",
        "r\tr1",
        "g\tgw",
        "n\tn1\tcascade",
    ];
    let mut seeds: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    seeds.push(lines.join("\n"));
    seeds
}

fn admin_seeds() -> Vec<String> {
    vec![
        "{\"op\":\"attach\",\"vm_id\":\"vm-a\"}\n".into(),
        "{\"op\":\"attach\",\"vm_id\":\"vm-b\",\"socket_path\":\"/run/vnp/b.sock\",\"queue_pairs\":2}\n".into(),
        "{\"op\":\"detach\",\"vm_id\":\"vm-a\"}\n{\"op\":\"list\"}\n{\"op\":\"stats\"}\n{\"op\":\"stats\",\"vm_id\":\"vm-a\"}\n".into(),
        "{\"op\":\"nat\",\"vm_id\":\"vm-a\"}\n".into(),
        "{\"version\":1,\"attachments\":[{\"vm_id\":\"a\",\"socket_path\":\"/run/a.sock\",\"queue_pairs\":1},{\"vm_id\":\"b\",\"socket_path\":\"/run/b.sock\",\"queue_pairs\":4}]}".into(),
    ]
}

/// A descriptor-chain input (see `crate::chain` for the layout).
#[derive(Debug, Clone, Default)]
struct ChainInput {
    mode: u8,
    size_log2: u8,
    next_avail: u16,
    pending: u8,
    heads: Vec<u16>,
    descs: Vec<(u64, u32, u16, u16)>,
    indirect: Vec<(u64, u32, u16, u16)>,
    frames: u8,
    frame_bytes: u16,
}

impl ChainInput {
    fn new(mode: u8, size_log2: u8, pending: u8) -> Self {
        Self {
            mode,
            size_log2,
            pending,
            frames: 3,
            frame_bytes: 1514,
            ..Self::default()
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut v = vec![self.mode, self.size_log2];
        v.extend_from_slice(&self.next_avail.to_le_bytes());
        v.push(self.pending);
        v.push(self.heads.len() as u8);
        v.push(self.descs.len() as u8);
        v.push(self.frames);
        v.extend_from_slice(&self.frame_bytes.to_le_bytes());
        for h in &self.heads {
            v.extend_from_slice(&h.to_le_bytes());
        }
        for (addr, len, flags, next) in self.descs.iter().chain(&self.indirect) {
            v.extend_from_slice(&addr.to_le_bytes());
            v.extend_from_slice(&len.to_le_bytes());
            v.extend_from_slice(&flags.to_le_bytes());
            v.extend_from_slice(&next.to_le_bytes());
        }
        v
    }
}

/// Descriptor flags.
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

fn chain_seeds() -> Vec<(String, Vec<u8>)> {
    use crate::chain::{FOLD, INDIRECT as NEGOTIATED, INDIRECT_AT, MERGEABLE, POOL, RX, STRADDLE};
    let mut seeds = Vec::new();
    let mut add = |name: &str, input: ChainInput| seeds.push((name.to_string(), input.bytes()));
    // TX: a header and a frame; a chain straddling the region boundary; one into the gap.
    let mut tx = ChainInput::new(0, 4, 3);
    tx.heads = vec![0, 2, 3];
    tx.descs = vec![
        (0x5000, 12, NEXT, 1),
        (0x6000, 100, 0, 0),
        (0x7ff0, 0x20, 0, 0),
        (0x1_0800, 64, 0, 0),
    ];
    add("tx-chains", tx.clone());
    tx.mode = STRADDLE;
    tx.size_log2 = 8;
    add("tx-straddling-table", tx.clone());
    // Wrapping positions.
    tx.mode = 0;
    tx.size_log2 = 4;
    tx.next_avail = 0xfffe;
    add("tx-wrapping", tx.clone());
    // An indirect table of two descriptors, negotiated or not.
    let mut ind = ChainInput::new(NEGOTIATED, 4, 1);
    ind.descs = vec![(INDIRECT_AT, 32, INDIRECT, 0)];
    ind.indirect = vec![(0x5000, 12, NEXT, 1), (0x11_100, 1500, 0, 0)];
    add("tx-indirect", ind.clone());
    ind.mode = 0;
    add("tx-indirect-not-negotiated", ind.clone());
    ind.mode = RX | NEGOTIATED;
    ind.indirect = vec![(0x5000, 12, NEXT | WRITE, 1), (0x11_100, 1500, WRITE, 0)];
    add("rx-indirect", ind.clone());
    // A loop, an index jump, a head out of range.
    let mut bad = ChainInput::new(0, 4, 1);
    bad.descs = vec![(0x5000, 12, NEXT, 1), (0x6000, 100, NEXT, 0)];
    add("tx-loop", bad.clone());
    bad.pending = 17;
    add("tx-index-jump", bad.clone());
    bad.pending = 2;
    bad.heads = vec![1, 16];
    add("tx-head-out-of-range", bad.clone());
    // A chain one descriptor longer than the TX cap.
    let mut long = ChainInput::new(0, 7, 1);
    long.descs = (0..65u16)
        .map(|i| {
            (
                0x5000 + u64::from(i) * 64,
                64,
                if i < 64 { NEXT } else { 0 },
                i + 1,
            )
        })
        .collect();
    add("tx-too-long", long.clone());
    // RX: single buffers, a Linux-style big-packets chain of 19, through the pool or not.
    let mut rx = ChainInput::new(RX, 4, 4);
    rx.descs = (0..4u16)
        .map(|i| (0x4000 + u64::from(i) * 0x800, 2048, WRITE, 0))
        .collect();
    add("rx-buffers", rx.clone());
    rx.mode = RX | POOL;
    add("rx-pool", rx.clone());
    rx.mode = RX | POOL | MERGEABLE;
    rx.frame_bytes = 5000;
    add("rx-pool-mergeable", rx.clone());
    let mut big = ChainInput::new(RX | POOL, 5, 1);
    big.descs = (0..19u16)
        .map(|i| {
            (
                0x1_1000 + u64::from(i) * 0x200,
                0x200,
                WRITE | if i < 18 { NEXT } else { 0 },
                i + 1,
            )
        })
        .collect();
    big.frames = 1;
    big.frame_bytes = 9000;
    add("rx-big-packets", big.clone());
    big.mode = RX;
    add("rx-big-packets-one-by-one", big);
    // Folded addresses: most random descriptors land in guest memory.
    let mut fold = ChainInput::new(FOLD | RX | POOL, 3, 5);
    fold.descs = (0..8u16)
        .map(|i| {
            (
                0x1234_5678 * u64::from(i + 1),
                0x9_0000 + u32::from(i),
                WRITE | NEXT,
                (i * 3) % 8,
            )
        })
        .collect();
    add("rx-pool-folded", fold.clone());
    fold.mode = FOLD;
    add("tx-folded", fold);
    seeds
}
