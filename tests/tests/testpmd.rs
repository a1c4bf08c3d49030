//! A second, independent vhost-user frontend end to end: `dpdk-testpmd` (net_virtio_user)
//! attached as vm-a on host a sends UDP to vm-b on host b, where another testpmd receives it.
//! The pair's token comes from the real registry through vnpd's control thread; nothing is
//! configured by hand. Then vm-b moves to host a and vm-a's host learns it from the registry's
//! watch.
//!
//! Needs root (namespaces), dpdk-testpmd and 2 MiB hugepages (`scripts/setup`).
//! Run: `cargo test -p vnp-e2e --test testpmd -- --nocapture`.

use std::time::Duration;
use vnp_e2e::cluster::{assert_nothing_left, Cluster, ClusterOptions};
use vnp_registry_client::MoveVm;
use vnp_testkit::testpmd::{ForwardMode, TestPmd, TestPmdSpec};
use vnpd_admin_api::AttachmentInfo;

/// The tests of this file each run a whole cluster with busy-polling frontends or TCG guests;
/// on a small machine they starve each other, so they take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts testpmd as `vm`'s NIC receiving everything (rx-only), on its own lcore.
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

/// Launches testpmd, waits for its link and starts forwarding; failures carry the cluster's logs.
fn started(c: &Cluster, mut spec: TestPmdSpec) -> TestPmd {
    spec.launch_timeout = Duration::from_secs(60);
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

#[test]
fn testpmd_frontends_exchange_traffic_through_two_vnpd() {
    let _turn = serial();
    let c = Cluster::start(&ClusterOptions {
        prefix: "vnpt".into(),
        ..ClusterOptions::default()
    })
    .expect("cluster");
    let dir = c.dir().to_path_buf();
    let namespaces = c.namespace_names();
    c.create_vm("vm-a", 0, &[]).unwrap();
    c.create_vm("vm-b", 1, &[]).unwrap();
    let att_a = c.attach(0, "vm-a").unwrap();
    let att_b = c.attach(1, "vm-b").unwrap();

    // Receiver first, so nothing sent is lost to a missing frontend.
    let mut pmd_b = receiver(&c, &att_b);

    let mut pmd_a = sender(&c, &att_a, &att_b);
    std::thread::sleep(Duration::from_secs(4));
    pmd_a.stop().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    pmd_b.stop().unwrap();

    let sent = pmd_a.port_stats(0).unwrap();
    let got = pmd_b.port_stats(0).unwrap();
    let m = |host: usize, name: &str, vm: &str| c.metric(host, name, &[("vm", vm)]).unwrap();
    let a_tx = m(0, "vnpd_tx_packets_total", "vm-a");
    let a_req = m(0, "vnpd_token_requests_total", "vm-a");
    let b_rx = m(1, "vnpd_rx_packets_total", "vm-b");
    let b_bad = c
        .metric(
            1,
            "vnpd_drops_total",
            &[("vm", "vm-b"), ("reason", "rx_bad_token")],
        )
        .unwrap();
    eprintln!(
        "testpmd a sent {}, vnpd a encapsulated {a_tx} ({a_req} token requests), vnpd b delivered {b_rx}, testpmd b received {}",
        sent.tx_packets, got.rx_packets
    );
    assert!(sent.tx_packets > 0, "testpmd a sent nothing");
    assert!(a_tx > 0, "vnpd a sent nothing\n{}", c.logs());
    assert!(a_req >= 1, "no token was requested");
    assert!(b_rx > 0, "vnpd b delivered nothing\n{}", c.logs());
    assert!(got.rx_packets > 0, "testpmd b received nothing");
    assert!(got.rx_packets <= b_rx);
    assert_eq!(b_bad, 0, "the registry's token was refused");

    // vm-b moves to host a (its endpoint changes): host a hears it through the registry's
    // watch, forgets its token, and the next packet asks again (now for a same-host pair).
    drop(pmd_b);
    c.host(1).admin().detach("vm-b").unwrap();
    c.registry(|r| {
        r.move_vm(
            "vm-b",
            &MoveVm {
                host: Some("h-a".into()),
                host_port: None,
            },
        )
    })
    .unwrap();
    let att_b = c.attach(0, "vm-b").unwrap();
    assert_eq!(att_b.host_addr, c.host(0).addr);
    let mut pmd_b = receiver(&c, &att_b);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        pmd_a.start().unwrap();
        std::thread::sleep(Duration::from_secs(1));
        pmd_a.stop().unwrap();
        if m(0, "vnpd_token_requests_total", "vm-a") > a_req
            && m(0, "vnpd_rx_packets_total", "vm-b") > 0
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "vm-a never re-asked for a token (or vm-b got nothing) after vm-b moved\n{}",
            c.logs()
        );
    }
    pmd_b.stop().unwrap();
    assert!(pmd_b.port_stats(0).unwrap().rx_packets > 0);

    drop(pmd_a);
    drop(pmd_b);
    drop(c);
    assert_nothing_left(&dir, &namespaces);
}

