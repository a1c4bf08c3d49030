//! Which gateway the replies of an inbound flow leave through (issue #10). Pure: no I/O, the
//! caller passes the time (Unix seconds, the clock of token expiries).
//!
//! A VM's off-network packets go to the one gateway the registry assigns it (the `OUTSIDE`
//! grant). With several gateways on a public address, an inbound (port-forwarded or
//! load-balanced) flow may come in through another one, and when the assigned gateway dies its
//! replies would be lost for good. So each inbound flow remembers the gateway endpoint its
//! latest datagram came from (recorded only after that datagram passed the receive checks:
//! `NatTable::inbound_via`), and its replies go there ([`reply_route`]).
//!
//! Sending to a gateway needs a token keyed with that gateway's secret for this VM's tuple.
//! The registry mints one only for the assigned gateway; the others hand vnpd theirs as a
//! return-token option on the datagrams they send (the gateway mints it with its own secret
//! over exactly the fields the registry would, `docs/protocol.md`). [`GatewayTokens`] keeps
//! them per gateway endpoint, apart from the peer table: a learned token never replaces the
//! registry's `OUTSIDE` grant, its expiry is capped, and it is only ever used for the endpoint
//! whose authenticated datagram carried it.

use std::collections::HashMap;
use std::net::SocketAddrV4;

use vnp_protocol::token::{Expiry, Token};

/// Gateway endpoints remembered per VM: a network has a handful of gateways; the bound keeps
/// what a stream of (authenticated) datagrams can make vnpd hold small.
pub const MAX_GATEWAYS: usize = 64;

/// A learned token is used while it has more than this many seconds left (as the peer table's).
pub const USE_MARGIN_SECS: u32 = 2;

/// A token for sending to one gateway endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayToken {
    /// The gateway's underlay address and port.
    pub endpoint: SocketAddrV4,
    /// The token (keyed with the gateway's secret).
    pub token: Token,
    /// Its expiry.
    pub expiry: Expiry,
}

impl GatewayToken {
    fn usable(&self, now: u32) -> bool {
        u64::from(self.expiry.0) > u64::from(now) + u64::from(USE_MARGIN_SECS)
    }
}

/// Tokens for gateways other than the assigned one, learned from their return-token options.
#[derive(Debug, Clone, Default)]
pub struct GatewayTokens {
    by_endpoint: HashMap<SocketAddrV4, GatewayToken>,
}

impl GatewayTokens {
    /// Takes the token a gateway at `endpoint` sent on an accepted datagram at `now`, its
    /// expiry capped at `now + max_ttl`. Refused (false) when already expired, when the token
    /// held for that endpoint is at least as fresh (a replayed older option changes nothing),
    /// or when [`MAX_GATEWAYS`] live endpoints are held already.
    pub fn learn(
        &mut self,
        endpoint: SocketAddrV4,
        token: Token,
        expiry: Expiry,
        now: u32,
        max_ttl: u32,
    ) -> bool {
        let cap = now.saturating_add(max_ttl);
        let expiry = if expiry.is_never() || expiry.0 > cap {
            Expiry(cap)
        } else {
            expiry
        };
        let new = GatewayToken {
            endpoint,
            token,
            expiry,
        };
        if !new.usable(now) {
            return false;
        }
        if let Some(held) = self.by_endpoint.get(&endpoint) {
            if held.expiry.0 >= expiry.0 {
                return false;
            }
        } else if self.by_endpoint.len() >= MAX_GATEWAYS {
            self.by_endpoint.retain(|_, t| t.usable(now));
            if self.by_endpoint.len() >= MAX_GATEWAYS {
                return false;
            }
        }
        self.by_endpoint.insert(endpoint, new);
        true
    }

    /// The usable token for `endpoint` at `now`.
    pub fn get(&self, endpoint: SocketAddrV4, now: u32) -> Option<GatewayToken> {
        self.by_endpoint
            .get(&endpoint)
            .copied()
            .filter(|t| t.usable(now))
    }

    /// How many endpoints are held (admin view, tests).
    pub fn len(&self) -> usize {
        self.by_endpoint.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.by_endpoint.is_empty()
    }
}

/// Where a packet of an inbound flow goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyRoute {
    /// The VM's assigned gateway, with the registry's `OUTSIDE` grant (as every other
    /// off-network packet).
    Assigned,
    /// The gateway the flow last came in through, with its learned token.
    Gateway(GatewayToken),
}

