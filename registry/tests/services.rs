//! Load-balanced services over real mutual TLS (real `vnp-registry`, real client), on redb and
//! on a real etcd: create, list, show, pool changes, what the gateways' config and watch carry,
//! and refusals.

mod common;

use common::{Backend, Fixture};
use std::net::Ipv4Addr;
use std::time::Duration;
use vnp_registry_client::*;

const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Api { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// n1 with VMs a, b (tag web) and c, gateways g1 and g2 on one public address.
fn setup(f: &Fixture) {
    let admin = f.reg.client("admin");
    admin
        .create_network(&NetworkSpec {
            id: "n1".into(),
            vni: None,
            cidr: "10.1.0.0/24".parse().unwrap(),
            mtu: None,
            default_policy: None,
            nat_block: None,
        })
        .unwrap();
    for (id, tags) in [("a", vec!["web"]), ("b", vec!["web"]), ("c", vec![])] {
        admin
            .create_vm(&VmSpec {
                id: id.into(),
                network: "n1".into(),
                tags: tags.into_iter().map(String::from).collect(),
                ..VmSpec::default()
            })
            .unwrap();
    }
    for (id, last) in [("g1", 9), ("g2", 10)] {
        admin
            .create_gateway(&GatewaySpec {
                id: id.into(),
                network: "n1".into(),
                underlay_addr: Ipv4Addr::new(198, 18, 0, last),
                port: 6081,
                public_addr: Some(PUBLIC),
            })
            .unwrap();
    }
}

fn services_through_the_api(backend: Backend) {
    let f = Fixture::on(backend, "lbsvc");
    setup(&f);
    let admin = f.reg.client("admin");
    let g1 = f.reg.client("g1");
    let spec = ServiceSpec {
        id: "web".into(),
        public_addr: PUBLIC,
        public_port: 80,
        proto: L4Proto::Tcp,
        vm_port: Some(8080),
        members: vec![PoolMember {
            tag: Some("web".into()),
            vm: None,
            weight: 2,
        }],
        health: HealthCheckSpec {
            http: Some(HttpCheck {
                path: "/health".into(),
                expect_status: 200,
            }),
            ..HealthCheckSpec::default()
        },
        table_size: Some(251),
    };
    // Only admins; gateways read services in their config.
    assert_eq!(code(g1.create_service(&spec)), ErrorCode::AdminRequired);
    let s = admin.create_service(&spec).unwrap();
    assert_eq!(
        (s.network.as_str(), s.vm_port, s.table_size),
        ("n1", 8080, 251)
    );
    assert_eq!(code(admin.create_service(&spec)), ErrorCode::Duplicate);
    assert_eq!(admin.list_services(None).unwrap(), vec![s.clone()]);
    assert_eq!(admin.list_services(Some("n2")).unwrap(), vec![]);
    let st = admin.get_service("web").unwrap();
    let pool: Vec<&str> = st.pool.iter().map(|m| m.vm.as_str()).collect();
    assert_eq!(pool, ["a", "b"]);

    // Both gateways of the address get the service with its resolved pool.
    let cfg = g1.gateway_config("g1").unwrap();
    assert_eq!(cfg.services.len(), 1);
    assert_eq!(cfg.services[0].pool, st.pool);
    let sources = [Ipv4Addr::new(198, 18, 0, 9), Ipv4Addr::new(198, 18, 0, 10)];
    assert_eq!(
        cfg.probe_sources, sources,
        "both gateways' underlay addresses"
    );
    assert_eq!(admin.gateway_config("g2").unwrap().services, cfg.services);

    // A pool change wakes the gateways' watch and shows in the next config.
    let since = cfg.generation;
    let c = PoolMember {
        vm: Some("c".into()),
        tag: None,
        weight: 5,
    };
    admin.add_service_member("web", &c).unwrap();
    let w = g1.watch(&[], since, Duration::from_secs(5)).unwrap();
    assert_eq!(w.changes.len(), 1, "{w:?}");
    assert_eq!(
        (w.changes[0].vm.as_str(), w.changes[0].kind),
        ("c", ChangeKind::Forwards)
    );
    let cfg = g1.gateway_config("g1").unwrap();
    let weights: Vec<(&str, u32)> = cfg.services[0]
        .pool
        .iter()
        .map(|m| (m.vm.as_str(), m.weight))
        .collect();
    assert_eq!(weights, [("a", 2), ("b", 2), ("c", 5)]);
    admin
        .remove_service_member("web", None, Some("web"))
        .unwrap();
    assert_eq!(admin.get_service("web").unwrap().pool.len(), 1);
    assert_eq!(
        code(admin.remove_service_member("web", None, Some("web"))),
        ErrorCode::NotFound
    );

    // The public port is the service's: no forward on it.
    let fwd = ForwardSpec {
        id: "f".into(),
        public_addr: PUBLIC,
        public_port: 80,
        proto: L4Proto::Tcp,
        vm: "a".into(),
        vm_port: 80,
    };
    assert_eq!(code(admin.create_forward(&fwd)), ErrorCode::PortInUse);
    let bad = ServiceSpec {
        id: "bad".into(),
        public_port: 81,
        table_size: Some(65_536),
        ..spec.clone()
    };
    assert_eq!(code(admin.create_service(&bad)), ErrorCode::BadRequest);

    // Each gateway publishes its view; the service shows it; only the gateway itself may.
    let report = HealthReport {
        members: vec![MemberHealth {
            service: "web".into(),
            vm: "c".into(),
            up: false,
        }],
    };
    assert_eq!(
        code(admin.report_health("g1", &report)),
        ErrorCode::Forbidden
    );
    g1.report_health("g1", &report).unwrap();
    let views = admin.get_service("web").unwrap().views;
    assert_eq!(views.len(), 1);
    assert_eq!(
        (views[0].gateway.as_str(), views[0].members.clone()),
        ("g1", report.members)
    );

    admin.delete_service("web").unwrap();
    assert_eq!(code(admin.get_service("web")), ErrorCode::UnknownService);
    assert!(g1.gateway_config("g1").unwrap().services.is_empty());
}

#[test]
fn services_through_the_api_on_redb() {
    services_through_the_api(Backend::Redb);
}

#[test]
fn services_through_the_api_on_etcd() {
    services_through_the_api(Backend::Etcd);
}

fn api_message(r: Result<impl std::fmt::Debug, ClientError>) -> (u16, ErrorCode, String) {
    match r {
        Err(ClientError::Api {
            status,
            code,
            message,
        }) => (status, code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A service's VM and health-check ports stay out of the network's NAT blocks, a forward's VM
/// port out of its VM's; blocks handed out later skip them (issue #10).
fn vm_ports_outside_nat_blocks(backend: Backend) {
    let f = Fixture::on(backend, "lbports");
    setup(&f);
    let admin = f.reg.client("admin");
    // a 1024-1535, b 1536-2047, c 2048-2559 (blocks of 512, in creation order).
    let a = admin.get_vm("a").unwrap();
    assert_eq!(a.nat_ports[0].to_string(), "1024-1535");
    let inside = ServiceSpec {
        id: "web".into(),
        public_addr: PUBLIC,
        public_port: 80,
        proto: L4Proto::Tcp,
        vm_port: Some(1100),
        members: vec![PoolMember {
            tag: Some("web".into()),
            vm: None,
            weight: 1,
        }],
        health: HealthCheckSpec::default(),
        table_size: None,
    };
    let (status, code, message) = api_message(admin.create_service(&inside));
    assert_eq!((status, code), (409, ErrorCode::PortInUse), "{message}");
    assert!(
        message.contains("service web's VM port 1100")
            && message.contains("VM a's NAT block 1024-1535"),
        "{message}"
    );
    let fwd = ForwardSpec {
        id: "ssh".into(),
        public_addr: PUBLIC,
        public_port: 22,
        proto: L4Proto::Tcp,
        vm: "c".into(),
        vm_port: 2222,
    };
    let (status, _, message) = api_message(admin.create_forward(&fwd));
    assert_eq!(status, 409, "{message}");
    assert!(
        message.contains("forward ssh's VM port 2222")
            && message.contains("VM c's NAT block 2048-2559"),
        "{message}"
    );
    assert!(admin.list_services(None).unwrap().is_empty());
    assert!(admin.list_forwards(None).unwrap().is_empty());

    // Ports in the next free blocks are taken, and growth skips them: the service's check port
    // (2600, in 2560-3071) for every VM, the forward's VM port (3100, in 3072-3583) for c only.
    let ok = ServiceSpec {
        vm_port: Some(8080),
        health: HealthCheckSpec {
            port: Some(2600),
            ..HealthCheckSpec::default()
        },
        ..inside
    };
    admin.create_service(&ok).unwrap();
    admin
        .create_forward(&ForwardSpec {
            vm_port: 3100,
            ..fwd
        })
        .unwrap();
    let c = admin.grow_nat_ports("c", 1).unwrap();
    assert_eq!(c.nat_ports[1].to_string(), "3584-4095");
    let b = admin.grow_nat_ports("b", 1).unwrap();
    assert_eq!(b.nat_ports[1].to_string(), "3072-3583");
}

#[test]
fn vm_ports_outside_nat_blocks_on_redb() {
    vm_ports_outside_nat_blocks(Backend::Redb);
}

#[test]
fn vm_ports_outside_nat_blocks_on_etcd() {
    vm_ports_outside_nat_blocks(Backend::Etcd);
}
