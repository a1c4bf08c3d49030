//! Following VM changes across long-polls without losing any.

use crate::api::VmChange;
use crate::client::RegistryClient;
use crate::error::ClientError;
use std::time::Duration;

/// What one [`EndpointWatcher::poll`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// These VMs changed (oldest first); cached tokens touching them are stale.
    Changes(Vec<VmChange>),
    /// The watcher cannot know what it missed (first poll, or the registry's change log no
    /// longer reaches back): re-read the VMs you care about and drop cached tokens.
    Resync,
    /// Nothing changed before the timeout.
    Idle,
}

/// Tracks the `since` generation of a long-poll over a set of VMs. Blocking; meant for a
/// control thread that loops `poll` forever.
#[derive(Debug, Clone, Default)]
pub struct EndpointWatcher {
    vms: Vec<String>,
    since: Option<u64>,
}

impl EndpointWatcher {
    /// Watches `vms` (all VMs if empty). The first poll reports [`WatchEvent::Resync`].
    pub fn new(vms: Vec<String>) -> EndpointWatcher {
        EndpointWatcher { vms, since: None }
    }

    /// Changes the watched set; changes after the current generation are reported for it.
    pub fn set_vms(&mut self, vms: Vec<String>) {
        self.vms = vms;
    }

    /// The generation reported so far.
    pub fn generation(&self) -> Option<u64> {
        self.since
    }

    /// Waits up to `timeout` for changes.
    pub fn poll(
        &mut self,
        client: &RegistryClient,
        timeout: Duration,
    ) -> Result<WatchEvent, ClientError> {
        let vms: Vec<&str> = self.vms.iter().map(String::as_str).collect();
        let Some(since) = self.since else {
            // Learn the current generation without waiting.
            let w = client.watch(&vms, 0, Duration::ZERO)?;
            self.since = Some(w.generation);
            return Ok(WatchEvent::Resync);
        };
        let w = client.watch(&vms, since, timeout)?;
        self.since = Some(w.generation.max(if w.resync { 0 } else { since }));
        if w.resync {
            return Ok(WatchEvent::Resync);
        }
        Ok(if w.changes.is_empty() {
            WatchEvent::Idle
        } else {
            WatchEvent::Changes(w.changes)
        })
    }
}
