//! The testpmd fixture against a real vhost-user backend: DPDK's own `net_vhost` in a second
//! testpmd. Needs root, `dpdk-testpmd` and free 2 MiB hugepages on /dev/hugepages (about 256 MiB
//! for the two instances). Never skips: a machine without them fails the test.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use vnp_testkit::testpmd::{ForwardMode, PortKind, TestPmd, TestPmdError, TestPmdSpec};

/// The tests share the machine's hugepages and its two cores: one pair of testpmds at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn socket_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vnp-tpmd-{tag}-{}.sock", std::process::id()))
}

/// Files a testpmd with `prefix` may leave behind.
fn leftovers(prefix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/dev/hugepages") {
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("{prefix}map_"))
            {
                found.push(entry.path());
            }
        }
    }
    let runtime = Path::new("/var/run/dpdk").join(prefix);
    if runtime.exists() {
        found.push(runtime);
    }
    found
}

/// A sink on DPDK's vhost-user backend, with its forwarding lcore on core 0 so that it and the
/// generator (forwarding on core 1) do not fight over one core.
fn vhost_sink(socket: &Path, queues: u16) -> TestPmd {
    let mut spec = TestPmdSpec::vhost(socket);
    spec.queues = queues;
    spec.mode = ForwardMode::RxOnly;
    spec.main_lcore = Some(1);
    TestPmd::launch(spec).expect("launch vhost testpmd")
}

fn virtio_generator(socket: &Path, queues: u16, pkt_len: u16) -> TestPmd {
    let mut spec = TestPmdSpec::virtio_user(socket);
    spec.queues = queues;
    spec.mode = ForwardMode::TxOnly;
    spec.pkt_len = pkt_len;
    spec.tx_ip = Some((Ipv4Addr::new(10, 9, 0, 2), Ipv4Addr::new(10, 9, 0, 3)));
    spec.eth_peer = Some([0x02, 0, 0, 0, 0, 0x02]);
    spec.mac = Some([0x02, 0, 0, 0, 0, 0x01]);
    TestPmd::launch(spec).expect("launch virtio_user testpmd")
}

fn txonly_to_rxonly(queues: u16, pkt_len: u16) {
    let _serial = serial();
    let socket = socket_path(&format!("q{queues}l{pkt_len}"));
    let _ = std::fs::remove_file(&socket);
    let mut sink = vhost_sink(&socket, queues);
    let mut generator = virtio_generator(&socket, queues, pkt_len);
    generator
        .wait_link_up(0, Duration::from_secs(20))
        .expect("virtio_user link up");
    sink.wait_link_up(0, Duration::from_secs(20))
        .expect("vhost link up");
    let prefixes = [
        sink.file_prefix().to_string(),
        generator.file_prefix().to_string(),
    ];

    sink.start().unwrap();
    generator.start().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    generator.stop().unwrap();
    // Let the sink drain what is still in the ring before it stops polling.
    std::thread::sleep(Duration::from_millis(500));
    sink.stop().unwrap();

    let sent = generator.port_stats(0).unwrap();
    let received = sink.port_stats(0).unwrap();
    assert!(
        sent.tx_packets > 1000,
        "generator sent only {} packets",
        sent.tx_packets
    );
    assert_eq!(sent.tx_bytes, sent.tx_packets * u64::from(pkt_len));
    assert_eq!(
        received.rx_packets, sent.tx_packets,
        "every packet the virtio_user port sent arrives at the vhost port"
    );
    assert_eq!(received.rx_bytes, sent.tx_bytes);
    assert_eq!(received.tx_packets, 0, "the sink sends nothing");

    generator.clear_port_stats().unwrap();
    assert_eq!(generator.port_stats(0).unwrap().tx_packets, 0);

    drop(generator);
    drop(sink);
    for prefix in &prefixes {
        assert!(
            leftovers(prefix).is_empty(),
            "testpmd {prefix} left files behind: {:?}",
            leftovers(prefix)
        );
    }
    assert!(!socket.exists(), "the vhost socket is removed on drop");
}

#[test]
fn virtio_user_txonly_reaches_vhost_rxonly() {
    txonly_to_rxonly(1, 64);
}

#[test]
fn two_queue_pairs_and_full_size_frames() {
    txonly_to_rxonly(2, 1500);
}

