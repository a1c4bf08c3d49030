//! The gateway's receive checks on a VNP datagram from a VM's host: the checks of
//! `docs/protocol.md` (*Receive checks*) in the same order as vnpd's, built from the protocol
//! crate, with the gateway's own secret and tuple and [`OUTSIDE`] for `IP_VM_b` (*Tokens with a
//! gateway*). Pure: the caller passes the clock.

use crate::DropReason;
use std::net::{Ipv4Addr, SocketAddrV4};
use vnp_protocol::token::{check_expiry, ExpiryError, TokenFields, TokenMinter};
use vnp_protocol::wire::{ipv4, split_trailer, VnpHeader, VnpRepr, HEADER_LEN};
use vnp_protocol::OUTSIDE;
use vnp_registry_client::net::Ipv4Cidr;

/// How far token expiries are trusted (vnpd's `token_clock_skew_secs`, `token_max_ttl_secs`,
/// `accept_never_expiring_tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiryPolicy {
    pub skew_secs: u32,
    pub max_ttl_secs: u32,
    pub allow_never: bool,
}

impl Default for ExpiryPolicy {
    fn default() -> Self {
        ExpiryPolicy {
            skew_secs: 5,
            max_ttl_secs: 3600,
            allow_never: false,
        }
    }
}

/// Who this gateway is on the VNP side.
#[derive(Debug, Clone, Copy)]
pub struct RxContext {
    /// The gateway's own VNP address (`Phys_IP_gw`, `Port_gw`).
    pub local: SocketAddrV4,
    pub network_id: u32,
    pub network_cidr: Ipv4Cidr,
    pub expiry: ExpiryPolicy,
}

/// Checks `datagram` (a whole VNP payload) from `src`; returns the inner packet's range.
pub fn check_datagram(
    ctx: &RxContext,
    minter: &TokenMinter,
    datagram: &[u8],
    src: SocketAddrV4,
    now: u32,
) -> Result<std::ops::Range<usize>, DropReason> {
    let header = VnpHeader::new_checked(datagram).map_err(|e| match e {
        vnp_protocol::wire::WireError::Truncated => DropReason::RxTruncated,
        _ => DropReason::RxMalformed,
    })?;
    let repr = VnpRepr::parse(&header);
    let rest = &datagram[HEADER_LEN..];
    let ip = ipv4::Packet::new_checked(rest).map_err(|e| match e {
        vnp_protocol::wire::WireError::Truncated => DropReason::RxTruncated,
        _ => DropReason::RxMalformed,
    })?;
    ip.check_len(rest.len())
        .map_err(|_| DropReason::RxTruncated)?;
    let total = ip.total_len();
    split_trailer(repr.has_options, &rest[total..]).map_err(|_| DropReason::RxMalformed)?;
    check_expiry(
        repr.expiry,
        now,
        ctx.expiry.skew_secs,
        ctx.expiry.max_ttl_secs,
        ctx.expiry.allow_never,
    )
    .map_err(|e| match e {
        ExpiryError::Expired => DropReason::RxExpired,
        ExpiryError::TooFarInFuture => DropReason::RxExpiryTooFar,
    })?;
    // A gateway serves only outside destinations: VM-to-VM traffic never passes it, so its
    // token must not open a way to another VM.
    if ctx.network_cidr.contains(ip.dst_addr()) {
        return Err(DropReason::InsideDestination);
    }
    if repr.network_id != ctx.network_id {
        return Err(DropReason::RxWrongNetwork);
    }
    let fields = TokenFields {
        src_host: *src.ip(),
        src_port: src.port(),
        src_vm: ip.src_addr(),
        dst_host: *ctx.local.ip(),
        dst_port: ctx.local.port(),
        dst_vm: OUTSIDE,
        network_id: repr.network_id,
        expiry: repr.expiry,
    };
    if !minter.verify(&fields, &repr.token) {
        return Err(DropReason::RxBadToken);
    }
    Ok(HEADER_LEN..HEADER_LEN + total)
}

