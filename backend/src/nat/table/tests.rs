use std::collections::HashSet;
use std::net::Ipv4Addr;

use proptest::prelude::*;
use vnp_protocol::wire::tcp::flags::{ACK, FIN, RST, SYN};

use super::*;
use crate::nat::flow::{TCP_ESTABLISHED_SECS, TCP_HANDSHAKE_SECS, UDP_SECS};

const REMOTE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

fn block(first: u16, last: u16) -> PortBlock {
    PortBlock::new(first, last).unwrap()
}

fn key(proto: Proto, local_port: u16, remote_port: u16) -> FlowKey {
    FlowKey {
        proto,
        local_port,
        remote: REMOTE,
        remote_port,
    }
}

fn mapped(o: Result<Outbound, NatRefusal>) -> u16 {
    match o {
        Ok(Outbound::Mapped(p)) => p,
        other => panic!("not mapped: {other:?}"),
    }
}

#[test]
fn a_flow_keeps_its_port_and_replies_find_it() {
    let mut t = NatTable::new(&[block(40000, 40009)]);
    let k = key(Proto::Udp, 5353, 53);
    let p = mapped(t.outbound(k, 0, 0));
    assert!((40000..=40009).contains(&p));
    assert_eq!(mapped(t.outbound(k, 0, 1)), p);
    assert_eq!(
        t.inbound(Proto::Udp, p, REMOTE, 53, 0, 2),
        Ok(Inbound::Mapped(5353))
    );
    // Another remote, or another remote port, is not the flow's reply.
    assert_eq!(
        t.inbound(Proto::Udp, p, Ipv4Addr::new(198, 51, 100, 1), 53, 0, 2),
        Err(NatRefusal::UnknownMapping)
    );
    assert_eq!(
        t.inbound(Proto::Udp, p, REMOTE, 54, 0, 2),
        Err(NatRefusal::UnknownMapping)
    );
    // A mapped port with no flow.
    let free = if p == 40000 { 40001 } else { 40000 };
    assert_eq!(
        t.inbound(Proto::Udp, free, REMOTE, 53, 0, 2),
        Err(NatRefusal::UnknownMapping)
    );
    // The port spaces of TCP and UDP are separate.
    assert_eq!(
        t.inbound(Proto::Tcp, p, REMOTE, 53, ACK, 2),
        Err(NatRefusal::UnknownMapping)
    );
}

#[test]
fn exhaustion_refuses_new_flows_and_keeps_old_ones() {
    let mut t = NatTable::new(&[block(1000, 1003)]);
    let ports: Vec<u16> = (0..4)
        .map(|i| mapped(t.outbound(key(Proto::Tcp, 2000 + i, 80), SYN, 0)))
        .collect();
    assert_eq!(
        t.outbound(key(Proto::Tcp, 3000, 80), SYN, 1),
        Err(NatRefusal::Exhausted)
    );
    for (i, p) in ports.iter().enumerate() {
        assert_eq!(
            mapped(t.outbound(key(Proto::Tcp, 2000 + i as u16, 80), ACK, 1)),
            *p
        );
    }
    // UDP has its own ports.
    assert!(t.outbound(key(Proto::Udp, 3000, 53), 0, 1).is_ok());
    // After the handshake timeout the unanswered SYNs' ports are free again.
    let later = TCP_HANDSHAKE_SECS + 1;
    assert!(t.outbound(key(Proto::Tcp, 3000, 80), SYN, later).is_ok());
}

#[test]
fn tcp_needs_a_syn_to_map_and_timeouts_follow_state() {
    let mut t = NatTable::new(&[block(1000, 1001)]);
    assert_eq!(
        t.outbound(key(Proto::Tcp, 2000, 80), ACK, 0),
        Err(NatRefusal::NoFlow)
    );
    let k = key(Proto::Tcp, 2000, 80);
    let p = mapped(t.outbound(k, SYN, 0));
    assert_eq!(
        t.inbound(Proto::Tcp, p, REMOTE, 80, SYN | ACK, 1),
        Ok(Inbound::Mapped(2000))
    );
    // Established: still there long after the handshake timeout.
    let t1 = TCP_HANDSHAKE_SECS * 10;
    assert_eq!(mapped(t.outbound(k, ACK, t1)), p);
    assert_eq!(
        t.lookup_mapped(Proto::Tcp, p, t1 + TCP_ESTABLISHED_SECS - 1),
        Some(k)
    );
    // RST: closed, short timeout.
    assert_eq!(
        t.inbound(Proto::Tcp, p, REMOTE, 80, RST, t1 + 1),
        Ok(Inbound::Mapped(2000))
    );
    assert_eq!(t.lookup_mapped(Proto::Tcp, p, t1 + 1 + 31), None);
    let _ = FIN;
}

