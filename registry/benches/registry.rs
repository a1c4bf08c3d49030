//! Registry benchmarks (not a timed test: numbers go to docs/benchmarks.md).
//!
//! ```text
//! cargo bench -p vnp-registry --bench registry            # everything
//! cargo bench -p vnp-registry --bench registry -- mint    # token minting only
//! cargo bench -p vnp-registry --bench registry -- http    # requests over mTLS only
//! ```
//! Environment: `BENCH_SECS` (per HTTP run, default 5), `BENCH_CLIENTS` (comma list of client
//! thread counts, default 1,2,4,8), `BENCH_WORKERS` (registry worker threads, default: cores).

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use vnp_protocol::token::{Expiry, TokenFields, TokenMinter, VmSecret};
use vnp_registry::model::Model;
use vnp_registry::plan;
use vnp_registry::tokens::{grant, TokenPolicy};
use vnp_registry_client::*;

const REUSE: plan::PortReuse = plan::PortReuse {
    now: 1000,
    quarantine_secs: 600,
};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn fields(i: u32) -> TokenFields {
    TokenFields {
        src_host: Ipv4Addr::new(198, 18, 0, 1),
        src_port: 40000 + (i & 0xff) as u16,
        src_vm: Ipv4Addr::from(0x0a01_0000 | (i & 0xffff)),
        dst_host: Ipv4Addr::new(198, 18, 0, 2),
        dst_port: 40001,
        dst_vm: Ipv4Addr::new(10, 1, 0, 3),
        network_id: 7,
        expiry: Expiry(1_800_000_000 + i),
    }
}

/// Tokens per second on one thread: the precomputed-key minter and a fresh HMAC key each time.
fn bench_mint() {
    let secret = VmSecret::from_bytes([0x42; 32]);
    let minter = TokenMinter::new(&secret);
    const N: u32 = 2_000_000;
    let mut with_minter = Vec::new();
    let mut fresh_key = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for i in 0..N {
            black_box(minter.mint(black_box(&fields(i))));
        }
        with_minter.push(f64::from(N) / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for i in 0..N / 4 {
            black_box(vnp_protocol::token::mint(
                black_box(&secret),
                black_box(&fields(i)),
            ));
        }
        fresh_key.push(f64::from(N / 4) / t.elapsed().as_secs_f64());
    }
    println!(
        "mint/TokenMinter (1 thread): median {:.0} tokens/s over 5 runs of {N}",
        median(with_minter)
    );
    println!(
        "mint/fresh key   (1 thread): median {:.0} tokens/s over 5 runs of {}",
        median(fresh_key),
        N / 4
    );

    // The registry's whole decision (lookups, ownership, policy, mint, hex) without HTTP.
    let mut m = Model::default();
    let apply = |m: &mut Model, ops: Vec<vnp_registry::model::Op>| m.apply(&ops);
    let n = NetworkSpec {
        id: "n".into(),
        vni: Some(7),
        cidr: "10.1.0.0/16".parse().unwrap(),
        mtu: None,
        default_policy: None,
        nat_block: Some(64),
    };
    let ops = plan::create_network(&m, &n).unwrap().0;
    apply(&mut m, ops);
    for (h, last) in [("h1", 1), ("h2", 2)] {
        let s = HostSpec {
            id: h.into(),
            underlay_addr: Ipv4Addr::new(198, 18, 0, last),
            port_range: None,
        };
        let ops = plan::create_host(&m, &s).unwrap().0;
        apply(&mut m, ops);
    }
    for i in 0..200 {
        let s = VmSpec {
            id: format!("vm{i}"),
            network: "n".into(),
            host: Some(if i % 2 == 0 { "h1" } else { "h2" }.into()),
            ..VmSpec::default()
        };
        let ops = plan::create_vm(&m, &s, VmSecret::from_bytes([i as u8; 32]), REUSE)
            .unwrap()
            .0;
        apply(&mut m, ops);
    }
    for i in 0..20 {
        let r = PolicyRuleSpec {
            id: format!("r{i}"),
            network: "n".into(),
            action: PolicyAction::Allow,
            a: Selector::Tag(format!("t{i}")),
            b: Selector::Any,
        };
        let ops = plan::create_rule(&m, &r).unwrap().0;
        apply(&mut m, ops);
    }
    let caller = Identity {
        role: Role::Host,
        id: "h1".into(),
    };
    let dsts: Vec<Ipv4Addr> = (0..100)
        .map(|i| m.vms[&format!("vm{}", 2 * i + 1)].ip)
        .collect();
    let mut rates = Vec::new();
    const M: usize = 300_000;
    for _ in 0..5 {
        let t = Instant::now();
        for i in 0..M {
            let req = TokenRequest {
                src_vm: Some(format!("vm{}", 2 * (i % 100))),
                src_gateway: None,
                src_ip: None,
                dst_ip: dsts[i % 100],
            };
            black_box(grant(&m, &caller, &req, 1_700_000_000, TokenPolicy { ttl_s: 600 }).unwrap());
        }
        rates.push(M as f64 / t.elapsed().as_secs_f64());
    }
    println!(
        "grant/decision   (1 thread, 200 VMs, 20 rules): median {:.0} grants/s over 5 runs of {M}",
        median(rates)
    );
}

