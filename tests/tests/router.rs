//! The virtual router behaves like a router, seen from a Linux guest: a network namespace whose
//! interface is a TAP that `dpdk-testpmd` bridges (io forwarding) to vnpd's vhost-user socket.
//! The guest's kernel pings the router address and gets echo replies from vnpd; a raw-socket
//! sender (Python, `IP_HDRINCL`, DF set) sends a packet larger than the network's MTU and gets
//! ICMP "fragmentation needed" carrying that MTU; a ping flood is rate-limited. Every answer is
//! checked in vnpd's Prometheus counters too.
//!
//! Needs root (namespaces, TAP), dpdk-testpmd with the tap PMD, 2 MiB hugepages
//! (`scripts/setup`) and python3. Run: `cargo test -p vnp-e2e --test router -- --nocapture`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Output;
use std::sync::mpsc;
use std::time::Duration;

use vnp_e2e::cluster::{assert_nothing_left, Cluster, ClusterOptions};
use vnp_testkit::netns::{namespace_exists, Netns};
use vnp_testkit::testpmd::{ForwardMode, TestPmd, TestPmdSpec};
use vnpd_admin_api::AttachmentInfo;

/// The guest's interface: the kernel side of testpmd's TAP port.
const GUEST_IF: &str = "vg0";
/// A destination beyond the router (the router answers ARP for every address).
const FAR_PEER: &str = "10.77.0.200";
/// Size of the raw-socket packet: over the network's 1452-byte MTU, under the TAP's 1500.
const OVERSIZE: usize = 1480;

/// Sends one IPv4/UDP packet with DF set and `size` bytes through a raw socket with
/// `IP_HDRINCL`, then waits for ICMP destination unreachable / fragmentation needed about it
/// and prints the next-hop MTU and the destination and identification of the quoted header.
const RAW_SENDER: &str = r#"
import socket, struct, sys
src, dst, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
ident = 0x5a5a
udp_len = size - 20
header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, ident, 0x4000, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
udp = struct.pack("!HHHH", 40000, 9, udp_len, 0) + bytes(udp_len - 8)
listen = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
listen.settimeout(10)
send = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
send.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
send.sendto(header + udp, (dst, 0))
while True:
    packet, _ = listen.recvfrom(2048)
    ihl = (packet[0] & 0x0f) * 4
    icmp_type, code, _, _, mtu = struct.unpack("!BBHHH", packet[ihl:ihl + 8])
    quoted = packet[ihl + 8:]
    if icmp_type == 3 and code == 4 and len(quoted) >= 20:
        quoted_ident = struct.unpack("!H", quoted[4:6])[0]
        print(f"mtu={mtu} quoted_dst={socket.inet_ntoa(quoted[16:20])} "
              f"quoted_ident={quoted_ident:#x} quoted_len={len(quoted)}")
        break
"#;

/// testpmd running inside the guest namespace (so its TAP port appears there), bridging the
/// TAP and vnpd's vhost-user socket. testpmd dies with the thread that spawned it
/// (`PR_SET_PDEATHSIG`), so that thread stays parked inside the namespace until this is dropped.
struct NamespacedTestPmd {
    pmd: Option<TestPmd>,
    park: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NamespacedTestPmd {
    fn launch(ns: &Netns, spec: TestPmdSpec) -> Result<Self, String> {
        let file = File::open(format!("/run/netns/{}", ns.name())).map_err(|e| e.to_string())?;
        let (launched_tx, launched_rx) = mpsc::channel();
        let (park_tx, park_rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // SAFETY: setns(2) on a valid namespace fd; it changes only this thread's network
            // namespace, and this thread is ours.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            let launched = if rc == 0 {
                TestPmd::launch(spec).map_err(|e| e.to_string())
            } else {
                Err(format!("setns: {}", std::io::Error::last_os_error()))
            };
            let _ = launched_tx.send(launched);
            // Until the owner is done (or gone): testpmd must outlive nothing of ours.
            let _ = park_rx.recv();
        });
        let pmd = launched_rx
            .recv()
            .map_err(|_| "testpmd launcher thread died".to_string())??;
        Ok(Self {
            pmd: Some(pmd),
            park: Some(park_tx),
            thread: Some(thread),
        })
    }

    fn pmd(&mut self) -> &mut TestPmd {
        self.pmd.as_mut().expect("running")
    }
}

