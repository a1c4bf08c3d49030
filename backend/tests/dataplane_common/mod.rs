//! Shared fixtures of the data-plane tests: VM attachments with known secrets, a control plane
//! that mints tokens the way the registry does (the registry is not under test here), and
//! builders for hand-made VNP datagrams.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vnp_protocol::token::{mint, Expiry, Token, TokenFields, VmSecret};
use vnp_protocol::wire::options::ReturnToken;
use vnp_protocol::wire::VnpRepr;
use vnpd::datapath::{
    ControlPlane, DataPathTuning, PeerToken, RefusalReason, VmAttachment, VmPort,
};

/// Network id of the test network.
pub const NETWORK: u32 = 77;
/// Guest MTU (1500-byte underlay).
pub const MTU: u16 = 1452;
/// The test network's router.
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

/// A per-test unique socket path under /tmp.
pub fn socket_path(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    PathBuf::from(format!(
        "/tmp/vnp-dp-{}-{}-{tag}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A VM of the test network: its attachment and its secret.
pub fn vm(
    name: &str,
    last_octet: u8,
    secret_byte: u8,
    queue_pairs: u16,
) -> (VmAttachment, VmSecret) {
    let secret = VmSecret::from_bytes([secret_byte; 32]);
    let att = VmAttachment {
        vm_id: format!("vm-{name}"),
        network_vni: NETWORK,
        vm_ip: Ipv4Addr::new(10, 77, 0, last_octet),
        prefix_len: 24,
        router_ip: ROUTER,
        mac: [0x02, 0, 0, 0x77, 0, last_octet],
        hostname: format!("vm-{name}"),
        guest_mtu: MTU,
        secret: VmSecret::from_bytes([secret_byte; 32]),
        host_addr: Ipv4Addr::LOCALHOST,
        udp_port: 0,
        socket_path: socket_path(name),
        queue_pairs,
    };
    (att, secret)
}

/// A started VM port of the test network, with what tests address it by.
pub struct Vm {
    pub port: Arc<VmPort>,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub secret: VmSecret,
    pub socket: PathBuf,
}

/// Starts VM `name` (address 10.77.0.`octet`) with `pairs` queue pairs and registers it with
/// `control`, so that peers get tokens for it.
pub fn start_vm(control: &Arc<MintingControl>, name: &str, octet: u8, pairs: u16) -> Vm {
    start_vm_with(control, name, octet, pairs, DataPathTuning::default())
}

/// [`start_vm`] with explicit data-path tuning.
pub fn start_vm_with(
    control: &Arc<MintingControl>,
    name: &str,
    octet: u8,
    pairs: u16,
    tuning: DataPathTuning,
) -> Vm {
    let (att, secret) = vm(name, octet, octet.wrapping_mul(17), pairs);
    let (ip, mac, socket) = (att.vm_ip, att.mac, att.socket_path.clone());
    let port = Arc::new(VmPort::start_with(att, control.clone(), tuning).expect("start port"));
    control.register(&port, ip, &secret);
    Vm {
        port,
        ip,
        mac,
        secret,
        socket,
    }
}

pub fn now() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as u32
}

struct Known {
    port: Weak<VmPort>,
    vm_ip: Ipv4Addr,
    secret: VmSecret,
}

/// Plays the registry's part for the data path: answers token requests (asynchronously, from
/// its own thread, like the real control thread) by minting with the destination's secret.
pub struct MintingControl {
    tx: Mutex<Sender<(String, Ipv4Addr)>>,
    known: Arc<Mutex<HashMap<String, Known>>>,
    denied: Arc<Mutex<HashSet<(String, Ipv4Addr)>>>,
    pub requests: Arc<AtomicUsize>,
}

impl MintingControl {
    pub fn new() -> Arc<Self> {
        let (tx, rx) = mpsc::channel::<(String, Ipv4Addr)>();
        let known: Arc<Mutex<HashMap<String, Known>>> = Arc::default();
        let denied: Arc<Mutex<HashSet<(String, Ipv4Addr)>>> = Arc::default();
        let requests = Arc::new(AtomicUsize::new(0));
        {
            let known = known.clone();
            let denied = denied.clone();
            std::thread::spawn(move || {
                while let Ok((src_vm, dst)) = rx.recv() {
                    let known = known.lock().unwrap();
                    let Some(src) = known.get(&src_vm) else {
                        continue;
                    };
                    let Some(src_port) = src.port.upgrade() else {
                        continue;
                    };
                    if denied.lock().unwrap().contains(&(src_vm.clone(), dst)) {
                        src_port.refuse_token(dst, RefusalReason::PolicyDenied);
                        continue;
                    }
                    let Some(d) = known.values().find(|k| k.vm_ip == dst) else {
                        src_port.refuse_token(dst, RefusalReason::UnknownDestination);
                        continue;
                    };
                    let Some(dst_port) = d.port.upgrade() else {
                        continue;
                    };
                    let expiry = Expiry(now() + 600);
                    let fields = TokenFields {
                        src_host: *src_port.udp_addr().ip(),
                        src_port: src_port.udp_addr().port(),
                        src_vm: src.vm_ip,
                        dst_host: *dst_port.udp_addr().ip(),
                        dst_port: dst_port.udp_addr().port(),
                        dst_vm: dst,
                        network_id: NETWORK,
                        expiry,
                    };
                    src_port.install_token(
                        dst,
                        PeerToken {
                            dst_host: fields.dst_host,
                            dst_port: fields.dst_port,
                            token: mint(&d.secret, &fields),
                            expiry,
                        },
                    );
                }
            });
        }
        Arc::new(Self {
            tx: Mutex::new(tx),
            known,
            denied,
            requests,
        })
    }

    /// Makes a started port known (by its VM id), with its address and secret.
    pub fn register(&self, port: &Arc<VmPort>, vm_ip: Ipv4Addr, secret: &VmSecret) {
        self.known.lock().unwrap().insert(
            port.vm_id().to_string(),
            Known {
                port: Arc::downgrade(port),
                vm_ip,
                secret: VmSecret::from_bytes(*secret.as_bytes()),
            },
        );
    }

    /// Policy: refuse tokens from `src_vm` to `dst`.
    pub fn deny(&self, src_vm: &str, dst: Ipv4Addr) {
        self.denied
            .lock()
            .unwrap()
            .insert((src_vm.to_string(), dst));
    }
}

impl ControlPlane for MintingControl {
    fn request_token(&self, src_vm: &str, dst: Ipv4Addr) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.lock().unwrap().send((src_vm.to_string(), dst));
    }
}

/// An IPv4/UDP packet `src -> dst` with `payload` bytes of payload.
pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let sum = vnp_protocol::wire::ipv4::checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p[20..22].copy_from_slice(&4000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5000u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

/// A VNP datagram: header, inner packet, optional return-token option.
pub fn datagram(
    network_id: u32,
    token: Token,
    expiry: Expiry,
    inner: &[u8],
    return_token: Option<ReturnToken>,
) -> Vec<u8> {
    let mut d = VnpRepr {
        network_id,
        token,
        expiry,
        has_options: return_token.is_some(),
    }
    .to_bytes()
    .to_vec();
    d.extend_from_slice(inner);
    if let Some(rt) = return_token {
        let mut o = [0u8; ReturnToken::WIRE_LEN];
        rt.emit(&mut o).unwrap();
        d.extend_from_slice(&o);
    }
    d
}

/// The token a registry would mint for `from` (a plain UDP socket acting as VM `src_vm`'s host)
/// to reach `dst_vm` behind `to`, with `dst_secret`.
pub fn token_for(
    from: SocketAddrV4,
    src_vm: Ipv4Addr,
    to: SocketAddrV4,
    dst_vm: Ipv4Addr,
    dst_secret: &VmSecret,
    network_id: u32,
    expiry: Expiry,
) -> Token {
    mint(
        dst_secret,
        &TokenFields {
            src_host: *from.ip(),
            src_port: from.port(),
            src_vm,
            dst_host: *to.ip(),
            dst_port: to.port(),
            dst_vm,
            network_id,
            expiry,
        },
    )
}

/// A plain UDP socket on loopback, posing as another host's VM port.
pub fn raw_peer() -> (UdpSocket, SocketAddrV4) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let std::net::SocketAddr::V4(a) = s.local_addr().unwrap() else {
        unreachable!()
    };
    (s, a)
}

/// Waits until `f` is true (polling), panicking with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `value` stops changing for `quiet` (e.g. a receiver draining its socket).
pub fn settle(timeout: Duration, quiet: Duration, mut value: impl FnMut() -> u64) -> u64 {
    let start = Instant::now();
    let mut last = value();
    let mut since = Instant::now();
    while start.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(50));
        let v = value();
        if v != last {
            last = v;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            break;
        }
    }
    last
}
