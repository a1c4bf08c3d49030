//! Receive checks on a VNP datagram, in the patent's order (FIG. 6): framing, expiry (with skew,
//! and not too far in the future), destination VM hosted here, right network, token MAC in
//! constant time. Pure: the caller hands in the header bytes, a copy of the inner IPv4 header and
//! where the datagram came from.

use std::net::{Ipv4Addr, SocketAddrV4};

use vnp_protocol::token::{check_expiry, ExpiryError, TokenFields, TokenMinter};
use vnp_protocol::wire::ipv4;
use vnp_protocol::wire::options::{OptionsIter, ReturnToken, VnpOption};
use vnp_protocol::wire::{VnpHeader, VnpRepr, HEADER_LEN};

use crate::metrics::counters::DropReason;
use crate::nat::OUTSIDE;

/// Smallest inner IPv4 header.
pub const MIN_INNER: usize = ipv4::MIN_HEADER_LEN;

/// Clock tolerance of the expiry check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiryPolicy {
    /// Allowed clock difference between hosts, seconds.
    pub skew_secs: u32,
    /// Longest token lifetime the registry mints, seconds.
    pub max_ttl_secs: u32,
    /// Accept tokens that never expire (`Expiry::NEVER`).
    pub allow_never: bool,
}

impl Default for ExpiryPolicy {
    fn default() -> Self {
        Self {
            skew_secs: 5,
            max_ttl_secs: 3600,
            allow_never: false,
        }
    }
}

/// What the receiving port knows about itself.
#[derive(Debug, Clone, Copy)]
pub struct RxContext {
    /// The VM this port serves (`IP_VM_b`).
    pub vm_ip: Ipv4Addr,
    /// Its network id.
    pub network_id: u32,
    /// Our underlay address and port (`Phys_IP_b`, `Phys_Port_b`).
    pub local: SocketAddrV4,
    /// Expiry tolerance.
    pub expiry: ExpiryPolicy,
}

/// A datagram that passed every check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// Inner packet length.
    pub inner_len: usize,
    /// Sending VM (`IP_VM_a`).
    pub src_vm: Ipv4Addr,
    /// Bytes of options after the inner packet.
    pub options_len: usize,
    /// The header.
    pub header: VnpRepr,
}

/// Runs every check. `datagram_len` is the UDP payload length, `inner_prefix` a copy of the
/// first bytes (at least 20 when available) of the inner packet, `src` the UDP source. Every
/// source address counts as inside the network (no OUTSIDE rule); see
/// [`check_datagram_in_network`].
pub fn check_datagram(
    ctx: &RxContext,
    minter: &TokenMinter,
    header: &[u8; HEADER_LEN],
    datagram_len: usize,
    inner_prefix: &[u8],
    src: SocketAddrV4,
    now: u32,
) -> Result<Accepted, DropReason> {
    let datagram = (header, datagram_len, inner_prefix);
    check_datagram_in_network(ctx, 0, minter, datagram, src, now)
}

/// [`check_datagram`] for a VM whose network has prefix length `prefix_len`, with the OUTSIDE
/// rule of gateway-scoped tokens (`docs/protocol.md`): an inner source outside the network can
/// only come from a gateway, whose tokens carry `0.0.0.0` as the outside end's address, so the
/// token is checked with [`OUTSIDE`] as `IP_VM_a` (and [`Accepted::src_vm`] is `OUTSIDE`).
/// `datagram` is the header, the UDP payload length and the inner packet's first bytes.
pub fn check_datagram_in_network(
    ctx: &RxContext,
    prefix_len: u8,
    minter: &TokenMinter,
    datagram: (&[u8; HEADER_LEN], usize, &[u8]),
    src: SocketAddrV4,
    now: u32,
) -> Result<Accepted, DropReason> {
    let (header, datagram_len, inner_prefix) = datagram;
    // Framing.
    if datagram_len < HEADER_LEN + MIN_INNER || inner_prefix.len() < MIN_INNER {
        return Err(DropReason::RxTruncated);
    }
    let header = VnpHeader::new_checked(&header[..]).map_err(|_| DropReason::RxMalformed)?;
    let repr = VnpRepr::parse(&header);
    // The copy may hold only the fixed 20 bytes of a header with options: every field read
    // here lies in them, so the view is checked by hand rather than with `new_checked` (which
    // wants the options too).
    let ip = ipv4::Packet::new_unchecked(inner_prefix);
    let total_len = ip.total_len();
    if ip.version() != 4 || ip.header_len() < MIN_INNER || total_len < ip.header_len() {
        return Err(DropReason::RxMalformed);
    }
    let available = datagram_len - HEADER_LEN;
    ip.check_len(available)
        .map_err(|_| DropReason::RxTruncated)?;
    let options_len = available - total_len;
    if repr.has_options != (options_len > 0) {
        return Err(DropReason::RxMalformed);
    }
    // Step 604/606: expiry, allowing skew, not beyond what the registry mints.
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
    // Step 608: the destination VM is the one hosted behind this port.
    let (src_vm, dst_vm) = (ip.src_addr(), ip.dst_addr());
    let src_vm = if crate::nat::in_network(ctx.vm_ip, prefix_len, src_vm) {
        src_vm
    } else {
        OUTSIDE
    };
    if dst_vm != ctx.vm_ip {
        return Err(DropReason::RxWrongVm);
    }
    if repr.network_id != ctx.network_id {
        return Err(DropReason::RxWrongNetwork);
    }
    // Step 610/612: the MAC, constant time.
    let fields = TokenFields {
        src_host: *src.ip(),
        src_port: src.port(),
        src_vm,
        dst_host: *ctx.local.ip(),
        dst_port: ctx.local.port(),
        dst_vm,
        network_id: repr.network_id,
        expiry: repr.expiry,
    };
    if !minter.verify(&fields, &repr.token) {
        return Err(DropReason::RxBadToken);
    }
    Ok(Accepted {
        inner_len: total_len,
        src_vm,
        options_len,
        header: repr,
    })
}

