//! Unit tests of the planners: every rule about bad input.

use super::*;

fn secret() -> VmSecret {
    VmSecret::from_bytes([7; 32])
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
    let a = apply!(m, create_vm(&m, &vm_spec("a"), secret()));
    assert_eq!(a.ip, Ipv4Addr::new(10, 1, 0, 2));
    assert_eq!(a.mac.to_string(), "02:01:0a:01:00:02");
    assert_eq!(a.host_port, Some(40000));
    assert_eq!(
        a.nat_ports,
        PortRange {
            first: 1024,
            last: 2047
        }
    );
    assert_eq!(a.hostname, "a");
    let b = apply!(m, create_vm(&m, &vm_spec("b"), secret()));
    assert_eq!(b.ip, Ipv4Addr::new(10, 1, 0, 3));
    assert_eq!(b.host_port, Some(40001));
    assert_eq!(b.nat_ports.first, 2048);
    assert_eq!(
        code(create_vm(&m, &vm_spec("c"), secret())),
        ErrorCode::PoolExhausted,
        "host ports used up"
    );
    assert_eq!(m.generation, 2);
    assert_eq!(m.vm_by_ip("n1", b.ip).unwrap().id, "b");
}

#[test]
fn bad_vm_input_is_refused() {
    let mut m = base();
    apply!(m, create_vm(&m, &vm_spec("a"), secret()));
    let with = |f: &dyn Fn(&mut VmSpec)| {
        let mut s = vm_spec("z");
        f(&mut s);
        code(create_vm(&m, &s, secret()))
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
    apply!(m, create_vm(&m, &vm_spec("a"), secret()));
    assert_eq!(code(delete_network(&m, "n1", false)), ErrorCode::NotEmpty);
    assert_eq!(code(delete_host(&m, "h1")), ErrorCode::NotEmpty);
    let d = apply!(m, delete_network(&m, "n1", true));
    assert_eq!(d.cascaded, vec!["vm/a".to_string()]);
    assert!(m.vms.is_empty() && m.secrets.is_empty() && m.by_ip.is_empty());
    assert_eq!(m.changes.back().unwrap().kind, ChangeKind::Deleted);
}

#[test]
fn endpoint_only_from_owner_and_own_address() {
    let mut m = base();
    apply!(m, create_vm(&m, &vm_spec("a"), secret()));
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
        code(register_endpoint(&m, "h2", "a", &up)),
        ErrorCode::NotOwner
    );
    assert_eq!(
        code(register_endpoint(&m, "h1", "a", &up)),
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
            }
        )
    );
    let ack = apply!(m, register_endpoint(&m, "h2", "a", &up));
    assert_eq!(ack.generation, m.generation);
    let (ops, again) = register_endpoint(&m, "h2", "a", &up).unwrap();
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
    apply!(m, create_vm(&m, &vm_spec("a"), secret()));
    let vm = apply!(m, rotate_vm_secret(&m, "a", VmSecret::from_bytes([9; 32])));
    assert_eq!(vm.secret_generation, 2);
    let e = &m.secrets[&SecretOwner::Vm("a".into())];
    assert_eq!(e.generation, 2);
    assert_eq!(e.secret.as_bytes(), &[9; 32]);
}

#[test]
fn change_log_is_trimmed_and_resync_reported() {
    let mut m = base();
    apply!(m, create_vm(&m, &vm_spec("a"), secret()));
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
