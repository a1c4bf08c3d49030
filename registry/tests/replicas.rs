//! Several `vnp-registry` replicas on one real 3-member etcd cluster (loopback, started and
//! removed by the test): what one replica writes the others see and announce to their
//! watchers, conflicting writes on two replicas resolve to exactly one winner, the loss of an
//! etcd member changes nothing visible, a stale replica stops minting tokens, and a client
//! fails over when its replica dies.
//!
//! One cluster and one set of replicas serve every assertion, in order, to keep this to well
//! under a minute.

mod common;

use common::etcd::{write_secret_keys, EtcdCluster};
use common::{Pki, RegistryProc, TempDir};
use std::net::Ipv4Addr;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use vnp_protocol::token::verify;
use vnp_registry_client::api::Role;
use vnp_registry_client::*;

/// A write through one replica is visible on every other within this (the follower applies
/// etcd's watch stream; on loopback it takes milliseconds).
const VISIBLE_WITHIN: Duration = Duration::from_secs(2);
/// The replicas' `--max-staleness-ms`.
const MAX_STALENESS_MS: u64 = 2000;

struct Deployment {
    replicas: Vec<RegistryProc>,
    cluster: EtcdCluster,
    _pki: Pki,
    dir: TempDir,
}

impl Deployment {
    fn start() -> Deployment {
        let dir = TempDir::new("replicas");
        let tls = dir.0.join("tls");
        let pki = Pki::new(&tls);
        pki.client("h1", Role::Host, "h1");
        pki.client("h2", Role::Host, "h2");
        let cluster = EtcdCluster::start(3, "replicas");
        let keys = write_secret_keys(&dir.0);
        let endpoints = cluster.endpoints();
        let staleness = MAX_STALENESS_MS.to_string();
        let replicas = (0..3)
            .map(|i| {
                let root = dir.0.join(format!("r{i}"));
                std::fs::create_dir_all(&root).unwrap();
                let args = [
                    "--store",
                    "etcd",
                    "--etcd-endpoints",
                    endpoints.as_str(),
                    "--secret-keys",
                    keys.to_str().unwrap(),
                    "--max-staleness-ms",
                    staleness.as_str(),
                ];
                RegistryProc::start(&root, &tls, &args)
            })
            .collect();
        Deployment {
            replicas,
            cluster,
            _pki: pki,
            dir,
        }
    }

