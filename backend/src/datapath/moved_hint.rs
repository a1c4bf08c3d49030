//! The endpoint-moved hint (`docs/protocol.md`, "Live migration"): a host that forwards a
//! straggler for a VM that migrated away tells the straggler's sender, which then asks the
//! registry again at once instead of waiting for its watch.
//!
//! The hint is not authenticated (the source holds no token towards the sender's VM), so a
//! receiver only ever treats it as a reason to ask the registry: it never moves a peer, never
//! drops a token, and is acted on only when it comes from the endpoint the receiver itself
//! sends that VM's traffic to, at most once per [`RECHECK_INTERVAL`] per VM. A forged hint can
//! at worst cost a rate-limited registry lookup.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use vnp_protocol::token::{Expiry, Token};

use super::port::PortCore;
use vnp_protocol::wire::options::{EndpointMoved, OptionsIter, VnpOption};
use vnp_protocol::wire::{ipv4, VnpHeader, VnpRepr, HEADER_LEN};

/// Inner protocol number of the hint's bare IPv4 header (RFC 3692's experimental 253): a
/// hint carries no packet for the guest, and nothing else is sent with this number.
pub const HINT_PROTOCOL: u8 = 253;
/// A receiver asks the registry about one VM at most this often because of hints.
pub const RECHECK_INTERVAL: Duration = Duration::from_millis(500);
/// Moved VMs a receiver's rate limit remembers at once.
pub const RECHECK_VMS: usize = 1024;

/// Bytes of a hint datagram: VNP header, bare IPv4 header, the option.
pub const HINT_LEN: usize = HEADER_LEN + ipv4::MIN_HEADER_LEN + EndpointMoved::WIRE_LEN;

/// "VM `moved_vm` no longer lives at the endpoint this came from."
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MovedHint {
    /// The network both VMs are on.
    pub network_id: u32,
    /// The VM that migrated (the inner source).
    pub moved_vm: Ipv4Addr,
    /// The VM that sent the straggler (the inner destination).
    pub to_vm: Ipv4Addr,
    /// Generation of the moved VM's endpoint record.
    pub generation: u64,
}

impl MovedHint {
    /// The datagram: a VNP header with the options flag and a zero token and expiry (it
    /// passes no receive check), a 20-byte IPv4 header with protocol [`HINT_PROTOCOL`] from
    /// the moved VM to the sender's VM, and the endpoint-moved option.
    pub fn to_bytes(&self) -> [u8; HINT_LEN] {
        let mut out = [0u8; HINT_LEN];
        let repr = VnpRepr {
            network_id: self.network_id,
            token: Token::from_bytes([0; 8]),
            expiry: Expiry(0),
            has_options: true,
        };
        out[..HEADER_LEN].copy_from_slice(&repr.to_bytes());
        let inner_end = HEADER_LEN + ipv4::MIN_HEADER_LEN;
        let mut ip = ipv4::Packet::new_unchecked(&mut out[HEADER_LEN..inner_end]);
        ipv4::Repr {
            src_addr: self.moved_vm,
            dst_addr: self.to_vm,
            protocol: HINT_PROTOCOL,
            payload_len: 0,
            ttl: ipv4::DEFAULT_TTL,
        }
        .emit(&mut ip);
        let option = EndpointMoved {
            generation: self.generation,
        };
        // The array has exactly the option's room.
        let _ = option.emit(&mut out[inner_end..]);
        out
    }

