//! The gateway between real namespaces, no vnpd: a real registry over mutual TLS (the e2e
//! fixture), `vnp-gateway` in its own namespace with a real persistent TUN device, a "public"
//! namespace (203.0.113.0/24) with a real UDP echo server, and a test socket in a "host"
//! namespace standing in for the VMs' host: it sends VNP datagrams with registry-minted tokens
//! and receives what the gateway sends the VMs.
//!
//! Needs root (namespaces, TUN) and python3; fails (never skips) without them.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vnp_e2e::bins::bins;
use vnp_e2e::registries::spawn_registry;
use vnp_protocol::token::{mint, verify, Expiry, Token, TokenFields, VmSecret};
use vnp_protocol::wire::{ipv4, udp, VnpHeader, VnpRepr, HEADER_LEN};
use vnp_protocol::OUTSIDE;
use vnp_registry_client::*;
use vnp_testkit::netns::{Fabric, Netns, CORE_ADDR};
use vnp_testkit::process::{ChildGuard, TempDir};

const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const ECHO_PORT: u16 = 7000;
const GW_PORT: u16 = 6081;
const METRICS_PORT: u16 = 9465;

/// Everything the tests run against; dropped in reverse order, also on failure.
struct Setup {
    gateways: Vec<Option<ChildGuard>>,
    _echo: ChildGuard,
    _registry: ChildGuard,
    public: Netns,
    fabric: Fabric,
    tls: PathBuf,
    dir: TempDir,
    /// Sockets of VMs a and b in the host namespace, and their records.
    a: (UdpSocket, VmRecord, VmSecret),
    b: (UdpSocket, VmRecord, VmSecret),
    host: RegistryClient,
    network_id: u32,
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn client(tls: &Path, stem: &str) -> RegistryClient {
    let url = format!("https://{CORE_ADDR}:7443");
    let cfg = ClientConfig::from_files(
        &url,
        &tls.join("ca.pem"),
        &tls.join(format!("{stem}.pem")),
        &tls.join(format!("{stem}.key")),
    )
    .expect("client config");
    RegistryClient::new(cfg).expect("client")
}

/// Runs `f` inside `ns` (sockets made there stay there).
fn inside<R: Send + 'static>(ns: &Netns, f: impl FnOnce() -> R + Send + 'static) -> R {
    ns.enter(f).expect("enter namespace")
}

impl Setup {
    /// Registry, host namespace (index 0), gateway namespaces (1, 2) with TUN devices, public
    /// namespace with the echo server; network n with VMs a, b on host h and gateways g1, g2
    /// on one public address; a forwarding rule PUBLIC:8080/tcp -> b:80.
    fn new(tag: &str) -> Setup {
        assert!(
            is_root(),
            "these tests need root (network namespaces, TUN devices)"
        );
        let bins = bins().expect("binaries");
        let dir = TempDir::new(&format!("vnp-gw-{tag}")).expect("temp dir");
        let tls = dir.path().join("tls");
        std::fs::create_dir_all(&tls).unwrap();
        let vnpctl = |args: &[&str]| run(Command::new(&bins.vnpctl).args(args));
        let t = tls.to_str().unwrap();
        vnpctl(&["ca", "init", "--dir", t, "--san", &CORE_ADDR.to_string()]);
        vnpctl(&["cert", "host", "--dir", t, "--id", "h"]);
        for g in ["g1", "g2"] {
            vnpctl(&["cert", "gateway", "--dir", t, "--id", g]);
        }
        let mut fabric = Fabric::new(&format!("gw{tag}")).expect("fabric");
        for _ in 0..3 {
            fabric.add_host(&format!("gw{tag}")).expect("namespace");
        }
        let registry = spawn_registry(&fabric, &bins, dir.path(), &tls, 600).expect("registry");
        let public = public_side(&fabric, tag);
        let echo = echo_server(&public);

        let admin = client(&tls, "admin");
        let host = client(&tls, "host-h");
        let (a, b, network_id) = inside(fabric.core(), {
            let (admin, host) = (admin.clone(), host.clone());
            move || populate(&admin, &host)
        });
        let sock = |vm: &VmRecord| {
            let addr = SocketAddrV4::new(Fabric::host_addr(0), vm.host_port.unwrap());
            let s = inside(fabric.host(0), move || UdpSocket::bind(addr)).expect("bind");
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            s
        };
        let (sa, sb) = (sock(&a.0), sock(&b.0));
        Setup {
            gateways: vec![None, None],
            _echo: echo,
            _registry: registry,
            public,
            fabric,
            tls,
            dir,
            a: (sa, a.0, a.1),
            b: (sb, b.0, b.1),
            host,
            network_id,
        }
    }

