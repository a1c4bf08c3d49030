//! Receive checks on a VNP datagram, in the patent's order (FIG. 6): framing, expiry (with skew,
//! and not too far in the future), destination VM hosted here, right network, token MAC in
//! constant time. Pure: the caller hands in the header bytes, a copy of the inner IPv4 header and
//! where the datagram came from.

use std::net::{Ipv4Addr, SocketAddrV4};

use vnp_protocol::token::{check_expiry, ExpiryError, Token, TokenFields, TokenMinter};
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

/// Expected tokens of one receive batch, so that the HMAC runs once per (pair, expiry) and
/// batch rather than once per datagram: the segments of a coalesced (GRO) receive, and most
/// datagrams of a batch, share every field the token covers. The datagram's token is still
/// compared with the expected one in constant time. Cleared at every batch, so a token never
/// outlives the batch it was computed for.
#[derive(Debug, Default)]
pub struct TokenCache {
    entries: [Option<(TokenFields, Token)>; TOKEN_CACHE_SLOTS],
    /// Where the next new entry goes (round robin).
    next: usize,
    /// HMACs computed since the cache was made (for tests and statistics).
    pub computed: u64,
}

/// Distinct (pair, expiry) a batch remembers: a worker mostly hears from a few peers at once.
const TOKEN_CACHE_SLOTS: usize = 4;

impl TokenCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets every token (a new batch starts).
    pub fn clear(&mut self) {
        self.entries = [None; TOKEN_CACHE_SLOTS];
        self.next = 0;
    }

    /// Whether `token` is the one `minter` gives for `fields`, in constant time; computes the
    /// HMAC only when this batch has not seen `fields` yet.
    pub fn verify(&mut self, minter: &TokenMinter, fields: &TokenFields, token: &Token) -> bool {
        let hit = self.entries.iter().flatten().find(|(f, _)| f == fields);
        let expected = match hit {
            Some((_, t)) => *t,
            None => {
                let t = minter.mint(fields);
                self.computed += 1;
                self.entries[self.next] = Some((*fields, t));
                self.next = (self.next + 1) % TOKEN_CACHE_SLOTS;
                t
            }
        };
        expected.ct_eq(token)
    }
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
    let datagram = Datagram {
        header,
        len: datagram_len,
        inner_prefix,
        src,
        prefix_len: 0,
    };
    check_datagram_cached(ctx, minter, &mut TokenCache::new(), &datagram, now)
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
    let (header, len, inner_prefix) = datagram;
    let datagram = Datagram {
        header,
        len,
        inner_prefix,
        src,
        prefix_len,
    };
    check_datagram_cached(ctx, minter, &mut TokenCache::new(), &datagram, now)
}

/// One received VNP datagram as the checks see it.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    /// Its fixed header.
    pub header: &'a [u8; HEADER_LEN],
    /// The UDP payload length.
    pub len: usize,
    /// The first bytes (at least 20 when available) of the inner packet.
    pub inner_prefix: &'a [u8],
    /// The UDP source (the kernel's `msg_name`).
    pub src: SocketAddrV4,
    /// Prefix length of the receiving VM's network: inner sources outside it are checked with
    /// the OUTSIDE rule (0: every source counts as inside).
    pub prefix_len: u8,
}

/// The checks with the batch's [`TokenCache`] (one HMAC per pair and expiry and batch).
pub fn check_datagram_cached(
    ctx: &RxContext,
    minter: &TokenMinter,
    tokens: &mut TokenCache,
    datagram: &Datagram<'_>,
    now: u32,
) -> Result<Accepted, DropReason> {
    let Datagram {
        header,
        len: datagram_len,
        inner_prefix,
        src,
        prefix_len,
    } = *datagram;
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
    if !tokens.verify(minter, &fields, &repr.token) {
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
    fn token_computed_once_per_pair_and_expiry_per_batch() {
        let e = NOW + 600;
        let minter = TokenMinter::new(&secret());
        let mut cache = TokenCache::new();
        let ip = inner(ctx().vm_ip, 100);
        let good = header(good_token(e), e, 7, false);
        let forged = header(Token::from_bytes([0; 8]), e, 7, false);
        let check = |cache: &mut TokenCache, h: &[u8; HEADER_LEN]| {
            let d = Datagram {
                header: h,
                len: 120,
                inner_prefix: &ip,
                src: src(),
                prefix_len: 0,
            };
            check_datagram_cached(&ctx(), &minter, cache, &d, NOW)
        };
        for _ in 0..5 {
            assert!(check(&mut cache, &good).is_ok());
        }
        // A forged token for the same fields is still refused (compared, not trusted).
        assert_eq!(check(&mut cache, &forged), Err(DropReason::RxBadToken));
        assert_eq!(cache.computed, 1, "one HMAC for six datagrams of one pair");
        // Another expiry is another token.
        let e2 = e + 1;
        assert!(check(&mut cache, &header(good_token(e2), e2, 7, false)).is_ok());
        assert_eq!(cache.computed, 2);
        // A new batch computes again.
        cache.clear();
        assert!(check(&mut cache, &good).is_ok());
        assert_eq!(cache.computed, 3);
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
