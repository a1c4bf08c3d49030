//! Unit tests of the public side: several gateways, NAT blocks that grow, forwarding rules.

use super::*;

fn reuse() -> PortReuse {
    PortReuse {
        now: 1_000_000,
        quarantine_secs: 600,
    }
}

macro_rules! apply {
    ($m:ident, $planned:expr) => {{
        let (ops, out) = $planned.expect("planned");
        $m.apply(&ops);
        out
    }};
}

fn code<T: std::fmt::Debug>(r: Planned<T>) -> ErrorCode {
    r.expect_err("should refuse").code
}

const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

fn gw(id: &str, net: &str, last: u8, public: Option<Ipv4Addr>) -> GatewaySpec {
    GatewaySpec {
        id: id.into(),
        network: net.into(),
        underlay_addr: Ipv4Addr::new(198, 18, 0, last),
        port: 6081,
        public_addr: public,
    }
}

fn fwd(id: &str, port: u16, vm: &str) -> ForwardSpec {
    ForwardSpec {
        id: id.into(),
        public_addr: PUBLIC,
        public_port: port,
        proto: L4Proto::Tcp,
        vm: vm.into(),
        vm_port: 80,
    }
}

/// Network n1 (blocks of 512) with VMs a and b, network n2, gateway g1 of n1 on PUBLIC.
fn base() -> Model {
    let mut m = Model::default();
    for (id, cidr) in [("n1", "10.1.0.0/24"), ("n2", "10.2.0.0/24")] {
        let spec = NetworkSpec {
            id: id.into(),
            vni: None,
            cidr: cidr.parse().unwrap(),
            mtu: None,
            default_policy: None,
            nat_block: None,
        };
        apply!(m, create_network(&m, &spec));
    }
    for id in ["a", "b"] {
        let spec = VmSpec {
            id: id.into(),
            network: "n1".into(),
            ..VmSpec::default()
        };
        apply!(
            m,
            create_vm(&m, &spec, VmSecret::from_bytes([1; 32]), reuse())
        );
    }
    apply!(
        m,
        create_gateway(
            &m,
            &gw("g1", "n1", 9, Some(PUBLIC)),
            VmSecret::from_bytes([9; 32])
        )
    );
    m
}

#[test]
fn several_gateways_one_pool_per_network() {
    let mut m = base();
    let g2 = apply!(
        m,
        create_gateway(
            &m,
            &gw("g2", "n1", 10, Some(PUBLIC)),
            VmSecret::from_bytes([8; 32])
        )
    );
    assert_eq!(g2.public_addr, PUBLIC);
    // Default public address: the underlay address.
    let g3 = apply!(
        m,
        create_gateway(&m, &gw("g3", "n1", 11, None), VmSecret::from_bytes([7; 32]))
    );
    assert_eq!(g3.public_addr, Ipv4Addr::new(198, 18, 0, 11));
    assert_eq!(m.gateways_of("n1").count(), 3);
    // A public address (NAT pool) serves one network only.
    assert_eq!(
        code(create_gateway(
            &m,
            &gw("x", "n2", 12, Some(PUBLIC)),
            VmSecret::from_bytes([6; 32])
        )),
        ErrorCode::Duplicate
    );
    // The same VNP address twice.
    assert_eq!(
        code(create_gateway(
            &m,
            &gw("y", "n1", 9, Some(PUBLIC)),
            VmSecret::from_bytes([6; 32])
        )),
        ErrorCode::DuplicatePort
    );
    assert_eq!(
        code(create_gateway(
            &m,
            &gw("z", "n1", 13, Some(Ipv4Addr::UNSPECIFIED)),
            VmSecret::from_bytes([6; 32])
        )),
        ErrorCode::BadRequest
    );
    // Every VM maps to one of them, and the choice is stable.
    let a = m.vms["a"].clone();
    let chosen = m.gateway_for(&a).unwrap().id.clone();
    assert_eq!(m.gateway_for(&a).unwrap().id, chosen);
}

#[test]
fn nat_ports_grow_by_disjoint_blocks() {
    let mut m = base();
    assert_eq!(
        m.vms["a"].nat_ports,
        vec![PortRange {
            first: 1024,
            last: 1535
        }]
    );
    assert_eq!(
        m.vms["b"].nat_ports,
        vec![PortRange {
            first: 1536,
            last: 2047
        }]
    );
    let before = m.generation;
    let a = apply!(m, grow_nat_ports(&m, "a", 2));
    assert_eq!(
        a.nat_ports,
        vec![
            PortRange {
                first: 1024,
                last: 1535
            },
            PortRange {
                first: 2048,
                last: 2559
            },
            PortRange {
                first: 2560,
                last: 3071
            },
        ]
    );
    let last = m.changes.back().unwrap();
    assert_eq!(
        (last.generation, last.kind),
        (before + 1, ChangeKind::NatPorts)
    );
    assert!(a.owns_nat_port(2600) && !a.owns_nat_port(1600));
    assert_eq!(code(grow_nat_ports(&m, "a", 0)), ErrorCode::BadRequest);
    assert_eq!(code(grow_nat_ports(&m, "zz", 1)), ErrorCode::UnknownVm);
    // 64512 ports / 512 = 126 blocks per address; 4 are taken, 122 remain.
    assert_eq!(code(grow_nat_ports(&m, "b", 17)), ErrorCode::BadRequest);
    for _ in 0..7 {
        apply!(m, grow_nat_ports(&m, "b", 16));
    }
    assert_eq!(m.vms["b"].nat_ports.len(), 1 + 112);
    apply!(m, grow_nat_ports(&m, "b", 10));
    assert_eq!(m.vms["b"].nat_ports.last().unwrap().last, 65535);
    assert_eq!(code(grow_nat_ports(&m, "b", 1)), ErrorCode::PoolExhausted);
}

