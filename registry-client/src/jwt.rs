//! ES256 JSON Web Tokens (RFC 7515 compact JWS, RFC 7518 ES256, RFC 7519 claims): the one
//! implementation the registry signs with and `vnpctl verify-token` verifies with. The tests
//! also check both against independent implementations (Python's PyJWT + cryptography).
//!
//! Signatures are P-256 ECDSA over SHA-256 of `base64url(header) "." base64url(claims)`,
//! carried as the fixed 64-byte `r || s` (not DER), as JWS requires.

use crate::metadata::{Jwk, Jwks};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::EncodedPoint;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest token [`verify`] looks at.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Why a token was not accepted. Never contains key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("algorithm {0:?} is not ES256")]
    Algorithm(String),
    #[error("no key {0:?} in the JWKS")]
    UnknownKey(String),
    #[error("signature does not verify")]
    Signature,
    #[error("expired at {exp} (now {now})")]
    Expired { exp: u64, now: u64 },
    #[error("issued in the future ({iat}, now {now})")]
    NotYetValid { iat: u64, now: u64 },
    #[error("audience {found:?} is not {wanted:?}")]
    Audience { wanted: String, found: String },
    #[error("JWKS key {0:?} is not a P-256 public key")]
    BadKey(String),
}

/// Seconds of clock difference between signer and verifier that [`verify`] tolerates.
pub const LEEWAY_S: u64 = 30;

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
    #[serde(default)]
    kid: String,
}

/// A P-256 private key with its key id.
#[derive(Clone)]
pub struct JwtSigner {
    kid: String,
    key: SigningKey,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwtSigner({:?}, <private key redacted>)", self.kid)
    }
}

impl JwtSigner {
    /// From the 32-byte big-endian private scalar; `None` if it is zero or not below the
    /// group order.
    pub fn from_scalar(kid: &str, scalar: &[u8; 32]) -> Option<JwtSigner> {
        let key = SigningKey::from_bytes(scalar.into()).ok()?;
        Some(JwtSigner {
            kid: kid.to_string(),
            key,
        })
    }

    /// A fresh key from the OS CSPRNG; returns it and its private scalar (to be stored
    /// sealed).
    pub fn generate(kid: &str) -> Result<(JwtSigner, zeroize::Zeroizing<[u8; 32]>), String> {
        loop {
            let mut scalar = zeroize::Zeroizing::new([0u8; 32]);
            getrandom::fill(&mut scalar[..]).map_err(|e| format!("OS random: {e}"))?;
            // Out of range with probability ~2^-32: draw again.
            if let Some(signer) = JwtSigner::from_scalar(kid, &scalar) {
                return Ok((signer, scalar));
            }
        }
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public half as a JWK.
    pub fn jwk(&self) -> Jwk {
        jwk_of(&self.kid, self.key.verifying_key())
    }

    /// Signs `claims` (a JSON object): the compact JWS with header
    /// `{"alg":"ES256","typ":"JWT","kid":...}`.
    pub fn sign(&self, claims: &Value) -> String {
        let header = Header {
            alg: "ES256".into(),
            typ: Some("JWT".into()),
            kid: self.kid.clone(),
        };
        // Serialising a struct of strings and a `Value` cannot fail.
        let header = serde_json::to_vec(&header).unwrap_or_default();
        let claims = serde_json::to_vec(claims).unwrap_or_default();
        let mut out = URL_SAFE_NO_PAD.encode(header);
        out.push('.');
        out.push_str(&URL_SAFE_NO_PAD.encode(claims));
        let signature: Signature = self.key.sign(out.as_bytes());
        out.push('.');
        out.push_str(&URL_SAFE_NO_PAD.encode(signature.to_bytes()));
        out
    }
}

/// The JWK of a P-256 public key.
pub fn jwk_of(kid: &str, key: &VerifyingKey) -> Jwk {
    let point = key.to_encoded_point(false);
    let coordinate = |c: Option<&p256::FieldBytes>| {
        URL_SAFE_NO_PAD.encode(c.map(|b| b.as_slice()).unwrap_or_default())
    };
    Jwk {
        kty: "EC".into(),
        crv: "P-256".into(),
        x: coordinate(point.x()),
        y: coordinate(point.y()),
        kid: kid.to_string(),
        alg: "ES256".into(),
        use_: "sig".into(),
    }
}

fn verifying_key(jwk: &Jwk) -> Result<VerifyingKey, JwtError> {
    let bad = || JwtError::BadKey(jwk.kid.clone());
    if jwk.kty != "EC" || jwk.crv != "P-256" {
        return Err(bad());
    }
    let x = URL_SAFE_NO_PAD.decode(&jwk.x).map_err(|_| bad())?;
    let y = URL_SAFE_NO_PAD.decode(&jwk.y).map_err(|_| bad())?;
    if x.len() != 32 || y.len() != 32 {
        return Err(bad());
    }
    let point = EncodedPoint::from_affine_coordinates(x[..].into(), y[..].into(), false);
    VerifyingKey::from_encoded_point(&point).map_err(|_| bad())
}

/// A token that verified: its key id and claims.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub kid: String,
    pub claims: Value,
}

fn decode_part(part: &str, what: &'static str) -> Result<Vec<u8>, JwtError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed(what))
}