    /// Starts gateway `i` (0: g1, 1: g2) and waits for its metrics endpoint.
    fn start_gateway(&mut self, i: usize) {
        let id = format!("g{}", i + 1);
        let ns = self.fabric.host(i + 1);
        let metrics = SocketAddr::from((Fabric::host_addr(i + 1), METRICS_PORT));
        let mut child = ChildGuard::spawn(
            &format!("vnp-gateway-{id}"),
            ns.command(env!("CARGO_BIN_EXE_vnp-gateway"))
                .args(["--registry", &format!("https://{CORE_ADDR}:7443")])
                .arg("--ca")
                .arg(self.tls.join("ca.pem"))
                .arg("--cert")
                .arg(self.tls.join(format!("gateway-{id}.pem")))
                .arg("--key")
                .arg(self.tls.join(format!("gateway-{id}.key")))
                .args(["--tun", "vnpgw0", "--metrics", &metrics.to_string()])
                .env("RUST_LOG", "debug")
                .stdout(std::process::Stdio::null()),
            Some(&self.dir.path().join(format!("{id}.log"))),
        )
        .expect("spawn gateway");
        child
            .wait_until("the gateway's metrics", Duration::from_secs(60), || {
                scrape(ns, metrics).filter(|m| m.contains("vnp_gateway_tokens 2"))
            })
            .expect("gateway up with tokens for both VMs");
        self.gateways[i] = Some(child);
    }

    fn metrics(&self, i: usize) -> String {
        scrape(
            self.fabric.host(i + 1),
            SocketAddr::from((Fabric::host_addr(i + 1), METRICS_PORT)),
        )
        .expect("metrics")
    }

    fn drops(&self, i: usize, reason: &str) -> u64 {
        counter(
            &self.metrics(i),
            &format!("vnp_gateway_drops_total{{reason=\"{reason}\"}}"),
        )
    }

    /// The host's token for `vm` towards outside address `dst`.
    fn grant(&self, vm: &str, dst: Ipv4Addr) -> TokenGrant {
        let (host, vm) = (self.host.clone(), vm.to_string());
        inside(self.fabric.core(), move || host.request_token(&vm, dst)).expect("token")
    }

    /// Sends `inner` from VM `which`'s socket with `grant`'s header.
    fn send(&self, which: &VmSide, grant: &TokenGrant, token: Token, expiry: u32, inner: &[u8]) {
        let repr = VnpRepr {
            network_id: self.network_id,
            token,
            expiry: Expiry(expiry),
            has_options: false,
        };
        let mut d = repr.to_bytes().to_vec();
        d.extend_from_slice(inner);
        which
            .0
            .send_to(&d, SocketAddrV4::new(grant.dst_host, grant.dst_port))
            .expect("send");
    }

    /// Public-side route to the public address through gateway `i`'s namespace.
    fn route_public_via(&self, i: usize) {
        let via = Ipv4Addr::new(203, 0, 113, 2 + i as u8).to_string();
        self.public
            .ip(&["route", "replace", &format!("{PUBLIC}/32"), "via", &via])
            .expect("route");
    }

    /// A UDP datagram from the public server to PUBLIC:`port` (a late reply on a flow).
    fn late_reply(&self, port: u16, payload: &str) {
        let script = format!(
            "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
             s.bind(('{SERVER}', 0)); s.sendto(b'{payload}', ('{PUBLIC}', {port}))"
        );
        self.public
            .run(&["python3", "-c", &script])
            .expect("late reply");
    }
}

