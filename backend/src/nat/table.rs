//! [`NatTable`]: one VM's NAT mappings. Pure (the caller passes the time in seconds of a
//! monotonic clock).
//!
//! - Outbound flows (the guest opened them) get a mapped port from the VM's port blocks, one
//!   per protocol port space: a mapped port belongs to exactly one flow (so the reverse lookup
//!   by mapped port is exact, and the gateway needs nothing but the port's block to find the
//!   VM). A reply must come from the flow's own remote address and port.
//! - Inbound flows (port forwarding: the first packet came from the gateway to a port outside
//!   the NAT blocks) are remembered so that the guest's replies leave unchanged.
//! - Free ports are handed out oldest-freed first, so a port is reused as late as possible (a
//!   late packet of the old flow does not land in the new one).
//! - Flows expire by state ([`super::flow`]); [`NatTable::expire`] sweeps, and an allocation
//!   that finds no free port sweeps once before it gives up.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddrV4;

use super::flow::{FlowKey, FlowState, PortBlock, Proto};

/// Most inbound (port-forwarded) flows remembered per VM; beyond it new inbound flows are
/// dropped (counted) until some expire. Bounds what outside clients can make vnpd hold.
pub const MAX_INBOUND_FLOWS: usize = 16384;

/// Why NAT refused a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatRefusal {
    /// No free port in the VM's blocks for a new flow.
    Exhausted,
    /// A TCP segment other than a SYN with no flow (a mapping is only made by a SYN).
    NoFlow,
    /// A reply to a mapped port that has no flow, or not from the flow's remote.
    UnknownMapping,
    /// Too many inbound flows.
    InboundFull,
    /// A new mapping while a migrated VM's flows are still on their way from its source
    /// (`NatTable::hold_new_flows`): a port handed out now could be one of theirs.
    AwaitingState,
}

/// What to do with an outbound packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outbound {
    /// Rewrite the source port (echo identifier) to this one.
    Mapped(u16),
    /// A reply on an inbound (port-forwarded) flow: leaves unchanged.
    InboundReply,
}

/// What to do with an inbound packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// A reply on a mapped flow: rewrite the destination port back to the guest's.
    Mapped(u16),
    /// Traffic of an inbound flow (destination port outside the blocks): delivered unchanged.
    Forwarded,
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    key: FlowKey,
    state: FlowState,
    last_seen: u64,
    /// Inbound flows: the gateway endpoint the latest datagram came in from (its replies go
    /// there, `nat::gateways`); `None` for outbound flows.
    via: Option<SocketAddrV4>,
}

impl Flow {
    fn expired(&self, now: u64) -> bool {
        now.saturating_sub(self.last_seen) >= self.state.timeout_secs()
    }
}

/// One protocol's port space.
#[derive(Debug, Default, Clone)]
struct PortSpace {
    /// Free ports, oldest-freed first.
    free: VecDeque<u16>,
    /// Mapped port -> flow.
    by_port: HashMap<u16, Flow>,
}

/// A mapped flow as the admin view shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowView {
    /// The flow as the guest sees it.
    pub key: FlowKey,
    /// Its mapped port (`None`: an inbound flow, not remapped).
    pub mapped: Option<u16>,
    /// Its state.
    pub state: FlowState,
    /// Seconds until it expires if idle.
    pub expires_in: u64,
}

/// Numbers for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NatStats {
    /// Mapped (outbound) flows per protocol, indexed by [`Proto::index`].
    pub mapped: [usize; 3],
    /// Inbound (port-forwarded) flows.
    pub inbound: usize,
    /// Ports in the VM's blocks (per protocol space).
    pub ports_total: usize,
}

/// One VM's NAT state.
#[derive(Debug, Clone, Default)]
pub struct NatTable {
    blocks: Vec<PortBlock>,
    spaces: [PortSpace; 3],
    by_key: HashMap<FlowKey, u16>,
    inbound: HashMap<FlowKey, Flow>,
    /// No new mapping before this time (live migration: see `handoff`).
    hold_new_until: u64,
}

impl NatTable {
    /// A table for the ports of `blocks`.
    pub fn new(blocks: &[PortBlock]) -> Self {
        let mut t = Self::default();
        t.set_blocks(blocks);
        t
    }

    /// The VM's blocks now (the registry grew or changed them). Ports of new blocks become
    /// free; flows on ports no longer in a block keep them until they expire, and those ports
    /// are not handed out again.
    pub fn set_blocks(&mut self, blocks: &[PortBlock]) {
        let mut blocks = blocks.to_vec();
        blocks.sort();
        blocks.dedup();
        let was = std::mem::replace(&mut self.blocks, blocks);
        for space in &mut self.spaces {
            space
                .free
                .retain(|p| self.blocks.iter().any(|b| b.contains(*p)));
            for (i, b) in self.blocks.iter().enumerate() {
                for port in b.first..=b.last {
                    // Overlapping blocks (never the registry's, but possible input): a port
                    // goes on the free list once, or two flows would get it.
                    let known = was.iter().any(|o| o.contains(port))
                        || self.blocks[..i].iter().any(|o| o.contains(port));
                    if !known && !space.by_port.contains_key(&port) {
                        space.free.push_back(port);
                    }
                }
            }
        }
    }

