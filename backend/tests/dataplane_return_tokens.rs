//! Planted return tokens, through real `VmPort`s on loopback (issue 8, item 4).
//!
//! The token authenticates the pair and the expiry, not the options, so an on-path attacker can
//! replay a captured datagram with a return-token option of its own (a random token, a far
//! expiry). vnpd must not let that option replace the registry's token for the reverse
//! direction, and must not trust a learned token for longer than the return-token lifetime.
//!
//! The attacker here sends from the peer's own underlay address (a port whose VM stopped, so
//! the test can bind it), exactly what a spoofing attacker on the path produces; the same
//! socket then receives what the victim sends back, so the test reads the token it used.

mod dataplane_common;
// Shared fixture: this test uses part of it.
#[allow(unused_imports)]
mod dataplane_frontend;

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use dataplane_common::*;
use dataplane_frontend::{ethernet, TestFrontend};
use vnp_protocol::token::{Expiry, Token, VmSecret};
use vnp_protocol::wire::options::ReturnToken;
use vnp_protocol::wire::VnpDatagram;
use vnpd::datapath::port::RETURN_TOKEN_TTL_SECS;
use vnpd::edge::ROUTER_MAC;

const T: Duration = Duration::from_secs(5);

/// Stops `vm`'s port and binds its UDP address: the attacker's (and the observer's) socket.
fn take_over(vm: Vm) -> UdpSocket {
    let addr = vm.port.udp_addr();
    let port = Arc::try_unwrap(vm.port).expect("only the test holds the port");
    port.stop();
    let socket = UdpSocket::bind(addr).expect("the stopped port's UDP address");
    socket.set_read_timeout(Some(T)).unwrap();
    socket
}

/// A datagram from `from` (VM `src`) that passes `to`'s checks, carrying a planted return
/// token: random bytes, an expiry as far ahead as the receiver accepts.
fn with_planted_option(
    from: SocketAddrV4,
    src: Ipv4Addr,
    to: &Vm,
    to_addr: SocketAddrV4,
) -> Vec<u8> {
    let e = Expiry(now() + 300);
    let token = token_for(from, src, to_addr, to.ip, &to.secret, NETWORK, e);
    let planted = ReturnToken {
        token: Token::from_bytes([0xee; 8]),
        expiry: Expiry(now() + 3000),
    };
    datagram(
        NETWORK,
        token,
        e,
        &ipv4_udp(src, to.ip, b"replayed"),
        Some(planted),
    )
}

/// The VNP header of the next datagram `socket` receives.
fn next_header(socket: &UdpSocket) -> (Token, Expiry) {
    let mut buf = [0u8; 2048];
    let n = socket.recv(&mut buf).expect("a datagram from the victim");
    let d = VnpDatagram::parse(&buf[..n]).expect("a VNP datagram");
    (d.header.token, d.header.expiry)
}

#[test]
fn a_planted_return_token_does_not_replace_the_registry_token() {
    let control = MintingControl::new();
    let a = start_vm(&control, "ta", 2, 1);
    let b = start_vm(&control, "tb", 3, 1);
    let mut fa = TestFrontend::connect(&a.socket, 1);
    let mut fb = TestFrontend::connect(&b.socket, 1);
    fa.post_rx(0, 8, 2048);
    fb.post_rx(0, 8, 2048);
    // B asks the "registry" for B->A and sends: B now holds a registry-minted token.
    let hello = ipv4_udp(b.ip, a.ip, b"hello");
    fb.send(0, &ethernet(ROUTER_MAC, b.mac, 0x0800, &hello));
    assert_eq!(fa.recv(0, 1, T).len(), 1, "A got B's first packet");
    let (a_addr, b_addr, a_ip, a_secret) = (
        a.port.udp_addr(),
        b.port.udp_addr(),
        a.ip,
        VmSecret::from_bytes(*a.secret.as_bytes()),
    );
    drop(fa);
    let attacker = take_over(a);

    attacker
        .send_to(&with_planted_option(a_addr, a_ip, &b, b_addr), b_addr)
        .unwrap();
    assert_eq!(
        fb.recv(0, 1, T).len(),
        1,
        "the replayed datagram passes the checks"
    );
    assert_eq!(b.port.counters().snapshot().return_tokens_learned, 0);

    // B's next packet to A still carries a token A's secret verifies.
    fb.send(
        0,
        &ethernet(ROUTER_MAC, b.mac, 0x0800, &ipv4_udp(b.ip, a_ip, b"after")),
    );
    let (token, expiry) = next_header(&attacker);
    assert_ne!(token, Token::from_bytes([0xee; 8]), "planted token used");
    let expected = token_for(b_addr, b.ip, a_addr, a_ip, &a_secret, NETWORK, expiry);
    assert_eq!(
        token, expected,
        "B no longer sends with the registry's token"
    );
}

#[test]
fn a_learned_return_token_expires_within_the_return_token_lifetime() {
    let control = MintingControl::new();
    let a = start_vm(&control, "ua", 2, 1);
    let b = start_vm(&control, "ub", 3, 1);
    let mut fb = TestFrontend::connect(&b.socket, 1);
    fb.post_rx(0, 8, 2048);
    let (a_addr, b_addr, a_ip) = (a.port.udp_addr(), b.port.udp_addr(), a.ip);
    let attacker = take_over(a);

    // B has no token for A: the option is taken, but only for the return-token lifetime.
    let before = now();
    attacker
        .send_to(&with_planted_option(a_addr, a_ip, &b, b_addr), b_addr)
        .unwrap();
    assert_eq!(fb.recv(0, 1, T).len(), 1);
    assert_eq!(b.port.counters().snapshot().return_tokens_learned, 1);
    fb.send(
        0,
        &ethernet(ROUTER_MAC, b.mac, 0x0800, &ipv4_udp(b.ip, a_ip, b"reply")),
    );
    let (token, expiry) = next_header(&attacker);
    assert_eq!(
        token,
        Token::from_bytes([0xee; 8]),
        "the learned token is used"
    );
    let cap = now() + RETURN_TOKEN_TTL_SECS;
    assert!(
        expiry.0 >= before + RETURN_TOKEN_TTL_SECS && expiry.0 <= cap,
        "learned expiry {} not capped at {cap}",
        expiry.0
    );
    assert_eq!(
        control.requests.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}
