//! Hostile connections against the real `vnp-registry` binary: clients that connect and never
//! start TLS, clients that finish the handshake and then say nothing, clients that stay idle
//! after a request. A well-behaved host keeps getting its tokens at normal latency, every
//! stalled connection is closed after its timeout, and one address cannot take more than its
//! share of the connection slots.
//!
//! The attackers use loopback source addresses 127.0.0.2-4 (all of 127/8 is local on Linux);
//! the good client uses 127.0.0.1.

mod common;

use common::Fixture;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use vnp_registry_client::*;

const MAX_CONNECTIONS: usize = 64;
const PER_IP: usize = 16;
/// Attempts per attacking address: more than [`PER_IP`], and all three together more than
/// [`MAX_CONNECTIONS`] (without the per-address cap they would take every slot).
const ATTEMPTS: usize = 30;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

fn populate(f: &Fixture) -> (VmRecord, VmRecord) {
    let admin = f.reg.client("admin");
    common::network_and_two_hosts(&admin, None);
    let vm = |id: &str, host: &str| VmSpec {
        id: id.into(),
        network: "n1".into(),
        host: Some(host.into()),
        ..VmSpec::default()
    };
    let a = admin.create_vm(&vm("a", "h1")).unwrap();
    let b = admin.create_vm(&vm("b", "h2")).unwrap();
    (a, b)
}

/// Latencies of `n` token requests a -> b on a fresh client (its own connection), sorted.
fn token_latencies(f: &Fixture, b: &VmRecord, n: usize) -> Vec<Duration> {
    let client = f.reg.client("h1");
    let mut out: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            client
                .request_token("a", b.ip)
                .expect("token for the good client");
            t.elapsed()
        })
        .collect();
    out.sort();
    out
}