    /// The VM's blocks.
    pub fn blocks(&self) -> &[PortBlock] {
        &self.blocks
    }

    /// Whether `port` is in one of the VM's blocks.
    pub fn in_blocks(&self, port: u16) -> bool {
        self.blocks.iter().any(|b| b.contains(port))
    }

    /// An outbound packet of flow `key` (TCP: with `tcp_flags`) at `now`.
    pub fn outbound(
        &mut self,
        key: FlowKey,
        tcp_flags: u8,
        now: u64,
    ) -> Result<Outbound, NatRefusal> {
        if let Some(flow) = self.inbound.get_mut(&key) {
            if !flow.expired(now) {
                touch(flow, tcp_flags, false, now);
                return Ok(Outbound::InboundReply);
            }
            self.inbound.remove(&key);
        }
        if let Some(&mapped) = self.by_key.get(&key) {
            let space = &mut self.spaces[key.proto.index()];
            if let Some(flow) = space.by_port.get_mut(&mapped) {
                if !flow.expired(now) {
                    touch(flow, tcp_flags, true, now);
                    return Ok(Outbound::Mapped(mapped));
                }
            }
            self.release(key.proto, mapped);
        }
        if key.proto == Proto::Tcp && tcp_flags & vnp_protocol::wire::tcp::flags::SYN == 0 {
            return Err(NatRefusal::NoFlow);
        }
        if now < self.hold_new_until {
            return Err(NatRefusal::AwaitingState);
        }
        let mapped = match self.take_free(key.proto, now) {
            Some(p) => p,
            None => return Err(NatRefusal::Exhausted),
        };
        let mut flow = Flow {
            key,
            state: FlowState::new(key.proto),
            last_seen: now,
            via: None,
        };
        touch(&mut flow, tcp_flags, true, now);
        self.spaces[key.proto.index()].by_port.insert(mapped, flow);
        self.by_key.insert(key, mapped);
        Ok(Outbound::Mapped(mapped))
    }

    /// An inbound packet of `proto` from `remote:remote_port` to the VM's port `dst_port`
    /// (TCP: with `tcp_flags`) at `now`.
    pub fn inbound(
        &mut self,
        proto: Proto,
        dst_port: u16,
        remote: std::net::Ipv4Addr,
        remote_port: u16,
        tcp_flags: u8,
        now: u64,
    ) -> Result<Inbound, NatRefusal> {
        self.inbound_via(proto, dst_port, (remote, remote_port), tcp_flags, None, now)
    }

    /// [`NatTable::inbound`] for a packet from `remote` (address, port) that came in from the
    /// gateway endpoint `via` (after the datagram passed the receive checks): an inbound flow
    /// remembers it, so its replies leave through that gateway.
    pub fn inbound_via(
        &mut self,
        proto: Proto,
        dst_port: u16,
        (remote, remote_port): (std::net::Ipv4Addr, u16),
        tcp_flags: u8,
        via: Option<SocketAddrV4>,
        now: u64,
    ) -> Result<Inbound, NatRefusal> {
        if self.in_blocks(dst_port) || self.spaces[proto.index()].by_port.contains_key(&dst_port) {
            let flow = self.reply_flow(proto, dst_port, now)?;
            if flow.key.remote != remote || flow.key.remote_port != remote_port {
                return Err(NatRefusal::UnknownMapping);
            }
            touch(flow, tcp_flags, false, now);
            return Ok(Inbound::Mapped(flow.key.local_port));
        }
        let key = FlowKey {
            proto,
            local_port: dst_port,
            remote,
            remote_port,
        };
        if let Some(flow) = self.inbound.get_mut(&key) {
            if !flow.expired(now) {
                touch(flow, tcp_flags, true, now);
                flow.via = via.or(flow.via);
                return Ok(Inbound::Forwarded);
            }
        }
        if self.inbound.len() >= MAX_INBOUND_FLOWS && !self.inbound.contains_key(&key) {
            self.inbound.retain(|_, f| !f.expired(now));
            if self.inbound.len() >= MAX_INBOUND_FLOWS {
                return Err(NatRefusal::InboundFull);
            }
        }
        let mut flow = Flow {
            key,
            state: FlowState::new(proto),
            last_seen: now,
            via,
        };
        touch(&mut flow, tcp_flags, true, now);
        self.inbound.insert(key, flow);
        Ok(Inbound::Forwarded)
    }

