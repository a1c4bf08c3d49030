//! The bridge's threads for one VM, off the data path: the bridge thread runs the [`Server`]
//! (smoltcp, HTTP, DNS) over the packets the VM's TX workers hand it; a fetcher thread keeps
//! the VM's metadata current with the registry's long-poll; a caller thread makes the other
//! registry calls (token mints, guest-attribute writes) one at a time. A slow registry delays
//! only the requests that need it, never a packet of the data path.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::counters::BridgeCounters;
use super::dns::Names;
use super::dns_forward::{ForwardDrop, Pending, MAX_PENDING};
use super::server::{BridgeLimits, Job, JobDone, Server};
use super::service::{self, ServiceSpec};
use super::source::{MetadataSource, VmMetadata};
use super::METADATA_IP;
use smoltcp::socket::udp::UdpMetadata;

/// Packets and answers waiting for the bridge thread; beyond it, guest packets are dropped.
const INBOX: usize = 1024;
/// Concurrent guest connections per bridged service.
const SERVICE_LISTENERS: usize = 4;
/// Long-poll time of one metadata request.
const METADATA_POLL: Duration = Duration::from_secs(20);
/// Pause after a failed metadata request.
const METADATA_RETRY: Duration = Duration::from_secs(1);

enum Msg {
    Packet(Vec<u8>),
    DnsAnswer(Vec<u8>, UdpMetadata),
    Metadata(Box<VmMetadata>),
    Done(JobDone),
    /// Live migration (`crate::migrate_state`): the live sessions, for the hand-off.
    ExportSessions(SyncSender<Vec<SessionGrant>>),
    /// Live migration, destination: keep the guest's packets back until the sessions arrive
    /// (or until the deadline: then serve without them).
    HoldUntil(Instant),
    /// Live migration, destination: the sessions the VM had on its source (then the held
    /// packets are served).
    ImportSessions(Vec<SessionGrant>),
    Stop,
}

/// A session as it moves with the VM: its token's digest and the time it has left.
pub type SessionGrant = (super::session::SessionDigest, Duration);

/// Who the bridge serves: one VM, identified by the port it is attached to.
#[derive(Debug, Clone)]
pub struct BridgeSpec {
    /// Registry id of the VM (every registry call is for this VM, whatever the guest sends).
    pub vm_id: String,
    /// Its address (the DNS answer for its hostname).
    pub vm_ip: Ipv4Addr,
    /// Its hostname.
    pub hostname: String,
    /// Guest MTU.
    pub mtu: u16,
    /// Limits.
    pub limits: BridgeLimits,
    /// The resolver other names are forwarded to (`[bridge] dns_upstream`); `None`: REFUSED.
    pub dns_upstream: Option<SocketAddr>,
    /// Bridged services (`[[bridge.services]]`).
    pub services: Vec<ServiceSpec>,
}

/// Where the TX workers post packets for the bridge. Never blocks.
#[derive(Debug, Clone)]
pub struct Inbox(SyncSender<Msg>);

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Packet(_) => "Packet",
            Msg::DnsAnswer(..) => "DnsAnswer",
            Msg::Metadata(_) => "Metadata",
            Msg::Done(_) => "Done",
            Msg::ExportSessions(_) => "ExportSessions",
            Msg::HoldUntil(_) => "HoldUntil",
            Msg::ImportSessions(_) => "ImportSessions",
            Msg::Stop => "Stop",
        })
    }
}

impl Inbox {
    /// Posts an IPv4 packet the guest sent to the metadata address; false when the bridge is
    /// full or gone (the caller counts the drop).
    pub fn post(&self, packet: Vec<u8>) -> bool {
        match self.0.try_send(Msg::Packet(packet)) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }
}

/// Delivers IPv4 packets from the bridge to the guest (the port wraps them in Ethernet and
/// hands them to a worker).
pub type Deliver = Box<dyn Fn(Vec<Vec<u8>>) + Send + 'static>;

