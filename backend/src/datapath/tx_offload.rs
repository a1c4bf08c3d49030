//! TX offloads on the worker: frames whose virtio-net header asks for a checksum to be completed
//! or a TCP/IPv4 super-packet (TSO) to be segmented.
//!
//! The header is validated against the frame's own headers first
//! ([`TxOffload::validate`]; every bad field is a counted drop, the queue keeps serving). The
//! inner IPv4 and transport headers are then taken from a local copy ([`InnerHeaders`]: NAT
//! rewrites them there), the payload stays in guest memory and its checksum is summed where it
//! lies ([`sum_guest`]). A checksum frame is one message `[VNP|IP|L4 (local)] [payload
//! (guest)] [option]`; a TSO frame becomes segments of at most the MTU, each with its own VNP
//! header and inner headers, sent with UDP GSO: one message per up to 64 KB of datagrams, so a
//! 64 KB super-packet takes two messages of the same `sendmmsg`. Without UDP GSO each segment
//! is its own message.

use std::net::Ipv4Addr;

use vnp_protocol::wire::ipv4::protocol;
use vnp_protocol::wire::options::ReturnToken;
use vnp_protocol::wire::virtio_net::{Header, OffloadError, Repr, TxOffload};
use vnp_protocol::wire::{tcp, VnpRepr, HEADER_LEN};

use super::frame::{classify_tx, GuestNet, TxClass, CLASSIFY_PREFIX, ETH_HLEN};
use super::handoff::HandedOff;
use super::nat_hook::{is_outside, OUTSIDE};
use super::offload_batch::sum_guest;
use super::peers::{Enqueued, SendInfo};
use super::tso::{complete_copy, segment_copy, InnerHeaders, TsoPlan, MAX_INNER_HEADERS};
use super::tx::Now;
use super::udp;
use super::worker::PairWorker;
use crate::metrics::counters::DropReason;
use crate::ring::GuestView;

/// Bytes of an offloaded frame read to validate it: Ethernet, the longest IPv4 header and the
/// longest TCP header.
pub const OFFLOAD_PREFIX: usize = ETH_HLEN + MAX_INNER_HEADERS;

/// Messages the offload batch may hold before it is sent mid-batch: bounds its memory when a
/// guest hands over many small-MSS super-packets.
const MAX_OFFLOAD_MSGS: usize = 64;

/// The counted drop reason of each way a header can fail validation.
pub fn drop_reason(error: OffloadError) -> DropReason {
    match error {
        OffloadError::NotNegotiated => DropReason::TxOffloadRequested,
        OffloadError::Flags => DropReason::TxBadVnetFlags,
        OffloadError::GsoType => DropReason::TxBadGsoType,
        OffloadError::Headers => DropReason::TxBadOffloadHeaders,
        OffloadError::CsumStart => DropReason::TxBadCsumStart,
        OffloadError::CsumOffset => DropReason::TxBadCsumOffset,
        OffloadError::GsoSize => DropReason::TxBadGsoSize,
        OffloadError::HdrLen => DropReason::TxBadHdrLen,
    }
}

/// A validated frame's inner headers and what to do with them.
struct Offloaded {
    dst: Ipv4Addr,
    total_len: usize,
    headers: InnerHeaders,
    /// IP protocol (checksum completion) ...
    proto: u8,
    /// ... or segment size (TSO).
    mss: Option<usize>,
}

