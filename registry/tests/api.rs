//! Integration tests over real mutual TLS on loopback: the real `vnp-registry` binary, the real
//! blocking client, certificates from a throwaway CA. Every test runs twice: on the embedded
//! redb store (`redb::…`) and on a real one-member etcd cluster (`etcd::…`).

mod common;

use common::{Backend, Fixture, Pki, TempDir};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use vnp_protocol::token::verify;
use vnp_registry_client::*;

fn net(id: &str, cidr: &str) -> NetworkSpec {
    NetworkSpec {
        id: id.into(),
        vni: None,
        cidr: cidr.parse().unwrap(),
        mtu: None,
        default_policy: None,
        nat_block: None,
    }
}

fn vm(id: &str, network: &str, host: &str) -> VmSpec {
    VmSpec {
        id: id.into(),
        network: network.into(),
        host: Some(host.into()),
        ..VmSpec::default()
    }
}

/// Network n1 10.1.0.0/24, hosts h1 (198.18.0.1) and h2 (198.18.0.2), VMs a on h1, b on h2.
fn populate(f: &Fixture) -> (VmRecord, VmRecord) {
    let admin = f.reg.client("admin");
    admin.create_network(&net("n1", "10.1.0.0/24")).unwrap();
    for (h, last) in [("h1", 1), ("h2", 2)] {
        admin
            .create_host(&HostSpec {
                id: h.into(),
                underlay_addr: Ipv4Addr::new(198, 18, 0, last),
                port_range: None,
            })
            .unwrap();
    }
    let a = admin.create_vm(&vm("a", "n1", "h1")).unwrap();
    let b = admin.create_vm(&vm("b", "n1", "h2")).unwrap();
    (a, b)
}

