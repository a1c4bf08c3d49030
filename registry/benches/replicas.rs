//! Token requests across registry replicas on a real 3-member etcd cluster, next to one redb
//! registry measured in the same run; write latency on both. Numbers go to docs/benchmarks.md.
//!
//! ```text
//! cargo bench -p vnp-registry --bench replicas
//! ```
//! Environment: `BENCH_SECS` (per token run, default 3), `BENCH_CLIENTS` (client threads,
//! default 4), `BENCH_REPLICAS` (default 2), `BENCH_WRITES` (default 300).

#[path = "../tests/common/mod.rs"]
mod common;

use common::etcd::{write_secret_keys, EtcdCluster};
use common::{Pki, RegistryProc, TempDir};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use vnp_registry_client::api::Role;
use vnp_registry_client::*;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// 16 source VMs on h1, 16 destinations on h2; returns (source id, destination address).
fn populate(admin: &RegistryClient) -> Vec<(String, Ipv4Addr)> {
    let net = NetworkSpec {
        id: "n".into(),
        vni: None,
        cidr: "10.1.0.0/24".parse().unwrap(),
        mtu: None,
        default_policy: None,
        nat_block: Some(64),
    };
    admin.create_network(&net).unwrap();
    for (h, last) in [("h1", 1), ("h2", 2)] {
        let spec = HostSpec {
            id: h.into(),
            underlay_addr: Ipv4Addr::new(198, 18, 0, last),
            port_range: None,
        };
        admin.create_host(&spec).unwrap();
    }
    let vm = |id: String, host: &str| VmSpec {
        id,
        network: "n".into(),
        host: Some(host.into()),
        ..VmSpec::default()
    };
    (0..16)
        .map(|i| {
            let s = admin.create_vm(&vm(format!("s{i}"), "h1")).unwrap();
            let d = admin.create_vm(&vm(format!("d{i}"), "h2")).unwrap();
            (s.id, d.ip)
        })
        .collect()
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    sorted[i].as_secs_f64() * 1e6
}

/// Token requests from every client thread for `secs`; prints throughput and percentiles.
fn token_run(label: &str, clients: Vec<RegistryClient>, pairs: &[(String, Ipv4Addr)], secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let n = clients.len();
    let threads: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(t, client)| {
            let pairs = pairs.to_vec();
            std::thread::spawn(move || {
                client.request_token(&pairs[0].0, pairs[0].1).unwrap();
                let mut lat = Vec::with_capacity(100_000);
                let mut i = t;
                while Instant::now() < deadline {
                    let (s, d) = &pairs[i % pairs.len()];
                    let t0 = Instant::now();
                    client.request_token(s, *d).unwrap();
                    lat.push(t0.elapsed());
                    i += 1;
                }
                lat
            })
        })
        .collect();
    let start = Instant::now();
    let mut all: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let elapsed = start.elapsed().as_secs_f64().max(secs as f64);
    all.sort();
    println!(
        "tokens/{label:<22} clients={n} requests={:<7} throughput={:>6.0} req/s  p50={:>5.0} us  p99={:>6.0} us",
        all.len(),
        all.len() as f64 / elapsed,
        pct(&all, 0.5),
        pct(&all, 0.99)
    );
}

/// `writes` endpoint registrations, one after another (each a committed write).
fn write_run(label: &str, host: &RegistryClient, writes: usize) {
    let mut lat = Vec::with_capacity(writes);
    for i in 0..writes {
        let port = 41000 + (i % 2) as u16;
        let t0 = Instant::now();
        host.register_endpoint("d0", Ipv4Addr::new(198, 18, 0, 2), port)
            .unwrap();
        lat.push(t0.elapsed());
    }
    lat.sort();
    println!(
        "writes/{label:<22} writes={writes} p50={:>6.0} us  p99={:>6.0} us",
        pct(&lat, 0.5),
        pct(&lat, 0.99)
    );
}

fn main() {
    let secs = env("BENCH_SECS", 3) as u64;
    let clients = env("BENCH_CLIENTS", 4);
    let replicas = env("BENCH_REPLICAS", 2);
    let writes = env("BENCH_WRITES", 300);

    // One redb registry: the single-process figure of the same run.
    let f = common::Fixture::new("bench-redb");
    let pairs = populate(&f.reg.client("admin"));
    let redb_clients = (0..clients).map(|_| f.reg.client("h1")).collect();
    token_run("redb (1 process)", redb_clients, &pairs, secs);
    write_run("redb (fsync)", &f.reg.client("h2"), writes);
    drop(f);

    // `replicas` registries on a 3-member etcd cluster; clients spread over them.
    let dir = TempDir::new("bench-etcd");
    let tls = dir.0.join("tls");
    let pki = Pki::new(&tls);
    pki.client("h1", Role::Host, "h1");
    pki.client("h2", Role::Host, "h2");
    let cluster = EtcdCluster::start(3, "bench");
    let keys = write_secret_keys(&dir.0);
    let endpoints = cluster.endpoints();
    let procs: Vec<RegistryProc> = (0..replicas)
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
            ];
            RegistryProc::start(&root, &tls, &args)
        })
        .collect();
    let pairs = populate(&procs[0].client("admin"));
    for p in &procs {
        let c = p.client("h1");
        while c.request_token(&pairs[15].0, pairs[15].1).is_err() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let spread = (0..clients)
        .map(|i| procs[i % replicas].client("h1"))
        .collect();
    token_run(&format!("etcd ({replicas} replicas)"), spread, &pairs, secs);
    write_run("etcd (3 members)", &procs[0].client("h2"), writes);
    drop(procs);
    drop(cluster);
}