/// Verifies `token` against `jwks` at Unix time `now`: ES256 only, the signature by the key
/// its `kid` names, `exp` in the future and `iat` not (both within [`LEEWAY_S`]), and, if
/// `audience` is given, an `aud` equal to it (or an array containing it).
pub fn verify(
    token: &str,
    jwks: &Jwks,
    audience: Option<&str>,
    now: u64,
) -> Result<Verified, JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::Malformed("longer than 16 KiB"));
    }
    let mut parts = token.trim().split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("not three dot-separated parts"));
    };
    let header: Header = serde_json::from_slice(&decode_part(h, "header encoding")?)
        .map_err(|_| JwtError::Malformed("header is not a JWS header"))?;
    if header.alg != "ES256" {
        return Err(JwtError::Algorithm(header.alg));
    }
    let jwk = jwks
        .keys
        .iter()
        .find(|k| k.kid == header.kid)
        .ok_or_else(|| JwtError::UnknownKey(header.kid.clone()))?;
    let key = verifying_key(jwk)?;
    let signature = Signature::from_slice(&decode_part(s, "signature encoding")?)
        .map_err(|_| JwtError::Malformed("signature is not 64 bytes"))?;
    let signed = &token.trim()[..h.len() + 1 + c.len()];
    key.verify(signed.as_bytes(), &signature)
        .map_err(|_| JwtError::Signature)?;
    let claims: Value = serde_json::from_slice(&decode_part(c, "claims encoding")?)
        .map_err(|_| JwtError::Malformed("claims are not JSON"))?;
    check_claims(&claims, audience, now)?;
    Ok(Verified {
        kid: header.kid,
        claims,
    })
}

/// The time and audience checks of [`verify`] (pure, on verified claims).
pub fn check_claims(claims: &Value, audience: Option<&str>, now: u64) -> Result<(), JwtError> {
    let exp = claims["exp"]
        .as_u64()
        .ok_or(JwtError::Malformed("no numeric exp claim"))?;
    if exp.saturating_add(LEEWAY_S) <= now {
        return Err(JwtError::Expired { exp, now });
    }
    if let Some(iat) = claims["iat"].as_u64() {
        if iat > now.saturating_add(LEEWAY_S) {
            return Err(JwtError::NotYetValid { iat, now });
        }
    }
    if let Some(wanted) = audience {
        let aud = &claims["aud"];
        let matches = match aud {
            Value::String(s) => s == wanted,
            Value::Array(a) => a.iter().any(|v| v.as_str() == Some(wanted)),
            _ => false,
        };
        if !matches {
            return Err(JwtError::Audience {
                wanted: wanted.to_string(),
                found: aud.to_string(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn signer(kid: &str, byte: u8) -> JwtSigner {
        JwtSigner::from_scalar(kid, &[byte; 32]).unwrap()
    }

    #[test]
    fn sign_verify_round_trip_and_refusals() {
        let s = signer("k1", 7);
        let jwks = Jwks {
            keys: vec![s.jwk()],
        };
        let t = s.sign(&json!({"iss": "r", "aud": "svc", "iat": 1000, "exp": 1600}));
        let v = verify(&t, &jwks, Some("svc"), 1100).unwrap();
        assert_eq!(
            (v.kid.as_str(), v.claims["iss"].as_str()),
            ("k1", Some("r"))
        );
        assert!(verify(&t, &jwks, None, 1100).is_ok());
        assert!(matches!(
            verify(&t, &jwks, Some("other"), 1100),
            Err(JwtError::Audience { .. })
        ));
        assert!(matches!(
            verify(&t, &jwks, None, 1600 + LEEWAY_S),
            Err(JwtError::Expired { .. })
        ));
        assert!(matches!(
            verify(&t, &jwks, None, 900 - LEEWAY_S - 1),
            Err(JwtError::NotYetValid { .. })
        ));
        // Another key under the same kid, a changed claim, a changed header.
        let other = Jwks {
            keys: vec![jwk_of("k1", signer("k1", 8).key.verifying_key())],
        };
        assert_eq!(verify(&t, &other, None, 1100), Err(JwtError::Signature));
        let parts: Vec<&str> = t.split('.').collect();
        let forged_claims =
            URL_SAFE_NO_PAD.encode(br#"{"iss":"r","aud":"svc","iat":1000,"exp":99999}"#);
        let forged = format!("{}.{forged_claims}.{}", parts[0], parts[2]);
        assert_eq!(verify(&forged, &jwks, None, 1100), Err(JwtError::Signature));
        let none_alg = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":"k1"}"#);
        let forged = format!("{none_alg}.{}.", parts[1]);
        assert_eq!(
            verify(&forged, &jwks, None, 1100),
            Err(JwtError::Algorithm("none".into()))
        );
        assert_eq!(
            verify(&t, &Jwks::default(), None, 1100),
            Err(JwtError::UnknownKey("k1".into()))
        );
        for junk in [
            "",
            "a.b",
            "a.b.c.d",
            "!!.!!.!!",
            &"a".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(
                matches!(verify(junk, &jwks, None, 1100), Err(JwtError::Malformed(_))),
                "{junk:.20}"
            );
        }
    }

    #[test]
    fn jwk_coordinates_are_32_byte_base64url() {
        let jwk = signer("k", 1).jwk();
        assert_eq!((jwk.x.len(), jwk.y.len()), (43, 43));
        assert_eq!((jwk.kty.as_str(), jwk.alg.as_str()), ("EC", "ES256"));
        let text = serde_json::to_string(&jwk).unwrap();
        assert!(text.contains(r#""use":"sig""#), "{text}");
        assert!(JwtSigner::from_scalar("k", &[0; 32]).is_none());
        assert!(JwtSigner::from_scalar("k", &[0xff; 32]).is_none());
        let (g, scalar) = JwtSigner::generate("g").unwrap();
        assert_eq!(JwtSigner::from_scalar("g", &scalar).unwrap().jwk(), g.jwk());
    }
}
