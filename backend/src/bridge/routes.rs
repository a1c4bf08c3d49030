//! The metadata server's policy and routing: a parsed request and the bridge's state in, a
//! response or the one thing the bridge must fetch first out. Pure: the bridge thread does the
//! waiting and the registry calls, then asks again.
//!
//! Order: `X-Forwarded-For` refused (403: the guest is proxying someone else's request, the
//! classic SSRF path); `GET /` answered without the header (client libraries probe it); then
//! `Metadata-Flavor: Google` required (403); methods (GET/HEAD, PUT only on a guest attribute:
//! 405); the credentials (`token`, `identity`), a tree lookup (404 plain), 503 while nothing is
//! cached.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::http::{Request, Response};
use super::session::{self, SessionRefusal, Sessions};
use super::source::{AccessToken, IdentityToken, VmMetadata};
use super::tree::{self, Node};

/// Where the GCE-compatible tree lives.
pub const V1_PREFIX: &str = "/computeMetadata/v1/";
/// Default and largest `timeout_sec` of a hanging GET.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);
/// Largest `timeout_sec` honoured.
pub const MAX_WAIT: Duration = Duration::from_secs(300);
/// Most guest-attribute namespace or key length.
pub const MAX_GUEST_KEY: usize = 64;

/// The registry's metadata with its tree, as last fetched.
#[derive(Debug, Clone)]
pub struct Cached {
    /// The registry's answer.
    pub metadata: VmMetadata,
    /// Its tree.
    pub tree: Node,
}

impl Cached {
    /// Builds the tree of `metadata`.
    pub fn new(metadata: VmMetadata) -> Self {
        let tree = tree::build(&metadata);
        Self { metadata, tree }
    }
}

/// A token kept on the host until shortly before it expires.
#[derive(Debug, Clone)]
pub struct HeldToken<T> {
    /// The token.
    pub token: T,
    /// When it expires.
    pub expires_at: Instant,
    /// When it is no longer served (expiry minus a margin: a guest never gets a token about
    /// to expire).
    pub refresh_at: Instant,
}

impl<T> HeldToken<T> {
    /// Holds `token`, minted at `now`, valid `ttl`: served until `min(60 s, ttl / 4)` before
    /// expiry.
    pub fn new(token: T, now: Instant, ttl: Duration) -> Self {
        let margin = (ttl / 4).min(Duration::from_secs(60));
        Self {
            token,
            expires_at: now + ttl,
            refresh_at: now + ttl - margin,
        }
    }

    fn fresh(&self, now: Instant) -> Option<&Self> {
        (now < self.refresh_at).then_some(self)
    }

    fn remaining_secs(&self, now: Instant) -> u64 {
        self.expires_at.saturating_duration_since(now).as_secs()
    }
}

/// Tokens held for one VM.
#[derive(Debug, Default)]
pub struct TokenCache {
    /// The access token.
    pub access: Option<HeldToken<AccessToken>>,
    /// Identity tokens by (audience, full format).
    pub identity: HashMap<(String, bool), HeldToken<IdentityToken>>,
}

/// Most identity tokens held per VM (one per audience and format).
pub const MAX_IDENTITY_AUDIENCES: usize = 32;

impl TokenCache {
    /// Forgets what is past its refresh time, and the oldest audiences past the limit.
    pub fn prune(&mut self, now: Instant) {
        if self.access.as_ref().is_some_and(|t| t.fresh(now).is_none()) {
            self.access = None;
        }
        self.identity.retain(|_, t| t.fresh(now).is_some());
        while self.identity.len() > MAX_IDENTITY_AUDIENCES {
            let oldest = self
                .identity
                .iter()
                .min_by_key(|(_, t)| t.expires_at)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.identity.remove(&k),
                None => break,
            };
        }
    }
}

/// What the bridge has for routing one request.
#[derive(Debug, Clone, Copy)]
pub struct State<'a> {
    /// The metadata, when any was ever fetched.
    pub cached: Option<&'a Cached>,
    /// Held tokens.
    pub tokens: &'a TokenCache,
    /// Live metadata session tokens.
    pub sessions: &'a Sessions,
    /// Now.
    pub now: Instant,
    /// The request already waited (its hanging GET timed out, or it is re-asked after a
    /// change): answer, never wait again.
    pub waited: bool,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send this.
    Reply(Response),
    /// Mint an access token, then route again.
    NeedAccessToken,
    /// Mint an identity token, then route again.
    NeedIdentityToken {
        /// Audience.
        audience: String,
        /// Full format.
        full: bool,
    },
    /// A hanging GET: route again when the metadata changes or after `timeout`; answer when
    /// the response's ETag is no longer `etag` (or the time is up).
    Wait {
        /// ETag of the response as it is now.
        etag: String,
        /// How long at most.
        timeout: Duration,
    },
    /// Issue a metadata session token valid for `ttl` and answer it (with IP TTL 1).
    NewSession {
        /// Its lifetime.
        ttl: Duration,
    },
    /// Write a guest attribute through to the registry, then answer 200.
    PutGuestAttribute {
        /// Namespace.
        namespace: String,
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
}