impl PairWorker {
    /// Handles the frame in `self.tx_chain` whose virtio-net header asks for an offload.
    pub(super) fn tx_offloaded(&mut self, view: GuestView<'_>, frame_len: usize, now: Now) {
        let hdr = self.features.vnet_hdr_len;
        let mut head = [0u8; 12 + OFFLOAD_PREFIX];
        let want = frame_len.min(OFFLOAD_PREFIX);
        if view.read(self.tx_chain.segs(), 0, &mut head[..hdr + want]) != hdr + want {
            self.core.counters.drop_packet(DropReason::TxBadChain);
            return;
        }
        let repr = Repr::parse(&Header::new_unchecked(&head[..hdr]));
        let prefix = &head[hdr..hdr + want];
        let mtu = usize::from(self.core.net.mtu);
        let offload =
            match TxOffload::validate(&repr, self.features.tx_offload, prefix, frame_len, mtu) {
                Ok(o) => o,
                Err(e) => {
                    self.core.counters.drop_packet(drop_reason(e));
                    return;
                }
            };
        // A super-packet is larger than the MTU by design; its segments are not.
        let net = match offload {
            TxOffload::TcpSegments { .. } => GuestNet {
                mtu: u16::MAX,
                ..self.core.net
            },
            _ => self.core.net,
        };
        let class_prefix = &prefix[..want.min(CLASSIFY_PREFIX)];
        match classify_tx(&net, class_prefix, frame_len) {
            TxClass::Drop(reason) => self.core.counters.drop_packet(reason),
            // The bridge's TCP/IP stack takes partial checksums and super-packets as they are
            // (it terminates the connection; nothing is forwarded).
            TxClass::Bridge { total_len } => self.copy_for_bridge(view, total_len),
            TxClass::TooBig => {
                self.core.counters.drop_packet(DropReason::TxOversize);
                self.tx_edge.push(class_prefix.to_vec());
            }
            TxClass::Edge => {
                self.copy_for_edge(view, frame_len);
                // The edge reads complete packets (DHCP is UDP; nothing else validates here).
                if let (Some(frame), TxOffload::Checksum { l4_start, protocol }) =
                    (self.tx_edge.last_mut(), offload)
                {
                    if protocol == protocol::UDP {
                        complete_copy(&mut frame[ETH_HLEN..], l4_start - ETH_HLEN, 8, protocol);
                    }
                }
            }
            TxClass::Ipv4 { dst, total_len } => {
                let Some(frame) = offloaded(offload, prefix, dst, total_len) else {
                    self.core
                        .counters
                        .drop_packet(DropReason::TxBadOffloadHeaders);
                    return;
                };
                self.send_offloaded(view, frame, now);
            }
        }
    }

    /// Adds a validated offloaded frame to the offload batch (or queues complete copies when
    /// there is no token yet).
    fn send_offloaded(&mut self, view: GuestView<'_>, mut frame: Offloaded, now: Now) {
        // Off-network: NAT on the local header copy (the checksums below are computed over
        // the rewritten headers), then to the gateway under the one OUTSIDE grant.
        let mut via = None;
        if is_outside(&self.core.net, frame.dst) {
            let Some(came_in) = self.nat_in_place(frame.headers.bytes_mut(), true) else {
                return;
            };
            via = came_in;
            frame.dst = OUTSIDE;
        }
        let may_carry_option = frame.mss.is_none();
        // A reply on an inbound flow follows the gateway the flow came in through (nat_hook).
        let found = match self.reply_gateway(via, now.unix) {
            Some(info) => Some((info, false)),
            None => self.known_peer(frame.dst, frame.total_len, may_carry_option, now),
        };
        let Some((info, with_return)) = found else {
            self.queue_offloaded(view, &frame, now);
            return;
        };
        // Packets of one TX queue leave in order: what the plain batch holds goes first.
        if !self.tx_batch.is_empty() {
            self.flush_plain();
        }
        let added = match frame.mss {
            None => self.add_checksummed(&frame, info, with_return, now),
            Some(mss) => self.add_segments(&frame, mss, info),
        };
        let counters = &self.core.counters;
        match (added, frame.mss) {
            (false, _) => counters.drop_packet(DropReason::TxBadChain),
            (true, None) => counters.tx_csum_frame(),
            (true, Some(_)) => counters.tx_tso_frame(),
        }
        if self.tx_offload.msgs().len() >= MAX_OFFLOAD_MSGS {
            self.send_handed_off(false);
            self.send_offload_batch();
        }
    }

