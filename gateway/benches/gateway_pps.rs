//! Benchmark: the real `vnp-gateway` daemon's packets per second and CPU per packet, in both
//! directions, beside the kernel UDP floor (`udp-floor`: a sendmmsg sender and a recvmmsg
//! receiver) measured in the same run, as vnpd is measured (`backend/benches/vnpd_udp.rs`).
//!
//! Set-up (namespaces, all real): a registry over mutual TLS in the fabric's core namespace
//! with a network of 126 VMs (one full public address of 512-port blocks);
//! the gateway (release build) in its own underlay namespace with a persistent TUN, pinned to
//! CPU 1; a "host" namespace where VM a's endpoint is a UDP socket; a "public" namespace behind
//! the gateway. Load generators run on CPU 0:
//! - **outbound**: VNP datagrams from VM a's endpoint with the registry's token for a, inner
//!   UDP from a NAT port of a to 198.51.100.7 (blackholed in the gateway's namespace after the
//!   kernel routed it), sendmmsg in batches of 32. Per packet the gateway does: recv, receive
//!   checks (HMAC token verify), outbound translation, TUN write (kernel routing included).
//! - **inbound**: `udp-floor --mode send` in the public namespace to the public address and a
//!   port of a's NAT block. Per packet: TUN read, inbound translation, token header, sendto to
//!   a's endpoint (a socket nobody reads: the kernel drops what overflows it).
//! - **lb-hit** / **lb-new** (issue #10): UDP service `lb` (`PUBLIC:500` -> 10 VMs, Maglev
//!   M = 65537; a port below 1024, since the 126 VMs' NAT blocks take every port above) from
//!   the public namespace, raw IPv4/UDP packets sent with sendmmsg on CPU 0.
//!   `lb-hit`: one flow, so after its first packet every packet is a flow-table hit; `lb-new`:
//!   every packet from another source address and port (12.9 million distinct flows, so
//!   none repeats in a run): a flow-table miss, a Maglev lookup and a flow-table insert per
//!   packet (once the table holds 2^20 flows, placed but not remembered, counted). Per packet
//!   the gateway does: TUN read, the service path, token header, sendto to the chosen VM's
//!   endpoint (a bound socket nobody reads). The members' health checks (TCP connect through
//!   the TUN) never complete during the run (1 h interval and timeout; the gateway namespace
//!   retries SYNs far beyond that), so every member stays in the table.
//!
//! Gateway CPU per packet = the process's user+system CPU (/proc/PID/stat) over a window / the
//! packets it counted (`vnp_gateway_{outbound,inbound}_packets_total`) in that window; pps the
//! same count per second. Floor = `udp-floor --payload P --sender-cpu 0 --receiver-cpu 1`,
//! total (sender + receiver) CPU per delivered datagram, P = the VNP datagram's UDP payload
//! (20-byte VNP header + inner packet).
//!
//! Run (root):
//!   cargo build -p vnp-registry -p vnp-registry-client          # registry, vnpctl (debug is fine)
//!   cargo build --release -p vnp-gateway -p vnp-udp-floor
//!   cargo bench -p vnp-gateway --bench gateway_pps
//! Env: GATEWAY_BENCH_SECONDS (default 5), GATEWAY_BENCH_RUNS (default 3).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vnp_e2e::bins::Bins;
use vnp_e2e::registries::spawn_registry;
use vnp_protocol::token::{Expiry, Token};
use vnp_protocol::wire::{ipv4, udp, VnpRepr};
use vnp_registry_client::*;
use vnp_testkit::netns::{Fabric, Netns, CORE_ADDR};
use vnp_testkit::process::{ChildGuard, TempDir};

const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const EDGE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const PUBLIC_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const SINK: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const GW_PORT: u16 = 6081;
const METRICS_PORT: u16 = 9465;
/// Inner IPv4 packet sizes: a 64-byte Ethernet frame's, and the guest MTU's.
const INNER: [usize; 2] = [50, 1452];
/// VNP header bytes in front of the inner packet.
const VNP_HEADER: usize = 20;
/// VMs in the network: 126 blocks of 512 ports fill one public address (`docs/gateway.md`),
/// so the gateway's tables are as large as one address makes them.
const VMS: usize = 126;
/// The load-balanced service's port (public and VM) and its pool (the first VMs).
const LB_PORT: u16 = 500;
const LB_MEMBERS: usize = 10;

fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target")
}

