//! Tokens from the gateway towards VMs, as the registry granted them: one per VM (the outside
//! end is `OUTSIDE`, so a new outside peer costs nothing), kept until shortly before expiry.
//!
//! And the tokens the other way, which the gateway hands VMs as return-token options: the
//! registry grants a VM a token only for its assigned gateway, but the replies of a flow that
//! came in through this gateway should leave through it (`docs/gateway.md`, *Replies follow
//! the gateway*). The gateway mints that token with its own secret over exactly the fields its
//! receive checks verify (`rx::check_datagram`), once a second per VM ([`ReturnTokens`]).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use vnp_protocol::token::{Expiry, TokenFields, TokenMinter};
use vnp_protocol::wire::options::ReturnToken;
use vnp_protocol::wire::{VnpHeader, VnpRepr, HEADER_LEN};
use vnp_protocol::OUTSIDE;
use vnp_registry_client::api::TokenGrant;

/// Seconds between two return tokens to the same VM (a fresh one reaches vnpd within a second
/// of traffic; minting is one HMAC).
pub const RETURN_TOKEN_INTERVAL_SECS: u32 = 1;
/// Lifetime of a return token (vnpd caps learned tokens at this too).
pub const RETURN_TOKEN_TTL_SECS: u32 = 600;
/// Largest inner packet that carries a return token: the option then fits any network MTU of
/// at least 1280 bytes (a datagram that does not fit waits for a smaller one, an ACK).
pub const RETURN_TOKEN_MAX_INNER: usize = 1280 - ReturnToken::WIRE_LEN;
/// VMs remembered by [`ReturnTokens`] before stale entries are swept.
const RETURN_TOKENS_SWEEP_AT: usize = 4096;

/// What sending to one VM needs: where, and the VNP header to put in front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub to: SocketAddrV4,
    pub header: [u8; HEADER_LEN],
    pub expiry: Expiry,
}

impl Route {
    /// From a registry grant; `None` if the token is not 16 hex digits.
    pub fn from_grant(g: &TokenGrant) -> Option<Route> {
        let token = g.token.parse().ok()?;
        let repr = VnpRepr {
            network_id: g.network_id,
            token,
            expiry: Expiry(g.expiry),
            has_options: false,
        };
        Some(Route {
            to: SocketAddrV4::new(g.dst_host, g.dst_port),
            header: repr.to_bytes(),
            expiry: Expiry(g.expiry),
        })
    }

    /// Usable at `now` with at least `margin` seconds left.
    pub fn fresh(&self, now: u32, margin: u32) -> bool {
        self.expiry.is_never() || u64::from(self.expiry.0) > u64::from(now) + u64::from(margin)
    }
}

/// Routes by VM address.
#[derive(Debug, Default, Clone)]
pub struct TokenCache {
    routes: HashMap<Ipv4Addr, Route>,
}

impl TokenCache {
    /// The route to `vm` if it is fresh at `now`.
    pub fn get(&self, vm: Ipv4Addr, now: u32) -> Option<&Route> {
        self.routes.get(&vm).filter(|r| r.fresh(now, 0))
    }

    pub fn insert(&mut self, vm: Ipv4Addr, route: Route) {
        self.routes.insert(vm, route);
    }

    /// Forgets VMs not in `keep` (deleted, moved: their tokens name an old tuple).
    pub fn retain(&mut self, keep: impl Fn(Ipv4Addr, &Route) -> bool) {
        self.routes.retain(|ip, r| keep(*ip, r));
    }