/// Tokens that live 12 s, refreshed 8 s ahead: a steady stream from vm-a to vm-b spanning
/// three lifetimes never waits for a token again after the first, and host b never sees an
/// expired one. (A sender stops using a token 2 s before it expires, so a refresh has 6 s to
/// arrive; with two busy-polling testpmds on two cores, a tighter window measures the scheduler.)
#[test]
fn tokens_are_refreshed_before_they_expire() {
    let _turn = serial();
    let c = Cluster::start(&ClusterOptions {
        prefix: "vnpr".into(),
        token_ttl_secs: 12,
        refresh_margin_secs: Some(8),
        vnpd_log: "info,vnpd::control=debug".into(),
        ..ClusterOptions::default()
    })
    .expect("cluster");
    let dir = c.dir().to_path_buf();
    let namespaces = c.namespace_names();
    c.create_vm("vm-a", 0, &[]).unwrap();
    c.create_vm("vm-b", 1, &[]).unwrap();
    let att_a = c.attach(0, "vm-a").unwrap();
    let att_b = c.attach(1, "vm-b").unwrap();

    let mut pmd_b = receiver(&c, &att_b);
    let mut pmd_a = sender(&c, &att_a, &att_b);

    let drop_a = |r: &str| {
        c.metric(0, "vnpd_drops_total", &[("vm", "vm-a"), ("reason", r)])
            .unwrap()
    };
    let drop_b = |r: &str| {
        c.metric(1, "vnpd_drops_total", &[("vm", "vm-b"), ("reason", r)])
            .unwrap()
    };
    let rx_b = || {
        c.metric(1, "vnpd_rx_packets_total", &[("vm", "vm-b")])
            .unwrap()
    };
    // The first token: packets wait (and may overflow the small queue) until it arrives.
    std::thread::sleep(Duration::from_secs(2));
    assert!(rx_b() > 0, "no traffic at all\n{}", c.logs());
    let waited = drop_a("tx_no_token_queue_full") + drop_a("tx_pending_discarded");
    // Three token lifetimes, sampling that traffic keeps arriving.
    let mut last = rx_b();
    for window in 0..18 {
        std::thread::sleep(Duration::from_secs(2));
        let now = rx_b();
        assert!(
            now > last,
            "traffic stalled {} s into the run (tokens live 12 s)\n{}",
            2 * window + 2,
            c.logs()
        );
        last = now;
    }
    pmd_a.stop().unwrap();
    pmd_b.stop().unwrap();
    assert_eq!(drop_b("rx_expired"), 0, "host b saw an expired token");
    assert_eq!(drop_b("rx_bad_token"), 0, "host b refused a token");
    assert_eq!(
        drop_a("tx_no_token_queue_full") + drop_a("tx_pending_discarded"),
        waited,
        "vm-a had to wait for a token again: the refresh came too late"
    );

    drop(pmd_a);
    drop(pmd_b);
    drop(c);
    assert_nothing_left(&dir, &namespaces);
}

/// A registry outage does not stop traffic that already has a token (the data path never
/// waits for the registry), vnpd's admin API stays responsive, and once the registry is back
/// new attachments work again.
#[test]
fn traffic_survives_a_registry_outage() {
    let _turn = serial();
    let mut c = Cluster::start(&ClusterOptions {
        prefix: "vnpo".into(),
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

    let mut pmd_b = receiver(&c, &att_b);
    let mut pmd_a = sender(&c, &att_a, &att_b);
    std::thread::sleep(Duration::from_secs(2));
    let rx_b = |c: &Cluster| {
        c.metric(1, "vnpd_rx_packets_total", &[("vm", "vm-b")])
            .unwrap()
    };
    let before = rx_b(&c);
    assert!(before > 0, "no traffic before the outage\n{}", c.logs());

    c.stop_registry().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let during = rx_b(&c);
    assert!(
        during > before,
        "traffic stopped with the registry\n{}",
        c.logs()
    );
    // The admin API answers; an attach fails with a clear registry error instead of hanging.
    assert_eq!(c.host(0).admin().list().unwrap().len(), 1);
    match c.host(1).admin().attach("vm-c", None, None) {
        Err(vnpd_admin_api::AdminClientError::Refused(f)) => {
            assert_eq!(f.code, vnpd_admin_api::AdminErrorCode::Registry, "{f:?}");
        }
        other => panic!("attach during the outage: {other:?}"),
    }
    pmd_a.stop().unwrap();
    pmd_b.stop().unwrap();

    c.start_registry().unwrap();
    let att_c = c.attach(1, "vm-c").unwrap();
    assert!(att_c.socket_path.exists());

    drop(pmd_a);
    drop(pmd_b);
    drop(c);
    assert_nothing_left(&dir, &namespaces);
}