#[test]
fn missing_backend_is_a_clear_error() {
    let _serial = serial();
    let socket = socket_path("nobody");
    let _ = std::fs::remove_file(&socket);
    let err = TestPmd::launch(TestPmdSpec::virtio_user(&socket))
        .expect_err("no backend listens on the socket");
    match &err {
        TestPmdError::NoPort { tail, .. } | TestPmdError::Exited { tail, .. } => {
            assert!(!tail.is_empty(), "the error carries testpmd's output");
        }
        other => panic!("unexpected error kind: {other}"),
    }
}

#[test]
fn quit_reports_a_clean_exit_and_cleans_up() {
    let _serial = serial();
    let socket = socket_path("quit");
    let _ = std::fs::remove_file(&socket);
    let sink = vhost_sink(&socket, 1);
    let prefix = sink.file_prefix().to_string();
    assert!(socket.exists(), "net_vhost listens on the socket");
    let status = sink.quit(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status}");
    assert!(leftovers(&prefix).is_empty(), "{:?}", leftovers(&prefix));
    assert!(!socket.exists());
}

#[test]
fn macswap_echoes_back_to_the_generator_port() {
    let _serial = serial();
    // virtio_user in io mode primes the loop with one burst; the vhost side swaps MACs and sends
    // everything back, so both directions of the vhost-user queues carry traffic.
    let socket = socket_path("echo");
    let _ = std::fs::remove_file(&socket);
    let mut spec = TestPmdSpec::vhost(&socket);
    spec.mode = ForwardMode::MacSwap;
    spec.main_lcore = Some(1);
    let mut echo = TestPmd::launch(spec).unwrap();
    let mut spec = TestPmdSpec::virtio_user(&socket);
    spec.mode = ForwardMode::Io;
    let mut frontend = TestPmd::launch(spec).unwrap();
    frontend.wait_link_up(0, Duration::from_secs(20)).unwrap();
    echo.wait_link_up(0, Duration::from_secs(20)).unwrap();
    echo.start().unwrap();
    frontend.start_tx_first().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    frontend.stop().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    echo.stop().unwrap();
    let front = frontend.port_stats(0).unwrap();
    let back = echo.port_stats(0).unwrap();
    assert!(front.rx_packets > 0, "frontend got echoes: {front:?}");
    assert!(back.tx_packets >= front.rx_packets, "{back:?} vs {front:?}");
    assert!(back.rx_packets > 0);
}

#[test]
fn virtio_user_server_mode_accepts_a_connecting_vhost_client() {
    // The reverse roles: testpmd's virtio_user listens (server=1) and the vhost backend
    // connects (client=1), as with a backend that reconnects to its VMs.
    let _serial = serial();
    let socket = socket_path("server");
    let _ = std::fs::remove_file(&socket);
    let mut spec = TestPmdSpec::virtio_user(&socket);
    spec.port = PortKind::VirtioUser {
        socket: socket.clone(),
        server: true,
    };
    spec.mode = ForwardMode::TxOnly;
    // server=1 blocks testpmd's start-up until the backend connects: spawn, then wait.
    let mut frontend = TestPmd::spawn(spec).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "virtio_user server=1 never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut spec = TestPmdSpec::vhost(&socket);
    spec.port = PortKind::Vhost {
        socket: socket.clone(),
        client: true,
    };
    spec.main_lcore = Some(1);
    let mut backend = TestPmd::launch(spec).unwrap();
    frontend.wait_ready().unwrap();
    frontend.wait_link_up(0, Duration::from_secs(20)).unwrap();
    backend.wait_link_up(0, Duration::from_secs(20)).unwrap();
    backend.start().unwrap();
    frontend.start().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    frontend.stop().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    backend.stop().unwrap();
    let sent = frontend.port_stats(0).unwrap().tx_packets;
    assert!(sent > 0);
    assert_eq!(backend.port_stats(0).unwrap().rx_packets, sent);
    drop(backend);
    drop(frontend);
    assert!(
        !socket.exists(),
        "the listening virtio_user removes its socket"
    );
}

#[test]
fn unready_testpmd_is_killed_and_cleaned_up_on_drop() {
    // A virtio_user server with no backend blocks in start-up forever; dropping it must not
    // wait for a `quit` it cannot read, and must still remove its files.
    let _serial = serial();
    let socket = socket_path("unready");
    let _ = std::fs::remove_file(&socket);
    let mut spec = TestPmdSpec::virtio_user(&socket);
    spec.port = PortKind::VirtioUser {
        socket: socket.clone(),
        server: true,
    };
    let pmd = TestPmd::spawn(spec).unwrap();
    let prefix = pmd.file_prefix().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = std::time::Instant::now();
    drop(pmd);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(leftovers(&prefix).is_empty(), "{:?}", leftovers(&prefix));
    assert!(!socket.exists());
}
