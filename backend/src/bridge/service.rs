//! Bridging an external service (US20140282510): an operator names a service on the host
//! network (`[[bridge.services]]` in vnpd.toml); guests reach it at the metadata address on
//! the service's port, and the bridge forwards each HTTP request to it with the VM's identity
//! token added (`Authorization: Bearer <identity token for the service's audience>`), so the
//! service knows which VM calls without the guest holding any credential.
//!
//! [`upstream_request`] and [`check_response`] are pure; [`exchange`] is the blocking round
//! trip, run on a thread of its own per request (bounded by the bridge).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::http::{MAX_BODY, MAX_HEAD, MAX_HEADERS};

/// Longest upstream response passed back to the guest.
pub const MAX_RESPONSE: usize = 256 * 1024;
/// Time to connect to the upstream.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time for the whole exchange (request written, response read to its end).
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests of one VM in flight to its services at once.
pub const MAX_IN_FLIGHT: usize = 8;
/// Most services per host.
pub const MAX_SERVICES: usize = 16;

/// An operator-configured service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceSpec {
    /// Its name (logs, counters).
    pub name: String,
    /// The port guests connect to at the metadata address.
    pub port: u16,
    /// Where it listens on the host network.
    pub upstream: SocketAddr,
    /// The audience of the identity tokens the bridge adds.
    pub audience: String,
}

/// Why a service exchange failed (answered 502, or 504 for `Timeout`; counted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// Not reachable.
    #[error("service unreachable: {0}")]
    Connect(String),
    /// It did not answer in time.
    #[error("service timed out")]
    Timeout,
    /// Its answer was larger than [`MAX_RESPONSE`].
    #[error("service response larger than {MAX_RESPONSE} bytes")]
    TooLarge,
    /// Its answer was not an HTTP/1.x response.
    #[error("service response is not HTTP/1.x")]
    NotHttp,
}

impl ServiceError {
    /// The status the guest gets.
    pub fn status(&self) -> u16 {
        match self {
            ServiceError::Timeout => 504,
            _ => 502,
        }
    }
}

/// Headers the guest may not pass on: the bridge's own (`Authorization` is the VM's identity,
/// `Host` the upstream's, `X-Metadata-Token` the metadata session's) and hop-by-hop ones.
fn dropped(name: &str) -> bool {
    [
        "authorization",
        "proxy-authorization",
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "x-metadata-token",
        "x-metadata-token-ttl-seconds",
    ]
    .iter()
    .any(|d| name.eq_ignore_ascii_case(d))
}

/// The request to send upstream for the guest's whole request `raw` (already framed by
/// `http::parse`): the guest's request line, its end-to-end headers and body, plus `Host`,
/// the VM's identity token and `Connection: close`. `None` when `raw` is not a request.
pub fn upstream_request(raw: &[u8], spec: &ServiceSpec, identity_token: &str) -> Option<Vec<u8>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(raw) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
        _ => return None,
    };
    let (method, path) = (req.method?, req.path?);
    let body = &raw[head_len..];
    if body.len() > MAX_BODY {
        return None;
    }
    let mut out = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {identity_token}\r\n\
         Connection: close\r\n",
        spec.upstream
    )
    .into_bytes();
    for h in req.headers.iter().filter(|h| !dropped(h.name)) {
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    Some(out)
}

/// Checks an upstream response read to its end: passed to the guest as it is.
pub fn check_response(response: &[u8]) -> Result<(), ServiceError> {
    if response.len() > MAX_RESPONSE {
        return Err(ServiceError::TooLarge);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut headers);
    match r.parse(response) {
        Ok(httparse::Status::Complete(_)) => Ok(()),
        _ => Err(ServiceError::NotHttp),
    }
}

/// One round trip: connects, writes `request`, reads the response until the upstream closes
/// (the request says `Connection: close`), within the timeouts and size limit.
pub fn exchange(upstream: SocketAddr, request: &[u8]) -> Result<Vec<u8>, ServiceError> {
    let deadline = Instant::now() + EXCHANGE_TIMEOUT;
    let mut stream = TcpStream::connect_timeout(&upstream, CONNECT_TIMEOUT).map_err(|e| {
        if e.kind() == std::io::ErrorKind::TimedOut {
            ServiceError::Timeout
        } else {
            ServiceError::Connect(e.to_string())
        }
    })?;
    let timed_out = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ServiceError::Timeout,
        _ => ServiceError::Connect(e.to_string()),
    };
    stream
        .set_write_timeout(Some(EXCHANGE_TIMEOUT))
        .and_then(|()| stream.write_all(request))
        .map_err(timed_out)?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ServiceError::Timeout);
        }
        stream.set_read_timeout(Some(left)).map_err(timed_out)?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                response.extend_from_slice(&chunk[..n]);
                if response.len() > MAX_RESPONSE {
                    return Err(ServiceError::TooLarge);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(timed_out(e)),
        }
    }
    check_response(&response)?;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServiceSpec {
        ServiceSpec {
            name: "inv".into(),
            port: 8080,
            upstream: "198.18.0.10:9000".parse().unwrap(),
            audience: "https://inv.example".into(),
        }
    }

    #[test]
    fn the_request_carries_the_vms_token_and_never_the_guests_credentials() {
        let raw = b"POST /items?x=1 HTTP/1.1\r\nHost: 169.254.169.254:8080\r\nAuthorization: Bearer forged\r\nX-Metadata-Token: s\r\nConnection: keep-alive\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello";
        let out = upstream_request(raw, &spec(), "TOKEN").unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("POST /items?x=1 HTTP/1.1\r\nHost: 198.18.0.10:9000\r\nAuthorization: Bearer TOKEN\r\nConnection: close\r\n"), "{text}");
        assert!(
            !text.contains("forged") && !text.contains("X-Metadata-Token"),
            "{text}"
        );
        assert!(!text.contains("keep-alive"), "{text}");
        assert!(text.contains("Content-Type: text/plain\r\n"));
        assert!(text.ends_with("Content-Length: 5\r\n\r\nhello"), "{text}");
        assert_eq!(upstream_request(b"garbage", &spec(), "T"), None);
    }

    #[test]
    fn responses_must_be_http_and_bounded() {
        assert_eq!(check_response(b"HTTP/1.0 200 OK\r\n\r\nhi"), Ok(()));
        assert_eq!(
            check_response(b"SSH-2.0-OpenSSH\r\n"),
            Err(ServiceError::NotHttp)
        );
        assert_eq!(
            check_response(b"HTTP/1.1 200 OK\r\n"),
            Err(ServiceError::NotHttp)
        );
        let big = [
            b"HTTP/1.1 200 OK\r\n\r\n".as_slice(),
            &vec![b'x'; MAX_RESPONSE],
        ]
        .concat();
        assert_eq!(check_response(&big), Err(ServiceError::TooLarge));
        assert_eq!(ServiceError::Timeout.status(), 504);
        assert_eq!(ServiceError::NotHttp.status(), 502);
    }

    #[test]
    fn an_exchange_with_a_real_socket_and_its_failures() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).unwrap();
            buf.truncate(n);
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .unwrap();
            buf
        });
        let r = exchange(addr, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
        assert!(r.ends_with(b"\r\n\r\nok"));
        assert!(server.join().unwrap().starts_with(b"GET / HTTP/1.1"));
        // Nobody listens any more.
        assert!(matches!(
            exchange(addr, b"GET / HTTP/1.1\r\n\r\n"),
            Err(ServiceError::Connect(_))
        ));
    }
}
