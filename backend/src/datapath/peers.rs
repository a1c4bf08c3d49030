//! Per-VM peer table: the token to use for each destination VM address, and small bounded queues
//! of packets waiting for a token.
//!
//! The data path only ever takes short locks here; it never waits for the registry. A packet for a
//! destination without a usable token is copied into that destination's queue (the only payload
//! copy on TX) and the first such packet asks the control plane for a token. When the answer
//! comes, [`PeerTable::install`] hands the queued packets, each tagged with the queue pair whose
//! worker queued it, to a callback *before* the token becomes visible to the workers.
//!
//! Lock order: `pending` before `tokens`, everywhere, so a packet cannot be queued after the
//! token that would have released it was installed; and since the callback runs before the
//! token is inserted, a worker that finds the token has its waiting packets handed to it
//! already (see `datapath::handoff`).

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use vnp_protocol::token::{Expiry, Token};

use super::{PeerToken, RefusalReason};

/// A packet that waited for a token: the queue pair whose worker queued it, and its bytes.
pub type WaitingPacket = (usize, Vec<u8>);

/// Limits of the pending queues.
#[derive(Debug, Clone, Copy)]
pub struct PendingLimits {
    /// Packets kept per destination while its token is on the way.
    pub per_destination: usize,
    /// Destinations that may wait at once (bounds memory against a guest scanning addresses).
    pub destinations: usize,
    /// Ask the control plane again if no answer came after this long.
    pub retry_after: Duration,
    /// After a refusal, drop packets to that destination without asking again for this long.
    pub refusal_hold: Duration,
}

impl Default for PendingLimits {
    fn default() -> Self {
        Self {
            per_destination: 32,
            destinations: 256,
            retry_after: Duration::from_secs(2),
            refusal_hold: Duration::from_secs(5),
        }
    }
}

/// Most refusals remembered at once (see [`PeerTable::refuse`]).
pub const MAX_REFUSALS: usize = 4096;

/// A token is not used for sending when it expires within this many seconds: the datagram would
/// arrive expired (the receiver allows some skew, but we do not rely on it).
pub const TOKEN_USE_MARGIN_SECS: u32 = 2;
/// The first packet to a peer, and then one packet at least this often, carries a return token.
pub const RETURN_TOKEN_INTERVAL_SECS: u32 = 60;
/// Return tokens we mint are valid this long, and a learned one is trusted at most this long
/// from when it arrived, whatever expiry it claims (the option is not covered by the token, so
/// an on-path attacker can plant one).
pub const RETURN_TOKEN_TTL_SECS: u32 = 600;

/// Where a token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenOrigin {
    /// Granted by the registry: authoritative.
    Registry,
    /// Learned from a return-token option on a peer's datagram: a hint that saves a registry
    /// round trip, never allowed to override what the registry said.
    Learned,
}

/// How to reach one destination VM.
#[derive(Debug)]
pub struct PeerEntry {
    token: PeerToken,
    origin: TokenOrigin,
    /// Unix seconds when we last attached a return token for this peer (0 = never).
    return_sent_at: AtomicU32,
}

/// What the TX path needs to send one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendInfo {
    /// Underlay address and port of the destination VM.
    pub endpoint: SocketAddrV4,
    /// The token `T_src_dst`.
    pub token: Token,
    /// Its expiry.
    pub expiry: Expiry,
}

impl From<&PeerToken> for SendInfo {
    fn from(t: &PeerToken) -> Self {
        Self {
            endpoint: SocketAddrV4::new(t.dst_host, t.dst_port),
            token: t.token,
            expiry: t.expiry,
        }
    }
}

impl PeerEntry {
    fn usable(&self, now: u32) -> bool {
        let e = self.token.expiry;
        e.is_never() || u64::from(e.0) > u64::from(now) + u64::from(TOKEN_USE_MARGIN_SECS)
    }

    /// Where the token came from.
    pub fn origin(&self) -> TokenOrigin {
        self.origin
    }

    /// Send parameters.
    pub fn send_info(&self) -> SendInfo {
        SendInfo::from(&self.token)
    }

