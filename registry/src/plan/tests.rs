//! Unit tests of the planners: every rule about bad input.

use super::*;

fn secret() -> VmSecret {
    VmSecret::from_bytes([7; 32])
}

/// Unix seconds at which the tests plan.
const NOW: u64 = 1_000_000;

fn reuse() -> PortReuse {
    reuse_at(NOW)
}

fn reuse_at(now: u64) -> PortReuse {
    PortReuse {
        now,
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

fn base() -> Model {
    let mut m = Model::default();
    let spec = NetworkSpec {
        id: "n1".into(),
        vni: None,
        cidr: "10.1.0.0/24".parse().unwrap(),
        mtu: None,
        default_policy: None,
        nat_block: None,
    };
    apply!(m, create_network(&m, &spec));
    let h = HostSpec {
        id: "h1".into(),
        underlay_addr: Ipv4Addr::new(198, 18, 0, 1),
        port_range: Some("40000-40001".parse().unwrap()),
    };
    apply!(m, create_host(&m, &h));
    m
}

fn vm_spec(id: &str) -> VmSpec {
    VmSpec {
        id: id.into(),
        network: "n1".into(),
        host: Some("h1".into()),
        ..VmSpec::default()
    }
}

fn code<T: std::fmt::Debug>(r: Planned<T>) -> ErrorCode {
    r.expect_err("should refuse").code
}

#[test]
fn allocation_skips_reserved_and_is_deterministic() {
    let mut m = base();
    let a = apply!(m, create_vm(&m, &vm_spec("a"), secret(), reuse()));
    assert_eq!(a.ip, Ipv4Addr::new(10, 1, 0, 2));
    assert_eq!(a.mac.to_string(), "02:01:0a:01:00:02");
    assert_eq!(a.host_port, Some(40000));
    assert_eq!(
        a.nat_ports,
        vec![PortRange {
            first: 1024,
            last: 1535
        }]
    );
    assert_eq!(a.hostname, "a");
    let b = apply!(m, create_vm(&m, &vm_spec("b"), secret(), reuse()));
    assert_eq!(b.ip, Ipv4Addr::new(10, 1, 0, 3));
    assert_eq!(b.host_port, Some(40001));
    assert_eq!(b.nat_ports[0].first, 1536);
    assert_eq!(
        code(create_vm(&m, &vm_spec("c"), secret(), reuse())),
        ErrorCode::PoolExhausted,
        "host ports used up"
    );
    assert_eq!(m.generation, 2);
    assert_eq!(m.vm_by_ip("n1", b.ip).unwrap().id, "b");
}

#[test]
fn bad_vm_input_is_refused() {
    let mut m = base();
    apply!(m, create_vm(&m, &vm_spec("a"), secret(), reuse()));
    let with = |f: &dyn Fn(&mut VmSpec)| {
        let mut s = vm_spec("z");
        f(&mut s);
        code(create_vm(&m, &s, secret(), reuse()))
    };
    assert_eq!(
        with(&|s| s.ip = Some(Ipv4Addr::new(10, 2, 0, 5))),
        ErrorCode::AddressOutsideCidr
    );
    assert_eq!(
        with(&|s| s.ip = Some(Ipv4Addr::new(10, 1, 0, 1))),
        ErrorCode::AddressReserved
    );
    assert_eq!(
        with(&|s| s.ip = Some(Ipv4Addr::new(10, 1, 0, 255))),
        ErrorCode::AddressReserved
    );
    assert_eq!(
        with(&|s| s.ip = Some(Ipv4Addr::new(10, 1, 0, 2))),
        ErrorCode::DuplicateIp
    );
    assert_eq!(
        with(&|s| s.mac = Some("02:01:0a:01:00:02".parse().unwrap())),
        ErrorCode::DuplicateMac
    );
    assert_eq!(
        with(&|s| s.network = "nope".into()),
        ErrorCode::UnknownNetwork
    );
    assert_eq!(
        with(&|s| s.host = Some("nope".into())),
        ErrorCode::UnknownHost
    );
    assert_eq!(
        with(&|s| s.host_port = Some(40000)),
        ErrorCode::DuplicatePort
    );
    assert_eq!(
        with(&|s| s.host_port = Some(1)),
        ErrorCode::PortOutsideRange
    );
    assert_eq!(with(&|s| s.id = "Bad_Id".into()), ErrorCode::InvalidId);
    assert_eq!(with(&|s| s.id = "a".into()), ErrorCode::Duplicate);
    assert_eq!(
        with(&|s| s.tags = vec!["no spaces".into()]),
        ErrorCode::BadRequest
    );
    assert_eq!(
        with(&|s| s.service_account = Some("a b".into())),
        ErrorCode::BadRequest
    );
}

#[test]
fn network_rules() {
    let m = base();
    let mut spec = NetworkSpec {
        id: "n2".into(),
        vni: Some(1),
        cidr: "10.2.0.0/24".parse().unwrap(),
        mtu: None,
        default_policy: None,
        nat_block: None,
    };
    assert_eq!(code(create_network(&m, &spec)), ErrorCode::DuplicateVni);
    spec.vni = None;
    spec.cidr = "10.1.0.0/16".parse().unwrap();
    assert_eq!(
        code(create_network(&m, &spec)),
        ErrorCode::Duplicate,
        "overlap"
    );
    spec.cidr = "10.2.0.0/24".parse().unwrap();
    spec.mtu = Some(100);
    assert_eq!(code(create_network(&m, &spec)), ErrorCode::BadRequest);
    spec.mtu = None;
    let (_, n2) = create_network(&m, &spec).unwrap();
    assert_eq!(n2.vni, 2);
    assert_eq!(n2.router, Ipv4Addr::new(10, 2, 0, 1));
}

#[test]
fn delete_network_refuses_unless_cascade() {
    let mut m = base();
    apply!(m, create_vm(&m, &vm_spec("a"), secret(), reuse()));
    assert_eq!(
        code(delete_network(&m, "n1", false, reuse())),
        ErrorCode::NotEmpty
    );
    assert_eq!(code(delete_host(&m, "h1")), ErrorCode::NotEmpty);
    let d = apply!(m, delete_network(&m, "n1", true, reuse()));
    assert_eq!(d.cascaded, vec!["vm/a".to_string()]);
    assert!(m.vms.is_empty() && m.secrets.is_empty() && m.by_ip.is_empty());
    assert_eq!(m.changes.back().unwrap().kind, ChangeKind::Deleted);
}

#[test]
fn endpoint_only_from_owner_and_own_address() {
    let mut m = base();
    apply!(m, create_vm(&m, &vm_spec("a"), secret(), reuse()));
    let h2 = HostSpec {
        id: "h2".into(),
        underlay_addr: Ipv4Addr::new(198, 18, 0, 2),
        port_range: None,
    };
    apply!(m, create_host(&m, &h2));
    let up = EndpointUpdate {
        host_addr: Ipv4Addr::new(198, 18, 0, 2),
        port: 40000,
    };
    assert_eq!(
        code(register_endpoint(&m, "h2", "a", &up, reuse())),
        ErrorCode::NotOwner
    );
    assert_eq!(
        code(register_endpoint(&m, "h1", "a", &up, reuse())),
        ErrorCode::WrongHost
    );
    // Migration: admin moves, destination registers, generation bumps.
    apply!(
        m,
        move_vm(
            &m,
            "a",
            &MoveVm {
                host: Some("h2".into()),
                host_port: None
            },
            reuse()
        )
    );
    let ack = apply!(m, register_endpoint(&m, "h2", "a", &up, reuse()));
    assert_eq!(ack.generation, m.generation);
    let (ops, again) = register_endpoint(&m, "h2", "a", &up, reuse()).unwrap();
    assert!(ops.is_empty(), "same endpoint again changes nothing");
    assert_eq!(again, ack);
    let vm = &m.vms["a"];
    assert_eq!(vm.endpoint.unwrap().host_addr, Ipv4Addr::new(198, 18, 0, 2));
    let (changes, resync) = m.changes_since(1, &["a".to_string()]);
    assert!(!resync);
    assert_eq!(
        changes.iter().map(|c| c.kind).collect::<Vec<_>>(),
        vec![ChangeKind::Moved, ChangeKind::Endpoint]
    );
}

#[test]
fn rotation_bumps_generation() {
    let mut m = base();
    apply!(m, create_vm(&m, &vm_spec("a"), secret(), reuse()));
    let vm = apply!(m, rotate_vm_secret(&m, "a", VmSecret::from_bytes([9; 32])));
    assert_eq!(vm.secret_generation, 2);
    let e = &m.secrets[&SecretOwner::Vm("a".into())];
    assert_eq!(e.generation, 2);
    assert_eq!(e.secret.as_bytes(), &[9; 32]);
}

#[test]
fn change_log_is_trimmed_and_resync_reported() {
    let mut m = base();
    apply!(m, create_vm(&m, &vm_spec("a"), secret(), reuse()));
    for _ in 0..CHANGE_LOG_RETAIN + 5 {
        apply!(m, rotate_vm_secret(&m, "a", secret()));
    }
    assert_eq!(m.changes.len(), CHANGE_LOG_RETAIN);
    let (_, resync) = m.changes_since(0, &[]);
    assert!(resync);
    let (changes, resync) = m.changes_since(m.generation - 1, &[]);
    assert!(!resync);
    assert_eq!(changes.len(), 1);
}

fn h2() -> HostSpec {
    HostSpec {
        id: "h2".into(),
        underlay_addr: Ipv4Addr::new(198, 18, 0, 2),
        port_range: Some("40000-40001".parse().unwrap()),
    }
}

fn with_port(id: &str, port: u16) -> VmSpec {
    VmSpec {
        host_port: Some(port),
        ..vm_spec(id)
    }
}

#[test]
fn a_deleted_vms_port_goes_to_no_other_vm_until_the_quarantine_ends() {
    let mut m = base();
    let a = apply!(m, create_vm(&m, &vm_spec("a"), secret(), reuse()));
    assert_eq!(a.host_port, Some(40000));
    apply!(m, delete_vm(&m, "a", reuse()));
    let q = &m.quarantined[&("h1".to_string(), 40000)];
    assert_eq!((q.vm.as_str(), q.until), ("a", NOW + 600));
    // Picked: the next port, not the quarantined one.
    let b = apply!(
        m,
        create_vm(&m, &vm_spec("b"), secret(), reuse_at(NOW + 599))
    );
    assert_eq!(b.host_port, Some(40001));
    // Asked for: refused with a clear code, even after the other port ran out.
    assert_eq!(
        code(create_vm(
            &m,
            &with_port("c", 40000),
            secret(),
            reuse_at(NOW + 599)
        )),
        ErrorCode::PortQuarantined
    );
    assert_eq!(
        code(create_vm(&m, &vm_spec("c"), secret(), reuse_at(NOW + 599))),
        ErrorCode::PoolExhausted
    );
    // Once the period has passed the port is free again.
    let c = apply!(
        m,
        create_vm(&m, &vm_spec("c"), secret(), reuse_at(NOW + 600))
    );
    assert_eq!(c.host_port, Some(40000));
}

#[test]
fn a_moved_vms_old_port_is_quarantined_but_the_vm_may_come_back_to_it() {
    let mut m = base();
    apply!(m, create_host(&m, &h2()));
    apply!(m, create_vm(&m, &vm_spec("a"), secret(), reuse()));
    let to = |host: &str| MoveVm {
        host: Some(host.into()),
        host_port: None,
    };
    apply!(m, move_vm(&m, "a", &to("h2"), reuse()));
    assert_eq!(
        code(create_vm(&m, &with_port("b", 40000), secret(), reuse())),
        ErrorCode::PortQuarantined
    );
    // Moving within the same host to the same port releases nothing.
    let (ops, _) = move_vm(&m, "a", &to("h2"), reuse()).unwrap();
    assert!(!ops.iter().any(|o| matches!(o, Op::QuarantinePort(_))));
    // The VM that had the port may take it back at once.
    let back = MoveVm {
        host: Some("h1".into()),
        host_port: Some(40000),
    };
    let a = apply!(m, move_vm(&m, "a", &back, reuse_at(NOW + 1)));
    assert_eq!(a.host_port, Some(40000));
    // Detaching quarantines the port it held.
    let off = MoveVm {
        host: None,
        host_port: None,
    };
    apply!(m, move_vm(&m, "a", &off, reuse_at(NOW + 2)));
    assert_eq!(m.quarantined[&("h1".to_string(), 40000)].until, NOW + 602);
}

#[test]
fn endpoint_on_a_quarantined_port_is_refused_and_a_changed_port_is_quarantined() {
    let mut m = base();
    apply!(m, create_vm(&m, &vm_spec("a"), secret(), reuse()));
    apply!(m, create_vm(&m, &vm_spec("b"), secret(), reuse()));
    apply!(m, delete_vm(&m, "a", reuse()));
    let at = |port| EndpointUpdate {
        host_addr: Ipv4Addr::new(198, 18, 0, 1),
        port,
    };
    assert_eq!(
        code(register_endpoint(&m, "h1", "b", &at(40000), reuse())),
        ErrorCode::PortQuarantined
    );
    // b registers on another port (outside the range: vnpd bound what it could): b's old
    // port goes into quarantine.
    apply!(m, register_endpoint(&m, "h1", "b", &at(41000), reuse()));
    assert_eq!(m.quarantined[&("h1".to_string(), 40001)].vm, "b");
}

#[test]
fn cascades_quarantine_every_port_and_expired_quarantines_are_forgotten() {
    let mut m = base();
    apply!(m, create_vm(&m, &vm_spec("a"), secret(), reuse()));
    apply!(m, create_vm(&m, &vm_spec("b"), secret(), reuse()));
    apply!(m, delete_network(&m, "n1", true, reuse()));
    assert_eq!(m.quarantined.len(), 2);
    // Later releases on the host forget quarantines that have run out.
    let n = NetworkSpec {
        id: "n2".into(),
        vni: None,
        cidr: "10.2.0.0/24".parse().unwrap(),
        mtu: None,
        default_policy: None,
        nat_block: None,
    };
    apply!(m, create_network(&m, &n));
    let later = reuse_at(NOW + 700);
    let spec = VmSpec {
        network: "n2".into(),
        ..vm_spec("c")
    };
    let c = apply!(m, create_vm(&m, &spec, secret(), later));
    assert_eq!(c.host_port, Some(40000));
    apply!(m, delete_vm(&m, "c", later));
    let left: Vec<_> = m
        .quarantined
        .values()
        .map(|q| (q.port, q.vm.clone()))
        .collect();
    assert_eq!(left, vec![(40000, "c".to_string())]);
    // Deleting the host forgets its quarantines.
    apply!(m, delete_host(&m, "h1"));
    assert!(m.quarantined.is_empty());
}

#[test]
fn zero_quarantine_hands_ports_on_at_once() {
    let mut m = base();
    let none = PortReuse {
        now: NOW,
        quarantine_secs: 0,
    };
    apply!(m, create_vm(&m, &vm_spec("a"), secret(), none));
    apply!(m, delete_vm(&m, "a", none));
    assert!(m.quarantined.is_empty());
    let b = apply!(m, create_vm(&m, &vm_spec("b"), secret(), none));
    assert_eq!(b.host_port, Some(40000));
}