    fn client(&self, replica: usize, stem: &str) -> RegistryClient {
        self.replicas[replica].client(stem)
    }
}

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Api { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Polls `check` until it holds or `limit` passes; returns how long it took.
fn within(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !check() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    t.elapsed()
}

fn vm(id: &str, host: &str) -> VmSpec {
    VmSpec {
        id: id.into(),
        network: "n1".into(),
        host: Some(host.into()),
        ..VmSpec::default()
    }
}

#[test]
fn replicas_on_a_three_member_etcd_cluster() {
    let mut d = Deployment::start();
    writes_are_visible_everywhere(&d);
    watcher_on_one_replica_sees_a_change_made_on_another(&d);
    conflicting_writes_on_two_replicas_have_one_winner(&d);
    losing_one_etcd_member_changes_nothing(&mut d);
    stale_replica_stops_minting_tokens(&mut d);
    client_fails_over_when_its_replica_dies(&mut d);
    eprintln!("logs were in {}", d.dir.0.display());
}

fn writes_are_visible_everywhere(d: &Deployment) {
    let admin = d.client(0, "admin");
    common::network_and_two_hosts(&admin, None);
    admin.create_vm(&vm("a", "h1")).unwrap();
    let b = admin.create_vm(&vm("b", "h2")).unwrap();
    for r in 1..3 {
        let other = d.client(r, "admin");
        let took = within(VISIBLE_WITHIN, "VM b on another replica", || {
            other.get_vm("b").is_ok()
        });
        eprintln!("replica {r} saw VM b after {took:?}");
        assert_eq!(other.get_vm("b").unwrap(), b);
    }
    // Secrets went through etcd sealed and come back whole on every replica.
    let s0 = d.client(0, "h2").get_vm_secret("b").unwrap().0;
    for r in 1..3 {
        assert_eq!(d.client(r, "h2").get_vm_secret("b").unwrap().0, s0);
    }
}

fn watcher_on_one_replica_sees_a_change_made_on_another(d: &Deployment) {
    let since = d
        .client(1, "admin")
        .watch(&[], 0, Duration::ZERO)
        .unwrap()
        .generation;
    let watcher = {
        let c = d.client(1, "h1");
        std::thread::spawn(move || {
            let t = Instant::now();
            (
                c.watch(&["b"], since, Duration::from_secs(20)).unwrap(),
                t.elapsed(),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let generation = d
        .client(0, "h2")
        .register_endpoint("b", Ipv4Addr::new(198, 18, 0, 2), 41000)
        .unwrap();
    let (w, waited) = watcher.join().unwrap();
    assert!(
        waited < Duration::from_secs(5),
        "long-poll woke on the change ({waited:?})"
    );
    assert_eq!(w.changes.len(), 1, "{w:?}");
    assert_eq!(w.changes[0].kind, ChangeKind::Endpoint);
    assert_eq!(w.changes[0].endpoint.unwrap().port, 41000);
    // The generation is the store's, not the replica's: the same number everywhere.
    assert_eq!(w.generation, generation);
    // And a token minted by the third replica already leads to the new endpoint.
    let h1 = d.client(2, "h1");
    within(VISIBLE_WITHIN, "endpoint on replica 2", || {
        h1.request_token("a", Ipv4Addr::new(10, 1, 0, 3))
            .unwrap()
            .dst_port
            == 41000
    });
    let g = h1.request_token("a", Ipv4Addr::new(10, 1, 0, 3)).unwrap();
    let (sb, _) = d.client(2, "h2").get_vm_secret("b").unwrap();
    assert!(verify(&sb, &g.fields(), &g.token_value().unwrap()));
}

/// Two admins on two replicas ask for the same thing at the same instant.
fn race<T: Send + 'static>(
    d: &Deployment,
    job: impl Fn(usize, RegistryClient) -> Result<T, ClientError> + Send + Sync + 'static,
) -> Vec<Result<T, ClientError>> {
    let job = Arc::new(job);
    let barrier = Arc::new(Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|r| {
            let (job, barrier, client) = (job.clone(), barrier.clone(), d.client(r, "admin"));
            std::thread::spawn(move || {
                barrier.wait();
                job(r, client)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn conflicting_writes_on_two_replicas_have_one_winner(d: &Deployment) {
    for round in 0..5 {
        // Different ids, same address: only a whole-state check catches this conflict.
        let ip = Ipv4Addr::new(10, 1, 0, 100 + round);
        let results = race(d, move |r, c| {
            c.create_vm(&VmSpec {
                ip: Some(ip),
                ..vm(&format!("race{round}-{r}"), "h1")
            })
        });
        let won: Vec<&VmRecord> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(
            won.len(),
            1,
            "round {round}: exactly one winner: {results:?}"
        );
        let lost = results.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert!(
            matches!(
                lost.code(),
                Some(ErrorCode::DuplicateIp | ErrorCode::Conflict)
            ),
            "loser gets a clear 409: {lost:?}"
        );
        assert_eq!(lost.status(), Some(409));
        // Nothing half-written: the winner is whole on every replica, the loser nowhere.
        let winner = won[0].clone();
        for r in 0..3 {
            let c = d.client(r, "admin");
            within(VISIBLE_WITHIN, "winner everywhere", || {
                c.get_vm(&winner.id).is_ok()
            });
            let at_ip: Vec<VmRecord> = c
                .list_vms(Some("n1"))
                .unwrap()
                .into_iter()
                .filter(|v| v.ip == ip)
                .collect();
            assert_eq!(at_ip, vec![winner.clone()], "replica {r}");
        }
        let (_, generation) = d.client(0, "h1").get_vm_secret(&winner.id).unwrap();
        assert_eq!(generation, 1, "the winner's secret was stored with it");
    }
    // The same id on both: one creates it, the other is told it exists.
    let results = race(d, |_, c| c.create_vm(&vm("same", "h2")));
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    let lost = results.iter().find_map(|r| r.as_ref().err()).unwrap();
    assert!(
        matches!(
            lost.code(),
            Some(ErrorCode::Duplicate | ErrorCode::Conflict)
        ),
        "{lost:?}"
    );
    let replanned: usize = d.replicas[..2]
        .iter()
        .map(|r| std::fs::read_to_string(&r.log).unwrap_or_default())
        .map(|log| log.matches("re-planning").count())
        .sum();
    eprintln!("{replanned} of 6 races were decided by etcd's compare (the others by timing)");
}

fn losing_one_etcd_member_changes_nothing(d: &mut Deployment) {
    // The hardest member to lose: the leader.
    let leader = d.cluster.leader();
    d.cluster.kill(leader);
    let killed = Instant::now();
    let admin = d.client(1, "admin");
    // Writes go on once the two remaining members have elected a leader (about one election
    // timeout, 1 s here). A commit caught in the election is sent again by the registry, which
    // recognises its own commit if the first attempt landed after all: no error reaches the
    // client, and nothing is written twice.
    let c = admin.create_vm(&vm("after-kill", "h2")).unwrap();
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "{:?}",
        killed.elapsed()
    );
    eprintln!(
        "killed the leader (member {leader}); writes went on after {:?}",
        killed.elapsed()
    );
    for r in 0..3 {
        let h1 = d.client(r, "h1");
        within(VISIBLE_WITHIN, "new VM on every replica", || {
            h1.request_token("a", c.ip).is_ok()
        });
    }
    // Keep minting for a while: no replica goes stale with a quorum alive.
    std::thread::sleep(Duration::from_millis(MAX_STALENESS_MS + 500));
    for r in 0..3 {
        d.client(r, "h1").request_token("a", c.ip).unwrap();
    }
    d.cluster.restart(leader);
    d.cluster.wait_healthy(Duration::from_secs(30));
}

/// The replica's `vnp_registry_staleness_ms` gauge.
fn staleness_ms(d: &Deployment, replica: usize) -> u64 {
    let metrics = d.client(replica, "admin").metrics_text().unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("vnp_registry_staleness_ms "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no staleness gauge in {metrics}"))
}

fn stale_replica_stops_minting_tokens(d: &mut Deployment) {
    let b_ip = Ipv4Addr::new(10, 1, 0, 3);
    let h1 = d.client(2, "h1");
    h1.request_token("a", b_ip).unwrap();
    for r in 0..3 {
        let age = staleness_ms(d, r);
        assert!(
            age < MAX_STALENESS_MS,
            "replica {r} is {age} ms stale with etcd healthy"
        );
    }
    // Without a quorum no replica can confirm it is current: after the bound, they refuse.
    d.cluster.kill(1);
    d.cluster.kill(2);
    let took = within(
        Duration::from_millis(MAX_STALENESS_MS + 3000),
        "stale replica refuses tokens",
        || {
            matches!(
                h1.request_token("a", b_ip),
                Err(ClientError::Api {
                    code: ErrorCode::Unavailable,
                    ..
                })
            )
        },
    );
    eprintln!(
        "replica refused tokens {took:?} after losing the quorum (bound {MAX_STALENESS_MS} ms)"
    );
    match h1.request_token("a", b_ip) {
        Err(ClientError::Api {
            status, message, ..
        }) => {
            assert_eq!(status, 503);
            assert!(message.contains("another replica"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let staleness = staleness_ms(d, 2);
    assert!(staleness > MAX_STALENESS_MS, "gauge says {staleness} ms");
    d.cluster.restart(1);
    d.cluster.restart(2);
    d.cluster.wait_healthy(Duration::from_secs(30));
    for r in 0..3 {
        let h1 = d.client(r, "h1");
        within(
            Duration::from_secs(15),
            "tokens again with the quorum back",
            || h1.request_token("a", b_ip).is_ok(),
        );
    }
    assert_eq!(code(h1.request_token("nope", b_ip)), ErrorCode::UnknownVm);
}

fn client_fails_over_when_its_replica_dies(d: &mut Deployment) {
    let all: Vec<String> = d.replicas.iter().map(|r| r.url.clone()).collect();
    let mut config = d.replicas[0].config("h1");
    config.url = all.join(",");
    let h1 = RegistryClient::new(config).unwrap();
    let mut config = d.replicas[0].config("admin");
    config.url = all.join(",");
    let admin = RegistryClient::new(config).unwrap();
    let b_ip = Ipv4Addr::new(10, 1, 0, 3);
    h1.request_token("a", b_ip).unwrap();
    assert_eq!(h1.current_url(), all[0]);

    // The replica this client uses dies without warning.
    let _ = d.replicas[0].child.kill();
    let _ = d.replicas[0].child.wait();
    let t = Instant::now();
    let g = h1.request_token("a", b_ip).unwrap();
    eprintln!("token after failover took {:?}", t.elapsed());
    assert_ne!(h1.current_url(), all[0], "moved to another replica");
    let (sb, _) = d.client(1, "h2").get_vm_secret("b").unwrap();
    assert!(verify(&sb, &g.fields(), &g.token_value().unwrap()));
    // A write (not idempotent by itself) goes through another replica, exactly once.
    let before = d.client(1, "admin").list_vms(None).unwrap().len();
    let c = admin.create_vm(&vm("after-failover", "h1")).unwrap();
    assert_ne!(admin.current_url(), all[0]);
    within(VISIBLE_WITHIN, "write after failover on replica 2", || {
        d.client(2, "admin").get_vm(&c.id).is_ok()
    });
    assert_eq!(
        d.client(2, "admin").list_vms(None).unwrap().len(),
        before + 1
    );
}
