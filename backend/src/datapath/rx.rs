//! RX, VNP/UDP -> guest: the RX half of [`PairWorker`].
//!
//! One round: the pool assigns guest RX buffers to up to `rx_hint` datagrams; one `recvmmsg`
//! with iovecs `[VNP header (local)] [guest buffers, after room for the virtio-net + Ethernet
//! headers]` lands each inner packet straight in the guest's buffer; the receive checks run on
//! *local copies* of the headers (the guest can write its RX buffers at any time); only the
//! datagrams that passed get their virtio-net and Ethernet headers written and are committed
//! to the used ring. Buffers of dropped datagrams stay in the pool for the next datagram.

use std::net::{Ipv4Addr, SocketAddrV4};

use vhost_user_backend::VringT;
use vnp_protocol::wire::options::ReturnToken;
use vnp_protocol::wire::HEADER_LEN;

use super::frame::{ETHERTYPE_IPV4, ETH_HLEN};
use super::port::unix_now;
use super::rx_check::{check_datagram_in_network, parse_options};
use super::udp;
use super::worker::{PairWorker, Side, RX_BATCH};
use crate::device::features::rx_vnet_header;
use crate::metrics::counters::DropReason;
use crate::ring::chain::MAX_RX_SEGS;
use crate::ring::vring::notify;
use crate::ring::{GuestView, Vring};

/// Fewest datagrams a `recvmmsg` is prepared for.
pub(super) const MIN_RX_SLOTS: usize = 4;
/// Longest option trailer we read from a datagram.
const MAX_OPTIONS: usize = 512;

/// A return token carried by an accepted datagram: the sender's VM, the sender's underlay
/// address, the token.
pub(super) type Learned = (Ipv4Addr, SocketAddrV4, ReturnToken);

impl PairWorker {
    /// Handles socket readiness or an RX kick: moves datagrams into the guest while both the
    /// socket has data and the guest has buffers.
    pub(super) fn run_rx(&mut self, view: GuestView<'_>, rx: &Vring) {
        loop {
            if !self.in_service(Side::Rx, rx, view.mem()) {
                // Datagrams stay in the socket buffer until the ring is enabled (or set up
                // again after the guest broke it).
                self.rx_backlog = true;
                return;
            }
            let _ = rx.disable_notification();
            if self.rx_rounds(view, rx) {
                self.rx_backlog = false;
                return;
            }
            // Out of guest buffers with data left: ask the guest to kick when it adds some.
            self.rx_backlog = true;
            if self.is_parked(Side::Rx) {
                // A broken ring always "has work": re-enabling would loop forever.
                return;
            }
            match rx.enable_notification() {
                Ok(true) => continue,
                _ => return,
            }
        }
    }

    /// Receives rounds until the socket is empty (returns true) or the guest runs out of
    /// buffers (returns false).
    fn rx_rounds(&mut self, view: GuestView<'_>, rx: &Vring) -> bool {
        loop {
            let slots = self.assign_rx_buffers(view, rx);
            if slots == 0 {
                return false;
            }
            self.build_rx_batch(view);
            let received = self.receive();
            let now = unix_now();
            for i in 0..received.min(slots) {
                if let Err(reason) = self.accept_datagram(view, i, now) {
                    self.scrub(view, i);
                    self.core.counters.drop_packet(reason);
                }
            }
            self.publish_rx(view, rx);
            for (src_vm, from, rt) in self.rx_learned.drain(..) {
                self.core.learn_return_token(src_vm, from, rt, now);
            }
            // Prepare for twice what arrived: grows fast under load, shrinks when idle.
            self.rx_hint = (received * 2).clamp(MIN_RX_SLOTS, RX_BATCH);
            if received < slots {
                return true;
            }
        }
    }

    /// Assigns guest buffers to up to `rx_hint` datagrams; returns how many got buffers.
    fn assign_rx_buffers(&mut self, view: GuestView<'_>, rx: &Vring) -> usize {
        let frame_bytes = self.inner_offset() + usize::from(self.core.net.mtu);
        let assigned = {
            let mut state = rx.get_mut();
            let queue = state.get_queue_mut();
            let assigned =
                self.pool
                    .assign(queue, view, self.rx_hint, frame_bytes, &mut self.rx_slots);
            if let Some(fault) = assigned.fault {
                self.park(Side::Rx, fault, queue);
            }
            assigned
        };
        self.count_bad_rx_chains(assigned.bad_chains);
        if assigned.bad_chains > 0 {
            notify(rx, view.mem());
        }
        assigned.frames
    }

    /// One message per slot: the VNP header into a local buffer, the rest into the slot's
    /// guest buffers after room for the virtio-net and Ethernet headers.
    fn build_rx_batch(&mut self, view: GuestView<'_>) {
        let skip = self.inner_offset();
        self.rx_batch.clear();
        for slot in &self.rx_slots {
            // SAFETY: sockaddr_in is a plain C struct; all-zero is a valid value (the kernel
            // fills it in).
            self.rx_batch.open(unsafe { std::mem::zeroed() });
            let iovs = self.rx_batch.guest_iovecs();
            let limit = iovs.len() + MAX_RX_SEGS * 4;
            let covered = self.pool.push_iovecs(slot, skip, view, iovs, limit);
            self.rx_batch.close(covered);
        }
    }

