//! Maglev table build and lookup cost, and disruption on a member change.
//!
//! `cargo bench -p vnp-lb --bench maglev` prints medians over repeated runs; results and the
//! machine load go in docs/benchmarks.md.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::Instant;

use vnp_lb::{FlowKey, FlowTable, FlowTimeouts, Member, Table, DEFAULT_TABLE_SIZE};

fn members(n: usize) -> Vec<Member> {
    (0..n)
        .map(|i| Member::new(format!("vm-{i:04}"), 1))
        .collect()
}

fn key(i: u32) -> FlowKey {
    FlowKey {
        proto: vnp_lb::Proto::Tcp,
        client: Ipv4Addr::from(0xc633_0000 | (i & 0xffff)),
        client_port: (i >> 16) as u16 ^ 0x8000,
        service: Ipv4Addr::new(203, 0, 113, 10),
        service_port: 443,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    for n in [10usize, 100, 1000] {
        let m = members(n);
        let build_ms = median(
            (0..21)
                .map(|_| {
                    let t = Instant::now();
                    black_box(Table::build(black_box(&m), DEFAULT_TABLE_SIZE).unwrap());
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect(),
        );
        let table = Table::build(&m, DEFAULT_TABLE_SIZE).unwrap();
        let without = Table::build(&m[1..], DEFAULT_TABLE_SIZE).unwrap();
        let lookup_ns = median(
            (0..11)
                .map(|r| {
                    let t = Instant::now();
                    for i in 0..1_000_000u32 {
                        black_box(table.lookup_index(&key(i.wrapping_mul(2_654_435_761) ^ r)));
                    }
                    t.elapsed().as_secs_f64() * 1e9 / 1e6
                })
                .collect(),
        );
        let mut flows = FlowTable::new(1 << 20, FlowTimeouts::default());
        for i in 0..100_000 {
            flows.choose(key(i), 0, false, &table, |_| true);
        }
        let flow_ns = median(
            (0..11)
                .map(|_| {
                    let t = Instant::now();
                    for i in 0..100_000 {
                        black_box(flows.choose(key(i), 1, false, &table, |_| true));
                    }
                    t.elapsed().as_secs_f64() * 1e9 / 1e5
                })
                .collect(),
        );
        println!(
            "N={n:5} M={DEFAULT_TABLE_SIZE}: build {build_ms:.3} ms, table lookup {lookup_ns:.1} ns, \
             flow-table hit {flow_ns:.1} ns, disruption on removing one {:.4} (optimum {:.4})",
            table.disruption(&without),
            1.0 / n as f64
        );
    }
}
