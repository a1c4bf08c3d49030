//! Envelope encryption of secrets at rest in a shared store.
//!
//! Each secret gets its own random data key (DEK); the secret is sealed with the DEK and the
//! DEK is sealed with a registry key-encryption key (KEK) that only the registry processes
//! hold (`--secret-keys FILE`), never the store. Both seals are ChaCha20-Poly1305 with the
//! store key of the record as associated data, so a sealed value copied under another key
//! does not open. Rotating the KEK re-seals only the 32-byte DEKs.
//!
//! Sealed value: `"vnpe1" | kid_len u8 | kid | nonce_k(12) | sealed DEK (48) | nonce_d(12) |
//! sealed payload (len + 16)`.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use std::path::Path;
use zeroize::{Zeroize, Zeroizing};

const MAGIC: &[u8] = b"vnpe1";
const NONCE: usize = 12;
const SEALED_DEK: usize = 32 + 16;

/// The registry's key-encryption keys: the first one seals, all of them open.
#[derive(Clone)]
pub struct KeyRing {
    keys: Vec<(String, Zeroizing<[u8; 32]>)>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        write!(f, "KeyRing({ids:?}, <keys redacted>)")
    }
}

/// Why a key file or a sealed value is unusable. Never contains key or secret bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("key file: {0}")]
    KeyFile(String),
    #[error("sealed value: {0}")]
    Malformed(&'static str),
    #[error("sealed with key {0:?}, which is not in the key file")]
    UnknownKey(String),
    #[error("sealed value does not open (wrong key or tampered)")]
    Open,
}

fn random<const N: usize>() -> Result<[u8; N], SealError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| SealError::KeyFile(format!("OS random: {e}")))?;
    Ok(b)
}

fn cipher(key: &[u8; 32]) -> ChaCha20Poly1305 {
    ChaCha20Poly1305::new(Key::from_slice(key))
}

impl KeyRing {
    /// Keys given as `(id, 32 bytes)`, the sealing key first.
    pub fn new(keys: Vec<(String, [u8; 32])>) -> Result<KeyRing, SealError> {
        if keys.is_empty() {
            return Err(SealError::KeyFile("no key".into()));
        }
        let mut out = Vec::with_capacity(keys.len());
        for (id, mut k) in keys {
            let valid = !id.is_empty()
                && id.len() <= 64
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !valid {
                k.zeroize();
                return Err(SealError::KeyFile(format!(
                    "key id {id:?}: use 1-64 of [A-Za-z0-9-]"
                )));
            }
            out.push((id, Zeroizing::new(k)));
            k.zeroize();
        }
        Ok(KeyRing { keys: out })
    }

    /// Reads `FILE`: one key a line, `<id> <64 hex digits>`, the sealing key first; blank
    /// lines and `#` comments are skipped.
    pub fn from_file(path: &Path) -> Result<KeyRing, SealError> {
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| SealError::KeyFile(format!("{}: {e}", path.display())))?,
        );
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || {
                SealError::KeyFile(format!(
                    "{} line {}: expected `<id> <64 hex>`",
                    path.display(),
                    n + 1
                ))
            };
            let (id, hex) = line.split_once(char::is_whitespace).ok_or_else(bad)?;
            let key = parse_hex_key(hex.trim()).ok_or_else(bad)?;
            keys.push((id.to_string(), key));
        }
        KeyRing::new(keys)
    }

    /// The id of the key new seals use.
    pub fn sealing_key_id(&self) -> &str {
        &self.keys[0].0
    }

    /// Seals `plaintext` for the store key `aad`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let (kid, kek) = &self.keys[0];
        let dek = Zeroizing::new(random::<32>()?);
        let (nonce_k, nonce_d) = (random::<NONCE>()?, random::<NONCE>()?);
        let sealed_dek = cipher(kek)
            .encrypt(Nonce::from_slice(&nonce_k), Payload { msg: &dek[..], aad })
            .map_err(|_| SealError::Open)?;
        let sealed = cipher(&dek)
            .encrypt(
                Nonce::from_slice(&nonce_d),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| SealError::Open)?;
        let mut out =
            Vec::with_capacity(MAGIC.len() + 1 + kid.len() + 2 * NONCE + SEALED_DEK + sealed.len());
        out.extend_from_slice(MAGIC);
        out.push(kid.len() as u8);
        out.extend_from_slice(kid.as_bytes());
        out.extend_from_slice(&nonce_k);
        out.extend_from_slice(&sealed_dek);
        out.extend_from_slice(&nonce_d);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens a value [`KeyRing::seal`] made for the store key `aad`.
    pub fn open(&self, aad: &[u8], value: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let parts = SealedParts::parse(value)?;
        let kek = self
            .keys
            .iter()
            .find(|(id, _)| id.as_bytes() == parts.kid)
            .map(|(_, k)| k)
            .ok_or_else(|| SealError::UnknownKey(String::from_utf8_lossy(parts.kid).into()))?;
        let dek_bytes = Zeroizing::new(
            cipher(kek)
                .decrypt(
                    Nonce::from_slice(parts.nonce_k),
                    Payload {
                        msg: parts.sealed_dek,
                        aad,
                    },
                )
                .map_err(|_| SealError::Open)?,
        );
        let dek: &[u8; 32] = dek_bytes[..].try_into().map_err(|_| SealError::Open)?;
        cipher(dek)
            .decrypt(
                Nonce::from_slice(parts.nonce_d),
                Payload {
                    msg: parts.sealed,
                    aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| SealError::Open)
    }

    /// The id of the key that sealed `value`.
    pub fn key_id_of(value: &[u8]) -> Result<String, SealError> {
        Ok(String::from_utf8_lossy(SealedParts::parse(value)?.kid).into_owned())
    }
}

