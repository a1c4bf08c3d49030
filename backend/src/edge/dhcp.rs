//! DHCP (RFC 2131/2132) server for exactly one client: the VM on the other end of the link.
//!
//! The address is not picked from a pool: it is the VM's address from the registry, so the
//! "server" is a function from the client's message to a reply. DISCOVER gets an OFFER, REQUEST
//! an ACK for the VM's address (or a NAK for any other, which sends the client back to
//! DISCOVER), INFORM an ACK with the configuration but no lease. RELEASE and DECLINE need no
//! answer; a REQUEST that names another server is for that server and is ignored.
//!
//! Replies carry: the VM address, subnet mask and broadcast address from the prefix length,
//! router, interface MTU (underlay MTU minus the VNP encapsulation, option 26), hostname (12),
//! lease time with T1/T2, server identifier (the router address) and DNS when configured. They
//! go to the broadcast address when the client asked for it (flags bit) and for NAKs, to
//! `ciaddr` when the client already has its address (renewal, INFORM), and otherwise unicast to
//! the offered address and the client's MAC, as RFC 2131 section 4.1 describes.

use std::net::Ipv4Addr;

use super::wire::{self, Ipv4Udp, Writer, BROADCAST_MAC, ETHERTYPE_IPV4};
use super::{EdgeConfig, EdgeDrop};

/// UDP port DHCP servers listen on.
pub const SERVER_PORT: u16 = 67;
/// UDP port DHCP clients listen on.
pub const CLIENT_PORT: u16 = 68;

/// Fixed BOOTP part: op (1), htype (1), hlen (1), hops (1), xid (4), secs (2), flags (2),
/// ciaddr (4), yiaddr (4), siaddr (4), giaddr (4), chaddr (16), sname (64), file (128).
const BOOTP_FIXED_LEN: usize = 236;
/// The DHCP magic cookie that follows the BOOTP part and starts the options.
const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// Where the options start.
const OPTIONS_AT: usize = BOOTP_FIXED_LEN + MAGIC_COOKIE.len();
/// Old BOOTP relays and some clients drop BOOTP messages shorter than this (RFC 1542 2.1).
const MIN_BOOTP_LEN: usize = 300;
/// BOOTP op codes.
const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
/// BOOTP flags: the client cannot receive unicast before it is configured.
const FLAG_BROADCAST: u16 = 0x8000;

/// Option codes the server reads or writes (RFC 2132).
mod opt {
    pub const PAD: u8 = 0;
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DNS: u8 = 6;
    pub const HOSTNAME: u8 = 12;
    pub const INTERFACE_MTU: u8 = 26;
    pub const BROADCAST: u8 = 28;
    pub const REQUESTED_IP: u8 = 50;
    pub const LEASE_TIME: u8 = 51;
    pub const MESSAGE_TYPE: u8 = 53;
    pub const SERVER_ID: u8 = 54;
    pub const MESSAGE: u8 = 56;
    pub const RENEWAL_TIME: u8 = 58;
    pub const REBINDING_TIME: u8 = 59;
    pub const END: u8 = 255;
}

/// Largest reply [`respond`] writes: headers, BOOTP, every option with a 255-byte hostname.
pub const MAX_REPLY_LEN: usize = wire::ETH_HEADER_LEN
    + wire::IPV4_MIN_HEADER_LEN
    + wire::UDP_HEADER_LEN
    + OPTIONS_AT
    + 3 // message type
    + 6 // server id
    + 3 * 6 // lease, T1, T2
    + 3 * 6 // mask, router, broadcast
    + 4 // MTU
    + 6 // DNS
    + 2 + 255 // hostname
    + 1; // end

/// DHCP message types (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// Client looks for servers.
    Discover = 1,
    /// Server offers an address.
    Offer = 2,
    /// Client requests (or renews) an address.
    Request = 3,
    /// Client found the address in use.
    Decline = 4,
    /// Server confirms.
    Ack = 5,
    /// Server refuses.
    Nak = 6,
    /// Client gives the address back.
    Release = 7,
    /// Client has an address and asks for the other parameters.
    Inform = 8,
}

impl MessageType {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => MessageType::Discover,
            2 => MessageType::Offer,
            3 => MessageType::Request,
            4 => MessageType::Decline,
            5 => MessageType::Ack,
            6 => MessageType::Nak,
            7 => MessageType::Release,
            8 => MessageType::Inform,
            _ => return None,
        })
    }
}

