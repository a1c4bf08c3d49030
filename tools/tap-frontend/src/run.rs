//! The event loop and the program's life: enter the namespace, open the TAP, bring the device
//! up, forward until a signal or vnpd's hang-up, reconnect if asked to.
//!
//! One thread, one epoll set, level-triggered: the TAP (readable: frames to send), vnpd's RX
//! call eventfd (frames received), its TX call eventfd (only armed while the TX ring is full),
//! the vhost-user socket (readable only at hang-up) and a signalfd (SIGTERM, SIGINT). Nothing
//! polls: with no traffic the process sleeps in `epoll_wait`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::datapath::{Datapath, Stats, TxState};
use crate::device::{self, DeviceError, Session};
use crate::features;
use crate::layout::Layout;
use crate::memory::{GuestRam, MemoryError};
use crate::ring::BadUsed;
use crate::tap::{Tap, TapError};

const TOKEN_TAP: u64 = 0;
const TOKEN_RX_CALL: u64 = 1;
const TOKEN_TX_CALL: u64 = 2;
const TOKEN_SOCKET: u64 = 3;
const TOKEN_SIGNAL: u64 = 4;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// vnpd's vhost-user socket for the VM.
    pub socket: PathBuf,
    /// Network namespace to open the TAP in (`ip netns` name or path); `None`: the current one.
    pub netns: Option<String>,
    /// TAP interface name.
    pub ifname: String,
    /// MAC address to give the interface (the VM's).
    pub mac: Option<[u8; 6]>,
    /// MTU to give the interface (DHCP from vnpd sets the network's MTU anyway).
    pub mtu: Option<u32>,
    /// Transmit queue length of the TAP.
    pub txqueuelen: Option<u32>,
    /// Ask vnpd for checksum and segmentation offloads.
    pub offloads: bool,
    /// Ring and buffer sizes.
    pub layout: Layout,
    /// How long to keep trying to connect, at start and after a hang-up.
    pub connect_timeout: Duration,
    /// Reconnect after vnpd hangs up (else exit with [`Stopped::Disconnected`]).
    pub reconnect: bool,
}

/// How the fixture stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// SIGTERM or SIGINT.
    Signal,
    /// vnpd hung up and reconnecting was not asked for (or failed within the timeout).
    Disconnected,
}

/// Fatal errors.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad options.
    #[error("{0}")]
    Options(String),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// TAP or namespace.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The vhost-user device.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// vnpd broke the ring protocol.
    #[error("vnpd broke the ring protocol: {0}")]
    Ring(#[from] BadUsed),
    /// epoll, eventfd or signal handling.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: &'static str,
        /// Underlying error.
        source: io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> RunError {
    move |source| RunError::Io { what, source }
}

/// Blocks SIGTERM and SIGINT and returns a signalfd that reports them.
fn signal_fd() -> Result<OwnedFd, RunError> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t for these calls.
    unsafe { libc::sigemptyset(&mut set) };
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: as above; the signal numbers are valid.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    // SAFETY: blocks the signals for this (only) thread; `set` is valid, no old set wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io_err("blocking signals")(io::Error::from_raw_os_error(rc)));
    }
    // SAFETY: a new signalfd for `set`; the result is checked.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io_err("signalfd")(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn watch(
    epoll: &Epoll,
    op: ControlOperation,
    fd: RawFd,
    events: EventSet,
    token: u64,
) -> Result<(), RunError> {
    epoll
        .ctl(op, fd, EpollEvent::new(events, token))
        .map_err(io_err("epoll_ctl"))
}

fn kick(fd: &EventFd) -> Result<(), RunError> {
    fd.write(1).map_err(io_err("kick eventfd"))
}

/// Clears a call eventfd (non-blocking: nothing pending is fine).
fn drain(fd: &EventFd) {
    let _ = fd.read();
}