fn tls_connector(tls: &Path) -> TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(tls.join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(tls.join("h2.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(tls.join("h2.key")).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    TlsConnector::from(Arc::new(config))
}

async fn connect_from(source: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    socket.connect(to).await
}

/// A held attacking connection and when it was last active.
enum Held {
    Tcp(TcpStream, Instant),
    Tls(Box<TlsStream<TcpStream>>, Instant),
}

impl Held {
    /// Waits for the registry to close the connection; returns how long after its last
    /// activity that happened (`None`: still open after `limit`).
    async fn closed_after(self, limit: Duration) -> Option<Duration> {
        let mut buf = [0u8; 64];
        let (since, result) = match self {
            Held::Tcp(mut s, since) => (since, tokio::time::timeout(limit, s.read(&mut buf)).await),
            Held::Tls(mut s, since) => (since, tokio::time::timeout(limit, s.read(&mut buf)).await),
        };
        match result {
            // EOF, a reset or a TLS alert: closed.
            Ok(Ok(0)) | Ok(Err(_)) => Some(since.elapsed()),
            Ok(Ok(n)) => panic!("the registry sent {n} bytes unasked"),
            Err(_) => None,
        }
    }
}

/// Opens [`ATTEMPTS`] connections that never start TLS from `source`; returns those the
/// registry kept (one refused for its address is closed at once: it reads as EOF).
async fn attack_half_open(source: Ipv4Addr, to: SocketAddr) -> Vec<Held> {
    let mut opened = Vec::new();
    for _ in 0..ATTEMPTS {
        let tcp = connect_from(source, to).await.expect("TCP connect");
        opened.push((tcp, Instant::now()));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut held = Vec::new();
    for (tcp, at) in opened {
        let mut probe = [0u8; 1];
        match tcp.try_read(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => held.push(Held::Tcp(tcp, at)),
            _ => {}
        }
    }
    held
}

/// Opens [`ATTEMPTS`] TLS connections from `source` that go silent after the handshake
/// (`idle`: after one request); returns those the registry kept.
async fn attack_tls(idle: bool, source: Ipv4Addr, to: SocketAddr, tls: &TlsConnector) -> Vec<Held> {
    let mut held = Vec::new();
    for _ in 0..ATTEMPTS {
        let tcp = connect_from(source, to).await.expect("TCP connect");
        let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
        let Ok(mut s) = tls.connect(name, tcp).await else {
            continue; // closed for its address
        };
        if idle {
            s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: registry\r\n\r\n")
                .await
                .unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
        }
        held.push(Held::Tls(Box::new(s), Instant::now()));
    }
    held
}

#[test]
fn stalled_connections_are_closed_and_a_good_client_is_served_meanwhile() {
    let f = Fixture::with_args(
        "conns",
        &[
            "--max-connections",
            &MAX_CONNECTIONS.to_string(),
            "--max-connections-per-ip",
            &PER_IP.to_string(),
            "--tls-handshake-timeout-secs",
            &HANDSHAKE_TIMEOUT.as_secs().to_string(),
            "--header-read-timeout-secs",
            &HEADER_TIMEOUT.as_secs().to_string(),
        ],
    );
    let (_, b) = populate(&f);
    // Warm up (first connection, caches), then the normal latency.
    token_latencies(&f, &b, 5);
    let normal = token_latencies(&f, &b, 20);
    let normal_p90 = normal[18];
    eprintln!(
        "normal token latency: median {:?}, p90 {normal_p90:?}",
        normal[10]
    );

    let to: SocketAddr = f.reg.url.trim_start_matches("https://").parse().unwrap();
    let tls = tls_connector(&f.reg.tls);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let mut attackers = Vec::new();
    for (kind, last_octet) in [("half-open", 2), ("stalled", 3), ("idle", 4)] {
        let source = Ipv4Addr::new(127, 0, 0, last_octet);
        let held = match kind {
            "half-open" => rt.block_on(attack_half_open(source, to)),
            _ => rt.block_on(attack_tls(kind == "idle", source, to, &tls)),
        };
        eprintln!("{kind} from {source}: {} of {ATTEMPTS} kept", held.len());
        assert_eq!(held.len(), PER_IP, "{kind}: the per-address cap");
        attackers.push((kind, held));
    }
    let attack_took = started.elapsed();
    assert!(
        attack_took < HANDSHAKE_TIMEOUT,
        "opening the connections took {attack_took:?}: the timeouts may have run meanwhile"
    );

    // Every attacking connection is still open (the timeouts have not run yet): the good
    // client gets its tokens as fast as before.
    let during = token_latencies(&f, &b, 20);
    eprintln!(
        "token latency with {} stalled connections open: median {:?}, p90 {:?}",
        3 * PER_IP,
        during[10],
        during[18]
    );
    let bound = normal_p90 * 5 + Duration::from_millis(200);
    assert!(
        during[18] <= bound,
        "p90 {:?} > {bound:?} (normal p90 {normal_p90:?})",
        during[18]
    );

    // Each stalled connection is closed once its timeout has run, not before.
    for (kind, held) in attackers {
        let timeout = if kind == "half-open" {
            HANDSHAKE_TIMEOUT
        } else {
            HEADER_TIMEOUT
        };
        let closes: Vec<Option<Duration>> = rt.block_on(async {
            let mut out = Vec::new();
            for h in held {
                out.push(h.closed_after(timeout + Duration::from_secs(10)).await);
            }
            out
        });
        for closed in &closes {
            let after = closed.unwrap_or_else(|| panic!("{kind}: never closed ({closes:?})"));
            assert!(
                after + Duration::from_millis(200) >= timeout,
                "{kind}: closed after {after:?}, before its timeout {timeout:?}"
            );
        }
        let latest = closes.iter().flatten().max().unwrap();
        eprintln!("{kind}: all {PER_IP} closed, the last {latest:?} after its last activity");
        assert!(
            *latest <= timeout + Duration::from_secs(3),
            "{kind}: closed only after {latest:?} (timeout {timeout:?})"
        );
    }
    let metrics = f.reg.client("admin").metrics_text().unwrap();
    let refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix("vnp_registry_connections_refused_per_ip_total "))
        .unwrap_or_else(|| panic!("no per-address counter:\n{metrics}"));
    assert_eq!(refused, (3 * (ATTEMPTS - PER_IP)).to_string());
}

/// Writes `bytes`, then reads until the registry closes the connection or `want` responses
/// have come; returns what arrived.
async fn exchange_raw(s: &mut TlsStream<TcpStream>, bytes: &[u8], want: usize) -> String {
    s.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(20);
    while String::from_utf8_lossy(&got).matches("HTTP/1.1 ").count() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break, // EOF, reset, or the deadline
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// A request refused without its body being looked at (here the 404 fallback), whose body
/// arrives after a pause, still leaves the connection usable for the next request; and a body
/// that never arrives is refused after the header-read timeout instead of holding the
/// connection. (Before the registry read every body first, hyper closed such a connection after
/// the response, and a pooling client's next request failed with "peer disconnected".)
#[test]
fn a_refused_request_with_a_late_body_leaves_the_connection_usable() {
    let f = Fixture::with_args("late-body", &["--header-read-timeout-secs", "2"]);
    let to: SocketAddr = f.reg.url.trim_start_matches("https://").parse().unwrap();
    let tls = tls_connector(&f.reg.tls);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
        let tcp = TcpStream::connect(to).await.unwrap();
        let mut s = tls.connect(name.clone(), tcp).await.unwrap();
        let head = b"PUT /v1/vms/a/guest-attributes/ns/ HTTP/1.1\r\nHost: r\r\n\
                     Content-Type: application/json\r\nContent-Length: 1\r\n\r\n";
        s.write_all(head).await.unwrap();
        s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let got = exchange_raw(&mut s, b"vGET /v1/health HTTP/1.1\r\nHost: r\r\n\r\n", 2).await;
        assert!(got.starts_with("HTTP/1.1 404"), "{got}");
        // The second request is answered (h2 may not read the health: 403 is an answer too).
        assert_eq!(
            got.matches("HTTP/1.1 ").count(),
            2,
            "the connection was closed after the refusal: {got}"
        );

        let tcp = TcpStream::connect(to).await.unwrap();
        let mut s = tls.connect(name, tcp).await.unwrap();
        let started = Instant::now();
        let head = b"PUT /v1/vms/a/guest-attributes/ns/k HTTP/1.1\r\nHost: r\r\n\
                     Content-Length: 10\r\n\r\nabc";
        let got = exchange_raw(&mut s, head, 1).await;
        let took = started.elapsed();
        assert!(got.starts_with("HTTP/1.1 400"), "{got}");
        assert!(got.contains("did not arrive within 2 s"), "{got}");
        assert!(
            took >= Duration::from_millis(1800) && took < Duration::from_secs(10),
            "refused after {took:?}"
        );
    });
}
