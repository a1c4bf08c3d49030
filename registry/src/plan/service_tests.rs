//! Unit tests of load-balanced services: validation, port conflicts with forwards and NAT
//! blocks, pool resolution, the changes gateways follow, cascades.

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

fn by_vm(vm: &str, weight: u32) -> PoolMember {
    PoolMember {
        vm: Some(vm.into()),
        tag: None,
        weight,
    }
}

fn by_tag(tag: &str, weight: u32) -> PoolMember {
    PoolMember {
        vm: None,
        tag: Some(tag.into()),
        weight,
    }
}

fn spec(id: &str, port: u16, members: Vec<PoolMember>) -> ServiceSpec {
    ServiceSpec {
        id: id.into(),
        public_addr: PUBLIC,
        public_port: port,
        proto: L4Proto::Tcp,
        vm_port: None,
        members,
        health: HealthCheckSpec::default(),
        table_size: None,
    }
}

/// Network n1 with VMs a, b (tag web) and c (no tag), n2 with d; gateway g1 of n1 on PUBLIC.
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
    for (id, net, tags) in [
        ("a", "n1", vec!["web".to_string()]),
        ("b", "n1", vec!["web".to_string()]),
        ("c", "n1", vec![]),
        ("d", "n2", vec!["web".to_string()]),
    ] {
        let spec = VmSpec {
            id: id.into(),
            network: net.into(),
            tags,
            ..VmSpec::default()
        };
        apply!(
            m,
            create_vm(&m, &spec, VmSecret::from_bytes([1; 32]), reuse())
        );
    }
    let gw = GatewaySpec {
        id: "g1".into(),
        network: "n1".into(),
        underlay_addr: Ipv4Addr::new(198, 18, 0, 9),
        port: 6081,
        public_addr: Some(PUBLIC),
    };
    apply!(m, create_gateway(&m, &gw, VmSecret::from_bytes([9; 32])));
    m
}

#[test]
fn pool_resolves_ids_and_tags_within_the_network_with_the_largest_weight() {
    let mut m = base();
    let s = apply!(
        m,
        create_service(&m, &spec("web", 80, vec![by_tag("web", 2), by_vm("a", 5)]))
    );
    assert_eq!(
        (s.network.as_str(), s.vm_port, s.table_size),
        ("n1", 80, 65_537)
    );
    let pool = resolve_pool(&m, &s);
    let got: Vec<(&str, u32)> = pool.iter().map(|p| (p.vm.as_str(), p.weight)).collect();
    // d has the tag but is in n2; c lacks it.
    assert_eq!(got, vec![("a", 5), ("b", 2)]);
}

#[test]
fn bad_specs_are_refused_with_their_reason() {
    let m = base();
    let refused = |s: ServiceSpec| code(create_service(&m, &s));
    assert_eq!(refused(spec("Bad_Id", 80, vec![])), ErrorCode::InvalidId);
    assert_eq!(refused(spec("s", 0, vec![])), ErrorCode::BadRequest);
    assert_eq!(
        refused(spec("s", 80, vec![by_vm("a", 0)])),
        ErrorCode::BadRequest
    );
    assert_eq!(
        refused(spec("s", 80, vec![by_vm("a", 101)])),
        ErrorCode::BadRequest
    );
    assert_eq!(
        refused(spec("s", 80, vec![by_vm("zz", 1)])),
        ErrorCode::UnknownVm
    );
    assert_eq!(
        refused(spec("s", 80, vec![by_vm("d", 1)])),
        ErrorCode::BadRequest
    );
    let both = PoolMember {
        vm: Some("a".into()),
        tag: Some("web".into()),
        weight: 1,
    };
    assert_eq!(refused(spec("s", 80, vec![both])), ErrorCode::BadRequest);
    for size in [65_536, 2, 1, 20_000_000] {
        let s = ServiceSpec {
            table_size: Some(size),
            ..spec("s", 80, vec![])
        };
        assert_eq!(refused(s), ErrorCode::BadRequest, "table size {size}");
    }
    let health = |h: HealthCheckSpec| ServiceSpec {
        health: h,
        ..spec("s", 80, vec![])
    };
    let d = HealthCheckSpec::default;
    for h in [
        HealthCheckSpec { rise: 0, ..d() },
        HealthCheckSpec { fall: 0, ..d() },
        HealthCheckSpec {
            interval_ms: 50,
            timeout_ms: 10,
            ..d()
        },
        HealthCheckSpec {
            timeout_ms: 3000,
            ..d()
        },
        HealthCheckSpec {
            port: Some(0),
            ..d()
        },
        HealthCheckSpec {
            http: Some(HttpCheck {
                path: "no-slash".into(),
                expect_status: 200,
            }),
            ..d()
        },
        HealthCheckSpec {
            http: Some(HttpCheck {
                path: "/ok".into(),
                expect_status: 99,
            }),
            ..d()
        },
    ] {
        assert_eq!(refused(health(h.clone())), ErrorCode::BadRequest, "{h:?}");
    }
    let elsewhere = ServiceSpec {
        public_addr: Ipv4Addr::new(192, 0, 2, 1),
        ..spec("s", 80, vec![])
    };
    assert_eq!(refused(elsewhere), ErrorCode::NoGateway);
}