struct SealedParts<'a> {
    kid: &'a [u8],
    nonce_k: &'a [u8],
    sealed_dek: &'a [u8],
    nonce_d: &'a [u8],
    sealed: &'a [u8],
}

impl<'a> SealedParts<'a> {
    fn parse(value: &'a [u8]) -> Result<SealedParts<'a>, SealError> {
        let rest = value
            .strip_prefix(MAGIC)
            .ok_or(SealError::Malformed("not a vnpe1 envelope"))?;
        let (&kid_len, rest) = rest
            .split_first()
            .ok_or(SealError::Malformed("truncated"))?;
        let kid_len = usize::from(kid_len);
        if rest.len() < kid_len + 2 * NONCE + SEALED_DEK + 16 {
            return Err(SealError::Malformed("truncated"));
        }
        let (kid, rest) = rest.split_at(kid_len);
        let (nonce_k, rest) = rest.split_at(NONCE);
        let (sealed_dek, rest) = rest.split_at(SEALED_DEK);
        let (nonce_d, sealed) = rest.split_at(NONCE);
        Ok(SealedParts {
            kid,
            nonce_k,
            sealed_dek,
            nonce_d,
            sealed,
        })
    }
}

fn parse_hex_key(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(ids: &[(&str, u8)]) -> KeyRing {
        KeyRing::new(
            ids.iter()
                .map(|(id, b)| (id.to_string(), [*b; 32]))
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn seal_open_round_trip_and_binding() {
        let r = ring(&[("k1", 1)]);
        let sealed = r.seal(b"/vnp/secrets/vm/a", b"top secret bytes").unwrap();
        assert!(
            !sealed.windows(6).any(|w| w == b"secret"),
            "plaintext visible"
        );
        assert_eq!(
            &r.open(b"/vnp/secrets/vm/a", &sealed).unwrap()[..],
            b"top secret bytes"
        );
        assert_eq!(
            r.open(b"/vnp/secrets/vm/b", &sealed),
            Err(SealError::Open),
            "moved to another key"
        );
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(
            r.open(b"/vnp/secrets/vm/a", &tampered),
            Err(SealError::Open)
        );
        assert_eq!(
            r.open(b"/vnp/secrets/vm/a", &sealed[..20]),
            Err(SealError::Malformed("truncated"))
        );
        assert_eq!(KeyRing::key_id_of(&sealed).unwrap(), "k1");
    }

    #[test]
    fn rotation_keeps_old_keys_for_opening() {
        let old = ring(&[("k1", 1)]);
        let sealed_old = old.seal(b"k", b"v").unwrap();
        let rotated = ring(&[("k2", 2), ("k1", 1)]);
        assert_eq!(&rotated.open(b"k", &sealed_old).unwrap()[..], b"v");
        let sealed_new = rotated.seal(b"k", b"v").unwrap();
        assert_eq!(KeyRing::key_id_of(&sealed_new).unwrap(), "k2");
        assert_eq!(
            old.open(b"k", &sealed_new),
            Err(SealError::UnknownKey("k2".into()))
        );
        let wrong = ring(&[("k1", 9)]);
        assert_eq!(wrong.open(b"k", &sealed_old), Err(SealError::Open));
    }

    #[test]
    fn key_file_parsing() {
        let dir = std::env::temp_dir().join(format!("vnp-keyring-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("keys");
        std::fs::write(
            &f,
            format!(
                "# comment\n\nk2 {}\nk1 {}\n",
                "ab".repeat(32),
                "01".repeat(32)
            ),
        )
        .unwrap();
        let r = KeyRing::from_file(&f).unwrap();
        assert_eq!(r.sealing_key_id(), "k2");
        std::fs::write(&f, "k1 abcd\n").unwrap();
        assert!(
            matches!(KeyRing::from_file(&f), Err(SealError::KeyFile(m)) if m.contains("line 1"))
        );
        std::fs::write(&f, "").unwrap();
        assert!(KeyRing::from_file(&f).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
