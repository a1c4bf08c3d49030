//! The order in which the control thread asks the registry: fair across VMs, pure (the caller
//! passes the time in milliseconds).
//!
//! The control thread asks one pair at a time, so whatever waits ahead of a request delays it.
//! With one first-in-first-out queue, a guest scanning addresses (256 pending destinations at
//! a time) put hundreds of requests ahead of every other VM's first packet. Here:
//!
//! - refreshes of tokens in use go before fetches for new destinations (a refresh keeps
//!   established traffic flowing; it is bounded by the tokens a VM already holds);
//! - within each class the VMs take turns, one request each (round robin);
//! - each VM's fetches draw from its own token bucket ([`RequestRate`]): a VM beyond its rate
//!   waits, it is not refused, and does not slow anyone else down.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;

use super::book::PairKey;

/// How fast one VM may have new destinations looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestRate {
    /// Sustained requests per second.
    pub per_sec: u32,
    /// Requests allowed at once after a quiet period.
    pub burst: u32,
}

impl Default for RequestRate {
    fn default() -> Self {
        Self {
            per_sec: 20,
            burst: 100,
        }
    }
}

/// One bucket "token" (one request), in the bucket's units.
const ONE: u64 = 1000;

/// A token bucket counted in thousandths of a request, refilled lazily.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: u64,
    at_ms: u64,
}

impl Bucket {
    fn full(rate: RequestRate, now_ms: u64) -> Self {
        Self {
            level: u64::from(rate.burst) * ONE,
            at_ms: now_ms,
        }
    }

    fn refill(&mut self, rate: RequestRate, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.at_ms);
        // per_sec requests a second = per_sec thousandths a millisecond.
        let gained = elapsed.saturating_mul(u64::from(rate.per_sec));
        self.level = self
            .level
            .saturating_add(gained)
            .min(u64::from(rate.burst) * ONE);
        self.at_ms = self.at_ms.max(now_ms);
    }

    fn is_full(&self, rate: RequestRate) -> bool {
        self.level >= u64::from(rate.burst) * ONE
    }

    /// When `n` more requests will be allowed (`now` if already).
    fn ready_at(&self, rate: RequestRate, n: u64) -> u64 {
        let need = n * ONE;
        if self.level >= need {
            return self.at_ms;
        }
        let per_ms = u64::from(rate.per_sec.max(1));
        self.at_ms + (need - self.level).div_ceil(per_ms)
    }
}

/// Why a request is queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A token in use expires soon.
    Refresh,
    /// A destination the VM has no token for.
    Fetch,
}

#[derive(Debug, Default)]
struct VmQueue {
    refreshes: VecDeque<Ipv4Addr>,
    fetches: VecDeque<Ipv4Addr>,
}

impl VmQueue {
    fn is_empty(&self) -> bool {
        self.refreshes.is_empty() && self.fetches.is_empty()
    }
}

/// Requests waiting for the registry, per VM, taken in a fair order.
#[derive(Debug)]
pub struct FairQueue {
    rate: RequestRate,
    vms: HashMap<String, VmQueue>,
    /// VMs with queued requests, in turn order.
    turn: VecDeque<String>,
    /// Buckets of VMs that spent some recently (a full bucket is the same as none).
    buckets: HashMap<String, Bucket>,
    len: usize,
}

impl FairQueue {
    /// An empty queue limiting each VM's fetches to `rate`.
    pub fn new(rate: RequestRate) -> Self {
        Self {
            rate,
            vms: HashMap::new(),
            turn: VecDeque::new(),
            buckets: HashMap::new(),
            len: 0,
        }
    }

    /// Queues `key` (the caller has made sure it is not queued yet). Returns true when a fetch
    /// will have to wait for the VM's rate (what the caller counts as throttled).
    pub fn push(&mut self, key: &PairKey, kind: Kind, now_ms: u64) -> bool {
        if !self.vms.contains_key(&key.src_vm) {
            self.turn.push_back(key.src_vm.clone());
        }
        let q = self.vms.entry(key.src_vm.clone()).or_default();
        self.len += 1;
        match kind {
            Kind::Refresh => {
                q.refreshes.push_back(key.dst);
                false
            }
            Kind::Fetch => {
                q.fetches.push_back(key.dst);
                let ahead = q.fetches.len() as u64;
                let mut bucket = self.bucket(&key.src_vm, now_ms);
                bucket.refill(self.rate, now_ms);
                bucket.ready_at(self.rate, ahead) > now_ms
            }
        }
    }

    fn bucket(&self, vm: &str, now_ms: u64) -> Bucket {
        self.buckets
            .get(vm)
            .copied()
            .unwrap_or_else(|| Bucket::full(self.rate, now_ms))
    }

