//! The control thread: the only place where vnpd waits for the registry on behalf of the data
//! path.
//!
//! The data path posts token requests through a [`ControlHandle`] (a channel send, never a
//! wait). This thread deduplicates them ([`RequestBook`]), asks the registry one pair at a time
//! with the blocking client, in a fair order across VMs (`super::fair`), and answers the VM's
//! port with a token or a refusal. Once a second
//! it asks every port which tokens expire within the refresh margin and fetches those again. A
//! second thread long-polls the registry's watch API; when a peer VM's endpoint or secret
//! changes, every port forgets that peer so that its next packet asks afresh.

use super::book::{Admission, PairKey, PeerIndex, RequestBook};
use super::fair::RequestRate;
use crate::datapath::hairpin::HairpinTarget;
use crate::datapath::{ControlPlane, PeerToken, RefusalReason, VmPort};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vnp_protocol::token::Expiry;
use vnp_registry_client::{ChangeKind, ClientError, ErrorCode, RegistryClient, WatchResponse};

/// How often expiring tokens are looked for.
const TICK: Duration = Duration::from_secs(1);
/// Long-poll time of one watch request.
const WATCH_POLL: Duration = Duration::from_secs(5);
/// Pause after a failed watch request.
const WATCH_RETRY: Duration = Duration::from_secs(2);
/// A hint-driven lookup of a pair goes to the registry at most this often (milliseconds).
const RECHECK_MIN_MS: u64 = 200;
/// Most requests kept for a VM whose port is not registered yet.
const MAX_ORPHANS: usize = 1024;

enum Msg {
    Token(PairKey),
    /// An endpoint-moved hint: fetch the pair's token again (rate-limited by the book).
    Recheck(PairKey),
    AddPort {
        vm_id: String,
        port: Arc<VmPort>,
        /// A migrated VM resumed here whose endpoint is not registered yet.
        incoming: bool,
    },
    RemovePort {
        vm_id: String,
        done: mpsc::SyncSender<()>,
    },
    Changes(WatchResponse),
    Shutdown,
}

/// Cheap, cloneable handle to the control thread. Sending never blocks.
#[derive(Clone)]
pub struct ControlHandle {
    tx: Sender<Msg>,
}

impl std::fmt::Debug for ControlHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlHandle")
    }
}

impl ControlHandle {
    /// Asks for a token from local VM `src_vm` to `dst`; the answer goes to the VM's port.
    pub fn request_token(&self, src_vm: &str, dst: Ipv4Addr) {
        // A send fails only after shutdown, when nobody waits for the answer any more.
        let _ = self.tx.send(Msg::Token(PairKey::new(src_vm, dst)));
    }

    /// Registers the port of an attached VM (answers and refreshes go to it).
    pub fn add_port(&self, vm_id: &str, port: Arc<VmPort>) {
        let _ = self.tx.send(Msg::AddPort {
            vm_id: vm_id.to_string(),
            port,
            incoming: false,
        });
    }

    /// Registers the port of a migrated VM that resumed here before its endpoint is
    /// registered: its token requests go out at once (the registry grants them from the
    /// incoming endpoint), but watch changes that still show the endpoint at the source do
    /// not make it forward anything. [`Self::add_port`] later marks it serving.
    pub fn add_incoming_port(&self, vm_id: &str, port: Arc<VmPort>) {
        let _ = self.tx.send(Msg::AddPort {
            vm_id: vm_id.to_string(),
            port,
            incoming: true,
        });
    }

    /// Unregisters a VM's port and waits until the control thread has dropped its reference
    /// (so that the caller can stop the port). Returns false if the thread is gone.
    pub fn remove_port(&self, vm_id: &str) -> bool {
        let (done, wait) = mpsc::sync_channel(1);
        if self
            .tx
            .send(Msg::RemovePort {
                vm_id: vm_id.to_string(),
                done,
            })
            .is_err()
        {
            return false;
        }
        // The thread may be in the middle of a registry request (bounded by its timeout).
        wait.recv_timeout(Duration::from_secs(60)).is_ok()
    }
}

impl ControlPlane for ControlHandle {
    fn request_token(&self, src_vm: &str, dst: Ipv4Addr) {
        ControlHandle::request_token(self, src_vm, dst)
    }

    fn recheck_token(&self, src_vm: &str, dst: Ipv4Addr) {
        let _ = self.tx.send(Msg::Recheck(PairKey::new(src_vm, dst)));
    }
}

