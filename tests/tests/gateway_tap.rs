//! NAT and `vnp-gateway` at scale, with network-namespace guests (`vnp-tap-frontend`: the
//! guest is an unmodified Linux network stack running python) on the real vnpd, registry
//! (mutual TLS) and two gateways on one public address, everything driven by the `vnpctl`
//! binary an operator would use. The network's NAT block is 64 ports, so that growing and
//! exhausting ranges costs seconds. One cluster serves every step:
//!
//! 1. `vnpctl vm nat-grow vm-a --blocks 3` while everything runs: vnpd and both gateways
//!    follow (no restart); vm-a then holds 200 TCP connections open at once to an echo server
//!    in the public namespace. The server saw 200 distinct source ports on the public address,
//!    every one in vm-a's (grown) blocks, some in the grown ones, and `vnpctl vnpd nat vm-a`
//!    shows exactly those ports mapped.
//! 2. vm-c (one block: 64 ports) holds 64 connections; its 65th connect is refused at once
//!    (vnpd answers the SYN with a RST), vnpd counts `tx_nat_ports_exhausted`, and the 64 held
//!    connections still carry bytes. `vnpctl vm nat-grow vm-c` then gives it a port of the new
//!    block for a new connection, without a restart.
//! 3. `vnpctl forward add|list|rm`: a public client fetches a file from vm-b's HTTP server
//!    through the rule (the gateways follow `vnpctl gateway config`); after `rm` the rule is
//!    gone from both gateways and the public port answers nothing. A UDP rule to a port where
//!    nothing listens in vm-b: the guest kernel's ICMP port unreachable, translated by vnpd and
//!    the gateway, reaches the public sender's connected socket as ECONNREFUSED.
//! 4. Two gateways, one public address: vm-a and vm-b download slowly served files at once
//!    while the public side's route to the public address flips between the gateways every
//!    200 ms. Both files arrive intact, each at its own VM, and both gateways carried return
//!    traffic (they share no state: separate processes in separate namespaces).
//!
//! Needs root (namespaces, TAP, TUN), busybox and python3 (`scripts/setup`).
//! Run: `cargo test -p vnp-e2e --test gateway_tap -- --nocapture`.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vnp_e2e::cluster::{assert_nothing_left, Cluster, ClusterOptions};
use vnp_e2e::edge::{PublicEdge, PUBLIC_ADDR, PUBLIC_HOST};
use vnp_testkit::process::ChildGuard;
use vnp_testkit::tap_guest::TapGuest;
use vnpd_admin_api::{AttachmentInfo, NatInfo};

/// The network's NAT block size.
const NAT_BLOCK: u16 = 64;
/// Concurrent flows vm-a holds.
const FLOWS: usize = 200;
const ECHO_PORT: u16 = 9000;
const HTTP_PORT: u16 = 8000;
const FORWARDED_PORT: u16 = 8080;
/// A public UDP port forwarded to vm-b's port 5353, where nothing listens.
const FORWARDED_UDP_PORT: u16 = 5300;
/// Bytes of each file the two VMs download in step 4.
const SLOW_BYTES: usize = 2 << 20;

/// A TCP echo server on argv[1]:argv[2], one thread per connection, that appends
/// `conn IP:PORT` for every accepted connection to the file argv[3].
const ECHO_SERVER: &str = r#"
import socket, sys, threading
log = open(sys.argv[3], "a", buffering=1)
lock = threading.Lock()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1024)
def serve(c, a):
    with lock:
        log.write("conn %s:%d\n" % a)
    with c:
        while True:
            d = c.recv(4096)
            if not d:
                return
            c.sendall(d)
while True:
    c, a = s.accept()
    threading.Thread(target=serve, args=(c, a), daemon=True).start()
"#;