/// What the server needs from a client message, taken from a checked BOOTP/DHCP payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientMessage {
    /// Message type (option 53).
    pub message_type: MessageType,
    /// Transaction id, echoed in the reply.
    pub xid: [u8; 4],
    /// BOOTP flags (bit 15: broadcast).
    pub flags: u16,
    /// Client's current address (renewing/INFORM), else 0.0.0.0.
    pub ciaddr: Ipv4Addr,
    /// Relay agent address, echoed.
    pub giaddr: Ipv4Addr,
    /// Client hardware address (first 6 bytes of chaddr).
    pub chaddr: [u8; 6],
    /// Requested IP address (option 50).
    pub requested_ip: Option<Ipv4Addr>,
    /// Server identifier the client selected (option 54).
    pub server_id: Option<Ipv4Addr>,
}

impl ClientMessage {
    /// Parses a UDP payload as a BOOTREQUEST carrying DHCP options.
    ///
    /// Options are walked to the END option or the end of the payload; an option whose length
    /// runs past the payload makes the whole message malformed. Options of the wrong length for
    /// their type, unknown options and the option-overload area are ignored (the server needs
    /// none of them).
    pub fn parse(bootp: &[u8]) -> Result<Self, EdgeDrop> {
        if bootp.len() < OPTIONS_AT {
            return Err(EdgeDrop::Truncated);
        }
        if bootp[0] != BOOTREQUEST {
            return Err(EdgeDrop::DhcpUnexpectedMessage);
        }
        // Ethernet hardware type and address length: the only link the edge serves.
        if bootp[1] != 1 || bootp[2] != 6 || bootp[BOOTP_FIXED_LEN..OPTIONS_AT] != MAGIC_COOKIE {
            return Err(EdgeDrop::DhcpMalformed);
        }
        let mut message_type = None;
        let mut requested_ip = None;
        let mut server_id = None;
        for option in Options::new(&bootp[OPTIONS_AT..]) {
            let (code, value) = option?;
            match (code, value.len()) {
                (opt::MESSAGE_TYPE, 1) if message_type.is_none() => {
                    message_type = Some(
                        MessageType::from_u8(value[0]).ok_or(EdgeDrop::DhcpUnexpectedMessage)?,
                    );
                }
                (opt::REQUESTED_IP, 4) if requested_ip.is_none() => {
                    requested_ip = Some(wire::ipv4_at(value, 0));
                }
                (opt::SERVER_ID, 4) if server_id.is_none() => {
                    server_id = Some(wire::ipv4_at(value, 0));
                }
                _ => {}
            }
        }
        let mut xid = [0u8; 4];
        xid.copy_from_slice(&bootp[4..8]);
        Ok(ClientMessage {
            message_type: message_type.ok_or(EdgeDrop::DhcpNoMessageType)?,
            xid,
            flags: u16::from_be_bytes([bootp[10], bootp[11]]),
            ciaddr: wire::ipv4_at(bootp, 12),
            giaddr: wire::ipv4_at(bootp, 24),
            chaddr: wire::mac_at(bootp, 28),
            requested_ip,
            server_id,
        })
    }
}

/// Iterator over DHCP options `(code, value)`; yields an error (then stops) when an option's
/// length runs past the buffer.
#[derive(Debug)]
struct Options<'a> {
    bytes: &'a [u8],
    at: usize,
    done: bool,
}

impl<'a> Options<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Options {
            bytes,
            at: 0,
            done: false,
        }
    }
}

impl<'a> Iterator for Options<'a> {
    type Item = Result<(u8, &'a [u8]), EdgeDrop>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let Some(&code) = self.bytes.get(self.at) else {
                self.done = true;
                break;
            };
            match code {
                opt::PAD => self.at += 1,
                opt::END => self.done = true,
                _ => {
                    let value = self
                        .bytes
                        .get(self.at + 1)
                        .map(|len| self.at + 2..self.at + 2 + usize::from(*len))
                        .and_then(|range| self.bytes.get(range));
                    let Some(value) = value else {
                        self.done = true;
                        return Some(Err(EdgeDrop::DhcpMalformed));
                    };
                    self.at += 2 + value.len();
                    return Some(Ok((code, value)));
                }
            }
        }
        None
    }
}

