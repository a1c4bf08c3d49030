//! A bounded cache of token grants with refresh-ahead, for vnpd's control thread.
//!
//! Pure data structure: the caller supplies `now` (Unix seconds) and does the fetching, so the
//! data path can consult the cache without ever blocking on the registry.

use crate::api::{TokenGrant, VmChange};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use vnp_protocol::token::{Expiry, Token, TokenFields};

/// Why a grant could not be turned into protocol values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("registry sent a malformed token {0:?}")]
pub struct BadToken(pub String);

impl TokenGrant {
    /// The 64-bit token.
    pub fn token_value(&self) -> Result<Token, BadToken> {
        self.token.parse().map_err(|_| BadToken(self.token.clone()))
    }

    /// The exact fields the token was minted over (what the receiver will recompute).
    pub fn fields(&self) -> TokenFields {
        TokenFields {
            src_host: self.src_host,
            src_port: self.src_port,
            src_vm: self.src_ip,
            dst_host: self.dst_host,
            dst_port: self.dst_port,
            dst_vm: self.dst_ip,
            network_id: self.network_id,
            expiry: Expiry(self.expiry),
        }
    }
}

/// Cache key: a unidirectional pair as vnpd sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PairKey {
    pub src_vm: String,
    pub dst_ip: Ipv4Addr,
}

#[derive(Debug, Clone)]
struct Entry {
    grant: TokenGrant,
    fetched_at: u32,
}

/// Bounded token cache. When full, inserting evicts the entry that expires soonest.
#[derive(Debug, Clone)]
pub struct TokenCache {
    entries: HashMap<PairKey, Entry>,
    capacity: usize,
    refresh_fraction: f32,
}

impl TokenCache {
    /// A cache holding at most `capacity` grants (at least 1); refreshes when less than 20 % of
    /// a grant's lifetime is left.
    pub fn new(capacity: usize) -> TokenCache {
        TokenCache {
            entries: HashMap::new(),
            capacity: capacity.max(1),
            refresh_fraction: 0.2,
        }
    }

    /// Changes the refresh-ahead point (fraction of lifetime left, clamped to 0..=1).
    pub fn with_refresh_fraction(mut self, fraction: f32) -> TokenCache {
        self.refresh_fraction = fraction.clamp(0.0, 1.0);
        self
    }

    /// Number of cached grants.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A usable (not yet expired at `now`) grant for the pair.
    pub fn get(&self, src_vm: &str, dst_ip: Ipv4Addr, now: u32) -> Option<&TokenGrant> {
        let key = PairKey {
            src_vm: src_vm.to_string(),
            dst_ip,
        };
        self.entries
            .get(&key)
            .map(|e| &e.grant)
            .filter(|g| g.expiry == u32::MAX || g.expiry > now)
    }