    /// The flow whose mapped port is `mapped`, for an ICMP error about it (no refresh, no
    /// state change): the guest's port and the flow's remote.
    pub fn lookup_mapped(&self, proto: Proto, mapped: u16, now: u64) -> Option<FlowKey> {
        let flow = self.spaces[proto.index()].by_port.get(&mapped)?;
        (!flow.expired(now)).then_some(flow.key)
    }

    /// The mapped port of the live outbound flow `key` (as the guest sees it), for an ICMP
    /// error the guest sends about it (no refresh, no state change).
    pub fn mapped_port(&self, key: &FlowKey, now: u64) -> Option<u16> {
        let mapped = *self.by_key.get(key)?;
        let flow = self.spaces[key.proto.index()].by_port.get(&mapped)?;
        (!flow.expired(now)).then_some(mapped)
    }

    /// The gateway endpoint the live inbound flow `key` last came in from, if recorded.
    pub fn inbound_gateway(&self, key: &FlowKey, now: u64) -> Option<SocketAddrV4> {
        self.inbound
            .get(key)
            .filter(|f| !f.expired(now))
            .and_then(|f| f.via)
    }

    /// Whether an inbound (port-forwarded) flow with this key is live.
    pub fn is_inbound_flow(&self, key: &FlowKey, now: u64) -> bool {
        self.inbound.get(key).is_some_and(|f| !f.expired(now))
    }

    /// Frees every expired flow's port.
    pub fn expire(&mut self, now: u64) {
        for proto in Proto::ALL {
            let dead: Vec<u16> = self.spaces[proto.index()]
                .by_port
                .iter()
                .filter(|(_, f)| f.expired(now))
                .map(|(p, _)| *p)
                .collect();
            for port in dead {
                self.release(proto, port);
            }
        }
        self.inbound.retain(|_, f| !f.expired(now));
    }

    /// Numbers for metrics.
    pub fn stats(&self) -> NatStats {
        NatStats {
            mapped: [0, 1, 2].map(|i| self.spaces[i].by_port.len()),
            inbound: self.inbound.len(),
            ports_total: self.blocks.iter().map(PortBlock::len).sum(),
        }
    }

    /// Every live flow, mapped first (by protocol and mapped port), then inbound.
    pub fn flows(&self, now: u64) -> Vec<FlowView> {
        let view = |f: &Flow, mapped| FlowView {
            key: f.key,
            mapped,
            state: f.state,
            expires_in: f
                .state
                .timeout_secs()
                .saturating_sub(now - f.last_seen.min(now)),
        };
        let mut out: Vec<FlowView> = Vec::new();
        for proto in Proto::ALL {
            let mut mapped: Vec<_> = self.spaces[proto.index()]
                .by_port
                .iter()
                .filter(|(_, f)| !f.expired(now))
                .map(|(p, f)| view(f, Some(*p)))
                .collect();
            mapped.sort_by_key(|v| v.mapped);
            out.extend(mapped);
        }
        let mut inbound: Vec<_> = self
            .inbound
            .values()
            .filter(|f| !f.expired(now))
            .map(|f| view(f, None))
            .collect();
        inbound.sort_by_key(|v| v.key);
        out.extend(inbound);
        out
    }

    fn reply_flow(&mut self, proto: Proto, mapped: u16, now: u64) -> Result<&mut Flow, NatRefusal> {
        let expired = match self.spaces[proto.index()].by_port.get(&mapped) {
            None => return Err(NatRefusal::UnknownMapping),
            Some(f) => f.expired(now),
        };
        if expired {
            self.release(proto, mapped);
            return Err(NatRefusal::UnknownMapping);
        }
        self.spaces[proto.index()]
            .by_port
            .get_mut(&mapped)
            .ok_or(NatRefusal::UnknownMapping)
    }

    fn take_free(&mut self, proto: Proto, now: u64) -> Option<u16> {
        if self.spaces[proto.index()].free.is_empty() {
            self.expire(now);
        }
        self.spaces[proto.index()].free.pop_front()
    }

    fn release(&mut self, proto: Proto, port: u16) {
        let space = &mut self.spaces[proto.index()];
        if let Some(flow) = space.by_port.remove(&port) {
            self.by_key.remove(&flow.key);
            if self.blocks.iter().any(|b| b.contains(port)) {
                space.free.push_back(port);
            }
        }
    }
}

/// Refreshes `flow` and moves its TCP state (`from_opener`: the packet came from the side that
/// opened the flow).
fn touch(flow: &mut Flow, tcp_flags: u8, from_opener: bool, now: u64) {
    flow.last_seen = now;
    if flow.key.proto == Proto::Tcp {
        flow.state = flow.state.on_tcp(tcp_flags, from_opener);
    }
}

mod handoff;
pub use handoff::{ImportReport, MovedFlow};

#[cfg(test)]
mod tests;
