//! State that moves with a live-migrating VM (issue #12): a real QEMU guest holds a TCP
//! connection through vnpd's NAT and `vnp-gateway` to an echo server on the public side, and
//! a metadata session token, while it migrates live from host 0 to host 1. After the move the
//! connection is the same one (the server saw one connection, and the NAT table on host 1
//! holds the flow on the same public port), it keeps exchanging data both ways (every
//! numbered line arrives, in order, at the server and back at the guest), and the session
//! token from before is still accepted. A public client's connection through load-balanced
//! service `mig` on the same gateway, to a listener in vm-a, also goes on from host 1: the
//! gateway follows the VM like any sender (every line in order, the flow placed once).
//! Without the hand-off the destination has no flow for the guest's segments
//! (`tx_nat_no_flow`) and no session for the token (401).
//!
//! Needs root (namespaces, TUN), QEMU 10 and the guest image (`scripts/setup`), python3.
//! Run: `cargo test -p vnp-e2e --test migration_state -- --nocapture`.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qemu_launch::{migrate, Guest, MigrateOptions};
use vnp_e2e::cluster::{assert_nothing_left, wait_dhcp, Cluster, ClusterOptions, NETWORK};
use vnp_e2e::edge::{PublicEdge, PUBLIC_ADDR, PUBLIC_HOST};
use vnp_e2e::migration::{begin_migration, destination_spec, wait_endpoint_on};
use vnp_registry_client::api::{HealthCheckSpec, L4Proto, PoolMember, ServiceSpec};
use vnpd_admin_api::NatInfo;

const CMD: Duration = Duration::from_secs(60);
const ECHO_PORT: u16 = 9000;
/// Load-balanced service `mig`: the public address's port -> the same port of vm-a.
const LB_PORT: u16 = 7000;
/// Where the gateway's health checks connect on vm-a (the service port takes one connection).
const LB_HEALTH_PORT: u16 = 7001;

/// A client on the public side: one TCP connection to argv[1]:argv[2], a numbered line every
/// 50 ms until file argv[3] exists; then prints how many it sent. A broken connection ends it
/// with an error.
const LB_CLIENT: &str = r#"
import os, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
i = 0
while not os.path.exists(sys.argv[3]):
    s.sendall(b"%d\n" % i)
    i += 1
    time.sleep(0.05)
s.close()
print(i, flush=True)
"#;

/// Seconds of a session's TTL (long: it must outlive the test).
const SESSION_TTL: u32 = 3600;

/// A TCP echo server on argv[2]:argv[3]; connection n's received bytes go to argv[1]/recv-n,
/// and each accept is logged on stderr.
const ECHO_SERVER: &str = r#"
import socket, sys, threading
d, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(8)
def serve(c, n):
    with open("%s/recv-%d" % (d, n), "wb") as f:
        while True:
            b = c.recv(65536)
            if not b:
                break
            f.write(b)
            f.flush()
            c.sendall(b)
    c.close()
n = 0
while True:
    c, a = srv.accept()
    n += 1
    sys.stderr.write("conn %d from %s:%d\n" % (n, a[0], a[1]))
    sys.stderr.flush()
    threading.Thread(target=serve, args=(c, n), daemon=True).start()
"#;

fn step(what: &str) {
    eprintln!("[migration_state] {what}");
}

/// The numbered lines are exactly 0, 1, ..., n-1.
fn lines_complete(text: &str, n: u64) -> bool {
    let mut count = 0u64;
    for (i, line) in text.lines().enumerate() {
        if line.trim().parse::<u64>() != Ok(i as u64) {
            return false;
        }
        count += 1;
    }
    count == n
}

