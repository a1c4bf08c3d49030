//! Metadata server throughput on one core: (1) the pure request handling (parse, route,
//! encode) of a typical GET; (2) whole requests over TCP: a smoltcp client stack at the VM's
//! address and the bridge's `Server` in one thread, one keep-alive connection with 8 requests
//! in flight (so the number includes the client's TCP work too). Prints requests per second
//! and the p50/p99 of batches. Run: `cargo bench -p vnpd --bench metadata_http`.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint};
use vnpd::bridge::counters::BridgeCounters;
use vnpd::bridge::dns::Names;
use vnpd::bridge::http::{parse, Parsed};
use vnpd::bridge::netif::Queues;
use vnpd::bridge::routes::{route, Cached, Decision, State, TokenCache};
use vnpd::bridge::server::Server;
use vnpd::bridge::session::Sessions;
use vnpd::bridge::source::{InstanceMetadata, VmMetadata};
use vnpd::bridge::{BridgeLimits, METADATA_IP};

const REQ: &[u8] =
    b"GET /computeMetadata/v1/instance/hostname HTTP/1.1\r\nHost: metadata.google.internal\r\nMetadata-Flavor: Google\r\nUser-Agent: bench\r\n\r\n";

fn metadata() -> VmMetadata {
    VmMetadata {
        etag: "e".into(),
        instance: InstanceMetadata {
            id: "1".into(),
            name: "vm-a".into(),
            hostname: "vm-a.example".into(),
            ip: "10.0.0.2".into(),
            mtu: 1452,
            ..InstanceMetadata::default()
        },
        ..VmMetadata::default()
    }
}

fn pure(n: usize) -> f64 {
    let cached = Cached::new(metadata());
    let tokens = TokenCache::default();
    let sessions = Sessions::default();
    let start = Instant::now();
    let mut bytes = 0;
    for _ in 0..n {
        let Parsed::Complete(req, _) = parse(REQ) else {
            panic!()
        };
        let state = State {
            cached: Some(&cached),
            tokens: &tokens,
            sessions: &sessions,
            now: Instant::now(),
            waited: false,
        };
        let Decision::Reply(r) = route(&req, &state) else {
            panic!()
        };
        bytes += r.encode(false).len();
    }
    assert!(bytes > 0);
    n as f64 / start.elapsed().as_secs_f64()
}

fn over_tcp(batches: usize, depth: usize) -> (f64, Vec<Duration>) {
    let limits = BridgeLimits {
        rate_per_sec: u32::MAX / 2,
        burst: u32::MAX / 2,
        ..BridgeLimits::default()
    };
    let vm = Ipv4Addr::new(10, 0, 0, 2);
    let counters = Arc::new(BridgeCounters::default());
    let mut srv = Server::new(
        Names::new(METADATA_IP, "vm-a", vm),
        1452,
        limits,
        counters,
        Instant::now(),
    );
    srv.metadata(metadata(), Instant::now());
    let mut q = Queues::new(1452);
    let now = smoltcp::time::Instant::now;
    let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut q, now());
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(IpAddress::Ipv4(vm), 24));
    });
    let _ = iface
        .routes_mut()
        .add_default_ipv4_route(Ipv4Addr::new(10, 0, 0, 1));
    let mut sockets = SocketSet::new(Vec::new());
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 65536]),
        tcp::SocketBuffer::new(vec![0; 65536]),
    );
    // The client sends whole requests and reads at once: no Nagle, no delayed ACK, so the
    // number is the two stacks' CPU, not their timers.
    s.set_nagle_enabled(false);
    s.set_ack_delay(None);
    s.connect(
        iface.context(),
        IpEndpoint::new(IpAddress::Ipv4(METADATA_IP), 80),
        40000,
    )
    .unwrap();
    let h = sockets.add(s);
    let pump =
        |iface: &mut Interface, q: &mut Queues, sockets: &mut SocketSet, srv: &mut Server| {
            iface.poll(now(), q, sockets);
            for p in q.to_guest.drain(..) {
                srv.packet_from_guest(p);
            }
            srv.step(Instant::now());
            q.from_guest.extend(srv.take_packets_to_guest());
            iface.poll(now(), q, sockets);
        };
    for _ in 0..5 {
        pump(&mut iface, &mut q, &mut sockets, &mut srv);
    }
    let mut times = Vec::with_capacity(batches);
    let start = Instant::now();
    let mut buf = vec![0u8; 65536];
    for _ in 0..batches {
        let t = Instant::now();
        let sock = sockets.get_mut::<tcp::Socket>(h);
        for _ in 0..depth {
            sock.send_slice(REQ).unwrap();
        }
        let mut answered = 0;
        while answered < depth {
            pump(&mut iface, &mut q, &mut sockets, &mut srv);
            let sock = sockets.get_mut::<tcp::Socket>(h);
            while sock.can_recv() {
                let n = sock.recv_slice(&mut buf).unwrap();
                answered += buf[..n].windows(8).filter(|w| w == b"HTTP/1.1").count();
            }
        }
        times.push(t.elapsed());
    }
    let rate = (batches * depth) as f64 / start.elapsed().as_secs_f64();
    times.sort();
    (rate, times)
}

fn main() {
    let p = pure(200_000);
    println!("pure parse+route+encode: {p:.0} requests/s on one core");
    let depth = 8;
    let (rate, times) = over_tcp(5_000, depth);
    let pct = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    println!(
        "over TCP (smoltcp client + bridge, one thread, {depth} in flight): {rate:.0} requests/s; \
         batch of {depth}: p50 {:?} p99 {:?}",
        pct(0.5),
        pct(0.99)
    );
}
