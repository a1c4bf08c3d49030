//! Transparent load balancing at the gateway (issue #10), all real: a registry over mutual
//! TLS, two vnpd hosts in namespaces, three network-namespace guests (`TapGuest`: unmodified
//! Linux TCP behind vnpd's vhost-user port) each running a Python HTTP server that answers with
//! its own name and the client address it sees, a `vnp-gateway` with a TUN, and a public
//! namespace. One cluster serves every assertion:
//!
//! 1. service `web` (`203.0.113.1:80/tcp -> port 8080` of web-1, web-2, web-3) is created while
//!    the gateway runs; 300 connections from the public namespace each get an answer, each guest
//!    serves a share within 5 sigma of the binomial spread (never flakes: p < 10^-6), and every
//!    guest saw the client's real address (no source NAT);
//! 2. web-3 leaves the pool (`vnpctl lb rm-member`): a connection opened on it before is
//!    still served by it afterwards, no new connection goes to it, and the other two share the
//!    next 200 within their binomial bounds;
//! 3. web-2's server stops: the gateway's HTTP health checks (through VNP, from the gateway's
//!    underlay address) take web-2 out within `interval × fall + timeout` (plus the metrics
//!    poll), every new connection then goes to web-1; web-2's server starts again and web-2
//!    comes back after `rise` successful checks; both changes show in the gateway's view as the
//!    registry publishes it (`GET /v1/services/web`, what `vnpctl lb show` prints);
//! 4. a second gateway (gw2) joins the address, reached from the public namespace by another
//!    path; UDP service `echo` (port 5353 of the three guests): 30 flows whose datagrams
//!    alternate between gw1 and gw2 (the socket's mark picks the route per datagram) each get
//!    every answer from one guest: the two gateways chose the same VM without talking;
//! 5. a download of 8 MiB of random bytes from a guest through service `bulk` runs through the
//!    gateway the serving VM's replies would go to without issue #10's reply-follows-gateway
//!    (the one the registry assigns the VM); that gateway is SIGKILLed mid-transfer and the
//!    public route moves to the other; the download completes from the same VM with the
//!    sha256 the server computed, its replies now leaving through the surviving gateway.
//!
//! Needs root (namespaces, TAP, TUN), busybox and python3 (`scripts/setup`).
//! Run: `cargo test -p vnp-e2e --test load_balancing -- --nocapture`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use vnp_e2e::cluster::{assert_nothing_left, Cluster, ClusterOptions, NETWORK};
use vnp_e2e::edge::{PublicEdge, PUBLIC_ADDR, PUBLIC_HOST};
use vnp_registry_client::api::*;
use vnp_testkit::process::ChildGuard;
use vnp_testkit::tap_guest::TapGuest;

const VM_PORT: u16 = 8080;
const PUBLIC_PORT: u16 = 80;
const GUESTS: [&str; 3] = ["web-1", "web-2", "web-3"];
/// Health checks: `GET /` every 500 ms, 400 ms timeout, rise 2, fall 3.
const INTERVAL_MS: u64 = 500;
const TIMEOUT_MS: u64 = 400;
const RISE: u32 = 2;
const FALL: u32 = 3;

/// An HTTP/1.1 server that answers every GET with `NAME CLIENT_ADDR` (keep-alive, so a
/// connection can be held open across a pool change).
const SERVER: &str = r#"
import http.server, sys
name = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = ("%s %s\n" % (name, self.client_address[0])).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[2])), H).serve_forever()
"#;

/// `n` connections (one GET each) to argv[1]:argv[2]; prints `NAME CLIENT` per answer and
/// `failed N` at the end.
const CLIENT: &str = r#"
import http.client, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
failed = 0
for i in range(n):
    try:
        c = http.client.HTTPConnection(host, port, timeout=10)
        c.request("GET", "/")
        print(c.getresponse().read().decode().strip(), flush=True)
        c.close()
    except Exception as e:
        failed += 1
        print("error %s" % e, file=sys.stderr, flush=True)
print("failed %d" % failed, flush=True)
"#;

/// One kept-alive connection: a GET per line read on stdin, its answer printed.
const HOLDER: &str = r#"
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10)
for _ in sys.stdin:
    c.request("GET", "/")
    print(c.getresponse().read().decode().strip(), flush=True)
"#;

fn step(what: &str) {
    eprintln!("[load_balancing] {what}");
}

