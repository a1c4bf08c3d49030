//! Operational counters, rendered in the Prometheus text format at `GET /v1/metrics`.
//!
//! The token path only touches one relaxed atomic on success; refusals and writes are rare
//! enough for a mutex-protected map keyed by reason.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use vnp_registry_client::api::ErrorCode;

/// Counters of one registry process (they start at zero on every start).
#[derive(Debug, Default)]
pub struct Metrics {
    tokens_granted: AtomicU64,
    tokens_refused: Mutex<BTreeMap<String, u64>>,
    writes_committed: AtomicU64,
    writes_refused: Mutex<BTreeMap<String, u64>>,
    connections_refused_per_ip: AtomicU64,
    credentials_minted: AtomicU64,
}

fn bump(map: &Mutex<BTreeMap<String, u64>>, code: ErrorCode) {
    let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
    *m.entry(code.as_str()).or_default() += 1;
}

impl Metrics {
    /// A token was minted.
    pub fn token_granted(&self) {
        self.tokens_granted.fetch_add(1, Ordering::Relaxed);
    }

    /// An access or identity token was signed.
    pub fn credential_minted(&self) {
        self.credentials_minted.fetch_add(1, Ordering::Relaxed);
    }

    /// A token request was refused for `code`.
    pub fn token_refused(&self, code: ErrorCode) {
        bump(&self.tokens_refused, code);
    }

    /// A write was committed.
    pub fn write_committed(&self) {
        self.writes_committed.fetch_add(1, Ordering::Relaxed);
    }

    /// A write was refused (validation or storage) for `code`.
    pub fn write_refused(&self, code: ErrorCode) {
        bump(&self.writes_refused, code);
    }

    /// A connection was closed at once: its address had too many open.
    pub fn connection_refused_per_ip(&self) {
        self.connections_refused_per_ip
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition, with gauges from the current model.
    pub fn render(&self, gauges: &[(&str, &str, u64)]) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        };
        counter(
            &mut out,
            "vnp_registry_tokens_granted_total",
            "Tokens minted.",
        );
        let _ = writeln!(
            out,
            "vnp_registry_tokens_granted_total {}",
            self.tokens_granted.load(Ordering::Relaxed)
        );
        counter(
            &mut out,
            "vnp_registry_credentials_minted_total",
            "Access and identity tokens (JWTs) signed.",
        );
        let _ = writeln!(
            out,
            "vnp_registry_credentials_minted_total {}",
            self.credentials_minted.load(Ordering::Relaxed)
        );
        counter(
            &mut out,
            "vnp_registry_tokens_refused_total",
            "Token requests refused, by reason.",
        );
        for (code, n) in self
            .tokens_refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "vnp_registry_tokens_refused_total{{code=\"{code}\"}} {n}"
            );
        }
        counter(
            &mut out,
            "vnp_registry_writes_committed_total",
            "Write requests committed to the store.",
        );
        let _ = writeln!(
            out,
            "vnp_registry_writes_committed_total {}",
            self.writes_committed.load(Ordering::Relaxed)
        );
        counter(
            &mut out,
            "vnp_registry_writes_refused_total",
            "Write requests refused, by reason.",
        );
        for (code, n) in self
            .writes_refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "vnp_registry_writes_refused_total{{code=\"{code}\"}} {n}"
            );
        }
        counter(
            &mut out,
            "vnp_registry_connections_refused_per_ip_total",
            "Connections closed at once because their address had --max-connections-per-ip open.",
        );
        let _ = writeln!(
            out,
            "vnp_registry_connections_refused_per_ip_total {}",
            self.connections_refused_per_ip.load(Ordering::Relaxed)
        );
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_by_reason() {
        let m = Metrics::default();
        m.token_granted();
        m.token_granted();
        m.token_refused(ErrorCode::PolicyDenied);
        m.write_refused(ErrorCode::DuplicateIp);
        m.write_committed();
        let text = m.render(&[("vnp_registry_vms", "VMs.", 3)]);
        assert!(
            text.contains("vnp_registry_tokens_granted_total 2\n"),
            "{text}"
        );
        assert!(text.contains("vnp_registry_tokens_refused_total{code=\"policy_denied\"} 1\n"));
        assert!(text.contains("vnp_registry_writes_refused_total{code=\"duplicate_ip\"} 1\n"));
        assert!(text.contains("vnp_registry_writes_committed_total 1\n"));
        assert!(text.contains("# TYPE vnp_registry_vms gauge\nvnp_registry_vms 3\n"));
    }
}