/// In a guest: opens argv[3] connections to argv[1]:argv[2], each checked with one echoed
/// line, and holds them (`held N`). With argv[5] == "exhaust", then tries one more connection
/// (`extra refused|connected|failed <error> <seconds>`) and sends a line on every held one
/// again (`again ok N`). Closes them all once the file argv[4] exists (`released`).
const HOLDER: &str = r#"
import os, socket, sys, time
dst, port, n, release = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
mode = sys.argv[5] if len(sys.argv) > 5 else ""
def echo(c, line):
    c.sendall(line)
    got = b""
    while not got.endswith(b"\n"):
        b = c.recv(4096)
        if not b:
            raise OSError("closed")
        got += b
    assert got == line, (got, line)
conns = []
for i in range(n):
    c = socket.create_connection((dst, port), timeout=10)
    c.settimeout(10)
    echo(c, b"hello %d\n" % i)
    conns.append(c)
print("held %d" % len(conns), file=sys.stderr, flush=True)
if mode == "exhaust":
    t = time.monotonic()
    try:
        x = socket.create_connection((dst, port), timeout=20)
        print("extra connected %.3f" % (time.monotonic() - t), file=sys.stderr, flush=True)
    except ConnectionRefusedError:
        print("extra refused %.3f" % (time.monotonic() - t), file=sys.stderr, flush=True)
    except OSError as e:
        print("extra failed %r %.3f" % (e, time.monotonic() - t), file=sys.stderr, flush=True)
    ok = 0
    for i, c in enumerate(conns):
        echo(c, b"again %d\n" % i)
        ok += 1
    print("again ok %d" % ok, file=sys.stderr, flush=True)
while not os.path.exists(release):
    time.sleep(0.1)
for c in conns:
    c.close()
print("released", file=sys.stderr, flush=True)
"#;

/// An HTTP server for the directory argv[1] on argv[2]:argv[3]; `/slow/NAME` serves the file
/// NAME in 32 KiB chunks 50 ms apart.
const HTTP_SERVER: &str = r#"
import functools, http.server, os, sys, time
root = sys.argv[1]
class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, fmt, *args):
        pass
    def do_GET(self):
        if not self.path.startswith("/slow/"):
            return super().do_GET()
        data = open(os.path.join(root, self.path[6:]), "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        for i in range(0, len(data), 32768):
            self.wfile.write(data[i:i + 32768])
            self.wfile.flush()
            time.sleep(0.05)
server = http.server.ThreadingHTTPServer((sys.argv[2], int(sys.argv[3])),
                                         functools.partial(Handler, directory=root))
server.serve_forever()
"#;

/// Sends one datagram from a connected UDP socket to argv[1]:argv[2] and prints whether an
/// answer came (`answered`), an ICMP port unreachable (`refused`) or nothing (`timeout`).
const UDP_PROBE: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2])))
s.settimeout(5)
s.send(b"probe")
try:
    s.recv(100)
    print("answered")
except ConnectionRefusedError:
    print("refused")
except socket.timeout:
    print("timeout")
"#;

/// Fetches argv[1] (timeout 60 s) and prints `bytes=N sha256=H`.
const FETCH: &str = r#"
import hashlib, sys, urllib.request
d = urllib.request.urlopen(sys.argv[1], timeout=60).read()
print("bytes=%d sha256=%s" % (len(d), hashlib.sha256(d).hexdigest()))
"#;

fn step(what: &str) {
    eprintln!("[gateway_tap] {what}");
}

/// Runs the real `vnpctl` in the core namespace (where the registry listens) with the admin
/// certificate; panics with its stderr when it fails.
fn vnpctl(c: &Cluster, args: &[&str]) -> String {
    c.vnpctl(args).unwrap_or_else(|e| panic!("{e}"))
}

/// `vnpctl vnpd --json nat VM` against host `host`'s vnpd.
fn vnpctl_nat(c: &Cluster, host: usize, vm: &str) -> NatInfo {
    let socket = c.host(host).admin_socket.display().to_string();
    let text = vnpctl(c, &["vnpd", "--admin-socket", &socket, "--json", "nat", vm]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("vnpctl vnpd nat {vm}: {e}\n{text}"))
}

