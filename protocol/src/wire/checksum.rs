//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624): the only
//! implementation in vnp. IPv4, ICMP, UDP and TCP all use it.
//!
//! The checksum of a header is the ones' complement of the ones' complement sum of its 16-bit
//! words. [`sum`] gives the (folded, not complemented) sum of a byte slice, [`combine`] adds
//! partial sums (for a pseudo header plus a payload, or a payload spread over buffers),
//! [`pseudo_header`] is the UDP/TCP pseudo-header sum, [`checksum`] the complemented result of
//! one slice. A receiver verifies by summing the header *with* its checksum field: the result
//! is `0xffff` (so [`checksum`] of it is 0).
//!
//! NAT changes a few fields of a packet whose checksum is already right; [`update_u16`] and
//! [`update_u32`] recompute it from the old checksum and the changed field alone, with eqn. 3 of
//! RFC 1624 (`HC' = ~(~HC + ~m + m')`). Unlike RFC 1141's eqn. 2 it agrees with a full
//! recompute where the two ones' complement zeros differ (RFC 1624's example: 0x0000, where
//! eqn. 2 gives 0xffff), for any data with a nonzero word that does not change (every IPv4, UDP
//! and TCP header).

use std::net::Ipv4Addr;

/// Folds a wide accumulator of 16-bit words into 16 bits with end-around carry.
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The ones' complement sum of `data` as big-endian 16-bit words, folded (not complemented).
/// An odd last byte is padded with a zero byte on the right, as RFC 1071 specifies.
///
/// Eight bytes at a time, in native byte order (RFC 1071 section 2: the sum is independent of
/// byte order up to a final swap), the two 32-bit halves of each 64-bit load added to a 64-bit
/// accumulator (2^16 = 1 modulo 0xffff, so wider words fold to the same sum): this runs over
/// every byte vnpd checksums in bulk (TSO segments, coalesced receive).
pub fn sum(data: &[u8]) -> u16 {
    let mut acc: u64 = 0;
    let mut quads = data.chunks_exact(8);
    for q in &mut quads {
        let v = u64::from_ne_bytes([q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7]]);
        acc += (v & 0xffff_ffff) + (v >> 32);
    }
    let mut words = quads.remainder().chunks_exact(2);
    for word in &mut words {
        acc += u64::from(u16::from_ne_bytes([word[0], word[1]]));
    }
    if let [last] = words.remainder() {
        // Padded with a zero byte on the right in network order.
        acc += u64::from(u16::from_ne_bytes([*last, 0]));
    }
    u16::from_be(fold(acc))
}

/// Adds partial sums (from [`sum`] of even-length pieces, or [`pseudo_header`]).
pub fn combine(sums: &[u16]) -> u16 {
    fold(sums.iter().map(|s| u64::from(*s)).sum())
}

/// The sum of the IPv4 pseudo header UDP and TCP checksums cover: source and destination
/// address, zero, protocol number and the transport length (header and payload).
pub fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, length: u16) -> u16 {
    let mut bytes = [0u8; 12];
    bytes[0..4].copy_from_slice(&src.octets());
    bytes[4..8].copy_from_slice(&dst.octets());
    bytes[9] = protocol;
    bytes[10..12].copy_from_slice(&length.to_be_bytes());
    sum(&bytes)
}

/// The Internet checksum of `data`: the complement of [`sum`]. Over a header that includes a
/// correct checksum field it is 0.
pub fn checksum(data: &[u8]) -> u16 {
    !sum(data)
}

/// The checksum after one 16-bit word of the covered data changed from `old` to `new`, given the
/// checksum `hc` before (RFC 1624 eqn. 3).
pub fn update_u16(hc: u16, old: u16, new: u16) -> u16 {
    !fold(u64::from(!hc) + u64::from(!old) + u64::from(new))
}