/// One VM's running bridge; stopped on drop.
pub struct Bridge {
    inbox: Inbox,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<BridgeCounters>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge").finish_non_exhaustive()
    }
}

impl Bridge {
    /// Starts the bridge's threads for `spec`'s VM.
    pub fn start(
        spec: BridgeSpec,
        source: Arc<dyn MetadataSource>,
        deliver: Deliver,
    ) -> std::io::Result<Bridge> {
        let (tx, rx) = mpsc::sync_channel(INBOX);
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(BridgeCounters::default());
        let short: String = spec.vm_id.chars().take(8).collect();
        {
            let (source, tx, stop, id) =
                (source.clone(), tx.clone(), stop.clone(), spec.vm_id.clone());
            std::thread::Builder::new()
                .name(format!("md-fetch-{short}"))
                .spawn(move || fetch_metadata(&*source, &id, &tx, &stop))?;
        }
        {
            let (tx, id) = (tx.clone(), spec.vm_id.clone());
            std::thread::Builder::new()
                .name(format!("md-call-{short}"))
                .spawn(move || call_registry(&*source, &id, &jobs_rx, &tx))?;
        }
        let mut server = Server::new(
            Names::new(METADATA_IP, &spec.hostname, spec.vm_ip),
            usize::from(spec.mtu),
            spec.limits,
            counters.clone(),
            Instant::now(),
        );
        for spec in &spec.services {
            server.add_service(spec.clone(), SERVICE_LISTENERS);
        }
        let mut dns = None;
        if let Some(upstream) = spec.dns_upstream {
            let (queries_tx, queries_rx) = mpsc::sync_channel(MAX_PENDING);
            let (tx, counters) = (tx.clone(), counters.clone());
            std::thread::Builder::new()
                .name(format!("md-dns-{short}"))
                .spawn(move || forward_dns(upstream, &queries_rx, &tx, &counters))?;
            server.forward_dns(true);
            dns = Some(queries_tx);
        }
        let thread = std::thread::Builder::new()
            .name(format!("md-bridge-{short}"))
            .spawn(move || run(server, &rx, &jobs_tx, dns.as_ref(), &deliver))?;
        Ok(Bridge {
            inbox: Inbox(tx),
            stop,
            thread: Some(thread),
            counters,
        })
    }

    /// Where to post the guest's packets.
    pub fn inbox(&self) -> Inbox {
        self.inbox.clone()
    }

    /// The bridge's counters.
    pub fn counters(&self) -> Arc<BridgeCounters> {
        self.counters.clone()
    }