fn in_blocks(blocks: &[(u16, u16)], port: u16) -> bool {
    blocks.iter().any(|&(a, b)| (a..=b).contains(&port))
}

/// The source ports the echo server logged for connections from `from`, in order.
fn logged_ports(log: &Path, from: Ipv4Addr) -> Vec<u16> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix(&format!("conn {from}:"))?.parse().ok())
        .collect()
}

/// The mapped ports of vm's TCP flows to `remote` in `nat`.
fn mapped_to(nat: &NatInfo, remote: SocketAddr) -> BTreeSet<u16> {
    nat.flows
        .iter()
        .filter(|f| f.proto == "tcp" && SocketAddr::from((f.remote, f.remote_port)) == remote)
        .filter_map(|f| f.mapped)
        .collect()
}

/// Waits until `f` holds, or panics with `what` and `context()`.
fn wait_for(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "{what}\n{}", context());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts [`HOLDER`] in guest `g`.
fn hold(g: &TapGuest, n: usize, release: &Path, mode: &str) -> ChildGuard {
    let name = format!("holder-{}", g.netns().name());
    ChildGuard::spawn(
        &name,
        g.netns().command("python3").args([
            "-u",
            "-c",
            HOLDER,
            &PUBLIC_HOST.to_string(),
            &ECHO_PORT.to_string(),
            &n.to_string(),
            release.to_str().unwrap(),
            mode,
        ]),
        None,
    )
    .expect("start the holder")
}

