//! Prometheus text exposition of every attached VM's counters, and a tiny HTTP/1.1 server that
//! serves it on `GET /metrics`.
//!
//! Rendering is a pure function over snapshots ([`render`]), so the format is unit-tested
//! without sockets. The server is a plain std thread: scrapes are rare (seconds apart) and small,
//! so an async runtime would only add weight to vnpd.

use super::counters::{CounterSnapshot, DropReason};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Longest request head the server reads before answering 431.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// One VM's counters as the exporter sees them.
#[derive(Debug, Clone)]
pub struct VmSample {
    /// Registry id (the `vm` label).
    pub vm_id: String,
    /// Counter values.
    pub counters: CounterSnapshot,
}

/// Escapes a label value: backslash, double quote and newline, per the exposition format.
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The simple per-VM counter families: (metric name, help, accessor).
type Family = (&'static str, &'static str, fn(&CounterSnapshot) -> u64);
const FAMILIES: &[Family] = &[
    (
        "vnpd_tx_packets_total",
        "Inner packets sent to the underlay.",
        |s| s.tx_packets,
    ),
    (
        "vnpd_tx_bytes_total",
        "Inner bytes (IPv4 total length) sent to the underlay.",
        |s| s.tx_bytes,
    ),
    (
        "vnpd_rx_packets_total",
        "Inner packets delivered to the guest.",
        |s| s.rx_packets,
    ),
    (
        "vnpd_rx_bytes_total",
        "Inner bytes delivered to the guest.",
        |s| s.rx_bytes,
    ),
    (
        "vnpd_edge_replies_total",
        "ARP, DHCP and ICMP replies generated locally.",
        |s| s.edge_replies,
    ),
    (
        "vnpd_icmp_echo_replies_total",
        "ICMP echo replies from the virtual router.",
        |s| s.icmp_echo_replies,
    ),
    (
        "vnpd_icmp_frag_needed_total",
        "ICMP fragmentation-needed messages from the virtual router.",
        |s| s.icmp_frag_needed,
    ),
    (
        "vnpd_icmp_rate_limited_total",
        "ICMP replies suppressed by the per-VM rate limit.",
        |s| s.icmp_rate_limited,
    ),
    (
        "vnpd_token_requests_total",
        "Token requests handed to the control thread.",
        |s| s.token_requests,
    ),
    (
        "vnpd_token_requests_throttled_total",
        "Registry requests that waited for the VM's request rate ([token_requests]).",
        |s| s.token_requests_throttled,
    ),
    (
        "vnpd_return_tokens_learned_total",
        "Return tokens accepted from peers.",
        |s| s.return_tokens_learned,
    ),
    (
        "vnpd_hairpin_forwarded_total",
        "Datagrams forwarded to a migrated VM's new host.",
        |s| s.hairpin_forwarded,
    ),
    (
        "vnpd_moved_hints_sent_total",
        "Endpoint-moved hints sent to senders still using a migrated VM's old endpoint.",
        |s| s.moved_hints_sent,
    ),
    (
        "vnpd_moved_hint_rechecks_total",
        "Registry lookups caused by endpoint-moved hints.",
        |s| s.moved_hint_rechecks,
    ),
    (
        "vnpd_tx_csum_frames_total",
        "TX frames whose partial checksum vnpd completed (checksum offload).",
        |s| s.tx_csum_frames,
    ),
    (
        "vnpd_tx_tso_frames_total",
        "TX TCP super-packets vnpd cut into segments (TSO).",
        |s| s.tx_tso_frames,
    ),
];

/// Renders all samples in the Prometheus text format (version 0.0.4). Every drop reason is
/// emitted for every VM, also at zero, so that rate() queries work from the first scrape.
pub fn render(host_id: &str, vms: &[VmSample]) -> String {
    let mut out = String::new();
    let host = escape_label(host_id);
    // Writing into a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(out, "# HELP vnpd_attached_vms VMs attached to this vnpd.");
    let _ = writeln!(out, "# TYPE vnpd_attached_vms gauge");
    let _ = writeln!(out, "vnpd_attached_vms{{host=\"{host}\"}} {}", vms.len());
    for (name, help, get) in FAMILIES {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        for vm in vms {
            let _ = writeln!(
                out,
                "{name}{{vm=\"{}\"}} {}",
                escape_label(&vm.vm_id),
                get(&vm.counters)
            );
        }
    }
    render_nat(&mut out, vms);
    let _ = writeln!(
        out,
        "# HELP vnpd_drops_total Packets dropped, by VM and reason."
    );
    let _ = writeln!(out, "# TYPE vnpd_drops_total counter");
    for vm in vms {
        let id = escape_label(&vm.vm_id);
        for reason in DropReason::ALL {
            let _ = writeln!(
                out,
                "vnpd_drops_total{{vm=\"{id}\",reason=\"{}\"}} {}",
                reason.as_str(),
                vm.counters.drops(*reason)
            );
        }
    }
    out
}