    /// Whether the next packet should carry a return token. Claims the slot (so concurrent
    /// workers rarely both attach one; if they do, it is harmless).
    pub fn claim_return_token(&self, now: u32) -> bool {
        let last = self.return_sent_at.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < RETURN_TOKEN_INTERVAL_SECS {
            return false;
        }
        self.return_sent_at
            .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// Gives the slot back when the packet that claimed it could not carry the option.
    pub fn unclaim_return_token(&self) {
        self.return_sent_at.store(0, Ordering::Relaxed);
    }
}

/// Read access to the token table for a burst of lookups.
#[derive(Debug)]
pub struct PeersView<'a> {
    tokens: RwLockReadGuard<'a, HashMap<Ipv4Addr, PeerEntry>>,
}

impl PeersView<'_> {
    /// The entry for `dst` if its token is usable at `now` (Unix seconds).
    pub fn get(&self, dst: Ipv4Addr, now: u32) -> Option<&PeerEntry> {
        self.tokens.get(&dst).filter(|e| e.usable(now))
    }
}

#[derive(Debug)]
struct PendingQueue {
    packets: VecDeque<WaitingPacket>,
    requested_at: Instant,
}

#[derive(Debug, Default)]
struct PendingState {
    queues: HashMap<Ipv4Addr, PendingQueue>,
    refused: HashMap<Ipv4Addr, (RefusalReason, Instant)>,
}

/// Result of [`PeerTable::enqueue`].
#[derive(Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued; `request` says whether the caller must ask the control plane for a token now.
    Queued {
        /// Ask the control plane.
        request: bool,
    },
    /// The queue (or the table of waiting destinations) is full: drop, counted.
    Full,
    /// The destination was refused recently: drop, counted by the reason.
    Refused(RefusalReason),
    /// A token arrived meanwhile: send the packet right away.
    Ready(SendInfo),
}

