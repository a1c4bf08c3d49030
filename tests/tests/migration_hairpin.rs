//! The source side of a live migration: a sender that still uses the VM's old endpoint (its
//! watch lags, or it never heard) reaches the VM on its new host through the old host's
//! hairpin, and is told that the endpoint moved.
//!
//! vm-a is a network-namespace guest (`vnp-tap-frontend`) on host 0. The "migration" is the
//! real flow with a namespace guest in place of QEMU: the registry's `migrate` to host 1, an
//! incoming attach there, the frontend on host 0 stops (the source pauses) and one on host 1
//! starts with the same MAC (the device start registers the endpoint on host 1). The
//! straggler is a plain UDP socket on host 1's underlay that sends VNP datagrams to vm-a's old
//! endpoint with the token the registry would have granted it (minted here with vm-a's
//! secret), so nothing on its side follows the move.
//!
//! Needs root (namespaces, TAP) and python3 (`scripts/setup`).
//! Run: `cargo test -p vnp-e2e --test migration_hairpin -- --nocapture`.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vnp_e2e::cluster::{assert_nothing_left, Cluster, ClusterOptions};
use vnp_e2e::forge;
use vnp_e2e::migration::{begin_migration, endpoint_of, wait_endpoint_on};
use vnp_protocol::token::{mint, Expiry, TokenFields, VmSecret};
use vnp_registry_client::{ClientConfig, RegistryClient};
use vnp_testkit::tap_guest::{TapGuest, TapGuestSpec};
use vnpd::datapath::moved_hint::MovedHint;

const PORT: u16 = 7000;

/// Prints every UDP payload it gets on the port; exits after 60 s without one.
const LISTENER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(60)
print("listening", flush=True)
try:
    while True:
        b, _ = s.recvfrom(2048)
        print(b.decode(errors="replace"), flush=True)
except socket.timeout:
    pass
"#;

