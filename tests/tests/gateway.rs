//! Guests and the public network through vnpd's per-VM NAT and `vnp-gateway`, all real: a
//! registry over mutual TLS, two vnpd hosts in namespaces with a QEMU guest each, a gateway
//! in its own underlay namespace with a TUN, and a "public" namespace (203.0.113.0/24) with a
//! Python HTTP server (see `vnp_e2e::edge`). One cluster serves every assertion:
//!
//! 1. vm-a downloads a few MiB from the public server with busybox `wget`; the sha256 matches,
//!    vnpd's NAT table shows the flow on a port of vm-a's NAT blocks, and the server saw that
//!    port on the gateway's public address;
//! 2. a public client fetches a file from vm-b's busybox `httpd` through a port-forwarding
//!    rule added while the gateway runs; the sha256 matches;
//! 3. the gateway is killed and started again while vm-a downloads a slowly served file: the
//!    download completes intact (return traffic needs no gateway state).
//!
//! Needs root (namespaces, TUN), QEMU and the guest image (`scripts/setup`), python3. (No
//! `wget -T`: the static busybox 1.35 of the guest image segfaults with it.)
//! Run: `cargo test -p vnp-e2e --test gateway -- --nocapture`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use qemu_launch::Guest;
use vnp_e2e::cluster::{assert_nothing_left, Cluster, ClusterOptions, NETWORK};
use vnp_e2e::edge::{PublicEdge, PUBLIC_ADDR, PUBLIC_HOST};
use vnp_registry_client::{ForwardSpec, L4Proto};
use vnpd_admin_api::NatInfo;

const CMD: Duration = Duration::from_secs(120);
const HTTP_PORT: u16 = 8000;
/// Size of the file the guest downloads.
const BLOB_BYTES: usize = 4 << 20;
/// The public port forwarded to vm-b's port 80.
const FORWARDED_PORT: u16 = 8080;

/// An HTTP server for the directory in argv[1] that logs each request's client address and
/// port, and serves `/slow` (the file `blob`) in 64 KiB chunks 100 ms apart (about 6 s).
const SERVER: &str = r#"
import functools, http.server, os, sys, time
root = sys.argv[1]
class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, fmt, *args):
        sys.stderr.write("client %s:%d %s\n" % (self.client_address + (fmt % args,)))
        sys.stderr.flush()
    def do_GET(self):
        if self.path != "/slow":
            return super().do_GET()
        data = open(os.path.join(root, "blob"), "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        for i in range(0, len(data), 65536):
            self.wfile.write(data[i:i + 65536])
            self.wfile.flush()
            time.sleep(0.1)
server = http.server.ThreadingHTTPServer((sys.argv[2], int(sys.argv[3])),
                                         functools.partial(Handler, directory=root))
server.serve_forever()
"#;

fn step(what: &str) {
    eprintln!("[gateway] {what}");
}

fn sha256_of(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success());
    first_word(&String::from_utf8_lossy(&out.stdout))
}

fn first_word(s: &str) -> String {
    s.split_whitespace().next().unwrap_or_default().to_string()
}

/// The port the server logged for the request of `path` from `client`.
fn client_port(server_log: &str, client: Ipv4Addr, path: &str) -> Option<u16> {
    server_log.lines().rev().find_map(|l| {
        let rest = l.strip_prefix(&format!("client {client}:"))?;
        let (port, request) = rest.split_once(' ')?;
        request
            .contains(&format!("GET {path} "))
            .then(|| port.parse().ok())?
    })
}

/// The flow of `nat` to `remote`, and whether its mapped port lies in one of the blocks.
fn mapped_in_blocks(nat: &NatInfo, remote: SocketAddr) -> Option<(u16, bool)> {
    let flow = nat
        .flows
        .iter()
        .find(|f| f.proto == "tcp" && SocketAddr::from((f.remote, f.remote_port)) == remote)?;
    let mapped = flow.mapped?;
    let inside = nat.blocks.iter().any(|&(a, b)| (a..=b).contains(&mapped));
    Some((mapped, inside))
}

