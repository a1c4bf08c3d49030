//! The admin socket: JSON lines over a unix stream socket (see
//! `vnpd_admin_api` for the protocol).
//!
//! One thread accepts; each connection gets its own thread (at most [`MAX_CONNECTIONS`] at
//! once) so that a slow or idle client cannot hold up others. A line longer than
//! [`MAX_LINE_LEN`] or that is not valid UTF-8 gets an error answer and closes the connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use vnpd_admin_api::{
    parse_request, AdminErrorCode, AdminFailure, AdminRequest, AdminResponse, MAX_LINE_LEN,
};

/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// An idle connection is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// What serves a parsed request.
pub type Handler = dyn Fn(AdminRequest) -> AdminResponse + Send + Sync;

/// Errors starting the admin socket.
#[derive(Debug, thiserror::Error)]
#[error("admin socket {path}: {source}")]
pub struct AdminSocketError {
    /// Socket path.
    pub path: PathBuf,
    /// Underlying error.
    pub source: std::io::Error,
}

/// The listening admin socket; stops accepting and removes the file on drop.
#[derive(Debug)]
pub struct AdminServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AdminServer {
    /// Listens on `path` (mode 0600; a stale socket file is replaced, a live one refused).
    pub fn start(path: &Path, handler: Arc<Handler>) -> Result<Self, AdminSocketError> {
        let err = |source| AdminSocketError {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists and is not a socket",
                )));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another vnpd is listening on it",
                )));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || accept_loop(listener, handler, &stop2))
            .map_err(err)?;
        log::info!("admin: listening on {}", path.display());
        Ok(Self {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, handler: Arc<Handler>, stop: &AtomicBool) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                    let _ = stream.set_nonblocking(false);
                    let _ = write_response(
                        &mut stream,
                        &AdminResponse::Error(AdminFailure::new(
                            AdminErrorCode::Internal,
                            "too many admin connections",
                        )),
                    );
                    continue;
                }
                active.fetch_add(1, Ordering::Relaxed);
                let handler = Arc::clone(&handler);
                let active2 = Arc::clone(&active);
                let spawned =
                    std::thread::Builder::new()
                        .name("admin-conn".into())
                        .spawn(move || {
                            if let Err(e) = serve_connection(stream, &*handler) {
                                log::debug!("admin: connection ended: {e}");
                            }
                            active2.fetch_sub(1, Ordering::Relaxed);
                        });
                if let Err(e) = spawned {
                    active.fetch_sub(1, Ordering::Relaxed);
                    log::warn!("admin: cannot spawn a connection thread: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(25));
            }
            Err(e) => {
                log::warn!("admin: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn write_response(stream: &mut UnixStream, resp: &AdminResponse) -> std::io::Result<()> {
    let mut line = serde_json::to_string(resp).expect("responses always serialize");
    line.push('\n');
    stream.write_all(line.as_bytes())
}

/// Reads one line of at most `MAX_LINE_LEN` bytes. `Ok(None)` at end of stream.
fn read_line(reader: &mut impl BufRead) -> Result<Option<String>, AdminFailure> {
    let mut buf = Vec::new();
    let n = reader
        .take(MAX_LINE_LEN as u64)
        .read_until(b'\n', &mut buf)
        .map_err(|e| AdminFailure::new(AdminErrorCode::BadRequest, format!("read: {e}")))?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(AdminFailure::new(
            AdminErrorCode::BadRequest,
            format!("request line too long or unterminated (limit {MAX_LINE_LEN} bytes)"),
        ));
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| AdminFailure::new(AdminErrorCode::BadRequest, "request is not valid UTF-8"))
}

fn serve_connection(stream: UnixStream, handler: &Handler) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        match read_line(&mut reader) {
            Ok(None) => return Ok(()),
            Ok(Some(line)) => {
                if line.trim().is_empty() {
                    continue;
                }
                let resp = match parse_request(&line) {
                    Ok(req) => handler(req),
                    Err(f) => AdminResponse::Error(f),
                };
                write_response(&mut writer, &resp)?;
            }
            Err(f) => {
                // The rest of an overlong line cannot be resynchronised: answer and close.
                write_response(&mut writer, &AdminResponse::Error(f))?;
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vnpd_admin_api::{AdminClientError, AdminReply, VnpdAdminClient};

    fn sock_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vnpd-admin-{tag}-{}.sock", std::process::id()))
    }

    fn echo_handler() -> Arc<Handler> {
        Arc::new(|req| match req {
            AdminRequest::Detach { vm_id } if vm_id == "nope" => AdminResponse::Error(
                AdminFailure::new(AdminErrorCode::NotAttached, "vm nope is not attached"),
            ),
            AdminRequest::Detach { vm_id } => AdminResponse::Ok(AdminReply::Detached { vm_id }),
            _ => AdminResponse::Ok(AdminReply::List {
                attachments: vec![],
            }),
        })
    }

    #[test]
    fn serves_requests_and_errors_over_a_real_socket() {
        let path = sock_path("serve");
        let server = AdminServer::start(&path, echo_handler()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let client = VnpdAdminClient::new(&path);
        assert!(client.list().unwrap().is_empty());
        client.detach("vm-a").unwrap();
        match client.detach("nope").unwrap_err() {
            AdminClientError::Refused(f) => assert_eq!(f.code, AdminErrorCode::NotAttached),
            e => panic!("unexpected {e}"),
        }
        // Several requests on one connection, including a malformed one.
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"{\"op\":\"list\"}\nnot json\n{\"op\":\"detach\",\"vm_id\":\"x\"}\n")
            .unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut lines = vec![String::new(), String::new(), String::new()];
        for l in &mut lines {
            r.read_line(l).unwrap();
        }
        assert!(
            lines[0].starts_with("{\"ok\":{\"result\":\"list\""),
            "{}",
            lines[0]
        );
        assert!(lines[1].contains("\"bad_request\""), "{}", lines[1]);
        assert!(lines[2].contains("\"detached\""), "{}", lines[2]);
        drop(server);
        assert!(!path.exists(), "socket file left behind");
    }

    #[test]
    fn overlong_line_is_refused_and_connection_closed() {
        let path = sock_path("long");
        let _server = AdminServer::start(&path, echo_handler()).unwrap();
        let mut s = UnixStream::connect(&path).unwrap();
        let writer = {
            let mut w = s.try_clone().unwrap();
            std::thread::spawn(move || {
                let chunk = vec![b'a'; 64 * 1024];
                for _ in 0..(MAX_LINE_LEN / chunk.len() + 2) {
                    if w.write_all(&chunk).is_err() {
                        break;
                    }
                }
            })
        };
        let mut answer = String::new();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        BufReader::new(&mut s).read_line(&mut answer).unwrap();
        assert!(answer.contains("too long"), "{answer}");
        writer.join().unwrap();
    }

    #[test]
    fn refuses_to_steal_a_live_socket() {
        let path = sock_path("live");
        let _first = AdminServer::start(&path, echo_handler()).unwrap();
        let e = AdminServer::start(&path, echo_handler()).unwrap_err();
        assert!(e.to_string().contains("another vnpd"), "{e}");
        // A stale file (no listener) is replaced.
        let stale = sock_path("stale");
        drop(UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        let s = AdminServer::start(&stale, echo_handler()).unwrap();
        assert!(VnpdAdminClient::new(&stale).list().is_ok());
        drop(s);
    }
}
