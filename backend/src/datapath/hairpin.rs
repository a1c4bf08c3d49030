//! The source side of a live migration: datagrams that still arrive for a VM that migrated
//! away are forwarded ("hairpinned") to its new endpoint, and each straggling sender is told
//! (rate-limited) that the endpoint moved (`docs/protocol.md`, "Live migration").
//!
//! It starts once the registry says the VM's endpoint moved to another host (a watch change,
//! or the manager's periodic check), never on the device stopping: a pause or a cancelled
//! migration stops the device too. The source keeps the VM's secret meanwhile: every straggler
//! runs the ordinary receive checks against it, and the forwarded datagram carries a token the
//! source mints with that secret for (source endpoint -> destination endpoint), so that it
//! passes the destination's checks, which bind the outer host and port.
//!
//! The datagrams are read by a thread of the hairpin's own: after a migration the source's
//! rings are stopped (or the frontend is gone), so no worker reads the VM's sockets.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vnp_protocol::token::{Expiry, TokenFields, TokenMinter};
use vnp_protocol::wire::{VnpRepr, HEADER_LEN};

use super::moved_hint::{self, RateGate};
use super::port::{unix_now, PortCore};
use super::rx_check::{check_datagram_cached, Datagram, TokenCache, MIN_INNER};
use super::rx_gro::{segment_ranges, RecvBatch};
use crate::metrics::counters::DropReason;
use crate::nat::OUTSIDE;

/// Lifetime of the tokens the source mints for forwarded datagrams: a straggler is forwarded
/// at once, so this only has to outlast the trip and the destination's clock skew.
pub const HAIRPIN_TOKEN_TTL_SECS: u32 = 60;
/// Messages read per `recvmmsg`.
const BATCH: usize = 16;
/// How long one wait for the sockets lasts (the stop flag and the lifetime are checked in
/// between).
const POLL_MS: i32 = 100;
/// Each straggling sender is told at most this often that the endpoint moved.
pub const HINT_INTERVAL: Duration = Duration::from_millis(100);
/// Senders the hint rate limit remembers at once.
const HINT_SENDERS: usize = 4096;

/// Where the VM went: its new endpoint and the generation of the registry's endpoint record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HairpinTarget {
    /// The destination host's address and the VM's port there.
    pub to: SocketAddrV4,
    /// Generation of the endpoint record that moved it (carried by the endpoint-moved hint).
    pub generation: u64,
}

/// How long the source forwards. Pure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HairpinLifetime {
    /// Forwarding goes on at least this long after the move was seen (senders whose watch
    /// lags still have their token for the old endpoint).
    pub min: Duration,
    /// ... and then until no straggler arrived for this long ...
    pub idle: Duration,
    /// ... but never longer than this, stragglers or not.
    pub max: Duration,
}

impl Default for HairpinLifetime {
    fn default() -> Self {
        Self {
            min: Duration::from_secs(5),
            idle: Duration::from_secs(2),
            max: Duration::from_secs(120),
        }
    }
}

impl HairpinLifetime {
    /// Whether forwarding ends, `since_start` after it began and `since_last` after the last
    /// straggler (or the start, when none came).
    pub fn ended(&self, since_start: Duration, since_last: Duration) -> bool {
        since_start >= self.max || (since_start >= self.min && since_last >= self.idle)
    }
}

/// What the source puts in front of a straggler's inner packet to forward it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwarding {
    /// The source's endpoint for the VM (the forwarded datagram's outer source).
    pub from: SocketAddrV4,
    /// The VM's new endpoint.
    pub to: SocketAddrV4,
    /// The straggler's inner source as the receive checks saw it (`0.0.0.0` from outside).
    pub src_vm: Ipv4Addr,
    /// The migrated VM's address.
    pub dst_vm: Ipv4Addr,
    /// Its network.
    pub network_id: u32,
}