    /// VMs whose route expires within `margin` seconds of `now` (to ask again).
    pub fn expiring(&self, now: u32, margin: u32) -> Vec<Ipv4Addr> {
        self.routes
            .iter()
            .filter(|(_, r)| !r.fresh(now, margin))
            .map(|(ip, _)| *ip)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// When each VM last got a return token from this gateway.
#[derive(Debug, Default, Clone)]
pub struct ReturnTokens {
    sent_at: HashMap<Ipv4Addr, u32>,
}

impl ReturnTokens {
    /// Whether a datagram to `vm` at `now` (Unix seconds) carries a return token; claims it.
    pub fn claim(&mut self, vm: Ipv4Addr, now: u32) -> bool {
        if let Some(&at) = self.sent_at.get(&vm) {
            if now.saturating_sub(at) < RETURN_TOKEN_INTERVAL_SECS {
                return false;
            }
        } else if self.sent_at.len() >= RETURN_TOKENS_SWEEP_AT {
            self.sent_at
                .retain(|_, at| now.saturating_sub(*at) < RETURN_TOKEN_TTL_SECS);
        }
        self.sent_at.insert(vm, now);
        true
    }
}

/// The token a VM at `route.to` with address `vm` uses to send to this gateway (at `local`,
/// secret behind `minter`): the fields the gateway's receive checks verify, expiring `ttl`
/// seconds after `now`.
pub fn return_token(
    minter: &TokenMinter,
    local: SocketAddrV4,
    route: &Route,
    vm: Ipv4Addr,
    network_id: u32,
    (now, ttl): (u32, u32),
) -> ReturnToken {
    let expiry = Expiry(now.saturating_add(ttl));
    let fields = TokenFields {
        src_host: *route.to.ip(),
        src_port: route.to.port(),
        src_vm: vm,
        dst_host: *local.ip(),
        dst_port: local.port(),
        dst_vm: OUTSIDE,
        network_id,
        expiry,
    };
    ReturnToken {
        token: minter.mint(&fields),
        expiry,
    }
}

/// `header` with its options flag set (the datagram carries a trailer).
pub fn with_options_flag(header: [u8; HEADER_LEN]) -> [u8; HEADER_LEN] {
    let mut repr = VnpRepr::parse(&VnpHeader::new_unchecked(&header[..]));
    repr.has_options = true;
    repr.to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vnp_protocol::token::VmSecret;

    fn grant(expiry: u32) -> TokenGrant {
        TokenGrant {
            dst_vm: Some("a".into()),
            dst_ip: Ipv4Addr::new(10, 1, 0, 2),
            dst_host: Ipv4Addr::new(198, 18, 0, 1),
            dst_port: 40000,
            token: "0011223344556677".into(),
            expiry,
            network_id: 7,
            src_host: Ipv4Addr::new(198, 18, 0, 9),
            src_port: 6081,
            src_ip: vnp_protocol::OUTSIDE,
        }
    }

    #[test]
    fn route_carries_the_granted_header() {
        let r = Route::from_grant(&grant(1000)).unwrap();
        assert_eq!(r.to, SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 40000));
        let h = VnpHeader::new_checked(&r.header[..]).unwrap();
        assert_eq!((h.network_id(), h.expiry()), (7, Expiry(1000)));
        assert_eq!(
            h.token().as_bytes(),
            &[0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77]
        );
        let mut bad = grant(1000);
        bad.token = "xyz".into();
        assert!(Route::from_grant(&bad).is_none());
    }

    #[test]
    fn cache_expiry() {
        let mut c = TokenCache::default();
        let a = Ipv4Addr::new(10, 1, 0, 2);
        c.insert(a, Route::from_grant(&grant(1000)).unwrap());
        assert!(c.get(a, 999).is_some());
        assert!(c.get(a, 1000).is_none());
        assert_eq!(c.expiring(900, 60), Vec::<Ipv4Addr>::new());
        assert_eq!(c.expiring(950, 60), vec![a]);
        c.insert(a, Route::from_grant(&grant(u32::MAX)).unwrap());
        assert!(c.get(a, u32::MAX - 1).is_some());
        c.retain(|_, _| false);
        assert!(c.is_empty());
    }

    #[test]
    fn return_token_is_what_the_gateway_accepts_back() {
        let secret = VmSecret::from_bytes([9; 32]);
        let minter = TokenMinter::new(&secret);
        let local = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 9), 6081);
        let route = Route::from_grant(&grant(u32::MAX)).unwrap();
        let vm = Ipv4Addr::new(10, 1, 0, 2);
        let now = 1_800_000_000;
        let rt = return_token(&minter, local, &route, vm, 7, (now, 600));
        assert_eq!(rt.expiry, Expiry(now + 600));
        // The gateway's receive checks verify exactly these fields for the VM's datagram.
        let ctx = crate::rx::RxContext {
            local,
            network_id: 7,
            network_cidr: "10.1.0.0/16".parse().unwrap(),
            expiry: crate::rx::ExpiryPolicy::default(),
        };
        let header = VnpRepr {
            network_id: 7,
            token: rt.token,
            expiry: rt.expiry,
            has_options: false,
        }
        .to_bytes();
        let mut datagram = header.to_vec();
        datagram.extend(udp_packet(vm, Ipv4Addr::new(203, 0, 113, 7)));
        let from = route.to;
        assert!(crate::rx::check_datagram(&ctx, &minter, &datagram, from, now).is_ok());
        // From another VM's host, or for another VM: refused.
        let other = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 3), 40000);
        assert!(crate::rx::check_datagram(&ctx, &minter, &datagram, other, now).is_err());
        let rt2 = return_token(
            &minter,
            local,
            &route,
            Ipv4Addr::new(10, 1, 0, 3),
            7,
            (now, 600),
        );
        assert_ne!(rt2.token, rt.token);
    }

    fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p[20..22].copy_from_slice(&5000u16.to_be_bytes());
        p[22..24].copy_from_slice(&53u16.to_be_bytes());
        p[24..26].copy_from_slice(&8u16.to_be_bytes());
        p
    }

    #[test]
    fn one_return_token_per_vm_and_second() {
        let mut r = ReturnTokens::default();
        let (a, b) = (Ipv4Addr::new(10, 1, 0, 2), Ipv4Addr::new(10, 1, 0, 3));
        assert!(r.claim(a, 100));
        assert!(!r.claim(a, 100));
        assert!(r.claim(b, 100));
        assert!(r.claim(a, 101));
        let h = with_options_flag(Route::from_grant(&grant(1000)).unwrap().header);
        let parsed = VnpHeader::new_checked(&h[..]).unwrap();
        assert!(parsed.has_options());
        assert_eq!(parsed.expiry(), Expiry(1000));
    }
}