/// Settings of the control thread.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// Refresh tokens this long before they expire.
    pub refresh_margin_secs: u32,
    /// Watch the registry for peer changes.
    pub watch: bool,
    /// Each VM's rate of requests for new destinations.
    pub token_requests: RequestRate,
}

/// The running control thread (and its watch thread); stopped on drop.
#[derive(Debug)]
pub struct ControlThread {
    handle: ControlHandle,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    watcher: Option<JoinHandle<()>>,
}

impl ControlThread {
    /// Starts the threads.
    pub fn start(client: RegistryClient, settings: ControlSettings) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let worker_client = client.clone();
        let margin = settings.refresh_margin_secs;
        let rate = settings.token_requests;
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || Worker::new(worker_client, margin, rate).run(rx))?;
        let watcher = if settings.watch {
            let tx2 = tx.clone();
            let stop2 = Arc::clone(&stop);
            Some(
                std::thread::Builder::new()
                    .name("watch".into())
                    .spawn(move || watch_loop(client, tx2, &stop2))?,
            )
        } else {
            None
        };
        Ok(Self {
            handle: ControlHandle { tx },
            stop,
            thread: Some(thread),
            watcher,
        })
    }

    /// A handle for the data path and the admin API.
    pub fn handle(&self) -> ControlHandle {
        self.handle.clone()
    }
}

impl Drop for ControlThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.tx.send(Msg::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // The watch thread notices `stop` after its current long poll (at most WATCH_POLL
        // plus the client's timeout).
        if let Some(t) = self.watcher.take() {
            let _ = t.join();
        }
    }
}

/// The registry's NAT port ranges as blocks (ranges starting at port 0 left out: never a
/// source port).
pub fn nat_blocks(ranges: &[vnp_registry_client::PortRange]) -> Vec<crate::nat::PortBlock> {
    ranges
        .iter()
        .filter_map(|r| crate::nat::PortBlock::new(r.first, r.last))
        .collect()
}

/// Maps a registry error to what the data path counts.
pub fn refusal_for(e: &ClientError) -> RefusalReason {
    match e.code() {
        Some(ErrorCode::PolicyDenied) => RefusalReason::PolicyDenied,
        Some(
            ErrorCode::UnknownVm
            | ErrorCode::NoSuchDestination
            | ErrorCode::NoEndpoint
            | ErrorCode::NoGateway
            | ErrorCode::NotFound,
        ) => RefusalReason::UnknownDestination,
        _ => RefusalReason::RegistryUnavailable,
    }
}

struct Worker {
    client: RegistryClient,
    margin: u32,
    book: RequestBook,
    peers: PeerIndex,
    ports: HashMap<String, Arc<VmPort>>,
    /// Ports of migrated VMs whose endpoint is not registered here yet, since when.
    incoming: HashMap<String, Instant>,
    orphans: HashMap<String, Vec<Ipv4Addr>>,
    next_tick: Instant,
    /// The book's clock (monotonic milliseconds) counts from here.
    epoch: Instant,
}

