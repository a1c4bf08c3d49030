//! The state a VM's port hands over on a live migration (`crate::migrate_state`): its NAT
//! flows and its metadata sessions, read on the source without changing what it serves, and
//! taken on the destination.

use std::time::{Duration, Instant};

use super::VmPort;
use crate::migrate_state::wire::{SessionRecord, VmState};
use crate::nat::ImportReport;

/// How long the source waits for its bridge's sessions.
const BRIDGE_ANSWER: Duration = Duration::from_millis(500);

impl VmPort {
    /// The VM's live NAT flows and metadata sessions, timers as time left. A read: the port
    /// serves on unchanged (the same request comes whether the migration completes or not).
    pub fn export_state(&self) -> VmState {
        let flows = self
            .core
            .nat
            .with_table(&self.core.counters, |t, now| t.export(now));
        let slot = self.bridge.lock().unwrap_or_else(|e| e.into_inner());
        let sessions = slot
            .as_ref()
            .and_then(|b| b.export_sessions(BRIDGE_ANSWER))
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(digest, left)| {
                let remaining_ms = u32::try_from(left.as_millis()).ok()?;
                (remaining_ms > 0).then_some(SessionRecord {
                    digest,
                    remaining_ms,
                })
            })
            .collect();
        VmState {
            vm_id: self.core.vm_id.clone(),
            flows,
            sessions,
        }
    }

    /// Holds back new NAT mappings and metadata requests for at most `wait`, while the
    /// migrated VM's state is on its way ([`VmPort::import_state`] or
    /// [`VmPort::release_state_hold`] end it earlier).
    pub fn hold_for_state(&self, wait: Duration) {
        // The NAT clock counts whole seconds: one more, so the hold never ends before `wait`
        // (the import or the fetch's give-up ends it in time).
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0) + 1;
        self.core
            .nat
            .with_table(&self.core.counters, |t, now| t.hold_new_flows(now + secs));
        let slot = self.bridge.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = slot.as_ref() {
            b.hold_until(Instant::now() + wait);
        }
    }

    /// Takes the state the VM had on its source (and ends the hold): NAT flows on their
    /// ports, sessions with the time they had left. Returns what the NAT import did.
    pub fn import_state(&self, state: &VmState) -> ImportReport {
        let report = self
            .core
            .nat
            .with_table(&self.core.counters, |t, now| t.import(&state.flows, now));
        let sessions = state
            .sessions
            .iter()
            .map(|s| (s.digest, Duration::from_millis(u64::from(s.remaining_ms))))
            .collect();
        let slot = self.bridge.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = slot.as_ref() {
            b.import_sessions(sessions);
        }
        report
    }

    /// Ends a hold without state (the source did not answer in time): the VM goes on
    /// without its old flows and sessions.
    pub fn release_state_hold(&self) {
        self.core
            .nat
            .with_table(&self.core.counters, |t, _| t.hold_new_flows(0));
        let slot = self.bridge.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = slot.as_ref() {
            b.import_sessions(Vec::new());
        }
    }
}
