use super::*;
use crate::bridge::http::{parse, Parsed};
use crate::bridge::session::Sessions;
use crate::bridge::tree::tests::sample;

fn ask(raw: &str, cached: Option<&Cached>, tokens: &TokenCache, waited: bool) -> Decision {
    let Parsed::Complete(req, _) = parse(raw.as_bytes()) else {
        panic!("not a request: {raw}");
    };
    route(
        &req,
        &State {
            cached,
            tokens,
            sessions: &Sessions::default(),
            now: Instant::now(),
            waited,
        },
    )
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nMetadata-Flavor: Google\r\n\r\n")
}

fn answer(d: Decision) -> Response {
    match d {
        Decision::Reply(r) => r,
        other => panic!("{other:?}"),
    }
}

fn body(d: Decision) -> (u16, String) {
    let r = answer(d);
    (r.status, String::from_utf8(r.body).unwrap())
}

#[test]
fn leaves_listings_and_recursive() {
    let c = Cached::new(sample());
    let t = TokenCache::default();
    let q = |p: &str| body(ask(&get(p), Some(&c), &t, false));
    assert_eq!(
        q("/computeMetadata/v1/instance/hostname"),
        (200, "vm-a".into())
    );
    assert_eq!(
        q("/computeMetadata/v1/instance/network-interfaces/0/mtu"),
        (200, "1452".into())
    );
    assert_eq!(
        q("/computeMetadata/v1/project/project-id"),
        (200, "proj".into())
    );
    assert_eq!(
        q("/computeMetadata/v1/"),
        (200, "instance/\nproject/\n".into())
    );
    let (status, json) = q("/computeMetadata/v1/instance/?recursive=true");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["networkInterfaces"][0]["ip"], "10.0.0.2");
    assert_eq!(
        q("/computeMetadata/v1/instance/id?alt=json"),
        (200, "\"vm-a\"".into())
    );
    assert_eq!(
        q("/computeMetadata/v1/instance/attributes/?recursive=true&alt=text"),
        (200, "startup-script echo hi\n".into())
    );
    assert_eq!(
        q("/computeMetadata/v1/instance/guest-attributes/hostkeys/ssh-ed25519"),
        (200, "AAAAC3Nz".into())
    );
    // Unknown paths: 404 with a plain body.
    assert_eq!(
        q("/computeMetadata/v1/instance/nope"),
        (404, "Not Found\n".into())
    );
    assert_eq!(q("/computeMetadata/v2/"), (404, "Not Found\n".into()));
    // A directory without its slash is redirected, the query kept.
    let r = answer(ask(
        &get("/computeMetadata/v1/instance?recursive=true"),
        Some(&c),
        &t,
        false,
    ));
    assert_eq!(r.status, 301);
    assert_eq!(
        r.location.as_deref(),
        Some("/computeMetadata/v1/instance/?recursive=true")
    );
    assert_eq!(q("/computeMetadata/v1/instance/id?alt=xml").0, 400);
}

#[test]
fn header_policy() {
    let c = Cached::new(sample());
    let t = TokenCache::default();
    let no_header = "GET /computeMetadata/v1/instance/id HTTP/1.1\r\n\r\n";
    assert_eq!(body(ask(no_header, Some(&c), &t, false)).0, 403);
    let wrong = "GET /computeMetadata/v1/instance/id HTTP/1.1\r\nMetadata-Flavor: google\r\n\r\n";
    assert_eq!(body(ask(wrong, Some(&c), &t, false)).0, 403);
    let forwarded = "GET /computeMetadata/v1/instance/id HTTP/1.1\r\nMetadata-Flavor: Google\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n";
    assert_eq!(body(ask(forwarded, Some(&c), &t, false)).0, 403);
    // The root answers without the header (client libraries probe it); the response carries
    // the flavor header like every response (`Response::encode`).
    let root = answer(ask("GET / HTTP/1.1\r\n\r\n", Some(&c), &t, false));
    assert_eq!(root.status, 200);
    assert!(String::from_utf8(root.encode(false))
        .unwrap()
        .contains("Metadata-Flavor: Google\r\n"));
    let post = "POST /computeMetadata/v1/instance/id HTTP/1.1\r\nMetadata-Flavor: Google\r\n\r\n";
    assert_eq!(body(ask(post, Some(&c), &t, false)).0, 405);
    let put_id = "PUT /computeMetadata/v1/instance/id HTTP/1.1\r\nMetadata-Flavor: Google\r\nContent-Length: 1\r\n\r\nx";
    assert_eq!(body(ask(put_id, Some(&c), &t, false)).0, 405);
}