    /// Takes the next request to send at `now_ms`, if any may go now.
    pub fn pop(&mut self, now_ms: u64) -> Option<(PairKey, Kind)> {
        self.pop_refresh().or_else(|| self.pop_fetch(now_ms))
    }

    fn pop_refresh(&mut self) -> Option<(PairKey, Kind)> {
        let at = self
            .turn
            .iter()
            .position(|vm| self.vms.get(vm).is_some_and(|q| !q.refreshes.is_empty()))?;
        let vm = self.turn.remove(at)?;
        let dst = self.vms.get_mut(&vm)?.refreshes.pop_front()?;
        Some((self.took(vm, dst), Kind::Refresh))
    }

    fn pop_fetch(&mut self, now_ms: u64) -> Option<(PairKey, Kind)> {
        let rate = self.rate;
        let mut chosen = None;
        for (i, vm) in self.turn.iter().enumerate() {
            if self.vms.get(vm).is_none_or(|q| q.fetches.is_empty()) {
                continue;
            }
            let mut bucket = self.bucket(vm, now_ms);
            bucket.refill(rate, now_ms);
            if bucket.level >= ONE {
                bucket.level -= ONE;
                self.buckets.insert(vm.clone(), bucket);
                chosen = Some(i);
                break;
            }
        }
        let vm = self.turn.remove(chosen?)?;
        let dst = self.vms.get_mut(&vm)?.fetches.pop_front()?;
        Some((self.took(vm, dst), Kind::Fetch))
    }

    /// Bookkeeping after taking `dst` from `vm`'s queue: the VM goes to the back of the turn
    /// order if it has more, and is forgotten if not.
    fn took(&mut self, vm: String, dst: Ipv4Addr) -> PairKey {
        self.len -= 1;
        let key = PairKey::new(&vm, dst);
        if self.vms.get(&vm).is_some_and(|q| !q.is_empty()) {
            self.turn.push_back(vm);
        } else {
            self.vms.remove(&vm);
        }
        key
    }

    /// When [`Self::pop`] will next return something: `None` when nothing is queued, a time
    /// not after `now_ms` when something may go now.
    pub fn ready_at(&self, now_ms: u64) -> Option<u64> {
        let mut earliest: Option<u64> = None;
        for (vm, q) in &self.vms {
            if !q.refreshes.is_empty() {
                return Some(now_ms);
            }
            if !q.fetches.is_empty() {
                let mut bucket = self.bucket(vm, now_ms);
                bucket.refill(self.rate, now_ms);
                let at = bucket.ready_at(self.rate, 1).max(now_ms);
                earliest = Some(earliest.map_or(at, |e| e.min(at)));
            }
        }
        earliest
    }

    /// Removes a queued request (forgotten before it was sent).
    pub fn remove(&mut self, key: &PairKey) {
        let Some(q) = self.vms.get_mut(&key.src_vm) else {
            return;
        };
        let before = q.refreshes.len() + q.fetches.len();
        q.refreshes.retain(|d| *d != key.dst);
        q.fetches.retain(|d| *d != key.dst);
        self.len -= before - q.refreshes.len() - q.fetches.len();
        if q.is_empty() {
            self.vms.remove(&key.src_vm);
            self.turn.retain(|v| *v != key.src_vm);
        }
    }

    /// Removes everything `vm` queued (it detached); its bucket is forgotten too.
    pub fn remove_source(&mut self, vm: &str) {
        if let Some(q) = self.vms.remove(vm) {
            self.len -= q.refreshes.len() + q.fetches.len();
        }
        self.turn.retain(|v| v != vm);
        self.buckets.remove(vm);
    }

    /// Forgets buckets that have refilled completely (they equal a fresh one).
    pub fn prune(&mut self, now_ms: u64) {
        let rate = self.rate;
        self.buckets.retain(|_, b| {
            b.refill(rate, now_ms);
            !b.is_full(rate)
        });
    }