    /// Recognises a hint among received datagrams. Cheap for everything else: two byte
    /// compares. Pure.
    pub fn parse(datagram: &[u8]) -> Option<MovedHint> {
        let proto_at = HEADER_LEN + 9;
        if datagram.len() <= proto_at || datagram[proto_at] != HINT_PROTOCOL {
            return None;
        }
        let header = VnpHeader::new_checked(&datagram[..HEADER_LEN]).ok()?;
        if !header.has_options() {
            return None;
        }
        let ip = ipv4::Packet::new_checked(&datagram[HEADER_LEN..]).ok()?;
        if ip.header_len() != ipv4::MIN_HEADER_LEN || ip.total_len() != ipv4::MIN_HEADER_LEN {
            return None;
        }
        let options = &datagram[HEADER_LEN + ipv4::MIN_HEADER_LEN..];
        let mut generation = None;
        for o in OptionsIter::new(options) {
            match o.ok()? {
                VnpOption::EndpointMoved(m) if generation.is_none() => {
                    generation = Some(m.generation)
                }
                _ => {}
            }
        }
        Some(MovedHint {
            network_id: header.network_id(),
            moved_vm: ip.src_addr(),
            to_vm: ip.dst_addr(),
            generation: generation?,
        })
    }
}

/// What a receiver does with a hint. Pure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HintAction {
    /// Ask the registry about `moved_vm` again (keep sending with the current token until the
    /// answer comes).
    Recheck(Ipv4Addr),
    /// Not for this port, or not from where this port sends the VM's traffic (forged, late,
    /// or the move is already known).
    Ignore,
    /// A genuine-looking hint within the rate limit's interval.
    RateLimited,
}

/// Decides on a hint that came from `from` to the port serving `vm_ip` in `network_id`;
/// `endpoint_of` is where the port currently sends `moved_vm`'s traffic.
pub fn decide(
    hint: &MovedHint,
    from: SocketAddrV4,
    vm_ip: Ipv4Addr,
    network_id: u32,
    endpoint_of: impl FnOnce(Ipv4Addr) -> Option<SocketAddrV4>,
    gate: &mut RateGate<Ipv4Addr>,
    now: Instant,
) -> HintAction {
    if hint.to_vm != vm_ip || hint.network_id != network_id {
        return HintAction::Ignore;
    }
    if endpoint_of(hint.moved_vm) != Some(from) {
        return HintAction::Ignore;
    }
    if gate.admit(hint.moved_vm, now) {
        HintAction::Recheck(hint.moved_vm)
    } else {
        HintAction::RateLimited
    }
}

impl PortCore {
    /// An endpoint-moved hint arrived from `from` (`moved_hint`): at most a rate-limited
    /// registry lookup for the moved VM; the current token stays in use meanwhile.
    pub(crate) fn on_moved_hint(&self, hint: &MovedHint, from: SocketAddrV4) {
        let action = {
            let mut gate = self.moved_hints.lock().unwrap_or_else(|e| e.into_inner());
            decide(
                hint,
                from,
                self.net.vm_ip,
                self.network_id,
                |vm| self.peers.endpoint_of(vm),
                &mut gate,
                Instant::now(),
            )
        };
        if let HintAction::Recheck(dst) = action {
            self.counters.moved_hint_recheck();
            self.control.recheck_token(&self.vm_id, dst);
        }
    }
}

/// At most one event per key per interval, over a bounded set of keys. Pure (the caller
/// passes the time).
#[derive(Debug)]
pub struct RateGate<K> {
    interval: Duration,
    capacity: usize,
    last: HashMap<K, Instant>,
}

impl<K: Hash + Eq + Copy> RateGate<K> {
    /// A gate letting each key through once per `interval`, remembering at most `capacity`.
    pub fn new(interval: Duration, capacity: usize) -> Self {
        Self {
            interval,
            capacity: capacity.max(1),
            last: HashMap::new(),
        }
    }

    /// Whether `key` may pass at `now` (and records it when it does). When the set is full of
    /// keys still within their interval, new keys wait.
    pub fn admit(&mut self, key: K, now: Instant) -> bool {
        if let Some(at) = self.last.get(&key) {
            if now.saturating_duration_since(*at) < self.interval {
                return false;
            }
        } else if self.last.len() >= self.capacity {
            let interval = self.interval;
            self.last
                .retain(|_, at| now.saturating_duration_since(*at) < interval);
            if self.last.len() >= self.capacity {
                return false;
            }
        }
        self.last.insert(key, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hint() -> MovedHint {
        MovedHint {
            network_id: 7,
            moved_vm: Ipv4Addr::new(10, 0, 0, 2),
            to_vm: Ipv4Addr::new(10, 0, 0, 9),
            generation: 42,
        }
    }

    fn old_endpoint() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 7000)
    }