fn must_exist(p: PathBuf, how: &str) -> PathBuf {
    assert!(p.exists(), "{} missing: {how}", p.display());
    p
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
    let cfg = ClientConfig::from_files(
        &format!("https://{CORE_ADDR}:7443"),
        &tls.join("ca.pem"),
        &tls.join(format!("{stem}.pem")),
        &tls.join(format!("{stem}.key")),
    )
    .expect("client config");
    RegistryClient::new(cfg).expect("client")
}

/// Everything the runs use; dropped in reverse order of creation.
struct Bench {
    gateway: ChildGuard,
    public: Netns,
    /// VM a's endpoint (sender of outbound VNP; sink of inbound).
    vm_socket: UdpSocket,
    /// The endpoints of the service's other members (sinks of load-balanced packets).
    _member_sockets: Vec<UdpSocket>,
    vm: VmRecord,
    grant: TokenGrant,
    _registry: ChildGuard,
    fabric: Fabric,
    _dir: TempDir,
}

impl Bench {
    fn new(bins: &Bins) -> Bench {
        let dir = TempDir::new("vnp-gw-bench").expect("temp dir");
        let tls = dir.path().join("tls");
        std::fs::create_dir_all(&tls).unwrap();
        let t = tls.to_str().unwrap();
        let vnpctl = |args: &[&str]| run(Command::new(&bins.vnpctl).args(args));
        vnpctl(&["ca", "init", "--dir", t, "--san", &CORE_ADDR.to_string()]);
        vnpctl(&["cert", "host", "--dir", t, "--id", "h"]);
        vnpctl(&["cert", "gateway", "--dir", t, "--id", "g1"]);
        let mut fabric = Fabric::new("vnpgb").expect("fabric");
        for _ in 0..2 {
            fabric.add_host("vnpgb").expect("namespace");
        }
        let registry = spawn_registry(&fabric, bins, dir.path(), &tls, 3600).expect("registry");
        let public = wire_public(fabric.host(1));
        let (admin, host) = (client(&tls, "admin"), client(&tls, "host-h"));
        let (vms, grant) = fabric
            .core()
            .enter(move || populate(&admin, &host))
            .expect("enter core");
        let vm = vms[0].clone();
        let mut sockets: Vec<UdpSocket> = vms[..LB_MEMBERS]
            .iter()
            .map(|v| {
                let at = SocketAddrV4::new(Fabric::host_addr(0), v.host_port.unwrap());
                fabric
                    .host(0)
                    .enter(move || UdpSocket::bind(at))
                    .unwrap()
                    .expect("bind a VM's endpoint")
            })
            .collect();
        let vm_socket = sockets.remove(0);
        // The members' health checks must not fail during the run: SYNs retried for hours.
        fabric
            .host(1)
            .run(&["sysctl", "-qw", "net.ipv4.tcp_syn_retries=127"])
            .unwrap();
        vm_socket
            .connect(SocketAddrV4::new(grant.dst_host, grant.dst_port))
            .unwrap();
        let metrics = SocketAddr::from((Fabric::host_addr(1), METRICS_PORT));
        let mut gateway = ChildGuard::spawn(
            "vnp-gateway",
            fabric
                .host(1)
                .command("taskset")
                .args(["-c", "1"])
                .arg(&bins.gateway)
                .args(["--registry", &format!("https://{CORE_ADDR}:7443")])
                .arg("--ca")
                .arg(tls.join("ca.pem"))
                .arg("--cert")
                .arg(tls.join("gateway-g1.pem"))
                .arg("--key")
                .arg(tls.join("gateway-g1.key"))
                .args(["--tun", "vnpgw0", "--metrics", &metrics.to_string()])
                .stdout(std::process::Stdio::null()),
            None,
        )
        .expect("spawn gateway");
        let ns = fabric.host(1);
        gateway
            .wait_until("the gateway's tokens", Duration::from_secs(120), || {
                scrape(ns, metrics).filter(|m| m.contains(&format!("vnp_gateway_tokens {VMS}\n")))
            })
            .expect("gateway up");
        Bench {
            gateway,
            public,
            vm_socket,
            _member_sockets: sockets,
            vm,
            grant,
            _registry: registry,
            fabric,
            _dir: dir,
        }
    }