/// Runs [`CLIENT`] for `n` connections to service web from the public namespace.
fn run_client(edge: &PublicEdge, n: usize) -> std::process::Output {
    edge.public()
        .command("python3")
        .args([
            "-c",
            CLIENT,
            &PUBLIC_ADDR.to_string(),
            &PUBLIC_PORT.to_string(),
        ])
        .arg(n.to_string())
        .output()
        .expect("run the client")
}

/// Answers per guest (and the client addresses the guests saw) of `n` connections.
fn connect_many(edge: &PublicEdge, n: usize) -> (BTreeMap<String, usize>, Vec<String>) {
    let out = run_client(edge, n);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("failed 0"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut counts = BTreeMap::new();
    let mut clients = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with("failed")) {
        let (name, client) = line.split_once(' ').expect("NAME CLIENT");
        *counts.entry(name.to_string()).or_insert(0) += 1;
        if !clients.iter().any(|c| c == client) {
            clients.push(client.to_string());
        }
    }
    assert_eq!(counts.values().sum::<usize>(), n, "{counts:?}");
    (counts, clients)
}

/// Whether `k` of `n` is within 5 sigma of Binomial(n, p).
fn within_binomial(k: usize, n: usize, p: f64) -> bool {
    let mean = n as f64 * p;
    let sigma = (n as f64 * p * (1.0 - p)).sqrt();
    (k as f64 - mean).abs() <= 5.0 * sigma
}

/// Asserts that each of `vms` got a fair share of `n` answers: within 5 sigma of
/// Binomial(n, 1 / vms.len()).
fn assert_spread(counts: &BTreeMap<String, usize>, n: usize, vms: &[&str]) {
    for vm in vms {
        let k = counts.get(*vm).copied().unwrap_or(0);
        assert!(
            within_binomial(k, n, 1.0 / vms.len() as f64),
            "{vm}: {k} of {n} ({counts:?})"
        );
    }
}

/// New flows gateway `gw` placed on `vms` for `service`, summed.
fn new_flows(c: &Cluster, edge: &PublicEdge, gw: usize, service: &str, vms: &[&str]) -> u64 {
    vms.iter()
        .map(|vm| {
            edge.metric_n(
                gw,
                c,
                "vnp_gateway_lb_new_flows_total",
                &[("service", service), ("vm", vm)],
            )
            .unwrap()
        })
        .sum()
}