impl Worker {
    fn new(client: RegistryClient, margin: u32, rate: RequestRate) -> Self {
        Self {
            client,
            margin,
            book: RequestBook::with_rate(rate),
            peers: PeerIndex::new(),
            ports: HashMap::new(),
            incoming: HashMap::new(),
            orphans: HashMap::new(),
            next_tick: Instant::now() + TICK,
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// How long to wait for messages: until the next tick, or less when a queued request may
    /// go sooner (zero when one may go now).
    fn wait_time(&self) -> Duration {
        let now = self.now_ms();
        let tick = self.next_tick.saturating_duration_since(Instant::now());
        match self.book.ready_at(now) {
            Some(at) => tick.min(Duration::from_millis(at.saturating_sub(now))),
            None => tick,
        }
    }

    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            // With a request ready, only drain what is already there; otherwise sleep until the
            // next message, tick or rate refill.
            let wait = self.wait_time();
            let first = if wait.is_zero() {
                match rx.try_recv() {
                    Ok(m) => Some(m),
                    Err(mpsc::TryRecvError::Empty) => None,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            } else {
                match rx.recv_timeout(wait) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            };
            if let Some(m) = first {
                if !self.handle(m) {
                    return;
                }
                while let Ok(m) = rx.try_recv() {
                    if !self.handle(m) {
                        return;
                    }
                }
            }
            if Instant::now() >= self.next_tick {
                self.tick();
                self.next_tick = Instant::now() + TICK;
            }
            if let Some(key) = self.book.take(self.now_ms()) {
                self.fetch(key);
            }
        }
    }

    /// Returns false on shutdown.
    fn handle(&mut self, m: Msg) -> bool {
        match m {
            Msg::Token(key) => self.request(key),
            Msg::Recheck(key) => {
                let min_interval = RECHECK_MIN_MS;
                if self.ports.contains_key(&key.src_vm)
                    && self.book.refresh(key.clone(), self.now_ms(), min_interval)
                        == Admission::Queued
                {
                    log::info!("control: {} may have moved: asking again", key.dst);
                }
            }
            Msg::AddPort {
                vm_id,
                port,
                incoming,
            } => {
                if incoming {
                    log::info!("control: port of resumed vm {vm_id} added before its registration");
                    self.incoming.insert(vm_id.clone(), Instant::now());
                } else if let Some(since) = self.incoming.remove(&vm_id) {
                    log::info!(
                        "control: vm {vm_id} serving here {} ms after its resume",
                        since.elapsed().as_millis()
                    );
                } else {
                    log::debug!("control: port of {vm_id} registered");
                }
                self.ports.insert(vm_id.clone(), port);
                for dst in self.orphans.remove(&vm_id).unwrap_or_default() {
                    self.request(PairKey::new(&vm_id, dst));
                }
            }
            Msg::RemovePort { vm_id, done } => {
                self.ports.remove(&vm_id);
                self.incoming.remove(&vm_id);
                self.orphans.remove(&vm_id);
                self.book.forget_source(&vm_id);
                let _ = done.send(());
            }
            Msg::Changes(resp) => self.apply_changes(&resp),
            Msg::Shutdown => return false,
        }
        true
    }

    fn request(&mut self, key: PairKey) {
        if !self.ports.contains_key(&key.src_vm) {
            // The port's first packet can overtake its registration message.
            let list = self.orphans.entry(key.src_vm.clone()).or_default();
            if list.len() < MAX_ORPHANS && !list.contains(&key.dst) {
                list.push(key.dst);
            }
            return;
        }
        match self.book.request(key.clone(), self.now_ms()) {
            Admission::Queued | Admission::Duplicate => {}
            Admission::Throttled => {
                if let Some(p) = self.ports.get(&key.src_vm) {
                    p.counters().token_request_throttled();
                }
            }
            Admission::Refused(why) => {
                if let Some(p) = self.ports.get(&key.src_vm) {
                    p.refuse_token(key.dst, why);
                }
            }
        }
    }

    fn fetch(&mut self, key: PairKey) {
        let asked = Instant::now();
        let result = self.client.request_token(&key.src_vm, key.dst);
        let now = self.now_ms();
        let took = asked.elapsed().as_millis();
        let outcome = match result {
            Ok(grant) => match grant.token_value() {
                Ok(token) => {
                    if let Some(vm) = &grant.dst_vm {
                        self.peers.learn(vm, grant.dst_ip);
                    }
                    log::info!(
                        "control: token {} -> {} via {}:{} until {} ({took} ms)",
                        key.src_vm,
                        key.dst,
                        grant.dst_host,
                        grant.dst_port,
                        grant.expiry
                    );
                    Ok(PeerToken {
                        dst_host: grant.dst_host,
                        dst_port: grant.dst_port,
                        token,
                        expiry: Expiry(grant.expiry),
                    })
                }
                Err(e) => {
                    log::warn!("control: {e}");
                    Err(RefusalReason::RegistryUnavailable)
                }
            },
            Err(e) => {
                let why = refusal_for(&e);
                log::info!(
                    "control: no token {} -> {}: {e} (counted as {why:?})",
                    key.src_vm,
                    key.dst
                );
                Err(why)
            }
        };
        self.book
            .finish(&key, outcome.as_ref().map(|_| ()).map_err(|w| *w), now);
        let Some(port) = self.ports.get(&key.src_vm) else {
            return; // detached meanwhile
        };
        match outcome {
            Ok(token) => port.install_token(key.dst, token),
            Err(why) => port.refuse_token(key.dst, why),
        }
    }

    fn tick(&mut self) {
        let now = self.now_ms();
        self.book.purge(now);
        let unix_now = u64::from(crate::datapath::port::unix_now());
        let horizon =
            u32::try_from(unix_now.saturating_add(u64::from(self.margin))).unwrap_or(u32::MAX);
        let min_interval = u64::from(self.margin / 4).max(1) * 1000;
        let mut due = Vec::new();
        for (vm, port) in &self.ports {
            for dst in port.tokens_expiring_before(Expiry(horizon)) {
                due.push(PairKey::new(vm, dst));
            }
        }
        for key in due {
            if self.book.refresh(key.clone(), now, min_interval) == Admission::Queued {
                log::debug!("control: refreshing {} -> {}", key.src_vm, key.dst);
            }
        }
    }

    fn apply_changes(&mut self, resp: &WatchResponse) {
        if resp.resync {
            log::info!("control: watch resync: forgetting every peer");
            let all = self.peers.take_all();
            self.forget(&all);
            self.book.forget_refusals();
            return;
        }
        for c in &resp.changes {
            match c.kind {
                ChangeKind::Endpoint
                | ChangeKind::Moved
                | ChangeKind::SecretRotated
                | ChangeKind::Deleted => {
                    self.follow_local_vm(c);
                    if !invalidates_tokens(c.kind) {
                        continue;
                    }
                    let mut ips = self.peers.take(&c.vm);
                    if !ips.is_empty() {
                        log::info!("control: peer {} changed ({:?}): re-asking", c.vm, c.kind);
                    }
                    // A peer this host only ever answered holds a learned return token bound to
                    // the old endpoint, and the book does not know it: forget it by address.
                    if let Some(ip) = c.ip.filter(|ip| !ips.contains(ip)) {
                        ips.push(ip);
                    }
                    self.forget(&ips);
                }
                // New NAT blocks and forwarding rules change nothing in the token cache.
                ChangeKind::NatPorts => self.refresh_nat_blocks(&c.vm),
                ChangeKind::Created | ChangeKind::Forwards => {}
            }
            if c.kind == ChangeKind::SecretRotated && self.ports.contains_key(&c.vm) {
                log::warn!(
                    "control: the secret of local VM {} was rotated; detach and attach it again",
                    c.vm
                );
            }
        }
    }

    /// A change of a VM served here: when its endpoint moved to another host (a live
    /// migration), the port forwards stragglers there; when it is back here, it stops.
    fn follow_local_vm(&self, c: &vnp_registry_client::VmChange) {
        let Some(port) = self.ports.get(&c.vm) else {
            return;
        };
        let incoming = self.incoming.contains_key(&c.vm);
        match local_vm_move(c, port.udp_addr(), incoming) {
            Some(LocalMove::Back) => port.stop_hairpin(),
            Some(LocalMove::Away(target)) => port.start_hairpin(target),
            None => {}
        }
    }

    /// A local VM's NAT port blocks grew: the port gets them without a restart.
    fn refresh_nat_blocks(&self, vm_id: &str) {
        let Some(port) = self.ports.get(vm_id) else {
            return;
        };
        match self.client.get_vm(vm_id) {
            Ok(record) => {
                let blocks = nat_blocks(&record.nat_ports);
                log::info!("control: vm {vm_id} NAT blocks now {blocks:?}");
                port.set_nat_blocks(&blocks);
            }
            Err(e) => log::warn!("control: reading the NAT blocks of vm {vm_id}: {e}"),
        }
    }

    fn forget(&mut self, ips: &[Ipv4Addr]) {
        for ip in ips {
            self.book.forget_destination(*ip);
            for port in self.ports.values() {
                port.forget_peer(*ip);
            }
        }
    }
}

/// Whether a change of a VM makes the tokens others hold towards it useless: its endpoint or
/// secret changed, or it is gone. A move or a migration announced or cancelled (`Moved`) leaves
/// the endpoint record where it is until the new host registers (an `Endpoint` change), so the
/// tokens stay good; forgetting them would only cost a registry round trip, and the packets
/// that overflow the no-token queue meanwhile. Pure.
fn invalidates_tokens(kind: ChangeKind) -> bool {
    matches!(
        kind,
        ChangeKind::Endpoint | ChangeKind::SecretRotated | ChangeKind::Deleted
    )
}

/// What a watch change means for a VM served here at `local`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LocalMove {
    /// Its endpoint is elsewhere now: forward stragglers there.
    Away(HairpinTarget),
    /// Its endpoint is this port again.
    Back,
}