    fn metric(&self, name: &str) -> u64 {
        let text = scrape(
            self.fabric.host(1),
            SocketAddr::from((Fabric::host_addr(1), METRICS_PORT)),
        )
        .expect("metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// (packets counted under `metric`, gateway CPU ns) now.
    fn sample(&self, metric: &str) -> (u64, u64) {
        (self.metric(metric), process_cpu_ns(self.gateway.pid()))
    }

    /// One VNP datagram from VM a carrying an `inner`-byte UDP packet to SINK.
    fn outbound_datagram(&self, inner: usize) -> Vec<u8> {
        let src = SocketAddrV4::new(self.vm.ip, self.vm.nat_ports[0].first);
        let mut d = VnpRepr {
            network_id: self.grant.network_id,
            token: self.grant.token.parse::<Token>().expect("token"),
            expiry: Expiry(self.grant.expiry),
            has_options: false,
        }
        .to_bytes()
        .to_vec();
        d.extend_from_slice(&udp_packet(src, SocketAddrV4::new(SINK, 9), inner - 28));
        assert_eq!(d.len(), VNP_HEADER + inner);
        d
    }
}

/// The public side: a veth from the gateway's namespace, the public address routed into the
/// TUN there (and SINK blackholed), forwarding on.
fn wire_public(gw: &Netns) -> Netns {
    let public = Netns::create("vnpgbp").expect("public namespace");
    gw.veth_to("pub0", Some((EDGE, 24)), &public, "pub0")
        .unwrap();
    public
        .ip(&["addr", "add", &format!("{PUBLIC_HOST}/24"), "dev", "pub0"])
        .unwrap();
    let to_public = format!("{PUBLIC}/32");
    public
        .ip(&["route", "add", &to_public, "via", &EDGE.to_string()])
        .unwrap();
    gw.ip(&["tuntap", "add", "dev", "vnpgw0", "mode", "tun"])
        .unwrap();
    gw.ip(&["link", "set", "vnpgw0", "up"]).unwrap();
    gw.ip(&["route", "add", &to_public, "dev", "vnpgw0"])
        .unwrap();
    gw.ip(&["route", "add", "blackhole", &format!("{SINK}/32")])
        .unwrap();
    gw.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]).unwrap();
    public
}

/// Network n with VMS VMs (a, v1, v2, ...) on host h, gateway g1 on PUBLIC and service lb
/// over the first LB_MEMBERS VMs; the VMs and VM a's token towards the outside.
fn populate(admin: &RegistryClient, host: &RegistryClient) -> (Vec<VmRecord>, TokenGrant) {
    admin
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
    let vms: Vec<VmRecord> = (0..VMS)
        .map(|i| {
            admin
                .create_vm(&VmSpec {
                    id: if i == 0 { "a".into() } else { format!("v{i}") },
                    network: "n".into(),
                    host: Some("h".into()),
                    ..VmSpec::default()
                })
                .unwrap()
        })
        .collect();
    admin
        .create_gateway(&GatewaySpec {
            id: "g1".into(),
            network: "n".into(),
            underlay_addr: Fabric::host_addr(1),
            port: GW_PORT,
            public_addr: Some(PUBLIC),
        })
        .unwrap();
    let hour = 3_600_000;
    admin
        .create_service(&ServiceSpec {
            id: "lb".into(),
            public_addr: PUBLIC,
            public_port: LB_PORT,
            proto: L4Proto::Udp,
            vm_port: None,
            members: vms[..LB_MEMBERS]
                .iter()
                .map(|v| PoolMember {
                    vm: Some(v.id.clone()),
                    tag: None,
                    weight: 1,
                })
                .collect(),
            health: HealthCheckSpec {
                interval_ms: hour,
                timeout_ms: hour,
                ..HealthCheckSpec::default()
            },
            table_size: None,
        })
        .unwrap();
    let grant = host.request_token("a", SINK).expect("token for a");
    (vms, grant)
}

fn udp_packet(src: SocketAddrV4, dst: SocketAddrV4, payload: usize) -> Vec<u8> {
    let mut p = vec![0u8; 28 + payload];
    let mut ip = ipv4::Packet::new_unchecked(&mut p[..]);
    ipv4::Repr {
        src_addr: *src.ip(),
        dst_addr: *dst.ip(),
        protocol: ipv4::protocol::UDP,
        payload_len: 8 + payload,
        ttl: 64,
    }
    .emit(&mut ip);
    ip.fill_checksum();
    let mut u = udp::Packet::new_unchecked(ip.payload_mut());
    u.set_src_port(src.port());
    u.set_dst_port(dst.port());
    u.set_len((8 + payload) as u16);
    u.fill_checksum(*src.ip(), *dst.ip());
    p
}

