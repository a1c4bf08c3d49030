//! Tokens from the gateway towards VMs, as the registry granted them: one per VM (the outside
//! end is `OUTSIDE`, so a new outside peer costs nothing), kept until shortly before expiry.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use vnp_protocol::token::Expiry;
use vnp_protocol::wire::{VnpRepr, HEADER_LEN};
use vnp_registry_client::api::TokenGrant;

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

#[cfg(test)]
mod tests {
    use super::*;
    use vnp_protocol::wire::VnpHeader;

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
}
