//! One VM's bridge, as a state machine without threads or I/O of its own: packets from the
//! guest in, packets for the guest and registry jobs out. The bridge thread (`thread.rs`) feeds
//! it packets, registry answers and the clock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::socket::udp;
use vnp_protocol::wire::{ipv4, tcp};

use super::conn::{Conn, Phase};
use super::counters::BridgeCounters;
use super::dns::{self, Answer, DnsDrop, Names};
use super::netif::{NetIf, HTTP_PORT, MAX_QUEUED};
use super::routes::{Cached, HeldToken, TokenCache};
use super::service::{ServiceError, ServiceSpec};
use super::session::Sessions;
use super::source::{AccessToken, IdentityToken, SourceError, VmMetadata};
use crate::edge::icmp::TokenBucket;

/// Limits of one VM's bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BridgeLimits {
    /// Concurrent TCP connections (hanging GETs included).
    pub max_conns: usize,
    /// Requests per second, sustained.
    pub rate_per_sec: u32,
    /// Requests in a burst.
    pub burst: u32,
    /// Time a client has to send a whole request.
    pub request_timeout: Duration,
    /// Time an idle keep-alive connection stays open.
    pub idle_timeout: Duration,
}

impl Default for BridgeLimits {
    fn default() -> Self {
        Self {
            max_conns: 16,
            rate_per_sec: 50,
            burst: 100,
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// A registry call the bridge needs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Job {
    /// Mint an access token.
    Access,
    /// Mint an identity token.
    Identity {
        /// Audience.
        audience: String,
        /// Full format.
        full: bool,
    },
    /// Forward a request to a bridged service (its own thread: `service::exchange`).
    Proxy {
        /// Connection slot.
        conn: usize,
        /// Its generation.
        generation: u64,
        /// Where to.
        upstream: std::net::SocketAddr,
        /// The request, the VM's identity token added.
        request: Vec<u8>,
    },
    /// Write a guest attribute; `conn`/`generation` name the connection waiting for it.
    Put {
        /// Connection slot.
        conn: usize,
        /// Its generation (a slot reused by a new connection is not answered).
        generation: u64,
        /// Namespace.
        namespace: String,
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
}

/// A registry call's outcome.
#[derive(Debug, Clone)]
pub enum JobDone {
    /// The access token.
    Access(Result<AccessToken, SourceError>),
    /// An identity token.
    Identity {
        /// Audience.
        audience: String,
        /// Full format.
        full: bool,
        /// Result.
        result: Result<IdentityToken, SourceError>,
    },
    /// A guest-attribute write.
    Put {
        /// Connection slot.
        conn: usize,
        /// Its generation.
        generation: u64,
        /// Result.
        result: Result<(), SourceError>,
    },
    /// A bridged service's answer.
    Proxy {
        /// Connection slot.
        conn: usize,
        /// Its generation.
        generation: u64,
        /// The whole response, or why there is none.
        result: Result<Vec<u8>, ServiceError>,
    },
}

/// The state of one VM's bridge.
pub struct Server {
    pub(super) netif: NetIf,
    pub(super) conns: Vec<Conn>,
    pub(super) cached: Option<Cached>,
    pub(super) tokens: TokenCache,
    pub(super) sessions: Sessions,
    pub(super) limits: BridgeLimits,
    pub(super) rate: TokenBucket,
    pub(super) counters: Arc<BridgeCounters>,
    /// Registry calls to make (drained by the thread).
    pub(super) jobs: Vec<Job>,
    /// Mints in flight (one per kind and audience).
    pub(super) minting: Vec<Job>,
    names: Names,
    next_generation: u64,
    /// Other names go to the upstream resolver (one is configured).
    forward_dns: bool,
    /// Bridged services, by the port guests reach them on.
    pub(super) services: Vec<ServiceSpec>,
    /// Queries for the upstream, with where their answers go (drained by the thread).
    dns_queries: Vec<(Vec<u8>, udp::UdpMetadata)>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("conns", &self.conns.len())
            .field("cached", &self.cached.is_some())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A bridge for a VM with guest MTU `mtu`.
    pub fn new(
        names: Names,
        mtu: usize,
        limits: BridgeLimits,
        counters: Arc<BridgeCounters>,
        now: Instant,
    ) -> Self {
        let netif = NetIf::new(mtu, limits.max_conns, smoltcp::time::Instant::now());
        let conns = (0..netif.tcp.len()).map(|_| Conn::default()).collect();
        Self {
            netif,
            conns,
            cached: None,
            tokens: TokenCache::default(),
            sessions: Sessions::default(),
            limits,
            rate: TokenBucket::new(limits.rate_per_sec, limits.burst, now),
            counters,
            jobs: Vec::new(),
            minting: Vec::new(),
            names,
            next_generation: 0,
            forward_dns: false,
            services: Vec::new(),
            dns_queries: Vec::new(),
        }
    }

    /// From now on, names the bridge does not serve are forwarded (`take_dns_queries`).
    pub fn forward_dns(&mut self, on: bool) {
        self.forward_dns = on;
    }

    /// Takes the queries to forward to the upstream resolver.
    pub fn take_dns_queries(&mut self) -> Vec<(Vec<u8>, udp::UdpMetadata)> {
        std::mem::take(&mut self.dns_queries)
    }

    /// The upstream's answer to a forwarded query (its id already the guest's).
    pub fn dns_answer(&mut self, answer: &[u8], to: udp::UdpMetadata) {
        let socket = self.netif.sockets.get_mut::<udp::Socket>(self.netif.udp);
        match socket.send_slice(answer, to) {
            Ok(()) => BridgeCounters::bump(&self.counters.dns_forward_answered),
            Err(_) => BridgeCounters::bump(&self.counters.dns_forward_dropped),
        }
    }

    /// An IPv4 packet the guest sent to the metadata address.
    pub fn packet_from_guest(&mut self, packet: Vec<u8>) {
        BridgeCounters::bump(&self.counters.packets_in);
        if is_new_http_connection(&packet) && !self.netif.has_listener() {
            BridgeCounters::bump(&self.counters.tcp_conns_refused);
        }
        let q = &mut self.netif.queues.from_guest;
        if q.len() >= MAX_QUEUED {
            q.pop_front();
            BridgeCounters::bump(&self.counters.packets_dropped);
        }
        q.push_back(packet);
    }

    /// Takes the IPv4 packets for the guest.
    pub fn take_packets_to_guest(&mut self) -> Vec<Vec<u8>> {
        let out: Vec<_> = self.netif.queues.to_guest.drain(..).collect();
        self.counters
            .packets_out
            .fetch_add(out.len() as u64, std::sync::atomic::Ordering::Relaxed);
        out
    }

    /// Takes the registry calls to make.
    pub fn take_jobs(&mut self) -> Vec<Job> {
        std::mem::take(&mut self.jobs)
    }

    /// New metadata from the registry: hanging GETs whose answer changed are answered.
    pub fn metadata(&mut self, md: VmMetadata, now: Instant) {
        self.cached = Some(Cached::new(md));
        for i in 0..self.conns.len() {
            if matches!(self.conns[i].phase, Phase::Waiting { .. }) {
                self.reroute_waiting(i, now);
            }
        }
    }

    /// A registry call finished.
    pub fn job_done(&mut self, done: JobDone, now: Instant) {
        let (job, failed) = match done {
            JobDone::Access(result) => {
                let failed = self.hold(result, now, |c, t, ttl| {
                    c.access = Some(HeldToken::new(t, now, ttl))
                });
                (Job::Access, failed)
            }
            JobDone::Identity {
                audience,
                full,
                result,
            } => {
                let key = (audience.clone(), full);
                let failed = self.hold(result, now, |c, t, ttl| {
                    c.identity.insert(key, HeldToken::new(t, now, ttl));
                });
                (Job::Identity { audience, full }, failed)
            }
            JobDone::Put {
                conn,
                generation,
                result,
            } => {
                self.put_done(conn, generation, result);
                return;
            }
            JobDone::Proxy {
                conn,
                generation,
                result,
            } => {
                self.proxy_done(conn, generation, result);
                return;
            }
        };
        self.minting.retain(|j| *j != job);
        for i in 0..self.conns.len() {
            if matches!(&self.conns[i].phase, Phase::Fetching { job: j, .. } if *j == job) {
                match &failed {
                    Some(e) => self.fail_request(i, e),
                    None => self.reroute_fetching(i, now),
                }
            }
        }
    }

    /// Keeps a minted token; the error, if the mint failed.
    fn hold<T: TokenTtl>(
        &mut self,
        result: Result<T, SourceError>,
        now: Instant,
        keep: impl FnOnce(&mut TokenCache, T, Duration),
    ) -> Option<SourceError> {
        match result {
            Ok(token) => {
                BridgeCounters::bump(&self.counters.tokens_minted);
                let ttl = Duration::from_secs(token.ttl_secs().max(1));
                self.tokens.prune(now);
                keep(&mut self.tokens, token, ttl);
                None
            }
            Err(e) => {
                BridgeCounters::bump(&self.counters.registry_errors);
                Some(e)
            }
        }
    }

    fn put_done(&mut self, conn: usize, generation: u64, result: Result<(), SourceError>) {
        let Some(c) = self.conns.get(conn) else {
            return;
        };
        if c.generation != generation || !matches!(c.phase, Phase::Fetching { .. }) {
            return;
        }
        match result {
            Ok(()) => {
                BridgeCounters::bump(&self.counters.guest_attributes_written);
                self.respond(conn, super::http::Response::text(200, ""));
            }
            Err(e) => {
                BridgeCounters::bump(&self.counters.registry_errors);
                self.fail_request(conn, &e);
            }
        }
    }

    /// Runs the interface, the DNS socket and every connection; returns when to run again at
    /// the latest.
    pub fn step(&mut self, now: Instant) -> Duration {
        let smol_now = smoltcp::time::Instant::now();
        self.netif.poll(smol_now);
        self.serve_dns();
        for i in 0..self.conns.len() {
            self.serve_conn(i, now);
        }
        self.netif.poll(smol_now);
        let smol_delay = self
            .netif
            .iface
            .poll_delay(smol_now, &self.netif.sockets)
            .map_or(Duration::from_secs(1), |d| {
                Duration::from_micros(d.total_micros())
            });
        let conn_delay = self
            .conns
            .iter()
            .filter_map(|c| c.deadline(&self.limits))
            .map(|d| d.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(1));
        smol_delay.min(conn_delay).min(Duration::from_secs(1))
    }

    fn serve_dns(&mut self) {
        let socket = self.netif.sockets.get_mut::<udp::Socket>(self.netif.udp);
        while let Ok((query, meta)) = socket.recv() {
            match dns::answer(query, &self.names, self.forward_dns) {
                Ok(Answer::Reply(reply)) => {
                    let refused = reply.get(3).is_some_and(|b| b & 0x0f == 5);
                    BridgeCounters::bump(if refused {
                        &self.counters.dns_refused
                    } else {
                        &self.counters.dns_answered
                    });
                    let _ = socket.send_slice(&reply, meta);
                }
                Ok(Answer::Forward) => self.dns_queries.push((query.to_vec(), meta)),
                Err(DnsDrop::Malformed | DnsDrop::NotAQuery) => {
                    BridgeCounters::bump(&self.counters.dns_malformed)
                }
            }
        }
    }

    /// A fresh generation number for a new connection.
    pub(super) fn generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }
}

/// How long a minted token is valid.
trait TokenTtl {
    fn ttl_secs(&self) -> u64;
}

impl TokenTtl for AccessToken {
    fn ttl_secs(&self) -> u64 {
        self.expires_in
    }
}

impl TokenTtl for IdentityToken {
    fn ttl_secs(&self) -> u64 {
        self.expires_in
    }
}

/// Whether an IPv4 packet is a TCP SYN to the metadata server's port (a new connection).
fn is_new_http_connection(packet: &[u8]) -> bool {
    let Ok(ip) = ipv4::Packet::new_checked(packet) else {
        return false;
    };
    if ip.protocol() != ipv4::protocol::TCP || ip.is_later_fragment() {
        return false;
    }
    let Ok(seg) = tcp::Packet::new_checked(ip.payload()) else {
        return false;
    };
    seg.dst_port() == HTTP_PORT
        && seg.flags() & (tcp::flags::SYN | tcp::flags::ACK) == tcp::flags::SYN
}

#[cfg(test)]
mod tests;
