//! One VM's small user-space network interface (smoltcp, IP medium): the metadata address with
//! a TCP listener pool on port 80 and a UDP socket on port 53. The "device" is two queues: IPv4
//! packets the guest sent to the metadata address, and IPv4 packets for the guest that the
//! bridge wraps in Ethernet and injects into the VM's receive queue.
//!
//! Checksums are computed on what is sent and not verified on what is received: the packets
//! come from guest memory on this host, never from a wire (and a guest with checksum offload
//! hands over partial checksums).

use std::collections::VecDeque;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

use super::METADATA_IP;

/// The metadata server's TCP port.
pub const HTTP_PORT: u16 = 80;
/// The resolver's UDP port.
pub const DNS_PORT: u16 = 53;
/// TCP receive buffer per connection (a request is at most head + body limits).
const TCP_RX: usize = 16 * 1024;
/// TCP send buffer per connection (larger responses are fed in as it drains).
const TCP_TX: usize = 16 * 1024;
/// DNS datagrams buffered each way.
const UDP_PACKETS: usize = 16;
/// Most packets waiting in either direction; beyond that the oldest are dropped (a guest
/// flooding the metadata address cannot grow the queues).
pub const MAX_QUEUED: usize = 256;

/// The two packet queues smoltcp reads from and writes to.
#[derive(Debug)]
pub struct Queues {
    /// From the guest.
    pub from_guest: VecDeque<Vec<u8>>,
    /// To the guest.
    pub to_guest: VecDeque<Vec<u8>>,
    mtu: usize,
}

impl Queues {
    /// Empty queues for a guest MTU.
    pub fn new(mtu: usize) -> Self {
        Self {
            from_guest: VecDeque::new(),
            to_guest: VecDeque::new(),
            mtu,
        }
    }
}

/// A received packet.
#[derive(Debug)]
pub struct RxToken(Vec<u8>);
/// Room for a packet to send.
#[derive(Debug)]
pub struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        if self.0.len() >= MAX_QUEUED {
            self.0.pop_front();
        }
        self.0.push_back(buf);
        r
    }
}

impl Device for Queues {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let packet = self.from_guest.pop_front()?;
        Some((RxToken(packet), TxToken(&mut self.to_guest)))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        Some(TxToken(&mut self.to_guest))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        checksum.udp = Checksum::Tx;
        checksum.icmpv4 = Checksum::Tx;
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps.checksum = checksum;
        caps
    }
}

/// A TCP socket listening on `port`.
fn listener(port: u16) -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; TCP_RX]),
        tcp::SocketBuffer::new(vec![0; TCP_TX]),
    );
    // Responses are written whole: no reason to hold a segment back for an ACK.
    s.set_nagle_enabled(false);
    let _ = s.listen(port);
    s
}

/// The interface, its sockets and its queues.
pub struct NetIf {
    /// smoltcp's interface.
    pub iface: Interface,
    /// The packet queues.
    pub queues: Queues,
    /// The sockets.
    pub sockets: SocketSet<'static>,
    /// The TCP listener pool (one socket per concurrent connection).
    pub tcp: Vec<SocketHandle>,
    /// The port each TCP socket listens on (80, or a bridged service's).
    pub ports: Vec<u16>,
    /// The DNS socket.
    pub udp: SocketHandle,
}

impl std::fmt::Debug for NetIf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetIf")
            .field("tcp_sockets", &self.tcp.len())
            .finish_non_exhaustive()
    }
}

impl NetIf {
    /// An interface at the metadata address with `max_conns` TCP sockets listening on port 80.
    pub fn new(mtu: usize, max_conns: usize, now: Instant) -> Self {
        let mut queues = Queues::new(mtu);
        let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut queues, now);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(METADATA_IP), 32));
        });
        // Medium IP needs only a route, no neighbour: every reply leaves through the one link.
        let _ = iface.routes_mut().add_default_ipv4_route(METADATA_IP);
        let mut sockets = SocketSet::new(Vec::new());
        let tcp = (0..max_conns.max(1))
            .map(|_| sockets.add(listener(HTTP_PORT)))
            .collect();
        let meta = || vec![udp::PacketMetadata::EMPTY; UDP_PACKETS];
        let mut dns = udp::Socket::new(
            udp::PacketBuffer::new(meta(), vec![0; UDP_PACKETS * 512]),
            udp::PacketBuffer::new(meta(), vec![0; UDP_PACKETS * 512]),
        );
        let _ = dns.bind(DNS_PORT);
        let udp = sockets.add(dns);
        Self {
            iface,
            queues,
            sockets,
            ports: vec![HTTP_PORT; max_conns.max(1)],
            tcp,
            udp,
        }
    }

    /// Adds `n` TCP sockets listening on `port`.
    pub fn add_listeners(&mut self, port: u16, n: usize) {
        for _ in 0..n {
            self.tcp.push(self.sockets.add(listener(port)));
            self.ports.push(port);
        }
    }

    /// Runs smoltcp over what is queued.
    pub fn poll(&mut self, now: Instant) {
        self.iface.poll(now, &mut self.queues, &mut self.sockets);
    }

    /// Whether some TCP socket is listening (a new connection would be accepted).
    pub fn has_listener(&self) -> bool {
        self.tcp
            .iter()
            .any(|h| self.sockets.get::<tcp::Socket>(*h).is_listening())
    }
}