/// The status code of a raw HTTP answer.
fn http_status(answer: &str) -> Option<u16> {
    answer
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The body of a raw HTTP answer.
fn http_body(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

#[test]
fn http_and_stream_helpers() {
    assert!(lines_complete("0\n1\n2\n", 3));
    assert!(!lines_complete("0\n2\n", 2));
    assert!(!lines_complete("0\n1\n", 3));
    let a = "HTTP/1.1 401 Unauthorized\r\nA: b\r\n\r\nno\n";
    assert_eq!(http_status(a), Some(401));
    assert_eq!(http_body(a), "no\n");
}

/// One metadata request with busybox `nc`: the raw answer.
fn metadata(g: &mut Guest, method: &str, path: &str, headers: &[String]) -> String {
    let mut req = format!(
        "{method} /computeMetadata/v1/{path} HTTP/1.1\\r\\nHost: metadata.google.internal\\r\\n\
         Metadata-Flavor: Google\\r\\nConnection: close\\r\\n"
    );
    for h in headers {
        req.push_str(&format!("{h}\\r\\n"));
    }
    req.push_str("\\r\\n");
    let cmd = format!("(printf '{req}'; sleep 2) | timeout 10 nc 169.254.169.254 80");
    let out = g.run(&cmd, CMD).unwrap_or_else(|e| panic!("{cmd}: {e}"));
    out.stdout
}

fn token_header(token: &str) -> Vec<String> {
    vec![format!("X-Metadata-Token: {token}")]
}

fn wait_listening(edge: &PublicEdge, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let up = edge
            .public()
            .enter(move || TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok())
            .unwrap_or(false);
        if up {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("nothing listens on {addr} in the public namespace");
}

/// Lines the server has received on connection `n`.
fn server_lines(dir: &Path, n: u32) -> u64 {
    std::fs::read_to_string(dir.join(format!("recv-{n}")))
        .map(|t| t.lines().count() as u64)
        .unwrap_or(0)
}

/// Lines vm-a's service listener has received from the load-balanced connection.
fn lb_lines(g: &mut Guest) -> u64 {
    g.run("wc -l < /tmp/lb.in", CMD)
        .ok()
        .and_then(|o| o.stdout.trim().parse().ok())
        .unwrap_or(0)
}

/// Service `mig` on the gateway: public [`LB_PORT`] -> vm-a's, health-checked by a TCP
/// connect to [`LB_HEALTH_PORT`].
fn service_mig() -> ServiceSpec {
    ServiceSpec {
        id: "mig".into(),
        public_addr: PUBLIC_ADDR,
        public_port: LB_PORT,
        proto: L4Proto::Tcp,
        vm_port: Some(LB_PORT),
        members: vec![PoolMember {
            vm: Some("vm-a".into()),
            tag: None,
            weight: 1,
        }],
        health: HealthCheckSpec {
            port: Some(LB_HEALTH_PORT),
            ..HealthCheckSpec::default()
        },
        table_size: None,
    }
}

/// vm-a listens on the service port (one connection, lines to /tmp/lb.in) and answers health
/// checks; the gateway takes vm-a in; a public client connects through the service.
fn hold_load_balanced_connection(c: &Cluster, edge: &mut PublicEdge, ga: &mut Guest, dir: &Path) {
    ga.run_ok(
        &format!(
            "(while true; do nc -l -p {LB_HEALTH_PORT} < /dev/null > /dev/null 2>&1; done) \
             > /dev/null 2>&1 & nc -l -p {LB_PORT} > /tmp/lb.in 2> /tmp/lb.err &"
        ),
        CMD,
    )
    .unwrap();
    let spec = service_mig();
    c.registry(move |r| r.create_service(&spec)).unwrap();
    let labels = [("service", "mig"), ("vm", "vm-a")];
    assert!(
        eventually(Duration::from_secs(30), || edge
            .metric(c, "vnp_gateway_lb_member_up", &labels)
            .unwrap_or(0)
            == 1),
        "the gateway never took vm-a into service mig\n{}",
        edge.logs(c)
    );
    let stop = dir.join("lb-stop");
    edge.spawn_public(
        "lb-client",
        "python3",
        &[
            "-u",
            "-c",
            LB_CLIENT,
            &PUBLIC_ADDR.to_string(),
            &LB_PORT.to_string(),
            stop.to_str().unwrap(),
        ],
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || lb_lines(ga) > 10),
        "no lines through the load balancer\n{}",
        edge.logs(c)
    );
}

/// The mapped port of `nat`'s TCP flow to the echo server.
fn echo_flow_port(nat: &NatInfo) -> Option<u16> {
    nat.flows
        .iter()
        .find(|f| {
            f.proto == "tcp"
                && SocketAddr::from((f.remote, f.remote_port))
                    == SocketAddr::from((PUBLIC_HOST, ECHO_PORT))
        })?
        .mapped
}

/// Waits until `done` holds, polling every 200 ms; whether it did within `within`.
fn eventually(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// vm-a migrates from host 0 to host 1 (registry announce, incoming attach, QEMU migrate);
/// returns the guest on host 1 once host 1 registered the endpoint.
fn migrate_to_host1(c: &Cluster, ga: &mut Guest, dir: &Path) -> Guest {
    let att = begin_migration(c, "vm-a", 1).unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let spec = destination_spec(ga, &att.socket_path, "vm-a-dst", dir).unwrap();
    let (ga2, report) = migrate(ga, spec, &MigrateOptions::default())
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    eprintln!("  {report:?}");
    wait_endpoint_on(c, "vm-a", 1, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("on resume: {e}\n{}", c.logs()));
    ga2
}

#[test]
fn nat_flows_and_metadata_sessions_move_with_the_vm() {
    let mut c = Cluster::start(&ClusterOptions {
        prefix: "vnps".into(),
        ..ClusterOptions::default()
    })
    .expect("cluster");
    c.create_vm("vm-a", 0, &[]).unwrap();
    let mut edge = PublicEdge::create(&mut c, "gw1", NETWORK).expect("public edge");
    let dir = c.dir().to_path_buf();
    let mut namespaces = c.namespace_names();
    namespaces.extend(edge.namespace_names());
    edge.start_gateway(&c, 1)
        .unwrap_or_else(|e| panic!("{e}\n{}", edge.logs(&c)));
    let recv_dir: PathBuf = dir.join("echo");
    std::fs::create_dir_all(&recv_dir).unwrap();
    let server = edge
        .spawn_public(
            "echo-server",
            "python3",
            &[
                "-u",
                "-c",
                ECHO_SERVER,
                recv_dir.to_str().unwrap(),
                &PUBLIC_HOST.to_string(),
                &ECHO_PORT.to_string(),
            ],
        )
        .unwrap();
    wait_listening(&edge, SocketAddr::from((PUBLIC_HOST, ECHO_PORT)));
    // The listening probe was connection 1; the guest's is 2.
    const GUEST_CONN: u32 = 2;
    let logs = |c: &Cluster, edge: &PublicEdge| format!("{}{}", c.logs(), edge.logs(c));

    step("the network requires metadata session tokens; vm-a boots on host 0");
    c.vnpctl(&["project", "set", NETWORK, "--require-session-token", "true"])
        .unwrap();
    let att = c.attach(0, "vm-a").unwrap();
    let mut ga = c.launch_guest(&att).unwrap();
    wait_dhcp(&mut ga).unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));

    step("a session token on host 0; requests need it");
    let ttl = format!("X-Metadata-Token-TTL-Seconds: {SESSION_TTL}");
    let answer = metadata(&mut ga, "PUT", "token", &[ttl]);
    assert_eq!(http_status(&answer), Some(200), "{answer}\n{}", c.logs());
    let token = http_body(&answer).trim().to_string();
    assert_eq!(token.len(), 64, "{answer}");
    let with = metadata(&mut ga, "GET", "instance/name", &token_header(&token));
    assert_eq!(http_status(&with), Some(200), "{with}");
    assert_eq!(http_body(&with).trim(), "vm-a");
    let without = metadata(&mut ga, "GET", "instance/name", &[]);
    assert_eq!(http_status(&without), Some(401), "{without}");

    step("vm-a holds a TCP connection to the public echo server through NAT and the gateway");
    ga.run_ok(
        &format!(
            "(i=0; while [ ! -e /tmp/stop ]; do echo $i; i=$((i+1)); usleep 50000; done; \
             echo $i > /tmp/sent; sleep 5) | nc {PUBLIC_HOST} {ECHO_PORT} > /tmp/echo.log \
             2>/tmp/nc.err &"
        ),
        CMD,
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || server_lines(
            &recv_dir, GUEST_CONN
        ) > 10),
        "no data at the echo server\n{}",
        logs(&c, &edge)
    );
    let nat0 = c.host(0).admin().nat("vm-a").unwrap();
    let port = echo_flow_port(&nat0).unwrap_or_else(|| panic!("no flow in {nat0:?}"));
    eprintln!("  the connection leaves host 0 on NAT port {port}");

    step("a public client holds a connection to vm-a through load-balanced service mig");
    hold_load_balanced_connection(&c, &mut edge, &mut ga, &dir);

    step("vm-a migrates live to host 1");
    let before = server_lines(&recv_dir, GUEST_CONN);
    let mut ga2 = migrate_to_host1(&c, &mut ga, &dir);
    drop(ga);

    step("the connection goes on from host 1: same flow, same port, data both ways");
    let after_move = server_lines(&recv_dir, GUEST_CONN);
    assert!(
        eventually(Duration::from_secs(30), || {
            server_lines(&recv_dir, GUEST_CONN) > after_move.max(before) + 40
        }),
        "the stream stopped after the migration ({before} lines before, {} now)\n{}",
        server_lines(&recv_dir, GUEST_CONN),
        logs(&c, &edge)
    );
    let nat1 = c.host(1).admin().nat("vm-a").unwrap();
    assert_eq!(
        echo_flow_port(&nat1),
        Some(port),
        "host 1's NAT table: {nat1:?}"
    );

    step("the load-balanced connection goes on: the gateway follows vm-a to host 1");
    let lb_after_move = lb_lines(&mut ga2);
    assert!(
        eventually(Duration::from_secs(30), || lb_lines(&mut ga2)
            > lb_after_move + 40),
        "the load-balanced stream stopped after the migration ({lb_after_move} lines)\n{}",
        logs(&c, &edge)
    );
    // By now the gateway sends to host 1 itself: host 0 forwards nothing more for vm-a.
    let hairpinned = |c: &Cluster| {
        c.metric(0, "vnpd_hairpin_forwarded_total", &[("vm", "vm-a")])
            .unwrap()
    };
    let (h1, lines1) = (hairpinned(&c), lb_lines(&mut ga2));
    assert!(
        eventually(Duration::from_secs(30), || lb_lines(&mut ga2) > lines1 + 40),
        "the load-balanced stream stopped\n{}",
        logs(&c, &edge)
    );
    let h2 = hairpinned(&c);
    assert_eq!(
        h1, h2,
        "host 0 still hairpins vm-a's traffic: the gateway did not follow the move"
    );
    std::fs::write(dir.join("lb-stop"), b"").unwrap();
    // The client's last line is in flight at most.
    std::thread::sleep(Duration::from_millis(300));
    let lb_flows = edge
        .metric(
            &c,
            "vnp_gateway_lb_new_flows_total",
            &[("service", "mig"), ("vm", "vm-a")],
        )
        .unwrap();
    assert_eq!(lb_flows, 1, "one load-balanced connection, placed once");
    let lb_in = ga2.run("cat /tmp/lb.in", CMD).unwrap().stdout;
    let lb_sent = lb_in.lines().count() as u64;
    assert!(
        lines_complete(&lb_in, lb_sent),
        "the load-balanced stream arrived broken"
    );
    eprintln!("  {lb_sent} load-balanced lines in order, one flow");

    step("the session token from host 0 is accepted on host 1");
    let with = metadata(&mut ga2, "GET", "instance/name", &token_header(&token));
    assert_eq!(
        http_status(&with),
        Some(200),
        "old token after the move: {with}\n{}",
        c.logs()
    );
    let without = metadata(&mut ga2, "GET", "instance/name", &[]);
    assert_eq!(http_status(&without), Some(401), "{without}");

    step("the stream ends: every line at the server and back at the guest, one connection");
    ga2.run_ok("touch /tmp/stop", CMD).unwrap();
    let mut sent = None;
    assert!(
        eventually(Duration::from_secs(30), || {
            sent = ga2
                .run("cat /tmp/sent", CMD)
                .ok()
                .and_then(|o| o.stdout.trim().parse::<u64>().ok());
            sent.is_some()
        }),
        "the sender did not finish\n{}",
        c.logs()
    );
    let sent = sent.unwrap();
    assert!(
        eventually(Duration::from_secs(30), || server_lines(
            &recv_dir, GUEST_CONN
        ) >= sent),
        "server: {} of {sent} lines\n{}",
        server_lines(&recv_dir, GUEST_CONN),
        logs(&c, &edge)
    );
    let at_server = std::fs::read_to_string(recv_dir.join(format!("recv-{GUEST_CONN}"))).unwrap();
    assert!(
        lines_complete(&at_server, sent),
        "server got a broken stream"
    );
    let mut echoed = String::new();
    assert!(
        eventually(Duration::from_secs(30), || {
            echoed = ga2
                .run("cat /tmp/echo.log", CMD)
                .map(|o| o.stdout)
                .unwrap_or_default();
            echoed.lines().count() as u64 >= sent
        }),
        "guest got {} of {sent} echoed lines",
        echoed.lines().count()
    );
    assert!(lines_complete(&echoed, sent), "the echo came back broken");
    let accepts = edge.public_stderr(server);
    assert_eq!(
        accepts.lines().filter(|l| l.starts_with("conn ")).count(),
        GUEST_CONN as usize,
        "the guest reconnected: {accepts}"
    );
    eprintln!("  {sent} lines ({before} before the move), all echoed, one connection");

    step("the hand-off is counted on both hosts");
    let exported = c
        .metric(0, "vnpd_migration_state_total", &[("event", "export")])
        .unwrap();
    let imported = c
        .metric(1, "vnpd_migration_state_total", &[("event", "import")])
        .unwrap();
    assert_eq!((exported, imported), (1, 1));
    let flows = c
        .metric(
            1,
            "vnpd_migration_state_total",
            &[("event", "flow_imported")],
        )
        .unwrap();
    let sessions = c
        .metric(
            1,
            "vnpd_migration_state_total",
            &[("event", "session_imported")],
        )
        .unwrap();
    assert!(
        flows >= 1 && sessions >= 1,
        "{flows} flows, {sessions} sessions"
    );
    if let Some(l) = c
        .host(1)
        .vnpd_stderr()
        .lines()
        .find(|l| l.contains("migration state taken"))
    {
        eprintln!("  host 1: {l}");
    }

    drop(ga2);
    drop(edge);
    drop(c);
    assert_nothing_left(&dir, &namespaces);
}
