//! Health checking as data and a state machine: what to probe, how to judge a reply, and when a
//! member goes down or comes back. The gateway sends the probes (through the virtual network, as
//! VNP to the VM) and feeds the results in.
//!
//! The rules (HAProxy's, which operators know): a member is **down** after `fall` consecutive
//! failed probes and **up** again after `rise` consecutive successes. A member not yet probed is
//! up but unconfirmed, and a single failure takes it down: a gateway that has just started
//! balances onto the pool at once instead of waiting `rise × interval`, and drops a dead member
//! after its first probe.

/// What a probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// A TCP connection to the port is accepted (SYN answered by SYN-ACK).
    TcpConnect { port: u16 },
    /// `GET path` answered with this status.
    Http {
        port: u16,
        path: String,
        expect_status: u16,
    },
}

/// A service's health-check settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    pub kind: CheckKind,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
}

impl HealthConfig {
    /// The longest a failed member stays in the pool after it stopped answering: `fall` probes
    /// at `interval`, the last one waiting out its timeout.
    pub fn detection_ms(&self) -> u64 {
        self.interval_ms * u64::from(self.fall) + self.timeout_ms
    }

    /// Checks the settings; the error says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.rise == 0 || self.fall == 0 {
            return Err("rise and fall must be at least 1".into());
        }
        if self.interval_ms < 100 {
            return Err("interval must be at least 100 ms".into());
        }
        if self.timeout_ms == 0 || self.timeout_ms > self.interval_ms {
            return Err("timeout must be between 1 ms and the interval".into());
        }
        if let CheckKind::Http { path, .. } = &self.kind {
            if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
                return Err(format!("HTTP check path {path:?} must start with / and have no spaces or control characters"));
            }
        }
        Ok(())
    }

    /// The request an HTTP check sends (HTTP/1.0: the VM closes the connection after it).
    pub fn http_request(&self, host: &str) -> Option<Vec<u8>> {
        match &self.kind {
            CheckKind::Http { path, .. } => Some(
                format!(
                    "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: vnp-gateway-health\r\n\r\n"
                )
                .into_bytes(),
            ),
            CheckKind::TcpConnect { .. } => None,
        }
    }
}

/// Judges the first bytes of an HTTP check's reply: success iff the status line parses and its
/// code is the expected one.
pub fn http_reply_ok(reply: &[u8], expect_status: u16) -> bool {
    let line_end = reply
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(reply.len());
    let line = &reply[..line_end];
    let mut parts = line.split(|&b| b == b' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    version.starts_with(b"HTTP/1.")
        && code.len() == 3
        && std::str::from_utf8(code)
            .ok()
            .and_then(|c| c.parse::<u16>().ok())
            == Some(expect_status)
}

/// Up or down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    Up,
    Down,
}

/// One member's health as seen by one gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    state: HealthState,
    confirmed: bool,
    successes: u32,
    failures: u32,
}

impl Default for Probe {
    fn default() -> Self {
        Self::new()
    }
}

impl Probe {
    /// A member not yet probed: up, unconfirmed.
    pub fn new() -> Self {
        Self {
            state: HealthState::Up,
            confirmed: false,
            successes: 0,
            failures: 0,
        }
    }

    pub fn state(&self) -> HealthState {
        self.state
    }

    pub fn is_up(&self) -> bool {
        self.state == HealthState::Up
    }

    /// Records one probe's result; returns the new state if it changed.
    pub fn record(&mut self, ok: bool, cfg: &HealthConfig) -> Option<HealthState> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            self.confirmed = true;
            if self.state == HealthState::Down && self.successes >= cfg.rise {
                self.state = HealthState::Up;
                return Some(HealthState::Up);
            }
            return None;
        }
        self.successes = 0;
        self.failures = self.failures.saturating_add(1);
        let limit = if self.confirmed { cfg.fall } else { 1 };
        if self.state == HealthState::Up && self.failures >= limit {
            self.state = HealthState::Down;
            return Some(HealthState::Down);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rise: u32, fall: u32) -> HealthConfig {
        HealthConfig {
            kind: CheckKind::TcpConnect { port: 80 },
            interval_ms: 1000,
            timeout_ms: 500,
            rise,
            fall,
        }
    }

    #[test]
    fn a_confirmed_member_goes_down_after_fall_failures_and_back_after_rise() {
        let c = cfg(2, 3);
        let mut p = Probe::new();
        assert_eq!(p.record(true, &c), None);
        assert_eq!(p.record(false, &c), None);
        assert_eq!(p.record(false, &c), None);
        assert_eq!(p.record(false, &c), Some(HealthState::Down));
        assert_eq!(p.record(false, &c), None);
        assert_eq!(p.record(true, &c), None);
        assert_eq!(p.record(false, &c), None, "a failure resets the rise count");
        assert_eq!(p.record(true, &c), None);
        assert_eq!(p.record(true, &c), Some(HealthState::Up));
        assert!(p.is_up());
    }

    #[test]
    fn an_unconfirmed_member_goes_down_on_its_first_failure() {
        let mut p = Probe::new();
        assert!(p.is_up());
        assert_eq!(p.record(false, &cfg(2, 3)), Some(HealthState::Down));
    }

    #[test]
    fn detection_time_is_fall_intervals_plus_a_timeout() {
        assert_eq!(cfg(2, 3).detection_ms(), 3500);
    }

    #[test]
    fn settings_are_validated() {
        assert!(cfg(2, 3).validate().is_ok());
        assert!(cfg(0, 3).validate().is_err());
        let mut c = cfg(1, 1);
        c.timeout_ms = 2000;
        assert!(c.validate().is_err());
        c.timeout_ms = 100;
        c.kind = CheckKind::Http {
            port: 80,
            path: "/a b".into(),
            expect_status: 200,
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn http_replies_are_judged_by_status() {
        assert!(http_reply_ok(b"HTTP/1.0 200 OK\r\n\r\n", 200));
        assert!(http_reply_ok(b"HTTP/1.1 204 No Content\r\n", 204));
        assert!(!http_reply_ok(b"HTTP/1.1 500 Oops\r\n", 200));
        assert!(!http_reply_ok(b"SSH-2.0-OpenSSH\r\n", 200));
        assert!(!http_reply_ok(b"HTTP/1.1 2000 x\r\n", 200));
        assert!(!http_reply_ok(b"", 200));
    }

    #[test]
    fn the_http_request_is_a_plain_get() {
        let c = HealthConfig {
            kind: CheckKind::Http {
                port: 8080,
                path: "/healthz".into(),
                expect_status: 200,
            },
            ..cfg(1, 1)
        };
        let r = c.http_request("10.0.0.5").unwrap();
        assert!(r.starts_with(b"GET /healthz HTTP/1.0\r\nHost: 10.0.0.5\r\n"));
        assert!(r.ends_with(b"\r\n\r\n"));
    }
}
