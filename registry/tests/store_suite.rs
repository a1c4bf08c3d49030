//! The storage suite (`vnp_registry::store::conformance`) against a real etcd, plus what only
//! a shared store has: sealed secrets at rest and a feed that survives compaction.

mod common;

use common::etcd::EtcdCluster;
use std::time::Duration;
use vnp_registry::model::SecretOwner;
use vnp_registry::service::Registry;
use vnp_registry::store::sealing::KeyRing;
use vnp_registry::store::{conformance, EtcdConfig, EtcdStore, FeedEvent, Store, StoreError};
use vnp_registry::tokens::TokenPolicy;

fn ring(id: &str, byte: u8) -> KeyRing {
    KeyRing::new(vec![(id.to_string(), [byte; 32])]).unwrap()
}

fn store(cluster: &EtcdCluster, prefix: &str, keys: KeyRing) -> EtcdStore {
    let endpoints = cluster.endpoints().split(',').map(str::to_string).collect();
    let mut config = EtcdConfig::new(endpoints, keys);
    config.prefix = prefix.to_string();
    EtcdStore::connect(config).expect("connect to etcd")
}

#[test]
fn etcd_store() {
    let cluster = EtcdCluster::start(1, "suite");
    for (name, case) in conformance::CASES {
        eprintln!("etcd: {name}");
        case(&store(&cluster, &format!("/suite/{name}/"), ring("k1", 1)));
    }
    secrets_are_sealed_at_rest(&cluster);
    reseal_moves_every_secret_to_the_new_key(&cluster);
    feed_delivers_other_writers_commits_and_survives_compaction(&cluster);
}

fn secrets_are_sealed_at_rest(cluster: &EtcdCluster) {
    let s = store(cluster, "/sealed/", ring("k1", 1));
    let mut model = s.load().unwrap();
    conformance::populate(&s, &mut model);
    let out = cluster.etcdctl(&["get", "--prefix", "/sealed/secrets/"]);
    assert!(out.status.success());
    let raw = out.stdout;
    assert!(!raw.is_empty(), "secrets are stored");
    // VM a's, VM b's and the gateway's secrets, and the two signing keys' private scalars.
    for secret in [[9u8; 32], [6u8; 32], [3u8; 32], [7u8; 32], [8u8; 32]] {
        assert!(
            !raw.windows(32).any(|w| w == secret),
            "a secret is in etcd in the clear"
        );
    }
    let keys = cluster.etcdctl(&["get", "--prefix", "--keys-only", "/sealed/secrets/sk/"]);
    let keys = String::from_utf8_lossy(&keys.stdout);
    assert!(
        keys.contains("/sealed/secrets/sk/k1") && keys.contains("/sealed/secrets/sk/k2"),
        "signing keys are stored as sealed secrets: {keys}"
    );
    assert!(
        raw.windows(7).any(|w| w == b"vnpe1\x02k"),
        "sealed values name their key"
    );
    // A replica with the wrong key cannot load, and says why (without the secret).
    match store(cluster, "/sealed/", ring("k1", 2)).load() {
        Err(e @ StoreError::Corrupt { .. }) => {
            assert!(e.to_string().contains("does not open"), "{e}")
        }
        other => panic!("loading with the wrong key must fail, got {other:?}"),
    }
    // Rotation: the new key seals, the old one still opens.
    let rotated = KeyRing::new(vec![("k2".into(), [2; 32]), ("k1".into(), [1; 32])]).unwrap();
    let loaded = store(cluster, "/sealed/", rotated).load().unwrap();
    assert_eq!(
        loaded.secrets[&SecretOwner::Vm("a".into())]
            .secret
            .as_bytes(),
        &[9u8; 32]
    );
}

fn next_batch(feed: &vnp_registry::store::Feed) -> FeedEvent {
    loop {
        match feed
            .recv_timeout(Duration::from_secs(10))
            .expect("feed event")
        {
            FeedEvent::Head { .. } => continue,
            other => return other,
        }
    }
}

fn feed_delivers_other_writers_commits_and_survives_compaction(cluster: &EtcdCluster) {
    let (a, b) = (
        store(cluster, "/feed/", ring("k1", 1)),
        store(cluster, "/feed/", ring("k1", 1)),
    );
    let start = b.load().unwrap();
    let feed = b.follow(start.revision).expect("etcd is a shared store");
    let mut model = a.load().unwrap();
    conformance::populate(&a, &mut model);
    let mut followed = start.clone();
    while followed.revision < model.revision {
        match next_batch(&feed) {
            FeedEvent::Batch { revision, ops } => {
                assert!(revision > followed.revision, "batches in commit order");
                followed.apply(&ops);
                followed.revision = revision;
            }
            other => panic!("expected a batch, got {other:?}"),
        }
    }
    conformance::assert_same_state(&followed, &model);

    // A follower resuming from a compacted revision gets the whole state instead.
    let out = cluster.etcdctl(&["compact", &model.revision.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let late = b.follow(start.revision).unwrap();
    match next_batch(&late) {
        FeedEvent::Snapshot(m) => {
            conformance::assert_same_state(&m, &model);
            assert!(m.revision >= model.revision);
        }
        other => panic!("expected a snapshot after compaction, got {other:?}"),
    }
}

fn reseal_moves_every_secret_to_the_new_key(cluster: &EtcdCluster) {
    let s = store(cluster, "/reseal/", ring("k1", 1));
    let mut model = s.load().unwrap();
    conformance::populate(&s, &mut model);
    drop(s);
    let rotated = KeyRing::new(vec![("k2".into(), [2; 32]), ("k1".into(), [1; 32])]).unwrap();
    let reg = Registry::open(
        Box::new(store(cluster, "/reseal/", rotated)),
        TokenPolicy { ttl_s: 600 },
    )
    .unwrap();
    assert_eq!(reg.reseal_secrets().unwrap(), model.secrets.len());
    let raw = cluster
        .etcdctl(&["get", "--prefix", "/reseal/secrets/"])
        .stdout;
    assert!(
        !raw.windows(7).any(|w| w == b"vnpe1\x02k1"),
        "a secret still sealed with k1"
    );
    drop(reg);
    // The old key can leave the key file now.
    let loaded = store(cluster, "/reseal/", ring("k2", 2)).load().unwrap();
    conformance::assert_same_state(&loaded, &model);
}
