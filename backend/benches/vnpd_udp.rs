//! Benchmark: guest traffic through vnpd A -> VNP/UDP (loopback) -> vnpd B, driven by a real
//! `dpdk-testpmd` virtio-user frontend, beside the kernel floor (`udp-floor`: a plain
//! sendmmsg/recvmmsg pair sending datagrams of the same size) measured in the same run.
//!
//! One testpmd process owns both "VMs": port 0 on vnpd A's socket, port 1 on vnpd B's, in `io`
//! forwarding mode, started with `start tx_first`: a fixed number of packets circulates
//! A -> vnpd A -> UDP -> vnpd B -> testpmd -> A ... so that only one core busy-polls (the machine
//! has two) and the other is left to vnpd and the kernel. vnpd CPU per packet is this process's
//! user+system CPU time (both vnpd ports live here; the testpmd process is not counted) divided
//! by the packets vnpd B delivered; the floor's is the sender's plus the receiver's CPU time per
//! delivered datagram.
//!
//! The floor runs twice per run: unpaced (the headline ratio), and paced at the packet rate vnpd
//! just reached (`udp-floor --rate`): a receiver that gets more packets per wake-up pays less
//! per packet, and on a loaded machine the unpaced floor runs several times vnpd's rate.
//!
//! Run (root, DPDK, hugepages): `cargo bench -p vnpd --bench vnpd_udp` (builds `udp-floor` in
//! release first when UDP_FLOOR is not set).
//! Env: VNPD_BENCH_SECONDS (default 5), VNPD_BENCH_RUNS (default 3), UDP_FLOOR (binary path),
//! VNPD_BENCH_FRAMES (frame sizes, default "64,1466").

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vnp_protocol::token::{mint, Expiry, TokenFields, VmSecret};
use vnp_testkit::testpmd::{ForwardMode, TestPmd, TestPmdSpec};
use vnpd::datapath::{ControlPlane, PeerToken, VmAttachment, VmPort};

const NETWORK: u32 = 9;
const MTU: u16 = 1452;

fn cpu_ns() -> u64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer to a live rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    assert_eq!(rc, 0, "getrusage");
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Mints A->B tokens on request (what the registry would do), from its own thread.
struct Control {
    tx: Mutex<mpsc::Sender<Ipv4Addr>>,
}