type VmSide = (UdpSocket, VmRecord, VmSecret);

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// The public namespace: bridge at SERVER, a veth to each gateway namespace (203.0.113.2,
/// .3), the public address routed to the first gateway; in each gateway namespace a persistent
/// TUN with PUBLIC routed into it, and forwarding on.
fn public_side(fabric: &Fabric, tag: &str) -> Netns {
    let public = Netns::create(&format!("gw{tag}p")).expect("public namespace");
    public
        .ip(&["link", "add", "br0", "type", "bridge"])
        .unwrap();
    public
        .ip(&["addr", "add", &format!("{SERVER}/24"), "dev", "br0"])
        .unwrap();
    public.ip(&["link", "set", "br0", "up"]).unwrap();
    for i in 0..2u8 {
        let ns = fabric.host(usize::from(i) + 1);
        let addr = Ipv4Addr::new(203, 0, 113, 2 + i);
        let far = format!("vg{i}");
        ns.veth_to("pub0", Some((addr, 24)), &public, &far).unwrap();
        public.ip(&["link", "set", &far, "master", "br0"]).unwrap();
        ns.ip(&["tuntap", "add", "dev", "vnpgw0", "mode", "tun"])
            .unwrap();
        ns.ip(&["link", "set", "vnpgw0", "up"]).unwrap();
        ns.ip(&["route", "add", &format!("{PUBLIC}/32"), "dev", "vnpgw0"])
            .unwrap();
        ns.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]).unwrap();
    }
    public
        .ip(&[
            "route",
            "add",
            &format!("{PUBLIC}/32"),
            "via",
            "203.0.113.2",
        ])
        .unwrap();
    public
}

/// A UDP echo server on SERVER:ECHO_PORT that answers `from <ip>:<port> <payload>`.
fn echo_server(public: &Netns) -> ChildGuard {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('{SERVER}', {ECHO_PORT}))\n\
         while True:\n\
         \x20   d, a = s.recvfrom(2048)\n\
         \x20   s.sendto(b'from %s:%d ' % (a[0].encode(), a[1]) + d, a)\n"
    );
    let child = ChildGuard::spawn(
        "echo",
        public.command("python3").args(["-u", "-c", &script]),
        None,
    )
    .expect("echo server");
    std::thread::sleep(Duration::from_millis(300));
    child
}

type Vm = (VmRecord, VmSecret);

fn populate(admin: &RegistryClient, host: &RegistryClient) -> (Vm, Vm, u32) {
    let net = admin
        .create_network(&NetworkSpec {
            id: "n".into(),
            vni: Some(9),
            cidr: "10.77.0.0/24".parse().unwrap(),
            mtu: None,
            default_policy: None,
            nat_block: None,
        })
        .unwrap();
    admin
        .create_host(&HostSpec {
            id: "h".into(),
            underlay_addr: Fabric::host_addr(0),
            port_range: None,
        })
        .unwrap();
    let mut vms = Vec::new();
    for id in ["a", "b"] {
        let spec = VmSpec {
            id: id.into(),
            network: "n".into(),
            host: Some("h".into()),
            ..VmSpec::default()
        };
        let vm = admin.create_vm(&spec).unwrap();
        let (secret, _) = host.get_vm_secret(id).unwrap();
        vms.push((vm, secret));
    }
    for (i, id) in ["g1", "g2"].iter().enumerate() {
        admin
            .create_gateway(&GatewaySpec {
                id: id.to_string(),
                network: "n".into(),
                underlay_addr: Fabric::host_addr(i + 1),
                port: GW_PORT,
                public_addr: Some(PUBLIC),
            })
            .unwrap();
    }
    admin
        .create_forward(&ForwardSpec {
            id: "web".into(),
            public_addr: PUBLIC,
            public_port: 8080,
            proto: L4Proto::Tcp,
            vm: "b".into(),
            vm_port: 80,
        })
        .unwrap();
    let b = vms.pop().unwrap();
    let a = vms.pop().unwrap();
    (a, b, net.vni)
}

fn scrape(ns: &Netns, addr: SocketAddr) -> Option<String> {
    inside(ns, move || {
        use std::io::{Read, Write};
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
        c.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        c.read_to_string(&mut text).ok()?;
        Some(text)
    })
}

fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// A UDP packet with correct checksums.
fn udp_packet(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = vec![0u8; total];
    let mut ip = ipv4::Packet::new_unchecked(&mut p[..]);
    ipv4::Repr {
        src_addr: *src.ip(),
        dst_addr: *dst.ip(),
        protocol: ipv4::protocol::UDP,
        payload_len: 8 + payload.len(),
        ttl: 64,
    }
    .emit(&mut ip);
    ip.fill_checksum();
    let mut u = udp::Packet::new_unchecked(ip.payload_mut());
    u.set_src_port(src.port());
    u.set_dst_port(dst.port());
    u.set_len((8 + payload.len()) as u16);
    u.payload_mut().copy_from_slice(payload);
    u.fill_checksum(*src.ip(), *dst.ip());
    p
}

