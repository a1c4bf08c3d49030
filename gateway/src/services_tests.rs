//! Unit tests of the service path: placement, transparency, replies, health, agreement.

use super::*;
use crate::table::tests::{config, A, B, PUBLIC};
use crate::translate::tests::{checksums_ok, tcp_packet, udp_packet};
use std::net::Ipv4Addr;
use vnp_lb::FlowTimeouts;
use vnp_registry_client::api::*;

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const GW1: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 9);
const GW2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);

/// `config()` plus service web: PUBLIC:80/tcp -> port 8080 of a (weight 1) and b (weight 1).
fn lb_config() -> GatewayConfig {
    let mut cfg = config();
    let member = |vm: &str, ip, weight| ResolvedMember {
        vm: vm.into(),
        ip,
        weight,
    };
    cfg.services = vec![GatewayService {
        service: Service {
            id: "web".into(),
            network: "n1".into(),
            public_addr: PUBLIC,
            public_port: 80,
            proto: L4Proto::Tcp,
            vm_port: 8080,
            members: vec![],
            health: HealthCheckSpec::default(),
            table_size: 251,
        },
        pool: vec![member("a", A, 1), member("b", B, 1)],
    }];
    cfg.probe_sources = vec![GW1, GW2];
    cfg
}

fn tables(down: &[&str]) -> (NatTable, ServiceTable) {
    let cfg = lb_config();
    let nat = NatTable::from_config(&cfg);
    let (svc, skipped) = ServiceTable::build(&cfg, &nat, |_, vm| down.contains(&vm));
    assert!(skipped.is_empty(), "{skipped:?}");
    (nat, svc)
}

fn flows() -> FlowTable {
    FlowTable::new(1000, FlowTimeouts::default())
}

fn dst(p: &[u8]) -> (Ipv4Addr, u16) {
    let ip = ipv4::Packet::new_unchecked(p);
    (ip.dst_addr(), port(L4::Tcp, ip.payload(), false))
}

fn src(p: &[u8]) -> (Ipv4Addr, u16) {
    let ip = ipv4::Packet::new_unchecked(p);
    (ip.src_addr(), port(L4::Tcp, ip.payload(), true))
}

#[test]
fn a_service_packet_goes_to_a_pool_vm_with_only_its_destination_changed() {
    let (nat, svc) = tables(&[]);
    let mut f = flows();
    let mut p = tcp_packet(CLIENT, PUBLIC, 40000, 80);
    let placed = inbound(&svc, &nat, &mut f, &mut p, 0).unwrap().unwrap();
    assert!(placed.new_flow);
    let vm_ip = nat.vms[placed.vm].ip;
    assert_eq!(dst(&p), (vm_ip, 8080));
    assert_eq!(src(&p), (CLIENT, 40000), "the VM sees the real client");
    assert!(checksums_ok(&p));
    // The same flow again: the same VM, not new.
    let mut again = tcp_packet(CLIENT, PUBLIC, 40000, 80);
    let second = inbound(&svc, &nat, &mut f, &mut again, 10)
        .unwrap()
        .unwrap();
    assert_eq!((second.vm, second.new_flow), (placed.vm, false));
}

#[test]
fn other_packets_are_left_to_nat_and_forwarding() {
    let (nat, svc) = tables(&[]);
    let mut f = flows();
    for mut p in [
        tcp_packet(CLIENT, PUBLIC, 40000, 81),
        udp_packet(CLIENT, PUBLIC, 40000, 80),
        tcp_packet(CLIENT, Ipv4Addr::new(203, 0, 113, 99), 40000, 80),
        tcp_packet(CLIENT, PUBLIC, 40000, 443),
    ] {
        assert_eq!(inbound(&svc, &nat, &mut f, &mut p, 0), None);
    }
    assert!(f.is_empty());
}

#[test]
fn replies_leave_from_the_service_address_and_port() {
    let (nat, svc) = tables(&[]);
    for vm in [A, B] {
        let mut p = tcp_packet(vm, CLIENT, 8080, 40000);
        let from = outbound(&svc, &nat, &mut p).unwrap().unwrap();
        assert_eq!(nat.vms[from].ip, vm);
        assert_eq!(src(&p), (PUBLIC, 80));
        assert_eq!(dst(&p), (CLIENT, 40000));
        assert!(checksums_ok(&p));
    }
    // Another port, or UDP: not a reply of the service.
    let mut other = tcp_packet(A, CLIENT, 8081, 40000);
    assert_eq!(outbound(&svc, &nat, &mut other), None);
    let mut udp = udp_packet(A, CLIENT, 8080, 40000);
    assert_eq!(outbound(&svc, &nat, &mut udp), None);
}