    #[test]
    fn round_trips_and_is_a_valid_vnp_datagram() {
        let bytes = hint().to_bytes();
        assert_eq!(MovedHint::parse(&bytes), Some(hint()));
        let d = vnp_protocol::wire::VnpDatagram::parse(&bytes).unwrap();
        assert!(d.header.has_options);
    }

    #[test]
    fn other_datagrams_are_not_hints() {
        let good = hint().to_bytes();
        // Not the hint protocol.
        let mut b = good;
        b[HEADER_LEN + 9] = 17;
        assert_eq!(MovedHint::parse(&b), None);
        // No options flag.
        let mut b = good;
        b[1] = 0;
        assert_eq!(MovedHint::parse(&b), None);
        // The inner packet has a payload.
        let mut b = good.to_vec();
        b[HEADER_LEN + 3] = 21;
        assert_eq!(MovedHint::parse(&b), None);
        // Option missing, or cut short.
        assert_eq!(MovedHint::parse(&good[..HINT_LEN - 10]), None);
        assert_eq!(MovedHint::parse(&good[..HINT_LEN - 1]), None);
        assert_eq!(MovedHint::parse(&good[..HEADER_LEN + 5]), None);
        assert_eq!(MovedHint::parse(&[]), None);
    }

    #[test]
    fn only_a_hint_from_the_current_endpoint_triggers_a_recheck() {
        let mut gate = RateGate::new(RECHECK_INTERVAL, 16);
        let t0 = Instant::now();
        let me = Ipv4Addr::new(10, 0, 0, 9);
        let at_old = |_| Some(old_endpoint());
        let h = hint();
        // Forged from elsewhere: nothing happens.
        let elsewhere = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 66), 7000);
        assert_eq!(
            decide(&h, elsewhere, me, 7, at_old, &mut gate, t0),
            HintAction::Ignore
        );
        // The move is already known (token for the new endpoint), or the VM unknown here.
        let new = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 7100);
        assert_eq!(
            decide(&h, old_endpoint(), me, 7, |_| Some(new), &mut gate, t0),
            HintAction::Ignore
        );
        assert_eq!(
            decide(&h, old_endpoint(), me, 7, |_| None, &mut gate, t0),
            HintAction::Ignore
        );
        // Not for this port's VM or network.
        let other = Ipv4Addr::new(10, 0, 0, 10);
        assert_eq!(
            decide(&h, old_endpoint(), other, 7, at_old, &mut gate, t0),
            HintAction::Ignore
        );
        assert_eq!(
            decide(&h, old_endpoint(), me, 8, at_old, &mut gate, t0),
            HintAction::Ignore
        );
        // From the endpoint in use: one recheck, then rate-limited.
        assert_eq!(
            decide(&h, old_endpoint(), me, 7, at_old, &mut gate, t0),
            HintAction::Recheck(h.moved_vm)
        );
        let soon = t0 + RECHECK_INTERVAL / 2;
        assert_eq!(
            decide(&h, old_endpoint(), me, 7, at_old, &mut gate, soon),
            HintAction::RateLimited
        );
        let later = t0 + RECHECK_INTERVAL;
        assert_eq!(
            decide(&h, old_endpoint(), me, 7, at_old, &mut gate, later),
            HintAction::Recheck(h.moved_vm)
        );
    }

    #[test]
    fn the_gate_is_bounded() {
        let mut gate = RateGate::new(Duration::from_secs(1), 2);
        let t0 = Instant::now();
        assert!(gate.admit(1u32, t0));
        assert!(gate.admit(2, t0));
        // Full of fresh keys: a new key waits.
        assert!(!gate.admit(3, t0));
        // Once the others are old, it gets in.
        assert!(gate.admit(3, t0 + Duration::from_secs(1)));
        assert!(!gate.admit(3, t0 + Duration::from_millis(1500)));
    }
}
