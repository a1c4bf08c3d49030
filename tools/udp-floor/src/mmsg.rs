//! The two loops being measured: `sendmmsg` of a batch of equal datagrams, `recvmmsg` of up to
//! a batch. Each runs on its own thread and measures its own CPU time, so the numbers are the
//! kernel's cost plus a loop that does nothing else.

use std::io;
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::pace::{Pacer, Step};
use crate::thread::thread_cpu_time;

/// Largest UDP payload over IPv4 (65535 - 20 - 8).
pub const MAX_PAYLOAD: usize = 65_507;
/// How long the receiver waits for more after the sender stopped before it stops too.
pub const DRAIN_TIMEOUT: Duration = Duration::from_millis(200);

/// Counts and times of one thread's run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ThreadStats {
    /// Datagrams sent or received (with GSO/GRO: the segments, as they are on the wire).
    pub packets: u64,
    /// Messages the system calls moved: equal to `packets` without GSO/GRO, one per GSO send
    /// or per coalesced receive with them.
    pub messages: u64,
    /// Payload bytes sent or received.
    pub bytes: u64,
    /// sendmmsg/recvmmsg calls that moved at least one datagram.
    pub calls: u64,
    /// Calls that failed with a transient error (ENOBUFS, EAGAIN, ECONNREFUSED) and were
    /// retried.
    pub transient_errors: u64,
    /// Wall time of the active part: the sender's whole loop; the receiver's first to last
    /// datagram.
    pub wall: Duration,
    /// CPU time (user + system) of the thread over its whole run.
    pub cpu: Duration,
}

/// What the sender does.
#[derive(Debug, Clone, Copy)]
pub struct SendSpec {
    /// Where to send.
    pub dst: SocketAddrV4,
    /// UDP payload bytes per datagram.
    pub payload: usize,
    /// Datagrams per sendmmsg.
    pub batch: usize,
    /// How long to send.
    pub duration: Duration,
    /// `connect()` the socket and send without per-message addresses. vnpd sends unconnected
    /// (each message names its peer host), so that is the default floor.
    pub connected: bool,
    /// Datagrams of `payload` bytes per message, sent as one UDP GSO send when above 1
    /// ([`crate::gso`]); 1 sends plain datagrams.
    pub gso_segments: usize,
    /// Datagrams (GSO sends count as one) per second to send at ([`crate::pace`]); `None`:
    /// as fast as the kernel takes them.
    pub rate: Option<f64>,
}

fn check_sizes(payload: usize, batch: usize) -> io::Result<()> {
    if payload > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("payload {payload} exceeds the UDP/IPv4 maximum {MAX_PAYLOAD}"),
        ));
    }
    if batch == 0 || batch > 1024 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("batch {batch} is not in 1..=1024 (UIO_MAXIOV)"),
        ));
    }
    Ok(())
}

fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Errors a datagram sender retries rather than gives up on: a full qdisc or socket buffer,
/// and (on a connected socket) an ICMP unreachable from a receiver not yet or no longer there.
fn is_transient(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ENOBUFS | libc::EAGAIN | libc::ECONNREFUSED | libc::EINTR)
    )
}

/// The send schedule of `spec.rate`, if any; a rate that is not a positive number is refused.
fn pacer_for(spec: &SendSpec) -> io::Result<Option<Pacer>> {
    let Some(rate) = spec.rate else {
        return Ok(None);
    };
    Pacer::new(rate, spec.batch).map(Some).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("rate {rate} is not a positive number of datagrams per second"),
        )
    })
}