/// What VM `vm` received from a gateway within `within`: the gateway's address, the token
/// fields it verified with, and the inner packet.
struct Received {
    from: SocketAddrV4,
    inner: Vec<u8>,
}

fn receive(vm: &VmSide, network_id: u32, within: Duration) -> Option<Received> {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        let Ok((n, SocketAddr::V4(from))) = vm.0.recv_from(&mut buf) else {
            continue;
        };
        let h = VnpHeader::new_checked(&buf[..n]).expect("VNP header");
        let total = ipv4::Packet::new_checked(&buf[HEADER_LEN..n])
            .expect("inner IPv4")
            .total_len();
        let inner = buf[HEADER_LEN..HEADER_LEN + total].to_vec();
        // Options (the gateway's return token, docs/gateway.md step 7) follow the inner packet.
        let options = &buf[HEADER_LEN + total..n];
        assert_eq!(h.has_options(), !options.is_empty(), "options flag");
        let fields = TokenFields {
            src_host: *from.ip(),
            src_port: from.port(),
            src_vm: OUTSIDE,
            dst_host: Fabric::host_addr(0),
            dst_port: vm.1.host_port.unwrap(),
            dst_vm: vm.1.ip,
            network_id,
            expiry: h.expiry(),
        };
        assert!(
            verify(&vm.2, &fields, &h.token()),
            "token from {from} does not verify with VM {}'s secret",
            vm.1.id
        );
        return Some(Received { from, inner });
    }
    None
}

fn udp_of(inner: &[u8]) -> (SocketAddrV4, SocketAddrV4, String) {
    let ip = ipv4::Packet::new_checked(inner).unwrap();
    assert!(ip.verify_checksum());
    let u = udp::Packet::new_checked(ip.payload()).unwrap();
    assert!(
        u.verify_checksum(ip.src_addr(), ip.dst_addr()),
        "UDP checksum"
    );
    (
        SocketAddrV4::new(ip.src_addr(), u.src_port()),
        SocketAddrV4::new(ip.dst_addr(), u.dst_port()),
        String::from_utf8_lossy(u.payload()).into_owned(),
    )
}

/// VM a's first NAT port plus `k`.
fn nat_port(vm: &VmRecord, k: u16) -> u16 {
    vm.nat_ports[0].first + k
}