fn reply(status: u16, body: &str) -> Decision {
    Decision::Reply(Response::text(status, format!("{body}\n")))
}

/// 429: the VM's request rate is spent.
pub fn too_many_requests() -> Response {
    Response::text(429, "too many requests\n")
}

/// 503: the registry could not be reached and nothing is cached (or a mint failed).
pub fn unavailable() -> Response {
    Response::text(503, "metadata temporarily unavailable\n")
}

/// 401: a metadata session token is required and missing, or it is not live.
pub fn unauthorized(why: SessionRefusal) -> Response {
    Response::text(
        401,
        match why {
            SessionRefusal::Missing => "metadata session token required: PUT /computeMetadata/v1/token with X-Metadata-Token-TTL-Seconds, then send it as X-Metadata-Token\n",
            SessionRefusal::Invalid => "metadata session token invalid or expired\n",
        },
    )
}

/// `PUT /computeMetadata/v1/token`, and the session check of every other request: `None` when
/// the request may go on.
fn session_gate(req: &Request<'_>, state: &State<'_>) -> Option<Decision> {
    if req.path == session::TOKEN_PATH {
        if req.method != "PUT" {
            return Some(reply(405, "Method Not Allowed"));
        }
        return Some(match session::parse_ttl(req.session_ttl) {
            Ok(ttl) => Decision::NewSession { ttl },
            Err(why) => reply(400, why),
        });
    }
    let Some(cached) = state.cached else {
        // Whether the network requires sessions is not known yet: nothing is served without
        // a live token (and nothing but tokens could be served anyway).
        return match state.sessions.check(req.session_token, true, state.now) {
            Ok(()) => None,
            Err(SessionRefusal::Missing) => Some(Decision::Reply(unavailable())),
            Err(why) => Some(Decision::Reply(unauthorized(why))),
        };
    };
    let required = cached.metadata.project.require_session_token;
    match state.sessions.check(req.session_token, required, state.now) {
        Ok(()) => None,
        Err(why) => Some(Decision::Reply(unauthorized(why))),
    }
}

/// Routes one request.
pub fn route(req: &Request<'_>, state: &State<'_>) -> Decision {
    if req.forwarded {
        return reply(403, "X-Forwarded-For header is not allowed");
    }
    let head_or_get = req.method == "GET" || req.method == "HEAD";
    if req.path == "/" && head_or_get {
        return Decision::Reply(Response::text(200, "computeMetadata/\n"));
    }
    if req.flavor != Some(b"Google") {
        return reply(403, "Missing required header: \"Metadata-Flavor: Google\"");
    }
    if let Some(d) = session_gate(req, state) {
        return d;
    }
    if req.path == "/computeMetadata/" || req.path == "/computeMetadata" {
        return listing_or_redirect(req, "/computeMetadata/", "v1/\n");
    }
    let Some(rel) = req.path.strip_prefix(V1_PREFIX) else {
        if req.path == "/computeMetadata/v1" {
            return redirect(req, V1_PREFIX);
        }
        return reply(404, "Not Found");
    };
    let segs: Vec<&str> = rel.split('/').collect();
    match req.method {
        "PUT" => return put(req, &segs),
        "GET" | "HEAD" => {}
        _ => return reply(405, "Method Not Allowed"),
    }
    if let Some(d) = credentials(req, state, &segs) {
        return d;
    }
    let Some(cached) = state.cached else {
        return Decision::Reply(unavailable());
    };
    let Some(node) = cached.tree.find(segs.iter().copied()) else {
        return reply(404, "Not Found");
    };
    if node.is_dir() && !rel.is_empty() && !rel.ends_with('/') {
        return redirect(req, &format!("{}/", req.path));
    }
    let response = match render(req, node) {
        Ok(r) => r,
        Err(d) => return d,
    };
    let etag = response.etag.clone().unwrap_or_default();
    match wait_param(req) {
        Err(d) => d,
        Ok(Some((last, timeout))) if !state.waited && last.is_none_or(|l| l == etag) => {
            Decision::Wait { etag, timeout }
        }
        Ok(_) => Decision::Reply(response),
    }
}

fn listing_or_redirect(req: &Request<'_>, dir_path: &str, body: &str) -> Decision {
    if req.path != dir_path {
        return redirect(req, dir_path);
    }
    Decision::Reply(Response::text(200, body))
}

fn redirect(req: &Request<'_>, to: &str) -> Decision {
    let query: Vec<String> = req
        .query
        .iter()
        .map(|(k, v)| {
            form_urlencoded::Serializer::new(String::new())
                .append_pair(k, v)
                .finish()
        })
        .collect();
    let mut location = to.to_string();
    if !query.is_empty() {
        location = format!("{location}?{}", query.join("&"));
    }
    let mut r = Response::text(301, format!("{location}\n"));
    r.location = Some(location);
    Decision::Reply(r)
}

