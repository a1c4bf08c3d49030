//! Per-pair tokens: who may send to whom, checked by the receiving host without asking anyone.
//!
//! The registry mints `T_a_b` for a source VM `a` and a destination VM `b` with `b`'s secret
//! `S_b`; only the registry and the host running `b` know `S_b`. The receiving host recomputes
//! the token from the packet's addresses and compares (see the patent's FIG. 6 and
//! `docs/protocol.md`):
//!
//! ```text
//! T_a_b = first 64 bits of HMAC-SHA256(S_b, Phys_IP_a | Phys_Port_a | IP_VM_a
//!                                          | Phys_IP_b | Phys_Port_b | IP_VM_b
//!                                          | network_id | expiry)
//! ```
//!
//! Every field has a fixed size and is written in network byte order, so the concatenation
//! needs no separators and is unambiguous.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use subtle::ConstantTimeEq;
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::hex::{self, HexError};
use crate::keyed_hmac::KeyedSha256;

/// Length of a VM secret in bytes (256 bits).
pub const SECRET_LEN: usize = 32;
/// Length of a token in bytes (64 bits).
pub const TOKEN_LEN: usize = 8;
/// Length of the MAC input built by [`TokenFields::to_bytes`].
pub const FIELDS_LEN: usize = 28;

/// A VM's secret `S`: 256 random bits known to the registry and to the host that runs the VM,
/// never to any guest. Zeroized when dropped; `Debug` does not print it.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct VmSecret([u8; SECRET_LEN]);

/// The operating system's random source failed; no secret was made.
#[derive(Debug, Error)]
#[error("the operating system's random number generator failed: {0}")]
pub struct RandomError(String);

impl VmSecret {
    /// Wraps existing secret bytes.
    pub fn from_bytes(bytes: [u8; SECRET_LEN]) -> Self {
        Self(bytes)
    }

    /// Draws a fresh secret from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, RandomError> {
        let mut bytes = [0u8; SECRET_LEN];
        getrandom::fill(&mut bytes).map_err(|e| RandomError(e.to_string()))?;
        Ok(Self(bytes))
    }

    /// Parses 64 hexadecimal digits.
    pub fn from_hex(text: &str) -> Result<Self, HexError> {
        let mut bytes = hex::decode::<SECRET_LEN>(text)?;
        let secret = Self(bytes);
        bytes.zeroize();
        Ok(secret)
    }

    /// The secret as 64 hexadecimal digits, in a string that is zeroized when dropped.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(&self.0))
    }

    /// The raw secret bytes.
    pub fn as_bytes(&self) -> &[u8; SECRET_LEN] {
        &self.0
    }
}

impl fmt::Debug for VmSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VmSecret(<redacted>)")
    }
}

/// A token: the first 64 bits of the HMAC.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Token([u8; TOKEN_LEN]);

impl Token {
    /// Wraps token bytes as carried on the wire.
    pub const fn from_bytes(bytes: [u8; TOKEN_LEN]) -> Self {
        Self(bytes)
    }

    /// The token bytes as carried on the wire.
    pub const fn as_bytes(&self) -> &[u8; TOKEN_LEN] {
        &self.0
    }

    /// Compares in constant time, so that a forger learns nothing from how long a check took.
    pub fn ct_eq(&self, other: &Token) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0))
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({self})")
    }
}

impl FromStr for Token {
    type Err = HexError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        hex::decode::<TOKEN_LEN>(s).map(Token)
    }
}

/// When a token stops being valid: seconds since the Unix epoch, or [`Expiry::NEVER`].
///
/// 32 bits of seconds last until 2106; the patent's "-1 never expires" is `u32::MAX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Expiry(pub u32);

impl Expiry {
    /// A token that never expires (the patent's `-1`).
    pub const NEVER: Expiry = Expiry(u32::MAX);

    /// Whether this is [`Expiry::NEVER`].
    pub const fn is_never(self) -> bool {
        self.0 == u32::MAX
    }
}

/// The fields a token covers, in the order they are concatenated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TokenFields {
    /// Underlay address of the source VM's host (`Phys_IP_a`).
    pub src_host: Ipv4Addr,
    /// UDP port of the source VM on its host (`Phys_Port_a`).
    pub src_port: u16,
    /// Source VM's address on the virtual network (`IP_VM_a`).
    pub src_vm: Ipv4Addr,
    /// Underlay address of the destination VM's host (`Phys_IP_b`).
    pub dst_host: Ipv4Addr,
    /// UDP port of the destination VM on its host (`Phys_Port_b`).
    pub dst_port: u16,
    /// Destination VM's address on the virtual network (`IP_VM_b`).
    pub dst_vm: Ipv4Addr,
    /// Numeric id of the virtual network both VMs are on.
    pub network_id: u32,
    /// When the token expires.
    pub expiry: Expiry,
}

