//! What a bounce copy on receive would cost per datagram, against what vnpd does.
//!
//! vnpd receives each datagram straight into the guest's buffer (`recvmmsg` scatters into guest
//! memory), checks it on local copies of its headers, and zeroes the bytes of a rejected one
//! (scrub). A bounce copy would receive into a vnpd buffer, check, then copy the accepted
//! packet into the guest: the only way to keep a guest from reading a datagram that is being
//! checked, at one extra copy per packet. This measures, on loopback, batches of 32 datagrams
//! of 1400 bytes:
//!
//! - `scatter`: `recvmmsg` into "guest" buffers (what vnpd does for accepted datagrams);
//! - `scatter+scrub`: the same, then zeroing every datagram (vnpd's cost when *all* are
//!   rejected, e.g. a flood of forged datagrams);
//! - `bounce`: `recvmmsg` into local buffers, then a copy of each into "guest" buffers.
//!
//! - `gro+copy`: what vnpd does since issue 13: the sender sends the 32 datagrams as one UDP
//!   GSO train, the receiver (`UDP_GRO` on) gets them in one message in a 64 KiB local slot,
//!   splits it at the segment size and copies each datagram into a "guest" buffer.
//!
//! - the copy and the zeroing alone, without the system call.
//!
//! Each figure is the fastest of 5 runs (the machine is shared). Run:
//! `cargo run --release -p vnpd --example rx_bounce_cost` (results in `docs/benchmarks.md`).

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const BATCH: usize = 32;
const PAYLOAD: usize = 1400;
const ROUNDS: usize = 20_000;
/// "Guest memory": many buffers, so that the copies land in memory that is not all in cache,
/// as a guest's RX ring of 256 x 2 KiB and more does not stay in cache either.
const GUEST_BUFFERS: usize = 4096;
const BUF_LEN: usize = 2048;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Scatter,
    ScatterScrub,
    Bounce,
    GroCopy,
}

fn set_int_opt(s: &UdpSocket, opt: libc::c_int, value: libc::c_int) {
    // SAFETY: setsockopt on a socket we own with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_UDP,
            opt,
            (&value as *const libc::c_int).cast(),
            4,
        )
    };
    assert_eq!(rc, 0, "setsockopt {opt}");
}

