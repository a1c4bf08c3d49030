//! The metadata-server target: the service bridge's HTTP handling, bytes from a guest in,
//! a decision out (`vnpd::bridge::http::parse` + `vnpd::bridge::routes::route`), and its DNS
//! answers (`vnpd::bridge::dns::answer`).
//!
//! Input: a mode byte, then the bytes. Mode bit 0 ([`DNS`]): the bytes are a DNS query instead
//! of HTTP. Bit 1 ([`NOTHING_CACHED`]): the registry was never reached. Bit 2 ([`TOKENS_HELD`]):
//! an access token and an identity token are held. Bit 3 ([`WAITED`]): the request already
//! waited (a hanging GET's second routing).
//!
//! Invariants asserted: every response carries `Metadata-Flavor: Google` and a
//! `Content-Length` equal to its body; a request without the exact flavor header gets 403
//! unless it is `GET /`; one with `X-Forwarded-For` always gets 403; a hanging GET waits at
//! most `MAX_WAIT`; a request that waited is never parked again; a consumed length never
//! exceeds the input.

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

fn metadata() -> VmMetadata {
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
        // Forwarding on or off: the TOKENS_HELD bit doubles as "an upstream is configured".
        let _ = dns::answer(bytes, &names, mode & TOKENS_HELD != 0);
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
    let cached = (mode & NOTHING_CACHED == 0).then(|| Cached::new(metadata()));
    let held = if mode & TOKENS_HELD != 0 {
        tokens(now)
    } else {
        TokenCache::default()
    };
    let waited = mode & WAITED != 0;
    let sessions = Sessions::default();
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
        for mode in [0u8, NOTHING_CACHED, TOKENS_HELD, WAITED] {
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
