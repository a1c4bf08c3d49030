//! `TestPmd`: DPDK's `dpdk-testpmd` as a real, independent vhost-user peer.
//!
//! vnpd is tested against QEMU guests, but QEMU under TCG is slow and only exercises one
//! frontend. `dpdk-testpmd` with `net_virtio_user` is a second, unrelated implementation of the
//! virtio/vhost-user frontend that generates and sinks packets as fast as the backend allows, so
//! it is both a protocol-compatibility check and the load generator of the benchmarks. With
//! `net_vhost` it is also DPDK's own vhost-user *backend*, which lets this fixture be tested
//! without vnpd (a virtio_user testpmd talking to a vhost testpmd).
//!
//! testpmd is driven the way a person would drive it: interactive mode (`-i`) over stdin, one
//! command at a time, each answer read up to the next `testpmd> ` prompt. It runs under
//! `stdbuf -oL` because testpmd prints with stdio, which is block-buffered on a pipe: without it
//! the answer to a command only arrives when the process exits.
//!
//! Cleanup: on drop the process is asked to `quit`, killed if it does not, and its hugepage
//! files (`<huge_dir>/<prefix>map_*`), its runtime directory (`/var/run/dpdk/<prefix>`) and any
//! vhost-user socket it listened on are removed; DPDK leaves the first two behind even on a clean
//! exit. Each instance gets a unique `--file-prefix`, so tests can run in parallel.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The interactive prompt testpmd prints when it is ready for the next command.
const PROMPT: &str = "testpmd> ";
/// Where DPDK keeps per-process runtime files (`--file-prefix` names a directory in it).
const DPDK_RUNTIME_DIR: &str = "/var/run/dpdk";
/// How much of testpmd's output is kept in memory (the tail is what error messages show).
const OUTPUT_KEEP_BYTES: usize = 64 * 1024;
/// Output is trimmed back to [`OUTPUT_KEEP_BYTES`] once it grows past this.
const OUTPUT_TRIM_BYTES: usize = 256 * 1024;
/// Lines of output quoted in error messages.
const ERROR_TAIL_LINES: usize = 40;

/// Errors launching or driving testpmd. Every variant that involves the process carries the tail
/// of its output, because that is where DPDK explains what went wrong (hugepages, sockets, ...).
#[derive(Debug, thiserror::Error)]
pub enum TestPmdError {
    /// `stdbuf`/`dpdk-testpmd` could not be started at all.
    #[error("cannot start dpdk-testpmd (is the dpdk package installed?): {0}")]
    Spawn(#[source] std::io::Error),
    /// testpmd exited while we were waiting for it.
    #[error("dpdk-testpmd exited ({status}) while waiting for {what}; output tail:\n{tail}")]
    Exited {
        /// Exit status, or a note that it could not be collected.
        status: String,
        /// What we were waiting for.
        what: String,
        /// Last lines of testpmd's output.
        tail: String,
    },
    /// testpmd did not answer in time.
    #[error("dpdk-testpmd: timed out after {timeout:?} waiting for {what}; output tail:\n{tail}")]
    Timeout {
        /// How long we waited.
        timeout: Duration,
        /// What we were waiting for.
        what: String,
        /// Last lines of testpmd's output.
        tail: String,
    },
    /// testpmd started but probed no ethernet port (e.g. the vhost-user socket was not there).
    #[error("dpdk-testpmd has no port {port}; output tail:\n{tail}")]
    NoPort {
        /// The port that was expected.
        port: u16,
        /// Last lines of testpmd's output.
        tail: String,
    },
    /// Writing a command to testpmd's stdin failed.
    #[error("cannot send {command:?} to dpdk-testpmd: {source}")]
    Send {
        /// The command line.
        command: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// testpmd's answer could not be understood.
    #[error("cannot parse dpdk-testpmd's answer to {command:?}: {reason}; answer:\n{answer}")]
    Parse {
        /// The command line.
        command: String,
        /// What was missing or malformed.
        reason: String,
        /// The raw answer.
        answer: String,
    },
    /// The spec is inconsistent (checked before anything is started).
    #[error("invalid testpmd spec: {0}")]
    Spec(String),
}

/// Which DPDK virtual device testpmd's port 0 is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortKind {
    /// `net_virtio_user`: testpmd is the virtio *frontend* (it plays the VM). With
    /// `server: false` it connects to a vhost-user backend listening on `socket` (vnpd listens,
    /// so this is the normal case); with `server: true` testpmd listens and the backend connects.
    VirtioUser {
        /// vhost-user socket path.
        socket: PathBuf,
        /// Whether testpmd listens (`server=1`) instead of connecting.
        server: bool,
    },
    /// `net_vhost`: DPDK's own vhost-user *backend*. It listens on `socket` unless `client`.
    Vhost {
        /// vhost-user socket path.
        socket: PathBuf,
        /// Whether testpmd connects (`client=1`) instead of listening.
        client: bool,
    },
}

impl PortKind {
    /// The socket path of the port.
    pub fn socket(&self) -> &Path {
        match self {
            PortKind::VirtioUser { socket, .. } | PortKind::Vhost { socket, .. } => socket,
        }
    }

