//! The public side of a network over real mutual TLS (real `vnp-registry`, real client), on
//! redb and on a real etcd: several gateways sharing a public address, gateway-scoped tokens,
//! NAT blocks that grow, port-forwarding rules, and the gateway's config + watch.

mod common;

use common::{Backend, Fixture};
use std::net::Ipv4Addr;
use std::time::Duration;
use vnp_protocol::token::verify;
use vnp_protocol::OUTSIDE;
use vnp_registry_client::*;

const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Api { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// n1 with VMs a (h1) and b (h2), gateways g1 and g2 on one public address.
fn setup(f: &Fixture) -> (VmRecord, VmRecord) {
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
    for (h, last) in [("h1", 1), ("h2", 2)] {
        admin
            .create_host(&HostSpec {
                id: h.into(),
                underlay_addr: Ipv4Addr::new(198, 18, 0, last),
                port_range: None,
            })
            .unwrap();
    }
    let vm = |id: &str, host: &str| VmSpec {
        id: id.into(),
        network: "n1".into(),
        host: Some(host.into()),
        ..VmSpec::default()
    };
    let a = admin.create_vm(&vm("a", "h1")).unwrap();
    let b = admin.create_vm(&vm("b", "h2")).unwrap();
    for (id, last) in [("g1", 9), ("g2", 10)] {
        let g = admin
            .create_gateway(&GatewaySpec {
                id: id.into(),
                network: "n1".into(),
                underlay_addr: Ipv4Addr::new(198, 18, 0, last),
                port: 6081,
                public_addr: Some(PUBLIC),
            })
            .unwrap();
        assert_eq!(g.public_addr, PUBLIC);
    }
    (a, b)
}

fn gateway_pool_tokens_and_config(backend: Backend) {
    let f = Fixture::on(backend, "gwpool");
    let (a, b) = setup(&f);
    let admin = f.reg.client("admin");
    let h1 = f.reg.client("h1");
    let g1 = f.reg.client("g1");
    // Any outside address gets the same tuple, towards one of the pool's gateways.
    let t1 = h1
        .request_token("a", Ipv4Addr::new(203, 0, 113, 7))
        .unwrap();
    let t2 = h1.request_token("a", Ipv4Addr::new(8, 8, 8, 8)).unwrap();
    assert_eq!(t1.fields(), t2.fields());
    assert_eq!(t1.dst_ip, OUTSIDE);
    assert!([9, 10].contains(&t1.dst_host.octets()[3]), "{t1:?}");
    // g1 verifies tokens addressed to it with its own secret.
    let (s1, _) = g1.get_gateway_secret("g1").unwrap();
    if t1.dst_host == Ipv4Addr::new(198, 18, 0, 9) {
        assert!(verify(&s1, &t1.fields(), &t1.token_value().unwrap()));
    }
    // The gateway's token towards b verifies with b's secret.
    let back = g1.request_gateway_token("g1", b.ip).unwrap();
    let (sb, _) = f.reg.client("h2").get_vm_secret("b").unwrap();
    assert!(verify(&sb, &back.fields(), &back.token_value().unwrap()));
    assert_eq!((back.src_ip, back.dst_vm.as_deref()), (OUTSIDE, Some("b")));
    // Addresses inside the network are no outside source.
    let inside = TokenRequest {
        src_vm: None,
        src_gateway: Some("g1".into()),
        src_ip: Some(Ipv4Addr::new(10, 1, 0, 9)),
        dst_ip: a.ip,
    };
    assert_eq!(code(g1.request_token_raw(&inside)), ErrorCode::BadRequest);

    // The config: both VMs with blocks and locations, the pool, no forwards yet.
    let cfg = g1.gateway_config("g1").unwrap();
    assert_eq!(cfg.pool, vec!["g2".to_string()]);
    assert_eq!(cfg.gateway.public_addr, PUBLIC);
    let peer_a = cfg.vms.iter().find(|v| v.id == "a").unwrap();
    assert_eq!(peer_a.nat_ports, a.nat_ports);
    assert_eq!(
        peer_a.location,
        Some(UnderlayAddr {
            host_addr: Ipv4Addr::new(198, 18, 0, 1),
            port: a.host_port.unwrap()
        })
    );
    assert!(peer_a.egress);
    assert_eq!(code(g1.gateway_config("g2")), ErrorCode::AdminRequired);
    assert_eq!(code(h1.gateway_config("g1")), ErrorCode::AdminRequired);
    // A public address serves one network.
    admin
        .create_network(&NetworkSpec {
            id: "n2".into(),
            vni: None,
            cidr: "10.2.0.0/24".parse().unwrap(),
            mtu: None,
            default_policy: None,
            nat_block: None,
        })
        .unwrap();
    let other = GatewaySpec {
        id: "gx".into(),
        network: "n2".into(),
        underlay_addr: Ipv4Addr::new(198, 18, 0, 11),
        port: 6081,
        public_addr: Some(PUBLIC),
    };
    assert_eq!(code(admin.create_gateway(&other)), ErrorCode::Duplicate);
}

fn nat_growth_and_forwards_are_watched(backend: Backend) {
    let f = Fixture::on(backend, "gwfwd");
    let (a, b) = setup(&f);
    let admin = f.reg.client("admin");
    let g1 = f.reg.client("g1");
    let since = g1.gateway_config("g1").unwrap().generation;

    // Growing a VM's NAT ports: a new disjoint block, a `nat_ports` change.
    let grown = admin.grow_nat_ports("a", 1).unwrap();
    assert_eq!(grown.nat_ports.len(), 2);
    assert!(!b.nat_ports.iter().any(|x| x.overlaps(&grown.nat_ports[1])));
    let w = g1.watch(&[], since, Duration::from_secs(5)).unwrap();
    assert_eq!(
        w.changes
            .iter()
            .map(|c| (c.vm.as_str(), c.kind))
            .collect::<Vec<_>>(),
        vec![("a", ChangeKind::NatPorts)]
    );
    assert_eq!(
        g1.gateway_config("g1")
            .unwrap()
            .vms
            .iter()
            .find(|v| v.id == "a")
            .unwrap()
            .nat_ports,
        grown.nat_ports
    );

    // Forwarding rules: validated, listed, in the config, watched.
    let spec = ForwardSpec {
        id: "web".into(),
        public_addr: PUBLIC,
        public_port: 443,
        proto: L4Proto::Tcp,
        vm: "b".into(),
        vm_port: 8443,
    };
    let rule = admin.create_forward(&spec).unwrap();
    assert_eq!(rule.network, "n1");
    let inside_nat = ForwardSpec {
        id: "bad".into(),
        public_port: a.nat_ports[0].first + 5,
        ..spec.clone()
    };
    assert_eq!(
        code(admin.create_forward(&inside_nat)),
        ErrorCode::PortInUse
    );
    assert_eq!(code(admin.create_forward(&spec)), ErrorCode::Duplicate);
    let elsewhere = ForwardSpec {
        id: "bad".into(),
        public_addr: Ipv4Addr::new(192, 0, 2, 1),
        ..spec.clone()
    };
    assert_eq!(code(admin.create_forward(&elsewhere)), ErrorCode::NoGateway);
    assert_eq!(code(g1.create_forward(&spec)), ErrorCode::AdminRequired);
    let w = g1.watch(&[], w.generation, Duration::from_secs(5)).unwrap();
    assert_eq!(w.changes[0].kind, ChangeKind::Forwards);
    assert_eq!(
        g1.gateway_config("g1").unwrap().forwards,
        vec![rule.clone()]
    );
    assert_eq!(admin.list_forwards(Some("n1")).unwrap(), vec![rule]);

    // Egress denied: b still gets its gateway token (replies of forwarded connections), the
    // config says it may not start connections; a without forwards gets no token at all.
    admin
        .create_rule(&PolicyRuleSpec {
            id: "no-out".into(),
            network: "n1".into(),
            action: PolicyAction::Deny,
            a: Selector::Any,
            b: Selector::External,
        })
        .unwrap();
    let out = Ipv4Addr::new(198, 51, 100, 1);
    assert!(f.reg.client("h2").request_token("b", out).is_ok());
    assert_eq!(
        code(f.reg.client("h1").request_token("a", out)),
        ErrorCode::PolicyDenied
    );
    assert!(g1.request_gateway_token("g1", b.ip).is_ok());
    assert_eq!(
        code(g1.request_gateway_token("g1", a.ip)),
        ErrorCode::PolicyDenied
    );
    let cfg = g1.gateway_config("g1").unwrap();
    assert!(cfg.vms.iter().all(|v| !v.egress), "{:?}", cfg.vms);

    // Removing the rule, then the VM.
    assert_eq!(admin.delete_forward("web").unwrap().deleted, "forward/web");
    assert_eq!(code(admin.delete_forward("web")), ErrorCode::UnknownForward);
    assert!(g1.gateway_config("g1").unwrap().forwards.is_empty());
}

/// Each test above, once per backend.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod redb {
            $(#[test]
            fn $name() {
                super::$name(super::Backend::Redb)
            })*
        }
        mod etcd {
            $(#[test]
            fn $name() {
                super::$name(super::Backend::Etcd)
            })*
        }
    };
}

on_both_backends!(
    gateway_pool_tokens_and_config,
    nat_growth_and_forwards_are_watched,
);