/// Tokens and pending packets of one VM.
#[derive(Debug, Default)]
pub struct PeerTable {
    limits: PendingLimits,
    pending: Mutex<PendingState>,
    tokens: RwLock<HashMap<Ipv4Addr, PeerEntry>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these maps inconsistent (every update is a
    // single insert/remove), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PeerTable {
    /// An empty table with the given limits.
    pub fn new(limits: PendingLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Read access for the TX hot path.
    pub fn view(&self) -> PeersView<'_> {
        PeersView {
            tokens: self.tokens.read().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Queues a packet of queue pair `pair` for `dst`, which had no usable token. `packet` is
    /// only called (copying the packet out of guest memory) when the packet is really queued.
    pub fn enqueue(
        &self,
        dst: Ipv4Addr,
        pair: usize,
        now_unix: u32,
        now: Instant,
        packet: impl FnOnce() -> Vec<u8>,
    ) -> Enqueued {
        let mut pending = lock(&self.pending);
        if let Some(entry) = self.view().get(dst, now_unix) {
            return Enqueued::Ready(entry.send_info());
        }
        if let Some((reason, at)) = pending.refused.get(&dst).copied() {
            if now.duration_since(at) < self.limits.refusal_hold {
                return Enqueued::Refused(reason);
            }
            pending.refused.remove(&dst);
        }
        let waiting = pending.queues.len();
        match pending.queues.get_mut(&dst) {
            Some(q) => {
                if q.packets.len() >= self.limits.per_destination {
                    return Enqueued::Full;
                }
                q.packets.push_back((pair, packet()));
                let request = now.duration_since(q.requested_at) >= self.limits.retry_after;
                if request {
                    q.requested_at = now;
                }
                Enqueued::Queued { request }
            }
            None => {
                if waiting >= self.limits.destinations || self.limits.per_destination == 0 {
                    return Enqueued::Full;
                }
                let mut packets = VecDeque::new();
                packets.push_back((pair, packet()));
                pending.queues.insert(
                    dst,
                    PendingQueue {
                        packets,
                        requested_at: now,
                    },
                );
                Enqueued::Queued { request: true }
            }
        }
    }

    /// Installs a token for `dst`. The packets that waited for it go to `hand_off` with the new
    /// entry (to send with, and to claim its first return token on), oldest first, under the
    /// pending lock and before the token is visible to the workers.
    pub fn install(
        &self,
        dst: Ipv4Addr,
        token: PeerToken,
        hand_off: impl FnOnce(&PeerEntry, Vec<WaitingPacket>),
    ) {
        self.put(dst, token, TokenOrigin::Registry, hand_off);
    }

    fn put(
        &self,
        dst: Ipv4Addr,
        token: PeerToken,
        origin: TokenOrigin,
        hand_off: impl FnOnce(&PeerEntry, Vec<WaitingPacket>),
    ) {
        let mut pending = lock(&self.pending);
        let entry = PeerEntry {
            token,
            origin,
            return_sent_at: AtomicU32::new(0),
        };
        pending.refused.remove(&dst);
        if let Some(q) = pending.queues.remove(&dst) {
            hand_off(&entry, q.packets.into());
        }
        self.tokens
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dst, entry);
    }

    /// Installs a return token learned from a peer's packet at `now` (Unix seconds), like
    /// [`PeerTable::install`], and returns whether it was taken. Its expiry is capped at
    /// `now + RETURN_TOKEN_TTL_SECS`. It is not taken while the registry's token for `dst` is
    /// still usable (the option is not authenticated: a planted one must not cut the pair off),
    /// nor when a learned token for the same endpoint is at least as fresh.
    pub fn learn(
        &self,
        dst: Ipv4Addr,
        mut token: PeerToken,
        now: u32,
        hand_off: impl FnOnce(&PeerEntry, Vec<WaitingPacket>),
    ) -> bool {
        let cap = now.saturating_add(RETURN_TOKEN_TTL_SECS);
        if token.expiry.is_never() || token.expiry.0 > cap {
            token.expiry = Expiry(cap);
        }
        {
            let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner());
            if let Some(current) = tokens.get(&dst) {
                if current.origin == TokenOrigin::Registry && current.usable(now) {
                    return false;
                }
                let same_endpoint = current.token.dst_host == token.dst_host
                    && current.token.dst_port == token.dst_port;
                let fresher =
                    current.token.expiry.is_never() || current.token.expiry.0 >= token.expiry.0;
                if current.origin == TokenOrigin::Learned && same_endpoint && fresher {
                    return false;
                }
            }
        }
        self.put(dst, token, TokenOrigin::Learned, hand_off);
        true
    }

    /// Drops the packets waiting for `dst` and remembers the refusal for a while. Returns how
    /// many packets were dropped.
    pub fn refuse(&self, dst: Ipv4Addr, reason: RefusalReason, now: Instant) -> usize {
        let mut pending = lock(&self.pending);
        // A guest probing many addresses must not grow this map without bound: forget expired
        // refusals first, and beyond the cap stop remembering new ones (the control plane keeps
        // its own hold-down, so forgetting only costs a request).
        if pending.refused.len() >= MAX_REFUSALS {
            let hold = self.limits.refusal_hold;
            pending
                .refused
                .retain(|_, (_, at)| now.duration_since(*at) < hold);
        }
        if pending.refused.len() < MAX_REFUSALS {
            pending.refused.insert(dst, (reason, now));
        }
        pending.queues.remove(&dst).map_or(0, |q| q.packets.len())
    }

    /// Forgets everything about `dst` (its endpoint changed). Returns dropped pending packets.
    pub fn forget(&self, dst: Ipv4Addr) -> usize {
        let mut pending = lock(&self.pending);
        self.tokens
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&dst);
        pending.refused.remove(&dst);
        pending.queues.remove(&dst).map_or(0, |q| q.packets.len())
    }