#[test]
fn nothing_cached_is_503_and_tokens_are_fetched_then_served() {
    let mut t = TokenCache::default();
    let path = "/computeMetadata/v1/instance/hostname";
    assert_eq!(body(ask(&get(path), None, &t, false)).0, 503);
    let c = Cached::new(sample());
    let tok = "/computeMetadata/v1/instance/service-accounts/default/token";
    assert_eq!(
        ask(&get(tok), Some(&c), &t, false),
        Decision::NeedAccessToken
    );
    let now = Instant::now();
    t.access = Some(HeldToken::new(
        AccessToken {
            access_token: "at".into(),
            expires_in: 3600,
            token_type: "Bearer".into(),
        },
        now,
        Duration::from_secs(3600),
    ));
    let (status, json) = body(ask(&get(tok), Some(&c), &t, false));
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["access_token"], "at");
    assert_eq!(v["token_type"], "Bearer");
    assert!(v["expires_in"].as_u64().unwrap() > 3500);
    // By the account's email too; an unknown account is 404.
    let by_email = "/computeMetadata/v1/instance/service-accounts/vm-a@net1.vnp/token";
    assert_eq!(body(ask(&get(by_email), Some(&c), &t, false)).0, 200);
    let other = "/computeMetadata/v1/instance/service-accounts/x@y/token";
    assert_eq!(body(ask(&get(other), Some(&c), &t, false)).0, 404);
    // Identity: the audience is required; held per audience and format.
    let id = "/computeMetadata/v1/instance/service-accounts/default/identity";
    assert_eq!(body(ask(&get(id), Some(&c), &t, false)).0, 400);
    let with_aud = format!("{id}?audience=https://svc&format=full");
    assert_eq!(
        ask(&get(&with_aud), Some(&c), &t, false),
        Decision::NeedIdentityToken {
            audience: "https://svc".into(),
            full: true
        }
    );
    t.identity.insert(
        ("https://svc".into(), true),
        HeldToken::new(
            IdentityToken {
                token: "jwt".into(),
                expires_in: 600,
            },
            now,
            Duration::from_secs(600),
        ),
    );
    assert_eq!(
        body(ask(&get(&with_aud), Some(&c), &t, false)),
        (200, "jwt".into())
    );
}

#[test]
fn tokens_are_not_served_close_to_expiry() {
    let now = Instant::now();
    let held = HeldToken::new("x", now, Duration::from_secs(40));
    assert!(held.fresh(now).is_some());
    // ttl/4 = 10 s before expiry it is no longer served.
    assert!(held.fresh(now + Duration::from_secs(29)).is_some());
    assert!(held.fresh(now + Duration::from_secs(31)).is_none());
    let mut cache = TokenCache {
        access: Some(HeldToken::new(
            AccessToken {
                access_token: "a".into(),
                expires_in: 40,
                token_type: "Bearer".into(),
            },
            now - Duration::from_secs(35),
            Duration::from_secs(40),
        )),
        ..TokenCache::default()
    };
    cache.prune(now);
    assert!(cache.access.is_none());
}