    /// Whether testpmd creates (listens on) the socket file, and so must remove it.
    fn listens(&self) -> bool {
        match self {
            PortKind::VirtioUser { server, .. } => *server,
            PortKind::Vhost { client, .. } => !client,
        }
    }
}

/// testpmd's packet forwarding mode (`set fwd ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardMode {
    /// Generate UDP/IPv4 packets of [`TestPmdSpec::pkt_len`] bytes from `tx_ip.0` to `tx_ip.1`,
    /// Ethernet destination [`TestPmdSpec::eth_peer`]; received packets are not polled.
    TxOnly,
    /// Receive and free packets (a sink).
    RxOnly,
    /// Send every received packet back out unchanged.
    Io,
    /// Send every received packet back with source and destination MAC swapped.
    MacSwap,
}

impl ForwardMode {
    /// The name testpmd uses for the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardMode::TxOnly => "txonly",
            ForwardMode::RxOnly => "rxonly",
            ForwardMode::Io => "io",
            ForwardMode::MacSwap => "macswap",
        }
    }
}

/// Everything needed to launch one testpmd. Start from [`TestPmdSpec::virtio_user`] or
/// [`TestPmdSpec::vhost`] and adjust the public fields.
#[derive(Debug, Clone)]
pub struct TestPmdSpec {
    /// Port 0's device.
    pub port: PortKind,
    /// Queue pairs of the device (`queues=`, `--rxq`, `--txq`).
    pub queues: u16,
    /// Virtqueue size of a virtio_user port (`queue_size=`); ignored for vhost ports.
    pub queue_size: u16,
    /// Forwarding mode.
    pub mode: ForwardMode,
    /// Length of generated frames in bytes, Ethernet header included, no FCS (`--txpkts`).
    pub pkt_len: u16,
    /// Source and destination IPv4 address of generated packets (`--tx-ip`).
    pub tx_ip: Option<(Ipv4Addr, Ipv4Addr)>,
    /// Source and destination UDP port of generated packets (`--tx-udp`).
    pub tx_udp: Option<(u16, u16)>,
    /// Destination MAC of generated/forwarded packets (`--eth-peer=0,...`).
    pub eth_peer: Option<[u8; 6]>,
    /// MAC of the port (virtio_user `mac=` devarg; `mac_addr set` for vhost ports).
    pub mac: Option<[u8; 6]>,
    /// EAL core list (`-l`). The first core is the main lcore (command line), the others
    /// forward. testpmd needs at least two.
    pub cores: String,
    /// Main lcore (`--main-lcore`), when it is not the first of `cores`.
    pub main_lcore: Option<u32>,
    /// Hugepage memory reserved at start, MiB (`-m`).
    pub mem_mb: u32,
    /// Mbufs in the pool (`--total-num-mbufs`). testpmd's default sizes the pool for physical
    /// NICs (~340 MiB), more than a shared test machine's hugepages.
    pub total_mbufs: u32,
    /// Packets per burst (`--burst`).
    pub burst: u16,
    /// `--file-prefix`; `None` picks a unique one (pid and a counter).
    pub file_prefix: Option<String>,
    /// hugetlbfs mount testpmd allocates from (`--huge-dir`).
    pub huge_dir: PathBuf,
    /// How long to wait for EAL init and the first prompt.
    pub launch_timeout: Duration,
    /// How long to wait for the answer to one command.
    pub command_timeout: Duration,
    /// Extra EAL arguments, before `--`.
    pub extra_eal_args: Vec<String>,
    /// Extra testpmd arguments, after `--`.
    pub extra_args: Vec<String>,
}

impl TestPmdSpec {
    /// A virtio_user frontend connecting to a vhost-user backend (vnpd) listening on `socket`,
    /// in rxonly mode with one queue pair and 64-byte frames.
    pub fn virtio_user(socket: impl Into<PathBuf>) -> TestPmdSpec {
        TestPmdSpec::with_port(PortKind::VirtioUser {
            socket: socket.into(),
            server: false,
        })
    }