/// The route of a reply on an inbound flow that last came in from `via` (`None`: an outbound
/// flow, or none recorded), when the assigned gateway is at `assigned` (`None`: no grant yet)
/// and `learned` is the usable learned token for `via`. The registry's grant wins wherever it
/// reaches the same gateway (a learned option is not authenticated on its own); without a
/// usable token for `via` the reply falls back to the assigned gateway (which any gateway of
/// the address can answer for, if it is alive).
pub fn reply_route(
    via: Option<SocketAddrV4>,
    assigned: Option<SocketAddrV4>,
    learned: Option<GatewayToken>,
) -> ReplyRoute {
    match (via, learned) {
        (Some(via), _) if assigned == Some(via) => ReplyRoute::Assigned,
        (Some(via), Some(t)) if t.endpoint == via => ReplyRoute::Gateway(t),
        _ => ReplyRoute::Assigned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ep(last: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, last), 6081)
    }

    fn tok(b: u8) -> Token {
        Token::from_bytes([b; 8])
    }

    #[test]
    fn learns_caps_and_keeps_the_freshest() {
        let mut g = GatewayTokens::default();
        assert!(g.learn(ep(9), tok(1), Expiry(1600), 1000, 600));
        assert_eq!(g.get(ep(9), 1000).unwrap().token, tok(1));
        // An older or equal expiry (a replayed option) changes nothing.
        assert!(!g.learn(ep(9), tok(2), Expiry(1500), 1000, 600));
        assert!(!g.learn(ep(9), tok(2), Expiry(1600), 1000, 600));
        assert_eq!(g.get(ep(9), 1000).unwrap().token, tok(1));
        // A later one replaces it; "never" and far expiries are capped at now + max_ttl.
        assert!(g.learn(ep(9), tok(3), Expiry::NEVER, 1001, 600));
        assert_eq!(g.get(ep(9), 1001).unwrap().expiry, Expiry(1601));
        // Expired, or about to: refused; a held one stops being used near its expiry.
        assert!(!g.learn(ep(10), tok(4), Expiry(1001), 1000, 600));
        assert!(!g.learn(ep(10), tok(4), Expiry(1002), 1000, 600));
        assert!(g.get(ep(9), 1599).is_none());
        assert!(g.get(ep(11), 1000).is_none());
    }

    #[test]
    fn bounded_and_makes_room_from_expired_tokens() {
        let mut g = GatewayTokens::default();
        for i in 0..MAX_GATEWAYS {
            let e = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, i as u8), 6081);
            assert!(g.learn(e, tok(1), Expiry(1100), 1000, 600));
        }
        assert!(!g.learn(ep(9), tok(1), Expiry(1600), 1000, 600));
        assert_eq!(g.len(), MAX_GATEWAYS);
        // Once those expired, a new endpoint is taken.
        assert!(g.learn(ep(9), tok(1), Expiry(1700), 1200, 600));
        assert_eq!(g.len(), 1);
    }

    #[test]
    fn replies_follow_the_flow_with_a_token_else_the_assigned_gateway() {
        let learned = GatewayToken {
            endpoint: ep(10),
            token: tok(5),
            expiry: Expiry(2000),
        };
        // A flow that came in through gateway 10, with its token: there.
        assert_eq!(
            reply_route(Some(ep(10)), Some(ep(9)), Some(learned)),
            ReplyRoute::Gateway(learned)
        );
        // Also when the registry's grant is not there yet.
        assert_eq!(
            reply_route(Some(ep(10)), None, Some(learned)),
            ReplyRoute::Gateway(learned)
        );
        // Through the assigned gateway: the registry's grant, even with a learned token.
        let at_assigned = GatewayToken {
            endpoint: ep(9),
            ..learned
        };
        assert_eq!(
            reply_route(Some(ep(9)), Some(ep(9)), Some(at_assigned)),
            ReplyRoute::Assigned
        );
        // No token for the flow's gateway, no gateway recorded, or a token for another one.
        assert_eq!(
            reply_route(Some(ep(10)), Some(ep(9)), None),
            ReplyRoute::Assigned
        );
        assert_eq!(
            reply_route(None, Some(ep(9)), Some(learned)),
            ReplyRoute::Assigned
        );
        assert_eq!(
            reply_route(Some(ep(11)), Some(ep(9)), Some(learned)),
            ReplyRoute::Assigned
        );
    }
}