    /// Requests queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Requests queued by `vm`.
    pub fn len_of(&self, vm: &str) -> usize {
        self.vms
            .get(vm)
            .map_or(0, |q| q.refreshes.len() + q.fetches.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> Ipv4Addr {
        Ipv4Addr::from(0x0a00_0000 + n)
    }

    fn key(vm: &str, n: u32) -> PairKey {
        PairKey::new(vm, ip(n))
    }

    const GENEROUS: RequestRate = RequestRate {
        per_sec: 1000,
        burst: 10_000,
    };

    #[test]
    fn a_scanner_does_not_delay_another_vms_first_request() {
        let mut q = FairQueue::new(GENEROUS);
        for n in 0..256 {
            q.push(&key("scan", n), Kind::Fetch, 0);
        }
        q.push(&key("normal", 1), Kind::Fetch, 0);
        // The scanner queued first, so it goes first; then it is the normal VM's turn.
        assert_eq!(q.pop(0), Some((key("scan", 0), Kind::Fetch)));
        assert_eq!(q.pop(0), Some((key("normal", 1), Kind::Fetch)));
        assert_eq!(q.pop(0), Some((key("scan", 1), Kind::Fetch)));
        assert_eq!(q.len(), 254);
    }

    #[test]
    fn vms_take_turns() {
        let mut q = FairQueue::new(GENEROUS);
        for n in 0..3 {
            q.push(&key("a", n), Kind::Fetch, 0);
            q.push(&key("b", n), Kind::Fetch, 0);
        }
        q.push(&key("c", 9), Kind::Fetch, 0);
        let order: Vec<_> = std::iter::from_fn(|| q.pop(0))
            .map(|(k, _)| k.src_vm)
            .collect();
        assert_eq!(order, ["a", "b", "c", "a", "b", "a", "b"]);
        assert!(q.is_empty());
        assert_eq!(q.ready_at(0), None);
    }

    #[test]
    fn refreshes_go_before_fetches() {
        let mut q = FairQueue::new(GENEROUS);
        for n in 0..10 {
            q.push(&key("scan", n), Kind::Fetch, 0);
        }
        q.push(&key("web", 1), Kind::Refresh, 0);
        q.push(&key("db", 2), Kind::Refresh, 0);
        assert_eq!(q.pop(0), Some((key("web", 1), Kind::Refresh)));
        assert_eq!(q.pop(0), Some((key("db", 2), Kind::Refresh)));
        assert_eq!(q.pop(0), Some((key("scan", 0), Kind::Fetch)));
    }

    #[test]
    fn a_vm_beyond_its_rate_waits_and_is_counted() {
        let rate = RequestRate {
            per_sec: 10,
            burst: 3,
        };
        let mut q = FairQueue::new(rate);
        let throttled: Vec<bool> = (0..5)
            .map(|n| q.push(&key("scan", n), Kind::Fetch, 0))
            .collect();
        assert_eq!(throttled, [false, false, false, true, true]);
        for n in 0..3 {
            assert_eq!(q.pop(0), Some((key("scan", n), Kind::Fetch)));
        }
        // Empty bucket: nothing may go, and the queue says when something may (10/s: 100 ms).
        assert_eq!(q.pop(0), None);
        assert_eq!(q.ready_at(0), Some(100));
        // Another VM is not affected; refreshes are not rate-limited.
        assert!(!q.push(&key("other", 1), Kind::Fetch, 0));
        q.push(&key("scan", 99), Kind::Refresh, 0);
        assert_eq!(q.ready_at(0), Some(0));
        assert_eq!(q.pop(0), Some((key("scan", 99), Kind::Refresh)));
        assert_eq!(q.pop(0), Some((key("other", 1), Kind::Fetch)));
        assert_eq!(q.pop(50), None);
        assert_eq!(q.pop(100), Some((key("scan", 3), Kind::Fetch)));
        assert_eq!(q.pop(150), None);
        assert_eq!(q.pop(200), Some((key("scan", 4), Kind::Fetch)));
        assert!(q.is_empty());
    }

    #[test]
    fn the_bucket_survives_an_empty_queue_until_it_is_full_again() {
        let rate = RequestRate {
            per_sec: 1,
            burst: 2,
        };
        let mut q = FairQueue::new(rate);
        for n in 0..2 {
            q.push(&key("a", n), Kind::Fetch, 0);
            assert!(q.pop(0).is_some());
        }
        // The queue drained, but the bucket did not refill by draining.
        assert!(q.push(&key("a", 5), Kind::Fetch, 10));
        assert_eq!(q.pop(10), None);
        q.prune(10);
        assert_eq!(q.pop(1000), Some((key("a", 5), Kind::Fetch)));
        q.prune(10_000);
        assert!(q.buckets.is_empty());
    }

    #[test]
    fn removing_keeps_counts_and_turns_right() {
        let mut q = FairQueue::new(GENEROUS);
        q.push(&key("a", 1), Kind::Fetch, 0);
        q.push(&key("a", 2), Kind::Refresh, 0);
        q.push(&key("b", 1), Kind::Fetch, 0);
        q.remove(&key("a", 2));
        assert_eq!(q.len_of("a"), 1);
        q.remove_source("a");
        assert_eq!(q.len(), 1);
        assert_eq!(q.pop(0), Some((key("b", 1), Kind::Fetch)));
        assert!(q.is_empty());
        assert!(q.turn.is_empty() && q.vms.is_empty());
    }
}
