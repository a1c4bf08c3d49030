//! IMDSv2-style metadata sessions, a per-network option against SSRF: a guest first asks for a
//! session token with `PUT /computeMetadata/v1/token` and a TTL header, then sends the token
//! with every request. A server-side request forgery in a guest application (a URL fetcher
//! that can be made to GET an internal address) can neither send a PUT with a custom header
//! nor read a token that, sent with IP TTL 1, never survives a hop through a guest-side proxy.
//! Pure: the tokens are drawn by the caller, the clock is passed in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Where a session token is asked for (PUT only).
pub const TOKEN_PATH: &str = "/computeMetadata/v1/token";
/// The request header naming the session's lifetime in seconds (on the PUT; echoed in its
/// response).
pub const TTL_HEADER: &str = "X-Metadata-Token-TTL-Seconds";
/// The request header carrying the session token.
pub const TOKEN_HEADER: &str = "X-Metadata-Token";
/// Longest session (AWS's limit, 6 hours).
pub const MAX_TTL_SECS: u64 = 21_600;
/// Most live sessions per VM; a new one beyond them replaces the one closest to expiry.
pub const MAX_SESSIONS: usize = 64;
/// Bytes of randomness in a token (hex-encoded: twice as many characters).
pub const TOKEN_BYTES: usize = 32;
/// IP TTL of every packet answering a token PUT: the reply dies at the first router.
pub const TOKEN_REPLY_HOP_LIMIT: u8 = 1;

/// SHA-256 of a session token: what vnpd keeps of it (and what moves with a migrating VM), so
/// neither its memory nor the migration hand-off holds a usable token.
pub type SessionDigest = [u8; 32];

/// The digest of `token`.
pub fn digest(token: &[u8]) -> SessionDigest {
    Sha256::digest(token).into()
}

/// The live session tokens of one VM, by digest.
#[derive(Debug, Default, Clone)]
pub struct Sessions {
    expiry_by_token: HashMap<SessionDigest, Instant>,
}

/// Why a request's session token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionRefusal {
    /// No token, and the network requires one.
    Missing,
    /// A token that was never issued, or has expired.
    Invalid,
}

impl Sessions {
    /// Remembers `token` until `now + ttl`, dropping expired sessions first and, when
    /// [`MAX_SESSIONS`] are live, the one that expires soonest.
    pub fn issue(&mut self, token: String, ttl: Duration, now: Instant) {
        self.make_room(now);
        self.expiry_by_token
            .insert(digest(token.as_bytes()), now + ttl);
    }

    /// Drops expired sessions and, while [`MAX_SESSIONS`] are live, the one expiring soonest.
    fn make_room(&mut self, now: Instant) {
        self.expiry_by_token.retain(|_, expiry| *expiry > now);
        while self.expiry_by_token.len() >= MAX_SESSIONS {
            let soonest = self
                .expiry_by_token
                .iter()
                .min_by_key(|(_, expiry)| **expiry)
                .map(|(t, _)| *t);
            match soonest {
                Some(t) => drop(self.expiry_by_token.remove(&t)),
                None => break,
            }
        }
    }

    /// Every live session with the time it has left (the migration hand-off).
    pub fn export(&self, now: Instant) -> Vec<(SessionDigest, Duration)> {
        self.expiry_by_token
            .iter()
            .filter(|(_, e)| **e > now)
            .map(|(d, e)| (*d, *e - now))
            .collect()
    }

    /// Takes sessions another host issued (a migrated VM's), each live for the time it had
    /// left there (at most [`MAX_TTL_SECS`]); the bound of [`MAX_SESSIONS`] holds as for
    /// [`Sessions::issue`]. Returns how many were taken.
    pub fn import(&mut self, sessions: &[(SessionDigest, Duration)], now: Instant) -> usize {
        let max = Duration::from_secs(MAX_TTL_SECS);
        let mut taken = 0;
        for (d, left) in sessions {
            if left.is_zero() {
                continue;
            }
            self.make_room(now);
            self.expiry_by_token.insert(*d, now + (*left).min(max));
            taken += 1;
        }
        taken
    }

    /// Whether a request with session header `token` may be served: a presented token must be
    /// live (even where sessions are optional, as AWS does); none is fine unless `required`.
    pub fn check(
        &self,
        token: Option<&[u8]>,
        required: bool,
        now: Instant,
    ) -> Result<(), SessionRefusal> {
        let Some(token) = token else {
            return if required {
                Err(SessionRefusal::Missing)
            } else {
                Ok(())
            };
        };
        let live = self
            .expiry_by_token
            .get(&digest(token))
            .is_some_and(|expiry| now < *expiry);
        if live {
            Ok(())
        } else {
            Err(SessionRefusal::Invalid)
        }
    }

    /// Live sessions (for tests and counters).
    pub fn live(&self, now: Instant) -> usize {
        self.expiry_by_token.values().filter(|e| now < **e).count()
    }
}

