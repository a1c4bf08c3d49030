//! The VNP datagram target: the framing parser ([`VnpDatagram::parse`]), the receive checks
//! (`vnpd::datapath::rx_check::check_datagram`, the patent's FIG. 6) and the option TLVs.
//!
//! Input: a mode byte, then a UDP payload as it would arrive on a VM's port. Random bytes never
//! carry a valid 64-bit MAC, so the mode byte can make the input authentic first:
//! - bit 0 ([`FORGE_TOKEN`]): overwrite the token with one minted by [`SECRET`] over the fields
//!   the datagram claims (as a host holding the secret would), so the MAC check passes and the
//!   options are parsed;
//! - bit 1 ([`FIX_HEADER`]): also make version, reserved bits, network id, inner destination and
//!   expiry acceptable, so the check reaches the MAC at all;
//! - bit 2 ([`FIX_FLAGS`]): set the options flag exactly when bytes follow the inner packet.
//!
//! Invariants asserted: an accepted datagram's parts add up to its length; the receive path's
//! option parse and the protocol crate's agree.

use std::net::{Ipv4Addr, SocketAddrV4};

use vnp_protocol::token::{Expiry, TokenFields, TokenMinter, VmSecret};
use vnp_protocol::wire::options::{find_return_token, OptionsIter};
use vnp_protocol::wire::{ipv4, split_trailer, VnpDatagram, VnpHeader, HEADER_LEN};
use vnpd::datapath::rx_check::{check_datagram, parse_options, ExpiryPolicy, RxContext};

/// Mode bit: mint a valid token over the datagram's fields.
pub const FORGE_TOKEN: u8 = 0x01;
/// Mode bit: make the header fields the checks compare acceptable.
pub const FIX_HEADER: u8 = 0x02;
/// Mode bit: set the options flag to match the trailer.
pub const FIX_FLAGS: u8 = 0x04;

/// The receiving VM's secret (a fixed test value).
pub const SECRET: [u8; 32] = [0x5a; 32];
/// "Now" for the expiry check.
pub const NOW: u32 = 1_800_000_000;
/// Network id of the receiving VM.
pub const NETWORK_ID: u32 = 7;
/// The receiving VM's address.
pub const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
/// The receiving port's underlay address.
pub const LOCAL: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 40002);
/// The sender's underlay address.
pub const SOURCE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 40001);