    /// One `recvmmsg`; returns how many datagrams arrived.
    fn receive(&mut self) -> usize {
        let socket = &self.core.sockets[self.pair % self.core.sockets.len()];
        let mmsgs = self.rx_batch.prepare();
        // SAFETY: addresses, headers and iovec arrays live in `self.rx_batch`, borrowed for the
        // whole call; the guest iovecs point into buffers the driver gave the device for
        // writing, checked against guest memory when collected, and resolved in the snapshot
        // the pass's `GuestView` holds alive (the pool only uses cached addresses of that same
        // snapshot, which it also keeps alive).
        match unsafe { udp::recv_batch(socket, mmsgs) } {
            Ok(n) => n,
            Err(e) => {
                log::warn!("vm {}: recvmmsg: {e}", self.core.vm_id);
                0
            }
        }
    }

    /// Checks datagram `i`; when it passes, writes its headers and accepts its buffers.
    fn accept_datagram(
        &mut self,
        view: GuestView<'_>,
        i: usize,
        now: u32,
    ) -> Result<(), DropReason> {
        let (len, flags) = self.rx_batch.result(i);
        let msg = *self.rx_batch.msg(i);
        let slot = self.rx_slots[i].clone();
        let off = self.inner_offset();
        self.rx_segs.clear();
        self.pool.segs(&slot, &mut self.rx_segs);
        // The kernel wrote these bytes behind vm-memory's back: log them for migration.
        let written = len.saturating_sub(HEADER_LEN).min(msg.guest_len);
        view.kernel_wrote(&self.rx_segs, off, written);
        if flags & libc::MSG_TRUNC != 0 {
            return Err(DropReason::RxOversize);
        }
        let src = udp::from_sockaddr_in(&msg.name).ok_or(DropReason::RxMalformed)?;
        let (inner_len, learned) = self.check(view, &msg.head, len, src, now)?;
        // From the outside (through a gateway): reverse NAT, or dropped (`nat_hook`).
        self.nat_inbound(view, off, inner_len)?;
        if written > inner_len {
            // The option trailer (a return token) is vnpd's, not part of the frame.
            self.zero_guest_bytes(view, off + inner_len, written - inner_len);
        }
        let frame_len = off + inner_len;
        let spans = self.pool.spans(&slot, frame_len);
        let hdr = self.features.vnet_hdr_len;
        let mut head = [0u8; 12 + ETH_HLEN];
        head[..hdr].copy_from_slice(&rx_vnet_header(spans)[..hdr]);
        head[hdr..hdr + 6].copy_from_slice(&self.core.mac);
        head[hdr + 6..hdr + 12].copy_from_slice(&self.core.router_mac);
        head[hdr + 12..hdr + 14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        view.write(&self.rx_segs, 0, &head[..off]);
        self.pool.accept(&slot, frame_len);
        self.core.counters.rx(inner_len);
        self.rx_learned.extend(learned);
        Ok(())
    }

    /// Zeroes what the kernel wrote into the guest buffers of rejected datagram `i`. Those
    /// bytes (traffic for another VM, a forged datagram's return-token option) must never be
    /// readable by the guest: the buffers stay first in line and may be kept by the guest
    /// (stop, reset) without ever being written again. Only rejected datagrams pay for it.
    fn scrub(&mut self, view: GuestView<'_>, i: usize) {
        let (len, _) = self.rx_batch.result(i);
        let msg = self.rx_batch.msg(i);
        let written = len.saturating_sub(HEADER_LEN).min(msg.guest_len);
        if written == 0 {
            return;
        }
        self.rx_segs.clear();
        self.pool.segs(&self.rx_slots[i], &mut self.rx_segs);
        self.zero_guest_bytes(view, self.inner_offset(), written);
    }

    /// Zeroes `len` bytes at `offset` of the buffers in `self.rx_segs`.
    fn zero_guest_bytes(&self, view: GuestView<'_>, offset: usize, len: usize) {
        const ZEROS: [u8; 2048] = [0; 2048];
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(ZEROS.len());
            if view.write(&self.rx_segs, offset + done, &ZEROS[..n]) != n {
                break;
            }
            done += n;
        }
    }

    /// The receive checks of one datagram (in `self.rx_segs`) on local copies of its headers;
    /// on success the inner length and the return token it carried.
    fn check(
        &self,
        view: GuestView<'_>,
        header: &[u8; HEADER_LEN],
        len: usize,
        src: SocketAddrV4,
        now: u32,
    ) -> Result<(usize, Option<Learned>), DropReason> {
        if len < HEADER_LEN {
            return Err(DropReason::RxTruncated);
        }
        let off = self.inner_offset();
        // Checks run on local copies: the guest can write its RX buffers at any time.
        let mut ip = [0u8; 20];
        let want = (len - HEADER_LEN).min(20);
        let got = view.read(&self.rx_segs, off, &mut ip[..want]);
        let core = &*self.core;
        let acc = check_datagram_in_network(
            &core.rx_ctx,
            core.net.prefix_len,
            &core.minter,
            (header, len, &ip[..got]),
            src,
            now,
        )?;
        if acc.options_len == 0 {
            return Ok((acc.inner_len, None));
        }
        if acc.options_len > MAX_OPTIONS {
            return Err(DropReason::RxMalformed);
        }
        let mut opts = [0u8; MAX_OPTIONS];
        let o = &mut opts[..acc.options_len];
        if view.read(&self.rx_segs, off + acc.inner_len, o) != acc.options_len {
            return Err(DropReason::RxTruncated);
        }
        let learned = parse_options(o)?.map(|t| (acc.src_vm, src, t));
        Ok((acc.inner_len, learned))
    }

    /// Commits the accepted datagrams to the used ring and tells the guest.
    fn publish_rx(&mut self, view: GuestView<'_>, rx: &Vring) {
        if !self.pool.has_accepted() {
            return;
        }
        {
            let mut state = rx.get_mut();
            self.pool.commit(state.get_queue_mut(), view.mem());
        }
        notify(rx, view.mem());
    }
}