    /// DPDK's vhost-user backend listening on `socket`, in rxonly mode with one queue pair.
    pub fn vhost(socket: impl Into<PathBuf>) -> TestPmdSpec {
        TestPmdSpec::with_port(PortKind::Vhost {
            socket: socket.into(),
            client: false,
        })
    }

    fn with_port(port: PortKind) -> TestPmdSpec {
        TestPmdSpec {
            port,
            queues: 1,
            queue_size: 256,
            mode: ForwardMode::RxOnly,
            pkt_len: 64,
            tx_ip: None,
            tx_udp: None,
            eth_peer: None,
            mac: None,
            cores: "0,1".to_string(),
            main_lcore: None,
            mem_mb: 64,
            total_mbufs: 8192,
            burst: 32,
            file_prefix: None,
            huge_dir: PathBuf::from("/dev/hugepages"),
            launch_timeout: Duration::from_secs(60),
            command_timeout: Duration::from_secs(30),
            extra_eal_args: Vec::new(),
            extra_args: Vec::new(),
        }
    }

    /// Checks what testpmd would otherwise reject with a less helpful message.
    fn validate(&self) -> Result<(), TestPmdError> {
        if self.queues == 0 {
            return Err(TestPmdError::Spec("queues must be at least 1".into()));
        }
        // Ethernet (14) + IPv4 (20) + UDP (8): testpmd's txonly cannot build anything shorter.
        if self.pkt_len < 42 {
            return Err(TestPmdError::Spec(format!(
                "pkt_len {} is shorter than Ethernet+IPv4+UDP headers (42)",
                self.pkt_len
            )));
        }
        if self.mem_mb == 0 || self.total_mbufs == 0 || self.burst == 0 {
            return Err(TestPmdError::Spec(
                "mem_mb, total_mbufs and burst must be positive".into(),
            ));
        }
        if self.cores.is_empty() || self.cores.contains(char::is_whitespace) {
            return Err(TestPmdError::Spec(format!(
                "cores {:?} is not a core list",
                self.cores
            )));
        }
        let socket = self.port.socket().to_string_lossy();
        // The devarg list is comma separated: a comma in the path would split it.
        if socket.contains(',') || socket.is_empty() {
            return Err(TestPmdError::Spec(format!(
                "socket path {socket:?} is empty or contains a comma"
            )));
        }
        if let Some(prefix) = &self.file_prefix {
            if !prefix_is_safe(prefix) {
                return Err(TestPmdError::Spec(format!(
                    "file prefix {prefix:?} must be non-empty [A-Za-z0-9_-]"
                )));
            }
        }
        Ok(())
    }

    /// The `--vdev` argument for port 0.
    fn vdev(&self) -> String {
        match &self.port {
            PortKind::VirtioUser { socket, server } => {
                let mut vdev = format!(
                    "net_virtio_user0,path={},queues={},queue_size={}",
                    socket.display(),
                    self.queues,
                    self.queue_size
                );
                if *server {
                    vdev.push_str(",server=1");
                }
                if let Some(mac) = self.mac {
                    let _ = write!(vdev, ",mac={}", format_mac(&mac));
                }
                vdev
            }
            PortKind::Vhost { socket, client } => {
                let mut vdev = format!(
                    "net_vhost0,iface={},queues={}",
                    socket.display(),
                    self.queues
                );
                if *client {
                    vdev.push_str(",client=1");
                }
                vdev
            }
        }
    }