/// Runs the fixture until a signal or a final hang-up. `ready` is called once the first
/// session forwards, with the features vnpd acked.
pub fn run(opts: &Options, ready: &mut dyn FnMut(u64)) -> Result<(Stopped, Stats), RunError> {
    opts.layout.validate().map_err(RunError::Options)?;
    if opts.offloads && !opts.layout.fits_tso() {
        return Err(RunError::Options(
            "offloads need TX buffers of 69632 bytes (--tx-buf-len) for 64 KiB TSO frames".into(),
        ));
    }
    let size = usize::try_from(opts.layout.total())
        .map_err(|_| RunError::Options("layout too large".into()))?;
    let ram = GuestRam::new(size)?;
    if let Some(ns) = &opts.netns {
        crate::tap::enter_netns(ns)?;
    }
    let tap = Tap::open(&opts.ifname)?;
    tap.configure(opts.mac, opts.mtu, opts.txqueuelen)?;
    let signals = signal_fd()?;
    let mut stats = Stats::default();
    let mut first = true;
    loop {
        let mut dp = Datapath::new(&ram, opts.layout, stats);
        let (rx, tx) = dp.rings();
        let session = device::start(
            &opts.socket,
            opts.connect_timeout,
            &ram,
            rx,
            tx,
            opts.offloads,
        );
        let session = match session {
            Ok(s) => s,
            Err(e @ DeviceError::Connect { .. }) if !first => {
                eprintln!("vnp-tap-frontend: {e}");
                return Ok((Stopped::Disconnected, stats));
            }
            Err(e) => return Err(e.into()),
        };
        tap.set_offloads(features::tun_offloads(session.acked))?;
        if first {
            ready(session.acked);
            first = false;
        } else {
            eprintln!(
                "vnp-tap-frontend: reconnected, offloads {}",
                features::describe_offloads(session.acked)
            );
        }
        let outcome = forward(&mut dp, &session, &tap, &signals)?;
        stats = dp.stats;
        if outcome == Stopped::Signal || !opts.reconnect {
            return Ok((outcome, stats));
        }
        eprintln!(
            "vnp-tap-frontend: vnpd hung up; reconnecting for up to {:?}",
            opts.connect_timeout
        );
        // The TAP stays up (addresses and routes in the namespace survive); frames it queues
        // meanwhile are read once the new session runs.
        drop(session);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The event loop of one session.
fn forward(
    dp: &mut Datapath<'_>,
    s: &Session,
    tap: &Tap,
    signals: &OwnedFd,
) -> Result<Stopped, RunError> {
    let epoll = Epoll::new().map_err(io_err("epoll_create"))?;
    let input = EventSet::IN;
    watch(
        &epoll,
        ControlOperation::Add,
        tap.as_raw_fd(),
        input,
        TOKEN_TAP,
    )?;
    watch(
        &epoll,
        ControlOperation::Add,
        s.rx.call.as_raw_fd(),
        input,
        TOKEN_RX_CALL,
    )?;
    watch(
        &epoll,
        ControlOperation::Add,
        s.tx.call.as_raw_fd(),
        input,
        TOKEN_TX_CALL,
    )?;
    let hangup = EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP;
    watch(
        &epoll,
        ControlOperation::Add,
        s.socket_fd(),
        hangup,
        TOKEN_SOCKET,
    )?;
    watch(
        &epoll,
        ControlOperation::Add,
        signals.as_raw_fd(),
        input,
        TOKEN_SIGNAL,
    )?;
    if dp.start(s.acked) {
        kick(&s.rx.kick)?;
    }
    let mut tap_paused = false;
    let mut events = vec![EpollEvent::default(); 8];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("epoll_wait")(e)),
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_SIGNAL => return Ok(Stopped::Signal),
                TOKEN_SOCKET => return Ok(Stopped::Disconnected),
                TOKEN_RX_CALL => {
                    drain(&s.rx.call);
                    if dp.rx_pass(tap.as_raw_fd())? {
                        kick(&s.rx.kick)?;
                    }
                }
                TOKEN_TX_CALL => drain(&s.tx.call),
                _ => {}
            }
        }
        // The TAP last: TX completions reaped above may have made room.
        if tap_paused {
            dp.tx_reclaim()?;
            if dp.tx_has_room() {
                dp.tx_wait_for_room(false)?;
                watch(
                    &epoll,
                    ControlOperation::Modify,
                    tap.as_raw_fd(),
                    input,
                    TOKEN_TAP,
                )?;
                tap_paused = false;
            }
        }
        if !tap_paused && events[..n].iter().any(|e| e.data() == TOKEN_TAP) {
            let (state, want_kick) = dp.tx_pass(tap.as_raw_fd())?;
            if want_kick {
                kick(&s.tx.kick)?;
            }
            if state == TxState::RingFull {
                dp.tx_wait_for_room(true)?;
                if dp.tx_has_room() {
                    dp.tx_wait_for_room(false)?;
                } else {
                    watch(
                        &epoll,
                        ControlOperation::Modify,
                        tap.as_raw_fd(),
                        EventSet::empty(),
                        TOKEN_TAP,
                    )?;
                    tap_paused = true;
                }
            }
        }
    }
}
