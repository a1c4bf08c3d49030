//! A small blocking QMP client (QEMU Machine Protocol over a unix socket).
//!
//! Hand-written rather than the `qapi` crate: qapi's generated types pin enums to one QEMU
//! schema version (a newer QEMU's new status value fails to deserialize), and a blocking
//! request/response client is ~100 lines on top of serde_json.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::lines::{LineError, LineReader};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Line(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("no reply to {command} within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
}

impl From<LineError> for QmpError {
    fn from(e: LineError) -> Self {
        QmpError::Line(e.to_string())
    }
}

/// An open QMP session (capabilities negotiated).
#[derive(Debug)]
pub struct Qmp {
    reader: LineReader,
    next_id: u64,
    /// Asynchronous events received while waiting for replies, oldest first.
    events: Vec<Value>,
    /// QEMU version from the greeting, e.g. "10.0.2".
    pub version: String,
}

/// `query-status` result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStatus {
    /// QEMU run state: "running", "paused", "inmigrate", "postmigrate", "shutdown", ...
    pub status: String,
    pub running: bool,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        stream.set_write_timeout(Some(timeout))?;
        let mut qmp = Self {
            reader: LineReader::new(stream),
            next_id: 1,
            events: Vec::new(),
            version: String::new(),
        };
        let deadline = Instant::now() + timeout;
        let greeting = qmp.read_message(deadline, "greeting", timeout)?;
        let v = greeting
            .get("QMP")
            .and_then(|q| q.get("version"))
            .and_then(|v| v.get("qemu"))
            .ok_or_else(|| QmpError::Protocol(format!("unexpected greeting {greeting}")))?;
        qmp.version = format!("{}.{}.{}", v["major"], v["minor"], v["micro"]);
        qmp.execute("qmp_capabilities", None, timeout)?;
        Ok(qmp)
    }

    fn read_message(
        &mut self,
        deadline: Instant,
        what: &str,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        loop {
            let line = self.reader.read_line(deadline).map_err(|e| match e {
                LineError::Timeout => QmpError::Timeout {
                    command: what.to_string(),
                    timeout,
                },
                other => other.into(),
            })?;
            if line.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(&line)
                .map_err(|e| QmpError::Protocol(format!("bad JSON from QEMU ({e}): {line}")));
        }
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            req["arguments"] = args;
        }
        let mut bytes = serde_json::to_vec(&req).map_err(|e| QmpError::Protocol(e.to_string()))?;
        bytes.push(b'\n');
        self.reader.stream().write_all(&bytes)?;
        let deadline = Instant::now() + timeout;
        loop {
            let msg = self.read_message(deadline, command, timeout)?;
            if msg.get("event").is_some() {
                self.events.push(msg);
                continue;
            }
            if msg.get("id").and_then(Value::as_u64) != Some(id) {
                // A reply to an earlier command that timed out on our side: not ours.
                continue;
            }
            return parse_reply(command, msg);
        }
    }

    /// Events seen so far (drained).
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    pub fn query_status(&mut self, timeout: Duration) -> Result<VmStatus, QmpError> {
        let r = self.execute("query-status", None, timeout)?;
        parse_status(&r)
    }

    /// Asks QEMU to exit. QEMU may close the socket before or after replying; both are success.
    pub fn quit(&mut self, timeout: Duration) -> Result<(), QmpError> {
        match self.execute("quit", None, timeout) {
            Ok(_) => Ok(()),
            Err(QmpError::Line(_)) | Err(QmpError::Io(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Splits a QMP reply into its `return` value or a [`QmpError::Command`].
pub fn parse_reply(command: &str, msg: Value) -> Result<Value, QmpError> {
    if let Some(ret) = msg.get("return") {
        return Ok(ret.clone());
    }
    if let Some(err) = msg.get("error") {
        return Err(QmpError::Command {
            command: command.to_string(),
            class: err
                .get("class")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string(),
            desc: err
                .get("desc")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string(),
        });
    }
    Err(QmpError::Protocol(format!(
        "reply to {command} has neither return nor error: {msg}"
    )))
}

pub fn parse_status(r: &Value) -> Result<VmStatus, QmpError> {
    let status = r
        .get("status")
        .and_then(Value::as_str)
        .ok_or_else(|| QmpError::Protocol(format!("query-status without status: {r}")))?;
    let running = r.get("running").and_then(Value::as_bool).unwrap_or(false);
    Ok(VmStatus {
        status: status.to_string(),
        running,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_parsing() {
        assert_eq!(
            parse_reply("x", json!({"return": {}, "id": 1})).unwrap(),
            json!({})
        );
        let e = parse_reply(
            "migrate",
            json!({"error": {"class": "GenericError", "desc": "boom"}}),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "migrate failed: GenericError: boom");
        assert!(matches!(
            parse_reply("x", json!({"id": 1})),
            Err(QmpError::Protocol(_))
        ));
    }

    #[test]
    fn status_parsing() {
        let s = parse_status(&json!({"status": "running", "singlestep": false, "running": true}))
            .unwrap();
        assert_eq!(
            s,
            VmStatus {
                status: "running".into(),
                running: true
            }
        );
        assert!(parse_status(&json!({"running": true})).is_err());
    }

    /// A scripted QMP server on a socketpair: greeting, capabilities, an event interleaved
    /// before a reply, and a stale reply with another id that must be skipped.
    #[test]
    fn client_against_scripted_server() {
        use std::io::{BufRead, BufReader};
        let dir = std::env::temp_dir().join(format!("ql-qmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            writeln!(s, r#"{{"QMP": {{"version": {{"qemu": {{"micro": 2, "minor": 0, "major": 10}}, "package": ""}}, "capabilities": []}}}}"#).unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let req: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(req["execute"], "qmp_capabilities");
            writeln!(s, r#"{{"return": {{}}, "id": {}}}"#, req["id"]).unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            let req: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(req["execute"], "query-status");
            writeln!(
                s,
                r#"{{"event": "RESUME", "timestamp": {{"seconds": 1, "microseconds": 2}}}}"#
            )
            .unwrap();
            writeln!(
                s,
                r#"{{"return": {{"status": "paused", "running": false}}, "id": 999}}"#
            )
            .unwrap();
            writeln!(
                s,
                "{{\"return\": {{\"status\": \"running\", \"running\": true}}, \"id\": {}}}\r",
                req["id"]
            )
            .unwrap();
        });
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(qmp.version, "10.0.2");
        let st = qmp.query_status(Duration::from_secs(5)).unwrap();
        assert!(st.running);
        let ev = qmp.take_events();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0]["event"], "RESUME");
        server.join().unwrap();
        // The server is gone: the next command fails cleanly instead of hanging.
        assert!(qmp
            .execute("query-status", None, Duration::from_secs(2))
            .is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
