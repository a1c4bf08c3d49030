//! The storage test suite every [`Store`] backend must pass (redb in the unit tests, etcd in
//! `tests/store_suite.rs` against a real cluster). Each case takes an empty store and panics
//! with a message on a violation.
//!
//! Later registry state (gateways, forwarding rules, services, metadata, signing keys) plugs
//! in by adding its ops to [`populate`] and its fields to [`assert_same_state`]: every backend
//! then proves it persists them.

use super::{Store, StoreError};
use crate::model::{Model, Op, RememberedWrite, SecretOwner};
use crate::plan;
use std::net::Ipv4Addr;
use vnp_protocol::token::VmSecret;
use vnp_registry_client::api::*;
use vnp_registry_client::jwt::JwtSigner;
use vnp_registry_client::metadata::{Jwks, ProjectUpdate};

/// One case: panics on a violation.
pub type Case = fn(&dyn Store);

/// Every case, by name, for a runner that makes a fresh store per case.
pub const CASES: &[(&str, Case)] = &[
    ("round_trip", round_trip),
    ("stale_base_is_refused", stale_base_is_refused),
    ("deletes_and_trims", deletes_and_trims),
    ("cascade_in_one_commit", cascade_in_one_commit),
    ("port_quarantine_persists", port_quarantine_persists),
    ("metadata_persists", metadata_persists),
];

/// The planners' clock in this suite.
const REUSE: plan::PortReuse = plan::PortReuse {
    now: 1_000_000,
    quarantine_secs: 600,
};

/// Plans with `planner` on `model`, commits at the model's revision and applies.
fn run<T>(
    store: &dyn Store,
    model: &mut Model,
    planner: impl FnOnce(&Model) -> Result<(Vec<Op>, T), crate::error::ApiError>,
) -> T {
    let (ops, out) = planner(model).unwrap_or_else(|e| panic!("plan refused: {e}"));
    let revision = store
        .commit(model.revision, &ops)
        .unwrap_or_else(|e| panic!("commit failed: {e}"));
    assert!(
        revision > model.revision,
        "revision {revision} did not advance past {}",
        model.revision
    );
    model.apply(&ops);
    model.revision = revision;
    out
}

fn network(id: &str, cidr: &str) -> NetworkSpec {
    NetworkSpec {
        id: id.into(),
        vni: None,
        cidr: cidr.parse().expect("cidr"),
        mtu: None,
        default_policy: None,
        nat_block: None,
    }
}

fn vm(id: &str, net: &str, host: &str) -> VmSpec {
    VmSpec {
        id: id.into(),
        network: net.into(),
        host: Some(host.into()),
        tags: vec!["web".into()],
        ..VmSpec::default()
    }
}

/// One of everything the registry stores, with a rotated secret and a registered endpoint.
pub fn populate(store: &dyn Store, model: &mut Model) {
    run(store, model, |m| {
        plan::create_network(m, &network("n1", "10.1.0.0/24"))
    });
    let host = |id: &str, last| HostSpec {
        id: id.into(),
        underlay_addr: Ipv4Addr::new(198, 18, 0, last),
        port_range: None,
    };
    run(store, model, |m| plan::create_host(m, &host("h1", 1)));
    run(store, model, |m| plan::create_host(m, &host("h2", 2)));
    for (id, h, byte) in [("a", "h1", 5), ("b", "h2", 6)] {
        let spec = vm(id, "n1", h);
        run(store, model, |m| {
            plan::create_vm(m, &spec, VmSecret::from_bytes([byte; 32]), REUSE)
        });
    }
    run(store, model, |m| {
        plan::rotate_vm_secret(m, "a", VmSecret::from_bytes([9; 32]))
    });
    let update = EndpointUpdate {
        host_addr: Ipv4Addr::new(198, 18, 0, 2),
        port: 41000,
    };
    run(store, model, |m| {
        plan::register_endpoint(m, "h2", "b", &update, REUSE)
    });
    let gw = GatewaySpec {
        id: "g1".into(),
        network: "n1".into(),
        underlay_addr: Ipv4Addr::new(198, 18, 0, 9),
        port: 6081,
        public_addr: Some(Ipv4Addr::new(203, 0, 113, 1)),
    };
    run(store, model, |m| {
        plan::create_gateway(m, &gw, VmSecret::from_bytes([3; 32]))
    });
    // A second gateway of the same NAT pool, a grown NAT range, a forwarding rule.
    let gw2 = GatewaySpec {
        id: "g2".into(),
        underlay_addr: Ipv4Addr::new(198, 18, 0, 10),
        ..gw.clone()
    };
    run(store, model, |m| {
        plan::create_gateway(m, &gw2, VmSecret::from_bytes([8; 32]))
    });
    run(store, model, |m| plan::grow_nat_ports(m, "b", 2));
    let fwd = ForwardSpec {
        id: "f1".into(),
        public_addr: Ipv4Addr::new(203, 0, 113, 1),
        public_port: 443,
        proto: L4Proto::Tcp,
        vm: "b".into(),
        vm_port: 8443,
    };
    run(store, model, |m| plan::create_forward(m, &fwd));
    populate_services(store, model);
    let rule = PolicyRuleSpec {
        id: "r1".into(),
        network: "n1".into(),
        action: PolicyAction::Deny,
        a: Selector::Tag("web".into()),
        b: Selector::External,
    };
    run(store, model, |m| plan::create_rule(m, &rule));
    let remembered = RememberedWrite {
        request: "admin:ops POST /v1/vms".into(),
        response: "{}".into(),
        at: 1,
    };
    run(store, model, |_| {
        Ok((
            vec![Op::RememberWrite("k-1".into(), remembered.clone())],
            (),
        ))
    });
    // A VM that came and went: its host port is in quarantine.
    let gone = vm("gone", "n1", "h1");
    run(store, model, |m| {
        plan::create_vm(m, &gone, VmSecret::from_bytes([4; 32]), REUSE)
    });
    run(store, model, |m| plan::delete_vm(m, "gone", REUSE));
    populate_metadata(store, model);
}

