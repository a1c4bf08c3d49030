//! The metadata-server target: the service bridge's HTTP handling, bytes from a guest in,
//! a decision out (`vnpd::bridge::http::parse` + `vnpd::bridge::routes::route`), and its DNS
//! answers (`vnpd::bridge::dns::answer`).
//!
//! Input: a mode byte, then the bytes. Mode bit 0 ([`DNS`]): the bytes are a DNS query instead
//! of HTTP. Bit 1 ([`NOTHING_CACHED`]): the registry was never reached. Bit 2 ([`TOKENS_HELD`]):
//! an access token and an identity token are held. Bit 3 ([`WAITED`]): the request already
//! waited (a hanging GET's second routing). Bit 4 ([`SESSION`]): a metadata session with the
//! token [`SESSION_TOKEN`] is live. Bit 5 ([`SESSION_REQUIRED`]): the project requires sessions.
//! Bit 6 ([`DNS_FORWARD`]): DNS names the bridge does not own are forwarded upstream.
//!
//! Invariants asserted: every response carries `Metadata-Flavor: Google` and a
//! `Content-Length` equal to its body; a request without the exact flavor header gets 403
//! unless it is `GET /`; one with `X-Forwarded-For` always gets 403; a hanging GET waits at
//! most `MAX_WAIT`; a request that waited is never parked again; where sessions are required,
//! a request without a live session token is never answered with metadata (401, or 503 when
//! nothing is cached); a consumed length never exceeds the input.

use std::time::{Duration, Instant};

use vnpd::bridge::dns::{self, Names};
use vnpd::bridge::http::{self, Parsed, Response};
use vnpd::bridge::routes::{self, Cached, Decision, HeldToken, State, TokenCache};
use vnpd::bridge::session::Sessions;
use vnpd::bridge::source::{AccessToken, IdentityToken, InstanceMetadata, VmMetadata};
use vnpd::bridge::METADATA_IP;

/// Mode bit: the input is a DNS query.
pub const DNS: u8 = 0x01;
/// Mode bit: no metadata cached.
pub const NOTHING_CACHED: u8 = 0x02;
/// Mode bit: tokens held.
pub const TOKENS_HELD: u8 = 0x04;
/// Mode bit: the request already waited.
pub const WAITED: u8 = 0x08;
/// Mode bit: a session with [`SESSION_TOKEN`] is live.
pub const SESSION: u8 = 0x10;
/// Mode bit: the project requires metadata sessions.
pub const SESSION_REQUIRED: u8 = 0x20;
/// Mode bit: DNS forwarding to an upstream is configured.
pub const DNS_FORWARD: u8 = 0x40;
/// The live session token under [`SESSION`].
pub const SESSION_TOKEN: &str = "fuzz-session-token";

fn metadata(require_session: bool) -> VmMetadata {
    let mut md = VmMetadata {
        etag: "e".into(),
        instance: InstanceMetadata {
            id: "1234".into(),
            name: "vm-a".into(),
            hostname: "vm-a".into(),
            ip: "10.0.0.2".into(),
            mtu: 1452,
            ..InstanceMetadata::default()
        },
        ..VmMetadata::default()
    };
    md.project.require_session_token = require_session;
    md.instance.attributes.insert("k".into(), "v".into());
    md.instance.service_account.email = "vm-a@net1".into();
    md.guest_attributes
        .entry("hostkeys".into())
        .or_default()
        .insert("ssh-ed25519".into(), "AAAA".into());
    md
}

fn tokens(now: Instant) -> TokenCache {
    let mut t = TokenCache::default();
    let ttl = Duration::from_secs(600);
    t.access = Some(HeldToken::new(
        AccessToken {
            access_token: "a.b.c".into(),
            expires_in: 600,
            token_type: "Bearer".into(),
        },
        now,
        ttl,
    ));
    t.identity.insert(
        ("aud".into(), false),
        HeldToken::new(
            IdentityToken {
                token: "i.d.t".into(),
                expires_in: 600,
            },
            now,
            ttl,
        ),
    );
    t
}

