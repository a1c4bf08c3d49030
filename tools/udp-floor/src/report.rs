//! Rates and per-packet costs from the raw counts of one run, rendered as text and JSON.

use std::fmt::Write as _;
use std::time::Duration;

use crate::mmsg::ThreadStats;

/// One run's result. Either side may be absent (a send-only or receive-only process).
#[derive(Debug, Clone, PartialEq)]
pub struct RunReport {
    /// UDP payload bytes per datagram.
    pub payload: usize,
    /// Datagrams per sendmmsg/recvmmsg.
    pub batch: usize,
    /// Datagrams per GSO send (1: no GSO).
    pub gso_segments: usize,
    /// Whether the receiver used UDP GRO.
    pub gro: bool,
    /// The sender's fixed rate (`--rate`), datagrams per second; `None`: unpaced.
    pub rate: Option<f64>,
    /// Sender counts, if this process sent.
    pub sender: Option<ThreadStats>,
    /// Receiver counts, if this process received.
    pub receiver: Option<ThreadStats>,
}

/// Nanoseconds of `cpu` per packet, `None` when there were no packets.
fn ns_per_packet(cpu: Duration, packets: u64) -> Option<f64> {
    (packets > 0).then(|| cpu.as_nanos() as f64 / packets as f64)
}

/// Packets per second over `wall`, `None` when no time passed.
fn per_second(packets: u64, wall: Duration) -> Option<f64> {
    let secs = wall.as_secs_f64();
    (secs > 0.0).then(|| packets as f64 / secs)
}

impl RunReport {
    /// Datagrams the sender sent per second of its loop.
    pub fn sent_pps(&self) -> Option<f64> {
        self.sender.and_then(|s| per_second(s.packets, s.wall))
    }

    /// Datagrams received per second. With a sender in the same run the sender's loop time is
    /// the denominator (the receiver drains for a moment after it); alone, the receiver's first
    /// to last datagram.
    pub fn received_pps(&self) -> Option<f64> {
        let receiver = self.receiver?;
        let wall = self.sender.map_or(receiver.wall, |s| s.wall);
        per_second(receiver.packets, wall)
    }

    /// Sender CPU per datagram sent.
    pub fn sender_cpu_ns_per_packet(&self) -> Option<f64> {
        self.sender.and_then(|s| ns_per_packet(s.cpu, s.packets))
    }

    /// Receiver CPU per datagram received.
    pub fn receiver_cpu_ns_per_packet(&self) -> Option<f64> {
        self.receiver.and_then(|r| ns_per_packet(r.cpu, r.packets))
    }

    /// Sender plus receiver CPU per datagram that made it through (the end-to-end cost, the
    /// number to compare with vnpd A + vnpd B per delivered packet).
    pub fn total_cpu_ns_per_packet(&self) -> Option<f64> {
        let (s, r) = (self.sender?, self.receiver?);
        ns_per_packet(s.cpu + r.cpu, r.packets)
    }

    /// UDP payload delivered per second of sender plus receiver CPU, in Gbit: the bulk floor's
    /// "Gb/s per core".
    pub fn gbit_per_cpu_second(&self) -> Option<f64> {
        let (s, r) = (self.sender?, self.receiver?);
        let cpu = (s.cpu + r.cpu).as_secs_f64();
        (cpu > 0.0).then(|| r.bytes as f64 * 8.0 / 1e9 / cpu)
    }

    /// Fraction of sent datagrams that were not received (kernel drops at the receiver socket).
    pub fn loss(&self) -> Option<f64> {
        let (s, r) = (self.sender?, self.receiver?);
        (s.packets > 0).then(|| s.packets.saturating_sub(r.packets) as f64 / s.packets as f64)
    }

    /// A few human lines.
    pub fn to_text(&self) -> String {
        let mut text = format!(
            "udp-floor: {}-byte payload, batch {}{}{}\n",
            self.payload,
            self.batch,
            if self.gso_segments > 1 {
                format!(", GSO {} segments per send", self.gso_segments)
            } else {
                String::new()
            },
            if self.gro { ", GRO receive" } else { "" },
        );
        if let Some(rate) = self.rate {
            let _ = writeln!(text, "  paced at {rate:.0} datagrams/s");
        }
        if let Some(s) = self.sender {
            let _ = writeln!(
                text,
                "  sent     {:>12} pkts in {:.2} s = {} pps, sender CPU {} ns/pkt ({} calls, {} retried)",
                s.packets,
                s.wall.as_secs_f64(),
                fmt_opt(self.sent_pps(), 0),
                fmt_opt(self.sender_cpu_ns_per_packet(), 1),
                s.calls,
                s.transient_errors,
            );
        }
        if let Some(r) = self.receiver {
            let _ = writeln!(
                text,
                "  received {:>12} pkts = {} pps, receiver CPU {} ns/pkt ({} calls, {:.1} pkts/call)",
                r.packets,
                fmt_opt(self.received_pps(), 0),
                fmt_opt(self.receiver_cpu_ns_per_packet(), 1),
                r.calls,
                if r.calls > 0 { r.packets as f64 / r.calls as f64 } else { 0.0 },
            );
        }
        if self.sender.is_some() && self.receiver.is_some() {
            let _ = writeln!(
                text,
                "  total CPU {} ns per delivered packet, {} Gb/s of payload per CPU second, loss {}",
                fmt_opt(self.total_cpu_ns_per_packet(), 1),
                fmt_opt(self.gbit_per_cpu_second(), 2),
                self.loss()
                    .map_or_else(|| "n/a".to_string(), |l| format!("{:.2}%", l * 100.0)),
            );
        }
        text
    }

