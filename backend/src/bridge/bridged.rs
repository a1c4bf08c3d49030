//! The server's side of bridged services (`service.rs`): a request on a service's port gets
//! the VM's identity token for the service's audience (minted through the registry like the
//! metadata server's, and held the same way), then goes to the service on a thread of its own;
//! the answer is passed back and the connection closed.

use std::time::Instant;

use super::conn::Phase;
use super::counters::BridgeCounters;
use super::http::{self, Malformed, Parsed, Response};
use super::routes;
use super::server::{Job, Server};
use super::service::{self, ServiceError, ServiceSpec};

impl Server {
    /// Makes `spec` reachable at the metadata address on its port, with `listeners`
    /// connections at once.
    pub fn add_service(&mut self, spec: ServiceSpec, listeners: usize) {
        self.netif.add_listeners(spec.port, listeners);
        self.conns
            .resize_with(self.netif.tcp.len(), Default::default);
        self.services.push(spec);
    }

    /// The service connection `i` is for, when it is not the metadata server's.
    pub(super) fn service_at(&self, i: usize) -> Option<usize> {
        let port = self.netif.ports[i];
        self.services.iter().position(|s| s.port == port)
    }

    fn proxies_in_flight(&self) -> usize {
        self.conns
            .iter()
            .filter(|c| {
                matches!(
                    c.phase,
                    Phase::Fetching {
                        job: Job::Proxy { .. },
                        ..
                    }
                )
            })
            .count()
    }

    /// A whole request on service `k`'s port (rate already charged).
    pub(super) fn handle_service_request(
        &mut self,
        i: usize,
        k: usize,
        raw: Vec<u8>,
        now: Instant,
    ) {
        let Parsed::Complete(req, _) = http::parse(&raw) else {
            self.respond(i, Malformed::BadRequest("malformed request").response());
            return;
        };
        // The network's session requirement guards its services as it guards the metadata.
        let required = self
            .cached
            .as_ref()
            .is_none_or(|c| c.metadata.project.require_session_token);
        if let Err(why) = self.sessions.check(req.session_token, required, now) {
            self.respond(i, routes::unauthorized(why));
            return;
        }
        let spec: ServiceSpec = self.services[k].clone();
        let key = (spec.audience.clone(), false);
        let token = self
            .tokens
            .identity
            .get(&key)
            .filter(|t| now < t.refresh_at)
            .map(|t| t.token.token.clone());
        let Some(token) = token else {
            let job = Job::Identity {
                audience: key.0,
                full: false,
            };
            if !self.minting.contains(&job) {
                self.minting.push(job.clone());
                self.jobs.push(job.clone());
            }
            self.conns[i].phase = Phase::Fetching { request: raw, job };
            return;
        };
        if self.proxies_in_flight() >= service::MAX_IN_FLIGHT {
            BridgeCounters::bump(&self.counters.service_errors);
            self.respond(
                i,
                Response::text(503, "too many service requests in flight\n"),
            );
            return;
        }
        let Some(request) = service::upstream_request(&raw, &spec, &token) else {
            self.respond(i, Malformed::BadRequest("malformed request").response());
            return;
        };
        BridgeCounters::bump(&self.counters.service_requests);
        let job = Job::Proxy {
            conn: i,
            generation: self.conns[i].generation,
            upstream: spec.upstream,
            request,
        };
        self.jobs.push(job.clone());
        self.conns[i].phase = Phase::Fetching { request: raw, job };
    }

    /// A service answered (or failed) for connection `conn`.
    pub(super) fn proxy_done(
        &mut self,
        conn: usize,
        generation: u64,
        result: Result<Vec<u8>, ServiceError>,
    ) {
        let Some(c) = self.conns.get(conn) else {
            return;
        };
        let waiting = matches!(
            c.phase,
            Phase::Fetching {
                job: Job::Proxy { .. },
                ..
            }
        );
        if c.generation != generation || !waiting {
            return;
        }
        match result {
            Ok(bytes) => self.respond_raw(conn, bytes),
            Err(e) => {
                log::debug!("bridge: service request failed: {e}");
                BridgeCounters::bump(&self.counters.service_errors);
                let mut r = Response::text(e.status(), format!("{e}\n"));
                r.close = true;
                self.respond(conn, r);
            }
        }
    }
}