/// The NAT gauges: mapped flows by protocol (each protocol has the VM's whole port blocks),
/// inbound flows, and the ports in the blocks (port-block use = mapped / ports).
fn render_nat(out: &mut String, vms: &[VmSample]) {
    let _ = writeln!(
        out,
        "# HELP vnpd_nat_mapped_flows Flows to the outside holding a NAT port, by protocol."
    );
    let _ = writeln!(out, "# TYPE vnpd_nat_mapped_flows gauge");
    for vm in vms {
        let id = escape_label(&vm.vm_id);
        for (proto, n) in ["tcp", "udp", "icmp"]
            .iter()
            .zip(vm.counters.nat.mapped_flows)
        {
            let _ = writeln!(
                out,
                "vnpd_nat_mapped_flows{{vm=\"{id}\",proto=\"{proto}\"}} {n}"
            );
        }
    }
    let gauges: [Family; 2] = [
        (
            "vnpd_nat_ports",
            "Ports in the VM's NAT blocks (each protocol has all of them).",
            |s| s.nat.ports,
        ),
        (
            "vnpd_nat_inbound_flows",
            "Flows from the outside (port forwarding), not remapped.",
            |s| s.nat.inbound_flows,
        ),
    ];
    for (name, help, get) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for vm in vms {
            let id = escape_label(&vm.vm_id);
            let _ = writeln!(out, "{name}{{vm=\"{id}\"}} {}", get(&vm.counters));
        }
    }
}