/// Writes into `out` the datagram that carries `inner` from `f.from` to `f.to`, with the
/// token `T = HMAC(S_vm, from | src_vm | to | dst_vm | network_id | expiry)` minted by
/// `minter` (the VM's own secret) and no options (the straggler's return token named the old
/// endpoint). Pure.
pub fn reencapsulate(
    minter: &TokenMinter,
    f: &Forwarding,
    expiry: Expiry,
    inner: &[u8],
    out: &mut Vec<u8>,
) {
    let fields = TokenFields {
        src_host: *f.from.ip(),
        src_port: f.from.port(),
        src_vm: f.src_vm,
        dst_host: *f.to.ip(),
        dst_port: f.to.port(),
        dst_vm: f.dst_vm,
        network_id: f.network_id,
        expiry,
    };
    let repr = VnpRepr {
        network_id: f.network_id,
        token: minter.mint(&fields),
        expiry,
        has_options: false,
    };
    out.clear();
    out.extend_from_slice(&repr.to_bytes());
    out.extend_from_slice(inner);
}

/// A running hairpin; stopped (thread joined) on drop.
#[derive(Debug)]
pub struct Hairpin {
    target: HairpinTarget,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Hairpin {
    /// Starts forwarding what arrives on `core`'s sockets to `target`.
    pub(crate) fn start(
        core: Arc<PortCore>,
        target: HairpinTarget,
        lifetime: HairpinLifetime,
    ) -> std::io::Result<Hairpin> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("vnpd-hairpin-{}", super::port::short(&core.vm_id)))
            .spawn(move || Forwarder::new(core, target).run(&flag, lifetime))?;
        Ok(Hairpin {
            target,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it forwards to.
    pub fn target(&self) -> HairpinTarget {
        self.target
    }

    /// Its lifetime ended (or it failed): nothing is forwarded any more.
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for Hairpin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The hairpin thread's state.
struct Forwarder {
    core: Arc<PortCore>,
    target: HairpinTarget,
    batch: RecvBatch,
    tokens: TokenCache,
    hints: RateGate<SocketAddrV4>,
    out: Vec<u8>,
}

impl Forwarder {
    fn new(core: Arc<PortCore>, target: HairpinTarget) -> Self {
        Self {
            core,
            target,
            batch: RecvBatch::new(BATCH),
            tokens: TokenCache::new(),
            hints: RateGate::new(HINT_INTERVAL, HINT_SENDERS),
            out: Vec::with_capacity(2048),
        }
    }

    fn run(mut self, stop: &AtomicBool, lifetime: HairpinLifetime) {
        let vm = self.core.vm_id.clone();
        log::info!(
            "vm {vm}: migrated to {}: forwarding stragglers",
            self.target.to
        );
        let started = Instant::now();
        let mut last = started;
        let mut forwarded = 0u64;
        while !stop.load(Ordering::Acquire) {
            let now = Instant::now();
            if lifetime.ended(now - started, now - last) {
                break;
            }
            if !wait_readable(&self.core.sockets, POLL_MS) {
                continue;
            }
            let n = self.drain_sockets();
            if n > 0 {
                if forwarded == 0 {
                    log::info!(
                        "vm {vm}: first {n} stragglers forwarded {} ms after the move was seen",
                        started.elapsed().as_millis()
                    );
                }
                forwarded += n;
                last = Instant::now();
            }
        }
        log::info!(
            "vm {vm}: stopped forwarding to {} after {} ms ({forwarded} datagrams)",
            self.target.to,
            started.elapsed().as_millis()
        );
    }

    /// Reads every socket empty; returns how many datagrams went on.
    fn drain_sockets(&mut self) -> u64 {
        let core = Arc::clone(&self.core);
        let mut forwarded = 0;
        for socket in &core.sockets {
            loop {
                let got = match self.batch.receive(socket, BATCH) {
                    Ok(n) => n,
                    Err(e) => {
                        log::warn!("vm {}: hairpin recvmmsg: {e}", core.vm_id);
                        0
                    }
                };
                forwarded += self.forward_batch(socket);
                if got < BATCH {
                    break;
                }
            }
        }
        forwarded
    }

    /// Checks and forwards the datagrams of the last receive.
    fn forward_batch(&mut self, socket: &UdpSocket) -> u64 {
        let Forwarder {
            core,
            target,
            batch,
            tokens,
            hints,
            out,
        } = self;
        tokens.clear();
        let now = unix_now();
        let expiry = Expiry(now.saturating_add(HAIRPIN_TOKEN_TTL_SECS));
        let mut forwarded = 0;
        for i in 0..batch.len() {
            let m = batch.message(i);
            let Some(src) = m.src.filter(|_| !m.truncated && !m.data.is_empty()) else {
                core.counters.drop_packet(DropReason::RxMalformed);
                continue;
            };
            for r in segment_ranges(m.data.len(), m.gso_size) {
                let (inner, src_vm) = match forward_one(core, tokens, &m.data[r], src, now) {
                    Ok(ok) => ok,
                    Err(reason) => {
                        core.counters.drop_packet(reason);
                        continue;
                    }
                };
                let f = Forwarding {
                    from: core.local,
                    to: target.to,
                    src_vm,
                    dst_vm: core.net.vm_ip,
                    network_id: core.network_id,
                };
                reencapsulate(&core.minter, &f, expiry, inner, out);
                match socket.send_to(out, target.to) {
                    Ok(_) => {
                        core.counters.hairpin_forwarded();
                        forwarded += 1;
                    }
                    Err(_) => core.counters.drop_packet(DropReason::TxSendError),
                }
                tell_sender(core, target, hints, socket, src, src_vm);
            }
        }
        forwarded
    }
}

/// Sends the endpoint-moved hint to a straggler's sender, at most every [`HINT_INTERVAL`].
/// Senders outside the network (gateways) follow the watch.
fn tell_sender(
    core: &PortCore,
    target: &HairpinTarget,
    hints: &mut RateGate<SocketAddrV4>,
    socket: &UdpSocket,
    sender: SocketAddrV4,
    sender_vm: Ipv4Addr,
) {
    if sender_vm == OUTSIDE || !hints.admit(sender, Instant::now()) {
        return;
    }
    let hint = moved_hint::MovedHint {
        network_id: core.network_id,
        moved_vm: core.net.vm_ip,
        to_vm: sender_vm,
        generation: target.generation,
    };
    if socket.send_to(&hint.to_bytes(), sender).is_ok() {
        core.counters.moved_hint_sent();
    }
}

/// The receive checks of one straggler against the VM's secret; on success its inner packet
/// and inner source (as the token covered it).
fn forward_one<'a>(
    core: &PortCore,
    tokens: &mut TokenCache,
    datagram: &'a [u8],
    src: SocketAddrV4,
    now: u32,
) -> Result<(&'a [u8], Ipv4Addr), DropReason> {
    let Some((header, rest)) = datagram.split_first_chunk::<HEADER_LEN>() else {
        return Err(DropReason::RxTruncated);
    };
    let d = Datagram {
        header,
        len: datagram.len(),
        inner_prefix: &rest[..rest.len().min(MIN_INNER)],
        src,
        prefix_len: core.net.prefix_len,
    };
    let acc = check_datagram_cached(&core.rx_ctx, &core.minter, tokens, &d, now)?;
    Ok((&rest[..acc.inner_len], acc.src_vm))
}

/// Waits up to `timeout_ms` for any of `sockets` to have data.
fn wait_readable(sockets: &[UdpSocket], timeout_ms: i32) -> bool {
    let mut fds: Vec<libc::pollfd> = sockets
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `fds` is a live, exclusively borrowed array of `fds.len()` pollfd structs whose
    // descriptors stay open (the sockets are borrowed) for the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    n > 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::rx_check::{check_datagram, ExpiryPolicy, RxContext};
    use vnp_protocol::token::VmSecret;

    const NOW: u32 = 1_800_000_000;

    fn ep(host: u8, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, host), port)
    }

