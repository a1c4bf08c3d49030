//! vnpd fails over between registry replicas (issue 14): the cluster's registry is two
//! `vnp-registry` replicas on a real 3-member etcd cluster, and every vnpd is configured with
//! both URLs. The replica vnpd talks to is killed (SIGKILL) while `dpdk-testpmd` frontends send
//! vm-a → vm-b: the tokens vnpd already holds keep that traffic flowing, and a new pair
//! (vm-a → vm-c) still gets its token, from the surviving replica.
//!
//! Needs root (namespaces), etcd, dpdk-testpmd and 2 MiB hugepages (`scripts/setup`).
//! Run: `cargo test -p vnp-e2e --test registry_failover -- --nocapture`.

use std::time::{Duration, Instant};
use vnp_e2e::cluster::{assert_nothing_left, Cluster, ClusterOptions};
use vnp_e2e::registries::Replication;
use vnp_testkit::testpmd::{ForwardMode, TestPmd, TestPmdSpec};
use vnpd_admin_api::AttachmentInfo;

/// Starts testpmd as `vm`'s NIC receiving everything (rx-only).
fn receiver(c: &Cluster, vm: &AttachmentInfo) -> TestPmd {
    let mut spec = TestPmdSpec::virtio_user(&vm.socket_path);
    spec.mode = ForwardMode::RxOnly;
    spec.mac = Some(mac(&vm.mac));
    spec.main_lcore = Some(1);
    started(c, spec)
}

/// Starts testpmd as `from`'s NIC sending 64-byte UDP packets to `to` through the virtual
/// router (tx-only).
fn sender(c: &Cluster, from: &AttachmentInfo, to: &AttachmentInfo) -> TestPmd {
    let mut spec = TestPmdSpec::virtio_user(&from.socket_path);
    spec.mode = ForwardMode::TxOnly;
    spec.mac = Some(mac(&from.mac));
    spec.eth_peer = Some(vnpd::edge::ROUTER_MAC);
    spec.tx_ip = Some((from.vm_ip, to.vm_ip));
    started(c, spec)
}

fn started(c: &Cluster, mut spec: TestPmdSpec) -> TestPmd {
    spec.launch_timeout = Duration::from_secs(90);
    let mut pmd = TestPmd::launch(spec).unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    pmd.wait_link_up(0, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    pmd.start().unwrap();
    pmd
}

fn mac(text: &str) -> [u8; 6] {
    let mut out = [0u8; 6];
    for (o, part) in out.iter_mut().zip(text.split(':')) {
        *o = u8::from_str_radix(part, 16).unwrap();
    }
    out
}

/// One per-VM counter of host `host`'s vnpd.
fn counter(c: &Cluster, host: usize, name: &str, vm: &str) -> u64 {
    c.metric(host, name, &[("vm", vm)]).unwrap()
}

fn bad_tokens(c: &Cluster, host: usize, vm: &str) -> u64 {
    ["rx_bad_token", "rx_expired"]
        .iter()
        .map(|r| {
            c.metric(host, "vnpd_drops_total", &[("vm", vm), ("reason", r)])
                .unwrap()
        })
        .sum()
}

#[test]
fn vnpd_fails_over_to_another_registry_replica() {
    let mut c = Cluster::start(&ClusterOptions {
        prefix: "vnpf".into(),
        replication: Some(Replication {
            etcd_members: 3,
            replicas: 2,
            max_staleness_ms: 5000,
        }),
        ..ClusterOptions::default()
    })
    .expect("cluster");
    let dir = c.dir().to_path_buf();
    let namespaces = c.namespace_names();
    c.create_vm("vm-a", 0, &[]).unwrap();
    c.create_vm("vm-b", 1, &[]).unwrap();
    c.create_vm("vm-c", 1, &[]).unwrap();
    let att_a = c.attach(0, "vm-a").unwrap();
    let att_b = c.attach(1, "vm-b").unwrap();
    let att_c = c.attach(1, "vm-c").unwrap();

    // Traffic on a pair whose token comes from the first replica (vnpd starts on the first URL).
    let mut pmd_b = receiver(&c, &att_b);
    let mut pmd_a = sender(&c, &att_a, &att_b);
    let t = Instant::now();
    while counter(&c, 1, "vnpd_rx_packets_total", "vm-b") == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no traffic vm-a -> vm-b before the failover\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let requests_before = counter(&c, 0, "vnpd_token_requests_total", "vm-a");
    assert!(requests_before >= 1, "vnpd a asked no token");

    // The replica every client is on dies without warning.
    let replicated = c.replicated().expect("replicated registry");
    let dead_url = replicated.url(0);
    replicated.kill_replica(0).unwrap();
    eprintln!("killed registry replica 0 ({dead_url})");

    // Tokens already held keep the pair going: traffic grows, and nobody needs a new token.
    let rx_at_kill = counter(&c, 1, "vnpd_rx_packets_total", "vm-b");
    std::thread::sleep(Duration::from_secs(3));
    let rx_after = counter(&c, 1, "vnpd_rx_packets_total", "vm-b");
    assert!(
        rx_after > rx_at_kill,
        "traffic stopped with the replica ({rx_at_kill} -> {rx_after})\n{}",
        c.logs()
    );
    assert_eq!(
        counter(&c, 0, "vnpd_token_requests_total", "vm-a"),
        requests_before,
        "a held token was asked for again"
    );
    pmd_a.stop().unwrap();
    pmd_b.stop().unwrap();
    drop(pmd_a);
    drop(pmd_b);

    // A new pair: vm-a now sends to vm-c, which needs a token only the other replica can mint.
    let mut pmd_c = receiver(&c, &att_c);
    let mut pmd_a = sender(&c, &att_a, &att_c);
    let t = Instant::now();
    while counter(&c, 1, "vnpd_rx_packets_total", "vm-c") == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the new pair vm-a -> vm-c got no traffic after the failover\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let took = t.elapsed();
    pmd_a.stop().unwrap();
    pmd_c.stop().unwrap();
    let requests_after = counter(&c, 0, "vnpd_token_requests_total", "vm-a");
    let delivered_c = counter(&c, 1, "vnpd_rx_packets_total", "vm-c");
    let got_c = pmd_c.port_stats(0).unwrap().rx_packets;
    eprintln!(
        "new pair delivered after {took:?}: vnpd b delivered {delivered_c} to vm-c, testpmd c \
         received {got_c}; vm-a token requests {requests_before} -> {requests_after}"
    );
    assert!(
        requests_after > requests_before,
        "no token asked for the new pair"
    );
    assert!(got_c > 0, "testpmd c received nothing");
    assert_eq!(bad_tokens(&c, 1, "vm-c"), 0, "a token was refused");
    assert_eq!(bad_tokens(&c, 1, "vm-b"), 0, "a token was refused");
    // vnpd's registry client did move on from the dead replica.
    let vnpd_log = std::fs::read_to_string(c.host(0).dir.join("vnpd.log")).unwrap();
    assert!(
        vnpd_log.contains(&dead_url) && vnpd_log.contains("trying the next"),
        "vnpd a's log does not show the failover:\n{}",
        c.host(0).vnpd_stderr()
    );
    drop(pmd_a);
    drop(pmd_c);
    drop(c);
    assert_nothing_left(&dir, &namespaces);
}