/// Receives one message (a GRO train) into `slot`; returns its length and segment size.
fn recv_train(rx: &UdpSocket, slot: &mut [u8]) -> (usize, usize) {
    let mut iov = libc::iovec {
        iov_base: slot.as_mut_ptr().cast(),
        iov_len: slot.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: msghdr is a plain C struct; all-zero is valid.
    let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
    m.msg_iov = &mut iov;
    m.msg_iovlen = 1;
    m.msg_control = control.as_mut_ptr().cast();
    m.msg_controllen = 64;
    // SAFETY: `m` points at `iov` (at `slot`) and `control`, alive and unaliased for the call.
    let n = unsafe { libc::recvmsg(rx.as_raw_fd(), &mut m, 0) };
    assert!(n > 0, "recvmsg");
    let mut gso = 0usize;
    // SAFETY: the kernel filled `control` and set `msg_controllen`; the CMSG macros stay inside.
    let c = unsafe { libc::CMSG_FIRSTHDR(&m) };
    if !c.is_null() {
        // SAFETY: CMSG_DATA only offsets the non-null header pointer.
        let data = unsafe { libc::CMSG_DATA(c) }.cast::<libc::c_int>();
        // SAFETY: the header lies inside `control`; its data is one c_int (UDP_GRO).
        gso = unsafe { std::ptr::read_unaligned(data) } as usize;
    }
    (n as usize, gso)
}

fn send_batch(tx: &UdpSocket, to: &libc::sockaddr_in, data: &[u8]) {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: mmsghdr is a plain C struct; all-zero is valid.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for m in msgs.iter_mut() {
        m.msg_hdr.msg_name = to as *const libc::sockaddr_in as *mut libc::c_void;
        m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
        m.msg_hdr.msg_iov = &mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: every header points at `to`, `iov` and `data`, alive for the call.
    let n = unsafe { libc::sendmmsg(tx.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
    assert_eq!(n, BATCH as i32, "sendmmsg");
}

/// Receives one batch into `targets` (one buffer per datagram); returns the bytes received.
fn recv_batch(rx: &UdpSocket, targets: &mut [&mut [u8]]) -> Vec<usize> {
    let mut iovs: Vec<libc::iovec> = targets
        .iter_mut()
        .map(|t| libc::iovec {
            iov_base: t.as_mut_ptr().cast(),
            iov_len: t.len(),
        })
        .collect();
    // SAFETY: as above.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: every header points at one iovec of `iovs`, each at a buffer of `targets`, all
    // alive and unaliased for the call.
    let n = unsafe {
        libc::recvmmsg(
            rx.as_raw_fd(),
            msgs.as_mut_ptr(),
            BATCH as u32,
            libc::MSG_WAITFORONE,
            std::ptr::null_mut(),
        )
    };
    assert!(n > 0, "recvmmsg");
    msgs[..n as usize]
        .iter()
        .map(|m| m.msg_len as usize)
        .collect()
}

fn run(mode: Mode) -> Duration {
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let std::net::SocketAddr::V4(at) = rx.local_addr().unwrap() else {
        unreachable!()
    };
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: at.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*at.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let data = vec![0xa5u8; PAYLOAD];
    let train = vec![0xa5u8; PAYLOAD * BATCH];
    if mode == Mode::GroCopy {
        set_int_opt(&rx, libc::UDP_GRO, 1);
        set_int_opt(&tx, libc::UDP_SEGMENT, PAYLOAD as libc::c_int);
    }
    let mut slot = vec![0u8; 64 * 1024];
    let mut guest = vec![1u8; GUEST_BUFFERS * BUF_LEN];
    let mut local = vec![0u8; BATCH * BUF_LEN];
    let mut spent = Duration::ZERO;
    let mut next = 0usize;
    for _ in 0..ROUNDS {
        if mode == Mode::GroCopy {
            tx.send_to(&train, at).unwrap();
        } else {
            send_batch(&tx, &to, &data);
        }
        let mut got = 0;
        while got < BATCH {
            let first = next;
            let start = Instant::now();
            let lens = match mode {
                Mode::Scatter | Mode::ScatterScrub => {
                    let mut targets: Vec<&mut [u8]> =
                        guest.chunks_mut(BUF_LEN).skip(first).take(BATCH).collect();
                    let lens = recv_batch(&rx, &mut targets);
                    if mode == Mode::ScatterScrub {
                        for (t, len) in targets.iter_mut().zip(&lens) {
                            t[..*len].fill(0);
                        }
                    }
                    lens
                }
                Mode::Bounce => {
                    let mut targets: Vec<&mut [u8]> = local.chunks_mut(BUF_LEN).collect();
                    let lens = recv_batch(&rx, &mut targets);
                    let dst = guest.chunks_mut(BUF_LEN).skip(first).take(lens.len());
                    for ((d, s), len) in dst.zip(local.chunks(BUF_LEN)).zip(&lens) {
                        d[..*len].copy_from_slice(&s[..*len]);
                    }
                    lens
                }
                Mode::GroCopy => {
                    let (len, gso) = recv_train(&rx, &mut slot);
                    let step = if gso == 0 { len } else { gso };
                    let mut lens = Vec::with_capacity(BATCH);
                    let dst = guest.chunks_mut(BUF_LEN).skip(first);
                    for (d, s) in dst.zip(slot[..len].chunks(step)) {
                        d[..s.len()].copy_from_slice(s);
                        lens.push(s.len());
                    }
                    lens
                }
            };
            spent += start.elapsed();
            got += lens.len();
            next = (next + lens.len()) % (GUEST_BUFFERS - BATCH);
        }
    }
    std::hint::black_box(&guest);
    spent
}

/// The copy alone (no system call): `PAYLOAD` bytes from a hot local buffer into successive
/// "guest" buffers, or zeroing them (`zero`).
fn copy_alone(zero: bool) -> Duration {
    let mut guest = vec![1u8; GUEST_BUFFERS * BUF_LEN];
    let local = vec![0xa5u8; PAYLOAD];
    let start = Instant::now();
    for round in 0..ROUNDS {
        for i in 0..BATCH {
            let at = ((round * BATCH + i) % GUEST_BUFFERS) * BUF_LEN;
            let dst = &mut guest[at..at + PAYLOAD];
            if zero {
                dst.fill(0);
            } else {
                dst.copy_from_slice(&local);
            }
        }
        std::hint::black_box(&guest);
    }
    start.elapsed()
}

/// The fastest of `runs` runs (the machine is shared: the minimum is the least disturbed).
fn fastest(runs: usize, f: impl Fn() -> Duration) -> Duration {
    (0..runs).map(|_| f()).min().unwrap_or_default()
}

fn main() {
    let packets = (ROUNDS * BATCH) as f64;
    let per_packet = |d: Duration| d.as_nanos() as f64 / packets;
    for (name, mode) in [
        ("scatter", Mode::Scatter),
        (
            "scatter+scrub (every datagram rejected)",
            Mode::ScatterScrub,
        ),
        ("bounce (receive, then copy)", Mode::Bounce),
        ("gro+copy (one GSO train of 32, split)", Mode::GroCopy),
    ] {
        let spent = fastest(5, || run(mode));
        println!(
            "{name:<42} {:>7.1} ns per datagram of {PAYLOAD} bytes",
            per_packet(spent)
        );
    }
    for (name, zero) in [
        ("copy alone (the bounce's extra)", false),
        ("zeroing alone (scrub)", true),
    ] {
        let spent = fastest(5, || copy_alone(zero));
        println!(
            "{name:<42} {:>7.1} ns per datagram of {PAYLOAD} bytes",
            per_packet(spent)
        );
    }
}
