//! The control thread's bookkeeping, as pure data structures (the caller passes `now`, in
//! milliseconds).
//!
//! - [`RequestBook`]: which (source VM, destination) pairs wait for a registry round trip, so
//!   that a burst of packets to a new destination costs one request, and in which order they
//!   are asked ([`super::fair::FairQueue`]: VMs take turns, refreshes first, each VM's new
//!   destinations at its own rate); which pairs were refused recently, so that a guest
//!   hammering a denied destination does not hammer the registry; when each pair was last
//!   fetched, so refreshes are rate-limited.
//! - [`PeerIndex`]: which destination address belongs to which registry VM id, so that a watch
//!   event ("vm-b moved") can be turned into `forget_peer(10.0.0.3)` on the right ports.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use super::fair::{FairQueue, Kind, RequestRate};
use crate::datapath::RefusalReason;

/// A unidirectional pair as the data path names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PairKey {
    /// Registry id of the local source VM.
    pub src_vm: String,
    /// Inner destination address.
    pub dst: Ipv4Addr,
}

impl PairKey {
    /// Builds a key.
    pub fn new(src_vm: &str, dst: Ipv4Addr) -> Self {
        Self {
            src_vm: src_vm.to_string(),
            dst,
        }
    }
}

/// How long a refusal is remembered before the registry is asked again, in milliseconds.
/// Denials are operator decisions that change rarely; unavailability should be retried soon.
pub fn hold_ms(why: RefusalReason) -> u64 {
    match why {
        RefusalReason::PolicyDenied | RefusalReason::UnknownDestination => 3000,
        RefusalReason::RegistryUnavailable => 1000,
    }
}

/// What to do with a token request from the data path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Queued: the control thread will ask the registry.
    Queued,
    /// Queued, but the VM is beyond its request rate: it waits its turn (counted).
    Throttled,
    /// Already queued: nothing to do, the pending answer covers it.
    Duplicate,
    /// Refused recently: answer with this refusal without asking the registry.
    Refused(RefusalReason),
}

/// Most pairs waiting for the registry at once; beyond it requests are refused as unavailable
/// (the data path drops and counts, and asks again with the next packet).
pub const MAX_QUEUED: usize = 4096;
/// Most pairs one VM may have waiting (more than the data path's 256 pending destinations,
/// plus refreshes): one VM cannot take the whole queue.
pub const MAX_QUEUED_PER_VM: usize = 1024;

/// Requests waiting for the registry, recent refusals and last fetch times.
#[derive(Debug)]
pub struct RequestBook {
    queue: FairQueue,
    /// Queued or being asked: a request for one of these is a duplicate.
    queued: HashSet<PairKey>,
    refused: HashMap<PairKey, (RefusalReason, u64)>,
    fetched: HashMap<PairKey, u64>,
}

impl Default for RequestBook {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestBook {
    /// An empty book with the default per-VM request rate.
    pub fn new() -> Self {
        Self::with_rate(RequestRate::default())
    }

    /// An empty book limiting each VM's requests for new destinations to `rate`.
    pub fn with_rate(rate: RequestRate) -> Self {
        Self {
            queue: FairQueue::new(rate),
            queued: HashSet::new(),
            refused: HashMap::new(),
            fetched: HashMap::new(),
        }
    }

    /// A data-path request for `key` at time `now` (milliseconds).
    pub fn request(&mut self, key: PairKey, now: u64) -> Admission {
        if let Some((why, until)) = self.refused.get(&key) {
            if now < *until {
                return Admission::Refused(*why);
            }
            self.refused.remove(&key);
        }
        self.enqueue(key, Kind::Fetch, now)
    }

    /// A refresh of a token that is about to expire; skipped if the pair was fetched less
    /// than `min_interval` milliseconds ago (a token whose lifetime is shorter than the refresh
    /// margin would otherwise be fetched in a loop).
    pub fn refresh(&mut self, key: PairKey, now: u64, min_interval: u64) -> Admission {
        if let Some(at) = self.fetched.get(&key) {
            if now < at.saturating_add(min_interval) {
                return Admission::Duplicate;
            }
        }
        if self
            .refused
            .get(&key)
            .is_some_and(|(_, until)| now < *until)
        {
            return Admission::Duplicate;
        }
        self.enqueue(key, Kind::Refresh, now)
    }

