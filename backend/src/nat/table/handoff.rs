//! A VM's NAT flows moving with it on a live migration (`crate::migrate_state`): exported
//! from the source's table as records whose timers are the time they have left, imported
//! into the destination's table on the same mapped ports. The VM keeps its NAT blocks (they
//! are the registry's, not the host's), so the gateway, which finds the VM by port alone,
//! needs nothing: its replies reach the destination once the endpoint moves.

use super::{Flow, NatTable};
use crate::nat::flow::{FlowKey, FlowState};
use std::collections::HashSet;

/// One flow as it moves: its timer as the time it has left, never a clock reading (the two
/// hosts' clocks have nothing in common).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MovedFlow {
    /// The flow as the guest sees it.
    pub key: FlowKey,
    /// Its mapped port; `None`: an inbound (port-forwarded) flow.
    pub mapped: Option<u16>,
    /// Its state (decides its timeout).
    pub state: FlowState,
    /// Seconds until it expires if idle (1..=its state's timeout).
    pub remaining_secs: u32,
}

/// What an import did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImportReport {
    /// Flows taken.
    pub imported: usize,
    /// Flows skipped because this table already has a flow on their key or mapped port (the
    /// destination's own, made before the hand-off arrived).
    pub conflicts: usize,
    /// Mapped flows skipped because their port is in none of the VM's blocks here.
    pub outside_blocks: usize,
}

impl NatTable {
    /// Every live flow as a [`MovedFlow`] (a read: the table is unchanged).
    pub fn export(&self, now: u64) -> Vec<MovedFlow> {
        self.flows(now)
            .into_iter()
            .filter(|v| v.expires_in > 0)
            .map(|v| MovedFlow {
                key: v.key,
                mapped: v.mapped,
                state: v.state,
                remaining_secs: u32::try_from(v.expires_in).unwrap_or(u32::MAX),
            })
            .collect()
    }

    /// No new mapping before `until` (the NAT clock): a migrated VM's flows are on their way,
    /// and a port handed out before they land could be one of theirs. [`NatTable::import`]
    /// ends the hold; so does the clock.
    pub fn hold_new_flows(&mut self, until: u64) {
        self.hold_new_until = until;
    }

    /// Whether new mappings are held back at `now`.
    pub fn holding(&self, now: u64) -> bool {
        now < self.hold_new_until
    }