/// A signing key from a fixed scalar (the suite draws no randomness).
fn signing_key(kid: &str, byte: u8, now: u64) -> plan::metadata::NewSigningKey {
    let signer = JwtSigner::from_scalar(kid, &[byte; 32]).expect("scalar");
    plan::metadata::NewSigningKey {
        kid: kid.into(),
        jwk: signer.jwk(),
        private: VmSecret::from_bytes([byte; 32]),
        now,
    }
}

/// Attributes of VMs and a project, guest attributes, scopes, and two signing keys (one
/// retired by a rotation).
fn populate_metadata(store: &dyn Store, model: &mut Model) {
    use plan::metadata as md;
    run(store, model, |m| {
        md::set_vm_attribute(m, "a", "role", Some("web"))
    });
    run(store, model, |m| {
        md::put_guest_attribute(
            m,
            "h1",
            "a",
            "hostkeys",
            "ssh-ed25519",
            "ssh-ed25519 AAAAC3 a",
        )
    });
    run(store, model, |m| {
        md::set_vm_scopes(m, "b", &["s1".into(), "s2".into()])
    });
    let project = ProjectUpdate {
        project_id: Some("acme".into()),
        zone: Some("zone-b".into()),
        require_session_token: Some(true),
    };
    run(store, model, |m| md::update_project(m, "n1", &project));
    run(store, model, |m| {
        md::set_project_attribute(m, "n1", "ssh-keys", Some("ops:ssh-ed25519 AAAA"))
    });
    let first = signing_key("k1", 7, REUSE.now);
    assert!(run(store, model, |m| md::ensure_signing_key(m, &first)));
    let second = signing_key("k2", 8, REUSE.now + 10);
    run(store, model, |m| md::rotate_signing_key(m, &second, 630));
}

/// Two load-balanced services on the gateways' address: one by VM with an HTTP check and a
/// member added later, one by tag.
fn populate_services(store: &dyn Store, model: &mut Model) {
    let member = |vm: Option<&str>, tag: Option<&str>, weight| PoolMember {
        vm: vm.map(str::to_string),
        tag: tag.map(str::to_string),
        weight,
    };
    let web = ServiceSpec {
        id: "s1".into(),
        public_addr: Ipv4Addr::new(203, 0, 113, 1),
        public_port: 80,
        proto: L4Proto::Tcp,
        vm_port: Some(8080),
        members: vec![member(Some("a"), None, 3)],
        health: HealthCheckSpec {
            http: Some(HttpCheck {
                path: "/healthz".into(),
                expect_status: 204,
            }),
            interval_ms: 500,
            timeout_ms: 200,
            rise: 1,
            fall: 2,
            port: Some(8081),
        },
        table_size: Some(251),
    };
    run(store, model, |m| plan::create_service(m, &web));
    run(store, model, |m| {
        plan::add_member(m, "s1", &member(Some("b"), None, 1))
    });
    let dns = ServiceSpec {
        id: "s2".into(),
        public_port: 53,
        proto: L4Proto::Udp,
        vm_port: None,
        members: vec![member(None, Some("web"), 1)],
        health: HealthCheckSpec::default(),
        table_size: None,
        ..web
    };
    run(store, model, |m| plan::create_service(m, &dns));
    let view = HealthReport {
        members: vec![
            MemberHealth {
                service: "s1".into(),
                vm: "b".into(),
                up: false,
            },
            MemberHealth {
                service: "s1".into(),
                vm: "a".into(),
                up: true,
            },
        ],
    };
    run(store, model, |m| {
        plan::report_health(m, "g1", &view, REUSE.now)
    });
}

