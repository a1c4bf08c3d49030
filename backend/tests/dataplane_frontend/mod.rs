//! A small but real vhost-user *frontend* for tests: it plays the VMM and the guest driver.
//!
//! It shares memfd-backed "guest memory" with vnpd over the vhost-user socket (the same protocol
//! messages QEMU sends), lays out split virtqueues in that memory and drives them like a virtio-net
//! driver: TX frames behind a virtio-net header, RX buffers posted and harvested from the used
//! ring. Because it writes the rings itself, it can also hand vnpd broken descriptor chains.
#![allow(dead_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
#[allow(unused_imports)] // used by some of the test crates that include this module
pub use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const QUEUE_SIZE: u16 = 256;
pub const BUF_LEN: u64 = 2048;
pub const VNET_HDR: usize = 12;
pub const MEM_SIZE: usize = 8 << 20;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// Where a descriptor's `next` points.
#[derive(Debug, Clone, Copy)]
pub enum Next {
    /// No successor.
    End,
    /// The descriptor `n` places after this chain's first one.
    Rel(u16),
    /// An absolute descriptor index (possibly invalid).
    Abs(u16),
}

/// One descriptor of a hand-made chain.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
    pub next: Next,
}

struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    bufs: u64,
    avail_idx: u16,
    used_seen: u16,
    next_desc: u16,
}

pub struct TestFrontend {
    fe: Frontend,
    pub mem: GuestMemoryMmap<()>,
    rings: Vec<Ring>,
    kicks: Vec<EventFd>,
    _calls: Vec<EventFd>,
    _file: File,
    pub features: u64,
    /// After harvesting used RX entries, write `used_event` as a Linux driver does when it
    /// re-enables its interrupt (EVENT_IDX): "tell me about the next one". Off: a driver that
    /// missed its interrupt and never looked.
    pub rearm_interrupts: bool,
}