    fn enqueue(&mut self, key: PairKey, kind: Kind, now: u64) -> Admission {
        if self.queued.contains(&key) {
            return Admission::Duplicate;
        }
        if self.queue.len() >= MAX_QUEUED || self.queue.len_of(&key.src_vm) >= MAX_QUEUED_PER_VM {
            return Admission::Refused(RefusalReason::RegistryUnavailable);
        }
        let throttled = self.queue.push(&key, kind, now);
        self.queued.insert(key);
        if throttled {
            Admission::Throttled
        } else {
            Admission::Queued
        }
    }

    /// The next pair to ask the registry about at `now`, if one may go now (it stays
    /// "queued", so that requests for it are duplicates, until [`Self::finish`]).
    pub fn take(&mut self, now: u64) -> Option<PairKey> {
        self.queue.pop(now).map(|(key, _)| key)
    }

    /// When [`Self::take`] will next return a pair (`None`: nothing is queued).
    pub fn ready_at(&self, now: u64) -> Option<u64> {
        self.queue.ready_at(now)
    }

    /// Records the answer for a pair returned by [`Self::take`].
    pub fn finish(&mut self, key: &PairKey, outcome: Result<(), RefusalReason>, now: u64) {
        self.queue.remove(key);
        self.queued.remove(key);
        match outcome {
            Ok(()) => {
                self.refused.remove(key);
                self.fetched.insert(key.clone(), now);
            }
            Err(why) => {
                self.fetched.remove(key);
                self.refused
                    .insert(key.clone(), (why, now.saturating_add(hold_ms(why))));
            }
        }
    }

    /// Forgets everything about pairs from `src_vm` (detached).
    pub fn forget_source(&mut self, src_vm: &str) {
        self.queue.remove_source(src_vm);
        self.queued.retain(|k| k.src_vm != src_vm);
        self.refused.retain(|k, _| k.src_vm != src_vm);
        self.fetched.retain(|k, _| k.src_vm != src_vm);
    }

    /// Forgets refusals and fetch times for destination `dst` (its VM changed: ask afresh).
    pub fn forget_destination(&mut self, dst: Ipv4Addr) {
        self.refused.retain(|k, _| k.dst != dst);
        self.fetched.retain(|k, _| k.dst != dst);
    }

    /// Forgets all refusals (e.g. after a watch resync: policy may have changed).
    pub fn forget_refusals(&mut self) {
        self.refused.clear();
    }

    /// Drops expired refusal entries and refilled rate buckets so the maps stay small.
    pub fn purge(&mut self, now: u64) {
        self.refused.retain(|_, (_, until)| now < *until);
        self.queue.prune(now);
    }

    /// Pairs waiting.
    pub fn queued_len(&self) -> usize {
        self.queue.len()
    }
}

/// Destination address <-> registry VM id, learned from token grants.
#[derive(Debug, Default)]
pub struct PeerIndex {
    by_vm: HashMap<String, HashSet<Ipv4Addr>>,
}

impl PeerIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// `vm` has address `ip` (from a grant's `dst_vm`/`dst_ip`).
    pub fn learn(&mut self, vm: &str, ip: Ipv4Addr) {
        self.by_vm.entry(vm.to_string()).or_default().insert(ip);
    }

    /// Addresses of `vm` that local ports may hold tokens for; forgets them.
    pub fn take(&mut self, vm: &str) -> Vec<Ipv4Addr> {
        let mut v: Vec<_> = self
            .by_vm
            .remove(vm)
            .unwrap_or_default()
            .into_iter()
            .collect();
        v.sort();
        v
    }

    /// Every known peer address; forgets them all.
    pub fn take_all(&mut self) -> Vec<Ipv4Addr> {
        let mut v: Vec<_> = self.by_vm.drain().flat_map(|(_, s)| s).collect();
        v.sort();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);

    #[test]
    fn burst_to_a_new_destination_is_one_request() {
        let mut b = RequestBook::new();
        assert_eq!(b.request(PairKey::new("a", B), 0), Admission::Queued);
        for _ in 0..10 {
            assert_eq!(b.request(PairKey::new("a", B), 0), Admission::Duplicate);
        }
        // Another source to the same destination is its own pair.
        assert_eq!(b.request(PairKey::new("c", B), 0), Admission::Queued);
        assert_eq!(b.queued_len(), 2);
        let k = b.take(0).unwrap();
        assert_eq!(k, PairKey::new("a", B));
        // Asked but not answered yet: still a duplicate.
        assert_eq!(b.request(PairKey::new("a", B), 0), Admission::Duplicate);
        b.finish(&k, Ok(()), 1000);
        assert_eq!(b.take(1000), Some(PairKey::new("c", B)));
    }