fn add_gateway(f: &Fixture) {
    let spec = GatewaySpec {
        id: "g1".into(),
        network: "n1".into(),
        underlay_addr: Ipv4Addr::new(198, 18, 0, 9),
        port: 6081,
        public_addr: None,
    };
    f.reg.client("admin").create_gateway(&spec).unwrap();
}

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Api { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn happy_path_token_endpoint_and_watch(backend: Backend) {
    let f = Fixture::on(backend, "happy");
    let (a, b) = populate(&f);
    let (h1, h2) = (f.reg.client("h1"), f.reg.client("h2"));
    assert_eq!(
        h1.whoami().unwrap(),
        Identity {
            role: Role::Host,
            id: "h1".into()
        }
    );
    assert_eq!(a.ip, Ipv4Addr::new(10, 1, 0, 2));
    assert_eq!(b.ip, Ipv4Addr::new(10, 1, 0, 3));

    // Each host gets the secret of the VM it runs.
    let (sa, gen_a) = h1.get_vm_secret("a").unwrap();
    let (sb, _) = h2.get_vm_secret("b").unwrap();
    assert_eq!(gen_a, 1);
    assert_ne!(sa.as_bytes(), sb.as_bytes());
    assert_eq!(
        h1.list_host_vms()
            .unwrap()
            .iter()
            .map(|v| v.id.as_str())
            .collect::<Vec<_>>(),
        ["a"]
    );

    // h1 asks for a -> b; h2 can verify it with b's secret, exactly as vnpd will.
    let g = h1.request_token("a", b.ip).unwrap();
    assert_eq!(g.dst_vm.as_deref(), Some("b"));
    assert_eq!(
        (g.dst_host, g.dst_port),
        (Ipv4Addr::new(198, 18, 0, 2), b.host_port.unwrap())
    );
    assert_eq!(
        (g.src_host, g.src_port, g.src_ip),
        (Ipv4Addr::new(198, 18, 0, 1), a.host_port.unwrap(), a.ip)
    );
    assert_eq!(g.network_id, a.vni);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as u32;
    assert!(
        g.expiry >= now + 590 && g.expiry <= now + 610,
        "default TTL 600 s"
    );
    let token = g.token_value().unwrap();
    assert!(verify(&sb, &g.fields(), &token));
    assert!(!verify(&sa, &g.fields(), &token));

    // h2 registers b's endpoint on a new port; a watcher of b sees it; new tokens follow it.
    let since = f
        .reg
        .client("admin")
        .watch(&[], 0, Duration::ZERO)
        .unwrap()
        .generation;
    let generation = h2
        .register_endpoint("b", Ipv4Addr::new(198, 18, 0, 2), 41000)
        .unwrap();
    assert!(generation > since);
    let w = h1.watch(&["b"], since, Duration::from_secs(5)).unwrap();
    assert_eq!(w.changes.len(), 1);
    assert_eq!(w.changes[0].kind, ChangeKind::Endpoint);
    assert_eq!(w.changes[0].endpoint.unwrap().port, 41000);
    assert_eq!(w.generation, generation);
    // The change names the destination of the a->b token: a cache of it is stale now.
    assert_eq!(w.changes[0].vm, g.dst_vm.clone().unwrap());
    let g2 = h1.request_token("a", b.ip).unwrap();
    assert_eq!(g2.dst_port, 41000);
    assert!(verify(&sb, &g2.fields(), &g2.token_value().unwrap()));
}

fn secrets_only_for_the_owning_host(backend: Backend) {
    let f = Fixture::on(backend, "secret");
    populate(&f);
    add_gateway(&f);
    assert_eq!(
        code(f.reg.client("h2").get_vm_secret("a")),
        ErrorCode::NotOwner
    );
    assert_eq!(
        code(f.reg.client("admin").get_vm_secret("a")),
        ErrorCode::NotOwner,
        "not even an admin"
    );
    assert_eq!(
        code(f.reg.client("g1").get_vm_secret("a")),
        ErrorCode::NotOwner
    );
    assert_eq!(
        code(f.reg.client("h1").get_vm_secret("nope")),
        ErrorCode::UnknownVm
    );
    // The refusal never carries the secret; the record never carries it either.
    let (secret, _) = f.reg.client("h1").get_vm_secret("a").unwrap();
    let hex = secret.to_hex();
    let (_, body) = f
        .reg
        .client("h2")
        .send_raw("GET", "/v1/vms/a/secret", None)
        .unwrap();
    assert!(!String::from_utf8_lossy(&body).contains(hex.as_str()));
    let (_, body) = f
        .reg
        .client("admin")
        .send_raw("GET", "/v1/vms/a", None)
        .unwrap();
    assert!(!String::from_utf8_lossy(&body).contains(hex.as_str()));
    let log = std::fs::read_to_string(&f.reg.log).unwrap();
    assert!(!log.contains(hex.as_str()), "secret leaked into the log");
}

fn token_only_for_vms_the_host_runs(backend: Backend) {
    let f = Fixture::on(backend, "tokowner");
    let (_, b) = populate(&f);
    add_gateway(&f);
    let h2 = f.reg.client("h2");
    match h2.request_token("a", b.ip) {
        Err(ClientError::Api {
            status,
            code,
            message,
        }) => {
            assert_eq!((status, code), (403, ErrorCode::NotOwner));
            assert!(message.contains("h2") && message.contains('a'), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // A gateway cannot pose as a VM either.
    assert_eq!(
        code(f.reg.client("g1").request_token("a", b.ip)),
        ErrorCode::Forbidden
    );
}

fn policy_deny_default_deny_and_tags(backend: Backend) {
    let f = Fixture::on(backend, "policy");
    let (a, b) = populate(&f);
    let admin = f.reg.client("admin");
    let h1 = f.reg.client("h1");
    admin
        .create_rule(&PolicyRuleSpec {
            id: "no-ab".into(),
            network: "n1".into(),
            action: PolicyAction::Deny,
            a: Selector::Vm("a".into()),
            b: Selector::Vm("b".into()),
        })
        .unwrap();
    match h1.request_token("a", b.ip) {
        Err(ClientError::Api {
            status: 403,
            code: ErrorCode::PolicyDenied,
            message,
        }) => assert!(message.contains("no-ab"), "{message}"),
        other => panic!("{other:?}"),
    }
    // Symmetric: b -> a is denied too.
    assert_eq!(
        code(f.reg.client("h2").request_token("b", a.ip)),
        ErrorCode::PolicyDenied
    );
    admin.delete_rule("no-ab").unwrap();
    h1.request_token("a", b.ip).unwrap();

    // A default-deny network that allows only web <-> db by tag.
    let mut spec = net("n2", "10.2.0.0/24");
    spec.default_policy = Some(PolicyAction::Deny);
    admin.create_network(&spec).unwrap();
    let mk = |id: &str, host: &str, tag: &str| {
        admin
            .create_vm(&VmSpec {
                tags: vec![tag.into()],
                ..vm(id, "n2", host)
            })
            .unwrap()
    };
    let web = mk("web", "h1", "web");
    let db = mk("db", "h2", "db");
    let other = mk("other", "h2", "misc");
    assert_eq!(
        code(h1.request_token("web", db.ip)),
        ErrorCode::PolicyDenied
    );
    admin
        .create_rule(&PolicyRuleSpec {
            id: "web-db".into(),
            network: "n2".into(),
            action: PolicyAction::Allow,
            a: Selector::Tag("web".into()),
            b: Selector::Tag("db".into()),
        })
        .unwrap();
    h1.request_token("web", db.ip).unwrap();
    f.reg.client("h2").request_token("db", web.ip).unwrap();
    assert_eq!(
        code(h1.request_token("web", other.ip)),
        ErrorCode::PolicyDenied
    );
    assert_eq!(admin.list_rules(Some("n2")).unwrap().len(), 1);

    // The refusals are counted by reason, and only an admin reads the counters.
    let metrics = admin.metrics_text().unwrap();
    assert!(
        metrics.contains("vnp_registry_tokens_refused_total{code=\"policy_denied\"} 4\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vnp_registry_tokens_granted_total 3\n"),
        "{metrics}"
    );
    assert!(metrics.contains("vnp_registry_vms 5\n"), "{metrics}");
    assert_eq!(code(h1.metrics_text()), ErrorCode::AdminRequired);
}

fn restart_after_crash_loses_nothing_acknowledged(backend: Backend) {
    let mut f = Fixture::on(backend, "restart");
    let (a, b) = populate(&f);
    let admin = f.reg.client("admin");
    admin
        .create_rule(&PolicyRuleSpec {
            id: "r1".into(),
            network: "n1".into(),
            action: PolicyAction::Allow,
            a: Selector::Any,
            b: Selector::External,
        })
        .unwrap();
    admin
        .create_gateway(&GatewaySpec {
            id: "g1".into(),
            network: "n1".into(),
            underlay_addr: Ipv4Addr::new(198, 18, 0, 9),
            port: 6081,
            public_addr: None,
        })
        .unwrap();
    let generation = f
        .reg
        .client("h2")
        .register_endpoint("b", Ipv4Addr::new(198, 18, 0, 2), 41000)
        .unwrap();
    let (secret_before, _) = f.reg.client("h2").get_vm_secret("b").unwrap();
    let (gw_secret_before, _) = f.reg.client("g1").get_gateway_secret("g1").unwrap();
    let vms_before = admin.list_vms(None).unwrap();

    f.reg.crash_and_restart(); // SIGKILL: no chance to flush anything
    let admin = f.reg.client("admin");
    assert_eq!(admin.list_vms(None).unwrap(), vms_before);
    assert_eq!(admin.list_networks().unwrap().len(), 1);
    assert_eq!(admin.list_hosts().unwrap().len(), 2);
    assert_eq!(admin.list_rules(None).unwrap().len(), 1);
    assert_eq!(admin.list_gateways().unwrap().len(), 1);
    let (secret_after, _) = f.reg.client("h2").get_vm_secret("b").unwrap();
    assert_eq!(secret_before, secret_after);
    assert_eq!(
        f.reg.client("g1").get_gateway_secret("g1").unwrap().0,
        gw_secret_before
    );
    let w = admin.watch(&["b"], 0, Duration::ZERO).unwrap();
    assert_eq!(w.generation, generation);
    assert_eq!(w.changes.last().unwrap().kind, ChangeKind::Endpoint);
    let g = f.reg.client("h1").request_token("a", b.ip).unwrap();
    assert_eq!(g.dst_port, 41000);
    assert!(verify(
        &secret_after,
        &g.fields(),
        &g.token_value().unwrap()
    ));
    // Allocation continues where it left off.
    let c = admin.create_vm(&vm("c", "n1", "h1")).unwrap();
    assert_eq!(c.ip, Ipv4Addr::new(10, 1, 0, 4));
    assert_ne!(c.host_port, a.host_port);
}

fn concurrent_token_requests(backend: Backend) {
    let f = Fixture::on(backend, "concurrent");
    let admin = f.reg.client("admin");
    admin.create_network(&net("n1", "10.1.0.0/24")).unwrap();
    admin
        .create_host(&HostSpec {
            id: "h1".into(),
            underlay_addr: Ipv4Addr::new(198, 18, 0, 1),
            port_range: None,
        })
        .unwrap();
    admin
        .create_host(&HostSpec {
            id: "h2".into(),
            underlay_addr: Ipv4Addr::new(198, 18, 0, 2),
            port_range: None,
        })
        .unwrap();
    let srcs: Vec<VmRecord> = (0..4)
        .map(|i| admin.create_vm(&vm(&format!("s{i}"), "n1", "h1")).unwrap())
        .collect();
    let dsts: Vec<VmRecord> = (0..4)
        .map(|i| admin.create_vm(&vm(&format!("d{i}"), "n1", "h2")).unwrap())
        .collect();
    let h2 = f.reg.client("h2");
    let secrets: Vec<_> = dsts
        .iter()
        .map(|d| h2.get_vm_secret(&d.id).unwrap().0)
        .collect();

    let threads: Vec<_> = (0..8)
        .map(|t| {
            let client = f.reg.client("h1");
            let srcs = srcs.clone();
            let dsts = dsts.clone();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                for i in 0..100 {
                    let (s, d) = (&srcs[(t + i) % 4], &dsts[i % 4]);
                    out.push((i % 4, client.request_token(&s.id, d.ip).unwrap()));
                }
                out
            })
        })
        .collect();
    // Writes interleave with the reads without disturbing them.
    for i in 0..5 {
        admin
            .create_vm(&vm(&format!("late{i}"), "n1", "h2"))
            .unwrap();
    }
    let mut n = 0;
    for t in threads {
        for (d, g) in t.join().unwrap() {
            assert!(verify(&secrets[d], &g.fields(), &g.token_value().unwrap()));
            n += 1;
        }
    }
    assert_eq!(n, 800);
}

fn gateway_tuple_for_outside_destinations(backend: Backend) {
    let f = Fixture::on(backend, "gateway");
    let (a, _) = populate(&f);
    let admin = f.reg.client("admin");
    let h1 = f.reg.client("h1");
    let outside = Ipv4Addr::new(203, 0, 113, 7);
    assert_eq!(code(h1.request_token("a", outside)), ErrorCode::NoGateway);
    admin
        .create_gateway(&GatewaySpec {
            id: "g1".into(),
            network: "n1".into(),
            underlay_addr: Ipv4Addr::new(198, 18, 0, 9),
            port: 6081,
            public_addr: None,
        })
        .unwrap();
    let g = h1.request_token("a", outside).unwrap();
    // One grant per (VM, gateway): the outside address is not in the token.
    assert_eq!(
        (g.dst_vm.clone(), g.dst_host, g.dst_port, g.dst_ip),
        (
            None,
            Ipv4Addr::new(198, 18, 0, 9),
            6081,
            vnp_protocol::OUTSIDE
        )
    );
    let gw = f.reg.client("g1");
    let (gw_secret, _) = gw.get_gateway_secret("g1").unwrap();
    assert!(verify(&gw_secret, &g.fields(), &g.token_value().unwrap()));
    assert_eq!(
        code(f.reg.client("h1").get_gateway_secret("g1")),
        ErrorCode::NotOwner
    );

    // The gateway asks for the way back in: no outside address needed, none in the token.
    let back = gw.request_gateway_token("g1", a.ip).unwrap();
    let (sa, _) = h1.get_vm_secret("a").unwrap();
    assert!(verify(&sa, &back.fields(), &back.token_value().unwrap()));
    assert_eq!(
        (back.src_host, back.src_port, back.src_ip),
        (Ipv4Addr::new(198, 18, 0, 9), 6081, vnp_protocol::OUTSIDE)
    );
    let with_src = gw
        .request_token_raw(&TokenRequest {
            src_vm: None,
            src_gateway: Some("g1".into()),
            src_ip: Some(outside),
            dst_ip: a.ip,
        })
        .unwrap();
    assert_eq!(with_src.src_ip, vnp_protocol::OUTSIDE);
    // Gateways read the VMs of their network (NAT blocks), and nothing else.
    assert_eq!(gw.list_vms(None).unwrap().len(), 2);
    assert_eq!(code(gw.list_hosts()), ErrorCode::AdminRequired);

    // Policy can close the outside.
    admin
        .create_rule(&PolicyRuleSpec {
            id: "no-out".into(),
            network: "n1".into(),
            action: PolicyAction::Deny,
            a: Selector::Vm("a".into()),
            b: Selector::External,
        })
        .unwrap();
    assert_eq!(
        code(h1.request_token("a", outside)),
        ErrorCode::PolicyDenied
    );
}

fn migration_flow_and_long_poll(backend: Backend) {
    let f = Fixture::on(backend, "migrate");
    let (a, b) = populate(&f);
    let admin = f.reg.client("admin");
    let (h1, h2) = (f.reg.client("h1"), f.reg.client("h2"));
    h2.register_endpoint("b", Ipv4Addr::new(198, 18, 0, 2), b.host_port.unwrap())
        .unwrap();
    let since = admin.watch(&[], 0, Duration::ZERO).unwrap().generation;

    // A watcher waits; b moves to h1 while it waits.
    let watcher = {
        let c = f.reg.client("h1");
        std::thread::spawn(move || {
            let t = Instant::now();
            (
                c.watch(&["b"], since, Duration::from_secs(20)).unwrap(),
                t.elapsed(),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        code(h1.register_endpoint("b", Ipv4Addr::new(198, 18, 0, 1), 42000)),
        ErrorCode::NotOwner
    );
    let moved = admin
        .move_vm(
            "b",
            &MoveVm {
                host: Some("h1".into()),
                host_port: None,
            },
        )
        .unwrap();
    assert_eq!(moved.host.as_deref(), Some("h1"));
    let (w, waited) = watcher.join().unwrap();
    assert!(
        waited < Duration::from_secs(10),
        "long-poll returned on the change, not the timeout"
    );
    assert_eq!(w.changes[0].kind, ChangeKind::Moved);
    // Until the destination registers, tokens still lead to the old endpoint (stragglers).
    assert_eq!(
        h1.request_token("a", b.ip).unwrap().dst_host,
        Ipv4Addr::new(198, 18, 0, 2)
    );
    assert_eq!(
        code(h2.get_vm_secret("b")),
        ErrorCode::NotOwner,
        "old host lost the secret"
    );
    h1.get_vm_secret("b").unwrap();
    // The old host may still read the record while the endpoint is its own (that is how its
    // vnpd learns the endpoint moved), and no longer once it has moved.
    let seen = h2.get_vm("b").unwrap();
    assert_eq!(
        seen.endpoint.map(|e| e.host_addr),
        Some(Ipv4Addr::new(198, 18, 0, 2))
    );
    h1.register_endpoint("b", Ipv4Addr::new(198, 18, 0, 1), 42000)
        .unwrap();
    assert_eq!(code(h2.get_vm("b")), ErrorCode::NotOwner);
    let g = h1.request_token("a", b.ip).unwrap();
    assert_eq!(
        (g.dst_host, g.dst_port),
        (Ipv4Addr::new(198, 18, 0, 1), 42000)
    );
    assert_eq!(a.host, Some("h1".into()));

    // No change: the long-poll times out empty, after about the requested time.
    let now_gen = admin.watch(&[], 0, Duration::ZERO).unwrap().generation;
    let t = Instant::now();
    let w = h2
        .watch(&["b"], now_gen, Duration::from_millis(700))
        .unwrap();
    assert!(w.changes.is_empty() && !w.resync);
    assert!(t.elapsed() >= Duration::from_millis(650));
}

/// `vnpctl vm migrate`: the source stays the owner (secret, tokens for the VM's own traffic)
/// during the pre-copy; the destination may prepare the VM and becomes the owner by registering
/// the endpoint when the VM resumes there; a cancelled migration changes nothing.
fn announced_migration_moves_ownership_at_registration(backend: Backend) {
    let f = Fixture::on(backend, "announced");
    let (a, b) = populate(&f);
    let admin = f.reg.client("admin");
    let (h1, h2) = (f.reg.client("h1"), f.reg.client("h2"));
    let (addr1, addr2) = (Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2));
    let old_port = b.host_port.unwrap();
    h2.register_endpoint("b", addr2, old_port).unwrap();
    assert_eq!(code(h1.get_vm_secret("b")), ErrorCode::NotOwner);

    let going = StartMigration {
        host: "h1".into(),
        host_port: None,
    };
    let started = admin.start_migration("b", &going).unwrap();
    let arrival = started.incoming.clone().expect("migration recorded");
    assert_eq!(
        (arrival.host.as_str(), started.host.as_deref()),
        ("h1", Some("h2"))
    );
    // Pre-copy: both hosts read the record and hold the secret; the source still sends for b,
    // peers still reach it.
    assert_eq!(h1.get_vm("b").unwrap().incoming, Some(arrival.clone()));
    assert_eq!(
        h1.get_vm_secret("b").unwrap(),
        h2.get_vm_secret("b").unwrap()
    );
    h2.request_token("b", a.ip).unwrap();
    assert_eq!(h1.request_token("a", b.ip).unwrap().dst_host, addr2);
    // The reserved port is nobody else's, and the destination must register on it.
    let on_h1 = VmSpec {
        host_port: Some(arrival.host_port),
        ..vm("c", "n1", "h1")
    };
    assert_eq!(code(admin.create_vm(&on_h1)), ErrorCode::DuplicatePort);
    assert_eq!(
        code(h1.register_endpoint("b", addr1, arrival.host_port + 1)),
        ErrorCode::BadRequest
    );

    // Resume on h1: its registration moves the owner and the endpoint in one step.
    h1.register_endpoint("b", addr1, arrival.host_port).unwrap();
    let now = admin.get_vm("b").unwrap();
    assert_eq!(now.host.as_deref(), Some("h1"));
    assert_eq!(now.host_port, Some(arrival.host_port));
    assert_eq!(now.incoming, None);
    let g = h1.request_token("a", b.ip).unwrap();
    assert_eq!((g.dst_host, g.dst_port), (addr1, arrival.host_port));
    assert_eq!(code(h2.request_token("b", a.ip)), ErrorCode::NotOwner);
    assert_eq!(code(h2.get_vm_secret("b")), ErrorCode::NotOwner);
    // The source's old port is quarantined like after a move.
    let back_on_h2 = VmSpec {
        host_port: Some(old_port),
        ..vm("d", "n1", "h2")
    };
    assert_eq!(
        code(admin.create_vm(&back_on_h2)),
        ErrorCode::PortQuarantined
    );

    // A cancelled migration leaves the VM where it was.
    let to_h2 = StartMigration {
        host: "h2".into(),
        host_port: None,
    };
    admin.start_migration("a", &to_h2).unwrap();
    h2.get_vm_secret("a").unwrap();
    let cancelled = admin.cancel_migration("a").unwrap();
    assert_eq!(
        (cancelled.host.as_deref(), cancelled.incoming),
        (Some("h1"), None)
    );
    assert_eq!(code(h2.get_vm_secret("a")), ErrorCode::NotOwner);
    assert_eq!(
        code(h2.register_endpoint("a", addr2, 40000)),
        ErrorCode::NotOwner
    );
    // Refusals: to its own host, by a host.
    let to_h1 = StartMigration {
        host: "h1".into(),
        host_port: None,
    };
    assert_eq!(
        code(admin.start_migration("a", &to_h1)),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(h1.start_migration("a", &to_h2)),
        ErrorCode::AdminRequired
    );
}

fn bad_input_gets_clear_4xx_and_changes_nothing(backend: Backend) {
    let f = Fixture::on(backend, "badinput");
    populate(&f);
    let admin = f.reg.client("admin");
    let before = admin.list_vms(None).unwrap();

    let raw = |method: &str, path: &str, body: &str| {
        let (status, body) = admin.send_raw(method, path, Some(body.as_bytes())).unwrap();
        let err: ErrorBody = serde_json::from_slice(&body)
            .unwrap_or_else(|_| panic!("not a JSON error: {}", String::from_utf8_lossy(&body)));
        (status, err.error.code)
    };
    assert_eq!(
        raw("POST", "/v1/vms", "{\"id\": \"x\", \"network\": "),
        (400, ErrorCode::InvalidJson)
    );
    assert_eq!(raw("POST", "/v1/vms", "[]"), (400, ErrorCode::InvalidJson));
    assert_eq!(
        raw(
            "POST",
            "/v1/vms",
            r#"{"id":"x","network":"n1","ip":"10.1.0.300"}"#
        ),
        (400, ErrorCode::InvalidJson)
    );
    assert_eq!(
        raw(
            "POST",
            "/v1/vms",
            r#"{"id":"x","network":"n1","colour":"red"}"#
        ),
        (400, ErrorCode::InvalidJson)
    );
    assert_eq!(
        raw(
            "POST",
            "/v1/networks",
            r#"{"id":"n9","cidr":"10.9.0.1/24"}"#
        ),
        (400, ErrorCode::InvalidJson)
    );
    assert_eq!(
        raw("POST", "/v1/tokens", r#"{"src_vm":"a"}"#),
        (400, ErrorCode::InvalidJson)
    );
    assert_eq!(
        raw("GET", "/v1/watch?since=abc", ""),
        (400, ErrorCode::BadRequest)
    );
    assert_eq!(
        raw("GET", "/v1/nothing-here", ""),
        (404, ErrorCode::NotFound)
    );

    // Unknown ids.
    assert_eq!(code(admin.get_vm("nope")), ErrorCode::UnknownVm);
    assert_eq!(code(admin.delete_host("nope")), ErrorCode::UnknownHost);
    assert_eq!(code(admin.get_network("nope")), ErrorCode::UnknownNetwork);
    assert_eq!(code(admin.delete_rule("nope")), ErrorCode::UnknownRule);
    assert_eq!(
        code(admin.create_vm(&vm("x", "nope", "h1"))),
        ErrorCode::UnknownNetwork
    );
    assert_eq!(
        code(admin.create_vm(&vm("x", "n1", "nope"))),
        ErrorCode::UnknownHost
    );
    assert_eq!(
        code(admin.create_vm(&vm("Bad_Id", "n1", "h1"))),
        ErrorCode::InvalidId
    );
    assert_eq!(
        code(
            f.reg
                .client("h1")
                .request_token("nope", Ipv4Addr::new(10, 1, 0, 3))
        ),
        ErrorCode::UnknownVm
    );
    assert_eq!(
        code(
            f.reg
                .client("h1")
                .request_token("a", Ipv4Addr::new(10, 1, 0, 99))
        ),
        ErrorCode::NoSuchDestination
    );

    // Addresses: outside the CIDR, reserved router, duplicate address, duplicate MAC.
    let with_ip = |ip: [u8; 4]| VmSpec {
        ip: Some(Ipv4Addr::from(ip)),
        ..vm("x", "n1", "h1")
    };
    match admin.create_vm(&with_ip([10, 2, 0, 5])) {
        Err(ClientError::Api {
            status: 400,
            code: ErrorCode::AddressOutsideCidr,
            message,
        }) => assert!(message.contains("10.1.0.0/24"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        code(admin.create_vm(&with_ip([10, 1, 0, 1]))),
        ErrorCode::AddressReserved
    );
    assert_eq!(
        code(admin.create_vm(&with_ip([10, 1, 0, 2]))),
        ErrorCode::DuplicateIp
    );
    let dup_mac = VmSpec {
        mac: Some(before[0].mac),
        ..vm("x", "n1", "h1")
    };
    assert_eq!(code(admin.create_vm(&dup_mac)), ErrorCode::DuplicateMac);
    assert_eq!(
        code(admin.create_vm(&vm("a", "n1", "h1"))),
        ErrorCode::Duplicate
    );

    // Wrong host for an endpoint; host doing admin work.
    let h2 = f.reg.client("h2");
    assert_eq!(
        code(h2.register_endpoint("a", Ipv4Addr::new(198, 18, 0, 2), 40000)),
        ErrorCode::NotOwner
    );
    assert_eq!(
        code(h2.register_endpoint("b", Ipv4Addr::new(198, 18, 0, 1), 40000)),
        ErrorCode::WrongHost
    );
    assert_eq!(
        code(h2.create_vm(&vm("x", "n1", "h2"))),
        ErrorCode::AdminRequired
    );
    assert_eq!(
        code(h2.delete_network("n1", true)),
        ErrorCode::AdminRequired
    );

    // Nothing was half-written: same VMs, and the next allocation is the next free address.
    assert_eq!(admin.list_vms(None).unwrap(), before);
    assert_eq!(
        admin.create_vm(&vm("c", "n1", "h1")).unwrap().ip,
        Ipv4Addr::new(10, 1, 0, 4)
    );

    // Deleting a network with VMs refuses unless asked to cascade.
    match admin.delete_network("n1", false) {
        Err(ClientError::Api {
            status: 409,
            code: ErrorCode::NotEmpty,
            message,
        }) => assert!(message.contains("cascade"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(code(admin.delete_host("h1")), ErrorCode::NotEmpty);
    let d = admin.delete_network("n1", true).unwrap();
    assert_eq!(d.cascaded.len(), 3);
    assert!(admin.list_vms(None).unwrap().is_empty());
    assert_eq!(
        code(f.reg.client("h1").get_vm_secret("a")),
        ErrorCode::UnknownVm,
        "secret gone with the VM"
    );
}

fn unknown_expired_and_identity_less_certificates_are_refused(backend: Backend) {
    let f = Fixture::on(backend, "certs");
    use vnp_registry_client::pki::{Duration as D, OffsetDateTime};
    let now = OffsetDateTime::now_utc();
    // Signed by our CA but expired.
    f.pki.client_with(
        "expired",
        Some("vnp:admin:old"),
        now - D::days(10),
        now - D::days(1),
    );
    // Signed by our CA, valid, but without a vnp identity.
    f.pki
        .client_with("anon", None, now - D::hours(1), now + D::days(1));
    // Valid, with an admin identity, from another CA of the very same name.
    let rogue_dir = TempDir::new("rogue");
    let _rogue = Pki::new(&rogue_dir.0);

    match f.reg.client("expired").whoami() {
        Err(ClientError::Transport(msg)) => eprintln!("expired: {msg}"),
        other => panic!("expired certificate accepted: {other:?}"),
    }
    let mut cfg = f.reg.config("admin");
    cfg.cert_pem = std::fs::read(rogue_dir.0.join("admin.pem")).unwrap();
    cfg.key_pem = std::fs::read(rogue_dir.0.join("admin.key")).unwrap();
    match RegistryClient::new(cfg).unwrap().whoami() {
        Err(ClientError::Transport(msg)) => eprintln!("unknown CA: {msg}"),
        other => panic!("certificate from an unknown CA accepted: {other:?}"),
    }
    match f.reg.client("anon").whoami() {
        Err(ClientError::Api {
            status: 401,
            code: ErrorCode::NotAuthenticated,
            message,
        }) => assert!(message.contains("vnp:"), "{message}"),
        other => panic!("{other:?}"),
    }
    // The registry is unharmed and still serves good clients.
    let admin = f.reg.client("admin");
    assert_eq!(admin.whoami().unwrap().role, Role::Admin);

    // A valid host certificate counts only while that host is registered.
    let h1 = f.reg.client("h1");
    assert_eq!(
        h1.whoami().unwrap(),
        Identity {
            role: Role::Host,
            id: "h1".into()
        },
        "whoami still answers"
    );
    match h1.list_host_vms() {
        Err(ClientError::Api {
            status: 403,
            code: ErrorCode::UnknownIdentity,
            message,
        }) => {
            assert!(message.contains("host:h1"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        code(h1.watch(&[], 0, Duration::ZERO)),
        ErrorCode::UnknownIdentity
    );
    admin
        .create_host(&HostSpec {
            id: "h1".into(),
            underlay_addr: Ipv4Addr::new(198, 18, 0, 1),
            port_range: None,
        })
        .unwrap();
    assert!(h1.list_host_vms().unwrap().is_empty());
    admin.delete_host("h1").unwrap();
    assert_eq!(
        code(h1.list_host_vms()),
        ErrorCode::UnknownIdentity,
        "deleted host is locked out"
    );
    assert_eq!(
        code(f.reg.client("g1").get_gateway_secret("g1")),
        ErrorCode::UnknownIdentity
    );
}

/// What one long-poll of a follower that keeps `since` found (what vnpd's control thread does).
#[derive(Debug, PartialEq, Eq)]
enum WatchEvent {
    Changes(Vec<VmChange>),
    Resync,
    Idle,
}

struct Follower {
    vms: Vec<&'static str>,
    since: Option<u64>,
}

impl Follower {
    fn poll(&mut self, c: &RegistryClient, timeout: Duration) -> Result<WatchEvent, ClientError> {
        let Some(since) = self.since else {
            self.since = Some(c.watch(&self.vms, 0, Duration::ZERO)?.generation);
            return Ok(WatchEvent::Resync);
        };
        let w = c.watch(&self.vms, since, timeout)?;
        self.since = Some(w.generation);
        Ok(match (w.resync, w.changes.is_empty()) {
            (true, _) => WatchEvent::Resync,
            (false, true) => WatchEvent::Idle,
            (false, false) => WatchEvent::Changes(w.changes),
        })
    }
}

fn endpoint_watcher_follows_changes_without_gaps(backend: Backend) {
    let f = Fixture::on(backend, "watcher");
    populate(&f);
    let admin = f.reg.client("admin");
    let h1 = f.reg.client("h1");
    let mut w = Follower {
        vms: vec!["b"],
        since: None,
    };
    assert_eq!(
        w.poll(&h1, Duration::from_secs(1)).unwrap(),
        WatchEvent::Resync,
        "first poll"
    );
    assert_eq!(
        w.poll(&h1, Duration::from_millis(200)).unwrap(),
        WatchEvent::Idle
    );
    admin.create_vm(&vm("c", "n1", "h1")).unwrap(); // not watched
    f.reg
        .client("h2")
        .register_endpoint("b", Ipv4Addr::new(198, 18, 0, 2), 41000)
        .unwrap();
    admin.rotate_vm_secret("b").unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        match w.poll(&h1, Duration::from_secs(2)).unwrap() {
            WatchEvent::Changes(c) => kinds.extend(c.iter().map(|c| (c.vm.clone(), c.kind))),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        kinds,
        [
            ("b".to_string(), ChangeKind::Endpoint),
            ("b".to_string(), ChangeKind::SecretRotated)
        ]
    );
    assert_eq!(
        w.poll(&h1, Duration::from_millis(200)).unwrap(),
        WatchEvent::Idle
    );
    let (_, generation) = f.reg.client("h2").get_vm_secret("b").unwrap();
    assert_eq!(generation, 2);
}

fn connection_limit_queues_instead_of_failing(backend: Backend) {
    let f = Fixture::on_with_args(backend, "connlimit", &["--max-connections", "1"]);
    let first = f.reg.client("admin");
    first.whoami().unwrap(); // its keep-alive connection now holds the only slot
    let mut cfg = f.reg.config("admin");
    cfg.timeout = Duration::from_millis(800);
    let second = RegistryClient::new(cfg).unwrap();
    assert!(
        matches!(second.whoami(), Err(ClientError::Transport(_))),
        "second connection must wait"
    );
    drop(first); // closes its pooled connection and frees the slot
    let t = Instant::now();
    loop {
        match second.whoami() {
            Ok(id) => {
                assert_eq!(id.role, Role::Admin);
                break;
            }
            Err(e) if t.elapsed() < Duration::from_secs(10) => eprintln!("retrying: {e}"),
            Err(e) => panic!("slot never freed: {e}"),
        }
    }
}

/// A deleted or moved VM's host port goes to no other VM until `--port-quarantine-secs` has
/// passed; the quarantine is registry state (it holds across a restart).
fn host_ports_are_quarantined_after_a_vm_leaves(backend: Backend) {
    const QUARANTINE_S: u64 = 6;
    let mut f = Fixture::on_with_args(backend, "quarantine", &["--port-quarantine-secs", "6"]);
    let (a, b) = populate(&f);
    let admin = f.reg.client("admin");
    let port_a = a.host_port.unwrap();
    admin.delete_vm("a").unwrap();
    let left = Instant::now();
    let on_port = |id: &str, port| VmSpec {
        host_port: Some(port),
        ..vm(id, "n1", "h1")
    };
    assert_eq!(
        code(admin.create_vm(&on_port("c", port_a))),
        ErrorCode::PortQuarantined
    );
    // Without a wish, a new VM gets another port.
    let d = admin.create_vm(&vm("d", "n1", "h1")).unwrap();
    assert_ne!(d.host_port, Some(port_a));
    // Moving b away from h2 quarantines its port there too.
    let port_b = b.host_port.unwrap();
    admin
        .move_vm(
            "b",
            &MoveVm {
                host: Some("h1".into()),
                host_port: None,
            },
        )
        .unwrap();
    let to_h2 = VmSpec {
        host_port: Some(port_b),
        ..vm("e", "n1", "h2")
    };
    assert_eq!(code(admin.create_vm(&to_h2)), ErrorCode::PortQuarantined);
    // Stored state: still refused after a restart.
    f.reg.crash_and_restart();
    let admin = f.reg.client("admin");
    assert!(
        left.elapsed() < Duration::from_secs(QUARANTINE_S - 1),
        "the restart took longer than this test's quarantine"
    );
    assert_eq!(
        code(admin.create_vm(&on_port("c", port_a))),
        ErrorCode::PortQuarantined
    );
    // Once the period has passed, the port is free again.
    std::thread::sleep(Duration::from_secs(QUARANTINE_S + 1).saturating_sub(left.elapsed()));
    let c = admin.create_vm(&on_port("c", port_a)).unwrap();
    assert_eq!(c.host_port, Some(port_a));
    admin.create_vm(&to_h2).unwrap();
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
    happy_path_token_endpoint_and_watch,
    secrets_only_for_the_owning_host,
    token_only_for_vms_the_host_runs,
    policy_deny_default_deny_and_tags,
    restart_after_crash_loses_nothing_acknowledged,
    concurrent_token_requests,
    gateway_tuple_for_outside_destinations,
    migration_flow_and_long_poll,
    announced_migration_moves_ownership_at_registration,
    bad_input_gets_clear_4xx_and_changes_nothing,
    unknown_expired_and_identity_less_certificates_are_refused,
    endpoint_watcher_follows_changes_without_gaps,
    connection_limit_queues_instead_of_failing,
    host_ports_are_quarantined_after_a_vm_leaves,
);
