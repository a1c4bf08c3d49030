//! Option TLVs that may follow the inner packet.
//!
//! Each option is `type (u8) | length (u8) | value (length bytes)`. Types with the high bit
//! clear may be skipped by a receiver that does not know them; a datagram carrying an unknown
//! type with the high bit set must be dropped (like IPv6's option action bits), so that later
//! versions can add options whose meaning must not be ignored.

use crate::token::{Expiry, Token, TOKEN_LEN};

use super::WireError;

/// Option type of a [`ReturnToken`].
pub const TYPE_RETURN_TOKEN: u8 = 1;
/// Option type of an [`EndpointMoved`] notice.
pub const TYPE_ENDPOINT_MOVED: u8 = 2;
/// Types with this bit set must be understood or the datagram dropped.
pub const MUST_UNDERSTAND: u8 = 0x80;

/// The token for the reverse direction, minted by the sending host with the *sender's* VM
/// secret, so the receiver can reply without a registry round trip (patent FIG. 5, 504d).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReturnToken {
    /// `T_b_a`: valid for packets from the receiver's VM back to the sender's VM.
    pub token: Token,
    /// Its expiry.
    pub expiry: Expiry,
}

impl ReturnToken {
    /// Bytes of the value.
    pub const VALUE_LEN: usize = TOKEN_LEN + 4;
    /// Bytes of the whole option, type and length included.
    pub const WIRE_LEN: usize = 2 + Self::VALUE_LEN;

    /// Writes the option at the start of `out` and returns its length, or `None` when `out`
    /// is too short.
    pub fn emit(&self, out: &mut [u8]) -> Option<usize> {
        let out = out.get_mut(..Self::WIRE_LEN)?;
        out[0] = TYPE_RETURN_TOKEN;
        out[1] = Self::VALUE_LEN as u8;
        out[2..2 + TOKEN_LEN].copy_from_slice(self.token.as_bytes());
        out[2 + TOKEN_LEN..].copy_from_slice(&self.expiry.0.to_be_bytes());
        Some(Self::WIRE_LEN)
    }

    fn parse(value: &[u8]) -> Result<Self, WireError> {
        if value.len() != Self::VALUE_LEN {
            return Err(WireError::Options);
        }
        let mut token = [0u8; TOKEN_LEN];
        token.copy_from_slice(&value[..TOKEN_LEN]);
        let mut expiry = [0u8; 4];
        expiry.copy_from_slice(&value[TOKEN_LEN..]);
        Ok(Self {
            token: Token::from_bytes(token),
            expiry: Expiry(u32::from_be_bytes(expiry)),
        })
    }
}

/// Sent by a host that no longer runs the destination VM (it migrated away), with a datagram it
/// forwarded to the VM's new host: the sender should drop its cached token and endpoint for
/// that VM and ask the registry again. Carries the generation of the endpoint record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointMoved {
    /// Generation of the VM's endpoint record after the move.
    pub generation: u64,
}

impl EndpointMoved {
    /// Bytes of the value.
    pub const VALUE_LEN: usize = 8;
    /// Bytes of the whole option.
    pub const WIRE_LEN: usize = 2 + Self::VALUE_LEN;

    /// Writes the option at the start of `out`, or `None` when `out` is too short.
    pub fn emit(&self, out: &mut [u8]) -> Option<usize> {
        let out = out.get_mut(..Self::WIRE_LEN)?;
        out[0] = TYPE_ENDPOINT_MOVED;
        out[1] = Self::VALUE_LEN as u8;
        out[2..].copy_from_slice(&self.generation.to_be_bytes());
        Some(Self::WIRE_LEN)
    }

    fn parse(value: &[u8]) -> Result<Self, WireError> {
        let bytes: [u8; 8] = value.try_into().map_err(|_| WireError::Options)?;
        Ok(Self {
            generation: u64::from_be_bytes(bytes),
        })
    }
}

/// One option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VnpOption<'a> {
    /// See [`ReturnToken`].
    ReturnToken(ReturnToken),
    /// See [`EndpointMoved`].
    EndpointMoved(EndpointMoved),
    /// A skippable option this version does not know.
    Unknown { kind: u8, value: &'a [u8] },
}

/// Iterates over the option TLVs in `bytes`; yields an error (and then stops) on a TLV that
/// overruns, a known type with a wrong length, or an unknown must-understand type.
#[derive(Debug, Clone)]
pub struct OptionsIter<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> OptionsIter<'a> {
    /// Starts at the first option.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self {
            rest: bytes,
            failed: false,
        }
    }
}

impl<'a> Iterator for OptionsIter<'a> {
    type Item = Result<VnpOption<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        let parsed = match self.rest {
            [kind, len, tail @ ..] if tail.len() >= usize::from(*len) => {
                let (value, rest) = tail.split_at(usize::from(*len));
                self.rest = rest;
                match *kind {
                    TYPE_RETURN_TOKEN => ReturnToken::parse(value).map(VnpOption::ReturnToken),
                    TYPE_ENDPOINT_MOVED => {
                        EndpointMoved::parse(value).map(VnpOption::EndpointMoved)
                    }
                    k if k & MUST_UNDERSTAND != 0 => Err(WireError::Options),
                    k => Ok(VnpOption::Unknown { kind: k, value }),
                }
            }
            _ => Err(WireError::Options),
        };
        self.failed = parsed.is_err();
        Some(parsed)
    }
}

/// The return token among `options`, if any (the first one wins).
pub fn find_return_token(options: &[u8]) -> Option<ReturnToken> {
    OptionsIter::new(options).find_map(|o| match o {
        Ok(VnpOption::ReturnToken(rt)) => Some(rt),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> ReturnToken {
        ReturnToken {
            token: Token::from_bytes([1, 2, 3, 4, 5, 6, 7, 8]),
            expiry: Expiry(0x6b49_d200),
        }
    }

    #[test]
    fn return_token_round_trips() {
        let mut buf = [0u8; 32];
        let n = rt().emit(&mut buf).expect("room");
        assert_eq!(n, 14);
        assert_eq!(
            crate::hex::encode(&buf[..n]),
            "010c01020304050607086b49d200"
        );
        let all: Vec<_> = OptionsIter::new(&buf[..n]).collect();
        assert_eq!(all, vec![Ok(VnpOption::ReturnToken(rt()))]);
        assert_eq!(find_return_token(&buf[..n]), Some(rt()));
        assert_eq!(rt().emit(&mut buf[..13]), None);
    }

    #[test]
    fn skips_unknown_and_refuses_must_understand() {
        let bytes = [0x10, 1, 0xee, 0x02, 8, 0, 0, 0, 0, 0, 0, 0, 9];
        let all: Vec<_> = OptionsIter::new(&bytes).collect();
        assert_eq!(
            all,
            vec![
                Ok(VnpOption::Unknown {
                    kind: 0x10,
                    value: &[0xee]
                }),
                Ok(VnpOption::EndpointMoved(EndpointMoved { generation: 9 })),
            ]
        );
        let bad = [0x90, 0];
        assert_eq!(
            OptionsIter::new(&bad).collect::<Vec<_>>(),
            vec![Err(WireError::Options)]
        );
    }

    #[test]
    fn refuses_overruns_and_wrong_lengths() {
        for bytes in [
            &[1u8][..],
            &[1, 12, 0, 0][..],
            &[1, 2, 0, 0][..],
            &[2, 0][..],
        ] {
            let items: Vec<_> = OptionsIter::new(bytes).collect();
            assert_eq!(items.last(), Some(&Err(WireError::Options)), "{bytes:?}");
        }
    }
}