#[test]
fn forwards_are_validated_and_kept_out_of_nat_blocks() {
    let mut m = base();
    let f = apply!(m, create_forward(&m, &fwd("web", 443, "a")));
    assert_eq!((f.network.as_str(), f.public_port), ("n1", 443));
    assert_eq!(m.changes.back().unwrap().kind, ChangeKind::Forwards);
    // Same public port and protocol twice; UDP on the same port is another rule.
    assert_eq!(
        code(create_forward(&m, &fwd("web2", 443, "b"))),
        ErrorCode::PortInUse
    );
    let udp = ForwardSpec {
        proto: L4Proto::Udp,
        ..fwd("dns", 443, "b")
    };
    apply!(m, create_forward(&m, &udp));
    // Inside a's NAT block.
    assert_eq!(
        code(create_forward(&m, &fwd("x", 1100, "b"))),
        ErrorCode::PortInUse
    );
    // Not a public address of the VM's network.
    let other = ForwardSpec {
        public_addr: Ipv4Addr::new(203, 0, 113, 99),
        ..fwd("x", 80, "a")
    };
    assert_eq!(code(create_forward(&m, &other)), ErrorCode::NoGateway);
    assert_eq!(
        code(create_forward(&m, &fwd("x", 0, "a"))),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(create_forward(&m, &fwd("x", 80, "zz"))),
        ErrorCode::UnknownVm
    );
    assert_eq!(
        code(create_forward(&m, &fwd("web", 80, "a"))),
        ErrorCode::Duplicate
    );
    // A forwarded port above 1024 is skipped by later NAT blocks.
    apply!(m, create_forward(&m, &fwd("high", 2100, "a")));
    let b = apply!(m, grow_nat_ports(&m, "b", 1));
    assert_eq!(
        b.nat_ports[1],
        PortRange {
            first: 2560,
            last: 3071
        }
    );
    // Deleting the VM takes its rules with it; deleting the rule logs a change.
    apply!(m, delete_forward(&m, "dns"));
    assert_eq!(m.changes.back().unwrap().kind, ChangeKind::Forwards);
    assert_eq!(code(delete_forward(&m, "dns")), ErrorCode::UnknownForward);
    apply!(m, delete_vm(&m, "a", reuse()));
    assert!(m.forwards.is_empty(), "{:?}", m.forwards);
}

#[test]
fn a_forwards_vm_port_stays_out_of_its_vms_nat_blocks() {
    let mut m = base();
    // a 1024-1535, b 1536-2047.
    let inside = ForwardSpec {
        vm_port: 1100,
        ..fwd("web", 443, "a")
    };
    let e = create_forward(&m, &inside).expect_err("inside a's block");
    assert_eq!(e.code, ErrorCode::PortInUse);
    assert!(
        e.message.contains("forward web's VM port 1100")
            && e.message.contains("VM a's NAT block 1024-1535"),
        "{}",
        e.message
    );
    assert!(m.forwards.is_empty());
    // Another VM's block is harmless: the gateway keys forwarded replies by VM.
    let other = ForwardSpec {
        vm_port: 1600,
        ..fwd("web", 443, "a")
    };
    apply!(m, create_forward(&m, &other));
    // The next free block is 2048-2559: a's growth skips its forward's VM port 2100 there,
    // b's does not (the port reaches only a).
    apply!(
        m,
        create_forward(
            &m,
            &ForwardSpec {
                vm_port: 2100,
                ..fwd("api", 8443, "a")
            }
        )
    );
    let a = apply!(m, grow_nat_ports(&m, "a", 1));
    assert_eq!(a.nat_ports[1].first, 2560);
    let b = apply!(m, grow_nat_ports(&m, "b", 1));
    assert_eq!(b.nat_ports[1].first, 2048);
}

#[test]
fn last_gateway_of_an_address_takes_its_forwards() {
    let mut m = base();
    apply!(
        m,
        create_gateway(
            &m,
            &gw("g2", "n1", 10, Some(PUBLIC)),
            VmSecret::from_bytes([8; 32])
        )
    );
    apply!(m, create_forward(&m, &fwd("web", 443, "a")));
    let d = apply!(m, delete_gateway(&m, "g1"));
    assert!(d.cascaded.is_empty(), "g2 still serves the address");
    let d = apply!(m, delete_gateway(&m, "g2"));
    assert_eq!(d.cascaded, vec!["forward/web".to_string()]);
    assert!(m.forwards.is_empty());
}
