//! Metadata requests from a guest-side client: a namespace guest (the host kernel's TCP behind
//! `vnp-tap-frontend`) runs curl, which fetches `instance/hostname` N times over one keep-alive
//! connection and prints each transfer's time; C such curls run at once. Reported: requests
//! per second, p50/p99 of a request as curl sees it, and vnpd's CPU seconds for them (all its
//! threads, `/proc/PID/stat`), hence requests per vnpd core-second. The bridge's rate limit is
//! lifted for the run (`[bridge] requests_per_sec`). Then the same for the access-token path
//! (served from the host's cache after the first mint).
//!
//! Needs root. Run: `cargo bench -p vnp-e2e --bench metadata_guest` (knobs: `MD_REQUESTS`
//! per client, default 2000; `MD_CLIENTS`, default "1,4"; `MD_RUNS`, default 3).

use anyhow::{anyhow, Context, Result};
use vnp_e2e::cluster::{Cluster, ClusterOptions};
use vnp_testkit::tap_guest::TapGuest;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// User + system CPU seconds of a process, all threads (`/proc/PID/stat` fields 14 and 15).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .ok_or_else(|| anyhow!("short /proc/{pid}/stat"))?
        .iter()
        .map(|f| f.parse::<u64>().unwrap_or(0))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Run {
    per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    per_vnpd_core_sec: f64,
}

/// `clients` curls of `n` requests each at once; every request must answer 200.
fn run(g: &TapGuest, vnpd: u32, path: &str, clients: usize, n: usize) -> Result<Run> {
    let url = format!("http://169.254.169.254/computeMetadata/v1/{path}");
    // Each curl writes its own file: their -w lines would interleave on one pipe.
    let script = format!(
        "d=$(mktemp -d); for c in $(seq {clients}); do (for i in $(seq {n}); do \
         echo \"url = {url}\"; echo 'output = /dev/null'; done > $d/$c.cfg; \
         curl -s --noproxy '*' -H 'Metadata-Flavor: Google' -w '%{{http_code}} %{{time_total}}\\n' \
         -K $d/$c.cfg > $d/$c.out) & done; wait; cat $d/*.out; rm -rf $d"
    );
    let cpu0 = cpu_seconds(vnpd)?;
    let t0 = std::time::Instant::now();
    let out = g.netns().command("sh").args(["-c", &script]).output()?;
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(vnpd)? - cpu0;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut times = Vec::new();
    for line in text.lines() {
        let (code, t) = line.split_once(' ').context("curl output")?;
        if code != "200" {
            return Err(anyhow!("a request answered {code}"));
        }
        times.push(t.parse::<f64>()? * 1e6);
    }
    if times.len() != clients * n {
        return Err(anyhow!(
            "{} of {} requests answered",
            times.len(),
            clients * n
        ));
    }
    times.sort_by(f64::total_cmp);
    let total = times.len() as f64;
    Ok(Run {
        per_sec: total / elapsed,
        p50_us: percentile(&times, 0.5),
        p99_us: percentile(&times, 0.99),
        per_vnpd_core_sec: total / cpu.max(0.01),
    })
}

fn main() -> Result<()> {
    let n: usize = env_or("MD_REQUESTS", 10000);
    let runs: usize = env_or("MD_RUNS", 3);
    let clients: Vec<usize> = std::env::var("MD_CLIENTS")
        .unwrap_or_else(|_| "1,4".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "metadata_guest: {n} requests per client, clients {clients:?}, {runs} runs, load {load}"
    );
    let c = Cluster::start(&ClusterOptions {
        prefix: "vnpmb".into(),
        hosts: 1,
        vnpd_log: "warn".into(),
        vnpd_config_tables: "[bridge]\nrequests_per_sec = 1000000\nrequest_burst = 1000000\n"
            .into(),
        ..ClusterOptions::default()
    })?;
    c.create_vm("vm-a", 0, &[])?;
    let att = c.attach(0, "vm-a")?;
    let g = c.tap_guest(&att, false)?;
    let vnpd = c.host(0).vnpd_pid().context("vnpd pid")?;
    println!("| path | clients | requests/s | p50 | p99 | requests per vnpd CPU-second |");
    println!("|---|---|---|---|---|---|");
    for path in [
        "instance/hostname",
        "instance/service-accounts/default/token",
    ] {
        for &cl in &clients {
            let rs: Vec<Run> = (0..runs)
                .map(|_| run(&g, vnpd, path, cl, n))
                .collect::<Result<_>>()?;
            let m = |f: fn(&Run) -> f64| median(rs.iter().map(f).collect());
            println!(
                "| `{path}` | {cl} | {:.0} | {:.0} µs | {:.0} µs | {:.0} |",
                m(|r| r.per_sec),
                m(|r| r.p50_us),
                m(|r| r.p99_us),
                m(|r| r.per_vnpd_core_sec)
            );
        }
    }
    eprintln!(
        "load after: {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default()
    );
    drop(g);
    drop(c);
    Ok(())
}