/// Token requests over keep-alive mutual TLS on loopback against the real binary.
fn bench_http() {
    let secs: u64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let clients: Vec<usize> = std::env::var("BENCH_CLIENTS")
        .unwrap_or_else(|_| "1,2,4,8".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let workers = std::env::var("BENCH_WORKERS").ok();
    let mut extra = vec![];
    if let Some(w) = &workers {
        extra = vec!["--workers", w.as_str()];
    }
    let f = common::Fixture::with_args("bench", &extra);
    let admin = f.reg.client("admin");
    admin
        .create_network(&NetworkSpec {
            id: "n".into(),
            vni: None,
            cidr: "10.1.0.0/24".parse().unwrap(),
            mtu: None,
            default_policy: None,
            nat_block: Some(64),
        })
        .unwrap();
    admin
        .create_host(&HostSpec {
            id: "h1".into(),
            underlay_addr: Ipv4Addr::new(198, 18, 0, 1),
            port_range: None,
        })
        .unwrap();
    admin
        .create_host(&HostSpec {
            id: "h2".into(),
            underlay_addr: Ipv4Addr::new(198, 18, 0, 2),
            port_range: None,
        })
        .unwrap();
    let mut pairs = Vec::new();
    for i in 0..16 {
        let s = admin
            .create_vm(&VmSpec {
                id: format!("s{i}"),
                network: "n".into(),
                host: Some("h1".into()),
                ..VmSpec::default()
            })
            .unwrap();
        let d = admin
            .create_vm(&VmSpec {
                id: format!("d{i}"),
                network: "n".into(),
                host: Some("h2".into()),
                ..VmSpec::default()
            })
            .unwrap();
        pairs.push((s.id, d.ip));
    }
    println!(
        "http: registry workers = {}, {secs} s per run, keep-alive mTLS (TLS 1.3), loopback",
        workers.as_deref().unwrap_or("default (one per core)")
    );
    for lean in [false, true] {
        for &n in &clients {
            let deadline = Instant::now() + Duration::from_secs(secs);
            let threads: Vec<_> = (0..n)
                .map(|t| {
                    let client = f.reg.client("h1");
                    let mut lean_client = lean.then(|| LeanClient::connect(&f, "h1"));
                    let pairs = pairs.clone();
                    let requests: Vec<Vec<u8>> = pairs
                        .iter()
                        .map(|(s, d)| token_request_bytes(s, *d))
                        .collect();
                    std::thread::spawn(move || {
                        // Warm the connection outside the measurement.
                        client.request_token(&pairs[0].0, pairs[0].1).unwrap();
                        if let Some(c) = lean_client.as_mut() {
                            assert_eq!(c.call(&requests[0]), 200);
                        }
                        let mut lat = Vec::with_capacity(200_000);
                        let mut i = t;
                        while Instant::now() < deadline {
                            let (s, d) = &pairs[i % pairs.len()];
                            let t0 = Instant::now();
                            match lean_client.as_mut() {
                                Some(c) => assert_eq!(c.call(&requests[i % requests.len()]), 200),
                                None => drop(client.request_token(s, *d).unwrap()),
                            }
                            lat.push(t0.elapsed());
                            i += 1;
                        }
                        lat
                    })
                })
                .collect();
            let start = Instant::now();
            let mut all: Vec<Duration> = threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect();
            let elapsed = start.elapsed().as_secs_f64().max(secs as f64);
            all.sort();
            let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
            println!(
            "http/token {} clients={n:<2} requests={:<7} throughput={:>7.0} req/s  p50={:>6.0} us  p99={:>6.0} us  max={:>6.0} us",
            if lean { "lean-rustls" } else { "RegistryClient" },
            all.len(),
            all.len() as f64 / elapsed,
            pct(0.50).as_secs_f64() * 1e6,
            pct(0.99).as_secs_f64() * 1e6,
            all.last().unwrap().as_secs_f64() * 1e6,
        );
        }
    }
}

/// A minimal HTTP/1.1 keep-alive client over rustls (mTLS), so that the load generator costs
/// little CPU next to the registry on the same two cores. Sends a pre-built request and reads
/// exactly one response (headers + Content-Length body) per call.
struct LeanClient {
    tls: rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
    buf: Vec<u8>,
}

impl LeanClient {
    fn connect(f: &common::Fixture, stem: &str) -> LeanClient {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        let tls = &f.reg.tls;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(tls.join("ca.pem")).unwrap())
            .unwrap();
        let chain = vec![CertificateDer::from_pem_file(tls.join(format!("{stem}.pem"))).unwrap()];
        let key = PrivateKeyDer::from_pem_file(tls.join(format!("{stem}.key"))).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        let addr = f.reg.url.trim_start_matches("https://");
        let sock = std::net::TcpStream::connect(addr).unwrap();
        sock.set_nodelay(true).unwrap();
        let conn = rustls::ClientConnection::new(
            std::sync::Arc::new(config),
            ServerName::IpAddress(Ipv4Addr::LOCALHOST.into()),
        )
        .unwrap();
        LeanClient {
            tls: rustls::StreamOwned::new(conn, sock),
            buf: Vec::with_capacity(4096),
        }
    }

    /// One request/response; returns the status code.
    fn call(&mut self, request: &[u8]) -> u16 {
        use std::io::{Read, Write};
        self.tls.write_all(request).unwrap();
        self.tls.flush().unwrap();
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        loop {
            let n = self.tls.read(&mut chunk).unwrap();
            assert!(n > 0, "registry closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end])
                    .unwrap()
                    .to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap();
                if self.buf.len() >= end + 4 + len {
                    return head[9..12].parse().unwrap();
                }
            }
        }
    }
}

fn token_request_bytes(src: &str, dst: Ipv4Addr) -> Vec<u8> {
    let body = serde_json::to_string(&TokenRequest {
        src_vm: Some(src.into()),
        src_gateway: None,
        src_ip: None,
        dst_ip: dst,
    })
    .unwrap();
    format!(
        "POST /v1/tokens HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn main() {
    // `cargo bench` passes `--bench`; our own filter is the first other argument.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let want = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    if want("mint") {
        bench_mint();
    }
    if want("http") {
        bench_http();
    }
}