/// Waits for a line starting with `prefix` in the holder's stderr; returns it.
fn holder_line(h: &mut ChildGuard, prefix: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let tail = h.stderr_tail();
        if let Some(l) = tail.lines().find(|l| l.starts_with(prefix)) {
            return l.to_string();
        }
        let exited = h.try_wait().expect("holder status");
        assert!(
            exited.is_none() && Instant::now() < deadline,
            "holder: no `{prefix}` ({exited:?}):\n{tail}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn fetch_in(ns: &vnp_testkit::netns::Netns, url: &str) -> String {
    let out = ns
        .command("python3")
        .args(["-c", FETCH, url])
        .output()
        .expect("python3");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sha256_of(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn wait_listening(edge: &PublicEdge, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !edge
        .public()
        .enter(move || TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok())
        .unwrap_or(false)
    {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until both gateways' `vnp_gateway_nat_ports` gauge of `vm` reads `ports`.
fn wait_gateway_ports(c: &Cluster, edge: &PublicEdge, vm: &str, ports: u64) {
    for i in 0..2 {
        wait_for(
            &format!("gateway {i} never saw {ports} NAT ports for {vm}"),
            Duration::from_secs(30),
            || {
                edge.metric_n(i, c, "vnp_gateway_nat_ports", &[("vm", vm)])
                    .unwrap_or(0)
                    == ports
            },
            || edge.logs(c),
        );
    }
}

/// The cluster, its edge (two gateways) and the three guests. Field order is drop order.
struct World {
    ga: TapGuest,
    gb: TapGuest,
    gc: TapGuest,
    att_b: AttachmentInfo,
    edge: PublicEdge,
    c: Cluster,
    dir: PathBuf,
    echo_log: PathBuf,
    www: PathBuf,
}

impl World {
    /// Cluster, edge, public servers, guests; returns the namespace names to check after.
    fn start() -> (World, Vec<String>) {
        let mut c = Cluster::start(&ClusterOptions {
            prefix: "vnpgt".into(),
            nat_block: Some(NAT_BLOCK),
            ..ClusterOptions::default()
        })
        .expect("cluster");
        let dir = c.dir().to_path_buf();
        c.create_vm("vm-a", 0, &[]).unwrap();
        c.create_vm("vm-b", 1, &[]).unwrap();
        c.create_vm("vm-c", 0, &[]).unwrap();
        let mut edge = PublicEdge::create(&mut c, "gw1", vnp_e2e::cluster::NETWORK).expect("edge");
        edge.add_gateway(&mut c, "gw2").expect("second gateway");
        let mut namespaces = c.namespace_names();
        namespaces.extend(edge.namespace_names());
        for i in 0..2 {
            edge.start_gateway_n(i, &c, 3)
                .unwrap_or_else(|e| panic!("{e}\n{}", edge.logs(&c)));
        }

        let echo_log = dir.join("echo.log");
        edge.spawn_public(
            "echo",
            "python3",
            &[
                "-u",
                "-c",
                ECHO_SERVER,
                &PUBLIC_HOST.to_string(),
                &ECHO_PORT.to_string(),
                echo_log.to_str().unwrap(),
            ],
        )
        .unwrap();
        let www = dir.join("www");
        std::fs::create_dir_all(&www).unwrap();
        for (name, seed) in [("a", 3u64), ("b", 5)] {
            let blob: Vec<u8> = (0..SLOW_BYTES as u64)
                .map(|i| (i.wrapping_add(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
                .collect();
            std::fs::write(www.join(name), blob).unwrap();
        }
        edge.spawn_public(
            "http",
            "python3",
            &[
                "-u",
                "-c",
                HTTP_SERVER,
                www.to_str().unwrap(),
                &PUBLIC_HOST.to_string(),
                &HTTP_PORT.to_string(),
            ],
        )
        .unwrap();
        wait_listening(&edge, SocketAddr::from((PUBLIC_HOST, ECHO_PORT)));
        wait_listening(&edge, SocketAddr::from((PUBLIC_HOST, HTTP_PORT)));

        step("namespace guests vm-a, vm-c (host 0) and vm-b (host 1)");
        let att_a = c.attach(0, "vm-a").unwrap();
        let att_b = c.attach(1, "vm-b").unwrap();
        let att_c = c.attach(0, "vm-c").unwrap();
        let ga = c.tap_guest(&att_a, true).expect("guest vm-a");
        let gb = c.tap_guest(&att_b, true).expect("guest vm-b");
        let gc = c.tap_guest(&att_c, true).expect("guest vm-c");
        wait_gateway_ports(&c, &edge, "vm-a", u64::from(NAT_BLOCK));

        let world = World {
            ga,
            gb,
            gc,
            att_b,
            edge,
            c,
            dir,
            echo_log,
            www,
        };
        (world, namespaces)
    }

    fn logs(&self) -> String {
        format!("{}{}", self.c.logs(), self.edge.logs(&self.c))
    }

    /// Step 1.
    fn concurrent_flows(&self) {
        step("1. nat-grow vm-a by 3 blocks, then 200 concurrent flows from vm-a");
        vnpctl(&self.c, &["vm", "nat-grow", "vm-a", "--blocks", "3"]);
        wait_for(
            "vnpd never saw vm-a's grown blocks",
            Duration::from_secs(30),
            || vnpctl_nat(&self.c, 0, "vm-a").blocks.len() == 4,
            || self.c.logs(),
        );
        wait_gateway_ports(&self.c, &self.edge, "vm-a", 4 * u64::from(NAT_BLOCK));
        let nat_a = vnpctl_nat(&self.c, 0, "vm-a");
        let first_block = nat_a.blocks[0];
        let release_a = self.dir.join("release-a");
        let mut holder = hold(&self.ga, FLOWS, &release_a, "");
        let held = holder_line(&mut holder, "held ", Duration::from_secs(120));
        assert_eq!(held, format!("held {FLOWS}"));
        let seen = logged_ports(&self.echo_log, PUBLIC_ADDR);
        let seen_set: BTreeSet<u16> = seen.iter().copied().collect();
        assert_eq!(seen.len(), FLOWS, "the server logged {seen:?}");
        assert_eq!(seen_set.len(), FLOWS, "source ports repeat: {seen:?}");
        let nat_a = vnpctl_nat(&self.c, 0, "vm-a");
        for p in &seen_set {
            assert!(
                in_blocks(&nat_a.blocks, *p),
                "port {p} outside vm-a's blocks {:?}",
                nat_a.blocks
            );
        }
        assert!(
            seen_set
                .iter()
                .any(|p| !(first_block.0..=first_block.1).contains(p)),
            "no flow used a grown block"
        );
        let mapped = mapped_to(&nat_a, SocketAddr::from((PUBLIC_HOST, ECHO_PORT)));
        assert_eq!(
            mapped, seen_set,
            "vnpd's mapped ports are not what the server saw"
        );
        let table = vnpctl(
            &self.c,
            &[
                "vnpd",
                "--admin-socket",
                &self.c.host(0).admin_socket.display().to_string(),
                "nat",
                "vm-a",
            ],
        );
        eprintln!("{}", table.lines().take(6).collect::<Vec<_>>().join("\n"));
        std::fs::write(&release_a, b"").unwrap();
        holder_line(&mut holder, "released", Duration::from_secs(30));
        drop(holder);
    }

    /// Step 2.
    fn exhaustion(&self) {
        step("2. exhaustion: vm-c holds its 64 ports, the 65th flow is refused at once");
        let drops_before = self
            .c
            .metric(
                0,
                "vnpd_drops_total",
                &[("vm", "vm-c"), ("reason", "tx_nat_ports_exhausted")],
            )
            .unwrap();
        let release_c = self.dir.join("release-c");
        let mut holder = hold(&self.gc, usize::from(NAT_BLOCK), &release_c, "exhaust");
        assert_eq!(
            holder_line(&mut holder, "held ", Duration::from_secs(60)),
            format!("held {NAT_BLOCK}")
        );
        let extra = holder_line(&mut holder, "extra ", Duration::from_secs(30));
        let secs: f64 = extra.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(
            extra.starts_with("extra refused") && secs < 1.0,
            "the flow beyond vm-c's range: {extra}\n{}",
            self.logs()
        );
        assert_eq!(
            holder_line(&mut holder, "again ", Duration::from_secs(30)),
            format!("again ok {NAT_BLOCK}"),
            "the held flows stopped carrying bytes"
        );
        let drops = self
            .c
            .metric(
                0,
                "vnpd_drops_total",
                &[("vm", "vm-c"), ("reason", "tx_nat_ports_exhausted")],
            )
            .unwrap();
        assert!(drops > drops_before, "no exhaustion drop counted ({drops})");
        step("2b. nat-grow vm-c: a new flow gets a port of the new block, nothing restarts");
        let old_c = vnpctl_nat(&self.c, 0, "vm-c").blocks;
        assert_eq!(old_c.len(), 1);
        vnpctl(&self.c, &["vm", "nat-grow", "vm-c"]);
        wait_for(
            "vnpd never saw vm-c's new block",
            Duration::from_secs(30),
            || vnpctl_nat(&self.c, 0, "vm-c").blocks.len() == 2,
            || self.c.logs(),
        );
        wait_gateway_ports(&self.c, &self.edge, "vm-c", 2 * u64::from(NAT_BLOCK));
        let release_c2 = self.dir.join("release-c2");
        let mut one_more = hold(&self.gc, 1, &release_c2, "");
        assert_eq!(
            holder_line(&mut one_more, "held ", Duration::from_secs(30)),
            "held 1",
            "{}",
            self.logs()
        );
        let nat_c = vnpctl_nat(&self.c, 0, "vm-c");
        let mapped_c = mapped_to(&nat_c, SocketAddr::from((PUBLIC_HOST, ECHO_PORT)));
        assert_eq!(mapped_c.len(), usize::from(NAT_BLOCK) + 1, "{nat_c:?}");
        assert_eq!(
            mapped_c.iter().filter(|p| !in_blocks(&old_c, **p)).count(),
            1,
            "the new flow is not in the new block: {nat_c:?}"
        );
        for f in [&release_c, &release_c2] {
            std::fs::write(f, b"").unwrap();
        }
        holder_line(&mut holder, "released", Duration::from_secs(30));
        holder_line(&mut one_more, "released", Duration::from_secs(30));
        drop((holder, one_more));
    }

    /// Step 3.
    fn forwarding(&self) {
        step("3. vnpctl forward add|list|rm to vm-b's HTTP server");
        let guest_www = self.dir.join("www-b");
        std::fs::create_dir_all(&guest_www).unwrap();
        std::fs::write(guest_www.join("up"), vec![0x5au8; 300_000]).unwrap();
        let up_sha = sha256_of(&guest_www.join("up"));
        let httpd_b = ChildGuard::spawn(
            "httpd-b",
            self.gb.netns().command("python3").args([
                "-m",
                "http.server",
                "80",
                "--bind",
                &self.att_b.vm_ip.to_string(),
                "--directory",
                guest_www.to_str().unwrap(),
            ]),
            None,
        )
        .unwrap();
        let local = SocketAddr::from((self.att_b.vm_ip, 80));
        wait_for(
            "vm-b's HTTP server never listened",
            Duration::from_secs(30),
            || {
                self.gb
                    .netns()
                    .enter(move || {
                        TcpStream::connect_timeout(&local, Duration::from_millis(300)).is_ok()
                    })
                    .unwrap_or(false)
            },
            || httpd_b.stderr_tail(),
        );
        let public = format!("{PUBLIC_ADDR}:{FORWARDED_PORT}");
        let added = vnpctl(
            &self.c,
            &[
                "forward", "add", "web", "--public", &public, "--proto", "tcp", "--to", "vm-b:80",
            ],
        );
        assert!(added.contains("vm-b:80"), "{added}");
        let list = vnpctl(&self.c, &["forward", "list"]);
        assert!(
            list.contains("web") && list.contains(&format!("{public}/tcp")),
            "{list}"
        );
        let cfg = vnpctl(&self.c, &["gateway", "config", "gw2"]);
        assert!(cfg.contains("vm-b:80") && cfg.contains("vm-a"), "{cfg}");
        for i in 0..2 {
            wait_for(
                &format!("gateway {i} never saw the rule"),
                Duration::from_secs(30),
                || {
                    self.edge
                        .metric_n(i, &self.c, "vnp_gateway_forwarding_rules", &[])
                        .unwrap_or(0)
                        == 1
                },
                || self.edge.logs(&self.c),
            );
        }
        let url = format!("http://{public}/up");
        let got = fetch_in(self.edge.public(), &url);
        assert_eq!(
            got,
            format!("bytes=300000 sha256={up_sha}"),
            "{url}\n{}",
            self.logs()
        );
    }

    /// Step 3b and the rules' removal.
    fn guest_icmp_error_and_forward_rm(&self) {
        step(
            "3b. a guest's ICMP port unreachable about a forwarded UDP datagram reaches the sender",
        );
        let udp_public = format!("{PUBLIC_ADDR}:{FORWARDED_UDP_PORT}");
        vnpctl(
            &self.c,
            &[
                "forward",
                "add",
                "dns",
                "--public",
                &udp_public,
                "--proto",
                "udp",
                "--to",
                "vm-b:5353",
            ],
        );
        for i in 0..2 {
            wait_for(
                &format!("gateway {i} never saw the UDP rule"),
                Duration::from_secs(30),
                || {
                    self.edge
                        .metric_n(i, &self.c, "vnp_gateway_forwarding_rules", &[])
                        .unwrap_or(0)
                        == 2
                },
                || self.edge.logs(&self.c),
            );
        }
        // Nothing listens on vm-b's port 5353: its kernel answers port unreachable, which must
        // come back to the sender's connected socket as ECONNREFUSED.
        let out = self
            .edge
            .public()
            .command("python3")
            .args([
                "-c",
                UDP_PROBE,
                &PUBLIC_ADDR.to_string(),
                &FORWARDED_UDP_PORT.to_string(),
            ])
            .output()
            .unwrap();
        let probe = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            probe.trim(),
            "refused",
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        vnpctl(&self.c, &["forward", "rm", "dns"]);
        vnpctl(&self.c, &["forward", "rm", "web"]);
        assert!(!vnpctl(&self.c, &["forward", "list"]).contains("web"));
        for i in 0..2 {
            wait_for(
                &format!("gateway {i} kept the removed rule"),
                Duration::from_secs(30),
                || {
                    self.edge
                        .metric_n(i, &self.c, "vnp_gateway_forwarding_rules", &[])
                        .unwrap_or(1)
                        == 0
                },
                || self.edge.logs(&self.c),
            );
        }
        let target = SocketAddr::from((PUBLIC_ADDR, FORWARDED_PORT));
        let reached = self
            .edge
            .public()
            .enter(move || TcpStream::connect_timeout(&target, Duration::from_secs(3)).is_ok())
            .unwrap();
        assert!(!reached, "{target} still answers after forward rm");
    }

    /// Step 4.
    fn two_gateways(&self) {
        step("4. two gateways, the public route flipping between them during two downloads");
        let inbound = |i| {
            self.edge
                .metric_n(i, &self.c, "vnp_gateway_inbound_packets_total", &[])
                .unwrap()
        };
        let before = [inbound(0), inbound(1)];
        let fetches: Vec<_> = [(&self.ga, "a"), (&self.gb, "b")]
            .into_iter()
            .map(|(g, name)| {
                let ns_name = g.netns().name().to_string();
                let url = format!("http://{PUBLIC_HOST}:{HTTP_PORT}/slow/{name}");
                std::thread::spawn(move || {
                    let out = std::process::Command::new("ip")
                        .args(["netns", "exec", &ns_name, "python3", "-c", FETCH, &url])
                        .output()
                        .expect("python3");
                    format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout).trim(),
                        String::from_utf8_lossy(&out.stderr)
                    )
                })
            })
            .collect();
        let mut via = 0;
        let mut flips = 0;
        while fetches.iter().any(|f| !f.is_finished()) {
            std::thread::sleep(Duration::from_millis(200));
            via = 1 - via;
            self.edge.route_public_via(via).unwrap();
            flips += 1;
        }
        self.edge.route_public_via(0).unwrap();
        eprintln!("route flipped {flips} times");
        assert!(
            flips >= 6,
            "the downloads ended before the route flipped much"
        );
        for (f, name) in fetches.into_iter().zip(["a", "b"]) {
            let got = f.join().unwrap();
            let want = format!(
                "bytes={SLOW_BYTES} sha256={}",
                sha256_of(&self.www.join(name))
            );
            assert_eq!(got, want, "vm-{name}'s download\n{}", self.logs());
        }
        let after = [inbound(0), inbound(1)];
        for i in 0..2 {
            assert!(
                after[i] > before[i] + 100,
                "gateway {i} carried {} return packets",
                after[i] - before[i]
            );
        }
    }
}

#[test]
fn namespace_guests_through_nat_at_scale_exhaustion_forwarding_and_two_gateways() {
    let (world, namespaces) = World::start();
    let dir = world.dir.clone();
    world.concurrent_flows();
    world.exhaustion();
    world.forwarding();
    world.guest_icmp_error_and_forward_rm();
    world.two_gateways();
    drop(world);
    assert_nothing_left(&dir, &namespaces);
}