    fn inner() -> Vec<u8> {
        let mut p = vec![0u8; 28];
        let mut ip = vnp_protocol::wire::ipv4::Packet::new_unchecked(&mut p[..]);
        vnp_protocol::wire::ipv4::Repr {
            src_addr: Ipv4Addr::new(10, 0, 0, 9),
            dst_addr: Ipv4Addr::new(10, 0, 0, 2),
            protocol: 17,
            payload_len: 8,
            ttl: 64,
        }
        .emit(&mut ip);
        p
    }

    fn forwarding() -> Forwarding {
        Forwarding {
            from: ep(1, 7000),
            to: ep(2, 7100),
            src_vm: Ipv4Addr::new(10, 0, 0, 9),
            dst_vm: Ipv4Addr::new(10, 0, 0, 2),
            network_id: 7,
        }
    }

    /// The destination's receive checks, with the VM's secret and its new endpoint.
    fn destination_accepts(
        secret: &VmSecret,
        local: SocketAddrV4,
        out: &[u8],
        from: SocketAddrV4,
    ) -> bool {
        let ctx = RxContext {
            vm_ip: Ipv4Addr::new(10, 0, 0, 2),
            network_id: 7,
            local,
            expiry: ExpiryPolicy::default(),
        };
        let header: &[u8; HEADER_LEN] = out[..HEADER_LEN].try_into().unwrap();
        let minter = TokenMinter::new(secret);
        check_datagram(
            &ctx,
            &minter,
            header,
            out.len(),
            &out[HEADER_LEN..],
            from,
            NOW,
        )
        .is_ok()
    }

