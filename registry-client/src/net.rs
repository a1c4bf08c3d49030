//! Small network value types used in the API: IPv4 CIDRs, MAC addresses, port ranges.
//!
//! All parsing is pure and strict: the registry refuses anything ambiguous instead of guessing.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Why a network value did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetParseError {
    #[error("invalid CIDR {0:?}: expected a.b.c.d/len")]
    CidrSyntax(String),
    #[error("invalid CIDR {0:?}: prefix length must be 8..=29 (room for a router and VMs)")]
    CidrPrefix(String),
    #[error("invalid CIDR {0:?}: host bits are set (did you mean {1}?)")]
    CidrHostBits(String, String),
    #[error("invalid MAC address {0:?}: expected six hex bytes like 02:00:00:00:00:01")]
    MacSyntax(String),
    #[error("invalid MAC address {0}: multicast MACs cannot be assigned to a VM")]
    MacMulticast(String),
    #[error("invalid port range {0:?}: expected FIRST-LAST with 1 <= FIRST <= LAST <= 65535")]
    PortRange(String),
}

/// An IPv4 network in CIDR notation, always stored in canonical form (host bits zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// Builds a CIDR; refuses host bits and prefixes that leave no room for VMs.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, NetParseError> {
        let text = format!("{addr}/{prefix}");
        if !(8..=29).contains(&prefix) {
            return Err(NetParseError::CidrPrefix(text));
        }
        let mask = Self::mask_for(prefix);
        let network = Ipv4Addr::from(u32::from(addr) & mask);
        if network != addr {
            return Err(NetParseError::CidrHostBits(
                text,
                format!("{network}/{prefix}"),
            ));
        }
        Ok(Self { network, prefix })
    }

    fn mask_for(prefix: u8) -> u32 {
        u32::MAX << (32 - u32::from(prefix))
    }

    /// The network address (all host bits zero).
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The broadcast address (all host bits one).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !Self::mask_for(self.prefix))
    }

    /// The first host address: the virtual router that vnpd impersonates for ARP and DHCP.
    pub fn router(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// True if `ip` lies inside this network (including network and broadcast addresses).
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask_for(self.prefix) == u32::from(self.network)
    }

    /// True if `ip` may be given to a VM: inside, and not network, broadcast or router.
    pub fn is_assignable(&self, ip: Ipv4Addr) -> bool {
        self.contains(ip) && ip != self.network && ip != self.broadcast() && ip != self.router()
    }

    /// Addresses a VM may get, in ascending order.
    pub fn assignable(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.router()) + 1;
        let last = u32::from(self.broadcast()) - 1;
        (first..=last).map(Ipv4Addr::from)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = NetParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || NetParseError::CidrSyntax(s.to_string());
        let (addr, prefix) = s.split_once('/').ok_or_else(syntax)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        if prefix.is_empty() || prefix.len() > 2 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
        Self::new(addr, prefix)
    }
}

/// A MAC address, written as six colon-separated hex bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// True for locally administered addresses (bit 1 of the first byte).
    pub fn is_local(&self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// True for group (multicast/broadcast) addresses, which no VM may own.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = NetParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || NetParseError::MacSyntax(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(syntax)?;
            if part.len() != 2 {
                return Err(syntax());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| syntax())?;
        }
        if parts.next().is_some() {
            return Err(syntax());
        }
        let mac = MacAddr(out);
        if mac.is_multicast() {
            return Err(NetParseError::MacMulticast(mac.to_string()));
        }
        Ok(mac)
    }
}

/// An inclusive range of UDP/TCP ports, written `FIRST-LAST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// Builds a range; `first` must be non-zero and not above `last`.
    pub fn new(first: u16, last: u16) -> Result<Self, NetParseError> {
        if first == 0 || first > last {
            return Err(NetParseError::PortRange(format!("{first}-{last}")));
        }
        Ok(Self { first, last })
    }

    /// Number of ports in the range.
    pub fn len(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    /// Never true for a valid range; present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// True if `port` is inside the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// True if the two ranges share at least one port.
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for PortRange {
    type Err = NetParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetParseError::PortRange(s.to_string());
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let first: u16 = a.trim().parse().map_err(|_| bad())?;
        let last: u16 = b.trim().parse().map_err(|_| bad())?;
        Self::new(first, last).map_err(|_| bad())
    }
}

macro_rules! serde_via_string {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_via_string!(Ipv4Cidr);
serde_via_string!(MacAddr);
serde_via_string!(PortRange);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parses_and_reserves_router() {
        let c: Ipv4Cidr = "10.1.0.0/24".parse().unwrap();
        assert_eq!(c.router(), Ipv4Addr::new(10, 1, 0, 1));
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 1, 0, 255));
        assert!(!c.is_assignable(Ipv4Addr::new(10, 1, 0, 0)));
        assert!(!c.is_assignable(Ipv4Addr::new(10, 1, 0, 1)));
        assert!(!c.is_assignable(Ipv4Addr::new(10, 1, 0, 255)));
        assert!(c.is_assignable(Ipv4Addr::new(10, 1, 0, 2)));
        assert!(!c.contains(Ipv4Addr::new(10, 1, 1, 2)));
        assert_eq!(c.assignable().next(), Some(Ipv4Addr::new(10, 1, 0, 2)));
        assert_eq!(c.assignable().count(), 253);
        assert_eq!(c.to_string(), "10.1.0.0/24");
    }

    #[test]
    fn cidr_rejects_bad_input() {
        assert!(matches!(
            "10.1.0.5/24".parse::<Ipv4Cidr>(),
            Err(NetParseError::CidrHostBits(..))
        ));
        assert!(matches!(
            "10.1.0.0/30".parse::<Ipv4Cidr>(),
            Err(NetParseError::CidrPrefix(_))
        ));
        assert!(matches!(
            "10.1.0.0/4".parse::<Ipv4Cidr>(),
            Err(NetParseError::CidrPrefix(_))
        ));
        for bad in [
            "10.1.0.0",
            "10.1.0.0/",
            "10.1.0.0/+4",
            "10.1.0/24",
            "x/24",
            "10.1.0.0/024",
        ] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn mac_round_trips_and_rejects_multicast() {
        let m: MacAddr = "02:00:0a:01:00:02".parse().unwrap();
        assert!(m.is_local());
        assert_eq!(m.to_string(), "02:00:0a:01:00:02");
        assert!("01:00:5e:00:00:01".parse::<MacAddr>().is_err());
        assert!("02:00:0a:01:00".parse::<MacAddr>().is_err());
        assert!("02:00:0a:01:00:02:03".parse::<MacAddr>().is_err());
        assert!("02:00:0a:01:00:2".parse::<MacAddr>().is_err());
    }

    #[test]
    fn port_ranges() {
        let r: PortRange = "40000-40009".parse().unwrap();
        assert_eq!(r.len(), 10);
        assert!(r.contains(40009) && !r.contains(40010));
        assert!(r.overlaps(&PortRange::new(40009, 50000).unwrap()));
        assert!(!r.overlaps(&PortRange::new(40010, 50000).unwrap()));
        assert!("5-4".parse::<PortRange>().is_err());
        assert!("0-4".parse::<PortRange>().is_err());
        assert!("4".parse::<PortRange>().is_err());
    }
}
