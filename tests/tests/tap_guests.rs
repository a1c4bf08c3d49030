//! Network-namespace guests on vnpd through `vnp-tap-frontend` (the event-driven vhost-user
//! frontend over a TAP with `IFF_VNET_HDR`): one guest on each of two vnpd hosts gets its
//! address by DHCP from vnpd, pings the other, and moves a TCP stream whose bytes are checked
//! at the far end. The guests' kernels are unmodified Linux: their TCP, busybox `udhcpc`,
//! `ping` and python. vm-a asks for offloads, vm-b does not (a mixed pair once vnpd offers
//! them; today vnpd offers none and both run without). Then vnpd restarts under one guest (its
//! fixture reconnects and traffic resumes) and stops under the other (its fixture exits with
//! status 3).
//!
//! Needs root (namespaces, TAP), busybox and python3 (`scripts/setup`).
//! Run: `cargo test -p vnp-e2e --test tap_guests -- --nocapture`.

use std::io::Read;
use std::process::Stdio;

use std::time::{Duration, Instant};

use vnp_e2e::bins::bins;
use vnp_e2e::cluster::{assert_nothing_left, Cluster, ClusterOptions};
use vnp_testkit::netns::namespace_exists;
use vnp_testkit::tap_guest::{TapGuest, TapGuestSpec};

/// Bytes moved over TCP from vm-a to vm-b.
const TRANSFER_BYTES: u64 = 32 << 20;
const PORT: &str = "5001";

/// Receives one connection and prints its byte count and sha256.
const RECEIVER: &str = r#"
import hashlib, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
h, n = hashlib.sha256(), 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b)
    n += len(b)
print(f"bytes={n} sha256={h.hexdigest()}", flush=True)
"#;

/// Sends `size` pseudo-random bytes (seeded) and prints their count and sha256.
const SENDER: &str = r#"
import hashlib, random, socket, sys
dst, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(4711)
h, n = hashlib.sha256(), 0
c = socket.create_connection((dst, port), timeout=30)
while n < size:
    b = rng.randbytes(min(1 << 16, size - n))
    c.sendall(b)
    h.update(b)
    n += len(b)
c.close()
print(f"bytes={n} sha256={h.hexdigest()}", flush=True)
"#;