    #[test]
    fn a_forwarded_datagram_passes_the_destinations_checks_and_only_those() {
        let secret = VmSecret::from_bytes([0x42; 32]);
        let minter = TokenMinter::new(&secret);
        let f = forwarding();
        let mut out = Vec::new();
        reencapsulate(
            &minter,
            &f,
            Expiry(NOW + HAIRPIN_TOKEN_TTL_SECS),
            &inner(),
            &mut out,
        );
        assert_eq!(out.len(), HEADER_LEN + inner().len());
        assert_eq!(&out[HEADER_LEN..], &inner()[..]);
        assert!(destination_accepts(&secret, f.to, &out, f.from));
        // Bound to the source's endpoint, the destination's endpoint and the secret.
        assert!(!destination_accepts(&secret, f.to, &out, ep(1, 7001)));
        assert!(!destination_accepts(&secret, f.to, &out, ep(3, 7000)));
        assert!(!destination_accepts(&secret, ep(2, 7101), &out, f.from));
        let other = VmSecret::from_bytes([0x43; 32]);
        assert!(!destination_accepts(&other, f.to, &out, f.from));
    }

    #[test]
    fn forwarded_datagrams_carry_no_options_and_a_short_expiry() {
        let minter = TokenMinter::new(&VmSecret::from_bytes([1; 32]));
        let mut out = vec![0xff; 100];
        let expiry = Expiry(NOW + HAIRPIN_TOKEN_TTL_SECS);
        reencapsulate(&minter, &forwarding(), expiry, &inner(), &mut out);
        let h = vnp_protocol::wire::VnpHeader::new_checked(&out[..HEADER_LEN]).unwrap();
        assert!(!h.has_options());
        assert_eq!(h.expiry(), expiry);
        assert_eq!(h.network_id(), 7);
    }

    #[test]
    fn lifetime_lasts_while_stragglers_come_and_is_bounded() {
        let l = HairpinLifetime {
            min: Duration::from_secs(5),
            idle: Duration::from_secs(2),
            max: Duration::from_secs(60),
        };
        let s = Duration::from_secs;
        // Never before the minimum, however quiet.
        assert!(!l.ended(s(1), s(1)));
        assert!(!l.ended(s(4), s(4)));
        // After it, once quiet for `idle`.
        assert!(l.ended(s(5), s(5)));
        assert!(!l.ended(s(30), s(1)));
        assert!(l.ended(s(30), s(2)));
        // Stragglers without end: bounded all the same.
        assert!(l.ended(s(60), Duration::ZERO));
    }
}