/// What to answer, decided from the message alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Offer,
    /// ACK with a lease (REQUEST) or without (INFORM).
    Ack {
        lease: bool,
    },
    Nak,
    Nothing,
}

/// RFC 2131 section 4.3, for a server whose only address is the VM's.
fn decide(cfg: &EdgeConfig, msg: &ClientMessage) -> Result<Answer, EdgeDrop> {
    Ok(match msg.message_type {
        MessageType::Discover => Answer::Offer,
        MessageType::Request => {
            // A client that selected another server's offer tells us by naming it.
            if msg.server_id.is_some_and(|id| id != cfg.router_ip) {
                return Ok(Answer::Nothing);
            }
            // SELECTING / INIT-REBOOT name the address in option 50; RENEWING/REBINDING put it
            // in ciaddr.
            let wanted = msg
                .requested_ip
                .or((!msg.ciaddr.is_unspecified()).then_some(msg.ciaddr));
            if wanted == Some(cfg.vm_ip) {
                Answer::Ack { lease: true }
            } else {
                Answer::Nak
            }
        }
        MessageType::Inform => Answer::Ack { lease: false },
        MessageType::Decline | MessageType::Release => Answer::Nothing,
        MessageType::Offer | MessageType::Ack | MessageType::Nak => {
            return Err(EdgeDrop::DhcpUnexpectedMessage)
        }
    })
}

/// Answers a DHCP datagram from the guest (already known to go to UDP port 67).
pub fn respond(
    cfg: &EdgeConfig,
    datagram: &Ipv4Udp<'_>,
    out: &mut [u8],
) -> Result<Option<usize>, EdgeDrop> {
    let msg = ClientMessage::parse(datagram.payload)?;
    // The VM's identity comes from the registry: only its own MAC gets its address.
    if msg.chaddr != cfg.vm_mac {
        return Err(EdgeDrop::ForeignSourceMac);
    }
    let answer = decide(cfg, &msg)?;
    let (message_type, yiaddr, ciaddr) = match answer {
        Answer::Nothing => return Ok(None),
        Answer::Offer => (MessageType::Offer, cfg.vm_ip, Ipv4Addr::UNSPECIFIED),
        Answer::Ack { lease: true } => (MessageType::Ack, cfg.vm_ip, msg.ciaddr),
        Answer::Ack { lease: false } => (MessageType::Ack, Ipv4Addr::UNSPECIFIED, msg.ciaddr),
        Answer::Nak => (
            MessageType::Nak,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
        ),
    };

    // RFC 2131 4.1: NAKs are broadcast; a configured client gets unicast to ciaddr; a client
    // that asked for broadcast gets it; otherwise unicast to the new address and chaddr.
    let (dst_mac, dst_ip) = if answer == Answer::Nak
        || (msg.flags & FLAG_BROADCAST != 0 && msg.ciaddr.is_unspecified())
    {
        (BROADCAST_MAC, Ipv4Addr::BROADCAST)
    } else if !msg.ciaddr.is_unspecified() {
        (msg.chaddr, msg.ciaddr)
    } else {
        (msg.chaddr, yiaddr)
    };

    let mut w = Writer::new(out);
    wire::put_ethernet(&mut w, dst_mac, cfg.router_mac, ETHERTYPE_IPV4)?;
    let headers = wire::start_ipv4_udp(&mut w, cfg.router_ip, dst_ip, SERVER_PORT, CLIENT_PORT)?;
    let bootp_at = w.len();
    w.put(&[BOOTREPLY, 1, 6, 0])?;
    w.put(&msg.xid)?;
    w.put(&[0, 0])?; // secs
    w.put(&msg.flags.to_be_bytes())?;
    w.put(&ciaddr.octets())?;
    w.put(&yiaddr.octets())?;
    w.put(&[0; 4])?; // siaddr: no boot server
    w.put(&msg.giaddr.octets())?;
    w.put(&msg.chaddr)?;
    w.zeros(16 - 6 + 64 + 128)?; // rest of chaddr, sname, file
    w.put(&MAGIC_COOKIE)?;
    w.put(&[opt::MESSAGE_TYPE, 1, message_type as u8])?;
    w.put(&[opt::SERVER_ID, 4])?;
    w.put(&cfg.router_ip.octets())?;
    match answer {
        Answer::Nak => {
            let text = b"requested address is not this VM's";
            w.put(&[opt::MESSAGE, text.len() as u8])?;
            w.put(text)?;
        }
        Answer::Offer => put_configuration(&mut w, cfg, true)?,
        Answer::Ack { lease } => put_configuration(&mut w, cfg, lease)?,
        Answer::Nothing => {}
    }
    w.put(&[opt::END])?;
    w.pad_to(bootp_at + MIN_BOOTP_LEN)?;
    wire::finish_ipv4_udp(&mut w, headers)?;
    Ok(Some(w.len()))
}