/// A UDP listener in a guest's namespace; its lines are collected; killed on drop.
struct Listener {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Listener {
    fn start(g: &TapGuest) -> Listener {
        let mut child = g
            .netns()
            .command("python3")
            .args(["-u", "-c", LISTENER, &PORT.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the listener");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).expect("listener output");
        assert_eq!(first.trim(), "listening");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Listener { child, lines }
    }

    fn received(&self, prefix: &str) -> Vec<String> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter(|l| l.starts_with(prefix))
            .cloned()
            .collect()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A sender that keeps using vm-a's old endpoint with the token for it.
struct Straggler {
    socket: UdpSocket,
    secret: VmSecret,
    network_id: u32,
    /// The inner source (a VM of the network).
    src_vm: Ipv4Addr,
    dst_vm: Ipv4Addr,
    to: SocketAddrV4,
}

impl Straggler {
    fn local(&self) -> SocketAddrV4 {
        match self.socket.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            a => panic!("{a}"),
        }
    }

    /// One datagram as a host holding the registry's token `src_vm -> dst_vm` at `to` sends it.
    fn send(&self, payload: &str) {
        let expiry = Expiry(forge::unix_now() + 300);
        let me = self.local();
        let fields = TokenFields {
            src_host: *me.ip(),
            src_port: me.port(),
            src_vm: self.src_vm,
            dst_host: *self.to.ip(),
            dst_port: self.to.port(),
            dst_vm: self.dst_vm,
            network_id: self.network_id,
            expiry,
        };
        let inner = forge::udp_packet(self.src_vm, self.dst_vm, 40000, PORT, payload.as_bytes());
        let d = forge::datagram(self.network_id, mint(&self.secret, &fields), expiry, &inner);
        self.socket.send_to(&d, self.to).unwrap();
    }

    /// Endpoint-moved hints that reached the sender, with where they came from.
    fn hints(&self) -> Vec<(SocketAddrV4, MovedHint)> {
        let mut hints = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = self.socket.recv_from(&mut buf) {
            if let (Some(h), std::net::SocketAddr::V4(from)) = (MovedHint::parse(&buf[..n]), from) {
                hints.push((from, h));
            }
        }
        hints
    }
}

/// A VM's secret, read the way its host reads it (only the VM's host may).
fn vm_secret_as_host(c: &Cluster, host: usize, vm: &str) -> VmSecret {
    let tls = c.tls_dir().to_path_buf();
    let id = c.host(host).id.clone();
    let url = c.registry_url();
    let id_of_vm = vm.to_string();
    c.fabric()
        .core()
        .enter(move || {
            let config = ClientConfig::from_files(
                &url,
                &tls.join("ca.pem"),
                &tls.join(format!("host-{id}.pem")),
                &tls.join(format!("host-{id}.key")),
            )?;
            RegistryClient::new(config)?.get_vm_secret(&id_of_vm)
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("secret of {vm}: {e}"))
        .0
}

fn step(what: &str) {
    eprintln!("[migration_hairpin] {what}");
}

#[test]
fn stragglers_reach_the_migrated_vm_and_their_sender_is_told() {
    let opts = ClusterOptions {
        prefix: "vnph".into(),
        ..ClusterOptions::default()
    };
    let c = Cluster::start(&opts).expect("cluster");
    let dir = c.dir().to_path_buf();
    let namespaces = c.namespace_names();

    step("vm-a on host 0; vm-b's address is the straggler's inner source");
    let rec_a = c.create_vm("vm-a", 0, &[]).unwrap();
    let rec_b = c.create_vm("vm-b", 1, &[]).unwrap();
    let att_a = c.attach(0, "vm-a").unwrap();
    let mut a0 = c.tap_guest(&att_a, true).unwrap();
    let secret = vm_secret_as_host(&c, 0, "vm-a");
    let host1 = c.host(1).addr;
    let socket = c
        .host_ns(1)
        .enter(move || UdpSocket::bind((host1, 0)))
        .unwrap()
        .unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let straggler = Straggler {
        socket,
        secret,
        network_id: att_a.network_id,
        src_vm: rec_b.ip,
        dst_vm: rec_a.ip,
        to: SocketAddrV4::new(att_a.host_addr, att_a.udp_port),
    };

    step("before the move, the sender's datagrams reach vm-a on host 0 (its token is right)");
    let l0 = Listener::start(&a0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while l0.received("before").is_empty() {
        assert!(
            Instant::now() < deadline,
            "nothing reached vm-a\n{}",
            c.logs()
        );
        straggler.send("before");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(l0);

    step("vm-a migrates to host 1: incoming attach, source frontend stops, destination starts");
    let before = endpoint_of(&c, "vm-a").unwrap().unwrap();
    let att_a2 = begin_migration(&c, "vm-a", 1).unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    a0.stop_frontend().expect("source frontend stops");
    let mut spec = TapGuestSpec::new(&c.bins().tap_frontend, &att_a2.socket_path, &att_a2.mac);
    spec.log = Some(dir.join("tap-vm-a-dst.log"));
    let mut a1 = TapGuest::start(spec).unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    a1.dhcp(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let moved = wait_endpoint_on(&c, "vm-a", 1, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert!(moved.generation > before.generation);

    step("the straggler keeps sending to host 0: host 0 forwards to vm-a on host 1");
    let l1 = Listener::start(&a1);
    let started = Instant::now();
    let mut sent = 0;
    while l1.received("straggler").is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no straggler reached vm-a on host 1\n{}",
            c.logs()
        );
        straggler.send(&format!("straggler-{sent}"));
        sent += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..50 {
        straggler.send(&format!("straggler-{sent}"));
        sent += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let sending_ms = started.elapsed().as_millis();
    std::thread::sleep(Duration::from_millis(500));
    let got = l1.received("straggler");
    eprintln!(
        "  {sent} stragglers sent over {sending_ms} ms, {} delivered",
        got.len()
    );
    assert!(
        got.len() >= 50,
        "{} of the last 50 stragglers delivered\n{}",
        got.len(),
        c.logs()
    );
    let forwarded = c
        .metric(0, "vnpd_hairpin_forwarded_total", &[("vm", "vm-a")])
        .unwrap();
    assert!(forwarded >= got.len() as u64, "forwarded {forwarded}");

    step("the sender was told, from the old endpoint, rate-limited");
    let hints = straggler.hints();
    assert!(!hints.is_empty(), "no endpoint-moved hint\n{}", c.logs());
    for (from, h) in &hints {
        assert_eq!(*from, straggler.to);
        assert_eq!(h.moved_vm, rec_a.ip);
        assert_eq!(h.to_vm, rec_b.ip);
        // The source's own generation when the destination's resume notice started the
        // hairpin, the new record's when the registry's watch did (docs/protocol.md).
        assert!(
            [before.generation, moved.generation].contains(&h.generation),
            "hint generation {} (before {}, moved {})",
            h.generation,
            before.generation,
            moved.generation
        );
    }
    // One per 100 ms at most (and a little slack for the first).
    let bound = sending_ms as usize / 100 + 2;
    assert!(
        hints.len() <= bound,
        "{} hints for {sent} stragglers",
        hints.len()
    );
    let told = c
        .metric(0, "vnpd_moved_hints_sent_total", &[("vm", "vm-a")])
        .unwrap();
    assert_eq!(told, hints.len() as u64);

    step("a forged hint to vm-a's new port (vm-b never lived there) moves nothing");
    let forged = MovedHint {
        network_id: att_a.network_id,
        moved_vm: rec_b.ip,
        to_vm: rec_a.ip,
        generation: 1,
    };
    let new_port = SocketAddrV4::new(host1, att_a2.udp_port);
    for _ in 0..5 {
        straggler
            .socket
            .send_to(&forged.to_bytes(), new_port)
            .unwrap();
    }
    let drops = |c: &Cluster| {
        c.metric(
            1,
            "vnpd_drops_total",
            &[("vm", "vm-a"), ("reason", "rx_moved_hint")],
        )
        .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while drops(&c) < 5 {
        assert!(Instant::now() < deadline, "hints not counted\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let rechecks = c
        .metric(1, "vnpd_moved_hint_rechecks_total", &[("vm", "vm-a")])
        .unwrap();
    assert_eq!(rechecks, 0, "a forged hint caused a registry lookup");

    drop(l1);
    drop(a1);
    drop(a0);
    drop(c);
    assert_nothing_left(&dir, &namespaces);
}