#[test]
fn public_ports_are_not_shared_with_forwards_nat_blocks_or_other_services() {
    let mut m = base();
    apply!(m, create_service(&m, &spec("web", 80, vec![by_vm("a", 1)])));
    assert_eq!(
        code(create_service(&m, &spec("web", 81, vec![]))),
        ErrorCode::Duplicate
    );
    assert_eq!(
        code(create_service(&m, &spec("w2", 80, vec![]))),
        ErrorCode::PortInUse
    );
    let udp = ServiceSpec {
        proto: L4Proto::Udp,
        ..spec("dns", 80, vec![])
    };
    apply!(m, create_service(&m, &udp));
    let fwd = ForwardSpec {
        id: "f".into(),
        public_addr: PUBLIC,
        public_port: 80,
        proto: L4Proto::Tcp,
        vm: "b".into(),
        vm_port: 80,
    };
    assert_eq!(code(create_forward(&m, &fwd)), ErrorCode::PortInUse);
    apply!(
        m,
        create_forward(
            &m,
            &ForwardSpec {
                public_port: 22,
                vm_port: 22,
                ..fwd
            }
        )
    );
    assert_eq!(
        code(create_service(&m, &spec("ssh", 22, vec![]))),
        ErrorCode::PortInUse
    );
    // a's first NAT block is 1024-1535.
    assert_eq!(
        code(create_service(&m, &spec("hi", 1100, vec![]))),
        ErrorCode::PortInUse
    );
}

#[test]
fn a_forward_and_a_service_never_share_a_vm_port() {
    let mut m = base();
    apply!(m, create_service(&m, &with_ports("web", 8080, Some(9000))));
    let fwd = ForwardSpec {
        id: "f".into(),
        public_addr: PUBLIC,
        public_port: 222,
        proto: L4Proto::Tcp,
        vm: "c".into(),
        vm_port: 8080,
    };
    // On a non-member too: a pool by tag may take it in later.
    let msg = message(create_forward(&m, &fwd));
    assert!(
        msg.contains("forward f uses VM port 8080/tcp like service web"),
        "{msg}"
    );
    assert!(m.forwards.is_empty(), "a refusal wrote nothing");
    // Another protocol, or another VM port, is fine.
    let udp = ForwardSpec {
        proto: L4Proto::Udp,
        ..fwd.clone()
    };
    apply!(m, create_forward(&m, &udp));
    let other = ForwardSpec {
        id: "g".into(),
        vm_port: 8081,
        ..fwd
    };
    apply!(m, create_forward(&m, &other));
    // The other way round: a service on a forward's VM port.
    let mut svc = with_ports("api", 8081, Some(9000));
    svc.public_port = 81;
    let msg = message(create_service(&m, &svc));
    assert!(
        msg.contains("service api uses VM port 8081/tcp like forward g (to c:8081)"),
        "{msg}"
    );
}

#[test]
fn nat_blocks_skip_service_ports() {
    let mut m = base();
    // a 1024-1535, b 1536-2047, c 2048-2559: the next block would be 2560-3071.
    apply!(m, create_service(&m, &spec("web", 2600, vec![])));
    let vm = apply!(m, grow_nat_ports(&m, "c", 1));
    let grown = vm.nat_ports.last().unwrap();
    assert!(!grown.contains(2600), "{grown:?} covers the service port");
    assert_eq!(grown.first, 3072);
}