#[test]
fn hanging_gets() {
    let c = Cached::new(sample());
    let t = TokenCache::default();
    let path = "/computeMetadata/v1/instance/attributes/startup-script";
    let plain = answer(ask(&get(path), Some(&c), &t, false));
    let etag = plain.etag.clone().unwrap();
    // Same etag: wait; a different one: answer now; no etag: wait for the next change.
    let same = format!("{path}?wait_for_change=true&last_etag={etag}&timeout_sec=5");
    assert_eq!(
        ask(&get(&same), Some(&c), &t, false),
        Decision::Wait {
            etag: etag.clone(),
            timeout: Duration::from_secs(5)
        }
    );
    let stale = format!("{path}?wait_for_change=true&last_etag=0000");
    assert_eq!(answer(ask(&get(&stale), Some(&c), &t, false)).status, 200);
    let none = format!("{path}?wait_for_change=true&timeout_sec=100000");
    assert_eq!(
        ask(&get(&none), Some(&c), &t, false),
        Decision::Wait {
            etag: etag.clone(),
            timeout: MAX_WAIT
        }
    );
    // Once it waited, it answers.
    assert_eq!(
        answer(ask(&get(&same), Some(&c), &t, true)).body,
        b"echo hi"
    );
    // A change of the value changes the etag.
    let mut md = sample();
    md.instance
        .attributes
        .insert("startup-script".into(), "echo bye".into());
    let changed = Cached::new(md);
    assert_ne!(
        answer(ask(&get(path), Some(&changed), &t, false)).etag,
        Some(etag)
    );
    let bad = format!("{path}?wait_for_change=true&timeout_sec=-1");
    assert_eq!(answer(ask(&get(&bad), Some(&c), &t, false)).status, 400);
}

#[test]
fn guest_attribute_puts() {
    let c = Cached::new(sample());
    let t = TokenCache::default();
    let put = |path: &str, value: &str| {
        format!(
            "PUT /computeMetadata/v1/instance/guest-attributes/{path} HTTP/1.1\r\nMetadata-Flavor: Google\r\nContent-Length: {}\r\n\r\n{value}",
            value.len()
        )
    };
    assert_eq!(
        ask(
            &put("hostkeys/ssh-ed25519", "AAAA key"),
            Some(&c),
            &t,
            false
        ),
        Decision::PutGuestAttribute {
            namespace: "hostkeys".into(),
            key: "ssh-ed25519".into(),
            value: "AAAA key".into()
        }
    );
    // With nothing cached, whether the network requires sessions is unknown: a write goes on
    // with a live session token only.
    assert_eq!(body(ask(&put("ns/k", "v"), None, &t, false)).0, 503);
    let mut sessions = Sessions::default();
    let now = Instant::now();
    sessions.issue("tok".into(), Duration::from_secs(5), now);
    let with_session = put("ns/k", "v").replacen("\r\n", "\r\nX-Metadata-Token: tok\r\n", 1);
    assert!(matches!(
        ask_session(&with_session, None, &sessions, now),
        Decision::PutGuestAttribute { .. }
    ));
    assert_eq!(body(ask(&put("a%20b/k", "v"), Some(&c), &t, false)).0, 400);
    assert_eq!(
        body(ask(&put("ns/k/extra", "v"), Some(&c), &t, false)).0,
        405
    );
    let long = "k".repeat(MAX_GUEST_KEY + 1);
    assert_eq!(
        body(ask(&put(&format!("ns/{long}"), "v"), Some(&c), &t, false)).0,
        400
    );
}

fn ask_session(raw: &str, cached: Option<&Cached>, sessions: &Sessions, now: Instant) -> Decision {
    let Parsed::Complete(req, _) = parse(raw.as_bytes()) else {
        panic!("not a request: {raw}");
    };
    let tokens = TokenCache::default();
    let state = State {
        cached,
        tokens: &tokens,
        sessions,
        now,
        waited: false,
    };
    route(&req, &state)
}

fn with_token(path: &str, token: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nMetadata-Flavor: Google\r\nX-Metadata-Token: {token}\r\n\r\n")
}