#[test]
fn a_down_member_gets_no_new_flows_and_loses_its_flows() {
    let (nat, all) = tables(&[]);
    let (_, without_a) = tables(&["a"]);
    let mut f = flows();
    // Find a flow the full table puts on a.
    let on_a = (40000..41000)
        .find(|port| {
            let mut p = tcp_packet(CLIENT, PUBLIC, *port, 80);
            let placed = inbound(&all, &nat, &mut flows(), &mut p, 0)
                .unwrap()
                .unwrap();
            nat.vms[placed.vm].ip == A
        })
        .expect("some flow hashes to a");
    let mut p = tcp_packet(CLIENT, PUBLIC, on_a, 80);
    inbound(&all, &nat, &mut f, &mut p, 0).unwrap().unwrap();
    // a goes down in this gateway's view: its flow is re-placed on b, and so is every new one.
    let mut p = tcp_packet(CLIENT, PUBLIC, on_a, 80);
    let moved = inbound(&without_a, &nat, &mut f, &mut p, 5)
        .unwrap()
        .unwrap();
    assert_eq!(nat.vms[moved.vm].ip, B);
    assert!(moved.new_flow);
    for port in 41000..41200 {
        let mut p = tcp_packet(CLIENT, PUBLIC, port, 80);
        let placed = inbound(&without_a, &nat, &mut f, &mut p, 5)
            .unwrap()
            .unwrap();
        assert_eq!(nat.vms[placed.vm].ip, B);
    }
    // Nobody healthy: dropped, counted as no backend.
    let (_, none) = tables(&["a", "b"]);
    let mut p = tcp_packet(CLIENT, PUBLIC, 42000, 80);
    assert_eq!(
        inbound(&none, &nat, &mut f, &mut p, 5),
        Some(Err(DropReason::NoBackend))
    );
    // Replies of flows already on a still leave (its established flows end cleanly).
    let mut reply = tcp_packet(A, CLIENT, 8080, on_a);
    assert!(outbound(&none, &nat, &mut reply).is_some());
}

#[test]
fn two_gateways_place_every_new_flow_alike_and_spread_it() {
    let (nat, g1) = tables(&[]);
    let (_, g2) = tables(&[]);
    let (mut f1, mut f2) = (flows(), flows());
    let mut on_a = 0;
    for i in 0..2000u16 {
        let client = Ipv4Addr::new(198, 51, 100, (i % 200) as u8);
        let mut p1 = tcp_packet(client, PUBLIC, 30000 + i, 80);
        let mut p2 = p1.clone();
        let a = inbound(&g1, &nat, &mut f1, &mut p1, 0).unwrap().unwrap();
        let b = inbound(&g2, &nat, &mut f2, &mut p2, 0).unwrap().unwrap();
        assert_eq!(a.vm, b.vm, "flow {i}");
        assert_eq!(p1, p2);
        on_a += usize::from(nat.vms[a.vm].ip == A);
    }
    // Binomial(2000, 1/2): sigma 22; 5 sigma either way.
    assert!((890..=1110).contains(&on_a), "{on_a} of 2000 on a");
}

#[test]
fn flows_stay_on_a_vm_an_operator_removed_from_the_pool() {
    let (nat, svc) = tables(&[]);
    let mut f = flows();
    let mut on_a = None;
    for port in 40000..40100 {
        let mut p = tcp_packet(CLIENT, PUBLIC, port, 80);
        let placed = inbound(&svc, &nat, &mut f, &mut p, 0).unwrap().unwrap();
        if nat.vms[placed.vm].ip == A {
            on_a = Some(port);
        }
    }
    let on_a = on_a.expect("some flow on a");
    let mut cfg = lb_config();
    cfg.services[0].pool.retain(|m| m.vm != "a");
    let (without_a, _) = ServiceTable::build(&cfg, &nat, |_, _| false);
    let mut p = tcp_packet(CLIENT, PUBLIC, on_a, 80);
    let kept = inbound(&without_a, &nat, &mut f, &mut p, 5)
        .unwrap()
        .unwrap();
    assert_eq!((nat.vms[kept.vm].ip, kept.new_flow), (A, false));
    let mut reply = tcp_packet(A, CLIENT, 8080, on_a);
    assert!(outbound(&without_a, &nat, &mut reply).is_some());
    // New flows avoid it.
    for port in 41000..41100 {
        let mut p = tcp_packet(CLIENT, PUBLIC, port, 80);
        let placed = inbound(&without_a, &nat, &mut f, &mut p, 5)
            .unwrap()
            .unwrap();
        assert_eq!(nat.vms[placed.vm].ip, B);
    }
}