/// The refusal's message, which must name both the service's port and the VM's block.
fn message<T: std::fmt::Debug>(r: Planned<T>) -> String {
    let e = r.expect_err("should refuse");
    assert_eq!(e.code, ErrorCode::PortInUse, "{}", e.message);
    e.message
}

fn with_ports(id: &str, vm_port: u16, check_port: Option<u16>) -> ServiceSpec {
    let mut s = spec(id, 80, vec![by_tag("web", 1)]);
    s.vm_port = Some(vm_port);
    s.health.port = check_port;
    s
}

#[test]
fn service_vm_and_check_ports_stay_out_of_every_nat_block_of_the_network() {
    let mut m = base();
    // a 1024-1535 (a member, by tag), c 2048-2559 (no member), d 1024-1535 in n2.
    let msg = message(create_service(&m, &with_ports("web", 1100, None)));
    assert!(
        msg.contains("service web's VM port 1100") && msg.contains("VM a's NAT block 1024-1535"),
        "{msg}"
    );
    // A non-member's block too: the gateway takes that port of any VM for a service reply.
    let msg = message(create_service(&m, &with_ports("web", 2100, None)));
    assert!(msg.contains("VM c's NAT block 2048-2559"), "{msg}");
    let msg = message(create_service(&m, &with_ports("web", 8080, Some(1600))));
    assert!(
        msg.contains("service web's health-check port 1600") && msg.contains("VM b's"),
        "{msg}"
    );
    assert!(m.services.is_empty(), "a refusal wrote nothing");
    // Outside every block of n1 (d's block in n2 does not count), and below 1024.
    let s = apply!(m, create_service(&m, &with_ports("web", 8080, Some(9000))));
    assert_eq!((s.vm_port, s.check_port()), (8080, 9000));
    let low = ServiceSpec {
        public_port: 443,
        ..with_ports("low", 443, None)
    };
    apply!(m, create_service(&m, &low));
}

#[test]
fn nat_blocks_handed_out_later_skip_service_vm_and_check_ports() {
    let mut m = base();
    // The next free blocks are 2560-3071, 3072-3583, 3584-4095.
    apply!(m, create_service(&m, &with_ports("web", 2600, Some(3100))));
    // A VM the tag brings into the pool later, and a VM of no pool: both skip both ports.
    for (id, tags) in [("e", vec!["web".to_string()]), ("f", vec![])] {
        let spec = VmSpec {
            id: id.into(),
            network: "n1".into(),
            tags,
            ..VmSpec::default()
        };
        apply!(
            m,
            create_vm(&m, &spec, VmSecret::from_bytes([1; 32]), reuse())
        );
    }
    assert_eq!(m.vms["e"].nat_ports[0].first, 3584);
    assert_eq!(m.vms["f"].nat_ports[0].first, 4096);
    // nat-grow of a member skips them too.
    let a = apply!(m, grow_nat_ports(&m, "a", 1));
    assert_eq!(a.nat_ports[1].first, 4608);
    let in_network = m.vms.values().filter(|v| v.network == "n1");
    for block in in_network.flat_map(|v| v.nat_ports.iter()) {
        assert!(
            !block.contains(2600) && !block.contains(3100),
            "{block} covers a service port"
        );
    }
}

#[test]
fn a_vm_whose_block_holds_a_stored_services_port_does_not_join_its_pool() {
    let mut m = base();
    let s = apply!(m, create_service(&m, &with_ports("web", 8080, None)));
    // A service stored before the rule, with its VM port inside c's block 2048-2559.
    m.apply(&[Op::PutService(Service { vm_port: 2100, ..s })]);
    let msg = message(add_member(&m, "web", &by_vm("c", 1)));
    assert!(
        msg.contains("service web's VM port 2100") && msg.contains("VM c's NAT block 2048-2559"),
        "{msg}"
    );
    // VMs whose blocks are clear still join, by id.
    let s = apply!(m, add_member(&m, "web", &by_vm("a", 3)));
    assert_eq!(s.members.len(), 2);
}