/// Everything a reload must give back.
pub fn assert_same_state(loaded: &Model, expected: &Model) {
    assert_eq!(loaded.networks, expected.networks, "networks");
    assert_eq!(loaded.hosts, expected.hosts, "hosts");
    assert_eq!(loaded.gateways, expected.gateways, "gateways");
    assert_eq!(loaded.vms, expected.vms, "vms");
    assert_eq!(loaded.rules, expected.rules, "rules");
    assert_eq!(loaded.forwards, expected.forwards, "forwarding rules");
    assert_eq!(loaded.services, expected.services, "services");
    assert_eq!(loaded.health_views, expected.health_views, "health views");
    assert_eq!(loaded.by_ip, expected.by_ip, "address index");
    assert_eq!(loaded.changes, expected.changes, "change log");
    assert_eq!(loaded.generation, expected.generation, "generation");
    assert_eq!(loaded.requests, expected.requests, "remembered writes");
    assert_eq!(loaded.quarantined, expected.quarantined, "port quarantines");
    assert_eq!(loaded.meta.vms, expected.meta.vms, "VM metadata");
    assert_eq!(loaded.meta.projects, expected.meta.projects, "projects");
    assert_eq!(
        loaded.meta.signing_keys, expected.meta.signing_keys,
        "signing keys"
    );
    let mut signers: Vec<&String> = loaded.meta.signers.keys().collect();
    signers.sort();
    let mut want: Vec<&String> = expected.meta.signers.keys().collect();
    want.sort();
    assert_eq!(signers, want, "loaded signers");
    let mut owners: Vec<&SecretOwner> = loaded.secrets.keys().collect();
    owners.sort();
    let mut want: Vec<&SecretOwner> = expected.secrets.keys().collect();
    want.sort();
    assert_eq!(owners, want, "secret owners");
    for (owner, s) in &expected.secrets {
        let got = &loaded.secrets[owner];
        assert_eq!(
            got.secret.as_bytes(),
            s.secret.as_bytes(),
            "secret of {owner:?}"
        );
        assert_eq!(
            got.generation, s.generation,
            "secret generation of {owner:?}"
        );
    }
}

fn load(store: &dyn Store) -> Model {
    store.load().unwrap_or_else(|e| panic!("load failed: {e}"))
}

/// Commit, reload: the same state, at the revision of the last commit or later.
pub fn round_trip(store: &dyn Store) {
    let mut model = load(store);
    assert!(
        model.vms.is_empty() && model.networks.is_empty(),
        "store not empty"
    );
    populate(store, &mut model);
    let loaded = load(store);
    assert_same_state(&loaded, &model);
    assert!(
        loaded.revision >= model.revision,
        "loaded revision went back"
    );
    assert_eq!(loaded.vms["b"].nat_ports.len(), 3, "grown NAT ports");
    assert_eq!(loaded.forwards["f1"].network, "n1");
    let s1 = &loaded.services["s1"];
    assert_eq!(
        (s1.network.as_str(), s1.vm_port, s1.table_size),
        ("n1", 8080, 251)
    );
    assert_eq!(s1.members.len(), 2, "added member");
    assert_eq!(
        loaded.services["s2"].table_size, 65_537,
        "default table size"
    );
    let views = plan::views_of(&loaded, "s1");
    assert_eq!(views.len(), 1, "g1's view");
    let ups: Vec<(&str, bool)> = views[0]
        .members
        .iter()
        .map(|m| (m.vm.as_str(), m.up))
        .collect();
    assert_eq!(ups, [("a", true), ("b", false)], "sorted by member");
    let pool = plan::resolve_pool(&loaded, &loaded.services["s2"]);
    assert_eq!(pool.len(), 2, "both VMs carry the tag: {pool:?}");
    let s = &loaded.secrets[&SecretOwner::Vm("a".into())];
    assert_eq!((s.secret.as_bytes(), s.generation), (&[9u8; 32], 2));
    assert_eq!(
        loaded
            .vm_by_ip("n1", Ipv4Addr::new(10, 1, 0, 3))
            .map(|v| v.id.as_str()),
        Some("b")
    );
}

