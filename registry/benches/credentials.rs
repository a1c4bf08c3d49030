//! Credential minting benchmarks (issue #11; numbers go to docs/benchmarks.md).
//!
//! ```text
//! cargo bench -p vnp-registry --bench credentials            # both
//! cargo bench -p vnp-registry --bench credentials -- sign    # ES256 signing in process
//! cargo bench -p vnp-registry --bench credentials -- http    # access/identity tokens over mTLS
//! ```
//! Environment: `BENCH_SECS` (per HTTP run, default 5), `BENCH_CLIENTS` (comma list of client
//! thread counts, default 1,2,4).

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};
use vnp_registry_client::jwt::{self, JwtSigner};
use vnp_registry_client::metadata::Jwks;
use vnp_registry_client::*;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// ES256 signatures (with the JWT assembly) and verifications per second on one thread.
fn bench_sign() {
    let signer = JwtSigner::from_scalar("k1", &[0x42; 32]).unwrap();
    let jwks = Jwks {
        keys: vec![signer.jwk()],
    };
    let claims = |i: u64| {
        serde_json::json!({"iss": "vnp-registry", "sub": "default@n1.vnp.internal",
            "scope": "https://www.googleapis.com/auth/cloud-platform", "iat": 1_800_000_000u64 + i,
            "exp": 1_800_000_600u64 + i, "vnp": {"vm": "a", "network": "n1"}})
    };
    const N: u64 = 5_000;
    let (mut signs, mut verifies) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        let mut last = String::new();
        for i in 0..N {
            last = black_box(signer.sign(black_box(&claims(i))));
        }
        signs.push(N as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for _ in 0..N {
            black_box(jwt::verify(black_box(&last), &jwks, None, 1_800_005_000).unwrap());
        }
        verifies.push(N as f64 / t.elapsed().as_secs_f64());
    }
    println!(
        "sign: ES256 JWT signed {:>7.0}/s, verified {:>7.0}/s (one thread, median of 5 x {N})",
        median(signs),
        median(verifies)
    );
}

/// Access and identity tokens through the real `RegistryClient` against the real binary.
fn bench_http() {
    let secs: u64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let clients: Vec<usize> = std::env::var("BENCH_CLIENTS")
        .unwrap_or_else(|_| "1,2,4".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let f = common::Fixture::new("bench-creds");
    let admin = f.reg.client("admin");
    common::network_and_two_hosts(&admin, None);
    for i in 0..8 {
        admin
            .create_vm(&VmSpec {
                id: format!("v{i}"),
                network: "n1".into(),
                host: Some("h1".into()),
                ..VmSpec::default()
            })
            .unwrap();
    }
    for identity in [false, true] {
        for &n in &clients {
            let deadline = Instant::now() + Duration::from_secs(secs);
            let threads: Vec<_> = (0..n)
                .map(|t| {
                    let client = f.reg.client("h1");
                    std::thread::spawn(move || {
                        let mint = |i: usize| {
                            let vm = format!("v{}", i % 8);
                            if identity {
                                drop(
                                    client
                                        .mint_identity_token(&vm, "https://svc", true)
                                        .unwrap(),
                                );
                            } else {
                                drop(client.mint_access_token(&vm).unwrap());
                            }
                        };
                        mint(t);
                        let mut lat = Vec::with_capacity(100_000);
                        let mut i = t;
                        while Instant::now() < deadline {
                            let t0 = Instant::now();
                            mint(i);
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
                "http/{} clients={n} requests={:<6} throughput={:>6.0}/s  p50={:>5.0} us  p99={:>6.0} us",
                if identity { "identity-token" } else { "access-token  " },
                all.len(),
                all.len() as f64 / elapsed,
                pct(0.5).as_secs_f64() * 1e6,
                pct(0.99).as_secs_f64() * 1e6,
            );
        }
    }
}

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wants = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    if wants("sign") {
        bench_sign();
    }
    if wants("http") {
        bench_http();
    }
}
