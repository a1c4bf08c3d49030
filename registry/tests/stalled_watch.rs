//! A replica whose etcd watch stalls (issue 14, bounded staleness): replica A talks only to
//! etcd member 0, replica B to members 1 and 2. Member 0 is frozen with SIGSTOP (its
//! connections stay open, nothing answers: A's watch and its staleness probe hang). A keeps
//! minting tokens until it has not been confirmed current for `--max-staleness-ms`, then
//! refuses them with 503 while B goes on writing. Meanwhile etcd compacts past A's position.
//! When member 0 comes back, A resyncs (its watch is given up and started again: from where it
//! was, or, if member 0 applies the compaction first, by reloading the whole state) and mints
//! tokens that reflect the writes it missed.

mod common;

use common::etcd::{write_secret_keys, EtcdCluster};
use common::{Pki, RegistryProc, TempDir};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use vnp_protocol::token::verify;
use vnp_registry_client::api::Role;
use vnp_registry_client::*;

/// The replicas' `--max-staleness-ms`.
const MAX_STALENESS: Duration = Duration::from_millis(2000);
/// How long member 0 stays frozen: past the bound, and past the etcd client's keep-alive
/// (a 2 s ping with a 5 s timeout), so that A's connection to member 0 is dropped and its
/// watch must resume from a revision that compaction removed meanwhile.
const FROZEN_FOR: Duration = Duration::from_secs(10);

fn replica(dir: &TempDir, tls: &std::path::Path, name: &str, endpoints: &str) -> RegistryProc {
    let root = dir.0.join(name);
    std::fs::create_dir_all(&root).unwrap();
    let keys = write_secret_keys(&root);
    let staleness = MAX_STALENESS.as_millis().to_string();
    let args = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        endpoints,
        "--secret-keys",
        keys.to_str().unwrap(),
        "--max-staleness-ms",
        staleness.as_str(),
    ];
    RegistryProc::start(&root, tls, &args)
}

fn vm(id: &str, host: &str) -> VmSpec {
    VmSpec {
        id: id.into(),
        network: "n1".into(),
        host: Some(host.into()),
        ..VmSpec::default()
    }
}

fn populate(admin: &RegistryClient) {
    common::network_and_two_hosts(admin, None);
    admin.create_vm(&vm("a", "h1")).unwrap();
    admin.create_vm(&vm("b", "h2")).unwrap();
}

/// Polls `check` every 50 ms until it holds or `limit` passes; returns how long it took.
fn within(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !check() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    t.elapsed()
}

fn is_unavailable<T: std::fmt::Debug>(r: &Result<T, ClientError>) -> bool {
    matches!(
        r,
        Err(ClientError::Api {
            status: 503,
            code: ErrorCode::Unavailable,
            ..
        })
    )
}