/// Reads a watch change of a VM served here (at `local`). An `incoming` port (a migrated VM
/// resumed here, its registration on the way) follows nothing: the record still names the
/// source. Pure.
fn local_vm_move(
    c: &vnp_registry_client::VmChange,
    local: SocketAddrV4,
    incoming: bool,
) -> Option<LocalMove> {
    if incoming {
        return None;
    }
    let ep = c.endpoint.filter(|_| c.kind != ChangeKind::Deleted)?;
    let to = SocketAddrV4::new(ep.host_addr, ep.port);
    Some(if to == local {
        LocalMove::Back
    } else {
        LocalMove::Away(HairpinTarget {
            to,
            generation: ep.generation,
        })
    })
}

fn watch_loop(client: RegistryClient, tx: Sender<Msg>, stop: &AtomicBool) {
    let mut since = 0u64;
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        let poll = if first { Duration::ZERO } else { WATCH_POLL };
        match client.watch(&[], since, poll) {
            Ok(resp) => {
                since = resp.generation;
                // The first answer only tells where the log stands: nothing is cached yet.
                if !first
                    && (resp.resync || !resp.changes.is_empty())
                    && tx.send(Msg::Changes(resp)).is_err()
                {
                    return;
                }
                first = false;
            }
            Err(e) => {
                log::warn!("control: watch failed: {e}");
                let until = Instant::now() + WATCH_RETRY;
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: ErrorCode) -> ClientError {
        ClientError::Api {
            status: code.http_status(),
            code,
            message: String::new(),
        }
    }

    #[test]
    fn a_local_vm_whose_endpoint_moves_away_is_hairpinned_and_stops_when_back() {
        let local = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 7000);
        let change = |kind, endpoint: Option<(Ipv4Addr, u16)>| vnp_registry_client::VmChange {
            generation: 9,
            vm: "vm-a".into(),
            kind,
            host: Some("h2".into()),
            endpoint: endpoint.map(|(host_addr, port)| vnp_registry_client::Endpoint {
                host_addr,
                port,
                generation: 4,
            }),
            secret_generation: 1,
            ip: None,
        };
        let there = (Ipv4Addr::new(198, 18, 0, 2), 7100);
        assert_eq!(
            local_vm_move(&change(ChangeKind::Endpoint, Some(there)), local, false),
            Some(LocalMove::Away(HairpinTarget {
                to: SocketAddrV4::new(there.0, there.1),
                generation: 4
            }))
        );
        // The same host, another port: moved all the same.
        let other_port = (*local.ip(), 7001);
        assert!(matches!(
            local_vm_move(
                &change(ChangeKind::Endpoint, Some(other_port)),
                local,
                false
            ),
            Some(LocalMove::Away(_))
        ));
        let here = (*local.ip(), local.port());
        assert_eq!(
            local_vm_move(&change(ChangeKind::Endpoint, Some(here)), local, false),
            Some(LocalMove::Back)
        );
        // Resumed here, not registered yet: the record names the source; nothing to follow.
        assert_eq!(
            local_vm_move(&change(ChangeKind::Endpoint, Some(there)), local, true),
            None
        );
        // No endpoint (a migration announced, not done), or deleted: nothing to follow.
        assert_eq!(
            local_vm_move(&change(ChangeKind::Moved, None), local, false),
            None
        );
        assert_eq!(
            local_vm_move(&change(ChangeKind::Deleted, Some(there)), local, false),
            None
        );
    }

    #[test]
    fn only_a_new_endpoint_a_new_secret_or_a_deletion_drops_tokens() {
        assert!(invalidates_tokens(ChangeKind::Endpoint));
        assert!(invalidates_tokens(ChangeKind::SecretRotated));
        assert!(invalidates_tokens(ChangeKind::Deleted));
        // A migration announced: the endpoint stays at the source until the destination
        // registers.
        assert!(!invalidates_tokens(ChangeKind::Moved));
        assert!(!invalidates_tokens(ChangeKind::NatPorts));
    }

    #[test]
    fn registry_errors_map_to_counted_reasons() {
        assert_eq!(
            refusal_for(&api(ErrorCode::PolicyDenied)),
            RefusalReason::PolicyDenied
        );
        assert_eq!(
            refusal_for(&api(ErrorCode::NoSuchDestination)),
            RefusalReason::UnknownDestination
        );
        assert_eq!(
            refusal_for(&api(ErrorCode::NoEndpoint)),
            RefusalReason::UnknownDestination
        );
        assert_eq!(
            refusal_for(&ClientError::Transport("down".into())),
            RefusalReason::RegistryUnavailable
        );
        assert_eq!(
            refusal_for(&api(ErrorCode::Internal)),
            RefusalReason::RegistryUnavailable
        );
    }
}