/// A batch planned on an outdated model is refused whole; the newer state stays.
pub fn stale_base_is_refused(store: &dyn Store) {
    let mut model = load(store);
    run(store, &mut model, |m| {
        plan::create_network(m, &network("n1", "10.1.0.0/24"))
    });
    let stale = model.clone();
    run(store, &mut model, |m| {
        plan::create_network(m, &network("n2", "10.2.0.0/24"))
    });
    // Planned on the model from before n2: overlaps nothing it knows of, names a new network.
    let (ops, _) = plan::create_network(&stale, &network("n3", "10.2.0.0/16")).expect("plan");
    match store.commit(stale.revision, &ops) {
        Err(StoreError::Conflict { latest }) => {
            assert!(
                latest > stale.revision,
                "conflict names revision {latest}, not newer than {}",
                stale.revision
            )
        }
        other => panic!("a commit on an outdated base must conflict, got {other:?}"),
    }
    let loaded = load(store);
    assert!(
        !loaded.networks.contains_key("n3"),
        "refused batch was written"
    );
    assert_same_state(&loaded, &model);
    // Re-planned on the current model, the same request is refused by the planner instead.
    assert_eq!(
        plan::create_network(&loaded, &network("n3", "10.2.0.0/16"))
            .expect_err("overlap")
            .code,
        ErrorCode::Duplicate
    );
}

/// Deleting records and secrets, and trimming the change log, survive a reload.
pub fn deletes_and_trims(store: &dyn Store) {
    let mut model = load(store);
    populate(store, &mut model);
    run(store, &mut model, |m| plan::delete_vm(m, "a", REUSE));
    run(store, &mut model, |m| plan::delete_gateway(m, "g1"));
    run(store, &mut model, |m| plan::delete_rule(m, "r1"));
    run(store, &mut model, |m| plan::delete_forward(m, "f1"));
    run(store, &mut model, |m| plan::delete_service(m, "s2"));
    run(store, &mut model, |_| {
        Ok((vec![Op::ForgetWrite("k-1".into())], ()))
    });
    let first_kept = model.changes[2].generation;
    run(store, &mut model, |_| {
        Ok((vec![Op::TrimChanges(first_kept)], ()))
    });
    let loaded = load(store);
    assert_same_state(&loaded, &model);
    assert!(
        !loaded.secrets.contains_key(&SecretOwner::Vm("a".into())),
        "secret outlived its VM"
    );
    assert_eq!(
        loaded.changes.front().map(|c| c.generation),
        Some(first_kept)
    );
    assert!(!loaded.services.contains_key("s2"), "deleted service");
    assert!(loaded.health_views.is_empty(), "g1's view outlived it");
    let s1 = &loaded.services["s1"];
    assert_eq!(s1.members.len(), 1, "deleted VM a left the pool: {s1:?}");
    assert_eq!(s1.members[0].vm.as_deref(), Some("b"));
}

/// Deleting a network with its VMs, gateway and rules is one commit, whole.
pub fn cascade_in_one_commit(store: &dyn Store) {
    let mut model = load(store);
    populate(store, &mut model);
    for i in 0..20 {
        let spec = vm(&format!("v{i}"), "n1", "h1");
        run(store, &mut model, |m| {
            plan::create_vm(m, &spec, VmSecret::from_bytes([i; 32]), REUSE)
        });
    }
    let deleted = run(store, &mut model, |m| {
        plan::delete_network(m, "n1", true, REUSE)
    });
    // 22 VMs, 2 gateways, 1 rule, 1 forward, 2 services.
    assert_eq!(
        deleted.cascaded.len(),
        22 + 2 + 1 + 1 + 2,
        "{:?}",
        deleted.cascaded
    );
    let loaded = load(store);
    assert_same_state(&loaded, &model);
    assert!(loaded.vms.is_empty() && loaded.networks.is_empty());
    assert!(loaded.services.is_empty(), "services outlived the network");
    assert!(
        loaded
            .secrets
            .keys()
            .all(|o| matches!(o, SecretOwner::SigningKey(_))),
        "only the signing keys outlive the network"
    );
    assert!(
        loaded.meta.vms.is_empty() && loaded.meta.projects.is_empty(),
        "metadata outlived its VMs and network"
    );
    assert_eq!(loaded.hosts.len(), 2);
}