impl TokenFields {
    /// The MAC input: every field in network byte order, in declaration order (28 bytes).
    pub fn to_bytes(&self) -> [u8; FIELDS_LEN] {
        let mut out = [0u8; FIELDS_LEN];
        out[0..4].copy_from_slice(&self.src_host.octets());
        out[4..6].copy_from_slice(&self.src_port.to_be_bytes());
        out[6..10].copy_from_slice(&self.src_vm.octets());
        out[10..14].copy_from_slice(&self.dst_host.octets());
        out[14..16].copy_from_slice(&self.dst_port.to_be_bytes());
        out[16..20].copy_from_slice(&self.dst_vm.octets());
        out[20..24].copy_from_slice(&self.network_id.to_be_bytes());
        out[24..28].copy_from_slice(&self.expiry.0.to_be_bytes());
        out
    }

    /// The same pair seen from the other side: what a return token covers.
    pub fn reversed(&self) -> TokenFields {
        TokenFields {
            src_host: self.dst_host,
            src_port: self.dst_port,
            src_vm: self.dst_vm,
            dst_host: self.src_host,
            dst_port: self.src_port,
            dst_vm: self.src_vm,
            network_id: self.network_id,
            expiry: self.expiry,
        }
    }
}

/// Mints and verifies tokens for one destination secret, with the HMAC key schedule done once.
///
/// Keying HMAC-SHA256 costs two compression-function calls; a minter keeps the keyed state
/// (the SHA-256 states after `S ^ ipad` and `S ^ opad`), so a token costs two more, which
/// halves the cost of a token on the hot paths (the registry's token endpoint and vnpd's
/// receive check). That state is as good as the secret: it is zeroized when the minter is
/// dropped and never printed (see `keyed_hmac`).
#[derive(Clone)]
pub struct TokenMinter {
    keyed: KeyedSha256,
}

impl fmt::Debug for TokenMinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenMinter(<keyed>)")
    }
}

impl TokenMinter {
    /// Keys a minter with the destination VM's secret.
    pub fn new(secret: &VmSecret) -> Self {
        Self {
            keyed: KeyedSha256::new(secret.as_bytes()),
        }
    }

    /// The token for `fields`.
    pub fn mint(&self, fields: &TokenFields) -> Token {
        let digest = self.keyed.mac(&fields.to_bytes());
        let mut token = [0u8; TOKEN_LEN];
        token.copy_from_slice(&digest[..TOKEN_LEN]);
        Token(token)
    }

    /// Whether `token` is the token for `fields`, compared in constant time.
    pub fn verify(&self, fields: &TokenFields, token: &Token) -> bool {
        self.mint(fields).ct_eq(token)
    }
}

/// `T = first 64 bits of HMAC-SHA256(secret, fields)`, with `secret` the destination's.
pub fn mint(secret: &VmSecret, fields: &TokenFields) -> Token {
    TokenMinter::new(secret).mint(fields)
}

/// Whether `token` was minted with `secret` over `fields`, compared in constant time.
pub fn verify(secret: &VmSecret, fields: &TokenFields, token: &Token) -> bool {
    TokenMinter::new(secret).verify(fields, token)
}

/// Why an expiry was refused by [`check_expiry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ExpiryError {
    /// The expiry has passed, even allowing for clock skew.
    #[error("token expired")]
    Expired,
    /// The expiry lies further ahead than any token the registry mints (now + TTL + skew):
    /// a forged or replayed-from-the-future value.
    #[error("token expiry too far in the future")]
    TooFarInFuture,
}