/// The checksum after an aligned 32-bit field (an IPv4 address) changed from `old` to `new`:
/// eqn. 3 applied to both of its words at once.
pub fn update_u32(hc: u16, old: u32, new: u32) -> u16 {
    let words = |v: u32| [(v >> 16) as u16, v as u16];
    let [old_hi, old_lo] = words(old);
    let [new_hi, new_lo] = words(new);
    !fold(
        u64::from(!hc)
            + u64::from(!old_hi)
            + u64::from(!old_lo)
            + u64::from(new_hi)
            + u64::from(new_lo),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 1071's definition, one big-endian word at a time.
    fn reference_sum(data: &[u8]) -> u16 {
        let mut acc: u64 = 0;
        for w in data.chunks(2) {
            acc += u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
        fold(acc)
    }

    #[test]
    fn wide_sum_agrees_with_the_word_by_word_definition() {
        // Every length and start offset (alignment) up to 80 bytes, pseudo-random bytes, and
        // the all-0xff and all-zero cases (the two zeros of ones' complement).
        let mut x: u32 = 0x1234_5678;
        let bytes: Vec<u8> = (0..200)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 24) as u8
            })
            .collect();
        for data in [bytes, vec![0xff; 200], vec![0; 200]] {
            for start in 0..8 {
                for len in 0..80 {
                    let d = &data[start..start + len];
                    assert_eq!(sum(d), reference_sum(d), "start {start} len {len}");
                }
            }
        }
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(sum(&data), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
        // Splitting at an even boundary and combining does not change it.
        assert_eq!(combine(&[sum(&data[..4]), sum(&data[4..])]), 0xddf2);
        // An odd tail is padded on the right.
        assert_eq!(sum(&[0xab]), 0xab00);
        assert_eq!(checksum(&[]), 0xffff);
    }

    #[test]
    fn ipv4_header_verifies_to_zero() {
        // A real header (from RFC 1071-style worked examples): 4500 0073 0000 4000 4011 ....
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        let c = checksum(&h);
        assert_eq!(c, 0xb861);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&h), 0);
    }

    #[test]
    fn pseudo_header_matches_its_bytes() {
        let src = Ipv4Addr::new(10, 0, 0, 1);
        let dst = Ipv4Addr::new(10, 0, 0, 2);
        let bytes = [10, 0, 0, 1, 10, 0, 0, 2, 0, 17, 0, 13];
        assert_eq!(pseudo_header(src, dst, 17, 13), sum(&bytes));
    }

    #[test]
    fn rfc1624_example() {
        // RFC 1624 section 4: HC = 0xdd2f, m = 0x5555 -> m' = 0x3285. Eqn. 3 gives 0x0000 (eqn.
        // 2 of RFC 1141 wrongly gives 0xffff).
        assert_eq!(update_u16(0xdd2f, 0x5555, 0x3285), 0x0000);
    }

    #[test]
    fn address_rewrite_updates_like_a_recompute() {
        let mut h = [
            0x45, 0x00, 0x00, 0x54, 0x12, 0x34, 0x40, 0x00, 0x40, 0x01, 0x00, 0x00, 10, 1, 0, 2,
            10, 1, 0, 3,
        ];
        let before = checksum(&h);
        let old = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let new = u32::from(Ipv4Addr::new(203, 0, 113, 7));
        h[12..16].copy_from_slice(&new.to_be_bytes());
        assert_eq!(update_u32(before, old, new), checksum(&h));
    }

    proptest! {
        /// For data with a word that does not change and is not zero (true of every IPv4, UDP
        /// and TCP header: version/IHL, or the ports/length), the incremental update equals a
        /// full recompute, including the ones' complement zero cases.
        #[test]
        fn incremental_equals_recompute(
            words in proptest::collection::vec(any::<u16>(), 2..40),
            anchor in 1u16..,
            at in any::<usize>(),
            new16 in any::<u16>(),
            new32 in any::<u32>(),
        ) {
            let mut data: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
            data[0..2].copy_from_slice(&anchor.to_be_bytes());
            let before = checksum(&data);
            // One 16-bit word (not the anchor).
            let i = 2 * (1 + at % (words.len() - 1));
            let old16 = u16::from_be_bytes([data[i], data[i + 1]]);
            let mut changed = data.clone();
            changed[i..i + 2].copy_from_slice(&new16.to_be_bytes());
            prop_assert_eq!(update_u16(before, old16, new16), checksum(&changed));
            // One aligned 32-bit field (not overlapping the anchor), when there is room.
            if words.len() >= 3 {
                let j = 2 * (1 + at % (words.len() - 2));
                let old32 = u32::from_be_bytes([data[j], data[j + 1], data[j + 2], data[j + 3]]);
                let mut changed = data.clone();
                changed[j..j + 4].copy_from_slice(&new32.to_be_bytes());
                prop_assert_eq!(update_u32(before, old32, new32), checksum(&changed));
            }
        }

        #[test]
        fn split_sums_combine(data in proptest::collection::vec(any::<u8>(), 0..200), cut in any::<usize>()) {
            let cut = (cut % (data.len() + 1)) & !1; // even boundary
            prop_assert_eq!(combine(&[sum(&data[..cut]), sum(&data[cut..])]), sum(&data));
        }
    }
}
