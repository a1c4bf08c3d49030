//! Moves random bytes from one guest to another over TCP (busybox `nc`) and checks that they
//! arrived intact: how the end-to-end tests and the demo show that a network carries real
//! traffic, not just pings.

use std::fmt;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::{Guest, Result};

/// What to transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpTransferSpec {
    /// How many random bytes to send.
    pub bytes: u64,
    /// TCP port the receiver listens on.
    pub port: u16,
    /// How long the whole transfer may take.
    pub timeout: Duration,
}

impl Default for TcpTransferSpec {
    fn default() -> Self {
        Self {
            bytes: 10 * 1024 * 1024,
            port: 5001,
            timeout: Duration::from_secs(300),
        }
    }
}

/// How a transfer went; [`TcpTransfer::intact`] says whether it worked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpTransfer {
    /// Bytes sent.
    pub bytes: u64,
    /// sha256 of what the sender sent.
    pub sent_sha256: String,
    /// sha256 of what the receiver wrote, empty if it never finished.
    pub received_sha256: String,
    /// Bytes the receiver wrote.
    pub received_bytes: u64,
    /// Exit status of the sender's `nc`.
    pub sender_status: i32,
    /// Time the sender's `nc` ran.
    pub elapsed: Duration,
}

impl TcpTransfer {
    /// Whether every byte arrived, unchanged.
    pub fn intact(&self) -> bool {
        self.received_bytes == self.bytes
            && !self.sent_sha256.is_empty()
            && self.sent_sha256 == self.received_sha256
    }

    /// Throughput in MiB/s over the sender's run time.
    pub fn mib_per_sec(&self) -> f64 {
        self.bytes as f64 / (1024.0 * 1024.0) / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for TcpTransfer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes in {:.1} s (nc exit {}): sent sha256 {}, received {} bytes with sha256 {}",
            self.bytes,
            self.elapsed.as_secs_f64(),
            self.sender_status,
            self.sent_sha256,
            self.received_bytes,
            if self.received_sha256.is_empty() {
                "-"
            } else {
                &self.received_sha256
            }
        )
    }
}

/// Sends `spec.bytes` random bytes from `sender` to `receiver` (reachable at `receiver_ip`)
/// and reports what arrived. Errors are failures to drive the guests; a transfer that loses
/// or corrupts data is an `Ok` report whose [`TcpTransfer::intact`] is false.
pub fn tcp_transfer(
    sender: &mut Guest,
    receiver: &mut Guest,
    receiver_ip: Ipv4Addr,
    spec: TcpTransferSpec,
) -> Result<TcpTransfer> {
    let command_timeout = Duration::from_secs(60);
    let port = spec.port;
    let (rx, done, hold, tx) = (
        format!("/tmp/vnp-rx-{port}"),
        format!("/tmp/vnp-rx-{port}.done"),
        format!("/tmp/vnp-hold-{port}"),
        format!("/tmp/vnp-tx-{port}"),
    );
    // busybox nc half-closes the connection when its stdin ends, and a background job's stdin
    // is /dev/null: the receiver reads a FIFO it holds open itself, so that only the sender's
    // FIN ends the transfer.
    receiver.run_ok(
        &format!(
            "rm -f {rx} {done} {hold}; mkfifo {hold}; \
             (exec 3<>{hold}; nc -l -p {port} <&3 > {rx}; echo done > {done}) >/dev/null 2>&1 &"
        ),
        command_timeout,
    )?;
    let sent_sha256 = sender
        .run_ok(
            &format!(
                "head -c {} /dev/urandom > {tx} && sha256sum {tx} | cut -d' ' -f1",
                spec.bytes
            ),
            command_timeout,
        )?
        .trim()
        .to_string();

    let started = Instant::now();
    let sent = sender.run(
        &format!("nc -w 30 {receiver_ip} {port} < {tx}"),
        spec.timeout,
    )?;
    let elapsed = started.elapsed();

    let mut report = TcpTransfer {
        bytes: spec.bytes,
        sent_sha256,
        received_sha256: String::new(),
        received_bytes: 0,
        sender_status: sent.status,
        elapsed,
    };
    let deadline = Instant::now() + spec.timeout.saturating_sub(elapsed);
    loop {
        let out = receiver.run(
            &format!("test -e {done} && sha256sum {rx} | cut -d' ' -f1 && wc -c < {rx}"),
            command_timeout,
        )?;
        if out.success() {
            let mut lines = out.stdout.lines();
            report.received_sha256 = lines.next().unwrap_or("").trim().to_string();
            report.received_bytes = lines.next().unwrap_or("").trim().parse().unwrap_or(0);
            break;
        }
        if Instant::now() >= deadline {
            let partial = receiver.run(&format!("wc -c < {rx}"), command_timeout)?;
            report.received_bytes = partial.stdout.trim().parse().unwrap_or(0);
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // Leave the guests as they were (10 MiB of tmpfs each is a lot for a small guest).
    let _ = receiver.run(&format!("rm -f {rx} {done} {hold}"), command_timeout);
    let _ = sender.run(&format!("rm -f {tx}"), command_timeout);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> TcpTransfer {
        TcpTransfer {
            bytes: 4,
            sent_sha256: "ab".into(),
            received_sha256: "ab".into(),
            received_bytes: 4,
            sender_status: 0,
            elapsed: Duration::from_secs(2),
        }
    }

    #[test]
    fn intact_needs_every_byte_and_the_same_sum() {
        assert!(report().intact());
        assert!(!TcpTransfer {
            received_bytes: 3,
            ..report()
        }
        .intact());
        assert!(!TcpTransfer {
            received_sha256: "cd".into(),
            ..report()
        }
        .intact());
        assert!(!TcpTransfer {
            sent_sha256: String::new(),
            received_sha256: String::new(),
            ..report()
        }
        .intact());
    }

    #[test]
    fn display_says_what_arrived() {
        let text = TcpTransfer {
            received_sha256: String::new(),
            received_bytes: 0,
            ..report()
        }
        .to_string();
        assert!(text.contains("received 0 bytes with sha256 -"), "{text}");
    }
}