fn check_response(r: &Response) {
    let wire = r.encode(false);
    let text = String::from_utf8_lossy(&wire);
    assert!(text.contains("\r\nMetadata-Flavor: Google\r\n"), "{text}");
    assert!(
        text.contains(&format!("\r\nContent-Length: {}\r\n", r.body.len())),
        "{text}"
    );
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let (mode, bytes) = crate::split_mode(data);
    if mode & DNS != 0 {
        let names = Names::new(METADATA_IP, "vm-a", std::net::Ipv4Addr::new(10, 0, 0, 2));
        let _ = dns::answer(bytes, &names, mode & DNS_FORWARD != 0);
        return;
    }
    let (req, used) = match http::parse(bytes) {
        Parsed::Partial => return,
        Parsed::Bad(m) => {
            let r = m.response();
            assert!(r.close && r.status >= 400);
            check_response(&r);
            return;
        }
        Parsed::Complete(req, used) => (req, used),
    };
    assert!(used <= bytes.len());
    let now = Instant::now();
    let required = mode & SESSION_REQUIRED != 0;
    let cached = (mode & NOTHING_CACHED == 0).then(|| Cached::new(metadata(required)));
    let mut sessions = Sessions::default();
    if mode & SESSION != 0 {
        sessions.issue(SESSION_TOKEN.into(), Duration::from_secs(60), now);
    }
    let held = if mode & TOKENS_HELD != 0 {
        tokens(now)
    } else {
        TokenCache::default()
    };
    let waited = mode & WAITED != 0;
    let state = State {
        cached: cached.as_ref(),
        tokens: &held,
        sessions: &sessions,
        now,
        waited,
    };
    let decision = routes::route(&req, &state);
    let is_root = req.path == "/" && (req.method == "GET" || req.method == "HEAD");
    let refused = req.forwarded || (!is_root && req.flavor != Some(&b"Google"[..]));
    match &decision {
        Decision::Reply(r) => {
            check_response(r);
            if refused {
                assert_eq!(r.status, 403, "{req:?}");
            }
        }
        other => assert!(!refused, "{req:?} -> {other:?}"),
    }
    let live_session = mode & SESSION != 0 && req.session_token == Some(SESSION_TOKEN.as_bytes());
    let session_put = req.path == vnpd::bridge::session::TOKEN_PATH;
    if (required || cached.is_none()) && !live_session && !session_put && !refused && !is_root {
        match &decision {
            Decision::Reply(r) => assert!(matches!(r.status, 401 | 503), "{req:?} -> {r:?}"),
            other => panic!("served without a session: {req:?} -> {other:?}"),
        }
    }
    if let Decision::Wait { timeout, .. } = decision {
        assert!(!waited, "a request that waited is parked again");
        assert!(timeout <= routes::MAX_WAIT);
    }
}

/// Seed inputs: `(name, bytes with mode byte)`.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let get = |path: &str, extra: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: metadata\r\nMetadata-Flavor: Google\r\n{extra}\r\n")
    };
    let requests = [
        "GET / HTTP/1.1\r\n\r\n".to_string(),
        get("/computeMetadata/v1/instance/hostname", ""),
        get("/computeMetadata/v1/instance/?recursive=true&alt=text", ""),
        get("/computeMetadata/v1/instance/service-accounts/default/token", ""),
        get(
            "/computeMetadata/v1/instance/service-accounts/default/identity?audience=aud",
            "",
        ),
        get(
            "/computeMetadata/v1/instance/attributes/k?wait_for_change=true&last_etag=x&timeout_sec=5",
            "",
        ),
        get("/computeMetadata/v1/instance/id", "X-Forwarded-For: 1.2.3.4\r\n"),
        "PUT /computeMetadata/v1/instance/guest-attributes/hostkeys/ssh-rsa HTTP/1.1\r\nMetadata-Flavor: Google\r\nContent-Length: 4\r\n\r\nAAAA".to_string(),
        "GET /computeMetadata/v1/instance/id HTTP/1.1\r\n\r\n".to_string(),
    ];
    let mut out = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        for mode in [
            0u8,
            NOTHING_CACHED,
            TOKENS_HELD,
            WAITED,
            SESSION | SESSION_REQUIRED,
        ] {
            let mut bytes = vec![mode];
            bytes.extend_from_slice(r.as_bytes());
            out.push((format!("http-{i}-{mode}"), bytes));
        }
    }
    // A DNS query for metadata.google.internal, type A.
    let mut q = vec![DNS, 0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["metadata", "google", "internal"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    out.push(("dns-metadata".into(), q));
    out
}
