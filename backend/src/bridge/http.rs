//! HTTP/1.1 framing for the metadata server: parsing one request out of the bytes a guest sent
//! (with `httparse`, bounded), and writing responses. Pure: no I/O, no clocks.

use std::borrow::Cow;

/// Largest request head (request line + headers) accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body accepted (a guest attribute value; an SSH host key is under 1 KiB).
pub const MAX_BODY: usize = 16 * 1024;
/// Most headers in one request.
pub const MAX_HEADERS: usize = 32;

/// One parsed request, borrowing the connection's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// Method, as sent.
    pub method: &'a str,
    /// Path without the query, percent-decoded.
    pub path: Cow<'a, str>,
    /// Query parameters, decoded, in order.
    pub query: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// The `Metadata-Flavor` header's value, if present.
    pub flavor: Option<&'a [u8]>,
    /// Whether an `X-Forwarded-For` header was present (a proxied request: refused).
    pub forwarded: bool,
    /// The session token header's value (`X-Metadata-Token`), if present.
    pub session_token: Option<&'a [u8]>,
    /// The session TTL header's value (`X-Metadata-Token-TTL-Seconds`), if present.
    pub session_ttl: Option<&'a [u8]>,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    /// The body (`Content-Length` bytes).
    pub body: &'a [u8],
}

impl Request<'_> {
    /// The first value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_ref())
    }
}

/// Why bytes are not a request: answered with `status`, then the connection closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Not HTTP/1.x, a bad request line or header, a bad `Content-Length`, chunked bodies.
    BadRequest(&'static str),
    /// The head is larger than [`MAX_HEAD`] or has more than [`MAX_HEADERS`] headers.
    HeadTooLarge,
    /// The body is larger than [`MAX_BODY`].
    BodyTooLarge,
}

impl Malformed {
    /// The response to send before closing.
    pub fn response(self) -> Response {
        let (status, text) = match self {
            Malformed::BadRequest(why) => (400, why),
            Malformed::HeadTooLarge => (431, "request header fields too large"),
            Malformed::BodyTooLarge => (413, "request body too large"),
        };
        let mut r = Response::text(status, format!("{text}\n"));
        r.close = true;
        r
    }
}

/// What the buffer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// Not a whole request yet (and still within the limits).
    Partial,
    /// A request, and how many bytes of the buffer it used.
    Complete(Request<'a>, usize),
    /// Not a request: answer and close.
    Bad(Malformed),
}

/// Parses the request at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed<'_> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => {
            return Parsed::Bad(Malformed::HeadTooLarge)
        }
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Parsed::Bad(Malformed::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::Bad(Malformed::HeadTooLarge),
        Err(_) => return Parsed::Bad(Malformed::BadRequest("malformed request")),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Bad(Malformed::BadRequest("malformed request"));
    };
    let mut flavor = None;
    let mut forwarded = false;
    let (mut session_token, mut session_ttl) = (None, None);
    let mut content_length: Option<usize> = None;
    let mut keep_alive = version == 1;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("metadata-flavor") {
            flavor = Some(h.value);
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded = true;
        } else if name.eq_ignore_ascii_case(super::session::TOKEN_HEADER) {
            session_token = Some(h.value);
        } else if name.eq_ignore_ascii_case(super::session::TTL_HEADER) {
            session_ttl = Some(h.value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Bad(Malformed::BadRequest("transfer-encoding is not supported"));
        } else if name.eq_ignore_ascii_case("content-length") {
            let len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
            match (len, content_length) {
                (Some(n), None) => content_length = Some(n),
                // A second, or unreadable, length: request smuggling territory.
                _ => return Parsed::Bad(Malformed::BadRequest("bad content-length")),
            }
        } else if name.eq_ignore_ascii_case("connection") {
            let v = h.value;
            if v.eq_ignore_ascii_case(b"close") {
                keep_alive = false;
            } else if v.eq_ignore_ascii_case(b"keep-alive") {
                keep_alive = true;
            }
        }
    }
    let body_len = content_length.unwrap_or(0);
    if body_len > MAX_BODY {
        return Parsed::Bad(Malformed::BodyTooLarge);
    }
    let Some(body) = buf.get(head_len..head_len + body_len) else {
        return Parsed::Partial;
    };
    let Some((path, query)) = split_target(target) else {
        return Parsed::Bad(Malformed::BadRequest("bad request target"));
    };
    let request = Request {
        method,
        path,
        query,
        flavor,
        forwarded,
        session_token,
        session_ttl,
        keep_alive,
        body,
    };
    Parsed::Complete(request, head_len + body_len)
}

type Query<'a> = Vec<(Cow<'a, str>, Cow<'a, str>)>;

/// Splits an origin-form target into its decoded path and query; `None` for anything else
/// (absolute-form `http://…` targets are what a proxy receives: not for us).
fn split_target(target: &str) -> Option<(Cow<'_, str>, Query<'_>)> {
    if !target.starts_with('/') {
        return None;
    }
    let (raw_path, raw_query) = target.split_once('?').unwrap_or((target, ""));
    let path = percent_encoding::percent_decode_str(raw_path)
        .decode_utf8()
        .ok()?;
    // A decoded path must still be a plain path: no way to climb out with `%2e%2e`.
    if path.split('/').any(|s| s == ".." || s == ".") || path.contains('\0') {
        return None;
    }
    let query = form_urlencoded::parse(raw_query.as_bytes()).collect();
    Some((path, query))
}

