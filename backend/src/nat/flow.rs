//! What a NAT flow is: its key, its protocol, its state and how long it lives idle. Pure.
//!
//! Idle timeouts (seconds without a packet in either direction before the mapped port is
//! freed), and why:
//!
//! | state | timeout | why |
//! |---|---|---|
//! | TCP handshake (SYN seen, no SYN+ACK back yet) | 30 s | Cloud NAT's "transitory" default; a SYN that gets no answer in 30 s (Linux retries at 1, 3, 7, 15, 31 s) is a dead destination or a scan, and its port is worth more to the next flow |
//! | TCP established | 7440 s | RFC 5382 REQ-5: at least 2 h 4 min, so the default 2 h TCP keepalive of an idle connection refreshes the mapping before it expires |
//! | TCP one side closed (FIN seen in one direction) | 240 s | RFC 5382's transitory minimum (4 min): a half-closed connection may still carry data the other way |
//! | TCP closed (FIN both ways, or RST) | 30 s | room for the last ACK and a retransmitted FIN; the guest's own TIME_WAIT needs no mapping |
//! | UDP | 30 s | issue #9 and Cloud NAT's default; most UDP is DNS (one exchange), and long-lived UDP apps send keepalives; with 1024 ports per VM a short timeout matters more than RFC 4787's 2 min |
//! | ICMP echo | 10 s | one ping per second keeps it; a finished ping frees its id quickly |
//!
//! A packet in either direction refreshes a flow (RFC 4787 REQ-6 wants outbound refresh; inbound
//! refresh keeps server-push UDP flows alive, and only the flow's own remote can cause it because
//! replies must match the flow's remote address and port).

use std::net::Ipv4Addr;

use vnp_protocol::wire::ipv4::protocol;
use vnp_protocol::wire::tcp::flags;

/// TCP, handshake not answered yet.
pub const TCP_HANDSHAKE_SECS: u64 = 30;
/// TCP established (RFC 5382 REQ-5).
pub const TCP_ESTABLISHED_SECS: u64 = 7440;

/// Where a NAT clock starts (seconds), instead of 0: a flow that arrives in a live migration
/// with less time left than its timeout gets a last-seen time before the destination's clock
/// started, and that time must be representable. Larger than every timeout.
pub const CLOCK_START: u64 = 1 << 20;
/// TCP with a FIN seen in one direction.
pub const TCP_HALF_CLOSED_SECS: u64 = 240;
/// TCP with FINs both ways or a RST.
pub const TCP_CLOSED_SECS: u64 = 30;
/// UDP.
pub const UDP_SECS: u64 = 30;
/// ICMP echo.
pub const ICMP_SECS: u64 = 10;

/// The transport protocols NAT maps (each has its own port space).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP ports.
    Tcp,
    /// UDP ports.
    Udp,
    /// ICMP echo identifiers.
    Icmp,
}

impl Proto {
    /// Every protocol, in index order.
    pub const ALL: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::Icmp];

    /// The protocol of IP protocol number `n`, if NAT maps it.
    pub fn from_ip(n: u8) -> Option<Proto> {
        match n {
            protocol::TCP => Some(Proto::Tcp),
            protocol::UDP => Some(Proto::Udp),
            protocol::ICMP => Some(Proto::Icmp),
            _ => None,
        }
    }

    /// Index into per-protocol arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Lower-case name (metrics label, admin view).
    pub const fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        }
    }
}

/// One flow as the guest sees it: protocol, the guest's port (ICMP: echo identifier), the
/// remote address and port (ICMP: 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// Protocol.
    pub proto: Proto,
    /// The guest's port (or echo identifier).
    pub local_port: u16,
    /// The outside address.
    pub remote: Ipv4Addr,
    /// The outside port (0 for ICMP).
    pub remote_port: u16,
}

/// Where a flow stands; decides its idle timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowState {
    /// TCP: SYN seen, no SYN+ACK back yet (for an inbound flow: the reverse).
    TcpHandshake,
    /// TCP: both sides have answered.
    TcpEstablished,
    /// TCP: a FIN in one direction.
    TcpHalfClosed {
        /// The FIN came from the side that opened the flow.
        from_opener: bool,
    },
    /// TCP: FINs both ways, or a RST.
    TcpClosed,
    /// UDP.
    Udp,
    /// ICMP echo.
    Icmp,
}

