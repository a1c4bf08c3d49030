//! Lower-case hexadecimal, for tokens and secrets in JSON and on the command line.

use thiserror::Error;

/// Why a hexadecimal string was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HexError {
    /// The string does not have exactly twice as many digits as the value has bytes.
    #[error("expected {expected} hexadecimal digits, got {actual}")]
    Length { expected: usize, actual: usize },
    /// A character is not a hexadecimal digit.
    #[error("not a hexadecimal digit at position {position}")]
    Digit { position: usize },
}

/// Encodes `bytes` as lower-case hexadecimal.
pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

/// Decodes exactly `N` bytes from `text` (upper or lower case).
pub fn decode<const N: usize>(text: &str) -> Result<[u8; N], HexError> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return Err(HexError::Length {
            expected: 2 * N,
            actual: digits.len(),
        });
    }
    let mut out = [0u8; N];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        let hi = nibble(pair[0]).ok_or(HexError::Digit { position: 2 * i })?;
        let lo = nibble(pair[1]).ok_or(HexError::Digit {
            position: 2 * i + 1,
        })?;
        out[i] = (hi << 4) | lo;
    }
    Ok(out)
}

fn nibble(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let bytes = [0x00, 0x7f, 0x80, 0xff, 0x12];
        assert_eq!(encode(&bytes), "007f80ff12");
        assert_eq!(decode::<5>("007F80ff12"), Ok(bytes));
    }

    #[test]
    fn refuses_bad_input() {
        assert_eq!(
            decode::<2>("abc"),
            Err(HexError::Length {
                expected: 4,
                actual: 3
            })
        );
        assert_eq!(decode::<2>("ab0g"), Err(HexError::Digit { position: 3 }));
        assert!(decode::<1>("é").is_err());
    }
}