/// The receiving port's context.
pub fn context() -> RxContext {
    RxContext {
        vm_ip: VM_IP,
        network_id: NETWORK_ID,
        local: LOCAL,
        expiry: ExpiryPolicy::default(),
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let (mode, payload) = crate::split_mode(data);
    let minter = TokenMinter::new(&VmSecret::from_bytes(SECRET));
    let mut payload = payload.to_vec();
    if payload.len() >= HEADER_LEN + ipv4::MIN_HEADER_LEN {
        assist(mode, &mut payload, &minter);
    }
    let framed = VnpDatagram::parse(&payload);
    if let Ok(d) = &framed {
        assert_eq!(HEADER_LEN + d.inner.len() + d.options.len(), payload.len());
        // The protocol crate's trailer check already passed: the options are well formed.
        assert!(split_trailer(d.header.has_options, d.options).is_ok());
    }
    receive(&payload, &minter);
}

/// The receive path as vnpd's worker runs it: header and the first inner bytes copied, then
/// the checks, then the options of an accepted datagram.
fn receive(payload: &[u8], minter: &TokenMinter) {
    let Some(header) = payload.first_chunk::<HEADER_LEN>() else {
        return;
    };
    let rest = &payload[HEADER_LEN..];
    let prefix = &rest[..rest.len().min(ipv4::MIN_HEADER_LEN)];
    let Ok(acc) = check_datagram(
        &context(),
        minter,
        header,
        payload.len(),
        prefix,
        SOURCE,
        NOW,
    ) else {
        return;
    };
    assert_eq!(HEADER_LEN + acc.inner_len + acc.options_len, payload.len());
    assert_eq!(acc.header.has_options, acc.options_len > 0);
    let options = &rest[acc.inner_len..];
    match parse_options(options) {
        Ok(rt) => {
            assert!(OptionsIter::new(options).all(|o| o.is_ok()));
            assert_eq!(rt, find_return_token(options));
        }
        Err(_) => assert!(OptionsIter::new(options).any(|o| o.is_err())),
    }
}

/// Rewrites the header per the mode bits (see the module documentation).
fn assist(mode: u8, payload: &mut [u8], minter: &TokenMinter) {
    let inner_start = HEADER_LEN;
    if mode & FIX_HEADER != 0 {
        payload[0] = vnp_protocol::wire::VERSION;
        payload[1] &= vnp_protocol::wire::KNOWN_FLAGS;
        payload[2..4].fill(0);
        payload[4..8].copy_from_slice(&NETWORK_ID.to_be_bytes());
        // An expiry inside the accepted window: now - skew ..= now + max ttl.
        let offset = u32::from_be_bytes([payload[16], payload[17], payload[18], payload[19]]);
        let expiry = NOW - 5 + offset % 3600;
        payload[16..20].copy_from_slice(&expiry.to_be_bytes());
        let mut ip = ipv4::Packet::new_unchecked(&mut payload[inner_start..]);
        ip.set_dst_addr(VM_IP);
    }
    if mode & FIX_FLAGS != 0 {
        let ip = ipv4::Packet::new_unchecked(&payload[inner_start..]);
        let trailer = payload.len() > inner_start + ip.total_len();
        payload[1] = (payload[1] & !vnp_protocol::wire::FLAG_OPTIONS) | u8::from(trailer);
    }
    if mode & FORGE_TOKEN != 0 {
        let header = VnpHeader::new_unchecked(&payload[..HEADER_LEN]);
        let (network_id, expiry) = (header.network_id(), header.expiry());
        let ip = ipv4::Packet::new_unchecked(&payload[inner_start..]);
        let fields = TokenFields {
            src_host: *SOURCE.ip(),
            src_port: SOURCE.port(),
            src_vm: ip.src_addr(),
            dst_host: *LOCAL.ip(),
            dst_port: LOCAL.port(),
            dst_vm: ip.dst_addr(),
            network_id,
            expiry: Expiry(expiry.0),
        };
        let token = minter.mint(&fields);
        payload[8..16].copy_from_slice(token.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forging mode is what gets random inputs past the MAC: without it a seed datagram is
    /// refused for its token, with it the same bytes are accepted.
    #[test]
    fn forged_tokens_pass_the_mac_check() {
        let seeds = crate::seeds::all();
        let datagram = |name: &str| {
            let seed = seeds
                .iter()
                .find(|s| s.0 == "vnp_datagram" && s.1 == name)
                .expect("seed");
            seed.2[1..].to_vec()
        };
        let minter = TokenMinter::new(&VmSecret::from_bytes(SECRET));
        let check = |payload: &[u8]| {
            let header = payload.first_chunk::<HEADER_LEN>().expect("header");
            let prefix = &payload[HEADER_LEN..HEADER_LEN + 20];
            check_datagram(
                &context(),
                &minter,
                header,
                payload.len(),
                prefix,
                SOURCE,
                NOW,
            )
        };
        let plain = datagram("return-token-0");
        assert_eq!(
            check(&plain),
            Err(vnpd::metrics::counters::DropReason::RxBadToken)
        );
        let mut forged = plain.clone();
        assist(FORGE_TOKEN, &mut forged, &minter);
        let accepted = check(&forged).expect("forged token accepted");
        assert_eq!(accepted.options_len, 14);
        // Fixing the header gets a datagram for another VM and network to the MAC check.
        let mut foreign = plain;
        foreign[4..8].copy_from_slice(&99u32.to_be_bytes());
        foreign[HEADER_LEN + 16..HEADER_LEN + 20].copy_from_slice(&[10, 9, 9, 9]);
        assist(FIX_HEADER | FORGE_TOKEN, &mut foreign, &minter);
        assert!(check(&foreign).is_ok());
    }
}