fn scrape(ns: &Netns, addr: SocketAddr) -> Option<String> {
    ns.enter(move || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .ok()?
    .ok()
}

/// User + system CPU of process `pid`, ns (from /proc/PID/stat, in clock ticks).
fn process_cpu_ns(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    ticks * 1_000_000_000 / hz
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (the machine has 2 CPUs).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is this thread; `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    assert_eq!(rc, 0, "sched_setaffinity");
}

/// Sends `datagram` on the connected `socket` in sendmmsg batches of 32 until `stop`.
fn flood(socket: &UdpSocket, datagram: &[u8], stop: &AtomicBool) {
    pin_to_cpu(0);
    const BATCH: usize = 32;
    let mut iov = libc::iovec {
        iov_base: datagram.as_ptr() as *mut libc::c_void,
        iov_len: datagram.len(),
    };
    // SAFETY: all-zero mmsghdr is valid (null name, no control); the iovec is set below.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for m in &mut msgs {
        m.msg_hdr.msg_iov = &mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `msgs` holds BATCH headers pointing at `iov`, which points at `datagram`;
        // all outlive the call, and the kernel only reads them.
        unsafe {
            libc::sendmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0);
        }
    }
}

/// Raw IPv4/UDP packets from the public side to the service `lb` in sendmmsg batches of 32
/// until `stop`; with `new_flows` each from another source address and port (203.0.113.20-219,
/// ports 1024-65535: on the public segment, so reverse-path filters pass them).
fn lb_flood(raw: &std::os::fd::OwnedFd, template: &[u8], new_flows: bool, stop: &AtomicBool) {
    pin_to_cpu(0);
    const BATCH: usize = 32;
    let mut bufs = vec![template.to_vec(); BATCH];
    let mut dst = udp_floor_sockaddr(SocketAddrV4::new(PUBLIC, LB_PORT));
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: all-zero mmsghdr is valid (null name, no control); the fields are set below.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
        m.msg_hdr.msg_name = (&mut dst as *mut libc::sockaddr_in).cast();
        m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
    }
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        if new_flows {
            for b in bufs.iter_mut() {
                let port = 1024 + (n % 64512) as u16;
                b[15] = 20 + ((n / 64512) % 200) as u8;
                b[20..22].copy_from_slice(&port.to_be_bytes());
                n += 1;
            }
        }
        // SAFETY: `msgs` holds BATCH headers pointing at `iovs` (each at one of `bufs`) and at
        // `dst`; all outlive the call, and the kernel only reads them.
        unsafe {
            libc::sendmmsg(raw.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0);
        }
    }
}

fn udp_floor_sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn lb_run(b: &Bench, inner: usize, new_flows: bool, seconds: u64) -> Sample {
    let raw = b
        .public
        .enter(|| {
            // SAFETY: socket(2) with constant arguments; the descriptor is owned below.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
        })
        .expect("enter the public namespace");
    let src = SocketAddrV4::new(PUBLIC_HOST, 40000);
    let mut template = udp_packet(src, SocketAddrV4::new(PUBLIC, LB_PORT), inner - 28);
    // No UDP checksum (0): the source changes per packet; the kernel fills the IPv4 one.
    template[26..28].copy_from_slice(&[0, 0]);
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        std::thread::spawn(move || lb_flood(&raw, &template, new_flows, &stop))
    };
    let s = measure(b, "vnp_gateway_inbound_packets_total", seconds);
    stop.store(true, Ordering::Relaxed);
    flooder.join().unwrap();
    s
}

#[derive(Clone, Copy)]
struct Sample {
    pps: f64,
    ns_per_pkt: f64,
}

/// Measures the gateway over `seconds` after 1 s of warm-up while `load` runs.
fn measure(b: &Bench, metric: &str, seconds: u64) -> Sample {
    std::thread::sleep(Duration::from_secs(1));
    let (p0, c0) = b.sample(metric);
    let t0 = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    let (p1, c1) = b.sample(metric);
    let wall = t0.elapsed().as_secs_f64();
    let packets = (p1 - p0).max(1) as f64;
    Sample {
        pps: packets / wall,
        ns_per_pkt: (c1 - c0) as f64 / packets,
    }
}

fn outbound_run(b: &Bench, inner: usize, seconds: u64) -> Sample {
    let datagram = b.outbound_datagram(inner);
    let stop = Arc::new(AtomicBool::new(false));
    let socket = b.vm_socket.try_clone().unwrap();
    let flooder = {
        let stop = stop.clone();
        std::thread::spawn(move || flood(&socket, &datagram, &stop))
    };
    let s = measure(b, "vnp_gateway_outbound_packets_total", seconds);
    stop.store(true, Ordering::Relaxed);
    flooder.join().unwrap();
    s
}

fn inbound_run(b: &Bench, udp_floor: &Path, inner: usize, seconds: u64) -> Sample {
    let peer = SocketAddrV4::new(PUBLIC, b.vm.nat_ports[0].first);
    let mut sender = ChildGuard::spawn(
        "udp-floor-send",
        Command::new(udp_floor)
            .args(["--mode", "send", "--peer", &peer.to_string()])
            .args(["--payload", &(inner - 28).to_string()])
            .args(["--seconds", &(seconds + 3).to_string()])
            .args(["--sender-netns", b.public.name(), "--sender-cpu", "0"])
            .args(["--format", "json"])
            .stdout(std::process::Stdio::null()),
        None,
    )
    .expect("udp-floor sender");
    let s = measure(b, "vnp_gateway_inbound_packets_total", seconds);
    let _ = sender.terminate(Duration::from_secs(5));
    s
}

fn json_number(json: &str, key: &str) -> f64 {
    let at = json
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("{key} missing in {json}"))
        + key.len()
        + 3;
    json[at..]
        .split([',', '}'])
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn floor_run(udp_floor: &Path, payload: usize, seconds: u64) -> Sample {
    let out = run(Command::new(udp_floor)
        .args(["--payload", &payload.to_string()])
        .args(["--seconds", &seconds.to_string()])
        .args(["--sender-cpu", "0", "--receiver-cpu", "1"])
        .args(["--format", "json"]));
    Sample {
        pps: json_number(&out, "received_pps"),
        ns_per_pkt: json_number(&out, "total_cpu_ns_per_packet"),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seconds = env_u64("GATEWAY_BENCH_SECONDS", 5);
    let runs = env_u64("GATEWAY_BENCH_RUNS", 3) as usize;
    let (debug, release) = (target_dir().join("debug"), target_dir().join("release"));
    let build_debug = "cargo build -p vnp-registry -p vnp-registry-client";
    let build_release = "cargo build --release -p vnp-gateway -p vnp-udp-floor";
    let bins = Bins {
        vnpd: PathBuf::new(),
        tap_frontend: PathBuf::new(),
        registry: must_exist(debug.join("vnp-registry"), build_debug),
        vnpctl: must_exist(debug.join("vnpctl"), build_debug),
        gateway: must_exist(release.join("vnp-gateway"), build_release),
        qemu_launch: PathBuf::new(),
    };
    let udp_floor = must_exist(release.join("udp-floor"), build_release);
    let b = Bench::new(&bins);
    println!("| direction | inner packet | floor UDP payload | gateway pps | gateway CPU ns/pkt | floor pps | floor CPU ns/pkt | ratio |");
    println!("|---|---|---|---|---|---|---|---|");
    for dir in ["outbound", "inbound", "lb-hit", "lb-new"] {
        for inner in INNER {
            let payload = VNP_HEADER + inner;
            let mut samples = Vec::new();
            for run in 0..runs {
                let f = floor_run(&udp_floor, payload, seconds);
                let g = match dir {
                    "outbound" => outbound_run(&b, inner, seconds),
                    "lb-hit" => lb_run(&b, inner, false, seconds),
                    "lb-new" => lb_run(&b, inner, true, seconds),
                    _ => inbound_run(&b, &udp_floor, inner, seconds),
                };
                eprintln!(
                    "{dir} {inner} B run {run}: gateway {:.0} pps {:.0} ns/pkt | floor {:.0} pps {:.0} ns/pkt | ratio {:.2}",
                    g.pps, g.ns_per_pkt, f.pps, f.ns_per_pkt, g.ns_per_pkt / f.ns_per_pkt
                );
                samples.push((g, f));
            }
            let m = |f: &dyn Fn(&(Sample, Sample)) -> f64| median(samples.iter().map(f).collect());
            let (gc, fc) = (m(&|s| s.0.ns_per_pkt), m(&|s| s.1.ns_per_pkt));
            println!(
                "| {dir} | {inner} | {payload} | {:.0} | {gc:.0} | {:.0} | {fc:.0} | **{:.2}** |",
                m(&|s| s.0.pps),
                m(&|s| s.1.pps),
                gc / fc
            );
        }
    }
    let text = scrape(
        b.fabric.host(1),
        SocketAddr::from((Fabric::host_addr(1), METRICS_PORT)),
    )
    .unwrap_or_default();
    for l in text.lines() {
        let lb = l.starts_with("vnp_gateway_lb_") && !l.starts_with("vnp_gateway_lb_member");
        if (lb || l.starts_with("vnp_gateway_drops_total")) && !l.ends_with(" 0") {
            eprintln!("gateway {l}");
        }
    }
}
