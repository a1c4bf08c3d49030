//! State that moves with a live-migrating VM (issue #12): its NAT flows (the per-VM port
//! remapping lives in the host's vnpd, so without them every NATed connection of the guest
//! breaks on the destination) and its metadata sessions (a token obtained before the move
//! stays accepted after it). The design and its reasons: `docs/architecture.md`, "State that
//! moves with the VM"; the bytes: `docs/protocol.md`.
//!
//! - **When**: the destination *pulls* the state when the migrated device starts there (the
//!   same start hook that registers the endpoint, `SET_FEATURES` on resume). By then the
//!   source has stopped the rings (QEMU stops the source VM before the destination resumes), so
//!   the source's table is final, and nothing is exported that a cancelled migration would
//!   have to take back: the source's answer is a read of its tables and a pause or a
//!   cancelled migration never asks. The race "destination resumes before the source's
//!   export landed" cannot happen: the export is made when it is asked for.
//! - **How**: directly, destination to source, over TCP on the source's underlay address
//!   (port [`STATE_PORT`]); the request and the response carry an HMAC-SHA256 with the VM's
//!   secret, which only the VM's host and the host it migrates to know (the registry gives it
//!   to nobody else). The response's MAC covers the request's nonce (no replay). Session
//!   tokens travel as SHA-256 digests (all vnpd keeps of them), so nothing on the wire is a
//!   usable credential; NAT flows are no secret (they are visible on the wire anyway).
//! - **Late or missing**: the destination holds new NAT mappings and metadata requests back
//!   for at most [`IMPORT_WAIT`] (a new mapping could take a port one of the moving flows
//!   holds); existing-flow traffic is not held (there is none before the import). Past the
//!   wait it goes on without the state, counted.
//!
//! - [`wire`]: the blob and the authenticated request/response, pure;
//! - [`serve`]: the source side, one listener per vnpd;
//! - [`fetch`]: the destination side, the start hook.

pub mod fetch;
pub mod serve;
pub mod wire;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use fetch::Arrival;
pub use serve::StateServer;

/// TCP port of the state listener on each vnpd's underlay address.
pub const STATE_PORT: u16 = 6090;
/// Longest time the destination holds new NAT mappings and metadata requests back while the
/// state is on its way. A few round trips on the underlay take milliseconds; this covers a
/// loaded source and one reconnect.
pub const IMPORT_WAIT: Duration = Duration::from_secs(2);
/// Read and write timeout of one exchange on either side.
pub const IO_TIMEOUT: Duration = Duration::from_secs(1);

/// Counters of the hand-off (Prometheus: `vnpd_migration_state_total{event}`).
#[derive(Debug, Default)]
pub struct HandoffCounters {
    /// Source: states sent.
    pub exports: AtomicU64,
    /// Source: requests refused (malformed, unknown VM, bad MAC, stale).
    pub refused: AtomicU64,
    /// Destination: states taken.
    pub imports: AtomicU64,
    /// Destination: gave up (source unreachable, refused, bad answer, wait over).
    pub import_failures: AtomicU64,
    /// Destination: NAT flows taken.
    pub flows_imported: AtomicU64,
    /// Destination: NAT flows skipped (a conflict or a port outside the blocks).
    pub flows_skipped: AtomicU64,
    /// Destination: metadata sessions taken.
    pub sessions_imported: AtomicU64,
}

/// This process's hand-off counters.
pub static COUNTERS: HandoffCounters = HandoffCounters {
    exports: AtomicU64::new(0),
    refused: AtomicU64::new(0),
    imports: AtomicU64::new(0),
    import_failures: AtomicU64::new(0),
    flows_imported: AtomicU64::new(0),
    flows_skipped: AtomicU64::new(0),
    sessions_imported: AtomicU64::new(0),
};

impl HandoffCounters {
    /// `(event, count)` pairs for metrics.
    pub fn snapshot(&self) -> [(&'static str, u64); 7] {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("export", g(&self.exports)),
            ("refused", g(&self.refused)),
            ("import", g(&self.imports)),
            ("import_failed", g(&self.import_failures)),
            ("flow_imported", g(&self.flows_imported)),
            ("flow_skipped", g(&self.flows_skipped)),
            ("session_imported", g(&self.sessions_imported)),
        ]
    }

    /// The Prometheus text of these counters.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# HELP vnpd_migration_state_total Live-migration state hand-off events.\n\
             # TYPE vnpd_migration_state_total counter\n",
        );
        for (event, n) in self.snapshot() {
            out.push_str(&format!(
                "vnpd_migration_state_total{{event=\"{event}\"}} {n}\n"
            ));
        }
        out
    }
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