impl FlowState {
    /// The state of a new flow of `proto`.
    pub fn new(proto: Proto) -> Self {
        match proto {
            Proto::Tcp => FlowState::TcpHandshake,
            Proto::Udp => FlowState::Udp,
            Proto::Icmp => FlowState::Icmp,
        }
    }

    /// Seconds the flow may stay idle in this state.
    pub const fn timeout_secs(self) -> u64 {
        match self {
            FlowState::TcpHandshake => TCP_HANDSHAKE_SECS,
            FlowState::TcpEstablished => TCP_ESTABLISHED_SECS,
            FlowState::TcpHalfClosed { .. } => TCP_HALF_CLOSED_SECS,
            FlowState::TcpClosed => TCP_CLOSED_SECS,
            FlowState::Udp => UDP_SECS,
            FlowState::Icmp => ICMP_SECS,
        }
    }

    /// The state after a TCP segment with `tcp_flags`, sent by the side that opened the flow
    /// (`from_opener`) or by the other.
    pub fn on_tcp(self, tcp_flags: u8, from_opener: bool) -> Self {
        use FlowState::*;
        if tcp_flags & flags::RST != 0 {
            return TcpClosed;
        }
        if tcp_flags & flags::FIN != 0 {
            return match self {
                TcpHalfClosed { from_opener: was } if was != from_opener => TcpClosed,
                TcpClosed => TcpClosed,
                _ => TcpHalfClosed { from_opener },
            };
        }
        match self {
            // The answer to the opener's SYN.
            TcpHandshake if !from_opener && tcp_flags & flags::SYN != 0 => TcpEstablished,
            other => other,
        }
    }

    /// Name for the admin view.
    pub const fn as_str(self) -> &'static str {
        match self {
            FlowState::TcpHandshake => "handshake",
            FlowState::TcpEstablished => "established",
            FlowState::TcpHalfClosed { .. } => "half_closed",
            FlowState::TcpClosed => "closed",
            FlowState::Udp => "udp",
            FlowState::Icmp => "icmp",
        }
    }
}

/// A block of ports `first..=last` (the registry's `PortRange`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortBlock {
    /// First port.
    pub first: u16,
    /// Last port (inclusive).
    pub last: u16,
}

impl PortBlock {
    /// `first..=last`; `None` when `first > last` or the block contains port 0 (never a
    /// source port).
    pub fn new(first: u16, last: u16) -> Option<Self> {
        (first > 0 && first <= last).then_some(Self { first, last })
    }

    /// Whether `port` is in the block.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// Number of ports.
    pub fn len(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    /// Never empty (see [`PortBlock::new`]); here for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_state_follows_handshake_and_close() {
        let s = FlowState::new(Proto::Tcp);
        assert_eq!(s, FlowState::TcpHandshake);
        // The opener's own ACKs do not establish it; the peer's SYN+ACK does.
        assert_eq!(s.on_tcp(flags::ACK, true), FlowState::TcpHandshake);
        let s = s.on_tcp(flags::SYN | flags::ACK, false);
        assert_eq!(s, FlowState::TcpEstablished);
        let s = s.on_tcp(flags::FIN | flags::ACK, true);
        assert_eq!(s, FlowState::TcpHalfClosed { from_opener: true });
        // A repeated FIN from the same side changes nothing; the other side's closes it.
        assert_eq!(
            s.on_tcp(flags::FIN, true),
            FlowState::TcpHalfClosed { from_opener: true }
        );
        assert_eq!(s.on_tcp(flags::FIN, false), FlowState::TcpClosed);
        assert_eq!(
            FlowState::TcpEstablished.on_tcp(flags::RST, false),
            FlowState::TcpClosed
        );
    }

    #[test]
    fn timeouts_are_short_for_transitory_states() {
        assert!(FlowState::TcpHandshake.timeout_secs() < 60);
        assert!(FlowState::TcpClosed.timeout_secs() < 60);
        assert!(FlowState::TcpEstablished.timeout_secs() >= 2 * 3600 + 4 * 60);
        assert_eq!(FlowState::Udp.timeout_secs(), 30);
    }

    #[test]
    fn port_blocks() {
        assert_eq!(PortBlock::new(0, 10), None);
        assert_eq!(PortBlock::new(10, 9), None);
        let b = PortBlock::new(40000, 41023).unwrap();
        assert_eq!(b.len(), 1024);
        assert!(b.contains(40000) && b.contains(41023) && !b.contains(41024));
    }
}