    /// testpmd's full argument list (without the program name) for file prefix `prefix`.
    pub fn args(&self, prefix: &str) -> Vec<String> {
        let mut args = vec![
            "-l".to_string(),
            self.cores.clone(),
            "--no-pci".to_string(),
            "--single-file-segments".to_string(),
            format!("--file-prefix={prefix}"),
            format!("--huge-dir={}", self.huge_dir.display()),
            "-m".to_string(),
            self.mem_mb.to_string(),
            "--vdev".to_string(),
            self.vdev(),
        ];
        if let Some(main) = self.main_lcore {
            args.push(format!("--main-lcore={main}"));
        }
        args.extend(self.extra_eal_args.iter().cloned());
        args.push("--".to_string());
        args.extend([
            "-i".to_string(),
            format!("--forward-mode={}", self.mode.as_str()),
            format!("--rxq={}", self.queues),
            format!("--txq={}", self.queues),
            format!("--total-num-mbufs={}", self.total_mbufs),
            format!("--burst={}", self.burst),
            format!("--txpkts={}", self.pkt_len),
        ]);
        if let Some((src, dst)) = self.tx_ip {
            args.push(format!("--tx-ip={src},{dst}"));
        }
        if let Some((src, dst)) = self.tx_udp {
            args.push(format!("--tx-udp={src},{dst}"));
        }
        if let Some(peer) = self.eth_peer {
            args.push(format!("--eth-peer=0,{}", format_mac(&peer)));
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

/// A port's counters as `show port stats N` prints them (cumulative since start or the last
/// [`TestPmd::clear_port_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Packets received.
    pub rx_packets: u64,
    /// Packets the device dropped for lack of RX descriptors.
    pub rx_missed: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Erroneous received packets.
    pub rx_errors: u64,
    /// Receive failures for lack of mbufs.
    pub rx_nombuf: u64,
    /// Packets sent (accepted by the device).
    pub tx_packets: u64,
    /// Packets that failed to send.
    pub tx_errors: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

/// Parses the answer to `show port stats <port>`. Pure, so it is tested on recorded output.
pub fn parse_port_stats(answer: &str, port: u16) -> Result<PortStats, String> {
    let header = format!("NIC statistics for port {port} ");
    let start = answer
        .find(&header)
        .ok_or_else(|| format!("no \"{}\" block", header.trim_end()))?;
    let block = &answer[start + header.len()..];
    // The block ends at the closing line of '#'s; stop there so a second port's block (from
    // `show port stats all`) is not mixed in.
    let end = block
        .find('\n')
        .and_then(|first| block[first..].find("####").map(|i| first + i))
        .unwrap_or(block.len());
    let block = &block[..end];

    let field = |name: &str| -> Result<u64, String> {
        let key = format!("{name}:");
        let at = block.find(&key).ok_or_else(|| format!("no {name} field"))?;
        let value = block[at + key.len()..]
            .split_whitespace()
            .next()
            .ok_or_else(|| format!("{name} has no value"))?;
        value
            .parse::<u64>()
            .map_err(|e| format!("{name} value {value:?}: {e}"))
    };
    Ok(PortStats {
        rx_packets: field("RX-packets")?,
        rx_missed: field("RX-missed")?,
        rx_bytes: field("RX-bytes")?,
        rx_errors: field("RX-errors")?,
        rx_nombuf: field("RX-nombuf")?,
        tx_packets: field("TX-packets")?,
        tx_errors: field("TX-errors")?,
        tx_bytes: field("TX-bytes")?,
    })
}

/// Parses `show port info <port>`'s "Link status: up|down".
pub fn parse_link_up(answer: &str) -> Result<bool, String> {
    let key = "Link status:";
    let at = answer.find(key).ok_or("no \"Link status\" line")?;
    match answer[at + key.len()..].split_whitespace().next() {
        Some("up") => Ok(true),
        Some("down") => Ok(false),
        other => Err(format!("unexpected link status {other:?}")),
    }
}

/// `aa:bb:cc:dd:ee:ff`.
fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A prefix becomes a file name and a directory name: keep it to characters that cannot escape.
fn prefix_is_safe(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A file prefix no other testpmd (in this or another process) uses: pid plus a counter.
fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "vnptpmd{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// testpmd's stdout and stderr as one growing text, with absolute offsets so that trimming the
/// front (to bound memory on long runs) does not invalidate positions callers hold.
#[derive(Debug, Default)]
struct OutputState {
    text: String,
    /// Absolute offset of `text[0]`.
    base: usize,
    /// Streams still open (stdout, stderr); 0 means the process closed both.
    open_streams: u8,
}

impl OutputState {
    fn end(&self) -> usize {
        self.base + self.text.len()
    }

    /// Text from absolute offset `from` (clamped to what is still kept).
    fn since(&self, from: usize) -> &str {
        let start = from.saturating_sub(self.base).min(self.text.len());
        // Trimming and appending keep char boundaries, but `from` may come from anywhere.
        let mut start = start;
        while !self.text.is_char_boundary(start) {
            start += 1;
        }
        &self.text[start..]
    }

    fn push(&mut self, chunk: &str) {
        self.text.push_str(chunk);
        if self.text.len() > OUTPUT_TRIM_BYTES {
            let mut cut = self.text.len() - OUTPUT_KEEP_BYTES;
            while !self.text.is_char_boundary(cut) {
                cut += 1;
            }
            self.text.drain(..cut);
            self.base += cut;
        }
    }

    fn tail(&self, lines: usize) -> String {
        let mut tail: VecDeque<&str> = VecDeque::with_capacity(lines);
        for line in self.text.lines() {
            if tail.len() == lines {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        tail.into_iter().collect::<Vec<_>>().join("\n")
    }
}

/// What testpmd printed, kept twice.
#[derive(Debug, Default)]
struct Streams {
    /// stdout and stderr interleaved as they arrived: for error messages.
    all: OutputState,
    /// stdout alone: prompts and answers are looked for here, so that an unbuffered stderr
    /// warning arriving between two pieces of the prompt cannot hide it.
    stdout: OutputState,
}

#[derive(Debug, Default)]
struct Output {
    state: Mutex<Streams>,
    grew: Condvar,
}

impl Output {
    fn lock(&self) -> MutexGuard<'_, Streams> {
        // A reader thread cannot panic while holding the lock (push does not panic), but a
        // poisoned lock still holds valid text: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Copies one of testpmd's output streams into `output` until it closes.
fn spawn_reader(
    mut stream: impl Read + Send + 'static,
    output: Arc<Output>,
    is_stdout: bool,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // Bytes of a UTF-8 sequence split across reads wait here for the rest.
        let mut pending: Vec<u8> = Vec::new();
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    pending.extend_from_slice(&buf[..n]);
                    let valid = match std::str::from_utf8(&pending) {
                        Ok(_) => pending.len(),
                        Err(e) if e.error_len().is_none() => e.valid_up_to(),
                        Err(_) => pending.len(),
                    };
                    let text = String::from_utf8_lossy(&pending[..valid]).into_owned();
                    pending.drain(..valid);
                    let mut streams = output.lock();
                    streams.all.push(&text);
                    if is_stdout {
                        streams.stdout.push(&text);
                    }
                    drop(streams);
                    output.grew.notify_all();
                }
            }
        }
        let mut state = output.lock();
        state.all.open_streams = state.all.open_streams.saturating_sub(1);
        drop(state);
        output.grew.notify_all();
    })
}

/// A running `dpdk-testpmd`. See the module documentation.
#[derive(Debug)]
pub struct TestPmd {
    child: Child,
    stdin: Option<ChildStdin>,
    output: Arc<Output>,
    readers: Vec<JoinHandle<()>>,
    spec: TestPmdSpec,
    prefix: String,
    exited: Option<ExitStatus>,
    ready: bool,
}

impl TestPmd {
    /// Starts testpmd and waits until it has probed port 0 and shows its prompt
    /// ([`TestPmd::spawn`] then [`TestPmd::wait_ready`]).
    ///
    /// For a virtio_user client port the vhost-user backend must already listen on the socket:
    /// testpmd connects once, during start-up. A virtio_user *server* port (`server: true`)
    /// blocks testpmd's start-up until a backend connects: use `spawn`, start the backend,
    /// then `wait_ready`.
    pub fn launch(spec: TestPmdSpec) -> Result<TestPmd, TestPmdError> {
        let mut pmd = TestPmd::spawn(spec)?;
        pmd.wait_ready()?;
        Ok(pmd)
    }

    /// Starts testpmd without waiting for it to be ready.
    ///
    /// The spawning thread must outlive the returned value: testpmd gets `PR_SET_PDEATHSIG`
    /// (SIGKILL) so that a test runner killed half way never leaves a busy-polling testpmd
    /// behind, and Linux ties that signal to the thread that forked it.
    pub fn spawn(spec: TestPmdSpec) -> Result<TestPmd, TestPmdError> {
        spec.validate()?;
        let prefix = spec.file_prefix.clone().unwrap_or_else(unique_prefix);
        let mut command = Command::new("stdbuf");
        command
            .args(["-oL", "-eL", "dpdk-testpmd"])
            .args(spec.args(&prefix))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let die_with_parent = || {
            // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag of the calling (child) process;
            // it is async-signal-safe, as required between fork and exec.
            let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        };
        // SAFETY: the closure runs in the forked child before exec, calls only prctl(2) and
        // allocates nothing (errno is read into an io::Error without allocating).
        unsafe {
            command.pre_exec(die_with_parent);
        }
        let mut child = command.spawn().map_err(TestPmdError::Spawn)?;

        let output = Arc::new(Output::default());
        output.lock().all.open_streams = 2;
        let mut readers = Vec::with_capacity(2);
        if let Some(stdout) = child.stdout.take() {
            readers.push(spawn_reader(stdout, Arc::clone(&output), true));
        }
        if let Some(stderr) = child.stderr.take() {
            readers.push(spawn_reader(stderr, Arc::clone(&output), false));
        }
        let stdin = child.stdin.take();
        Ok(TestPmd {
            child,
            stdin,
            output,
            readers,
            spec,
            prefix,
            exited: None,
            ready: false,
        })
    }

    /// Waits for EAL init and the first prompt, checks that port 0 was probed and applies the
    /// settings that are commands rather than arguments. Idempotent.
    pub fn wait_ready(&mut self) -> Result<(), TestPmdError> {
        if self.ready {
            return Ok(());
        }
        // On error the caller drops `self`, which kills testpmd and removes its files.
        let timeout = self.spec.launch_timeout;
        self.wait_for_prompt(0, timeout, "the first prompt (EAL init, port probe)")?;
        // testpmd keeps running with zero ports when the vdev probe fails (e.g. no backend on
        // the socket): catch that here rather than at the first `start`.
        let summary = self.command("show port summary all")?;
        if !summary
            .lines()
            .any(|l| l.split_whitespace().next() == Some("0"))
        {
            return Err(TestPmdError::NoPort {
                port: 0,
                tail: self.tail(),
            });
        }
        if let (Some(mac), PortKind::Vhost { .. }) = (self.spec.mac, &self.spec.port) {
            self.command(&format!("mac_addr set 0 {}", format_mac(&mac)))?;
        }
        self.ready = true;
        Ok(())
    }

    /// The `--file-prefix` this instance runs with.
    pub fn file_prefix(&self) -> &str {
        &self.prefix
    }

    /// testpmd's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The spec it was launched with.
    pub fn spec(&self) -> &TestPmdSpec {
        &self.spec
    }

    /// The last lines of testpmd's output (stdout and stderr interleaved).
    pub fn tail(&self) -> String {
        self.output.lock().all.tail(ERROR_TAIL_LINES)
    }

    /// Sends one interactive command and returns testpmd's answer: everything it printed before
    /// the next prompt, without the echoed command line.
    pub fn command(&mut self, line: &str) -> Result<String, TestPmdError> {
        let line = line.trim();
        if line.contains('\n') {
            return Err(TestPmdError::Spec(format!(
                "command {line:?} spans several lines"
            )));
        }
        let mark = self.output.lock().stdout.end();
        let send_result = match self.stdin.as_mut() {
            Some(stdin) => stdin
                .write_all(format!("{line}\n").as_bytes())
                .and_then(|()| stdin.flush()),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "stdin already closed",
            )),
        };
        if let Err(source) = send_result {
            // Most likely testpmd is gone; report its exit and output, not just EPIPE.
            if let Some(status) = self.try_exit_status() {
                return Err(TestPmdError::Exited {
                    status: status.to_string(),
                    what: format!("the answer to {line:?}"),
                    tail: self.tail(),
                });
            }
            return Err(TestPmdError::Send {
                command: line.to_string(),
                source,
            });
        }
        let timeout = self.spec.command_timeout;
        let answer = self.wait_for_prompt(mark, timeout, &format!("the answer to {line:?}"))?;
        Ok(strip_echo(&answer, line))
    }