    /// One message: local VNP and inner headers with the checksum completed, the payload from
    /// guest memory, a return-token option when due. False when the chain did not cover it.
    fn add_checksummed(
        &mut self,
        frame: &Offloaded,
        info: SendInfo,
        with_return: bool,
        now: Now,
    ) -> bool {
        let core = &*self.core;
        let batch = &mut self.tx_offload;
        let mark = batch.mark();
        let mut headers = frame.headers;
        let payload_len = frame.total_len - headers.len();
        batch.open(udp::sockaddr_in(info.endpoint), 0);
        let block = batch.push_block(HEADER_LEN + headers.len());
        let start = batch.iovecs().len();
        let offset = self.features.vnet_hdr_len + ETH_HLEN + headers.len();
        let covered = self
            .tx_chain
            .push_iovecs(offset, payload_len, batch.iovecs());
        batch.guest_added();
        if covered != payload_len {
            batch.rewind(mark);
            return false;
        }
        // SAFETY: the iovecs just appended point into guest memory of the snapshot the pass's
        // `GuestView` keeps alive, each range checked when the chain was collected.
        let sum = unsafe { sum_guest(batch.iovecs_from(start)) };
        headers.complete_checksum(frame.proto, payload_len, sum);
        let mut option = [0u8; ReturnToken::WIRE_LEN];
        let option_len = if with_return {
            core.return_token(info.endpoint, frame.dst, now.unix)
                .emit(&mut option)
                .unwrap_or(0)
        } else {
            0
        };
        if option_len > 0 {
            let tail = batch.push_block(option_len);
            batch.block_mut(tail)[..option_len].copy_from_slice(&option[..option_len]);
        }
        let vnp = vnp_header(core, info, option_len > 0);
        write_block(batch.block_mut(block), &vnp, &headers);
        batch.count_packet(frame.total_len);
        true
    }

    /// The segments of a TSO frame: each `[VNP|IP|TCP (local)] [payload (guest)]`, grouped into
    /// UDP GSO messages of one segment size. False when the chain did not cover the payload.
    fn add_segments(&mut self, frame: &Offloaded, mss: usize, info: SendInfo) -> bool {
        let headers = frame.headers;
        let plan = TsoPlan::new(mss, frame.total_len - headers.len());
        let seg_wire = HEADER_LEN + headers.len() + mss;
        let per_msg = if self.udp_gso {
            TsoPlan::segments_per_message(seg_wire)
        } else {
            1
        };
        let segment_size = if per_msg > 1 { seg_wire as u16 } else { 0 };
        let vnp = vnp_header(&self.core, info, false);
        let name = udp::sockaddr_in(info.endpoint);
        let payload_at = self.features.vnet_hdr_len + ETH_HLEN + headers.len();
        let batch = &mut self.tx_offload;
        let mark = batch.mark();
        let mut seg_headers = headers;
        for i in 0..plan.segments() {
            if i % per_msg == 0 {
                batch.open(name, segment_size);
            }
            let (offset, len) = plan.range(i);
            let block = batch.push_block(HEADER_LEN + headers.len());
            let start = batch.iovecs().len();
            let covered = self
                .tx_chain
                .push_iovecs(payload_at + offset, len, batch.iovecs());
            batch.guest_added();
            if covered != len {
                batch.rewind(mark);
                return false;
            }
            // SAFETY: as in `add_checksummed`: iovecs into the pass's live, checked snapshot.
            let sum = unsafe { sum_guest(batch.iovecs_from(start)) };
            plan.segment_headers(&headers, i, sum, &mut seg_headers);
            write_block(batch.block_mut(block), &vnp, &seg_headers);
            batch.count_packet(seg_headers.len() + len);
        }
        true
    }

    /// No token yet: the frame is copied anyway, so it is completed (checksum) or cut
    /// (segments) in the copy, and each complete packet is queued like any other.
    fn queue_offloaded(&mut self, view: GuestView<'_>, frame: &Offloaded, now: Now) {
        let mut copy = vec![0u8; frame.total_len];
        let at = self.features.vnet_hdr_len + ETH_HLEN;
        if view.read(self.tx_chain.segs(), at, &mut copy) != frame.total_len {
            self.core.counters.drop_packet(DropReason::TxBadChain);
            return;
        }
        let ip_len = frame.headers.ip_len();
        let l4_len = frame.headers.len() - ip_len;
        let packets = match frame.mss {
            None => {
                complete_copy(&mut copy, ip_len, l4_len, frame.proto);
                vec![copy]
            }
            Some(mss) => segment_copy(&copy, ip_len, l4_len, mss),
        };
        for packet in packets {
            let mut slot = Some(packet);
            let core = &*self.core;
            let outcome = core
                .peers
                .enqueue(frame.dst, self.pair, now.unix, now.mono, || {
                    slot.take().unwrap_or_default()
                });
            match (outcome, slot) {
                // A token arrived between the lookup and the enqueue.
                (Enqueued::Ready(info), Some(packet)) => self.send_copied(
                    HandedOff {
                        dst: frame.dst,
                        info,
                        packet,
                        return_token: false,
                    },
                    now.unix,
                ),
                (other, _) => core.on_enqueued(frame.dst, other),
            }
        }
    }