/// Starts `script` with python3 in guest `g`'s namespace with `args`.
fn spawn_in_guest(g: &TapGuest, name: &str, script: &str, args: &[&str]) -> ChildGuard {
    let mut cmd = g.netns().command("python3");
    cmd.args(["-c", script]).args(args);
    ChildGuard::spawn(name, &mut cmd, None).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Waits until the gateway's view of the service's members is `want` (member -> up).
fn wait_members(c: &Cluster, edge: &PublicEdge, want: &[(&str, Option<u64>)]) -> Duration {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    loop {
        let text = edge.scrape(c).unwrap_or_default();
        let got: Vec<Option<u64>> = want
            .iter()
            .map(|(vm, _)| {
                vnpd::metrics::prometheus::sample_value(
                    &text,
                    "vnp_gateway_lb_member_up",
                    &[("service", "web"), ("vm", vm)],
                )
            })
            .collect();
        if got.iter().zip(want).all(|(g, (_, w))| g == w) {
            return started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "gateway members {got:?}, want {want:?}\n{}",
            edge.logs(c)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until gateway gw1's view of `vm`, published through the registry, is `up`.
fn wait_published(c: &Cluster, vm: &'static str, up: bool) {
    wait_view(c, "web", "gw1", Duration::from_secs(30), |members| {
        members.iter().any(|m| m.vm == vm && m.up == up)
    })
    .unwrap_or_else(|views| panic!("registry does not show {vm} as up={up}: {views:?}"));
}

/// Polls the registry until `done` holds for the members of `gateway`'s published view of
/// `service`; the last views if it does not within `within`.
fn wait_view(
    c: &Cluster,
    service: &'static str,
    gateway: &str,
    within: Duration,
    done: impl Fn(&[&MemberHealth]) -> bool,
) -> Result<(), Vec<HealthView>> {
    let deadline = Instant::now() + within;
    loop {
        let st = c.registry(move |r| r.get_service(service)).unwrap();
        let members: Vec<&MemberHealth> = st
            .views
            .iter()
            .filter(|v| v.gateway == gateway)
            .flat_map(|v| v.members.iter())
            .collect();
        if done(&members) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(st.views);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A UDP server answering every datagram with its name.
const ECHO: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[2])))
while True:
    _, peer = s.recvfrom(2048)
    s.sendto(sys.argv[1].encode(), peer)
"#;

/// `flows` UDP flows from 203.0.113.10, `per` datagrams each, the socket's mark alternating
/// 0/1 (gw1/gw2) per datagram; prints one line of answers per flow.
const ALTERNATE: &str = r#"
import socket, sys
host, port, flows, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
SO_MARK = getattr(socket, "SO_MARK", 36)
# Every socket stays open to the end: a port freed by one flow could be the next flow's, and
# a repeated 5-tuple is no new flow for the gateways.
held = []
for f in range(flows):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.5)
    s.bind((sys.argv[5], 0))
    names = []
    for i in range(per):
        s.setsockopt(socket.SOL_SOCKET, SO_MARK, i % 2)
        answer = "timeout"
        for _ in range(3):
            s.sendto(b"?", (host, port))
            try:
                answer = s.recvfrom(100)[0].decode()
                break
            except socket.timeout:
                pass
        names.append(answer)
    print(" ".join(names), flush=True)
    held.append(s)
"#;

const ECHO_PORT: u16 = 5353;
/// gw2's address on the public segment (`PublicEdge::add_gateway`'s second gateway).
const GW2_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 3);

/// Adds gateway gw2 on the public address (`PublicEdge::add_gateway`: its namespace, TUN and
/// public veth), sends the public namespace's marked packets through it (policy routing on
/// the socket's mark) and starts it. Returns its index in the edge.
fn second_gateway(c: &mut Cluster, edge: &mut PublicEdge) -> usize {
    let i = edge.add_gateway(c, "gw2").unwrap();
    let public = edge.public();
    let public_addr = format!("{PUBLIC_ADDR}/32");
    let via = GW2_PUBLIC.to_string();
    public
        .ip(&["route", "add", &public_addr, "via", &via, "table", "101"])
        .unwrap();
    public
        .ip(&["rule", "add", "fwmark", "1", "table", "101"])
        .unwrap();
    // Health-check answers relayed by the other gateway arrive on the underlay for an address
    // routed into the TUN: loose reverse-path filtering.
    let gw = c.host_ns(edge.gateway_ns(i));
    for what in ["all", "default"] {
        gw.run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{what}.rp_filter=2"),
        ])
        .unwrap();
    }
    edge.start_gateway_n(i, c, GUESTS.len() as u64)
        .unwrap_or_else(|e| panic!("{e}\n{}", edge.logs(c)));
    // gw2's checks find every member up, and gw2 published that through the registry.
    wait_view(c, "echo", "gw2", Duration::from_secs(60), |members| {
        members.iter().filter(|m| m.up).count() == GUESTS.len()
    })
    .unwrap_or_else(|views| panic!("gw2's view: {views:?}\n{}", edge.logs(c)));
    i
}

/// Sends one GET on the held connection and reads its answer.
fn ask(holder: &mut Child, out: &mut impl BufRead) -> String {
    let stdin = holder.stdin.as_mut().expect("holder stdin");
    stdin.write_all(b"\n").and_then(|_| stdin.flush()).unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    line.trim().to_string()
}

/// Service web: 203.0.113.1:80/tcp -> port 8080 of the three guests, HTTP checks.
fn spec_web() -> ServiceSpec {
    ServiceSpec {
        id: "web".into(),
        public_addr: PUBLIC_ADDR,
        public_port: PUBLIC_PORT,
        proto: L4Proto::Tcp,
        vm_port: Some(VM_PORT),
        members: GUESTS.iter().map(|g| member(g)).collect(),
        health: HealthCheckSpec {
            http: Some(HttpCheck {
                path: "/".into(),
                expect_status: 200,
            }),
            port: None,
            interval_ms: INTERVAL_MS,
            timeout_ms: TIMEOUT_MS,
            rise: RISE,
            fall: FALL,
        },
        table_size: None,
    }
}

/// Service `id`: the public address's `port`/`proto` -> the same port of the three guests,
/// each checked by a TCP connect to web's port.
fn spec_checked_on_web(id: &str, port: u16, proto: L4Proto) -> ServiceSpec {
    ServiceSpec {
        id: id.into(),
        public_port: port,
        proto,
        vm_port: Some(port),
        health: HealthCheckSpec {
            port: Some(VM_PORT),
            ..HealthCheckSpec::default()
        },
        ..spec_web()
    }
}