pub fn memfd(size: usize) -> io::Result<File> {
    // SAFETY: memfd_create with a valid NUL-terminated name; the returned fd is checked.
    let fd = unsafe { libc::memfd_create(c"vnp-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, owned file descriptor.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64)?;
    Ok(file)
}

/// Where queue `q`'s descriptor table, avail ring, used ring and buffers live in guest memory
/// (guest-physical addresses; guest memory starts at 0).
pub fn ring_layout(q: usize) -> (u64, u64, u64, u64) {
    let base = 0x1_0000 + q as u64 * 0x1_0000;
    (
        base,
        base + 0x1000,
        base + 0x2000,
        0x10_0000 + q as u64 * 0x8_0000,
    )
}

pub fn connect_retry(path: &Path, queues: u64) -> Frontend {
    let start = Instant::now();
    loop {
        match Frontend::connect(path, queues) {
            Ok(f) => return f,
            Err(e) if start.elapsed() < Duration::from_secs(5) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connect {}: {e}", path.display()),
        }
    }
}

impl TestFrontend {
    /// Connects to vnpd's socket and brings up `pairs` queue pairs (features: VERSION_1, MAC,
    /// MTU, STATUS, MRG_RXBUF, EVENT_IDX, MQ).
    pub fn connect(path: &Path, pairs: u16) -> TestFrontend {
        Self::connect_acking(path, pairs, 0)
    }

    /// [`TestFrontend::connect`], also acking the feature bits `extra` when vnpd offers them
    /// (e.g. the checksum and TSO offloads).
    pub fn connect_acking(path: &Path, pairs: u16, extra: u64) -> TestFrontend {
        let nq = usize::from(pairs) * 2;
        let mut fe = connect_retry(path, nq as u64);
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        let want = (1u64 << 32)
            | (1 << 5)
            | (1 << 3)
            | (1 << 16)
            | (1 << 15)
            | (1 << 29)
            | (1 << 22)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | extra;
        let features = offered & want;
        fe.set_features(features).unwrap();
        let pf = fe.get_protocol_features().unwrap();
        assert!(!pf.contains(VhostUserProtocolFeatures::RARP));
        assert!(!pf.contains(VhostUserProtocolFeatures::MTU));
        fe.set_protocol_features(
            pf & (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::LOG_SHMFD),
        )
        .unwrap();
        assert_eq!(fe.get_queue_num().unwrap(), nq as u64);

        let file = memfd(MEM_SIZE).unwrap();
        let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: host,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        }])
        .unwrap();

        let mut rings = Vec::new();
        let mut kicks = Vec::new();
        let mut calls = Vec::new();
        for q in 0..nq {
            let base = 0x1_0000 + q as u64 * 0x1_0000;
            let ring = Ring {
                desc: base,
                avail: base + 0x1000,
                used: base + 0x2000,
                bufs: 0x10_0000 + q as u64 * 0x8_0000,
                avail_idx: 0,
                used_seen: 0,
                next_desc: 0,
            };
            fe.set_vring_num(q, QUEUE_SIZE).unwrap();
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: QUEUE_SIZE,
                    queue_size: QUEUE_SIZE,
                    flags: 0,
                    desc_table_addr: host + ring.desc,
                    used_ring_addr: host + ring.used,
                    avail_ring_addr: host + ring.avail,
                    log_addr: None,
                },
            )
            .unwrap();
            fe.set_vring_base(q, 0).unwrap();
            let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            fe.set_vring_call(q, &call).unwrap();
            fe.set_vring_kick(q, &kick).unwrap();
            rings.push(ring);
            kicks.push(kick);
            calls.push(call);
        }
        for q in 0..nq {
            fe.set_vring_enable(q, true).unwrap();
        }
        TestFrontend {
            fe,
            mem,
            rings,
            kicks,
            _calls: calls,
            _file: file,
            features,
            rearm_interrupts: true,
        }
    }

    /// Drives rings that another frontend (e.g. a replayed conversation in
    /// `frontend_replay`) has already set up over `fe`'s connection, laid out in `mem` the way
    /// [`TestFrontend::connect`] lays them out ([`ring_layout`]).
    pub fn adopt(
        fe: Frontend,
        mem: GuestMemoryMmap<()>,
        file: File,
        kicks: Vec<EventFd>,
        calls: Vec<EventFd>,
        features: u64,
    ) -> TestFrontend {
        let rings = (0..kicks.len())
            .map(|q| {
                let (desc, avail, used, bufs) = ring_layout(q);
                let read = |addr: u64| {
                    u16::from_le(mem.load(GuestAddress(addr), Ordering::Acquire).unwrap())
                };
                let avail_idx = read(avail + 2);
                Ring {
                    desc,
                    avail,
                    used,
                    bufs,
                    avail_idx,
                    used_seen: read(used + 2),
                    next_desc: avail_idx % QUEUE_SIZE,
                }
            })
            .collect();
        TestFrontend {
            fe,
            mem,
            rings,
            kicks,
            _calls: calls,
            _file: file,
            features,
            rearm_interrupts: true,
        }
    }

    /// Starts dirty-page logging the way QEMU does when a migration begins: SET_LOG_BASE with
    /// a shared log (1 bit per 4 KiB page of guest memory), then SET_FEATURES adding
    /// `VHOST_F_LOG_ALL`. Returns the log's file.
    pub fn start_dirty_log(&mut self) -> File {
        let log = memfd(4096).unwrap();
        self.fe
            .set_log_base(
                0,
                Some(vhost::VhostUserDirtyLogRegion {
                    mmap_size: 4096,
                    mmap_offset: 0,
                    mmap_handle: log.as_raw_fd(),
                }),
            )
            .unwrap();
        self.features |= 1 << 26;
        self.fe.set_features(self.features).unwrap();
        log
    }

    /// The device's config space (mac, status, max pairs, mtu).
    pub fn config(&mut self) -> [u8; 12] {
        let (_, payload) = self
            .fe
            .get_config(0, 12, VhostUserConfigFlags::WRITABLE, &[0u8; 12])
            .unwrap();
        payload[..12].try_into().unwrap()
    }

    fn write_desc(&self, q: usize, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let r = &self.rings[q];
        let at = GuestAddress(r.desc + u64::from(idx % QUEUE_SIZE) * 16);
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, at).unwrap();
    }

    /// Puts `head` in the next avail entry of queue `q` as is (it may be out of range: a
    /// hostile driver), moves `avail->idx` past it and kicks.
    pub fn publish(&mut self, q: usize, head: u16) {
        let r = &mut self.rings[q];
        let slot = GuestAddress(r.avail + 4 + u64::from(r.avail_idx % QUEUE_SIZE) * 2);
        self.mem.write_obj(head.to_le(), slot).unwrap();
        r.avail_idx = r.avail_idx.wrapping_add(1);
        let idx = r.avail_idx;
        let avail = r.avail;
        self.mem
            .store(idx.to_le(), GuestAddress(avail + 2), Ordering::Release)
            .unwrap();
        self.kicks[q].write(1).unwrap();
    }

    /// Moves queue `q`'s `avail->idx` `by` entries ahead without posting anything (a hostile
    /// driver) and kicks.
    pub fn jump_avail_idx(&mut self, q: usize, by: u16) {
        let r = &mut self.rings[q];
        r.avail_idx = r.avail_idx.wrapping_add(by);
        let (idx, avail) = (r.avail_idx, r.avail);
        self.mem
            .store(idx.to_le(), GuestAddress(avail + 2), Ordering::Release)
            .unwrap();
        self.kicks[q].write(1).unwrap();
    }

    /// Sets or clears the driver's `VRING_AVAIL_F_NO_INTERRUPT` on queue `q` (a polling
    /// driver; here also a stand-in for a driver that misses its interrupts).
    pub fn set_no_interrupt(&mut self, q: usize, on: bool) {
        let flags: u16 = if on { 1 } else { 0 };
        let avail = self.rings[q].avail;
        self.mem
            .store(flags.to_le(), GuestAddress(avail), Ordering::Release)
            .unwrap();
    }

    /// Interrupts vnpd sent on queue `q` since the last call (read from its call eventfd).
    pub fn take_interrupts(&self, q: usize) -> u64 {
        self._calls[q].read().unwrap_or(0)
    }

    /// Kicks queue `q` without posting anything.
    pub fn kick(&self, q: usize) {
        self.kicks[q].write(1).unwrap();
    }

    /// Gives queue `q` an error eventfd (`SET_VRING_ERR`), returned to read.
    pub fn set_err_fd(&mut self, q: usize) -> EventFd {
        let err = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        self.fe.set_vring_err(q, &err).unwrap();
        // SET_VRING_ERR asks for no reply: a round trip makes sure vnpd has it.
        self.fe.get_features().unwrap();
        err
    }

    /// Enables or disables queue `q` (`SET_VRING_ENABLE`), and waits until vnpd has it.
    pub fn set_ring_enabled(&mut self, q: usize, on: bool) {
        self.fe.set_vring_enable(q, on).unwrap();
        self.fe.get_features().unwrap();
    }

    /// Stops queue `q` the way frontends do (DPDK's port stop, a guest reset): ring disabled,
    /// then `GET_VRING_BASE`, whose answer is returned.
    pub fn stop_queue(&mut self, q: usize) -> u32 {
        self.fe.set_vring_enable(q, false).unwrap();
        self.fe.get_vring_base(q).unwrap()
    }

    /// A guest driver reset of queue `q`: stopped (`GET_VRING_BASE`), its rings zeroed and set
    /// up afresh at index 0 (`SET_VRING_NUM`/`ADDR`/`BASE`, new kick and call eventfds), then
    /// enabled again.
    pub fn reset_queue(&mut self, q: usize) {
        self.stop_queue(q);
        let host = self.mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        let r = &mut self.rings[q];
        self.mem
            .write_slice(&[0u8; 0x1000], GuestAddress(r.avail))
            .unwrap();
        self.mem
            .write_slice(&[0u8; 0x1000], GuestAddress(r.used))
            .unwrap();
        r.avail_idx = 0;
        r.used_seen = 0;
        r.next_desc = 0;
        let (desc, avail, used) = (r.desc, r.avail, r.used);
        self.fe.set_vring_num(q, QUEUE_SIZE).unwrap();
        self.fe
            .set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: QUEUE_SIZE,
                    queue_size: QUEUE_SIZE,
                    flags: 0,
                    desc_table_addr: host + desc,
                    used_ring_addr: host + used,
                    avail_ring_addr: host + avail,
                    log_addr: None,
                },
            )
            .unwrap();
        self.fe.set_vring_base(q, 0).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        self.fe.set_vring_call(q, &call).unwrap();
        self.fe.set_vring_kick(q, &kick).unwrap();
        self._calls[q] = call;
        self.kicks[q] = kick;
        self.fe.set_vring_enable(q, true).unwrap();
    }

    /// Sends a chain on pair `pair`'s TX queue whose head descriptor refers to an indirect table
    /// of `entries` written at `table` (`Next::Rel(n)`/`Abs(n)` index the table).
    pub fn send_indirect(&mut self, pair: usize, table: u64, entries: &[Desc]) {
        self.post_indirect(pair * 2 + 1, table, entries);
    }

    /// The same on pair `pair`'s RX queue.
    pub fn post_rx_indirect(&mut self, pair: usize, table: u64, entries: &[Desc]) {
        self.post_indirect(pair * 2, table, entries);
    }

    fn post_indirect(&mut self, q: usize, table: u64, entries: &[Desc]) {
        for (i, d) in entries.iter().enumerate() {
            let (flags, next) = match d.next {
                Next::End => (0, 0),
                Next::Rel(n) | Next::Abs(n) => (F_NEXT, n),
            };
            let flags = flags | if d.write { F_WRITE } else { 0 };
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            self.write(table + i as u64 * 16, &raw);
        }
        let head = self.rings[q].next_desc;
        self.rings[q].next_desc = (head + 1) % QUEUE_SIZE;
        self.write_desc(q, head, table, entries.len() as u32 * 16, F_INDIRECT, 0);
        self.publish(q, head);
    }

    /// Sends `frame` on pair `pair`'s TX queue behind the virtio-net header `header`.
    pub fn send_with_header(&mut self, pair: usize, header: [u8; VNET_HDR], frame: &[u8]) {
        let s = self.scratch(40);
        self.write(s, &header);
        self.write(s + VNET_HDR as u64, frame);
        self.send_chain(
            pair,
            &[Desc {
                addr: s,
                len: (VNET_HDR + frame.len()) as u32,
                write: false,
                next: Next::End,
            }],
        );
    }

    /// Guest-physical start and length of the area [`TestFrontend::post_rx`] takes pair
    /// `pair`'s receive buffers from.
    pub fn rx_buffer_area(&self, pair: usize) -> (u64, u64) {
        (self.rings[pair * 2].bufs, u64::from(QUEUE_SIZE) * BUF_LEN)
    }

    /// How many RX buffers vnpd has used so far on `pair` (its used index).
    pub fn rx_used(&self, pair: usize) -> u16 {
        self.used_idx(pair * 2)
    }

    fn buf_addr(&self, q: usize, desc: u16) -> u64 {
        self.rings[q].bufs + u64::from(desc % QUEUE_SIZE) * BUF_LEN
    }

    /// Sends `frame` (an Ethernet frame) on pair `pair`'s TX queue behind a zero virtio-net
    /// header, in one descriptor.
    pub fn send(&mut self, pair: usize, frame: &[u8]) {
        let q = pair * 2 + 1;
        let idx = self.rings[q].next_desc;
        self.rings[q].next_desc = idx.wrapping_add(1) % QUEUE_SIZE;
        let addr = self.buf_addr(q, idx);
        let mut data = vec![0u8; VNET_HDR];
        data.extend_from_slice(frame);
        assert!(data.len() as u64 <= BUF_LEN);
        self.mem.write_slice(&data, GuestAddress(addr)).unwrap();
        self.write_desc(q, idx, addr, data.len() as u32, 0, 0);
        self.publish(q, idx);
    }

    /// Sends a hand-made descriptor chain on pair `pair`'s TX queue. Descriptors occupy
    /// consecutive indices starting at the chain's head.
    pub fn send_chain(&mut self, pair: usize, descs: &[Desc]) {
        let q = pair * 2 + 1;
        let head = self.rings[q].next_desc;
        for (i, d) in descs.iter().enumerate() {
            let idx = (head + i as u16) % QUEUE_SIZE;
            let (flags, next) = match d.next {
                Next::End => (0, 0),
                Next::Rel(n) => (F_NEXT, (head + n) % QUEUE_SIZE),
                Next::Abs(n) => (F_NEXT, n),
            };
            let flags = flags | if d.write { F_WRITE } else { 0 };
            self.write_desc(q, idx, d.addr, d.len, flags, next);
        }
        self.rings[q].next_desc = (head + descs.len().max(1) as u16) % QUEUE_SIZE;
        self.publish(q, head);
    }

    /// Writes bytes into "guest memory" at a test-chosen address (for hand-made chains).
    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    /// A scratch address in guest memory for hand-made buffers.
    pub fn scratch(&self, n: u64) -> u64 {
        0x60_0000 + n * BUF_LEN
    }

    fn used_idx(&self, q: usize) -> u16 {
        u16::from_le(
            self.mem
                .load(GuestAddress(self.rings[q].used + 2), Ordering::Acquire)
                .unwrap(),
        )
    }

    /// How many TX chains vnpd has returned so far on `pair`.
    pub fn tx_completed(&self, pair: usize) -> u16 {
        self.used_idx(pair * 2 + 1)
    }

    /// Waits until vnpd has returned `n` TX chains in total on `pair`.
    pub fn wait_tx_completed(&self, pair: usize, n: u16, timeout: Duration) {
        let start = Instant::now();
        while self.tx_completed(pair) < n {
            assert!(
                start.elapsed() < timeout,
                "only {} of {n} TX chains returned",
                self.tx_completed(pair)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Posts `n` receive buffers of `len` bytes on pair `pair`'s RX queue.
    pub fn post_rx(&mut self, pair: usize, n: usize, len: u32) {
        let q = pair * 2;
        for _ in 0..n {
            let idx = self.rings[q].next_desc;
            self.rings[q].next_desc = idx.wrapping_add(1) % QUEUE_SIZE;
            let addr = self.buf_addr(q, idx);
            self.write_desc(q, idx, addr, len, F_WRITE, 0);
            self.publish(q, idx);
        }
    }

    /// Posts one hand-made RX chain.
    pub fn post_rx_chain(&mut self, pair: usize, descs: &[Desc]) {
        let q = pair * 2;
        let head = self.rings[q].next_desc;
        for (i, d) in descs.iter().enumerate() {
            let idx = (head + i as u16) % QUEUE_SIZE;
            let (flags, next) = match d.next {
                Next::End => (0, 0),
                Next::Rel(n) => (F_NEXT, (head + n) % QUEUE_SIZE),
                Next::Abs(n) => (F_NEXT, n),
            };
            let flags = flags | if d.write { F_WRITE } else { 0 };
            self.write_desc(q, idx, d.addr, d.len, flags, next);
        }
        self.rings[q].next_desc = (head + descs.len().max(1) as u16) % QUEUE_SIZE;
        self.publish(q, head);
    }

    /// Harvests used RX entries: (descriptor id, used length, bytes including the virtio-net
    /// header). Waits up to `timeout` for at least `min` of them.
    pub fn recv(&mut self, pair: usize, min: usize, timeout: Duration) -> Vec<(u16, u32, Vec<u8>)> {
        let q = pair * 2;
        let start = Instant::now();
        let mut out = Vec::new();
        loop {
            let used = self.used_idx(q);
            while self.rings[q].used_seen != used {
                let slot =
                    self.rings[q].used + 4 + u64::from(self.rings[q].used_seen % QUEUE_SIZE) * 8;
                let mut e = [0u8; 8];
                self.mem.read_slice(&mut e, GuestAddress(slot)).unwrap();
                let id = u32::from_le_bytes(e[0..4].try_into().unwrap()) as u16;
                let len = u32::from_le_bytes(e[4..8].try_into().unwrap());
                let addr = self.buf_addr(q, id);
                let mut data = vec![0u8; (len as usize).min(BUF_LEN as usize)];
                self.mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
                out.push((id, len, data));
                self.rings[q].used_seen = self.rings[q].used_seen.wrapping_add(1);
            }
            if self.rearm_interrupts {
                let at = self.rings[q].avail + 4 + 2 * u64::from(QUEUE_SIZE);
                self.mem
                    .store(
                        self.rings[q].used_seen.to_le(),
                        GuestAddress(at),
                        Ordering::Release,
                    )
                    .unwrap();
            }
            if out.len() >= min || start.elapsed() >= timeout {
                return out;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// An Ethernet frame.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An ARP request from (`mac`, `ip`) for `target`.
pub fn arp_request(mac: [u8; 6], ip: std::net::Ipv4Addr, target: std::net::Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&mac);
    a.extend_from_slice(&ip.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    ethernet([0xff; 6], mac, 0x0806, &a)
}
