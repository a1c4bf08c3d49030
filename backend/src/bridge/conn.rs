//! The connections of one VM's bridge: reading a request out of a TCP socket, routing it,
//! waiting (hanging GETs, registry calls) and writing the response. Every connection is
//! bounded: its request by the HTTP limits, its time by the request and idle timeouts.

use std::time::Instant;

use smoltcp::socket::tcp;

use super::counters::BridgeCounters;
use super::http::{self, Malformed, Parsed, Response};
use super::routes::{self, route, Decision, State};
use super::server::{BridgeLimits, Job, Server};
use super::session;
use super::source::SourceError;

/// Most pipelined requests answered per connection per step.
const PIPELINE: usize = 8;
/// Most bytes buffered for one request.
const MAX_BUFFERED: usize = http::MAX_HEAD + http::MAX_BODY;

/// Where a connection is.
#[derive(Debug, Default)]
pub enum Phase {
    /// Reading a request (or idle between requests).
    #[default]
    Reading,
    /// A hanging GET: answered when its response's ETag is no longer `etag`, or at `deadline`.
    Waiting {
        request: Vec<u8>,
        etag: String,
        deadline: Instant,
    },
    /// Waiting for a registry call.
    Fetching { request: Vec<u8>, job: Job },
    /// Writing a response.
    Sending,
    /// Response written, FIN sent: waiting for the socket to close.
    Closing,
}

/// One TCP socket's connection state.
#[derive(Debug, Default)]
pub struct Conn {
    /// Tells connections on the same socket apart.
    pub generation: u64,
    /// A connection is on the socket.
    pub open: bool,
    /// Bytes received and not yet parsed.
    pub buf: Vec<u8>,
    /// Where it is.
    pub phase: Phase,
    /// The response being written, and how much of it is sent.
    pub out: Vec<u8>,
    sent: usize,
    /// Close once the response is written.
    close_after: bool,
    /// The current request is HEAD.
    head_only: bool,
    /// When the current request (or idle period, or close) began.
    since: Option<Instant>,
}

impl Conn {
    /// When this connection must be looked at again at the latest.
    pub fn deadline(&self, limits: &BridgeLimits) -> Option<Instant> {
        if !self.open {
            return None;
        }
        match &self.phase {
            Phase::Waiting { deadline, .. } => Some(*deadline),
            Phase::Reading if !self.buf.is_empty() => {
                self.since.map(|s| s + limits.request_timeout)
            }
            Phase::Reading | Phase::Closing | Phase::Sending => {
                self.since.map(|s| s + limits.idle_timeout)
            }
            Phase::Fetching { .. } => None,
        }
    }
}

impl Server {
    /// Runs connection `i`: recycles a closed socket, writes, reads, routes, times out.
    pub(super) fn serve_conn(&mut self, i: usize, now: Instant) {
        let handle = self.netif.tcp[i];
        let state = self.netif.sockets.get::<tcp::Socket>(handle).state();
        match state {
            tcp::State::Listen | tcp::State::SynReceived => return,
            tcp::State::Closed | tcp::State::TimeWait => {
                let socket = self.netif.sockets.get_mut::<tcp::Socket>(handle);
                socket.abort();
                socket.set_hop_limit(None);
                let _ = socket.listen(self.netif.ports[i]);
                self.conns[i] = Conn::default();
                return;
            }
            _ => {}
        }
        if !self.conns[i].open {
            let generation = self.generation();
            self.conns[i] = Conn {
                generation,
                open: true,
                since: Some(now),
                ..Conn::default()
            };
            BridgeCounters::bump(&self.counters.tcp_conns);
        }
        self.flush(i, now);
        self.read(i);
        if self.timed_out(i, now) {
            return;
        }
        if let Phase::Waiting { deadline, .. } = &self.conns[i].phase {
            if now >= *deadline {
                if let Phase::Waiting { request, .. } = std::mem::take(&mut self.conns[i].phase) {
                    self.handle_request(i, request, now, true);
                }
            }
        }
        // Pipelined requests: as many as are buffered, while their responses fit.
        for _ in 0..PIPELINE {
            if matches!(self.conns[i].phase, Phase::Reading) {
                self.parse_next(i, now);
            }
            self.flush(i, now);
            if !matches!(self.conns[i].phase, Phase::Reading) || self.conns[i].buf.is_empty() {
                break;
            }
        }
    }