    /// The live metadata sessions with the time each has left (a read: the bridge goes on
    /// serving them); `None` when the bridge does not answer within `wait`.
    pub fn export_sessions(&self, wait: Duration) -> Option<Vec<SessionGrant>> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.inbox.0.try_send(Msg::ExportSessions(tx)).ok()?;
        rx.recv_timeout(wait).ok()
    }

    /// Keeps the guest's metadata packets back until [`Bridge::import_sessions`] or
    /// `deadline` (a migrated VM's first request must not find its session missing because
    /// the hand-off is still on its way). False when the bridge is gone.
    pub fn hold_until(&self, deadline: Instant) -> bool {
        self.inbox.0.send(Msg::HoldUntil(deadline)).is_ok()
    }

    /// Takes the sessions a migrated VM had on its source, and ends a hold.
    pub fn import_sessions(&self, sessions: Vec<SessionGrant>) -> bool {
        self.inbox.0.send(Msg::ImportSessions(sessions)).is_ok()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The inbox may be full of guest packets: a blocking send still gets through once the
        // thread drains it.
        let _ = self.inbox.0.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type DnsQueries = SyncSender<(Vec<u8>, UdpMetadata)>;

/// The bridge thread.
fn run(
    mut server: Server,
    rx: &Receiver<Msg>,
    jobs: &mpsc::Sender<Job>,
    dns: Option<&DnsQueries>,
    deliver: &Deliver,
) {
    let mut held = Held::default();
    loop {
        if held.due(Instant::now()) {
            held.release(&mut server);
        }
        let wait = held.wait(server.step(Instant::now()), Instant::now());
        let out = server.take_packets_to_guest();
        if !out.is_empty() {
            deliver(out);
        }
        for job in server.take_jobs() {
            let _ = jobs.send(job);
        }
        for query in server.take_dns_queries() {
            if dns.is_none_or(|d| d.try_send(query).is_err()) {
                BridgeCounters::bump(&server.counters.dns_forward_dropped);
            }
        }
        let msg = match rx.recv_timeout(wait) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut next = Some(msg);
        // Take everything already queued before running smoltcp again.
        while let Some(msg) = next {
            let now = Instant::now();
            match msg {
                Msg::Packet(p) => held.packet(&mut server, p),
                Msg::DnsAnswer(a, to) => server.dns_answer(&a, to),
                Msg::Metadata(md) => server.metadata(*md, now),
                Msg::Done(d) => server.job_done(d, now),
                Msg::ExportSessions(reply) => {
                    let _ = reply.try_send(server.sessions.export(now));
                }
                Msg::HoldUntil(deadline) => held.until = Some(deadline),
                Msg::ImportSessions(sessions) => {
                    let n = server.sessions.import(&sessions, now);
                    log::info!("bridge: {n} metadata session(s) taken over from the source");
                    held.release(&mut server);
                }
                Msg::Stop => return,
            }
            next = rx.try_recv().ok();
        }
    }
}

/// Guest packets kept back while a migrated VM's sessions are on their way.
#[derive(Default)]
struct Held {
    until: Option<Instant>,
    packets: Vec<Vec<u8>>,
}

impl Held {
    fn due(&self, now: Instant) -> bool {
        self.until.is_some_and(|t| now >= t)
    }

    /// The bridge's own wait, cut at the hold's deadline.
    fn wait(&self, wait: Duration, now: Instant) -> Duration {
        match self.until {
            Some(t) => wait.min(t.saturating_duration_since(now)),
            None => wait,
        }
    }

    fn packet(&mut self, server: &mut Server, p: Vec<u8>) {
        if self.until.is_none() {
            return server.packet_from_guest(p);
        }
        if self.packets.len() < INBOX {
            self.packets.push(p);
        } else {
            BridgeCounters::bump(&server.counters.packets_dropped);
        }
    }

    fn release(&mut self, server: &mut Server) {
        if self.until.take().is_some_and(|t| Instant::now() >= t) {
            log::warn!("bridge: migrated sessions did not arrive in time; serving without them");
        }
        for p in self.packets.drain(..) {
            server.packet_from_guest(p);
        }
    }
}

/// The fetcher thread: the first fetch, then long-polls for changes.
fn fetch_metadata(
    source: &dyn MetadataSource,
    vm_id: &str,
    tx: &SyncSender<Msg>,
    stop: &AtomicBool,
) {
    let mut etag: Option<String> = None;
    while !stop.load(Ordering::SeqCst) {
        let wait = etag.as_deref().map(|e| (e, METADATA_POLL));
        match source.vm_metadata(vm_id, wait) {
            Ok(md) => {
                if etag.as_deref() != Some(md.etag.as_str()) {
                    etag = Some(md.etag.clone());
                    if tx.send(Msg::Metadata(Box::new(md))).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                log::debug!("vm {vm_id}: metadata fetch failed: {e}");
                std::thread::sleep(METADATA_RETRY);
            }
        }
    }
}

/// The caller thread: token mints and guest-attribute writes, in order.
fn call_registry(
    source: &dyn MetadataSource,
    vm_id: &str,
    jobs: &Receiver<Job>,
    tx: &SyncSender<Msg>,
) {
    while let Ok(job) = jobs.recv() {
        let done = match job {
            Job::Access => JobDone::Access(source.mint_access_token(vm_id)),
            Job::Identity { audience, full } => {
                let result = source.mint_identity_token(vm_id, &audience, full);
                JobDone::Identity {
                    audience,
                    full,
                    result,
                }
            }
            Job::Put {
                conn,
                generation,
                namespace,
                key,
                value,
            } => JobDone::Put {
                conn,
                generation,
                result: source.put_guest_attribute(vm_id, &namespace, &key, &value),
            },
            Job::Proxy {
                conn,
                generation,
                upstream,
                request,
            } => {
                // Its own thread: a slow service must not hold up token mints (the bridge
                // bounds how many run at once).
                let tx = tx.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("md-service".into())
                        .spawn(move || {
                            let result = service::exchange(upstream, &request);
                            let _ = tx.send(Msg::Done(JobDone::Proxy {
                                conn,
                                generation,
                                result,
                            }));
                        });
                match spawned {
                    Ok(_) => continue,
                    Err(e) => JobDone::Proxy {
                        conn,
                        generation,
                        result: Err(service::ServiceError::Connect(e.to_string())),
                    },
                }
            }
        };
        if tx.send(Msg::Done(done)).is_err() {
            return;
        }
    }
}

/// Socket read wait while forwarded queries are pending (also how long a new query may wait
/// behind it).
const DNS_POLL: Duration = Duration::from_millis(5);

/// The DNS forwarder thread: the guest's queries for other names to `upstream` over UDP (one
/// connected socket, so the kernel drops datagrams from anyone else), answers back to the
/// bridge thread. Ends when the bridge thread does.
fn forward_dns(
    upstream: SocketAddr,
    queries: &Receiver<(Vec<u8>, UdpMetadata)>,
    tx: &SyncSender<Msg>,
    counters: &BridgeCounters,
) {
    let bind: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind).and_then(|s| s.connect(upstream).map(|()| s));
    let random = std::fs::File::open("/dev/urandom");
    let (socket, mut random) = match (socket, random) {
        (Ok(s), Ok(r)) => (s, r),
        (Err(e), _) | (_, Err(e)) => {
            log::error!("bridge: DNS forwarding to {upstream} disabled: {e}");
            // Drain and count what the guest sends, so nothing waits forever.
            while queries.recv().is_ok() {
                BridgeCounters::bump(&counters.dns_forward_dropped);
            }
            return;
        }
    };
    let _ = socket.set_read_timeout(Some(DNS_POLL));
    let mut pending: Pending<UdpMetadata> = Pending::default();
    let mut buf = [0u8; 2048];
    loop {
        let next = if pending.is_empty() {
            queries.recv_timeout(Duration::from_secs(1))
        } else {
            queries.try_recv().map_err(|e| match e {
                mpsc::TryRecvError::Empty => RecvTimeoutError::Timeout,
                mpsc::TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
            })
        };
        match next {
            Ok((query, guest)) => {
                let sent = (0..4)
                    .find_map(|_| {
                        let mut id = [0u8; 2];
                        random.read_exact(&mut id).ok()?;
                        match pending.start(&query, guest, u16::from_be_bytes(id), Instant::now()) {
                            Err(ForwardDrop::IdInUse) => None,
                            other => Some(other),
                        }
                    })
                    .and_then(Result::ok)
                    .is_some_and(|out| socket.send(&out).is_ok());
                BridgeCounters::bump(if sent {
                    &counters.dns_forwarded
                } else {
                    &counters.dns_forward_dropped
                });
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
        if let Ok(n) = socket.recv(&mut buf) {
            match pending.finish(&buf[..n]) {
                Ok((answer, guest)) => {
                    if tx.send(Msg::DnsAnswer(answer, guest)).is_err() {
                        return;
                    }
                }
                Err(_) => BridgeCounters::bump(&counters.dns_forward_dropped),
            }
        }
        let expired = pending.expire(Instant::now()) as u64;
        counters
            .dns_forward_timeouts
            .fetch_add(expired, Ordering::Relaxed);
    }
}