#[test]
fn outbound_return_drops_forwarding_and_restart() {
    let mut s = Setup::new("o");
    let g = s.grant("a", SERVER);
    let gw = usize::from(g.dst_host == Fabric::host_addr(2));
    s.start_gateway(gw);
    s.route_public_via(gw);
    let token: Token = g.token.parse().unwrap();
    let src = SocketAddrV4::new(s.a.1.ip, nat_port(&s.a.1, 5));
    let echo = SocketAddrV4::new(SERVER, ECHO_PORT);

    // Outbound reaches the public server from the public address; the reply comes back as
    // VNP to a's endpoint with a token that verifies with a's secret.
    s.send(&s.a, &g, token, g.expiry, &udp_packet(src, echo, b"ping1"));
    let r = receive(&s.a, s.network_id, Duration::from_secs(5)).expect("reply to a");
    assert_eq!(r.from, SocketAddrV4::new(g.dst_host, GW_PORT));
    let (from, to, text) = udp_of(&r.inner);
    assert_eq!((from, to), (echo, src));
    assert_eq!(text, format!("from {PUBLIC}:{} ping1", src.port()));

    // Forged, expired and wrong-VM datagrams are dropped and counted; nothing reaches out.
    let bad_before = s.drops(gw, "rx_bad_token");
    let expired_before = s.drops(gw, "rx_expired");
    let ping = udp_packet(src, echo, b"never");
    s.send(&s.a, &g, Token::from_bytes([7; 8]), g.expiry, &ping);
    let gw_secret = inside(s.fabric.core(), {
        let c = client(&s.tls, &format!("gateway-g{}", gw + 1));
        move || c.get_gateway_secret(&format!("g{}", gw + 1))
    })
    .unwrap()
    .0;
    let old = g.expiry - 700;
    let expired = mint(
        &gw_secret,
        &TokenFields {
            expiry: Expiry(old),
            ..g.fields()
        },
    );
    s.send(&s.a, &g, expired, old, &ping);
    let b_src = SocketAddrV4::new(s.b.1.ip, nat_port(&s.b.1, 5));
    s.send(
        &s.a,
        &g,
        token,
        g.expiry,
        &udp_packet(b_src, echo, b"never"),
    );
    // A good token, but a source port of b's block: a guest never uses another VM's ports.
    let stolen = SocketAddrV4::new(s.a.1.ip, nat_port(&s.b.1, 9));
    let not_owned_before = s.drops(gw, "port_not_owned");
    s.send(
        &s.a,
        &g,
        token,
        g.expiry,
        &udp_packet(stolen, echo, b"never"),
    );
    assert!(receive(&s.a, s.network_id, Duration::from_millis(800)).is_none());
    assert!(receive(&s.b, s.network_id, Duration::from_millis(200)).is_none());
    assert_eq!(
        s.drops(gw, "rx_bad_token"),
        bad_before + 2,
        "forged + wrong VM"
    );
    assert_eq!(s.drops(gw, "rx_expired"), expired_before + 1);
    assert_eq!(s.drops(gw, "port_not_owned"), not_owned_before + 1);

    // Port forwarding: a public client's SYN to PUBLIC:8080 reaches b:80 as VNP.
    let _client = ChildGuard::spawn(
        "public-client",
        s.public.command("python3").args([
            "-c",
            &format!("import socket; socket.create_connection(('{PUBLIC}', 8080), timeout=5)"),
        ]),
        None,
    )
    .unwrap();
    let r = receive(&s.b, s.network_id, Duration::from_secs(5)).expect("SYN to b");
    let ip = ipv4::Packet::new_checked(&r.inner[..]).unwrap();
    assert_eq!(
        (ip.src_addr(), ip.dst_addr(), ip.protocol()),
        (SERVER, s.b.1.ip, 6)
    );
    assert_eq!(u16::from_be_bytes([ip.payload()[2], ip.payload()[3]]), 80);
    // The gateway counts a packet after `send_to` returns, so b may see it first.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while counter(&s.metrics(gw), "vnp_gateway_forwarded_in_packets_total") < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the forwarded packet was never counted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Restart: a late reply on the flow from before reaches a with no new outbound packet.
    s.gateways[gw].take().unwrap().kill().unwrap();
    s.start_gateway(gw);
    s.late_reply(src.port(), "late");
    let r = receive(&s.a, s.network_id, Duration::from_secs(5)).expect("late reply after restart");
    let (_, to, text) = udp_of(&r.inner);
    assert_eq!((to, text.as_str()), (src, "late"));
}

#[test]
fn two_gateways_one_public_address_both_deliver_returns() {
    let mut s = Setup::new("t");
    s.start_gateway(0);
    s.start_gateway(1);
    let g = s.grant("a", SERVER);
    let token: Token = g.token.parse().unwrap();
    let src = SocketAddrV4::new(s.a.1.ip, nat_port(&s.a.1, 17));
    let echo = SocketAddrV4::new(SERVER, ECHO_PORT);
    let chosen = usize::from(g.dst_host == Fabric::host_addr(2));
    s.route_public_via(chosen);
    s.send(&s.a, &g, token, g.expiry, &udp_packet(src, echo, b"hello"));
    let r = receive(&s.a, s.network_id, Duration::from_secs(5)).expect("reply");
    assert_eq!(
        udp_of(&r.inner).2,
        format!("from {PUBLIC}:{} hello", src.port())
    );
    // The public side alternates: each gateway delivers the flow's returns to a, statelessly.
    for i in [1 - chosen, chosen, 1 - chosen] {
        s.route_public_via(i);
        s.late_reply(src.port(), &format!("via{i}"));
        let r = receive(&s.a, s.network_id, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no return via gateway {i}"));
        assert_eq!(r.from, SocketAddrV4::new(Fabric::host_addr(i + 1), GW_PORT));
        let (_, to, text) = udp_of(&r.inner);
        assert_eq!((to, text), (src, format!("via{i}")));
    }
}