    /// `start`: begins forwarding in the configured mode.
    pub fn start(&mut self) -> Result<(), TestPmdError> {
        self.command("start").map(drop)
    }

    /// `start tx_first`: sends one burst first, then forwards (to prime io/macswap loops).
    pub fn start_tx_first(&mut self) -> Result<(), TestPmdError> {
        self.command("start tx_first").map(drop)
    }

    /// `stop`: stops forwarding (waits for the forwarding lcores to finish).
    pub fn stop(&mut self) -> Result<(), TestPmdError> {
        self.command("stop").map(drop)
    }

    /// `set fwd <mode>` while stopped.
    pub fn set_forward_mode(&mut self, mode: ForwardMode) -> Result<(), TestPmdError> {
        self.command(&format!("set fwd {}", mode.as_str()))?;
        self.spec.mode = mode;
        Ok(())
    }

    /// `show port stats <port>`, parsed.
    pub fn port_stats(&mut self, port: u16) -> Result<PortStats, TestPmdError> {
        let command = format!("show port stats {port}");
        let answer = self.command(&command)?;
        parse_port_stats(&answer, port).map_err(|reason| TestPmdError::Parse {
            command,
            reason,
            answer,
        })
    }

    /// `clear port stats all`.
    pub fn clear_port_stats(&mut self) -> Result<(), TestPmdError> {
        self.command("clear port stats all").map(drop)
    }