    /// Sends what the plain batch holds now (packets handed off first, as for a whole batch).
    fn flush_plain(&mut self) {
        self.send_handed_off(false);
        self.send_tx_batch();
        self.tx_batch.clear();
    }

    /// One `sendmmsg` for the offload batch; counts what left and what the kernel refused.
    /// A kernel or device that refuses UDP GSO turns it off for this worker (later segments
    /// go one datagram each).
    pub(super) fn send_offload_batch(&mut self) {
        if self.tx_offload.is_empty() {
            return;
        }
        let socket = &self.core.sockets[self.pair % self.core.sockets.len()];
        let mut gso_refused = false;
        let mmsgs = self.tx_offload.prepare();
        // SAFETY: every pointer in `mmsgs` points into `self.tx_offload` (addresses, blocks,
        // control messages, iovecs), borrowed for this call, or into guest memory through the
        // iovecs of `self.tx_chain` collections of this pass (see `send_tx_batch`).
        unsafe {
            udp::send_all_with(socket, mmsgs, |_, err| {
                gso_refused |= matches!(
                    err.raw_os_error(),
                    Some(libc::EIO | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOPROTOOPT)
                );
            })
        };
        let counters = &self.core.counters;
        for (i, m) in self.tx_offload.msgs().iter().enumerate() {
            if self.tx_offload.sent(i) {
                counters.tx_many(u64::from(m.packets), m.bytes as u64);
            } else {
                counters.drop_packets(DropReason::TxSendError, u64::from(m.packets));
                if m.segment_size > 0 && gso_refused && self.udp_gso {
                    log::warn!(
                        "vm {}: UDP GSO refused by the kernel; segments go one datagram each",
                        self.core.vm_id
                    );
                    self.udp_gso = false;
                }
            }
        }
        self.tx_offload.clear();
    }
}

/// The inner headers of a validated frame (from `prefix`, its first bytes).
fn offloaded(
    offload: TxOffload,
    prefix: &[u8],
    dst: Ipv4Addr,
    total_len: usize,
) -> Option<Offloaded> {
    let (l4_start, payload_start, proto, mss) = match offload {
        TxOffload::None => return None,
        TxOffload::Checksum { l4_start, protocol } => {
            let l4_len = if protocol == protocol::TCP {
                tcp::Packet::new_checked(prefix.get(l4_start..)?)
                    .ok()?
                    .header_len()
            } else {
                8
            };
            (l4_start, l4_start + l4_len, protocol, None)
        }
        TxOffload::TcpSegments {
            l4_start,
            payload_start,
            mss,
            ..
        } => (l4_start, payload_start, protocol::TCP, Some(mss)),
    };
    let ip_len = l4_start - ETH_HLEN;
    let headers = InnerHeaders::copy(&prefix[ETH_HLEN..], ip_len, payload_start - l4_start)?;
    Some(Offloaded {
        dst,
        total_len,
        headers,
        proto,
        mss,
    })
}

fn vnp_header(core: &super::port::PortCore, info: SendInfo, has_options: bool) -> [u8; HEADER_LEN] {
    VnpRepr {
        network_id: core.network_id,
        token: info.token,
        expiry: info.expiry,
        has_options,
    }
    .to_bytes()
}

fn write_block(block: &mut [u8], vnp: &[u8; HEADER_LEN], headers: &InnerHeaders) {
    block[..HEADER_LEN].copy_from_slice(vnp);
    block[HEADER_LEN..HEADER_LEN + headers.len()].copy_from_slice(headers.bytes());
}
