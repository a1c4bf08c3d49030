//! The probe of `qemu-launch migrate --probe PEER`: a sequence-numbered ICMP echo stream from
//! the guest (busybox `ping`) across the migration, and what its output says about the network
//! blackout and the packets lost. Parsing is pure.
//!
//! The guest's clock stands still while QEMU's downtime lasts (the VM is stopped), so a pause
//! between replies measured in the guest's clock is the blackout *beyond* QEMU's downtime.

use serde::Serialize;

/// Where the probe's output and process id live in the guest.
pub const LOG: &str = "/tmp/vnp-probe.log";
const PID: &str = "/tmp/vnp-probe.pid";

/// The guest command that starts the stream: one echo request every `interval_ms` to `peer`.
pub fn start_command(peer: &str, interval_ms: u32) -> String {
    let secs = f64::from(interval_ms.max(1)) / 1000.0;
    format!("ping -i {secs} {peer} > {LOG} 2>&1 & echo $! > {PID}")
}

/// The guest command that stops the stream (busybox ping prints its statistics on SIGINT)
/// and prints its output.
pub fn stop_command() -> String {
    format!("kill -INT $(cat {PID}); sleep 0.5; cat {LOG}")
}

/// What the stream saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProbeReport {
    /// Echo requests up to the last one answered.
    pub sent: u64,
    /// Distinct requests answered.
    pub answered: u64,
    /// Requests up to the last one answered that got no answer.
    pub lost: u64,
    /// Longest pause between replies arriving, in the guest's clock (which stands still
    /// during QEMU's downtime): the network blackout beyond the downtime.
    pub blackout_ms: u64,
    /// Longest round trip of any answered request (late answers: buffered or hairpinned).
    pub max_rtt_ms: u64,
    /// Echo requests the guest's ping counted as transmitted (including any still in
    /// flight when it stopped), if it printed its statistics.
    pub transmitted: Option<u64>,
}

/// One reply line of busybox ping: `64 bytes from 10.77.0.3: seq=12 ttl=64 time=0.513 ms`.
fn reply(line: &str) -> Option<(u64, f64)> {
    let seq = line.split("seq=").nth(1)?.split_whitespace().next()?;
    let time = line.split("time=").nth(1)?.split_whitespace().next()?;
    Some((seq.parse().ok()?, time.parse().ok()?))
}

/// `N packets transmitted, M packets received, ...`.
fn transmitted(line: &str) -> Option<u64> {
    let (n, rest) = line.trim().split_once(' ')?;
    rest.starts_with("packets transmitted")
        .then(|| n.parse().ok())
        .flatten()
}

/// Reads ping's output for a stream sent every `interval_ms`. `None` when no reply came.
pub fn parse(output: &str, interval_ms: u32) -> Option<ProbeReport> {
    let mut replies: Vec<(u64, f64)> = output.lines().filter_map(reply).collect();
    let total = output.lines().find_map(transmitted);
    replies.sort_by_key(|r| r.0);
    replies.dedup_by_key(|r| r.0);
    let last = replies.last()?.0;
    let interval = f64::from(interval_ms.max(1));
    // Each request leaves on schedule, so its reply arrives at seq * interval + rtt.
    let mut arrivals: Vec<f64> = replies
        .iter()
        .map(|&(seq, rtt)| seq as f64 * interval + rtt)
        .collect();
    arrivals.sort_by(f64::total_cmp);
    let gap = arrivals.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    let max_rtt = replies.iter().map(|r| r.1).fold(0.0, f64::max);
    let answered = replies.len() as u64;
    Some(ProbeReport {
        sent: last + 1,
        answered,
        lost: last + 1 - answered,
        blackout_ms: gap.round() as u64,
        max_rtt_ms: max_rtt.round() as u64,
        transmitted: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: u64, ms: f64) -> String {
        format!("64 bytes from 10.77.0.3: seq={seq} ttl=64 time={ms:.3} ms\n")
    }

    #[test]
    fn a_run_of_lost_replies_is_the_blackout() {
        let mut out = String::from("PING 10.77.0.3 (10.77.0.3): 56 data bytes\n");
        for seq in (0..100).filter(|s| !(40..52).contains(s)) {
            out += &line(seq, 0.5);
        }
        out += "\n--- 10.77.0.3 ping statistics ---\n";
        out += "101 packets transmitted, 88 packets received, 12% packet loss\n";
        let r = parse(&out, 10).unwrap();
        assert_eq!((r.sent, r.answered, r.lost), (100, 88, 12));
        // Replies 39 and 52 arrive 13 intervals apart.
        assert_eq!(r.blackout_ms, 130);
        assert_eq!(r.max_rtt_ms, 1);
        assert_eq!(r.transmitted, Some(101));
    }

    #[test]
    fn late_replies_count_as_a_pause_not_a_loss() {
        let mut out = String::new();
        for seq in 0..20 {
            // Requests 5..=9 were held back and all answered together at 100 ms.
            let rtt = if (5..10).contains(&seq) {
                100.0 - seq as f64 * 10.0
            } else {
                1.0
            };
            out += &line(seq, rtt);
        }
        let r = parse(&out, 10).unwrap();
        assert_eq!((r.sent, r.lost), (20, 0));
        // seq 4's reply at 41 ms, then the held ones at 100 ms.
        assert_eq!(r.blackout_ms, 59);
        assert_eq!(r.max_rtt_ms, 50);
        assert_eq!(r.transmitted, None);
    }

    #[test]
    fn duplicates_and_noise_are_ignored_and_no_reply_is_none() {
        let out = format!(
            "{}{}ping: sendto: Network unreachable\n{}",
            line(0, 1.0),
            line(0, 1.0),
            line(1, 1.0)
        );
        let r = parse(&out, 10).unwrap();
        assert_eq!((r.sent, r.answered, r.lost, r.blackout_ms), (2, 2, 0, 10));
        assert_eq!(
            parse("PING x\nping: sendto: Network unreachable\n", 10),
            None
        );
        assert_eq!(parse("", 10), None);
    }

    #[test]
    fn commands_name_the_peer_and_the_interval() {
        assert_eq!(
            start_command("10.77.0.3", 10),
            "ping -i 0.01 10.77.0.3 > /tmp/vnp-probe.log 2>&1 & echo $! > /tmp/vnp-probe.pid"
        );
        assert!(stop_command().starts_with("kill -INT $(cat /tmp/vnp-probe.pid)"));
    }
}
