//! Datagrams come from the network: whatever the bytes, parsing returns a value or an error.

use proptest::prelude::*;
use vnp_protocol::wire::options::OptionsIter;
use vnp_protocol::wire::{VnpDatagram, VnpRepr, HEADER_LEN};

proptest! {
    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(d) = VnpDatagram::parse(&bytes) {
            // Whatever parsed accounts for every byte.
            prop_assert_eq!(HEADER_LEN + d.inner.len() + d.options.len(), bytes.len());
        }
        for _ in OptionsIter::new(&bytes) {}
    }

    #[test]
    fn header_with_random_tail(network_id: u32, token: [u8; 8], expiry: u32,
                               tail in proptest::collection::vec(any::<u8>(), 0..100)) {
        let repr = VnpRepr {
            network_id,
            token: vnp_protocol::token::Token::from_bytes(token),
            expiry: vnp_protocol::token::Expiry(expiry),
            has_options: true,
        };
        let mut bytes = repr.to_bytes().to_vec();
        bytes.extend_from_slice(&tail);
        if let Ok(d) = VnpDatagram::parse(&bytes) {
            prop_assert_eq!(d.header, repr);
        }
    }
}