/// Renders the VMs' service-bridge counters (`docs/metadata.md`) as one family,
/// `vnpd_bridge_events_total{vm, event}`.
pub fn render_bridge(vms: &[(String, Vec<(&'static str, u64)>)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP vnpd_bridge_events_total Service-bridge events (metadata HTTP, DNS, registry calls), by VM."
    );
    let _ = writeln!(out, "# TYPE vnpd_bridge_events_total counter");
    for (vm, counters) in vms {
        let id = escape_label(vm);
        for (event, n) in counters {
            let _ = writeln!(
                out,
                "vnpd_bridge_events_total{{vm=\"{id}\",event=\"{event}\"}} {n}"
            );
        }
    }
    out
}

/// Parses one sample line of `text` back: the value of `metric` with exactly `labels`.
/// Used by tests and by tools that scrape vnpd (pure).
pub fn sample_value(text: &str, metric: &str, labels: &[(&str, &str)]) -> Option<u64> {
    let want: String = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
        .collect::<Vec<_>>()
        .join(",");
    let prefix = if labels.is_empty() {
        format!("{metric} ")
    } else {
        format!("{metric}{{{want}}} ")
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// Errors starting the exporter.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr}: {source}")]
pub struct ExporterError {
    /// Address asked for.
    pub addr: SocketAddr,
    /// Underlying error.
    pub source: std::io::Error,
}

/// The HTTP exporter thread; stopped on drop.
#[derive(Debug)]
pub struct Exporter {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Exporter {
    /// Listens on `addr` and serves `GET /metrics` with whatever `collect` renders at the
    /// time of the scrape.
    pub fn start(
        addr: SocketAddr,
        collect: impl Fn() -> String + Send + 'static,
    ) -> Result<Self, ExporterError> {
        let listener = TcpListener::bind(addr).map_err(|source| ExporterError { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ExporterError { addr, source })?;
        // Non-blocking accept with a short sleep lets the thread notice `stop` without a
        // self-connection trick.
        listener
            .set_nonblocking(true)
            .map_err(|source| ExporterError { addr, source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve(listener, &stop2, &collect))
            .map_err(|source| ExporterError { addr, source })?;
        log::info!("metrics: serving Prometheus text on http://{local_addr}/metrics");
        Ok(Self {
            local_addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: TcpListener, stop: &AtomicBool, collect: &dyn Fn() -> String) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Err(e) = answer(stream, collect) {
                    log::debug!("metrics: scrape from {peer} failed: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                log::warn!("metrics: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// What to answer to a request head (pure).
fn route(head: &str) -> (u16, &'static str) {
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) | (Some("GET"), Some("/metrics/")) => (200, "OK"),
        (Some("GET"), Some(_)) => (404, "Not Found"),
        (Some(_), Some(_)) => (405, "Method Not Allowed"),
        _ => (400, "Bad Request"),
    }
}

fn answer(mut stream: TcpStream, collect: &dyn Fn() -> String) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let status = loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break route(&String::from_utf8_lossy(&head));
        }
        if head.len() > MAX_REQUEST_HEAD {
            break (431, "Request Header Fields Too Large");
        }
    };
    let body = if status.0 == 200 {
        collect()
    } else {
        format!("{} {}\n", status.0, status.1)
    };
    let content_type = if status.0 == 200 {
        CONTENT_TYPE
    } else {
        "text/plain"
    };
    let resp = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        status.0,
        status.1,
        body.len()
    );
    stream.write_all(resp.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::counters::VmCounters;

    fn sample(vm: &str) -> VmSample {
        let c = VmCounters::new();
        c.tx(100);
        c.tx(50);
        c.rx(60);
        c.drop_packets(DropReason::RxBadToken, 3);
        VmSample {
            vm_id: vm.into(),
            counters: c.snapshot(),
        }
    }

    #[test]
    fn renders_counters_and_every_drop_reason() {
        let text = render("host-a", &[sample("vm-a"), sample("vm-b")]);
        assert_eq!(
            sample_value(&text, "vnpd_attached_vms", &[("host", "host-a")]),
            Some(2)
        );
        assert_eq!(
            sample_value(&text, "vnpd_tx_packets_total", &[("vm", "vm-a")]),
            Some(2)
        );
        assert_eq!(
            sample_value(&text, "vnpd_tx_bytes_total", &[("vm", "vm-b")]),
            Some(150)
        );
        assert_eq!(
            sample_value(&text, "vnpd_rx_packets_total", &[("vm", "vm-a")]),
            Some(1)
        );
        assert_eq!(
            sample_value(
                &text,
                "vnpd_drops_total",
                &[("vm", "vm-a"), ("reason", "rx_bad_token")]
            ),
            Some(3)
        );
        for r in DropReason::ALL {
            assert_eq!(
                sample_value(
                    &text,
                    "vnpd_drops_total",
                    &[("vm", "vm-b"), ("reason", r.as_str())]
                ),
                Some(if *r == DropReason::RxBadToken { 3 } else { 0 }),
                "{}",
                r.as_str()
            );
        }
        // Each family has exactly one TYPE line (the format forbids repeats).
        let types = text.lines().filter(|l| l.starts_with("# TYPE")).count();
        // attached_vms, drops_total and the three NAT gauges.
        assert_eq!(types, FAMILIES.len() + 5);
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn renders_nat_gauges() {
        let c = VmCounters::new();
        c.set_nat([3, 1, 0], 2, 1024);
        let vm = VmSample {
            vm_id: "vm-n".into(),
            counters: c.snapshot(),
        };
        let text = render("h", &[vm]);
        let get = |m: &str, l: &[(&str, &str)]| sample_value(&text, m, l);
        assert_eq!(
            get("vnpd_nat_mapped_flows", &[("vm", "vm-n"), ("proto", "tcp")]),
            Some(3)
        );
        assert_eq!(
            get(
                "vnpd_nat_mapped_flows",
                &[("vm", "vm-n"), ("proto", "icmp")]
            ),
            Some(0)
        );
        assert_eq!(get("vnpd_nat_ports", &[("vm", "vm-n")]), Some(1024));
        assert_eq!(get("vnpd_nat_inbound_flows", &[("vm", "vm-n")]), Some(2));
    }

    #[test]
    fn label_values_are_escaped() {
        let text = render("h\"1", &[sample("a\\b\nc")]);
        assert!(
            text.contains(r#"vnpd_attached_vms{host="h\"1"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"vnpd_tx_packets_total{vm="a\\b\nc"} 2"#),
            "{text}"
        );
        assert_eq!(
            sample_value(&text, "vnpd_tx_packets_total", &[("vm", "a\\b\nc")]),
            Some(2)
        );
    }

    #[test]
    fn routes() {
        assert_eq!(route("GET /metrics HTTP/1.1\r\n\r\n").0, 200);
        assert_eq!(route("GET / HTTP/1.1\r\n\r\n").0, 404);
        assert_eq!(route("POST /metrics HTTP/1.1\r\n\r\n").0, 405);
        assert_eq!(route("\r\n\r\n").0, 400);
    }

    fn http_get(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_metrics_over_http_and_refuses_junk() {
        let exporter = Exporter::start("127.0.0.1:0".parse().unwrap(), || {
            render("h", &[sample("vm-x")])
        })
        .unwrap();
        let addr = exporter.local_addr();
        let resp = http_get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
        assert!(resp.contains(CONTENT_TYPE));
        let body = resp.split("\r\n\r\n").nth(1).unwrap();
        assert_eq!(
            sample_value(body, "vnpd_tx_packets_total", &[("vm", "vm-x")]),
            Some(2)
        );
        let resp = http_get(addr, b"GET /nope HTTP/1.1\r\n\r\n");
        assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
        let junk = vec![b'x'; MAX_REQUEST_HEAD + 1024];
        let resp = http_get(addr, &junk);
        assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
        drop(exporter);
        // The port is closed after drop.
        assert!(TcpStream::connect(addr).is_err());
    }

    #[test]
    fn bridge_counters_render_per_vm_and_event() {
        let text = render_bridge(&[("vm-a".into(), vec![("http_2xx", 3), ("dns_refused", 1)])]);
        assert_eq!(
            sample_value(
                &text,
                "vnpd_bridge_events_total",
                &[("vm", "vm-a"), ("event", "http_2xx")]
            ),
            Some(3)
        );
        assert!(text.contains("# TYPE vnpd_bridge_events_total counter"));
    }
}
