//! `export` from one registry, `import` into another: redb to etcd, with secrets sealed in
//! transit, and what the restored registry does with them.

mod common;

use common::etcd::write_secret_keys;
use common::{Backend, Fixture, TempDir};
use std::net::Ipv4Addr;
use std::time::Duration;
use vnp_protocol::token::verify;
use vnp_registry_client::*;

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Api { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn populate(admin: &RegistryClient) {
    common::network_and_two_hosts(admin, Some(7));
    for (id, host) in [("a", "h1"), ("b", "h2")] {
        admin
            .create_vm(&VmSpec {
                id: id.into(),
                network: "n1".into(),
                host: Some(host.into()),
                ..VmSpec::default()
            })
            .unwrap();
    }
    admin
        .create_gateway(&GatewaySpec {
            id: "g1".into(),
            network: "n1".into(),
            underlay_addr: Ipv4Addr::new(198, 18, 0, 9),
            port: 6081,
            public_addr: None,
        })
        .unwrap();
    admin
        .create_rule(&PolicyRuleSpec {
            id: "r1".into(),
            network: "n1".into(),
            action: PolicyAction::Deny,
            a: Selector::Vm("a".into()),
            b: Selector::External,
        })
        .unwrap();
    admin.rotate_vm_secret("b").unwrap();
    admin.grow_nat_ports("a", 1).unwrap();
    admin
        .create_forward(&ForwardSpec {
            id: "web".into(),
            public_addr: Ipv4Addr::new(198, 18, 0, 9),
            public_port: 80,
            proto: L4Proto::Tcp,
            vm: "b".into(),
            vm_port: 8080,
        })
        .unwrap();
    admin
        .create_service(&ServiceSpec {
            id: "lb".into(),
            public_addr: Ipv4Addr::new(198, 18, 0, 9),
            public_port: 443,
            proto: L4Proto::Tcp,
            vm_port: None,
            members: vec![PoolMember {
                vm: Some("a".into()),
                tag: None,
                weight: 2,
            }],
            health: HealthCheckSpec::default(),
            table_size: Some(257),
        })
        .unwrap();
}

#[test]
fn export_from_redb_import_into_etcd() {
    let keys_dir = TempDir::new("backup-keys");
    let keys = write_secret_keys(&keys_dir.0);
    let keys_arg = keys.to_str().unwrap();
    let src = Fixture::on_with_args(Backend::Redb, "backup-src", &["--secret-keys", keys_arg]);
    let admin = src.reg.client("admin");
    populate(&admin);
    let generation = src
        .reg
        .client("h2")
        .register_endpoint("b", Ipv4Addr::new(198, 18, 0, 2), 41000)
        .unwrap();
    let (secret_b, gen_b) = src.reg.client("h2").get_vm_secret("b").unwrap();
    let (secret_g, _) = src.reg.client("g1").get_gateway_secret("g1").unwrap();

    let export = admin.export().unwrap();
    let text = serde_json::to_string(&export).unwrap();
    assert!(
        !text.contains(secret_b.to_hex().as_str()),
        "secret in the clear"
    );
    assert_eq!(
        export.secrets.len(),
        4,
        "two VMs, a gateway and the signing key"
    );
    assert_eq!(
        code(src.reg.client("h1").export()),
        ErrorCode::AdminRequired
    );

    let dst = Fixture::on(Backend::Etcd, "backup-dst");
    let target = dst.reg.client("admin");
    let summary = target.import(&export).unwrap();
    assert_eq!(
        (
            summary.vms,
            summary.secrets,
            summary.rules,
            summary.forwards,
            summary.services
        ),
        (2, 4, 1, 1, 1)
    );
    assert_eq!(
        target.list_services(None).unwrap(),
        admin.list_services(None).unwrap()
    );
    assert_eq!(
        target.list_forwards(None).unwrap(),
        admin.list_forwards(None).unwrap()
    );
    assert_eq!(
        target.list_vms(None).unwrap(),
        admin.list_vms(None).unwrap()
    );
    assert_eq!(
        target.list_networks().unwrap(),
        admin.list_networks().unwrap()
    );
    assert_eq!(target.list_hosts().unwrap(), admin.list_hosts().unwrap());
    assert_eq!(
        target.list_gateways().unwrap(),
        admin.list_gateways().unwrap()
    );
    assert_eq!(
        target.list_rules(None).unwrap(),
        admin.list_rules(None).unwrap()
    );
    // Secrets and generations survive, so hosts keep their secrets and tokens still verify.
    assert_eq!(
        dst.reg.client("h2").get_vm_secret("b").unwrap(),
        (secret_b.clone(), gen_b)
    );
    assert_eq!(
        dst.reg.client("g1").get_gateway_secret("g1").unwrap().0,
        secret_g
    );
    let g = dst
        .reg
        .client("h1")
        .request_token("a", Ipv4Addr::new(10, 1, 0, 3))
        .unwrap();
    assert_eq!(g.dst_port, 41000);
    assert!(verify(&secret_b, &g.fields(), &g.token_value().unwrap()));
    // Watchers resume: the change log and its generation came along.
    let w = target.watch(&["b"], 0, Duration::ZERO).unwrap();
    assert_eq!(w.generation, generation);
    // The policy came along too.
    assert_eq!(
        code(
            dst.reg
                .client("h1")
                .request_token("a", Ipv4Addr::new(203, 0, 113, 1))
        ),
        ErrorCode::PolicyDenied
    );

    // Only into an empty registry; and the round trip back gives the same document.
    assert_eq!(code(target.import(&export)), ErrorCode::NotEmpty);
    assert_eq!(target.export().unwrap().vms, export.vms);
}

#[test]
fn export_needs_the_secret_keys_and_import_the_right_key() {
    let plain = Fixture::on(Backend::Redb, "backup-nokeys");
    let admin = plain.reg.client("admin");
    match admin.export() {
        Err(ClientError::Api {
            status: 400,
            message,
            ..
        }) => assert!(message.contains("--secret-keys"), "{message}"),
        other => panic!("{other:?}"),
    }
    let keys_dir = TempDir::new("backup-keys2");
    let keys = write_secret_keys(&keys_dir.0);
    let src = Fixture::on_with_args(
        Backend::Redb,
        "backup-src2",
        &["--secret-keys", keys.to_str().unwrap()],
    );
    populate(&src.reg.client("admin"));
    let export = src.reg.client("admin").export().unwrap();
    // Another key cannot open the sealed secrets: refused whole, nothing written.
    let other_keys = keys_dir.0.join("other.keys");
    std::fs::write(&other_keys, format!("other {}\n", "11".repeat(32))).unwrap();
    let dst = Fixture::on_with_args(
        Backend::Redb,
        "backup-dst2",
        &["--secret-keys", other_keys.to_str().unwrap()],
    );
    let target = dst.reg.client("admin");
    match target.import(&export) {
        Err(ClientError::Api {
            status: 400,
            message,
            ..
        }) => assert!(message.contains("not in the key file"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(target.list_vms(None).unwrap().is_empty());
    assert!(target.list_networks().unwrap().is_empty());
}