/// The replica's `vnp_registry_staleness_ms` gauge.
fn staleness_ms(reg: &RegistryProc) -> u64 {
    let metrics = reg.client("admin").metrics_text().unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("vnp_registry_staleness_ms "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no staleness gauge in {metrics}"))
}

/// etcd's current revision, asked of the members that answer.
fn etcd_revision(cluster: &EtcdCluster) -> u64 {
    let out = cluster.etcdctl(&["endpoint", "status", "-w", "json"]);
    assert!(out.status.success(), "{out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    status
        .as_array()
        .and_then(|rows| {
            rows.iter()
                .map(|r| r["Status"]["header"]["revision"].as_u64())
                .max()
        })
        .flatten()
        .expect("revision in endpoint status")
}

#[test]
fn replica_with_a_stalled_watch_stops_minting_then_resyncs() {
    let dir = TempDir::new("stall");
    let tls = dir.0.join("tls");
    let pki = Pki::new(&tls);
    pki.client("h1", Role::Host, "h1");
    pki.client("h2", Role::Host, "h2");
    let mut cluster = EtcdCluster::start(3, "stall");
    let m0 = cluster.members[0].client_url.clone();
    let others = format!(
        "{},{}",
        cluster.members[1].client_url, cluster.members[2].client_url
    );
    let a = replica(&dir, &tls, "a", &m0);
    let b = replica(&dir, &tls, "b", &others);
    populate(&b.client("admin"));
    let b_ip = Ipv4Addr::new(10, 1, 0, 3);
    let h1_on_a = a.client("h1");
    within(Duration::from_secs(5), "replica a sees VM b", || {
        h1_on_a.request_token("a", b_ip).is_ok()
    });
    let stale_at_freeze = Duration::from_millis(staleness_ms(&a));
    assert!(stale_at_freeze < MAX_STALENESS);

    // Freeze the member A's watch is on. A goes on minting for at most the bound.
    cluster.pause(0);
    let frozen = Instant::now();
    let refused_after = within(
        MAX_STALENESS + Duration::from_secs(4),
        "replica a refuses tokens once stale",
        || is_unavailable(&h1_on_a.request_token("a", b_ip)),
    );
    eprintln!("replica a refused tokens {refused_after:?} after its etcd member froze");
    // It kept minting for as long as the bound allowed, not less: it had been confirmed
    // current `stale_at_freeze` before the freeze (slack for the polling and a late probe).
    assert!(
        refused_after + stale_at_freeze + Duration::from_millis(500) >= MAX_STALENESS,
        "refused {refused_after:?} after the freeze, {stale_at_freeze:?} stale at the freeze: \
         before the {MAX_STALENESS:?} bound"
    );
    match h1_on_a.request_token("a", b_ip) {
        Err(ClientError::Api { message, .. }) => {
            assert!(message.contains("another replica"), "{message}")
        }
        other => panic!("expected 503, got {other:?}"),
    }
    assert!(staleness_ms(&a) > MAX_STALENESS.as_millis() as u64);
    // Reads are still served (from the possibly stale model); tokens are what the bound guards.
    assert!(a.client("admin").get_vm("b").is_ok());

    // The rest of the cluster goes on: B writes what A is missing, then etcd compacts past A.
    let h2_on_b = b.client("h2");
    let endpoint_gen = h2_on_b
        .register_endpoint("b", Ipv4Addr::new(198, 18, 0, 2), 41000)
        .unwrap();
    let during = b.client("admin").create_vm(&vm("during", "h1")).unwrap();
    b.client("h1").request_token("a", b_ip).unwrap();
    let revision = etcd_revision(&cluster);
    let out = cluster.etcdctl(&["compact", &revision.to_string()]);
    assert!(out.status.success(), "compact: {out:?}");
    std::thread::sleep(FROZEN_FOR.saturating_sub(frozen.elapsed()));
    assert!(
        is_unavailable(&h1_on_a.request_token("a", b_ip)),
        "replica a minted while its etcd member was still frozen"
    );

    // Back: A resyncs and mints again, with everything it missed.
    cluster.resume(0);
    let back = within(
        Duration::from_secs(30),
        "replica a mints tokens again",
        || h1_on_a.request_token("a", b_ip).is_ok(),
    );
    eprintln!("replica a minted again {back:?} after its etcd member came back");
    let g = h1_on_a.request_token("a", b_ip).unwrap();
    assert_eq!(
        g.dst_port, 41000,
        "token leads to the endpoint set meanwhile"
    );
    let (secret_b, _) = a.client("h2").get_vm_secret("b").unwrap();
    assert!(verify(&secret_b, &g.fields(), &g.token_value().unwrap()));
    assert_eq!(a.client("admin").get_vm("during").unwrap(), during);
    h1_on_a.request_token("a", during.ip).unwrap();
    assert_eq!(
        a.client("admin").list_vms(None).unwrap(),
        b.client("admin").list_vms(None).unwrap()
    );
    // Watchers on A resume with the store's generation, the same as on B.
    let w = a.client("admin").watch(&[], 0, Duration::ZERO).unwrap();
    assert!(w.generation > endpoint_gen, "{w:?}");
    assert_eq!(
        w.generation,
        b.client("admin")
            .watch(&[], 0, Duration::ZERO)
            .unwrap()
            .generation
    );
    assert!(staleness_ms(&a) < MAX_STALENESS.as_millis() as u64);
    // A's watch did not just wake up: it was given up (the client's keep-alive noticed the
    // frozen member) and started again, either from where it was (if member 0 served the
    // missed revisions before applying the compaction) or from a full reload.
    let log = std::fs::read_to_string(&a.log).unwrap();
    let reloaded = log.contains("reloading the whole state");
    assert!(
        reloaded || log.contains("etcd watch broke"),
        "replica a never restarted its watch:\n{log}"
    );
    eprintln!(
        "replica a resynced by {}",
        if reloaded {
            "reloading the whole state"
        } else {
            "resuming its watch"
        }
    );
}
