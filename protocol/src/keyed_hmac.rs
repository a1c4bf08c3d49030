//! HMAC-SHA256 with the key schedule done once, for messages that fit one SHA-256 block.
//!
//! HMAC(K, m) = SHA256((K ^ opad) | SHA256((K ^ ipad) | m)). With a 32-byte key, `K ^ ipad` and
//! `K ^ opad` are one 64-byte block each, so the state after compressing them (the *inner* and
//! *outer* states) can be kept and every MAC costs two compressions. Those two states are
//! key-equivalent: whoever holds them mints tokens. The `hmac`/`sha2` crates keep them in
//! types that are not zeroized on drop, so this module keeps them itself, in [`KeyedSha256`],
//! which zeroizes them (and every block that held key material) when dropped.
//!
//! What remains outside our control: copies the compression function makes of the state in its
//! own stack frame while it runs, and copies the compiler makes when a value is moved. The
//! first are overwritten by the next call on the same thread; neither is reachable from safe
//! code. The digests this module returns are MAC outputs, not key material.

use sha2::compress256;
use sha2::digest::generic_array::GenericArray;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// SHA-256 initial hash value (FIPS 180-4, 5.3.3).
const IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];
const BLOCK: usize = 64;
/// Longest message that fits one block with SHA-256's padding (0x80 and a 64-bit length).
pub(crate) const MAX_MESSAGE: usize = BLOCK - 9;
/// HMAC's key length limit without hashing the key first (we only take 32-byte keys).
const KEY_LEN: usize = 32;

/// The keyed HMAC-SHA256 state: key-equivalent, zeroized on drop, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
#[repr(C)]
pub(crate) struct KeyedSha256 {
    inner: [u32; 8],
    outer: [u32; 8],
}

impl std::fmt::Debug for KeyedSha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyedSha256(<redacted>)")
    }
}

/// One SHA-256 compression of `block` into `state`.
fn compress(state: &mut [u32; 8], block: &[u8; BLOCK]) {
    // `from_slice` borrows the block in place: no copy of key material is left behind.
    compress256(state, std::slice::from_ref(GenericArray::from_slice(block)));
}

/// The state after compressing `key ^ pad` (the key padded with zeros to a block).
fn keyed_state(key: &[u8; KEY_LEN], pad: u8) -> [u32; 8] {
    let mut block = [pad; BLOCK];
    for (b, k) in block.iter_mut().zip(key) {
        *b ^= k;
    }
    let mut state = IV;
    compress(&mut state, &block);
    block.zeroize();
    state
}

/// Finishes SHA-256 of (one already compressed block) | `message`, from `state`.
fn finish(state: &[u32; 8], message: &[u8]) -> [u8; 32] {
    debug_assert!(message.len() <= MAX_MESSAGE);
    let mut block = [0u8; BLOCK];
    block[..message.len()].copy_from_slice(message);
    block[message.len()] = 0x80;
    let bits = ((BLOCK + message.len()) as u64) * 8;
    block[BLOCK - 8..].copy_from_slice(&bits.to_be_bytes());
    let mut digest_state = *state;
    compress(&mut digest_state, &block);
    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(digest_state) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

impl KeyedSha256 {
    /// Runs the key schedule for a 32-byte key.
    pub(crate) fn new(key: &[u8; KEY_LEN]) -> Self {
        Self {
            inner: keyed_state(key, 0x36),
            outer: keyed_state(key, 0x5c),
        }
    }

    /// HMAC-SHA256 of a message of at most [`MAX_MESSAGE`] bytes: two compressions.
    pub(crate) fn mac(&self, message: &[u8]) -> [u8; 32] {
        assert!(
            message.len() <= MAX_MESSAGE,
            "KeyedSha256 takes one-block messages"
        );
        let inner = finish(&self.inner, message);
        finish(&self.outer, &inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};
    use proptest::prelude::*;
    use std::mem::MaybeUninit;

    fn reference(key: &[u8], message: &[u8]) -> [u8; 32] {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
        mac.update(message);
        mac.finalize().into_bytes().into()
    }

    #[test]
    fn rfc4231_case_2_style_and_edge_lengths_match_the_hmac_crate() {
        let key = [0x0b; 32];
        for len in [0, 1, 28, 32, MAX_MESSAGE] {
            let message: Vec<u8> = (0..len as u8).collect();
            assert_eq!(
                KeyedSha256::new(&key).mac(&message),
                reference(&key, &message),
                "length {len}"
            );
        }
    }

    proptest! {
        #[test]
        fn matches_the_hmac_crate(key in any::<[u8; 32]>(), message in proptest::collection::vec(any::<u8>(), 0..=MAX_MESSAGE)) {
            prop_assert_eq!(KeyedSha256::new(&key).mac(&message), reference(&key, &message));
        }
    }

    #[test]
    fn debug_does_not_print_the_state() {
        let keyed = KeyedSha256::new(&[0x42; 32]);
        let text = format!("{keyed:?}");
        assert_eq!(text, "KeyedSha256(<redacted>)");
    }

    #[test]
    fn drop_zeroizes_both_states() {
        let mut slot = MaybeUninit::new(KeyedSha256::new(&[0x42; 32]));
        // SAFETY: `slot` was initialised just above.
        let before = unsafe { slot.assume_init_ref() }.clone();
        assert!(before.inner.iter().chain(&before.outer).any(|w| *w != 0));
        // SAFETY: `slot` holds an initialised value that is dropped exactly once, here; the
        // memory stays ours (MaybeUninit never drops), so it can be read as plain words below.
        unsafe { slot.as_mut_ptr().drop_in_place() };
        // SAFETY: the struct is two `[u32; 8]`, every bit pattern of which is valid, and the
        // bytes are still allocated in `slot`; drop only wrote zeros into them.
        let after: [u32; 16] = unsafe { std::ptr::read(slot.as_ptr().cast::<[u32; 16]>()) };
        assert_eq!(after, [0; 16], "keyed state left in memory after drop");
    }

    #[test]
    #[should_panic(expected = "one-block messages")]
    fn longer_messages_are_refused() {
        KeyedSha256::new(&[1; 32]).mac(&[0; MAX_MESSAGE + 1]);
    }
}