    /// Stores a grant fetched at `now` for `src_vm`.
    pub fn insert(&mut self, src_vm: &str, grant: TokenGrant, now: u32) {
        let key = PairKey {
            src_vm: src_vm.to_string(),
            dst_ip: grant.dst_ip,
        };
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            self.evict_one();
        }
        self.entries.insert(
            key,
            Entry {
                grant,
                fetched_at: now,
            },
        );
    }

    fn evict_one(&mut self) {
        let victim = self
            .entries
            .iter()
            .min_by_key(|(_, e)| e.grant.expiry)
            .map(|(k, _)| k.clone());
        if let Some(k) = victim {
            self.entries.remove(&k);
        }
    }

    /// Pairs whose grant is expired or inside its refresh-ahead window at `now`.
    pub fn needs_refresh(&self, now: u32) -> Vec<PairKey> {
        self.entries
            .iter()
            .filter(|(_, e)| {
                if e.grant.expiry == u32::MAX {
                    return false;
                }
                let lifetime = e.grant.expiry.saturating_sub(e.fetched_at) as f32;
                let left = e.grant.expiry.saturating_sub(now) as f32;
                left <= lifetime * self.refresh_fraction
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Drops expired grants; returns how many.
    pub fn purge_expired(&mut self, now: u32) -> usize {
        let before = self.entries.len();
        self.entries
            .retain(|_, e| e.grant.expiry == u32::MAX || e.grant.expiry > now);
        before - self.entries.len()
    }

    /// Forgets every grant to or from `vm` (its endpoint or secret changed, so they are stale).
    pub fn invalidate_vm(&mut self, vm: &str) -> usize {
        let before = self.entries.len();
        self.entries
            .retain(|k, e| k.src_vm != vm && e.grant.dst_vm.as_deref() != Some(vm));
        before - self.entries.len()
    }

    /// Applies a watch result: invalidates grants touching any changed VM.
    pub fn apply_changes(&mut self, changes: &[VmChange]) -> usize {
        changes.iter().map(|c| self.invalidate_vm(&c.vm)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ChangeKind, VmChange};

    fn grant(dst_vm: &str, last_octet: u8, expiry: u32) -> TokenGrant {
        TokenGrant {
            dst_vm: Some(dst_vm.into()),
            dst_ip: Ipv4Addr::new(10, 1, 0, last_octet),
            dst_host: Ipv4Addr::new(198, 18, 0, 2),
            dst_port: 40000,
            token: "0011223344556677".into(),
            expiry,
            network_id: 7,
            src_host: Ipv4Addr::new(198, 18, 0, 1),
            src_port: 40001,
            src_ip: Ipv4Addr::new(10, 1, 0, 2),
        }
    }

    #[test]
    fn get_respects_expiry() {
        let mut c = TokenCache::new(4);
        c.insert("a", grant("b", 3, 1000), 400);
        assert!(c.get("a", Ipv4Addr::new(10, 1, 0, 3), 999).is_some());
        assert!(c.get("a", Ipv4Addr::new(10, 1, 0, 3), 1000).is_none());
        assert!(c.get("x", Ipv4Addr::new(10, 1, 0, 3), 10).is_none());
        assert_eq!(c.purge_expired(1000), 1);
        assert!(c.is_empty());
    }

    #[test]
    fn refresh_ahead_at_twenty_percent() {
        let mut c = TokenCache::new(4);
        c.insert("a", grant("b", 3, 1000), 0);
        assert!(c.needs_refresh(799).is_empty());
        assert_eq!(c.needs_refresh(800).len(), 1);
        c.insert("a", grant("c", 4, u32::MAX), 0);
        assert_eq!(
            c.needs_refresh(5000).len(),
            1,
            "never-expiring grants are not refreshed"
        );
    }

    #[test]
    fn bounded_evicts_soonest_expiry() {
        let mut c = TokenCache::new(2);
        c.insert("a", grant("b", 3, 500), 0);
        c.insert("a", grant("c", 4, 900), 0);
        c.insert("a", grant("d", 5, 700), 0);
        assert_eq!(c.len(), 2);
        assert!(c.get("a", Ipv4Addr::new(10, 1, 0, 3), 1).is_none());
        assert!(c.get("a", Ipv4Addr::new(10, 1, 0, 4), 1).is_some());
    }

    #[test]
    fn endpoint_change_invalidates_both_directions() {
        let mut c = TokenCache::new(8);
        c.insert("a", grant("b", 3, 500), 0);
        c.insert("b", grant("a", 2, 500), 0);
        c.insert("a", grant("c", 4, 500), 0);
        let change = VmChange {
            generation: 5,
            vm: "b".into(),
            kind: ChangeKind::Endpoint,
            host: None,
            endpoint: None,
            secret_generation: 1,
        };
        assert_eq!(c.apply_changes(&[change]), 2);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn grant_converts_to_protocol_fields() {
        let g = grant("b", 3, 500);
        assert_eq!(g.token_value().unwrap().to_string(), "0011223344556677");
        let f = g.fields();
        assert_eq!(f.dst_vm, Ipv4Addr::new(10, 1, 0, 3));
        assert_eq!(f.expiry, Expiry(500));
        let mut bad = g.clone();
        bad.token = "zz".into();
        assert!(bad.token_value().is_err());
    }
}