/// Sends batches of `spec.payload`-byte datagrams to `spec.dst` for `spec.duration`.
pub fn run_sender(socket: &UdpSocket, spec: &SendSpec) -> io::Result<ThreadStats> {
    check_sizes(spec.payload, spec.batch)?;
    crate::gso::check_gso(spec.payload, spec.gso_segments)?;
    let mut pacer = pacer_for(spec)?;
    if spec.connected {
        socket.connect(spec.dst)?;
    }
    if spec.gso_segments > 1 {
        crate::gso::enable_gso(socket, spec.payload)?;
    }
    // The payload's content does not matter to the kernel; a pattern helps when sniffing.
    let payload: Vec<u8> = (0..spec.payload * spec.gso_segments)
        .map(|i| i as u8)
        .collect();
    let segments = spec.gso_segments as u64;
    let mut dst = sockaddr_in(spec.dst);
    let mut iovecs: Vec<libc::iovec> = (0..spec.batch)
        .map(|_| libc::iovec {
            // The kernel only reads from a send iovec; the *mut is the C signature's.
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .map(|iov| {
            // SAFETY: msghdr/mmsghdr are plain C structs for which all zeros is valid.
            let mut msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
            msg.msg_hdr.msg_iov = iov;
            msg.msg_hdr.msg_iovlen = 1;
            if !spec.connected {
                msg.msg_hdr.msg_name = (&mut dst as *mut libc::sockaddr_in).cast();
                msg.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            }
            msg
        })
        .collect();

    let fd = socket.as_raw_fd();
    let mut stats = ThreadStats::default();
    let cpu_start = thread_cpu_time()?;
    let start = Instant::now();
    while start.elapsed() < spec.duration {
        let batch = match pacer.as_mut().map(|p| p.step(start.elapsed())) {
            None => spec.batch,
            Some(Step::Send(n)) => n,
            Some(Step::Sleep(wait)) => {
                std::thread::sleep(wait.min(spec.duration.saturating_sub(start.elapsed())));
                continue;
            }
        };
        // Up to `spec.batch` (at most 1024, checked above), so the cast is exact.
        let batch = batch.min(msgs.len()) as u32;
        // SAFETY: `msgs` holds at least `batch` initialised mmsghdrs whose iovecs, payload and
        // address (`iovecs`, `payload`, `dst`) outlive the call; the kernel writes only msg_len.
        let sent = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), batch, 0) };
        if sent < 0 {
            let err = io::Error::last_os_error();
            if is_transient(&err) {
                stats.transient_errors += 1;
                continue;
            }
            return Err(err);
        }
        if let Some(pacer) = pacer.as_mut() {
            pacer.sent(sent as usize);
        }
        let sent = sent as u64;
        stats.packets += sent * segments;
        stats.messages += sent;
        stats.bytes += sent * segments * spec.payload as u64;
        stats.calls += 1;
    }
    stats.wall = start.elapsed();
    stats.cpu = thread_cpu_time()? - cpu_start;
    // Keep the buffers the kernel pointed at alive until here, explicitly.
    drop(msgs);
    drop(iovecs);
    drop(payload);
    Ok(stats)
}

/// Receives datagrams (up to `batch` per recvmmsg, each up to `max_payload` bytes) until `stop`
/// is set and nothing arrived for [`DRAIN_TIMEOUT`]. With `gro`, coalesced datagrams of up to
/// 64 KiB are accepted and counted as the segments they stand for.
pub fn run_receiver(
    socket: &UdpSocket,
    max_payload: usize,
    batch: usize,
    gro: bool,
    stop: &AtomicBool,
) -> io::Result<ThreadStats> {
    check_sizes(max_payload, batch)?;
    socket.set_read_timeout(Some(DRAIN_TIMEOUT))?;
    if gro {
        crate::gso::enable_gro(socket)?;
    }
    // One byte more than expected, so that a larger datagram shows up as truncated instead of
    // silently counting as expected.
    let slot = if gro {
        MAX_PAYLOAD + 1
    } else {
        max_payload + 1
    };
    let mut buffers = vec![0u8; slot * batch];
    let mut control = vec![0u8; crate::gso::CMSG_ROOM * batch];
    let mut iovecs: Vec<libc::iovec> = buffers
        .chunks_exact_mut(slot)
        .map(|chunk| libc::iovec {
            iov_base: chunk.as_mut_ptr().cast(),
            iov_len: chunk.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .zip(control.chunks_exact_mut(crate::gso::CMSG_ROOM))
        .map(|(iov, cmsg)| {
            // SAFETY: msghdr/mmsghdr are plain C structs for which all zeros is valid.
            let mut msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
            msg.msg_hdr.msg_iov = iov;
            msg.msg_hdr.msg_iovlen = 1;
            msg.msg_hdr.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_hdr.msg_controllen = cmsg.len();
            msg
        })
        .collect();

    let fd = socket.as_raw_fd();
    let mut stats = ThreadStats::default();
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let cpu_start = thread_cpu_time()?;
    let batch = u32::try_from(batch).unwrap_or(1024);
    loop {
        // MSG_WAITFORONE: block (up to SO_RCVTIMEO) for the first datagram, then take what is
        // queued without waiting for a full batch.
        // SAFETY: `msgs` holds `batch` mmsghdrs whose iovecs point into `buffers`, all alive
        // for the call; the kernel writes datagrams within each iovec and msg_len/msg_flags.
        let received = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                batch,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if received < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    continue;
                }
                _ => return Err(err),
            }
        }
        let now = Instant::now();
        first.get_or_insert(now);
        last = now;
        stats.calls += 1;
        for msg in &mut msgs[..received as usize] {
            let segment = crate::gso::gro_segment_size(&msg.msg_hdr);
            stats.packets += crate::gso::segments(msg.msg_len as usize, segment);
            stats.messages += 1;
            stats.bytes += u64::from(msg.msg_len);
            if msg.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("received a datagram larger than {max_payload} bytes"),
                ));
            }
            // recvmmsg shrinks msg_controllen to what it wrote: give the room back.
            msg.msg_hdr.msg_controllen = crate::gso::CMSG_ROOM;
        }
    }
    stats.cpu = thread_cpu_time()? - cpu_start;
    stats.wall = first.map_or(Duration::ZERO, |first| last - first);
    drop(msgs);
    drop(iovecs);
    drop(buffers);
    drop(control);
    Ok(stats)
}

