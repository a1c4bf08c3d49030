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
//!
//! The DHCP message itself is decoded and encoded by the `dhcproto` crate; this module keeps
//! the decision ([`decide`]) and the UDP/IPv4 framing (with the packet layer's views).

use std::net::Ipv4Addr;

use dhcproto::v4::{self, DhcpOption, DhcpOptions, HType, Opcode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use vnp_protocol::wire::ethernet::{self, BROADCAST as BROADCAST_MAC};
use vnp_protocol::wire::ipv4::{self, protocol};
use vnp_protocol::wire::udp;

use super::reply::{ipv4_reply, ReplyHeaders};
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
/// BOOTP op codes (the first byte).
const BOOTREQUEST: u8 = 1;
#[cfg(test)]
const BOOTREPLY: u8 = 2;
/// BOOTP flags: the client cannot receive unicast before it is configured.
const FLAG_BROADCAST: u16 = 0x8000;

/// Option codes the server reads or writes (RFC 2132), by number for the tests and sizes.
/// Numbers outside `dhcproto`'s typed options: PAD and END frame the walk in
/// [`decode_options`]; the others name options in the tests and in [`MAX_REPLY_LEN`].
#[cfg_attr(not(test), allow(dead_code))]
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
    pub const RENEWAL_TIME: u8 = 58;
    pub const REBINDING_TIME: u8 = 59;
    pub const END: u8 = 255;
}

/// Largest reply [`respond`] writes: headers, BOOTP, every option with a 255-byte hostname.
pub const MAX_REPLY_LEN: usize = ethernet::HEADER_LEN
    + ipv4::MIN_HEADER_LEN
    + udp::HEADER_LEN
    + OPTIONS_AT
    + 3 // message type
    + 6 // server id
    + 3 * 6 // lease, T1, T2
    + 3 * 6 // mask, router, broadcast
    + 4 // MTU
    + 6 // DNS
    + 2 + 255 // hostname
    + 1; // end

/// The text of a NAK's message option.
const NAK_TEXT: &str = "requested address is not this VM's";

/// DHCP message types (option 53) the server distinguishes.
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
    fn from_dhcproto(value: v4::MessageType) -> Option<Self> {
        Some(match value {
            v4::MessageType::Discover => MessageType::Discover,
            v4::MessageType::Offer => MessageType::Offer,
            v4::MessageType::Request => MessageType::Request,
            v4::MessageType::Decline => MessageType::Decline,
            v4::MessageType::Ack => MessageType::Ack,
            v4::MessageType::Nak => MessageType::Nak,
            v4::MessageType::Release => MessageType::Release,
            v4::MessageType::Inform => MessageType::Inform,
            _ => return None,
        })
    }

    fn to_dhcproto(self) -> v4::MessageType {
        v4::MessageType::from(self as u8)
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
    /// Parses a UDP payload as a BOOTREQUEST carrying DHCP options (decoded by `dhcproto`).
    ///
    /// A message shorter than the fixed part is truncated; a server message (BOOTREPLY) is
    /// unexpected; a hardware type other than Ethernet, a missing magic cookie or options that
    /// `dhcproto` cannot decode (one running past the payload, say) make it malformed.
    pub fn parse(bootp: &[u8]) -> Result<Self, EdgeDrop> {
        if bootp.len() < OPTIONS_AT {
            return Err(EdgeDrop::Truncated);
        }
        // Checked on the bytes before decoding: dhcproto accepts any op code and does not
        // check the cookie, and a BOOTREPLY must be refused whatever its options hold.
        if bootp[0] != BOOTREQUEST {
            return Err(EdgeDrop::DhcpUnexpectedMessage);
        }
        if bootp[BOOTP_FIXED_LEN..OPTIONS_AT] != MAGIC_COOKIE {
            return Err(EdgeDrop::DhcpMalformed);
        }
        // The fixed part only: the options are walked by `decode_options`, which decodes just
        // the ones the server reads.
        let msg = v4::Message::decode(&mut Decoder::new(&bootp[..OPTIONS_AT]))
            .map_err(|_| EdgeDrop::DhcpMalformed)?;
        // Ethernet hardware type and address length: the only link the edge serves.
        if msg.htype() != HType::Eth || msg.hlen() != 6 {
            return Err(EdgeDrop::DhcpMalformed);
        }
        let options = decode_options(&bootp[OPTIONS_AT..])?;
        let message_type = options
            .iter()
            .find_map(|o| match o {
                DhcpOption::MessageType(t) => Some(*t),
                _ => None,
            })
            .ok_or(EdgeDrop::DhcpNoMessageType)?;
        let message_type =
            MessageType::from_dhcproto(message_type).ok_or(EdgeDrop::DhcpUnexpectedMessage)?;
        let mut chaddr = [0u8; 6];
        chaddr.copy_from_slice(&msg.chaddr()[..6]);
        Ok(ClientMessage {
            message_type,
            xid: msg.xid().to_be_bytes(),
            flags: msg.flags().into(),
            ciaddr: msg.ciaddr(),
            giaddr: msg.giaddr(),
            chaddr,
            requested_ip: options.iter().find_map(|o| match o {
                DhcpOption::RequestedIpAddress(ip) => Some(*ip),
                _ => None,
            }),
            server_id: options.iter().find_map(|o| match o {
                DhcpOption::ServerIdentifier(ip) => Some(*ip),
                _ => None,
            }),
        })
    }
}

