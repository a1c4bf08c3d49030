//! Test vectors, the same ones `docs/protocol.md` publishes. The expected tokens were computed
//! with an independent HMAC implementation (Python's `hmac` module); the unit tests below check
//! this crate against them, so the document, the registry and vnpd cannot drift apart.

use std::net::Ipv4Addr;

use crate::token::{Expiry, TokenFields};

/// One token vector: secret, fields, the MAC input they serialize to, and the token.
#[derive(Debug, Clone, Copy)]
pub struct TokenVector {
    /// Destination VM's secret.
    pub secret: [u8; 32],
    /// The fields the token covers.
    pub fields: TokenFields,
    /// `fields.to_bytes()` in hexadecimal.
    pub mac_input_hex: &'static str,
    /// The expected token in hexadecimal.
    pub token_hex: &'static str,
}

const fn sequential_secret() -> [u8; 32] {
    let mut s = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        s[i] = i as u8;
        i += 1;
    }
    s
}

/// Host A 198.18.0.1 port 40001 runs VM 10.1.0.2; host B 198.18.0.2 port 40002 runs VM 10.1.0.3;
/// network 7.
pub const TOKEN_VECTORS: [TokenVector; 3] = [
    // 1: A -> B, minted with S_b = 00 01 02 .. 1f, expiring at 1 800 000 000 (2027-01-15).
    TokenVector {
        secret: sequential_secret(),
        fields: TokenFields {
            src_host: Ipv4Addr::new(198, 18, 0, 1),
            src_port: 40001,
            src_vm: Ipv4Addr::new(10, 1, 0, 2),
            dst_host: Ipv4Addr::new(198, 18, 0, 2),
            dst_port: 40002,
            dst_vm: Ipv4Addr::new(10, 1, 0, 3),
            network_id: 7,
            expiry: Expiry(1_800_000_000),
        },
        mac_input_hex: "c61200019c410a010002c61200029c420a010003000000076b49d200",
        token_hex: "ffd7d0c34cc51981",
    },
    // 2: B -> A (a return token), minted with S_a = ff .. ff, never expiring.
    TokenVector {
        secret: [0xff; 32],
        fields: TokenFields {
            src_host: Ipv4Addr::new(198, 18, 0, 2),
            src_port: 40002,
            src_vm: Ipv4Addr::new(10, 1, 0, 3),
            dst_host: Ipv4Addr::new(198, 18, 0, 1),
            dst_port: 40001,
            dst_vm: Ipv4Addr::new(10, 1, 0, 2),
            network_id: 7,
            expiry: Expiry::NEVER,
        },
        mac_input_hex: "c61200029c420a010003c61200019c410a01000200000007ffffffff",
        token_hex: "c9e8b9311fd44746",
    },
    // 3: extremes of every field, S = 5a .. 5a.
    TokenVector {
        secret: [0x5a; 32],
        fields: TokenFields {
            src_host: Ipv4Addr::new(0, 0, 0, 0),
            src_port: 0,
            src_vm: Ipv4Addr::new(255, 255, 255, 255),
            dst_host: Ipv4Addr::new(255, 255, 255, 255),
            dst_port: 65535,
            dst_vm: Ipv4Addr::new(0, 0, 0, 0),
            network_id: u32::MAX,
            expiry: Expiry(0),
        },
        mac_input_hex: "000000000000ffffffffffffffffffff00000000ffffffff00000000",
        token_hex: "0734685cfd75cb5d",
    },
];

/// A whole VNP datagram (UDP payload) from VM 10.1.0.2 on host A to VM 10.1.0.3 on host B:
/// header with vector 1's token, a 28-byte ICMP echo request, and a return-token option carrying
/// vector 2's token.
pub const DATAGRAM_HEX: &str = concat!(
    "01010000",                                                 // version 1, options, reserved
    "00000007",                                                 // network id 7
    "ffd7d0c34cc51981",                                         // token (vector 1)
    "6b49d200",                                                 // expiry 1 800 000 000
    "4500001c12344000400114a70a0100020a0100030800f7fe00010000", // ICMP echo 10.1.0.2 -> .3
    "010c",                                                     // option 1, 12 bytes
    "c9e8b9311fd44746",                                         // return token (vector 2)
    "ffffffff",                                                 // never expires
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hex;
    use crate::token::{mint, TokenMinter, VmSecret};
    use crate::wire::ipv4;
    use crate::wire::options::{find_return_token, ReturnToken};
    use crate::wire::{VnpDatagram, VnpRepr, HEADER_LEN};

    #[test]
    fn token_vectors_match() {
        for (i, v) in TOKEN_VECTORS.iter().enumerate() {
            assert_eq!(
                hex::encode(&v.fields.to_bytes()),
                v.mac_input_hex,
                "vector {}",
                i + 1
            );
            let secret = VmSecret::from_bytes(v.secret);
            let token = mint(&secret, &v.fields);
            assert_eq!(token.to_string(), v.token_hex, "vector {}", i + 1);
            assert!(TokenMinter::new(&secret).verify(&v.fields, &token));
        }
    }

    #[test]
    fn datagram_vector_parses_and_rebuilds() {
        let bytes = hex::decode::<62>(DATAGRAM_HEX).expect("hex");
        let d = VnpDatagram::parse(&bytes).expect("valid datagram");
        let v1 = &TOKEN_VECTORS[0];
        assert_eq!(d.header.network_id, v1.fields.network_id);
        assert_eq!(d.header.token.to_string(), v1.token_hex);
        assert_eq!(d.header.expiry, v1.fields.expiry);
        let inner = ipv4::Packet::new_checked(d.inner).expect("ipv4");
        assert_eq!(inner.src_addr(), v1.fields.src_vm);
        assert_eq!(inner.dst_addr(), v1.fields.dst_vm);
        assert!(inner.verify_checksum());
        let rt = find_return_token(d.options).expect("return token");
        assert_eq!(rt.token.to_string(), TOKEN_VECTORS[1].token_hex);
        assert_eq!(rt.expiry, TOKEN_VECTORS[1].fields.expiry);

        // Rebuild from parts.
        let mut out = Vec::new();
        out.extend_from_slice(
            &VnpRepr {
                has_options: true,
                ..d.header
            }
            .to_bytes(),
        );
        out.extend_from_slice(d.inner);
        let mut opt = [0u8; ReturnToken::WIRE_LEN];
        rt.emit(&mut opt).expect("room");
        out.extend_from_slice(&opt);
        assert_eq!(out, bytes);
        assert_eq!(out.len(), HEADER_LEN + 28 + ReturnToken::WIRE_LEN);
    }
}
