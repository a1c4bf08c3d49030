//! Real QEMU guests on two hosts: DHCP from vnpd, ping across hosts and on one host, a 10 MiB
//! TCP transfer with matching sha256, a policy deny that stops a pair, and forged VNP
//! datagrams from the underlay that are dropped and counted in Prometheus.
//!
//! Needs root (network namespaces), QEMU 10 and the guest image (`scripts/setup`); guests run
//! under TCG. Run: `cargo test -p vnp-e2e --test guests -- --nocapture`.

use qemu_launch::{tcp_transfer, Guest, TcpTransferSpec};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};
use vnp_e2e::cluster::{assert_nothing_left, wait_dhcp, Cluster, ClusterOptions, GUEST_MTU};
use vnp_e2e::forge::{datagram, icmp_echo, unix_now};
use vnp_protocol::token::{Expiry, Token};
use vnp_registry_client::{PolicyAction, PolicyRuleSpec, Selector};

/// The tests of this file each run a whole cluster with busy-polling frontends or TCG guests;
/// on a small machine they starve each other, so they take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const CMD: Duration = Duration::from_secs(60);

fn step(what: &str) {
    eprintln!("[guests] {what}");
}

/// Packets received by a busybox `ping -c N` (from its summary line).
fn ping_received(output: &str) -> Option<u32> {
    let line = output.lines().find(|l| l.contains("packets transmitted"))?;
    let part = line.split(',').nth(1)?;
    part.split_whitespace().next()?.parse().ok()
}

fn ping(g: &mut Guest, dst: Ipv4Addr, count: u32) -> (u32, String) {
    let out = g
        .run(&format!("ping -c {count} -W 5 {dst}"), CMD)
        .unwrap_or_else(|e| panic!("ping from {}: {e}", g.name()));
    let text = format!("{}{}", out.stdout, out.stderr);
    (ping_received(&text).unwrap_or(0), text)
}

fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn two_hosts_real_guests_end_to_end() {
    let _turn = serial();
    let opts = ClusterOptions {
        prefix: "vnpg".into(),
        ..ClusterOptions::default()
    };
    let c = Cluster::start(&opts).expect("cluster");
    let dir = c.dir().to_path_buf();
    let namespaces = c.namespace_names();

    step("registry: vm-a and vm-c on host a, vm-b on host b; vm-c may not talk to vm-b");
    let rec_a = c.create_vm("vm-a", 0, &[]).unwrap();
    let rec_b = c.create_vm("vm-b", 1, &[]).unwrap();
    let rec_c = c.create_vm("vm-c", 0, &[]).unwrap();
    c.registry(|r| {
        r.create_rule(&PolicyRuleSpec {
            id: "deny-c-b".into(),
            network: vnp_e2e::cluster::NETWORK.into(),
            action: PolicyAction::Deny,
            a: Selector::Vm("vm-c".into()),
            b: Selector::Vm("vm-b".into()),
        })
    })
    .unwrap();

    let att_a = c.attach(0, "vm-a").unwrap();
    let att_b = c.attach(1, "vm-b").unwrap();
    let att_c = c.attach(0, "vm-c").unwrap();

    step("booting three guests (TCG)");
    let mut ga = c.launch_guest(&att_a).unwrap();
    let mut gb = c.launch_guest(&att_b).unwrap();
    let mut gc = c.launch_guest(&att_c).unwrap();

    step("DHCP");
    for (g, rec) in [(&mut ga, &rec_a), (&mut gb, &rec_b), (&mut gc, &rec_c)] {
        let lease = wait_dhcp(g);
        let (addr, router, mtu) = lease.unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
        eprintln!("  {}: {addr} router {router} mtu {mtu}", g.name());
        assert_eq!(addr, format!("{}/24", rec.ip));
        assert_eq!(router, "10.77.0.1");
        assert_eq!(mtu, u32::from(GUEST_MTU));
    }

    step("ping across hosts, both ways");
    let (n, out) = ping(&mut ga, rec_b.ip, 3);
    assert_eq!(n, 3, "a -> b:\n{out}\n{}", c.logs());
    let (n, out) = ping(&mut gb, rec_a.ip, 3);
    assert_eq!(n, 3, "b -> a:\n{out}\n{}", c.logs());

    step("ping on the same host");
    let (n, out) = ping(&mut ga, rec_c.ip, 3);
    assert_eq!(n, 3, "a -> c:\n{out}\n{}", c.logs());

    step("policy deny: vm-c cannot reach vm-b");
    let refused_before = c
        .metric(
            0,
            "vnpd_drops_total",
            &[("vm", "vm-c"), ("reason", "tx_policy_refused")],
        )
        .unwrap();
    let (n, out) = ping(&mut gc, rec_b.ip, 3);
    assert_eq!(n, 0, "denied pair got through:\n{out}");
    let refused = c
        .metric(
            0,
            "vnpd_drops_total",
            &[("vm", "vm-c"), ("reason", "tx_policy_refused")],
        )
        .unwrap();
    assert!(refused > refused_before, "policy refusal not counted");
    let b_rx_from_c = c
        .metric(
            1,
            "vnpd_drops_total",
            &[("vm", "vm-b"), ("reason", "rx_bad_token")],
        )
        .unwrap();
    assert_eq!(b_rx_from_c, 0, "something reached host b");

    step("10 MiB over TCP from vm-a to vm-b");
    let transfer = tcp_transfer(&mut ga, &mut gb, rec_b.ip, TcpTransferSpec::default()).unwrap();
    eprintln!("  {transfer}");
    assert!(transfer.intact(), "{transfer}\n{}", c.logs());

    step("forged VNP datagrams to vm-b from a plain UDP socket on host a");
    let src = c.host(0).addr;
    let sock = c
        .host_ns(0)
        .enter(move || UdpSocket::bind((src, 0)))
        .unwrap()
        .unwrap();
    let to = SocketAddr::from((att_b.host_addr, att_b.udp_port));
    let inner = icmp_echo(att_a.vm_ip, att_b.vm_ip, 32);
    let future = Expiry(unix_now() + 300);
    let forged = Token::from_bytes([0x5a; 8]);
    let drops = |reason: &str| {
        c.metric(1, "vnpd_drops_total", &[("vm", "vm-b"), ("reason", reason)])
            .unwrap()
    };
    let rx_before = c
        .metric(1, "vnpd_rx_packets_total", &[("vm", "vm-b")])
        .unwrap();
    for _ in 0..3 {
        sock.send_to(&datagram(att_b.network_id, forged, future, &inner), to)
            .unwrap();
    }
    eventually("rx_bad_token", Duration::from_secs(10), || {
        drops("rx_bad_token") >= 3
    });
    sock.send_to(
        &datagram(att_b.network_id, forged, Expiry(unix_now() - 3600), &inner),
        to,
    )
    .unwrap();
    eventually("rx_expired", Duration::from_secs(10), || {
        drops("rx_expired") >= 1
    });
    let elsewhere = icmp_echo(att_a.vm_ip, Ipv4Addr::new(10, 77, 0, 250), 32);
    sock.send_to(&datagram(att_b.network_id, forged, future, &elsewhere), to)
        .unwrap();
    eventually("rx_wrong_vm", Duration::from_secs(10), || {
        drops("rx_wrong_vm") >= 1
    });
    sock.send_to(
        &datagram(att_b.network_id + 1000, forged, future, &inner),
        to,
    )
    .unwrap();
    eventually("rx_wrong_network", Duration::from_secs(10), || {
        drops("rx_wrong_network") >= 1
    });
    sock.send_to(&[1, 0, 0], to).unwrap();
    eventually("rx_truncated", Duration::from_secs(10), || {
        drops("rx_truncated") >= 1
    });
    let rx_after = c
        .metric(1, "vnpd_rx_packets_total", &[("vm", "vm-b")])
        .unwrap();
    assert_eq!(rx_after, rx_before, "a forged datagram was delivered");
    let stats = c.host(1).admin().stats(Some("vm-b")).unwrap();
    assert!(stats[0].drops["rx_bad_token"] >= 3);
    assert!(stats[0].counters["rx_packets"] > 0);

    step("tear down");
    drop(ga);
    drop(gb);
    drop(gc);
    drop(c);
    assert_nothing_left(&dir, &namespaces);
}

/// Attachments survive a vnpd restart, and the running guest (QEMU reconnects to the socket)
/// talks again without a reboot.
#[test]
fn guest_traffic_resumes_after_vnpd_restart() {
    let _turn = serial();
    let mut c = Cluster::start(&ClusterOptions {
        prefix: "vnpgr".into(),
        ..ClusterOptions::default()
    })
    .expect("cluster");
    let dir = c.dir().to_path_buf();
    let namespaces = c.namespace_names();
    c.create_vm("vm-a", 0, &[]).unwrap();
    let rec_b = c.create_vm("vm-b", 1, &[]).unwrap();
    let att_a = c.attach(0, "vm-a").unwrap();
    let att_b = c.attach(1, "vm-b").unwrap();
    let mut ga = c.launch_guest(&att_a).unwrap();
    let mut gb = c.launch_guest(&att_b).unwrap();
    for g in [&mut ga, &mut gb] {
        let lease = wait_dhcp(g);
        lease.unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    }
    let (n, out) = ping(&mut ga, rec_b.ip, 2);
    assert_eq!(n, 2, "before the restart:\n{out}\n{}", c.logs());

    step("restart host a's vnpd");
    c.stop_vnpd(0).unwrap();
    c.start_vnpd(0).unwrap();
    let list = c.host(0).admin().list().unwrap();
    assert_eq!(list.len(), 1, "attachment not restored\n{}", c.logs());
    assert_eq!(list[0], att_a);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (n, out) = ping(&mut ga, rec_b.ip, 2);
        if n == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no traffic after the restart:\n{out}\n{}",
            c.logs()
        );
    }
    drop(ga);
    drop(gb);
    drop(c);
    assert_nothing_left(&dir, &namespaces);
}