    /// Takes `flows` (a migrated VM's, from its source) at `now`, each live for the time it
    /// had left (never less), and ends a hold. A flow whose key or mapped port this table
    /// already uses, or whose mapped port is outside the VM's blocks, is skipped (counted).
    pub fn import(&mut self, flows: &[MovedFlow], now: u64) -> ImportReport {
        let mut report = ImportReport::default();
        let mut taken: [HashSet<u16>; 3] = Default::default();
        for m in flows {
            let remaining = u64::from(m.remaining_secs).min(m.state.timeout_secs());
            let flow = Flow {
                key: m.key,
                state: m.state,
                last_seen: now.saturating_sub(m.state.timeout_secs() - remaining),
                // The gateway a flow last came in through is not moved: the destination learns
                // it again from the flow's next inbound packet (until then replies take the
                // VM's assigned gateway).
                via: None,
            };
            let space = m.key.proto.index();
            match m.mapped {
                Some(port) => {
                    if !self.in_blocks(port) {
                        report.outside_blocks += 1;
                        continue;
                    }
                    if self.spaces[space].by_port.contains_key(&port)
                        || self.by_key.contains_key(&m.key)
                    {
                        report.conflicts += 1;
                        continue;
                    }
                    self.spaces[space].by_port.insert(port, flow);
                    self.by_key.insert(m.key, port);
                    taken[space].insert(port);
                }
                None => {
                    if self.inbound.contains_key(&m.key)
                        || self.inbound.len() >= super::MAX_INBOUND_FLOWS
                    {
                        report.conflicts += 1;
                        continue;
                    }
                    self.inbound.insert(m.key, flow);
                }
            }
            report.imported += 1;
        }
        for (space, ports) in self.spaces.iter_mut().zip(&taken) {
            if !ports.is_empty() {
                space.free.retain(|p| !ports.contains(p));
            }
        }
        self.hold_new_until = 0;
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nat::flow::{PortBlock, Proto};
    use crate::nat::table::{Inbound, NatRefusal, Outbound};
    use std::net::Ipv4Addr;
    use vnp_protocol::wire::tcp::flags;

    const REMOTE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

    fn key(proto: Proto, local_port: u16, remote_port: u16) -> FlowKey {
        FlowKey {
            proto,
            local_port,
            remote: REMOTE,
            remote_port,
        }
    }

    fn blocks() -> Vec<PortBlock> {
        vec![PortBlock::new(20000, 20003).unwrap()]
    }

    /// A source table with an established TCP flow, a UDP flow and an inbound flow.
    fn source(now: u64) -> (NatTable, FlowKey, u16) {
        let mut t = NatTable::new(&blocks());
        let tcp = key(Proto::Tcp, 5555, 8000);
        let Ok(Outbound::Mapped(port)) = t.outbound(tcp, flags::SYN, now) else {
            panic!("no mapping")
        };
        t.inbound(Proto::Tcp, port, REMOTE, 8000, flags::SYN | flags::ACK, now)
            .unwrap();
        t.outbound(key(Proto::Udp, 53, 53), 0, now).unwrap();
        assert_eq!(
            t.inbound(Proto::Tcp, 80, REMOTE, 40000, flags::SYN, now),
            Ok(Inbound::Forwarded)
        );
        (t, tcp, port)
    }

    #[test]
    fn flows_move_on_their_ports_with_their_time_left() {
        let (src, tcp, port) = source(100);
        let moved = src.export(110);
        assert_eq!(moved.len(), 3, "{moved:?}");
        let m = moved.iter().find(|m| m.key == tcp).unwrap();
        assert_eq!(m.state, FlowState::TcpEstablished);
        assert_eq!(
            u64::from(m.remaining_secs),
            FlowState::TcpEstablished.timeout_secs() - 10
        );
        assert_eq!(src.export(110), moved, "export is a read");

        // The destination's clock is unrelated (it started at 0 a moment ago).
        let mut dst = NatTable::new(&blocks());
        dst.hold_new_flows(5);
        let report = dst.import(&moved, 3);
        assert_eq!(report.imported, 3);
        assert!(!dst.holding(3), "the import ends the hold");
        // The guest's next segment (no SYN) leaves on the same port; the server's reply
        // finds the guest's port.
        assert_eq!(dst.outbound(tcp, flags::ACK, 4), Ok(Outbound::Mapped(port)));
        assert_eq!(
            dst.inbound(Proto::Tcp, port, REMOTE, 8000, flags::ACK, 4),
            Ok(Inbound::Mapped(5555))
        );
        // A new flow never gets a moved flow's port.
        let other = dst
            .outbound(key(Proto::Tcp, 6666, 8000), flags::SYN, 4)
            .unwrap();
        assert_ne!(other, Outbound::Mapped(port));
        // The inbound flow's replies still leave unchanged.
        assert_eq!(
            dst.outbound(key(Proto::Tcp, 80, 40000), flags::ACK, 4),
            Ok(Outbound::InboundReply)
        );
    }

    #[test]
    fn without_the_import_the_connection_is_lost() {
        let (src, tcp, _) = source(100);
        drop(src);
        let mut dst = NatTable::new(&blocks());
        assert_eq!(dst.outbound(tcp, flags::ACK, 4), Err(NatRefusal::NoFlow));
    }

    #[test]
    fn timers_keep_the_time_left_and_expire_there() {
        let (src, _, _) = source(100);
        let moved = src.export(120);
        let udp = moved.iter().find(|m| m.key.proto == Proto::Udp).unwrap();
        assert_eq!(udp.remaining_secs, 10, "30 s UDP timeout, 20 s idle");
        let mut dst = NatTable::new(&blocks());
        dst.import(&moved, 1000);
        assert!(dst.mapped_port(&udp.key, 1009).is_some());
        assert!(dst.mapped_port(&udp.key, 1010).is_none(), "expired on time");
    }

    #[test]
    fn a_hold_refuses_new_mappings_until_import_or_deadline() {
        let mut dst = NatTable::new(&blocks());
        dst.hold_new_flows(10);
        let k = key(Proto::Udp, 1000, 53);
        assert_eq!(dst.outbound(k, 0, 9), Err(NatRefusal::AwaitingState));
        assert!(matches!(dst.outbound(k, 0, 10), Ok(Outbound::Mapped(_))));
    }

    #[test]
    fn conflicts_and_foreign_ports_are_skipped() {
        let (src, tcp, port) = source(100);
        let mut moved = src.export(100);
        let mut dst = NatTable::new(&blocks());
        // The destination already gave `port` to a flow of its own.
        let mine = key(Proto::Tcp, 7777, 9);
        assert_eq!(
            dst.outbound(mine, flags::SYN, 1),
            Ok(Outbound::Mapped(port))
        );
        moved.push(MovedFlow {
            key: key(Proto::Udp, 1, 1),
            mapped: Some(30000),
            state: FlowState::Udp,
            remaining_secs: 5,
        });
        let r = dst.import(&moved, 2);
        assert_eq!((r.imported, r.conflicts, r.outside_blocks), (2, 1, 1));
        assert_eq!(dst.outbound(tcp, flags::ACK, 3), Err(NatRefusal::NoFlow));
        assert_eq!(
            dst.outbound(mine, flags::ACK, 3),
            Ok(Outbound::Mapped(port))
        );
    }
}