impl Drop for NamespacedTestPmd {
    fn drop(&mut self) {
        // testpmd first (quits it, removes its hugepage files), then the parked thread.
        drop(self.pmd.take());
        drop(self.park.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn mac_text(mac: &str) -> [u8; 6] {
    let mut out = [0u8; 6];
    for (o, part) in out.iter_mut().zip(mac.split(':')) {
        *o = u8::from_str_radix(part, 16).unwrap();
    }
    out
}

/// Starts testpmd as vm-a's NIC, bridging it to a TAP in `ns`, and configures the guest
/// kernel's side: the VM's MAC and address, the router as default gateway, MTU left at 1500 so
/// that an oversize packet can leave.
fn guest(c: &Cluster, ns: &Netns, att: &AttachmentInfo) -> NamespacedTestPmd {
    let mut spec = TestPmdSpec::virtio_user(&att.socket_path);
    spec.mode = ForwardMode::Io;
    spec.mac = Some(mac_text(&att.mac));
    spec.main_lcore = Some(1);
    spec.launch_timeout = Duration::from_secs(60);
    spec.extra_eal_args = vec!["--vdev".into(), format!("net_tap0,iface={GUEST_IF}")];
    let mut pmd =
        NamespacedTestPmd::launch(ns, spec).unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    pmd.pmd()
        .wait_link_up(0, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    pmd.pmd().start().unwrap();
    let addr = format!("{}/{}", att.vm_ip, att.prefix_len);
    let router = att.router_ip.to_string();
    for args in [
        vec!["link", "set", "dev", GUEST_IF, "address", att.mac.as_str()],
        vec!["link", "set", "dev", GUEST_IF, "mtu", "1500", "up"],
        vec!["addr", "add", addr.as_str(), "dev", GUEST_IF],
        vec![
            "route",
            "add",
            "default",
            "via",
            router.as_str(),
            "dev",
            GUEST_IF,
        ],
    ] {
        ns.ip(&args).unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    }
    pmd
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The "N received" of ping's summary.
fn received(ping_output: &str) -> u64 {
    ping_output
        .split(',')
        .find_map(|part| part.trim().strip_suffix(" received"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn the_virtual_router_answers_pings_and_sends_fragmentation_needed() {
    let c = Cluster::start(&ClusterOptions {
        prefix: "vnprt".into(),
        hosts: 1,
        ..ClusterOptions::default()
    })
    .expect("cluster");
    let dir = c.dir().to_path_buf();
    let namespaces = c.namespace_names();
    c.create_vm("vm-a", 0, &[]).unwrap();
    let att = c.attach(0, "vm-a").unwrap();
    let ns = Netns::create("vnprg").expect("guest namespace");
    let guest_ns = ns.name().to_string();
    let mut pmd = guest(&c, &ns, &att);
    let metric = |name: &str| c.metric(0, name, &[("vm", "vm-a")]).unwrap();
    let router = att.router_ip.to_string();

    // 1. ping the router: vnpd answers (before this change, the echo went to the registry as
    // a token request for an unknown VM and was never answered).
    let out = ns
        .command("ping")
        .args(["-c", "4", "-i", "0.5", "-W", "5", &router])
        .output()
        .unwrap();
    let ping = text(&out);
    eprintln!("{ping}");
    let replies = received(&ping);
    assert!(
        out.status.success() && replies >= 3,
        "ping {router}: {ping}\n{}",
        c.logs()
    );
    assert!(metric("vnpd_icmp_echo_replies_total") >= replies);
    assert_eq!(
        metric("vnpd_token_requests_total"),
        0,
        "the echo went to the registry"
    );

    // 2. An oversize packet with DF from a raw socket: ICMP fragmentation needed with the MTU.
    let out = ns
        .command("python3")
        .args([
            "-c",
            RAW_SENDER,
            &att.vm_ip.to_string(),
            FAR_PEER,
            &OVERSIZE.to_string(),
        ])
        .output()
        .unwrap();
    let answer = text(&out);
    eprintln!("raw sender: {answer}");
    assert!(out.status.success(), "raw sender: {answer}\n{}", c.logs());
    let expected = format!(
        "mtu={} quoted_dst={FAR_PEER} quoted_ident=0x5a5a quoted_len=28",
        att.guest_mtu
    );
    assert!(answer.contains(&expected), "{answer:?} lacks {expected:?}");
    assert_eq!(metric("vnpd_icmp_frag_needed_total"), 1);
    assert_eq!(
        c.metric(
            0,
            "vnpd_drops_total",
            &[("vm", "vm-a"), ("reason", "tx_oversize")]
        )
        .unwrap(),
        1
    );
    // The guest kernel's own path-MTU discovery: a DF ping larger than the MTU gets the same
    // answer, and the kernel takes the MTU into its route cache.
    let out = ns
        .command("ping")
        .args(["-M", "do", "-s", "1472", "-c", "1", "-W", "3", FAR_PEER])
        .output()
        .unwrap();
    let ping = text(&out);
    eprintln!("{ping}");
    assert!(
        ping.contains(&format!("mtu = {}", att.guest_mtu)),
        "DF ping: {ping}"
    );
    assert_eq!(metric("vnpd_icmp_frag_needed_total"), 2);
    let route = ns.ip(&["route", "get", FAR_PEER]).unwrap();
    assert!(
        route.contains(&format!("mtu {}", att.guest_mtu)),
        "route cache: {route}"
    );

    // 3. A ping flood: the router answers a burst, then at its rate; the rest is counted.
    let before = metric("vnpd_icmp_echo_replies_total");
    let out = ns
        .command("ping")
        .args(["-q", "-c", "400", "-i", "0.001", "-W", "1", &router])
        .output()
        .unwrap();
    let flood = text(&out);
    let limited = metric("vnpd_icmp_rate_limited_total");
    let answered = metric("vnpd_icmp_echo_replies_total") - before;
    eprintln!("flood: {answered} answered, {limited} rate-limited\n{flood}");
    assert!(limited > 0, "no rate limit: {flood}\n{}", c.logs());
    assert!(answered > 0 && answered < 400, "{answered} answered");

    pmd.pmd().stop().unwrap();
    drop(pmd);
    drop(ns);
    assert!(!namespace_exists(&guest_ns), "guest namespace left behind");
    drop(c);
    assert_nothing_left(&dir, &namespaces);
}