/// The TTL header's value: whole seconds in `1..=MAX_TTL_SECS`.
pub fn parse_ttl(value: Option<&[u8]>) -> Result<Duration, &'static str> {
    let Some(value) = value else {
        return Err("X-Metadata-Token-TTL-Seconds header required");
    };
    std::str::from_utf8(value)
        .ok()
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|secs| (1..=MAX_TTL_SECS).contains(secs))
        .map(Duration::from_secs)
        .ok_or("X-Metadata-Token-TTL-Seconds must be an integer in 1..=21600")
}

/// A token from [`TOKEN_BYTES`] random bytes.
pub fn encode_token(random: &[u8; TOKEN_BYTES]) -> String {
    random.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh token from the operating system's random source.
pub fn new_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut random = [0u8; TOKEN_BYTES];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
    Ok(encode_token(&random))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_token_is_live_until_its_ttl() {
        let t0 = Instant::now();
        let mut s = Sessions::default();
        s.issue("aa".into(), secs(2), t0);
        assert_eq!(s.check(Some(b"aa"), true, t0), Ok(()));
        assert_eq!(s.check(Some(b"aa"), true, t0 + secs(1)), Ok(()));
        assert_eq!(
            s.check(Some(b"aa"), true, t0 + secs(2)),
            Err(SessionRefusal::Invalid),
            "expired at its TTL"
        );
        assert_eq!(
            s.check(Some(b"bb"), false, t0),
            Err(SessionRefusal::Invalid),
            "an unknown token is refused even where sessions are optional"
        );
        assert_eq!(s.check(None, true, t0), Err(SessionRefusal::Missing));
        assert_eq!(s.check(None, false, t0), Ok(()));
        assert_eq!(
            s.check(Some(&[0xff, 0xfe]), true, t0),
            Err(SessionRefusal::Invalid)
        );
    }

    #[test]
    fn sessions_are_bounded_and_expired_ones_forgotten() {
        let t0 = Instant::now();
        let mut s = Sessions::default();
        for i in 0..MAX_SESSIONS as u64 {
            s.issue(format!("t{i}"), secs(100 + i), t0);
        }
        assert_eq!(s.live(t0), MAX_SESSIONS);
        s.issue("new".into(), secs(10), t0);
        assert_eq!(s.live(t0), MAX_SESSIONS);
        assert_eq!(s.check(Some(b"t0"), true, t0), Err(SessionRefusal::Invalid));
        assert_eq!(s.check(Some(b"t1"), true, t0), Ok(()));
        assert_eq!(s.check(Some(b"new"), true, t0), Ok(()));
        // Past every TTL, the next issue forgets them all.
        s.issue("late".into(), secs(1), t0 + secs(1000));
        assert_eq!(s.expiry_by_token.len(), 1);
    }

    #[test]
    fn sessions_move_as_digests_with_their_time_left() {
        let t0 = Instant::now();
        let mut src = Sessions::default();
        src.issue("aa".into(), secs(100), t0);
        src.issue("bb".into(), secs(1), t0);
        let moved = src.export(t0 + secs(40));
        assert_eq!(moved.len(), 1, "the expired one stays behind");
        assert_eq!(moved[0], (digest(b"aa"), secs(60)));
        assert!(
            src.check(Some(b"aa"), true, t0 + secs(40)).is_ok(),
            "export is a read"
        );
        // The destination's clock starts anywhere.
        let t1 = Instant::now() + secs(5000);
        let mut dst = Sessions::default();
        assert_eq!(
            dst.check(Some(b"aa"), true, t1),
            Err(SessionRefusal::Invalid)
        );
        assert_eq!(dst.import(&moved, t1), 1);
        assert_eq!(dst.check(Some(b"aa"), true, t1 + secs(59)), Ok(()));
        assert_eq!(
            dst.check(Some(b"aa"), true, t1 + secs(60)),
            Err(SessionRefusal::Invalid),
            "expires when it would have on the source"
        );
        // Bounded like issued ones; lifetimes capped at the longest session.
        let many: Vec<_> = (0..2 * MAX_SESSIONS as u8)
            .map(|i| (digest(&[i]), secs(MAX_TTL_SECS * 2)))
            .collect();
        dst.import(&many, t1);
        assert_eq!(dst.live(t1), MAX_SESSIONS);
        assert_eq!(dst.live(t1 + secs(MAX_TTL_SECS)), 0);
    }

    #[test]
    fn ttl_header_values() {
        assert_eq!(parse_ttl(Some(b"21600")), Ok(secs(21600)));
        assert_eq!(parse_ttl(Some(b"1")), Ok(secs(1)));
        for bad in [
            &b"0"[..],
            b"21601",
            b"-5",
            b"+5",
            b"",
            b"1.5",
            b" 60",
            b"99999999999999999999999",
        ] {
            assert!(parse_ttl(Some(bad)).is_err(), "{bad:?}");
        }
        assert!(parse_ttl(None).is_err());
    }

    #[test]
    fn tokens_are_hex_of_the_random_bytes() {
        let t = encode_token(&[0xab; TOKEN_BYTES]);
        assert_eq!(t.len(), 2 * TOKEN_BYTES);
        assert!(t.chars().all(|c| c == 'a' || c == 'b'));
        let (a, b) = (new_token().unwrap(), new_token().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 2 * TOKEN_BYTES);
    }
}
