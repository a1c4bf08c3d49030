//! The gateway's local flow table: 5-tuple -> the VM chosen when the flow was first seen.
//!
//! It keeps an established flow on its VM when the pool changes (a member added, or removed by
//! an operator while still healthy), which the Maglev table alone cannot: a table change moves a
//! few per cent of the slots. A flow whose VM became unhealthy is re-chosen from the table. The
//! table is bounded: when it is full and nothing has expired, a new flow is still balanced by
//! the Maglev table (which every gateway shares) but not remembered, and the caller counts it.

use std::collections::HashMap;
use std::sync::Arc;

use crate::{FlowKey, Proto, Table};

/// Idle timeouts in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowTimeouts {
    /// A TCP flow that has not been seen closing.
    pub tcp_ms: u64,
    /// A TCP flow after a FIN or RST: long enough for the closing handshake's last packets.
    pub tcp_closing_ms: u64,
    pub udp_ms: u64,
}

impl Default for FlowTimeouts {
    /// TCP 300 s idle (shorter than Linux conntrack's 5 days, since a flow that outlives it is
    /// re-chosen from the table and usually lands on the same VM), 10 s after close, UDP 30 s.
    fn default() -> Self {
        Self {
            tcp_ms: 300_000,
            tcp_closing_ms: 10_000,
            udp_ms: 30_000,
        }
    }
}

/// How a flow was placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Known flow, its VM still healthy.
    Existing(Arc<str>),
    /// New (or re-chosen) flow, remembered.
    New(Arc<str>),
    /// New flow, balanced by the table but not remembered: the flow table is full.
    Unremembered(Arc<str>),
    /// The pool has no healthy member.
    NoBackend,
}

impl Choice {
    /// The chosen VM, if any.
    pub fn member(&self) -> Option<&str> {
        match self {
            Choice::Existing(m) | Choice::New(m) | Choice::Unremembered(m) => Some(m),
            Choice::NoBackend => None,
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    member: Arc<str>,
    expires_ms: u64,
    closing: bool,
}

/// The flow table of one gateway (all services).
#[derive(Debug)]
pub struct FlowTable {
    flows: HashMap<FlowKey, Entry>,
    capacity: usize,
    timeouts: FlowTimeouts,
}

impl FlowTable {
    pub fn new(capacity: usize, timeouts: FlowTimeouts) -> Self {
        Self {
            flows: HashMap::new(),
            capacity,
            timeouts,
        }
    }

    /// Places a packet of `key` seen at `now_ms`: its remembered VM if that VM is still
    /// `healthy`, else the table's choice. `closing` marks a TCP FIN or RST.
    pub fn choose(
        &mut self,
        key: FlowKey,
        now_ms: u64,
        closing: bool,
        table: &Table,
        healthy: impl Fn(&str) -> bool,
    ) -> Choice {
        if let Some(entry) = self.flows.get_mut(&key) {
            if entry.expires_ms > now_ms && healthy(&entry.member) {
                entry.closing |= closing;
                entry.expires_ms = now_ms + timeout(&self.timeouts, key.proto, entry.closing);
                return Choice::Existing(entry.member.clone());
            }
        }
        let Some(member) = table.lookup(&key) else {
            self.flows.remove(&key);
            return Choice::NoBackend;
        };
        let member: Arc<str> = Arc::from(member);
        if !self.flows.contains_key(&key) && self.flows.len() >= self.capacity {
            self.expire(now_ms);
            if self.flows.len() >= self.capacity {
                return Choice::Unremembered(member);
            }
        }
        let expires_ms = now_ms + timeout(&self.timeouts, key.proto, closing);
        self.flows.insert(
            key,
            Entry {
                member: member.clone(),
                expires_ms,
                closing,
            },
        );
        Choice::New(member)
    }

    /// Drops expired flows; returns how many.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let before = self.flows.len();
        self.flows.retain(|_, e| e.expires_ms > now_ms);
        before - self.flows.len()
    }

    /// Drops every flow on `member` (it left the pool unhealthy): they are re-chosen.
    pub fn forget_member(&mut self, member: &str) -> usize {
        let before = self.flows.len();
        self.flows.retain(|_, e| &*e.member != member);
        before - self.flows.len()
    }

    /// The remembered VM of a flow, expired or not.
    pub fn get(&self, key: &FlowKey) -> Option<&str> {
        self.flows.get(key).map(|e| &*e.member)
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }
}

fn timeout(t: &FlowTimeouts, proto: Proto, closing: bool) -> u64 {
    match (proto, closing) {
        (Proto::Tcp, false) => t.tcp_ms,
        (Proto::Tcp, true) => t.tcp_closing_ms,
        (Proto::Udp, _) => t.udp_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Member;
    use std::net::Ipv4Addr;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            proto: Proto::Tcp,
            client: Ipv4Addr::new(203, 0, 113, 7),
            client_port: port,
            service: Ipv4Addr::new(203, 0, 113, 10),
            service_port: 443,
        }
    }