/// `?wait_for_change=true[&last_etag=E][&timeout_sec=N]`: `Ok(None)` when not a hanging GET.
fn wait_param<'r>(req: &'r Request<'_>) -> Result<Option<(Option<&'r str>, Duration)>, Decision> {
    match req.param("wait_for_change") {
        None | Some("false") => return Ok(None),
        Some("true") => {}
        Some(_) => return Err(reply(400, "wait_for_change must be true or false")),
    }
    let timeout = match req.param("timeout_sec") {
        None => DEFAULT_WAIT,
        Some(s) => match s.parse::<u64>() {
            Ok(n) if n > 0 => Duration::from_secs(n).min(MAX_WAIT),
            _ => return Err(reply(400, "timeout_sec must be a positive integer")),
        },
    };
    Ok(Some((req.param("last_etag"), timeout)))
}

/// A node as the request's `alt` and `recursive` ask, with its ETag.
fn render(req: &Request<'_>, node: &Node) -> Result<Response, Decision> {
    let recursive = match req.param("recursive") {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(reply(400, "recursive must be true or false")),
    };
    let alt = req.param("alt");
    let json = match alt {
        None => node.is_dir() && recursive,
        Some("json") => true,
        Some("text") => false,
        Some(_) => return Err(reply(400, "alt must be json or text")),
    };
    let mut response = match (node.leaf_text(), recursive, json) {
        (Some(v), _, false) => Response::text(200, v),
        (Some(_), _, true) => Response::json(200, node.to_json().to_string()),
        (None, true, true) => Response::json(200, node.to_json().to_string()),
        (None, true, false) => {
            let mut out = String::new();
            node.to_text_lines("", &mut out);
            Response::text(200, out)
        }
        (None, false, true) => {
            Response::json(200, serde_json::Value::from(node.listing()).to_string())
        }
        (None, false, false) => {
            let body: String = node.listing().iter().map(|e| format!("{e}\n")).collect();
            Response::text(200, body)
        }
    };
    response.etag = Some(etag_of(&response.body));
    Ok(response)
}

/// The ETag of a body: it changes exactly when the body does.
pub fn etag_of(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// `instance/service-accounts/{default|email}/{token|identity}`.
fn credentials(req: &Request<'_>, state: &State<'_>, segs: &[&str]) -> Option<Decision> {
    let ["instance", "service-accounts", account, leaf] = segs else {
        return None;
    };
    if !matches!(*leaf, "token" | "identity") {
        return None;
    }
    let known = *account == "default"
        || state
            .cached
            .is_some_and(|c| c.metadata.instance.service_account.email == *account);
    if !known {
        return Some(reply(404, "Not Found"));
    }
    Some(if *leaf == "token" {
        access_token(state)
    } else {
        identity_token(req, state)
    })
}

fn access_token(state: &State<'_>) -> Decision {
    let Some(held) = state
        .tokens
        .access
        .as_ref()
        .and_then(|t| t.fresh(state.now))
    else {
        return Decision::NeedAccessToken;
    };
    let body = serde_json::json!({
        "access_token": held.token.access_token,
        "expires_in": held.remaining_secs(state.now),
        "token_type": "Bearer",
    });
    Decision::Reply(Response::json(200, body.to_string()))
}

fn identity_token(req: &Request<'_>, state: &State<'_>) -> Decision {
    let audience = match req.param("audience") {
        Some(a) if !a.is_empty() && a.len() <= 512 => a.to_string(),
        _ => return reply(400, "non-empty audience parameter required"),
    };
    let full = match req.param("format") {
        None | Some("standard") => false,
        Some("full") => true,
        Some(_) => return reply(400, "format must be standard or full"),
    };
    let key = (audience, full);
    match state
        .tokens
        .identity
        .get(&key)
        .and_then(|t| t.fresh(state.now))
    {
        Some(held) => Decision::Reply(Response::text(200, held.token.token.clone())),
        None => Decision::NeedIdentityToken {
            audience: key.0,
            full: key.1,
        },
    }
}

/// `PUT instance/guest-attributes/{namespace}/{key}`.
fn put(req: &Request<'_>, segs: &[&str]) -> Decision {
    let ["instance", "guest-attributes", namespace, key] = segs else {
        return reply(405, "Method Not Allowed");
    };
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= MAX_GUEST_KEY
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !name_ok(namespace) || !name_ok(key) {
        return reply(
            400,
            "guest attribute namespace and key must be [A-Za-z0-9_-]{1,64}",
        );
    }
    let Ok(value) = std::str::from_utf8(req.body) else {
        return reply(400, "guest attribute value must be UTF-8");
    };
    Decision::PutGuestAttribute {
        namespace: namespace.to_string(),
        key: key.to_string(),
        value: value.to_string(),
    }
}

#[cfg(test)]
mod tests;