fn attachment(name: &str, octet: u8, secret: u8) -> VmAttachment {
    static N: AtomicUsize = AtomicUsize::new(0);
    VmAttachment {
        vm_id: format!("bench-{name}"),
        network_vni: NETWORK,
        vm_ip: Ipv4Addr::new(10, 9, 0, octet),
        prefix_len: 24,
        router_ip: Ipv4Addr::new(10, 9, 0, 1),
        mac: [0x02, 0, 0, 9, 0, octet],
        hostname: format!("bench-{name}"),
        guest_mtu: MTU,
        secret: VmSecret::from_bytes([secret; 32]),
        host_addr: Ipv4Addr::LOCALHOST,
        udp_port: 0,
        socket_path: PathBuf::from(format!(
            "/tmp/vnpd-bench-{}-{}-{name}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )),
        queue_pairs: 1,
    }
}

impl ControlPlane for Control {
    fn request_token(&self, _src_vm: &str, dst: Ipv4Addr) {
        let _ = self.tx.lock().unwrap().send(dst);
    }
}

struct Sample {
    pps: f64,
    cpu_ns_per_pkt: f64,
}

fn vnpd_run(frame_len: u16, seconds: u64) -> Sample {
    let (tx, rx) = mpsc::channel();
    let control = Arc::new(Control { tx: Mutex::new(tx) });
    let att_a = attachment("a", 2, 0xaa);
    let att_b = attachment("b", 3, 0xbb);
    let (ip_a, ip_b, mac_a, mac_b) = (att_a.vm_ip, att_b.vm_ip, att_a.mac, att_b.mac);
    let (sock_a, sock_b) = (att_a.socket_path.clone(), att_b.socket_path.clone());
    let port_a = Arc::new(VmPort::start(att_a, control.clone()).expect("port A"));
    let port_b = Arc::new(VmPort::start(att_b, control.clone()).expect("port B"));
    {
        let (a, b) = (Arc::downgrade(&port_a), Arc::downgrade(&port_b));
        std::thread::spawn(move || {
            while let Ok(dst) = rx.recv() {
                let (Some(a), Some(b)) = (a.upgrade(), b.upgrade()) else {
                    return;
                };
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_secs() as u32;
                let expiry = Expiry(now + 3000);
                let f = TokenFields {
                    src_host: *a.udp_addr().ip(),
                    src_port: a.udp_addr().port(),
                    src_vm: ip_a,
                    dst_host: *b.udp_addr().ip(),
                    dst_port: b.udp_addr().port(),
                    dst_vm: dst,
                    network_id: NETWORK,
                    expiry,
                };
                a.install_token(
                    dst,
                    PeerToken {
                        dst_host: f.dst_host,
                        dst_port: f.dst_port,
                        token: mint(&VmSecret::from_bytes([0xbb; 32]), &f),
                        expiry,
                    },
                );
            }
        });
    }

    let mut spec = TestPmdSpec::virtio_user(&sock_a);
    spec.mode = ForwardMode::Io;
    spec.pkt_len = frame_len;
    spec.mac = Some(mac_a);
    spec.eth_peer = Some(vnpd::edge::ROUTER_MAC);
    spec.tx_ip = Some((ip_a, ip_b));
    spec.mem_mb = 128;
    spec.queue_size = 1024;
    spec.extra_eal_args = vec![
        "--vdev".into(),
        format!(
            "net_virtio_user1,path={},queues=1,queue_size=1024,mac={}",
            sock_b.display(),
            mac_b
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        ),
    ];
    let mut pmd = TestPmd::launch(spec).expect("testpmd");
    pmd.wait_link_up(0, Duration::from_secs(30))
        .expect("port 0 up");
    pmd.wait_link_up(1, Duration::from_secs(30))
        .expect("port 1 up");
    // Bursts of 32 circulate A -> B -> A ...
    pmd.command(&format!("start tx_first {}", inflight_bursts()))
        .expect("start");
    std::thread::sleep(Duration::from_secs(1));
    let b = port_b.counters();
    let (rx0, cpu0, t0) = (b.snapshot().rx_packets, cpu_ns(), Instant::now());
    std::thread::sleep(Duration::from_secs(seconds));
    let (rx1, cpu1, t1) = (b.snapshot().rx_packets, cpu_ns(), Instant::now());
    pmd.stop().expect("stop");
    let delivered = rx1 - rx0;
    assert!(
        delivered > 0,
        "nothing delivered: A {:?} B {:?}",
        port_a.counters().snapshot(),
        b.snapshot()
    );
    drop(pmd);
    Sample {
        pps: delivered as f64 / (t1 - t0).as_secs_f64(),
        cpu_ns_per_pkt: (cpu1 - cpu0) as f64 / delivered as f64,
    }
}

/// Bursts of 32 packets put in circulation (`VNPD_BENCH_BURSTS`, default 16: 512 packets).
fn inflight_bursts() -> u32 {
    std::env::var("VNPD_BENCH_BURSTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16)
}

/// Frame sizes to measure (`VNPD_BENCH_FRAMES`, comma-separated; default 64 and full MTU).
fn frame_sizes() -> Vec<u16> {
    match std::env::var("VNPD_BENCH_FRAMES") {
        Ok(list) => list
            .split(',')
            .map(|f| {
                f.trim()
                    .parse()
                    .expect("VNPD_BENCH_FRAMES: frame sizes in bytes")
            })
            .collect(),
        Err(_) => vec![64, 14 + MTU],
    }
}

fn json_number(json: &str, key: &str) -> f64 {
    let pat = format!("\"{key}\":");
    let at = json
        .find(&pat)
        .unwrap_or_else(|| panic!("{key} missing in {json}"))
        + pat.len();
    json[at..]
        .split([',', '}'])
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// One `udp-floor` run; `rate`: paced at that many datagrams per second.
fn floor_run(
    udp_floor: &PathBuf,
    payload: usize,
    seconds: u64,
    extra: &[String],
    rate: Option<f64>,
) -> Sample {
    let rate = rate.map(|r| vec!["--rate".to_string(), format!("{r:.0}")]);
    let out = Command::new(udp_floor)
        .args(extra)
        .args(rate.unwrap_or_default())
        .args([
            "--payload",
            &payload.to_string(),
            "--seconds",
            &seconds.to_string(),
        ])
        .args(["--format", "json"])
        .output()
        .expect("run udp-floor");
    assert!(
        out.status.success(),
        "udp-floor failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8_lossy(&out.stdout).to_string();
    Sample {
        pps: json_number(&json, "received_pps"),
        cpu_ns_per_pkt: json_number(&json, "total_cpu_ns_per_packet"),
    }
}

/// Builds the floor binary (release, like this benchmark) and returns its path: `cargo bench`
/// builds only this package's targets, so a clean checkout has no `udp-floor` yet.
fn build_udp_floor() -> PathBuf {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&workspace)
        .args([
            "build",
            "--release",
            "-p",
            "vnp-udp-floor",
            "--bin",
            "udp-floor",
        ])
        .status()
        .expect("run cargo build -p vnp-udp-floor");
    assert!(
        status.success(),
        "cargo build --release -p vnp-udp-floor failed"
    );
    workspace.join("target/release/udp-floor")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The median rate and the median cost of a set of runs (each taken on its own).
fn medians(samples: &[Sample]) -> Sample {
    Sample {
        pps: median(samples.iter().map(|s| s.pps).collect()),
        cpu_ns_per_pkt: median(samples.iter().map(|s| s.cpu_ns_per_pkt).collect()),
    }
}

/// Keeps this process (every vnpd thread it spawns) on `cpu`, away from testpmd's busy-polling
/// forwarding core: with two cores, a vnpd thread woken on testpmd's core would wait a whole
/// scheduler slice behind the poller.
fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is a plain bitmask; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of the set we own; cpu < CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is this thread; the set pointer and size are valid.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(rc, 0, "sched_setaffinity");
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let seconds: u64 = std::env::var("VNPD_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let runs: usize = std::env::var("VNPD_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let udp_floor = std::env::var_os("UDP_FLOOR")
        .map(PathBuf::from)
        .unwrap_or_else(build_udp_floor);
    assert!(
        udp_floor.exists(),
        "{} missing: cargo build --release -p vnp-udp-floor",
        udp_floor.display()
    );
    // vnpd's threads (both ports) on CPU 0; testpmd forwards on CPU 1. The floor gets the same
    // budget: sender and receiver both on CPU 0.
    pin_to(0);
    let floor_args: Vec<String> = std::env::var("UDP_FLOOR_ARGS")
        .unwrap_or_else(|_| "--sender-cpu 0 --receiver-cpu 0".into())
        .split_whitespace()
        .map(String::from)
        .collect();
    println!("| frame | UDP payload | vnpd pps | vnpd CPU ns/pkt | floor pps | floor CPU ns/pkt | ratio | paced floor pps | paced floor CPU ns/pkt | ratio at vnpd's rate |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    // 64-byte frames (50-byte inner packets) and full-MTU frames (1452-byte inner packets:
    // 1500-byte outer IPv4 datagrams on the underlay).
    for frame in frame_sizes() {
        let payload = 20 + usize::from(frame) - 14;
        let (mut vnpd, mut floor, mut paced) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let f = floor_run(&udp_floor, payload, seconds, &floor_args, None);
            let v = vnpd_run(frame, seconds);
            // The same packet rate as vnpd, right after it, under the same load.
            let p = floor_run(&udp_floor, payload, seconds, &floor_args, Some(v.pps));
            eprintln!(
                "frame {frame}: vnpd {:.0} pps {:.0} ns/pkt | floor {:.0} pps {:.0} ns/pkt | paced floor {:.0} pps {:.0} ns/pkt",
                v.pps, v.cpu_ns_per_pkt, f.pps, f.cpu_ns_per_pkt, p.pps, p.cpu_ns_per_pkt
            );
            vnpd.push(v);
            floor.push(f);
            paced.push(p);
        }
        let (v, f, p) = (medians(&vnpd), medians(&floor), medians(&paced));
        println!(
            "| {frame} | {payload} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} |",
            v.pps,
            v.cpu_ns_per_pkt,
            f.pps,
            f.cpu_ns_per_pkt,
            v.cpu_ns_per_pkt / f.cpu_ns_per_pkt,
            p.pps,
            p.cpu_ns_per_pkt,
            v.cpu_ns_per_pkt / p.cpu_ns_per_pkt,
        );
    }
}