    #[test]
    fn refusals_are_held_then_retried() {
        let mut b = RequestBook::new();
        let k = PairKey::new("a", B);
        b.request(k.clone(), 10_000);
        b.finish(&k, Err(RefusalReason::PolicyDenied), 10_000);
        assert_eq!(
            b.request(k.clone(), 11_000),
            Admission::Refused(RefusalReason::PolicyDenied)
        );
        assert_eq!(b.request(k.clone(), 13_000), Admission::Queued);
        b.finish(&k, Err(RefusalReason::RegistryUnavailable), 13_000);
        assert_eq!(b.request(k.clone(), 14_000), Admission::Queued);
    }

    #[test]
    fn refresh_is_rate_limited() {
        let mut b = RequestBook::new();
        let k = PairKey::new("a", B);
        b.request(k.clone(), 100_000);
        b.finish(&k, Ok(()), 100_000);
        assert_eq!(b.refresh(k.clone(), 110_000, 15_000), Admission::Duplicate);
        assert_eq!(b.refresh(k.clone(), 115_000, 15_000), Admission::Queued);
        assert_eq!(b.refresh(k.clone(), 115_000, 15_000), Admission::Duplicate);
    }

    #[test]
    fn forgetting_a_destination_allows_an_immediate_request() {
        let mut b = RequestBook::new();
        let k = PairKey::new("a", B);
        b.request(k.clone(), 0);
        b.finish(&k, Err(RefusalReason::UnknownDestination), 0);
        b.forget_destination(B);
        assert_eq!(b.request(k.clone(), 0), Admission::Queued);
        b.forget_source("a");
        assert_eq!(b.queued_len(), 0);
    }

    fn generous() -> RequestBook {
        RequestBook::with_rate(RequestRate {
            per_sec: 1000,
            burst: 100_000,
        })
    }

    #[test]
    fn queue_is_bounded() {
        // Spread over VMs so that no one VM reaches its own bound first.
        let mut b = generous();
        let vms: Vec<String> = (0..8).map(|n| format!("vm{n}")).collect();
        for i in 0..MAX_QUEUED as u32 {
            let vm = &vms[i as usize % vms.len()];
            assert_eq!(
                b.request(PairKey::new(vm, Ipv4Addr::from(i)), 0),
                Admission::Queued
            );
        }
        assert_eq!(
            b.request(PairKey::new("a", Ipv4Addr::new(255, 1, 1, 1)), 0),
            Admission::Refused(RefusalReason::RegistryUnavailable)
        );
    }

    #[test]
    fn one_vm_cannot_take_the_whole_queue() {
        let mut b = generous();
        for i in 0..MAX_QUEUED_PER_VM as u32 {
            assert_eq!(
                b.request(PairKey::new("scan", Ipv4Addr::from(i)), 0),
                Admission::Queued
            );
        }
        assert_eq!(
            b.request(PairKey::new("scan", Ipv4Addr::new(255, 1, 1, 1)), 0),
            Admission::Refused(RefusalReason::RegistryUnavailable)
        );
        assert_eq!(b.request(PairKey::new("other", B), 0), Admission::Queued);
        // The other VM's request is the second one asked, not the 1025th.
        assert_eq!(b.take(0).unwrap().src_vm, "scan");
        assert_eq!(b.take(0), Some(PairKey::new("other", B)));
    }

    #[test]
    fn beyond_its_rate_a_vm_is_throttled_and_waits() {
        let mut b = RequestBook::with_rate(RequestRate {
            per_sec: 2,
            burst: 1,
        });
        assert_eq!(b.request(PairKey::new("a", B), 0), Admission::Queued);
        let c = Ipv4Addr::new(10, 0, 0, 4);
        assert_eq!(b.request(PairKey::new("a", c), 0), Admission::Throttled);
        assert_eq!(b.take(0), Some(PairKey::new("a", B)));
        assert_eq!(b.take(0), None);
        assert_eq!(b.ready_at(0), Some(500));
        assert_eq!(b.take(500), Some(PairKey::new("a", c)));
        assert_eq!(b.ready_at(500), None);
    }

    #[test]
    fn peer_index_maps_vm_changes_to_addresses() {
        let mut p = PeerIndex::new();
        p.learn("vm-b", B);
        p.learn("vm-b", B);
        p.learn("vm-c", Ipv4Addr::new(10, 0, 0, 4));
        assert_eq!(p.take("vm-b"), vec![B]);
        assert!(p.take("vm-b").is_empty());
        assert_eq!(p.take_all(), vec![Ipv4Addr::new(10, 0, 0, 4)]);
    }
}