fn member(vm: &str) -> PoolMember {
    PoolMember {
        vm: Some(vm.into()),
        tag: None,
        weight: 1,
    }
}

fn held_connection_and_pool_removal(c: &Cluster, edge: &PublicEdge) {
    // 2. A connection held on web-3 across web-3 leaving the pool.
    step("hold a connection on web-3");
    let mut attempts = 0;
    let (mut holder, mut held) = loop {
        attempts += 1;
        assert!(attempts <= 50, "no connection landed on web-3 in 50 tries");
        let mut h = edge
            .public()
            .command("python3")
            .args([
                "-c",
                HOLDER,
                &PUBLIC_ADDR.to_string(),
                &PUBLIC_PORT.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(h.stdout.take().unwrap());
        if ask(&mut h, &mut out).starts_with("web-3 ") {
            break (h, out);
        }
        let _ = h.kill();
        let _ = h.wait();
    };
    step("web-3 leaves the pool");
    c.registry(|r| r.remove_service_member("web", Some("web-3"), None))
        .unwrap();
    wait_members(
        c,
        edge,
        &[("web-1", Some(1)), ("web-2", Some(1)), ("web-3", None)],
    );
    let answer = ask(&mut holder, &mut held);
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(
        answer.starts_with("web-3 "),
        "held connection moved: {answer:?}"
    );
    let (counts, _) = connect_many(edge, 200);
    eprintln!("answers without web-3: {counts:?}");
    assert_eq!(counts.get("web-3"), None, "a new flow went to web-3");
    assert_spread(&counts, 200, &["web-1", "web-2"]);
}

fn health_checks_take_a_member_out_and_back(
    c: &Cluster,
    edge: &PublicEdge,
    guests: &[TapGuest],
    servers: &mut [ChildGuard],
) {
    // 3. web-2's server stops; the health checks take it out, then bring it back.
    step("web-2's server stops");
    let up_before = wait_members(c, edge, &[("web-1", Some(1)), ("web-2", Some(1))]);
    eprintln!("web-2 up (waited {up_before:?})");
    let no_backend = |c: &Cluster, edge: &PublicEdge| {
        edge.metric(c, "vnp_gateway_drops_total", &[("reason", "no_backend")])
            .unwrap()
    };
    // (Before the servers listened, the first checks failed and emptied the pool for a moment.)
    let no_backend_before = no_backend(c, edge);
    servers[1].kill().unwrap();
    let took = wait_members(c, edge, &[("web-1", Some(1)), ("web-2", Some(0))]);
    let detection = Duration::from_millis(INTERVAL_MS * u64::from(FALL) + TIMEOUT_MS);
    eprintln!("web-2 out after {took:?} (interval x fall + timeout = {detection:?})");
    // The scrape loop polls every 200 ms and a check may just have started when it died.
    assert!(
        took <= detection + Duration::from_millis(INTERVAL_MS + 700),
        "web-2 left the pool after {took:?}"
    );
    wait_published(c, "web-2", false);
    let (counts, _) = connect_many(edge, 100);
    eprintln!("answers with web-2 down: {counts:?}");
    assert_eq!(counts.get("web-1"), Some(&100), "{counts:?}");
    assert_eq!(
        no_backend(c, edge),
        no_backend_before,
        "web-1 was never lost"
    );
    step("web-2's server starts again");
    servers[1] = spawn_in_guest(
        &guests[1],
        "server-web-2-again",
        SERVER,
        &["web-2", &VM_PORT.to_string()],
    );
    let back = wait_members(c, edge, &[("web-1", Some(1)), ("web-2", Some(1))]);
    eprintln!("web-2 back after {back:?} (rise {RISE})");
    wait_published(c, "web-2", true);
    let (counts, _) = connect_many(edge, 200);
    eprintln!("answers with web-2 back: {counts:?}");
    assert_spread(&counts, 200, &["web-1", "web-2"]);
}

fn two_gateways_agree(
    c: &mut Cluster,
    edge: &mut PublicEdge,
    guests: &[TapGuest],
    servers: &mut Vec<ChildGuard>,
    namespaces: &mut Vec<String>,
) {
    // 4. A second gateway; UDP flows whose datagrams alternate between the two.
    step("second gateway, UDP service echo");
    for (g, vm) in guests.iter().zip(GUESTS) {
        let port = ECHO_PORT.to_string();
        servers.push(spawn_in_guest(g, &format!("echo-{vm}"), ECHO, &[vm, &port]));
    }
    let echo = spec_checked_on_web("echo", ECHO_PORT, L4Proto::Udp);
    c.registry(move |r| r.create_service(&echo)).unwrap();
    let gw2 = second_gateway(c, edge);
    namespaces.push(c.host_ns(edge.gateway_ns(gw2)).name().to_string());
    let gw1_in = edge
        .metric(c, "vnp_gateway_inbound_packets_total", &[])
        .unwrap();
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while lines.is_empty() {
        let out = edge
            .public()
            .command("python3")
            .args([
                "-c",
                ALTERNATE,
                &PUBLIC_ADDR.to_string(),
                &ECHO_PORT.to_string(),
            ])
            .args(["30", "6", &PUBLIC_HOST.to_string()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // gw2 may still be fetching tokens: its first datagrams go unanswered.
        if text.lines().count() == 30 && !text.contains("timeout") {
            lines = text.lines().map(str::to_string).collect();
        } else {
            assert!(
                Instant::now() < deadline,
                "{text}\n{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                edge.logs(c)
            );
        }
    }
    let mut per_vm: BTreeMap<String, usize> = BTreeMap::new();
    for line in &lines {
        let names: Vec<&str> = line.split(' ').collect();
        assert!(
            names.iter().all(|n| *n == names[0]),
            "a flow reached two VMs: {line}"
        );
        *per_vm.entry(names[0].to_string()).or_default() += 1;
    }
    eprintln!("alternating flows per VM: {per_vm:?}");
    assert!(per_vm.len() >= 2, "30 flows all on one VM: {per_vm:?}");
    let gw1_after = edge
        .metric(c, "vnp_gateway_inbound_packets_total", &[])
        .unwrap();
    assert!(
        gw1_after >= gw1_in + 90,
        "gw1 carried {} packets",
        gw1_after - gw1_in
    );
    // Each gateway saw every flow (its datagrams alternate): 30 new echo flows or more each
    // (more if a first attempt was retried).
    let gw1_flows = new_flows(c, edge, 0, "echo", &GUESTS);
    let gw2_flows = new_flows(c, edge, gw2, "echo", &GUESTS);
    eprintln!("new echo flows: gw1 {gw1_flows}, gw2 {gw2_flows}");
    assert!(
        gw1_flows >= 30 && gw2_flows >= 30,
        "gw1 {gw1_flows}, gw2 {gw2_flows}"
    );
}

/// Service `bulk`'s port (public and VM).
const BULK_PORT: u16 = 8000;
/// Bytes of the download.
const BULK_BYTES: usize = 8 << 20;

/// A server that listens, writes the sha256 of `size` random bytes to `out` (so the file says
/// it is ready), then sends every client its name (16 bytes) and those bytes, paced (64 KiB
/// every 16 ms: about 2 s for 8 MiB).
const BULK_SERVER: &str = r#"
import hashlib, os, socket, sys, threading, time
name, port, size, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
data = os.urandom(size)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(16)
with open(out + ".tmp", "w") as f:
    f.write(hashlib.sha256(data).hexdigest())
os.rename(out + ".tmp", out)
def serve(c):
    try:
        c.sendall(name.encode().ljust(16))
        for i in range(0, size, 65536):
            c.sendall(data[i:i + 65536])
            time.sleep(0.016)
        c.close()
    except OSError:
        pass
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Downloads from argv[1]:argv[2]; prints `vm NAME`, `progress` after 1 MiB and `done LEN
/// SHA256`. TCP keepalive after 1 s idle, as a long-lived client sets it: a receiver whose data
/// stopped still sends something, which tells the VM's host the flow's new gateway.
const BULK_CLIENT: &str = r#"
import hashlib, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
head = b""
while len(head) < 16:
    b = s.recv(16 - len(head))
    if not b:
        sys.exit("closed before the name")
    head += b
print("vm", head.decode().strip(), flush=True)
h, n, told = hashlib.sha256(), 0, False
while True:
    b = s.recv(65536)
    if not b:
        break
    h.update(b)
    n += len(b)
    if n >= 1 << 20 and not told:
        print("progress", flush=True)
        told = True
print("done", n, h.hexdigest(), flush=True)
"#;

/// The gateway the registry assigns `vm` among `gateways` (`Model::gateway_for`: rendezvous
/// hashing, FNV-1a over the VM id, a zero byte and the gateway id; the highest hash wins, ties
/// to the smaller id). Without issue #10's reply-follows-gateway every reply of the VM goes
/// there.
fn assigned_gateway(vm: &str, gateways: &[&'static str]) -> &'static str {
    let hash = |g: &str| {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in vm.bytes().chain([0u8]).chain(g.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    };
    gateways
        .iter()
        .copied()
        .max_by_key(|g| (hash(g), std::cmp::Reverse(*g)))
        .expect("a gateway")
}

/// Waits until both gateways see every `bulk` member up.
fn wait_bulk_up(c: &Cluster, edge: &PublicEdge) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up: u64 = (0..2)
            .flat_map(|i| GUESTS.iter().map(move |vm| (i, *vm)))
            .map(|(i, vm)| {
                edge.metric_n(
                    i,
                    c,
                    "vnp_gateway_lb_member_up",
                    &[("service", "bulk"), ("vm", vm)],
                )
                .unwrap_or(0)
            })
            .sum();
        if up == 2 * GUESTS.len() as u64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "bulk members up: {up}\n{}",
            edge.logs(c)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Starts a download through gateway `through` and returns it once it runs on a VM that the
/// registry assigns to that gateway (retrying new connections), with its reader and the VM.
fn download_on_assigned(
    edge: &PublicEdge,
    through: usize,
    names: [&'static str; 2],
) -> (ChildGuard, BufReader<std::process::ChildStdout>, String) {
    edge.route_public_via(through).unwrap();
    for attempt in 0..30 {
        let mut cmd = edge.public().command("python3");
        cmd.args(["-c", BULK_CLIENT, &PUBLIC_ADDR.to_string()])
            .arg(BULK_PORT.to_string())
            .stdout(Stdio::piped());
        let mut child = ChildGuard::spawn(&format!("bulk-client-{attempt}"), &mut cmd, None)
            .expect("bulk client");
        let mut out = BufReader::new(child.take_stdout().expect("client stdout"));
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let vm = line.trim().strip_prefix("vm ").unwrap_or("").to_string();
        assert!(
            !vm.is_empty(),
            "no answer: {line:?}\n{}",
            child.stderr_tail()
        );
        if assigned_gateway(&vm, &names) == names[through] {
            return (child, out, vm);
        }
    }
    panic!(
        "no download landed on a VM assigned to {} in 30 tries",
        names[through]
    );
}

fn gateway_killed_mid_transfer(
    c: &mut Cluster,
    edge: &mut PublicEdge,
    guests: &[TapGuest],
    servers: &mut Vec<ChildGuard>,
) {
    // 5. A download through the gateway a VM's replies used to go to; that gateway dies.
    step("service bulk, a download, its gateway killed");
    let names = ["gw1", "gw2"];
    for (g, vm) in guests.iter().zip(GUESTS) {
        let sha = c.dir().join(format!("bulk-{vm}.sha256"));
        let args = [
            vm,
            &BULK_PORT.to_string(),
            &BULK_BYTES.to_string(),
            sha.to_str().unwrap(),
        ];
        servers.push(spawn_in_guest(g, &format!("bulk-{vm}"), BULK_SERVER, &args));
    }
    let bulk = spec_checked_on_web("bulk", BULK_PORT, L4Proto::Tcp);
    c.registry(move |r| r.create_service(&bulk)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    for vm in GUESTS {
        let sha = c.dir().join(format!("bulk-{vm}.sha256"));
        while !sha.exists() {
            assert!(
                Instant::now() < deadline,
                "bulk server on {vm} not listening"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    wait_bulk_up(c, edge);
    // The gateway to kill: one that some guest is assigned to (gw1 if it has any).
    let through = (0..2)
        .find(|&i| {
            GUESTS
                .iter()
                .any(|vm| assigned_gateway(vm, &names) == names[i])
        })
        .expect("every guest has a gateway");
    let other = 1 - through;
    let (mut client, mut out, vm) = download_on_assigned(edge, through, names);
    eprintln!(
        "download on {vm} through {} (its assigned gateway)",
        names[through]
    );
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "progress", "{}", client.stderr_tail());
    let placed_before = new_flows(c, edge, other, "bulk", &[&vm]);
    edge.kill_gateway_n(through).unwrap();
    edge.route_public_via(other).unwrap();
    let killed = Instant::now();
    step("gateway killed, public route moved");
    line.clear();
    out.read_line(&mut line).unwrap();
    let done: Vec<&str> = line.split_whitespace().collect();
    assert!(
        done.len() == 3 && done[0] == "done",
        "download did not finish: {line:?}\n{}\n{}",
        client.stderr_tail(),
        edge.logs(c)
    );
    eprintln!("download finished {:?} after the kill", killed.elapsed());
    let _ = client.kill();
    let sent = std::fs::read_to_string(c.dir().join(format!("bulk-{vm}.sha256"))).unwrap();
    assert_eq!(done[1], BULK_BYTES.to_string(), "length");
    assert_eq!(done[2], sent.trim(), "sha256 of what {vm} sent");
    // The surviving gateway placed the flow by itself (its flow table never saw it), on the
    // same VM.
    let placed_after = new_flows(c, edge, other, "bulk", &[&vm]);
    assert!(
        placed_after > placed_before,
        "{} never placed the flow",
        names[other]
    );
}

#[test]
fn a_service_spreads_connections_over_its_guests_transparently() {
    let mut c = Cluster::start(&ClusterOptions {
        prefix: "vnplb".into(),
        ..ClusterOptions::default()
    })
    .expect("cluster");
    let dir = c.dir().to_path_buf();
    let mut namespaces = c.namespace_names();
    let mut guests: Vec<TapGuest> = Vec::new();
    for (i, vm) in GUESTS.iter().enumerate() {
        c.create_vm(vm, i % 2, &["web"]).unwrap();
        let att = c.attach(i % 2, vm).unwrap();
        guests.push(c.tap_guest(&att, true).expect("guest"));
    }
    let guest_namespaces: Vec<String> = guests.iter().map(|g| g.netns().name().into()).collect();
    let mut edge = PublicEdge::create(&mut c, "gw1", NETWORK).expect("public edge");
    namespaces.extend(edge.namespace_names());
    edge.start_gateway(&c, GUESTS.len() as u64)
        .unwrap_or_else(|e| panic!("{e}\n{}", edge.logs(&c)));
    // Servers die before their guests' namespaces (declared after them).
    let mut servers = Vec::new();
    for (g, vm) in guests.iter().zip(GUESTS) {
        let port = VM_PORT.to_string();
        servers.push(spawn_in_guest(
            g,
            &format!("server-{vm}"),
            SERVER,
            &[vm, &port],
        ));
    }

    // 1. The service, created while the gateway runs; 300 connections.
    step("create service web");
    let spec = spec_web();
    c.registry(move |r| r.create_service(&spec)).unwrap();
    wait_members(&c, &edge, &GUESTS.map(|g| (g, Some(1))));
    // The gateway publishes its first view of a service created after it started.
    for g in GUESTS {
        wait_published(&c, g, true);
    }
    // Servers may still be starting: one connection through each first.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let probe = run_client(&edge, 3);
        if String::from_utf8_lossy(&probe.stdout).contains("failed 0") {
            break;
        }
        assert!(Instant::now() < deadline, "no answer\n{}", edge.logs(&c));
        std::thread::sleep(Duration::from_millis(300));
    }
    step("300 connections");
    let (counts, clients) = connect_many(&edge, 300);
    eprintln!("answers: {counts:?}; clients seen: {clients:?}");
    assert_eq!(
        clients,
        vec![PUBLIC_HOST.to_string()],
        "source NAT on the way in"
    );
    assert_spread(&counts, 300, &GUESTS);
    let placed = new_flows(&c, &edge, 0, "web", &GUESTS);
    assert!(placed >= 300, "gateway counted {placed} new flows");

    held_connection_and_pool_removal(&c, &edge);
    health_checks_take_a_member_out_and_back(&c, &edge, &guests, &mut servers);
    two_gateways_agree(&mut c, &mut edge, &guests, &mut servers, &mut namespaces);
    gateway_killed_mid_transfer(&mut c, &mut edge, &guests, &mut servers);

    drop(servers);
    drop(edge);
    drop(guests);
    for n in &guest_namespaces {
        assert!(
            !vnp_testkit::netns::namespace_exists(n),
            "guest namespace {n} left behind"
        );
    }
    drop(c);
    assert_nothing_left(&dir, &namespaces);
}