/// The options that configure the guest (OFFER and ACK).
fn put_configuration(w: &mut Writer<'_>, cfg: &EdgeConfig, lease: bool) -> Result<(), EdgeDrop> {
    if lease {
        let lease_secs = cfg.lease_secs;
        // Infinite leases have no renewal; otherwise the RFC 2131 defaults (50% and 87.5%).
        let (t1, t2) = if lease_secs == u32::MAX {
            (u32::MAX, u32::MAX)
        } else {
            (lease_secs / 2, (u64::from(lease_secs) * 7 / 8) as u32)
        };
        for (code, value) in [
            (opt::LEASE_TIME, lease_secs),
            (opt::RENEWAL_TIME, t1),
            (opt::REBINDING_TIME, t2),
        ] {
            w.put(&[code, 4])?;
            w.put(&value.to_be_bytes())?;
        }
    }
    let mask = cfg.netmask();
    let broadcast = Ipv4Addr::from(u32::from(cfg.vm_ip) | !u32::from(mask));
    for (code, addr) in [
        (opt::SUBNET_MASK, mask),
        (opt::ROUTER, cfg.router_ip),
        (opt::BROADCAST, broadcast),
    ] {
        w.put(&[code, 4])?;
        w.put(&addr.octets())?;
    }
    w.put(&[opt::INTERFACE_MTU, 2])?;
    w.put(&cfg.mtu.to_be_bytes())?;
    if let Some(dns) = cfg.dns {
        w.put(&[opt::DNS, 4])?;
        w.put(&dns.octets())?;
    }
    // An option holds at most 255 bytes; EdgeConfig::validate refuses longer hostnames, the
    // clamp only keeps an unvalidated config from corrupting the reply.
    let hostname = &cfg.hostname.as_bytes()[..cfg.hostname.len().min(255)];
    if !hostname.is_empty() {
        w.put(&[opt::HOSTNAME, hostname.len() as u8])?;
        w.put(hostname)?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::tests::test_config;
    use super::super::{classify, respond as edge_respond, FrameKind, ROUTER_MAC};
    use super::*;
    use crate::edge::wire::EthernetFrame;

    /// Builds a client DHCP frame the way udhcpc does (raw socket, broadcast, from 0.0.0.0).
    pub(crate) fn client_frame(
        mac: [u8; 6],
        message_type: MessageType,
        flags: u16,
        ciaddr: Ipv4Addr,
        extra_options: &[u8],
    ) -> Vec<u8> {
        let mut bootp = vec![0u8; OPTIONS_AT];
        bootp[0] = BOOTREQUEST;
        bootp[1] = 1;
        bootp[2] = 6;
        bootp[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        bootp[10..12].copy_from_slice(&flags.to_be_bytes());
        bootp[12..16].copy_from_slice(&ciaddr.octets());
        bootp[28..34].copy_from_slice(&mac);
        bootp[BOOTP_FIXED_LEN..OPTIONS_AT].copy_from_slice(&MAGIC_COOKIE);
        bootp.extend_from_slice(&[opt::MESSAGE_TYPE, 1, message_type as u8]);
        // Parameter request list, as udhcpc sends it (ignored: the server sends everything).
        bootp.extend_from_slice(&[55, 5, 1, 3, 6, 12, 26]);
        bootp.extend_from_slice(extra_options);
        bootp.push(opt::END);

        let mut buf = vec![0u8; 1024];
        let mut w = Writer::new(&mut buf);
        let (src_ip, dst_ip) = if ciaddr.is_unspecified() {
            (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST)
        } else {
            (ciaddr, Ipv4Addr::new(10, 1, 0, 1))
        };
        wire::put_ethernet(&mut w, BROADCAST_MAC, mac, ETHERTYPE_IPV4).unwrap();
        let h = wire::start_ipv4_udp(&mut w, src_ip, dst_ip, CLIENT_PORT, SERVER_PORT).unwrap();
        w.put(&bootp).unwrap();
        wire::finish_ipv4_udp(&mut w, h).unwrap();
        let len = w.len();
        buf.truncate(len);
        buf
    }

    /// A parsed reply: Ethernet + IPv4/UDP + BOOTP fields + options.
    #[derive(Debug)]
    pub(crate) struct Reply {
        pub dst_mac: [u8; 6],
        pub src_mac: [u8; 6],
        pub src_ip: Ipv4Addr,
        pub dst_ip: Ipv4Addr,
        pub yiaddr: Ipv4Addr,
        pub ciaddr: Ipv4Addr,
        pub xid: [u8; 4],
        pub options: Vec<(u8, Vec<u8>)>,
    }

    impl Reply {
        pub fn option(&self, code: u8) -> Option<&[u8]> {
            self.options
                .iter()
                .find(|(c, _)| *c == code)
                .map(|(_, v)| v.as_slice())
        }
        pub fn message_type(&self) -> u8 {
            self.option(opt::MESSAGE_TYPE).unwrap()[0]
        }
        pub fn addr_option(&self, code: u8) -> Ipv4Addr {
            wire::ipv4_at(self.option(code).unwrap(), 0)
        }
        pub fn u32_option(&self, code: u8) -> u32 {
            let v = self.option(code).unwrap();
            u32::from_be_bytes([v[0], v[1], v[2], v[3]])
        }
    }

    pub(crate) fn parse_reply(frame: &[u8]) -> Reply {
        let eth = EthernetFrame::parse(frame).unwrap();
        let ip = eth.payload();
        assert_eq!(wire::internet_checksum(&[&ip[..20]]), 0, "IPv4 checksum");
        let udp = Ipv4Udp::parse(ip).unwrap();
        assert_eq!((udp.src_port, udp.dst_port), (SERVER_PORT, CLIENT_PORT));
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&udp.src_ip.octets());
        pseudo[4..8].copy_from_slice(&udp.dst_ip.octets());
        pseudo[9] = 17;
        let udp_len = (udp.payload.len() + 8) as u16;
        pseudo[10..12].copy_from_slice(&udp_len.to_be_bytes());
        assert_eq!(
            wire::internet_checksum(&[&pseudo, &ip[20..20 + usize::from(udp_len)]]),
            0,
            "UDP checksum"
        );
        let b = udp.payload;
        assert!(b.len() >= MIN_BOOTP_LEN);
        assert_eq!(b[0], BOOTREPLY);
        assert_eq!(b[BOOTP_FIXED_LEN..OPTIONS_AT], MAGIC_COOKIE);
        let options = Options::new(&b[OPTIONS_AT..])
            .map(|o| o.map(|(c, v)| (c, v.to_vec())))
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        Reply {
            dst_mac: eth.dst(),
            src_mac: eth.src(),
            src_ip: udp.src_ip,
            dst_ip: udp.dst_ip,
            yiaddr: wire::ipv4_at(b, 16),
            ciaddr: wire::ipv4_at(b, 12),
            xid: [b[4], b[5], b[6], b[7]],
            options,
        }
    }

    fn answer(cfg: &EdgeConfig, frame: &[u8]) -> Result<Option<Reply>, EdgeDrop> {
        assert_eq!(classify(frame), FrameKind::Dhcp);
        let mut out = [0u8; MAX_REPLY_LEN];
        Ok(edge_respond(cfg, frame, &mut out)?.map(|len| parse_reply(&out[..len])))
    }

    #[test]
    fn discover_gets_an_offer_with_the_whole_configuration() {
        let cfg = test_config();
        let frame = client_frame(
            cfg.vm_mac,
            MessageType::Discover,
            0,
            Ipv4Addr::UNSPECIFIED,
            &[],
        );
        let reply = answer(&cfg, &frame).unwrap().unwrap();
        assert_eq!(reply.message_type(), MessageType::Offer as u8);
        assert_eq!(reply.xid, [0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(reply.yiaddr, cfg.vm_ip);
        assert_eq!(reply.ciaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!((reply.src_mac, reply.dst_mac), (ROUTER_MAC, cfg.vm_mac));
        assert_eq!(
            (reply.src_ip, reply.dst_ip),
            (cfg.router_ip, cfg.vm_ip),
            "unicast: no broadcast flag"
        );
        assert_eq!(reply.addr_option(opt::SERVER_ID), cfg.router_ip);
        assert_eq!(
            reply.addr_option(opt::SUBNET_MASK),
            Ipv4Addr::new(255, 255, 255, 0)
        );
        assert_eq!(reply.addr_option(opt::ROUTER), cfg.router_ip);
        assert_eq!(
            reply.addr_option(opt::BROADCAST),
            Ipv4Addr::new(10, 1, 0, 255)
        );
        assert_eq!(reply.addr_option(opt::DNS), Ipv4Addr::new(10, 1, 0, 53));
        assert_eq!(
            reply.option(opt::INTERFACE_MTU),
            Some(&1452u16.to_be_bytes()[..])
        );
        assert_eq!(reply.option(opt::HOSTNAME), Some(&b"vm-a"[..]));
        assert_eq!(reply.u32_option(opt::LEASE_TIME), 3600);
        assert_eq!(reply.u32_option(opt::RENEWAL_TIME), 1800);
        assert_eq!(reply.u32_option(opt::REBINDING_TIME), 3150);
    }

    #[test]
    fn broadcast_flag_gets_a_broadcast_reply() {
        let cfg = test_config();
        let frame = client_frame(
            cfg.vm_mac,
            MessageType::Discover,
            FLAG_BROADCAST,
            Ipv4Addr::UNSPECIFIED,
            &[],
        );
        let reply = answer(&cfg, &frame).unwrap().unwrap();
        assert_eq!(
            (reply.dst_mac, reply.dst_ip),
            (BROADCAST_MAC, Ipv4Addr::BROADCAST)
        );
    }

    #[test]
    fn request_for_the_vm_address_is_acked() {
        let cfg = test_config();
        let mut options = vec![opt::REQUESTED_IP, 4];
        options.extend_from_slice(&cfg.vm_ip.octets());
        options.extend_from_slice(&[opt::SERVER_ID, 4]);
        options.extend_from_slice(&cfg.router_ip.octets());
        let frame = client_frame(
            cfg.vm_mac,
            MessageType::Request,
            FLAG_BROADCAST,
            Ipv4Addr::UNSPECIFIED,
            &options,
        );
        let reply = answer(&cfg, &frame).unwrap().unwrap();
        assert_eq!(reply.message_type(), MessageType::Ack as u8);
        assert_eq!(reply.yiaddr, cfg.vm_ip);
        assert_eq!(reply.u32_option(opt::LEASE_TIME), 3600);
        assert_eq!(reply.dst_ip, Ipv4Addr::BROADCAST);
    }

    #[test]
    fn renewal_is_acked_by_unicast_to_ciaddr() {
        let cfg = test_config();
        let frame = client_frame(cfg.vm_mac, MessageType::Request, 0, cfg.vm_ip, &[]);
        let reply = answer(&cfg, &frame).unwrap().unwrap();
        assert_eq!(reply.message_type(), MessageType::Ack as u8);
        assert_eq!((reply.dst_mac, reply.dst_ip), (cfg.vm_mac, cfg.vm_ip));
        assert_eq!((reply.ciaddr, reply.yiaddr), (cfg.vm_ip, cfg.vm_ip));
    }

    #[test]
    fn request_for_another_address_is_nakked_by_broadcast() {
        let cfg = test_config();
        let frame = client_frame(
            cfg.vm_mac,
            MessageType::Request,
            0,
            Ipv4Addr::UNSPECIFIED,
            &[opt::REQUESTED_IP, 4, 10, 1, 0, 99],
        );
        let reply = answer(&cfg, &frame).unwrap().unwrap();
        assert_eq!(reply.message_type(), MessageType::Nak as u8);
        assert_eq!(reply.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(
            (reply.dst_mac, reply.dst_ip),
            (BROADCAST_MAC, Ipv4Addr::BROADCAST)
        );
        assert!(reply.option(opt::LEASE_TIME).is_none());
        // Renewing an address that is not the VM's: NAK too.
        let frame = client_frame(
            cfg.vm_mac,
            MessageType::Request,
            0,
            Ipv4Addr::new(10, 1, 0, 98),
            &[],
        );
        assert_eq!(
            answer(&cfg, &frame).unwrap().unwrap().message_type(),
            MessageType::Nak as u8
        );
        // Neither option 50 nor ciaddr: nothing to ACK.
        let frame = client_frame(
            cfg.vm_mac,
            MessageType::Request,
            0,
            Ipv4Addr::UNSPECIFIED,
            &[],
        );
        assert_eq!(
            answer(&cfg, &frame).unwrap().unwrap().message_type(),
            MessageType::Nak as u8
        );
    }

    #[test]
    fn request_for_another_server_release_and_decline_get_no_answer() {
        let cfg = test_config();
        let mut options = vec![opt::REQUESTED_IP, 4];
        options.extend_from_slice(&cfg.vm_ip.octets());
        options.extend_from_slice(&[opt::SERVER_ID, 4, 10, 1, 0, 2]);
        let frame = client_frame(
            cfg.vm_mac,
            MessageType::Request,
            0,
            Ipv4Addr::UNSPECIFIED,
            &options,
        );
        assert!(answer(&cfg, &frame).unwrap().is_none());
        for kind in [MessageType::Release, MessageType::Decline] {
            let frame = client_frame(cfg.vm_mac, kind, 0, cfg.vm_ip, &[]);
            assert!(answer(&cfg, &frame).unwrap().is_none(), "{kind:?}");
        }
    }

    #[test]
    fn inform_gets_configuration_without_a_lease() {
        let cfg = test_config();
        let frame = client_frame(cfg.vm_mac, MessageType::Inform, 0, cfg.vm_ip, &[]);
        let reply = answer(&cfg, &frame).unwrap().unwrap();
        assert_eq!(reply.message_type(), MessageType::Ack as u8);
        assert_eq!(reply.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(reply.dst_ip, cfg.vm_ip);
        assert!(reply.option(opt::LEASE_TIME).is_none());
        assert_eq!(reply.addr_option(opt::ROUTER), cfg.router_ip);
    }

    #[test]
    fn optional_fields_follow_the_config() {
        let mut cfg = test_config();
        cfg.dns = None;
        cfg.hostname = String::new();
        cfg.lease_secs = u32::MAX;
        cfg.prefix_len = 32;
        let frame = client_frame(
            cfg.vm_mac,
            MessageType::Discover,
            0,
            Ipv4Addr::UNSPECIFIED,
            &[],
        );
        let reply = answer(&cfg, &frame).unwrap().unwrap();
        assert!(reply.option(opt::DNS).is_none());
        assert!(reply.option(opt::HOSTNAME).is_none());
        assert_eq!(reply.u32_option(opt::LEASE_TIME), u32::MAX);
        assert_eq!(reply.u32_option(opt::RENEWAL_TIME), u32::MAX);
        assert_eq!(reply.addr_option(opt::SUBNET_MASK), Ipv4Addr::BROADCAST);
        assert_eq!(reply.addr_option(opt::BROADCAST), cfg.vm_ip);
    }

    #[test]
    fn longest_reply_fits_max_reply_len() {
        let mut cfg = test_config();
        cfg.hostname = "h".repeat(255);
        let frame = client_frame(
            cfg.vm_mac,
            MessageType::Discover,
            0,
            Ipv4Addr::UNSPECIFIED,
            &[],
        );
        let mut out = [0u8; MAX_REPLY_LEN];
        let len = edge_respond(&cfg, &frame, &mut out).unwrap().unwrap();
        assert_eq!(len, MAX_REPLY_LEN);
        assert_eq!(
            parse_reply(&out[..len])
                .option(opt::HOSTNAME)
                .unwrap()
                .len(),
            255
        );
        let mut small = [0u8; 300];
        assert_eq!(
            edge_respond(&cfg, &frame, &mut small),
            Err(EdgeDrop::ReplyBufferTooSmall)
        );
    }

    #[test]
    fn malformed_messages_are_refused_with_reasons() {
        let cfg = test_config();
        let mut out = [0u8; MAX_REPLY_LEN];
        let good = client_frame(
            cfg.vm_mac,
            MessageType::Discover,
            0,
            Ipv4Addr::UNSPECIFIED,
            &[],
        );
        let bootp_at = 14 + 20 + 8;
        let check = |frame: &[u8], expected: EdgeDrop| {
            let mut out = [0u8; MAX_REPLY_LEN];
            assert_eq!(edge_respond(&cfg, frame, &mut out), Err(expected));
        };
        // A server message from the guest.
        let mut bad = good.clone();
        bad[bootp_at] = BOOTREPLY;
        check(&bad, EdgeDrop::DhcpUnexpectedMessage);
        // Not Ethernet hardware.
        let mut bad = good.clone();
        bad[bootp_at + 2] = 8;
        check(&bad, EdgeDrop::DhcpMalformed);
        // Plain BOOTP (no cookie).
        let mut bad = good.clone();
        bad[bootp_at + BOOTP_FIXED_LEN] = 0;
        check(&bad, EdgeDrop::DhcpMalformed);
        // No message type: replace it with pads.
        let mut bad = good.clone();
        bad[bootp_at + OPTIONS_AT..bootp_at + OPTIONS_AT + 3].fill(opt::PAD);
        check(&bad, EdgeDrop::DhcpNoMessageType);
        // Unknown message type.
        let mut bad = good.clone();
        bad[bootp_at + OPTIONS_AT + 2] = 42;
        check(&bad, EdgeDrop::DhcpUnexpectedMessage);
        // OFFER from the guest.
        let offer = client_frame(
            cfg.vm_mac,
            MessageType::Offer,
            0,
            Ipv4Addr::UNSPECIFIED,
            &[],
        );
        check(&offer, EdgeDrop::DhcpUnexpectedMessage);
        // Another client's hardware address.
        let mut foreign_mac = cfg.vm_mac;
        foreign_mac[5] ^= 1;
        let foreign = client_frame(
            cfg.vm_mac,
            MessageType::Discover,
            0,
            Ipv4Addr::UNSPECIFIED,
            &[],
        );
        let mut foreign = foreign.clone();
        foreign[bootp_at + 28..bootp_at + 34].copy_from_slice(&foreign_mac);
        check(&foreign, EdgeDrop::ForeignSourceMac);
        // BOOTP part cut short (UDP/IP lengths consistent with the cut).
        let short = client_frame(
            cfg.vm_mac,
            MessageType::Discover,
            0,
            Ipv4Addr::UNSPECIFIED,
            &[],
        );
        let mut short = short[..bootp_at + 100].to_vec();
        let ip_len = (short.len() - 14) as u16;
        short[16..18].copy_from_slice(&ip_len.to_be_bytes());
        short[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
        check(&short, EdgeDrop::Truncated);
        assert!(edge_respond(&cfg, &good, &mut out).is_ok());
    }

    #[test]
    fn options_overrunning_the_message_are_malformed() {
        // The last option claims more bytes than remain.
        let bytes = [opt::MESSAGE_TYPE, 1, 1, opt::HOSTNAME, 10, b'a', b'b'];
        let all: Vec<_> = Options::new(&bytes).collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0], Ok((opt::MESSAGE_TYPE, &[1u8][..])));
        assert_eq!(all[1], Err(EdgeDrop::DhcpMalformed));
        // A code byte with no length byte.
        assert_eq!(
            Options::new(&[opt::HOSTNAME]).collect::<Vec<_>>(),
            vec![Err(EdgeDrop::DhcpMalformed)]
        );
        // Pads and END: nothing after END is read.
        let bytes = [opt::PAD, opt::PAD, opt::END, opt::HOSTNAME, 200];
        assert!(Options::new(&bytes).next().is_none());
        // Missing END is fine.
        assert_eq!(Options::new(&[opt::MESSAGE_TYPE, 1, 3]).count(), 1);

        let cfg = test_config();
        let frame = client_frame(
            cfg.vm_mac,
            MessageType::Discover,
            0,
            Ipv4Addr::UNSPECIFIED,
            &[opt::HOSTNAME, 250],
        );
        let mut out = [0u8; MAX_REPLY_LEN];
        assert_eq!(
            edge_respond(&cfg, &frame, &mut out),
            Err(EdgeDrop::DhcpMalformed)
        );
    }
}
