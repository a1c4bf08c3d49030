//! [`SecretHex`]: a secret as it travels in the API's JSON.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use vnp_protocol::token::VmSecret;
use zeroize::Zeroizing;

/// A VM or gateway secret as 64 hexadecimal digits, as the API carries it: the text is
/// zeroized when dropped and never printed (`Debug` shows `<redacted>`). Turn it into a
/// [`VmSecret`] with [`SecretHex::to_secret`] and drop it promptly.
///
/// What it cannot cover: the raw JSON bytes around it (the client wipes its response body
/// after parsing; the server's serialised body is freed by the HTTP stack unwiped) and any
/// scratch buffer the JSON parser uses for strings with escapes (hex digits have none).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretHex(Zeroizing<String>);

impl SecretHex {
    /// The hex text of `secret`.
    pub fn from_secret(secret: &VmSecret) -> Self {
        Self(secret.to_hex())
    }

    /// Parses the text back into a secret; `None` unless it is 64 hex digits.
    pub fn to_secret(&self) -> Option<VmSecret> {
        VmSecret::from_hex(&self.0).ok()
    }

    /// The text itself, for callers that must see it (tests, the registry's own checks).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for SecretHex {
    fn from(text: String) -> Self {
        Self(Zeroizing::new(text))
    }
}

impl fmt::Debug for SecretHex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretHex(<redacted>)")
    }
}

impl Serialize for SecretHex {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SecretHex {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_secret_and_json_round_trips() {
        let secret = VmSecret::from_bytes([0xab; 32]);
        let hex = SecretHex::from_secret(&secret);
        let shown = format!("{hex:?} {:?}", Some(&hex));
        assert!(!shown.contains("ab"), "{shown}");
        let json = serde_json::to_string(&hex).unwrap();
        assert_eq!(json, format!("\"{}\"", "ab".repeat(32)));
        let back: SecretHex = serde_json::from_str(&json).unwrap();
        assert_eq!(back.to_secret(), Some(secret));
        assert_eq!(SecretHex::from("zz".to_string()).to_secret(), None);
    }
}