#[test]
fn session_tokens_are_asked_with_a_put_and_a_ttl() {
    let c = Cached::new(sample());
    let s = Sessions::default();
    let now = Instant::now();
    let put = |headers: &str| {
        format!("PUT /computeMetadata/v1/token HTTP/1.1\r\nMetadata-Flavor: Google\r\n{headers}Content-Length: 0\r\n\r\n")
    };
    assert_eq!(
        ask_session(
            &put("X-Metadata-Token-TTL-Seconds: 30\r\n"),
            Some(&c),
            &s,
            now
        ),
        Decision::NewSession {
            ttl: Duration::from_secs(30)
        }
    );
    // Header names are case-insensitive; the flavor header is still required.
    assert!(matches!(
        ask_session(
            &put("x-metadata-token-ttl-seconds: 21600\r\n"),
            None,
            &s,
            now
        ),
        Decision::NewSession { .. }
    ));
    assert_eq!(body(ask_session(&put(""), Some(&c), &s, now)).0, 400);
    assert_eq!(
        body(ask_session(
            &put("X-Metadata-Token-TTL-Seconds: 0\r\n"),
            Some(&c),
            &s,
            now
        ))
        .0,
        400
    );
    let no_flavor =
        "PUT /computeMetadata/v1/token HTTP/1.1\r\nX-Metadata-Token-TTL-Seconds: 30\r\n\r\n";
    assert_eq!(body(ask_session(no_flavor, Some(&c), &s, now)).0, 403);
    let forwarded = "PUT /computeMetadata/v1/token HTTP/1.1\r\nMetadata-Flavor: Google\r\nX-Forwarded-For: 1.2.3.4\r\nX-Metadata-Token-TTL-Seconds: 30\r\n\r\n";
    assert_eq!(body(ask_session(forwarded, Some(&c), &s, now)).0, 403);
    // A GET of the token path is not how a session starts.
    assert_eq!(
        body(ask_session(
            &get("/computeMetadata/v1/token"),
            Some(&c),
            &s,
            now
        ))
        .0,
        405
    );
}

#[test]
fn a_network_requiring_sessions_refuses_requests_without_a_live_token() {
    let mut md = sample();
    md.project.require_session_token = true;
    let c = Cached::new(md);
    let t0 = Instant::now();
    let mut s = Sessions::default();
    s.issue("tok".into(), Duration::from_secs(10), t0);
    let name = "/computeMetadata/v1/instance/hostname";
    assert_eq!(body(ask_session(&get(name), Some(&c), &s, t0)).0, 401);
    assert_eq!(
        body(ask_session(&with_token(name, "tok"), Some(&c), &s, t0)),
        (200, "vm-a".into())
    );
    assert_eq!(
        body(ask_session(&with_token(name, "nope"), Some(&c), &s, t0)).0,
        401
    );
    let later = t0 + Duration::from_secs(10);
    assert_eq!(
        body(ask_session(&with_token(name, "tok"), Some(&c), &s, later)).0,
        401,
        "expired"
    );
    // Credentials too; the root probe stays open (it reveals nothing).
    let token = "/computeMetadata/v1/instance/service-accounts/default/token";
    assert_eq!(body(ask_session(&get(token), Some(&c), &s, t0)).0, 401);
    assert_eq!(
        ask_session(&with_token(token, "tok"), Some(&c), &s, t0),
        Decision::NeedAccessToken
    );
    let root = "GET / HTTP/1.1\r\n\r\n";
    assert_eq!(body(ask_session(root, Some(&c), &s, t0)).0, 200);
}

#[test]
fn where_sessions_are_optional_a_presented_token_must_still_be_live() {
    let c = Cached::new(sample());
    let now = Instant::now();
    let s = Sessions::default();
    let name = "/computeMetadata/v1/instance/hostname";
    assert_eq!(body(ask_session(&get(name), Some(&c), &s, now)).0, 200);
    assert_eq!(
        body(ask_session(&with_token(name, "forged"), Some(&c), &s, now)).0,
        401
    );
    // Nothing cached: the requirement is unknown, so only a live token goes on.
    assert_eq!(body(ask_session(&get(name), None, &s, now)).0, 503);
}
