//! Cost of the gateway's per-packet decisions, single thread, no I/O:
//! `cargo run --release -p vnp-gateway --example nat_lookup`.
//! A network of 126 VMs with one 512-port block each (one full public address) and 16
//! forwarding rules; reports the median of 7 runs of 2 million operations each, in ns/op.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;
use vnp_gateway::rx::{check_datagram, ExpiryPolicy, RxContext};
use vnp_gateway::table::NatTable;
use vnp_gateway::translate::{inbound, outbound};
use vnp_protocol::token::{Expiry, TokenFields, TokenMinter, VmSecret};
use vnp_protocol::wire::{ipv4, udp, VnpRepr};
use vnp_protocol::OUTSIDE;
use vnp_registry_client::api::*;
use vnp_registry_client::net::PortRange;

const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const N: u32 = 2_000_000;

fn config() -> GatewayConfig {
    let vms = (0..126u16)
        .map(|i| GatewayPeer {
            id: format!("vm{i}"),
            ip: Ipv4Addr::new(10, 1, (2 + i) as u8 / 250, (2 + i) as u8),
            nat_ports: vec![PortRange {
                first: 1024 + i * 512,
                last: 1024 + i * 512 + 511,
            }],
            location: Some(UnderlayAddr {
                host_addr: Ipv4Addr::new(198, 18, 0, 10),
                port: 40000 + i,
            }),
            egress: true,
        })
        .collect();
    let forwards = (0..16u16)
        .map(|i| ForwardRule {
            id: format!("f{i}"),
            network: "n".into(),
            public_addr: PUBLIC,
            public_port: 100 + i,
            proto: L4Proto::Tcp,
            vm: format!("vm{i}"),
            vm_port: 80,
        })
        .collect();
    GatewayConfig {
        generation: 1,
        gateway: Gateway {
            id: "g".into(),
            network: "n".into(),
            vni: 7,
            underlay_addr: Ipv4Addr::new(198, 18, 0, 9),
            port: 6081,
            public_addr: PUBLIC,
            secret_generation: 1,
        },
        network: Network {
            id: "n".into(),
            vni: 7,
            cidr: "10.1.0.0/16".parse().unwrap(),
            router: Ipv4Addr::new(10, 1, 0, 1),
            mtu: 1400,
            default_policy: PolicyAction::Allow,
            nat_block: 512,
        },
        pool: vec![],
        vms,
        forwards,
        services: vec![],
        probe_sources: vec![],
    }
}

fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; 28 + len];
    let mut ip = ipv4::Packet::new_unchecked(&mut p[..]);
    ipv4::Repr {
        src_addr: src,
        dst_addr: dst,
        protocol: ipv4::protocol::UDP,
        payload_len: 8 + len,
        ttl: 64,
    }
    .emit(&mut ip);
    ip.fill_checksum();
    let mut u = udp::Packet::new_unchecked(ip.payload_mut());
    u.set_src_port(sport);
    u.set_dst_port(dport);
    u.set_len((8 + len) as u16);
    u.fill_checksum(src, dst);
    p
}

fn median_ns(mut f: impl FnMut(u32)) -> f64 {
    let mut runs: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for i in 0..N {
                f(i);
            }
            t.elapsed().as_nanos() as f64 / f64::from(N)
        })
        .collect();
    runs.sort_by(|a, b| a.total_cmp(b));
    runs[3]
}

fn main() {
    let t = NatTable::from_config(&config());
    let lookup = median_ns(|i| {
        black_box(t.nat_owner(black_box(1024 + (i.wrapping_mul(7919) % 64512) as u16)));
    });
    println!("nat_owner (binary search, 126 blocks):      {lookup:6.1} ns");
    let vm = t.vms[60].clone();
    let base = udp_packet(vm.ip, SERVER, vm.nat_ports[0].first + 3, 443, 1372);
    let mut p = base.clone();
    let out = median_ns(|_| {
        p[12..16].copy_from_slice(&vm.ip.octets());
        black_box(outbound(&t, black_box(&mut p)).ok());
    });
    println!("outbound (1400-byte UDP, lookups + rewrite): {out:6.1} ns");
    let reply = udp_packet(SERVER, PUBLIC, 443, vm.nat_ports[0].first + 3, 1372);
    let mut r = reply.clone();
    let inb = median_ns(|_| {
        r[16..20].copy_from_slice(&PUBLIC.octets());
        black_box(inbound(&t, black_box(&mut r)).ok());
    });
    println!("inbound (1400-byte UDP, lookup + rewrite):   {inb:6.1} ns");
    let secret = VmSecret::from_bytes([9; 32]);
    let minter = TokenMinter::new(&secret);
    let host = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 10), 40060);
    let fields = TokenFields {
        src_host: *host.ip(),
        src_port: host.port(),
        src_vm: vm.ip,
        dst_host: Ipv4Addr::new(198, 18, 0, 9),
        dst_port: 6081,
        dst_vm: OUTSIDE,
        network_id: 7,
        expiry: Expiry(2_000_000_000),
    };
    let repr = VnpRepr {
        network_id: 7,
        token: minter.mint(&fields),
        expiry: fields.expiry,
        has_options: false,
    };
    let mut d = repr.to_bytes().to_vec();
    d.extend_from_slice(&base);
    let ctx = RxContext {
        local: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 9), 6081),
        network_id: 7,
        network_cidr: "10.1.0.0/16".parse().unwrap(),
        expiry: ExpiryPolicy {
            max_ttl_secs: u32::MAX / 2,
            ..ExpiryPolicy::default()
        },
    };
    let rx = median_ns(|_| {
        black_box(check_datagram(&ctx, &minter, black_box(&d), host, 1_900_000_000).ok());
    });
    println!("receive checks (token HMAC-SHA256 verify):   {rx:6.1} ns");
    assert!(check_datagram(&ctx, &minter, &d, host, 1_900_000_000).is_ok());
}