    fn table(ids: &[&str]) -> Table {
        let m: Vec<Member> = ids.iter().map(|id| Member::new(*id, 1)).collect();
        Table::build(&m, 251).unwrap()
    }

    #[test]
    fn established_flows_stay_when_a_member_is_added() {
        let small = table(&["a", "b"]);
        let big = table(&["a", "b", "c", "d", "e"]);
        let mut ft = FlowTable::new(10_000, FlowTimeouts::default());
        let first: Vec<String> = (0..500)
            .map(|p| ft.choose(key(p), 0, false, &small, |_| true))
            .map(|c| c.member().unwrap().to_string())
            .collect();
        let mut moved_without_table = 0;
        for p in 0..500u16 {
            let c = ft.choose(key(p), 1_000, false, &big, |_| true);
            assert_eq!(c, Choice::Existing(Arc::from(first[p as usize].as_str())));
            if big.lookup(&key(p)) != Some(first[p as usize].as_str()) {
                moved_without_table += 1;
            }
        }
        // Without the flow table, more than half of these flows would have moved.
        assert!(moved_without_table > 250, "{moved_without_table}");
    }

    #[test]
    fn a_flow_on_an_unhealthy_member_is_rechosen() {
        let t = table(&["a", "b", "c"]);
        let mut ft = FlowTable::new(100, FlowTimeouts::default());
        let p = (0..100).find(|&p| t.lookup(&key(p)) == Some("b")).unwrap();
        assert_eq!(
            ft.choose(key(p), 0, false, &t, |_| true).member(),
            Some("b")
        );
        let healthy = table(&["a", "c"]);
        let c = ft.choose(key(p), 10, false, &healthy, |m| m != "b");
        assert!(matches!(c, Choice::New(ref m) if &**m != "b"), "{c:?}");
    }

    #[test]
    fn idle_and_closed_flows_expire() {
        let t = table(&["a", "b"]);
        let timeouts = FlowTimeouts::default();
        let mut ft = FlowTable::new(100, timeouts);
        ft.choose(key(1), 0, false, &t, |_| true);
        ft.choose(key(2), 0, false, &t, |_| true);
        ft.choose(key(2), 5, true, &t, |_| true);
        assert_eq!(ft.expire(5 + timeouts.tcp_closing_ms), 1);
        assert_eq!(ft.get(&key(2)), None);
        assert_eq!(ft.expire(timeouts.tcp_ms), 1);
        assert!(ft.is_empty());
    }

    #[test]
    fn a_full_table_still_balances_but_does_not_remember() {
        let t = table(&["a", "b"]);
        let mut ft = FlowTable::new(2, FlowTimeouts::default());
        ft.choose(key(1), 0, false, &t, |_| true);
        ft.choose(key(2), 0, false, &t, |_| true);
        let c = ft.choose(key(3), 1, false, &t, |_| true);
        assert!(matches!(c, Choice::Unremembered(_)));
        assert_eq!(c.member(), t.lookup(&key(3)));
        assert_eq!(ft.len(), 2);
        // Once the old ones expired, there is room again.
        let later = FlowTimeouts::default().tcp_ms + 1;
        assert!(matches!(
            ft.choose(key(3), later, false, &t, |_| true),
            Choice::New(_)
        ));
    }

    #[test]
    fn an_empty_pool_has_no_backend() {
        let t = Table::build(&[], 251).unwrap();
        let mut ft = FlowTable::new(10, FlowTimeouts::default());
        assert_eq!(ft.choose(key(1), 0, false, &t, |_| true), Choice::NoBackend);
        assert!(ft.is_empty());
    }
}
