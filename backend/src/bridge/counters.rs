//! The bridge's counters, per VM: what it served and what it refused, by reason.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! bridge_counters {
    ($( $(#[$doc:meta])* $field:ident, )+) => {
        /// Relaxed atomics, bumped by the bridge thread, read by the admin view and tests.
        #[derive(Debug, Default)]
        pub struct BridgeCounters {
            $( $(#[$doc])* pub $field: AtomicU64, )+
        }

        impl BridgeCounters {
            /// Every counter by its stable snake_case name.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![ $( (stringify!($field), self.$field.load(Ordering::Relaxed)), )+ ]
            }
        }
    };
}

bridge_counters! {
    /// Packets the guest sent to the metadata address that reached the bridge.
    packets_in,
    /// Packets the bridge injected into the guest's receive queue.
    packets_out,
    /// Packets dropped because the bridge's queue was full (the guest floods it).
    packets_dropped,
    /// HTTP requests parsed.
    http_requests,
    /// Responses by class.
    http_2xx,
    /// 3xx responses (redirects to a directory's slash).
    http_3xx,
    /// 4xx responses.
    http_4xx,
    /// 5xx responses.
    http_5xx,
    /// Requests refused for a missing or wrong `Metadata-Flavor` or an `X-Forwarded-For`.
    http_forbidden,
    /// Requests refused for a missing, unknown or expired metadata session token (401).
    http_unauthorized,
    /// Metadata session tokens issued (`PUT /computeMetadata/v1/token`).
    sessions_issued,
    /// Requests refused past the VM's request rate (429).
    http_rate_limited,
    /// Malformed requests (400, then closed).
    http_malformed,
    /// Oversize heads or bodies (431/413, then closed).
    http_oversize,
    /// Clients too slow to send a whole request (408, then closed), or idle past the limit.
    http_slow_clients,
    /// Connection attempts refused because every connection slot was taken.
    tcp_conns_refused,
    /// Connections accepted.
    tcp_conns,
    /// Hanging GETs started.
    http_hanging,
    /// Registry calls that failed.
    registry_errors,
    /// Access and identity tokens minted (not served from the host's cache).
    tokens_minted,
    /// Requests forwarded to bridged services.
    service_requests,
    /// Bridged-service requests that failed (unreachable, timeout, bad or oversize answer:
    /// 502/504) or were refused (too many in flight: 503).
    service_errors,
    /// Guest attributes written through.
    guest_attributes_written,
    /// DNS queries answered.
    dns_answered,
    /// DNS queries for names the bridge does not serve (REFUSED).
    dns_refused,
    /// DNS datagrams that were not queries.
    dns_malformed,
    /// Queries for other names sent to the upstream resolver.
    dns_forwarded,
    /// Upstream answers passed back to the guest.
    dns_forward_answered,
    /// Forwarded queries the upstream did not answer in time.
    dns_forward_timeouts,
    /// Queries not forwarded (too many waiting, socket errors) and upstream answers dropped
    /// (not a response to a waiting query, oversize).
    dns_forward_dropped,
}

impl BridgeCounters {
    /// Adds one to `c`.
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The value of the counter named `name`.
    pub fn get(&self, name: &str) -> u64 {
        self.snapshot()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, v)| v)
    }
}