    /// One JSON object (one line). Absent values are `null`.
    pub fn to_json(&self) -> String {
        let side = |stats: Option<ThreadStats>| {
            match stats {
            None => "null".to_string(),
            Some(s) => format!(
                "{{\"packets\":{},\"messages\":{},\"bytes\":{},\"calls\":{},\"transient_errors\":{},\"wall_s\":{},\"cpu_s\":{}}}",
                s.packets,
                s.messages,
                s.bytes,
                s.calls,
                s.transient_errors,
                json_num(Some(s.wall.as_secs_f64())),
                json_num(Some(s.cpu.as_secs_f64())),
            ),
        }
        };
        format!(
            "{{\"tool\":\"udp-floor\",\"payload\":{},\"batch\":{},\"gso_segments\":{},\"gro\":{},\"gbit_per_cpu_second\":{},\"sent_pps\":{},\"received_pps\":{},\"sender_cpu_ns_per_packet\":{},\"receiver_cpu_ns_per_packet\":{},\"total_cpu_ns_per_packet\":{},\"loss\":{},\"rate\":{},\"sender\":{},\"receiver\":{}}}",
            self.payload,
            self.batch,
            self.gso_segments,
            self.gro,
            json_num(self.gbit_per_cpu_second()),
            json_num(self.sent_pps()),
            json_num(self.received_pps()),
            json_num(self.sender_cpu_ns_per_packet()),
            json_num(self.receiver_cpu_ns_per_packet()),
            json_num(self.total_cpu_ns_per_packet()),
            json_num(self.loss()),
            json_num(self.rate),
            side(self.sender),
            side(self.receiver),
        )
    }
}

fn fmt_opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "n/a".to_string(), |v| format!("{v:.decimals$}"))
}

/// A JSON number, or `null` for missing or non-finite values (JSON has no NaN/inf).
fn json_num(value: Option<f64>) -> String {
    match value {
        Some(v) if v.is_finite() => {
            let rounded = (v * 1000.0).round() / 1000.0;
            format!("{rounded}")
        }
        _ => "null".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(packets: u64, wall_ms: u64, cpu_ms: u64) -> ThreadStats {
        ThreadStats {
            packets,
            messages: packets,
            bytes: packets * 64,
            calls: packets / 32,
            transient_errors: 0,
            wall: Duration::from_millis(wall_ms),
            cpu: Duration::from_millis(cpu_ms),
        }
    }

    #[test]
    fn rates_and_costs() {
        let report = RunReport {
            payload: 64,
            batch: 32,
            gso_segments: 1,
            gro: false,
            rate: None,
            sender: Some(stats(1_000_000, 2000, 1000)),
            receiver: Some(stats(900_000, 1990, 900)),
        };
        assert_eq!(report.sent_pps(), Some(500_000.0));
        assert_eq!(
            report.received_pps(),
            Some(450_000.0),
            "over the sender's time"
        );
        assert_eq!(report.sender_cpu_ns_per_packet(), Some(1000.0));
        assert_eq!(report.receiver_cpu_ns_per_packet(), Some(1000.0));
        let total = report.total_cpu_ns_per_packet().unwrap();
        assert!((total - 1_900_000_000.0 / 900_000.0).abs() < 1e-6);
        assert!((report.loss().unwrap() - 0.1).abs() < 1e-12);
        let json = report.to_json();
        assert!(
            json.starts_with(
                "{\"tool\":\"udp-floor\",\"payload\":64,\"batch\":32,\"gso_segments\":1,\"gro\":false,\"gbit_per_cpu_second\":0.243,\"sent_pps\":500000,"
            ),
            "{json}"
        );
        assert!(json.contains("\"sender_cpu_ns_per_packet\":1000,"));
        assert!(json.contains("\"loss\":0.1,\"rate\":null,"), "{json}");
        let paced = RunReport {
            rate: Some(20_000.0),
            ..report.clone()
        };
        assert!(paced.to_json().contains("\"rate\":20000,"));
        assert!(paced.to_text().contains("paced at 20000 datagrams/s"));
        let text = report.to_text();
        assert!(text.contains("500000 pps"), "{text}");
        assert!(text.contains("loss 10.00%"), "{text}");
    }

    #[test]
    fn one_sided_and_empty_runs_render_nulls() {
        let receive_only = RunReport {
            payload: 1500,
            batch: 32,
            gso_segments: 1,
            gro: false,
            rate: None,
            sender: None,
            receiver: Some(stats(0, 0, 5)),
        };
        assert_eq!(receive_only.received_pps(), None);
        assert_eq!(receive_only.receiver_cpu_ns_per_packet(), None);
        assert_eq!(receive_only.loss(), None);
        let json = receive_only.to_json();
        assert!(json.contains("\"sent_pps\":null"), "{json}");
        assert!(json.contains("\"sender\":null"));
        assert!(json.contains("\"received_pps\":null"));
        assert!(receive_only.to_text().contains("n/a"));
        // Receive-only uses its own first-to-last time.
        let receive_only = RunReport {
            receiver: Some(stats(1000, 500, 1)),
            ..receive_only
        };
        assert_eq!(receive_only.received_pps(), Some(2000.0));
    }

    #[test]
    fn json_numbers_are_valid_json() {
        assert_eq!(json_num(Some(f64::NAN)), "null");
        assert_eq!(json_num(Some(f64::INFINITY)), "null");
        assert_eq!(json_num(Some(1.23456)), "1.235");
        assert_eq!(json_num(None), "null");
    }
}