fn ping(g: &TapGuest, dst: &str) -> Result<String, String> {
    let out = g
        .netns()
        .command("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "3", dst])
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// Streams [`TRANSFER_BYTES`] from `a` to `b`'s address; returns (sent line, received line).
fn transfer(a: &TapGuest, b: &TapGuest, b_ip: &str) -> (String, String) {
    let mut receiver = b
        .netns()
        .command("python3")
        .args(["-c", RECEIVER, PORT])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the receiver");
    let mut stdout = receiver.stdout.take().unwrap();
    let mut first = [0u8; 10];
    stdout.read_exact(&mut first).expect("receiver listening");
    assert_eq!(&first, b"listening\n");
    let sent = a
        .netns()
        .command("python3")
        .args(["-c", SENDER, b_ip, PORT, &TRANSFER_BYTES.to_string()])
        .output()
        .expect("run the sender");
    let mut received = String::new();
    stdout.read_to_string(&mut received).unwrap();
    let _ = receiver.wait();
    assert!(
        sent.status.success(),
        "sender: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    (
        String::from_utf8_lossy(&sent.stdout).trim().to_string(),
        received.trim().to_string(),
    )
}

#[test]
fn namespace_guests_get_leases_ping_move_a_checked_tcp_stream_and_survive_a_vnpd_restart() {
    let mut c = Cluster::start(&ClusterOptions {
        prefix: "vnptg".into(),
        ..ClusterOptions::default()
    })
    .expect("cluster");
    let dir = c.dir().to_path_buf();
    let namespaces = c.namespace_names();
    c.create_vm("vm-a", 0, &[]).unwrap();
    c.create_vm("vm-b", 1, &[]).unwrap();
    let att_a = c.attach(0, "vm-a").unwrap();
    let att_b = c.attach(1, "vm-b").unwrap();
    let mut a = c.tap_guest(&att_a, true).expect("guest a");
    // vm-b's fixture reconnects when vnpd restarts (step 4); vm-a's exits with status 3.
    let mut spec = TapGuestSpec::new(bins().unwrap().tap_frontend, &att_b.socket_path, &att_b.mac);
    spec.offloads = false;
    spec.reconnect = true;
    spec.log = Some(dir.join("tap-vm-b.log"));
    let mut b = TapGuest::start(spec).unwrap_or_else(|e| panic!("guest b: {e}\n{}", c.logs()));
    b.dhcp(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("guest b: {e}\n{}", c.logs()));
    let guest_namespaces = [a.netns().name().to_string(), b.netns().name().to_string()];
    eprintln!(
        "offloads: vm-a {} (features {:#x}), vm-b {}",
        a.offloads(),
        a.acked_features(),
        b.offloads()
    );
    assert_eq!(b.offloads(), "none", "--no-offloads must ack none");

    // 1. DHCP from vnpd: the registry's address, the virtual router, the network MTU.
    for (g, att) in [(&a, &att_a), (&b, &att_b)] {
        let lease = g.lease().unwrap();
        assert_eq!(lease.ip, att.vm_ip, "{}", g.dhcp_events());
        assert_eq!(lease.router, att.router_ip);
        assert_eq!(lease.prefix_len, att.prefix_len);
        assert_eq!(lease.mtu, u32::from(att.guest_mtu));
        let link = g.netns().ip(&["link", "show", "dev", g.ifname()]).unwrap();
        assert!(link.contains(&att.mac), "{link}");
        assert!(link.contains(&format!("mtu {}", att.guest_mtu)), "{link}");
    }

    // 2. ping both ways across the two hosts.
    let (ip_a, ip_b) = (att_a.vm_ip.to_string(), att_b.vm_ip.to_string());
    for (g, dst) in [(&a, &ip_b), (&b, &ip_a)] {
        let out = ping(g, dst).unwrap_or_else(|e| panic!("ping {dst}: {e}\n{}", c.logs()));
        eprintln!("{out}");
    }

    // 3. TCP, bytes checked at the far end.
    let started = Instant::now();
    let (sent, received) = transfer(&a, &b, &ip_b);
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "sent {sent}; received {received}; {:.0} Mb/s",
        TRANSFER_BYTES as f64 * 8.0 / secs / 1e6
    );
    assert_eq!(sent, received, "the stream arrived changed\n{}", c.logs());
    assert!(
        sent.starts_with(&format!("bytes={TRANSFER_BYTES} ")),
        "{sent}"
    );

    let vnpd_rx_b = c
        .metric(1, "vnpd_rx_packets_total", &[("vm", "vm-b")])
        .unwrap();

    // 4. vnpd b restarts under guest b: its fixture sets the device up again, the namespace
    // keeps its address, and traffic flows again. vnpd a stops under guest a, whose fixture
    // (no --reconnect) exits with status 3.
    c.stop_vnpd(1).unwrap();
    c.start_vnpd(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = ping(&a, &ip_b) {
        assert!(
            Instant::now() < deadline,
            "no traffic after vnpd b restarted: {e}\nfixture b:\n{}\n{}",
            b.fixture_stderr(),
            c.logs()
        );
    }
    assert!(
        b.fixture_stderr().contains("reconnected"),
        "{}",
        b.fixture_stderr()
    );
    assert_eq!(b.fixture_exit().unwrap(), None, "fixture b exited");
    c.stop_vnpd(0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = a.fixture_exit().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "fixture a outlived vnpd a");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(3), "{}", a.fixture_stderr());

    // 5. The fixtures' own counters (kept across b's reconnect): frames both ways, no drop of
    // any kind.
    for (g, code) in [(&mut a, 3), (&mut b, 0)] {
        let (stats, status) = g.stop_frontend().expect("fixture stats");
        eprintln!("{}: {status} {stats:?}", g.netns().name());
        assert_eq!(status.code(), Some(code), "{}", g.fixture_stderr());
        assert!(
            stats["tx_frames"] > 0 && stats["rx_frames"] > 0,
            "{stats:?}"
        );
        for (k, v) in &stats {
            if k.contains("drop") || k.contains("errors") {
                assert_eq!(*v, 0, "{k} in {stats:?}");
            }
        }
    }
    assert!(
        vnpd_rx_b as f64 >= TRANSFER_BYTES as f64 / 1500.0,
        "vnpd b delivered only {vnpd_rx_b} packets"
    );

    drop(a);
    drop(b);
    for n in &guest_namespaces {
        assert!(!namespace_exists(n), "guest namespace {n} left behind");
    }
    drop(c);
    assert_nothing_left(&dir, &namespaces);
}