    /// Where traffic to `dst` goes now (the endpoint of its token), if it has one.
    pub fn endpoint_of(&self, dst: Ipv4Addr) -> Option<std::net::SocketAddrV4> {
        let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner());
        let t = tokens.get(&dst)?.token;
        Some(std::net::SocketAddrV4::new(t.dst_host, t.dst_port))
    }

    /// Destinations whose token expires before `t` (never-expiring tokens excluded).
    pub fn expiring_before(&self, t: Expiry) -> Vec<Ipv4Addr> {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, e)| !e.token.expiry.is_never() && e.token.expiry.0 < t.0)
            .map(|(d, _)| *d)
            .collect()
    }

    /// Drops every pending packet (port stopping). Returns how many.
    pub fn discard_pending(&self) -> usize {
        let mut pending = lock(&self.pending);
        pending.queues.drain().map(|(_, q)| q.packets.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 9);

    /// Installs and returns what was handed off (packets without their pair).
    fn install(t: &PeerTable, dst: Ipv4Addr, token: PeerToken) -> (SendInfo, Vec<Vec<u8>>) {
        let mut out = (SendInfo::from(&token), Vec::new());
        t.install(dst, token, |entry, packets| {
            out = (
                entry.send_info(),
                packets.into_iter().map(|(_, p)| p).collect(),
            );
        });
        out
    }

    /// Learns at a time where the cap on learned expiries does not matter.
    fn learn(t: &PeerTable, dst: Ipv4Addr, token: PeerToken) -> Option<()> {
        learn_at(t, dst, token, 2000)
    }

    fn learn_at(t: &PeerTable, dst: Ipv4Addr, token: PeerToken, now: u32) -> Option<()> {
        t.learn(dst, token, now, |_, _| {}).then_some(())
    }

    fn token(expiry: u32, port: u16) -> PeerToken {
        PeerToken {
            dst_host: Ipv4Addr::new(198, 18, 0, 2),
            dst_port: port,
            token: Token::from_bytes([7; 8]),
            expiry: Expiry(expiry),
        }
    }

    #[test]
    fn first_packet_requests_then_queue_fills_and_install_releases() {
        let t = PeerTable::new(PendingLimits {
            per_destination: 2,
            ..PendingLimits::default()
        });
        let now = Instant::now();
        assert_eq!(
            t.enqueue(DST, 0, 1000, now, || vec![1]),
            Enqueued::Queued { request: true }
        );
        assert_eq!(
            t.enqueue(DST, 0, 1000, now, || vec![2]),
            Enqueued::Queued { request: false }
        );
        assert_eq!(t.enqueue(DST, 0, 1000, now, || vec![3]), Enqueued::Full);
        let (info, packets) = install(&t, DST, token(2000, 5));
        assert_eq!(packets, vec![vec![1], vec![2]]);
        assert_eq!(info.endpoint.port(), 5);
        assert!(t.view().get(DST, 1000).is_some());
        // With a token present, enqueue says send now.
        assert!(matches!(
            t.enqueue(DST, 0, 1000, now, || vec![4]),
            Enqueued::Ready(_)
        ));
    }

    #[test]
    fn retry_after_timeout() {
        let t = PeerTable::new(PendingLimits::default());
        let now = Instant::now();
        t.enqueue(DST, 0, 0, now, Vec::new);
        assert_eq!(
            t.enqueue(DST, 0, 0, now + Duration::from_secs(3), Vec::new),
            Enqueued::Queued { request: true }
        );
    }

    #[test]
    fn expired_or_nearly_expired_tokens_are_not_used() {
        let t = PeerTable::new(PendingLimits::default());
        install(&t, DST, token(1000, 5));
        assert!(t.view().get(DST, 990).is_some());
        assert!(t.view().get(DST, 999).is_none());
        assert!(t.view().get(DST, 2000).is_none());
        install(&t, DST, token(u32::MAX, 5));
        assert!(t.view().get(DST, u32::MAX - 1).is_some());
    }

    #[test]
    fn refusal_drops_queue_and_holds() {
        let t = PeerTable::new(PendingLimits::default());
        let now = Instant::now();
        t.enqueue(DST, 0, 0, now, || vec![1]);
        t.enqueue(DST, 0, 0, now, || vec![2]);
        assert_eq!(t.refuse(DST, RefusalReason::PolicyDenied, now), 2);
        assert_eq!(
            t.enqueue(DST, 0, 0, now, || vec![3]),
            Enqueued::Refused(RefusalReason::PolicyDenied)
        );
        assert_eq!(
            t.enqueue(DST, 0, 0, now + Duration::from_secs(6), || vec![3]),
            Enqueued::Queued { request: true }
        );
    }

    #[test]
    fn refusals_are_bounded() {
        let t = PeerTable::new(PendingLimits::default());
        let now = Instant::now();
        for i in 0..(MAX_REFUSALS as u32 + 100) {
            t.refuse(
                Ipv4Addr::from(0x0a00_0000 + i),
                RefusalReason::UnknownDestination,
                now,
            );
        }
        assert_eq!(lock(&t.pending).refused.len(), MAX_REFUSALS);
        // Once they expire, new refusals are remembered again.
        let later = now + Duration::from_secs(10);
        t.refuse(
            Ipv4Addr::new(10, 9, 9, 9),
            RefusalReason::PolicyDenied,
            later,
        );
        assert_eq!(lock(&t.pending).refused.len(), 1);
    }

    #[test]
    fn destinations_are_bounded() {
        let t = PeerTable::new(PendingLimits {
            destinations: 2,
            ..PendingLimits::default()
        });
        let now = Instant::now();
        for i in 0..2 {
            assert!(matches!(
                t.enqueue(Ipv4Addr::new(10, 0, 1, i), 0, 0, now, Vec::new),
                Enqueued::Queued { .. }
            ));
        }
        assert_eq!(
            t.enqueue(Ipv4Addr::new(10, 0, 1, 9), 0, 0, now, Vec::new),
            Enqueued::Full
        );
    }

    #[test]
    fn learn_keeps_fresher_token_and_forget_clears() {
        let t = PeerTable::new(PendingLimits::default());
        assert!(learn(&t, DST, token(2000, 5)).is_some());
        assert!(learn(&t, DST, token(1500, 5)).is_none());
        assert!(learn(&t, DST, token(2500, 5)).is_some());
        // A different endpoint (the peer moved) always wins.
        assert!(learn(&t, DST, token(100, 6)).is_some());
        assert_eq!(t.expiring_before(Expiry(200)), vec![DST]);
        assert_eq!(t.forget(DST), 0);
        assert!(t.view().get(DST, 0).is_none());
    }

    #[test]
    fn return_token_claimed_once_per_interval() {
        let t = PeerTable::new(PendingLimits::default());
        install(&t, DST, token(5000, 5));
        let view = t.view();
        let e = view.get(DST, 100).unwrap();
        assert!(e.claim_return_token(100));
        assert!(!e.claim_return_token(110));
        assert!(e.claim_return_token(100 + RETURN_TOKEN_INTERVAL_SECS));
        e.unclaim_return_token();
        assert!(e.claim_return_token(200));
    }

    /// A planted return-token option (random token, far expiry) on a replayed datagram.
    fn planted(port: u16) -> PeerToken {
        PeerToken {
            token: Token::from_bytes([0xee; 8]),
            ..token(u32::MAX - 1, port)
        }
    }

    #[test]
    fn learned_token_never_replaces_a_usable_registry_token() {
        let t = PeerTable::new(PendingLimits::default());
        install(&t, DST, token(5000, 5));
        // Neither for the same endpoint nor for another one (the registry says where it is).
        assert!(learn_at(&t, DST, planted(5), 1000).is_none());
        assert!(learn_at(&t, DST, planted(6), 1000).is_none());
        let view = t.view();
        let kept = view.get(DST, 1000).expect("registry token kept");
        assert_eq!(kept.origin(), TokenOrigin::Registry);
        assert_eq!(kept.send_info(), SendInfo::from(&token(5000, 5)));
        drop(view);
        // Once the registry's token is no longer usable, a return token may stand in for it.
        assert!(learn_at(&t, DST, token(5500, 5), 4999).is_some());
        assert_eq!(
            t.view().get(DST, 4999).unwrap().origin(),
            TokenOrigin::Learned
        );
        // And the registry's answer always replaces a learned token.
        install(&t, DST, token(9000, 5));
        assert_eq!(
            t.view().get(DST, 5000).unwrap().origin(),
            TokenOrigin::Registry
        );
    }

    #[test]
    fn learned_expiry_is_capped_at_the_return_token_lifetime() {
        let t = PeerTable::new(PendingLimits::default());
        let now = 1_000_000;
        assert!(learn_at(&t, DST, planted(5), now).is_some());
        let cap = now + RETURN_TOKEN_TTL_SECS;
        assert_eq!(
            t.view().get(DST, now).unwrap().send_info().expiry,
            Expiry(cap)
        );
        assert_eq!(t.expiring_before(Expiry(cap + 1)), vec![DST]);
        // A never-expiring one is capped the same way.
        t.forget(DST);
        let never = PeerToken {
            expiry: Expiry::NEVER,
            ..planted(5)
        };
        assert!(learn_at(&t, DST, never, now).is_some());
        assert_eq!(
            t.view().get(DST, now).unwrap().send_info().expiry,
            Expiry(cap)
        );
        // The peer's next genuine return token (minted later) replaces the planted one.
        assert!(learn_at(
            &t,
            DST,
            token(now + 60 + RETURN_TOKEN_TTL_SECS, 5),
            now + 60
        )
        .is_some());
        assert_eq!(
            t.view().get(DST, now + 60).unwrap().send_info().token,
            Token::from_bytes([7; 8])
        );
    }
}