#[test]
fn blocks_grow_at_run_time() {
    let mut t = NatTable::new(&[block(1000, 1000)]);
    assert!(t.outbound(key(Proto::Udp, 1, 9), 0, 0).is_ok());
    assert_eq!(
        t.outbound(key(Proto::Udp, 2, 9), 0, 0),
        Err(NatRefusal::Exhausted)
    );
    t.set_blocks(&[block(1000, 1000), block(5000, 5001)]);
    assert_eq!(t.stats().ports_total, 3);
    let p = mapped(t.outbound(key(Proto::Udp, 2, 9), 0, 0));
    assert!((5000..=5001).contains(&p));
    // The first flow kept its port through the change.
    assert_eq!(mapped(t.outbound(key(Proto::Udp, 1, 9), 0, 1)), 1000);
    // Shrinking: a flow on a dropped block lives on, its port is not handed out again.
    t.set_blocks(&[block(5000, 5001)]);
    assert_eq!(mapped(t.outbound(key(Proto::Udp, 1, 9), 0, 2)), 1000);
    let later = 2 + UDP_SECS + 1;
    t.expire(later);
    let mut got = HashSet::new();
    for i in 0..2 {
        got.insert(mapped(t.outbound(key(Proto::Udp, 100 + i, 9), 0, later)));
    }
    assert_eq!(got, HashSet::from([5000, 5001]));
}

/// Found by the `nat` fuzz target: overlapping blocks (which the registry never hands out,
/// but `set_blocks` takes whatever it is given) put their shared ports on the free list twice,
/// and two flows got the same port (replies of one went to the other).
#[test]
fn overlapping_blocks_never_give_a_port_to_two_flows() {
    let mut t = NatTable::new(&[
        block(40000, 40003),
        block(40002, 40006),
        block(40002, 40003),
    ]);
    let mut seen = HashSet::new();
    for local in 1..=7u16 {
        let p = mapped(t.outbound(key(Proto::Udp, local, 53), 0, 0));
        assert!(seen.insert(p), "port {p} handed out twice");
    }
    assert_eq!(
        t.outbound(key(Proto::Udp, 8, 53), 0, 0),
        Err(NatRefusal::Exhausted)
    );
    // The same when the overlap arrives at run time.
    let mut t = NatTable::new(&[block(40000, 40001)]);
    t.set_blocks(&[
        block(40000, 40001),
        block(40001, 40003),
        block(40003, 40003),
    ]);
    let ports: HashSet<u16> = (1..=4u16)
        .map(|l| mapped(t.outbound(key(Proto::Tcp, l, 80), SYN, 0)))
        .collect();
    assert_eq!(ports.len(), 4);
}

#[test]
fn inbound_flows_are_not_remapped() {
    let mut t = NatTable::new(&[block(40000, 40009)]);
    // A client reaches the guest's port 8080 through a forward rule.
    assert_eq!(
        t.inbound(Proto::Tcp, 8080, REMOTE, 51000, SYN, 0),
        Ok(Inbound::Forwarded)
    );
    // The guest's answers leave unchanged.
    let reply = key(Proto::Tcp, 8080, 51000);
    assert_eq!(t.outbound(reply, SYN | ACK, 0), Ok(Outbound::InboundReply));
    assert_eq!(t.outbound(reply, ACK, 1), Ok(Outbound::InboundReply));
    // A different remote port is not that flow: the guest cannot open a mapping-free flow.
    assert_eq!(
        t.outbound(key(Proto::Tcp, 8080, 51001), ACK, 1),
        Err(NatRefusal::NoFlow)
    );
    assert_eq!(t.stats().inbound, 1);
}

#[test]
fn an_inbound_flow_remembers_the_gateway_it_last_came_in_through() {
    use std::net::SocketAddrV4;
    let gw1 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 9), 6081);
    let gw2 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 10), 6081);
    let mut t = NatTable::new(&[block(40000, 40009)]);
    let reply = key(Proto::Tcp, 8080, 51000);
    let remote = (REMOTE, 51000);
    assert_eq!(
        t.inbound_via(Proto::Tcp, 8080, remote, SYN, Some(gw1), 0),
        Ok(Inbound::Forwarded)
    );
    assert_eq!(t.inbound_gateway(&reply, 0), Some(gw1));
    // The public side moved the flow to gateway 2: its replies follow.
    t.inbound_via(Proto::Tcp, 8080, remote, ACK, Some(gw2), 1)
        .unwrap();
    assert_eq!(t.inbound_gateway(&reply, 1), Some(gw2));
    // A packet without a known gateway keeps the one recorded.
    t.inbound(Proto::Tcp, 8080, REMOTE, 51000, ACK, 2).unwrap();
    assert_eq!(t.inbound_gateway(&reply, 2), Some(gw2));
    // Another flow, an outbound (mapped) flow, and an expired flow have none.
    assert_eq!(t.inbound_gateway(&key(Proto::Tcp, 8080, 51001), 2), None);
    let out = key(Proto::Udp, 5000, 53);
    mapped(t.outbound(out, 0, 2));
    assert_eq!(t.inbound_gateway(&out, 2), None);
    assert_eq!(t.inbound_gateway(&reply, 2 + TCP_HANDSHAKE_SECS), None);
    // A mapped flow's replies record nothing (they leave through the assigned gateway).
    let port = mapped(t.outbound(key(Proto::Udp, 5001, 53), 0, 3));
    t.inbound_via(Proto::Udp, port, (REMOTE, 53), 0, Some(gw2), 3)
        .unwrap();
    assert_eq!(t.inbound_gateway(&key(Proto::Udp, 5001, 53), 3), None);
}

