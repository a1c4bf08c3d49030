//! The bulk benchmark of issue 13: guest TCP payload per vnpd core, between two
//! network-namespace guests (`vnp-tap-frontend`) on two vnpd hosts, next to the kernel's
//! GSO/GRO UDP floor measured in the same run on the same underlay.
//!
//! For each underlay setting (`tx-udp-segmentation` on, as veth has it, and off) it measures
//! `udp-floor --gso N --gro` between the two host namespaces, then for each guest offload
//! setting (asked for / `--no-offloads`) starts both guests and runs `iperf3` from vm-a to vm-b
//! `BULK_RUNS` times. vnpd's and the fixtures' CPU comes from `/proc/PID/stat` (user + system,
//! all threads) over each iperf3 run.
//!
//! Run (root, release build): `cargo bench -p vnp-e2e --bench bulk`. Knobs: `BULK_SECONDS`
//! (per iperf3 run, default 10), `BULK_RUNS` (3), `BULK_FLOOR_SECONDS` (5), `BULK_OFFLOADS`
//! (`on,off`), `BULK_UNDERLAY` (`gso,nogso`), `BULK_PARALLEL` (iperf3 `-P`, 1), `UDP_FLOOR`
//! (default: `udp-floor` next to the other binaries).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use vnp_e2e::bins::bin_dir;
use vnp_e2e::cluster::{Cluster, ClusterOptions};
use vnp_testkit::tap_guest::TapGuest;
use vnpd_admin_api::AttachmentInfo;

/// UDP payload of one VNP datagram at full guest MTU: 20-byte VNP header + 1452-byte packet.
const FLOOR_PAYLOAD: usize = 1472;
/// Segments per GSO send: 44 x 1472 = 64768 bytes, the most under 64 KiB.
const FLOOR_SEGMENTS: usize = 44;