    /// Writes what fits of the pending response; closes after it when asked.
    fn flush(&mut self, i: usize, now: Instant) {
        let conn = &mut self.conns[i];
        if !matches!(conn.phase, Phase::Sending) {
            return;
        }
        let socket = self.netif.sockets.get_mut::<tcp::Socket>(self.netif.tcp[i]);
        if !socket.may_send() {
            socket.abort();
            return;
        }
        if let Ok(n) = socket.send_slice(&conn.out[conn.sent..]) {
            conn.sent += n;
        }
        if conn.sent < conn.out.len() {
            return;
        }
        conn.out.clear();
        conn.sent = 0;
        conn.since = Some(now);
        if conn.close_after {
            socket.close();
            conn.phase = Phase::Closing;
        } else {
            conn.phase = Phase::Reading;
        }
    }

    /// Reads what the socket holds, up to the request limit.
    fn read(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        let socket = self.netif.sockets.get_mut::<tcp::Socket>(self.netif.tcp[i]);
        let mut chunk = [0u8; 2048];
        while socket.can_recv() && conn.buf.len() <= MAX_BUFFERED {
            let room = (MAX_BUFFERED + 1 - conn.buf.len()).min(chunk.len());
            match socket.recv_slice(&mut chunk[..room]) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if conn.buf.is_empty() && matches!(conn.phase, Phase::Reading) {
                        conn.since = Some(Instant::now());
                    }
                    conn.buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
        // The client closed its side with nothing left to answer: close ours.
        if !socket.may_recv() && conn.buf.is_empty() && matches!(conn.phase, Phase::Reading) {
            socket.close();
            conn.phase = Phase::Closing;
        }
    }

    /// Slow or idle clients: 408 and close, or just close. Returns true when it closed.
    fn timed_out(&mut self, i: usize, now: Instant) -> bool {
        let conn = &self.conns[i];
        let Some(deadline) = conn.deadline(&self.limits) else {
            return false;
        };
        if now < deadline || matches!(conn.phase, Phase::Waiting { .. }) {
            return false;
        }
        let mid_request = matches!(conn.phase, Phase::Reading) && !conn.buf.is_empty();
        BridgeCounters::bump(&self.counters.http_slow_clients);
        if mid_request {
            self.conns[i].buf.clear();
            let mut r = Response::text(408, "request timeout\n");
            r.close = true;
            self.respond(i, r);
        } else {
            self.netif
                .sockets
                .get_mut::<tcp::Socket>(self.netif.tcp[i])
                .abort();
        }
        true
    }

    /// Parses the next request in the buffer and handles it.
    fn parse_next(&mut self, i: usize, now: Instant) {
        let conn = &mut self.conns[i];
        let outcome = match http::parse(&conn.buf) {
            Parsed::Partial => return,
            Parsed::Bad(m) => Err(m),
            Parsed::Complete(_, n) => Ok(n),
        };
        match outcome {
            Ok(n) => {
                let request: Vec<u8> = conn.buf.drain(..n).collect();
                self.handle_request(i, request, now, false);
            }
            Err(m) => {
                conn.buf.clear();
                BridgeCounters::bump(match m {
                    Malformed::BadRequest(_) => &self.counters.http_malformed,
                    Malformed::HeadTooLarge | Malformed::BodyTooLarge => {
                        &self.counters.http_oversize
                    }
                });
                self.respond(i, m.response());
            }
        }
    }

    /// Routes a whole request (`again`: it was routed before and waited; no second rate
    /// charge, no second wait).
    pub(super) fn handle_request(&mut self, i: usize, raw: Vec<u8>, now: Instant, again: bool) {
        if !again {
            BridgeCounters::bump(&self.counters.http_requests);
            if !self.rate.try_take(now) {
                BridgeCounters::bump(&self.counters.http_rate_limited);
                self.respond(i, routes::too_many_requests());
                return;
            }
        }
        if let Some(k) = self.service_at(i) {
            self.handle_service_request(i, k, raw, now);
            return;
        }
        let Parsed::Complete(req, _) = http::parse(&raw) else {
            self.respond(i, Malformed::BadRequest("malformed request").response());
            return;
        };
        self.conns[i].head_only = req.method == "HEAD";
        self.conns[i].close_after = !req.keep_alive;
        let state = State {
            cached: self.cached.as_ref(),
            tokens: &self.tokens,
            sessions: &self.sessions,
            now,
            waited: again,
        };
        let decision = route(&req, &state);
        match decision {
            Decision::Reply(r) => self.respond(i, r),
            Decision::NeedAccessToken => self.fetch(i, raw, Job::Access),
            Decision::NeedIdentityToken { audience, full } => {
                self.fetch(i, raw, Job::Identity { audience, full })
            }
            Decision::Wait { etag, timeout } => {
                BridgeCounters::bump(&self.counters.http_hanging);
                self.conns[i].phase = Phase::Waiting {
                    request: raw,
                    etag,
                    deadline: now + timeout,
                };
            }
            Decision::NewSession { ttl } => self.new_session(i, ttl, now),
            Decision::PutGuestAttribute {
                namespace,
                key,
                value,
            } => {
                let job = Job::Put {
                    conn: i,
                    generation: self.conns[i].generation,
                    namespace,
                    key,
                    value,
                };
                self.jobs.push(job.clone());
                self.conns[i].phase = Phase::Fetching { request: raw, job };
            }
        }
    }

    /// Issues a session token and answers it; every packet of this connection from now on
    /// leaves with IP TTL 1, so a guest-side proxy cannot forward the answer.
    fn new_session(&mut self, i: usize, ttl: std::time::Duration, now: Instant) {
        let token = match session::new_token() {
            Ok(t) => t,
            Err(e) => {
                log::error!("bridge: no randomness for a session token: {e}");
                self.respond(i, routes::unavailable());
                return;
            }
        };
        self.sessions.issue(token.clone(), ttl, now);
        BridgeCounters::bump(&self.counters.sessions_issued);
        self.netif
            .sockets
            .get_mut::<tcp::Socket>(self.netif.tcp[i])
            .set_hop_limit(Some(session::TOKEN_REPLY_HOP_LIMIT));
        let mut r = Response::text(200, token);
        r.session_ttl = Some(ttl.as_secs());
        self.respond(i, r);
    }

    /// Parks the request until `job` is done, starting it unless it already runs.
    fn fetch(&mut self, i: usize, raw: Vec<u8>, job: Job) {
        if !self.minting.contains(&job) {
            self.minting.push(job.clone());
            self.jobs.push(job.clone());
        }
        self.conns[i].phase = Phase::Fetching { request: raw, job };
    }

    /// The metadata changed: answer the hanging GET of connection `i` if its response did.
    pub(super) fn reroute_waiting(&mut self, i: usize, now: Instant) {
        let Phase::Waiting { request, etag, .. } = &self.conns[i].phase else {
            return;
        };
        let Parsed::Complete(req, _) = http::parse(request) else {
            return;
        };
        let state = State {
            cached: self.cached.as_ref(),
            tokens: &self.tokens,
            sessions: &self.sessions,
            now,
            waited: false,
        };
        if matches!(route(&req, &state), Decision::Wait { etag: ref e, .. } if e == etag) {
            return;
        }
        if let Phase::Waiting { request, .. } = std::mem::take(&mut self.conns[i].phase) {
            self.handle_request(i, request, now, true);
        }
    }

    /// The token connection `i` waited for is here: route its request again.
    pub(super) fn reroute_fetching(&mut self, i: usize, now: Instant) {
        if let Phase::Fetching { request, .. } = std::mem::take(&mut self.conns[i].phase) {
            self.handle_request(i, request, now, true);
        }
    }

    /// A registry call failed for connection `i`'s request.
    pub(super) fn fail_request(&mut self, i: usize, e: &SourceError) {
        log::debug!("bridge: registry call failed: {e}");
        let r = match e {
            SourceError::Refused { status, message } if (400..500).contains(status) => {
                Response::text(*status, format!("{message}\n"))
            }
            _ => routes::unavailable(),
        };
        self.respond(i, r);
    }

    /// Queues the bytes of a whole response on connection `i`, which closes after them (a
    /// bridged service's answer, passed on as it is).
    pub(super) fn respond_raw(&mut self, i: usize, bytes: Vec<u8>) {
        let conn = &mut self.conns[i];
        conn.out = bytes;
        conn.sent = 0;
        conn.close_after = true;
        conn.phase = Phase::Sending;
    }

    /// Queues response `r` on connection `i`.
    pub(super) fn respond(&mut self, i: usize, r: Response) {
        let c = &self.counters;
        BridgeCounters::bump(match r.status {
            200..=299 => &c.http_2xx,
            300..=399 => &c.http_3xx,
            400..=499 => &c.http_4xx,
            _ => &c.http_5xx,
        });
        if r.status == 403 {
            BridgeCounters::bump(&c.http_forbidden);
        }
        if r.status == 401 {
            BridgeCounters::bump(&c.http_unauthorized);
        }
        let conn = &mut self.conns[i];
        conn.out = r.encode(conn.head_only);
        conn.sent = 0;
        conn.close_after |= r.close;
        conn.phase = Phase::Sending;
    }
}