#[test]
fn the_oldest_freed_port_is_reused_first() {
    let mut t = NatTable::new(&[block(1000, 1002)]);
    let a = mapped(t.outbound(key(Proto::Udp, 1, 9), 0, 0));
    let b = mapped(t.outbound(key(Proto::Udp, 2, 9), 0, 0));
    assert_eq!((a, b), (1000, 1001));
    t.expire(UDP_SECS);
    // 1002 was never used; then 1000, 1001 in the order they were freed.
    let next: Vec<u16> = (0..3)
        .map(|i| mapped(t.outbound(key(Proto::Udp, 10 + i, 9), 0, UDP_SECS)))
        .collect();
    assert_eq!(next[0], 1002);
}

proptest! {
    /// Whatever the guest sends, the mapping is a bijection between live flows and ports of
    /// the blocks: every mapped port lies in the blocks, no two flows share one, each reply
    /// finds its own flow.
    #[test]
    fn mapping_is_a_bijection_within_the_blocks(
        flows in proptest::collection::vec((0u8..3, 1u16..200, 1u16..5, 0u64..100), 1..300),
        first in 1u16..60000,
        len in 1u16..64,
    ) {
        let blocks = [block(first, first.saturating_add(len - 1))];
        let mut t = NatTable::new(&blocks);
        let mut now = 0;
        for (proto, local, remote, dt) in flows {
            now += dt;
            let proto = Proto::ALL[usize::from(proto)];
            let k = key(proto, local, remote);
            match t.outbound(k, SYN, now) {
                Ok(Outbound::Mapped(p)) => {
                    prop_assert!(blocks[0].contains(p));
                    prop_assert_eq!(t.lookup_mapped(proto, p, now), Some(k));
                    let remote_port = if proto == Proto::Icmp { 0 } else { remote };
                    let reply = t.inbound(proto, p, REMOTE, remote_port, ACK, now);
                    if proto != Proto::Icmp {
                        prop_assert_eq!(reply, Ok(Inbound::Mapped(local)));
                    }
                }
                Ok(Outbound::InboundReply) => prop_assert!(false, "no inbound flows here"),
                Err(e) => prop_assert_eq!(e, NatRefusal::Exhausted),
            }
            for proto in Proto::ALL {
                let live: Vec<FlowView> = t
                    .flows(now)
                    .into_iter()
                    .filter(|f| f.key.proto == proto)
                    .collect();
                let ports: HashSet<u16> = live.iter().filter_map(|f| f.mapped).collect();
                let keys: HashSet<FlowKey> = live.iter().map(|f| f.key).collect();
                prop_assert_eq!(ports.len(), live.len());
                prop_assert_eq!(keys.len(), live.len());
                prop_assert!(live.len() <= blocks[0].len());
            }
        }
    }

    /// Two VMs' tables with disjoint blocks: a port one hands out is never the other's, and
    /// a reply to one VM's port is unknown to the other (a guest never gets another VM's
    /// port).
    #[test]
    fn a_guest_never_gets_another_vms_port(
        flows in proptest::collection::vec((any::<bool>(), 1u16..1000, 1u16..1000), 1..200),
    ) {
        let a_blocks = [block(20000, 20063), block(30000, 30015)];
        let b_blocks = [block(20064, 20127)];
        let mut a = NatTable::new(&a_blocks);
        let mut b = NatTable::new(&b_blocks);
        for (to_a, local, remote) in flows {
            let k = key(Proto::Udp, local, remote);
            let (mine, other, blocks) = if to_a {
                (&mut a, &mut b, &a_blocks[..])
            } else {
                (&mut b, &mut a, &b_blocks[..])
            };
            if let Ok(Outbound::Mapped(p)) = mine.outbound(k, 0, 0) {
                prop_assert!(blocks.iter().any(|bl| bl.contains(p)));
                prop_assert!(other.lookup_mapped(Proto::Udp, p, 0).is_none());
                prop_assert_eq!(
                    other.inbound(Proto::Udp, p, REMOTE, remote, 0, 0).ok(),
                    // Not in the other's blocks: at most an inbound flow, never a mapping.
                    Some(Inbound::Forwarded)
                );
            }
        }
    }
}