/// Port quarantines survive a reload, and so does their end.
pub fn port_quarantine_persists(store: &dyn Store) {
    let mut model = load(store);
    populate(store, &mut model);
    let key = ("h1".to_string(), 40001);
    let q = model
        .quarantined
        .get(&key)
        .expect("populate quarantines a port");
    assert_eq!((q.vm.as_str(), q.until), ("gone", REUSE.now + 600));
    let loaded = load(store);
    assert_same_state(&loaded, &model);
    assert!(
        plan::create_vm(
            &loaded,
            &VmSpec {
                host_port: Some(40001),
                ..vm("c", "n1", "h1")
            },
            VmSecret::from_bytes([1; 32]),
            REUSE
        )
        .is_err(),
        "a reloaded quarantine must still hold"
    );
    // After the period, releasing another port on h1 forgets the expired quarantine.
    let later = plan::PortReuse {
        now: REUSE.now + 601,
        ..REUSE
    };
    run(store, &mut model, |m| plan::delete_vm(m, "a", later));
    assert!(
        !model.quarantined.contains_key(&key),
        "expired quarantine kept"
    );
    let loaded = load(store);
    assert_same_state(&loaded, &model);
    let on_h1: Vec<&(String, u16)> = loaded
        .quarantined
        .keys()
        .filter(|(h, _)| h == "h1")
        .collect();
    assert_eq!(on_h1, vec![&("h1".to_string(), 40000)], "a's port only");
    // Deleting the host forgets its quarantines, durably.
    run(store, &mut model, |m| plan::delete_host(m, "h1"));
    let loaded = load(store);
    assert_same_state(&loaded, &model);
    assert!(
        loaded.quarantined.keys().all(|(h, _)| h != "h1"),
        "{:?}",
        loaded.quarantined
    );
}

/// Metadata survives a reload: a reloaded registry signs with the key that signed before
/// (its private half comes back from the secrets), publishes the retired one, and forgets a
/// VM's attributes with the VM.
pub fn metadata_persists(store: &dyn Store) {
    let mut model = load(store);
    populate(store, &mut model);
    let loaded = load(store);
    assert_same_state(&loaded, &model);
    let a = &loaded.meta.vms["a"];
    assert_eq!(a.attributes["role"], "web");
    assert_eq!(
        a.guest_attributes["hostkeys/ssh-ed25519"],
        "ssh-ed25519 AAAAC3 a"
    );
    assert_eq!(
        loaded.meta.projects["n1"].project_id.as_deref(),
        Some("acme")
    );
    let signer = loaded.meta.active_signer().expect("a signer after reload");
    assert_eq!(signer.kid(), "k2");
    let k1 = &loaded.meta.signing_keys["k1"];
    assert_eq!(
        (k1.retired_at, k1.published_until),
        (Some(REUSE.now + 10), Some(REUSE.now + 640))
    );
    let jwks = Jwks {
        keys: loaded
            .meta
            .signing_keys
            .values()
            .map(|k| k.jwk.clone())
            .collect(),
    };
    let token = signer.sign(&serde_json::json!({"exp": 2_000_000_000u64}));
    vnp_registry_client::jwt::verify(&token, &jwks, None, 1_900_000_000).expect("verifies");
    // A rotation after k1's publication ended forgets k1, record and private half.
    let third = signing_key("k3", 9, REUSE.now + 700);
    run(store, &mut model, |m| {
        plan::metadata::rotate_signing_key(m, &third, 630)
    });
    run(store, &mut model, |m| plan::delete_vm(m, "a", REUSE));
    let loaded = load(store);
    assert_same_state(&loaded, &model);
    assert!(!loaded.meta.signing_keys.contains_key("k1"), "k1 kept");
    assert!(!loaded
        .secrets
        .contains_key(&SecretOwner::SigningKey("k1".into())));
    assert!(
        !loaded.meta.vms.contains_key("a"),
        "a's metadata outlived it"
    );
    assert_eq!(loaded.meta.active_signer().map(|s| s.kid()), Some("k3"));
}