/// The receiving host's expiry check (patent FIG. 6, steps 604 and 606).
///
/// `now` is the local clock in Unix seconds, `skew` the allowed clock difference between hosts
/// and `max_ttl` the longest lifetime the registry gives a token. [`Expiry::NEVER`] passes only
/// when `allow_never` is set: an operator must opt in to tokens that never expire.
pub fn check_expiry(
    expiry: Expiry,
    now: u32,
    skew: u32,
    max_ttl: u32,
    allow_never: bool,
) -> Result<(), ExpiryError> {
    if expiry.is_never() {
        return if allow_never {
            Ok(())
        } else {
            Err(ExpiryError::TooFarInFuture)
        };
    }
    if u64::from(expiry.0) + u64::from(skew) < u64::from(now) {
        return Err(ExpiryError::Expired);
    }
    if u64::from(expiry.0) > u64::from(now) + u64::from(max_ttl) + u64::from(skew) {
        return Err(ExpiryError::TooFarInFuture);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> TokenFields {
        TokenFields {
            src_host: Ipv4Addr::new(198, 18, 0, 1),
            src_port: 40001,
            src_vm: Ipv4Addr::new(10, 1, 0, 2),
            dst_host: Ipv4Addr::new(198, 18, 0, 2),
            dst_port: 40002,
            dst_vm: Ipv4Addr::new(10, 1, 0, 3),
            network_id: 7,
            expiry: Expiry(1_800_000_000),
        }
    }

    #[test]
    fn field_layout_is_fixed() {
        assert_eq!(
            hex::encode(&fields().to_bytes()),
            "c61200019c410a010002c61200029c420a010003000000076b49d200"
        );
    }

    #[test]
    fn verify_accepts_minted_and_rejects_changes() {
        let secret = VmSecret::from_bytes([0x42; 32]);
        let token = mint(&secret, &fields());
        assert!(verify(&secret, &fields(), &token));

        let other = VmSecret::from_bytes([0x43; 32]);
        assert!(!verify(&other, &fields(), &token));

        let mut moved = fields();
        moved.src_port += 1;
        assert!(!verify(&secret, &moved, &token));
        let mut later = fields();
        later.expiry = Expiry(later.expiry.0 + 1);
        assert!(!verify(&secret, &later, &token));
        let mut other_net = fields();
        other_net.network_id = 8;
        assert!(!verify(&secret, &other_net, &token));
    }

    #[test]
    fn minter_matches_one_shot() {
        let secret = VmSecret::from_bytes([9; 32]);
        let minter = TokenMinter::new(&secret);
        assert_eq!(minter.mint(&fields()), mint(&secret, &fields()));
    }

    #[test]
    fn reversed_swaps_ends() {
        let f = fields();
        let r = f.reversed();
        assert_eq!(r.src_vm, f.dst_vm);
        assert_eq!(r.dst_port, f.src_port);
        assert_eq!(r.reversed(), f);
    }

    #[test]
    fn secret_is_never_printed() {
        let secret = VmSecret::from_bytes([0xab; 32]);
        let shown = format!("{secret:?}");
        assert!(!shown.contains("ab"), "{shown}");
    }

    #[test]
    fn minter_is_never_printed() {
        let minter = TokenMinter::new(&VmSecret::from_bytes([0xab; 32]));
        let shown = format!("{minter:?} {:?}", vec![minter.clone()]);
        assert!(!shown.contains("ab") && !shown.contains("171"), "{shown}");
    }

    #[test]
    fn secrets_round_trip_and_are_random() {
        let a = VmSecret::generate().expect("os rng");
        let b = VmSecret::generate().expect("os rng");
        assert_ne!(a, b);
        assert_eq!(VmSecret::from_hex(&a.to_hex()).expect("hex"), a);
        assert!(VmSecret::from_hex("00").is_err());
    }

    #[test]
    fn token_text_round_trips() {
        let t = Token::from_bytes([1, 2, 3, 4, 5, 6, 7, 0xff]);
        assert_eq!(t.to_string(), "01020304050607ff");
        assert_eq!("01020304050607ff".parse::<Token>(), Ok(t));
        assert!("0102".parse::<Token>().is_err());
    }

    #[test]
    fn expiry_window() {
        let now = 1_000_000;
        assert_eq!(check_expiry(Expiry(now), now, 5, 600, false), Ok(()));
        assert_eq!(check_expiry(Expiry(now - 5), now, 5, 600, false), Ok(()));
        assert_eq!(
            check_expiry(Expiry(now - 6), now, 5, 600, false),
            Err(ExpiryError::Expired)
        );
        assert_eq!(check_expiry(Expiry(now + 605), now, 5, 600, false), Ok(()));
        assert_eq!(
            check_expiry(Expiry(now + 606), now, 5, 600, false),
            Err(ExpiryError::TooFarInFuture)
        );
        assert_eq!(
            check_expiry(Expiry::NEVER, now, 5, 600, false),
            Err(ExpiryError::TooFarInFuture)
        );
        assert_eq!(check_expiry(Expiry::NEVER, now, 5, 600, true), Ok(()));
        // No overflow at the ends of the range.
        assert_eq!(
            check_expiry(
                Expiry(u32::MAX - 1),
                u32::MAX - 1,
                u32::MAX,
                u32::MAX,
                false
            ),
            Ok(())
        );
        assert_eq!(
            check_expiry(Expiry(0), u32::MAX, 0, 0, false),
            Err(ExpiryError::Expired)
        );
    }
}
