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
//!    every answer from one guest: the two gateways chose the same VM without talking.
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

/// Answers per guest (and the client addresses the guests saw) of `n` connections.
fn connect_many(edge: &PublicEdge, n: usize) -> (BTreeMap<String, usize>, Vec<String>) {
    let out = edge
        .public()
        .command("python3")
        .args([
            "-c",
            CLIENT,
            &PUBLIC_ADDR.to_string(),
            &PUBLIC_PORT.to_string(),
        ])
        .arg(n.to_string())
        .output()
        .expect("run the client");
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
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = c.registry(|r| r.get_service("web")).unwrap();
        let seen = st
            .views
            .iter()
            .filter(|v| v.gateway == "gw1")
            .flat_map(|v| v.members.iter())
            .find(|m| m.vm == vm)
            .map(|m| m.up);
        if seen == Some(up) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "registry shows {vm} as {seen:?}: {:?}",
            st.views
        );
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
    s.close()
"#;

/// gw2's side of the public segment and the public namespace's route to it for marked packets.
const GW2_PUBLIC: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);
const PUBLIC_HOST_2: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const ECHO_PORT: u16 = 5353;

/// Sum of the gateway's new `echo` flows (its Prometheus text at `addr`, from namespace `ns`).
fn echo_new_flows(c: &Cluster, ns: usize, addr: std::net::SocketAddr) -> u64 {
    let text = c
        .host_ns(ns)
        .enter(move || -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")?;
            let mut out = String::new();
            std::io::Read::read_to_string(&mut s, &mut out)?;
            Ok(out)
        })
        .unwrap()
        .unwrap();
    GUESTS
        .iter()
        .filter_map(|vm| {
            vnpd::metrics::prometheus::sample_value(
                &text,
                "vnp_gateway_lb_new_flows_total",
                &[("service", "echo"), ("vm", vm)],
            )
        })
        .sum()
}

/// Registers gateway gw2 on the public address, wires its namespace (TUN, a second segment to
/// the public namespace, routes both ways, marked packets of the public namespace via gw2) and
/// starts it. Returns it with its namespace's name.
fn second_gateway(
    c: &mut Cluster,
    edge: &PublicEdge,
) -> (ChildGuard, String, usize, std::net::SocketAddr) {
    let tls = c.tls_dir().to_path_buf();
    let out = std::process::Command::new(&c.bins().vnpctl)
        .args(["cert", "gateway", "--dir"])
        .arg(&tls)
        .args(["--id", "gw2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ns, addr) = c.add_namespace("vnpgw").unwrap();
    let spec = GatewaySpec {
        id: "gw2".into(),
        network: NETWORK.into(),
        underlay_addr: addr,
        port: vnp_e2e::edge::GATEWAY_PORT,
        public_addr: Some(PUBLIC_ADDR),
    };
    c.registry(move |r| r.create_gateway(&spec)).unwrap();
    let gw = c.host_ns(ns);
    let public = edge.public();
    gw.veth_to("pub1", Some((GW2_PUBLIC, 24)), public, "pub1")
        .unwrap();
    let host2 = format!("{PUBLIC_HOST_2}/24");
    public.ip(&["addr", "add", &host2, "dev", "pub1"]).unwrap();
    let public_addr = format!("{PUBLIC_ADDR}/32");
    let via = GW2_PUBLIC.to_string();
    public
        .ip(&["route", "add", &public_addr, "via", &via, "table", "101"])
        .unwrap();
    public
        .ip(&["rule", "add", "fwmark", "1", "table", "101"])
        .unwrap();
    for (netns, what) in [(public, "all"), (public, "pub1"), (public, "br0")] {
        netns
            .run(&[
                "sysctl",
                "-qw",
                &format!("net.ipv4.conf.{what}.rp_filter=0"),
            ])
            .unwrap();
    }
    gw.ip(&["tuntap", "add", "dev", "vnpgw0", "mode", "tun"])
        .unwrap();
    gw.ip(&["link", "set", "vnpgw0", "up"]).unwrap();
    gw.ip(&["route", "add", &public_addr, "dev", "vnpgw0"])
        .unwrap();
    let client = format!("{PUBLIC_HOST}/32");
    let back = PUBLIC_HOST_2.to_string();
    gw.ip(&["route", "add", &client, "via", &back]).unwrap();
    gw.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]).unwrap();
    // Health-check answers relayed by gw1 arrive on the underlay for an address routed into
    // the TUN: loose reverse-path filtering.
    for what in ["all", "default"] {
        gw.run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{what}.rp_filter=2"),
        ])
        .unwrap();
    }
    let child = ChildGuard::spawn(
        "vnp-gateway-gw2",
        gw.command(&c.bins().gateway)
            .args(["--registry", &c.registry_url()])
            .arg("--ca")
            .arg(tls.join("ca.pem"))
            .arg("--cert")
            .arg(tls.join("gateway-gw2.pem"))
            .arg("--key")
            .arg(tls.join("gateway-gw2.key"))
            .args(["--tun", "vnpgw0", "--metrics", &format!("{addr}:9465")])
            .stdout(Stdio::null()),
        Some(&c.dir().join("gateway-gw2.log")),
    )
    .unwrap();
    // gw2's checks (whose answers may come back through gw1) find every member up, and gw2
    // published that through the registry.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = c.registry(|r| r.get_service("echo")).unwrap();
        let ups = st
            .views
            .iter()
            .filter(|v| v.gateway == "gw2")
            .flat_map(|v| v.members.iter())
            .filter(|m| m.up)
            .count();
        if ups == GUESTS.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gw2's view: {:?}\n{}",
            st.views,
            child.stderr_tail()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let metrics = std::net::SocketAddr::from((addr, 9465));
    (child, gw.name().to_string(), ns, metrics)
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
    for vm in ["web-1", "web-2"] {
        let k = counts.get(vm).copied().unwrap_or(0);
        assert!(
            within_binomial(k, 200, 0.5),
            "{vm}: {k} of 200 ({counts:?})"
        );
    }
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
    let mut cmd = guests[1].netns().command("python3");
    cmd.args(["-c", SERVER, "web-2", &VM_PORT.to_string()]);
    servers[1] = ChildGuard::spawn("server-web-2-again", &mut cmd, None).unwrap();
    let back = wait_members(c, edge, &[("web-1", Some(1)), ("web-2", Some(1))]);
    eprintln!("web-2 back after {back:?} (rise {RISE})");
    wait_published(c, "web-2", true);
    let (counts, _) = connect_many(edge, 200);
    eprintln!("answers with web-2 back: {counts:?}");
    for vm in ["web-1", "web-2"] {
        let k = counts.get(vm).copied().unwrap_or(0);
        assert!(
            within_binomial(k, 200, 0.5),
            "{vm}: {k} of 200 ({counts:?})"
        );
    }
}