/// Parses the option TLVs of an accepted datagram; returns its return token if it carries one.
/// Malformed options (overrun, unknown must-understand type) drop the datagram.
pub fn parse_options(options: &[u8]) -> Result<Option<ReturnToken>, DropReason> {
    let mut found = None;
    for opt in OptionsIter::new(options) {
        match opt.map_err(|_| DropReason::RxMalformed)? {
            VnpOption::ReturnToken(rt) if found.is_none() => found = Some(rt),
            _ => {}
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vnp_protocol::token::{mint, Expiry, Token, VmSecret};

    const NOW: u32 = 1_800_000_000;

    fn secret() -> VmSecret {
        VmSecret::from_bytes([0x42; 32])
    }

    fn ctx() -> RxContext {
        RxContext {
            vm_ip: Ipv4Addr::new(10, 0, 0, 3),
            network_id: 7,
            local: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 40002),
            expiry: ExpiryPolicy::default(),
        }
    }

    fn src() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 40001)
    }

    fn inner(dst: Ipv4Addr, len: u16) -> [u8; 20] {
        let mut ip = [0u8; 20];
        let mut view = ipv4::Packet::new_unchecked(&mut ip[..]);
        view.set_version_and_header_len(20);
        view.set_total_len(len);
        view.set_src_addr(Ipv4Addr::new(10, 0, 0, 2));
        view.set_dst_addr(dst);
        ip
    }

    fn header(token: Token, expiry: u32, network_id: u32, opts: bool) -> [u8; HEADER_LEN] {
        VnpRepr {
            network_id,
            token,
            expiry: Expiry(expiry),
            has_options: opts,
        }
        .to_bytes()
    }

    fn good_token(expiry: u32) -> Token {
        mint(
            &secret(),
            &TokenFields {
                src_host: *src().ip(),
                src_port: src().port(),
                src_vm: Ipv4Addr::new(10, 0, 0, 2),
                dst_host: *ctx().local.ip(),
                dst_port: ctx().local.port(),
                dst_vm: ctx().vm_ip,
                network_id: 7,
                expiry: Expiry(expiry),
            },
        )
    }

    fn run(
        h: [u8; HEADER_LEN],
        len: usize,
        ip: &[u8],
        from: SocketAddrV4,
    ) -> Result<Accepted, DropReason> {
        check_datagram(&ctx(), &TokenMinter::new(&secret()), &h, len, ip, from, NOW)
    }

    #[test]
    fn accepts_valid() {
        let e = NOW + 600;
        let a = run(
            header(good_token(e), e, 7, false),
            20 + 100,
            &inner(ctx().vm_ip, 100),
            src(),
        )
        .unwrap();
        assert_eq!((a.inner_len, a.options_len), (100, 0));
        assert_eq!(a.src_vm, Ipv4Addr::new(10, 0, 0, 2));
    }

    #[test]
    fn rejects_in_order() {
        let e = NOW + 600;
        let ok_ip = inner(ctx().vm_ip, 100);
        assert_eq!(
            run(header(good_token(e), e, 7, false), 30, &ok_ip, src()),
            Err(DropReason::RxTruncated)
        );
        let mut bad_version = header(good_token(e), e, 7, false);
        bad_version[0] = 2;
        assert_eq!(
            run(bad_version, 120, &ok_ip, src()),
            Err(DropReason::RxMalformed)
        );
        // trailing bytes without the options flag
        assert_eq!(
            run(header(good_token(e), e, 7, false), 130, &ok_ip, src()),
            Err(DropReason::RxMalformed)
        );
        // expired beyond skew, with a valid MAC: expiry is checked first
        let old = NOW - 10;
        assert_eq!(
            run(header(good_token(old), old, 7, false), 120, &ok_ip, src()),
            Err(DropReason::RxExpired)
        );
        let far = NOW + 7200;
        assert_eq!(
            run(header(good_token(far), far, 7, false), 120, &ok_ip, src()),
            Err(DropReason::RxExpiryTooFar)
        );
        assert_eq!(
            run(
                header(good_token(u32::MAX), u32::MAX, 7, false),
                120,
                &ok_ip,
                src()
            ),
            Err(DropReason::RxExpiryTooFar)
        );
        // within skew: accepted
        let recent = NOW - 3;
        assert!(run(
            header(good_token(recent), recent, 7, false),
            120,
            &ok_ip,
            src()
        )
        .is_ok());
        assert_eq!(
            run(
                header(good_token(e), e, 7, false),
                120,
                &inner(Ipv4Addr::new(10, 0, 0, 9), 100),
                src()
            ),
            Err(DropReason::RxWrongVm)
        );
        assert_eq!(
            run(header(good_token(e), e, 8, false), 120, &ok_ip, src()),
            Err(DropReason::RxWrongNetwork)
        );
        assert_eq!(
            run(
                header(Token::from_bytes([0; 8]), e, 7, false),
                120,
                &ok_ip,
                src()
            ),
            Err(DropReason::RxBadToken)
        );
        // Right token, but sent from another host/port: the MAC covers the underlay source.
        let other = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 66), 40001);
        assert_eq!(
            run(header(good_token(e), e, 7, false), 120, &ok_ip, other),
            Err(DropReason::RxBadToken)
        );
        // Token minted with another network id but header altered: MAC fails.
        assert_eq!(
            run(header(good_token(e), e + 1, 7, false), 120, &ok_ip, src()),
            Err(DropReason::RxBadToken)
        );
    }

    #[test]
    fn options() {
        let e = NOW + 600;
        let a = run(
            header(good_token(e), e, 7, true),
            20 + 100 + 14,
            &inner(ctx().vm_ip, 100),
            src(),
        )
        .unwrap();
        assert_eq!(a.options_len, 14);
        let rt = ReturnToken {
            token: Token::from_bytes([9; 8]),
            expiry: Expiry(e),
        };
        let mut buf = [0u8; 14];
        rt.emit(&mut buf).unwrap();
        assert_eq!(parse_options(&buf), Ok(Some(rt)));
        assert_eq!(parse_options(&buf[..5]), Err(DropReason::RxMalformed));
        assert_eq!(parse_options(&[0x85, 0]), Err(DropReason::RxMalformed));
        assert_eq!(parse_options(&[0x05, 1, 0]), Ok(None));
        // options flag set but nothing follows
        assert_eq!(
            run(
                header(good_token(e), e, 7, true),
                120,
                &inner(ctx().vm_ip, 100),
                src()
            ),
            Err(DropReason::RxMalformed)
        );
    }

    /// The OUTSIDE rule: a datagram whose inner source is outside the VM's network verifies
    /// only with a token over `0.0.0.0` (a gateway's), and only when the network is known.
    #[test]
    fn outside_sources_are_checked_with_the_outside_wildcard() {
        let outside = Ipv4Addr::new(203, 0, 113, 5);
        let token_for = |src_vm| {
            mint(
                &secret(),
                &TokenFields {
                    src_host: *src().ip(),
                    src_port: src().port(),
                    src_vm,
                    dst_host: *ctx().local.ip(),
                    dst_port: ctx().local.port(),
                    dst_vm: ctx().vm_ip,
                    network_id: 7,
                    expiry: Expiry(NOW + 60),
                },
            )
        };
        let mut ip = inner(ctx().vm_ip, 20);
        ipv4::Packet::new_unchecked(&mut ip[..]).set_src_addr(outside);
        let check = |token, prefix_len| {
            let h = header(token, NOW + 60, 7, false);
            let minter = TokenMinter::new(&secret());
            check_datagram_in_network(&ctx(), prefix_len, &minter, (&h, 40, &ip[..]), src(), NOW)
        };
        let accepted = check(token_for(OUTSIDE), 24).expect("gateway token accepted");
        assert_eq!(accepted.src_vm, OUTSIDE);
        // A token naming the outside address itself is not a gateway's: refused.
        assert_eq!(check(token_for(outside), 24), Err(DropReason::RxBadToken));
        // Without the network (the old check), the wildcard does not apply.
        assert_eq!(check(token_for(OUTSIDE), 0), Err(DropReason::RxBadToken));
        // An inside source keeps its own address in the token.
        let inside = inner(ctx().vm_ip, 20);
        let h = header(good_token(NOW + 60), NOW + 60, 7, false);
        let minter = TokenMinter::new(&secret());
        let ok = check_datagram_in_network(&ctx(), 24, &minter, (&h, 40, &inside[..]), src(), NOW);
        assert_eq!(ok.map(|a| a.src_vm), Ok(Ipv4Addr::new(10, 0, 0, 2)));
    }
}