    /// Whether port `port`'s link is up: for virtio_user, the backend accepted the device
    /// (DRIVER_OK); for vhost, a frontend connected and started its queues.
    pub fn link_up(&mut self, port: u16) -> Result<bool, TestPmdError> {
        let command = format!("show port info {port}");
        let answer = self.command(&command)?;
        parse_link_up(&answer).map_err(|reason| TestPmdError::Parse {
            command,
            reason,
            answer,
        })
    }

    /// Polls [`TestPmd::link_up`] until it is true.
    pub fn wait_link_up(&mut self, port: u16, timeout: Duration) -> Result<(), TestPmdError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.link_up(port)? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(TestPmdError::Timeout {
                    timeout,
                    what: format!("port {port} link up"),
                    tail: self.tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Asks testpmd to `quit` and waits for it to exit (killing it after `timeout`), then
    /// removes its files. Returns its exit status.
    pub fn quit(mut self, timeout: Duration) -> Result<ExitStatus, TestPmdError> {
        let status = self.shut_down(timeout);
        status.ok_or_else(|| TestPmdError::Exited {
            status: "not collected".into(),
            what: "exit after quit".into(),
            tail: self.tail(),
        })
    }

    /// Waits until the text after absolute offset `mark` contains a prompt; returns that text
    /// up to the prompt.
    fn wait_for_prompt(
        &mut self,
        mark: usize,
        timeout: Duration,
        what: &str,
    ) -> Result<String, TestPmdError> {
        let deadline = Instant::now() + timeout;
        let output = Arc::clone(&self.output);
        let mut state = output.lock();
        loop {
            let text = state.stdout.since(mark);
            if let Some(at) = text.find(PROMPT) {
                return Ok(text[..at].to_string());
            }
            if state.all.open_streams == 0 {
                drop(state);
                let status = self
                    .wait_exit(Duration::from_secs(2))
                    .map_or_else(|| "still running".to_string(), |s| s.to_string());
                return Err(TestPmdError::Exited {
                    status,
                    what: what.to_string(),
                    tail: self.tail(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                drop(state);
                return Err(TestPmdError::Timeout {
                    timeout,
                    what: what.to_string(),
                    tail: self.tail(),
                });
            }
            state = output
                .grew
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// quit -> wait -> SIGKILL -> wait, then remove files. Idempotent.
    fn shut_down(&mut self, graceful: Duration) -> Option<ExitStatus> {
        if self.try_exit_status().is_none() {
            if let Some(mut stdin) = self.stdin.take() {
                // Stop forwarding first: quit on a forwarding port is fine too, but this keeps
                // the output readable. Errors mean it is already gone; the kill below covers it.
                let _ = stdin.write_all(b"stop\nquit\n");
                let _ = stdin.flush();
            }
            if self.wait_exit(graceful).is_none() {
                let _ = self.child.kill();
                self.wait_exit(Duration::from_secs(10));
            }
        }
        self.stdin = None;
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        self.remove_files();
        self.exited
    }

    /// Removes what DPDK leaves behind for this prefix, and a socket testpmd listened on.
    fn remove_files(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.spec.huge_dir) {
            let ours = format!("{}map_", self.prefix);
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&ours) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let _ = std::fs::remove_dir_all(Path::new(DPDK_RUNTIME_DIR).join(&self.prefix));
        if self.spec.port.listens() {
            let _ = std::fs::remove_file(self.spec.port.socket());
        }
    }
}

impl Drop for TestPmd {
    fn drop(&mut self) {
        // A testpmd that never became ready (e.g. a virtio_user server still waiting for its
        // backend) cannot read `quit`: kill it straight away instead of waiting for nothing.
        let graceful = if self.ready {
            Duration::from_secs(5)
        } else {
            Duration::ZERO
        };
        self.shut_down(graceful);
    }
}

/// Removes the echoed command line from the front of an answer.
fn strip_echo(answer: &str, line: &str) -> String {
    let trimmed = answer.trim_start_matches(['\r', '\n']);
    match trimmed.strip_prefix(line) {
        Some(rest) => rest.trim_start_matches(['\r', '\n']).to_string(),
        None => answer.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATS_OUTPUT: &str = "show port stats 0

  ######################## NIC statistics for port 0  ########################
  RX-packets: 63040      RX-missed: 0          RX-bytes:  4034560
  RX-errors: 0
  RX-nombuf:  0         
  TX-packets: 0          TX-errors: 0          TX-bytes:  0

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:            0          Tx-bps:            0
  ############################################################################
";

    #[test]
    fn parses_recorded_port_stats() {
        let stats = parse_port_stats(STATS_OUTPUT, 0).unwrap();
        assert_eq!(
            stats,
            PortStats {
                rx_packets: 63040,
                rx_bytes: 4_034_560,
                ..PortStats::default()
            }
        );
    }

    #[test]
    fn port_stats_of_the_right_port_only() {
        let two = format!(
            "{}{}",
            STATS_OUTPUT.replace("63040", "1"),
            STATS_OUTPUT
                .replace("port 0 ", "port 1 ")
                .replace("TX-packets: 0 ", "TX-packets: 7 ")
        );
        assert_eq!(parse_port_stats(&two, 0).unwrap().rx_packets, 1);
        let one = parse_port_stats(&two, 1).unwrap();
        assert_eq!((one.rx_packets, one.tx_packets), (63040, 7));
        assert!(parse_port_stats(&two, 2).is_err());
    }

    #[test]
    fn port_stats_errors_name_the_field() {
        let broken = STATS_OUTPUT.replace("RX-bytes:  4034560", "RX-bytes:  many");
        let err = parse_port_stats(&broken, 0).unwrap_err();
        assert!(err.contains("RX-bytes"), "{err}");
        let missing = STATS_OUTPUT.replace("TX-errors: 0", "");
        assert!(parse_port_stats(&missing, 0)
            .unwrap_err()
            .contains("TX-errors"));
    }

    #[test]
    fn parses_link_status() {
        assert!(parse_link_up("  Link status: up\n Link speed: 10 Gbps").unwrap());
        assert!(!parse_link_up("Link status: down\n").unwrap());
        assert!(parse_link_up("nothing here").is_err());
    }

    #[test]
    fn command_line_for_a_virtio_user_generator() {
        let mut spec = TestPmdSpec::virtio_user("/run/vnp/vm1.sock");
        spec.mode = ForwardMode::TxOnly;
        spec.queues = 2;
        spec.pkt_len = 1500;
        spec.tx_ip = Some((Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)));
        spec.eth_peer = Some([0x02, 0, 0, 0, 0, 0xfe]);
        spec.mac = Some([0x02, 0, 0, 0, 0, 0x01]);
        let args = spec.args("p1");
        let joined = args.join(" ");
        assert!(joined.contains(
            "--vdev net_virtio_user0,path=/run/vnp/vm1.sock,queues=2,queue_size=256,mac=02:00:00:00:00:01"
        ), "{joined}");
        for expected in [
            "--file-prefix=p1",
            "--single-file-segments",
            "--no-pci",
            "-- -i --forward-mode=txonly --rxq=2 --txq=2",
            "--txpkts=1500",
            "--tx-ip=10.0.0.2,10.0.0.3",
            "--eth-peer=0,02:00:00:00:00:fe",
        ] {
            assert!(joined.contains(expected), "missing {expected} in {joined}");
        }
    }

    #[test]
    fn command_line_for_a_vhost_backend() {
        let mut spec = TestPmdSpec::vhost("/tmp/x.sock");
        spec.queues = 4;
        let joined = spec.args("p2").join(" ");
        assert!(
            joined.contains("--vdev net_vhost0,iface=/tmp/x.sock,queues=4 "),
            "{joined}"
        );
        assert!(joined.contains("--forward-mode=rxonly"));
        spec.port = PortKind::Vhost {
            socket: "/tmp/x.sock".into(),
            client: true,
        };
        assert!(spec.args("p2").join(" ").contains(",client=1"));
    }

    #[test]
    fn bad_specs_are_refused_before_launch() {
        let mut spec = TestPmdSpec::virtio_user("/tmp/a,b.sock");
        assert!(matches!(spec.validate(), Err(TestPmdError::Spec(_))));
        spec.port = PortKind::VirtioUser {
            socket: "/tmp/ok.sock".into(),
            server: false,
        };
        assert!(spec.validate().is_ok());
        spec.pkt_len = 20;
        assert!(spec.validate().is_err());
        spec.pkt_len = 64;
        spec.file_prefix = Some("../etc".into());
        assert!(spec.validate().is_err());
        spec.file_prefix = None;
        spec.queues = 0;
        assert!(spec.validate().is_err());
    }

    #[test]
    fn unique_prefixes_differ_and_are_safe() {
        let a = unique_prefix();
        let b = unique_prefix();
        assert_ne!(a, b);
        assert!(prefix_is_safe(&a) && prefix_is_safe(&b));
    }

    #[test]
    fn echo_is_stripped() {
        assert_eq!(strip_echo("start\nDone\n", "start"), "Done\n");
        assert_eq!(strip_echo("\nother\n", "start"), "\nother\n");
    }

    #[test]
    fn output_keeps_offsets_across_trimming() {
        let mut out = OutputState::default();
        out.push("hello ");
        let mark = out.end();
        out.push(&"x".repeat(OUTPUT_TRIM_BYTES));
        out.push("testpmd> ");
        assert!(out.text.len() <= OUTPUT_TRIM_BYTES);
        assert!(out.base > 0);
        assert!(out.since(mark).ends_with(PROMPT));
        assert_eq!(out.since(out.end()), "");
    }
}