fn two_gateways_agree(
    c: &mut Cluster,
    edge: &PublicEdge,
    guests: &[TapGuest],
    servers: &mut Vec<ChildGuard>,
    namespaces: &mut Vec<String>,
) {
    // 4. A second gateway; UDP flows whose datagrams alternate between the two.
    step("second gateway, UDP service echo");
    for (g, vm) in guests.iter().zip(GUESTS) {
        let mut cmd = g.netns().command("python3");
        cmd.args(["-c", ECHO, vm, &ECHO_PORT.to_string()]);
        servers.push(ChildGuard::spawn(&format!("echo-{vm}"), &mut cmd, None).unwrap());
    }
    let echo = ServiceSpec {
        id: "echo".into(),
        public_port: ECHO_PORT,
        proto: L4Proto::Udp,
        vm_port: Some(ECHO_PORT),
        members: GUESTS.iter().map(|g| member(g)).collect(),
        health: HealthCheckSpec {
            port: Some(VM_PORT),
            ..HealthCheckSpec::default()
        },
        table_size: None,
        ..spec_web()
    };
    c.registry(move |r| r.create_service(&echo)).unwrap();
    let (gw2, gw2_ns, gw2_index, gw2_metrics) = second_gateway(c, edge);
    namespaces.push(gw2_ns);
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
                gw2.stderr_tail()
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
    let gw1_flows: u64 = GUESTS
        .iter()
        .map(|vm| {
            edge.metric(
                c,
                "vnp_gateway_lb_new_flows_total",
                &[("service", "echo"), ("vm", vm)],
            )
            .unwrap()
        })
        .sum();
    let gw2_flows = echo_new_flows(c, gw2_index, gw2_metrics);
    eprintln!("new echo flows: gw1 {gw1_flows}, gw2 {gw2_flows}");
    assert!(
        gw1_flows >= 30 && gw2_flows >= 30,
        "gw1 {gw1_flows}, gw2 {gw2_flows}"
    );
    drop(gw2);
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
        let mut cmd = g.netns().command("python3");
        cmd.args(["-c", SERVER, vm, &VM_PORT.to_string()]);
        servers.push(ChildGuard::spawn(&format!("server-{vm}"), &mut cmd, None).unwrap());
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
        let probe = edge
            .public()
            .command("python3")
            .args([
                "-c",
                CLIENT,
                &PUBLIC_ADDR.to_string(),
                &PUBLIC_PORT.to_string(),
                "3",
            ])
            .output()
            .unwrap();
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
    for vm in GUESTS {
        let k = counts.get(vm).copied().unwrap_or(0);
        assert!(
            within_binomial(k, 300, 1.0 / 3.0),
            "{vm}: {k} of 300 ({counts:?})"
        );
    }
    let new_flows: u64 = GUESTS
        .iter()
        .map(|vm| {
            edge.metric(
                &c,
                "vnp_gateway_lb_new_flows_total",
                &[("service", "web"), ("vm", vm)],
            )
            .unwrap()
        })
        .sum();
    assert!(new_flows >= 300, "gateway counted {new_flows} new flows");

    held_connection_and_pool_removal(&c, &edge);
    health_checks_take_a_member_out_and_back(&c, &edge, &guests, &mut servers);
    two_gateways_agree(&mut c, &edge, &guests, &mut servers, &mut namespaces);

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