/// Asks for a receive buffer of `bytes` (SO_RCVBUFFORCE as root, else SO_RCVBUF capped by
/// `net.core.rmem_max`), so bursts from the sender are not lost to a small default buffer.
pub fn grow_receive_buffer(socket: &UdpSocket, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: `value` is a c_int that lives across the call; its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
    }
    Err(io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    #[test]
    fn loopback_pair_moves_datagrams() {
        let receiver = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        grow_receive_buffer(&receiver, 4 << 20).unwrap();
        let dst = match receiver.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("{other}"),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stop_rx = Arc::clone(&stop);
        let rx = std::thread::spawn(move || run_receiver(&receiver, 100, 8, false, &stop_rx));
        let sender = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        for connected in [false, true] {
            let spec = SendSpec {
                dst,
                payload: 100,
                batch: 8,
                duration: Duration::from_millis(100),
                connected,
                gso_segments: 1,
                rate: None,
            };
            let sent = run_sender(&sender, &spec).unwrap();
            assert!(sent.packets > 0);
            assert_eq!(sent.bytes, sent.packets * 100);
        }
        stop.store(true, Ordering::Relaxed);
        let got = rx.join().unwrap().unwrap();
        assert!(got.packets > 0);
        assert_eq!(got.bytes, got.packets * 100);
        assert!(got.calls <= got.packets);
    }

    #[test]
    fn a_paced_sender_holds_its_rate() {
        let receiver = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        grow_receive_buffer(&receiver, 4 << 20).unwrap();
        let dst = match receiver.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("{other}"),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stop_rx = Arc::clone(&stop);
        let rx = std::thread::spawn(move || run_receiver(&receiver, 64, 32, false, &stop_rx));
        let sender = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let spec = SendSpec {
            dst,
            payload: 64,
            batch: 32,
            duration: Duration::from_millis(500),
            connected: false,
            gso_segments: 1,
            rate: Some(20_000.0),
        };
        let sent = run_sender(&sender, &spec).unwrap();
        // 10,000 due in 0.5 s; a loaded machine may fall behind (debt older than 10 ms is
        // forgiven), never ahead by more than a batch.
        assert!(
            (5_000..=10_032).contains(&sent.packets),
            "{} sent",
            sent.packets
        );
        stop.store(true, Ordering::Relaxed);
        let got = rx.join().unwrap().unwrap();
        assert!(got.packets > 0 && got.packets <= sent.packets, "{got:?}");
        let bad = SendSpec {
            rate: Some(0.0),
            ..spec
        };
        assert_eq!(
            run_sender(&sender, &bad).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn gso_sends_reach_a_gro_receiver_and_count_as_segments() {
        let receiver = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        grow_receive_buffer(&receiver, 8 << 20).unwrap();
        let dst = match receiver.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("{other}"),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stop_rx = Arc::clone(&stop);
        let rx = std::thread::spawn(move || run_receiver(&receiver, 1400, 8, true, &stop_rx));
        let sender = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let spec = SendSpec {
            dst,
            payload: 1400,
            batch: 4,
            duration: Duration::from_millis(200),
            connected: false,
            gso_segments: 40,
            rate: None,
        };
        let sent = run_sender(&sender, &spec).unwrap();
        assert_eq!(sent.packets % 40, 0, "each send is 40 segments");
        assert_eq!(sent.bytes, sent.packets * 1400);
        stop.store(true, Ordering::Relaxed);
        let got = rx.join().unwrap().unwrap();
        assert!(got.packets > 0);
        assert_eq!(got.bytes, got.packets * 1400, "whole segments only");
        // Loopback passes GSO packets unsegmented: far fewer receives than segments.
        assert!(got.calls * 8 < got.packets, "{got:?}");
    }

    #[test]
    fn oversized_datagrams_are_an_error_not_a_count() {
        let receiver = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let sender = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        sender
            .send_to(&[0u8; 64], receiver.local_addr().unwrap())
            .unwrap();
        let stop = AtomicBool::new(true);
        let err = run_receiver(&receiver, 32, 4, false, &stop).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn impossible_sizes_are_refused() {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let spec = SendSpec {
            dst: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9),
            payload: MAX_PAYLOAD + 1,
            batch: 32,
            duration: Duration::ZERO,
            connected: false,
            gso_segments: 1,
            rate: None,
        };
        assert_eq!(
            run_sender(&socket, &spec).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let spec = SendSpec {
            payload: 64,
            batch: 0,
            ..spec
        };
        assert_eq!(
            run_sender(&socket, &spec).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let stop = AtomicBool::new(true);
        assert!(run_receiver(&socket, 64, 2000, false, &stop).is_err());
    }
}