#[test]
fn a_closing_flow_is_remembered_briefly() {
    let (nat, svc) = tables(&[]);
    let mut f = FlowTable::new(1000, FlowTimeouts::default());
    let mut syn = tcp_packet(CLIENT, PUBLIC, 40000, 80);
    inbound(&svc, &nat, &mut f, &mut syn, 0).unwrap().unwrap();
    let mut fin = tcp_packet(CLIENT, PUBLIC, 40000, 80);
    fin[20 + 13] = tcp::flags::FIN | tcp::flags::ACK;
    inbound(&svc, &nat, &mut f, &mut fin, 1000)
        .unwrap()
        .unwrap();
    assert_eq!(
        f.expire(1000 + FlowTimeouts::default().tcp_closing_ms + 1),
        1
    );
}

#[test]
fn a_pool_larger_than_its_table_is_skipped_not_a_panic() {
    let mut cfg = lb_config();
    cfg.services[0].service.table_size = 3;
    let extra = |vm: &str, last| ResolvedMember {
        vm: vm.into(),
        ip: Ipv4Addr::new(10, 1, 0, last),
        weight: 1,
    };
    cfg.services[0]
        .pool
        .extend([extra("c", 40), extra("d", 41)]);
    for (id, last) in [("c", 40), ("d", 41)] {
        let mut peer = cfg.vms[0].clone();
        peer.id = id.into();
        peer.ip = Ipv4Addr::new(10, 1, 0, last);
        peer.nat_ports = vec![];
        cfg.vms.push(peer);
    }
    let nat = NatTable::from_config(&cfg);
    let (svc, skipped) = ServiceTable::build(&cfg, &nat, |_, _| false);
    assert!(svc.is_empty());
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].service, "web");
    // The flows it balanced while it fit (a health change can make it not fit) still finish:
    // their replies leave from the service's address and port (found by the gateway fuzz
    // target; they went to NAT and were refused).
    let mut reply = tcp_packet(A, CLIENT, 8080, 40000);
    assert!(outbound(&svc, &nat, &mut reply).is_some_and(|r| r.is_ok()));
    assert_eq!(src(&reply), (PUBLIC, 80));
}

#[test]
fn health_checks_leave_from_the_gateway_and_answers_go_to_the_kernel() {
    let (nat, svc) = tables(&[]);
    // The kernel's SYN from the underlay address to a VM's check port.
    let syn = tcp_packet(GW1, A, 45000, 8080);
    assert_eq!(probe_out(&nat, GW1, &syn), Some(Ok(0)));
    // Not from this gateway's address: not a probe (left to the service and NAT paths).
    assert_eq!(probe_out(&nat, GW2, &syn), None);
    let stray = tcp_packet(GW1, Ipv4Addr::new(10, 1, 0, 99), 45000, 8080);
    assert_eq!(
        probe_out(&nat, GW1, &stray),
        Some(Err(DropReason::UnknownVm))
    );
    let udp = udp_packet(GW1, A, 45000, 8080);
    assert_eq!(
        probe_out(&nat, GW1, &udp),
        Some(Err(DropReason::UnsupportedProtocol))
    );
    // Answers to either gateway of the address, from the check port only.
    assert!(is_probe_answer(
        &svc,
        &nat,
        &tcp_packet(A, GW1, 8080, 45000)
    ));
    assert!(is_probe_answer(
        &svc,
        &nat,
        &tcp_packet(B, GW2, 8080, 45000)
    ));
    assert!(!is_probe_answer(&svc, &nat, &tcp_packet(A, GW1, 22, 45000)));
    assert!(!is_probe_answer(
        &svc,
        &nat,
        &tcp_packet(A, CLIENT, 8080, 45000)
    ));
    assert!(!is_probe_answer(
        &svc,
        &nat,
        &udp_packet(A, GW1, 8080, 45000)
    ));
}