fn guest_sh(g: &mut Guest, cmd: &str) -> String {
    let out = g.run(cmd, CMD).unwrap_or_else(|e| panic!("{cmd}: {e}"));
    format!("{}{}", out.stdout, out.stderr)
}

#[test]
fn guests_reach_the_public_network_through_nat_and_the_gateway() {
    let mut c = Cluster::start(&ClusterOptions {
        prefix: "vnpg".into(),
        ..ClusterOptions::default()
    })
    .expect("cluster");
    let rec_a = c.create_vm("vm-a", 0, &[]).unwrap();
    c.create_vm("vm-b", 1, &[]).unwrap();
    let mut edge = PublicEdge::create_started(&mut c, "gw1", NETWORK, 2)
        .unwrap_or_else(|e| panic!("public edge: {e:#}"));
    let dir = c.dir().to_path_buf();
    let namespaces = edge.all_namespace_names(&c);

    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let blob: Vec<u8> = (0..BLOB_BYTES as u64)
        .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
        .collect();
    std::fs::write(www.join("blob"), &blob).unwrap();
    let blob_sha = sha256_of(&www.join("blob"));
    let server = edge
        .spawn_public(
            "http-server",
            "python3",
            &[
                "-u",
                "-c",
                SERVER,
                www.to_str().unwrap(),
                &PUBLIC_HOST.to_string(),
                &HTTP_PORT.to_string(),
            ],
        )
        .unwrap();
    edge.wait_listening(
        SocketAddr::from((PUBLIC_HOST, HTTP_PORT)),
        Duration::from_secs(20),
    )
    .unwrap();

    step("booting vm-a (host 0) and vm-b (host 1)");
    let [mut ga, mut gb] = c
        .boot_guests([(0, "vm-a"), (1, "vm-b")])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let logs = |c: &Cluster, edge: &PublicEdge| format!("{}{}", c.logs(), edge.logs(c));

    step("1. vm-a fetches the file from the public server through NAT and the gateway");
    let url = format!("http://{PUBLIC_HOST}:{HTTP_PORT}/blob");
    let out = guest_sh(
        &mut ga,
        &format!("wget -q -O /tmp/blob {url} && sha256sum /tmp/blob"),
    );
    assert_eq!(
        first_word(&out),
        blob_sha,
        "wget {url}: {out}\n{}",
        logs(&c, &edge)
    );
    let nat = c.host(0).admin().nat("vm-a").expect("vnpd nat vm-a");
    eprintln!("{nat:?}");
    let (mapped, inside) = mapped_in_blocks(&nat, SocketAddr::from((PUBLIC_HOST, HTTP_PORT)))
        .unwrap_or_else(|| panic!("no mapped flow to the server in {nat:?}"));
    assert!(
        inside,
        "port {mapped} outside vm-a's blocks {:?}",
        nat.blocks
    );
    assert_eq!(
        nat.blocks,
        rec_a
            .nat_ports
            .iter()
            .map(|r| (r.first, r.last))
            .collect::<Vec<_>>(),
        "vnpd's blocks are the registry's"
    );
    let seen = edge.public_stderr(server);
    assert_eq!(
        client_port(&seen, PUBLIC_ADDR, "/blob"),
        Some(mapped),
        "the server saw another client than {PUBLIC_ADDR}:{mapped}:\n{seen}"
    );
    assert!(
        edge.metric(&c, "vnp_gateway_outbound_packets_total", &[])
            .unwrap()
            > 0
    );

    step("2. a public client reaches vm-b's httpd through a port-forwarding rule");
    let out = guest_sh(
        &mut gb,
        "mkdir -p /tmp/www && head -c 1048576 /dev/urandom > /tmp/www/up && \
         httpd -p 80 -h /tmp/www && sha256sum /tmp/www/up",
    );
    let up_sha = first_word(&out);
    assert_eq!(up_sha.len(), 64, "vm-b: {out}");
    let rule = ForwardSpec {
        id: "web".into(),
        public_addr: PUBLIC_ADDR,
        public_port: FORWARDED_PORT,
        proto: L4Proto::Tcp,
        vm: "vm-b".into(),
        vm_port: 80,
    };
    c.registry(move |r| r.create_forward(&rule)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while edge
        .metric(&c, "vnp_gateway_forwarding_rules", &[])
        .unwrap()
        < 1
    {
        assert!(Instant::now() < deadline, "the gateway never saw the rule");
        std::thread::sleep(Duration::from_millis(200));
    }
    let fetch = format!(
        "import hashlib, urllib.request; print(hashlib.sha256(urllib.request.urlopen(\
         'http://{PUBLIC_ADDR}:{FORWARDED_PORT}/up', timeout=30).read()).hexdigest())"
    );
    let out = edge
        .public()
        .command("python3")
        .args(["-c", &fetch])
        .output()
        .unwrap();
    let got = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        first_word(&got),
        up_sha,
        "public client: {got}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs(&c, &edge)
    );
    let nat_b = c.host(1).admin().nat("vm-b").expect("vnpd nat vm-b");
    assert!(
        nat_b.flows.iter().any(|f| f.proto == "tcp"
            && f.remote == PUBLIC_HOST
            && f.local_port == 80
            && f.mapped.is_none()),
        "no inbound (unmapped) flow from {PUBLIC_HOST} to vm-b:80 in {nat_b:?}"
    );
    assert!(
        edge.metric(&c, "vnp_gateway_forwarded_in_packets_total", &[])
            .unwrap()
            > 0
    );

    step("3. the gateway is killed and restarted during a slow download");
    let slow = format!("http://{PUBLIC_HOST}:{HTTP_PORT}/slow");
    guest_sh(
        &mut ga,
        &format!("(wget -q -O /tmp/slow {slow}; echo $? > /tmp/slow.rc) >/dev/null 2>&1 &"),
    );
    // Until a quarter of the file has arrived.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let size: usize = guest_sh(&mut ga, "wc -c < /tmp/slow 2>/dev/null || echo 0")
            .trim()
            .parse()
            .unwrap_or(0);
        if size >= BLOB_BYTES / 4 {
            break;
        }
        assert!(Instant::now() < deadline, "slow download stuck at {size}");
        std::thread::sleep(Duration::from_millis(200));
    }
    edge.kill_gateway().unwrap();
    let killed_at = Instant::now();
    let early = guest_sh(&mut ga, "cat /tmp/slow.rc 2>/dev/null; wc -c < /tmp/slow");
    eprintln!("gateway killed; rc and bytes so far: {early:?}");
    assert_eq!(
        early.lines().count(),
        1,
        "the download ended before the kill: {early}"
    );
    // Down long enough that the server's segments meet no reader and TCP retransmits.
    std::thread::sleep(Duration::from_secs(2));
    edge.start_gateway(&c, 2)
        .unwrap_or_else(|e| panic!("{e}\n{}", edge.logs(&c)));
    eprintln!("gateway back after {:?}", killed_at.elapsed());
    let deadline = Instant::now() + Duration::from_secs(90);
    let rc = loop {
        let rc = guest_sh(&mut ga, "cat /tmp/slow.rc 2>/dev/null");
        if !rc.trim().is_empty() || Instant::now() > deadline {
            break rc;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_eq!(rc.trim(), "0", "wget /slow: {rc}\n{}", logs(&c, &edge));
    let out = guest_sh(&mut ga, "sha256sum /tmp/slow");
    assert_eq!(first_word(&out), blob_sha, "/slow arrived damaged");
    assert!(
        edge.metric(&c, "vnp_gateway_inbound_packets_total", &[])
            .unwrap()
            > 0,
        "the restarted gateway carried no return traffic"
    );

    drop(ga);
    drop(gb);
    drop(edge);
    drop(c);
    assert_nothing_left(&dir, &namespaces);
}