/// An accepted inner packet that is not a health check's answer must not go to the gateway's
/// own address (`local`): NATed, it would reach this host's kernel and services from the
/// public address, and the kernel's answer would look like one of its health checks.
pub fn check_not_own_address(local: Ipv4Addr, inner: &[u8]) -> Result<(), DropReason> {
    match ipv4::Packet::new_checked(inner) {
        Ok(ip) if ip.dst_addr() == local => Err(DropReason::OwnAddress),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use vnp_protocol::token::{mint, Expiry, VmSecret};

    const NOW: u32 = 1_800_000_000;

    fn ctx() -> RxContext {
        RxContext {
            local: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 9), 6081),
            network_id: 7,
            network_cidr: "10.1.0.0/24".parse().unwrap(),
            expiry: ExpiryPolicy::default(),
        }
    }

    fn host() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 40000)
    }

    /// A datagram from VM 10.1.0.2 on `host()` to `dst`, with a token for `fields_dst`.
    fn datagram(secret: &VmSecret, dst: Ipv4Addr, expiry: u32, network_id: u32) -> Vec<u8> {
        let fields = TokenFields {
            src_host: *host().ip(),
            src_port: host().port(),
            src_vm: Ipv4Addr::new(10, 1, 0, 2),
            dst_host: Ipv4Addr::new(198, 18, 0, 9),
            dst_port: 6081,
            dst_vm: OUTSIDE,
            network_id,
            expiry: Expiry(expiry),
        };
        let repr = VnpRepr {
            network_id,
            token: mint(secret, &fields),
            expiry: Expiry(expiry),
            has_options: false,
        };
        let mut out = repr.to_bytes().to_vec();
        out.extend_from_slice(&crate::translate::tests::udp_packet(
            Ipv4Addr::new(10, 1, 0, 2),
            dst,
            1030,
            53,
        ));
        out
    }

    #[test]
    fn accepts_a_good_datagram_for_any_outside_destination() {
        let s = VmSecret::from_bytes([9; 32]);
        let m = TokenMinter::new(&s);
        for dst in [Ipv4Addr::new(203, 0, 113, 10), Ipv4Addr::new(8, 8, 8, 8)] {
            let d = datagram(&s, dst, NOW + 60, 7);
            let r = check_datagram(&ctx(), &m, &d, host(), NOW).unwrap();
            assert_eq!(r, HEADER_LEN..d.len());
        }
    }

    #[test]
    fn drops_by_reason() {
        let s = VmSecret::from_bytes([9; 32]);
        let m = TokenMinter::new(&s);
        let out = Ipv4Addr::new(203, 0, 113, 10);
        let check = |d: &[u8], src| check_datagram(&ctx(), &m, d, src, NOW).unwrap_err();
        let forged = datagram(&VmSecret::from_bytes([1; 32]), out, NOW + 60, 7);
        assert_eq!(check(&forged, host()), DropReason::RxBadToken);
        let expired = datagram(&s, out, NOW - 60, 7);
        assert_eq!(check(&expired, host()), DropReason::RxExpired);
        let far = datagram(&s, out, NOW + 100_000, 7);
        assert_eq!(check(&far, host()), DropReason::RxExpiryTooFar);
        let other_net = datagram(&s, out, NOW + 60, 8);
        assert_eq!(check(&other_net, host()), DropReason::RxWrongNetwork);
        let inside = datagram(&s, Ipv4Addr::new(10, 1, 0, 3), NOW + 60, 7);
        assert_eq!(check(&inside, host()), DropReason::InsideDestination);
        // Another host replaying a's header: the outer source is in the token.
        let good = datagram(&s, out, NOW + 60, 7);
        let elsewhere = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 5), 40000);
        assert_eq!(check(&good, elsewhere), DropReason::RxBadToken);
        assert_eq!(check(&good[..30], host()), DropReason::RxTruncated);
        let mut opts = good.clone();
        opts[1] = 1;
        assert_eq!(check(&opts, host()), DropReason::RxMalformed);
        let mut v2 = good;
        v2[0] = 2;
        assert_eq!(check(&v2, host()), DropReason::RxMalformed);
    }

    #[test]
    fn only_packets_to_the_gateway_itself_are_its_own_address() {
        let own = *ctx().local.ip();
        let to =
            |dst| crate::translate::tests::udp_packet(Ipv4Addr::new(10, 1, 0, 2), dst, 1030, 53);
        assert_eq!(
            check_not_own_address(own, &to(own)),
            Err(DropReason::OwnAddress)
        );
        let elsewhere = Ipv4Addr::new(203, 0, 113, 10);
        assert_eq!(check_not_own_address(own, &to(elsewhere)), Ok(()));
    }
}