#[derive(Debug, Clone)]
struct Knobs {
    seconds: u64,
    runs: usize,
    floor_seconds: u64,
    offloads: Vec<bool>,
    underlay_gso: Vec<bool>,
    parallel: u32,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn knobs() -> Knobs {
    let list = |name: &str, default: &str, yes: &str| -> Vec<bool> {
        std::env::var(name)
            .unwrap_or_else(|_| default.to_string())
            .split(',')
            .map(|v| v.trim() == yes)
            .collect()
    };
    Knobs {
        seconds: env_or("BULK_SECONDS", 10),
        runs: env_or("BULK_RUNS", 3),
        floor_seconds: env_or("BULK_FLOOR_SECONDS", 5),
        offloads: list("BULK_OFFLOADS", "on,off", "on"),
        underlay_gso: list("BULK_UNDERLAY", "gso,nogso", "gso"),
        parallel: env_or("BULK_PARALLEL", 1),
    }
}

/// User + system CPU seconds of a process, all threads (`/proc/PID/stat` fields 14 and 15).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may contain spaces: fields start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')', field 3 (state) is index 0, so utime (14) is index 11 and stime (15) 12.
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

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Sets `tx-udp-segmentation` on both hosts' underlay interfaces.
fn set_underlay_gso(c: &Cluster, on: bool) -> Result<()> {
    for i in 0..2 {
        c.host_ns(i)
            .run(&[
                "ethtool",
                "-K",
                "eth0",
                "tx-udp-segmentation",
                if on { "on" } else { "off" },
            ])
            .map_err(|e| anyhow!("ethtool: {e}"))?;
    }
    Ok(())
}

/// One `udp-floor` run between the host namespaces; returns its JSON line's numbers.
fn floor_run(c: &Cluster, k: &Knobs, gso: bool) -> Result<BTreeMap<String, f64>> {
    let floor = std::env::var_os("UDP_FLOOR")
        .map(std::path::PathBuf::from)
        .unwrap_or(bin_dir()?.join("udp-floor"));
    let b_addr = c.host(1).addr;
    let mut cmd = Command::new(&floor);
    cmd.args(["--payload", &FLOOR_PAYLOAD.to_string()])
        .args(["--seconds", &k.floor_seconds.to_string()])
        .args(["--sender-netns", c.host_ns(0).name()])
        .args(["--receiver-netns", c.host_ns(1).name()])
        .args(["--bind", &format!("{b_addr}:0"), "--format", "json"]);
    if gso {
        cmd.args(["--gso", &FLOOR_SEGMENTS.to_string(), "--gro"]);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", floor.display()))?;
    if !out.status.success() {
        bail!("udp-floor: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = text
        .lines()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| anyhow!("no JSON line from udp-floor: {text}"))?;
    let num = |ptr: &str| {
        json.pointer(ptr)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(f64::NAN)
    };
    let mut numbers = BTreeMap::new();
    for key in [
        "gbit_per_cpu_second",
        "total_cpu_ns_per_packet",
        "received_pps",
        "loss",
    ] {
        numbers.insert(key.to_string(), num(&format!("/{key}")));
    }
    // Segments per received message: how much arrived coalesced (1 = segmented on the way).
    numbers.insert(
        "segments_per_receive".into(),
        num("/receiver/packets") / num("/receiver/messages"),
    );
    Ok(numbers)
}

/// What one iperf3 run measured.
#[derive(Debug, Clone, Default)]
struct BulkRun {
    gbps: f64,
    retransmits: f64,
    vnpd_a_cores: f64,
    vnpd_b_cores: f64,
    fixture_cores: f64,
}

impl BulkRun {
    fn vnpd_cores(&self) -> f64 {
        self.vnpd_a_cores + self.vnpd_b_cores
    }
}

/// Runs `iperf3 -c` in `a` against the server in `b`, sampling CPU around it.
fn iperf_run(c: &Cluster, k: &Knobs, a: &TapGuest, b: &TapGuest, b_ip: &str) -> Result<BulkRun> {
    let pids = [
        c.host(0).vnpd_pid().context("vnpd a")?,
        c.host(1).vnpd_pid().context("vnpd b")?,
        a.frontend_pid().context("fixture a")?,
        b.frontend_pid().context("fixture b")?,
    ];
    let before: Vec<f64> = pids
        .iter()
        .map(|p| cpu_seconds(*p))
        .collect::<Result<_>>()?;
    let start = Instant::now();
    let out = a
        .netns()
        .command("iperf3")
        .args(["-c", b_ip, "-t", &k.seconds.to_string(), "-J"])
        .args(["-P", &k.parallel.to_string()])
        .stdin(Stdio::null())
        .output()
        .context("running iperf3")?;
    let wall = start.elapsed().as_secs_f64();
    let after: Vec<f64> = pids
        .iter()
        .map(|p| cpu_seconds(*p))
        .collect::<Result<_>>()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "iperf3 failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("iperf3's JSON: {text}"))?;
    let received = json
        .pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .ok_or_else(|| anyhow!("no end.sum_received in iperf3's output: {text}"))?;
    let retransmits = json
        .pointer("/end/sum_sent/retransmits")
        .and_then(serde_json::Value::as_f64)
        .unwrap_or(f64::NAN);
    let cores = |i: usize| (after[i] - before[i]) / wall;
    Ok(BulkRun {
        gbps: received / 1e9,
        retransmits,
        vnpd_a_cores: cores(0),
        vnpd_b_cores: cores(1),
        fixture_cores: cores(2) + cores(3),
    })
}

/// The TAP's transmit drops in a guest (frames the namespace kernel sent that the fixture
/// did not read in time).
fn tap_tx_dropped(g: &TapGuest) -> u64 {
    let path = format!("/sys/class/net/{}/statistics/tx_dropped", g.ifname());
    g.netns()
        .run(&["cat", &path])
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Both guests with `offloads`, an iperf3 server in b, `k.runs` client runs.
fn guest_runs(
    c: &Cluster,
    k: &Knobs,
    atts: &[AttachmentInfo; 2],
    offloads: bool,
) -> Result<(String, Vec<BulkRun>, String)> {
    let [att_a, att_b] = atts;
    let a = c.tap_guest(att_a, offloads)?;
    let mut b = c.tap_guest(att_b, offloads)?;
    let b_ip = att_b.vm_ip.to_string();
    let mut server = b
        .netns()
        .command("iperf3")
        .args(["-s", "-B", &b_ip])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the iperf3 server")?;
    std::thread::sleep(Duration::from_millis(500));
    let mut runs = Vec::new();
    for i in 0..k.runs {
        let r = iperf_run(c, k, &a, &b, &b_ip)?;
        eprintln!(
            "  run {i}: {:.3} Gb/s, {} retransmits, vnpd a {:.2} + b {:.2} cores, fixtures {:.2} cores (load {})",
            r.gbps, r.retransmits, r.vnpd_a_cores, r.vnpd_b_cores, r.fixture_cores, loadavg()
        );
        runs.push(r);
    }
    let _ = server.kill();
    let _ = server.wait();
    let dropped = tap_tx_dropped(&a);
    let (stats, _) = b.stop_frontend().map_err(|e| anyhow!("{e}"))?;
    let note = format!(
        "TAP tx drops in vm-a: {dropped}; fixture b: rx_gso_frames={} rx_frames={}",
        stats.get("rx_gso_frames").copied().unwrap_or(0),
        stats.get("rx_frames").copied().unwrap_or(0)
    );
    Ok((a.offloads().to_string(), runs, note))
}

fn main() -> Result<()> {
    let k = knobs();
    eprintln!("bulk benchmark {k:?}, load {}", loadavg());
    let c = Cluster::start(&ClusterOptions {
        prefix: "vnpbk".into(),
        vnpd_log: "warn".into(),
        ..ClusterOptions::default()
    })?;
    c.create_vm("vm-a", 0, &[])?;
    c.create_vm("vm-b", 1, &[])?;
    let atts = [c.attach(0, "vm-a")?, c.attach(1, "vm-b")?];
    let mut table = Vec::new();
    for &gso in &k.underlay_gso {
        set_underlay_gso(&c, gso)?;
        let underlay = if gso {
            "tx-udp-segmentation on"
        } else {
            "tx-udp-segmentation off"
        };
        let floors: Vec<_> = (0..k.runs)
            .map(|_| floor_run(&c, &k, true))
            .collect::<Result<_>>()?;
        let floor = |key: &str| median(floors.iter().map(|f| f[key]).collect());
        eprintln!(
            "{underlay}: GSO/GRO floor {:.2} Gb/s per CPU second, {:.0} ns per segment, {:.1} segments per receive",
            floor("gbit_per_cpu_second"),
            floor("total_cpu_ns_per_packet"),
            floor("segments_per_receive")
        );
        for &offloads in &k.offloads {
            let (acked, runs, note) = guest_runs(&c, &k, &atts, offloads)?;
            eprintln!("  offloads asked {offloads}, acked {acked}; {note}");
            let m = |f: fn(&BulkRun) -> f64| median(runs.iter().map(f).collect());
            let gbps = m(|r| r.gbps);
            table.push(format!(
                "| {underlay} | {} ({acked}) | {gbps:.2} | {:.0} | {:.2} / {:.2} | {:.2} | {:.2} / {:.2} | {:.2} | {:.2} | {:.2} |",
                if offloads { "on" } else { "off" },
                m(|r| r.retransmits),
                m(|r| r.vnpd_a_cores),
                m(|r| r.vnpd_b_cores),
                m(|r| r.gbps / r.vnpd_cores()),
                m(|r| r.gbps / r.vnpd_a_cores),
                m(|r| r.gbps / r.vnpd_b_cores),
                m(|r| r.fixture_cores / r.gbps),
                floor("gbit_per_cpu_second"),
                floor("segments_per_receive"),
            ));
        }
    }
    println!("\nload average at the end: {}\n", loadavg());
    println!("| underlay | guest offloads (acked) | Gb/s | retransmits | vnpd cores a / b | Gb/s per vnpd core (a+b) | Gb/s per core: a (send) / b (receive) | fixture cores per Gb/s | GSO/GRO floor Gb/s per core | floor segments per receive |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in table {
        println!("{row}");
    }
    Ok(())
}