#[test]
fn pool_changes_are_in_the_change_log_for_the_vms_they_touch() {
    let mut m = base();
    let g0 = m.generation;
    apply!(m, create_service(&m, &spec("web", 80, vec![by_vm("a", 1)])));
    let touched = |m: &Model, since: u64| -> Vec<(String, ChangeKind)> {
        m.changes
            .iter()
            .filter(|c| c.generation > since)
            .map(|c| (c.vm.clone(), c.kind))
            .collect()
    };
    assert_eq!(
        touched(&m, g0),
        vec![("a".to_string(), ChangeKind::Forwards)]
    );
    let g1 = m.generation;
    apply!(m, add_member(&m, "web", &by_tag("web", 1)));
    assert_eq!(
        touched(&m, g1),
        vec![("b".to_string(), ChangeKind::Forwards)]
    );
    let g2 = m.generation;
    let s = apply!(m, add_member(&m, "web", &by_vm("a", 4)));
    assert_eq!(s.members.len(), 2, "same selector: weight replaced");
    assert_eq!(
        touched(&m, g2),
        vec![("a".to_string(), ChangeKind::Forwards)]
    );
    let g3 = m.generation;
    apply!(m, remove_member(&m, "web", None, Some("web")));
    assert_eq!(
        touched(&m, g3),
        vec![("b".to_string(), ChangeKind::Forwards)]
    );
    assert_eq!(
        code(remove_member(&m, "web", None, Some("web"))),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(remove_member(&m, "web", None, None)),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(add_member(&m, "nope", &by_vm("a", 1))),
        ErrorCode::UnknownService
    );
    let g4 = m.generation;
    apply!(m, delete_service(&m, "web"));
    assert_eq!(
        touched(&m, g4),
        vec![("a".to_string(), ChangeKind::Forwards)]
    );
    assert_eq!(code(delete_service(&m, "web")), ErrorCode::UnknownService);
}

#[test]
fn deleting_a_vm_or_the_last_gateway_of_the_address_cascades() {
    let mut m = base();
    apply!(
        m,
        create_service(&m, &spec("web", 80, vec![by_vm("a", 1), by_tag("web", 1)]))
    );
    apply!(m, delete_vm(&m, "a", reuse()));
    assert_eq!(m.services["web"].members, vec![by_tag("web", 1)]);
    let gone = apply!(m, delete_gateway(&m, "g1"));
    assert_eq!(gone.cascaded, vec!["service/web".to_string()]);
    assert!(m.services.is_empty());
}

#[test]
fn gateways_report_their_view_of_their_own_services_only() {
    let mut m = base();
    apply!(m, create_service(&m, &spec("web", 80, vec![by_vm("a", 1)])));
    let report = |service: &str, up| HealthReport {
        members: vec![MemberHealth {
            service: service.into(),
            vm: "a".into(),
            up,
        }],
    };
    let view = apply!(m, report_health(&m, "g1", &report("web", false), 7));
    assert_eq!((view.gateway.as_str(), view.reported_at), ("g1", 7));
    assert_eq!(views_of(&m, "web"), vec![view]);
    assert!(views_of(&m, "other").is_empty());
    assert_eq!(
        code(report_health(&m, "g1", &report("nope", true), 8)),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(report_health(&m, "g9", &report("web", true), 8)),
        ErrorCode::UnknownGateway
    );
    apply!(m, report_health(&m, "g1", &report("web", true), 9));
    assert!(
        views_of(&m, "web")[0].members[0].up,
        "the last report replaces the view"
    );
    apply!(m, delete_gateway(&m, "g1"));
    assert!(m.health_views.is_empty());
}

#[test]
fn a_gateway_joining_a_serviced_address_wakes_the_others() {
    let mut m = base();
    let g2 = GatewaySpec {
        id: "g2".into(),
        network: "n1".into(),
        underlay_addr: Ipv4Addr::new(198, 18, 0, 10),
        port: 6081,
        public_addr: Some(PUBLIC),
    };
    let before = m.generation;
    apply!(m, create_gateway(&m, &g2, VmSecret::from_bytes([2; 32])));
    assert_eq!(m.generation, before, "no service: nothing to wake");
    apply!(m, delete_gateway(&m, "g2"));
    apply!(m, create_service(&m, &spec("web", 80, vec![])));
    let before = m.generation;
    apply!(m, create_gateway(&m, &g2, VmSecret::from_bytes([2; 32])));
    assert_eq!(m.changes.back().map(|c| c.kind), Some(ChangeKind::Forwards));
    assert!(m.generation > before);
    let before = m.generation;
    apply!(m, delete_gateway(&m, "g2"));
    assert!(m.generation > before, "leaving wakes them too");
}