/// A response to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// `ETag`, when the body is metadata.
    pub etag: Option<String>,
    /// `Location`, for redirects.
    pub location: Option<String>,
    /// The body.
    pub body: Vec<u8>,
    /// Close the connection after it.
    pub close: bool,
    /// `X-Metadata-Token-TTL-Seconds`, on the answer to a session token PUT.
    pub session_ttl: Option<u64>,
}

impl Response {
    /// A plain-text response.
    pub fn text(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            content_type: "application/text",
            etag: None,
            location: None,
            body: body.into(),
            close: false,
            session_ttl: None,
        }
    }

    /// A JSON response.
    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            content_type: "application/json",
            ..Self::text(status, body)
        }
    }

    /// The bytes on the wire; `head_only` for `HEAD` (headers, no body).
    pub fn encode(&self, head_only: bool) -> Vec<u8> {
        use std::fmt::Write;
        let mut head = String::with_capacity(256);
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\nMetadata-Flavor: Google\r\nServer: Metadata Server for VM\r\n\
             Content-Type: {}\r\nContent-Length: {}\r\nX-XSS-Protection: 0\r\n\
             X-Frame-Options: SAMEORIGIN\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        if let Some(etag) = &self.etag {
            let _ = write!(head, "ETag: {etag}\r\n");
        }
        if let Some(location) = &self.location {
            let _ = write!(head, "Location: {location}\r\n");
        }
        if let Some(ttl) = self.session_ttl {
            let _ = write!(head, "{}: {ttl}\r\n", super::session::TTL_HEADER);
        }
        if self.close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// The reason phrase of the statuses the server sends.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        301 => "Moved Permanently",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> (Request<'_>, usize) {
        match parse(buf) {
            Parsed::Complete(r, n) => (r, n),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_get_with_query_and_headers() {
        let raw = b"GET /computeMetadata/v1/instance/attributes/a%20b?recursive=true&alt=json HTTP/1.1\r\nHost: x\r\nmetadata-flavor: Google\r\n\r\nGET / HTTP/1.1\r\n";
        let (r, n) = complete(raw);
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/computeMetadata/v1/instance/attributes/a b");
        assert_eq!(r.param("recursive"), Some("true"));
        assert_eq!(r.param("alt"), Some("json"));
        assert_eq!(r.flavor, Some(&b"Google"[..]));
        assert!(r.keep_alive && !r.forwarded);
        assert_eq!(&raw[n..], b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn partial_until_the_body_is_there() {
        let raw = b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nabc";
        assert_eq!(parse(raw), Parsed::Partial);
        assert_eq!(parse(&raw[..10]), Parsed::Partial);
        let full = b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nabcde";
        let (r, n) = complete(full);
        assert_eq!(r.body, b"abcde");
        assert_eq!(n, full.len());
        assert!(!r.keep_alive);
    }

    #[test]
    fn refusals() {
        let bad = |raw: &[u8]| match parse(raw) {
            Parsed::Bad(m) => m,
            other => panic!("{other:?}"),
        };
        assert!(matches!(
            bad(b"\x00\x01garbage\r\n\r\n"),
            Malformed::BadRequest(_)
        ));
        assert!(matches!(
            bad(b"GET http://evil/ HTTP/1.1\r\n\r\n"),
            Malformed::BadRequest(_)
        ));
        assert!(matches!(
            bad(b"GET /a/../b HTTP/1.1\r\n\r\n"),
            Malformed::BadRequest(_)
        ));
        assert!(matches!(
            bad(b"GET /a/%2e%2e/b HTTP/1.1\r\n\r\n"),
            Malformed::BadRequest(_)
        ));
        assert!(matches!(
            bad(b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Malformed::BadRequest(_)
        ));
        assert!(matches!(
            bad(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Malformed::BadRequest(_)
        ));
        let big_body = format!("PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        assert_eq!(bad(big_body.as_bytes()), Malformed::BodyTooLarge);
        let mut long = b"GET /".to_vec();
        long.resize(MAX_HEAD + 10, b'a');
        assert_eq!(bad(&long), Malformed::HeadTooLarge);
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("H{i}: v\r\n"))
            .collect();
        let raw = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(bad(raw.as_bytes()), Malformed::HeadTooLarge);
        assert_eq!(Malformed::HeadTooLarge.response().status, 431);
        assert!(Malformed::BodyTooLarge.response().close);
    }

    #[test]
    fn forwarded_and_http10() {
        let (r, _) = complete(b"GET / HTTP/1.0\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n");
        assert!(r.forwarded);
        assert!(!r.keep_alive);
    }

    #[test]
    fn responses_carry_the_flavor_header() {
        let mut r = Response::text(200, "v1/\n");
        r.etag = Some("abc".into());
        let wire = String::from_utf8(r.encode(false)).unwrap();
        assert!(wire.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(wire.contains("Metadata-Flavor: Google\r\n"));
        assert!(wire.contains("Content-Length: 4\r\n"));
        assert!(wire.contains("ETag: abc\r\n"));
        assert!(wire.ends_with("\r\n\r\nv1/\n"));
        let head = String::from_utf8(r.encode(true)).unwrap();
        assert!(head.ends_with("\r\n\r\n"));
    }
}