/// Decodes the options area up to END (or its end), first occurrence of a code first, keeping
/// only the options the server reads (50, 53, 54), decoded by `dhcproto`.
///
/// `dhcproto`'s own loop stops silently at an option it cannot read; here an option whose
/// length runs past the message makes the whole message malformed (it was cut or forged), and a
/// well-framed option whose value `dhcproto` refuses (a wrong length for its type) is skipped.
/// Other options are not decoded at all: the server needs none of them, and `dhcproto` 0.15
/// panics (a `debug_assert`) on some well-framed ones, e.g. rapid commit (80) with a value.
/// The options [`ClientMessage`] takes from a client message.
const READ_OPTIONS: [u8; 3] = [opt::REQUESTED_IP, opt::MESSAGE_TYPE, opt::SERVER_ID];

fn decode_options(mut bytes: &[u8]) -> Result<Vec<DhcpOption>, EdgeDrop> {
    let mut options = Vec::new();
    while let Some(&code) = bytes.first() {
        match code {
            opt::PAD => {
                bytes = &bytes[1..];
                continue;
            }
            opt::END => break,
            _ => {}
        }
        let len = usize::from(*bytes.get(1).ok_or(EdgeDrop::DhcpMalformed)?);
        let raw = bytes.get(..2 + len).ok_or(EdgeDrop::DhcpMalformed)?;
        bytes = &bytes[2 + len..];
        if !READ_OPTIONS.contains(&code) {
            continue;
        }
        if let Ok(option) = DhcpOption::decode(&mut Decoder::new(raw)) {
            let code = v4::OptionCode::from(&option);
            if !options.iter().any(|o| v4::OptionCode::from(o) == code) {
                options.push(option);
            }
        }
    }
    Ok(options)
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

/// The UDP payload of an unfragmented IPv4/UDP packet to the DHCP server port, with its
/// lengths checked against each other: the IPv4 total length fits in the bytes (Ethernet
/// padding after it is ignored), the UDP length fits in the IPv4 payload. Checksums are not
/// verified: a guest using checksum offload legitimately leaves the UDP checksum partial, and a
/// wrong one costs only a wrong DHCP answer to the guest that wrote it.
fn dhcp_payload(packet: &[u8]) -> Result<&[u8], EdgeDrop> {
    let ip = ipv4::Packet::new_checked(packet).map_err(|e| match e {
        vnp_protocol::wire::WireError::Truncated => EdgeDrop::Truncated,
        _ => EdgeDrop::BadLength,
    })?;
    ip.check_len(packet.len())
        .map_err(|_| EdgeDrop::Truncated)?;
    // More-fragments set or a non-zero offset: a fragment, which the edge never reassembles.
    if ip.is_fragment() {
        return Err(EdgeDrop::Fragmented);
    }
    if ip.protocol() != protocol::UDP {
        return Err(EdgeDrop::NotEdgeTraffic);
    }
    let datagram = udp::Packet::new_checked(ip.payload()).map_err(|_| EdgeDrop::Truncated)?;
    datagram
        .check_len(ip.payload().len())
        .map_err(|_| EdgeDrop::BadLength)?;
    if datagram.dst_port() != SERVER_PORT {
        return Err(EdgeDrop::NotEdgeTraffic);
    }
    let start = ip.header_len() + udp::HEADER_LEN;
    Ok(&packet[start..ip.header_len() + datagram.len()])
}

/// Answers a DHCP packet from the guest (`packet`: the Ethernet payload, IPv4 onwards).
pub fn respond(cfg: &EdgeConfig, packet: &[u8], out: &mut [u8]) -> Result<Option<usize>, EdgeDrop> {
    let msg = ClientMessage::parse(dhcp_payload(packet)?)?;
    // The VM's identity comes from the registry: only its own MAC gets its address.
    if msg.chaddr != cfg.vm_mac {
        return Err(EdgeDrop::ForeignSourceMac);
    }
    let answer = decide(cfg, &msg)?;
    if answer == Answer::Nothing {
        return Ok(None);
    }
    // RFC 2131 4.1: NAKs are broadcast; a configured client gets unicast to ciaddr; a client
    // that asked for broadcast gets it; otherwise unicast to the new address and chaddr.
    let (dst_mac, dst_ip) = if answer == Answer::Nak
        || (msg.flags & FLAG_BROADCAST != 0 && msg.ciaddr.is_unspecified())
    {
        (BROADCAST_MAC, Ipv4Addr::BROADCAST)
    } else if !msg.ciaddr.is_unspecified() {
        (msg.chaddr, msg.ciaddr)
    } else {
        (msg.chaddr, offered_address(cfg, answer))
    };
    let bootp = encode_reply(cfg, &msg, answer)?;
    let headers = ReplyHeaders {
        dst_mac,
        dst_ip,
        protocol: protocol::UDP,
        payload_len: udp::HEADER_LEN + bootp.len(),
    };
    let (len, payload) = ipv4_reply(cfg, &headers, out)?;
    let mut datagram = udp::Packet::new_unchecked(payload);
    datagram.set_src_port(SERVER_PORT);
    datagram.set_dst_port(CLIENT_PORT);
    datagram.set_len(headers.payload_len as u16);
    datagram.payload_mut().copy_from_slice(&bootp);
    datagram.fill_checksum(cfg.router_ip, dst_ip);
    Ok(Some(len))
}

/// yiaddr: the VM's address in an OFFER or a leasing ACK, none in a NAK or an INFORM's ACK.
fn offered_address(cfg: &EdgeConfig, answer: Answer) -> Ipv4Addr {
    match answer {
        Answer::Offer | Answer::Ack { lease: true } => cfg.vm_ip,
        Answer::Ack { lease: false } | Answer::Nak | Answer::Nothing => Ipv4Addr::UNSPECIFIED,
    }
}

/// The BOOTREPLY for `answer`, encoded by `dhcproto` and zero-padded to [`MIN_BOOTP_LEN`].
fn encode_reply(
    cfg: &EdgeConfig,
    msg: &ClientMessage,
    answer: Answer,
) -> Result<Vec<u8>, EdgeDrop> {
    let (message_type, ciaddr) = match answer {
        Answer::Offer => (MessageType::Offer, Ipv4Addr::UNSPECIFIED),
        Answer::Ack { .. } => (MessageType::Ack, msg.ciaddr),
        Answer::Nak | Answer::Nothing => (MessageType::Nak, Ipv4Addr::UNSPECIFIED),
    };
    let mut reply = v4::Message::new(
        ciaddr,
        offered_address(cfg, answer),
        Ipv4Addr::UNSPECIFIED, // siaddr: no boot server
        msg.giaddr,
        &msg.chaddr,
    );
    reply
        .set_opcode(Opcode::BootReply)
        .set_xid(u32::from_be_bytes(msg.xid))
        .set_flags(msg.flags.into());
    let opts = reply.opts_mut();
    opts.insert(DhcpOption::MessageType(message_type.to_dhcproto()));
    opts.insert(DhcpOption::ServerIdentifier(cfg.router_ip));
    match answer {
        Answer::Nak => {
            opts.insert(DhcpOption::Message(NAK_TEXT.to_string()));
        }
        Answer::Offer => configuration(opts, cfg, true),
        Answer::Ack { lease } => configuration(opts, cfg, lease),
        Answer::Nothing => {}
    }
    let mut bytes = Vec::with_capacity(MAX_REPLY_LEN);
    reply
        .encode(&mut Encoder::new(&mut bytes))
        .map_err(|_| EdgeDrop::ReplyBufferTooSmall)?;
    if bytes.len() < MIN_BOOTP_LEN {
        bytes.resize(MIN_BOOTP_LEN, 0);
    }
    Ok(bytes)
}

/// The options that configure the guest (OFFER and ACK).
fn configuration(opts: &mut DhcpOptions, cfg: &EdgeConfig, lease: bool) {
    if lease {
        let lease_secs = cfg.lease_secs;
        // Infinite leases have no renewal; otherwise the RFC 2131 defaults (50% and 87.5%).
        let (t1, t2) = if lease_secs == u32::MAX {
            (u32::MAX, u32::MAX)
        } else {
            (lease_secs / 2, (u64::from(lease_secs) * 7 / 8) as u32)
        };
        opts.insert(DhcpOption::AddressLeaseTime(lease_secs));
        opts.insert(DhcpOption::Renewal(t1));
        opts.insert(DhcpOption::Rebinding(t2));
    }
    let mask = cfg.netmask();
    let broadcast = Ipv4Addr::from(u32::from(cfg.vm_ip) | !u32::from(mask));
    opts.insert(DhcpOption::SubnetMask(mask));
    opts.insert(DhcpOption::Router(vec![cfg.router_ip]));
    opts.insert(DhcpOption::BroadcastAddr(broadcast));
    opts.insert(DhcpOption::InterfaceMtu(cfg.mtu));
    if let Some(dns) = cfg.dns {
        opts.insert(DhcpOption::DomainNameServer(vec![dns]));
    }
    // An option holds at most 255 bytes; EdgeConfig::validate refuses longer hostnames, the
    // clamp only keeps an unvalidated config from corrupting the reply.
    let mut end = cfg.hostname.len().min(255);
    while !cfg.hostname.is_char_boundary(end) {
        end -= 1;
    }
    if end > 0 {
        opts.insert(DhcpOption::Hostname(cfg.hostname[..end].to_string()));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::tests::test_config;
    use super::super::{EdgeKind, ROUTER_MAC};
    use super::*;

    /// The edge's answer to a DHCP frame.
    fn edge_respond(
        cfg: &EdgeConfig,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<Option<usize>, EdgeDrop> {
        super::super::respond(cfg, EdgeKind::Dhcp, frame, out)
    }

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

        let (src_ip, dst_ip) = if ciaddr.is_unspecified() {
            (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST)
        } else {
            (ciaddr, Ipv4Addr::new(10, 1, 0, 1))
        };
        let mut buf = ethernet::header(BROADCAST_MAC, mac, ethernet::ethertype::IPV4).to_vec();
        let udp_len = udp::HEADER_LEN + bootp.len();
        buf.resize(ethernet::HEADER_LEN + ipv4::MIN_HEADER_LEN + udp_len, 0);
        let mut ip = ipv4::Packet::new_unchecked(&mut buf[ethernet::HEADER_LEN..]);
        ipv4::Repr {
            src_addr: src_ip,
            dst_addr: dst_ip,
            protocol: protocol::UDP,
            payload_len: udp_len,
            ttl: 64,
        }
        .emit(&mut ip);
        let mut datagram = udp::Packet::new_unchecked(ip.payload_mut());
        datagram.set_src_port(CLIENT_PORT);
        datagram.set_dst_port(SERVER_PORT);
        datagram.set_len(udp_len as u16);
        datagram.payload_mut().copy_from_slice(&bootp);
        datagram.fill_checksum(src_ip, dst_ip);
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
            let v = self.option(code).unwrap();
            Ipv4Addr::new(v[0], v[1], v[2], v[3])
        }
        pub fn u32_option(&self, code: u8) -> u32 {
            let v = self.option(code).unwrap();
            u32::from_be_bytes([v[0], v[1], v[2], v[3]])
        }
    }

    pub(crate) fn parse_reply(frame: &[u8]) -> Reply {
        let eth = ethernet::Frame::new_checked(frame).unwrap();
        let ip = ipv4::Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum(), "IPv4 checksum");
        let udp = udp::Packet::new_checked(ip.payload()).unwrap();
        udp.check_len(ip.payload().len()).unwrap();
        assert_eq!((udp.src_port(), udp.dst_port()), (SERVER_PORT, CLIENT_PORT));
        assert!(
            udp.verify_checksum(ip.src_addr(), ip.dst_addr()),
            "UDP checksum"
        );
        let b = udp.payload();
        assert!(b.len() >= MIN_BOOTP_LEN);
        assert_eq!(b[0], BOOTREPLY);
        assert_eq!(b[BOOTP_FIXED_LEN..OPTIONS_AT], MAGIC_COOKIE);
        Reply {
            dst_mac: eth.dst_addr(),
            src_mac: eth.src_addr(),
            src_ip: ip.src_addr(),
            dst_ip: ip.dst_addr(),
            yiaddr: Ipv4Addr::new(b[16], b[17], b[18], b[19]),
            ciaddr: Ipv4Addr::new(b[12], b[13], b[14], b[15]),
            xid: [b[4], b[5], b[6], b[7]],
            options: raw_options(b),
        }
    }

    /// Every option of a BOOTP message as `(code, value bytes)`, decoded by `dhcproto` and
    /// encoded back one by one.
    fn raw_options(bootp: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let msg = v4::Message::decode(&mut Decoder::new(bootp)).unwrap();
        msg.opts()
            .iter()
            .map(|(code, option)| {
                let mut bytes = Vec::new();
                option.encode(&mut Encoder::new(&mut bytes)).unwrap();
                (u8::from(*code), bytes[2..].to_vec())
            })
            .collect()
    }

    fn answer(cfg: &EdgeConfig, frame: &[u8]) -> Result<Option<Reply>, EdgeDrop> {
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
        let types = |bytes: &[u8]| {
            decode_options(bytes).map(|all| {
                all.iter()
                    .map(|o| u8::from(v4::OptionCode::from(o)))
                    .collect::<Vec<_>>()
            })
        };
        // The last option claims more bytes than remain.
        let bytes = [opt::MESSAGE_TYPE, 1, 1, opt::HOSTNAME, 10, b'a', b'b'];
        assert_eq!(types(&bytes), Err(EdgeDrop::DhcpMalformed));
        // A code byte with no length byte.
        assert_eq!(types(&[opt::HOSTNAME]), Err(EdgeDrop::DhcpMalformed));
        // Pads and END: nothing after END is read.
        let bytes = [opt::PAD, opt::PAD, opt::END, opt::HOSTNAME, 200];
        assert_eq!(types(&bytes), Ok(vec![]));
        // Missing END is fine.
        assert_eq!(
            types(&[opt::MESSAGE_TYPE, 1, 3]),
            Ok(vec![opt::MESSAGE_TYPE])
        );
        // The first of two occurrences counts; a wrong-length value is skipped, and options
        // the server does not read are not decoded (rapid commit with a value would make
        // dhcproto 0.15 panic in a debug build).
        let bytes = [
            opt::MESSAGE_TYPE,
            1,
            3,
            opt::MESSAGE_TYPE,
            1,
            1,
            opt::REQUESTED_IP,
            3,
            1,
            2,
            3,
            80,
            1,
            0,
            opt::HOSTNAME,
            2,
            0xff,
            0xfe,
        ];
        let decoded = decode_options(&bytes).unwrap();
        assert_eq!(
            decoded,
            vec![DhcpOption::MessageType(v4::MessageType::Request)]
        );

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
